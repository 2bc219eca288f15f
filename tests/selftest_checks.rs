//! The self-test's training-kernel and model checks (src/selftest/checks): every one passes on
//! the test adapter, an injected fault in a backward check and in the training step is reported
//! out_of_tolerance, the embedded tiny fixture is there and can be written out, and a missing
//! fixture (browser without `tiny_fixture`, or an empty folder) skips rather than fails.

use medfastsam::selftest::{self, CheckRecord, Options, Verdict};
use medfastsam::testutil::test_gpu;

/// The training-kernel checks of quick mode.
const NEW: &[&str] = &[
    "attention.window",
    "attention.window_backward",
    "attention.mha_backward",
    "attention.mha_backward_few_keys",
    "norm.layer_norm_backward",
    "norm.layer_norm_backward_odd_c",
    "norm.batch_norm_train",
    "norm.batch_norm_backward",
    "elementwise.gelu_backward",
    "loss.focal_dice",
    "conv.backward",
    "conv.backward_1x1",
    "depthwise.backward",
    "conv.transpose2x2",
    "conv.transpose2x2_backward",
    "pe.random",
    "f16.storage",
];

fn run(opts: &Options) -> Vec<CheckRecord> {
    selftest::run_checks(test_gpu(), opts, |r| {
        eprintln!(
            "{:<34} {:<16} err {:>10} tol {:.0e} ms {:>9} {}",
            r.name,
            r.verdict.name(),
            r.max_rel_err.map_or("-".into(), |e| format!("{e:.2e}")),
            r.tolerance,
            r.ms.map_or("-".into(), |m| format!("{m:.2}")),
            r.message.as_deref().unwrap_or("")
        )
    })
}

fn only(name: &str) -> Options {
    Options {
        only: Some(name.into()),
        ..Default::default()
    }
}

#[test]
fn every_training_kernel_check_passes() {
    let names = selftest::check_names(&Options::default());
    for n in NEW {
        assert!(names.iter().any(|m| m == n), "quick mode lacks {n}");
    }
    let mut recs = Vec::new();
    for prefix in [
        "attention.",
        "norm.",
        "elementwise.",
        "loss.",
        "conv.",
        "depthwise.",
        "pe.",
        "f16.",
    ] {
        recs.extend(run(&only(prefix)));
    }
    for n in NEW {
        let r = recs
            .iter()
            .find(|r| r.name == *n)
            .unwrap_or_else(|| panic!("{n} did not run"));
        if *n == "f16.storage" && !test_gpu().features.contains(wgpu::Features::SHADER_F16) {
            assert_eq!(r.verdict, Verdict::Skipped, "{n}: {:?}", r.message);
            continue;
        }
        assert_eq!(r.verdict, Verdict::Pass, "{n}: {:?}", r.message);
        assert!(r.max_rel_err.is_some_and(|e| e <= r.tolerance), "{n}");
        assert!(!r.entry.is_empty(), "{n}: no entry point traced");
    }
}

#[test]
fn the_model_checks_pass_from_the_embedded_fixture() {
    let bytes = selftest::embedded_tiny_fixture().expect("the fixture is embedded");
    assert!(
        bytes.len() > 1_000_000 && bytes.len() < 32_000_000,
        "{}",
        bytes.len()
    );
    // The training step runs in full mode only (about 25 s here).
    assert!(!selftest::check_names(&Options::default()).contains(&"model.tiny_train_step".into()));
    let opts = Options {
        full: true,
        ..only("model.tiny_")
    };
    let recs = run(&opts);
    let names: Vec<&str> = recs.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "model.tiny_paper",
            "model.tiny_released",
            "model.tiny_train_step"
        ]
    );
    for r in &recs {
        assert_eq!(r.verdict, Verdict::Pass, "{}: {:?}", r.name, r.message);
    }
}

#[test]
fn the_fixture_given_as_bytes_is_used() {
    let d = std::env::temp_dir().join(format!("medfastsam-selftest-checks-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    let path = d.join("tiny.selftest.safetensors");
    let n = selftest::write_tiny_fixture(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(bytes.len(), n);
    let opts = Options {
        tiny_fixture: Some(std::sync::Arc::new(bytes)),
        ..only("model.tiny_paper")
    };
    let recs = run(&opts);
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].verdict, Verdict::Pass, "{:?}", recs[0].message);
    // Not a fixture: the check fails (a device error), it does not panic.
    let opts = Options {
        tiny_fixture: Some(std::sync::Arc::new(b"not safetensors".to_vec())),
        ..only("model.tiny_paper")
    };
    let recs = run(&opts);
    assert_eq!(
        recs[0].verdict,
        Verdict::DeviceError,
        "{:?}",
        recs[0].message
    );
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn a_folder_without_the_fixture_skips_the_model_checks() {
    let opts = Options {
        fixtures: Some(std::env::temp_dir().join("medfastsam-no-such-fixture-folder")),
        full: true,
        ..only("model.tiny_")
    };
    let recs = run(&opts);
    assert_eq!(recs.len(), 3);
    for r in &recs {
        assert_eq!(r.verdict, Verdict::Skipped, "{}", r.name);
        assert!(
            r.message
                .as_deref()
                .unwrap_or("")
                .contains("fixture not found"),
            "{:?}",
            r.message
        );
    }
}

#[test]
fn injected_faults_are_out_of_tolerance() {
    for name in ["norm.layer_norm_backward", "model.tiny_train_step"] {
        let opts = Options {
            fault: Some(name.into()),
            full: name.starts_with("model"),
            ..only(name)
        };
        let recs = run(&opts);
        let r = recs.iter().find(|r| r.name == name).unwrap();
        assert_eq!(r.verdict, Verdict::OutOfTolerance, "{name}");
        let msg = r.message.as_deref().unwrap_or("");
        assert!(msg.contains("relative error"), "{msg}");
        // The first part (dx, the loss) is the perturbed one and is named.
        let part = if name.starts_with("model") {
            "(loss)"
        } else {
            "(dx)"
        };
        assert!(msg.contains(part), "{msg}");
    }
}
