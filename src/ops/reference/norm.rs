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
        Act::Sigmoid => {
            let s = 1.0 / (1.0 + (-z).exp());
            s * (1.0 - s)
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

/// BatchNorm2d (training mode) on channels-last `[rows, c]`: returns
/// (y, pre-activation, batch mean, biased batch variance, new running mean, new running var).
/// A BatchNorm layer's weight, bias and running statistics (`c` values each).
#[derive(Clone, Copy)]
pub struct BnLayer<'a> {
    pub w: &'a [f64],
    pub b: &'a [f64],
    pub running_mean: &'a [f64],
    pub running_var: &'a [f64],
}

#[allow(clippy::type_complexity)]
pub fn batch_norm_train(
    x: &[f64],
    bn: BnLayer,
    c: usize,
    momentum: f64,
    eps: f64,
    a: Act,
) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let BnLayer {
        w,
        b,
        running_mean,
        running_var,
    } = bn;
    let rows = x.len() / c;
    let n = rows as f64;
    let mut mean = vec![0.0; c];
    let mut var = vec![0.0; c];
    for k in 0..c {
        mean[k] = (0..rows).map(|r| x[r * c + k]).sum::<f64>() / n;
        var[k] = (0..rows)
            .map(|r| (x[r * c + k] - mean[k]).powi(2))
            .sum::<f64>()
            / n;
    }
    let mut y = vec![0.0; x.len()];
    let mut pre = vec![0.0; x.len()];
    for i in 0..x.len() {
        let k = i % c;
        let z = (x[i] - mean[k]) / (var[k] + eps).sqrt() * w[k] + b[k];
        pre[i] = z;
        y[i] = act(z, a);
    }
    let rm = (0..c)
        .map(|k| (1.0 - momentum) * running_mean[k] + momentum * mean[k])
        .collect();
    let rv = (0..c)
        .map(|k| (1.0 - momentum) * running_var[k] + momentum * var[k] * n / (n - 1.0))
        .collect();
    (y, pre, mean, var, rm, rv)
}

/// BatchNorm2d in eval mode (running statistics).
pub fn batch_norm_eval(x: &[f64], bn: BnLayer, c: usize, eps: f64, a: Act) -> Vec<f64> {
    let BnLayer {
        w,
        b,
        running_mean,
        running_var,
    } = bn;
    (0..x.len())
        .map(|i| {
            let k = i % c;
            act(
                (x[i] - running_mean[k]) / (running_var[k] + eps).sqrt() * w[k] + b[k],
                a,
            )
        })
        .collect()
}

/// Gradients (dx, dw, db) of `sum(dy * batch_norm(x))`, with batch statistics (`train`) or with
/// the running statistics held fixed.
pub fn batch_norm_backward(
    x: &[f64],
    bn: BnLayer,
    dy: &[f64],
    c: usize,
    eps: f64,
    a: Act,
    train: bool,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let BnLayer {
        w,
        b,
        running_mean,
        running_var,
    } = bn;
    let rows = x.len() / c;
    let n = rows as f64;
    let (mean, var) = if train {
        let (_, _, m, v, _, _) = batch_norm_train(x, bn, c, 0.0, eps, a);
        (m, v)
    } else {
        (running_mean.to_vec(), running_var.to_vec())
    };
    let rstd: Vec<f64> = var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
    let xhat: Vec<f64> = (0..x.len())
        .map(|i| (x[i] - mean[i % c]) * rstd[i % c])
        .collect();
    let dz: Vec<f64> = (0..x.len())
        .map(|i| dy[i] * act_grad(xhat[i] * w[i % c] + b[i % c], a))
        .collect();
    let mut dw = vec![0.0; c];
    let mut db = vec![0.0; c];
    for i in 0..x.len() {
        dw[i % c] += dz[i] * xhat[i];
        db[i % c] += dz[i];
    }
    let dx = (0..x.len())
        .map(|i| {
            let k = i % c;
            if train {
                w[k] * rstd[k] * (dz[i] - db[k] / n - xhat[i] * dw[k] / n)
            } else {
                w[k] * rstd[k] * dz[i]
            }
        })
        .collect();
    (dx, dw, db)
}
