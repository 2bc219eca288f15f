//! Shader families (one .wgsl per op family, prefixed by `common.wgsl`) and the pipeline cache.
//! A kernel is a family, an entry point and values for the family's WGSL `override` constants, so
//! variants such as transposed matmuls or fused activations are separate cached pipelines of one
//! shader module per family.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum ShaderFamily {
    Matmul,
    Elementwise,
    Norm,
    Conv,
    Attention,
    Resize,
    Otsu,
    Pe,
    Loss,
    Optim,
}

const COMMON: &str = include_str!("../../shaders/common.wgsl");

impl ShaderFamily {
    pub fn name(self) -> &'static str {
        match self {
            ShaderFamily::Matmul => "matmul",
            ShaderFamily::Elementwise => "elementwise",
            ShaderFamily::Norm => "norm",
            ShaderFamily::Conv => "conv",
            ShaderFamily::Attention => "attention",
            ShaderFamily::Resize => "resize",
            ShaderFamily::Otsu => "otsu",
            ShaderFamily::Pe => "pe",
            ShaderFamily::Loss => "loss",
            ShaderFamily::Optim => "optim",
        }
    }
    pub fn source(self) -> &'static str {
        match self {
            ShaderFamily::Matmul => include_str!("../../shaders/matmul.wgsl"),
            ShaderFamily::Elementwise => include_str!("../../shaders/elementwise.wgsl"),
            ShaderFamily::Norm => include_str!("../../shaders/norm.wgsl"),
            ShaderFamily::Conv => include_str!("../../shaders/conv.wgsl"),
            ShaderFamily::Attention => include_str!("../../shaders/attention.wgsl"),
            ShaderFamily::Resize => include_str!("../../shaders/resize.wgsl"),
            ShaderFamily::Otsu => include_str!("../../shaders/otsu.wgsl"),
            ShaderFamily::Pe => include_str!("../../shaders/pe.wgsl"),
            ShaderFamily::Loss => include_str!("../../shaders/loss.wgsl"),
            ShaderFamily::Optim => include_str!("../../shaders/optim.wgsl"),
        }
    }
}

/// A compile-time constant of a kernel variant.
#[derive(Clone, Debug, PartialEq)]
pub enum Const {
    U(u32),
    I(i32),
    F(f32),
    B(bool),
}

/// One compute entry point of a shader family, specialised by constants.
#[derive(Clone, Debug)]
pub struct Kernel {
    pub family: ShaderFamily,
    pub entry: &'static str,
    pub consts: Vec<(&'static str, Const)>,
    /// Workgroup size (x*y*z), checked against the device limit before the first dispatch.
    pub invocations: u32,
}

impl Kernel {
    pub fn new(family: ShaderFamily, entry: &'static str, invocations: u32) -> Self {
        Kernel { family, entry, consts: Vec::new(), invocations }
    }
    pub fn u(mut self, name: &'static str, v: u32) -> Self {
        self.consts.push((name, Const::U(v)));
        self
    }
    pub fn i(mut self, name: &'static str, v: i32) -> Self {
        self.consts.push((name, Const::I(v)));
        self
    }
    pub fn f(mut self, name: &'static str, v: f32) -> Self {
        self.consts.push((name, Const::F(v)));
        self
    }
    pub fn b(mut self, name: &'static str, v: bool) -> Self {
        self.consts.push((name, Const::B(v)));
        self
    }
    fn constants(&self) -> Vec<(&'static str, f64)> {
        self.consts
            .iter()
            .map(|(n, c)| {
                let v = match c {
                    Const::U(v) => *v as f64,
                    Const::I(v) => *v as f64,
                    Const::F(v) => *v as f64,
                    Const::B(v) => *v as u32 as f64,
                };
                (*n, v)
            })
            .collect()
    }
    pub fn key(&self) -> String {
        format!("{}#{}|{:?}", self.family.name(), self.entry, self.consts)
    }
}

/// Full WGSL source of a family's module.
pub fn family_source(f: ShaderFamily) -> String {
    format!("{}\n{}", COMMON, f.source())
}

#[derive(Default)]
pub(crate) struct PipelineCache {
    modules: Mutex<HashMap<ShaderFamily, Arc<wgpu::ShaderModule>>>,
    pipelines: Mutex<HashMap<String, Arc<wgpu::ComputePipeline>>>,
}

impl PipelineCache {
    pub fn len(&self) -> usize {
        self.pipelines.lock().unwrap().len()
    }

    pub fn get(&self, device: &wgpu::Device, k: &Kernel) -> Arc<wgpu::ComputePipeline> {
        let key = k.key();
        if let Some(p) = self.pipelines.lock().unwrap().get(&key) {
            return p.clone();
        }
        let module = {
            let mut mods = self.modules.lock().unwrap();
            mods.entry(k.family)
                .or_insert_with(|| {
                    Arc::new(device.create_shader_module(wgpu::ShaderModuleDescriptor {
                        label: Some(k.family.name()),
                        source: wgpu::ShaderSource::Wgsl(family_source(k.family).into()),
                    }))
                })
                .clone()
        };
        let constants = k.constants();
        #[cfg(not(target_arch = "wasm32"))]
        dump_pipeline(k, &constants);
        let pipeline = Arc::new(device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(k.entry),
            layout: None,
            module: &module,
            entry_point: Some(k.entry),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants: &constants,
                zero_initialize_workgroup_memory: false,
            },
            cache: None,
        }));
        self.pipelines.lock().unwrap().insert(key, pipeline.clone());
        pipeline
    }
}

/// Debugging aid: with `MEDFASTSAM_DUMP_PIPELINES=DIR`, every pipeline created is appended to
/// `DIR/pipelines.jsonl` (family, entry point, override constants) and each family's full WGSL
/// source is written to `DIR/<family>.wgsl`, so a driver or browser that fails on one of them can
/// be tested pipeline by pipeline (web/test/pipelines.mjs does that in Chromium).
#[cfg(not(target_arch = "wasm32"))]
fn dump_pipeline(k: &Kernel, constants: &[(&'static str, f64)]) {
    use std::io::Write;
    let Some(dir) = std::env::var_os("MEDFASTSAM_DUMP_PIPELINES") else { return };
    let dir = std::path::PathBuf::from(dir);
    let _ = std::fs::create_dir_all(&dir);
    let src = dir.join(format!("{}.wgsl", k.family.name()));
    if !src.exists() {
        let _ = std::fs::write(&src, family_source(k.family));
    }
    let consts: serde_json::Map<String, serde_json::Value> =
        constants.iter().map(|(n, v)| (n.to_string(), serde_json::json!(v))).collect();
    let line = serde_json::json!({"family": k.family.name(), "entry": k.entry, "constants": consts});
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("pipelines.jsonl")) {
        let _ = writeln!(f, "{line}");
    }
}
