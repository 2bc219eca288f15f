//! Nuclei as objects: a binary mask, streamed row by row, becomes numbered objects (instances).
//!
//! [`Labeler`] takes the mask and the image's RGB one row at a time (y = 0, 1, 2, …), finds the
//! 8-connected foreground components incrementally (the runs of each row joined to the runs of the
//! row above with a union-find), and processes a component as soon as a row arrives that it does
//! not touch: touching nuclei are split (exact Euclidean distance transform, h-maxima markers,
//! marker-controlled watershed), each piece is measured and outlined, and the objects and the
//! finished label rows go to an [`InstanceSink`]. Only the runs of unfinished components and the
//! label rows from the oldest unfinished one are held, so a whole-slide mask of small nuclei
//! streams in a few MB.
//!
//! [`LabelTiffWriter`], [`CsvWriter`] and [`GeoJsonWriter`] write the three outputs as they come
//! (a 16- or 32-bit label TIFF, one CSV line per object, a GeoJSON FeatureCollection that QuPath
//! imports as detections); [`WriterSink`] joins them into one sink. [`label_image`] does the whole
//! thing in memory for small images. `docs/instances.md` describes the outputs for users.
//!
//! Coordinates: pixel (x, y) covers the square [x, x+1) × [y, y+1) of the image plane, x to the
//! right and y downwards; centroids are in these units (the centre of pixel (x, y) is
//! (x + 0.5, y + 0.5)) and polygon vertices are pixel corners.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, VecDeque};
use std::fmt;
use std::io::{Seek, SeekFrom, Write};
use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::io::{GrayImage, RgbImage};

/// A mask byte above this value is foreground.
pub const FOREGROUND_THRESHOLD: u8 = 127;

/// Components whose padded bounding box has more pixels than this are kept whole (not split):
/// the distance transform and the watershed of such a region would need several bytes per pixel
/// of its box, and a region that large is tissue, not a clump of nuclei.
pub const MAX_SPLIT_PIXELS: usize = 1 << 24;

/// How components become objects.
#[derive(Clone, Debug, PartialEq)]
pub struct InstanceOptions {
    /// Split touching nuclei (distance transform + h-maxima + watershed). Without it each
    /// 8-connected component is one object.
    pub split: bool,
    /// The h of the h-maxima transform, in pixels of distance: a component is split only where
    /// its distance map has separate peaks that each rise at least `h` above the saddle between
    /// them. Larger values split less.
    pub h: f32,
    /// Objects with fewer pixels than this (after splitting) are dropped: no id, 0 in the label
    /// image, not in the CSV or GeoJSON.
    pub min_area: usize,
}

impl Default for InstanceOptions {
    fn default() -> Self {
        InstanceOptions {
            split: true,
            h: 2.0,
            min_area: 10,
        }
    }
}

impl InstanceOptions {
    fn validate(&self) -> Result<()> {
        if !self.h.is_finite() || self.h < 0.0 {
            return Err(Error::Invalid(format!(
                "instances: h must be a finite distance >= 0 (got {})",
                self.h
            )));
        }
        Ok(())
    }
}

/// A closed ring of pixel-corner points (the first point repeated at the end).
pub type Ring = Vec<[f64; 2]>;
/// A polygon: its outer ring, then its holes.
pub type Polygon = Vec<Ring>;

/// One object (a nucleus) and its measurements.
#[derive(Clone, Debug, PartialEq)]
pub struct Object {
    /// 1, 2, 3, … in the order the objects are emitted; the value of its pixels in the label image.
    pub id: u32,
    /// Pixels.
    pub area: u64,
    /// `[x0, y0, x1, y1]`, x1 and y1 exclusive.
    pub bbox: [u32; 4],
    /// `[x, y]`, the mean of its pixels' centres (pixel (x, y) has centre (x + 0.5, y + 0.5)).
    pub centroid: [f64; 2],
    /// Length of the outline along pixel edges, outer and inner (holes) boundaries together, in
    /// pixels. Equal to the number of pixel sides between the object and anything else; it
    /// overestimates the length of a smooth curve (by about 4/π for a disc).
    pub perimeter: f64,
    /// `sqrt(1 − λmin/λmax)` of the covariance of its pixel centres (the ellipse with the same
    /// second moments): 0 for a disc or a single pixel, towards 1 for elongated shapes.
    pub eccentricity: f64,
    /// Mean R, G, B of its pixels (0–255).
    pub mean_rgb: [f64; 3],
    /// The outline along pixel edges: one polygon per 4-connected part (pixels touching only at a
    /// corner are separate parts; usually there is one), each its outer ring then its holes.
    /// Vertices are pixel corners in image coordinates with collinear points removed; the shoelace
    /// area of the outer rings minus the holes equals `area` exactly. Orientation follows the
    /// GeoJSON right-hand rule on the numbers as written (a positive shoelace sum for outer rings,
    /// negative for holes), which, with the image's y axis pointing down, shows outer rings
    /// clockwise on screen.
    pub polygons: Vec<Polygon>,
}

/// Totals over one image.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Summary {
    /// Objects emitted.
    pub count: u64,
    /// Mean object area in pixels (0 when there is none).
    pub mean_area: f64,
    /// Foreground fraction of the image: mask pixels above [`FOREGROUND_THRESHOLD`] / `pixels`.
    pub coverage: f64,
    /// Pixels in the image (width × rows pushed).
    pub pixels: u64,
    /// Foreground pixels of the mask.
    pub foreground: u64,
    /// Pixels belonging to emitted objects (`foreground` minus the dropped small objects).
    pub object_pixels: u64,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let noun = if self.count == 1 { "nucleus" } else { "nuclei" };
        write!(
            f,
            "{} {noun}, mean area {:.1} px, {:.1}% coverage",
            self.count,
            self.mean_area,
            100.0 * self.coverage
        )
    }
}

/// Receives what a [`Labeler`] produces.
///
/// Order guarantees: `object` is called with ids 1, 2, 3, … in order; `label_row` is called once
/// per pushed row, y = 0, 1, 2, … in order, each row `width` long; every object with a pixel in
/// row y has been passed to `object` before `label_row(y, ..)`.
pub trait InstanceSink {
    /// One finished object.
    fn object(&mut self, obj: &Object) -> Result<()>;
    /// One finished row of the label image (0 = background, otherwise the object's id).
    fn label_row(&mut self, y: usize, labels: &[u32]) -> Result<()> {
        let _ = (y, labels);
        Ok(())
    }
}

/// A sink that keeps everything in memory (used by [`label_image`]).
#[derive(Clone, Debug, Default)]
pub struct CollectSink {
    /// The objects, in id order.
    pub objects: Vec<Object>,
    /// The label image, row-major.
    pub labels: Vec<u32>,
}

impl InstanceSink for CollectSink {
    fn object(&mut self, obj: &Object) -> Result<()> {
        self.objects.push(obj.clone());
        Ok(())
    }
    fn label_row(&mut self, _y: usize, labels: &[u32]) -> Result<()> {
        self.labels.extend_from_slice(labels);
        Ok(())
    }
}

/// Labels a whole mask in memory: the label image (row-major, 0 = background), the objects in id
/// order, and the totals. `mask` and `rgb` must have the same size.
pub fn label_image(
    mask: &GrayImage,
    rgb: &RgbImage,
    opts: &InstanceOptions,
) -> Result<(Vec<u32>, Vec<Object>, Summary)> {
    if mask.width != rgb.width || mask.height != rgb.height {
        return Err(Error::Invalid(format!(
            "instances: the mask is {}x{} but the image is {}x{}",
            mask.width, mask.height, rgb.width, rgb.height
        )));
    }
    let w = mask.width;
    if mask.data.len() != w * mask.height || rgb.data.len() != 3 * w * rgb.height {
        return Err(Error::Invalid(format!(
            "instances: a {}x{} mask needs {} bytes and the image {} (got {} and {})",
            w,
            mask.height,
            w * mask.height,
            3 * w * rgb.height,
            mask.data.len(),
            rgb.data.len()
        )));
    }
    let mut sink = CollectSink {
        objects: Vec::new(),
        labels: Vec::with_capacity(w * mask.height),
    };
    let mut lab = Labeler::new(w, opts.clone());
    for y in 0..mask.height {
        lab.push_row(
            &mask.data[y * w..(y + 1) * w],
            &rgb.data[3 * y * w..3 * (y + 1) * w],
            &mut sink,
        )?;
    }
    let summary = lab.finish(&mut sink)?;
    Ok((sink.labels, sink.objects, summary))
}

/// The label depth that can hold every id an image of this size can produce: 16-bit when even a
/// mask packed with objects of `min_area` pixels stays within 65,535 ids, else 32-bit.
pub fn label_bits_for(width: usize, height: usize, opts: &InstanceOptions) -> LabelBits {
    let most = (width as u128 * height as u128) / opts.min_area.max(1) as u128;
    if most <= u16::MAX as u128 {
        LabelBits::U16
    } else {
        LabelBits::U32
    }
}

// ---------------------------------------------------------------------------------------------
// Streaming labeller

/// One foreground run of a row, kept by its component: pixels `x0..x1` of row `y`, their RGB at
/// `rgb..rgb + 3·(x1 − x0)` of the component's `rgb`.
#[derive(Clone, Copy, Debug)]
struct Run {
    y: u32,
    x0: u32,
    x1: u32,
    rgb: usize,
}

/// An unfinished component.
#[derive(Debug, Default)]
struct Comp {
    runs: Vec<Run>,
    rgb: Vec<u8>,
    /// First pixel in raster order, (y, x).
    first: (u32, u32),
}

/// A run of the latest row: `x0..x1` and its component slot.
#[derive(Clone, Copy, Debug)]
struct RowRun {
    x0: u32,
    x1: u32,
    slot: u32,
}

/// The streaming labeller: push mask rows (with the image's RGB rows) in order, then `finish`.
/// See the module documentation.
#[derive(Debug)]
pub struct Labeler {
    width: usize,
    opts: InstanceOptions,
    /// Rows pushed so far (the next row's y).
    y: usize,
    prev: Vec<RowRun>,
    cur: Vec<RowRun>,
    /// Union-find over component slots; a slot is a root while `comps[slot]` is `Some`.
    parent: Vec<u32>,
    comps: Vec<Option<Comp>>,
    free: Vec<u32>,
    /// Slots that stopped being roots during the current row (freed at its end).
    merged: Vec<u32>,
    /// Per-slot row stamps used while finding the completed components.
    stamp: Vec<usize>,
    /// Label rows `first_row ..` not yet handed out.
    rows: VecDeque<Vec<u32>>,
    first_row: usize,
    spare: Vec<Vec<u32>>,
    next_id: u32,
    foreground: u64,
    object_pixels: u64,
    peak_pending: usize,
}

impl Labeler {
    /// A labeller for rows of `width` pixels.
    pub fn new(width: usize, opts: InstanceOptions) -> Labeler {
        Labeler {
            width,
            opts,
            y: 0,
            prev: Vec::new(),
            cur: Vec::new(),
            parent: Vec::new(),
            comps: Vec::new(),
            free: Vec::new(),
            merged: Vec::new(),
            stamp: Vec::new(),
            rows: VecDeque::new(),
            first_row: 0,
            spare: Vec::new(),
            next_id: 1,
            foreground: 0,
            object_pixels: 0,
            peak_pending: 0,
        }
    }

    /// Row width in pixels.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Rows pushed so far.
    pub fn rows_pushed(&self) -> usize {
        self.y
    }

    /// Label rows held because a component touching them is unfinished (rows pushed but not yet
    /// handed to the sink).
    pub fn pending_rows(&self) -> usize {
        self.rows.len()
    }

    /// The most rows ever held at once (measured after each row's completed components and
    /// finished rows have been handed out).
    pub fn peak_pending_rows(&self) -> usize {
        self.peak_pending
    }

    /// Components not finished yet.
    pub fn pending_components(&self) -> usize {
        self.comps.iter().filter(|c| c.is_some()).count()
    }

    /// Objects emitted so far.
    pub fn objects_emitted(&self) -> u64 {
        u64::from(self.next_id - 1)
    }

    /// Adds the next row: `mask_row` has `width` bytes (foreground > 127), `rgb_row` 3·`width`
    /// (R, G, B per pixel). Components that this row does not touch are finished and handed to
    /// `sink` with any label rows that became complete.
    pub fn push_row<S: InstanceSink + ?Sized>(
        &mut self,
        mask_row: &[u8],
        rgb_row: &[u8],
        sink: &mut S,
    ) -> Result<()> {
        self.opts.validate()?;
        let y = self.y;
        if mask_row.len() != self.width {
            return Err(Error::Invalid(format!(
                "instances: mask row {y} has {} pixels, expected {} (the image width)",
                mask_row.len(),
                self.width
            )));
        }
        if rgb_row.len() != 3 * self.width {
            return Err(Error::Invalid(format!(
                "instances: RGB row {y} has {} bytes, expected {} (3 x the image width {})",
                rgb_row.len(),
                3 * self.width,
                self.width
            )));
        }
        let y32 = u32::try_from(y)
            .ok()
            .filter(|_| u32::try_from(self.width).is_ok())
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "instances: images up to {} pixels per side are supported",
                    u32::MAX
                ))
            })?;

        // This row's label buffer.
        let mut row = self.spare.pop().unwrap_or_default();
        row.clear();
        row.resize(self.width, 0);
        self.rows.push_back(row);

        // Runs of this row, joined to the runs of the row above (8-connectivity: the runs
        // x0..x1 and p.x0..p.x1 touch when p.x0 <= x1 and x0 <= p.x1).
        self.cur.clear();
        let mut j = 0;
        let mut x = 0usize;
        let w = self.width;
        while x < w {
            if mask_row[x] <= FOREGROUND_THRESHOLD {
                x += 1;
                continue;
            }
            let start = x;
            while x < w && mask_row[x] > FOREGROUND_THRESHOLD {
                x += 1;
            }
            let (x0, x1) = (start as u32, x as u32);
            self.foreground += u64::from(x1 - x0);
            while j < self.prev.len() && self.prev[j].x1 < x0 {
                j += 1;
            }
            let mut label: Option<u32> = None;
            let mut k = j;
            while k < self.prev.len() && self.prev[k].x0 <= x1 {
                let r = self.find(self.prev[k].slot);
                label = Some(match label {
                    None => r,
                    Some(l) => self.union(l, r),
                });
                k += 1;
            }
            let slot = match label {
                Some(l) => l,
                None => self.new_slot(y32, x0),
            };
            self.cur.push(RowRun { x0, x1, slot });
        }
        // Attach the runs (with their colours) to their components' roots.
        for i in 0..self.cur.len() {
            let r = self.find(self.cur[i].slot);
            self.cur[i].slot = r;
            let RowRun { x0, x1, .. } = self.cur[i];
            if let Some(c) = self.comps[r as usize].as_mut() {
                let off = c.rgb.len();
                c.rgb
                    .extend_from_slice(&rgb_row[3 * x0 as usize..3 * x1 as usize]);
                c.runs.push(Run {
                    y: y32,
                    x0,
                    x1,
                    rgb: off,
                });
            }
        }

        // Components of the row above that this row does not continue are complete.
        let tag = y + 1;
        for i in 0..self.cur.len() {
            let s = self.cur[i].slot as usize;
            self.stamp[s] = tag;
        }
        let mut done: Vec<u32> = Vec::new();
        for i in 0..self.prev.len() {
            let r = self.find(self.prev[i].slot);
            if self.stamp[r as usize] != tag {
                self.stamp[r as usize] = tag;
                done.push(r);
            }
        }
        let mut finished: Vec<Comp> = Vec::with_capacity(done.len());
        for &r in &done {
            if let Some(c) = self.comps[r as usize].take() {
                finished.push(c);
            }
            self.release(r);
        }
        for s in std::mem::take(&mut self.merged) {
            self.release(s);
        }
        std::mem::swap(&mut self.prev, &mut self.cur);
        self.y += 1;

        finished.sort_by_key(|c| c.first);
        for c in finished {
            self.process_component(c, sink)?;
        }

        // Rows above the oldest unfinished component are complete.
        let oldest = self
            .prev
            .iter()
            .filter_map(|r| {
                self.comps[r.slot as usize]
                    .as_ref()
                    .map(|c| c.first.0 as usize)
            })
            .min()
            .unwrap_or(self.y);
        self.emit_rows(oldest, sink)?;
        self.peak_pending = self.peak_pending.max(self.rows.len());
        Ok(())
    }

    /// Finishes the components that reach the last row, hands out the remaining label rows and
    /// returns the totals.
    pub fn finish<S: InstanceSink + ?Sized>(mut self, sink: &mut S) -> Result<Summary> {
        self.opts.validate()?;
        let mut finished: Vec<Comp> = Vec::new();
        for i in 0..self.prev.len() {
            let r = self.find(self.prev[i].slot);
            if let Some(c) = self.comps[r as usize].take() {
                finished.push(c);
            }
        }
        self.prev.clear();
        finished.sort_by_key(|c| c.first);
        for c in finished {
            self.process_component(c, sink)?;
        }
        let end = self.y;
        self.emit_rows(end, sink)?;
        let pixels = self.width as u64 * self.y as u64;
        let count = self.objects_emitted();
        Ok(Summary {
            count,
            mean_area: if count == 0 {
                0.0
            } else {
                self.object_pixels as f64 / count as f64
            },
            coverage: if pixels == 0 {
                0.0
            } else {
                self.foreground as f64 / pixels as f64
            },
            pixels,
            foreground: self.foreground,
            object_pixels: self.object_pixels,
        })
    }

    fn emit_rows<S: InstanceSink + ?Sized>(&mut self, until: usize, sink: &mut S) -> Result<()> {
        while self.first_row < until {
            let Some(row) = self.rows.pop_front() else {
                break;
            };
            sink.label_row(self.first_row, &row)?;
            self.first_row += 1;
            self.spare.push(row);
        }
        self.spare.truncate(4);
        Ok(())
    }

    fn new_slot(&mut self, y: u32, x: u32) -> u32 {
        let comp = Comp {
            runs: Vec::new(),
            rgb: Vec::new(),
            first: (y, x),
        };
        if let Some(s) = self.free.pop() {
            self.parent[s as usize] = s;
            self.comps[s as usize] = Some(comp);
            s
        } else {
            let s = self.parent.len() as u32;
            self.parent.push(s);
            self.comps.push(Some(comp));
            self.stamp.push(0);
            s
        }
    }

    fn release(&mut self, s: u32) {
        self.parent[s as usize] = s;
        self.comps[s as usize] = None;
        self.free.push(s);
    }

    fn find(&mut self, s: u32) -> u32 {
        let mut r = s;
        while self.parent[r as usize] != r {
            r = self.parent[r as usize];
        }
        let mut c = s;
        while self.parent[c as usize] != r {
            let n = self.parent[c as usize];
            self.parent[c as usize] = r;
            c = n;
        }
        r
    }

    /// Joins two roots; the one with more runs stays the root and takes the other's runs.
    fn union(&mut self, a: u32, b: u32) -> u32 {
        if a == b {
            return a;
        }
        let la = self.comps[a as usize].as_ref().map_or(0, |c| c.runs.len());
        let lb = self.comps[b as usize].as_ref().map_or(0, |c| c.runs.len());
        let (big, small) = if la >= lb { (a, b) } else { (b, a) };
        let taken = self.comps[small as usize].take();
        self.parent[small as usize] = big;
        self.merged.push(small);
        if let (Some(s), Some(bc)) = (taken, self.comps[big as usize].as_mut()) {
            let off = bc.rgb.len();
            bc.rgb.extend_from_slice(&s.rgb);
            bc.runs.extend(s.runs.iter().map(|r| Run {
                rgb: r.rgb + off,
                ..*r
            }));
            bc.first = bc.first.min(s.first);
        }
        big
    }

    /// Splits, measures, outlines and emits one completed component, and writes its ids into the
    /// held label rows.
    fn process_component<S: InstanceSink + ?Sized>(
        &mut self,
        comp: Comp,
        sink: &mut S,
    ) -> Result<()> {
        let area: u64 = comp.runs.iter().map(|r| u64::from(r.x1 - r.x0)).sum();
        if area == 0 || area < self.opts.min_area as u64 {
            return Ok(());
        }
        let (mut bx0, mut bx1, mut by0, mut by1) = (u32::MAX, 0u32, u32::MAX, 0u32);
        for r in &comp.runs {
            bx0 = bx0.min(r.x0);
            bx1 = bx1.max(r.x1);
            by0 = by0.min(r.y);
            by1 = by1.max(r.y + 1);
        }
        // The component's box padded by one background pixel on each side.
        let cw = (bx1 - bx0) as usize + 2;
        let ch = (by1 - by0) as usize + 2;
        let mut inside = vec![false; cw * ch];
        for r in &comp.runs {
            let base = ((r.y - by0) as usize + 1) * cw + 1 - bx0 as usize;
            inside[base + r.x0 as usize..base + r.x1 as usize].fill(true);
        }
        let (labels, pieces) =
            if self.opts.split && area > 1 && cw.saturating_mul(ch) <= MAX_SPLIT_PIXELS {
                split_pieces(&inside, cw, ch, f64::from(self.opts.h))
            } else {
                (inside.iter().map(|&b| u32::from(b)).collect(), 1)
            };
        drop(inside);

        // Per-piece sums, from the runs (so the colours come along).
        let mut stats = vec![PieceStats::default(); pieces];
        for r in &comp.runs {
            let cy = (r.y - by0) as usize + 1;
            for (i, x) in (r.x0..r.x1).enumerate() {
                let cx = (x - bx0) as usize + 1;
                let m = labels[cy * cw + cx] as usize;
                if m == 0 || m > pieces {
                    continue;
                }
                let c = &comp.rgb[r.rgb + 3 * i..r.rgb + 3 * i + 3];
                stats[m - 1].add(cx, cy, (r.y, x), c);
            }
        }
        let mut order: Vec<usize> = (0..pieces).filter(|&m| stats[m].area > 0).collect();
        order.sort_by_key(|&m| stats[m].first);

        let mut ids = vec![0u32; pieces];
        for &m in &order {
            let st = &stats[m];
            if st.area < self.opts.min_area as u64 {
                continue;
            }
            if self.next_id == u32::MAX {
                return Err(Error::Invalid(format!(
                    "instances: more than {} objects in one image",
                    u32::MAX - 1
                )));
            }
            let id = self.next_id;
            self.next_id += 1;
            ids[m] = id;
            // Crop coordinates → image coordinates: x = cx + bx0 − 1.
            let ox = i64::from(bx0) - 1;
            let oy = i64::from(by0) - 1;
            let (polygons, perimeter) = trace_piece(&labels, cw, m as u32 + 1, st, ox, oy);
            let obj = st.object(id, ox, oy, polygons, perimeter);
            self.object_pixels += obj.area;
            sink.object(&obj)?;
        }

        for r in &comp.runs {
            let cy = (r.y - by0) as usize + 1;
            let Some(row) = (r.y as usize)
                .checked_sub(self.first_row)
                .and_then(|i| self.rows.get_mut(i))
            else {
                continue;
            };
            for x in r.x0..r.x1 {
                let m = labels[cy * cw + (x - bx0) as usize + 1] as usize;
                if m >= 1 && m <= pieces {
                    row[x as usize] = ids[m - 1];
                }
            }
        }
        Ok(())
    }
}

/// Sums over one piece's pixels (crop coordinates for the moments).
#[derive(Clone, Debug, Default)]
struct PieceStats {
    area: u64,
    /// First pixel in raster order (image coordinates), (y, x).
    first: (u32, u32),
    /// Bounding box in crop coordinates, x1/y1 exclusive.
    cx0: usize,
    cy0: usize,
    cx1: usize,
    cy1: usize,
    sx: u128,
    sy: u128,
    sxx: u128,
    syy: u128,
    sxy: u128,
    rgb: [u64; 3],
}

impl PieceStats {
    fn add(&mut self, cx: usize, cy: usize, yx: (u32, u32), c: &[u8]) {
        if self.area == 0 {
            self.first = yx;
            (self.cx0, self.cy0, self.cx1, self.cy1) = (cx, cy, cx + 1, cy + 1);
        } else {
            self.first = self.first.min(yx);
            self.cx0 = self.cx0.min(cx);
            self.cy0 = self.cy0.min(cy);
            self.cx1 = self.cx1.max(cx + 1);
            self.cy1 = self.cy1.max(cy + 1);
        }
        self.area += 1;
        let (x, y) = (cx as u128, cy as u128);
        self.sx += x;
        self.sy += y;
        self.sxx += x * x;
        self.syy += y * y;
        self.sxy += x * y;
        for (sum, &v) in self.rgb.iter_mut().zip(c) {
            *sum += u64::from(v);
        }
    }

    fn object(&self, id: u32, ox: i64, oy: i64, polygons: Vec<Polygon>, perimeter: u64) -> Object {
        let n = self.area as f64;
        let mx = self.sx as f64 / n;
        let my = self.sy as f64 / n;
        // Central second moments from exact integer sums: n²·var = n·Σx² − (Σx)².
        let n2 = n * n;
        let a = (self.area as u128 * self.sxx).abs_diff(self.sx * self.sx) as f64 / n2;
        let c = (self.area as u128 * self.syy).abs_diff(self.sy * self.sy) as f64 / n2;
        let nxy = self.area as u128 * self.sxy;
        let sxsy = self.sx * self.sy;
        let b = if nxy >= sxsy {
            (nxy - sxsy) as f64 / n2
        } else {
            -((sxsy - nxy) as f64) / n2
        };
        let half = 0.5 * (a + c);
        let root = (0.25 * (a - c) * (a - c) + b * b).sqrt();
        let lmax = half + root;
        let eccentricity = if lmax <= 0.0 {
            0.0
        } else {
            let lmin = ((a * c - b * b) / lmax).max(0.0);
            (1.0 - lmin / lmax).clamp(0.0, 1.0).sqrt()
        };
        let to_x = |cx: usize| (cx as i64 + ox) as u32;
        let to_y = |cy: usize| (cy as i64 + oy) as u32;
        Object {
            id,
            area: self.area,
            bbox: [
                to_x(self.cx0),
                to_y(self.cy0),
                to_x(self.cx1),
                to_y(self.cy1),
            ],
            centroid: [mx + ox as f64 + 0.5, my + oy as f64 + 0.5],
            perimeter: perimeter as f64,
            eccentricity,
            mean_rgb: [
                self.rgb[0] as f64 / n,
                self.rgb[1] as f64 / n,
                self.rgb[2] as f64 / n,
            ],
            polygons,
        }
    }
}

/// Outlines piece `m` of a crop label image `labels` (width `cw`); `ox`, `oy` take crop
/// coordinates to image coordinates.
fn trace_piece(
    labels: &[u32],
    cw: usize,
    m: u32,
    st: &PieceStats,
    ox: i64,
    oy: i64,
) -> (Vec<Polygon>, u64) {
    // The piece's box padded by one pixel (the crop's padding keeps it inside the crop).
    let lw = st.cx1 - st.cx0 + 2;
    let lh = st.cy1 - st.cy0 + 2;
    let mut local = vec![false; lw * lh];
    for ly in 1..lh - 1 {
        let src = (st.cy0 + ly - 1) * cw + st.cx0 - 1;
        for lx in 1..lw - 1 {
            local[ly * lw + lx] = labels[src + lx] == m;
        }
    }
    let lox = ox + st.cx0 as i64 - 1;
    let loy = oy + st.cy0 as i64 - 1;
    trace_outline(&local, lw, lh, lox, loy)
}

// ---------------------------------------------------------------------------------------------
// Distance transform

/// Squared Euclidean distance from each pixel of a `width` × `height` grid to the nearest pixel
/// where `inside` is false (0 on such pixels; `u64::MAX` everywhere when there is none), exact:
/// a column pass, then the lower envelope of parabolas along each row (Felzenszwalb and
/// Huttenlocher) with the envelope's breakpoints compared as exact fractions.
pub fn squared_distance_transform(inside: &[bool], width: usize, height: usize) -> Vec<u64> {
    const INF: u64 = u64::MAX;
    let n = width * height;
    let mut g = vec![INF; n];
    if n == 0 || inside.len() < n {
        return g;
    }
    // Columns: distance to the nearest outside pixel in the same column.
    let mut dist = vec![INF; height];
    for x in 0..width {
        let mut last: Option<usize> = None;
        for y in 0..height {
            if !inside[y * width + x] {
                last = Some(y);
            }
            dist[y] = last.map_or(INF, |l| (y - l) as u64);
        }
        let mut next: Option<usize> = None;
        for y in (0..height).rev() {
            if !inside[y * width + x] {
                next = Some(y);
            }
            if let Some(nx) = next {
                dist[y] = dist[y].min((nx - y) as u64);
            }
            g[y * width + x] = if dist[y] == INF {
                INF
            } else {
                dist[y] * dist[y]
            };
        }
    }
    // Rows: out[q] = min over p of (q − p)² + g[p].
    let mut out = vec![INF; n];
    let mut v: Vec<usize> = Vec::with_capacity(width);
    let mut z: Vec<(i128, i128)> = Vec::with_capacity(width);
    for y in 0..height {
        let f = &g[y * width..(y + 1) * width];
        v.clear();
        z.clear();
        for q in 0..width {
            if f[q] == INF {
                continue;
            }
            loop {
                let Some(&p) = v.last() else {
                    v.push(q);
                    break;
                };
                // Where the parabolas from p and q meet: s = (F(q) − F(p)) / (2(q − p)),
                // F(i) = f[i] + i².
                let fq = i128::from(f[q]) + (q as i128) * (q as i128);
                let fp = i128::from(f[p]) + (p as i128) * (p as i128);
                let s = (fq - fp, 2 * (q as i128 - p as i128));
                if let Some(&zl) = z.last()
                    && frac_le(s, zl)
                {
                    v.pop();
                    z.pop();
                    continue;
                }
                z.push(s);
                v.push(q);
                break;
            }
        }
        if v.is_empty() {
            continue;
        }
        let mut k = 0;
        for q in 0..width {
            while k < z.len() && z[k].0 < (q as i128) * z[k].1 {
                k += 1;
            }
            let p = v[k];
            let d = q.abs_diff(p) as u64;
            out[y * width + q] = d * d + f[p];
        }
    }
    out
}

/// a/b <= c/d for positive denominators.
fn frac_le(a: (i128, i128), c: (i128, i128)) -> bool {
    a.0 * c.1 <= c.0 * a.1
}

// ---------------------------------------------------------------------------------------------
// Splitting: h-maxima markers and watershed

/// A priority-queue entry: larger `key` first, then smaller `seq` (first in, first out).
struct Item {
    key: f64,
    seq: u64,
    idx: usize,
    label: u32,
}

impl PartialEq for Item {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Item {}
impl PartialOrd for Item {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Item {
    fn cmp(&self, other: &Self) -> Ordering {
        self.key
            .total_cmp(&other.key)
            .then_with(|| other.seq.cmp(&self.seq))
    }
}

/// Splits the pixels where `inside` is true (a `w` × `h` crop whose border is outside) into
/// pieces: labels 1..=count per pixel, 0 outside.
fn split_pieces(inside: &[bool], w: usize, h: usize, hval: f64) -> (Vec<u32>, usize) {
    let n = w * h;
    let sq = squared_distance_transform(inside, w, h);
    let d: Vec<f64> = sq
        .iter()
        .zip(inside)
        .map(|(&s, &i)| if i { (s as f64).sqrt() } else { 0.0 })
        .collect();
    let wi = w as isize;
    let nbr: [isize; 8] = [-wi - 1, -wi, -wi + 1, -1, 1, wi - 1, wi, wi + 1];
    let at = |i: usize, o: isize| (i as isize + o) as usize;

    // Reconstruction by dilation of d − h under d (within the component): a widest-path flood.
    let mut rec = vec![f64::NEG_INFINITY; n];
    let mut heap = BinaryHeap::new();
    for i in 0..n {
        if inside[i] {
            rec[i] = d[i] - hval;
            heap.push(Item {
                key: rec[i],
                seq: i as u64,
                idx: i,
                label: 0,
            });
        }
    }
    let mut done = vec![false; n];
    let mut seq = n as u64;
    while let Some(it) = heap.pop() {
        let p = it.idx;
        if done[p] || it.key < rec[p] {
            continue;
        }
        done[p] = true;
        for &o in &nbr {
            let q = at(p, o);
            if !inside[q] || done[q] {
                continue;
            }
            let v = rec[p].min(d[q]);
            if v > rec[q] {
                rec[q] = v;
                heap.push(Item {
                    key: v,
                    seq,
                    idx: q,
                    label: 0,
                });
                seq += 1;
            }
        }
    }
    drop(done);

    // Markers: the regional maxima (connected plateaus without a higher neighbour) of the
    // reconstruction, numbered in raster order of their first pixel.
    let mut labels = vec![0u32; n];
    let mut seen = vec![false; n];
    let mut stack: Vec<usize> = Vec::new();
    let mut plateau: Vec<usize> = Vec::new();
    let mut count = 0u32;
    for i in 0..n {
        if !inside[i] || seen[i] {
            continue;
        }
        let v = rec[i];
        let mut is_max = true;
        plateau.clear();
        stack.push(i);
        seen[i] = true;
        while let Some(p) = stack.pop() {
            plateau.push(p);
            for &o in &nbr {
                let q = at(p, o);
                if !inside[q] {
                    continue;
                }
                if rec[q] > v {
                    is_max = false;
                } else if rec[q] == v && !seen[q] {
                    seen[q] = true;
                    stack.push(q);
                }
            }
        }
        if is_max {
            count += 1;
            for &p in &plateau {
                labels[p] = count;
            }
        }
    }
    drop(seen);

    // Watershed: flood from the markers, highest distance first, ties first come first served.
    let mut heap = BinaryHeap::new();
    let mut seq = 0u64;
    for i in 0..n {
        if labels[i] == 0 {
            continue;
        }
        for &o in &nbr {
            let q = at(i, o);
            if inside[q] && labels[q] == 0 {
                heap.push(Item {
                    key: d[q],
                    seq,
                    idx: q,
                    label: labels[i],
                });
                seq += 1;
            }
        }
    }
    while let Some(it) = heap.pop() {
        let p = it.idx;
        if labels[p] != 0 {
            continue;
        }
        labels[p] = it.label;
        for &o in &nbr {
            let q = at(p, o);
            if inside[q] && labels[q] == 0 {
                heap.push(Item {
                    key: d[q],
                    seq,
                    idx: q,
                    label: it.label,
                });
                seq += 1;
            }
        }
    }
    (labels, count as usize)
}

// ---------------------------------------------------------------------------------------------
// Outlines

const DIR_E: u8 = 1;
const DIR_S: u8 = 2;
const DIR_W: u8 = 4;
const DIR_N: u8 = 8;

fn dir_step(d: u8) -> (isize, isize) {
    match d {
        DIR_E => (1, 0),
        DIR_S => (0, 1),
        DIR_W => (-1, 0),
        _ => (0, -1),
    }
}

/// The turn towards the object (interior on the left as the numbers are written: +x → +y).
fn turn_in(d: u8) -> u8 {
    match d {
        DIR_E => DIR_S,
        DIR_S => DIR_W,
        DIR_W => DIR_N,
        _ => DIR_E,
    }
}

fn turn_out(d: u8) -> u8 {
    match d {
        DIR_E => DIR_N,
        DIR_N => DIR_W,
        DIR_W => DIR_S,
        _ => DIR_E,
    }
}

/// Traces the pixel-edge outline of the pixels where `inside` is true on a `w` × `h` grid
/// (pixels beyond the grid count as outside); vertex (vx, vy) is written as (vx + ox, vy + oy).
/// Returns one polygon per 4-connected part (outer ring, then its holes; outer rings with a
/// positive shoelace sum, holes negative, first point repeated at the end, collinear points
/// removed) and the number of pixel edges on the boundary.
fn trace_outline(inside: &[bool], w: usize, h: usize, ox: i64, oy: i64) -> (Vec<Polygon>, u64) {
    let vw = w + 1;
    let mut bits = vec![0u8; vw * (h + 1)];
    let is_in = |x: isize, y: isize| {
        x >= 0
            && y >= 0
            && (x as usize) < w
            && (y as usize) < h
            && inside[y as usize * w + x as usize]
    };
    for y in 0..h {
        for x in 0..w {
            if !inside[y * w + x] {
                continue;
            }
            let (xi, yi) = (x as isize, y as isize);
            if !is_in(xi, yi - 1) {
                bits[y * vw + x] |= DIR_E;
            }
            if !is_in(xi + 1, yi) {
                bits[y * vw + x + 1] |= DIR_S;
            }
            if !is_in(xi, yi + 1) {
                bits[(y + 1) * vw + x + 1] |= DIR_W;
            }
            if !is_in(xi - 1, yi) {
                bits[(y + 1) * vw + x] |= DIR_N;
            }
        }
    }

    // Rings in local integer coordinates, with their doubled signed area and a pixel just
    // outside their first edge (inside the hole, for a hole).
    struct RawRing {
        pts: Vec<(i64, i64)>,
        area2: i64,
        probe: (i64, i64),
    }
    let mut rings: Vec<RawRing> = Vec::new();
    let mut edges = 0u64;
    for sv in 0..bits.len() {
        while bits[sv] != 0 {
            let b = bits[sv];
            let sdir = [DIR_E, DIR_S, DIR_W, DIR_N]
                .into_iter()
                .find(|&d| b & d != 0)
                .unwrap_or(DIR_E);
            let (sx, sy) = ((sv % vw) as isize, (sv / vw) as isize);
            let probe = match sdir {
                DIR_E => (sx, sy - 1),
                DIR_S => (sx, sy),
                DIR_W => (sx - 1, sy),
                _ => (sx - 1, sy - 1),
            };
            let mut pts = vec![(sx as i64, sy as i64)];
            let (mut cx, mut cy, mut dir) = (sx, sy, sdir);
            loop {
                let v = cy as usize * vw + cx as usize;
                bits[v] &= !dir;
                edges += 1;
                let (dx, dy) = dir_step(dir);
                cx += dx;
                cy += dy;
                let v = cy as usize * vw + cx as usize;
                let at_start = cx == sx && cy == sy;
                let avail = bits[v] | if at_start { sdir } else { 0 };
                let next = [turn_in(dir), dir, turn_out(dir)]
                    .into_iter()
                    .find(|&d| avail & d != 0);
                let Some(next) = next else {
                    // Cannot happen for a pixel outline; close the ring rather than loop.
                    break;
                };
                if at_start && next == sdir {
                    break;
                }
                if next != dir {
                    pts.push((cx as i64, cy as i64));
                }
                dir = next;
            }
            pts.push(pts[0]);
            let area2: i64 = pts
                .windows(2)
                .map(|p| p[0].0 * p[1].1 - p[1].0 * p[0].1)
                .sum();
            rings.push(RawRing {
                pts,
                area2,
                probe: (probe.0 as i64, probe.1 as i64),
            });
        }
    }

    // Holes go to the innermost outer ring around them.
    let outers: Vec<usize> = (0..rings.len()).filter(|&i| rings[i].area2 > 0).collect();
    let mut holes_of: Vec<Vec<usize>> = vec![Vec::new(); outers.len()];
    for (i, r) in rings.iter().enumerate() {
        if r.area2 > 0 {
            continue;
        }
        let (px, py) = (2 * r.probe.0 + 1, 2 * r.probe.1 + 1);
        let mut best: Option<usize> = None;
        for (k, &o) in outers.iter().enumerate() {
            if contains2(&rings[o].pts, px, py)
                && best.is_none_or(|b| rings[o].area2 < rings[outers[b]].area2)
            {
                best = Some(k);
            }
        }
        // No outer ring around it cannot happen either; keep the area exact regardless.
        let k = best.or_else(|| (0..outers.len()).max_by_key(|&k| rings[outers[k]].area2));
        if let Some(k) = k {
            holes_of[k].push(i);
        }
    }
    let to_pt = |p: &(i64, i64)| [(p.0 + ox) as f64, (p.1 + oy) as f64];
    let polygons = outers
        .iter()
        .zip(&holes_of)
        .map(|(&o, hs)| {
            let mut poly: Polygon = vec![rings[o].pts.iter().map(to_pt).collect()];
            for &hi in hs {
                poly.push(rings[hi].pts.iter().map(to_pt).collect());
            }
            poly
        })
        .collect();
    (polygons, edges)
}

/// Whether the point (px/2, py/2) (odd doubled coordinates: a pixel centre) is inside the closed
/// ring `pts` (integer vertices), by counting crossings of a ray towards +x.
fn contains2(pts: &[(i64, i64)], px: i64, py: i64) -> bool {
    let mut inside = false;
    for e in pts.windows(2) {
        let (x0, y0) = (2 * e[0].0, 2 * e[0].1);
        let (x1, y1) = (2 * e[1].0, 2 * e[1].1);
        if (y0 > py) != (y1 > py) {
            // Crossing x at height py (edges are axis-parallel, so only vertical edges cross).
            let xc = if x0 == x1 {
                x0 as f64
            } else {
                x0 as f64 + (py - y0) as f64 * (x1 - x0) as f64 / (y1 - y0) as f64
            };
            if xc > px as f64 {
                inside = !inside;
            }
        }
    }
    inside
}

// ---------------------------------------------------------------------------------------------
// Writers

/// Sample depth of a label TIFF.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LabelBits {
    /// Unsigned 16-bit: ids up to 65,535; a larger id is an error.
    U16,
    /// Unsigned 32-bit: every id.
    U32,
}

impl LabelBits {
    fn bytes(self) -> usize {
        match self {
            LabelBits::U16 => 2,
            LabelBits::U32 => 4,
        }
    }
}

/// Rows per strip of the label TIFF.
pub const LABEL_ROWS_PER_STRIP: u32 = 64;

/// Writes a label image row by row as a single-channel unsigned-integer TIFF (deflate-compressed
/// strips of [`LABEL_ROWS_PER_STRIP`] rows, little-endian; BigTIFF when the uncompressed pixels
/// would not fit comfortably within 4 GiB). Only one strip is held in memory. The TIFF starts
/// at the writer's position when it is created.
pub struct LabelTiffWriter<W: Write + Seek> {
    w: W,
    path: PathBuf,
    width: u32,
    height: u32,
    bits: LabelBits,
    big: bool,
    mpp: Option<f64>,
    start: u64,
    pos: u64,
    strip: Vec<u8>,
    rows_in_strip: u32,
    rows: u32,
    offsets: Vec<u64>,
    counts: Vec<u64>,
}

impl<W: Write + Seek> LabelTiffWriter<W> {
    /// A 16-bit label TIFF (ids up to 65,535; see [`label_bits_for`]).
    pub fn create(writer: W, width: u32, height: u32) -> Result<Self> {
        Self::with_bits(writer, width, height, LabelBits::U16)
    }

    /// A 32-bit label TIFF.
    pub fn create32(writer: W, width: u32, height: u32) -> Result<Self> {
        Self::with_bits(writer, width, height, LabelBits::U32)
    }

    /// A label TIFF of the given depth.
    pub fn with_bits(mut writer: W, width: u32, height: u32, bits: LabelBits) -> Result<Self> {
        let path = PathBuf::from("label image");
        if width == 0 || height == 0 {
            return Err(Error::Invalid(format!(
                "label image: {width}x{height} has no pixels"
            )));
        }
        let raw = u64::from(width) * u64::from(height) * bits.bytes() as u64;
        let big = raw > (7u64 << 29); // 3.5 GiB
        let start = writer.stream_position().map_err(|e| Error::io(&path, e))?;
        let header: Vec<u8> = if big {
            let mut h = b"II".to_vec();
            h.extend_from_slice(&43u16.to_le_bytes());
            h.extend_from_slice(&8u16.to_le_bytes());
            h.extend_from_slice(&0u16.to_le_bytes());
            h.extend_from_slice(&0u64.to_le_bytes());
            h
        } else {
            let mut h = b"II".to_vec();
            h.extend_from_slice(&42u16.to_le_bytes());
            h.extend_from_slice(&0u32.to_le_bytes());
            h
        };
        writer.write_all(&header).map_err(|e| Error::io(&path, e))?;
        Ok(LabelTiffWriter {
            w: writer,
            path,
            width,
            height,
            bits,
            big,
            mpp: None,
            start,
            pos: header.len() as u64,
            strip: Vec::new(),
            rows_in_strip: 0,
            rows: 0,
            offsets: Vec::new(),
            counts: Vec::new(),
        })
    }

    /// The name used in error messages (the file's path).
    pub fn named(mut self, path: impl Into<PathBuf>) -> Self {
        self.path = path.into();
        self
    }

    /// Records the pixel size (microns per pixel) as the TIFF's resolution (pixels per
    /// centimetre). Ignored unless finite and positive.
    pub fn with_mpp(mut self, mpp: Option<f64>) -> Self {
        self.mpp = mpp.filter(|m| m.is_finite() && *m > 0.0);
        self
    }

    /// The depth being written.
    pub fn bits(&self) -> LabelBits {
        self.bits
    }

    /// Appends the next row (`width` labels).
    pub fn write_row(&mut self, row: &[u32]) -> Result<()> {
        if row.len() != self.width as usize {
            return Err(Error::Invalid(format!(
                "{}: label row {} has {} pixels, expected {}",
                self.path.display(),
                self.rows,
                row.len(),
                self.width
            )));
        }
        if self.rows >= self.height {
            return Err(Error::Invalid(format!(
                "{}: more than {} label rows written",
                self.path.display(),
                self.height
            )));
        }
        match self.bits {
            LabelBits::U16 => {
                for &v in row {
                    let Ok(s) = u16::try_from(v) else {
                        return Err(Error::Invalid(format!(
                            "{}: label {v} does not fit a 16-bit label image (ids up to 65535); \
                             write a 32-bit one",
                            self.path.display()
                        )));
                    };
                    self.strip.extend_from_slice(&s.to_le_bytes());
                }
            }
            LabelBits::U32 => {
                for &v in row {
                    self.strip.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
        self.rows += 1;
        self.rows_in_strip += 1;
        if self.rows_in_strip == LABEL_ROWS_PER_STRIP || self.rows == self.height {
            self.flush_strip()?;
        }
        Ok(())
    }

    fn flush_strip(&mut self) -> Result<()> {
        use tiff::encoder::compression::{CompressionAlgorithm, Deflate};
        let written = Deflate::default()
            .write_to(&mut self.w, &self.strip)
            .map_err(|e| Error::io(&self.path, e))?;
        self.offsets.push(self.pos);
        self.counts.push(written);
        self.pos += written;
        self.strip.clear();
        self.rows_in_strip = 0;
        Ok(())
    }

    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.w
            .write_all(bytes)
            .map_err(|e| Error::io(&self.path, e))?;
        self.pos += bytes.len() as u64;
        Ok(())
    }

    /// Writes the directory after the last row and returns the writer (flushed).
    pub fn finish(mut self) -> Result<W> {
        if self.rows != self.height {
            return Err(Error::Invalid(format!(
                "{}: {} of {} label rows written",
                self.path.display(),
                self.rows,
                self.height
            )));
        }
        if !self.big && self.pos > u64::from(u32::MAX) {
            return Err(Error::Invalid(format!(
                "{}: the compressed label image passed 4 GiB",
                self.path.display()
            )));
        }
        // Tag values: (tag, type, count, little-endian bytes).
        const SHORT: u16 = 3;
        const LONG: u16 = 4;
        const RATIONAL: u16 = 5;
        const ASCII: u16 = 2;
        const LONG8: u16 = 16;
        let short = |v: u16| v.to_le_bytes().to_vec();
        let long = |v: u32| v.to_le_bytes().to_vec();
        let offs_type = if self.big { LONG8 } else { LONG };
        let as_offsets = |vals: &[u64], big: bool| -> Vec<u8> {
            let mut b = Vec::new();
            for &v in vals {
                if big {
                    b.extend_from_slice(&v.to_le_bytes());
                } else {
                    b.extend_from_slice(&(v as u32).to_le_bytes());
                }
            }
            b
        };
        let mut tags: Vec<(u16, u16, u64, Vec<u8>)> = vec![
            (256, LONG, 1, long(self.width)),
            (257, LONG, 1, long(self.height)),
            (258, SHORT, 1, short(8 * self.bits.bytes() as u16)),
            (259, SHORT, 1, short(8)), // Adobe deflate
            (262, SHORT, 1, short(1)), // BlackIsZero
            (
                273,
                offs_type,
                self.offsets.len() as u64,
                as_offsets(&self.offsets, self.big),
            ),
            (277, SHORT, 1, short(1)),
            (278, LONG, 1, long(LABEL_ROWS_PER_STRIP)),
            (
                279,
                offs_type,
                self.counts.len() as u64,
                as_offsets(&self.counts, self.big),
            ),
        ];
        if let Some(mpp) = self.mpp {
            let (n, d) = rational(1e4 / mpp);
            let mut r = n.to_le_bytes().to_vec();
            r.extend_from_slice(&d.to_le_bytes());
            tags.push((282, RATIONAL, 1, r.clone()));
            tags.push((283, RATIONAL, 1, r));
            tags.push((296, SHORT, 1, short(3))); // centimetre
        }
        let software = b"medfastsam\0".to_vec();
        tags.push((305, ASCII, software.len() as u64, software));
        tags.push((339, SHORT, 1, short(1))); // unsigned integer
        tags.sort_by_key(|t| t.0);

        // Values too long for the entry go first, each on a word boundary.
        let inline = if self.big { 8 } else { 4 };
        let mut entries: Vec<(u16, u16, u64, Vec<u8>)> = Vec::with_capacity(tags.len());
        for (tag, ty, count, bytes) in tags {
            if bytes.len() <= inline {
                let mut v = bytes;
                v.resize(inline, 0);
                entries.push((tag, ty, count, v));
            } else {
                if self.pos % 2 == 1 {
                    self.put(&[0])?;
                }
                let at = self.pos;
                self.put(&bytes)?;
                let v = if self.big {
                    at.to_le_bytes().to_vec()
                } else {
                    (at as u32).to_le_bytes().to_vec()
                };
                entries.push((tag, ty, count, v));
            }
        }
        if self.pos % 2 == 1 {
            self.put(&[0])?;
        }
        let ifd = self.pos;
        if !self.big && ifd > u64::from(u32::MAX) - 512 {
            return Err(Error::Invalid(format!(
                "{}: the compressed label image passed 4 GiB",
                self.path.display()
            )));
        }
        let mut dir = Vec::new();
        if self.big {
            dir.extend_from_slice(&(entries.len() as u64).to_le_bytes());
        } else {
            dir.extend_from_slice(&(entries.len() as u16).to_le_bytes());
        }
        for (tag, ty, count, v) in &entries {
            dir.extend_from_slice(&tag.to_le_bytes());
            dir.extend_from_slice(&ty.to_le_bytes());
            if self.big {
                dir.extend_from_slice(&count.to_le_bytes());
            } else {
                dir.extend_from_slice(&(*count as u32).to_le_bytes());
            }
            dir.extend_from_slice(v);
        }
        if self.big {
            dir.extend_from_slice(&0u64.to_le_bytes());
        } else {
            dir.extend_from_slice(&0u32.to_le_bytes());
        }
        self.put(&dir)?;
        let end = self.start + self.pos;
        let path = self.path.clone();
        let io = |e| Error::io(&path, e);
        if self.big {
            self.w.seek(SeekFrom::Start(self.start + 8)).map_err(io)?;
            self.w.write_all(&ifd.to_le_bytes()).map_err(io)?;
        } else {
            self.w.seek(SeekFrom::Start(self.start + 4)).map_err(io)?;
            self.w.write_all(&(ifd as u32).to_le_bytes()).map_err(io)?;
        }
        self.w.seek(SeekFrom::Start(end)).map_err(io)?;
        self.w.flush().map_err(io)?;
        Ok(self.w)
    }
}

/// n/d close to `v` with both in u32.
fn rational(v: f64) -> (u32, u32) {
    let mut d: u32 = 1_000_000;
    while d > 1 && v * f64::from(d) > f64::from(u32::MAX) {
        d /= 10;
    }
    let n = (v * f64::from(d)).round().clamp(1.0, f64::from(u32::MAX)) as u32;
    (n, d)
}

/// The CSV header line (without the line break).
pub const CSV_HEADER: &str = "id,area_px,area_um2,centroid_x,centroid_y,bbox_x0,bbox_y0,bbox_x1,bbox_y1,perimeter_px,eccentricity,mean_r,mean_g,mean_b";

/// Writes one CSV line per object under [`CSV_HEADER`]. `area_um2` = area · mpp² when the pixel
/// size is known, empty otherwise. Centroids with 3 decimals, eccentricity 4, colours 2.
pub struct CsvWriter<W: Write> {
    w: W,
    path: PathBuf,
    mpp: Option<f64>,
    offset: (i64, i64),
}

impl<W: Write> CsvWriter<W> {
    /// Writes the header. `mpp`: microns per pixel, if known.
    pub fn new(mut writer: W, mpp: Option<f64>) -> Result<Self> {
        let path = PathBuf::from("objects CSV");
        writeln!(writer, "{CSV_HEADER}").map_err(|e| Error::io(&path, e))?;
        Ok(CsvWriter {
            w: writer,
            path,
            mpp: mpp.filter(|m| m.is_finite() && *m > 0.0),
            offset: (0, 0),
        })
    }

    /// The name used in error messages (the file's path).
    pub fn named(mut self, path: impl Into<PathBuf>) -> Self {
        self.path = path.into();
        self
    }

    /// Adds `(x, y)` to every coordinate (for a mask that is a region of a larger image).
    pub fn with_offset(mut self, x: i64, y: i64) -> Self {
        self.offset = (x, y);
        self
    }

    /// One line.
    pub fn write(&mut self, o: &Object) -> Result<()> {
        let area_um2 = self
            .mpp
            .map(|m| format!("{:.4}", o.area as f64 * m * m))
            .unwrap_or_default();
        let (dx, dy) = self.offset;
        writeln!(
            self.w,
            "{},{},{},{:.3},{:.3},{},{},{},{},{},{:.4},{:.2},{:.2},{:.2}",
            o.id,
            o.area,
            area_um2,
            o.centroid[0] + dx as f64,
            o.centroid[1] + dy as f64,
            i64::from(o.bbox[0]) + dx,
            i64::from(o.bbox[1]) + dy,
            i64::from(o.bbox[2]) + dx,
            i64::from(o.bbox[3]) + dy,
            o.perimeter,
            o.eccentricity,
            o.mean_rgb[0],
            o.mean_rgb[1],
            o.mean_rgb[2]
        )
        .map_err(|e| Error::io(&self.path, e))
    }

    /// Flushes and returns the writer.
    pub fn finish(mut self) -> Result<W> {
        self.w.flush().map_err(|e| Error::io(&self.path, e))?;
        Ok(self.w)
    }
}

/// Writes a GeoJSON FeatureCollection one feature at a time, in the form QuPath's object import
/// reads (QuPath 0.4 and later): a `Feature` with a UUID `id`, a `Polygon` (or `MultiPolygon` for
/// an object in several 4-connected parts) in image pixel coordinates, and `properties` with
/// `objectType: "detection"`, a `classification` (name and RGB colour) and `measurements` (a map
/// of name to number), plus `medfastsam_id`, the object's id in the label image and CSV.
pub struct GeoJsonWriter<W: Write> {
    w: W,
    path: PathBuf,
    mpp: Option<f64>,
    offset: (i64, i64),
    /// Geometry scale after the offset (a pyramid level's downsample, to level-0 pixels).
    scale: f64,
    class_name: String,
    color: [u8; 3],
    uuid_seed: u64,
    count: u64,
}

impl<W: Write> GeoJsonWriter<W> {
    /// Writes the collection's opening.
    pub fn new(mut writer: W) -> Result<Self> {
        let path = PathBuf::from("objects GeoJSON");
        writer
            .write_all(b"{\"type\":\"FeatureCollection\",\"features\":[")
            .map_err(|e| Error::io(&path, e))?;
        Ok(GeoJsonWriter {
            w: writer,
            path,
            mpp: None,
            offset: (0, 0),
            scale: 1.0,
            class_name: "Nucleus".to_string(),
            color: [32, 160, 255],
            uuid_seed: 0,
            count: 0,
        })
    }

    /// The name used in error messages (the file's path).
    pub fn named(mut self, path: impl Into<PathBuf>) -> Self {
        self.path = path.into();
        self
    }

    /// Microns per pixel, if known: adds an `Area µm^2` measurement.
    pub fn with_mpp(mut self, mpp: Option<f64>) -> Self {
        self.mpp = mpp.filter(|m| m.is_finite() && *m > 0.0);
        self
    }

    /// Adds `(x, y)` to every coordinate (for a mask that is a region of a larger image).
    pub fn with_offset(mut self, x: i64, y: i64) -> Self {
        self.offset = (x, y);
        self
    }

    /// Multiplies the geometry's coordinates (after the offset) by `f`: for a mask of a pyramid
    /// level whose downsample is `f`, the outlines land on the slide's full-resolution (level-0)
    /// pixels, where QuPath places imported objects. Measurements stay in the analysed pixels.
    pub fn with_downsample(mut self, f: f64) -> Self {
        if f.is_finite() && f > 0.0 {
            self.scale = f;
        }
        self
    }

    /// The classification given to every object (default "Nucleus").
    pub fn with_class(mut self, name: &str, color: [u8; 3]) -> Self {
        self.class_name = name.to_string();
        self.color = color;
        self
    }

    /// Seed of the features' UUIDs (default 0). The UUID is a function of the seed and the
    /// object's id, so the same image and options give the same file; give different images
    /// different seeds (a hash of the name) so that their objects' UUIDs differ.
    pub fn with_uuid_seed(mut self, seed: u64) -> Self {
        self.uuid_seed = seed;
        self
    }

    /// Features written so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// One feature.
    pub fn write(&mut self, o: &Object) -> Result<()> {
        let (dx, dy) = (self.offset.0 as f64, self.offset.1 as f64);
        let k = self.scale;
        let ring = |r: &Ring| -> serde_json::Value {
            r.iter()
                .map(|p| serde_json::json!([(p[0] + dx) * k, (p[1] + dy) * k]))
                .collect()
        };
        let poly = |p: &Polygon| -> serde_json::Value { p.iter().map(ring).collect() };
        let geometry = if o.polygons.len() == 1 {
            serde_json::json!({"type": "Polygon", "coordinates": poly(&o.polygons[0])})
        } else {
            let parts: Vec<serde_json::Value> = o.polygons.iter().map(poly).collect();
            serde_json::json!({"type": "MultiPolygon", "coordinates": parts})
        };
        let mut m = serde_json::Map::new();
        let mut put = |k: &str, v: f64| {
            if v.is_finite() {
                m.insert(k.to_string(), serde_json::json!(v));
            }
        };
        put("Area px", o.area as f64);
        if let Some(mpp) = self.mpp {
            put("Area µm^2", o.area as f64 * mpp * mpp);
        }
        put("Perimeter px", o.perimeter);
        put("Eccentricity", o.eccentricity);
        put("Centroid X px", o.centroid[0] + dx);
        put("Centroid Y px", o.centroid[1] + dy);
        put("Mean R", o.mean_rgb[0]);
        put("Mean G", o.mean_rgb[1]);
        put("Mean B", o.mean_rgb[2]);
        let feature = serde_json::json!({
            "type": "Feature",
            "id": uuid_for(self.uuid_seed, o.id),
            "geometry": geometry,
            "properties": {
                "objectType": "detection",
                "classification": {"name": self.class_name, "color": self.color},
                "measurements": m,
                "medfastsam_id": o.id,
            }
        });
        let sep: &[u8] = if self.count == 0 { b"\n" } else { b",\n" };
        self.w
            .write_all(sep)
            .map_err(|e| Error::io(&self.path, e))?;
        serde_json::to_writer(&mut self.w, &feature)
            .map_err(|e| Error::io(&self.path, std::io::Error::other(e)))?;
        self.count += 1;
        Ok(())
    }

    /// Closes the collection, flushes and returns the writer.
    pub fn finish(mut self) -> Result<W> {
        self.w
            .write_all(b"\n]}\n")
            .and_then(|_| self.w.flush())
            .map_err(|e| Error::io(&self.path, e))?;
        Ok(self.w)
    }
}

/// The UUID seed ([`GeoJsonWriter::with_uuid_seed`]) of an image's objects: FNV-1a 64 of the
/// image's output base name (`<name>_objects.geojson`), so that objects of different images get
/// different UUIDs and the same image gets the same ones in every run, from the command line or
/// the web page alike.
pub fn uuid_seed(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// A version-4-shaped UUID made from (seed, id) by a fixed mixing function.
fn uuid_for(seed: u64, id: u32) -> String {
    fn mix(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    let hi = mix(seed ^ mix(u64::from(id)));
    let lo = mix(hi ^ u64::from(id).rotate_left(32) ^ 0x6D65_6466_6173_7473);
    let hi = (hi & !0xF000) | 0x4000; // version 4
    let lo = (lo & !(0b11 << 62)) | (0b10 << 62); // RFC 4122 variant
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        hi >> 32,
        (hi >> 16) & 0xFFFF,
        hi & 0xFFFF,
        lo >> 48,
        lo & 0xFFFF_FFFF_FFFF
    )
}

/// A sink that writes whichever of the three outputs are present.
pub struct WriterSink<T: Write + Seek, C: Write, G: Write> {
    pub labels: Option<LabelTiffWriter<T>>,
    pub csv: Option<CsvWriter<C>>,
    pub geojson: Option<GeoJsonWriter<G>>,
}

impl<T: Write + Seek, C: Write, G: Write> WriterSink<T, C, G> {
    /// Finishes each writer and returns the underlying writers.
    pub fn finish(self) -> Result<(Option<T>, Option<C>, Option<G>)> {
        let t = self.labels.map(|w| w.finish()).transpose()?;
        let c = self.csv.map(|w| w.finish()).transpose()?;
        let g = self.geojson.map(|w| w.finish()).transpose()?;
        Ok((t, c, g))
    }
}

impl<T: Write + Seek, C: Write, G: Write> InstanceSink for WriterSink<T, C, G> {
    fn object(&mut self, obj: &Object) -> Result<()> {
        if let Some(c) = self.csv.as_mut() {
            c.write(obj)?;
        }
        if let Some(g) = self.geojson.as_mut() {
            g.write(obj)?;
        }
        Ok(())
    }
    fn label_row(&mut self, _y: usize, labels: &[u32]) -> Result<()> {
        if let Some(t) = self.labels.as_mut() {
            t.write_row(labels)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn brute_edt(inside: &[bool], w: usize, h: usize) -> Vec<u64> {
        let mut out = vec![u64::MAX; w * h];
        for y in 0..h {
            for x in 0..w {
                let mut best = f64::INFINITY;
                for yy in 0..h {
                    for xx in 0..w {
                        if !inside[yy * w + xx] {
                            let dx = x as f64 - xx as f64;
                            let dy = y as f64 - yy as f64;
                            best = best.min(dx * dx + dy * dy);
                        }
                    }
                }
                if best.is_finite() {
                    out[y * w + x] = best as u64;
                }
            }
        }
        out
    }

    #[test]
    fn edt_matches_brute_force() {
        let mut rng = Rng::new(7);
        for case in 0..300 {
            let w = 1 + rng.below(23);
            let h = 1 + rng.below(19);
            let p = [0.5, 0.8, 0.95, 0.99, 1.0][case % 5];
            let inside: Vec<bool> = (0..w * h).map(|_| rng.uniform() < p).collect();
            let got = squared_distance_transform(&inside, w, h);
            assert_eq!(got, brute_edt(&inside, w, h), "case {case} {w}x{h}");
        }
    }

    fn shoelace2(r: &Ring) -> f64 {
        r.windows(2)
            .map(|p| p[0][0] * p[1][1] - p[1][0] * p[0][1])
            .sum()
    }

    #[test]
    fn outlines_have_exact_area_and_orientation() {
        let mut rng = Rng::new(11);
        for case in 0..400 {
            let w = 1 + rng.below(12);
            let h = 1 + rng.below(12);
            let p = [0.3, 0.5, 0.7, 0.9][case % 4];
            let inside: Vec<bool> = (0..w * h).map(|_| rng.uniform() < p).collect();
            let area = inside.iter().filter(|&&b| b).count();
            let (polys, edges) = trace_outline(&inside, w, h, 3, -2);
            let mut total = 0.0;
            let mut len = 0.0;
            for poly in &polys {
                assert!(shoelace2(&poly[0]) > 0.0, "outer ring orientation");
                for (k, ring) in poly.iter().enumerate() {
                    assert!(
                        ring.len() >= 5,
                        "a ring has at least 4 corners + closing point"
                    );
                    assert_eq!(ring.first(), ring.last(), "closed");
                    if k > 0 {
                        assert!(shoelace2(ring) < 0.0, "hole orientation");
                    }
                    total += shoelace2(ring) / 2.0;
                    for (i, s) in ring.windows(2).enumerate() {
                        // Axis-parallel, non-degenerate, and no collinear middle points.
                        let (dx, dy) = (s[1][0] - s[0][0], s[1][1] - s[0][1]);
                        assert!((dx == 0.0) != (dy == 0.0), "axis-parallel step {s:?}");
                        len += dx.abs() + dy.abs();
                        let next = &ring[(i + 2) % ring.len().max(1)];
                        if i + 2 < ring.len() {
                            let (ex, ey) = (next[0] - s[1][0], next[1] - s[1][1]);
                            assert!(dx * ey - dy * ex != 0.0, "collinear point in {ring:?}");
                        }
                    }
                }
            }
            assert_eq!(total, area as f64, "case {case}: {inside:?}");
            assert_eq!(len, edges as f64);
        }
    }

    #[test]
    fn diagonal_pixels_are_two_parts_and_a_ring_is_one_polygon_with_a_hole() {
        // Two pixels touching at a corner.
        let inside = [true, false, false, true];
        let (polys, edges) = trace_outline(&inside, 2, 2, 0, 0);
        assert_eq!(polys.len(), 2);
        assert_eq!(edges, 8);
        assert_eq!(
            polys[0][0],
            vec![[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.0, 0.0]]
        );
        // A 3x3 square with its centre missing.
        let mut inside = [true; 9];
        inside[4] = false;
        let (polys, edges) = trace_outline(&inside, 3, 3, 10, 20);
        assert_eq!(polys.len(), 1);
        assert_eq!(polys[0].len(), 2);
        assert_eq!(edges, 16);
        assert_eq!(
            polys[0][1],
            vec![
                [11.0, 21.0],
                [11.0, 22.0],
                [12.0, 22.0],
                [12.0, 21.0],
                [11.0, 21.0]
            ]
        );
    }

    #[test]
    fn uuids_are_well_formed_and_distinct() {
        let a = uuid_for(0, 1);
        let b = uuid_for(0, 2);
        let c = uuid_for(1, 1);
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
        assert!(matches!(&a[19..20], "8" | "9" | "a" | "b"), "{a}");
        assert_eq!(a, uuid_for(0, 1));
    }
}
