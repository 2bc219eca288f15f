// ---- resize.wgsl: bilinear resize (PyTorch align_corners=False, no antialias) and its backward ----
// Channels-last (B, H, W, C). For an output index d along an axis of input size n and output size o:
//   src = max((d + 0.5) * n / o - 0.5, 0),  i0 = floor(src),  i1 = min(i0 + 1, n - 1),
//   l1 = src - i0,  l0 = 1 - l1;   y = sum over the 2x2 neighbours of l_y * l_x * x.
// The coordinate is evaluated exactly in integers: 2*o*src = (2d + 1)*n - o, so i0 and the
// remainder are exact and only l1 = rem / (2o) is rounded (PyTorch evaluates src in f32, which
// agrees exactly whenever n/o is a power of two, e.g. the model's x4 resizes, and otherwise
// differs by rounding of the coordinate, at most ~1 ulp of src).

struct ResizeParams {
    n: u32,    // elements of the output (forward) or of dx (backward)
    bsz: u32,
    h: u32,    // input height
    w: u32,    // input width
    c: u32,
    oh: u32,   // output height
    ow: u32,   // output width
    pad: u32,
    sy: f32,   // h / oh (only to bound the backward's search range)
    sx: f32,   // w / ow
}

@group(0) @binding(0) var<uniform> rp: ResizeParams;

struct Taps {
    i0: u32,
    i1: u32,
    l0: f32,
    l1: f32,
}

fn taps(d: u32, n: u32, o: u32) -> Taps {
    let num = (2u * d + 1u) * n;   // 2*o*(src + 0.5)
    var t: Taps;
    t.i0 = 0u;
    t.l1 = 0.0;
    if (num > o) {
        let q = num - o;            // 2*o*src > 0
        let den = 2u * o;
        t.i0 = q / den;
        t.l1 = f32(q % den) / f32(den);
        if (t.i0 >= n) {            // unreachable for src < n, kept as a guard
            t.i0 = n - 1u;
            t.l1 = 0.0;
        }
    }
    t.i1 = min(t.i0 + 1u, n - 1u);
    t.l0 = 1.0 - t.l1;
    return t;
}

// Weight that output index d gives to input index i along one axis (both taps may be i).
fn tap_weight(t: Taps, i: u32) -> f32 {
    var wgt = 0.0;
    if (t.i0 == i) { wgt += t.l0; }
    if (t.i1 == i) { wgt += t.l1; }
    return wgt;
}

@group(0) @binding(1) var<storage, read> bl_x: array<f32>;
@group(0) @binding(2) var<storage, read_write> bl_y: array<f32>;

@compute @workgroup_size(256)
fn bilinear(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let i = flat_group(wid, nwg) * 256u + lid;
    if (i >= rp.n) { return; }
    let c = i % rp.c;
    let q = i / rp.c;
    let ox = q % rp.ow;
    let q2 = q / rp.ow;
    let oy = q2 % rp.oh;
    let b = q2 / rp.oh;
    let ty = taps(oy, rp.h, rp.oh);
    let tx = taps(ox, rp.w, rp.ow);
    let r0 = (b * rp.h + ty.i0) * rp.w;
    let r1 = (b * rp.h + ty.i1) * rp.w;
    let top = tx.l0 * bl_x[(r0 + tx.i0) * rp.c + c] + tx.l1 * bl_x[(r0 + tx.i1) * rp.c + c];
    let bot = tx.l0 * bl_x[(r1 + tx.i0) * rp.c + c] + tx.l1 * bl_x[(r1 + tx.i1) * rp.c + c];
    bl_y[i] = ty.l0 * top + ty.l1 * bot;
}

// Output indices along one axis that may use input index i as a tap: those with
// i - 1 <= i0(d) <= i, i.e. (i - 0.5)/s - 0.5 <= d < (i + 1.5)/s - 0.5, widened by one on each side
// against rounding (the exact weights are recomputed with `taps`, so extra indices add zero).
fn out_range(scale: f32, i: u32, o: u32) -> vec2<u32> {
    let lo = i32(ceil((f32(i) - 0.5) / scale - 0.5)) - 1;
    let hi = i32(floor((f32(i) + 1.5) / scale - 0.5)) + 1;
    return vec2<u32>(u32(max(lo, 0)), u32(clamp(hi, 0, i32(o) - 1)));
}

// bilinear_backward (gather, accumulating): dx[b, iy, ix, c] += sum over outputs (oy, ox) of
// wy(oy, iy) * wx(ox, ix) * dy[b, oy, ox, c].
@group(0) @binding(1) var<storage, read> blb_dy: array<f32>;
@group(0) @binding(2) var<storage, read_write> blb_dx: array<f32>;

@compute @workgroup_size(256)
fn bilinear_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let i = flat_group(wid, nwg) * 256u + lid;
    if (i >= rp.n) { return; }
    let c = i % rp.c;
    let q = i / rp.c;
    let ix = q % rp.w;
    let q2 = q / rp.w;
    let iy = q2 % rp.h;
    let b = q2 / rp.h;
    let ry = out_range(rp.sy, iy, rp.oh);
    let rx = out_range(rp.sx, ix, rp.ow);
    var acc = 0.0;
    for (var oy = ry.x; oy <= ry.y; oy++) {
        let wy = tap_weight(taps(oy, rp.h, rp.oh), iy);
        if (wy == 0.0) { continue; }
        let row = (b * rp.oh + oy) * rp.ow;
        var racc = 0.0;
        for (var ox = rx.x; ox <= rx.y; ox++) {
            let wx = tap_weight(taps(ox, rp.w, rp.ow), ix);
            racc = fma(wx, blb_dy[(row + ox) * rp.c + c], racc);
        }
        acc = fma(wy, racc, acc);
    }
    blb_dx[i] = blb_dx[i] + acc;
}
