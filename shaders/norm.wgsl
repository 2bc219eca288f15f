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

// ln_row4: LayerNorm for C % 4 == 0 with one invocation per 2 rows and vec4 loads, for CPU adapters
// (llvmpipe scalarises each load over the SIMD lanes, and its workgroup barriers are costly, so the
// team kernels above spend most of their time in the reductions). Two-pass mean / variance like
// ln_stats, summed in 4 vec4 lanes and then across them. ln_row4_train also stores mean and rstd
// per row and the pre-activation when ACT != 0 (the same arithmetic, so both outputs agree).
@group(0) @binding(1) var<storage, read> ln4_x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> ln4_w: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> ln4_b: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> ln4_y: array<vec4<f32>>;
@group(0) @binding(7) var<storage, read_write> ln4_pre: array<vec4<f32>>;

fn hsum(v: vec4<f32>) -> f32 {
    return (v.x + v.y) + (v.z + v.w);
}

// (mean, rstd) of rows ra and rb (both < rows; rb may equal ra), as (mean_a, rstd_a, mean_b, rstd_b).
fn ln4_stats2(ra: u32, rb: u32) -> vec4<f32> {
    let c4 = lp.c / 4u;
    let ba = ra * c4;
    let bb = rb * c4;
    var sa = vec4(0.0);
    var sb = vec4(0.0);
    for (var k = 0u; k < c4; k++) {
        sa += ln4_x[ba + k];
        sb += ln4_x[bb + k];
    }
    let ma = hsum(sa) / f32(lp.c);
    let mb = hsum(sb) / f32(lp.c);
    var qa = vec4(0.0);
    var qb = vec4(0.0);
    for (var k = 0u; k < c4; k++) {
        let da = ln4_x[ba + k] - ma;
        let db = ln4_x[bb + k] - mb;
        qa = fma(da, da, qa);
        qb = fma(db, db, qb);
    }
    return vec4(ma, 1.0 / sqrt(hsum(qa) / f32(lp.c) + lp.eps), mb, 1.0 / sqrt(hsum(qb) / f32(lp.c) + lp.eps));
}

// Two rows per invocation (rows 2i and 2i + 1) share the loads of w and b.
@compute @workgroup_size(8)
fn ln_row4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) lid: u32) {
    let ra = 2u * (flat_group(wid, nwg) * 8u + lid);
    if (ra >= lp.rows) {
        return;
    }
    let two = ra + 1u < lp.rows;
    let rb = select(ra, ra + 1u, two);
    let st = ln4_stats2(ra, rb);
    let c4 = lp.c / 4u;
    let ba = ra * c4;
    let bb = rb * c4;
    for (var k = 0u; k < c4; k++) {
        let w = ln4_w[k];
        let b = ln4_b[k];
        ln4_y[ba + k] = activate4((ln4_x[ba + k] - st.x) * st.y * w + b, ACT);
        if (two) {
            ln4_y[bb + k] = activate4((ln4_x[bb + k] - st.z) * st.w * w + b, ACT);
        }
    }
}

@compute @workgroup_size(8)
fn ln_row4_train(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let ra = 2u * (flat_group(wid, nwg) * 8u + lid);
    if (ra >= lp.rows) {
        return;
    }
    let two = ra + 1u < lp.rows;
    let rb = select(ra, ra + 1u, two);
    let st = ln4_stats2(ra, rb);
    ln_mean[ra] = st.x;
    ln_rstd[ra] = st.y;
    if (two) {
        ln_mean[rb] = st.z;
        ln_rstd[rb] = st.w;
    }
    let c4 = lp.c / 4u;
    let ba = ra * c4;
    let bb = rb * c4;
    for (var k = 0u; k < c4; k++) {
        let w = ln4_w[k];
        let b = ln4_b[k];
        let za = (ln4_x[ba + k] - st.x) * st.y * w + b;
        ln4_y[ba + k] = activate4(za, ACT);
        if (ACT != 0u) {
            ln4_pre[ba + k] = za;
        }
        if (two) {
            let zb = (ln4_x[bb + k] - st.z) * st.w * w + b;
            ln4_y[bb + k] = activate4(zb, ACT);
            if (ACT != 0u) {
                ln4_pre[bb + k] = zb;
            }
        }
    }
}

// LayerNorm backward, dx only (dw / db come from col_grad + reduce_part):
//   dz = dy * act'(pre),  g = dz * w,  dx = rstd * (g - mean(g) - xhat * mean(g * xhat)).
@group(0) @binding(1) var<storage, read> lb_x: array<f32>;
@group(0) @binding(2) var<storage, read> lb_w: array<f32>;
@group(0) @binding(3) var<storage, read> lb_mean: array<f32>;
@group(0) @binding(4) var<storage, read> lb_rstd: array<f32>;
@group(0) @binding(5) var<storage, read> lb_dy: array<f32>;
@group(0) @binding(6) var<storage, read> lb_pre: array<f32>;
@group(0) @binding(7) var<storage, read_write> lb_dx: array<f32>;

fn lb_dz(i: u32) -> f32 {
    if (ACT != 0u) {
        return lb_dy[i] * activate_grad(lb_pre[i], ACT);
    }
    return lb_dy[i];
}

@compute @workgroup_size(256)
fn ln_bwd_dx(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let row = flat_group(wid, nwg) * (256u / T) + lid / T;
    let lane = lid % T;
    let valid = row < lp.rows;
    let c = lp.c;
    let base = row * c;
    var mean = 0.0;
    var rstd = 0.0;
    var acc = vec2<f32>(0.0, 0.0);
    if (valid) {
        mean = lb_mean[row];
        rstd = lb_rstd[row];
        for (var k = lane; k < c; k += T) {
            let g = lb_dz(base + k) * lb_w[k];
            let xh = (lb_x[base + k] - mean) * rstd;
            acc += vec2<f32>(g, g * xh);
        }
    }
    let sums = team_sum2(lid, acc) / f32(c);
    if (!valid) {
        return;
    }
    for (var k = lane; k < c; k += T) {
        let g = lb_dz(base + k) * lb_w[k];
        let xh = (lb_x[base + k] - mean) * rstd;
        var d = rstd * (g - sums.x - xh * sums.y);
        if (ACCUM) {
            d += lb_dx[base + k];
        }
        lb_dx[base + k] = d;
    }
}

// ln_bwd_dx4: ln_bwd_dx for C % 4 == 0 with one invocation per row and vec4 loads (no team
// reduction: workgroup barriers and workgroup-memory loads are slow on CPU adapters).
@group(0) @binding(1) var<storage, read> lb4_x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> lb4_w: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> lb4_mean: array<f32>;
@group(0) @binding(4) var<storage, read> lb4_rstd: array<f32>;
@group(0) @binding(5) var<storage, read> lb4_dy: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read> lb4_pre: array<vec4<f32>>;
@group(0) @binding(7) var<storage, read_write> lb4_dx: array<vec4<f32>>;

fn lb4_g(i: u32, k: u32) -> vec4<f32> {
    var dz = lb4_dy[i];
    if (ACT != 0u) {
        dz *= activate_grad4(lb4_pre[i], ACT);
    }
    return dz * lb4_w[k];
}

@compute @workgroup_size(8)
fn ln_bwd_dx4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let row = flat_group(wid, nwg) * 8u + lid;
    if (row >= lp.rows) {
        return;
    }
    let c4 = lp.c / 4u;
    let base = row * c4;
    let mean = lb4_mean[row];
    let rstd = lb4_rstd[row];
    var sg = vec4(0.0);
    var sgx = vec4(0.0);
    for (var k = 0u; k < c4; k++) {
        let g = lb4_g(base + k, k);
        let xh = (lb4_x[base + k] - mean) * rstd;
        sg += g;
        sgx = fma(g, xh, sgx);
    }
    let mg = hsum(sg) / f32(lp.c);
    let mgx = hsum(sgx) / f32(lp.c);
    for (var k = 0u; k < c4; k++) {
        let g = lb4_g(base + k, k);
        let xh = (lb4_x[base + k] - mean) * rstd;
        var d = rstd * (g - mg - xh * mgx);
        if (ACCUM) {
            d += lb4_dx[base + k];
        }
        lb4_dx[base + k] = d;
    }
}

// ---------------------------------------------------------------------------------------------
// Column reductions over a [rows, c] matrix, first level. Workgroup g covers column tile
// g % ncoltiles (CT columns) and row chunk g / ncoltiles (chunk_rows rows); its 256 / CT row lanes
// each sum a strided subset of the chunk, then a fixed tree combines the lanes. The partial sum of
// quantity s for column col and chunk k goes to part[(s * c + col) * nchunks + k].

struct ColParams {
    rows: u32,
    c: u32,
    chunk_rows: u32,
    nchunks: u32,
    ncoltiles: u32,
    pad0: u32,
    pad1: u32,
    pad2: u32,
}

@group(0) @binding(0) var<uniform> cp: ColParams;

struct ColPos {
    col: u32,
    lane: u32,   // row lane 0 .. 256 / CT
    chunk: u32,
    r0: u32,
    r1: u32,
    on: bool,
}

fn col_pos(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> ColPos {
    let g = flat_group(wid, nwg);
    let tile = g % cp.ncoltiles;
    let chunk = g / cp.ncoltiles;
    let col = tile * CT + lid % CT;
    let r0 = chunk * cp.chunk_rows;
    let r1 = min(cp.rows, r0 + cp.chunk_rows);
    return ColPos(col, lid / CT, chunk, r0, r1, chunk < cp.nchunks && col < cp.c);
}

// Sum over the row lanes of a workgroup (fixed tree). Uniform control flow only.
fn lanes_sum(lid: u32, v: f32) -> f32 {
    red1[lid] = v;
    workgroupBarrier();
    let lane = lid / CT;
    for (var s = (256u / CT) / 2u; s > 0u; s = s / 2u) {
        if (lane < s) {
            red1[lid] = red1[lid] + red1[lid + s * CT];
        }
        workgroupBarrier();
    }
    return red1[lid];
}

fn lanes_sum2(lid: u32, v: vec2<f32>) -> vec2<f32> {
    red2[lid] = v;
    workgroupBarrier();
    let lane = lid / CT;
    for (var s = (256u / CT) / 2u; s > 0u; s = s / 2u) {
        if (lane < s) {
            red2[lid] = red2[lid] + red2[lid + s * CT];
        }
        workgroupBarrier();
    }
    return red2[lid];
}

// col_sum: per column sum of x (SQ = false) or of (x - cmean[col])^2 (SQ = true).
@group(0) @binding(1) var<storage, read> cs_x: array<f32>;
@group(0) @binding(2) var<storage, read> cs_mean: array<f32>;
@group(0) @binding(3) var<storage, read_write> cs_part: array<f32>;

@compute @workgroup_size(256)
fn col_sum(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) lid: u32) {
    let p = col_pos(wid, nwg, lid);
    var acc = 0.0;
    if (p.on) {
        var m = 0.0;
        if (SQ) {
            m = cs_mean[p.col];
        }
        for (var r = p.r0 + p.lane; r < p.r1; r += 256u / CT) {
            let v = cs_x[r * cp.c + p.col];
            if (SQ) {
                let d = v - m;
                acc += d * d;
            } else {
                acc += v;
            }
        }
    }
    let s = lanes_sum(lid, acc);
    if (p.on && p.lane == 0u) {
        cs_part[p.col * cp.nchunks + p.chunk] = s;
    }
}

// col_grad: per column sums of dz * xhat (quantity 0) and dz (quantity 1), where
// dz = dy * act'(pre) and xhat = (x - mean) * rstd with mean / rstd per row (PER_ROW, LayerNorm)
// or per column (BatchNorm).
@group(0) @binding(1) var<storage, read> cg_x: array<f32>;
@group(0) @binding(2) var<storage, read> cg_dy: array<f32>;
@group(0) @binding(3) var<storage, read> cg_pre: array<f32>;
@group(0) @binding(4) var<storage, read> cg_mean: array<f32>;
@group(0) @binding(5) var<storage, read> cg_rstd: array<f32>;
@group(0) @binding(6) var<storage, read_write> cg_part: array<f32>;

@compute @workgroup_size(256)
fn col_grad(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let p = col_pos(wid, nwg, lid);
    var acc = vec2<f32>(0.0, 0.0);
    if (p.on) {
        var m = 0.0;
        var rs = 0.0;
        if (!PER_ROW) {
            m = cg_mean[p.col];
            rs = cg_rstd[p.col];
        }
        for (var r = p.r0 + p.lane; r < p.r1; r += 256u / CT) {
            let i = r * cp.c + p.col;
            if (PER_ROW) {
                m = cg_mean[r];
                rs = cg_rstd[r];
            }
            var dz = cg_dy[i];
            if (ACT != 0u) {
                dz *= activate_grad(cg_pre[i], ACT);
            }
            let xh = (cg_x[i] - m) * rs;
            acc += vec2<f32>(dz * xh, dz);
        }
    }
    let s = lanes_sum2(lid, acc);
    if (p.on && p.lane == 0u) {
        cg_part[p.col * cp.nchunks + p.chunk] = s.x;
        cg_part[(cp.c + p.col) * cp.nchunks + p.chunk] = s.y;
    }
}

// col_sum4 / col_grad4: col_sum / col_grad for C % 4 == 0, one vec4 of columns per invocation
// (cp.c and the column tiles counted in column quads; partial sums in the same layout as the
// scalar forms). CPU adapters scalarise every storage load: a quarter of the loads.
var<workgroup> red4: array<vec4<f32>, 256>;
var<workgroup> red4b: array<vec4<f32>, 256>;

fn lanes_sum4(lid: u32, v: vec4<f32>) -> vec4<f32> {
    red4[lid] = v;
    workgroupBarrier();
    let lane = lid / CT;
    for (var s = (256u / CT) / 2u; s > 0u; s = s / 2u) {
        if (lane < s) {
            red4[lid] = red4[lid] + red4[lid + s * CT];
        }
        workgroupBarrier();
    }
    return red4[lid];
}

// Sums a and b over the row lanes into red4[lid] and red4b[lid].
fn lanes_sum4x2(lid: u32, a: vec4<f32>, b: vec4<f32>) {
    red4[lid] = a;
    red4b[lid] = b;
    workgroupBarrier();
    let lane = lid / CT;
    for (var s = (256u / CT) / 2u; s > 0u; s = s / 2u) {
        if (lane < s) {
            red4[lid] = red4[lid] + red4[lid + s * CT];
            red4b[lid] = red4b[lid] + red4b[lid + s * CT];
        }
        workgroupBarrier();
    }
}

// Partial sums of quantity s for the 4 columns of quad q.
fn part4_index(s: u32, q: u32, j: u32, chunk: u32) -> u32 {
    return (s * 4u * cp.c + 4u * q + j) * cp.nchunks + chunk;
}

@group(0) @binding(1) var<storage, read> cs4_x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> cs4_mean: array<f32>;
@group(0) @binding(3) var<storage, read_write> cs4_part: array<f32>;

@compute @workgroup_size(256)
fn col_sum4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let p = col_pos(wid, nwg, lid);
    var acc = vec4(0.0);
    if (p.on) {
        var m = vec4(0.0);
        if (SQ) {
            let k = 4u * p.col;
            m = vec4(cs4_mean[k], cs4_mean[k + 1u], cs4_mean[k + 2u], cs4_mean[k + 3u]);
        }
        for (var r = p.r0 + p.lane; r < p.r1; r += 256u / CT) {
            let v = cs4_x[r * cp.c + p.col];
            if (SQ) {
                let d = v - m;
                acc += d * d;
            } else {
                acc += v;
            }
        }
    }
    let s = lanes_sum4(lid, acc);
    if (p.on && p.lane == 0u) {
        for (var j = 0u; j < 4u; j++) {
            cs4_part[part4_index(0u, p.col, j, p.chunk)] = s[j];
        }
    }
}

@group(0) @binding(1) var<storage, read> cg4_x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> cg4_dy: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> cg4_pre: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> cg4_mean: array<f32>;
@group(0) @binding(5) var<storage, read> cg4_rstd: array<f32>;
@group(0) @binding(6) var<storage, read_write> cg4_part: array<f32>;

@compute @workgroup_size(256)
fn col_grad4(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let p = col_pos(wid, nwg, lid);
    var a = vec4(0.0);
    var b = vec4(0.0);
    if (p.on) {
        var m = vec4(0.0);
        var rs = vec4(0.0);
        if (!PER_ROW) {
            let k = 4u * p.col;
            m = vec4(cg4_mean[k], cg4_mean[k + 1u], cg4_mean[k + 2u], cg4_mean[k + 3u]);
            rs = vec4(cg4_rstd[k], cg4_rstd[k + 1u], cg4_rstd[k + 2u], cg4_rstd[k + 3u]);
        }
        for (var r = p.r0 + p.lane; r < p.r1; r += 256u / CT) {
            let i = r * cp.c + p.col;
            if (PER_ROW) {
                m = vec4(cg4_mean[r]);
                rs = vec4(cg4_rstd[r]);
            }
            var dz = cg4_dy[i];
            if (ACT != 0u) {
                dz *= activate_grad4(cg4_pre[i], ACT);
            }
            let xh = (cg4_x[i] - m) * rs;
            a += dz * xh;
            b += dz;
        }
    }
    lanes_sum4x2(lid, a, b);
    if (p.on && p.lane == 0u) {
        let sa = red4[lid];
        let sb = red4b[lid];
        for (var j = 0u; j < 4u; j++) {
            cg4_part[part4_index(0u, p.col, j, p.chunk)] = sa[j];
            cg4_part[part4_index(1u, p.col, j, p.chunk)] = sb[j];
        }
    }
}

// Second level: out[j] = alpha * sum_k part[j * k_count + k] (fixed order), for j < jn; j < split
// goes to out0[j], the rest to out1[j - split]; ACCUM adds into the outputs.
struct ReduceParams {
    jn: u32,
    kn: u32,
    split: u32,
    alpha: f32,
}

@group(0) @binding(0) var<uniform> rp: ReduceParams;
@group(0) @binding(1) var<storage, read> rd_part: array<f32>;
@group(0) @binding(2) var<storage, read_write> rd_out0: array<f32>;
@group(0) @binding(3) var<storage, read_write> rd_out1: array<f32>;

@compute @workgroup_size(64)
fn reduce_part(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let j = flat_group(wid, nwg);
    var acc = 0.0;
    if (j < rp.jn) {
        for (var k = lid; k < rp.kn; k += 64u) {
            acc += rd_part[j * rp.kn + k];
        }
    }
    red1[lid] = acc;
    workgroupBarrier();
    for (var s = 32u; s > 0u; s = s / 2u) {
        if (lid < s) {
            red1[lid] = red1[lid] + red1[lid + s];
        }
        workgroupBarrier();
    }
    if (lid != 0u || j >= rp.jn) {
        return;
    }
    let v = rp.alpha * red1[0];
    if (j < rp.split) {
        if (ACCUM) {
            rd_out0[j] = rd_out0[j] + v;
        } else {
            rd_out0[j] = v;
        }
    } else {
        let o = j - rp.split;
        if (ACCUM) {
            rd_out1[o] = rd_out1[o] + v;
        } else {
            rd_out1[o] = v;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// BatchNorm2d on [rows = B*H*W, C].

struct BnParams {
    n: u32,          // elements (rows * c) or channels (per-channel kernels)
    c: u32,
    momentum: f32,
    eps: f32,
    unbias: f32,     // rows / (rows - 1)
    update: u32,     // bn_finalize: update the running statistics
    inv_rows: f32,
    pad: u32,
}

@group(0) @binding(0) var<uniform> bp: BnParams;

fn elem_index(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return flat_group(wid, nwg) * 64u + lid;
}

// Per channel: rstd = 1/sqrt(var + eps); running statistics updated in place.
@group(0) @binding(1) var<storage, read> bf_mean: array<f32>;
@group(0) @binding(2) var<storage, read> bf_var: array<f32>;
@group(0) @binding(3) var<storage, read_write> bf_rstd: array<f32>;
@group(0) @binding(4) var<storage, read_write> bf_rmean: array<f32>;
@group(0) @binding(5) var<storage, read_write> bf_rvar: array<f32>;

@compute @workgroup_size(64)
fn bn_finalize(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let i = elem_index(wid, nwg, lid);
    if (i >= bp.c) {
        return;
    }
    let v = bf_var[i];
    bf_rstd[i] = 1.0 / sqrt(v + bp.eps);
    if (bp.update != 0u) {
        let mo = bp.momentum;
        bf_rmean[i] = (1.0 - mo) * bf_rmean[i] + mo * bf_mean[i];
        bf_rvar[i] = (1.0 - mo) * bf_rvar[i] + mo * v * bp.unbias;
    }
}

// Per channel rstd from the running variance (eval mode).
@group(0) @binding(1) var<storage, read> br_var: array<f32>;
@group(0) @binding(2) var<storage, read_write> br_rstd: array<f32>;

@compute @workgroup_size(64)
fn bn_rstd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) lid: u32) {
    let i = elem_index(wid, nwg, lid);
    if (i >= bp.c) {
        return;
    }
    br_rstd[i] = 1.0 / sqrt(br_var[i] + bp.eps);
}

// bn_apply: y = act((x - mean[ch]) * rstd[ch] * w[ch] + b[ch]); SAVE_PRE stores the
// pre-activation. bn_bwd_dx: BatchNorm backward, dx, with sums = [sum dz*xhat (c values),
// sum dz (c values)]:
//   train: dx = w * rstd * (dz - sum(dz)/rows - xhat * sum(dz*xhat)/rows)
//   eval:  dx = w * rstd * dz
// Invocation t takes channel t % c of rows (t / c) * RB .. (RB rows share the per-channel loads).
// bn_apply4 / bn_bwd_dx4: the same for C % 4 == 0 with one vec4 of channels per invocation (bp.n
// and bp.c counted in vec4s), the same arithmetic per component. CPU adapters scalarise every
// storage load, so this needs a quarter of the loads and index divisions.
override RB: u32 = 1u;

//#width
@group(0) @binding(1) var<storage, read> ba_x$S: array<$T>;
@group(0) @binding(2) var<storage, read> ba_mean$S: array<$T>;
@group(0) @binding(3) var<storage, read> ba_rstd$S: array<$T>;
@group(0) @binding(4) var<storage, read> ba_w$S: array<$T>;
@group(0) @binding(5) var<storage, read> ba_b$S: array<$T>;
@group(0) @binding(6) var<storage, read_write> ba_y$S: array<$T>;
@group(0) @binding(7) var<storage, read_write> ba_pre$S: array<$T>;

@compute @workgroup_size(64)
fn bn_apply$S(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let t = elem_index(wid, nwg, lid);
    let ch = t % bp.c;
    let i0 = (t / bp.c) * RB * bp.c + ch;
    if (i0 >= bp.n) {
        return;
    }
    let mean = ba_mean$S[ch];
    let rs = ba_rstd$S[ch];
    let w = ba_w$S[ch];
    let b = ba_b$S[ch];
    for (var r = 0u; r < RB; r++) {
        let i = i0 + r * bp.c;
        if (i >= bp.n) {
            break;
        }
        let z = (ba_x$S[i] - mean) * rs * w + b;
        ba_y$S[i] = activate$S(z, ACT);
        if (SAVE_PRE) {
            ba_pre$S[i] = z;
        }
    }
}

@group(0) @binding(1) var<storage, read> bb_x$S: array<$T>;
@group(0) @binding(2) var<storage, read> bb_dy$S: array<$T>;
@group(0) @binding(3) var<storage, read> bb_pre$S: array<$T>;
@group(0) @binding(4) var<storage, read> bb_mean$S: array<$T>;
@group(0) @binding(5) var<storage, read> bb_rstd$S: array<$T>;
@group(0) @binding(6) var<storage, read> bb_w$S: array<$T>;
@group(0) @binding(7) var<storage, read> bb_sums$S: array<$T>;
@group(0) @binding(8) var<storage, read_write> bb_dx$S: array<$T>;

@compute @workgroup_size(64)
fn bn_bwd_dx$S(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let t = elem_index(wid, nwg, lid);
    let ch = t % bp.c;
    let i0 = (t / bp.c) * RB * bp.c + ch;
    if (i0 >= bp.n) {
        return;
    }
    let rs = bb_rstd$S[ch];
    let g = bb_w$S[ch] * rs;
    let mean = bb_mean$S[ch];
    // TRAIN: dx = g * (dz - mean(dz) - xhat * mean(dz * xhat)), xhat = (x - mean) * rs
    let mdz = bb_sums$S[bp.c + ch] * bp.inv_rows;
    let mdzx = bb_sums$S[ch] * bp.inv_rows;
    for (var r = 0u; r < RB; r++) {
        let i = i0 + r * bp.c;
        if (i >= bp.n) {
            break;
        }
        var dz = bb_dy$S[i];
        if (ACT != 0u) {
            dz *= activate_grad$S(bb_pre$S[i], ACT);
        }
        var d: $T;
        if (TRAIN) {
            let xh = (bb_x$S[i] - mean) * rs;
            d = g * (dz - mdz - xh * mdzx);
        } else {
            d = g * dz;
        }
        if (ACCUM) {
            d += bb_dx$S[i];
        }
        bb_dx$S[i] = d;
    }
}
//#end

// dw += sum(dz*xhat), db += sum(dz), per channel.
@group(0) @binding(1) var<storage, read> bg_sums: array<f32>;
@group(0) @binding(2) var<storage, read_write> bg_dw: array<f32>;
@group(0) @binding(3) var<storage, read_write> bg_db: array<f32>;

@compute @workgroup_size(64)
fn bn_bwd_params(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let i = elem_index(wid, nwg, lid);
    if (i >= bp.c) {
        return;
    }
    bg_dw[i] = bg_dw[i] + bg_sums[i];
    bg_db[i] = bg_db[i] + bg_sums[bp.c + i];
}
