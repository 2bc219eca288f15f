//! Plain CPU f64 reference implementations of every kernel, used by the tests. Layouts match the
//! GPU ones: channels-last feature maps, PyTorch weight layouts.

pub mod attention;
pub mod conv;
pub mod loss;
pub mod norm;
pub mod optim;
pub mod otsu;
pub mod pe;
pub mod resize;

/// Exact erf (libm).
pub fn erf(x: f64) -> f64 {
    libm::erf(x)
}

pub fn gelu(x: f64) -> f64 {
    0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2))
}

pub fn gelu_grad(x: f64) -> f64 {
    0.5 * (1.0 + erf(x / std::f64::consts::SQRT_2))
        + x * (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt()
}

pub fn act(x: f64, a: crate::ops::Act) -> f64 {
    match a {
        crate::ops::Act::None => x,
        crate::ops::Act::Gelu => gelu(x),
        crate::ops::Act::Relu => x.max(0.0),
        crate::ops::Act::Sigmoid => 1.0 / (1.0 + (-x).exp()),
    }
}

/// Batched GEMM with the same conventions as `ops::matmul::Gemm`.
pub fn gemm(
    g: &crate::ops::matmul::Gemm,
    a: &[f64],
    b: &[f64],
    bias: Option<&[f64]>,
    residual: Option<&[f64]>,
    c: &mut [f64],
) {
    for bt in 0..g.batch {
        let (ao, bo, co) = (bt * g.a_bs, bt * g.b_bs, bt * g.c_bs);
        for i in 0..g.m {
            for j in 0..g.n {
                let mut s = 0.0;
                for l in 0..g.k {
                    let av = if g.trans_a {
                        a[ao + l * g.m + i]
                    } else {
                        a[ao + i * g.k + l]
                    };
                    let bv = if g.trans_b {
                        b[bo + j * g.k + l]
                    } else {
                        b[bo + l * g.n + j]
                    };
                    s += av * bv;
                }
                let mut v = s * g.alpha as f64;
                if let Some(bias) = bias {
                    v += bias[j];
                }
                v = act(v, g.act);
                let idx = co + i * g.n + j;
                if let Some(r) = residual {
                    v += r[idx];
                }
                if g.accumulate {
                    v += c[idx];
                }
                c[idx] = v;
            }
        }
    }
}
