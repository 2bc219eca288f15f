//! What the command line says, and only that: no window-system noise on a GPU run (the
//! environment has no `XDG_RUNTIME_DIR`, as under cron or ssh), every error said once, and a bad
//! `--backend` / `--adapter` is an error in every command, `info` included; a bad
//! `MEDFASTSAM_COMPILE_THREADS` is a warning, said once.

mod common;

use common::cli::{Run, finish, repo, tmpdir};
use common::*;
use std::process::Command;

/// Runs the tool with `XDG_RUNTIME_DIR` (and the switches of the device-select layer) removed,
/// which is why it does not start from [`common::cli::bin`].
fn run_env(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut c = Command::new(env!("CARGO_BIN_EXE_medfastsam"));
    c.args(args)
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("NODEVICE_SELECT")
        .env_remove("MESA_VK_DEVICE_SELECT")
        .env_remove("MEDFASTSAM_BACKEND")
        .env_remove("MEDFASTSAM_ADAPTER")
        .env_remove("WGPU_BACKEND");
    for (k, v) in env {
        c.env(k, v);
    }
    finish(&mut c)
}

fn run(args: &[&str]) -> Run {
    run_env(args, &[])
}

fn weights() -> String {
    fixtures_dir()
        .join("tiny.weights.safetensors")
        .to_string_lossy()
        .into_owned()
}

/// `segment` of the IHC image with the tiny weights at 64² into `out`, with `env` set.
fn segment_tiny(out: &std::path::Path, env: &[(&str, &str)]) -> Run {
    let img = repo("data/he/skimage-ihc.png");
    run_env(
        &[
            "segment",
            img.to_str().unwrap(),
            "--weights",
            &weights(),
            "--size",
            "64",
            "--out",
            out.to_str().unwrap(),
        ],
        env,
    )
}

/// One `error:` line, exit non-zero, no panic, the line mentions every needle; returns the line.
fn one_error(r: &Run, needles: &[&str]) -> String {
    assert_ne!(r.code, 0, "expected failure:\n{}", r.all());
    assert!(!r.all().contains("panicked"), "panic:\n{}", r.all());
    let lines = r.error_lines();
    assert_eq!(lines.len(), 1, "expected one error line:\n{}", r.all());
    for n in needles {
        assert!(
            lines[0].contains(n),
            "error line should mention '{n}': {}",
            lines[0]
        );
    }
    lines[0].to_string()
}

/// No segment of "a: b: c" comes twice.
fn assert_says_each_thing_once(line: &str) {
    let parts: Vec<&str> = line
        .trim_start_matches("error: ")
        .split(": ")
        .map(str::trim)
        .collect();
    for (i, p) in parts.iter().enumerate() {
        assert!(!parts[..i].contains(p), "'{p}' said twice in: {line}");
    }
    assert!(
        line.matches("os error").count() <= 1,
        "cause said twice: {line}"
    );
}

#[test]
fn gpu_run_without_xdg_runtime_dir_prints_no_window_system_noise() {
    let w = weights();
    let r = run(&["info", &w]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(r.stdout.contains("adapter:"), "{}", r.all());
    assert!(
        !r.all().contains("XDG_RUNTIME_DIR"),
        "window-system noise:\n{}",
        r.all()
    );
    assert!(
        !r.all().contains("error:"),
        "an 'error:' on success:\n{}",
        r.all()
    );

    // A command that computes on the GPU: a forward of the tiny model on a small image.
    let out = tmpdir("segment");
    let r = segment_tiny(&out, &[]);
    let _ = std::fs::remove_dir_all(&out);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(
        !r.all().contains("XDG_RUNTIME_DIR"),
        "window-system noise:\n{}",
        r.all()
    );
    assert!(
        !r.all().contains("error:"),
        "an 'error:' on success:\n{}",
        r.all()
    );
}

#[test]
fn a_bad_backend_is_an_error_in_every_command() {
    let w = weights();
    let out = tmpdir("backend");
    let o = out.to_str().unwrap();
    let img = repo("data/he/skimage-ihc.png");
    let img = img.to_str().unwrap();
    for args in [
        vec!["--backend", "bogus", "info", &w],
        vec!["info", &w, "--backend", "bogus"],
        vec![
            "segment",
            img,
            "--weights",
            &w,
            "--out",
            o,
            "--backend",
            "bogus",
        ],
        vec![
            "bench",
            "--preset",
            "tiny",
            "--sizes",
            "64",
            "--reps",
            "1",
            "--no-kernels",
            "--no-train",
            "--backend",
            "bogus",
        ],
        vec![
            "gradients",
            "--weights",
            &w,
            "--images",
            img,
            "--masks",
            img,
            "--out",
            o,
            "--backend",
            "bogus",
        ],
    ] {
        let r = run(&args);
        let line = one_error(&r, &["bogus", "backend"]);
        assert!(!line.contains("adapter:"), "{line}");
    }
    // The environment's choice is checked too (before: WGPU_BACKEND=bogus gave no backend at all
    // and `info` reported "adapter: none", exit 0).
    for var in ["MEDFASTSAM_BACKEND", "WGPU_BACKEND"] {
        let r = run_env(&["info", &w], &[(var, "bogus")]);
        one_error(&r, &["bogus"]);
    }
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn an_adapter_that_matches_nothing_is_an_error_listing_the_adapters() {
    let w = weights();
    let r = run(&["--adapter", "xyz-no-such-gpu", "info", &w]);
    let line = one_error(&r, &["no adapter matches 'xyz-no-such-gpu'"]);
    assert_says_each_thing_once(&line);
    let r = run(&["info", &w, "--adapter", "99"]);
    one_error(&r, &["'99'"]);
    let out = tmpdir("adapter");
    let img = repo("data/he/skimage-ihc.png");
    let r = run(&[
        "segment",
        img.to_str().unwrap(),
        "--weights",
        &w,
        "--out",
        out.to_str().unwrap(),
        "--adapter",
        "xyz-no-such-gpu",
    ]);
    one_error(&r, &["xyz-no-such-gpu"]);
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn io_errors_say_their_cause_once() {
    // Root may write anywhere, so the failure is provoked with a path under a regular file.
    let d = tmpdir("io");
    let file = d.join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    let under = file.join("sub");
    let under = under.to_str().unwrap();
    let w = weights();
    let img = repo("data/he/skimage-ihc.png");
    let cases: Vec<Vec<&str>> = vec![
        vec!["info", under],
        vec!["info", &w, "--config", under],
        vec![
            "segment",
            img.to_str().unwrap(),
            "--weights",
            under,
            "--out",
            d.to_str().unwrap(),
        ],
        vec![
            "segment",
            img.to_str().unwrap(),
            "--weights",
            &w,
            "--out",
            under,
        ],
    ];
    for args in cases {
        let r = run(&args);
        let line = one_error(&r, &["plain-file"]);
        assert_says_each_thing_once(&line);
    }
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn report_joins_the_chain_saying_each_thing_once() {
    use medfastsam::error::{Error, report};

    #[derive(Debug)]
    struct Wrap(String, Option<Box<dyn std::error::Error + 'static>>);
    impl std::fmt::Display for Wrap {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.0)
        }
    }
    impl std::error::Error for Wrap {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref()
        }
    }

    // Before: "out/x: Permission denied (os error 13): Permission denied (os error 13)".
    let e = Error::io("out/x", std::io::Error::from_raw_os_error(13));
    let r = report(&e);
    assert_eq!(r.matches("os error 13").count(), 1, "{r}");
    assert!(r.starts_with("out/x: "), "{r}");

    // A context whose text already holds its cause.
    let inner = Error::Config("image_size 5 is not a multiple of 16".into());
    let outer = Wrap(format!("cfg.json: {inner}"), Some(Box::new(inner)));
    assert_eq!(
        report(&outer),
        "cfg.json: configuration: image_size 5 is not a multiple of 16"
    );
    // A cause not yet said is appended.
    let fresh = Wrap(
        "loading".into(),
        Some(Box::new(Wrap("disk full".into(), None))),
    );
    assert_eq!(report(&fresh), "loading: disk full");
    // One line, and neighbours said once.
    let lines = Wrap(
        "Validation Error\n\nCaused by:\n  bad binding\n".into(),
        None,
    );
    assert_eq!(report(&lines), "Validation Error: bad binding");
    let twice = Wrap("configuration: configuration: x".into(), None);
    assert_eq!(report(&twice), "configuration: x");

    // Through anyhow, as the command line prints it.
    let e = anyhow::Error::from(Error::io(
        "w.safetensors",
        std::io::Error::from_raw_os_error(2),
    ))
    .context("loading the weights");
    let r = report(e.as_ref());
    assert_eq!(r.matches("os error 2").count(), 1, "{r}");
    assert!(r.starts_with("loading the weights: w.safetensors: "), "{r}");
}

#[test]
fn a_closed_stdout_ends_a_command_quietly_instead_of_panicking() {
    // `medfastsam info W | head -1`: the reader goes away before the output is written. Rust
    // ignores SIGPIPE, so `println!` used to panic ("failed printing to stdout: Broken pipe",
    // exit 101); the one-shot commands now take SIGPIPE's default action like other tools.
    use std::process::Stdio;
    let w = weights();
    let mut child = Command::new(env!("CARGO_BIN_EXE_medfastsam"))
        .args(["info", w.as_str()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // close the read end before anything is printed
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_ne!(out.status.code(), Some(101), "{stderr}");
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        // Either ended by SIGPIPE (the usual case: the adapter takes longer to open than the pipe
        // to close) or, had it printed nothing after the close, a normal success.
        assert!(
            out.status.signal() == Some(libc::SIGPIPE) || out.status.success(),
            "{:?}: {stderr}",
            out.status
        );
    }
}

#[test]
fn compile_threads_setting_is_checked_and_does_not_change_results() {
    // The same tiny forward with its pipelines compiled one at a time, on 3 threads, and with a
    // setting that is not a number (reported once on stderr; the run goes on with the default).
    // The masks are the same bytes: how pipelines are compiled cannot change what they compute.
    let mut masks = Vec::new();
    for threads in ["1", "3", "many"] {
        let out = tmpdir(&format!("threads-{threads}"));
        let r = segment_tiny(&out, &[("MEDFASTSAM_COMPILE_THREADS", threads)]);
        assert_eq!(
            r.code,
            0,
            "MEDFASTSAM_COMPILE_THREADS={threads}: {}",
            r.all()
        );
        let warnings = r
            .stderr
            .matches("MEDFASTSAM_COMPILE_THREADS=\"many\" is not a positive whole number")
            .count();
        assert_eq!(
            warnings,
            (threads == "many") as usize,
            "MEDFASTSAM_COMPILE_THREADS={threads}: the warning once for a bad value, else never:\n{}",
            r.all()
        );
        let mask = out.join("skimage-ihc_mask.png");
        masks.push(std::fs::read(&mask).unwrap_or_else(|e| panic!("{}: {e}", mask.display())));
        let _ = std::fs::remove_dir_all(&out);
    }
    assert!(
        masks[0] == masks[1] && masks[1] == masks[2],
        "masks differ between compile settings"
    );
}
