//! Elementwise kernels vs CPU f64 references: activations and their backward, broadcast binary
//! ops, accumulate, concat/split, slices, column sums, input normalisation; grids past 65,535
//! workgroups.

use medfastsam::ops::elementwise::*;
use medfastsam::ops::{Act, reference};
use medfastsam::testutil::{Rng, assert_close, test_gpu, to_f64};

#[test]
fn activations_and_their_backward() {
    let gpu = test_gpu();
    let mut rng = Rng::new(1);
    // 10,007 elements run the scalar kernels, 10,008 the vec4 ones.
    for n in [10_007usize, 10_008] {
        let x: Vec<f32> = (0..n).map(|_| rng.range(-6.0, 6.0) as f32).collect();
        let dy = rng.vec(n);
        let tx = gpu.upload(&x, &[n]).unwrap();
        let tdy = gpu.upload(&dy, &[n]).unwrap();
        for act in [Act::None, Act::Gelu, Act::Relu, Act::Sigmoid] {
            let mut rec = gpu.new_recorder();
            let y = activation(&mut rec, &tx, act).unwrap();
            let g = act_backward(&mut rec, &tx, &tdy, act).unwrap();
            rec.submit().unwrap();
            let want: Vec<f64> = x.iter().map(|&v| reference::act(v as f64, act)).collect();
            assert_close(
                &format!("{act:?} n={n}"),
                &gpu.read(&y).unwrap(),
                &want,
                1e-6,
            );
            let want: Vec<f64> = x
                .iter()
                .zip(&dy)
                .map(|(&v, &d)| {
                    let v = v as f64;
                    d as f64
                        * match act {
                            Act::None => 1.0,
                            Act::Gelu => reference::gelu_grad(v),
                            Act::Relu => (v > 0.0) as u8 as f64,
                            Act::Sigmoid => {
                                let s = 1.0 / (1.0 + (-v).exp());
                                s * (1.0 - s)
                            }
                        }
                })
                .collect();
            assert_close(
                &format!("{act:?} backward n={n}"),
                &gpu.read(&g).unwrap(),
                &want,
                1e-6,
            );
        }
    }
    // GELU against the exact form at the extremes (absolute error).
    let xs: Vec<f32> = vec![
        -10.0, -5.0, -3.0, -1e-3, 0.0, 1e-3, 0.3, 0.70710677, 3.0, 10.0,
    ];
    let t = gpu.upload(&xs, &[xs.len()]).unwrap();
    let mut rec = gpu.new_recorder();
    let y = activation(&mut rec, &t, Act::Gelu).unwrap();
    rec.submit().unwrap();
    for (g, &x) in gpu.read(&y).unwrap().iter().zip(&xs) {
        let w = reference::gelu(x as f64);
        assert!(
            (*g as f64 - w).abs() <= 1e-7 + 1e-6 * w.abs(),
            "gelu({x}) = {g} vs {w}"
        );
    }
}

/// GELU and its derivative at every point of a fine grid over [-12, 12] (and around |x| = 0.5 *
/// sqrt(2), where an earlier form switched series): within 2e-6 of the f64 definition relative to
/// the value, plus 1e-9 absolute (GELU) or 1e-7 absolute for the derivative, which crosses zero
/// near x = -0.75 as the difference of two terms of about 0.23. (Measured on lavapipe: 2.4e-6
/// relative where |GELU| > 1e-6, in the negative tail, where the rounding of exp's f32 argument
/// dominates; below ~1e-15 the tail loses relative accuracy, 2e-16 absolute at x = -8.4; 1.9e-7
/// absolute for the derivative. The same as the former branching form.)
#[test]
fn gelu_and_gradient_pointwise_accuracy() {
    let gpu = test_gpu();
    let mut xs: Vec<f32> = (0..=24_000).map(|i| -12.0 + i as f32 * 1e-3).collect();
    xs.extend((-200..=200).map(|i| std::f32::consts::FRAC_1_SQRT_2 + i as f32 * 1e-6));
    xs.extend((-200..=200).map(|i| -std::f32::consts::FRAC_1_SQRT_2 + i as f32 * 1e-6));
    while !xs.len().is_multiple_of(4) {
        xs.push(0.25);
    }
    let n = xs.len();
    let t = gpu.upload(&xs, &[n]).unwrap();
    let ones = gpu.upload(&vec![1.0; n], &[n]).unwrap();
    let mut rec = gpu.new_recorder();
    let y = activation(&mut rec, &t, Act::Gelu).unwrap();
    let g = act_backward(&mut rec, &t, &ones, Act::Gelu).unwrap();
    rec.submit().unwrap();
    let (y, g) = (gpu.read(&y).unwrap(), gpu.read(&g).unwrap());
    let (mut worst_y, mut worst_g): (f64, f64) = (0.0, 0.0);
    for i in 0..n {
        let x = xs[i] as f64;
        let (wy, wg) = (reference::gelu(x), reference::gelu_grad(x));
        let (ey, eg) = ((y[i] as f64 - wy).abs(), (g[i] as f64 - wg).abs());
        assert!(ey <= 2e-6 * wy.abs() + 1e-9, "gelu({x}) = {} vs {wy}", y[i]);
        assert!(
            eg <= 2e-6 * wg.abs() + 1e-7,
            "gelu'({x}) = {} vs {wg}",
            g[i]
        );
        worst_y = worst_y.max(if wy.abs() > 1e-6 { ey / wy.abs() } else { 0.0 });
        worst_g = worst_g.max(eg);
    }
    eprintln!(
        "gelu over [-12, 12]: worst relative error {worst_y:.2e} (where |gelu| > 1e-6); gradient worst absolute error {worst_g:.2e}"
    );
}

#[test]
fn binary_broadcast_concat_split_slice() {
    let gpu = test_gpu();
    let mut rng = Rng::new(2);
    let (rows, c1, c2) = (37, 5, 3);
    let a = rng.vec(rows * c1);
    let b = rng.vec(rows * c2);
    let bias = rng.vec(c1);
    let ta = gpu.upload(&a, &[rows, c1]).unwrap();
    let tb = gpu.upload(&b, &[rows, c2]).unwrap();
    let tbias = gpu.upload(&bias, &[c1]).unwrap();
    let mut rec = gpu.new_recorder();
    let cat = concat_last(&mut rec, &ta, &tb).unwrap();
    let (sa, sb) = split_last(&mut rec, &cat, c1).unwrap();
    let sum = binary(&mut rec, &ta, &tbias, BinOp::Add).unwrap();
    let prod = binary(&mut rec, &ta, &tbias, BinOp::Mul).unwrap();
    let diff = binary(&mut rec, &ta, &ta, BinOp::Sub).unwrap();
    let sl = slice_mid(&mut rec, &ta, 1, rows, c1, 4, 9).unwrap();
    let back = rec.zeros(&[1, rows, c1]).unwrap();
    slice_mid_backward(&mut rec, &sl, &back, rows, 4).unwrap();
    rec.submit().unwrap();
    let mut want = Vec::new();
    for r in 0..rows {
        want.extend(a[r * c1..(r + 1) * c1].iter().map(|&v| v as f64));
        want.extend(b[r * c2..(r + 1) * c2].iter().map(|&v| v as f64));
    }
    assert_close("concat", &gpu.read(&cat).unwrap(), &want, 0.0);
    assert_close("split a", &gpu.read(&sa).unwrap(), &to_f64(&a), 0.0);
    assert_close("split b", &gpu.read(&sb).unwrap(), &to_f64(&b), 0.0);
    let w: Vec<f64> = a
        .iter()
        .enumerate()
        .map(|(i, &v)| v as f64 + bias[i % c1] as f64)
        .collect();
    assert_close("add broadcast", &gpu.read(&sum).unwrap(), &w, 1e-7);
    let w: Vec<f64> = a
        .iter()
        .enumerate()
        .map(|(i, &v)| v as f64 * bias[i % c1] as f64)
        .collect();
    assert_close("mul broadcast", &gpu.read(&prod).unwrap(), &w, 1e-7);
    assert!(gpu.read(&diff).unwrap().iter().all(|&v| v == 0.0));
    assert_close(
        "slice",
        &gpu.read(&sl).unwrap(),
        &to_f64(&a[4 * c1..13 * c1]),
        0.0,
    );
    let w: Vec<f64> = (0..rows * c1)
        .map(|i| {
            if (4 * c1..13 * c1).contains(&i) {
                a[i] as f64
            } else {
                0.0
            }
        })
        .collect();
    assert_close("slice backward", &gpu.read(&back).unwrap(), &w, 0.0);
}

#[test]
fn vec4_activations_and_binary_ops() {
    // Element counts that are multiples of 4 take the vec4 kernels: activations, full-size binary
    // ops (no broadcast modulo) and broadcasts of a vector whose length is a multiple of 4.
    let gpu = test_gpu();
    let mut rng = Rng::new(5);
    let (rows, c) = (1002, 12);
    let n = rows * c;
    let x: Vec<f32> = (0..n).map(|_| rng.range(-6.0, 6.0) as f32).collect();
    let y = rng.vec(n);
    let v = rng.vec(c);
    let v8 = rng.vec(8); // broadcast period 8 over rows of 12: b[i % 8]
    let (tx, ty) = (
        gpu.upload(&x, &[rows, c]).unwrap(),
        gpu.upload(&y, &[rows, c]).unwrap(),
    );
    let (tv, tv8) = (
        gpu.upload(&v, &[c]).unwrap(),
        gpu.upload(&v8, &[8]).unwrap(),
    );
    let mut rec = gpu.new_recorder();
    let acts: Vec<_> = [Act::None, Act::Gelu, Act::Relu]
        .iter()
        .map(|&a| (a, activation(&mut rec, &tx, a).unwrap()))
        .collect();
    let ops = [BinOp::Add, BinOp::Mul, BinOp::Sub];
    let full: Vec<_> = ops
        .iter()
        .map(|&op| binary(&mut rec, &tx, &ty, op).unwrap())
        .collect();
    let bc: Vec<_> = ops
        .iter()
        .map(|&op| binary(&mut rec, &tx, &tv, op).unwrap())
        .collect();
    let bc8 = binary(&mut rec, &tx, &tv8, BinOp::Add).unwrap();
    rec.submit().unwrap();
    for (act, t) in &acts {
        let want: Vec<f64> = x.iter().map(|&v| reference::act(v as f64, *act)).collect();
        assert_close(&format!("vec4 {act:?}"), &gpu.read(t).unwrap(), &want, 1e-6);
    }
    let f = |op: usize, a: f64, b: f64| [a + b, a * b, a - b][op];
    for (k, t) in full.iter().enumerate() {
        let want: Vec<f64> = (0..n).map(|i| f(k, x[i] as f64, y[i] as f64)).collect();
        assert_close(
            &format!("vec4 binary full {k}"),
            &gpu.read(t).unwrap(),
            &want,
            1e-7,
        );
    }
    for (k, t) in bc.iter().enumerate() {
        let want: Vec<f64> = (0..n).map(|i| f(k, x[i] as f64, v[i % c] as f64)).collect();
        assert_close(
            &format!("vec4 binary broadcast {k}"),
            &gpu.read(t).unwrap(),
            &want,
            1e-7,
        );
    }
    let want: Vec<f64> = (0..n).map(|i| x[i] as f64 + v8[i % 8] as f64).collect();
    assert_close(
        "vec4 binary broadcast period 8",
        &gpu.read(&bc8).unwrap(),
        &want,
        1e-7,
    );
    // Channel concat of [rows, 12] and [rows, 8] (vec4) and its split (scalar).
    let z = rng.vec(rows * 8);
    let tz = gpu.upload(&z, &[rows, 8]).unwrap();
    let mut rec = gpu.new_recorder();
    let cat = concat_last(&mut rec, &tx, &tz).unwrap();
    let (sa, sb) = split_last(&mut rec, &cat, c).unwrap();
    rec.submit().unwrap();
    assert_eq!(cat.shape, vec![rows, c + 8]);
    let mut want = Vec::new();
    for r in 0..rows {
        want.extend(x[r * c..(r + 1) * c].iter().map(|&v| v as f64));
        want.extend(z[r * 8..(r + 1) * 8].iter().map(|&v| v as f64));
    }
    assert_close("vec4 concat", &gpu.read(&cat).unwrap(), &want, 0.0);
    assert_close("split a", &gpu.read(&sa).unwrap(), &to_f64(&x), 0.0);
    assert_close("split b", &gpu.read(&sb).unwrap(), &to_f64(&z), 0.0);
}

#[test]
fn column_sums_are_exact_enough_and_accumulate() {
    let gpu = test_gpu();
    let mut rng = Rng::new(3);
    for &(rows, c) in &[
        (1usize, 1usize),
        (2048, 64),
        (65_537, 3),
        (300, 130),
        (5, 1000),
    ] {
        let x = rng.vec(rows * c);
        let init = rng.vec(c);
        let tx = gpu.upload(&x, &[rows, c]).unwrap();
        let out = gpu.upload(&init, &[c]).unwrap();
        let out2 = gpu.upload(&init, &[c]).unwrap();
        let mut rec = gpu.new_recorder();
        col_sum(&mut rec, &tx, c, &out, true).unwrap();
        col_sum(&mut rec, &tx, c, &out2, false).unwrap();
        rec.submit().unwrap();
        let mut want = vec![0f64; c];
        for r in 0..rows {
            for j in 0..c {
                want[j] += x[r * c + j] as f64;
            }
        }
        assert_close(
            &format!("col_sum {rows}x{c}"),
            &gpu.read(&out2).unwrap(),
            &want,
            1e-6,
        );
        let acc: Vec<f64> = want.iter().zip(&init).map(|(w, &i)| w + i as f64).collect();
        assert_close(
            &format!("col_sum += {rows}x{c}"),
            &gpu.read(&out).unwrap(),
            &acc,
            1e-6,
        );
    }
}

#[test]
fn accumulate_and_normalize_beyond_65535_groups() {
    let gpu = test_gpu();
    let mut rng = Rng::new(4);
    // Normalisation at 2048 x 2100 pixels; accumulate over 4096 x 4200 = 17.2 M elements ->
    // 67,200 workgroups of 256, past the 65,535 per-dimension limit.
    let (h, w) = (2048usize, 2100usize);
    let n = 4096 * 4200;
    let px: Vec<u32> = (0..h * w)
        .map(|_| rng.next_u64() as u32 & 0xFF_FFFF)
        .collect();
    let t = gpu.upload_u32(&px, &[1, h, w]).unwrap();
    let a = rng.vec(n);
    let acc = gpu.upload(&a, &[n]).unwrap();
    let one = gpu.upload(&vec![1.0; n], &[n]).unwrap();
    let mut rec = gpu.new_recorder();
    let y = image_normalize(&mut rec, &t).unwrap();
    accumulate(&mut rec, &acc, &one).unwrap();
    rec.submit().unwrap();
    let got = gpu.read(&y).unwrap();
    let mean = [123.675, 116.28, 103.53];
    let std = [58.395, 57.12, 57.375];
    let want: Vec<f64> = px
        .iter()
        .flat_map(|&p| (0..3).map(move |c| (((p >> (8 * c)) & 255) as f64 - mean[c]) / std[c]))
        .collect();
    assert_close("image_normalize", &got, &want, 1e-6);
    let want: Vec<f64> = a.iter().map(|&v| v as f64 + 1.0).collect();
    assert_close("accumulate", &gpu.read(&acc).unwrap(), &want, 1e-7);
}
