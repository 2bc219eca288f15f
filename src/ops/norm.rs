//! Normalisation kernels (shaders/norm.wgsl): LayerNorm over the last dim (token LayerNorm and
//! LayerNorm2d on channels-last maps) and BatchNorm2d on channels-last maps.
//!
//! Both see a `[rows, C]` matrix (rows = every leading dim). LayerNorm uses one team of
//! `T = next_pow2(C)` (≤ 256) invocations per row, with a two-pass mean / variance in f32.
//! Every reduction over rows (LayerNorm dw/db, BatchNorm statistics and gradients) is two-level and
//! deterministic: per-workgroup partial sums over fixed row chunks, then one workgroup per column
//! sums the partials in a fixed order. No atomics.

use super::matmul::Act;
use crate::error::{Error, Result};
use crate::gpu::{Kernel, Params, Recorder, ShaderFamily, Tensor};

/// Threads per row of the LayerNorm kernels.
fn team_size(c: usize) -> u32 {
    c.next_power_of_two().clamp(1, 256) as u32
}

fn norm_kernel(entry: &'static str, inv: u32) -> Kernel {
    Kernel::new(ShaderFamily::Norm, entry, inv)
}

fn check_ln(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<(usize, usize)> {
    let c = *x.shape.last().ok_or_else(|| Error::Invalid("layer_norm: scalar input".into()))?;
    if c == 0 || w.numel() != c || b.numel() != c {
        return Err(Error::Invalid(format!(
            "layer_norm: input {:?}, weight {:?}, bias {:?} (weight and bias need C = {c} values)",
            x.shape, w.shape, b.shape
        )));
    }
    Ok((x.numel() / c, c))
}

/// LayerNorm over the last dim C: y = (x - mean)/sqrt(var + eps) * w + b (biased variance), then act.
/// Used with eps 1e-5 (token LayerNorm) and 1e-6 (LayerNorm2d on channels-last maps).
pub fn layer_norm(rec: &mut Recorder, x: &Tensor, w: &Tensor, b: &Tensor, eps: f32, act: Act) -> Result<Tensor> {
    let (rows, c) = check_ln(x, w, b)?;
    let y = rec.gpu.empty(&x.shape)?;
    let t = team_size(c);
    let k = norm_kernel("ln_fwd", 256).u("T", t).u("ACT", act.code());
    let groups = rec.grid(rows.div_ceil((256 / t) as usize));
    rec.dispatch(&k, Params::new().u(rows).u(c).f(eps).u(0), &[x, w, b, &y], groups)?;
    Ok(y)
}

/// What [`layer_norm_backward`] needs from a training forward.
#[derive(Clone, Debug)]
pub struct LnSaved {
    /// Per-row mean, `[rows]`.
    pub mean: Tensor,
    /// Per-row 1/sqrt(var + eps), `[rows]`.
    pub rstd: Tensor,
    /// The pre-activation `(x - mean) * rstd * w + b` (only when `act != Act::None`).
    pub pre: Option<Tensor>,
    pub act: Act,
}

/// Training forward of [`layer_norm`]: same output, plus the per-row statistics (and the
/// pre-activation when `act` is not `Act::None`) for [`layer_norm_backward`].
pub fn layer_norm_train(
    rec: &mut Recorder,
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f32,
    act: Act,
) -> Result<(Tensor, LnSaved)> {
    let (rows, c) = check_ln(x, w, b)?;
    let y = rec.gpu.empty(&x.shape)?;
    let mean = rec.gpu.empty(&[rows])?;
    let rstd = rec.gpu.empty(&[rows])?;
    let pre = if act != Act::None { Some(rec.gpu.empty(&x.shape)?) } else { None };
    let dummy = rec.gpu.dummy();
    let t = team_size(c);
    let k = norm_kernel("ln_fwd_train", 256).u("T", t).u("ACT", act.code());
    let groups = rec.grid(rows.div_ceil((256 / t) as usize));
    rec.dispatch(
        &k,
        Params::new().u(rows).u(c).f(eps).u(0),
        &[x, w, b, &y, &mean, &rstd, pre.as_ref().unwrap_or(&dummy)],
        groups,
    )?;
    Ok((y, LnSaved { mean, rstd, pre, act }))
}
