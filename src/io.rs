//! Images in and out: decoding (PNG, JPEG, BMP, TIFF incl. 16-bit; grey, RGB, RGBA) to RGB u8, the
//! stretch-resize to the model size, PNG encoding of masks and overlays, atomic file writes.

use crate::error::{Error, Result};

/// An 8-bit RGB image, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

/// An 8-bit single-channel image (masks).
#[derive(Clone, Debug, PartialEq)]
pub struct GrayImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

pub const SUPPORTED: &str = "PNG, JPEG, BMP, TIFF";

fn is_supported(f: image::ImageFormat) -> bool {
    matches!(
        f,
        image::ImageFormat::Png
            | image::ImageFormat::Jpeg
            | image::ImageFormat::Bmp
            | image::ImageFormat::Tiff
    )
}

/// Scales 16-bit samples to 8 bits: used as they are when every sample is ≤ 255 (8-bit data in a
/// 16-bit container, common for microscopy), otherwise linearly so that the image maximum is 255.
fn u16_to_u8(samples: &[u16]) -> Vec<u8> {
    let max = samples.iter().copied().max().unwrap_or(0);
    if max <= 255 {
        samples.iter().map(|&v| v as u8).collect()
    } else {
        let s = 255.0 / max as f64;
        samples
            .iter()
            .map(|&v| (v as f64 * s).round().min(255.0) as u8)
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Decode limits

/// Default pixel budget of one decoded image: 2^28 = 268 Mpx (16384 × 16384).
pub const DEFAULT_MAX_PIXELS: u64 = 1 << 28;

/// Bytes of decoder allocation allowed per budgeted pixel (the widest layout the supported formats
/// decode to is 4 channels × f32 = 16 bytes per pixel).
pub const ALLOC_BYTES_PER_PIXEL: u64 = 16;

/// The environment variable that sets the pixel budget (a positive integer, `_` allowed as a
/// digit separator) when [`set_max_pixels`] has not been called.
pub const MAX_PIXELS_ENV: &str = "MEDFASTSAM_MAX_PIXELS";

/// What one image decode may cost. The declared width × height is checked against `max_pixels`
/// from the file's header, before any pixel buffer is allocated; `max_alloc_bytes` is handed to the
/// decoders as a second guard (the `image` crate's `Limits::max_alloc`, which bounds the output
/// buffer and, for TIFF and PNG, the decoder's intermediate buffers), with each side bounded by
/// `max_pixels` (`Limits::max_image_width/height`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeLimits {
    pub max_pixels: u64,
    pub max_alloc_bytes: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits::with_max_pixels(DEFAULT_MAX_PIXELS)
    }
}

impl DecodeLimits {
    /// A budget of `max_pixels` pixels, with `max_alloc_bytes` = 16 bytes per pixel.
    pub fn with_max_pixels(max_pixels: u64) -> Self {
        DecodeLimits {
            max_pixels,
            max_alloc_bytes: max_pixels.saturating_mul(ALLOC_BYTES_PER_PIXEL),
        }
    }

    /// The limits in force: those of [`set_max_pixels`] if it was called, else
    /// `MEDFASTSAM_MAX_PIXELS` if set, else the default (2^28 pixels). An unparsable variable is an
    /// error (never silently ignored).
    pub fn current() -> Result<Self> {
        let n = MAX_PIXELS.load(std::sync::atomic::Ordering::Relaxed);
        if n != 0 {
            return Ok(DecodeLimits::with_max_pixels(n));
        }
        match std::env::var(MAX_PIXELS_ENV) {
            Ok(v) => Ok(DecodeLimits::with_max_pixels(
                parse_max_pixels(&v)
                    .map_err(|m| Error::Invalid(format!("{MAX_PIXELS_ENV}={v:?}: {m}")))?,
            )),
            Err(std::env::VarError::NotPresent) => Ok(DecodeLimits::default()),
            Err(e) => Err(Error::Invalid(format!("{MAX_PIXELS_ENV}: {e}"))),
        }
    }

    fn image_limits(&self, sides: bool) -> image::Limits {
        let mut l = image::Limits::default();
        l.max_alloc = Some(self.max_alloc_bytes);
        if sides {
            let side = u32::try_from(self.max_pixels).unwrap_or(u32::MAX);
            l.max_image_width = Some(side);
            l.max_image_height = Some(side);
        }
        l
    }
}

static MAX_PIXELS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Sets the process-wide pixel budget used by [`decode_rgb`], [`decode_gray`], [`load_rgb`] and
/// [`load_gray`] (what the command line's `--max-pixels` sets); it takes precedence over
/// `MEDFASTSAM_MAX_PIXELS`. `0` restores the default behaviour (variable, else 2^28).
pub fn set_max_pixels(n: u64) {
    MAX_PIXELS.store(n, std::sync::atomic::Ordering::Relaxed);
}

/// Parses a pixel budget: a positive integer, `_` allowed between digits (`268_435_456`).
pub fn parse_max_pixels(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim().replace('_', "");
    match t.parse::<u64>() {
        Ok(0) => Err("the pixel budget must be positive".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{s:?} is not a pixel count (a positive integer)")),
    }
}

fn mpx(n: u64) -> String {
    let m = n as f64 / 1e6;
    if m >= 10.0 {
        format!("{m:.0}")
    } else {
        format!("{m:.2}")
    }
}

/// The error for an image whose declared size is above the budget.
fn over_budget(source: &str, w: u64, h: u64, limits: &DecodeLimits) -> Error {
    Error::image(
        source,
        format!(
            "image is {w}x{h} ({} Mpx), above the pixel budget of {} Mpx ({} pixels; set --max-pixels / \
             {MAX_PIXELS_ENV} to raise it)",
            mpx(w * h),
            mpx(limits.max_pixels),
            limits.max_pixels
        ),
    )
}

// ---------------------------------------------------------------------------------------------
// Truncation: the decoders of the `image` crate fill missing JPEG data with grey (zune-jpeg in
// its lenient mode) and never look for PNG's IEND, so the container structure is checked here.

fn truncated(source: &str, what: &str, len: usize) -> Error {
    Error::image(
        source,
        format!("truncated {what}: the file ends at byte {len} ({what} incomplete)"),
    )
}

/// A JPEG is complete when its marker segments are whole and an EOI marker (FF D9) follows the
/// entropy-coded data of the last scan.
fn check_jpeg_complete(b: &[u8], source: &str) -> Result<()> {
    let t = || truncated(source, "JPEG", b.len());
    if b.len() < 4 || b[0] != 0xFF || b[1] != 0xD8 {
        return Err(t());
    }
    let mut i = 2;
    loop {
        // Next marker: 0xFF (fill bytes 0xFF allowed) then a code.
        if i >= b.len() {
            return Err(t());
        }
        if b[i] != 0xFF {
            return Err(Error::image(
                source,
                format!("corrupt JPEG: no marker at byte {i}"),
            ));
        }
        while i < b.len() && b[i] == 0xFF {
            i += 1;
        }
        if i >= b.len() {
            return Err(t());
        }
        let code = b[i];
        i += 1;
        match code {
            0xD9 => return Ok(()),          // EOI
            0x01 | 0xD0..=0xD7 => continue, // TEM, RSTn: no length
            _ => {}
        }
        if i + 2 > b.len() {
            return Err(t());
        }
        let len = u16::from_be_bytes([b[i], b[i + 1]]) as usize;
        if len < 2 {
            return Err(Error::image(
                source,
                format!("corrupt JPEG: segment length {len} at byte {i}"),
            ));
        }
        if i + len > b.len() {
            return Err(t());
        }
        i += len;
        if code == 0xDA {
            // SOS: entropy-coded data up to the next marker that is not a stuffed 00 or a RSTn.
            loop {
                match b[i..].iter().position(|&v| v == 0xFF) {
                    None => return Err(t()),
                    Some(p) => i += p,
                }
                let mut j = i + 1;
                while j < b.len() && b[j] == 0xFF {
                    j += 1;
                }
                if j >= b.len() {
                    return Err(t());
                }
                if b[j] == 0x00 || (0xD0..=0xD7).contains(&b[j]) {
                    i = j + 1;
                } else {
                    i = j - 1; // at the 0xFF before the marker code
                    break;
                }
            }
        }
    }
}

/// A PNG is complete when its chunks are whole up to and including IEND.
fn check_png_complete(b: &[u8], source: &str) -> Result<()> {
    let mut i = 8;
    loop {
        if i + 8 > b.len() {
            return Err(truncated(source, "PNG", b.len()));
        }
        let len = u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]) as usize;
        let kind = &b[i + 4..i + 8];
        let end = match (i + 12).checked_add(len) {
            Some(e) if e <= b.len() => e,
            _ => return Err(truncated(source, "PNG", b.len())),
        };
        if kind == b"IEND" {
            return Ok(());
        }
        i = end;
    }
}

/// The decoder's message on one line (zune-jpeg's end with a newline).
fn one_line(e: &dyn std::fmt::Display) -> String {
    e.to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// The tag values of a classic TIFF's IFDs must lie inside the file. The `tiff` crate reads the
/// first IFD under its default limits (a 256 MiB value buffer), so a 300-byte file declaring a
/// tag with 8 M values made it allocate 256 MiB before failing; such a file is refused here.
fn check_tiff_values(b: &[u8], source: &str) -> Result<()> {
    let le = match b.get(..4) {
        Some([b'I', b'I', 42, 0]) => true,
        Some([b'M', b'M', 0, 42]) => false,
        _ => return Ok(()), // BigTIFF or not TIFF: left to the decoder
    };
    let u16_at = |i: usize| {
        b.get(i..i + 2).map(|v| {
            if le {
                u16::from_le_bytes([v[0], v[1]])
            } else {
                u16::from_be_bytes([v[0], v[1]])
            }
        })
    };
    let u32_at = |i: usize| {
        b.get(i..i + 4).map(|v| {
            let a = [v[0], v[1], v[2], v[3]];
            if le {
                u32::from_le_bytes(a)
            } else {
                u32::from_be_bytes(a)
            }
        })
    };
    let len = b.len() as u64;
    let past_end = |what: String| {
        Error::image(
            source,
            format!("truncated or corrupt TIFF: {what}, past the end of the {len}-byte file"),
        )
    };
    let mut ifd = u32_at(4).unwrap_or(0) as u64;
    for _ in 0..64 {
        if ifd == 0 {
            break;
        }
        let i = ifd as usize;
        let Some(n) = u16_at(i).filter(|_| ifd + 2 <= len) else {
            return Err(past_end(format!("the IFD at byte {ifd}")));
        };
        if ifd + 2 + 12 * n as u64 + 4 > len {
            return Err(past_end(format!("the IFD at byte {ifd} with {n} entries")));
        }
        for k in 0..n as usize {
            let e = i + 2 + 12 * k;
            let (tag, typ, count) = (
                u16_at(e).unwrap(),
                u16_at(e + 2).unwrap(),
                u32_at(e + 4).unwrap() as u64,
            );
            let size: u64 = match typ {
                1 | 2 | 6 | 7 => 1,
                3 | 8 => 2,
                4 | 9 | 11 | 13 => 4,
                5 | 10 | 12 | 16 | 17 | 18 => 8,
                _ => continue,
            };
            let bytes = count * size;
            if bytes > 4 {
                let at = u32_at(e + 8).unwrap() as u64;
                if at + bytes > len {
                    return Err(past_end(format!(
                        "tag {tag} has {bytes} bytes of values at byte {at}"
                    )));
                }
            }
        }
        ifd = u32_at(i + 2 + 12 * n as usize).unwrap() as u64;
    }
    Ok(())
}

fn decode_error(source: &str, format: image::ImageFormat, e: image::ImageError) -> Error {
    use image::error::{ImageError, LimitErrorKind};
    let eof =
        matches!(&e, ImageError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof);
    let memory = matches!(&e, ImageError::Limits(l) if matches!(l.kind(), LimitErrorKind::InsufficientMemory));
    let msg = one_line(&e);
    if eof {
        Error::image(source, format!("truncated {format:?} image: {msg}"))
    } else if memory {
        Error::image(
            source,
            format!(
                "decoding needs more memory than the decode limit allows ({msg}; set --max-pixels / {MAX_PIXELS_ENV} to raise it)"
            ),
        )
    } else {
        Error::image(source, format!("corrupt or unsupported image: {msg}"))
    }
}

fn guess_format(bytes: &[u8], source: &str) -> Result<image::ImageFormat> {
    match image::guess_format(bytes) {
        Ok(f) if is_supported(f) => Ok(f),
        Ok(f) => Err(Error::image(
            source,
            format!("unsupported image format {f:?} (supported: {SUPPORTED})"),
        )),
        Err(_) => Err(Error::image(
            source,
            format!("not a recognised image file (supported: {SUPPORTED})"),
        )),
    }
}

/// Opens a decoder with the allocation guard set and checks the declared size against the pixel
/// budget. Nothing proportional to the image size has been allocated when this returns.
fn open_decoder<'a>(
    bytes: &'a [u8],
    source: &str,
    limits: &DecodeLimits,
) -> Result<(image::ImageFormat, impl image::ImageDecoder + 'a)> {
    use image::ImageDecoder;
    let format = guess_format(bytes, source)?;
    if format == image::ImageFormat::Tiff {
        check_tiff_values(bytes, source)?;
    }
    let mut reader = image::ImageReader::with_format(std::io::Cursor::new(bytes), format);
    // Side limits are applied after the budget check below, so that an over-budget image gets the
    // budget's message rather than the decoder's.
    reader.limits(limits.image_limits(false));
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| decode_error(source, format, e))?;
    let (w, h) = decoder.dimensions();
    if w == 0 || h == 0 {
        return Err(Error::image(
            source,
            format!("image has zero size ({w}x{h})"),
        ));
    }
    if w as u64 * h as u64 > limits.max_pixels {
        return Err(over_budget(source, w as u64, h as u64, limits));
    }
    decoder
        .set_limits(limits.image_limits(true))
        .map_err(|e| decode_error(source, format, e))?;
    Ok((format, decoder))
}

/// Refuses a declared `w × h` above the pixel budget in force, with the same message as a decode
/// (for callers that read a header themselves, e.g. the dataset check).
pub fn check_pixel_budget(source: &str, w: u64, h: u64) -> Result<()> {
    let limits = DecodeLimits::current()?;
    if w.saturating_mul(h) > limits.max_pixels {
        return Err(over_budget(source, w, h, &limits));
    }
    Ok(())
}

/// An image read row by row is never held whole, so its budget is this many times the pixel
/// budget (65,536² pixels by default); what it holds at once is checked separately.
pub const STREAMED_BUDGET_FACTOR: u64 = 16;

/// Refuses a declared `w × h` above the budget of images read row by row
/// ([`STREAMED_BUDGET_FACTOR`] × the pixel budget in force).
pub fn check_streamed_pixel_budget(source: &str, w: u64, h: u64) -> Result<()> {
    let limits = DecodeLimits::current()?;
    let max = limits.max_pixels.saturating_mul(STREAMED_BUDGET_FACTOR);
    if w.saturating_mul(h) > max {
        return Err(Error::image(
            source,
            format!(
                "image is {w}x{h} ({} Mpx), above the pixel budget of {} Mpx for images read row by row \
                 ({STREAMED_BUDGET_FACTOR} times the budget of {} pixels; set --max-pixels / {MAX_PIXELS_ENV} to raise it)",
                mpx(w.saturating_mul(h)),
                mpx(max),
                limits.max_pixels
            ),
        ));
    }
    Ok(())
}

/// The width and height an image file declares in its header (format and pixel budget checked,
/// pixels not decoded).
pub fn image_dimensions(
    bytes: &[u8],
    source: &str,
    limits: &DecodeLimits,
) -> Result<(usize, usize)> {
    use image::ImageDecoder;
    let (_, d) = open_decoder(bytes, source, limits)?;
    let (w, h) = d.dimensions();
    Ok((w as usize, h as usize))
}

fn decode_dynamic(
    bytes: &[u8],
    source: &str,
    limits: &DecodeLimits,
) -> Result<image::DynamicImage> {
    use image::ImageDecoder;
    // Container completeness first (a scan of the bytes, nothing allocated), so that a cut file
    // is reported as truncated whichever part of it is missing.
    match guess_format(bytes, source)? {
        image::ImageFormat::Jpeg => check_jpeg_complete(bytes, source)?,
        image::ImageFormat::Png => check_png_complete(bytes, source)?,
        _ => {}
    }
    let (format, decoder) = open_decoder(bytes, source, limits)?;
    let mut guard = limits.image_limits(true);
    guard
        .reserve(decoder.total_bytes())
        .map_err(|e| decode_error(source, format, e))?;
    image::DynamicImage::from_decoder(decoder).map_err(|e| decode_error(source, format, e))
}

/// Decodes an image file's bytes to RGB u8 (alpha dropped, grey replicated), under the pixel
/// budget in force ([`DecodeLimits::current`]). Errors name `source`: unsupported or unrecognised
/// format, corrupt data, a truncated file, a declared size above the budget.
pub fn decode_rgb(bytes: &[u8], source: &str) -> Result<RgbImage> {
    decode_rgb_with(bytes, source, &DecodeLimits::current()?)
}

/// [`decode_rgb`] under explicit limits.
pub fn decode_rgb_with(bytes: &[u8], source: &str, limits: &DecodeLimits) -> Result<RgbImage> {
    use image::DynamicImage as D;
    let img = decode_dynamic(bytes, source, limits)?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let data = match &img {
        D::ImageLuma16(_) | D::ImageLumaA16(_) => {
            let g = u16_to_u8(img.to_luma16().as_raw());
            g.iter().flat_map(|&v| [v, v, v]).collect()
        }
        D::ImageRgb16(_) | D::ImageRgba16(_) => u16_to_u8(img.to_rgb16().as_raw()),
        _ => img.to_rgb8().into_raw(),
    };
    Ok(RgbImage {
        width: w,
        height: h,
        data,
    })
}

/// Decodes a mask image to one channel u8 (first channel of RGB masks; 16-bit label images are
/// mapped to 255 where the label is non-zero), under the pixel budget in force.
pub fn decode_gray(bytes: &[u8], source: &str) -> Result<GrayImage> {
    decode_gray_with(bytes, source, &DecodeLimits::current()?)
}

/// [`decode_gray`] under explicit limits.
pub fn decode_gray_with(bytes: &[u8], source: &str, limits: &DecodeLimits) -> Result<GrayImage> {
    use image::DynamicImage as D;
    let img = decode_dynamic(bytes, source, limits)?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let data = match &img {
        D::ImageLuma16(_) | D::ImageLumaA16(_) | D::ImageRgb16(_) | D::ImageRgba16(_) => img
            .to_luma16()
            .as_raw()
            .iter()
            .map(|&v| if v > 0 { 255 } else { 0 })
            .collect(),
        D::ImageLuma8(_) | D::ImageLumaA8(_) => img.to_luma8().into_raw(),
        _ => img
            .to_rgb8()
            .as_raw()
            .chunks_exact(3)
            .map(|p| p[0])
            .collect(),
    };
    Ok(GrayImage {
        width: w,
        height: h,
        data,
    })
}

#[cfg(not(target_arch = "wasm32"))]
pub fn load_rgb(path: &std::path::Path) -> Result<RgbImage> {
    let limits = DecodeLimits::current()?;
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_rgb_with(&bytes, &path.display().to_string(), &limits)
}

#[cfg(not(target_arch = "wasm32"))]
pub fn load_gray(path: &std::path::Path) -> Result<GrayImage> {
    let limits = DecodeLimits::current()?;
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_gray_with(&bytes, &path.display().to_string(), &limits)
}

/// The size an image file declares (header only: format and pixel budget checked, pixels not
/// decoded), for checking a dataset's samples before loading them.
#[cfg(not(target_arch = "wasm32"))]
pub fn load_dimensions(path: &std::path::Path) -> Result<(usize, usize)> {
    let limits = DecodeLimits::current()?;
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    image_dimensions(&bytes, &path.display().to_string(), &limits)
}

/// Source coordinate and weight of PyTorch's bilinear resize with align_corners=False.
pub(crate) fn bilinear_taps(out: usize, inp: usize) -> Vec<(usize, usize, f64)> {
    let scale = inp as f64 / out as f64;
    (0..out)
        .map(|o| {
            let src = ((o as f64 + 0.5) * scale - 0.5).max(0.0);
            let i0 = (src.floor() as usize).min(inp - 1);
            let i1 = (i0 + 1).min(inp - 1);
            (i0, i1, src - i0 as f64)
        })
        .collect()
}

/// Fixed-point bits of Pillow's 8-bit resampling coefficients (32 − 8 − 2).
const PIL_PRECISION_BITS: u32 = 22;

/// Pillow's bilinear resampling taps for one axis: for each output index the first input index
/// and the fixed-point weights. The triangle filter is widened by the scale when shrinking
/// (antialiasing), weights are normalised per output and rounded to 22 fractional bits.
fn pil_taps(inp: usize, out: usize) -> Vec<(usize, Vec<i64>)> {
    let scale = inp as f64 / out as f64;
    let filterscale = scale.max(1.0);
    let support = filterscale; // the bilinear filter's support is 1
    (0..out)
        .map(|o| {
            let center = (o as f64 + 0.5) * scale;
            // C's (int) truncates toward zero.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(inp as i64) as usize;
            let k: Vec<f64> = (xmin..xmax)
                .map(|x| {
                    let t = ((x as f64 - center + 0.5) / filterscale).abs();
                    if t < 1.0 { 1.0 - t } else { 0.0 }
                })
                .collect();
            let total: f64 = k.iter().sum();
            let one = (1i64 << PIL_PRECISION_BITS) as f64;
            let kk = k
                .iter()
                .map(|&w| {
                    let w = if total != 0.0 { w / total } else { w };
                    if w < 0.0 {
                        (-0.5 + w * one) as i64
                    } else {
                        (0.5 + w * one) as i64
                    }
                })
                .collect();
            (xmin, kk)
        })
        .collect()
}

fn pil_clip8(v: i64) -> u8 {
    (v >> PIL_PRECISION_BITS).clamp(0, 255) as u8
}

impl RgbImage {
    /// Resize as Pillow's `Image.resize(..., BILINEAR)` does for 8-bit RGB, to the last bit:
    /// horizontal pass first (rounded to u8), then vertical, with Pillow's fixed-point taps
    /// (antialiased when shrinking). SAM's and LiteMedSAM's reference preprocessing use it.
    pub fn resize_pil_bilinear(&self, w: usize, h: usize) -> RgbImage {
        let (iw, ih) = (self.width, self.height);
        let mut tmp = self.data.clone();
        let mut tw = iw;
        if w != iw {
            let taps = pil_taps(iw, w);
            tmp = vec![0u8; w * ih * 3];
            for y in 0..ih {
                for (x, (x0, k)) in taps.iter().enumerate() {
                    for c in 0..3 {
                        let mut acc = 1i64 << (PIL_PRECISION_BITS - 1);
                        for (j, &kj) in k.iter().enumerate() {
                            acc += self.data[(y * iw + x0 + j) * 3 + c] as i64 * kj;
                        }
                        tmp[(y * w + x) * 3 + c] = pil_clip8(acc);
                    }
                }
            }
            tw = w;
        }
        if h == ih {
            return RgbImage {
                width: tw,
                height: ih,
                data: tmp,
            };
        }
        let taps = pil_taps(ih, h);
        let mut out = vec![0u8; tw * h * 3];
        for (y, (y0, k)) in taps.iter().enumerate() {
            for x in 0..tw {
                for c in 0..3 {
                    let mut acc = 1i64 << (PIL_PRECISION_BITS - 1);
                    for (j, &kj) in k.iter().enumerate() {
                        acc += tmp[((y0 + j) * tw + x) * 3 + c] as i64 * kj;
                    }
                    out[(y * tw + x) * 3 + c] = pil_clip8(acc);
                }
            }
        }
        RgbImage {
            width: tw,
            height: h,
            data: out,
        }
    }

    /// Stretch-resize (no aspect preservation) with bilinear interpolation, align_corners=False,
    /// rounded to u8 (the authors pre-resized their datasets to 1024² 8-bit PNGs this way).
    pub fn resize(&self, w: usize, h: usize) -> RgbImage {
        if w == self.width && h == self.height {
            return self.clone();
        }
        let xs = bilinear_taps(w, self.width);
        let ys = bilinear_taps(h, self.height);
        let mut data = vec![0u8; w * h * 3];
        let at = |x: usize, y: usize, c: usize| self.data[(y * self.width + x) * 3 + c] as f64;
        for (oy, &(y0, y1, fy)) in ys.iter().enumerate() {
            for (ox, &(x0, x1, fx)) in xs.iter().enumerate() {
                for c in 0..3 {
                    let top = at(x0, y0, c) * (1.0 - fx) + at(x1, y0, c) * fx;
                    let bot = at(x0, y1, c) * (1.0 - fx) + at(x1, y1, c) * fx;
                    data[(oy * w + ox) * 3 + c] =
                        (top * (1.0 - fy) + bot * fy).round().clamp(0.0, 255.0) as u8;
                }
            }
        }
        RgbImage {
            width: w,
            height: h,
            data,
        }
    }

    /// Pixels packed as u32 0x00BBGGRR (the GPU input format).
    pub fn packed(&self) -> Vec<u32> {
        self.data
            .chunks_exact(3)
            .map(|p| p[0] as u32 | (p[1] as u32) << 8 | (p[2] as u32) << 16)
            .collect()
    }

    /// A crop (clamped to the image).
    pub fn crop(&self, x0: usize, y0: usize, w: usize, h: usize) -> RgbImage {
        let w = w.min(self.width - x0);
        let h = h.min(self.height - y0);
        let mut data = Vec::with_capacity(w * h * 3);
        for y in y0..y0 + h {
            let row = (y * self.width + x0) * 3;
            data.extend_from_slice(&self.data[row..row + w * 3]);
        }
        RgbImage {
            width: w,
            height: h,
            data,
        }
    }
}

impl GrayImage {
    /// Nearest-neighbour stretch-resize (masks), PyTorch `nearest` convention floor(o*in/out).
    pub fn resize_nearest(&self, w: usize, h: usize) -> GrayImage {
        if w == self.width && h == self.height {
            return self.clone();
        }
        let mut data = vec![0u8; w * h];
        for oy in 0..h {
            let y = (oy * self.height / h).min(self.height - 1);
            for ox in 0..w {
                let x = (ox * self.width / w).min(self.width - 1);
                data[oy * w + ox] = self.data[y * self.width + x];
            }
        }
        GrayImage {
            width: w,
            height: h,
            data,
        }
    }

    pub fn crop(&self, x0: usize, y0: usize, w: usize, h: usize) -> GrayImage {
        let w = w.min(self.width - x0);
        let h = h.min(self.height - y0);
        let mut data = Vec::with_capacity(w * h);
        for y in y0..y0 + h {
            let row = y * self.width + x0;
            data.extend_from_slice(&self.data[row..row + w]);
        }
        GrayImage {
            width: w,
            height: h,
            data,
        }
    }
}

/// PNG bytes of an 8-bit grey image.
pub fn encode_png_gray(img: &GrayImage) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out)
        .write_image(
            &img.data,
            img.width as u32,
            img.height as u32,
            image::ExtendedColorType::L8,
        )
        .map_err(|e| Error::Invalid(format!("PNG encoding failed: {e}")))?;
    Ok(out)
}

/// PNG bytes of an RGB image.
pub fn encode_png_rgb(img: &RgbImage) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out)
        .write_image(
            &img.data,
            img.width as u32,
            img.height as u32,
            image::ExtendedColorType::Rgb8,
        )
        .map_err(|e| Error::Invalid(format!("PNG encoding failed: {e}")))?;
    Ok(out)
}

use image::ImageEncoder;

/// Colour of the mask's interior tint in overlays.
pub const OVERLAY_FILL: [u8; 3] = [0, 220, 80];
/// Colour of the mask's outline in overlays.
pub const OVERLAY_EDGE: [u8; 3] = [255, 230, 0];

/// Per pixel: 0 background, 1 mask interior, 2 mask outline (a foreground pixel on the image
/// border or 4-adjacent to a background pixel). Foreground is > 127.
pub fn mask_outline(mask: &GrayImage) -> Vec<u8> {
    let (w, h) = (mask.width, mask.height);
    let fg = |x: usize, y: usize| mask.data[y * w + x] > 127;
    let mut out = vec![0u8; w * h];
    for y in 0..h {
        for x in 0..w {
            if !fg(x, y) {
                continue;
            }
            let edge = x == 0
                || y == 0
                || x + 1 == w
                || y + 1 == h
                || !fg(x - 1, y)
                || !fg(x + 1, y)
                || !fg(x, y - 1)
                || !fg(x, y + 1);
            out[y * w + x] = 1 + edge as u8;
        }
    }
    out
}

/// The image with the mask tinted green (alpha `opacity`) and its outline drawn in yellow.
pub fn overlay(img: &RgbImage, mask: &GrayImage, opacity: f32) -> RgbImage {
    assert_eq!((img.width, img.height), (mask.width, mask.height));
    let mut data = img.data.clone();
    for (p, &kind) in data.chunks_exact_mut(3).zip(&mask_outline(mask)) {
        let (color, a) = match kind {
            0 => continue,
            1 => (OVERLAY_FILL, opacity),
            _ => (OVERLAY_EDGE, 1.0),
        };
        for c in 0..3 {
            p[c] = (p[c] as f32 * (1.0 - a) + color[c] as f32 * a).round() as u8;
        }
    }
    RgbImage {
        width: img.width,
        height: img.height,
        data,
    }
}

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename, so a crash
/// never leaves a partial file and an existing file is replaced only by a complete one.
#[cfg(not(target_arch = "wasm32"))]
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| Error::Invalid(format!("{}: not a file path", path.display())))?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let res = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn resize_matches_pytorch_bilinear_taps() {
        // 4 -> 2: src = (o+0.5)*2-0.5 = 0.5, 2.5 -> averages of pixel pairs
        let img = RgbImage {
            width: 4,
            height: 1,
            data: vec![0, 0, 0, 10, 10, 10, 20, 20, 20, 40, 40, 40],
        };
        let r = img.resize(2, 1);
        assert_eq!(r.data, vec![5, 5, 5, 30, 30, 30]);
        // upsampling 2 -> 4: src = -0.25 (clamped 0), 0.25, 0.75, 1.25 -> last clamps to pixel 1
        let img = RgbImage {
            width: 2,
            height: 1,
            data: vec![0, 0, 0, 100, 100, 100],
        };
        assert_eq!(
            img.resize(4, 1)
                .data
                .chunks(3)
                .map(|p| p[0])
                .collect::<Vec<_>>(),
            vec![0, 25, 75, 100]
        );
    }
    #[test]
    fn sixteen_bit_scaling() {
        assert_eq!(u16_to_u8(&[0, 100, 255]), vec![0, 100, 255]);
        assert_eq!(u16_to_u8(&[0, 500, 1000]), vec![0, 128, 255]);
    }
}

#[cfg(test)]
mod overlay_tests {
    use super::*;

    #[test]
    fn outline_marks_border_and_background_neighbours() {
        // 5x4 mask: a 3x3 block at (1..4, 0..3); only its centre (2, 1) is interior.
        let mut data = vec![0u8; 20];
        for y in 0..3 {
            for x in 1..4 {
                data[y * 5 + x] = 255;
            }
        }
        let kinds = mask_outline(&GrayImage {
            width: 5,
            height: 4,
            data: data.clone(),
        });
        let mut want = vec![0u8; 20];
        for y in 0..3 {
            for x in 1..4 {
                want[y * 5 + x] = if (x, y) == (2, 1) { 1 } else { 2 };
            }
        }
        assert_eq!(kinds, want);
        let img = RgbImage {
            width: 5,
            height: 4,
            data: vec![100; 60],
        };
        let o = overlay(
            &img,
            &GrayImage {
                width: 5,
                height: 4,
                data,
            },
            0.5,
        );
        assert_eq!(&o.data[0..3], &[100, 100, 100]); // background unchanged
        assert_eq!(&o.data[3..6], &OVERLAY_EDGE); // outline opaque
        assert_eq!(&o.data[(5 + 2) * 3..(5 + 2) * 3 + 3], &[50, 160, 90]); // interior: half tint
    }
}
