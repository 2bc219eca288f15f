//! CPU f64 reference: bilinear resize as PyTorch's `F.interpolate(mode="bilinear",
//! align_corners=False, antialias=False)` defines it, channels-last `[B, H, W, C]`.

/// The two input taps and their weights for output index `d` along an axis of input size `n` and
/// output size `o`: source coordinate `max((d + 0.5) * n / o - 0.5, 0)`, lower tap its floor, upper
/// tap the next index clamped to `n - 1`.
pub fn taps(d: usize, n: usize, o: usize) -> [(usize, f64); 2] {
    let scale = n as f64 / o as f64;
    let src = ((d as f64 + 0.5) * scale - 0.5).max(0.0);
    let i0 = (src.floor() as usize).min(n - 1);
    let i1 = if i0 + 1 < n { i0 + 1 } else { i0 };
    let l1 = src - i0 as f64;
    [(i0, 1.0 - l1), (i1, l1)]
}

/// `x [B, H, W, C]` -> `[B, OH, OW, C]`.
pub fn bilinear(
    b: usize,
    h: usize,
    w: usize,
    c: usize,
    x: &[f64],
    oh: usize,
    ow: usize,
) -> Vec<f64> {
    let mut y = vec![0.0; b * oh * ow * c];
    for bb in 0..b {
        for oy in 0..oh {
            let ty = taps(oy, h, oh);
            for ox in 0..ow {
                let tx = taps(ox, w, ow);
                for ch in 0..c {
                    let mut v = 0.0;
                    for &(iy, wy) in &ty {
                        for &(ix, wx) in &tx {
                            v += wy * wx * x[((bb * h + iy) * w + ix) * c + ch];
                        }
                    }
                    y[((bb * oh + oy) * ow + ox) * c + ch] = v;
                }
            }
        }
    }
    y
}

/// Gradient of [`bilinear`] (scatter form): `dx [B, H, W, C]` from `dy [B, OH, OW, C]`.
pub fn bilinear_backward(
    b: usize,
    h: usize,
    w: usize,
    c: usize,
    dy: &[f64],
    oh: usize,
    ow: usize,
) -> Vec<f64> {
    let mut dx = vec![0.0; b * h * w * c];
    for bb in 0..b {
        for oy in 0..oh {
            let ty = taps(oy, h, oh);
            for ox in 0..ow {
                let tx = taps(ox, w, ow);
                for ch in 0..c {
                    let g = dy[((bb * oh + oy) * ow + ox) * c + ch];
                    for &(iy, wy) in &ty {
                        for &(ix, wx) in &tx {
                            dx[((bb * h + iy) * w + ix) * c + ch] += wy * wx * g;
                        }
                    }
                }
            }
        }
    }
    dx
}
