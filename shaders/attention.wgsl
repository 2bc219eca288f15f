// ---- attention.wgsl: window partition/reverse and the attention core (forward + backward) ----
//
// The attention core is a "flash" style kernel: no score matrix is stored and no workgroup barrier
// is used. Each invocation owns R rows of the "own" side (queries for the forward and dq, keys for
// dk/dv), keeps them in registers and loops over the other side with an online softmax (or the
// recomputed probabilities in the backward):
//   !PAR: invocation `lane` of lane block `blk` owns rows blk*WG*R + r*WG + lane (r < R) and loops
//         over the whole other side; all invocations of a workgroup share (problem z, head h), so
//         the loop's loads are uniform.
//   PAR:  every invocation owns the same rows 0..R (a short own side, R >= its length) and loops
//         over its own chunk (sp*WG + lane) of the other side; results are partial (per chunk) and
//         merged by attn_combine (forward) or attn_gather (backward).
// Why registers: on lavapipe (Mesa 22) every storage-buffer load is a scalar loop over the SIMD
// lanes (~100+ instructions per load, even when all lanes read the same address), so the kernel
// maximises the arithmetic per load: each loaded k/v (or q/dout) value feeds R rows. On GPUs the
// wrapper uses R = 1.
//
// Rows are read as vec4 chunks (D4 = ceil(head_dim/4) per row): the wrapper only passes layouts
// whose offsets and strides are multiples of 4 elements, repacking other ones into zero-padded
// copies first (attn_repack). Layout fields below are in vec4 units:
//   row i of head h in problem z starts at chunk  z*X_z + i*X_row + h*X_h + X_off.
// Logits: s_ij = scale * q_i.k_j (+ bias[h, |ri-rj|*ws + |ci-cj|] with i = ri*ws+ci when HAS_BIAS).
// Statistics per (z, h, i): lse = log(sum_j exp(s_ij)) (saved by the training forward).
//
// Register arrays: every index into them must be a compile-time constant. naga clamps dynamic
// indices, which keeps NIR from unrolling loops, and a rolled access to a private array costs
// lavapipe a scatter/gather over the lanes. So the loops over rows (r < R) and chunks (c < D4) are
// written out at the end of this file (by `for` directives, expanded by the pipeline cache):
// `xR_op()` calls the row function `xr_op(r)` for literal r = 0..15 and `xa_op(r)` calls the chunk
// function `xc_op(r, c)` for literal c = 0..15; calls past R and D4 (pipeline constants) fold
// away. Arguments travel in private scalars (g_*).

override D4: u32 = 8u;            // vec4 chunks per head row (head_dim <= 4 * D4 <= 64)
override R: u32 = 1u;             // own rows per invocation (R * D4 <= CMAX)
override WG: u32 = 64u;           // invocations per workgroup of the core kernels
override PAR: bool = false;       // split the looped side over invocations (see above)
override HAS_BIAS: bool = false;  // TinyViT relative position bias
override SAVE_LSE: bool = false;  // forward: also write lse per query
override DIRECT: bool = true;     // dk/dv: write the k_*/v_* layouts (else partials)
override ACCUM: bool = false;     // partition / reverse: add into the destination
override HAS_RES: bool = false;   // reverse: add a residual
override DRES: bool = false;      // partition: also add the source into a second destination

const RMAX: u32 = 16u;
// Register-row array size (vec4). Also keeps the private memory of the biggest entry point
// (attn_bwd_dkv: 4 arrays) under WGSL's 8192-byte limit for the private address space.
const CMAX: u32 = 104u;
const NEG: f32 = -1.0e30;

struct AttnParams {
    lq: u32,
    lk: u32,
    heads: u32,
    nz: u32,
    q_off: u32,
    q_row: u32,
    q_z: u32,
    q_h: u32,
    k_off: u32,
    k_row: u32,
    k_z: u32,
    k_h: u32,
    v_off: u32,
    v_row: u32,
    v_z: u32,
    v_h: u32,
    o_off: u32,
    o_row: u32,
    o_z: u32,
    o_h: u32,
    blocks: u32,     // lane blocks per (problem, head)
    splits: u32,     // workgroups along the looped side (PAR); chunks to merge (merge kernels)
    split_len: u32,  // looped rows per chunk (PAR)
    zgroup: u32,     // problems per workgroup (dq kernel with bias); component (attn_gather)
    ngroups: u32,    // ceil(nz / zgroup)
    ws: u32,         // window size (bias); partial row width in chunks (attn_gather)
    scale: f32,
    total: u32,      // workgroups in the grid
}

@group(0) @binding(0) var<uniform> ap: AttnParams;

// Decoded workgroup position of the core kernels.
struct Pos {
    z: u32,      // problem (or problem group for the dq kernel)
    h: u32,
    row0: u32,   // first own row of this invocation
    rstep: u32,  // distance between its own rows
    chunk: u32,  // PAR: chunk of the looped side
}

fn decode(g: u32, li: u32) -> Pos {
    var p: Pos;
    let sp = g % ap.splits;
    var t = g / ap.splits;
    let blk = t % ap.blocks;
    t = t / ap.blocks;
    p.h = t % ap.heads;
    p.z = t / ap.heads;
    if (PAR) {
        p.row0 = 0u;
        p.rstep = 1u;
        p.chunk = sp * WG + li;
    } else {
        p.row0 = blk * WG * R + li;
        p.rstep = WG;
        p.chunk = 0u;
    }
    return p;
}

// Range [start, end) of the looped side (length `len`) handled by this invocation.
fn loop_range(p: Pos, len: u32) -> vec2<u32> {
    if (PAR) {
        let s = min(p.chunk * ap.split_len, len);
        return vec2<u32>(s, min(s + ap.split_len, len));
    }
    return vec2<u32>(0u, len);
}

// Private state of the core kernels (see the note on register arrays above).
var<private> ra: array<vec4<f32>, CMAX>;  // own rows: q (scaled) / k (scaled)
var<private> rb: array<vec4<f32>, CMAX>;  // own rows: dout (dq) / v (dk/dv)
var<private> rc: array<vec4<f32>, CMAX>;  // accumulators: out / dq / dv
var<private> rd: array<vec4<f32>, CMAX>;  // accumulators: dk
var<private> rs1: array<f32, RMAX>;       // running max / lse
var<private> rs2: array<f32, RMAX>;       // running sum / delta
var<private> rrow: array<u32, RMAX>;      // own row index (clamped)
var<private> rri: array<u32, RMAX>;       // own row's position in the window (bias)
var<private> rci: array<u32, RMAX>;
var<private> ck: array<vec4<f32>, 16>;    // current looped row: k (fwd, dq) / q (dk/dv)
var<private> cv: array<vec4<f32>, 16>;    // current looped row: v (fwd, dq) / dout (dk/dv)
var<private> g_pos: Pos;
var<private> g_addr: u32;                 // chunk address of the row being loaded / stored
var<private> g_addr2: u32;
var<private> g_la: u32;                   // chunk address of the current looped row (first view)
var<private> g_lb: u32;                   // ... second view
var<private> g_j: u32;                    // current looped row
var<private> g_rj: u32;                   // its window position (bias)
var<private> g_cj: u32;
var<private> g_lse: f32;                  // dk/dv: lse and delta of the current query
var<private> g_delta: f32;
var<private> g_a: f32;
var<private> g_b: f32;
var<private> g_s4: vec4<f32>;
var<private> g_p4: vec4<f32>;

fn hsum(v: vec4<f32>) -> f32 {
    return (v.x + v.y) + (v.z + v.w);
}

// Own row r: its index (may be past the own length) and, for the bias, its window position.
fn set_row(r: u32, len: u32) {
    let i = min(g_pos.row0 + r * g_pos.rstep, len - 1u);
    rrow[r] = i;
    if (HAS_BIAS) {
        rri[r] = i / ap.ws;
        rci[r] = i % ap.ws;
    }
}

fn own_valid(r: u32, len: u32) -> bool {
    return g_pos.row0 + r * g_pos.rstep < len;
}

// Window position of the first looped row, then advanced by next_looped().
fn start_looped(j: u32) {
    g_j = j;
    if (HAS_BIAS) {
        g_rj = j / ap.ws;
        g_cj = j % ap.ws;
    }
}

fn next_looped() {
    g_j += 1u;
    if (HAS_BIAS) {
        g_cj += 1u;
        if (g_cj == ap.ws) {
            g_cj = 0u;
            g_rj += 1u;
        }
    }
}

// bias[h, |ri - rj| * ws + |ci - cj|] for own row r and the current looped row.
fn rel_bias(r: u32) -> f32 {
    let dr = select(g_rj - rri[r], rri[r] - g_rj, rri[r] >= g_rj);
    let dc = select(g_cj - rci[r], rci[r] - g_cj, rci[r] >= g_cj);
    return x_bias[g_pos.h * ap.ws * ap.ws + dr * ap.ws + dc];
}

// Bindings shared by the core kernels: q, k, v, bias (always 1..4), dout (5, backward), and
// per kernel: out (5) + stat (6) in the forward; stat (6), dq (7), T (8) in the dq kernel;
// stat (6), dkv (7) in the dk/dv kernel.
@group(0) @binding(1) var<storage, read> x_q: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> x_k: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> x_v: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> x_bias: array<f32>;

// ---------------------------------------------------------------------------------------------
// Forward. !PAR: out in the o_* layout, stat[(z*heads+h)*lq+i] = lse when SAVE_LSE.
// PAR: out = partial acc [chunk, z, h, i, D4] (unnormalised), stat = (max, sum) pairs.

@group(0) @binding(5) var<storage, read_write> f_out: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read_write> f_stat: array<f32>;

fn xc_f_init(r: u32, c: u32) {
    ra[r * D4 + c] = x_q[g_addr + c] * ap.scale;
    rc[r * D4 + c] = vec4<f32>(0.0);
}
fn xc_load_kv(r: u32, c: u32) {
    ck[c] = x_k[g_la + c];
    cv[c] = x_v[g_lb + c];
}
fn xc_dot_a(r: u32, c: u32) {
    g_s4 = fma(ra[r * D4 + c], ck[c], g_s4);
}
fn xc_f_acc(r: u32, c: u32) {
    rc[r * D4 + c] = fma(vec4<f32>(g_b), cv[c], rc[r * D4 + c] * g_a);
}
fn xc_f_store(r: u32, c: u32) {
    f_out[g_addr + c] = rc[r * D4 + c] * g_a;
}

fn xr_f_init(r: u32) {
    set_row(r, ap.lq);
    g_addr = g_pos.z * ap.q_z + rrow[r] * ap.q_row + g_pos.h * ap.q_h + ap.q_off;
    xa_f_init(r);
    rs1[r] = NEG;
    rs2[r] = 0.0;
}

// Online softmax step of own row r with key g_j.
fn xr_f_step(r: u32) {
    g_s4 = vec4<f32>(0.0);
    xa_dot_a(r);
    var s = hsum(g_s4);
    if (HAS_BIAS) {
        s += rel_bias(r);
    }
    let mn = max(rs1[r], s);
    g_a = exp(rs1[r] - mn);
    g_b = exp(s - mn);
    rs1[r] = mn;
    rs2[r] = fma(rs2[r], g_a, g_b);
    xa_f_acc(r);
}

fn xr_f_store(r: u32) {
    if (!own_valid(r, ap.lq)) {
        return;
    }
    let i = rrow[r];
    let rows = ap.nz * ap.heads * ap.lq;
    let row = (g_pos.z * ap.heads + g_pos.h) * ap.lq + i;
    if (PAR) {
        g_addr = (g_pos.chunk * rows + row) * D4;
        g_a = 1.0;
        xa_f_store(r);
        f_stat[2u * (g_pos.chunk * rows + row)] = rs1[r];
        f_stat[2u * (g_pos.chunk * rows + row) + 1u] = rs2[r];
    } else {
        g_addr = g_pos.z * ap.o_z + i * ap.o_row + g_pos.h * ap.o_h + ap.o_off;
        g_a = 1.0 / rs2[r];
        xa_f_store(r);
        if (SAVE_LSE) {
            f_stat[row] = rs1[r] + log(rs2[r]);
        }
    }
}

//#if SG == 1
// Subgroup module (ShaderFamily::AttentionSg: adapters with 8-wide subgroups, !PAR only): the 8
// lanes of a subgroup all loop over the same rows of the other side, so lane l loads chunks l and
// l + 8 of the two rows each step needs and hands them to the others with subgroupBroadcast (an
// extract and a broadcast on llvmpipe) instead of every lane loading all D4 chunks (each load a
// scalar loop over the lanes there).
fn sg_share(k0: vec4<f32>, v0: vec4<f32>, k1: vec4<f32>, v1: vec4<f32>) {
    //#for c in 0..8
    if (${c}u < D4) {
        ck[${c}u] = subgroupBroadcast(k0, ${c}u);
        cv[${c}u] = subgroupBroadcast(v0, ${c}u);
    }
    if (${c}u + 8u < D4) {
        ck[${c}u + 8u] = subgroupBroadcast(k1, ${c}u);
        cv[${c}u + 8u] = subgroupBroadcast(v1, ${c}u);
    }
    //#end
}

// What xa_load_kv(0u) loads (forward, dq): key and value row.
fn sg_load_kv(sl: u32) {
    let c0 = min(sl, D4 - 1u);
    let c1 = min(sl + 8u, D4 - 1u);
    var k1 = vec4<f32>(0.0);
    var v1 = vec4<f32>(0.0);
    if (D4 > 8u) {
        k1 = x_k[g_la + c1];
        v1 = x_v[g_lb + c1];
    }
    sg_share(x_k[g_la + c0], x_v[g_lb + c0], k1, v1);
}

// What xa_load_qo(0u) loads (dk/dv): query and output-gradient row.
fn sg_load_qo(sl: u32) {
    let c0 = min(sl, D4 - 1u);
    let c1 = min(sl + 8u, D4 - 1u);
    var q1 = vec4<f32>(0.0);
    var o1 = vec4<f32>(0.0);
    if (D4 > 8u) {
        q1 = x_q[g_la + c1];
        o1 = b_dout[g_lb + c1];
    }
    sg_share(x_q[g_la + c0], b_dout[g_lb + c0], q1, o1);
}
//#end

@compute @workgroup_size(WG)
fn attn_fwd(@builtin(workgroup_id) wid: vec3<u32>,
            @builtin(num_workgroups) nwg: vec3<u32>,
            //#if SG == 1
            @builtin(subgroup_invocation_id) sl: u32,
            //#end
            @builtin(local_invocation_index) li: u32) {
    let g = flat_group(wid, nwg);
    if (g >= ap.total) {
        return;
    }
    g_pos = decode(g, li);
    xR_f_init();
    let kz = g_pos.z * ap.k_z + g_pos.h * ap.k_h + ap.k_off;
    let vz = g_pos.z * ap.v_z + g_pos.h * ap.v_h + ap.v_off;
    let range = loop_range(g_pos, ap.lk);
    start_looped(range.x);
    for (var j = range.x; j < range.y; j++) {
        g_la = kz + j * ap.k_row;
        g_lb = vz + j * ap.v_row;
        //#if SG == 1
        sg_load_kv(sl);
        //#else
        xa_load_kv(0u);
        //#end
        xR_f_step();
        next_looped();
    }
    xR_f_store();
}

// ---------------------------------------------------------------------------------------------
// Merge of the PAR chunks of attn_fwd. One invocation per (z, h, i); `splits` = number of chunks.
// Bindings: partial acc, (max, sum) pairs, out (o_* layout), lse (when SAVE_LSE).

@group(0) @binding(1) var<storage, read> c_part: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> c_ml: array<f32>;
@group(0) @binding(3) var<storage, read_write> c_out: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> c_lse: array<f32>;

fn xc_c_init(r: u32, c: u32) {
    rc[c] = vec4<f32>(0.0);
}
fn xc_c_add(r: u32, c: u32) {
    rc[c] = fma(vec4<f32>(g_a), c_part[g_addr + c], rc[c]);
}
fn xc_c_store(r: u32, c: u32) {
    c_out[g_addr + c] = rc[c] * g_a;
}

@compute @workgroup_size(64)
fn attn_combine(@builtin(workgroup_id) wid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) li: u32) {
    let row = flat_group(wid, nwg) * 64u + li;
    let rows = ap.nz * ap.heads * ap.lq;
    if (row >= rows) {
        return;
    }
    let i = row % ap.lq;
    let h = (row / ap.lq) % ap.heads;
    let z = row / (ap.lq * ap.heads);
    var mx = NEG;
    for (var s = 0u; s < ap.splits; s++) {
        mx = max(mx, c_ml[2u * (s * rows + row)]);
    }
    var l = 0.0;
    xa_c_init(0u);
    for (var s = 0u; s < ap.splits; s++) {
        g_a = exp(c_ml[2u * (s * rows + row)] - mx);
        l = fma(c_ml[2u * (s * rows + row) + 1u], g_a, l);
        g_addr = (s * rows + row) * D4;
        xa_c_add(0u);
    }
    g_a = 1.0 / l;
    g_addr = z * ap.o_z + i * ap.o_row + h * ap.o_h + ap.o_off;
    xa_c_store(0u);
    if (SAVE_LSE) {
        c_lse[row] = mx + log(l);
    }
}

// ---------------------------------------------------------------------------------------------
// Backward preparation: stat[2*row] = lse, stat[2*row+1] = delta = dout_i . out_i (per head).
// Bindings: out, dout (both o_* layout), lse, stat.

@group(0) @binding(1) var<storage, read> p_out: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> p_dout: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> p_lse: array<f32>;
@group(0) @binding(4) var<storage, read_write> p_stat: array<f32>;

@compute @workgroup_size(64)
fn attn_bwd_prep(@builtin(workgroup_id) wid: vec3<u32>,
                 @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) li: u32) {
    let row = flat_group(wid, nwg) * 64u + li;
    if (row >= ap.nz * ap.heads * ap.lq) {
        return;
    }
    let i = row % ap.lq;
    let h = (row / ap.lq) % ap.heads;
    let z = row / (ap.lq * ap.heads);
    let ob = z * ap.o_z + i * ap.o_row + h * ap.o_h + ap.o_off;
    var delta = vec4<f32>(0.0);
    for (var c = 0u; c < D4; c++) {
        delta = fma(p_out[ob + c], p_dout[ob + c], delta);
    }
    p_stat[2u * row] = p_lse[row];
    p_stat[2u * row + 1u] = hsum(delta);
}

// ---------------------------------------------------------------------------------------------
// Backward, query side: dq_i = scale * sum_j dS_ij k_j, dS_ij = P_ij (dout_i.v_j - delta_i),
// P_ij = exp(s_ij - lse_i). Own rows = queries, looped side = keys. Grid (problem group, head,
// lane block, chunk); the workgroup loops over the `zgroup` problems of its group and, with
// HAS_BIAS, accumulates T[group, h, j, i] = sum over the group's problems of dS_ij (for attn_dbias).
// !PAR: dq to the q_* layout of b_dq; PAR: partials [chunk, z, h, i, D4].

@group(0) @binding(5) var<storage, read> b_dout: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read> b_stat: array<f32>;
// The same binding as (lse, delta) pairs: attn_bwd_dkv reads one pair per looped query row, one
// load where two scalar loads cost two lane loops on llvmpipe.
@group(0) @binding(6) var<storage, read> b_stat2: array<vec2<f32>>;
@group(0) @binding(7) var<storage, read_write> b_dq: array<vec4<f32>>;
@group(0) @binding(8) var<storage, read_write> b_t: array<f32>;

fn xc_q_init(r: u32, c: u32) {
    ra[r * D4 + c] = x_q[g_addr + c] * ap.scale;
    rb[r * D4 + c] = b_dout[g_addr2 + c];
    rc[r * D4 + c] = vec4<f32>(0.0);
}
fn xc_dot_ab(r: u32, c: u32) {
    g_s4 = fma(ra[r * D4 + c], ck[c], g_s4);
    g_p4 = fma(rb[r * D4 + c], cv[c], g_p4);
}
fn xc_q_acc(r: u32, c: u32) {
    rc[r * D4 + c] = fma(vec4<f32>(g_b), ck[c], rc[r * D4 + c]);
}
fn xc_q_store(r: u32, c: u32) {
    b_dq[g_addr + c] = rc[r * D4 + c] * ap.scale;
}

var<private> g_z: u32;
var<private> g_zz: u32;

fn xr_q_init(r: u32) {
    set_row(r, ap.lq);
    let i = rrow[r];
    g_addr = g_z * ap.q_z + i * ap.q_row + g_pos.h * ap.q_h + ap.q_off;
    g_addr2 = g_z * ap.o_z + i * ap.o_row + g_pos.h * ap.o_h + ap.o_off;
    xa_q_init(r);
    let row = (g_z * ap.heads + g_pos.h) * ap.lq + i;
    rs1[r] = b_stat[2u * row];
    rs2[r] = b_stat[2u * row + 1u];
}

fn xr_q_step(r: u32) {
    g_s4 = vec4<f32>(0.0);
    g_p4 = vec4<f32>(0.0);
    xa_dot_ab(r);
    var s = hsum(g_s4);
    if (HAS_BIAS) {
        s += rel_bias(r);
    }
    g_b = exp(s - rs1[r]) * (hsum(g_p4) - rs2[r]);
    if (HAS_BIAS && own_valid(r, ap.lq)) {
        let ti = ((g_pos.z * ap.heads + g_pos.h) * ap.lk + g_j) * ap.lq + rrow[r];
        if (g_zz == 0u) {
            b_t[ti] = g_b;
        } else {
            b_t[ti] += g_b;
        }
    }
    xa_q_acc(r);
}

fn xr_q_store(r: u32) {
    if (!own_valid(r, ap.lq)) {
        return;
    }
    let i = rrow[r];
    if (PAR) {
        g_addr = (g_pos.chunk * ap.nz * ap.heads * ap.lq + (g_z * ap.heads + g_pos.h) * ap.lq + i) * D4;
    } else {
        g_addr = g_z * ap.q_z + i * ap.q_row + g_pos.h * ap.q_h + ap.q_off;
    }
    xa_q_store(r);
}

@compute @workgroup_size(WG)
fn attn_bwd_dq(@builtin(workgroup_id) wid: vec3<u32>,
               @builtin(num_workgroups) nwg: vec3<u32>,
               //#if SG == 1
               @builtin(subgroup_invocation_id) sl: u32,
               //#end
               @builtin(local_invocation_index) li: u32) {
    let g = flat_group(wid, nwg);
    if (g >= ap.total) {
        return;
    }
    g_pos = decode(g, li);
    let range = loop_range(g_pos, ap.lk);
    for (var zz = 0u; zz < ap.zgroup; zz++) {
        g_zz = zz;
        g_z = g_pos.z * ap.zgroup + zz;
        if (g_z >= ap.nz) {
            break;
        }
        xR_q_init();
        let kz = g_z * ap.k_z + g_pos.h * ap.k_h + ap.k_off;
        let vz = g_z * ap.v_z + g_pos.h * ap.v_h + ap.v_off;
        start_looped(range.x);
        for (var j = range.x; j < range.y; j++) {
            g_la = kz + j * ap.k_row;
            g_lb = vz + j * ap.v_row;
            //#if SG == 1
            sg_load_kv(sl);
            //#else
            xa_load_kv(0u);
            //#end
            xR_q_step();
            next_looped();
        }
        xR_q_store();
    }
}

// ---------------------------------------------------------------------------------------------
// Backward, key side: dv_j = sum_i P_ij dout_i, dk_j = scale * sum_i dS_ij q_i. Own rows = keys,
// looped side = queries. DIRECT (and !PAR): dk to the k_* layout and dv to the v_* layout of one
// output buffer (e.g. dqkv); otherwise partials [chunk, z, h, j, 2, D4] (dk then dv).

@group(0) @binding(7) var<storage, read_write> b_dkv: array<vec4<f32>>;

fn xc_k_init(r: u32, c: u32) {
    ra[r * D4 + c] = x_k[g_addr + c] * ap.scale;
    rb[r * D4 + c] = x_v[g_addr2 + c];
    rc[r * D4 + c] = vec4<f32>(0.0);
    rd[r * D4 + c] = vec4<f32>(0.0);
}
fn xc_load_qo(r: u32, c: u32) {
    ck[c] = x_q[g_la + c];
    cv[c] = b_dout[g_lb + c];
}
fn xc_k_acc(r: u32, c: u32) {
    rc[r * D4 + c] = fma(vec4<f32>(g_a), cv[c], rc[r * D4 + c]);
    rd[r * D4 + c] = fma(vec4<f32>(g_b), ck[c], rd[r * D4 + c]);
}
fn xc_k_store(r: u32, c: u32) {
    b_dkv[g_addr + c] = rd[r * D4 + c] * ap.scale;
    b_dkv[g_addr2 + c] = rc[r * D4 + c];
}

fn xr_k_init(r: u32) {
    set_row(r, ap.lk);
    let j = rrow[r];
    g_addr = g_pos.z * ap.k_z + j * ap.k_row + g_pos.h * ap.k_h + ap.k_off;
    g_addr2 = g_pos.z * ap.v_z + j * ap.v_row + g_pos.h * ap.v_h + ap.v_off;
    xa_k_init(r);
}

// Own key row r with the current query g_j (lse g_lse, delta g_delta).
fn xr_k_step(r: u32) {
    g_s4 = vec4<f32>(0.0);
    g_p4 = vec4<f32>(0.0);
    xa_dot_ab(r);
    var s = hsum(g_s4);
    if (HAS_BIAS) {
        s += rel_bias(r);
    }
    g_a = exp(s - g_lse);
    g_b = g_a * (hsum(g_p4) - g_delta);
    xa_k_acc(r);
}

fn xr_k_store(r: u32) {
    if (!own_valid(r, ap.lk)) {
        return;
    }
    let j = rrow[r];
    if (PAR || !DIRECT) {
        g_addr = (g_pos.chunk * ap.nz * ap.heads * ap.lk + (g_pos.z * ap.heads + g_pos.h) * ap.lk + j) * 2u * D4;
        g_addr2 = g_addr + D4;
    } else {
        g_addr = g_pos.z * ap.k_z + j * ap.k_row + g_pos.h * ap.k_h + ap.k_off;
        g_addr2 = g_pos.z * ap.v_z + j * ap.v_row + g_pos.h * ap.v_h + ap.v_off;
    }
    xa_k_store(r);
}

@compute @workgroup_size(WG)
fn attn_bwd_dkv(@builtin(workgroup_id) wid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>,
                //#if SG == 1
                @builtin(subgroup_invocation_id) sl: u32,
                //#end
                @builtin(local_invocation_index) li: u32) {
    let g = flat_group(wid, nwg);
    if (g >= ap.total) {
        return;
    }
    g_pos = decode(g, li);
    xR_k_init();
    let qz = g_pos.z * ap.q_z + g_pos.h * ap.q_h + ap.q_off;
    let oz = g_pos.z * ap.o_z + g_pos.h * ap.o_h + ap.o_off;
    let sz = (g_pos.z * ap.heads + g_pos.h) * ap.lq;
    let range = loop_range(g_pos, ap.lq);
    start_looped(range.x);
    for (var i = range.x; i < range.y; i++) {
        g_la = qz + i * ap.q_row;
        g_lb = oz + i * ap.o_row;
        //#if SG == 1
        sg_load_qo(sl);
        //#else
        xa_load_qo(0u);
        //#end
        let st = b_stat2[sz + i];
        g_lse = st.x;
        g_delta = st.y;
        xR_k_step();
        next_looped();
    }
    xR_k_store();
}

// ---------------------------------------------------------------------------------------------
// Sum of backward partials into a strided destination. One invocation per (z, h, i, chunk c):
//   dst[z*o_z + i*o_row + h*o_h + o_off + c] = sum_split part[((split, z, h, i) * width + comp) * D4 + c]
// with width = ws (1 for dq, 2 for dk/dv) and comp = zgroup (0 or 1) -- fields reused.
// Bindings: part, dst.

@group(0) @binding(1) var<storage, read> g_part: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> g_dst: array<vec4<f32>>;

@compute @workgroup_size(64)
fn attn_gather(@builtin(workgroup_id) wid: vec3<u32>,
               @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) li: u32) {
    let e = flat_group(wid, nwg) * 64u + li;
    let rows = ap.nz * ap.heads * ap.lq;
    if (e >= rows * D4) {
        return;
    }
    let c = e % D4;
    let row = e / D4;
    let i = row % ap.lq;
    let h = (row / ap.lq) % ap.heads;
    let z = row / (ap.lq * ap.heads);
    var s = vec4<f32>(0.0);
    for (var sp = 0u; sp < ap.splits; sp++) {
        s += g_part[((sp * rows + row) * ap.ws + ap.zgroup) * D4 + c];
    }
    g_dst[z * ap.o_z + i * ap.o_row + h * ap.o_h + ap.o_off + c] = s;
}

// ---------------------------------------------------------------------------------------------
// Row repacking between an arbitrary layout and a 16-byte aligned zero-padded one (element units
// here, not vec4). One invocation per destination element (z, i, h, d) with d < width:
//   dst[z*dst_z + i*dst_row + h*dst_h + dst_off + d] = d < valid ? src[z*src_z + i*src_row + h*src_h + src_off + d] : 0
// for rows i < len. Bindings: src, dst.

struct RepackParams {
    len: u32,
    heads: u32,
    nz: u32,
    width: u32,   // values per destination row
    valid: u32,   // values per source row
    src_off: u32,
    src_row: u32,
    src_z: u32,
    src_h: u32,
    dst_off: u32,
    dst_row: u32,
    dst_z: u32,
    dst_h: u32,
}

@group(0) @binding(0) var<uniform> kp: RepackParams;
@group(0) @binding(1) var<storage, read> k_src: array<f32>;
@group(0) @binding(2) var<storage, read_write> k_dst: array<f32>;

@compute @workgroup_size(64)
fn attn_repack(@builtin(workgroup_id) wid: vec3<u32>,
               @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) li: u32) {
    let e = flat_group(wid, nwg) * 64u + li;
    let width = kp.width;
    if (e >= kp.nz * kp.len * kp.heads * width) {
        return;
    }
    let d = e % width;
    var t = e / width;
    let h = t % kp.heads;
    t = t / kp.heads;
    let i = t % kp.len;
    let z = t / kp.len;
    var v = 0.0;
    if (d < kp.valid) {
        v = k_src[z * kp.src_z + i * kp.src_row + h * kp.src_h + kp.src_off + d];
    }
    k_dst[z * kp.dst_z + i * kp.dst_row + h * kp.dst_h + kp.dst_off + d] = v;
}

// ---------------------------------------------------------------------------------------------
// dbias[h, a*ws+b] += sum over groups g and pairs (i, j) with |ri-rj| = a, |ci-cj| = b of
// T[g, h, j, i]. One invocation per (h, a*ws+b). Bindings: T, dbias. (lq = lk = ws*ws = n.)

@group(0) @binding(1) var<storage, read> r_t: array<f32>;
@group(0) @binding(2) var<storage, read_write> r_dbias: array<f32>;

@compute @workgroup_size(64)
fn attn_dbias(@builtin(workgroup_id) wid: vec3<u32>,
              @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) li: u32) {
    let e = flat_group(wid, nwg) * 64u + li;
    let ws = ap.ws;
    let n = ws * ws;
    if (e >= ap.heads * n) {
        return;
    }
    let h = e / n;
    let a = i32((e % n) / ws);
    let b = i32(e % ws);
    let iws = i32(ws);
    var s = 0.0;
    for (var i = 0u; i < n; i++) {
        let ri = i32(i / ws);
        let ci = i32(i % ws);
        for (var sr = 0; sr < 2; sr++) {
            if (sr == 1 && a == 0) {
                continue;
            }
            let rj = select(ri - a, ri + a, sr == 0);
            if (rj < 0 || rj >= iws) {
                continue;
            }
            for (var sc = 0; sc < 2; sc++) {
                if (sc == 1 && b == 0) {
                    continue;
                }
                let cj = select(ci - b, ci + b, sc == 0);
                if (cj < 0 || cj >= iws) {
                    continue;
                }
                let j = u32(rj * iws + cj);
                for (var g = 0u; g < ap.ngroups; g++) {
                    s += r_t[((g * ap.heads + h) * n + j) * n + i];
                }
            }
        }
    }
    r_dbias[e] += s;
}

// ---------------------------------------------------------------------------------------------
// Window partition / reverse. x [B, H, W, C] <-> windows [B*nwh*nww, ws*ws, C] (windows ordered
// (b, window-row, window-col), tokens row-major inside a window, zero padding bottom/right).

struct WinParams {
    b: u32,
    h: u32,
    w: u32,
    c: u32,
    ws: u32,
    nwh: u32,
    nww: u32,
    total: u32,
}

@group(0) @binding(0) var<uniform> wp: WinParams;

// Map position (b, row, col) of window token `tok` (window_partition's order); row / col may lie
// in the padding (>= h / w).
fn win_pos(tok: u32) -> vec3<u32> {
    let n = wp.ws * wp.ws;
    let t = tok % n;
    let win = tok / n;
    let wc = win % wp.nww;
    let wr = (win / wp.nww) % wp.nwh;
    return vec3(win / (wp.nww * wp.nwh), wr * wp.ws + t / wp.ws, wc * wp.ws + t % wp.ws);
}

// Window token of map position p (tokens of [B, H, W] row-major).
fn win_token(p: u32) -> u32 {
    let col = p % wp.w;
    let r = (p / wp.w) % wp.h;
    let b = p / (wp.w * wp.h);
    let win = (b * wp.nwh + r / wp.ws) * wp.nww + col / wp.ws;
    return win * wp.ws * wp.ws + (r % wp.ws) * wp.ws + col % wp.ws;
}

// Partition: one invocation per window element. !ACCUM: dst = x (0 at padding); ACCUM: dst += x.
// DRES: also dres[x index] += x (each source element is visited once).
@group(0) @binding(1) var<storage, read> w_src: array<f32>;
@group(0) @binding(2) var<storage, read_write> w_dst: array<f32>;
@group(0) @binding(3) var<storage, read_write> w_dres: array<f32>;

@compute @workgroup_size(256)
fn win_partition(@builtin(workgroup_id) wid: vec3<u32>,
                 @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) li: u32) {
    let e = flat_group(wid, nwg) * 256u + li;
    if (e >= wp.total) {
        return;
    }
    let c = e % wp.c;
    let pos = win_pos(e / wp.c);
    if (pos.y < wp.h && pos.z < wp.w) {
        let src = ((pos.x * wp.h + pos.y) * wp.w + pos.z) * wp.c + c;
        let v = w_src[src];
        if (ACCUM) {
            w_dst[e] += v;
        } else {
            w_dst[e] = v;
        }
        if (DRES) {
            w_dres[src] += v;
        }
    } else if (!ACCUM) {
        w_dst[e] = 0.0;
    }
}

// Reverse: one invocation per element of [B, H, W, C]:
//   dst = y[window element] (+ res when HAS_RES) (+ dst when ACCUM).
@group(0) @binding(1) var<storage, read> r_y: array<f32>;
@group(0) @binding(2) var<storage, read> r_res: array<f32>;
@group(0) @binding(3) var<storage, read_write> r_dst: array<f32>;

@compute @workgroup_size(256)
fn win_reverse(@builtin(workgroup_id) wid: vec3<u32>,
               @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) li: u32) {
    let e = flat_group(wid, nwg) * 256u + li;
    if (e >= wp.total) {
        return;
    }
    let c = e % wp.c;
    var v = r_y[win_token(e / wp.c) * wp.c + c];
    if (HAS_RES) {
        v += r_res[e];
    }
    if (ACCUM) {
        v += r_dst[e];
    }
    r_dst[e] = v;
}

// Row forms of both (C % 4 == 0): one invocation per token (a window token for the partition, a
// map token for the reverse; wp.total counts tokens), copying its C / 4 vec4. The index arithmetic
// is then done once per token instead of once per value: on llvmpipe each integer division is a
// loop over the 8 lanes, and the scalar forms above do six per value.
@group(0) @binding(1) var<storage, read> w_src4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> w_dst4: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> w_dres4: array<vec4<f32>>;

@compute @workgroup_size(64)
fn win_partition4(@builtin(workgroup_id) wid: vec3<u32>,
                  @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) li: u32) {
    let tok = flat_group(wid, nwg) * 64u + li;
    if (tok >= wp.total) {
        return;
    }
    let pos = win_pos(tok);
    let c4 = wp.c >> 2u;
    let d = tok * c4;
    if (pos.y < wp.h && pos.z < wp.w) {
        let s = ((pos.x * wp.h + pos.y) * wp.w + pos.z) * c4;
        for (var k = 0u; k < c4; k++) {
            let v = w_src4[s + k];
            if (ACCUM) {
                w_dst4[d + k] += v;
            } else {
                w_dst4[d + k] = v;
            }
            if (DRES) {
                w_dres4[s + k] += v;
            }
        }
    } else if (!ACCUM) {
        for (var k = 0u; k < c4; k++) {
            w_dst4[d + k] = vec4(0.0);
        }
    }
}

@group(0) @binding(1) var<storage, read> r_y4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> r_res4: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> r_dst4: array<vec4<f32>>;

@compute @workgroup_size(64)
fn win_reverse4(@builtin(workgroup_id) wid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) li: u32) {
    let p = flat_group(wid, nwg) * 64u + li;
    if (p >= wp.total) {
        return;
    }
    let c4 = wp.c >> 2u;
    let s = win_token(p) * c4;
    let d = p * c4;
    for (var k = 0u; k < c4; k++) {
        var v = r_y4[s + k];
        if (HAS_RES) {
            v += r_res4[d + k];
        }
        if (ACCUM) {
            v += r_dst4[d + k];
        }
        r_dst4[d + k] = v;
    }
}

// ---------------------------------------------------------------------------------------------
// Written-out loops over chunks (c < D4) and own rows (r < R), generated by the pipeline cache's
// expander (src/gpu/pipeline.rs): see the note at the top.

//#for op in f_init load_kv dot_a f_acc f_store c_init c_add c_store q_init dot_ab q_acc q_store k_init load_qo k_acc k_store
fn xa_$op(r: u32) {
    xc_$op(r, 0u);
    //#for c in 1..16
    if (${c}u < D4) { xc_$op(r, ${c}u); }
    //#end
}
//#end
//#for op in f_init f_step f_store q_init q_step q_store k_init k_step k_store
fn xR_$op() {
    xr_$op(0u);
    //#for r in 1..16
    if (${r}u < R) { xr_$op(${r}u); }
    //#end
}
//#end
