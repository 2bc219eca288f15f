//! Many images across machines (`segment --shard i/n`, `--skip-existing`, the manifest): two
//! shards writing to one folder produce exactly the files of the unsharded run, byte for byte;
//! each input is in exactly one shard's manifest with its SHA-256; a rerun with --skip-existing
//! does nothing but record the skips, and redoes only an input whose output was removed; a
//! failing input is recorded with its error.

mod common;

use common::cli::{repo, run, s, tmpdir};
use medfastsam::io;
use std::collections::BTreeMap;
use std::path::Path;

fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            !n.starts_with("manifest")
        })
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect()
}

fn manifest_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn shards_union_equals_the_whole_run_and_skip_existing_resumes() {
    let d = tmpdir("batch");
    let inputs = d.join("inputs");
    std::fs::create_dir_all(&inputs).unwrap();
    let img = io::load_rgb(&repo("data/dsb2018-nuclei/image.tif")).unwrap();
    // Five small images (below the model's input: one forward each).
    for k in 0..5 {
        let c = img.crop(40 * k, 60 * k, 160 + 10 * k, 150);
        std::fs::write(
            inputs.join(format!("crop{k}.png")),
            io::encode_png_rgb(&c).unwrap(),
        )
        .unwrap();
    }
    let w = repo("tests/data/fixtures/tiny.weights.safetensors");
    let cfg = repo("tests/data/fixtures/tiny.config.json");
    let seg = |out: &Path, extra: &[&str]| {
        let mut a = vec![
            "segment",
            s(&inputs),
            "--weights",
            s(&w),
            "--config",
            s(&cfg),
            "--instances",
            "--out",
            s(out),
        ];
        a.extend_from_slice(extra);
        run(&a)
    };
    let whole = d.join("whole");
    let (code, text) = seg(&whole, &["--manifest"]);
    assert_eq!(code, 0, "{text}");
    let sharded = d.join("sharded");
    for sh in ["0/2", "1/2"] {
        let (code, text) = seg(&sharded, &["--shard", sh]);
        assert_eq!(code, 0, "{text}");
        assert!(text.contains(&format!("(shard {sh})")), "{text}");
    }
    let (a, b) = (files(&whole), files(&sharded));
    assert_eq!(a.len(), 5 * 4, "{:?}", a.keys());
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "the shards wrote other files"
    );
    for (k, v) in &a {
        assert!(
            b[k] == *v,
            "{k} differs between the sharded and the whole run"
        );
    }
    // Each input in exactly one shard's manifest, with its SHA-256 and its outputs.
    let m0 = manifest_lines(&sharded.join("manifest.shard-0-of-2.jsonl"));
    let m1 = manifest_lines(&sharded.join("manifest.shard-1-of-2.jsonl"));
    assert_eq!((m0.len(), m1.len()), (3, 2));
    let mut seen: Vec<String> = m0
        .iter()
        .chain(&m1)
        .map(|l| {
            let input = l["input"].as_str().unwrap().to_string();
            let bytes = std::fs::read(&input).unwrap();
            assert_eq!(
                l["sha256"].as_str().unwrap(),
                medfastsam::train::distill::sha256_hex(&bytes)
            );
            assert_eq!(l["status"], "ok");
            assert_eq!(l["outputs"].as_array().unwrap().len(), 4);
            input
        })
        .collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 5);

    // The Slurm job-array script, run as tasks 0 and 1 of 2, gives the same files (and GeoJSON).
    let slurm = d.join("slurm");
    for task in ["0", "1"] {
        let o = std::process::Command::new("bash")
            .arg(repo("deploy/slurm-segment.sh"))
            .args([s(&inputs), s(&slurm), s(&w), "--config", s(&cfg)])
            .env("SLURM_ARRAY_TASK_ID", task)
            .env("SLURM_ARRAY_TASK_COUNT", "2")
            .env(
                "MEDFASTSAM",
                format!(
                    "{} --max-pixels 100000000",
                    env!("CARGO_BIN_EXE_medfastsam")
                ),
            )
            .env("XDG_RUNTIME_DIR", "/tmp")
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "task {task}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let c = files(&slurm);
    for (k, v) in &a {
        assert!(c.get(k) == Some(v), "{k} differs in the Slurm run");
    }
    assert_eq!(c.keys().filter(|k| k.ends_with(".geojson")).count(), 5);

    // Resume: nothing to do, every input recorded as skipped.
    let (code, text) = seg(&whole, &["--skip-existing"]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("0 of 5 images segmented, 5 skipped"),
        "{text}"
    );
    // Remove one output: only that input is redone.
    std::fs::remove_file(whole.join("crop3_objects.csv")).unwrap();
    let (code, text) = seg(&whole, &["--skip-existing"]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("1 of 5 images segmented, 4 skipped"),
        "{text}"
    );
    assert_eq!(files(&whole), a, "the redone input's files differ");
    let m = manifest_lines(&whole.join("manifest.jsonl"));
    assert_eq!(m.len(), 15);
    let last: Vec<&str> = m[10..]
        .iter()
        .map(|l| l["status"].as_str().unwrap())
        .collect();
    assert_eq!(last.iter().filter(|s| **s == "ok").count(), 1, "{last:?}");

    // A corrupt input is recorded with its error; the others still run.
    std::fs::write(inputs.join("crop9.png"), b"not a png").unwrap();
    let out = d.join("failing");
    let (code, text) = seg(&out, &["--manifest"]);
    assert_eq!(code, 1, "{text}");
    let m = manifest_lines(&out.join("manifest.jsonl"));
    let bad: Vec<&serde_json::Value> = m.iter().filter(|l| l["status"] == "error").collect();
    assert_eq!(bad.len(), 1);
    assert!(
        bad[0]["input"].as_str().unwrap().ends_with("crop9.png")
            && bad[0]["error"].as_str().unwrap().contains("crop9.png"),
        "{:?}",
        bad[0]
    );
    // Bad shard specifications are refused.
    for bad in ["2/2", "x/2", "1"] {
        let (code, text) = seg(&d.join("bad"), &["--shard", bad]);
        assert_ne!(code, 0, "{bad}");
        assert!(text.contains("i/n"), "{text}");
    }
}

/// The container and CI install the same drivers: the Dockerfile's build stage runs .ci/setup and
/// its runtime stage installs every native package .ci/setup does; the Kubernetes Job's shard
/// count matches its completions.
#[test]
fn deployment_files_agree_with_the_installer() {
    let setup = std::fs::read_to_string(repo(".ci/setup")).unwrap();
    let docker = std::fs::read_to_string(repo("Dockerfile")).unwrap();
    let line = setup
        .lines()
        .find(|l| l.starts_with("pkgs=("))
        .expect(".ci/setup lists its packages in pkgs=(...)");
    let pkgs: Vec<&str> = line
        .trim_start_matches("pkgs=(")
        .trim_end_matches(')')
        .split_whitespace()
        .collect();
    assert!(!pkgs.is_empty());
    let runtime = docker.split("FROM debian").nth(1).expect("a runtime stage");
    for p in pkgs {
        assert!(
            runtime.contains(p),
            "the Dockerfile's runtime stage lacks {p}"
        );
    }
    assert!(docker.contains("bash .ci/setup"));
    let k8s = std::fs::read_to_string(repo("deploy/k8s-indexed-job.yaml")).unwrap();
    let n: usize = k8s
        .lines()
        .find_map(|l| l.trim().strip_prefix("completions:"))
        .and_then(|v| v.split('#').next())
        .map(|v| v.trim().parse().unwrap())
        .unwrap();
    assert!(
        k8s.contains(&format!("--shard \"${{JOB_COMPLETION_INDEX}}/{n}\"")),
        "the Job's --shard count differs from completions: {n}"
    );
    let o = std::process::Command::new("bash")
        .args(["-n", s(&repo("deploy/slurm-segment.sh"))])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}
