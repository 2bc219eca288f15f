//! LayerNorm and BatchNorm2d kernels vs the CPU f64 reference (and finite differences for the
//! backward passes) on the model's channel counts, awkward sizes and a grid past 65,535 workgroups.

use medfastsam::gpu::Gpu;
use medfastsam::ops::norm::*;
use medfastsam::ops::{reference, Act};
use medfastsam::testutil::{assert_close, rel_err, test_gpu, to_f64, Rng};

fn up(gpu: &Gpu, v: &[f32], shape: &[usize]) -> medfastsam::gpu::Tensor {
    gpu.upload(v, shape).unwrap()
}

/// Rows of x with a per-row offset and scale, so the two-pass variance is exercised.
fn ln_input(rng: &mut Rng, rows: usize, c: usize, offset: f64, scale: f64) -> Vec<f32> {
    let mut x = Vec::with_capacity(rows * c);
    for _ in 0..rows {
        let o = offset * rng.range(-1.0, 1.0);
        let s = scale * rng.range(0.2, 1.0);
        for _ in 0..c {
            x.push((o + s * rng.normal()) as f32);
        }
    }
    x
}

fn ln_fwd_case(rows: usize, c: usize, eps: f32, act: Act, offset: f64, scale: f64, tol: f64, seed: u64) -> f64 {
    let gpu = test_gpu();
    let mut rng = Rng::new(seed);
    let x = ln_input(&mut rng, rows, c, offset, scale);
    let w: Vec<f32> = (0..c).map(|_| rng.range(0.5, 1.5) as f32).collect();
    let b = rng.vec(c);
    let (tx, tw, tb) = (up(gpu, &x, &[rows, c]), up(gpu, &w, &[c]), up(gpu, &b, &[c]));
    let mut rec = gpu.new_recorder();
    let y = layer_norm(&mut rec, &tx, &tw, &tb, eps, act).unwrap();
    let (y2, saved) = layer_norm_train(&mut rec, &tx, &tw, &tb, eps, act).unwrap();
    rec.submit().unwrap();
    let got = gpu.read(&y).unwrap();
    let got2 = gpu.read(&y2).unwrap();
    let (want, pre, mean, rstd) =
        reference::norm::layer_norm_full(&to_f64(&x), &to_f64(&w), &to_f64(&b), c, eps as f64, act);
    let what = format!("layer_norm rows={rows} c={c} eps={eps} {act:?} offset={offset}");
    assert_close(&what, &got, &want, tol);
    assert_eq!(got, got2, "{what}: train forward differs from inference forward");
    assert_close(&format!("{what} mean"), &gpu.read(&saved.mean).unwrap(), &mean, tol);
    assert_close(&format!("{what} rstd"), &gpu.read(&saved.rstd).unwrap(), &rstd, tol);
    if let Some(p) = &saved.pre {
        assert_close(&format!("{what} pre"), &gpu.read(p).unwrap(), &pre, tol);
    }
    rel_err(&got, &want)
}

#[test]
fn layer_norm_model_channel_counts() {
    let mut seed = 1;
    let mut worst: f64 = 0.0;
    for &c in &[4usize, 16, 32, 64, 96, 128, 160, 256, 320, 2048] {
        for &rows in &[1usize, 7, 130] {
            for (eps, act) in [(1e-5, Act::None), (1e-6, Act::Gelu)] {
                worst = worst.max(ln_fwd_case(rows, c, eps, act, 1.0, 1.0, 2e-6, seed));
                seed += 1;
            }
        }
    }
    eprintln!("layer_norm model channel counts: worst rel err {worst:.2e}");
}

#[test]
fn layer_norm_awkward_channels() {
    let mut seed = 100;
    let mut worst: f64 = 0.0;
    for &c in &[1usize, 2, 3, 5, 7, 31, 33, 129, 257, 1000, 2051] {
        for act in [Act::None, Act::Relu] {
            worst = worst.max(ln_fwd_case(67, c, 1e-5, act, 1.0, 1.0, 2e-6, seed));
            seed += 1;
        }
    }
    eprintln!("layer_norm awkward channels: worst rel err {worst:.2e}");
}

#[test]
fn layer_norm_large_offset_small_variance() {
    // Rows with |mean| up to 30 and std down to 0.02: a one-pass E[x^2] - E[x]^2 would lose
    // everything; the two-pass form only sees the rounding of the mean.
    let mut worst: f64 = 0.0;
    for (i, &c) in [32usize, 96, 320].iter().enumerate() {
        worst = worst.max(ln_fwd_case(50, c, 1e-6, Act::None, 30.0, 0.1, 5e-5, 200 + i as u64));
    }
    eprintln!("layer_norm large offset: worst rel err {worst:.2e}");
}

#[test]
fn layer_norm_grid_beyond_65535_workgroups() {
    // C = 33 -> teams of 64, 4 rows per workgroup: 262,147 rows need 65,537 workgroups.
    let e = ln_fwd_case(262_147, 33, 1e-5, Act::Gelu, 1.0, 1.0, 2e-6, 300);
    eprintln!("layer_norm 262147x33: rel err {e:.2e}");
}
