//! The page's memory rule, proved natively: on a device created with WebGPU's default limits
//! (128 MiB per storage binding, 256 MiB per buffer; what `--webgpu-limits` asks for), the paper
//! preset at 256² trains (semi mode, batch 1; full mode, batch 2) with finite losses, while work
//! whose buffers cannot fit those limits (2048², batch 2) is refused with a message naming the limit, and a step
//! whose estimate exceeds a memory budget is refused before any buffer is allocated.
//! Measured on lavapipe (2 busy cores): a semi step at batch 1 in 23 s, a full step at batch 2 in
//! 30 s; the test's output (`--nocapture`) prints each.

use medfastsam::error::Error;
use medfastsam::gpu::{AdapterRequest, Gpu};
use medfastsam::io::RgbImage;
use medfastsam::model::{Config, Variant, Weights, memory};
use medfastsam::rng::Rng;
use medfastsam::train::params::TrainMode;
use medfastsam::train::trainer::{Example, TrainOptions, Trainer};
use std::time::Instant;

fn webgpu_gpu() -> Gpu {
    let req = AdapterRequest {
        webgpu_limits: true,
        ..AdapterRequest::default()
    }
    .with_env();
    let gpu = Gpu::new(&req).expect("a wgpu adapter (lavapipe on CI)");
    let l = &gpu.limits;
    assert_eq!(l.max_storage_buffer_binding_size, 128 << 20);
    assert_eq!(l.max_buffer_size, 256 << 20);
    gpu
}

fn examples(n: usize, s: usize) -> Vec<Example> {
    let mut rng = Rng::new(3);
    (0..n)
        .map(|i| Example {
            id: format!("{i}"),
            image: RgbImage {
                width: s,
                height: s,
                data: (0..s * s * 3).map(|_| rng.below(256) as u8).collect(),
            },
            mask: (0..s * s)
                .map(|p| ((p / s + p % s + i) % 9 < 4) as u8)
                .collect(),
        })
        .collect()
}

fn one_step(gpu: &Gpu, cfg: &Config, w: &Weights, mode: TrainMode, batch: usize) -> [f32; 3] {
    let opts = TrainOptions {
        batch,
        mode,
        lr: 1e-4,
        ..TrainOptions::default()
    };
    let mut t = Trainer::new(gpu, w, cfg, Variant::Paper, opts).unwrap();
    let t0 = Instant::now();
    let l = t.step(&[examples(batch, cfg.image_size)]).unwrap();
    let est = memory::train_step(cfg, batch);
    eprintln!(
        "paper preset at {0}x{0}, {1} mode, batch {batch}, WebGPU limits: loss {2:.4} in {3:.1} s; estimate {4} MiB device + {5} MiB host",
        cfg.image_size,
        mode.name(),
        l[0],
        t0.elapsed().as_secs_f64(),
        est.device >> 20,
        est.host >> 20
    );
    assert!(l.iter().all(|v| v.is_finite()), "loss {l:?}");
    gpu.take_errors().unwrap();
    l
}

// One test (one thread): it sets MEDFASTSAM_MAX_MEMORY for a moment, which every Trainer::new reads.
#[test]
fn paper_preset_at_256_trains_within_webgpu_limits_and_larger_work_is_refused() {
    let gpu = webgpu_gpu();
    let cfg = Config::paper().with_image_size(256).unwrap();

    // The estimator's rule (the page applies it with its budget): paper at 256², batch 1 needs
    // more than 64 MiB, so a 64 MiB budget refuses it, with the estimate and the limit, before
    // any buffer is allocated.
    let est = memory::train_step(&cfg, 1);
    assert!(est.device + est.host > 64 << 20, "{est:?}");
    // SAFETY: this is the binary's only test and nothing else runs while the variable is set.
    unsafe { std::env::set_var("MEDFASTSAM_MAX_MEMORY", "64M") };
    let opts = TrainOptions {
        batch: 1,
        mode: TrainMode::Semi,
        ..TrainOptions::default()
    };
    let r = Trainer::new(&gpu, &Weights::init(&cfg, 5), &cfg, Variant::Paper, opts);
    // SAFETY: as above.
    unsafe { std::env::remove_var("MEDFASTSAM_MAX_MEMORY") };
    let msg = r.err().expect("refused").to_string();
    assert!(
        msg.contains("not enough memory")
            && msg.contains("a training step at 256x256, batch 1")
            && msg.contains("MEDFASTSAM_MAX_MEMORY"),
        "{msg}"
    );
    eprintln!("64 MiB budget: {msg}");

    let w = Weights::init(&cfg, 5);
    one_step(&gpu, &cfg, &w, TrainMode::Semi, 1);
    one_step(&gpu, &cfg, &w, TrainMode::Full, 2);
    gpu.trim_pool();

    // At 2048², batch 2, the patch embedding's first convolution alone writes 2 x 1024² x 32
    // floats (256 MiB), over the 128 MiB binding limit: the step is refused with a message naming
    // the limit when it is recorded, before it runs on the device. (The memory guard would refuse
    // it first on most machines, by its 32 GiB estimate; a budget of 1 TiB lets the binding limit
    // be the one that speaks.)
    let big = Config::paper().with_image_size(2048).unwrap();
    let opts = TrainOptions {
        batch: 2,
        mode: TrainMode::Semi,
        ..TrainOptions::default()
    };
    let t0 = Instant::now();
    // SAFETY: as above.
    unsafe { std::env::set_var("MEDFASTSAM_MAX_MEMORY", "1024G") };
    let t = Trainer::new(&gpu, &w, &big, Variant::Paper, opts);
    // SAFETY: as above.
    unsafe { std::env::remove_var("MEDFASTSAM_MAX_MEMORY") };
    let err = t.unwrap().step(&[examples(2, 2048)]).unwrap_err();
    eprintln!(
        "2048², batch 2: refused in {:.1} s: {err}",
        t0.elapsed().as_secs_f64()
    );
    match &err {
        Error::Limit { limit_name, .. } => assert!(
            limit_name.contains("max_storage_buffer_binding_size")
                || limit_name.contains("max_buffer_size"),
            "{err}"
        ),
        e => panic!("expected a limit error, got {e}"),
    }
}
