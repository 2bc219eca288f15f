//! `medfastsam distill`: feature-level distillation (the paper's Eq. 1) of a teacher's image
//! embeddings into a student's natural branch and neck, on unlabelled images (docs/distill.md).
//!
//! Like `train`: progress bar, `log.jsonl` (one line per step), atomic checkpoints (weights, Adam
//! moments, position, teacher and image list) every `--checkpoint-every` steps, at the end and on
//! Ctrl-C / SIGTERM, `--resume` giving bit-identical weights, and nothing written from weights that
//! are not finite. Every input is checked (images' headers, the teacher, the embedding files, the
//! grids) before anything is written to the output folder.

use super::segment::{check_writable, collect_inputs};
use super::train::{INTERRUPTED, on_ctrl_c, remove_stale_temp_files};
use super::{GpuArgs, bar_line};
use clap::Args;
use medfastsam::gpu::Gpu;
use medfastsam::model::{Config, Variant, Weights};
use medfastsam::train::distill::{
    DistillOptions, DistillState, Distiller, Teacher, TeacherSpec, check_geometry, sha256_hex,
};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;

#[derive(Args)]
pub struct DistillArgs {
    /// Teacher weights file run by the engine (MobileSAM or LiteMedSAM as `medfastsam import`
    /// writes them, or a Med-FastSAM file).
    #[arg(long, conflicts_with = "teacher_embeddings")]
    pub teacher: Option<PathBuf>,
    /// Folder of precomputed teacher embeddings: `<image stem>.safetensors` per image, one tensor
    /// `embedding` [g, g, 256] (channels-last) or [256, g, g] / [1, 256, g, g] (channels-first),
    /// f32/f16/bf16.
    #[arg(long)]
    pub teacher_embeddings: Option<PathBuf>,
    /// Student weights file (its natural branch and neck are trained).
    #[arg(long, conflicts_with = "preset")]
    pub student: Option<PathBuf>,
    /// Preset of a new, randomly initialised student (paper, tiny, mobilesam, litemedsam).
    #[arg(long)]
    pub preset: Option<String>,
    /// Student input size S (multiple of 16); default: its configuration's. The student's grid
    /// (S/16) must equal the teacher's.
    #[arg(long)]
    pub size: Option<usize>,
    /// Student forward variant (Med-FastSAM): paper or released; default: the file's, else paper.
    #[arg(long)]
    pub variant: Option<String>,
    /// Unlabelled images: files and/or folders (PNG, JPEG, BMP, TIFF).
    #[arg(long, num_args = 1..)]
    pub images: Vec<PathBuf>,
    /// Optimiser steps in total [default: 1000]; with --resume, replaces the checkpoint's.
    #[arg(long)]
    pub steps: Option<u64>,
    /// Images per step [default: 4].
    #[arg(long)]
    pub batch: Option<usize>,
    /// Adam learning rate [default: 1e-4]; with --resume, replaces the checkpoint's.
    #[arg(long)]
    pub lr: Option<f32>,
    /// Seed of the initialisation (--preset) and of the image order [default: 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Steps between checkpoints (0: only at the end, on a stop and on Ctrl-C) [default: 100].
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Host memory for cached teacher embeddings, in MiB; beyond it they are recomputed (or
    /// re-read) at each use.
    #[arg(long, default_value_t = 4096)]
    pub teacher_cache_mib: usize,
    /// Continue from OUT/checkpoint.safetensors (or the given checkpoint); teacher, images and
    /// options come from it.
    #[arg(long, num_args = 0..=1, default_missing_value = "")]
    pub resume: Option<String>,
    /// Output folder: final.safetensors, checkpoint.safetensors, log.jsonl.
    #[arg(long)]
    pub out: PathBuf,
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

/// The teacher named by the arguments (or recorded in a checkpoint), checked against the student's
/// grid; `(teacher, spec, name)`.
fn open_teacher(
    gpu: &Gpu,
    spec: &TeacherSpec,
    images: &[PathBuf],
    student: (usize, usize),
    student_name: &str,
    budget: usize,
) -> anyhow::Result<Teacher> {
    match spec {
        TeacherSpec::Model { path, sha256 } => {
            let bytes =
                std::fs::read(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            let got = sha256_hex(&bytes);
            if !sha256.is_empty() && &got != sha256 {
                anyhow::bail!(
                    "{}: the teacher is not the file this run started with (SHA-256 {got}, recorded {sha256})",
                    path.display()
                );
            }
            let w = Weights::from_bytes(&bytes, &path.display().to_string())?;
            let t = Teacher::from_weights(gpu, &w, budget)?;
            let tc = t.config().expect("a model teacher has a configuration");
            let name = format!(
                "{}, {} at {}²",
                path.display(),
                tc.arch.name(),
                tc.image_size
            );
            check_geometry(t.geometry(), &name, student, student_name)?;
            Ok(t)
        }
        TeacherSpec::Embeddings { dir, sha256 } => {
            let t = Teacher::from_dir(dir, images, student.1, budget)?;
            let name = format!("embeddings in {}", dir.display());
            check_geometry(t.geometry(), &name, student, student_name)?;
            if !sha256.is_empty() && t.digest() != Some(sha256.as_str()) {
                anyhow::bail!(
                    "{}: the teacher embedding files are not those this run started with (SHA-256 {}, recorded {sha256})",
                    dir.display(),
                    t.digest().unwrap_or("")
                );
            }
            Ok(t)
        }
    }
}

/// The images, checked from their headers (format, pixel budget) before any work.
fn check_images(images: &[PathBuf]) -> anyhow::Result<()> {
    for p in images {
        medfastsam::io::load_dimensions(p)?;
    }
    Ok(())
}

pub fn run(gpu_args: &GpuArgs, a: &DistillArgs) -> anyhow::Result<i32> {
    let ckpt = a.out.join("checkpoint.safetensors");
    let given_images = if a.images.is_empty() {
        None
    } else {
        Some(collect_inputs(&a.images)?)
    };
    let given_teacher = match (&a.teacher, &a.teacher_embeddings) {
        (Some(p), _) => Some(TeacherSpec::Model {
            path: p.clone(),
            sha256: String::new(),
        }),
        (None, Some(d)) => Some(TeacherSpec::Embeddings {
            dir: d.clone(),
            sha256: String::new(),
        }),
        (None, None) => None,
    };
    let gpu;
    let mut d;
    let images: Vec<PathBuf>;
    let teacher_spec: TeacherSpec;
    let resumed: Option<PathBuf>;
    if let Some(r) = &a.resume {
        let p = if r.is_empty() {
            ckpt.clone()
        } else {
            PathBuf::from(r)
        };
        if !p.is_file() {
            anyhow::bail!("{}: no checkpoint to resume from", p.display());
        }
        gpu = gpu_args.open()?;
        let state: DistillState;
        (d, state) = Distiller::resume(&gpu, &p)?;
        images = match given_images {
            Some(g) => {
                let names = |v: &[PathBuf]| v.iter().map(|p| file_name(p)).collect::<Vec<_>>();
                if names(&g) != names(&state.images) {
                    anyhow::bail!(
                        "--images: {} images that differ from the {} this run started with (resuming exactly needs the same \
                         files in the same order; leave --images out to use the recorded ones)",
                        g.len(),
                        state.images.len()
                    );
                }
                g
            }
            None => state.images.clone(),
        };
        // The recorded teacher; a teacher given again (e.g. moved) must be the same (SHA-256).
        teacher_spec = match (given_teacher, &state.teacher) {
            (None, t) => t.clone(),
            (Some(TeacherSpec::Model { path, .. }), TeacherSpec::Model { sha256, .. }) => {
                TeacherSpec::Model {
                    path,
                    sha256: sha256.clone(),
                }
            }
            (Some(TeacherSpec::Embeddings { dir, .. }), TeacherSpec::Embeddings { sha256, .. }) => {
                TeacherSpec::Embeddings {
                    dir,
                    sha256: sha256.clone(),
                }
            }
            (Some(_), _) => anyhow::bail!(
                "{}: this run started with another kind of teacher (--teacher vs --teacher-embeddings)",
                p.display()
            ),
        };
        if let Some(s) = a.steps {
            d.opts.steps = s;
        }
        if let Some(lr) = a.lr.filter(|&lr| lr != d.opts.lr) {
            eprintln!(
                "learning rate {lr:e} instead of the checkpoint's {:e}",
                d.opts.lr
            );
            d.opts.lr = lr;
        }
        if let Some(c) = a.checkpoint_every {
            d.opts.checkpoint_every = c;
        }
        for (what, given, kept) in [
            ("--batch", a.batch.map(|v| v as u64), d.opts.batch as u64),
            ("--seed", a.seed, d.opts.seed),
        ] {
            if given.is_some_and(|g| g != kept) {
                anyhow::bail!(
                    "{what} differs from the checkpoint's ({kept}); a resumed run keeps the batch and the seed it started with"
                );
            }
        }
        eprintln!(
            "resumed {} at step {} of {}",
            p.display(),
            d.step,
            d.opts.steps
        );
        resumed = Some(p);
    } else {
        let Some(imgs) = given_images else {
            anyhow::bail!("no images: give --images FILES or FOLDERS (PNG, JPEG, BMP, TIFF)");
        };
        let Some(spec) = given_teacher else {
            anyhow::bail!(
                "no teacher: give --teacher WEIGHTS or --teacher-embeddings FOLDER (see docs/distill.md)"
            );
        };
        images = imgs;
        teacher_spec = spec;
        let seed = a.seed.unwrap_or(0);
        let (weights, mut cfg, variant) = match (&a.student, &a.preset) {
            (Some(p), _) => {
                let w = Weights::load(p)?;
                let cfg = w.resolve_config(None, 1024)?;
                let v = match &a.variant {
                    Some(v) => Variant::parse(v)?,
                    None => w.variant.unwrap_or_default(),
                };
                (Some(w), cfg, v)
            }
            (None, Some(preset)) => (
                None,
                Config::preset(preset)?,
                Variant::parse(a.variant.as_deref().unwrap_or("paper"))?,
            ),
            (None, None) => anyhow::bail!(
                "no student: give --student WEIGHTS or --preset paper|tiny|mobilesam|litemedsam"
            ),
        };
        if let Some(s) = a.size {
            cfg = cfg.with_image_size(s)?;
        }
        let weights = match weights {
            Some(w) => w,
            None => Weights::init(&cfg, seed),
        };
        check_images(&images)?;
        let opts = DistillOptions {
            steps: a.steps.unwrap_or(1000),
            batch: a.batch.unwrap_or(4),
            lr: a.lr.unwrap_or(1e-4),
            seed,
            checkpoint_every: a.checkpoint_every.unwrap_or(100),
        };
        gpu = gpu_args.open()?;
        d = Distiller::new(&gpu, &weights, &cfg, variant, opts)?;
        resumed = None;
    }
    let n = images.len();
    let student_name = match (&a.student, &a.preset, &resumed) {
        (_, _, Some(p)) => format!("{}", p.display()),
        (Some(p), _, _) => format!("{}", p.display()),
        (None, Some(pr), _) => format!("preset {pr}"),
        _ => "student".into(),
    };
    let student_name = format!(
        "{student_name}, {} at {}²",
        d.cfg().arch.name(),
        d.cfg().image_size
    );
    let mut teacher = open_teacher(
        &gpu,
        &teacher_spec,
        &images,
        d.geometry(),
        &student_name,
        a.teacher_cache_mib.saturating_mul(1 << 20),
    )?;
    // What the run records: the teacher with its digest.
    let (teacher_spec, teacher_name, teacher_sha) = match teacher_spec {
        TeacherSpec::Model { path, .. } => {
            let bytes =
                std::fs::read(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            let sha = sha256_hex(&bytes);
            let name = file_name(&path);
            (
                TeacherSpec::Model {
                    path,
                    sha256: sha.clone(),
                },
                name,
                sha,
            )
        }
        TeacherSpec::Embeddings { dir, .. } => {
            let sha = teacher.digest().unwrap_or_default().to_string();
            let name = format!("{}/ (embedding files)", file_name(&dir));
            (
                TeacherSpec::Embeddings {
                    dir,
                    sha256: sha.clone(),
                },
                name,
                sha,
            )
        }
    };
    // Everything is checked: only now is the output folder touched.
    check_writable(&a.out)?;
    remove_stale_temp_files(&a.out);
    on_ctrl_c();
    let (tuned, total) = d.ps.counts();
    let (g, dim) = d.geometry();
    eprintln!(
        "distilling {teacher_name} into {student_name}: {tuned} of {total} parameters tuned ({:.2} M / {:.2} M, \
         natural branch and neck); {n} images, embeddings {g}x{g}x{dim}, batch {}, lr {:e}, {} steps",
        tuned as f64 / 1e6,
        total as f64 / 1e6,
        d.opts.batch,
        d.opts.lr,
        d.opts.steps
    );
    // Teacher embeddings, once per image (cached in memory up to the budget).
    if teacher.config().is_some() {
        let bar = indicatif::ProgressBar::new(n as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("teacher embeddings {bar:30} {pos}/{len}")
                .unwrap(),
        );
        for (i, p) in images.iter().enumerate() {
            if INTERRUPTED.load(Ordering::SeqCst) {
                bar.abandon();
                eprintln!("interrupted before the first step: nothing written");
                return Ok(130);
            }
            if let Err(e) = teacher.embedding(&gpu, i, p) {
                bar.abandon();
                return Err(e.into());
            }
            bar.inc(1);
        }
        bar.finish_and_clear();
    }
    if !teacher.all_cached(n) {
        eprintln!(
            "teacher embeddings: {} MiB cached; the rest beyond --teacher-cache-mib {} are recomputed at each use",
            teacher.cached_bytes() >> 20,
            a.teacher_cache_mib
        );
    }
    teacher.release_model(n);
    let log_path = a.out.join("log.jsonl");
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(resumed.is_some())
        .truncate(resumed.is_none())
        .open(&log_path)
        .map_err(|e| anyhow::anyhow!("{}: {e}", log_path.display()))?;
    let total_steps = d.opts.steps;
    let bar = indicatif::ProgressBar::new(total_steps);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps {msg} [{elapsed_precise}<{eta_precise}]",
        )
        .unwrap(),
    );
    bar.set_position(d.step.min(total_steps));
    let s = d.cfg().image_size;
    let kept = |written: Option<u64>| match (written, &resumed) {
        (Some(st), _) => format!(
            "the checkpoint of step {st} is kept ({}); continue with --resume",
            ckpt.display()
        ),
        (None, Some(p)) => format!(
            "the checkpoint it resumed from is unchanged ({}); continue with --resume",
            p.display()
        ),
        (None, None) => "no checkpoint was written by this run".into(),
    };
    let mut written: Option<u64> = None;
    let start_step = d.step;
    while d.step < total_steps {
        let ts = Instant::now();
        let idx = d.batch_indices(n, d.step);
        let batch = (|| -> anyhow::Result<(Vec<medfastsam::io::RgbImage>, Vec<f32>)> {
            let mut ims = Vec::with_capacity(idx.len());
            let mut t = Vec::with_capacity(idx.len() * g * g * dim);
            for &i in &idx {
                ims.push(medfastsam::io::load_rgb(&images[i])?.resize(s, s));
                t.extend(teacher.embedding(&gpu, i, &images[i])?);
            }
            Ok((ims, t))
        })();
        let (ims, t) = match batch {
            Ok(b) => b,
            Err(e) => {
                // A file that became unreadable: the state after the last step is whole, keep it.
                bar.abandon();
                if d.step > start_step
                    && let Ok(()) = d.save_checkpoint(&ckpt, &teacher_spec, &images)
                {
                    written = Some(d.step);
                }
                anyhow::bail!("{e:#}; {}", kept(written));
            }
        };
        let loss = match d.step(&ims, &t) {
            Ok(l) => l,
            Err(e) => {
                bar.abandon();
                anyhow::bail!("{e}; {}", kept(written));
            }
        };
        let secs = ts.elapsed().as_secs_f64();
        let rec = serde_json::json!({"step": d.step, "loss": loss, "seconds": secs});
        writeln!(log, "{rec}").map_err(|e| anyhow::anyhow!("{}: {e}", log_path.display()))?;
        bar.set_message(format!("loss {loss:.4e} {secs:.2} s/step"));
        bar.inc(1);
        let every = d.opts.checkpoint_every;
        let interrupted = INTERRUPTED.load(Ordering::SeqCst);
        if interrupted || (every > 0 && d.step % every == 0 && d.step < total_steps) {
            d.save_checkpoint(&ckpt, &teacher_spec, &images)
                .map_err(|e| anyhow::anyhow!("{e}; {}", kept(written)))?;
            written = Some(d.step);
        }
        if interrupted {
            bar.abandon();
            eprintln!(
                "checkpoint of step {} written to {}; continue with --resume",
                d.step,
                ckpt.display()
            );
            return Ok(130);
        }
    }
    bar.finish();
    d.save_checkpoint(&ckpt, &teacher_spec, &images)
        .map_err(|e| anyhow::anyhow!("{e}; {}", kept(written)))?;
    let fin = a.out.join("final.safetensors");
    d.final_weights(&teacher_name, &teacher_sha, n)?
        .save(&fin, &d.ps.cfg, d.ps.variant, false)?;
    bar_line(
        Some(&bar),
        format!(
            "done: {} after {} steps, loss {} (checkpoint {}, log {})",
            fin.display(),
            d.step,
            d.last_loss
                .map_or("none".to_string(), |l| format!("{l:.4e}")),
            ckpt.display(),
            log_path.display()
        ),
    );
    Ok(0)
}
