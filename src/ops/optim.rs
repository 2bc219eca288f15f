//! Optimiser kernels (shaders/optim.wgsl): Adam / AdamW, updating a parameter tensor and its
//! moment buffers in place. Gradients are zeroed with `Recorder::zero`.

use crate::error::{Error, Result};
use crate::gpu::{Kernel, Recorder, ShaderFamily, Tensor};

crate::uniform! {
    /// optim.wgsl `AdamParams`.
    struct AdamParams { n: u32, beta1: f32, beta2: f32, eps: f32, step_size: f32, bc2_sqrt: f32, decay: f32, grad_scale: f32 }
}

/// Adam hyper-parameters (PyTorch defaults except `lr`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamConfig {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Decoupled weight decay (AdamW: `p -= lr * weight_decay * p` before the Adam update); 0 = Adam.
    pub weight_decay: f32,
    /// Factor applied to the gradient before use (e.g. `1 / accumulation_steps`).
    pub grad_scale: f32,
}

impl Default for AdamConfig {
    fn default() -> Self {
        AdamConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            grad_scale: 1.0,
        }
    }
}

/// One Adam(W) step `step` (1-based, as PyTorch's `state['step']` after incrementing) on `param`
/// with moments `m`, `v` (zero before the first step) and gradient `grad`, all of one size:
/// `g = grad * grad_scale`, `p *= 1 - lr * wd`, `m = b1 m + (1-b1) g`, `v = b2 v + (1-b2) g²`,
/// `p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)`.
pub fn adam_step(
    rec: &mut Recorder,
    param: &Tensor,
    m: &Tensor,
    v: &Tensor,
    grad: &Tensor,
    cfg: &AdamConfig,
    step: u32,
) -> Result<()> {
    let n = param.numel();
    if m.numel() != n || v.numel() != n || grad.numel() != n {
        return Err(Error::Invalid(format!(
            "adam_step: param {:?}, m {:?}, v {:?}, grad {:?} must have the same size",
            param.shape, m.shape, v.shape, grad.shape
        )));
    }
    if step == 0 {
        return Err(Error::Invalid("adam_step: step counts from 1".into()));
    }
    if n == 0 {
        return Ok(());
    }
    let t = step as i32;
    let bc1 = 1.0 - (cfg.beta1 as f64).powi(t);
    let bc2 = 1.0 - (cfg.beta2 as f64).powi(t);
    let p = AdamParams {
        n: super::u(n),
        beta1: cfg.beta1,
        beta2: cfg.beta2,
        eps: cfg.eps,
        step_size: (cfg.lr as f64 / bc1) as f32,
        bc2_sqrt: bc2.sqrt() as f32,
        decay: (1.0 - cfg.lr as f64 * cfg.weight_decay as f64) as f32,
        grad_scale: cfg.grad_scale,
    };
    let g = rec.grid(n.div_ceil(64));
    rec.dispatch(
        &Kernel::new(ShaderFamily::Optim, "adam_step", 64),
        p,
        &[grad, param, m, v],
        g,
    )
}
