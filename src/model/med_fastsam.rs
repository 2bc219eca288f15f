//! The assembly (paper Fig. 2): LKA-Encoder embedding + MSF multi-scale patch embeddings +
//! CP-Encoder coarse prompt → MSF-Decoder (two-way transformer, fusion, hypernetwork) → logits.
//!
//! All activations are channels-last; the model input is packed RGB u32 pixels `[B, S, S]` at the
//! model size S, and the output logits are `[B, S, S, 1]`. One forward serves inference
//! ([`Mode::Eval`]) and training ([`Mode::Train`], with [`MedFastSam::backward`]).

use super::Precision;
use super::blocks::{BN_EPS, Mode, Param, Source, Vb};
use super::config::{Config, Variant};
use super::cp_encoder::{CpEncoder, CpEncoderSaved};
use super::lka_encoder::{LkaEncoder, LkaEncoderSaved};
use super::msf_decoder::{MaskHeadSaved, MsfDecoder, MsfFeatures, MsfFeaturesSaved, TwoWaySaved};
use super::schema::Kind;
use super::weights::Weights;
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Recorder, Tensor};
use crate::ops::elementwise::image_normalize;
use crate::ops::otsu::{OtsuRule, otsu};
use crate::ops::resize::{bilinear, bilinear_backward};
use std::cell::Cell;

/// The model's parts, each owning its tensors under its key prefix. `P` is [`Param`] for a model
/// on a device; the schema builds it with `P = Spec` to list every key.
pub struct MedFastSam<P = Param> {
    pub cfg: Config,
    pub variant: Variant,
    pub encoder: LkaEncoder<P>,
    pub prompt: CpEncoder<P>,
    pub decoder: MsfDecoder<P>,
    pub msf: MsfFeatures<P>,
    /// Bytes of weights this model uploaded (0 when it runs on training parameters).
    weight_bytes: u64,
}

/// Stage outputs kept for parity checks (channels-last; tokens `[B, L, C]` where the authors'
/// code has tokens).
#[derive(Default)]
pub struct Stages(pub Vec<(String, Tensor)>);

impl Stages {
    pub fn push(&mut self, name: &str, t: &Tensor) {
        self.0.push((name.to_string(), t.clone()));
    }
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }
}

/// What one forward returns.
pub struct Output {
    /// Logits at the model input size `[B, S, S, 1]`.
    pub logits: Tensor,
    /// Low-resolution logits `[B, S/4, S/4, 1]`.
    pub lowres_logits: Tensor,
    /// Otsu threshold per image `[B]` (t*/255).
    pub threshold: Tensor,
    /// Otsu coarse prompt at the model size `[B, S, S, 1]` (0/1).
    pub coarse: Tensor,
    pub stages: Stages,
}

/// Everything the backward of one train-mode forward needs.
pub struct Saved {
    encoder: LkaEncoderSaved,
    msf: MsfFeaturesSaved,
    prompt: CpEncoderSaved,
    two_way: TwoWaySaved,
    head: MaskHeadSaved,
    lowres_shape: Vec<usize>,
}

/// Host weights uploaded for inference, each `Conv2d_BN` folded into its convolution; the GEMM
/// weights as f16 at [`Precision::F16`].
pub(crate) struct Upload<'a> {
    pub(crate) gpu: &'a Gpu,
    pub(crate) weights: &'a Weights,
    pub(crate) bytes: Cell<u64>,
    /// Resolved: `F32` or `F16`.
    pub(crate) precision: Precision,
    /// `F16` was asked for by name (not picked by `Auto`): a weight beyond f16's range is then an
    /// error; under `Auto` that weight alone stays f32.
    pub(crate) explicit: bool,
}

impl<'a> Upload<'a> {
    pub(crate) fn new(gpu: &'a Gpu, weights: &'a Weights, precision: Precision) -> Self {
        Upload {
            gpu,
            weights,
            bytes: Cell::new(0),
            precision: precision.resolve(gpu),
            explicit: precision == Precision::F16,
        }
    }

    /// `data` as f32, or as f16 when it is a GEMM weight (`matrix`) at [`Precision::F16`].
    fn put(&self, what: &str, data: &[f32], shape: &[usize], matrix: bool) -> Result<Param> {
        let fits = || crate::gpu::beyond_f16(data).is_none();
        let v = if matrix && self.precision == Precision::F16 && (self.explicit || fits()) {
            self.gpu.upload_f16(data, shape).map_err(|e| {
                Error::Invalid(format!(
                    "weight {what} cannot be stored at --precision f16 ({e}); use --precision f32 or auto"
                ))
            })?
        } else {
            self.gpu.upload(data, shape)?
        };
        self.bytes.set(self.bytes.get() + v.bytes());
        Ok(Param { v, g: None })
    }
}

impl Source for Upload<'_> {
    type P = Param;
    fn get(&self, key: &str, _shape: &[usize], _kind: Kind) -> Result<Param> {
        let t = self.weights.get(key)?;
        self.put(key, &t.data, &t.shape, false)
    }
    fn get_matrix(&self, key: &str, _shape: &[usize]) -> Result<Param> {
        let t = self.weights.get(key)?;
        self.put(key, &t.data, &t.shape, true)
    }
    /// `w' = w·γ/√(σ²+ε)`, `b' = β − μ·γ/√(σ²+ε)`, in f64.
    fn fold_bn(&self, pre: &str, matrix: bool) -> Result<Option<(Param, Param)>> {
        let get = |n: &str| self.weights.get(&format!("{pre}.{n}"));
        let w = get("c.weight")?;
        let (g, b, rm, rv) = (
            &get("bn.weight")?.data,
            &get("bn.bias")?.data,
            &get("bn.running_mean")?.data,
            &get("bn.running_var")?.data,
        );
        let co = w.shape[0];
        let per = w.numel() / co;
        let mut fw = vec![0f32; w.numel()];
        let mut fb = vec![0f32; co];
        for o in 0..co {
            let sc = g[o] as f64 / (rv[o] as f64 + BN_EPS).sqrt();
            for i in 0..per {
                fw[o * per + i] = (w.data[o * per + i] as f64 * sc) as f32;
            }
            fb[o] = (b[o] as f64 - rm[o] as f64 * sc) as f32;
        }
        let wk = format!("{pre}.c.weight");
        Ok(Some((
            self.put(&wk, &fw, &w.shape, matrix)?,
            self.put(&format!("{pre}.bn.bias"), &fb, &[co], false)?,
        )))
    }
}

impl<P: Clone> MedFastSam<P> {
    /// Builds every part from `src` (keys in the authors' state_dict order).
    pub fn build<S: Source<P = P>>(src: &S, cfg: &Config, variant: Variant) -> Result<Self> {
        let vb = Vb::new(src);
        Ok(MedFastSam {
            cfg: cfg.clone(),
            variant,
            encoder: LkaEncoder::new(vb.pp("image_encoder"), cfg, variant)?,
            prompt: CpEncoder::new(vb.pp("prompt_encoder"), cfg)?,
            decoder: MsfDecoder::new(vb.pp("mask_decoder"), cfg)?,
            msf: MsfFeatures::new(vb.pp("conv1_med"), cfg)?,
            weight_bytes: 0,
        })
    }
}

impl MedFastSam {
    /// Uploads the weights the forward needs for inference, folding each BatchNorm into its
    /// convolution.
    pub fn new(gpu: &Gpu, weights: &Weights, cfg: &Config, variant: Variant) -> Result<MedFastSam> {
        Self::with_precision(gpu, weights, cfg, variant, Precision::F32)
    }

    /// [`MedFastSam::new`] with the GEMM weights stored at `precision`.
    pub fn with_precision(
        gpu: &Gpu,
        weights: &Weights,
        cfg: &Config,
        variant: Variant,
        precision: Precision,
    ) -> Result<MedFastSam> {
        cfg.validate()?;
        weights.check(cfg)?;
        let up = Upload::new(gpu, weights, precision);
        let mut m = MedFastSam::build(&up, cfg, variant)?;
        m.weight_bytes = up.bytes.get();
        Ok(m)
    }

    /// Bytes of weights held on the device for this model.
    pub fn device_bytes(&self) -> u64 {
        self.weight_bytes
    }

    pub fn otsu_rule(&self) -> OtsuRule {
        match self.variant {
            Variant::Paper => OtsuRule::Paper,
            Variant::Released => OtsuRule::Released,
        }
    }

    /// The dense positional encoding of an h×w grid `[h, w, D]`, computed once per grid size.
    pub fn dense_pe(&self, rec: &mut Recorder, h: usize, w: usize) -> Result<Tensor> {
        self.prompt.dense_pe(rec, h, w)
    }

    /// Checks a batch of packed pixels `[B, S, S]` against the configuration.
    fn check_input(&self, px: &Tensor) -> Result<(usize, usize)> {
        let s = self.cfg.image_size;
        if px.shape.len() != 3 || px.shape[1] != s || px.shape[2] != s {
            return Err(Error::Invalid(format!(
                "model input must be [B, {s}, {s}] packed pixels, got {:?}",
                px.shape
            )));
        }
        Ok((px.shape[0], s))
    }

    /// The whole eval-mode forward, recorded into `rec` (no readback). With `keep_stages`, every
    /// stage output named in fixtures/README.md is kept in `Output::stages`.
    pub fn forward(&self, rec: &mut Recorder, px: &Tensor, keep_stages: bool) -> Result<Output> {
        Ok(self.forward_mode(rec, px, Mode::Eval, keep_stages)?.0)
    }

    /// The forward in `mode`; in train mode also what [`MedFastSam::backward`] needs. BatchNorm
    /// layers that train use batch statistics and update their running statistics.
    pub fn forward_mode(
        &self,
        rec: &mut Recorder,
        px: &Tensor,
        mode: Mode,
        keep_stages: bool,
    ) -> Result<(Output, Option<Saved>)> {
        self.forward_impl(rec, px, mode, keep_stages, None)
    }

    /// The eval-mode forward with the Otsu threshold given rather than chosen per image (one
    /// threshold for every window of a large image; see [`FixedOtsu`]).
    pub fn forward_fixed_otsu(
        &self,
        rec: &mut Recorder,
        px: &Tensor,
        fixed: &FixedOtsu,
    ) -> Result<Output> {
        Ok(self
            .forward_impl(rec, px, Mode::Eval, false, Some(fixed))?
            .0)
    }

    fn forward_impl(
        &self,
        rec: &mut Recorder,
        px: &Tensor,
        mode: Mode,
        keep_stages: bool,
        fixed: Option<&FixedOtsu>,
    ) -> Result<(Output, Option<Saved>)> {
        let (_b, s) = self.check_input(px)?;
        let mut st = Stages::default();
        let x = image_normalize(rec, px)?; // [B,S,S,3]
        let (emb, enc) = self
            .encoder
            .forward(rec, &x, mode, keep_stages.then_some(&mut st))?; // [B,S/16,S/16,D]
        rec.mark(|| "encoder neck".into());
        let (r2, r1, msf) = self.msf.forward(rec, &x, mode)?;
        rec.mark(|| "multi-scale features".into());
        let (threshold, coarse) = match fixed {
            None => otsu(rec, px, &x, self.otsu_rule())?,
            Some(f) => (
                f.thr.clone(),
                crate::ops::otsu::otsu_mask_at(rec, px, &x, self.otsu_rule(), &f.tsel)?,
            ),
        };
        drop(x);
        let lr = self.cfg.lowres();
        let coarse_low = bilinear(rec, &coarse, lr, lr)?;
        let (dense, prompt) = self.prompt.forward(rec, &coarse_low, mode)?;
        rec.mark(|| "Otsu and coarse prompt".into());
        let g = self.cfg.grid();
        let pe = self.dense_pe(rec, g, g)?;
        let (tokens, image, two_way) = self.decoder.two_way(rec, &emb, &dense, &pe, mode)?;
        rec.mark(|| "two-way transformer".into());
        let (lowres_logits, head) = self
            .decoder
            .mask_head(rec, &tokens, &image, &r1, &r2, mode)?;
        let logits = bilinear(rec, &lowres_logits, s, s)?;
        rec.mark(|| "mask head".into());
        if keep_stages {
            st.push("encoder.embedding", &emb);
            st.push("msf.r2", &r2);
            st.push("msf.r1", &r1);
            st.push("otsu.threshold", &threshold);
            st.push("otsu.mask", &coarse);
            st.push("otsu.mask_lowres", &coarse_low);
            st.push("pe.dense", &pe);
            st.push("prompt.dense", &dense);
            st.push("decoder.tokens", &tokens);
            st.push("decoder.image", &image);
            st.push("decoder.lowres_logits", &lowres_logits);
            st.push("logits", &logits);
        }
        let saved = (|| {
            Some(Saved {
                encoder: enc?,
                msf: msf?,
                prompt: prompt?,
                two_way: two_way?,
                head: head?,
                lowres_shape: lowres_logits.shape.clone(),
            })
        })();
        Ok((
            Output {
                logits,
                lowres_logits,
                threshold,
                coarse,
                stages: st,
            },
            saved,
        ))
    }

    /// The train-mode forward and what its backward needs (a model built on training parameters).
    pub fn forward_train(&self, rec: &mut Recorder, px: &Tensor) -> Result<(Output, Saved)> {
        let (out, saved) = self.forward_mode(rec, px, Mode::Train, false)?;
        let saved = saved.ok_or_else(|| {
            Error::Invalid("train-mode forward kept nothing for the backward".into())
        })?;
        Ok((out, saved))
    }

    /// Backward from `dlogits` (`[B,S,S,1]`), accumulating into the parameter gradients.
    /// Consumes `c`: each part's saved tensors are released as soon as its backward is recorded,
    /// so later (larger, earlier-layer) gradients reuse their memory.
    pub fn backward(&self, rec: &mut Recorder, c: Saved, dlogits: &Tensor) -> Result<()> {
        let Saved {
            encoder,
            msf,
            prompt,
            two_way,
            head,
            lowres_shape,
        } = c;
        let dlow = rec.zeros(&lowres_shape)?;
        bilinear_backward(rec, dlogits, &dlow)?;
        let (dtok, dimg, dr1, dr2) = self.decoder.mask_head_backward(rec, &head, &dlow)?;
        drop((head, dlow));
        rec.mark(|| "mask head".into());
        // src = embedding + dense prompt
        let dsrc = self.decoder.two_way_backward(rec, &two_way, &dtok, &dimg)?;
        drop((two_way, dtok, dimg));
        rec.mark(|| "two-way transformer".into());
        self.prompt.backward(rec, &prompt, &dsrc)?;
        drop(prompt);
        rec.mark(|| "coarse prompt".into());
        self.msf.backward(rec, &msf, &dr2, &dr1)?;
        drop((msf, dr1, dr2));
        rec.mark(|| "multi-scale features".into());
        self.encoder.backward(rec, encoder, &dsrc)
    }

    // Eval-mode access to the parts, for stage-by-stage parity checks.

    /// PatchEmbed: `[B,S,S,3]` → `[B,S/4,S/4,C0]`.
    pub fn patch_embed(&self, rec: &mut Recorder, x: &Tensor) -> Result<Tensor> {
        Ok(self.encoder.patch_embed.forward(rec, x, Mode::Eval)?.0)
    }
    /// Stage `s` of the LKA-Encoder (its blocks, then its patch merging for s < 3).
    pub fn lka_stage(&self, rec: &mut Recorder, s: usize, x: &Tensor) -> Result<Tensor> {
        let stage = self
            .encoder
            .stages
            .get(s)
            .ok_or_else(|| Error::Invalid(format!("no LKA stage {s}")))?;
        Ok(stage.forward(rec, x, Mode::Eval)?.0)
    }
    /// The neck: last stage → embedding `[B,S/16,S/16,D]`.
    pub fn neck(&self, rec: &mut Recorder, x: &Tensor) -> Result<Tensor> {
        Ok(self.encoder.neck.forward(rec, x, Mode::Eval)?.0)
    }
    /// The whole LKA-Encoder.
    pub fn lka_encode(
        &self,
        rec: &mut Recorder,
        x: &Tensor,
        st: Option<&mut Stages>,
    ) -> Result<Tensor> {
        Ok(self.encoder.forward(rec, x, Mode::Eval, st)?.0)
    }
    /// (r2, r1) of the normalised image.
    pub fn msf_features(&self, rec: &mut Recorder, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let (r2, r1, _) = self.msf.forward(rec, x, Mode::Eval)?;
        Ok((r2, r1))
    }
    /// Coarse mask at S/4 → dense prompt.
    pub fn cp_encode(&self, rec: &mut Recorder, mask_lowres: &Tensor) -> Result<Tensor> {
        Ok(self.prompt.forward(rec, mask_lowres, Mode::Eval)?.0)
    }
    /// (tokens `[B, 1+T, D]`, image `[B, g, g, D]`).
    pub fn two_way(
        &self,
        rec: &mut Recorder,
        emb: &Tensor,
        dense: &Tensor,
        pe: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (t, i, _) = self.decoder.two_way(rec, emb, dense, pe, Mode::Eval)?;
        Ok((t, i))
    }
    /// Low-resolution logits `[B, S/4, S/4, 1]`.
    pub fn mask_head(
        &self,
        rec: &mut Recorder,
        tokens: &Tensor,
        image: &Tensor,
        r1: &Tensor,
        r2: &Tensor,
    ) -> Result<Tensor> {
        Ok(self
            .decoder
            .mask_head(rec, tokens, image, r1, r2, Mode::Eval)?
            .0)
    }
}

/// Otsu thresholds given to [`MedFastSam::forward_fixed_otsu`]: t* (0..=255) for each image of a
/// batch, on the device (kept alive by this value until the recording is submitted).
pub struct FixedOtsu {
    tsel: Tensor,
    thr: Tensor,
}

impl FixedOtsu {
    /// The same threshold index `t` for `batch` images.
    pub fn new(gpu: &crate::gpu::Gpu, t: u32, batch: usize) -> Result<FixedOtsu> {
        if t > 255 {
            return Err(Error::Invalid(format!("Otsu threshold index {t} > 255")));
        }
        Ok(FixedOtsu {
            tsel: gpu.upload_u32(&vec![t; batch], &[batch])?,
            thr: gpu.upload(&vec![t as f32 / 255.0; batch], &[batch])?,
        })
    }

    /// Images it holds the threshold for.
    pub fn batch(&self) -> usize {
        self.tsel.shape[0]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Under `Auto` resolved to f16, a GEMM weight beyond f16's range stays f32 by itself (the
    /// GEMM picks its kernel family per weight) and the forward runs; asked for by name, f16
    /// refuses that weight with an error naming it.
    #[test]
    fn out_of_range_weight_stays_f32_under_auto_and_is_refused_at_explicit_f16() {
        let gpu = crate::testutil::test_gpu();
        let cfg = Config::preset("tiny").unwrap().with_image_size(64).unwrap();
        let mut w = Weights::init(&cfg, 3);
        let key = w
            .tensors
            .keys()
            .find(|k| k.ends_with("mlp.lin1.weight"))
            .unwrap()
            .clone();
        let upload = |w: &Weights, explicit: bool| -> Result<(MedFastSam, u64)> {
            let up = Upload {
                gpu,
                weights: w,
                bytes: Cell::new(0),
                precision: Precision::F16,
                explicit,
            };
            let m = MedFastSam::build(&up, &cfg, Variant::Paper)?;
            Ok((m, up.bytes.get()))
        };
        let (_, all_f16) = upload(&w, false).unwrap();
        let n = w.tensors[&key].numel();
        w.tensors.get_mut(&key).unwrap().data[7] = 1.0e5;
        let (model, bytes) = upload(&w, false).unwrap();
        assert_eq!(
            bytes - all_f16,
            (n * 4 - n.div_ceil(2) * 4) as u64,
            "{key} kept f32"
        );
        let px = gpu
            .upload_u32(&vec![0x40_80_c0; 64 * 64], &[1, 64, 64])
            .unwrap();
        let mut rec = gpu.new_recorder();
        let out = model.forward(&mut rec, &px, false).unwrap();
        rec.submit().unwrap();
        assert!(gpu.read(&out.logits).unwrap().iter().all(|v| v.is_finite()));
        let e = upload(&w, true).err().unwrap().to_string();
        assert!(e.contains(&key) && e.contains("65504"), "{e}");
    }
}
