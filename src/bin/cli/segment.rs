//! `medfastsam segment INPUT... --weights FILE`: masks and overlays at each image's original size.

use super::{GpuArgs, ModelArgs};
use clap::Args;
use medfastsam::io;
use medfastsam::segment::Segmenter;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Args)]
pub struct SegmentArgs {
    /// Image files or folders of images (PNG, JPEG, BMP, TIFF).
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Output folder (created if missing).
    #[arg(long, default_value = "medfastsam-out")]
    pub out: PathBuf,
    /// Overlay opacity of the mask tint (0..1).
    #[arg(long, default_value_t = 0.45)]
    pub opacity: f32,
}

const EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "bmp", "tif", "tiff"];

/// Expands folders (non-recursive, sorted) into their image files; files are kept as given.
pub fn collect_inputs(inputs: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in inputs {
        if p.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| {
                    f.is_file()
                        && f.extension()
                            .and_then(|e| e.to_str())
                            .is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
                })
                .collect();
            v.sort();
            if v.is_empty() {
                anyhow::bail!("{}: folder holds no images ({})", p.display(), io::SUPPORTED);
            }
            out.extend(v);
        } else if p.exists() {
            out.push(p.clone());
        } else {
            anyhow::bail!("{}: no such file or folder", p.display());
        }
    }
    Ok(out)
}

fn stem(p: &Path) -> String {
    p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "image".into())
}

pub fn run(gpu: &GpuArgs, a: &SegmentArgs) -> anyhow::Result<i32> {
    let files = collect_inputs(&a.inputs)?;
    let (weights, cfg, variant) = a.model.load()?;
    let gpu = gpu.open()?;
    let t0 = Instant::now();
    let seg = Segmenter::new(&gpu, &weights, Some(&cfg), Some(variant))?;
    drop(weights);
    eprintln!(
        "model: {} variant, {}x{} input, weights on device in {:.0} ms",
        variant.name(),
        cfg.image_size,
        cfg.image_size,
        t0.elapsed().as_secs_f64() * 1e3
    );
    std::fs::create_dir_all(&a.out).map_err(|e| anyhow::anyhow!("{}: {e}", a.out.display()))?;
    let bar = if files.len() > 1 {
        let b = indicatif::ProgressBar::new(files.len() as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]")
                .unwrap(),
        );
        Some(b)
    } else {
        None
    };
    let say = |m: String| super::bar_line(bar.as_ref(), m);
    let mut failures = 0;
    for f in &files {
        let t = Instant::now();
        let res = (|| -> anyhow::Result<(String, f64)> {
            let img = io::load_rgb(f)?;
            let r = seg.segment(&img).map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            let base = stem(f);
            let mask_path = a.out.join(format!("{base}_mask.png"));
            let over_path = a.out.join(format!("{base}_overlay.png"));
            let mask_png = io::encode_png_gray(&r.mask)?;
            let over_png = io::encode_png_rgb(&io::overlay(&img, &r.mask, a.opacity))?;
            io::write_atomic(&mask_path, &mask_png)?;
            io::write_atomic(&over_path, &over_png)?;
            let fg = r.mask.data.iter().filter(|&&v| v > 0).count() as f64 / r.mask.data.len() as f64;
            Ok((
                format!(
                    "{}: {}x{} -> {} ({:.1}% foreground, Otsu t={:.4}) in {:.0} ms",
                    f.display(),
                    img.width,
                    img.height,
                    mask_path.display(),
                    fg * 100.0,
                    r.threshold,
                    ms
                ),
                ms,
            ))
        })();
        match res {
            Ok((msg, _)) => say(msg),
            Err(e) => {
                failures += 1;
                say(format!("error: {e:#}"));
            }
        }
        if let Some(b) = &bar {
            b.inc(1);
        }
    }
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let n = files.len();
    eprintln!(
        "{} of {n} images segmented in {:.1} s",
        n - failures,
        t0.elapsed().as_secs_f64()
    );
    Ok(if failures > 0 { 1 } else { 0 })
}
