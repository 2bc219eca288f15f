// ---- pe.wgsl: SAM random-Fourier positional encoding (prompt_encoder.pe_layer) ----
// out[y, x, k] = sin(2 pi (c . G[:, k])), out[y, x, 128 + k] = cos(...), with
// c = ((2x + 1 - w) / w, (2y + 1 - h) / h) (x first) and G = gauss [2, 128].
//
// Accuracy: the argument is reduced in turns before any rounding can grow with it. Each G is
// split into g_hi = m / 2048 (m integer) and a small g_lo = G - g_hi (exact). The part
// n * m / (2048 size) with n = 2x + 1 - size is reduced modulo 1 in exact integer arithmetic; the
// small part n * g_lo / size (|.| <= 2^-12) is added in f32. sin and cos come from Taylor
// polynomials on [-pi/4, pi/4] after an exact quadrant reduction, so the result does not depend
// on the accuracy of the platform's sin/cos (WGSL only promises 2^-11 absolute).

struct PeParams {
    h: u32,
    w: u32,
    n: u32,      // h * w * 128 work items
    pad: u32,
}

@group(0) @binding(0) var<uniform> pp: PeParams;
@group(0) @binding(1) var<storage, read> pe_gauss: array<f32>;
@group(0) @binding(2) var<storage, read_write> pe_out: array<f32>;

// n * g / size in turns, as (centred exact-integer part in [-0.5, 0.5], small remainder).
fn axis_turns(n: i32, g: f32, size: u32) -> vec2<f32> {
    let m = i32(round(g * 2048.0));
    let g_lo = g - f32(m) * 0.00048828125; // exact: m / 2048
    let d = 2048 * i32(size);
    // Truncated remainder, |r| < d, taken on magnitudes: `%` of a negative i32 becomes GLSL's
    // `%`, which GLSL leaves undefined for negative operands (llvmpipe GL got it wrong; found by
    // `medfastsam selftest --all-adapters`).
    let a = n * m;
    var r = i32(u32(abs(a)) % u32(d));
    if (a < 0) {
        r = -r;
    }
    if (2 * r > d) {
        r -= d;
    } else if (2 * r < -d) {
        r += d;
    }
    return vec2<f32>(f32(r) / f32(d), f32(n) * g_lo / f32(size));
}

// sin and cos of 2 pi f for |f| <= 1/8 (Taylor to degree 11 / 12: error < 2e-10).
fn sincos_turns_small(f: f32) -> vec2<f32> {
    let t = f * 6.28318530717958648;
    let t2 = t * t;
    var s = -1.0 / 39916800.0;
    s = s * t2 + 1.0 / 362880.0;
    s = s * t2 - 1.0 / 5040.0;
    s = s * t2 + 1.0 / 120.0;
    s = s * t2 - 1.0 / 6.0;
    s = s * t2 + 1.0;
    var c = 1.0 / 479001600.0;
    c = c * t2 - 1.0 / 3628800.0;
    c = c * t2 + 1.0 / 40320.0;
    c = c * t2 - 1.0 / 720.0;
    c = c * t2 + 1.0 / 24.0;
    c = c * t2 - 0.5;
    c = c * t2 + 1.0;
    return vec2<f32>(t * s, c);
}

@compute @workgroup_size(256)
fn dense_pe(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let i = flat_group(wid, nwg) * 256u + lid;
    if (i >= pp.n) {
        return;
    }
    let k = i % 128u;
    let cell = i / 128u;
    let x = cell % pp.w;
    let y = cell / pp.w;
    let tx = axis_turns(i32(2u * x + 1u) - i32(pp.w), pe_gauss[k], pp.w);
    let ty = axis_turns(i32(2u * y + 1u) - i32(pp.h), pe_gauss[128u + k], pp.h);
    var f = tx.x + ty.x;              // in [-1, 1]
    f = f - round(f);                 // exact, in [-0.5, 0.5]
    f = f + (tx.y + ty.y);
    f = f - round(f);
    let q = round(4.0 * f);           // quadrant, -2..2
    let r = f - 0.25 * q;             // exact, in [-1/8, 1/8]
    let sc = sincos_turns_small(r);
    let qi = (i32(q) + 4) % 4;
    var sn = sc.x;
    var cs = sc.y;
    if (qi == 1) {
        sn = sc.y;
        cs = -sc.x;
    } else if (qi == 2) {
        sn = -sc.x;
        cs = -sc.y;
    } else if (qi == 3) {
        sn = -sc.y;
        cs = sc.x;
    }
    let o = cell * 256u + k;
    pe_out[o] = sn;
    pe_out[o + 128u] = cs;
}
