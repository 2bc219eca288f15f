//! Otsu coarse prompt of the CP-Encoder (shaders/otsu.wgsl), both variants of
//! docs/model.md, "Otsu coarse prompt":
//!
//! * [`OtsuRule::Paper`]: grey = (0.2989 R + 0.5870 G + 0.1140 B) / 255 of the raw pixels,
//!   `mask = grey >= t`.
//! * [`OtsuRule::Released`]: grey = 0.2989 c0 + 0.5870 c1 + 0.1140 c2 of the ImageNet-normalised
//!   input, histogram of the grey values inside [0, 1] only, `mask = grey > t`.
//!
//! Histogram: 256 bins on [0, 1] (`torch.histc`), `sigma²(t) = (mu_T omega - mu)² /
//! (omega (1 - omega) + 1e-8)`, `t* = ` first argmax (0 when no pixel is in range), threshold
//! `t*/255`.
//!
//! Exactness: the grey values are never formed in floating point. The paper grey is the integer
//! `2989 R + 5870 G + 1140 B` in units of 1e-4/255; the released grey is a 64-bit fixed-point
//! number (units of 2^-40) summed from per-channel tables built here from exact rationals, so
//! its error (< 1.5e-12) is far below the distance of any u8 colour to a bin edge (3.2e-10) or to
//! a threshold t/255 (1.4e-9): bins and mask agree with an f64 evaluation for every colour. The
//! argmax compares `sigma²` of two candidates exactly, with multi-word integer products of the
//! exact cumulative counts, so near-ties are resolved as in exact arithmetic. The released grey is
//! computed from the packed pixels, i.e. it is the grey of `x_norm` *as defined*
//! (`x_norm = (px - mean) / std`), not of its f32 rounding; `x_norm` is only shape-checked.

use super::u;
use crate::error::{Error, Result};
use crate::gpu::{Kernel, Params, Recorder, ShaderFamily, Tensor};

crate::uniform! {
    /// otsu.wgsl `OtsuParams` (otsu_hist, otsu_select, otsu_mask).
    struct OtsuParams { npix: u32, batch: u32, gpi: u32, chunk: u32 }
}

/// Host constant words in the uniform of `otsu_consts` (otsu.wgsl `ConstParams`).
const CONST_WORDS: usize = 2304;

/// otsu.wgsl `ConstParams`. Written out rather than with `uniform!`, which takes scalars only.
#[repr(C)]
#[derive(Clone, Copy)]
struct ConstParams {
    n: u32,
    pad0: u32,
    pad1: u32,
    pad2: u32,
    words: [[u32; 4]; CONST_WORDS / 4],
}

// SAFETY: repr(C), u32 fields and arrays of u32 only (no padding, every bit pattern valid).
unsafe impl bytemuck::Zeroable for ConstParams {}
unsafe impl bytemuck::Pod for ConstParams {}

impl Params for ConstParams {
    const FIELDS: &'static [(&'static str, &'static str, usize)] = &[
        ("n", "u32", std::mem::offset_of!(ConstParams, n)),
        ("pad0", "u32", std::mem::offset_of!(ConstParams, pad0)),
        ("pad1", "u32", std::mem::offset_of!(ConstParams, pad1)),
        ("pad2", "u32", std::mem::offset_of!(ConstParams, pad2)),
        (
            "words",
            "array<vec4<u32>, 576>",
            std::mem::offset_of!(ConstParams, words),
        ),
    ];
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OtsuRule {
    Paper,
    Released,
}

impl OtsuRule {
    fn code(self) -> u32 {
        match self {
            OtsuRule::Paper => 0,
            OtsuRule::Released => 1,
        }
    }
}

/// Largest number of pixels per image: cumulative bin-weighted counts (255 * N) must fit in u32.
pub const MAX_PIXELS_PER_IMAGE: usize = 1 << 24;

/// Pixels handled by one histogram workgroup in [`otsu`].
const CHUNK: usize = 4096;

/// Fixed-point scale of the released grey: units of 2^-40.
const FIX_BITS: u32 = 40;

/// Grey weights as exact rationals (numerator / 10000).
const W_NUM: [i128; 3] = [2989, 5870, 1140];
/// ImageNet mean and std as exact rationals (num, den).
const MEAN: [(i128, i128); 3] = [(123_675, 1000), (11_628, 100), (10_353, 100)];
const STD: [(i128, i128); 3] = [(58_395, 1000), (5_712, 100), (57_375, 1000)];

/// Rounds num/den (den > 0) to the nearest integer (ties away from zero).
fn div_round(num: i128, den: i128) -> i128 {
    let q = num.div_euclid(den);
    let r = num.rem_euclid(den);
    if 2 * r >= den { q + 1 } else { q }
}

/// The host constants of shaders/otsu.wgsl (see the layout there).
fn host_constants() -> Vec<u32> {
    let mut c = Vec::with_capacity(2304);
    for t in 0..256u32 {
        c.push(((t as f64 / 255.0) as f32).to_bits());
    }
    // released: term_k(v) = w_k (v - mean_k) / std_k * 2^40
    //   = W_NUM_k (v * mden - mnum) * sden * 2^40 / (10000 * mden * snum)
    for k in 0..3 {
        let (mn, md) = MEAN[k];
        let (sn, sd) = STD[k];
        for v in 0..256i128 {
            let num = W_NUM[k] * (v * md - mn) * sd * (1i128 << FIX_BITS);
            let den = 10_000 * md * sn;
            let q = div_round(num, den) as i64 as u64;
            c.push(q as u32);
            c.push((q >> 32) as u32);
        }
    }
    for t in 0..256u64 {
        let x = (t << FIX_BITS) / 255;
        c.push(x as u32);
        c.push((x >> 32) as u32);
    }
    c
}

fn kernel(entry: &'static str, rule: OtsuRule) -> Kernel {
    Kernel::new(ShaderFamily::Otsu, entry, 256).u("RULE", rule.code())
}

fn check_shapes(px: &Tensor, x_norm: Option<&Tensor>) -> Result<(usize, usize, usize)> {
    if px.shape.len() != 3 {
        return Err(Error::Invalid(format!(
            "otsu: pixels must be [B, H, W], got {:?}",
            px.shape
        )));
    }
    let (b, h, w) = (px.shape[0], px.shape[1], px.shape[2]);
    if let Some(x) = x_norm
        && x.shape != [b, h, w, 3]
    {
        return Err(Error::Invalid(format!(
            "otsu: normalised input {:?} does not match pixels {:?} (want [B, H, W, 3])",
            x.shape, px.shape
        )));
    }
    if h * w > MAX_PIXELS_PER_IMAGE {
        return Err(Error::Invalid(format!(
            "otsu: {h}x{w} = {} pixels per image exceeds the supported {MAX_PIXELS_PER_IMAGE}",
            h * w
        )));
    }
    Ok((b, h, w))
}

/// Records the per-image 256-bin histograms (u32 counts in an f32-typed tensor [B, 256]) with
/// `chunk` pixels per workgroup (a multiple of 256). Exposed for tests.
fn otsu_histogram_impl(
    rec: &mut Recorder,
    px: &Tensor,
    rule: OtsuRule,
    chunk: usize,
) -> Result<(Tensor, Tensor)> {
    let (b, h, w) = check_shapes(px, None)?;
    if chunk == 0 || !chunk.is_multiple_of(256) {
        return Err(Error::Invalid(format!(
            "otsu: chunk {chunk} must be a positive multiple of 256"
        )));
    }
    let npix = h * w;
    let consts = record_constants(rec)?;
    let hist = rec.zeros(&[b, 256])?;
    let gpi = npix.div_ceil(chunk).max(1);
    let groups = rec.grid(gpi * b);
    let p = OtsuParams {
        npix: u(npix),
        batch: u(b),
        gpi: u(gpi),
        chunk: u(chunk),
    };
    rec.dispatch(&kernel("otsu_hist", rule), p, &[px, &consts, &hist], groups)?;
    Ok((hist, consts))
}

/// (With the `testing` feature: the hook tests use to pin this choice.)
#[cfg(any(test, feature = "testing"))]
pub fn otsu_histogram(
    rec: &mut Recorder,
    px: &Tensor,
    rule: OtsuRule,
    chunk: usize,
) -> Result<(Tensor, Tensor)> {
    otsu_histogram_impl(rec, px, rule, chunk)
}

/// Records the copy of the host constants into a pooled buffer: they travel in the uniform
/// parameters of a small copy kernel (an upload would be destroyed when the calling function
/// returns, before the recording runs).
fn record_constants(rec: &mut Recorder) -> Result<Tensor> {
    let words = host_constants();
    let consts = rec.gpu.empty(&[words.len()])?;
    let mut cp = ConstParams {
        n: u(words.len()),
        pad0: 0,
        pad1: 0,
        pad2: 0,
        words: [[0; 4]; CONST_WORDS / 4],
    };
    bytemuck::cast_slice_mut::<[u32; 4], u32>(&mut cp.words).copy_from_slice(&words);
    let groups = rec.grid(words.len().div_ceil(256));
    rec.dispatch(
        &Kernel::new(ShaderFamily::Otsu, "otsu_consts", 256),
        cp,
        &[&consts],
        groups,
    )?;
    Ok(consts)
}

/// [`otsu`] with a chosen number of pixels per histogram workgroup (a multiple of 256), so that
/// tests can force large histogram grids.
fn otsu_chunked_impl(
    rec: &mut Recorder,
    px: &Tensor,
    x_norm: &Tensor,
    rule: OtsuRule,
    chunk: usize,
) -> Result<(Tensor, Tensor)> {
    let (b, h, w) = check_shapes(px, Some(x_norm))?;
    let npix = h * w;
    let (hist, consts) = otsu_histogram_impl(rec, px, rule, chunk)?;
    let thr = rec.gpu.empty(&[b])?;
    let tsel = rec.gpu.empty(&[b])?;
    let p = || OtsuParams {
        npix: u(npix),
        batch: u(b),
        gpi: 0,
        chunk: u(chunk),
    };
    let groups = rec.grid(b);
    rec.dispatch(
        &kernel("otsu_select", rule),
        p(),
        &[&hist, &consts, &thr, &tsel],
        groups,
    )?;
    let mask = rec.gpu.empty(&[b, h, w, 1])?;
    let groups = rec.grid((b * npix).div_ceil(256));
    rec.dispatch(
        &kernel("otsu_mask", rule),
        p(),
        &[px, &consts, &mask, &tsel],
        groups,
    )?;
    Ok((thr, mask))
}

/// (With the `testing` feature: the hook tests use to pin this choice.)
#[cfg(any(test, feature = "testing"))]
pub fn otsu_chunked(
    rec: &mut Recorder,
    px: &Tensor,
    x_norm: &Tensor,
    rule: OtsuRule,
    chunk: usize,
) -> Result<(Tensor, Tensor)> {
    otsu_chunked_impl(rec, px, x_norm, rule, chunk)
}

/// The coarse mask `[B, H, W, 1]` of `px` at given threshold indices: `tsel` holds t* (0..=255,
/// u32) per image, as [`otsu`] would have chosen them (e.g. one threshold for every window of a
/// large image). The caller keeps `tsel` alive until the recording is submitted.
pub fn otsu_mask_at(
    rec: &mut Recorder,
    px: &Tensor,
    x_norm: &Tensor,
    rule: OtsuRule,
    tsel: &Tensor,
) -> Result<Tensor> {
    let (b, h, w) = check_shapes(px, Some(x_norm))?;
    if tsel.shape != [b] {
        return Err(Error::Invalid(format!(
            "otsu_mask_at: thresholds {:?} for a batch of {b}",
            tsel.shape
        )));
    }
    let npix = h * w;
    let consts = record_constants(rec)?;
    let p = OtsuParams {
        npix: u(npix),
        batch: u(b),
        gpi: 0,
        chunk: u(CHUNK),
    };
    let mask = rec.gpu.empty(&[b, h, w, 1])?;
    let groups = rec.grid((b * npix).div_ceil(256));
    rec.dispatch(
        &kernel("otsu_mask", rule),
        p,
        &[px, &consts, &mask, tsel],
        groups,
    )?;
    Ok(mask)
}

/// px: packed RGB pixels u32 (0xAABBGGRR; R = low byte) [B,S,S] at model resolution; x_norm: the
/// ImageNet-normalised input [B,S,S,3] (mean 123.675/116.28/103.53, std 58.395/57.12/57.375).
/// Returns (threshold [B] = t*/255 as f32, mask [B,S,S,1] f32 in {0,1}).
/// Paper: grey = (0.2989 R + 0.5870 G + 0.1140 B)/255 from the raw u8 pixels, mask = grey >= t.
/// Released: grey = 0.2989 c0 + 0.5870 c1 + 0.1140 c2 on x_norm, histogram only of grey in [0,1],
/// mask = grey > t.
///
/// Both greys are evaluated exactly from `px` (see the module docs); `x_norm` must be the
/// normalisation of `px` and is only checked for its shape. Non-square [B, H, W] inputs work too.
/// At most [`MAX_PIXELS_PER_IMAGE`] pixels per image.
pub fn otsu(
    rec: &mut Recorder,
    px: &Tensor,
    x_norm: &Tensor,
    rule: OtsuRule,
) -> Result<(Tensor, Tensor)> {
    otsu_chunked_impl(rec, px, x_norm, rule, CHUNK)
}

/// Micro-benchmark: both rules on one 1024² image.
#[cfg(not(target_arch = "wasm32"))]
pub fn bench(gpu: &crate::gpu::Gpu) -> Result<Vec<crate::ops::BenchResult>> {
    use crate::ops::{bench_line, time_op};
    let s = 1024;
    let mut rng = crate::rng::Rng::new(42);
    let px: Vec<u32> = (0..s * s)
        .map(|_| rng.next_u64() as u32 & 0x00ff_ffff)
        .collect();
    let px = gpu.upload_u32(&px, &[1, s, s])?;
    let xn = gpu.empty(&[1, s, s, 3])?;
    let mut out = Vec::new();
    for rule in [OtsuRule::Paper, OtsuRule::Released] {
        let ms = time_op(gpu, 10, |rec| {
            otsu(rec, &px, &xn, rule)?;
            Ok(())
        })?;
        // px read twice (histogram, mask), mask written once.
        let bytes = (3 * 4 * s * s) as f64;
        out.push(bench_line(
            format!("otsu {rule:?} 1x1024x1024"),
            ms,
            None,
            Some(bytes),
        ));
    }
    Ok(out)
}
