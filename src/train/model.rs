//! Med-FastSAM training forward and its explicit backward (docs/training.md: every module's forward keeps
//! what its backward needs; the backward calls the parts in reverse, accumulating parameter
//! gradients into the [`ParamStore`]). Mirrors src/model/*.rs, which hold the inference path.

use super::layers::*;
use super::params::ParamStore;
use crate::error::Result;
use crate::gpu::{Recorder, Tensor};
use crate::model::lka_encoder::{LN2D_EPS, LN_EPS};
use crate::model::Variant;
use crate::ops::attention::{window_partition, window_partition_backward, window_reverse_add, window_reverse_add_backward};
use crate::ops::elementwise::{
    accumulate, act_backward, activation, add, binary, col_sum, concat_last, image_normalize, slice_mid,
    slice_mid_backward, split_last, BinOp,
};
use crate::ops::matmul::{gemm, Act, Gemm};
use crate::ops::norm;
use crate::ops::otsu::{otsu, OtsuRule};
use crate::ops::resize::{bilinear, bilinear_backward};

// ---------------------------------------------------------------- LKA-Encoder

/// MBConv. When its 4x-wide hidden map exceeds the device's storage-binding limit (the paper
/// preset at 1024² with batch 4: 256 MiB), the hidden channels are processed in groups: the
/// expansion conv, its BatchNorm (per channel, so exact), the depthwise conv and its BatchNorm run
/// per group, and the projection sums the groups' contributions.
struct MbConv {
    groups: Vec<MbGroup>,
    /// Projection conv input (ungrouped path) / the summed pre-BatchNorm projection (grouped).
    c3: Option<Cbn>,
    p3: CbnParams,
    z3: Option<Tensor>,
    bn3: Option<norm::BnSaved>,
    s: Tensor,
    x_shape: Vec<usize>,
}

struct MbGroup {
    c1: Cbn,
    c2: Cbn,
    h2: Tensor,
    w3: Tensor,
    c0: usize,
}

/// Tests: a minimum number of MBConv hidden-channel groups (0 = as the device limits require).
#[doc(hidden)]
pub static FORCE_MBCONV_GROUPS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Number of hidden-channel groups so that each group's map fits one storage binding.
fn hidden_groups(rec: &Recorder, rows: usize, hidden: usize) -> Result<usize> {
    let limit = rec.gpu.limits.max_storage_buffer_binding_size.min(rec.gpu.limits.max_buffer_size);
    let bytes = (rows * hidden * 4) as u64;
    let forced = FORCE_MBCONV_GROUPS.load(std::sync::atomic::Ordering::Relaxed);
    let mut g = (bytes.div_ceil(limit).max(1) as usize).max(forced);
    while g <= hidden {
        if hidden % g == 0 && (g == 1 || (hidden / g) % 64 == 0) {
            return Ok(g);
        }
        g += 1;
    }
    Err(crate::error::Error::Limit {
        what: format!("MBConv hidden map of {rows} positions x {hidden} channels"),
        needed: bytes,
        limit_name: "max_storage_buffer_binding_size",
        limit,
        hint: "use a smaller batch or image size".into(),
    })
}

fn mbconv_fwd(ps: &ParamStore, rec: &mut Recorder, pre: &str, x: &Tensor) -> Result<(Tensor, MbConv)> {
    let p1 = CbnParams::get(ps, &format!("{pre}.conv1"))?;
    let p2 = CbnParams::get(ps, &format!("{pre}.conv2"))?;
    let p3 = CbnParams::get(ps, &format!("{pre}.conv3"))?;
    let hidden = p1.w.shape[0];
    let c = x.dim(-1);
    let rows = x.numel() / c;
    let ng = hidden_groups(rec, rows, hidden)?;
    let dw = ConvKind::Depthwise { stride: 1, pad: 1 };
    let (z, mb) = if ng == 1 {
        let (h, c1) = cbn_fwd_p(rec, &p1, x, ConvKind::Pointwise, Act::Gelu)?;
        let (h, c2) = cbn_fwd_p(rec, &p2, &h, dw, Act::Gelu)?;
        let (z, c3) = cbn_fwd_p(rec, &p3, &h, ConvKind::Pointwise, Act::None)?;
        let g = MbGroup { c1, c2, h2: h, w3: p3.w.clone(), c0: 0 };
        (z, (vec![g], Some(c3), None, None))
    } else {
        let n = hidden / ng;
        let z3 = rec.gpu.empty(&x.shape)?;
        let mut groups = Vec::new();
        for gi in 0..ng {
            let c0 = gi * n;
            let (h, c1) = cbn_fwd_p(rec, &p1.out_channels(c0, n), x, ConvKind::Pointwise, Act::Gelu)?;
            let (h2, c2) = cbn_fwd_p(rec, &p2.out_channels(c0, n), &h, dw, Act::Gelu)?;
            drop(h);
            let w3 = slice_mid(rec, &p3.w, c, hidden, 1, c0, n)?.reshape(&[c, n]);
            let mut g = Gemm::new(rows, c, n);
            g.trans_b = true;
            g.accumulate = gi > 0;
            gemm(rec, &g, &h2, &w3, None, None, &z3)?;
            groups.push(MbGroup { c1, c2, h2, w3, c0 });
        }
        let (z, bn3) = bn_fwd(rec, &p3, &z3, Act::None)?;
        (z, (groups, None, Some(z3), Some(bn3)))
    };
    // y = GELU(x + BN(conv3(...)))
    let s = add(rec, &z, x)?;
    let y = activation(rec, &s, Act::Gelu)?;
    let (groups, c3, z3, bn3) = mb;
    Ok((y, MbConv { groups, c3, p3, z3, bn3, s, x_shape: x.shape.clone() }))
}

fn mbconv_bwd(ps: &ParamStore, rec: &mut Recorder, c: &MbConv, dy: &Tensor) -> Result<Tensor> {
    let ds = act_backward(rec, &c.s, dy, Act::Gelu)?;
    let dx = if let Some(c3) = &c.c3 {
        let g = &c.groups[0];
        let dh = cbn_bwd(ps, rec, c3, &ds, true)?.unwrap();
        let dh = cbn_bwd(ps, rec, &g.c2, &dh, true)?.unwrap();
        cbn_bwd(ps, rec, &g.c1, &dh, true)?.unwrap()
    } else {
        let dz3 = bn_bwd(rec, &c.p3, c.z3.as_ref().unwrap(), c.bn3.as_ref().unwrap(), &ds)?;
        let ch = *c.x_shape.last().unwrap();
        let rows = dz3.numel() / ch;
        let hidden = c.p3.w.shape[1];
        let dx = rec.zeros(&c.x_shape)?;
        for g in &c.groups {
            let n = g.w3.shape[1];
            if let Some(gw3) = &c.p3.gw {
                // dW3[:, c0..c0+n] += dz3^T h2
                let part = rec.gpu.empty(&[ch, n, 1])?;
                let mut gm = Gemm::new(ch, n, rows);
                gm.trans_a = true;
                gemm(rec, &gm, &dz3, &g.h2, None, None, &part)?;
                slice_mid_backward(rec, &part, &gw3.reshape(&[ch, hidden, 1]), hidden, g.c0)?;
            }
            let dh2 = rec.gpu.empty(&[rows, n])?;
            gemm(rec, &Gemm::new(rows, n, ch), &dz3, &g.w3, None, None, &dh2)?;
            let mut hshape = c.x_shape.clone();
            *hshape.last_mut().unwrap() = n;
            let dh1 = cbn_bwd(ps, rec, &g.c2, &dh2.reshape(&hshape), true)?.unwrap();
            let dxg = cbn_bwd(ps, rec, &g.c1, &dh1, true)?.unwrap();
            accumulate(rec, &dx, &dxg)?;
        }
        dx
    };
    accumulate(rec, &dx, &ds)?; // the residual branch
    Ok(dx)
}

struct Merge {
    c1: Cbn,
    c2: Cbn,
    c3: Cbn,
}

fn merge_fwd(ps: &ParamStore, rec: &mut Recorder, pre: &str, x: &Tensor, stride: usize) -> Result<(Tensor, Merge)> {
    let (h, c1) = cbn_fwd(ps, rec, &format!("{pre}.conv1"), x, ConvKind::Pointwise, Act::Gelu)?;
    let (h, c2) = cbn_fwd(ps, rec, &format!("{pre}.conv2"), &h, ConvKind::Depthwise { stride, pad: 1 }, Act::Gelu)?;
    let (y, c3) = cbn_fwd(ps, rec, &format!("{pre}.conv3"), &h, ConvKind::Pointwise, Act::None)?;
    Ok((y, Merge { c1, c2, c3 }))
}

fn merge_bwd(ps: &ParamStore, rec: &mut Recorder, c: &Merge, dy: &Tensor) -> Result<Tensor> {
    let d = cbn_bwd(ps, rec, &c.c3, dy, true)?.unwrap();
    let d = cbn_bwd(ps, rec, &c.c2, &d, true)?.unwrap();
    Ok(cbn_bwd(ps, rec, &c.c1, &d, true)?.unwrap())
}

/// Pre-norm MLP with residual: y = x + fc2(GELU(fc1(LN(x)))).
struct Mlp {
    ln: Ln,
    f1: Lin,
    f2: Lin,
}

fn mlp_fwd(ps: &ParamStore, rec: &mut Recorder, pre: &str, x: &Tensor) -> Result<(Tensor, Mlp)> {
    let (h, ln) = ln_fwd(ps, rec, &format!("{pre}.norm"), x, LN_EPS, Act::None)?;
    let (h, f1) = lin_fwd(ps, rec, &h, &format!("{pre}.fc1.weight"), Some(&format!("{pre}.fc1.bias")), Act::Gelu, None)?;
    let (y, f2) = lin_fwd(ps, rec, &h, &format!("{pre}.fc2.weight"), Some(&format!("{pre}.fc2.bias")), Act::None, Some(x))?;
    Ok((y, Mlp { ln, f1, f2 }))
}

fn mlp_bwd(ps: &ParamStore, rec: &mut Recorder, c: &Mlp, dy: &Tensor) -> Result<Tensor> {
    let dpre = lin_bwd_through(ps, rec, &c.f2, dy, &c.f1)?;
    let dh = lin_bwd_pre(ps, rec, &c.f1, &dpre, true)?.unwrap();
    // dx = dy (residual) + LN backward
    let acc = rec.clone_tensor(dy)?;
    ln_bwd(ps, rec, &c.ln, &dh, Some(&acc))
}

/// Group Attention branch of the paper variant.
struct MedBranch {
    p1: Lin,
    mq: Lin,
    am: WinAttn,
    p2: Lin,
}

struct Block {
    x_shape: Vec<usize>,
    ws: usize,
    ln: Ln,
    qkv: Lin,
    an: WinAttn,
    proj: Option<Lin>,
    med: Option<MedBranch>,
    local: Cbn,
    mlp: Mlp,
    mlp_med: Mlp,
}

fn block_fwd(ps: &ParamStore, rec: &mut Recorder, pre: &str, x: &Tensor, heads: usize, ws: usize) -> Result<(Tensor, Block)> {
    let p = |n: &str| format!("{pre}.attn.{n}");
    let xw = window_partition(rec, x, ws)?;
    let (u, ln) = ln_fwd(ps, rec, &p("norm"), &xw, LN_EPS, Act::None)?;
    drop(xw);
    let (qkv, lq) = lin_fwd(ps, rec, &u, &p("qkv.weight"), Some(&p("qkv.bias")), Act::None, None)?;
    let (a_nat, an) = win_attn_fwd(ps, rec, &qkv, &p("attention_biases"), heads, ws)?;
    let (y, proj, med) = match ps.variant {
        Variant::Released => {
            let (y, l) = lin_fwd(ps, rec, &a_nat, &p("proj.weight"), Some(&p("proj.bias")), Act::None, None)?;
            (y, Some(l), None)
        }
        Variant::Paper => {
            // x_nat = proj(A_nat); A_med = MHA_med(x_nat + LN(x)); y = proj(x_nat + A_med)   (Eq. 3-4)
            let (x_nat, p1) = lin_fwd(ps, rec, &a_nat, &p("proj.weight"), Some(&p("proj.bias")), Act::None, None)?;
            let m = add(rec, &x_nat, &u)?;
            let (qm, mq) = lin_fwd(ps, rec, &m, &p("med_qkv.weight"), Some(&p("med_qkv.bias")), Act::None, None)?;
            let (a_med, am) = win_attn_fwd(ps, rec, &qm, &p("attention_biases_med"), heads, ws)?;
            let t = add(rec, &x_nat, &a_med)?;
            let (y, p2) = lin_fwd(ps, rec, &t, &p("proj.weight"), Some(&p("proj.bias")), Act::None, None)?;
            (y, None, Some(MedBranch { p1, mq, am, p2 }))
        }
    };
    let x1 = window_reverse_add(rec, &y, x, ws)?;
    let (x2, local) = cbn_fwd(ps, rec, &format!("{pre}.local_conv"), &x1, ConvKind::Depthwise { stride: 1, pad: 1 }, Act::None)?;
    let (x3, mlp) = mlp_fwd(ps, rec, &format!("{pre}.mlp"), &x2)?;
    let (x4, mlp_med) = mlp_fwd(ps, rec, &format!("{pre}.mlp_med"), &x3)?;
    Ok((x4, Block { x_shape: x.shape.clone(), ws, ln, qkv: lq, an, proj, med, local, mlp, mlp_med }))
}

fn block_bwd(ps: &ParamStore, rec: &mut Recorder, c: &Block, dy: &Tensor) -> Result<Tensor> {
    let d = mlp_bwd(ps, rec, &c.mlp_med, dy)?;
    let d = mlp_bwd(ps, rec, &c.mlp, &d)?;
    let dx1 = cbn_bwd(ps, rec, &c.local, &d, true)?.unwrap();
    // x1 = x + reverse(y): dy_win = partition(dx1); dx (residual) = dx1.
    let dyw = window_reverse_add_backward(rec, &dx1, c.ws, None)?;
    let mut du_extra = None;
    let da_nat = match (&c.proj, &c.med) {
        (Some(p), _) => lin_bwd(ps, rec, p, &dyw, true)?.unwrap(),
        (None, Some(m)) => {
            let dt = lin_bwd(ps, rec, &m.p2, &dyw, true)?.unwrap();
            // t = x_nat + a_med
            let dqm = win_attn_bwd(ps, rec, &m.am, &dt)?;
            let dm = lin_bwd(ps, rec, &m.mq, &dqm, true)?.unwrap();
            // m = x_nat + u
            let dx_nat = dt;
            accumulate(rec, &dx_nat, &dm)?;
            du_extra = Some(dm);
            lin_bwd(ps, rec, &m.p1, &dx_nat, true)?.unwrap()
        }
        _ => unreachable!(),
    };
    let dqkv = win_attn_bwd(ps, rec, &c.an, &da_nat)?;
    let du = lin_bwd(ps, rec, &c.qkv, &dqkv, true)?.unwrap();
    if let Some(e) = &du_extra {
        accumulate(rec, &du, e)?;
    }
    let dxw = ln_bwd(ps, rec, &c.ln, &du, None)?;
    window_partition_backward(rec, &dxw, &c.x_shape, c.ws, Some(&dx1))
}

enum Part {
    MbConv(MbConv),
    Block(Block),
}

struct Stage {
    parts: Vec<Part>,
    merge: Option<Merge>,
}

struct Neck {
    l0: Lin,
    n1: Ln,
    c2: Conv,
    n3: Ln,
}

struct Encoder {
    pe0: Cbn,
    pe2: Cbn,
    stages: Vec<Stage>,
    neck: Neck,
}

fn encoder_fwd(ps: &ParamStore, rec: &mut Recorder, x: &Tensor) -> Result<(Tensor, Encoder)> {
    let cfg = ps.cfg.clone();
    let pe = "image_encoder.patch_embed.seq";
    let (h, pe0) = cbn_fwd(ps, rec, &format!("{pe}.0"), x, ConvKind::Dense { stride: 2, pad: 1 }, Act::Gelu)?;
    let (mut h, pe2) = cbn_fwd(ps, rec, &format!("{pe}.2"), &h, ConvKind::Dense { stride: 2, pad: 1 }, Act::None)?;
    let mut stages = Vec::new();
    for s in 0..4 {
        let pre = format!("image_encoder.layers.{s}");
        let mut parts = Vec::new();
        for blk in 0..cfg.depths[s] {
            let bp = format!("{pre}.blocks.{blk}");
            if s == 0 {
                let (y, c) = mbconv_fwd(ps, rec, &bp, &h)?;
                h = y;
                parts.push(Part::MbConv(c));
            } else {
                let (y, c) = block_fwd(ps, rec, &bp, &h, cfg.num_heads[s], cfg.window_sizes[s])?;
                h = y;
                parts.push(Part::Block(c));
            }
        }
        let merge = if s < 3 {
            let (y, c) = merge_fwd(ps, rec, &format!("{pre}.downsample"), &h, if s == 2 { 1 } else { 2 })?;
            h = y;
            Some(c)
        } else {
            None
        };
        stages.push(Stage { parts, merge });
    }
    let ie = "image_encoder.neck";
    let (n, l0) = lin_fwd(ps, rec, &h, &format!("{ie}.0.weight"), None, Act::None, None)?;
    let (n, n1) = ln_fwd(ps, rec, &format!("{ie}.1"), &n, LN2D_EPS, Act::None)?;
    let (n, c2) = conv_fwd(ps, rec, &format!("{ie}.2.weight"), None, &n, 1, 1)?;
    let (emb, n3) = ln_fwd(ps, rec, &format!("{ie}.3"), &n, LN2D_EPS, Act::None)?;
    Ok((emb, Encoder { pe0, pe2, stages, neck: Neck { l0, n1, c2, n3 } }))
}

fn encoder_bwd(ps: &ParamStore, rec: &mut Recorder, c: &Encoder, demb: &Tensor) -> Result<()> {
    let d = ln_bwd(ps, rec, &c.neck.n3, demb, None)?;
    let d = conv_bwd(ps, rec, &c.neck.c2, &d, true)?.unwrap();
    let d = ln_bwd(ps, rec, &c.neck.n1, &d, None)?;
    let mut d = lin_bwd(ps, rec, &c.neck.l0, &d, true)?.unwrap();
    for st in c.stages.iter().rev() {
        if let Some(m) = &st.merge {
            d = merge_bwd(ps, rec, m, &d)?;
        }
        for p in st.parts.iter().rev() {
            d = match p {
                Part::MbConv(m) => mbconv_bwd(ps, rec, m, &d)?,
                Part::Block(b) => block_bwd(ps, rec, b, &d)?,
            };
        }
    }
    let d = cbn_bwd(ps, rec, &c.pe2, &d, true)?.unwrap();
    cbn_bwd(ps, rec, &c.pe0, &d, false)?;
    Ok(())
}

// ---------------------------------------------------------------- MSF features, CP-Encoder

struct Msf {
    c1: Conv,
    n1: Ln,
    c2: Conv,
    n2: Ln,
}

fn msf_fwd(ps: &ParamStore, rec: &mut Recorder, x: &Tensor) -> Result<(Tensor, Tensor, Msf)> {
    let p = |f: usize, i: usize, n: &str| format!("conv1_med.features{f}.{i}.{n}");
    let (h, c1) = conv_fwd(ps, rec, &p(1, 0, "weight"), Some(&p(1, 0, "bias")), x, 4, 0)?;
    let (r2, n1) = ln_fwd(ps, rec, "conv1_med.features1.1", &h, LN2D_EPS, Act::Gelu)?;
    let (h, c2) = conv_fwd(ps, rec, &p(2, 0, "weight"), Some(&p(2, 0, "bias")), &r2, 2, 0)?;
    let (r1, n2) = ln_fwd(ps, rec, "conv1_med.features2.1", &h, LN2D_EPS, Act::Gelu)?;
    Ok((r2, r1, Msf { c1, n1, c2, n2 }))
}

fn msf_bwd(ps: &ParamStore, rec: &mut Recorder, c: &Msf, dr2: &Tensor, dr1: &Tensor) -> Result<()> {
    let d = ln_bwd(ps, rec, &c.n2, dr1, None)?;
    let d = conv_bwd(ps, rec, &c.c2, &d, true)?.unwrap();
    accumulate(rec, &d, dr2)?;
    let d = ln_bwd(ps, rec, &c.n1, &d, None)?;
    conv_bwd(ps, rec, &c.c1, &d, false)?;
    Ok(())
}

struct Cp {
    c0: Conv,
    n1: Ln,
    c3: Conv,
    n4: Ln,
    l6: Lin,
}

fn cp_fwd(ps: &ParamStore, rec: &mut Recorder, mask_low: &Tensor) -> Result<(Tensor, Cp)> {
    let p = |i: usize, n: &str| format!("prompt_encoder.mask_downscaling.{i}.{n}");
    let (h, c0) = conv_fwd(ps, rec, &p(0, "weight"), Some(&p(0, "bias")), mask_low, 2, 0)?;
    let (h, n1) = ln_fwd(ps, rec, "prompt_encoder.mask_downscaling.1", &h, LN2D_EPS, Act::Gelu)?;
    let (h, c3) = conv_fwd(ps, rec, &p(3, "weight"), Some(&p(3, "bias")), &h, 2, 0)?;
    let (h, n4) = ln_fwd(ps, rec, "prompt_encoder.mask_downscaling.4", &h, LN2D_EPS, Act::Gelu)?;
    let (dense, l6) = lin_fwd(ps, rec, &h, &p(6, "weight"), Some(&p(6, "bias")), Act::None, None)?;
    Ok((dense, Cp { c0, n1, c3, n4, l6 }))
}

fn cp_bwd(ps: &ParamStore, rec: &mut Recorder, c: &Cp, ddense: &Tensor) -> Result<()> {
    let d = lin_bwd(ps, rec, &c.l6, ddense, true)?.unwrap();
    let d = ln_bwd(ps, rec, &c.n4, &d, None)?;
    let d = conv_bwd(ps, rec, &c.c3, &d, true)?.unwrap();
    let d = ln_bwd(ps, rec, &c.n1, &d, None)?;
    conv_bwd(ps, rec, &c.c0, &d, false)?;
    Ok(())
}

// ---------------------------------------------------------------- two-way transformer

struct TwLayer {
    first: bool,
    sa: SamAttn,
    ln1: Ln,
    t2i: SamAttn,
    ln2: Ln,
    m1: Lin,
    m2: Lin,
    ln3: Ln,
    i2t: SamAttn,
    ln4: Ln,
}

struct TwoWay {
    b: usize,
    layers: Vec<TwLayer>,
    fin: SamAttn,
    lnf: Ln,
}

/// Returns (tokens [B,nt,D], image keys [B,L,D]).
fn two_way_fwd(ps: &ParamStore, rec: &mut Recorder, emb: &Tensor, dense: &Tensor, pe: &Tensor) -> Result<(Tensor, Tensor, TwoWay)> {
    let d = ps.cfg.transformer_dim;
    let heads = ps.cfg.decoder_heads;
    let b = emb.shape[0];
    let l = emb.numel() / (b * d);
    // All output tokens [iou_token; mask_tokens] broadcast over the batch (the query PE).
    let iou = ps.v("mask_decoder.iou_token.weight")?;
    let mt = ps.v("mask_decoder.mask_tokens.weight")?;
    let nt = 1 + mt.shape[0];
    let all = rec.gpu.empty(&[nt, d])?;
    rec.copy(iou, &all.narrow(0, 1));
    rec.copy(mt, &all.narrow(1, nt - 1));
    let zeros = rec.zeros(&[b, nt, d])?;
    let tok_pe = add(rec, &zeros, &all)?;
    let mut q = tok_pe.clone();
    let mut k = add(rec, emb, dense)?.reshape(&[b, l, d]);
    let key_pe = pe.reshape(&[l, d]);
    let t = "mask_decoder.transformer";
    let mut layers = Vec::new();
    for i in 0..ps.cfg.decoder_depth {
        let lp = format!("{t}.layers.{i}");
        let (q1, sa) = if i == 0 {
            sam_attn_fwd(ps, rec, &format!("{lp}.self_attn"), &q, &q, &q, heads)?
        } else {
            let qp = add(rec, &q, &tok_pe)?;
            let (a, sa) = sam_attn_fwd(ps, rec, &format!("{lp}.self_attn"), &qp, &qp, &q, heads)?;
            (add(rec, &q, &a)?, sa)
        };
        let (q1n, ln1) = ln_fwd(ps, rec, &format!("{lp}.norm1"), &q1, LN_EPS, Act::None)?;
        let qp = add(rec, &q1n, &tok_pe)?;
        let kp = binary(rec, &k, &key_pe, BinOp::Add)?;
        let (a, t2i) = sam_attn_fwd(ps, rec, &format!("{lp}.cross_attn_token_to_image"), &qp, &kp, &k, heads)?;
        let q2 = add(rec, &q1n, &a)?;
        let (q2n, ln2) = ln_fwd(ps, rec, &format!("{lp}.norm2"), &q2, LN_EPS, Act::None)?;
        let (h, m1) = lin_fwd(ps, rec, &q2n, &format!("{lp}.mlp.lin1.weight"), Some(&format!("{lp}.mlp.lin1.bias")), Act::Relu, None)?;
        let (q3, m2) = lin_fwd(ps, rec, &h, &format!("{lp}.mlp.lin2.weight"), Some(&format!("{lp}.mlp.lin2.bias")), Act::None, Some(&q2n))?;
        let (q3n, ln3) = ln_fwd(ps, rec, &format!("{lp}.norm3"), &q3, LN_EPS, Act::None)?;
        let qp = add(rec, &q3n, &tok_pe)?;
        let (a, i2t) = sam_attn_fwd(ps, rec, &format!("{lp}.cross_attn_image_to_token"), &kp, &qp, &q3n, heads)?;
        let k1 = add(rec, &k, &a)?;
        let (k1n, ln4) = ln_fwd(ps, rec, &format!("{lp}.norm4"), &k1, LN_EPS, Act::None)?;
        layers.push(TwLayer { first: i == 0, sa, ln1, t2i, ln2, m1, m2, ln3, i2t, ln4 });
        q = q3n;
        k = k1n;
    }
    let qp = add(rec, &q, &tok_pe)?;
    let kp = binary(rec, &k, &key_pe, BinOp::Add)?;
    let (a, fin) = sam_attn_fwd(ps, rec, &format!("{t}.final_attn_token_to_image"), &qp, &kp, &k, heads)?;
    let qf = add(rec, &q, &a)?;
    let (qfn, lnf) = ln_fwd(ps, rec, &format!("{t}.norm_final_attn"), &qf, LN_EPS, Act::None)?;
    Ok((qfn, k, TwoWay { b, layers, fin, lnf }))
}

/// Returns d(src) where src = embedding + dense prompt ([B,L,D]); accumulates the token grads.
fn two_way_bwd(ps: &ParamStore, rec: &mut Recorder, c: &TwoWay, dtok: &Tensor, dimg: &Tensor) -> Result<Tensor> {
    let mut dtpe: Option<Tensor> = None; // gradient w.r.t. the token PE (= the initial tokens)
    // Final attention.
    let dqf = ln_bwd(ps, rec, &c.lnf, dtok, None)?;
    let (dqp, dkp, dkv) = sam_attn_bwd(ps, rec, &c.fin, &dqf)?;
    let dq = dqf;
    accumulate(rec, &dq, &dqp)?;
    add_into(rec, &mut dtpe, dqp)?;
    let dk = rec.clone_tensor(dimg)?;
    accumulate(rec, &dk, &dkp)?;
    accumulate(rec, &dk, &dkv)?;
    let mut dq = dq;
    let mut dk = dk;
    for ly in c.layers.iter().rev() {
        // Image -> tokens: k1 = k + i2t(k + PE, q3n + T, q3n); k1n = LN4(k1).
        let dk1 = ln_bwd(ps, rec, &ly.ln4, &dk, None)?;
        let (dkp_a, dqp3, dq3v) = sam_attn_bwd(ps, rec, &ly.i2t, &dk1)?;
        let dkk = dk1; // residual
        let mut dkp_total = dkp_a;
        let dq3n = dq;
        accumulate(rec, &dq3n, &dqp3)?;
        accumulate(rec, &dq3n, &dq3v)?;
        add_into(rec, &mut dtpe, dqp3)?;
        // MLP: q3 = q2n + lin2(relu(lin1(q2n))); q3n = LN3(q3).
        let dq3 = ln_bwd(ps, rec, &ly.ln3, &dq3n, None)?;
        let dh = lin_bwd(ps, rec, &ly.m2, &dq3, true)?.unwrap();
        let dq2n_mlp = lin_bwd(ps, rec, &ly.m1, &dh, true)?.unwrap();
        let dq2n = dq3;
        accumulate(rec, &dq2n, &dq2n_mlp)?;
        // Tokens -> image: q2 = q1n + t2i(q1n + T, k + PE, k); q2n = LN2(q2).
        let dq2 = ln_bwd(ps, rec, &ly.ln2, &dq2n, None)?;
        let (dqp2, dkp2, dkv2) = sam_attn_bwd(ps, rec, &ly.t2i, &dq2)?;
        let dq1n = dq2;
        accumulate(rec, &dq1n, &dqp2)?;
        add_into(rec, &mut dtpe, dqp2)?;
        accumulate(rec, &dkp_total, &dkp2)?;
        accumulate(rec, &dkk, &dkv2)?;
        // kp = k + PE (the same kp feeds i2t and t2i).
        accumulate(rec, &dkk, &dkp_total)?;
        dkp_total = dkk;
        dk = dkp_total;
        // Self-attention.
        let dq1 = ln_bwd(ps, rec, &ly.ln1, &dq1n, None)?;
        let (dqa, dka, dva) = sam_attn_bwd(ps, rec, &ly.sa, &dq1)?;
        if ly.first {
            // q1 = sa(q, q, q) (no residual, no PE)
            accumulate(rec, &dqa, &dka)?;
            accumulate(rec, &dqa, &dva)?;
            dq = dqa;
        } else {
            // q1 = q + sa(q + T, q + T, q)
            let dqq = dq1;
            accumulate(rec, &dqq, &dva)?;
            accumulate(rec, &dqa, &dka)?;
            accumulate(rec, &dqq, &dqa)?;
            add_into(rec, &mut dtpe, dqa)?;
            dq = dqq;
        }
    }
    // The initial queries are the tokens themselves: d(all tokens) = Σ_batch (dq + dtpe).
    if let Some(t) = &dtpe {
        accumulate(rec, &dq, t)?;
    }
    let mt = ps.v("mask_decoder.mask_tokens.weight")?;
    let d = ps.cfg.transformer_dim;
    let nt = 1 + mt.shape[0];
    let dall = rec.zeros(&[nt, d])?;
    col_sum(rec, &dq.reshape(&[c.b, nt * d]), nt * d, &dall.reshape(&[nt * d]), false)?;
    if let Some(g) = ps.g("mask_decoder.iou_token.weight") {
        accumulate(rec, g, &dall.narrow(0, 1))?;
    }
    if let Some(g) = ps.g("mask_decoder.mask_tokens.weight") {
        accumulate(rec, g, &dall.narrow(1, nt - 1))?;
    }
    Ok(dk)
}

// ---------------------------------------------------------------- mask head

struct Head {
    t1: ConvT,
    n1: Ln,
    cc1: Lin,
    t2: ConvT,
    cc2: Lin,
    h0: Lin,
    h1: Lin,
    h2: Lin,
    f: Tensor,
    hyper: Tensor,
    c1: usize,
    c2: usize,
    nt: usize,
}

fn head_fwd(ps: &ParamStore, rec: &mut Recorder, tokens: &Tensor, image: &Tensor, r1: &Tensor, r2: &Tensor) -> Result<(Tensor, Head)> {
    let md = "mask_decoder";
    let (u1, t1) = convt_fwd(ps, rec, &format!("{md}.output_upscaling_part1.0"), image, Act::None)?;
    let (u1, n1) = ln_fwd(ps, rec, &format!("{md}.output_upscaling_part1.1"), &u1, LN2D_EPS, Act::Gelu)?;
    let c1 = u1.dim(-1);
    let cat1 = concat_last(rec, &u1, r1)?;
    let (u1b, cc1) = lin_fwd(ps, rec, &cat1, &format!("{md}.concat_conv1.0.weight"), Some(&format!("{md}.concat_conv1.0.bias")), Act::None, None)?;
    let (u2, t2) = convt_fwd(ps, rec, &format!("{md}.output_upscaling_part2.0"), &u1b, Act::Gelu)?;
    let c2 = u2.dim(-1);
    let cat2 = concat_last(rec, &u2, r2)?;
    let (f, cc2) = lin_fwd(ps, rec, &cat2, &format!("{md}.concat_conv2.0.weight"), Some(&format!("{md}.concat_conv2.0.bias")), Act::None, None)?;
    let (b, nt, d) = (tokens.shape[0], tokens.shape[1], tokens.shape[2]);
    let tok = slice_mid(rec, tokens, b, nt, d, 1, 1)?.reshape(&[b, d]);
    let hp = format!("{md}.output_hypernetworks_mlps.0.layers");
    let (h, h0) = lin_fwd(ps, rec, &tok, &format!("{hp}.0.weight"), Some(&format!("{hp}.0.bias")), Act::Relu, None)?;
    let (h, h1) = lin_fwd(ps, rec, &h, &format!("{hp}.1.weight"), Some(&format!("{hp}.1.bias")), Act::Relu, None)?;
    let (hyper, h2) = lin_fwd(ps, rec, &h, &format!("{hp}.2.weight"), Some(&format!("{hp}.2.bias")), Act::None, None)?;
    let out = crate::model::msf_decoder::hyper_masks(rec, &f, &hyper)?;
    Ok((out, Head { t1, n1, cc1, t2, cc2, h0, h1, h2, f, hyper, c1, c2, nt }))
}

/// Returns (dtokens [B,nt,D], dimage, dr1, dr2).
fn head_bwd(ps: &ParamStore, rec: &mut Recorder, c: &Head, dlow: &Tensor) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
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
    let dh = lin_bwd(ps, rec, &c.h2, &dhyper, true)?.unwrap();
    let dh = lin_bwd(ps, rec, &c.h1, &dh, true)?.unwrap();
    let dtok = lin_bwd(ps, rec, &c.h0, &dh, true)?.unwrap();
    let d = dtok.dim(-1);
    let dtokens = rec.zeros(&[b, c.nt, d])?;
    slice_mid_backward(rec, &dtok.reshape(&[b, 1, d]), &dtokens, c.nt, 1)?;
    let dcat2 = lin_bwd(ps, rec, &c.cc2, &df, true)?.unwrap();
    let (du2, dr2) = split_last(rec, &dcat2, c.c2)?;
    let du1b = convt_bwd(ps, rec, &c.t2, &du2)?;
    let dcat1 = lin_bwd(ps, rec, &c.cc1, &du1b, true)?.unwrap();
    let (du1, dr1) = split_last(rec, &dcat1, c.c1)?;
    let dt1 = ln_bwd(ps, rec, &c.n1, &du1, None)?;
    let dimage = convt_bwd(ps, rec, &c.t1, &dt1)?;
    Ok((dtokens, dimage, dr1, dr2))
}

// ---------------------------------------------------------------- whole model

/// Everything the backward of one training forward needs.
pub struct Cache {
    enc: Encoder,
    msf: Msf,
    cp: Cp,
    tw: TwoWay,
    head: Head,
    lowres: Tensor,
    emb_shape: Vec<usize>,
}

/// What a training forward returns besides its cache.
pub struct TrainOutput {
    pub logits: Tensor,
    pub coarse: Tensor,
    pub threshold: Tensor,
}

/// Training forward on packed pixels `[B,S,S]`: logits `[B,S,S,1]`. BatchNorm layers that train
/// use batch statistics and update their running statistics.
pub fn forward_train(ps: &ParamStore, rec: &mut Recorder, px: &Tensor) -> Result<(TrainOutput, Cache)> {
    let s = ps.cfg.image_size;
    let x = image_normalize(rec, px)?;
    let (emb, enc) = encoder_fwd(ps, rec, &x)?;
    let (r2, r1, msf) = msf_fwd(ps, rec, &x)?;
    let rule = match ps.variant {
        Variant::Paper => OtsuRule::Paper,
        Variant::Released => OtsuRule::Released,
    };
    let (threshold, coarse) = otsu(rec, px, &x, rule)?;
    drop(x);
    let lr = ps.cfg.lowres();
    let coarse_low = bilinear(rec, &coarse, lr, lr)?;
    let (dense, cp) = cp_fwd(ps, rec, &coarse_low)?;
    let g = ps.cfg.grid();
    let pe = crate::ops::pe::dense_pe(rec, ps.v("prompt_encoder.pe_layer.positional_encoding_gaussian_matrix")?, g, g)?;
    let (tokens, keys, tw) = two_way_fwd(ps, rec, &emb, &dense, &pe)?;
    let b = emb.shape[0];
    let image = keys.reshape(&[b, g, g, ps.cfg.transformer_dim]);
    let (lowres, head) = head_fwd(ps, rec, &tokens, &image, &r1, &r2)?;
    let logits = bilinear(rec, &lowres, s, s)?;
    let emb_shape = emb.shape.clone();
    Ok((TrainOutput { logits, coarse, threshold }, Cache { enc, msf, cp, tw, head, lowres, emb_shape }))
}

/// Backward from `dlogits` (`[B,S,S,1]`), accumulating into the parameter gradients.
pub fn backward(ps: &ParamStore, rec: &mut Recorder, c: &Cache, dlogits: &Tensor) -> Result<()> {
    let dlow = rec.zeros(&c.lowres.shape)?;
    bilinear_backward(rec, dlogits, &dlow)?;
    let (dtok, dimg, dr1, dr2) = head_bwd(ps, rec, &c.head, &dlow)?;
    let b = dimg.shape[0];
    let l = dimg.numel() / (b * ps.cfg.transformer_dim);
    let dsrc = two_way_bwd(ps, rec, &c.tw, &dtok, &dimg.reshape(&[b, l, ps.cfg.transformer_dim]))?;
    let dsrc = dsrc.reshape(&c.emb_shape);
    // src = embedding + dense prompt
    cp_bwd(ps, rec, &c.cp, &dsrc)?;
    msf_bwd(ps, rec, &c.msf, &dr2, &dr1)?;
    encoder_bwd(ps, rec, &c.enc, &dsrc)?;
    Ok(())
}
