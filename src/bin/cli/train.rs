//! `medfastsam train`: the training loop with progress, per-epoch log (JSON lines), atomic
//! checkpoints, best-on-validation weights, `--resume`, and a checkpoint on Ctrl-C or SIGTERM.
//!
//! Faults: every sample is checked when the data is opened (all bad ones listed at once); a loss
//! or weights that stop being finite end the run at that step with nothing written from that
//! state, and a periodic checkpoint is written only once the next step's loss has shown its
//! weights finite, so a good checkpoint is never replaced by a diverged one; stale temporary
//! files of killed writers are removed from the output folder on start.

use super::{GpuArgs, ModelArgs};
use clap::Args;
use medfastsam::gpu::Gpu;
use medfastsam::model::{Config, Variant, Weights};
use medfastsam::train::datasets::{Dataset, Format, Split};
use medfastsam::train::metrics::Summary;
use medfastsam::train::params::TrainMode;
use medfastsam::train::trainer::{Checkpoint, TrainOptions, Trainer, evaluate_each};
use medfastsam::trained_on::{Polarity, PolarityStats, TrainedOn};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Installs the handler of Ctrl-C (SIGINT) and of the termination signals SIGTERM (what a cluster
/// scheduler sends before killing a job) and SIGHUP (once): the first sets [`INTERRUPTED`], a
/// second exits at once.
pub fn on_ctrl_c() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = ctrlc::set_handler(|| {
            if INTERRUPTED.swap(true, Ordering::SeqCst) {
                eprintln!("\nsecond interrupt: exiting without a checkpoint");
                std::process::exit(130);
            }
            eprintln!("\ninterrupted (Ctrl-C or a termination signal): finishing the current step (interrupt again to abort)");
        });
    });
}

/// Removes the temporary files that writers killed mid-write left in `dir` (see
/// [`medfastsam::train::remove_stale_temp_files`]) and says so; a failure is a warning.
pub fn remove_stale_temp_files(dir: &Path) {
    match medfastsam::train::remove_stale_temp_files(dir) {
        Ok(removed) => {
            for p in removed {
                eprintln!(
                    "removed stale temporary file {} (left by an interrupted write)",
                    p.display()
                );
            }
        }
        Err(e) => eprintln!("warning: cannot remove stale temporary files: {e}"),
    }
}

/// Checks every sample of the named datasets (headers, sizes, annotations) with a progress bar;
/// one error lists every sample that cannot be used.
pub fn check_samples(sets: &[(&str, &Dataset)]) -> anyhow::Result<()> {
    let n: usize = sets.iter().map(|(_, d)| d.len()).sum();
    let bar = indicatif::ProgressBar::new(n as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("checking samples {bar:30} {pos}/{len}").unwrap(),
    );
    let mut errors = Vec::new();
    for (what, d) in sets {
        if let Err(e) = d.check(|_| bar.inc(1)) {
            errors.push(format!("{what}: {e}"));
        }
    }
    bar.finish_and_clear();
    if !errors.is_empty() {
        anyhow::bail!("{}", errors.join("; "));
    }
    Ok(())
}

#[derive(Args)]
pub struct TrainArgs {
    /// Dataset folder.
    #[arg(long)]
    pub data: PathBuf,
    /// Dataset layout: isic2018|ph2|monuseg|tnbc|generic|authors.
    #[arg(long)]
    pub format: Format,
    /// Split of --data to train on.
    #[arg(long, default_value = "train")]
    pub split: String,
    /// Validation data (same layout; its `val` split, else all of it). Default: the `val` split of
    /// --data when it has one.
    #[arg(long)]
    pub val: Option<PathBuf>,
    /// Preset of a new model (paper or tiny); ignored with --weights or --resume.
    #[arg(long)]
    pub preset: Option<String>,
    /// Configuration JSON of a new model.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Initial weights (fine-tuning); default: a fresh initialisation.
    #[arg(long, conflicts_with = "init")]
    pub weights: Option<PathBuf>,
    /// Pretrained weights (imported MobileSAM or LiteMedSAM) to initialise Med-FastSAM from, as
    /// `medfastsam init` does (the --preset's added modules initialised, default paper); the
    /// training mode then defaults to semi.
    #[arg(long)]
    pub init: Option<PathBuf>,
    #[arg(long, default_value = "paper")]
    pub variant: String,
    #[arg(long, default_value_t = 200)]
    pub epochs: usize,
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Micro-batches accumulated per optimiser step.
    #[arg(long, default_value_t = 1)]
    pub accum: usize,
    /// Learning rate [default: 5e-4]; with --resume, replaces the checkpoint's (e.g. lower after a
    /// divergence).
    #[arg(long)]
    pub lr: Option<f32>,
    /// Decoupled weight decay (AdamW); 0 = Adam.
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f32,
    /// Input size S (multiple of 16); default: the configuration's.
    #[arg(long)]
    pub size: Option<usize>,
    /// full or semi (natural branch frozen) [default: semi with --init, else full].
    #[arg(long)]
    pub mode: Option<String>,
    /// Random flips and 90° rotations.
    #[arg(long)]
    pub augment: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Optimiser steps between checkpoints (0 = at epoch ends only).
    #[arg(long, default_value_t = 0)]
    pub checkpoint_every: usize,
    /// Continue from OUT/checkpoint.safetensors (or the given checkpoint).
    #[arg(long, num_args = 0..=1, default_missing_value = "")]
    pub resume: Option<String>,
    /// Stop after this many optimiser steps in this invocation (for tests and time-boxed runs).
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Output folder: checkpoint.safetensors, best.safetensors, final.safetensors, log.jsonl.
    #[arg(long)]
    pub out: PathBuf,
    /// Channel transform applied to every image (recorded in the weights, so inference applies
    /// it too); default: the one the initial weights record, else rgb.
    #[command(flatten)]
    pub channel: super::ChannelArgs,
    /// Imaging modality recorded in the weights (e.g. fluorescence, H&E, dermoscopy); default:
    /// from --format (isic2018/ph2: dermoscopy, monuseg/tnbc: H&E), else none.
    #[arg(long)]
    pub modality: Option<String>,
    /// Dataset name recorded in the weights; default: the --data folder's name.
    #[arg(long)]
    pub dataset_name: Option<String>,
}

/// The modality a dataset layout implies.
fn modality_of(format: Format) -> Option<&'static str> {
    match format {
        Format::Isic2018 | Format::Ph2 => Some("dermoscopy"),
        Format::Monuseg | Format::Tnbc => Some("H&E"),
        _ => None,
    }
}

/// What the weights will record about this run's data: modality, polarity measured on up to 32
/// training samples (through the channel transform), input size, channel, dataset, and what the
/// initial weights had recorded.
fn trained_on_record(
    a: &TrainArgs,
    train: &Dataset,
    image_size: usize,
    channel: (
        medfastsam::channel::Channel,
        medfastsam::channel::StainVectors,
    ),
    before: Option<&TrainedOn>,
) -> anyhow::Result<TrainedOn> {
    let mut stats = PolarityStats::default();
    let step = (train.len() / 32).max(1);
    for i in (0..train.len()).step_by(step).take(32) {
        let (img, mask) = train.load(i)?;
        stats.add(&img.data, &mask);
    }
    let dataset = a.dataset_name.clone().unwrap_or_else(|| {
        a.data
            .canonicalize()
            .unwrap_or_else(|_| a.data.clone())
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| a.data.display().to_string())
    });
    Ok(TrainedOn {
        modality: a
            .modality
            .clone()
            .or_else(|| modality_of(a.format).map(String::from)),
        polarity: Polarity::measure(&stats),
        input_size: Some(image_size),
        channel: Some(channel.0.name().into()),
        stain_vectors: channel.0.is_stain().then(|| channel.1.name().to_string()),
        dataset: Some(dataset),
        note: Some(match before {
            Some(b) => format!(
                "medfastsam train ({} layout); fine-tuned from weights trained on: {}",
                a.format.name(),
                b.summary()
            ),
            None => format!("medfastsam train ({} layout)", a.format.name()),
        }),
    })
}

fn open_split(root: &Path, format: Format, split: Split) -> anyhow::Result<Dataset> {
    Ok(Dataset::open(root, format, split)?)
}

/// Validation summary of the current weights, run in eval mode on the parameters already on the
/// device (nothing is copied). Non-finite logits mean that training diverged: an error naming the
/// step and the image (files are only ever written through `finite_weights`).
fn validate(gpu: &Gpu, t: &Trainer, val: &Dataset) -> Result<Summary, ValidationError> {
    let ev = evaluate_each(gpu, &t.model, val, false, |_, _| {});
    if let Some(u) = ev.unscored.iter().find(|u| u.non_finite) {
        return Err(ValidationError::Diverged(anyhow::anyhow!(
            "training diverged by step {} (epoch {}): validation image {}; lower the learning rate (now --lr {:e})",
            t.progress.step,
            t.progress.epoch,
            u.error,
            t.opts.lr
        )));
    }
    let ev = ev
        .into_result()
        .map_err(|e| ValidationError::Other(anyhow::anyhow!("validation: {e}")))?;
    Ok(Summary::from_scores(ev.iter().map(|e| &e.scores)))
}

enum ValidationError {
    /// The weights or their logits are not finite: nothing may be written from this state.
    Diverged(anyhow::Error),
    /// A validation file that cannot be read, or a GPU error: the trained state itself is whole.
    Other(anyhow::Error),
}

/// What a failed run leaves to resume from, for its error message.
struct Kept<'a> {
    path: &'a Path,
    /// The checkpoint this run resumed from and its step.
    resumed: Option<(PathBuf, u64)>,
    /// Step of the last checkpoint this run wrote.
    written: Option<u64>,
}

impl Kept<'_> {
    fn describe(&self) -> String {
        match (self.written, &self.resumed) {
            (Some(s), _) => format!(
                "the checkpoint of step {s} is kept ({}); continue with --resume",
                self.path.display()
            ),
            (None, Some((p, s))) => format!(
                "the checkpoint it resumed from (step {s}) is unchanged ({}); continue with --resume",
                p.display()
            ),
            (None, None) if self.path.exists() => format!(
                "no checkpoint was written by this run ({} is unchanged)",
                self.path.display()
            ),
            (None, None) => "no checkpoint was written by this run".into(),
        }
    }
    fn write(&mut self, c: &Checkpoint) -> anyhow::Result<()> {
        c.write(self.path)?;
        self.written = Some(c.step);
        Ok(())
    }
}

pub fn run(gpu: &GpuArgs, a: &TrainArgs) -> anyhow::Result<i32> {
    std::fs::create_dir_all(&a.out).map_err(|e| anyhow::anyhow!("{}: {e}", a.out.display()))?;
    remove_stale_temp_files(&a.out);
    let ckpt = a.out.join("checkpoint.safetensors");
    let split: Split = a.split.parse()?;
    let train = open_split(&a.data, a.format, split)?;
    let val = match &a.val {
        Some(v) => Some(
            open_split(v, a.format, Split::Val).or_else(|_| open_split(v, a.format, Split::All))?,
        ),
        None if split != Split::Val => open_split(&a.data, a.format, Split::Val).ok(),
        None => None,
    };
    let train_name = format!("{} split", split.name());
    let mut sets = vec![(train_name.as_str(), &train)];
    if let Some(v) = &val {
        sets.push(("validation data", v));
    }
    check_samples(&sets)?;
    let gpu = gpu.open()?;
    let mut resumed = None;
    let mut t = if let Some(r) = &a.resume {
        let p = if r.is_empty() {
            ckpt.clone()
        } else {
            PathBuf::from(r)
        };
        let mut t = Trainer::resume(&gpu, &p)?;
        resumed = Some((p.clone(), t.progress.step));
        if a.epochs != t.opts.epochs {
            t.opts.epochs = a.epochs;
        }
        if let Some(lr) = a.lr.filter(|&lr| lr != t.opts.lr) {
            eprintln!(
                "learning rate {lr:e} instead of the checkpoint's {:e}",
                t.opts.lr
            );
            t.opts.lr = lr;
        }
        eprintln!(
            "resumed {} at epoch {} step {} ({} steps done)",
            p.display(),
            t.progress.epoch + 1,
            t.progress.step_in_epoch,
            t.progress.step
        );
        t
    } else {
        let variant = Variant::parse(&a.variant)?;
        let (weights, cfg) = match (&a.weights, &a.init) {
            (_, Some(from)) => {
                let preset = a.preset.as_deref().unwrap_or("paper");
                let (w, mut c, prov) = super::init::initialise(from, preset, a.seed)?;
                super::init::print_provenance(&prov, &c);
                if let Some(s) = a.size {
                    c = c.with_image_size(s)?;
                }
                (w, c)
            }
            (Some(w), None) => {
                let m = ModelArgs {
                    weights: w.clone(),
                    config: a.config.clone(),
                    variant: None,
                    size: a.size,
                };
                let (w, c, _) = m.load()?;
                (w, c)
            }
            (None, None) => {
                let mut cfg = match (&a.config, &a.preset) {
                    (Some(p), _) => Config::from_file(p)?,
                    (None, Some(p)) => Config::preset(p)?,
                    (None, None) => Config::paper(),
                };
                if let Some(s) = a.size {
                    cfg = cfg.with_image_size(s)?;
                }
                (Weights::init(&cfg, a.seed), cfg)
            }
        };
        let opts = TrainOptions {
            epochs: a.epochs,
            batch: a.batch,
            accum: a.accum,
            lr: a.lr.unwrap_or(5e-4),
            weight_decay: a.weight_decay,
            mode: match &a.mode {
                Some(m) => TrainMode::parse(m)?,
                None if a.init.is_some() => TrainMode::Semi,
                None => TrainMode::Full,
            },
            augment: a.augment,
            seed: a.seed,
            checkpoint_every: a.checkpoint_every,
        };
        Trainer::new(&gpu, &weights, &cfg, variant, opts)?
    };
    // The channel transform: the one asked for, else the one the starting weights (or the
    // checkpoint) record; a new run records what it trains on.
    let before = TrainedOn::from_metadata(&t.ps.metadata, "the initial weights")?;
    let channel = a.channel.resolve(before.as_ref())?;
    let train = train.with_channel(channel);
    let val = val.map(|v| v.with_channel(channel));
    if resumed.is_none() || before.is_none() {
        let rec = trained_on_record(a, &train, t.ps.cfg.image_size, channel, before.as_ref())?;
        eprintln!("recording in the weights: trained on {}", rec.summary());
        rec.write(&mut t.ps.metadata);
    }
    let n = train.len();
    let spe = t.steps_per_epoch(n);
    if spe == 0 {
        anyhow::bail!(
            "{}: {n} training images are fewer than one optimiser step needs ({} x {})",
            a.data.display(),
            t.opts.batch,
            t.opts.accum
        );
    }
    let (tuned, total) = t.ps.counts();
    eprintln!(
        "training {} variant, {} mode: {} of {} parameters tuned ({:.2} M / {:.2} M); {n} images at {}², \
         {} steps/epoch, {} epochs; validation: {}",
        t.ps.variant.name(),
        t.opts.mode.name(),
        tuned,
        total,
        tuned as f64 / 1e6,
        total as f64 / 1e6,
        t.ps.cfg.image_size,
        spe,
        t.opts.epochs,
        val.as_ref()
            .map(|v| format!("{} images", v.len()))
            .unwrap_or_else(|| "none".into())
    );
    on_ctrl_c();
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(a.out.join("log.jsonl"))
        .map_err(|e| anyhow::anyhow!("{}: {e}", a.out.join("log.jsonl").display()))?;
    let total_steps = (spe * t.opts.epochs) as u64;
    let bar = indicatif::ProgressBar::new(total_steps);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps {msg} [{elapsed_precise}<{eta_precise}]",
        )
        .unwrap(),
    );
    bar.set_position(t.progress.step.min(total_steps));
    let mut steps_here = 0u64;
    let mut kept = Kept {
        path: &ckpt,
        resumed,
        written: None,
    };
    // A checkpoint taken but not yet written: its weights are shown finite by the next step's loss
    // (or the validation), and only then may it replace the one on disk.
    let mut pending: Option<Checkpoint> = None;
    // Test-only fault injection: destroy the device before this run's step N+1 (simulates a
    // driver reset or a device lost to out-of-memory).
    let lose_after: Option<u64> = std::env::var("MEDFASTSAM_TEST_LOSE_DEVICE_AFTER")
        .ok()
        .and_then(|v| v.parse().ok());
    while t.progress.epoch < t.opts.epochs {
        let epoch = t.progress.epoch;
        let t_epoch = Instant::now();
        let mut sums = [0f64; 3];
        let mut count = 0usize;
        while t.progress.step_in_epoch < spe {
            let k = t.progress.step_in_epoch;
            let ts = Instant::now();
            let micro = match t.batch_examples(&train, epoch, k) {
                Ok(m) => m,
                Err(e) => {
                    // A file that became unreadable: the state after the last step is whole, keep it.
                    bar.abandon();
                    if steps_here > 0
                        && let Err(w) = t
                            .checkpoint()
                            .map_err(anyhow::Error::from)
                            .and_then(|c| kept.write(&c))
                    {
                        anyhow::bail!(
                            "{e}; writing a checkpoint failed too: {w:#}; {}",
                            kept.describe()
                        );
                    }
                    anyhow::bail!("{e}; {}", kept.describe());
                }
            };
            if lose_after == Some(steps_here) {
                gpu.device.destroy();
            }
            let l = match t.step(&micro) {
                Ok(l) => l,
                Err(e) => {
                    bar.abandon();
                    // Not a divergence (a GPU error): the pending checkpoint predates the failed
                    // step and was checked finite, so it is kept.
                    if !matches!(e, medfastsam::Error::Invalid(_))
                        && let Some(p) = pending.take()
                    {
                        let _ = kept.write(&p);
                    }
                    anyhow::bail!("{e}; {}", kept.describe());
                }
            };
            if let Some(p) = pending.take() {
                kept.write(&p)?;
            }
            for i in 0..3 {
                sums[i] += l[i] as f64;
            }
            count += 1;
            steps_here += 1;
            let ips = (t.opts.batch * t.opts.accum) as f64 / ts.elapsed().as_secs_f64();
            bar.set_message(format!(
                "epoch {}/{} loss {:.4} {:.2} img/s",
                epoch + 1,
                t.opts.epochs,
                l[0],
                ips
            ));
            bar.inc(1);
            let every = t.opts.checkpoint_every;
            let interrupted = INTERRUPTED.load(Ordering::SeqCst);
            let stop = a.max_steps.is_some_and(|m| steps_here >= m);
            if interrupted || stop {
                let c = t
                    .checkpoint()
                    .map_err(|e| anyhow::anyhow!("{e}; {}", kept.describe()))?;
                kept.write(&c)?;
            } else if every > 0 && t.progress.step % every as u64 == 0 {
                pending = Some(
                    t.checkpoint()
                        .map_err(|e| anyhow::anyhow!("{e}; {}", kept.describe()))?,
                );
            }
            if interrupted {
                bar.abandon();
                eprintln!(
                    "checkpoint written to {}; continue with --resume",
                    ckpt.display()
                );
                return Ok(130);
            }
            if stop {
                bar.abandon();
                eprintln!(
                    "stopped after {steps_here} steps; checkpoint {}",
                    ckpt.display()
                );
                return Ok(0);
            }
        }
        // End of epoch: validation, log, checkpoints.
        let mut rec = serde_json::json!({
            "epoch": epoch + 1,
            "step": t.progress.step,
            "seconds": t_epoch.elapsed().as_secs_f64(),
        });
        if count > 0 {
            rec["train_loss"] = (sums[0] / count as f64).into();
            rec["train_focal"] = (sums[1] / count as f64).into();
            rec["train_dice_loss"] = (sums[2] / count as f64).into();
        }
        t.progress.epoch += 1;
        t.progress.step_in_epoch = 0;
        if let Some(v) = &val {
            let s = match validate(&gpu, &t, v) {
                Ok(s) => s,
                Err(ValidationError::Diverged(e)) => {
                    bar.abandon();
                    anyhow::bail!("{e:#}; {}", kept.describe());
                }
                Err(ValidationError::Other(e)) => {
                    // The epoch's training is done and whole: keep it (its validation is lost).
                    bar.abandon();
                    if let Err(w) = t
                        .checkpoint()
                        .map_err(anyhow::Error::from)
                        .and_then(|c| kept.write(&c))
                    {
                        anyhow::bail!(
                            "{e:#}; writing a checkpoint failed too: {w:#}; {}",
                            kept.describe()
                        );
                    }
                    anyhow::bail!("{e:#}; {}", kept.describe());
                }
            };
            rec["val_miou"] = s.mean_iou.into();
            rec["val_dice"] = s.mean_dice.into();
            if t.progress.best_val_dice.is_none_or(|b| s.mean_dice > b) {
                t.progress.best_val_dice = Some(s.mean_dice);
                t.progress.best_epoch = Some(epoch + 1);
                t.finite_weights()?.save(
                    &a.out.join("best.safetensors"),
                    &t.ps.cfg,
                    t.ps.variant,
                    false,
                )?;
            }
            super::bar_line(
                Some(&bar),
                format!(
                    "epoch {}: train loss {:.4}, val mIoU {:.4} Dice {:.4} (best Dice {:.4} at epoch {})",
                    epoch + 1,
                    sums[0] / count.max(1) as f64,
                    s.mean_iou,
                    s.mean_dice,
                    t.progress.best_val_dice.unwrap_or(f64::NAN),
                    t.progress.best_epoch.unwrap_or(0)
                ),
            );
        } else {
            super::bar_line(
                Some(&bar),
                format!(
                    "epoch {}: train loss {:.4}",
                    epoch + 1,
                    sums[0] / count.max(1) as f64
                ),
            );
        }
        writeln!(log, "{rec}").map_err(|e| anyhow::anyhow!("log.jsonl: {e}"))?;
        let c = t
            .checkpoint()
            .map_err(|e| anyhow::anyhow!("{e}; {}", kept.describe()))?;
        if val.is_some() {
            // the validation just showed these weights give finite logits
            pending = None;
            kept.write(&c)?;
        } else {
            pending = Some(c);
        }
    }
    if let Some(p) = pending.take() {
        kept.write(&p)?;
    }
    bar.finish();
    let fin = a.out.join("final.safetensors");
    t.finite_weights()?
        .save(&fin, &t.ps.cfg, t.ps.variant, false)?;
    eprintln!(
        "done: {} (checkpoint {}, log {})",
        fin.display(),
        ckpt.display(),
        a.out.join("log.jsonl").display()
    );
    Ok(0)
}
