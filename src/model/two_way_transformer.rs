//! SAM's two-way transformer (the core of the MSF-Decoder, Eq. 11): tokens attend to the image
//! embedding and the image attends back; docs/model.md, "MSF-Decoder".

use super::blocks::{
    LN_EPS, LayerNorm, LayerNormSaved, Linear, LinearSaved, Mode, Param, Source, Vb,
};
use super::config::Config;
use crate::error::{Error, Result};
use crate::gpu::{Recorder, Tensor};
use crate::ops::attention::{AttnSaved, mha, mha_backward, mha_train};
use crate::ops::elementwise::{BinOp, accumulate, add, binary};
use crate::ops::matmul::Act;

/// SAM `Attention`: out_proj(MHA(q_proj(q), k_proj(k), v_proj(v))), heads contiguous.
pub struct SamAttention<P = Param> {
    q: Linear<P>,
    k: Linear<P>,
    v: Linear<P>,
    out: Linear<P>,
    heads: usize,
}

pub struct SamAttentionSaved {
    q: LinearSaved,
    k: LinearSaved,
    v: LinearSaved,
    out: LinearSaved,
    qp: Tensor,
    kp: Tensor,
    vp: Tensor,
    attn: AttnSaved,
}

impl<P: Clone> SamAttention<P> {
    /// Projections `d → inner` (inner = d / downsample rate) and back.
    pub fn new<S: Source<P = P>>(vb: Vb<S>, d: usize, inner: usize, heads: usize) -> Result<Self> {
        Ok(SamAttention {
            q: Linear::new(vb.pp("q_proj"), inner, d, Act::None)?,
            k: Linear::new(vb.pp("k_proj"), inner, d, Act::None)?,
            v: Linear::new(vb.pp("v_proj"), inner, d, Act::None)?,
            out: Linear::new(vb.pp("out_proj"), d, inner, Act::None)?,
            heads,
        })
    }
}

impl SamAttention {
    pub fn forward(
        &self,
        rec: &mut Recorder,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mode: Mode,
    ) -> Result<(Tensor, Option<SamAttentionSaved>)> {
        let (qp, lq) = self.q.forward(rec, q, mode)?;
        let (kp, lk) = self.k.forward(rec, k, mode)?;
        let (vp, lv) = self.v.forward(rec, v, mode)?;
        if !mode.train() {
            // An input of batch 1 among inputs of batch B (the image shared by B prompts) is
            // projected once and its projection repeated.
            let nb = q.shape[0].max(k.shape[0]).max(v.shape[0]);
            let qp = repeat_batch(rec, &qp, nb)?;
            let kp = repeat_batch(rec, &kp, nb)?;
            let vp = repeat_batch(rec, &vp, nb)?;
            let o = mha(rec, &qp, &kp, &vp, self.heads)?;
            return Ok((self.out.forward(rec, &o, mode)?.0, None));
        }
        let attn = mha_train(rec, &qp, &kp, &vp, self.heads)?;
        let (y, lo) = self.out.forward(rec, &attn.out, mode)?;
        let s = (|| {
            Some(SamAttentionSaved {
                q: lq?,
                k: lk?,
                v: lv?,
                out: lo?,
                qp,
                kp,
                vp,
                attn,
            })
        })();
        Ok((y, s))
    }

    /// Returns (dq, dk, dv) for the three inputs.
    pub fn backward(
        &self,
        rec: &mut Recorder,
        c: &SamAttentionSaved,
        dy: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let dout = self.out.backward(rec, &c.out, dy)?;
        let (dqp, dkp, dvp) = mha_backward(rec, &c.qp, &c.kp, &c.vp, &c.attn, &dout, self.heads)?;
        let dq = self.q.backward(rec, &c.q, &dqp)?;
        let dk = self.k.backward(rec, &c.k, &dkp)?;
        let dv = self.v.backward(rec, &c.v, &dvp)?;
        Ok((dq, dk, dv))
    }
}

/// `t` `[1, ..]` repeated to `[b, ..]` (`t` itself when its batch is already `b`).
fn repeat_batch(rec: &mut Recorder, t: &Tensor, b: usize) -> Result<Tensor> {
    if t.shape[0] == b {
        return Ok(t.clone());
    }
    if t.shape[0] != 1 {
        return Err(Error::Invalid(format!(
            "two-way transformer: batch {:?} does not broadcast to {b}",
            t.shape
        )));
    }
    let mut shape = t.shape.clone();
    shape[0] = b;
    let out = rec.gpu.empty(&shape)?;
    for i in 0..b {
        rec.copy(t, &out.narrow(i, 1));
    }
    Ok(out)
}

/// `acc += t`, or `acc = t` when empty.
fn add_into(rec: &mut Recorder, acc: &mut Option<Tensor>, t: Tensor) -> Result<()> {
    match acc {
        Some(a) => accumulate(rec, a, &t),
        None => {
            *acc = Some(t);
            Ok(())
        }
    }
}

/// One two-way block: self-attention of the tokens (layer 0 without PE and residual), tokens →
/// image cross-attention, ReLU MLP, image → tokens cross-attention; each followed by a LayerNorm.
pub struct TwoWayBlock<P = Param> {
    self_attn: SamAttention<P>,
    norm1: LayerNorm<P>,
    t2i: SamAttention<P>,
    norm2: LayerNorm<P>,
    lin1: Linear<P>,
    lin2: Linear<P>,
    norm3: LayerNorm<P>,
    norm4: LayerNorm<P>,
    i2t: SamAttention<P>,
    first: bool,
}

pub struct TwoWayBlockSaved {
    sa: SamAttentionSaved,
    ln1: LayerNormSaved,
    t2i: SamAttentionSaved,
    ln2: LayerNormSaved,
    m1: LinearSaved,
    m2: LinearSaved,
    ln3: LayerNormSaved,
    i2t: SamAttentionSaved,
    ln4: LayerNormSaved,
}

impl<P: Clone> TwoWayBlock<P> {
    pub fn new<S: Source<P = P>>(vb: Vb<S>, cfg: &Config, first: bool) -> Result<Self> {
        let (dm, h) = (cfg.transformer_dim, cfg.decoder_heads);
        let self_attn = SamAttention::new(vb.pp("self_attn"), dm, dm, h)?;
        let norm1 = LayerNorm::new(vb.pp("norm1"), dm, LN_EPS, Act::None)?;
        let t2i = SamAttention::new(vb.pp("cross_attn_token_to_image"), dm, dm / 2, h)?;
        let norm2 = LayerNorm::new(vb.pp("norm2"), dm, LN_EPS, Act::None)?;
        let lin1 = Linear::new(vb.pp("mlp.lin1"), cfg.decoder_mlp_dim, dm, Act::Relu)?;
        let lin2 = Linear::new(vb.pp("mlp.lin2"), dm, cfg.decoder_mlp_dim, Act::None)?;
        let norm3 = LayerNorm::new(vb.pp("norm3"), dm, LN_EPS, Act::None)?;
        let norm4 = LayerNorm::new(vb.pp("norm4"), dm, LN_EPS, Act::None)?;
        let i2t = SamAttention::new(vb.pp("cross_attn_image_to_token"), dm, dm / 2, h)?;
        Ok(TwoWayBlock {
            self_attn,
            norm1,
            t2i,
            norm2,
            lin1,
            lin2,
            norm3,
            norm4,
            i2t,
            first,
        })
    }
}

impl TwoWayBlock {
    /// Queries q `[B, nt, D]` with their PE `tok_pe`, keys k `[B, L, D]` with their PE `key_pe` `[L, D]`
    /// (in eval mode k may be `[1, L, D]`, one image shared by the B token sets: its projections
    /// are computed once).
    pub fn forward(
        &self,
        rec: &mut Recorder,
        q: &Tensor,
        k: &Tensor,
        tok_pe: &Tensor,
        key_pe: &Tensor,
        mode: Mode,
    ) -> Result<(Tensor, Tensor, Option<TwoWayBlockSaved>)> {
        // Self-attention (layer 0 skips the PE and the residual).
        let (q1, sa) = if self.first {
            self.self_attn.forward(rec, q, q, q, mode)?
        } else {
            let qp = add(rec, q, tok_pe)?;
            let (a, sa) = self.self_attn.forward(rec, &qp, &qp, q, mode)?;
            (add(rec, q, &a)?, sa)
        };
        let (q1n, ln1) = self.norm1.forward(rec, &q1, mode)?;
        // Tokens -> image.
        let qp = add(rec, &q1n, tok_pe)?;
        let kp = binary(rec, k, key_pe, BinOp::Add)?;
        let (a, t2i) = self.t2i.forward(rec, &qp, &kp, k, mode)?;
        let q2 = add(rec, &q1n, &a)?;
        let (q2n, ln2) = self.norm2.forward(rec, &q2, mode)?;
        // MLP (ReLU).
        let (h, m1) = self.lin1.forward(rec, &q2n, mode)?;
        let (q3, m2) = self.lin2.forward_res(rec, &h, Some(&q2n), mode)?;
        let (q3n, ln3) = self.norm3.forward(rec, &q3, mode)?;
        // Image -> tokens.
        let qp = add(rec, &q3n, tok_pe)?;
        let (a, i2t) = self.i2t.forward(rec, &kp, &qp, &q3n, mode)?;
        // Keys shared by the batch (eval only): k + a with k broadcast (the same sums).
        let k1 = if k.shape[0] < a.shape[0] {
            add(rec, &a, k)?
        } else {
            add(rec, k, &a)?
        };
        let (k1n, ln4) = self.norm4.forward(rec, &k1, mode)?;
        let s = (|| {
            Some(TwoWayBlockSaved {
                sa: sa?,
                ln1: ln1?,
                t2i: t2i?,
                ln2: ln2?,
                m1: m1?,
                m2: m2?,
                ln3: ln3?,
                i2t: i2t?,
                ln4: ln4?,
            })
        })();
        Ok((q3n, k1n, s))
    }

    /// From (dq, dk) of the outputs, returns those of the inputs; the gradient of the token PE is
    /// added into `dtpe`.
    pub fn backward(
        &self,
        rec: &mut Recorder,
        c: &TwoWayBlockSaved,
        dq: Tensor,
        dk: &Tensor,
        dtpe: &mut Option<Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        // Image -> tokens: k1 = k + i2t(k + PE, q3n + T, q3n); k1n = LN4(k1).
        let dk1 = self.norm4.backward(rec, &c.ln4, dk, None)?;
        let (dkp_a, dqp3, dq3v) = self.i2t.backward(rec, &c.i2t, &dk1)?;
        let dkk = dk1; // residual
        let dq3n = dq;
        accumulate(rec, &dq3n, &dqp3)?;
        accumulate(rec, &dq3n, &dq3v)?;
        add_into(rec, dtpe, dqp3)?;
        // MLP: q3 = q2n + lin2(relu(lin1(q2n))); q3n = LN3(q3).
        let dq3 = self.norm3.backward(rec, &c.ln3, &dq3n, None)?;
        let dh = self.lin2.backward(rec, &c.m2, &dq3)?;
        let dq2n_mlp = self.lin1.backward(rec, &c.m1, &dh)?;
        let dq2n = dq3;
        accumulate(rec, &dq2n, &dq2n_mlp)?;
        // Tokens -> image: q2 = q1n + t2i(q1n + T, k + PE, k); q2n = LN2(q2).
        let dq2 = self.norm2.backward(rec, &c.ln2, &dq2n, None)?;
        let (dqp2, dkp2, dkv2) = self.t2i.backward(rec, &c.t2i, &dq2)?;
        let dq1n = dq2;
        accumulate(rec, &dq1n, &dqp2)?;
        add_into(rec, dtpe, dqp2)?;
        accumulate(rec, &dkp_a, &dkp2)?;
        accumulate(rec, &dkk, &dkv2)?;
        // kp = k + PE (the same kp feeds i2t and t2i).
        accumulate(rec, &dkk, &dkp_a)?;
        // Self-attention.
        let dq1 = self.norm1.backward(rec, &c.ln1, &dq1n, None)?;
        let (dqa, dka, dva) = self.self_attn.backward(rec, &c.sa, &dq1)?;
        let dq = if self.first {
            // q1 = sa(q, q, q) (no residual, no PE)
            accumulate(rec, &dqa, &dka)?;
            accumulate(rec, &dqa, &dva)?;
            dqa
        } else {
            // q1 = q + sa(q + T, q + T, q)
            let dqq = dq1;
            accumulate(rec, &dqq, &dva)?;
            accumulate(rec, &dqa, &dka)?;
            accumulate(rec, &dqq, &dqa)?;
            add_into(rec, dtpe, dqa)?;
            dqq
        };
        Ok((dq, dkk))
    }
}

/// The two-way transformer: its blocks, then a final tokens → image attention and LayerNorm.
pub struct TwoWayTransformer<P = Param> {
    layers: Vec<TwoWayBlock<P>>,
    final_attn: SamAttention<P>,
    norm_final: LayerNorm<P>,
}

pub struct TwoWayTransformerSaved {
    layers: Vec<TwoWayBlockSaved>,
    fin: SamAttentionSaved,
    lnf: LayerNormSaved,
}

impl<P: Clone> TwoWayTransformer<P> {
    pub fn new<S: Source<P = P>>(vb: Vb<S>, cfg: &Config) -> Result<Self> {
        let mut layers = Vec::new();
        for i in 0..cfg.decoder_depth {
            layers.push(TwoWayBlock::new(vb.pp(format!("layers.{i}")), cfg, i == 0)?);
        }
        let dm = cfg.transformer_dim;
        let final_attn = SamAttention::new(
            vb.pp("final_attn_token_to_image"),
            dm,
            dm / 2,
            cfg.decoder_heads,
        )?;
        let norm_final = LayerNorm::new(vb.pp("norm_final_attn"), dm, LN_EPS, Act::None)?;
        Ok(TwoWayTransformer {
            layers,
            final_attn,
            norm_final,
        })
    }
}

impl TwoWayTransformer {
    /// Tokens (= their own PE) `[B, nt, D]`, image src `[B, L, D]`, image PE `[L, D]` →
    /// (tokens `[B, nt, D]`, image `[B, L, D]`).
    pub fn forward(
        &self,
        rec: &mut Recorder,
        tok_pe: &Tensor,
        src: &Tensor,
        key_pe: &Tensor,
        mode: Mode,
    ) -> Result<(Tensor, Tensor, Option<TwoWayTransformerSaved>)> {
        let mut q = tok_pe.clone();
        let mut k = src.clone();
        let mut layers = Vec::new();
        for ly in &self.layers {
            let (q1, k1, s) = ly.forward(rec, &q, &k, tok_pe, key_pe, mode)?;
            layers.extend(s);
            q = q1;
            k = k1;
        }
        let k = repeat_batch(rec, &k, q.shape[0])?;
        let qp = add(rec, &q, tok_pe)?;
        let kp = binary(rec, &k, key_pe, BinOp::Add)?;
        let (a, fin) = self.final_attn.forward(rec, &qp, &kp, &k, mode)?;
        let qs = add(rec, &q, &a)?;
        let (q, lnf) = self.norm_final.forward(rec, &qs, mode)?;
        Ok((
            q,
            k,
            (|| {
                Some(TwoWayTransformerSaved {
                    layers,
                    fin: fin?,
                    lnf: lnf?,
                })
            })(),
        ))
    }

    /// Returns (d tokens incl. their PE use, d src).
    pub fn backward(
        &self,
        rec: &mut Recorder,
        c: &TwoWayTransformerSaved,
        dtok: &Tensor,
        dimg: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        if c.layers.len() != self.layers.len() {
            return Err(Error::Invalid(
                "two-way transformer: saved state does not match its layers".into(),
            ));
        }
        let mut dtpe: Option<Tensor> = None; // gradient w.r.t. the token PE (= the initial tokens)
        // Final attention.
        let dqf = self.norm_final.backward(rec, &c.lnf, dtok, None)?;
        let (dqp, dkp, dkv) = self.final_attn.backward(rec, &c.fin, &dqf)?;
        let dq = dqf;
        accumulate(rec, &dq, &dqp)?;
        add_into(rec, &mut dtpe, dqp)?;
        let dk = rec.clone_tensor(dimg)?;
        accumulate(rec, &dk, &dkp)?;
        accumulate(rec, &dk, &dkv)?;
        let (mut dq, mut dk) = (dq, dk);
        for (ly, s) in self.layers.iter().zip(&c.layers).rev() {
            let (q, k) = ly.backward(rec, s, dq, &dk, &mut dtpe)?;
            dq = q;
            dk = k;
        }
        // The initial queries are the tokens themselves.
        if let Some(t) = &dtpe {
            accumulate(rec, &dq, t)?;
        }
        Ok((dq, dk))
    }
}
