//! The command-line tool end to end: segment (files, folders, 16-bit TIFF), info, and bad input
//! (each a one-line error, non-zero exit, no panic, no partial output files).

mod common;

use common::cli::{Run, bin, files_in, repo, run_split, run_split_env, tmpdir};
use common::*;
use medfastsam::io;
use medfastsam::model::{Config, MedFastSam, Variant, Weights};
use medfastsam::testutil::test_gpu;
use std::path::PathBuf;

fn tiny_weights() -> PathBuf {
    fixtures_dir().join("tiny.weights.safetensors")
}
fn tiny_config() -> PathBuf {
    fixtures_dir().join("tiny.config.json")
}

/// The error is reported on one `error:` line, without a panic.
fn assert_clean_failure(r: &Run, needle: &str) {
    assert_ne!(r.code, 0, "expected failure; stderr: {}", r.stderr);
    assert!(!r.stderr.contains("panicked"), "panic: {}", r.stderr);
    let err = r.error_lines();
    assert!(!err.is_empty(), "no error line in {}", r.stderr);
    assert!(
        err.iter().any(|l| l.contains(needle)),
        "error line should mention '{needle}': {err:?}"
    );
}

/// CPU f64 bilinear (align_corners=False) of a single-channel map, the independent reference of
/// the mask mapping to the original resolution.
fn bilinear_ref(x: &[f32], ih: usize, iw: usize, oh: usize, ow: usize) -> Vec<f64> {
    let taps = |o: usize, i: usize, n: usize| {
        let src = ((o as f64 + 0.5) * i as f64 / n as f64 - 0.5).max(0.0);
        let i0 = (src.floor() as usize).min(i - 1);
        (i0, (i0 + 1).min(i - 1), src - i0 as f64)
    };
    let mut y = vec![0f64; oh * ow];
    for oy in 0..oh {
        let (y0, y1, fy) = taps(oy, ih, oh);
        for ox in 0..ow {
            let (x0, x1, fx) = taps(ox, iw, ow);
            let v = |yy: usize, xx: usize| x[yy * iw + xx] as f64;
            y[oy * ow + ox] = (v(y0, x0) * (1.0 - fx) + v(y0, x1) * fx) * (1.0 - fy)
                + (v(y1, x0) * (1.0 - fx) + v(y1, x1) * fx) * fy;
        }
    }
    y
}

#[test]
fn segment_writes_mask_and_overlay_at_original_size() {
    let out = tmpdir("seg");
    let img_path = repo("data/he/stardist-histo.jpg");
    // the whole image stretched to S×S (tiling is tests/tiles.rs)
    let r = run_split(&[
        "segment",
        "--resize",
        img_path.to_str().unwrap(),
        "--weights",
        tiny_weights().to_str().unwrap(),
        "--config",
        tiny_config().to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    assert!(
        r.stdout.contains(" ms"),
        "prints the time per image: {}",
        r.stdout
    );
    assert_eq!(
        files_in(&out),
        vec!["stardist-histo_mask.png", "stardist-histo_overlay.png"]
    );
    let mask = io::load_gray(&out.join("stardist-histo_mask.png")).unwrap();
    let img = io::load_rgb(&img_path).unwrap();
    assert_eq!((mask.width, mask.height), (img.width, img.height));
    assert!(mask.data.iter().all(|&v| v == 0 || v == 255));
    let over = io::load_rgb(&out.join("stardist-histo_overlay.png")).unwrap();
    assert_eq!((over.width, over.height), (img.width, img.height));

    // Independent check of the mapping back: model logits at S×S read back, resized on the CPU in f64.
    let gpu = test_gpu();
    let cfg = Config::from_file(&tiny_config()).unwrap();
    let w = Weights::load(&tiny_weights()).unwrap();
    let m = MedFastSam::new(gpu, &w, &cfg, Variant::Paper).unwrap();
    let s = cfg.image_size;
    let px = gpu
        .upload_u32(&img.resize(s, s).packed(), &[1, s, s])
        .unwrap();
    let mut rec = gpu.new_recorder();
    let o = m.forward(&mut rec, &px, false).unwrap();
    rec.submit().unwrap();
    let logits = gpu.read(&o.logits).unwrap();
    let want = bilinear_ref(&logits, s, s, img.height, img.width);
    let differ = want
        .iter()
        .zip(&mask.data)
        .filter(|(l, m)| (**l > 0.0) != (**m == 255))
        .count();
    eprintln!(
        "mask pixels differing from the CPU-resized logits: {differ} of {}",
        mask.data.len()
    );
    assert!(differ as f64 <= 0.001 * mask.data.len() as f64);
    let fg = mask.data.iter().filter(|&&v| v == 255).count();
    assert!(
        fg > 0 && fg < mask.data.len(),
        "mask is neither empty nor full"
    );
}

#[test]
fn segment_folder_and_16bit_tiff() {
    let input = tmpdir("folder-in");
    let out = tmpdir("folder-out");
    std::fs::copy(
        repo("data/dsb2018-nuclei/image.tif"),
        input.join("nuclei.tif"),
    )
    .unwrap();
    std::fs::copy(repo("data/he/skimage-ihc.png"), input.join("ihc.png")).unwrap();
    std::fs::write(input.join("notes.txt"), "not an image").unwrap();
    let r = run_split(&[
        "segment",
        input.to_str().unwrap(),
        "--weights",
        tiny_weights().to_str().unwrap(),
        "--config",
        tiny_config().to_str().unwrap(),
        "--variant",
        "released",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    assert_eq!(
        files_in(&out),
        vec![
            "ihc_mask.png",
            "ihc_overlay.png",
            "nuclei_mask.png",
            "nuclei_overlay.png"
        ]
    );
    let m = io::load_gray(&out.join("nuclei_mask.png")).unwrap();
    assert_eq!((m.width, m.height), (512, 512));
}

#[test]
fn info_reports_paper_parameter_count() {
    let d = tmpdir("info");
    let path = d.join("paper.safetensors");
    Weights::init(&Config::paper(), 3)
        .save(&path, &Config::paper(), Variant::Released, true)
        .unwrap();
    let r = run_split(&["info", path.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("14,479,104 total"), "{}", r.stdout);
    assert!(r.stdout.contains("8,413,572 tuned"), "{}", r.stdout);
    assert!(r.stdout.contains("variant:       released"), "{}", r.stdout);
    assert!(
        r.stdout.contains("from the file's metadata"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("image_encoder.layers.2"), "{}", r.stdout);
    assert!(r.stdout.contains("adapter:"), "{}", r.stdout);
    // Tiny weights have no metadata: the configuration is inferred from the shapes.
    let r = run_split(&["info", tiny_weights().to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("inferred from tensor shapes"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("\"embed_dims\":[32,64,96,128]"),
        "{}",
        r.stdout
    );
}

fn segment_args<'a>(input: &'a str, weights: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "segment",
        input,
        "--weights",
        weights,
        "--config",
        tiny_config().to_str().unwrap().to_owned().leak(),
        "--out",
        out,
    ]
}

#[test]
fn bad_inputs_fail_cleanly_without_partial_files() {
    let d = tmpdir("bad");
    let out = d.join("out");
    let outs = out.to_str().unwrap();
    let w = tiny_weights();
    let ws = w.to_str().unwrap();

    // Missing image.
    let r = run_split(&segment_args("/nonexistent/x.png", ws, outs));
    assert_clean_failure(&r, "/nonexistent/x.png");
    assert!(files_in(&out).is_empty());

    // Corrupt image: a PNG header followed by garbage.
    let bad = d.join("corrupt.png");
    let mut bytes = vec![0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];
    bytes.extend((0..500u32).map(|i| (i * 7 + 3) as u8));
    std::fs::write(&bad, &bytes).unwrap();
    let r = run_split(&segment_args(bad.to_str().unwrap(), ws, outs));
    assert_clean_failure(&r, "corrupt.png");
    assert!(files_in(&out).is_empty());

    // Unsupported format (GIF).
    let gif = d.join("anim.gif");
    std::fs::write(&gif, b"GIF89a\x01\x00\x01\x00\x00\x00\x00;").unwrap();
    let r = run_split(&segment_args(gif.to_str().unwrap(), ws, outs));
    assert_clean_failure(&r, "unsupported image format");
    assert!(files_in(&out).is_empty());

    // Weights that do not match the configuration: first mismatching key and both shapes.
    let paper_cfg = d.join("paper.json");
    std::fs::write(&paper_cfg, Config::paper().to_json()).unwrap();
    let img = repo("data/he/stardist-histo.jpg");
    let r = run_split(&[
        "segment",
        img.to_str().unwrap(),
        "--weights",
        ws,
        "--config",
        paper_cfg.to_str().unwrap(),
        "--out",
        outs,
    ]);
    assert_clean_failure(
        &r,
        "tensor 'image_encoder.patch_embed.seq.0.c.weight' has shape [16, 3, 3, 3] but the configuration expects [32, 3, 3, 3]",
    );
    assert!(files_in(&out).is_empty());

    // Truncated weights file.
    let trunc = d.join("trunc.safetensors");
    let full = std::fs::read(&w).unwrap();
    std::fs::write(&trunc, &full[..full.len() / 2]).unwrap();
    let r = run_split(&segment_args(
        img.to_str().unwrap(),
        trunc.to_str().unwrap(),
        outs,
    ));
    assert_clean_failure(&r, "trunc.safetensors");
    assert!(files_in(&out).is_empty());

    // With --resize (the whole image stretched to S×S), an image whose full-resolution logits
    // exceed the storage-binding limit (WebGPU's default 128 MiB, requested explicitly so the test
    // means the same on every adapter). Tiled (the default for it), it would run window by window.
    let big = d.join("huge.png");
    let (bw, bh) = (6000u32, 6000u32);
    let raw: Vec<u8> = (0..bw * bh).map(|i| ((i % bw) / 24) as u8).collect();
    image::GrayImage::from_raw(bw, bh, raw)
        .unwrap()
        .save(&big)
        .unwrap();
    let mut args = segment_args(big.to_str().unwrap(), ws, outs);
    args.push("--resize");
    let r = run_split_env(&args, &[("MEDFASTSAM_LIMITS", "webgpu")]);
    assert_clean_failure(&r, "device limit exceeded");
    assert!(
        files_in(&out).iter().all(|f| !f.starts_with("huge")),
        "{:?}",
        files_in(&out)
    );

    // A mix of good and bad inputs: the good one is written, the exit code reports the failure.
    let r = run_split(&[
        "segment",
        img.to_str().unwrap(),
        bad.to_str().unwrap(),
        "--weights",
        ws,
        "--config",
        tiny_config().to_str().unwrap(),
        "--out",
        outs,
    ]);
    assert_clean_failure(&r, "corrupt.png");
    assert_eq!(
        files_in(&out),
        vec!["stardist-histo_mask.png", "stardist-histo_overlay.png"]
    );
}

#[test]
fn serve_sends_the_page_with_its_csp_and_refuses_paths_outside_web() {
    use std::io::{Read, Write};
    // A free port: bind to 0, read it, release it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = bin()
        .args([
            "serve",
            "--port",
            &port.to_string(),
            "--dir",
            repo("web").to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let get = |path: &str| -> Option<String> {
        for _ in 0..100 {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
                let mut buf = String::new();
                let _ = s.read_to_string(&mut buf);
                return Some(buf);
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        None
    };
    let index = get("/").expect("server did not start");
    let escape = get("/../Cargo.toml").unwrap();
    let encoded = get("/%2e%2e/Cargo.toml").unwrap();
    let js = get("/app.js").unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        index.starts_with("HTTP/1.1 200"),
        "{}",
        &index[..80.min(index.len())]
    );
    assert!(index.contains("Content-Security-Policy: default-src 'self'"));
    assert!(index.contains("<html"));
    assert!(js.contains("Content-Type: text/javascript"));
    assert!(escape.starts_with("HTTP/1.1 404"), "{escape}");
    assert!(encoded.starts_with("HTTP/1.1 404"), "{encoded}");
}
