//! `medfastsam selftest`: every kernel against the CPU f64 reference on this adapter, and how fast.

use super::{GpuArgs, selftest_html};
use clap::Args;
use medfastsam::gpu::Gpu;
use medfastsam::selftest::{CheckRecord, Options, Report, SCHEMA, Verdict};
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct SelftestArgs {
    /// Small shapes only (the default).
    #[arg(long, conflicts_with = "full")]
    pub quick: bool,
    /// Add the model-sized shapes.
    #[arg(long)]
    pub full: bool,
    /// Write the report as JSON (schema medfastsam-selftest/1) to FILE; with --all-adapters, one
    /// report per adapter named <stem>.<i>-<backend>.json beside FILE (e.g. r.0-vulkan.json).
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write the report as one self-contained HTML page to FILE (with --all-adapters: a section per
    /// adapter and the side-by-side table).
    #[arg(long, value_name = "FILE")]
    pub html: Option<PathBuf>,
    /// Run the checks on every adapter of every backend found (only --backend's, when given; not
    /// with --adapter) and print them side by side; exits non-zero when any adapter fails a check
    /// or its device does not open.
    #[arg(long)]
    pub all_adapters: bool,
    /// Run only the checks whose name contains SUBSTRING.
    #[arg(long, value_name = "SUBSTRING")]
    pub only: Option<String>,
    /// Print two JSON reports side by side instead of running anything.
    #[arg(long, num_args = 2, value_names = ["A", "B"], conflicts_with_all = ["all_adapters", "html", "json"])]
    pub compare: Option<Vec<PathBuf>>,
    /// Folder of the tiny-preset parity fixture for the end-to-end check (default: env
    /// MEDFASTSAM_FIXTURES, else the source tree's tests/data/fixtures; skipped when absent).
    #[arg(long, value_name = "DIR")]
    pub fixtures: Option<PathBuf>,
    /// Test hook: perturb the named check's GPU output before comparison.
    #[arg(long, hide = true, value_name = "NAME")]
    pub inject_fault: Option<String>,
    /// Write the compact tiny-preset fixture embedded in this binary (what the model checks read;
    /// the web page fetches it as pkg/selftest-tiny.safetensors) to FILE, and run nothing.
    #[arg(long, hide = true, value_name = "FILE")]
    pub write_fixture: Option<PathBuf>,
    /// Test hook of --all-adapters: adapter number I fails to open (a device_error).
    #[arg(long, hide = true, value_name = "I", requires = "all_adapters")]
    pub inject_open_failure: Option<usize>,
}

pub fn run(gpu_args: &GpuArgs, a: &SelftestArgs) -> anyhow::Result<i32> {
    if let Some(files) = &a.compare {
        return compare(&files[0], &files[1]);
    }
    if let Some(p) = &a.write_fixture {
        let n = medfastsam::selftest::write_tiny_fixture(p)?;
        println!("{}: {n} bytes", p.display());
        return Ok(0);
    }
    check_outputs(a)?;
    if a.all_adapters {
        return all_adapters(gpu_args, a);
    }
    let gpu = gpu_args.open()?;
    let opts = options(a);
    let report = run_one(&gpu, &opts);
    if report.checks.is_empty() {
        anyhow::bail!(no_check(a));
    }
    if let Some(p) = &a.json {
        write_json(p, &report)?;
    }
    if let Some(p) = &a.html {
        write_file("HTML report", p, selftest_html::single(&report).as_bytes())?;
        println!("html:   {}", p.display());
    }
    Ok(if report.failed == 0 { 0 } else { 1 })
}

fn options(a: &SelftestArgs) -> Options {
    Options {
        full: a.full,
        only: a.only.clone(),
        fault: a.inject_fault.clone(),
        fixtures: a.fixtures.clone(),
        ..Default::default()
    }
}

fn no_check(a: &SelftestArgs) -> String {
    format!(
        "no check's name contains {:?}",
        a.only.as_deref().unwrap_or_default()
    )
}

/// Writes `bytes` (the `what`) to `p` atomically; an error names the file.
fn write_file(what: &str, p: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    medfastsam::io::write_atomic(p, bytes)
        .map_err(|e| anyhow::anyhow!("cannot write the {what}: {e}"))
}

/// Refuses, before any check runs, an output file whose folder does not exist.
fn check_folder(what: &str, p: &Path) -> anyhow::Result<()> {
    let dir = p
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if p.file_name().is_none() {
        anyhow::bail!(
            "cannot write the {what} to {}: not a file path",
            p.display()
        );
    }
    if !dir.is_dir() {
        anyhow::bail!(
            "cannot write the {what} {}: folder {} does not exist",
            p.display(),
            dir.display()
        );
    }
    Ok(())
}

fn check_outputs(a: &SelftestArgs) -> anyhow::Result<()> {
    if let Some(p) = &a.json {
        check_folder("JSON report", p)?;
    }
    if let Some(p) = &a.html {
        check_folder("HTML report", p)?;
    }
    Ok(())
}

fn write_json(p: &Path, report: &Report) -> anyhow::Result<()> {
    let bytes = serde_json::to_vec_pretty(report)?;
    write_file("JSON report", p, &bytes)?;
    println!("report: {}", p.display());
    Ok(())
}

/// Runs the checks on `gpu`, printing the adapter, a row per check and the summary.
fn run_one(gpu: &Gpu, opts: &Options) -> Report {
    let i = &gpu.info;
    println!(
        "adapter:  {} ({:?}, {:?})",
        i.name, i.backend, i.device_type
    );
    println!("driver:   {} {}", i.driver, i.driver_info);
    println!(
        "limits:   storage binding {} B, workgroup storage {} B, invocations/workgroup {}",
        gpu.limits.max_storage_buffer_binding_size,
        gpu.limits.max_compute_workgroup_storage_size,
        gpu.limits.max_compute_invocations_per_workgroup
    );
    let feats: Vec<&str> = gpu.features.iter_names().map(|(n, _)| n).collect();
    println!(
        "features: {}",
        if feats.is_empty() {
            "none".to_string()
        } else {
            feats.join(", ")
        }
    );
    println!("{}", header());
    let checks = medfastsam::selftest::run_checks(gpu, opts, |c| println!("{}", row(c)));
    let report = medfastsam::selftest::report(gpu, opts, checks);
    if report.checks.is_empty() {
        return report;
    }
    for c in report.checks.iter().filter(|c| c.verdict != Verdict::Pass) {
        // (skipped checks are listed with their reason but do not fail the command)
        println!(
            "{} {}: {}",
            c.name,
            c.verdict.name(),
            c.message.as_deref().unwrap_or("")
        );
    }
    let skipped = report.checks.len() - report.passed - report.failed;
    println!(
        "{} of {} checks pass, {} fail, {skipped} skipped",
        report.passed,
        report.checks.len(),
        report.failed
    );
    report
}

/// `--all-adapters`: every adapter in turn, then the side-by-side table.
fn all_adapters(gpu_args: &GpuArgs, a: &SelftestArgs) -> anyhow::Result<i32> {
    if gpu_args.adapter.is_some() {
        anyhow::bail!(
            "--all-adapters runs every adapter; drop --adapter (--backend keeps one backend's)"
        );
    }
    let req = gpu_args.request();
    if req.adapter.is_some() {
        eprintln!("note: MEDFASTSAM_ADAPTER is ignored with --all-adapters");
    }
    let listed = medfastsam::gpu::list_adapters(req.backend.as_deref())?;
    if listed.is_empty() {
        anyhow::bail!(
            "no adapter with compute shaders found{}",
            req.backend
                .as_deref()
                .map(|b| format!(" for backend {b}"))
                .unwrap_or_default()
        );
    }
    let json_paths: Vec<Option<PathBuf>> = listed
        .iter()
        .enumerate()
        .map(|(i, l)| {
            a.json
                .as_deref()
                .map(|p| numbered(p, i, l.backend))
                .transpose()
        })
        .collect::<anyhow::Result<_>>()?;
    let opts = options(a);
    let mut runs: Vec<(String, Result<Report, String>)> = Vec::new();
    for (i, l) in listed.iter().enumerate() {
        let label = format!(
            "{} ({:?}, {:?})",
            l.info.name, l.info.backend, l.info.device_type
        );
        println!("== adapter {i} of {}: {label}", listed.len());
        let req = l.request(gpu_args.webgpu_limits || req.webgpu_limits);
        let opened = if a.inject_open_failure == Some(i) {
            Err(medfastsam::error::Error::Gpu(
                "request_device: injected failure <test> & co".into(),
            ))
        } else {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Gpu::new(&req)))
                .unwrap_or_else(|_| {
                    Err(medfastsam::error::Error::Gpu(
                        "panicked while opening the device".into(),
                    ))
                })
        };
        let gpu = match opened {
            Ok(g) => g,
            Err(e) => {
                let msg = super::error_line(&e.into());
                println!("device_error: {msg}");
                runs.push((label, Err(msg)));
                continue;
            }
        };
        let report = run_one(&gpu, &opts);
        drop(gpu);
        if report.checks.is_empty() {
            anyhow::bail!(no_check(a));
        }
        if let Some(p) = &json_paths[i] {
            write_json(p, &report)?;
        }
        runs.push((label, Ok(report)));
        println!();
    }
    side_by_side(&runs);
    if let Some(p) = &a.html {
        let sections: Vec<selftest_html::Section> = runs
            .iter()
            .map(|(label, r)| selftest_html::Section {
                label: label.clone(),
                result: r.as_ref().map_err(|e| e.clone()),
            })
            .collect();
        write_file("HTML report", p, selftest_html::multi(&sections).as_bytes())?;
        println!("html:   {}", p.display());
    }
    let bad = runs
        .iter()
        .any(|(_, r)| r.as_ref().map_or(true, |r| r.failed > 0));
    Ok(if bad { 1 } else { 0 })
}

/// `<stem>.<i>-<backend>.json` beside `p`.
fn numbered(p: &Path, i: usize, backend: &str) -> anyhow::Result<PathBuf> {
    let stem = p
        .file_stem()
        .ok_or_else(|| anyhow::anyhow!("--json {}: not a file path", p.display()))?;
    Ok(p.with_file_name(format!("{}.{i}-{backend}.json", stem.to_string_lossy())))
}

/// One row per check; for each adapter its max rel err, verdict and ms.
fn side_by_side(runs: &[(String, Result<Report, String>)]) {
    println!("side by side:");
    for (i, (label, r)) in runs.iter().enumerate() {
        let state = match r {
            Ok(r) => format!("{} of {} pass, {} fail", r.passed, r.checks.len(), r.failed),
            Err(e) => format!("device_error: {e}"),
        };
        println!("[{i}] {label}: {state}");
    }
    let mut head = format!("{:<28}", "check");
    for i in 0..runs.len() {
        head.push_str(&format!(
            " | {:>9} {:<16} {:>9}",
            format!("[{i}] err"),
            "verdict",
            "ms"
        ));
    }
    println!("{head}");
    if runs.iter().any(|(_, r)| r.is_err()) {
        let mut line = format!("{:<28}", "(open device)");
        for (_, r) in runs {
            let v = if r.is_ok() { "ok" } else { "device_error" };
            line.push_str(&format!(" | {:>9} {:<16} {:>9}", "-", v, "-"));
        }
        println!("{line}");
    }
    let reports: Vec<Option<&Report>> = runs.iter().map(|(_, r)| r.as_ref().ok()).collect();
    for name in selftest_html::check_names(&reports) {
        let mut line = format!("{name:<28}");
        for r in &reports {
            let c = r.and_then(|r| r.checks.iter().find(|c| c.name == name));
            line.push_str(&format!(
                " | {:>9} {:<16} {:>9}",
                opt(c.and_then(|c| c.max_rel_err), |e| format!("{e:.2e}")),
                c.map(|c| c.verdict.name()).unwrap_or("-"),
                opt(c.and_then(|c| c.ms), |m| format!("{m:.3}"))
            ));
        }
        println!("{line}");
    }
}

fn header() -> String {
    format!(
        "{:<28} {:<36} {:<24} {:>10} {:>8} {:<16} {:>9} {:>9} {:>11}",
        "check",
        "entry point",
        "shape",
        "max rel err",
        "tol",
        "verdict",
        "ms",
        "GFLOP/s",
        "ULP max/med"
    )
}

fn opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map(f).unwrap_or_else(|| "-".into())
}

fn row(c: &CheckRecord) -> String {
    let rate = match (c.gflops, c.gbps) {
        (Some(g), _) => format!("{g:.2}"),
        (None, Some(b)) => format!("{b:.2} GB/s"),
        _ => "-".into(),
    };
    let ulp = match (c.ulp_max, c.ulp_median) {
        (Some(m), Some(d)) => format!("{m}/{d}"),
        _ => "-".into(),
    };
    format!(
        "{:<28} {:<36} {:<24} {:>10} {:>8} {:<16} {:>9} {:>9} {:>11}",
        c.name,
        c.entry,
        c.shape,
        opt(c.max_rel_err, |e| format!("{e:.2e}")),
        format!("{:.0e}", c.tolerance),
        c.verdict.name(),
        opt(c.ms, |m| format!("{m:.3}")),
        rate,
        ulp
    )
}

fn load(p: &Path) -> anyhow::Result<Report> {
    let bytes = std::fs::read(p)
        .map_err(|e| anyhow::anyhow!("cannot read the report {}: {e}", p.display()))?;
    let r: Report = serde_json::from_slice(&bytes)
        .map_err(|e| anyhow::anyhow!("{} is not a selftest report: {e}", p.display()))?;
    if r.schema != SCHEMA {
        anyhow::bail!(
            "{} has schema {:?}; this medfastsam reads {SCHEMA:?}",
            p.display(),
            r.schema
        );
    }
    Ok(r)
}

fn compare(a: &Path, b: &Path) -> anyhow::Result<i32> {
    let (ra, rb) = (load(a)?, load(b)?);
    println!(
        "A: {} ({}) {}",
        ra.adapter.name,
        ra.adapter.backend,
        a.display()
    );
    println!(
        "B: {} ({}) {}",
        rb.adapter.name,
        rb.adapter.backend,
        b.display()
    );
    println!(
        "{:<28} {:>10} {:>10} {:<16} {:<16} {:>9} {:>9}",
        "check", "err A", "err B", "verdict A", "verdict B", "ms A", "ms B"
    );
    let mut names: Vec<&str> = ra.checks.iter().map(|c| c.name.as_str()).collect();
    for c in &rb.checks {
        if !names.contains(&c.name.as_str()) {
            names.push(&c.name);
        }
    }
    let find = |r: &'_ Report, n: &str| r.checks.iter().find(|c| c.name == n).cloned();
    for n in names {
        let (ca, cb) = (find(&ra, n), find(&rb, n));
        let err = |c: &Option<CheckRecord>| {
            opt(c.as_ref().and_then(|c| c.max_rel_err), |e| {
                format!("{e:.2e}")
            })
        };
        let ver = |c: &Option<CheckRecord>| {
            c.as_ref()
                .map(|c| c.verdict.name())
                .unwrap_or("-")
                .to_string()
        };
        let ms =
            |c: &Option<CheckRecord>| opt(c.as_ref().and_then(|c| c.ms), |m| format!("{m:.3}"));
        println!(
            "{:<28} {:>10} {:>10} {:<16} {:<16} {:>9} {:>9}",
            n,
            err(&ca),
            err(&cb),
            ver(&ca),
            ver(&cb),
            ms(&ca),
            ms(&cb)
        );
    }
    Ok(0)
}
