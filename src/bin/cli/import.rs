//! `medfastsam import SRC... --out W.safetensors`: PyTorch checkpoints (`.pth`/`.pt`, zip or legacy
//! format) and ONNX models into our weights file, with the configuration, architecture,
//! preprocessing, source file names and their SHA-256 in the metadata.

use clap::Args;
use medfastsam::import::convert::Imported;
use medfastsam::model::Variant;
use medfastsam::model::config::Arch;
use std::path::PathBuf;

#[derive(Args)]
pub struct ImportArgs {
    /// Checkpoint files: one .pth/.pt (PyTorch), or the ONNX files of one model (MobileSAM:
    /// encoder.onnx and sam.onnx).
    #[arg(required = true)]
    pub sources: Vec<PathBuf>,
    /// Output weights file (.safetensors).
    #[arg(long)]
    pub out: PathBuf,
    /// Architecture: auto (from the keys), med-fastsam, mobilesam or litemedsam.
    #[arg(long, default_value = "auto")]
    pub arch: String,
    /// Store floating tensors as f16 (half the size).
    #[arg(long)]
    pub f16: bool,
}

pub fn run(a: &ImportArgs) -> anyhow::Result<i32> {
    let arch = match a.arch.as_str() {
        "auto" => None,
        s => Some(Arch::parse(s)?),
    };
    let Imported {
        weights,
        cfg,
        notes,
        ..
    } = medfastsam::import::import_files(&a.sources, arch)?;
    weights.save(&a.out, &cfg, Variant::default(), a.f16)?;
    let params: usize = weights.tensors.values().map(|t| t.numel()).sum();
    let names: Vec<String> = a
        .sources
        .iter()
        .map(|p| {
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        })
        .collect();
    println!(
        "{} -> {}: {} ({} tensors, {:.2} M values, input {}x{})",
        names.join(" + "),
        a.out.display(),
        cfg.arch.name(),
        weights.tensors.len(),
        params as f64 / 1e6,
        cfg.image_size,
        cfg.image_size
    );
    for n in &notes {
        println!("  {n}");
    }
    Ok(0)
}
