//! Channel and stain transforms applied to an RGB image before the model sees it, in training and
//! inference alike (`--channel`, recorded in the weights' metadata; docs/channels.md).
//!
//! * `rgb`: the image as it is.
//! * `grey`: luma `(2989 R + 5870 G + 1140 B) / 10000` (the Otsu prompt's weights), in all three
//!   channels.
//! * `invert`: `255 - v` per channel (dark objects on a bright background become bright on dark).
//! * `hematoxylin`, `eosin`, `dab`: colour deconvolution (Ruifrok & Johnston, 2001). Each pixel's
//!   optical density `OD_c = -log10((I_c + 1) / 256)` is the sum of the stains' unit OD vectors
//!   weighted by their concentrations; the concentrations are `OD · M⁻¹` where the rows of `M`
//!   are the stain vectors (two stains and their cross product as the third). The chosen stain's
//!   concentration is drawn bright on dark in all three channels, from the image's median (the
//!   background level: black) to its 99.5th percentile (white), so a nuclei model trained on
//!   fluorescence (bright nuclei on black) sees haematoxylin-stained nuclei the same way. The
//!   range is fitted per image (a whole image's pass when it is read row by row), like the
//!   stain vectors with Macenko.
//!
//! The stain vectors are the published standard ones (H&E for haematoxylin and eosin, H-DAB for
//! DAB) or, with [`StainVectors::Macenko`], estimated per image (Macenko et al., 2009): the
//! optical densities of the stained pixels are projected on the plane of their two principal
//! directions, and the stains are the directions at the 1st and 99th percentile of the angle in
//! that plane; the one with the larger red OD is haematoxylin.

use crate::error::{Error, Result};
use crate::io::RgbImage;

/// Which transform, by name (`--channel`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Channel {
    #[default]
    Rgb,
    Grey,
    Invert,
    Hematoxylin,
    Eosin,
    Dab,
}

impl Channel {
    pub const NAMES: &'static str = "rgb, grey, invert, hematoxylin, eosin, dab";

    pub fn parse(s: &str) -> Result<Channel> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "rgb" | "" => Channel::Rgb,
            "grey" | "gray" => Channel::Grey,
            "invert" | "inverted" => Channel::Invert,
            "hematoxylin" | "haematoxylin" | "h" => Channel::Hematoxylin,
            "eosin" | "e" => Channel::Eosin,
            "dab" => Channel::Dab,
            other => {
                return Err(Error::Invalid(format!(
                    "unknown channel '{other}' (expected one of: {})",
                    Channel::NAMES
                )));
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Channel::Rgb => "rgb",
            Channel::Grey => "grey",
            Channel::Invert => "invert",
            Channel::Hematoxylin => "hematoxylin",
            Channel::Eosin => "eosin",
            Channel::Dab => "dab",
        }
    }

    /// Whether this is a colour-deconvolution channel (stain vectors apply).
    pub fn is_stain(self) -> bool {
        matches!(self, Channel::Hematoxylin | Channel::Eosin | Channel::Dab)
    }

    /// The standard stain matrix this channel deconvolves with, and the row of the stain.
    fn standard(self) -> Option<(StainMatrix, usize)> {
        match self {
            Channel::Hematoxylin => Some((StainMatrix::he(), 0)),
            Channel::Eosin => Some((StainMatrix::he(), 1)),
            Channel::Dab => Some((StainMatrix::hdab(), 1)),
            _ => None,
        }
    }
}

/// Where the stain vectors come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum StainVectors {
    /// Ruifrok & Johnston's published vectors.
    #[default]
    Standard,
    /// Estimated per image (Macenko).
    Macenko,
}

impl StainVectors {
    pub fn parse(s: &str) -> Result<StainVectors> {
        match s.trim().to_ascii_lowercase().as_str() {
            "standard" | "" => Ok(StainVectors::Standard),
            "macenko" => Ok(StainVectors::Macenko),
            other => Err(Error::Invalid(format!(
                "unknown stain vectors '{other}' (expected standard or macenko)"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            StainVectors::Standard => "standard",
            StainVectors::Macenko => "macenko",
        }
    }
}

/// Three unit stain OD vectors (rows: R, G, B optical density of one unit of each stain).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StainMatrix(pub [[f64; 3]; 3]);

fn normalise(v: [f64; 3]) -> [f64; 3] {
    let n = (v[0] * v[0] + v[1] * v[1] + v[2] * v[2]).sqrt();
    if n == 0.0 {
        return v;
    }
    [v[0] / n, v[1] / n, v[2] / n]
}

fn cross(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [
        a[1] * b[2] - a[2] * b[1],
        a[2] * b[0] - a[0] * b[2],
        a[0] * b[1] - a[1] * b[0],
    ]
}

fn dot(a: [f64; 3], b: [f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

/// Ruifrok & Johnston's OD vectors (before normalisation).
const HEMATOXYLIN: [f64; 3] = [0.65, 0.70, 0.29];
const EOSIN: [f64; 3] = [0.07, 0.99, 0.11];
const DAB: [f64; 3] = [0.27, 0.57, 0.78];

impl StainMatrix {
    /// Two stains and, as the third row, their normalised cross product (the residual).
    pub fn from_two(a: [f64; 3], b: [f64; 3]) -> StainMatrix {
        let (a, b) = (normalise(a), normalise(b));
        let mut c = normalise(cross(a, b));
        // Keep the residual's OD positive where it can be (it only absorbs what the two miss).
        if c.iter().sum::<f64>() < 0.0 {
            c = [-c[0], -c[1], -c[2]];
        }
        StainMatrix([a, b, c])
    }

    /// Haematoxylin and eosin.
    pub fn he() -> StainMatrix {
        StainMatrix::from_two(HEMATOXYLIN, EOSIN)
    }

    /// Haematoxylin and DAB.
    pub fn hdab() -> StainMatrix {
        StainMatrix::from_two(HEMATOXYLIN, DAB)
    }

    /// The inverse (concentrations = OD · inverse); `None` when the vectors are degenerate.
    pub fn inverse(&self) -> Option<[[f64; 3]; 3]> {
        let m = self.0;
        let det = dot(m[0], cross(m[1], m[2]));
        if det.abs() < 1e-9 {
            return None;
        }
        // inverse = adjugate / det; with row vectors, c = od · inv.
        let c0 = cross(m[1], m[2]);
        let c1 = cross(m[2], m[0]);
        let c2 = cross(m[0], m[1]);
        let mut inv = [[0.0; 3]; 3];
        for i in 0..3 {
            inv[i] = [c0[i] / det, c1[i] / det, c2[i] / det];
        }
        Some(inv)
    }

    /// RGB of given concentrations (the forward model; used by tests and the docs' examples).
    pub fn to_rgb(&self, c: [f64; 3]) -> [u8; 3] {
        let mut px = [0u8; 3];
        for (ch, p) in px.iter_mut().enumerate() {
            let od: f64 = (0..3).map(|s| c[s] * self.0[s][ch]).sum();
            let v = 256.0 * 10f64.powf(-od) - 1.0;
            *p = v.round().clamp(0.0, 255.0) as u8;
        }
        px
    }
}

/// Optical density of an 8-bit intensity.
pub fn optical_density(v: u8) -> f64 {
    -((v as f64 + 1.0) / 256.0).log10()
}

/// Percentiles of the stain's concentration over the image drawn as black and as white by the
/// stain channels: the median is the background level (objects are the minority), the 99.5th the
/// strongest staining.
pub const DISPLAY_PERCENTILES: (f64, f64) = (50.0, 99.5);

/// A channel with its stain matrix resolved (for Macenko, estimated from the image): applies to
/// rows or whole images.
#[derive(Clone, Debug)]
pub struct ChannelTransform {
    pub channel: Channel,
    pub vectors: StainVectors,
    /// The matrix used (stain channels only).
    pub matrix: Option<StainMatrix>,
    /// Column of the inverse giving the chosen stain's concentration, per OD channel.
    column: [f64; 3],
    od: [f64; 256],
    /// Concentrations drawn as 0 and 255 (stain channels).
    pub range: (f64, f64),
}

impl ChannelTransform {
    /// `rgb`: nothing to do.
    pub fn identity() -> ChannelTransform {
        ChannelTransform::with_matrix(Channel::Rgb, StainVectors::Standard, None)
    }

    /// The transform of `channel` with the standard stain vectors.
    pub fn standard(channel: Channel) -> ChannelTransform {
        let m = channel.standard().map(|(m, _)| m);
        ChannelTransform::with_matrix(channel, StainVectors::Standard, m)
    }

    /// The transform of `channel` with an explicit stain matrix (for stain channels; the stain's
    /// row is 0 for haematoxylin and 1 for eosin or DAB).
    pub fn with_matrix(
        channel: Channel,
        vectors: StainVectors,
        matrix: Option<StainMatrix>,
    ) -> ChannelTransform {
        let mut od = [0.0; 256];
        for (v, o) in od.iter_mut().enumerate() {
            *o = optical_density(v as u8);
        }
        let mut column = [0.0; 3];
        if let (Some(m), Some((_, row))) = (matrix, channel.standard()) {
            let inv = m
                .inverse()
                .or_else(|| channel.standard().and_then(|(s, _)| s.inverse()))
                .expect("the standard stain matrices are invertible");
            column = [inv[0][row], inv[1][row], inv[2][row]];
        }
        ChannelTransform {
            channel,
            vectors,
            matrix,
            column,
            od,
            range: (0.0, 1.0),
        }
    }

    /// The transform for `channel` and `vectors` fitted to `img`: for the stain channels, the
    /// display range from the image's concentrations and, for Macenko, the stain vectors
    /// (falling back to the standard ones, with the reason, when the image has too few stained
    /// pixels).
    pub fn for_image(
        channel: Channel,
        vectors: StainVectors,
        img: &RgbImage,
    ) -> (ChannelTransform, Option<String>) {
        if !channel.is_stain() {
            return (ChannelTransform::standard(channel), None);
        }
        let stride = (img.width * img.height / 200_000).max(1);
        let samples: Vec<[u8; 3]> = img
            .data
            .chunks_exact(3)
            .step_by(stride)
            .map(|p| [p[0], p[1], p[2]])
            .collect();
        ChannelTransform::from_samples(channel, vectors, &samples)
    }

    /// As [`ChannelTransform::for_image`], from sampled pixels.
    pub fn from_samples(
        channel: Channel,
        vectors: StainVectors,
        samples: &[[u8; 3]],
    ) -> (ChannelTransform, Option<String>) {
        let (mut t, note) = match vectors {
            _ if !channel.is_stain() => return (ChannelTransform::standard(channel), None),
            StainVectors::Standard => (ChannelTransform::standard(channel), None),
            StainVectors::Macenko => match macenko(samples.iter().copied()) {
                Ok(m) => (
                    ChannelTransform::with_matrix(channel, StainVectors::Macenko, Some(m)),
                    None,
                ),
                Err(why) => (
                    ChannelTransform::standard(channel),
                    Some(format!(
                        "stain vectors not estimated ({why}); the standard ones were used"
                    )),
                ),
            },
        };
        let mut c: Vec<f64> = samples.iter().map(|&p| t.concentration(p)).collect();
        if !c.is_empty() {
            c.sort_by(f64::total_cmp);
            let at = |pct: f64| c[((pct / 100.0) * (c.len() - 1) as f64).round() as usize];
            let (lo, hi) = (at(DISPLAY_PERCENTILES.0), at(DISPLAY_PERCENTILES.1));
            // An unstained image keeps at least 0.05 of concentration between black and white.
            t.range = (lo, hi.max(lo + 0.05));
        }
        (t, note)
    }

    pub fn is_identity(&self) -> bool {
        self.channel == Channel::Rgb
    }

    /// A short description: `hematoxylin (standard H&E vectors)`.
    pub fn describe(&self) -> String {
        match (self.channel, self.vectors) {
            (c, _) if !c.is_stain() => c.name().to_string(),
            (c, StainVectors::Standard) => format!(
                "{} (standard {} vectors)",
                c.name(),
                if c == Channel::Dab { "H-DAB" } else { "H&E" }
            ),
            (c, StainVectors::Macenko) => format!("{} (Macenko vectors)", c.name()),
        }
    }

    /// The chosen stain's concentration at one pixel (0 for non-stain channels).
    pub fn concentration(&self, px: [u8; 3]) -> f64 {
        self.od[px[0] as usize] * self.column[0]
            + self.od[px[1] as usize] * self.column[1]
            + self.od[px[2] as usize] * self.column[2]
    }

    /// Transforms packed RGB pixels in place.
    pub fn apply_row(&self, rgb: &mut [u8]) {
        match self.channel {
            Channel::Rgb => {}
            Channel::Grey => {
                for p in rgb.chunks_exact_mut(3) {
                    let y = (2989 * p[0] as u32 + 5870 * p[1] as u32 + 1140 * p[2] as u32 + 5000)
                        / 10000;
                    p.fill(y.min(255) as u8);
                }
            }
            Channel::Invert => {
                for v in rgb.iter_mut() {
                    *v = 255 - *v;
                }
            }
            _ => {
                for p in rgb.chunks_exact_mut(3) {
                    let c = self.concentration([p[0], p[1], p[2]]);
                    let (lo, hi) = self.range;
                    let v = (255.0 * ((c - lo) / (hi - lo)).clamp(0.0, 1.0)).round() as u8;
                    p.fill(v);
                }
            }
        }
    }

    /// The transformed copy of an image.
    pub fn apply(&self, img: &RgbImage) -> RgbImage {
        let mut out = img.clone();
        self.apply_row(&mut out.data);
        out
    }
}

/// A row source seen through a channel transform (for images read row by row).
pub struct ChannelRows<S> {
    inner: S,
    transform: ChannelTransform,
}

impl<S: crate::stream::RowSource> ChannelRows<S> {
    pub fn new(inner: S, transform: ChannelTransform) -> Self {
        ChannelRows { inner, transform }
    }
}

impl<S: crate::stream::RowSource> crate::stream::RowSource for ChannelRows<S> {
    fn width(&self) -> usize {
        self.inner.width()
    }
    fn height(&self) -> usize {
        self.inner.height()
    }
    fn read_row(&mut self, out: &mut [u8]) -> Result<()> {
        self.inner.read_row(out)?;
        self.transform.apply_row(out);
        Ok(())
    }
}

/// [`ChannelTransform::for_image`] for an image read row by row: every pixel of every `k`-th row and
/// column, `k` chosen for about 200,000 samples.
pub fn transform_from_rows(
    channel: Channel,
    vectors: StainVectors,
    rows: &mut dyn crate::stream::RowSource,
) -> Result<(ChannelTransform, Option<String>)> {
    if !channel.is_stain() {
        return Ok((ChannelTransform::standard(channel), None));
    }
    let (w, h) = (rows.width(), rows.height());
    let k = (((w * h) as f64 / 200_000.0).sqrt().floor() as usize).max(1);
    let mut row = vec![0u8; w * 3];
    let mut samples = Vec::new();
    for y in 0..h {
        rows.read_row(&mut row)?;
        if y % k == 0 {
            samples.extend(row.chunks_exact(3).step_by(k).map(|p| [p[0], p[1], p[2]]));
        }
    }
    Ok(ChannelTransform::from_samples(channel, vectors, &samples))
}

/// Eigen-decomposition of a symmetric 3×3 matrix (cyclic Jacobi, [`crate::eigen`]): eigenvalues
/// descending, with their unit eigenvectors.
fn symmetric_eigen(a: [[f64; 3]; 3]) -> [(f64, [f64; 3]); 3] {
    let (vals, v) = crate::eigen::symmetric_eigen(a.concat(), 3);
    let mut out: Vec<(f64, [f64; 3])> = (0..3)
        .map(|i| (vals[i], [v[i], v[3 + i], v[6 + i]]))
        .collect();
    out.sort_by(|x, y| y.0.total_cmp(&x.0));
    [out[0], out[1], out[2]]
}

/// Optical density below which a channel counts as unstained (Macenko's β).
const MACENKO_BETA: f64 = 0.15;
/// Percentile of the angle taken as each stain's direction (Macenko's α, in percent).
const MACENKO_ALPHA: f64 = 1.0;

/// Estimates the two stains of an image from its pixels (Macenko): haematoxylin first, then the
/// other stain (eosin or DAB), as a [`StainMatrix`]. Fails when fewer than 100 pixels are
/// stained or the stains cannot be told apart.
pub fn macenko(samples: impl Iterator<Item = [u8; 3]>) -> std::result::Result<StainMatrix, String> {
    let ods: Vec<[f64; 3]> = samples
        .map(|p| p.map(optical_density))
        .filter(|o| o.iter().all(|&v| v >= MACENKO_BETA))
        .collect();
    if ods.len() < 100 {
        return Err(format!(
            "{} stained pixels (OD ≥ {MACENKO_BETA} in every channel), at least 100 needed",
            ods.len()
        ));
    }
    let n = ods.len() as f64;
    let mut mean = [0.0; 3];
    for o in &ods {
        for c in 0..3 {
            mean[c] += o[c] / n;
        }
    }
    let mut cov = [[0.0; 3]; 3];
    for o in &ods {
        for i in 0..3 {
            for j in 0..3 {
                cov[i][j] += (o[i] - mean[i]) * (o[j] - mean[j]) / n;
            }
        }
    }
    let eig = symmetric_eigen(cov);
    // The plane of the two principal directions, oriented towards positive OD.
    let orient = |v: [f64; 3]| {
        if v.iter().sum::<f64>() < 0.0 {
            [-v[0], -v[1], -v[2]]
        } else {
            v
        }
    };
    let (e1, e2) = (orient(eig[0].1), orient(eig[1].1));
    let mut angles: Vec<f64> = ods.iter().map(|o| dot(*o, e2).atan2(dot(*o, e1))).collect();
    angles.sort_by(f64::total_cmp);
    let pick = |pct: f64| {
        let i = ((pct / 100.0) * (angles.len() - 1) as f64).round() as usize;
        angles[i.min(angles.len() - 1)]
    };
    let (lo, hi) = (pick(MACENKO_ALPHA), pick(100.0 - MACENKO_ALPHA));
    if (hi - lo).abs() < 1e-3 {
        return Err("the stained pixels show one colour only".into());
    }
    let dir = |phi: f64| {
        let v = [
            e1[0] * phi.cos() + e2[0] * phi.sin(),
            e1[1] * phi.cos() + e2[1] * phi.sin(),
            e1[2] * phi.cos() + e2[2] * phi.sin(),
        ];
        normalise(orient(v))
    };
    let (a, b) = (dir(lo), dir(hi));
    // Haematoxylin absorbs more red than eosin or DAB.
    let (h, other) = if a[0] >= b[0] { (a, b) } else { (b, a) };
    Ok(StainMatrix::from_two(h, other))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::needless_range_loop)] // i, j, k are matrix indices, clearer than iterators
    fn inverse_is_an_inverse() {
        for m in [StainMatrix::he(), StainMatrix::hdab()] {
            let inv = m.inverse().unwrap();
            for (i, row) in m.0.iter().enumerate() {
                for j in 0..3 {
                    let v: f64 = (0..3).map(|k| row[k] * inv[k][j]).sum();
                    assert!((v - if i == j { 1.0 } else { 0.0 }).abs() < 1e-12);
                }
            }
        }
    }

    #[test]
    fn eigen_of_a_known_matrix() {
        // Eigenvalues 3, 1, 1 of [[2,1,0],[1,2,0],[0,0,1]]... and a check of A v = λ v.
        let a = [[2.0, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 1.0]];
        let e = symmetric_eigen(a);
        assert!((e[0].0 - 3.0).abs() < 1e-12);
        for (l, v) in e {
            for i in 0..3 {
                let av: f64 = (0..3).map(|k| a[i][k] * v[k]).sum();
                assert!((av - l * v[i]).abs() < 1e-10);
            }
        }
    }

    #[test]
    fn names_round_trip() {
        for c in [
            Channel::Rgb,
            Channel::Grey,
            Channel::Invert,
            Channel::Hematoxylin,
            Channel::Eosin,
            Channel::Dab,
        ] {
            assert_eq!(Channel::parse(c.name()).unwrap(), c);
        }
        let e = Channel::parse("purple").unwrap_err().to_string();
        assert!(e.contains("purple") && e.contains("hematoxylin"), "{e}");
    }
}
