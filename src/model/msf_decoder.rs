//! MSF-Decoder (paper §3.3, Eq. 10-13) around the two-way transformer: multi-scale patch
//! embeddings r2 (patch 4) and r1 (patch 8), upsampling with skip fusion, hypernetwork mask head;
//! docs/model.md, "MSF-Decoder".

use super::lka_encoder::LN2D_EPS;
use super::med_fastsam::MedFastSam;
use crate::error::Result;
use crate::gpu::{Recorder, Tensor};
use crate::ops::conv::{conv2d, conv_transpose2x2};
use crate::ops::elementwise::{concat_last, slice_mid};
use crate::ops::matmul::{gemm, linear, Act, Gemm};
use crate::ops::norm::layer_norm;

impl MedFastSam {
    /// r2 = GELU(LN2d(conv4×4 s4(x))) `[B,S/4,S/4,D/8]`; r1 = GELU(LN2d(conv2×2 s2(r2))) `[B,S/8,S/8,D/4]`.
    pub fn msf_features(&self, rec: &mut Recorder, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let p = |f: usize, i: usize, n: &str| format!("conv1_med.features{f}.{i}.{n}");
        let h = conv2d(rec, x, self.t(&p(1, 0, "weight"))?, Some(self.t(&p(1, 0, "bias"))?), 4, 0, Act::None)?;
        let r2 = layer_norm(rec, &h, self.t(&p(1, 1, "weight"))?, self.t(&p(1, 1, "bias"))?, LN2D_EPS, Act::Gelu)?;
        let h = conv2d(rec, &r2, self.t(&p(2, 0, "weight"))?, Some(self.t(&p(2, 0, "bias"))?), 2, 0, Act::None)?;
        let r1 = layer_norm(rec, &h, self.t(&p(2, 1, "weight"))?, self.t(&p(2, 1, "bias"))?, LN2D_EPS, Act::Gelu)?;
        Ok((r2, r1))
    }

    /// Upsampling + fusion + hypernetwork of mask token 0:
    /// u1 = GELU(LN2d(ConvT(image))); u1 = conv1×1([u1, r1]); u2 = GELU(ConvT(u1));
    /// F = conv1×1([u2, r2]); logits = MLP_0(tokens[1]) · F → `[B, S/4, S/4, 1]`.
    pub fn mask_head(&self, rec: &mut Recorder, tokens: &Tensor, image: &Tensor, r1: &Tensor, r2: &Tensor) -> Result<Tensor> {
        let md = "mask_decoder";
        let t = |n: &str| self.t(&format!("{md}.{n}"));
        let u1 = conv_transpose2x2(rec, image, t("output_upscaling_part1.0.weight")?, Some(t("output_upscaling_part1.0.bias")?), Act::None)?;
        let u1 = layer_norm(rec, &u1, t("output_upscaling_part1.1.weight")?, t("output_upscaling_part1.1.bias")?, LN2D_EPS, Act::Gelu)?;
        let c1 = concat_last(rec, &u1, r1)?;
        let w = t("concat_conv1.0.weight")?;
        let u1 = linear(rec, &c1, &w.reshape(&[w.shape[0], w.shape[1]]), Some(t("concat_conv1.0.bias")?), Act::None, None)?;
        let u2 = conv_transpose2x2(rec, &u1, t("output_upscaling_part2.0.weight")?, Some(t("output_upscaling_part2.0.bias")?), Act::Gelu)?;
        let c2 = concat_last(rec, &u2, r2)?;
        let w = t("concat_conv2.0.weight")?;
        let f = linear(rec, &c2, &w.reshape(&[w.shape[0], w.shape[1]]), Some(t("concat_conv2.0.bias")?), Act::None, None)?;
        // Hypernetwork MLP 0 on mask token 0 (= output token 1).
        let (b, nt, d) = (tokens.shape[0], tokens.shape[1], tokens.shape[2]);
        let tok = slice_mid(rec, tokens, b, nt, d, 1, 1)?.reshape(&[b, d]);
        let hp = "output_hypernetworks_mlps.0.layers";
        let h = linear(rec, &tok, t(&format!("{hp}.0.weight"))?, Some(t(&format!("{hp}.0.bias"))?), Act::Relu, None)?;
        let h = linear(rec, &h, t(&format!("{hp}.1.weight"))?, Some(t(&format!("{hp}.1.bias"))?), Act::Relu, None)?;
        let hyper = linear(rec, &h, t(&format!("{hp}.2.weight"))?, Some(t(&format!("{hp}.2.bias"))?), Act::None, None)?; // [B, C]
        hyper_masks(rec, &f, &hyper)
    }
}

/// Eq. 13: the mask of each image is its fused features F `[B, h, w, C]` times its hypernetwork
/// vector `[B, C]` → `[B, h, w, 1]` (a batched GEMM, one matrix-vector product per image).
pub fn hyper_masks(rec: &mut Recorder, f: &Tensor, hyper: &Tensor) -> Result<Tensor> {
    let (b, fh, fw, c) = (f.shape[0], f.shape[1], f.shape[2], f.shape[3]);
    let out = rec.gpu.empty(&[b, fh, fw, 1])?;
    let mut g = Gemm::new(fh * fw, 1, c);
    g.batch = b;
    g.a_bs = fh * fw * c;
    g.b_bs = c;
    g.c_bs = fh * fw;
    gemm(rec, &g, f, hyper, None, None, &out)?;
    Ok(out)
}
