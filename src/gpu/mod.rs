//! GPU runtime: adapter selection, device with the adapter's limits, buffer pool, pipeline cache,
//! command recording and readback. Every kernel of the model goes through [`Recorder::dispatch`],
//! which checks workgroup counts and binding sizes against the device limits before recording.

mod pipeline;
mod pool;
mod recorder;
mod tensor;

#[cfg(target_arch = "wasm32")]
pub use pipeline::on_pipeline_created;
pub use pipeline::{Kernel, PipelineUse, ShaderFamily, now_ms};
pub use pool::PoolStats;
pub use recorder::{KernelPlan, MemoryMark, Params, ProfileEntry, Recorder};
pub use tensor::{DType, Tensor, beyond_f16};

use crate::error::{Error, Result};
use std::sync::{Arc, Mutex};

/// Which adapter to use. Empty fields mean "let the runtime choose".
#[derive(Clone, Debug, Default)]
pub struct AdapterRequest {
    /// `vulkan`, `gl`, `metal`, `dx12`, `webgpu` or a comma list; None = all (or `WGPU_BACKEND`).
    pub backend: Option<String>,
    /// Case-insensitive substring of the adapter name, or an index into the list of adapters.
    pub adapter: Option<String>,
    /// Request only WebGPU's default limits instead of the adapter's (to check natively that the
    /// work fits a browser). Env `MEDFASTSAM_LIMITS=webgpu`.
    pub webgpu_limits: bool,
}

impl AdapterRequest {
    /// Reads `MEDFASTSAM_BACKEND` and `MEDFASTSAM_ADAPTER` for fields not already set.
    #[allow(unused_mut)]
    pub fn with_env(mut self) -> Self {
        #[cfg(not(target_arch = "wasm32"))]
        {
            // WGPU_BACKEND is read here too (not by wgpu), so that a bad value is an error
            // naming it instead of silently no backend at all.
            if self.backend.is_none() {
                self.backend = ["MEDFASTSAM_BACKEND", "WGPU_BACKEND"]
                    .iter()
                    .find_map(|k| std::env::var(k).ok().filter(|s| !s.trim().is_empty()));
            }
            if self.adapter.is_none() {
                self.adapter = std::env::var("MEDFASTSAM_ADAPTER")
                    .ok()
                    .filter(|s| !s.is_empty());
            }
            if std::env::var("MEDFASTSAM_LIMITS").is_ok_and(|v| v.eq_ignore_ascii_case("webgpu")) {
                self.webgpu_limits = true;
            }
        }
        self
    }

    /// Checks the request without touching a GPU: a backend name that is not one wgpu knows is
    /// an error naming it (so that a typo fails at once, before any work).
    pub fn check(&self) -> Result<()> {
        if let Some(b) = &self.backend {
            parse_backends(b)?;
        }
        if self.adapter.as_deref().is_some_and(|a| a.trim().is_empty()) {
            return Err(Error::Invalid(
                "--adapter is empty (expected an index or part of an adapter's name)".into(),
            ));
        }
        Ok(())
    }
}

/// Keeps window-system probes out of adapter enumeration, which never needs a window system.
///
/// Mesa's implicit Vulkan layer `VK_LAYER_MESA_device_select` connects to the Wayland (and X)
/// display when the application enables the surface extensions (wgpu always does) to find the
/// GPU that drives the screen; without `XDG_RUNTIME_DIR`, libwayland then prints
/// "error: XDG_RUNTIME_DIR is invalid or not set in the environment." on every enumeration, even
/// though nothing failed. The layer only reorders adapters, which [`Gpu::new`] does itself, so it
/// is disabled (`NODEVICE_SELECT=1`, the switch its manifest declares) unless the user set
/// `NODEVICE_SELECT` or asked for the layer's choice with `MESA_VK_DEVICE_SELECT`. (The GL
/// backend, created without a display handle, uses EGL's surfaceless platform and probes nothing.)
///
/// # Safety
/// Changes the process environment: call it before any other thread exists (first thing in
/// `main`).
#[cfg(not(target_arch = "wasm32"))]
pub unsafe fn quiet_window_system_probes() {
    if std::env::var_os("NODEVICE_SELECT").is_none()
        && std::env::var_os("MESA_VK_DEVICE_SELECT").is_none()
    {
        // SAFETY: the caller guarantees that no other thread runs.
        unsafe { std::env::set_var("NODEVICE_SELECT", "1") };
    }
}

/// A short description of the adapter in use, printed by the CLI and the page.
#[derive(Clone, Debug)]
pub struct AdapterSummary {
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
}

impl std::fmt::Display for AdapterSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}, {}", self.name, self.backend, self.device_type)?;
        if !self.driver.is_empty() {
            write!(f, ", {}", self.driver)?;
        }
        write!(f, ")")
    }
}

/// The device and everything that lives as long as it: pipelines, pooled buffers, error sink.
pub struct Gpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    pub features: wgpu::Features,
    pipelines: pipeline::PipelineCache,
    pool: Arc<Mutex<pool::Pool>>,
    errors: Arc<Mutex<Vec<String>>>,
    dummy: Mutex<Option<Tensor>>,
    dummy_out: Mutex<Option<Tensor>>,
}

fn parse_backends(s: &str) -> Result<wgpu::Backends> {
    let mut b = wgpu::Backends::empty();
    for part in s.split(',').map(|p| p.trim().to_ascii_lowercase()) {
        b |= match part.as_str() {
            "vulkan" | "vk" => wgpu::Backends::VULKAN,
            "gl" | "gles" | "opengl" => wgpu::Backends::GL,
            "metal" | "mtl" => wgpu::Backends::METAL,
            "dx12" | "d3d12" => wgpu::Backends::DX12,
            "webgpu" | "browser" => wgpu::Backends::BROWSER_WEBGPU,
            "all" | "" => wgpu::Backends::all(),
            other => {
                return Err(Error::Invalid(format!(
                    "unknown backend '{other}' (expected vulkan, gl, metal, dx12, webgpu or all)"
                )));
            }
        };
    }
    Ok(b)
}

#[cfg(not(target_arch = "wasm32"))]
fn type_rank(t: wgpu::DeviceType) -> u32 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    }
}

#[cfg(not(target_arch = "wasm32"))]
const INSTALL_HINT: &str = "install a GPU driver with Vulkan support; on a machine without a GPU \
install the software Vulkan driver (Debian/Ubuntu: apt-get install mesa-vulkan-drivers libvulkan1)";

/// The adapters of `backends` that can run our kernels, in the order [`AdapterRequest::adapter`]'s
/// index counts them: real GPUs first, then Vulkan before the other backends.
#[cfg(not(target_arch = "wasm32"))]
async fn usable_adapters(
    instance: &wgpu::Instance,
    backends: wgpu::Backends,
) -> Vec<wgpu::Adapter> {
    let mut adapters = instance.enumerate_adapters(backends).await;
    // Compute shaders and storage buffers are required (WebGL-class GL adapters lack them).
    adapters.retain(|a| {
        a.get_downlevel_capabilities()
            .flags
            .contains(wgpu::DownlevelFlags::COMPUTE_SHADERS)
            && a.limits().max_storage_buffers_per_shader_stage >= 8
    });
    adapters.sort_by_key(|a| {
        let i = a.get_info();
        // Prefer real GPUs, then Vulkan over GL.
        (
            type_rank(i.device_type),
            (i.backend != wgpu::Backend::Vulkan) as u32,
        )
    });
    adapters
}

/// One usable adapter, as [`list_adapters`] finds it.
#[derive(Clone, Debug)]
pub struct AdapterListing {
    /// The backend's name as `--backend` spells it (`vulkan`, `gl`, `metal`, `dx12`).
    pub backend: &'static str,
    /// Its index among the usable adapters of that backend alone.
    pub index: usize,
    pub info: wgpu::AdapterInfo,
}

impl AdapterListing {
    /// The request that opens exactly this adapter.
    pub fn request(&self, webgpu_limits: bool) -> AdapterRequest {
        AdapterRequest {
            backend: Some(self.backend.to_string()),
            adapter: Some(self.index.to_string()),
            webgpu_limits,
        }
    }
}

/// Every usable adapter of `backends` (None: all), backend by backend (Vulkan, Metal, DX12, GL),
/// without opening any. An adapter listed twice with identical information (the same driver
/// found twice) is listed once. Native only.
#[cfg(not(target_arch = "wasm32"))]
pub fn list_adapters(backends: Option<&str>) -> Result<Vec<AdapterListing>> {
    let wanted = match backends {
        Some(b) => parse_backends(b)?,
        None => wgpu::InstanceDescriptor::new_without_display_handle_from_env().backends,
    };
    let mut out: Vec<AdapterListing> = Vec::new();
    for (b, name) in [
        (wgpu::Backends::VULKAN, "vulkan"),
        (wgpu::Backends::METAL, "metal"),
        (wgpu::Backends::DX12, "dx12"),
        (wgpu::Backends::GL, "gl"),
    ] {
        if !wanted.contains(b) {
            continue;
        }
        let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
        desc.backends = b;
        let instance = wgpu::Instance::new(desc);
        let adapters = pollster::block_on(usable_adapters(&instance, b));
        for (index, a) in adapters.iter().enumerate() {
            let info = a.get_info();
            if !out.iter().any(|l| l.info == info) {
                out.push(AdapterListing {
                    backend: name,
                    index,
                    info,
                });
            }
        }
    }
    Ok(out)
}

impl Gpu {
    /// Whether the device has subgroup operations with subgroups of exactly 8 invocations (what
    /// the `mm_sg` GEMM kernel assumes: its 8-invocation workgroup is one subgroup).
    pub fn subgroups_of_8(&self) -> bool {
        self.features.contains(wgpu::Features::SUBGROUP)
            && self.info.subgroup_min_size == 8
            && self.info.subgroup_max_size == 8
    }

    /// Whether the blocked GEMM without subgroups uses 32 x 16 blocks per invocation (`mm_v4s`)
    /// rather than 32 x 32 (`mm_v4`): on SwiftShader, the browser's software adapter, whose JIT
    /// takes about 2 s over each `mm_v4` pipeline and a third of that over `mm_v4s`, which runs
    /// a few per cent slower (CONTRIBUTING.md, "GEMM blocks for SwiftShader"). In a browser every
    /// CPU adapter is taken for such a JIT; natively only one named SwiftShader.
    pub fn small_gemm_blocks(&self) -> bool {
        if self.info.device_type != wgpu::DeviceType::Cpu {
            return false;
        }
        let named = |s: &str| s.to_ascii_lowercase().contains("swiftshader");
        cfg!(target_arch = "wasm32") || named(&self.info.name) || named(&self.info.driver)
    }

    /// Native: blocks on adapter and device creation.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn new(req: &AdapterRequest) -> Result<Gpu> {
        pollster::block_on(Self::new_async(req))
    }

    /// Creates the device, asking for the adapter's own limits (not WebGPU's defaults).
    pub async fn new_async(req: &AdapterRequest) -> Result<Gpu> {
        let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
        if let Some(b) = &req.backend {
            desc.backends = parse_backends(b)?;
        }
        let backends = desc.backends;
        let instance = wgpu::Instance::new(desc);
        let adapter = Self::choose_adapter(&instance, backends, req).await?;
        let info = adapter.get_info();
        let limits = if req.webgpu_limits {
            wgpu::Limits::default()
        } else {
            adapter.limits()
        };
        let mut features = wgpu::Features::empty();
        // Subgroups: native only (wgpu does not expose them through the browser's WebGPU yet).
        #[cfg(not(target_arch = "wasm32"))]
        let wanted = [
            wgpu::Features::TIMESTAMP_QUERY,
            wgpu::Features::SHADER_F16,
            wgpu::Features::SUBGROUP,
        ];
        #[cfg(target_arch = "wasm32")]
        let wanted = [wgpu::Features::TIMESTAMP_QUERY, wgpu::Features::SHADER_F16];
        for f in wanted {
            if adapter.features().contains(f) {
                features |= f;
            }
        }
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("medfastsam"),
                required_features: features,
                required_limits: limits.clone(),
                experimental_features: wgpu::ExperimentalFeatures::disabled(),
                memory_hints: wgpu::MemoryHints::Performance,
                trace: wgpu::Trace::Off,
            })
            .await
            .map_err(|e| Error::Gpu(format!("request_device on {}: {e}", info.name)))?;
        let errors: Arc<Mutex<Vec<String>>> = Arc::default();
        let sink = errors.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            sink.lock().unwrap().push(e.to_string());
        }));
        let sink = errors.clone();
        device.set_device_lost_callback(move |reason, msg| {
            let msg = if msg.trim().is_empty() {
                String::new()
            } else {
                format!(": {msg}")
            };
            sink.lock()
                .unwrap()
                .push(format!("device lost ({reason:?}){msg}"));
        });
        let limits = device.limits();
        Ok(Gpu {
            device,
            queue,
            info,
            limits,
            features,
            pipelines: Default::default(),
            pool: Arc::default(),
            errors,
            dummy: Mutex::new(None),
            dummy_out: Mutex::new(None),
        })
    }

    async fn choose_adapter(
        instance: &wgpu::Instance,
        backends: wgpu::Backends,
        req: &AdapterRequest,
    ) -> Result<wgpu::Adapter> {
        #[cfg(not(target_arch = "wasm32"))]
        {
            let mut adapters = usable_adapters(instance, backends).await;
            if adapters.is_empty() {
                return Err(Error::NoAdapter(format!(
                    "no adapter with compute shaders found for backends {backends:?}; {INSTALL_HINT}"
                )));
            }
            if let Some(sel) = &req.adapter {
                let names: Vec<String> = adapters
                    .iter()
                    .enumerate()
                    .map(|(k, a)| {
                        format!("{k}: {} ({:?})", a.get_info().name, a.get_info().backend)
                    })
                    .collect();
                let pick = if let Ok(idx) = sel.parse::<usize>() {
                    (idx < adapters.len()).then_some(idx)
                } else {
                    let s = sel.to_ascii_lowercase();
                    adapters
                        .iter()
                        .position(|a| a.get_info().name.to_ascii_lowercase().contains(&s))
                };
                return match pick {
                    Some(k) => Ok(adapters.swap_remove(k)),
                    // A selection that matches nothing is a mistake of the caller, not a
                    // machine without a GPU: Invalid, not NoAdapter.
                    None => Err(Error::Invalid(format!(
                        "no adapter matches '{sel}'; adapters: {}",
                        names.join("; ")
                    ))),
                };
            }
            Ok(adapters.swap_remove(0))
        }
        #[cfg(target_arch = "wasm32")]
        {
            let _ = (backends, req);
            instance
                .request_adapter(&wgpu::RequestAdapterOptions {
                    power_preference: wgpu::PowerPreference::HighPerformance,
                    ..Default::default()
                })
                .await
                .map_err(|e| {
                    Error::NoAdapter(format!(
                        "this browser offers no WebGPU adapter ({e}); use a browser with WebGPU enabled"
                    ))
                })
        }
    }

    pub fn summary(&self) -> AdapterSummary {
        AdapterSummary {
            name: self.info.name.clone(),
            backend: format!("{:?}", self.info.backend),
            device_type: format!("{:?}", self.info.device_type),
            driver: [self.info.driver.as_str(), self.info.driver_info.as_str()]
                .iter()
                .filter(|s| !s.is_empty())
                .cloned()
                .collect::<Vec<_>>()
                .join(" "),
        }
    }

    /// Whether the device has been lost (driver reset, out of memory on the device, destroyed):
    /// nothing more can run on it. Polls first, so that a pending loss callback has run.
    pub fn is_lost(&self) -> bool {
        #[cfg(not(target_arch = "wasm32"))]
        let _ = self.device.poll(wgpu::PollType::Poll);
        self.errors
            .lock()
            .unwrap()
            .iter()
            .any(|m| m.starts_with("device lost"))
    }

    /// Returns and clears the errors wgpu reported since the last call.
    pub fn take_errors(&self) -> Result<()> {
        let mut e = self.errors.lock().unwrap();
        if e.is_empty() {
            Ok(())
        } else {
            let msg = one_line(&e.join("; "));
            e.clear();
            Err(Error::Gpu(msg))
        }
    }

    pub fn pool_stats(&self) -> PoolStats {
        self.pool.lock().unwrap().stats()
    }

    pub fn reset_peak(&self) {
        self.pool.lock().unwrap().reset_peak();
    }

    /// (the pool's statistics now, highest bytes in use since the previous call): what a
    /// recording's memory marks report.
    pub(crate) fn memory_window(&self) -> (PoolStats, u64) {
        let mut p = self.pool.lock().unwrap();
        let peak = p.take_window_peak();
        (p.stats(), peak)
    }

    /// Makes the buffers this thread freed reusable by every thread (after a submission).
    pub(crate) fn release_pending(&self) {
        self.pool
            .lock()
            .unwrap()
            .release_pending(std::thread::current().id());
    }

    /// Releases cached free buffers (keeps those in use).
    pub fn trim_pool(&self) {
        self.pool.lock().unwrap().trim();
    }

    /// A 4-element tensor bound where a kernel's optional input is absent.
    pub fn dummy(&self) -> Tensor {
        let mut d = self.dummy.lock().unwrap();
        d.get_or_insert_with(|| self.upload(&[0.0; 4], &[4]).expect("dummy tensor"))
            .clone()
    }

    /// A 4-element tensor bound where a kernel's optional output is absent (a binding cannot be
    /// both read-only and writable in one dispatch, so this is not [`Gpu::dummy`]).
    pub fn dummy_out(&self) -> Tensor {
        let mut d = self.dummy_out.lock().unwrap();
        d.get_or_insert_with(|| self.upload(&[0.0; 4], &[4]).expect("dummy output tensor"))
            .clone()
    }

    /// Number of compiled compute pipelines.
    pub fn pipeline_count(&self) -> usize {
        self.pipelines.len()
    }

    /// Starts recording every pipeline the work recorded from now on uses (`true`), or stops and
    /// returns them (`false`): WGSL entry points, with the creation time of those created meanwhile.
    pub fn trace_pipelines(&self, on: bool) -> Vec<pipeline::PipelineUse> {
        self.pipelines.trace(on)
    }

    pub fn new_recorder(&self) -> Recorder<'_> {
        Recorder::new(self)
    }

    /// Waits until all submitted work is done (native: blocks; web: awaits).
    pub async fn wait_idle(&self) -> Result<()> {
        let (tx, rx) = futures_channel::oneshot::channel::<()>();
        self.queue.on_submitted_work_done(move || {
            let _ = tx.send(());
        });
        #[cfg(not(target_arch = "wasm32"))]
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Gpu(format!("poll: {e}")))?;
        rx.await
            .map_err(|_| Error::Gpu("device lost while waiting".into()))?;
        self.take_errors()
    }

    #[cfg(not(target_arch = "wasm32"))]
    pub fn sync(&self) -> Result<()> {
        pollster::block_on(self.wait_idle())
    }

    /// Checks that a storage binding of `bytes` fits the device.
    pub fn check_binding(&self, what: &str, bytes: u64) -> Result<()> {
        let lim = self.limits.max_storage_buffer_binding_size;
        if bytes > lim {
            return Err(Error::Limit {
                what: what.to_string(),
                needed: bytes,
                limit_name: "max_storage_buffer_binding_size",
                limit: lim,
                hint:
                    "use a smaller image size or batch, or an adapter with larger storage bindings"
                        .into(),
            });
        }
        let lim = self.limits.max_buffer_size;
        if bytes > lim {
            return Err(Error::Limit {
                what: what.to_string(),
                needed: bytes,
                limit_name: "max_buffer_size",
                limit: lim,
                hint: "use a smaller image size or batch".into(),
            });
        }
        Ok(())
    }
}

/// wgpu's error texts span lines ("Validation Error\n\nCaused by:\n  ..."); a user-facing error
/// is one line, so the parts are joined with ": ".
pub(crate) fn one_line(msg: &str) -> String {
    msg.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && *l != "Caused by:")
        .collect::<Vec<_>>()
        .join(": ")
}
