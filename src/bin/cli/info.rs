//! `medfastsam info`: configuration, variant, adapter and parameter counts per module.

use super::{GpuArgs, ModelArgs};
use clap::Args;
use medfastsam::gpu::Gpu;
use medfastsam::model::schema::{self, Kind};
use std::collections::BTreeMap;

#[derive(Args)]
pub struct InfoArgs {
    /// Weights file.
    pub weights: std::path::PathBuf,
    /// Configuration JSON (default: metadata, else inferred from the shapes).
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
    /// Variant to report (default: the file's, else paper).
    #[arg(long)]
    pub variant: Option<String>,
}

pub fn run(gpu: &GpuArgs, a: &InfoArgs) -> anyhow::Result<i32> {
    let m = ModelArgs {
        weights: a.weights.clone(),
        config: a.config.clone(),
        variant: a.variant.clone(),
        size: None,
    };
    let (w, cfg, variant) = m.load()?;
    println!("weights:       {}", a.weights.display());
    let src = if a.config.is_some() {
        "from --config"
    } else if w.config.is_some() {
        "from the file's metadata"
    } else {
        "inferred from tensor shapes"
    };
    println!("configuration: {} ({src})", cfg.to_json());
    println!("architecture:  {}", cfg.arch.name());
    if cfg.arch.is_med_fastsam() {
        println!("variant:       {}", variant.name());
    }
    match super::trained_on(&w, &a.weights)? {
        Some(t) => {
            println!("trained on:    {}", t.summary());
            if let Some(n) = &t.note {
                println!("               {n}");
            }
        }
        None => println!(
            "trained on:    not recorded (inference uses channel rgb and checks only the foreground fraction)"
        ),
    }
    use medfastsam::import::convert as imp;
    if let Some(src) = w.metadata.get(imp::META_SOURCE) {
        let sha = w
            .metadata
            .get(imp::META_SOURCE_SHA256)
            .cloned()
            .unwrap_or_default();
        println!("imported from: {src} (sha256 {sha})");
    }
    if let Some(p) = w.metadata.get(imp::META_PREPROCESSING) {
        println!("preprocessing: {p}");
    }
    if let Some(n) = w.metadata.get(imp::META_IMPORT_NOTES) {
        println!("import notes:  {n}");
    }
    if let Some(p) = medfastsam::import::init::Provenance::of(&w) {
        super::init::print_provenance(&p, &cfg);
    }
    let specs = schema::specs(&cfg);
    let mut groups: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let (mut total, mut natural, mut buffers) = (0usize, 0usize, 0usize);
    for s in &specs {
        if s.kind != Kind::Param {
            buffers += s.numel();
            continue;
        }
        total += s.numel();
        if s.is_natural_branch() {
            natural += s.numel();
        }
        let e = groups.entry(s.group()).or_default();
        e.0 += s.numel();
        e.1 += 1;
    }
    println!(
        "parameters:    {} total ({:.2} M)",
        fmt(total),
        total as f64 / 1e6
    );
    println!(
        "               {} tuned in semi mode (natural branch of {} frozen)",
        fmt(total - natural),
        fmt(natural)
    );
    println!(
        "buffers:       {} values (BatchNorm running statistics, PE matrix)",
        fmt(buffers)
    );
    let extra: Vec<&String> = w
        .tensors
        .keys()
        .filter(|k| !specs.iter().any(|s| &s.key == *k))
        .collect();
    if !extra.is_empty() {
        println!("extra tensors kept on save: {}", extra.len());
    }
    println!("per module:");
    for (g, (n, k)) in &groups {
        println!("  {g:<48} {:>12}  ({k} tensors)", fmt(*n));
    }
    // A machine without a usable GPU still gets the report ("none", exit 0); a backend or an
    // adapter that was asked for and cannot be had is an error.
    match Gpu::new(&gpu.request()) {
        Ok(g) => println!("adapter:       {}", g.summary()),
        Err(e @ medfastsam::error::Error::NoAdapter(_)) if !gpu.explicit() => {
            println!("adapter:       none ({e})")
        }
        Err(e) => return Err(e.into()),
    }
    Ok(0)
}

/// 14479104 -> "14,479,104".
pub fn fmt(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
