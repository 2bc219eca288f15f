//! Fine-tuning in the page (wasm32 + the `web` feature): the worker's training ops on the weights
//! that [`crate::web`] loaded, with the library's own [`Trainer`] (the same kernels, batch order and
//! Adam as `medfastsam train`) and the same gradients as `medfastsam gradients`. This file only
//! moves bytes and JSON between JavaScript and the library.
//!
//! State: the examples (decoded images and 0/1 masks at their own size, some held out) and at most
//! one trainer. An async op takes the trainer out of the state while it runs and puts it back
//! after, so a second op arriving meanwhile is refused ("busy"), never a double borrow.

use crate::channel::{Channel, ChannelTransform};
use crate::gpu::Gpu;
use crate::io::{self, GrayImage, RgbImage};
use crate::model::memory;
use crate::model::{Config, Variant, Weights};
use crate::train::gradients::{gradients_async, mask_for};
use crate::train::params::TrainMode;
use crate::train::trainer::{Example, MemorySource, TrainOptions, Trainer, evaluate_each_async};
use crate::trained_on::{Polarity, PolarityStats, TrainedOn};
use crate::web::{gpu, js_error, to_js, weights};
use serde_json::{Value, json};
use std::borrow::Cow;
use std::cell::RefCell;
use std::rc::Rc;
use wasm_bindgen::prelude::*;

#[wasm_bindgen]
extern "C" {
    #[wasm_bindgen(js_namespace = performance, js_name = now)]
    fn perf_now() -> f64;
}

/// Metadata key of the fine-tuning record in weights written by [`train_weights`].
pub const META_FINE_TUNING: &str = "medfastsam.fine_tuning";

/// Epochs a page run may go through (it stops when the user pauses, not at an epoch count).
const PAGE_EPOCHS: usize = 1_000_000;

struct Stored {
    name: String,
    image: RgbImage,
    /// 0/1 at the image's size.
    mask: Vec<u8>,
    held_out: bool,
}

#[derive(Default)]
struct TrainState {
    examples: Vec<Stored>,
    /// The training and held-out examples at a model size (and channel), built when first needed.
    sources: Option<(usize, Channel, Rc<MemorySource>, Rc<MemorySource>)>,
    trainer: Option<Trainer<'static>>,
    /// True while an op has the trainer out of the state.
    busy: bool,
}

thread_local! {
    static TRAIN: RefCell<TrainState> = RefCell::new(TrainState::default());
}

fn state_error(msg: impl std::fmt::Display) -> JsValue {
    js_error("StateError", msg)
}

/// The configuration to train at: `config` (JSON of a configuration, as `--config` gives the CLI)
/// else the loaded weights' (their metadata, or inferred from the shapes), at `size` when nonzero.
fn train_config(w: &Weights, config: Option<&Value>, size: usize) -> Result<Config, JsValue> {
    let explicit = match config {
        Some(v) if !v.is_null() => Some(Config::from_json(&v.to_string()).map_err(to_js)?),
        _ => None,
    };
    let mut cfg = w.resolve_config(explicit.as_ref(), 1024).map_err(to_js)?;
    if !cfg.arch.is_med_fastsam() {
        return Err(js_error(
            "ConfigError",
            "these weights are a prompted model (MobileSAM / LiteMedSAM): only Med-FastSAM weights can be fine-tuned here",
        ));
    }
    if size != 0 {
        cfg = cfg.with_image_size(size).map_err(to_js)?;
    }
    Ok(cfg)
}

fn mib(b: u64) -> String {
    format!("{:.0} MiB", b as f64 / 1048576.0)
}

/// The memory rule: a step's estimate ([`memory::train_step`]) must fit `budget` bytes (device and
/// host together, what a browser on a software or integrated GPU shares) when one is given; the
/// per-binding and per-buffer limits are checked by each dispatch as it is recorded.
fn memory_json(cfg: &Config, mode: &str, batch: usize, budget: Option<f64>) -> Value {
    let est = memory::train_step(cfg, batch);
    let bytes = est.device + est.host;
    let limit = budget
        .filter(|b| b.is_finite() && *b >= 1.0)
        .map(|b| b as u64);
    let fits = limit.is_none_or(|l| bytes <= l);
    let s = cfg.image_size;
    let detail = match limit {
        Some(l) if fits => format!(
            "a training step at {s}x{s}, batch {batch} ({mode} mode) needs about {} ({} device + {} host); the budget is {}",
            mib(bytes),
            mib(est.device),
            mib(est.host),
            mib(l)
        ),
        Some(l) => format!(
            "not enough memory: a training step at {s}x{s}, batch {batch} ({mode} mode) needs about {} ({} device + {} host) \
             but the budget is {}; use a smaller batch or input size",
            mib(bytes),
            mib(est.device),
            mib(est.host),
            mib(l)
        ),
        None => format!(
            "a training step at {s}x{s}, batch {batch} ({mode} mode) needs about {} ({} device + {} host); no memory budget \
             is known here, so only the device's buffer limits are checked (by each step)",
            mib(bytes),
            mib(est.device),
            mib(est.host)
        ),
    };
    json!({
        "bytes": bytes,
        "device_bytes": est.device,
        "host_bytes": est.host,
        "limit_bytes": limit,
        "fits": fits,
        "detail": detail,
        "image_size": s,
        "batch": batch,
        "mode": mode,
    })
}

/// The memory estimate of one training step of the loaded model with `batch` images, against
/// `budget_bytes` (the worker passes what it knows of the machine's memory; none: only the
/// device's buffer limits apply). `options_json` may give `config` and `size` as for
/// [`train_start`]. Returns JSON `{bytes, device_bytes, host_bytes, limit_bytes, fits, detail,
/// image_size, batch, mode}`.
#[wasm_bindgen]
pub fn train_memory(
    mode: &str,
    batch: usize,
    budget_bytes: Option<f64>,
    options_json: Option<String>,
) -> Result<String, JsValue> {
    TrainMode::parse(mode).map_err(to_js)?;
    let w = weights()?;
    let o = parse_options(options_json.as_deref().unwrap_or("{}"))?;
    let cfg = train_config(&w, o.get("config"), uint(&o, "size", 0)?)?;
    Ok(memory_json(&cfg, mode, batch, budget_bytes).to_string())
}

fn parse_options(text: &str) -> Result<Value, JsValue> {
    let v: Value = serde_json::from_str(text)
        .map_err(|e| js_error("ConfigError", format!("training options: {e}")))?;
    if !v.is_object() {
        return Err(js_error(
            "ConfigError",
            "training options must be a JSON object",
        ));
    }
    Ok(v)
}

fn uint(o: &Value, key: &str, default: usize) -> Result<usize, JsValue> {
    match &o[key] {
        Value::Null => Ok(default),
        v => v.as_u64().map(|x| x as usize).ok_or_else(|| {
            js_error(
                "ConfigError",
                format!("training options: {key} must be a whole number, not {v}"),
            )
        }),
    }
}

fn float(o: &Value, key: &str, default: f32) -> Result<f32, JsValue> {
    match &o[key] {
        Value::Null => Ok(default),
        v => v
            .as_f64()
            .filter(|x| x.is_finite() && *x >= 0.0)
            .map(|x| x as f32)
            .ok_or_else(|| {
                js_error(
                    "ConfigError",
                    format!("training options: {key} must be a number >= 0, not {v}"),
                )
            }),
    }
}

/// Starts a run from the loaded weights, or resumes one from `checkpoint` (the bytes
/// [`train_checkpoint`] gave: weights, Adam moments, options and position; the options then come
/// from it, except `lr` when given). Options (JSON): `mode` (`semi`|`full`, default `semi`),
/// `batch` (1–4, default 2), `accum` (default 1), `lr` (default 5e-4), `seed` (default 0),
/// `weight_decay` (default 0), `augment` (default false), `variant`, `config` (a configuration
/// object, as the CLI's `--config`), `size`, `budget_bytes` (see [`train_memory`]). Refused with
/// a message when no Med-FastSAM weights are loaded, the batch is out of range, full mode has a
/// batch below 2, or the memory estimate does not fit. Returns JSON of the run's options, position,
/// configuration and parameter counts.
#[wasm_bindgen]
pub fn train_start(options_json: &str, checkpoint: Option<Vec<u8>>) -> Result<String, JsValue> {
    let gpu: &'static Gpu = gpu()?;
    if TRAIN.with(|t| t.borrow().busy) {
        return Err(state_error(
            "a training op is running; wait for it or pause first",
        ));
    }
    let o = parse_options(options_json)?;
    let budget = o["budget_bytes"].as_f64();
    let t = if let Some(bytes) = checkpoint {
        let mut t =
            Trainer::resume_from_bytes(gpu, &bytes, "the saved training state").map_err(to_js)?;
        if !o["lr"].is_null() {
            t.opts.lr = float(&o, "lr", t.opts.lr)?;
        }
        let m = memory_json(&t.ps.cfg, t.opts.mode.name(), t.opts.batch, budget);
        if m["fits"] != json!(true) {
            return Err(js_error(
                "LimitError",
                m["detail"].as_str().unwrap_or_default(),
            ));
        }
        t
    } else {
        let w = weights()?;
        let mode = TrainMode::parse(o["mode"].as_str().unwrap_or("semi")).map_err(to_js)?;
        let batch = uint(&o, "batch", 2)?;
        if !(1..=4).contains(&batch) {
            return Err(js_error(
                "ConfigError",
                format!(
                    "batch {batch} is out of range: the page trains with batches of 1 to 4 images"
                ),
            ));
        }
        let accum = uint(&o, "accum", 1)?;
        if accum == 0 {
            return Err(js_error(
                "ConfigError",
                "accumulation steps must be at least 1",
            ));
        }
        let cfg = train_config(&w, o.get("config"), uint(&o, "size", 0)?)?;
        let variant = match o["variant"].as_str() {
            Some(v) if !v.is_empty() => Variant::parse(v).map_err(to_js)?,
            _ => w.variant.unwrap_or_default(),
        };
        let m = memory_json(&cfg, mode.name(), batch, budget);
        if m["fits"] != json!(true) {
            return Err(js_error(
                "LimitError",
                m["detail"].as_str().unwrap_or_default(),
            ));
        }
        let seed = match &o["seed"] {
            Value::Null => 0,
            v => v.as_u64().ok_or_else(|| {
                js_error(
                    "ConfigError",
                    "training options: seed must be a whole number",
                )
            })?,
        };
        let opts = TrainOptions {
            epochs: PAGE_EPOCHS,
            batch,
            accum,
            lr: float(&o, "lr", 5e-4)?,
            weight_decay: float(&o, "weight_decay", 0.0)?,
            mode,
            augment: o["augment"].as_bool().unwrap_or(false),
            seed,
            checkpoint_every: 0,
        };
        Trainer::new(gpu, &w, &cfg, variant, opts).map_err(to_js)?
    };
    gpu.take_errors().map_err(to_js)?;
    let info = run_info(&t);
    TRAIN.with(|s| {
        let mut s = s.borrow_mut();
        s.trainer = Some(t);
        s.sources = None;
    });
    Ok(info.to_string())
}

fn run_info(t: &Trainer) -> Value {
    let (tuned, total) = t.ps.counts();
    json!({
        "mode": t.opts.mode.name(),
        "batch": t.opts.batch,
        "accum": t.opts.accum,
        "lr": t.opts.lr,
        "weight_decay": t.opts.weight_decay,
        "seed": t.opts.seed,
        "augment": t.opts.augment,
        "step": t.progress.step,
        "epoch": t.progress.epoch,
        "step_in_epoch": t.progress.step_in_epoch,
        "image_size": t.ps.cfg.image_size,
        "variant": t.ps.variant.name(),
        "tuned_parameters": tuned,
        "parameters": total,
    })
}

/// Ends the run (its state is lost unless [`train_checkpoint`] saved it); the examples stay.
#[wasm_bindgen]
pub fn train_stop() -> Result<String, JsValue> {
    let had = TRAIN.with(|s| {
        let mut s = s.borrow_mut();
        if s.busy {
            return Err(state_error("a training op is running; stop after it"));
        }
        s.sources = None;
        Ok(s.trainer.take().is_some())
    })?;
    if let Ok(g) = gpu() {
        g.trim_pool();
    }
    Ok(json!({ "stopped": had }).to_string())
}

/// Removes every example.
#[wasm_bindgen]
pub fn train_clear_examples() {
    TRAIN.with(|s| {
        let mut s = s.borrow_mut();
        s.examples.clear();
        s.sources = None;
    });
}

fn counts(s: &TrainState) -> Value {
    let held = s.examples.iter().filter(|e| e.held_out).count();
    json!({ "train": s.examples.len() - held, "held_out": held })
}

/// Adds one example: `image` is an image file (PNG, JPEG, TIFF, ..., decoded as segmentation
/// decodes it); `mask` is either a mask file (foreground > 127) or, with `mask_width` ×
/// `mask_height` equal to its length, raw 8-bit values (0 / 255) row by row. A mask whose size
/// is not its image's is refused, naming both sizes. `held_out` examples are only scored
/// ([`train_eval`]), never trained on. Returns JSON `{train, held_out}` counts.
#[wasm_bindgen]
pub fn train_add_example(
    name: &str,
    image: &[u8],
    mask: &[u8],
    mask_width: usize,
    mask_height: usize,
    held_out: bool,
) -> Result<String, JsValue> {
    let img = io::decode_rgb(image, name).map_err(to_js)?;
    let mask_name = format!("the mask of {name}");
    let raw = mask_width > 0
        && mask_height > 0
        && mask_width.checked_mul(mask_height) == Some(mask.len());
    let m = if raw {
        GrayImage {
            width: mask_width,
            height: mask_height,
            data: mask.to_vec(),
        }
    } else {
        io::decode_gray(mask, &mask_name).map_err(to_js)?
    };
    let bin = mask_for(&img, name, &m, &mask_name).map_err(|e| js_error("ImageError", e))?;
    TRAIN.with(|s| {
        let mut s = s.borrow_mut();
        s.examples.push(Stored {
            name: name.to_string(),
            image: img,
            mask: bin,
            held_out,
        });
        s.sources = None;
        Ok(counts(&s).to_string())
    })
}

/// The training and held-out examples at size `s` through `channel`, built once per change.
fn sources(
    s: usize,
    channel: Channel,
    vectors: crate::channel::StainVectors,
) -> (Rc<MemorySource>, Rc<MemorySource>) {
    TRAIN.with(|st| {
        let mut st = st.borrow_mut();
        if let Some((size, ch, a, b)) = &st.sources
            && *size == s
            && *ch == channel
        {
            return (a.clone(), b.clone());
        }
        let (mut train, mut held) = (Vec::new(), Vec::new());
        for e in &st.examples {
            let image = if channel == Channel::Rgb {
                Cow::Borrowed(&e.image)
            } else {
                Cow::Owned(
                    ChannelTransform::for_image(channel, vectors, &e.image)
                        .0
                        .apply(&e.image),
                )
            };
            let ex = Example::at_size(e.name.clone(), &image, &e.mask, s);
            if e.held_out {
                held.push(ex);
            } else {
                train.push(ex);
            }
        }
        let (a, b) = (Rc::new(MemorySource(train)), Rc::new(MemorySource(held)));
        st.sources = Some((s, channel, a.clone(), b.clone()));
        (a, b)
    })
}

/// The channel transform the trainer's weights record (rgb when none), as `medfastsam train`
/// applies it to every image.
fn channel_of(t: &Trainer) -> Result<(Channel, crate::channel::StainVectors), JsValue> {
    match TrainedOn::from_metadata(&t.ps.metadata, "the weights").map_err(to_js)? {
        Some(r) => Ok((
            r.channel().map_err(to_js)?,
            r.stain_vectors().map_err(to_js)?,
        )),
        None => Ok((Channel::Rgb, crate::channel::StainVectors::Standard)),
    }
}

/// Takes the trainer out of the state for an async op (refused when there is none or another op
/// has it).
fn take_trainer() -> Result<Trainer<'static>, JsValue> {
    TRAIN.with(|s| {
        let mut s = s.borrow_mut();
        if s.busy {
            return Err(state_error("another training op is running"));
        }
        let t = s
            .trainer
            .take()
            .ok_or_else(|| state_error("no training run: start one first (trainStart)"))?;
        s.busy = true;
        Ok(t)
    })
}

fn put_back(t: Trainer<'static>) {
    TRAIN.with(|s| {
        let mut s = s.borrow_mut();
        s.trainer = Some(t);
        s.busy = false;
    });
}

/// One optimiser step on the next batch of the run's order (the order `medfastsam train` draws
/// with the same seed and examples: [`Trainer::batch_examples`] over the training examples, an
/// epoch being every whole batch of them). Returns JSON `{step, epoch, step_in_epoch,
/// steps_per_epoch, loss, focal, dice, ms}` (`dice` is the Dice loss term).
#[wasm_bindgen]
pub async fn train_step() -> Result<String, JsValue> {
    let mut t = take_trainer()?;
    let r = step_inner(&mut t).await;
    put_back(t);
    r
}

async fn step_inner(t: &mut Trainer<'static>) -> Result<String, JsValue> {
    let t0 = perf_now();
    let (channel, vectors) = channel_of(t)?;
    let (train, _) = sources(t.ps.cfg.image_size, channel, vectors);
    let n = train.0.len();
    if n == 0 {
        return Err(js_error(
            "ConfigError",
            "no training examples: add at least one annotated image that is not held out",
        ));
    }
    let spe = t.steps_per_epoch(n);
    if spe == 0 {
        return Err(js_error(
            "ConfigError",
            format!(
                "{n} training example(s) are fewer than one optimiser step needs ({} x {}): add examples or lower the batch",
                t.opts.batch, t.opts.accum
            ),
        ));
    }
    // Examples added or removed since the last step can leave the position past the epoch's end.
    if t.progress.step_in_epoch >= spe {
        t.progress.epoch += 1;
        t.progress.step_in_epoch = 0;
    }
    let epoch = t.progress.epoch;
    let k = t.progress.step_in_epoch;
    let micro = t.batch_examples(train.as_ref(), epoch, k).map_err(to_js)?;
    let l = t.step_async(&micro).await.map_err(to_js)?;
    let out = json!({
        "step": t.progress.step,
        "epoch": epoch,
        "step_in_epoch": k,
        "steps_per_epoch": spe,
        "loss": l[0],
        "focal": l[1],
        "dice": l[2],
        "ms": perf_now() - t0,
    });
    if t.progress.step_in_epoch >= spe {
        t.progress.epoch += 1;
        t.progress.step_in_epoch = 0;
    }
    Ok(out.to_string())
}

/// Scores the current weights on the held-out examples (the prediction logit > 0 at the model
/// size against the mask resized to it, as `medfastsam train` validates): returns an object
/// `{count, dice, iou, per_example: [{name, dice, iou}], width, height, rgba}` where `dice` and
/// `iou` are means over the held-out examples and `rgba` (Uint8Array, `width × height × 4`) is
/// the first held-out example's predicted mask (foreground opaque white, background
/// transparent); `rgba` is empty when nothing is held out.
#[wasm_bindgen]
pub async fn train_eval() -> Result<JsValue, JsValue> {
    let t = take_trainer()?;
    let r = eval_inner(&t).await;
    put_back(t);
    r
}

async fn eval_inner(t: &Trainer<'static>) -> Result<JsValue, JsValue> {
    let (channel, vectors) = channel_of(t)?;
    let s = t.ps.cfg.image_size;
    let (_, held) = sources(s, channel, vectors);
    let ev = evaluate_each_async(t.gpu, &t.model, &*held, false, |_, _| {}).await;
    if let Some(u) = ev.unscored.into_iter().next() {
        return Err(if u.non_finite {
            js_error(
                "Error",
                format!(
                    "{}: the model's logits are not finite: training has diverged; lower the learning rate",
                    u.id
                ),
            )
        } else {
            to_js(u.error)
        });
    }
    if let Some(e) = ev.stopped {
        return Err(to_js(e));
    }
    let (mut dice, mut iou) = (0.0, 0.0);
    let mut per = Vec::new();
    for e in &ev.scored {
        dice += e.scores.dice;
        iou += e.scores.iou;
        per.push(json!({ "name": e.id, "dice": e.scores.dice, "iou": e.scores.iou }));
    }
    let first: Option<Vec<u8>> = ev.scored.first().map(|e| {
        e.pred
            .iter()
            .flat_map(|&v| if v != 0 { [255u8; 4] } else { [0u8; 4] })
            .collect()
    });
    let n = held.0.len();
    let info = json!({
        "count": n,
        "dice": if n > 0 { json!(dice / n as f64) } else { Value::Null },
        "iou": if n > 0 { json!(iou / n as f64) } else { Value::Null },
        "per_example": per,
        "width": s,
        "height": s,
        "step": t.progress.step,
    });
    let obj: JsValue = js_sys::JSON::parse(&info.to_string())?;
    let rgba = js_sys::Uint8Array::from(first.unwrap_or_default().as_slice());
    js_sys::Reflect::set(&obj, &JsValue::from_str("rgba"), &rgba)?;
    Ok(obj)
}

/// The run's state as a safetensors file (weights, Adam moments, options and position; the
/// format `medfastsam train` writes as checkpoint.safetensors) for the page to persist and pass
/// back to [`train_start`]. Refused when any value is not finite.
#[wasm_bindgen]
pub async fn train_checkpoint() -> Result<Vec<u8>, JsValue> {
    let t = take_trainer()?;
    let r = async { t.checkpoint_async().await?.to_bytes() }.await;
    put_back(t);
    r.map_err(to_js)
}

/// The fine-tuned weights as a safetensors file the CLI loads (the format and metadata
/// `medfastsam train` writes as final.safetensors), with the fine-tuning recorded in the metadata
/// (`medfastsam.fine_tuning`: mode, steps, lr, seed, batch, examples, "trained in the browser";
/// and the trained-on record). Refused when any value is not finite.
#[wasm_bindgen]
pub async fn train_weights() -> Result<Vec<u8>, JsValue> {
    let t = take_trainer()?;
    let r = weights_inner(&t).await;
    put_back(t);
    r
}

async fn weights_inner(t: &Trainer<'static>) -> Result<Vec<u8>, JsValue> {
    let mut w = t.finite_weights_async().await.map_err(to_js)?;
    let (n_train, n_held, stats) = TRAIN.with(|s| {
        let s = s.borrow();
        let mut stats = PolarityStats::default();
        for e in s.examples.iter().filter(|e| !e.held_out).take(32) {
            stats.add(&e.image.data, &e.mask);
        }
        let held = s.examples.iter().filter(|e| e.held_out).count();
        (s.examples.len() - held, held, stats)
    });
    let record = json!({
        "trained_in": "the browser (medfastsam page, WebGPU)",
        "mode": t.opts.mode.name(),
        "steps": t.progress.step,
        "epochs_done": t.progress.epoch,
        "lr": t.opts.lr,
        "weight_decay": t.opts.weight_decay,
        "seed": t.opts.seed,
        "batch": t.opts.batch,
        "accum": t.opts.accum,
        "augment": t.opts.augment,
        "examples": n_train,
        "held_out": n_held,
    });
    w.metadata
        .insert(META_FINE_TUNING.into(), record.to_string());
    let before = TrainedOn::from_metadata(&t.ps.metadata, "the initial weights").map_err(to_js)?;
    let (channel, vectors) = channel_of(t)?;
    let rec = TrainedOn {
        modality: before.as_ref().and_then(|b| b.modality.clone()),
        polarity: Polarity::measure(&stats),
        input_size: Some(t.ps.cfg.image_size),
        channel: Some(channel.name().into()),
        stain_vectors: channel.is_stain().then(|| vectors.name().to_string()),
        dataset: Some(format!("{n_train} image(s) annotated in the browser")),
        note: Some(match &before {
            Some(b) => format!(
                "fine-tuned in the browser ({} mode, {} steps); from weights trained on: {}",
                t.opts.mode.name(),
                t.progress.step,
                b.summary()
            ),
            None => format!(
                "fine-tuned in the browser ({} mode, {} steps)",
                t.opts.mode.name(),
                t.progress.step
            ),
        }),
    };
    rec.write(&mut w.metadata);
    w.to_bytes(&t.ps.cfg, t.ps.variant, false).map_err(to_js)
}

fn bytes_list(a: &js_sys::Array, what: &str) -> Result<Vec<Vec<u8>>, JsValue> {
    a.iter()
        .enumerate()
        .map(|(i, v)| {
            v.dyn_into::<js_sys::Uint8Array>()
                .map(|u| u.to_vec())
                .map_err(|_| js_error("Error", format!("{what} {i} is not a Uint8Array")))
        })
        .collect()
}

/// One forward + backward in train mode on a batch, from the loaded weights: what
/// `medfastsam gradients` computes and writes (the same library function), as a safetensors file
/// with the same keys: `grad.<key>` per trainable parameter, `loss`, `loss.focal`, `loss.dice`,
/// `logits`. `images` and `masks` are arrays of file bytes (Uint8Array), one mask per image;
/// `mode` is `full` or `semi`; `options_json` may give `config`, `size` and `variant` as for
/// [`train_start`]. Independent of any training run.
#[wasm_bindgen]
pub async fn gradients(
    images: js_sys::Array,
    masks: js_sys::Array,
    mode: String,
    options_json: Option<String>,
) -> Result<Vec<u8>, JsValue> {
    let gpu = gpu()?;
    let w = weights()?;
    let o = parse_options(options_json.as_deref().unwrap_or("{}"))?;
    let cfg = train_config(&w, o.get("config"), uint(&o, "size", 0)?)?;
    let variant = match o["variant"].as_str() {
        Some(v) if !v.is_empty() => Variant::parse(v).map_err(to_js)?,
        _ => w.variant.unwrap_or_default(),
    };
    let mode = TrainMode::parse(&mode).map_err(to_js)?;
    let imgs = bytes_list(&images, "image")?;
    let msks = bytes_list(&masks, "mask")?;
    if imgs.len() != msks.len() {
        return Err(js_error(
            "Error",
            format!(
                "{} images but {} masks: give one mask per image",
                imgs.len(),
                msks.len()
            ),
        ));
    }
    let s = cfg.image_size;
    let mut examples = Vec::new();
    for (i, (ib, mb)) in imgs.iter().zip(&msks).enumerate() {
        let name = format!("image {i}");
        let img = io::decode_rgb(ib, &name).map_err(to_js)?;
        let mname = format!("mask {i}");
        let m = io::decode_gray(mb, &mname).map_err(to_js)?;
        examples.push(
            Example::from_pair(&img, &name, &m, &mname, s)
                .map_err(|e| js_error("ImageError", e))?,
        );
    }
    let g = gradients_async(gpu, &w, &cfg, variant, mode, &examples)
        .await
        .map_err(to_js)?;
    gpu.trim_pool();
    g.into_weights("gradients")
        .to_bytes(&cfg, variant, false)
        .map_err(to_js)
}
