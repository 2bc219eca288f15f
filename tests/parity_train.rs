//! Training parity with the authors' PyTorch model (float64), fixture `tiny.train`: paper variant,
//! train mode (batch statistics), batch of 2 real nuclei crops with real ground truth. Checks the
//! logits, the loss and its focal/Dice parts, every parameter's gradient and the BatchNorm running
//! statistics after the step (fixtures/README.md tolerances: 1e-3 relative per tensor).

mod common;

use common::*;
use medfastsam::model::MedFastSam;
use medfastsam::model::{Config, Variant, Weights};
use medfastsam::ops::loss::{LossConfig, seg_loss};
use medfastsam::testutil::test_gpu;
use medfastsam::train::params::{ParamStore, TrainMode};

#[test]
fn tiny_train_step_matches_pytorch() {
    train_step(false);
}

/// The same step with the MBConv hidden channels processed in two groups (the path taken when the
/// hidden map exceeds a storage binding, e.g. the paper preset at 1024² with batch 4).
#[test]
fn tiny_train_step_with_grouped_mbconv_matches_pytorch() {
    train_step(true);
}

fn train_step(grouped: bool) {
    let gpu = test_gpu();
    let cfg = Config::from_file(&fixtures_dir().join("tiny.config.json")).unwrap();
    let w = Weights::load(&fixtures_dir().join("tiny.weights.safetensors")).unwrap();
    let fx = Fixture::open(fixtures_dir().join("tiny.train.safetensors"));
    let ps = ParamStore::new(gpu, &w, &cfg, Variant::Paper, TrainMode::Full).unwrap();
    let s = fx.shape("image");
    let px = gpu
        .upload_u32(&pack_rgb(&fx.u8("image")), &[s[0], s[1], s[2]])
        .unwrap();
    let target: Vec<f32> = fx.u8("target").iter().map(|&v| v as f32).collect();
    let target = gpu.upload(&target, &[s[0], s[1], s[2], 1]).unwrap();

    let mut rec = gpu.new_recorder();
    // the grouped path: at least two hidden-channel groups in every MBConv of this recording
    rec.plan.min_mbconv_groups = if grouped { 2 } else { 0 };
    ps.zero_grads(&mut rec);
    let model = MedFastSam::from_params(&ps).unwrap();
    let (out, saved) = model.forward_train(&mut rec, &px).unwrap();
    let (loss, dlogits) = seg_loss(&mut rec, &out.logits, &target, &LossConfig::default()).unwrap();
    model.backward(&mut rec, saved, &dlogits).unwrap();
    rec.submit().unwrap();

    let logits = gpu.read(&out.logits).unwrap();
    let e = rel(&logits, &fx.f32("logits"));
    eprintln!("logits rel err {e:.2e}");
    assert!(e <= 2e-3);
    let l = gpu.read(&loss).unwrap();
    let want = [
        fx.f32("loss")[0],
        fx.f32("loss.focal")[0],
        fx.f32("loss.dice")[0],
    ];
    eprintln!("loss {l:?} vs PyTorch {want:?}");
    for i in 0..3 {
        assert!(
            ((l[i] - want[i]) / want[i]).abs() < 1e-4,
            "loss component {i}: {} vs {}",
            l[i],
            want[i]
        );
    }

    // Reference gradients of every trainable tensor, and their overall scale.
    let mut pairs = Vec::new();
    for (k, g) in &ps.grads {
        let key = format!("grad.{k}");
        assert!(fx.has(&key), "fixture lacks {key}");
        pairs.push((k.clone(), gpu.read(g).unwrap(), fx.f32(&key)));
    }
    let global = pairs
        .iter()
        .flat_map(|p| p.2.iter())
        .fold(0f32, |m, v| m.max(v.abs())) as f64;
    let mut worst = (String::new(), 0.0f64);
    let mut errs = Vec::new();
    let (mut zero, mut structural_zero) = (0, 0);
    for (k, got, want) in &pairs {
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
        let abs = got
            .iter()
            .zip(want)
            .fold(0f64, |m, (a, b)| m.max((*a as f64 - *b as f64).abs()));
        if scale == 0.0 {
            // A parameter that does not influence the loss: our gradient is exactly zero too.
            assert!(
                abs == 0.0,
                "{k}: PyTorch gradient is zero, ours reaches {abs:e}"
            );
            zero += 1;
            continue;
        }
        if scale < 1e-12 * global {
            // Mathematically zero (e.g. a key bias under softmax, a bias before a training-mode
            // BatchNorm): the float64 reference holds rounding noise of ~1e-19; ours must be
            // rounding noise at f32 scale.
            assert!(
                abs <= 1e-6 * global,
                "{k}: structurally zero gradient reaches {abs:e}"
            );
            structural_zero += 1;
            continue;
        }
        let e = abs / scale;
        errs.push(e);
        if e > worst.1 {
            worst = (k.clone(), e);
        }
        if e > 1e-3 {
            eprintln!(
                "{k}: rel err {e:.3e}; got {:?} want {:?}",
                &got[..4.min(got.len())],
                &want[..4.min(want.len())]
            );
        }
    }
    assert!(
        worst.1 <= 1e-3,
        "worst gradient {}: relative error {:.3e}",
        worst.0,
        worst.1
    );
    errs.sort_by(|a, b| a.partial_cmp(b).unwrap());
    eprintln!(
        "{} gradients within 1e-3: median rel err {:.2e}, worst {:.2e} ({}); {zero} exactly zero, {structural_zero} \
         mathematically zero (|ref| < 1e-12 of the largest gradient {global:.3e})",
        errs.len(),
        errs[errs.len() / 2],
        worst.1,
        worst.0
    );

    let mut n_stats = 0;
    let mut worst_stat = 0.0f64;
    for (k, t) in &ps.values {
        if !(k.ends_with("running_mean") || k.ends_with("running_var")) {
            continue;
        }
        let key = format!("after.{k}");
        assert!(fx.has(&key), "fixture lacks {key}");
        let e = rel(&gpu.read(t).unwrap(), &fx.f32(&key));
        worst_stat = worst_stat.max(e);
        assert!(e <= 1e-3, "{k}: running statistic relative error {e:.3e}");
        n_stats += 1;
    }
    eprintln!("{n_stats} BatchNorm running statistics, worst rel err {worst_stat:.2e}");
}
