// ---- optim.wgsl: Adam / AdamW update, in place, one invocation per parameter ----
// PyTorch semantics: g = grad * grad_scale; p *= (1 - lr * wd) (decoupled weight decay, AdamW);
// m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
// p -= (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps).
// The step-dependent factors are computed on the CPU in f64.

struct AdamParams {
    n: u32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    step_size: f32,  // lr / (1 - beta1^t)
    bc2_sqrt: f32,   // sqrt(1 - beta2^t)
    decay: f32,      // 1 - lr * weight_decay
    grad_scale: f32,
}

@group(0) @binding(0) var<uniform> ap: AdamParams;
@group(0) @binding(1) var<storage, read> ad_g: array<f32>;
@group(0) @binding(2) var<storage, read_write> ad_p: array<f32>;
@group(0) @binding(3) var<storage, read_write> ad_m: array<f32>;
@group(0) @binding(4) var<storage, read_write> ad_v: array<f32>;

@compute @workgroup_size(64)
fn adam_step(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let i = flat_group(wid, nwg) * 64u + lid;
    if (i >= ap.n) {
        return;
    }
    let g = ad_g[i] * ap.grad_scale;
    let m = ap.beta1 * ad_m[i] + (1.0 - ap.beta1) * g;
    let v = ap.beta2 * ad_v[i] + (1.0 - ap.beta2) * g * g;
    ad_m[i] = m;
    ad_v[i] = v;
    let p = ad_p[i] * ap.decay;
    ad_p[i] = p - ap.step_size * m / (sqrt(v) / ap.bc2_sqrt + ap.eps);
}
