//! Self-test: does every kernel compute the right numbers on this adapter, and how fast?
//!
//! A list of checks, each running one GPU op on deterministic random (or known-answer) inputs and
//! comparing it with the independent CPU f64 reference of `ops::reference`, by the maximum
//! relative error [`rel_err`] against a stated tolerance. `medfastsam selftest` prints the
//! results; `--json` writes them as a versioned report (schema [`SCHEMA`]).
//!
//! The error measures are product code (the tests use them through `testutil`).

/// `max |got - want| / max |want|` (relative to the tensor's scale; the absolute error when the
/// reference is all zero). Infinite when any value is not finite or the lengths differ.
pub fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    let scale = want.iter().fold(0.0f64, |m, &w| m.max(w.abs()));
    let err = max_abs(got, want);
    if scale == 0.0 { err } else { err / scale }
}

/// Maximum absolute difference (infinite when any value is not finite or the lengths differ).
pub fn max_abs(got: &[f32], want: &[f64]) -> f64 {
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    got.iter().zip(want).fold(0.0f64, |m, (&g, &w)| {
        if !g.is_finite() {
            f64::INFINITY
        } else {
            m.max((g as f64 - w).abs())
        }
    })
}

/// Distance in units in the last place between two f32 values (0 when equal, +0 and -0 equal;
/// counts the representable floats between them, across zero too). None when either is NaN.
pub fn ulp_distance(a: f32, b: f32) -> Option<u64> {
    if a.is_nan() || b.is_nan() {
        return None;
    }
    // Map the bit patterns onto a line on which consecutive floats are consecutive integers.
    let key = |x: f32| {
        let i = x.to_bits() as i32 as i64;
        if i < 0 { i32::MIN as i64 - i } else { i }
    };
    Some(key(a).abs_diff(key(b)))
}

/// ULP statistics of `got` against `want` rounded to f32, (maximum, median), over the elements
/// whose reference is at least 1e-3 of the output's scale (`max |want|`): near zero an absolute
/// error the relative measure accepts spans millions of ULPs (GELU(-10) ≈ -8e-23), which says
/// nothing about the kernel. None when no element qualifies, the lengths differ or a value is NaN.
/// Meaningful for elementwise results, where the reference rounded to f32 is the best answer an
/// f32 kernel can give (a sum's result is judged by [`rel_err`] alone).
pub fn ulp_stats(got: &[f32], want: &[f64]) -> Option<(u64, u64)> {
    if got.len() != want.len() {
        return None;
    }
    let scale = want.iter().fold(0.0f64, |m, &w| m.max(w.abs()));
    let mut d: Vec<u64> = got
        .iter()
        .zip(want)
        .filter(|(_, w)| w.abs() >= 1e-3 * scale && scale > 0.0)
        .map(|(&g, &w)| ulp_distance(g, w as f32))
        .collect::<Option<_>>()?;
    if d.is_empty() {
        return None;
    }
    d.sort_unstable();
    Some((d[d.len() - 1], d[d.len() / 2]))
}

/// Check families whose outputs are elementwise functions of their inputs (no long sums), where
/// the report gives ULP statistics besides the relative error.
pub const ULP_FAMILIES: &[&str] = &["elementwise", "resize", "pe", "optim", "f16"];

/// Version tag of the JSON report.
pub const SCHEMA: &str = "medfastsam-selftest/1";

/// Outcome of one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Pass,
    OutOfTolerance,
    FailedToCompile,
    DeviceError,
    Skipped,
}

impl Verdict {
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::OutOfTolerance => "out_of_tolerance",
            Verdict::FailedToCompile => "failed_to_compile",
            Verdict::DeviceError => "device_error",
            Verdict::Skipped => "skipped",
        }
    }
}

/// The record of one check.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct CheckRecord {
    pub name: String,
    pub family: String,
    /// WGSL entry point(s) the check exercises.
    pub entry: String,
    pub shape: String,
    /// Maximum relative error against the f64 reference (None when the op did not run).
    pub max_rel_err: Option<f64>,
    pub tolerance: f64,
    pub verdict: Verdict,
    /// Median ms per call (None when not timed).
    pub ms: Option<f64>,
    pub gflops: Option<f64>,
    pub gbps: Option<f64>,
    /// Why the check did not pass (error message), when it did not.
    pub message: Option<String>,
    /// Milliseconds spent creating the pipelines this check was the first to use (shader module
    /// and pipeline creation, where the driver compiles); None when all came from the cache.
    #[serde(default)]
    pub compile_ms: Option<f64>,
    /// The pipelines the check used, in order of first use.
    #[serde(default)]
    pub pipelines: Vec<PipelineRecord>,
    /// For the elementwise families ([`ULP_FAMILIES`]): the largest and the median distance in
    /// f32 units in the last place from the reference rounded to f32.
    #[serde(default)]
    pub ulp_max: Option<u64>,
    #[serde(default)]
    pub ulp_median: Option<u64>,
}

/// One pipeline a check used: its WGSL family (shader file) and entry point, and its creation
/// time when this check created it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct PipelineRecord {
    pub family: String,
    pub entry: String,
    pub compile_ms: Option<f64>,
}

/// The adapter a report was measured on.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct AdapterRecord {
    pub name: String,
    pub backend: String,
    pub driver: String,
    pub driver_info: String,
    pub device_type: String,
}

/// A whole report (what `--json` writes).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Report {
    pub schema: String,
    pub version: String,
    pub mode: String,
    pub adapter: AdapterRecord,
    /// The limits the device was opened with (wgpu's names).
    pub limits: serde_json::Value,
    pub features: Vec<String>,
    pub checks: Vec<CheckRecord>,
    pub passed: usize,
    /// Checks neither passed nor skipped (skipped ones, e.g. a fixture not found, are no fault of
    /// the adapter).
    pub failed: usize,
}

/// What to run.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Add the model-sized shapes.
    pub full: bool,
    /// Run only the checks whose name contains this.
    pub only: Option<String>,
    /// Perturb the GPU output of the named check before comparison (tests of the report).
    pub fault: Option<String>,
    /// Folder of the tiny-preset parity fixture (`tiny.config.json`, `tiny.weights.safetensors`,
    /// `tiny.forward.safetensors`, `tiny.train.safetensors`) to read instead of the compact copy;
    /// natively also env MEDFASTSAM_FIXTURES (after `tiny_fixture`). A model check whose file is
    /// absent there is skipped. Ignored in the browser.
    pub fixtures: Option<std::path::PathBuf>,
    /// The compact tiny-preset fixture ([`write_tiny_fixture`]'s file) for the model checks. None:
    /// natively the copy embedded in the binary ([`embedded_tiny_fixture`]); in the browser the
    /// model checks are skipped ("the tiny fixture was not loaded").
    pub tiny_fixture: Option<std::sync::Arc<Vec<u8>>>,
}

include!("selftest/tiny_fixture_keys.rs");

/// The compact tiny-preset parity fixture the model checks use, embedded in the native binary
/// (built by build.rs from tests/data/fixtures: the weights and configuration, the first forward
/// image with both variants' logits, the training batch with its target, loss and the gradients
/// of [`TINY_TRAIN_GRADS`]). None when the build had no fixture.
#[cfg(not(target_arch = "wasm32"))]
pub fn embedded_tiny_fixture() -> Option<&'static [u8]> {
    static BYTES: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/tiny_fixture.safetensors"));
    (!BYTES.is_empty()).then_some(BYTES)
}

/// Writes the embedded compact fixture to `path` (for the web page, which fetches it and passes
/// it as [`Options::tiny_fixture`]); returns its size in bytes.
#[cfg(not(target_arch = "wasm32"))]
pub fn write_tiny_fixture(path: &std::path::Path) -> anyhow::Result<usize> {
    let bytes = embedded_tiny_fixture().ok_or_else(|| {
        anyhow::anyhow!("this build has no embedded tiny fixture (tests/data/fixtures was absent)")
    })?;
    crate::io::write_atomic(path, bytes)
        .map_err(|e| anyhow::anyhow!("cannot write the tiny fixture: {e}"))?;
    Ok(bytes.len())
}

/// A check that could not run here for a reason that is no fault of the adapter (its verdict is
/// `skipped`).
#[derive(Debug)]
pub struct Skip(pub String);

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Skip {}

pub use checks::*;

mod checks {
    mod backward;
    mod f16;
    mod tiny;

    use super::*;
    use crate::gpu::Gpu;
    use crate::ops::conv::{self, ConvGeom};
    use crate::ops::matmul::{Gemm, GemmConfig, GemmIo, GemmPath, gemm_with, plan};
    use crate::ops::reference::conv::ConvShape;
    use crate::ops::{Act, reference};
    use crate::rng::Rng;
    use std::future::Future;
    use std::pin::Pin;

    /// What a check's body returns: the GPU output, the reference, and the timing's work.
    struct Outcome {
        got: Vec<f32>,
        want: Vec<f64>,
        /// What the entry points alone do not say (the GEMM path's lanes or splits), or "".
        entry: String,
        ms: Option<f64>,
        flops: Option<f64>,
        bytes: Option<f64>,
        /// Named consecutive parts of `got`/`want` (name, length), each compared against its own
        /// scale (the check's error is the worst part's); empty: one tensor.
        parts: Vec<(String, usize)>,
    }

    type Fut<'a> = Pin<Box<dyn Future<Output = anyhow::Result<Outcome>> + 'a>>;
    type Body = Box<dyn for<'a> Fn(&'a Gpu) -> Fut<'a>>;

    /// A check's body: async, so that the page (which cannot block on a readback) runs the same
    /// code as the CLI.
    fn body<F>(f: F) -> Body
    where
        F: for<'a> Fn(&'a Gpu) -> Fut<'a> + 'static,
    {
        Box::new(f)
    }

    struct Check {
        name: String,
        family: &'static str,
        shape: String,
        tolerance: f64,
        body: Body,
    }

    use crate::ops::time_async;

    /// The f64 copy of a host tensor that the references take.
    fn f64s(v: &[f32]) -> Vec<f64> {
        v.iter().map(|&a| a as f64).collect()
    }

    const REPS: usize = 3;

    fn gemm_check(name: &str, m: usize, n: usize, k: usize, cfg: GemmConfig, seed: u64) -> Check {
        gemm_check_b(name, Gemm::new(m, n, k), cfg, seed, false)
    }

    /// A GEMM check; with `b_f16`, B is stored as f16 (`--precision f16` weights) and the
    /// reference multiplies by the same f16-rounded values.
    fn gemm_check_b(name: &str, g: Gemm, cfg: GemmConfig, seed: u64, b_f16: bool) -> Check {
        let (m, n, k) = (g.m, g.n, g.k);
        Check {
            name: name.to_string(),
            family: "gemm",
            shape: format!("{m}x{n}x{k}{}", if b_f16 { ", B f16 [N, K]" } else { "" }),
            tolerance: if k >= 1000 { 1e-5 } else { 2e-6 },
            body: body(move |gpu: &Gpu| {
                Box::pin(async move {
                    let mut rng = Rng::new(seed);
                    let a = rng.vec(m * k);
                    let mut b = rng.vec(k * n);
                    let ta = gpu.upload(&a, &[m * k])?;
                    let tb = if b_f16 {
                        b.iter_mut()
                            .for_each(|v| *v = half::f16::from_f32(*v).to_f32());
                        gpu.upload_f16(&b, &[k * n])?
                    } else {
                        gpu.upload(&b, &[k * n])?
                    };
                    let tc = gpu.upload(&vec![0.0; m * n], &[m * n])?;
                    let p = plan(gpu, &g, &cfg)?;
                    let io = || GemmIo {
                        a: &ta,
                        b: &tb,
                        bias: None,
                        residual: None,
                        c: &tc,
                    };
                    let mut rec = gpu.new_recorder();
                    gemm_with(&mut rec, &g, io(), &cfg)?;
                    rec.submit()?;
                    let got = gpu.read_async(&tc).await?;
                    let mut want = vec![0.0; m * n];
                    let a64: Vec<f64> = a.iter().map(|&v| v as f64).collect();
                    let b64: Vec<f64> = b.iter().map(|&v| v as f64).collect();
                    reference::gemm(&g, &a64, &b64, None, None, &mut want);
                    let ms = time_async(gpu, REPS, |rec| gemm_with(rec, &g, io(), &cfg)).await?;
                    let entry = if p.entry == "matmul" {
                        String::new()
                    } else if p.splits > 1 {
                        format!("split-K {}", p.splits)
                    } else {
                        format!("lanes {}", if p.lanes_n { "N" } else { "M" })
                    };
                    Ok(Outcome {
                        got,
                        want,
                        entry,
                        ms: Some(ms),
                        flops: Some(g.flops()),
                        bytes: None,
                        parts: Vec::new(),
                    })
                })
            }),
        }
    }

    fn gelu_check(name: &str, n: usize, lo: f64, hi: f64, tol: f64) -> Check {
        Check {
            name: name.to_string(),
            family: "elementwise",
            shape: format!("{n} in [{lo}, {hi}]"),
            tolerance: tol,
            body: body(move |gpu: &Gpu| {
                Box::pin(async move {
                    // Evenly spaced over the range: the known answer is erf's, point by point.
                    let x: Vec<f32> = (0..n)
                        .map(|i| (lo + (hi - lo) * i as f64 / (n - 1).max(1) as f64) as f32)
                        .collect();
                    let tx = gpu.upload(&x, &[n])?;
                    let mut rec = gpu.new_recorder();
                    let y = crate::ops::elementwise::activation(&mut rec, &tx, Act::Gelu)?;
                    rec.submit()?;
                    let got = gpu.read_async(&y).await?;
                    let want = x.iter().map(|&v| reference::gelu(v as f64)).collect();
                    let ms = time_async(gpu, REPS, |rec| {
                        crate::ops::elementwise::activation(rec, &tx, Act::Gelu).map(|_| ())
                    })
                    .await?;
                    Ok(Outcome {
                        got,
                        want,
                        entry: String::new(),
                        ms: Some(ms),
                        flops: None,
                        bytes: Some(8.0 * n as f64),
                        parts: Vec::new(),
                    })
                })
            }),
        }
    }

    fn layer_norm_check(
        name: &str,
        rows: usize,
        c: usize,
        mean: f64,
        tol: f64,
        seed: u64,
    ) -> Check {
        Check {
            name: name.to_string(),
            family: "norm",
            shape: format!("{rows}x{c}, mean {mean}"),
            tolerance: tol,
            body: body(move |gpu: &Gpu| {
                Box::pin(async move {
                    let mut rng = Rng::new(seed);
                    let x: Vec<f32> = (0..rows * c)
                        .map(|_| (mean + rng.normal()) as f32)
                        .collect();
                    let w = rng.vec(c);
                    let b = rng.vec(c);
                    let (tx, tw, tb) = (
                        gpu.upload(&x, &[rows, c])?,
                        gpu.upload(&w, &[c])?,
                        gpu.upload(&b, &[c])?,
                    );
                    let mut rec = gpu.new_recorder();
                    let y = crate::ops::norm::layer_norm(&mut rec, &tx, &tw, &tb, 1e-5, Act::None)?;
                    rec.submit()?;
                    let got = gpu.read_async(&y).await?;
                    let want = reference::norm::layer_norm(
                        &f64s(&x),
                        &f64s(&w),
                        &f64s(&b),
                        c,
                        1e-5,
                        Act::None,
                    );
                    let ms = time_async(gpu, REPS, |rec| {
                        crate::ops::norm::layer_norm(rec, &tx, &tw, &tb, 1e-5, Act::None)
                            .map(|_| ())
                    })
                    .await?;
                    Ok(Outcome {
                        got,
                        want,
                        entry: String::new(),
                        ms: Some(ms),
                        flops: None,
                        bytes: Some(8.0 * (rows * c) as f64),
                        parts: Vec::new(),
                    })
                })
            }),
        }
    }

    /// Otsu on a synthetic grey image: the threshold (t*/255) against the reference's.
    fn otsu_check(name: &str, shape: &'static str, levels: fn(usize, usize) -> u8) -> Check {
        Check {
            name: name.to_string(),
            family: "otsu",
            shape: format!("64x64 {shape}"),
            tolerance: 0.0,
            body: body(move |gpu: &Gpu| {
                Box::pin(async move {
                    let (h, w) = (64usize, 64usize);
                    let px: Vec<u32> = (0..h * w)
                        .map(|i| {
                            let v = levels(i / w, i % w) as u32;
                            v | (v << 8) | (v << 16)
                        })
                        .collect();
                    let tpx = gpu.upload_u32(&px, &[1, h, w])?;
                    let mut rec = gpu.new_recorder();
                    let xn = crate::ops::elementwise::image_normalize(&mut rec, &tpx)?;
                    let rule = crate::ops::otsu::OtsuRule::Paper;
                    let (thr, mask) = crate::ops::otsu::otsu(&mut rec, &tpx, &xn, rule)?;
                    rec.submit()?;
                    let mut got = gpu.read_async(&thr).await?;
                    got.extend(gpu.read_async(&mask).await?);
                    let (_, want_thr, want_mask) = reference::otsu::otsu(&px, 1, h, w, rule);
                    // The threshold as the GPU rounds it (t*/255 in f32), then the mask.
                    let mut want: Vec<f64> = want_thr.iter().map(|&t| t as f32 as f64).collect();
                    want.extend(want_mask);
                    Ok(Outcome {
                        got,
                        want,
                        entry: String::new(),
                        ms: None,
                        flops: None,
                        bytes: None,
                        parts: Vec::new(),
                    })
                })
            }),
        }
    }

    /// SAM attention (`mha`): `q_scale` scales q, so 1.5 gives logits of a few units and 200
    /// logits of about +-100 (exp overflows f32 past 88): only a softmax that subtracts its row maximum
    /// survives.
    fn mha_check(name: &str, d: [usize; 5], q_scale: f32, tol: f64, seed: u64) -> Check {
        let [b, lq, lk, e, heads] = d;
        Check {
            name: name.to_string(),
            family: "attention",
            shape: format!("B{b} Lq{lq} Lk{lk} E{e} h{heads} q*{q_scale}"),
            tolerance: tol,
            body: body(move |gpu: &Gpu| {
                Box::pin(async move {
                    let mut rng = Rng::new(seed);
                    let q: Vec<f32> = rng.vec(b * lq * e).iter().map(|x| x * q_scale).collect();
                    let k: Vec<f32> = rng.vec(b * lk * e).iter().map(|x| x * 1.5).collect();
                    let v = rng.vec(b * lk * e);
                    let tq = gpu.upload(&q, &[b, lq, e])?;
                    let tk = gpu.upload(&k, &[b, lk, e])?;
                    let tv = gpu.upload(&v, &[b, lk, e])?;
                    let mut rec = gpu.new_recorder();
                    let out = crate::ops::attention::mha(&mut rec, &tq, &tk, &tv, heads)?;
                    rec.submit()?;
                    let got = gpu.read_async(&out).await?;
                    let shape = reference::attention::MhaShape {
                        b,
                        lq,
                        lk,
                        e,
                        heads,
                    };
                    let (want, _) =
                        reference::attention::mha(&f64s(&q), &f64s(&k), &f64s(&v), shape);
                    let ms = time_async(gpu, REPS, |rec| {
                        crate::ops::attention::mha(rec, &tq, &tk, &tv, heads).map(|_| ())
                    })
                    .await?;
                    Ok(Outcome {
                        got,
                        want,
                        entry: String::new(),
                        ms: Some(ms),
                        flops: Some(4.0 * (b * lq * lk * e) as f64),
                        bytes: None,
                        parts: Vec::new(),
                    })
                })
            }),
        }
    }

    /// Dense (`depthwise == false`) or depthwise convolution, channels-last, with bias and GELU.
    fn conv_check(name: &str, s: ConvShape, depthwise: bool, tol: f64, seed: u64) -> Check {
        Check {
            name: name.to_string(),
            family: if depthwise { "depthwise" } else { "conv" },
            shape: s.label(),
            tolerance: tol,
            body: body(move |gpu: &Gpu| {
                Box::pin(async move {
                    let mut rng = Rng::new(seed);
                    let wi = s.weight_in(depthwise);
                    let x = rng.vec(s.b * s.h * s.w * s.ci);
                    let w = rng.vec(s.co * wi * s.k * s.k);
                    let bias = rng.vec(s.co);
                    let tx = gpu.upload(&x, &[s.b, s.h, s.w, s.ci])?;
                    let tw = gpu.upload(&w, &[s.co, wi, s.k, s.k])?;
                    let tb = gpu.upload(&bias, &[s.co])?;
                    let geom = ConvGeom {
                        stride: s.stride,
                        pad: s.pad,
                    };
                    let op = |rec: &mut crate::gpu::Recorder| {
                        if depthwise {
                            conv::depthwise_conv2d(rec, &tx, &tw, Some(&tb), geom, Act::Gelu)
                        } else {
                            conv::conv2d(rec, &tx, &tw, Some(&tb), geom, Act::Gelu)
                        }
                    };
                    let mut rec = gpu.new_recorder();
                    let y = op(&mut rec)?;
                    rec.submit()?;
                    let got = gpu.read_async(&y).await?;
                    let (x, w, bias) = (f64s(&x), f64s(&w), f64s(&bias));
                    let want = if depthwise {
                        reference::conv::depthwise_conv2d(&s, &x, &w, Some(&bias), Act::Gelu)
                    } else {
                        reference::conv::conv2d(&s, &x, &w, Some(&bias), Act::Gelu)
                    };
                    let ms = time_async(gpu, REPS, |rec| op(rec).map(|_| ())).await?;
                    let macs = (s.b * s.oh() * s.ow() * s.co * wi * s.k * s.k) as f64;
                    Ok(Outcome {
                        got,
                        want,
                        entry: String::new(),
                        ms: Some(ms),
                        flops: Some(2.0 * macs),
                        bytes: None,
                        parts: Vec::new(),
                    })
                })
            }),
        }
    }

    /// Bilinear resize (align_corners = false) of `[b, h, w, c]` to `oh x ow`.
    fn resize_check(name: &str, d: [usize; 6], tol: f64, seed: u64) -> Check {
        let [b, h, w, c, oh, ow] = d;
        Check {
            name: name.to_string(),
            family: "resize",
            shape: format!("B{b} {h}x{w}x{c} -> {oh}x{ow}"),
            tolerance: tol,
            body: body(move |gpu: &Gpu| {
                Box::pin(async move {
                    let mut rng = Rng::new(seed);
                    let x = rng.vec(b * h * w * c);
                    let tx = gpu.upload(&x, &[b, h, w, c])?;
                    let mut rec = gpu.new_recorder();
                    let y = crate::ops::resize::bilinear(&mut rec, &tx, oh, ow)?;
                    rec.submit()?;
                    let got = gpu.read_async(&y).await?;
                    let x64: Vec<f64> = x.iter().map(|&a| a as f64).collect();
                    let want = reference::resize::bilinear(b, h, w, c, &x64, oh, ow);
                    let ms = time_async(gpu, REPS, |rec| {
                        crate::ops::resize::bilinear(rec, &tx, oh, ow).map(|_| ())
                    })
                    .await?;
                    Ok(Outcome {
                        got,
                        want,
                        entry: String::new(),
                        ms: Some(ms),
                        flops: None,
                        bytes: Some(4.0 * (b * c * (h * w + oh * ow)) as f64),
                        parts: Vec::new(),
                    })
                })
            }),
        }
    }

    /// AdamW: 5 steps from random state, the parameters against the f64 trajectory.
    fn adam_check(name: &str, n: usize, tol: f64, seed: u64) -> Check {
        Check {
            name: name.to_string(),
            family: "optim",
            shape: format!("{n} params, 5 steps, weight decay 0.01"),
            tolerance: tol,
            body: body(move |gpu: &Gpu| {
                Box::pin(async move {
                    use crate::ops::optim::{AdamConfig, adam_step};
                    let mut rng = Rng::new(seed);
                    let cfg = AdamConfig {
                        weight_decay: 0.01,
                        ..AdamConfig::default()
                    };
                    let p = rng.vec(n);
                    let zeros = vec![0.0f32; n];
                    let tp = gpu.upload(&p, &[n])?;
                    let tm = gpu.upload(&zeros, &[n])?;
                    let tv = gpu.upload(&zeros, &[n])?;
                    let (mut rp, mut rm, mut rv) = (f64s(&p), vec![0.0; n], vec![0.0; n]);
                    for t in 1..=5u32 {
                        let g = rng.vec(n);
                        let tg = gpu.upload(&g, &[n])?;
                        let mut rec = gpu.new_recorder();
                        adam_step(&mut rec, &tp, &tm, &tv, &tg, &cfg, t)?;
                        rec.submit()?;
                        reference::optim::adam_step(&mut rp, &mut rm, &mut rv, &f64s(&g), &cfg, t);
                    }
                    let got = gpu.read_async(&tp).await?;
                    let tg = gpu.upload(&zeros, &[n])?;
                    let ms =
                        time_async(gpu, REPS, |rec| adam_step(rec, &tp, &tm, &tv, &tg, &cfg, 6))
                            .await?;
                    Ok(Outcome {
                        got,
                        want: rp,
                        entry: String::new(),
                        ms: Some(ms),
                        flops: None,
                        // p, m, v read and written, g read.
                        bytes: Some(28.0 * n as f64),
                        parts: Vec::new(),
                    })
                })
            }),
        }
    }

    /// BatchNorm2d in eval mode (running statistics) with GELU, channels-last `[rows, c]`.
    fn bn_eval_check(name: &str, rows: usize, c: usize, tol: f64, seed: u64) -> Check {
        Check {
            name: name.to_string(),
            family: "norm",
            shape: format!("{rows}x{c}"),
            tolerance: tol,
            body: body(move |gpu: &Gpu| {
                Box::pin(async move {
                    let mut rng = Rng::new(seed);
                    let x = rng.vec(rows * c);
                    let w = rng.vec(c);
                    let b = rng.vec(c);
                    let rm = rng.vec(c);
                    let rv: Vec<f32> = (0..c).map(|_| rng.range(0.1, 2.0) as f32).collect();
                    let t = |v: &[f32], s: &[usize]| gpu.upload(v, s);
                    let (tx, tw, tb) = (t(&x, &[rows, c])?, t(&w, &[c])?, t(&b, &[c])?);
                    let (trm, trv) = (t(&rm, &[c])?, t(&rv, &[c])?);
                    let layer = || crate::ops::norm::BnLayer {
                        w: &tw,
                        b: &tb,
                        running_mean: &trm,
                        running_var: &trv,
                    };
                    let mut rec = gpu.new_recorder();
                    let y =
                        crate::ops::norm::batch_norm_eval(&mut rec, &tx, layer(), 1e-5, Act::Gelu)?;
                    rec.submit()?;
                    let got = gpu.read_async(&y).await?;
                    let (w6, b6, rm6, rv6) = (f64s(&w), f64s(&b), f64s(&rm), f64s(&rv));
                    let bn = reference::norm::BnLayer {
                        w: &w6,
                        b: &b6,
                        running_mean: &rm6,
                        running_var: &rv6,
                    };
                    let want = reference::norm::batch_norm_eval(&f64s(&x), bn, c, 1e-5, Act::Gelu);
                    let ms = time_async(gpu, REPS, |rec| {
                        crate::ops::norm::batch_norm_eval(rec, &tx, layer(), 1e-5, Act::Gelu)
                            .map(|_| ())
                    })
                    .await?;
                    Ok(Outcome {
                        got,
                        want,
                        entry: String::new(),
                        ms: Some(ms),
                        flops: None,
                        bytes: Some(8.0 * (rows * c) as f64),
                        parts: Vec::new(),
                    })
                })
            }),
        }
    }

    /// The training kernels: backward passes, BatchNorm with batch statistics, the loss, the
    /// transposed convolution, the positional encoding. Awkward small shapes; model-sized ones
    /// with `full`.
    fn training_checks(full: bool) -> Vec<Check> {
        use backward::*;
        use reference::conv::ConvTShape;
        let cs = |b, h, w, ci, co, k, stride, pad| ConvShape {
            b,
            h,
            w,
            ci,
            co,
            k,
            stride,
            pad,
        };
        let mut v = vec![
            window_check("attention.window", [5, 7, 96, 3], false, 1e-5, 30),
            window_check("attention.window_backward", [3, 7, 15, 3], true, 5e-5, 31),
            mha_backward_check("attention.mha_backward", [2, 5, 300, 32, 4], 5e-5, 32),
            mha_backward_check(
                "attention.mha_backward_few_keys",
                [1, 300, 5, 16, 4],
                5e-5,
                33,
            ),
            ln_backward_check("norm.layer_norm_backward", 67, 96, 1e-5, 34),
            ln_backward_check("norm.layer_norm_backward_odd_c", 67, 37, 1e-5, 35),
            bn_train_check("norm.batch_norm_train", 143, 24, false, 1e-5, 36),
            bn_train_check("norm.batch_norm_backward", 143, 21, true, 1e-5, 37),
            gelu_backward_check("elementwise.gelu_backward", 20_001, 1e-6, 38),
            loss_check("loss.focal_dice", [2, 37, 29], 1e-5, 39),
            conv_backward_check(
                "conv.backward",
                cs(2, 11, 13, 6, 7, 3, 2, 1),
                false,
                2e-5,
                40,
            ),
            conv_backward_check(
                "conv.backward_1x1",
                cs(2, 5, 7, 6, 5, 1, 1, 0),
                false,
                2e-5,
                41,
            ),
            conv_backward_check(
                "depthwise.backward",
                cs(1, 11, 9, 7, 7, 3, 2, 1),
                true,
                2e-5,
                42,
            ),
            convt_check(
                "conv.transpose2x2",
                ConvTShape {
                    b: 2,
                    h: 5,
                    w: 7,
                    ci: 9,
                    co: 6,
                },
                false,
                1e-5,
                43,
            ),
            convt_check(
                "conv.transpose2x2_backward",
                ConvTShape {
                    b: 2,
                    h: 5,
                    w: 7,
                    ci: 9,
                    co: 5,
                },
                true,
                2e-5,
                44,
            ),
            pe_check("pe.random", 13, 17, 2e-6, 45),
            f16::f16_check("f16.storage", 1001, 1e-3, 46),
        ];
        if full {
            v.extend([
                window_check("attention.window_model", [64, 7, 160, 5], false, 1e-5, 50),
                window_check(
                    "attention.window_backward_model",
                    [64, 7, 160, 5],
                    true,
                    5e-5,
                    51,
                ),
                mha_backward_check(
                    "attention.mha_backward_model",
                    [1, 4096, 5, 256, 8],
                    5e-5,
                    52,
                ),
                ln_backward_check("norm.layer_norm_backward_model", 4096, 160, 1e-5, 53),
                bn_train_check("norm.batch_norm_backward_model", 4096, 160, true, 1e-5, 54),
                loss_check("loss.focal_dice_model", [2, 256, 256], 1e-5, 55),
                conv_backward_check(
                    "conv.backward_model",
                    cs(1, 32, 32, 64, 64, 3, 1, 1),
                    false,
                    2e-5,
                    56,
                ),
                convt_check(
                    "conv.transpose2x2_backward_model",
                    ConvTShape {
                        b: 1,
                        h: 64,
                        w: 64,
                        ci: 256,
                        co: 64,
                    },
                    true,
                    2e-5,
                    57,
                ),
                pe_check("pe.model", 64, 64, 2e-6, 58),
            ]);
        }
        v
    }

    fn checks(opts: &Options) -> Vec<Check> {
        let tiled = GemmConfig {
            path: GemmPath::Tiled,
            ..Default::default()
        };
        let blocked = |vec4: bool, lanes_n: bool| GemmConfig {
            path: GemmPath::Blocked,
            vec4: Some(vec4),
            lanes_n: Some(lanes_n),
            splits: None,
            subgroup: Some(false),
            small: None,
        };
        let split = GemmConfig {
            path: GemmPath::Blocked,
            splits: Some(4),
            ..Default::default()
        };
        let mut v = vec![
            gemm_check("gemm.tiled", 67, 65, 33, tiled, 1),
            gemm_check(
                "gemm.blocked_vec4_lanes_n",
                68,
                72,
                40,
                blocked(true, true),
                2,
            ),
            gemm_check(
                "gemm.blocked_vec4_lanes_m",
                68,
                72,
                40,
                blocked(true, false),
                3,
            ),
            gemm_check("gemm.blocked_scalar", 67, 65, 33, blocked(false, true), 4),
            // The automatic blocked choice: mm_sg where the adapter has 8-wide subgroups.
            gemm_check(
                "gemm.blocked_auto",
                100,
                72,
                40,
                GemmConfig {
                    path: GemmPath::Blocked,
                    ..Default::default()
                },
                19,
            ),
            gemm_check("gemm.split_k", 16, 16, 1024, split, 5),
            // What a linear layer runs at --precision f16: x W^T with W [N, K] stored as f16.
            gemm_check_b(
                "gemm.f16_weights",
                Gemm {
                    trans_b: true,
                    ..Gemm::new(100, 72, 40)
                },
                GemmConfig::default(),
                27,
                true,
            ),
            gelu_check("gelu.wide_range", 20_001, -10.0, 10.0, 1e-6),
            layer_norm_check("layer_norm.random", 77, 96, 0.0, 1e-5, 6),
            layer_norm_check("layer_norm.odd_c", 77, 37, 0.0, 1e-5, 7),
            layer_norm_check("layer_norm.large_mean", 64, 96, 1e4, 1e-3, 8),
            mha_check("attention.mha", [2, 5, 300, 24, 3], 1.5, 1e-5, 9),
            mha_check(
                "attention.mha_large_logits",
                [1, 16, 64, 32, 2],
                200.0,
                1e-5,
                10,
            ),
            conv_check(
                "conv.3x3_s2",
                ConvShape {
                    b: 1,
                    h: 17,
                    w: 15,
                    ci: 5,
                    co: 7,
                    k: 3,
                    stride: 2,
                    pad: 1,
                },
                false,
                1e-5,
                16,
            ),
            conv_check(
                "conv.1x1",
                ConvShape {
                    b: 2,
                    h: 9,
                    w: 11,
                    ci: 12,
                    co: 20,
                    k: 1,
                    stride: 1,
                    pad: 0,
                },
                false,
                1e-5,
                17,
            ),
            conv_check(
                "depthwise.3x3",
                ConvShape {
                    b: 1,
                    h: 19,
                    w: 13,
                    ci: 8,
                    co: 8,
                    k: 3,
                    stride: 1,
                    pad: 1,
                },
                true,
                1e-5,
                18,
            ),
            conv_check(
                "depthwise.odd_c",
                ConvShape {
                    b: 1,
                    h: 11,
                    w: 9,
                    ci: 7,
                    co: 7,
                    k: 3,
                    stride: 2,
                    pad: 1,
                },
                true,
                1e-5,
                19,
            ),
            resize_check("resize.down", [1, 37, 29, 3, 16, 12], 1e-6, 20),
            resize_check("resize.up", [2, 9, 7, 4, 31, 26], 1e-6, 21),
            adam_check("adam.adamw", 10_007, 1e-5, 25),
            bn_eval_check("batch_norm.eval", 143, 24, 1e-5, 26),
            otsu_check("otsu.constant", "constant 128", |_, _| 128),
            otsu_check("otsu.two_level", "two levels 40/200", |_, c| {
                if c < 20 { 40 } else { 200 }
            }),
        ];
        v.extend(training_checks(opts.full));
        let src = tiny::TinySource::of(opts);
        v.push(tiny::tiny_check(
            "model.tiny_paper",
            crate::model::Variant::Paper,
            src.clone(),
        ));
        if opts.full {
            v.push(tiny::tiny_check(
                "model.tiny_released",
                crate::model::Variant::Released,
                src.clone(),
            ));
            // One step takes about 25 s on a software rasteriser (2 cores): full mode only.
            v.push(tiny::train_step_check("model.tiny_train_step", src));
        }
        if opts.full {
            v.extend([
                gemm_check("gemm.tiled_model", 4096, 160, 160, tiled, 11),
                gemm_check(
                    "gemm.blocked_model",
                    4096,
                    160,
                    640,
                    blocked(true, true),
                    12,
                ),
                gemm_check("gemm.split_k_model", 64, 64, 16384, split, 13),
                gelu_check("gelu.model", 4096 * 640, -10.0, 10.0, 1e-6),
                layer_norm_check("layer_norm.model", 4096, 160, 0.0, 1e-5, 14),
                conv_check(
                    "conv.model_3x3",
                    ConvShape {
                        b: 1,
                        h: 64,
                        w: 64,
                        ci: 64,
                        co: 64,
                        k: 3,
                        stride: 1,
                        pad: 1,
                    },
                    false,
                    1e-5,
                    22,
                ),
                conv_check(
                    "depthwise.model_3x3",
                    ConvShape {
                        b: 1,
                        h: 64,
                        w: 64,
                        ci: 160,
                        co: 160,
                        k: 3,
                        stride: 1,
                        pad: 1,
                    },
                    true,
                    1e-5,
                    23,
                ),
                resize_check("resize.model", [1, 256, 256, 1, 1024, 1024], 1e-6, 24),
                mha_check("attention.mha_model", [1, 4096, 256, 256, 8], 1.5, 1e-5, 15),
            ]);
        }
        v
    }

    /// Compile and validation failures say so; anything else is a device error.
    fn classify(msg: &str) -> Verdict {
        let m = msg.to_ascii_lowercase();
        if m.contains("shader")
            || m.contains("compil")
            || m.contains("wgsl")
            || m.contains("pipeline")
        {
            Verdict::FailedToCompile
        } else {
            Verdict::DeviceError
        }
    }

    /// The names of the checks `opts` selects, in running order.
    pub fn check_names(opts: &Options) -> Vec<String> {
        selected(opts).map(|c| c.name).collect()
    }

    fn selected(opts: &Options) -> impl Iterator<Item = Check> + '_ {
        checks(opts)
            .into_iter()
            .filter(move |c| opts.only.as_deref().is_none_or(|o| c.name.contains(o)))
    }

    /// Runs the checks `opts` selects, one at a time, calling `each` after each; a check's
    /// failure is its verdict, never an error of the run. Natively a panicking check is caught
    /// (see [`run_checks`]); in the browser this is the entry point.
    pub async fn run_checks_async(
        gpu: &Gpu,
        opts: &Options,
        each: impl FnMut(&CheckRecord),
    ) -> Vec<CheckRecord> {
        run_each(gpu, opts, each, |c| (c.body)(gpu)).await
    }

    /// [`run_checks_async`], blocking; a check that panics is reported as its device error.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn run_checks(
        gpu: &Gpu,
        opts: &Options,
        each: impl FnMut(&CheckRecord),
    ) -> Vec<CheckRecord> {
        let run = |c: &Check| -> Fut<'_> {
            let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                pollster::block_on((c.body)(gpu))
            }))
            .unwrap_or_else(|p| {
                Err(anyhow::anyhow!(
                    "panicked: {}",
                    p.downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default()
                ))
            });
            Box::pin(std::future::ready(res))
        };
        pollster::block_on(run_each(gpu, opts, each, run))
    }

    /// Runs the selected checks in order, each through `run`, tracing the pipelines it uses and
    /// reporting its record to `each`.
    async fn run_each<'g>(
        gpu: &'g Gpu,
        opts: &Options,
        mut each: impl FnMut(&CheckRecord),
        mut run: impl FnMut(&Check) -> Fut<'g>,
    ) -> Vec<CheckRecord> {
        let mut out = Vec::new();
        for c in selected(opts) {
            gpu.trace_pipelines(true);
            let res = run(&c).await;
            let rec = record(gpu, opts, &c, res);
            each(&rec);
            out.push(rec);
        }
        out
    }

    /// The worst relative error over an outcome's parts, and that part's name ("" for one tensor).
    fn worst_part(o: &Outcome) -> (f64, &str) {
        let total: usize = o.parts.iter().map(|p| p.1).sum();
        if o.parts.is_empty() || total != o.got.len() || total != o.want.len() {
            return (rel_err(&o.got, &o.want), "");
        }
        let mut at = 0;
        let mut worst = (0.0f64, "");
        for (name, n) in &o.parts {
            let e = rel_err(&o.got[at..at + n], &o.want[at..at + n]);
            // NaN-safe: a non-finite error is the worst.
            if e.is_nan() || e > worst.0 {
                worst = (e, name.as_str());
            }
            at += n;
        }
        worst
    }

    /// The record of check `c` from its body's result (and the pipelines traced meanwhile).
    fn record(gpu: &Gpu, opts: &Options, c: &Check, res: anyhow::Result<Outcome>) -> CheckRecord {
        let used = gpu.trace_pipelines(false);
        let res = res.and_then(|o| gpu.take_errors().map(|_| o).map_err(anyhow::Error::from));
        let compiled: Vec<f64> = used.iter().filter_map(|u| u.compile_ms).collect();
        let compile_ms = (!compiled.is_empty()).then(|| compiled.iter().sum());
        let mut entries: Vec<&str> = Vec::new();
        for u in &used {
            if !entries.contains(&u.entry) {
                entries.push(u.entry);
            }
        }
        let entry = |detail: &str| {
            let mut e = if entries.len() > 6 {
                format!("{} entry points", entries.len())
            } else {
                entries.join(", ")
            };
            if e.is_empty() {
                e = detail.to_string();
            } else if !detail.is_empty() {
                e = format!("{e} ({detail})");
            }
            e
        };
        let pipelines = used
            .iter()
            .map(|u| PipelineRecord {
                family: u.family.into(),
                entry: u.entry.into(),
                compile_ms: u.compile_ms,
            })
            .collect();
        match res {
            Ok(mut o) => {
                if opts.fault.as_deref() == Some(c.name.as_str())
                    && let Some(x) = o.got.first_mut()
                {
                    *x += 1.0 + x.abs();
                }
                let (e, worst) = worst_part(&o);
                let ok = e <= c.tolerance;
                let ulp = ULP_FAMILIES
                    .contains(&c.family)
                    .then(|| ulp_stats(&o.got, &o.want))
                    .flatten();
                CheckRecord {
                    name: c.name.clone(),
                    family: c.family.into(),
                    entry: entry(&o.entry),
                    shape: c.shape.clone(),
                    max_rel_err: Some(e),
                    tolerance: c.tolerance,
                    verdict: if ok {
                        Verdict::Pass
                    } else {
                        Verdict::OutOfTolerance
                    },
                    ms: o.ms,
                    gflops: o.ms.zip(o.flops).map(|(ms, f)| f / (ms * 1e6)),
                    gbps: o.ms.zip(o.bytes).map(|(ms, b)| b / (ms * 1e6)),
                    message: (!ok).then(|| {
                        let at = if worst.is_empty() {
                            String::new()
                        } else {
                            format!(" ({worst})")
                        };
                        format!("relative error {e:.3e} > tolerance {:.1e}{at}", c.tolerance)
                    }),
                    compile_ms,
                    pipelines,
                    ulp_max: ulp.map(|u| u.0),
                    ulp_median: ulp.map(|u| u.1),
                }
            }
            Err(e) => {
                let msg = crate::error::report(e.as_ref());
                let verdict = if e.downcast_ref::<Skip>().is_some() {
                    Verdict::Skipped
                } else {
                    classify(&msg)
                };
                CheckRecord {
                    name: c.name.clone(),
                    family: c.family.into(),
                    entry: entry(""),
                    shape: c.shape.clone(),
                    max_rel_err: None,
                    tolerance: c.tolerance,
                    verdict,
                    ms: None,
                    gflops: None,
                    gbps: None,
                    message: Some(msg),
                    compile_ms,
                    pipelines,
                    ulp_max: None,
                    ulp_median: None,
                }
            }
        }
    }

    /// A report of `checks` run on `gpu`.
    pub fn report(gpu: &Gpu, opts: &Options, checks: Vec<CheckRecord>) -> Report {
        let i = &gpu.info;
        let passed = checks.iter().filter(|c| c.verdict == Verdict::Pass).count();
        let skipped = checks
            .iter()
            .filter(|c| c.verdict == Verdict::Skipped)
            .count();
        Report {
            schema: SCHEMA.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            mode: if opts.full { "full" } else { "quick" }.into(),
            adapter: AdapterRecord {
                name: i.name.clone(),
                backend: format!("{:?}", i.backend),
                driver: i.driver.clone(),
                driver_info: i.driver_info.clone(),
                device_type: format!("{:?}", i.device_type),
            },
            limits: limits_json(&gpu.limits),
            features: gpu
                .features
                .iter_names()
                .map(|(n, _)| n.to_string())
                .collect(),
            failed: checks.len() - passed - skipped,
            passed,
            checks,
        }
    }

    fn limits_json(l: &wgpu::Limits) -> serde_json::Value {
        serde_json::json!({
            "max_storage_buffer_binding_size": l.max_storage_buffer_binding_size,
            "max_buffer_size": l.max_buffer_size,
            "max_compute_workgroup_storage_size": l.max_compute_workgroup_storage_size,
            "max_compute_invocations_per_workgroup": l.max_compute_invocations_per_workgroup,
            "max_compute_workgroups_per_dimension": l.max_compute_workgroups_per_dimension,
            "max_storage_buffers_per_shader_stage": l.max_storage_buffers_per_shader_stage,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ulp_distance_counts_representable_floats() {
        let one = 1.0f32;
        let next = f32::from_bits(one.to_bits() + 1);
        assert_eq!(ulp_distance(one, one), Some(0));
        assert_eq!(ulp_distance(one, next), Some(1));
        assert_eq!(ulp_distance(next, one), Some(1));
        assert_eq!(ulp_distance(0.0, -0.0), Some(0));
        // The smallest subnormals on each side of zero are two steps apart (through zero).
        let tiny = f32::from_bits(1);
        assert_eq!(ulp_distance(tiny, -tiny), Some(2));
        // 1.0 to 2.0 is one binade: 2^23 steps.
        assert_eq!(ulp_distance(1.0, 2.0), Some(1 << 23));
        assert_eq!(ulp_distance(f32::NAN, 1.0), None);
    }

    #[test]
    fn ulp_stats_skip_elements_far_below_the_scale() {
        // 1e-30 against 0: billions of ULPs, but below 1e-3 of the scale (1.0): not counted.
        let got = [1.0f32, f32::from_bits(0.5f32.to_bits() + 3), 1e-30];
        let want = [1.0f64, 0.5, 0.0];
        assert_eq!(ulp_stats(&got, &want), Some((3, 3)));
        assert_eq!(ulp_stats(&[0.0], &[0.0]), None);
        assert_eq!(ulp_stats(&[1.0, 2.0], &[1.0]), None);
    }
}
