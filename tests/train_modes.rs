//! Training modes: `semi` freezes the natural-knowledge branch (no gradient buffers, weights and
//! BatchNorm statistics unchanged by a step) while the med branch, the prompt encoder and the
//! decoder train; `full` updates everything including the running statistics. Also: gradient
//! accumulation over two micro-batches equals one step on the whole batch.

use medfastsam::io::RgbImage;
use medfastsam::model::{Config, Variant, Weights};
use medfastsam::rng::Rng;
use medfastsam::testutil::test_gpu;
use medfastsam::train::params::TrainMode;
use medfastsam::train::trainer::{Example, TrainOptions, Trainer};

fn examples(n: usize, s: usize, seed: u64) -> Vec<Example> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|i| {
            let data: Vec<u8> = (0..s * s * 3).map(|_| rng.below(256) as u8).collect();
            let mask: Vec<u8> = (0..s * s).map(|p| ((p / s + i) % 7 < 3) as u8).collect();
            Example {
                id: format!("{i}"),
                image: RgbImage {
                    width: s,
                    height: s,
                    data,
                },
                mask,
            }
        })
        .collect()
}

fn snapshot(t: &Trainer) -> std::collections::BTreeMap<String, Vec<f32>> {
    t.weights()
        .unwrap()
        .tensors
        .into_iter()
        .map(|(k, v)| (k, v.data))
        .collect()
}

#[test]
fn semi_mode_freezes_the_natural_branch() {
    let gpu = test_gpu();
    let cfg = Config::tiny().with_image_size(64).unwrap();
    let w = Weights::init(&cfg, 11);
    let opts = TrainOptions {
        batch: 2,
        lr: 1e-2,
        mode: TrainMode::Semi,
        ..TrainOptions::default()
    };
    let mut t = Trainer::new(gpu, &w, &cfg, Variant::Paper, opts).unwrap();
    let (tuned, total) = t.ps.counts();
    assert!(tuned < total);
    assert!(
        t.ps.grads
            .keys()
            .all(|k| !k.starts_with("image_encoder.") || k.contains("med"))
    );
    assert!(
        t.ps.grads
            .contains_key("image_encoder.layers.1.blocks.0.mlp_med.fc1.weight")
    );
    let before = snapshot(&t);
    t.step(&[examples(2, 64, 1)]).unwrap();
    let after = snapshot(&t);
    let mut changed_med = 0;
    for (k, v) in &before {
        let natural = k.starts_with("image_encoder.") && !k.contains("med");
        if natural {
            assert_eq!(v, &after[k], "{k}: frozen tensor changed in semi mode");
        } else if v != &after[k] {
            changed_med += 1;
        }
    }
    assert!(
        after["image_encoder.layers.1.blocks.0.mlp_med.fc1.weight"]
            != before["image_encoder.layers.1.blocks.0.mlp_med.fc1.weight"]
    );
    assert!(
        after["mask_decoder.concat_conv2.0.weight"] != before["mask_decoder.concat_conv2.0.weight"]
    );
    assert!(changed_med > 50, "{changed_med} trainable tensors changed");
}

#[test]
fn full_mode_updates_everything_and_accumulation_matches_a_full_batch() {
    let gpu = test_gpu();
    let cfg = Config::tiny().with_image_size(64).unwrap();
    let w = Weights::init(&cfg, 12);
    let ex = examples(4, 64, 2);
    // One step on a batch of 4.
    let opts = TrainOptions {
        batch: 4,
        lr: 1e-3,
        ..TrainOptions::default()
    };
    let mut a = Trainer::new(gpu, &w, &cfg, Variant::Released, opts).unwrap();
    let before = snapshot(&a);
    a.step(std::slice::from_ref(&ex)).unwrap();
    let after = snapshot(&a);
    assert!(
        after["image_encoder.patch_embed.seq.0.c.weight"]
            != before["image_encoder.patch_embed.seq.0.c.weight"]
    );
    assert!(
        after["image_encoder.layers.0.blocks.0.conv1.bn.running_mean"]
            != before["image_encoder.layers.0.blocks.0.conv1.bn.running_mean"]
    );
    // In the released variant the med attention gets no gradient, so Adam leaves it unchanged.
    assert_eq!(
        after["image_encoder.layers.1.blocks.0.attn.med_qkv.weight"],
        before["image_encoder.layers.1.blocks.0.attn.med_qkv.weight"]
    );
    let counter = a.weights().unwrap().tensors["image_encoder.layers.0.blocks.0.conv1.bn.num_batches_tracked"].data[0];
    assert_eq!(counter, 1.0);

    // Gradient accumulation: two micro-batches of 2 with the loss gradient scaled by 1/2. With
    // BatchNorm in eval mode (semi) the forward does not depend on how the batch is split, and the
    // Dice term is a per-image mean, so the accumulated gradient equals the full batch's up to f32
    // rounding.
    let opts = TrainOptions {
        batch: 4,
        lr: 1e-3,
        mode: TrainMode::Semi,
        ..TrainOptions::default()
    };
    let mut full = Trainer::new(gpu, &w, &cfg, Variant::Paper, opts.clone()).unwrap();
    full.step(std::slice::from_ref(&ex)).unwrap();
    let opts2 = TrainOptions {
        batch: 2,
        accum: 2,
        ..opts
    };
    let mut acc = Trainer::new(gpu, &w, &cfg, Variant::Paper, opts2).unwrap();
    acc.step(&[ex[..2].to_vec(), ex[2..].to_vec()]).unwrap();
    // The gradient buffers still hold this step's (accumulated) gradients.
    let mut worst = (String::new(), 0f64);
    for (k, g) in &full.ps.grads {
        let gf = gpu.read(g).unwrap();
        let ga = gpu.read(&acc.ps.grads[k]).unwrap();
        let scale = gf.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
        if scale < 1e-9 {
            continue;
        }
        let e = gf
            .iter()
            .zip(&ga)
            .fold(0f64, |m, (x, y)| m.max((*x as f64 - *y as f64).abs()))
            / scale;
        if e > worst.1 {
            worst = (k.clone(), e);
        }
    }
    assert!(
        worst.1 < 1e-4,
        "accumulated gradient of {} differs from the full batch's by {:.2e}",
        worst.0,
        worst.1
    );
}
