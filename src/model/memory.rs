//! The memory guard: before a forward or a training step, an estimate of the device and host
//! memory it needs, from the configuration, the input size and the batch, checked against what
//! the machine has. Work that cannot fit is refused up front with the estimate and the limit,
//! instead of failing (or swapping the machine to a halt) half-way through.
//!
//! The estimate is an upper bound fitted to the buffer pool's measured peaks (weights, live
//! activations and the pool's cached free buffers) and scaled by a margin; `tests/memory_guard.rs`
//! checks it against fresh measurements of both presets at several sizes and batches.
//!
//! Where the limit comes from, first match wins:
//! 1. `MEDFASTSAM_MAX_MEMORY` (bytes, or with a `K`, `M`, `G` suffix, powers of 1024);
//! 2. on a software (CPU) adapter, whose "device" memory is host memory: the host's available
//!    memory (`MemAvailable` in `/proc/meminfo`) for device and host work together;
//! 3. otherwise no total is known (wgpu does not report a GPU's memory size): only the host side
//!    is checked, and the per-buffer limits are checked when each dispatch is recorded.

use super::config::Config;
use super::schema;
use crate::error::{Error, Result};
use crate::gpu::Gpu;

/// Bytes a piece of work needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryEstimate {
    /// Device buffers (weights, activations, pooled buffers).
    pub device: u64,
    /// Host memory beyond the device buffers (decoded images, resized copies, read-back logits).
    pub host: u64,
}

/// f32 bytes of every parameter and buffer in the configuration's state dict.
pub fn weight_bytes(cfg: &Config) -> u64 {
    schema::specs(cfg)
        .iter()
        .map(|s| s.numel() as u64 * 4)
        .sum()
}

/// The MBConv hidden map of one image, in floats: (S/4)² positions × expand·C0 channels. The
/// eval forward reuses buffers, so its peak follows the largest map it holds, which is this one.
fn mbconv_hidden(cfg: &Config) -> f64 {
    let q = (cfg.image_size / 4) as f64;
    q * q * (cfg.embed_dims[0] * cfg.mbconv_expand_ratio) as f64
}

/// What a training step saves for the backward, in floats per image: for every block, its width
/// times its expansion (MBConv's expand ratio, the MLP ratio of TinyViT blocks) times the positions
/// of its stage (S/4, S/8, S/16, S/16: the last patch merging keeps the resolution).
fn saved_volume(cfg: &Config) -> f64 {
    let s = cfg.image_size as f64;
    let pos = [s / 4.0, s / 8.0, s / 16.0, s / 16.0].map(|side| side * side);
    (0..4)
        .map(|i| {
            let ratio = if i == 0 {
                cfg.mbconv_expand_ratio
            } else {
                cfg.mlp_ratio
            };
            (cfg.depths[i] * cfg.embed_dims[i] * ratio) as f64 * pos[i]
        })
        .sum()
}

// Fits to the pool's peak_allocated on lavapipe: eval forwards of the tiny preset at 64², 128²,
// 256² and the paper preset at 256², 512², 1024² (activation bytes = 4 × 11.1 × mbconv_hidden +
// 4.9 MiB, residuals within 3 % at 256² and above); training steps (their memory views,
// `medfastsam bench --memory`) of tiny at 64² and 128² batch 2 and 256² batch 4, and paper at
// 128², 256², 512² batch 2, 512² batch 4 (semi) and 1024² batch 2 and 4, beyond weights,
// gradients and Adam moments: the per-image constants whose estimate (with MARGIN) is at least
// 1.02 times every measurement with the smallest largest ratio (1.42, tiny at 64²). They were
// 10.2 / 134 / 64 MiB before the backward recomputed its cheap activations and released the saved
// ones as it went (paper 1024² batch 4: 13.9 GiB then, 6.45 GiB now).
const FORWARD_PER_HIDDEN: f64 = 11.2;
const FORWARD_FIXED: f64 = 5.0 * MIB;
const TRAIN_PER_SAVED: f64 = 5.6;
const TRAIN_PER_PIXEL: f64 = 85.0;
const TRAIN_FIXED: f64 = 32.0 * MIB;
const MARGIN: f64 = 1.15;
const MIB: f64 = 1048576.0;

/// A forward in eval mode of `batch` images at the configuration's size, with the logits resized
/// to an original image of `orig_w × orig_h` (0 × 0: no resize).
pub fn forward(cfg: &Config, batch: usize, orig_w: usize, orig_h: usize) -> MemoryEstimate {
    let s = cfg.image_size as u64;
    let orig = (orig_w as u64).saturating_mul(orig_h as u64);
    let act = 4.0 * FORWARD_PER_HIDDEN * mbconv_hidden(cfg) * batch as f64 + FORWARD_FIXED;
    let device = (MARGIN * act) as u64 + weight_bytes(cfg) + orig.saturating_mul(4);
    // Decoded RGB + its S×S copy (RGB and packed) + read-back logits (f32) + mask, coarse prompt
    // and overlay at the original size.
    let host = orig.saturating_mul(3 + 4 + 1 + 1 + 3) + s * s * (3 + 4) * batch as u64;
    MemoryEstimate { device, host }
}

/// One training step (forward in train mode, loss, backward, Adam) of `batch` images.
pub fn train_step(cfg: &Config, batch: usize) -> MemoryEstimate {
    let s = cfg.image_size as u64;
    let per_image = 4.0 * (TRAIN_PER_SAVED * saved_volume(cfg) + TRAIN_PER_PIXEL * (s * s) as f64);
    let act = per_image * batch as f64 + TRAIN_FIXED;
    // Weights, gradients and two Adam moments on the device; a host copy for checkpoints.
    let w = weight_bytes(cfg);
    let device = (MARGIN * act) as u64 + 4 * w;
    let host = 4 * w + s * s * (3 + 1 + 4 + 4) * batch as u64;
    MemoryEstimate { device, host }
}

#[cfg_attr(target_arch = "wasm32", allow(dead_code))]
fn parse_bytes(v: &str) -> Option<u64> {
    let v = v.trim();
    let (num, mul) = match v.chars().last()?.to_ascii_uppercase() {
        'K' => (&v[..v.len() - 1], 1u64 << 10),
        'M' => (&v[..v.len() - 1], 1 << 20),
        'G' => (&v[..v.len() - 1], 1 << 30),
        _ => (v, 1),
    };
    let n: f64 = num.trim().parse().ok()?;
    (n.is_finite() && n >= 0.0).then_some((n * mul as f64) as u64)
}

/// Host memory available now (Linux `MemAvailable`), if known.
fn host_available() -> Option<u64> {
    #[cfg(all(not(target_arch = "wasm32"), target_os = "linux"))]
    {
        let text = std::fs::read_to_string("/proc/meminfo").ok()?;
        let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    }
    #[cfg(not(all(not(target_arch = "wasm32"), target_os = "linux")))]
    {
        None
    }
}

/// Where a limit came from, for the message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitSource {
    Env,
    HostMemory,
}

/// The memory limit in force for `gpu`: (bytes, source, whether device buffers count against
/// it). None where nothing is known.
pub fn limit(gpu: &Gpu) -> Option<(u64, LimitSource, bool)> {
    #[cfg(not(target_arch = "wasm32"))]
    if let Some(b) = std::env::var("MEDFASTSAM_MAX_MEMORY")
        .ok()
        .as_deref()
        .and_then(parse_bytes)
    {
        return Some((b, LimitSource::Env, true));
    }
    let software = gpu.info.device_type == wgpu::DeviceType::Cpu;
    host_available().map(|b| (b, LimitSource::HostMemory, software))
}

fn mib(b: u64) -> String {
    if b >= 10 << 30 {
        format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.0} MiB", b as f64 / (1u64 << 20) as f64)
    }
}

/// Refuses `what` when its estimate exceeds the limit in force (see the module comment).
pub fn check(gpu: &Gpu, what: &str, est: MemoryEstimate) -> Result<()> {
    let Some((lim, src, device_counts)) = limit(gpu) else {
        return Ok(());
    };
    let need = est
        .host
        .saturating_add(if device_counts { est.device } else { 0 });
    if need <= lim {
        return Ok(());
    }
    let (name, hint) = match src {
        LimitSource::Env => (
            "MEDFASTSAM_MAX_MEMORY",
            "raise MEDFASTSAM_MAX_MEMORY if the machine has more",
        ),
        LimitSource::HostMemory if device_counts => (
            "available host memory (the software adapter keeps device buffers in host memory)",
            "use a smaller --size or batch, free memory, or run on a GPU",
        ),
        LimitSource::HostMemory => (
            "available host memory",
            "use a smaller image, --size or batch, or free memory",
        ),
    };
    Err(Error::Invalid(format!(
        "not enough memory: {what} needs about {} ({} device + {} host) but the {name} is {}; {hint}",
        mib(need),
        mib(est.device),
        mib(est.host),
        mib(lim)
    )))
}

/// [`check`] for one forward of `batch` images at the configuration's size (before any image
/// is known).
pub fn check_forward(gpu: &Gpu, cfg: &Config, batch: usize) -> Result<()> {
    let s = cfg.image_size;
    check(
        gpu,
        &format!("a forward at {s}x{s}, batch {batch}"),
        forward(cfg, batch, 0, 0),
    )
}

/// [`check`] for one training step.
pub fn check_train(gpu: &Gpu, cfg: &Config, batch: usize) -> Result<()> {
    let s = cfg.image_size;
    check(
        gpu,
        &format!("a training step at {s}x{s}, batch {batch}"),
        train_step(cfg, batch),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn byte_sizes_parse() {
        assert_eq!(parse_bytes("1024"), Some(1024));
        assert_eq!(parse_bytes("2K"), Some(2048));
        assert_eq!(parse_bytes("1.5g"), Some(3 << 29));
        assert_eq!(parse_bytes("x"), None);
        assert_eq!(parse_bytes("-1M"), None);
    }
}
