// ---- matmul.wgsl: batched GEMM with fused epilogue ----
// C[b] = epilogue( alpha * op(A[b]) (M x K) * op(B[b]) (K x N) )
//   op(A) = A (row-major M x K)     or A^T with A stored K x M   (TRANS_A)
//   op(B) = B (row-major K x N)     or B^T with B stored N x K   (TRANS_B; PyTorch Linear weight)
// epilogue: + bias[n] (HAS_BIAS), activation ACT (0 none, 1 GELU, 2 ReLU),
//           + R[b][m, n] (RESIDUAL), + C[b][m, n] (ACCUM: accumulate into the output).
//           ACT_AFTER_RES: the residual is added before the activation instead (act(.. + R)).
//           SAVE_PRE: also store alpha * op(A) op(B) + bias (the pre-activation) to P.
//           ACT_GRAD (backward): C = alpha * op(A) op(B) * act'(R) (+ C when ACCUM), where R holds
//           the layer's saved pre-activation and ACT its activation; no bias.
//
// Entry points (chosen by src/ops/matmul.rs):
//   matmul    shared-memory tiled kernel, 16 x 16 invocations of 4 x 4 outputs (GPUs).
//   mm_v4     register-blocked kernel for CPU adapters (lavapipe/llvmpipe): 8 invocations per
//             workgroup, each owning a 32 x 32 block of C in 64 mat4x4 accumulators, A and B read
//             as vec4 along their contiguous dimension and C written as vec4 along N. Needs A, B,
//             C and their batch strides aligned to 4 elements along those dimensions (checked by
//             the wrapper).
//   mm_s      the same idea with scalar loads and 16 x 16 blocks: any shape, any stride.
//   mm_v4s    mm_v4 on a 32 x 16 block (half the accumulators): for SwiftShader, whose JIT is
//             slow over mm_v4's unrolled 64 blocks.
//   mm_reduce sums the partial results of a split-K pass and applies the epilogue.
// Why the register-blocked kernels: llvmpipe (Mesa 22.3) runs 8 invocations in SIMD lanes, but every
// storage or workgroup-memory load whose address is not a compile-time constant is a scalar loop over
// the lanes (~40 instructions per lane for a vec4, ~18 for a scalar), while arithmetic is one 8-wide
// instruction. Throughput is set by floats loaded per lane per FMA, so each invocation keeps a
// 32 x 32 block (64 vec4 loads per 4 x 1024 FMAs; most accumulators live on the stack, which is
// still cheaper than loads), and there is no shared memory and no barrier.
// Accumulators and blocks are only ever indexed with constants (a dynamic index into a vector or
// matrix makes llvmpipe go through memory lane by lane), and the epilogue code exists once per
// strip (written out for all 64 blocks it made the LLVM compile of one variant take 15 s).
//
// Split-K (SPLIT): the flat workgroup index also runs over `splits` slices of K of `k_len` each; every
// slice writes raw partial sums to mat_c = a [splits, batch, M, N] scratch tensor, and mm_reduce adds
// the slices and applies alpha and the epilogue.

override TRANS_A: bool = false;
override TRANS_B: bool = false;
override HAS_BIAS: bool = false;
override ACT: u32 = 0u;
override RESIDUAL: bool = false;
override ACCUM: bool = false;
override ACT_AFTER_RES: bool = false;
// Register-blocked kernels: the 8 invocations of a workgroup step along N (else along M).
override LANES_N: bool = false;
// Split-K pass: store raw partial sums (no alpha, no epilogue) into the scratch tensor.
override SPLIT: bool = false;
override SAVE_PRE: bool = false;
override ACT_GRAD: bool = false;

struct MatmulParams {
    m: u32,
    n: u32,
    k: u32,
    batch: u32,
    a_bs: u32,   // batch strides in elements (0 = shared across the batch)
    b_bs: u32,
    c_bs: u32,
    m_tiles: u32,
    alpha: f32,
    k_len: u32,  // depth of one K slice (multiple of 16; = k rounded up when not split)
    splits: u32, // number of K slices (1 = no split)
}

@group(0) @binding(0) var<uniform> mp: MatmulParams;
@group(0) @binding(1) var<storage, read> mat_a: array<f32>;
// The same binding seen as vec4 (mm_v4 and mm_sg, which also store C as vec4).
@group(0) @binding(1) var<storage, read> mat_a4: array<vec4<f32>>;
// B is read through b_el (element i) and b_v4 (elements 4 i4 .. 4 i4 + 3), whatever its storage:
// f32 (BH == 0), or f16 packed two to a word (BH == 1; element 2j in the low half of word j, as
// unpack2x16float reads it), widened to f32 on load so that every product and sum stays f32.
//#if BH == 0
@group(0) @binding(2) var<storage, read> mat_b: array<f32>;
@group(0) @binding(2) var<storage, read> mat_b4: array<vec4<f32>>;

fn b_el(i: u32) -> f32 {
    return mat_b[i];
}

fn b_v4(i4: u32) -> vec4<f32> {
    return mat_b4[i4];
}
//#else
@group(0) @binding(2) var<storage, read> mat_bh: array<u32>;
@group(0) @binding(2) var<storage, read> mat_bh2: array<vec2<u32>>;

fn b_el(i: u32) -> f32 {
    return unpack2x16float(mat_bh[i >> 1u])[i & 1u];
}

fn b_v4(i4: u32) -> vec4<f32> {
    let w = mat_bh2[i4];
    return vec4(unpack2x16float(w.x), unpack2x16float(w.y));
}
//#end
@group(0) @binding(3) var<storage, read> mat_bias: array<f32>;
@group(0) @binding(4) var<storage, read> mat_res: array<f32>;
@group(0) @binding(5) var<storage, read_write> mat_c: array<f32>;
@group(0) @binding(3) var<storage, read> mat_bias4: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> mat_res4: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> mat_c4: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read_write> mat_pre: array<f32>;
@group(0) @binding(6) var<storage, read_write> mat_pre4: array<vec4<f32>>;

// Epilogue of one output element; `acc` is the raw dot product, `old` the current value of C.
fn mm_epilogue(acc: f32, bias: f32, res: f32, old: f32) -> f32 {
    var v = acc * mp.alpha;
    if (ACT_GRAD) {
        v *= activate_grad(res, ACT);
        if (ACCUM) {
            v += old;
        }
        return v;
    }
    if (HAS_BIAS) {
        v += bias;
    }
    // One call of activate (the epilogue is inlined many times; two copies slowed the compile).
    if (RESIDUAL && ACT_AFTER_RES) {
        v += res;
    }
    v = activate(v, ACT);
    if (RESIDUAL && !ACT_AFTER_RES) {
        v += res;
    }
    if (ACCUM) {
        v += old;
    }
    return v;
}

// Stores one element of C (or of the split-K scratch for slice s).
fn mm_put(b: u32, s: u32, row: u32, col: u32, acc: f32) {
    if (SPLIT) {
        mat_c[((s * mp.batch + b) * mp.m + row) * mp.n + col] = acc;
        return;
    }
    let idx = b * mp.c_bs + row * mp.n + col;
    var bias = 0.0;
    if (HAS_BIAS) {
        bias = mat_bias[col];
    }
    var res = 0.0;
    if (RESIDUAL) {
        res = mat_res[idx];
    }
    var old = 0.0;
    if (ACCUM) {
        old = mat_c[idx];
    }
    if (SAVE_PRE) {
        mat_pre[idx] = acc * mp.alpha + bias;
    }
    mat_c[idx] = mm_epilogue(acc, bias, res, old);
}

// ---------------------------------------------------------------------------------------------
// matmul: shared-memory tiled kernel (GPUs)
// ---------------------------------------------------------------------------------------------

const TM: u32 = 64u;   // rows of C per workgroup
const TN: u32 = 64u;   // cols of C per workgroup
const TK: u32 = 16u;   // depth of one shared tile
// 16 x 16 invocations, each 4 x 4 outputs.

var<workgroup> tile_a: array<f32, 1024>; // [TK][TM]
var<workgroup> tile_b: array<f32, 1024>; // [TK][TN]

fn load_a(base: u32, row: u32, kk: u32, k_end: u32) -> f32 {
    if (row >= mp.m || kk >= k_end) {
        return 0.0;
    }
    if (TRANS_A) {
        return mat_a[base + kk * mp.m + row];
    }
    return mat_a[base + row * mp.k + kk];
}

fn load_b(base: u32, kk: u32, col: u32, k_end: u32) -> f32 {
    if (col >= mp.n || kk >= k_end) {
        return 0.0;
    }
    if (TRANS_B) {
        return b_el(base + col * mp.k + kk);
    }
    return b_el(base + kk * mp.n + col);
}

@compute @workgroup_size(16, 16, 1)
fn matmul(@builtin(workgroup_id) wid: vec3<u32>,
          @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_id) lid: vec3<u32>,
          @builtin(local_invocation_index) li: u32) {
    let flat = wid.y + wid.z * nwg.y;
    let groups = mp.m_tiles * mp.batch * mp.splits;
    let valid_group = flat < groups;
    let f = min(flat, groups - 1u);
    let b = (f / mp.m_tiles) % mp.batch;
    let s = f / (mp.m_tiles * mp.batch);
    let row0 = (f % mp.m_tiles) * TM;
    let col0 = wid.x * TN;
    let a_base = b * mp.a_bs;
    let b_base = b * mp.b_bs;
    let k_begin = s * mp.k_len;
    let k_end = min(mp.k, k_begin + mp.k_len);

    var acc: array<array<f32, 4>, 4>;
    for (var i = 0u; i < 4u; i++) {
        for (var j = 0u; j < 4u; j++) {
            acc[i][j] = 0.0;
        }
    }

    for (var k0 = k_begin; k0 < k_end; k0 += TK) {
        // 256 invocations load 1024 values of each tile (4 each).
        for (var t = 0u; t < 4u; t++) {
            let e = li + t * 256u;
            // A tile element: kk = e / TM, r = e % TM (coalesced along M for TRANS_A, else along K)
            if (TRANS_A) {
                let kk = e / TM;
                let r = e % TM;
                tile_a[kk * TM + r] = load_a(a_base, row0 + r, k0 + kk, k_end);
            } else {
                let r = e / TK;
                let kk = e % TK;
                tile_a[kk * TM + r] = load_a(a_base, row0 + r, k0 + kk, k_end);
            }
            if (TRANS_B) {
                let c = e / TK;
                let kk = e % TK;
                tile_b[kk * TN + c] = load_b(b_base, k0 + kk, col0 + c, k_end);
            } else {
                let kk = e / TN;
                let c = e % TN;
                tile_b[kk * TN + c] = load_b(b_base, k0 + kk, col0 + c, k_end);
            }
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TK; kk++) {
            var av: array<f32, 4>;
            var bv: array<f32, 4>;
            for (var i = 0u; i < 4u; i++) {
                av[i] = tile_a[kk * TM + lid.y * 4u + i];
                bv[i] = tile_b[kk * TN + lid.x * 4u + i];
            }
            for (var i = 0u; i < 4u; i++) {
                for (var j = 0u; j < 4u; j++) {
                    acc[i][j] = fma(av[i], bv[j], acc[i][j]);
                }
            }
        }
        workgroupBarrier();
    }

    if (!valid_group) {
        return;
    }
    for (var i = 0u; i < 4u; i++) {
        let row = row0 + lid.y * 4u + i;
        if (row >= mp.m) {
            continue;
        }
        for (var j = 0u; j < 4u; j++) {
            let col = col0 + lid.x * 4u + j;
            if (col >= mp.n) {
                continue;
            }
            mm_put(b, s, row, col, acc[i][j]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// mm_v4 / mm_s: register-blocked kernels (CPU adapters)
// ---------------------------------------------------------------------------------------------
// A workgroup is 8 invocations (one SIMD row of llvmpipe). Invocation `lane` owns the S x S block
// (S = 32 for mm_v4, 16 for mm_s) at rows r0.., columns c0.. of C. With LANES_N = false a workgroup
// covers 8S rows x S columns (lanes step along M), else S rows x 8S columns. Grid: x = column
// tiles, (y, z) = flat index over (K slice, batch, row tile), split to stay below 65,535 per
// dimension. Accumulators are mat4x4 blocks: column j holds 4 consecutive rows of one column of C.

struct Blk {
    r0: u32,
    c0: u32,
    b: u32,
    s: u32,
    kb: u32,  // this slice's K range [kb, ke)
    ke: u32,
    live: bool,  // the workgroup is inside the grid (the same for all its lanes)
    ok: bool,    // and this lane's block starts inside C
}

// Block of `rows` x `cols` outputs of lane `lane`; the 8 lanes step along N (LANES_N) or M.
fn blk_rect(wid: vec3<u32>, nwg: vec3<u32>, lane: u32, rows: u32, cols: u32) -> Blk {
    var t: Blk;
    let flat = wid.y + wid.z * nwg.y;
    let mt = flat % mp.m_tiles;
    let rest = flat / mp.m_tiles;
    t.b = rest % mp.batch;
    t.s = rest / mp.batch;
    if (LANES_N) {
        t.r0 = mt * rows;
        t.c0 = (wid.x * 8u + lane) * cols;
    } else {
        t.r0 = (mt * 8u + lane) * rows;
        t.c0 = wid.x * cols;
    }
    t.kb = t.s * mp.k_len;
    t.ke = min(mp.k, t.kb + mp.k_len);
    t.live = flat < mp.m_tiles * mp.batch * mp.splits;
    t.ok = t.live && t.r0 < mp.m && t.c0 < mp.n;
    return t;
}

fn blk_of(wid: vec3<u32>, nwg: vec3<u32>, lane: u32, size: u32) -> Blk {
    return blk_rect(wid, nwg, lane, size, size);
}

// acc (column j = 4 rows of output column j) += sum_t at[t] * bt[j][t], where at's column t holds
// A[rows, k + t] and bt's column j holds B[k .. k + 3, col j].
fn mac4(acc: mat4x4<f32>, at: mat4x4<f32>, bt: mat4x4<f32>) -> mat4x4<f32> {
    return mat4x4<f32>(
        fma(at[3], vec4(bt[0][3]), fma(at[2], vec4(bt[0][2]), fma(at[1], vec4(bt[0][1]), fma(at[0], vec4(bt[0][0]), acc[0])))),
        fma(at[3], vec4(bt[1][3]), fma(at[2], vec4(bt[1][2]), fma(at[1], vec4(bt[1][1]), fma(at[0], vec4(bt[1][0]), acc[1])))),
        fma(at[3], vec4(bt[2][3]), fma(at[2], vec4(bt[2][2]), fma(at[1], vec4(bt[2][1]), fma(at[0], vec4(bt[2][0]), acc[2])))),
        fma(at[3], vec4(bt[3][3]), fma(at[2], vec4(bt[3][2]), fma(at[1], vec4(bt[3][1]), fma(at[0], vec4(bt[3][0]), acc[3])))));
}

// Rank-1 update: acc[j] += a * b[j] (a = 4 rows of A at one k, b = 4 columns of B at that k).
fn mac1(acc: mat4x4<f32>, a: vec4<f32>, b: vec4<f32>) -> mat4x4<f32> {
    return mat4x4<f32>(fma(a, vec4(b[0]), acc[0]), fma(a, vec4(b[1]), acc[1]),
                       fma(a, vec4(b[2]), acc[2]), fma(a, vec4(b[3]), acc[3]));
}

// Stores rows r .. r + 3 (those < M; r < M) of output column `col` (if < N).
fn store_col(t: Blk, v: vec4<f32>, r: u32, col: u32) {
    if (col < mp.n) {
        mm_put(t.b, t.s, r, col, v.x);
        if (r + 1u < mp.m) {
            mm_put(t.b, t.s, r + 1u, col, v.y);
        }
        if (r + 2u < mp.m) {
            mm_put(t.b, t.s, r + 2u, col, v.z);
        }
        if (r + 3u < mp.m) {
            mm_put(t.b, t.s, r + 3u, col, v.w);
        }
    }
}

fn store_blk(t: Blk, acc: mat4x4<f32>, r: u32, c: u32) {
    store_col(t, acc[0], r, c);
    store_col(t, acc[1], r, c + 1u);
    store_col(t, acc[2], r, c + 2u);
    store_col(t, acc[3], r, c + 3u);
}

// ---- element offsets (rows and columns clamped into the matrix; k < K) ----
fn a_off(base: u32, row: u32, k: u32) -> u32 {
    let r = min(row, mp.m - 1u);
    if (TRANS_A) {
        return base + k * mp.m + r;
    }
    return base + r * mp.k + k;
}

fn b_off(base: u32, k: u32, col: u32) -> u32 {
    let c = min(col, mp.n - 1u);
    if (TRANS_B) {
        return base + c * mp.k + k;
    }
    return base + k * mp.n + c;
}

// A strip is 4 rows x 32 columns of accumulators (8 blocks, `c0` = columns c .. c + 3, ...), or the
// 8 B blocks of 32 columns at one 4-deep k-chunk. Row8: 32 columns of B at one k.
struct Strip {
    c0: mat4x4<f32>, c1: mat4x4<f32>, c2: mat4x4<f32>, c3: mat4x4<f32>,
    c4: mat4x4<f32>, c5: mat4x4<f32>, c6: mat4x4<f32>, c7: mat4x4<f32>,
}

struct Row8 {
    v0: vec4<f32>, v1: vec4<f32>, v2: vec4<f32>, v3: vec4<f32>,
    v4: vec4<f32>, v5: vec4<f32>, v6: vec4<f32>, v7: vec4<f32>,
}

fn strip_mac(s: Strip, a: mat4x4<f32>, b: Strip) -> Strip {
    return Strip(mac4(s.c0, a, b.c0), mac4(s.c1, a, b.c1), mac4(s.c2, a, b.c2), mac4(s.c3, a, b.c3),
                 mac4(s.c4, a, b.c4), mac4(s.c5, a, b.c5), mac4(s.c6, a, b.c6), mac4(s.c7, a, b.c7));
}

fn strip_mac1(s: Strip, a: vec4<f32>, b: Row8) -> Strip {
    return Strip(mac1(s.c0, a, b.v0), mac1(s.c1, a, b.v1), mac1(s.c2, a, b.v2), mac1(s.c3, a, b.v3),
                 mac1(s.c4, a, b.v4), mac1(s.c5, a, b.v5), mac1(s.c6, a, b.v6), mac1(s.c7, a, b.v7));
}

// ---- mm_v4 stores: 4 columns of one row at once (N % 4 == 0, C's batch stride % 4 == 0) ----
fn mm_put4(b: u32, s: u32, row: u32, col: u32, acc: vec4<f32>) {
    if (SPLIT) {
        mat_c4[(((s * mp.batch + b) * mp.m + row) * mp.n + col) >> 2u] = acc;
        return;
    }
    let i4 = (b * mp.c_bs + row * mp.n + col) >> 2u;
    var bias = vec4(0.0);
    if (HAS_BIAS) {
        bias = mat_bias4[col >> 2u];
    }
    var res = vec4(0.0);
    if (RESIDUAL) {
        res = mat_res4[i4];
    }
    var old = vec4(0.0);
    if (ACCUM) {
        old = mat_c4[i4];
    }
    if (SAVE_PRE) {
        mat_pre4[i4] = acc * mp.alpha + bias;
    }
    mat_c4[i4] = vec4(mm_epilogue(acc.x, bias.x, res.x, old.x), mm_epilogue(acc.y, bias.y, res.y, old.y),
                      mm_epilogue(acc.z, bias.z, res.z, old.z), mm_epilogue(acc.w, bias.w, res.w, old.w));
}

// Rows r .. r + 3 (those < M; r < M) of the columns c .. c + 3 (c < N).
fn store_blk4(t: Blk, acc: mat4x4<f32>, r: u32, c: u32) {
    let rows = transpose(acc);
    mm_put4(t.b, t.s, r, c, rows[0]);
    if (r + 1u < mp.m) {
        mm_put4(t.b, t.s, r + 1u, c, rows[1]);
    }
    if (r + 2u < mp.m) {
        mm_put4(t.b, t.s, r + 2u, c, rows[2]);
    }
    if (r + 3u < mp.m) {
        mm_put4(t.b, t.s, r + 3u, c, rows[3]);
    }
}

fn store_strip4v(t: Blk, strip: Strip, r: u32, c: u32) {
    var s = strip;
    let blocks = min(8u, (mp.n - c) >> 2u);   // c < N, N % 4 == 0
    for (var q = 0u; q < blocks; q++) {
        store_blk4(t, s.c0, r, c + 4u * q);
        s = Strip(s.c1, s.c2, s.c3, s.c4, s.c5, s.c6, s.c7, s.c0);
    }
}

// ---- mm_v4: vec4 loads, 32 x 32 outputs per invocation. `q` indexes 4-deep chunks of K. ----
// Columns t of the result: A[r .. r + 3, 4q + t]. r is a multiple of 4.
fn a4_blk(base4: u32, r: u32, q: u32) -> mat4x4<f32> {
    if (TRANS_A) {
        // A stored K x M with M % 4 == 0: one vec4 along M per k.
        let m4 = mp.m >> 2u;
        let o = base4 + 4u * q * m4 + (min(r, mp.m - 4u) >> 2u);
        return mat4x4<f32>(mat_a4[o], mat_a4[o + m4], mat_a4[o + 2u * m4], mat_a4[o + 3u * m4]);
    }
    // A stored M x K with K % 4 == 0: one vec4 along K per row.
    let k4 = mp.k >> 2u;
    let l = mp.m - 1u;
    let o = base4 + q;
    return transpose(mat4x4<f32>(mat_a4[o + min(r, l) * k4], mat_a4[o + min(r + 1u, l) * k4],
                                 mat_a4[o + min(r + 2u, l) * k4], mat_a4[o + min(r + 3u, l) * k4]));
}

// Columns j of the result: B[4q .. 4q + 3, c + j]. c is a multiple of 4.
fn b4_blk(base4: u32, c: u32, q: u32) -> mat4x4<f32> {
    if (TRANS_B) {
        // B stored N x K with K % 4 == 0: one vec4 along K per column.
        let k4 = mp.k >> 2u;
        let l = mp.n - 1u;
        let o = base4 + q;
        return mat4x4<f32>(b_v4(o + min(c, l) * k4), b_v4(o + min(c + 1u, l) * k4),
                           b_v4(o + min(c + 2u, l) * k4), b_v4(o + min(c + 3u, l) * k4));
    }
    // B stored K x N with N % 4 == 0: one vec4 along N per k.
    let n4 = mp.n >> 2u;
    let o = base4 + 4u * q * n4 + (min(c, mp.n - 4u) >> 2u);
    return transpose(mat4x4<f32>(b_v4(o), b_v4(o + n4), b_v4(o + 2u * n4), b_v4(o + 3u * n4)));
}

fn b4_strip(base4: u32, c: u32, q: u32) -> Strip {
    return Strip(b4_blk(base4, c, q), b4_blk(base4, c + 4u, q), b4_blk(base4, c + 8u, q), b4_blk(base4, c + 12u, q),
                 b4_blk(base4, c + 16u, q), b4_blk(base4, c + 20u, q), b4_blk(base4, c + 24u, q), b4_blk(base4, c + 28u, q));
}

// For TRANS_A && !TRANS_B (A is K x M, B is K x N, M and N multiples of 4): 4 rows of A and
// 32 columns of B at one k, as vec4s (used for the K % 4 tail).
fn a4_kcol(base4: u32, r: u32, k: u32) -> vec4<f32> {
    return mat_a4[base4 + k * (mp.m >> 2u) + (min(r, mp.m - 4u) >> 2u)];
}

fn b4_krow(base4: u32, k: u32, c: u32) -> vec4<f32> {
    return b_v4(base4 + k * (mp.n >> 2u) + (min(c, mp.n - 4u) >> 2u));
}

fn b4_krow8(base4: u32, k: u32, c: u32) -> Row8 {
    return Row8(b4_krow(base4, k, c), b4_krow(base4, k, c + 4u), b4_krow(base4, k, c + 8u), b4_krow(base4, k, c + 12u),
                b4_krow(base4, k, c + 16u), b4_krow(base4, k, c + 20u), b4_krow(base4, k, c + 24u), b4_krow(base4, k, c + 28u));
}

@compute @workgroup_size(8, 1, 1)
fn mm_v4(@builtin(workgroup_id) wid: vec3<u32>,
         @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_id) lid: vec3<u32>) {
    let t = blk_of(wid, nwg, lid.x, 32u);
    if (!t.ok) {
        return;
    }
    let ab4 = (t.b * mp.a_bs) >> 2u;
    let bb4 = (t.b * mp.b_bs) >> 2u;
    let r0 = t.r0;
    let c0 = t.c0;
    let z = mat4x4<f32>();
    let zs = Strip(z, z, z, z, z, z, z, z);
    var s0 = zs; var s1 = zs; var s2 = zs; var s3 = zs; var s4 = zs; var s5 = zs; var s6 = zs; var s7 = zs;
    let q_end = t.ke >> 2u;
    for (var q = t.kb >> 2u; q < q_end; q++) {
        let b = b4_strip(bb4, c0, q);
        s0 = strip_mac(s0, a4_blk(ab4, r0, q), b);
        s1 = strip_mac(s1, a4_blk(ab4, r0 + 4u, q), b);
        s2 = strip_mac(s2, a4_blk(ab4, r0 + 8u, q), b);
        s3 = strip_mac(s3, a4_blk(ab4, r0 + 12u, q), b);
        s4 = strip_mac(s4, a4_blk(ab4, r0 + 16u, q), b);
        s5 = strip_mac(s5, a4_blk(ab4, r0 + 20u, q), b);
        s6 = strip_mac(s6, a4_blk(ab4, r0 + 24u, q), b);
        s7 = strip_mac(s7, a4_blk(ab4, r0 + 28u, q), b);
    }
    // K % 4 tail: vec4 eligibility requires K % 4 == 0 unless A is transposed and B is not.
    if (TRANS_A && !TRANS_B) {
        for (var k = max(q_end * 4u, t.kb); k < t.ke; k++) {
            let b = b4_krow8(bb4, k, c0);
            s0 = strip_mac1(s0, a4_kcol(ab4, r0, k), b);
            s1 = strip_mac1(s1, a4_kcol(ab4, r0 + 4u, k), b);
            s2 = strip_mac1(s2, a4_kcol(ab4, r0 + 8u, k), b);
            s3 = strip_mac1(s3, a4_kcol(ab4, r0 + 12u, k), b);
            s4 = strip_mac1(s4, a4_kcol(ab4, r0 + 16u, k), b);
            s5 = strip_mac1(s5, a4_kcol(ab4, r0 + 20u, k), b);
            s6 = strip_mac1(s6, a4_kcol(ab4, r0 + 24u, k), b);
            s7 = strip_mac1(s7, a4_kcol(ab4, r0 + 28u, k), b);
        }
    }
    // Strips written out (r0 < M); inside a strip the blocks rotate through one store site.
    store_strip4v(t, s0, r0, c0);
    if (r0 + 4u < mp.m) { store_strip4v(t, s1, r0 + 4u, c0); }
    if (r0 + 8u < mp.m) { store_strip4v(t, s2, r0 + 8u, c0); }
    if (r0 + 12u < mp.m) { store_strip4v(t, s3, r0 + 12u, c0); }
    if (r0 + 16u < mp.m) { store_strip4v(t, s4, r0 + 16u, c0); }
    if (r0 + 20u < mp.m) { store_strip4v(t, s5, r0 + 20u, c0); }
    if (r0 + 24u < mp.m) { store_strip4v(t, s6, r0 + 24u, c0); }
    if (r0 + 28u < mp.m) { store_strip4v(t, s7, r0 + 28u, c0); }
}

// ---- mm_s: scalar loads, 16 x 16 outputs per invocation (4 strips, each using half a Strip) ----
fn as_el(base: u32, row: u32, k: u32) -> f32 {
    return mat_a[a_off(base, row, k)];
}

fn bs_el(base: u32, k: u32, col: u32) -> f32 {
    return b_el(b_off(base, k, col));
}

// A[r .. r + 3, k] and B[k, c .. c + 3] as vec4s.
fn as_col(base: u32, r: u32, k: u32) -> vec4<f32> {
    return vec4(as_el(base, r, k), as_el(base, r + 1u, k), as_el(base, r + 2u, k), as_el(base, r + 3u, k));
}

fn bs_row(base: u32, k: u32, c: u32) -> vec4<f32> {
    return vec4(bs_el(base, k, c), bs_el(base, k, c + 1u), bs_el(base, k, c + 2u), bs_el(base, k, c + 3u));
}

// Columns t: A[r .. r + 3, k + t]; columns j: B[k .. k + 3, c + j] (k + 3 < K).
fn as_blk(base: u32, r: u32, k: u32) -> mat4x4<f32> {
    return mat4x4<f32>(as_col(base, r, k), as_col(base, r, k + 1u), as_col(base, r, k + 2u), as_col(base, r, k + 3u));
}

fn bs_blk(base: u32, c: u32, k: u32) -> mat4x4<f32> {
    return transpose(mat4x4<f32>(bs_row(base, k, c), bs_row(base, k + 1u, c), bs_row(base, k + 2u, c), bs_row(base, k + 3u, c)));
}

struct Strip4 {
    c0: mat4x4<f32>, c1: mat4x4<f32>, c2: mat4x4<f32>, c3: mat4x4<f32>,
}

fn strip4_mac(s: Strip4, a: mat4x4<f32>, b: Strip4) -> Strip4 {
    return Strip4(mac4(s.c0, a, b.c0), mac4(s.c1, a, b.c1), mac4(s.c2, a, b.c2), mac4(s.c3, a, b.c3));
}

fn strip4_mac1(s: Strip4, a: vec4<f32>, b0: vec4<f32>, b1: vec4<f32>, b2: vec4<f32>, b3: vec4<f32>) -> Strip4 {
    return Strip4(mac1(s.c0, a, b0), mac1(s.c1, a, b1), mac1(s.c2, a, b2), mac1(s.c3, a, b3));
}

// Stores a strip block by block: the loop rotates the blocks through s.c0 so that the store code
// exists once (the epilogue written out for every block made llvmpipe's compile 10x longer).
fn store_strip4(t: Blk, strip: Strip4, r: u32, c: u32) {
    var s = strip;
    let blocks = min(4u, (mp.n - c + 3u) >> 2u);   // c < N
    for (var q = 0u; q < blocks; q++) {
        store_blk(t, s.c0, r, c + 4u * q);
        s = Strip4(s.c1, s.c2, s.c3, s.c0);
    }
}

@compute @workgroup_size(8, 1, 1)
fn mm_s(@builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
    let t = blk_of(wid, nwg, lid.x, 16u);
    if (!t.ok) {
        return;
    }
    let a_base = t.b * mp.a_bs;
    let b_base = t.b * mp.b_bs;
    let r0 = t.r0;
    let c0 = t.c0;
    let z = mat4x4<f32>();
    let zs = Strip4(z, z, z, z);
    var s0 = zs; var s1 = zs; var s2 = zs; var s3 = zs;
    let k4_end = t.kb + ((t.ke - t.kb) & ~3u);
    for (var k = t.kb; k < k4_end; k += 4u) {
        let b = Strip4(bs_blk(b_base, c0, k), bs_blk(b_base, c0 + 4u, k), bs_blk(b_base, c0 + 8u, k), bs_blk(b_base, c0 + 12u, k));
        s0 = strip4_mac(s0, as_blk(a_base, r0, k), b);
        s1 = strip4_mac(s1, as_blk(a_base, r0 + 4u, k), b);
        s2 = strip4_mac(s2, as_blk(a_base, r0 + 8u, k), b);
        s3 = strip4_mac(s3, as_blk(a_base, r0 + 12u, k), b);
    }
    for (var k = k4_end; k < t.ke; k++) {
        let b0 = bs_row(b_base, k, c0);
        let b1 = bs_row(b_base, k, c0 + 4u);
        let b2 = bs_row(b_base, k, c0 + 8u);
        let b3 = bs_row(b_base, k, c0 + 12u);
        s0 = strip4_mac1(s0, as_col(a_base, r0, k), b0, b1, b2, b3);
        s1 = strip4_mac1(s1, as_col(a_base, r0 + 4u, k), b0, b1, b2, b3);
        s2 = strip4_mac1(s2, as_col(a_base, r0 + 8u, k), b0, b1, b2, b3);
        s3 = strip4_mac1(s3, as_col(a_base, r0 + 12u, k), b0, b1, b2, b3);
    }
    let strips = min(4u, (mp.m - r0 + 3u) >> 2u);   // r0 < M
    for (var p = 0u; p < strips; p++) {
        store_strip4(t, s0, r0 + 4u * p, c0);
        let s = s0;
        s0 = s1; s1 = s2; s2 = s3; s3 = s;
    }
}

// ---- mm_v4s: mm_v4's vec4 loads and stores on a 32 x 16 block per invocation ----
// Half of mm_v4's accumulators (8 strips of 4 blocks): for JIT compilers that take seconds over
// mm_v4's 64 blocks (SwiftShader: about 2 s a pipeline, a third of that for this one), at the
// price of reading A twice as often.
fn store_strip4v4(t: Blk, strip: Strip4, r: u32, c: u32) {
    var s = strip;
    let blocks = min(4u, (mp.n - c) >> 2u);   // c < N, N % 4 == 0
    for (var q = 0u; q < blocks; q++) {
        store_blk4(t, s.c0, r, c + 4u * q);
        s = Strip4(s.c1, s.c2, s.c3, s.c0);
    }
}

@compute @workgroup_size(8, 1, 1)
fn mm_v4s(@builtin(workgroup_id) wid: vec3<u32>,
          @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_id) lid: vec3<u32>) {
    let t = blk_rect(wid, nwg, lid.x, 32u, 16u);
    if (!t.ok) {
        return;
    }
    let ab4 = (t.b * mp.a_bs) >> 2u;
    let bb4 = (t.b * mp.b_bs) >> 2u;
    let r0 = t.r0;
    let c0 = t.c0;
    let z = mat4x4<f32>();
    let zs = Strip4(z, z, z, z);
    var s0 = zs; var s1 = zs; var s2 = zs; var s3 = zs; var s4 = zs; var s5 = zs; var s6 = zs; var s7 = zs;
    let q_end = t.ke >> 2u;
    for (var q = t.kb >> 2u; q < q_end; q++) {
        let b = Strip4(b4_blk(bb4, c0, q), b4_blk(bb4, c0 + 4u, q), b4_blk(bb4, c0 + 8u, q), b4_blk(bb4, c0 + 12u, q));
        s0 = strip4_mac(s0, a4_blk(ab4, r0, q), b);
        s1 = strip4_mac(s1, a4_blk(ab4, r0 + 4u, q), b);
        s2 = strip4_mac(s2, a4_blk(ab4, r0 + 8u, q), b);
        s3 = strip4_mac(s3, a4_blk(ab4, r0 + 12u, q), b);
        s4 = strip4_mac(s4, a4_blk(ab4, r0 + 16u, q), b);
        s5 = strip4_mac(s5, a4_blk(ab4, r0 + 20u, q), b);
        s6 = strip4_mac(s6, a4_blk(ab4, r0 + 24u, q), b);
        s7 = strip4_mac(s7, a4_blk(ab4, r0 + 28u, q), b);
    }
    // K % 4 tail (only A transposed and B not may have one; see mm_v4).
    if (TRANS_A && !TRANS_B) {
        for (var k = max(q_end * 4u, t.kb); k < t.ke; k++) {
            let b0 = b4_krow(bb4, k, c0);
            let b1 = b4_krow(bb4, k, c0 + 4u);
            let b2 = b4_krow(bb4, k, c0 + 8u);
            let b3 = b4_krow(bb4, k, c0 + 12u);
            s0 = strip4_mac1(s0, a4_kcol(ab4, r0, k), b0, b1, b2, b3);
            s1 = strip4_mac1(s1, a4_kcol(ab4, r0 + 4u, k), b0, b1, b2, b3);
            s2 = strip4_mac1(s2, a4_kcol(ab4, r0 + 8u, k), b0, b1, b2, b3);
            s3 = strip4_mac1(s3, a4_kcol(ab4, r0 + 12u, k), b0, b1, b2, b3);
            s4 = strip4_mac1(s4, a4_kcol(ab4, r0 + 16u, k), b0, b1, b2, b3);
            s5 = strip4_mac1(s5, a4_kcol(ab4, r0 + 20u, k), b0, b1, b2, b3);
            s6 = strip4_mac1(s6, a4_kcol(ab4, r0 + 24u, k), b0, b1, b2, b3);
            s7 = strip4_mac1(s7, a4_kcol(ab4, r0 + 28u, k), b0, b1, b2, b3);
        }
    }
    let strips = min(8u, (mp.m - r0 + 3u) >> 2u);   // r0 < M
    for (var p = 0u; p < strips; p++) {
        store_strip4v4(t, s0, r0 + 4u * p, c0);
        let s = s0;
        s0 = s1; s1 = s2; s2 = s3; s3 = s4; s4 = s5; s5 = s6; s6 = s7; s7 = s;
    }
}

// ---------------------------------------------------------------------------------------------
// mm_reduce: C = epilogue(sum over K slices of the split-K scratch)
// ---------------------------------------------------------------------------------------------
@group(0) @binding(1) var<storage, read> red_part: array<f32>;   // [splits, batch, M, N]
@group(0) @binding(2) var<storage, read> red_bias: array<f32>;
@group(0) @binding(3) var<storage, read> red_res: array<f32>;
@group(0) @binding(4) var<storage, read_write> red_c: array<f32>;
@group(0) @binding(5) var<storage, read_write> red_pre: array<f32>;

@compute @workgroup_size(256, 1, 1)
fn mm_reduce(@builtin(workgroup_id) wid: vec3<u32>,
             @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_id) lid: vec3<u32>) {
    let e = flat_group(wid, nwg) * 256u + lid.x;
    let per = mp.m * mp.n;
    let total = mp.batch * per;
    if (e >= total) {
        return;
    }
    var s = 0.0;
    for (var i = 0u; i < mp.splits; i++) {
        s += red_part[i * total + e];
    }
    let b = e / per;
    let col = e % mp.n;
    let idx = b * mp.c_bs + (e % per);
    var bias = 0.0;
    if (HAS_BIAS) {
        bias = red_bias[col];
    }
    var res = 0.0;
    if (RESIDUAL) {
        res = red_res[idx];
    }
    var old = 0.0;
    if (ACCUM) {
        old = red_c[idx];
    }
    if (SAVE_PRE) {
        red_pre[idx] = s * mp.alpha + bias;
    }
    red_c[idx] = mm_epilogue(s, bias, res, old);
}
