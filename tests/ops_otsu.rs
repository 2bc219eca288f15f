//! Otsu coarse prompt (both rules) vs the authors' fixtures (tests/data, and the 1024² fixture when
//! MEDFASTSAM_FIXTURES is set) and vs the CPU f64 reference on synthetic images, including every
//! u8 colour and a histogram grid past 65,535 workgroups.

use medfastsam::gpu::Gpu;
use medfastsam::ops::elementwise::image_normalize;
use medfastsam::ops::otsu::{OtsuRule, otsu, otsu_chunked, otsu_histogram};
use medfastsam::ops::reference::otsu as reference;
use medfastsam::testutil::{Rng, test_gpu};
use safetensors::SafeTensors;

const RULES: [OtsuRule; 2] = [OtsuRule::Paper, OtsuRule::Released];

fn pack(r: u8, g: u8, b: u8) -> u32 {
    r as u32 | (g as u32) << 8 | (b as u32) << 16
}

/// Packs u8 RGB [.., 3] into 0xAABBGGRR words.
fn pack_rgb(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks_exact(3)
        .map(|c| pack(c[0], c[1], c[2]))
        .collect()
}

/// Runs the GPU op with the real normalised input: (thresholds, mask).
fn run_gpu(
    gpu: &Gpu,
    px: &[u32],
    b: usize,
    h: usize,
    w: usize,
    rule: OtsuRule,
    chunk: Option<usize>,
) -> (Vec<f32>, Vec<f32>) {
    let tpx = gpu.upload_u32(px, &[b, h, w]).unwrap();
    let mut rec = gpu.new_recorder();
    // The real normalised input where it fits one storage binding; otherwise (4 x 2048² x 3 f32
    // exceeds lavapipe's 128 MiB) an unwritten tensor of the right shape: otsu only checks its
    // shape, the grey values come exactly from the pixels.
    let xn = if (b * h * w * 12) as u64 <= gpu.limits.max_storage_buffer_binding_size {
        image_normalize(&mut rec, &tpx).unwrap()
    } else {
        gpu.empty(&[b, h, w, 3]).unwrap()
    };
    let (thr, mask) = match chunk {
        None => otsu(&mut rec, &tpx, &xn, rule).unwrap(),
        Some(c) => otsu_chunked(&mut rec, &tpx, &xn, rule, c).unwrap(),
    };
    assert_eq!(thr.shape, vec![b]);
    assert_eq!(mask.shape, vec![b, h, w, 1]);
    rec.submit().unwrap();
    (gpu.read(&thr).unwrap(), gpu.read(&mask).unwrap())
}

/// Compares with the f64 reference: thresholds bit-exact (t*/255 rounded to f32), mask exact.
fn check_vs_reference(
    what: &str,
    px: &[u32],
    b: usize,
    h: usize,
    w: usize,
    rule: OtsuRule,
    chunk: Option<usize>,
) {
    let gpu = test_gpu();
    let (thr, mask) = run_gpu(gpu, px, b, h, w, rule, chunk);
    let (ts, want_thr, want_mask) = reference::otsu(px, b, h, w, rule);
    for i in 0..b {
        assert_eq!(
            thr[i].to_bits(),
            (want_thr[i] as f32).to_bits(),
            "{what} {rule:?} image {i}: threshold {} (t = {}), want {} (t = {})",
            thr[i],
            thr[i] * 255.0,
            want_thr[i],
            ts[i]
        );
    }
    let diff = mask
        .iter()
        .zip(&want_mask)
        .filter(|(g, w)| **g as f64 != **w)
        .count();
    assert_eq!(diff, 0, "{what} {rule:?}: {diff} mask pixels differ");
    eprintln!("{what} {rule:?}: t* = {ts:?}, thresholds exact, 0 mask differences");
}

#[test]
fn otsu_tiny_fixture() {
    let gpu = test_gpu();
    let bytes = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/otsu_pe_tiny.safetensors"
    ))
    .unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let img = st.tensor("image").unwrap();
    assert_eq!(img.shape(), &[2, 256, 256, 3]);
    let px = pack_rgb(img.data());
    for rule in RULES {
        let v = if rule == OtsuRule::Paper {
            "paper"
        } else {
            "released"
        };
        let want_thr: Vec<f32> =
            bytemuck::pod_collect_to_vec(st.tensor(&format!("{v}.otsu.threshold")).unwrap().data());
        let want_mask = st
            .tensor(&format!("{v}.otsu.mask"))
            .unwrap()
            .data()
            .to_vec(); // u8 [2,1,256,256]
        let (thr, mask) = run_gpu(gpu, &px, 2, 256, 256, rule, None);
        for i in 0..2 {
            assert_eq!(
                thr[i].to_bits(),
                want_thr[i].to_bits(),
                "{v} image {i}: threshold {} want {}",
                thr[i],
                want_thr[i]
            );
        }
        let diff = mask
            .iter()
            .zip(&want_mask)
            .filter(|(g, w)| **g != **w as f32)
            .count();
        eprintln!(
            "tiny fixture {v}: thresholds {thr:?} exact, {diff} of {} mask pixels differ",
            mask.len()
        );
        assert!(
            diff * 1000 <= mask.len(),
            "{v}: {diff} mask pixels differ (> 0.1%)"
        );
        // The same data through the f64 reference (exact agreement expected).
        check_vs_reference("tiny fixture image", &px, 2, 256, 256, rule, None);
    }
}

#[test]
#[cfg_attr(
    not(full_fixtures),
    ignore = "needs MEDFASTSAM_FIXTURES (folder with full.forward.safetensors)"
)]
fn otsu_full_fixture_from_env() {
    let dir = std::env::var_os("MEDFASTSAM_FIXTURES")
        .expect("MEDFASTSAM_FIXTURES must name the folder with full.forward.safetensors");
    let path = std::path::Path::new(&dir).join("full.forward.safetensors");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let img = st.tensor("image").unwrap();
    assert_eq!(img.shape(), &[1, 1024, 1024, 3]);
    let px = pack_rgb(img.data());
    let gpu = test_gpu();
    for rule in RULES {
        let v = if rule == OtsuRule::Paper {
            "paper"
        } else {
            "released"
        };
        let want: Vec<f32> =
            bytemuck::pod_collect_to_vec(st.tensor(&format!("{v}.otsu.threshold")).unwrap().data());
        let (thr, mask) = run_gpu(gpu, &px, 1, 1024, 1024, rule, None);
        assert_eq!(
            thr[0].to_bits(),
            want[0].to_bits(),
            "{v}: threshold {} want {}",
            thr[0],
            want[0]
        );
        let (_, _, want_mask) = reference::otsu(&px, 1, 1024, 1024, rule);
        let diff = mask
            .iter()
            .zip(&want_mask)
            .filter(|(g, w)| **g as f64 != **w)
            .count();
        // The fixture keeps only the 256² bilinear downsample of the mask (align_corners=False,
        // scale 4: the mean of pixels {4i+1, 4i+2} x {4j+1, 4j+2}); compare ours through it.
        let lowres: Vec<f32> = bytemuck::pod_collect_to_vec(
            st.tensor(&format!("{v}.otsu.mask_lowres")).unwrap().data(),
        );
        let mut low_diff = 0;
        for i in 0..256 {
            for j in 0..256 {
                let m = |y: usize, x: usize| mask[y * 1024 + x];
                let v = 0.25
                    * (m(4 * i + 1, 4 * j + 1)
                        + m(4 * i + 1, 4 * j + 2)
                        + m(4 * i + 2, 4 * j + 1)
                        + m(4 * i + 2, 4 * j + 2));
                if (v - lowres[i * 256 + j]).abs() > 1e-6 {
                    low_diff += 1;
                }
            }
        }
        eprintln!(
            "full fixture {v}: threshold {} exact, {diff} mask pixels differ from the f64 reference, \
             {low_diff} of 65536 downsampled mask values differ from the fixture's otsu.mask_lowres",
            thr[0]
        );
        assert_eq!(diff, 0);
        assert!(
            low_diff * 1000 <= 65536,
            "{v}: {low_diff} low-res mask values differ"
        );
    }
}

/// An image whose grey values follow a smooth pattern plus noise (a realistic bimodal histogram).
fn blobs(rng: &mut Rng, h: usize, w: usize, lo: f64, hi: f64, noise: f64) -> Vec<u32> {
    let (cy, cx, r) = (
        rng.range(0.3, 0.7) * h as f64,
        rng.range(0.3, 0.7) * w as f64,
        0.3 * h.min(w) as f64,
    );
    let tint = [
        rng.range(0.8, 1.2),
        rng.range(0.8, 1.2),
        rng.range(0.8, 1.2),
    ];
    let mut v = Vec::with_capacity(h * w);
    for y in 0..h {
        for x in 0..w {
            let d = ((y as f64 - cy).powi(2) + (x as f64 - cx).powi(2)).sqrt();
            let base = if d < r { hi } else { lo };
            let c: Vec<u8> = (0..3)
                .map(|k| {
                    (base * tint[k] + noise * rng.normal())
                        .round()
                        .clamp(0.0, 255.0) as u8
                })
                .collect();
            v.push(pack(c[0], c[1], c[2]));
        }
    }
    v
}

#[test]
fn otsu_synthetic_vs_reference() {
    let mut rng = Rng::new(5);
    for rule in RULES {
        // Uniform random colours, odd non-square size.
        let px: Vec<u32> = (0..97 * 61)
            .map(|_| rng.next_u64() as u32 & 0xff_ffff)
            .collect();
        check_vs_reference("random 97x61", &px, 1, 97, 61, rule, None);
        // All dark, all bright, mid grey (a single histogram bin, or none in range).
        for (name, c) in [
            ("all-dark", 0u8),
            ("all-bright", 255),
            ("mid-grey", 128),
            ("released-range-grey", 140),
        ] {
            let px = vec![pack(c, c, c); 40 * 40];
            check_vs_reference(name, &px, 1, 40, 40, rule, None);
        }
        // Two levels (ties over the empty bins between them resolve to the first index).
        for (a, b, frac) in [
            (30u8, 200u8, 0.5),
            (120, 125, 0.2),
            (130, 170, 0.7),
            (0, 255, 0.01),
        ] {
            let px: Vec<u32> = (0..33 * 47)
                .map(|i| {
                    if (i as f64) < frac * (33.0 * 47.0) {
                        pack(a, a, a)
                    } else {
                        pack(b, b, b)
                    }
                })
                .collect();
            check_vs_reference(&format!("two-level {a}/{b}"), &px, 1, 33, 47, rule, None);
        }
        // Batch of 3 different realistic images.
        let mut px = blobs(&mut rng, 128, 128, 60.0, 190.0, 25.0);
        px.extend(blobs(&mut rng, 128, 128, 120.0, 160.0, 10.0));
        px.extend(blobs(&mut rng, 128, 128, 200.0, 90.0, 40.0));
        check_vs_reference("batch of 3 blobs", &px, 3, 128, 128, rule, None);
        // Few distinct colours with random counts: many near-ties in sigma².
        for seed in 0..6 {
            let mut r2 = Rng::new(100 + seed);
            let levels: Vec<u32> = (0..2 + r2.below(5))
                .map(|_| r2.next_u64() as u32 & 0xff_ffff)
                .collect();
            let px: Vec<u32> = (0..50 * 50)
                .map(|_| levels[r2.below(levels.len())])
                .collect();
            check_vs_reference(
                &format!("{} colours", levels.len()),
                &px,
                1,
                50,
                50,
                rule,
                None,
            );
        }
    }
}

#[test]
fn otsu_released_no_pixel_in_range() {
    // Black: released grey = -2.03 for every pixel; no pixel in [0, 1] -> t* = 0 and, with the
    // strict '>', an empty mask. White: grey = 2.35, also out of range -> t* = 0, full mask.
    let gpu = test_gpu();
    for (c, on) in [(0u8, 0.0f32), (255, 1.0)] {
        let px = vec![pack(c, c, c); 3 * 20 * 20];
        let (thr, mask) = run_gpu(gpu, &px, 3, 20, 20, OtsuRule::Released, None);
        assert_eq!(thr, vec![0.0; 3]);
        assert!(mask.iter().all(|&m| m == on), "colour {c}");
        check_vs_reference(
            &format!("released out of range {c}"),
            &px,
            3,
            20,
            20,
            OtsuRule::Released,
            None,
        );
    }
}

/// Four 2048² images that together hold every u8 colour exactly once; 256 pixels per histogram
/// workgroup gives 65,536 workgroups (the grid is split over two axes), and the mask kernel too.
#[test]
fn otsu_every_colour_large_grid() {
    let gpu = test_gpu();
    let s = 2048;
    let px: Vec<u32> = (0..(1u32 << 24)).collect();
    for rule in RULES {
        let tpx = gpu.upload_u32(&px, &[4, s, s]).unwrap();
        let mut rec = gpu.new_recorder();
        let (hist, _) = otsu_histogram(&mut rec, &tpx, rule, 256).unwrap();
        rec.submit().unwrap();
        let hist = gpu.read_u32(&hist).unwrap();
        let mut total = 0u64;
        for i in 0..4 {
            let grey: Vec<f64> = px[i * s * s..(i + 1) * s * s]
                .iter()
                .map(|&p| reference::grey(p, rule))
                .collect();
            let want = reference::histogram(&grey);
            for bin in 0..256 {
                assert_eq!(
                    hist[i * 256 + bin] as f64,
                    want[bin],
                    "{rule:?} image {i} bin {bin}"
                );
            }
            total += hist[i * 256..(i + 1) * 256]
                .iter()
                .map(|&c| c as u64)
                .sum::<u64>();
        }
        eprintln!("every colour {rule:?}: histograms of 2^24 colours exact ({total} in range)");
        check_vs_reference("every colour (chunk 256)", &px, 4, s, s, rule, Some(256));
    }
}

#[test]
fn otsu_rejects_bad_shapes() {
    let gpu = test_gpu();
    let px = gpu.upload_u32(&[0; 16], &[1, 4, 4]).unwrap();
    let xn = gpu.empty(&[1, 4, 5, 3]).unwrap();
    let mut rec = gpu.new_recorder();
    assert!(otsu(&mut rec, &px, &xn, OtsuRule::Paper).is_err());
    let px2 = gpu.upload_u32(&[0; 16], &[16]).unwrap();
    assert!(otsu(&mut rec, &px2, &xn, OtsuRule::Paper).is_err());
}
