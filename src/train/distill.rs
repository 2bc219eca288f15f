//! Feature-level distillation (the Med-FastSAM paper's Eq. 1): the student's image encoder learns
//! to reproduce a teacher's image embeddings on unlabelled images,
//! `L = 1/N Σ ‖F_teacher(u) − F_LKA(u)‖²`, the mean over every element of the `[B, g, g, D]`
//! embedding (docs/distill.md).
//!
//! - The student is a Med-FastSAM model (its med branch runs in the forward, frozen) or a
//!   MobileSAM / LiteMedSAM-architecture model; it trains in [`TrainMode::Distill`]: every
//!   `image_encoder` tensor without `med` in its key (natural branch and neck), BatchNorm with batch
//!   statistics. Only the encoder is built on the [`ParamStore`]; the other tensors ride along
//!   unchanged and are written back with the student.
//! - The teacher is a weights file run by the engine (MobileSAM, LiteMedSAM or Med-FastSAM; eval
//!   mode, BatchNorm folded), or embeddings computed elsewhere ([`Teacher::from_dir`]).
//! - Each model sees every image stretched to its own square input (bilinear), normalised its own
//!   way (Med-FastSAM: the model's `image_normalize`; MobileSAM / LiteMedSAM: [`encoder_input`]),
//!   so that embedding cell (i, j) covers the same part of the image for both.
//! - Teacher embeddings are computed once per image and kept in host memory up to a budget.
//! - Everything random (the image order) is a function of the seed and the step, every reduction
//!   is deterministic, and checkpoints hold the weights, Adam's moments and the position, so a
//!   resumed run is bit-identical to an uninterrupted one.

use super::params::{ParamStore, TrainMode};
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Tensor};
use crate::io::RgbImage;
use crate::model::blocks::{Mode, Vb};
use crate::model::lka_encoder::LkaEncoder;
use crate::model::sam::{Sam, encoder_input};
use crate::model::weights::Weights;
use crate::model::{Config, MedFastSam, Variant};
use crate::ops::elementwise::image_normalize;
use crate::ops::loss::mse_loss;
use crate::ops::optim::AdamConfig;
use crate::rng::Rng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Training state of a distillation checkpoint (JSON).
pub const META_DISTILL_STATE: &str = "medfastsam.distill_state";
/// Written into the distilled weights: the teacher's file name (or embedding folder), ...
pub const META_DISTILL_TEACHER: &str = "medfastsam.distill_teacher";
/// ... the SHA-256 of the teacher's weights file (of the embedding files, in image order, for
/// `--teacher-embeddings`), ...
pub const META_DISTILL_TEACHER_SHA256: &str = "medfastsam.distill_teacher_sha256";
/// ... the optimiser steps taken, ...
pub const META_DISTILL_STEPS: &str = "medfastsam.distill_steps";
/// ... the loss of the last step, ...
pub const META_DISTILL_FINAL_LOSS: &str = "medfastsam.distill_final_loss";
/// ... and the number of images.
pub const META_DISTILL_IMAGES: &str = "medfastsam.distill_images";

/// The tensor name of a precomputed teacher embedding file.
pub const EMBEDDING_KEY: &str = "embedding";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DistillOptions {
    /// Optimiser steps in total.
    pub steps: u64,
    /// Images per step.
    pub batch: usize,
    pub lr: f32,
    pub seed: u64,
    /// Steps between checkpoints (0: only at the end, on a stop and on Ctrl-C).
    pub checkpoint_every: u64,
}

impl Default for DistillOptions {
    fn default() -> Self {
        DistillOptions {
            steps: 1000,
            batch: 4,
            lr: 1e-4,
            seed: 0,
            checkpoint_every: 100,
        }
    }
}

/// Where the teacher's embeddings come from (stored in checkpoints, so `--resume` needs nothing
/// else).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum TeacherSpec {
    /// A weights file run by the engine, and its SHA-256.
    Model { path: PathBuf, sha256: String },
    /// A folder of `<image stem>.safetensors` embedding files, and the SHA-256 of those files
    /// concatenated in image order.
    Embeddings { dir: PathBuf, sha256: String },
}

/// What a checkpoint stores besides the tensors.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DistillState {
    pub options: DistillOptions,
    /// Steps done.
    pub step: u64,
    /// Loss of the last step.
    pub last_loss: Option<f32>,
    pub teacher: TeacherSpec,
    /// The images, in the order the batches index.
    pub images: Vec<PathBuf>,
}

/// SHA-256 as lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// A file's stem (the embedding file of `a/b/img.png` is `<dir>/img.safetensors`).
pub fn image_stem(p: &Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The encoder input of images already at the model size S (stretched): `[B, S, S, 3]`.
/// Med-FastSAM normalises on the device (`image_normalize`, as its forward does); MobileSAM and
/// LiteMedSAM as [`encoder_input`].
fn model_input(
    rec: &mut crate::gpu::Recorder,
    cfg: &Config,
    images: &[RgbImage],
) -> Result<Tensor> {
    let s = cfg.image_size;
    for im in images {
        if im.width != s || im.height != s {
            return Err(Error::Invalid(format!(
                "distillation: an image is {}x{}, the model input is {s}x{s}",
                im.width, im.height
            )));
        }
    }
    if cfg.arch.is_med_fastsam() {
        let px: Vec<u32> = images.iter().flat_map(|e| e.packed()).collect();
        let px = rec.gpu.upload_u32(&px, &[images.len(), s, s])?;
        image_normalize(rec, &px)
    } else {
        let mut x = Vec::with_capacity(images.len() * s * s * 3);
        for im in images {
            x.extend(encoder_input(cfg, im)?);
        }
        rec.gpu.upload(&x, &[images.len(), s, s, 3])
    }
}

/// The student: parameters on the device and its image encoder built on them.
pub struct Distiller<'g> {
    pub gpu: &'g Gpu,
    pub ps: ParamStore,
    pub encoder: LkaEncoder,
    pub opts: DistillOptions,
    /// Steps done.
    pub step: u64,
    pub last_loss: Option<f32>,
}

impl<'g> Distiller<'g> {
    /// The student from its weights. `variant` is the Med-FastSAM forward (ignored for MobileSAM /
    /// LiteMedSAM, whose encoder has no med branch).
    pub fn new(
        gpu: &'g Gpu,
        weights: &Weights,
        cfg: &Config,
        variant: Variant,
        opts: DistillOptions,
    ) -> Result<Self> {
        if opts.batch == 0 {
            return Err(Error::Config("--batch must be at least 1".into()));
        }
        if !opts.lr.is_finite() || opts.lr <= 0.0 {
            return Err(Error::Config(format!(
                "--lr must be a positive number (got {})",
                opts.lr
            )));
        }
        // Refuse a step that cannot fit before any buffer is allocated (an over-estimate: the
        // guard counts the whole model's training step, distillation runs the encoder only).
        crate::model::memory::check_train(gpu, cfg, opts.batch)?;
        let ps = ParamStore::new(gpu, weights, cfg, variant, TrainMode::Distill)?;
        // As `Sam::build`: a SAM-architecture encoder is the released forward (no med branch).
        let enc_variant = if cfg.arch.is_med_fastsam() {
            variant
        } else {
            Variant::Released
        };
        let encoder = LkaEncoder::new(Vb::new(&ps).pp("image_encoder"), cfg, enc_variant)?;
        Ok(Distiller {
            gpu,
            ps,
            encoder,
            opts,
            step: 0,
            last_loss: None,
        })
    }

    pub fn cfg(&self) -> &Config {
        &self.ps.cfg
    }

    /// Embedding grid side and width `(g, D)`.
    pub fn geometry(&self) -> (usize, usize) {
        (self.ps.cfg.grid(), self.ps.cfg.transformer_dim)
    }

    /// The images of step `step` (0-based) out of `n`: positions `step·B .. (step+1)·B` of the
    /// stream made of one seeded permutation of the images per pass.
    pub fn batch_indices(&self, n: usize, step: u64) -> Vec<usize> {
        batch_indices(self.opts.seed, self.opts.batch, n, step)
    }

    /// The student's embeddings `[B, g, g, D]` (channels-last) of images at its size, in `mode`
    /// (train mode: BatchNorm with batch statistics, updating the running statistics).
    pub fn embed(&self, images: &[RgbImage], mode: Mode) -> Result<Vec<f32>> {
        let mut rec = self.gpu.new_recorder();
        let x = model_input(&mut rec, &self.ps.cfg, images)?;
        let (emb, _) = self.encoder.forward(&mut rec, &x, mode, None)?;
        rec.submit()?;
        self.gpu.read(&emb)
    }

    /// Records forward (train mode), loss against `teacher` (`[B, g, g, D]` channels-last) and
    /// backward into `rec`; returns the loss tensor `[1]`.
    fn record_step(
        &self,
        rec: &mut crate::gpu::Recorder,
        images: &[RgbImage],
        teacher: &[f32],
    ) -> Result<Tensor> {
        let (g, d) = self.geometry();
        let b = images.len();
        if teacher.len() != b * g * g * d {
            return Err(Error::Invalid(format!(
                "distillation: {} teacher values for {b} embeddings of {g}x{g}x{d}",
                teacher.len()
            )));
        }
        self.ps.zero_grads(rec);
        let x = model_input(rec, &self.ps.cfg, images)?;
        let (emb, saved) = self.encoder.forward(rec, &x, Mode::Train, None)?;
        let saved = saved.ok_or_else(|| {
            Error::Invalid("train-mode forward kept nothing for the backward".into())
        })?;
        let t = self.gpu.upload(teacher, &emb.shape)?;
        let (value, demb) = mse_loss(rec, &emb, &t, 1.0)?;
        self.encoder.backward(rec, saved, &demb)?;
        Ok(value)
    }

    /// Forward, loss and backward without an optimiser step: the gradients of the loss are left in
    /// `ps.grads` (for checks). Returns the loss.
    pub fn loss_and_grads(&mut self, images: &[RgbImage], teacher: &[f32]) -> Result<f32> {
        let mut rec = self.gpu.new_recorder();
        let v = self.record_step(&mut rec, images, teacher)?;
        rec.submit()?;
        self.ps.count_bn_batch();
        Ok(self.gpu.read(&v)?[0])
    }

    /// One optimiser step (forward, loss, backward, Adam). A loss that is not finite is an error
    /// naming the step (the weights are then no longer usable and nothing may be written from
    /// them).
    pub fn step(&mut self, images: &[RgbImage], teacher: &[f32]) -> Result<f32> {
        let mut rec = self.gpu.new_recorder();
        let v = self.record_step(&mut rec, images, teacher)?;
        let adam = AdamConfig {
            lr: self.opts.lr,
            ..AdamConfig::default()
        };
        self.ps.adam(&mut rec, &adam)?;
        rec.submit()?;
        self.ps.count_bn_batch();
        let loss = self.gpu.read(&v)?[0];
        if !loss.is_finite() {
            return Err(Error::Invalid(format!(
                "distillation diverged at step {}: the loss is {loss}, so the weights are no longer usable and \
                 none are written from this step on; lower the learning rate (now --lr {:e})",
                self.step + 1,
                self.opts.lr
            )));
        }
        self.step += 1;
        self.last_loss = Some(loss);
        Ok(loss)
    }

    /// The student's weights (every tensor of the file it came from), read back.
    pub fn weights(&self) -> Result<Weights> {
        self.ps.to_weights(self.gpu)
    }

    /// The weights, refused when any value is not finite (an error naming the tensor).
    pub fn finite_weights(&self) -> Result<Weights> {
        let w = self.weights()?;
        check_finite(&w, self.step, self.opts.lr)?;
        Ok(w)
    }

    /// A checkpoint in memory: weights, Adam moments (`adam.m.*`, `adam.v.*`) and the state,
    /// checked finite.
    pub fn checkpoint(&self, teacher: &TeacherSpec, images: &[PathBuf]) -> Result<Weights> {
        let mut w = self.weights()?;
        for (k, t) in self.ps.read_moments(self.gpu)? {
            w.tensors.insert(k, t);
        }
        check_finite(&w, self.step, self.opts.lr)?;
        let state = DistillState {
            options: self.opts.clone(),
            step: self.step,
            last_loss: self.last_loss,
            teacher: teacher.clone(),
            images: images.to_vec(),
        };
        w.metadata.insert(
            META_DISTILL_STATE.into(),
            serde_json::to_string(&state).expect("serialisable"),
        );
        Ok(w)
    }

    /// Writes a checkpoint atomically (temporary file, then rename).
    pub fn save_checkpoint(
        &self,
        path: &Path,
        teacher: &TeacherSpec,
        images: &[PathBuf],
    ) -> Result<()> {
        self.checkpoint(teacher, images)?
            .save(path, &self.ps.cfg, self.ps.variant, false)
    }

    /// The distilled weights with the distillation recorded in their metadata.
    pub fn final_weights(
        &self,
        teacher_name: &str,
        teacher_sha256: &str,
        n_images: usize,
    ) -> Result<Weights> {
        let mut w = self.finite_weights()?;
        w.metadata.remove(META_DISTILL_STATE);
        w.metadata
            .insert(META_DISTILL_TEACHER.into(), teacher_name.into());
        w.metadata
            .insert(META_DISTILL_TEACHER_SHA256.into(), teacher_sha256.into());
        w.metadata
            .insert(META_DISTILL_STEPS.into(), self.step.to_string());
        w.metadata.insert(
            META_DISTILL_FINAL_LOSS.into(),
            self.last_loss.map_or("none".into(), |l| format!("{l:e}")),
        );
        w.metadata
            .insert(META_DISTILL_IMAGES.into(), n_images.to_string());
        Ok(w)
    }

    /// Continues from a checkpoint written by [`Distiller::save_checkpoint`].
    pub fn resume(gpu: &'g Gpu, path: &Path) -> Result<(Self, DistillState)> {
        let ck = super::trainer::read_checkpoint::<DistillState>(
            path,
            META_DISTILL_STATE,
            "distillation",
        )?;
        let state = ck.state;
        let mut d = Distiller::new(gpu, &ck.weights, &ck.cfg, ck.variant, state.options.clone())?;
        d.ps.load_moments(gpu, &ck.moments)
            .map_err(|e| Error::weights(path, e.to_string()))?;
        d.ps.step = state.step;
        d.step = state.step;
        d.last_loss = state.last_loss;
        Ok((d, state))
    }
}

fn check_finite(w: &Weights, step: u64, lr: f32) -> Result<()> {
    if let Some((k, _)) = w
        .tensors
        .iter()
        .find(|(_, t)| t.data.iter().any(|v| !v.is_finite()))
    {
        return Err(Error::Invalid(format!(
            "distillation diverged by step {step}: tensor '{k}' holds NaN or infinite values, so nothing is \
             written from this state; lower the learning rate (now --lr {lr:e})"
        )));
    }
    Ok(())
}

/// See [`Distiller::batch_indices`].
pub fn batch_indices(seed: u64, batch: usize, n: usize, step: u64) -> Vec<usize> {
    if n == 0 {
        return Vec::new();
    }
    let mut order: Option<(u64, Vec<usize>)> = None;
    (0..batch as u64)
        .map(|j| {
            let pos = step * batch as u64 + j;
            let pass = pos / n as u64;
            if order.as_ref().is_none_or(|(p, _)| *p != pass) {
                let mut v: Vec<usize> = (0..n).collect();
                Rng::new(seed ^ (0xD157_0000_0000 + pass)).shuffle(&mut v);
                order = Some((pass, v));
            }
            order.as_ref().expect("set above").1[(pos % n as u64) as usize]
        })
        .collect()
}

/// A model run by the engine as the teacher (eval mode, BatchNorm folded).
enum TeacherModel {
    Sam(Box<Sam>),
    Med(Box<MedFastSam>),
}

/// The teacher's embeddings, channels-last `[g, g, D]` per image, cached in host memory while the
/// cache holds less than its budget.
pub struct Teacher {
    model: Option<TeacherModel>,
    cfg: Option<Config>,
    dir: Option<PathBuf>,
    grid: usize,
    dim: usize,
    cache: BTreeMap<usize, Vec<f32>>,
    budget: usize,
    used: usize,
    /// SHA-256 of the embedding files in image order (folder teachers).
    digest: Option<String>,
}

/// One embedding file: channels-last `[g, g, D]` values and (g, D). Accepted: a tensor named
/// `embedding` of shape `[g, g, D]` (channels-last), `[D, g, g]` or `[1, D, g, g]` (channels-first,
/// what SAM's image encoder returns), f32, f16 or bf16. With `dim` given, D must equal it.
pub fn read_embedding_file(path: &Path, dim: usize) -> Result<(Vec<f32>, usize)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_embedding(&bytes, path, dim)
}

/// [`read_embedding_file`] on the file's bytes.
pub fn parse_embedding(bytes: &[u8], path: &Path, dim: usize) -> Result<(Vec<f32>, usize)> {
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| Error::weights(path, format!("not a safetensors file: {e}")))?;
    let t = st.tensor(EMBEDDING_KEY).map_err(|_| {
        let names: Vec<String> = st.names().into_iter().take(5).map(String::from).collect();
        Error::weights(
            path,
            format!(
                "no tensor named '{EMBEDDING_KEY}' (the file holds {})",
                if names.is_empty() {
                    "no tensors".to_string()
                } else {
                    names.join(", ")
                }
            ),
        )
    })?;
    let shape = t.shape().to_vec();
    let vals: Vec<f32> = match t.dtype() {
        safetensors::Dtype::F32 | safetensors::Dtype::F16 | safetensors::Dtype::BF16 => {
            crate::model::weights::tensor_values(&t).unwrap_or_default()
        }
        other => {
            return Err(Error::weights(
                path,
                format!("'{EMBEDDING_KEY}' is {other:?}; expected F32, F16 or BF16"),
            ));
        }
    };
    let bad_shape = || {
        Error::weights(
            path,
            format!(
                "'{EMBEDDING_KEY}' has shape {shape:?}; expected [g, g, {dim}] (channels-last), [{dim}, g, g] or \
                 [1, {dim}, g, g] (channels-first)"
            ),
        )
    };
    let (lead1, dims) = match shape.as_slice() {
        [1, a, b, c] => (true, [*a, *b, *c]),
        [a, b, c] => (false, [*a, *b, *c]),
        _ => return Err(bad_shape()),
    };
    let [a, b, c] = dims;
    let channels_last = !lead1 && a == b && c == dim;
    let channels_first = a == dim && b == c;
    if channels_last {
        return Ok((vals, a));
    }
    if !channels_first {
        return Err(bad_shape());
    }
    let g = b;
    let mut out = vec![0f32; g * g * dim];
    for ch in 0..dim {
        for p in 0..g * g {
            out[p * dim + ch] = vals[ch * g * g + p];
        }
    }
    Ok((out, g))
}

impl Teacher {
    /// A weights file as the teacher: MobileSAM / LiteMedSAM (as `medfastsam import` writes them)
    /// or Med-FastSAM, at the configuration in its metadata (or inferred from its shapes).
    pub fn from_weights(gpu: &Gpu, weights: &Weights, budget: usize) -> Result<Teacher> {
        let cfg = weights.resolve_config(None, 1024)?;
        let model = if cfg.arch.is_med_fastsam() {
            let variant = weights.variant.unwrap_or_default();
            TeacherModel::Med(Box::new(MedFastSam::new(gpu, weights, &cfg, variant)?))
        } else {
            TeacherModel::Sam(Box::new(Sam::new(gpu, weights, &cfg)?))
        };
        Ok(Teacher {
            grid: cfg.grid(),
            dim: cfg.transformer_dim,
            model: Some(model),
            cfg: Some(cfg),
            dir: None,
            cache: BTreeMap::new(),
            budget,
            used: 0,
            digest: None,
        })
    }

    /// Precomputed embeddings: `<dir>/<image stem>.safetensors` for each image (see
    /// [`read_embedding_file`]). Every file is checked now (present, readable, one shape for all,
    /// width `dim`); the first problem is an error naming its file.
    pub fn from_dir(dir: &Path, images: &[PathBuf], dim: usize, budget: usize) -> Result<Teacher> {
        if !dir.is_dir() {
            return Err(Error::Invalid(format!(
                "{}: no such folder (--teacher-embeddings)",
                dir.display()
            )));
        }
        let mut t = Teacher {
            model: None,
            cfg: None,
            dir: Some(dir.to_path_buf()),
            grid: 0,
            dim,
            cache: BTreeMap::new(),
            budget,
            used: 0,
            digest: None,
        };
        let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
        let mut stems: BTreeMap<String, &PathBuf> = BTreeMap::new();
        for (i, im) in images.iter().enumerate() {
            let stem = image_stem(im);
            if let Some(other) = stems.insert(stem.clone(), im) {
                return Err(Error::Invalid(format!(
                    "{} and {} share the stem '{stem}', so they would share one teacher embedding file; rename one",
                    other.display(),
                    im.display()
                )));
            }
            let f = t.file_of(im);
            if !f.is_file() {
                return Err(Error::weights(
                    &f,
                    format!("no teacher embedding file for image {}", im.display()),
                ));
            }
            let bytes = std::fs::read(&f).map_err(|e| Error::io(&f, e))?;
            sha2::Digest::update(&mut hasher, &bytes);
            let (v, g) = parse_embedding(&bytes, &f, dim)?;
            if i == 0 {
                t.grid = g;
            } else if g != t.grid {
                return Err(Error::weights(
                    &f,
                    format!(
                        "embedding grid {g}x{g}, but {} has {}x{}",
                        t.file_of(&images[0]).display(),
                        t.grid,
                        t.grid
                    ),
                ));
            }
            t.keep(i, v);
        }
        t.digest = Some(
            sha2::Digest::finalize(hasher)
                .iter()
                .map(|x| format!("{x:02x}"))
                .collect(),
        );
        Ok(t)
    }

    /// SHA-256 of the embedding files, concatenated in image order (folder teachers).
    pub fn digest(&self) -> Option<&str> {
        self.digest.as_deref()
    }

    fn file_of(&self, image: &Path) -> PathBuf {
        self.dir
            .as_deref()
            .unwrap_or(Path::new("."))
            .join(format!("{}.safetensors", image_stem(image)))
    }

    fn keep(&mut self, i: usize, v: Vec<f32>) {
        let bytes = v.len() * 4;
        if self.used + bytes <= self.budget {
            self.used += bytes;
            self.cache.insert(i, v);
        }
    }

    /// `(g, D)` of the teacher's embedding.
    pub fn geometry(&self) -> (usize, usize) {
        (self.grid, self.dim)
    }

    /// The teacher's configuration when it is a model.
    pub fn config(&self) -> Option<&Config> {
        self.cfg.as_ref()
    }

    /// Whether every image's embedding is in memory.
    pub fn all_cached(&self, n: usize) -> bool {
        self.cache.len() == n
    }

    /// Bytes held by the cache.
    pub fn cached_bytes(&self) -> usize {
        self.used
    }

    /// Drops the model (frees its device memory) once every embedding is cached.
    pub fn release_model(&mut self, n: usize) {
        if self.all_cached(n) {
            self.model = None;
        }
    }

    /// The embedding of image `i` (file `path`), channels-last `[g, g, D]`: from the cache, else
    /// computed (model) or read (folder), and cached while the budget allows.
    pub fn embedding(&mut self, gpu: &Gpu, i: usize, path: &Path) -> Result<Vec<f32>> {
        if let Some(v) = self.cache.get(&i) {
            return Ok(v.clone());
        }
        let v = match (&self.model, &self.cfg) {
            (Some(m), Some(cfg)) => {
                let img = crate::io::load_rgb(path)?;
                let s = cfg.image_size;
                let im = img.resize(s, s);
                let mut rec = gpu.new_recorder();
                let x = model_input(&mut rec, cfg, std::slice::from_ref(&im))?;
                let emb = match m {
                    TeacherModel::Sam(sam) => sam.encode(&mut rec, &x)?,
                    TeacherModel::Med(med) => med.lka_encode(&mut rec, &x, None)?,
                };
                rec.submit()?;
                let v = gpu.read(&emb)?;
                if let Some(bad) = v.iter().find(|x| !x.is_finite()) {
                    return Err(Error::image(
                        path,
                        format!("the teacher's embedding is not finite (e.g. {bad})"),
                    ));
                }
                v
            }
            _ => {
                let f = self.file_of(path);
                let (v, g) = read_embedding_file(&f, self.dim)?;
                if g != self.grid {
                    return Err(Error::weights(
                        &f,
                        format!(
                            "embedding grid {g}x{g}, expected {}x{}",
                            self.grid, self.grid
                        ),
                    ));
                }
                v
            }
        };
        self.keep(i, v.clone());
        Ok(v)
    }
}

/// The error when teacher and student embeddings differ in grid or width.
pub fn check_geometry(
    teacher: (usize, usize),
    teacher_name: &str,
    student: (usize, usize),
    student_name: &str,
) -> Result<()> {
    if teacher != student {
        return Err(Error::Config(format!(
            "the teacher ({teacher_name}) gives {}x{}x{} embeddings but the student ({student_name}) {}x{}x{}: \
             they must have the same grid and width (choose the student's input size with --size: grid = size / 16, \
             or size / 4 with a stride-1 patch embedding)",
            teacher.0, teacher.0, teacher.1, student.0, student.0, student.1
        )));
    }
    Ok(())
}
