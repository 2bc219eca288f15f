//! Operations: one module per op family, each recording WGSL dispatches; `reference` holds the
//! plain CPU f64 versions the tests compare against.

pub mod attention;
pub mod conv;
pub mod elementwise;
pub mod loss;
pub mod matmul;
pub mod norm;
pub mod optim;
pub mod otsu;
pub mod pe;
pub mod reference;
pub mod resize;

pub use matmul::Act;

/// A size or index as a u32 uniform field (panics past u32, which a uniform cannot hold).
pub(crate) fn u(v: usize) -> u32 {
    u32::try_from(v).expect("parameter exceeds u32")
}

use crate::error::Result;
use crate::gpu::{Gpu, Recorder};

/// One micro-benchmark line: a kernel at one of the model's real shapes.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchResult {
    pub name: String,
    /// Median milliseconds per call.
    pub ms: f64,
    pub gflops: Option<f64>,
    pub gbps: Option<f64>,
}

impl std::fmt::Display for BenchResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:<48} {:>9.3} ms", self.name, self.ms)?;
        if let Some(g) = self.gflops {
            write!(f, " {g:>8.2} GFLOP/s")?;
        }
        if let Some(g) = self.gbps {
            write!(f, " {g:>8.2} GB/s")?;
        }
        Ok(())
    }
}

/// Times `record` (which records one call of a kernel): one warm-up submission (compiles the
/// pipelines), then `reps` timed submissions, each waited for. Returns the median ms. Async, so
/// the page (which cannot block on the device) and the native tools time the same way.
pub async fn time_async(
    gpu: &Gpu,
    reps: usize,
    mut record: impl FnMut(&mut Recorder) -> Result<()>,
) -> Result<f64> {
    let mut v = Vec::new();
    for i in 0..=reps.max(1) {
        let t0 = crate::gpu::now_ms();
        let mut rec = gpu.new_recorder();
        record(&mut rec)?;
        rec.submit()?;
        gpu.wait_idle().await?;
        if i > 0 {
            v.push(crate::gpu::now_ms() - t0);
        }
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Ok(v[v.len() / 2])
}

/// [`time_async`], blocking.
#[cfg(not(target_arch = "wasm32"))]
pub fn time_op(
    gpu: &Gpu,
    reps: usize,
    record: impl FnMut(&mut Recorder) -> Result<()>,
) -> Result<f64> {
    pollster::block_on(time_async(gpu, reps, record))
}

/// A benchmark line from a median time and the work done per call.
pub fn bench_line(
    name: impl Into<String>,
    ms: f64,
    flops: Option<f64>,
    bytes: Option<f64>,
) -> BenchResult {
    BenchResult {
        name: name.into(),
        ms,
        gflops: flops.map(|f| f / (ms * 1e6)),
        gbps: bytes.map(|b| b / (ms * 1e6)),
    }
}
