//! `medfastsam gradients`: one forward + backward in train mode on a batch, writing the loss values
//! and every parameter gradient (authors' key names prefixed `grad.`) as safetensors.

use super::{GpuArgs, ModelArgs};
use clap::Args;
use medfastsam::io;
use medfastsam::model::MedFastSam;
use medfastsam::model::weights::HostTensor;
use medfastsam::ops::loss::{LossConfig, seg_loss};
use medfastsam::train::datasets::binarize;
use medfastsam::train::params::{ParamStore, TrainMode};
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Args)]
pub struct GradientsArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Images of the batch.
    #[arg(long, num_args = 1.., required = true)]
    pub images: Vec<PathBuf>,
    /// Masks, one per image (8-bit, foreground > 127).
    #[arg(long, num_args = 1.., required = true)]
    pub masks: Vec<PathBuf>,
    /// Output .safetensors file.
    #[arg(long)]
    pub out: PathBuf,
    /// semi: natural branch frozen (no gradients for it, BatchNorm in eval mode).
    #[arg(long, default_value = "full")]
    pub mode: String,
}

pub fn run(gpu: &GpuArgs, a: &GradientsArgs) -> anyhow::Result<i32> {
    if a.images.len() != a.masks.len() {
        anyhow::bail!(
            "{} images but {} masks: give one mask per image",
            a.images.len(),
            a.masks.len()
        );
    }
    let (weights, cfg, variant) = a.model.load()?;
    let s = cfg.image_size;
    let mut px = Vec::new();
    let mut tg = Vec::new();
    for (ip, mp) in a.images.iter().zip(&a.masks) {
        let img = io::load_rgb(ip)?;
        let m = io::load_gray(mp)?;
        if (m.width, m.height) != (img.width, img.height) {
            anyhow::bail!(
                "{}: mask is {}x{} but its image {} is {}x{}",
                mp.display(),
                m.width,
                m.height,
                ip.display(),
                img.width,
                img.height
            );
        }
        let bin = io::GrayImage {
            width: m.width,
            height: m.height,
            data: binarize(&m),
        };
        px.extend(img.resize(s, s).packed());
        tg.extend(bin.resize_nearest(s, s).data.iter().map(|&v| v as f32));
    }
    let n = a.images.len();
    let gpu = gpu.open()?;
    let mode = TrainMode::parse(&a.mode)?;
    let ps = ParamStore::new(&gpu, &weights, &cfg, variant, mode)?;
    let pxt = gpu.upload_u32(&px, &[n, s, s])?;
    let tgt = gpu.upload(&tg, &[n, s, s, 1])?;
    let t0 = std::time::Instant::now();
    let mut rec = gpu.new_recorder();
    ps.zero_grads(&mut rec);
    let model = MedFastSam::from_params(&ps)?;
    let (out, saved) = model.forward_train(&mut rec, &pxt)?;
    let (loss, dlogits) = seg_loss(&mut rec, &out.logits, &tgt, &LossConfig::default())?;
    model.backward(&mut rec, &saved, &dlogits)?;
    rec.submit()?;
    let l = gpu.read(&loss)?;
    let mut tensors: BTreeMap<String, HostTensor> = ps.read_grads(&gpu)?;
    tensors.insert("loss".into(), HostTensor::new(&[1], vec![l[0]]));
    tensors.insert("loss.focal".into(), HostTensor::new(&[1], vec![l[1]]));
    tensors.insert("loss.dice".into(), HostTensor::new(&[1], vec![l[2]]));
    tensors.insert(
        "logits".into(),
        HostTensor::new(&[n, 1, s, s], gpu.read(&out.logits)?),
    );
    let w = medfastsam::model::Weights {
        tensors,
        source: a.out.display().to_string(),
        ..Default::default()
    };
    w.save(&a.out, &cfg, variant, false)?;
    println!(
        "loss {:.6} (focal {:.6}, dice {:.6}) on {n} image(s) at {s}x{s}, {} gradients ({} mode) -> {} in {:.1} s",
        l[0],
        l[1],
        l[2],
        ps.grads.len(),
        mode.name(),
        a.out.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(0)
}
