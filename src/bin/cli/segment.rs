//! `medfastsam segment INPUT... --weights FILE`: masks and overlays at each image's original size.

use super::{GpuArgs, ModelArgs};
use clap::Args;
use medfastsam::io;
use medfastsam::io::{GrayImage, RgbImage};
use medfastsam::segment::{Segmenter, TileOptions};
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
    #[command(flatten)]
    pub prompts: super::prompted::PromptArgs,
    #[command(flatten)]
    pub tiling: TileArgs,
}

/// Whole images at their own pixel scale (Med-FastSAM weights).
#[derive(Args, Clone, Default)]
pub struct TileArgs {
    /// Segment in windows of the model's input size (--size) at the image's own pixel scale,
    /// blended over their overlaps; the default for images larger than the input.
    #[arg(long)]
    pub tile: bool,
    /// Stretch every image to the model's input size and resize the logits back (no tiling).
    #[arg(long, conflicts_with = "tile")]
    pub resize: bool,
    /// Pixels shared by neighbouring windows [default: 1/8 of the window].
    #[arg(long)]
    pub overlap: Option<usize>,
    /// One Otsu threshold for the whole image instead of one per window.
    #[arg(long)]
    pub global_otsu: bool,
    /// Resample the image by this factor before tiling (e.g. 0.5 to run a model trained at 20x
    /// on a 40x image); the mask is returned at the original size.
    #[arg(long)]
    pub scale: Option<f64>,
    /// Windows per forward [default: up to 4 of a row, as the device's memory allows].
    #[arg(long)]
    pub tile_batch: Option<usize>,
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
                anyhow::bail!(
                    "{}: folder holds no images ({})",
                    p.display(),
                    io::SUPPORTED
                );
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

pub fn stem(p: &Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into())
}

/// Output base names (`<base>_mask.png`, `<base>_overlay.png`), one per input, unique and
/// deterministic. An input whose stem no other input shares (compared case-insensitively, since
/// output folders may live on case-insensitive file systems) keeps its stem. Inputs that share a
/// stem (`a/case.png` and `b/case.png`, or `case.png` and `case.jpg`) are named by their path
/// below the inputs' common folder, with the extension: `a_case_png`, `b_case_png`, `case_jpg`.
/// A name still taken after that gets `-2`, `-3`, … in input order.
pub fn output_names(files: &[PathBuf]) -> Vec<String> {
    use std::collections::{HashMap, HashSet};
    let key = |s: &str| s.to_lowercase();
    let mut count: HashMap<String, usize> = HashMap::new();
    for f in files {
        *count.entry(key(&stem(f))).or_default() += 1;
    }
    let abs: Vec<PathBuf> = files
        .iter()
        .map(|f| std::path::absolute(f).unwrap_or_else(|_| f.clone()))
        .collect();
    let parents: Vec<&Path> = abs
        .iter()
        .map(|p| p.parent().unwrap_or(Path::new("")))
        .collect();
    let common: PathBuf = match parents.split_first() {
        Some((first, rest)) => {
            let mut c: Vec<_> = first.components().collect();
            for p in rest {
                let n = c
                    .iter()
                    .zip(p.components())
                    .take_while(|(a, b)| **a == *b)
                    .count();
                c.truncate(n);
            }
            c.iter().collect()
        }
        None => PathBuf::new(),
    };
    let mut taken: HashSet<String> = HashSet::new();
    let mut out = Vec::with_capacity(files.len());
    for (f, a) in files.iter().zip(&abs) {
        let s = stem(f);
        let mut base = if count[&key(&s)] == 1 {
            s
        } else {
            let rel = a.strip_prefix(&common).unwrap_or(a);
            let parts: Vec<String> = rel
                .components()
                .filter_map(|c| match c {
                    std::path::Component::Normal(x) => Some(x.to_string_lossy().into_owned()),
                    _ => None,
                })
                .collect();
            parts.join("_").replace('.', "_")
        };
        if taken.contains(&key(&base)) {
            let mut k = 2;
            while taken.contains(&key(&format!("{base}-{k}"))) {
                k += 1;
            }
            base = format!("{base}-{k}");
        }
        taken.insert(key(&base));
        out.push(base);
    }
    out
}

/// Checks that `dir` accepts new files (a probe file is created and removed), so an unwritable
/// output folder is found before the first forward, not after it.
pub fn check_writable(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| anyhow::anyhow!("{}: cannot create the output folder: {e}", dir.display()))?;
    let probe = dir.join(format!(".medfastsam-write-test.{}.tmp", std::process::id()));
    std::fs::write(&probe, b"")
        .map_err(|e| anyhow::anyhow!("{}: output folder is not writable: {e}", dir.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Writes several files so that either all of them are replaced by complete new versions or (on
/// an error) none is: every file goes to a temporary name first, and only when all are written
/// are they renamed into place. A failure cleans up the temporary files and any file renamed
/// before it, so a mask is never left without its overlay.
pub fn write_all_atomic(files: &[(&Path, &[u8])]) -> anyhow::Result<()> {
    let tmp_of = |p: &Path| {
        let dir = p
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        dir.join(format!(".{name}.{}.tmp", std::process::id()))
    };
    let tmps: Vec<PathBuf> = files.iter().map(|(p, _)| tmp_of(p)).collect();
    let cleanup = |renamed: &[&Path]| {
        for t in &tmps {
            let _ = std::fs::remove_file(t);
        }
        for p in renamed {
            let _ = std::fs::remove_file(p);
        }
    };
    for ((path, bytes), tmp) in files.iter().zip(&tmps) {
        let res = (|| -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(tmp)?;
            f.write_all(bytes)?;
            f.sync_all()
        })();
        if let Err(e) = res {
            cleanup(&[]);
            anyhow::bail!("{}: {e}", path.display());
        }
    }
    let mut renamed: Vec<&Path> = Vec::new();
    for ((path, _), tmp) in files.iter().zip(&tmps) {
        if let Err(e) = std::fs::rename(tmp, path) {
            cleanup(&renamed);
            anyhow::bail!("{}: {e}", path.display());
        }
        renamed.push(path);
    }
    Ok(())
}

/// True for the errors after which the device cannot run anything more (driver reset, device
/// out of memory, device destroyed): segmenting the next image would fail the same way.
pub fn is_device_lost(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(c.downcast_ref::<medfastsam::error::Error>(), Some(medfastsam::error::Error::Gpu(m)) if m.contains("device lost"))
            || c.to_string().contains("device lost")
    })
}

pub fn run(gpu: &GpuArgs, a: &SegmentArgs) -> anyhow::Result<i32> {
    let files = collect_inputs(&a.inputs)?;
    let names = output_names(&files);
    let renamed: Vec<(&PathBuf, &String)> = files
        .iter()
        .zip(&names)
        .filter(|(f, n)| stem(f) != **n)
        .collect();
    let (weights, cfg, variant) = a.model.load()?;
    if !cfg.arch.is_med_fastsam() {
        return super::prompted::run(gpu, a, &files, &names, weights, cfg);
    }
    let tl = &a.tiling;
    if tl.resize
        && (tl.overlap.is_some() || tl.global_otsu || tl.scale.is_some() || tl.tile_batch.is_some())
    {
        anyhow::bail!(
            "--overlap, --global-otsu, --scale and --tile-batch are options of tiling; --resize turns it off"
        );
    }
    if let Some(f) = tl
        .scale
        .filter(|f| !(f.is_finite() && *f > 0.0 && *f <= 16.0))
    {
        anyhow::bail!("--scale {f}: a factor in (0, 16]");
    }
    if a.prompts.any() {
        anyhow::bail!(
            "{}: Med-FastSAM weights are prompt-free; --box, --point, --prompts, --multimask and              --auto-boxes need MobileSAM or LiteMedSAM weights (medfastsam import)",
            a.model.weights.display()
        );
    }
    // The output folder must accept files before the first forward (and Segmenter::new checks
    // that the model at this size fits the memory there is before anything is resized).
    check_writable(&a.out)?;
    super::train::remove_stale_temp_files(&a.out);
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
    if !renamed.is_empty() {
        eprintln!(
            "note: {} inputs share a file name stem; their outputs are named by path:",
            renamed.len()
        );
        for (f, n) in &renamed {
            eprintln!("  {} -> {n}_mask.png, {n}_overlay.png", f.display());
        }
    }
    // Test-only fault injection: destroy the device after this many images (simulates a driver
    // reset or a device lost to out-of-memory).
    let lose_after: Option<usize> = std::env::var("MEDFASTSAM_TEST_LOSE_DEVICE_AFTER")
        .ok()
        .and_then(|v| v.parse().ok());
    let bar = if files.len() > 1 {
        let b = indicatif::ProgressBar::new(files.len() as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]",
            )
            .expect("static template"),
        );
        Some(b)
    } else {
        None
    };
    let say = |m: String| super::bar_line(bar.as_ref(), m);
    let mut failures = 0;
    let mut done = 0;
    for (k, (f, base)) in files.iter().zip(&names).enumerate() {
        if lose_after == Some(k) {
            gpu.device.destroy();
        }
        let t = Instant::now();
        let res = (|| -> anyhow::Result<String> {
            let img = io::load_rgb(f)?;
            if tiled(&a.tiling, &img, cfg.image_size) {
                return segment_tiled(&seg, a, &img, f, base, t, bar.as_ref());
            }
            let r = seg
                .segment(&img)
                .map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            let mask_path = a.out.join(format!("{base}_mask.png"));
            let over_path = a.out.join(format!("{base}_overlay.png"));
            let mask_png = io::encode_png_gray(&r.mask)?;
            let over_png = io::encode_png_rgb(&io::overlay(&img, &r.mask, a.opacity))?;
            write_all_atomic(&[(&mask_path, &mask_png), (&over_path, &over_png)])?;
            let fg =
                r.mask.data.iter().filter(|&&v| v > 0).count() as f64 / r.mask.data.len() as f64;
            Ok(format!(
                "{}: {}x{} -> {} ({:.1}% foreground, Otsu t={:.4}) in {:.0} ms",
                f.display(),
                img.width,
                img.height,
                mask_path.display(),
                fg * 100.0,
                r.threshold,
                ms
            ))
        })();
        match res {
            Ok(msg) => {
                done += 1;
                say(msg)
            }
            Err(e) => {
                failures += 1;
                let lost = is_device_lost(&e);
                say(format!("error: {e:#}"));
                if lost {
                    let left = files.len() - k - 1;
                    let rest = if left > 0 {
                        format!(", {left} not attempted (run again on those)")
                    } else {
                        String::new()
                    };
                    say(format!(
                        "error: the GPU device was lost while segmenting {}; stopping with {done} images written{rest}",
                        f.display()
                    ));
                    failures += left;
                    break;
                }
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
        "{done} of {n} images segmented in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    Ok(if failures > 0 { 1 } else { 0 })
}

/// Whether `img` is segmented in windows: `--tile`, or by default when it is larger than the
/// model's input in either dimension (after `--scale`); never with `--resize`.
fn tiled(t: &TileArgs, img: &RgbImage, s: usize) -> bool {
    if t.resize {
        return false;
    }
    let f = t.scale.unwrap_or(1.0);
    let (w, h) = (
        (img.width as f64 * f).round() as usize,
        (img.height as f64 * f).round() as usize,
    );
    t.tile || t.scale.is_some() || w > s || h > s
}

/// One image in windows: the blended logits' mask and overlay written as for a resized image.
fn segment_tiled(
    seg: &Segmenter,
    a: &SegmentArgs,
    img: &RgbImage,
    f: &Path,
    base: &str,
    t: Instant,
    files_bar: Option<&indicatif::ProgressBar>,
) -> anyhow::Result<String> {
    let tl = &a.tiling;
    let s = seg.model.cfg.image_size;
    let scaled;
    let work = match tl.scale {
        Some(k) if k != 1.0 => {
            let (w, h) = (
                ((img.width as f64 * k).round() as usize).max(1),
                ((img.height as f64 * k).round() as usize).max(1),
            );
            medfastsam::io::check_pixel_budget(&f.display().to_string(), w as u64, h as u64)?;
            scaled = img.resize(w, h);
            &scaled
        }
        _ => img,
    };
    let overlap = tl.overlap.unwrap_or(s / 8);
    let batch = match tl.tile_batch {
        Some(b) => b.max(1),
        None => (1..=4)
            .rev()
            .find(|&b| medfastsam::model::memory::check_forward(seg.gpu, &seg.model.cfg, b).is_ok())
            .unwrap_or(1),
    };
    let opts = TileOptions {
        overlap,
        global_otsu: tl.global_otsu,
        batch,
    };
    let plan = medfastsam::tile::TilePlan::new(work.width, work.height, s, overlap)
        .map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
    let bar = if files_bar.is_none() && plan.count() > 1 {
        let b = indicatif::ProgressBar::new(plan.count() as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} tiles {per_sec} [{elapsed_precise}<{eta_precise}]",
            )
            .expect("static template"),
        );
        Some(b)
    } else {
        None
    };
    let mut mask = GrayImage {
        width: work.width,
        height: work.height,
        data: vec![0u8; work.width * work.height],
    };
    let w = work.width;
    let stats = seg
        .segment_tiled(
            work,
            &opts,
            |y, row| {
                for (m, &l) in mask.data[y * w..(y + 1) * w].iter_mut().zip(row) {
                    *m = if l > 0.0 { 255 } else { 0 };
                }
                Ok(())
            },
            |done, _| {
                if let Some(b) = &bar {
                    b.set_position(done as u64);
                }
            },
        )
        .map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if (mask.width, mask.height) != (img.width, img.height) {
        mask = mask.resize_nearest(img.width, img.height);
    }
    let mask_path = a.out.join(format!("{base}_mask.png"));
    let over_path = a.out.join(format!("{base}_overlay.png"));
    let mask_png = io::encode_png_gray(&mask)?;
    let over_png = io::encode_png_rgb(&io::overlay(img, &mask, a.opacity))?;
    write_all_atomic(&[(&mask_path, &mask_png), (&over_path, &over_png)])?;
    let fg = mask.data.iter().filter(|&&v| v > 0).count() as f64 / mask.data.len() as f64;
    let otsu = match stats.global_t {
        Some(t) => format!("global Otsu t={:.4}", t as f64 / 255.0),
        None => "Otsu per window".into(),
    };
    Ok(format!(
        "{}: {}x{} in {} windows of {s}x{s} (overlap {overlap}{}, {otsu}, {:.2} windows/s) -> {} ({:.1}% foreground) in {:.0} ms",
        f.display(),
        img.width,
        img.height,
        stats.tiles,
        match tl.scale {
            Some(k) => format!(", scale {k}"),
            None => String::new(),
        },
        stats.tiles as f64 / stats.seconds.max(1e-9),
        mask_path.display(),
        fg * 100.0,
        t.elapsed().as_secs_f64() * 1e3
    ))
}
