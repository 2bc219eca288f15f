//! `medfastsam bench`: whole-model ms per image (median after warm-up, pipeline compilation timed
//! separately), kernel micro-benchmarks at the model's real shapes, peak GPU memory. `--json` for
//! machine-readable output.

use super::GpuArgs;
use clap::Args;
use medfastsam::gpu::Gpu;
use medfastsam::model::{Config, MedFastSam, Variant, Weights};
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
}

#[derive(Serialize)]
pub struct Report {
    pub adapter: String,
    pub models: Vec<ModelBench>,
    pub kernels: Vec<BenchResult>,
}

/// One forward of a batch of one image, waited for.
fn run_once(gpu: &Gpu, model: &MedFastSam, px: &medfastsam::gpu::Tensor) -> anyhow::Result<(f64, usize, f64)> {
    let t = Instant::now();
    let mut rec = gpu.new_recorder();
    let out = model.forward(&mut rec, px, false)?;
    let (d, f) = (rec.dispatches, rec.flops);
    rec.submit()?;
    // Read one value back so the timing includes the end of the work.
    let _ = gpu.read(&out.threshold)?;
    Ok((t.elapsed().as_secs_f64() * 1e3, d, f))
}

pub fn bench_model(gpu: &Gpu, cfg: &Config, variant: Variant, reps: usize, profile: bool) -> anyhow::Result<ModelBench> {
    let weights = Weights::init(cfg, 1);
    gpu.trim_pool();
    gpu.reset_peak();
    let model = MedFastSam::new(gpu, &weights, cfg, variant)?;
    let s = cfg.image_size;
    let mut rng = medfastsam::rng::Rng::new(7);
    let px: Vec<u32> = (0..s * s).map(|_| rng.next_u64() as u32 & 0xFF_FFFF).collect();
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
        let mut v: Vec<_> = prof.into_iter().collect();
        v.sort_by(|a, b| b.1 .1.partial_cmp(&a.1 .1).unwrap());
        eprintln!("profile at {s}² (each dispatch waited for; {total:.0} ms in all):");
        for (k, (n, ms)) in v {
            eprintln!("  {k:<28} {n:>4} calls {ms:>9.1} ms {:>5.1}%", 100.0 * ms / total);
        }
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
    let base = Config::preset(&a.preset)?;
    let variant = Variant::parse(&a.variant)?;
    let mut report = Report { adapter: gpu.summary().to_string(), models: Vec::new(), kernels: Vec::new() };
    for &s in &a.sizes {
        let cfg = base.with_image_size(s)?;
        let m = bench_model(&gpu, &cfg, variant, a.reps, a.profile)?;
        if !a.json {
            println!(
                "{} {}² ({}): {:.1} ms/image (min {:.1}, {:.2} images/s), pipeline compile + first run overhead {:.0} ms, \
                 {} dispatches, {:.1} GFLOP in GEMMs, peak GPU memory {:.1} MiB (weights {:.1} MiB)",
                a.preset,
                s,
                m.variant,
                m.median_ms,
                m.min_ms,
                m.images_per_s,
                m.compile_ms,
                m.dispatches,
                m.gemm_gflop,
                m.peak_gpu_bytes as f64 / 1048576.0,
                m.weight_bytes as f64 / 1048576.0
            );
        }
        report.models.push(m);
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
