//! The browser surface of medfastsam (wasm32 + the `web` feature), called by the page's worker
//! (`web/worker.js`). One engine per page: a WebGPU device, the last weights file, and a
//! [`Segmenter`] at the chosen input size and variant. Everything numeric is the library's own code
//! (the same WGSL kernels as natively); this file only moves bytes between JavaScript and Rust.
//!
//! Errors reach JavaScript as `Error` objects whose `name` tells what went wrong (`LimitError`,
//! `NoAdapterError`, `WeightsError`, `ImageError`, `ConfigError`, `GpuError`, `StateError`), so the
//! page can say plainly what to do.

use crate::channel::{Channel, ChannelTransform, StainVectors};
use crate::error::Error;
use crate::gpu::{AdapterRequest, Gpu};
use crate::instances;
use crate::io::{self, GrayImage, RgbImage};
use crate::model::sam::{MaskChoice, Prompt};
use crate::model::weights::Stored;
use crate::model::{Config, MedFastSam, Precision, Variant, Weights};
use crate::segment::{Encoded, PromptSegmenter, Segmenter, TileOptions};
use crate::trained_on::{GreyHistogram, InputFacts, InputWarning, TrainedOn, input_warnings};
use serde_json::{Value, json};
use std::cell::RefCell;
use std::rc::Rc;
use wasm_bindgen::prelude::*;

#[wasm_bindgen]
extern "C" {
    #[wasm_bindgen(js_namespace = performance, js_name = now)]
    fn perf_now() -> f64;
    #[wasm_bindgen(js_namespace = console, js_name = error)]
    fn console_error(s: &str);
}

#[derive(Default)]
struct State {
    /// Leaked on purpose: the device lives as long as the page, and the segmenter borrows it.
    gpu: Option<&'static Gpu>,
    /// True when a smaller storage-binding limit than the adapter's is emulated.
    emulated_limit: bool,
    weights: Option<Rc<Weights>>,
    /// Whether the current weights were converted from a PyTorch or ONNX file.
    converted: bool,
    seg: Option<Rc<Segmenter<'static>>>,
    /// MobileSAM / LiteMedSAM: the prompted model and the image encoded last.
    sam: Option<Rc<PromptSegmenter<'static>>>,
    encoded: Option<Rc<(Encoded, RgbImage)>>,
}

thread_local! {
    static STATE: RefCell<State> = RefCell::new(State::default());
}

pub(crate) fn js_error(name: &str, msg: impl std::fmt::Display) -> JsValue {
    let e = js_sys::Error::new(&msg.to_string());
    e.set_name(name);
    e.into()
}

pub(crate) fn to_js(e: Error) -> JsValue {
    let name = match &e {
        Error::Limit { .. } => "LimitError",
        Error::NoAdapter(_) => "NoAdapterError",
        Error::Weights { .. } => "WeightsError",
        Error::Image { .. } => "ImageError",
        Error::Config(_) => "ConfigError",
        Error::Gpu(_) => "GpuError",
        Error::Io { .. } | Error::Invalid(_) => "Error",
    };
    js_error(name, e)
}

pub(crate) fn gpu() -> Result<&'static Gpu, JsValue> {
    STATE
        .with(|s| s.borrow().gpu)
        .ok_or_else(|| js_error("StateError", "the GPU is not initialised yet"))
}

pub(crate) fn weights() -> Result<Rc<Weights>, JsValue> {
    STATE.with(|s| s.borrow().weights.clone()).ok_or_else(|| {
        js_error(
            "StateError",
            "no weights loaded: choose a .safetensors weights file first",
        )
    })
}

pub(crate) fn segmenter() -> Result<Rc<Segmenter<'static>>, JsValue> {
    STATE.with(|s| s.borrow().seg.clone()).ok_or_else(|| {
        js_error(
            "StateError",
            "the model is not prepared: load weights first",
        )
    })
}

fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            console_error(&format!("medfastsam panicked: {info}"));
        }))
    });
}

fn adapter_json(gpu: &Gpu, emulated: bool) -> String {
    let s = gpu.summary();
    let l = &gpu.limits;
    json!({
        "name": s.name,
        "backend": s.backend,
        "device_type": s.device_type,
        "driver": s.driver,
        "emulated_limit": emulated,
        "features": {
            "shader_f16": gpu.features.contains(wgpu::Features::SHADER_F16),
            "timestamp_query": gpu.features.contains(wgpu::Features::TIMESTAMP_QUERY),
        },
        "limits": {
            "max_storage_buffer_binding_size": l.max_storage_buffer_binding_size,
            "max_buffer_size": l.max_buffer_size,
            "max_storage_buffers_per_shader_stage": l.max_storage_buffers_per_shader_stage,
            "max_compute_workgroup_storage_size": l.max_compute_workgroup_storage_size,
            "max_compute_invocations_per_workgroup": l.max_compute_invocations_per_workgroup,
            "max_compute_workgroups_per_dimension": l.max_compute_workgroups_per_dimension,
        },
    })
    .to_string()
}

/// Creates the WebGPU device (once; later calls return the same description). `max_binding_bytes`
/// lowers the storage-binding limit the library checks against, to see what the page says on a
/// device with small limits. Returns the adapter name, backend and limits as JSON.
#[wasm_bindgen]
pub async fn init_engine(max_binding_bytes: Option<f64>) -> Result<String, JsValue> {
    install_panic_hook();
    if let Some(g) = STATE.with(|s| s.borrow().gpu) {
        let emulated = STATE.with(|s| s.borrow().emulated_limit);
        return Ok(adapter_json(g, emulated));
    }
    let mut gpu = Gpu::new_async(&AdapterRequest::default())
        .await
        .map_err(to_js)?;
    let mut emulated = false;
    if let Some(m) = max_binding_bytes.filter(|m| *m >= 1.0) {
        let m = m as u64;
        if m < gpu.limits.max_storage_buffer_binding_size {
            gpu.limits.max_storage_buffer_binding_size = m;
            emulated = true;
        }
    }
    let gpu: &'static Gpu = Box::leak(Box::new(gpu));
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        s.gpu = Some(gpu);
        s.emulated_limit = emulated;
    });
    Ok(adapter_json(gpu, emulated))
}

/// Parses a safetensors weights file (f32, f16, bf16) and keeps it as the current weights; drops
/// the previous model. Returns JSON: tensor and parameter counts, storage types, the configuration
/// (from the metadata, or inferred from the shapes at 1024²) and whether it came from metadata,
/// the variant in the metadata (or null) and the default input size.
///
/// A PyTorch checkpoint (`.pth`/`.pt`, zip or legacy format) is converted here, in the worker
/// (`import::convert`), as `medfastsam import` does; ONNX exports come in pairs through
/// [`load_weights_onnx`].
#[wasm_bindgen]
pub fn load_weights(bytes: &[u8], name: &str) -> Result<String, JsValue> {
    if let Some(kind) = crate::model::weights::image_kind(bytes) {
        return Err(js_error(
            "WeightsError",
            format!(
                "{name} is an image ({kind}), not weights: add it under Images; weights are a \
                 .safetensors, .pth or .onnx file"
            ),
        ));
    }
    let safetensors = bytes.len() >= 9 && bytes[8] == b'{';
    let onnx = !safetensors && bytes.first() == Some(&0x08);
    if onnx {
        return Err(js_error(
            "WeightsError",
            format!(
                "{name}: an ONNX file alone is half of MobileSAM: choose encoder.onnx and sam.onnx together"
            ),
        ));
    }
    let (w, converted) = if safetensors {
        (Weights::from_bytes(bytes, name).map_err(to_js)?, false)
    } else {
        let imp = crate::import::convert::from_pth(bytes, name, None).map_err(to_js)?;
        (imp.weights, true)
    };
    install_weights(w, name, converted)
}

/// MobileSAM from its two ONNX exports (image encoder; prompt encoder + mask decoder), converted
/// in the worker.
#[wasm_bindgen]
pub fn load_weights_onnx(
    a: &[u8],
    a_name: &str,
    b: &[u8],
    b_name: &str,
) -> Result<String, JsValue> {
    use crate::import::onnx::{no_external, read_onnx};
    let ma = read_onnx(a, a_name, &no_external)
        .map_err(|e| js_error("WeightsError", format!("{e:#}")))?;
    let mb = read_onnx(b, b_name, &no_external)
        .map_err(|e| js_error("WeightsError", format!("{e:#}")))?;
    let name = format!("{a_name} + {b_name}");
    let imp = crate::import::convert::from_onnx(&[ma, mb], &name).map_err(to_js)?;
    install_weights(imp.weights, &name, true)
}

/// The current weights as a safetensors file (for the page's cache of converted weights).
#[wasm_bindgen]
pub fn weights_safetensors() -> Result<Vec<u8>, JsValue> {
    let w = weights()?;
    let cfg = w.resolve_config(None, 1024).map_err(to_js)?;
    w.to_bytes(&cfg, w.variant.unwrap_or_default(), false)
        .map_err(to_js)
}

fn install_weights(w: Weights, name: &str, converted: bool) -> Result<String, JsValue> {
    let cfg = w.resolve_config(None, 1024).map_err(to_js)?;
    let trained_on = TrainedOn::from_metadata(&w.metadata, name).map_err(to_js)?;
    let params: usize = w
        .tensors
        .values()
        .filter(|t| t.stored != Stored::I64)
        .map(|t| t.numel())
        .sum();
    let mut dtypes: Vec<&str> = w
        .tensors
        .values()
        .filter(|t| t.stored != Stored::I64)
        .map(|t| {
            if t.stored == Stored::F16 {
                "f16"
            } else {
                "f32"
            }
        })
        .collect();
    dtypes.sort();
    dtypes.dedup();
    let info = json!({
        "name": name,
        "tensors": w.tensors.len(),
        "parameters": params,
        "dtypes": dtypes,
        "config_in_metadata": w.config.is_some(),
        "config": serde_json::from_str::<Value>(&cfg.to_json()).unwrap_or(Value::Null),
        "variant": w.variant.map(|v| v.name()),
        "default_size": cfg.image_size,
        "default_variant": w.variant.unwrap_or_default().name(),
        "arch": cfg.arch.name(),
        "prompted": !cfg.arch.is_med_fastsam(),
        "converted": converted,
        "trained_on": trained_on,
    });
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        s.seg = None;
        s.sam = None;
        s.encoded = None;
        s.converted = converted;
        s.weights = Some(Rc::new(w));
        if let Some(g) = s.gpu {
            g.trim_pool();
        }
    });
    Ok(info.to_string())
}

/// Builds the model on the device for input size `size` (a multiple of 16; 0 = the weights'
/// default) and `variant` (`paper`, `released`, or empty = the weights' default): folds the
/// BatchNorms and uploads the weights. Returns the configuration used as JSON.
#[wasm_bindgen]
pub fn prepare(size: usize, variant: &str) -> Result<String, JsValue> {
    let gpu = gpu()?;
    let w = weights()?;
    let mut cfg = w.resolve_config(None, 1024).map_err(to_js)?;
    // A prompted model runs at the size it was trained at (its positional encoding and the
    // prompt coordinates assume it).
    if size != 0 && cfg.arch.is_med_fastsam() {
        cfg = cfg.with_image_size(size).map_err(to_js)?;
    }
    let v = if variant.is_empty() {
        w.variant.unwrap_or_default()
    } else {
        Variant::parse(variant).map_err(to_js)?
    };
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        s.seg = None;
        s.sam = None;
        s.encoded = None;
    });
    gpu.trim_pool();
    // f16 GEMM weights on a GPU with shader-f16, f32 on a software adapter (Precision::resolve).
    // Passed unresolved (a weight beyond f16's range then stays f32); resolved for the page.
    let asked = Precision::Auto;
    let precision = asked.resolve(gpu);
    if !cfg.arch.is_med_fastsam() {
        let sam = PromptSegmenter::with_precision(gpu, &w, &cfg, asked).map_err(to_js)?;
        gpu.take_errors().map_err(to_js)?;
        let bytes = sam.model.device_bytes();
        STATE.with(|s| s.borrow_mut().sam = Some(Rc::new(sam)));
        return Ok(json!({
            "image_size": cfg.image_size,
            "arch": cfg.arch.name(),
            "prompted": true,
            "precision": precision.name(),
            "weight_bytes": bytes,
            "config": serde_json::from_str::<Value>(&cfg.to_json()).unwrap_or(Value::Null),
        })
        .to_string());
    }
    let seg = Segmenter::with_precision(gpu, &w, Some(&cfg), Some(v), asked).map_err(to_js)?;
    gpu.take_errors().map_err(to_js)?;
    let bytes = seg.model.device_bytes();
    STATE.with(|s| s.borrow_mut().seg = Some(Rc::new(seg)));
    Ok(json!({
        "image_size": cfg.image_size,
        "variant": v.name(),
        "precision": precision.name(),
        "weight_bytes": bytes,
        "config": serde_json::from_str::<Value>(&cfg.to_json()).unwrap_or(Value::Null),
    })
    .to_string())
}

/// One forward on a synthetic image at the prepared size: compiles every pipeline the model uses
/// and surfaces limit errors before the first real image. Returns JSON with the pipeline count.
/// `on_pipeline(k)` is called after each pipeline this warm-up creates (k = created so far).
#[wasm_bindgen]
pub async fn warm_up(on_pipeline: Option<js_sys::Function>) -> Result<String, JsValue> {
    let before = gpu()?.pipeline_count();
    crate::gpu::on_pipeline_created(on_pipeline.map(|f| {
        Box::new(move |n: usize| {
            let _ = f.call1(
                &JsValue::NULL,
                &JsValue::from(n.saturating_sub(before) as f64),
            );
        }) as Box<dyn Fn(usize)>
    }));
    let r = warm_up_inner().await;
    crate::gpu::on_pipeline_created(None);
    r
}

async fn warm_up_inner() -> Result<String, JsValue> {
    if let Some(sam) = STATE.with(|s| s.borrow().sam.clone()) {
        let before = sam.gpu.pipeline_count();
        let img = RgbImage {
            width: 64,
            height: 48,
            data: (0..64 * 48 * 3).map(|i| (i * 37 % 251) as u8).collect(),
        };
        let e = sam.encode_async(&img).await.map_err(to_js)?;
        let p = Prompt {
            points: vec![],
            bbox: Some([8.0, 8.0, 40.0, 30.0]),
        };
        sam.decode_async(&e, &p, MaskChoice::Auto, false)
            .await
            .map_err(to_js)?;
        return Ok(json!({
            "pipelines": sam.gpu.pipeline_count(),
            "compiled": sam.gpu.pipeline_count() - before,
        })
        .to_string());
    }
    let seg = segmenter()?;
    let before = seg.gpu.pipeline_count();
    let (w, h) = (64usize, 48usize);
    let data = (0..w * h)
        .flat_map(|i| {
            let (x, y) = (i % w, i / w);
            let v = if (x / 8 + y / 8) % 2 == 0 { 200u8 } else { 40 };
            [v, (x * 4) as u8, (y * 5) as u8]
        })
        .collect();
    let img = RgbImage {
        width: w,
        height: h,
        data,
    };
    seg.segment_async(&img).await.map_err(to_js)?;
    Ok(json!({
        "pipelines": seg.gpu.pipeline_count(),
        "compiled": seg.gpu.pipeline_count() - before,
    })
    .to_string())
}

/// The result of one image, at its original resolution.
#[wasm_bindgen]
pub struct SegResult {
    width: usize,
    height: usize,
    threshold: f32,
    foreground: f64,
    decode_ms: f64,
    gpu_ms: f64,
    encode_ms: f64,
    rgba: Vec<u8>,
    coarse_rgba: Vec<u8>,
    fill_rgba: Vec<u8>,
    edge_rgba: Vec<u8>,
    mask_png: Vec<u8>,
    /// Prompted models: JSON with the IoU predictions and the chosen mask token.
    prompt_info: String,
    /// How the image was segmented: `resized` (stretched to S×S and back) or `tiled`; empty for
    /// prompted models.
    mode: &'static str,
    /// Windows of a tiled image (0 otherwise) and their rate.
    tiles: usize,
    tiles_per_s: f64,
    /// The objects ([`crate::instances`]): JSON summary, CSV and GeoJSON as the CLI's
    /// `segment --instances --geojson` writes them.
    objects: String,
    objects_csv: Vec<u8>,
    objects_geojson: Vec<u8>,
    /// JSON array of `{code, message}`: how the input looks unlike the model's training data.
    warnings: String,
    /// The channel transform applied (`rgb` when none).
    channel: String,
    /// The model's input after the channel transform, RGBA (empty for `rgb`).
    input_rgba: Vec<u8>,
}

#[wasm_bindgen]
impl SegResult {
    /// JSON array of `{code, message}` warnings (`foreground`, `polarity`, `size`, `stain`).
    #[wasm_bindgen(getter)]
    pub fn warnings(&self) -> String {
        self.warnings.clone()
    }

    /// The channel transform applied, e.g. `hematoxylin (standard H&E vectors)` or `rgb`.
    #[wasm_bindgen(getter)]
    pub fn channel(&self) -> String {
        self.channel.clone()
    }

    /// The model's input after the channel transform as RGBA at the image's size (empty when
    /// the channel is rgb).
    pub fn take_input_rgba(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.input_rgba)
    }

    /// Prompted models: JSON `{iou: [...], chosen}` (empty for Med-FastSAM).
    #[wasm_bindgen(getter)]
    pub fn prompt_info(&self) -> String {
        self.prompt_info.clone()
    }
    #[wasm_bindgen(getter)]
    pub fn width(&self) -> usize {
        self.width
    }
    #[wasm_bindgen(getter)]
    pub fn height(&self) -> usize {
        self.height
    }
    /// Otsu threshold of the coarse prompt, as a grey level in [0, 1].
    #[wasm_bindgen(getter)]
    pub fn threshold(&self) -> f32 {
        self.threshold
    }
    /// Fraction of mask pixels that are foreground.
    #[wasm_bindgen(getter)]
    pub fn foreground(&self) -> f64 {
        self.foreground
    }
    #[wasm_bindgen(getter)]
    pub fn decode_ms(&self) -> f64 {
        self.decode_ms
    }
    /// Resize, forward, resize of the logits to the original size and readback.
    #[wasm_bindgen(getter)]
    pub fn gpu_ms(&self) -> f64 {
        self.gpu_ms
    }
    #[wasm_bindgen(getter)]
    pub fn encode_ms(&self) -> f64 {
        self.encode_ms
    }
    /// The decoded image as RGBA (what the model saw before the stretch to S×S).
    pub fn take_rgba(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.rgba)
    }
    /// The Otsu coarse prompt as opaque grey RGBA.
    pub fn take_coarse_rgba(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.coarse_rgba)
    }
    /// The mask's interior tint (green, opaque where the mask is inside, transparent elsewhere):
    /// drawn over the image with the opacity slider's alpha.
    pub fn take_fill_rgba(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.fill_rgba)
    }
    /// The mask's outline (yellow, opaque), drawn over the tint at full alpha. Tint plus outline
    /// at opacity `a` give the same picture as the CLI's `_overlay.png` (`io::overlay`).
    pub fn take_edge_rgba(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.edge_rgba)
    }
    /// The mask as an 8-bit grey PNG (0/255) at the original resolution: byte for byte what the
    /// CLI writes as `<stem>_mask.png` for the same logits.
    pub fn take_mask_png(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.mask_png)
    }
    /// `tiled` (windows at the image's own scale) or `resized` (stretched to the model's size).
    #[wasm_bindgen(getter)]
    pub fn mode(&self) -> String {
        self.mode.to_string()
    }
    /// Windows of a tiled image (0 when resized).
    #[wasm_bindgen(getter)]
    pub fn tiles(&self) -> usize {
        self.tiles
    }
    /// Windows per second of a tiled image.
    #[wasm_bindgen(getter)]
    pub fn tiles_per_s(&self) -> f64 {
        self.tiles_per_s
    }
    /// The objects' summary as JSON: `count`, `mean_area` (px), `coverage` (0–1), `object_pixels`,
    /// `text` (as the CLI prints it), `labelling_ms`.
    #[wasm_bindgen(getter)]
    pub fn objects(&self) -> String {
        self.objects.clone()
    }
    /// `<stem>_objects.csv`, byte for byte what `medfastsam segment --instances` writes for the
    /// same mask.
    pub fn take_objects_csv(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.objects_csv)
    }
    /// `<stem>_objects.geojson` (QuPath detections), byte for byte what `medfastsam segment
    /// --geojson` writes for the same mask and output name.
    pub fn take_objects_geojson(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.objects_geojson)
    }
}

fn rgb_to_rgba(img: &RgbImage) -> Vec<u8> {
    img.data
        .chunks_exact(3)
        .flat_map(|p| [p[0], p[1], p[2], 255])
        .collect()
}

fn gray_to_rgba(img: &GrayImage) -> Vec<u8> {
    img.data.iter().flat_map(|&v| [v, v, v, 255]).collect()
}

/// Splits the overlay of `io::overlay` into a tint layer (interior) and an outline layer (edge
/// pixels), as RGBA.
fn overlay_layers(mask: &GrayImage) -> (Vec<u8>, Vec<u8>) {
    let kinds = crate::io::mask_outline(mask);
    let mut fill = vec![0u8; kinds.len() * 4];
    let mut edge = vec![0u8; kinds.len() * 4];
    for (i, &kind) in kinds.iter().enumerate() {
        let (layer, c) = match kind {
            0 => continue,
            1 => (&mut fill, crate::io::OVERLAY_FILL),
            _ => (&mut edge, crate::io::OVERLAY_EDGE),
        };
        layer[i * 4..i * 4 + 4].copy_from_slice(&[c[0], c[1], c[2], 255]);
    }
    (fill, edge)
}

/// The objects of a mask with the CLI's defaults (`segment --instances --geojson`): the summary
/// and the CSV and GeoJSON files, made row by row by the same [`instances::Labeler`] and writers.
fn objects(
    mask: &GrayImage,
    img: &RgbImage,
    base: &str,
    mpp: Option<f64>,
) -> crate::Result<(instances::Summary, Vec<u8>, Vec<u8>)> {
    let w = mask.width;
    let csv = instances::CsvWriter::new(Vec::new(), mpp)?;
    let geojson = instances::GeoJsonWriter::new(Vec::new())?
        .with_mpp(mpp)
        .with_uuid_seed(instances::uuid_seed(base));
    let mut sink = instances::WriterSink::<std::io::Cursor<Vec<u8>>, Vec<u8>, Vec<u8>> {
        labels: None,
        csv: Some(csv),
        geojson: Some(geojson),
    };
    let mut lab = instances::Labeler::new(w, instances::InstanceOptions::default());
    for (m, px) in mask.data.chunks_exact(w).zip(img.data.chunks_exact(3 * w)) {
        lab.push_row(m, px, &mut sink)?;
    }
    let summary = lab.finish(&mut sink)?;
    let (_, csv, geojson) = sink.finish()?;
    Ok((
        summary,
        csv.unwrap_or_default(),
        geojson.unwrap_or_default(),
    ))
}

/// The part of window `i` of an axis (starts `st`, window span `span`, axis length `len`) whose
/// pixels are nearer its own centre than a neighbour's: up to the middle of each overlap.
fn core_span(st: &[usize], i: usize, span: usize, len: usize) -> (usize, usize) {
    let lo = if i == 0 {
        0
    } else {
        (st[i] + st[i - 1] + span) / 2
    };
    let hi = if i + 1 == st.len() {
        len
    } else {
        (st[i + 1] + st[i] + span) / 2
    };
    (lo, hi)
}

/// Decodes one image file (PNG, JPEG, BMP, TIFF) and segments it with the prepared model, then
/// splits the mask into objects.
///
/// An image larger than the model's input size S in either dimension is segmented at its own
/// pixel scale in S×S windows (overlap S/8, one window per forward, each with its own Otsu
/// prompt, logits blended over the overlaps), as `medfastsam segment` does by default; with
/// `stretch`, and for images no larger than S, it is stretched to S×S and the logits resized back
/// (`segment --resize`). `on_progress(done, total, windows_per_s)` is called after each window.
/// `base` is the output base name (`<base>_objects.geojson`), which seeds the objects' UUIDs as
/// the CLI's does.
///
/// `channel` is the channel transform applied before the model (`rgb`, `grey`, `invert`,
/// `hematoxylin`, `eosin`, `dab`; empty = the one the weights record, as `segment` without
/// `--channel`), `macenko` estimates the stain vectors from the image (`--stain-vectors
/// macenko`). The result's `warnings` say how the input looks unlike the training data.
#[wasm_bindgen]
pub async fn segment_image(
    bytes: Vec<u8>,
    name: String,
    base: String,
    stretch: bool,
    channel: String,
    macenko: bool,
    on_progress: Option<js_sys::Function>,
) -> Result<SegResult, JsValue> {
    let seg = segmenter()?;
    let s = seg.model.cfg.image_size;
    let t0 = perf_now();
    let w = weights()?;
    let trained = TrainedOn::from_metadata(&w.metadata, "the weights").map_err(to_js)?;
    drop(w);
    let (ch, vectors) = resolve_channel(&channel, macenko, trained.as_ref()).map_err(to_js)?;
    let img = io::decode_rgb(&bytes, &name).map_err(to_js)?;
    let mpp = crate::stream::tiff_bytes_mpp(&bytes);
    drop(bytes);
    let (xf, note) = ChannelTransform::for_image(ch, vectors, &img);
    let transformed = (!xf.is_identity()).then(|| xf.apply(&img));
    let input = transformed.as_ref().unwrap_or(&img);
    let mut hist = GreyHistogram::default();
    hist.add(&input.data);
    let (w, h) = (img.width, img.height);
    let t1 = perf_now();
    let tiled = !stretch && (w > s || h > s);
    let (mask, coarse, threshold, tiles) = if tiled {
        let overlap = s / 8;
        let opts = TileOptions {
            overlap,
            global_otsu: false,
            batch: 1,
        };
        let plan = crate::tile::TilePlan::new(w, h, s, overlap).map_err(to_js)?;
        let mut mask = vec![0u8; w * h];
        let mut coarse = vec![0u8; w * h];
        let mut src = crate::stream::MemoryRows::new(input);
        let mut put_coarse = |ix: usize, iy: usize, c: &[f32]| {
            let (x0, y0) = (plan.xs[ix], plan.ys[iy]);
            let (xa, xb) = core_span(&plan.xs, ix, s.min(w), w);
            let (ya, yb) = core_span(&plan.ys, iy, s.min(h), h);
            for y in ya..yb {
                let src = &c[(y - y0) * s..];
                for (x, o) in coarse[y * w..(y + 1) * w]
                    .iter_mut()
                    .enumerate()
                    .take(xb)
                    .skip(xa)
                {
                    *o = if src[x - x0] > 0.5 { 255 } else { 0 };
                }
            }
        };
        let start = perf_now();
        let stats = seg
            .segment_tiled_rows_async(
                &mut src,
                &opts,
                None,
                |y, logits, _rgb| {
                    for (m, &l) in mask[y * w..(y + 1) * w].iter_mut().zip(logits) {
                        *m = if l > 0.0 { 255 } else { 0 };
                    }
                    Ok(())
                },
                |done, total| {
                    if let Some(f) = &on_progress {
                        let secs = ((perf_now() - start) / 1e3).max(1e-9);
                        let _ = f.call3(
                            &JsValue::NULL,
                            &JsValue::from(done as f64),
                            &JsValue::from(total as f64),
                            &JsValue::from(done as f64 / secs),
                        );
                    }
                },
                Some(&mut put_coarse),
            )
            .await
            .map_err(to_js)?;
        let gray = |data| GrayImage {
            width: w,
            height: h,
            data,
        };
        (gray(mask), gray(coarse), f32::NAN, stats.tiles)
    } else {
        let r = seg.segment_async(input).await.map_err(to_js)?;
        (r.mask, r.coarse, r.threshold, 0)
    };
    let t2 = perf_now();
    let mask_png = io::encode_png_gray(&mask).map_err(to_js)?;
    let t3 = perf_now();
    let (summary, objects_csv, objects_geojson) =
        objects(&mask, &img, &base, mpp).map_err(to_js)?;
    let t4 = perf_now();
    let fg = mask.data.iter().filter(|&&v| v > 127).count() as f64 / mask.data.len().max(1) as f64;
    let (fill_rgba, edge_rgba) = overlay_layers(&mask);
    let gpu_ms = t2 - t1;
    let mut warnings: Vec<InputWarning> = note
        .map(|m| InputWarning {
            code: "stain",
            message: m,
        })
        .into_iter()
        .collect();
    warnings.extend(input_warnings(&InputFacts {
        trained_on: trained.as_ref(),
        image_size: s,
        transform: &xf,
        histogram: &hist,
        foreground: fg,
    }));
    let input_rgba = transformed.as_ref().map(rgb_to_rgba).unwrap_or_default();
    Ok(SegResult {
        width: w,
        height: h,
        threshold,
        foreground: fg,
        decode_ms: t1 - t0,
        gpu_ms,
        encode_ms: t3 - t2,
        rgba: rgb_to_rgba(&img),
        coarse_rgba: gray_to_rgba(&coarse),
        fill_rgba,
        edge_rgba,
        mask_png,
        prompt_info: String::new(),
        mode: if tiled { "tiled" } else { "resized" },
        tiles,
        tiles_per_s: if tiles > 0 {
            tiles as f64 / (gpu_ms / 1e3).max(1e-9)
        } else {
            0.0
        },
        objects: json!({
            "count": summary.count,
            "mean_area": summary.mean_area,
            "coverage": summary.coverage,
            "object_pixels": summary.object_pixels,
            "text": summary.to_string(),
            "labelling_ms": t4 - t3,
            "mpp": mpp,
        })
        .to_string(),
        objects_csv,
        objects_geojson,
        warnings: serde_json::to_string(&warnings).unwrap_or_else(|_| "[]".into()),
        channel: xf.describe(),
        input_rgba,
    })
}

/// The channel and stain vectors of a `segment_image` call: those asked for, else those the
/// weights record.
pub(crate) fn resolve_channel(
    channel: &str,
    macenko: bool,
    trained: Option<&TrainedOn>,
) -> crate::Result<(Channel, StainVectors)> {
    let ch = match (channel.trim(), trained) {
        ("", Some(t)) => t.channel()?,
        (c, _) => Channel::parse(c)?,
    };
    let vectors = match (macenko, channel.trim(), trained) {
        (true, _, _) => StainVectors::Macenko,
        (false, "", Some(t)) => t.stain_vectors()?,
        _ => StainVectors::Standard,
    };
    Ok((ch, vectors))
}

/// Prompted models: decodes one image file and runs the image encoder once; the prompts that
/// follow ([`decode_prompt`]) reuse its embedding. Returns the image (RGBA) with empty masks.
#[wasm_bindgen]
pub async fn encode_image(bytes: Vec<u8>, name: String) -> Result<SegResult, JsValue> {
    let sam = STATE.with(|s| s.borrow().sam.clone()).ok_or_else(|| {
        js_error(
            "StateError",
            "no prompted model (MobileSAM / LiteMedSAM) is prepared",
        )
    })?;
    let t0 = perf_now();
    let img = io::decode_rgb(&bytes, &name).map_err(to_js)?;
    drop(bytes);
    let t1 = perf_now();
    let e = sam.encode_async(&img).await.map_err(to_js)?;
    // Wait for the encoder so its time is measured here, not in the first prompt.
    let _ = sam
        .gpu
        .read_async(&e.emb.reshape(&[e.emb.numel()]).narrow(0, 1))
        .await
        .map_err(to_js)?;
    let t2 = perf_now();
    let rgba = rgb_to_rgba(&img);
    let (w, h) = (img.width, img.height);
    STATE.with(|s| s.borrow_mut().encoded = Some(Rc::new((e, img))));
    Ok(SegResult {
        width: w,
        height: h,
        threshold: f32::NAN,
        foreground: 0.0,
        decode_ms: t1 - t0,
        gpu_ms: t2 - t1,
        encode_ms: 0.0,
        rgba,
        coarse_rgba: Vec::new(),
        fill_rgba: Vec::new(),
        edge_rgba: Vec::new(),
        mask_png: Vec::new(),
        prompt_info: String::new(),
        mode: "",
        tiles: 0,
        tiles_per_s: 0.0,
        objects: String::new(),
        objects_csv: Vec::new(),
        objects_geojson: Vec::new(),
        warnings: "[]".into(),
        channel: String::new(),
        input_rgba: Vec::new(),
    })
}

/// Prompted models: the mask of the prompts given as JSON `{"points": [[x, y, 1|0], ...],
/// "boxes": [[x0, y0, x1, y1], ...]}` in the encoded image's pixels. The points form one prompt
/// (with the first box); every other box is decoded alone; the masks are merged (union), as the
/// CLI's `segment --box ... --point ...` does, so the PNG equals the CLI's for the same prompts.
#[wasm_bindgen]
pub async fn decode_prompt(prompts: String) -> Result<SegResult, JsValue> {
    let sam = STATE.with(|s| s.borrow().sam.clone()).ok_or_else(|| {
        js_error(
            "StateError",
            "no prompted model (MobileSAM / LiteMedSAM) is prepared",
        )
    })?;
    let enc = STATE
        .with(|s| s.borrow().encoded.clone())
        .ok_or_else(|| js_error("StateError", "no image is encoded yet"))?;
    let (e, img) = (&enc.0, &enc.1);
    let v: Value = serde_json::from_str(&prompts)
        .map_err(|err| js_error("Error", format!("prompts: {err}")))?;
    let num = |x: &Value| x.as_f64().filter(|v| v.is_finite()).map(|v| v as f32);
    let mut points = Vec::new();
    for p in v["points"].as_array().into_iter().flatten() {
        match (num(&p[0]), num(&p[1])) {
            (Some(x), Some(y)) => points.push((x, y, p[2].as_i64() != Some(0))),
            _ => return Err(js_error("Error", "prompts: a point is [x, y, label]")),
        }
    }
    let mut boxes = Vec::new();
    for b in v["boxes"].as_array().into_iter().flatten() {
        let c: Vec<f32> = (0..4).filter_map(|i| num(&b[i])).collect();
        if c.len() != 4 {
            return Err(js_error("Error", "prompts: a box is [x0, y0, x1, y1]"));
        }
        boxes.push([
            c[0].min(c[2]),
            c[1].min(c[3]),
            c[0].max(c[2]),
            c[1].max(c[3]),
        ]);
    }
    let mut list: Vec<Prompt> = boxes
        .iter()
        .map(|b| Prompt {
            points: vec![],
            bbox: Some(*b),
        })
        .collect();
    if !points.is_empty() {
        match list.first_mut() {
            Some(f) => f.points = points,
            None => list.push(Prompt { points, bbox: None }),
        }
    }
    let t0 = perf_now();
    let (w, h) = (img.width, img.height);
    let mut union = vec![f32::NEG_INFINITY; w * h];
    let mut infos = Vec::new();
    let answers = sam
        .decode_many_async(e, &list, MaskChoice::Auto, false)
        .await
        .map_err(to_js)?;
    for m in answers {
        let m = m.map_err(|(_, e)| to_js(e))?;
        for (u, &l) in union.iter_mut().zip(&m.logits) {
            *u = u.max(l);
        }
        infos.push(json!({"iou": m.iou, "chosen": m.chosen}));
    }
    let t1 = perf_now();
    let mask = GrayImage {
        width: w,
        height: h,
        data: union
            .iter()
            .map(|&v| if v > 0.0 { 255 } else { 0 })
            .collect(),
    };
    let mask_png = io::encode_png_gray(&mask).map_err(to_js)?;
    let fg = mask.data.iter().filter(|&&v| v > 127).count() as f64 / mask.data.len().max(1) as f64;
    let (fill_rgba, edge_rgba) = overlay_layers(&mask);
    Ok(SegResult {
        width: w,
        height: h,
        threshold: f32::NAN,
        foreground: fg,
        decode_ms: 0.0,
        gpu_ms: t1 - t0,
        encode_ms: perf_now() - t1,
        rgba: Vec::new(),
        coarse_rgba: Vec::new(),
        fill_rgba,
        edge_rgba,
        mask_png,
        prompt_info: json!({ "prompts": infos }).to_string(),
        mode: "",
        tiles: 0,
        tiles_per_s: 0.0,
        objects: String::new(),
        objects_csv: Vec::new(),
        objects_geojson: Vec::new(),
        warnings: "[]".into(),
        channel: String::new(),
        input_rgba: Vec::new(),
    })
}

/// `max|a - b| / max|b|` (the fixtures' relative error).
fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    if got.len() != want.len() || got.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let den = want
        .iter()
        .fold(0.0f64, |m, &v| m.max((v as f64).abs()))
        .max(1e-30);
    let num = got
        .iter()
        .zip(want)
        .fold(0.0f64, |m, (&a, &b)| m.max((a as f64 - b as f64).abs()));
    num / den
}

/// Self-check against a parity fixture (`fixtures/tiny.forward.safetensors`: u8 `image`
/// [B,S,S,3] and per variant `logits`, `decoder.lowres_logits`, `otsu.threshold`, `otsu.mask`),
/// run with the current weights on this page's GPU device, both variants, end to end. Returns JSON
/// per variant: relative errors of the logits and low-resolution logits, the Otsu thresholds (got
/// and expected) and the number of coarse-prompt pixels that differ. Judging is left to the caller
/// (fixtures/README.md: logits ≤ 2e-3, thresholds exact, ≤ 0.1 % of coarse pixels).
#[wasm_bindgen]
pub async fn fixture_check(forward: Vec<u8>) -> Result<String, JsValue> {
    let gpu = gpu()?;
    let w = weights()?;
    let bad = |m: String| js_error("FixtureError", m);
    let st = safetensors::SafeTensors::deserialize(&forward)
        .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let f32s = |key: &str| -> Result<Vec<f32>, JsValue> {
        let t = st.tensor(key).map_err(|e| bad(format!("{key}: {e}")))?;
        if t.dtype() != safetensors::Dtype::F32 {
            return Err(bad(format!("{key}: expected f32, found {:?}", t.dtype())));
        }
        Ok(t.data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    };
    let image = st.tensor("image").map_err(|e| bad(format!("image: {e}")))?;
    let shape = image.shape().to_vec();
    if image.dtype() != safetensors::Dtype::U8
        || shape.len() != 4
        || shape[3] != 3
        || shape[1] != shape[2]
    {
        return Err(bad(format!(
            "image must be u8 [B,S,S,3], found {:?} {shape:?}",
            image.dtype()
        )));
    }
    let (b, s) = (shape[0], shape[1]);
    let packed: Vec<u32> = image
        .data()
        .chunks_exact(3)
        .map(|p| p[0] as u32 | (p[1] as u32) << 8 | (p[2] as u32) << 16)
        .collect();
    let cfg: Config = w
        .resolve_config(None, s)
        .and_then(|c| c.with_image_size(s))
        .map_err(to_js)?;
    let mut out = serde_json::Map::new();
    for v in [Variant::Paper, Variant::Released] {
        let p = v.name();
        let model = MedFastSam::new(gpu, &w, &cfg, v).map_err(to_js)?;
        let px = gpu.upload_u32(&packed, &[b, s, s]).map_err(to_js)?;
        let mut rec = gpu.new_recorder();
        let o = model.forward(&mut rec, &px, false).map_err(to_js)?;
        rec.submit().map_err(to_js)?;
        let logits = gpu.read_async(&o.logits).await.map_err(to_js)?;
        let lowres = gpu.read_async(&o.lowres_logits).await.map_err(to_js)?;
        let thr = gpu.read_async(&o.threshold).await.map_err(to_js)?;
        let coarse = gpu.read_async(&o.coarse).await.map_err(to_js)?;
        let want_thr = f32s(&format!("{p}.otsu.threshold"))?;
        let want_coarse = f32s(&format!("{p}.otsu.mask"))?;
        let coarse_diff = coarse
            .iter()
            .zip(&want_coarse)
            .filter(|(a, b)| (**a > 0.5) != (**b > 0.5))
            .count()
            + coarse.len().abs_diff(want_coarse.len());
        out.insert(
            p.to_string(),
            json!({
                "logits_rel_err": rel_err(&logits, &f32s(&format!("{p}.logits"))?),
                "lowres_logits_rel_err": rel_err(&lowres, &f32s(&format!("{p}.decoder.lowres_logits"))?),
                "threshold": thr,
                "threshold_expected": want_thr,
                "threshold_exact": thr == want_thr,
                "coarse_diff_pixels": coarse_diff,
                "coarse_pixels": want_coarse.len(),
            }),
        );
        drop(model);
        gpu.trim_pool();
    }
    out.insert("batch".into(), json!(b));
    out.insert("image_size".into(), json!(s));
    Ok(Value::Object(out).to_string())
}

/// The names of the checks [`selftest`] runs (JSON array, in running order), for the page's
/// progress ("check k of n — name") before the first one finishes.
#[wasm_bindgen]
pub fn selftest_names(full: bool) -> String {
    let opts = crate::selftest::Options {
        full,
        ..Default::default()
    };
    json!(crate::selftest::check_names(&opts)).to_string()
}

/// "Check this GPU": the selftest (`medfastsam selftest`'s checks, the library's own code) on this
/// page's WebGPU device. `full` adds the model-sized shapes. `on_check(json, index, total)` is
/// called after each check with its record (JSON, as in the report), its 0-based index and the
/// number of checks. Returns the report (JSON, schema `medfastsam-selftest/1`, as `--json`
/// writes). `adapter` names the adapter as the browser describes it (vendor, architecture,
/// description): WebGPU gives wgpu no adapter name, so the report's empty `adapter.name` (and
/// `driver`) take it. Uses only its own buffers: a loaded model stays as it was (pipelines the model already
/// compiled come from the cache, so a check reports compile time only for those it created).
/// `fixture`: the bytes of `selftest-tiny.safetensors` (the compact tiny-preset fixture that
/// `medfastsam selftest --write-fixture` writes) for the model checks; without it they are skipped.
#[wasm_bindgen]
pub async fn selftest(
    full: bool,
    adapter: String,
    driver: String,
    fixture: Option<Vec<u8>>,
    on_check: Option<js_sys::Function>,
) -> Result<String, JsValue> {
    use crate::selftest::{Options, check_names, report, run_checks_async};
    let gpu = gpu()?;
    let opts = Options {
        full,
        tiny_fixture: fixture.map(std::sync::Arc::new),
        ..Options::default()
    };
    let total = check_names(&opts).len();
    let mut k = 0usize;
    let checks = run_checks_async(gpu, &opts, |rec| {
        if let Some(f) = &on_check {
            let s = serde_json::to_string(rec).unwrap_or_default();
            let _ = f.call3(
                &JsValue::NULL,
                &JsValue::from(s),
                &JsValue::from(k as f64),
                &JsValue::from(total as f64),
            );
        }
        k += 1;
    })
    .await;
    gpu.trim_pool();
    let mut r = report(gpu, &opts, checks);
    if r.adapter.name.is_empty() {
        r.adapter.name = adapter;
    }
    if r.adapter.driver.is_empty() {
        r.adapter.driver = driver;
    }
    serde_json::to_string_pretty(&r).map_err(|e| js_error("Error", e))
}
