// ---- matmul.wgsl: batched GEMM with fused epilogue ----
// C[b] = epilogue( op(A[b]) (M x K) * op(B[b]) (K x N) )
//   op(A) = A (row-major M x K)     or A^T with A stored K x M   (TRANS_A)
//   op(B) = B (row-major K x N)     or B^T with B stored N x K   (TRANS_B; PyTorch Linear weight)
// epilogue: + bias[n] (HAS_BIAS), activation ACT (0 none, 1 GELU, 2 ReLU),
//           + R[b][m, n] (RESIDUAL), + C[b][m, n] (ACCUM: accumulate into the output).

override TRANS_A: bool = false;
override TRANS_B: bool = false;
override HAS_BIAS: bool = false;
override ACT: u32 = 0u;
override RESIDUAL: bool = false;
override ACCUM: bool = false;

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
}

@group(0) @binding(0) var<uniform> mp: MatmulParams;
@group(0) @binding(1) var<storage, read> mat_a: array<f32>;
@group(0) @binding(2) var<storage, read> mat_b: array<f32>;
@group(0) @binding(3) var<storage, read> mat_bias: array<f32>;
@group(0) @binding(4) var<storage, read> mat_res: array<f32>;
@group(0) @binding(5) var<storage, read_write> mat_c: array<f32>;

const TM: u32 = 64u;   // rows of C per workgroup
const TN: u32 = 64u;   // cols of C per workgroup
const TK: u32 = 16u;   // depth of one shared tile
// 16 x 16 invocations, each 4 x 4 outputs.

var<workgroup> tile_a: array<f32, 1024>; // [TK][TM]
var<workgroup> tile_b: array<f32, 1024>; // [TK][TN]

fn load_a(base: u32, row: u32, kk: u32) -> f32 {
    if (row >= mp.m || kk >= mp.k) {
        return 0.0;
    }
    if (TRANS_A) {
        return mat_a[base + kk * mp.m + row];
    }
    return mat_a[base + row * mp.k + kk];
}

fn load_b(base: u32, kk: u32, col: u32) -> f32 {
    if (col >= mp.n || kk >= mp.k) {
        return 0.0;
    }
    if (TRANS_B) {
        return mat_b[base + col * mp.k + kk];
    }
    return mat_b[base + kk * mp.n + col];
}

@compute @workgroup_size(16, 16, 1)
fn matmul(@builtin(workgroup_id) wid: vec3<u32>,
          @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_id) lid: vec3<u32>,
          @builtin(local_invocation_index) li: u32) {
    let flat = wid.y + wid.z * nwg.y;
    let valid_group = flat < mp.m_tiles * mp.batch;
    let b = min(flat / mp.m_tiles, mp.batch - 1u);
    let row0 = (flat % mp.m_tiles) * TM;
    let col0 = wid.x * TN;
    let a_base = b * mp.a_bs;
    let b_base = b * mp.b_bs;

    var acc: array<array<f32, 4>, 4>;
    for (var i = 0u; i < 4u; i++) {
        for (var j = 0u; j < 4u; j++) {
            acc[i][j] = 0.0;
        }
    }

    for (var k0 = 0u; k0 < mp.k; k0 += TK) {
        // 256 invocations load 1024 values of each tile (4 each).
        for (var t = 0u; t < 4u; t++) {
            let e = li + t * 256u;
            // A tile element: kk = e / TM, r = e % TM (coalesced along M for TRANS_A, else along K)
            if (TRANS_A) {
                let kk = e / TM;
                let r = e % TM;
                tile_a[kk * TM + r] = load_a(a_base, row0 + r, k0 + kk);
            } else {
                let r = e / TK;
                let kk = e % TK;
                tile_a[kk * TM + r] = load_a(a_base, row0 + r, k0 + kk);
            }
            if (TRANS_B) {
                let c = e / TK;
                let kk = e % TK;
                tile_b[kk * TN + c] = load_b(b_base, k0 + kk, col0 + c);
            } else {
                let kk = e / TN;
                let c = e % TN;
                tile_b[kk * TN + c] = load_b(b_base, k0 + kk, col0 + c);
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
    let c_base = b * mp.c_bs;
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
            var v = acc[i][j] * mp.alpha;
            if (HAS_BIAS) {
                v += mat_bias[col];
            }
            v = activate(v, ACT);
            let idx = c_base + row * mp.n + col;
            if (RESIDUAL) {
                v += mat_res[idx];
            }
            if (ACCUM) {
                v += mat_c[idx];
            }
            mat_c[idx] = v;
        }
    }
}
