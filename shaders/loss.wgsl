// ---- loss.wgsl: training loss of tiny.train (focal + dice on sigmoid(logits)) and dL/dlogits ----
// (the feature distillation loss, mean squared error between embeddings, is at the end of the file)
// logits and target: [B, HW] (B images of HW pixels; [B,1,H,W] and [B,H,W,1] are the same memory).
//   p = sigmoid(l), BCE = max(l, 0) - l t + log(1 + exp(-|l|)), p_t = p t + (1-p)(1-t),
//   a_t = alpha t + (1-alpha)(1-t), focal_i = a_t BCE (1-p_t)^gamma, FL = mean over all pixels,
//   dice_b = 1 - (2 sum p t + s) / (sum p + sum t + s), D = mean over images,
//   L = lambda FL + (1 - lambda) D.
// Reductions: per (image, pixel chunk) partial sums of (focal, p t, p, t, 1 - p_t) -> per image sums
// (fixed order) -> the three loss values. Deterministic, no atomics.
// Since p + t - 2 p t = p (1-t) + (1-p) t = 1 - p_t for any t, dice_b = Σ(1 - p_t) / (Σ p + Σ t + s):
// the form 1 - (2I + s)/(U + s) would cancel catastrophically for a nearly perfect prediction.

struct LossParams {
    hw: u32,        // pixels per image
    nimg: u32,
    chunk_px: u32,  // pixels per chunk (loss_partial)
    nchunks: u32,   // chunks per image
    alpha: f32,
    gamma: f32,
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(0) var<uniform> lsp: LossParams;

var<workgroup> lred: array<vec4<f32>, 256>;
var<workgroup> lred5: array<f32, 256>;
var<workgroup> lred1: array<f32, 64>;

// log(1 + e) for e in [0, 1] without relying on log's accuracy near 1:
// log(1 + e) = 2 atanh(z), z = e / (2 + e) <= 1/3, odd series to z^17 (error < 1e-10).
fn log1p_unit(e: f32) -> f32 {
    let z = e / (2.0 + e);
    let z2 = z * z;
    var s = 1.0 / 17.0;
    s = s * z2 + 1.0 / 15.0;
    s = s * z2 + 1.0 / 13.0;
    s = s * z2 + 1.0 / 11.0;
    s = s * z2 + 1.0 / 9.0;
    s = s * z2 + 1.0 / 7.0;
    s = s * z2 + 1.0 / 5.0;
    s = s * z2 + 1.0 / 3.0;
    s = s * z2 + 1.0;
    return 2.0 * z * s;
}

// x^gamma for x in [0, 1]; gamma = 2 exactly as x * x.
fn powg(x: f32, g: f32) -> f32 {
    if (g == 2.0) {
        return x * x;
    }
    if (g == 1.0) {
        return x;
    }
    if (g == 0.0) {
        return 1.0;
    }
    if (x <= 0.0) {
        return 0.0;
    }
    return pow(x, g);
}

struct PixelTerms {
    p: f32,       // sigmoid(l)
    q: f32,       // 1 - p = sigmoid(-l), without cancellation
    bce: f32,
    omp: f32,     // 1 - p_t = p (1 - t) + q t
    at: f32,
    focal: f32,
}

fn pixel_terms(l: f32, t: f32) -> PixelTerms {
    let e = exp(-abs(l));        // in (0, 1]
    let r = 1.0 / (1.0 + e);
    var p: f32;
    var q: f32;
    if (l >= 0.0) {
        p = r;
        q = e * r;
    } else {
        p = e * r;
        q = r;
    }
    let bce = max(l, 0.0) - l * t + log1p_unit(e);
    let omp = p * (1.0 - t) + q * t;
    let at = lsp.alpha * t + (1.0 - lsp.alpha) * (1.0 - t);
    return PixelTerms(p, q, bce, omp, at, at * bce * powg(omp, lsp.gamma));
}

// First level: workgroup g covers chunk g % nchunks of image g / nchunks; writes
// part[(img * 5 + s) * nchunks + chunk] for s = focal, p t, p, t, 1 - p_t.
@group(0) @binding(1) var<storage, read> lp_logits: array<f32>;
@group(0) @binding(2) var<storage, read> lp_target: array<f32>;
@group(0) @binding(3) var<storage, read_write> lp_part: array<f32>;

@compute @workgroup_size(256)
fn loss_partial(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let g = flat_group(wid, nwg);
    let chunk = g % lsp.nchunks;
    let img = g / lsp.nchunks;
    var acc = vec4<f32>(0.0);
    var acc5 = 0.0;
    if (img < lsp.nimg) {
        let p0 = chunk * lsp.chunk_px;
        let p1 = min(lsp.hw, p0 + lsp.chunk_px);
        let base = img * lsp.hw;
        for (var i = p0 + lid; i < p1; i += 256u) {
            let t = lp_target[base + i];
            let pt = pixel_terms(lp_logits[base + i], t);
            acc += vec4<f32>(pt.focal, pt.p * t, pt.p, t);
            acc5 += pt.omp;
        }
    }
    lred[lid] = acc;
    lred5[lid] = acc5;
    workgroupBarrier();
    for (var s = 128u; s > 0u; s = s / 2u) {
        if (lid < s) {
            lred[lid] = lred[lid] + lred[lid + s];
            lred5[lid] = lred5[lid] + lred5[lid + s];
        }
        workgroupBarrier();
    }
    if (lid == 0u && img < lsp.nimg) {
        let v = lred[0];
        let o = img * 5u * lsp.nchunks + chunk;
        lp_part[o] = v.x;
        lp_part[o + lsp.nchunks] = v.y;
        lp_part[o + 2u * lsp.nchunks] = v.z;
        lp_part[o + 3u * lsp.nchunks] = v.w;
        lp_part[o + 4u * lsp.nchunks] = lred5[0];
    }
}

// Second level: sums[j] = sum_k part[j * nchunks + k], j < nimg * 5 (one workgroup per j).
@group(0) @binding(1) var<storage, read> lr_part: array<f32>;
@group(0) @binding(2) var<storage, read_write> lr_sums: array<f32>;

@compute @workgroup_size(64)
fn loss_reduce(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let j = flat_group(wid, nwg);
    let jn = lsp.nimg * 5u;
    var acc = 0.0;
    if (j < jn) {
        for (var k = lid; k < lsp.nchunks; k += 64u) {
            acc += lr_part[j * lsp.nchunks + k];
        }
    }
    lred1[lid] = acc;
    workgroupBarrier();
    for (var s = 32u; s > 0u; s = s / 2u) {
        if (lid < s) {
            lred1[lid] = lred1[lid] + lred1[lid + s];
        }
        workgroupBarrier();
    }
    if (lid == 0u && j < jn) {
        lr_sums[j] = lred1[0];
    }
}

// Loss values [total, focal, dice] from the per-image sums (one invocation, images in order).
struct FinalParams {
    nimg: u32,
    inv_pixels: f32,  // 1 / (B * HW)
    lambda: f32,
    smoothing: f32,
}

@group(0) @binding(0) var<uniform> lfp: FinalParams;
@group(0) @binding(1) var<storage, read> lf_sums: array<f32>;
@group(0) @binding(2) var<storage, read_write> lf_out: array<f32>;

@compute @workgroup_size(1)
fn loss_finalize() {
    var focal = 0.0;
    var dice = 0.0;
    for (var b = 0u; b < lfp.nimg; b++) {
        let o = b * 5u;
        focal += lf_sums[o];
        dice += lf_sums[o + 4u] / (lf_sums[o + 2u] + lf_sums[o + 3u] + lfp.smoothing);
    }
    focal *= lfp.inv_pixels;
    dice /= f32(lfp.nimg);
    lf_out[0] = lfp.lambda * focal + (1.0 - lfp.lambda) * dice;
    lf_out[1] = focal;
    lf_out[2] = dice;
}

// grad[i] = cf * d focal_i / dl + cd * d dice_b / dl_i, with cf = scale * lambda / (B HW) and
// cd = scale * (1 - lambda) / B.
//   d focal/dl = a_t [ (p - t)(1-p_t)^g - g BCE (1-p_t)^(g-1) (2t - 1) p q ]
//   d dice_b/dl = -(2 t U' - (2 I + s)) / U'^2 * p q,  I = Σ p t, U' = Σ p + Σ t + s, where
//   2 t U' - (2 I + s) = t (D + U') - (1 - t)(2 I + s) with D = Σ (1 - p_t) (no cancellation).
struct GradParams {
    n: u32,
    hw: u32,
    alpha: f32,
    gamma: f32,
    cf: f32,
    cd: f32,
    smoothing: f32,
    pad: u32,
}

@group(0) @binding(0) var<uniform> lgp: GradParams;
@group(0) @binding(1) var<storage, read> lg_logits: array<f32>;
@group(0) @binding(2) var<storage, read> lg_target: array<f32>;
@group(0) @binding(3) var<storage, read> lg_sums: array<f32>;
@group(0) @binding(4) var<storage, read_write> lg_grad: array<f32>;

@compute @workgroup_size(64)
fn loss_grad(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let i = flat_group(wid, nwg) * 64u + lid;
    if (i >= lgp.n) {
        return;
    }
    let l = lg_logits[i];
    let t = lg_target[i];
    // pixel_terms reads alpha from lsp, which this entry point does not bind: recompute here.
    let e = exp(-abs(l));
    let r = 1.0 / (1.0 + e);
    var p: f32;
    var q: f32;
    if (l >= 0.0) {
        p = r;
        q = e * r;
    } else {
        p = e * r;
        q = r;
    }
    let bce = max(l, 0.0) - l * t + log1p_unit(e);
    let omp = p * (1.0 - t) + q * t;
    let at = lgp.alpha * t + (1.0 - lgp.alpha) * (1.0 - t);
    let g = lgp.gamma;
    let pq = p * q;
    var dmod = 0.0; // g (1-p_t)^(g-1)
    if (g != 0.0) {
        dmod = g * powg(omp, g - 1.0);
    }
    let dfocal = at * ((p - t) * powg(omp, g) - bce * dmod * (2.0 * t - 1.0) * pq);
    let o = (i / lgp.hw) * 5u;
    let inter = lg_sums[o + 1u];
    let u = lg_sums[o + 2u] + lg_sums[o + 3u] + lgp.smoothing;
    let num = t * (lg_sums[o + 4u] + u) - (1.0 - t) * (2.0 * inter + lgp.smoothing);
    let ddice = -num / (u * u) * pq;
    lg_grad[i] = lgp.cf * dfocal + lgp.cd * ddice;
}

// ---- feature distillation loss (Med-FastSAM paper, Eq. 1) and its gradient ----
// student s and teacher t: N = numel elements each (image embeddings [B, g, g, D], any layout, the
// same for both).
//   L = 1/N sum_i (s_i - t_i)^2,   dL/ds_i = 2 (s_i - t_i) / N (times grad_scale).
// Reductions: per chunk of `chunk` elements a partial sum of squares (mse_partial), then one
// workgroup sums the partials in a fixed order (mse_finalize). Deterministic, no atomics.

struct MseParams {
    n: u32,        // elements
    chunk: u32,    // elements per partial sum (mse_partial)
    nchunks: u32,
    pad0: u32,
    inv_n: f32,    // 1 / N
    gscale: f32,   // 2 grad_scale / N (mse_grad)
    pad1: u32,
    pad2: u32,
}

@group(0) @binding(0) var<uniform> msp: MseParams;

var<workgroup> mred: array<f32, 256>;

// Tree sum of mred[0..256] into mred[0] (every invocation of the workgroup calls it).
fn mse_tree(lid: u32) {
    workgroupBarrier();
    for (var s = 128u; s > 0u; s = s / 2u) {
        if (lid < s) {
            mred[lid] = mred[lid] + mred[lid + s];
        }
        workgroupBarrier();
    }
}

// part[c] = sum over chunk c of (s - t)^2 (one workgroup per chunk).
@group(0) @binding(1) var<storage, read> mp_s: array<f32>;
@group(0) @binding(2) var<storage, read> mp_t: array<f32>;
@group(0) @binding(3) var<storage, read_write> mp_part: array<f32>;

@compute @workgroup_size(256)
fn mse_partial(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let c = flat_group(wid, nwg);
    var acc = 0.0;
    if (c < msp.nchunks) {
        let i0 = c * msp.chunk;
        let i1 = min(msp.n, i0 + msp.chunk);
        for (var i = i0 + lid; i < i1; i += 256u) {
            let d = mp_s[i] - mp_t[i];
            acc += d * d;
        }
    }
    mred[lid] = acc;
    mse_tree(lid);
    if (lid == 0u && c < msp.nchunks) {
        mp_part[c] = mred[0];
    }
}

// out[0] = (sum_c part[c]) / N (one workgroup).
@group(0) @binding(1) var<storage, read> mf_part: array<f32>;
@group(0) @binding(2) var<storage, read_write> mf_out: array<f32>;

@compute @workgroup_size(256)
fn mse_finalize(@builtin(local_invocation_index) lid: u32) {
    var acc = 0.0;
    for (var k = lid; k < msp.nchunks; k += 256u) {
        acc += mf_part[k];
    }
    mred[lid] = acc;
    mse_tree(lid);
    if (lid == 0u) {
        mf_out[0] = mred[0] * msp.inv_n;
    }
}

// grad[i] = gscale (s_i - t_i).
@group(0) @binding(1) var<storage, read> mg_s: array<f32>;
@group(0) @binding(2) var<storage, read> mg_t: array<f32>;
@group(0) @binding(3) var<storage, read_write> mg_grad: array<f32>;

@compute @workgroup_size(64)
fn mse_grad(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let i = flat_group(wid, nwg) * 64u + lid;
    if (i >= msp.n) {
        return;
    }
    mg_grad[i] = msp.gscale * (mg_s[i] - mg_t[i]);
}
