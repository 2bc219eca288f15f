//! SAM's two-way transformer (the core of the MSF-Decoder, Eq. 11): tokens attend to the image
//! embedding and the image attends back; docs/model.md, "MSF-Decoder".

use super::lka_encoder::LN_EPS;
use super::med_fastsam::MedFastSam;
use crate::error::Result;
use crate::gpu::{Recorder, Tensor};
use crate::ops::attention::mha;
use crate::ops::elementwise::{add, binary, BinOp};
use crate::ops::matmul::{linear, Act};
use crate::ops::norm::layer_norm;

impl MedFastSam {
    /// SAM `Attention`: out_proj(MHA(q_proj(q), k_proj(k), v_proj(v))), heads contiguous.
    fn sam_attention(&self, rec: &mut Recorder, pre: &str, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let lin = |rec: &mut Recorder, n: &str, x: &Tensor| -> Result<Tensor> {
            linear(rec, x, self.t(&format!("{pre}.{n}.weight"))?, Some(self.t(&format!("{pre}.{n}.bias"))?), Act::None, None)
        };
        let qp = lin(rec, "q_proj", q)?;
        let kp = lin(rec, "k_proj", k)?;
        let vp = lin(rec, "v_proj", v)?;
        let o = mha(rec, &qp, &kp, &vp, self.cfg.decoder_heads)?;
        lin(rec, "out_proj", &o)
    }

    fn ln(&self, rec: &mut Recorder, pre: &str, x: &Tensor) -> Result<Tensor> {
        layer_norm(rec, x, self.t(&format!("{pre}.weight"))?, self.t(&format!("{pre}.bias"))?, LN_EPS, Act::None)
    }

    /// embedding E and dense prompt P `[B, g, g, D]`, dense PE `[g, g, D]` →
    /// (tokens `[B, 1+T, D]`, image `[B, g, g, D]`).
    pub fn two_way(&self, rec: &mut Recorder, emb: &Tensor, dense: &Tensor, pe: &Tensor) -> Result<(Tensor, Tensor)> {
        let d = self.cfg.transformer_dim;
        let b = emb.shape[0];
        let (gh, gw) = (emb.shape[1], emb.shape[2]);
        let l = gh * gw;
        let all = self.t("mask_decoder.all_tokens")?;
        let nt = all.shape[0];
        // Query PE = the output tokens themselves, broadcast over the batch.
        let zeros = rec.zeros(&[b, nt, d])?;
        let tok_pe = add(rec, &zeros, all)?;
        let mut q = tok_pe.clone();
        let mut k = add(rec, emb, dense)?.reshape(&[b, l, d]);
        let key_pe = pe.reshape(&[l, d]);
        let t = "mask_decoder.transformer";
        for i in 0..self.cfg.decoder_depth {
            let lp = format!("{t}.layers.{i}");
            // Self-attention (layer 0 skips the PE and the residual).
            if i == 0 {
                q = self.sam_attention(rec, &format!("{lp}.self_attn"), &q, &q, &q)?;
            } else {
                let qp = add(rec, &q, &tok_pe)?;
                let a = self.sam_attention(rec, &format!("{lp}.self_attn"), &qp, &qp, &q)?;
                q = add(rec, &q, &a)?;
            }
            q = self.ln(rec, &format!("{lp}.norm1"), &q)?;
            // Tokens -> image.
            let qp = add(rec, &q, &tok_pe)?;
            let kp = binary(rec, &k, &key_pe, BinOp::Add)?;
            let a = self.sam_attention(rec, &format!("{lp}.cross_attn_token_to_image"), &qp, &kp, &k)?;
            q = add(rec, &q, &a)?;
            q = self.ln(rec, &format!("{lp}.norm2"), &q)?;
            // MLP (ReLU).
            let h = linear(rec, &q, self.t(&format!("{lp}.mlp.lin1.weight"))?, Some(self.t(&format!("{lp}.mlp.lin1.bias"))?), Act::Relu, None)?;
            let m = linear(rec, &h, self.t(&format!("{lp}.mlp.lin2.weight"))?, Some(self.t(&format!("{lp}.mlp.lin2.bias"))?), Act::None, Some(&q))?;
            q = self.ln(rec, &format!("{lp}.norm3"), &m)?;
            // Image -> tokens.
            let qp = add(rec, &q, &tok_pe)?;
            let a = self.sam_attention(rec, &format!("{lp}.cross_attn_image_to_token"), &kp, &qp, &q)?;
            let ks = add(rec, &k, &a)?;
            k = self.ln(rec, &format!("{lp}.norm4"), &ks)?;
        }
        let qp = add(rec, &q, &tok_pe)?;
        let kp = binary(rec, &k, &key_pe, BinOp::Add)?;
        let a = self.sam_attention(rec, &format!("{t}.final_attn_token_to_image"), &qp, &kp, &k)?;
        let qs = add(rec, &q, &a)?;
        let q = self.ln(rec, &format!("{t}.norm_final_attn"), &qs)?;
        Ok((q, k.reshape(&[b, gh, gw, d])))
    }
}
