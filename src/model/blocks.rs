//! The layers every part of the model is built from, and the builder that names their tensors.
//!
//! Each layer owns its tensors under its key prefix, fetched once when the model is built through a
//! [`Vb`] (as candle-nn's `VarBuilder::pp`), from a [`Source`]: host weights uploaded for inference
//! (BatchNorm folded into its convolution), the training parameters already on the device (with
//! their gradient buffers), or the schema recorder that lists every key with its shape. Each layer
//! has `forward(rec, x, mode)`, which in [`Mode::Train`] also returns what its backward needs, and
//! right next to it `backward(rec, saved, dy)`, which returns the input gradient and accumulates the
//! parameter gradients. A parameter without a gradient buffer (frozen) passes gradients through.

use super::schema::Kind;
use crate::error::{Error, Result};
use crate::gpu::{Recorder, Tensor};
use crate::ops::attention::{self, AttnSaved, Window};
use crate::ops::conv::{self, ConvGeom, ConvGrads};
use crate::ops::elementwise::{act_backward, activation, col_sum};
use crate::ops::matmul::{Act, Gemm, gemm, linear, linear_save_pre};
use crate::ops::norm::{self, BnLayer, BnSaved, LnSaved, NormGrads};

/// Token LayerNorm epsilon (attention, MLP and two-way transformer norms).
pub const LN_EPS: f32 = 1e-5;
/// LayerNorm2d epsilon (neck, SAM-style channel norms).
pub const LN2D_EPS: f32 = 1e-6;
/// BatchNorm epsilon of every TinyViT `Conv2d_BN` (folding is done in f64).
pub const BN_EPS: f64 = 1e-5;
/// BatchNorm momentum (PyTorch's default).
pub const BN_MOMENTUM: f32 = 0.1;

/// Eval: inference (running statistics, fused epilogues, nothing kept). Train: batch statistics
/// where BatchNorm trains, and every layer keeps what its backward needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Eval,
    Train,
}

impl Mode {
    pub fn train(self) -> bool {
        self == Mode::Train
    }
    /// `f()` in train mode (what a backward needs), nothing in eval mode.
    pub fn keep<T>(self, f: impl FnOnce() -> T) -> Option<T> {
        self.train().then(f)
    }
}

/// A device tensor the forward reads, with its gradient buffer when it trains.
#[derive(Clone, Debug)]
pub struct Param {
    pub v: Tensor,
    pub g: Option<Tensor>,
}

impl Param {
    /// The gradient buffer, or zeroed scratch of the same shape when frozen.
    fn grad_or_scratch(&self, rec: &mut Recorder) -> Result<Tensor> {
        match &self.g {
            Some(g) => Ok(g.clone()),
            None => rec.zeros(&self.v.shape),
        }
    }
    /// Output channels `[c0, c0 + n)` of a per-channel or `[Co, ...]` tensor (views).
    fn rows(&self, c0: usize, n: usize) -> Param {
        let per = |t: &Tensor| {
            let shape: Vec<usize> = std::iter::once(n)
                .chain(t.shape[1..].iter().copied())
                .collect();
            t.reshape(&[t.shape[0], t.numel() / t.shape[0]])
                .narrow(c0, n)
                .reshape(&shape)
        };
        Param {
            v: per(&self.v),
            g: self.g.as_ref().map(per),
        }
    }
}

/// Where a model's tensors come from.
pub trait Source {
    /// What a layer holds per tensor (a device [`Param`], or a schema entry).
    type P: Clone;
    /// The tensor `key` of `shape`, which the forward reads.
    fn get(&self, key: &str, shape: &[usize], kind: Kind) -> Result<Self::P>;
    /// A tensor of the state_dict that the forward never reads (kept in files, listed in the schema).
    fn unused(&self, _key: &str, _shape: &[usize], _kind: Kind) {}
    /// The weight `key` of a linear layer or 1×1 convolution (`[out, in]` or `[out, in, 1, 1]`),
    /// which only the GEMM reads as its B operand: a source may store it at reduced precision.
    fn get_matrix(&self, key: &str, shape: &[usize]) -> Result<Self::P> {
        self.get(key, shape, Kind::Param)
    }
    /// A `Conv2d_BN` at `pre` folded into (weight, bias) for inference, or `None` to keep it raw.
    /// `matrix`: the convolution is 1×1 and runs as a GEMM (see [`Source::get_matrix`]).
    fn fold_bn(&self, _pre: &str, _matrix: bool) -> Result<Option<(Self::P, Self::P)>> {
        Ok(None)
    }
    /// Whether the BatchNorm of the `Conv2d_BN` at `pre` uses batch statistics in train mode.
    fn bn_trains(&self, _pre: &str) -> bool {
        false
    }
}

/// A key prefix on a [`Source`].
pub struct Vb<'a, S: Source> {
    src: &'a S,
    pre: String,
}

impl<'a, S: Source> Vb<'a, S> {
    pub fn new(src: &'a S) -> Self {
        Vb {
            src,
            pre: String::new(),
        }
    }
    /// The prefix extended by `name` (`a.b` + `c` → `a.b.c`).
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        Vb {
            src: self.src,
            pre: self.key(&name.to_string()),
        }
    }
    pub fn key(&self, name: &str) -> String {
        if self.pre.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.pre)
        }
    }
    pub fn prefix(&self) -> &str {
        &self.pre
    }
    pub fn source(&self) -> &'a S {
        self.src
    }
    /// A trainable parameter the forward reads.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<S::P> {
        self.src.get(&self.key(name), shape, Kind::Param)
    }
    /// A linear layer's or 1×1 convolution's weight ([`Source::get_matrix`]).
    pub fn matrix(&self, name: &str, shape: &[usize]) -> Result<S::P> {
        self.src.get_matrix(&self.key(name), shape)
    }
    pub fn get_kind(&self, name: &str, shape: &[usize], kind: Kind) -> Result<S::P> {
        self.src.get(&self.key(name), shape, kind)
    }
    /// A parameter the forward never reads.
    pub fn unused(&self, name: &str, shape: &[usize]) {
        self.src.unused(&self.key(name), shape, Kind::Param)
    }
}

/// A 2-D view [rows, cols] of a weight stored with trailing 1×1 dims.
fn as_matrix(w: &Tensor) -> Tensor {
    w.reshape(&[w.shape[0], w.numel() / w.shape[0]])
}

// ---------------------------------------------------------------- Linear

/// `y = act(x W^T + b) (+ residual)`; also the 1×1 convolutions (weights `[out, in, 1, 1]`).
pub struct Linear<P = Param> {
    pub w: P,
    pub b: Option<P>,
    pub act: Act,
}

pub struct LinearSaved {
    /// The input, unless released ([`LinearSaved::release_input`]).
    x: Option<Tensor>,
    x_shape: Vec<usize>,
    pre: Option<Tensor>,
}

impl LinearSaved {
    /// Releases the input: a LayerNorm's output, recomputed for the backward, which then calls
    /// [`Linear::backward_with`] or [`Linear::backward_from_pre_with`]; or the activated output
    /// of the layer before, which [`Linear::backward_through`] recomputes from its
    /// pre-activation.
    pub fn release_input(&mut self) {
        self.x = None;
    }
}

impl<P: Clone> Linear<P> {
    /// `nn.Linear(inp, out)` at `vb` (`weight`, `bias`).
    pub fn new<S: Source<P = P>>(vb: Vb<S>, out: usize, inp: usize, act: Act) -> Result<Self> {
        Ok(Linear {
            w: vb.matrix("weight", &[out, inp])?,
            b: Some(vb.get("bias", &[out])?),
            act,
        })
    }
    /// `nn.Conv2d(inp, out, 1)` run as a GEMM over channels.
    pub fn conv1x1<S: Source<P = P>>(
        vb: Vb<S>,
        out: usize,
        inp: usize,
        bias: bool,
        act: Act,
    ) -> Result<Self> {
        let w = vb.matrix("weight", &[out, inp, 1, 1])?;
        let b = if bias {
            Some(vb.get("bias", &[out])?)
        } else {
            None
        };
        Ok(Linear { w, b, act })
    }
    /// A linear layer of the state_dict the forward never reads.
    pub fn unused<S: Source<P = P>>(vb: Vb<S>, out: usize, inp: usize) {
        vb.unused("weight", &[out, inp]);
        vb.unused("bias", &[out]);
    }
}

impl Linear {
    pub fn forward(
        &self,
        rec: &mut Recorder,
        x: &Tensor,
        mode: Mode,
    ) -> Result<(Tensor, Option<LinearSaved>)> {
        self.forward_res(rec, x, None, mode)
    }

    /// With a residual added after the activation (the activation must be none in train mode).
    pub fn forward_res(
        &self,
        rec: &mut Recorder,
        x: &Tensor,
        residual: Option<&Tensor>,
        mode: Mode,
    ) -> Result<(Tensor, Option<LinearSaved>)> {
        let w = as_matrix(&self.w.v);
        let b = self.b.as_ref().map(|b| &b.v);
        if !mode.train() || self.act == Act::None {
            let y = linear(rec, x, &w, b, self.act, residual)?;
            return Ok((
                y,
                mode.keep(|| LinearSaved {
                    x: Some(x.clone()),
                    x_shape: x.shape.clone(),
                    pre: None,
                }),
            ));
        }
        if residual.is_some() {
            return Err(Error::Invalid(
                "linear: a residual after the activation is not fused in training".into(),
            ));
        }
        let (y, pre) = linear_save_pre(rec, x, &w, b, self.act)?;
        Ok((
            y,
            Some(LinearSaved {
                x: Some(x.clone()),
                x_shape: x.shape.clone(),
                pre: Some(pre),
            }),
        ))
    }

    /// [`Linear::backward`] of a layer whose saved state released its input
    /// ([`LinearSaved::release_input`]), given the input again.
    pub fn backward_with(
        &self,
        rec: &mut Recorder,
        s: &LinearSaved,
        x: &Tensor,
        dy: &Tensor,
    ) -> Result<Tensor> {
        let dpre = self.pre_grad(rec, s, dy)?;
        self.backward_pre(rec, s, x, &dpre, None)
    }

    /// The gradient of the pre-activation from the output's (`dy` itself without activation).
    fn pre_grad(&self, rec: &mut Recorder, s: &LinearSaved, dy: &Tensor) -> Result<Tensor> {
        match &s.pre {
            Some(pre) => act_backward(rec, pre, dy, self.act),
            None => Ok(dy.clone()),
        }
    }

    /// [`Linear::backward_from_pre`] given the input again (see [`Linear::backward_with`]).
    pub fn backward_from_pre_with(
        &self,
        rec: &mut Recorder,
        s: &LinearSaved,
        x: &Tensor,
        dpre: &Tensor,
    ) -> Result<Tensor> {
        self.backward_pre(rec, s, x, dpre, None)
    }

    /// dW += dpre^T x, db += Σ dpre; returns dx = dpre W (a residual's gradient is the caller's dy).
    pub fn backward(&self, rec: &mut Recorder, s: &LinearSaved, dy: &Tensor) -> Result<Tensor> {
        self.backward_with(rec, s, linear_input(s)?, dy)
    }

    /// [`Linear::backward`] whose input gradient goes on through the activation of `prev`, the
    /// layer that produced this layer's input (fused into the dx GEMM): returns `prev`'s
    /// pre-activation gradient, for [`Linear::backward_from_pre`].
    pub fn backward_through(
        &self,
        rec: &mut Recorder,
        s: &LinearSaved,
        dy: &Tensor,
        prev: &Linear,
        prev_saved: &LinearSaved,
    ) -> Result<Tensor> {
        let dpre = self.pre_grad(rec, s, dy)?;
        let through = prev_saved.pre.as_ref().map(|p| (p, prev.act));
        let recomputed;
        let x = match (&s.x, through) {
            (Some(x), _) => x,
            (None, Some((pre, act))) => {
                recomputed = activation(rec, pre, act)?;
                &recomputed
            }
            (None, None) => linear_input(s)?,
        };
        self.backward_pre(rec, s, x, &dpre, through)
    }

    /// [`Linear::backward`] given the gradient of this layer's pre-activation.
    pub fn backward_from_pre(
        &self,
        rec: &mut Recorder,
        s: &LinearSaved,
        dpre: &Tensor,
    ) -> Result<Tensor> {
        self.backward_from_pre_with(rec, s, linear_input(s)?, dpre)
    }

    fn backward_pre(
        &self,
        rec: &mut Recorder,
        s: &LinearSaved,
        x: &Tensor,
        dpre: &Tensor,
        through: Option<(&Tensor, Act)>,
    ) -> Result<Tensor> {
        if x.shape != s.x_shape {
            return Err(Error::Invalid(format!(
                "linear backward: input {:?}, the forward's was {:?}",
                x.shape, s.x_shape
            )));
        }
        let w = as_matrix(&self.w.v);
        let (n, k) = (w.shape[0], w.shape[1]);
        let m = x.numel() / k;
        if let Some(gw) = &self.w.g {
            let mut g = Gemm::new(n, k, m);
            g.trans_a = true;
            g.accumulate = true;
            gemm(rec, &g, dpre, x, None, None, &as_matrix(gw))?;
        }
        if let Some(gb) = self.b.as_ref().and_then(|b| b.g.as_ref()) {
            col_sum(rec, dpre, n, gb, true)?;
        }
        let dx = rec.gpu.empty(&x.shape)?;
        let mut g = Gemm::new(m, k, n);
        match through {
            Some((pre, act)) => {
                g.act = act;
                g.act_grad = true;
                gemm(rec, &g, dpre, &w, None, Some(pre), &dx)?;
            }
            None => gemm(rec, &g, dpre, &w, None, None, &dx)?,
        }
        Ok(dx)
    }
}

// ---------------------------------------------------------------- LayerNorm

/// LayerNorm over the last dimension (token LN or LayerNorm2d on channels-last maps), with an
/// optional fused activation.
pub struct LayerNorm<P = Param> {
    pub w: P,
    pub b: P,
    pub eps: f32,
    pub act: Act,
}

pub struct LayerNormSaved {
    x: Tensor,
    saved: LnSaved,
}

impl<P: Clone> LayerNorm<P> {
    pub fn new<S: Source<P = P>>(vb: Vb<S>, c: usize, eps: f32, act: Act) -> Result<Self> {
        Ok(LayerNorm {
            w: vb.get("weight", &[c])?,
            b: vb.get("bias", &[c])?,
            eps,
            act,
        })
    }
    pub fn unused<S: Source<P = P>>(vb: Vb<S>, c: usize) {
        vb.unused("weight", &[c]);
        vb.unused("bias", &[c]);
    }
}

impl LayerNorm {
    pub fn forward(
        &self,
        rec: &mut Recorder,
        x: &Tensor,
        mode: Mode,
    ) -> Result<(Tensor, Option<LayerNormSaved>)> {
        if !mode.train() {
            return Ok((
                norm::layer_norm(rec, x, &self.w.v, &self.b.v, self.eps, self.act)?,
                None,
            ));
        }
        let (y, saved) = norm::layer_norm_train(rec, x, &self.w.v, &self.b.v, self.eps, self.act)?;
        Ok((
            y,
            Some(LayerNormSaved {
                x: x.clone(),
                saved,
            }),
        ))
    }

    /// The train-mode forward's output again, from the kept input (the same kernel on the same
    /// values, so the same numbers): for layers after it that release their input.
    pub fn output(&self, rec: &mut Recorder, s: &LayerNormSaved) -> Result<Tensor> {
        let (y, _) = norm::layer_norm_train(rec, &s.x, &self.w.v, &self.b.v, self.eps, self.act)?;
        Ok(y)
    }

    /// Returns dx, added into `dx_acc` when given.
    pub fn backward(
        &self,
        rec: &mut Recorder,
        s: &LayerNormSaved,
        dy: &Tensor,
        dx_acc: Option<&Tensor>,
    ) -> Result<Tensor> {
        let gw = self.w.grad_or_scratch(rec)?;
        let gb = self.b.grad_or_scratch(rec)?;
        norm::layer_norm_backward(
            rec,
            &s.x,
            &self.w.v,
            &s.saved,
            dy,
            NormGrads {
                dw: &gw,
                db: &gb,
                dx_acc,
            },
        )
    }
}

// ---------------------------------------------------------------- convolutions

/// A dense convolution with optional bias and no activation (SAM-style layers without BatchNorm).
pub struct Conv2d<P = Param> {
    pub w: P,
    pub b: Option<P>,
    pub stride: usize,
    pub pad: usize,
}

pub struct ConvSaved {
    x: Tensor,
}

impl<P: Clone> Conv2d<P> {
    /// `nn.Conv2d(inp, out, k)` with `geom`; `bias`: whether the layer has one.
    pub fn new<S: Source<P = P>>(
        vb: Vb<S>,
        out: usize,
        inp: usize,
        k: usize,
        geom: ConvGeom,
        bias: bool,
    ) -> Result<Self> {
        let ConvGeom { stride, pad } = geom;
        let w = vb.get("weight", &[out, inp, k, k])?;
        let b = if bias {
            Some(vb.get("bias", &[out])?)
        } else {
            None
        };
        Ok(Conv2d { w, b, stride, pad })
    }
}

impl Conv2d {
    pub fn forward(
        &self,
        rec: &mut Recorder,
        x: &Tensor,
        mode: Mode,
    ) -> Result<(Tensor, Option<ConvSaved>)> {
        let y = conv::conv2d(
            rec,
            x,
            &self.w.v,
            self.b.as_ref().map(|b| &b.v),
            ConvGeom {
                stride: self.stride,
                pad: self.pad,
            },
            Act::None,
        )?;
        Ok((y, mode.keep(|| ConvSaved { x: x.clone() })))
    }

    pub fn backward(&self, rec: &mut Recorder, s: &ConvSaved, dy: &Tensor) -> Result<Tensor> {
        let dx = rec.zeros(&s.x.shape)?;
        self.backward_into(rec, s, dy, Some(&dx))?;
        Ok(dx)
    }

    /// Parameter gradients only (the input is the image).
    pub fn backward_params(&self, rec: &mut Recorder, s: &ConvSaved, dy: &Tensor) -> Result<()> {
        self.backward_into(rec, s, dy, None)
    }

    fn backward_into(
        &self,
        rec: &mut Recorder,
        s: &ConvSaved,
        dy: &Tensor,
        dx: Option<&Tensor>,
    ) -> Result<()> {
        let db = self.b.as_ref().and_then(|b| b.g.as_ref());
        conv::conv2d_backward(
            rec,
            &s.x,
            &self.w.v,
            dy,
            ConvGeom {
                stride: self.stride,
                pad: self.pad,
            },
            ConvGrads {
                dx,
                dw: self.w.g.as_ref(),
                dbias: db,
            },
        )
    }
}

/// ConvTranspose2d with kernel 2 and stride 2, bias, optional activation.
pub struct ConvT2x2<P = Param> {
    pub w: P,
    pub b: P,
    pub act: Act,
}

pub struct ConvTSaved {
    x: Tensor,
    pre: Option<Tensor>,
}

impl<P: Clone> ConvT2x2<P> {
    /// Weight `[in, out, 2, 2]` (PyTorch's ConvTranspose layout).
    pub fn new<S: Source<P = P>>(vb: Vb<S>, inp: usize, out: usize, act: Act) -> Result<Self> {
        Ok(ConvT2x2 {
            w: vb.get("weight", &[inp, out, 2, 2])?,
            b: vb.get("bias", &[out])?,
            act,
        })
    }
}

impl ConvT2x2 {
    pub fn forward(
        &self,
        rec: &mut Recorder,
        x: &Tensor,
        mode: Mode,
    ) -> Result<(Tensor, Option<ConvTSaved>)> {
        if !mode.train() {
            return Ok((
                conv::conv_transpose2x2(rec, x, &self.w.v, Some(&self.b.v), self.act)?,
                None,
            ));
        }
        let z = conv::conv_transpose2x2(rec, x, &self.w.v, Some(&self.b.v), Act::None)?;
        let (y, pre) = if self.act == Act::None {
            (z, None)
        } else {
            (activation(rec, &z, self.act)?, Some(z))
        };
        Ok((y, Some(ConvTSaved { x: x.clone(), pre })))
    }

    pub fn backward(&self, rec: &mut Recorder, s: &ConvTSaved, dy: &Tensor) -> Result<Tensor> {
        let dz = match &s.pre {
            Some(p) => act_backward(rec, p, dy, self.act)?,
            None => dy.clone(),
        };
        let dx = rec.zeros(&s.x.shape)?;
        conv::conv_transpose2x2_backward(
            rec,
            &s.x,
            &self.w.v,
            &dz,
            ConvGrads {
                dx: Some(&dx),
                dw: self.w.g.as_ref(),
                dbias: self.b.g.as_ref(),
            },
        )?;
        Ok(dx)
    }
}

#[derive(Clone, Copy, Debug)]
pub enum ConvKind {
    /// 1×1, stride 1: a GEMM over channels.
    Pointwise,
    Dense {
        stride: usize,
        pad: usize,
    },
    Depthwise {
        stride: usize,
        pad: usize,
    },
}

/// The tensors of a `Conv2d_BN`: folded for inference, or raw (conv weight; BatchNorm weight,
/// bias, running mean, running variance) for training and for eval on training parameters.
pub enum CbnForm<P> {
    Folded { w: P, b: P },
    Raw { w: P, bn: [P; 4] },
}

/// TinyViT `Conv2d_BN` (convolution without bias + BatchNorm2d) with a fused activation. Built from
/// host weights for inference, the BatchNorm is folded into the convolution at load
/// (`w' = w·γ/√(σ²+ε)`, `b' = β − μ·γ/√(σ²+ε)`, in f64).
pub struct Conv2dBn<P = Param> {
    pub form: CbnForm<P>,
    pub kind: ConvKind,
    pub act: Act,
    /// BatchNorm with batch statistics in train mode (otherwise running statistics, frozen).
    pub train_bn: bool,
}

/// What a `Conv2dBn`'s backward needs: the convolution output `z` before the BatchNorm and the
/// batch statistics. The pre-activation and the output are recomputed from them when needed
/// ([`Conv2dBn::output`]); the input is kept unless released ([`Conv2dBnSaved::release_input`]:
/// it is then the previous layer's recomputed output).
pub struct Conv2dBnSaved {
    x: Option<Tensor>,
    x_shape: Vec<usize>,
    /// The convolution output, unless released with [`Conv2dBnSaved::release_z`].
    z: Option<Tensor>,
    bn: BnSaved,
}

impl Conv2dBnSaved {
    /// Releases the input: it must be the output of the `Conv2dBn` before this one in a chain,
    /// which [`chain_recompute`] recomputes.
    pub fn release_input(&mut self) {
        self.x = None;
    }
    /// Releases the convolution output: [`chain_recompute`] recomputes it from the input (the
    /// same kernel on the same values, so the same numbers). For a cheap convolution with a
    /// large output (the expansions of MBConv and PatchMerging).
    pub fn release_z(&mut self) {
        self.z = None;
    }
    fn z(&self) -> Result<&Tensor> {
        self.z.as_ref().ok_or_else(|| {
            Error::Invalid("Conv2dBn backward: the convolution output was released".into())
        })
    }
}

impl<P: Clone> Conv2dBn<P> {
    /// Conv weight `[out, in_per_group, k, k]` at `vb.c`, BatchNorm at `vb.bn`.
    pub fn new<S: Source<P = P>>(
        vb: Vb<S>,
        out: usize,
        in_per_group: usize,
        k: usize,
        kind: ConvKind,
        act: Act,
    ) -> Result<Self> {
        let train_bn = vb.source().bn_trains(vb.prefix());
        let matrix = matches!(kind, ConvKind::Pointwise);
        if let Some((w, b)) = vb.source().fold_bn(vb.prefix(), matrix)? {
            return Ok(Conv2dBn {
                form: CbnForm::Folded { w, b },
                kind,
                act,
                train_bn,
            });
        }
        let w = vb.get("c.weight", &[out, in_per_group, k, k])?;
        let bn = vb.pp("bn");
        let g = bn.get("weight", &[out])?;
        let b = bn.get("bias", &[out])?;
        let rm = bn.get_kind("running_mean", &[out], Kind::RunningStat)?;
        let rv = bn.get_kind("running_var", &[out], Kind::RunningStat)?;
        bn.source()
            .unused(&bn.key("num_batches_tracked"), &[], Kind::Counter);
        Ok(Conv2dBn {
            form: CbnForm::Raw {
                w,
                bn: [g, b, rm, rv],
            },
            kind,
            act,
            train_bn,
        })
    }
}

impl Conv2dBn {
    fn raw(&self) -> Result<(&Param, &[Param; 4])> {
        match &self.form {
            CbnForm::Raw { w, bn } => Ok((w, bn)),
            CbnForm::Folded { .. } => Err(Error::Invalid(
                "a model loaded for inference (BatchNorm folded) cannot run in train mode".into(),
            )),
        }
    }

    /// The folded (weight, bias) when the model was loaded for inference.
    pub fn folded(&self) -> Option<(&Tensor, &Tensor)> {
        match &self.form {
            CbnForm::Folded { w, b } => Some((&w.v, &b.v)),
            CbnForm::Raw { .. } => None,
        }
    }

    /// The convolution alone (bias when folded), activation `act`.
    fn conv(
        &self,
        rec: &mut Recorder,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        act: Act,
    ) -> Result<Tensor> {
        match self.kind {
            ConvKind::Pointwise => linear(rec, x, &as_matrix(w), b, act, None),
            ConvKind::Dense { stride, pad } => {
                conv::conv2d(rec, x, w, b, ConvGeom { stride, pad }, act)
            }
            ConvKind::Depthwise { stride, pad } => {
                conv::depthwise_conv2d(rec, x, w, b, ConvGeom { stride, pad }, act)
            }
        }
    }

    pub fn forward(
        &self,
        rec: &mut Recorder,
        x: &Tensor,
        mode: Mode,
    ) -> Result<(Tensor, Option<Conv2dBnSaved>)> {
        if let (Mode::Eval, CbnForm::Folded { w, b }) = (mode, &self.form) {
            return Ok((self.conv(rec, x, &w.v, Some(&b.v), self.act)?, None));
        }
        let (w, [g, b, rm, rv]) = self.raw()?;
        let z = self.conv(rec, x, &w.v, None, Act::None)?;
        if !mode.train() {
            return Ok((
                norm::batch_norm_eval(
                    rec,
                    &z,
                    BnLayer {
                        w: &g.v,
                        b: &b.v,
                        running_mean: &rm.v,
                        running_var: &rv.v,
                    },
                    BN_EPS as f32,
                    self.act,
                )?,
                None,
            ));
        }
        let (y, bn) = self.bn_forward(rec, &z)?;
        Ok((
            y,
            Some(Conv2dBnSaved {
                x: Some(x.clone()),
                x_shape: x.shape.clone(),
                z: Some(z),
                bn,
            }),
        ))
    }

    /// The forward's output `act(BN(z))`, recomputed from what `s` saved (the same kernel and
    /// values as the forward's).
    pub fn output(&self, rec: &mut Recorder, s: &Conv2dBnSaved) -> Result<Tensor> {
        self.output_of(rec, s, s.z()?)
    }

    /// [`Conv2dBn::output`] given the convolution output `z`.
    pub fn output_of(&self, rec: &mut Recorder, s: &Conv2dBnSaved, z: &Tensor) -> Result<Tensor> {
        self.bn_output(rec, z, &s.bn)
    }

    /// The output of [`Conv2dBn::bn_forward`] on `z`, recomputed from its saved statistics.
    pub fn bn_output(&self, rec: &mut Recorder, z: &Tensor, bn: &BnSaved) -> Result<Tensor> {
        let [g, b, ..] = self.raw()?.1;
        norm::batch_norm_recompute(rec, z, bn, &g.v, &b.v, self.act)
    }

    /// The convolution of `x` (no bias) exactly as the train-mode forward computes it.
    fn conv_z(&self, rec: &mut Recorder, x: &Tensor) -> Result<Tensor> {
        let w = self.weight()?;
        self.conv(rec, x, &w.v, None, Act::None)
    }

    /// Train mode: the BatchNorm (and activation) of a convolution output `z` computed elsewhere.
    pub fn bn_forward(&self, rec: &mut Recorder, z: &Tensor) -> Result<(Tensor, BnSaved)> {
        let [g, b, rm, rv] = self.raw()?.1;
        let layer = BnLayer {
            w: &g.v,
            b: &b.v,
            running_mean: &rm.v,
            running_var: &rv.v,
        };
        // The pre-activation is not kept: `bn_backward` recomputes it.
        if self.train_bn {
            norm::batch_norm_train_keep(rec, z, layer, BN_MOMENTUM, BN_EPS as f32, self.act, false)
        } else {
            norm::batch_norm_eval_saved_keep(rec, z, layer, BN_EPS as f32, self.act, false)
        }
    }

    /// Backward of [`Conv2dBn::bn_forward`]: returns dz; accumulates the BatchNorm weight/bias gradients.
    pub fn bn_backward(
        &self,
        rec: &mut Recorder,
        z: &Tensor,
        saved: &BnSaved,
        dy: &Tensor,
    ) -> Result<Tensor> {
        let [g, b, ..] = self.raw()?.1;
        let gg = g.grad_or_scratch(rec)?;
        let gb = b.grad_or_scratch(rec)?;
        let with_pre;
        let saved = if saved.pre.is_none() && saved.act != Act::None {
            let pre = norm::batch_norm_recompute(rec, z, saved, &g.v, &b.v, Act::None)?;
            with_pre = BnSaved {
                pre: Some(pre),
                ..saved.clone()
            };
            &with_pre
        } else {
            saved
        };
        norm::batch_norm_backward(
            rec,
            z,
            &g.v,
            saved,
            dy,
            NormGrads {
                dw: &gg,
                db: &gb,
                dx_acc: None,
            },
        )
    }

    /// Output channels `[c0, c0 + n)` as a layer of its own (views of the raw tensors; offsets must
    /// be aligned, which holds for channel counts that are multiples of 64).
    pub fn out_channels(&self, c0: usize, n: usize) -> Result<Conv2dBn> {
        let (w, bn) = self.raw()?;
        let bn = [
            bn[0].rows(c0, n),
            bn[1].rows(c0, n),
            bn[2].rows(c0, n),
            bn[3].rows(c0, n),
        ];
        Ok(Conv2dBn {
            form: CbnForm::Raw {
                w: w.rows(c0, n),
                bn,
            },
            kind: self.kind,
            act: self.act,
            train_bn: self.train_bn,
        })
    }

    /// The raw convolution weight and its gradient buffer.
    pub fn weight(&self) -> Result<&Param> {
        Ok(self.raw()?.0)
    }

    pub fn backward(&self, rec: &mut Recorder, s: &Conv2dBnSaved, dy: &Tensor) -> Result<Tensor> {
        let x = kept_input(s)?;
        self.backward_with(rec, s, x, dy)
    }

    /// [`Conv2dBn::backward`] of a layer whose input was released, given its input.
    pub fn backward_with(
        &self,
        rec: &mut Recorder,
        s: &Conv2dBnSaved,
        x: &Tensor,
        dy: &Tensor,
    ) -> Result<Tensor> {
        self.backward_z(rec, s, x, s.z()?, dy)
    }

    /// [`Conv2dBn::backward_with`] given the convolution output `z` as well.
    fn backward_z(
        &self,
        rec: &mut Recorder,
        s: &Conv2dBnSaved,
        x: &Tensor,
        z: &Tensor,
        dy: &Tensor,
    ) -> Result<Tensor> {
        if x.shape != s.x_shape {
            return Err(Error::Invalid(format!(
                "Conv2dBn backward: input {:?}, the forward's was {:?}",
                x.shape, s.x_shape
            )));
        }
        let dx = match self.kind {
            ConvKind::Pointwise => rec.gpu.empty(&x.shape)?,
            _ => rec.zeros(&x.shape)?,
        };
        self.backward_into(rec, s, x, z, dy, Some(&dx))?;
        Ok(dx)
    }

    /// Parameter gradients only (the input is the image).
    pub fn backward_params(
        &self,
        rec: &mut Recorder,
        s: &Conv2dBnSaved,
        dy: &Tensor,
    ) -> Result<()> {
        let x = kept_input(s)?;
        self.backward_into(rec, s, x, s.z()?, dy, None)
    }

    fn backward_into(
        &self,
        rec: &mut Recorder,
        s: &Conv2dBnSaved,
        x: &Tensor,
        z: &Tensor,
        dy: &Tensor,
        dx: Option<&Tensor>,
    ) -> Result<()> {
        let dz = self.bn_backward(rec, z, &s.bn, dy)?;
        let w = self.weight()?;
        let gw = w.g.as_ref();
        match self.kind {
            ConvKind::Pointwise => {
                let w2 = as_matrix(&w.v);
                let (n, k) = (w2.shape[0], w2.shape[1]);
                let m = x.numel() / k;
                if let Some(gw) = gw {
                    let mut g = Gemm::new(n, k, m);
                    g.trans_a = true;
                    g.accumulate = true;
                    gemm(rec, &g, &dz, x, None, None, &as_matrix(gw))?;
                }
                if let Some(dx) = dx {
                    gemm(rec, &Gemm::new(m, k, n), &dz, &w2, None, None, dx)?;
                }
                Ok(())
            }
            _ if dx.is_none() && gw.is_none() => Ok(()),
            ConvKind::Dense { stride, pad } => conv::conv2d_backward(
                rec,
                x,
                &w.v,
                &dz,
                ConvGeom { stride, pad },
                ConvGrads {
                    dx,
                    dw: gw,
                    ..Default::default()
                },
            ),
            ConvKind::Depthwise { stride, pad } => conv::depthwise_conv2d_backward(
                rec,
                x,
                &w.v,
                &dz,
                ConvGeom { stride, pad },
                ConvGrads {
                    dx,
                    dw: gw,
                    ..Default::default()
                },
            ),
        }
    }
}

/// Backward of `Conv2dBn` layers that ran one after the other, each but the first with its input
/// released ([`Conv2dBnSaved::release_input`]). What was not kept is
/// recomputed first, in forward order: the convolution outputs released with
/// [`Conv2dBnSaved::release_z`] and every later layer's input (the output of the layer before
/// it); each is released after the backward that needs it. Returns the first layer's input
/// gradient with `input_grad`; without it only the parameter gradients are computed (a layer on
/// the image).
pub fn chain_backward(
    rec: &mut Recorder,
    chain: &[(&Conv2dBn, &Conv2dBnSaved)],
    dy: &Tensor,
    input_grad: bool,
) -> Result<Option<Tensor>> {
    let (xs, zs) = chain_recompute(rec, chain)?;
    chain_backward_from(rec, chain, xs, zs, dy, input_grad)
}

/// What [`chain_backward`] recomputes first: every layer's input and convolution output.
#[allow(clippy::type_complexity)]
pub fn chain_recompute(
    rec: &mut Recorder,
    chain: &[(&Conv2dBn, &Conv2dBnSaved)],
) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
    let Some(&(_, fs)) = chain.first() else {
        return Err(Error::Invalid("chain_backward: no layers".into()));
    };
    let mut xs = vec![kept_input(fs)?.clone()];
    let mut zs = Vec::with_capacity(chain.len());
    for (i, &(layer, s)) in chain.iter().enumerate() {
        let z = match &s.z {
            Some(z) => z.clone(),
            None => layer.conv_z(rec, &xs[i])?,
        };
        if i + 1 < chain.len() {
            xs.push(layer.output_of(rec, s, &z)?);
        }
        zs.push(z);
    }
    Ok((xs, zs))
}

/// [`chain_backward`] given what [`chain_recompute`] returned (`xs`, `zs`).
pub fn chain_backward_from(
    rec: &mut Recorder,
    chain: &[(&Conv2dBn, &Conv2dBnSaved)],
    mut xs: Vec<Tensor>,
    mut zs: Vec<Tensor>,
    dy: &Tensor,
    input_grad: bool,
) -> Result<Option<Tensor>> {
    let Some(&(first, fs)) = chain.first() else {
        return Err(Error::Invalid("chain_backward: no layers".into()));
    };
    if xs.len() != chain.len() || zs.len() != chain.len() {
        return Err(Error::Invalid(
            "chain_backward: one input and one output per layer".into(),
        ));
    }
    let mut d = dy.clone();
    for &(layer, s) in chain[1..].iter().rev() {
        let (x, z) = xs
            .pop()
            .zip(zs.pop())
            .expect("one input and output per layer");
        d = layer.backward_z(rec, s, &x, &z, &d)?;
    }
    let z = zs.pop().expect("the first layer's output");
    drop(zs);
    if input_grad {
        Ok(Some(first.backward_z(rec, fs, &xs[0], &z, &d)?))
    } else {
        first.backward_into(rec, fs, &xs[0], &z, &d, None)?;
        Ok(None)
    }
}

/// The input a `Linear` kept (run with [`Linear::forward_res`]).
fn linear_input(s: &LinearSaved) -> Result<&Tensor> {
    s.x.as_ref().ok_or_else(|| {
        Error::Invalid("linear backward: the input was not kept (chained layer)".into())
    })
}

/// The input a `Conv2dBn` kept (run with [`Conv2dBn::forward`]).
fn kept_input(s: &Conv2dBnSaved) -> Result<&Tensor> {
    s.x.as_ref().ok_or_else(|| {
        Error::Invalid(
            "Conv2dBn backward: the input was not kept (chained layer); use backward_with".into(),
        )
    })
}

// ---------------------------------------------------------------- attention cores

/// What the backward of an attention core needs.
pub struct AttnCoreSaved {
    qkv: Tensor,
    saved: AttnSaved,
}

/// TinyViT windowed multi-head attention on packed `qkv` with its learned relative-position bias
/// `[heads, ws*ws]`.
pub fn window_attention(
    rec: &mut Recorder,
    qkv: &Tensor,
    bias: &Param,
    heads: usize,
    ws: usize,
    mode: Mode,
) -> Result<(Tensor, Option<AttnCoreSaved>)> {
    if !mode.train() {
        return Ok((
            attention::window_attention(rec, qkv, &bias.v, Window { heads, ws })?,
            None,
        ));
    }
    let saved = attention::window_attention_train(rec, qkv, &bias.v, Window { heads, ws })?;
    Ok((
        saved.out.clone(),
        Some(AttnCoreSaved {
            qkv: qkv.clone(),
            saved,
        }),
    ))
}

/// Returns d(qkv); accumulates the bias gradient.
pub fn window_attention_backward(
    rec: &mut Recorder,
    bias: &Param,
    s: &AttnCoreSaved,
    dout: &Tensor,
    heads: usize,
    ws: usize,
) -> Result<Tensor> {
    let db = bias.grad_or_scratch(rec)?;
    let win = Window { heads, ws };
    attention::window_attention_backward(rec, &s.qkv, &bias.v, &s.saved, dout, win, &db)
}
