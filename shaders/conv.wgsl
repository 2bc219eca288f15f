// ---- conv.wgsl: im2col / col2im for GEMM-based dense convolution, depthwise convolution,
// pixel (un)shuffle for the 2x2 stride-2 transposed convolution, row reductions for weight and
// bias gradients. Feature maps are channels-last (B, H, W, C); weights keep PyTorch layouts.
//
// Every kernel runs one invocation per element of `cp.n` (1-D work over `rec.grid`), 256 per
// workgroup, and uses the fields of ConvParams documented at its entry point.

override ACT: u32 = 0u;        // fused activation (common.wgsl `activate`)
override HAS_BIAS: bool = false;
override ACCUM: bool = false;  // sum_rows: add into the output instead of overwriting it

struct ConvParams {
    n: u32,       // invocations doing work (elements covered by this dispatch)
    bsz: u32,     // batch
    h: u32,       // input height
    w: u32,       // input width
    c: u32,       // input channels
    oh: u32,      // output height
    ow: u32,      // output width
    co: u32,      // output channels
    k: u32,       // square kernel size
    stride: u32,
    pad: u32,
    row0: u32,    // im2col/col2im: first output position (row of the column matrix) of the chunk
    rows: u32,    // im2col/col2im: positions in the chunk; sum_rows: rows R; dw partial: positions M
    kc: u32,      // im2col/col2im: columns K = c*k*k; sum_rows: columns C
    e0: u32,      // sum_rows: rows per block; dw partial: positions per block
    e1: u32,      // sum_rows: output column remap (0 = identity, see sum_rows)
}

@group(0) @binding(0) var<uniform> cp: ConvParams;

fn cv_index(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return flat_group(wid, nwg) * 256u + lid;
}

// ---------------------------------------------------------------------------------------------
// im2col_row: col[r, j] (r < rows, j < kc) for output position m = row0 + r = (b, oy, ox) and
// column j = (ci, ky, kx) = ci*k*k + ky*k + kx (the row-major order of a [Co, Ci, k, k] weight),
// i.e. x[b, oy*stride - pad + ky, ox*stride - pad + kx, ci], zero outside the image, in rows of
// e0 >= kc floats with the columns kc .. e0 zero (K padded to a multiple of 4 lets the GEMM use its
// vec4 kernel). One invocation per row r of the chunk (n = rows) keeps the index arithmetic
// (integer divisions are slow on CPU adapters) out of the inner loops.
@group(0) @binding(1) var<storage, read> i2c_x: array<f32>;
@group(0) @binding(2) var<storage, read_write> i2c_col: array<f32>;

@compute @workgroup_size(64)
fn im2col_row(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let r = flat_group(wid, nwg) * 64u + lid;
    if (r >= cp.n) { return; }
    let m = cp.row0 + r;
    let ox = m % cp.ow;
    let q = m / cp.ow;
    let oy = q % cp.oh;
    let b = q / cp.oh;
    let y0 = i32(oy * cp.stride) - i32(cp.pad);
    let x0 = i32(ox * cp.stride) - i32(cp.pad);
    var o = r * cp.e0;
    for (var ci = 0u; ci < cp.c; ci++) {
        for (var ky = 0u; ky < cp.k; ky++) {
            let iy = y0 + i32(ky);
            let row_ok = iy >= 0 && iy < i32(cp.h);
            let row = (b * cp.h + u32(clamp(iy, 0, i32(cp.h) - 1))) * cp.w;
            for (var kx = 0u; kx < cp.k; kx++) {
                let ix = x0 + i32(kx);
                let ok = row_ok && ix >= 0 && ix < i32(cp.w);
                let v = i2c_x[(row + u32(clamp(ix, 0, i32(cp.w) - 1))) * cp.c + ci];
                i2c_col[o] = select(0.0, v, ok);
                o += 1u;
            }
        }
    }
    for (var j = cp.kc; j < cp.e0; j++) {
        i2c_col[r * cp.e0 + j] = 0.0;
    }
}

// im2col4: im2col for C % 4 == 0 with the column order (ky, kx, ci), i.e. row r is
// the k x k x C input patch in memory order, copied as vec4s (one invocation per row, n = rows).
// The weight is re-ordered to [Co, k, k, Ci] to match (w_reorder).
@group(0) @binding(1) var<storage, read> i2c4_x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> i2c4_col: array<vec4<f32>>;

@compute @workgroup_size(64)
fn im2col4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) lid: u32) {
    let r = flat_group(wid, nwg) * 64u + lid;
    if (r >= cp.n) { return; }
    let c4 = cp.c / 4u;
    let m = cp.row0 + r;
    let ox = m % cp.ow;
    let q = m / cp.ow;
    let oy = q % cp.oh;
    let b = q / cp.oh;
    let y0 = i32(oy * cp.stride) - i32(cp.pad);
    let x0 = i32(ox * cp.stride) - i32(cp.pad);
    var o = r * (cp.kc / 4u);
    for (var ky = 0u; ky < cp.k; ky++) {
        let iy = y0 + i32(ky);
        let row_ok = iy >= 0 && iy < i32(cp.h);
        let row = (b * cp.h + u32(clamp(iy, 0, i32(cp.h) - 1))) * cp.w;
        for (var kx = 0u; kx < cp.k; kx++) {
            let ix = x0 + i32(kx);
            let ok = row_ok && ix >= 0 && ix < i32(cp.w);
            let src = (row + u32(clamp(ix, 0, i32(cp.w) - 1))) * c4;
            for (var cq = 0u; cq < c4; cq++) {
                i2c4_col[o + cq] = select(vec4(0.0), i2c4_x[src + cq], ok);
            }
            o += c4;
        }
    }
}

// w_reorder: a dense conv weight w [Co, Ci, k, k] and its GEMM copy g [Co, e0] (one invocation per
// (co, ci), n = Co*Ci), with g's columns j = t*Ci + ci (KHWC: the column order of im2col4) or
// j = ci*k*k + t (t = ky*k + kx). Forward (!BACK): g[co, j] = w[co, ci, t], and the columns
// kc .. e0 of a padded copy zero (written by the ci == Ci - 1 invocation). BACK: w[co, ci, t] +=
// g[co, j] (a weight gradient computed against the copy, added to the weight's gradient).
override KHWC: bool = true;
override BACK: bool = false;
@group(0) @binding(1) var<storage, read> wr_src: array<f32>;
@group(0) @binding(2) var<storage, read_write> wr_dst: array<f32>;

@compute @workgroup_size(64)
fn w_reorder(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let i = flat_group(wid, nwg) * 64u + lid;
    if (i >= cp.n) { return; }
    let ci = i % cp.c;
    let co = i / cp.c;
    let kk = cp.k * cp.k;
    for (var t = 0u; t < kk; t++) {
        let j = co * cp.e0 + select(ci * kk + t, t * cp.c + ci, KHWC);
        if (BACK) {
            wr_dst[i * kk + t] += wr_src[j];
        } else {
            wr_dst[j] = wr_src[i * kk + t];
        }
    }
    if (!BACK && ci == cp.c - 1u) {
        for (var j = cp.kc; j < cp.e0; j++) {
            wr_dst[co * cp.e0 + j] = 0.0;
        }
    }
}

// col2im (gather form, accumulating): dx[b, iy, ix, ci] += sum of dcol[m - row0, (ci, ky, kx)]
// over the taps whose output position m = (b, oy, ox) lies in [row0, row0 + rows), where
// iy = oy*stride - pad + ky and ix = ox*stride - pad + kx. One invocation per dx element.
@group(0) @binding(1) var<storage, read> c2i_col: array<f32>;
@group(0) @binding(2) var<storage, read_write> c2i_dx: array<f32>;

@compute @workgroup_size(256)
fn col2im(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let i = cv_index(wid, nwg, lid);
    if (i >= cp.n) { return; }
    let ci = i % cp.c;
    let q = i / cp.c;
    let ix = q % cp.w;
    let q2 = q / cp.w;
    let iy = q2 % cp.h;
    let b = q2 / cp.h;
    let kk = cp.k * cp.k;
    let s = i32(cp.stride);
    var acc = 0.0;
    for (var ky = 0u; ky < cp.k; ky++) {
        let ty = i32(iy + cp.pad) - i32(ky);
        if (ty < 0 || ty % s != 0) { continue; }
        let oy = u32(ty / s);
        if (oy >= cp.oh) { continue; }
        for (var kx = 0u; kx < cp.k; kx++) {
            let tx = i32(ix + cp.pad) - i32(kx);
            if (tx < 0 || tx % s != 0) { continue; }
            let ox = u32(tx / s);
            if (ox >= cp.ow) { continue; }
            let m = (b * cp.oh + oy) * cp.ow + ox;
            if (m < cp.row0 || m >= cp.row0 + cp.rows) { continue; }
            acc += c2i_col[(m - cp.row0) * cp.kc + ci * kk + ky * cp.k + kx];
        }
    }
    c2i_dx[i] = c2i_dx[i] + acc;
}

// col2im4: col2im for the (ky, kx, ci) column order of im2col4 (C % 4 == 0): one invocation per
// input position (b, iy, ix) (n = B*H*W) adds, for each of its C/4 channel quads, the vec4s of
// the taps that reach it. Taps: ky = iy + pad - oy*stride for the oy with ky in [0, k), i.e.
// ky = (iy + pad) % stride, + stride, ... (the same for kx), limited to the chunk's positions.
@group(0) @binding(1) var<storage, read> c2i4_col: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> c2i4_dx: array<vec4<f32>>;

@compute @workgroup_size(64)
fn col2im4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) lid: u32) {
    let p = flat_group(wid, nwg) * 64u + lid;
    if (p >= cp.n) { return; }
    let c4 = cp.c / 4u;
    let ix = p % cp.w;
    let q = p / cp.w;
    let iy = q % cp.h;
    let b = q / cp.h;
    let ty = iy + cp.pad;
    let tx = ix + cp.pad;
    let ky0 = ty % cp.stride;
    let kx0 = tx % cp.stride;
    let row4 = cp.kc / 4u;
    for (var cq = 0u; cq < c4; cq++) {
        var acc = vec4<f32>(0.0);
        for (var ky = ky0; ky < cp.k && ky <= ty; ky += cp.stride) {
            let oy = (ty - ky) / cp.stride;
            if (oy >= cp.oh) { continue; }
            for (var kx = kx0; kx < cp.k && kx <= tx; kx += cp.stride) {
                let ox = (tx - kx) / cp.stride;
                let m = (b * cp.oh + oy) * cp.ow + ox;
                if (ox >= cp.ow || m < cp.row0 || m >= cp.row0 + cp.rows) { continue; }
                acc += c2i4_col[(m - cp.row0) * row4 + (ky * cp.k + kx) * c4 + cq];
            }
        }
        c2i4_dx[p * c4 + cq] += acc;
    }
}

// copy_range: dst[row0 + i] = src[rows + i] for i < n (row0 = destination offset, rows = source
// offset, in elements). Moves chunks of a chunked convolution in and out of the full tensors.
@group(0) @binding(1) var<storage, read> cpy_src: array<f32>;
@group(0) @binding(2) var<storage, read_write> cpy_dst: array<f32>;

@compute @workgroup_size(256)
fn copy_range(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let i = cv_index(wid, nwg, lid);
    if (i >= cp.n) { return; }
    cpy_dst[cp.row0 + i] = cpy_src[cp.rows + i];
}

// sum_rows: column sums of src [R = rows, C = kc] over blocks of e0 rows:
// out[o(blk, j)] (+)= sum_{r in block blk} src[r*C + j], one invocation per (blk, j), n = blocks*C.
// o = blk*C + j, except with e1 = T > 0 (used with a single block): o = (j % T) * (C / T) + j / T,
// which turns a [K, T] column order into [T, K] (depthwise dw partials [kk, C] -> weight [C, kk]).
@group(0) @binding(1) var<storage, read> sr_src: array<f32>;
@group(0) @binding(2) var<storage, read_write> sr_out: array<f32>;

@compute @workgroup_size(256)
fn sum_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let i = cv_index(wid, nwg, lid);
    if (i >= cp.n) { return; }
    let j = i % cp.kc;
    let blk = i / cp.kc;
    let r0 = blk * cp.e0;
    let r1 = min(r0 + cp.e0, cp.rows);
    var acc = 0.0;
    for (var r = r0; r < r1; r++) {
        acc += sr_src[r * cp.kc + j];
    }
    var o = i;
    if (cp.e1 > 0u) {
        o = blk * cp.kc + (j % cp.e1) * (cp.kc / cp.e1) + j / cp.e1;
    }
    if (ACCUM) {
        acc += sr_out[o];
    }
    sr_out[o] = acc;
}

// ---------------------------------------------------------------------------------------------
// Depthwise convolution (groups = channels), weight [C, 1, k, k]:
// y[b, oy, ox, c] = act(bias[c] + sum_{ky,kx} x[b, oy*s - p + ky, ox*s - p + kx, c] * w[c, ky, kx]).
// depthwise_dx (gather, accumulating): dx[b, iy, ix, c] += sum over taps (ky, kx) with
// oy = (iy + p - ky) / s and ox = (ix + p - kx) / s integral and inside the output of
// dy[b, oy, ox, c] * w[c, ky, kx].
// Each in a scalar form and a vec4 form for C % 4 == 0 (`depthwise4`, `depthwise_dx4`: one
// invocation handles 4 adjacent channels with 16-byte loads and stores, n counts vec4 elements).
// w (binding 2) and bias (binding 3) stay f32 arrays in both forms.
@group(0) @binding(2) var<storage, read> dw_w: array<f32>;
@group(0) @binding(3) var<storage, read> dw_bias: array<f32>;

// Weights at tap t = ky*k + kx of channel c (scalar) or channels c .. c + 3 (vec4).
fn dw_tap1(c: u32, kk: u32, t: u32) -> f32 {
    return dw_w[c * kk + t];
}
fn dw_tap4(c: u32, kk: u32, t: u32) -> vec4<f32> {
    return vec4<f32>(dw_w[c * kk + t], dw_w[(c + 1u) * kk + t], dw_w[(c + 2u) * kk + t], dw_w[(c + 3u) * kk + t]);
}
fn dw_bias1(c: u32) -> f32 {
    return dw_bias[c];
}
fn dw_bias4(c: u32) -> vec4<f32> {
    return vec4<f32>(dw_bias[c], dw_bias[c + 1u], dw_bias[c + 2u], dw_bias[c + 3u]);
}

//#width
@group(0) @binding(1) var<storage, read> dw_x$S: array<$T>;
@group(0) @binding(4) var<storage, read_write> dw_y$S: array<$T>;

@compute @workgroup_size(256)
fn depthwise$S(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let i = cv_index(wid, nwg, lid);
    if (i >= cp.n) { return; }
    let cw = cp.c / ${W}u;
    let cq = i % cw;
    let c = cq * ${W}u;
    let q = i / cw;
    let ox = q % cp.ow;
    let q2 = q / cp.ow;
    let oy = q2 % cp.oh;
    let b = q2 / cp.oh;
    let kk = cp.k * cp.k;
    var acc = $T(0.0);
    for (var ky = 0u; ky < cp.k; ky++) {
        let iy = i32(oy * cp.stride + ky) - i32(cp.pad);
        if (iy < 0 || iy >= i32(cp.h)) { continue; }
        let row = (b * cp.h + u32(iy)) * cp.w;
        for (var kx = 0u; kx < cp.k; kx++) {
            let ix = i32(ox * cp.stride + kx) - i32(cp.pad);
            if (ix < 0 || ix >= i32(cp.w)) { continue; }
            acc = fma(dw_x$S[(row + u32(ix)) * cw + cq], dw_tap$W(c, kk, ky * cp.k + kx), acc);
        }
    }
    if (HAS_BIAS) {
        acc += dw_bias$W(c);
    }
    dw_y$S[i] = activate$S(acc, ACT);
}

@group(0) @binding(1) var<storage, read> dwx_dy$S: array<$T>;
@group(0) @binding(3) var<storage, read_write> dwx_dx$S: array<$T>;

@compute @workgroup_size(256)
fn depthwise_dx$S(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    let i = cv_index(wid, nwg, lid);
    if (i >= cp.n) { return; }
    let cw = cp.c / ${W}u;
    let cq = i % cw;
    let c = cq * ${W}u;
    let q = i / cw;
    let ix = q % cp.w;
    let q2 = q / cp.w;
    let iy = q2 % cp.h;
    let b = q2 / cp.h;
    let kk = cp.k * cp.k;
    let s = i32(cp.stride);
    var acc = $T(0.0);
    for (var ky = 0u; ky < cp.k; ky++) {
        let ty = i32(iy + cp.pad) - i32(ky);
        if (ty < 0 || ty % s != 0) { continue; }
        let oy = u32(ty / s);
        if (oy >= cp.oh) { continue; }
        for (var kx = 0u; kx < cp.k; kx++) {
            let tx = i32(ix + cp.pad) - i32(kx);
            if (tx < 0 || tx % s != 0) { continue; }
            let ox = u32(tx / s);
            if (ox >= cp.ow) { continue; }
            acc = fma(dwx_dy$S[((b * cp.oh + oy) * cp.ow + ox) * cw + cq], dw_tap$W(c, kk, ky * cp.k + kx), acc);
        }
    }
    dwx_dx$S[i] = dwx_dx$S[i] + acc;
}
//#end

// Output position (batch, row, column) of flat output index m = (b * OH + oy) * OW + ox, and
// the next one: kernels that walk a run of m step the position without divisions.
struct OutPos {
    b: u32,
    oy: u32,
    ox: u32,
}

fn out_pos(m: u32) -> OutPos {
    let q = m / cp.ow;
    return OutPos(q / cp.oh, q % cp.oh, m % cp.ow);
}

fn next_out_pos(p: OutPos) -> OutPos {
    var r = p;
    r.ox += 1u;
    if (r.ox == cp.ow) {
        r.ox = 0u;
        r.oy += 1u;
        if (r.oy == cp.oh) {
            r.oy = 0u;
            r.b += 1u;
        }
    }
    return r;
}

// depthwise_dw_partial: part[blk, t, c] = sum over output positions m in block blk (e0 positions
// per block, rows = M positions in all) of dy[m, c] * x[b, oy*s - p + ky, ox*s - p + kx, c],
// t = ky*k + kx. n = blocks * k*k * C. sum_rows with e1 = C then reduces the blocks into w's
// [C, k*k] order. depthwise_dw_partial4: part[blk, t, c..c+4] for C % 4 == 0, n = blocks * k*k * C/4.
//#width
@group(0) @binding(1) var<storage, read> dww_x$S: array<$T>;
@group(0) @binding(2) var<storage, read> dww_dy$S: array<$T>;
@group(0) @binding(3) var<storage, read_write> dww_part$S: array<$T>;

@compute @workgroup_size(256)
fn depthwise_dw_partial$S(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                          @builtin(local_invocation_index) lid: u32) {
    let i = cv_index(wid, nwg, lid);
    if (i >= cp.n) { return; }
    let kk = cp.k * cp.k;
    let cw = cp.c / ${W}u;
    let cq = i % cw;
    let t = (i / cw) % kk;
    let blk = i / (cw * kk);
    let ky = t / cp.k;
    let kx = t % cp.k;
    let m0 = blk * cp.e0;
    let m1 = min(m0 + cp.e0, cp.rows);
    var acc = $T(0.0);
    // (b, oy, ox) of m0, then stepped along with m (no divisions in the loop).
    var pos = out_pos(m0);
    for (var m = m0; m < m1; m++) {
        let iy = i32(pos.oy * cp.stride + ky) - i32(cp.pad);
        let ix = i32(pos.ox * cp.stride + kx) - i32(cp.pad);
        if (iy >= 0 && iy < i32(cp.h) && ix >= 0 && ix < i32(cp.w)) {
            acc = fma(dww_dy$S[m * cw + cq], dww_x$S[((pos.b * cp.h + u32(iy)) * cp.w + u32(ix)) * cw + cq], acc);
        }
        pos = next_out_pos(pos);
    }
    dww_part$S[i] = acc;
}
//#end

// depthwise3_dw_partial_v4: depthwise_dw_partial4 for 3x3 kernels with all 9 taps in one
// invocation (n = blocks * C/4): each position loads dy once and 9 inputs (10 loads per 9 FMAs
// instead of 18), summed in the same order per tap.
fn dww3_x(b: u32, iy: i32, ix: i32, c4: u32, cq: u32) -> vec4<f32> {
    let ok = iy >= 0 && iy < i32(cp.h) && ix >= 0 && ix < i32(cp.w);
    let cy = u32(clamp(iy, 0, i32(cp.h) - 1));
    let cx = u32(clamp(ix, 0, i32(cp.w) - 1));
    return select(vec4(0.0), dww_x4[((b * cp.h + cy) * cp.w + cx) * c4 + cq], ok);
}

@compute @workgroup_size(256)
fn depthwise3_dw_partial_v4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                            @builtin(local_invocation_index) lid: u32) {
    let i = cv_index(wid, nwg, lid);
    if (i >= cp.n) { return; }
    let c4 = cp.c / 4u;
    let cq = i % c4;
    let blk = i / c4;
    let m0 = blk * cp.e0;
    let m1 = min(m0 + cp.e0, cp.rows);
    var a0 = vec4(0.0); var a1 = vec4(0.0); var a2 = vec4(0.0);
    var a3 = vec4(0.0); var a4 = vec4(0.0); var a5 = vec4(0.0);
    var a6 = vec4(0.0); var a7 = vec4(0.0); var a8 = vec4(0.0);
    var pos = out_pos(m0);
    for (var m = m0; m < m1; m++) {
        let d = dww_dy4[m * c4 + cq];
        let y0 = i32(pos.oy * cp.stride) - i32(cp.pad);
        let x0 = i32(pos.ox * cp.stride) - i32(cp.pad);
        let b = pos.b;
        a0 = fma(d, dww3_x(b, y0, x0, c4, cq), a0);
        a1 = fma(d, dww3_x(b, y0, x0 + 1, c4, cq), a1);
        a2 = fma(d, dww3_x(b, y0, x0 + 2, c4, cq), a2);
        a3 = fma(d, dww3_x(b, y0 + 1, x0, c4, cq), a3);
        a4 = fma(d, dww3_x(b, y0 + 1, x0 + 1, c4, cq), a4);
        a5 = fma(d, dww3_x(b, y0 + 1, x0 + 2, c4, cq), a5);
        a6 = fma(d, dww3_x(b, y0 + 2, x0, c4, cq), a6);
        a7 = fma(d, dww3_x(b, y0 + 2, x0 + 1, c4, cq), a7);
        a8 = fma(d, dww3_x(b, y0 + 2, x0 + 2, c4, cq), a8);
        pos = next_out_pos(pos);
    }
    let o = blk * 9u * c4 + cq;
    dww_part4[o] = a0;
    dww_part4[o + c4] = a1;
    dww_part4[o + 2u * c4] = a2;
    dww_part4[o + 3u * c4] = a3;
    dww_part4[o + 4u * c4] = a4;
    dww_part4[o + 5u * c4] = a5;
    dww_part4[o + 6u * c4] = a6;
    dww_part4[o + 7u * c4] = a7;
    dww_part4[o + 8u * c4] = a8;
}

// ---------------------------------------------------------------------------------------------
// depthwise3_v4: the 3x3 depthwise forward for C % 4 == 0 and stride 1, any padding,
// written for CPU adapters. On llvmpipe every storage load with a non-constant address is a scalar
// loop over the SIMD lanes while an FMA is one vector instruction, so the kernel minimises loads
// per output: one invocation owns 4 channels (vec4) x 4 adjacent output columns x a run of
// cp.e0 output rows. It slides a window of 3 input rows down the run: each new output row loads
// only its new input row (6 vec4) and reuses the other two, so an output vec4 costs 1.5 loads
// instead of 9 input + 36 scalar weight loads. The 9 taps
// of 4 channels are 9 aligned vec4 of w (36 consecutive floats) loaded once. Out-of-image taps
// read a clamped address and are zeroed with a select (no divergent loads). The taps are summed
// in the order (ky, kx) like `depthwise`, then bias and activation.
// Invocation index (n = B * ceil(OH / e0) * ceil(OW / 4) * C/4): channel quad fastest, then the
// column strip, the row run and the batch entry.
// The same kernel computes the input gradient of a stride-1 3x3 depthwise conv: dx is the
// depthwise conv of dy with the taps rotated by 180 degrees (DW_FLIP) and padding 2 - pad, added
// to dx (ACCUM).
// Stride 2 uses depthwise4: a stride-2 version of this kernel (9 loads per row) made Chromium's
// SwiftShader compiler grow past 13 GB and crash the GPU process (web/test/pipelines.mjs finds
// such kernels).

@group(0) @binding(1) var<storage, read> dwt_x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> dwt_w: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> dwt_bias: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> dwt_y: array<vec4<f32>>;

// Tap t = ky*3 + kx of channels c .. c + 3.
struct DwTaps {
    t0: vec4<f32>, t1: vec4<f32>, t2: vec4<f32>, t3: vec4<f32>, t4: vec4<f32>,
    t5: vec4<f32>, t6: vec4<f32>, t7: vec4<f32>, t8: vec4<f32>,
}

// One input row at the columns an output strip needs (v0 = leftmost).
struct DwRow {
    v0: vec4<f32>, v1: vec4<f32>, v2: vec4<f32>, v3: vec4<f32>, v4: vec4<f32>, v5: vec4<f32>,
}

// Accumulators of the 4 output columns.
struct DwOut {
    o0: vec4<f32>, o1: vec4<f32>, o2: vec4<f32>, o3: vec4<f32>,
}

override DW_FLIP: bool = false;

// Where an invocation reads: the channel quad, the row stride (in vec4) and the first input column.
struct DwAt {
    cq: u32,
    c4: u32,
    img: u32,   // b * H: first input row of the batch entry
    x0: i32,    // input column of v0
}

fn dw_taps(cq: u32) -> DwTaps {
    // w [C, 3, 3] row-major: channel j (of the quad), tap t is float 9j + t of these 36.
    let o = 9u * cq;
    let v0 = dwt_w[o]; let v1 = dwt_w[o + 1u]; let v2 = dwt_w[o + 2u];
    let v3 = dwt_w[o + 3u]; let v4 = dwt_w[o + 4u]; let v5 = dwt_w[o + 5u];
    let v6 = dwt_w[o + 6u]; let v7 = dwt_w[o + 7u]; let v8 = dwt_w[o + 8u];
    let t = DwTaps(
        vec4(v0.x, v2.y, v4.z, v6.w),
        vec4(v0.y, v2.z, v4.w, v7.x),
        vec4(v0.z, v2.w, v5.x, v7.y),
        vec4(v0.w, v3.x, v5.y, v7.z),
        vec4(v1.x, v3.y, v5.z, v7.w),
        vec4(v1.y, v3.z, v5.w, v8.x),
        vec4(v1.z, v3.w, v6.x, v8.y),
        vec4(v1.w, v4.x, v6.y, v8.z),
        vec4(v2.x, v4.y, v6.z, v8.w));
    if (DW_FLIP) {
        return DwTaps(t.t8, t.t7, t.t6, t.t5, t.t4, t.t3, t.t2, t.t1, t.t0);
    }
    return t;
}

// x at input row iy (any i32), column at.x0 + j; zero outside the image.
fn dw_ld(at: DwAt, row: u32, row_ok: bool, j: i32) -> vec4<f32> {
    let ix = at.x0 + j;
    let ok = row_ok && ix >= 0 && ix < i32(cp.w);
    let cx = u32(clamp(ix, 0, i32(cp.w) - 1));
    return select(vec4(0.0), dwt_x[(row + cx) * at.c4 + at.cq], ok);
}

fn dw_row(at: DwAt, iy: i32) -> DwRow {
    let ok = iy >= 0 && iy < i32(cp.h);
    let row = (at.img + u32(clamp(iy, 0, i32(cp.h) - 1))) * cp.w;
    var r: DwRow;
    r.v0 = dw_ld(at, row, ok, 0);
    r.v1 = dw_ld(at, row, ok, 1);
    r.v2 = dw_ld(at, row, ok, 2);
    r.v3 = dw_ld(at, row, ok, 3);
    r.v4 = dw_ld(at, row, ok, 4);
    r.v5 = dw_ld(at, row, ok, 5);
    return r;
}

// acc[j] += r[j] * a + r[j + 1] * b + r[j + 2] * c (one kernel row, in kx order).
fn dw_mac(acc: DwOut, r: DwRow, a: vec4<f32>, b: vec4<f32>, c: vec4<f32>) -> DwOut {
    return DwOut(fma(r.v2, c, fma(r.v1, b, fma(r.v0, a, acc.o0))),
                 fma(r.v3, c, fma(r.v2, b, fma(r.v1, a, acc.o1))),
                 fma(r.v4, c, fma(r.v3, b, fma(r.v2, a, acc.o2))),
                 fma(r.v5, c, fma(r.v4, b, fma(r.v3, a, acc.o3))));
}

fn dw_out(t: DwTaps, r0: DwRow, r1: DwRow, r2: DwRow) -> DwOut {
    let z = vec4(0.0);
    var o = dw_mac(DwOut(z, z, z, z), r0, t.t0, t.t1, t.t2);
    o = dw_mac(o, r1, t.t3, t.t4, t.t5);
    return dw_mac(o, r2, t.t6, t.t7, t.t8);
}

// Stores output row oy, columns ox0 .. ox0 + 3 (those < OW); one copy of the epilogue.
fn dw_store(acc: DwOut, bias: vec4<f32>, at: DwAt, b: u32, oy: u32, ox0: u32) {
    var o = acc;
    let base = ((b * cp.oh + oy) * cp.ow + ox0) * at.c4 + at.cq;
    let cols = min(4u, cp.ow - ox0);
    for (var j = 0u; j < cols; j++) {
        var v = o.o0;
        if (HAS_BIAS) {
            v += bias;
        }
        var out = activate4(v, ACT);
        if (ACCUM) {
            out += dwt_y[base + j * at.c4];
        }
        dwt_y[base + j * at.c4] = out;
        o = DwOut(o.o1, o.o2, o.o3, o.o0);
    }
}

@compute @workgroup_size(8)
fn depthwise3_v4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let i = flat_group(wid, nwg) * 8u + lid;
    if (i >= cp.n) { return; }
    let c4 = cp.c / 4u;
    let cq = i % c4;
    let q = i / c4;
    let strips = (cp.ow + 3u) / 4u;
    let ox0 = (q % strips) * 4u;
    let q2 = q / strips;
    let runs = (cp.oh + cp.e0 - 1u) / cp.e0;
    let oy0 = (q2 % runs) * cp.e0;
    let b = q2 / runs;
    let oy1 = min(oy0 + cp.e0, cp.oh);
    let at = DwAt(cq, c4, b * cp.h, i32(ox0) - i32(cp.pad));
    let taps = dw_taps(cq);
    var bias = vec4(0.0);
    if (HAS_BIAS) {
        bias = dwt_bias[cq];
    }
    // Input row of kernel row 0 for output row oy: oy - pad.
    let iy0 = i32(oy0) - i32(cp.pad);
    var r0 = dw_row(at, iy0);
    var r1 = dw_row(at, iy0 + 1);
    for (var oy = oy0; oy < oy1; oy++) {
        let r2 = dw_row(at, i32(oy) - i32(cp.pad) + 2);
        dw_store(dw_out(taps, r0, r1, r2), bias, at, b, oy, ox0);
        r0 = r1;
        r1 = r2;
    }
}

// ---------------------------------------------------------------------------------------------
// 2x2 stride-2 transposed convolution, after the GEMM t[m, o*4 + a*2 + c] = sum_ci x[m, ci] *
// w[ci, o, a, c] (w [Ci, Co, 2, 2] read as a row-major [Ci, 4*Co] matrix, so no re-ordering):
// pixel_shuffle2: y[b, 2i + a, 2j + c, o] = act(t[(b, i, j), o*4 + a*2 + c] + bias[o]).
// h, w: input size; co: output channels; n = B*2H*2W*Co.
@group(0) @binding(1) var<storage, read> ps_t: array<f32>;
@group(0) @binding(2) var<storage, read> ps_bias: array<f32>;
@group(0) @binding(3) var<storage, read_write> ps_y: array<f32>;

@compute @workgroup_size(256)
fn pixel_shuffle2(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    let i = cv_index(wid, nwg, lid);
    if (i >= cp.n) { return; }
    let o = i % cp.co;
    let q = i / cp.co;
    let xx = q % (2u * cp.w);
    let q2 = q / (2u * cp.w);
    let yy = q2 % (2u * cp.h);
    let b = q2 / (2u * cp.h);
    let m = (b * cp.h + yy / 2u) * cp.w + xx / 2u;
    var v = ps_t[m * 4u * cp.co + o * 4u + (yy % 2u) * 2u + xx % 2u];
    if (HAS_BIAS) {
        v += ps_bias[o];
    }
    ps_y[i] = activate(v, ACT);
}

// pixel_shuffle2_v4: the same for Co % 4 == 0, one invocation per (position m, 4 channels)
// (n = B*H*W*Co/4): loads t[m, 4q*4 .. 4q*4 + 15] as 4 vec4 (channel-major, 4 pixels each),
// transposes them into 4 vec4 of channels, one per output pixel (a, c).
@group(0) @binding(1) var<storage, read> ps4_t: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> ps4_bias: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> ps4_y: array<vec4<f32>>;

@compute @workgroup_size(256)
fn pixel_shuffle2_v4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let i = cv_index(wid, nwg, lid);
    if (i >= cp.n) { return; }
    let c4 = cp.co / 4u;
    let oq = i % c4;
    let m = i / c4;
    let j = m % cp.w;
    let q = m / cp.w;
    let ii = q % cp.h;
    let b = q / cp.h;
    let src = m * cp.co + 4u * oq;
    // Row p = a*2 + c of the transpose: channels 4oq .. 4oq + 3 at output pixel (2ii + a, 2j + c).
    var px = transpose(mat4x4<f32>(ps4_t[src], ps4_t[src + 1u], ps4_t[src + 2u], ps4_t[src + 3u]));
    var bias = vec4(0.0);
    if (HAS_BIAS) {
        bias = ps4_bias[oq];
    }
    for (var p = 0u; p < 4u; p++) {
        let v = px[0] + bias;
        let yy = 2u * ii + p / 2u;
        let xx = 2u * j + p % 2u;
        ps4_y[((b * 2u * cp.h + yy) * 2u * cp.w + xx) * c4 + oq] = activate4(v, ACT);
        px = mat4x4<f32>(px[1], px[2], px[3], px[0]);
    }
}

// pixel_unshuffle2 (backward of pixel_shuffle2): dt[m, o*4 + a*2 + c] = dy[b, 2i + a, 2j + c, o].
// n = B*H*W*4*Co.
@group(0) @binding(1) var<storage, read> pu_dy: array<f32>;
@group(0) @binding(2) var<storage, read_write> pu_dt: array<f32>;

@compute @workgroup_size(256)
fn pixel_unshuffle2(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    let i = cv_index(wid, nwg, lid);
    if (i >= cp.n) { return; }
    let col = i % (4u * cp.co);
    let m = i / (4u * cp.co);
    let o = col / 4u;
    let a = (col / 2u) % 2u;
    let cc = col % 2u;
    let j = m % cp.w;
    let q = m / cp.w;
    let ii = q % cp.h;
    let b = q / cp.h;
    pu_dt[i] = pu_dy[((b * 2u * cp.h + 2u * ii + a) * 2u * cp.w + 2u * j + cc) * cp.co + o];
}
