// ---- elementwise.wgsl: activations, broadcast binary ops, concat, input normalisation ----

override ACT: u32 = 0u;
override OP: u32 = 0u;
override SLICE_BACKWARD: bool = false;
override ACCUM_OUT: bool = false;

struct EwParams {
    n: u32,      // number of output elements
    nb: u32,     // elements of b (b is broadcast with b[i % nb]); concat: channels of a
    c2: u32,     // concat: channels of b
    pad: u32,
}

@group(0) @binding(0) var<uniform> ep: EwParams;

fn ew_index(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return flat_group(wid, nwg) * 256u + lid;
}

// unary: out = ACT(a). binary: out = a OP b[i % nb] (OP 0 add, 1 mul, 2 sub). Both in a scalar
// form and a vec4 form (`unary4` / `binary4`: n counts vec4s; binary4 with nb % 4 == 0, nb in
// vec4s too). BCAST = false when b has as many elements as a (no modulo: an integer division per
// element is expensive on CPU adapters, which also scalarise every load, so vec4 halves the cost
// per float).
override BCAST: bool = true;

//#width
@group(0) @binding(1) var<storage, read> ew_a$S: array<$T>;
@group(0) @binding(2) var<storage, read_write> ew_out$S: array<$T>;

@compute @workgroup_size(256)
fn unary$S(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) lid: u32) {
    let i = ew_index(wid, nwg, lid);
    if (i >= ep.n) { return; }
    ew_out$S[i] = activate$S(ew_a$S[i], ACT);
}

@group(0) @binding(1) var<storage, read> bin_a$S: array<$T>;
@group(0) @binding(2) var<storage, read> bin_b$S: array<$T>;
@group(0) @binding(3) var<storage, read_write> bin_out$S: array<$T>;

@compute @workgroup_size(256)
fn binary$S(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let i = ew_index(wid, nwg, lid);
    if (i >= ep.n) { return; }
    let a = bin_a$S[i];
    var j = i;
    if (BCAST) {
        j = i % ep.nb;
    }
    let b = bin_b$S[j];
    var v: $T;
    if (OP == 0u) { v = a + b; } else if (OP == 1u) { v = a * b; } else { v = a - b; }
    bin_out$S[i] = v;
}
//#end

// in-place accumulate: acc += a  (gradient accumulation, residual sums)
@group(0) @binding(1) var<storage, read> acc_a: array<f32>;
@group(0) @binding(2) var<storage, read_write> acc_out: array<f32>;

@compute @workgroup_size(256)
fn accumulate(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let i = ew_index(wid, nwg, lid);
    if (i >= ep.n) { return; }
    acc_out[i] = acc_out[i] + acc_a[i];
}

// concat along the last (channel) axis: out[r, 0:c1] = a[r, :], out[r, c1:c1+c2] = b[r, :];
// concat_last4: the same on vec4s for c1 % 4 == 0 and c2 % 4 == 0 (n, nb, c2 in vec4s).
//#width
@group(0) @binding(1) var<storage, read> cat_a$S: array<$T>;
@group(0) @binding(2) var<storage, read> cat_b$S: array<$T>;
@group(0) @binding(3) var<storage, read_write> cat_out$S: array<$T>;

@compute @workgroup_size(256)
fn concat_last$S(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let i = ew_index(wid, nwg, lid);
    if (i >= ep.n) { return; }
    let c = ep.nb + ep.c2;
    let r = i / c;
    let ch = i % c;
    if (ch < ep.nb) {
        cat_out$S[i] = cat_a$S[r * ep.nb + ch];
    } else {
        cat_out$S[i] = cat_b$S[r * ep.c2 + ch - ep.nb];
    }
}
//#end

// split along the last axis (backward of concat): a[r, :] = g[r, 0:c1], b[r, :] = g[r, c1:]
@group(0) @binding(1) var<storage, read> spl_g: array<f32>;
@group(0) @binding(2) var<storage, read_write> spl_a: array<f32>;
@group(0) @binding(3) var<storage, read_write> spl_b: array<f32>;

@compute @workgroup_size(256)
fn split_last(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let i = ew_index(wid, nwg, lid);
    if (i >= ep.n) { return; }
    let c = ep.nb + ep.c2;
    let r = i / c;
    let ch = i % c;
    if (ch < ep.nb) {
        spl_a[r * ep.nb + ch] = spl_g[i];
    } else {
        spl_b[r * ep.c2 + ch - ep.nb] = spl_g[i];
    }
}

// Packed RGB pixels (u32 0xAABBGGRR, B x H x W) -> ImageNet-normalised f32 (B, H, W, 3).
@group(0) @binding(1) var<storage, read> img_px: array<u32>;
@group(0) @binding(2) var<storage, read_write> img_out: array<f32>;

@compute @workgroup_size(256)
fn image_normalize(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let i = ew_index(wid, nwg, lid);
    if (i >= ep.n) { return; }
    let p = img_px[i];
    let r = f32(p & 255u);
    let g = f32((p >> 8u) & 255u);
    let b = f32((p >> 16u) & 255u);
    img_out[i * 3u + 0u] = (r - 123.675) / 58.395;
    img_out[i * 3u + 1u] = (g - 116.28) / 57.12;
    img_out[i * 3u + 2u] = (b - 103.53) / 57.375;
}

// Slice along the middle axis of x viewed as [outer, mid, inner]:
// out[o, r, i] = x[o, m0 + r, i] for r < mn.   (SLICE_BACKWARD: the reverse scatter into a zeroed
// gradient, gx[o, m0 + r, i] += gy[o, r, i].)
struct SliceParams {
    n: u32,      // output elements (outer * mn * inner)
    mid: u32,
    m0: u32,
    mn: u32,
    inner: u32,
}
@group(0) @binding(0) var<uniform> sp: SliceParams;
@group(0) @binding(1) var<storage, read> sl_x: array<f32>;
@group(0) @binding(2) var<storage, read_write> sl_out: array<f32>;

@compute @workgroup_size(256)
fn slice_mid(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let i = flat_group(wid, nwg) * 256u + lid;
    if (i >= sp.n) { return; }
    let inner = i % sp.inner;
    let r = (i / sp.inner) % sp.mn;
    let o = i / (sp.inner * sp.mn);
    let src = (o * sp.mid + sp.m0 + r) * sp.inner + inner;
    if (SLICE_BACKWARD) {
        sl_out[src] = sl_out[src] + sl_x[i];
    } else {
        sl_out[i] = sl_x[src];
    }
}

// Activation backward: dpre = dy * act'(pre)   (ACT 1 GELU, 2 ReLU, 0 identity); act_backward4
// on vec4s (element count % 4 == 0).
//#width
@group(0) @binding(1) var<storage, read> ab_pre$S: array<$T>;
@group(0) @binding(2) var<storage, read> ab_dy$S: array<$T>;
@group(0) @binding(3) var<storage, read_write> ab_out$S: array<$T>;

@compute @workgroup_size(256)
fn act_backward$S(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    let i = ew_index(wid, nwg, lid);
    if (i >= ep.n) { return; }
    ab_out$S[i] = ab_dy$S[i] * activate_grad$S(ab_pre$S[i], ACT);
}
//#end

// Column sums of x [rows, c], deterministic two-level reduction.
// Level 1: workgroup (column tile of 64, chunk of CS_ROWS rows) -> part[chunk, col].
// Level 2: one invocation per column sums its chunks in order -> out[col] (+= when ACCUM_OUT).
struct ColSumParams {
    rows: u32,
    c: u32,
    chunk_rows: u32,
    nchunks: u32,
    col_tiles: u32,
}
@group(0) @binding(0) var<uniform> csp: ColSumParams;
// col_sum_partial4: the same for c % 4 == 0 on column quads (csp.c and csp.col_tiles counted in
// quads); the partial sums have the scalar form's layout.
//#width
@group(0) @binding(1) var<storage, read> cs_x$S: array<$T>;
@group(0) @binding(2) var<storage, read_write> cs_part$S: array<$T>;

@compute @workgroup_size(64)
fn col_sum_partial$S(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let g = flat_group(wid, nwg);
    if (g >= csp.col_tiles * csp.nchunks) { return; }
    let tile = g % csp.col_tiles;
    let chunk = g / csp.col_tiles;
    let col = tile * 64u + lid;
    if (col >= csp.c) { return; }
    let r0 = chunk * csp.chunk_rows;
    let r1 = min(r0 + csp.chunk_rows, csp.rows);
    var s = $T(0.0);
    for (var r = r0; r < r1; r++) {
        s += cs_x$S[r * csp.c + col];
    }
    cs_part$S[chunk * csp.c + col] = s;
}
//#end

@group(0) @binding(1) var<storage, read> csf_part: array<f32>;
@group(0) @binding(2) var<storage, read_write> csf_out: array<f32>;

@compute @workgroup_size(64)
fn col_sum_final(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let col = flat_group(wid, nwg) * 64u + lid;
    if (col >= csp.c) { return; }
    var s = 0.0;
    for (var k = 0u; k < csp.nchunks; k++) {
        s += csf_part[k * csp.c + col];
    }
    if (ACCUM_OUT) {
        s += csf_out[col];
    }
    csf_out[col] = s;
}
