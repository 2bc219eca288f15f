//! CPU f64 reference of the Adam / AdamW update (PyTorch semantics).

use crate::ops::optim::AdamConfig;

/// One step `t` (1-based) in place on f64 state, with the hyperparameters of `cfg` widened to f64.
pub fn adam_step(
    p: &mut [f64],
    m: &mut [f64],
    v: &mut [f64],
    grad: &[f64],
    cfg: &AdamConfig,
    t: u32,
) {
    let [lr, beta1, beta2, eps, weight_decay, grad_scale] = [
        cfg.lr,
        cfg.beta1,
        cfg.beta2,
        cfg.eps,
        cfg.weight_decay,
        cfg.grad_scale,
    ]
    .map(f64::from);
    let bc1 = 1.0 - beta1.powi(t as i32);
    let bc2 = 1.0 - beta2.powi(t as i32);
    for i in 0..p.len() {
        let g = grad[i] * grad_scale;
        p[i] -= lr * weight_decay * p[i];
        m[i] = beta1 * m[i] + (1.0 - beta1) * g;
        v[i] = beta2 * v[i] + (1.0 - beta2) * g * g;
        let m_hat = m[i] / bc1;
        let v_hat = v[i] / bc2;
        p[i] -= lr * m_hat / (v_hat.sqrt() + eps);
    }
}
