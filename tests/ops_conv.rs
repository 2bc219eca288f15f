//! Convolution kernels (dense via im2col + GEMM, depthwise, 2x2 transposed) vs the CPU f64
//! reference on awkward shapes, the chunked im2col path, a grid past 65,535 workgroups, and every
//! backward: the reference backward against central finite differences of the reference forward,
//! then the GPU backward (accumulating into pre-filled gradients) against the reference backward.

use medfastsam::gpu::Tensor;
use medfastsam::ops::Act;
mod common;
use common::check;
use medfastsam::ops::conv::{
    ConvGeom, ConvGrads, conv_transpose2x2, conv_transpose2x2_backward, conv2d, conv2d_backward,
    conv2d_backward_chunked, conv2d_chunked, depthwise_conv2d, depthwise_conv2d_backward,
    depthwise_conv2d_run,
};
use medfastsam::ops::reference::conv::{self as refc, ConvShape, ConvTShape};
use medfastsam::testutil::{Rng, rel_err, test_gpu, to_f64};

/// Forward tolerance: f32 accumulation over K = Ci*k*k <= 576 terms of size ~1 gives relative
/// errors of a few 1e-7 in practice; 1e-5 leaves margin (see the printed measurements).
const TOL: f64 = 1e-5;
/// Gradients reduce over up to ~40,000 output positions (dw, dbias) in f32: 2e-5.
const TOL_GRAD: f64 = 2e-5;

/// The shape of a conv from x `[b, h, w, ci]` to `co` channels with a k x k kernel.
fn shp(x: [usize; 4], co: usize, k: usize, stride: usize, pad: usize) -> ConvShape {
    let [b, h, w, ci] = x;
    ConvShape {
        b,
        h,
        w,
        ci,
        co,
        k,
        stride,
        pad,
    }
}

fn act_name(a: Act) -> &'static str {
    match a {
        Act::None => "none",
        Act::Gelu => "gelu",
        Act::Relu => "relu",
        Act::Sigmoid => "sigmoid",
    }
}

// ------------------------------------------------------------------------------------------------
// dense conv2d forward

fn dense_forward(s: ConvShape, bias: bool, act: Act, chunk: Option<usize>, seed: u64) {
    let gpu = test_gpu();
    let mut rng = Rng::new(seed);
    let x = rng.vec(s.b * s.h * s.w * s.ci);
    let w = rng.vec(s.co * s.ci * s.k * s.k);
    let bv = rng.vec(s.co);
    let tx = gpu.upload(&x, &[s.b, s.h, s.w, s.ci]).unwrap();
    let tw = gpu.upload(&w, &[s.co, s.ci, s.k, s.k]).unwrap();
    let tb = gpu.upload(&bv, &[s.co]).unwrap();
    let mut rec = gpu.new_recorder();
    let y = match chunk {
        None => conv2d(
            &mut rec,
            &tx,
            &tw,
            bias.then_some(&tb),
            ConvGeom {
                stride: s.stride,
                pad: s.pad,
            },
            act,
        ),
        Some(_) => conv2d_chunked(
            &mut rec,
            &tx,
            &tw,
            bias.then_some(&tb),
            ConvGeom {
                stride: s.stride,
                pad: s.pad,
            },
            act,
            chunk,
        ),
    }
    .unwrap();
    rec.submit().unwrap();
    assert_eq!(y.shape, vec![s.b, s.oh(), s.ow(), s.co]);
    let got = gpu.read(&y).unwrap();
    let b64 = to_f64(&bv);
    let want = refc::conv2d(&s, &to_f64(&x), &to_f64(&w), bias.then_some(&b64[..]), act);
    check(
        &format!(
            "conv2d {s:?} bias={bias} act={} chunk={chunk:?}",
            act_name(act)
        ),
        &got,
        &want,
        TOL,
    );
}

#[test]
fn conv2d_forward_awkward_shapes() {
    let cases = [
        shp([2, 7, 9, 3], 5, 3, 1, 1),
        shp([1, 9, 7, 3], 32, 3, 2, 1), // stem-like, odd sizes, stride 2
        shp([2, 11, 13, 6], 7, 3, 2, 1),
        shp([1, 8, 12, 3], 32, 4, 4, 0),   // patchify k4 s4
        shp([2, 10, 6, 5], 9, 2, 2, 0),    // patchify k2 s2
        shp([1, 5, 7, 1], 4, 2, 2, 0),     // k2 s2 on odd sizes drops the last row/col
        shp([2, 5, 7, 6], 5, 1, 1, 0),     // 1x1 = linear path
        shp([1, 9, 8, 6], 5, 1, 2, 0),     // 1x1 stride 2 = im2col path
        shp([1, 6, 9, 4], 3, 5, 1, 2),     // k5 p2
        shp([1, 10, 11, 2], 3, 3, 3, 0),   // k3 s3
        shp([1, 1, 1, 3], 2, 3, 1, 1),     // 1x1 image, 3x3 kernel
        shp([1, 17, 15, 20], 70, 3, 1, 1), // K = 180, Co = 70: several GEMM tiles each way
        shp([2, 4, 4, 3], 6, 3, 2, 2),     // pad larger than needed
        shp([2, 9, 11, 3], 8, 3, 2, 1),    // K = 27 padded to 28 (Co % 4 == 0), stem-like
        shp([1, 7, 6, 2], 4, 3, 1, 1),     // K = 18 padded to 20
        shp([1, 9, 9, 5], 12, 2, 2, 0),    // K = 20, no padding needed
        shp([2, 11, 9, 8], 12, 3, 2, 1),   // C % 4 == 0: vec4 im2col, (ky, kx, ci) weight copy
        shp([1, 10, 10, 12], 16, 2, 2, 0), // patchify on C % 4 == 0
        shp([1, 7, 8, 4], 6, 1, 2, 0),     // 1x1 stride 2, C % 4 == 0
        shp([1, 6, 7, 8], 5, 3, 1, 2),     // C % 4 == 0, Co % 4 != 0, pad 2
    ];
    let acts = [Act::None, Act::Gelu, Act::Relu];
    for (i, &s) in cases.iter().enumerate() {
        dense_forward(s, i % 2 == 0, acts[i % 3], None, 10 + i as u64);
    }
}

#[test]
fn conv2d_forward_chunked_path() {
    // Row chunks forced small: chunk sizes that divide M and that leave a remainder, with bias
    // and activation applied per chunk.
    let s = shp([2, 9, 11, 3], 7, 3, 2, 1); // M = 2*5*6 = 60
    for (i, chunk) in [1usize, 7, 16, 59, 60, 1000].into_iter().enumerate() {
        dense_forward(s, true, Act::Gelu, Some(chunk), 40 + i as u64);
    }
    dense_forward(
        shp([1, 12, 12, 32], 64, 3, 1, 1),
        false,
        Act::Relu,
        Some(50),
        47,
    );
    dense_forward(shp([1, 8, 8, 3], 32, 4, 4, 0), true, Act::None, Some(3), 48);
    dense_forward(shp([2, 9, 11, 3], 8, 3, 2, 1), true, Act::Gelu, Some(7), 49); // padded K
    dense_forward(
        shp([2, 9, 11, 8], 8, 3, 2, 1),
        true,
        Act::Relu,
        Some(13),
        50,
    ); // vec4 im2col
}

#[test]
fn conv2d_neck_like_long_reduction() {
    // K = 256*9 = 2304 as in the neck's 3x3 256->256 conv (forward and backward).
    let s = shp([1, 12, 10, 256], 20, 3, 1, 1);
    dense_forward(s, true, Act::None, None, 60);
    dense_backward(s, None, 63);
}

#[test]
fn conv2d_grid_beyond_65535_workgroups() {
    // x [1, 4100, 4100, 1], k3 s2 p1 -> 2050² positions. The backward's col2im runs one
    // invocation per dx element, 16.81 M = 65,665 workgroups (per chunk), and an unchunked GEMM
    // would have 65,665 row tiles. The column matrix (151 MB) exceeds a 128 MiB binding limit
    // (lavapipe's, WebGPU's default), so this also runs the automatic row-chunk split.
    let s = shp([1, 4100, 4100, 1], 2, 3, 2, 1);
    assert!((s.oh() * s.ow()).div_ceil(64) > 65_535 && (s.h * s.w).div_ceil(256) > 65_535);
    let lim = test_gpu().limits.max_storage_buffer_binding_size;
    eprintln!(
        "max_storage_buffer_binding_size = {lim}, column matrix = {} bytes",
        4 * s.oh() * s.ow() * 9
    );
    dense_forward(s, true, Act::None, None, 61);
    dense_backward(s, None, 62);
}

// ------------------------------------------------------------------------------------------------
// finite differences of the reference

/// Checks `analytic` = d/dv sum(r * f(v)) by central differences on every element of `v`.
#[track_caller]
fn fd_check(what: &str, v: &[f64], r: &[f64], f: impl Fn(&[f64]) -> Vec<f64>, analytic: &[f64]) {
    let h = 1e-3;
    let mut v2 = v.to_vec();
    let mut worst: f64 = 0.0;
    let scale = analytic.iter().fold(1e-12f64, |m, &a| m.max(a.abs()));
    for i in 0..v.len() {
        v2[i] = v[i] + h;
        let lp: f64 = f(&v2).iter().zip(r).map(|(a, b)| a * b).sum();
        v2[i] = v[i] - h;
        let lm: f64 = f(&v2).iter().zip(r).map(|(a, b)| a * b).sum();
        v2[i] = v[i];
        let num = (lp - lm) / (2.0 * h);
        worst = worst.max((num - analytic[i]).abs() / scale);
    }
    eprintln!("{what}: finite-difference rel err {worst:.2e}");
    assert!(
        worst < 1e-9,
        "{what}: finite differences disagree ({worst:.3e})"
    );
}

fn rvec(rng: &mut Rng, n: usize) -> Vec<f64> {
    to_f64(&rng.vec(n))
}

#[test]
fn conv2d_reference_backward_matches_finite_differences() {
    let mut rng = Rng::new(70);
    for s in [
        shp([2, 5, 4, 3], 2, 3, 2, 1),
        shp([1, 4, 5, 2], 3, 3, 1, 1),
        shp([1, 6, 5, 2], 2, 2, 2, 0),
    ] {
        let x = rvec(&mut rng, s.b * s.h * s.w * s.ci);
        let w = rvec(&mut rng, s.co * s.ci * s.k * s.k);
        let b = rvec(&mut rng, s.co);
        let r = rvec(&mut rng, s.b * s.oh() * s.ow() * s.co);
        let (dx, dw, db) = refc::conv2d_backward(&s, &x, &w, &r);
        fd_check(
            &format!("conv2d dx {s:?}"),
            &x,
            &r,
            |v| refc::conv2d(&s, v, &w, Some(&b), Act::None),
            &dx,
        );
        fd_check(
            &format!("conv2d dw {s:?}"),
            &w,
            &r,
            |v| refc::conv2d(&s, &x, v, Some(&b), Act::None),
            &dw,
        );
        fd_check(
            &format!("conv2d db {s:?}"),
            &b,
            &r,
            |v| refc::conv2d(&s, &x, &w, Some(v), Act::None),
            &db,
        );
    }
}

#[test]
fn depthwise_reference_backward_matches_finite_differences() {
    let mut rng = Rng::new(71);
    for s in [shp([2, 5, 4, 3], 3, 3, 2, 1), shp([1, 4, 5, 5], 5, 3, 1, 1)] {
        let x = rvec(&mut rng, s.b * s.h * s.w * s.ci);
        let w = rvec(&mut rng, s.ci * s.k * s.k);
        let b = rvec(&mut rng, s.ci);
        let r = rvec(&mut rng, s.b * s.oh() * s.ow() * s.ci);
        let (dx, dw, db) = refc::depthwise_conv2d_backward(&s, &x, &w, &r);
        let f =
            |x: &[f64], w: &[f64], b: &[f64]| refc::depthwise_conv2d(&s, x, w, Some(b), Act::None);
        fd_check(
            &format!("depthwise dx {s:?}"),
            &x,
            &r,
            |v| f(v, &w, &b),
            &dx,
        );
        fd_check(
            &format!("depthwise dw {s:?}"),
            &w,
            &r,
            |v| f(&x, v, &b),
            &dw,
        );
        fd_check(
            &format!("depthwise db {s:?}"),
            &b,
            &r,
            |v| f(&x, &w, v),
            &db,
        );
    }
}

#[test]
fn conv_transpose_reference_backward_matches_finite_differences() {
    let mut rng = Rng::new(72);
    let (b, h, w, ci, co) = (2, 3, 2, 3, 2);
    let x = rvec(&mut rng, b * h * w * ci);
    let wt = rvec(&mut rng, ci * co * 4);
    let bias = rvec(&mut rng, co);
    let r = rvec(&mut rng, b * 4 * h * w * co);
    let (dx, dw, db) =
        refc::conv_transpose2x2_backward(ConvTShape { b, h, w, ci, co }, &x, &wt, &r);
    let f = |x: &[f64], wt: &[f64], bs: &[f64]| {
        refc::conv_transpose2x2(ConvTShape { b, h, w, ci, co }, x, wt, Some(bs), Act::None)
    };
    fd_check("convT dx", &x, &r, |v| f(v, &wt, &bias), &dx);
    fd_check("convT dw", &wt, &r, |v| f(&x, v, &bias), &dw);
    fd_check("convT db", &bias, &r, |v| f(&x, &wt, v), &db);
}

// ------------------------------------------------------------------------------------------------
// GPU backward vs reference backward

/// Uploads `init` gradients, runs `record`, and returns what the gradients hold afterwards.
struct Grads {
    init: [Vec<f32>; 3],
    t: [Tensor; 3],
}

fn grads(rng: &mut Rng, shapes: [&[usize]; 3]) -> Grads {
    let gpu = test_gpu();
    let init = shapes.map(|s| rng.vec(s.iter().product()));
    let t = [0, 1, 2].map(|i| gpu.upload(&init[i], shapes[i]).unwrap());
    Grads { init, t }
}

impl Grads {
    /// Checks `t[i] == init[i] + want[i]` (accumulation).
    #[track_caller]
    fn check(&self, what: &str, want: [&[f64]; 3], tol: f64) {
        let gpu = test_gpu();
        for (i, name) in ["dx", "dw", "dbias"].iter().enumerate() {
            let got = gpu.read(&self.t[i]).unwrap();
            let full: Vec<f64> = want[i]
                .iter()
                .zip(&self.init[i])
                .map(|(w, &g0)| w + g0 as f64)
                .collect();
            check(&format!("{what} {name}"), &got, &full, tol);
            // Also relative to the gradient alone (the init is of similar size, so this is the
            // stricter measure for small gradients).
            let diff: Vec<f32> = got
                .iter()
                .zip(&self.init[i])
                .map(|(g, g0)| g - g0)
                .collect();
            let e = rel_err(&diff, want[i]);
            assert!(
                e <= 10.0 * tol,
                "{what} {name}: gradient-relative error {e:.3e}"
            );
        }
    }
}

fn dense_backward(s: ConvShape, chunk: Option<usize>, seed: u64) {
    let gpu = test_gpu();
    let mut rng = Rng::new(seed);
    let xs = [s.b, s.h, s.w, s.ci];
    let ws = [s.co, s.ci, s.k, s.k];
    let ys = [s.b, s.oh(), s.ow(), s.co];
    let x = rng.vec(xs.iter().product());
    let w = rng.vec(ws.iter().product());
    let dy = rng.vec(ys.iter().product());
    let (tx, tw, tdy) = (
        gpu.upload(&x, &xs).unwrap(),
        gpu.upload(&w, &ws).unwrap(),
        gpu.upload(&dy, &ys).unwrap(),
    );
    let g = grads(&mut rng, [&xs, &ws, &[s.co]]);
    let mut rec = gpu.new_recorder();
    conv2d_backward_chunked(
        &mut rec,
        &tx,
        &tw,
        &tdy,
        ConvGeom {
            stride: s.stride,
            pad: s.pad,
        },
        ConvGrads {
            dx: Some(&g.t[0]),
            dw: Some(&g.t[1]),
            dbias: Some(&g.t[2]),
        },
        chunk,
    )
    .unwrap();
    rec.submit().unwrap();
    let (dx, dw, db) = refc::conv2d_backward(&s, &to_f64(&x), &to_f64(&w), &to_f64(&dy));
    g.check(
        &format!("conv2d backward {s:?} chunk={chunk:?}"),
        [&dx, &dw, &db],
        TOL_GRAD,
    );
}

#[test]
fn conv2d_backward_awkward_shapes() {
    let cases = [
        shp([2, 7, 9, 3], 5, 3, 1, 1),
        shp([1, 9, 7, 3], 32, 3, 2, 1),
        shp([2, 11, 13, 6], 7, 3, 2, 1),
        shp([1, 8, 12, 3], 32, 4, 4, 0),
        shp([2, 10, 6, 5], 9, 2, 2, 0),
        shp([2, 5, 7, 6], 5, 1, 1, 0), // 1x1 (GEMM path)
        shp([1, 9, 8, 6], 5, 1, 2, 0), // 1x1 stride 2 (im2col path)
        shp([1, 6, 9, 4], 3, 5, 1, 2),
        shp([2, 16, 16, 3], 5, 3, 1, 1), // M = 512 -> split-K weight gradient
        shp([1, 17, 15, 20], 70, 3, 1, 1),
        shp([2, 4, 4, 3], 6, 3, 2, 2),
        // C % 4 == 0: (ky, kx, ci) columns (im2col4 / col2im4 / w_reorder back)
        shp([2, 11, 13, 8], 12, 3, 2, 1), // the patch embedding's second conv
        shp([1, 9, 8, 8], 5, 1, 2, 0),    // 1x1 stride 2
        shp([2, 8, 12, 4], 8, 4, 4, 0),   // patchify
        shp([1, 7, 6, 12], 5, 3, 2, 2),   // pad > stride: taps beyond the first output
    ];
    for (i, &s) in cases.iter().enumerate() {
        dense_backward(s, None, 80 + i as u64);
    }
    // Pointwise conv over many positions: split-K for dw on the GEMM path.
    dense_backward(shp([2, 40, 30, 7], 9, 1, 1, 0), None, 95);
}

#[test]
fn conv2d_backward_chunked_path() {
    let s = shp([2, 9, 11, 3], 7, 3, 2, 1); // M = 60
    for (i, chunk) in [1usize, 7, 16, 59].into_iter().enumerate() {
        dense_backward(s, Some(chunk), 100 + i as u64);
    }
    dense_backward(shp([1, 16, 16, 8], 6, 3, 1, 1), Some(100), 105); // chunks of 100 rows, split-K in each
    for (i, chunk) in [1usize, 13, 29].into_iter().enumerate() {
        dense_backward(shp([2, 9, 11, 8], 4, 3, 2, 1), Some(chunk), 106 + i as u64); // vec4 columns
    }
}

#[test]
fn conv2d_backward_partial_gradients() {
    // Only some gradients requested; the others must be left alone. Ci = 3: (ci, ky, kx) columns
    // with K padded for the weight gradient; Ci = 8: (ky, kx, ci) columns.
    let gpu = test_gpu();
    for ci in [3, 8] {
        let s = shp([1, 6, 7, ci], 4, 3, 2, 1);
        let mut rng = Rng::new(110);
        let x = rng.vec(s.b * s.h * s.w * s.ci);
        let w = rng.vec(s.co * s.ci * 9);
        let dy = rng.vec(s.b * s.oh() * s.ow() * s.co);
        let tx = gpu.upload(&x, &[s.b, s.h, s.w, s.ci]).unwrap();
        let tw = gpu.upload(&w, &[s.co, s.ci, 3, 3]).unwrap();
        let tdy = gpu.upload(&dy, &[s.b, s.oh(), s.ow(), s.co]).unwrap();
        let (dx, dw, _) = refc::conv2d_backward(&s, &to_f64(&x), &to_f64(&w), &to_f64(&dy));
        let zx = gpu.upload(&vec![0.0; x.len()], &tx.shape).unwrap();
        let zw = gpu.upload(&vec![0.0; w.len()], &tw.shape).unwrap();
        let mut rec = gpu.new_recorder();
        conv2d_backward(
            &mut rec,
            &tx,
            &tw,
            &tdy,
            ConvGeom { stride: 2, pad: 1 },
            ConvGrads {
                dx: Some(&zx),
                ..Default::default()
            },
        )
        .unwrap();
        conv2d_backward(
            &mut rec,
            &tx,
            &tw,
            &tdy,
            ConvGeom { stride: 2, pad: 1 },
            ConvGrads {
                dw: Some(&zw),
                ..Default::default()
            },
        )
        .unwrap();
        rec.submit().unwrap();
        check(
            &format!("conv2d backward dx only, Ci {ci}"),
            &gpu.read(&zx).unwrap(),
            &dx,
            TOL_GRAD,
        );
        check(
            &format!("conv2d backward dw only, Ci {ci}"),
            &gpu.read(&zw).unwrap(),
            &dw,
            TOL_GRAD,
        );
    }
}

// ------------------------------------------------------------------------------------------------
// depthwise

fn depthwise_forward(s: ConvShape, bias: bool, act: Act, seed: u64) {
    depthwise_forward_run(s, bias, act, None, seed)
}

/// `run`: output rows per invocation of the 3x3 sliding-window kernel (None = automatic).
fn depthwise_forward_run(s: ConvShape, bias: bool, act: Act, run: Option<usize>, seed: u64) {
    let gpu = test_gpu();
    let mut rng = Rng::new(seed);
    let x = rng.vec(s.b * s.h * s.w * s.ci);
    let w = rng.vec(s.ci * s.k * s.k);
    let bv = rng.vec(s.ci);
    let tx = gpu.upload(&x, &[s.b, s.h, s.w, s.ci]).unwrap();
    let tw = gpu.upload(&w, &[s.ci, 1, s.k, s.k]).unwrap();
    let tb = gpu.upload(&bv, &[s.ci]).unwrap();
    let mut rec = gpu.new_recorder();
    let y = match run {
        None => depthwise_conv2d(
            &mut rec,
            &tx,
            &tw,
            bias.then_some(&tb),
            ConvGeom {
                stride: s.stride,
                pad: s.pad,
            },
            act,
        ),
        Some(r) => depthwise_conv2d_run(
            &mut rec,
            &tx,
            &tw,
            bias.then_some(&tb),
            ConvGeom {
                stride: s.stride,
                pad: s.pad,
            },
            act,
            r,
        ),
    }
    .unwrap();
    rec.submit().unwrap();
    assert_eq!(y.shape, vec![s.b, s.oh(), s.ow(), s.ci]);
    let got = gpu.read(&y).unwrap();
    let b64 = to_f64(&bv);
    let want = refc::depthwise_conv2d(&s, &to_f64(&x), &to_f64(&w), bias.then_some(&b64[..]), act);
    check(
        &format!(
            "depthwise {s:?} bias={bias} act={} run={run:?}",
            act_name(act)
        ),
        &got,
        &want,
        TOL,
    );
}

#[test]
fn depthwise_forward_awkward_shapes() {
    let cases = [
        shp([2, 7, 9, 3], 3, 3, 1, 1),
        shp([1, 9, 7, 5], 5, 3, 2, 1),
        shp([2, 8, 8, 6], 6, 3, 2, 1),
        shp([1, 11, 10, 13], 13, 3, 1, 1),
        shp([1, 6, 5, 4], 4, 5, 1, 2),
        shp([1, 1, 1, 7], 7, 3, 1, 1),
        shp([2, 5, 6, 3], 3, 3, 1, 0),
        shp([2, 9, 7, 8], 8, 3, 2, 1), // C % 4 == 0: vectorised kernels
        shp([1, 6, 5, 12], 12, 3, 1, 1),
    ];
    let acts = [Act::None, Act::Gelu, Act::Relu];
    for (i, &s) in cases.iter().enumerate() {
        depthwise_forward(s, i % 2 == 1, acts[i % 3], 120 + i as u64);
    }
}

#[test]
fn depthwise3_sliding_window_shapes() {
    // The 3x3 kernel for C % 4 == 0 (strips of 4 columns, runs of output rows): widths that leave
    // partial strips, heights that leave partial runs, strides 1 and 2, padding 0, 1 and 2,
    // images smaller than a strip, several batch entries.
    let cases = [
        (shp([1, 9, 11, 4], 4, 3, 1, 1), None),
        (shp([2, 13, 6, 8], 8, 3, 1, 1), Some(1)),
        (shp([2, 13, 7, 8], 8, 3, 1, 1), Some(5)),
        (shp([1, 10, 9, 12], 12, 3, 2, 1), None),
        (shp([2, 11, 17, 4], 4, 3, 2, 1), Some(3)),
        (shp([1, 12, 12, 16], 16, 3, 2, 1), Some(1)),
        (shp([1, 8, 10, 4], 4, 3, 1, 0), Some(4)),
        (shp([2, 9, 8, 8], 8, 3, 2, 0), None),
        (shp([1, 7, 9, 4], 4, 3, 1, 2), Some(2)),
        (shp([1, 7, 6, 8], 8, 3, 2, 2), None),
        (shp([1, 1, 1, 4], 4, 3, 1, 1), None),
        (shp([1, 2, 3, 4], 4, 3, 2, 1), None),
        (shp([1, 37, 35, 20], 20, 3, 1, 1), None),
        (shp([1, 37, 35, 20], 20, 3, 2, 1), Some(100)),
    ];
    let acts = [Act::None, Act::Gelu, Act::Relu];
    for (i, &(s, run)) in cases.iter().enumerate() {
        depthwise_forward_run(s, i % 2 == 0, acts[i % 3], run, 200 + i as u64);
    }
}

#[test]
fn depthwise_grid_beyond_65535_workgroups() {
    // The model's MBConv depthwise: 256 channels at 256². The sliding-window kernel (8 invocations
    // per workgroup) with one output row per invocation: 256 * 64 strips * 64 channel quads / 8 =
    // 131,072 workgroups; then the automatic runs of rows.
    let s = shp([1, 256, 256, 256], 256, 3, 1, 1);
    assert!(s.oh() * s.ow().div_ceil(4) * (s.ci / 4) / 8 > 65_535);
    depthwise_forward_run(s, true, Act::Gelu, Some(1), 130);
    depthwise_forward(s, false, Act::None, 131);
    // The scalar kernel (C % 4 != 0): one invocation per output, 256 per workgroup.
    let s = shp([1, 256, 256, 257], 257, 3, 1, 1);
    assert!((s.oh() * s.ow() * s.ci).div_ceil(256) > 65_535);
    depthwise_forward(s, true, Act::Gelu, 132);
}

fn depthwise_backward(s: ConvShape, seed: u64) {
    let gpu = test_gpu();
    let mut rng = Rng::new(seed);
    let xs = [s.b, s.h, s.w, s.ci];
    let ws = [s.ci, 1, s.k, s.k];
    let ys = [s.b, s.oh(), s.ow(), s.ci];
    let x = rng.vec(xs.iter().product());
    let w = rng.vec(ws.iter().product());
    let dy = rng.vec(ys.iter().product());
    let (tx, tw, tdy) = (
        gpu.upload(&x, &xs).unwrap(),
        gpu.upload(&w, &ws).unwrap(),
        gpu.upload(&dy, &ys).unwrap(),
    );
    let g = grads(&mut rng, [&xs, &ws, &[s.ci]]);
    let mut rec = gpu.new_recorder();
    depthwise_conv2d_backward(
        &mut rec,
        &tx,
        &tw,
        &tdy,
        ConvGeom {
            stride: s.stride,
            pad: s.pad,
        },
        ConvGrads {
            dx: Some(&g.t[0]),
            dw: Some(&g.t[1]),
            dbias: Some(&g.t[2]),
        },
    )
    .unwrap();
    rec.submit().unwrap();
    let (dx, dw, db) = refc::depthwise_conv2d_backward(&s, &to_f64(&x), &to_f64(&w), &to_f64(&dy));
    g.check(
        &format!("depthwise backward {s:?}"),
        [&dx, &dw, &db],
        TOL_GRAD,
    );
}

#[test]
fn depthwise_backward_awkward_shapes() {
    for (i, s) in [
        shp([2, 7, 9, 3], 3, 3, 1, 1),
        shp([1, 9, 7, 5], 5, 3, 2, 1),
        shp([2, 8, 8, 6], 6, 3, 2, 1),
        shp([1, 6, 5, 4], 4, 5, 1, 2),
        shp([2, 5, 6, 3], 3, 3, 1, 0),
        shp([2, 45, 47, 10], 10, 3, 1, 1), // M = 4230 positions: multi-pass reductions
        shp([2, 9, 7, 8], 8, 3, 2, 1),     // C % 4 == 0: vectorised kernels
        shp([1, 45, 46, 12], 12, 3, 1, 1),
        // Stride 1, 3x3, C % 4 == 0: dx by the sliding-window kernel (rotated taps, padding
        // 2 - pad), for every padding it accepts, and runs of rows split over invocations.
        shp([2, 7, 9, 8], 8, 3, 1, 0),
        shp([1, 6, 11, 4], 4, 3, 1, 2),
        shp([1, 37, 5, 16], 16, 3, 1, 1),
    ]
    .into_iter()
    .enumerate()
    {
        depthwise_backward(s, 140 + i as u64);
    }
}

// ------------------------------------------------------------------------------------------------
// 2x2 stride-2 transposed conv

fn convt_case(s: ConvTShape, bias: bool, act: Act, seed: u64) {
    let ConvTShape { b, h, w, ci, co } = s;
    let gpu = test_gpu();
    let mut rng = Rng::new(seed);
    let xs = [b, h, w, ci];
    let ws = [ci, co, 2, 2];
    let ys = [b, 2 * h, 2 * w, co];
    let x = rng.vec(xs.iter().product());
    let wt = rng.vec(ws.iter().product());
    let bv = rng.vec(co);
    let dy = rng.vec(ys.iter().product());
    let (tx, tw, tb, tdy) = (
        gpu.upload(&x, &xs).unwrap(),
        gpu.upload(&wt, &ws).unwrap(),
        gpu.upload(&bv, &[co]).unwrap(),
        gpu.upload(&dy, &ys).unwrap(),
    );
    let g = grads(&mut rng, [&xs, &ws, &[co]]);
    let mut rec = gpu.new_recorder();
    let y = conv_transpose2x2(&mut rec, &tx, &tw, bias.then_some(&tb), act).unwrap();
    conv_transpose2x2_backward(
        &mut rec,
        &tx,
        &tw,
        &tdy,
        ConvGrads {
            dx: Some(&g.t[0]),
            dw: Some(&g.t[1]),
            dbias: Some(&g.t[2]),
        },
    )
    .unwrap();
    rec.submit().unwrap();
    assert_eq!(y.shape, ys.to_vec());
    let b64 = to_f64(&bv);
    let want = refc::conv_transpose2x2(
        ConvTShape { b, h, w, ci, co },
        &to_f64(&x),
        &to_f64(&wt),
        bias.then_some(&b64[..]),
        act,
    );
    let what = format!("convT2x2 x{xs:?} co={co} bias={bias} act={}", act_name(act));
    check(&what, &gpu.read(&y).unwrap(), &want, TOL);
    let (dx, dw, db) = refc::conv_transpose2x2_backward(
        ConvTShape { b, h, w, ci, co },
        &to_f64(&x),
        &to_f64(&wt),
        &to_f64(&dy),
    );
    g.check(&format!("{what} backward"), [&dx, &dw, &db], TOL_GRAD);
}

#[test]
fn conv_transpose2x2_awkward_shapes() {
    convt_case(
        ConvTShape {
            b: 2,
            h: 3,
            w: 5,
            ci: 3,
            co: 5,
        },
        true,
        Act::Gelu,
        150,
    );
    convt_case(
        ConvTShape {
            b: 1,
            h: 7,
            w: 6,
            ci: 13,
            co: 3,
        },
        false,
        Act::None,
        151,
    );
    convt_case(
        ConvTShape {
            b: 1,
            h: 1,
            w: 1,
            ci: 1,
            co: 1,
        },
        true,
        Act::Relu,
        152,
    );
    convt_case(
        ConvTShape {
            b: 2,
            h: 9,
            w: 7,
            ci: 70,
            co: 33,
        },
        true,
        Act::Gelu,
        153,
    ); // 4*Co = 132: three GEMM column tiles
    convt_case(
        ConvTShape {
            b: 1,
            h: 16,
            w: 16,
            ci: 24,
            co: 8,
        },
        true,
        Act::None,
        154,
    ); // M = 256: split-K dw
    // Co % 4 == 0: the vec4 pixel shuffle.
    convt_case(
        ConvTShape {
            b: 2,
            h: 5,
            w: 3,
            ci: 6,
            co: 4,
        },
        true,
        Act::Gelu,
        155,
    );
    convt_case(
        ConvTShape {
            b: 1,
            h: 3,
            w: 7,
            ci: 8,
            co: 12,
        },
        true,
        Act::Relu,
        156,
    );
    convt_case(
        ConvTShape {
            b: 2,
            h: 4,
            w: 4,
            ci: 16,
            co: 32,
        },
        false,
        Act::Gelu,
        157,
    );
}
