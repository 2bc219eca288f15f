//! Segmentation metrics of the paper's protocol (docs/training.md): per-image foreground IoU and Dice of
//! binary masks, the 95th-percentile Hausdorff distance (HD95) of their boundaries, the mean over
//! images, and a CSV writer for per-image results.
//!
//! Conventions:
//! - masks are `width × height` row-major bytes, nonzero = foreground;
//! - IoU = TP / (TP + FP + FN), Dice = 2·TP / (2·TP + FP + FN) (sklearn's binary `jaccard_score` /
//!   `f1_score` with foreground as the positive class); an image whose prediction AND ground truth
//!   are both empty scores 1 and 1 (the project's rule, docs/training.md; sklearn would give 0);
//! - HD95 follows MONAI `compute_hausdorff_distance(percentile=95)` (voxel spacing 1, Euclidean,
//!   symmetric): see [`hd95`].

#[cfg(not(target_arch = "wasm32"))]
use crate::error::Result;
#[cfg(not(target_arch = "wasm32"))]
use std::path::Path;

/// Scores of one image.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scores {
    /// Foreground intersection over union, in [0, 1].
    pub iou: f64,
    /// Foreground Dice (F1), in [0, 1].
    pub dice: f64,
    /// HD95 in pixels; `None` when it was not asked for or is undefined (exactly one of prediction
    /// and ground truth is empty). Both empty gives `Some(0.0)`.
    pub hd95: Option<f64>,
}

fn check_len(what: &str, m: &[u8], width: usize, height: usize) {
    assert_eq!(
        m.len(),
        width * height,
        "{what} mask has {} bytes but the image is {width}×{height} = {} pixels",
        m.len(),
        width * height
    );
}

/// Foreground IoU and Dice of binary masks (nonzero = foreground), and HD95 when `with_hd95`.
/// Empty prediction and empty ground truth score IoU = Dice = 1 (and HD95 = 0).
/// Panics if a mask's length is not `width * height`.
pub fn scores(pred: &[u8], gt: &[u8], width: usize, height: usize, with_hd95: bool) -> Scores {
    check_len("predicted", pred, width, height);
    check_len("ground-truth", gt, width, height);
    let (mut tp, mut fp, mut fn_) = (0u64, 0u64, 0u64);
    for (&p, &g) in pred.iter().zip(gt) {
        match (p != 0, g != 0) {
            (true, true) => tp += 1,
            (true, false) => fp += 1,
            (false, true) => fn_ += 1,
            (false, false) => {}
        }
    }
    let union = tp + fp + fn_;
    let (iou, dice) = if union == 0 {
        (1.0, 1.0)
    } else {
        (
            tp as f64 / union as f64,
            2.0 * tp as f64 / (2 * tp + fp + fn_) as f64,
        )
    };
    let hd95 = if with_hd95 {
        hd95(pred, gt, width, height)
    } else {
        None
    };
    Scores { iou, dice, hd95 }
}

/// Boundary pixels of a mask restricted to the box `[x0, x1) × [y0, y1)`, which must contain every
/// foreground pixel: a foreground pixel is on the boundary when one of its 4 neighbours is
/// background or outside the image (MONAI: `mask XOR binary_erosion(mask)` with SciPy's default
/// cross-shaped structuring element and `border_value = 0`). Returned row-major in the box.
fn boundary(m: &[u8], width: usize, x0: usize, x1: usize, y0: usize, y1: usize) -> Vec<bool> {
    let (bw, bh) = (x1 - x0, y1 - y0);
    let fg = |x: usize, y: usize| m[y * width + x] != 0;
    let mut out = vec![false; bw * bh];
    for y in y0..y1 {
        for x in x0..x1 {
            if !fg(x, y) {
                continue;
            }
            // neighbours outside the box are background (the box holds all the foreground), and
            // outside the image count as background too
            let interior = x > x0
                && x + 1 < x1
                && y > y0
                && y + 1 < y1
                && fg(x - 1, y)
                && fg(x + 1, y)
                && fg(x, y - 1)
                && fg(x, y + 1);
            out[(y - y0) * bw + (x - x0)] = !interior;
        }
    }
    out
}

/// Exact squared Euclidean distance transform of one line (Felzenszwalb & Huttenlocher 2012):
/// `d[q] = min_p (q − p)² + f[p]` over the points with finite `f[p]`; all infinite if none.
/// `v` and `z` are scratch buffers of length ≥ n and ≥ n + 1.
fn sq_edt_1d(f: &[f64], d: &mut [f64], v: &mut [usize], z: &mut [f64]) {
    let n = f.len();
    let mut k = usize::MAX; // index of the last parabola of the lower envelope; MAX = none yet
    for q in 0..n {
        if !f[q].is_finite() {
            continue;
        }
        if k == usize::MAX {
            k = 0;
            v[0] = q;
            z[0] = f64::NEG_INFINITY;
            z[1] = f64::INFINITY;
            continue;
        }
        let fq = f[q] + (q * q) as f64;
        let mut s;
        loop {
            let p = v[k];
            s = (fq - (f[p] + (p * p) as f64)) / (2.0 * (q - p) as f64);
            // z[0] = -inf, so k never drops below 0
            if s <= z[k] { k -= 1 } else { break }
        }
        k += 1;
        v[k] = q;
        z[k] = s;
        z[k + 1] = f64::INFINITY;
    }
    if k == usize::MAX {
        d[..n].fill(f64::INFINITY);
        return;
    }
    let mut k = 0;
    for (q, dq) in d.iter_mut().enumerate().take(n) {
        while z[k + 1] < q as f64 {
            k += 1;
        }
        let p = v[k];
        let dx = q as f64 - p as f64;
        *dq = dx * dx + f[p];
    }
}

/// Exact squared Euclidean distance from every pixel of a `w × h` grid to the nearest `true`
/// pixel of `set` (separable: columns, then rows). Infinite everywhere if `set` is empty.
fn sq_distance_to(set: &[bool], w: usize, h: usize) -> Vec<f64> {
    let n = w.max(h);
    let (mut f, mut d, mut v, mut z) = (
        vec![0.0; n],
        vec![0.0; n],
        vec![0usize; n],
        vec![0.0; n + 1],
    );
    let mut g: Vec<f64> = set
        .iter()
        .map(|&b| if b { 0.0 } else { f64::INFINITY })
        .collect();
    for x in 0..w {
        for y in 0..h {
            f[y] = g[y * w + x];
        }
        sq_edt_1d(&f[..h], &mut d[..h], &mut v, &mut z);
        for y in 0..h {
            g[y * w + x] = d[y];
        }
    }
    for y in 0..h {
        f[..w].copy_from_slice(&g[y * w..(y + 1) * w]);
        sq_edt_1d(&f[..w], &mut d[..w], &mut v, &mut z);
        g[y * w..(y + 1) * w].copy_from_slice(&d[..w]);
    }
    g
}

/// The `q`-quantile (q in [0, 1]) with linear interpolation between the closest ranks
/// (`torch.quantile` / `numpy.percentile` default): position q·(n−1) in the sorted values.
pub fn quantile_linear(values: &mut [f64], q: f64) -> f64 {
    assert!(!values.is_empty(), "quantile of no values");
    values.sort_by(|a, b| a.total_cmp(b));
    let pos = q.clamp(0.0, 1.0) * (values.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    values[lo] + (values[hi] - values[lo]) * (pos - lo as f64)
}

/// 95th-percentile symmetric Hausdorff distance between the boundaries of two binary masks
/// (nonzero = foreground), in pixels, with MONAI's `compute_hausdorff_distance(percentile=95)`
/// semantics (spacing 1, Euclidean, `directed=False`):
///
/// - boundary points: foreground pixels with at least one 4-neighbour that is background or outside
///   the image (`mask XOR binary_erosion(mask)`, cross structuring element, border = background);
/// - for every boundary pixel of `pred`, its Euclidean distance (pixel centre to pixel centre) to the
///   nearest boundary pixel of `gt`, computed exactly with a separable distance transform; the same
///   from `gt` to `pred`;
/// - each of the two distance lists reduced to its 95th percentile with linear interpolation
///   (`torch.quantile(d, 0.95)`: position 0.95·(n−1) in the sorted list);
/// - the result is the larger of the two percentiles (MONAI takes the max over directions; it does
///   NOT pool both lists into one).
///
/// `None` when exactly one mask is empty (MONAI returns inf/nan there); `Some(0.0)` when both are.
pub fn hd95(pred: &[u8], gt: &[u8], width: usize, height: usize) -> Option<f64> {
    check_len("predicted", pred, width, height);
    check_len("ground-truth", gt, width, height);
    let (pa, ga) = (pred.iter().any(|&v| v != 0), gt.iter().any(|&v| v != 0));
    match (pa, ga) {
        (false, false) => return Some(0.0),
        (true, false) | (false, true) => return None,
        _ => {}
    }
    // Work in the bounding box of the union: every boundary point lies inside it, so the distances
    // between the two boundary sets are unchanged.
    let (mut x0, mut x1, mut y0, mut y1) = (width, 0, height, 0);
    for y in 0..height {
        for x in 0..width {
            if pred[y * width + x] != 0 || gt[y * width + x] != 0 {
                x0 = x0.min(x);
                x1 = x1.max(x + 1);
                y0 = y0.min(y);
                y1 = y1.max(y + 1);
            }
        }
    }
    let (bw, bh) = (x1 - x0, y1 - y0);
    let bp = boundary(pred, width, x0, x1, y0, y1);
    let bg = boundary(gt, width, x0, x1, y0, y1);
    let directed = |from: &[bool], to: &[bool]| -> f64 {
        let d2 = sq_distance_to(to, bw, bh);
        let mut d: Vec<f64> = from
            .iter()
            .zip(&d2)
            .filter(|(b, _)| **b)
            .map(|(_, &v)| v.sqrt())
            .collect();
        quantile_linear(&mut d, 0.95)
    };
    Some(directed(&bp, &bg).max(directed(&bg, &bp)))
}

/// Means over a set of images.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    /// Number of images.
    pub n: usize,
    /// Mean per-image IoU ("mIoU" in the paper). NaN when `n == 0`.
    pub mean_iou: f64,
    /// Mean per-image Dice. NaN when `n == 0`.
    pub mean_dice: f64,
    /// Population standard deviation (ddof 0) of the per-image IoU. NaN when `n == 0`.
    pub std_iou: f64,
    /// Population standard deviation (ddof 0) of the per-image Dice. NaN when `n == 0`.
    pub std_dice: f64,
    /// Mean HD95 over the images where it is defined (`Some`); `None` if there is none.
    pub mean_hd95: Option<f64>,
    /// Number of images with a defined HD95.
    pub n_hd95: usize,
}

impl Summary {
    /// Summarises per-image scores.
    pub fn from_scores<'a>(scores: impl IntoIterator<Item = &'a Scores>) -> Summary {
        let s: Vec<&Scores> = scores.into_iter().collect();
        let n = s.len();
        let mean = |f: &dyn Fn(&Scores) -> f64| s.iter().map(|x| f(x)).sum::<f64>() / n as f64;
        let std = |f: &dyn Fn(&Scores) -> f64, m: f64| {
            (s.iter().map(|x| (f(x) - m).powi(2)).sum::<f64>() / n as f64).sqrt()
        };
        let (mean_iou, mean_dice) = (mean(&|x| x.iou), mean(&|x| x.dice));
        let hd: Vec<f64> = s.iter().filter_map(|x| x.hd95).collect();
        Summary {
            n,
            mean_iou,
            mean_dice,
            std_iou: std(&|x| x.iou, mean_iou),
            std_dice: std(&|x| x.dice, mean_dice),
            mean_hd95: if hd.is_empty() {
                None
            } else {
                Some(hd.iter().sum::<f64>() / hd.len() as f64)
            },
            n_hd95: hd.len(),
        }
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} images: mIoU {:.2}% (±{:.2}), Dice {:.2}% (±{:.2})",
            self.n,
            100.0 * self.mean_iou,
            100.0 * self.std_iou,
            100.0 * self.mean_dice,
            100.0 * self.std_dice
        )?;
        match self.mean_hd95 {
            Some(h) => write!(f, ", HD95 {h:.2} px (over {} images)", self.n_hd95),
            None => Ok(()),
        }
    }
}

/// One CSV field, quoted (RFC 4180) when it holds a comma, quote or line break.
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// The CSV text of per-image results: header `id,iou,dice,hd95`, one row per image, numbers in
/// Rust's shortest round-trip form, an empty `hd95` field where it is `None`.
pub fn csv_text(rows: &[(String, Scores)]) -> String {
    let mut out = String::from("id,iou,dice,hd95\n");
    for (id, s) in rows {
        let hd = s.hd95.map(|h| h.to_string()).unwrap_or_default();
        out.push_str(&format!("{},{},{},{}\n", csv_field(id), s.iou, s.dice, hd));
    }
    out
}

/// Writes per-image results as CSV ([`csv_text`]) atomically (temporary file + rename).
#[cfg(not(target_arch = "wasm32"))]
pub fn write_csv(path: &Path, rows: &[(String, Scores)]) -> Result<()> {
    crate::io::write_atomic(path, csv_text(rows).as_bytes())
}
