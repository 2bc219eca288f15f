//! Hostile inputs (issue 8): images whose header declares a huge size, truncated images of every
//! format, configurations with zero, overflowing or inconsistent fields, weights whose shapes or
//! offsets lie. Each must be a one-line error naming the file or field, never a panic, an abort or
//! a silently "repaired" result.

mod common;

use common::cli::{repo, run_env, tmpdir};
use common::*;
use medfastsam::io::{self, DecodeLimits};
use medfastsam::model::{Config, Weights};
use std::path::Path;

// ---------------------------------------------------------------------------------------------
// Hand-made image files

fn crc32(bytes: &[u8]) -> u32 {
    let mut c = 0xFFFF_FFFFu32;
    for &b in bytes {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

fn adler32(bytes: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for &v in bytes {
        a = (a + v as u32) % 65521;
        b = (b + a) % 65521;
    }
    b << 16 | a
}

fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend((data.len() as u32).to_be_bytes());
    let mut c = kind.to_vec();
    c.extend_from_slice(data);
    out.extend_from_slice(&c);
    out.extend(crc32(&c).to_be_bytes());
}

/// A complete, well-formed PNG (valid CRCs, IEND) that declares `w`×`h` RGB 8-bit and carries one
/// byte of image data: 69 bytes.
fn huge_png(w: u32, h: u32) -> Vec<u8> {
    let mut out = vec![0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];
    let mut ihdr = Vec::new();
    ihdr.extend(w.to_be_bytes());
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    png_chunk(&mut out, b"IHDR", &ihdr);
    // zlib: header, one stored block holding a single filter byte, adler32.
    let raw = [0u8];
    let mut z = vec![0x78, 0x01, 0x01, 0x01, 0x00, 0xFE, 0xFF];
    z.extend_from_slice(&raw);
    z.extend(adler32(&raw).to_be_bytes());
    png_chunk(&mut out, b"IDAT", &z);
    png_chunk(&mut out, b"IEND", &[]);
    out
}

/// A little-endian baseline TIFF that declares `w`×`h` RGB 8-bit, one uncompressed strip, with a
/// few bytes of pixel data.
fn huge_tiff(w: u32, h: u32) -> Vec<u8> {
    let entries: &[(u16, u16, u32, u32)] = &[
        (256, 4, 1, w),           // ImageWidth LONG
        (257, 4, 1, h),           // ImageLength LONG
        (258, 3, 3, 0),           // BitsPerSample SHORT[3] at an offset (patched below)
        (259, 3, 1, 1),           // Compression none
        (262, 3, 1, 2),           // Photometric RGB
        (273, 4, 1, 0),           // StripOffsets (patched)
        (277, 3, 1, 3),           // SamplesPerPixel
        (278, 4, 1, h),           // RowsPerStrip
        (279, 4, 1, 0xFFFF_FFFF), // StripByteCounts
        (284, 3, 1, 1),           // PlanarConfiguration chunky
    ];
    let ifd_len = 2 + entries.len() * 12 + 4;
    let bps_at = 8 + ifd_len as u32;
    let data_at = bps_at + 6;
    let mut out = b"II*\0".to_vec();
    out.extend(8u32.to_le_bytes());
    out.extend((entries.len() as u16).to_le_bytes());
    for &(tag, typ, count, value) in entries {
        let value = match tag {
            258 => bps_at,
            273 => data_at,
            _ => value,
        };
        out.extend(tag.to_le_bytes());
        out.extend(typ.to_le_bytes());
        out.extend(count.to_le_bytes());
        if typ == 3 && count == 1 {
            out.extend((value as u16).to_le_bytes());
            out.extend([0, 0]);
        } else {
            out.extend(value.to_le_bytes());
        }
    }
    out.extend(0u32.to_le_bytes());
    for _ in 0..3 {
        out.extend(8u16.to_le_bytes());
    }
    out.extend([0x80u8; 16]);
    out
}

fn no_panic<T>(what: &str, f: impl FnOnce() -> T) -> T {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(v) => v,
        Err(_) => panic!("{what}: panicked"),
    }
}

#[test]
fn images_declaring_100000_squared_are_refused_from_the_header() {
    let png = huge_png(100_000, 100_000);
    assert_eq!(png.len(), 69);
    let tiff = huge_tiff(100_000, 100_000);
    assert!(tiff.len() < 200, "{}", tiff.len());
    for (bytes, name) in [(&png, "huge.png"), (&tiff, "huge.tif")] {
        let t = std::time::Instant::now();
        let e = no_panic(name, || io::decode_rgb(bytes, name))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with(&format!("{name}: ")), "{e}");
        assert!(
            e.contains("100000x100000") && e.contains("10000 Mpx"),
            "{e}"
        );
        assert!(
            e.contains("pixel budget of 268 Mpx") && e.contains("MEDFASTSAM_MAX_PIXELS"),
            "{e}"
        );
        assert!(!e.contains('\n'), "{e}");
        let g = no_panic(name, || io::decode_gray(bytes, name))
            .unwrap_err()
            .to_string();
        assert!(g.contains("pixel budget"), "{g}");
        assert!(
            t.elapsed().as_secs_f64() < 2.0,
            "{name}: refusing took {:?}",
            t.elapsed()
        );
    }
    // Below the budget the same headers reach the decoder, which then finds the data missing:
    // proof that the budget, not a header error, refused the large ones.
    let small = DecodeLimits::default();
    let e = io::decode_rgb_with(&huge_png(300, 200), "small.png", &small)
        .unwrap_err()
        .to_string();
    assert!(!e.contains("pixel budget"), "{e}");
    let e = io::decode_rgb_with(&huge_tiff(300, 200), "small.tif", &small)
        .unwrap_err()
        .to_string();
    assert!(!e.contains("pixel budget"), "{e}");
}

#[test]
fn the_pixel_budget_is_configurable() {
    // 40x30 grey PNG (1200 pixels).
    let mut bytes = Vec::new();
    image::GrayImage::from_fn(40, 30, |x, y| image::Luma([(x * 6 + y) as u8]))
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .unwrap();
    let e = io::decode_rgb_with(&bytes, "small.png", &DecodeLimits::with_max_pixels(1199))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("40x30") && e.contains("above the pixel budget") && e.contains("(1199 pixels"),
        "{e}"
    );
    let img =
        io::decode_rgb_with(&bytes, "small.png", &DecodeLimits::with_max_pixels(1200)).unwrap();
    assert_eq!((img.width, img.height, img.data[3 * 41]), (40, 30, 7));
    assert_eq!(io::parse_max_pixels("268_435_456"), Ok(1 << 28));
    assert!(io::parse_max_pixels("0").is_err());
    assert!(io::parse_max_pixels("lots").is_err());
    assert!(io::parse_max_pixels("-5").is_err());

    // The process-wide setting (what --max-pixels sets): a 1200x1000 image against 1 Mpx. Other
    // tests of this binary decode images of at most 512x512, below this budget.
    let mut big = Vec::new();
    image::GrayImage::new(1200, 1000)
        .write_to(&mut std::io::Cursor::new(&mut big), image::ImageFormat::Png)
        .unwrap();
    io::set_max_pixels(1_000_000);
    let r = io::decode_rgb(&big, "big.png");
    io::set_max_pixels(0);
    let e = r.unwrap_err().to_string();
    assert!(
        e.contains("1200x1000") && e.contains("pixel budget of 1.00 Mpx"),
        "{e}"
    );
    assert_eq!(io::decode_rgb(&big, "big.png").unwrap().width, 1200);
}

fn cut(bytes: &[u8], percent: usize) -> Vec<u8> {
    bytes[..bytes.len() * percent / 100].to_vec()
}

/// Cuts `bytes` at 2, 10, 50, 90 % and one byte short: each must be an error naming the file and
/// saying it is truncated; the whole file decodes to `size`.
fn assert_truncation_detected(name: &str, bytes: &[u8], size: (usize, usize)) {
    let img = io::decode_rgb(bytes, name).unwrap_or_else(|e| panic!("{name} (whole): {e}"));
    assert_eq!((img.width, img.height), size, "{name}");
    let mut cuts: Vec<(String, Vec<u8>)> = [2, 10, 50, 90]
        .iter()
        .map(|&p| (format!("{p}%"), cut(bytes, p)))
        .collect();
    cuts.push(("all but 1 byte".into(), bytes[..bytes.len() - 1].to_vec()));
    for (what, b) in cuts {
        for r in [
            no_panic(name, || io::decode_rgb(&b, name).map(|_| ())),
            no_panic(name, || io::decode_gray(&b, name).map(|_| ())),
        ] {
            let e = match r {
                Ok(()) => panic!(
                    "{name} cut to {what} ({} of {} bytes) was decoded",
                    b.len(),
                    bytes.len()
                ),
                Err(e) => e.to_string(),
            };
            assert!(
                e.starts_with(&format!("{name}: ")),
                "{name} cut to {what}: {e}"
            );
            assert!(e.contains("truncated"), "{name} cut to {what}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }
}

#[test]
fn truncated_images_are_errors_in_every_format() {
    let jpg = std::fs::read(repo("data/he/stardist-histo.jpg")).unwrap();
    assert_truncation_detected("stardist-histo.jpg", &jpg, (500, 300));
    let png = std::fs::read(repo("data/he/skimage-ihc.png")).unwrap();
    assert_truncation_detected("skimage-ihc.png", &png, (512, 512));
    let tif = std::fs::read(repo("data/dsb2018-nuclei/image.tif")).unwrap();
    assert_truncation_detected("image.tif", &tif, (512, 512));
    // BMP and a progressive-free baseline JPEG / LZW TIFF written here from the H&E tile.
    let rgb = image::load_from_memory(&jpg).unwrap().to_rgb8();
    for (fmt, name) in [
        (image::ImageFormat::Bmp, "he.bmp"),
        (image::ImageFormat::Tiff, "he.tif"),
        (image::ImageFormat::Png, "he.png"),
        (image::ImageFormat::Jpeg, "he.jpg"),
    ] {
        let mut b = Vec::new();
        rgb.write_to(&mut std::io::Cursor::new(&mut b), fmt)
            .unwrap();
        assert_truncation_detected(name, &b, (500, 300));
    }
    // Grey 16-bit PNG (masks and microscopy).
    let mut b = Vec::new();
    image::ImageBuffer::<image::Luma<u16>, _>::from_fn(64, 48, |x, y| {
        image::Luma([(x * 1000 + y) as u16])
    })
    .write_to(&mut std::io::Cursor::new(&mut b), image::ImageFormat::Png)
    .unwrap();
    assert_truncation_detected("grey16.png", &b, (64, 48));
}

#[test]
fn jpeg_completeness_check_accepts_restart_markers_and_trailing_bytes() {
    // Trailing bytes after EOI (some cameras append data) are not truncation.
    let mut jpg = std::fs::read(repo("data/he/stardist-histo.jpg")).unwrap();
    jpg.extend_from_slice(b"trailing");
    assert_eq!(io::decode_rgb(&jpg, "trail.jpg").unwrap().width, 500);
    // A JPEG with the EOI marker removed but all scan data present is still incomplete.
    let full = std::fs::read(repo("data/he/stardist-histo.jpg")).unwrap();
    let eoi = full.windows(2).rposition(|w| w == [0xFF, 0xD9]).unwrap();
    let e = io::decode_rgb(&full[..eoi], "noeoi.jpg")
        .unwrap_err()
        .to_string();
    assert!(e.contains("truncated"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Configuration

fn tiny_json() -> serde_json::Value {
    serde_json::from_str(&Config::tiny().to_json()).unwrap()
}

/// (field path, value, text the error must contain).
fn bad_config_cases() -> Vec<(&'static str, serde_json::Value, &'static str)> {
    use serde_json::json;
    vec![
        ("decoder_heads", json!(0), "decoder_heads"),
        ("image_size", json!(18446744073709551600u64), "image_size"),
        ("image_size", json!(0), "image_size"),
        ("image_size", json!(1000), "image_size"),
        ("image_size", json!(32768), "image_size"),
        ("embed_dims", json!([0, 64, 96, 128]), "embed_dims[0]"),
        ("embed_dims", json!([33, 64, 96, 128]), "embed_dims[0]"),
        ("embed_dims", json!([32, 64, 96]), "embed_dims"),
        (
            "embed_dims",
            json!([32, 64, 96, 1u64 << 40]),
            "embed_dims[3]",
        ),
        ("depths", json!([1, 0, 2, 1]), "depths[1]"),
        ("depths", json!([1, 1, 1_000_000_000u64, 1]), "depths[2]"),
        ("num_heads", json!([1, 0, 3, 4]), "num_heads[1]"),
        ("num_heads", json!([1, 3, 3, 4]), "num_heads[1]"),
        ("num_heads", json!([1, 2, 3, 1]), "num_heads[3]"), // head dim 128 > 64
        ("window_sizes", json!([7, 0, 14, 7]), "window_sizes[1]"),
        ("window_sizes", json!([7, 7, 17, 7]), "window_sizes[2]"),
        ("decoder_depth", json!(0), "decoder_depth"),
        ("decoder_mlp_dim", json!(0), "decoder_mlp_dim"),
        ("transformer_dim", json!(0), "transformer_dim"),
        ("transformer_dim", json!(12), "transformer_dim"),
        ("transformer_dim", json!(1u64 << 33), "transformer_dim"),
        ("decoder_heads", json!(3), "decoder_heads"),
        ("decoder_heads", json!(2), "decoder_heads"), // head dim 128 > 64
        ("decoder_heads", json!(1u64 << 62), "decoder_heads"),
        ("mlp_ratio", json!(0), "mlp_ratio"),
        ("mbconv_expand_ratio", json!(0), "mbconv_expand_ratio"),
        (
            "num_multimask_outputs",
            json!(u64::MAX),
            "num_multimask_outputs",
        ),
        ("iou_head_hidden_dim", json!(0), "iou_head_hidden_dim"),
        ("mask_in_chans", json!(0), "mask_in_chans"),
        ("mask_in_chans", json!(6), "mask_in_chans"),
        // num_classes 0 is valid: no classifier head (LiteMedSAM's checkpoint, ONNX exports).
        ("num_classes", json!(u64::MAX), "num_classes"),
        ("patch_stride", json!(2), "patch_stride"),
        ("patch_stride", json!(0), "patch_stride"),
        ("arch", json!("sam2"), "unknown variant"),
    ]
}

#[test]
fn every_bad_configuration_field_is_refused_by_name() {
    assert!(Config::paper().validate().is_ok());
    assert!(Config::tiny().validate().is_ok());
    assert!(Config::tiny().with_image_size(16384).is_ok());
    for (field, value, needle) in bad_config_cases() {
        let mut j = tiny_json();
        j[field] = value.clone();
        let text = j.to_string();
        let r = no_panic(&text, || Config::from_json(&text));
        let e = r
            .expect_err(&format!("{field} = {value} was accepted"))
            .to_string();
        assert!(e.contains(needle), "{field} = {value}: {e}");
        assert!(
            e.starts_with("configuration: ") && e.matches("configuration:").count() == 1,
            "{e}"
        );
        assert!(!e.contains('\n'), "{e}");
    }
    // Products that overflow: each field in range, the (S/2)² × C stem map above 2^32 values.
    let c = Config {
        image_size: 16384,
        embed_dims: vec![4096, 4096, 4096, 4096],
        num_heads: vec![64, 64, 64, 64],
        ..Config::tiny()
    };
    let e = no_panic("big map", || c.validate())
        .unwrap_err()
        .to_string();
    assert!(e.contains("image_size") && e.contains("2^32"), "{e}");
    // Too many parameters: all widths at their maximum.
    let c = Config {
        image_size: 16,
        embed_dims: vec![4096; 4],
        num_heads: vec![64; 4],
        depths: vec![64; 4],
        mlp_ratio: 16,
        ..Config::tiny()
    };
    let e = no_panic("params", || c.validate()).unwrap_err().to_string();
    assert!(e.contains("parameters"), "{e}");
    // Built in code, not parsed: the same validation wherever a configuration enters.
    let c = Config {
        decoder_heads: 0,
        ..Config::paper()
    };
    assert!(
        no_panic("struct", || c.validate())
            .unwrap_err()
            .to_string()
            .contains("decoder_heads")
    );
    let w = Weights::load(&fixtures_dir().join("tiny.weights.safetensors")).unwrap();
    let e = no_panic("resolve", || w.resolve_config(Some(&c), 256))
        .unwrap_err()
        .to_string();
    assert!(e.contains("decoder_heads"), "{e}");
}

#[test]
fn config_file_errors_name_the_file_once() {
    let d = tmpdir("cfgfile");
    let p = d.join("bad.json");
    let mut j = tiny_json();
    j["decoder_heads"] = 0.into();
    std::fs::write(&p, j.to_string()).unwrap();
    let e = Config::from_file(&p).unwrap_err().to_string();
    assert_eq!(e.matches("configuration:").count(), 1, "{e}");
    assert!(
        e.starts_with(&format!("configuration: {}: decoder_heads", p.display())),
        "{e}"
    );
    std::fs::write(&p, "{\"image_size\": 256").unwrap();
    let e = Config::from_file(&p).unwrap_err().to_string();
    assert_eq!(e.matches("configuration:").count(), 1, "{e}");
    assert!(e.contains("bad.json"), "{e}");
}

/// Non-zero exit, no panic, and an `error:` line mentioning `needle`.
fn assert_clean_failure(what: &str, (code, out): &(i32, String), needle: &str) {
    assert!(
        *code != 0 && *code != 101 && *code >= 0,
        "{what}: exit {code}\n{out}"
    );
    assert!(
        !out.contains("panicked") && !out.contains("RUST_BACKTRACE"),
        "{what}: {out}"
    );
    let errs: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("error:") && !l.contains("XDG_RUNTIME_DIR"))
        .collect();
    assert_eq!(errs.len(), 1, "{what}: {out}");
    assert!(
        errs[0].contains(needle),
        "{what}: error line should mention {needle:?}: {}",
        errs[0]
    );
}

#[test]
fn cli_refuses_bad_configurations_without_panicking() {
    let d = tmpdir("cli-config");
    let w = fixtures_dir().join("tiny.weights.safetensors");
    for (field, value, needle) in [
        ("decoder_heads", serde_json::json!(0), "decoder_heads"),
        (
            "image_size",
            serde_json::json!(18446744073709551600u64),
            "image_size",
        ),
    ] {
        let mut j = tiny_json();
        j[field] = value;
        let p = d.join(format!("{field}.json"));
        std::fs::write(&p, j.to_string()).unwrap();
        let r = run_env(
            &["info", w.to_str().unwrap(), "--config", p.to_str().unwrap()],
            &[],
        );
        assert_clean_failure(&format!("info with {field}"), &r, needle);
        assert_eq!(r.1.matches("configuration:").count(), 1, "{}", r.1);
        let img = repo("data/he/stardist-histo.jpg");
        let out = d.join("out");
        let r = run_env(
            &[
                "segment",
                img.to_str().unwrap(),
                "--weights",
                w.to_str().unwrap(),
                "--config",
                p.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ],
            &[],
        );
        assert_clean_failure(&format!("segment with {field}"), &r, needle);
    }
}

#[test]
fn cli_refuses_huge_and_over_budget_images() {
    let d = tmpdir("cli-images");
    let w = fixtures_dir().join("tiny.weights.safetensors");
    let cfg = fixtures_dir().join("tiny.config.json");
    let out = d.join("out");
    let huge = d.join("huge.png");
    std::fs::write(&huge, huge_png(100_000, 100_000)).unwrap();
    let seg = |img: &Path, env: &[(&str, &str)]| {
        run_env(
            &[
                "segment",
                img.to_str().unwrap(),
                "--weights",
                w.to_str().unwrap(),
                "--config",
                cfg.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ],
            env,
        )
    };
    assert_clean_failure(
        "huge.png",
        &seg(&huge, &[]),
        "huge.png: image is 100000x100000",
    );
    // The environment variable sets the budget: the 500x300 H&E tile against 100,000 pixels.
    let img = repo("data/he/stardist-histo.jpg");
    assert_clean_failure(
        "budget",
        &seg(&img, &[("MEDFASTSAM_MAX_PIXELS", "100000")]),
        "above the pixel budget",
    );
    assert_clean_failure(
        "bad budget",
        &seg(&img, &[("MEDFASTSAM_MAX_PIXELS", "many")]),
        "MEDFASTSAM_MAX_PIXELS",
    );
    // So does --max-pixels, which wins over the variable; a bad value is refused by the parser.
    let flag = |budget: &str| {
        run_env(
            &[
                "--max-pixels",
                budget,
                "segment",
                img.to_str().unwrap(),
                "--weights",
                w.to_str().unwrap(),
                "--config",
                cfg.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ],
            &[("MEDFASTSAM_MAX_PIXELS", "100000000")],
        )
    };
    assert_clean_failure("--max-pixels", &flag("100_000"), "above the pixel budget");
    let (code, text) = flag("0");
    assert!(
        code == 2 && text.contains("must be positive"),
        "{code}: {text}"
    );
    // A truncated JPEG is an error, not a grey-filled segmentation.
    let jpg = std::fs::read(&img).unwrap();
    let t = d.join("half.jpg");
    std::fs::write(&t, &jpg[..jpg.len() / 2]).unwrap();
    assert_clean_failure("truncated", &seg(&t, &[]), "truncated");
    let written: Vec<_> = std::fs::read_dir(&out)
        .map(|r| r.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(written.is_empty(), "{written:?}");
}

// ---------------------------------------------------------------------------------------------
// Weights

#[test]
fn inferred_configuration_survives_lying_shapes() {
    let base = Weights::load(&fixtures_dir().join("tiny.weights.safetensors")).unwrap();
    assert!(
        base.config.is_none(),
        "the tiny fixture has no metadata: the configuration is inferred"
    );
    assert_eq!(base.infer_config(256).unwrap(), Config::tiny());
    let cases: &[(&str, &[usize], &str)] = &[
        // A scalar where a matrix is read: indexing [0] used to panic.
        (
            "image_encoder.patch_embed.seq.2.c.weight",
            &[],
            "patch_embed.seq.2.c.weight",
        ),
        // Zero width: mbconv_expand_ratio = conv1 rows / embed_dims[0] divided by zero.
        (
            "image_encoder.patch_embed.seq.2.c.weight",
            &[0, 16, 3, 3],
            "division by a zero width",
        ),
        // Zero mask tokens: num_multimask_outputs = 0 - 1.
        ("mask_decoder.mask_tokens.weight", &[0, 256], "mask token"),
        // One-dimensional where the second dimension is read.
        ("mask_decoder.iou_token.weight", &[256], "iou_token"),
        (
            "image_encoder.layers.1.blocks.0.attn.attention_biases",
            &[2],
            "attention_biases",
        ),
        // A huge head count: refused by validation, not by an overflow.
        (
            "image_encoder.layers.1.blocks.0.attn.attention_biases",
            &[usize::MAX, 49],
            "num_heads[1]",
        ),
    ];
    for (key, shape, needle) in cases {
        let mut w = base.clone();
        let t = w.tensors.get_mut(*key).unwrap();
        t.shape = shape.to_vec();
        t.data = vec![0.0; shape.iter().product::<usize>().min(1 << 20)];
        let e = no_panic(key, || w.resolve_config(None, 256))
            .expect_err(key)
            .to_string();
        assert!(e.contains(needle), "{key} {shape:?}: {e}");
    }
    // Thousands of layer keys: counting stops at the largest depth instead of scanning them all.
    let mut w = base.clone();
    let t = w.tensors["image_encoder.layers.0.blocks.0.conv1.c.weight"].clone();
    for i in 0..5000 {
        w.tensors
            .insert(format!("image_encoder.layers.0.blocks.{i}.x"), t.clone());
    }
    let start = std::time::Instant::now();
    let e = w.resolve_config(None, 256).unwrap_err().to_string();
    assert!(e.contains("depths[0]"), "{e}");
    assert!(start.elapsed().as_secs_f64() < 1.0, "{:?}", start.elapsed());
}

/// A safetensors file with `header` as its JSON header and `data` bytes after it.
fn safetensors_bytes(header: &str, data: &[u8]) -> Vec<u8> {
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header.as_bytes());
    b.extend_from_slice(data);
    b
}

#[test]
fn safetensors_with_lying_offsets_are_refused() {
    // Eight u8 tensors of 2^61 - 1 bytes each: offsets end at 2^64 - 8, which the safetensors
    // parser adds to the header length (an overflow panic in debug builds).
    let n = (1u64 << 61) - 1;
    let mut parts = Vec::new();
    for i in 0..8u64 {
        parts.push(format!(
            "\"t{i}\":{{\"dtype\":\"U8\",\"shape\":[{n}],\"data_offsets\":[{},{}]}}",
            i * n,
            (i + 1) * n
        ));
    }
    let b = safetensors_bytes(&format!("{{{}}}", parts.join(",")), &[0; 8]);
    let e = no_panic("offsets", || Weights::from_bytes(&b, "lying.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("lying.safetensors: ") && e.contains("past the end"),
        "{e}"
    );
    // Shape product overflow, header length beyond the file, offsets beyond the file.
    for (header, data) in [
        (r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}}"#.to_string(), vec![]),
        (r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#.to_string(), vec![0u8; 4]),
        (r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"__metadata__":{"medfastsam.config":"{\"image_size\":18446744073709551600}"}}"#.to_string(), vec![0u8; 4]),
    ] {
        let b = safetensors_bytes(&header, &data);
        let e = no_panic(&header, || Weights::from_bytes(&b, "bad.safetensors")).expect_err(&header).to_string();
        assert!(e.starts_with("bad.safetensors: "), "{e}");
    }
    let mut b = safetensors_bytes("{}", &[]);
    b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(no_panic("len", || Weights::from_bytes(&b, "x")).is_err());
}

/// A 300-byte TIFF whose tag declares 8 M values (found by the fuzzer): the `tiff` crate read it
/// under its own default limits, allocating 256 MiB before failing. Refused from the IFD now.
#[test]
fn tiff_tags_declaring_values_past_the_end_are_refused() {
    let mut t = huge_tiff(9, 7);
    // BitsPerSample (third entry) claims 8388608 SHORTs at its offset.
    let e = 8 + 2 + 2 * 12;
    assert_eq!(u16::from_le_bytes([t[e], t[e + 1]]), 258);
    t[e + 4..e + 8].copy_from_slice(&8_388_608u32.to_le_bytes());
    for r in [
        io::decode_rgb(&t, "tags.tif").map(|_| ()),
        io::image_dimensions(&t, "tags.tif", &DecodeLimits::default()).map(|_| ()),
    ] {
        let e = r.unwrap_err().to_string();
        assert!(
            e.starts_with("tags.tif: truncated or corrupt TIFF: tag 258 has 16777216 bytes"),
            "{e}"
        );
    }
}
