//! GEMM with B stored as f16 (weights at `--precision f16`) vs the CPU f64 reference computed on
//! the same f16-rounded B: every kernel path (tiled, mm_v4, mm_v4s, mm_s, mm_sg where the adapter has
//! 8-wide subgroups, split-K), every transpose, odd element counts, batch strides and a shared B.
//! Widening is exact, so the error budget is the f32 kernels' own. Also: f16 anywhere but B is
//! refused with an error naming the kernel, and out-of-range values are refused at upload.

use medfastsam::gpu::DType;
use medfastsam::ops::matmul::{Gemm, GemmConfig, GemmIo, GemmPath, gemm_with, linear, plan};
use medfastsam::ops::{Act, reference};
use medfastsam::testutil::{Rng, assert_close, rel_err, test_gpu, to_f64};

fn f16_round(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect()
}

/// One GEMM with an f16 B against the reference on B rounded to f16; returns the error and the
/// kernel the plan chose.
fn run(g: Gemm, bias: bool, residual: bool, seed: u64, cfg: &GemmConfig) -> (f64, &'static str) {
    let gpu = test_gpu();
    let mut rng = Rng::new(seed);
    let last = |bs: usize, per: usize| {
        if bs == 0 {
            per
        } else {
            bs * (g.batch - 1) + per
        }
    };
    let (na, nb) = (last(g.a_bs, g.m * g.k), last(g.b_bs, g.k * g.n));
    let nc = last(g.c_bs, g.m * g.n);
    let a = rng.vec(na);
    let b = rng.vec(nb);
    let bi = rng.vec(g.n);
    let r = rng.vec(nc);
    let c0 = rng.vec(nc);
    let ta = gpu.upload(&a, &[na]).unwrap();
    let tb = gpu.upload_f16(&b, &[nb]).unwrap();
    assert_eq!(tb.dtype(), DType::F16);
    assert_eq!(tb.bytes(), (nb.div_ceil(2) * 4) as u64);
    let tbi = gpu.upload(&bi, &[g.n]).unwrap();
    let tr = gpu.upload(&r, &[nc]).unwrap();
    let tc = gpu.upload(&c0, &[nc]).unwrap();
    let mut rec = gpu.new_recorder();
    let io = GemmIo {
        a: &ta,
        b: &tb,
        bias: bias.then_some(&tbi),
        residual: residual.then_some(&tr),
        c: &tc,
    };
    gemm_with(&mut rec, &g, io, cfg).unwrap();
    rec.submit().unwrap();
    let got = gpu.read(&tc).unwrap();
    let mut want = to_f64(&c0);
    let (bi64, r64) = (to_f64(&bi), to_f64(&r));
    reference::gemm(
        &g,
        &to_f64(&a),
        &to_f64(&f16_round(&b)),
        bias.then_some(&bi64[..]),
        residual.then_some(&r64[..]),
        &mut want,
    );
    let p = plan(gpu, &g, cfg).unwrap();
    let what = format!("f16 B {g:?} bias={bias} res={residual} {cfg:?} -> {p:?}");
    assert_close(&what, &got, &want, if g.k >= 1000 { 1e-5 } else { 2e-6 });
    (rel_err(&got, &want), p.entry)
}

fn with_trans(m: usize, n: usize, k: usize, ta: bool, tb: bool) -> Gemm {
    let mut g = Gemm::new(m, n, k);
    g.trans_a = ta;
    g.trans_b = tb;
    g
}

fn cfg(path: GemmPath, vec4: Option<bool>, subgroup: Option<bool>) -> GemmConfig {
    GemmConfig {
        path,
        vec4,
        lanes_n: None,
        splits: None,
        subgroup,
        small: Some(false),
    }
}

#[test]
fn f16_b_every_kernel_and_transpose() {
    let gpu = test_gpu();
    let mut paths = vec![
        ("matmul", cfg(GemmPath::Tiled, None, None)),
        ("mm_v4", cfg(GemmPath::Blocked, Some(true), Some(false))),
        ("mm_s", cfg(GemmPath::Blocked, Some(false), Some(false))),
        (
            "mm_v4s",
            GemmConfig {
                small: Some(true),
                ..cfg(GemmPath::Blocked, Some(true), Some(false))
            },
        ),
    ];
    if gpu.subgroups_of_8() {
        paths.push(("mm_sg", cfg(GemmPath::Blocked, Some(true), Some(true))));
    } else {
        eprintln!("{}: no 8-wide subgroups, mm_sg not run", gpu.info.name);
    }
    let mut worst: f64 = 0.0;
    let mut seed = 1600;
    for (entry, c) in &paths {
        // 4-aligned shapes (every kernel takes them), partial tiles included.
        for (m, n, k) in [
            (4usize, 4usize, 4usize),
            (36, 68, 20),
            (132, 100, 68),
            (68, 260, 36),
        ] {
            for ta in [false, true] {
                for tb in [false, true] {
                    let g = with_trans(m, n, k, ta, tb);
                    let (e, got) = run(g, seed % 2 == 0, seed % 3 == 0, seed, c);
                    assert_eq!(got, *entry, "{g:?}");
                    worst = worst.max(e);
                    seed += 1;
                }
            }
        }
    }
    // Odd sizes: an odd number of B elements (the last word half used) on the scalar kernels.
    for c in [
        cfg(GemmPath::Tiled, None, None),
        cfg(GemmPath::Blocked, Some(false), Some(false)),
    ] {
        for tb in [false, true] {
            let g = with_trans(5, 7, 3, false, tb);
            worst = worst.max(run(g, true, false, seed, &c).0);
            let g = with_trans(33, 17, 45, true, tb);
            worst = worst.max(run(g, false, true, seed + 1, &c).0);
            seed += 2;
        }
    }
    eprintln!("f16 B: worst relative error {worst:.2e}");
}

#[test]
fn f16_b_epilogues_batches_and_split_k() {
    let gpu = test_gpu();
    let auto = GemmConfig::default();
    let mut seed = 1700;
    for act in [Act::Gelu, Act::Relu] {
        let mut g = with_trans(64, 96, 128, false, true);
        g.act = act;
        run(g, true, false, seed, &auto);
        g.accumulate = true;
        g.alpha = -0.75;
        run(g, true, true, seed + 1, &auto);
        seed += 2;
    }
    // Batched, with B's batch stride (even and odd) and with one B shared by every batch.
    for (b_bs, vec4) in [(16 * 68, Some(true)), (16 * 68 + 1, Some(false)), (0, None)] {
        let mut w = Gemm::new(20, 68, 16);
        w.batch = 3;
        w.a_bs = 20 * 16;
        w.b_bs = b_bs;
        w.c_bs = 20 * 68;
        let c = GemmConfig {
            path: GemmPath::Blocked,
            vec4,
            ..Default::default()
        };
        run(w, true, true, seed, &c);
        seed += 1;
    }
    // Split-K over a long K, on every split count, through the automatic kernel choice.
    let d = with_trans(24, 40, 4100, false, true);
    for splits in [1, 2, 7] {
        let c = GemmConfig {
            splits: Some(splits),
            ..Default::default()
        };
        run(d, true, false, seed, &c);
        seed += 1;
    }
    // What a linear layer at --precision f16 runs: x W^T with W [out, in] in f16.
    let mut rng = Rng::new(seed);
    let (rows, inp, out) = (50, 96, 40);
    let x = rng.vec(rows * inp);
    let w = rng.vec(out * inp);
    let b = rng.vec(out);
    let tx = gpu.upload(&x, &[rows, inp]).unwrap();
    let tw = gpu.upload_f16(&w, &[out, inp]).unwrap();
    let tb = gpu.upload(&b, &[out]).unwrap();
    let mut rec = gpu.new_recorder();
    let y = linear(&mut rec, &tx, &tw, Some(&tb), Act::Gelu, None).unwrap();
    rec.submit().unwrap();
    let got = gpu.read(&y).unwrap();
    let wr = f16_round(&w);
    let want: Vec<f64> = (0..rows * out)
        .map(|i| {
            let (r, o) = (i / out, i % out);
            let s: f64 = (0..inp)
                .map(|j| x[r * inp + j] as f64 * wr[o * inp + j] as f64)
                .sum::<f64>()
                + b[o] as f64;
            reference::gelu(s)
        })
        .collect();
    assert_close("linear with f16 W", &got, &want, 2e-6);
}

#[test]
fn f16_storage_is_read_back_exactly_and_refused_where_unsupported() {
    let gpu = test_gpu();
    // Exact widening: the values read back are the f16 roundings (odd count: half a word unused).
    let v = [1.0f32, -2.5, 0.1, 65504.0, -1e-7, 3.0e-5, 7.0];
    let t = gpu.upload_f16(&v, &[7]).unwrap();
    assert_eq!(gpu.read(&t).unwrap(), f16_round(&v));
    // A narrowed view of an even row keeps the element type.
    let m = gpu.upload_f16(&[0.5f32; 8 * 64], &[8, 64]).unwrap();
    let view = m.narrow(4, 4);
    assert_eq!(view.dtype(), DType::F16);
    assert_eq!(view.offset(), 4 * 64 * 2);
    // Out of f16's range: refused, naming the element.
    let e = gpu.upload_f16(&[1.0, 7.0e4], &[2]).unwrap_err().to_string();
    assert!(e.contains("element 1") && e.contains("65504"), "{e}");
    let e = gpu.upload_f16(&[1.0, 2.0], &[3]).unwrap_err().to_string();
    assert!(e.contains("2 values for shape [3]"), "{e}");
    // f16 as A (an activation) is refused by the kernel's binding check, naming the binding.
    let a16 = gpu.upload_f16(&[1.0; 16], &[4, 4]).unwrap();
    let b32 = gpu.upload(&[1.0; 16], &[4, 4]).unwrap();
    let c = gpu.empty(&[16]).unwrap();
    let mut rec = gpu.new_recorder();
    let io = GemmIo {
        a: &a16,
        b: &b32,
        bias: None,
        residual: None,
        c: &c,
    };
    let e = gemm_with(&mut rec, &Gemm::new(4, 4, 4), io, &GemmConfig::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("binding 1") && e.contains("F16"), "{e}");
    // Any other kernel given an f16 tensor refuses it too (here a dense convolution's weight).
    let x = gpu.upload(&[0.5; 2 * 4 * 4 * 4], &[2, 4, 4, 4]).unwrap();
    let w16 = gpu
        .upload_f16(&[0.1; 4 * 4 * 3 * 3], &[4, 4, 3, 3])
        .unwrap();
    let geom = medfastsam::ops::conv::ConvGeom { stride: 1, pad: 1 };
    let mut rec = gpu.new_recorder();
    let e = medfastsam::ops::conv::conv2d(&mut rec, &x, &w16, None, geom, Act::None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("F16"), "{e}");
}
