//! `medfastsam selftest`: every kernel against the CPU f64 reference on this adapter, and how fast.

use super::GpuArgs;
use clap::Args;
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
    /// Write the report as JSON (schema medfastsam-selftest/1) to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Run only the checks whose name contains SUBSTRING.
    #[arg(long, value_name = "SUBSTRING")]
    pub only: Option<String>,
    /// Print two JSON reports side by side instead of running anything.
    #[arg(long, num_args = 2, value_names = ["A", "B"])]
    pub compare: Option<Vec<PathBuf>>,
    /// Folder of the tiny-preset parity fixture for the end-to-end check (default: env
    /// MEDFASTSAM_FIXTURES, else the source tree's tests/data/fixtures; skipped when absent).
    #[arg(long, value_name = "DIR")]
    pub fixtures: Option<PathBuf>,
    /// Test hook: perturb the named check's GPU output before comparison.
    #[arg(long, hide = true, value_name = "NAME")]
    pub inject_fault: Option<String>,
}

pub fn run(gpu_args: &GpuArgs, a: &SelftestArgs) -> anyhow::Result<i32> {
    if let Some(files) = &a.compare {
        return compare(&files[0], &files[1]);
    }
    let gpu = gpu_args.open()?;
    let opts = Options {
        full: a.full,
        only: a.only.clone(),
        fault: a.inject_fault.clone(),
        fixtures: a.fixtures.clone(),
        ..Default::default()
    };
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
    let checks = medfastsam::selftest::run_checks(&gpu, &opts, |c| println!("{}", row(c)));
    if checks.is_empty() {
        anyhow::bail!(
            "no check's name contains {:?}",
            a.only.as_deref().unwrap_or_default()
        );
    }
    let report = medfastsam::selftest::report(&gpu, &opts, checks);
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
    if let Some(p) = &a.json {
        let bytes = serde_json::to_vec_pretty(&report)?;
        medfastsam::io::write_atomic(p, &bytes)?;
        println!("report: {}", p.display());
    }
    Ok(if report.failed == 0 { 0 } else { 1 })
}

fn header() -> String {
    format!(
        "{:<28} {:<36} {:<24} {:>10} {:>8} {:<16} {:>9} {:>9}",
        "check", "entry point", "shape", "max rel err", "tol", "verdict", "ms", "GFLOP/s"
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
    format!(
        "{:<28} {:<36} {:<24} {:>10} {:>8} {:<16} {:>9} {:>9}",
        c.name,
        c.entry,
        c.shape,
        opt(c.max_rel_err, |e| format!("{e:.2e}")),
        format!("{:.0e}", c.tolerance),
        c.verdict.name(),
        opt(c.ms, |m| format!("{m:.3}")),
        rate
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
