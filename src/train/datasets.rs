//! Dataset loaders for the official layouts of docs/training.md (ISIC-2018 Task 1, PH2, MoNuSeg-2018,
//! TNBC, a generic `images/` + `masks/` folder, and the authors' `image_1024/` + `mask_1024/`), the
//! Aperio XML reader and polygon rasteriser for MoNuSeg's annotations, and mask binarisation.
//!
//! Samples are listed in natural order of their ids (digit runs compared as numbers: `01_2` before
//! `01_10`). Nothing here downloads data: users supply the folders.

use crate::error::{Error, Result};
use crate::io::GrayImage;
#[cfg(not(target_arch = "wasm32"))]
use crate::io::RgbImage;
use std::path::{Path, PathBuf};

/// A dataset layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    /// ISIC-2018 Task 1: `ISIC2018_Task1-2_{Training,Validation,Test}_Input/ISIC_<id>.jpg` +
    /// `ISIC2018_Task1_{Training,Validation,Test}_GroundTruth/ISIC_<id>_segmentation.png`.
    Isic2018,
    /// PH2: `PH2 Dataset images/IMD<n>/IMD<n>_Dermoscopic_Image/IMD<n>.bmp` +
    /// `…/IMD<n>_lesion/IMD<n>_lesion.bmp`.
    Ph2,
    /// MoNuSeg-2018: `Tissue Images/*.tif` + `Annotations/*.xml` (training) or `.tif` + `.xml` side
    /// by side (test).
    Monuseg,
    /// TNBC: `Slide_<k>/<k>_<n>.png` + `GT_<k>/<k>_<n>.png`.
    Tnbc,
    /// `images/<id>.<ext>` + `masks/<id>.png`, optional `split.json`.
    Generic,
    /// The authors' pre-resized data: `image_1024/<id>.png` + `mask_1024/<id>.png` + `data_split.json`.
    Authors,
}

impl Format {
    /// The accepted names, for help texts.
    pub const NAMES: &'static str = "isic2018|ph2|monuseg|tnbc|generic|authors";

    pub fn name(self) -> &'static str {
        match self {
            Format::Isic2018 => "isic2018",
            Format::Ph2 => "ph2",
            Format::Monuseg => "monuseg",
            Format::Tnbc => "tnbc",
            Format::Generic => "generic",
            Format::Authors => "authors",
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Format {
    type Err = Error;
    fn from_str(s: &str) -> Result<Format> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "isic2018" | "isic" => Format::Isic2018,
            "ph2" => Format::Ph2,
            "monuseg" => Format::Monuseg,
            "tnbc" => Format::Tnbc,
            "generic" => Format::Generic,
            "authors" => Format::Authors,
            _ => {
                return Err(Error::Invalid(format!(
                    "unknown dataset format {s:?} (expected {})",
                    Format::NAMES
                )));
            }
        })
    }
}

/// Which part of a dataset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Split {
    Train,
    Val,
    Test,
    All,
}

impl Split {
    pub const NAMES: &'static str = "train|val|test|all";

    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
            Split::All => "all",
        }
    }
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Split {
    type Err = Error;
    fn from_str(s: &str) -> Result<Split> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "train" | "training" => Split::Train,
            "val" | "valid" | "validation" => Split::Val,
            "test" => Split::Test,
            "all" => Split::All,
            _ => {
                return Err(Error::Invalid(format!(
                    "unknown split {s:?} (expected {})",
                    Split::NAMES
                )));
            }
        })
    }
}

/// Where a sample's ground truth comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MaskSource {
    /// Any image file: foreground = value > 127 (16-bit label images: label > 0; see [`binarize`]).
    Png(PathBuf),
    /// MoNuSeg Aperio XML polygons, rasterised at the image size ([`rasterize_polygons`]).
    AperioXml(PathBuf),
}

impl MaskSource {
    pub fn path(&self) -> &Path {
        match self {
            MaskSource::Png(p) | MaskSource::AperioXml(p) => p,
        }
    }
}

/// One image and its ground truth.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    pub id: String,
    pub image: PathBuf,
    pub mask: MaskSource,
}

/// The samples of one split of a dataset folder.
#[derive(Clone, Debug)]
pub struct Dataset {
    pub format: Format,
    pub root: PathBuf,
    pub samples: Vec<Sample>,
    /// The channel transform [`Dataset::load`] applies to every image (rgb: none), as inference
    /// does with the model's recorded channel (`crate::channel`).
    pub channel: (crate::channel::Channel, crate::channel::StainVectors),
}

// ---------------------------------------------------------------------------------------------
// Masks

/// Binary mask (0/1) of a decoded mask image. Foreground = value > 127 (docs/training.md; 16-bit label
/// images arrive from [`crate::io::decode_gray`] as 255 where the label is nonzero). One extension:
/// an 8-bit mask whose largest value is in 1..=127 cannot be a 0/255 mask — it is a 0/1 mask or an
/// 8-bit label image — and there foreground = value > 0 (the rule > 127 would make it empty).
pub fn binarize(mask: &GrayImage) -> Vec<u8> {
    let max = mask.data.iter().copied().max().unwrap_or(0);
    let t = if (1..=127).contains(&max) { 0 } else { 127 };
    mask.data.iter().map(|&v| (v > t) as u8).collect()
}

/// One polygon: vertices `[x, y]` in pixel coordinates (x to the right, y down; the image's pixel
/// (i, j) covers `[i, i+1) × [j, j+1)` and has its centre at `(i + 0.5, j + 0.5)`).
pub type Polygon = Vec<[f64; 2]>;

/// Rasterises polygons to a `width × height` 0/1 mask (the union of the polygons).
///
/// Convention: pixel (x, y) is inside a polygon when its centre `(x + 0.5, y + 0.5)` is inside under
/// the even-odd rule, with the half-open crossing test of PNPoly: an edge counts for the scanline
/// `yc` when `(y0 > yc) != (y1 > yc)`, and a centre is inside when an odd number of edge crossings
/// lie strictly to its right. Consequently a centre exactly on a left or top edge is inside and one
/// on a right or bottom edge is outside, so polygons sharing an edge never both claim a pixel and
/// the axis-aligned rectangle `[a, b) × [c, d)` with half-integer corners covers exactly the pixels
/// whose centres it holds. Polygons with fewer than 3 vertices cover nothing; parts outside the
/// image are clipped.
pub fn rasterize_polygons(polygons: &[Polygon], width: usize, height: usize) -> Vec<u8> {
    let mut mask = vec![0u8; width * height];
    let mut xs: Vec<f64> = Vec::new();
    // first pixel index whose centre is >= t, clamped to [0, n]
    let first_at_or_after = |t: f64, n: usize| -> usize {
        let i = (t - 0.5).ceil();
        if i <= 0.0 {
            0
        } else if i >= n as f64 {
            n
        } else {
            i as usize
        }
    };
    for poly in polygons {
        if poly.len() < 3 || poly.iter().any(|v| !v[0].is_finite() || !v[1].is_finite()) {
            continue;
        }
        let ymin = poly.iter().map(|v| v[1]).fold(f64::INFINITY, f64::min);
        let ymax = poly.iter().map(|v| v[1]).fold(f64::NEG_INFINITY, f64::max);
        // rows whose centre yc satisfies ymin <= yc < ymax
        let (r0, r1) = (
            first_at_or_after(ymin, height),
            first_at_or_after(ymax, height),
        );
        for y in r0..r1 {
            let yc = y as f64 + 0.5;
            xs.clear();
            for i in 0..poly.len() {
                let a = poly[i];
                let b = poly[(i + 1) % poly.len()];
                if (a[1] > yc) != (b[1] > yc) {
                    xs.push(a[0] + (yc - a[1]) * (b[0] - a[0]) / (b[1] - a[1]));
                }
            }
            xs.sort_by(|p, q| p.total_cmp(q));
            // a centre xc is inside when xs[2k] <= xc < xs[2k+1] for some k
            for span in xs.chunks_exact(2) {
                let (c0, c1) = (
                    first_at_or_after(span[0], width),
                    first_at_or_after(span[1], width),
                );
                if c0 < c1 {
                    mask[y * width + c0..y * width + c1].fill(1);
                }
            }
        }
    }
    mask
}

fn line_of(text: &str, pos: usize) -> usize {
    text[..pos.min(text.len())]
        .bytes()
        .filter(|&b| b == b'\n')
        .count()
        + 1
}

/// Parses the attributes of a start tag's inside (after the name). Tolerates unquoted values.
fn parse_attributes(s: &str) -> Vec<(&str, &str)> {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        while i < b.len() && (b[i].is_ascii_whitespace() || b[i] == b'/') {
            i += 1;
        }
        let ns = i;
        while i < b.len() && b[i] != b'=' && !b[i].is_ascii_whitespace() && b[i] != b'/' {
            i += 1;
        }
        let name = &s[ns..i];
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        if i >= b.len() || b[i] != b'=' {
            if name.is_empty() {
                i += 1;
            }
            continue; // attribute without value
        }
        i += 1;
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        if i < b.len() && (b[i] == b'"' || b[i] == b'\'') {
            let q = b[i];
            let vs = i + 1;
            let mut j = vs;
            while j < b.len() && b[j] != q {
                j += 1;
            }
            out.push((name, &s[vs..j]));
            i = j + 1;
        } else {
            let vs = i;
            while i < b.len() && !b[i].is_ascii_whitespace() {
                i += 1;
            }
            out.push((name, &s[vs..i]));
        }
    }
    out
}

/// Reads the nucleus polygons of a MoNuSeg Aperio XML annotation file: every
/// `<Region …><Vertices><Vertex X="…" Y="…"/>…</Vertices></Region>` inside `<Annotations>` is one
/// polygon (X = column, Y = row, floating-point pixel positions). A small tolerant reader, not a
/// general XML parser: comments, `<?…?>`, `<!…>` and CDATA are skipped, attributes may use either
/// quote, vertices outside a Region are ignored. Errors (naming `source` and the line): no
/// `<Annotations>` element, an unterminated tag or Region, a Vertex without a numeric X or Y.
pub fn parse_aperio_xml(text: &str, source: &Path) -> Result<Vec<Polygon>> {
    let err = |pos: usize, msg: String| {
        Error::image(source, format!("line {}: {msg}", line_of(text, pos)))
    };
    let mut polygons = Vec::new();
    let mut region: Option<(usize, Polygon)> = None; // (start position, vertices)
    let mut saw_annotations = false;
    let mut pos = 0;
    while let Some(off) = text[pos..].find('<') {
        let start = pos + off;
        let rest = &text[start..];
        let skip_to = |end: &str, what: &str| -> Result<usize> {
            rest.find(end)
                .map(|e| start + e + end.len())
                .ok_or_else(|| err(start, format!("unterminated {what}")))
        };
        if rest.starts_with("<!--") {
            pos = skip_to("-->", "comment")?;
            continue;
        }
        if rest.starts_with("<![CDATA[") {
            pos = skip_to("]]>", "CDATA section")?;
            continue;
        }
        if rest.starts_with("<?") {
            pos = skip_to("?>", "processing instruction")?;
            continue;
        }
        if rest.starts_with("<!") {
            pos = skip_to(">", "declaration")?;
            continue;
        }
        // a tag: up to the first '>' outside quotes
        let bytes = rest.as_bytes();
        let mut quote = 0u8;
        let mut end = None;
        for (j, &c) in bytes.iter().enumerate().skip(1) {
            match (quote, c) {
                (0, b'"') | (0, b'\'') => quote = c,
                (0, b'>') => {
                    end = Some(j);
                    break;
                }
                (q, c) if q != 0 && c == q => quote = 0,
                _ => {}
            }
        }
        let end = end.ok_or_else(|| err(start, "unterminated tag".into()))?;
        let inner = &rest[1..end];
        pos = start + end + 1;
        let closing = inner.starts_with('/');
        let body = inner.trim_start_matches('/');
        let name_len = body
            .find(|c: char| c.is_ascii_whitespace() || c == '/')
            .unwrap_or(body.len());
        let name = &body[..name_len];
        let self_closing = inner.ends_with('/');
        match (name, closing) {
            ("Annotations", false) => saw_annotations = true,
            ("Region", false) => {
                if let Some((s, _)) = &region {
                    return Err(err(
                        start,
                        format!(
                            "<Region> inside the <Region> opened at line {}",
                            line_of(text, *s)
                        ),
                    ));
                }
                if !self_closing {
                    region = Some((start, Vec::new()));
                }
            }
            ("Region", true) => match region.take() {
                Some((_, v)) => polygons.push(v),
                None => return Err(err(start, "</Region> without an open <Region>".into())),
            },
            ("Vertex", false) => {
                if let Some((_, verts)) = &mut region {
                    let attrs = parse_attributes(&body[name_len..]);
                    let coord = |key: &str| -> Result<f64> {
                        let v = attrs
                            .iter()
                            .find(|(k, _)| *k == key)
                            .map(|(_, v)| *v)
                            .ok_or_else(|| {
                                err(start, format!("<Vertex> without a {key} attribute"))
                            })?;
                        match v.trim().parse::<f64>() {
                            Ok(x) if x.is_finite() => Ok(x),
                            _ => Err(err(
                                start,
                                format!("<Vertex> {key}={v:?} is not a finite number"),
                            )),
                        }
                    };
                    verts.push([coord("X")?, coord("Y")?]);
                }
            }
            _ => {}
        }
    }
    if let Some((s, _)) = region {
        return Err(err(s, "<Region> never closed".into()));
    }
    if !saw_annotations {
        return Err(Error::image(
            source,
            "not an Aperio XML annotation file (no <Annotations> element)",
        ));
    }
    Ok(polygons)
}

// ---------------------------------------------------------------------------------------------
// Folder scanning

/// Natural order: digit runs compare as numbers, the rest byte-wise.
#[cfg(not(target_arch = "wasm32"))]
fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        if a[i].is_ascii_digit() && b[j].is_ascii_digit() {
            let (si, sj) = (i, j);
            while i < a.len() && a[i].is_ascii_digit() {
                i += 1;
            }
            while j < b.len() && b[j].is_ascii_digit() {
                j += 1;
            }
            let (da, db) = (&a[si..i], &b[sj..j]);
            let ta = da
                .iter()
                .position(|&c| c != b'0')
                .map_or(&da[da.len()..], |p| &da[p..]);
            let tb = db
                .iter()
                .position(|&c| c != b'0')
                .map_or(&db[db.len()..], |p| &db[p..]);
            let o = ta
                .len()
                .cmp(&tb.len())
                .then(ta.cmp(tb))
                .then(da.len().cmp(&db.len()));
            if o != Ordering::Equal {
                return o;
            }
        } else {
            if a[i] != b[j] {
                return a[i].cmp(&b[j]);
            }
            i += 1;
            j += 1;
        }
    }
    (a.len() - i).cmp(&(b.len() - j))
}

#[cfg(not(target_arch = "wasm32"))]
const IMAGE_EXTS: [&str; 6] = ["png", "jpg", "jpeg", "bmp", "tif", "tiff"];

#[cfg(not(target_arch = "wasm32"))]
fn ext_of(name: &str) -> String {
    name.rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default()
}

#[cfg(not(target_arch = "wasm32"))]
fn is_image_name(name: &str) -> bool {
    !name.starts_with('.') && IMAGE_EXTS.contains(&ext_of(name).as_str())
}

/// The id of a file name: the name up to its first '.' (the authors' `data_split.json` rule).
#[cfg(not(target_arch = "wasm32"))]
fn id_of(name: &str) -> &str {
    name.split('.').next().unwrap_or(name)
}

#[cfg(not(target_arch = "wasm32"))]
fn stem_of(name: &str) -> &str {
    name.rsplit_once('.').map_or(name, |(s, _)| s)
}

/// Entries of a folder as (file name, path, is_dir), sorted naturally; hidden entries skipped.
#[cfg(not(target_arch = "wasm32"))]
fn list_dir(dir: &Path) -> Result<Vec<(String, PathBuf, bool)>> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        // follow symlinks
        let is_dir = path.is_dir();
        out.push((name, path, is_dir));
    }
    out.sort_by(|a, b| natural_cmp(&a.0, &b.0));
    Ok(out)
}

/// Image files of a folder as (name, path).
#[cfg(not(target_arch = "wasm32"))]
fn image_files(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    Ok(list_dir(dir)?
        .into_iter()
        .filter(|(n, _, d)| !d && is_image_name(n))
        .map(|(n, p, _)| (n, p))
        .collect())
}

#[cfg(not(target_arch = "wasm32"))]
fn missing_mask(image: &Path, expected: &Path) -> Error {
    Error::image(
        image,
        format!("image without its mask: expected {}", expected.display()),
    )
}

#[cfg(not(target_arch = "wasm32"))]
fn no_samples(root: &Path, what: &str, example: String) -> Error {
    Error::Invalid(format!(
        "{}: no {what} found; expected e.g. {example}",
        root.display()
    ))
}

#[cfg(not(target_arch = "wasm32"))]
fn isic(root: &Path, split: Split) -> Result<Vec<Sample>> {
    let parts: &[&str] = match split {
        Split::Train => &["Training"],
        Split::Val => &["Validation"],
        Split::Test => &["Test"],
        Split::All => &["Training", "Validation", "Test"],
    };
    let mut samples = Vec::new();
    let mut found_folder = false;
    for part in parts {
        let input = root.join(format!("ISIC2018_Task1-2_{part}_Input"));
        let gt = root.join(format!("ISIC2018_Task1_{part}_GroundTruth"));
        if !input.is_dir() {
            continue;
        }
        found_folder = true;
        for (name, path) in image_files(&input)? {
            // ISIC_<digits>.jpg; skips LICENSE/ATTRIBUTION files and any ISIC_<id>_<suffix> extras
            let stem = stem_of(&name);
            let Some(num) = stem.strip_prefix("ISIC_") else {
                continue;
            };
            if num.is_empty() || num.contains('_') {
                continue;
            }
            let mask = gt.join(format!("{stem}_segmentation.png"));
            if !mask.is_file() {
                return Err(missing_mask(&path, &mask));
            }
            samples.push(Sample {
                id: stem.to_string(),
                image: path,
                mask: MaskSource::Png(mask),
            });
        }
    }
    if samples.is_empty() {
        let part = parts[0];
        let example = format!(
            "{} with {}",
            root.join(format!("ISIC2018_Task1-2_{part}_Input/ISIC_0000000.jpg"))
                .display(),
            root.join(format!(
                "ISIC2018_Task1_{part}_GroundTruth/ISIC_0000000_segmentation.png"
            ))
            .display()
        );
        let what = if found_folder {
            format!("ISIC-2018 {split} images")
        } else {
            format!("ISIC-2018 {split} folder (ISIC2018_Task1-2_{part}_Input)")
        };
        return Err(no_samples(root, &what, example));
    }
    Ok(samples)
}

#[cfg(not(target_arch = "wasm32"))]
fn ph2(root: &Path) -> Result<Vec<Sample>> {
    let nested = root.join("PH2 Dataset images");
    let base = if nested.is_dir() {
        nested
    } else {
        root.to_path_buf()
    };
    let mut samples = Vec::new();
    for (name, dir, is_dir) in list_dir(&base)? {
        if !is_dir || !name.starts_with("IMD") {
            continue;
        }
        let image = dir
            .join(format!("{name}_Dermoscopic_Image"))
            .join(format!("{name}.bmp"));
        let mask = dir
            .join(format!("{name}_lesion"))
            .join(format!("{name}_lesion.bmp"));
        if !image.is_file() {
            return Err(Error::image(
                &dir,
                format!(
                    "PH2 case folder without its image: expected {}",
                    image.display()
                ),
            ));
        }
        if !mask.is_file() {
            return Err(missing_mask(&image, &mask));
        }
        samples.push(Sample {
            id: name,
            image,
            mask: MaskSource::Png(mask),
        });
    }
    if samples.is_empty() {
        let ex = root.join("PH2 Dataset images/IMD002");
        let example = format!(
            "{} with {}",
            ex.join("IMD002_Dermoscopic_Image/IMD002.bmp").display(),
            ex.join("IMD002_lesion/IMD002_lesion.bmp").display()
        );
        return Err(no_samples(root, "PH2 cases", example));
    }
    Ok(samples)
}

#[cfg(not(target_arch = "wasm32"))]
fn tnbc(root: &Path) -> Result<Vec<Sample>> {
    let nested = root.join("TNBC_NucleiSegmentation");
    let base = if nested.is_dir() {
        nested
    } else {
        root.to_path_buf()
    };
    let mut samples = Vec::new();
    for (name, dir, is_dir) in list_dir(&base)? {
        let Some(k) = name.strip_prefix("Slide_") else {
            continue;
        };
        if !is_dir {
            continue;
        }
        let gt = base.join(format!("GT_{k}"));
        for (file, path) in image_files(&dir)? {
            let mut mask = gt.join(&file);
            if !mask.is_file() {
                let png = gt.join(format!("{}.png", stem_of(&file)));
                if png.is_file() {
                    mask = png;
                } else {
                    return Err(missing_mask(&path, &mask));
                }
            }
            samples.push(Sample {
                id: stem_of(&file).to_string(),
                image: path,
                mask: MaskSource::Png(mask),
            });
        }
    }
    if samples.is_empty() {
        let example = format!(
            "{} with {}",
            root.join("Slide_01/01_1.png").display(),
            root.join("GT_01/01_1.png").display()
        );
        return Err(no_samples(root, "TNBC images", example));
    }
    Ok(samples)
}

/// MoNuSeg folder kinds.
#[cfg(not(target_arch = "wasm32"))]
#[derive(PartialEq, Clone, Copy)]
enum MonusegKind {
    /// `Tissue Images/` + `Annotations/`
    Train,
    /// images and `.xml` side by side
    Test,
}

#[cfg(not(target_arch = "wasm32"))]
fn monuseg_kind(dir: &Path) -> Result<Option<MonusegKind>> {
    if dir.join("Tissue Images").is_dir() {
        return Ok(Some(MonusegKind::Train));
    }
    let entries = list_dir(dir)?;
    let has_xml = entries.iter().any(|(n, _, d)| !d && ext_of(n) == "xml");
    let has_img = entries.iter().any(|(n, _, d)| !d && is_image_name(n));
    Ok((has_xml && has_img).then_some(MonusegKind::Test))
}

#[cfg(not(target_arch = "wasm32"))]
fn monuseg_samples(dir: &Path, kind: MonusegKind) -> Result<Vec<Sample>> {
    let (images, annotations) = match kind {
        MonusegKind::Train => (dir.join("Tissue Images"), dir.join("Annotations")),
        MonusegKind::Test => (dir.to_path_buf(), dir.to_path_buf()),
    };
    let mut samples = Vec::new();
    for (name, path) in image_files(&images)? {
        let stem = stem_of(&name);
        let xml = annotations.join(format!("{stem}.xml"));
        if !xml.is_file() {
            return Err(missing_mask(&path, &xml));
        }
        samples.push(Sample {
            id: stem.to_string(),
            image: path,
            mask: MaskSource::AperioXml(xml),
        });
    }
    Ok(samples)
}

/// MoNuSeg: `root` is itself a training folder (`Tissue Images/` + `Annotations/`) or a test folder
/// (`.tif` + `.xml` side by side) — then that folder is the split and `split` is not consulted —
/// or `root` holds such folders as subfolders (e.g. `MoNuSeg 2018 Training Data/` and
/// `MoNuSegTestData/`), and `split` picks them: train = training-layout subfolders, test =
/// test-layout subfolders, all = both; MoNuSeg has no validation split.
#[cfg(not(target_arch = "wasm32"))]
fn monuseg(root: &Path, split: Split) -> Result<Vec<Sample>> {
    let mut samples = Vec::new();
    if let Some(kind) = monuseg_kind(root)? {
        samples = monuseg_samples(root, kind)?;
    } else {
        if split == Split::Val {
            return Err(Error::Invalid(format!(
                "{}: MoNuSeg-2018 has no validation split (use train, test or all)",
                root.display()
            )));
        }
        for (_, dir, is_dir) in list_dir(root)? {
            if !is_dir {
                continue;
            }
            let Some(kind) = monuseg_kind(&dir)? else {
                continue;
            };
            let wanted = match split {
                Split::Train => kind == MonusegKind::Train,
                Split::Test => kind == MonusegKind::Test,
                _ => true,
            };
            if wanted {
                samples.extend(monuseg_samples(&dir, kind)?);
            }
        }
    }
    if samples.is_empty() {
        let example = format!(
            "{} with {} (training layout), or {} with {} (test layout)",
            root.join("Tissue Images/TCGA-18-5592-01Z-00-DX1.tif")
                .display(),
            root.join("Annotations/TCGA-18-5592-01Z-00-DX1.xml")
                .display(),
            root.join("TCGA-2Z-A9J9-01A-01-TS1.tif").display(),
            root.join("TCGA-2Z-A9J9-01A-01-TS1.xml").display()
        );
        return Err(no_samples(
            root,
            &format!("MoNuSeg-2018 {split} images"),
            example,
        ));
    }
    Ok(samples)
}

/// `images_dir/<id>.<ext>` + `masks_dir/<id>.png` (or another image file named `<id>.<ext>`).
#[cfg(not(target_arch = "wasm32"))]
fn paired_folder(images_dir: &Path, masks_dir: &Path) -> Result<Vec<Sample>> {
    let masks: Vec<(String, PathBuf)> = if masks_dir.is_dir() {
        image_files(masks_dir)?
    } else {
        Vec::new()
    };
    let mut samples: Vec<Sample> = Vec::new();
    let mut seen = std::collections::HashMap::<String, PathBuf>::new();
    for (name, path) in image_files(images_dir)? {
        let id = id_of(&name).to_string();
        if let Some(other) = seen.get(&id) {
            return Err(Error::image(
                &path,
                format!("same id {id:?} as {}", other.display()),
            ));
        }
        seen.insert(id.clone(), path.clone());
        let png = masks_dir.join(format!("{id}.png"));
        let mask = if png.is_file() {
            png
        } else if let Some((_, p)) = masks.iter().find(|(n, _)| id_of(n) == id) {
            p.clone()
        } else {
            return Err(missing_mask(&path, &png));
        };
        samples.push(Sample {
            id,
            image: path,
            mask: MaskSource::Png(mask),
        });
    }
    Ok(samples)
}

/// Selects the samples listed under the split's key of a split file (`{"train":[…],"val":[…],
/// "test":[…]}`, entries ids or file names, possibly with folders; id = file name up to its first '.').
#[cfg(not(target_arch = "wasm32"))]
fn select_split(samples: Vec<Sample>, split_file: &Path, split: Split) -> Result<Vec<Sample>> {
    let text = std::fs::read_to_string(split_file).map_err(|e| Error::io(split_file, e))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::image(split_file, format!("not valid JSON: {e}")))?;
    let obj = json.as_object().ok_or_else(|| {
        Error::image(
            split_file,
            "expected a JSON object {\"train\": […], \"val\": […], \"test\": […]}",
        )
    })?;
    let keys: &[&str] = match split {
        Split::Train => &["train", "training"],
        Split::Val => &["val", "valid", "validation"],
        Split::Test => &["test"],
        Split::All => return Ok(samples),
    };
    let list = keys.iter().find_map(|k| obj.get(*k)).ok_or_else(|| {
        let have: Vec<&String> = obj.keys().collect();
        Error::image(
            split_file,
            format!("no {:?} list (keys present: {have:?})", keys[0]),
        )
    })?;
    let list = list
        .as_array()
        .ok_or_else(|| Error::image(split_file, format!("{:?} is not a list", keys[0])))?;
    let mut wanted = std::collections::HashSet::new();
    for entry in list {
        let s = entry.as_str().ok_or_else(|| {
            Error::image(
                split_file,
                format!("{:?} holds a non-string entry {entry}", keys[0]),
            )
        })?;
        let name = s.rsplit(['/', '\\']).next().unwrap_or(s);
        let id = id_of(name);
        if !samples.iter().any(|x| x.id == id) {
            return Err(Error::image(
                split_file,
                format!(
                    "{:?} lists {s:?} but the dataset has no image with id {id:?}",
                    keys[0]
                ),
            ));
        }
        wanted.insert(id.to_string());
    }
    Ok(samples
        .into_iter()
        .filter(|x| wanted.contains(&x.id))
        .collect())
}

#[cfg(not(target_arch = "wasm32"))]
fn generic(root: &Path, split: Split) -> Result<Vec<Sample>> {
    let (images, masks) = (root.join("images"), root.join("masks"));
    let example = || {
        format!(
            "{} with {}",
            images.join("case001.png").display(),
            masks.join("case001.png").display()
        )
    };
    if !images.is_dir() {
        return Err(no_samples(root, "images/ folder", example()));
    }
    let samples = paired_folder(&images, &masks)?;
    if samples.is_empty() {
        return Err(no_samples(root, "images", example()));
    }
    let split_file = root.join("split.json");
    if split_file.is_file() {
        select_split(samples, &split_file, split)
    } else if split == Split::All {
        Ok(samples)
    } else {
        Err(Error::Invalid(format!(
            "{}: no split.json, so there is no {split} split; use the split 'all' or add {}",
            root.display(),
            split_file.display()
        )))
    }
}

#[cfg(not(target_arch = "wasm32"))]
fn authors(root: &Path, split: Split) -> Result<Vec<Sample>> {
    let (images, masks) = (root.join("image_1024"), root.join("mask_1024"));
    let example = || {
        format!(
            "{} with {}",
            images.join("ISIC_0000000.png").display(),
            masks.join("ISIC_0000000.png").display()
        )
    };
    if !images.is_dir() {
        return Err(no_samples(root, "image_1024/ folder", example()));
    }
    let samples = paired_folder(&images, &masks)?;
    if samples.is_empty() {
        return Err(no_samples(root, "images", example()));
    }
    let split_file = root.join("data_split.json");
    if split == Split::All {
        Ok(samples)
    } else if split_file.is_file() {
        select_split(samples, &split_file, split)
    } else {
        Err(Error::Invalid(format!(
            "{}: {} not found (needed for the {split} split; the split 'all' works without it)",
            root.display(),
            split_file.display()
        )))
    }
}

#[cfg(not(target_arch = "wasm32"))]
impl Dataset {
    /// Scans `root` in the given format. Splits: ISIC-2018 by folder (Training/Validation/Test,
    /// all = every folder present); generic and authors' by `split.json` / `data_split.json`
    /// (all = every image of the folder, no split file needed); PH2 and TNBC have no splits (every
    /// split gives all samples); MoNuSeg see below. Samples are in natural order of their ids.
    ///
    /// MoNuSeg: `root` may be a training folder (`Tissue Images/` + `Annotations/`) or a test
    /// folder (`.tif` + `.xml` side by side), and then that folder is the split; or it may hold
    /// both as subfolders, and then train/test/all pick them (no val).
    ///
    /// PH2 accepts the folder holding `PH2 Dataset images/` or that folder itself; TNBC the
    /// folder holding `Slide_*`/`GT_*` or its parent with `TNBC_NucleiSegmentation/`.
    pub fn open(root: &Path, format: Format, split: Split) -> Result<Dataset> {
        if !root.exists() {
            return Err(Error::Invalid(format!(
                "{}: dataset folder not found",
                root.display()
            )));
        }
        if !root.is_dir() {
            return Err(Error::Invalid(format!(
                "{}: not a folder (a dataset is a folder)",
                root.display()
            )));
        }
        let mut samples = match format {
            Format::Isic2018 => isic(root, split)?,
            Format::Ph2 => ph2(root)?,
            Format::Monuseg => monuseg(root, split)?,
            Format::Tnbc => tnbc(root)?,
            Format::Generic => generic(root, split)?,
            Format::Authors => authors(root, split)?,
        };
        samples.sort_by(|a, b| natural_cmp(&a.id, &b.id));
        Ok(Dataset {
            format,
            root: root.to_path_buf(),
            samples,
            channel: Default::default(),
        })
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Checks sample `i` without decoding pixels: the image's and the mask's headers are read
    /// (format and size), the sizes must agree, and an Aperio XML annotation is parsed. The error
    /// names the file and the problem.
    pub fn check_sample(&self, i: usize) -> Result<()> {
        let s = self.samples.get(i).ok_or_else(|| {
            Error::Invalid(format!(
                "{}: sample {i} requested but the dataset has {}",
                self.root.display(),
                self.len()
            ))
        })?;
        let (w, h) = header_size(&s.image)?;
        match &s.mask {
            MaskSource::Png(p) => {
                let (mw, mh) = header_size(p)?;
                if (mw, mh) != (w, h) {
                    return Err(Error::image(
                        p,
                        format!(
                            "mask is {mw}x{mh} but its image {} is {w}x{h}",
                            s.image.display()
                        ),
                    ));
                }
            }
            MaskSource::AperioXml(p) => {
                let bytes = std::fs::read(p).map_err(|e| Error::io(p, e))?;
                parse_aperio_xml(&String::from_utf8_lossy(&bytes), p)?;
            }
        }
        Ok(())
    }

    /// Checks every sample ([`Dataset::check_sample`]); `progress` is called after each. Returns
    /// the samples that cannot be used, in order, as (index, error).
    pub fn check_samples(&self, mut progress: impl FnMut(usize)) -> Vec<(usize, Error)> {
        let mut bad = Vec::new();
        for i in 0..self.len() {
            if let Err(e) = self.check_sample(i) {
                bad.push((i, e));
            }
            progress(i);
        }
        bad
    }

    /// [`Dataset::check_samples`] as one error listing every sample that cannot be used (`Ok` when
    /// there is none).
    pub fn check(&self, progress: impl FnMut(usize)) -> Result<()> {
        let bad = self.check_samples(progress);
        if bad.is_empty() {
            return Ok(());
        }
        let list: Vec<String> = bad.iter().map(|(_, e)| e.to_string()).collect();
        Err(Error::Invalid(format!(
            "{}: {} of {} samples cannot be used: {}",
            self.root.display(),
            bad.len(),
            self.len(),
            list.join("; ")
        )))
    }

    /// With the channel transform `channel` applied by [`Dataset::load`].
    pub fn with_channel(
        mut self,
        channel: (crate::channel::Channel, crate::channel::StainVectors),
    ) -> Dataset {
        self.channel = channel;
        self
    }

    /// Loads sample `i`: the RGB image (after the dataset's channel transform) and its binary
    /// mask (0/1, `width * height`, row-major) at the image's size. Errors name the file:
    /// unreadable image or mask, a mask whose size differs from the image's (naming both), a
    /// malformed annotation file.
    pub fn load(&self, i: usize) -> Result<(RgbImage, Vec<u8>)> {
        let s = self.samples.get(i).ok_or_else(|| {
            Error::Invalid(format!(
                "{}: sample {i} requested but the dataset has {}",
                self.root.display(),
                self.len()
            ))
        })?;
        let image = crate::io::load_rgb(&s.image)?;
        let mask = load_mask(&s.mask, image.width, image.height, &s.image)?;
        let (channel, vectors) = self.channel;
        if channel == crate::channel::Channel::Rgb {
            return Ok((image, mask));
        }
        let (t, _) = crate::channel::ChannelTransform::for_image(channel, vectors, &image);
        Ok((t.apply(&image), mask))
    }
}

/// An image file's width and height from its header (no pixels decoded).
#[cfg(not(target_arch = "wasm32"))]
fn header_size(p: &Path) -> Result<(usize, usize)> {
    let reader = image::ImageReader::open(p).map_err(|e| Error::io(p, e))?;
    let reader = reader.with_guessed_format().map_err(|e| Error::io(p, e))?;
    if reader.format().is_none() {
        return Err(Error::image(
            p,
            format!(
                "not a recognised image file (supported: {})",
                crate::io::SUPPORTED
            ),
        ));
    }
    let (w, h) = reader
        .into_dimensions()
        .map_err(|e| Error::image(p, format!("cannot read the image header: {e}")))?;
    if w == 0 || h == 0 {
        return Err(Error::image(p, format!("image has zero size ({w}x{h})")));
    }
    crate::io::check_pixel_budget(&p.display().to_string(), w as u64, h as u64)?;
    Ok((w as usize, h as usize))
}

/// Loads a ground-truth mask as 0/1 bytes for an image of `width × height` (`image` only names the
/// image in the size-mismatch error). Image masks are binarised with [`binarize`]; Aperio XML is
/// rasterised at that size with [`rasterize_polygons`].
#[cfg(not(target_arch = "wasm32"))]
pub fn load_mask(
    source: &MaskSource,
    width: usize,
    height: usize,
    image: &Path,
) -> Result<Vec<u8>> {
    match source {
        MaskSource::Png(p) => {
            let g = crate::io::load_gray(p)?;
            if (g.width, g.height) != (width, height) {
                return Err(Error::image(
                    p,
                    format!(
                        "mask is {}×{} but its image {} is {width}×{height}",
                        g.width,
                        g.height,
                        image.display()
                    ),
                ));
            }
            Ok(binarize(&g))
        }
        MaskSource::AperioXml(p) => {
            let bytes = std::fs::read(p).map_err(|e| Error::io(p, e))?;
            let text = String::from_utf8_lossy(&bytes);
            let polygons = parse_aperio_xml(&text, p)?;
            Ok(rasterize_polygons(&polygons, width, height))
        }
    }
}
