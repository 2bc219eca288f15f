//! Attention kernels (shaders/attention.wgsl): TinyViT window partition / reverse, windowed
//! multi-head attention with relative position bias, SAM multi-head attention core, and their
//! backward passes.
//!
//! # Kernels
//! The attention core is flash-style (online softmax, no score matrix in memory, no workgroup
//! barriers). Each invocation owns R rows of one (problem, head) in registers and loops over the
//! other side; all invocations of a workgroup share (problem, head), so the loop's loads are
//! uniform. R > 1 on CPU adapters: lavapipe (Mesa 22) turns every storage load into a scalar loop
//! over the SIMD lanes, so each loaded key/value must feed many rows (R = 7 for the 7x7 windows,
//! 13 for 14x14, up to 16); GPUs get R = 1. When the own side is short and the other long (SAM
//! token <-> image attention, 5 x 4096), invocations instead split the long side and partial
//! results are merged (`PAR`). Rows are read as vec4 chunks; layouts whose offsets are not
//! multiples of 4 (odd head dims) go through zero-padded copies.
//!
//! Pipelines are specialised per (head dim / 4, R, workgroup size, flags); on lavapipe a first
//! compile of the largest variants takes ~10-30 s (then Mesa's shader cache serves them).
//!
//! # Training
//! `window_attention_train` / `mha_train` return [`AttnSaved`]: the output and the log-sum-exp of
//! the logits per (problem, head, query). The backward recomputes the probabilities from it
//! (delta_i = dout_i . out_i, then dq from a query-side kernel and dk/dv from a key-side kernel).
//!
//! # Gradient semantics
//! * Gradients w.r.t. activations (`dqkv`, `dq`/`dk`/`dv`, `dy`, `dx`) are returned as new,
//!   fully written tensors, except `window_partition_backward`, which can add into an existing
//!   gradient buffer (`accumulate = Some(..)`), the common case of a residual branch, and
//!   `window_reverse_add_backward`'s optional `dres_acc += dout`.
//! * The gradient w.r.t. the parameter `bias` is **accumulated** (`dbias += ..`) into the caller's
//!   gradient buffer, like every parameter gradient of the crate (zero it once per step).

use super::u;
use crate::error::{Error, Result};
use crate::gpu::{Kernel, Recorder, ShaderFamily, Tensor};

crate::uniform! {
    /// attention.wgsl `AttnParams` (the attention core, its merge and gather kernels).
    struct AttnParams {
        lq: u32, lk: u32, heads: u32, nz: u32,
        q_off: u32, q_row: u32, q_z: u32, q_h: u32,
        k_off: u32, k_row: u32, k_z: u32, k_h: u32,
        v_off: u32, v_row: u32, v_z: u32, v_h: u32,
        o_off: u32, o_row: u32, o_z: u32, o_h: u32,
        blocks: u32, splits: u32, split_len: u32, zgroup: u32, ngroups: u32, ws: u32, scale: f32, total: u32,
    }
}
crate::uniform! {
    /// attention.wgsl `RepackParams` (attn_repack; layouts in elements).
    struct RepackParams {
        len: u32, heads: u32, nz: u32, width: u32, valid: u32,
        src_off: u32, src_row: u32, src_z: u32, src_h: u32,
        dst_off: u32, dst_row: u32, dst_z: u32, dst_h: u32,
    }
}
crate::uniform! {
    /// attention.wgsl `WinParams` (window partition / reverse).
    struct WinParams { b: u32, h: u32, w: u32, c: u32, ws: u32, nwh: u32, nww: u32, total: u32 }
}

/// Largest head dimension the kernels support.
pub const MAX_HEAD_DIM: usize = 64;
/// Largest window token count (ws*ws) of the windowed kernels.
pub const MAX_WINDOW_TOKENS: usize = 256;

/// What the training forward keeps for the backward.
#[derive(Clone, Debug)]
pub struct AttnSaved {
    /// The attention output (window: [NW, n, C]; mha: [B, Lq, E]).
    pub out: Tensor,
    /// log(sum_j exp(logit_ij)) per (problem, head, query): [NW, heads, n] or [B, heads, Lq].
    pub lse: Tensor,
}

fn invalid<T>(msg: String) -> Result<T> {
    Err(Error::Invalid(msg))
}

fn window_counts(h: usize, w: usize, ws: usize) -> (usize, usize) {
    (h.div_ceil(ws), w.div_ceil(ws))
}

fn check_map(what: &str, x: &Tensor, ws: usize) -> Result<(usize, usize, usize, usize)> {
    if x.shape.len() != 4 {
        return invalid(format!("{what}: expected [B,H,W,C], got {:?}", x.shape));
    }
    if ws == 0 {
        return invalid(format!("{what}: window size 0"));
    }
    Ok((x.shape[0], x.shape[1], x.shape[2], x.shape[3]))
}

fn win_params(b: usize, h: usize, w: usize, c: usize, ws: usize, total: usize) -> WinParams {
    let (nwh, nww) = window_counts(h, w, ws);
    WinParams {
        b: u(b),
        h: u(h),
        w: u(w),
        c: u(c),
        ws: u(ws),
        nwh: u(nwh),
        nww: u(nww),
        total: u(total),
    }
}

/// Records the partition kernel: dst (= or +=) partition(src); optionally dres += src.
fn record_partition(
    rec: &mut Recorder,
    src: &Tensor,
    dims: (usize, usize, usize, usize),
    ws: usize,
    dst: &Tensor,
    accum: bool,
    dres: Option<&Tensor>,
) -> Result<()> {
    let (b, h, w, c) = dims;
    // The row form copies a token's C / 4 vec4 (its index arithmetic once per token).
    let (entry, wg, total) = if c.is_multiple_of(4) {
        ("win_partition4", 64, dst.numel() / c)
    } else {
        ("win_partition", 256, dst.numel())
    };
    let k = Kernel::new(ShaderFamily::Attention, entry, wg)
        .b("ACCUM", accum)
        .b("DRES", dres.is_some());
    let spare;
    let dres = match dres {
        Some(t) => t,
        None => {
            spare = rec.gpu.empty(&[4])?;
            &spare
        }
    };
    let groups = rec.grid(total.div_ceil(wg as usize));
    rec.dispatch(
        &k,
        win_params(b, h, w, c, ws, total),
        &[src, dst, dres],
        groups,
    )
}

/// Records the reverse kernel: dst = reverse(y) (+ res) (+ dst when accum).
fn record_reverse(
    rec: &mut Recorder,
    y: &Tensor,
    res: Option<&Tensor>,
    dims: (usize, usize, usize, usize),
    ws: usize,
    dst: &Tensor,
    accum: bool,
) -> Result<()> {
    let (b, h, w, c) = dims;
    let (entry, wg, total) = if c.is_multiple_of(4) {
        ("win_reverse4", 64, b * h * w)
    } else {
        ("win_reverse", 256, b * h * w * c)
    };
    let k = Kernel::new(ShaderFamily::Attention, entry, wg)
        .b("ACCUM", accum)
        .b("HAS_RES", res.is_some());
    let dummy = rec.gpu.dummy();
    let groups = rec.grid(total.div_ceil(wg as usize));
    rec.dispatch(
        &k,
        win_params(b, h, w, c, ws, total),
        &[y, res.unwrap_or(&dummy), dst],
        groups,
    )
}

fn windows_shape(b: usize, h: usize, w: usize, c: usize, ws: usize) -> [usize; 3] {
    let (nwh, nww) = window_counts(h, w, ws);
    [b * nwh * nww, ws * ws, c]
}

/// x [B,H,W,C] -> [B*nWh*nWw, ws*ws, C]: zero-pad bottom/right to multiples of ws, windows ordered
/// (b, window-row, window-col), tokens row-major inside each window.
pub fn window_partition(rec: &mut Recorder, x: &Tensor, ws: usize) -> Result<Tensor> {
    let dims = check_map("window_partition", x, ws)?;
    let (b, h, w, c) = dims;
    let out = rec.gpu.empty(&windows_shape(b, h, w, c, ws))?;
    record_partition(rec, x, dims, ws, &out, false, None)?;
    Ok(out)
}

fn check_windows(
    what: &str,
    y: &Tensor,
    dims: (usize, usize, usize, usize),
    ws: usize,
) -> Result<()> {
    let (b, h, w, c) = dims;
    let want = windows_shape(b, h, w, c, ws);
    if y.numel() != want.iter().product::<usize>() || y.dim(-1) != c {
        return invalid(format!(
            "{what}: windows {:?} do not match {:?} (ws {ws}) -> {want:?}",
            y.shape,
            [b, h, w, c]
        ));
    }
    Ok(())
}

/// res [B,H,W,C] + crop(reverse(y)) where y is [B*nWin, ws*ws, C] in window_partition's order.
pub fn window_reverse_add(
    rec: &mut Recorder,
    y: &Tensor,
    res: &Tensor,
    ws: usize,
) -> Result<Tensor> {
    let dims = check_map("window_reverse_add", res, ws)?;
    check_windows("window_reverse_add", y, dims, ws)?;
    let out = rec.gpu.empty(&res.shape)?;
    record_reverse(rec, y, Some(res), dims, ws, &out, false)?;
    Ok(out)
}

/// Gradient of `window_partition`: dx = crop(reverse(dwin)) for an input of shape `x_shape`
/// [B,H,W,C]. With `accumulate = Some(g)` (shape `x_shape`) the result is added into `g`, which is
/// returned; otherwise a new tensor is returned.
pub fn window_partition_backward(
    rec: &mut Recorder,
    dwin: &Tensor,
    x_shape: &[usize],
    ws: usize,
    accumulate: Option<&Tensor>,
) -> Result<Tensor> {
    if x_shape.len() != 4 || ws == 0 {
        return invalid(format!(
            "window_partition_backward: x shape {x_shape:?}, ws {ws}"
        ));
    }
    let dims = (x_shape[0], x_shape[1], x_shape[2], x_shape[3]);
    check_windows("window_partition_backward", dwin, dims, ws)?;
    let dst = match accumulate {
        Some(g) => {
            if g.numel() != x_shape.iter().product::<usize>() {
                return invalid(format!(
                    "window_partition_backward: accumulator {:?} vs {x_shape:?}",
                    g.shape
                ));
            }
            g.clone()
        }
        None => rec.gpu.empty(x_shape)?,
    };
    record_reverse(rec, dwin, None, dims, ws, &dst, accumulate.is_some())?;
    Ok(dst)
}

/// Gradient of `window_reverse_add` w.r.t. y: the window partition of `dout` [B,H,W,C] (zeros at
/// padded tokens). The gradient w.r.t. `res` is `dout` itself (no kernel needed); when the caller
/// wants it added into an existing buffer, pass it as `dres_acc` (`dres_acc += dout`, fused into the
/// same kernel; must not be `dout`'s buffer).
pub fn window_reverse_add_backward(
    rec: &mut Recorder,
    dout: &Tensor,
    ws: usize,
    dres_acc: Option<&Tensor>,
) -> Result<Tensor> {
    let dims = check_map("window_reverse_add_backward", dout, ws)?;
    let (b, h, w, c) = dims;
    if let Some(d) = dres_acc
        && (d.numel() != dout.numel() || d.same_buffer(dout))
    {
        return invalid(format!(
            "window_reverse_add_backward: dres_acc {:?} vs dout {:?}",
            d.shape, dout.shape
        ));
    }
    let dy = rec.gpu.empty(&windows_shape(b, h, w, c, ws))?;
    record_partition(rec, dout, dims, ws, &dy, false, dres_acc)?;
    Ok(dy)
}

// ---------------------------------------------------------------------------------------------
// Attention core

/// Element addressing of per-head rows: row i of head h in problem z starts at
/// `z*zs + i*row + h*hs + off`, followed by `d` contiguous values.
#[derive(Clone, Copy, Debug)]
struct Layout {
    off: usize,
    row: usize,
    zs: usize,
    hs: usize,
}

impl Layout {
    fn aligned(&self) -> bool {
        [self.off, self.row, self.zs, self.hs]
            .iter()
            .all(|x| x.is_multiple_of(4))
    }
    /// The same layout in vec4 units (only for aligned layouts).
    fn quarter(&self) -> Layout {
        Layout {
            off: self.off / 4,
            row: self.row / 4,
            zs: self.zs / 4,
            hs: self.hs / 4,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Core {
    lq: usize,
    lk: usize,
    heads: usize,
    nz: usize,
    d: usize,
    q: Layout,
    k: Layout,
    v: Layout,
    o: Layout,
    /// Window size of the relative position bias (0: no bias).
    ws: usize,
    scale: f32,
}

impl Core {
    fn d4(&self) -> usize {
        self.d.div_ceil(4)
    }
    /// Whether the kernels can read the rows as vec4 chunks directly.
    fn aligned(&self) -> bool {
        self.d.is_multiple_of(4) && [self.q, self.k, self.v, self.o].iter().all(|l| l.aligned())
    }
    /// The zero-padded, aligned layouts used when `!aligned()`: q and out as [nz, lq, heads, dp],
    /// k and v interleaved in one buffer [nz, lk, heads, 2, dp] (dp = 4 * d4).
    fn padded(&self) -> Core {
        let dp = 4 * self.d4();
        let qo = Layout {
            off: 0,
            row: self.heads * dp,
            zs: self.lq * self.heads * dp,
            hs: dp,
        };
        let kv = |off| Layout {
            off,
            row: self.heads * 2 * dp,
            zs: self.lk * self.heads * 2 * dp,
            hs: 2 * dp,
        };
        Core {
            d: dp,
            q: qo,
            k: kv(0),
            v: kv(dp),
            o: qo,
            ..*self
        }
    }
}

/// How one core kernel is laid out (see the top of shaders/attention.wgsl).
#[derive(Clone, Copy, Debug)]
struct Plan {
    /// Split the looped side over invocations (partial results merged afterwards).
    par: bool,
    /// Own rows per invocation.
    r: usize,
    /// Invocations per workgroup.
    wg: usize,
    /// Lane blocks per (problem, head) (!par).
    blocks: usize,
    /// Workgroups along the looped side (par).
    splits: usize,
    /// Looped rows per chunk (par).
    split_len: usize,
}

impl Plan {
    /// Chunks of the looped side (partial results to merge).
    fn chunks(&self) -> usize {
        if self.par { self.splits * self.wg } else { 1 }
    }
}

/// Several rows per invocation: as the recording's plan says, else on CPU adapters (lavapipe)
/// and not on GPUs.
fn register_rows(rec: &Recorder) -> bool {
    rec.plan
        .register_rows
        .unwrap_or(rec.gpu.info.device_type == wgpu::DeviceType::Cpu)
}

/// Rows per invocation on CPU adapters are bounded by R * d4 <= this (compile time and stack of the
/// unrolled kernels grow with it): forward, backward. CMAX_FWD is the shader's array size CMAX.
const CMAX_FWD: usize = 104;
const CMAX_BWD: usize = 56;
/// The same bound on GPUs for the PAR layout (R = the short own side held in registers).
const CMAX_GPU: usize = 32;

/// Layout for `own` rows looping over `other` rows. `cmax` bounds R * d4 (register rows).
fn plan(rec: &Recorder, own: usize, other: usize, d4: usize, cmax: usize) -> Plan {
    let cpu = register_rows(rec);
    let rmax = ((if cpu { cmax } else { CMAX_GPU }) / d4).clamp(1, 16);
    if own <= rmax && other >= 64 {
        // few own rows (SAM token <-> image attention): every invocation keeps all of them and
        // takes a chunk of the looped side
        let wg = if cpu { 8 } else { 64 };
        let split_len = other.div_ceil(64).max(32);
        let splits = other.div_ceil(split_len).div_ceil(wg);
        return Plan {
            par: true,
            r: own,
            wg,
            blocks: 1,
            splits,
            split_len,
        };
    }
    if cpu {
        let groups8 = own.div_ceil(8 * rmax);
        let r = own.div_ceil(8 * groups8);
        let wg = 8 * groups8.min(8);
        Plan {
            par: false,
            r,
            wg,
            blocks: own.div_ceil(wg * r),
            splits: 1,
            split_len: 0,
        }
    } else {
        let blocks = own.div_ceil(256).max(1);
        let wg = own.div_ceil(blocks).next_multiple_of(8).clamp(8, 256);
        Plan {
            par: false,
            r: 1,
            wg,
            blocks,
            splits: 1,
            split_len: 0,
        }
    }
}

/// Per-dispatch fields of [`AttnParams`] beyond the core and plan.
struct Fields {
    /// Goes to the `lq` field (rows per (z, h) of the merge kernels).
    len: usize,
    splits: usize,
    /// Goes to the `ws` field (the window size, or the partial width of the gather kernel).
    ws_field: usize,
    zgroup: usize,
    ngroups: usize,
    total: usize,
}

/// Uniform parameters of the attention kernels (layouts in vec4 units).
fn core_params(c: &Core, p: &Plan, f: Fields) -> AttnParams {
    let Fields {
        len,
        splits,
        ws_field,
        zgroup,
        ngroups,
        total,
    } = f;
    let [q, k, v, o] = [c.q, c.k, c.v, c.o].map(|l| l.quarter());
    AttnParams {
        lq: u(len),
        lk: u(c.lk),
        heads: u(c.heads),
        nz: u(c.nz),
        q_off: u(q.off),
        q_row: u(q.row),
        q_z: u(q.zs),
        q_h: u(q.hs),
        k_off: u(k.off),
        k_row: u(k.row),
        k_z: u(k.zs),
        k_h: u(k.hs),
        v_off: u(v.off),
        v_row: u(v.row),
        v_z: u(v.zs),
        v_h: u(v.hs),
        o_off: u(o.off),
        o_row: u(o.row),
        o_z: u(o.zs),
        o_h: u(o.hs),
        blocks: u(p.blocks),
        splits: u(splits),
        split_len: u(p.split_len),
        zgroup: u(zgroup),
        ngroups: u(ngroups),
        ws: u(ws_field),
        scale: c.scale,
        total: u(total),
    }
}

/// A core kernel (`attn_fwd`, `attn_bwd_dq`, `attn_bwd_dkv`): from the subgroup module (the lanes
/// share each looped row through broadcasts) where the device has 8-wide subgroups and every lane
/// of a workgroup loops over the same rows (`!par`).
fn core_kernel(rec: &Recorder, entry: &'static str, c: &Core, p: &Plan) -> Kernel {
    let sg = !p.par
        && p.wg.is_multiple_of(8)
        && rec.plan.subgroups.unwrap_or(true)
        && rec.gpu.subgroups_of_8();
    let family = if sg {
        ShaderFamily::AttentionSg
    } else {
        ShaderFamily::Attention
    };
    Kernel::new(family, entry, p.wg as u32)
        .u("D4", c.d4() as u32)
        .u("R", p.r as u32)
        .u("WG", p.wg as u32)
        .b("PAR", p.par)
        .b("HAS_BIAS", c.ws > 0)
}

/// A small kernel (64 invocations, one element or row each) of the attention family.
fn small_kernel(entry: &'static str, c: &Core) -> Kernel {
    Kernel::new(ShaderFamily::Attention, entry, 64).u("D4", c.d4() as u32)
}

const SMALL: Plan = Plan {
    par: false,
    r: 1,
    wg: 64,
    blocks: 1,
    splits: 1,
    split_len: 0,
};

fn attn_flops(c: &Core) -> f64 {
    4.0 * c.lq as f64 * c.lk as f64 * c.d as f64 * c.heads as f64 * c.nz as f64
}

/// A 4-element scratch tensor for an unused writable binding.
fn spare(rec: &Recorder) -> Result<Tensor> {
    rec.gpu.empty(&[4])
}

/// A tensor read or written through a layout.
#[derive(Clone, Copy)]
struct View<'a>(&'a Tensor, Layout);

/// Copies rows of `len` per (z, h) with `width` values each from layout `from` of `src` to layout
/// `to` of `dst`; values past the first `valid` are written as zeros.
fn record_repack(
    rec: &mut Recorder,
    c: &Core,
    len: usize,
    View(src, from): View,
    View(dst, to): View,
    width: usize,
    valid: usize,
) -> Result<()> {
    let p = RepackParams {
        len: u(len),
        heads: u(c.heads),
        nz: u(c.nz),
        width: u(width),
        valid: u(valid),
        src_off: u(from.off),
        src_row: u(from.row),
        src_z: u(from.zs),
        src_h: u(from.hs),
        dst_off: u(to.off),
        dst_row: u(to.row),
        dst_z: u(to.zs),
        dst_h: u(to.hs),
    };
    let n = c.nz * len * c.heads * width;
    let grid = rec.grid(n.div_ceil(64));
    rec.dispatch(&small_kernel("attn_repack", c), p, &[src, dst], grid)
}

/// Zero-padded aligned copies (q', kv') of q, k, v for `c.padded()`.
fn pad_inputs(
    rec: &mut Recorder,
    c: &Core,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let pc = c.padded();
    let qp = rec.gpu.empty(&[c.nz, c.lq, c.heads * pc.d])?;
    let kvp = rec.gpu.empty(&[c.nz, c.lk, c.heads * 2 * pc.d])?;
    record_repack(rec, c, c.lq, View(q, c.q), View(&qp, pc.q), pc.d, c.d)?;
    record_repack(rec, c, c.lk, View(k, c.k), View(&kvp, pc.k), pc.d, c.d)?;
    record_repack(rec, c, c.lk, View(v, c.v), View(&kvp, pc.v), pc.d, c.d)?;
    Ok((qp, kvp))
}

/// Tensors of a core's forward: inputs q, k, v (and the window bias), output `out` (o layout)
/// and, when given, `lse` [nz, heads, lq].
#[derive(Clone, Copy)]
struct FwdIo<'a> {
    q: &'a Tensor,
    k: &'a Tensor,
    v: &'a Tensor,
    bias: Option<&'a Tensor>,
    out: &'a Tensor,
    lse: Option<&'a Tensor>,
}

/// Forward of an aligned core.
fn core_forward_aligned(rec: &mut Recorder, c: &Core, io: FwdIo) -> Result<()> {
    let FwdIo {
        q,
        k,
        v,
        bias,
        out,
        lse,
    } = io;
    debug_assert!(c.aligned());
    let p = plan(rec, c.lq, c.lk, c.d4(), CMAX_FWD);
    let dummy = rec.gpu.dummy();
    let bias = bias.unwrap_or(&dummy);
    let total = c.nz * c.heads * p.blocks * p.splits;
    let grid = rec.grid(total);
    let params = core_params(
        c,
        &p,
        Fields {
            len: c.lq,
            splits: p.splits,
            ws_field: c.ws,
            zgroup: 1,
            ngroups: c.nz,
            total,
        },
    );
    if !p.par {
        let sp = spare(rec)?;
        let k_ = core_kernel(rec, "attn_fwd", c, &p).b("SAVE_LSE", lse.is_some());
        return rec.dispatch(&k_, params, &[q, k, v, bias, out, lse.unwrap_or(&sp)], grid);
    }
    let rows = c.nz * c.heads * c.lq;
    let chunks = p.chunks();
    let part = rec.gpu.empty(&[chunks, rows, 4 * c.d4()])?;
    let ml = rec.gpu.empty(&[chunks, rows, 2])?;
    rec.dispatch(
        &core_kernel(rec, "attn_fwd", c, &p),
        params,
        &[q, k, v, bias, &part, &ml],
        grid,
    )?;
    let sp = spare(rec)?;
    let kc = small_kernel("attn_combine", c).b("SAVE_LSE", lse.is_some());
    let grid = rec.grid(rows.div_ceil(64));
    let params = core_params(
        c,
        &SMALL,
        Fields {
            len: c.lq,
            splits: chunks,
            ws_field: c.ws,
            zgroup: 1,
            ngroups: 1,
            total: 0,
        },
    );
    rec.dispatch(&kc, params, &[&part, &ml, out, lse.unwrap_or(&sp)], grid)
}

/// Forward of any core (repacks unaligned rows through zero-padded copies).
fn core_forward(rec: &mut Recorder, c: &Core, io: FwdIo) -> Result<()> {
    let FwdIo {
        q,
        k,
        v,
        bias,
        out,
        lse,
    } = io;
    rec.flops += attn_flops(c);
    if c.aligned() {
        return core_forward_aligned(rec, c, io);
    }
    let pc = c.padded();
    let (qp, kvp) = pad_inputs(rec, c, q, k, v)?;
    let op = rec.gpu.empty(&[c.nz, c.lq, c.heads * pc.d])?;
    let padded = FwdIo {
        q: &qp,
        k: &kvp,
        v: &kvp,
        bias,
        out: &op,
        lse,
    };
    core_forward_aligned(rec, &pc, padded)?;
    record_repack(rec, c, c.lq, View(&op, pc.o), View(out, c.o), c.d, c.d)
}

/// Where the backward writes dk/dv.
enum KvDest<'a> {
    /// dk into the k layout and dv into the v layout of one buffer (window dqkv).
    Shared(&'a Tensor),
    /// Separate tensors (written through partials + gather).
    Separate(&'a Tensor, &'a Tensor),
}

/// Partial sums [chunks, nz, heads, len, width, d4] and the component `comp` to gather.
struct Partials<'a> {
    t: &'a Tensor,
    len: usize,
    chunks: usize,
    width: usize,
    comp: usize,
}

/// Sums the partials into `dst` with layout `l`.
fn record_gather(rec: &mut Recorder, c: &Core, part: Partials, View(dst, l): View) -> Result<()> {
    let Partials {
        t: part,
        len,
        chunks,
        width,
        comp,
    } = part;
    let cc = Core { o: l, ..*c };
    let n = c.nz * c.heads * len * c.d4();
    let grid = rec.grid(n.div_ceil(64));
    let params = core_params(
        &cc,
        &SMALL,
        Fields {
            len,
            splits: chunks,
            ws_field: width,
            zgroup: comp,
            ngroups: 1,
            total: 0,
        },
    );
    rec.dispatch(&small_kernel("attn_gather", c), params, &[part, dst], grid)
}

/// Tensors of a core's backward: the forward's inputs and saved `out` / `lse`, the output
/// gradient `dout`; `dq` receives dq in the q layout (fully written), `kv` the dk/dv, `dbias`
/// (when the core has a bias) is accumulated.
struct BwdIo<'a> {
    q: &'a Tensor,
    k: &'a Tensor,
    v: &'a Tensor,
    bias: Option<&'a Tensor>,
    out: &'a Tensor,
    lse: &'a Tensor,
    dout: &'a Tensor,
    dq: &'a Tensor,
    kv: KvDest<'a>,
    dbias: Option<&'a Tensor>,
}

/// Backward of an aligned core.
fn core_backward_aligned(rec: &mut Recorder, c: &Core, io: BwdIo) -> Result<()> {
    let BwdIo {
        q,
        k,
        v,
        bias,
        out,
        lse,
        dout,
        dq,
        kv,
        dbias,
    } = io;
    debug_assert!(c.aligned());
    let rows = c.nz * c.heads * c.lq;
    let dummy = rec.gpu.dummy();
    let bias_t = bias.unwrap_or(&dummy);

    // lse and delta = dout . out per query row
    let stat = rec.gpu.empty(&[rows, 2])?;
    {
        let grid = rec.grid(rows.div_ceil(64));
        let params = core_params(
            c,
            &SMALL,
            Fields {
                len: c.lq,
                splits: 1,
                ws_field: c.ws,
                zgroup: 1,
                ngroups: 1,
                total: 0,
            },
        );
        rec.dispatch(
            &small_kernel("attn_bwd_prep", c),
            params,
            &[out, dout, lse, &stat],
            grid,
        )?;
    }

    // query side: dq (+ dbias partial sums T)
    {
        let p = plan(rec, c.lq, c.lk, c.d4(), CMAX_BWD);
        let (zgroup, ngroups) = if c.ws > 0 && !p.par {
            let target = 64usize.div_ceil(c.heads * p.blocks).clamp(1, c.nz);
            let zg = c.nz.div_ceil(target);
            (zg, c.nz.div_ceil(zg))
        } else {
            (1, c.nz)
        };
        let t_buf = if c.ws > 0 {
            rec.gpu.empty(&[ngroups, c.heads, c.lk, c.lq])?
        } else {
            spare(rec)?
        };
        let chunks = p.chunks();
        let part = if p.par {
            Some(rec.gpu.empty(&[chunks, rows, 4 * c.d4()])?)
        } else {
            None
        };
        let total = ngroups * c.heads * p.blocks * p.splits;
        let grid = rec.grid(total);
        let params = core_params(
            c,
            &p,
            Fields {
                len: c.lq,
                splits: p.splits,
                ws_field: c.ws,
                zgroup,
                ngroups,
                total,
            },
        );
        rec.dispatch(
            &core_kernel(rec, "attn_bwd_dq", c, &p),
            params,
            &[
                q,
                k,
                v,
                bias_t,
                dout,
                &stat,
                part.as_ref().unwrap_or(dq),
                &t_buf,
            ],
            grid,
        )?;
        if let Some(part) = &part {
            record_gather(
                rec,
                c,
                Partials {
                    t: part,
                    len: c.lq,
                    chunks,
                    width: 1,
                    comp: 0,
                },
                View(dq, c.q),
            )?;
        }
        if let Some(dbias) = dbias {
            let n = c.ws * c.ws;
            let grid = rec.grid((c.heads * n).div_ceil(64));
            let params = core_params(
                c,
                &SMALL,
                Fields {
                    len: c.lq,
                    splits: 1,
                    ws_field: c.ws,
                    zgroup,
                    ngroups,
                    total: 0,
                },
            );
            rec.dispatch(
                &small_kernel("attn_dbias", c),
                params,
                &[&t_buf, dbias],
                grid,
            )?;
        }
    }

    // key side: dk, dv
    {
        let p = plan(rec, c.lk, c.lq, c.d4(), CMAX_BWD);
        let total = c.nz * c.heads * p.blocks * p.splits;
        let grid = rec.grid(total);
        let params = core_params(
            c,
            &p,
            Fields {
                len: c.lq,
                splits: p.splits,
                ws_field: c.ws,
                zgroup: 1,
                ngroups: c.nz,
                total,
            },
        );
        let direct = !p.par && matches!(kv, KvDest::Shared(_));
        let kk = core_kernel(rec, "attn_bwd_dkv", c, &p).b("DIRECT", direct);
        if direct {
            let KvDest::Shared(dst) = kv else {
                unreachable!()
            };
            rec.dispatch(&kk, params, &[q, k, v, bias_t, dout, &stat, dst], grid)?;
        } else {
            let chunks = p.chunks();
            let part = rec
                .gpu
                .empty(&[chunks, c.nz * c.heads * c.lk, 2, 4 * c.d4()])?;
            rec.dispatch(&kk, params, &[q, k, v, bias_t, dout, &stat, &part], grid)?;
            let (dk, dv) = match kv {
                KvDest::Shared(t) => (t, t),
                KvDest::Separate(a, b) => (a, b),
            };
            record_gather(
                rec,
                c,
                Partials {
                    t: &part,
                    len: c.lk,
                    chunks,
                    width: 2,
                    comp: 0,
                },
                View(dk, c.k),
            )?;
            record_gather(
                rec,
                c,
                Partials {
                    t: &part,
                    len: c.lk,
                    chunks,
                    width: 2,
                    comp: 1,
                },
                View(dv, c.v),
            )?;
        }
    }
    Ok(())
}

/// Backward of any core (repacks unaligned rows through zero-padded copies).
fn core_backward(rec: &mut Recorder, c: &Core, io: BwdIo) -> Result<()> {
    rec.flops += 2.5 * attn_flops(c);
    if c.aligned() {
        return core_backward_aligned(rec, c, io);
    }
    let BwdIo {
        q,
        k,
        v,
        bias,
        out,
        lse,
        dout,
        dq,
        kv,
        dbias,
    } = io;
    let pc = c.padded();
    let (qp, kvp) = pad_inputs(rec, c, q, k, v)?;
    let rows_shape = [c.nz, c.lq, c.heads * pc.d];
    let outp = rec.gpu.empty(&rows_shape)?;
    let doutp = rec.gpu.empty(&rows_shape)?;
    record_repack(rec, c, c.lq, View(out, c.o), View(&outp, pc.o), pc.d, c.d)?;
    record_repack(rec, c, c.lq, View(dout, c.o), View(&doutp, pc.o), pc.d, c.d)?;
    let dqp = rec.gpu.empty(&rows_shape)?;
    let dkvp = rec.gpu.empty(&kvp.shape)?;
    let padded = BwdIo {
        q: &qp,
        k: &kvp,
        v: &kvp,
        bias,
        out: &outp,
        lse,
        dout: &doutp,
        dq: &dqp,
        kv: KvDest::Shared(&dkvp),
        dbias,
    };
    core_backward_aligned(rec, &pc, padded)?;
    let (dk, dv) = match kv {
        KvDest::Shared(t) => (t, t),
        KvDest::Separate(a, b) => (a, b),
    };
    record_repack(rec, c, c.lq, View(&dqp, pc.q), View(dq, c.q), c.d, c.d)?;
    record_repack(rec, c, c.lk, View(&dkvp, pc.k), View(dk, c.k), c.d, c.d)?;
    record_repack(rec, c, c.lk, View(&dkvp, pc.v), View(dv, c.v), c.d, c.d)
}

/// Heads and window size of a windowed attention.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub heads: usize,
    /// The windows are ws x ws tokens.
    pub ws: usize,
}

fn window_core(qkv: &Tensor, bias: &Tensor, win: Window) -> Result<Core> {
    let Window { heads, ws } = win;
    let n = ws * ws;
    if ws == 0 || n > MAX_WINDOW_TOKENS {
        return invalid(format!(
            "window_attention: window {ws}x{ws} has {n} tokens; the kernel supports 1..={MAX_WINDOW_TOKENS}"
        ));
    }
    if qkv.shape.len() != 3
        || qkv.shape[1] != n
        || !qkv.shape[2].is_multiple_of(3)
        || qkv.shape[0] == 0
    {
        return invalid(format!(
            "window_attention: qkv {:?} is not [NW, {n}, 3C]",
            qkv.shape
        ));
    }
    let c = qkv.shape[2] / 3;
    if heads == 0 || !c.is_multiple_of(heads) {
        return invalid(format!(
            "window_attention: C = {c} is not divisible by {heads} heads"
        ));
    }
    let d = c / heads;
    if d == 0 || d > MAX_HEAD_DIM {
        return invalid(format!(
            "window_attention: head dim {d} (C {c} / {heads} heads) exceeds {MAX_HEAD_DIM}"
        ));
    }
    if bias.numel() != heads * n {
        return invalid(format!(
            "window_attention: bias {:?} is not [{heads}, {n}]",
            bias.shape
        ));
    }
    let nw = qkv.shape[0];
    let l = |off| Layout {
        off,
        row: 3 * c,
        zs: n * 3 * c,
        hs: 3 * d,
    };
    Ok(Core {
        lq: n,
        lk: n,
        heads,
        nz: nw,
        d,
        q: l(0),
        k: l(d),
        v: l(2 * d),
        o: Layout {
            off: 0,
            row: c,
            zs: n * c,
            hs: d,
        },
        ws,
        scale: (d as f32).powf(-0.5),
    })
}

/// TinyViT windowed multi-head attention. qkv [NW, n, 3C] (n = ws*ws) with the per-head
/// interleaved channel layout: head h owns channels [h*3d, h*3d+3d): q = first d, k = next d, v = last d
/// (d = C/heads). logits[h,i,j] = (q_i . k_j) * d^-0.5 + bias[h, |row_i-row_j|*ws + |col_i-col_j|]
/// (row/col = position inside the ws x ws window); softmax over all n keys (padded zero tokens are NOT
/// masked); out[NW, n, C] with head h's result in channels [h*d, h*d+d).
pub fn window_attention(
    rec: &mut Recorder,
    qkv: &Tensor,
    bias: &Tensor, /*[heads, ws*ws]*/
    win: Window,
) -> Result<Tensor> {
    let c = window_core(qkv, bias, win)?;
    let out = rec.gpu.empty(&[c.nz, c.lq, c.d * win.heads])?;
    let io = FwdIo {
        q: qkv,
        k: qkv,
        v: qkv,
        bias: Some(bias),
        out: &out,
        lse: None,
    };
    core_forward(rec, &c, io)?;
    Ok(out)
}

/// `window_attention` for training: also returns the log-sum-exp per (window, head, query).
pub fn window_attention_train(
    rec: &mut Recorder,
    qkv: &Tensor,
    bias: &Tensor,
    win: Window,
) -> Result<AttnSaved> {
    let c = window_core(qkv, bias, win)?;
    let out = rec.gpu.empty(&[c.nz, c.lq, c.d * win.heads])?;
    let lse = rec.gpu.empty(&[c.nz, win.heads, c.lq])?;
    let io = FwdIo {
        q: qkv,
        k: qkv,
        v: qkv,
        bias: Some(bias),
        out: &out,
        lse: Some(&lse),
    };
    core_forward(rec, &c, io)?;
    Ok(AttnSaved { out, lse })
}

fn check_saved(
    what: &str,
    saved: &AttnSaved,
    dout: &Tensor,
    out_len: usize,
    rows: usize,
) -> Result<()> {
    if saved.out.numel() != out_len || dout.numel() != out_len || saved.lse.numel() != rows {
        return invalid(format!(
            "{what}: saved out {:?} / lse {:?} / dout {:?} do not match the inputs",
            saved.out.shape, saved.lse.shape, dout.shape
        ));
    }
    Ok(())
}

/// Backward of `window_attention`: returns dqkv [NW, n, 3C] (same interleaved layout) and adds the
/// bias gradient, summed over all windows and (query, key) pairs, into `dbias` [heads, ws*ws].
pub fn window_attention_backward(
    rec: &mut Recorder,
    qkv: &Tensor,
    bias: &Tensor,
    saved: &AttnSaved,
    dout: &Tensor,
    win: Window,
    dbias: &Tensor,
) -> Result<Tensor> {
    let c = window_core(qkv, bias, win)?;
    let heads = win.heads;
    check_saved(
        "window_attention_backward",
        saved,
        dout,
        c.nz * c.lq * c.d * heads,
        c.nz * heads * c.lq,
    )?;
    if dbias.numel() != bias.numel() {
        return invalid(format!(
            "window_attention_backward: dbias {:?} vs bias {:?}",
            dbias.shape, bias.shape
        ));
    }
    let dqkv = rec.gpu.empty(&qkv.shape)?;
    let io = BwdIo {
        q: qkv,
        k: qkv,
        v: qkv,
        bias: Some(bias),
        out: &saved.out,
        lse: &saved.lse,
        dout,
        dq: &dqkv,
        kv: KvDest::Shared(&dqkv),
        dbias: Some(dbias),
    };
    core_backward(rec, &c, io)?;
    Ok(dqkv)
}

fn mha_core(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Core> {
    if q.shape.len() != 3 || k.shape.len() != 3 || k.shape != v.shape {
        return invalid(format!(
            "mha: q {:?}, k {:?}, v {:?} are not [B,Lq,E], [B,Lk,E], [B,Lk,E]",
            q.shape, k.shape, v.shape
        ));
    }
    let (b, lq, e) = (q.shape[0], q.shape[1], q.shape[2]);
    let lk = k.shape[1];
    if k.shape[0] != b || k.shape[2] != e || b == 0 || lq == 0 || lk == 0 {
        return invalid(format!("mha: q {:?} vs k/v {:?}", q.shape, k.shape));
    }
    if heads == 0 || !e.is_multiple_of(heads) {
        return invalid(format!("mha: E = {e} is not divisible by {heads} heads"));
    }
    let d = e / heads;
    if d > MAX_HEAD_DIM {
        return invalid(format!("mha: head dim {d} exceeds {MAX_HEAD_DIM}"));
    }
    let lay = |len: usize| Layout {
        off: 0,
        row: e,
        zs: len * e,
        hs: d,
    };
    Ok(Core {
        lq,
        lk,
        heads,
        nz: b,
        d,
        q: lay(lq),
        k: lay(lk),
        v: lay(lk),
        o: lay(lq),
        ws: 0,
        scale: 1.0 / (d as f32).sqrt(),
    })
}

/// SAM attention core (after the q/k/v projections): q [B,Lq,E], k [B,Lk,E], v [B,Lk,E]; heads are
/// contiguous slices of E (c = E/heads); out [B,Lq,E] = per head softmax(q k^T / sqrt(c)) v.
pub fn mha(rec: &mut Recorder, q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    let c = mha_core(q, k, v, heads)?;
    let out = rec.gpu.empty(&q.shape)?;
    let io = FwdIo {
        q,
        k,
        v,
        bias: None,
        out: &out,
        lse: None,
    };
    core_forward(rec, &c, io)?;
    Ok(out)
}

/// `mha` for training: also returns the log-sum-exp per (batch, head, query).
pub fn mha_train(
    rec: &mut Recorder,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
) -> Result<AttnSaved> {
    let c = mha_core(q, k, v, heads)?;
    let out = rec.gpu.empty(&q.shape)?;
    let lse = rec.gpu.empty(&[c.nz, heads, c.lq])?;
    let io = FwdIo {
        q,
        k,
        v,
        bias: None,
        out: &out,
        lse: Some(&lse),
    };
    core_forward(rec, &c, io)?;
    Ok(AttnSaved { out, lse })
}

/// Backward of `mha`: returns (dq, dk, dv) with the shapes of q, k, v.
pub fn mha_backward(
    rec: &mut Recorder,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    saved: &AttnSaved,
    dout: &Tensor,
    heads: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    let c = mha_core(q, k, v, heads)?;
    check_saved("mha_backward", saved, dout, q.numel(), c.nz * heads * c.lq)?;
    let dq = rec.gpu.empty(&q.shape)?;
    let dk = rec.gpu.empty(&k.shape)?;
    let dv = rec.gpu.empty(&v.shape)?;
    let io = BwdIo {
        q,
        k,
        v,
        bias: None,
        out: &saved.out,
        lse: &saved.lse,
        dout,
        dq: &dq,
        kv: KvDest::Separate(&dk, &dv),
        dbias: None,
    };
    core_backward(rec, &c, io)?;
    Ok((dq, dk, dv))
}

// ---------------------------------------------------------------------------------------------
// Benchmarks

/// Windowed attention at the three real stage shapes (1024² image, batch 1), forward and training
/// backward, and the SAM decoder attention shapes. GFLOP/s counts 4*Lq*Lk*d*heads*problems for the
/// forward (QK^T + AV) and 2.5 times that for the backward (QK^T recomputed, dP, dV, dQ, dK).
#[cfg(not(target_arch = "wasm32"))]
pub fn bench(gpu: &crate::gpu::Gpu) -> Result<Vec<super::BenchResult>> {
    use super::{bench_line, time_op};
    let mut rng = crate::rng::Rng::new(7);
    let mut out = Vec::new();
    // (C, heads, ws, H=W)
    for (stage, &(c, heads, ws, hw)) in [
        (128usize, 4usize, 7usize, 128usize),
        (160, 5, 14, 64),
        (320, 10, 7, 64),
    ]
    .iter()
    .enumerate()
    {
        let nw = hw.div_ceil(ws).pow(2);
        let n = ws * ws;
        let qkv = gpu.upload(&rng.vec(nw * n * 3 * c), &[nw, n, 3 * c])?;
        let bias = gpu.upload(&rng.vec(heads * n), &[heads, n])?;
        let flops = 4.0 * (n * n * (c / heads) * heads * nw) as f64;
        let name = format!("stage{} C{c} h{heads} ws{ws} NW{nw}", stage + 1);
        let ms = time_op(gpu, 5, |rec| {
            window_attention(rec, &qkv, &bias, Window { heads, ws }).map(|_| ())
        })?;
        out.push(bench_line(
            format!("window_attention {name}"),
            ms,
            Some(flops),
            None,
        ));
        let saved = {
            let mut rec = gpu.new_recorder();
            let s = window_attention_train(&mut rec, &qkv, &bias, Window { heads, ws })?;
            rec.submit()?;
            s
        };
        let dout = gpu.upload(&rng.vec(nw * n * c), &[nw, n, c])?;
        let dbias = gpu.upload(&vec![0.0; heads * n], &[heads, n])?;
        let ms = time_op(gpu, 3, |rec| {
            window_attention_backward(
                rec,
                &qkv,
                &bias,
                &saved,
                &dout,
                Window { heads, ws },
                &dbias,
            )
            .map(|_| ())
        })?;
        out.push(bench_line(
            format!("window_attention_backward {name}"),
            ms,
            Some(2.5 * flops),
            None,
        ));
    }
    // (E, heads, Lq, Lk)
    for &(e, heads, lq, lk) in &[
        (256usize, 8usize, 5usize, 5usize),
        (128, 8, 5, 4096),
        (128, 8, 4096, 5),
    ] {
        let q = gpu.upload(&rng.vec(lq * e), &[1, lq, e])?;
        let k = gpu.upload(&rng.vec(lk * e), &[1, lk, e])?;
        let v = gpu.upload(&rng.vec(lk * e), &[1, lk, e])?;
        let ms = time_op(gpu, 5, |rec| mha(rec, &q, &k, &v, heads).map(|_| ()))?;
        let flops = 4.0 * (lq * lk * e) as f64;
        out.push(bench_line(
            format!("mha E{e} h{heads} Lq{lq} Lk{lk}"),
            ms,
            Some(flops),
            None,
        ));
    }
    Ok(out)
}
