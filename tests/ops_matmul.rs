//! GEMM kernel vs the CPU f64 reference on awkward shapes, every transpose and epilogue variant,
//! and a grid past 65,535 workgroups.

use medfastsam::ops::matmul::{gemm, Gemm};
use medfastsam::ops::{reference, Act};
use medfastsam::testutil::{assert_close, test_gpu, to_f64, Rng};

fn run_case(g: Gemm, bias: bool, residual: bool, seed: u64) {
    let gpu = test_gpu();
    let mut rng = Rng::new(seed);
    let na = if g.a_bs == 0 { g.m * g.k } else { g.a_bs * g.batch };
    let nb = if g.b_bs == 0 { g.k * g.n } else { g.b_bs * g.batch };
    let nc = g.c_bs * g.batch;
    let a = rng.vec(na);
    let b = rng.vec(nb);
    let bi = rng.vec(g.n);
    let r = rng.vec(nc);
    let c0 = rng.vec(nc);
    let ta = gpu.upload(&a, &[na]).unwrap();
    let tb = gpu.upload(&b, &[nb]).unwrap();
    let tbi = gpu.upload(&bi, &[g.n]).unwrap();
    let tr = gpu.upload(&r, &[nc]).unwrap();
    let tc = gpu.upload(&c0, &[nc]).unwrap();
    let mut rec = gpu.new_recorder();
    gemm(&mut rec, &g, &ta, &tb, bias.then_some(&tbi), residual.then_some(&tr), &tc).unwrap();
    rec.submit().unwrap();
    let got = gpu.read(&tc).unwrap();
    let mut want = to_f64(&c0);
    let (bi64, r64) = (to_f64(&bi), to_f64(&r));
    reference::gemm(
        &g,
        &to_f64(&a),
        &to_f64(&b),
        bias.then_some(&bi64[..]),
        residual.then_some(&r64[..]),
        &mut want,
    );
    assert_close(&format!("{g:?} bias={bias} res={residual}"), &got, &want, 2e-6);
}

#[test]
fn gemm_all_variants_awkward_shapes() {
    let shapes = [(1, 1, 1), (7, 5, 3), (65, 63, 17), (130, 33, 129), (64, 64, 64), (3, 200, 70)];
    let mut seed = 1;
    for &(m, n, k) in &shapes {
        for ta in [false, true] {
            for tb in [false, true] {
                let mut g = Gemm::new(m, n, k);
                g.trans_a = ta;
                g.trans_b = tb;
                run_case(g, false, false, seed);
                seed += 1;
            }
        }
    }
}

#[test]
fn gemm_epilogues() {
    for (i, act) in [Act::None, Act::Gelu, Act::Relu].into_iter().enumerate() {
        let mut g = Gemm::new(37, 29, 45);
        g.trans_b = true;
        g.act = act;
        run_case(g, true, false, 100 + i as u64);
        run_case(g, true, true, 110 + i as u64);
        g.accumulate = true;
        g.alpha = 0.5;
        run_case(g, false, false, 120 + i as u64);
    }
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
}

#[test]
fn gemm_grid_beyond_65535_workgroups() {
    // 70,000 batch entries of one 64-row tile each: the flat (tile, batch) grid needs splitting.
    let mut g = Gemm::new(3, 2, 4);
    g.batch = 70_000;
    g.a_bs = 12;
    g.b_bs = 8;
    g.c_bs = 6;
    run_case(g, false, false, 9);
}
