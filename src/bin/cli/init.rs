//! `medfastsam init --from PRETRAINED.safetensors --preset paper --out init.safetensors`:
//! Med-FastSAM initialised from an imported MobileSAM or LiteMedSAM (the paper's transfer recipe;
//! see `medfastsam::import::init`). `train --init` does the same in memory.

use super::info::fmt;
use clap::Args;
use medfastsam::import::init::{self, Provenance};
use medfastsam::model::schema::{self, Kind};
use medfastsam::model::{Config, Variant, Weights};
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct InitArgs {
    /// Pretrained weights (a file written by `medfastsam import`: MobileSAM, LiteMedSAM, or a
    /// Med-FastSAM).
    #[arg(long)]
    pub from: PathBuf,
    /// Med-FastSAM preset whose added modules are initialised (its widths must match the
    /// pretrained model's; the input size and patch stride come from the pretrained model).
    #[arg(long, default_value = "paper")]
    pub preset: String,
    /// Forward variant recorded in the file: paper (default) or released.
    #[arg(long, default_value = "paper")]
    pub variant: String,
    /// Seed of the initialisation of the added modules.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output weights file (.safetensors).
    #[arg(long)]
    pub out: PathBuf,
}

/// Reads the pretrained file and initialises Med-FastSAM from it.
pub fn initialise(
    from: &Path,
    preset: &str,
    seed: u64,
) -> anyhow::Result<(Weights, Config, Provenance)> {
    let bytes = std::fs::read(from).map_err(|e| anyhow::anyhow!("{}: {e}", from.display()))?;
    let ext = from
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    if matches!(ext.as_str(), "pth" | "pt" | "onnx") {
        anyhow::bail!(
            "{}: a {ext} file; import it first (medfastsam import {} --out pretrained.safetensors) and initialise from that",
            from.display(),
            from.display()
        );
    }
    let pre = Weights::from_bytes(&bytes, &from.display().to_string())?;
    let pre_cfg = pre.resolve_config(None, 1024)?;
    pre.check(&pre_cfg)?;
    let target = init::target_config(&pre_cfg, &Config::preset(preset)?, preset)?;
    let sha = medfastsam::train::distill::sha256_hex(&bytes);
    let name = from
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (w, prov) = init::init_from(&pre, &target, seed, &name, &sha)?;
    Ok((w, target, prov))
}

/// Prints what came from where: counts, then one line per module group.
pub fn print_provenance(p: &Provenance, cfg: &Config) {
    let specs = schema::specs(cfg);
    let params = |keys: &mut dyn Iterator<Item = &str>| -> usize {
        keys.filter_map(|k| specs.iter().find(|s| s.key == k && s.kind == Kind::Param))
            .map(|s| s.numel())
            .sum()
    };
    let copied = params(&mut p.copied.iter().map(|k| k.split(" ← ").next().unwrap_or(k)));
    let initialised = params(&mut p.initialised.iter().map(|k| k.as_str()));
    println!(
        "initialised from: {} ({}, sha256 {}), seed {}",
        p.from, p.from_arch, p.from_sha256, p.seed
    );
    println!(
        "  {} tensors ({} parameters) copied, {} tensors ({} parameters) initialised as the authors' code does",
        p.copied.len(),
        fmt(copied),
        p.initialised.len(),
        fmt(initialised)
    );
    if !p.unused.is_empty() {
        println!(
            "  {} pretrained tensors unused: {}",
            p.unused.len(),
            p.unused.join(", ")
        );
    }
    for (g, c, i) in p.by_group(cfg) {
        let what = match (c, i) {
            (_, 0) => "pretrained".to_string(),
            (0, _) => "initialised".to_string(),
            _ => format!("{c} pretrained, {i} initialised"),
        };
        println!("  {g:<48} {what}");
    }
}

pub fn run(a: &InitArgs) -> anyhow::Result<i32> {
    let variant = Variant::parse(&a.variant)?;
    let (w, cfg, prov) = initialise(&a.from, &a.preset, a.seed)?;
    print_provenance(&prov, &cfg);
    w.save(&a.out, &cfg, variant, false)?;
    println!(
        "wrote {} ({}, image size {}, patch stride {})",
        a.out.display(),
        a.preset,
        cfg.image_size,
        cfg.patch_stride
    );
    Ok(0)
}
