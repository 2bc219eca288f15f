//! CPU f64 reference: Otsu coarse prompt (docs/model.md), written from the
//! definition with `torch.histc` semantics.

use crate::ops::otsu::OtsuRule;

/// Grey value of a packed pixel (0xAABBGGRR) under `rule`, in f64.
/// Paper: (0.2989 R + 0.5870 G + 0.1140 B) / 255, evaluated as the integer
/// 2989 R + 5870 G + 1140 B divided by 2,550,000 (one correctly rounded division, so values that
/// sit exactly on a bin edge, e.g. I = 159375 m, land exactly on it).
/// Released: 0.2989 c0 + 0.5870 c1 + 0.1140 c2 with c = (v - mean) / std (ImageNet).
pub fn grey(p: u32, rule: OtsuRule) -> f64 {
    let r = (p & 255) as f64;
    let g = ((p >> 8) & 255) as f64;
    let b = ((p >> 16) & 255) as f64;
    match rule {
        OtsuRule::Paper => (2989.0 * r + 5870.0 * g + 1140.0 * b) / 2_550_000.0,
        OtsuRule::Released => {
            0.2989 * ((r - 123.675) / 58.395)
                + 0.5870 * ((g - 116.28) / 57.12)
                + 0.1140 * ((b - 103.53) / 57.375)
        }
    }
}

/// `torch.histc(g, bins=256, min=0, max=1)`: bin floor(g * 256), g == 1 in bin 255, values
/// outside [0, 1] ignored.
pub fn histogram(grey: &[f64]) -> Vec<f64> {
    let mut h = vec![0.0; 256];
    for &g in grey {
        if (0.0..=1.0).contains(&g) {
            let bin = ((g * 256.0).floor() as usize).min(255);
            h[bin] += 1.0;
        }
    }
    h
}

/// Otsu's index: p = h / sum, omega = cumsum(p), mu = cumsum(p i), sigma² = (mu_T omega - mu)² /
/// (omega (1 - omega) + 1e-8), first argmax; 0 when the histogram is empty (all NaN).
pub fn otsu_index(hist: &[f64]) -> usize {
    let total: f64 = hist.iter().sum();
    if total == 0.0 {
        return 0;
    }
    let p: Vec<f64> = hist.iter().map(|&h| h / total).collect();
    let mut omega = vec![0.0; 256];
    let mut mu = vec![0.0; 256];
    let (mut so, mut sm) = (0.0, 0.0);
    for i in 0..256 {
        so += p[i];
        sm += p[i] * i as f64;
        omega[i] = so;
        mu[i] = sm;
    }
    let mu_t = mu[255];
    let mut best = 0;
    let mut best_v = f64::NEG_INFINITY;
    for t in 0..256 {
        let v = (mu_t * omega[t] - mu[t]).powi(2) / (omega[t] * (1.0 - omega[t]) + 1e-8);
        if v > best_v {
            best_v = v;
            best = t;
        }
    }
    best
}

/// Per image of `px` ([b, h, w] packed pixels): (t* per image, threshold t*/255, mask [b, h, w]).
pub fn otsu(
    px: &[u32],
    b: usize,
    h: usize,
    w: usize,
    rule: OtsuRule,
) -> (Vec<usize>, Vec<f64>, Vec<f64>) {
    let n = h * w;
    assert_eq!(px.len(), b * n);
    let mut ts = Vec::with_capacity(b);
    let mut thr = Vec::with_capacity(b);
    let mut mask = Vec::with_capacity(b * n);
    for i in 0..b {
        let g: Vec<f64> = px[i * n..(i + 1) * n]
            .iter()
            .map(|&p| grey(p, rule))
            .collect();
        let t = otsu_index(&histogram(&g));
        let tau = t as f64 / 255.0;
        ts.push(t);
        thr.push(tau);
        for &v in &g {
            let on = match rule {
                OtsuRule::Paper => v >= tau,
                OtsuRule::Released => v > tau,
            };
            mask.push(if on { 1.0 } else { 0.0 });
        }
    }
    (ts, thr, mask)
}
