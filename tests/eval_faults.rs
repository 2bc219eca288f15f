//! Evaluation under faults (issue 8): non-finite logits are an error naming the image, never a
//! score; a bad sample does not lose the others (they are scored and written, the bad ones listed,
//! exit non-zero); stale temporary files of killed writers are removed from the output folder.

mod common;

use common::cli::{Run, bin, repo, run_split, tmpdir};
use medfastsam::io;
use medfastsam::model::weights::Stored;
use medfastsam::model::{Config, Variant, Weights};
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    repo("tests/data/fixtures").join(name)
}

/// Generic dataset of `n` crops (64×64) of the nuclei image, all in the test split.
fn make_dataset(name: &str, n: usize) -> PathBuf {
    let d = tmpdir(name);
    std::fs::create_dir_all(d.join("images")).unwrap();
    std::fs::create_dir_all(d.join("masks")).unwrap();
    let img = io::load_rgb(&repo("data/dsb2018-nuclei/image.tif")).unwrap();
    let lab = io::load_gray(&repo("data/dsb2018-nuclei/labels.tif")).unwrap();
    let mut ids = Vec::new();
    for k in 0..n {
        let (x, y) = ((k % 5) * 96, (k / 5) * 200);
        let id = format!("case{k}");
        std::fs::write(
            d.join(format!("images/{id}.png")),
            io::encode_png_rgb(&img.crop(x, y, 64, 64)).unwrap(),
        )
        .unwrap();
        std::fs::write(
            d.join(format!("masks/{id}.png")),
            io::encode_png_gray(&lab.crop(x, y, 64, 64)).unwrap(),
        )
        .unwrap();
        ids.push(id);
    }
    std::fs::write(
        d.join("split.json"),
        serde_json::json!({"test": ids}).to_string(),
    )
    .unwrap();
    d
}

fn eval_args<'a>(weights: &'a str, config: &'a str, data: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "eval",
        "--weights",
        weights,
        "--config",
        config,
        "--size",
        "64",
        "--data",
        data,
        "--format",
        "generic",
        "--split",
        "test",
        "--out",
        out,
        "--save-masks",
    ]
}

fn csv_ids(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.split(',').next().unwrap().to_string())
        .collect()
}

#[test]
fn huge_weights_give_an_error_naming_the_image_not_a_score() {
    let d = tmpdir("huge");
    let cfg = Config::from_file(&fixture("tiny.config.json")).unwrap();
    let mut w = Weights::load(&fixture("tiny.weights.safetensors")).unwrap();
    for t in w.tensors.values_mut() {
        if t.stored != Stored::I64 {
            t.data.iter_mut().for_each(|v| *v *= 1e15);
        }
    }
    let wp = d.join("huge.safetensors");
    w.save(&wp, &cfg, Variant::Paper, false).unwrap();
    let data = make_dataset("huge-data", 2);
    let out = d.join("out");
    let Run {
        code,
        stdout,
        stderr,
    } = run_split(&eval_args(
        wp.to_str().unwrap(),
        fixture("tiny.config.json").to_str().unwrap(),
        data.to_str().unwrap(),
        out.to_str().unwrap(),
    ));
    assert_ne!(
        code, 0,
        "non-finite logits scored as success: {stdout}{stderr}"
    );
    for id in ["case0", "case1"] {
        assert!(
            stderr
                .lines()
                .any(|l| l.contains(&format!("{id}.png")) && l.contains("not finite")),
            "{id} not named with the problem: {stderr}"
        );
    }
    // Never a score, never a mask.
    assert!(!stdout.contains("Dice 0.0000"), "{stdout}");
    assert!(!out.join("case0_mask.png").exists() && !out.join("case1_mask.png").exists());
    if out.join("scores.csv").exists() {
        assert!(csv_ids(&out.join("scores.csv")).is_empty());
    }
}

#[test]
fn a_bad_sample_does_not_lose_the_scores_of_the_others() {
    let data = make_dataset("bad", 4);
    let lab = io::load_gray(&repo("data/dsb2018-nuclei/labels.tif")).unwrap();
    std::fs::write(
        data.join("masks/case1.png"),
        io::encode_png_gray(&lab.crop(0, 0, 32, 64)).unwrap(),
    )
    .unwrap();
    std::fs::write(data.join("masks/case2.png"), b"garbage").unwrap();
    let out = tmpdir("bad-out");
    // Left by a writer killed with -9: removed on start. One of a live process (this test) stays.
    let stale = out.join(".scores.csv.99999999.tmp");
    let live = out.join(format!(".scores.csv.{}.tmp", std::process::id()));
    std::fs::write(&stale, b"partial").unwrap();
    std::fs::write(&live, b"partial").unwrap();
    let Run {
        code,
        stdout,
        stderr,
    } = run_split(&eval_args(
        fixture("tiny.weights.safetensors").to_str().unwrap(),
        fixture("tiny.config.json").to_str().unwrap(),
        data.to_str().unwrap(),
        out.to_str().unwrap(),
    ));
    assert_ne!(code, 0, "{stdout}{stderr}");
    // The good samples are scored and written.
    assert_eq!(
        csv_ids(&out.join("scores.csv")),
        ["case0", "case3"],
        "{stderr}"
    );
    assert!(out.join("case0_mask.png").exists() && out.join("case3_mask.png").exists());
    assert!(stdout.contains("Med-FastSAM: 2 images"), "{stdout}");
    // The bad ones are listed, naming the file and the problem, and the last line says what happened.
    assert!(
        stderr.contains("case1.png") && stderr.contains("32x64") && stderr.contains("64x64"),
        "{stderr}"
    );
    assert!(stderr.contains("case2.png"), "{stderr}");
    let last = stderr.lines().rfind(|l| !l.trim().is_empty()).unwrap();
    assert!(
        last.starts_with("error:") && last.contains("2 of 4"),
        "{last}"
    );
    let unscored = std::fs::read_to_string(out.join("unscored.csv")).unwrap();
    assert_eq!(
        unscored
            .lines()
            .skip(1)
            .map(|l| l.split(',').next().unwrap())
            .collect::<Vec<_>>(),
        ["case1", "case2"]
    );
    assert!(!stale.exists(), "stale temporary file kept: {stderr}");
    assert!(live.exists());
    assert!(stderr.contains("removed stale temporary file"), "{stderr}");
}

#[test]
fn an_evaluation_that_cannot_fit_is_refused_before_any_image() {
    let d = tmpdir("memguard");
    let data = make_dataset("memguard-data", 2);
    let out = d.join("out");
    let w = fixture("tiny.weights.safetensors");
    let c = fixture("tiny.config.json");
    let args = eval_args(
        w.to_str().unwrap(),
        c.to_str().unwrap(),
        data.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    let o = bin()
        .args(&args)
        .env("MEDFASTSAM_MAX_MEMORY", "4M")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && o.status.code() != Some(101),
        "{stderr}"
    );
    assert!(
        stderr.contains("not enough memory") && stderr.contains("forward at 64x64"),
        "{stderr}"
    );
    assert!(!out.join("scores.csv").exists() && !out.join("case0_mask.png").exists());
}
