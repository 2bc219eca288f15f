//! Tiled inference (`medfastsam::tile`, `Segmenter::segment_tiled`, `segment --tile`): the window
//! layout covers every pixel with the overlap asked for; the blending weights are a partition of
//! unity; a window's logits come out bit for bit where it alone covers the image (against the model
//! run on that crop; within 1e-4 when windows are batched); no seam shows on a smooth image; one global Otsu threshold equals the f64
//! reference's; the command line tiles large images by default and refuses bad options.

mod common;

use common::cli::{repo, run, s, tmpdir};
use medfastsam::io::{self, RgbImage};
use medfastsam::model::{Config, Weights};
use medfastsam::segment::{Segmenter, TileOptions};
use medfastsam::testutil::test_gpu;
use medfastsam::tile::{Blender, TilePlan, axis_weights, starts};

#[test]
fn windows_cover_the_axis_with_the_overlap_asked_for() {
    for len in [1, 5, 255, 256, 257, 300, 511, 512, 513, 1000, 4097] {
        for tile in [16, 64, 256] {
            for overlap in [0, 1, tile / 8, tile / 4, tile / 2] {
                let st = starts(len, tile, overlap);
                let span = tile.min(len);
                assert_eq!(st[0], 0);
                assert_eq!(
                    st.last().unwrap() + span,
                    len.max(span),
                    "{len} {tile} {overlap}"
                );
                for w in st.windows(2) {
                    assert!(w[1] > w[0], "{st:?}");
                    assert!(
                        w[0] + span >= w[1] + overlap,
                        "{len} {tile} {overlap}: {st:?} share less than the overlap"
                    );
                }
                // evenly spread: steps differ by at most one pixel
                let steps: Vec<usize> = st.windows(2).map(|w| w[1] - w[0]).collect();
                if let (Some(a), Some(b)) = (steps.iter().min(), steps.iter().max()) {
                    assert!(b - a <= 1, "{steps:?}");
                }
                // the fewest windows: one fewer would not keep the overlap
                if st.len() > 2 {
                    let n = st.len() - 1;
                    let step = (len - tile) as f64 / (n - 1) as f64;
                    assert!(
                        tile as f64 - step < overlap as f64,
                        "{len} {tile} {overlap}"
                    );
                }
            }
        }
    }
}

#[test]
fn weights_are_a_partition_of_unity() {
    for (len, tile, overlap) in [
        (1000, 256, 32),
        (513, 256, 128),
        (257, 256, 0),
        (700, 64, 8),
    ] {
        let st = starts(len, tile, overlap);
        let w = axis_weights(&st, tile, len);
        for p in 0..len {
            let cover: Vec<usize> = (0..st.len())
                .filter(|&i| p >= st[i] && p < st[i] + tile.min(len))
                .collect();
            let sum: f64 = cover.iter().map(|&i| w[i][p - st[i]] as f64).sum();
            match cover.len() {
                1 => assert_eq!(sum, 1.0, "{len} {tile} {overlap} pixel {p}"),
                2 => assert!(
                    (sum - 1.0).abs() < 1e-6,
                    "{len} {tile}: pixel {p} sums {sum}"
                ),
                _ => assert!(sum > 0.0),
            }
        }
    }
}

/// Blending identical values gives the value: a smooth field cut into windows comes back whole,
/// every row once and in order.
#[test]
fn the_blender_reassembles_a_field() {
    let (w, h, s) = (700, 530, 128);
    let f = |x: usize, y: usize| (x as f32 * 0.013).sin() * 3.0 + (y as f32 * 0.007).cos();
    let plan = TilePlan::new(w, h, s, 24).unwrap();
    let mut b = Blender::new(&plan);
    let mut rows = Vec::new();
    for iy in 0..plan.ys.len() {
        for ix in (0..plan.xs.len()).rev() {
            let l: Vec<f32> = (0..s * s)
                .map(|i| f(plan.xs[ix] + i % s, plan.ys[iy] + i / s))
                .collect();
            b.add(ix, iy, &l);
        }
        b.finish_row(iy, |y, row| {
            let worst = (0..w)
                .map(|x| (row[x] - f(x, y)).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-5, "row {y}: {worst}");
            rows.push(y);
            Ok(())
        })
        .unwrap();
    }
    assert_eq!(rows, (0..h).collect::<Vec<_>>());
}

fn tiny() -> (Weights, Config) {
    let cfg = Config::from_file(&repo("tests/data/fixtures/tiny.config.json")).unwrap();
    let w = Weights::load(&repo("tests/data/fixtures/tiny.weights.safetensors")).unwrap();
    (w, cfg)
}

/// The 512² nuclei image widened to 600×512 by mirroring its left edge (non-square, three windows
/// across).
fn nuclei_600() -> RgbImage {
    let img = io::load_rgb(&repo("data/dsb2018-nuclei/image.tif")).unwrap();
    let mut data = Vec::with_capacity(600 * 512 * 3);
    for y in 0..512 {
        for x in 0..600 {
            let sx = (x as usize).abs_diff(88);
            let p = (y * 512 + sx) * 3;
            data.extend_from_slice(&img.data[p..p + 3]);
        }
    }
    RgbImage {
        width: 600,
        height: 512,
        data,
    }
}

#[test]
fn a_window_alone_is_the_model_on_its_crop_bit_for_bit() {
    let gpu = test_gpu();
    let (w, cfg) = tiny();
    let s = cfg.image_size;
    let seg = Segmenter::new(gpu, &w, Some(&cfg), None).unwrap();
    let img = nuclei_600();
    for (global_otsu, batch) in [(false, 1), (false, 3), (true, 2)] {
        let opts = TileOptions {
            overlap: 32,
            global_otsu,
            batch,
        };
        let mut out = vec![f32::NAN; img.width * img.height];
        let mut tiles = 0;
        let stats = seg
            .segment_tiled(
                &img,
                &opts,
                |y, row, rgb| {
                    // the image row that goes with the logits row
                    assert_eq!(rgb, &img.data[y * img.width * 3..(y + 1) * img.width * 3]);
                    out[y * img.width..(y + 1) * img.width].copy_from_slice(row);
                    Ok(())
                },
                |done, total| {
                    assert!(done <= total);
                    tiles = done;
                },
            )
            .unwrap();
        let plan = TilePlan::new(img.width, img.height, s, 32).unwrap();
        assert_eq!((stats.tiles, tiles), (plan.count(), plan.count()));
        assert_eq!(plan.xs.len(), 3);
        assert!(out.iter().all(|v| v.is_finite()));
        if global_otsu {
            // one threshold, the f64 reference's Otsu of the whole image
            let (ts, _, _) = medfastsam::ops::reference::otsu::otsu(
                &img.packed(),
                1,
                img.height,
                img.width,
                medfastsam::ops::otsu::OtsuRule::Paper,
            );
            assert_eq!(stats.global_t, Some(ts[0] as u32));
            continue;
        }
        // Every window against the model on its crop, where no other window reaches.
        let (mut own, mut total_checked) = (0, 0);
        for iy in 0..plan.ys.len() {
            for ix in 0..plan.xs.len() {
                let (x0, y0) = (plan.xs[ix], plan.ys[iy]);
                let alone = |x: usize, y: usize| {
                    let covers = |i: usize, j: usize| {
                        x >= plan.xs[i]
                            && x < plan.xs[i] + s
                            && y >= plan.ys[j]
                            && y < plan.ys[j] + s
                    };
                    (0..plan.ys.len())
                        .flat_map(|j| (0..plan.xs.len()).map(move |i| (i, j)))
                        .filter(|&(i, j)| covers(i, j))
                        .count()
                        == 1
                };
                let want = seg
                    .logits_at_model_size(&plan.window(&img, ix, iy))
                    .unwrap();
                let mut checked = 0;
                for y in y0..y0 + s {
                    for x in x0..x0 + s {
                        if alone(x, y) {
                            let (g, e) = (out[y * img.width + x], want[(y - y0) * s + x - x0]);
                            if batch == 1 {
                                assert_eq!(
                                    g.to_bits(),
                                    e.to_bits(),
                                    "window {ix},{iy} pixel {x},{y}"
                                );
                            } else {
                                // batched windows take other GEMM tilings: same values to f32 rounding
                                assert!(
                                    (g - e).abs() <= 1e-4 * (1.0 + e.abs()),
                                    "batch {batch}: window {ix},{iy} pixel {x},{y}: {g} vs {e}"
                                );
                            }
                            checked += 1;
                        }
                    }
                }
                // (on 512 rows the middle row of windows is covered by its neighbours everywhere)
                own += (checked > 0) as usize;
                total_checked += checked;
            }
        }
        assert_eq!(own, 6, "windows with pixels of their own");
        assert!(
            total_checked > 600 * 512 / 3,
            "{total_checked} pixels checked"
        );
    }
}

/// On a smooth image the blended logits jump across a seam no more than inside a window: the
/// largest step between horizontal neighbours at seam columns is at most 1.5× the largest step
/// elsewhere (plus 0.05 logit).
#[test]
fn no_seam_on_a_smooth_image() {
    let gpu = test_gpu();
    let (w, cfg) = tiny();
    let s = cfg.image_size;
    let seg = Segmenter::new(gpu, &w, Some(&cfg), None).unwrap();
    let (iw, ih) = (520, 300);
    let mut data = Vec::with_capacity(iw * ih * 3);
    for y in 0..ih {
        for x in 0..iw {
            let v = 128.0 + 60.0 * ((x as f64) / 90.0).sin() * ((y as f64) / 70.0).cos();
            data.extend_from_slice(&[v as u8, (v * 0.8) as u8, (255.0 - v) as u8]);
        }
    }
    let img = RgbImage {
        width: iw,
        height: ih,
        data,
    };
    let opts = TileOptions {
        overlap: 64,
        global_otsu: true,
        batch: 2,
    };
    let mut out = vec![0f32; iw * ih];
    seg.segment_tiled(
        &img,
        &opts,
        |y, row, _| {
            out[y * iw..(y + 1) * iw].copy_from_slice(row);
            Ok(())
        },
        |_, _| {},
    )
    .unwrap();
    let plan = TilePlan::new(iw, ih, s, 64).unwrap();
    // seam columns: where a window begins or ends inside the image
    let mut seams = std::collections::BTreeSet::new();
    for &x0 in &plan.xs[1..] {
        seams.insert(x0);
    }
    for &x0 in &plan.xs[..plan.xs.len() - 1] {
        seams.insert(x0 + s);
    }
    let (mut at_seam, mut elsewhere) = (0f32, 0f32);
    for y in 0..ih {
        for x in 1..iw {
            let d = (out[y * iw + x] - out[y * iw + x - 1]).abs();
            if seams.contains(&x) {
                at_seam = at_seam.max(d);
            } else {
                elsewhere = elsewhere.max(d);
            }
        }
    }
    println!("largest step: at seams {at_seam:.4}, elsewhere {elsewhere:.4}");
    assert!(
        at_seam <= 1.5 * elsewhere + 0.05,
        "{at_seam} vs {elsewhere}"
    );
}

#[test]
fn segment_tiles_large_images_by_default() {
    let d = tmpdir("tiles-cli");
    let w = repo("tests/data/fixtures/tiny.weights.safetensors");
    let cfg = repo("tests/data/fixtures/tiny.config.json");
    let img = repo("data/dsb2018-nuclei/image.tif");
    let base = ["segment", s(&img), "--weights", s(&w), "--config", s(&cfg)];
    let with = |extra: &[&str], out: &str| {
        let mut a: Vec<&str> = base.to_vec();
        a.extend_from_slice(extra);
        a.push("--out");
        let o = d.join(out);
        let o = o.to_str().unwrap().to_string();
        let (code, text) = run(&[a.as_slice(), &[o.as_str()]].concat());
        (code, text, d.join(out).join("image_mask.png"))
    };
    // 512² with a 256² model: windows, a 512² mask
    let (code, text, m) = with(&[], "tiled");
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("windows of 256x256") && text.contains("Otsu per window"),
        "{text}"
    );
    let mask = io::load_gray(&m).unwrap();
    assert_eq!((mask.width, mask.height), (512, 512));
    // --resize: the whole-image path, equal to Segmenter::segment
    let (code, text, m) = with(&["--resize"], "resized");
    assert_eq!(code, 0, "{text}");
    assert!(!text.contains("windows"), "{text}");
    let gpu = test_gpu();
    let (wt, c) = tiny();
    let seg = Segmenter::new(gpu, &wt, Some(&c), None).unwrap();
    let want = seg.segment(&io::load_rgb(&img).unwrap()).unwrap();
    assert_eq!(io::load_gray(&m).unwrap().data, want.mask.data);
    // --global-otsu and --scale
    let (code, text, m) = with(&["--global-otsu", "--scale", "0.75"], "scaled");
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("global Otsu") && text.contains("scale 0.75"),
        "{text}"
    );
    assert_eq!(io::load_gray(&m).unwrap().width, 512);
    // bad options are refused before anything is written
    for (extra, msg) in [
        (&["--overlap", "200"][..], "at most half the tile"),
        (&["--resize", "--overlap", "8"][..], "--resize turns it off"),
        (&["--scale", "0"][..], "a factor in (0, 16]"),
    ] {
        let (code, text, m) = with(extra, "bad");
        assert!(code != 0 && text.contains(msg), "{extra:?}: {text}");
        assert!(!m.exists());
    }
}
