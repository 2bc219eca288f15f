//! Parity on the paper configuration at 1024² with f16 weights (fixtures `full.*`, read from the
//! folder named by MEDFASTSAM_FIXTURES; listed as ignored without it). End to end for both variants,
//! and the decoder fed the recorded embedding and coarse mask.

mod common;

use common::*;
use medfastsam::model::{Config, MedFastSam, Variant, Weights};
use medfastsam::testutil::test_gpu;

fn run(v: Variant) {
    let dir = full_fixtures();
    let gpu = test_gpu();
    let w = Weights::load(&dir.join("full.weights.f16.safetensors")).unwrap();
    // The file has no metadata: the configuration is inferred from the shapes and must be the preset.
    let cfg = w.resolve_config(None, 1024).unwrap();
    assert_eq!(cfg, Config::paper());
    let model = MedFastSam::new(gpu, &w, &cfg, v).unwrap();
    let fwd = Fixture::open(dir.join("full.forward.safetensors"));
    let p = v.name();
    let k = |s: &str| format!("{p}.{s}");
    let nhwc = |key: &str| {
        let s = fwd.shape(key);
        (
            nchw_to_nhwc(&fwd.f32(key), &s),
            vec![s[0], s[2], s[3], s[1]],
        )
    };
    let px = pack_rgb(&fwd.u8("image"));
    let px = gpu.upload_u32(&px, &[1, 1024, 1024]).unwrap();

    let t0 = std::time::Instant::now();
    let mut rec = gpu.new_recorder();
    let out = model.forward(&mut rec, &px, true).unwrap();
    // Decoder fed the recorded embedding and low-res coarse mask.
    let (e, es) = nhwc(&k("encoder.embedding"));
    let emb = gpu.upload(&e, &es).unwrap();
    let (ml, mls) = nhwc(&k("otsu.mask_lowres"));
    let dense = model
        .cp_encode(&mut rec, &gpu.upload(&ml, &mls).unwrap())
        .unwrap();
    let pe = model.dense_pe(&mut rec, 64, 64).unwrap();
    let (tok, img) = model.two_way(&mut rec, &emb, &dense, &pe).unwrap();
    let (r2, r1) = (
        out.stages.get("msf.r2").unwrap().clone(),
        out.stages.get("msf.r1").unwrap().clone(),
    );
    let low = model.mask_head(&mut rec, &tok, &img, &r1, &r2).unwrap();
    rec.submit().unwrap();
    let thr = gpu.read(&out.threshold).unwrap();
    eprintln!(
        "{p}: forward + decoder recorded and run in {:.1} s",
        t0.elapsed().as_secs_f64()
    );

    assert_eq!(thr, fwd.f32(&k("otsu.threshold")), "{p}: Otsu threshold");
    let ml_got = gpu
        .read(out.stages.get("otsu.mask_lowres").unwrap())
        .unwrap();
    let differ = ml_got
        .iter()
        .zip(&ml)
        .filter(|(a, b)| (*a - *b).abs() > 1e-6)
        .count();
    eprintln!(
        "{p}: Otsu threshold {thr:?} exact; {differ} of {} low-res mask values differ",
        ml.len()
    );
    assert!(differ as f64 <= 0.001 * ml.len() as f64);

    let check = |name: &str, got: &medfastsam::gpu::Tensor, want: &[f32], tol: f64| {
        let g = gpu.read(got).unwrap();
        let err = rel(&g, want);
        eprintln!("{p}: {name:<36} rel err {err:.2e}");
        assert!(
            err <= tol,
            "{p}: {name} relative error {err:.3e} > {tol:.0e}"
        );
    };
    check(
        "encoder.embedding (end to end)",
        out.stages.get("encoder.embedding").unwrap(),
        &e,
        1e-3,
    );
    check(
        "decoder.tokens (end to end)",
        out.stages.get("decoder.tokens").unwrap(),
        &fwd.f32(&k("decoder.tokens")),
        1e-3,
    );
    check(
        "decoder.tokens (fed recorded)",
        &tok,
        &fwd.f32(&k("decoder.tokens")),
        1e-3,
    );
    check(
        "decoder.lowres_logits (fed recorded)",
        &low,
        &nhwc(&k("decoder.lowres_logits")).0,
        2e-3,
    );
    check(
        "decoder.lowres_logits (end to end)",
        &out.lowres_logits,
        &nhwc(&k("decoder.lowres_logits")).0,
        2e-3,
    );
    check(
        "logits (end to end)",
        &out.logits,
        &nhwc(&k("logits")).0,
        2e-3,
    );
}

#[test]
#[cfg_attr(
    not(full_fixtures),
    ignore = "needs MEDFASTSAM_FIXTURES (folder with full.*.safetensors)"
)]
fn full_paper_parity() {
    run(Variant::Paper);
}

#[test]
#[cfg_attr(
    not(full_fixtures),
    ignore = "needs MEDFASTSAM_FIXTURES (folder with full.*.safetensors)"
)]
fn full_released_parity() {
    run(Variant::Released);
}
