//! Bilinear resize (align_corners=False) vs the CPU f64 reference: down x4, up x4, odd arbitrary
//! sizes both ways, batch and channels, a grid past 65,535 workgroups; backward against finite
//! differences (reference) and GPU vs reference.

use medfastsam::ops::reference::resize as refr;
use medfastsam::ops::resize::{bilinear, bilinear_backward};
use medfastsam::testutil::{Rng, test_gpu, to_f64};
mod common;
use common::check;

/// Each output is a convex combination of 4 inputs with exact taps and f32-rounded weights, so
/// errors are a few 1e-7 of the tensor's scale.
const TOL: f64 = 1e-6;

fn forward(b: usize, h: usize, w: usize, c: usize, oh: usize, ow: usize, seed: u64) {
    let gpu = test_gpu();
    let x = Rng::new(seed).vec(b * h * w * c);
    let tx = gpu.upload(&x, &[b, h, w, c]).unwrap();
    let mut rec = gpu.new_recorder();
    let y = bilinear(&mut rec, &tx, oh, ow).unwrap();
    rec.submit().unwrap();
    assert_eq!(y.shape, vec![b, oh, ow, c]);
    let want = refr::bilinear(b, h, w, c, &to_f64(&x), oh, ow);
    check(
        &format!("bilinear [{b},{h},{w},{c}] -> {oh}x{ow}"),
        &gpu.read(&y).unwrap(),
        &want,
        TOL,
    );
}

#[test]
fn bilinear_down_up_and_arbitrary() {
    forward(1, 64, 48, 1, 16, 12, 1); // down x4
    forward(2, 20, 28, 3, 5, 7, 2); // down x4, batch 2, 3 channels
    forward(1, 16, 12, 1, 64, 48, 3); // up x4
    forward(2, 5, 7, 5, 20, 28, 4); // up x4, C = 5
    forward(1, 13, 9, 2, 29, 7, 5); // odd: up in H, down in W
    forward(2, 31, 17, 3, 11, 40, 6); // odd: down in H, up in W
    forward(1, 1, 1, 2, 3, 5, 7); // from a single pixel
    forward(1, 7, 5, 1, 1, 1, 8); // to a single pixel
    forward(1, 9, 9, 4, 9, 9, 9); // same size (identity)
    forward(1, 256, 256, 1, 767, 576, 10); // the model's arbitrary-size case
}

#[test]
fn bilinear_down_x4_is_mean_of_centre_pixels() {
    // With scale 4 the sample point is 4i + 1.5: the mean of pixels {4i+1, 4i+2}^2 (exactly).
    let gpu = test_gpu();
    let (h, w) = (16, 24);
    let x: Vec<f32> = (0..h * w).map(|i| ((i * 37) % 11) as f32 / 4.0).collect();
    let tx = gpu.upload(&x, &[1, h, w, 1]).unwrap();
    let mut rec = gpu.new_recorder();
    let y = bilinear(&mut rec, &tx, h / 4, w / 4).unwrap();
    rec.submit().unwrap();
    let got = gpu.read(&y).unwrap();
    for i in 0..h / 4 {
        for j in 0..w / 4 {
            let m: f32 = [(1, 1), (1, 2), (2, 1), (2, 2)]
                .iter()
                .map(|&(a, b)| x[(4 * i + a) * w + 4 * j + b])
                .sum::<f32>()
                / 4.0;
            assert_eq!(got[i * (w / 4) + j], m, "at ({i}, {j})");
        }
    }
}

#[test]
fn bilinear_grid_beyond_65535_workgroups() {
    // 4100 x 4100 outputs = 16.81 M invocations = 65,665 workgroups of 256.
    assert!((4100usize * 4100).div_ceil(256) > 65_535);
    forward(1, 256, 256, 1, 4100, 4100, 11);
}

#[test]
fn bilinear_reference_backward_matches_finite_differences() {
    let mut rng = Rng::new(20);
    for (b, h, w, c, oh, ow) in [(1, 4, 5, 2, 9, 3), (2, 6, 3, 1, 2, 7), (1, 3, 3, 1, 12, 12)] {
        let x = to_f64(&rng.vec(b * h * w * c));
        let r = to_f64(&rng.vec(b * oh * ow * c));
        let dx = refr::bilinear_backward(b, h, w, c, &r, oh, ow);
        let hstep = 1e-3;
        let mut x2 = x.clone();
        let mut worst: f64 = 0.0;
        let scale = dx.iter().fold(1e-12f64, |m, &a| m.max(a.abs()));
        for i in 0..x.len() {
            let loss = |v: &[f64]| -> f64 {
                refr::bilinear(b, h, w, c, v, oh, ow)
                    .iter()
                    .zip(&r)
                    .map(|(a, b)| a * b)
                    .sum()
            };
            x2[i] = x[i] + hstep;
            let lp = loss(&x2);
            x2[i] = x[i] - hstep;
            let lm = loss(&x2);
            x2[i] = x[i];
            worst = worst.max(((lp - lm) / (2.0 * hstep) - dx[i]).abs() / scale);
        }
        eprintln!(
            "bilinear dx [{b},{h},{w},{c}] -> {oh}x{ow}: finite-difference rel err {worst:.2e}"
        );
        assert!(worst < 1e-9);
    }
}

fn backward(b: usize, h: usize, w: usize, c: usize, oh: usize, ow: usize, seed: u64) {
    let gpu = test_gpu();
    let mut rng = Rng::new(seed);
    let dy = rng.vec(b * oh * ow * c);
    let dx0 = rng.vec(b * h * w * c);
    let tdy = gpu.upload(&dy, &[b, oh, ow, c]).unwrap();
    let tdx = gpu.upload(&dx0, &[b, h, w, c]).unwrap();
    let mut rec = gpu.new_recorder();
    bilinear_backward(&mut rec, &tdy, &tdx).unwrap();
    rec.submit().unwrap();
    let got = gpu.read(&tdx).unwrap();
    let g = refr::bilinear_backward(b, h, w, c, &to_f64(&dy), oh, ow);
    let what = format!("bilinear backward [{b},{h},{w},{c}] <- {oh}x{ow}");
    let diff: Vec<f32> = got.iter().zip(&dx0).map(|(a, b)| a - b).collect();
    // Relative to the gradient alone (an up x4 gradient sums up to 64 terms).
    check(&what, &diff, &g, 2e-6);
}

#[test]
fn bilinear_backward_awkward_shapes() {
    backward(1, 64, 48, 1, 16, 12, 30); // down x4
    backward(2, 20, 28, 3, 5, 7, 31);
    backward(1, 16, 12, 1, 64, 48, 32); // up x4
    backward(2, 5, 7, 5, 20, 28, 33);
    backward(1, 13, 9, 2, 29, 7, 34);
    backward(2, 31, 17, 3, 11, 40, 35);
    backward(1, 1, 1, 2, 3, 5, 36);
    backward(1, 7, 5, 1, 1, 1, 37);
    backward(1, 9, 9, 4, 9, 9, 38);
    backward(1, 3, 250, 1, 767, 7, 39); // strong up in H, strong down in W
    backward(1, 256, 256, 1, 1024, 1024, 40); // the model's logits upsampling
}
