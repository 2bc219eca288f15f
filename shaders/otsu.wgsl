// ---- otsu.wgsl: Otsu coarse prompt (CP-Encoder) ----
// Three passes per call:
//   otsu_hist   : grey key of every pixel -> 256-bin histogram per image (workgroup atomics, then
//                 one global atomic add per non-empty bin and workgroup).
//   otsu_select : per image (one workgroup): exact cumulative counts, argmax of the between-class
//                 variance with exact multi-word integer comparisons, threshold t*/255.
//   otsu_mask   : per pixel: mask = grey >= t*/255 (paper) or grey > t*/255 (released).
//
// Grey values are never formed in floating point:
//   RULE 0 (paper):    I = 2989 R + 5870 G + 1140 B, grey = I / 2550000 exactly.
//                      bin = floor(I * 256 / 2550000); grey >= t/255  <=>  I >= 10000 t.
//   RULE 1 (released): grey = sum_k w_k (c_k - mean_k) / std_k as a signed 64-bit fixed-point
//                      number in units of 2^-40 (two u32 words), the sum of three per-channel
//                      terms tabulated on the host from exact rationals (error <= 1.5 units,
//                      ~1.4e-12, while no u8 colour lies within 3e-10 of a bin edge or within
//                      1.4e-9 of a threshold t/255). bin = the high word (grey * 256 = G / 2^32);
//                      only 0 <= G <= 2^40 counts; grey > t/255 <=> G > floor(t 2^40 / 255).
//
// Host constants (ot_consts, u32 words; copied by otsu_consts from the uniform parameters into a
// pooled storage buffer, so that nothing needs a dedicated upload):
//   [0, 256)      f32 bits of t/255 (correctly rounded on the host)
//   [256, 1792)   released: table[(k * 256 + v) * 2 + {0 lo, 1 hi}], channel k, value v
//   [1792, 2304)  released: floor(t * 2^40 / 255) as (lo, hi) pairs

override RULE: u32 = 0u;

const C_TAB: u32 = 256u;
const C_THR_FIX: u32 = 1792u;

struct OtsuParams {
    npix: u32,    // pixels per image (H * W)
    batch: u32,
    gpi: u32,     // histogram workgroups per image
    chunk: u32,   // pixels per histogram workgroup (multiple of 256)
}

@group(0) @binding(0) var<uniform> op: OtsuParams;

// otsu_consts: ot_consts_out[i] = host word i.

struct ConstParams {
    n: u32,
    pad0: u32,
    pad1: u32,
    pad2: u32,
    words: array<vec4<u32>, 576>,
}

@group(0) @binding(0) var<uniform> cp: ConstParams;
@group(0) @binding(1) var<storage, read_write> ot_consts_out: array<u32>;

@compute @workgroup_size(256)
fn otsu_consts(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let i = flat_group(wid, nwg) * 256u + lid;
    if (i < cp.n) {
        ot_consts_out[i] = cp.words[i / 4u][i % 4u];
    }
}

// otsu_hist
@group(0) @binding(1) var<storage, read> ot_px: array<u32>;
@group(0) @binding(2) var<storage, read> ot_consts: array<u32>;
@group(0) @binding(3) var<storage, read_write> ot_hist: array<atomic<u32>>;

var<workgroup> wg_hist: array<atomic<u32>, 256>;

// Signed 64-bit fixed-point grey of a packed pixel (released rule): (lo, hi) two's complement.
fn grey_fixed(p: u32) -> vec2<u32> {
    var lo = 0u;
    var hi = 0u;
    for (var k = 0u; k < 3u; k++) {
        let v = (p >> (8u * k)) & 255u;
        let e = C_TAB + (k * 256u + v) * 2u;
        let tlo = ot_consts[e];
        let thi = ot_consts[e + 1u];
        let s = lo + tlo;
        hi = hi + thi + select(0u, 1u, s < lo);
        lo = s;
    }
    return vec2<u32>(lo, hi);
}

fn grey_int(p: u32) -> u32 {
    return 2989u * (p & 255u) + 5870u * ((p >> 8u) & 255u) + 1140u * ((p >> 16u) & 255u);
}

// Histogram bin of a pixel, or 256 when the pixel is outside [0, 1] (released rule only).
fn pixel_bin(p: u32) -> u32 {
    if (RULE == 0u) {
        return (grey_int(p) * 256u) / 2550000u;
    }
    let g = grey_fixed(p);
    if (bitcast<i32>(g.y) < 0) {
        return 256u; // grey < 0
    }
    if (g.y < 256u) {
        return g.y;
    }
    if (g.y == 256u && g.x == 0u) {
        return 255u; // grey == 1 exactly
    }
    return 256u; // grey > 1
}

@compute @workgroup_size(256)
fn otsu_hist(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let flat = flat_group(wid, nwg);
    if (flat >= op.gpi * op.batch) {
        return; // uniform per workgroup
    }
    let b = flat / op.gpi;
    let start = (flat % op.gpi) * op.chunk;
    let stop = min(start + op.chunk, op.npix);
    atomicStore(&wg_hist[lid], 0u);
    workgroupBarrier();
    let base = b * op.npix;
    for (var i = start + lid; i < stop; i += 256u) {
        let bin = pixel_bin(ot_px[base + i]);
        if (bin < 256u) {
            atomicAdd(&wg_hist[bin], 1u);
        }
    }
    workgroupBarrier();
    let c = atomicLoad(&wg_hist[lid]);
    if (c > 0u) {
        atomicAdd(&ot_hist[b * 256u + lid], c);
    }
}

// otsu_select
@group(0) @binding(1) var<storage, read> ot_hist_r: array<u32>;
@group(0) @binding(3) var<storage, read_write> ot_thr: array<f32>;
@group(0) @binding(4) var<storage, read_write> ot_tsel: array<u32>;

var<workgroup> cum_w: array<u32, 256>;
var<workgroup> cum_m: array<u32, 256>;
var<workgroup> best: array<u32, 256>;

// Full 64-bit product of two u32: (lo, hi).
fn mul_wide(a: u32, b: u32) -> vec2<u32> {
    let a0 = a & 0xffffu;
    let a1 = a >> 16u;
    let b0 = b & 0xffffu;
    let b1 = b >> 16u;
    let p00 = a0 * b0;
    let p01 = a0 * b1;
    let p10 = a1 * b0;
    let p11 = a1 * b1;
    let mid = p01 + p10;
    let mid_carry = select(0u, 0x10000u, mid < p01);
    let lo = p00 + (mid << 16u);
    let lo_carry = select(0u, 1u, lo < p00);
    return vec2<u32>(lo, p11 + (mid >> 16u) + mid_carry + lo_carry);
}

// 64-bit helpers on (lo, hi).
fn add64(a: vec2<u32>, b: vec2<u32>) -> vec2<u32> {
    let lo = a.x + b.x;
    return vec2<u32>(lo, a.y + b.y + select(0u, 1u, lo < a.x));
}

fn sub64(a: vec2<u32>, b: vec2<u32>) -> vec2<u32> {
    return vec2<u32>(a.x - b.x, a.y - b.y - select(0u, 1u, a.x < b.x));
}

fn less64(a: vec2<u32>, b: vec2<u32>) -> bool {
    return a.y < b.y || (a.y == b.y && a.x < b.x);
}

// Unsigned multi-word integers, little-endian words.
struct U128 { w: array<u32, 4> }
struct U96 { w: array<u32, 3> }
struct U224 { w: array<u32, 7> }

fn mul64_64(a: vec2<u32>, b: vec2<u32>) -> U128 {
    var r: U128;
    var av = array<u32, 2>(a.x, a.y);
    var bv = array<u32, 2>(b.x, b.y);
    for (var i = 0u; i < 4u; i++) { r.w[i] = 0u; }
    for (var i = 0u; i < 2u; i++) {
        var carry = 0u;
        for (var j = 0u; j < 2u; j++) {
            let p = mul_wide(av[i], bv[j]);
            let t = r.w[i + j] + p.x;
            let c1 = select(0u, 1u, t < p.x);
            let t2 = t + carry;
            let c2 = select(0u, 1u, t2 < t);
            r.w[i + j] = t2;
            carry = p.y + c1 + c2;
        }
        r.w[i + 2u] = carry;
    }
    return r;
}

fn mul128_96(a: U128, b: U96) -> U224 {
    var r: U224;
    for (var i = 0u; i < 7u; i++) { r.w[i] = 0u; }
    for (var i = 0u; i < 4u; i++) {
        var carry = 0u;
        for (var j = 0u; j < 3u; j++) {
            let p = mul_wide(a.w[i], b.w[j]);
            let t = r.w[i + j] + p.x;
            let c1 = select(0u, 1u, t < p.x);
            let t2 = t + carry;
            let c2 = select(0u, 1u, t2 < t);
            r.w[i + j] = t2;
            carry = p.y + c1 + c2;
        }
        r.w[i + 3u] = carry;
    }
    return r;
}

// Compares two 224-bit numbers: -1, 0, 1.
fn cmp224(a: U224, b: U224) -> i32 {
    for (var k = 0; k < 7; k++) {
        let i = 6 - k;
        if (a.w[i] != b.w[i]) {
            return select(-1, 1, a.w[i] > b.w[i]);
        }
    }
    return 0;
}

// sigma^2(t) = 1e8 D^2 / (N^2 den) with D = M_T W - M N and den = 1e8 W (N - W) + N^2, where
// W, M are the cumulative count and cumulative bin-weighted count up to t, N = W(255),
// M_T = M(255). Within one image N is fixed, so sigma^2(a) > sigma^2(b) <=> D_a^2 den_b > D_b^2 den_a.
struct Var { d2: U128, den: U96 }

fn variance_terms(t: u32, n: u32, mt: u32) -> Var {
    let w = cum_w[t];
    let m = cum_m[t];
    let x = mul_wide(mt, w);
    let y = mul_wide(m, n);
    var d = sub64(x, y);
    if (less64(x, y)) {
        d = sub64(y, x);
    }
    var v: Var;
    v.d2 = mul64_64(d, d);
    let q = mul_wide(w, n - w);                 // W (N - W) < 2^48
    let lo = mul_wide(q.x, 100000000u);         // times 1e8 -> 96 bits
    let hi = mul_wide(q.y, 100000000u);
    var den = array<u32, 3>(lo.x, 0u, 0u);
    let mid = add64(vec2<u32>(lo.y, 0u), vec2<u32>(hi.x, hi.y));
    den[1] = mid.x;
    den[2] = mid.y;
    let nn = mul_wide(n, n);
    let s1 = add64(vec2<u32>(den[0], den[1]), nn);
    let c = select(0u, 1u, less64(s1, nn));
    v.den.w[0] = s1.x;
    v.den.w[1] = s1.y;
    v.den.w[2] = den[2] + c;
    return v;
}

// True when candidate c beats candidate a: larger variance, or equal and smaller index.
fn beats(c: u32, a: u32, n: u32, mt: u32) -> bool {
    let vc = variance_terms(c, n, mt);
    let va = variance_terms(a, n, mt);
    let r = cmp224(mul128_96(vc.d2, va.den), mul128_96(va.d2, vc.den));
    return r > 0 || (r == 0 && c < a);
}

@compute @workgroup_size(256)
fn otsu_select(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let b = flat_group(wid, nwg);
    if (b >= op.batch) {
        return; // uniform per workgroup
    }
    let cnt = ot_hist_r[b * 256u + lid];
    cum_w[lid] = cnt;
    cum_m[lid] = cnt * lid;
    workgroupBarrier();
    // Inclusive scans (Hillis-Steele), exact in u32 for up to 2^24 pixels per image.
    for (var off = 1u; off < 256u; off <<= 1u) {
        var aw = 0u;
        var am = 0u;
        if (lid >= off) {
            aw = cum_w[lid - off];
            am = cum_m[lid - off];
        }
        workgroupBarrier();
        cum_w[lid] += aw;
        cum_m[lid] += am;
        workgroupBarrier();
    }
    let n = cum_w[255];
    let mt = cum_m[255];
    best[lid] = lid;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s >>= 1u) {
        if (lid < s) {
            let a = best[lid];
            let c = best[lid + s];
            if (beats(c, a, n, mt)) {
                best[lid] = c;
            }
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        let t = best[0];
        ot_tsel[b] = t;
        ot_thr[b] = bitcast<f32>(ot_consts[t]);
    }
}

// otsu_mask
@group(0) @binding(3) var<storage, read_write> ot_mask: array<f32>;
@group(0) @binding(4) var<storage, read> ot_tsel_r: array<u32>;

@compute @workgroup_size(256)
fn otsu_mask(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let i = flat_group(wid, nwg) * 256u + lid;
    if (i >= op.npix * op.batch) {
        return;
    }
    let b = i / op.npix;
    let t = ot_tsel_r[b];
    let p = ot_px[i];
    var on = false;
    if (RULE == 0u) {
        on = grey_int(p) >= t * 10000u;
    } else {
        let g = grey_fixed(p);
        let thr = vec2<u32>(ot_consts[C_THR_FIX + 2u * t], ot_consts[C_THR_FIX + 2u * t + 1u]);
        on = bitcast<i32>(g.y) >= 0 && less64(thr, g);
    }
    ot_mask[i] = select(0.0, 1.0, on);
}
