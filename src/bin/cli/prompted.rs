//! `segment` with MobileSAM / LiteMedSAM weights: point and box prompts in original pixel
//! coordinates (`--box`, `--point`, `--prompts FILE`), `--multimask`, and `--auto-boxes otsu`
//! (boxes from the Otsu coarse mask's connected components: a prompt-free baseline from a
//! pretrained SAM with no training). The encoder runs once per image, the decoder once per batch of
//! prompts with as many points (every box: two corners; `PromptSegmenter::decode_many`);
//! the masks of an image's prompts are merged (union) into `<base>_mask.png`.

use super::GpuArgs;
use super::segment::{SegmentArgs, check_writable, is_device_lost, write_all_atomic};
use clap::Args;
use medfastsam::io::{self, GrayImage};
use medfastsam::model::sam::{MaskChoice, Prompt};
use medfastsam::model::{Config, Weights};
use medfastsam::segment::{PromptSegmenter, otsu_boxes};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args, Clone, Default)]
pub struct PromptArgs {
    /// Box prompt x0,y0,x1,y1 in original pixels (MobileSAM/LiteMedSAM weights); repeat for
    /// several objects, each decoded on its own.
    #[arg(long = "box", value_name = "X0,Y0,X1,Y1", value_parser = parse_box)]
    pub boxes: Vec<[f32; 4]>,
    /// Point prompt x,y[,fg|bg] in original pixels (default fg); all points form one prompt
    /// (with the first --box, if any).
    #[arg(long = "point", value_name = "X,Y[,fg|bg]", value_parser = parse_point)]
    pub points: Vec<(f32, f32, bool)>,
    /// Per-image prompts: JSON {"<file name>": [{"box": [x0,y0,x1,y1]}, {"points": [[x,y,1], ...]}], ...}
    /// (label 1 foreground, 0 background).
    #[arg(long, value_name = "FILE")]
    pub prompts: Option<PathBuf>,
    /// Write every mask token's mask (<base>_p<k>_m<i>.png) and print their IoU predictions.
    #[arg(long)]
    pub multimask: bool,
    /// Prompt-free baseline: one box per connected component of the Otsu coarse mask ("otsu").
    #[arg(long, value_name = "otsu")]
    pub auto_boxes: Option<String>,
}

impl PromptArgs {
    pub fn any(&self) -> bool {
        !self.boxes.is_empty()
            || !self.points.is_empty()
            || self.prompts.is_some()
            || self.multimask
            || self.auto_boxes.is_some()
    }
}

fn numbers(s: &str, n: usize, what: &str) -> Result<Vec<f32>, String> {
    let v: Vec<&str> = s.split(',').map(str::trim).collect();
    if v.len() != n {
        return Err(format!(
            "{what} needs {n} comma-separated numbers, got {s:?}"
        ));
    }
    v.iter()
        .map(|t| {
            t.parse::<f32>()
                .ok()
                .filter(|x| x.is_finite())
                .ok_or_else(|| format!("{t:?} is not a number"))
        })
        .collect()
}

fn parse_box(s: &str) -> Result<[f32; 4], String> {
    let v = numbers(s, 4, "a box")?;
    if v[2] < v[0] || v[3] < v[1] {
        return Err(format!("box {s:?}: x1 < x0 or y1 < y0"));
    }
    Ok([v[0], v[1], v[2], v[3]])
}

fn parse_point(s: &str) -> Result<(f32, f32, bool), String> {
    let parts: Vec<&str> = s.split(',').map(str::trim).collect();
    let (xy, fg) = match parts.as_slice() {
        [_, _] => (s.to_string(), true),
        [x, y, l] => (
            format!("{x},{y}"),
            match *l {
                "fg" | "1" => true,
                "bg" | "0" => false,
                o => return Err(format!("point label {o:?} (expected fg or bg)")),
            },
        ),
        _ => return Err(format!("a point is x,y or x,y,fg|bg, got {s:?}")),
    };
    let v = numbers(&xy, 2, "a point")?;
    Ok((v[0], v[1], fg))
}

/// Prompts of one image from a prompts file's entry.
fn prompts_from_json(v: &serde_json::Value, file: &str) -> anyhow::Result<Vec<Prompt>> {
    let list = v
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("{file}: each image's entry must be a list of prompts"))?;
    let num = |x: &serde_json::Value| -> anyhow::Result<f32> {
        x.as_f64()
            .filter(|v| v.is_finite())
            .map(|v| v as f32)
            .ok_or_else(|| anyhow::anyhow!("{file}: {x} is not a number"))
    };
    let mut out = Vec::new();
    for p in list {
        let mut prompt = Prompt::default();
        if let Some(b) = p.get("box") {
            let b = b
                .as_array()
                .filter(|b| b.len() == 4)
                .ok_or_else(|| anyhow::anyhow!("{file}: a box is [x0, y0, x1, y1]"))?;
            prompt.bbox = Some([num(&b[0])?, num(&b[1])?, num(&b[2])?, num(&b[3])?]);
        }
        if let Some(pts) = p.get("points") {
            for q in pts
                .as_array()
                .ok_or_else(|| anyhow::anyhow!("{file}: points is a list of [x, y, label]"))?
            {
                let q = q
                    .as_array()
                    .filter(|q| q.len() == 2 || q.len() == 3)
                    .ok_or_else(|| anyhow::anyhow!("{file}: a point is [x, y] or [x, y, label]"))?;
                let fg = q.get(2).map(|l| l.as_i64() != Some(0)).unwrap_or(true);
                prompt.points.push((num(&q[0])?, num(&q[1])?, fg));
            }
        }
        if prompt.bbox.is_none() && prompt.points.is_empty() {
            anyhow::bail!("{file}: a prompt needs \"box\" or \"points\"");
        }
        out.push(prompt);
    }
    Ok(out)
}

pub fn run(
    gpu: &GpuArgs,
    a: &SegmentArgs,
    files: &[PathBuf],
    names: &[String],
    weights: Weights,
    cfg: Config,
) -> anyhow::Result<i32> {
    let p = &a.prompts;
    let auto = match p.auto_boxes.as_deref() {
        None => false,
        Some("otsu") => true,
        Some(o) => anyhow::bail!("--auto-boxes {o}: the only method is otsu"),
    };
    let file_prompts: Option<serde_json::Value> = match &p.prompts {
        Some(f) => {
            let text =
                std::fs::read_to_string(f).map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
            Some(
                serde_json::from_str(&text)
                    .map_err(|e| anyhow::anyhow!("{}: not JSON: {e}", f.display()))?,
            )
        }
        None => None,
    };
    // Prompts from the command line: each box alone, except that points join the first box.
    let mut cli: Vec<Prompt> = p
        .boxes
        .iter()
        .map(|b| Prompt {
            points: vec![],
            bbox: Some(*b),
        })
        .collect();
    if !p.points.is_empty() {
        match cli.first_mut() {
            Some(first) => first.points = p.points.clone(),
            None => cli.push(Prompt {
                points: p.points.clone(),
                bbox: None,
            }),
        }
    }
    if cli.is_empty() && file_prompts.is_none() && !auto {
        anyhow::bail!(
            "{}: {} weights segment what a prompt points at: give --box, --point, --prompts FILE or --auto-boxes otsu",
            a.model.weights.display(),
            cfg.arch.name()
        );
    }
    check_writable(&a.out)?;
    let gpu = gpu.open()?;
    let t0 = Instant::now();
    let seg = PromptSegmenter::with_precision(&gpu, &weights, &cfg, a.precision.precision)?;
    let precision = a.precision.precision.resolve(&gpu);
    drop(weights);
    eprintln!(
        "model: {} at {}x{}, {} weights on device ({:.1} MB) in {:.0} ms",
        cfg.arch.name(),
        cfg.image_size,
        cfg.image_size,
        precision.name(),
        seg.model.device_bytes() as f64 / 1e6,
        t0.elapsed().as_secs_f64() * 1e3
    );
    let choice = MaskChoice::Auto;
    let (mut failures, mut done, mut skipped) = (0, 0, 0);
    let mut manifest = a.open_manifest()?;
    for (f, base) in files.iter().zip(names) {
        let t = Instant::now();
        let outputs = super::segment::expected_outputs(a, base, true);
        if super::batch::skip_if_done(&mut manifest, a.skip_existing, f, &outputs)? {
            skipped += 1;
            println!("{}: skipped (its outputs exist)", f.display());
            continue;
        }
        let res = (|| -> anyhow::Result<String> {
            let img = io::load_rgb(f)?;
            let name = f
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let mut prompts = cli.clone();
            if let Some(fp) = &file_prompts {
                let entry = fp.get(&name).or_else(|| fp.get(super::segment::stem(f)));
                if let Some(e) = entry {
                    let src = p.prompts.as_ref().map(|x| x.display().to_string());
                    prompts.extend(prompts_from_json(e, &src.unwrap_or_default())?);
                }
            }
            if auto {
                let boxes =
                    otsu_boxes(&gpu, &img).map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
                prompts.extend(boxes.into_iter().map(|b| Prompt {
                    points: vec![],
                    bbox: Some(b),
                }));
            }
            if prompts.is_empty() {
                anyhow::bail!("{}: no prompt for this image", f.display());
            }
            let enc = seg
                .encode(&img)
                .map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
            let mut union = vec![f32::NEG_INFINITY; img.width * img.height];
            let mut files_out: Vec<(PathBuf, Vec<u8>)> = Vec::new();
            let mut scores = Vec::new();
            let answers = seg
                .decode_many(&enc, &prompts, choice, p.multimask)
                .map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
            for ((k, pr), m) in prompts.iter().enumerate().zip(answers) {
                let m = m.map_err(|(k, e)| anyhow::anyhow!("{}: prompt {k}: {e}", f.display()))?;
                for (u, &v) in union.iter_mut().zip(&m.logits) {
                    *u = u.max(v);
                }
                scores.push(serde_json::json!({
                    "prompt": k,
                    "box": pr.bbox,
                    "points": pr.points,
                    "iou": m.iou,
                    "chosen": m.chosen,
                }));
                if p.multimask {
                    for (i, l) in m.all.iter().enumerate() {
                        let g = to_mask(l, img.width, img.height);
                        files_out.push((
                            a.out.join(format!("{base}_p{k}_m{i}.png")),
                            io::encode_png_gray(&g)?,
                        ));
                    }
                }
            }
            let mask = to_mask(&union, img.width, img.height);
            files_out.push((
                a.out.join(format!("{base}_mask.png")),
                io::encode_png_gray(&mask)?,
            ));
            files_out.push((
                a.out.join(format!("{base}_overlay.png")),
                io::encode_png_rgb(&io::overlay(&img, &mask, a.opacity))?,
            ));
            files_out.push((
                a.out.join(format!("{base}_prompts.json")),
                serde_json::to_vec_pretty(&scores)?,
            ));
            let refs: Vec<(&std::path::Path, &[u8])> = files_out
                .iter()
                .map(|(p, b)| (p.as_path(), b.as_slice()))
                .collect();
            write_all_atomic(&refs)?;
            let fg = mask.data.iter().filter(|&&v| v > 0).count() as f64 / mask.data.len() as f64;
            Ok(format!(
                "{}: {}x{}, {} prompts -> {} ({:.1}% foreground) in {:.0} ms",
                f.display(),
                img.width,
                img.height,
                prompts.len(),
                a.out.join(format!("{base}_mask.png")).display(),
                fg * 100.0,
                t.elapsed().as_secs_f64() * 1e3
            ))
        })();
        super::batch::record_result(&mut manifest, f, &outputs, &res, t.elapsed().as_secs_f64())?;
        match res {
            Ok(m) => {
                done += 1;
                println!("{m}");
            }
            Err(e) => {
                failures += 1;
                eprintln!("error: {e:#}");
                if is_device_lost(&e) {
                    break;
                }
            }
        }
    }
    eprintln!(
        "{done} of {} images segmented{} in {:.1} s",
        files.len(),
        if skipped > 0 {
            format!(", {skipped} skipped (outputs exist)")
        } else {
            String::new()
        },
        t0.elapsed().as_secs_f64()
    );
    Ok(if failures > 0 { 1 } else { 0 })
}

fn to_mask(logits: &[f32], w: usize, h: usize) -> GrayImage {
    GrayImage {
        width: w,
        height: h,
        data: logits
            .iter()
            .map(|&v| if v > 0.0 { 255 } else { 0 })
            .collect(),
    }
}
