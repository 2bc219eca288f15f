//! Helpers of the tests that run the `medfastsam` binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The binary, with XDG_RUNTIME_DIR set (Mesa's drivers warn without it).
pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_medfastsam"));
    c.env(
        "XDG_RUNTIME_DIR",
        std::env::var("XDG_RUNTIME_DIR").unwrap_or("/tmp".into()),
    );
    c
}

/// Runs the binary: exit status (-1 when killed by a signal) and stdout followed by stderr.
pub fn run(args: &[&str]) -> (i32, String) {
    run_env(args, &[])
}

/// [`run`] with extra environment variables.
pub fn run_env(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let r = run_split_env(args, env);
    (r.code, r.stdout + &r.stderr)
}

/// [`run`] of arguments built as owned strings.
pub fn run_owned(args: &[String]) -> (i32, String) {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run(&args)
}

/// A finished run: exit status (-1 when killed by a signal), stdout and stderr apart.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// stdout followed by stderr.
    pub fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }

    /// The lines starting with `error:`, those of stderr first.
    pub fn error_lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .chain(self.stdout.lines())
            .filter(|l| l.starts_with("error:"))
            .collect()
    }
}

/// Runs `c` to its end, keeping what it wrote.
pub fn finish(c: &mut Command) -> Run {
    let o = c.output().unwrap();
    Run {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// [`run`], stdout and stderr apart.
pub fn run_split(args: &[&str]) -> Run {
    run_split_env(args, &[])
}

/// [`run_env`], stdout and stderr apart.
pub fn run_split_env(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut c = bin();
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    finish(&mut c)
}

/// A fresh, empty folder under the system's temporary folder, unique to this process and `name`.
pub fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("medfastsam-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A path inside the repository.
pub fn repo(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(p)
}

/// The names of the entries of folder `d`, sorted; none when it cannot be read.
pub fn files_in(d: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(d)
        .map(|r| {
            r.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// A path as a command-line argument.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}
