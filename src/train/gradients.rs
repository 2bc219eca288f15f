//! One forward + backward in train mode on a batch, reading back every parameter gradient: what
//! `medfastsam gradients` writes and what the page's worker computes, from the same code.

use super::datasets::binarize;
use super::params::{ParamStore, TrainMode};
use super::trainer::{Example, record_batch};
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::io::{GrayImage, RgbImage};
use crate::model::weights::HostTensor;
use crate::model::{Config, MedFastSam, Variant, Weights};
use crate::ops::loss::LossConfig;
use std::collections::BTreeMap;

/// A mask for `image` as 0/1 (foreground > 127, or > 0 for masks whose values stay below 128, as
/// datasets read them); refused, naming both sizes, when its size is not the image's.
pub fn mask_for(
    image: &RgbImage,
    image_name: &str,
    mask: &GrayImage,
    mask_name: &str,
) -> Result<Vec<u8>> {
    if (mask.width, mask.height) != (image.width, image.height) {
        return Err(Error::Invalid(format!(
            "{mask_name}: mask is {}x{} but its image {image_name} is {}x{}",
            mask.width, mask.height, image.width, image.height
        )));
    }
    Ok(binarize(mask))
}

/// The gradients of one batch and its loss.
pub struct Gradients {
    /// `grad.<key>` per trainable parameter, `loss`, `loss.focal`, `loss.dice` and `logits`
    /// ([B, 1, S, S]).
    pub tensors: BTreeMap<String, HostTensor>,
    /// (loss, focal, Dice loss).
    pub loss: [f32; 3],
    /// Parameters with a gradient.
    pub count: usize,
}

impl Gradients {
    /// The tensors as a weights file (`source` names it), ready to save or serialise.
    pub fn into_weights(self, source: &str) -> Weights {
        Weights {
            tensors: self.tensors,
            source: source.into(),
            ..Default::default()
        }
    }
}

/// One forward (train mode), the paper's loss and the backward on `examples` (at the model size,
/// see [`Example::at_size`]) from fresh gradients, with `mode`'s trainable parameters.
pub async fn gradients_async(
    gpu: &Gpu,
    weights: &Weights,
    cfg: &Config,
    variant: Variant,
    mode: TrainMode,
    examples: &[Example],
) -> Result<Gradients> {
    let s = cfg.image_size;
    let n = examples.len();
    if n == 0 {
        return Err(Error::Invalid(
            "no images: gradients need at least one".into(),
        ));
    }
    for e in examples {
        if e.image.width != s || e.image.height != s || e.mask.len() != s * s {
            return Err(Error::Invalid(format!("example {} is not {s}x{s}", e.id)));
        }
    }
    let ps = ParamStore::new(gpu, weights, cfg, variant, mode)?;
    let mut rec = gpu.new_recorder();
    ps.zero_grads(&mut rec);
    let model = MedFastSam::from_params(&ps)?;
    let r = record_batch(gpu, &model, &mut rec, examples, &LossConfig::default())?;
    let out = &r.out;
    rec.submit()?;
    let l = gpu.read_async(&r.loss).await?;
    let mut tensors = ps.read_grads_async(gpu).await?;
    tensors.insert("loss".into(), HostTensor::new(&[1], vec![l[0]]));
    tensors.insert("loss.focal".into(), HostTensor::new(&[1], vec![l[1]]));
    tensors.insert("loss.dice".into(), HostTensor::new(&[1], vec![l[2]]));
    tensors.insert(
        "logits".into(),
        HostTensor::new(&[n, 1, s, s], gpu.read_async(&out.logits).await?),
    );
    Ok(Gradients {
        tensors,
        loss: [l[0], l[1], l[2]],
        count: ps.grads.len(),
    })
}
