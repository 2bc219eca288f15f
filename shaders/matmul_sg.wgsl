// ---- matmul_sg.wgsl: mm_sg, the register-blocked GEMM for CPU adapters with 8-wide subgroups ----
// Compiled after matmul.wgsl (same bindings, params, epilogue and stores) as its own module, since
// subgroup built-ins need the device's `subgroups` feature. src/ops/matmul.rs chooses it on CPU
// adapters whose subgroups are exactly 8 wide (lavapipe/llvmpipe on AVX2), for 4-aligned
// operands with K % 4 == 0.
//
// Why: on llvmpipe a storage load whose address differs between lanes is a scalar loop over the 8
// lanes, while reading one lane's register into all lanes (subgroupBroadcast from a constant lane)
// is an extract and a broadcast. mm_v4 has every lane load both of its operands (64 vec4 per
// 4-deep K chunk for 4096 FMAs). Here the 8 lanes of a workgroup (one subgroup) are stacked along
// M, each owning 16 rows x 64 columns of C (the workgroup a 128 x 64 tile), so all lanes need the
// same B block: each lane loads 8 of its 64 vec4 and the others get it by broadcast. A lane still
// loads its own 16 rows of A (16 vec4): 24 loads per chunk instead of 64, same 1024 accumulators.
//
// All 8 lanes must reach every broadcast, so lanes whose rows start past M keep running (their
// row reads are clamped) and only skip the stores.

// B slot s (0..7) of this lane at 4-deep K chunk q:
//   B stored K x N (vec4 along N): row 4q + s / 2, columns c0 + 32 (s % 2) + 4 lane .. + 3;
//   B stored N x K (vec4 along K): column c0 + 32 (s % 2) + 8 (s / 2) + lane, k = 4q .. 4q + 3.
// Either way the slots s % 2 == h hold the 32 columns c0 + 32 h .. (see sg_strip).
fn sg_b_slot(base4: u32, c0: u32, q: u32, lane: u32, s: u32) -> vec4<f32> {
    let c = c0 + 32u * (s & 1u);
    if (TRANS_B) {
        return mat_b4[base4 + q + min(c + 8u * (s >> 1u) + lane, mp.n - 1u) * (mp.k >> 2u)];
    }
    let n4 = mp.n >> 2u;
    return mat_b4[base4 + (4u * q + (s >> 1u)) * n4 + (min(c + 4u * lane, mp.n - 4u) >> 2u)];
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

@compute @workgroup_size(8, 1, 1)
fn mm_sg(@builtin(workgroup_id) wid: vec3<u32>,
         @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(subgroup_invocation_id) lane: u32) {
    let t = blk_rect(wid, nwg, lane, 16u, 64u);
    if (!t.live) {
        return;   // the whole workgroup
    }
    let ab4 = (t.b * mp.a_bs) >> 2u;
    let bb4 = (t.b * mp.b_bs) >> 2u;
    let r0 = t.r0;
    let c0 = t.c0;
    let z = mat4x4<f32>();
    let zs = Strip(z, z, z, z, z, z, z, z);
    // s(2i + h): rows r0 + 4i .. + 3, columns c0 + 32h .. + 31.
    var s0 = zs; var s1 = zs; var s2 = zs; var s3 = zs; var s4 = zs; var s5 = zs; var s6 = zs; var s7 = zs;
    for (var q = t.kb >> 2u; q < (t.ke >> 2u); q++) {
        let b0 = sg_strip(sg_b_slot(bb4, c0, q, lane, 0u), sg_b_slot(bb4, c0, q, lane, 2u),
                          sg_b_slot(bb4, c0, q, lane, 4u), sg_b_slot(bb4, c0, q, lane, 6u));
        let b1 = sg_strip(sg_b_slot(bb4, c0, q, lane, 1u), sg_b_slot(bb4, c0, q, lane, 3u),
                          sg_b_slot(bb4, c0, q, lane, 5u), sg_b_slot(bb4, c0, q, lane, 7u));
        let a0 = a4_blk(ab4, r0, q);
        s0 = strip_mac(s0, a0, b0);
        s1 = strip_mac(s1, a0, b1);
        let a1 = a4_blk(ab4, r0 + 4u, q);
        s2 = strip_mac(s2, a1, b0);
        s3 = strip_mac(s3, a1, b1);
        let a2 = a4_blk(ab4, r0 + 8u, q);
        s4 = strip_mac(s4, a2, b0);
        s5 = strip_mac(s5, a2, b1);
        let a3 = a4_blk(ab4, r0 + 12u, q);
        s6 = strip_mac(s6, a3, b0);
        s7 = strip_mac(s7, a3, b1);
    }
    if (!t.ok) {
        return;   // this lane's rows start past M
    }
    let c1 = c0 + 32u;
    store_strip4v(t, s0, r0, c0);
    if (c1 < mp.n) { store_strip4v(t, s1, r0, c1); }
    if (r0 + 4u < mp.m) {
        store_strip4v(t, s2, r0 + 4u, c0);
        if (c1 < mp.n) { store_strip4v(t, s3, r0 + 4u, c1); }
    }
    if (r0 + 8u < mp.m) {
        store_strip4v(t, s4, r0 + 8u, c0);
        if (c1 < mp.n) { store_strip4v(t, s5, r0 + 8u, c1); }
    }
    if (r0 + 12u < mp.m) {
        store_strip4v(t, s6, r0 + 12u, c0);
        if (c1 < mp.n) { store_strip4v(t, s7, r0 + 12u, c1); }
    }
}
