//! Convolutions (shaders/conv.wgsl + the GEMM of shaders/matmul.wgsl), forward and backward.
//! Feature maps are channels-last `[B, H, W, C]`; weights keep PyTorch layouts (Conv2d
//! `[Co, Ci/groups, k, k]`, ConvTranspose2d `[Ci, Co, 2, 2]`); nothing is re-ordered.
//!
//! * Dense [`conv2d`]: 1x1 stride-1 unpadded convs are [`linear`] with `w` seen as `[Co, Ci]`.
//!   Others run im2col into a column matrix `[M, K]` (M = B*OH*OW output positions), then the
//!   GEMM `y = col w^T` with bias and activation fused in its epilogue. With Ci % 4 == 0 the
//!   columns are (ky, kx, ci), the patch in memory order copied as vec4s (`im2col4`), and the
//!   weight is re-ordered to `[Co, k, k, Ci]` per call (`w_reorder`, small); otherwise they are
//!   (ci, ky, kx), the row-major order of `w` seen as `[Co, Ci*k*k]` (`im2col_row`), with K padded
//!   by zero columns (and a zero-padded weight copy) to a multiple of 4 when Co % 4 == 0,
//!   so that the GEMM can use its vec4 kernel (the 3-channel stem conv: K = 27 -> 28). The
//!   backward uses the same column orders (`col2im4` gathers dx from (ky, kx, ci) columns; weight
//!   gradients in a copy's order are added back by `w_reorder`). When the column matrix would
//!   exceed the device's storage-binding (or buffer) size, the positions are split into row chunks:
//!   each chunk is im2col'ed into one reused buffer, multiplied into a chunk buffer and copied into
//!   its rows of `y`.
//! * [`depthwise_conv2d`]: direct kernels. 3x3 with C % 4 == 0 and stride 1 (most of the model's):
//!   `depthwise3_v4`, where one invocation slides a 3-row window down a run of output rows for 4
//!   columns x 4 channels, so each input vec4 is loaded about once per output (CPU adapters
//!   scalarise every load). Otherwise one invocation per output element (or per 4 channels).
//! * [`conv_transpose2x2`] (kernel 2, stride 2, non-overlapping): the GEMM `t = x w` with `w` read
//!   as a row-major `[Ci, 4*Co]` matrix (column `o*4 + a*2 + c`, i.e. PyTorch's memory order, so no
//!   weight copy), then `pixel_shuffle2` scatters `t` to `y[b, 2i+a, 2j+c, o]` adding bias and
//!   activation.
//!
//! Backward functions take `dy`, the gradient with respect to the convolution's output *before*
//! any activation (train with `Act::None` and a separate activation when one follows), and
//! **accumulate** into the gradient tensors given (`dx += .., dw += .., dbias += ..`); each of them
//! is optional. Weight gradients of long reductions (many output positions, few weight tiles) use a
//! split-K batched GEMM followed by a row-sum, so the work spreads over the device.

use super::Act;
use super::matmul::{Gemm, gemm, linear};
use crate::error::{Error, Result};
use crate::gpu::{Kernel, Recorder, ShaderFamily, Tensor};

#[cfg(not(target_arch = "wasm32"))]
use super::{BenchResult, bench_line, time_op};
#[cfg(not(target_arch = "wasm32"))]
use crate::gpu::Gpu;

/// Fields of the WGSL `ConvParams` struct as sizes (see shaders/conv.wgsl for each kernel's use).
#[derive(Clone, Copy, Debug, Default)]
struct Cp {
    n: usize,
    bsz: usize,
    h: usize,
    w: usize,
    c: usize,
    oh: usize,
    ow: usize,
    co: usize,
    k: usize,
    stride: usize,
    pad: usize,
    row0: usize,
    rows: usize,
    kc: usize,
    e0: usize,
    e1: usize,
}

impl Cp {
    fn params(&self) -> ConvParams {
        use super::u;
        ConvParams {
            n: u(self.n),
            bsz: u(self.bsz),
            h: u(self.h),
            w: u(self.w),
            c: u(self.c),
            oh: u(self.oh),
            ow: u(self.ow),
            co: u(self.co),
            k: u(self.k),
            stride: u(self.stride),
            pad: u(self.pad),
            row0: u(self.row0),
            rows: u(self.rows),
            kc: u(self.kc),
            e0: u(self.e0),
            e1: u(self.e1),
        }
    }
}

crate::uniform! {
    /// conv.wgsl `ConvParams`, built from [`Cp`].
    struct ConvParams {
        n: u32, bsz: u32, h: u32, w: u32, c: u32, oh: u32, ow: u32, co: u32,
        k: u32, stride: u32, pad: u32, row0: u32, rows: u32, kc: u32, e0: u32, e1: u32,
    }
}

fn kernel(entry: &'static str) -> Kernel {
    Kernel::new(ShaderFamily::Conv, entry, 256)
}

fn launch(rec: &mut Recorder, k: &Kernel, cp: &Cp, tensors: &[&Tensor]) -> Result<()> {
    let groups = rec.grid(cp.n.div_ceil(256));
    rec.dispatch(k, cp.params(), tensors, groups)
}

/// Geometry of one convolution call.
#[derive(Clone, Copy, Debug)]
struct Geo {
    b: usize,
    h: usize,
    w: usize,
    ci: usize,
    co: usize,
    k: usize,
    stride: usize,
    pad: usize,
    oh: usize,
    ow: usize,
}

impl Geo {
    fn m(&self) -> usize {
        self.b * self.oh * self.ow
    }
    fn kc(&self) -> usize {
        self.ci * self.k * self.k
    }
    fn out_shape(&self) -> [usize; 4] {
        [self.b, self.oh, self.ow, self.co]
    }
    fn cp(&self) -> Cp {
        Cp {
            bsz: self.b,
            h: self.h,
            w: self.w,
            c: self.ci,
            oh: self.oh,
            ow: self.ow,
            co: self.co,
            k: self.k,
            stride: self.stride,
            pad: self.pad,
            kc: self.kc(),
            ..Cp::default()
        }
    }
}

fn invalid(msg: String) -> Error {
    Error::Invalid(msg)
}

/// Checks `x [B,H,W,Ci]` and `w [Co, w_ci, k, k]` and computes the output size.
fn geometry(what: &str, x: &Tensor, w: &Tensor, geom: ConvGeom, depthwise: bool) -> Result<Geo> {
    let ConvGeom { stride, pad } = geom;
    if x.shape.len() != 4 || w.shape.len() != 4 {
        return Err(invalid(format!(
            "{what}: expected x [B,H,W,C] and w [Co,Ci,k,k], got {:?} and {:?}",
            x.shape, w.shape
        )));
    }
    let [b, h, wd, ci] = [x.shape[0], x.shape[1], x.shape[2], x.shape[3]];
    let [co, wci, k, k2] = [w.shape[0], w.shape[1], w.shape[2], w.shape[3]];
    let want_ci = if depthwise { 1 } else { ci };
    if k != k2 || k == 0 || wci != want_ci || (depthwise && co != ci) {
        return Err(invalid(format!(
            "{what}: weight {:?} does not fit input {:?}",
            w.shape, x.shape
        )));
    }
    if stride == 0 || h + 2 * pad < k || wd + 2 * pad < k {
        return Err(invalid(format!(
            "{what}: kernel {k} stride {stride} pad {pad} does not fit input {:?}",
            x.shape
        )));
    }
    let oh = (h + 2 * pad - k) / stride + 1;
    let ow = (wd + 2 * pad - k) / stride + 1;
    Ok(Geo {
        b,
        h,
        w: wd,
        ci,
        co,
        k,
        stride,
        pad,
        oh,
        ow,
    })
}

fn check_len(what: &str, t: &Tensor, n: usize) -> Result<()> {
    if t.numel() != n {
        return Err(invalid(format!(
            "{what}: {:?} has {} elements, expected {n}",
            t.shape,
            t.numel()
        )));
    }
    Ok(())
}

/// Largest number of rows of `width` floats that one storage binding (and buffer) can hold.
fn max_rows(rec: &Recorder, width: usize) -> usize {
    let lim = rec
        .gpu
        .limits
        .max_storage_buffer_binding_size
        .min(rec.gpu.limits.max_buffer_size);
    ((lim / 4) as usize / width.max(1)).max(1)
}

/// Records `out[c'] += sum_r src[r, c]` for `src` seen as `[r, c]` (multi-pass for long columns).
/// `remap = T > 0` stores column `c = t*T + j` of a `[K, T]` column layout at `j*K + t`.
fn reduce_rows(
    rec: &mut Recorder,
    src: &Tensor,
    r: usize,
    c: usize,
    out: &Tensor,
    remap: usize,
) -> Result<()> {
    const BLOCK: usize = 256;
    const SINGLE: usize = 1024;
    if r == 0 || c == 0 {
        return Ok(());
    }
    let mut cur = src.clone();
    let mut rows = r;
    while rows > SINGLE {
        let blocks = rows.div_ceil(BLOCK);
        let part = rec.gpu.empty(&[blocks, c])?;
        let cp = Cp {
            n: blocks * c,
            rows,
            kc: c,
            e0: BLOCK,
            ..Cp::default()
        };
        launch(rec, &kernel("sum_rows"), &cp, &[&cur, &part])?;
        cur = part;
        rows = blocks;
    }
    let cp = Cp {
        n: c,
        rows,
        kc: c,
        e0: rows,
        e1: remap,
        ..Cp::default()
    };
    launch(rec, &kernel("sum_rows").b("ACCUM", true), &cp, &[&cur, out])
}

/// Records `out [ma, nb] += a^T b` for `a [rows, ma]`, `b [rows, nb]` (row-major). When the output
/// has few GEMM tiles, the rows are split into equal slices (split-K) computed as one batched GEMM
/// into a scratch `[slices, ma*nb]` and summed into `out`.
fn atb_accumulate(
    rec: &mut Recorder,
    a: &Tensor,
    b: &Tensor,
    rows: usize,
    ma: usize,
    nb: usize,
    out: &Tensor,
) -> Result<()> {
    if rows == 0 {
        return Ok(());
    }
    let tiles = ma.div_ceil(64) * nb.div_ceil(64);
    let mut slices = 1;
    if tiles < 64 {
        let target = 128usize.div_ceil(tiles);
        slices = (1..=target)
            .rev()
            .find(|&d| rows.is_multiple_of(d) && rows / d >= 128)
            .unwrap_or(1);
    }
    if slices == 1 {
        let mut g = Gemm::new(ma, nb, rows);
        g.trans_a = true;
        g.accumulate = true;
        return gemm(rec, &g, a, b, None, None, out);
    }
    let per = rows / slices;
    let part = rec.gpu.empty(&[slices, ma * nb])?;
    let mut g = Gemm::new(ma, nb, per);
    g.trans_a = true;
    g.batch = slices;
    g.a_bs = per * ma;
    g.b_bs = per * nb;
    g.c_bs = ma * nb;
    gemm(rec, &g, a, b, None, None, &part)?;
    reduce_rows(rec, &part, slices, ma * nb, out, 0)
}

/// Records `dst[dst_off..dst_off + n] = src[src_off..src_off + n]` (element offsets).
fn copy_range(
    rec: &mut Recorder,
    src: &Tensor,
    src_off: usize,
    dst: &Tensor,
    dst_off: usize,
    n: usize,
) -> Result<()> {
    let cp = Cp {
        n,
        row0: dst_off,
        rows: src_off,
        ..Cp::default()
    };
    launch(rec, &kernel("copy_range"), &cp, &[src, dst])
}

/// Layout of a column matrix: rows of `width` >= Ci*k*k floats, the (ky, kx, ci) order as vec4s
/// when `v4` (Ci % 4 == 0, width = Ci*k*k), else the (ci, ky, kx) order with zero columns up to
/// `width`.
#[derive(Clone, Copy)]
struct ColLayout {
    v4: bool,
    width: usize,
}

/// Column rows `rows` of `x` into `col` (`im2col4` or `im2col_row`, see [`ColLayout`]).
fn im2col(
    rec: &mut Recorder,
    g: &Geo,
    x: &Tensor,
    rows: std::ops::Range<usize>,
    cols: ColLayout,
    col: &Tensor,
) -> Result<()> {
    let ColLayout { v4, width } = cols;
    let (row0, rows) = (rows.start, rows.len());
    let cp = Cp {
        n: rows,
        row0,
        rows,
        e0: width,
        ..g.cp()
    };
    let entry = if v4 { "im2col4" } else { "im2col_row" };
    let groups = rec.grid(rows.div_ceil(64));
    rec.dispatch(
        &Kernel::new(ShaderFamily::Conv, entry, 64),
        cp.params(),
        &[x, col],
        groups,
    )
}

fn is_pointwise(g: &Geo) -> bool {
    g.k == 1 && g.stride == 1 && g.pad == 0
}

/// The forward GEMM's copy of a dense conv weight `[Co, width]` (`w_reorder`): columns (ky, kx, ci)
/// when `khwc`, else (ci, ky, kx) with zero columns beyond Ci*k*k.
fn weight_copy(
    rec: &mut Recorder,
    g: &Geo,
    w: &Tensor,
    khwc: bool,
    width: usize,
) -> Result<Tensor> {
    let out = rec.gpu.empty(&[g.co, width])?;
    weight_reorder(rec, g, w, &out, khwc, false, width)?;
    Ok(out)
}

/// `w_reorder` between a weight (or its gradient) `w` and a GEMM copy `copy` of row length
/// `width`: `back` = false copies w into the copy, true adds the copy into w.
fn weight_reorder(
    rec: &mut Recorder,
    g: &Geo,
    w: &Tensor,
    copy: &Tensor,
    khwc: bool,
    back: bool,
    width: usize,
) -> Result<()> {
    let cp = Cp {
        n: g.co * g.ci,
        e0: width,
        ..g.cp()
    };
    let groups = rec.grid(cp.n.div_ceil(64));
    let k = Kernel::new(ShaderFamily::Conv, "w_reorder", 64)
        .b("KHWC", khwc)
        .b("BACK", back);
    let t: [&Tensor; 2] = if back { [copy, w] } else { [w, copy] };
    rec.dispatch(&k, cp.params(), &t, groups)
}

/// Rows per chunk of a column matrix `width` floats wide: everything when it fits a binding (or
/// `force` is larger), else as many rows as fit (`force` caps it, for tests).
fn chunk_rows(rec: &Recorder, g: &Geo, width: usize, force: Option<usize>) -> usize {
    let cap = max_rows(rec, width.max(g.co));
    let cap = force.map_or(cap, |f| f.min(cap)).max(1);
    cap.min(g.m().max(1))
}

/// Stride and zero padding of a convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeom {
    pub stride: usize,
    pub pad: usize,
}

/// Gradient buffers a convolution backward accumulates into, each where given: the input's
/// `dx`, the weight's `dw` and the bias's `dbias`.
#[derive(Clone, Copy, Default)]
pub struct ConvGrads<'a> {
    pub dx: Option<&'a Tensor>,
    pub dw: Option<&'a Tensor>,
    pub dbias: Option<&'a Tensor>,
}

/// Dense conv, square kernel k from w [Co, Ci, k, k], zero padding `pad`, stride `stride`, optional
/// bias [Co], fused activation. x [B,H,W,Ci] -> [B,OH,OW,Co], OH = (H + 2pad - k)/stride + 1.
pub fn conv2d(
    rec: &mut Recorder,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    geom: ConvGeom,
    act: Act,
) -> Result<Tensor> {
    conv2d_chunked_impl(rec, x, w, bias, geom, act, None)
}

/// [`conv2d`] with the im2col chunk capped at `max_chunk_rows` output positions (tests of the
/// chunked path; `None` = as large as the device allows).
fn conv2d_chunked_impl(
    rec: &mut Recorder,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    geom: ConvGeom,
    act: Act,
    max_chunk_rows: Option<usize>,
) -> Result<Tensor> {
    let g = geometry("conv2d", x, w, geom, false)?;
    if let Some(b) = bias {
        check_len("conv2d bias", b, g.co)?;
    }
    let (m, kc) = (g.m(), g.kc());
    if is_pointwise(&g) {
        let y = linear(
            rec,
            &x.reshape(&[m, g.ci]),
            &w.reshape(&[g.co, g.ci]),
            bias,
            act,
            None,
        )?;
        return Ok(y.reshape(&g.out_shape()));
    }
    let y = rec.gpu.empty(&g.out_shape())?;
    if m == 0 || g.co == 0 {
        return Ok(y);
    }
    // Column layout: C % 4 == 0 -> (ky, kx, ci) copied as vec4 (weight re-ordered to match);
    // otherwise (ci, ky, kx), K padded with zero columns to a multiple of 4 when that makes the
    // GEMM vec4-eligible (Co % 4 == 0), e.g. the 3-channel stem conv (K = 27 -> 28).
    let v4 = g.ci.is_multiple_of(4);
    let kcp = if !v4 && g.co.is_multiple_of(4) {
        kc.next_multiple_of(4)
    } else {
        kc
    };
    let cols = ColLayout { v4, width: kcp };
    let wk = w.reshape(&[g.co, kc]);
    let w2 = if v4 && g.k > 1 {
        weight_copy(rec, &g, w, true, kc)?
    } else if kcp != kc {
        weight_copy(rec, &g, w, false, kcp)?
    } else {
        wk
    };
    let cap = chunk_rows(rec, &g, kcp, max_chunk_rows);
    let col = rec.gpu.empty(&[cap, kcp])?;
    let tmp = if cap < m {
        Some(rec.gpu.empty(&[cap, g.co])?)
    } else {
        None
    };
    let mut r0 = 0;
    while r0 < m {
        let rows = cap.min(m - r0);
        im2col(rec, &g, x, r0..r0 + rows, cols, &col)?;
        let mut gm = Gemm::new(rows, g.co, kcp);
        gm.trans_b = true;
        gm.act = act;
        let out = tmp.as_ref().unwrap_or(&y);
        gemm(rec, &gm, &col, &w2, bias, None, out)?;
        if let Some(t) = &tmp {
            copy_range(rec, t, 0, &y, r0 * g.co, rows * g.co)?;
        }
        r0 += rows;
    }
    Ok(y)
}

/// (With the `testing` feature: the hook tests use to pin this choice.)
#[cfg(any(test, feature = "testing"))]
pub fn conv2d_chunked(
    rec: &mut Recorder,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    geom: ConvGeom,
    act: Act,
    max_chunk_rows: Option<usize>,
) -> Result<Tensor> {
    conv2d_chunked_impl(rec, x, w, bias, geom, act, max_chunk_rows)
}

/// Gradients of [`conv2d`]: `dy [B,OH,OW,Co]` is dL/d(conv output before activation). Accumulates
/// `dx [B,H,W,Ci] += dL/dx`, `dw [Co,Ci,k,k] += dL/dw`, `dbias [Co] += dL/dbias` for each one given.
/// dx: GEMM `dcol = dy w` then `col2im` (gather); dw: `im2col(x)` then `dw += dy^T col` (split-K);
/// dbias: column sums of dy. Chunked like the forward when the column matrix is too large.
pub fn conv2d_backward(
    rec: &mut Recorder,
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    geom: ConvGeom,
    grads: ConvGrads,
) -> Result<()> {
    conv2d_backward_chunked_impl(rec, x, w, dy, geom, grads, None)
}

/// [`conv2d_backward`] with the column chunk capped at `max_chunk_rows` positions (tests).
fn conv2d_backward_chunked_impl(
    rec: &mut Recorder,
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    geom: ConvGeom,
    grads: ConvGrads,
    max_chunk_rows: Option<usize>,
) -> Result<()> {
    let ConvGrads { dx, dw, dbias } = grads;
    let g = geometry("conv2d_backward", x, w, geom, false)?;
    let (m, kc) = (g.m(), g.kc());
    check_backward("conv2d_backward", &g, x, w, dy, [dx, dw, dbias])?;
    if m == 0 || g.co == 0 {
        return Ok(());
    }
    if let Some(db) = dbias {
        reduce_rows(rec, dy, m, g.co, db, 0)?;
    }
    if is_pointwise(&g) {
        if let Some(dx) = dx {
            let mut gm = Gemm::new(m, g.ci, g.co);
            gm.accumulate = true;
            gemm(rec, &gm, dy, w, None, None, dx)?;
        }
        if let Some(dw) = dw {
            atb_accumulate(rec, dy, x, m, g.co, g.ci, dw)?;
        }
        return Ok(());
    }
    if dx.is_none() && dw.is_none() {
        return Ok(());
    }
    // Column orders as in the forward: C % 4 == 0 -> (ky, kx, ci) as vec4 (im2col4 / col2im4,
    // weight copy and weight gradient re-ordered by w_reorder); otherwise (ci, ky, kx),
    // with K padded to a multiple of 4 for the weight-gradient GEMM when Co % 4 == 0 (the stem).
    let v4 = g.ci.is_multiple_of(4);
    let kcp = if !v4 && g.co.is_multiple_of(4) && dw.is_some() {
        kc.next_multiple_of(4)
    } else {
        kc
    };
    let cols = ColLayout { v4, width: kcp };
    let w2 = match dx {
        Some(_) if v4 => weight_copy(rec, &g, w, true, kc)?,
        _ => w.reshape(&[g.co, kc]),
    };
    // The weight gradient in the column order, when that is not the weight's own.
    let dw_cols = match dw {
        Some(_) if v4 || kcp != kc => Some(rec.zeros(&[g.co, kcp])?),
        _ => None,
    };
    let cap = chunk_rows(rec, &g, kcp, max_chunk_rows);
    let col = rec.gpu.empty(&[cap, kcp])?;
    let dyc = if cap < m {
        Some(rec.gpu.empty(&[cap, g.co])?)
    } else {
        None
    };
    let mut r0 = 0;
    while r0 < m {
        let rows = cap.min(m - r0);
        let dy_rows = match &dyc {
            Some(t) => {
                copy_range(rec, dy, r0 * g.co, t, 0, rows * g.co)?;
                t
            }
            None => dy,
        };
        if let Some(dw) = dw {
            im2col(rec, &g, x, r0..r0 + rows, cols, &col)?;
            atb_accumulate(
                rec,
                dy_rows,
                &col,
                rows,
                g.co,
                kcp,
                dw_cols.as_ref().unwrap_or(dw),
            )?;
        }
        if let Some(dx) = dx {
            // dcol [rows, kc] = dy_rows [rows, Co] * w [Co, kc], into the (reused) column buffer.
            let gm = Gemm::new(rows, kc, g.co);
            gemm(rec, &gm, dy_rows, &w2, None, None, &col)?;
            if v4 {
                let cp = Cp {
                    n: x.numel() / g.ci,
                    row0: r0,
                    rows,
                    ..g.cp()
                };
                let groups = rec.grid(cp.n.div_ceil(64));
                rec.dispatch(
                    &Kernel::new(ShaderFamily::Conv, "col2im4", 64),
                    cp.params(),
                    &[&col, dx],
                    groups,
                )?;
            } else {
                let cp = Cp {
                    n: x.numel(),
                    row0: r0,
                    rows,
                    ..g.cp()
                };
                launch(rec, &kernel("col2im"), &cp, &[&col, dx])?;
            }
        }
        r0 += rows;
    }
    if let (Some(dw), Some(cols)) = (dw, &dw_cols) {
        weight_reorder(rec, &g, dw, cols, v4, true, kcp)?;
    }
    Ok(())
}

/// (With the `testing` feature: the hook tests use to pin this choice.)
#[cfg(any(test, feature = "testing"))]
pub fn conv2d_backward_chunked(
    rec: &mut Recorder,
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    geom: ConvGeom,
    grads: ConvGrads,
    max_chunk_rows: Option<usize>,
) -> Result<()> {
    conv2d_backward_chunked_impl(rec, x, w, dy, geom, grads, max_chunk_rows)
}

/// Depthwise conv (groups = C), w [C, 1, k, k], optional bias [C], fused activation.
/// x [B,H,W,C] -> [B,OH,OW,C].
pub fn depthwise_conv2d(
    rec: &mut Recorder,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    geom: ConvGeom,
    act: Act,
) -> Result<Tensor> {
    depthwise_forward(rec, x, w, bias, geom, act, None)
}

/// Output rows per invocation of `depthwise3_v4` when not forced: long runs (the window of input
/// rows is reloaded at the start of each run), but enough invocations to fill the workgroups.
const DW_RUN: usize = 16;

/// Whether [`depthwise_conv2d`] uses the sliding-window kernel `depthwise3_v4`.
fn dw_tiled(g: &Geo) -> bool {
    // Stride 1 only: see the note on depthwise3_v4 in shaders/conv.wgsl.
    g.k == 3 && g.ci.is_multiple_of(4) && g.stride == 1
}

/// [`depthwise_conv2d`] with the output rows per invocation of the 3x3 sliding-window kernel
/// forced (tests; ignored by the other kernels).
#[cfg(any(test, feature = "testing"))]
pub fn depthwise_conv2d_run(
    rec: &mut Recorder,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    geom: ConvGeom,
    act: Act,
    run: usize,
) -> Result<Tensor> {
    depthwise_forward(rec, x, w, bias, geom, act, Some(run.max(1)))
}

fn depthwise_forward(
    rec: &mut Recorder,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    geom: ConvGeom,
    act: Act,
    run: Option<usize>,
) -> Result<Tensor> {
    let g = &geometry("depthwise_conv2d", x, w, geom, true)?;
    if let Some(b) = bias {
        check_len("depthwise_conv2d bias", b, g.co)?;
    }
    let y = rec.gpu.empty(&g.out_shape())?;
    let n = y.numel();
    if n == 0 {
        return Ok(y);
    }
    let dummy = rec.gpu.dummy();
    rec.flops += 2.0 * (n * g.k * g.k) as f64;
    if dw_tiled(g) {
        let io = SlidingIo { x, w, bias, y: &y };
        return depthwise_sliding(rec, g, io, act, run, false).map(|_| y);
    }
    let (entry, v) = if g.ci.is_multiple_of(4) {
        ("depthwise4", 4)
    } else {
        ("depthwise", 1)
    };
    let k = kernel(entry)
        .b("HAS_BIAS", bias.is_some())
        .u("ACT", act.code());
    launch(
        rec,
        &k,
        &Cp { n: n / v, ..g.cp() },
        &[x, w, bias.unwrap_or(&dummy), &y],
    )?;
    Ok(y)
}

/// Tensors of [`depthwise_sliding`]: input, taps, optional bias, output.
struct SlidingIo<'a> {
    x: &'a Tensor,
    w: &'a Tensor,
    bias: Option<&'a Tensor>,
    y: &'a Tensor,
}

/// `depthwise3_v4` into `y` (see the shader): one invocation per (batch, run of output rows,
/// strip of 4 columns, 4 channels). `flip_accum`: taps rotated by 180 degrees and the result
/// added to `y` (the input gradient of a stride-1 conv).
fn depthwise_sliding(
    rec: &mut Recorder,
    g: &Geo,
    io: SlidingIo,
    act: Act,
    run: Option<usize>,
    flip_accum: bool,
) -> Result<()> {
    let SlidingIo { x, w, bias, y } = io;
    let dummy = rec.gpu.dummy();
    let run = run.unwrap_or(DW_RUN).min(g.oh);
    let inv = g.b * g.oh.div_ceil(run) * g.ow.div_ceil(4) * (g.ci / 4);
    let k = Kernel::new(ShaderFamily::Conv, "depthwise3_v4", 8)
        .b("HAS_BIAS", bias.is_some())
        .u("ACT", act.code())
        .b("DW_FLIP", flip_accum)
        .b("ACCUM", flip_accum);
    let cp = Cp {
        n: inv,
        e0: run,
        ..g.cp()
    };
    let groups = rec.grid(inv.div_ceil(8));
    rec.dispatch(&k, cp.params(), &[x, w, bias.unwrap_or(&dummy), y], groups)
}

/// Checks a convolution backward's `dy` against the geometry and the gradient buffers
/// `[dx, dw, dbias]` (where given) against the sizes of x, w and the bias.
fn check_backward(
    name: &str,
    g: &Geo,
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    grads: [Option<&Tensor>; 3],
) -> Result<()> {
    if dy.shape != g.out_shape() {
        return Err(invalid(format!(
            "{name}: dy {:?}, expected {:?}",
            dy.shape,
            g.out_shape()
        )));
    }
    for ((t, what), n) in grads
        .iter()
        .zip(["dx", "dw", "dbias"])
        .zip([x.numel(), w.numel(), g.co])
    {
        if let Some(t) = t {
            check_len(&format!("{name} {what}"), t, n)?;
        }
    }
    Ok(())
}

/// Gradients of [`depthwise_conv2d`] (dy before activation); accumulates into `dx [B,H,W,C]`,
/// `dw [C,1,k,k]`, `dbias [C]` where given. dx: for stride-1 3x3 with C % 4 == 0 the
/// sliding-window forward kernel on dy with rotated taps, otherwise a gather kernel; dw: per-block
/// partial sums over output positions, then a row-sum into w's layout; dbias: column sums of dy.
pub fn depthwise_conv2d_backward(
    rec: &mut Recorder,
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    geom: ConvGeom,
    grads: ConvGrads,
) -> Result<()> {
    let ConvGrads { dx, dw, dbias } = grads;
    let g = geometry("depthwise_conv2d_backward", x, w, geom, true)?;
    check_backward("depthwise_conv2d_backward", &g, x, w, dy, [dx, dw, dbias])?;
    let (m, c, kk) = (g.m(), g.ci, g.k * g.k);
    if m == 0 || c == 0 {
        return Ok(());
    }
    if let Some(db) = dbias {
        reduce_rows(rec, dy, m, c, db, 0)?;
    }
    // Channels in groups of 4 (16-byte loads) when C % 4 == 0.
    let v4 = c.is_multiple_of(4);
    let v = if v4 { 4 } else { 1 };
    if let Some(dx) = dx {
        if dw_tiled(&g) && g.pad <= 2 {
            // Stride 1: dx += dy conv (taps rotated 180 degrees, padding 2 - pad), which maps
            // the [OH, OW] of dy back to [H, W].
            let gt = Geo {
                h: g.oh,
                w: g.ow,
                oh: g.h,
                ow: g.w,
                pad: 2 - g.pad,
                ..g
            };
            let io = SlidingIo {
                x: dy,
                w,
                bias: None,
                y: dx,
            };
            depthwise_sliding(rec, &gt, io, Act::None, None, true)?;
        } else {
            let entry = if v4 { "depthwise_dx4" } else { "depthwise_dx" };
            launch(
                rec,
                &kernel(entry),
                &Cp {
                    n: x.numel() / v,
                    ..g.cp()
                },
                &[dy, w, dx],
            )?;
        }
    }
    if let Some(dw) = dw {
        const PER_BLOCK: usize = 128;
        let blocks = m.div_ceil(PER_BLOCK);
        let part = rec.gpu.empty(&[blocks, kk * c])?;
        let (entry, n) = if v4 && g.k == 3 {
            // All 9 taps of a channel quad in one invocation.
            ("depthwise3_dw_partial_v4", blocks * c / 4)
        } else if v4 {
            ("depthwise_dw_partial4", blocks * kk * c / 4)
        } else {
            ("depthwise_dw_partial", blocks * kk * c)
        };
        let cp = Cp {
            n,
            rows: m,
            e0: PER_BLOCK,
            ..g.cp()
        };
        launch(rec, &kernel(entry), &cp, &[x, dy, &part])?;
        reduce_rows(rec, &part, blocks, kk * c, dw, c)?;
    }
    Ok(())
}

fn convt_geometry(
    what: &str,
    x: &Tensor,
    w: &Tensor,
) -> Result<(usize, usize, usize, usize, usize)> {
    if x.shape.len() != 4
        || w.shape.len() != 4
        || w.shape[0] != x.shape[3]
        || w.shape[2] != 2
        || w.shape[3] != 2
    {
        return Err(invalid(format!(
            "{what}: expected x [B,H,W,Ci] and w [Ci,Co,2,2], got {:?} and {:?}",
            x.shape, w.shape
        )));
    }
    Ok((x.shape[0], x.shape[1], x.shape[2], x.shape[3], w.shape[1]))
}

/// ConvTranspose2d with kernel 2, stride 2 (non-overlapping), w in PyTorch layout [Ci, Co, 2, 2]:
/// y[b, 2i+a, 2j+c, o] = bias[o] + sum_ci x[b,i,j,ci] * w[ci,o,a,c]. x [B,H,W,Ci] -> [B,2H,2W,Co].
/// GEMM `t [B*H*W, 4*Co] = x w` (w's memory read as `[Ci, 4*Co]`, no re-ordering) followed by
/// `pixel_shuffle2` (+ bias, activation).
pub fn conv_transpose2x2(
    rec: &mut Recorder,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    act: Act,
) -> Result<Tensor> {
    let (b, h, wd, ci, co) = convt_geometry("conv_transpose2x2", x, w)?;
    if let Some(bv) = bias {
        check_len("conv_transpose2x2 bias", bv, co)?;
    }
    let m = b * h * wd;
    let y = rec.gpu.empty(&[b, 2 * h, 2 * wd, co])?;
    if y.numel() == 0 {
        return Ok(y);
    }
    let t = rec.gpu.empty(&[m, 4 * co])?;
    gemm(rec, &Gemm::new(m, 4 * co, ci), x, w, None, None, &t)?;
    let v4 = co.is_multiple_of(4);
    let entry = if v4 {
        "pixel_shuffle2_v4"
    } else {
        "pixel_shuffle2"
    };
    let k = kernel(entry)
        .b("HAS_BIAS", bias.is_some())
        .u("ACT", act.code());
    // v4: one invocation per (input position, 4 channels) = 16 outputs.
    let n = if v4 { m * co / 4 } else { y.numel() };
    let cp = Cp {
        n,
        bsz: b,
        h,
        w: wd,
        c: ci,
        co,
        ..Cp::default()
    };
    let dummy = rec.gpu.dummy();
    launch(rec, &k, &cp, &[&t, bias.unwrap_or(&dummy), &y])?;
    Ok(y)
}

/// Gradients of [`conv_transpose2x2`] (dy [B,2H,2W,Co] before activation); accumulates into
/// `dx [B,H,W,Ci]`, `dw [Ci,Co,2,2]`, `dbias [Co]` where given. `dt = pixel_unshuffle2(dy)`
/// `[B*H*W, 4*Co]`, then `dx += dt w^T` and `dw += x^T dt` (GEMMs), `dbias +=` column sums of dy.
pub fn conv_transpose2x2_backward(
    rec: &mut Recorder,
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    grads: ConvGrads,
) -> Result<()> {
    let ConvGrads { dx, dw, dbias } = grads;
    let (b, h, wd, ci, co) = convt_geometry("conv_transpose2x2_backward", x, w)?;
    if dy.shape != [b, 2 * h, 2 * wd, co] {
        return Err(invalid(format!(
            "conv_transpose2x2_backward: dy {:?} for x {:?}, w {:?}",
            dy.shape, x.shape, w.shape
        )));
    }
    if let Some(t) = dx {
        check_len("conv_transpose2x2_backward dx", t, x.numel())?;
    }
    if let Some(t) = dw {
        check_len("conv_transpose2x2_backward dw", t, w.numel())?;
    }
    if let Some(t) = dbias {
        check_len("conv_transpose2x2_backward dbias", t, co)?;
    }
    let m = b * h * wd;
    if m == 0 || co == 0 {
        return Ok(());
    }
    if let Some(db) = dbias {
        reduce_rows(rec, dy, 4 * m, co, db, 0)?;
    }
    if dx.is_none() && dw.is_none() {
        return Ok(());
    }
    let dt = rec.gpu.empty(&[m, 4 * co])?;
    let cp = Cp {
        n: dt.numel(),
        bsz: b,
        h,
        w: wd,
        c: ci,
        co,
        ..Cp::default()
    };
    launch(rec, &kernel("pixel_unshuffle2"), &cp, &[dy, &dt])?;
    if let Some(dx) = dx {
        let mut gm = Gemm::new(m, ci, 4 * co);
        gm.trans_b = true;
        gm.accumulate = true;
        gemm(rec, &gm, &dt, w, None, None, dx)?;
    }
    if let Some(dw) = dw {
        atb_accumulate(rec, x, &dt, m, ci, 4 * co, dw)?;
    }
    Ok(())
}

/// Micro-benchmarks at the model's shapes (1024² input): stem convs, patchify convs, the neck
/// 3x3, depthwise 3x3 on 256 channels at 256², the decoder's transposed convs, and the backward
/// of the heaviest ones.
#[cfg(not(target_arch = "wasm32"))]
pub fn bench(gpu: &Gpu) -> Result<Vec<BenchResult>> {
    let reps = 3;
    let mut out = Vec::new();
    let fill = |n: usize, seed: u32| -> Vec<f32> {
        (0..n)
            .map(|i| {
                (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / 16777216.0)
                    - 0.5
            })
            .collect()
    };
    // (name, x shape, Co, k, stride, pad)
    type Case = (&'static str, [usize; 4], usize, usize, usize, usize);
    let dense: [Case; 5] = [
        (
            "conv2d stem 3->32 k3 s2 p1 @1024²",
            [1, 1024, 1024, 3],
            32,
            3,
            2,
            1,
        ),
        (
            "conv2d stem 32->64 k3 s2 p1 @512²",
            [1, 512, 512, 32],
            64,
            3,
            2,
            1,
        ),
        (
            "conv2d neck 256->256 k3 s1 p1 @64²",
            [1, 64, 64, 256],
            256,
            3,
            1,
            1,
        ),
        (
            "conv2d patchify 3->32 k4 s4 @1024²",
            [1, 1024, 1024, 3],
            32,
            4,
            4,
            0,
        ),
        (
            "conv2d patchify 32->64 k2 s2 @256²",
            [1, 256, 256, 32],
            64,
            2,
            2,
            0,
        ),
    ];
    for (name, xs, co, k, s, p) in dense {
        let x = gpu.upload(&fill(xs.iter().product(), 1), &xs)?;
        let w = gpu.upload(&fill(co * xs[3] * k * k, 2), &[co, xs[3], k, k])?;
        let bias = gpu.upload(&fill(co, 3), &[co])?;
        let (oh, ow) = ((xs[1] + 2 * p - k) / s + 1, (xs[2] + 2 * p - k) / s + 1);
        let flops = 2.0 * (oh * ow * co * xs[3] * k * k) as f64;
        let ms = time_op(gpu, reps, |rec| {
            conv2d(
                rec,
                &x,
                &w,
                Some(&bias),
                ConvGeom { stride: s, pad: p },
                Act::Gelu,
            )
            .map(|_| ())
        })?;
        out.push(bench_line(name, ms, Some(flops), None));
        if k == 3 && xs[3] > 3 {
            let dy = gpu.upload(&fill(oh * ow * co, 4), &[1, oh, ow, co])?;
            let (dx, dw, db) = (gpu.empty(&xs)?, gpu.empty(&w.shape)?, gpu.empty(&[co])?);
            let ms = time_op(gpu, reps, |rec| {
                conv2d_backward(
                    rec,
                    &x,
                    &w,
                    &dy,
                    ConvGeom { stride: s, pad: p },
                    ConvGrads {
                        dx: Some(&dx),
                        dw: Some(&dw),
                        dbias: Some(&db),
                    },
                )
            })?;
            out.push(bench_line(
                format!("{name} backward"),
                ms,
                Some(2.0 * flops),
                None,
            ));
        }
    }
    for (name, s) in [
        ("depthwise 256ch k3 s1 p1 @256²", 1),
        ("depthwise 256ch k3 s2 p1 @256²", 2),
    ] {
        let xs = [1, 256, 256, 256];
        let x = gpu.upload(&fill(xs.iter().product(), 5), &xs)?;
        let w = gpu.upload(&fill(256 * 9, 6), &[256, 1, 3, 3])?;
        let bias = gpu.upload(&fill(256, 7), &[256])?;
        let o = (256 + 2 - 3) / s + 1;
        let n_out = (o * o * 256) as f64;
        let bytes = 4.0 * (x.numel() as f64 + n_out);
        let ms = time_op(gpu, reps, |rec| {
            depthwise_conv2d(
                rec,
                &x,
                &w,
                Some(&bias),
                ConvGeom { stride: s, pad: 1 },
                Act::Gelu,
            )
            .map(|_| ())
        })?;
        out.push(bench_line(name, ms, Some(18.0 * n_out), Some(bytes)));
        if s == 1 {
            let dy = gpu.upload(&fill(o * o * 256, 8), &[1, o, o, 256])?;
            let (dx, dw, db) = (gpu.empty(&xs)?, gpu.empty(&w.shape)?, gpu.empty(&[256])?);
            let ms = time_op(gpu, reps, |rec| {
                depthwise_conv2d_backward(
                    rec,
                    &x,
                    &w,
                    &dy,
                    ConvGeom { stride: s, pad: 1 },
                    ConvGrads {
                        dx: Some(&dx),
                        dw: Some(&dw),
                        dbias: Some(&db),
                    },
                )
            })?;
            out.push(bench_line(
                format!("{name} backward"),
                ms,
                Some(36.0 * n_out),
                Some(3.0 * bytes),
            ));
        }
    }
    for (name, hw, ci, co) in [
        ("conv_transpose2x2 256->64 @64²->128²", 64, 256, 64),
        ("conv_transpose2x2 64->32 @128²->256²", 128, 64, 32),
    ] {
        let xs = [1, hw, hw, ci];
        let x = gpu.upload(&fill(xs.iter().product(), 9), &xs)?;
        let w = gpu.upload(&fill(ci * co * 4, 10), &[ci, co, 2, 2])?;
        let bias = gpu.upload(&fill(co, 11), &[co])?;
        let flops = 2.0 * (hw * hw * ci * co * 4) as f64;
        let ms = time_op(gpu, reps, |rec| {
            conv_transpose2x2(rec, &x, &w, Some(&bias), Act::Gelu).map(|_| ())
        })?;
        out.push(bench_line(name, ms, Some(flops), None));
        let dy = gpu.upload(&fill(4 * hw * hw * co, 12), &[1, 2 * hw, 2 * hw, co])?;
        let (dx, dw, db) = (gpu.empty(&xs)?, gpu.empty(&w.shape)?, gpu.empty(&[co])?);
        let ms = time_op(gpu, reps, |rec| {
            conv_transpose2x2_backward(
                rec,
                &x,
                &w,
                &dy,
                ConvGrads {
                    dx: Some(&dx),
                    dw: Some(&dw),
                    dbias: Some(&db),
                },
            )
        })?;
        out.push(bench_line(
            format!("{name} backward"),
            ms,
            Some(2.0 * flops),
            None,
        ));
    }
    Ok(out)
}
