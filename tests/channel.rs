//! Channel and stain transforms (`--channel`, `--stain-vectors`) and the trained-on record:
//! colour deconvolution gives back known concentrations of synthetic stained images, Macenko
//! finds known stain vectors, the row-by-row transform equals the whole-image one, and from the
//! command line a fluorescence nuclei model warns on the H&E tile as it is and gives a nuclei
//! mask through the haematoxylin channel, while the fluorescence image's mask is unchanged.

mod common;

use common::cli::{repo, run, run_owned, tmpdir};
use medfastsam::channel::*;
use medfastsam::io::{self, RgbImage};
use medfastsam::rng::Rng;
use medfastsam::stream::{MemoryRows, RowSource};
use medfastsam::trained_on::{Polarity, TrainedOn};

/// The largest concentration error 8-bit rounding of the RGB can cause at pixel `px`: half a
/// grey level of optical density per channel (|dOD/dI| = 1 / ((I + 1) ln 10)), through the
/// inverse's column.
fn rounding_bound(m: &StainMatrix, row: usize, px: [u8; 3]) -> f64 {
    let inv = m.inverse().unwrap();
    (0..3)
        .map(|c| inv[c][row].abs() * 0.5 / ((px[c] as f64 + 0.5) * std::f64::consts::LN_10))
        .sum::<f64>()
        + 1e-9
}

fn known_concentrations(channel: Channel, m: StainMatrix, row: usize) {
    let t = ChannelTransform::with_matrix(channel, StainVectors::Standard, Some(m));
    let mut rng = Rng::new(11);
    let mut worst = 0.0f64;
    let mut checked = 0;
    for _ in 0..20_000 {
        let c = [rng.uniform() * 1.2, rng.uniform() * 1.2, 0.0];
        let px = m.to_rgb(c);
        if px.contains(&0) {
            continue; // saturated: the concentration is not recoverable
        }
        let got = t.concentration(px);
        let err = (got - c[row]).abs();
        let bound = rounding_bound(&m, row, px);
        assert!(
            err <= bound,
            "{}: concentrations {c:?} -> RGB {px:?} -> {got} (error {err} > rounding bound {bound})",
            channel.name()
        );
        worst = worst.max(err);
        checked += 1;
    }
    assert!(checked > 15_000, "{checked}");
    println!(
        "{}: worst error {worst:.4} over {checked} pixels",
        channel.name()
    );
}

#[test]
fn deconvolution_gives_back_known_concentrations() {
    known_concentrations(Channel::Hematoxylin, StainMatrix::he(), 0);
    known_concentrations(Channel::Eosin, StainMatrix::he(), 1);
    known_concentrations(Channel::Dab, StainMatrix::hdab(), 1);
}

#[test]
fn standard_vectors_are_ruifrok_and_johnston() {
    // The published H&E and DAB optical densities, as unit vectors.
    let unit = |v: [f64; 3]| {
        let n = (v[0] * v[0] + v[1] * v[1] + v[2] * v[2]).sqrt();
        v.map(|x| x / n)
    };
    let he = StainMatrix::he().0;
    let hd = StainMatrix::hdab().0;
    for (got, want) in [
        (he[0], unit([0.65, 0.70, 0.29])),
        (he[1], unit([0.07, 0.99, 0.11])),
        (hd[1], unit([0.27, 0.57, 0.78])),
    ] {
        for k in 0..3 {
            assert!((got[k] - want[k]).abs() < 1e-12, "{got:?} vs {want:?}");
        }
    }
}

/// Angle in degrees between two vectors.
fn angle(a: [f64; 3], b: [f64; 3]) -> f64 {
    let d: f64 = (0..3).map(|k| a[k] * b[k]).sum();
    let n = |v: [f64; 3]| (v[0] * v[0] + v[1] * v[1] + v[2] * v[2]).sqrt();
    (d / (n(a) * n(b))).clamp(-1.0, 1.0).acos().to_degrees()
}

#[test]
fn macenko_finds_the_stains_of_a_synthetic_slide() {
    // Stains 8° and 10° away from the standard H&E ones, mixed in random proportions on a
    // bright background with some unstained pixels.
    let h = [0.55, 0.76, 0.35];
    let e = [0.15, 0.97, 0.20];
    let truth = StainMatrix::from_two(h, e);
    assert!(angle(truth.0[0], StainMatrix::he().0[0]) > 5.0);
    let mut rng = Rng::new(3);
    let (w, hgt) = (300, 200);
    let mut data = Vec::with_capacity(w * hgt * 3);
    for _ in 0..w * hgt {
        let r = rng.uniform();
        let c = if r < 0.3 {
            [0.0, 0.0, 0.0] // background
        } else if r < 0.45 {
            [0.3 + rng.uniform(), 0.0, 0.0] // pure haematoxylin
        } else if r < 0.6 {
            [0.0, 0.3 + rng.uniform(), 0.0] // pure eosin
        } else {
            [0.2 + rng.uniform() * 0.8, 0.2 + rng.uniform() * 0.8, 0.0]
        };
        data.extend(truth.to_rgb(c));
    }
    let img = RgbImage {
        width: w,
        height: hgt,
        data,
    };
    let (t, note) = ChannelTransform::for_image(Channel::Hematoxylin, StainVectors::Macenko, &img);
    assert!(note.is_none(), "{note:?}");
    let m = t.matrix.unwrap();
    let (dh, de) = (angle(m.0[0], truth.0[0]), angle(m.0[1], truth.0[1]));
    println!("Macenko: haematoxylin off by {dh:.2}°, eosin by {de:.2}°");
    assert!(dh < 2.0 && de < 2.0, "haematoxylin {dh}°, eosin {de}°");
    // With the estimated vectors the haematoxylin of the pure-eosin pixels is about zero.
    let pure_e = truth.to_rgb([0.0, 0.8, 0.0]);
    assert!(
        t.concentration(pure_e).abs() < 0.05,
        "{}",
        t.concentration(pure_e)
    );
    // A flat image has nothing to estimate from: the standard vectors, and a note saying so.
    let flat = RgbImage {
        width: 20,
        height: 20,
        data: vec![250; 1200],
    };
    let (t, note) = ChannelTransform::for_image(Channel::Hematoxylin, StainVectors::Macenko, &flat);
    assert_eq!(t.matrix, Some(StainMatrix::he()));
    assert!(note.unwrap().contains("standard"));
}

#[test]
fn grey_invert_and_the_display_range() {
    let px = [200u8, 100, 50];
    let mut row = px.to_vec();
    ChannelTransform::standard(Channel::Grey).apply_row(&mut row);
    let y = ((2989 * 200 + 5870 * 100 + 1140 * 50) as f64 / 10000.0).round() as u8;
    assert_eq!(row, vec![y; 3]);
    let mut row = px.to_vec();
    ChannelTransform::standard(Channel::Invert).apply_row(&mut row);
    assert_eq!(row, vec![55, 155, 205]);
    // The stain channels draw the image's median concentration black and its 99.5th percentile
    // white: a two-level image of 70 % background and 30 % nuclei.
    let m = StainMatrix::he();
    let (bg, nuc) = (m.to_rgb([0.05, 0.3, 0.0]), m.to_rgb([0.9, 0.1, 0.0]));
    let data: Vec<u8> = (0..1000)
        .flat_map(|i| if i % 10 < 7 { bg } else { nuc })
        .collect();
    let img = RgbImage {
        width: 100,
        height: 10,
        data,
    };
    let (t, _) = ChannelTransform::for_image(Channel::Hematoxylin, StainVectors::Standard, &img);
    let out = t.apply(&img);
    assert_eq!(&out.data[..3], &[0, 0, 0], "background");
    assert_eq!(&out.data[21..24], &[255, 255, 255], "nuclei");
}

#[test]
fn row_by_row_equals_the_whole_image() {
    let img = io::load_rgb(&repo("data/he/stardist-histo.jpg")).unwrap();
    for (ch, v) in [
        (Channel::Hematoxylin, StainVectors::Standard),
        (Channel::Eosin, StainVectors::Macenko),
        (Channel::Dab, StainVectors::Standard),
        (Channel::Invert, StainVectors::Standard),
    ] {
        let mut pass = MemoryRows::new(&img);
        let (t, _) = transform_from_rows(ch, v, &mut pass).unwrap();
        let mut rows = ChannelRows::new(MemoryRows::new(&img), t.clone());
        let mut got = vec![0u8; img.width * 3];
        let (whole, _) = ChannelTransform::for_image(ch, v, &img);
        let want = whole.apply(&img);
        // The row pass samples on a grid, the in-memory one along the pixels: ranges may differ
        // by a little; the transform given the same fit must agree exactly.
        let same = t.apply(&img);
        for y in 0..img.height {
            rows.read_row(&mut got).unwrap();
            assert_eq!(got, same.data[y * img.width * 3..(y + 1) * img.width * 3]);
        }
        let diff = same
            .data
            .iter()
            .zip(&want.data)
            .map(|(a, b)| (*a as i32 - *b as i32).abs())
            .max()
            .unwrap();
        assert!(
            diff <= 12,
            "{}: row pass vs in-memory fit differ by {diff}",
            ch.name()
        );
    }
}

/// `segment` with the demo model (tiny preset trained on the fluorescence nuclei image): stdout
/// and stderr, and the mask.
fn segment(image: &str, extra: &[&str], out: &std::path::Path) -> (String, Vec<u8>) {
    let weights = repo("web/demo/tiny-nuclei.f16.safetensors");
    let mut args = vec![
        "segment",
        image,
        "--weights",
        weights.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend(extra);
    let (code, text) = run(&args);
    assert_eq!(code, 0, "{text}");
    let stem = std::path::Path::new(image)
        .file_stem()
        .unwrap()
        .to_str()
        .unwrap();
    let mask = io::load_gray(&out.join(format!("{stem}_mask.png"))).unwrap();
    (text, mask.data)
}

fn fraction(mask: &[u8]) -> f64 {
    mask.iter().filter(|&&v| v > 127).count() as f64 / mask.len() as f64
}

#[test]
fn a_fluorescence_model_on_he_warns_and_the_hematoxylin_channel_gives_nuclei() {
    let he = repo("data/he/stardist-histo.jpg");
    let he = he.to_str().unwrap();
    let d = tmpdir("he");
    let (text, rgb) = segment(he, &[], &d.join("rgb"));
    let fg_rgb = fraction(&rgb);
    assert!(text.contains("channel rgb"), "{text}");
    assert!(
        text.contains("warning:") && text.contains("came out as foreground"),
        "no warning at {:.1} % foreground:\n{text}",
        fg_rgb * 100.0
    );
    assert!(text.contains("try the channel hematoxylin"), "{text}");
    let (text, hem) = segment(he, &["--channel", "hematoxylin"], &d.join("h"));
    let fg_h = fraction(&hem);
    println!(
        "H&E tile: {:.1} % foreground as RGB, {:.1} % through haematoxylin",
        fg_rgb * 100.0,
        fg_h * 100.0
    );
    assert!(!text.contains("warning:"), "{text}");
    assert!(fg_rgb > 0.8, "{fg_rgb}");
    assert!((0.1..0.5).contains(&fg_h), "{fg_h}");
    // The mask follows the haematoxylin: the masked pixels are far more stained than the rest.
    let img = io::load_rgb(&repo("data/he/stardist-histo.jpg")).unwrap();
    let t = ChannelTransform::standard(Channel::Hematoxylin);
    let (mut s, mut n) = ([0.0f64; 2], [0usize; 2]);
    for (p, &m) in img.data.chunks_exact(3).zip(&hem) {
        let k = usize::from(m > 127);
        s[k] += t.concentration([p[0], p[1], p[2]]);
        n[k] += 1;
    }
    let (inside, outside) = (s[1] / n[1] as f64, s[0] / n[0] as f64);
    println!("mean haematoxylin inside the mask {inside:.3}, outside {outside:.3}");
    assert!(inside > 1.5 * outside, "inside {inside}, outside {outside}");
    // Macenko's vectors give a similar mask.
    let (_, mac) = segment(
        he,
        &["--channel", "hematoxylin", "--stain-vectors", "macenko"],
        &d.join("m"),
    );
    assert!((0.1..0.5).contains(&fraction(&mac)));
    assert!(common::dice(&mac, &hem) > 0.8);
}

#[test]
fn the_fluorescence_image_is_unchanged_by_the_default_channel() {
    let nuc = repo("data/dsb2018-nuclei/image.tif");
    let nuc = nuc.to_str().unwrap();
    let d = tmpdir("nuc");
    let (text, default) = segment(nuc, &[], &d.join("default"));
    assert!(!text.contains("warning:"), "{text}");
    let (_, rgb) = segment(nuc, &["--channel", "rgb"], &d.join("rgb"));
    assert_eq!(default, rgb, "the recorded channel (rgb) changed the mask");
    let truth: Vec<u8> = io::load_gray(&repo("data/dsb2018-nuclei/labels.tif"))
        .unwrap()
        .data
        .iter()
        .map(|&v| if v > 0 { 255 } else { 0 })
        .collect();
    let dice = common::dice(&default, &truth);
    println!("nuclei image: Dice {dice:.3} against its labels");
    assert!(dice > 0.85, "{dice}");
}

#[test]
fn training_records_its_channel_and_the_measured_polarity() {
    // Four 64² crops of the fluorescence image with their masks; trained through `invert` the
    // nuclei are dark objects, and the record says so.
    let d = tmpdir("data");
    std::fs::create_dir_all(d.join("images")).unwrap();
    std::fs::create_dir_all(d.join("masks")).unwrap();
    let img = io::load_rgb(&repo("data/dsb2018-nuclei/image.tif")).unwrap();
    let lab = io::load_gray(&repo("data/dsb2018-nuclei/labels.tif")).unwrap();
    for k in 0..4 {
        let (x, y) = (k * 100, 150);
        std::fs::write(
            d.join(format!("images/c{k}.png")),
            io::encode_png_rgb(&img.crop(x, y, 64, 64)).unwrap(),
        )
        .unwrap();
        std::fs::write(
            d.join(format!("masks/c{k}.png")),
            io::encode_png_gray(&lab.crop(x, y, 64, 64)).unwrap(),
        )
        .unwrap();
    }
    let record = |channel: &str| {
        let out = tmpdir(&format!("train-{channel}"));
        let args: Vec<String> = [
            "train",
            "--data",
            d.to_str().unwrap(),
            "--format",
            "generic",
            "--split",
            "all",
            "--preset",
            "tiny",
            "--size",
            "64",
            "--epochs",
            "1",
            "--batch",
            "2",
            "--max-steps",
            "1",
            "--channel",
            channel,
            "--modality",
            "fluorescence",
            "--out",
            out.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let (code, text) = run_owned(&args);
        assert_eq!(code, 0, "{text}");
        let w = medfastsam::model::Weights::load(&out.join("checkpoint.safetensors")).unwrap();
        (
            TrainedOn::from_metadata(&w.metadata, "w").unwrap().unwrap(),
            out,
        )
    };
    let (plain, _) = record("rgb");
    assert_eq!(plain.polarity, Some(Polarity::Bright));
    assert_eq!(plain.channel.as_deref(), Some("rgb"));
    assert_eq!(plain.input_size, Some(64));
    assert_eq!(plain.modality.as_deref(), Some("fluorescence"));
    assert_eq!(
        plain.dataset.as_deref(),
        d.file_name().and_then(|n| n.to_str())
    );
    let (inv, out) = record("invert");
    assert_eq!(inv.polarity, Some(Polarity::Dark));
    assert_eq!(inv.channel.as_deref(), Some("invert"));
    // Inference applies the recorded channel, and `info` shows the record.
    let ck = out.join("checkpoint.safetensors");
    let (code, text) = run(&["info", ck.to_str().unwrap()]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("trained on:    fluorescence, dark objects, 64 px, channel invert"),
        "{text}"
    );
    let crop = d.join("images/c0.png");
    let (code, text) = run(&[
        "segment",
        crop.to_str().unwrap(),
        "--weights",
        ck.to_str().unwrap(),
        "--out",
        tmpdir("seg-inv").to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("channel invert"), "{text}");
}

#[test]
fn bad_channel_names_and_images_as_weights_are_refused_clearly() {
    let img = repo("data/he/stardist-histo.jpg");
    let (code, text) = run(&[
        "segment",
        img.to_str().unwrap(),
        "--weights",
        repo("web/demo/tiny-nuclei.f16.safetensors")
            .to_str()
            .unwrap(),
        "--channel",
        "purple",
        "--out",
        tmpdir("bad").to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert!(text.contains("unknown channel 'purple'"), "{text}");
    let (code, text) = run(&[
        "segment",
        img.to_str().unwrap(),
        "--weights",
        img.to_str().unwrap(),
        "--out",
        tmpdir("bad2").to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert!(
        text.contains("stardist-histo.jpg")
            && text.contains("this is an image (JPEG), not weights"),
        "{text}"
    );
}
