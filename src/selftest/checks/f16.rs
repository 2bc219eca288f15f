//! f16 in shaders (`SHADER_F16`): storage arrays of f16 read, widened, multiplied in f16 and
//! written back. The product's f16 weights (`--precision f16`) are read with core WGSL's
//! `unpack2x16float`, which the GEMM checks cover, so this small shader of its own tells whether
//! the adapter's `shader-f16` arithmetic can be relied on.

use super::backward::Parts;
use super::*;

const SRC: &str = "
enable f16;

@group(0) @binding(0) var<storage, read> a: array<f16>;
@group(0) @binding(1) var<storage, read> b: array<f16>;
@group(0) @binding(2) var<storage, read_write> wide: array<f32>;
@group(0) @binding(3) var<storage, read_write> prod: array<f16>;

// Each invocation one pair of elements (one 32-bit word of each f16 array).
@compute @workgroup_size(64)
fn f16_storage(@builtin(global_invocation_id) id: vec3<u32>) {
    let n = arrayLength(&wide);
    for (var j = 2u * id.x; j < min(2u * id.x + 2u, n); j++) {
        wide[j] = f32(a[j]) * f32(b[j]);
        prod[j] = a[j] * b[j];
    }
}
";

fn entry(i: u32, t: &crate::gpu::Tensor) -> wgpu::BindGroupEntry<'_> {
    wgpu::BindGroupEntry {
        binding: i,
        resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer: t.buffer(),
            offset: t.offset(),
            size: wgpu::BufferSize::new(t.bytes()),
        }),
    }
}

/// `n` (even) products of f16 values in ±[1/64, 8]: `f32(a) * f32(b)` (exact: 22 significant
/// bits) and `a * b` in f16 (one rounding: within 2^-11 ≈ 4.9e-4 of the exact product).
pub(super) fn f16_check(name: &str, n: usize, tol: f64, seed: u64) -> Check {
    Check {
        name: name.to_string(),
        family: "f16",
        shape: format!("{n} products"),
        tolerance: tol,
        body: body(move |gpu: &Gpu| {
            Box::pin(async move {
                if !gpu.features.contains(wgpu::Features::SHADER_F16) {
                    return Err(Skip(
                        "the adapter does not offer SHADER_F16 (f16 in shaders)".into(),
                    )
                    .into());
                }
                let n = n.div_ceil(2) * 2;
                let mut rng = Rng::new(seed);
                let mut val = || {
                    let m = rng.range(1.0 / 64.0, 8.0);
                    half::f16::from_f64(if rng.uniform() < 0.5 { -m } else { m })
                };
                let a: Vec<half::f16> = (0..n).map(|_| val()).collect();
                let b: Vec<half::f16> = (0..n).map(|_| val()).collect();
                let pack = |v: &[half::f16]| -> Vec<u32> {
                    v.chunks_exact(2)
                        .map(|p| p[0].to_bits() as u32 | (p[1].to_bits() as u32) << 16)
                        .collect()
                };
                let ta = gpu.upload_u32(&pack(&a), &[n / 2])?;
                let tb = gpu.upload_u32(&pack(&b), &[n / 2])?;
                let wide = gpu.empty(&[n])?;
                let prod = gpu.empty(&[n / 2])?;
                let d = &gpu.device;
                let module = d.create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some("selftest f16"),
                    source: wgpu::ShaderSource::Wgsl(SRC.into()),
                });
                let pipeline = d.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some("f16_storage"),
                    layout: None,
                    module: &module,
                    entry_point: Some("f16_storage"),
                    compilation_options: Default::default(),
                    cache: None,
                });
                let layout = pipeline.get_bind_group_layout(0);
                let bg = d.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: Some("f16_storage"),
                    layout: &layout,
                    entries: &[
                        entry(0, &ta),
                        entry(1, &tb),
                        entry(2, &wide),
                        entry(3, &prod),
                    ],
                });
                let mut enc = d.create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("f16_storage"),
                });
                {
                    let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                        label: None,
                        timestamp_writes: None,
                    });
                    pass.set_pipeline(&pipeline);
                    pass.set_bind_group(0, &bg, &[]);
                    pass.dispatch_workgroups((n / 2).div_ceil(64) as u32, 1, 1);
                }
                gpu.queue.submit([enc.finish()]);
                gpu.take_errors()?;
                let exact: Vec<f64> = a
                    .iter()
                    .zip(&b)
                    .map(|(x, y)| x.to_f64() * y.to_f64())
                    .collect();
                let got16: Vec<f32> = gpu
                    .read_async(&prod)
                    .await?
                    .iter()
                    .flat_map(|w| {
                        let bits = w.to_bits();
                        [bits as u16, (bits >> 16) as u16]
                    })
                    .map(|h| half::f16::from_bits(h).to_f32())
                    .collect();
                let mut p = Parts::default();
                p.push(
                    "f32(a) * f32(b)",
                    gpu.read_async(&wide).await?,
                    exact.clone(),
                );
                p.push("a * b in f16", got16, exact);
                let mut o = p.outcome(None, None, None);
                o.entry = "f16_storage (the check's own shader)".into();
                Ok(o)
            })
        }),
    }
}
