//! Tiled inference at the image's own pixel scale: windows of the model's input size S laid over
//! the image with overlap, each segmented on its own, and their logits blended with a cosine ramp
//! over the overlaps, row of windows by row of windows so that memory is bounded by one band of S
//! rows (on the host and on the device) whatever the image's height.
//!
//! Layout ([`starts`]): along each axis, the fewest windows whose neighbours share at least the
//! requested overlap, spread evenly from the first pixel to the last (the first window starts at 0,
//! the last ends at the image's edge). An axis shorter than S has one window, padded by mirroring.
//!
//! Weights ([`axis_weights`]): 1 inside a window, rising as `½ − ½ cos(π u)` across each overlap
//! it shares with a neighbour (`u` from 0 at the window's edge to 1 at the neighbour's edge), so
//! that the weights of two neighbours sum to exactly 1 across their overlap; no ramp on a side at
//! the image's edge. The 2-D weight is the product of the two axes'. The blended logit is
//! `Σ w·l / Σ w`; where one window alone covers a pixel with weight 1 it is that window's logit,
//! bit for bit (tested against the model run on the crop).

use crate::error::{Error, Result};
use crate::io::RgbImage;

/// Start offsets of the windows of size `tile` along an axis of `len` pixels, neighbours sharing
/// at least `overlap` pixels.
pub fn starts(len: usize, tile: usize, overlap: usize) -> Vec<usize> {
    if len <= tile {
        return vec![0];
    }
    let step = tile - overlap.min(tile - 1);
    let n = (len - tile).div_ceil(step) + 1;
    (0..n)
        .map(|i| (i * (len - tile) + (n - 1) / 2) / (n - 1))
        .collect()
}

/// Blending weight of each window along an axis (`starts` as from [`starts`]), one value per pixel
/// of the window (`min(tile, len)` values).
pub fn axis_weights(starts: &[usize], tile: usize, len: usize) -> Vec<Vec<f32>> {
    let span = tile.min(len);
    let ramp = |u: f64| (0.5 - 0.5 * (std::f64::consts::PI * u).cos()) as f32;
    (0..starts.len())
        .map(|i| {
            let mut w = vec![1f32; span];
            if i > 0 {
                let ov = (starts[i - 1] + span).saturating_sub(starts[i]);
                for (j, v) in w.iter_mut().enumerate().take(ov) {
                    *v *= ramp((j as f64 + 0.5) / ov as f64);
                }
            }
            if i + 1 < starts.len() {
                let ov = (starts[i] + span).saturating_sub(starts[i + 1]);
                for (j, v) in w.iter_mut().enumerate().skip(span - ov) {
                    *v *= ramp((span as f64 - j as f64 - 0.5) / ov as f64);
                }
            }
            w
        })
        .collect()
}

/// The windows of an image and how they are blended.
#[derive(Clone, Debug)]
pub struct TilePlan {
    pub width: usize,
    pub height: usize,
    /// Window size (the model's input size S).
    pub tile: usize,
    pub xs: Vec<usize>,
    pub ys: Vec<usize>,
    wx: Vec<Vec<f32>>,
    wy: Vec<Vec<f32>>,
}

impl TilePlan {
    /// Windows of `tile` pixels over a `width × height` image with at least `overlap` pixels
    /// shared by neighbours (`overlap` at most half a window).
    pub fn new(width: usize, height: usize, tile: usize, overlap: usize) -> Result<TilePlan> {
        if width == 0 || height == 0 {
            return Err(Error::Invalid("tiling an empty image".into()));
        }
        if tile == 0 || overlap > tile / 2 {
            return Err(Error::Invalid(format!(
                "--overlap {overlap}: at most half the tile ({})",
                tile / 2
            )));
        }
        let xs = starts(width, tile, overlap);
        let ys = starts(height, tile, overlap);
        Ok(TilePlan {
            wx: axis_weights(&xs, tile, width),
            wy: axis_weights(&ys, tile, height),
            width,
            height,
            tile,
            xs,
            ys,
        })
    }

    pub fn count(&self) -> usize {
        self.xs.len() * self.ys.len()
    }

    /// The S×S input of window (`ix`, `iy`): the crop, mirrored beyond the image where the image
    /// is smaller than a window.
    pub fn window(&self, img: &RgbImage, ix: usize, iy: usize) -> RgbImage {
        let w3 = img.width * 3;
        self.window_from(|y| &img.data[y * w3..(y + 1) * w3], ix, iy)
    }

    /// [`TilePlan::window`] with the image's rows given by `row(y)` (only the rows of window row
    /// `iy` are asked for: `ys[iy] .. ys[iy] + S`, or all rows of an image shorter than S).
    pub fn window_from<'a>(
        &self,
        row: impl Fn(usize) -> &'a [u8],
        ix: usize,
        iy: usize,
    ) -> RgbImage {
        let s = self.tile;
        let (x0, y0) = (self.xs[ix], self.ys[iy]);
        let mirror = |v: usize, n: usize| -> usize {
            // reflect without repeating the edge (…, 2, 1, 0, 1, 2, …), periodic for long pads
            if n == 1 {
                return 0;
            }
            let period = 2 * (n - 1);
            let m = v % period;
            if m < n { m } else { period - m }
        };
        let mut data = Vec::with_capacity(s * s * 3);
        for y in 0..s {
            let r = row(mirror(y0 + y, self.height));
            if x0 + s <= self.width {
                data.extend_from_slice(&r[x0 * 3..(x0 + s) * 3]);
                continue;
            }
            for x in 0..s {
                let sx = mirror(x0 + x, self.width);
                data.extend_from_slice(&r[sx * 3..sx * 3 + 3]);
            }
        }
        RgbImage {
            width: s,
            height: s,
            data,
        }
    }

    /// Rows of the image that window row `iy` reads: `[first, end)`.
    pub fn band_rows(&self, iy: usize) -> (usize, usize) {
        (self.ys[iy], (self.ys[iy] + self.tile).min(self.height))
    }
}

/// Accumulates the windows of one row at a time and hands out finished image rows in order.
pub struct Blender<'p> {
    plan: &'p TilePlan,
    /// First image row held in the band.
    band_y0: usize,
    acc: Vec<f32>,
    wsum: Vec<f32>,
    /// Rows already handed out.
    emitted: usize,
}

impl<'p> Blender<'p> {
    pub fn new(plan: &'p TilePlan) -> Blender<'p> {
        let rows = plan.tile.min(plan.height);
        Blender {
            plan,
            band_y0: 0,
            acc: vec![0.0; rows * plan.width],
            wsum: vec![0.0; rows * plan.width],
            emitted: 0,
        }
    }

    /// Adds window (`ix`, `iy`)'s logits (S×S, row-major). Windows must come row of windows by
    /// row of windows (any order inside a row).
    pub fn add(&mut self, ix: usize, iy: usize, logits: &[f32]) {
        let p = self.plan;
        let s = p.tile;
        assert_eq!(logits.len(), s * s, "window logits must be {s}x{s}");
        let (x0, y0) = (p.xs[ix], p.ys[iy]);
        assert!(
            y0 >= self.band_y0,
            "windows must come in row order (row {iy} after the band moved on)"
        );
        let (wx, wy) = (&p.wx[ix], &p.wy[iy]);
        for (k, &wyk) in wy.iter().enumerate() {
            let row = y0 + k - self.band_y0;
            let base = row * p.width + x0;
            let src = &logits[k * s..k * s + wx.len()];
            for (j, (&l, &wxj)) in src.iter().zip(wx).enumerate() {
                let w = wxj * wyk;
                self.acc[base + j] += w * l;
                self.wsum[base + j] += w;
            }
        }
    }

    /// Call after the last window of row `iy`: hands every row no later window touches to
    /// `out(y, logits_of_row)`, in order.
    pub fn finish_row(
        &mut self,
        iy: usize,
        mut out: impl FnMut(usize, &[f32]) -> Result<()>,
    ) -> Result<()> {
        let p = self.plan;
        let w = p.width;
        let done_to = if iy + 1 < p.ys.len() {
            p.ys[iy + 1]
        } else {
            p.height
        };
        let mut row = vec![0f32; w];
        for y in self.emitted..done_to {
            let r = y - self.band_y0;
            for (x, v) in row.iter_mut().enumerate() {
                let i = r * w + x;
                let (a, s) = (self.acc[i], self.wsum[i]);
                // weight 1 from one window: the logit itself (a / 1 is exact as well)
                *v = if s == 1.0 { a } else { a / s };
            }
            out(y, &row)?;
        }
        self.emitted = done_to;
        // Move the band down to the next row of windows, keeping the rows it shares.
        if iy + 1 < p.ys.len() {
            let shift = (p.ys[iy + 1] - self.band_y0) * w;
            self.acc.copy_within(shift.., 0);
            self.wsum.copy_within(shift.., 0);
            let n = self.acc.len();
            self.acc[n - shift..].fill(0.0);
            self.wsum[n - shift..].fill(0.0);
            self.band_y0 = p.ys[iy + 1];
        }
        Ok(())
    }
}
