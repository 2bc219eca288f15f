//! LayerNorm and BatchNorm2d kernels vs the CPU f64 reference (and finite differences for the
//! backward passes) on the model's channel counts, awkward sizes and a grid past 65,535 workgroups.

use medfastsam::ops::norm::*;
use medfastsam::ops::{Act, reference};
use medfastsam::testutil::{Rng, assert_close, rel_err, test_gpu, to_f64};
mod common;
use common::{dot, serial, up};

/// Rows of x with a per-row offset and scale, so the two-pass variance is exercised.
/// Rows whose sample spread is below a third of the drawn scale are redrawn: with C = 3 a nearly
/// constant row is ill-conditioned (any f32 rounding of its mean is amplified by rstd), which says
/// nothing about the kernel.
fn ln_input(rng: &mut Rng, rows: usize, c: usize, offset: f64, scale: f64) -> Vec<f32> {
    let mut x = Vec::with_capacity(rows * c);
    for _ in 0..rows {
        let o = offset * rng.range(-1.0, 1.0);
        let s = scale * rng.range(0.2, 1.0);
        loop {
            let row: Vec<f32> = (0..c).map(|_| (o + s * rng.normal()) as f32).collect();
            let m = row.iter().map(|&v| v as f64).sum::<f64>() / c as f64;
            let sd = (row.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / c as f64).sqrt();
            if c < 2 || sd > s / 3.0 {
                x.extend(row);
                break;
            }
        }
    }
    x
}

/// A LayerNorm forward case: `rows` x `c` inputs around `offset` with spread `scale`.
#[derive(Clone, Copy)]
struct LnFwd {
    rows: usize,
    c: usize,
    eps: f32,
    act: Act,
    offset: f64,
    scale: f64,
}

fn ln_fwd_case(case: LnFwd, tol: f64, seed: u64) -> f64 {
    ln_fwd_case_team(case, tol, seed, None)
}

fn ln_fwd_case_team(case: LnFwd, tol: f64, seed: u64, team: Option<u32>) -> f64 {
    let LnFwd {
        rows,
        c,
        eps,
        act,
        offset,
        scale,
    } = case;
    let gpu = test_gpu();
    let mut rng = Rng::new(seed);
    let x = ln_input(&mut rng, rows, c, offset, scale);
    let w: Vec<f32> = (0..c).map(|_| rng.range(0.5, 1.5) as f32).collect();
    let b = rng.vec(c);
    let (tx, tw, tb) = (
        up(gpu, &x, &[rows, c]),
        up(gpu, &w, &[c]),
        up(gpu, &b, &[c]),
    );
    let mut rec = gpu.new_recorder();
    let y = layer_norm(&mut rec, &tx, &tw, &tb, eps, act).unwrap();
    let (y2, saved) = match team {
        Some(t) => layer_norm_train_with_team(&mut rec, &tx, &tw, &tb, eps, act, t).unwrap(),
        None => layer_norm_train(&mut rec, &tx, &tw, &tb, eps, act).unwrap(),
    };
    rec.submit().unwrap();
    let got = gpu.read(&y).unwrap();
    let got2 = gpu.read(&y2).unwrap();
    let (want, pre, mean, rstd) =
        reference::norm::layer_norm_full(&to_f64(&x), &to_f64(&w), &to_f64(&b), c, eps as f64, act);
    let what =
        format!("layer_norm rows={rows} c={c} eps={eps} {act:?} offset={offset} team={team:?}");
    assert_close(&what, &got, &want, tol);
    if team.is_none() {
        assert_eq!(
            got, got2,
            "{what}: train forward differs from inference forward"
        );
    } else {
        assert_close(&what, &got2, &want, tol);
    }
    assert_close(
        &format!("{what} mean"),
        &gpu.read(&saved.mean).unwrap(),
        &mean,
        tol,
    );
    assert_close(
        &format!("{what} rstd"),
        &gpu.read(&saved.rstd).unwrap(),
        &rstd,
        tol,
    );
    if let Some(p) = &saved.pre {
        assert_close(&format!("{what} pre"), &gpu.read(p).unwrap(), &pre, tol);
    }
    rel_err(&got, &want)
}

#[test]
fn layer_norm_model_channel_counts() {
    let _g = serial();
    let mut seed = 1;
    let mut worst: f64 = 0.0;
    for &c in &[4usize, 16, 32, 64, 96, 128, 160, 256, 320, 2048] {
        for &rows in &[1usize, 7, 130] {
            for (eps, act) in [(1e-5, Act::None), (1e-6, Act::Gelu)] {
                worst = worst.max(ln_fwd_case(
                    LnFwd {
                        rows,
                        c,
                        eps,
                        act,
                        offset: 1.0,
                        scale: 1.0,
                    },
                    2e-6,
                    seed,
                ));
                seed += 1;
            }
        }
    }
    eprintln!("layer_norm model channel counts: worst rel err {worst:.2e}");
}

#[test]
fn layer_norm_awkward_channels() {
    let _g = serial();
    let mut seed = 100;
    let mut worst: f64 = 0.0;
    for &c in &[1usize, 2, 3, 5, 7, 31, 33, 129, 257, 1000, 2051] {
        for act in [Act::None, Act::Relu] {
            worst = worst.max(ln_fwd_case(
                LnFwd {
                    rows: 67,
                    c,
                    eps: 1e-5,
                    act,
                    offset: 1.0,
                    scale: 1.0,
                },
                2e-6,
                seed,
            ));
            seed += 1;
        }
    }
    eprintln!("layer_norm awkward channels: worst rel err {worst:.2e}");
}

#[test]
fn layer_norm_large_offset_small_variance() {
    let _g = serial();
    // Rows with |mean| up to 30 and std down to 0.02: a one-pass E[x^2] - E[x]^2 would lose
    // everything; the two-pass form only sees the rounding of the mean.
    let mut worst: f64 = 0.0;
    for (i, &c) in [32usize, 96, 320].iter().enumerate() {
        worst = worst.max(ln_fwd_case(
            LnFwd {
                rows: 50,
                c,
                eps: 1e-6,
                act: Act::None,
                offset: 30.0,
                scale: 0.1,
            },
            5e-5,
            200 + i as u64,
        ));
    }
    eprintln!("layer_norm large offset: worst rel err {worst:.2e}");
}

#[test]
fn layer_norm_every_team_width() {
    let _g = serial();
    // The default picks ~16 values per thread; every power-of-two team must reduce correctly,
    // including teams wider than the row (idle lanes) and rows much wider than the team.
    let mut worst: f64 = 0.0;
    let mut seed = 250;
    for team in [1u32, 2, 4, 8, 16, 32, 64, 128, 256] {
        for &c in &[3usize, 32, 33, 320] {
            worst = worst.max(ln_fwd_case_team(
                LnFwd {
                    rows: 37,
                    c,
                    eps: 1e-5,
                    act: Act::Gelu,
                    offset: 1.0,
                    scale: 1.0,
                },
                2e-6,
                seed,
                Some(team),
            ));
            seed += 1;
        }
    }
    eprintln!("layer_norm every team width: worst rel err {worst:.2e}");
}

#[test]
fn layer_norm_grid_beyond_65535_workgroups() {
    let _g = serial();
    // Teams of 256 = one row per workgroup: 65,601 rows need 65,601 workgroups (split over x/y).
    let e = ln_fwd_case_team(
        LnFwd {
            rows: 65_601,
            c: 5,
            eps: 1e-5,
            act: Act::Gelu,
            offset: 1.0,
            scale: 1.0,
        },
        2e-6,
        300,
        Some(256),
    );
    // With the default team (C = 33 -> 4 threads, 64 rows per workgroup) on many rows.
    let e2 = ln_fwd_case(
        LnFwd {
            rows: 262_147,
            c: 33,
            eps: 1e-5,
            act: Act::Gelu,
            offset: 1.0,
            scale: 1.0,
        },
        2e-6,
        301,
    );
    // C % 4 == 0: two rows per invocation, 8 per workgroup: 1,048,579 rows = 65,537 workgroups.
    let e3 = ln_fwd_case(
        LnFwd {
            rows: 1_048_579,
            c: 4,
            eps: 1e-5,
            act: Act::Gelu,
            offset: 1.0,
            scale: 1.0,
        },
        2e-6,
        302,
    );
    eprintln!(
        "layer_norm 65601x5 (team 256): rel err {e:.2e}; 262147x33: {e2:.2e}; 1048579x4: {e3:.2e}"
    );
}

// ------------------------------------------------------------------------------------------------
// LayerNorm backward

/// Central finite differences (f64) of `sum(dy * f(params))` with respect to every entry of `p`.
fn fd_grad(p: &[f64], h: f64, mut f: impl FnMut(&[f64]) -> f64) -> Vec<f64> {
    let mut q = p.to_vec();
    (0..p.len())
        .map(|i| {
            let step = h * p[i].abs().max(1.0);
            q[i] = p[i] + step;
            let up = f(&q);
            q[i] = p[i] - step;
            let dn = f(&q);
            q[i] = p[i];
            (up - dn) / (2.0 * step)
        })
        .collect()
}

struct LnGrads {
    dx: Vec<f32>,
    dw: Vec<f32>,
    db: Vec<f32>,
}

/// Runs the GPU training forward + backward. dw/db/dx start from the given values (accumulation).
/// Input, weight, bias and output gradient of a LayerNorm backward case.
#[derive(Clone, Copy)]
struct LnData<'a> {
    x: &'a [f32],
    w: &'a [f32],
    b: &'a [f32],
    dy: &'a [f32],
}

fn ln_gpu_backward(
    d: LnData,
    c: usize,
    eps: f32,
    act: Act,
    init: Option<(&[f32], &[f32], &[f32])>,
) -> LnGrads {
    ln_gpu_backward_team(d, c, eps, act, init, None)
}

fn ln_gpu_backward_team(
    d: LnData,
    c: usize,
    eps: f32,
    act: Act,
    init: Option<(&[f32], &[f32], &[f32])>,
    team: Option<u32>,
) -> LnGrads {
    let LnData { x, w, b, dy } = d;
    let gpu = test_gpu();
    let rows = x.len() / c;
    let (tx, tw, tb) = (up(gpu, x, &[rows, c]), up(gpu, w, &[c]), up(gpu, b, &[c]));
    let tdy = up(gpu, dy, &[rows, c]);
    let zeros = vec![0.0f32; c];
    let (dw0, db0) = init
        .map(|(a, b, _)| (a.to_vec(), b.to_vec()))
        .unwrap_or((zeros.clone(), zeros));
    let (tdw, tdb) = (up(gpu, &dw0, &[c]), up(gpu, &db0, &[c]));
    let tdx0 = init.map(|(_, _, d)| up(gpu, d, &[rows, c]));
    let mut rec = gpu.new_recorder();
    let (_, saved) = layer_norm_train(&mut rec, &tx, &tw, &tb, eps, act).unwrap();
    let dx = match team {
        Some(t) => layer_norm_backward_with_team(
            &mut rec,
            &tx,
            &tw,
            &saved,
            &tdy,
            NormGrads {
                dw: &tdw,
                db: &tdb,
                dx_acc: tdx0.as_ref(),
            },
            t,
        ),
        None => layer_norm_backward(
            &mut rec,
            &tx,
            &tw,
            &saved,
            &tdy,
            NormGrads {
                dw: &tdw,
                db: &tdb,
                dx_acc: tdx0.as_ref(),
            },
        ),
    }
    .unwrap();
    rec.submit().unwrap();
    LnGrads {
        dx: gpu.read(&dx).unwrap(),
        dw: gpu.read(&tdw).unwrap(),
        db: gpu.read(&tdb).unwrap(),
    }
}

#[test]
fn layer_norm_backward_vs_finite_differences() {
    let _g = serial();
    let mut worst: f64 = 0.0;
    for (i, &(rows, c, act)) in [
        (5usize, 7usize, Act::None),
        (3, 33, Act::Gelu),
        (4, 4, Act::Gelu),
        (2, 130, Act::None),
    ]
    .iter()
    .enumerate()
    {
        let mut rng = Rng::new(400 + i as u64);
        let x = ln_input(&mut rng, rows, c, 1.0, 1.0);
        let w: Vec<f32> = (0..c).map(|_| rng.range(0.5, 1.5) as f32).collect();
        let b = rng.vec(c);
        let dy = rng.vec(rows * c);
        let eps = 1e-5;
        let g = ln_gpu_backward(
            LnData {
                x: &x,
                w: &w,
                b: &b,
                dy: &dy,
            },
            c,
            eps,
            act,
            None,
        );
        let (x64, w64, b64, dy64) = (to_f64(&x), to_f64(&w), to_f64(&b), to_f64(&dy));
        let obj = |x: &[f64], w: &[f64], b: &[f64]| {
            dot(
                &dy64,
                &reference::norm::layer_norm(x, w, b, c, eps as f64, act),
            )
        };
        let fdx = fd_grad(&x64, 1e-5, |p| obj(p, &w64, &b64));
        let fdw = fd_grad(&w64, 1e-5, |p| obj(&x64, p, &b64));
        let fdb = fd_grad(&b64, 1e-5, |p| obj(&x64, &w64, p));
        let what = format!("layer_norm_backward rows={rows} c={c} {act:?} vs FD");
        assert_close(&format!("{what} dx"), &g.dx, &fdx, 1e-5);
        assert_close(&format!("{what} dw"), &g.dw, &fdw, 1e-5);
        assert_close(&format!("{what} db"), &g.db, &fdb, 1e-5);
        worst = worst
            .max(rel_err(&g.dx, &fdx))
            .max(rel_err(&g.dw, &fdw))
            .max(rel_err(&g.db, &fdb));
        // The f64 analytic reference agrees with finite differences too.
        let (rdx, rdw, rdb) =
            reference::norm::layer_norm_backward(&x64, &w64, &b64, &dy64, c, eps as f64, act);
        for (a, b) in [(&rdx, &fdx), (&rdw, &fdw), (&rdb, &fdb)] {
            let e = a
                .iter()
                .zip(b.iter())
                .fold(0.0f64, |m, (p, q)| m.max((p - q).abs()));
            assert!(e < 1e-7, "{what}: analytic reference vs FD {e:e}");
        }
    }
    eprintln!("layer_norm_backward vs FD: worst rel err {worst:.2e}");
}

fn ln_bwd_case(rows: usize, c: usize, act: Act, accumulate: bool, tol: f64, seed: u64) -> f64 {
    ln_bwd_case_team(rows, c, act, accumulate, tol, seed, None)
}

fn ln_bwd_case_team(
    rows: usize,
    c: usize,
    act: Act,
    accumulate: bool,
    tol: f64,
    seed: u64,
    team: Option<u32>,
) -> f64 {
    let mut rng = Rng::new(seed);
    let x = ln_input(&mut rng, rows, c, 1.0, 1.0);
    let w: Vec<f32> = (0..c).map(|_| rng.range(0.5, 1.5) as f32).collect();
    let b = rng.vec(c);
    let dy = rng.vec(rows * c);
    let (dw0, db0, dx0) = (rng.vec(c), rng.vec(c), rng.vec(rows * c));
    let init = accumulate.then_some((&dw0[..], &db0[..], &dx0[..]));
    let g = ln_gpu_backward_team(
        LnData {
            x: &x,
            w: &w,
            b: &b,
            dy: &dy,
        },
        c,
        1e-6,
        act,
        init,
        team,
    );
    let (mut dx, mut dw, mut db) = reference::norm::layer_norm_backward(
        &to_f64(&x),
        &to_f64(&w),
        &to_f64(&b),
        &to_f64(&dy),
        c,
        1e-6,
        act,
    );
    if accumulate {
        for (a, b) in dx.iter_mut().zip(&dx0) {
            *a += *b as f64;
        }
        for (a, b) in dw.iter_mut().zip(&dw0) {
            *a += *b as f64;
        }
        for (a, b) in db.iter_mut().zip(&db0) {
            *a += *b as f64;
        }
    }
    let what =
        format!("layer_norm_backward rows={rows} c={c} {act:?} acc={accumulate} team={team:?}");
    assert_close(&format!("{what} dx"), &g.dx, &dx, tol);
    assert_close(&format!("{what} dw"), &g.dw, &dw, tol);
    assert_close(&format!("{what} db"), &g.db, &db, tol);
    rel_err(&g.dx, &dx)
        .max(rel_err(&g.dw, &dw))
        .max(rel_err(&g.db, &db))
}

#[test]
fn layer_norm_backward_shapes() {
    let _g = serial();
    let mut worst: f64 = 0.0;
    let mut seed = 500;
    for &(rows, c) in &[
        (1usize, 4usize),
        (67, 3),
        (130, 32),
        (1000, 96),
        (4099, 128),
        (33, 320),
        (9, 2051),
    ] {
        for act in [Act::None, Act::Gelu, Act::Relu] {
            worst = worst.max(ln_bwd_case(rows, c, act, seed % 2 == 0, 1e-5, seed));
            seed += 1;
        }
    }
    eprintln!("layer_norm_backward shapes: worst rel err {worst:.2e}");
}

#[test]
fn layer_norm_backward_every_team_width() {
    let _g = serial();
    let mut worst: f64 = 0.0;
    let mut seed = 650;
    for team in [1u32, 2, 8, 32, 128, 256] {
        for &c in &[3usize, 33, 320] {
            worst = worst.max(ln_bwd_case_team(
                29,
                c,
                Act::Gelu,
                seed % 2 == 0,
                1e-5,
                seed,
                Some(team),
            ));
            seed += 1;
        }
    }
    eprintln!("layer_norm_backward every team width: worst rel err {worst:.2e}");
}

#[test]
fn layer_norm_backward_many_rows_and_big_grid() {
    let _g = serial();
    // Teams of 256: the dx kernel needs 65,601 workgroups.
    let e = ln_bwd_case_team(65_601, 5, Act::Gelu, true, 1e-5, 600, Some(256));
    // dw/db sum 262,147 rows (512 chunks of 513 rows in the first level).
    let e2 = ln_bwd_case(262_147, 33, Act::Gelu, true, 1e-5, 601);
    // C % 4 == 0: one row per invocation, 8 per workgroup: 65,538 workgroups.
    let e3 = ln_bwd_case(524_297, 4, Act::Gelu, true, 1e-5, 602);
    eprintln!(
        "layer_norm_backward 65601x5 (team 256): rel err {e:.2e}; 262147x33: {e2:.2e}; 524297x4: {e3:.2e}"
    );
}

#[test]
fn layer_norm_backward_is_deterministic() {
    let _g = serial();
    let mut rng = Rng::new(700);
    let (rows, c) = (20_000, 64);
    let x = ln_input(&mut rng, rows, c, 1.0, 1.0);
    let w = rng.vec(c);
    let b = rng.vec(c);
    let dy = rng.vec(rows * c);
    let a = ln_gpu_backward(
        LnData {
            x: &x,
            w: &w,
            b: &b,
            dy: &dy,
        },
        c,
        1e-5,
        Act::None,
        None,
    );
    let b2 = ln_gpu_backward(
        LnData {
            x: &x,
            w: &w,
            b: &b,
            dy: &dy,
        },
        c,
        1e-5,
        Act::None,
        None,
    );
    assert_eq!(a.dw, b2.dw);
    assert_eq!(a.db, b2.db);
    assert_eq!(a.dx, b2.dx);
}

// ------------------------------------------------------------------------------------------------
// BatchNorm2d

struct BnCase {
    x: Vec<f32>,
    w: Vec<f32>,
    b: Vec<f32>,
    rm: Vec<f32>,
    rv: Vec<f32>,
}

fn bn_case(rng: &mut Rng, rows: usize, c: usize, offset: f64, scale: f64) -> BnCase {
    let mo: Vec<f64> = (0..c).map(|_| offset * rng.range(-1.0, 1.0)).collect();
    let sc: Vec<f64> = (0..c).map(|_| scale * rng.range(0.2, 1.0)).collect();
    let x = (0..rows * c)
        .map(|i| (mo[i % c] + sc[i % c] * rng.normal()) as f32)
        .collect();
    BnCase {
        x,
        w: (0..c).map(|_| rng.range(0.5, 1.5) as f32).collect(),
        b: rng.vec(c),
        rm: rng.vec(c),
        rv: (0..c).map(|_| rng.range(0.5, 2.0) as f32).collect(),
    }
}

fn bn_train_case(shape: &[usize], act: Act, offset: f64, scale: f64, tol: f64, seed: u64) -> f64 {
    let gpu = test_gpu();
    let c = *shape.last().unwrap();
    let rows = shape.iter().product::<usize>() / c;
    let mut rng = Rng::new(seed);
    let d = bn_case(&mut rng, rows, c, offset, scale);
    let tx = up(gpu, &d.x, shape);
    let (tw, tb, trm, trv) = (
        up(gpu, &d.w, &[c]),
        up(gpu, &d.b, &[c]),
        up(gpu, &d.rm, &[c]),
        up(gpu, &d.rv, &[c]),
    );
    let mut rec = gpu.new_recorder();
    let (y, saved) = batch_norm_train(
        &mut rec,
        &tx,
        BnLayer {
            w: &tw,
            b: &tb,
            running_mean: &trm,
            running_var: &trv,
        },
        0.1,
        1e-5,
        act,
    )
    .unwrap();
    rec.submit().unwrap();
    let (ry, rpre, rmean, rvar, rrm, rrv) = reference::norm::batch_norm_train(
        &to_f64(&d.x),
        reference::norm::BnLayer {
            w: &to_f64(&d.w),
            b: &to_f64(&d.b),
            running_mean: &to_f64(&d.rm),
            running_var: &to_f64(&d.rv),
        },
        c,
        0.1,
        1e-5,
        act,
    );
    let what = format!("batch_norm_train {shape:?} {act:?} offset={offset} scale={scale}");
    let got = gpu.read(&y).unwrap();
    assert_close(&what, &got, &ry, tol);
    assert_close(
        &format!("{what} mean"),
        &gpu.read(&saved.mean).unwrap(),
        &rmean,
        tol,
    );
    let rrstd: Vec<f64> = rvar.iter().map(|v| 1.0 / (v + 1e-5).sqrt()).collect();
    assert_close(
        &format!("{what} rstd"),
        &gpu.read(&saved.rstd).unwrap(),
        &rrstd,
        tol,
    );
    assert_close(
        &format!("{what} running_mean"),
        &gpu.read(&trm).unwrap(),
        &rrm,
        tol,
    );
    assert_close(
        &format!("{what} running_var"),
        &gpu.read(&trv).unwrap(),
        &rrv,
        tol,
    );
    if let Some(p) = &saved.pre {
        assert_close(&format!("{what} pre"), &gpu.read(p).unwrap(), &rpre, tol);
    }
    rel_err(&got, &ry)
}

#[test]
fn batch_norm_train_forward() {
    let _g = serial();
    let mut worst: f64 = 0.0;
    let mut seed = 800;
    for shape in [
        vec![2usize, 5, 7, 3],
        vec![1, 1, 2, 4],
        vec![2, 9, 11, 32],
        vec![3, 17, 19, 96],
        vec![1, 8, 8, 320],
        vec![2, 128, 129, 32],
        vec![1, 301, 300, 5],
    ] {
        for act in [Act::None, Act::Gelu] {
            worst = worst.max(bn_train_case(&shape, act, 1.0, 1.0, 2e-6, seed));
            seed += 1;
        }
    }
    eprintln!("batch_norm_train forward: worst rel err {worst:.2e}");
}

#[test]
fn batch_norm_train_offset_channels() {
    let _g = serial();
    // Channels with |mean| up to 20 and std down to 0.02: needs the two-pass variance.
    let e = bn_train_case(&[4, 64, 64, 32], Act::None, 20.0, 0.1, 5e-5, 900);
    eprintln!("batch_norm_train offset channels: rel err {e:.2e}");
}

#[test]
fn batch_norm_eval_forward() {
    let _g = serial();
    let gpu = test_gpu();
    let mut worst: f64 = 0.0;
    for (i, (shape, act)) in [
        (vec![2usize, 7, 5, 3], Act::None),
        (vec![1, 33, 31, 64], Act::Relu),
        (vec![2, 4, 4, 160], Act::Gelu),
    ]
    .into_iter()
    .enumerate()
    {
        let c = *shape.last().unwrap();
        let rows = shape.iter().product::<usize>() / c;
        let mut rng = Rng::new(1000 + i as u64);
        let d = bn_case(&mut rng, rows, c, 1.0, 1.0);
        let tx = up(gpu, &d.x, &shape);
        let (tw, tb, trm, trv) = (
            up(gpu, &d.w, &[c]),
            up(gpu, &d.b, &[c]),
            up(gpu, &d.rm, &[c]),
            up(gpu, &d.rv, &[c]),
        );
        let mut rec = gpu.new_recorder();
        let y = batch_norm_eval(
            &mut rec,
            &tx,
            BnLayer {
                w: &tw,
                b: &tb,
                running_mean: &trm,
                running_var: &trv,
            },
            1e-5,
            act,
        )
        .unwrap();
        rec.submit().unwrap();
        let want = reference::norm::batch_norm_eval(
            &to_f64(&d.x),
            reference::norm::BnLayer {
                w: &to_f64(&d.w),
                b: &to_f64(&d.b),
                running_mean: &to_f64(&d.rm),
                running_var: &to_f64(&d.rv),
            },
            c,
            1e-5,
            act,
        );
        let got = gpu.read(&y).unwrap();
        assert_close(
            &format!("batch_norm_eval {shape:?} {act:?}"),
            &got,
            &want,
            2e-6,
        );
        worst = worst.max(rel_err(&got, &want));
        assert_eq!(
            gpu.read(&trm).unwrap(),
            d.rm,
            "eval must not touch running stats"
        );
    }
    eprintln!("batch_norm_eval: worst rel err {worst:.2e}");
}

struct BnGrads {
    dx: Vec<f32>,
    dw: Vec<f32>,
    db: Vec<f32>,
}

fn bn_gpu_backward(
    d: &BnCase,
    dy: &[f32],
    shape: &[usize],
    act: Act,
    train: bool,
    init: Option<(&[f32], &[f32], &[f32])>,
) -> BnGrads {
    let gpu = test_gpu();
    let c = *shape.last().unwrap();
    let tx = up(gpu, &d.x, shape);
    let (tw, tb, trm, trv) = (
        up(gpu, &d.w, &[c]),
        up(gpu, &d.b, &[c]),
        up(gpu, &d.rm, &[c]),
        up(gpu, &d.rv, &[c]),
    );
    let tdy = up(gpu, dy, shape);
    let zeros = vec![0.0f32; c];
    let (dw0, db0) = init
        .map(|(a, b, _)| (a.to_vec(), b.to_vec()))
        .unwrap_or((zeros.clone(), zeros));
    let (tdw, tdb) = (up(gpu, &dw0, &[c]), up(gpu, &db0, &[c]));
    let tdx0 = init.map(|(_, _, x)| up(gpu, x, shape));
    let mut rec = gpu.new_recorder();
    let (_, saved) = if train {
        batch_norm_train(
            &mut rec,
            &tx,
            BnLayer {
                w: &tw,
                b: &tb,
                running_mean: &trm,
                running_var: &trv,
            },
            0.1,
            1e-5,
            act,
        )
        .unwrap()
    } else {
        batch_norm_eval_saved(
            &mut rec,
            &tx,
            BnLayer {
                w: &tw,
                b: &tb,
                running_mean: &trm,
                running_var: &trv,
            },
            1e-5,
            act,
        )
        .unwrap()
    };
    let dx = batch_norm_backward(
        &mut rec,
        &tx,
        &tw,
        &saved,
        &tdy,
        NormGrads {
            dw: &tdw,
            db: &tdb,
            dx_acc: tdx0.as_ref(),
        },
    )
    .unwrap();
    rec.submit().unwrap();
    BnGrads {
        dx: gpu.read(&dx).unwrap(),
        dw: gpu.read(&tdw).unwrap(),
        db: gpu.read(&tdb).unwrap(),
    }
}

#[test]
fn batch_norm_backward_vs_finite_differences() {
    let _g = serial();
    let mut worst: f64 = 0.0;
    for (i, &(shape, act, train)) in [
        (&[2usize, 3, 2, 5][..], Act::None, true),
        (&[1, 4, 3, 4][..], Act::Gelu, true),
        (&[2, 2, 3, 3][..], Act::Gelu, false),
        (&[1, 5, 5, 2][..], Act::None, false),
    ]
    .iter()
    .enumerate()
    {
        let c = *shape.last().unwrap();
        let rows = shape.iter().product::<usize>() / c;
        let mut rng = Rng::new(1100 + i as u64);
        let d = bn_case(&mut rng, rows, c, 1.0, 1.0);
        let dy = rng.vec(rows * c);
        let g = bn_gpu_backward(&d, &dy, shape, act, train, None);
        let (x64, w64, b64, rm, rv, dy64) = (
            to_f64(&d.x),
            to_f64(&d.w),
            to_f64(&d.b),
            to_f64(&d.rm),
            to_f64(&d.rv),
            to_f64(&dy),
        );
        let obj = |x: &[f64], w: &[f64], b: &[f64]| {
            let bn = reference::norm::BnLayer {
                w,
                b,
                running_mean: &rm,
                running_var: &rv,
            };
            let y = if train {
                reference::norm::batch_norm_train(x, bn, c, 0.1, 1e-5, act).0
            } else {
                reference::norm::batch_norm_eval(x, bn, c, 1e-5, act)
            };
            dot(&dy64, &y)
        };
        let fdx = fd_grad(&x64, 1e-5, |p| obj(p, &w64, &b64));
        let fdw = fd_grad(&w64, 1e-5, |p| obj(&x64, p, &b64));
        let fdb = fd_grad(&b64, 1e-5, |p| obj(&x64, &w64, p));
        let what = format!("batch_norm_backward {shape:?} {act:?} train={train} vs FD");
        assert_close(&format!("{what} dx"), &g.dx, &fdx, 1e-5);
        assert_close(&format!("{what} dw"), &g.dw, &fdw, 1e-5);
        assert_close(&format!("{what} db"), &g.db, &fdb, 1e-5);
        worst = worst
            .max(rel_err(&g.dx, &fdx))
            .max(rel_err(&g.dw, &fdw))
            .max(rel_err(&g.db, &fdb));
        let (rdx, rdw, rdb) = reference::norm::batch_norm_backward(
            &x64,
            reference::norm::BnLayer {
                w: &w64,
                b: &b64,
                running_mean: &rm,
                running_var: &rv,
            },
            &dy64,
            c,
            1e-5,
            act,
            train,
        );
        for (a, b) in [(&rdx, &fdx), (&rdw, &fdw), (&rdb, &fdb)] {
            let e = a
                .iter()
                .zip(b.iter())
                .fold(0.0f64, |m, (p, q)| m.max((p - q).abs()));
            assert!(e < 1e-7, "{what}: analytic reference vs FD {e:e}");
        }
    }
    eprintln!("batch_norm_backward vs FD: worst rel err {worst:.2e}");
}

fn bn_bwd_case(
    shape: &[usize],
    act: Act,
    train: bool,
    accumulate: bool,
    tol: f64,
    seed: u64,
) -> f64 {
    let c = *shape.last().unwrap();
    let rows = shape.iter().product::<usize>() / c;
    let mut rng = Rng::new(seed);
    let d = bn_case(&mut rng, rows, c, 1.0, 1.0);
    let dy = rng.vec(rows * c);
    let (dw0, db0, dx0) = (rng.vec(c), rng.vec(c), rng.vec(rows * c));
    let init = accumulate.then_some((&dw0[..], &db0[..], &dx0[..]));
    let g = bn_gpu_backward(&d, &dy, shape, act, train, init);
    let (mut dx, mut dw, mut db) = reference::norm::batch_norm_backward(
        &to_f64(&d.x),
        reference::norm::BnLayer {
            w: &to_f64(&d.w),
            b: &to_f64(&d.b),
            running_mean: &to_f64(&d.rm),
            running_var: &to_f64(&d.rv),
        },
        &to_f64(&dy),
        c,
        1e-5,
        act,
        train,
    );
    if accumulate {
        for (a, b) in dx.iter_mut().zip(&dx0) {
            *a += *b as f64;
        }
        for (a, b) in dw.iter_mut().zip(&dw0) {
            *a += *b as f64;
        }
        for (a, b) in db.iter_mut().zip(&db0) {
            *a += *b as f64;
        }
    }
    let what = format!("batch_norm_backward {shape:?} {act:?} train={train} acc={accumulate}");
    assert_close(&format!("{what} dx"), &g.dx, &dx, tol);
    assert_close(&format!("{what} dw"), &g.dw, &dw, tol);
    assert_close(&format!("{what} db"), &g.db, &db, tol);
    rel_err(&g.dx, &dx)
        .max(rel_err(&g.dw, &dw))
        .max(rel_err(&g.db, &db))
}

#[test]
fn batch_norm_backward_shapes() {
    let _g = serial();
    let mut worst: f64 = 0.0;
    let mut seed = 1200;
    for shape in [
        vec![2usize, 5, 7, 3],
        vec![2, 9, 11, 32],
        vec![1, 8, 8, 320],
        vec![2, 64, 65, 32],
        vec![1, 301, 300, 5],
    ] {
        for (act, train) in [(Act::None, true), (Act::Gelu, true), (Act::Relu, false)] {
            worst = worst.max(bn_bwd_case(&shape, act, train, seed % 2 == 1, 1e-5, seed));
            seed += 1;
        }
    }
    eprintln!("batch_norm_backward shapes: worst rel err {worst:.2e}");
}

#[test]
fn batch_norm_big_grid() {
    let _g = serial();
    // The scalar elementwise kernels (64 per workgroup) need 65,600 workgroups for the 4,198,400
    // values with C = 5 (not a multiple of 4); the vec4 kernels with C = 16 take 4 rows per
    // invocation (16,400 workgroups) and check the long runs of rows at scale.
    for (shape, seed) in [([1usize, 820, 1024, 5], 1300), ([1, 1025, 1024, 16], 1310)] {
        let e1 = bn_train_case(&shape, Act::Gelu, 1.0, 1.0, 2e-6, seed);
        let e2 = bn_bwd_case(&shape, Act::Gelu, true, true, 1e-5, seed + 1);
        eprintln!("batch_norm {shape:?}: forward rel err {e1:.2e}, backward {e2:.2e}");
    }
}

#[test]
fn batch_norm_train_is_deterministic() {
    let _g = serial();
    let gpu = test_gpu();
    let shape = [2usize, 100, 101, 32];
    let mut rng = Rng::new(1400);
    let d = bn_case(&mut rng, 2 * 100 * 101, 32, 1.0, 1.0);
    let run = || {
        let tx = up(gpu, &d.x, &shape);
        let (tw, tb, trm, trv) = (
            up(gpu, &d.w, &[32]),
            up(gpu, &d.b, &[32]),
            up(gpu, &d.rm, &[32]),
            up(gpu, &d.rv, &[32]),
        );
        let mut rec = gpu.new_recorder();
        let (y, s) = batch_norm_train(
            &mut rec,
            &tx,
            BnLayer {
                w: &tw,
                b: &tb,
                running_mean: &trm,
                running_var: &trv,
            },
            0.1,
            1e-5,
            Act::None,
        )
        .unwrap();
        rec.submit().unwrap();
        (
            gpu.read(&y).unwrap(),
            gpu.read(&s.mean).unwrap(),
            gpu.read(&trv).unwrap(),
        )
    };
    assert_eq!(run(), run());
}
