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

/// `segment INPUTS --weights <tiny fixture> --config <its config> EXTRA --out OUT`.
fn segment_tiny(inputs: &[&Path], extra: &[&str], out: &Path) -> (i32, String) {
    let w = repo("tests/data/fixtures/tiny.weights.safetensors");
    let cfg = repo("tests/data/fixtures/tiny.config.json");
    let mut a: Vec<&str> = vec!["segment"];
    a.extend(inputs.iter().map(|p| s(p)));
    a.extend(["--weights", s(&w), "--config", s(&cfg)]);
    a.extend_from_slice(extra);
    a.extend(["--out", s(out)]);
    run(&a)
}

#[test]
fn instances_from_a_tiled_image_equal_the_in_memory_labelling() {
    let d = tmpdir("objects-cli");
    let img_path = repo("data/dsb2018-nuclei/image.tif");
    let out = d.join("tiled");
    let (code, text) = segment_tiny(
        &[&img_path],
        &["--instances", "--geojson", "--min-area", "5"],
        &out,
    );
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
    let img_path = repo("data/dsb2018-nuclei/image.tif");
    let out = d.join("region");
    let (code, text) = segment_tiny(
        &[&img_path],
        &[
            "--region",
            "100,60,300,200",
            "--instances",
            "--min-area",
            "5",
        ],
        &out,
    );
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
    let (code, text) = segment_tiny(&[&img_path], &["--region", "400,0,200,10"], &d.join("bad"));
    assert_ne!(code, 0);
    assert!(
        text.contains("512x512") && text.contains("region"),
        "{text}"
    );
}

/// GeoJSON outlines of a pyramid level's mask land on level-0 pixels: (p + offset) × downsample;
/// the measurements stay in the analysed pixels.
#[test]
fn geojson_outlines_of_a_level_are_in_level_0_pixels() {
    use medfastsam::instances::GeoJsonWriter;
    let mut mask = io::GrayImage {
        width: 20,
        height: 10,
        data: vec![0; 200],
    };
    for y in 2..6 {
        for x in 3..8 {
            mask.data[y * 20 + x] = 255;
        }
    }
    let rgb = io::RgbImage {
        width: 20,
        height: 10,
        data: vec![100; 600],
    };
    let (_, objects, _) = label_image(&mask, &rgb, &InstanceOptions::default()).unwrap();
    assert_eq!(objects.len(), 1);
    let mut g = GeoJsonWriter::new(Vec::new())
        .unwrap()
        .with_offset(100, 50)
        .with_downsample(4.0);
    g.write(&objects[0]).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&g.finish().unwrap()).unwrap();
    let f = &v["features"][0];
    let ring = f["geometry"]["coordinates"][0].as_array().unwrap();
    let xs: Vec<f64> = ring.iter().map(|p| p[0].as_f64().unwrap()).collect();
    let ys: Vec<f64> = ring.iter().map(|p| p[1].as_f64().unwrap()).collect();
    let (x0, x1) = (
        xs.iter().cloned().fold(f64::MAX, f64::min),
        xs.iter().cloned().fold(0.0, f64::max),
    );
    let (y0, y1) = (
        ys.iter().cloned().fold(f64::MAX, f64::min),
        ys.iter().cloned().fold(0.0, f64::max),
    );
    // pixels 3..8 × 2..6 of the level, region corner (100, 50), downsample 4
    assert_eq!((x0, x1, y0, y1), (412.0, 432.0, 208.0, 224.0));
    assert_eq!(
        f["properties"]["measurements"]["Area px"].as_f64(),
        Some(20.0)
    );
}

/// A streamed image that turns out truncated half-way: one error line naming the file once, no
/// output and no temporary file left, and the other input of the run still written.
#[test]
fn a_truncated_streamed_image_leaves_nothing_behind() {
    let d = tmpdir("objects-cut");
    let img = io::load_rgb(&repo("data/dsb2018-nuclei/image.tif")).unwrap();
    let png = io::encode_png_rgb(&img).unwrap();
    let cut = d.join("cut.png");
    std::fs::write(&cut, &png[..png.len() * 2 / 3]).unwrap();
    let good = d.join("good.png");
    std::fs::write(&good, &png).unwrap();
    let out = d.join("out");
    let (code, text) = segment_tiny(&[&cut, &good], &["--instances", "--geojson"], &out);
    assert_eq!(code, 1, "{text}");
    let errs: Vec<&str> = text.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errs.len(), 1, "{text}");
    assert_eq!(errs[0].matches("cut.png").count(), 1, "{}", errs[0]);
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "good_labels.tif",
            "good_mask.png",
            "good_objects.csv",
            "good_objects.geojson",
            "good_overlay.png"
        ]
    );
}
