//! CPU f64 reference: LayerNorm and BatchNorm2d (channels-last), forward and backward, written from
//! the definitions. Data are `[rows, c]` row-major.

use super::{act, gelu_grad};
use crate::ops::Act;

/// d act(z)/dz.
pub fn act_grad(z: f64, a: Act) -> f64 {
    match a {
        Act::None => 1.0,
        Act::Gelu => gelu_grad(z),
        Act::Relu => {
            if z > 0.0 {
                1.0
            } else {
                0.0
            }
        }
    }
}

/// LayerNorm of each row: returns (y, pre-activation, mean per row, rstd per row).
pub fn layer_norm_full(
    x: &[f64],
    w: &[f64],
    b: &[f64],
    c: usize,
    eps: f64,
    a: Act,
) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let rows = x.len() / c;
    let mut y = vec![0.0; x.len()];
    let mut pre = vec![0.0; x.len()];
    let mut means = vec![0.0; rows];
    let mut rstds = vec![0.0; rows];
    for r in 0..rows {
        let row = &x[r * c..(r + 1) * c];
        let mean = row.iter().sum::<f64>() / c as f64;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / c as f64;
        let rstd = 1.0 / (var + eps).sqrt();
        for k in 0..c {
            let z = (row[k] - mean) * rstd * w[k] + b[k];
            pre[r * c + k] = z;
            y[r * c + k] = act(z, a);
        }
        means[r] = mean;
        rstds[r] = rstd;
    }
    (y, pre, means, rstds)
}

pub fn layer_norm(x: &[f64], w: &[f64], b: &[f64], c: usize, eps: f64, a: Act) -> Vec<f64> {
    layer_norm_full(x, w, b, c, eps, a).0
}

/// Gradients of `sum(dy * layer_norm(x))`: (dx, dw, db).
pub fn layer_norm_backward(
    x: &[f64],
    w: &[f64],
    b: &[f64],
    dy: &[f64],
    c: usize,
    eps: f64,
    a: Act,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (_, pre, means, rstds) = layer_norm_full(x, w, b, c, eps, a);
    let rows = x.len() / c;
    let mut dx = vec![0.0; x.len()];
    let mut dw = vec![0.0; c];
    let mut db = vec![0.0; c];
    for r in 0..rows {
        let (mean, rstd) = (means[r], rstds[r]);
        let mut xhat = vec![0.0; c];
        let mut g = vec![0.0; c];
        for k in 0..c {
            let i = r * c + k;
            xhat[k] = (x[i] - mean) * rstd;
            let dz = dy[i] * act_grad(pre[i], a);
            dw[k] += dz * xhat[k];
            db[k] += dz;
            g[k] = dz * w[k];
        }
        let mg = g.iter().sum::<f64>() / c as f64;
        let mgx = g.iter().zip(&xhat).map(|(p, q)| p * q).sum::<f64>() / c as f64;
        for k in 0..c {
            dx[r * c + k] = rstd * (g[k] - mg - xhat[k] * mgx);
        }
    }
    (dx, dw, db)
}
