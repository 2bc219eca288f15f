//! MSF-Decoder (paper §3.3, Eq. 10-13): SAM's mask decoder around the two-way transformer, with
//! multi-scale patch embeddings r2 (patch 4) and r1 (patch 8) of the image fused into the
//! upsampling, and the hypernetwork mask head; docs/model.md, "MSF-Decoder".

use super::blocks::{
    Conv2d, ConvSaved, ConvT2x2, ConvTSaved, LN2D_EPS, LayerNorm, LayerNormSaved, Linear,
    LinearSaved, Mode, Param, Source, Vb,
};
use super::config::Config;
use super::lka_encoder::saved;
use super::two_way_transformer::{TwoWayTransformer, TwoWayTransformerSaved};
use crate::error::Result;
use crate::gpu::{Recorder, Tensor};
use crate::ops::conv::ConvGeom;
use crate::ops::elementwise::{
    add, col_sum, concat_last, slice_mid, slice_mid_backward, split_last,
};
use crate::ops::matmul::{Act, Gemm, gemm};

/// Multi-scale patch embeddings (`conv1_med`): r2 = GELU(LN2d(conv4×4 s4(x))) `[B,S/4,S/4,D/8]`;
/// r1 = GELU(LN2d(conv2×2 s2(r2))) `[B,S/8,S/8,D/4]`. With a stride-1 patch embedding (the
/// LiteMedSAM geometry, whose decoder upsamples to S) the first convolution is 1×1 stride 1, so
/// r2 and r1 stay at the decoder's two upsampled resolutions (S and S/2).
pub struct MsfFeatures<P = Param> {
    c1: Conv2d<P>,
    n1: LayerNorm<P>,
    c2: Conv2d<P>,
    n2: LayerNorm<P>,
}

pub struct MsfFeaturesSaved {
    c1: ConvSaved,
    n1: LayerNormSaved,
    c2: ConvSaved,
    n2: LayerNormSaved,
}

impl<P: Clone> MsfFeatures<P> {
    pub fn new<S: Source<P = P>>(vb: Vb<S>, cfg: &Config) -> Result<Self> {
        let dm = cfg.transformer_dim;
        let k = cfg.patch_stride;
        Ok(MsfFeatures {
            c1: Conv2d::new(
                vb.pp("features1.0"),
                dm / 8,
                3,
                k,
                ConvGeom { stride: k, pad: 0 },
                true,
            )?,
            n1: LayerNorm::new(vb.pp("features1.1"), dm / 8, LN2D_EPS, Act::Gelu)?,
            c2: Conv2d::new(
                vb.pp("features2.0"),
                dm / 4,
                dm / 8,
                2,
                ConvGeom { stride: 2, pad: 0 },
                true,
            )?,
            n2: LayerNorm::new(vb.pp("features2.1"), dm / 4, LN2D_EPS, Act::Gelu)?,
        })
    }
}

impl MsfFeatures {
    /// Normalised image → (r2, r1).
    pub fn forward(
        &self,
        rec: &mut Recorder,
        x: &Tensor,
        mode: Mode,
    ) -> Result<(Tensor, Tensor, Option<MsfFeaturesSaved>)> {
        let (h, c1) = self.c1.forward(rec, x, mode)?;
        let (r2, n1) = self.n1.forward(rec, &h, mode)?;
        let (h, c2) = self.c2.forward(rec, &r2, mode)?;
        let (r1, n2) = self.n2.forward(rec, &h, mode)?;
        Ok((
            r2,
            r1,
            saved!(MsfFeaturesSaved {
                c1: c1?,
                n1: n1?,
                c2: c2?,
                n2: n2?
            }),
        ))
    }

    /// The input is the image: parameter gradients only.
    pub fn backward(
        &self,
        rec: &mut Recorder,
        c: &MsfFeaturesSaved,
        dr2: &Tensor,
        dr1: &Tensor,
    ) -> Result<()> {
        let d = self.n2.backward(rec, &c.n2, dr1, None)?;
        let d = self.c2.backward(rec, &c.c2, &d)?;
        crate::ops::elementwise::accumulate(rec, &d, dr2)?;
        let d = self.n1.backward(rec, &c.n1, &d, None)?;
        self.c1.backward_params(rec, &c.c1, &d)
    }
}

/// The MSF-Decoder (`mask_decoder`): output tokens, two-way transformer, upsampling with skip
/// fusion of r1 and r2, and the hypernetwork MLP of mask token 0.
pub struct MsfDecoder<P = Param> {
    pub transformer: TwoWayTransformer<P>,
    iou_token: P,
    mask_tokens: P,
    up1: ConvT2x2<P>,
    up1_norm: LayerNorm<P>,
    concat1: Linear<P>,
    concat2: Linear<P>,
    up2: ConvT2x2<P>,
    hyper: [Linear<P>; 3],
    dim: usize,
    num_tokens: usize,
}

pub struct TwoWaySaved {
    tw: TwoWayTransformerSaved,
    b: usize,
}

pub struct MaskHeadSaved {
    t1: ConvTSaved,
    n1: LayerNormSaved,
    cc1: LinearSaved,
    t2: ConvTSaved,
    cc2: LinearSaved,
    h: [LinearSaved; 3],
    f: Tensor,
    hyper: Tensor,
    c1: usize,
    c2: usize,
}

impl<P: Clone> MsfDecoder<P> {
    pub fn new<S: Source<P = P>>(vb: Vb<S>, cfg: &Config) -> Result<Self> {
        let dm = cfg.transformer_dim;
        let nt = cfg.num_mask_tokens();
        let transformer = TwoWayTransformer::new(vb.pp("transformer"), cfg)?;
        let iou_token = vb.get("iou_token.weight", &[1, dm])?;
        let mask_tokens = vb.get("mask_tokens.weight", &[nt, dm])?;
        let up1 = ConvT2x2::new(vb.pp("output_upscaling_part1.0"), dm, dm / 4, Act::None)?;
        let up1_norm = LayerNorm::new(
            vb.pp("output_upscaling_part1.1"),
            dm / 4,
            LN2D_EPS,
            Act::Gelu,
        )?;
        let concat1 = Linear::conv1x1(
            vb.pp("concat_conv1.0"),
            dm / 4,
            dm / 4 + dm / 4,
            true,
            Act::None,
        )?;
        let concat2 = Linear::conv1x1(
            vb.pp("concat_conv2.0"),
            dm / 8,
            dm / 8 + dm / 8,
            true,
            Act::None,
        )?;
        let up2 = ConvT2x2::new(vb.pp("output_upscaling_part2.0"), dm / 4, dm / 8, Act::Gelu)?;
        // Hypernetwork MLPs (only that of mask token 0 is used) and the IoU head (unused).
        let hv = vb.pp("output_hypernetworks_mlps.0.layers");
        let hyper = [
            Linear::new(hv.pp("0"), dm, dm, Act::Relu)?,
            Linear::new(hv.pp("1"), dm, dm, Act::Relu)?,
            Linear::new(hv.pp("2"), dm / 8, dm, Act::None)?,
        ];
        for k in 1..nt {
            let hv = vb.pp(format!("output_hypernetworks_mlps.{k}.layers"));
            for (i, (o, n)) in [(dm, dm), (dm, dm), (dm / 8, dm)].into_iter().enumerate() {
                Linear::unused(hv.pp(i), o, n);
            }
        }
        let ih = cfg.iou_head_hidden_dim;
        let iv = vb.pp("iou_prediction_head.layers");
        for (i, (o, n)) in [(ih, dm), (ih, ih), (nt, ih)].into_iter().enumerate() {
            Linear::unused(iv.pp(i), o, n);
        }
        Ok(MsfDecoder {
            transformer,
            iou_token,
            mask_tokens,
            up1,
            up1_norm,
            concat1,
            concat2,
            up2,
            hyper,
            dim: dm,
            num_tokens: 1 + nt,
        })
    }
}

impl MsfDecoder {
    /// Embedding E and dense prompt P `[B, g, g, D]`, dense PE `[g, g, D]` →
    /// (tokens `[B, 1+T, D]`, image `[B, g, g, D]`).
    pub fn two_way(
        &self,
        rec: &mut Recorder,
        emb: &Tensor,
        dense: &Tensor,
        pe: &Tensor,
        mode: Mode,
    ) -> Result<(Tensor, Tensor, Option<TwoWaySaved>)> {
        let d = self.dim;
        let b = emb.shape[0];
        let (gh, gw) = (emb.shape[1], emb.shape[2]);
        let l = gh * gw;
        let nt = self.num_tokens;
        // All output tokens [iou_token; mask_tokens], broadcast over the batch (the query PE).
        let all = rec.gpu.empty(&[nt, d])?;
        rec.copy(&self.iou_token.v, &all.narrow(0, 1));
        rec.copy(&self.mask_tokens.v, &all.narrow(1, nt - 1));
        let zeros = rec.zeros(&[b, nt, d])?;
        let tok_pe = add(rec, &zeros, &all)?;
        let src = add(rec, emb, dense)?.reshape(&[b, l, d]);
        let key_pe = pe.reshape(&[l, d]);
        let (q, k, tw) = self
            .transformer
            .forward(rec, &tok_pe, &src, &key_pe, mode)?;
        Ok((
            q,
            k.reshape(&[b, gh, gw, d]),
            tw.map(|tw| TwoWaySaved { tw, b }),
        ))
    }

    /// Returns d(src) where src = embedding + dense prompt `[B, g, g, D]`; accumulates the token grads.
    pub fn two_way_backward(
        &self,
        rec: &mut Recorder,
        c: &TwoWaySaved,
        dtok: &Tensor,
        dimg: &Tensor,
    ) -> Result<Tensor> {
        let (d, nt, b) = (self.dim, self.num_tokens, c.b);
        let dsrc_shape = dimg.shape.clone();
        let l = dimg.numel() / (b * d);
        let (dq, dk) = self
            .transformer
            .backward(rec, &c.tw, dtok, &dimg.reshape(&[b, l, d]))?;
        // d(all tokens) = Σ_batch (dq + dtpe).
        let dall = rec.zeros(&[nt, d])?;
        col_sum(
            rec,
            &dq.reshape(&[b, nt * d]),
            nt * d,
            &dall.reshape(&[nt * d]),
            false,
        )?;
        if let Some(g) = &self.iou_token.g {
            crate::ops::elementwise::accumulate(rec, g, &dall.narrow(0, 1))?;
        }
        if let Some(g) = &self.mask_tokens.g {
            crate::ops::elementwise::accumulate(rec, g, &dall.narrow(1, nt - 1))?;
        }
        Ok(dk.reshape(&dsrc_shape))
    }

    /// Upsampling + fusion + hypernetwork of mask token 0:
    /// u1 = GELU(LN2d(ConvT(image))); u1 = conv1×1([u1, r1]); u2 = GELU(ConvT(u1));
    /// F = conv1×1([u2, r2]); logits = MLP_0(tokens[1]) · F → `[B, S/4, S/4, 1]`.
    pub fn mask_head(
        &self,
        rec: &mut Recorder,
        tokens: &Tensor,
        image: &Tensor,
        r1: &Tensor,
        r2: &Tensor,
        mode: Mode,
    ) -> Result<(Tensor, Option<MaskHeadSaved>)> {
        let (u1, t1) = self.up1.forward(rec, image, mode)?;
        let (u1, n1) = self.up1_norm.forward(rec, &u1, mode)?;
        let c1 = u1.dim(-1);
        let cat1 = concat_last(rec, &u1, r1)?;
        let (u1, cc1) = self.concat1.forward(rec, &cat1, mode)?;
        let (u2, t2) = self.up2.forward(rec, &u1, mode)?;
        let c2 = u2.dim(-1);
        let cat2 = concat_last(rec, &u2, r2)?;
        let (f, cc2) = self.concat2.forward(rec, &cat2, mode)?;
        // Hypernetwork MLP 0 on mask token 0 (= output token 1).
        let (b, nt, d) = (tokens.shape[0], tokens.shape[1], tokens.shape[2]);
        let tok = slice_mid(rec, tokens, b, nt, d, 1, 1)?.reshape(&[b, d]);
        let (h, h0) = self.hyper[0].forward(rec, &tok, mode)?;
        let (h, h1) = self.hyper[1].forward(rec, &h, mode)?;
        let (hyper, h2) = self.hyper[2].forward(rec, &h, mode)?;
        let out = hyper_masks(rec, &f, &hyper)?;
        let s = saved!(MaskHeadSaved {
            t1: t1?,
            n1: n1?,
            cc1: cc1?,
            t2: t2?,
            cc2: cc2?,
            h: [h0?, h1?, h2?],
            f: f.clone(),
            hyper: hyper.clone(),
            c1,
            c2,
        });
        Ok((out, s))
    }

    /// Returns (dtokens `[B,nt,D]`, dimage, dr1, dr2).
    pub fn mask_head_backward(
        &self,
        rec: &mut Recorder,
        c: &MaskHeadSaved,
        dlow: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
        let (b, fh, fw, ch) = (c.f.shape[0], c.f.shape[1], c.f.shape[2], c.f.shape[3]);
        let m = fh * fw;
        // logits[b] = F[b] · hyper[b]:  dF[b] = dlow[b] hyper[b]^T,  dhyper[b] = F[b]^T dlow[b].
        let df = rec.gpu.empty(&c.f.shape)?;
        let mut g = Gemm::new(m, ch, 1);
        g.batch = b;
        g.a_bs = m;
        g.b_bs = ch;
        g.c_bs = m * ch;
        gemm(rec, &g, dlow, &c.hyper, None, None, &df)?;
        let dhyper = rec.gpu.empty(&[b, ch])?;
        let mut g = Gemm::new(ch, 1, m);
        g.batch = b;
        g.trans_a = true;
        g.a_bs = m * ch;
        g.b_bs = m;
        g.c_bs = ch;
        gemm(rec, &g, &c.f, dlow, None, None, &dhyper)?;
        let dh = self.hyper[2].backward(rec, &c.h[2], &dhyper)?;
        let dh = self.hyper[1].backward(rec, &c.h[1], &dh)?;
        let dtok = self.hyper[0].backward(rec, &c.h[0], &dh)?;
        let d = dtok.dim(-1);
        let dtokens = rec.zeros(&[b, self.num_tokens, d])?;
        slice_mid_backward(rec, &dtok.reshape(&[b, 1, d]), &dtokens, self.num_tokens, 1)?;
        let dcat2 = self.concat2.backward(rec, &c.cc2, &df)?;
        let (du2, dr2) = split_last(rec, &dcat2, c.c2)?;
        let du1b = self.up2.backward(rec, &c.t2, &du2)?;
        let dcat1 = self.concat1.backward(rec, &c.cc1, &du1b)?;
        let (du1, dr1) = split_last(rec, &dcat1, c.c1)?;
        let dt1 = self.up1_norm.backward(rec, &c.n1, &du1, None)?;
        let dimage = self.up1.backward(rec, &c.t1, &dt1)?;
        Ok((dtokens, dimage, dr1, dr2))
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
