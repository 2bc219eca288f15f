// ---- norm.wgsl: LayerNorm (forward / train / backward), BatchNorm2d (train, eval, backward) and the
// deterministic two-level column reductions they use. Feature maps are channels-last, so both
// normalisations see a [rows, C] matrix: LayerNorm normalises each row, BatchNorm each column.

override T: u32 = 32u;        // LayerNorm: threads per row (power of two <= 256); 256 / T rows per workgroup
override ACT: u32 = 0u;       // activation after the affine (0 none, 1 GELU, 2 ReLU)
override ACCUM: bool = false; // add into the output instead of overwriting it
override CT: u32 = 64u;       // column reductions: columns per workgroup (power of two <= 256)
override SQ: bool = false;    // col_sum: sum of squared deviations from a per-column mean
override PER_ROW: bool = true; // col_grad: mean/rstd indexed by row (LayerNorm) or by column (BatchNorm)
override TRAIN: bool = true;  // bn_bwd_dx: batch statistics (true) or fixed running statistics (false)
override SAVE_PRE: bool = false; // bn_apply: also store the pre-activation

var<workgroup> red1: array<f32, 256>;
var<workgroup> red2: array<vec2<f32>, 256>;

// d act(z) / dz given the pre-activation z.
fn act_grad(z: f32) -> f32 {
    if (ACT == 1u) {
        return gelu_grad(z);
    }
    if (ACT == 2u) {
        return select(0.0, 1.0, z > 0.0);
    }
    return 1.0;
}

// Sum of `v` over the T consecutive invocations of a team (fixed tree order: deterministic).
// Must be called in uniform control flow by the whole workgroup.
fn team_sum(lid: u32, v: f32) -> f32 {
    let lane = lid % T;
    red1[lid] = v;
    workgroupBarrier();
    for (var s = T / 2u; s > 0u; s = s / 2u) {
        if (lane < s) {
            red1[lid] = red1[lid] + red1[lid + s];
        }
        workgroupBarrier();
    }
    let r = red1[lid - lane];
    workgroupBarrier();
    return r;
}

fn team_sum2(lid: u32, v: vec2<f32>) -> vec2<f32> {
    let lane = lid % T;
    red2[lid] = v;
    workgroupBarrier();
    for (var s = T / 2u; s > 0u; s = s / 2u) {
        if (lane < s) {
            red2[lid] = red2[lid] + red2[lid + s];
        }
        workgroupBarrier();
    }
    let r = red2[lid - lane];
    workgroupBarrier();
    return r;
}

// ---------------------------------------------------------------------------------------------
// LayerNorm over the last dim: one team of T invocations per row, two-pass mean / variance.

struct LnParams {
    rows: u32,
    c: u32,
    eps: f32,
    pad: u32,
}

@group(0) @binding(0) var<uniform> lp: LnParams;
@group(0) @binding(1) var<storage, read> ln_x: array<f32>;
@group(0) @binding(2) var<storage, read> ln_w: array<f32>;
@group(0) @binding(3) var<storage, read> ln_b: array<f32>;
@group(0) @binding(4) var<storage, read_write> ln_y: array<f32>;
@group(0) @binding(5) var<storage, read_write> ln_mean: array<f32>;
@group(0) @binding(6) var<storage, read_write> ln_rstd: array<f32>;
@group(0) @binding(7) var<storage, read_write> ln_pre: array<f32>;

struct RowStats {
    row: u32,
    valid: bool,
    mean: f32,
    rstd: f32,
}

fn ln_stats(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> RowStats {
    let row = flat_group(wid, nwg) * (256u / T) + lid / T;
    let lane = lid % T;
    let valid = row < lp.rows;
    let c = lp.c;
    let base = row * c;
    var s = 0.0;
    if (valid) {
        for (var k = lane; k < c; k += T) {
            s += ln_x[base + k];
        }
    }
    let mean = team_sum(lid, s) / f32(c);
    var q = 0.0;
    if (valid) {
        for (var k = lane; k < c; k += T) {
            let d = ln_x[base + k] - mean;
            q += d * d;
        }
    }
    let variance = team_sum(lid, q) / f32(c);
    return RowStats(row, valid, mean, 1.0 / sqrt(variance + lp.eps));
}

@compute @workgroup_size(256)
fn ln_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let st = ln_stats(wid, nwg, lid);
    if (!st.valid) {
        return;
    }
    let c = lp.c;
    let base = st.row * c;
    for (var k = lid % T; k < c; k += T) {
        let z = (ln_x[base + k] - st.mean) * st.rstd * ln_w[k] + ln_b[k];
        ln_y[base + k] = activate(z, ACT);
    }
}

// Training forward: also stores mean and rstd per row, and the pre-activation when ACT != 0.
@compute @workgroup_size(256)
fn ln_fwd_train(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let st = ln_stats(wid, nwg, lid);
    if (!st.valid) {
        return;
    }
    let c = lp.c;
    let base = st.row * c;
    let lane = lid % T;
    if (lane == 0u) {
        ln_mean[st.row] = st.mean;
        ln_rstd[st.row] = st.rstd;
    }
    for (var k = lane; k < c; k += T) {
        let z = (ln_x[base + k] - st.mean) * st.rstd * ln_w[k] + ln_b[k];
        ln_y[base + k] = activate(z, ACT);
        if (ACT != 0u) {
            ln_pre[base + k] = z;
        }
    }
}
