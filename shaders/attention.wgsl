// ---- attention.wgsl: window partition/reverse and the attention core (forward + backward) ----
//
// The attention core is a "flash" style kernel: one invocation owns one query row (or, in the
// key-gradient kernel, one key row) and loops over the other side with an online softmax, so no
// score matrix is ever stored and no workgroup barrier is needed. All invocations of a workgroup
// share one (problem z, head h), which makes every key/value (resp. query) read uniform across the
// workgroup; on lavapipe those are scalar loads broadcast to the SIMD lanes.
//
// Addressing of q/k/v/out rows is generic (element offset + strides per row, problem and head), so
// the same kernels serve TinyViT's interleaved window qkv [NW, n, 3C] and SAM's separate q/k/v.
//   row(i) of head h in problem z starts at  z*X_z + i*X_row + h*X_h + X_off,  then D contiguous.
// Logits: s_ij = scale * q_i.k_j (+ bias[h, |ri-rj|*ws + |ci-cj|] with i = ri*ws+ci when HAS_BIAS).
// Statistics per (z, h, i): lse = max + log(sum exp) of the logits (saved by the training forward).

override D: u32 = 32u;            // head dimension (1..=DMAX)
override WG: u32 = 64u;           // invocations per workgroup of the core kernels
override HAS_BIAS: bool = false;  // TinyViT relative position bias
override SAVE_LSE: bool = false;  // forward: also write lse per query
override SPLIT: bool = false;     // forward: write partial (acc, max, sum) per key split
override DIRECT: bool = true;     // backward: write into the final strided layout (else partials)
override ACCUM: bool = false;     // partition / reverse: add into the destination
override HAS_RES: bool = false;   // reverse: add a residual
override DRES: bool = false;      // partition: also add the source into a second destination

const DMAX: u32 = 64u;
const KB: u32 = 8u;               // keys (queries) per inner block
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
    blocks: u32,     // lane blocks (of WG rows) per (problem, head)
    splits: u32,     // chunks of the looped dimension
    split_len: u32,  // rows per chunk (multiple of KB)
    zgroup: u32,     // problems per workgroup (dq kernel with bias)
    ngroups: u32,    // ceil(nz / zgroup)
    ws: u32,
    scale: f32,
    total: u32,      // workgroups in the grid
}

@group(0) @binding(0) var<uniform> ap: AttnParams;

// |row_i - row_j| * ws + |col_i - col_j| for token indices inside a ws x ws window.
fn rel_idx(i: u32, j: u32) -> u32 {
    let ri = i / ap.ws;
    let ci = i - ri * ap.ws;
    let rj = j / ap.ws;
    let cj = j - rj * ap.ws;
    let dr = select(rj - ri, ri - rj, ri >= rj);
    let dc = select(cj - ci, ci - cj, ci >= cj);
    return dr * ap.ws + dc;
}

// ---------------------------------------------------------------------------------------------
// Forward. Grid: (problem z, head h, query block, key split). Bindings: q, k, v, bias, out, stat.
//   !SPLIT: out in the o_* layout; stat[(z*heads+h)*lq+i] = lse when SAVE_LSE.
//   SPLIT:  out = partial acc [split, z, h, i, D] (unnormalised), stat = (max, sum) pairs.

@group(0) @binding(1) var<storage, read> f_q: array<f32>;
@group(0) @binding(2) var<storage, read> f_k: array<f32>;
@group(0) @binding(3) var<storage, read> f_v: array<f32>;
@group(0) @binding(4) var<storage, read> f_bias: array<f32>;
@group(0) @binding(5) var<storage, read_write> f_out: array<f32>;
@group(0) @binding(6) var<storage, read_write> f_stat: array<f32>;

@compute @workgroup_size(WG)
fn attn_fwd(@builtin(workgroup_id) wid: vec3<u32>,
            @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) li: u32) {
    let g = flat_group(wid, nwg);
    if (g >= ap.total) {
        return;
    }
    let sp = g % ap.splits;
    var t = g / ap.splits;
    let blk = t % ap.blocks;
    t = t / ap.blocks;
    let h = t % ap.heads;
    let z = t / ap.heads;
    let i = blk * WG + li;
    let ii = min(i, ap.lq - 1u);

    let qbase = z * ap.q_z + ii * ap.q_row + h * ap.q_h + ap.q_off;
    let kbase = z * ap.k_z + h * ap.k_h + ap.k_off;
    let vbase = z * ap.v_z + h * ap.v_h + ap.v_off;
    let bbase = h * ap.ws * ap.ws;

    var q: array<f32, DMAX>;
    var acc: array<f32, DMAX>;
    for (var d = 0u; d < D; d++) {
        q[d] = f_q[qbase + d] * ap.scale;
        acc[d] = 0.0;
    }
    var m = NEG;
    var l = 0.0;
    let j_start = sp * ap.split_len;
    let j_end = min(ap.lk, j_start + ap.split_len);

    for (var j0 = j_start; j0 < j_end; j0 += KB) {
        var sc: array<f32, KB>;
        var kr: array<u32, KB>;
        var vr: array<u32, KB>;
        for (var u = 0u; u < KB; u++) {
            let j = min(j0 + u, j_end - 1u);
            kr[u] = kbase + j * ap.k_row;
            vr[u] = vbase + j * ap.v_row;
            sc[u] = 0.0;
        }
        for (var d = 0u; d < D; d++) {
            let qd = q[d];
            for (var u = 0u; u < KB; u++) {
                sc[u] = fma(qd, f_k[kr[u] + d], sc[u]);
            }
        }
        var mb = m;
        for (var u = 0u; u < KB; u++) {
            var s = sc[u];
            if (HAS_BIAS) {
                s += f_bias[bbase + rel_idx(ii, min(j0 + u, j_end - 1u))];
            }
            s = select(NEG, s, j0 + u < j_end);
            sc[u] = s;
            mb = max(mb, s);
        }
        let alpha = exp(m - mb);
        m = mb;
        var psum = 0.0;
        for (var u = 0u; u < KB; u++) {
            sc[u] = exp(sc[u] - mb);
            psum += sc[u];
        }
        l = l * alpha + psum;
        for (var d = 0u; d < D; d++) {
            var a = acc[d] * alpha;
            for (var u = 0u; u < KB; u++) {
                a = fma(sc[u], f_v[vr[u] + d], a);
            }
            acc[d] = a;
        }
    }

    if (i >= ap.lq) {
        return;
    }
    let row = (z * ap.heads + h) * ap.lq + i;
    if (SPLIT) {
        let pbase = ((sp * ap.nz) * ap.heads * ap.lq + row) * D;
        for (var d = 0u; d < D; d++) {
            f_out[pbase + d] = acc[d];
        }
        let sb = 2u * (sp * ap.nz * ap.heads * ap.lq + row);
        f_stat[sb] = m;
        f_stat[sb + 1u] = l;
    } else {
        let inv = 1.0 / l;
        let obase = z * ap.o_z + i * ap.o_row + h * ap.o_h + ap.o_off;
        for (var d = 0u; d < D; d++) {
            f_out[obase + d] = acc[d] * inv;
        }
        if (SAVE_LSE) {
            f_stat[row] = m + log(l);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Merge of the key splits of attn_fwd (SPLIT). One invocation per (z, h, i).
// Bindings: partial acc, (max, sum) pairs, out (o_* layout), lse (when SAVE_LSE).

@group(0) @binding(1) var<storage, read> c_part: array<f32>;
@group(0) @binding(2) var<storage, read> c_ml: array<f32>;
@group(0) @binding(3) var<storage, read_write> c_out: array<f32>;
@group(0) @binding(4) var<storage, read_write> c_lse: array<f32>;

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
    for (var s = 0u; s < ap.splits; s++) {
        l += c_ml[2u * (s * rows + row) + 1u] * exp(c_ml[2u * (s * rows + row)] - mx);
    }
    var o: array<f32, DMAX>;
    for (var d = 0u; d < D; d++) {
        o[d] = 0.0;
    }
    for (var s = 0u; s < ap.splits; s++) {
        let w = exp(c_ml[2u * (s * rows + row)] - mx) / l;
        let pb = (s * rows + row) * D;
        for (var d = 0u; d < D; d++) {
            o[d] = fma(w, c_part[pb + d], o[d]);
        }
    }
    let obase = z * ap.o_z + i * ap.o_row + h * ap.o_h + ap.o_off;
    for (var d = 0u; d < D; d++) {
        c_out[obase + d] = o[d];
    }
    if (SAVE_LSE) {
        c_lse[row] = mx + log(l);
    }
}

// ---------------------------------------------------------------------------------------------
// Backward preparation: stat[2*row] = lse, stat[2*row+1] = delta = dout_i . out_i (per head).
// Bindings: out, dout (both o_* layout), lse, stat.

@group(0) @binding(1) var<storage, read> p_out: array<f32>;
@group(0) @binding(2) var<storage, read> p_dout: array<f32>;
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
    var delta = 0.0;
    for (var d = 0u; d < D; d++) {
        delta = fma(p_out[ob + d], p_dout[ob + d], delta);
    }
    p_stat[2u * row] = p_lse[row];
    p_stat[2u * row + 1u] = delta;
}

// ---------------------------------------------------------------------------------------------
// Backward, query side: dq_i = scale * sum_j dS_ij k_j with dS_ij = P_ij (dout_i.v_j - delta_i),
// P_ij = exp(s_ij - lse_i). Grid: (problem group, head, query block, key split); the workgroup loops
// over the `zgroup` problems of its group. With HAS_BIAS it also accumulates
// T[group, h, j, i] = sum over the group's problems of dS_ij (reduced by attn_dbias).
// DIRECT: dq written to the q_* layout of `b_dq`; else partials [split, z, h, i, D].
// Bindings: q, k, v, bias, dout (o_* layout), stat, dq, T.

@group(0) @binding(1) var<storage, read> b_q: array<f32>;
@group(0) @binding(2) var<storage, read> b_k: array<f32>;
@group(0) @binding(3) var<storage, read> b_v: array<f32>;
@group(0) @binding(4) var<storage, read> b_bias: array<f32>;
@group(0) @binding(5) var<storage, read> b_dout: array<f32>;
@group(0) @binding(6) var<storage, read> b_stat: array<f32>;
@group(0) @binding(7) var<storage, read_write> b_dq: array<f32>;
@group(0) @binding(8) var<storage, read_write> b_t: array<f32>;

@compute @workgroup_size(WG)
fn attn_bwd_dq(@builtin(workgroup_id) wid: vec3<u32>,
               @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) li: u32) {
    let g = flat_group(wid, nwg);
    if (g >= ap.total) {
        return;
    }
    let sp = g % ap.splits;
    var t = g / ap.splits;
    let blk = t % ap.blocks;
    t = t / ap.blocks;
    let h = t % ap.heads;
    let zg = t / ap.heads;
    let i = blk * WG + li;
    let ii = min(i, ap.lq - 1u);
    let bbase = h * ap.ws * ap.ws;
    let j_start = sp * ap.split_len;
    let j_end = min(ap.lk, j_start + ap.split_len);
    let tbase = (zg * ap.heads + h) * ap.lk * ap.lq + ii;

    for (var zz = 0u; zz < ap.zgroup; zz++) {
        let z = zg * ap.zgroup + zz;
        if (z >= ap.nz) {
            break;
        }
        let qbase = z * ap.q_z + ii * ap.q_row + h * ap.q_h + ap.q_off;
        let obase = z * ap.o_z + ii * ap.o_row + h * ap.o_h + ap.o_off;
        let kbase = z * ap.k_z + h * ap.k_h + ap.k_off;
        let vbase = z * ap.v_z + h * ap.v_h + ap.v_off;
        let row = (z * ap.heads + h) * ap.lq + ii;
        let lse = b_stat[2u * row];
        let delta = b_stat[2u * row + 1u];
        var q: array<f32, DMAX>;
        var dout: array<f32, DMAX>;
        var dq: array<f32, DMAX>;
        for (var d = 0u; d < D; d++) {
            q[d] = b_q[qbase + d] * ap.scale;
            dout[d] = b_dout[obase + d];
            dq[d] = 0.0;
        }
        for (var j0 = j_start; j0 < j_end; j0 += KB) {
            var sc: array<f32, KB>;
            var dp: array<f32, KB>;
            var kr: array<u32, KB>;
            var vr: array<u32, KB>;
            for (var u = 0u; u < KB; u++) {
                let j = min(j0 + u, j_end - 1u);
                kr[u] = kbase + j * ap.k_row;
                vr[u] = vbase + j * ap.v_row;
                sc[u] = 0.0;
                dp[u] = 0.0;
            }
            for (var d = 0u; d < D; d++) {
                let qd = q[d];
                let od = dout[d];
                for (var u = 0u; u < KB; u++) {
                    sc[u] = fma(qd, b_k[kr[u] + d], sc[u]);
                    dp[u] = fma(od, b_v[vr[u] + d], dp[u]);
                }
            }
            for (var u = 0u; u < KB; u++) {
                let j = min(j0 + u, j_end - 1u);
                var s = sc[u];
                if (HAS_BIAS) {
                    s += b_bias[bbase + rel_idx(ii, j)];
                }
                var ds = exp(s - lse) * (dp[u] - delta);
                ds = select(0.0, ds, j0 + u < j_end);
                sc[u] = ds;
                if (HAS_BIAS && i < ap.lq && j0 + u < j_end) {
                    let ti = tbase + j * ap.lq;
                    if (zz == 0u) {
                        b_t[ti] = ds;
                    } else {
                        b_t[ti] += ds;
                    }
                }
            }
            for (var d = 0u; d < D; d++) {
                var a = dq[d];
                for (var u = 0u; u < KB; u++) {
                    a = fma(sc[u], b_k[kr[u] + d], a);
                }
                dq[d] = a;
            }
        }
        if (i < ap.lq) {
            if (DIRECT) {
                for (var d = 0u; d < D; d++) {
                    b_dq[qbase + d] = dq[d] * ap.scale;
                }
            } else {
                let pb = ((sp * ap.nz * ap.heads) * ap.lq + row) * D;
                for (var d = 0u; d < D; d++) {
                    b_dq[pb + d] = dq[d] * ap.scale;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Backward, key side: one invocation per key j, looping over queries i:
//   dv_j = sum_i P_ij dout_i,  dk_j = scale * sum_i dS_ij q_i.
// Grid: (problem, head, key block, query split). Bindings: q, k, v, bias, dout, stat, dkv.
// DIRECT: dk to the k_* layout and dv to the v_* layout of `k_dkv` (one buffer, e.g. dqkv);
// else partials [split, z, h, j, 2, D] (dk then dv).

@group(0) @binding(7) var<storage, read_write> k_dkv: array<f32>;

@compute @workgroup_size(WG)
fn attn_bwd_dkv(@builtin(workgroup_id) wid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) li: u32) {
    let g = flat_group(wid, nwg);
    if (g >= ap.total) {
        return;
    }
    let sp = g % ap.splits;
    var t = g / ap.splits;
    let blk = t % ap.blocks;
    t = t / ap.blocks;
    let h = t % ap.heads;
    let z = t / ap.heads;
    let j = blk * WG + li;
    let jj = min(j, ap.lk - 1u);
    let bbase = h * ap.ws * ap.ws;
    let i_start = sp * ap.split_len;
    let i_end = min(ap.lq, i_start + ap.split_len);

    let kbase = z * ap.k_z + jj * ap.k_row + h * ap.k_h + ap.k_off;
    let vbase = z * ap.v_z + jj * ap.v_row + h * ap.v_h + ap.v_off;
    let qbase = z * ap.q_z + h * ap.q_h + ap.q_off;
    let obase = z * ap.o_z + h * ap.o_h + ap.o_off;
    let rbase = (z * ap.heads + h) * ap.lq;
    var k: array<f32, DMAX>;
    var v: array<f32, DMAX>;
    var dk: array<f32, DMAX>;
    var dv: array<f32, DMAX>;
    for (var d = 0u; d < D; d++) {
        k[d] = b_k[kbase + d] * ap.scale;
        v[d] = b_v[vbase + d];
        dk[d] = 0.0;
        dv[d] = 0.0;
    }
    for (var i0 = i_start; i0 < i_end; i0 += KB) {
        var sc: array<f32, KB>;
        var dp: array<f32, KB>;
        var qr: array<u32, KB>;
        var orow: array<u32, KB>;
        for (var u = 0u; u < KB; u++) {
            let i = min(i0 + u, i_end - 1u);
            qr[u] = qbase + i * ap.q_row;
            orow[u] = obase + i * ap.o_row;
            sc[u] = 0.0;
            dp[u] = 0.0;
        }
        for (var d = 0u; d < D; d++) {
            let kd = k[d];
            let vd = v[d];
            for (var u = 0u; u < KB; u++) {
                sc[u] = fma(kd, b_q[qr[u] + d], sc[u]);
                dp[u] = fma(vd, b_dout[orow[u] + d], dp[u]);
            }
        }
        for (var u = 0u; u < KB; u++) {
            let i = min(i0 + u, i_end - 1u);
            var s = sc[u];
            if (HAS_BIAS) {
                s += b_bias[bbase + rel_idx(i, jj)];
            }
            let lse = b_stat[2u * (rbase + i)];
            let delta = b_stat[2u * (rbase + i) + 1u];
            var p = exp(s - lse);
            p = select(0.0, p, i0 + u < i_end);
            sc[u] = p;
            dp[u] = p * (dp[u] - delta);
        }
        for (var d = 0u; d < D; d++) {
            var a = dv[d];
            var b = dk[d];
            for (var u = 0u; u < KB; u++) {
                a = fma(sc[u], b_dout[orow[u] + d], a);
                b = fma(dp[u], b_q[qr[u] + d], b);
            }
            dv[d] = a;
            dk[d] = b;
        }
    }
    if (j >= ap.lk) {
        return;
    }
    if (DIRECT) {
        for (var d = 0u; d < D; d++) {
            k_dkv[kbase + d] = dk[d] * ap.scale;
            k_dkv[vbase + d] = dv[d];
        }
    } else {
        let pb = (((sp * ap.nz + z) * ap.heads + h) * ap.lk + j) * 2u * D;
        for (var d = 0u; d < D; d++) {
            k_dkv[pb + d] = dk[d] * ap.scale;
            k_dkv[pb + D + d] = dv[d];
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Sum of backward partials into a strided destination. One invocation per (z, h, i, d):
//   dst[z*o_z + i*o_row + h*o_h + o_off + d] = sum_split part[((split, z, h, i) * width) + comp*D + d]
// with width = ws (1 for dq, 2 for dk/dv) and comp = zgroup (0 or 1) -- fields reused.
// Bindings: part, dst.

@group(0) @binding(1) var<storage, read> g_part: array<f32>;
@group(0) @binding(2) var<storage, read_write> g_dst: array<f32>;

@compute @workgroup_size(64)
fn attn_gather(@builtin(workgroup_id) wid: vec3<u32>,
               @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) li: u32) {
    let e = flat_group(wid, nwg) * 64u + li;
    let rows = ap.nz * ap.heads * ap.lq;
    if (e >= rows * D) {
        return;
    }
    let d = e % D;
    let row = e / D;
    let i = row % ap.lq;
    let h = (row / ap.lq) % ap.heads;
    let z = row / (ap.lq * ap.heads);
    let width = ap.ws;
    let comp = ap.zgroup;
    var s = 0.0;
    for (var sp = 0u; sp < ap.splits; sp++) {
        s += g_part[((sp * rows + row) * width + comp) * D + d];
    }
    g_dst[z * ap.o_z + i * ap.o_row + h * ap.o_h + ap.o_off + d] = s;
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
    let n = wp.ws * wp.ws;
    let c = e % wp.c;
    let tok = e / wp.c;
    let t = tok % n;
    let win = tok / n;
    let wc = win % wp.nww;
    let wr = (win / wp.nww) % wp.nwh;
    let b = win / (wp.nww * wp.nwh);
    let r = wr * wp.ws + t / wp.ws;
    let col = wc * wp.ws + t % wp.ws;
    if (r < wp.h && col < wp.w) {
        let src = ((b * wp.h + r) * wp.w + col) * wp.c + c;
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
    let p = e / wp.c;
    let col = p % wp.w;
    let r = (p / wp.w) % wp.h;
    let b = p / (wp.w * wp.h);
    let win = (b * wp.nwh + r / wp.ws) * wp.nww + col / wp.ws;
    let t = (r % wp.ws) * wp.ws + col % wp.ws;
    var v = r_y[(win * wp.ws * wp.ws + t) * wp.c + c];
    if (HAS_RES) {
        v += r_res[e];
    }
    if (ACCUM) {
        v += r_dst[e];
    }
    r_dst[e] = v;
}
