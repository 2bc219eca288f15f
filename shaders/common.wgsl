// ---- common.wgsl: helpers shared by every shader family (prepended to each module) ----

// Flat workgroup index for grids split over x and y (Recorder::grid keeps each axis <= 65535).
fn flat_group(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}

const SQRT1_2: f32 = 0.70710678118654752;
const INV_SQRT_2PI: f32 = 0.39894228040143268;

// erfc for z >= 0: Chebyshev fit with relative error < 1.1e-7 everywhere (checked in f64).
fn erfc_pos(z: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.5 * z);
    var p = 0.17087277;
    p = p * t - 0.82215223;
    p = p * t + 1.48851587;
    p = p * t - 1.13520398;
    p = p * t + 0.27886807;
    p = p * t - 0.18628806;
    p = p * t + 0.09678418;
    p = p * t + 0.37409196;
    p = p * t + 1.00002368;
    p = p * t - 1.26551223;
    return t * exp(p - z * z);
}

// Standard normal CDF, accurate in relative terms in both tails: 0.5 * erfc(|z|) on the side of
// the sign, 1 - that on the other (no branch: SIMD lanes on both sides of |z| = 0.5 would run both).
fn phi_cdf(x: f32) -> f32 {
    let z = x * SQRT1_2;
    let h = 0.5 * erfc_pos(abs(z));
    return select(1.0 - h, h, z < 0.0);
}

// Exact (erf) GELU: x * Phi(x).
fn gelu(x: f32) -> f32 {
    return x * phi_cdf(x);
}

// d/dx gelu(x) = Phi(x) + x * phi(x).
fn gelu_grad(x: f32) -> f32 {
    return phi_cdf(x) + x * INV_SQRT_2PI * exp(-0.5 * x * x);
}

// Logistic sigmoid, stable for large |x|.
fn sigmoid(x: f32) -> f32 {
    if (x >= 0.0) {
        return 1.0 / (1.0 + exp(-x));
    }
    let e = exp(x);
    return e / (1.0 + e);
}

// Activation codes used by fused epilogues: 0 identity, 1 GELU, 2 ReLU, 3 sigmoid.
fn activate(x: f32, act: u32) -> f32 {
    if (act == 1u) {
        return gelu(x);
    }
    if (act == 2u) {
        return max(x, 0.0);
    }
    if (act == 3u) {
        return sigmoid(x);
    }
    return x;
}

fn activate4(v: vec4<f32>, act: u32) -> vec4<f32> {
    return vec4(activate(v.x, act), activate(v.y, act), activate(v.z, act), activate(v.w, act));
}

// d activate(x, act) / dx given the pre-activation x.
fn activate_grad(x: f32, act: u32) -> f32 {
    if (act == 1u) {
        return gelu_grad(x);
    }
    if (act == 2u) {
        return select(0.0, 1.0, x > 0.0);
    }
    if (act == 3u) {
        let s = sigmoid(x);
        return s * (1.0 - s);
    }
    return 1.0;
}

fn activate_grad4(v: vec4<f32>, act: u32) -> vec4<f32> {
    return vec4(activate_grad(v.x, act), activate_grad(v.y, act), activate_grad(v.z, act), activate_grad(v.w, act));
}
