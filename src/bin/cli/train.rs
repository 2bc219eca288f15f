//! `medfastsam train`: the training loop with progress, per-epoch log (JSON lines), atomic
//! checkpoints, best-on-validation weights, `--resume`, and a checkpoint on Ctrl-C.

use super::{GpuArgs, ModelArgs};
use clap::Args;
use medfastsam::gpu::Gpu;
use medfastsam::model::{Config, MedFastSam, Variant, Weights};
use medfastsam::train::datasets::{Dataset, Format, Split};
use medfastsam::train::metrics::Summary;
use medfastsam::train::params::TrainMode;
use medfastsam::train::trainer::{evaluate, TrainOptions, Trainer};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Installs the Ctrl-C handler (once).
pub fn on_ctrl_c() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = ctrlc::set_handler(|| {
            if INTERRUPTED.swap(true, Ordering::SeqCst) {
                eprintln!("\nsecond interrupt: exiting without a checkpoint");
                std::process::exit(130);
            }
            eprintln!("\ninterrupted: writing a checkpoint after the current step (Ctrl-C again to abort)");
        });
    });
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
    #[arg(long)]
    pub weights: Option<PathBuf>,
    #[arg(long, default_value = "paper")]
    pub variant: String,
    #[arg(long, default_value_t = 200)]
    pub epochs: usize,
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Micro-batches accumulated per optimiser step.
    #[arg(long, default_value_t = 1)]
    pub accum: usize,
    #[arg(long, default_value_t = 5e-4)]
    pub lr: f32,
    /// Decoupled weight decay (AdamW); 0 = Adam.
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f32,
    /// Input size S (multiple of 16); default: the configuration's.
    #[arg(long)]
    pub size: Option<usize>,
    /// full or semi (natural branch frozen).
    #[arg(long, default_value = "full")]
    pub mode: String,
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
}

fn open_split(root: &Path, format: Format, split: Split) -> anyhow::Result<Dataset> {
    Ok(Dataset::open(root, format, split)?)
}

/// Validation summary of the current weights.
fn validate(gpu: &Gpu, t: &Trainer, val: &Dataset) -> anyhow::Result<Summary> {
    let w = t.weights()?;
    let model = MedFastSam::new(gpu, &w, &t.ps.cfg, t.ps.variant)?;
    let ev = evaluate(gpu, &model, val, false, |_, _| {})?;
    Ok(Summary::from_scores(ev.iter().map(|e| &e.scores)))
}

pub fn run(gpu: &GpuArgs, a: &TrainArgs) -> anyhow::Result<i32> {
    std::fs::create_dir_all(&a.out).map_err(|e| anyhow::anyhow!("{}: {e}", a.out.display()))?;
    let ckpt = a.out.join("checkpoint.safetensors");
    let split: Split = a.split.parse()?;
    let train = open_split(&a.data, a.format, split)?;
    let val = match &a.val {
        Some(v) => Some(open_split(v, a.format, Split::Val).or_else(|_| open_split(v, a.format, Split::All))?),
        None if split != Split::Val => open_split(&a.data, a.format, Split::Val).ok(),
        None => None,
    };
    let gpu = gpu.open()?;
    let mut t = if let Some(r) = &a.resume {
        let p = if r.is_empty() { ckpt.clone() } else { PathBuf::from(r) };
        let mut t = Trainer::resume(&gpu, &p)?;
        if a.epochs != t.opts.epochs {
            t.opts.epochs = a.epochs;
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
        let (weights, cfg) = match &a.weights {
            Some(w) => {
                let m = ModelArgs { weights: w.clone(), config: a.config.clone(), variant: None, size: a.size };
                let (w, c, _) = m.load()?;
                (w, c)
            }
            None => {
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
            lr: a.lr,
            weight_decay: a.weight_decay,
            mode: TrainMode::parse(&a.mode)?,
            augment: a.augment,
            seed: a.seed,
            checkpoint_every: a.checkpoint_every,
        };
        Trainer::new(&gpu, &weights, &cfg, variant, opts)?
    };
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
        val.as_ref().map(|v| format!("{} images", v.len())).unwrap_or_else(|| "none".into())
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
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps {msg} [{elapsed_precise}<{eta_precise}]")
            .unwrap(),
    );
    bar.set_position(t.progress.step.min(total_steps));
    let mut steps_here = 0u64;
    while t.progress.epoch < t.opts.epochs {
        let epoch = t.progress.epoch;
        let t_epoch = Instant::now();
        let mut sums = [0f64; 3];
        let mut count = 0usize;
        while t.progress.step_in_epoch < spe {
            let k = t.progress.step_in_epoch;
            let ts = Instant::now();
            let micro = t.batch_examples(&train, epoch, k)?;
            let l = t.step(&micro)?;
            for i in 0..3 {
                sums[i] += l[i] as f64;
            }
            count += 1;
            steps_here += 1;
            let ips = (t.opts.batch * t.opts.accum) as f64 / ts.elapsed().as_secs_f64();
            bar.set_message(format!("epoch {}/{} loss {:.4} {:.2} img/s", epoch + 1, t.opts.epochs, l[0], ips));
            bar.inc(1);
            let every = t.opts.checkpoint_every;
            let interrupted = INTERRUPTED.load(Ordering::SeqCst);
            let stop = a.max_steps.is_some_and(|m| steps_here >= m);
            if interrupted || stop || (every > 0 && t.progress.step % every as u64 == 0) {
                t.save_checkpoint(&ckpt)?;
            }
            if interrupted {
                bar.abandon();
                eprintln!("checkpoint written to {}; continue with --resume", ckpt.display());
                return Ok(130);
            }
            if stop {
                bar.abandon();
                eprintln!("stopped after {steps_here} steps; checkpoint {}", ckpt.display());
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
            let s = validate(&gpu, &t, v)?;
            rec["val_miou"] = s.mean_iou.into();
            rec["val_dice"] = s.mean_dice.into();
            if t.progress.best_val_dice.is_none_or(|b| s.mean_dice > b) {
                t.progress.best_val_dice = Some(s.mean_dice);
                t.progress.best_epoch = Some(epoch + 1);
                t.weights()?.save(&a.out.join("best.safetensors"), &t.ps.cfg, t.ps.variant, false)?;
            }
            super::bar_line(Some(&bar), format!(
                "epoch {}: train loss {:.4}, val mIoU {:.4} Dice {:.4} (best Dice {:.4} at epoch {})",
                epoch + 1,
                sums[0] / count.max(1) as f64,
                s.mean_iou,
                s.mean_dice,
                t.progress.best_val_dice.unwrap_or(f64::NAN),
                t.progress.best_epoch.unwrap_or(0)
            ));
        } else {
            super::bar_line(Some(&bar), format!("epoch {}: train loss {:.4}", epoch + 1, sums[0] / count.max(1) as f64));
        }
        writeln!(log, "{rec}").map_err(|e| anyhow::anyhow!("log.jsonl: {e}"))?;
        t.save_checkpoint(&ckpt)?;
    }
    bar.finish();
    let fin = a.out.join("final.safetensors");
    t.weights()?.save(&fin, &t.ps.cfg, t.ps.variant, false)?;
    eprintln!("done: {} (checkpoint {}, log {})", fin.display(), ckpt.display(), a.out.join("log.jsonl").display());
    Ok(0)
}
