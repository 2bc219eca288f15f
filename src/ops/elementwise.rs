//! Elementwise kernels (shaders/elementwise.wgsl): activations, broadcast add/mul/sub, in-place
//! accumulation, channel concat/split and the ImageNet input normalisation. Activations and binary
//! ops on element counts that are multiples of 4 run on vec4s (`unary4`, `binary4`).

use super::matmul::Act;
use super::u;
use crate::error::{Error, Result};
use crate::gpu::{Kernel, Recorder, ShaderFamily, Tensor};

crate::uniform! {
    /// elementwise.wgsl `EwParams`.
    struct EwParams { n: u32, nb: u32, c2: u32, pad: u32 }
}
crate::uniform! {
    /// elementwise.wgsl `SliceParams` (slice_mid).
    struct SliceParams { n: u32, mid: u32, m0: u32, mn: u32, inner: u32 }
}
crate::uniform! {
    /// elementwise.wgsl `ColSumParams` (col_sum_partial, col_sum_final).
    struct ColSumParams { rows: u32, c: u32, chunk_rows: u32, nchunks: u32, col_tiles: u32 }
}

fn ew(entry: &'static str) -> Kernel {
    Kernel::new(ShaderFamily::Elementwise, entry, 256)
}

fn launch(
    rec: &mut Recorder,
    k: Kernel,
    n: usize,
    nb: usize,
    c2: usize,
    t: &[&Tensor],
) -> Result<()> {
    let groups = rec.grid(n.div_ceil(256));
    rec.dispatch(
        &k,
        EwParams {
            n: u(n),
            nb: u(nb.max(1)),
            c2: u(c2),
            pad: 0,
        },
        t,
        groups,
    )
}

/// `act(x)` elementwise.
pub fn activation(rec: &mut Recorder, x: &Tensor, act: Act) -> Result<Tensor> {
    let y = rec.gpu.empty(&x.shape)?;
    let n = x.numel();
    if n.is_multiple_of(4) {
        launch(
            rec,
            ew("unary4").u("ACT", act.code()),
            n / 4,
            0,
            0,
            &[x, &y],
        )?;
    } else {
        launch(rec, ew("unary").u("ACT", act.code()), n, 0, 0, &[x, &y])?;
    }
    Ok(y)
}

#[derive(Clone, Copy, Debug)]
pub enum BinOp {
    Add,
    Mul,
    Sub,
}

/// `a op b`, with `b` broadcast by repetition (`b[i % b.numel()]`, e.g. a per-channel vector).
pub fn binary(rec: &mut Recorder, a: &Tensor, b: &Tensor, op: BinOp) -> Result<Tensor> {
    if b.numel() == 0 || !a.numel().is_multiple_of(b.numel()) {
        return Err(Error::Invalid(format!(
            "binary op: {:?} does not broadcast over {:?}",
            b.shape, a.shape
        )));
    }
    let code = match op {
        BinOp::Add => 0,
        BinOp::Mul => 1,
        BinOp::Sub => 2,
    };
    let y = rec.gpu.empty(&a.shape)?;
    let (n, nb) = (a.numel(), b.numel());
    if n.is_multiple_of(4) && nb.is_multiple_of(4) {
        let k = ew("binary4").u("OP", code).b("BCAST", nb != n);
        launch(rec, k, n / 4, nb / 4, 0, &[a, b, &y])?;
    } else {
        launch(rec, ew("binary").u("OP", code), n, nb, 0, &[a, b, &y])?;
    }
    Ok(y)
}

pub fn add(rec: &mut Recorder, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary(rec, a, b, BinOp::Add)
}

/// `acc += a` in place (same element count).
pub fn accumulate(rec: &mut Recorder, acc: &Tensor, a: &Tensor) -> Result<()> {
    if acc.numel() != a.numel() {
        return Err(Error::Invalid(format!(
            "accumulate: {:?} += {:?}",
            acc.shape, a.shape
        )));
    }
    launch(rec, ew("accumulate"), a.numel(), 0, 0, &[a, acc])
}

/// Concatenates along the last axis: [.., c1] ++ [.., c2] -> [.., c1 + c2].
pub fn concat_last(rec: &mut Recorder, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (c1, c2) = (a.dim(-1), b.dim(-1));
    if a.numel() / c1 != b.numel() / c2 {
        return Err(Error::Invalid(format!(
            "concat: {:?} and {:?}",
            a.shape, b.shape
        )));
    }
    let mut shape = a.shape.clone();
    *shape.last_mut().unwrap() = c1 + c2;
    let y = rec.gpu.empty(&shape)?;
    if c1.is_multiple_of(4) && c2.is_multiple_of(4) {
        launch(
            rec,
            ew("concat_last4"),
            y.numel() / 4,
            c1 / 4,
            c2 / 4,
            &[a, b, &y],
        )?;
    } else {
        launch(rec, ew("concat_last"), y.numel(), c1, c2, &[a, b, &y])?;
    }
    Ok(y)
}

/// Inverse of [`concat_last`]: splits the last axis into `c1` and the rest.
pub fn split_last(rec: &mut Recorder, g: &Tensor, c1: usize) -> Result<(Tensor, Tensor)> {
    let c = g.dim(-1);
    let c2 = c - c1;
    let mut sa = g.shape.clone();
    *sa.last_mut().unwrap() = c1;
    let mut sb = g.shape.clone();
    *sb.last_mut().unwrap() = c2;
    let a = rec.gpu.empty(&sa)?;
    let b = rec.gpu.empty(&sb)?;
    launch(rec, ew("split_last"), g.numel(), c1, c2, &[g, &a, &b])?;
    Ok((a, b))
}

/// Packed RGB u32 pixels [B, H, W] -> ImageNet-normalised [B, H, W, 3].
pub fn image_normalize(rec: &mut Recorder, px: &Tensor) -> Result<Tensor> {
    let mut shape = px.shape.clone();
    shape.push(3);
    let y = rec.gpu.empty(&shape)?;
    launch(rec, ew("image_normalize"), px.numel(), 0, 0, &[px, &y])?;
    Ok(y)
}

/// Rows `[m0, m0 + mn)` of the middle axis of `x` viewed as `[outer, mid, inner]`
/// (`shape` gives that view), e.g. token 1 of the decoder's `[B, 5, 256]` output.
pub fn slice_mid(
    rec: &mut Recorder,
    x: &Tensor,
    outer: usize,
    mid: usize,
    inner: usize,
    m0: usize,
    mn: usize,
) -> Result<Tensor> {
    if outer * mid * inner != x.numel() || m0 + mn > mid {
        return Err(Error::Invalid(format!(
            "slice_mid: {:?} as [{outer},{mid},{inner}] rows {m0}+{mn}",
            x.shape
        )));
    }
    let y = rec.gpu.empty(&[outer, mn, inner])?;
    let n = y.numel();
    let groups = rec.grid(n.div_ceil(256));
    let p = SliceParams {
        n: u(n),
        mid: u(mid),
        m0: u(m0),
        mn: u(mn),
        inner: u(inner),
    };
    rec.dispatch(&ew("slice_mid"), p, &[x, &y], groups)?;
    Ok(y)
}

/// Backward of [`slice_mid`]: `gx[o, m0 + r, i] += gy[o, r, i]`.
pub fn slice_mid_backward(
    rec: &mut Recorder,
    gy: &Tensor,
    gx: &Tensor,
    mid: usize,
    m0: usize,
) -> Result<()> {
    let (outer, mn, inner) = (gy.shape[0], gy.shape[1], gy.shape[2]);
    if outer * mid * inner != gx.numel() || m0 + mn > mid {
        return Err(Error::Invalid(format!(
            "slice_mid_backward: {:?} into {:?}",
            gy.shape, gx.shape
        )));
    }
    let n = gy.numel();
    let groups = rec.grid(n.div_ceil(256));
    let p = SliceParams {
        n: u(n),
        mid: u(mid),
        m0: u(m0),
        mn: u(mn),
        inner: u(inner),
    };
    rec.dispatch(
        &ew("slice_mid").b("SLICE_BACKWARD", true),
        p,
        &[gy, gx],
        groups,
    )
}

/// `dy * act'(pre)`: the gradient through an activation given its input `pre`.
pub fn act_backward(rec: &mut Recorder, pre: &Tensor, dy: &Tensor, act: Act) -> Result<Tensor> {
    if pre.numel() != dy.numel() {
        return Err(Error::Invalid(format!(
            "act_backward: {:?} vs {:?}",
            pre.shape, dy.shape
        )));
    }
    let y = rec.gpu.empty(&dy.shape)?;
    let n = dy.numel();
    if n.is_multiple_of(4) {
        launch(
            rec,
            ew("act_backward4").u("ACT", act.code()),
            n / 4,
            0,
            0,
            &[pre, dy, &y],
        )?;
    } else {
        launch(
            rec,
            ew("act_backward").u("ACT", act.code()),
            n,
            0,
            0,
            &[pre, dy, &y],
        )?;
    }
    Ok(y)
}

/// Column sums of `x` seen as `[rows, c]` into `out [c]` (added to it when `accumulate`):
/// deterministic two-level reduction (bias gradients).
pub fn col_sum(
    rec: &mut Recorder,
    x: &Tensor,
    c: usize,
    out: &Tensor,
    accumulate: bool,
) -> Result<()> {
    if c == 0 || !x.numel().is_multiple_of(c) || out.numel() != c {
        return Err(Error::Invalid(format!(
            "col_sum: {:?} by {c} columns into {:?}",
            x.shape, out.shape
        )));
    }
    let rows = x.numel() / c;
    let chunk_rows = rows.div_ceil(1024).max(64);
    let nchunks = rows.div_ceil(chunk_rows).max(1);
    let part = rec.gpu.empty(&[nchunks, c])?;
    // First level on column quads (vec4) when c % 4 == 0.
    let (entry, cv) = if c.is_multiple_of(4) {
        ("col_sum_partial4", c / 4)
    } else {
        ("col_sum_partial", c)
    };
    let p1 = ColSumParams {
        rows: u(rows),
        c: u(cv),
        chunk_rows: u(chunk_rows),
        nchunks: u(nchunks),
        col_tiles: u(cv.div_ceil(64)),
    };
    let g1 = rec.grid(cv.div_ceil(64) * nchunks);
    rec.dispatch(
        &Kernel::new(ShaderFamily::Elementwise, entry, 64),
        p1,
        &[x, &part],
        g1,
    )?;
    let col_tiles = c.div_ceil(64);
    let p = ColSumParams {
        rows: u(rows),
        c: u(c),
        chunk_rows: u(chunk_rows),
        nchunks: u(nchunks),
        col_tiles: u(col_tiles),
    };
    let g2 = rec.grid(col_tiles);
    let k = Kernel::new(ShaderFamily::Elementwise, "col_sum_final", 64).b("ACCUM_OUT", accumulate);
    rec.dispatch(&k, p, &[&part, out], g2)
}
