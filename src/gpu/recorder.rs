//! Command recording. A whole forward (or forward+backward) is recorded into one command encoder,
//! with the dispatches in one open compute pass, and submitted once; nothing is read back between
//! kernels. Kernel parameters live in uniform chunks written just before submission. Commands
//! that need a pipeline not compiled yet are held and encoded at submission, after the missing
//! pipelines have been compiled together (in parallel natively).

use super::pipeline::Kernel;
use super::{DType, Gpu, Tensor};
use crate::error::{Error, Result};

/// Uniform parameters of one dispatch (binding 0): a `#[repr(C)]` struct declared with
/// [`uniform!`](crate::uniform), one per WGSL params struct, with the WGSL struct's member names,
/// order and types. Natively, the layout is checked against the kernel's WGSL struct (naga
/// reflection) the first time a kernel is dispatched with it; a mismatch is an error naming the
/// kernel and the field.
pub trait Params: bytemuck::Pod {
    /// Fields in memory order: (name, WGSL type, byte offset).
    const FIELDS: &'static [(&'static str, &'static str, usize)];
}

/// Declares a uniform params struct (see [`Params`](crate::gpu::Params)): `#[repr(C)]`, `Pod`,
/// fields of WGSL scalar types `u32`, `i32`, `f32`, and their description for the layout check.
///
/// ```ignore
/// medfastsam::uniform! {
///     /// Parameters of `ln_fwd` and friends (norm.wgsl `LnParams`).
///     pub struct LnParams { pub rows: u32, pub c: u32, pub eps: f32, pub pad: u32 }
/// }
/// ```
#[macro_export]
macro_rules! uniform {
    ($(#[$m:meta])* $vis:vis struct $name:ident { $($(#[$fm:meta])* $fvis:vis $field:ident : $ty:ident),* $(,)? }) => {
        $(#[$m])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
        $vis struct $name { $($(#[$fm])* $fvis $field: $ty),* }
        impl $crate::gpu::Params for $name {
            const FIELDS: &'static [(&'static str, &'static str, usize)] =
                &[$((stringify!($field), $crate::uniform!(@scalar $ty), core::mem::offset_of!($name, $field))),*];
        }
    };
    (@scalar u32) => { "u32" };
    (@scalar i32) => { "i32" };
    (@scalar f32) => { "f32" };
}

const CHUNK: u64 = 64 * 1024;

/// A storage binding of a held dispatch: buffer, byte offset, byte size.
type Binding = (wgpu::Buffer, u64, u64);

/// A command recorded while pipelines were missing (see `Recorder::held`).
enum Held {
    Dispatch {
        kernel: Kernel,
        /// (uniform chunk, offset, size) of its params.
        params: (usize, u64, u64),
        tensors: Vec<Binding>,
        groups: [u32; 3],
    },
    Zero(Binding),
    Copy {
        src: Binding,
        dst: (wgpu::Buffer, u64),
    },
}

struct UniformChunk {
    buffer: wgpu::Buffer,
    data: Vec<u8>,
}

pub struct Recorder<'g> {
    pub gpu: &'g Gpu,
    /// Explicit kernel choices for the ops recorded here (tests and benchmarks pin a layout with
    /// it); the default lets each op choose by adapter and shape.
    pub plan: KernelPlan,
    encoder: Option<wgpu::CommandEncoder>,
    pass: Option<wgpu::ComputePass<'static>>,
    chunks: Vec<UniformChunk>,
    /// Commands held back since the first dispatch whose pipeline did not exist yet, in order:
    /// encoded at the next flush or submit, once the missing pipelines have been compiled
    /// together ([`PipelineCache::prepare`](super::pipeline::PipelineCache::prepare): in
    /// parallel natively). A recording whose pipelines all exist is encoded as it goes.
    held: Vec<Held>,
    /// Number of dispatches recorded so far.
    pub dispatches: usize,
    /// FLOPs declared by the ops recorded so far (for benchmarks).
    pub flops: f64,
    /// Profiling: when set, every dispatch is submitted and waited for, and its wall time added
    /// to `profile[entry]` (native only; for `medfastsam bench --profile`).
    pub profile: Option<std::collections::BTreeMap<String, ProfileEntry>>,
    /// Prefix of the profile keys (e.g. "bwd " to separate the phases of a training step).
    pub profile_phase: &'static str,
    /// Memory view: when set, [`Recorder::mark`] appends the bytes in use at each named point of
    /// the recording and the highest bytes in use since the previous mark. The pool counts a
    /// tensor from its allocation to its drop while commands are recorded, so the view is exact
    /// without running anything.
    pub memory: Option<Vec<MemoryMark>>,
    /// `flops` at the previous profiled dispatch (each dispatch is charged the FLOPs declared since).
    #[cfg_attr(target_arch = "wasm32", allow(dead_code))]
    profile_flops: f64,
}

/// Kernel choices a recording can pin instead of leaving them to the adapter and the shapes.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct KernelPlan {
    /// Attention kernels: several query/key rows per invocation (`Some(true)`, what CPU adapters
    /// such as lavapipe get by default), one (`Some(false)`, what GPUs get), or by adapter (`None`).
    pub register_rows: Option<bool>,
    /// Attention (forward, dQ and dK/dV kernels of the register-rows layout): the subgroup
    /// module where the device has 8-wide subgroups (`None` or `Some(true)`), or never
    /// (`Some(false)`).
    pub subgroups: Option<bool>,
    /// MBConv: at least this many hidden-channel groups (0 = as many as the device's storage
    /// binding limit requires).
    pub min_mbconv_groups: usize,
}

/// One point of a recording's memory view (see [`Recorder::memory`]).
#[derive(Clone, Debug)]
pub struct MemoryMark {
    /// What was recorded just before this point (e.g. "fwd encoder stage 1").
    pub what: String,
    /// Bytes held by live tensors at this point.
    pub in_use: u64,
    /// Highest bytes held since the previous mark.
    pub peak: u64,
    /// Bytes allocated from the device at this point: held, and free in the pool (a freed
    /// buffer is reused only for a tensor of its size class).
    pub allocated: u64,
}

/// Profile totals of one kernel (or kernel variant).
#[derive(Clone, Copy, Debug, Default)]
pub struct ProfileEntry {
    pub calls: usize,
    pub ms: f64,
    /// FLOPs the ops declared for these dispatches (GEMMs, convolutions, attention).
    pub flops: f64,
}

impl<'g> Recorder<'g> {
    pub(crate) fn new(gpu: &'g Gpu) -> Self {
        let encoder = gpu
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("medfastsam"),
            });
        Recorder {
            gpu,
            plan: KernelPlan::default(),
            encoder: Some(encoder),
            pass: None,
            chunks: Vec::new(),
            held: Vec::new(),
            dispatches: 0,
            flops: 0.0,
            profile: None,
            profile_phase: "",
            profile_flops: 0.0,
            memory: None,
        }
    }

    /// Starts the memory view at this point (the marks before it are dropped).
    pub fn start_memory_view(&mut self) {
        self.gpu.memory_window();
        self.memory = Some(Vec::new());
    }

    /// A point of the memory view named `what()` (nothing unless the view is on).
    pub fn mark(&mut self, what: impl FnOnce() -> String) {
        if let Some(m) = self.memory.as_mut() {
            let (stats, peak) = self.gpu.memory_window();
            m.push(MemoryMark {
                what: format!("{}{}", self.profile_phase, what()),
                in_use: stats.in_use,
                peak,
                allocated: stats.allocated,
            });
        }
    }

    fn end_pass(&mut self) {
        self.pass = None;
    }

    fn encoder(&mut self) -> &mut wgpu::CommandEncoder {
        self.end_pass();
        self.encoder.as_mut().expect("recorder already submitted")
    }

    /// Splits `groups` workgroups over x and y so that neither exceeds the per-dimension limit.
    /// Kernels recover the flat index with `flat_group(wid, nwg)` from common.wgsl.
    pub fn grid(&self, groups: usize) -> [u32; 3] {
        let max = self.gpu.limits.max_compute_workgroups_per_dimension as usize;
        let groups = groups.max(1);
        if groups <= max {
            [groups as u32, 1, 1]
        } else {
            let y = groups.div_ceil(max);
            let x = groups.div_ceil(y);
            [x as u32, y as u32, 1]
        }
    }

    fn uniform_slot(&mut self, p: &[u8]) -> (usize, u64, u64) {
        let align = self.gpu.limits.min_uniform_buffer_offset_alignment.max(16) as usize;
        let size = p.len().max(16).next_multiple_of(16);
        let need_new = match self.chunks.last() {
            Some(c) => c.data.len().next_multiple_of(align) + size > CHUNK as usize,
            None => true,
        };
        if need_new {
            let buffer = self.gpu.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("params"),
                size: CHUNK,
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            self.chunks.push(UniformChunk {
                buffer,
                data: Vec::with_capacity(CHUNK as usize),
            });
        }
        let ci = self.chunks.len() - 1;
        let c = &mut self.chunks[ci];
        let off = c.data.len().next_multiple_of(align);
        c.data.resize(off, 0);
        c.data.extend_from_slice(p);
        c.data.resize(off + size, 0);
        (ci, off as u64, size as u64)
    }

    /// Records one dispatch: binding 0 is the uniform params struct `p`, bindings 1.. are `tensors`
    /// in order. Workgroup counts, binding sizes and the number of storage buffers are checked
    /// against the device limits first, and (natively) `p`'s layout against the kernel's WGSL.
    pub fn dispatch<P: Params>(
        &mut self,
        k: &Kernel,
        p: P,
        tensors: &[&Tensor],
        groups: [u32; 3],
    ) -> Result<()> {
        let lim = &self.gpu.limits;
        for (axis, &g) in groups.iter().enumerate() {
            if g > lim.max_compute_workgroups_per_dimension {
                return Err(Error::Limit {
                    what: format!("kernel {} (workgroups along axis {axis})", k.entry),
                    needed: g as u64,
                    limit_name: "max_compute_workgroups_per_dimension",
                    limit: lim.max_compute_workgroups_per_dimension as u64,
                    hint: "this is a bug in the dispatch grid; please report it".into(),
                });
            }
        }
        if k.invocations > lim.max_compute_invocations_per_workgroup {
            return Err(Error::Limit {
                what: format!("kernel {}", k.entry),
                needed: k.invocations as u64,
                limit_name: "max_compute_invocations_per_workgroup",
                limit: lim.max_compute_invocations_per_workgroup as u64,
                hint: "use an adapter that supports the WebGPU default of 256".into(),
            });
        }
        if tensors.len() as u32 > lim.max_storage_buffers_per_shader_stage {
            return Err(Error::Limit {
                what: format!("kernel {} (storage buffers)", k.entry),
                needed: tensors.len() as u64,
                limit_name: "max_storage_buffers_per_shader_stage",
                limit: lim.max_storage_buffers_per_shader_stage as u64,
                hint: "use an adapter that supports the WebGPU default of 8".into(),
            });
        }
        // f16 storage is read only by the GEMM families built for it, at B (binding 2); any other
        // kernel would read its words as garbage.
        for (i, t) in tensors.iter().enumerate() {
            let want = if k.family.b_is_f16() && i == 1 {
                DType::F16
            } else {
                DType::F32
            };
            if t.dtype() != want {
                return Err(Error::Invalid(format!(
                    "kernel {}#{} binding {} {:?}: needs {want:?} storage, got {:?}",
                    k.family.name(),
                    k.entry,
                    i + 1,
                    t.shape,
                    t.dtype()
                )));
            }
        }
        let align = self.gpu.limits.min_storage_buffer_offset_alignment as u64;
        for (i, t) in tensors.iter().enumerate() {
            self.gpu.check_binding(
                &format!("kernel {} binding {} {:?}", k.entry, i + 1, t.shape),
                t.bytes(),
            )?;
            if t.offset % align != 0 {
                return Err(Error::Limit {
                    what: format!(
                        "kernel {} binding {} (view at byte {})",
                        k.entry,
                        i + 1,
                        t.offset
                    ),
                    needed: t.offset,
                    limit_name: "min_storage_buffer_offset_alignment",
                    limit: align,
                    hint: "views must start at aligned offsets; this is a bug in the batch split"
                        .into(),
                });
            }
        }
        if groups.contains(&0) {
            return Ok(());
        }
        #[cfg(not(target_arch = "wasm32"))]
        self.gpu.pipelines.check_uniform::<P>(k)?;
        let params = self.uniform_slot(bytemuck::bytes_of(&p));
        let tensors: Vec<Binding> = tensors
            .iter()
            .map(|t| (t.buffer().clone(), t.offset, t.bytes()))
            .collect();
        let ready = if self.held.is_empty() {
            self.gpu.pipelines.cached(k)
        } else {
            None
        };
        match ready {
            Some(pipeline) => self.encode_dispatch(&pipeline, k.entry, params, &tensors, groups),
            None => self.held.push(Held::Dispatch {
                kernel: k.clone(),
                params,
                tensors,
                groups,
            }),
        }
        self.dispatches += 1;
        #[cfg(not(target_arch = "wasm32"))]
        if self.profile.is_some() {
            let t0 = std::time::Instant::now();
            self.flush()?;
            self.gpu.sync()?;
            let dt = t0.elapsed().as_secs_f64() * 1e3;
            let key = if std::env::var_os("MEDFASTSAM_PROFILE_DETAIL").is_some() {
                let c: Vec<String> = k.consts.iter().map(|(n, v)| format!("{n}={v:?}")).collect();
                format!(
                    "{}{} {} [{}]",
                    self.profile_phase,
                    k.entry,
                    c.join(","),
                    groups.map(|g| g.to_string()).join("x")
                )
            } else {
                format!("{}{}", self.profile_phase, k.entry)
            };
            let flops = self.flops - self.profile_flops;
            self.profile_flops = self.flops;
            let e = self.profile.as_mut().unwrap().entry(key).or_default();
            e.calls += 1;
            e.ms += dt;
            e.flops += flops;
        }
        Ok(())
    }

    fn encode_dispatch(
        &mut self,
        pipeline: &wgpu::ComputePipeline,
        label: &str,
        (ci, off, size): (usize, u64, u64),
        tensors: &[Binding],
        groups: [u32; 3],
    ) {
        let mut entries = Vec::with_capacity(tensors.len() + 1);
        entries.push(wgpu::BindGroupEntry {
            binding: 0,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: &self.chunks[ci].buffer,
                offset: off,
                size: wgpu::BufferSize::new(size),
            }),
        });
        for (i, (buffer, offset, bytes)) in tensors.iter().enumerate() {
            entries.push(wgpu::BindGroupEntry {
                binding: i as u32 + 1,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer,
                    offset: *offset,
                    size: wgpu::BufferSize::new(*bytes),
                }),
            });
        }
        let bg = self
            .gpu
            .device
            .create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(label),
                layout: &pipeline.get_bind_group_layout(0),
                entries: &entries,
            });
        if self.pass.is_none() {
            let enc = self.encoder.as_mut().expect("recorder already submitted");
            let pass = enc
                .begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: None,
                    timestamp_writes: None,
                })
                .forget_lifetime();
            self.pass = Some(pass);
        }
        let pass = self.pass.as_mut().unwrap();
        pass.set_pipeline(pipeline);
        pass.set_bind_group(0, &bg, &[]);
        pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
    }

    /// Compiles the pipelines the held commands need (all at once) and encodes the commands.
    fn encode_held(&mut self) {
        if self.held.is_empty() {
            return;
        }
        let held = std::mem::take(&mut self.held);
        let kernels: Vec<&Kernel> = held
            .iter()
            .filter_map(|h| match h {
                Held::Dispatch { kernel, .. } => Some(kernel),
                _ => None,
            })
            .collect();
        self.gpu.pipelines.prepare(&self.gpu.device, &kernels);
        for h in held {
            match h {
                Held::Dispatch {
                    kernel,
                    params,
                    tensors,
                    groups,
                } => {
                    let pipeline = self.gpu.pipelines.get(&self.gpu.device, &kernel);
                    self.encode_dispatch(&pipeline, kernel.entry, params, &tensors, groups);
                }
                Held::Zero((buffer, off, bytes)) => {
                    self.encoder().clear_buffer(&buffer, off, Some(bytes));
                }
                Held::Copy {
                    src: (src, so, bytes),
                    dst: (dst, dof),
                } => {
                    self.encoder()
                        .copy_buffer_to_buffer(&src, so, &dst, dof, bytes);
                }
            }
        }
    }

    /// Records a zero fill of `t` (ordered with the dispatches around it).
    pub fn zero(&mut self, t: &Tensor) {
        let bytes = t.bytes();
        let off = t.offset;
        if self.held.is_empty() {
            self.encoder().clear_buffer(t.buffer(), off, Some(bytes));
        } else {
            self.held.push(Held::Zero((t.buffer().clone(), off, bytes)));
        }
    }

    /// A new pooled tensor filled with zeros.
    pub fn zeros(&mut self, shape: &[usize]) -> Result<Tensor> {
        let t = self.gpu.empty(shape)?;
        self.zero(&t);
        Ok(t)
    }

    /// Records a copy of `src` into `dst` (same element count).
    pub fn copy(&mut self, src: &Tensor, dst: &Tensor) {
        assert_eq!(src.numel(), dst.numel());
        let bytes = src.bytes();
        let (so, dof) = (src.offset, dst.offset);
        if self.held.is_empty() {
            self.encoder()
                .copy_buffer_to_buffer(src.buffer(), so, dst.buffer(), dof, bytes);
        } else {
            self.held.push(Held::Copy {
                src: (src.buffer().clone(), so, bytes),
                dst: (dst.buffer().clone(), dof),
            });
        }
    }

    /// A new tensor holding a copy of `src`.
    pub fn clone_tensor(&mut self, src: &Tensor) -> Result<Tensor> {
        let t = self.gpu.empty(&src.shape)?;
        self.copy(src, &t);
        Ok(t)
    }

    /// Finishes the encoder, uploads the parameters and submits everything.
    pub fn submit(mut self) -> Result<()> {
        self.submit_inner()
    }

    fn submit_inner(&mut self) -> Result<()> {
        self.encode_held();
        self.end_pass();
        let Some(enc) = self.encoder.take() else {
            return Ok(());
        };
        for c in &self.chunks {
            if !c.data.is_empty() {
                self.gpu.queue.write_buffer(&c.buffer, 0, &c.data);
            }
        }
        self.gpu.queue.submit([enc.finish()]);
        self.gpu.release_pending();
        self.gpu.take_errors()
    }

    /// Submits what is recorded so far and starts a new encoder (used to bound memory of very long
    /// recordings, e.g. between training steps).
    pub fn flush(&mut self) -> Result<()> {
        self.submit_inner()?;
        self.chunks.clear();
        self.encoder = Some(self.gpu.device.create_command_encoder(&Default::default()));
        Ok(())
    }
}

impl Drop for Recorder<'_> {
    fn drop(&mut self) {
        // Dropping without submit discards the recording (held commands included: a recording
        // that is never run, such as the memory view, compiles nothing); end the pass first so
        // wgpu is happy.
        self.pass = None;
    }
}
