//! Trainable state on the device: every tensor of the schema (raw, BatchNorm unfolded), gradient
//! buffers and Adam moments for the parameters that train, BatchNorm counters on the host.

use crate::error::{Error, Result};
use crate::gpu::{Gpu, Recorder, Tensor};
use crate::model::blocks::{Param, Source};
use crate::model::schema::{self, Kind};
use crate::model::weights::{HostTensor, Stored};
use crate::model::{Config, MedFastSam, Variant, Weights};
use crate::ops::optim::{AdamConfig, adam_step};
use std::collections::BTreeMap;

/// Which parameters train (docs/training.md, "Modes").
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrainMode {
    /// Every parameter trains; BatchNorm uses batch statistics and updates its running statistics.
    Full,
    /// Semi-parameter fine-tuning: the natural-knowledge branch (every `image_encoder` tensor
    /// without `med` in its name) is frozen, with its BatchNorm in eval mode.
    Semi,
    /// Feature distillation (`medfastsam distill`, src/train/distill.rs): only the natural-knowledge
    /// branch and the neck train (every `image_encoder` tensor without `med`, BatchNorm with batch
    /// statistics); the med branch, the prompt encoder and the decoder are frozen.
    Distill,
}

impl TrainMode {
    pub fn parse(s: &str) -> Result<TrainMode> {
        match s {
            "full" => Ok(TrainMode::Full),
            "semi" => Ok(TrainMode::Semi),
            o => Err(Error::Config(format!(
                "unknown training mode '{o}' (expected full or semi)"
            ))),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            TrainMode::Full => "full",
            TrainMode::Semi => "semi",
            TrainMode::Distill => "distill",
        }
    }
}

pub struct ParamStore {
    pub cfg: Config,
    pub variant: Variant,
    pub mode: TrainMode,
    /// Every float tensor of the schema on the device (parameters, running statistics, PE matrix).
    pub values: BTreeMap<String, Tensor>,
    /// Gradients of the trainable parameters (accumulated by backward, zeroed by `zero_grads`).
    pub grads: BTreeMap<String, Tensor>,
    /// Adam first/second moments of the trainable parameters.
    pub moments: BTreeMap<String, (Tensor, Tensor)>,
    /// Adam steps taken.
    pub step: u64,
    /// Host tensors not on the device (BatchNorm `num_batches_tracked`, extra keys of the file),
    /// written back on save.
    pub host: BTreeMap<String, HostTensor>,
    /// Metadata of the source file, kept on save.
    pub metadata: BTreeMap<String, String>,
}

impl ParamStore {
    pub fn new(
        gpu: &Gpu,
        weights: &Weights,
        cfg: &Config,
        variant: Variant,
        mode: TrainMode,
    ) -> Result<ParamStore> {
        cfg.validate()?;
        weights.check(cfg)?;
        let mut ps = ParamStore {
            cfg: cfg.clone(),
            variant,
            mode,
            values: BTreeMap::new(),
            grads: BTreeMap::new(),
            moments: BTreeMap::new(),
            step: 0,
            host: BTreeMap::new(),
            metadata: weights.metadata.clone(),
        };
        let specs = schema::specs(cfg);
        for s in &specs {
            let t = weights.get(&s.key)?;
            if s.kind == Kind::Counter {
                ps.host.insert(s.key.clone(), t.clone());
                continue;
            }
            ps.values
                .insert(s.key.clone(), gpu.upload(&t.data, &t.shape)?);
            if s.kind == Kind::Param && ps.is_trainable(&s.key) {
                let z = vec![0f32; t.numel()];
                ps.grads.insert(s.key.clone(), gpu.upload(&z, &t.shape)?);
                ps.moments.insert(
                    s.key.clone(),
                    (gpu.upload(&z, &t.shape)?, gpu.upload(&z, &t.shape)?),
                );
            }
        }
        for (k, t) in &weights.tensors {
            if !ps.values.contains_key(k) && !ps.host.contains_key(k) {
                ps.host.insert(k.clone(), t.clone());
            }
        }
        Ok(ps)
    }

    pub fn is_trainable(&self, key: &str) -> bool {
        match self.mode {
            TrainMode::Full => true,
            TrainMode::Semi => !key.starts_with("image_encoder.") || key.contains("med"),
            TrainMode::Distill => key.starts_with("image_encoder.") && !key.contains("med"),
        }
    }

    /// Whether the BatchNorm of a `Conv2d_BN` at `prefix` uses batch statistics.
    pub fn bn_trains(&self, prefix: &str) -> bool {
        self.is_trainable(&format!("{prefix}.bn.weight"))
    }

    /// (tuned, total) parameter counts.
    pub fn counts(&self) -> (usize, usize) {
        let mut tuned = 0;
        let mut total = 0;
        for s in schema::specs(&self.cfg)
            .iter()
            .filter(|s| s.kind == Kind::Param)
        {
            total += s.numel();
            if self.is_trainable(&s.key) {
                tuned += s.numel();
            }
        }
        (tuned, total)
    }

    pub fn v(&self, key: &str) -> Result<&Tensor> {
        self.values
            .get(key)
            .ok_or_else(|| Error::Invalid(format!("no parameter '{key}'")))
    }

    /// The gradient buffer of `key` if it trains.
    pub fn g(&self, key: &str) -> Option<&Tensor> {
        self.grads.get(key)
    }

    pub fn zero_grads(&self, rec: &mut Recorder) {
        for g in self.grads.values() {
            rec.zero(g);
        }
    }

    /// Counts one training-mode forward in every BatchNorm that used batch statistics.
    pub fn count_bn_batch(&mut self) {
        let keys: Vec<String> = self
            .host
            .keys()
            .filter(|k| k.ends_with("num_batches_tracked"))
            .cloned()
            .collect();
        for k in keys {
            let pre = k.trim_end_matches(".bn.num_batches_tracked").to_string();
            if self.bn_trains(&pre)
                && let Some(t) = self.host.get_mut(&k)
            {
                t.data[0] += 1.0;
            }
        }
    }

    /// One Adam step on every trainable parameter.
    pub fn adam(&mut self, rec: &mut Recorder, cfg: &AdamConfig) -> Result<()> {
        self.step += 1;
        let step = u32::try_from(self.step).map_err(|_| Error::Invalid("too many steps".into()))?;
        for (k, g) in &self.grads {
            let (m, v) = &self.moments[k];
            adam_step(rec, &self.values[k], m, v, g, cfg, step)?;
        }
        Ok(())
    }

    /// Reads every tensor back into host weights (for saving and evaluation).
    pub async fn to_weights_async(&self, gpu: &Gpu) -> Result<Weights> {
        let mut w = Weights {
            source: "training".into(),
            config: Some(self.cfg.clone()),
            variant: Some(self.variant),
            metadata: self.metadata.clone(),
            ..Default::default()
        };
        for (k, t) in &self.values {
            let data = gpu.read_async(t).await?;
            w.tensors.insert(
                k.clone(),
                HostTensor {
                    shape: t.shape.clone(),
                    data,
                    stored: Stored::F32,
                },
            );
        }
        for (k, t) in &self.host {
            w.tensors.insert(k.clone(), t.clone());
        }
        Ok(w)
    }

    #[cfg(not(target_arch = "wasm32"))]
    pub fn to_weights(&self, gpu: &Gpu) -> Result<Weights> {
        pollster::block_on(self.to_weights_async(gpu))
    }

    /// Reads the gradients back (`grad.<key>`).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn read_grads(&self, gpu: &Gpu) -> Result<BTreeMap<String, HostTensor>> {
        pollster::block_on(self.read_grads_async(gpu))
    }

    /// [`ParamStore::read_grads`] without blocking.
    pub async fn read_grads_async(&self, gpu: &Gpu) -> Result<BTreeMap<String, HostTensor>> {
        let mut out = BTreeMap::new();
        for (k, g) in &self.grads {
            out.insert(
                format!("grad.{k}"),
                HostTensor::new(&g.shape, gpu.read_async(g).await?),
            );
        }
        Ok(out)
    }

    /// Optimiser state (moments) as host tensors `adam.m.<key>`, `adam.v.<key>`.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn read_moments(&self, gpu: &Gpu) -> Result<BTreeMap<String, HostTensor>> {
        pollster::block_on(self.read_moments_async(gpu))
    }

    /// [`ParamStore::read_moments`] without blocking.
    pub async fn read_moments_async(&self, gpu: &Gpu) -> Result<BTreeMap<String, HostTensor>> {
        let mut out = BTreeMap::new();
        for (k, (m, v)) in &self.moments {
            out.insert(
                format!("adam.m.{k}"),
                HostTensor::new(&m.shape, gpu.read_async(m).await?),
            );
            out.insert(
                format!("adam.v.{k}"),
                HostTensor::new(&v.shape, gpu.read_async(v).await?),
            );
        }
        Ok(out)
    }

    /// Restores the moments saved by `read_moments`.
    pub fn load_moments(&mut self, gpu: &Gpu, t: &BTreeMap<String, HostTensor>) -> Result<()> {
        for (k, (m, v)) in self.moments.iter_mut() {
            let hm = t.get(&format!("adam.m.{k}"));
            let hv = t.get(&format!("adam.v.{k}"));
            match (hm, hv) {
                (Some(hm), Some(hv)) if hm.numel() == m.numel() && hv.numel() == v.numel() => {
                    *m = gpu.upload(&hm.data, &m.shape)?;
                    *v = gpu.upload(&hv.data, &v.shape)?;
                }
                _ => {
                    return Err(Error::Invalid(format!(
                        "checkpoint lacks the optimiser state of '{k}'"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// A model built on the parameters (for training, and for validation in eval mode without copying
/// the weights): each part holds the device tensors and gradient buffers of its keys.
impl Source for ParamStore {
    type P = Param;
    fn get(&self, key: &str, _shape: &[usize], _kind: Kind) -> Result<Param> {
        Ok(Param {
            v: self.v(key)?.clone(),
            g: self.g(key).cloned(),
        })
    }
    fn bn_trains(&self, pre: &str) -> bool {
        ParamStore::bn_trains(self, pre)
    }
}

impl MedFastSam {
    /// The model on the training parameters already on the device (no copy), built once per
    /// [`ParamStore`]: train mode for training, eval mode (BatchNorm with running statistics, not
    /// folded) for validation. Adam updates the parameters in place, so the model always sees the
    /// current values.
    pub fn from_params(ps: &ParamStore) -> Result<MedFastSam> {
        MedFastSam::build(ps, &ps.cfg, ps.variant)
    }
}
