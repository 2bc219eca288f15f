//! Training loss (shaders/loss.wgsl): focal + dice on `p = sigmoid(logits)` against a binary
//! target, as used for `tiny.train` (see the fixtures' README), and its gradient dL/dlogits.
//!
//! `logits` and `target` hold B images of HW pixels (`[B, 1, H, W]` = `[B, H, W, 1]` = `[B, H, W]`
//! in memory); the target is f32 in {0, 1}.
//! - focal: `FL = mean over all B*HW pixels of a_t * BCEwithLogits(l, t) * (1 - p_t)^gamma`,
//!   `p_t = p t + (1-p)(1-t)`, `a_t = alpha t + (1-alpha)(1-t)`;
//! - dice per image: `1 - (2 Σ p t + s) / (Σ p + Σ t + s)`, averaged over the batch (evaluated as
//!   `Σ (1 - p_t) / (Σ p + Σ t + s)`, the same quantity without cancellation);
//! - `L = lambda * FL + (1 - lambda) * D`.
//!
//! All sums are two-level (per image and pixel chunk, then per image in a fixed order), so the
//! values and the gradient are reproducible bit for bit.
//!
//! Also the feature distillation loss of `medfastsam distill` ([`mse_loss`]): the mean squared
//! error between a student's and a teacher's image embeddings and its gradient `2 (s − t) / N`,
//! with the same two-level deterministic reduction.

use super::u;
use crate::error::{Error, Result};
use crate::gpu::{Kernel, Recorder, ShaderFamily, Tensor};

crate::uniform! {
    /// loss.wgsl `LossParams` (loss_partial, loss_reduce).
    struct LossParams { hw: u32, nimg: u32, chunk_px: u32, nchunks: u32, alpha: f32, gamma: f32, pad0: u32, pad1: u32 }
}
crate::uniform! {
    /// loss.wgsl `FinalParams` (loss_finalize).
    struct FinalParams { nimg: u32, inv_pixels: f32, lambda: f32, smoothing: f32 }
}
crate::uniform! {
    /// loss.wgsl `GradParams` (loss_grad).
    struct GradParams { n: u32, hw: u32, alpha: f32, gamma: f32, cf: f32, cd: f32, smoothing: f32, pad: u32 }
}

/// Loss hyper-parameters; the defaults are those of the paper's training (and `tiny.train`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossConfig {
    /// Weight of the focal term; the dice term gets `1 - lambda`.
    pub lambda: f32,
    /// Focal alpha (weight of positive pixels).
    pub alpha: f32,
    /// Focal gamma.
    pub gamma: f32,
    /// Dice smoothing.
    pub smooth: f32,
    /// Factor applied to the gradient (e.g. `1 / accumulation_steps`); the loss values are unscaled.
    pub grad_scale: f32,
}

impl Default for LossConfig {
    fn default() -> Self {
        LossConfig {
            lambda: 0.8,
            alpha: 0.25,
            gamma: 2.0,
            smooth: 1.0,
            grad_scale: 1.0,
        }
    }
}

fn kernel(entry: &'static str, inv: u32) -> Kernel {
    Kernel::new(ShaderFamily::Loss, entry, inv)
}

struct Plan {
    nimg: usize,
    hw: usize,
    chunk_px: usize,
    nchunks: usize,
}

fn plan(logits: &Tensor, target: &Tensor) -> Result<Plan> {
    if logits.shape.is_empty() || logits.numel() == 0 || logits.numel() != target.numel() {
        return Err(Error::Invalid(format!(
            "seg_loss: logits {:?} and target {:?} must be [B, ...] with the same number of pixels",
            logits.shape, target.shape
        )));
    }
    let nimg = logits.shape[0];
    let hw = logits.numel() / nimg;
    // At least 8 pixels per invocation, at most 256 chunks per image.
    let nchunks = hw.div_ceil(256 * 8).clamp(1, 256);
    let chunk_px = hw.div_ceil(nchunks);
    let nchunks = hw.div_ceil(chunk_px);
    Ok(Plan {
        nimg,
        hw,
        chunk_px,
        nchunks,
    })
}

fn loss_params(p: &Plan, cfg: &LossConfig) -> LossParams {
    LossParams {
        hw: u(p.hw),
        nimg: u(p.nimg),
        chunk_px: u(p.chunk_px),
        nchunks: u(p.nchunks),
        alpha: cfg.alpha,
        gamma: cfg.gamma,
        pad0: 0,
        pad1: 0,
    }
}

/// Records the per-image sums `[B, 5]` = (Σ focal_i, Σ p t, Σ p, Σ t, Σ (1 - p_t)).
fn image_sums(
    rec: &mut Recorder,
    logits: &Tensor,
    target: &Tensor,
    cfg: &LossConfig,
    p: &Plan,
) -> Result<Tensor> {
    let part = rec.gpu.empty(&[p.nimg, 5, p.nchunks])?;
    let g = rec.grid(p.nimg * p.nchunks);
    rec.dispatch(
        &kernel("loss_partial", 256),
        loss_params(p, cfg),
        &[logits, target, &part],
        g,
    )?;
    let sums = rec.gpu.empty(&[p.nimg, 5])?;
    let g = rec.grid(p.nimg * 5);
    rec.dispatch(
        &kernel("loss_reduce", 64),
        loss_params(p, cfg),
        &[&part, &sums],
        g,
    )?;
    Ok(sums)
}

fn values_from_sums(
    rec: &mut Recorder,
    sums: &Tensor,
    cfg: &LossConfig,
    p: &Plan,
) -> Result<Tensor> {
    let out = rec.gpu.empty(&[3])?;
    let inv = (1.0 / (p.nimg as f64 * p.hw as f64)) as f32;
    rec.dispatch(
        &kernel("loss_finalize", 1),
        FinalParams {
            nimg: u(p.nimg),
            inv_pixels: inv,
            lambda: cfg.lambda,
            smoothing: cfg.smooth,
        },
        &[sums, &out],
        [1, 1, 1],
    )?;
    Ok(out)
}

/// Loss values only: a `[3]` tensor (total, focal, dice).
pub fn seg_loss_values(
    rec: &mut Recorder,
    logits: &Tensor,
    target: &Tensor,
    cfg: &LossConfig,
) -> Result<Tensor> {
    let p = plan(logits, target)?;
    let sums = image_sums(rec, logits, target, cfg, &p)?;
    values_from_sums(rec, &sums, cfg, &p)
}

/// Loss values `[3]` (total, focal, dice) and `grad_scale * dL/dlogits` (logits' shape, written).
pub fn seg_loss(
    rec: &mut Recorder,
    logits: &Tensor,
    target: &Tensor,
    cfg: &LossConfig,
) -> Result<(Tensor, Tensor)> {
    let p = plan(logits, target)?;
    let sums = image_sums(rec, logits, target, cfg, &p)?;
    let values = values_from_sums(rec, &sums, cfg, &p)?;
    let grad = rec.gpu.empty(&logits.shape)?;
    let n = logits.numel();
    let cf = (cfg.grad_scale as f64 * cfg.lambda as f64 / (p.nimg as f64 * p.hw as f64)) as f32;
    let cd = (cfg.grad_scale as f64 * (1.0 - cfg.lambda as f64) / p.nimg as f64) as f32;
    let g = rec.grid(n.div_ceil(64));
    rec.dispatch(
        &kernel("loss_grad", 64),
        GradParams {
            n: u(n),
            hw: u(p.hw),
            alpha: cfg.alpha,
            gamma: cfg.gamma,
            cf,
            cd,
            smoothing: cfg.smooth,
            pad: 0,
        },
        &[logits, target, &sums, &grad],
        g,
    )?;
    Ok((values, grad))
}

// ---- Feature distillation loss (shaders/loss.wgsl, `mse_*`) ----

crate::uniform! {
    /// loss.wgsl `MseParams` (mse_partial, mse_finalize, mse_grad).
    struct MseParams { n: u32, chunk: u32, nchunks: u32, pad0: u32, inv_n: f32, gscale: f32, pad1: u32, pad2: u32 }
}

/// Elements per partial sum: at least 2048 (8 per invocation), at most 4096 partials.
fn mse_params(student: &Tensor, teacher: &Tensor, grad_scale: f32) -> Result<MseParams> {
    if student.numel() == 0 || student.shape != teacher.shape {
        return Err(Error::Invalid(format!(
            "distillation loss: student {:?} and teacher {:?} must have the same non-empty shape",
            student.shape, teacher.shape
        )));
    }
    let n = student.numel();
    let chunk = n.div_ceil(4096).max(2048);
    Ok(MseParams {
        n: u(n),
        chunk: u(chunk),
        nchunks: u(n.div_ceil(chunk)),
        pad0: 0,
        inv_n: (1.0 / n as f64) as f32,
        gscale: (2.0 * grad_scale as f64 / n as f64) as f32,
        pad1: 0,
        pad2: 0,
    })
}

fn mse_value(rec: &mut Recorder, s: &Tensor, t: &Tensor, p: MseParams) -> Result<Tensor> {
    let part = rec.gpu.empty(&[p.nchunks as usize])?;
    let g = rec.grid(p.nchunks as usize);
    rec.dispatch(&kernel("mse_partial", 256), p, &[s, t, &part], g)?;
    let out = rec.gpu.empty(&[1])?;
    rec.dispatch(&kernel("mse_finalize", 256), p, &[&part, &out], [1, 1, 1])?;
    Ok(out)
}

/// The feature distillation loss of the Med-FastSAM paper (Eq. 1), `1/N Σ (s − t)²` over all N
/// elements of the student and teacher embeddings (same shape and layout): a `[1]` tensor.
pub fn mse_loss_value(rec: &mut Recorder, student: &Tensor, teacher: &Tensor) -> Result<Tensor> {
    let p = mse_params(student, teacher, 1.0)?;
    mse_value(rec, student, teacher, p)
}

/// The loss `[1]` (as [`mse_loss_value`], unscaled) and `grad_scale · dL/ds = grad_scale · 2 (s − t) / N`
/// (the student's shape, written).
pub fn mse_loss(
    rec: &mut Recorder,
    student: &Tensor,
    teacher: &Tensor,
    grad_scale: f32,
) -> Result<(Tensor, Tensor)> {
    let p = mse_params(student, teacher, grad_scale)?;
    let value = mse_value(rec, student, teacher, p)?;
    let grad = rec.gpu.empty(&student.shape)?;
    let g = rec.grid((p.n as usize).div_ceil(64));
    rec.dispatch(&kernel("mse_grad", 64), p, &[student, teacher, &grad], g)?;
    Ok((value, grad))
}
