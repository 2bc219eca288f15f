//! `medfastsam import SRC... --out W.safetensors`: PyTorch checkpoints (`.pth`/`.pt`, zip or legacy
//! format) and ONNX models into our weights file, with the configuration, architecture,
//! preprocessing, source file names and their SHA-256 in the metadata.

use clap::Args;
use medfastsam::import::convert::{self, Imported};
use medfastsam::model::Variant;
use medfastsam::model::config::Arch;
use sha2::Digest;
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

fn is_onnx(p: &std::path::Path, bytes: &[u8]) -> bool {
    p.extension().is_some_and(|e| e.eq_ignore_ascii_case("onnx"))
        // A ModelProto starts with field 1 (ir_version, varint): byte 0x08.
        || (bytes.first() == Some(&0x08) && !bytes.starts_with(b"PK"))
}

pub fn run(a: &ImportArgs) -> anyhow::Result<i32> {
    let arch = match a.arch.as_str() {
        "auto" => None,
        s => Some(Arch::parse(s)?),
    };
    let mut sources = Vec::new();
    for p in &a.sources {
        let bytes = std::fs::read(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
        sources.push((p.clone(), bytes));
    }
    let names: Vec<String> = sources
        .iter()
        .map(|(p, _)| {
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        })
        .collect();
    let sha: Vec<String> = sources
        .iter()
        .map(|(_, b)| {
            sha2::Sha256::digest(b)
                .iter()
                .map(|x| format!("{x:02x}"))
                .collect()
        })
        .collect();
    let onnx: Vec<bool> = sources.iter().map(|(p, b)| is_onnx(p, b)).collect();
    let Imported {
        mut weights,
        cfg,
        notes,
        ..
    } = if onnx.iter().all(|&o| o) {
        import_onnx(&sources, arch)?
    } else if sources.len() == 1 {
        let (p, b) = &sources[0];
        convert::from_pth(b, &p.display().to_string(), arch)?
    } else {
        anyhow::bail!(
            "give one PyTorch checkpoint, or the ONNX files of one model (got {} files)",
            sources.len()
        );
    };
    convert::record_source(&mut weights, &names, &sha);
    weights.save(&a.out, &cfg, Variant::default(), a.f16)?;
    let params: usize = weights.tensors.values().map(|t| t.numel()).sum();
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

fn import_onnx(sources: &[(PathBuf, Vec<u8>)], arch: Option<Arch>) -> anyhow::Result<Imported> {
    if let Some(a) = arch.filter(|a| *a != Arch::MobileSam) {
        anyhow::bail!(
            "--arch {}: the ONNX importer reads MobileSAM's exports (encoder + prompt/mask decoder)",
            a.name()
        );
    }
    let mut models = Vec::new();
    for (p, b) in sources {
        let dir = p
            .parent()
            .map(|d| d.to_path_buf())
            .unwrap_or_else(|| PathBuf::from("."));
        let name = p.display().to_string();
        let m = medfastsam::import::onnx::read_onnx(
            b,
            &name,
            &medfastsam::import::onnx::in_folder(&dir),
        )?;
        models.push(m);
    }
    let names: Vec<String> = sources
        .iter()
        .map(|(p, _)| p.display().to_string())
        .collect();
    Ok(convert::from_onnx(&models, &names.join(" + "))?)
}
