//! Batched GEMM with fused bias / activation / residual epilogue (shaders/matmul.wgsl).
//! Linear layers use PyTorch's weight layout [out, in]: `y = x W^T + b` is `trans_b = true`.

use crate::error::{Error, Result};
use crate::gpu::{Kernel, Params, Recorder, ShaderFamily, Tensor};

/// Fused activation of an epilogue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Act {
    #[default]
    None,
    Gelu,
    Relu,
}

impl Act {
    pub fn code(self) -> u32 {
        match self {
            Act::None => 0,
            Act::Gelu => 1,
            Act::Relu => 2,
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
        }
    }
    pub fn flops(&self) -> f64 {
        2.0 * self.m as f64 * self.n as f64 * self.k as f64 * self.batch as f64
    }
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
    let need = |t: &Tensor, n: usize, what: &str| -> Result<()> {
        if t.numel() < n {
            Err(Error::Invalid(format!("gemm: {what} has {} elements, needs {n}", t.numel())))
        } else {
            Ok(())
        }
    };
    let last = |bs: usize, per: usize| if bs == 0 { per } else { bs * (g.batch - 1) + per };
    need(a, last(g.a_bs, g.m * g.k), "A")?;
    need(b, last(g.b_bs, g.k * g.n), "B")?;
    need(c, last(g.c_bs, g.m * g.n), "C")?;
    if let Some(bias) = bias {
        need(bias, g.n, "bias")?;
    }
    if let Some(r) = residual {
        need(r, last(g.c_bs, g.m * g.n), "residual")?;
    }
    if g.m == 0 || g.n == 0 || g.batch == 0 {
        return Ok(());
    }
    let k = Kernel::new(ShaderFamily::Matmul, "matmul", 256)
        .b("TRANS_A", g.trans_a)
        .b("TRANS_B", g.trans_b)
        .b("HAS_BIAS", bias.is_some())
        .u("ACT", g.act.code())
        .b("RESIDUAL", residual.is_some())
        .b("ACCUM", g.accumulate);
    let m_tiles = g.m.div_ceil(64);
    let n_tiles = g.n.div_ceil(64);
    let yz = rec.grid(m_tiles * g.batch);
    let p = Params::new()
        .u(g.m)
        .u(g.n)
        .u(g.k)
        .u(g.batch)
        .u(g.a_bs)
        .u(g.b_bs)
        .u(g.c_bs)
        .u(m_tiles)
        .f(g.alpha);
    let dummy = rec.gpu.dummy();
    rec.flops += g.flops();
    rec.dispatch(
        &k,
        p,
        &[a, b, bias.unwrap_or(&dummy), residual.unwrap_or(&dummy), c],
        [n_tiles as u32, yz[0], yz[1]],
    )
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
    let (n, k) = (w.shape[0], w.shape[1]);
    let kin = x.dim(-1);
    if kin != k {
        return Err(Error::Invalid(format!("linear: input {:?} vs weight {:?}", x.shape, w.shape)));
    }
    let m = x.numel() / k;
    let mut shape = x.shape.clone();
    *shape.last_mut().unwrap() = n;
    let y = rec.gpu.empty(&shape)?;
    let mut g = Gemm::new(m, n, k);
    g.trans_b = true;
    g.act = act;
    gemm(rec, &g, x, w, b, residual, &y)?;
    Ok(y)
}

/// Micro-benchmarks (replaced by the tuned set on the matmul branch).
#[cfg(not(target_arch = "wasm32"))]
pub fn bench(gpu: &crate::gpu::Gpu) -> Result<Vec<super::BenchResult>> {
    let mut out = Vec::new();
    for &(m, n, k) in &[(1024usize, 1024usize, 1024usize)] {
        let a = gpu.empty(&[m, k])?;
        let b = gpu.empty(&[n, k])?;
        let c = gpu.empty(&[m, n])?;
        let mut g = Gemm::new(m, n, k);
        g.trans_b = true;
        let ms = super::time_op(gpu, 5, |rec| gemm(rec, &g, &a, &b, None, None, &c))?;
        out.push(super::bench_line(format!("gemm {m}x{k} . ({n}x{k})^T"), ms, Some(g.flops()), None));
    }
    Ok(out)
}
