//! The assembly (paper Fig. 2): LKA-Encoder embedding + MSF multi-scale patch embeddings +
//! CP-Encoder coarse prompt → MSF-Decoder (two-way transformer, fusion, hypernetwork) → logits.
//!
//! All activations are channels-last; the model input is packed RGB u32 pixels `[B, S, S]` at the
//! model size S, and the output logits are `[B, S, S, 1]`.

use super::config::{Config, Variant};
use super::schema::{self, Kind};
use super::weights::Weights;
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Recorder, Tensor};
use crate::ops::elementwise::image_normalize;
use crate::ops::otsu::{otsu, OtsuRule};
use crate::ops::resize::bilinear;
use std::collections::HashMap;
use std::sync::Mutex;

/// BatchNorm epsilon of every TinyViT `Conv2d_BN`.
pub const BN_EPS: f64 = 1e-5;

/// The model on a device, set up for inference (BatchNorm folded into the convolutions).
pub struct MedFastSam {
    pub cfg: Config,
    pub variant: Variant,
    /// Device tensors by state_dict key, plus derived ones (`<conv_bn>.folded.weight/bias`,
    /// `mask_decoder.all_tokens`).
    dev: HashMap<String, Tensor>,
    pe_cache: Mutex<HashMap<(usize, usize), Tensor>>,
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

/// Keys the inference forward never reads (kept in the host weights, not uploaded).
fn unused_at_inference(key: &str, variant: Variant) -> bool {
    key.starts_with("image_encoder.head.")
        || key.starts_with("image_encoder.norm_head.")
        || key.starts_with("mask_decoder.iou_prediction_head.")
        || (key.starts_with("mask_decoder.output_hypernetworks_mlps.")
            && !key.starts_with("mask_decoder.output_hypernetworks_mlps.0."))
        || key.starts_with("prompt_encoder.point_embeddings.")
        || key.starts_with("prompt_encoder.not_a_point_embed.")
        || key.starts_with("prompt_encoder.no_mask_embed.")
        || (variant == Variant::Released && (key.contains("med_qkv") || key.contains("attention_biases_med")))
}

impl MedFastSam {
    /// Uploads the weights the forward needs, folding each BatchNorm into its convolution
    /// (`w' = w·γ/√(σ²+ε)`, `b' = β − μ·γ/√(σ²+ε)`, in f64).
    pub fn new(gpu: &Gpu, weights: &Weights, cfg: &Config, variant: Variant) -> Result<MedFastSam> {
        cfg.validate()?;
        weights.check(cfg)?;
        let mut dev = HashMap::new();
        let specs = schema::specs(cfg);
        for s in &specs {
            if s.kind == Kind::Counter || unused_at_inference(&s.key, variant) {
                continue;
            }
            // Conv2d_BN members are folded below.
            if s.key.contains(".c.weight") || s.key.contains(".bn.") {
                continue;
            }
            let t = weights.get(&s.key)?;
            dev.insert(s.key.clone(), gpu.upload(&t.data, &t.shape)?);
        }
        for s in specs.iter().filter(|s| s.key.ends_with(".c.weight")) {
            let pre = s.key.trim_end_matches(".c.weight");
            let w = weights.get(&s.key)?;
            let g = &weights.get(&format!("{pre}.bn.weight"))?.data;
            let b = &weights.get(&format!("{pre}.bn.bias"))?.data;
            let rm = &weights.get(&format!("{pre}.bn.running_mean"))?.data;
            let rv = &weights.get(&format!("{pre}.bn.running_var"))?.data;
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
            dev.insert(format!("{pre}.folded.weight"), gpu.upload(&fw, &w.shape)?);
            dev.insert(format!("{pre}.folded.bias"), gpu.upload(&fb, &[co])?);
        }
        // Output tokens: [iou_token; mask_tokens] -> [1 + T, D].
        let iou = weights.get("mask_decoder.iou_token.weight")?;
        let mt = weights.get("mask_decoder.mask_tokens.weight")?;
        let mut all = iou.data.clone();
        all.extend_from_slice(&mt.data);
        dev.insert(
            "mask_decoder.all_tokens".into(),
            gpu.upload(&all, &[1 + mt.shape[0], cfg.transformer_dim])?,
        );
        Ok(MedFastSam { cfg: cfg.clone(), variant, dev, pe_cache: Mutex::new(HashMap::new()) })
    }

    /// A device tensor by key.
    pub fn t(&self, key: &str) -> Result<&Tensor> {
        self.dev.get(key).ok_or_else(|| Error::Invalid(format!("model has no device tensor '{key}'")))
    }

    /// Bytes of weights held on the device.
    pub fn device_bytes(&self) -> u64 {
        self.dev.values().map(|t| t.bytes()).sum()
    }

    pub fn otsu_rule(&self) -> OtsuRule {
        match self.variant {
            Variant::Paper => OtsuRule::Paper,
            Variant::Released => OtsuRule::Released,
        }
    }

    /// The dense positional encoding of an h×w grid `[h, w, D]`, computed once per grid size.
    pub fn dense_pe(&self, rec: &mut Recorder, h: usize, w: usize) -> Result<Tensor> {
        if let Some(t) = self.pe_cache.lock().unwrap().get(&(h, w)) {
            return Ok(t.clone());
        }
        let g = self.t("prompt_encoder.pe_layer.positional_encoding_gaussian_matrix")?;
        let pe = crate::ops::pe::dense_pe(rec, g, h, w)?;
        self.pe_cache.lock().unwrap().insert((h, w), pe.clone());
        Ok(pe)
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

    /// The whole forward, recorded into `rec` (no readback). With `keep_stages`, every stage
    /// output named in fixtures/README.md is kept in `Output::stages`.
    pub fn forward(&self, rec: &mut Recorder, px: &Tensor, keep_stages: bool) -> Result<Output> {
        let (_b, s) = self.check_input(px)?;
        let mut st = Stages::default();
        let x = image_normalize(rec, px)?; // [B,S,S,3]
        let emb = self.lka_encode(rec, &x, keep_stages.then_some(&mut st))?; // [B,S/16,S/16,D]
        let (r2, r1) = self.msf_features(rec, &x)?;
        let (threshold, coarse) = otsu(rec, px, &x, self.otsu_rule())?;
        let lr = self.cfg.lowres();
        let coarse_low = bilinear(rec, &coarse, lr, lr)?;
        let dense = self.cp_encode(rec, &coarse_low)?;
        let g = self.cfg.grid();
        let pe = self.dense_pe(rec, g, g)?;
        let (tokens, image) = self.two_way(rec, &emb, &dense, &pe)?;
        let lowres_logits = self.mask_head(rec, &tokens, &image, &r1, &r2)?;
        let logits = bilinear(rec, &lowres_logits, s, s)?;
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
        Ok(Output { logits, lowres_logits, threshold, coarse, stages: st })
    }
}
