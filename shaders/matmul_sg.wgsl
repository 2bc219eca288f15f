// ---- matmul_sg.wgsl: mm_sg, the register-blocked GEMM for CPU adapters with 8-wide subgroups ----
// Compiled after matmul.wgsl (same bindings, params, epilogue and stores) as its own module, since
// subgroup built-ins need the device's `subgroups` feature. src/ops/matmul.rs chooses it on CPU
// adapters whose subgroups are exactly 8 wide (lavapipe/llvmpipe on AVX2), for 4-aligned
// operands with K % 4 == 0.
//
// Why: on llvmpipe a storage load whose address differs between lanes is a scalar loop over the 8
// lanes, while reading one lane's register into all lanes (subgroupBroadcast from a constant lane)
// is an extract and a broadcast. mm_v4 has every lane load both of its operands (64 vec4 per
// 4-deep K chunk for 4096 FMAs per lane). Here the 8 lanes of a workgroup (one subgroup) are
// stacked along M, each owning 8 rows x 64 columns of C (the workgroup a 64 x 64 tile), so all
// lanes need the same B block: each lane loads 8 of its 64 vec4 and the others get them by
// broadcast; a lane loads its own 8 rows of A (8 vec4). Every operand value is loaded once per
// workgroup: 16 lane-looped loads per chunk for 2048 FMAs per lane.
// Block sizes measured at 1024^3 on lavapipe (2 cores, GFLOP/s, runs of the same build): 8 x 64 per
// lane 58-66; 16 x 64 (1024 accumulators, what mm_v4 keeps) 47-52; 16 x 128 53-55; 8 x 128 42-47;
// 16 x 32 51-57; 4 x 64 and 8 x 32 41-55. More accumulators than 512 per lane cost more in stack
// traffic than the loads they save.
//
// All 8 lanes must reach every broadcast, so lanes whose rows start past M keep running (their
// row reads are clamped) and only skip the stores.

// B slot s (0..7) of this lane at 4-deep K chunk q; h = s % 2 (the 32-column strip), p = s / 2:
//   B stored K x N (vec4 along N): row 4q + p, columns c0 + 32h + 4 lane .. + 3;
//   B stored N x K (vec4 along K): column c0 + 32h + 8p + lane, k = 4q .. 4q + 3.
// Either way strip h (columns c0 + 32h ..) is built from slots h, h + 2, h + 4, h + 6 (sg_strip).
fn sg_b_slot(base4: u32, c0: u32, q: u32, lane: u32, s: u32) -> vec4<f32> {
    let p = s >> 1u;
    let c = c0 + 32u * (s & 1u);
    if (TRANS_B) {
        return b_v4(base4 + q + min(c + 8u * p + lane, mp.n - 1u) * (mp.k >> 2u));
    }
    let n4 = mp.n >> 2u;
    return b_v4(base4 + (4u * q + p) * n4 + (min(c + 4u * lane, mp.n - 4u) >> 2u));
}

// Strip h (0 or 1) of B at chunk q.
fn sg_b(base4: u32, c0: u32, q: u32, lane: u32, h: u32) -> Strip {
    return sg_strip(sg_b_slot(base4, c0, q, lane, h), sg_b_slot(base4, c0, q, lane, h + 2u),
                    sg_b_slot(base4, c0, q, lane, h + 4u), sg_b_slot(base4, c0, q, lane, h + 6u));
}

//#for L in 0..8
// K x N layout: columns 4 $L .. 4 $L + 3 of the half, as b4_blk gives them (column j = B[k.., c + j]),
// from lane $L's rows x0 .. x3 (k = 4q .. 4q + 3).
fn sg_rows$L(x0: vec4<f32>, x1: vec4<f32>, x2: vec4<f32>, x3: vec4<f32>) -> mat4x4<f32> {
    return transpose(mat4x4<f32>(subgroupBroadcast(x0, ${L}u), subgroupBroadcast(x1, ${L}u),
                                 subgroupBroadcast(x2, ${L}u), subgroupBroadcast(x3, ${L}u)));
}
//#end

// N x K layout: lanes 0..3 (lo) or 4..7 (hi) of one slot are 4 consecutive columns.
fn sg_cols_lo(x: vec4<f32>) -> mat4x4<f32> {
    return mat4x4<f32>(subgroupBroadcast(x, 0u), subgroupBroadcast(x, 1u), subgroupBroadcast(x, 2u), subgroupBroadcast(x, 3u));
}

fn sg_cols_hi(x: vec4<f32>) -> mat4x4<f32> {
    return mat4x4<f32>(subgroupBroadcast(x, 4u), subgroupBroadcast(x, 5u), subgroupBroadcast(x, 6u), subgroupBroadcast(x, 7u));
}

// The 32 columns of one half at one K chunk (what b4_strip gives mm_v4), from its four slots.
fn sg_strip(x0: vec4<f32>, x1: vec4<f32>, x2: vec4<f32>, x3: vec4<f32>) -> Strip {
    if (TRANS_B) {
        return Strip(sg_cols_lo(x0), sg_cols_hi(x0), sg_cols_lo(x1), sg_cols_hi(x1),
                     sg_cols_lo(x2), sg_cols_hi(x2), sg_cols_lo(x3), sg_cols_hi(x3));
    }
    return Strip(sg_rows0(x0, x1, x2, x3), sg_rows1(x0, x1, x2, x3), sg_rows2(x0, x1, x2, x3), sg_rows3(x0, x1, x2, x3),
                 sg_rows4(x0, x1, x2, x3), sg_rows5(x0, x1, x2, x3), sg_rows6(x0, x1, x2, x3), sg_rows7(x0, x1, x2, x3));
}

// Rows r .. r + 3 (r < M) of this lane's two strips.
fn sg_store_row(t: Blk, r: u32, a: Strip, b: Strip) {
    store_strip4v(t, a, r, t.c0);
    if (t.c0 + 32u < mp.n) {
        store_strip4v(t, b, r, t.c0 + 32u);
    }
}

@compute @workgroup_size(8, 1, 1)
fn mm_sg(@builtin(workgroup_id) wid: vec3<u32>,
         @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(subgroup_invocation_id) lane: u32) {
    let t = blk_rect(wid, nwg, lane, 8u, 64u);
    if (!t.live) {
        return;   // the whole workgroup
    }
    let ab4 = (t.b * mp.a_bs) >> 2u;
    let bb4 = (t.b * mp.b_bs) >> 2u;
    let r0 = t.r0;
    let c0 = t.c0;
    let z = mat4x4<f32>();
    let zs = Strip(z, z, z, z, z, z, z, z);
    // s<i><h>: rows r0 + 4i .. + 3, columns c0 + 32h .. + 31.
    var s00 = zs; var s01 = zs; var s10 = zs; var s11 = zs;
    for (var q = t.kb >> 2u; q < (t.ke >> 2u); q++) {
        let b0 = sg_b(bb4, c0, q, lane, 0u);
        let b1 = sg_b(bb4, c0, q, lane, 1u);
        let a0 = a4_blk(ab4, r0, q);
        let a1 = a4_blk(ab4, r0 + 4u, q);
        s00 = strip_mac(s00, a0, b0);
        s01 = strip_mac(s01, a0, b1);
        s10 = strip_mac(s10, a1, b0);
        s11 = strip_mac(s11, a1, b1);
    }
    if (!t.ok) {
        return;   // this lane's rows start past M
    }
    sg_store_row(t, r0, s00, s01);
    if (r0 + 4u < mp.m) {
        sg_store_row(t, r0 + 4u, s10, s11);
    }
}
