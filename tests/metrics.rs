//! Metrics of the paper's protocol: IoU/Dice against hand counts, the empty-mask rules, HD95 against
//! hand-computed cases and against a brute-force O(n²) boundary-distance reference, the summary and
//! the CSV writer.

use medfastsam::rng::Rng;
use medfastsam::train::metrics::{Scores, Summary, csv_text, hd95, scores, write_csv};

/// A mask from ASCII art ('#' = foreground), returned with its width and height.
fn art(rows: &[&str]) -> (Vec<u8>, usize, usize) {
    let (w, h) = (rows[0].len(), rows.len());
    let mut m = Vec::with_capacity(w * h);
    for r in rows {
        assert_eq!(r.len(), w);
        m.extend(r.bytes().map(|c| (c == b'#') as u8 * 255));
    }
    (m, w, h)
}

fn rect(w: usize, h: usize, x0: usize, x1: usize, y0: usize, y1: usize) -> Vec<u8> {
    let mut m = vec![0u8; w * h];
    for y in y0..y1 {
        for x in x0..x1 {
            m[y * w + x] = 1;
        }
    }
    m
}

#[test]
fn iou_dice_hand_counted() {
    let (p, w, h) = art(&["##..", "##..", "#..."]);
    let (g, _, _) = art(&["#...", "##..", "..#."]);
    // TP: (0,0),(0,1),(1,1) = 3; FP: (1,0),(0,2) = 2; FN: (2,2) = 1
    let s = scores(&p, &g, w, h, false);
    assert_eq!(s.iou, 3.0 / 6.0);
    assert_eq!(s.dice, 6.0 / 9.0);
    assert_eq!(s.hd95, None);
    // nonzero values of any size are foreground
    let p1: Vec<u8> = p.iter().map(|&v| (v != 0) as u8 * 7).collect();
    assert_eq!(scores(&p1, &g, w, h, false), s);
    // identical masks
    let s = scores(&g, &g, w, h, true);
    assert_eq!((s.iou, s.dice, s.hd95), (1.0, 1.0, Some(0.0)));
    // disjoint masks
    let (a, _, _) = art(&["#...", "....", "...."]);
    let (b, _, _) = art(&["....", "....", "...#"]);
    let s = scores(&a, &b, w, h, false);
    assert_eq!((s.iou, s.dice), (0.0, 0.0));
}

#[test]
fn empty_masks() {
    let (w, h) = (7, 5);
    let z = vec![0u8; w * h];
    let s = scores(&z, &z, w, h, true);
    assert_eq!(
        s,
        Scores {
            iou: 1.0,
            dice: 1.0,
            hd95: Some(0.0)
        }
    );
    let one = rect(w, h, 2, 4, 1, 3);
    for (p, g) in [(&one, &z), (&z, &one)] {
        let s = scores(p, g, w, h, true);
        assert_eq!(
            s,
            Scores {
                iou: 0.0,
                dice: 0.0,
                hd95: None
            }
        );
        assert_eq!(hd95(p, g, w, h), None);
    }
}

#[test]
#[should_panic(expected = "ground-truth mask has 11 bytes but the image is 4×3 = 12 pixels")]
fn length_mismatch_panics_with_sizes() {
    scores(&[0; 12], &[0; 11], 4, 3, false);
}

#[test]
fn hd95_two_squares_shifted_by_three() {
    // 6×6 squares at x 2..8 and x 5..11, rows 2..8, in a 14×10 image. Boundary of A (20 pixels)
    // to boundary of B: top and bottom rows 3,2,1,0,0,0 each; left column (4 inner pixels) 3 each;
    // right column (x = 7, y = 3..6) min(2, y−2, 7−y) = 1,2,2,1. Sorted: six 0, four 1, four 2,
    // six 3; position 0.95·19 = 18.05 -> 3. B to A is the mirror image -> 3.
    let (w, h) = (14, 10);
    let a = rect(w, h, 2, 8, 2, 8);
    let b = rect(w, h, 5, 11, 2, 8);
    assert_eq!(hd95(&a, &b, w, h), Some(3.0));
    assert_eq!(hd95(&b, &a, w, h), Some(3.0));
    let s = scores(&a, &b, w, h, true);
    // overlap 3×6 = 18, union 54
    assert_eq!(
        (s.iou, s.dice, s.hd95),
        (18.0 / 54.0, 36.0 / 72.0, Some(3.0))
    );
}

#[test]
fn hd95_interpolates_and_takes_the_max_of_the_directions() {
    // pred: a row of 11 pixels (all boundary) at x 0..=10; gt: the single pixel (0,0).
    // pred->gt distances 0..=10, 95th percentile at position 9.5 -> 9.5; gt->pred 0. MONAI's result
    // is max(9.5, 0) = 9.5 (pooling both lists would give 9.45).
    let (w, h) = (12, 3);
    let p = rect(w, h, 0, 11, 0, 1);
    let g = rect(w, h, 0, 1, 0, 1);
    assert_eq!(hd95(&p, &g, w, h), Some(9.5));
    assert_eq!(hd95(&g, &p, w, h), Some(9.5));
    // two single pixels 3 across and 4 down: 5
    let (w, h) = (10, 10);
    assert_eq!(
        hd95(&rect(w, h, 1, 2, 2, 3), &rect(w, h, 4, 5, 6, 7), w, h),
        Some(5.0)
    );
}

#[test]
fn hd95_counts_hole_boundaries_and_image_border() {
    // gt: 5×5 square; pred: the same with its centre pixel missing. The hole adds 4 boundary pixels
    // to pred at distance 1 from gt's perimeter: pred->gt = sixteen 0 and four 1 -> position 18.05
    // -> 1; gt->pred = 0.
    let (g, w, h) = art(&[
        ".......", ".#####.", ".#####.", ".##.##.", ".#####.", ".#####.", ".......",
    ]);
    let (f, _, _) = art(&[
        ".......", ".#####.", ".#####.", ".#####.", ".#####.", ".#####.", ".......",
    ]);
    assert_eq!(hd95(&g, &f, w, h), Some(1.0));
    // pixels on the image border are boundary pixels (outside counts as background): pred = the
    // whole 5×5 image, gt = columns 0..4. pred->gt: column 4 (5 pixels) at 1, eleven at 0 ->
    // position 14.25 -> 1; gt->pred: (3,1),(3,2),(3,3) at 1, eleven at 0 -> position 12.35 -> 1.
    let full = vec![1u8; 25];
    let gt = rect(5, 5, 0, 4, 0, 5);
    assert_eq!(hd95(&full, &gt, 5, 5), Some(1.0));
    assert_eq!(hd95(&full, &full, 5, 5), Some(0.0));
}

// ---- brute-force reference, written from the definitions --------------------------------------

fn ref_boundary(m: &[u8], w: usize, h: usize) -> Vec<(i64, i64)> {
    let fg = |x: i64, y: i64| {
        x >= 0 && y >= 0 && x < w as i64 && y < h as i64 && m[y as usize * w + x as usize] != 0
    };
    let mut out = Vec::new();
    for y in 0..h as i64 {
        for x in 0..w as i64 {
            if fg(x, y) && !(fg(x - 1, y) && fg(x + 1, y) && fg(x, y - 1) && fg(x, y + 1)) {
                out.push((x, y));
            }
        }
    }
    out
}

fn ref_percentile95(mut d: Vec<f64>) -> f64 {
    d.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pos = 0.95 * (d.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    d[lo] * (1.0 - (pos - lo as f64)) + d[hi] * (pos - lo as f64)
}

fn ref_hd95(p: &[u8], g: &[u8], w: usize, h: usize) -> Option<f64> {
    let (bp, bg) = (ref_boundary(p, w, h), ref_boundary(g, w, h));
    if bp.is_empty() && bg.is_empty() {
        return Some(0.0);
    }
    if bp.is_empty() || bg.is_empty() {
        return None;
    }
    let directed = |a: &[(i64, i64)], b: &[(i64, i64)]| {
        let d: Vec<f64> = a
            .iter()
            .map(|&(x, y)| {
                b.iter()
                    .map(|&(u, v)| (((x - u).pow(2) + (y - v).pow(2)) as f64).sqrt())
                    .fold(f64::INFINITY, f64::min)
            })
            .collect();
        ref_percentile95(d)
    };
    Some(directed(&bp, &bg).max(directed(&bg, &bp)))
}

/// A random mask: a few rectangles and discs (some crossing the image border), then some noise.
fn random_mask(rng: &mut Rng, w: usize, h: usize, shapes: usize, noise: f64) -> Vec<u8> {
    let mut m = vec![0u8; w * h];
    for _ in 0..shapes {
        let cx = rng.range(-3.0, w as f64 + 3.0);
        let cy = rng.range(-3.0, h as f64 + 3.0);
        let r = rng.range(1.0, (w.min(h) as f64) / 3.0);
        let disc = rng.uniform() < 0.5;
        for y in 0..h {
            for x in 0..w {
                let (dx, dy) = (x as f64 - cx, y as f64 - cy);
                let inside = if disc {
                    dx * dx + dy * dy <= r * r
                } else {
                    dx.abs() <= r && dy.abs() <= 0.6 * r
                };
                if inside {
                    m[y * w + x] = 255;
                }
            }
        }
    }
    for v in m.iter_mut() {
        if rng.uniform() < noise {
            *v = if *v == 0 { 1 } else { 0 };
        }
    }
    m
}

#[test]
fn hd95_matches_brute_force_on_random_shapes() {
    let mut rng = Rng::new(2024);
    let mut max_err = 0.0f64;
    let mut checked = 0;
    for trial in 0..120 {
        let (w, h) = [(23, 17), (40, 31), (9, 13), (64, 48), (1, 20), (30, 1)][trial % 6];
        let (sp, sg) = (1 + rng.below(4), 1 + rng.below(4));
        let noise = [0.0, 0.01, 0.1][trial % 3];
        let p = random_mask(&mut rng, w, h, sp, noise);
        let g = random_mask(&mut rng, w, h, sg, noise);
        let got = hd95(&p, &g, w, h);
        let want = ref_hd95(&p, &g, w, h);
        match (got, want) {
            (Some(a), Some(b)) => {
                max_err = max_err.max((a - b).abs());
                assert!(
                    (a - b).abs() <= 1e-9,
                    "trial {trial} ({w}×{h}): hd95 {a} vs brute force {b}"
                );
                checked += 1;
            }
            (a, b) => assert_eq!(a, b, "trial {trial}"),
        }
        let s = scores(&p, &g, w, h, true);
        assert_eq!(s.hd95, got);
    }
    assert!(checked >= 100, "only {checked} non-trivial cases");
    println!("hd95 vs brute force: {checked} cases, max abs error {max_err:e}");
}

#[test]
fn summary_means() {
    let s = [
        Scores {
            iou: 0.5,
            dice: 0.6,
            hd95: Some(2.0),
        },
        Scores {
            iou: 1.0,
            dice: 1.0,
            hd95: None,
        },
        Scores {
            iou: 0.0,
            dice: 0.2,
            hd95: Some(5.0),
        },
    ];
    let m = Summary::from_scores(&s);
    assert_eq!(m.n, 3);
    assert!((m.mean_iou - 0.5).abs() < 1e-15);
    assert!((m.mean_dice - 0.6).abs() < 1e-15);
    // population std: iou deviations -0.0, 0.5, -0.5 -> sqrt(0.5/3)
    assert!((m.std_iou - (0.5f64 / 3.0).sqrt()).abs() < 1e-15);
    // dice deviations 0, 0.4, -0.4 -> sqrt(0.32/3)
    assert!((m.std_dice - (0.32f64 / 3.0).sqrt()).abs() < 1e-15);
    assert_eq!(m.mean_hd95, Some(3.5));
    assert_eq!(m.n_hd95, 2);
    let text = m.to_string();
    assert!(
        text.contains("3 images")
            && text.contains("mIoU 50.00%")
            && text.contains("HD95 3.50 px (over 2 images)"),
        "{text}"
    );
    let e = Summary::from_scores(&[]);
    assert_eq!((e.n, e.n_hd95, e.mean_hd95), (0, 0, None));
    assert!(e.mean_iou.is_nan());
}

#[test]
fn csv_rows_and_atomic_write() {
    let rows = vec![
        (
            "ISIC_0000000".to_string(),
            Scores {
                iou: 0.5,
                dice: 2.0 / 3.0,
                hd95: Some(3.0),
            },
        ),
        (
            "a,\"b\"".to_string(),
            Scores {
                iou: 1.0,
                dice: 1.0,
                hd95: None,
            },
        ),
    ];
    let want = "id,iou,dice,hd95\nISIC_0000000,0.5,0.6666666666666666,3\n\"a,\"\"b\"\"\",1,1,\n";
    assert_eq!(csv_text(&rows), want);
    let dir = std::env::temp_dir().join(format!("medfastsam-metrics-csv-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("scores.csv");
    write_csv(&path, &rows).unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), want);
    // the values read back are the same f64s
    let line = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .nth(1)
        .unwrap()
        .to_string();
    let dice: f64 = line.split(',').nth(2).unwrap().parse().unwrap();
    assert_eq!(dice, 2.0 / 3.0);
    // no stray temporary files
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    // an unwritable path is an error naming it
    let bad = dir.join("missing-folder").join("scores.csv");
    let e = write_csv(&bad, &rows).unwrap_err().to_string();
    assert!(e.contains("missing-folder/scores.csv"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn hd95_at_the_paper_resolution() {
    // 1024×1024 (the model input size): two overlapping discs with a few specks, against brute force
    let (w, h) = (1024, 1024);
    let disc = |cx: f64, cy: f64, r: f64| -> Vec<u8> {
        let mut m = vec![0u8; w * h];
        for y in 0..h {
            for x in 0..w {
                if (x as f64 - cx).powi(2) + (y as f64 - cy).powi(2) <= r * r {
                    m[y * w + x] = 255;
                }
            }
        }
        m
    };
    let mut p = disc(500.0, 480.0, 300.0);
    let g = disc(530.0, 520.0, 280.0);
    for (x, y) in [(10, 10), (1000, 20), (40, 1010)] {
        p[y * w + x] = 255;
    }
    let t = std::time::Instant::now();
    let got = hd95(&p, &g, w, h).unwrap();
    let dt = t.elapsed();
    let want = ref_hd95(&p, &g, w, h).unwrap();
    assert!((got - want).abs() <= 1e-9, "{got} vs {want}");
    println!(
        "hd95 at 1024²: {got:.4} px in {:.1} ms",
        dt.as_secs_f64() * 1e3
    );
}
