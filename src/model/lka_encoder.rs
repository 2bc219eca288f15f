//! LKA-Encoder (paper §3.1): TinyViT-5M layout (PatchEmbed, an MBConv stage, three TinyViT stages
//! with PatchMerging between them, the SAM neck) whose attention is Group Attention (Eq. 3-4) and
//! whose MLP is the sequential Hybrid Expert Head (Eq. 5); docs/model.md, "LKA-Encoder".

use super::blocks::{
    AttnCoreSaved, Conv2d, Conv2dBn, Conv2dBnSaved, ConvKind, ConvSaved, LN_EPS, LN2D_EPS,
    LayerNorm, LayerNormSaved, Linear, LinearSaved, Mode, Param, Source, Vb, chain_backward,
    chain_backward_from, chain_recompute, window_attention, window_attention_backward,
};
use super::config::{Config, Variant};
use super::med_fastsam::Stages;
use crate::error::{Error, Result};
use crate::gpu::{Recorder, Tensor};
use crate::ops::attention::{
    window_partition, window_partition_backward, window_reverse_add, window_reverse_add_backward,
};
use crate::ops::conv::ConvGeom;
use crate::ops::elementwise::{
    accumulate, act_backward, activation, add, slice_mid, slice_mid_backward,
};
use crate::ops::matmul::{Act, Gemm, gemm, linear_residual_act};
use crate::ops::norm::BnSaved;

/// `Some(..)` when every part is `Some` (train mode), else `None`.
macro_rules! saved {
    ($e:expr) => {
        (|| Some($e))()
    };
}
pub(crate) use saved;

// ---------------------------------------------------------------- PatchEmbed

/// PatchEmbed: Conv2d_BN(3→C0/2, 3×3 s2) → GELU → Conv2d_BN(C0/2→C0, 3×3 s2), [B,S,S,3] →
/// [B,S/4,S/4,C0]; with patch stride 1 (LiteMedSAM) both convolutions are 1×1, [B,S,S,C0].
pub struct PatchEmbed<P = Param> {
    c0: Conv2dBn<P>,
    c2: Conv2dBn<P>,
}

pub struct PatchEmbedSaved {
    c0: Conv2dBnSaved,
    c2: Conv2dBnSaved,
}

impl<P: Clone> PatchEmbed<P> {
    pub fn new<S: Source<P = P>>(vb: Vb<S>, c0: usize, patch_stride: usize) -> Result<Self> {
        let (k, kind) = if patch_stride == 1 {
            (1, ConvKind::Pointwise)
        } else {
            (3, ConvKind::Dense { stride: 2, pad: 1 })
        };
        Ok(PatchEmbed {
            c0: Conv2dBn::new(vb.pp("seq.0"), c0 / 2, 3, k, kind, Act::Gelu)?,
            c2: Conv2dBn::new(vb.pp("seq.2"), c0, c0 / 2, k, kind, Act::None)?,
        })
    }
}

impl PatchEmbed {
    pub fn forward(
        &self,
        rec: &mut Recorder,
        x: &Tensor,
        mode: Mode,
    ) -> Result<(Tensor, Option<PatchEmbedSaved>)> {
        let (h, mut c0) = self.c0.forward(rec, x, mode)?;
        let (y, mut c2) = self.c2.forward(rec, &h, mode)?;
        // The first convolution (3 input channels) is cheap to recompute; its output is large.
        c0.iter_mut().for_each(Conv2dBnSaved::release_z);
        c2.iter_mut().for_each(Conv2dBnSaved::release_input);
        Ok((y, saved!(PatchEmbedSaved { c0: c0?, c2: c2? })))
    }

    /// The input is the image: parameter gradients only.
    pub fn backward(&self, rec: &mut Recorder, s: &PatchEmbedSaved, dy: &Tensor) -> Result<()> {
        chain_backward(rec, &[(&self.c0, &s.c0), (&self.c2, &s.c2)], dy, false)?;
        Ok(())
    }
}

// ---------------------------------------------------------------- MBConv

/// MBConv: GELU(x + BN(conv1×1)(GELU(BN(dw3×3)(GELU(BN(conv1×1)(x)))))). In train mode, when its
/// 4x-wide hidden map exceeds the device's storage-binding limit (the paper preset at 1024² with
/// batch 4: 256 MiB), the hidden channels are processed in groups: the expansion conv, its
/// BatchNorm (per channel, so exact), the depthwise conv and its BatchNorm run per group, and the
/// projection sums the groups' contributions.
pub struct MbConv<P = Param> {
    conv1: Conv2dBn<P>,
    conv2: Conv2dBn<P>,
    conv3: Conv2dBn<P>,
}

pub struct MbConvSaved {
    path: MbPath,
    /// The block's input (kept by its first convolution too). The sum x + BN(conv3(..)) before
    /// the GELU is recomputed from it and conv3's saved output.
    x: Tensor,
}

#[allow(clippy::large_enum_variant)] // one per MBConv block, held for one step
enum MbPath {
    Whole {
        c1: Conv2dBnSaved,
        c2: Conv2dBnSaved,
        c3: Conv2dBnSaved,
    },
    Grouped {
        groups: Vec<MbGroup>,
        z3: Tensor,
        bn3: BnSaved,
    },
}

struct MbGroup {
    conv1: Conv2dBn,
    conv2: Conv2dBn,
    c1: Conv2dBnSaved,
    c2: Conv2dBnSaved,
    w3: Tensor,
    c0: usize,
}

/// Number of hidden-channel groups so that each group's map fits one storage binding.
fn hidden_groups(rec: &Recorder, rows: usize, hidden: usize) -> Result<usize> {
    let limit = rec
        .gpu
        .limits
        .max_storage_buffer_binding_size
        .min(rec.gpu.limits.max_buffer_size);
    let bytes = (rows * hidden * 4) as u64;
    let forced = rec.plan.min_mbconv_groups;
    let mut g = (bytes.div_ceil(limit).max(1) as usize).max(forced);
    while g <= hidden {
        if hidden.is_multiple_of(g) && (g == 1 || (hidden / g).is_multiple_of(64)) {
            return Ok(g);
        }
        g += 1;
    }
    Err(Error::Limit {
        what: format!("MBConv hidden map of {rows} positions x {hidden} channels"),
        needed: bytes,
        limit_name: "max_storage_buffer_binding_size",
        limit,
        hint: "use a smaller batch or image size".into(),
    })
}

/// Expansion (1x1), depthwise and projection `Conv2dBn` run one after the other (MBConv and
/// PatchMerging). In train mode the saved state keeps the input, the projection's convolution
/// output and the statistics: the expansion's and the depthwise convolution's outputs and the
/// later layers' inputs are cheap to recompute ([`chain_backward`]) and large, so released.
fn expand_chain(
    rec: &mut Recorder,
    [conv1, conv2, conv3]: [&Conv2dBn; 3],
    x: &Tensor,
    mode: Mode,
) -> Result<(Tensor, Option<[Conv2dBnSaved; 3]>)> {
    let (h, c1) = conv1.forward(rec, x, mode)?;
    let (h, c2) = conv2.forward(rec, &h, mode)?;
    let (y, c3) = conv3.forward(rec, &h, mode)?;
    let saved = saved!([c1?, c2?, c3?]).map(|[mut c1, mut c2, mut c3]| {
        c1.release_z();
        c2.release_z();
        c2.release_input();
        c3.release_input();
        [c1, c2, c3]
    });
    Ok((y, saved))
}

fn nothing_saved(what: &str) -> Error {
    Error::Invalid(format!("{what}: nothing saved in train mode"))
}

impl<P: Clone> MbConv<P> {
    pub fn new<S: Source<P = P>>(vb: Vb<S>, d: usize, hidden: usize) -> Result<Self> {
        Ok(MbConv {
            conv1: Conv2dBn::new(vb.pp("conv1"), hidden, d, 1, ConvKind::Pointwise, Act::Gelu)?,
            conv2: Conv2dBn::new(
                vb.pp("conv2"),
                hidden,
                1,
                3,
                ConvKind::Depthwise { stride: 1, pad: 1 },
                Act::Gelu,
            )?,
            conv3: Conv2dBn::new(vb.pp("conv3"), d, hidden, 1, ConvKind::Pointwise, Act::None)?,
        })
    }
}

impl MbConv {
    pub fn forward(
        &self,
        rec: &mut Recorder,
        x: &Tensor,
        mode: Mode,
    ) -> Result<(Tensor, Option<MbConvSaved>)> {
        if !mode.train() {
            let (h, _) = self.conv1.forward(rec, x, mode)?;
            let (h, _) = self.conv2.forward(rec, &h, mode)?;
            if let Some((w, b)) = self.conv3.folded() {
                // conv3 (1x1) + residual + GELU in one GEMM epilogue (the residual before the activation).
                let y = linear_residual_act(
                    rec,
                    &h,
                    &w.reshape(&[w.shape[0], w.shape[1]]),
                    Some(b),
                    x,
                    Act::Gelu,
                )?;
                return Ok((y, None));
            }
            let (z, _) = self.conv3.forward(rec, &h, mode)?;
            let s = add(rec, &z, x)?;
            return Ok((activation(rec, &s, Act::Gelu)?, None));
        }
        let hidden = self.conv1.weight()?.v.shape[0];
        let c = x.dim(-1);
        let rows = x.numel() / c;
        let ng = hidden_groups(rec, rows, hidden)?;
        let (z, path) = if ng == 1 {
            // The 4x-wide hidden maps are recomputed in the backward (one 1x1 convolution and a
            // depthwise one): 8 of the block's 11 channel-widths of saved activations.
            let (z, saved) = expand_chain(rec, [&self.conv1, &self.conv2, &self.conv3], x, mode)?;
            let [c1, c2, c3] = saved.ok_or_else(|| nothing_saved("MBConv"))?;
            (z, MbPath::Whole { c1, c2, c3 })
        } else {
            let n = hidden / ng;
            let w3_all = &self.conv3.weight()?.v;
            let z3 = rec.gpu.empty(&x.shape)?;
            let mut groups = Vec::new();
            for gi in 0..ng {
                let c0 = gi * n;
                let conv1 = self.conv1.out_channels(c0, n)?;
                let conv2 = self.conv2.out_channels(c0, n)?;
                let (h, c1) = conv1.forward(rec, x, mode)?;
                let (h2, c2) = conv2.forward(rec, &h, mode)?;
                drop(h);
                let w3 = slice_mid(rec, w3_all, c, hidden, 1, c0, n)?.reshape(&[c, n]);
                let mut g = Gemm::new(rows, c, n);
                g.trans_b = true;
                g.accumulate = gi > 0;
                gemm(rec, &g, &h2, &w3, None, None, &z3)?;
                let (mut c1, mut c2) = c1.zip(c2).ok_or_else(|| nothing_saved("MBConv"))?;
                c1.release_z();
                c2.release_z();
                c2.release_input();
                groups.push(MbGroup {
                    conv1,
                    conv2,
                    c1,
                    c2,
                    w3,
                    c0,
                });
            }
            let (z, bn3) = self.conv3.bn_forward(rec, &z3)?;
            (z, MbPath::Grouped { groups, z3, bn3 })
        };
        // y = GELU(x + BN(conv3(...)))
        let s = add(rec, &z, x)?;
        let y = activation(rec, &s, Act::Gelu)?;
        Ok((y, Some(MbConvSaved { path, x: x.clone() })))
    }

    pub fn backward(&self, rec: &mut Recorder, c: &MbConvSaved, dy: &Tensor) -> Result<Tensor> {
        let zb = match &c.path {
            MbPath::Whole { c3, .. } => self.conv3.output(rec, c3)?,
            MbPath::Grouped { z3, bn3, .. } => self.conv3.bn_output(rec, z3, bn3)?,
        };
        let s = add(rec, &zb, &c.x)?;
        drop(zb);
        let ds = act_backward(rec, &s, dy, Act::Gelu)?;
        drop(s);
        let dx = match &c.path {
            MbPath::Whole { c1, c2, c3 } => {
                let chain = [(&self.conv1, c1), (&self.conv2, c2), (&self.conv3, c3)];
                chain_backward(rec, &chain, &ds, true)?
                    .ok_or_else(|| Error::Invalid("MBConv: no input gradient".into()))?
            }
            MbPath::Grouped { groups, z3, bn3 } => {
                let dz3 = self.conv3.bn_backward(rec, z3, bn3, &ds)?;
                let ch = c.x.dim(-1);
                let rows = dz3.numel() / ch;
                let w3 = self.conv3.weight()?;
                let hidden = w3.v.shape[1];
                let dx = rec.zeros(&c.x.shape)?;
                for g in groups {
                    let n = g.w3.shape[1];
                    let chain = [(&g.conv1, &g.c1), (&g.conv2, &g.c2)];
                    let (xs, zs) = chain_recompute(rec, &chain)?;
                    let h2 = g.conv2.output_of(rec, &g.c2, &zs[1])?;
                    if let Some(gw3) = &w3.g {
                        // dW3[:, c0..c0+n] += dz3^T h2
                        let part = rec.gpu.empty(&[ch, n, 1])?;
                        let mut gm = Gemm::new(ch, n, rows);
                        gm.trans_a = true;
                        gemm(rec, &gm, &dz3, &h2, None, None, &part)?;
                        slice_mid_backward(
                            rec,
                            &part,
                            &gw3.reshape(&[ch, hidden, 1]),
                            hidden,
                            g.c0,
                        )?;
                    }
                    let dh2 = rec.gpu.empty(&[rows, n])?;
                    gemm(rec, &Gemm::new(rows, n, ch), &dz3, &g.w3, None, None, &dh2)?;
                    let mut hshape = c.x.shape.clone();
                    if let Some(l) = hshape.last_mut() {
                        *l = n;
                    }
                    drop(h2);
                    let dxg =
                        chain_backward_from(rec, &chain, xs, zs, &dh2.reshape(&hshape), true)?
                            .ok_or_else(|| Error::Invalid("MBConv: no input gradient".into()))?;
                    accumulate(rec, &dx, &dxg)?;
                }
                dx
            }
        };
        accumulate(rec, &dx, &ds)?; // the residual branch
        Ok(dx)
    }
}

// ---------------------------------------------------------------- PatchMerging

/// PatchMerging: Conv2d_BN 1×1 → GELU → depthwise Conv2d_BN 3×3 (stride 2, or 1 into the last
/// stage) → GELU → Conv2d_BN 1×1.
pub struct PatchMerging<P = Param> {
    conv1: Conv2dBn<P>,
    conv2: Conv2dBn<P>,
    conv3: Conv2dBn<P>,
}

pub struct PatchMergingSaved {
    c1: Conv2dBnSaved,
    c2: Conv2dBnSaved,
    c3: Conv2dBnSaved,
}

impl<P: Clone> PatchMerging<P> {
    pub fn new<S: Source<P = P>>(vb: Vb<S>, d: usize, out: usize, stride: usize) -> Result<Self> {
        Ok(PatchMerging {
            conv1: Conv2dBn::new(vb.pp("conv1"), out, d, 1, ConvKind::Pointwise, Act::Gelu)?,
            conv2: Conv2dBn::new(
                vb.pp("conv2"),
                out,
                1,
                3,
                ConvKind::Depthwise { stride, pad: 1 },
                Act::Gelu,
            )?,
            conv3: Conv2dBn::new(vb.pp("conv3"), out, out, 1, ConvKind::Pointwise, Act::None)?,
        })
    }
}

impl PatchMerging {
    pub fn forward(
        &self,
        rec: &mut Recorder,
        x: &Tensor,
        mode: Mode,
    ) -> Result<(Tensor, Option<PatchMergingSaved>)> {
        let (y, saved) = expand_chain(rec, [&self.conv1, &self.conv2, &self.conv3], x, mode)?;
        Ok((
            y,
            saved.map(|[c1, c2, c3]| PatchMergingSaved { c1, c2, c3 }),
        ))
    }

    pub fn backward(
        &self,
        rec: &mut Recorder,
        s: &PatchMergingSaved,
        dy: &Tensor,
    ) -> Result<Tensor> {
        let chain = [
            (&self.conv1, &s.c1),
            (&self.conv2, &s.c2),
            (&self.conv3, &s.c3),
        ];
        chain_backward(rec, &chain, dy, true)?
            .ok_or_else(|| Error::Invalid("PatchMerging: no input gradient".into()))
    }
}

// ---------------------------------------------------------------- Group Attention

/// Group Attention (Eq. 3-4) on zero-padded windows of x `[B,H,W,d]`; returns x + attention.
/// `released`: proj(MHA_nat(LN(x))); `paper`: proj(x_nat + MHA_med(x_nat + LN(x))) with
/// x_nat = proj(MHA_nat(LN(x))) (the same projection twice).
pub struct GroupAttention<P = Param> {
    bias: P,
    norm: LayerNorm<P>,
    qkv: Linear<P>,
    proj: Linear<P>,
    /// The medical branch (paper variant): its qkv and relative-position bias.
    med: Option<(Linear<P>, P)>,
    heads: usize,
    ws: usize,
}

pub struct GroupAttentionSaved {
    x_shape: Vec<usize>,
    ln: LayerNormSaved,
    qkv: LinearSaved,
    nat: AttnCoreSaved,
    proj: LinearSaved,
    med: Option<MedSaved>,
}

struct MedSaved {
    qkv: LinearSaved,
    attn: AttnCoreSaved,
    proj: LinearSaved,
}

impl<P: Clone> GroupAttention<P> {
    pub fn new<S: Source<P = P>>(
        vb: Vb<S>,
        d: usize,
        heads: usize,
        ws: usize,
        variant: Variant,
        has_med: bool,
    ) -> Result<Self> {
        let paper = variant == Variant::Paper;
        let bias = vb.get("attention_biases", &[heads, ws * ws])?;
        let med_bias = if paper && has_med {
            Some(vb.get("attention_biases_med", &[heads, ws * ws])?)
        } else {
            if has_med {
                vb.unused("attention_biases_med", &[heads, ws * ws]);
            }
            None
        };
        let norm = LayerNorm::new(vb.pp("norm"), d, LN_EPS, Act::None)?;
        let qkv = Linear::new(vb.pp("qkv"), 3 * d, d, Act::None)?;
        let proj = Linear::new(vb.pp("proj"), d, d, Act::None)?;
        let med = match med_bias {
            Some(b) => Some((Linear::new(vb.pp("med_qkv"), 3 * d, d, Act::None)?, b)),
            None => {
                if has_med {
                    Linear::unused(vb.pp("med_qkv"), 3 * d, d);
                }
                None
            }
        };
        Ok(GroupAttention {
            bias,
            norm,
            qkv,
            proj,
            med,
            heads,
            ws,
        })
    }
}

impl GroupAttention {
    pub fn forward(
        &self,
        rec: &mut Recorder,
        x: &Tensor,
        mode: Mode,
    ) -> Result<(Tensor, Option<GroupAttentionSaved>)> {
        let (heads, ws) = (self.heads, self.ws);
        let xw = window_partition(rec, x, ws)?; // [NW, n, d]
        let (u, ln) = self.norm.forward(rec, &xw, mode)?;
        drop(xw);
        let (qkv, mut lq) = self.qkv.forward(rec, &u, mode)?;
        // The LayerNorm's output is recomputed for qkv's backward.
        lq.iter_mut().for_each(LinearSaved::release_input);
        let (a_nat, nat) = window_attention(rec, &qkv, &self.bias, heads, ws, mode)?;
        drop(qkv);
        let (y, proj, med) = match &self.med {
            None => {
                let (y, p) = self.proj.forward(rec, &a_nat, mode)?;
                (y, p, None)
            }
            Some((med_qkv, med_bias)) => {
                let (x_nat, p1) = self.proj.forward(rec, &a_nat, mode)?;
                let m = add(rec, &x_nat, &u)?;
                let (qkv_med, mq) = med_qkv.forward(rec, &m, mode)?;
                drop(m);
                let (a_med, am) = window_attention(rec, &qkv_med, med_bias, heads, ws, mode)?;
                let t = add(rec, &x_nat, &a_med)?;
                let (y, p2) = self.proj.forward(rec, &t, mode)?;
                (
                    y,
                    p1,
                    saved!(MedSaved {
                        qkv: mq?,
                        attn: am?,
                        proj: p2?
                    }),
                )
            }
        };
        let y = window_reverse_add(rec, &y, x, ws)?;
        let paper = self.med.is_some();
        let s = saved!(GroupAttentionSaved {
            x_shape: x.shape.clone(),
            ln: ln?,
            qkv: lq?,
            nat: nat?,
            proj: proj?,
            med: if paper { Some(med?) } else { None },
        });
        Ok((y, s))
    }

    /// From the gradient of x + attention, returns the gradient of x.
    pub fn backward(
        &self,
        rec: &mut Recorder,
        c: &GroupAttentionSaved,
        dx1: &Tensor,
    ) -> Result<Tensor> {
        // x1 = x + reverse(y): dy_win = partition(dx1); dx (residual) = dx1.
        let dyw = window_reverse_add_backward(rec, dx1, self.ws, None)?;
        let (da_nat, du_extra) = match (&self.med, &c.med) {
            (Some((med_qkv, med_bias)), Some(m)) => {
                let dt = self.proj.backward(rec, &m.proj, &dyw)?;
                // t = x_nat + a_med
                let dqm =
                    window_attention_backward(rec, med_bias, &m.attn, &dt, self.heads, self.ws)?;
                let dm = med_qkv.backward(rec, &m.qkv, &dqm)?;
                // m = x_nat + u
                let dx_nat = dt;
                accumulate(rec, &dx_nat, &dm)?;
                (self.proj.backward(rec, &c.proj, &dx_nat)?, Some(dm))
            }
            _ => (self.proj.backward(rec, &c.proj, &dyw)?, None),
        };
        let dqkv =
            window_attention_backward(rec, &self.bias, &c.nat, &da_nat, self.heads, self.ws)?;
        let u = self.norm.output(rec, &c.ln)?;
        let du = self.qkv.backward_with(rec, &c.qkv, &u, &dqkv)?;
        drop(u);
        if let Some(e) = &du_extra {
            accumulate(rec, &du, e)?;
        }
        let dxw = self.norm.backward(rec, &c.ln, &du, None)?;
        window_partition_backward(rec, &dxw, &c.x_shape, self.ws, Some(dx1))
    }
}

// ---------------------------------------------------------------- MLP, TinyViT block

/// Pre-norm MLP with residual: x + fc2(GELU(fc1(LN(x)))).
pub struct Mlp<P = Param> {
    norm: LayerNorm<P>,
    fc1: Linear<P>,
    fc2: Linear<P>,
}

pub struct MlpSaved {
    ln: LayerNormSaved,
    f1: LinearSaved,
    f2: LinearSaved,
}

impl<P: Clone> Mlp<P> {
    pub fn new<S: Source<P = P>>(vb: Vb<S>, d: usize, hidden: usize) -> Result<Self> {
        Ok(Mlp {
            norm: LayerNorm::new(vb.pp("norm"), d, LN_EPS, Act::None)?,
            fc1: Linear::new(vb.pp("fc1"), hidden, d, Act::Gelu)?,
            fc2: Linear::new(vb.pp("fc2"), d, hidden, Act::None)?,
        })
    }
}

impl Mlp {
    pub fn forward(
        &self,
        rec: &mut Recorder,
        x: &Tensor,
        mode: Mode,
    ) -> Result<(Tensor, Option<MlpSaved>)> {
        let (h, ln) = self.norm.forward(rec, x, mode)?;
        let (h, mut f1) = self.fc1.forward(rec, &h, mode)?;
        // The LayerNorm's output is recomputed for fc1's backward.
        f1.iter_mut().for_each(LinearSaved::release_input);
        let (y, mut f2) = self.fc2.forward_res(rec, &h, Some(x), mode)?;
        // fc2's input GELU(pre) is recomputed from fc1's pre-activation (`backward_through`).
        f2.iter_mut().for_each(LinearSaved::release_input);
        Ok((
            y,
            saved!(MlpSaved {
                ln: ln?,
                f1: f1?,
                f2: f2?
            }),
        ))
    }

    pub fn backward(&self, rec: &mut Recorder, c: &MlpSaved, dy: &Tensor) -> Result<Tensor> {
        let dpre = self
            .fc2
            .backward_through(rec, &c.f2, dy, &self.fc1, &c.f1)?;
        let u = self.norm.output(rec, &c.ln)?;
        let dh = self.fc1.backward_from_pre_with(rec, &c.f1, &u, &dpre)?;
        drop(u);
        // dx = dy (residual) + LN backward
        let acc = rec.clone_tensor(dy)?;
        self.norm.backward(rec, &c.ln, &dh, Some(&acc))
    }
}

/// TinyViT block with Group Attention and the Hybrid Expert Head:
/// x += GA(x); x = BN(dw3×3(x)); x += MLP_nat(x); x += MLP_med(x). Without the medical branch
/// (MobileSAM, LiteMedSAM) it is TinyViT's block: no `med_qkv`, no MLP_med.
pub struct TinyVitBlock<P = Param> {
    attn: GroupAttention<P>,
    local_conv: Conv2dBn<P>,
    mlp: Mlp<P>,
    mlp_med: Option<Mlp<P>>,
}

pub struct TinyVitBlockSaved {
    attn: GroupAttentionSaved,
    local: Conv2dBnSaved,
    mlp: MlpSaved,
    mlp_med: Option<MlpSaved>,
}

impl<P: Clone> TinyVitBlock<P> {
    pub fn new<S: Source<P = P>>(
        vb: Vb<S>,
        cfg: &Config,
        s: usize,
        variant: Variant,
    ) -> Result<Self> {
        let d = cfg.embed_dims[s];
        let attn = GroupAttention::new(
            vb.pp("attn"),
            d,
            cfg.num_heads[s],
            cfg.window_sizes[s],
            variant,
            cfg.arch.is_med_fastsam(),
        )?;
        let mlp = Mlp::new(vb.pp("mlp"), d, cfg.mlp_ratio * d)?;
        let mlp_med = if cfg.arch.is_med_fastsam() {
            Some(Mlp::new(vb.pp("mlp_med"), d, cfg.mlp_ratio * d)?)
        } else {
            None
        };
        let dw = ConvKind::Depthwise { stride: 1, pad: 1 };
        let local_conv = Conv2dBn::new(vb.pp("local_conv"), d, 1, 3, dw, Act::None)?;
        Ok(TinyVitBlock {
            attn,
            local_conv,
            mlp,
            mlp_med,
        })
    }
}

impl TinyVitBlock {
    pub fn forward(
        &self,
        rec: &mut Recorder,
        x: &Tensor,
        mode: Mode,
    ) -> Result<(Tensor, Option<TinyVitBlockSaved>)> {
        let (x, attn) = self.attn.forward(rec, x, mode)?;
        let (x, local) = self.local_conv.forward(rec, &x, mode)?;
        let (x, mlp) = self.mlp.forward(rec, &x, mode)?;
        let (x, mlp_med) = match &self.mlp_med {
            Some(m) => {
                let (y, s) = m.forward(rec, &x, mode)?;
                (y, Some(s))
            }
            None => (x, None),
        };
        Ok((
            x,
            saved!(TinyVitBlockSaved {
                attn: attn?,
                local: local?,
                mlp: mlp?,
                mlp_med: match mlp_med {
                    Some(s) => Some(s?),
                    None => None,
                },
            }),
        ))
    }

    pub fn backward(
        &self,
        rec: &mut Recorder,
        c: &TinyVitBlockSaved,
        dy: &Tensor,
    ) -> Result<Tensor> {
        let d = match (&self.mlp_med, &c.mlp_med) {
            (Some(m), Some(s)) => m.backward(rec, s, dy)?,
            _ => dy.clone(),
        };
        let d = self.mlp.backward(rec, &c.mlp, &d)?;
        let dx1 = self.local_conv.backward(rec, &c.local, &d)?;
        self.attn.backward(rec, &c.attn, &dx1)
    }
}

// ---------------------------------------------------------------- stages, neck, encoder

enum StageBlock<P> {
    MbConv(MbConv<P>),
    Vit(TinyVitBlock<P>),
}

#[allow(clippy::large_enum_variant)] // one per block, held for one step
enum StageBlockSaved {
    MbConv(MbConvSaved),
    Vit(TinyVitBlockSaved),
}

/// One stage: its blocks (MBConv in stage 0, TinyViT blocks after), then PatchMerging for s < 3.
pub struct LkaStage<P = Param> {
    blocks: Vec<StageBlock<P>>,
    downsample: Option<PatchMerging<P>>,
    res: usize,
    c: usize,
}

pub struct LkaStageSaved {
    blocks: Vec<StageBlockSaved>,
    downsample: Option<PatchMergingSaved>,
}

impl<P: Clone> LkaStage<P> {
    pub fn new<S: Source<P = P>>(
        vb: Vb<S>,
        cfg: &Config,
        s: usize,
        variant: Variant,
    ) -> Result<Self> {
        let d = cfg.embed_dims[s];
        let mut blocks = Vec::new();
        for blk in 0..cfg.depths[s] {
            let bv = vb.pp(format!("blocks.{blk}"));
            blocks.push(if s == 0 {
                StageBlock::MbConv(MbConv::new(bv, d, d * cfg.mbconv_expand_ratio)?)
            } else {
                StageBlock::Vit(TinyVitBlock::new(bv, cfg, s, variant)?)
            });
        }
        let downsample = if s < 3 {
            // The merge into the last stage keeps the resolution (MobileSAM's change).
            let stride = if s == 2 { 1 } else { 2 };
            Some(PatchMerging::new(
                vb.pp("downsample"),
                d,
                cfg.embed_dims[s + 1],
                stride,
            )?)
        } else {
            None
        };
        Ok(LkaStage {
            blocks,
            downsample,
            res: cfg.stage_res(s),
            c: d,
        })
    }
}

impl LkaStage {
    /// x `[B,H,W,C_s]` (or tokens) → `[B,H',W',C_{s+1}]`.
    pub fn forward(
        &self,
        rec: &mut Recorder,
        x: &Tensor,
        mode: Mode,
    ) -> Result<(Tensor, Option<LkaStageSaved>)> {
        let (r, c) = (self.res, self.c);
        let b = x.numel() / (r * r * c);
        let mut x = x.reshape(&[b, r, r, c]);
        let mut blocks = Vec::new();
        for blk in &self.blocks {
            x = match blk {
                StageBlock::MbConv(m) => {
                    let (y, s) = m.forward(rec, &x, mode)?;
                    blocks.extend(s.map(StageBlockSaved::MbConv));
                    y
                }
                StageBlock::Vit(v) => {
                    let (y, s) = v.forward(rec, &x, mode)?;
                    blocks.extend(s.map(StageBlockSaved::Vit));
                    y
                }
            };
        }
        let mut downsample = None;
        if let Some(m) = &self.downsample {
            let (y, s) = m.forward(rec, &x, mode)?;
            x = y;
            downsample = s;
        }
        Ok((x, mode.keep(|| LkaStageSaved { blocks, downsample })))
    }

    /// Consumes `c`: each block's saved tensors are released right after its backward.
    pub fn backward(&self, rec: &mut Recorder, c: LkaStageSaved, dy: &Tensor) -> Result<Tensor> {
        let LkaStageSaved { blocks, downsample } = c;
        let mut d = match (&self.downsample, downsample) {
            (Some(m), Some(s)) => m.backward(rec, &s, dy)?,
            _ => dy.clone(),
        };
        if blocks.len() != self.blocks.len() {
            return Err(Error::Invalid(
                "LKA stage: saved state does not match its blocks".into(),
            ));
        }
        for (blk, s) in self.blocks.iter().zip(blocks).rev() {
            d = match (blk, s) {
                (StageBlock::MbConv(m), StageBlockSaved::MbConv(s)) => m.backward(rec, &s, &d)?,
                (StageBlock::Vit(v), StageBlockSaved::Vit(s)) => v.backward(rec, &s, &d)?,
                _ => {
                    return Err(Error::Invalid(
                        "LKA stage: saved state does not match its blocks".into(),
                    ));
                }
            };
        }
        Ok(d)
    }
}

/// Neck: conv1×1 (no bias) → LayerNorm2d → conv3×3 (no bias) → LayerNorm2d. → `[B,S/16,S/16,D]`.
pub struct Neck<P = Param> {
    c0: Linear<P>,
    n1: LayerNorm<P>,
    c2: Conv2d<P>,
    n3: LayerNorm<P>,
    grid: usize,
    c: usize,
}

pub struct NeckSaved {
    c0: LinearSaved,
    n1: LayerNormSaved,
    c2: ConvSaved,
    n3: LayerNormSaved,
}

impl<P: Clone> Neck<P> {
    pub fn new<S: Source<P = P>>(vb: Vb<S>, cfg: &Config) -> Result<Self> {
        let (c, dm) = (cfg.embed_dims[3], cfg.transformer_dim);
        Ok(Neck {
            c0: Linear::conv1x1(vb.pp("0"), dm, c, false, Act::None)?,
            n1: LayerNorm::new(vb.pp("1"), dm, LN2D_EPS, Act::None)?,
            c2: Conv2d::new(vb.pp("2"), dm, dm, 3, ConvGeom { stride: 1, pad: 1 }, false)?,
            n3: LayerNorm::new(vb.pp("3"), dm, LN2D_EPS, Act::None)?,
            grid: cfg.grid(),
            c,
        })
    }
}

impl Neck {
    pub fn forward(
        &self,
        rec: &mut Recorder,
        x: &Tensor,
        mode: Mode,
    ) -> Result<(Tensor, Option<NeckSaved>)> {
        let (g, c) = (self.grid, self.c);
        let x = &x.reshape(&[x.numel() / (g * g * c), g, g, c]);
        let (h, c0) = self.c0.forward(rec, x, mode)?;
        let (h, n1) = self.n1.forward(rec, &h, mode)?;
        let (h, c2) = self.c2.forward(rec, &h, mode)?;
        let (y, n3) = self.n3.forward(rec, &h, mode)?;
        Ok((
            y,
            saved!(NeckSaved {
                c0: c0?,
                n1: n1?,
                c2: c2?,
                n3: n3?
            }),
        ))
    }

    pub fn backward(&self, rec: &mut Recorder, c: &NeckSaved, dy: &Tensor) -> Result<Tensor> {
        let d = self.n3.backward(rec, &c.n3, dy, None)?;
        let d = self.c2.backward(rec, &c.c2, &d)?;
        let d = self.n1.backward(rec, &c.n1, &d, None)?;
        self.c0.backward(rec, &c.c0, &d)
    }
}

/// The whole LKA-Encoder (`image_encoder`): normalised image `[B,S,S,3]` → embedding `[B,S/16,S/16,D]`.
pub struct LkaEncoder<P = Param> {
    pub patch_embed: PatchEmbed<P>,
    pub stages: Vec<LkaStage<P>>,
    pub neck: Neck<P>,
}

pub struct LkaEncoderSaved {
    patch_embed: PatchEmbedSaved,
    stages: Vec<LkaStageSaved>,
    neck: NeckSaved,
}

impl<P: Clone> LkaEncoder<P> {
    pub fn new<S: Source<P = P>>(vb: Vb<S>, cfg: &Config, variant: Variant) -> Result<Self> {
        let patch_embed =
            PatchEmbed::new(vb.pp("patch_embed"), cfg.embed_dims[0], cfg.patch_stride)?;
        let mut stages = Vec::new();
        for s in 0..4 {
            stages.push(LkaStage::new(
                vb.pp(format!("layers.{s}")),
                cfg,
                s,
                variant,
            )?);
        }
        // TinyViT's classifier, not part of any forward (LiteMedSAM's checkpoint has none).
        if cfg.num_classes > 0 {
            LayerNorm::unused(vb.pp("norm_head"), cfg.embed_dims[3]);
            Linear::unused(vb.pp("head"), cfg.num_classes, cfg.embed_dims[3]);
        }
        let neck = Neck::new(vb.pp("neck"), cfg)?;
        Ok(LkaEncoder {
            patch_embed,
            stages,
            neck,
        })
    }
}

impl LkaEncoder {
    /// With `st`, the patch embedding and each stage output are kept for parity checks.
    pub fn forward(
        &self,
        rec: &mut Recorder,
        x: &Tensor,
        mode: Mode,
        mut st: Option<&mut Stages>,
    ) -> Result<(Tensor, Option<LkaEncoderSaved>)> {
        let (mut h, pe) = self.patch_embed.forward(rec, x, mode)?;
        rec.mark(|| "encoder patch embedding".into());
        if let Some(st) = st.as_deref_mut() {
            st.push("encoder.patch_embed", &h);
        }
        let mut stages = Vec::new();
        for (s, stage) in self.stages.iter().enumerate() {
            let (y, sv) = stage.forward(rec, &h, mode)?;
            h = y;
            stages.extend(sv);
            rec.mark(|| format!("encoder stage {s}"));
            if let Some(st) = st.as_deref_mut() {
                st.push(&format!("encoder.layers.{s}"), &h);
            }
        }
        let (emb, neck) = self.neck.forward(rec, &h, mode)?;
        Ok((
            emb,
            saved!(LkaEncoderSaved {
                patch_embed: pe?,
                stages,
                neck: neck?
            }),
        ))
    }

    /// Consumes `c`: each part's saved tensors are released right after its backward.
    pub fn backward(&self, rec: &mut Recorder, c: LkaEncoderSaved, demb: &Tensor) -> Result<()> {
        let LkaEncoderSaved {
            patch_embed,
            stages,
            neck,
        } = c;
        let mut d = self.neck.backward(rec, &neck, demb)?;
        drop(neck);
        rec.mark(|| "encoder neck".into());
        if stages.len() != self.stages.len() {
            return Err(Error::Invalid(
                "LKA encoder: saved state does not match its stages".into(),
            ));
        }
        for (i, (stage, s)) in self.stages.iter().zip(stages).enumerate().rev() {
            d = stage.backward(rec, s, &d)?;
            rec.mark(|| format!("encoder stage {i}"));
        }
        self.patch_embed.backward(rec, &patch_embed, &d)?;
        rec.mark(|| "encoder patch embedding".into());
        Ok(())
    }
}
