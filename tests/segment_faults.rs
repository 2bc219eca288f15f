//! `segment` under faults (issue: hostile inputs): inputs whose outputs would collide, sizes that
//! cannot fit, weights that overflow f32, an unwritable output folder, a device lost mid-folder,
//! and the memory guard's estimate against the buffer pool's measured peaks.

mod common;

use common::cli::{Run, files_in, run_split, run_split_env, tmpdir};
use common::*;
use medfastsam::model::{Config, MedFastSam, Variant, Weights, memory};
use medfastsam::testutil::test_gpu;
use std::path::Path;

fn assert_failed_with(r: &Run, needle: &str) {
    let out = r.all();
    assert_ne!(r.code, 0, "expected failure:\n{out}");
    assert!(!out.contains("panicked"), "panic:\n{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("error:") && l.contains(needle)),
        "no error line mentioning '{needle}':\n{out}"
    );
}

fn tiny_weights() -> String {
    fixtures_dir()
        .join("tiny.weights.safetensors")
        .to_string_lossy()
        .into_owned()
}

/// A small RGB image with a bright disc whose position depends on `k` (so outputs differ).
fn write_image(path: &Path, k: u32) {
    let (w, h) = (48u32, 40u32);
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        let (dx, dy) = (x as i32 - 12 - 4 * k as i32, y as i32 - 20);
        let v = if dx * dx + dy * dy < 64 {
            220
        } else {
            30 + (k as u8) * 10
        };
        image::Rgb([v, v / 2, v])
    });
    img.save(path).unwrap();
}

fn decode_mask(p: &Path) -> Vec<u8> {
    image::open(p).unwrap().to_luma8().into_raw()
}

#[test]
fn inputs_sharing_a_stem_get_distinct_deterministic_outputs() {
    let d = tmpdir("stems");
    for sub in ["a", "b"] {
        std::fs::create_dir_all(d.join(sub)).unwrap();
    }
    let inputs = [
        d.join("a/case.png"),
        d.join("b/case.png"),
        d.join("case.jpg"),
        d.join("other.png"),
    ];
    for (k, p) in inputs.iter().enumerate() {
        write_image(p, k as u32);
    }
    let out = d.join("out");
    let ins: Vec<String> = inputs
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let mut args = vec!["segment"];
    args.extend(ins.iter().map(|s| s.as_str()));
    let w = tiny_weights();
    let o = out.to_string_lossy().into_owned();
    args.extend(["--weights", &w, "--size", "64", "--out", &o]);
    let r = run_split(&args);
    assert_eq!(r.code, 0, "{}", r.all());
    let want = [
        "a_case_png_mask.png",
        "a_case_png_overlay.png",
        "b_case_png_mask.png",
        "b_case_png_overlay.png",
        "case_jpg_mask.png",
        "case_jpg_overlay.png",
        "other_mask.png",
        "other_overlay.png",
    ];
    assert_eq!(files_in(&out), want);
    assert!(
        r.all().contains("share a file name stem"),
        "the renaming is said: {}",
        r.all()
    );
    // Each output belongs to its own input: segmenting one input alone gives the same mask.
    let solo = d.join("solo");
    let s = solo.to_string_lossy().into_owned();
    let r = run_split(&[
        "segment",
        &ins[1],
        "--weights",
        &w,
        "--size",
        "64",
        "--out",
        &s,
    ]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(
        decode_mask(&solo.join("case_mask.png")),
        decode_mask(&out.join("b_case_png_mask.png"))
    );
    assert_ne!(
        decode_mask(&out.join("a_case_png_mask.png")),
        decode_mask(&out.join("b_case_png_mask.png"))
    );
    // Deterministic: the same command names the outputs the same way again.
    let r = run_split(&args);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(files_in(&out), want);
}

#[test]
fn sizes_that_cannot_fit_are_refused_before_any_allocation() {
    let d = tmpdir("size");
    let img = d.join("x.png");
    write_image(&img, 0);
    let out = d.join("out");
    let (i, w, o) = (
        img.to_string_lossy().into_owned(),
        tiny_weights(),
        out.to_string_lossy().into_owned(),
    );
    for size in ["20000", "100000"] {
        let before = children_max_rss_kib();
        let r = run_split(&["segment", &i, "--weights", &w, "--size", size, "--out", &o]);
        assert_ne!(r.code, 0, "--size {size}: {}", r.all());
        assert!(!r.all().contains("panicked"), "{}", r.all());
        assert!(
            r.all().lines().any(|l| l.starts_with("error:")),
            "{}",
            r.all()
        );
        let after = children_max_rss_kib();
        // The child never grew past a few hundred MiB (the former behaviour: 4.3 GB at 20000,
        // an abort on a 30 GB allocation at 100000).
        assert!(
            after.max(before) < 1 << 20,
            "--size {size}: peak RSS of a child {after} KiB"
        );
        assert!(files_in(&out).is_empty(), "{:?}", files_in(&out));
    }
    // The guard names the estimate and the limit (an explicit limit makes this independent of the
    // machine's memory).
    let r = run_split_env(
        &[
            "segment",
            &i,
            "--weights",
            &w,
            "--size",
            "1024",
            "--out",
            &o,
        ],
        &[("MEDFASTSAM_MAX_MEMORY", "64M")],
    );
    assert_failed_with(&r, "not enough memory");
    assert!(r.all().contains("MEDFASTSAM_MAX_MEMORY"), "{}", r.all());
}

/// Largest resident set of any waited-for child so far, in KiB.
fn children_max_rss_kib() -> i64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    ru.ru_maxrss
}

#[test]
fn weights_that_overflow_f32_are_an_error_not_an_empty_mask() {
    let d = tmpdir("huge");
    let mut w = Weights::load(&fixtures_dir().join("tiny.weights.safetensors")).unwrap();
    for t in w.tensors.values_mut() {
        for v in &mut t.data {
            *v *= 1e15;
        }
    }
    let cfg = Config::tiny();
    let wp = d.join("huge.safetensors");
    w.save(&wp, &cfg, Variant::Paper, false).unwrap();
    let img = d.join("x.png");
    write_image(&img, 1);
    let out = d.join("out");
    let r = run_split(&[
        "segment",
        &img.to_string_lossy(),
        "--weights",
        &wp.to_string_lossy(),
        "--size",
        "64",
        "--out",
        &out.to_string_lossy(),
    ]);
    assert_failed_with(&r, "non-finite logits");
    assert!(
        r.all()
            .lines()
            .any(|l| l.starts_with("error:") && l.contains("x.png")),
        "names the image: {}",
        r.all()
    );
    assert!(
        files_in(&out).is_empty(),
        "no mask from NaN logits: {:?}",
        files_in(&out)
    );
}

#[test]
fn an_unusable_output_folder_is_found_before_the_first_forward() {
    let d = tmpdir("unwritable");
    let img = d.join("x.png");
    write_image(&img, 0);
    let blocker = d.join("not-a-folder");
    std::fs::write(&blocker, b"a file where the output folder should be").unwrap();
    let out = blocker.join("out");
    let r = run_split(&[
        "segment",
        &img.to_string_lossy(),
        "--weights",
        &tiny_weights(),
        "--out",
        &out.to_string_lossy(),
    ]);
    assert_failed_with(&r, "not-a-folder");
    assert!(
        !r.all().contains("adapter:"),
        "failed before opening the GPU: {}",
        r.all()
    );
    assert_eq!(
        std::fs::read(&blocker).unwrap(),
        b"a file where the output folder should be"
    );
}

#[test]
fn a_device_lost_mid_folder_keeps_what_was_written_and_names_the_image() {
    let d = tmpdir("lost");
    let inputs = d.join("in");
    std::fs::create_dir_all(&inputs).unwrap();
    for k in 0..3 {
        write_image(&inputs.join(format!("img{k}.png")), k);
    }
    let out = d.join("out");
    let r = run_split_env(
        &[
            "segment",
            &inputs.to_string_lossy(),
            "--weights",
            &tiny_weights(),
            "--size",
            "64",
            "--out",
            &out.to_string_lossy(),
        ],
        &[("MEDFASTSAM_TEST_LOSE_DEVICE_AFTER", "1")],
    );
    assert_failed_with(&r, "img1.png");
    assert!(r.all().contains("device was lost"), "{}", r.all());
    assert!(r.all().contains("1 not attempted"), "{}", r.all());
    // The image done before the loss stays written, complete and decodable; nothing else.
    assert_eq!(files_in(&out), vec!["img0_mask.png", "img0_overlay.png"]);
    assert_eq!(decode_mask(&out.join("img0_mask.png")).len(), 48 * 40);
}

/// The memory guard's estimate is an upper bound of what the buffer pool really allocates, and
/// not a wild one (within 2x), for eval forwards and training steps of both presets.
#[test]
fn memory_estimates_bound_the_measured_peaks() {
    use medfastsam::train::trainer::{Example, TrainOptions, Trainer};
    let gpu = test_gpu();
    for (preset, size) in [("tiny", 64), ("tiny", 128), ("paper", 256)] {
        let cfg = Config::preset(preset)
            .unwrap()
            .with_image_size(size)
            .unwrap();
        gpu.trim_pool();
        gpu.reset_peak();
        let w = Weights::init(&cfg, 1);
        let model = MedFastSam::new(gpu, &w, &cfg, Variant::Paper).unwrap();
        let px: Vec<u32> = (0..size * size)
            .map(|i| (i as u32).wrapping_mul(2654435761) & 0xFF_FFFF)
            .collect();
        let px = gpu.upload_u32(&px, &[1, size, size]).unwrap();
        let mut rec = gpu.new_recorder();
        let out = model.forward(&mut rec, &px, false).unwrap();
        rec.submit().unwrap();
        gpu.read(&out.threshold).unwrap();
        let measured = gpu.pool_stats().peak_allocated;
        let est = memory::forward(&cfg, 1, 0, 0).device;
        println!("forward {preset} {size}²: measured {measured} B, estimate {est} B");
        assert!(
            est >= measured,
            "forward {preset} {size}²: estimate {est} < measured {measured}"
        );
        assert!(
            est <= 2 * measured,
            "forward {preset} {size}²: estimate {est} > 2 x measured {measured}"
        );
        drop((out, model, px));
    }
    for (preset, size, batch) in [("tiny", 128, 2), ("paper", 128, 2)] {
        let cfg = Config::preset(preset)
            .unwrap()
            .with_image_size(size)
            .unwrap();
        gpu.trim_pool();
        gpu.reset_peak();
        let w = Weights::init(&cfg, 1);
        let opts = TrainOptions {
            batch,
            ..TrainOptions::default()
        };
        let mut t = Trainer::new(gpu, &w, &cfg, Variant::Paper, opts).unwrap();
        let micro = vec![
            (0..batch)
                .map(|i| Example {
                    id: format!("{i}"),
                    image: medfastsam::io::RgbImage {
                        width: size,
                        height: size,
                        data: (0..size * size * 3)
                            .map(|k| (k * 31 + i * 7) as u8)
                            .collect(),
                    },
                    mask: (0..size * size)
                        .map(|k| ((k / size + k % size) % 2) as u8)
                        .collect(),
                })
                .collect::<Vec<_>>(),
        ];
        t.step(&micro).unwrap();
        let measured = gpu.pool_stats().peak_allocated;
        let est = memory::train_step(&cfg, batch).device;
        println!("train {preset} {size}² batch {batch}: measured {measured} B, estimate {est} B");
        assert!(
            est >= measured,
            "train {preset} {size}²: estimate {est} < measured {measured}"
        );
        assert!(
            est <= 2 * measured,
            "train {preset} {size}²: estimate {est} > 2 x measured {measured}"
        );
    }
}
