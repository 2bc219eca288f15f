//! `medfastsam quickstart`: trains the `tiny` preset on the real fluorescence nuclei image shipped
//! in `data/dsb2018-nuclei` (2018 Data Science Bowl, CC0) on whatever adapter exists — three 256²
//! quadrants train, the fourth is held out — then compares the trained model with the Otsu coarse
//! prompt alone on the held-out quadrant, and writes the weights and an overlay.

use super::GpuArgs;
use super::train::{INTERRUPTED, on_ctrl_c};
use clap::Args;
use medfastsam::io::{self, GrayImage, RgbImage};
use medfastsam::model::{Config, MedFastSam, Variant, Weights};
use medfastsam::rng::Rng;
use medfastsam::train::metrics::Summary;
use medfastsam::train::params::TrainMode;
use medfastsam::train::trainer::{
    Example, MemorySource, Source, TrainOptions, Trainer, evaluate, evaluate_otsu,
};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Instant;

const IMAGE: &[u8] = include_bytes!("../../../data/dsb2018-nuclei/image.tif");
const LABELS: &[u8] = include_bytes!("../../../data/dsb2018-nuclei/labels.tif");

#[derive(Args)]
pub struct QuickstartArgs {
    /// Output folder.
    #[arg(long, default_value = "quickstart-out")]
    pub out: PathBuf,
    /// Optimiser steps (100 take about 3.5 minutes on 2 CPU cores with lavapipe).
    #[arg(long, default_value_t = 100)]
    pub steps: usize,
    /// Stop training early after this many minutes (the evaluation still runs), so the quickstart
    /// stays under 10 minutes on slow machines.
    #[arg(long, default_value_t = 8.5)]
    pub minutes: f64,
    #[arg(long, default_value_t = 2e-3)]
    pub lr: f32,
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value = "paper")]
    pub variant: String,
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

fn summary_line(what: &str, s: &Summary) -> String {
    format!("{what:<34} Dice {:.4}  IoU {:.4}", s.mean_dice, s.mean_iou)
}

pub fn run(gpu: &GpuArgs, a: &QuickstartArgs) -> anyhow::Result<i32> {
    let t_all = Instant::now();
    let image = io::decode_rgb(IMAGE, "data/dsb2018-nuclei/image.tif")?;
    let labels = io::decode_gray(LABELS, "data/dsb2018-nuclei/labels.tif")?;
    let mask: Vec<u8> = labels.data.iter().map(|&v| (v > 0) as u8).collect();
    assert_eq!((image.width, image.height), (512, 512));
    std::fs::create_dir_all(&a.out).map_err(|e| anyhow::anyhow!("{}: {e}", a.out.display()))?;
    let cfg = Config::tiny();
    let s = cfg.image_size;
    let variant = Variant::parse(&a.variant)?;
    let gpu = gpu.open()?;
    let opts = TrainOptions {
        epochs: 1,
        batch: a.batch,
        accum: 1,
        lr: a.lr,
        weight_decay: 0.0,
        mode: TrainMode::Full,
        augment: true,
        seed: a.seed,
        checkpoint_every: 0,
    };
    let init = Weights::init(&cfg, a.seed);
    let mut t = Trainer::new(&gpu, &init, &cfg, variant, opts)?;
    let crops = Crops {
        image: image.clone(),
        mask: mask.clone(),
        per_epoch: a.batch * a.steps,
    };
    let held = GrayImage {
        width: 512,
        height: 512,
        data: mask.clone(),
    }
    .crop(256, 256, 256, 256);
    let held_img = image.crop(256, 256, 256, 256);
    let heldout = MemorySource(vec![Example::at_size(
        "held-out quadrant".into(),
        &held_img,
        &held.data,
        s,
    )]);
    let (tuned, total) = t.ps.counts();
    println!(
        "quickstart: tiny preset ({} parameters, {tuned} trained), {} variant, {s}² crops of 3 quadrants of a \
         512² fluorescence nuclei image, batch {}, Adam lr {}, {} steps",
        total,
        variant.name(),
        a.batch,
        a.lr,
        a.steps
    );
    on_ctrl_c();
    let bar = indicatif::ProgressBar::new(a.steps as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps {msg} [{elapsed_precise}<{eta_precise}]",
        )
        .unwrap(),
    );
    let t_train = Instant::now();
    let mut last = [0f32; 3];
    let mut done = 0;
    for k in 0..a.steps {
        let ts = Instant::now();
        let micro = t.batch_examples(&crops, 0, k)?;
        last = t.step(&micro)?;
        done += 1;
        bar.set_message(format!(
            "loss {:.4} {:.1} img/s",
            last[0],
            a.batch as f64 / ts.elapsed().as_secs_f64()
        ));
        bar.inc(1);
        if INTERRUPTED.load(Ordering::SeqCst) {
            super::bar_line(
                Some(&bar),
                "interrupted: evaluating what was trained so far",
            );
            break;
        }
        if t_train.elapsed().as_secs_f64() > a.minutes * 60.0 {
            super::bar_line(
                Some(&bar),
                format!("time budget reached after {done} steps"),
            );
            break;
        }
    }
    bar.finish_and_clear();
    let train_s = t_train.elapsed().as_secs_f64();
    // refused (nothing written) if training diverged to NaN or infinite weights
    let w = t.finite_weights()?;
    let model = MedFastSam::new(&gpu, &w, &cfg, variant)?;
    let ev = evaluate(&gpu, &model, &heldout, true, |_, _| {})?;
    let ot = evaluate_otsu(&gpu, &model, &heldout, true)?;
    let sm = Summary::from_scores(ev.iter().map(|e| &e.scores));
    let so = Summary::from_scores(ot.iter().map(|e| &e.scores));
    let wpath = a.out.join("tiny-nuclei.safetensors");
    w.save(&wpath, &cfg, variant, false)?;
    let pred = GrayImage {
        width: s,
        height: s,
        data: ev[0].pred.iter().map(|&v| v * 255).collect(),
    };
    io::write_atomic(
        &a.out.join("heldout_mask.png"),
        &io::encode_png_gray(&pred)?,
    )?;
    io::write_atomic(
        &a.out.join("heldout_overlay.png"),
        &io::encode_png_rgb(&io::overlay(&held_img, &pred, 0.45))?,
    )?;
    let otsu = GrayImage {
        width: s,
        height: s,
        data: ot[0].pred.iter().map(|&v| v * 255).collect(),
    };
    io::write_atomic(
        &a.out.join("heldout_otsu_overlay.png"),
        &io::encode_png_rgb(&io::overlay(&held_img, &otsu, 0.45))?,
    )?;
    println!(
        "trained {done} steps in {train_s:.0} s ({:.2} s/step), final training loss {:.4}",
        train_s / done.max(1) as f64,
        last[0]
    );
    println!(
        "held-out quadrant (256x256, {} nuclei pixels):",
        held.data.iter().filter(|&&v| v > 0).count()
    );
    println!("  {}", summary_line("trained Med-FastSAM (tiny)", &sm));
    println!("  {}", summary_line("Otsu coarse prompt alone", &so));
    let verdict = if sm.mean_dice > so.mean_dice {
        "beats"
    } else {
        "does NOT beat"
    };
    println!(
        "  the trained model {verdict} the coarse prompt (Dice {:+.4})",
        sm.mean_dice - so.mean_dice
    );
    println!(
        "wrote {} and {} (total {:.0} s)",
        wpath.display(),
        a.out.join("heldout_overlay.png").display(),
        t_all.elapsed().as_secs_f64()
    );
    Ok(0)
}
