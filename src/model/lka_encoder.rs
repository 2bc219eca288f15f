//! LKA-Encoder (paper §3.1): TinyViT-5M layout with Group Attention (Eq. 3-4) and the sequential
//! Hybrid Expert Head (Eq. 5); docs/model.md, "LKA-Encoder". Inference path (BatchNorm folded).

use super::config::Variant;
use super::med_fastsam::{MedFastSam, Stages};
use crate::error::Result;
use crate::gpu::{Recorder, Tensor};
use crate::ops::attention::{window_attention, window_partition, window_reverse_add};
use crate::ops::conv::{conv2d, depthwise_conv2d};
use crate::ops::elementwise::add;
use crate::ops::matmul::{linear, linear_residual_act, Act};
use crate::ops::norm::layer_norm;

/// Token LayerNorm epsilon (attention and MLP norms).
pub const LN_EPS: f32 = 1e-5;
/// LayerNorm2d epsilon (neck, SAM-style channel norms).
pub const LN2D_EPS: f32 = 1e-6;

impl MedFastSam {
    /// A folded `Conv2d_BN` on a channels-last map: 1×1 convolutions run as GEMMs, 3×3 depthwise
    /// ones (`depthwise`) on the depthwise kernel, the rest on the dense convolution.
    pub(crate) fn conv_bn(
        &self,
        rec: &mut Recorder,
        pre: &str,
        x: &Tensor,
        stride: usize,
        depthwise: bool,
        act: Act,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let w = self.t(&format!("{pre}.folded.weight"))?;
        let b = self.t(&format!("{pre}.folded.bias"))?;
        let k = w.shape[2];
        if depthwise {
            assert!(residual.is_none());
            return depthwise_conv2d(rec, x, w, Some(b), stride, k / 2, act);
        }
        if k == 1 && stride == 1 {
            let w2 = w.reshape(&[w.shape[0], w.shape[1]]);
            return linear(rec, x, &w2, Some(b), act, residual);
        }
        assert!(residual.is_none());
        conv2d(rec, x, w, Some(b), stride, k / 2, act)
    }

    /// PatchEmbed: Conv2d_BN(3→C0/2, 3×3 s2) → GELU → Conv2d_BN(C0/2→C0, 3×3 s2). [B,S,S,3] → [B,S/4,S/4,C0].
    pub fn patch_embed(&self, rec: &mut Recorder, x: &Tensor) -> Result<Tensor> {
        let pre = "image_encoder.patch_embed.seq";
        let h = self.conv_bn(rec, &format!("{pre}.0"), x, 2, false, Act::Gelu, None)?;
        self.conv_bn(rec, &format!("{pre}.2"), &h, 2, false, Act::None, None)
    }

    /// MBConv: GELU(x + BN(conv1×1)(GELU(BN(dw3×3)(GELU(BN(conv1×1)(x)))))).
    fn mbconv(&self, rec: &mut Recorder, pre: &str, x: &Tensor) -> Result<Tensor> {
        let h = self.conv_bn(rec, &format!("{pre}.conv1"), x, 1, false, Act::Gelu, None)?;
        let h = self.conv_bn(rec, &format!("{pre}.conv2"), &h, 1, true, Act::Gelu, None)?;
        // conv3 (1x1) + residual + GELU in one GEMM epilogue (the residual before the activation).
        let cp = format!("{pre}.conv3");
        let w = self.t(&format!("{cp}.folded.weight"))?;
        let b = self.t(&format!("{cp}.folded.bias"))?;
        linear_residual_act(rec, &h, &w.reshape(&[w.shape[0], w.shape[1]]), Some(b), x, Act::Gelu)
    }

    /// PatchMerging: Conv2d_BN 1×1 → GELU → depthwise Conv2d_BN 3×3 (stride 2, or 1 into the last
    /// stage) → GELU → Conv2d_BN 1×1.
    fn patch_merging(&self, rec: &mut Recorder, pre: &str, x: &Tensor, stride: usize) -> Result<Tensor> {
        let h = self.conv_bn(rec, &format!("{pre}.conv1"), x, 1, false, Act::Gelu, None)?;
        let h = self.conv_bn(rec, &format!("{pre}.conv2"), &h, stride, true, Act::Gelu, None)?;
        self.conv_bn(rec, &format!("{pre}.conv3"), &h, 1, false, Act::None, None)
    }

    /// Group Attention (Eq. 3-4) on zero-padded windows of x [B,H,W,d]; returns x + attention.
    /// released: proj(MHA_nat(LN(x))); paper: proj(x_nat + MHA_med(x_nat + LN(x))), x_nat = proj(MHA_nat(LN(x))).
    fn group_attention(&self, rec: &mut Recorder, pre: &str, x: &Tensor, heads: usize, ws: usize) -> Result<Tensor> {
        let p = |n: &str| format!("{pre}.attn.{n}");
        let xw = window_partition(rec, x, ws)?; // [NW, n, d]
        let u = layer_norm(rec, &xw, self.t(&p("norm.weight"))?, self.t(&p("norm.bias"))?, super::lka_encoder::LN_EPS, Act::None)?;
        drop(xw);
        let qkv = linear(rec, &u, self.t(&p("qkv.weight"))?, Some(self.t(&p("qkv.bias"))?), Act::None, None)?;
        let a_nat = window_attention(rec, &qkv, self.t(&p("attention_biases"))?, heads, ws)?;
        drop(qkv);
        let (pw, pb) = (self.t(&p("proj.weight"))?, self.t(&p("proj.bias"))?);
        let y = match self.variant {
            Variant::Released => linear(rec, &a_nat, pw, Some(pb), Act::None, None)?,
            Variant::Paper => {
                let x_nat = linear(rec, &a_nat, pw, Some(pb), Act::None, None)?;
                let m = add(rec, &x_nat, &u)?;
                let qkv_med = linear(rec, &m, self.t(&p("med_qkv.weight"))?, Some(self.t(&p("med_qkv.bias"))?), Act::None, None)?;
                drop(m);
                let a_med = window_attention(rec, &qkv_med, self.t(&p("attention_biases_med"))?, heads, ws)?;
                let t = add(rec, &x_nat, &a_med)?;
                linear(rec, &t, pw, Some(pb), Act::None, None)?
            }
        };
        window_reverse_add(rec, &y, x, ws)
    }

    /// Pre-norm MLP with residual: x + fc2(GELU(fc1(LN(x)))).
    fn mlp(&self, rec: &mut Recorder, pre: &str, x: &Tensor) -> Result<Tensor> {
        let p = |n: &str| format!("{pre}.{n}");
        let h = layer_norm(rec, x, self.t(&p("norm.weight"))?, self.t(&p("norm.bias"))?, LN_EPS, Act::None)?;
        let h = linear(rec, &h, self.t(&p("fc1.weight"))?, Some(self.t(&p("fc1.bias"))?), Act::Gelu, None)?;
        linear(rec, &h, self.t(&p("fc2.weight"))?, Some(self.t(&p("fc2.bias"))?), Act::None, Some(x))
    }

    /// TinyViT block with Group Attention and the Hybrid Expert Head:
    /// x += GA(x); x = BN(dw3×3(x)); x += MLP_nat(x); x += MLP_med(x).
    fn vit_block(&self, rec: &mut Recorder, pre: &str, x: &Tensor, heads: usize, ws: usize) -> Result<Tensor> {
        let x = self.group_attention(rec, pre, x, heads, ws)?;
        let x = self.conv_bn(rec, &format!("{pre}.local_conv"), &x, 1, true, Act::None, None)?;
        let x = self.mlp(rec, &format!("{pre}.mlp"), &x)?;
        self.mlp(rec, &format!("{pre}.mlp_med"), &x)
    }

    /// Stage `s` (its blocks, then its patch merging for s < 3). x [B,H,W,C_s] → [B,H',W',C_{s+1}].
    pub fn lka_stage(&self, rec: &mut Recorder, s: usize, x: &Tensor) -> Result<Tensor> {
        let cfg = &self.cfg;
        let r = cfg.stage_res(s);
        let b = x.numel() / (r * r * cfg.embed_dims[s]);
        let mut x = x.reshape(&[b, r, r, cfg.embed_dims[s]]);
        let pre = format!("image_encoder.layers.{s}");
        for blk in 0..cfg.depths[s] {
            let bp = format!("{pre}.blocks.{blk}");
            x = if s == 0 {
                self.mbconv(rec, &bp, &x)?
            } else {
                self.vit_block(rec, &bp, &x, cfg.num_heads[s], cfg.window_sizes[s])?
            };
        }
        if s < 3 {
            // The merge into the last stage keeps the resolution (MobileSAM's change).
            let stride = if s == 2 { 1 } else { 2 };
            x = self.patch_merging(rec, &format!("{pre}.downsample"), &x, stride)?;
        }
        Ok(x)
    }

    /// Neck: conv1×1 (no bias) → LayerNorm2d → conv3×3 (no bias) → LayerNorm2d. → [B,S/16,S/16,D].
    pub fn neck(&self, rec: &mut Recorder, x: &Tensor) -> Result<Tensor> {
        let ie = "image_encoder.neck";
        let (g, c) = (self.cfg.grid(), self.cfg.embed_dims[3]);
        let x = &x.reshape(&[x.numel() / (g * g * c), g, g, c]);
        let w0 = self.t(&format!("{ie}.0.weight"))?;
        let h = linear(rec, x, &w0.reshape(&[w0.shape[0], w0.shape[1]]), None, Act::None, None)?;
        let h = layer_norm(rec, &h, self.t(&format!("{ie}.1.weight"))?, self.t(&format!("{ie}.1.bias"))?, LN2D_EPS, Act::None)?;
        let h = conv2d(rec, &h, self.t(&format!("{ie}.2.weight"))?, None, 1, 1, Act::None)?;
        layer_norm(rec, &h, self.t(&format!("{ie}.3.weight"))?, self.t(&format!("{ie}.3.bias"))?, LN2D_EPS, Act::None)
    }

    /// The whole LKA-Encoder: normalised image [B,S,S,3] → embedding [B,S/16,S/16,D].
    pub fn lka_encode(&self, rec: &mut Recorder, x: &Tensor, mut st: Option<&mut Stages>) -> Result<Tensor> {
        let mut h = self.patch_embed(rec, x)?;
        if let Some(st) = st.as_deref_mut() {
            st.push("encoder.patch_embed", &h);
        }
        for s in 0..4 {
            h = self.lka_stage(rec, s, &h)?;
            if let Some(st) = st.as_deref_mut() {
                st.push(&format!("encoder.layers.{s}"), &h);
            }
        }
        self.neck(rec, &h)
    }
}
