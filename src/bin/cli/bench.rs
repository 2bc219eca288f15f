//! `medfastsam bench`: whole-model ms per image (median after warm-up, pipeline compilation timed
//! separately), kernel micro-benchmarks at the model's real shapes, peak GPU memory. `--json` for
//! machine-readable output.

use super::GpuArgs;
use clap::Args;
use medfastsam::gpu::Gpu;
use medfastsam::model::{Config, MedFastSam, Precision, Variant, Weights};
use medfastsam::ops::BenchResult;
use serde::Serialize;
use std::time::Instant;

#[derive(Args)]
pub struct BenchArgs {
    /// Input sizes for the whole-model benchmark.
    #[arg(long, value_delimiter = ',', default_value = "256,512,1024")]
    pub sizes: Vec<usize>,
    /// Timed runs per size (after one warm-up run).
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
    /// Preset of the benchmarked model.
    #[arg(long, default_value = "paper")]
    pub preset: String,
    /// Benchmark the forward with the weights in this file (.safetensors, the authors' key
    /// names; its configuration, --sizes still sets the input) instead of random weights of
    /// --preset. `scripts/bench-peers.sh` uses it to run PyTorch and this engine on one set of
    /// weights.
    #[arg(long)]
    pub weights: Option<std::path::PathBuf>,
    /// Variant (paper computes the Group Attention med branch; released skips it).
    #[arg(long, default_value = "paper")]
    pub variant: String,
    /// Skip the kernel micro-benchmarks.
    #[arg(long)]
    pub no_kernels: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also time every kernel of one forward at each size (each dispatch waited for).
    #[arg(long)]
    pub profile: bool,
    /// Training-step benchmarks as PRESET:SIZE:BATCH[:MODE] (forward + backward + Adam; MODE full,
    /// the default, or semi).
    #[arg(long, value_delimiter = ',', default_value = "tiny:256:4,paper:1024:4")]
    pub train: Vec<String>,
    /// Skip the training-step benchmarks.
    #[arg(long)]
    pub no_train: bool,
    /// Instead of timing the --train steps, print their memory view: the bytes held after each
    /// part of the forward and backward and the peak between (recorded, never run: any size
    /// takes seconds).
    #[arg(long)]
    pub memory: bool,
    /// Skip the whole-model (forward) benchmark at --sizes.
    #[arg(long)]
    pub no_models: bool,
    /// Benchmark tiled inference instead (windows per second, blending overhead, megapixels per
    /// minute) at each of --sizes, for each of these presets.
    #[arg(long, value_delimiter = ',', num_args = 0.., default_missing_value = "tiny,paper")]
    pub tiles: Option<Vec<String>>,
    /// Benchmark a prompted architecture instead (mobilesam or litemedsam, at its native size):
    /// the image encoder per image and the mask decoder per prompt.
    #[arg(long)]
    pub arch: Option<String>,
    /// Weight storage of the benchmarked inference models (training always runs in f32).
    #[command(flatten)]
    pub precision: super::PrecisionArgs,
}

#[derive(Serialize)]
pub struct SamBench {
    pub arch: String,
    pub size: usize,
    pub encoder_compile_ms: f64,
    pub encoder_ms: f64,
    pub decoder_ms_per_prompt: f64,
    pub peak_gpu_bytes: u64,
    pub weight_bytes: u64,
    /// Storage of the GEMM weights (`f32` or `f16`).
    pub precision: String,
}

/// Encoder and per-prompt decoder times of MobileSAM / LiteMedSAM (random weights; median of
/// `reps` runs after one warm-up that includes pipeline compilation).
pub fn bench_sam(
    gpu: &Gpu,
    cfg: &Config,
    reps: usize,
    precision: Precision,
) -> anyhow::Result<SamBench> {
    use medfastsam::model::sam::{LabelledPoint, Sam};
    let weights = Weights::init(cfg, 1);
    gpu.trim_pool();
    gpu.reset_peak();
    let model = Sam::with_precision(gpu, &weights, cfg, precision)?;
    let precision = precision.resolve(gpu);
    let s = cfg.image_size;
    let mut rng = medfastsam::rng::Rng::new(7);
    let x: Vec<f32> = (0..s * s * 3).map(|_| rng.normal() as f32).collect();
    let x = gpu.upload(&x, &[1, s, s, 3])?;
    let encode = || -> anyhow::Result<(f64, medfastsam::gpu::Tensor)> {
        let t = Instant::now();
        let mut rec = gpu.new_recorder();
        let emb = model.encode(&mut rec, &x)?;
        rec.submit()?;
        let _ = gpu.read(&emb.reshape(&[emb.numel()]).narrow(0, 1))?;
        Ok((t.elapsed().as_secs_f64() * 1e3, emb))
    };
    let (first, emb) = encode()?;
    let mut te = Vec::new();
    for _ in 0..reps.max(1) {
        te.push(encode()?.0);
    }
    let q = s as f32;
    let pts = [
        LabelledPoint {
            x: 0.3 * q,
            y: 0.3 * q,
            label: 2,
        },
        LabelledPoint {
            x: 0.5 * q,
            y: 0.45 * q,
            label: 3,
        },
    ];
    let decode = || -> anyhow::Result<f64> {
        let t = Instant::now();
        let mut rec = gpu.new_recorder();
        let out = model.decode(&mut rec, &emb, &pts, None)?;
        rec.submit()?;
        let _ = gpu.read(&out.iou)?;
        Ok(t.elapsed().as_secs_f64() * 1e3)
    };
    decode()?;
    let mut td = Vec::new();
    for _ in 0..(3 * reps).max(3) {
        td.push(decode()?);
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let encoder_ms = med(&mut te);
    Ok(SamBench {
        arch: cfg.arch.name().into(),
        size: s,
        encoder_compile_ms: (first - encoder_ms).max(0.0),
        encoder_ms,
        decoder_ms_per_prompt: med(&mut td),
        peak_gpu_bytes: gpu.pool_stats().peak_allocated,
        weight_bytes: model.device_bytes(),
        precision: precision.name().into(),
    })
}

#[derive(Serialize)]
pub struct TrainBench {
    pub preset: String,
    pub size: usize,
    pub batch: usize,
    pub mode: &'static str,
    pub compile_ms: f64,
    pub step_ms: f64,
    pub images_per_s: f64,
    pub peak_gpu_bytes: u64,
    /// `step_ms / forward_ms`: the step against eval-mode forwards of the same images.
    pub step_over_forward: Option<f64>,
    pub error: Option<String>,
}

/// Median ms of a training step (forward, loss, backward, Adam) on random data.
/// Prints the `top` most expensive entries of a dispatch profile (MEDFASTSAM_PROFILE_TOP
/// overrides `top`; MEDFASTSAM_PROFILE_DETAIL=1 makes the recorder key entries by kernel variant
/// and grid), with the GFLOP/s of the entries that declared FLOPs.
fn print_profile(
    title: &str,
    prof: std::collections::BTreeMap<String, medfastsam::gpu::ProfileEntry>,
    total: f64,
    top: usize,
) {
    let top = std::env::var("MEDFASTSAM_PROFILE_TOP")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(top);
    let mut v: Vec<_> = prof.into_iter().collect();
    v.sort_by(|a, b| b.1.ms.total_cmp(&a.1.ms));
    eprintln!("{title} (each dispatch waited for; {total:.0} ms in all):");
    for (k, e) in v.iter().take(top) {
        let rate = if e.flops > 0.0 {
            format!(" {:>6.1} GFLOP/s", e.flops / e.ms / 1e6)
        } else {
            String::new()
        };
        eprintln!(
            "  {k:<28} {:>4} calls {:>9.1} ms {:>5.1}%{rate}",
            e.calls,
            e.ms,
            100.0 * e.ms / total
        );
    }
}

/// A trainer with random weights and a batch of random images and masks, for the training-step
/// benchmarks.
fn train_setup<'g>(
    gpu: &'g Gpu,
    cfg: &Config,
    batch: usize,
    mode: medfastsam::train::params::TrainMode,
) -> anyhow::Result<(
    medfastsam::train::trainer::Trainer<'g>,
    Vec<medfastsam::train::trainer::Example>,
)> {
    use medfastsam::train::trainer::{Example, TrainOptions, Trainer};
    let size = cfg.image_size;
    let w = Weights::init(cfg, 1);
    let opts = TrainOptions {
        batch,
        mode,
        ..TrainOptions::default()
    };
    let t = Trainer::new(gpu, &w, cfg, Variant::Paper, opts)?;
    let mut rng = medfastsam::rng::Rng::new(3);
    let examples = (0..batch)
        .map(|i| Example {
            id: format!("{i}"),
            image: medfastsam::io::RgbImage {
                width: size,
                height: size,
                data: (0..size * size * 3).map(|_| rng.below(256) as u8).collect(),
            },
            mask: (0..size * size).map(|_| rng.below(2) as u8).collect(),
        })
        .collect();
    Ok((t, examples))
}

/// Prints a recording's memory view: what is held after each part and the peak in between.
fn print_memory(title: &str, marks: &[medfastsam::gpu::MemoryMark], peak_allocated: u64) {
    let mib = |b: u64| b as f64 / 1048576.0;
    let peak = marks.iter().map(|m| m.peak).max().unwrap_or(0);
    eprintln!(
        "{title}: peak {:.1} MiB held by tensors, {:.1} MiB allocated from the device (recorded, exact)",
        mib(peak),
        mib(peak_allocated)
    );
    eprintln!(
        "  {:<44} {:>10} {:>10} {:>12} {:>10}",
        "after", "held MiB", "change", "peak before", "allocated"
    );
    let mut prev = None;
    for m in marks {
        let change = prev.map_or(String::new(), |p: u64| {
            format!("{:+.1}", mib(m.in_use) - mib(p))
        });
        eprintln!(
            "  {:<44} {:>10.1} {:>10} {:>12.1} {:>10.1}{}",
            m.what,
            mib(m.in_use),
            change,
            mib(m.peak),
            mib(m.allocated),
            if m.peak == peak { "  <- peak" } else { "" }
        );
        prev = Some(m.in_use);
    }
}

/// The memory view of one training step, recorded and never run (any size, in seconds).
pub fn memory_train(
    gpu: &Gpu,
    preset: &str,
    size: usize,
    batch: usize,
    mode: medfastsam::train::params::TrainMode,
) -> anyhow::Result<()> {
    let cfg = Config::preset(preset)?.with_image_size(size)?;
    gpu.trim_pool();
    gpu.reset_peak();
    let (t, examples) = train_setup(gpu, &cfg, batch, mode)?;
    let mut rec = gpu.new_recorder();
    rec.start_memory_view();
    t.record_one(&mut rec, &examples)?;
    let marks = rec.memory.take().unwrap_or_default();
    drop(rec);
    print_memory(
        &format!(
            "training-step memory {preset} {size}² batch {batch} {}",
            mode.name()
        ),
        &marks,
        gpu.pool_stats().peak_allocated,
    );
    Ok(())
}

pub fn bench_train(
    gpu: &Gpu,
    preset: &str,
    size: usize,
    batch: usize,
    mode: medfastsam::train::params::TrainMode,
    reps: usize,
    profile: bool,
) -> anyhow::Result<TrainBench> {
    let cfg = Config::preset(preset)?.with_image_size(size)?;
    gpu.trim_pool();
    gpu.reset_peak();
    let (mut t, examples) = train_setup(gpu, &cfg, batch, mode)?;
    let micro = vec![examples];
    let t0 = Instant::now();
    t.step(&micro)?;
    let first = t0.elapsed().as_secs_f64() * 1e3;
    let mut v = Vec::new();
    for _ in 0..reps.max(1) {
        let ts = Instant::now();
        t.step(&micro)?;
        v.push(ts.elapsed().as_secs_f64() * 1e3);
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let step = v[v.len() / 2];
    let peak = gpu.pool_stats().peak_allocated;
    if profile {
        let mut rec = gpu.new_recorder();
        rec.profile = Some(Default::default());
        rec.start_memory_view();
        let tp = Instant::now();
        t.record_one(&mut rec, &micro[0])?;
        let prof = rec.profile.take().unwrap();
        let marks = rec.memory.take().unwrap_or_default();
        rec.submit()?;
        let total = tp.elapsed().as_secs_f64() * 1e3;
        let title = format!("training-step profile {preset} {size}² batch {batch}");
        print_profile(&title, prof, total, 25);
        print_memory(&title, &marks, peak);
    }
    // The eval-mode forward of the same images, for the step/forward ratio (one image per
    // forward, as inference runs, so that it fits the device at every size).
    let wts = t.weights()?;
    let model = MedFastSam::new(gpu, &wts, &cfg, Variant::Paper)?;
    let mut fv = Vec::new();
    for r in 0..reps.max(1) + 1 {
        let mut sum = 0.0;
        for e in &micro[0] {
            let px = gpu.upload_u32(&e.image.packed(), &[1, size, size])?;
            sum += run_once(gpu, &model, &px)?.0;
        }
        if r > 0 {
            fv.push(sum);
        }
    }
    fv.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let fwd = fv[fv.len() / 2];
    Ok(TrainBench {
        preset: preset.into(),
        size,
        batch,
        mode: mode.name(),
        compile_ms: (first - step).max(0.0),
        step_ms: step,
        images_per_s: batch as f64 * 1e3 / step,
        peak_gpu_bytes: peak,
        step_over_forward: Some(step / fwd),
        error: None,
    })
}

#[derive(Serialize)]
pub struct ModelBench {
    pub size: usize,
    pub variant: String,
    /// First run (pipeline compilation + one forward) minus the median run.
    pub compile_ms: f64,
    pub median_ms: f64,
    pub min_ms: f64,
    pub images_per_s: f64,
    pub dispatches: usize,
    pub gemm_gflop: f64,
    /// Peak bytes of device buffers allocated (weights + activations + pool cache).
    pub peak_gpu_bytes: u64,
    pub weight_bytes: u64,
    /// Storage of the GEMM weights (`f32` or `f16`).
    pub precision: String,
}

#[derive(Serialize)]
pub struct Report {
    pub adapter: String,
    pub models: Vec<ModelBench>,
    pub train: Vec<TrainBench>,
    pub kernels: Vec<BenchResult>,
}

/// One forward of a batch of one image, waited for.
fn run_once(
    gpu: &Gpu,
    model: &MedFastSam,
    px: &medfastsam::gpu::Tensor,
) -> anyhow::Result<(f64, usize, f64)> {
    let t = Instant::now();
    let mut rec = gpu.new_recorder();
    let out = model.forward(&mut rec, px, false)?;
    let (d, f) = (rec.dispatches, rec.flops);
    rec.submit()?;
    // Read one value back so the timing includes the end of the work.
    let _ = gpu.read(&out.threshold)?;
    Ok((t.elapsed().as_secs_f64() * 1e3, d, f))
}

/// The whole-model benchmark at `cfg.image_size`: `weights` when given, else random weights.
pub fn bench_model(
    gpu: &Gpu,
    cfg: &Config,
    weights: Option<&Weights>,
    variant: Variant,
    reps: usize,
    profile: bool,
    precision: Precision,
) -> anyhow::Result<ModelBench> {
    let random;
    let weights = match weights {
        Some(w) => w,
        None => {
            random = Weights::init(cfg, 1);
            &random
        }
    };
    gpu.trim_pool();
    gpu.reset_peak();
    let model = MedFastSam::with_precision(gpu, weights, cfg, variant, precision)?;
    let precision = precision.resolve(gpu);
    let s = cfg.image_size;
    let mut rng = medfastsam::rng::Rng::new(7);
    let px: Vec<u32> = (0..s * s)
        .map(|_| rng.next_u64() as u32 & 0xFF_FFFF)
        .collect();
    let px = gpu.upload_u32(&px, &[1, s, s])?;
    let (first, dispatches, flops) = run_once(gpu, &model, &px)?;
    let mut times = Vec::new();
    for _ in 0..reps.max(1) {
        times.push(run_once(gpu, &model, &px)?.0);
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let median = times[times.len() / 2];
    let stats = gpu.pool_stats();
    if profile {
        let mut rec = gpu.new_recorder();
        rec.profile = Some(Default::default());
        let t = Instant::now();
        let _out = model.forward(&mut rec, &px, false)?;
        let prof = rec.profile.take().unwrap();
        rec.submit()?;
        gpu.sync()?;
        let total = t.elapsed().as_secs_f64() * 1e3;
        print_profile(&format!("profile at {s}²"), prof, total, usize::MAX);
    }
    Ok(ModelBench {
        size: s,
        variant: variant.name().into(),
        compile_ms: (first - median).max(0.0),
        median_ms: median,
        min_ms: times[0],
        images_per_s: 1e3 / median,
        dispatches,
        gemm_gflop: flops / 1e9,
        peak_gpu_bytes: stats.peak_allocated,
        weight_bytes: model.device_bytes(),
        precision: precision.name().into(),
    })
}

#[derive(Serialize)]
pub struct TileBench {
    pub preset: String,
    /// Window size S (the model's input).
    pub size: usize,
    pub width: usize,
    pub height: usize,
    pub windows: usize,
    pub overlap: usize,
    /// The whole tiled segmentation (windows cut, uploaded, run, read back, blended, thresholded).
    pub seconds: f64,
    pub windows_per_s: f64,
    pub megapixels_per_min: f64,
    /// One window's forward alone (upload, forward, logits read back), median.
    pub forward_ms: f64,
    /// The CPU blending of one window's logits (weights, accumulation, normalisation), median.
    pub blend_ms_per_window: f64,
    /// Blending against the forward: `blend_ms_per_window / forward_ms`.
    pub blend_overhead: f64,
    /// Everything that is not a forward: `seconds / (windows × forward) − 1` (noisy: within the
    /// run-to-run spread of the forward itself on a shared machine).
    pub pipeline_overhead: f64,
}

/// Tiled inference of a synthetic image 2.5 S × 2 S (3 × 3 windows at overlap S/8), one window
/// per forward, random weights of `preset`.
pub fn bench_tiles(gpu: &Gpu, preset: &str, s: usize, reps: usize) -> anyhow::Result<TileBench> {
    use medfastsam::segment::{Segmenter, TileOptions};
    use medfastsam::tile::{Blender, TilePlan};
    let cfg = Config::preset(preset)?.with_image_size(s)?;
    let weights = Weights::init(&cfg, 1);
    gpu.trim_pool();
    let seg = Segmenter::new(gpu, &weights, Some(&cfg), Some(Variant::Paper))?;
    let (w, h) = (s * 5 / 2, s * 2);
    let mut rng = medfastsam::rng::Rng::new(11);
    let img = medfastsam::io::RgbImage {
        width: w,
        height: h,
        data: (0..w * h * 3)
            .map(|i| (((i / 3 % w) / 9 + (i / 3 / w) / 7) * 37 % 200 + rng.below(40)) as u8)
            .collect(),
    };
    let overlap = s / 8;
    let plan = TilePlan::new(w, h, s, overlap)?;
    let window = plan.window(&img, 1, 1);
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    seg.logits_at_model_size(&window)?; // pipeline compilation
    let mut fw = Vec::new();
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        seg.logits_at_model_size(&window)?;
        fw.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let forward_ms = med(&mut fw);
    let opts = TileOptions {
        overlap,
        global_otsu: false,
        batch: 1,
    };
    let mut mask = vec![0u8; w * h];
    let t = Instant::now();
    let stats = seg.segment_tiled(
        &img,
        &opts,
        |y, row, _| {
            for (m, &l) in mask[y * w..(y + 1) * w].iter_mut().zip(row) {
                *m = if l > 0.0 { 255 } else { 0 };
            }
            Ok(())
        },
        |_, _| {},
    )?;
    let seconds = t.elapsed().as_secs_f64();
    // Blending alone, on the same plan with stand-in logits.
    let logits: Vec<f32> = (0..s * s).map(|i| (i % 97) as f32 - 48.0).collect();
    let mut bl = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let mut b = Blender::new(&plan);
        let mut sink = 0f32;
        for iy in 0..plan.ys.len() {
            for ix in 0..plan.xs.len() {
                b.add(ix, iy, &logits);
            }
            b.finish_row(iy, |_, row| {
                sink += row[0];
                Ok(())
            })?;
        }
        std::hint::black_box(sink);
        bl.push(t.elapsed().as_secs_f64() * 1e3 / plan.count() as f64);
    }
    let blend_ms_per_window = med(&mut bl);
    Ok(TileBench {
        preset: preset.into(),
        size: s,
        width: w,
        height: h,
        windows: stats.tiles,
        overlap,
        seconds,
        windows_per_s: stats.tiles as f64 / seconds,
        megapixels_per_min: (w * h) as f64 / 1e6 / seconds * 60.0,
        forward_ms,
        blend_ms_per_window,
        blend_overhead: blend_ms_per_window / forward_ms,
        pipeline_overhead: seconds * 1e3 / (stats.tiles as f64 * forward_ms) - 1.0,
    })
}

pub fn kernel_benches(gpu: &Gpu) -> anyhow::Result<Vec<BenchResult>> {
    use medfastsam::ops;
    let mut v = Vec::new();
    v.extend(ops::matmul::bench(gpu)?);
    v.extend(ops::attention::bench(gpu)?);
    v.extend(ops::conv::bench(gpu)?);
    v.extend(ops::norm::bench(gpu)?);
    v.extend(ops::resize::bench(gpu)?);
    v.extend(ops::otsu::bench(gpu)?);
    v.extend(ops::pe::bench(gpu)?);
    Ok(v)
}

pub fn run(gpu: &GpuArgs, a: &BenchArgs) -> anyhow::Result<i32> {
    let gpu = gpu.open()?;
    if let Some(arch) = &a.arch {
        let cfg = Config::preset(arch)?;
        if cfg.arch.is_med_fastsam() {
            anyhow::bail!("--arch {arch}: expected mobilesam or litemedsam");
        }
        let r = bench_sam(&gpu, &cfg, a.reps, a.precision.precision)?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&r)?);
        } else {
            println!(
                "{} {}²: image encoder {:.1} ms (pipeline compile + first run overhead {:.0} ms), mask decoder {:.1} ms per prompt, peak GPU memory {:.1} MiB ({} weights {:.1} MiB)",
                r.arch,
                r.size,
                r.encoder_ms,
                r.encoder_compile_ms,
                r.decoder_ms_per_prompt,
                r.peak_gpu_bytes as f64 / 1048576.0,
                r.precision,
                r.weight_bytes as f64 / 1048576.0
            );
        }
        return Ok(0);
    }
    if let Some(presets) = &a.tiles {
        let mut out = Vec::new();
        for p in presets {
            for &size in &a.sizes {
                let r = bench_tiles(&gpu, p, size, a.reps.min(3))?;
                if !a.json {
                    println!(
                        "tiles {} {}²: {}x{} in {} windows (overlap {}) in {:.1} s: {:.2} windows/s, {:.1} Mpx/min; \
                         {:.0} ms per window tiled vs {:.0} ms for a forward alone; \
                         blending {:.2} ms/window ({:.2} % of the forward)",
                        r.preset,
                        r.size,
                        r.width,
                        r.height,
                        r.windows,
                        r.overlap,
                        r.seconds,
                        r.windows_per_s,
                        r.megapixels_per_min,
                        r.seconds * 1e3 / r.windows as f64,
                        r.forward_ms,
                        r.blend_ms_per_window,
                        100.0 * r.blend_overhead
                    );
                }
                out.push(r);
            }
        }
        if a.json {
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        return Ok(0);
    }
    // The weights file (or none: random weights), its configuration, and the name for the table.
    let (file_weights, base, label) = match &a.weights {
        Some(p) => {
            let w = Weights::load(p)?;
            let cfg = w.resolve_config(None, 1024)?;
            if !cfg.arch.is_med_fastsam() {
                anyhow::bail!(
                    "{}: holds {} weights; bench --weights takes Med-FastSAM weights (use --arch for the prompted models)",
                    p.display(),
                    cfg.arch.name()
                );
            }
            (Some(w), cfg, p.display().to_string())
        }
        None => (None, Config::preset(&a.preset)?, a.preset.clone()),
    };
    let variant = Variant::parse(&a.variant)?;
    let mut report = Report {
        adapter: gpu.summary().to_string(),
        models: Vec::new(),
        train: Vec::new(),
        kernels: Vec::new(),
    };
    let model_sizes: &[usize] = if a.no_models { &[] } else { &a.sizes };
    for &s in model_sizes {
        let cfg = base.with_image_size(s)?;
        let m = bench_model(
            &gpu,
            &cfg,
            file_weights.as_ref(),
            variant,
            a.reps,
            a.profile,
            a.precision.precision,
        )?;
        if !a.json {
            println!(
                "{} {}² ({}): {:.1} ms/image (min {:.1}, {:.2} images/s), pipeline compile + first run overhead {:.0} ms, \
                 {} dispatches, {:.1} GFLOP in GEMMs, peak GPU memory {:.1} MiB ({} weights {:.1} MiB)",
                label,
                s,
                m.variant,
                m.median_ms,
                m.min_ms,
                m.images_per_s,
                m.compile_ms,
                m.dispatches,
                m.gemm_gflop,
                m.peak_gpu_bytes as f64 / 1048576.0,
                m.precision,
                m.weight_bytes as f64 / 1048576.0
            );
        }
        report.models.push(m);
    }
    if !a.no_train {
        for spec in &a.train {
            let p: Vec<&str> = spec.split(':').collect();
            if !(3..=4).contains(&p.len()) {
                anyhow::bail!("--train expects PRESET:SIZE:BATCH[:MODE], got {spec}");
            }
            let (size, batch) = (p[1].parse()?, p[2].parse()?);
            let mode = medfastsam::train::params::TrainMode::parse(p.get(3).unwrap_or(&"full"))?;
            if a.memory {
                memory_train(&gpu, p[0], size, batch, mode)?;
                continue;
            }
            let r = match bench_train(&gpu, p[0], size, batch, mode, a.reps.min(3), a.profile) {
                Ok(r) => r,
                Err(e) => TrainBench {
                    preset: p[0].into(),
                    size,
                    batch,
                    mode: mode.name(),
                    compile_ms: 0.0,
                    step_ms: f64::NAN,
                    images_per_s: 0.0,
                    peak_gpu_bytes: 0,
                    step_over_forward: None,
                    error: Some(format!("{e:#}")),
                },
            };
            if !a.json {
                match &r.error {
                    None => println!(
                        "train step {} {}² batch {} {}: {:.0} ms ({:.2} images/s; {:.2}x the forward of the same batch, \
                         i.e. backward + Adam {:.2}x), first step + compile overhead {:.0} ms, peak GPU memory {:.1} MiB",
                        r.preset,
                        r.size,
                        r.batch,
                        r.mode,
                        r.step_ms,
                        r.images_per_s,
                        r.step_over_forward.unwrap_or(f64::NAN),
                        r.step_over_forward.unwrap_or(f64::NAN) - 1.0,
                        r.compile_ms,
                        r.peak_gpu_bytes as f64 / 1048576.0
                    ),
                    Some(e) => println!(
                        "train step {} {}² batch {} {}: not run: {e}",
                        r.preset, r.size, r.batch, r.mode
                    ),
                }
            }
            report.train.push(r);
        }
    }
    if !a.no_kernels {
        report.kernels = kernel_benches(&gpu)?;
        if !a.json {
            for k in &report.kernels {
                println!("{k}");
            }
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(0)
}
