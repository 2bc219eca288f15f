//! GEMM kernels vs the CPU f64 reference: every kernel path (tiled, register-blocked with vec4 or
//! scalar loads, lanes along M or N, split-K + reduce), awkward shapes around the tile sizes, every
//! transpose and epilogue variant, broadcast weights, and grids past 65,535 workgroups. B stored as
//! f16 (`--precision f16` weights) on every kernel, against the reference on the same f16 values;
//! f16 anywhere but B is refused with an error naming the kernel, and out-of-range values are
//! refused at upload.

use medfastsam::gpu::DType;
use medfastsam::ops::matmul::{
    Gemm, GemmConfig, GemmIo, GemmPath, gemm_with, linear, linear_residual_act, plan, vec4_ok,
};
use medfastsam::ops::{Act, reference};
use medfastsam::testutil::{Rng, assert_close, rel_err, test_gpu, to_f64};

const TILED: GemmConfig = GemmConfig {
    path: GemmPath::Tiled,
    vec4: None,
    lanes_n: None,
    splits: None,
    subgroup: None,
    small: None,
};
const BLOCKED: GemmConfig = GemmConfig {
    path: GemmPath::Blocked,
    vec4: None,
    lanes_n: None,
    splits: None,
    subgroup: None,
    small: None,
};

/// The vec4 kernel the automatic choice takes without subgroups on this adapter: `mm_v4s` on
/// SwiftShader ([`medfastsam::gpu::Gpu::small_gemm_blocks`]), else `mm_v4`.
fn v4() -> &'static str {
    if test_gpu().small_gemm_blocks() {
        "mm_v4s"
    } else {
        "mm_v4"
    }
}

fn blocked(vec4: bool, lanes_n: bool) -> GemmConfig {
    GemmConfig {
        path: GemmPath::Blocked,
        vec4: Some(vec4),
        lanes_n: Some(lanes_n),
        splits: None,
        subgroup: Some(false),
        small: None,
    }
}

fn tol(g: &Gemm) -> f64 {
    if g.k >= 1000 { 1e-5 } else { 2e-6 }
}

/// Runs one GEMM with random data and compares it with the f64 reference; returns the error.
fn run_cfg(g: Gemm, bias: bool, residual: bool, seed: u64, cfg: &GemmConfig) -> f64 {
    run_padded(g, bias, residual, seed, cfg, 0)
}

/// [`run_cfg`] with every tensor `pad` elements longer than needed.
fn run_padded(g: Gemm, bias: bool, residual: bool, seed: u64, cfg: &GemmConfig, pad: usize) -> f64 {
    run_b(g, bias, residual, seed, cfg, pad, false)
}

/// [`run_padded`]; with `b_f16`, B is stored as f16 (`--precision f16` weights) and the reference
/// multiplies by the same f16-rounded values, so the error budget is the f32 kernels' own.
fn run_b(
    g: Gemm,
    bias: bool,
    residual: bool,
    seed: u64,
    cfg: &GemmConfig,
    pad: usize,
    b_f16: bool,
) -> f64 {
    let gpu = test_gpu();
    let mut rng = Rng::new(seed);
    let na = pad
        + if g.a_bs == 0 {
            g.m * g.k
        } else {
            g.a_bs * (g.batch - 1) + g.m * g.k
        };
    let nb = pad
        + if g.b_bs == 0 {
            g.k * g.n
        } else {
            g.b_bs * (g.batch - 1) + g.k * g.n
        };
    let nc = pad + g.c_bs * (g.batch - 1) + g.m * g.n;
    let a = rng.vec(na);
    let mut b = rng.vec(nb);
    let bi = rng.vec(g.n + pad);
    let r = rng.vec(nc);
    let c0 = rng.vec(nc);
    let ta = gpu.upload(&a, &[na]).unwrap();
    let tb = if b_f16 {
        let t = gpu.upload_f16(&b, &[nb]).unwrap();
        assert_eq!(t.dtype(), DType::F16);
        assert_eq!(t.bytes(), (nb.div_ceil(2) * 4) as u64);
        b = f16_round(&b);
        t
    } else {
        gpu.upload(&b, &[nb]).unwrap()
    };
    let tbi = gpu.upload(&bi, &[g.n + pad]).unwrap();
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
    let (bi64, r64) = (to_f64(&bi[..g.n]), to_f64(&r));
    reference::gemm(
        &g,
        &to_f64(&a),
        &to_f64(&b),
        bias.then_some(&bi64[..]),
        residual.then_some(&r64[..]),
        &mut want,
    );
    let p = plan(gpu, &g, cfg).unwrap();
    let what = format!("{g:?} bias={bias} res={residual} B f16={b_f16} {cfg:?} -> {p:?}");
    assert_close(&what, &got, &want, tol(&g));
    rel_err(&got, &want)
}

fn run_case(g: Gemm, bias: bool, residual: bool, seed: u64) {
    run_cfg(g, bias, residual, seed, &GemmConfig::default());
}

fn with_trans(m: usize, n: usize, k: usize, ta: bool, tb: bool) -> Gemm {
    let mut g = Gemm::new(m, n, k);
    g.trans_a = ta;
    g.trans_b = tb;
    g
}

#[test]
fn gemm_all_variants_awkward_shapes() {
    // Default path plus both kernel families, every transpose.
    // (1, 8, 12) and (5, 4, 8) take the vec4 kernel when A is not transposed (M = 1, odd M).
    let shapes = [
        (1, 1, 1),
        (7, 5, 3),
        (65, 63, 17),
        (130, 33, 129),
        (64, 64, 64),
        (3, 200, 70),
        (1, 37, 9),
        (29, 1, 11),
        (1, 8, 12),
        (5, 4, 8),
    ];
    let mut seed = 1;
    let mut worst: f64 = 0.0;
    for &(m, n, k) in &shapes {
        for ta in [false, true] {
            for tb in [false, true] {
                let g = with_trans(m, n, k, ta, tb);
                run_case(g, false, false, seed);
                worst = worst.max(run_cfg(g, false, false, seed + 1000, &TILED));
                worst = worst.max(run_cfg(g, false, false, seed + 2000, &BLOCKED));
                seed += 1;
            }
        }
    }
    eprintln!("awkward shapes: worst relative error {worst:.2e}");
}

#[test]
fn gemm_blocked_vec4_scalar_lanes_every_transpose() {
    // Shapes 4-aligned on every dimension (so vec4 loads are allowed in every transpose) and not on
    // the block sizes (vec4 kernel: 32 per invocation, 256 per workgroup; scalar: 16 and 128):
    // partial blocks, partial lane groups, single blocks, several workgroups both ways.
    let shapes = [
        (4, 4, 4),
        (132, 20, 36),
        (20, 260, 68),
        (32, 32, 32),
        (264, 36, 12),
        (36, 292, 8),
    ];
    let mut seed = 10;
    let mut worst: f64 = 0.0;
    for &(m, n, k) in &shapes {
        for ta in [false, true] {
            for tb in [false, true] {
                let g = with_trans(m, n, k, ta, tb);
                assert!(vec4_ok(&g));
                for vec4 in [true, false] {
                    for lanes_n in [false, true] {
                        worst = worst.max(run_cfg(g, false, false, seed, &blocked(vec4, lanes_n)));
                        seed += 1;
                    }
                }
            }
        }
    }
    // Tensors longer than needed by 1..3 elements: vec4 views of bindings whose size is not a
    // multiple of 16 bytes.
    for pad in 1..4 {
        let mut g = with_trans(36, 40, 20, false, true);
        g.batch = 2;
        g.a_bs = 36 * 20;
        g.c_bs = 36 * 40;
        worst = worst.max(run_padded(
            g,
            true,
            true,
            seed + pad as u64,
            &blocked(true, false),
            pad,
        ));
    }
    eprintln!("blocked kernels: worst relative error {worst:.2e}");
}

#[test]
fn gemm_vec4_k_tail_and_unaligned_operands() {
    // A^T B (the dW = dY^T X layout) reads vec4 along M and N, so K need not be a multiple of 4:
    // the K % 4 tail runs with scalar loads.
    let mut worst: f64 = 0.0;
    for (k, seed) in [(37usize, 30u64), (3, 31), (1, 32), (130, 33)] {
        let g = with_trans(20, 24, k, true, false);
        assert!(vec4_ok(&g));
        let want = if k % 4 == 0 && test_gpu().subgroups_of_8() {
            "mm_sg"
        } else {
            v4()
        };
        assert_eq!(plan(test_gpu(), &g, &BLOCKED).unwrap().entry, want);
        for lanes_n in [false, true] {
            worst = worst.max(run_cfg(g, true, false, seed, &blocked(true, lanes_n)));
        }
    }
    // Operands that are not 4-aligned take the scalar kernel automatically; forcing vec4 fails.
    for (g, why) in [
        (
            with_trans(12, 8, 6, false, true),
            "K % 4 != 0 with A not transposed",
        ),
        (
            with_trans(6, 8, 12, true, false),
            "M % 4 != 0 with A transposed",
        ),
        (
            with_trans(8, 6, 12, false, false),
            "N % 4 != 0 with B not transposed",
        ),
    ] {
        assert!(!vec4_ok(&g), "{why}");
        assert_eq!(
            plan(test_gpu(), &g, &BLOCKED).unwrap().entry,
            "mm_s",
            "{why}"
        );
        assert!(
            plan(test_gpu(), &g, &blocked(true, false)).is_err(),
            "{why}"
        );
        worst = worst.max(run_cfg(g, false, true, 40, &BLOCKED));
    }
    let mut g = with_trans(8, 8, 8, false, true);
    g.batch = 2;
    g.a_bs = 8 * 8 + 2; // unaligned batch stride of A
    g.c_bs = 64;
    assert!(!vec4_ok(&g));
    worst = worst.max(run_cfg(g, false, false, 41, &BLOCKED));
    g.a_bs = 64;
    g.c_bs = 64 + 2; // unaligned batch stride of C
    assert!(!vec4_ok(&g));
    worst = worst.max(run_cfg(g, false, true, 42, &BLOCKED));
    let g = with_trans(8, 6, 12, false, true); // N % 4 != 0: C rows not vec4-aligned
    assert!(!vec4_ok(&g));
    worst = worst.max(run_cfg(g, true, false, 43, &BLOCKED));
    eprintln!("k tail / unaligned: worst relative error {worst:.2e}");
}

/// `act(alpha * op(A) op(B) + bias + R) (+ C)` (the residual before the activation) vs the f64
/// reference: the GEMM part from `reference::gemm` without activation or accumulation, then the
/// activation and the accumulation applied here from their definitions.
fn run_act_after_residual(g: Gemm, seed: u64, cfg: &GemmConfig) -> f64 {
    assert!(g.act_after_residual);
    let gpu = test_gpu();
    let mut rng = Rng::new(seed);
    let (na, nb, nc) = (g.m * g.k, g.k * g.n, g.m * g.n);
    let (a, b, bi, r, c0) = (
        rng.vec(na),
        rng.vec(nb),
        rng.vec(g.n),
        rng.vec(nc),
        rng.vec(nc),
    );
    let up = |v: &[f32]| gpu.upload(v, &[v.len()]).unwrap();
    let (ta, tb, tbi, tr, tc) = (up(&a), up(&b), up(&bi), up(&r), up(&c0));
    let mut rec = gpu.new_recorder();
    let io = GemmIo {
        a: &ta,
        b: &tb,
        bias: Some(&tbi),
        residual: Some(&tr),
        c: &tc,
    };
    gemm_with(&mut rec, &g, io, cfg).unwrap();
    rec.submit().unwrap();
    let got = gpu.read(&tc).unwrap();
    let mut plain = g;
    plain.act = Act::None;
    plain.accumulate = false;
    plain.act_after_residual = false;
    let mut want = vec![0.0; nc];
    reference::gemm(
        &plain,
        &to_f64(&a),
        &to_f64(&b),
        Some(&to_f64(&bi)),
        Some(&to_f64(&r)),
        &mut want,
    );
    for (i, v) in want.iter_mut().enumerate() {
        *v = reference::act(*v, g.act) + if g.accumulate { c0[i] as f64 } else { 0.0 };
    }
    let p = plan(gpu, &g, cfg).unwrap();
    let what = format!("{g:?} act after residual {cfg:?} -> {p:?}");
    assert_close(&what, &got, &want, tol(&g));
    rel_err(&got, &want)
}

#[test]
fn gemm_epilogue_act_after_residual() {
    // Every kernel family and the split-K reduce, with and without accumulation and alpha.
    let mut worst: f64 = 0.0;
    let split = GemmConfig {
        splits: Some(3),
        ..BLOCKED
    };
    let split_tiled = GemmConfig {
        splits: Some(2),
        ..TILED
    };
    let cfgs = [
        GemmConfig::default(),
        TILED,
        blocked(true, false),
        blocked(true, true),
        blocked(false, false),
        split,
        split_tiled,
    ];
    let mut seed = 400;
    for (m, n, k) in [(36usize, 28usize, 44usize), (37, 29, 45), (70, 64, 256)] {
        for (act, accs) in [(Act::Gelu, &[false, true][..]), (Act::Relu, &[false][..])] {
            for &accumulate in accs {
                let mut g = Gemm::new(m, n, k);
                g.trans_b = true;
                g.act = act;
                g.act_after_residual = true;
                g.accumulate = accumulate;
                g.alpha = if accumulate { 0.75 } else { 1.0 };
                for cfg in &cfgs {
                    if cfg.vec4 == Some(true) && !vec4_ok(&g) {
                        continue;
                    }
                    worst = worst.max(run_act_after_residual(g, seed, cfg));
                    seed += 1;
                }
            }
        }
    }
    eprintln!("act after residual: worst relative error {worst:.2e}");
    // linear_residual_act: GELU(x W^T + b + R), the MBConv ending.
    let gpu = test_gpu();
    let mut rng = Rng::new(499);
    let (m, n, k) = (130, 64, 256);
    let (x, w, b, r) = (rng.vec(m * k), rng.vec(n * k), rng.vec(n), rng.vec(m * n));
    let mut rec = gpu.new_recorder();
    let y = linear_residual_act(
        &mut rec,
        &gpu.upload(&x, &[2, 65, k]).unwrap(),
        &gpu.upload(&w, &[n, k]).unwrap(),
        Some(&gpu.upload(&b, &[n]).unwrap()),
        &gpu.upload(&r, &[2, 65, n]).unwrap(),
        Act::Gelu,
    )
    .unwrap();
    rec.submit().unwrap();
    assert_eq!(y.shape, vec![2, 65, n]);
    let want: Vec<f64> = (0..m * n)
        .map(|i| {
            let (row, col) = (i / n, i % n);
            let s: f64 = (0..k)
                .map(|l| x[row * k + l] as f64 * w[col * k + l] as f64)
                .sum();
            reference::act(s + b[col] as f64 + r[i] as f64, Act::Gelu)
        })
        .collect();
    assert_close("linear_residual_act", &gpu.read(&y).unwrap(), &want, 2e-6);
}

#[test]
fn gemm_epilogues() {
    let mut worst: f64 = 0.0;
    for (i, act) in [Act::None, Act::Gelu, Act::Relu].into_iter().enumerate() {
        let seed = 100 + 10 * i as u64;
        // Default path (as before).
        let mut g = Gemm::new(37, 29, 45);
        g.trans_b = true;
        g.act = act;
        run_case(g, true, false, seed);
        run_case(g, true, true, seed + 1);
        let mut ga = g;
        ga.accumulate = true;
        ga.alpha = 0.5;
        run_case(ga, false, false, seed + 2);
    }
    // Every kernel family (each has its own store path): bias + residual + accumulate + alpha with
    // GELU, and bias alone with ReLU (identity is covered by the other tests).
    let mut g4 = Gemm::new(36, 28, 44); // vec4-able
    g4.trans_b = true;
    g4.act = Act::Relu;
    let mut gall = g4;
    gall.act = Act::Gelu;
    gall.accumulate = true;
    gall.alpha = -1.5;
    let split = GemmConfig {
        splits: Some(3),
        ..BLOCKED
    };
    let split_tiled = GemmConfig {
        splits: Some(2),
        ..TILED
    };
    for (i, cfg) in [
        TILED,
        blocked(true, false),
        blocked(false, true),
        split,
        split_tiled,
    ]
    .iter()
    .enumerate()
    {
        worst = worst.max(run_cfg(gall, true, true, 140 + i as u64, cfg));
        worst = worst.max(run_cfg(g4, true, false, 150 + i as u64, cfg));
    }
    eprintln!("epilogues: worst relative error {worst:.2e}");
}

#[test]
fn gemm_batched_and_broadcast() {
    let mut g = Gemm::new(19, 23, 31);
    g.batch = 5;
    g.a_bs = 19 * 31;
    g.b_bs = 0; // shared weight
    g.c_bs = 19 * 23;
    g.trans_b = true;
    run_case(g, true, false, 7);
    g.b_bs = 23 * 31;
    g.trans_a = true;
    run_case(g, false, true, 8);
    // Broadcast weights: the per-image mask head (N = 1: C cannot be stored as vec4, so the scalar
    // kernel) and the same with N = 8 through the vec4 kernel; plus batched weights.
    let mut worst: f64 = 0.0;
    let mut h = Gemm::new(36, 1, 32);
    h.batch = 3;
    h.a_bs = 36 * 32;
    h.c_bs = 36;
    h.trans_b = true;
    assert!(!vec4_ok(&h));
    assert_eq!(plan(test_gpu(), &h, &BLOCKED).unwrap().entry, "mm_s");
    for cfg in [
        BLOCKED,
        TILED,
        GemmConfig {
            splits: Some(2),
            ..BLOCKED
        },
    ] {
        worst = worst.max(run_cfg(h, true, false, 9, &cfg));
    }
    let mut h8 = h;
    h8.n = 8;
    h8.c_bs = 36 * 8;
    assert!(vec4_ok(&h8));
    for cfg in [
        blocked(true, false),
        blocked(true, true),
        GemmConfig {
            splits: Some(2),
            ..blocked(true, false)
        },
    ] {
        worst = worst.max(run_cfg(h8, true, false, 9, &cfg));
    }
    let mut w = Gemm::new(20, 12, 16);
    w.batch = 4;
    w.a_bs = 16 * 20 + 4; // padded, still aligned
    w.b_bs = 16 * 12;
    w.c_bs = 20 * 12 + 8;
    w.trans_a = true;
    assert!(vec4_ok(&w));
    for cfg in [
        blocked(true, false),
        blocked(true, true),
        GemmConfig {
            splits: Some(2),
            ..blocked(true, false)
        },
    ] {
        worst = worst.max(run_cfg(w, false, true, 10, &cfg));
    }
    eprintln!("batched: worst relative error {worst:.2e}");
}

#[test]
fn gemm_split_k() {
    // Few output tiles over a long K: the automatic plan slices K; every slice count and path agrees
    // with the reference, also when K is not a multiple of the slice depth.
    let gpu = test_gpu();
    let g = with_trans(24, 40, 4100, true, false); // dW = dY^T X layout
    let p = plan(gpu, &g, &BLOCKED).unwrap();
    assert!(p.splits > 1, "{p:?}");
    let mut worst: f64 = 0.0;
    worst = worst.max(run_cfg(g, true, false, 50, &BLOCKED));
    for splits in [1, 2, 7] {
        worst = worst.max(run_cfg(
            g,
            false,
            false,
            51,
            &GemmConfig {
                splits: Some(splits),
                ..BLOCKED
            },
        ));
        worst = worst.max(run_cfg(
            g,
            false,
            false,
            52,
            &GemmConfig {
                splits: Some(splits),
                ..TILED
            },
        ));
    }
    let t = with_trans(24, 40, 4101, true, false); // vec4 kernel, K % 4 tail in the last slice
    assert_eq!(plan(gpu, &t, &BLOCKED).unwrap().entry, v4());
    worst = worst.max(run_cfg(
        t,
        true,
        false,
        54,
        &GemmConfig {
            splits: Some(3),
            ..BLOCKED
        },
    ));
    let mut h = with_trans(13, 9, 1999, false, true); // scalar kernel, K % 4 != 0
    h.accumulate = true;
    worst = worst.max(run_cfg(
        h,
        false,
        false,
        53,
        &GemmConfig {
            splits: Some(5),
            ..BLOCKED
        },
    ));
    eprintln!("split-K: worst relative error {worst:.2e}");
}

#[test]
fn gemm_grid_beyond_65535_workgroups() {
    // 70,000 batch entries of one tile each: the flat (tile, batch) grid needs splitting.
    let mut g = Gemm::new(3, 2, 4);
    g.batch = 70_000;
    g.a_bs = 12;
    g.b_bs = 8;
    g.c_bs = 6;
    run_case(g, false, false, 9);
    run_cfg(g, false, false, 10, &TILED);
    // The same through the vec4 kernel, lanes along N, and through split-K (70,000 x 2 slices).
    let mut h = Gemm::new(4, 4, 4);
    h.batch = 70_000;
    h.a_bs = 16;
    h.b_bs = 16;
    h.c_bs = 16;
    h.trans_b = true;
    run_cfg(h, false, false, 11, &blocked(true, true));
    run_cfg(
        h,
        false,
        false,
        12,
        &GemmConfig {
            splits: Some(2),
            ..BLOCKED
        },
    );
}

#[test]
fn linear_matches_reference() {
    let gpu = test_gpu();
    let mut rng = Rng::new(77);
    let (rows, k, n) = (2 * 7, 12, 20);
    let x = rng.vec(rows * k);
    let w = rng.vec(n * k);
    let bias = rng.vec(n);
    let tx = gpu.upload(&x, &[2, 7, k]).unwrap();
    let tw = gpu.upload(&w, &[n, k]).unwrap();
    let tbias = gpu.upload(&bias, &[n]).unwrap();
    let mut rec = gpu.new_recorder();
    let y = linear(&mut rec, &tx, &tw, Some(&tbias), Act::Gelu, None).unwrap();
    rec.submit().unwrap();
    assert_eq!(y.shape, vec![2, 7, n]);
    let got = gpu.read(&y).unwrap();
    let mut g = Gemm::new(rows, n, k);
    g.trans_b = true;
    g.act = Act::Gelu;
    let mut want = vec![0.0; rows * n];
    reference::gemm(
        &g,
        &to_f64(&x),
        &to_f64(&w),
        Some(&to_f64(&bias)),
        None,
        &mut want,
    );
    assert_close("linear", &got, &want, 2e-6);
}

#[test]
fn gemm_plan_for_model_shapes() {
    // The blocked kernel choice at the model's shapes (independent of the adapter).
    let gpu = test_gpu();
    let lin = |m, n, k| with_trans(m, n, k, false, true);
    // Without the subgroup kernel (adapters without 8-wide subgroups).
    let no_sg = GemmConfig {
        subgroup: Some(false),
        ..BLOCKED
    };
    let p = plan(gpu, &lin(1024, 1024, 1024), &no_sg).unwrap();
    assert_eq!((p.entry, p.lanes_n, p.splits), (v4(), false, 1));
    // The block size asked for explicitly, whatever the adapter's default.
    for (small, want) in [(true, "mm_v4s"), (false, "mm_v4")] {
        let c = GemmConfig {
            small: Some(small),
            ..no_sg
        };
        assert_eq!(plan(gpu, &lin(1024, 1024, 1024), &c).unwrap().entry, want);
    }
    // A small block never applies to the scalar kernel (unaligned operands).
    let c = GemmConfig {
        small: Some(true),
        ..no_sg
    };
    assert_eq!(plan(gpu, &lin(33, 30, 27), &c).unwrap().entry, "mm_s");
    // With it (lavapipe/llvmpipe on AVX2): every 4-aligned GEMM with K % 4 == 0 wider and taller
    // than one mm_v4 block; narrow ones (the 1-row decoder tokens, N = 32) keep mm_v4/mm_s.
    let want = if gpu.subgroups_of_8() { "mm_sg" } else { v4() };
    for g in [
        lin(1024, 1024, 1024),
        lin(65536, 64, 256),
        with_trans(4096, 320, 1280, false, false),
        with_trans(128, 512, 65536, true, false),
    ] {
        assert_eq!(plan(gpu, &g, &BLOCKED).unwrap().entry, want, "{g:?}");
    }
    assert_eq!(plan(gpu, &lin(5, 2048, 256), &BLOCKED).unwrap().entry, v4());
    assert_eq!(
        plan(gpu, &lin(4096, 32, 256), &BLOCKED).unwrap().entry,
        v4()
    );
    assert_eq!(
        plan(gpu, &lin(262144, 32, 27), &BLOCKED).unwrap().entry,
        "mm_s"
    );
    assert!(plan(gpu, &lin(5, 2048, 256), &BLOCKED).unwrap().lanes_n);
    let head = plan(gpu, &lin(65536, 1, 32), &BLOCKED).unwrap();
    assert_eq!((head.entry, head.lanes_n), ("mm_s", false));
    let dw = plan(gpu, &with_trans(128, 512, 65536, true, false), &no_sg).unwrap();
    assert_eq!(dw.entry, v4());
    let dx = plan(gpu, &with_trans(4096, 320, 1280, false, false), &no_sg).unwrap();
    assert_eq!((dx.entry, dx.splits), (v4(), 1));
    assert_eq!(
        plan(gpu, &lin(1024, 1024, 1024), &TILED).unwrap().entry,
        "matmul"
    );
}

/// The activation-backward epilogue `alpha * op(A) op(B) * act'(R) (+ C)` and the saved
/// pre-activation `alpha * op(A) op(B) + bias` (with `act(..)` in C) vs the f64 reference, on every
/// kernel family and the split-K reduce.
#[test]
fn gemm_epilogue_act_grad_and_save_pre() {
    use medfastsam::ops::matmul::gemm_save_pre;
    use medfastsam::ops::reference::norm::act_grad;
    let gpu = test_gpu();
    let split = GemmConfig {
        splits: Some(3),
        ..BLOCKED
    };
    let split_tiled = GemmConfig {
        splits: Some(2),
        ..TILED
    };
    let cfgs = [
        GemmConfig::default(),
        TILED,
        blocked(true, false),
        blocked(true, true),
        blocked(false, false),
        split,
        split_tiled,
    ];
    let (mut worst_grad, mut worst_pre): (f64, f64) = (0.0, 0.0);
    let mut seed = 700;
    for (m, n, k, ta) in [
        (36usize, 28usize, 44usize, false),
        (37, 29, 45, false),
        (70, 64, 256, true),
    ] {
        for act in [Act::Gelu, Act::Relu] {
            for accumulate in [false, true] {
                let mut g = Gemm::new(m, n, k);
                g.trans_a = ta;
                g.act = act;
                g.alpha = if accumulate { 0.75 } else { 1.0 };
                // Every kernel family with GELU (each variant is a pipeline to compile); ReLU on the
                // default choice only.
                let cfgs = if act == Act::Gelu {
                    &cfgs[..]
                } else {
                    &cfgs[..1]
                };
                for cfg in cfgs {
                    if cfg.vec4 == Some(true) && !vec4_ok(&g) {
                        continue;
                    }
                    seed += 1;
                    let mut rng = Rng::new(seed);
                    let (a, b, bi, r, c0) = (
                        rng.vec(m * k),
                        rng.vec(k * n),
                        rng.vec(n),
                        rng.vec(m * n),
                        rng.vec(m * n),
                    );
                    let up = |v: &[f32]| gpu.upload(v, &[v.len()]).unwrap();
                    let (ta_, tb, tbi, tr, tc, tp) =
                        (up(&a), up(&b), up(&bi), up(&r), up(&c0), up(&c0));
                    let mut plain = g;
                    plain.act = Act::None;
                    let mut ab = vec![0.0; m * n];
                    reference::gemm(&plain, &to_f64(&a), &to_f64(&b), None, None, &mut ab);
                    let what = format!(
                        "{g:?} accumulate={accumulate} {cfg:?} -> {:?}",
                        plan(gpu, &g, cfg).unwrap()
                    );
                    // act_grad: C (+)= alpha A B * act'(R)
                    let mut gg = g;
                    gg.act_grad = true;
                    gg.accumulate = accumulate;
                    let mut rec = gpu.new_recorder();
                    let io = GemmIo {
                        a: &ta_,
                        b: &tb,
                        bias: None,
                        residual: Some(&tr),
                        c: &tc,
                    };
                    gemm_with(&mut rec, &gg, io, cfg).unwrap();
                    rec.submit().unwrap();
                    let want: Vec<f64> = (0..m * n)
                        .map(|i| {
                            ab[i] * act_grad(r[i] as f64, act)
                                + if accumulate { c0[i] as f64 } else { 0.0 }
                        })
                        .collect();
                    let got = gpu.read(&tc).unwrap();
                    assert_close(&format!("act_grad {what}"), &got, &want, tol(&g));
                    worst_grad = worst_grad.max(rel_err(&got, &want));
                    if accumulate {
                        continue;
                    }
                    // save_pre: P = alpha A B + bias, C = act(P)
                    let tc2 = up(&c0);
                    let mut rec = gpu.new_recorder();
                    let io = GemmIo {
                        a: &ta_,
                        b: &tb,
                        bias: Some(&tbi),
                        residual: None,
                        c: &tc2,
                    };
                    gemm_save_pre(&mut rec, &g, io, &tp, cfg).unwrap();
                    rec.submit().unwrap();
                    let pre: Vec<f64> = (0..m * n).map(|i| ab[i] + bi[i % n] as f64).collect();
                    let y: Vec<f64> = pre.iter().map(|&v| reference::act(v, act)).collect();
                    let (gp, gy) = (gpu.read(&tp).unwrap(), gpu.read(&tc2).unwrap());
                    assert_close(&format!("save_pre pre {what}"), &gp, &pre, tol(&g));
                    assert_close(&format!("save_pre y {what}"), &gy, &y, tol(&g));
                    worst_pre = worst_pre.max(rel_err(&gp, &pre)).max(rel_err(&gy, &y));
                }
            }
        }
    }
    eprintln!(
        "act_grad epilogue: worst relative error {worst_grad:.2e}; save_pre: {worst_pre:.2e}"
    );
    // Misuse is an error, not a wrong result.
    let t = gpu.upload(&[0.0; 16], &[16]).unwrap();
    let mut g = Gemm::new(4, 4, 1);
    g.act_grad = true;
    g.act = Act::Gelu;
    let io = |bias, residual| GemmIo {
        a: &t,
        b: &t,
        bias,
        residual,
        c: &t,
    };
    let mut rec = gpu.new_recorder();
    assert!(
        gemm_with(&mut rec, &g, io(None, None), &GemmConfig::default()).is_err(),
        "act_grad without R"
    );
    assert!(
        gemm_with(&mut rec, &g, io(Some(&t), Some(&t)), &GemmConfig::default()).is_err(),
        "act_grad with bias"
    );
}

/// `mm_sg`, the GEMM kernel for CPU adapters with 8-wide subgroups (lavapipe in CI), against the
/// f64 reference: every transpose; partial tiles (lanes whose rows start past M still take part in
/// the broadcasts, a second column half past N); bias, residual, activations, accumulation and
/// alpha; batches with strides and a shared B; split-K. On other adapters it must be refused.
/// The cases every blocked kernel runs beyond its shapes: GELU/ReLU epilogues with bias,
/// accumulation, alpha and the activation after the residual; batches with strides and with a
/// shared B; split-K in 1, 2 and 7 slices. Returns the worst relative error.
fn epilogue_batch_split_cases(cfg: &GemmConfig, seed: u64) -> f64 {
    let mut worst: f64 = 0.0;
    let mut seed = seed;
    for act in [Act::Gelu, Act::Relu] {
        let mut g = with_trans(36, 28, 44, false, true);
        g.act = act;
        worst = worst.max(run_cfg(g, true, false, seed, cfg));
        g.accumulate = true;
        g.alpha = -1.5;
        worst = worst.max(run_cfg(g, true, true, seed + 1, cfg));
        g.act_after_residual = true;
        worst = worst.max(run_act_after_residual(g, seed + 2, cfg));
        seed += 3;
    }
    let mut w = Gemm::new(20, 68, 16);
    w.batch = 4;
    w.a_bs = 16 * 20 + 4;
    w.b_bs = 0;
    w.c_bs = 20 * 68 + 8;
    w.trans_a = true;
    worst = worst.max(run_cfg(w, true, true, seed, cfg));
    w.b_bs = 16 * 68;
    w.trans_a = false;
    w.a_bs = 20 * 16;
    worst = worst.max(run_cfg(w, false, true, seed + 1, cfg));
    let d = with_trans(24, 40, 4100, true, false);
    for splits in [1, 2, 7] {
        let cfg = GemmConfig {
            splits: Some(splits),
            ..*cfg
        };
        worst = worst.max(run_cfg(d, true, false, seed + 2, &cfg));
    }
    worst
}

#[test]
fn gemm_subgroup_kernel() {
    let gpu = test_gpu();
    let sg = GemmConfig {
        path: GemmPath::Blocked,
        subgroup: Some(true),
        ..Default::default()
    };
    if !gpu.subgroups_of_8() {
        let e = plan(gpu, &Gemm::new(64, 64, 64), &sg).unwrap_err();
        assert!(e.to_string().contains("8-wide subgroups"), "{e}");
        eprintln!(
            "{}: no 8-wide subgroups; checked that mm_sg is refused",
            gpu.info.name
        );
        return;
    }
    let mut worst: f64 = 0.0;
    let mut seed = 900;
    for (m, n, k) in [
        (4usize, 4usize, 4usize),
        (20, 36, 8),
        (132, 100, 68),
        (128, 64, 16),
        (260, 196, 36),
        (8, 260, 12),
    ] {
        for ta in [false, true] {
            for tb in [false, true] {
                let g = with_trans(m, n, k, ta, tb);
                assert_eq!(plan(gpu, &g, &sg).unwrap().entry, "mm_sg");
                worst = worst.max(run_cfg(g, false, false, seed, &sg));
                worst = worst.max(run_cfg(g, true, true, seed + 1, &sg));
                seed += 2;
            }
        }
    }
    worst = worst.max(epilogue_batch_split_cases(&sg, seed));
    eprintln!("subgroup kernel: worst relative error {worst:.2e}");
}

/// `mm_v4s` (32 x 16 blocks with vec4 loads, SwiftShader's default): every transpose, partial
/// blocks and workgroups, both lane orientations, the K % 4 tail of A^T B, epilogues, batches
/// with strides and a shared B, and split-K.
#[test]
fn gemm_small_blocks_kernel() {
    let small = |lanes_n: Option<bool>| GemmConfig {
        path: GemmPath::Blocked,
        vec4: Some(true),
        lanes_n,
        splits: None,
        subgroup: Some(false),
        small: Some(true),
    };
    let gpu = test_gpu();
    let mut worst: f64 = 0.0;
    let mut seed = 1900;
    for (m, n, k) in [
        (4usize, 4usize, 4usize),
        (20, 36, 8),
        (132, 100, 68),
        (8, 260, 12),
        (260, 8, 36),
    ] {
        for ta in [false, true] {
            for tb in [false, true] {
                for lanes in [None, Some(true), Some(false)] {
                    let g = with_trans(m, n, k, ta, tb);
                    let c = small(lanes);
                    assert_eq!(plan(gpu, &g, &c).unwrap().entry, "mm_v4s");
                    worst = worst.max(run_cfg(g, seed % 2 == 0, seed % 3 == 0, seed, &c));
                    seed += 1;
                }
            }
        }
    }
    // A^T B with K % 4 != 0 (the rank-1 tail).
    for k in [5, 18, 39] {
        let g = with_trans(36, 44, k, true, false);
        worst = worst.max(run_cfg(g, true, true, seed, &small(None)));
        seed += 1;
    }
    worst = worst.max(epilogue_batch_split_cases(&small(None), seed));
    eprintln!("mm_v4s: worst relative error {worst:.2e}");
}

// ---- B stored as f16 (weights at `--precision f16`) ----

fn f16_round(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect()
}

fn run_f16(g: Gemm, bias: bool, residual: bool, seed: u64, cfg: &GemmConfig) -> f64 {
    run_b(g, bias, residual, seed, cfg, 0, true)
}

fn f16_cfg(path: GemmPath, vec4: Option<bool>, subgroup: Option<bool>) -> GemmConfig {
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
        ("matmul", f16_cfg(GemmPath::Tiled, None, None)),
        ("mm_v4", f16_cfg(GemmPath::Blocked, Some(true), Some(false))),
        ("mm_s", f16_cfg(GemmPath::Blocked, Some(false), Some(false))),
        (
            "mm_v4s",
            GemmConfig {
                small: Some(true),
                ..f16_cfg(GemmPath::Blocked, Some(true), Some(false))
            },
        ),
    ];
    if gpu.subgroups_of_8() {
        paths.push(("mm_sg", f16_cfg(GemmPath::Blocked, Some(true), Some(true))));
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
                    assert_eq!(plan(gpu, &g, c).unwrap().entry, *entry, "{g:?}");
                    worst = worst.max(run_f16(g, seed % 2 == 0, seed % 3 == 0, seed, c));
                    seed += 1;
                }
            }
        }
    }
    // Odd sizes: an odd number of B elements (the last word half used) on the scalar kernels.
    for c in [
        f16_cfg(GemmPath::Tiled, None, None),
        f16_cfg(GemmPath::Blocked, Some(false), Some(false)),
    ] {
        for tb in [false, true] {
            let g = with_trans(5, 7, 3, false, tb);
            worst = worst.max(run_f16(g, true, false, seed, &c));
            let g = with_trans(33, 17, 45, true, tb);
            worst = worst.max(run_f16(g, false, true, seed + 1, &c));
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
        run_f16(g, true, false, seed, &auto);
        g.accumulate = true;
        g.alpha = -0.75;
        run_f16(g, true, true, seed + 1, &auto);
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
        run_f16(w, true, true, seed, &c);
        seed += 1;
    }
    // Split-K over a long K, on every split count, through the automatic kernel choice.
    let d = with_trans(24, 40, 4100, false, true);
    for splits in [1, 2, 7] {
        let c = GemmConfig {
            splits: Some(splits),
            ..Default::default()
        };
        run_f16(d, true, false, seed, &c);
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
