//! SAM random-Fourier positional encoding (shaders/pe.wgsl): the dense PE of the prompt encoder,
//! a constant of the loaded weights that can be computed once per grid size.

use crate::error::{Error, Result};
use crate::gpu::{Kernel, Recorder, ShaderFamily, Tensor};

crate::uniform! {
    /// pe.wgsl `PeParams`.
    struct PeParams { h: u32, w: u32, n: u32, pad: u32 }
}

/// gauss [2,128] (prompt_encoder.pe_layer.positional_encoding_gaussian_matrix). For cell (row y, col x)
/// of an h x w grid: c = (2*(x+0.5)/w - 1, 2*(y+0.5)/h - 1) (x first); z = 2*pi*(c . G) (128 values);
/// pe = [sin z, cos z] -> out [h, w, 256] (channels-last).
///
/// Accurate to ~1e-6 absolute for |G| up to a few units (the argument is reduced in turns with
/// exact integer arithmetic; see shaders/pe.wgsl). Grid sides up to 65,536.
pub fn dense_pe(rec: &mut Recorder, gauss: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    if gauss.numel() != 256 || gauss.shape.first() != Some(&2) {
        return Err(Error::Invalid(format!(
            "dense_pe: gaussian matrix must be [2, 128], got {:?}",
            gauss.shape
        )));
    }
    if h == 0 || w == 0 || h > 65_536 || w > 65_536 {
        return Err(Error::Invalid(format!(
            "dense_pe: grid {h}x{w} must have sides in 1..=65536"
        )));
    }
    let out = rec.gpu.empty(&[h, w, 256])?;
    let n = h * w * 128;
    let groups = rec.grid(n.div_ceil(256));
    let k = Kernel::new(ShaderFamily::Pe, "dense_pe", 256);
    let p = PeParams {
        h: super::u(h),
        w: super::u(w),
        n: super::u(n),
        pad: 0,
    };
    rec.dispatch(&k, p, &[gauss, &out], groups)?;
    Ok(out)
}

/// Micro-benchmark: the 64x64 grid of the paper configuration.
#[cfg(not(target_arch = "wasm32"))]
pub fn bench(gpu: &crate::gpu::Gpu) -> Result<Vec<crate::ops::BenchResult>> {
    use crate::ops::{bench_line, time_op};
    let mut rng = crate::rng::Rng::new(7);
    let g: Vec<f32> = (0..256).map(|_| rng.normal() as f32).collect();
    let g = gpu.upload(&g, &[2, 128])?;
    let ms = time_op(gpu, 20, |rec| {
        dense_pe(rec, &g, 64, 64)?;
        Ok(())
    })?;
    let bytes = (64 * 64 * 256 * 4) as f64;
    Ok(vec![bench_line(
        "dense_pe 64x64x256",
        ms,
        None,
        Some(bytes),
    )])
}
