//! End-to-end segmentation of one image, shared by the command line and the web page: decode →
//! stretch to S×S → GPU forward → logits resized bilinearly to the original size → mask = logit > 0.

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::io::{GrayImage, RgbImage};
use crate::model::{Config, MedFastSam, Precision, Variant, Weights};
use crate::ops::resize::bilinear;

/// One image's result, at the image's original resolution.
pub struct Segmentation {
    /// 0/255 mask (logit > 0).
    pub mask: GrayImage,
    /// The Otsu coarse prompt (0/255), nearest-resized to the original resolution.
    pub coarse: GrayImage,
    /// Otsu threshold t*/255.
    pub threshold: f32,
    /// Logits at the original resolution.
    pub logits: Vec<f32>,
}

pub struct Segmenter<'g> {
    pub gpu: &'g Gpu,
    pub model: MedFastSam,
}

impl<'g> Segmenter<'g> {
    /// Loads weights onto the device. The configuration is `cfg` if given, else the file's
    /// metadata, else inferred from the tensor shapes (at 1024²); the variant likewise (default
    /// `paper`).
    pub fn new(
        gpu: &'g Gpu,
        weights: &Weights,
        cfg: Option<&Config>,
        variant: Option<Variant>,
    ) -> Result<Self> {
        Self::with_precision(gpu, weights, cfg, variant, Precision::F32)
    }

    /// [`Segmenter::new`] with the GEMM weights stored at `precision` ([`Precision`]).
    pub fn with_precision(
        gpu: &'g Gpu,
        weights: &Weights,
        cfg: Option<&Config>,
        variant: Option<Variant>,
        precision: Precision,
    ) -> Result<Self> {
        let cfg = weights.resolve_config(cfg, 1024)?;
        crate::model::memory::check_forward(gpu, &cfg, 1)?;
        let variant = variant.or(weights.variant).unwrap_or_default();
        let model = MedFastSam::with_precision(gpu, weights, &cfg, variant, precision)?;
        Ok(Segmenter { gpu, model })
    }

    /// Segments one image (batch of one), reading back only the final logits and the coarse prompt.
    pub async fn segment_async(&self, img: &RgbImage) -> Result<Segmentation> {
        let s = self.model.cfg.image_size;
        let (w0, h0) = (img.width, img.height);
        if w0 == 0 || h0 == 0 {
            return Err(Error::Invalid("empty image".into()));
        }
        crate::model::memory::check(
            self.gpu,
            &format!("segmenting a {w0}x{h0} image at {s}x{s}"),
            crate::model::memory::forward(&self.model.cfg, 1, w0, h0),
        )?;
        let resized = img.resize(s, s);
        let px = self.gpu.upload_u32(&resized.packed(), &[1, s, s])?;
        let mut rec = self.gpu.new_recorder();
        let out = self.model.forward(&mut rec, &px, false)?;
        let full = bilinear(&mut rec, &out.logits, h0, w0)?;
        rec.submit()?;
        let logits = self.gpu.read_async(&full).await?;
        let coarse = self.gpu.read_async(&out.coarse).await?;
        let threshold = self.gpu.read_async(&out.threshold).await?[0];
        // A NaN or infinite logit is not "background": it means the weights or the arithmetic
        // overflowed, and no mask may be made of it.
        if let Some(bad) = logits.iter().position(|v| !v.is_finite()) {
            let n = logits.iter().filter(|v| !v.is_finite()).count();
            return Err(Error::Invalid(format!(
                "the model produced non-finite logits ({n} of {} values, first {} at pixel {}): the weights \
                 are corrupt or too large for f32 arithmetic; no mask was written",
                logits.len(),
                logits[bad],
                bad
            )));
        }
        let mask = GrayImage {
            width: w0,
            height: h0,
            data: logits
                .iter()
                .map(|&v| if v > 0.0 { 255 } else { 0 })
                .collect(),
        };
        let coarse = GrayImage {
            width: s,
            height: s,
            data: coarse
                .iter()
                .map(|&v| if v > 0.5 { 255 } else { 0 })
                .collect(),
        }
        .resize_nearest(w0, h0);
        Ok(Segmentation {
            mask,
            coarse,
            threshold,
            logits,
        })
    }

    #[cfg(not(target_arch = "wasm32"))]
    pub fn segment(&self, img: &RgbImage) -> Result<Segmentation> {
        pollster::block_on(self.segment_async(img))
    }
}

// ---------------------------------------------------------------- tiled (whole images at native scale)

/// How [`Segmenter::segment_tiled`] lays out and prompts its windows.
#[derive(Clone, Copy, Debug)]
pub struct TileOptions {
    /// Pixels shared by neighbouring windows (at most half the model's input size).
    pub overlap: usize,
    /// One Otsu threshold for the whole image (chosen on the whole image) instead of one per
    /// window as the paper's CP-Encoder does per input.
    pub global_otsu: bool,
    /// Windows per forward (1 = one at a time); bounded by the device's memory.
    pub batch: usize,
}

/// What a tiled segmentation did.
#[derive(Clone, Debug)]
pub struct TiledStats {
    pub tiles: usize,
    /// The global threshold index t* (0..=255) with [`TileOptions::global_otsu`].
    pub global_t: Option<u32>,
    pub seconds: f64,
}

/// The Otsu threshold index t* of a whole image under `rule`, on the GPU; images above the
/// kernel's pixel limit are first subsampled (nearest) to fit it.
#[cfg(not(target_arch = "wasm32"))]
pub fn global_otsu_index(
    gpu: &Gpu,
    img: &RgbImage,
    rule: crate::ops::otsu::OtsuRule,
) -> Result<u32> {
    global_otsu_index_rows(gpu, &mut crate::stream::MemoryRows::new(img), rule)
}

/// [`global_otsu_index`] of an image read row by row (every f-th row and column kept, f the
/// smallest factor that fits the kernel's pixel limit).
#[cfg(not(target_arch = "wasm32"))]
pub fn global_otsu_index_rows(
    gpu: &Gpu,
    src: &mut dyn crate::stream::RowSource,
    rule: crate::ops::otsu::OtsuRule,
) -> Result<u32> {
    let max = crate::ops::otsu::MAX_PIXELS_PER_IMAGE;
    let (w, h) = (src.width(), src.height());
    let f = ((w * h) as f64 / max as f64).sqrt().ceil().max(1.0) as usize;
    let (sw, sh) = (w.div_ceil(f), h.div_ceil(f));
    let mut packed: Vec<u32> = Vec::with_capacity(sw * sh);
    let mut row = vec![0u8; w * 3];
    for y in 0..h {
        src.read_row(&mut row)?;
        if y % f == 0 {
            packed.extend(
                row.chunks_exact(3)
                    .step_by(f)
                    .map(|p| p[0] as u32 | (p[1] as u32) << 8 | (p[2] as u32) << 16),
            );
        }
    }
    let px = gpu.upload_u32(&packed, &[1, sh, sw])?;
    let x = gpu.empty(&[1, sh, sw, 3])?;
    let mut rec = gpu.new_recorder();
    let (thr, _mask) = crate::ops::otsu::otsu(&mut rec, &px, &x, rule)?;
    rec.submit()?;
    let t = gpu.read(&thr)?[0];
    Ok((t * 255.0).round() as u32)
}

/// Seconds on a wall clock with an arbitrary origin, on every target (std's clock does not exist
/// in the browser).
fn wall_seconds() -> f64 {
    #[cfg(not(target_arch = "wasm32"))]
    {
        static ORIGIN: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        ORIGIN
            .get_or_init(std::time::Instant::now)
            .elapsed()
            .as_secs_f64()
    }
    #[cfg(all(target_arch = "wasm32", feature = "web"))]
    {
        js_sys::Date::now() / 1e3
    }
    #[cfg(all(target_arch = "wasm32", not(feature = "web")))]
    {
        0.0
    }
}

/// Each window's Otsu coarse prompt, handed to `(ix, iy, coarse)` (S×S, row-major, 1 =
/// foreground) by [`Segmenter::segment_tiled_rows_async`] when asked for.
pub type CoarseHook<'a> = &'a mut dyn FnMut(usize, usize, &[f32]);

impl Segmenter<'_> {
    /// The tiling loop, the one implementation behind the command line's
    /// [`Segmenter::segment_tiled_rows`] (which runs it to completion with `pollster`) and the web
    /// page's worker (which awaits it, its GPU reads being asynchronous there). Windows of the
    /// model's input size S over the image read from `src`, [`TileOptions::batch`] per forward,
    /// blended row of windows by row of windows: the blended logits go to `on_row(y, logits, rgb)`
    /// in row order, `on_tile(done, total)` is called after each forward, and with `on_coarse`
    /// each window's coarse prompt is read back too and handed over. Non-finite logits are an
    /// error naming the window.
    pub async fn segment_tiled_rows_async(
        &self,
        src: &mut dyn crate::stream::RowSource,
        opts: &TileOptions,
        global_t: Option<u32>,
        mut on_row: impl FnMut(usize, &[f32], &[u8]) -> Result<()>,
        mut on_tile: impl FnMut(usize, usize),
        mut on_coarse: Option<CoarseHook<'_>>,
    ) -> Result<TiledStats> {
        let t0 = wall_seconds();
        let s = self.model.cfg.image_size;
        let plan = crate::tile::TilePlan::new(src.width(), src.height(), s, opts.overlap)?;
        if opts.global_otsu && global_t.is_none() {
            return Err(Error::Invalid(
                "segment_tiled_rows: --global-otsu needs the threshold of the whole image".into(),
            ));
        }
        let global_t = global_t.filter(|_| opts.global_otsu);
        let batch = opts.batch.max(1);
        let mut blend = crate::tile::Blender::new(&plan);
        let mut band = crate::stream::Band::new(plan.width);
        let total = plan.count();
        let mut done = 0;
        let fixed = match global_t {
            Some(t) => Some(crate::model::med_fastsam::FixedOtsu::new(
                self.gpu, t, batch,
            )?),
            None => None,
        };
        let mut fixed_last: Option<crate::model::med_fastsam::FixedOtsu> = None;
        for iy in 0..plan.ys.len() {
            let (r0, r1) = plan.band_rows(iy);
            band.advance(src, r0, r1)?;
            let row: Vec<usize> = (0..plan.xs.len()).collect();
            for chunk in row.chunks(batch) {
                let b = chunk.len();
                let mut packed = Vec::with_capacity(b * s * s);
                for &ix in chunk {
                    packed.extend(plan.window_from(|y| band.row(y), ix, iy).packed());
                }
                let px = self.gpu.upload_u32(&packed, &[b, s, s])?;
                let mut rec = self.gpu.new_recorder();
                // The fixed threshold is uploaded once for full batches (and once more for the
                // shorter last batch of a row).
                let f = match global_t {
                    None => None,
                    Some(_) if b == batch => fixed.as_ref(),
                    Some(t) => {
                        if fixed_last.as_ref().is_none_or(|f| f.batch() != b) {
                            fixed_last =
                                Some(crate::model::med_fastsam::FixedOtsu::new(self.gpu, t, b)?);
                        }
                        fixed_last.as_ref()
                    }
                };
                let out = match f {
                    Some(f) => self.model.forward_fixed_otsu(&mut rec, &px, f)?,
                    None => self.model.forward(&mut rec, &px, false)?,
                };
                rec.submit()?;
                let logits = self.gpu.read_async(&out.logits).await?;
                let coarse = match on_coarse {
                    Some(_) => Some(self.gpu.read_async(&out.coarse).await?),
                    None => None,
                };
                for (k, &ix) in chunk.iter().enumerate() {
                    let l = &logits[k * s * s..(k + 1) * s * s];
                    if let Some(bad) = l.iter().find(|v| !v.is_finite()) {
                        return Err(Error::Invalid(format!(
                            "the model produced non-finite logits (e.g. {bad}) in the window at x {}, y {}: the \
                             weights are corrupt or too large for f32 arithmetic; no mask was written",
                            plan.xs[ix], plan.ys[iy]
                        )));
                    }
                    blend.add(ix, iy, l);
                    if let (Some(hook), Some(c)) = (on_coarse.as_mut(), coarse.as_ref()) {
                        hook(ix, iy, &c[k * s * s..(k + 1) * s * s]);
                    }
                }
                done += b;
                on_tile(done, total);
            }
            blend.finish_row(iy, |y, logits| on_row(y, logits, band.row(y)))?;
        }
        Ok(TiledStats {
            tiles: total,
            global_t,
            seconds: (wall_seconds() - t0).max(0.0),
        })
    }
}

#[cfg(not(target_arch = "wasm32"))]
impl Segmenter<'_> {
    /// Segments `img` at its own pixel scale in windows of the model's input size S (see
    /// [`crate::tile`]): the blended logits are handed to `on_row(y, logits, rgb)` in row order,
    /// one band of windows at a time (memory: one band of S rows); `on_tile(done, total)` after
    /// each forward. Non-finite logits are an error naming the window.
    pub fn segment_tiled(
        &self,
        img: &RgbImage,
        opts: &TileOptions,
        on_row: impl FnMut(usize, &[f32], &[u8]) -> Result<()>,
        on_tile: impl FnMut(usize, usize),
    ) -> Result<TiledStats> {
        let global_t = if opts.global_otsu {
            Some(global_otsu_index(self.gpu, img, self.model.otsu_rule())?)
        } else {
            None
        };
        let mut src = crate::stream::MemoryRows::new(img);
        self.segment_tiled_rows(&mut src, opts, global_t, on_row, on_tile)
    }

    /// [`Segmenter::segment_tiled`] of an image read row by row, with the global threshold index
    /// (see [`global_otsu_index_rows`]) given when [`TileOptions::global_otsu`] is set. Host
    /// memory: the band of rows one row of windows reads and its blended logits. Runs
    /// [`Segmenter::segment_tiled_rows_async`] to completion.
    pub fn segment_tiled_rows(
        &self,
        src: &mut dyn crate::stream::RowSource,
        opts: &TileOptions,
        global_t: Option<u32>,
        on_row: impl FnMut(usize, &[f32], &[u8]) -> Result<()>,
        on_tile: impl FnMut(usize, usize),
    ) -> Result<TiledStats> {
        pollster::block_on(
            self.segment_tiled_rows_async(src, opts, global_t, on_row, on_tile, None),
        )
    }

    /// The logits of one S×S image at the model's input size (no resizing), for checks against
    /// [`Segmenter::segment_tiled`].
    pub fn logits_at_model_size(&self, img: &RgbImage) -> Result<Vec<f32>> {
        let s = self.model.cfg.image_size;
        if (img.width, img.height) != (s, s) {
            return Err(Error::Invalid(format!(
                "logits_at_model_size: the image is {}x{}, the model's input {s}x{s}",
                img.width, img.height
            )));
        }
        let px = self.gpu.upload_u32(&img.packed(), &[1, s, s])?;
        let mut rec = self.gpu.new_recorder();
        let out = self.model.forward(&mut rec, &px, false)?;
        rec.submit()?;
        self.gpu.read(&out.logits)
    }
}

// ---------------------------------------------------------------- prompted (MobileSAM, LiteMedSAM)

use crate::gpu::Tensor;
use crate::model::sam::{
    Frame, LabelledPoint, MaskChoice, Prompt, Sam, encoder_input, postprocess,
};

/// An image encoded once, ready for any number of prompts.
pub struct Encoded {
    pub emb: Tensor,
    pub frame: Frame,
}

/// One prompt's answer at the image's original resolution.
pub struct PromptMask {
    /// Logits of the chosen mask.
    pub logits: Vec<f32>,
    /// Predicted IoU of every mask token (token 0 = single-mask output).
    pub iou: Vec<f32>,
    /// The chosen token.
    pub chosen: usize,
    /// With `all`, the logits of every mask token (original resolution).
    pub all: Vec<Vec<f32>>,
}

/// One prompt's answer among several: its mask, or an error naming the prompt's index (non-finite
/// logits).
pub type PromptAnswer = std::result::Result<PromptMask, (usize, Error)>;

/// MobileSAM / LiteMedSAM with prompts: the encoder once per image, the decoder once per batch of
/// prompts ([`PromptSegmenter::decode_many_async`]).
pub struct PromptSegmenter<'g> {
    pub gpu: &'g Gpu,
    pub model: Sam,
}

impl<'g> PromptSegmenter<'g> {
    pub fn new(gpu: &'g Gpu, weights: &Weights, cfg: &Config) -> Result<Self> {
        Self::with_precision(gpu, weights, cfg, Precision::F32)
    }

    /// [`PromptSegmenter::new`] with the GEMM weights stored at `precision` ([`Precision`]).
    pub fn with_precision(
        gpu: &'g Gpu,
        weights: &Weights,
        cfg: &Config,
        precision: Precision,
    ) -> Result<Self> {
        crate::model::memory::check_forward(gpu, cfg, 1)?;
        Ok(PromptSegmenter {
            gpu,
            model: Sam::with_precision(gpu, weights, cfg, precision)?,
        })
    }

    /// Resizes (longest side to S, as Pillow's bilinear filter does), normalises, pads and runs
    /// the image encoder.
    pub async fn encode_async(&self, img: &RgbImage) -> Result<Encoded> {
        let cfg = &self.model.cfg;
        let s = cfg.image_size;
        if img.width == 0 || img.height == 0 {
            return Err(Error::Invalid("empty image".into()));
        }
        let frame = Frame::new(img.width, img.height, s);
        let resized = img.resize_pil_bilinear(frame.resized.0, frame.resized.1);
        let x = encoder_input(cfg, &resized)?;
        let x = self.gpu.upload(&x, &[1, s, s, 3])?;
        let mut rec = self.gpu.new_recorder();
        let emb = self.model.encode(&mut rec, &x)?;
        rec.submit()?;
        Ok(Encoded { emb, frame })
    }

    /// Decodes one prompt (original pixel coordinates) and post-processes its masks to the
    /// original size.
    pub async fn decode_async(
        &self,
        e: &Encoded,
        prompt: &Prompt,
        choice: MaskChoice,
        all: bool,
    ) -> Result<PromptMask> {
        let mut v = self
            .decode_many_async(e, std::slice::from_ref(prompt), choice, all)
            .await?;
        v.pop().expect("one answer per prompt").map_err(|(_, e)| e)
    }

    /// Decodes every prompt of `prompts` on one encoded image, as [`Self::decode_async`] does
    /// each alone (the same masks, IoU predictions and choices), but in few decoder passes:
    /// prompts with the same number of points (every box prompt: two corners) share passes of up
    /// to [`Sam::max_decode_batch`] prompts, and only the mask tokens some prompt chose (all with
    /// `all`) are read back (only token 0's are made when every prompt of a pass must choose it,
    /// see [`MaskChoice::fixed`]). The outer error is a device error; each prompt's own answer is an
    /// error `(k, e)` naming its index when its logits are not finite.
    pub async fn decode_many_async(
        &self,
        e: &Encoded,
        prompts: &[Prompt],
        choice: MaskChoice,
        all: bool,
    ) -> Result<Vec<PromptAnswer>> {
        let pts: Vec<_> = prompts.iter().map(|p| p.labelled(e.frame.scale)).collect();
        let mut out: Vec<Option<PromptAnswer>> = (0..prompts.len()).map(|_| None).collect();
        // Groups of prompts with as many points, in order of first appearance.
        let mut groups: Vec<(usize, Vec<usize>)> = Vec::new();
        for (k, p) in pts.iter().enumerate() {
            match groups.iter_mut().find(|(n, _)| *n == p.len()) {
                Some((_, g)) => g.push(k),
                None => groups.push((p.len(), vec![k])),
            }
        }
        let max = self.model.max_decode_batch(self.gpu);
        let cfg = &self.model.cfg;
        let lr = cfg.lowres();
        for (_, group) in &groups {
            for chunk in group.chunks(max) {
                let b = chunk.len();
                let batch: Vec<&[LabelledPoint]> = chunk.iter().map(|&k| &pts[k][..]).collect();
                let mut rec = self.gpu.new_recorder();
                // Token 0's masks alone when every prompt's choice is known to be token 0
                // (boxes): the other tokens' hypernetworks and mask products are skipped.
                let only_first = !all && chunk.iter().all(|&k| choice.fixed(&pts[k]) == Some(0));
                let dec = self
                    .model
                    .decode_prompts_with(&mut rec, &e.emb, &batch, None, only_first)?;
                rec.submit()?;
                let iou = self.gpu.read_async(&dec.iou).await?;
                let nt = iou.len() / b;
                let chosen: Vec<usize> = chunk
                    .iter()
                    .enumerate()
                    .map(|(i, &k)| choice.pick(&iou[i * nt..(i + 1) * nt], &pts[k]))
                    .collect();
                // The tokens to read: every one with `all`, else those some prompt chose.
                let mut lows: Vec<Option<Vec<f32>>> = vec![None; dec.masks.len()];
                for (t, m) in dec.masks.iter().enumerate() {
                    if all || chosen.contains(&t) {
                        lows[t] = Some(self.gpu.read_async(m).await?);
                    }
                }
                for (i, &k) in chunk.iter().enumerate() {
                    let low = |t: usize| {
                        &lows[t].as_ref().expect("token read")[i * lr * lr..(i + 1) * lr * lr]
                    };
                    let tokens: Vec<usize> = if all {
                        (0..dec.masks.len()).collect()
                    } else {
                        vec![chosen[i]]
                    };
                    let res = if tokens
                        .iter()
                        .any(|&t| low(t).iter().any(|v| !v.is_finite()))
                    {
                        Err((k, Error::Invalid(
                            "the model produced non-finite logits: the weights are corrupt or too large for f32 arithmetic; no mask was written".into(),
                        )))
                    } else {
                        let mut logits = Vec::new();
                        let mut every = Vec::new();
                        for t in tokens {
                            let full = postprocess(cfg, low(t), &e.frame);
                            if t == chosen[i] {
                                logits = full.clone();
                            }
                            if all {
                                every.push(full);
                            }
                        }
                        Ok(PromptMask {
                            logits,
                            iou: iou[i * nt..(i + 1) * nt].to_vec(),
                            chosen: chosen[i],
                            all: every,
                        })
                    };
                    out[k] = Some(res);
                }
            }
        }
        Ok(out
            .into_iter()
            .map(|r| r.expect("every prompt decoded"))
            .collect())
    }

    /// Encodes `img` once and decodes one box prompt per entry of `boxes` (original pixels,
    /// batched as [`Self::decode_many_async`] does), merging the chosen masks: the logit of each
    /// pixel is the largest over the boxes (`f32::NEG_INFINITY` everywhere when there is no box).
    pub async fn segment_boxes_async(
        &self,
        img: &RgbImage,
        boxes: &[[f32; 4]],
    ) -> Result<Vec<f32>> {
        let mut union = vec![f32::NEG_INFINITY; img.width * img.height];
        if boxes.is_empty() {
            return Ok(union);
        }
        let enc = self.encode_async(img).await?;
        let prompts: Vec<Prompt> = boxes
            .iter()
            .map(|b| Prompt {
                points: vec![],
                bbox: Some(*b),
            })
            .collect();
        let masks = self
            .decode_many_async(&enc, &prompts, MaskChoice::Auto, false)
            .await
            .map_err(|e| Error::Invalid(format!("decoding {} boxes: {e}", boxes.len())))?;
        for m in masks {
            let m = m.map_err(|(k, e)| Error::Invalid(format!("box {k} {:?}: {e}", boxes[k])))?;
            for (u, &v) in union.iter_mut().zip(&m.logits) {
                *u = u.max(v);
            }
        }
        Ok(union)
    }

    #[cfg(not(target_arch = "wasm32"))]
    pub fn segment_boxes(&self, img: &RgbImage, boxes: &[[f32; 4]]) -> Result<Vec<f32>> {
        pollster::block_on(self.segment_boxes_async(img, boxes))
    }

    #[cfg(not(target_arch = "wasm32"))]
    pub fn encode(&self, img: &RgbImage) -> Result<Encoded> {
        pollster::block_on(self.encode_async(img))
    }

    #[cfg(not(target_arch = "wasm32"))]
    pub fn decode(
        &self,
        e: &Encoded,
        prompt: &Prompt,
        choice: MaskChoice,
        all: bool,
    ) -> Result<PromptMask> {
        pollster::block_on(self.decode_async(e, prompt, choice, all))
    }

    #[cfg(not(target_arch = "wasm32"))]
    pub fn decode_many(
        &self,
        e: &Encoded,
        prompts: &[Prompt],
        choice: MaskChoice,
        all: bool,
    ) -> Result<Vec<PromptAnswer>> {
        pollster::block_on(self.decode_many_async(e, prompts, choice, all))
    }
}

/// The CP-Encoder's Otsu coarse prompt of an image at its own resolution, computed on the GPU by
/// the model's kernel with the paper's rule (grey = 0.2989 R + 0.5870 G + 0.1140 B, 256-bin
/// histogram, foreground at or above the threshold): true = foreground.
pub async fn coarse_prompt_async(gpu: &Gpu, img: &RgbImage) -> Result<Vec<bool>> {
    let (w, h) = (img.width, img.height);
    if w == 0 || h == 0 {
        return Err(Error::Invalid("empty image".into()));
    }
    let px = gpu.upload_u32(&img.packed(), &[1, h, w])?;
    let mut rec = gpu.new_recorder();
    // The paper rule reads only the packed pixels; the normalised input is shape-checked.
    let x = gpu.empty(&[1, h, w, 3])?;
    let (_t, mask) = crate::ops::otsu::otsu(&mut rec, &px, &x, crate::ops::otsu::OtsuRule::Paper)?;
    rec.submit()?;
    Ok(gpu
        .read_async(&mask)
        .await?
        .iter()
        .map(|&v| v > 0.5)
        .collect())
}

#[cfg(not(target_arch = "wasm32"))]
pub fn coarse_prompt(gpu: &Gpu, img: &RgbImage) -> Result<Vec<bool>> {
    pollster::block_on(coarse_prompt_async(gpu, img))
}

/// One box (inclusive corners, pixels) per 8-connected component of `fg` (`w × h`, row-major)
/// with at least `min_area` pixels, largest first, at most `max_boxes`.
pub fn component_boxes(
    fg: &[bool],
    w: usize,
    h: usize,
    min_area: usize,
    max_boxes: usize,
) -> Vec<[f32; 4]> {
    assert_eq!(fg.len(), w * h, "component_boxes: mask is not {w}x{h}");
    let mut seen = vec![false; w * h];
    let mut boxes: Vec<(usize, [f32; 4])> = Vec::new();
    let mut stack = Vec::new();
    for start in 0..w * h {
        if !fg[start] || seen[start] {
            continue;
        }
        let (mut x0, mut y0, mut x1, mut y1, mut n) = (w, h, 0, 0, 0usize);
        seen[start] = true;
        stack.push(start);
        while let Some(p) = stack.pop() {
            let (x, y) = (p % w, p / w);
            n += 1;
            x0 = x0.min(x);
            y0 = y0.min(y);
            x1 = x1.max(x);
            y1 = y1.max(y);
            for ny in y.saturating_sub(1)..=(y + 1).min(h - 1) {
                for nx in x.saturating_sub(1)..=(x + 1).min(w - 1) {
                    let q = ny * w + nx;
                    if fg[q] && !seen[q] {
                        seen[q] = true;
                        stack.push(q);
                    }
                }
            }
        }
        boxes.push((n, [x0 as f32, y0 as f32, x1 as f32, y1 as f32]));
    }
    boxes.retain(|(n, _)| *n >= min_area);
    // stable: equal areas keep raster order
    boxes.sort_by_key(|b| std::cmp::Reverse(b.0));
    boxes.truncate(max_boxes);
    boxes.into_iter().map(|(_, b)| b).collect()
}

/// Box prompts from the Otsu coarse prompt of an image (a prompt-free baseline from a pretrained
/// SAM): [`component_boxes`] of [`coarse_prompt`], components of at least [`auto_box_min_area`]
/// pixels, at most [`MAX_AUTO_BOXES`].
#[cfg(not(target_arch = "wasm32"))]
pub fn otsu_boxes(gpu: &Gpu, img: &RgbImage) -> Result<Vec<[f32; 4]>> {
    let fg = coarse_prompt(gpu, img)?;
    Ok(component_boxes(
        &fg,
        img.width,
        img.height,
        auto_box_min_area(img.width, img.height),
        MAX_AUTO_BOXES,
    ))
}

/// The smallest component an automatic box is drawn around: 1/20,000 of the image, at least 16
/// pixels (specks of noise in the coarse mask are not objects).
pub fn auto_box_min_area(width: usize, height: usize) -> usize {
    ((width * height) / 20_000).max(16)
}

/// At most this many automatic boxes per image (each costs one decoder pass).
pub const MAX_AUTO_BOXES: usize = 512;
