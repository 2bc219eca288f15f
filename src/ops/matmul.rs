//! Batched GEMM with fused bias / activation / residual epilogue (shaders/matmul.wgsl).
//! Linear layers use PyTorch's weight layout [out, in]: `y = x W^T + b` is `trans_b = true`.
//!
//! Kernel choice ([`plan`]): on CPU adapters (lavapipe / llvmpipe) the register-blocked kernels,
//! `mm_v4` (32 x 32 outputs per invocation, vec4 loads and stores) when A, B and C are 4-aligned
//! along their contiguous dimensions (see [`vec4_ok`]; `mm_v4s`, 32 x 16, on SwiftShader:
//! [`Gpu::small_gemm_blocks`]), else `mm_s` (16 x 16, scalar loads); the
//! 8 invocations of a workgroup step along M or along N, whichever wastes less. Where the device
//! has subgroups of exactly 8 invocations (lavapipe), 4-aligned GEMMs with K % 4 == 0 wider and
//! taller than 32 take `mm_sg` (shaders/matmul_sg.wgsl: 8 x 64 outputs per invocation, the 8 lanes
//! sharing the B block through `subgroupBroadcast`). On other adapters
//! the shared-memory tiled kernel `matmul`. GEMMs with few output tiles and a long K (weight
//! gradients) are split along K into slices whose partial sums a second pass (`mm_reduce`) adds
//! before applying the epilogue. [`gemm_with`] overrides any of these choices.

use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, Kernel, Recorder, ShaderFamily, Tensor};

crate::uniform! {
    /// matmul.wgsl `MatmulParams`.
    struct MatmulParams { m: u32, n: u32, k: u32, batch: u32, a_bs: u32, b_bs: u32, c_bs: u32, m_tiles: u32, alpha: f32, k_len: u32, splits: u32 }
}

/// Fused activation of an epilogue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Act {
    #[default]
    None,
    Gelu,
    Relu,
    /// Logistic sigmoid (probabilities from logits).
    Sigmoid,
}

impl Act {
    pub fn code(self) -> u32 {
        match self {
            Act::None => 0,
            Act::Gelu => 1,
            Act::Relu => 2,
            Act::Sigmoid => 3,
        }
    }
}

/// Shape and epilogue of one batched GEMM.
#[derive(Clone, Copy, Debug)]
pub struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub batch: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    /// Batch strides in elements (0 = the same matrix for every batch entry).
    pub a_bs: usize,
    pub b_bs: usize,
    pub c_bs: usize,
    pub alpha: f32,
    pub act: Act,
    /// Add into the existing contents of the output (gradient accumulation).
    pub accumulate: bool,
    /// Add the residual before the activation: `act(alpha * A B + bias + R)` (default: after it).
    pub act_after_residual: bool,
    /// Backward through an activation: `C = alpha * A B * act'(R)` (`+ C` with `accumulate`), where
    /// the residual R is the saved pre-activation and `act` the activation; no bias.
    pub act_grad: bool,
}

impl Gemm {
    pub fn new(m: usize, n: usize, k: usize) -> Self {
        Gemm {
            m,
            n,
            k,
            batch: 1,
            trans_a: false,
            trans_b: false,
            a_bs: 0,
            b_bs: 0,
            c_bs: m * n,
            alpha: 1.0,
            act: Act::None,
            accumulate: false,
            act_after_residual: false,
            act_grad: false,
        }
    }
    pub fn flops(&self) -> f64 {
        2.0 * self.m as f64 * self.n as f64 * self.k as f64 * self.batch as f64
    }
}

/// Kernel family used by [`gemm_with`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum GemmPath {
    /// Register-blocked kernels on CPU adapters (lavapipe / llvmpipe), the tiled kernel elsewhere.
    #[default]
    Auto,
    /// Shared-memory tiled kernel (64 x 64 tiles of 256 invocations): suits GPUs.
    Tiled,
    /// Register-blocked kernels (8 invocations per workgroup, 32 x 32 outputs each with vec4 loads,
    /// 16 x 16 with scalar loads, no shared memory): suits CPU adapters, whose SIMD lanes load
    /// memory one lane at a time.
    Blocked,
}

/// Overrides of the automatic kernel choice (tests and benchmarks); `Default` = automatic.
#[derive(Clone, Copy, Debug, Default)]
pub struct GemmConfig {
    pub path: GemmPath,
    /// Blocked path: the vec4 kernel (`Some(true)`; an error when [`vec4_ok`] is false) or the
    /// scalar one (`Some(false)`).
    pub vec4: Option<bool>,
    /// Blocked path: the 8 invocations of a workgroup step along N (`true`) or M (`false`).
    pub lanes_n: Option<bool>,
    /// Number of K slices (split-K, summed by a second pass); 1 = none.
    pub splits: Option<usize>,
    /// Blocked vec4 path: the subgroup kernel `mm_sg` (`Some(true)`; an error where the device
    /// has no 8-wide subgroups or the shape does not suit it) or never (`Some(false)`).
    pub subgroup: Option<bool>,
    /// Blocked vec4 path without subgroups: `mm_v4s`, 32 x 16 outputs per invocation
    /// (`Some(true)`), or `mm_v4`, 32 x 32 (`Some(false)`); default: [`Gpu::small_gemm_blocks`].
    pub small: Option<bool>,
}

/// The kernel choice for one GEMM, as made by [`plan`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmPlan {
    /// `matmul` (tiled), `mm_sg`, `mm_v4` or `mm_s` (blocked).
    pub entry: &'static str,
    pub lanes_n: bool,
    pub splits: usize,
    /// Depth of one K slice (a multiple of 16).
    pub k_len: usize,
    pub m_tiles: usize,
    pub n_tiles: usize,
}

/// Blocked kernels: 8 invocations per workgroup, each owning a block of C of these sizes
/// (mm_v4: 32 x 32, mm_v4s: 32 x 16, mm_s: 16 x 16).
const LANES: usize = 8;
const BLK_V4: usize = 32;
const BLK_S: usize = 16;
/// `mm_sg`: the workgroup's 8 lanes stacked along M, each 8 rows x 64 columns.
const SG_ROWS: usize = LANES * 8;
const SG_COLS: usize = 64;
/// Largest split-K scratch buffer the automatic choice allocates.
const SPLIT_SCRATCH_MAX: usize = 16 << 20;

/// Whether the operands of `g` can be read as vec4 along their contiguous dimension and C (and
/// the residual and bias) as vec4 along N: the condition for the `mm_v4` kernel.
pub fn vec4_ok(g: &Gemm) -> bool {
    let x4 = |v: usize| v.is_multiple_of(4);
    let bs_ok = |bs: usize| g.batch <= 1 || x4(bs);
    let a = if g.trans_a { x4(g.m) } else { x4(g.k) } && bs_ok(g.a_bs);
    let b = if g.trans_b { x4(g.k) } else { x4(g.n) } && bs_ok(g.b_bs);
    let c = x4(g.n) && bs_ok(g.c_bs);
    a && b && c && g.k > 0
}

/// Chooses the kernel, lane orientation and K split for `g` on `gpu`.
pub fn plan(gpu: &Gpu, g: &Gemm, cfg: &GemmConfig) -> Result<GemmPlan> {
    let blocked = match cfg.path {
        GemmPath::Auto => gpu.info.device_type == wgpu::DeviceType::Cpu,
        GemmPath::Tiled => false,
        GemmPath::Blocked => true,
    };
    let (m, n) = (g.m, g.n);
    let (entry, lanes_n, m_tiles, n_tiles) = if blocked {
        let aligned = vec4_ok(g);
        let vec4 = match cfg.vec4 {
            Some(true) if !aligned => {
                return Err(Error::Invalid(format!(
                    "gemm: the vec4 kernel needs 4-aligned A, B and C: {g:?}"
                )));
            }
            Some(v) => v,
            None => aligned,
        };
        let sg_ok = vec4 && g.k.is_multiple_of(4) && gpu.subgroups_of_8();
        let sg = match cfg.subgroup {
            Some(true) if !sg_ok => {
                return Err(Error::Invalid(format!(
                    "gemm: the subgroup kernel needs 8-wide subgroups (this device: {}), 4-aligned operands and K % 4 == 0: {g:?}",
                    if gpu.subgroups_of_8() { "yes" } else { "no" }
                )));
            }
            Some(v) => v,
            None => sg_ok && cfg.lanes_n.is_none() && sg_suits(g),
        };
        if sg {
            return finish_plan(
                g,
                cfg,
                true,
                ("mm_sg", false, m.div_ceil(SG_ROWS), n.div_ceil(SG_COLS)),
            );
        }
        let small = vec4 && cfg.small.unwrap_or_else(|| gpu.small_gemm_blocks());
        // The kernel and the rows x columns of one invocation's block.
        let (entry, rows, cols) = match (vec4, small) {
            (true, false) => ("mm_v4", BLK_V4, BLK_V4),
            (true, true) => ("mm_v4s", BLK_V4, BLK_S),
            (false, _) => ("mm_s", BLK_S, BLK_S),
        };
        // Lanes along the dimension that leaves fewer partly filled workgroups.
        let groups_m = m.div_ceil(LANES * rows) * n.div_ceil(cols);
        let groups_n = m.div_ceil(rows) * n.div_ceil(LANES * cols);
        let lanes_n = cfg.lanes_n.unwrap_or(groups_n < groups_m);
        let (mt, nt) = if lanes_n {
            (m.div_ceil(rows), n.div_ceil(LANES * cols))
        } else {
            (m.div_ceil(LANES * rows), n.div_ceil(cols))
        };
        (entry, lanes_n, mt, nt)
    } else {
        ("matmul", false, m.div_ceil(64), n.div_ceil(64))
    };
    finish_plan(g, cfg, blocked, (entry, lanes_n, m_tiles, n_tiles))
}

/// Whether the automatic choice takes `mm_sg` (a 64 x 64 tile per workgroup) for `g`.
fn sg_suits(g: &Gemm) -> bool {
    g.n > BLK_V4 && g.m > BLK_V4
}

/// Adds the K split to a kernel choice (entry, lanes along N, row tiles, column tiles).
fn finish_plan(
    g: &Gemm,
    cfg: &GemmConfig,
    blocked: bool,
    (entry, lanes_n, m_tiles, n_tiles): (&'static str, bool, usize, usize),
) -> Result<GemmPlan> {
    let groups = m_tiles * n_tiles * g.batch;
    let splits = match cfg.splits {
        Some(s) => s.max(1),
        None => {
            // Few output tiles over a long K (weight gradients dW = dY^T X): slice K so that enough
            // workgroups run, each slice at least 512 deep, within a bounded scratch buffer.
            let target = if blocked { 16 } else { 128 };
            let by_mem = (SPLIT_SCRATCH_MAX / (4 * g.m * g.n * g.batch).max(1)).max(1);
            if groups < target && g.k >= 1024 {
                target.div_ceil(groups).min(g.k / 512).min(by_mem).max(1)
            } else {
                1
            }
        }
    };
    let k_len = g.k.div_ceil(splits).max(1).next_multiple_of(16);
    let splits = g.k.div_ceil(k_len).max(1);
    Ok(GemmPlan {
        entry,
        lanes_n,
        splits,
        k_len,
        m_tiles,
        n_tiles,
    })
}

/// Operands of one GEMM: A, B, the optional epilogue bias (`n` values) and residual (C's
/// shape), and the output C.
#[derive(Clone, Copy)]
pub struct GemmIo<'a> {
    pub a: &'a Tensor,
    pub b: &'a Tensor,
    pub bias: Option<&'a Tensor>,
    pub residual: Option<&'a Tensor>,
    pub c: &'a Tensor,
}

/// Records `c = epilogue(alpha * op(a) op(b))`. `bias` has `n` values; `residual` has c's shape.
pub fn gemm(
    rec: &mut Recorder,
    g: &Gemm,
    a: &Tensor,
    b: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
    c: &Tensor,
) -> Result<()> {
    let io = GemmIo {
        a,
        b,
        bias,
        residual,
        c,
    };
    gemm_with(rec, g, io, &GemmConfig::default())
}

/// [`gemm`] with explicit kernel choices.
pub fn gemm_with(rec: &mut Recorder, g: &Gemm, io: GemmIo, cfg: &GemmConfig) -> Result<()> {
    gemm_impl(rec, g, io, None, cfg)
}

/// [`gemm`] that also stores the pre-activation `alpha * op(a) op(b) + bias` to `pre` (what the
/// backward of the activation needs); no residual (`io.residual` must be `None`).
pub fn gemm_save_pre(
    rec: &mut Recorder,
    g: &Gemm,
    io: GemmIo,
    pre: &Tensor,
    cfg: &GemmConfig,
) -> Result<()> {
    gemm_impl(rec, g, io, Some(pre), cfg)
}

fn gemm_impl(
    rec: &mut Recorder,
    g: &Gemm,
    io: GemmIo,
    pre: Option<&Tensor>,
    cfg: &GemmConfig,
) -> Result<()> {
    let GemmIo {
        a,
        b,
        bias,
        residual,
        c,
    } = io;
    if g.act_grad && (residual.is_none() || bias.is_some() || g.act == Act::None || pre.is_some()) {
        return Err(Error::Invalid(format!(
            "gemm: act_grad needs the pre-activation as residual, an activation, no bias and no saved pre-activation: {g:?}"
        )));
    }
    if pre.is_some() && residual.is_some() {
        return Err(Error::Invalid(
            "gemm: saving the pre-activation excludes a residual".into(),
        ));
    }
    let need = |t: &Tensor, n: usize, what: &str| -> Result<()> {
        if t.numel() < n {
            Err(Error::Invalid(format!(
                "gemm: {what} has {} elements, needs {n}",
                t.numel()
            )))
        } else {
            Ok(())
        }
    };
    let last = |bs: usize, per: usize| {
        if bs == 0 {
            per
        } else {
            bs * (g.batch - 1) + per
        }
    };
    need(a, last(g.a_bs, g.m * g.k), "A")?;
    need(b, last(g.b_bs, g.k * g.n), "B")?;
    need(c, last(g.c_bs, g.m * g.n), "C")?;
    if let Some(bias) = bias {
        need(bias, g.n, "bias")?;
    }
    if let Some(r) = residual {
        need(r, last(g.c_bs, g.m * g.n), "residual")?;
    }
    if let Some(p) = pre {
        need(p, last(g.c_bs, g.m * g.n), "pre-activation output")?;
    }
    if g.m == 0 || g.n == 0 || g.batch == 0 {
        return Ok(());
    }
    let p = plan(rec.gpu, g, cfg)?;
    let max_dim = rec.gpu.limits.max_compute_workgroups_per_dimension as usize;
    if p.n_tiles > max_dim {
        return Err(Error::Invalid(format!(
            "gemm: N = {} needs {} column tiles (> {max_dim})",
            g.n, p.n_tiles
        )));
    }
    let invocations = if p.entry == "matmul" {
        256
    } else {
        LANES as u32
    };
    let split = p.splits > 1;
    use super::u;
    let params = MatmulParams {
        m: u(g.m),
        n: u(g.n),
        k: u(g.k),
        batch: u(g.batch),
        a_bs: u(g.a_bs),
        b_bs: u(g.b_bs),
        c_bs: u(g.c_bs),
        m_tiles: u(p.m_tiles),
        alpha: g.alpha,
        k_len: u(p.k_len),
        splits: u(p.splits),
    };
    let yz = rec.grid(p.m_tiles * g.batch * p.splits);
    let groups = [p.n_tiles as u32, yz[0], yz[1]];
    let dummy = rec.gpu.dummy();
    let dummy_out = rec.gpu.dummy_out();
    rec.flops += g.flops();
    let family = match (p.entry == "mm_sg", b.dtype() == DType::F16) {
        (true, false) => ShaderFamily::MatmulSg,
        (true, true) => ShaderFamily::MatmulSgH,
        (false, false) => ShaderFamily::Matmul,
        (false, true) => ShaderFamily::MatmulH,
    };
    if !split {
        let k = Kernel::new(family, p.entry, invocations)
            .b("TRANS_A", g.trans_a)
            .b("TRANS_B", g.trans_b)
            .b("HAS_BIAS", bias.is_some())
            .u("ACT", g.act.code())
            .b("RESIDUAL", residual.is_some())
            .b("ACCUM", g.accumulate)
            .b("ACT_AFTER_RES", g.act_after_residual)
            .b("LANES_N", p.lanes_n)
            .b("SAVE_PRE", pre.is_some())
            .b("ACT_GRAD", g.act_grad);
        let t = [
            a,
            b,
            bias.unwrap_or(&dummy),
            residual.unwrap_or(&dummy),
            c,
            pre.unwrap_or(&dummy_out),
        ];
        return rec.dispatch(&k, params, &t, groups);
    }
    // Split-K: raw partial sums of every K slice into a scratch tensor, then one pass that adds
    // them and applies alpha and the epilogue.
    let scratch = rec.gpu.empty(&[p.splits * g.batch * g.m * g.n])?;
    let k = Kernel::new(family, p.entry, invocations)
        .b("TRANS_A", g.trans_a)
        .b("TRANS_B", g.trans_b)
        .b("LANES_N", p.lanes_n)
        .b("SPLIT", true);
    rec.dispatch(
        &k,
        params,
        &[a, b, &dummy, &dummy, &scratch, &dummy_out],
        groups,
    )?;
    let r = Kernel::new(ShaderFamily::Matmul, "mm_reduce", 256)
        .b("HAS_BIAS", bias.is_some())
        .u("ACT", g.act.code())
        .b("RESIDUAL", residual.is_some())
        .b("ACCUM", g.accumulate)
        .b("ACT_AFTER_RES", g.act_after_residual)
        .b("SAVE_PRE", pre.is_some())
        .b("ACT_GRAD", g.act_grad);
    let groups = rec.grid((g.batch * g.m * g.n).div_ceil(256));
    let t = [
        &scratch,
        bias.unwrap_or(&dummy),
        residual.unwrap_or(&dummy),
        c,
        pre.unwrap_or(&dummy_out),
    ];
    rec.dispatch(&r, params, &t, groups)
}

/// `y = act(x W^T + b) (+ residual)` over the last dimension of `x`; `w` is [out, in].
pub fn linear(
    rec: &mut Recorder,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    act: Act,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let ep = LinearEpilogue {
        act,
        residual,
        act_after_residual: false,
        pre: None,
    };
    linear_impl(rec, "linear", x, w, b, ep)
}

/// `y = act(x W^T + b + residual)` over the last dimension of `x` (`w` is [out, in]): the
/// residual added before the activation, e.g. MBConv's `GELU(x + BN(conv1x1(..)))`.
pub fn linear_residual_act(
    rec: &mut Recorder,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    residual: &Tensor,
    act: Act,
) -> Result<Tensor> {
    let ep = LinearEpilogue {
        act,
        residual: Some(residual),
        act_after_residual: true,
        pre: None,
    };
    linear_impl(rec, "linear_residual_act", x, w, b, ep)
}

/// Epilogue of a linear layer: activation, residual (added before the activation with
/// `act_after_residual`), and where to save the pre-activation (no residual then).
struct LinearEpilogue<'a> {
    act: Act,
    residual: Option<&'a Tensor>,
    act_after_residual: bool,
    pre: Option<&'a Tensor>,
}

fn linear_impl(
    rec: &mut Recorder,
    what: &str,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    ep: LinearEpilogue,
) -> Result<Tensor> {
    let LinearEpilogue {
        act,
        residual,
        act_after_residual,
        pre,
    } = ep;
    let (n, k) = (w.shape[0], w.shape[1]);
    if x.dim(-1) != k {
        return Err(Error::Invalid(format!(
            "{what}: input {:?} vs weight {:?}",
            x.shape, w.shape
        )));
    }
    let m = x.numel() / k;
    let mut shape = x.shape.clone();
    *shape.last_mut().unwrap() = n;
    let y = rec.gpu.empty(&shape)?;
    let mut g = Gemm::new(m, n, k);
    g.trans_b = true;
    g.act = act;
    g.act_after_residual = act_after_residual;
    match pre {
        Some(p) => {
            let io = GemmIo {
                a: x,
                b: w,
                bias: b,
                residual: None,
                c: &y,
            };
            gemm_save_pre(rec, &g, io, p, &GemmConfig::default())?
        }
        None => gemm(rec, &g, x, w, b, residual, &y)?,
    }
    Ok(y)
}

/// `y = act(x W^T + b)` and the pre-activation `x W^T + b` (for the activation's backward).
pub fn linear_save_pre(
    rec: &mut Recorder,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    act: Act,
) -> Result<(Tensor, Tensor)> {
    let mut shape = x.shape.clone();
    *shape.last_mut().unwrap() = w.shape[0];
    let pre = rec.gpu.empty(&shape)?;
    let ep = LinearEpilogue {
        act,
        residual: None,
        act_after_residual: false,
        pre: Some(&pre),
    };
    let y = linear_impl(rec, "linear_save_pre", x, w, b, ep)?;
    Ok((y, pre))
}

/// GEMM shapes of the model (M = tokens, weights [N, K] with `trans_b` unless noted) plus the
/// 1024^3 reference points, as (name, m, n, k, trans_a, trans_b).
pub const BENCH_SHAPES: &[(&str, usize, usize, usize, bool, bool)] = &[
    ("1024^3 A.B^T", 1024, 1024, 1024, false, true),
    ("1024^3 A.B", 1024, 1024, 1024, false, false),
    ("1024^3 A^T.B", 1024, 1024, 1024, true, false),
    ("mbconv expand M65536 K64 N256", 65536, 256, 64, false, true),
    (
        "mbconv project M65536 K256 N64",
        65536,
        64,
        256,
        false,
        true,
    ),
    ("qkv s1 M17689 K128 N384", 17689, 384, 128, false, true),
    ("mlp1 s1 M16384 K128 N512", 16384, 512, 128, false, true),
    ("mlp2 s1 M16384 K512 N128", 16384, 128, 512, false, true),
    ("s2 M4900 K160 N480", 4900, 480, 160, false, true),
    ("s2 M4096 K160 N640", 4096, 640, 160, false, true),
    ("s3 M4900 K320 N960", 4900, 960, 320, false, true),
    ("mlp1 s3 M4096 K320 N1280", 4096, 1280, 320, false, true),
    ("mlp2 s3 M4096 K1280 N320", 4096, 320, 1280, false, true),
    (
        "neck 3x3 im2col M4096 K2304 N256",
        4096,
        256,
        2304,
        false,
        true,
    ),
    (
        "stem conv im2col M65536 K288 N64",
        65536,
        64,
        288,
        false,
        true,
    ),
    (
        "stem conv1 im2col M262144 K27 N32",
        262144,
        32,
        27,
        false,
        true,
    ),
    ("mask head M65536 K32 N1", 65536, 1, 32, false, true),
    ("decoder proj M4096 K256 N128", 4096, 128, 256, false, true),
    ("M5 K256 N2048", 5, 2048, 256, false, true),
    (
        "dX=dY.W M4096 K1280 N320 (A.B)",
        4096,
        320,
        1280,
        false,
        false,
    ),
    (
        "dW=dY^T.X M128 N512 K65536 (A^T.B)",
        128,
        512,
        65536,
        true,
        false,
    ),
];

/// Times [`gemm`] (automatic kernel choice) at [`BENCH_SHAPES`].
#[cfg(not(target_arch = "wasm32"))]
pub fn bench(gpu: &Gpu) -> Result<Vec<crate::ops::BenchResult>> {
    bench_shapes(gpu, BENCH_SHAPES, &GemmConfig::default())
}

/// Times [`gemm_with`] at the given shapes (median of several calls; A and B random).
#[cfg(not(target_arch = "wasm32"))]
pub fn bench_shapes(
    gpu: &Gpu,
    shapes: &[(&str, usize, usize, usize, bool, bool)],
    cfg: &GemmConfig,
) -> Result<Vec<crate::ops::BenchResult>> {
    use crate::ops::{bench_line, time_op};
    let mut out = Vec::new();
    for &(name, m, n, k, ta, tb) in shapes {
        let mut rng = crate::rng::Rng::new(1);
        let mut g = Gemm::new(m, n, k);
        g.trans_a = ta;
        g.trans_b = tb;
        let a = gpu.upload(&rng.vec(m * k), &[m * k])?;
        let b = gpu.upload(&rng.vec(k * n), &[k * n])?;
        let c = gpu.empty(&[m, n])?;
        let reps = if g.flops() > 2e9 { 3 } else { 5 };
        let ms = time_op(gpu, reps, |rec| {
            let io = GemmIo {
                a: &a,
                b: &b,
                bias: None,
                residual: None,
                c: &c,
            };
            gemm_with(rec, &g, io, cfg)
        })?;
        let p = plan(gpu, &g, cfg)?;
        let label = format!(
            "gemm {name} [{}{}{}]",
            p.entry,
            if p.lanes_n { " lanesN" } else { "" },
            if p.splits > 1 {
                format!(" split{}", p.splits)
            } else {
                String::new()
            }
        );
        out.push(bench_line(label, ms, Some(g.flops()), None));
    }
    Ok(out)
}
