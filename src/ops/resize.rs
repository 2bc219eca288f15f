//! Bilinear resize (shaders/resize.wgsl), PyTorch `F.interpolate(mode="bilinear",
//! align_corners=False, antialias=False)` on channels-last `[B, H, W, C]`, and its backward.
//! Source coordinate along an axis: `src = max((dst + 0.5) * in/out - 0.5, 0)`, lower tap
//! `floor(src)`, upper tap clamped to `in - 1`. The kernel evaluates `src` exactly in integers
//! (`2*out*src = (2*dst + 1)*in - out`), so the taps are exact and only the weights are rounded;
//! PyTorch evaluates `src` in f32, which is identical for power-of-two ratios (the model's x4
//! resizes) and otherwise differs by the rounding of the coordinate (~1 ulp of `src`).

use crate::error::{Error, Result};
use crate::gpu::{Kernel, Recorder, ShaderFamily, Tensor};

#[cfg(not(target_arch = "wasm32"))]
use super::{BenchResult, bench_line, time_op};
#[cfg(not(target_arch = "wasm32"))]
use crate::gpu::Gpu;

crate::uniform! {
    /// resize.wgsl `ResizeParams`.
    struct ResizeParams { n: u32, bsz: u32, h: u32, w: u32, c: u32, oh: u32, ow: u32, pad: u32, sy: f32, sx: f32 }
}

fn params(n: usize, b: usize, h: usize, w: usize, c: usize, oh: usize, ow: usize) -> ResizeParams {
    use super::u;
    let (sy, sx) = (h as f32 / oh as f32, w as f32 / ow as f32);
    ResizeParams {
        n: u(n),
        bsz: u(b),
        h: u(h),
        w: u(w),
        c: u(c),
        oh: u(oh),
        ow: u(ow),
        pad: 0,
        sy,
        sx,
    }
}

/// The kernels evaluate `(2*dst + 1) * in` in u32.
fn check_sizes(what: &str, h: usize, w: usize, oh: usize, ow: usize) -> Result<()> {
    if (2 * oh + 1) as u64 * h as u64 >= 1 << 32 || (2 * ow + 1) as u64 * w as u64 >= 1 << 32 {
        return Err(Error::Invalid(format!(
            "{what}: sizes {h}x{w} -> {oh}x{ow} are too large"
        )));
    }
    Ok(())
}

fn dims4(what: &str, t: &Tensor) -> Result<[usize; 4]> {
    if t.shape.len() != 4 {
        return Err(Error::Invalid(format!(
            "{what}: expected [B,H,W,C], got {:?}",
            t.shape
        )));
    }
    Ok([t.shape[0], t.shape[1], t.shape[2], t.shape[3]])
}

/// Bilinear resize, PyTorch align_corners=False, no antialias: src = (dst+0.5)*in/out - 0.5, clamped
/// below at 0, upper neighbour clamped to in-1. x [B,H,W,C] -> [B,oh,ow,C]. Any sizes (down x4, up x4,
/// arbitrary e.g. 256 -> 767x576).
pub fn bilinear(rec: &mut Recorder, x: &Tensor, oh: usize, ow: usize) -> Result<Tensor> {
    let [b, h, w, c] = dims4("bilinear", x)?;
    if (h == 0 || w == 0) && oh * ow > 0 {
        return Err(Error::Invalid(format!(
            "bilinear: cannot resize empty {:?} to {oh}x{ow}",
            x.shape
        )));
    }
    check_sizes("bilinear", h, w, oh, ow)?;
    let y = rec.gpu.empty(&[b, oh, ow, c])?;
    let n = y.numel();
    if n == 0 {
        return Ok(y);
    }
    let k = Kernel::new(ShaderFamily::Resize, "bilinear", 256);
    let groups = rec.grid(n.div_ceil(256));
    rec.dispatch(&k, params(n, b, h, w, c, oh, ow), &[x, &y], groups)?;
    Ok(y)
}

/// Gradient of [`bilinear`]: accumulates `dx [B,H,W,C] += dL/dx` given `dy [B,oh,ow,C]` = dL/dy.
/// The sizes come from the two tensors. Gather form (one invocation per dx element over the
/// output indices that can reach it), so no atomics.
pub fn bilinear_backward(rec: &mut Recorder, dy: &Tensor, dx: &Tensor) -> Result<()> {
    let [b, oh, ow, c] = dims4("bilinear_backward dy", dy)?;
    let [b2, h, w, c2] = dims4("bilinear_backward dx", dx)?;
    if b != b2 || c != c2 {
        return Err(Error::Invalid(format!(
            "bilinear_backward: dy {:?} vs dx {:?}",
            dy.shape, dx.shape
        )));
    }
    check_sizes("bilinear_backward", h, w, oh, ow)?;
    let n = dx.numel();
    if n == 0 || dy.numel() == 0 {
        return Ok(());
    }
    let k = Kernel::new(ShaderFamily::Resize, "bilinear_backward", 256);
    let groups = rec.grid(n.div_ceil(256));
    rec.dispatch(&k, params(n, b, h, w, c, oh, ow), &[dy, dx], groups)
}

/// Micro-benchmarks at the model's shapes: logits 256² -> 1024² (1 channel), Otsu mask
/// 1024² -> 256², and the backward of the upsampling.
#[cfg(not(target_arch = "wasm32"))]
pub fn bench(gpu: &Gpu) -> Result<Vec<BenchResult>> {
    let reps = 7;
    let mut out = Vec::new();
    let fill = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0)
            .collect()
    };
    for (name, hin, hout) in [
        ("bilinear 256²->1024² 1ch", 256, 1024),
        ("bilinear 1024²->256² 1ch", 1024, 256),
    ] {
        let x = gpu.upload(&fill(hin * hin), &[1, hin, hin, 1])?;
        let bytes = 4.0 * (hin * hin + hout * hout) as f64;
        let ms = time_op(gpu, reps, |rec| bilinear(rec, &x, hout, hout).map(|_| ()))?;
        out.push(bench_line(name, ms, None, Some(bytes)));
    }
    let dy = gpu.upload(&fill(1024 * 1024), &[1, 1024, 1024, 1])?;
    let dx = gpu.empty(&[1, 256, 256, 1])?;
    let ms = time_op(gpu, reps, |rec| bilinear_backward(rec, &dy, &dx))?;
    out.push(bench_line(
        "bilinear 256²->1024² 1ch backward",
        ms,
        None,
        Some(4.0 * (1024.0 * 1024.0 + 2.0 * 65536.0)),
    ));
    Ok(out)
}
