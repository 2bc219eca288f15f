//! The training loop's parts: examples at model size, augmentation, one optimiser step (forward,
//! loss, backward, Adam; gradient accumulation), evaluation under the paper protocol, and
//! checkpoints (weights + optimiser state + position + seed) that make a resumed run identical to an
//! uninterrupted one. All randomness is a pure function of (seed, epoch, position), so nothing but
//! the position has to be stored to resume.

use super::metrics;
use super::metrics::Scores;
use super::params::{ParamStore, TrainMode};
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Recorder, Tensor};
use crate::io::RgbImage;
use crate::model::weights::HostTensor;
use crate::model::{Config, MedFastSam, Output, Variant, Weights};
use crate::ops::loss::{LossConfig, seg_loss};
use crate::ops::optim::AdamConfig;
use crate::rng::Rng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One image and its binary mask at the model size S×S.
#[derive(Clone, Debug)]
pub struct Example {
    pub id: String,
    pub image: RgbImage,
    /// 0/1, S×S.
    pub mask: Vec<u8>,
}

impl Example {
    /// Stretch-resizes an image (bilinear) and its mask (nearest) to S×S.
    pub fn at_size(id: String, image: &RgbImage, mask: &[u8], s: usize) -> Example {
        let m = crate::io::GrayImage {
            width: image.width,
            height: image.height,
            data: mask.to_vec(),
        };
        Example {
            id,
            image: image.resize(s, s),
            mask: m.resize_nearest(s, s).data,
        }
    }

    /// An image and its mask as read from files (or bytes) named `image_name` and `mask_name`:
    /// the mask binarised and checked against the image's size ([`super::gradients::mask_for`]),
    /// then both at S×S ([`Example::at_size`]), named `image_name`.
    pub fn from_pair(
        image: &RgbImage,
        image_name: &str,
        mask: &crate::io::GrayImage,
        mask_name: &str,
        s: usize,
    ) -> Result<Example> {
        let bin = super::gradients::mask_for(image, image_name, mask, mask_name)?;
        Ok(Example::at_size(image_name.to_string(), image, &bin, s))
    }

    /// One of the 8 symmetries of the square (flips and 90° rotations), applied to image and mask.
    pub fn dihedral(&self, code: u8) -> Example {
        let s = self.image.width;
        assert_eq!(s, self.image.height, "augmentation needs square examples");
        let map = |y: usize, x: usize| -> (usize, usize) {
            let (mut y, mut x) = (y, x);
            if code & 1 != 0 {
                x = s - 1 - x;
            }
            if code & 2 != 0 {
                y = s - 1 - y;
            }
            if code & 4 != 0 {
                std::mem::swap(&mut x, &mut y);
            }
            (y, x)
        };
        let mut img = vec![0u8; s * s * 3];
        let mut mask = vec![0u8; s * s];
        for y in 0..s {
            for x in 0..s {
                let (sy, sx) = map(y, x);
                let si = sy * s + sx;
                img[(y * s + x) * 3..(y * s + x) * 3 + 3]
                    .copy_from_slice(&self.image.data[si * 3..si * 3 + 3]);
                mask[y * s + x] = self.mask[si];
            }
        }
        Example {
            id: self.id.clone(),
            image: RgbImage {
                width: s,
                height: s,
                data: img,
            },
            mask,
        }
    }
}

/// Where training examples come from.
pub trait Source {
    fn len(&self) -> usize;
    /// Example `i` at size S (any randomness derived from `rng`).
    fn get(&self, i: usize, s: usize, rng: &mut Rng) -> Result<Example>;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// What names example `i` in messages (its image file where there is one).
    fn name(&self, i: usize) -> String {
        format!("example {i}")
    }
}

#[cfg(not(target_arch = "wasm32"))]
impl Source for super::datasets::Dataset {
    fn len(&self) -> usize {
        self.samples.len()
    }
    fn get(&self, i: usize, s: usize, _rng: &mut Rng) -> Result<Example> {
        let (img, mask) = self.load(i)?;
        Ok(Example::at_size(self.samples[i].id.clone(), &img, &mask, s))
    }
    fn name(&self, i: usize) -> String {
        self.samples
            .get(i)
            .map_or_else(|| format!("sample {i}"), |x| x.image.display().to_string())
    }
}

/// Examples held in memory (already at model size).
pub struct MemorySource(pub Vec<Example>);

impl Source for MemorySource {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn get(&self, i: usize, _s: usize, _rng: &mut Rng) -> Result<Example> {
        Ok(self.0[i].clone())
    }
    fn name(&self, i: usize) -> String {
        self.0
            .get(i)
            .map_or_else(|| format!("example {i}"), |e| e.id.clone())
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainOptions {
    pub epochs: usize,
    /// Examples per micro-batch.
    pub batch: usize,
    /// Micro-batches accumulated per optimiser step.
    pub accum: usize,
    pub lr: f32,
    pub weight_decay: f32,
    pub mode: TrainMode,
    /// Random flips and 90° rotations.
    pub augment: bool,
    pub seed: u64,
    /// Optimiser steps between checkpoints (0 = only at epoch ends).
    pub checkpoint_every: usize,
}

impl Default for TrainOptions {
    /// The paper's recipe: Adam 5e-4, batch 4, 200 epochs.
    fn default() -> Self {
        TrainOptions {
            epochs: 200,
            batch: 4,
            accum: 1,
            lr: 5e-4,
            weight_decay: 0.0,
            mode: TrainMode::Full,
            augment: false,
            seed: 0,
            checkpoint_every: 0,
        }
    }
}

/// Where a run stands (stored in checkpoints).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Progress {
    /// Current epoch (0-based).
    pub epoch: usize,
    /// Optimiser steps done in the current epoch.
    pub step_in_epoch: usize,
    /// Optimiser steps done in total.
    pub step: u64,
    /// Best validation Dice so far and its epoch.
    pub best_val_dice: Option<f64>,
    pub best_epoch: Option<usize>,
}

pub const META_TRAIN: &str = "medfastsam.train_state";

#[derive(Serialize, Deserialize)]
struct TrainState {
    options: TrainOptions,
    progress: Progress,
}

pub struct Trainer<'g> {
    pub gpu: &'g Gpu,
    pub ps: ParamStore,
    /// The model built once on `ps` (train mode for steps, eval mode for validation).
    pub model: MedFastSam,
    pub opts: TrainOptions,
    pub progress: Progress,
    pub loss: LossConfig,
}

impl<'g> Trainer<'g> {
    pub fn new(
        gpu: &'g Gpu,
        weights: &Weights,
        cfg: &Config,
        variant: Variant,
        opts: TrainOptions,
    ) -> Result<Self> {
        if opts.batch == 0 || opts.accum == 0 {
            return Err(Error::Config(
                "batch and accumulation steps must be at least 1".into(),
            ));
        }
        if opts.batch < 2 && opts.mode == TrainMode::Full {
            return Err(Error::Config(
                "full training uses BatchNorm batch statistics and needs batches of at least 2 images (or use --mode semi)".into(),
            ));
        }
        // Refuse a step that cannot fit before any buffer is allocated (issue 8's memory guard).
        crate::model::memory::check_train(gpu, cfg, opts.batch)?;
        let ps = ParamStore::new(gpu, weights, cfg, variant, opts.mode)?;
        let model = MedFastSam::from_params(&ps)?;
        Ok(Trainer {
            gpu,
            ps,
            model,
            opts,
            progress: Progress::default(),
            loss: LossConfig::default(),
        })
    }

    /// Optimiser steps per epoch for `n` examples (the last, partial batch is dropped).
    pub fn steps_per_epoch(&self, n: usize) -> usize {
        n / (self.opts.batch * self.opts.accum)
    }

    /// The example order of `epoch`: a permutation that depends only on the seed and the epoch.
    pub fn epoch_order(&self, n: usize, epoch: usize) -> Vec<usize> {
        let mut v: Vec<usize> = (0..n).collect();
        Rng::new(self.opts.seed ^ (0x5EED_0000_0000 + epoch as u64)).shuffle(&mut v);
        v
    }

    /// The examples of optimiser step `k` of `epoch` (micro-batches), augmented deterministically.
    pub fn batch_examples(
        &self,
        src: &dyn Source,
        epoch: usize,
        k: usize,
    ) -> Result<Vec<Vec<Example>>> {
        let order = self.epoch_order(src.len(), epoch);
        let per = self.opts.batch * self.opts.accum;
        let s = self.ps.cfg.image_size;
        let mut micro = Vec::new();
        for a in 0..self.opts.accum {
            let mut b = Vec::new();
            for j in 0..self.opts.batch {
                let pos = k * per + a * self.opts.batch + j;
                let i = order[pos];
                let mut rng = Rng::new(
                    self.opts.seed ^ ((epoch as u64) << 32) ^ (pos as u64).wrapping_mul(0x9E37),
                );
                let mut ex = src.get(i, s, &mut rng)?;
                if ex.image.width != s || ex.image.height != s || ex.mask.len() != s * s {
                    return Err(Error::Invalid(format!("example {} is not {s}x{s}", ex.id)));
                }
                if self.opts.augment {
                    ex = ex.dihedral((rng.next_u64() % 8) as u8);
                }
                b.push(ex);
            }
            micro.push(b);
        }
        Ok(micro)
    }

    /// One optimiser step: for each micro-batch forward (train mode), loss, backward (gradients
    /// accumulate, scaled by 1/accum), then Adam. Returns the mean (loss, focal, dice).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn step(&mut self, micro: &[Vec<Example>]) -> Result<[f32; 3]> {
        pollster_block(self.step_async(micro))
    }

    /// [`Trainer::step`] without blocking (the page's worker awaits it; natively `step` blocks on it).
    pub async fn step_async(&mut self, micro: &[Vec<Example>]) -> Result<[f32; 3]> {
        let mut rec = self.gpu.new_recorder();
        self.ps.zero_grads(&mut rec);
        let loss = LossConfig {
            grad_scale: 1.0 / micro.len() as f32,
            ..self.loss
        };
        let mut values = Vec::new();
        for b in micro {
            let r = record_batch(self.gpu, &self.model, &mut rec, b, &loss)?;
            values.push(r.loss);
            // Keep one micro-batch's activations alive at a time.
            rec.flush()?;
        }
        let adam = AdamConfig {
            lr: self.opts.lr,
            weight_decay: self.opts.weight_decay,
            ..AdamConfig::default()
        };
        self.ps.adam(&mut rec, &adam)?;
        rec.submit()?;
        for _ in micro {
            self.ps.count_bn_batch();
        }
        let mut mean = [0f32; 3];
        for v in &values {
            let r = self.gpu.read_async(v).await?;
            for i in 0..3 {
                mean[i] += r[i] / values.len() as f32;
            }
        }
        if mean.iter().any(|v| !v.is_finite()) {
            return Err(Error::Invalid(format!(
                "training diverged at step {} (epoch {}): the loss is not finite (loss {}, focal {}, Dice loss {}), so \
                 the weights are no longer usable and none are written from this step on; lower the learning rate \
                 (now --lr {:e})",
                self.progress.step + 1,
                self.progress.epoch + 1,
                mean[0],
                mean[1],
                mean[2],
                self.opts.lr
            )));
        }
        self.progress.step += 1;
        self.progress.step_in_epoch += 1;
        Ok(mean)
    }

    /// Records one forward, loss and backward of `batch` on `rec` (the gradients accumulate), for
    /// benchmarks: with `rec.profile` set, the kernels' times; with `rec.memory` set, the memory
    /// view of the step (recorded, so exact without submitting).
    pub fn record_one(&self, rec: &mut Recorder, batch: &[Example]) -> Result<()> {
        rec.mark(|| "parameters, gradients and Adam moments".into());
        let r = record_batch(self.gpu, &self.model, rec, batch, &self.loss)?;
        drop(r);
        rec.mark(|| "the step's tensors released".into());
        Ok(())
    }

    /// The current weights (authors' keys), read back from the device.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn weights(&self) -> Result<Weights> {
        pollster_block(self.weights_async())
    }

    /// [`Trainer::weights`] without blocking.
    pub async fn weights_async(&self) -> Result<Weights> {
        self.ps.to_weights_async(self.gpu).await
    }

    /// The current weights, refused (an error naming the first tensor) when any value is not
    /// finite: what is written to a file goes through here, so no file ever holds NaN or infinity.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn finite_weights(&self) -> Result<Weights> {
        pollster_block(self.finite_weights_async())
    }

    /// [`Trainer::finite_weights`] without blocking.
    pub async fn finite_weights_async(&self) -> Result<Weights> {
        let w = self.weights_async().await?;
        self.check_finite(&w)?;
        Ok(w)
    }

    fn check_finite(&self, w: &Weights) -> Result<()> {
        if let Some((k, _)) = w
            .tensors
            .iter()
            .find(|(_, t)| t.data.iter().any(|v| !v.is_finite()))
        {
            return Err(Error::Invalid(format!(
                "training diverged by step {} (epoch {}): tensor '{k}' holds NaN or infinite values, so nothing is \
                 written from this state; lower the learning rate (now --lr {:e})",
                self.progress.step,
                self.progress.epoch + 1,
                self.opts.lr
            )));
        }
        Ok(())
    }

    /// A checkpoint of the current state in host memory (weights, Adam moments `adam.m.*` /
    /// `adam.v.*`, options and position), checked finite; [`Checkpoint::write`] writes it.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn checkpoint(&self) -> Result<Checkpoint> {
        pollster_block(self.checkpoint_async())
    }

    /// [`Trainer::checkpoint`] without blocking.
    pub async fn checkpoint_async(&self) -> Result<Checkpoint> {
        let mut w = self.weights_async().await?;
        for (k, t) in self.ps.read_moments_async(self.gpu).await? {
            w.tensors.insert(k, t);
        }
        self.check_finite(&w)?;
        let state = TrainState {
            options: self.opts.clone(),
            progress: self.progress.clone(),
        };
        w.metadata.insert(
            META_TRAIN.into(),
            serde_json::to_string(&state).expect("serialisable"),
        );
        Ok(Checkpoint {
            weights: w,
            cfg: self.ps.cfg.clone(),
            variant: self.ps.variant,
            step: self.progress.step,
        })
    }

    /// Writes a checkpoint: weights, Adam moments (`adam.m.*`, `adam.v.*`), options and position.
    /// Refuses (writing nothing) when any value is not finite.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn save_checkpoint(&self, path: &std::path::Path) -> Result<()> {
        self.checkpoint()?.write(path)
    }

    /// Continues from a checkpoint written by [`Trainer::save_checkpoint`].
    #[cfg(not(target_arch = "wasm32"))]
    pub fn resume(gpu: &'g Gpu, path: &std::path::Path) -> Result<Self> {
        let ck = read_checkpoint::<TrainState>(path, META_TRAIN, "training")?;
        Trainer::from_checkpoint(gpu, ck, path)
    }

    /// Continues from a checkpoint held in memory: the bytes of a safetensors file that
    /// [`Checkpoint::to_bytes`] (or [`Trainer::save_checkpoint`]) wrote; `source` names it in errors.
    pub fn resume_from_bytes(gpu: &'g Gpu, bytes: &[u8], source: &str) -> Result<Self> {
        let w = Weights::from_bytes(bytes, source)?;
        let ck = split_checkpoint::<TrainState>(w, source, META_TRAIN, "training")?;
        Trainer::from_checkpoint(gpu, ck, source.as_ref())
    }

    fn from_checkpoint(
        gpu: &'g Gpu,
        ck: CheckpointFile<TrainState>,
        path: &std::path::Path,
    ) -> Result<Self> {
        let mut t = Trainer::new(gpu, &ck.weights, &ck.cfg, ck.variant, ck.state.options)?;
        t.ps.load_moments(gpu, &ck.moments)
            .map_err(|e| Error::weights(path, e.to_string()))?;
        t.ps.step = ck.state.progress.step;
        t.progress = ck.state.progress;
        Ok(t)
    }
}

/// What a checkpoint file holds: the weights (without the optimiser's tensors), their
/// configuration and variant, the Adam moments (`adam.m.*`, `adam.v.*`) and the run's state from
/// the metadata.
pub struct CheckpointFile<S> {
    pub weights: Weights,
    pub cfg: Config,
    pub variant: Variant,
    pub moments: BTreeMap<String, HostTensor>,
    pub state: S,
}

/// Reads a checkpoint whose run state is JSON under metadata key `meta_key`; `what` names the
/// kind of run in errors ("not a training checkpoint").
#[cfg(not(target_arch = "wasm32"))]
pub fn read_checkpoint<S: serde::de::DeserializeOwned>(
    path: &std::path::Path,
    meta_key: &str,
    what: &str,
) -> Result<CheckpointFile<S>> {
    split_checkpoint(Weights::load(path)?, path, meta_key, what)
}

/// [`read_checkpoint`] of weights already parsed (a file's or an in-memory copy's); `path` names
/// them in errors.
pub fn split_checkpoint<S: serde::de::DeserializeOwned>(
    mut w: Weights,
    path: impl AsRef<std::path::Path>,
    meta_key: &str,
    what: &str,
) -> Result<CheckpointFile<S>> {
    let path = path.as_ref();
    let state: S = match w.metadata.remove(meta_key) {
        Some(s) => serde_json::from_str(&s)
            .map_err(|e| Error::weights(path, format!("bad {what} state in metadata: {e}")))?,
        None => {
            return Err(Error::weights(
                path,
                format!("not a {what} checkpoint (no {what} state in its metadata)"),
            ));
        }
    };
    let moments: BTreeMap<String, HostTensor> = w
        .tensors
        .iter()
        .filter(|(k, _)| k.starts_with("adam."))
        .map(|(k, t)| (k.clone(), t.clone()))
        .collect();
    w.tensors.retain(|k, _| !k.starts_with("adam."));
    let cfg = w
        .config
        .clone()
        .ok_or_else(|| Error::weights(path, "checkpoint has no configuration"))?;
    let variant = w.variant.unwrap_or_default();
    Ok(CheckpointFile {
        weights: w,
        cfg,
        variant,
        moments,
        state,
    })
}

/// A checkpoint held in memory (see [`Trainer::checkpoint`]).
pub struct Checkpoint {
    weights: Weights,
    cfg: Config,
    variant: Variant,
    /// Optimiser steps done when it was taken.
    pub step: u64,
}

/// What [`record_batch`] recorded: the loss values (loss, focal, Dice loss) and the forward's
/// output, with the batch's inputs kept alive until the caller drops it (the backward released
/// the saved activations as it went: the pool hands a released buffer only to commands recorded
/// later, which run later).
pub(crate) struct RecordedBatch {
    pub loss: Tensor,
    pub out: Output,
    _keep: (Tensor, Tensor, Tensor),
}

/// Records on `rec` one forward (train mode), the loss and the backward of `batch` (examples at
/// the model size): packs and uploads the images and masks; the parameter gradients accumulate.
/// The one implementation behind [`Trainer::step_async`] and
/// [`super::gradients::gradients_async`].
pub(crate) fn record_batch(
    gpu: &Gpu,
    model: &MedFastSam,
    rec: &mut Recorder,
    batch: &[Example],
    loss: &LossConfig,
) -> Result<RecordedBatch> {
    let s = model.cfg.image_size;
    let px: Vec<u32> = batch.iter().flat_map(|e| e.image.packed()).collect();
    let tg: Vec<f32> = batch
        .iter()
        .flat_map(|e| e.mask.iter().map(|&v| v as f32))
        .collect();
    let px = gpu.upload_u32(&px, &[batch.len(), s, s])?;
    let tg = gpu.upload(&tg, &[batch.len(), s, s, 1])?;
    rec.mark(|| "images and masks".into());
    let (out, saved) = model.forward_train(rec, &px)?;
    let (v, dlogits) = seg_loss(rec, &out.logits, &tg, loss)?;
    rec.mark(|| "loss".into());
    let phase = std::mem::replace(&mut rec.profile_phase, "bwd ");
    model.backward(rec, saved, &dlogits)?;
    rec.profile_phase = phase;
    Ok(RecordedBatch {
        loss: v,
        out,
        _keep: (px, tg, dlogits),
    })
}

impl Checkpoint {
    /// Writes it atomically (a complete file or the previous one, never a partial one).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn write(&self, path: &std::path::Path) -> Result<()> {
        self.weights.save(path, &self.cfg, self.variant, false)
    }

    /// The bytes of the safetensors file [`Checkpoint::write`] writes (what the page persists).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        self.weights.to_bytes(&self.cfg, self.variant, false)
    }
}

#[cfg(not(target_arch = "wasm32"))]
fn pollster_block<T>(f: impl std::future::Future<Output = T>) -> T {
    pollster::block_on(f)
}

/// Scores of one image under the paper protocol.
#[derive(Clone, Debug)]
pub struct Evaluated {
    pub id: String,
    pub scores: Scores,
    /// Prediction (0/1) at the evaluation resolution, `width × height`.
    pub pred: Vec<u8>,
    pub width: usize,
    pub height: usize,
}

/// An example that could not be scored, and why.
#[derive(Debug)]
pub struct Unscored {
    /// Index in the source.
    pub index: usize,
    /// The example's id (its file stem for datasets).
    pub id: String,
    /// The error, naming the file.
    pub error: Error,
    /// The model's logits were NaN or infinite (weights that overflow), not a problem of the file.
    pub non_finite: bool,
}

/// What [`evaluate_each`] got: the scored examples, those that could not be scored, and an error
/// that stopped the evaluation early (a GPU error: later examples were not tried).
#[derive(Debug, Default)]
pub struct Evaluation {
    pub scored: Vec<Evaluated>,
    pub unscored: Vec<Unscored>,
    pub stopped: Option<Error>,
}

impl Evaluation {
    /// All examples scored, or the first problem as the error.
    pub fn into_result(self) -> Result<Vec<Evaluated>> {
        if let Some(u) = self.unscored.into_iter().next() {
            return Err(u.error);
        }
        if let Some(e) = self.stopped {
            return Err(e);
        }
        Ok(self.scored)
    }
}

/// Evaluates `model` on `src` (batch of one image at a time): binary prediction logit > 0 at the
/// model size vs the ground truth resized (nearest) to it; IoU, Dice and optionally HD95.
/// `on_image` sees each scored example. An example whose files cannot be read, or whose logits are
/// not finite (never turned into a mask or a score), is listed in [`Evaluation::unscored`] and the
/// others are still scored; a GPU error stops the evaluation ([`Evaluation::stopped`]) keeping
/// what was scored before it.
#[cfg(not(target_arch = "wasm32"))]
pub fn evaluate_each(
    gpu: &Gpu,
    model: &MedFastSam,
    src: &dyn Source,
    with_hd95: bool,
    on_image: impl FnMut(usize, &Evaluated),
) -> Evaluation {
    pollster_block(evaluate_each_async(gpu, model, src, with_hd95, on_image))
}

/// [`evaluate_each`] without blocking (the page's worker awaits it; natively `evaluate_each`
/// blocks on it).
pub async fn evaluate_each_async(
    gpu: &Gpu,
    model: &MedFastSam,
    src: &dyn Source,
    with_hd95: bool,
    mut on_image: impl FnMut(usize, &Evaluated),
) -> Evaluation {
    let s = model.cfg.image_size;
    let mut out = Evaluation::default();
    let mut rng = Rng::new(0);
    for i in 0..src.len() {
        let ex = match src.get(i, s, &mut rng) {
            Ok(ex) => ex,
            Err(error) => {
                let id = src.name(i);
                out.unscored.push(Unscored {
                    index: i,
                    id,
                    error,
                    non_finite: false,
                });
                continue;
            }
        };
        let logits = async {
            let px = gpu.upload_u32(&ex.image.packed(), &[1, s, s])?;
            let mut rec = gpu.new_recorder();
            let o = model.forward(&mut rec, &px, false)?;
            rec.submit()?;
            gpu.read_async(&o.logits).await
        }
        .await;
        let logits = match logits {
            Ok(l) => l,
            Err(e) => {
                out.stopped = Some(Error::image(
                    src.name(i),
                    format!("evaluation stopped: {e}"),
                ));
                break;
            }
        };
        if let Some(bad) = logits.iter().find(|v| !v.is_finite()) {
            let n = logits.iter().filter(|v| !v.is_finite()).count();
            let error = Error::image(
                src.name(i),
                format!(
                    "the model's logits are not finite ({n} of {} values, e.g. {bad}): the weights overflow at this \
                     input, so there is no mask and no score",
                    logits.len()
                ),
            );
            out.unscored.push(Unscored {
                index: i,
                id: ex.id,
                error,
                non_finite: true,
            });
            continue;
        }
        let pred: Vec<u8> = logits.iter().map(|&v| (v > 0.0) as u8).collect();
        let scores = metrics::scores(&pred, &ex.mask, s, s, with_hd95);
        let e = Evaluated {
            id: ex.id,
            scores,
            pred,
            width: s,
            height: s,
        };
        on_image(i, &e);
        out.scored.push(e);
    }
    out
}

/// [`evaluate_each`] where any example that cannot be scored is an error.
#[cfg(not(target_arch = "wasm32"))]
pub fn evaluate(
    gpu: &Gpu,
    model: &MedFastSam,
    src: &dyn Source,
    with_hd95: bool,
    on_image: impl FnMut(usize, &Evaluated),
) -> Result<Vec<Evaluated>> {
    evaluate_each(gpu, model, src, with_hd95, on_image).into_result()
}

/// Scores of the Otsu coarse prompt alone (the CP-Encoder's mask at the model size).
#[cfg(not(target_arch = "wasm32"))]
pub fn evaluate_otsu(
    gpu: &Gpu,
    model: &MedFastSam,
    src: &dyn Source,
    with_hd95: bool,
) -> Result<Vec<Evaluated>> {
    let s = model.cfg.image_size;
    let mut out = Vec::new();
    let mut rng = Rng::new(0);
    for i in 0..src.len() {
        let ex = src.get(i, s, &mut rng)?;
        let px = gpu.upload_u32(&ex.image.packed(), &[1, s, s])?;
        let mut rec = gpu.new_recorder();
        let x = crate::ops::elementwise::image_normalize(&mut rec, &px)?;
        let (_t, mask) = crate::ops::otsu::otsu(&mut rec, &px, &x, model.otsu_rule())?;
        rec.submit()?;
        let pred: Vec<u8> = gpu.read(&mask)?.iter().map(|&v| (v > 0.5) as u8).collect();
        let scores = metrics::scores(&pred, &ex.mask, s, s, with_hd95);
        out.push(Evaluated {
            id: ex.id,
            scores,
            pred,
            width: s,
            height: s,
        });
    }
    Ok(out)
}

/// Where the box prompts of a prompt-based model (MobileSAM, LiteMedSAM) come from when it is
/// evaluated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BoxPrompts {
    /// One box per connected component of the image's Otsu coarse mask (prompt-free).
    Otsu,
    /// One box per connected component of the ground truth (MedSAM's protocol: the tight
    /// bounding box of each object; an upper bound, since it uses the answer to place the boxes).
    GroundTruth,
}

impl BoxPrompts {
    pub fn name(self) -> &'static str {
        match self {
            BoxPrompts::Otsu => "Otsu boxes",
            BoxPrompts::GroundTruth => "ground-truth boxes",
        }
    }

    /// The boxes for one image and its 0/1 ground truth (original pixels).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn boxes(self, gpu: &Gpu, image: &RgbImage, gt: &[u8]) -> Result<Vec<[f32; 4]>> {
        use crate::segment::{component_boxes, otsu_boxes};
        let (w, h) = (image.width, image.height);
        Ok(match self {
            BoxPrompts::Otsu => otsu_boxes(gpu, image)?,
            BoxPrompts::GroundTruth => {
                let fg: Vec<bool> = gt.iter().map(|&v| v != 0).collect();
                component_boxes(&fg, w, h, 1, usize::MAX)
            }
        })
    }
}

/// Evaluates a prompt-based model (MobileSAM, LiteMedSAM) at each image's own resolution: the
/// image encoded once, one box per object from `prompts`, the chosen masks merged, prediction
/// logit > 0 against the ground truth; IoU, Dice and optionally HD95 as [`evaluate_each`] reports
/// them. `load(i)` gives example `i`'s id, image and 0/1 mask (an error there leaves the example
/// unscored); non-finite logits leave it unscored; a GPU error stops the evaluation. `on_image`
/// sees each scored example and the number of boxes it was given.
#[cfg(not(target_arch = "wasm32"))]
pub fn evaluate_prompted(
    seg: &crate::segment::PromptSegmenter,
    n: usize,
    load: impl Fn(usize) -> Result<(String, RgbImage, Vec<u8>)>,
    prompts: BoxPrompts,
    with_hd95: bool,
    mut on_image: impl FnMut(usize, &Evaluated, usize),
) -> Evaluation {
    let mut out = Evaluation::default();
    for i in 0..n {
        let (id, image, gt) = match load(i) {
            Ok(x) => x,
            Err(error) => {
                out.unscored.push(Unscored {
                    index: i,
                    id: format!("#{i}"),
                    error,
                    non_finite: false,
                });
                continue;
            }
        };
        let logits = match prompts
            .boxes(seg.gpu, &image, &gt)
            .and_then(|boxes| Ok((seg.segment_boxes(&image, &boxes)?, boxes.len())))
        {
            Ok(l) => l,
            Err(e @ Error::Invalid(_)) => {
                out.unscored.push(Unscored {
                    index: i,
                    error: Error::image(&id, e.to_string()),
                    id,
                    non_finite: true,
                });
                continue;
            }
            Err(e) => {
                out.stopped = Some(Error::image(&id, format!("evaluation stopped: {e}")));
                break;
            }
        };
        let ((logits, n_boxes), (w, h)) = (logits, (image.width, image.height));
        let pred: Vec<u8> = logits.iter().map(|&v| (v > 0.0) as u8).collect();
        let e = Evaluated {
            scores: metrics::scores(&pred, &gt, w, h, with_hd95),
            id,
            pred,
            width: w,
            height: h,
        };
        on_image(i, &e, n_boxes);
        out.scored.push(e);
    }
    out
}
