//! CPU f64 references of the training losses (focal + dice; the distillation MSE, see `ops::loss`),
//! written from their definitions, with their analytic gradients.

/// Loss hyper-parameters in f64 (same meaning as `ops::loss::LossConfig`).
#[derive(Clone, Copy, Debug)]
pub struct LossParams {
    pub lambda: f64,
    pub alpha: f64,
    pub gamma: f64,
    pub smooth: f64,
}

impl Default for LossParams {
    fn default() -> Self {
        LossParams {
            lambda: 0.8,
            alpha: 0.25,
            gamma: 2.0,
            smooth: 1.0,
        }
    }
}

fn sigmoid(l: f64) -> f64 {
    if l >= 0.0 {
        1.0 / (1.0 + (-l).exp())
    } else {
        let e = l.exp();
        e / (1.0 + e)
    }
}

/// (total, focal, dice) for `nimg` images of `logits.len() / nimg` pixels.
pub fn seg_loss(logits: &[f64], target: &[f64], nimg: usize, prm: &LossParams) -> (f64, f64, f64) {
    let hw = logits.len() / nimg;
    let mut focal = 0.0;
    let mut dice = 0.0;
    for b in 0..nimg {
        let (mut inter, mut sp, mut st) = (0.0, 0.0, 0.0);
        for i in b * hw..(b + 1) * hw {
            let (l, t) = (logits[i], target[i]);
            let p = sigmoid(l);
            let bce = l.max(0.0) - l * t + (-l.abs()).exp().ln_1p();
            let p_t = p * t + (1.0 - p) * (1.0 - t);
            let a_t = prm.alpha * t + (1.0 - prm.alpha) * (1.0 - t);
            focal += a_t * bce * (1.0 - p_t).powf(prm.gamma);
            inter += p * t;
            sp += p;
            st += t;
        }
        dice += 1.0 - (2.0 * inter + prm.smooth) / (sp + st + prm.smooth);
    }
    let focal = focal / logits.len() as f64;
    let dice = dice / nimg as f64;
    (prm.lambda * focal + (1.0 - prm.lambda) * dice, focal, dice)
}

/// dL/dlogits of [`seg_loss`]'s total.
pub fn seg_loss_grad(logits: &[f64], target: &[f64], nimg: usize, prm: &LossParams) -> Vec<f64> {
    let hw = logits.len() / nimg;
    let n = logits.len() as f64;
    let mut grad = vec![0.0; logits.len()];
    for b in 0..nimg {
        let r = b * hw..(b + 1) * hw;
        let inter: f64 = r.clone().map(|i| sigmoid(logits[i]) * target[i]).sum();
        let u: f64 = r
            .clone()
            .map(|i| sigmoid(logits[i]) + target[i])
            .sum::<f64>()
            + prm.smooth;
        for i in r {
            let (l, t) = (logits[i], target[i]);
            let p = sigmoid(l);
            let dp = p * (1.0 - p); // dp/dl
            let bce = l.max(0.0) - l * t + (-l.abs()).exp().ln_1p();
            let dbce = p - t;
            let m = 1.0 - (p * t + (1.0 - p) * (1.0 - t)); // 1 - p_t
            let dm = -(2.0 * t - 1.0) * dp;
            let a_t = prm.alpha * t + (1.0 - prm.alpha) * (1.0 - t);
            let dmod = if prm.gamma == 0.0 {
                0.0
            } else {
                prm.gamma * m.powf(prm.gamma - 1.0) * dm
            };
            let dfocal = a_t * (dbce * m.powf(prm.gamma) + bce * dmod);
            // dice_b = 1 - (2 I + s) / U
            let ddice = -(2.0 * t * u - (2.0 * inter + prm.smooth)) / (u * u) * dp;
            grad[i] = prm.lambda * dfocal / n + (1.0 - prm.lambda) * ddice / nimg as f64;
        }
    }
    grad
}

/// The feature distillation loss `1/N Σ (s − t)²` (mean squared error over all elements).
pub fn mse(student: &[f64], teacher: &[f64]) -> f64 {
    assert_eq!(student.len(), teacher.len());
    let sum: f64 = student
        .iter()
        .zip(teacher)
        .map(|(s, t)| (s - t) * (s - t))
        .sum();
    sum / student.len() as f64
}

/// d[`mse`]/d student = `2 (s − t) / N`.
pub fn mse_grad(student: &[f64], teacher: &[f64]) -> Vec<f64> {
    let n = student.len() as f64;
    student
        .iter()
        .zip(teacher)
        .map(|(s, t)| 2.0 * (s - t) / n)
        .collect()
}
