//! The eval-mode forward of a model built on training parameters (validation during training,
//! BatchNorm with running statistics, not folded) gives the inference model's logits (BatchNorm
//! folded at load), for both variants and both training modes.

mod common;

use common::*;
use medfastsam::model::{Config, MedFastSam, Variant, Weights};
use medfastsam::testutil::test_gpu;
use medfastsam::train::params::{ParamStore, TrainMode};

#[test]
fn eval_on_training_parameters_matches_the_folded_inference_model() {
    let gpu = test_gpu();
    let cfg = Config::from_file(&fixtures_dir().join("tiny.config.json")).unwrap();
    let w = Weights::load(&fixtures_dir().join("tiny.weights.safetensors")).unwrap();
    let fx = Fixture::open(fixtures_dir().join("tiny.train.safetensors"));
    let s = fx.shape("image");
    let px = gpu
        .upload_u32(&pack_rgb(&fx.u8("image")), &[s[0], s[1], s[2]])
        .unwrap();
    for v in [Variant::Paper, Variant::Released] {
        let folded = MedFastSam::new(gpu, &w, &cfg, v).unwrap();
        for mode in [TrainMode::Full, TrainMode::Semi] {
            let ps = ParamStore::new(gpu, &w, &cfg, v, mode).unwrap();
            let on_params = MedFastSam::from_params(&ps).unwrap();
            assert_eq!(
                on_params.device_bytes(),
                0,
                "a model on the parameters uploads nothing"
            );
            let mut rec = gpu.new_recorder();
            let a = folded.forward(&mut rec, &px, false).unwrap();
            let b = on_params.forward(&mut rec, &px, false).unwrap();
            rec.submit().unwrap();
            let (a, b) = (gpu.read(&a.logits).unwrap(), gpu.read(&b.logits).unwrap());
            let e = rel(&b, &a);
            eprintln!("{} {}: logits rel err {e:.2e}", v.name(), mode.name());
            assert!(e <= 1e-5, "{}: {e:e}", v.name());
        }
    }
}
