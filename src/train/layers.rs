//! Layers with a training forward (keeping what backward needs) and an explicit backward that
//! accumulates parameter gradients and returns the input gradient. Parameters live in a
//! [`ParamStore`]; a frozen parameter gets no gradient but still passes gradients through.

use super::params::ParamStore;
use crate::error::Result;
use crate::gpu::{Recorder, Tensor};
use crate::ops::attention::{self, AttnSaved};
use crate::ops::conv;
use crate::ops::elementwise::{accumulate, act_backward, activation, col_sum};
use crate::ops::matmul::{gemm, linear, linear_save_pre, Act, Gemm};
use crate::ops::norm::{self, BnSaved, LnSaved};

pub const BN_MOMENTUM: f32 = 0.1;
pub const BN_EPS: f32 = 1e-5;

/// `acc += t`, or `acc = t` when empty.
pub fn add_into(rec: &mut Recorder, acc: &mut Option<Tensor>, t: Tensor) -> Result<()> {
    match acc {
        Some(a) => accumulate(rec, a, &t),
        None => {
            *acc = Some(t);
            Ok(())
        }
    }
}

/// A 2-D view [rows, cols] of a weight stored with trailing 1×1 dims.
fn as_matrix(w: &Tensor) -> Tensor {
    w.reshape(&[w.shape[0], w.numel() / w.shape[0]])
}

/// A linear layer `y = act(x W^T + b) (+ residual)`.
#[derive(Clone)]
pub struct Lin {
    w: String,
    b: Option<String>,
    x: Tensor,
    pre: Option<Tensor>,
    act: Act,
}

pub fn lin_fwd(
    ps: &ParamStore,
    rec: &mut Recorder,
    x: &Tensor,
    w: &str,
    b: Option<&str>,
    act: Act,
    residual: Option<&Tensor>,
) -> Result<(Tensor, Lin)> {
    let wt = as_matrix(ps.v(w)?);
    let bt = match b {
        Some(b) => Some(ps.v(b)?),
        None => None,
    };
    let (y, pre) = if act == Act::None {
        (linear(rec, x, &wt, bt, Act::None, residual)?, None)
    } else {
        assert!(residual.is_none(), "residual after an activation is not fused");
        let (y, pre) = linear_save_pre(rec, x, &wt, bt, act)?;
        (y, Some(pre))
    };
    Ok((y, Lin { w: w.into(), b: b.map(Into::into), x: x.clone(), pre, act }))
}

/// Backward of [`lin_fwd`]: dW += dpre^T x, db += Σ dpre, returns dx = dpre W when `need_dx`
/// (the residual's gradient is the caller's `dy`).
pub fn lin_bwd(ps: &ParamStore, rec: &mut Recorder, c: &Lin, dy: &Tensor, need_dx: bool) -> Result<Option<Tensor>> {
    lin_bwd_into(ps, rec, c, dy, need_dx, None)
}

/// [`lin_bwd`] whose input gradient goes on through the activation of the layer `next` that
/// produced this layer's input (fused into the dx GEMM): returns that layer's `dpre`, to be
/// passed to [`lin_bwd_pre`] for it.
pub fn lin_bwd_through(ps: &ParamStore, rec: &mut Recorder, c: &Lin, dy: &Tensor, next: &Lin) -> Result<Tensor> {
    Ok(lin_bwd_into(ps, rec, c, dy, true, Some(next))?.unwrap())
}

/// [`lin_bwd`] given the gradient of the layer's pre-activation (from [`lin_bwd_through`]).
pub fn lin_bwd_pre(ps: &ParamStore, rec: &mut Recorder, c: &Lin, dpre: &Tensor, need_dx: bool) -> Result<Option<Tensor>> {
    let plain = Lin { pre: None, act: Act::None, ..c.clone() };
    lin_bwd_into(ps, rec, &plain, dpre, need_dx, None)
}

fn lin_bwd_into(
    ps: &ParamStore,
    rec: &mut Recorder,
    c: &Lin,
    dy: &Tensor,
    need_dx: bool,
    next: Option<&Lin>,
) -> Result<Option<Tensor>> {
    let dpre = match &c.pre {
        Some(pre) => act_backward(rec, pre, dy, c.act)?,
        None => dy.clone(),
    };
    let w = as_matrix(ps.v(&c.w)?);
    let (n, k) = (w.shape[0], w.shape[1]);
    let m = c.x.numel() / k;
    if let Some(gw) = ps.g(&c.w) {
        let mut g = Gemm::new(n, k, m);
        g.trans_a = true;
        g.accumulate = true;
        gemm(rec, &g, &dpre, &c.x, None, None, &as_matrix(gw))?;
    }
    if let Some(b) = &c.b {
        if let Some(gb) = ps.g(b) {
            col_sum(rec, &dpre, n, gb, true)?;
        }
    }
    if !need_dx {
        return Ok(None);
    }
    let dx = rec.gpu.empty(&c.x.shape)?;
    let mut g = Gemm::new(m, k, n);
    match next.and_then(|l| l.pre.as_ref().map(|p| (p, l.act))) {
        Some((pre, act)) => {
            g.act = act;
            g.act_grad = true;
            gemm(rec, &g, &dpre, &w, None, Some(pre), &dx)?;
        }
        None => {
            if let Some(l) = next {
                debug_assert!(l.pre.is_none(), "lin_bwd_through: {} has no saved pre-activation", l.w);
            }
            gemm(rec, &g, &dpre, &w, None, None, &dx)?
        }
    }
    Ok(Some(dx))
}

/// LayerNorm over the last dim (token LN eps 1e-5, LayerNorm2d eps 1e-6), optional activation.
pub struct Ln {
    pre: String,
    x: Tensor,
    saved: LnSaved,
}

pub fn ln_fwd(ps: &ParamStore, rec: &mut Recorder, pre: &str, x: &Tensor, eps: f32, act: Act) -> Result<(Tensor, Ln)> {
    let (y, saved) =
        norm::layer_norm_train(rec, x, ps.v(&format!("{pre}.weight"))?, ps.v(&format!("{pre}.bias"))?, eps, act)?;
    Ok((y, Ln { pre: pre.into(), x: x.clone(), saved }))
}

/// Backward of [`ln_fwd`]; the input gradient is added into `dx_acc` when given.
pub fn ln_bwd(ps: &ParamStore, rec: &mut Recorder, c: &Ln, dy: &Tensor, dx_acc: Option<&Tensor>) -> Result<Tensor> {
    let w = ps.v(&format!("{}.weight", c.pre))?;
    let (gw, gb) = grads_or_scratch(ps, rec, &c.pre, w.numel())?;
    norm::layer_norm_backward(rec, &c.x, w, &c.saved, dy, &gw, &gb, dx_acc)
}

/// Gradient buffers of `{pre}.weight` / `{pre}.bias`, or zeroed scratch when frozen.
fn grads_or_scratch(ps: &ParamStore, rec: &mut Recorder, pre: &str, n: usize) -> Result<(Tensor, Tensor)> {
    let w = match ps.g(&format!("{pre}.weight")) {
        Some(g) => g.clone(),
        None => rec.zeros(&[n])?,
    };
    let b = match ps.g(&format!("{pre}.bias")) {
        Some(g) => g.clone(),
        None => rec.zeros(&[n])?,
    };
    Ok((w, b))
}

#[derive(Clone, Copy, Debug)]
pub enum ConvKind {
    /// 1×1, stride 1: a GEMM over channels.
    Pointwise,
    Dense { stride: usize, pad: usize },
    Depthwise { stride: usize, pad: usize },
}

/// The tensors of one TinyViT `Conv2d_BN` (possibly a slice of its output channels).
#[derive(Clone)]
pub struct CbnParams {
    /// Conv weight `[Co, Ci/groups, k, k]`.
    pub w: Tensor,
    /// BatchNorm weight, bias, running mean, running variance (`[Co]` each).
    pub bn: [Tensor; 4],
    /// Gradients of w and of the BatchNorm weight/bias, when they train.
    pub gw: Option<Tensor>,
    pub gbn: Option<(Tensor, Tensor)>,
    /// Batch statistics (train mode) or running statistics (eval mode).
    pub train_bn: bool,
}

impl CbnParams {
    pub fn get(ps: &ParamStore, pre: &str) -> Result<CbnParams> {
        let k = |n: &str| format!("{pre}.{n}");
        let bn = [
            ps.v(&k("bn.weight"))?.clone(),
            ps.v(&k("bn.bias"))?.clone(),
            ps.v(&k("bn.running_mean"))?.clone(),
            ps.v(&k("bn.running_var"))?.clone(),
        ];
        let gbn = match (ps.g(&k("bn.weight")), ps.g(&k("bn.bias"))) {
            (Some(a), Some(b)) => Some((a.clone(), b.clone())),
            _ => None,
        };
        Ok(CbnParams {
            w: ps.v(&k("c.weight"))?.clone(),
            bn,
            gw: ps.g(&k("c.weight")).cloned(),
            gbn,
            train_bn: ps.bn_trains(pre),
        })
    }

    /// Output channels `[c0, c0 + n)` as views (no copies; offsets must be aligned, which holds
    /// for channel counts that are multiples of 64).
    pub fn out_channels(&self, c0: usize, n: usize) -> CbnParams {
        let per = |t: &Tensor| t.reshape(&[t.shape[0], t.numel() / t.shape[0]]).narrow(c0, n);
        let wshape: Vec<usize> = std::iter::once(n).chain(self.w.shape[1..].iter().copied()).collect();
        let v = |t: &Tensor| t.narrow(c0, n);
        CbnParams {
            w: per(&self.w).reshape(&wshape),
            bn: [v(&self.bn[0]), v(&self.bn[1]), v(&self.bn[2]), v(&self.bn[3])],
            gw: self.gw.as_ref().map(|g| per(g).reshape(&wshape)),
            gbn: self.gbn.as_ref().map(|(a, b)| (v(a), v(b))),
            train_bn: self.train_bn,
        }
    }
}

/// TinyViT `Conv2d_BN` (conv without bias + BatchNorm2d, batch statistics when it trains).
pub struct Cbn {
    p: CbnParams,
    kind: ConvKind,
    x: Tensor,
    z: Tensor,
    bn: BnSaved,
}

pub fn cbn_fwd(ps: &ParamStore, rec: &mut Recorder, pre: &str, x: &Tensor, kind: ConvKind, act: Act) -> Result<(Tensor, Cbn)> {
    cbn_fwd_p(rec, &CbnParams::get(ps, pre)?, x, kind, act)
}

/// BatchNorm (train or eval statistics as `p` says) of `z`, then `act`.
pub fn bn_fwd(rec: &mut Recorder, p: &CbnParams, z: &Tensor, act: Act) -> Result<(Tensor, BnSaved)> {
    let [g, b, rm, rv] = &p.bn;
    if p.train_bn {
        norm::batch_norm_train(rec, z, g, b, rm, rv, BN_MOMENTUM, BN_EPS, act)
    } else {
        norm::batch_norm_eval_saved(rec, z, g, b, rm, rv, BN_EPS, act)
    }
}

/// Backward of [`bn_fwd`]: returns dz; accumulates the BatchNorm weight/bias gradients.
pub fn bn_bwd(rec: &mut Recorder, p: &CbnParams, z: &Tensor, saved: &BnSaved, dy: &Tensor) -> Result<Tensor> {
    let c = p.bn[0].numel();
    let (gg, gb) = match &p.gbn {
        Some((a, b)) => (a.clone(), b.clone()),
        None => (rec.zeros(&[c])?, rec.zeros(&[c])?),
    };
    norm::batch_norm_backward(rec, z, &p.bn[0], saved, dy, &gg, &gb, None)
}

pub fn cbn_fwd_p(rec: &mut Recorder, p: &CbnParams, x: &Tensor, kind: ConvKind, act: Act) -> Result<(Tensor, Cbn)> {
    let w = &p.w;
    let z = match kind {
        ConvKind::Pointwise => linear(rec, x, &as_matrix(w), None, Act::None, None)?,
        ConvKind::Dense { stride, pad } => conv::conv2d(rec, x, w, None, stride, pad, Act::None)?,
        ConvKind::Depthwise { stride, pad } => conv::depthwise_conv2d(rec, x, w, None, stride, pad, Act::None)?,
    };
    let (y, bn) = bn_fwd(rec, p, &z, act)?;
    Ok((y, Cbn { p: p.clone(), kind, x: x.clone(), z, bn }))
}

pub fn cbn_bwd(_ps: &ParamStore, rec: &mut Recorder, c: &Cbn, dy: &Tensor, need_dx: bool) -> Result<Option<Tensor>> {
    let dz = bn_bwd(rec, &c.p, &c.z, &c.bn, dy)?;
    let w = &c.p.w;
    let gw = c.p.gw.as_ref();
    match c.kind {
        ConvKind::Pointwise => {
            let w2 = as_matrix(w);
            let (n, k) = (w2.shape[0], w2.shape[1]);
            let m = c.x.numel() / k;
            if let Some(gw) = gw {
                let mut g = Gemm::new(n, k, m);
                g.trans_a = true;
                g.accumulate = true;
                gemm(rec, &g, &dz, &c.x, None, None, &as_matrix(gw))?;
            }
            if !need_dx {
                return Ok(None);
            }
            let dx = rec.gpu.empty(&c.x.shape)?;
            gemm(rec, &Gemm::new(m, k, n), &dz, &w2, None, None, &dx)?;
            Ok(Some(dx))
        }
        ConvKind::Dense { stride, pad } | ConvKind::Depthwise { stride, pad } => {
            let dx = if need_dx { Some(rec.zeros(&c.x.shape)?) } else { None };
            if dx.is_none() && gw.is_none() {
                return Ok(None);
            }
            if matches!(c.kind, ConvKind::Dense { .. }) {
                conv::conv2d_backward(rec, &c.x, w, &dz, stride, pad, dx.as_ref(), gw, None)?;
            } else {
                conv::depthwise_conv2d_backward(rec, &c.x, w, &dz, stride, pad, dx.as_ref(), gw, None)?;
            }
            Ok(dx)
        }
    }
}

/// A dense conv with bias (SAM-style layers without BatchNorm), no activation.
pub struct Conv {
    w: String,
    b: Option<String>,
    x: Tensor,
    stride: usize,
    pad: usize,
}

pub fn conv_fwd(ps: &ParamStore, rec: &mut Recorder, w: &str, b: Option<&str>, x: &Tensor, stride: usize, pad: usize) -> Result<(Tensor, Conv)> {
    let bias = match b {
        Some(b) => Some(ps.v(b)?),
        None => None,
    };
    let y = conv::conv2d(rec, x, ps.v(w)?, bias, stride, pad, Act::None)?;
    Ok((y, Conv { w: w.into(), b: b.map(Into::into), x: x.clone(), stride, pad }))
}

pub fn conv_bwd(ps: &ParamStore, rec: &mut Recorder, c: &Conv, dy: &Tensor, need_dx: bool) -> Result<Option<Tensor>> {
    let dx = if need_dx { Some(rec.zeros(&c.x.shape)?) } else { None };
    let db = c.b.as_ref().and_then(|b| ps.g(b));
    conv::conv2d_backward(rec, &c.x, ps.v(&c.w)?, dy, c.stride, c.pad, dx.as_ref(), ps.g(&c.w), db)?;
    Ok(dx)
}

/// ConvTranspose2d k2 s2 with bias, optional activation.
pub struct ConvT {
    w: String,
    b: String,
    x: Tensor,
    pre: Option<Tensor>,
    act: Act,
}

pub fn convt_fwd(ps: &ParamStore, rec: &mut Recorder, pre: &str, x: &Tensor, act: Act) -> Result<(Tensor, ConvT)> {
    let (w, b) = (format!("{pre}.weight"), format!("{pre}.bias"));
    let z = conv::conv_transpose2x2(rec, x, ps.v(&w)?, Some(ps.v(&b)?), Act::None)?;
    let (y, p) = if act == Act::None { (z, None) } else { (activation(rec, &z, act)?, Some(z)) };
    Ok((y, ConvT { w, b, x: x.clone(), pre: p, act }))
}

pub fn convt_bwd(ps: &ParamStore, rec: &mut Recorder, c: &ConvT, dy: &Tensor) -> Result<Tensor> {
    let dz = match &c.pre {
        Some(p) => act_backward(rec, p, dy, c.act)?,
        None => dy.clone(),
    };
    let dx = rec.zeros(&c.x.shape)?;
    conv::conv_transpose2x2_backward(rec, &c.x, ps.v(&c.w)?, &dz, Some(&dx), ps.g(&c.w), ps.g(&c.b))?;
    Ok(dx)
}

/// TinyViT windowed attention core with its learned relative-position bias.
pub struct WinAttn {
    bias: String,
    qkv: Tensor,
    saved: AttnSaved,
    heads: usize,
    ws: usize,
}

pub fn win_attn_fwd(ps: &ParamStore, rec: &mut Recorder, qkv: &Tensor, bias: &str, heads: usize, ws: usize) -> Result<(Tensor, WinAttn)> {
    let saved = attention::window_attention_train(rec, qkv, ps.v(bias)?, heads, ws)?;
    Ok((saved.out.clone(), WinAttn { bias: bias.into(), qkv: qkv.clone(), saved, heads, ws }))
}

pub fn win_attn_bwd(ps: &ParamStore, rec: &mut Recorder, c: &WinAttn, dout: &Tensor) -> Result<Tensor> {
    let b = ps.v(&c.bias)?;
    let db = match ps.g(&c.bias) {
        Some(g) => g.clone(),
        None => rec.zeros(&b.shape)?,
    };
    attention::window_attention_backward(rec, &c.qkv, b, &c.saved, dout, c.heads, c.ws, &db)
}

/// SAM `Attention`: out_proj(MHA(q_proj(q), k_proj(k), v_proj(v))).
pub struct SamAttn {
    q: Lin,
    k: Lin,
    v: Lin,
    o: Lin,
    qp: Tensor,
    kp: Tensor,
    vp: Tensor,
    saved: AttnSaved,
    heads: usize,
}

pub fn sam_attn_fwd(ps: &ParamStore, rec: &mut Recorder, pre: &str, q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<(Tensor, SamAttn)> {
    let l = |n: &str| (format!("{pre}.{n}.weight"), format!("{pre}.{n}.bias"));
    let (qw, qb) = l("q_proj");
    let (kw, kb) = l("k_proj");
    let (vw, vb) = l("v_proj");
    let (ow, ob) = l("out_proj");
    let (qp, lq) = lin_fwd(ps, rec, q, &qw, Some(&qb), Act::None, None)?;
    let (kp, lk) = lin_fwd(ps, rec, k, &kw, Some(&kb), Act::None, None)?;
    let (vp, lv) = lin_fwd(ps, rec, v, &vw, Some(&vb), Act::None, None)?;
    let saved = attention::mha_train(rec, &qp, &kp, &vp, heads)?;
    let (y, lo) = lin_fwd(ps, rec, &saved.out, &ow, Some(&ob), Act::None, None)?;
    Ok((y, SamAttn { q: lq, k: lk, v: lv, o: lo, qp, kp, vp, saved, heads }))
}

/// Returns (dq, dk, dv) for the three inputs.
pub fn sam_attn_bwd(ps: &ParamStore, rec: &mut Recorder, c: &SamAttn, dy: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    let dout = lin_bwd(ps, rec, &c.o, dy, true)?.unwrap();
    let (dqp, dkp, dvp) = attention::mha_backward(rec, &c.qp, &c.kp, &c.vp, &c.saved, &dout, c.heads)?;
    let dq = lin_bwd(ps, rec, &c.q, &dqp, true)?.unwrap();
    let dk = lin_bwd(ps, rec, &c.k, &dkp, true)?.unwrap();
    let dv = lin_bwd(ps, rec, &c.v, &dvp, true)?.unwrap();
    Ok((dq, dk, dv))
}
