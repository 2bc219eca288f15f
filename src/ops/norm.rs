//! Normalisation kernels (shaders/norm.wgsl): LayerNorm over the last dim (token LayerNorm and
//! LayerNorm2d on channels-last maps) and BatchNorm2d on channels-last maps.
//!
//! Both see a `[rows, C]` matrix (rows = every leading dim). LayerNorm with C % 4 == 0 (every
//! LayerNorm of the model) runs one invocation per 2 rows (forward, `ln_row4`) or per row
//! (backward, `ln_bwd_dx4`) with vec4 loads: no workgroup reductions, which are slow on CPU
//! adapters; otherwise one team of `T = next_pow2(C) / 16` (1..=256) invocations per row.
//! Two-pass mean / variance in f32.
//! Every reduction over rows (LayerNorm dw/db, BatchNorm statistics and gradients) is two-level and
//! deterministic: per-workgroup partial sums over fixed row chunks, then one workgroup per column
//! sums the partials in a fixed order. No atomics.

use super::matmul::Act;
use super::u;
use crate::error::{Error, Result};
use crate::gpu::{Kernel, Recorder, ShaderFamily, Tensor};

crate::uniform! {
    /// norm.wgsl `LnParams` (LayerNorm kernels).
    struct LnParams { rows: u32, c: u32, eps: f32, pad: u32 }
}
crate::uniform! {
    /// norm.wgsl `ColParams` (first level of the column reductions).
    struct ColParams { rows: u32, c: u32, chunk_rows: u32, nchunks: u32, ncoltiles: u32, pad0: u32, pad1: u32, pad2: u32 }
}
crate::uniform! {
    /// norm.wgsl `ReduceParams` (reduce_part).
    struct ReduceParams { jn: u32, kn: u32, split: u32, alpha: f32 }
}
crate::uniform! {
    /// norm.wgsl `BnParams` (BatchNorm kernels).
    struct BnParams { n: u32, c: u32, momentum: f32, eps: f32, unbias: f32, update: u32, inv_rows: f32, pad: u32 }
}

fn ln_params(rows: usize, c: usize, eps: f32) -> LnParams {
    LnParams {
        rows: u(rows),
        c: u(c),
        eps,
        pad: 0,
    }
}

/// Threads per row of the LayerNorm kernels: about 16 values per thread. (One invocation per value
/// made the barrier-heavy tree reductions dominate on lavapipe, 3-5x slower; ~16 per thread keeps
/// rows contiguous within a team and enough teams per workgroup on real GPUs.)
fn team_size(c: usize) -> u32 {
    (c.next_power_of_two() / 16).clamp(1, 256) as u32
}

fn check_team(team: u32) -> Result<u32> {
    if team == 0 || team > 256 || !team.is_power_of_two() {
        return Err(Error::Invalid(format!(
            "layer_norm: team size {team} is not a power of two in 1..=256"
        )));
    }
    Ok(team)
}

fn norm_kernel(entry: &'static str, inv: u32) -> Kernel {
    Kernel::new(ShaderFamily::Norm, entry, inv)
}

fn check_ln(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<(usize, usize)> {
    let c = *x
        .shape
        .last()
        .ok_or_else(|| Error::Invalid("layer_norm: scalar input".into()))?;
    if c == 0 || w.numel() != c || b.numel() != c {
        return Err(Error::Invalid(format!(
            "layer_norm: input {:?}, weight {:?}, bias {:?} (weight and bias need C = {c} values)",
            x.shape, w.shape, b.shape
        )));
    }
    Ok((x.numel() / c, c))
}

/// LayerNorm over the last dim C: y = (x - mean)/sqrt(var + eps) * w + b (biased variance), then act.
/// Used with eps 1e-5 (token LayerNorm) and 1e-6 (LayerNorm2d on channels-last maps).
pub fn layer_norm(
    rec: &mut Recorder,
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f32,
    act: Act,
) -> Result<Tensor> {
    let (rows, c) = check_ln(x, w, b)?;
    let y = rec.gpu.empty(&x.shape)?;
    let t = team_size(c);
    if rows == 0 {
        return Ok(y);
    }
    if c.is_multiple_of(4) {
        let k = norm_kernel("ln_row4", ROW4_WG as u32).u("ACT", act.code());
        let groups = rec.grid(rows.div_ceil(2 * ROW4_WG));
        rec.dispatch(&k, ln_params(rows, c, eps), &[x, w, b, &y], groups)?;
        return Ok(y);
    }
    let k = norm_kernel("ln_fwd", 256).u("T", t).u("ACT", act.code());
    let groups = rec.grid(rows.div_ceil((256 / t) as usize));
    rec.dispatch(&k, ln_params(rows, c, eps), &[x, w, b, &y], groups)?;
    Ok(y)
}

/// Invocations per workgroup of `ln_row4` (each normalises 2 rows).
const ROW4_WG: usize = 8;

/// What [`layer_norm_backward`] needs from a training forward.
#[derive(Clone, Debug)]
pub struct LnSaved {
    /// Per-row mean, `[rows]`.
    pub mean: Tensor,
    /// Per-row 1/sqrt(var + eps), `[rows]`.
    pub rstd: Tensor,
    /// The pre-activation `(x - mean) * rstd * w + b` (only when `act != Act::None`).
    pub pre: Option<Tensor>,
    pub act: Act,
}

/// Training forward of [`layer_norm`]: same output, plus the per-row statistics (and the
/// pre-activation when `act` is not `Act::None`) for [`layer_norm_backward`].
pub fn layer_norm_train(
    rec: &mut Recorder,
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f32,
    act: Act,
) -> Result<(Tensor, LnSaved)> {
    let c = x.shape.last().copied().unwrap_or(0);
    if c == 0 || !c.is_multiple_of(4) {
        return layer_norm_train_with_team_impl(rec, x, w, b, eps, act, team_size(c));
    }
    let (rows, c) = check_ln(x, w, b)?;
    let y = rec.gpu.empty(&x.shape)?;
    let mean = rec.gpu.empty(&[rows])?;
    let rstd = rec.gpu.empty(&[rows])?;
    let pre = if act != Act::None {
        Some(rec.gpu.empty(&x.shape)?)
    } else {
        None
    };
    if rows > 0 {
        let dummy = rec.gpu.dummy();
        let k = norm_kernel("ln_row4_train", ROW4_WG as u32).u("ACT", act.code());
        let groups = rec.grid(rows.div_ceil(2 * ROW4_WG));
        rec.dispatch(
            &k,
            ln_params(rows, c, eps),
            &[x, w, b, &y, &mean, &rstd, pre.as_ref().unwrap_or(&dummy)],
            groups,
        )?;
    }
    Ok((
        y,
        LnSaved {
            mean,
            rstd,
            pre,
            act,
        },
    ))
}

/// [`layer_norm_train`] with an explicit number of threads per row (a power of two ≤ 256); used by
/// the tests to cover every reduction width and the grid splitting with small tensors.
fn layer_norm_train_with_team_impl(
    rec: &mut Recorder,
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f32,
    act: Act,
    team: u32,
) -> Result<(Tensor, LnSaved)> {
    let (rows, c) = check_ln(x, w, b)?;
    let team = check_team(team)?;
    let y = rec.gpu.empty(&x.shape)?;
    let mean = rec.gpu.empty(&[rows])?;
    let rstd = rec.gpu.empty(&[rows])?;
    let pre = if act != Act::None {
        Some(rec.gpu.empty(&x.shape)?)
    } else {
        None
    };
    let dummy = rec.gpu.dummy();
    let t = team;
    let k = norm_kernel("ln_fwd_train", 256)
        .u("T", t)
        .u("ACT", act.code());
    let groups = rec.grid(rows.div_ceil((256 / t) as usize));
    rec.dispatch(
        &k,
        ln_params(rows, c, eps),
        &[x, w, b, &y, &mean, &rstd, pre.as_ref().unwrap_or(&dummy)],
        groups,
    )?;
    Ok((
        y,
        LnSaved {
            mean,
            rstd,
            pre,
            act,
        },
    ))
}

/// (With the `testing` feature: the hook tests use to pin this choice.)
#[cfg(any(test, feature = "testing"))]
pub fn layer_norm_train_with_team(
    rec: &mut Recorder,
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f32,
    act: Act,
    team: u32,
) -> Result<(Tensor, LnSaved)> {
    layer_norm_train_with_team_impl(rec, x, w, b, eps, act, team)
}

/// Where a normalisation backward puts its gradients: the weight's `dw` and the bias's `db`
/// (accumulated), and, when given, `dx_acc`, a tensor the input gradient is added into (returned)
/// instead of a new one.
#[derive(Clone, Copy)]
pub struct NormGrads<'a> {
    pub dw: &'a Tensor,
    pub db: &'a Tensor,
    pub dx_acc: Option<&'a Tensor>,
}

/// Backward of [`layer_norm_train`] given `dy` (gradient of its output y): accumulates
/// `dw += Σ_rows dz * xhat`, `db += Σ_rows dz` (dz = dy * act'(pre)) and returns dx (see
/// [`NormGrads`]).
pub fn layer_norm_backward(
    rec: &mut Recorder,
    x: &Tensor,
    w: &Tensor,
    saved: &LnSaved,
    dy: &Tensor,
    grads: NormGrads,
) -> Result<Tensor> {
    let c = x.shape.last().copied().unwrap_or(0);
    // C % 4 == 0 (every LayerNorm of the model): one invocation per row with vec4 loads.
    let team = if c > 0 && c.is_multiple_of(4) {
        0
    } else {
        team_size(c)
    };
    layer_norm_backward_impl(rec, x, w, saved, dy, grads, team)
}

/// [`layer_norm_backward`] with an explicit number of threads per row (tests).
#[cfg(any(test, feature = "testing"))]
pub fn layer_norm_backward_with_team(
    rec: &mut Recorder,
    x: &Tensor,
    w: &Tensor,
    saved: &LnSaved,
    dy: &Tensor,
    grads: NormGrads,
    team: u32,
) -> Result<Tensor> {
    layer_norm_backward_impl(rec, x, w, saved, dy, grads, check_team(team)?)
}

/// `team` = 0: `ln_bwd_dx4` (C % 4 == 0), else `ln_bwd_dx` with teams of that size.
fn layer_norm_backward_impl(
    rec: &mut Recorder,
    x: &Tensor,
    w: &Tensor,
    saved: &LnSaved,
    dy: &Tensor,
    grads: NormGrads,
    team: u32,
) -> Result<Tensor> {
    let NormGrads { dw, db, dx_acc } = grads;
    let (rows, c) = check_ln(x, w, w)?;
    if dy.numel() != x.numel() || dw.numel() != c || db.numel() != c || saved.mean.numel() != rows {
        return Err(Error::Invalid(format!(
            "layer_norm_backward: x {:?}, dy {:?}, dw {:?}, db {:?}, saved mean {:?}",
            x.shape, dy.shape, dw.shape, db.shape, saved.mean.shape
        )));
    }
    if let Some(d) = dx_acc.filter(|d| d.numel() != x.numel()) {
        return Err(Error::Invalid(format!(
            "layer_norm_backward: dx {:?} vs x {:?}",
            d.shape, x.shape
        )));
    }
    let dummy = rec.gpu.dummy();
    let pre = saved.pre.as_ref().unwrap_or(&dummy);
    let dx = match dx_acc {
        Some(d) => d.clone(),
        None => rec.gpu.empty(&x.shape)?,
    };
    if rows == 0 {
        return Ok(dx);
    }
    let (k, groups) = if team == 0 {
        (
            norm_kernel("ln_bwd_dx4", ROW4_WG as u32),
            rec.grid(rows.div_ceil(ROW4_WG)),
        )
    } else {
        (
            norm_kernel("ln_bwd_dx", 256).u("T", team),
            rec.grid(rows.div_ceil((256 / team) as usize)),
        )
    };
    let k = k.u("ACT", saved.act.code()).b("ACCUM", dx_acc.is_some());
    rec.dispatch(
        &k,
        ln_params(rows, c, 0.0),
        &[x, w, &saved.mean, &saved.rstd, dy, pre, &dx],
        groups,
    )?;
    let plan = ColPlan::new(rows, c);
    let terms = GradTerms {
        x,
        dy,
        pre,
        mean: &saved.mean,
        rstd: &saved.rstd,
        act: saved.act,
    };
    let part = plan.col_grad(rec, terms, true)?;
    let r = Reduce {
        jn: 2 * c,
        kn: plan.nchunks,
        split: c,
        alpha: 1.0,
        accum: true,
    };
    reduce_part(rec, &part, r, dw, db)?;
    Ok(dx)
}

/// How a column reduction over `[rows, c]` is split: tiles of `ct` columns times chunks of
/// `chunk_rows` rows, one workgroup each. Depends only on the shape, so results are reproducible.
/// With C % 4 == 0 the kernels work on column quads (`vec4`): `c` and the tiles count quads.
struct ColPlan {
    rows: usize,
    c: usize,
    v4: bool,
    ct: u32,
    ncoltiles: usize,
    chunk_rows: usize,
    nchunks: usize,
}

impl ColPlan {
    fn new(rows: usize, c: usize) -> Self {
        let v4 = c.is_multiple_of(4);
        let c = if v4 { c / 4 } else { c };
        let ct = c.next_power_of_two().clamp(1, 64);
        let lanes = 256 / ct;
        // At least 8 rows per lane, at most 512 chunks (the second level sums ≤ 512 values).
        let nchunks = rows.div_ceil(lanes * 8).clamp(1, 512);
        let chunk_rows = rows.div_ceil(nchunks).max(1);
        let nchunks = rows.div_ceil(chunk_rows).max(1);
        ColPlan {
            rows,
            c,
            v4,
            ct: ct as u32,
            ncoltiles: c.div_ceil(ct),
            chunk_rows,
            nchunks,
        }
    }

    fn params(&self) -> ColParams {
        let (rows, c, chunk_rows, nchunks, ncoltiles) = (
            u(self.rows),
            u(self.c),
            u(self.chunk_rows),
            u(self.nchunks),
            u(self.ncoltiles),
        );
        ColParams {
            rows,
            c,
            chunk_rows,
            nchunks,
            ncoltiles,
            pad0: 0,
            pad1: 0,
            pad2: 0,
        }
    }

    /// Number of matrix columns (C).
    fn columns(&self) -> usize {
        if self.v4 { self.c * 4 } else { self.c }
    }

    fn groups(&self, rec: &Recorder) -> [u32; 3] {
        rec.grid(self.ncoltiles * self.nchunks)
    }

    /// Partial per-column sums of x, or of (x - mean[col])^2 when `mean` is given: `[c, nchunks]`.
    fn col_sum(&self, rec: &mut Recorder, x: &Tensor, mean: Option<&Tensor>) -> Result<Tensor> {
        let part = rec.gpu.empty(&[self.columns(), self.nchunks])?;
        let dummy = rec.gpu.dummy();
        let k = norm_kernel(if self.v4 { "col_sum4" } else { "col_sum" }, 256)
            .u("CT", self.ct)
            .b("SQ", mean.is_some());
        let g = self.groups(rec);
        rec.dispatch(&k, self.params(), &[x, mean.unwrap_or(&dummy), &part], g)?;
        Ok(part)
    }

    /// Partial per-column sums of dz * xhat and dz: `[2, c, nchunks]`; statistics per row
    /// (LayerNorm) when `per_row`, else per column (BatchNorm).
    fn col_grad(&self, rec: &mut Recorder, t: GradTerms, per_row: bool) -> Result<Tensor> {
        let GradTerms {
            x,
            dy,
            pre,
            mean,
            rstd,
            act,
        } = t;
        let part = rec.gpu.empty(&[2, self.columns(), self.nchunks])?;
        let k = norm_kernel(if self.v4 { "col_grad4" } else { "col_grad" }, 256)
            .u("CT", self.ct)
            .u("ACT", act.code())
            .b("PER_ROW", per_row);
        let g = self.groups(rec);
        rec.dispatch(&k, self.params(), &[x, dy, pre, mean, rstd, &part], g)?;
        Ok(part)
    }
}

/// What dz * xhat and dz are computed from: the input, the output gradient, the saved
/// pre-activation (dz = dy * act'(pre)) and the normalisation statistics.
#[derive(Clone, Copy)]
struct GradTerms<'a> {
    x: &'a Tensor,
    dy: &'a Tensor,
    pre: &'a Tensor,
    mean: &'a Tensor,
    rstd: &'a Tensor,
    act: Act,
}

/// Shape and scaling of a second reduction level (see [`reduce_part`]).
#[derive(Clone, Copy)]
struct Reduce {
    /// Sums computed (rows of the partials).
    jn: usize,
    /// Partials per sum.
    kn: usize,
    /// Sums below this index go to the first output, the rest to the second.
    split: usize,
    alpha: f32,
    /// Add to the outputs' contents.
    accum: bool,
}

/// Second reduction level: for j < jn, `alpha * Σ_k part[j, k]` goes to `out0[j]` (j < split) or
/// `out1[j - split]`, added to their contents when `accum`.
fn reduce_part(
    rec: &mut Recorder,
    part: &Tensor,
    r: Reduce,
    out0: &Tensor,
    out1: &Tensor,
) -> Result<()> {
    let Reduce {
        jn,
        kn,
        split,
        alpha,
        accum,
    } = r;
    let k = norm_kernel("reduce_part", 64).b("ACCUM", accum);
    let g = rec.grid(jn);
    rec.dispatch(
        &k,
        ReduceParams {
            jn: u(jn),
            kn: u(kn),
            split: u(split),
            alpha,
        },
        &[part, out0, out1],
        g,
    )
}

fn bn_params(
    n: usize,
    c: usize,
    momentum: f32,
    eps: f32,
    unbias: f32,
    update: bool,
    inv_rows: f32,
) -> BnParams {
    BnParams {
        n: u(n),
        c: u(c),
        momentum,
        eps,
        unbias,
        update: update as u32,
        inv_rows,
        pad: 0,
    }
}

/// Rows per invocation of bn_apply4 / bn_bwd_dx4 (their per-channel loads are shared by these).
const BN_RB: usize = 8;

fn bn_groups(rec: &Recorder, n: usize) -> [u32; 3] {
    rec.grid(n.div_ceil(64))
}

/// What [`batch_norm_backward`] needs from [`batch_norm_train`] or [`batch_norm_eval_saved`].
#[derive(Clone, Debug)]
pub struct BnSaved {
    /// Per-channel mean used for normalisation (batch mean in training, running mean in eval).
    pub mean: Tensor,
    /// Per-channel 1/sqrt(var + eps) used for normalisation.
    pub rstd: Tensor,
    /// Pre-activation (only when `act != Act::None`).
    pub pre: Option<Tensor>,
    pub act: Act,
    /// Batch statistics (training) or fixed running statistics (eval).
    pub train: bool,
}

fn check_bn(x: &Tensor, w: &Tensor, b: &Tensor, others: &[&Tensor]) -> Result<(usize, usize)> {
    let c = *x
        .shape
        .last()
        .ok_or_else(|| Error::Invalid("batch_norm: scalar input".into()))?;
    let ok = c > 0 && w.numel() == c && b.numel() == c && others.iter().all(|t| t.numel() == c);
    if !ok {
        return Err(Error::Invalid(format!(
            "batch_norm: input {:?} (channels last), weight {:?}, bias {:?}: every per-channel tensor needs {c} values",
            x.shape, w.shape, b.shape
        )));
    }
    Ok((x.numel() / c, c))
}

/// A BatchNorm layer's tensors: weight, bias and running statistics (per channel).
#[derive(Clone, Copy)]
pub struct BnLayer<'a> {
    pub w: &'a Tensor,
    pub b: &'a Tensor,
    pub running_mean: &'a Tensor,
    pub running_var: &'a Tensor,
}

/// The normalisation [`bn_apply`] records: `y = act((x - mean) * rstd * w + b)`.
#[derive(Clone, Copy)]
struct BnNormalize<'a> {
    mean: &'a Tensor,
    rstd: &'a Tensor,
    w: &'a Tensor,
    b: &'a Tensor,
    act: Act,
}

/// `y` of [`BnNormalize`].
fn bn_apply(rec: &mut Recorder, x: &Tensor, n: BnNormalize) -> Result<Tensor> {
    let y = rec.gpu.empty(&x.shape)?;
    bn_apply_into(rec, x, n, &y, None)?;
    Ok(y)
}

/// `y` of [`BnNormalize`] and, with `keep_pre`, the pre-activation (when there is an activation).
fn bn_apply_save_pre(
    rec: &mut Recorder,
    x: &Tensor,
    n: BnNormalize,
    keep_pre: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let y = rec.gpu.empty(&x.shape)?;
    let pre = if keep_pre && n.act != Act::None {
        Some(rec.gpu.empty(&x.shape)?)
    } else {
        None
    };
    bn_apply_into(rec, x, n, &y, pre.as_ref())?;
    Ok((y, pre))
}

fn bn_apply_into(
    rec: &mut Recorder,
    x: &Tensor,
    n: BnNormalize,
    y: &Tensor,
    pre: Option<&Tensor>,
) -> Result<()> {
    let BnNormalize {
        mean,
        rstd,
        w,
        b,
        act,
    } = n;
    let c = w.numel();
    let dummy = rec.gpu.dummy();
    // vec4 of channels per invocation when C % 4 == 0.
    let v = if c.is_multiple_of(4) { 4 } else { 1 };
    let entry = if v == 4 { "bn_apply4" } else { "bn_apply" };
    let mut k = norm_kernel(entry, 64)
        .u("ACT", act.code())
        .b("SAVE_PRE", pre.is_some());
    let n = x.numel() / v;
    let mut g = bn_groups(rec, n);
    if v == 4 {
        k = k.u("RB", BN_RB as u32);
        g = bn_groups(rec, (n / (c / 4)).div_ceil(BN_RB) * (c / 4));
    }
    rec.dispatch(
        &k,
        bn_params(n, c / v, 0.0, 0.0, 0.0, false, 0.0),
        &[x, mean, rstd, w, b, y, pre.unwrap_or(&dummy)],
        g,
    )
}

/// BatchNorm2d in training mode on channels-last `x` `[B, H, W, C]` (any leading dims): batch
/// statistics per channel over the `rows = B*H*W` positions (two-pass, deterministic),
/// `y = act((x - mean) / sqrt(var + eps) * w + b)` with the biased variance, and in place
/// `running_mean = (1 - momentum) * running_mean + momentum * mean`,
/// `running_var = (1 - momentum) * running_var + momentum * var * rows / (rows - 1)`
/// (PyTorch: momentum 0.1, eps 1e-5). Needs rows >= 2.
pub fn batch_norm_train(
    rec: &mut Recorder,
    x: &Tensor,
    bn: BnLayer,
    momentum: f32,
    eps: f32,
    act: Act,
) -> Result<(Tensor, BnSaved)> {
    batch_norm_train_keep(rec, x, bn, momentum, eps, act, true)
}

/// [`batch_norm_train`] that keeps the pre-activation in [`BnSaved`] only with `keep_pre`
/// (otherwise [`batch_norm_backward`]'s caller recomputes it with [`batch_norm_recompute`]).
pub fn batch_norm_train_keep(
    rec: &mut Recorder,
    x: &Tensor,
    bn: BnLayer,
    momentum: f32,
    eps: f32,
    act: Act,
    keep_pre: bool,
) -> Result<(Tensor, BnSaved)> {
    let BnLayer {
        w,
        b,
        running_mean,
        running_var,
    } = bn;
    let (rows, c) = check_bn(x, w, b, &[running_mean, running_var])?;
    if rows < 2 {
        return Err(Error::Invalid(format!(
            "batch_norm_train: {:?} has one value per channel; training BatchNorm needs at least 2",
            x.shape
        )));
    }
    let plan = ColPlan::new(rows, c);
    let inv = (1.0 / rows as f64) as f32;
    let dummy = rec.gpu.dummy();
    let mean = rec.gpu.empty(&[c])?;
    let var = rec.gpu.empty(&[c])?;
    let rstd = rec.gpu.empty(&[c])?;
    // Means over the rows: of x, then of (x - mean)^2.
    let r = Reduce {
        jn: c,
        kn: plan.nchunks,
        split: c,
        alpha: inv,
        accum: false,
    };
    let part = plan.col_sum(rec, x, None)?;
    reduce_part(rec, &part, r, &mean, &dummy)?;
    let part = plan.col_sum(rec, x, Some(&mean))?;
    reduce_part(rec, &part, r, &var, &dummy)?;
    let unbias = (rows as f64 / (rows - 1) as f64) as f32;
    let g = bn_groups(rec, c);
    rec.dispatch(
        &norm_kernel("bn_finalize", 64),
        bn_params(c, c, momentum, eps, unbias, true, inv),
        &[&mean, &var, &rstd, running_mean, running_var],
        g,
    )?;
    let n = BnNormalize {
        mean: &mean,
        rstd: &rstd,
        w,
        b,
        act,
    };
    let (y, pre) = bn_apply_save_pre(rec, x, n, keep_pre)?;
    Ok((
        y,
        BnSaved {
            mean,
            rstd,
            pre,
            act,
            train: true,
        },
    ))
}

/// BatchNorm2d in eval mode (running statistics): `y = act((x - rm) / sqrt(rv + eps) * w + b)`.
pub fn batch_norm_eval(
    rec: &mut Recorder,
    x: &Tensor,
    bn: BnLayer,
    eps: f32,
    act: Act,
) -> Result<Tensor> {
    let rstd = bn_eval_rstd(rec, x, bn, eps)?;
    bn_apply(rec, x, bn_eval_normalize(bn, &rstd, act))
}

/// [`batch_norm_eval`] that also keeps what [`batch_norm_backward`] needs (gradients through a
/// BatchNorm with frozen statistics: dx = w * rstd * dz; dw, db as usual).
pub fn batch_norm_eval_saved(
    rec: &mut Recorder,
    x: &Tensor,
    bn: BnLayer,
    eps: f32,
    act: Act,
) -> Result<(Tensor, BnSaved)> {
    batch_norm_eval_saved_keep(rec, x, bn, eps, act, true)
}

/// [`batch_norm_eval_saved`] that keeps the pre-activation only with `keep_pre` (see
/// [`batch_norm_train_keep`]).
pub fn batch_norm_eval_saved_keep(
    rec: &mut Recorder,
    x: &Tensor,
    bn: BnLayer,
    eps: f32,
    act: Act,
    keep_pre: bool,
) -> Result<(Tensor, BnSaved)> {
    let rstd = bn_eval_rstd(rec, x, bn, eps)?;
    let n = bn_eval_normalize(bn, &rstd, act);
    let (y, pre) = bn_apply_save_pre(rec, x, n, keep_pre)?;
    Ok((
        y,
        BnSaved {
            mean: bn.running_mean.clone(),
            rstd,
            pre,
            act,
            train: false,
        },
    ))
}

/// Checks the eval-mode inputs and records `rstd = 1 / sqrt(running_var + eps)`.
fn bn_eval_rstd(rec: &mut Recorder, x: &Tensor, bn: BnLayer, eps: f32) -> Result<Tensor> {
    let (_, c) = check_bn(x, bn.w, bn.b, &[bn.running_mean, bn.running_var])?;
    let rstd = rec.gpu.empty(&[c])?;
    let g = bn_groups(rec, c);
    rec.dispatch(
        &norm_kernel("bn_rstd", 64),
        bn_params(c, c, 0.0, eps, 0.0, false, 0.0),
        &[bn.running_var, &rstd],
        g,
    )?;
    Ok(rstd)
}

/// Eval-mode normalisation with the running mean and `rstd` from [`bn_eval_rstd`].
fn bn_eval_normalize<'a>(bn: BnLayer<'a>, rstd: &'a Tensor, act: Act) -> BnNormalize<'a> {
    BnNormalize {
        mean: bn.running_mean,
        rstd,
        w: bn.w,
        b: bn.b,
        act,
    }
}

/// Recomputes from the saved statistics what the forward of `saved` produced from `x`, with the
/// same kernel and arithmetic: the output `act(BN(x))` for `act` = `saved.act`, or the
/// pre-activation `BN(x)` for `act` = [`Act::None`]. The backward recomputes these instead of
/// keeping them through the step (`w`, `b`: the layer's weight and bias).
pub fn batch_norm_recompute(
    rec: &mut Recorder,
    x: &Tensor,
    saved: &BnSaved,
    w: &Tensor,
    b: &Tensor,
    act: Act,
) -> Result<Tensor> {
    check_bn(x, w, b, &[&saved.mean, &saved.rstd])?;
    let n = BnNormalize {
        mean: &saved.mean,
        rstd: &saved.rstd,
        w,
        b,
        act,
    };
    bn_apply(rec, x, n)
}

/// Backward of [`batch_norm_train`] (batch statistics) or [`batch_norm_eval_saved`] (fixed
/// statistics) given `dy`: accumulates `dw += Σ dz * xhat`, `db += Σ dz` per channel and returns dx
/// (added into `dx_acc` when given). With batch statistics
/// `dx = w * rstd * (dz - mean(dz) - xhat * mean(dz * xhat))`, means over the rows.
pub fn batch_norm_backward(
    rec: &mut Recorder,
    x: &Tensor,
    w: &Tensor,
    saved: &BnSaved,
    dy: &Tensor,
    grads: NormGrads,
) -> Result<Tensor> {
    let NormGrads { dw, db, dx_acc } = grads;
    let (rows, c) = check_bn(x, w, w, &[dw, db, &saved.mean, &saved.rstd])?;
    if dy.numel() != x.numel() || dx_acc.is_some_and(|d| d.numel() != x.numel()) {
        return Err(Error::Invalid(format!(
            "batch_norm_backward: x {:?}, dy {:?}, dx {:?}",
            x.shape,
            dy.shape,
            dx_acc.map(|d| d.shape.clone())
        )));
    }
    let dummy = rec.gpu.dummy();
    let pre = saved.pre.as_ref().unwrap_or(&dummy);
    let plan = ColPlan::new(rows, c);
    let terms = GradTerms {
        x,
        dy,
        pre,
        mean: &saved.mean,
        rstd: &saved.rstd,
        act: saved.act,
    };
    let part = plan.col_grad(rec, terms, false)?;
    let sums = rec.gpu.empty(&[2, c])?;
    let r = Reduce {
        jn: 2 * c,
        kn: plan.nchunks,
        split: 2 * c,
        alpha: 1.0,
        accum: false,
    };
    reduce_part(rec, &part, r, &sums, &dummy)?;
    let dx = match dx_acc {
        Some(d) => d.clone(),
        None => rec.gpu.empty(&x.shape)?,
    };
    // vec4 of channels per invocation when C % 4 == 0.
    let v = if c.is_multiple_of(4) { 4 } else { 1 };
    let n = x.numel() / v;
    let mut k = norm_kernel(if v == 4 { "bn_bwd_dx4" } else { "bn_bwd_dx" }, 64)
        .u("ACT", saved.act.code())
        .b("TRAIN", saved.train)
        .b("ACCUM", dx_acc.is_some());
    let inv = (1.0 / rows as f64) as f32;
    let mut g = bn_groups(rec, n);
    if v == 4 {
        k = k.u("RB", BN_RB as u32);
        g = bn_groups(rec, rows.div_ceil(BN_RB) * (c / 4));
    }
    rec.dispatch(
        &k,
        bn_params(n, c / v, 0.0, 0.0, 0.0, false, inv),
        &[x, dy, pre, &saved.mean, &saved.rstd, w, &sums, &dx],
        g,
    )?;
    let g = bn_groups(rec, c);
    rec.dispatch(
        &norm_kernel("bn_bwd_params", 64),
        bn_params(c, c, 0.0, 0.0, 0.0, false, 0.0),
        &[&sums, dw, db],
        g,
    )?;
    Ok(dx)
}

/// Micro-benchmarks at the model's shapes: LayerNorm forward at 16384×128 and 65536×32 (and its
/// training backward), BatchNorm2d training forward and backward at 65536×256. GB/s counts the
/// minimal traffic (forward: read x, write y; backward: read x, dy, write dx).
#[cfg(not(target_arch = "wasm32"))]
pub fn bench(gpu: &crate::gpu::Gpu) -> Result<Vec<super::BenchResult>> {
    use super::{bench_line, time_op};
    let mut rng = crate::rng::Rng::new(42);
    let mut out = Vec::new();
    let reps = 5;
    for (rows, c) in [(16384usize, 128usize), (65536, 32)] {
        let x = gpu.upload(&rng.vec(rows * c), &[rows, c])?;
        let dy = gpu.upload(&rng.vec(rows * c), &[rows, c])?;
        let w = gpu.upload(&rng.vec(c), &[c])?;
        let b = gpu.upload(&rng.vec(c), &[c])?;
        let dw = gpu.upload(&vec![0.0; c], &[c])?;
        let db = gpu.upload(&vec![0.0; c], &[c])?;
        let bytes = (rows * c * 8) as f64;
        let ms = time_op(gpu, reps, |rec| {
            layer_norm(rec, &x, &w, &b, 1e-5, Act::None).map(|_| ())
        })?;
        out.push(bench_line(
            format!("layer_norm fwd {rows}x{c}"),
            ms,
            None,
            Some(bytes),
        ));
        let mut rec = gpu.new_recorder();
        let (_, saved) = layer_norm_train(&mut rec, &x, &w, &b, 1e-5, Act::None)?;
        rec.submit()?;
        let ms = time_op(gpu, reps, |rec| {
            layer_norm_backward(
                rec,
                &x,
                &w,
                &saved,
                &dy,
                NormGrads {
                    dw: &dw,
                    db: &db,
                    dx_acc: None,
                },
            )
            .map(|_| ())
        })?;
        out.push(bench_line(
            format!("layer_norm bwd {rows}x{c}"),
            ms,
            None,
            Some(bytes * 1.5),
        ));
    }
    let (rows, c) = (65536usize, 256usize);
    let x = gpu.upload(&rng.vec(rows * c), &[rows, c])?;
    let dy = gpu.upload(&rng.vec(rows * c), &[rows, c])?;
    let w = gpu.upload(&rng.vec(c), &[c])?;
    let b = gpu.upload(&rng.vec(c), &[c])?;
    let rm = gpu.upload(&vec![0.0; c], &[c])?;
    let rv = gpu.upload(&vec![1.0; c], &[c])?;
    let dw = gpu.upload(&vec![0.0; c], &[c])?;
    let db = gpu.upload(&vec![0.0; c], &[c])?;
    let bytes = (rows * c * 8) as f64;
    // Without and with the fused GELU (MBConv's hidden layers).
    for (act, name) in [(Act::None, ""), (Act::Gelu, " +GELU")] {
        let ms = time_op(gpu, reps, |rec| {
            batch_norm_train(
                rec,
                &x,
                BnLayer {
                    w: &w,
                    b: &b,
                    running_mean: &rm,
                    running_var: &rv,
                },
                0.1,
                1e-5,
                act,
            )
            .map(|_| ())
        })?;
        out.push(bench_line(
            format!("batch_norm_train{name} fwd {rows}x{c}"),
            ms,
            None,
            Some(bytes),
        ));
        let mut rec = gpu.new_recorder();
        let (_, saved) = batch_norm_train(
            &mut rec,
            &x,
            BnLayer {
                w: &w,
                b: &b,
                running_mean: &rm,
                running_var: &rv,
            },
            0.1,
            1e-5,
            act,
        )?;
        rec.submit()?;
        let ms = time_op(gpu, reps, |rec| {
            batch_norm_backward(
                rec,
                &x,
                &w,
                &saved,
                &dy,
                NormGrads {
                    dw: &dw,
                    db: &db,
                    dx_acc: None,
                },
            )
            .map(|_| ())
        })?;
        out.push(bench_line(
            format!("batch_norm_train{name} bwd {rows}x{c}"),
            ms,
            None,
            Some(bytes * 1.5),
        ));
    }
    Ok(out)
}
