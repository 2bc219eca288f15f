//! Nuclei as objects (`medfastsam::instances`): touching discs are split into the right number of
//! objects and isolated ones are not; rows pushed one at a time give what the in-memory call
//! gives, with the label rows handed out in order exactly once; the label TIFF, the CSV and the
//! GeoJSON written for the same image agree pixel for pixel with each other; a row of the wrong
//! length is an error; a wide, tall mask of small nuclei streams with a few pending rows.

use std::collections::{BTreeMap, HashSet};
use std::f64::consts::PI;
use std::io::Cursor;

use medfastsam::instances::{
    CSV_HEADER, CollectSink, CsvWriter, GeoJsonWriter, InstanceOptions, InstanceSink, LabelBits,
    LabelTiffWriter, Labeler, Object, WriterSink, label_bits_for, label_image,
    squared_distance_transform,
};
use medfastsam::io::{GrayImage, RgbImage};
use medfastsam::rng::Rng;
use medfastsam::{Error, Result};

/// A mask of filled discs (cx, cy, r): pixel (x, y) is foreground when its centre is within r.
fn discs(w: usize, h: usize, ds: &[(f64, f64, f64)]) -> GrayImage {
    let mut data = vec![0u8; w * h];
    for &(cx, cy, r) in ds {
        let y0 = (cy - r - 1.0).floor().max(0.0) as usize;
        let y1 = ((cy + r + 1.0).ceil() as usize).min(h);
        let x0 = (cx - r - 1.0).floor().max(0.0) as usize;
        let x1 = ((cx + r + 1.0).ceil() as usize).min(w);
        for y in y0..y1 {
            for x in x0..x1 {
                let (dx, dy) = (x as f64 + 0.5 - cx, y as f64 + 0.5 - cy);
                if dx * dx + dy * dy <= r * r {
                    data[y * w + x] = 255;
                }
            }
        }
    }
    GrayImage {
        width: w,
        height: h,
        data,
    }
}

fn colours(w: usize, h: usize) -> RgbImage {
    let mut data = Vec::with_capacity(3 * w * h);
    for y in 0..h {
        for x in 0..w {
            data.extend_from_slice(&[
                (x * 7 % 256) as u8,
                (y * 13 % 256) as u8,
                ((x + y) % 256) as u8,
            ]);
        }
    }
    RgbImage {
        width: w,
        height: h,
        data,
    }
}

fn run(mask: &GrayImage, opts: &InstanceOptions) -> (Vec<u32>, Vec<Object>) {
    let rgb = colours(mask.width, mask.height);
    let (labels, objects, summary) = label_image(mask, &rgb, opts).expect("label_image");
    assert_eq!(summary.count as usize, objects.len());
    (labels, objects)
}

fn count(mask: &GrayImage) -> usize {
    run(mask, &InstanceOptions::default()).1.len()
}

#[test]
fn edt_equals_brute_force_on_random_masks() {
    let mut rng = Rng::new(3);
    for case in 0..200 {
        let (w, h) = (1 + rng.below(17), 1 + rng.below(17));
        let p = [0.6, 0.9, 0.97][case % 3];
        let inside: Vec<bool> = (0..w * h).map(|_| rng.uniform() < p).collect();
        let got = squared_distance_transform(&inside, w, h);
        for y in 0..h {
            for x in 0..w {
                let mut best = f64::INFINITY;
                for yy in 0..h {
                    for xx in 0..w {
                        if !inside[yy * w + xx] {
                            let (dx, dy) = (x as f64 - xx as f64, y as f64 - yy as f64);
                            best = best.min(dx * dx + dy * dy);
                        }
                    }
                }
                let want = if best.is_finite() {
                    best as u64
                } else {
                    u64::MAX
                };
                assert_eq!(got[y * w + x], want, "case {case} ({x},{y}) of {w}x{h}");
            }
        }
    }
}

#[test]
fn isolated_discs_stay_single_and_keep_their_area() {
    let mut rng = Rng::new(5);
    for r in [
        5.0, 5.5, 6.0, 7.0, 8.5, 10.0, 12.0, 13.0, 15.0, 20.0, 30.0, 45.0,
    ] {
        for _ in 0..6 {
            let size = (2.0 * r) as usize + 12;
            let c = size as f64 / 2.0;
            let (cx, cy) = (c + rng.range(-0.5, 0.5), c + rng.range(-0.5, 0.5));
            let (_, objs) = run(
                &discs(size, size, &[(cx, cy, r)]),
                &InstanceOptions::default(),
            );
            assert_eq!(objs.len(), 1, "disc r={r} at ({cx:.2},{cy:.2}) was split");
            let want = PI * r * r;
            let tol = if r >= 10.0 { 0.03 } else { 0.1 };
            assert!(
                (objs[0].area as f64 - want).abs() <= tol * want,
                "r={r}: area {} vs {want:.1}",
                objs[0].area
            );
            assert!(
                objs[0].eccentricity < 0.35,
                "r={r}: {}",
                objs[0].eccentricity
            );
            let (ex, ey) = (objs[0].centroid[0] - cx, objs[0].centroid[1] - cy);
            let ctol = if r < 10.0 { 0.35 } else { 0.15 };
            assert!(
                ex.abs() < ctol && ey.abs() < ctol,
                "r={r}: centroid off by ({ex:.3},{ey:.3})"
            );
        }
    }
}

/// A filled ellipse with semi-axes a, b, rotated by t, centred at (cx, cy).
fn ellipse(s: usize, cx: f64, cy: f64, a: f64, b: f64, t: f64) -> GrayImage {
    let mut data = vec![0u8; s * s];
    for y in 0..s {
        for x in 0..s {
            let (dx, dy) = (x as f64 + 0.5 - cx, y as f64 + 0.5 - cy);
            let (u, v) = (dx * t.cos() + dy * t.sin(), -dx * t.sin() + dy * t.cos());
            if (u / a).powi(2) + (v / b).powi(2) <= 1.0 {
                data[y * s + x] = 255;
            }
        }
    }
    GrayImage {
        width: s,
        height: s,
        data,
    }
}

#[test]
fn whole_discs_and_ellipses_are_never_split() {
    let mut rng = Rng::new(1);
    let mut r = 5.0;
    while r <= 60.0 {
        let s = (2.0 * r) as usize + 10;
        let c = s as f64 / 2.0;
        let (cx, cy) = (c + rng.range(-0.5, 0.5), c + rng.range(-0.5, 0.5));
        assert_eq!(count(&ellipse(s, cx, cy, r, r, 0.0)), 1, "disc r={r}");
        r += 0.5;
    }
    for _ in 0..150 {
        let a = rng.range(6.0, 25.0);
        let b = a * rng.range(0.5, 1.0);
        let t = rng.range(0.0, PI);
        let s = (2.0 * a) as usize + 10;
        let c = s as f64 / 2.0;
        let (cx, cy) = (c + rng.range(-0.5, 0.5), c + rng.range(-0.5, 0.5));
        assert_eq!(
            count(&ellipse(s, cx, cy, a, b, t)),
            1,
            "ellipse {a:.2} x {b:.2} at {t:.2}"
        );
    }
}

#[test]
fn touching_pairs_and_chains_split_into_their_discs() {
    // The case named in the design: radius 12, centres 20 px apart.
    let m = discs(80, 50, &[(25.0, 25.0, 12.0), (45.0, 25.0, 12.0)]);
    assert_eq!(count(&m), 2);
    let m = discs(
        100,
        50,
        &[(25.0, 25.0, 12.0), (45.0, 25.0, 12.0), (65.0, 25.0, 12.0)],
    );
    assert_eq!(count(&m), 3);

    let mut rng = Rng::new(9);
    for case in 0..40 {
        let r = rng.range(12.0, 15.0);
        let overlap = rng.range(2.0, 5.0);
        let step = 2.0 * r - overlap;
        let a = rng.range(0.0, PI);
        let (ux, uy) = (a.cos() * step, a.sin() * step);
        let n = 2 + case % 2; // pairs and chains of three
        let size = 2.0 * (r + 4.0) + (n - 1) as f64 * step;
        let (x0, y0) = (
            size / 2.0 - (n - 1) as f64 * ux / 2.0,
            size / 2.0 - (n - 1) as f64 * uy / 2.0,
        );
        let ds: Vec<_> = (0..n)
            .map(|i| (x0 + i as f64 * ux, y0 + i as f64 * uy, r))
            .collect();
        let s = size.ceil() as usize + 2;
        let (_, objs) = run(&discs(s, s, &ds), &InstanceOptions::default());
        assert_eq!(
            objs.len(),
            n,
            "case {case}: {n} discs r={r:.2} overlap {overlap:.2}"
        );
        // Each disc keeps its area less half of each lens it shares with a neighbour.
        let lens = 2.0 * r * r * (step / (2.0 * r)).acos()
            - step / 2.0 * (4.0 * r * r - step * step).sqrt();
        let mut areas: Vec<u64> = objs.iter().map(|o| o.area).collect();
        areas.sort();
        let mut wants: Vec<f64> = (0..n)
            .map(|i| PI * r * r - lens / 2.0 * if i == 0 || i == n - 1 { 1.0 } else { 2.0 })
            .collect();
        wants.sort_by(f64::total_cmp);
        for (a, want) in areas.iter().zip(&wants) {
            assert!(
                (*a as f64 - want).abs() <= 0.04 * want,
                "case {case}: area {a} vs {want:.1}"
            );
        }
        // Without splitting they are one component.
        let opts = InstanceOptions {
            split: false,
            ..Default::default()
        };
        assert_eq!(run(&discs(s, s, &ds), &opts).1.len(), 1);
    }
}

#[test]
fn a_three_by_three_grid_splits_into_nine() {
    for (r, overlap) in [(12.0, 3.0), (13.0, 2.0), (15.0, 4.0), (14.0, 5.0)] {
        let step = 2.0 * r - overlap;
        let mut ds = Vec::new();
        for j in 0..3 {
            for i in 0..3 {
                ds.push((r + 5.0 + i as f64 * step, r + 5.0 + j as f64 * step, r));
            }
        }
        let s = (2.0 * r + 10.0 + 2.0 * step).ceil() as usize;
        let m = discs(s, s, &ds);
        assert_eq!(count(&m), 9, "r={r} overlap {overlap}");
        let opts = InstanceOptions {
            split: false,
            ..Default::default()
        };
        let (_, one) = run(&m, &opts);
        assert_eq!(one.len(), 1);
        // Four gaps between the discs are holes of the single component.
        assert_eq!(one[0].polygons.len(), 1);
        assert_eq!(one[0].polygons[0].len(), 5, "outer ring + 4 holes");
    }
}

#[test]
fn split_false_gives_the_components_and_min_area_drops_specks() {
    let mut m = discs(
        120,
        60,
        &[(20.0, 20.0, 10.0), (36.0, 20.0, 10.0), (80.0, 30.0, 8.0)],
    );
    // Specks of 1, 2 and 9 pixels.
    m.data[55 * 120 + 5] = 255;
    m.data[55 * 120 + 10] = 255;
    m.data[55 * 120 + 11] = 255;
    for y in 50..53 {
        for x in 100..103 {
            m.data[y * 120 + x] = 255;
        }
    }
    let opts = InstanceOptions {
        split: false,
        ..Default::default()
    };
    let (labels, objs) = run(&m, &opts);
    assert_eq!(objs.len(), 2);
    assert!(labels[55 * 120 + 5] == 0 && labels[51 * 120 + 101] == 0);
    let keep_all = InstanceOptions {
        split: false,
        min_area: 1,
        ..Default::default()
    };
    assert_eq!(run(&m, &keep_all).1.len(), 5);
    assert_eq!(count(&m), 3);
}

/// Records what a labeller hands out and checks the order rules as it goes.
#[derive(Default)]
struct Recorder {
    width: usize,
    rows: Vec<Vec<u32>>,
    objects: Vec<Object>,
    seen: HashSet<u32>,
}

impl InstanceSink for Recorder {
    fn object(&mut self, obj: &Object) -> Result<()> {
        assert_eq!(obj.id as usize, self.objects.len() + 1, "ids in order");
        assert!(
            obj.bbox[1] as usize >= self.rows.len(),
            "object {} arrives before its first row is handed out",
            obj.id
        );
        self.seen.insert(obj.id);
        self.objects.push(obj.clone());
        Ok(())
    }
    fn label_row(&mut self, y: usize, labels: &[u32]) -> Result<()> {
        assert_eq!(y, self.rows.len(), "rows in order, each once");
        assert_eq!(labels.len(), self.width);
        for &l in labels {
            assert!(
                l == 0 || self.seen.contains(&l),
                "row {y} has unseen id {l}"
            );
        }
        self.rows.push(labels.to_vec());
        Ok(())
    }
}

fn random_discs(rng: &mut Rng, w: usize, h: usize, n: usize) -> Vec<(f64, f64, f64)> {
    (0..n)
        .map(|_| {
            (
                rng.range(0.0, w as f64),
                rng.range(0.0, h as f64),
                rng.range(3.0, 16.0),
            )
        })
        .collect()
}

#[test]
fn streaming_rows_equals_the_in_memory_call() {
    let mut rng = Rng::new(21);
    for (case, (w, h, n)) in [
        (200, 150, 40),
        (97, 301, 60),
        (300, 40, 25),
        (1, 30, 0),
        (50, 1, 3),
    ]
    .into_iter()
    .enumerate()
    {
        let ds = random_discs(&mut rng, w, h, n);
        let mask = discs(w, h, &ds);
        let rgb = colours(w, h);
        for opts in [
            InstanceOptions::default(),
            InstanceOptions {
                split: false,
                min_area: 1,
                h: 1.0,
            },
        ] {
            let (labels, objects, summary) = label_image(&mask, &rgb, &opts).unwrap();
            let mut rec = Recorder {
                width: w,
                ..Default::default()
            };
            let mut lab = Labeler::new(w, opts.clone());
            for y in 0..h {
                lab.push_row(
                    &mask.data[y * w..(y + 1) * w],
                    &rgb.data[3 * y * w..3 * (y + 1) * w],
                    &mut rec,
                )
                .unwrap();
            }
            let s2 = lab.finish(&mut rec).unwrap();
            assert_eq!(rec.rows.len(), h, "case {case}");
            assert_eq!(rec.rows.concat(), labels, "case {case}");
            assert_eq!(rec.objects, objects, "case {case}");
            assert_eq!(s2, summary);
            // Every object's pixels carry its id and nothing else does.
            let mut areas: BTreeMap<u32, u64> = BTreeMap::new();
            for &l in labels.iter().filter(|&&l| l != 0) {
                *areas.entry(l).or_default() += 1;
            }
            assert_eq!(areas.len(), objects.len());
            for o in &objects {
                assert_eq!(areas[&o.id], o.area);
            }
            let fg = mask.data.iter().filter(|&&v| v > 127).count() as u64;
            assert_eq!(summary.foreground, fg);
            assert_eq!(summary.pixels, (w * h) as u64);
            assert!((summary.coverage - fg as f64 / (w * h) as f64).abs() < 1e-12);
        }
    }
}

#[test]
fn rows_of_the_wrong_length_are_errors() {
    let mut lab = Labeler::new(10, InstanceOptions::default());
    let mut sink = CollectSink::default();
    let e = lab.push_row(&[0u8; 9], &[0u8; 30], &mut sink).unwrap_err();
    assert!(matches!(e, Error::Invalid(_)));
    let msg = e.to_string();
    assert!(msg.contains("9") && msg.contains("10"), "{msg}");
    let e = lab.push_row(&[0u8; 10], &[0u8; 29], &mut sink).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("29") && msg.contains("30"), "{msg}");
    // The labeller is still usable after a refused row.
    lab.push_row(&[255u8; 10], &[0u8; 30], &mut sink).unwrap();
    let s = lab.finish(&mut sink).unwrap();
    assert_eq!(s.count, 1);
    assert_eq!(sink.labels, vec![1; 10]);

    let mask = GrayImage {
        width: 4,
        height: 4,
        data: vec![0; 16],
    };
    let rgb = RgbImage {
        width: 4,
        height: 3,
        data: vec![0; 36],
    };
    assert!(label_image(&mask, &rgb, &InstanceOptions::default()).is_err());
    let bad = InstanceOptions {
        h: f32::NAN,
        ..Default::default()
    };
    let mut lab = Labeler::new(4, bad);
    assert!(lab.push_row(&[0; 4], &[0; 12], &mut sink).is_err());

    let mut t = LabelTiffWriter::create(Cursor::new(Vec::new()), 4, 2).unwrap();
    assert!(t.write_row(&[0, 1, 2]).is_err());
    t.write_row(&[0, 1, 2, 3]).unwrap();
    assert!(t.finish().is_err(), "one row of two");
}

#[test]
fn a_wide_tall_mask_of_small_nuclei_streams_with_few_pending_rows() {
    let (w, h) = (4000usize, 2000usize);
    let step = 16usize;
    let mut rng = Rng::new(77);
    // A jittered grid of discs of radius 5–6 (never split, never touching).
    let mut centres: Vec<Vec<(f64, f64, f64)>> = Vec::new();
    for gy in 0..h / step {
        let mut row = Vec::new();
        for gx in 0..w / step {
            row.push((
                (gx * step) as f64 + 8.0 + rng.range(-1.0, 1.0),
                (gy * step) as f64 + 8.0 + rng.range(-1.0, 1.0),
                rng.range(5.0, 6.0),
            ));
        }
        centres.push(row);
    }
    let mut lab = Labeler::new(w, InstanceOptions::default());
    let mut rows_out = 0usize;
    struct Count<'a>(&'a mut usize, u64);
    impl InstanceSink for Count<'_> {
        fn object(&mut self, o: &Object) -> Result<()> {
            self.1 += o.area;
            Ok(())
        }
        fn label_row(&mut self, y: usize, _l: &[u32]) -> Result<()> {
            assert_eq!(y, *self.0);
            *self.0 += 1;
            Ok(())
        }
    }
    let mut sink = Count(&mut rows_out, 0);
    let rgb = vec![128u8; 3 * w];
    let mut mask = vec![0u8; w];
    let mut peak = 0;
    for y in 0..h {
        mask.fill(0);
        let gy = y / step;
        for &(cx, cy, r) in &centres[gy] {
            let dy = y as f64 + 0.5 - cy;
            if dy.abs() > r {
                continue;
            }
            let half = (r * r - dy * dy).sqrt();
            let x0 = (cx - half - 0.5).ceil().max(0.0) as usize;
            let x1 = ((cx + half - 0.5).floor() as usize + 1).min(w);
            mask[x0..x1].fill(255);
        }
        lab.push_row(&mask, &rgb, &mut sink).unwrap();
        peak = peak.max(lab.pending_rows());
    }
    assert!(peak < 64, "{peak} rows pending");
    assert!(lab.peak_pending_rows() < 64);
    assert!(lab.pending_components() <= w / step);
    let summary = lab.finish(&mut sink).unwrap();
    assert_eq!(summary.count as usize, (w / step) * (h / step));
    assert_eq!(summary.object_pixels, summary.foreground);
    assert_eq!(sink.1, summary.foreground);
    assert_eq!(rows_out, h);
}

/// The doubled signed shoelace area of a GeoJSON ring.
fn ring_area2(ring: &serde_json::Value) -> f64 {
    let pts: Vec<(f64, f64)> = ring
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_f64().unwrap(), p[1].as_f64().unwrap()))
        .collect();
    assert_eq!(pts.first(), pts.last(), "closed ring");
    pts.windows(2)
        .map(|p| p[0].0 * p[1].1 - p[1].0 * p[0].1)
        .sum()
}

fn test_image() -> (GrayImage, Vec<(f64, f64, f64)>) {
    let (w, h) = (260usize, 180usize);
    let mut ds = Vec::new();
    // Isolated discs.
    for i in 0..12 {
        ds.push((20.0 + 20.0 * i as f64, 15.0, 4.0 + (i % 5) as f64));
    }
    // Touching pairs and a chain.
    ds.extend([(20.0, 60.0, 12.0), (41.0, 60.0, 12.0)]);
    ds.extend([(80.0, 60.0, 13.0), (80.0, 83.0, 13.0)]);
    ds.extend([
        (130.0, 60.0, 12.0),
        (150.0, 60.0, 12.0),
        (170.0, 60.0, 12.0),
    ]);
    let mut m = discs(w, h, &ds);
    let mut set = |x: usize, y: usize, v: u8| m.data[y * w + x] = v;
    // An annulus (one object with a hole).
    for y in 100..140 {
        for x in 20..60 {
            let (dx, dy) = (x as f64 + 0.5 - 40.0, y as f64 + 0.5 - 120.0);
            let r2 = dx * dx + dy * dy;
            set(x, y, if (36.0..=225.0).contains(&r2) { 255 } else { 0 });
        }
    }
    // A 12x12 square with a 2x2 block attached at one corner only (a diagonal touch).
    for y in 110..122 {
        for x in 100..112 {
            set(x, y, 255);
        }
    }
    for y in 122..124 {
        for x in 112..114 {
            set(x, y, 255);
        }
    }
    // Random small discs in the rest.
    let mut rng = Rng::new(4);
    let mut extra = Vec::new();
    while extra.len() < 10 {
        let c = (
            rng.range(150.0, 250.0),
            rng.range(100.0, 170.0),
            rng.range(4.0, 7.0),
        );
        if extra
            .iter()
            .all(|e: &(f64, f64, f64)| (e.0 - c.0).hypot(e.1 - c.1) > e.2 + c.2 + 3.0)
        {
            extra.push(c);
        }
    }
    let mut m2 = discs(w, h, &extra);
    for (a, b) in m2.data.iter_mut().zip(&m.data) {
        *a = (*a).max(*b);
    }
    m2.width = w;
    (m2, ds)
}

#[test]
fn label_tiff_csv_and_geojson_agree() {
    let (mask, _) = test_image();
    let (w, h) = (mask.width, mask.height);
    let rgb = colours(w, h);
    let opts = InstanceOptions::default();
    assert_eq!(label_bits_for(w, h, &opts), LabelBits::U16);
    let mpp = 0.25;

    let mut lab = Labeler::new(w, opts.clone());
    let mut sink = WriterSink {
        labels: Some(
            LabelTiffWriter::create(Cursor::new(Vec::new()), w as u32, h as u32)
                .unwrap()
                .with_mpp(Some(mpp)),
        ),
        csv: Some(CsvWriter::new(Vec::new(), Some(mpp)).unwrap()),
        geojson: Some(
            GeoJsonWriter::new(Vec::new())
                .unwrap()
                .with_mpp(Some(mpp))
                .with_uuid_seed(42),
        ),
    };
    for y in 0..h {
        lab.push_row(
            &mask.data[y * w..(y + 1) * w],
            &rgb.data[3 * y * w..3 * (y + 1) * w],
            &mut sink,
        )
        .unwrap();
    }
    let summary = lab.finish(&mut sink).unwrap();
    let (tif, csv, geo) = sink.finish().unwrap();
    let (tif, csv, geo) = (tif.unwrap().into_inner(), csv.unwrap(), geo.unwrap());
    assert!((25..=45).contains(&summary.count), "{summary}");

    // The label TIFF.
    let mut dec = tiff::decoder::Decoder::new(Cursor::new(&tif)).unwrap();
    assert_eq!(dec.dimensions().unwrap(), (w as u32, h as u32));
    assert_eq!(
        dec.colortype().unwrap(),
        tiff::ColorType::Gray(16),
        "16-bit grey"
    );
    let tiff::decoder::DecodingResult::U16(px) = dec.read_image().unwrap() else {
        panic!("not u16")
    };
    let mut tiff_area: BTreeMap<u32, u64> = BTreeMap::new();
    let mut tiff_sum: BTreeMap<u32, (f64, f64)> = BTreeMap::new();
    for y in 0..h {
        for x in 0..w {
            let l = u32::from(px[y * w + x]);
            if l != 0 {
                *tiff_area.entry(l).or_default() += 1;
                let s = tiff_sum.entry(l).or_default();
                s.0 += x as f64 + 0.5;
                s.1 += y as f64 + 0.5;
            }
            assert_eq!(l != 0, mask.data[y * w + x] > 127, "({x},{y})");
        }
    }
    let max_label = *tiff_area.keys().max().unwrap();
    assert_eq!(max_label as u64, summary.count);
    assert_eq!(tiff_area.len() as u64, summary.count);

    // The CSV.
    let text = String::from_utf8(csv).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some(CSV_HEADER));
    let mut csv_rows: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for line in lines {
        let f: Vec<String> = line.split(',').map(str::to_string).collect();
        assert_eq!(f.len(), 14, "{line}");
        csv_rows.insert(f[0].parse().unwrap(), f);
    }
    assert_eq!(csv_rows.len() as u64, summary.count);
    for (id, f) in &csv_rows {
        let area: u64 = f[1].parse().unwrap();
        assert_eq!(area, tiff_area[id], "id {id}");
        let um2: f64 = f[2].parse().unwrap();
        assert!((um2 - area as f64 * mpp * mpp).abs() < 1e-3);
        let (sx, sy) = tiff_sum[id];
        let cx: f64 = f[3].parse().unwrap();
        let cy: f64 = f[4].parse().unwrap();
        assert!((cx - sx / area as f64).abs() <= 6e-4, "id {id}");
        assert!((cy - sy / area as f64).abs() <= 6e-4, "id {id}");
    }

    // The GeoJSON.
    let v: serde_json::Value = serde_json::from_slice(&geo).unwrap();
    assert_eq!(v["type"], "FeatureCollection");
    let feats = v["features"].as_array().unwrap();
    assert_eq!(feats.len() as u64, summary.count);
    let mut uuids = HashSet::new();
    let (mut holes, mut multi) = (0, 0);
    for f in feats {
        assert_eq!(f["type"], "Feature");
        let p = &f["properties"];
        assert_eq!(p["objectType"], "detection");
        assert_eq!(p["classification"]["name"], "Nucleus");
        assert_eq!(p["classification"]["color"].as_array().unwrap().len(), 3);
        let id = p["medfastsam_id"].as_u64().unwrap() as u32;
        let uuid = f["id"].as_str().unwrap();
        assert_eq!(uuid.len(), 36);
        assert!(uuids.insert(uuid.to_string()));
        let m = &p["measurements"];
        assert_eq!(m["Area px"].as_f64().unwrap() as u64, tiff_area[&id]);
        assert!(m["Area µm^2"].as_f64().is_some());
        let polys: Vec<&serde_json::Value> = match f["geometry"]["type"].as_str().unwrap() {
            "Polygon" => vec![&f["geometry"]["coordinates"]],
            "MultiPolygon" => {
                multi += 1;
                f["geometry"]["coordinates"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .collect()
            }
            t => panic!("{t}"),
        };
        let mut area2 = 0.0;
        for poly in polys {
            let rings = poly.as_array().unwrap();
            assert!(ring_area2(&rings[0]) > 0.0, "outer ring: right-hand rule");
            area2 += ring_area2(&rings[0]);
            for hole in &rings[1..] {
                holes += 1;
                assert!(ring_area2(hole) < 0.0, "hole: opposite orientation");
                area2 -= ring_area2(hole).abs();
            }
        }
        assert_eq!(area2 / 2.0, tiff_area[&id] as f64, "id {id}: shoelace area");
        let perim = m["Perimeter px"].as_f64().unwrap();
        assert_eq!(perim.to_string(), csv_rows[&id][9], "id {id}");
    }
    assert!(holes >= 1, "the annulus has a hole");
    assert!(multi >= 1, "the diagonal touch gives a MultiPolygon");
}

#[test]
fn label_tiffs_hold_16_and_32_bit_ids_and_refuse_overflow() {
    let rows: Vec<Vec<u32>> = (0..70u32)
        .map(|y| (0..5u32).map(|x| y * 1000 + x).collect())
        .collect();
    // 32-bit: every id comes back.
    let mut t = LabelTiffWriter::create32(Cursor::new(Vec::new()), 5, 70).unwrap();
    for r in &rows {
        t.write_row(r).unwrap();
    }
    let bytes = t.finish().unwrap().into_inner();
    let mut dec = tiff::decoder::Decoder::new(Cursor::new(&bytes)).unwrap();
    assert_eq!(dec.colortype().unwrap(), tiff::ColorType::Gray(32));
    let tiff::decoder::DecodingResult::U32(px) = dec.read_image().unwrap() else {
        panic!("not u32")
    };
    assert_eq!(px, rows.concat());
    // 16-bit: an id above 65535 is a clear error.
    let mut t = LabelTiffWriter::create(Cursor::new(Vec::new()), 5, 70).unwrap();
    let e = (0..70)
        .map(|y| t.write_row(&rows[y]))
        .find(|r| r.is_err())
        .unwrap()
        .unwrap_err();
    assert!(e.to_string().contains("16-bit"), "{e}");
    assert_eq!(
        label_bits_for(20_000, 20_000, &InstanceOptions::default()),
        LabelBits::U32
    );
    assert_eq!(
        label_bits_for(512, 512, &InstanceOptions::default()),
        LabelBits::U16
    );
}
