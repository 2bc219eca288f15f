//! Pictures of the model's inner maps for the page's teaching mode: the principal components of a
//! feature map (each position a C-dimensional vector) as RGB, and logits as a diverging colour
//! map. Plain host code (compiled natively too, so it is unit-tested without a browser); the wasm
//! export that runs the forward and calls these is `web_teach.rs`.

use crate::error::{Error, Result};

/// The leading principal components of n vectors of dimension c.
#[derive(Debug, Clone)]
pub struct Pca {
    /// The mean vector (c values).
    pub mean: Vec<f64>,
    /// The first k unit eigenvectors of the covariance, largest eigenvalue first, each of length
    /// c; the sign of each is fixed so that its largest-magnitude entry is positive.
    pub components: Vec<Vec<f64>>,
    /// Their eigenvalues (the variance along each component, divided by n).
    pub variances: Vec<f64>,
    /// The total variance (the trace of the covariance), so `variances[i] / total` is the share
    /// of the variance component i explains.
    pub total: f64,
}

/// The first `k` principal components of `data`, n rows of c values (row-major, channels-last as
/// the engine's maps are).
pub fn principal_components(data: &[f32], n: usize, c: usize, k: usize) -> Result<Pca> {
    if n == 0 || c == 0 || data.len() != n * c {
        return Err(Error::Invalid(format!(
            "PCA needs n×c values ({n}×{c} = {}), got {}",
            n * c,
            data.len()
        )));
    }
    if let Some(i) = data.iter().position(|v| !v.is_finite()) {
        return Err(Error::Invalid(format!(
            "PCA of a map with a non-finite value (at {i})"
        )));
    }
    let mut mean = vec![0f64; c];
    for row in data.chunks_exact(c) {
        for (m, &x) in mean.iter_mut().zip(row) {
            *m += x as f64;
        }
    }
    for m in &mut mean {
        *m /= n as f64;
    }
    let mut cov = vec![0f64; c * c];
    let mut centred = vec![0f64; c];
    for row in data.chunks_exact(c) {
        for ((d, &x), m) in centred.iter_mut().zip(row).zip(&mean) {
            *d = x as f64 - m;
        }
        for i in 0..c {
            let di = centred[i];
            if di == 0.0 {
                continue;
            }
            let out = &mut cov[i * c..i * c + c];
            for j in i..c {
                out[j] += di * centred[j];
            }
        }
    }
    for i in 0..c {
        for j in i..c {
            let v = cov[i * c + j] / n as f64;
            cov[i * c + j] = v;
            cov[j * c + i] = v;
        }
    }
    let total = (0..c).map(|i| cov[i * c + i]).sum();
    let (vals, vecs) = crate::eigen::symmetric_eigen(cov, c);
    let mut order: Vec<usize> = (0..c).collect();
    order.sort_by(|&a, &b| vals[b].total_cmp(&vals[a]));
    let k = k.min(c);
    let mut components = Vec::with_capacity(k);
    let mut variances = Vec::with_capacity(k);
    for &j in order.iter().take(k) {
        let mut e: Vec<f64> = (0..c).map(|i| vecs[i * c + j]).collect();
        let big = e
            .iter()
            .copied()
            .fold(0f64, |m, x| if x.abs() > m.abs() { x } else { m });
        if big < 0.0 {
            for x in &mut e {
                *x = -*x;
            }
        }
        components.push(e);
        variances.push(vals[j].max(0.0));
    }
    Ok(Pca {
        mean,
        components,
        variances,
        total,
    })
}

impl Pca {
    /// The coordinates of each of the n rows of `data` along the components (n × k, row-major).
    pub fn project(&self, data: &[f32]) -> Vec<f64> {
        let c = self.mean.len();
        let k = self.components.len();
        let mut out = Vec::with_capacity(data.len() / c.max(1) * k);
        for row in data.chunks_exact(c) {
            for e in &self.components {
                out.push(
                    row.iter()
                        .zip(&self.mean)
                        .zip(e)
                        .map(|((&x, m), w)| (x as f64 - m) * w)
                        .sum(),
                );
            }
        }
        out
    }
}

/// A feature map (n = h·w positions of c channels) as an RGBA picture: its first three principal
/// components as red, green and blue, each stretched from its 1st to its 99th percentile to
/// 0..255 (a map with fewer than three channels leaves the missing colours at 0). Returns the
/// pixels and the share of the variance each of the three components explains.
pub fn pca_rgba(data: &[f32], n: usize, c: usize) -> Result<(Vec<u8>, [f64; 3])> {
    let pca = principal_components(data, n, c, 3)?;
    let k = pca.components.len();
    let proj = pca.project(data);
    let mut rgba = vec![0u8; n * 4];
    for (j, _) in pca.components.iter().enumerate() {
        let mut col: Vec<f64> = (0..n).map(|i| proj[i * k + j]).collect();
        col.sort_by(f64::total_cmp);
        let lo = col[(n - 1) / 100];
        let hi = col[n - 1 - (n - 1) / 100];
        let span = (hi - lo).max(1e-12);
        for i in 0..n {
            let t = ((proj[i * k + j] - lo) / span).clamp(0.0, 1.0);
            rgba[i * 4 + j] = (t * 255.0).round() as u8;
        }
    }
    for px in rgba.chunks_exact_mut(4) {
        px[3] = 255;
    }
    let mut share = [0f64; 3];
    for (s, v) in share.iter_mut().zip(&pca.variances) {
        *s = if pca.total > 0.0 { v / pca.total } else { 0.0 };
    }
    Ok((rgba, share))
}

/// Logits as a diverging picture: blue where the model says background (negative), red where it
/// says foreground (positive), white at 0 (the decision boundary); the colour saturates at
/// `scale` (e.g. the largest magnitude in the map).
pub fn logit_rgba(logits: &[f32], scale: f32) -> Vec<u8> {
    let scale = if scale.is_finite() && scale > 0.0 {
        scale
    } else {
        1.0
    };
    let mut out = Vec::with_capacity(logits.len() * 4);
    for &l in logits {
        let t = if l.is_finite() {
            (l / scale).clamp(-1.0, 1.0)
        } else {
            0.0
        };
        let fade = |x: f32| (255.0 * (1.0 - x.abs())).round() as u8;
        let px = if t >= 0.0 {
            [255, fade(t), fade(t), 255]
        } else {
            [fade(t), fade(t), 255, 255]
        };
        out.extend_from_slice(&px);
    }
    out
}

/// Values in [0, 1] (a mask or a probability) as grey RGBA.
pub fn unit_rgba(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * 4);
    for &v in values {
        let g = (v.clamp(0.0, 1.0) * 255.0).round() as u8;
        out.extend_from_slice(&[g, g, g, 255]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Points spread along three known orthogonal directions of a 4-D space with standard
    /// deviations 3, 2 and 1 (variances 9, 4, 1), plus an offset: PCA must return those
    /// directions, in that order, with those variances, and the mean.
    #[test]
    fn pca_recovers_known_axes() {
        let s = std::f64::consts::FRAC_1_SQRT_2;
        let axes = [[s, s, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [s, -s, 0.0, 0.0]];
        let sd = [3.0, 2.0, 1.0];
        let offset = [1.0, -2.0, 0.5, 4.0];
        let mut data = Vec::new();
        // ±sd along each axis, all 8 sign combinations: mean 0, covariance diag(sd²) in the axes.
        for m in 0..8 {
            let signs = [
                if m & 1 == 0 { 1.0 } else { -1.0 },
                if m & 2 == 0 { 1.0 } else { -1.0 },
                if m & 4 == 0 { 1.0 } else { -1.0 },
            ];
            for d in 0..4 {
                let mut x = offset[d];
                for a in 0..3 {
                    x += signs[a] * sd[a] * axes[a][d];
                }
                data.push(x as f32);
            }
        }
        let p = principal_components(&data, 8, 4, 3).unwrap();
        for (m, o) in p.mean.iter().zip(&offset) {
            assert!((m - o).abs() < 1e-6, "mean {:?}", p.mean);
        }
        for a in 0..3 {
            assert!(
                (p.variances[a] - sd[a] * sd[a]).abs() < 1e-5,
                "variances {:?}",
                p.variances
            );
            let dot: f64 = p.components[a]
                .iter()
                .zip(&axes[a])
                .map(|(x, y)| x * y)
                .sum();
            assert!(
                (dot.abs() - 1.0).abs() < 1e-6,
                "component {a}: {:?}",
                p.components[a]
            );
            // Sign convention: the largest-magnitude entry is positive.
            let big = p.components[a]
                .iter()
                .copied()
                .fold(0f64, |m, x| if x.abs() > m.abs() { x } else { m });
            assert!(big > 0.0);
        }
        assert!((p.total - 14.0).abs() < 1e-5);
        // The first point (+3, +2, +1 along the axes) projects to (3, 2, 1) up to each sign.
        let proj = p.project(&data[..4]);
        for a in 0..3 {
            assert!((proj[a].abs() - sd[a]).abs() < 1e-5, "{proj:?}");
        }
    }

    /// Correlated channels (a full covariance, so the Jacobi sweeps must rotate): the components
    /// come back sorted, the explained shares sum to at most 1, and the picture is opaque.
    #[test]
    fn pca_rgba_shares_and_pixels() {
        let (n, c) = (64, 5);
        let mut data = Vec::with_capacity(n * c);
        for i in 0..n {
            let t = i as f32 / n as f32;
            data.extend_from_slice(&[
                10.0 * t,
                5.0 * (t * 6.0).sin(),
                t * t,
                0.3 * (t * 17.0).cos(),
                2.0,
            ]);
        }
        let (rgba, share) = pca_rgba(&data, n, c).unwrap();
        assert_eq!(rgba.len(), n * 4);
        assert!(share[0] >= share[1] && share[1] >= share[2], "{share:?}");
        assert!(share.iter().sum::<f64>() <= 1.0 + 1e-9);
        assert!(share[0] > 0.5);
        // Each colour is stretched between its percentiles: red spans 0..255.
        let reds: Vec<u8> = rgba.chunks_exact(4).map(|p| p[0]).collect();
        assert_eq!(*reds.iter().min().unwrap(), 0);
        assert_eq!(*reds.iter().max().unwrap(), 255);
        assert!(rgba.chunks_exact(4).all(|p| p[3] == 255));
    }

    #[test]
    fn pca_refuses_bad_input() {
        assert!(principal_components(&[1.0, 2.0, 3.0], 2, 2, 1).is_err());
        assert!(principal_components(&[1.0, f32::NAN], 1, 2, 1).is_err());
    }

    #[test]
    fn logits_colours() {
        let px = logit_rgba(&[-2.0, 0.0, 2.0, 1.0], 2.0);
        assert_eq!(&px[0..4], &[0, 0, 255, 255]);
        assert_eq!(&px[4..8], &[255, 255, 255, 255]);
        assert_eq!(&px[8..12], &[255, 0, 0, 255]);
        assert_eq!(&px[12..16], &[255, 128, 128, 255]);
        assert_eq!(unit_rgba(&[0.0, 1.0])[4], 255);
    }
}
