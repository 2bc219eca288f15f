//! CP-Encoder (paper §3.2, Eq. 6-9): the Otsu coarse prompt (ops::otsu, on the GPU) turned into a
//! dense prompt by SAM's `mask_downscaling`: conv2×2 s2 → LN2d → GELU → conv2×2 s2 → LN2d → GELU →
//! conv1×1. It is SAM's `prompt_encoder`, which also holds the random-Fourier positional encoding.

use super::blocks::{
    Conv2d, ConvSaved, LN2D_EPS, LayerNorm, LayerNormSaved, Linear, LinearSaved, Mode, Param,
    Source, Vb,
};
use super::config::Config;
use super::lka_encoder::saved;
use super::schema::Kind;
use crate::error::Result;
use crate::gpu::{Recorder, Tensor};
use crate::ops::conv::ConvGeom;
use crate::ops::matmul::Act;
use std::collections::HashMap;
use std::sync::Mutex;

/// SAM's sparse-prompt and no-mask embeddings (MobileSAM, LiteMedSAM; unused by Med-FastSAM).
pub struct PromptTensors<P> {
    /// `point_embeddings.{0..3}`: background point, foreground point, box top-left, box
    /// bottom-right, each `[1, D]`.
    pub points: Vec<P>,
    /// `not_a_point_embed` `[1, D]` (padding point, label −1).
    pub not_a_point: P,
    /// `no_mask_embed` `[1, D]`: the dense prompt when there is no mask prompt.
    pub no_mask: P,
}

pub struct CpEncoder<P = Param> {
    /// `pe_layer.positional_encoding_gaussian_matrix` `[2, D/2]` (a buffer, never trained).
    pub gauss: P,
    /// Point, box and no-mask embeddings where the architecture takes prompts.
    pub prompts: Option<PromptTensors<P>>,
    c0: Conv2d<P>,
    n1: LayerNorm<P>,
    c3: Conv2d<P>,
    n4: LayerNorm<P>,
    l6: Linear<P>,
    pe_cache: Mutex<HashMap<(usize, usize), Tensor>>,
}

pub struct CpEncoderSaved {
    c0: ConvSaved,
    n1: LayerNormSaved,
    c3: ConvSaved,
    n4: LayerNormSaved,
    l6: LinearSaved,
}

impl<P: Clone> CpEncoder<P> {
    pub fn new<S: Source<P = P>>(vb: Vb<S>, cfg: &Config) -> Result<Self> {
        let dm = cfg.transformer_dim;
        let gauss = vb.get_kind(
            "pe_layer.positional_encoding_gaussian_matrix",
            &[2, dm / 2],
            Kind::Buffer,
        )?;
        // Point and box prompts: not used by Med-FastSAM.
        let prompted = !cfg.arch.is_med_fastsam();
        let mut points = Vec::new();
        for i in 0..4 {
            let k = format!("point_embeddings.{i}.weight");
            if prompted {
                points.push(vb.get(&k, &[1, dm])?);
            } else {
                vb.unused(&k, &[1, dm]);
            }
        }
        let not_a_point = if prompted {
            Some(vb.get("not_a_point_embed.weight", &[1, dm])?)
        } else {
            vb.unused("not_a_point_embed.weight", &[1, dm]);
            None
        };
        let mic = cfg.mask_in_chans;
        let md = vb.pp("mask_downscaling");
        let mut cp = CpEncoder {
            gauss,
            prompts: None,
            c0: Conv2d::new(
                md.pp("0"),
                mic / 4,
                1,
                2,
                ConvGeom { stride: 2, pad: 0 },
                true,
            )?,
            n1: LayerNorm::new(md.pp("1"), mic / 4, LN2D_EPS, Act::Gelu)?,
            c3: Conv2d::new(
                md.pp("3"),
                mic,
                mic / 4,
                2,
                ConvGeom { stride: 2, pad: 0 },
                true,
            )?,
            n4: LayerNorm::new(md.pp("4"), mic, LN2D_EPS, Act::Gelu)?,
            l6: Linear::conv1x1(md.pp("6"), dm, mic, true, Act::None)?,
            pe_cache: Mutex::new(HashMap::new()),
        };
        if let Some(not_a_point) = not_a_point {
            let no_mask = vb.get("no_mask_embed.weight", &[1, dm])?;
            cp.prompts = Some(PromptTensors {
                points,
                not_a_point,
                no_mask,
            });
        } else {
            vb.unused("no_mask_embed.weight", &[1, dm]);
        }
        Ok(cp)
    }
}

impl CpEncoder {
    /// Coarse mask at S/4 `[B, S/4, S/4, 1]` (values in {0, .25, .5, .75, 1}) → dense prompt `[B, S/16, S/16, D]`.
    pub fn forward(
        &self,
        rec: &mut Recorder,
        mask_lowres: &Tensor,
        mode: Mode,
    ) -> Result<(Tensor, Option<CpEncoderSaved>)> {
        let (h, c0) = self.c0.forward(rec, mask_lowres, mode)?;
        let (h, n1) = self.n1.forward(rec, &h, mode)?;
        let (h, c3) = self.c3.forward(rec, &h, mode)?;
        let (h, n4) = self.n4.forward(rec, &h, mode)?;
        let (dense, l6) = self.l6.forward(rec, &h, mode)?;
        Ok((
            dense,
            saved!(CpEncoderSaved {
                c0: c0?,
                n1: n1?,
                c3: c3?,
                n4: n4?,
                l6: l6?
            }),
        ))
    }

    /// The coarse mask is an input: parameter gradients only.
    pub fn backward(&self, rec: &mut Recorder, c: &CpEncoderSaved, ddense: &Tensor) -> Result<()> {
        let d = self.l6.backward(rec, &c.l6, ddense)?;
        let d = self.n4.backward(rec, &c.n4, &d, None)?;
        let d = self.c3.backward(rec, &c.c3, &d)?;
        let d = self.n1.backward(rec, &c.n1, &d, None)?;
        self.c0.backward_params(rec, &c.c0, &d)
    }

    /// The dense positional encoding of an h×w grid `[h, w, D]`, computed once per grid size.
    pub fn dense_pe(&self, rec: &mut Recorder, h: usize, w: usize) -> Result<Tensor> {
        let mut cache = self.pe_cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = cache.get(&(h, w)) {
            return Ok(t.clone());
        }
        let pe = crate::ops::pe::dense_pe(rec, &self.gauss.v, h, w)?;
        cache.insert((h, w), pe.clone());
        Ok(pe)
    }
}
