//! `bench --weights FILE`: the forward benchmark runs the file's weights at the file's
//! configuration (what `scripts/bench-peers.sh` relies on to time PyTorch and this engine on one
//! set of weights), and a missing or unreadable file is one error naming it.

mod common;

use common::cli::{run_split, s, tmpdir};
use common::fixtures_dir;

/// One 64² forward, nothing else.
const QUICK: [&str; 7] = [
    "bench",
    "--sizes",
    "64",
    "--reps",
    "1",
    "--no-kernels",
    "--no-train",
];

fn bench_json(extra: &[&str]) -> serde_json::Value {
    let args = [&QUICK[..], &["--json"], extra].concat();
    let r = run_split(&args);
    assert_eq!(r.code, 0, "{}", r.all());
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}:\n{}", r.all()))
}

#[test]
fn bench_weights_runs_the_files_configuration() {
    let _g = common::serial();
    let w = fixtures_dir().join("tiny.weights.safetensors");
    let file = bench_json(&["--weights", s(&w)]);
    let tiny = bench_json(&["--preset", "tiny"]);
    let paper = bench_json(&["--preset", "paper"]);
    let m = |v: &serde_json::Value, k: &str| v["models"][0][k].as_f64().unwrap();
    // The file is the tiny configuration: its GEMM work and dispatch count are the tiny preset's,
    // not those of the default --preset paper.
    assert_eq!(m(&file, "gemm_gflop"), m(&tiny, "gemm_gflop"));
    assert_eq!(m(&file, "dispatches"), m(&tiny, "dispatches"));
    assert_ne!(m(&file, "gemm_gflop"), m(&paper, "gemm_gflop"));
    assert_eq!(m(&file, "weight_bytes"), m(&tiny, "weight_bytes"));
    assert_ne!(m(&file, "weight_bytes"), m(&paper, "weight_bytes"));
}

#[test]
fn bench_weights_errors_name_the_file() {
    let dir = tmpdir("bench_weights_errors");
    let missing = dir.join("nope.safetensors");
    let garbage = dir.join("garbage.safetensors");
    std::fs::write(&garbage, b"not a safetensors file at all").unwrap();
    for (f, what) in [
        (&missing, "nope.safetensors"),
        (&garbage, "garbage.safetensors"),
    ] {
        let r = run_split(&[&QUICK[..], &["--weights", s(f)]].concat());
        assert_ne!(r.code, 0, "{}", r.all());
        assert!(r.stdout.is_empty(), "{}", r.all());
        let errors = r.error_lines();
        assert_eq!(errors.len(), 1, "{}", r.all());
        assert!(errors[0].contains(what), "{}", r.all());
    }
}
