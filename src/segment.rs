//! End-to-end segmentation of one image, shared by the command line and the web page: decode →
//! stretch to S×S → GPU forward → logits resized bilinearly to the original size → mask = logit > 0.

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::io::{GrayImage, RgbImage};
use crate::model::{Config, MedFastSam, Variant, Weights};
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
        let cfg = weights.resolve_config(cfg, 1024)?;
        crate::model::memory::check_forward(gpu, &cfg, 1)?;
        let variant = variant.or(weights.variant).unwrap_or_default();
        let model = MedFastSam::new(gpu, weights, &cfg, variant)?;
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
