//! `medfastsam gradients`: one forward + backward in train mode on a batch, writing the loss values
//! and every parameter gradient (authors' key names prefixed `grad.`) as safetensors.

use super::{GpuArgs, ModelArgs};
use clap::Args;
use medfastsam::io;
use medfastsam::train::gradients::gradients_async;
use medfastsam::train::params::TrainMode;
use medfastsam::train::trainer::Example;
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
    let mut examples = Vec::new();
    for (ip, mp) in a.images.iter().zip(&a.masks) {
        let img = io::load_rgb(ip)?;
        let m = io::load_gray(mp)?;
        examples.push(Example::from_pair(
            &img,
            &ip.display().to_string(),
            &m,
            &mp.display().to_string(),
            s,
        )?);
    }
    let n = examples.len();
    let gpu = gpu.open()?;
    let mode = TrainMode::parse(&a.mode)?;
    let t0 = std::time::Instant::now();
    let g = pollster::block_on(gradients_async(
        &gpu, &weights, &cfg, variant, mode, &examples,
    ))?;
    let (l, count) = (g.loss, g.count);
    g.into_weights(&a.out.display().to_string())
        .save(&a.out, &cfg, variant, false)?;
    println!(
        "loss {:.6} (focal {:.6}, dice {:.6}) on {n} image(s) at {s}x{s}, {count} gradients ({} mode) -> {} in {:.1} s",
        l[0],
        l[1],
        l[2],
        mode.name(),
        a.out.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(0)
}
