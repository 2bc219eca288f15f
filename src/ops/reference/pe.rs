//! CPU f64 reference: SAM random-Fourier positional encoding.

/// `gauss` [2, 128] row-major; returns [h, w, 256]: for cell (y, x),
/// c = (2 (x + 0.5) / w - 1, 2 (y + 0.5) / h - 1), z_k = 2 pi (c0 G[0][k] + c1 G[1][k]),
/// out = [sin z, cos z].
pub fn dense_pe(gauss: &[f64], h: usize, w: usize) -> Vec<f64> {
    assert_eq!(gauss.len(), 256);
    let mut out = vec![0.0; h * w * 256];
    for y in 0..h {
        for x in 0..w {
            let c0 = 2.0 * ((x as f64 + 0.5) / w as f64) - 1.0;
            let c1 = 2.0 * ((y as f64 + 0.5) / h as f64) - 1.0;
            let o = (y * w + x) * 256;
            for k in 0..128 {
                let z = 2.0 * std::f64::consts::PI * (c0 * gauss[k] + c1 * gauss[128 + k]);
                out[o + k] = z.sin();
                out[o + 128 + k] = z.cos();
            }
        }
    }
    out
}
