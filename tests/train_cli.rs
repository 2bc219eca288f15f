//! Training and evaluation from the command line on a small generic dataset made from the real
//! nuclei image: log, checkpoints, best weights, resume (stopped or interrupted with Ctrl-C) giving
//! the same weights as an uninterrupted run, evaluation CSV checked against metrics recomputed
//! here, and the `gradients` command against the authors' training fixture.

mod common;

use common::cli::{bin, repo, run_owned, tmpdir};
use common::*;
use medfastsam::io;
use medfastsam::model::Weights;
use std::path::{Path, PathBuf};
use std::process::Command;

/// `images/<id>.png` + `masks/<id>.png` + split.json: 8 train and 2 val crops (64×64) of the
/// nuclei image with their real masks.
fn make_dataset() -> PathBuf {
    let d = tmpdir("data");
    std::fs::create_dir_all(d.join("images")).unwrap();
    std::fs::create_dir_all(d.join("masks")).unwrap();
    let img = io::load_rgb(&repo("data/dsb2018-nuclei/image.tif")).unwrap();
    let lab = io::load_gray(&repo("data/dsb2018-nuclei/labels.tif")).unwrap();
    let mut ids = Vec::new();
    for k in 0..10 {
        let (x, y) = ((k % 5) * 96, (k / 5) * 200);
        let id = format!("crop{k:02}");
        let c = img.crop(x, y, 64, 64);
        let m = lab.crop(x, y, 64, 64);
        std::fs::write(
            d.join(format!("images/{id}.png")),
            io::encode_png_rgb(&c).unwrap(),
        )
        .unwrap();
        std::fs::write(
            d.join(format!("masks/{id}.png")),
            io::encode_png_gray(&m).unwrap(),
        )
        .unwrap();
        ids.push(id);
    }
    let split = serde_json::json!({"train": ids[..8], "val": ids[8..], "test": ids[8..]});
    std::fs::write(d.join("split.json"), split.to_string()).unwrap();
    d
}

fn train_args(data: &Path, out: &Path) -> Vec<String> {
    [
        "train",
        "--data",
        data.to_str().unwrap(),
        "--format",
        "generic",
        "--preset",
        "tiny",
        "--size",
        "64",
        "--epochs",
        "2",
        "--batch",
        "2",
        "--lr",
        "1e-3",
        "--augment",
        "--seed",
        "5",
        "--out",
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn tensors(p: &Path) -> Vec<(String, Vec<f32>)> {
    let w = Weights::load(p).unwrap();
    w.tensors.into_iter().map(|(k, t)| (k, t.data)).collect()
}

#[test]
fn train_resume_and_interrupt_reproduce_the_uninterrupted_run() {
    let data = make_dataset();
    // 1. Uninterrupted: 2 epochs of 4 steps.
    let a = tmpdir("a");
    let (code, text) = run_owned(&train_args(&data, &a));
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("parameters tuned"), "{text}");
    let log = std::fs::read_to_string(a.join("log.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["epoch"], i + 1);
        assert!(l["train_loss"].as_f64().unwrap().is_finite());
        let d = l["val_dice"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&d));
    }
    assert_eq!(lines[1]["step"], 8);
    for f in [
        "checkpoint.safetensors",
        "best.safetensors",
        "final.safetensors",
    ] {
        assert!(a.join(f).exists(), "{f} missing");
    }
    let reference = tensors(&a.join("final.safetensors"));
    // Training changed the weights.
    let init = Weights::init(
        &medfastsam::model::Config::tiny()
            .with_image_size(64)
            .unwrap(),
        5,
    );
    let changed = reference
        .iter()
        .filter(|(k, v)| init.tensors.get(k).is_some_and(|t| &t.data != v))
        .count();
    assert!(changed > 100, "only {changed} tensors changed");

    // 2. Stopped after 3 steps (mid-epoch), then resumed.
    let b = tmpdir("b");
    let mut args = train_args(&data, &b);
    args.extend(["--max-steps".into(), "3".into()]);
    let (code, text) = run_owned(&args);
    assert_eq!(code, 0, "{text}");
    assert!(!b.join("final.safetensors").exists());
    let mut args = train_args(&data, &b);
    args.push("--resume".into());
    let (code, text) = run_owned(&args);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("resumed"), "{text}");
    assert_eq!(
        tensors(&b.join("final.safetensors")),
        reference,
        "resumed run differs from the uninterrupted one"
    );

    // 3. Interrupted with Ctrl-C (SIGINT) during training, then resumed.
    let c = tmpdir("c");
    let child = bin()
        .args(train_args(&data, &c))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until training has started (the log or a first step), then interrupt.
    let t0 = std::time::Instant::now();
    while !c.join("log.jsonl").exists() && t0.elapsed().as_secs() < 600 {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.code() == Some(0) {
        // Finished before the signal arrived: nothing to resume, but the result must match.
        assert_eq!(tensors(&c.join("final.safetensors")), reference);
    } else {
        assert_eq!(out.status.code(), Some(130), "{text}");
        assert!(text.contains("checkpoint written"), "{text}");
        assert!(c.join("checkpoint.safetensors").exists());
        let mut args = train_args(&data, &c);
        args.push("--resume".into());
        let (code, text) = run_owned(&args);
        assert_eq!(code, 0, "{text}");
        assert_eq!(
            tensors(&c.join("final.safetensors")),
            reference,
            "interrupted+resumed run differs"
        );
    }

    // 4. Evaluation of the trained weights: CSV rows recomputed from the written masks.
    let e = tmpdir("eval");
    let (code, text) = run_owned(&[
        "eval".into(),
        "--weights".into(),
        a.join("final.safetensors").to_str().unwrap().into(),
        "--data".into(),
        data.to_str().unwrap().into(),
        "--format".into(),
        "generic".into(),
        "--split".into(),
        "test".into(),
        "--otsu".into(),
        "--save-masks".into(),
        "--out".into(),
        e.to_str().unwrap().into(),
    ]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("Med-FastSAM: 2 images, mIoU"), "{text}");
    assert!(
        text.contains("Otsu coarse prompt alone: 2 images"),
        "{text}"
    );
    let csv = std::fs::read_to_string(e.join("scores.csv")).unwrap();
    let rows: Vec<&str> = csv.lines().skip(1).collect();
    assert_eq!(rows.len(), 2);
    for r in rows {
        let f: Vec<&str> = r.split(',').collect();
        let pred = io::load_gray(&e.join(format!("{}_mask.png", f[0]))).unwrap();
        let gt = io::load_gray(&data.join(format!("masks/{}.png", f[0]))).unwrap();
        // Model size = 64 = the image size, so the ground truth needs no resizing.
        let (mut inter, mut union, mut sp, mut sg) = (0usize, 0usize, 0usize, 0usize);
        for (p, g) in pred.data.iter().zip(&gt.data) {
            let (p, g) = (*p > 127, *g > 0);
            inter += (p && g) as usize;
            union += (p || g) as usize;
            sp += p as usize;
            sg += g as usize;
        }
        let iou = if union == 0 {
            1.0
        } else {
            inter as f64 / union as f64
        };
        let dice = if sp + sg == 0 {
            1.0
        } else {
            2.0 * inter as f64 / (sp + sg) as f64
        };
        let (ci, cd): (f64, f64) = (f[1].parse().unwrap(), f[2].parse().unwrap());
        assert!(
            (ci - iou).abs() < 1e-9 && (cd - dice).abs() < 1e-9,
            "{r}: recomputed {iou} {dice}"
        );
    }
}

#[test]
fn gradients_command_matches_the_training_fixture() {
    let d = tmpdir("grads");
    let fx = Fixture::open(fixtures_dir().join("tiny.train.safetensors"));
    let img = fx.u8("image");
    let tgt = fx.u8("target");
    let mut args: Vec<String> = vec!["gradients".into()];
    let (mut imgs, mut masks) = (Vec::new(), Vec::new());
    for b in 0..2 {
        let n = 256 * 256;
        let rgb = io::RgbImage {
            width: 256,
            height: 256,
            data: img[b * n * 3..(b + 1) * n * 3].to_vec(),
        };
        let m = io::GrayImage {
            width: 256,
            height: 256,
            data: tgt[b * n..(b + 1) * n].iter().map(|&v| v * 255).collect(),
        };
        let (ip, mp) = (
            d.join(format!("img{b}.png")),
            d.join(format!("mask{b}.png")),
        );
        std::fs::write(&ip, io::encode_png_rgb(&rgb).unwrap()).unwrap();
        std::fs::write(&mp, io::encode_png_gray(&m).unwrap()).unwrap();
        imgs.push(ip.to_str().unwrap().to_string());
        masks.push(mp.to_str().unwrap().to_string());
    }
    args.extend([
        "--weights".into(),
        fixtures_dir()
            .join("tiny.weights.safetensors")
            .to_str()
            .unwrap()
            .into(),
        "--config".into(),
        fixtures_dir()
            .join("tiny.config.json")
            .to_str()
            .unwrap()
            .into(),
    ]);
    args.push("--images".into());
    args.extend(imgs);
    args.push("--masks".into());
    args.extend(masks);
    let out = d.join("grads.safetensors");
    args.extend(["--out".into(), out.to_str().unwrap().into()]);
    let (code, text) = run_owned(&args);
    assert_eq!(code, 0, "{text}");
    let got = Fixture::open(out);
    for k in ["loss", "loss.focal", "loss.dice"] {
        let (g, w) = (got.f32(k)[0], fx.f32(k)[0]);
        assert!(((g - w) / w).abs() < 1e-4, "{k}: {g} vs {w}");
    }
    let global = [
        "grad.mask_decoder.output_hypernetworks_mlps.0.layers.2.weight",
        "grad.image_encoder.patch_embed.seq.0.c.weight",
    ]
    .iter()
    .map(|k| fx.f32(k).iter().fold(0f32, |m, v| m.max(v.abs())))
    .fold(0f32, f32::max);
    for key in [
        "grad.image_encoder.patch_embed.seq.0.c.weight",
        "grad.mask_decoder.output_hypernetworks_mlps.0.layers.2.weight",
        "grad.image_encoder.layers.2.blocks.1.attn.attention_biases_med",
        "grad.conv1_med.features1.0.weight",
    ] {
        let (g, w) = (got.f32(key), fx.f32(key));
        let e = rel(&g, &w);
        assert!(e < 1e-3, "{key}: relative error {e:.2e} (scale {global})");
    }
}
