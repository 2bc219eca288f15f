//! `medfastsam eval`: the paper's evaluation protocol — per image, binary prediction (logit > 0) vs
//! binary ground truth at the model input size S×S, foreground IoU and Dice (and HD95), then the
//! mean over images; per-image CSV. Works zero-shot on any dataset layout.

use super::{GpuArgs, ModelArgs};
use clap::Args;
use medfastsam::io;
use medfastsam::model::MedFastSam;
use medfastsam::train::datasets::{Dataset, Format, Split};
use medfastsam::train::metrics::{self, Summary};
use medfastsam::train::trainer::{evaluate, evaluate_otsu};
use std::path::PathBuf;

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Dataset folder.
    #[arg(long)]
    pub data: PathBuf,
    /// Dataset layout: isic2018|ph2|monuseg|tnbc|generic|authors.
    #[arg(long)]
    pub format: Format,
    /// Split to evaluate (test, val, train, all).
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Skip HD95 (faster).
    #[arg(long)]
    pub no_hd95: bool,
    /// Also score the Otsu coarse prompt alone.
    #[arg(long)]
    pub otsu: bool,
    /// Output folder for scores.csv (and the predicted masks with --save-masks).
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long)]
    pub save_masks: bool,
}

fn print_summary(what: &str, s: &Summary) {
    let hd = s.mean_hd95.map(|h| format!(", HD95 {h:.2} px ({} images)", s.n_hd95)).unwrap_or_default();
    println!(
        "{what}: {} images, mIoU {:.4} (sd {:.4}), Dice {:.4} (sd {:.4}){hd}",
        s.n, s.mean_iou, s.std_iou, s.mean_dice, s.std_dice
    );
}

pub fn run(gpu: &GpuArgs, a: &EvalArgs) -> anyhow::Result<i32> {
    let split: Split = a.split.parse()?;
    let data = Dataset::open(&a.data, a.format, split)?;
    if data.is_empty() {
        anyhow::bail!("{}: no images in split {}", a.data.display(), split.name());
    }
    let (weights, cfg, variant) = a.model.load()?;
    let gpu = gpu.open()?;
    let model = MedFastSam::new(&gpu, &weights, &cfg, variant)?;
    drop(weights);
    let s = cfg.image_size;
    if let Some(o) = &a.out {
        std::fs::create_dir_all(o).map_err(|e| anyhow::anyhow!("{}: {e}", o.display()))?;
    }
    eprintln!("evaluating {} images of {} ({}) at {s}x{s}, {} variant", data.len(), a.data.display(), a.format, variant.name());
    let bar = indicatif::ProgressBar::new(data.len() as u64);
    let mut save_err = None;
    let ev = evaluate(&gpu, &model, &data, !a.no_hd95, |_, e| {
        bar.inc(1);
        if let (true, Some(o)) = (a.save_masks, &a.out) {
            let m = io::GrayImage { width: s, height: s, data: e.pred.iter().map(|&v| v * 255).collect() };
            let r = io::encode_png_gray(&m).and_then(|png| io::write_atomic(&o.join(format!("{}_mask.png", e.id)), &png));
            if let Err(err) = r {
                save_err.get_or_insert(err);
            }
        }
    })?;
    bar.finish_and_clear();
    if let Some(e) = save_err {
        return Err(e.into());
    }
    let rows: Vec<(String, metrics::Scores)> = ev.iter().map(|e| (e.id.clone(), e.scores.clone())).collect();
    let sum = Summary::from_scores(rows.iter().map(|r| &r.1));
    print_summary("Med-FastSAM", &sum);
    if a.otsu {
        let ot = evaluate_otsu(&gpu, &model, &data, !a.no_hd95)?;
        print_summary("Otsu coarse prompt alone", &Summary::from_scores(ot.iter().map(|e| &e.scores)));
    }
    if let Some(o) = &a.out {
        let p = o.join("scores.csv");
        metrics::write_csv(&p, &rows)?;
        eprintln!("per-image scores: {}", p.display());
    }
    Ok(0)
}
