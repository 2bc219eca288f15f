//! Attention family vs the CPU f64 reference: window partition / reverse (and backward), TinyViT
//! windowed attention with relative position bias, SAM multi-head attention, their training
//! forward (lse) and backward; the CPU backward itself is checked by central finite differences.
//! Shapes are awkward on purpose (H, W not multiples of ws, odd head dims, batch 2, n = 196, key
//! splits) and two kernels run past 65,535 workgroups.

use medfastsam::ops::attention::*;
use medfastsam::ops::reference::attention::{self as refa, MhaShape};
use medfastsam::testutil::{Rng, test_gpu, to_f64};
mod common;
use common::{check, dot, up};

const FWD_TOL: f64 = 1e-5;
const BWD_TOL: f64 = 5e-5;

/// How the attention kernels are laid out in a check's name: by adapter, or pinned.
/// Kernel layout of a case: rows per invocation (`None`: the adapter's default) and whether the
/// subgroup kernels may be used (where the device has 8-wide subgroups).
#[derive(Clone, Copy)]
struct Layout {
    rows: Option<bool>,
    subgroups: bool,
}

const DEFAULT: Layout = Layout {
    rows: None,
    subgroups: true,
};

fn layout_tag(layout: Layout) -> String {
    let rows = match layout.rows {
        None => "",
        Some(false) => " [1 row/inv]",
        Some(true) => " [R rows/inv]",
    };
    let sg = if layout.subgroups {
        ""
    } else {
        " [no subgroups]"
    };
    format!("{rows}{sg}")
}

fn set_layout(rec: &mut medfastsam::gpu::Recorder, layout: Layout) {
    rec.plan.register_rows = layout.rows;
    rec.plan.subgroups = Some(layout.subgroups);
}

fn scaled(rng: &mut Rng, n: usize, s: f32) -> Vec<f32> {
    rng.vec(n).into_iter().map(|x| x * s).collect()
}

// ---------------------------------------------------------------------------------------------
// partition / reverse

/// (B, H, W, C, ws): C % 4 == 0 takes the row (vec4) kernels, the others the scalar ones.
const MAPS: [(usize, usize, usize, usize, usize); 8] = [
    (2, 10, 13, 5, 7),
    (1, 7, 7, 3, 7),
    (2, 16, 9, 4, 4),
    (1, 5, 3, 2, 14),
    (2, 30, 17, 9, 14),
    (2, 10, 13, 8, 7),
    (1, 30, 17, 12, 14),
    (3, 14, 21, 20, 7),
];

#[test]
fn partition_and_reverse_add_awkward_shapes() {
    let gpu = test_gpu();
    for (s, &(b, h, w, c, ws)) in MAPS.iter().enumerate() {
        let mut rng = Rng::new(10 + s as u64);
        let x = rng.vec(b * h * w * c);
        let tx = up(gpu, &x, &[b, h, w, c]);
        let mut rec = gpu.new_recorder();
        let win = window_partition(&mut rec, &tx, ws).unwrap();
        // feed the windows back with a residual
        let res = rng.vec(b * h * w * c);
        let tres = up(gpu, &res, &[b, h, w, c]);
        let back = window_reverse_add(&mut rec, &win, &tres, ws).unwrap();
        rec.submit().unwrap();
        let want = refa::window_partition(&to_f64(&x), b, h, w, c, ws);
        let (nwh, nww) = refa::n_windows(h, w, ws);
        assert_eq!(win.shape, vec![b * nwh * nww, ws * ws, c]);
        check(
            &format!("partition {:?}", (b, h, w, c, ws)),
            &gpu.read(&win).unwrap(),
            &want,
            0.0,
        );
        let want_back = refa::window_reverse_add(&want, &to_f64(&res), b, h, w, c, ws);
        check(
            &format!("reverse_add {:?}", (b, h, w, c, ws)),
            &gpu.read(&back).unwrap(),
            &want_back,
            1e-7,
        );
    }
}

#[test]
fn partition_reverse_backward() {
    let gpu = test_gpu();
    for (s, &(b, h, w, c, ws)) in MAPS.iter().enumerate() {
        let mut rng = Rng::new(20 + s as u64);
        let (nwh, nww) = refa::n_windows(h, w, ws);
        let nwin = b * nwh * nww * ws * ws * c;
        let nmap = b * h * w * c;
        let dwin = rng.vec(nwin);
        let dmap = rng.vec(nmap);
        let acc0 = rng.vec(nmap);
        let tdwin = up(gpu, &dwin, &[b * nwh * nww, ws * ws, c]);
        let tdmap = up(gpu, &dmap, &[b, h, w, c]);
        let tacc = up(gpu, &acc0, &[b, h, w, c]);
        let tacc2 = up(gpu, &acc0, &[b, h, w, c]);
        let mut rec = gpu.new_recorder();
        let dx = window_partition_backward(&mut rec, &tdwin, &[b, h, w, c], ws, None).unwrap();
        let dx_acc =
            window_partition_backward(&mut rec, &tdwin, &[b, h, w, c], ws, Some(&tacc)).unwrap();
        let dy = window_reverse_add_backward(&mut rec, &tdmap, ws, None).unwrap();
        let dy2 = window_reverse_add_backward(&mut rec, &tdmap, ws, Some(&tacc2)).unwrap();
        rec.submit().unwrap();
        assert!(dx_acc.same_buffer(&tacc));

        let want_dx = refa::window_partition_backward(&to_f64(&dwin), b, h, w, c, ws);
        check("partition_backward", &gpu.read(&dx).unwrap(), &want_dx, 0.0);
        let want_acc: Vec<f64> = want_dx
            .iter()
            .zip(&acc0)
            .map(|(a, &b)| a + b as f64)
            .collect();
        check(
            "partition_backward accumulate",
            &gpu.read(&tacc).unwrap(),
            &want_acc,
            1e-7,
        );
        let (want_dy, want_dres) =
            refa::window_reverse_add_backward(&to_f64(&dmap), b, h, w, c, ws);
        check(
            "reverse_add_backward dy",
            &gpu.read(&dy).unwrap(),
            &want_dy,
            0.0,
        );
        check(
            "reverse_add_backward dy (with dres)",
            &gpu.read(&dy2).unwrap(),
            &want_dy,
            0.0,
        );
        let want_dres_acc: Vec<f64> = want_dres
            .iter()
            .zip(&acc0)
            .map(|(a, &b)| a + b as f64)
            .collect();
        check(
            "reverse_add_backward dres accumulate",
            &gpu.read(&tacc2).unwrap(),
            &want_dres_acc,
            1e-7,
        );

        // The reference gradients are the adjoints of the reference forward maps:
        // <partition(x), dwin> = <x, partition_backward(dwin)>, same for reverse_add w.r.t. y.
        let x = to_f64(&rng.vec(nmap));
        let px = refa::window_partition(&x, b, h, w, c, ws);
        let lhs: f64 = px.iter().zip(&dwin).map(|(a, &b)| a * b as f64).sum();
        let rhs: f64 = x.iter().zip(&want_dx).map(|(a, b)| a * b).sum();
        assert!(
            (lhs - rhs).abs() <= 1e-12 * (1.0 + lhs.abs()),
            "partition adjoint {lhs} vs {rhs}"
        );
        let y = to_f64(&rng.vec(nwin));
        let ry = refa::window_reverse_add(&y, &vec![0.0; nmap], b, h, w, c, ws);
        let lhs: f64 = ry.iter().zip(&dmap).map(|(a, &b)| a * b as f64).sum();
        let rhs: f64 = y.iter().zip(&want_dy).map(|(a, b)| a * b).sum();
        assert!(
            (lhs - rhs).abs() <= 1e-12 * (1.0 + lhs.abs()),
            "reverse adjoint {lhs} vs {rhs}"
        );
    }
}

#[test]
fn partition_reverse_grid_beyond_65535_workgroups() {
    // 2053 x 2049 x 4 = 16.8 M elements > 65,535 workgroups of 256 in both kernels.
    let gpu = test_gpu();
    let (b, h, w, c, ws): (usize, usize, usize, usize, usize) = (1, 2053, 2049, 4, 7);
    let n = b * h * w * c;
    assert!(n.div_ceil(256) > 65_535);
    let mut rng = Rng::new(5);
    let x = rng.vec(n);
    let tx = up(gpu, &x, &[b, h, w, c]);
    let zero = vec![0.0f32; n];
    let tz = up(gpu, &zero, &[b, h, w, c]);
    let mut rec = gpu.new_recorder();
    let win = window_partition(&mut rec, &tx, ws).unwrap();
    let back = window_reverse_add(&mut rec, &win, &tz, ws).unwrap();
    rec.submit().unwrap();
    let want = refa::window_partition(&to_f64(&x), b, h, w, c, ws);
    check("partition 16.8M", &gpu.read(&win).unwrap(), &want, 0.0);
    check(
        "reverse 16.8M (round trip)",
        &gpu.read(&back).unwrap(),
        &to_f64(&x),
        0.0,
    );
}

// ---------------------------------------------------------------------------------------------
// windowed attention

/// (windows, ws, C, heads)
const WIN_CASES: [(usize, usize, usize, usize); 6] = [
    (3, 7, 15, 3),   // d = 5, n = 49
    (2, 14, 64, 2),  // d = 32, n = 196
    (5, 3, 7, 1),    // d = 7
    (1, 16, 128, 2), // d = 64, n = 256 (the limits)
    (4, 1, 2, 2),    // d = 1, n = 1
    (2, 7, 96, 3),   // tiny-config stage shape
];

fn win_inputs(rng: &mut Rng, nw: usize, ws: usize, c: usize, heads: usize) -> (Vec<f32>, Vec<f32>) {
    let n = ws * ws;
    // logits of a few units so the softmax is neither flat nor one-hot
    (
        scaled(rng, nw * n * 3 * c, 1.5),
        scaled(rng, heads * n, 1.0),
    )
}

fn check_window_forward(nw: usize, ws: usize, c: usize, heads: usize, seed: u64, layout: Layout) {
    let tag = layout_tag(layout);
    let gpu = test_gpu();
    let mut rng = Rng::new(seed);
    let n = ws * ws;
    let (qkv, bias) = win_inputs(&mut rng, nw, ws, c, heads);
    let tq = up(gpu, &qkv, &[nw, n, 3 * c]);
    let tb = up(gpu, &bias, &[heads, n]);
    let mut rec = gpu.new_recorder();
    set_layout(&mut rec, layout);
    let out = window_attention(&mut rec, &tq, &tb, Window { heads, ws }).unwrap();
    let saved = window_attention_train(&mut rec, &tq, &tb, Window { heads, ws }).unwrap();
    rec.submit().unwrap();
    let (want, want_lse) = refa::window_attention(&to_f64(&qkv), &to_f64(&bias), ws, c, heads);
    let what = format!("window_attention{tag} nw{nw} ws{ws} C{c} h{heads}");
    assert_eq!(out.shape, vec![nw, n, c]);
    check(&what, &gpu.read(&out).unwrap(), &want, FWD_TOL);
    check(
        &format!("{what} (train out)"),
        &gpu.read(&saved.out).unwrap(),
        &want,
        FWD_TOL,
    );
    check(
        &format!("{what} (train lse)"),
        &gpu.read(&saved.lse).unwrap(),
        &want_lse,
        FWD_TOL,
    );
}

#[test]
fn window_attention_forward_awkward_shapes() {
    for (s, &(nw, ws, c, heads)) in WIN_CASES.iter().enumerate() {
        check_window_forward(nw, ws, c, heads, 100 + s as u64, DEFAULT);
    }
}

#[test]
fn window_attention_on_partitioned_map_batch2() {
    // The real pipeline shape: [2, 10, 13, C] -> padded windows (padded tokens are zero vectors
    // and take part in the softmax unmasked).
    let gpu = test_gpu();
    let (b, h, w, heads, ws) = (2, 10, 13, 3, 7);
    let c3 = 3 * 15;
    let mut rng = Rng::new(7);
    let x = scaled(&mut rng, b * h * w * c3, 1.5);
    let bias = rng.vec(heads * ws * ws);
    let tx = up(gpu, &x, &[b, h, w, c3]);
    let tb = up(gpu, &bias, &[heads, ws * ws]);
    let res = rng.vec(b * h * w * 15);
    let tres = up(gpu, &res, &[b, h, w, 15]);
    let mut rec = gpu.new_recorder();
    let qkv = window_partition(&mut rec, &tx, ws).unwrap();
    let o = window_attention(&mut rec, &qkv, &tb, Window { heads, ws }).unwrap();
    let y = window_reverse_add(&mut rec, &o, &tres, ws).unwrap();
    rec.submit().unwrap();
    let wq = refa::window_partition(&to_f64(&x), b, h, w, c3, ws);
    let (wo, _) = refa::window_attention(&wq, &to_f64(&bias), ws, 15, heads);
    let want = refa::window_reverse_add(&wo, &to_f64(&res), b, h, w, 15, ws);
    check(
        "partition -> window_attention -> reverse_add",
        &gpu.read(&y).unwrap(),
        &want,
        FWD_TOL,
    );
}

#[test]
fn window_attention_grid_beyond_65535_workgroups() {
    // 66,000 windows x 1 head = 66,000 workgroups of the attention kernel.
    let gpu = test_gpu();
    let (nw, ws, c, heads) = (66_000, 2, 2, 1);
    let mut rng = Rng::new(3);
    let (qkv, bias) = win_inputs(&mut rng, nw, ws, c, heads);
    let tq = up(gpu, &qkv, &[nw, 4, 3 * c]);
    let tb = up(gpu, &bias, &[heads, 4]);
    let mut rec = gpu.new_recorder();
    let out = window_attention(&mut rec, &tq, &tb, Window { heads, ws }).unwrap();
    rec.submit().unwrap();
    let (want, _) = refa::window_attention(&to_f64(&qkv), &to_f64(&bias), ws, c, heads);
    check(
        "window_attention 66000 windows",
        &gpu.read(&out).unwrap(),
        &want,
        FWD_TOL,
    );
}

#[test]
fn window_attention_rejects_unsupported_shapes() {
    let gpu = test_gpu();
    let mut rec = gpu.new_recorder();
    // n = 17*17 = 289 > 256
    let qkv = gpu.empty(&[1, 289, 6]).unwrap();
    let bias = gpu.empty(&[1, 289]).unwrap();
    assert!(window_attention(&mut rec, &qkv, &bias, Window { heads: 1, ws: 17 }).is_err());
    // head dim 65 > 64
    let qkv = gpu.empty(&[1, 4, 3 * 65]).unwrap();
    let bias = gpu.empty(&[1, 4]).unwrap();
    let e = window_attention(&mut rec, &qkv, &bias, Window { heads: 1, ws: 2 }).unwrap_err();
    assert!(e.to_string().contains("head dim"), "{e}");
    // channels not divisible by heads, wrong bias size, wrong n
    let qkv = gpu.empty(&[1, 4, 3 * 10]).unwrap();
    assert!(window_attention(&mut rec, &qkv, &bias, Window { heads: 3, ws: 2 }).is_err());
    assert!(window_attention(&mut rec, &qkv, &bias, Window { heads: 2, ws: 2 }).is_err());
    assert!(window_attention(&mut rec, &qkv, &bias, Window { heads: 2, ws: 3 }).is_err());
    let q = gpu.empty(&[1, 3, 130]).unwrap();
    assert!(mha(&mut rec, &q, &q, &q, 2).is_err());
}

// ---------------------------------------------------------------------------------------------
// mha

/// (B, Lq, Lk, E, heads)
const MHA_CASES: [(usize, usize, usize, usize, usize); 6] = [
    (2, 5, 300, 24, 3),  // few queries, many keys: split over keys
    (1, 70, 5, 16, 8),   // head dim 2
    (2, 5, 5, 256, 8),   // decoder self attention
    (1, 9, 700, 128, 2), // head dim 64 with splits
    (1, 300, 33, 12, 4), // two query blocks
    (2, 17, 23, 15, 5),  // odd everything
];

fn mha_inputs(
    rng: &mut Rng,
    b: usize,
    lq: usize,
    lk: usize,
    e: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    (
        scaled(rng, b * lq * e, 1.5),
        scaled(rng, b * lk * e, 1.5),
        rng.vec(b * lk * e),
    )
}

fn check_mha_forward(
    b: usize,
    lq: usize,
    lk: usize,
    e: usize,
    heads: usize,
    seed: u64,
    layout: Layout,
) {
    let tag = layout_tag(layout);
    let gpu = test_gpu();
    let mut rng = Rng::new(seed);
    let (q, k, v) = mha_inputs(&mut rng, b, lq, lk, e);
    let (tq, tk, tv) = (
        up(gpu, &q, &[b, lq, e]),
        up(gpu, &k, &[b, lk, e]),
        up(gpu, &v, &[b, lk, e]),
    );
    let mut rec = gpu.new_recorder();
    set_layout(&mut rec, layout);
    let out = mha(&mut rec, &tq, &tk, &tv, heads).unwrap();
    let saved = mha_train(&mut rec, &tq, &tk, &tv, heads).unwrap();
    rec.submit().unwrap();
    let (want, want_lse) = refa::mha(
        &to_f64(&q),
        &to_f64(&k),
        &to_f64(&v),
        MhaShape {
            b,
            lq,
            lk,
            e,
            heads,
        },
    );
    let what = format!("mha{tag} B{b} Lq{lq} Lk{lk} E{e} h{heads}");
    check(&what, &gpu.read(&out).unwrap(), &want, FWD_TOL);
    check(
        &format!("{what} (train out)"),
        &gpu.read(&saved.out).unwrap(),
        &want,
        FWD_TOL,
    );
    check(
        &format!("{what} (train lse)"),
        &gpu.read(&saved.lse).unwrap(),
        &want_lse,
        FWD_TOL,
    );
}

#[test]
fn mha_forward_awkward_shapes() {
    for (s, &(b, lq, lk, e, heads)) in MHA_CASES.iter().enumerate() {
        check_mha_forward(b, lq, lk, e, heads, 200 + s as u64, DEFAULT);
    }
}

#[test]
fn mha_decoder_shapes() {
    let gpu = test_gpu();
    for &(lq, lk) in &[(5usize, 4096usize), (4096, 5)] {
        let (b, e, heads) = (1, 128, 8);
        let mut rng = Rng::new(lq as u64);
        let (q, k, v) = mha_inputs(&mut rng, b, lq, lk, e);
        let (tq, tk, tv) = (
            up(gpu, &q, &[b, lq, e]),
            up(gpu, &k, &[b, lk, e]),
            up(gpu, &v, &[b, lk, e]),
        );
        let mut rec = gpu.new_recorder();
        let out = mha(&mut rec, &tq, &tk, &tv, heads).unwrap();
        rec.submit().unwrap();
        let (want, _) = refa::mha(
            &to_f64(&q),
            &to_f64(&k),
            &to_f64(&v),
            MhaShape {
                b,
                lq,
                lk,
                e,
                heads,
            },
        );
        check(
            &format!("mha decoder Lq{lq} Lk{lk}"),
            &gpu.read(&out).unwrap(),
            &want,
            FWD_TOL,
        );
    }
}

// ---------------------------------------------------------------------------------------------
// backward: CPU reference vs finite differences

/// Max relative error of `grad` against central differences of `loss` over every input element.
fn fd_check(what: &str, x: &[f64], grad: &[f64], loss: impl Fn(&[f64]) -> f64) {
    let eps = 1e-5;
    let scale = grad.iter().fold(0.0f64, |m, g| m.max(g.abs()));
    let mut worst = 0.0f64;
    let mut xp = x.to_vec();
    for i in 0..x.len() {
        xp[i] = x[i] + eps;
        let lp = loss(&xp);
        xp[i] = x[i] - eps;
        let lm = loss(&xp);
        xp[i] = x[i];
        let fd = (lp - lm) / (2.0 * eps);
        worst = worst.max((fd - grad[i]).abs() / scale);
    }
    eprintln!("{what}: reference gradient vs finite differences, rel err {worst:.2e}");
    assert!(
        worst < 1e-7,
        "{what}: finite differences disagree: {worst:.3e}"
    );
}

#[test]
fn reference_backward_matches_finite_differences() {
    let mut rng = Rng::new(77);
    for &(nw, ws, c, heads) in &[(2usize, 3usize, 6usize, 2usize), (1, 2, 5, 1)] {
        let n = ws * ws;
        let qkv = to_f64(&scaled(&mut rng, nw * n * 3 * c, 1.5));
        let bias = to_f64(&rng.vec(heads * n));
        let w = to_f64(&rng.vec(nw * n * c));
        let (dqkv, dbias) = refa::window_attention_backward(&qkv, &bias, &w, ws, c, heads);
        fd_check("window_attention dqkv", &qkv, &dqkv, |x| {
            dot(&refa::window_attention(x, &bias, ws, c, heads).0, &w)
        });
        fd_check("window_attention dbias", &bias, &dbias, |bb| {
            dot(&refa::window_attention(&qkv, bb, ws, c, heads).0, &w)
        });
    }
    let (b, lq, lk, e, heads) = (2, 3, 5, 6, 2);
    let q = to_f64(&scaled(&mut rng, b * lq * e, 1.5));
    let k = to_f64(&scaled(&mut rng, b * lk * e, 1.5));
    let v = to_f64(&rng.vec(b * lk * e));
    let w = to_f64(&rng.vec(b * lq * e));
    let (dq, dk, dv) = refa::mha_backward(
        &q,
        &k,
        &v,
        &w,
        MhaShape {
            b,
            lq,
            lk,
            e,
            heads,
        },
    );
    let l = |q: &[f64], k: &[f64], v: &[f64]| {
        dot(
            &refa::mha(
                q,
                k,
                v,
                MhaShape {
                    b,
                    lq,
                    lk,
                    e,
                    heads,
                },
            )
            .0,
            &w,
        )
    };
    fd_check("mha dq", &q, &dq, |x| l(x, &k, &v));
    fd_check("mha dk", &k, &dk, |x| l(&q, x, &v));
    fd_check("mha dv", &v, &dv, |x| l(&q, &k, x));
}

// ---------------------------------------------------------------------------------------------
// backward: GPU vs CPU reference

fn check_window_backward(nw: usize, ws: usize, c: usize, heads: usize, seed: u64, layout: Layout) {
    let tag = layout_tag(layout);
    let gpu = test_gpu();
    let mut rng = Rng::new(seed);
    let n = ws * ws;
    let (qkv, bias) = win_inputs(&mut rng, nw, ws, c, heads);
    let dout = rng.vec(nw * n * c);
    let dbias0 = rng.vec(heads * n);
    let tq = up(gpu, &qkv, &[nw, n, 3 * c]);
    let tb = up(gpu, &bias, &[heads, n]);
    let tdo = up(gpu, &dout, &[nw, n, c]);
    let tdb = up(gpu, &dbias0, &[heads, n]);
    let mut rec = gpu.new_recorder();
    set_layout(&mut rec, layout);
    let saved = window_attention_train(&mut rec, &tq, &tb, Window { heads, ws }).unwrap();
    let dqkv =
        window_attention_backward(&mut rec, &tq, &tb, &saved, &tdo, Window { heads, ws }, &tdb)
            .unwrap();
    rec.submit().unwrap();
    let (want_dqkv, want_db) = refa::window_attention_backward(
        &to_f64(&qkv),
        &to_f64(&bias),
        &to_f64(&dout),
        ws,
        c,
        heads,
    );
    let what = format!("window_attention_backward{tag} nw{nw} ws{ws} C{c} h{heads}");
    check(
        &format!("{what} dqkv"),
        &gpu.read(&dqkv).unwrap(),
        &want_dqkv,
        BWD_TOL,
    );
    // dbias was accumulated into a buffer holding dbias0
    let got_db: Vec<f32> = gpu
        .read(&tdb)
        .unwrap()
        .iter()
        .zip(&dbias0)
        .map(|(a, b)| a - b)
        .collect();
    check(&format!("{what} dbias"), &got_db, &want_db, BWD_TOL);
}

#[test]
fn window_attention_backward_awkward_shapes() {
    // WIN_CASES plus many windows (several windows per dbias group, a partial last group)
    let mut cases = WIN_CASES.to_vec();
    cases.push((131, 3, 4, 2));
    for (s, &(nw, ws, c, heads)) in cases.iter().enumerate() {
        check_window_backward(nw, ws, c, heads, 300 + s as u64, DEFAULT);
    }
}

fn check_mha_backward(
    b: usize,
    lq: usize,
    lk: usize,
    e: usize,
    heads: usize,
    seed: u64,
    layout: Layout,
) {
    let tag = layout_tag(layout);
    let gpu = test_gpu();
    let mut rng = Rng::new(seed);
    let (q, k, v) = mha_inputs(&mut rng, b, lq, lk, e);
    let dout = rng.vec(b * lq * e);
    let (tq, tk, tv) = (
        up(gpu, &q, &[b, lq, e]),
        up(gpu, &k, &[b, lk, e]),
        up(gpu, &v, &[b, lk, e]),
    );
    let tdo = up(gpu, &dout, &[b, lq, e]);
    let mut rec = gpu.new_recorder();
    set_layout(&mut rec, layout);
    let saved = mha_train(&mut rec, &tq, &tk, &tv, heads).unwrap();
    let (dq, dk, dv) = mha_backward(&mut rec, &tq, &tk, &tv, &saved, &tdo, heads).unwrap();
    rec.submit().unwrap();
    let (wq, wk, wv) = refa::mha_backward(
        &to_f64(&q),
        &to_f64(&k),
        &to_f64(&v),
        &to_f64(&dout),
        MhaShape {
            b,
            lq,
            lk,
            e,
            heads,
        },
    );
    let what = format!("mha_backward{tag} B{b} Lq{lq} Lk{lk} E{e} h{heads}");
    check(&format!("{what} dq"), &gpu.read(&dq).unwrap(), &wq, BWD_TOL);
    check(&format!("{what} dk"), &gpu.read(&dk).unwrap(), &wk, BWD_TOL);
    check(&format!("{what} dv"), &gpu.read(&dv).unwrap(), &wv, BWD_TOL);
}

#[test]
fn mha_backward_awkward_shapes() {
    let mut cases = MHA_CASES.to_vec();
    cases.push((1, 300, 5, 16, 4)); // few keys, many queries: dk/dv split over queries
    for (s, &(b, lq, lk, e, heads)) in cases.iter().enumerate() {
        check_mha_backward(b, lq, lk, e, heads, 400 + s as u64, DEFAULT);
    }
}

#[test]
fn both_kernel_layouts() {
    // The kernels keep R rows per invocation on CPU adapters and one row on GPUs; run a few cases
    // in the layout the adapter would not pick by default (and in the other, for completeness).
    // Also without the subgroup kernels (what GPUs without 8-wide subgroups and browsers run).
    for (mode, subgroups) in [(false, true), (true, true), (false, false), (true, false)] {
        let l = Layout {
            rows: Some(mode),
            subgroups,
        };
        check_window_forward(3, 7, 64, 2, 500, l); // aligned, n = 49
        check_window_forward(2, 14, 15, 3, 501, l); // unaligned head dim 5, n = 196
        check_window_backward(3, 7, 64, 2, 502, l);
        check_window_backward(2, 14, 15, 3, 503, l);
        check_mha_forward(2, 5, 300, 32, 4, 504, l); // split over keys
        check_mha_backward(2, 5, 300, 32, 4, 505, l);
        check_mha_backward(1, 300, 5, 16, 4, 506, l); // split over queries
        check_mha_forward(1, 300, 33, 12, 4, 507, l);
    }
}
