//! Training under faults (issue 8): a diverging learning rate stops at the step where the loss
//! stops being finite and never replaces a good checkpoint with a bad one; SIGTERM checkpoints like
//! Ctrl-C; bad samples are all found when the dataset is opened, before any step; stale temporary
//! files of killed writers are removed from the output folder.

mod common;

use common::cli::{bin, repo, run_owned, tmpdir};
use medfastsam::io;
use medfastsam::model::Weights;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A generic dataset of `n_train` + 2 crops (64×64) of the nuclei image with their masks; the last
/// two are the val split.
fn make_dataset(name: &str, n_train: usize) -> PathBuf {
    let d = tmpdir(name);
    std::fs::create_dir_all(d.join("images")).unwrap();
    std::fs::create_dir_all(d.join("masks")).unwrap();
    let img = io::load_rgb(&repo("data/dsb2018-nuclei/image.tif")).unwrap();
    let lab = io::load_gray(&repo("data/dsb2018-nuclei/labels.tif")).unwrap();
    let mut ids = Vec::new();
    for k in 0..n_train + 2 {
        let (x, y) = ((k % 5) * 96, (k / 5) * 200);
        let id = format!("crop{k:02}");
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
    let split =
        serde_json::json!({"train": ids[..n_train], "val": ids[n_train..], "test": ids[n_train..]});
    std::fs::write(d.join("split.json"), split.to_string()).unwrap();
    d
}

fn train_args(data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "train",
        "--data",
        data.to_str().unwrap(),
        "--format",
        "generic",
        "--preset",
        "tiny",
        "--size",
        "64",
        "--batch",
        "2",
        "--seed",
        "3",
        "--out",
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn all_finite(p: &Path) -> bool {
    // Weights::load refuses non-finite tensors; a file that loads is finite.
    Weights::load(p).is_ok()
}

#[test]
fn diverging_learning_rate_stops_at_that_step_and_keeps_the_good_checkpoint() {
    let data = make_dataset("diverge", 4);
    let out = tmpdir("diverge-out");
    // A good checkpoint first (one step at a sane learning rate).
    let (code, text) = run_owned(&train_args(
        &data,
        &out,
        &["--epochs", "2", "--lr", "1e-3", "--max-steps", "1"],
    ));
    assert_eq!(code, 0, "{text}");
    let ckpt = out.join("checkpoint.safetensors");
    let good = std::fs::read(&ckpt).unwrap();

    // A fresh run into the same folder with a learning rate that diverges; checkpoints every step.
    let (code, text) = run_owned(&train_args(
        &data,
        &out,
        &["--epochs", "3", "--lr", "1e30", "--checkpoint-every", "1"],
    ));
    assert_ne!(code, 0, "diverging run reported success: {text}");
    let last = text.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("");
    assert!(
        last.starts_with("error:"),
        "last line is not the error: {text}"
    );
    assert!(
        last.contains("not finite") && last.contains("step 2") && last.contains("epoch 1"),
        "{last}"
    );
    assert!(
        last.contains("--lr") && last.contains("1e30"),
        "no hint about the learning rate: {last}"
    );
    // Nothing written from the diverged state: the good checkpoint is kept byte for byte, and no
    // best/final files exist.
    assert!(
        std::fs::read(&ckpt).unwrap() == good,
        "good checkpoint was overwritten"
    );
    assert!(!out.join("final.safetensors").exists());
    assert!(!out.join("best.safetensors").exists());
    for e in std::fs::read_dir(&out).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            assert!(all_finite(&p), "{} holds non-finite values", p.display());
        }
    }
    // The kept checkpoint resumes.
    let (code, text) = run_owned(&train_args(
        &data,
        &out,
        &["--epochs", "2", "--resume", "--max-steps", "1"],
    ));
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("resumed"), "{text}");

    // Without an earlier checkpoint: the run stops at the same step and writes no weights at all.
    let out2 = tmpdir("diverge-out2");
    let (code, text) = run_owned(&train_args(
        &data,
        &out2,
        &["--epochs", "3", "--lr", "1e30"],
    ));
    assert_ne!(code, 0, "{text}");
    assert!(text.contains("step 2"), "{text}");
    for f in [
        "checkpoint.safetensors",
        "best.safetensors",
        "final.safetensors",
    ] {
        assert!(!out2.join(f).exists(), "{f} written by a diverged run");
    }
}

#[test]
fn sigterm_writes_a_checkpoint_that_resumes() {
    let data = make_dataset("term", 4);
    let out = tmpdir("term-out");
    let mut child = bin()
        .args(train_args(
            &data,
            &out,
            &["--epochs", "1000", "--lr", "1e-3"],
        ))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the first epoch's checkpoint (training is running), then send SIGTERM.
    let ckpt = out.join("checkpoint.safetensors");
    let t0 = std::time::Instant::now();
    while !ckpt.exists() {
        assert!(t0.elapsed().as_secs() < 300, "training did not start");
        if let Some(s) = child.try_wait().unwrap() {
            panic!("training exited early: {s}");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let st = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let o = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(
        o.status.code(),
        Some(130),
        "SIGTERM did not end with a checkpoint: {:?} {text}",
        o.status
    );
    assert!(text.contains("checkpoint written"), "{text}");
    // The checkpoint holds the step the signal interrupted (the first epoch ended at step 2).
    assert!(all_finite(&ckpt));
    let w = Weights::load(&ckpt).unwrap();
    let state: serde_json::Value =
        serde_json::from_str(&w.metadata["medfastsam.train_state"]).unwrap();
    assert!(
        state["progress"]["step"].as_u64().unwrap() > 2,
        "checkpoint not written on SIGTERM: {state}"
    );
    let (code, text) = run_owned(&train_args(
        &data,
        &out,
        &[
            "--epochs",
            "1000",
            "--lr",
            "1e-3",
            "--resume",
            "--max-steps",
            "1",
        ],
    ));
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("resumed"), "{text}");
}

#[test]
fn bad_samples_are_all_listed_before_training_starts() {
    let data = make_dataset("badsamples", 6);
    // crop01: mask of another size; crop03: mask not an image; crop04: image missing its data.
    let lab = io::load_gray(&repo("data/dsb2018-nuclei/labels.tif")).unwrap();
    std::fs::write(
        data.join("masks/crop01.png"),
        io::encode_png_gray(&lab.crop(0, 0, 48, 40)).unwrap(),
    )
    .unwrap();
    std::fs::write(data.join("masks/crop03.png"), b"this is not a png").unwrap();
    std::fs::write(data.join("images/crop04.png"), b"\x89PNG\r\n\x1a\n").unwrap();
    let out = tmpdir("badsamples-out");
    let (code, text) = run_owned(&train_args(&data, &out, &["--epochs", "1", "--lr", "1e-3"]));
    assert_ne!(code, 0, "{text}");
    let err: Vec<&str> = text.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(err.len(), 1, "expected one error line: {text}");
    let e = err[0];
    assert!(e.contains("3 of 6"), "{e}");
    assert!(
        e.contains("crop01.png") && e.contains("48x40") && e.contains("64x64"),
        "{e}"
    );
    assert!(e.contains("crop03.png") && e.contains("crop04.png"), "{e}");
    assert!(!e.contains("crop00") && !e.contains("crop02"), "{e}");
    // Found before any GPU work or step.
    assert!(
        !text.contains("parameters tuned"),
        "training started: {text}"
    );
    assert!(!out.join("log.jsonl").exists());
    // The pixel budget applies at open too: every 64x64 sample is above a 1000-pixel budget.
    let o = bin()
        .args(train_args(&data, &out, &["--epochs", "1"]))
        .env("MEDFASTSAM_MAX_PIXELS", "1000")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{text}");
    assert!(
        text.contains("above the pixel budget") && !text.contains("parameters tuned"),
        "{text}"
    );
}

#[test]
fn stale_temporary_files_are_removed_on_start() {
    use medfastsam::train::remove_stale_temp_files;
    let d = tmpdir("stale");
    // pid beyond any Linux pid_max (2^22): no such process.
    let stale = d.join(".checkpoint.safetensors.99999999.tmp");
    let live = d.join(format!(
        ".checkpoint.safetensors.{}.tmp",
        std::process::id()
    ));
    let other = d.join(".notes.tmp");
    let plain = d.join("checkpoint.safetensors.99999999.tmp");
    for p in [&stale, &live, &other, &plain] {
        std::fs::write(p, b"x").unwrap();
    }
    let removed = remove_stale_temp_files(&d).unwrap();
    assert_eq!(removed, vec![stale.clone()]);
    assert!(!stale.exists() && live.exists() && other.exists() && plain.exists());
    assert!(
        remove_stale_temp_files(&d.join("missing"))
            .unwrap()
            .is_empty()
    );

    // The train command does it on start (and says so), before anything else can fail.
    std::fs::write(&stale, vec![0u8; 1000]).unwrap();
    let (code, text) = run_owned(&train_args(&d.join("no-such-data"), &d, &["--epochs", "1"]));
    assert_ne!(code, 0);
    assert!(!stale.exists(), "stale temporary file kept: {text}");
    assert!(
        text.contains("removed stale temporary file")
            && text.contains(".checkpoint.safetensors.99999999.tmp"),
        "{text}"
    );
    assert!(live.exists());
}

#[test]
fn dataset_check_parses_annotations_and_lists_every_bad_sample() {
    use medfastsam::train::datasets::{Dataset, Format, Split};
    let d = tmpdir("monuseg");
    let img = io::RgbImage {
        width: 20,
        height: 16,
        data: vec![90; 20 * 16 * 3],
    };
    let xml_ok = r#"<Annotations><Annotation><Regions><Region Id="1"><Vertices><Vertex X="2" Y="1"/><Vertex X="6" Y="1"/><Vertex X="6" Y="4"/></Vertices></Region></Regions></Annotation></Annotations>"#;
    for id in ["a", "b", "c"] {
        std::fs::write(
            d.join(format!("{id}.png")),
            io::encode_png_rgb(&img).unwrap(),
        )
        .unwrap();
        std::fs::write(d.join(format!("{id}.xml")), xml_ok).unwrap();
    }
    std::fs::write(d.join("b.xml"), r#"<Annotations><Region Id="1"><Vertices><Vertex X="2" Y="oops"/></Vertices></Region></Annotations>"#).unwrap();
    std::fs::write(d.join("c.png"), b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR").unwrap();
    let ds = Dataset::open(&d, Format::Monuseg, Split::Test).unwrap();
    assert_eq!(ds.len(), 3);
    let mut seen = 0;
    let bad = ds.check_samples(|_| seen += 1);
    assert_eq!(seen, 3);
    assert_eq!(bad.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [1, 2]);
    let e = ds.check(|_| {}).unwrap_err().to_string();
    assert!(!e.contains('\n'), "{e}");
    assert!(
        e.contains("2 of 3") && e.contains("b.xml") && e.contains("oops") && e.contains("c.png"),
        "{e}"
    );
    assert!(ds.check_sample(0).is_ok());
    // The good sample still loads.
    assert!(ds.load(0).is_ok());
}

#[test]
fn a_file_failing_mid_run_ends_it_with_a_resumable_checkpoint() {
    // A validation image whose header is intact but whose pixel data is cut: it passes the check
    // at open and fails when the first validation decodes it, after two training steps.
    let data = make_dataset("midrun", 4);
    let val_img = data.join("images/crop05.png");
    let whole = std::fs::read(&val_img).unwrap();
    std::fs::write(&val_img, &whole[..whole.len() / 2]).unwrap();
    let out = tmpdir("midrun-out");
    let (code, text) = run_owned(&train_args(&data, &out, &["--epochs", "2", "--lr", "1e-3"]));
    assert_ne!(code, 0, "{text}");
    let last = text.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("");
    assert!(
        last.starts_with("error:") && last.contains("crop05.png"),
        "{text}"
    );
    assert!(last.contains("checkpoint of step 2 is kept"), "{last}");
    let ckpt = out.join("checkpoint.safetensors");
    let w = Weights::load(&ckpt).unwrap();
    let state: serde_json::Value =
        serde_json::from_str(&w.metadata["medfastsam.train_state"]).unwrap();
    assert_eq!(state["progress"]["step"], 2, "{state}");
    // Repaired, the run continues from there to the end.
    std::fs::write(&val_img, &whole).unwrap();
    let (code, text) = run_owned(&train_args(&data, &out, &["--epochs", "2", "--resume"]));
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("resumed") && out.join("final.safetensors").exists(),
        "{text}"
    );
}

#[test]
fn a_device_lost_mid_run_keeps_the_last_good_checkpoint() {
    // The device is destroyed (as a driver reset or a device-side out-of-memory would) before the
    // third step; a checkpoint is taken every step. The run must end with an error and leave the
    // checkpoint of step 2, loadable and resumable.
    let data = make_dataset("lost", 8);
    let out = tmpdir("lost-out");
    let mut args = train_args(
        &data,
        &out,
        &["--epochs", "1", "--lr", "1e-3", "--checkpoint-every", "1"],
    );
    let o = bin()
        .args(&args)
        .env("MEDFASTSAM_TEST_LOSE_DEVICE_AFTER", "2")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let code = o.status.code().unwrap_or(-1);
    assert!(code != 0 && code != 101, "exit {code}: {text}");
    assert!(!text.contains("panicked"), "{text}");
    let last = text.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("");
    assert!(last.starts_with("error:"), "{text}");
    assert!(last.contains("checkpoint of step 2 is kept"), "{last}");
    let w = Weights::load(&out.join("checkpoint.safetensors")).unwrap();
    let state: serde_json::Value =
        serde_json::from_str(&w.metadata["medfastsam.train_state"]).unwrap();
    assert_eq!(state["progress"]["step"], 2, "{state}");
    // No temporary file is left, and the run resumes to the end on a working device.
    let leftovers: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    args.push("--resume".into());
    let (code, text) = run_owned(&args);
    assert_eq!(code, 0, "{text}");
    assert!(out.join("final.safetensors").exists(), "{text}");
}

#[test]
fn a_training_step_that_cannot_fit_is_refused_before_it_starts() {
    // The memory guard names the estimate and the limit; nothing is trained or written.
    let data = make_dataset("memguard", 4);
    let out = tmpdir("memguard-out");
    let o = bin()
        .args(train_args(&data, &out, &["--epochs", "1"]))
        .env("MEDFASTSAM_MAX_MEMORY", "16M")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && o.status.code() != Some(101),
        "{text}"
    );
    let err: Vec<&str> = text.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(err.len(), 1, "{text}");
    assert!(
        err[0].contains("not enough memory")
            && err[0].contains("training step at 64x64, batch 2")
            && err[0].contains("MEDFASTSAM_MAX_MEMORY"),
        "{text}"
    );
    assert!(!out.join("checkpoint.safetensors").exists());
    // The same estimate fits a generous limit.
    let o = bin()
        .args(train_args(&data, &out, &["--epochs", "1", "--lr", "1e-3"]))
        .env("MEDFASTSAM_MAX_MEMORY", "4G")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}
