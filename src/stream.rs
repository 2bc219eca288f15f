//! Whole images row by row, so that an image of any size is segmented in memory bounded by one band
//! of windows: sources that decode one row at a time (PNG; striped and tiled TIFF and BigTIFF,
//! JPEG-compressed tiles included, pyramid levels of whole-slide TIFFs such as Aperio SVS), a
//! region of interest, a bilinear rescaler, the band of rows a row of windows reads, and PNG
//! writers that take rows.
//!
//! Pixels come out as 8-bit RGB with the same rules as [`crate::io::decode_rgb`]: grey is
//! replicated, alpha dropped, palettes expanded, and 16-bit samples kept as they are when the
//! image's largest colour sample is at most 255 and otherwise scaled by 255 / that maximum
//! (which a 16-bit source finds in a first pass over the file).

use crate::error::{Error, Result};
use crate::io::RgbImage;

/// An image read once, top to bottom, one row of RGB bytes at a time.
pub trait RowSource {
    fn width(&self) -> usize;
    fn height(&self) -> usize;
    /// The next row (`width × 3` bytes); rows come once each, from 0 to `height − 1`.
    fn read_row(&mut self, out: &mut [u8]) -> Result<()>;
}

impl<S: RowSource + ?Sized> RowSource for Box<S> {
    fn width(&self) -> usize {
        (**self).width()
    }
    fn height(&self) -> usize {
        (**self).height()
    }
    fn read_row(&mut self, out: &mut [u8]) -> Result<()> {
        (**self).read_row(out)
    }
}

fn past_end(h: usize) -> Error {
    Error::Invalid(format!("read past the last of {h} rows"))
}

/// The rows of an image in memory.
pub struct MemoryRows<'a> {
    img: &'a RgbImage,
    y: usize,
}

impl<'a> MemoryRows<'a> {
    pub fn new(img: &'a RgbImage) -> MemoryRows<'a> {
        MemoryRows { img, y: 0 }
    }
}

impl RowSource for MemoryRows<'_> {
    fn width(&self) -> usize {
        self.img.width
    }
    fn height(&self) -> usize {
        self.img.height
    }
    fn read_row(&mut self, out: &mut [u8]) -> Result<()> {
        let w3 = self.img.width * 3;
        if self.y >= self.img.height {
            return Err(past_end(self.img.height));
        }
        out.copy_from_slice(&self.img.data[self.y * w3..(self.y + 1) * w3]);
        self.y += 1;
        Ok(())
    }
}

/// An owned image in memory (formats read whole: JPEG, BMP, interlaced PNG).
pub struct OwnedRows {
    img: RgbImage,
    y: usize,
}

impl OwnedRows {
    pub fn new(img: RgbImage) -> OwnedRows {
        OwnedRows { img, y: 0 }
    }
}

impl RowSource for OwnedRows {
    fn width(&self) -> usize {
        self.img.width
    }
    fn height(&self) -> usize {
        self.img.height
    }
    fn read_row(&mut self, out: &mut [u8]) -> Result<()> {
        let mut m = MemoryRows {
            img: &self.img,
            y: self.y,
        };
        m.read_row(out)?;
        self.y = m.y;
        Ok(())
    }
}

#[cfg(not(target_arch = "wasm32"))]
/// Interleaved samples of `channels` per pixel to RGB (1: grey replicated, 2: grey + alpha,
/// 3: RGB, 4: RGBA; alpha dropped).
fn to_rgb<T: Copy>(src: &[T], channels: usize, out: &mut [u8], conv: impl Fn(T) -> u8) {
    for (p, o) in src.chunks_exact(channels).zip(out.chunks_exact_mut(3)) {
        if channels < 3 {
            let g = conv(p[0]);
            o.copy_from_slice(&[g, g, g]);
        } else {
            o.copy_from_slice(&[conv(p[0]), conv(p[1]), conv(p[2])]);
        }
    }
}

#[cfg(not(target_arch = "wasm32"))]
/// The 16→8-bit rule of [`crate::io::decode_rgb`] given the image's largest colour sample.
fn u16_rule(max: u16) -> impl Fn(u16) -> u8 {
    let s = 255.0 / max.max(1) as f64;
    move |v: u16| {
        if max <= 255 {
            v as u8
        } else {
            (v as f64 * s).round().min(255.0) as u8
        }
    }
}

#[cfg(not(target_arch = "wasm32"))]
/// Colour samples of interleaved pixels (alpha excluded), for the 16-bit maximum.
fn colour_samples(channels: usize) -> usize {
    if channels < 3 { 1 } else { 3 }
}

// ------------------------------------------------------------------------------------------ PNG

#[cfg(not(target_arch = "wasm32"))]
mod png_rows {
    use super::*;
    use std::fs::File;
    use std::io::BufReader;
    use std::path::Path;

    /// A non-interlaced PNG decoded row by row.
    pub struct PngRows {
        reader: png::Reader<BufReader<File>>,
        source: String,
        width: usize,
        height: usize,
        channels: usize,
        max16: Option<u16>,
        y: usize,
    }

    fn png_error(source: &str, e: png::DecodingError) -> Error {
        match e {
            png::DecodingError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
                Error::image(source, "truncated PNG: the file ends before its last row")
            }
            other => Error::image(source, format!("corrupt or unsupported PNG: {other}")),
        }
    }

    fn open_reader(path: &Path) -> Result<png::Reader<BufReader<File>>> {
        let f = File::open(path).map_err(|e| Error::io(path, e))?;
        let mut dec = png::Decoder::new(BufReader::new(f));
        dec.set_transformations(png::Transformations::EXPAND);
        dec.read_info()
            .map_err(|e| png_error(&path.display().to_string(), e))
    }

    impl PngRows {
        /// `None` for an interlaced PNG (its rows are not stored in order; read it whole).
        pub fn open(path: &Path) -> Result<Option<PngRows>> {
            let source = path.display().to_string();
            let reader = open_reader(path)?;
            if reader.info().interlaced {
                return Ok(None);
            }
            let (w, h) = reader.info().size();
            let (color, depth) = reader.output_color_type();
            let channels = color.samples();
            let sixteen = depth == png::BitDepth::Sixteen;
            let mut rows = PngRows {
                reader,
                source,
                width: w as usize,
                height: h as usize,
                channels,
                max16: None,
                y: 0,
            };
            if sixteen {
                // First pass: the largest colour sample, for the 16→8-bit rule.
                let mut first = open_reader(path)?;
                let mut max = 0u16;
                let cs = colour_samples(channels);
                while let Some(row) = first.next_row().map_err(|e| png_error(&rows.source, e))? {
                    for p in row.data().chunks_exact(2 * channels) {
                        for c in 0..cs {
                            max = max.max(u16::from_be_bytes([p[2 * c], p[2 * c + 1]]));
                        }
                    }
                }
                rows.max16 = Some(max);
            }
            Ok(Some(rows))
        }
    }

    impl RowSource for PngRows {
        fn width(&self) -> usize {
            self.width
        }
        fn height(&self) -> usize {
            self.height
        }
        fn read_row(&mut self, out: &mut [u8]) -> Result<()> {
            let (channels, max16) = (self.channels, self.max16);
            let row = self
                .reader
                .next_row()
                .map_err(|e| png_error(&self.source, e))?
                .ok_or_else(|| {
                    Error::image(
                        &self.source,
                        format!("truncated PNG: row {} of {} missing", self.y, self.height),
                    )
                })?;
            match max16 {
                None => to_rgb(row.data(), channels, out, |v| v),
                Some(max) => {
                    let v: Vec<u16> = row
                        .data()
                        .chunks_exact(2)
                        .map(|b| u16::from_be_bytes([b[0], b[1]]))
                        .collect();
                    to_rgb(&v, channels, out, u16_rule(max));
                }
            }
            self.y += 1;
            Ok(())
        }
    }
}
#[cfg(not(target_arch = "wasm32"))]
pub use png_rows::PngRows;

// ----------------------------------------------------------------------------------------- TIFF

/// One image of a TIFF file (a page, or a level of a whole-slide pyramid).
#[derive(Clone, Debug, PartialEq)]
pub struct TiffLevel {
    /// Index of the image file directory (IFD) in the file.
    pub ifd: usize,
    pub width: usize,
    pub height: usize,
    pub tiled: bool,
    /// Microns per pixel at this level, when the file says.
    pub mpp: Option<f64>,
}

/// Microns per pixel of a TIFF decoder's current image: Aperio's `MPP = …` in the image
/// description, or the resolution tags (inch or centimetre units); `None` when it states neither.
pub fn tiff_mpp<R: std::io::Read + std::io::Seek>(
    dec: &mut tiff::decoder::Decoder<R>,
) -> Option<f64> {
    use tiff::tags::Tag;
    if let Ok(Some(tiff::decoder::ifd::Value::Ascii(d))) = dec.find_tag(Tag::ImageDescription)
        && let Some(i) = d.find("MPP = ")
    {
        let v: String = d[i + 6..]
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.')
            .collect();
        if let Ok(m) = v.parse::<f64>()
            && m > 0.0
        {
            return Some(m);
        }
    }
    let xres = dec.get_tag_f64(Tag::XResolution).ok()?;
    let unit = dec
        .find_tag_unsigned::<u16>(Tag::ResolutionUnit)
        .ok()
        .flatten();
    let per = match unit {
        Some(3) => 1e4,    // centimetre
        Some(2) => 2.54e4, // inch
        _ => return None,
    };
    (xres > 0.0 && xres.is_finite()).then(|| per / xres)
}

/// [`tiff_mpp`] of the first image of a TIFF file's bytes (`None` for other formats).
pub fn tiff_bytes_mpp(bytes: &[u8]) -> Option<f64> {
    let magic = bytes.get(..4)?;
    if ![b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"].contains(&magic.try_into().ok()?) {
        return None;
    }
    let mut dec = tiff::decoder::Decoder::new(std::io::Cursor::new(bytes)).ok()?;
    tiff_mpp(&mut dec)
}

#[cfg(not(target_arch = "wasm32"))]
mod tiff_rows {
    use super::*;
    use std::fs::File;
    use std::io::BufReader;
    use std::path::Path;
    use tiff::ColorType;
    use tiff::decoder::{ChunkType, Decoder, DecodingResult};
    use tiff::tags::Tag;

    type Dec = Decoder<BufReader<File>>;

    fn terr(source: &str, what: &str, e: tiff::TiffError) -> Error {
        let msg = e.to_string();
        let truncated = matches!(&e, tiff::TiffError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof);
        if truncated {
            Error::image(source, format!("truncated TIFF: {what}: {msg}"))
        } else {
            Error::image(
                source,
                format!("corrupt or unsupported TIFF: {what}: {msg}"),
            )
        }
    }

    fn open_decoder(path: &Path) -> Result<Dec> {
        let source = path.display().to_string();
        let f = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = f.metadata().map(|m| m.len()).unwrap_or(u64::MAX);
        // A tag cannot hold more value bytes than the file has: a few-byte file declaring millions
        // of values must not make the decoder allocate for them.
        let mut limits = tiff::decoder::Limits::default();
        limits.ifd_value_size = (len.min(64 << 20)) as usize;
        Decoder::new(BufReader::new(f))
            .map(|d| d.with_limits(limits))
            .map_err(|e| terr(&source, "header", e))
    }

    fn description(dec: &mut Dec) -> String {
        match dec.find_tag(Tag::ImageDescription) {
            Ok(Some(tiff::decoder::ifd::Value::Ascii(d))) => d,
            _ => String::new(),
        }
    }

    /// The pyramid levels of a TIFF, largest first: its tiled images that are not an Aperio
    /// label or macro image, or its first image when none is tiled. Microns per pixel of a level
    /// without its own is the first level's times the downsample.
    pub fn tiff_levels(path: &Path) -> Result<Vec<TiffLevel>> {
        let source = path.display().to_string();
        let mut dec = open_decoder(path)?;
        let mut all = Vec::new();
        for ifd in 0..4096 {
            if ifd > 0 {
                if !dec.more_images() {
                    break;
                }
                dec.next_image()
                    .map_err(|e| terr(&source, &format!("image {ifd}"), e))?;
            }
            let (w, h) = dec
                .dimensions()
                .map_err(|e| terr(&source, &format!("image {ifd}"), e))?;
            let desc = description(&mut dec).to_ascii_lowercase();
            let associated = desc.contains("label ") || desc.contains("macro ");
            all.push((
                TiffLevel {
                    ifd,
                    width: w as usize,
                    height: h as usize,
                    tiled: dec.get_chunk_type() == ChunkType::Tile,
                    mpp: tiff_mpp(&mut dec),
                },
                associated,
            ));
        }
        let mut levels: Vec<TiffLevel> = all
            .iter()
            .filter(|(l, assoc)| l.tiled && !assoc)
            .map(|(l, _)| l.clone())
            .collect();
        if levels.is_empty() {
            levels.push(all[0].0.clone());
        }
        levels.sort_by_key(|l| std::cmp::Reverse(l.width));
        let (w0, m0) = (levels[0].width, levels[0].mpp);
        for l in levels.iter_mut().skip(1) {
            if l.mpp.is_none() {
                l.mpp = m0.map(|m| m * w0 as f64 / l.width as f64);
            }
        }
        Ok(levels)
    }

    /// A region of one image of a TIFF read strip by strip or row of tiles by row of tiles:
    /// memory is one strip or one row of tiles across the region.
    pub struct TiffRows {
        dec: Dec,
        source: String,
        /// Region in the image's pixels.
        x0: usize,
        y0: usize,
        width: usize,
        height: usize,
        chunk_w: usize,
        chunk_h: usize,
        across: usize,
        tiled: bool,
        channels: usize,
        ycbcr: bool,
        max16: Option<u16>,
        /// RGB rows of the decoded chunk row covering the region's columns.
        buf: Vec<u8>,
        buf_chunk_row: Option<usize>,
        y: usize,
    }

    fn channels_of(source: &str, c: ColorType) -> Result<(usize, u8, bool)> {
        Ok(match c {
            ColorType::Gray(b) => (1, b, false),
            ColorType::GrayA(b) => (2, b, false),
            ColorType::RGB(b) => (3, b, false),
            ColorType::RGBA(b) => (4, b, false),
            ColorType::YCbCr(b) => (3, b, true),
            other => {
                return Err(Error::image(
                    source,
                    format!(
                        "unsupported TIFF colour type {other:?} (grey, RGB, RGBA and YCbCr are read)"
                    ),
                ));
            }
        })
    }

    /// JPEG's YCbCr (full range, BT.601) to RGB.
    fn ycbcr_to_rgb(p: &mut [u8]) {
        let (y, cb, cr) = (p[0] as f64, p[1] as f64 - 128.0, p[2] as f64 - 128.0);
        let c = |v: f64| v.round().clamp(0.0, 255.0) as u8;
        p[0] = c(y + 1.402 * cr);
        p[1] = c(y - 0.344136 * cb - 0.714136 * cr);
        p[2] = c(y + 1.772 * cb);
    }

    impl TiffRows {
        /// Image `ifd` of the file, the region `(x, y, w, h)` of it (the whole image if `None`).
        pub fn open(path: &Path, ifd: usize, region: Option<[usize; 4]>) -> Result<TiffRows> {
            let source = path.display().to_string();
            let mut dec = open_decoder(path)?;
            if ifd > 0 {
                dec.seek_to_image(ifd)
                    .map_err(|e| terr(&source, &format!("image {ifd}"), e))?;
            }
            let (iw, ih) = dec
                .dimensions()
                .map_err(|e| terr(&source, &format!("image {ifd}"), e))?;
            let (iw, ih) = (iw as usize, ih as usize);
            if iw == 0 || ih == 0 {
                return Err(Error::image(
                    &source,
                    format!("image has zero size ({iw}x{ih})"),
                ));
            }
            let [x0, y0, width, height] = region.unwrap_or([0, 0, iw, ih]);
            if width == 0 || height == 0 || x0 + width > iw || y0 + height > ih {
                return Err(Error::image(
                    &source,
                    format!("region {x0},{y0},{width},{height} is not inside the {iw}x{ih} image"),
                ));
            }
            let color = dec
                .colortype()
                .map_err(|e| terr(&source, "colour type", e))?;
            let (channels, bits, ycbcr) = channels_of(&source, color)?;
            if bits != 8 && bits != 16 {
                return Err(Error::image(
                    &source,
                    format!("unsupported TIFF sample depth of {bits} bits (8 and 16 are read)"),
                ));
            }
            let tiled = dec.get_chunk_type() == ChunkType::Tile;
            let (cw, ch) = dec.chunk_dimensions();
            let (cw, ch) = if tiled {
                (cw as usize, ch as usize)
            } else {
                (iw, ch as usize)
            };
            if cw == 0 || ch == 0 {
                return Err(Error::image(&source, "TIFF chunks of zero size"));
            }
            let mut rows = TiffRows {
                dec,
                source,
                x0,
                y0,
                width,
                height,
                chunk_w: cw,
                chunk_h: ch,
                across: iw.div_ceil(cw),
                tiled,
                channels,
                ycbcr,
                max16: None,
                buf: Vec::new(),
                buf_chunk_row: None,
                y: 0,
            };
            if bits == 16 {
                // First pass over the region: the largest colour sample.
                rows.max16 = Some(0);
                let mut max = 0u16;
                let cs = colour_samples(channels);
                let first = y0 / ch;
                let last = (y0 + height - 1) / ch;
                for cr in first..=last {
                    for (_, data) in rows.chunk_row_raw(cr)? {
                        if let DecodingResult::U16(v) = data {
                            for p in v.chunks_exact(channels) {
                                for &s in &p[..cs] {
                                    max = max.max(s);
                                }
                            }
                        }
                    }
                }
                rows.max16 = Some(max);
            }
            Ok(rows)
        }

        /// Names a chunk in errors.
        fn chunk_name(&self, index: usize) -> String {
            if self.tiled {
                format!(
                    "tile {index} (column {}, row {})",
                    index % self.across,
                    index / self.across
                )
            } else {
                format!("strip {index}")
            }
        }

        /// The decoded chunks of chunk row `cr` that the region's columns need, with their
        /// column index.
        fn chunk_row_raw(&mut self, cr: usize) -> Result<Vec<(usize, DecodingResult)>> {
            let (c0, c1) = (
                self.x0 / self.chunk_w,
                (self.x0 + self.width - 1) / self.chunk_w,
            );
            let mut out = Vec::with_capacity(c1 - c0 + 1);
            for c in c0..=c1 {
                let index = cr * self.across + c;
                let data = self
                    .dec
                    .read_chunk(index as u32)
                    .map_err(|e| terr(&self.source, &self.chunk_name(index), e))?;
                out.push((c, data));
            }
            Ok(out)
        }

        fn load_chunk_row(&mut self, cr: usize) -> Result<()> {
            let w = self.width;
            self.buf.clear();
            self.buf.resize(self.chunk_h * w * 3, 0);
            let chunks = self.chunk_row_raw(cr)?;
            for (c, data) in chunks {
                let index = cr * self.across + c;
                let (dw, dh) = self.dec.chunk_data_dimensions(index as u32);
                let (dw, dh) = (dw as usize, dh as usize);
                let n = self.channels;
                let expect = dw * dh * n;
                let got = match &data {
                    DecodingResult::U8(v) => v.len(),
                    DecodingResult::U16(v) => v.len(),
                    _ => 0,
                };
                if got < expect {
                    return Err(Error::image(
                        &self.source,
                        format!(
                            "corrupt TIFF: {} decoded to {got} samples, {expect} expected",
                            self.chunk_name(index)
                        ),
                    ));
                }
                // Columns of this chunk inside the region.
                let cx0 = c * self.chunk_w;
                let a = self.x0.max(cx0);
                let b = (self.x0 + w).min(cx0 + dw);
                if a >= b {
                    continue;
                }
                for r in 0..dh.min(self.chunk_h) {
                    let dst = (r * w + (a - self.x0)) * 3;
                    let dst = &mut self.buf[dst..dst + (b - a) * 3];
                    let s0 = (r * dw + (a - cx0)) * n;
                    let s1 = s0 + (b - a) * n;
                    match &data {
                        DecodingResult::U8(v) => to_rgb(&v[s0..s1], n, dst, |v| v),
                        DecodingResult::U16(v) => {
                            to_rgb(&v[s0..s1], n, dst, u16_rule(self.max16.unwrap_or(0)))
                        }
                        _ => {
                            return Err(Error::image(
                                &self.source,
                                "unsupported TIFF sample format (unsigned 8 or 16 bit are read)",
                            ));
                        }
                    }
                    if self.ycbcr {
                        dst.chunks_exact_mut(3).for_each(ycbcr_to_rgb);
                    }
                }
            }
            self.buf_chunk_row = Some(cr);
            Ok(())
        }
    }

    impl RowSource for TiffRows {
        fn width(&self) -> usize {
            self.width
        }
        fn height(&self) -> usize {
            self.height
        }
        fn read_row(&mut self, out: &mut [u8]) -> Result<()> {
            if self.y >= self.height {
                return Err(past_end(self.height));
            }
            let iy = self.y0 + self.y;
            let cr = iy / self.chunk_h;
            if self.buf_chunk_row != Some(cr) {
                self.load_chunk_row(cr)?;
            }
            let r = iy - cr * self.chunk_h;
            let w3 = self.width * 3;
            out.copy_from_slice(&self.buf[r * w3..(r + 1) * w3]);
            self.y += 1;
            Ok(())
        }
    }
}
#[cfg(not(target_arch = "wasm32"))]
pub use tiff_rows::{TiffRows, tiff_levels};

/// `--level N` beyond what `what` has, listing its levels.
#[cfg(not(target_arch = "wasm32"))]
fn no_such_level(path: &std::path::Path, level: usize, what: &str, levels: &[TiffLevel]) -> Error {
    Error::image(
        path,
        format!(
            "--level {level}: {what} has {} level{} ({})",
            levels.len(),
            if levels.len() == 1 { "" } else { "s" },
            levels
                .iter()
                .enumerate()
                .map(|(i, l)| format!("{i}: {}x{}", l.width, l.height))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    )
}

// ------------------------------------------------------------------------------------ OpenSlide

/// Whole-slide images through OpenSlide (feature `openslide`): a region of one level, read in
/// strips of rows with `openslide_read_region`.
#[cfg(all(feature = "openslide", not(target_arch = "wasm32")))]
mod slide_rows {
    use super::*;
    use openslide_rs::{Address, OpenSlide, Region, Size};
    use std::path::Path;

    /// Rows read from OpenSlide per call.
    const STRIP: usize = 256;

    pub struct SlideRows {
        slide: OpenSlide,
        source: String,
        vendor: String,
        level: u32,
        downsample: f64,
        x0: usize,
        y0: usize,
        width: usize,
        height: usize,
        buf: Vec<u8>,
        buf_y0: Option<usize>,
        y: usize,
    }

    /// The vendor OpenSlide recognises in a file (`None` when it recognises none).
    pub fn slide_vendor(path: &Path) -> Option<String> {
        OpenSlide::detect_vendor(path).ok()
    }

    impl SlideRows {
        /// Level `level` of the slide, the region `x, y, w, h` in that level's pixels.
        pub fn open(
            path: &Path,
            vendor: &str,
            level: usize,
            region: Option<[usize; 4]>,
        ) -> Result<(SlideRows, Vec<TiffLevel>, Option<f64>)> {
            let source = path.display().to_string();
            let slide = OpenSlide::new(path).map_err(|e| {
                Error::image(
                    &source,
                    format!("OpenSlide recognises a {vendor} slide but cannot open it: {e}"),
                )
            })?;
            let mpp = slide
                .property_value("openslide.mpp-x")
                .ok()
                .and_then(|v| v.trim().parse::<f64>().ok())
                .filter(|m| *m > 0.0 && m.is_finite());
            let levels: Vec<TiffLevel> = slide
                .all_level_dimensions()
                .iter()
                .zip(slide.all_level_downsamples())
                .enumerate()
                .map(|(i, (s, d))| TiffLevel {
                    ifd: i,
                    width: s.w as usize,
                    height: s.h as usize,
                    tiled: true,
                    mpp: mpp.map(|m| m * d),
                })
                .collect();
            let Some(l) = levels.get(level) else {
                return Err(no_such_level(
                    path,
                    level,
                    &format!("the {vendor} slide"),
                    &levels,
                ));
            };
            let (iw, ih) = (l.width, l.height);
            let [x0, y0, width, height] = region.unwrap_or([0, 0, iw, ih]);
            if width == 0 || height == 0 || x0 + width > iw || y0 + height > ih {
                return Err(Error::image(
                    &source,
                    format!(
                        "region {x0},{y0},{width},{height} is not inside the {iw}x{ih} level {level}"
                    ),
                ));
            }
            let downsample = slide.all_level_downsamples()[level];
            let mpp_level = l.mpp;
            Ok((
                SlideRows {
                    slide,
                    source,
                    vendor: vendor.to_string(),
                    level: level as u32,
                    downsample,
                    x0,
                    y0,
                    width,
                    height,
                    buf: Vec::new(),
                    buf_y0: None,
                    y: 0,
                },
                levels,
                mpp_level,
            ))
        }

        fn load(&mut self, y: usize) -> Result<()> {
            let rows = STRIP.min(self.height - y);
            // OpenSlide addresses the region's corner in level-0 pixels.
            let ax = ((self.x0 as f64) * self.downsample).round() as u32;
            let ay = (((self.y0 + y) as f64) * self.downsample).round() as u32;
            let argb = self
                .slide
                .read_region(&Region {
                    size: Size {
                        w: self.width as u32,
                        h: rows as u32,
                    },
                    level: self.level,
                    address: Address { x: ax, y: ay },
                })
                .map_err(|e| {
                    Error::image(
                        &self.source,
                        format!(
                            "OpenSlide cannot read rows {}..{} of this {} slide: {e}",
                            self.y0 + y,
                            self.y0 + y + rows,
                            self.vendor
                        ),
                    )
                })?;
            // Premultiplied ARGB, one native-endian u32 per pixel; transparent (unscanned)
            // areas become white, as slide background is.
            self.buf.clear();
            self.buf.reserve(self.width * rows * 3);
            for p in argb.chunks_exact(4) {
                let v = u32::from_ne_bytes([p[0], p[1], p[2], p[3]]);
                let a = v >> 24;
                let rgb = [(v >> 16) & 255, (v >> 8) & 255, v & 255];
                for c in rgb {
                    let c = match a {
                        255 => c,
                        0 => 255,
                        // premultiplied colour composited over white
                        _ => c + (255 - a),
                    };
                    self.buf.push(c.min(255) as u8);
                }
            }
            self.buf_y0 = Some(y);
            Ok(())
        }
    }

    impl RowSource for SlideRows {
        fn width(&self) -> usize {
            self.width
        }
        fn height(&self) -> usize {
            self.height
        }
        fn read_row(&mut self, out: &mut [u8]) -> Result<()> {
            if self.y >= self.height {
                return Err(past_end(self.height));
            }
            let loaded = self
                .buf_y0
                .is_some_and(|b| self.y >= b && self.y < b + STRIP);
            if !loaded {
                self.load(self.y)?;
            }
            let r = self.y - self.buf_y0.unwrap_or(0);
            let w3 = self.width * 3;
            out.copy_from_slice(&self.buf[r * w3..(r + 1) * w3]);
            self.y += 1;
            Ok(())
        }
    }
}
#[cfg(all(feature = "openslide", not(target_arch = "wasm32")))]
pub use slide_rows::{SlideRows, slide_vendor};

// ------------------------------------------------------------------------------------ opening

/// Where to read: a pyramid level and a region of it.
#[derive(Clone, Copy, Debug, Default)]
pub struct OpenOptions {
    /// Pyramid level of a whole-slide TIFF (0 = full resolution).
    pub level: usize,
    /// `x, y, w, h` in the pixels of the chosen level.
    pub region: Option<[usize; 4]>,
}

/// What [`open`] found.
pub struct Opened {
    pub rows: Box<dyn RowSource>,
    /// Microns per pixel, when the file says.
    pub mpp: Option<f64>,
    /// Levels of a TIFF (empty for other formats).
    pub levels: Vec<TiffLevel>,
}

/// Opens an image file for reading row by row: PNG (non-interlaced) and TIFF stream; other
/// formats (JPEG, BMP, interlaced PNG) are decoded whole under the pixel budget.
#[cfg(not(target_arch = "wasm32"))]
pub fn open(path: &std::path::Path, opts: &OpenOptions) -> Result<Opened> {
    use std::io::Read;
    let source = path.display().to_string();
    let mut magic = [0u8; 8];
    let n = std::fs::File::open(path)
        .and_then(|mut f| f.read(&mut magic))
        .map_err(|e| Error::io(path, e))?;
    let magic = &magic[..n];
    // With OpenSlide built in, every slide it recognises (other than a plain TIFF, which the
    // built-in reader streams strip by strip) is read through it.
    #[cfg(feature = "openslide")]
    if let Some(vendor) = slide_vendor(path).filter(|v| v != "generic-tiff") {
        let (rows, levels, mpp) = SlideRows::open(path, &vendor, opts.level, opts.region)?;
        return Ok(Opened {
            rows: Box::new(rows),
            mpp,
            levels,
        });
    }
    let is_tiff = magic.starts_with(b"II*\0")
        || magic.starts_with(b"MM\0*")
        || magic.starts_with(b"II+\0")
        || magic.starts_with(b"MM\0+");
    if is_tiff {
        let levels = tiff_levels(path)?;
        let Some(level) = levels.get(opts.level) else {
            return Err(no_such_level(path, opts.level, "the file", &levels));
        };
        let rows = TiffRows::open(path, level.ifd, opts.region)?;
        return Ok(Opened {
            rows: Box::new(rows),
            mpp: level.mpp,
            levels,
        });
    }
    if opts.level > 0 {
        return Err(Error::image(
            path,
            format!("--level {}: only TIFF files have levels", opts.level),
        ));
    }
    let rows: Box<dyn RowSource> = match magic.starts_with(b"\x89PNG") {
        true => match PngRows::open(path)? {
            Some(p) => Box::new(p),
            None => Box::new(OwnedRows::new(crate::io::load_rgb(path)?)),
        },
        false => Box::new(OwnedRows::new(crate::io::load_rgb(path)?)),
    };
    let rows = match opts.region {
        Some(r) => Box::new(Region::new(rows, r, &source)?) as Box<dyn RowSource>,
        None => rows,
    };
    Ok(Opened {
        rows,
        mpp: None,
        levels: Vec::new(),
    })
}

/// A rectangle `x, y, w, h` of another source.
pub struct Region<S> {
    inner: S,
    x0: usize,
    y0: usize,
    width: usize,
    height: usize,
    row: Vec<u8>,
    skipped: bool,
}

impl<S: RowSource> Region<S> {
    pub fn new(inner: S, r: [usize; 4], source: &str) -> Result<Region<S>> {
        let [x0, y0, width, height] = r;
        let (iw, ih) = (inner.width(), inner.height());
        if width == 0 || height == 0 || x0 + width > iw || y0 + height > ih {
            return Err(Error::image(
                source,
                format!("region {x0},{y0},{width},{height} is not inside the {iw}x{ih} image"),
            ));
        }
        Ok(Region {
            row: vec![0; iw * 3],
            inner,
            x0,
            y0,
            width,
            height,
            skipped: false,
        })
    }
}

impl<S: RowSource> RowSource for Region<S> {
    fn width(&self) -> usize {
        self.width
    }
    fn height(&self) -> usize {
        self.height
    }
    fn read_row(&mut self, out: &mut [u8]) -> Result<()> {
        if !self.skipped {
            for _ in 0..self.y0 {
                self.inner.read_row(&mut self.row)?;
            }
            self.skipped = true;
        }
        self.inner.read_row(&mut self.row)?;
        out.copy_from_slice(&self.row[self.x0 * 3..(self.x0 + self.width) * 3]);
        Ok(())
    }
}

// ------------------------------------------------------------------------------------ rescaling

/// Another source stretched to `width × height` by the bilinear rule of [`RgbImage::resize`]
/// (PyTorch's align_corners=False), bit for bit.
pub struct Scaled<S> {
    inner: S,
    width: usize,
    height: usize,
    xs: Vec<(usize, usize, f64)>,
    ys: Vec<(usize, usize, f64)>,
    /// The two most recent source rows and their indices.
    rows: [(Option<usize>, Vec<u8>); 2],
    next_src: usize,
    y: usize,
}

impl<S: RowSource> Scaled<S> {
    pub fn new(inner: S, width: usize, height: usize) -> Scaled<S> {
        let w3 = inner.width() * 3;
        Scaled {
            xs: crate::io::bilinear_taps(width, inner.width()),
            ys: crate::io::bilinear_taps(height, inner.height()),
            inner,
            width,
            height,
            rows: [(None, vec![0; w3]), (None, vec![0; w3])],
            next_src: 0,
            y: 0,
        }
    }

    /// Reads up to source row `i` (rows only move forward); the slot that holds row `i`.
    fn src_row(&mut self, i: usize) -> Result<usize> {
        while self.next_src <= i {
            // Replace the older of the two.
            let k = match (self.rows[0].0, self.rows[1].0) {
                (None, _) => 0,
                (_, None) => 1,
                (Some(a), Some(b)) => usize::from(b < a),
            };
            self.inner.read_row(&mut self.rows[k].1)?;
            self.rows[k].0 = Some(self.next_src);
            self.next_src += 1;
        }
        Ok(if self.rows[0].0 == Some(i) { 0 } else { 1 })
    }
}

impl<S: RowSource> RowSource for Scaled<S> {
    fn width(&self) -> usize {
        self.width
    }
    fn height(&self) -> usize {
        self.height
    }
    fn read_row(&mut self, out: &mut [u8]) -> Result<()> {
        if self.y >= self.height {
            return Err(past_end(self.height));
        }
        let (y0, y1, fy) = self.ys[self.y];
        let kb = self.src_row(y1)?;
        let kt = self.src_row(y0)?;
        let (top, bot) = (&self.rows[kt].1, &self.rows[kb].1);
        for (ox, &(x0, x1, fx)) in self.xs.iter().enumerate() {
            for c in 0..3 {
                let t = top[x0 * 3 + c] as f64 * (1.0 - fx) + top[x1 * 3 + c] as f64 * fx;
                let b = bot[x0 * 3 + c] as f64 * (1.0 - fx) + bot[x1 * 3 + c] as f64 * fx;
                out[ox * 3 + c] = (t * (1.0 - fy) + b * fy).round().clamp(0.0, 255.0) as u8;
            }
        }
        self.y += 1;
        Ok(())
    }
}

/// Reads a whole source into memory (for small images and tests).
pub fn read_all(src: &mut dyn RowSource) -> Result<RgbImage> {
    let (w, h) = (src.width(), src.height());
    let mut data = vec![0u8; w * h * 3];
    for row in data.chunks_exact_mut(w * 3) {
        src.read_row(row)?;
    }
    Ok(RgbImage {
        width: w,
        height: h,
        data,
    })
}

// ------------------------------------------------------------------------------------ the band

/// The rows `[y0, y0 + rows)` of a source that one row of windows reads; moving it down reads
/// only the rows it does not hold yet.
pub struct Band {
    width: usize,
    /// First row held.
    pub y0: usize,
    /// Rows held.
    pub rows: usize,
    pub data: Vec<u8>,
    /// Rows read from the source so far.
    read: usize,
}

impl Band {
    pub fn new(width: usize) -> Band {
        Band {
            width,
            y0: 0,
            rows: 0,
            data: Vec::new(),
            read: 0,
        }
    }

    /// Holds rows `[y0, y1)` afterwards (`y0` never moves up).
    pub fn advance(&mut self, src: &mut dyn RowSource, y0: usize, y1: usize) -> Result<()> {
        let w3 = self.width * 3;
        debug_assert!(y0 >= self.y0 && y1 >= self.y0 + self.rows);
        // Drop rows above y0 (those not yet read are skipped by reading them).
        let keep_from = y0.min(self.y0 + self.rows);
        let drop = keep_from - self.y0;
        self.data.drain(..drop * w3);
        self.y0 = keep_from;
        self.rows -= drop;
        let mut scratch = vec![0u8; w3];
        while self.read < y0 {
            src.read_row(&mut scratch)?;
            self.read += 1;
        }
        self.y0 = y0;
        self.data.resize((y1 - y0) * w3, 0);
        for y in self.read..y1 {
            let r = y - y0;
            src.read_row(&mut self.data[r * w3..(r + 1) * w3])?;
        }
        self.read = self.read.max(y1);
        self.rows = y1 - y0;
        Ok(())
    }

    /// Row `y` (which the band holds).
    pub fn row(&self, y: usize) -> &[u8] {
        let w3 = self.width * 3;
        let r = y - self.y0;
        &self.data[r * w3..(r + 1) * w3]
    }
}

// ------------------------------------------------------------------------------------ writing

/// A PNG written row by row (8-bit grey or RGB) to any writer.
#[cfg(not(target_arch = "wasm32"))]
pub struct PngRowWriter<W: std::io::Write + 'static> {
    writer: png::StreamWriter<'static, W>,
    rows_left: usize,
    what: String,
}

#[cfg(not(target_arch = "wasm32"))]
impl<W: std::io::Write + 'static> PngRowWriter<W> {
    /// `rgb`: three bytes per pixel, else one.
    pub fn new(out: W, width: usize, height: usize, rgb: bool, what: &str) -> Result<Self> {
        let e = |e: png::EncodingError| Error::Invalid(format!("{what}: PNG encoding failed: {e}"));
        let mut enc = png::Encoder::new(out, width as u32, height as u32);
        enc.set_color(if rgb {
            png::ColorType::Rgb
        } else {
            png::ColorType::Grayscale
        });
        enc.set_depth(png::BitDepth::Eight);
        enc.set_compression(png::Compression::Fast);
        let writer = enc
            .write_header()
            .map_err(e)?
            .into_stream_writer()
            .map_err(e)?;
        Ok(PngRowWriter {
            writer,
            rows_left: height,
            what: what.to_string(),
        })
    }

    pub fn write_row(&mut self, row: &[u8]) -> Result<()> {
        use std::io::Write;
        if self.rows_left == 0 {
            return Err(Error::Invalid(format!(
                "{}: more rows than the image has",
                self.what
            )));
        }
        self.writer
            .write_all(row)
            .map_err(|e| Error::Invalid(format!("{}: {e}", self.what)))?;
        self.rows_left -= 1;
        Ok(())
    }

    pub fn finish(self) -> Result<()> {
        if self.rows_left != 0 {
            return Err(Error::Invalid(format!(
                "{}: {} rows missing",
                self.what, self.rows_left
            )));
        }
        self.writer
            .finish()
            .map_err(|e| Error::Invalid(format!("{}: PNG encoding failed: {e}", self.what)))
    }
}

/// The overlay of [`crate::io::overlay`] row by row: row `y` is ready once mask row `y + 1`
/// is known (the outline looks at 4-neighbours).
pub struct OverlayRows {
    width: usize,
    height: usize,
    opacity: f32,
    /// Mask rows y−1, y, and the image row y, for the row not yet given out.
    prev: Option<Vec<u8>>,
    cur: Option<(Vec<u8>, Vec<u8>)>,
    y: usize,
}

impl OverlayRows {
    pub fn new(width: usize, height: usize, opacity: f32) -> OverlayRows {
        OverlayRows {
            width,
            height,
            opacity,
            prev: None,
            cur: None,
            y: 0,
        }
    }

    fn emit(
        &mut self,
        next: Option<&[u8]>,
        out: &mut impl FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        let Some((mask, img)) = self.cur.take() else {
            return Ok(());
        };
        let w = self.width;
        let fg = |r: &[u8], x: usize| r[x] > 127;
        let mut row = img.clone();
        for x in 0..w {
            if !fg(&mask, x) {
                continue;
            }
            let edge = x == 0
                || self.y == 0
                || x + 1 == w
                || self.y + 1 == self.height
                || !fg(&mask, x - 1)
                || !fg(&mask, x + 1)
                || self.prev.as_deref().is_some_and(|p| !fg(p, x))
                || next.is_some_and(|n| !fg(n, x));
            let (color, a) = if edge {
                (crate::io::OVERLAY_EDGE, 1.0)
            } else {
                (crate::io::OVERLAY_FILL, self.opacity)
            };
            for c in 0..3 {
                let p = &mut row[x * 3 + c];
                *p = (*p as f32 * (1.0 - a) + color[c] as f32 * a).round() as u8;
            }
        }
        out(&row)?;
        self.prev = Some(mask);
        self.y += 1;
        Ok(())
    }

    /// Mask row and image row `y` (in order); finished overlay rows go to `out`.
    pub fn push(
        &mut self,
        mask: &[u8],
        img: &[u8],
        mut out: impl FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        self.emit(Some(mask), &mut out)?;
        self.cur = Some((mask.to_vec(), img.to_vec()));
        Ok(())
    }

    /// The last row.
    pub fn finish(mut self, mut out: impl FnMut(&[u8]) -> Result<()>) -> Result<()> {
        self.emit(None, &mut out)
    }
}

/// Nearest-neighbour row mapping of [`crate::io::GrayImage::resize_nearest`]: for each output
/// row (or column) of `out` pixels, the input one of `inp` it takes.
pub fn nearest_index(o: usize, out: usize, inp: usize) -> usize {
    (o * inp / out).min(inp - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(w: usize, h: usize, seed: u32) -> RgbImage {
        let mut s = seed;
        let data = (0..w * h * 3)
            .map(|_| {
                s = s.wrapping_mul(1664525).wrapping_add(1013904223);
                (s >> 24) as u8
            })
            .collect();
        RgbImage {
            width: w,
            height: h,
            data,
        }
    }

    #[test]
    fn scaled_rows_equal_the_in_memory_resize() {
        let img = image(37, 29, 7);
        for (w, h) in [(17, 13), (80, 61), (37, 29), (5, 90)] {
            let mut s = Scaled::new(MemoryRows::new(&img), w, h);
            assert_eq!(read_all(&mut s).unwrap(), img.resize(w, h), "{w}x{h}");
        }
    }

    #[test]
    fn region_and_band_rows() {
        let img = image(23, 31, 3);
        let mut r = Region::new(MemoryRows::new(&img), [4, 5, 10, 20], "t").unwrap();
        assert_eq!(read_all(&mut r).unwrap(), img.crop(4, 5, 10, 20));
        assert!(Region::new(MemoryRows::new(&img), [20, 0, 4, 1], "t").is_err());
        let mut src = MemoryRows::new(&img);
        let mut band = Band::new(23);
        for (a, b) in [(0, 8), (6, 14), (14, 20), (25, 31)] {
            band.advance(&mut src, a, b).unwrap();
            for y in a..b {
                assert_eq!(band.row(y), &img.data[y * 69..(y + 1) * 69], "row {y}");
            }
        }
    }

    #[test]
    fn overlay_rows_equal_the_in_memory_overlay() {
        let img = image(19, 11, 5);
        let mask = crate::io::GrayImage {
            width: 19,
            height: 11,
            data: image(19, 11, 9).data[..19 * 11]
                .iter()
                .map(|&v| if v > 100 { 255 } else { 0 })
                .collect(),
        };
        let want = crate::io::overlay(&img, &mask, 0.45);
        let mut got = Vec::new();
        let mut o = OverlayRows::new(19, 11, 0.45);
        for y in 0..11 {
            o.push(
                &mask.data[y * 19..(y + 1) * 19],
                &img.data[y * 57..(y + 1) * 57],
                |r| {
                    got.extend_from_slice(r);
                    Ok(())
                },
            )
            .unwrap();
        }
        o.finish(|r| {
            got.extend_from_slice(r);
            Ok(())
        })
        .unwrap();
        assert_eq!(got, want.data);
    }
}
