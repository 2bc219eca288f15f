//! `medfastsam eval`: the paper's evaluation protocol — per image, binary prediction (logit > 0) vs
//! binary ground truth at the model input size S×S, foreground IoU and Dice (and HD95), then the
//! mean over images; per-image CSV. Works zero-shot on any dataset layout.
//!
//! MobileSAM and LiteMedSAM weights are evaluated with box prompts (`--auto-boxes otsu`: one box
//! per connected component of the Otsu coarse mask; `--gt-boxes`: one per connected component of
//! the ground truth, MedSAM's protocol), at each image's own resolution, with the same metrics.
//!
//! A sample that cannot be scored (a file that cannot be read, a mask of another size, logits
//! that are not finite) does not stop the others: they are scored and written, the unscored ones
//! are listed on stderr and in `unscored.csv`, and the exit status is non-zero.

use super::{GpuArgs, ModelArgs};
use clap::Args;
use medfastsam::io;
use medfastsam::model::MedFastSam;
use medfastsam::segment::{PromptSegmenter, coarse_prompt};
use medfastsam::train::datasets::{Dataset, Format, Split};
use medfastsam::train::metrics::{self, Summary};
use medfastsam::train::trainer::{
    BoxPrompts, Evaluated, evaluate_each, evaluate_otsu, evaluate_prompted,
};
use std::path::PathBuf;

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub precision: super::PrecisionArgs,
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
    /// MobileSAM/LiteMedSAM weights: one box prompt per connected component of the Otsu coarse
    /// mask ("otsu"), the prompt-free baseline.
    #[arg(long, value_name = "otsu", conflicts_with = "gt_boxes")]
    pub auto_boxes: Option<String>,
    /// MobileSAM/LiteMedSAM weights: one box prompt per connected component of the ground truth
    /// (MedSAM's protocol; an upper bound, the boxes come from the answer).
    #[arg(long)]
    pub gt_boxes: bool,
    #[command(flatten)]
    pub channel: super::ChannelArgs,
}

fn print_summary(what: &str, s: &Summary) {
    let hd = s
        .mean_hd95
        .map(|h| format!(", HD95 {h:.2} px ({} images)", s.n_hd95))
        .unwrap_or_default();
    println!(
        "{what}: {} images, mIoU {:.4} (sd {:.4}), Dice {:.4} (sd {:.4}){hd}",
        s.n, s.mean_iou, s.std_iou, s.mean_dice, s.std_dice
    );
}

/// `unscored.csv`: id and the error of each sample that could not be scored.
fn unscored_csv(rows: &[(String, String)]) -> String {
    let field = |s: &str| {
        if s.contains([',', '"', '\n', '\r']) {
            format!("\"{}\"", s.replace('"', "\"\""))
        } else {
            s.to_string()
        }
    };
    let mut out = String::from("id,error\n");
    for (id, e) in rows {
        out.push_str(&format!("{},{}\n", field(id), field(e)));
    }
    out
}

pub fn run(gpu: &GpuArgs, a: &EvalArgs) -> anyhow::Result<i32> {
    let split: Split = a.split.parse()?;
    if let Some(o) = &a.out {
        std::fs::create_dir_all(o).map_err(|e| anyhow::anyhow!("{}: {e}", o.display()))?;
        super::train::remove_stale_temp_files(o);
    }
    let data = Dataset::open(&a.data, a.format, split)?;
    if data.is_empty() {
        anyhow::bail!("{}: no images in split {}", a.data.display(), split.name());
    }
    let (weights, cfg, variant) = a.model.load()?;
    let channel = a
        .channel
        .resolve(super::trained_on(&weights, &a.model.weights)?.as_ref())?;
    if channel.0 != medfastsam::channel::Channel::Rgb {
        eprintln!(
            "channel: {}",
            medfastsam::channel::ChannelTransform::standard(channel.0).describe()
        );
    }
    let data = data.with_channel(channel);
    // Every sample checked first (headers, sizes, annotations): the bad ones are set aside.
    let check_bar = indicatif::ProgressBar::new(data.len() as u64);
    check_bar.set_style(
        indicatif::ProgressStyle::with_template("checking samples {bar:30} {pos}/{len}").unwrap(),
    );
    let bad = data.check_samples(|_| check_bar.inc(1));
    check_bar.finish_and_clear();
    // (id, error) of every sample not scored, in dataset order
    let mut unscored: Vec<(usize, String, String)> = bad
        .iter()
        .map(|(i, e)| (*i, data.samples[*i].id.clone(), e.to_string()))
        .collect();
    let mut good = data.clone();
    good.samples = data
        .samples
        .iter()
        .enumerate()
        .filter(|(i, _)| !bad.iter().any(|(b, _)| b == i))
        .map(|(_, s)| s.clone())
        .collect();
    let index_of: Vec<usize> = (0..data.len())
        .filter(|i| !bad.iter().any(|(b, _)| b == i))
        .collect();
    let boxes = match (a.auto_boxes.as_deref(), a.gt_boxes) {
        (None, false) => None,
        (Some("otsu"), _) => Some(BoxPrompts::Otsu),
        (Some(o), _) => anyhow::bail!("--auto-boxes {o}: the only method is otsu"),
        (None, true) => Some(BoxPrompts::GroundTruth),
    };
    let prompted = !cfg.arch.is_med_fastsam();
    let boxes = match (prompted, boxes) {
        (true, Some(b)) => Some(b),
        (true, None) => anyhow::bail!(
            "{}: {} weights segment what a prompt points at: evaluate them with --auto-boxes otsu \
             (one box per Otsu component, prompt-free) or --gt-boxes (one box per ground-truth object)",
            a.model.weights.display(),
            cfg.arch.name()
        ),
        (false, Some(_)) => anyhow::bail!(
            "{}: Med-FastSAM is prompt-free; --auto-boxes and --gt-boxes are for MobileSAM/LiteMedSAM weights",
            a.model.weights.display()
        ),
        (false, None) => None,
    };
    let gpu = gpu.open()?;
    let s = cfg.image_size;
    let count = if good.len() == data.len() {
        format!("{}", data.len())
    } else {
        format!("{} of {}", good.len(), data.len())
    };
    let bar = indicatif::ProgressBar::new(good.len() as u64);
    let mut save_err = None;
    let mut save = |e: &Evaluated| {
        if let (true, Some(o)) = (a.save_masks, &a.out) {
            let m = io::GrayImage {
                width: e.width,
                height: e.height,
                data: e.pred.iter().map(|&v| v * 255).collect(),
            };
            let r = io::encode_png_gray(&m)
                .and_then(|png| io::write_atomic(&o.join(format!("{}_mask.png", e.id)), &png));
            if let Err(err) = r {
                save_err.get_or_insert(err);
            }
        }
    };
    // Unresolved to the constructors (under auto a weight beyond f16's range stays f32); resolved
    // for the messages.
    let asked = a.precision.precision;
    let precision = asked.resolve(&gpu);
    let (ev, model_name, model) = if let Some(boxes) = boxes {
        let seg = PromptSegmenter::with_precision(&gpu, &weights, &cfg, asked)?;
        drop(weights);
        eprintln!(
            "evaluating {count} images of {} ({}) with {} at their own resolution ({} encoder at {s}x{s}, {} weights)",
            a.data.display(),
            a.format,
            boxes.name(),
            cfg.arch.name(),
            precision.name()
        );
        let mut n_boxes = 0usize;
        let ev = evaluate_prompted(
            &seg,
            good.len(),
            |i| {
                let (img, m) = good.load(i)?;
                Ok((good.samples[i].id.clone(), img, m))
            },
            boxes,
            !a.no_hd95,
            |_, e, k| {
                n_boxes += k;
                bar.inc(1);
                save(e);
            },
        );
        bar.finish_and_clear();
        eprintln!("{n_boxes} box prompts decoded");
        let mut ev = ev;
        for u in &mut ev.unscored {
            u.id = good.samples[u.index].id.clone();
        }
        (ev, format!("{} ({})", cfg.arch.name(), boxes.name()), None)
    } else {
        medfastsam::model::memory::check_forward(&gpu, &cfg, 1)?;
        let model = MedFastSam::with_precision(&gpu, &weights, &cfg, variant, asked)?;
        drop(weights);
        eprintln!(
            "evaluating {count} images of {} ({}) at {s}x{s}, {} variant, {} weights",
            a.data.display(),
            a.format,
            variant.name(),
            precision.name()
        );
        let ev = evaluate_each(&gpu, &model, &good, !a.no_hd95, |_, e| {
            bar.inc(1);
            save(e);
        });
        bar.finish_and_clear();
        (ev, "Med-FastSAM".to_string(), Some(model))
    };
    for u in &ev.unscored {
        unscored.push((index_of[u.index], u.id.clone(), u.error.to_string()));
    }
    unscored.sort_by_key(|u| u.0);
    for (_, _, e) in &unscored {
        eprintln!("not scored: {e}");
    }
    let rows: Vec<(String, metrics::Scores)> =
        ev.scored.iter().map(|e| (e.id.clone(), e.scores)).collect();
    // Write what was scored before anything else can fail.
    if let Some(o) = &a.out {
        let p = o.join("scores.csv");
        metrics::write_csv(&p, &rows)?;
        eprintln!("per-image scores: {}", p.display());
        let u = o.join("unscored.csv");
        if unscored.is_empty() {
            if u.exists() {
                std::fs::remove_file(&u).map_err(|e| anyhow::anyhow!("{}: {e}", u.display()))?;
            }
        } else {
            let list: Vec<(String, String)> = unscored
                .iter()
                .map(|(_, id, e)| (id.clone(), e.clone()))
                .collect();
            io::write_atomic(&u, unscored_csv(&list).as_bytes())?;
        }
    }
    if let Some(e) = save_err {
        return Err(e.into());
    }
    if !rows.is_empty() {
        print_summary(
            &model_name,
            &Summary::from_scores(rows.iter().map(|r| &r.1)),
        );
    }
    if let Some(e) = ev.stopped {
        anyhow::bail!(
            "{e} ({} of {} images scored before it)",
            rows.len(),
            data.len()
        );
    }
    if a.otsu && !rows.is_empty() {
        let ot = match &model {
            Some(model) => evaluate_otsu(&gpu, model, &good, !a.no_hd95)?,
            None => otsu_at_own_size(&gpu, &good, !a.no_hd95)?,
        };
        print_summary(
            "Otsu coarse prompt alone",
            &Summary::from_scores(ot.iter().map(|e| &e.scores)),
        );
    }
    if !unscored.is_empty() {
        let listed = a
            .out
            .as_ref()
            .map(|o| format!(" and in {}", o.join("unscored.csv").display()))
            .unwrap_or_default();
        let rest = match rows.len() {
            0 => "no image was scored".to_string(),
            k => format!("the scores are those of the other {k}"),
        };
        anyhow::bail!(
            "{} of {} images could not be scored (listed above{listed}); {rest}",
            unscored.len(),
            data.len()
        );
    }
    Ok(0)
}

/// The Otsu coarse mask alone, scored at each image's own resolution (the resolution at which the
/// prompt-based models are scored).
fn otsu_at_own_size(
    gpu: &medfastsam::gpu::Gpu,
    data: &Dataset,
    with_hd95: bool,
) -> anyhow::Result<Vec<Evaluated>> {
    let mut out = Vec::new();
    for i in 0..data.len() {
        let (img, gt) = data.load(i)?;
        let pred: Vec<u8> = coarse_prompt(gpu, &img)?.iter().map(|&f| f as u8).collect();
        out.push(Evaluated {
            id: data.samples[i].id.clone(),
            scores: metrics::scores(&pred, &gt, img.width, img.height, with_hd95),
            pred,
            width: img.width,
            height: img.height,
        });
    }
    Ok(out)
}
