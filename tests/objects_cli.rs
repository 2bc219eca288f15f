//! `segment --instances --geojson` end to end: the label TIFF the command streams equals the
//! library's in-memory labelling of the mask it wrote (so objects crossing window seams are one
//! object, labelled once), the CSV and GeoJSON describe the same objects, a region's objects are
//! placed in the file's coordinates, and prompted weights are refused.

mod common;

use common::cli::{repo, run, s, tmpdir};
use medfastsam::instances::{InstanceOptions, label_image};
use medfastsam::io;
use std::path::Path;

fn read_labels(p: &Path) -> (usize, usize, Vec<u32>) {
    let f = std::fs::File::open(p).unwrap();
    let mut dec = tiff::decoder::Decoder::new(std::io::BufReader::new(f)).unwrap();
    let (w, h) = dec.dimensions().unwrap();
    let px = match dec.read_image().unwrap() {
        tiff::decoder::DecodingResult::U16(v) => v.into_iter().map(u32::from).collect(),
        tiff::decoder::DecodingResult::U32(v) => v,
        _ => panic!("label image is neither 16- nor 32-bit"),
    };
    (w as usize, h as usize, px)
}

struct CsvRow {
    id: u32,
    area: u64,
    cx: f64,
    cy: f64,
}

fn read_csv(p: &Path) -> Vec<CsvRow> {
    let text = std::fs::read_to_string(p).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let col = |n: &str| header.iter().position(|h| *h == n).unwrap();
    let (ci, ca, cx, cy) = (
        col("id"),
        col("area_px"),
        col("centroid_x"),
        col("centroid_y"),
    );
    lines
        .map(|l| {
            let v: Vec<&str> = l.split(',').collect();
            CsvRow {
                id: v[ci].parse().unwrap(),
                area: v[ca].parse().unwrap(),
                cx: v[cx].parse().unwrap(),
                cy: v[cy].parse().unwrap(),
            }
        })
        .collect()
}

/// Pixel count and centroid (pixel centres) of each label 1..=max.
fn per_label(labels: &[u32], w: usize) -> Vec<(u64, f64, f64)> {
    let max = labels.iter().copied().max().unwrap_or(0) as usize;
    let mut acc = vec![(0u64, 0f64, 0f64); max + 1];
    for (i, &l) in labels.iter().enumerate() {
        if l > 0 {
            let a = &mut acc[l as usize];
            a.0 += 1;
            a.1 += (i % w) as f64 + 0.5;
            a.2 += (i / w) as f64 + 0.5;
        }
    }
    acc.into_iter()
        .skip(1)
        .map(|(n, x, y)| (n, x / n.max(1) as f64, y / n.max(1) as f64))
        .collect()
}

#[test]
fn instances_from_a_tiled_image_equal_the_in_memory_labelling() {
    let d = tmpdir("objects-cli");
    let w = repo("tests/data/fixtures/tiny.weights.safetensors");
    let cfg = repo("tests/data/fixtures/tiny.config.json");
    let img_path = repo("data/dsb2018-nuclei/image.tif");
    let out = d.join("tiled");
    let (code, text) = run(&[
        "segment",
        s(&img_path),
        "--weights",
        s(&w),
        "--config",
        s(&cfg),
        "--instances",
        "--geojson",
        "--min-area",
        "5",
        "--out",
        s(&out),
    ]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("windows of 256x256") && text.contains("nuclei, mean area"),
        "{text}"
    );
    let mask = io::load_gray(&out.join("image_mask.png")).unwrap();
    let img = io::load_rgb(&img_path).unwrap();
    let opts = InstanceOptions {
        min_area: 5,
        ..Default::default()
    };
    let (want, objects, summary) = label_image(&mask, &img, &opts).unwrap();
    assert!(summary.count > 0, "the mask holds objects");
    let (lw, lh, labels) = read_labels(&out.join("image_labels.tif"));
    assert_eq!((lw, lh), (512, 512));
    assert_eq!(
        labels, want,
        "streamed labels differ from the in-memory labelling"
    );
    // Every labelled pixel is foreground in the mask.
    assert!(
        labels
            .iter()
            .zip(&mask.data)
            .all(|(&l, &m)| l == 0 || m > 127)
    );
    // The windows' seams (x or y at 224..256 and 256..288 for 256² windows overlapping by 32)
    // cut through objects that are nonetheless one object each.
    let seam_objects = objects
        .iter()
        .filter(|o| (o.bbox[0] < 240 && o.bbox[2] > 272) || (o.bbox[1] < 240 && o.bbox[3] > 272))
        .count();
    eprintln!(
        "{} objects, {seam_objects} across a window seam",
        objects.len()
    );
    assert!(
        seam_objects > 0,
        "no object crosses a seam: the check would be empty"
    );
    // CSV: one row per label with its pixel count and centroid.
    let rows = read_csv(&out.join("image_objects.csv"));
    let stats = per_label(&labels, 512);
    assert_eq!(rows.len(), stats.len());
    assert_eq!(rows.len() as u64, summary.count);
    for (r, (n, x, y)) in rows.iter().zip(&stats) {
        assert_eq!(r.area, *n, "object {}", r.id);
        assert!(
            (r.cx - x).abs() < 2e-3 && (r.cy - y).abs() < 2e-3,
            "object {}",
            r.id
        );
    }
    // GeoJSON: one detection per object.
    let g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("image_objects.geojson")).unwrap())
            .unwrap();
    let feats = g["features"].as_array().unwrap();
    assert_eq!(feats.len(), rows.len());
    assert!(
        feats
            .iter()
            .all(|f| f["properties"]["objectType"] == "detection")
    );
    // No temporary file is left.
    for e in std::fs::read_dir(&out).unwrap() {
        let n = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!n.ends_with(".tmp"), "{n} left behind");
    }
}

#[test]
fn a_regions_objects_are_placed_in_the_files_coordinates() {
    let d = tmpdir("objects-region");
    let w = repo("tests/data/fixtures/tiny.weights.safetensors");
    let cfg = repo("tests/data/fixtures/tiny.config.json");
    let img_path = repo("data/dsb2018-nuclei/image.tif");
    let out = d.join("region");
    let (code, text) = run(&[
        "segment",
        s(&img_path),
        "--weights",
        s(&w),
        "--config",
        s(&cfg),
        "--region",
        "100,60,300,200",
        "--instances",
        "--min-area",
        "5",
        "--out",
        s(&out),
    ]);
    assert_eq!(code, 0, "{text}");
    let (lw, lh, labels) = read_labels(&out.join("image_labels.tif"));
    assert_eq!((lw, lh), (300, 200), "the label image covers the region");
    let rows = read_csv(&out.join("image_objects.csv"));
    let stats = per_label(&labels, 300);
    assert_eq!(rows.len(), stats.len());
    for (r, (_, x, y)) in rows.iter().zip(&stats) {
        assert!(
            (r.cx - (x + 100.0)).abs() < 2e-3 && (r.cy - (y + 60.0)).abs() < 2e-3,
            "object {}: CSV centroid ({}, {}), label centroid in the region ({x}, {y})",
            r.id,
            r.cx,
            r.cy
        );
    }
    // A region outside the image names the image's size.
    let (code, text) = run(&[
        "segment",
        s(&img_path),
        "--weights",
        s(&w),
        "--config",
        s(&cfg),
        "--region",
        "400,0,200,10",
        "--out",
        s(&d.join("bad")),
    ]);
    assert_ne!(code, 0);
    assert!(
        text.contains("512x512") && text.contains("region"),
        "{text}"
    );
}
