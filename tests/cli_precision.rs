//! `--precision` on the command line: `segment` at f16 says so, holds about half the weight
//! memory, and its mask matches the f32 run's within the 0.5 % budget; `auto` is f32 on a CPU
//! adapter; a value that is not auto/f32/f16 is one clear error and no output.

mod common;

use common::cli::{Run, files_in, repo, run_split, s, tmpdir};
use common::*;

fn segment(out: &std::path::Path, precision: &str) -> Run {
    let w = fixtures_dir().join("tiny.weights.safetensors");
    let img = repo("data/he/skimage-ihc.png");
    run_split(&[
        "segment",
        s(&img),
        "--weights",
        s(&w),
        "--size",
        "128",
        "--precision",
        precision,
        "--out",
        s(out),
    ])
}

/// "N.N MB" of the `weights on device (N.N MB)` line.
fn weight_mb(r: &Run) -> f64 {
    let line = r
        .stderr
        .lines()
        .find(|l| l.contains("weights on device ("))
        .unwrap_or_else(|| panic!("no weights line:\n{}", r.all()));
    let at = line.find("weights on device (").unwrap() + "weights on device (".len();
    line[at..].split(' ').next().unwrap().parse().unwrap()
}

#[test]
fn segment_at_f16_matches_f32_within_budget() {
    let gpu = medfastsam::testutil::test_gpu();
    let mut masks = Vec::new();
    let mut mbs = Vec::new();
    for p in ["f32", "f16", "auto"] {
        let out = tmpdir(&format!("precision-{p}"));
        let r = segment(&out, p);
        assert_eq!(r.code, 0, "--precision {p}: {}", r.all());
        let said = if p == "auto" && gpu.info.device_type == wgpu::DeviceType::Cpu {
            "f32"
        } else {
            p
        };
        if p != "auto" || said == "f32" {
            assert!(
                r.stderr.contains(&format!("{said} weights on device")),
                "--precision {p}: {}",
                r.stderr
            );
        }
        mbs.push(weight_mb(&r));
        let m = medfastsam::io::load_gray(&out.join("skimage-ihc_mask.png")).unwrap();
        masks.push(m.data);
        let _ = std::fs::remove_dir_all(&out);
    }
    eprintln!("weights on device: f32 {} MB, f16 {} MB", mbs[0], mbs[1]);
    assert!(mbs[1] < mbs[0] * 0.67, "{mbs:?}");
    let differ = masks[0]
        .iter()
        .zip(&masks[1])
        .filter(|(a, b)| a != b)
        .count();
    let frac = differ as f64 / masks[0].len() as f64;
    eprintln!(
        "f16 vs f32 mask: {differ} of {} pixels differ",
        masks[0].len()
    );
    assert!(frac <= 0.005, "{frac}");
    if gpu.info.device_type == wgpu::DeviceType::Cpu {
        assert_eq!(masks[2], masks[0], "auto is f32 on a CPU adapter");
    }
}

#[test]
fn a_bad_precision_is_one_error_and_writes_nothing() {
    let out = tmpdir("precision-bad");
    let r = segment(&out, "bf16");
    assert_ne!(r.code, 0);
    assert!(!r.all().contains("panicked"), "{}", r.all());
    let lines = r.error_lines();
    assert_eq!(lines.len(), 1, "{}", r.all());
    assert!(
        lines[0].contains("bf16") && lines[0].contains("auto, f32 or f16"),
        "{}",
        lines[0]
    );
    assert!(files_in(&out).is_empty(), "{:?}", files_in(&out));
}
