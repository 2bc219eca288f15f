//! Adam / AdamW kernel vs the CPU f64 reference over several steps, per step (from the same state)
//! and along a whole trajectory, on awkward sizes and a grid past 65,535 workgroups.

use medfastsam::ops::optim::{AdamConfig, adam_step};
use medfastsam::ops::reference::optim as ro;
use medfastsam::testutil::{Rng, assert_close, rel_err, test_gpu, to_f64};
mod common;
use common::serial;

fn worst_update() -> &'static std::thread::LocalKey<std::cell::Cell<f64>> {
    thread_local!(static W: std::cell::Cell<f64> = const { std::cell::Cell::new(0.0) });
    &W
}

/// Runs `steps` steps; returns the worst per-step errors (update, m, v) and the trajectory error.
fn run(n: usize, cfg: AdamConfig, steps: u32, seed: u64) -> (f64, f64) {
    let gpu = test_gpu();
    let mut rng = Rng::new(seed);
    let p0 = rng.vec(n);
    let tp = gpu.upload(&p0, &[n]).unwrap();
    let tm = gpu.upload(&vec![0.0; n], &[n]).unwrap();
    let tv = gpu.upload(&vec![0.0; n], &[n]).unwrap();
    // Trajectory of the f64 reference from the same start.
    let (mut rp, mut rm, mut rv) = (to_f64(&p0), vec![0.0; n], vec![0.0; n]);
    let mut worst_step: f64 = 0.0;
    for t in 1..=steps {
        // Gradients of mixed magnitude, some exactly zero.
        let g: Vec<f32> = (0..n)
            .map(|i| {
                if i % 17 == 3 {
                    0.0
                } else {
                    (rng.normal() * 10f64.powf(rng.range(-4.0, 1.0))) as f32
                }
            })
            .collect();
        let tg = gpu.upload(&g, &[n]).unwrap();
        let (sp, sm, sv) = (
            gpu.read(&tp).unwrap(),
            gpu.read(&tm).unwrap(),
            gpu.read(&tv).unwrap(),
        );
        let mut rec = gpu.new_recorder();
        adam_step(&mut rec, &tp, &tm, &tv, &tg, &cfg, t).unwrap();
        rec.submit().unwrap();
        let (np, nm, nv) = (
            gpu.read(&tp).unwrap(),
            gpu.read(&tm).unwrap(),
            gpu.read(&tv).unwrap(),
        );
        // One reference step from the GPU's state: compare the update itself.
        let (mut ep, mut em, mut ev) = (to_f64(&sp), to_f64(&sm), to_f64(&sv));
        ro::adam_step(&mut ep, &mut em, &mut ev, &to_f64(&g), &cfg, t);
        let got_d: Vec<f32> = np.iter().zip(&sp).map(|(a, b)| a - b).collect();
        let want_d: Vec<f64> = ep.iter().zip(&sp).map(|(a, &b)| a - b as f64).collect();
        let what = format!("adam n={n} step {t} {cfg:?}");
        // The update is rounded once more when added to p: allow that, relative to max |p|.
        let pscale = sp.iter().fold(0.0f32, |m, x| m.max(x.abs())) as f64;
        let dscale = want_d.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        let tol_d = 1e-5 + 3e-7 * pscale / dscale.max(1e-30);
        assert_close(&format!("{what} update"), &got_d, &want_d, tol_d);
        assert_close(&format!("{what} m"), &nm, &em, 1e-6);
        assert_close(&format!("{what} v"), &nv, &ev, 1e-6);
        worst_step = worst_step.max(rel_err(&nm, &em)).max(rel_err(&nv, &ev));
        worst_update().with(|w| w.set(w.get().max(rel_err(&got_d, &want_d))));
        ro::adam_step(&mut rp, &mut rm, &mut rv, &to_f64(&g), &cfg, t);
    }
    let fp = gpu.read(&tp).unwrap();
    assert_close(&format!("adam n={n} trajectory {cfg:?}"), &fp, &rp, 1e-5);
    (worst_step, rel_err(&fp, &rp))
}

#[test]
fn adam_matches_reference_over_steps() {
    let _g = serial();
    let mut ws: f64 = 0.0;
    let mut wt: f64 = 0.0;
    let configs = [
        AdamConfig {
            lr: 1e-3,
            ..Default::default()
        },
        AdamConfig {
            lr: 1e-2,
            weight_decay: 0.01,
            ..Default::default()
        },
        AdamConfig {
            lr: 3e-4,
            weight_decay: 0.05,
            grad_scale: 0.25,
            ..Default::default()
        },
        AdamConfig {
            lr: 1e-3,
            beta1: 0.8,
            beta2: 0.99,
            eps: 1e-6,
            ..Default::default()
        },
    ];
    let mut seed = 1;
    for cfg in configs {
        for n in [1usize, 7, 1000, 65_537] {
            let (s, t) = run(n, cfg, 6, seed);
            ws = ws.max(s);
            wt = wt.max(t);
            seed += 1;
        }
    }
    let wu = worst_update().with(|w| w.get());
    eprintln!(
        "adam: worst per-step update rel err {wu:.2e}, m/v {ws:.2e}; worst 6-step trajectory rel err {wt:.2e}"
    );
}

#[test]
fn adam_grid_beyond_65535_workgroups() {
    let _g = serial();
    // 4,194,307 parameters: 65,537 workgroups of 64.
    let (s, t) = run(
        4_194_307,
        AdamConfig {
            lr: 1e-3,
            weight_decay: 0.01,
            ..Default::default()
        },
        2,
        50,
    );
    eprintln!("adam 4194307: per-step rel err {s:.2e}, trajectory {t:.2e}");
}

#[test]
fn adam_rejects_mismatched_sizes() {
    let _g = serial();
    let gpu = test_gpu();
    let a = gpu.upload(&[0.0; 4], &[4]).unwrap();
    let b = gpu.upload(&[0.0; 5], &[5]).unwrap();
    let mut rec = gpu.new_recorder();
    assert!(adam_step(&mut rec, &a, &a, &a, &b, &AdamConfig::default(), 1).is_err());
    assert!(adam_step(&mut rec, &a, &a, &a, &a, &AdamConfig::default(), 0).is_err());
}
