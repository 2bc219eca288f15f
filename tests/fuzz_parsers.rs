//! Deterministic mutation fuzzing of every parser a user can feed a file to (issue 8, "Beyond the
//! list"): images (PNG, JPEG, BMP, TIFF), safetensors weights (bytes, and the configuration
//! inference over their shapes), configuration JSON, dataset folder layouts (with their split
//! files), MoNuSeg's Aperio XML annotations with the polygon rasteriser, and PyTorch checkpoints
//! (zip and legacy `.pth`, mutated through the zip structure and the pickle).
//!
//! Each input runs under `catch_unwind`; a counting global allocator records the peak memory of
//! each call (it must stay under 1 GiB) and refuses any single allocation above 2 GiB (the process
//! then aborts; the input being parsed is always saved first, see the path printed by each
//! target). The test fails listing every input that panicked, broke an invariant or used too much
//! memory, with the path where that input was saved.
//!
//! `MEDFASTSAM_FUZZ_ITERS=N` sets the number of inputs per target (default 4000; dataset layouts,
//! which are folders on disk, run N/5), `MEDFASTSAM_FUZZ_SEED=S` another sequence.

use medfastsam::io::{self, DecodeLimits};
use medfastsam::model::{Config, Weights};
use medfastsam::rng::Rng;
use medfastsam::train::datasets::{self, Dataset, Format, Split};
use serde_json::{Value, json};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------------------------
// Memory accounting

/// Peak memory one parser call may use.
const PEAK_LIMIT: i64 = 1 << 30;
/// Largest single allocation let through (above it the allocator fails and the process aborts).
const HARD_CAP: usize = 2 << 30;

struct Counting;

thread_local! {
    static LIVE: Cell<i64> = const { Cell::new(0) };
    static PEAK: Cell<i64> = const { Cell::new(0) };
}

fn account(delta: i64) {
    let _ = LIVE.try_with(|l| {
        let v = l.get() + delta;
        l.set(v);
        let _ = PEAK.try_with(|p| {
            if v > p.get() {
                p.set(v)
            }
        });
    });
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if l.size() > HARD_CAP {
            return std::ptr::null_mut();
        }
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            account(l.size() as i64);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        if l.size() > HARD_CAP {
            return std::ptr::null_mut();
        }
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            account(l.size() as i64);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        account(-(l.size() as i64));
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        if new > HARD_CAP {
            return std::ptr::null_mut();
        }
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            account(new as i64 - l.size() as i64);
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

// ---------------------------------------------------------------------------------------------
// Harness

fn iters() -> usize {
    std::env::var("MEDFASTSAM_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(4000)
}

fn seed(target: u64) -> u64 {
    let s: u64 = std::env::var("MEDFASTSAM_FUZZ_SEED")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(8);
    s.wrapping_mul(1_000_003).wrapping_add(target)
}

fn out_dir(target: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("medfastsam-fuzz-{target}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

struct Fuzz {
    target: &'static str,
    dir: PathBuf,
    ran: usize,
    ok: usize,
    failures: Vec<String>,
    peak: i64,
}

impl Fuzz {
    fn new(target: &'static str) -> Fuzz {
        let dir = out_dir(target);
        eprintln!(
            "fuzz {target}: the input being parsed is saved as {}/current.bin",
            dir.display()
        );
        Fuzz {
            target,
            dir,
            ran: 0,
            ok: 0,
            failures: Vec::new(),
            peak: 0,
        }
    }

    /// Runs `f` on an input saved as `bytes` (or described by `saved`, for folders). `f` returns
    /// Ok(true) when the parser accepted the input, Ok(false) for a clean error, Err(why) for a
    /// broken invariant.
    fn case(
        &mut self,
        bytes: Option<&[u8]>,
        saved: Option<&Path>,
        f: impl FnOnce() -> Result<bool, String>,
    ) {
        let i = self.ran;
        self.ran += 1;
        if let Some(b) = bytes {
            std::fs::write(self.dir.join("current.bin"), b).unwrap();
        }
        let base = LIVE.with(|l| l.get());
        PEAK.with(|p| p.set(base));
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        let peak = PEAK.with(|p| p.get()) - base;
        if peak > self.peak && peak > 1 << 27 {
            // Large but allowed: kept for inspection.
            if let Some(b) = bytes {
                let p = self.dir.join(format!("peak-{i}.bin"));
                std::fs::write(&p, b).unwrap();
                eprintln!(
                    "fuzz {}: input {i} peaked at {:.0} MiB ({})",
                    self.target,
                    peak as f64 / (1 << 20) as f64,
                    p.display()
                );
            }
        }
        self.peak = self.peak.max(peak);
        let (accepted, problem) = match r {
            Ok(Ok(accepted)) => (accepted, None),
            Ok(Err(why)) => (false, Some(why)),
            Err(p) => (false, Some(format!("panicked: {}", panic_text(&*p)))),
        };
        let problem =
            problem.or_else(|| (peak > PEAK_LIMIT).then(|| format!("used {peak} bytes of memory")));
        self.ok += (accepted && problem.is_none()) as usize;
        if let Some(why) = problem {
            let at = match (bytes, saved) {
                (Some(b), _) => {
                    let p = self.dir.join(format!("input-{i}.bin"));
                    std::fs::write(&p, b).unwrap();
                    p
                }
                (None, Some(p)) => p.to_path_buf(),
                (None, None) => self.dir.clone(),
            };
            self.failures.push(format!(
                "{} input {i} ({}): {why}",
                self.target,
                at.display()
            ));
        }
    }

    fn finish(self) {
        eprintln!(
            "fuzz {}: {} inputs, {} accepted, {} rejected cleanly, {} failures, peak memory of one call {:.1} MiB",
            self.target,
            self.ran,
            self.ok,
            self.ran - self.ok - self.failures.len(),
            self.failures.len(),
            self.peak as f64 / (1 << 20) as f64
        );
        assert!(
            self.failures.is_empty(),
            "{} failing inputs:\n{}",
            self.failures.len(),
            self.failures.join("\n")
        );
        let _ = std::fs::remove_file(self.dir.join("current.bin"));
    }
}

// ---------------------------------------------------------------------------------------------
// Mutators

const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    3,
    7,
    8,
    15,
    16,
    17,
    0x7F,
    0x80,
    0xFF,
    0x100,
    0x7FFF,
    0x8000,
    0xFFFF,
    0x1_0000,
    100_000,
    0x7FFF_FFFF,
    0x8000_0000,
    0xFFFF_FFFF,
    1 << 32,
    1 << 40,
    (1 << 61) - 1,
    1 << 63,
    u64::MAX - 15,
    u64::MAX,
];

fn interesting(rng: &mut Rng) -> u64 {
    if rng.below(4) == 0 {
        rng.next_u64() >> rng.below(64)
    } else {
        INTERESTING[rng.below(INTERESTING.len())]
    }
}

/// Generic byte mutations: bit flips, random and "interesting" values written as u8/u16/u32 in
/// either byte order, truncation, insertion, duplication and deletion of slices, splicing with
/// another seed.
fn mutate_bytes(rng: &mut Rng, b: &mut Vec<u8>, others: &[Vec<u8>]) {
    for _ in 0..1 + rng.below(4) {
        let n = b.len();
        let at = rng.below(n + 1);
        match rng.below(10) {
            0 if n > 0 => b[at.min(n - 1)] ^= 1 << rng.below(8),
            1 if n > 0 => b[at.min(n - 1)] = rng.next_u64() as u8,
            2 | 3 => {
                let v = interesting(rng);
                let w = [1usize, 2, 4][rng.below(3)];
                let bytes: Vec<u8> = if rng.below(2) == 0 {
                    v.to_le_bytes()[..w].to_vec()
                } else {
                    v.to_be_bytes()[8 - w..].to_vec()
                };
                for (k, x) in bytes.into_iter().enumerate() {
                    if at + k < n {
                        b[at + k] = x;
                    }
                }
            }
            4 => b.truncate(at),
            5 => {
                let ins: Vec<u8> = (0..1 + rng.below(16))
                    .map(|_| rng.next_u64() as u8)
                    .collect();
                b.splice(at..at, ins);
            }
            6 if n > 0 => {
                let s = rng.below(n);
                let len = (1 + rng.below(64)).min(n - s);
                let chunk = b[s..s + len].to_vec();
                let to = rng.below(n + 1);
                b.splice(to..to, chunk);
            }
            7 if n > 0 => {
                let len = (1 + rng.below(64)).min(n - at.min(n - 1));
                let s = at.min(n - 1);
                b.drain(s..s + len);
            }
            8 if !others.is_empty() => {
                let o = &others[rng.below(others.len())];
                let from = rng.below(o.len() + 1);
                b.truncate(at);
                b.extend_from_slice(&o[from..]);
            }
            _ if n > 0 => {
                let len = (1 + rng.below(32)).min(n - at.min(n - 1));
                let s = at.min(n - 1);
                let v = if rng.below(2) == 0 { 0 } else { 0xFF };
                b[s..s + len].fill(v);
            }
            _ => b.push(rng.next_u64() as u8),
        }
    }
}

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

/// Recomputes the CRC of every whole PNG chunk, so that mutations reach the parser past the CRC
/// check.
fn fix_png_crcs(b: &mut [u8]) {
    let mut i = 8;
    while i + 12 <= b.len() {
        let len = u32::from_be_bytes(b[i..i + 4].try_into().unwrap()) as usize;
        let Some(end) = (i + 8).checked_add(len).filter(|&e| e + 4 <= b.len()) else {
            break;
        };
        let c = crc32(&b[i + 4..end]);
        b[end..end + 4].copy_from_slice(&c.to_be_bytes());
        i = end + 4;
    }
}

/// Writes random (often huge) dimensions into the header fields of each format.
fn mutate_dimensions(rng: &mut Rng, b: &mut [u8]) {
    let v = interesting(rng);
    if b.starts_with(b"\x89PNG") && b.len() >= 24 {
        let at = 16 + 4 * rng.below(2);
        b[at..at + 4].copy_from_slice(&(v as u32).to_be_bytes());
    } else if b.starts_with(&[0xFF, 0xD8]) {
        // SOF0/1/2: FF Cx len(2) precision(1) height(2) width(2)
        if let Some(p) = b
            .windows(2)
            .position(|w| w[0] == 0xFF && matches!(w[1], 0xC0..=0xC2))
        {
            let at = p + 5 + 2 * rng.below(2);
            if at + 2 <= b.len() {
                b[at..at + 2].copy_from_slice(&(v as u16).to_be_bytes());
            }
        }
    } else if b.starts_with(b"BM") && b.len() >= 30 {
        let at = [18, 22, 28, 30, 10, 14][rng.below(6)];
        b[at..at + 4].copy_from_slice(&(v as u32).to_le_bytes());
    } else if b.starts_with(b"II*\0") && b.len() >= 8 {
        let ifd = u32::from_le_bytes(b[4..8].try_into().unwrap()) as usize;
        if ifd + 2 <= b.len() {
            let n = u16::from_le_bytes([b[ifd], b[ifd + 1]]) as usize;
            for k in 0..n {
                let e = ifd + 2 + 12 * k;
                if e + 12 > b.len() {
                    break;
                }
                let tag = u16::from_le_bytes([b[e], b[e + 1]]);
                if matches!(tag, 256 | 257 | 258 | 273 | 277 | 278 | 279) && rng.below(3) == 0 {
                    b[e + 8..e + 12].copy_from_slice(&(v as u32).to_le_bytes());
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Image seeds

fn encode(img: &image::DynamicImage, f: image::ImageFormat) -> Vec<u8> {
    let mut b = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut b), f).unwrap();
    b
}

fn image_seeds() -> Vec<Vec<u8>> {
    use image::{DynamicImage as D, ImageFormat as F};
    let rgb = D::ImageRgb8(image::RgbImage::from_fn(24, 16, |x, y| {
        image::Rgb([(x * 10) as u8, (y * 15) as u8, ((x + y) * 5) as u8])
    }));
    let grey16 = D::ImageLuma16(image::ImageBuffer::from_fn(9, 7, |x, y| {
        image::Luma([(x * 5000 + y * 300) as u16])
    }));
    let rgba = D::ImageRgba8(image::RgbaImage::from_fn(8, 8, |x, y| {
        image::Rgba([x as u8 * 30, y as u8 * 30, 99, 200])
    }));
    let grey = D::ImageLuma8(image::GrayImage::from_fn(13, 5, |x, y| {
        image::Luma([(x * y) as u8 * 3])
    }));
    vec![
        encode(&rgb, F::Png),
        encode(&grey16, F::Png),
        encode(&rgba, F::Png),
        encode(&rgb, F::Jpeg),
        encode(&grey, F::Jpeg),
        encode(&rgb, F::Bmp),
        encode(&rgba, F::Bmp),
        encode(&rgb, F::Tiff),
        encode(&grey16, F::Tiff),
    ]
}

fn mutate_image(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut b = seeds[rng.below(seeds.len())].clone();
    match rng.below(5) {
        0 => mutate_dimensions(rng, &mut b),
        1 => {
            let n = rng.below(b.len());
            b.truncate(n);
        }
        _ => mutate_bytes(rng, &mut b, seeds),
    }
    if b.starts_with(b"\x89PNG") && rng.below(3) != 0 {
        fix_png_crcs(&mut b);
    }
    b
}

const FUZZ_LIMITS: DecodeLimits = DecodeLimits {
    max_pixels: 1 << 22,
    max_alloc_bytes: 1 << 26,
};

fn check_image(bytes: &[u8]) -> Result<bool, String> {
    let lim = FUZZ_LIMITS;
    let dims = io::image_dimensions(bytes, "fuzz", &lim);
    let rgb = io::decode_rgb_with(bytes, "fuzz", &lim);
    let grey = io::decode_gray_with(bytes, "fuzz", &lim);
    for e in [dims.as_ref().err(), rgb.as_ref().err(), grey.as_ref().err()]
        .into_iter()
        .flatten()
    {
        let m = e.to_string();
        if !m.starts_with("fuzz: ") || m.contains('\n') {
            return Err(format!("error message not one line naming the file: {m:?}"));
        }
    }
    match (&rgb, &grey) {
        (Ok(i), _) if i.data.len() != i.width * i.height * 3 => {
            return Err("RGB data length".into());
        }
        (_, Ok(g)) if g.data.len() != g.width * g.height => return Err("grey data length".into()),
        _ => {}
    }
    for (w, h) in [
        rgb.as_ref().ok().map(|i| (i.width, i.height)),
        grey.as_ref().ok().map(|g| (g.width, g.height)),
    ]
    .into_iter()
    .flatten()
    {
        if (w * h) as u64 > lim.max_pixels || w == 0 || h == 0 {
            return Err(format!("decoded {w}x{h}, outside the budget"));
        }
        if dims.as_ref().ok() != Some(&(w, h)) {
            return Err(format!("header says {dims:?}, decoded {w}x{h}"));
        }
    }
    if rgb.is_ok() != grey.is_ok() {
        return Err(format!(
            "decode_rgb {:?} but decode_gray {:?}",
            rgb.err(),
            grey.err()
        ));
    }
    Ok(rgb.is_ok())
}

#[test]
fn fuzz_images() {
    let seeds = image_seeds();
    for s in &seeds {
        assert_eq!(check_image(s), Ok(true), "seed must decode");
    }
    let mut rng = Rng::new(seed(1));
    let mut fz = Fuzz::new("images");
    for _ in 0..iters() {
        let b = mutate_image(&mut rng, &seeds);
        fz.case(Some(&b), None, || check_image(&b));
    }
    fz.finish();
}

// ---------------------------------------------------------------------------------------------
// Configuration JSON

fn random_json_value(rng: &mut Rng, depth: usize) -> Value {
    match rng.below(if depth > 1 { 6 } else { 9 }) {
        0..=2 => json!(interesting(rng)),
        3 => json!(-(rng.below(1000) as i64) - 1),
        4 => json!([0.5, 1e300, -0.0, 16.0][rng.below(4)]),
        5 => [json!(null), json!(true), json!("256"), json!("")][rng.below(4)].clone(),
        6 | 7 => Value::Array(
            (0..rng.below(7))
                .map(|_| random_json_value(rng, depth + 1))
                .collect(),
        ),
        _ => json!({"x": random_json_value(rng, depth + 1)}),
    }
}

const CONFIG_FIELDS: &[&str] = &[
    "image_size",
    "embed_dims",
    "depths",
    "num_heads",
    "window_sizes",
    "decoder_depth",
    "decoder_mlp_dim",
    "transformer_dim",
    "decoder_heads",
    "mlp_ratio",
    "mbconv_expand_ratio",
    "num_multimask_outputs",
    "iou_head_hidden_dim",
    "mask_in_chans",
    "num_classes",
];

fn mutate_config_json(rng: &mut Rng) -> String {
    let base = if rng.below(2) == 0 {
        Config::tiny()
    } else {
        Config::paper()
    };
    let mut j: Value = serde_json::from_str(&base.to_json()).unwrap();
    for _ in 0..1 + rng.below(3) {
        let f = CONFIG_FIELDS[rng.below(CONFIG_FIELDS.len())];
        match rng.below(8) {
            0 => {
                j.as_object_mut().unwrap().remove(f);
            }
            1 => j["unknown_field"] = json!(1),
            // An element of a list field, or a small plausible number.
            2 | 3 if j[f].as_array().is_some_and(|a| !a.is_empty()) => {
                let n = j[f].as_array().unwrap().len();
                j[f][rng.below(n)] = json!(interesting(rng));
            }
            4 => {
                j[f] = json!(
                    [
                        0, 1, 2, 3, 4, 7, 8, 12, 16, 32, 48, 64, 96, 100, 128, 1000, 1024, 4096,
                        16384, 16400
                    ][rng.below(20)]
                )
            }
            _ => j[f] = random_json_value(rng, 0),
        }
    }
    let mut text = j.to_string();
    if rng.below(5) == 0 {
        let mut b = text.into_bytes();
        mutate_bytes(rng, &mut b, &[]);
        text = String::from_utf8_lossy(&b).into_owned();
    }
    text
}

fn check_config(text: &str, rng_size: usize) -> Result<bool, String> {
    match Config::from_json(text) {
        Err(e) => {
            let m = e.to_string();
            if !m.starts_with("configuration: ") || m.matches("configuration:").count() != 1 {
                return Err(format!("message {m:?}"));
            }
            Ok(false)
        }
        Ok(c) => {
            c.validate()
                .map_err(|e| format!("parsed but does not validate: {e}"))?;
            let back = Config::from_json(&c.to_json()).map_err(|e| format!("round trip: {e}"))?;
            if back != c {
                return Err("round trip changed the configuration".into());
            }
            let specs = medfastsam::model::schema::specs(&c);
            let n: u64 = specs
                .iter()
                .map(|s| s.shape.iter().map(|&d| d as u64).product::<u64>())
                .sum();
            if n > medfastsam::model::config::MAX_PARAMS
                || n != medfastsam::model::schema::param_count(&c) as u64
                    + specs
                        .iter()
                        .filter(|s| s.kind != medfastsam::model::schema::Kind::Param)
                        .map(|s| s.numel() as u64)
                        .sum::<u64>()
            {
                return Err(format!("{n} parameters"));
            }
            let _ = (
                c.grid(),
                c.lowres(),
                c.stage_res(3),
                c.num_mask_tokens(),
                c.with_image_size(rng_size),
            );
            Ok(true)
        }
    }
}

#[test]
fn fuzz_config_json() {
    let mut rng = Rng::new(seed(2));
    let mut fz = Fuzz::new("config");
    for _ in 0..iters() * 2 {
        let text = mutate_config_json(&mut rng);
        let size = [0, 16, 1000, 1024, 16384, 16400, usize::MAX - 15][rng.below(7)];
        fz.case(Some(text.as_bytes()), None, || check_config(&text, size));
    }
    fz.finish();
}

// ---------------------------------------------------------------------------------------------
// Weights: safetensors bytes, and configuration inference over shapes

fn small_weights_seeds() -> Vec<Vec<u8>> {
    let mut w = Weights {
        source: "seed".into(),
        ..Default::default()
    };
    let mut rng = Rng::new(5);
    for (k, shape) in [
        ("a.weight", vec![3, 4]),
        ("b.bias", vec![5]),
        ("c", vec![2, 1, 2, 2]),
        ("d.num_batches_tracked", vec![]),
    ] {
        let n = shape.iter().product();
        w.tensors.insert(
            k.into(),
            medfastsam::model::weights::HostTensor::new(&shape, rng.vec(n)),
        );
    }
    w.tensors.get_mut("d.num_batches_tracked").unwrap().stored =
        medfastsam::model::weights::Stored::I64;
    let cfg = Config::tiny();
    let with_meta = w
        .to_bytes(&cfg, medfastsam::model::Variant::Paper, false)
        .unwrap();
    let f16 = w
        .to_bytes(&cfg, medfastsam::model::Variant::Released, true)
        .unwrap();
    // Without metadata: the header rewritten without __metadata__.
    let (hdr, data) = split_safetensors(&with_meta).unwrap();
    let mut h = hdr;
    h.as_object_mut().unwrap().remove("__metadata__");
    vec![with_meta, f16, join_safetensors(&h, &data)]
}

fn split_safetensors(b: &[u8]) -> Option<(Value, Vec<u8>)> {
    let n = u64::from_le_bytes(b.get(..8)?.try_into().ok()?) as usize;
    let h = serde_json::from_slice(b.get(8..8usize.checked_add(n)?)?).ok()?;
    Some((h, b[8 + n..].to_vec()))
}

fn join_safetensors(h: &Value, data: &[u8]) -> Vec<u8> {
    let s = h.to_string();
    let mut b = (s.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(s.as_bytes());
    b.extend_from_slice(data);
    b
}

fn mutate_safetensors(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut b = seeds[rng.below(seeds.len())].clone();
    match rng.below(10) {
        0..=5 => {
            let (mut h, mut data) = split_safetensors(&b).unwrap();
            let keys: Vec<String> = h.as_object().unwrap().keys().cloned().collect();
            for _ in 0..1 + rng.below(3) {
                let k = &keys[rng.below(keys.len())];
                if !h[k].is_object() {
                    continue;
                }
                if k == "__metadata__" {
                    match rng.below(3) {
                        0 => h[k]["medfastsam.config"] = json!(mutate_config_json(rng)),
                        1 => {
                            h[k]["medfastsam.variant"] =
                                json!(["paper", "released", "", "x"][rng.below(4)])
                        }
                        _ => h[k] = random_json_value(rng, 1),
                    }
                    continue;
                }
                match rng.below(7) {
                    0 => {
                        h[k]["dtype"] = json!(
                            [
                                "F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "I32",
                                "X", ""
                            ][rng.below(11)]
                        )
                    }
                    1 | 2 => {
                        let rank = rng.below(5);
                        h[k]["shape"] = Value::Array(
                            (0..rank)
                                .map(|_| {
                                    json!(if rng.below(2) == 0 {
                                        rng.below(6) as u64
                                    } else {
                                        interesting(rng)
                                    })
                                })
                                .collect(),
                        );
                    }
                    3 | 4
                        if h[k]["data_offsets"]
                            .as_array()
                            .is_some_and(|a| a.len() == 2) =>
                    {
                        let i = rng.below(2);
                        h[k]["data_offsets"][i] = json!(if rng.below(2) == 0 {
                            rng.below(200) as u64
                        } else {
                            interesting(rng)
                        });
                    }
                    5 => {
                        h.as_object_mut().unwrap().remove(k);
                    }
                    _ => h[k] = random_json_value(rng, 1),
                }
            }
            if rng.below(4) == 0 {
                let n = rng.below(data.len() + 1);
                data.truncate(n);
            }
            b = join_safetensors(&h, &data);
        }
        6 => {
            let v = interesting(rng);
            b[..8].copy_from_slice(&v.to_le_bytes());
        }
        _ => mutate_bytes(rng, &mut b, seeds),
    }
    b
}

fn check_weights_bytes(b: &[u8]) -> Result<bool, String> {
    match Weights::from_bytes(b, "fuzz.safetensors") {
        Err(e) => {
            let m = e.to_string();
            if !m.starts_with("fuzz.safetensors: ") || m.contains('\n') {
                return Err(format!("message {m:?}"));
            }
            Ok(false)
        }
        Ok(w) => {
            for (k, t) in &w.tensors {
                let n = t.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
                if n != Some(t.data.len()) {
                    return Err(format!(
                        "tensor {k}: shape {:?} but {} values",
                        t.shape,
                        t.data.len()
                    ));
                }
            }
            if let Some(c) = &w.config {
                c.validate()
                    .map_err(|e| format!("metadata config accepted but invalid: {e}"))?;
            }
            let _ = w.resolve_config(None, 256);
            let _ = w.check(&Config::tiny());
            Ok(true)
        }
    }
}

#[test]
fn fuzz_safetensors_weights() {
    let seeds = small_weights_seeds();
    for s in &seeds {
        assert_eq!(check_weights_bytes(s), Ok(true));
    }
    let mut rng = Rng::new(seed(3));
    let mut fz = Fuzz::new("safetensors");
    for _ in 0..iters() {
        let b = mutate_safetensors(&mut rng, &seeds);
        fz.case(Some(&b), None, || check_weights_bytes(&b));
    }
    fz.finish();
}

/// The tiny model's tensors with their shapes but no data (configuration inference and the shape
/// check read shapes only).
fn shape_only_tiny() -> Weights {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/fixtures/tiny.weights.safetensors");
    let mut w = Weights::load(&path).unwrap();
    for t in w.tensors.values_mut() {
        t.data = Vec::new();
    }
    w
}

#[test]
fn fuzz_weights_shapes_and_config_inference() {
    let base = shape_only_tiny();
    assert_eq!(base.infer_config(256).unwrap(), Config::tiny());
    let keys: Vec<String> = base.tensors.keys().cloned().collect();
    let mut rng = Rng::new(seed(4));
    let mut fz = Fuzz::new("weight-shapes");
    for _ in 0..iters() {
        let mut w = base.clone();
        let mut log = Vec::new();
        for _ in 0..1 + rng.below(3) {
            let k = keys[rng.below(keys.len())].clone();
            match rng.below(6) {
                0 => {
                    w.tensors.remove(&k);
                    log.push(format!("remove {k}"));
                }
                1 => {
                    let t = base.tensors[&keys[0]].clone();
                    let nk = format!(
                        "{}.{}.x",
                        [
                            "image_encoder.layers.0.blocks",
                            "image_encoder.layers.2.blocks",
                            "mask_decoder.transformer.layers"
                        ][rng.below(3)],
                        interesting(&mut rng) % 200
                    );
                    log.push(format!("add {nk}"));
                    w.tensors.insert(nk, t);
                }
                _ => {
                    if let Some(t) = w.tensors.get_mut(&k) {
                        let rank = rng.below(5);
                        t.shape = (0..rank)
                            .map(|_| {
                                if rng.below(2) == 0 {
                                    rng.below(300)
                                } else {
                                    interesting(&mut rng) as usize
                                }
                            })
                            .collect();
                        log.push(format!("{k} {:?}", t.shape));
                    }
                }
            }
        }
        let size = [256, 0, 16, 1000, 16384, usize::MAX][rng.below(6)];
        let desc = format!("size {size}: {}", log.join("; "));
        fz.case(Some(desc.as_bytes()), None, || {
            match w.resolve_config(None, size) {
                Ok(c) => {
                    c.validate()
                        .map_err(|e| format!("resolved but invalid: {e}"))?;
                    Ok(true)
                }
                Err(e) => {
                    let m = e.to_string();
                    if m.contains('\n') {
                        return Err(format!("message {m:?}"));
                    }
                    Ok(false)
                }
            }
        });
    }
    fz.finish();
}

// ---------------------------------------------------------------------------------------------
// Aperio XML annotations

const XML_SEED: &str = r#"<?xml version="1.0"?>
<!-- MoNuSeg -->
<Annotations MicronsPerPixel="0.25">
  <Annotation Id="1"><Regions>
    <Region Id="1" Type="0"><Vertices>
      <Vertex X="3.5" Y="2" /><Vertex X='20.25' Y="4"/><Vertex X="12" Y="30.75"/>
    </Vertices></Region>
    <Region Id="2"><Vertices><Vertex X="40" Y="10"/><Vertex X="60" Y="10"/><Vertex X="60" Y="40"/><Vertex X="40" Y="40"/></Vertices></Region>
  </Regions></Annotation>
</Annotations>
"#;

fn mutate_xml(rng: &mut Rng) -> Vec<u8> {
    let mut s = XML_SEED.to_string();
    if rng.below(2) == 0 {
        let subs = [
            "<",
            ">",
            "\"",
            "'",
            "=",
            "<!--",
            "<![CDATA[",
            "<?",
            "</Region>",
            "<Region>",
            "<Vertex X=\"1e308\" Y=\"-1e308\"/>",
            "<Vertex X=\"NaN\" Y=\"inf\"/>",
            "X=",
            "é",
            "\u{0}",
            "<Vertices>",
            "</Annotations>",
        ];
        for _ in 0..1 + rng.below(3) {
            let mut at = rng.below(s.len() + 1);
            while !s.is_char_boundary(at) {
                at -= 1;
            }
            s.insert_str(at, subs[rng.below(subs.len())]);
        }
        s.into_bytes()
    } else {
        let mut b = s.into_bytes();
        mutate_bytes(rng, &mut b, &[]);
        b
    }
}

#[test]
fn fuzz_aperio_xml() {
    let src = Path::new("fuzz.xml");
    assert_eq!(datasets::parse_aperio_xml(XML_SEED, src).unwrap().len(), 2);
    let mut rng = Rng::new(seed(5));
    let mut fz = Fuzz::new("aperio-xml");
    for _ in 0..iters() * 2 {
        let b = mutate_xml(&mut rng);
        let (w, h) = [(64, 48), (1, 1), (300, 2)][rng.below(3)];
        fz.case(Some(&b), None, || {
            let text = String::from_utf8_lossy(&b);
            match datasets::parse_aperio_xml(&text, src) {
                Ok(polys) => {
                    let m = datasets::rasterize_polygons(&polys, w, h);
                    if m.len() != w * h || m.iter().any(|&v| v > 1) {
                        return Err("mask size or values".into());
                    }
                    Ok(true)
                }
                Err(e) => {
                    let m = e.to_string();
                    if !m.starts_with("fuzz.xml: ") || m.contains('\n') {
                        return Err(format!("message {m:?}"));
                    }
                    Ok(false)
                }
            }
        });
    }
    fz.finish();
}

// ---------------------------------------------------------------------------------------------
// PyTorch checkpoints (.pth): zip and legacy containers, the pickle VM, storages and views

fn pth_fixture(name: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/pth")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The entries of a zip seed, to be mutated and written back with valid CRCs.
fn unzip(b: &[u8]) -> Vec<(String, Vec<u8>)> {
    use std::io::Read;
    let mut a = zip::ZipArchive::new(std::io::Cursor::new(b)).unwrap();
    (0..a.len())
        .map(|i| {
            let mut f = a.by_index(i).unwrap();
            let mut v = Vec::new();
            f.read_to_end(&mut v).unwrap();
            (f.name().unwrap().to_string(), v)
        })
        .collect()
}

fn rezip(entries: &[(String, Vec<u8>)], deflate: bool) -> Vec<u8> {
    use std::io::Write;
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opt = zip::write::SimpleFileOptions::default().compression_method(if deflate {
        zip::CompressionMethod::Deflated
    } else {
        zip::CompressionMethod::Stored
    });
    for (name, b) in entries {
        // A name the writer refuses (a duplicate) is left out.
        if w.start_file(name.as_str(), opt).is_ok() {
            w.write_all(b).unwrap();
        }
    }
    w.finish().unwrap().into_inner()
}

/// Small checkpoints beside the fixtures, so that mutations often reach each structure: a zip
/// state_dict with a transposed view, a shared storage and an i64 scalar, and the same pickle in
/// a legacy stream.
fn small_pth_seeds() -> Vec<Vec<u8>> {
    fn s(p: &mut Vec<u8>, x: &str) {
        p.push(b'X');
        p.extend_from_slice(&(x.len() as u32).to_le_bytes());
        p.extend_from_slice(x.as_bytes());
    }
    let mut p = b"\x80\x02ccollections\nOrderedDict\nq\x00)Rq\x01(".to_vec();
    for (name, ty, key, n, off, shape, stride) in [
        (
            "module.w",
            "FloatStorage",
            "0",
            12u8,
            1u8,
            &[2u8, 3][..],
            &[1u8, 2][..],
        ),
        ("module.v", "FloatStorage", "0", 12, 4, &[4], &[2]),
        ("module.n", "LongStorage", "1", 1, 0, &[], &[]),
        ("module.h", "HalfStorage", "2", 4, 0, &[2, 2], &[2, 1]),
    ] {
        s(&mut p, name);
        p.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n((");
        s(&mut p, "storage");
        p.extend_from_slice(format!("ctorch\n{ty}\n").as_bytes());
        s(&mut p, key);
        s(&mut p, "cpu");
        p.extend_from_slice(&[b'K', n, b't', b'Q', b'K', off, b'(']);
        for &d in shape {
            p.extend_from_slice(&[b'K', d]);
        }
        p.extend_from_slice(b"t(");
        for &d in stride {
            p.extend_from_slice(&[b'K', d]);
        }
        p.extend_from_slice(b"t\x89ccollections\nOrderedDict\n)RtR");
    }
    s(&mut p, "epoch");
    p.extend_from_slice(b"K\x03u}X\x09\x00\x00\x00_metadata}sb.");
    let st0: Vec<u8> = (0..12)
        .flat_map(|i| (i as f32 - 3.5).to_le_bytes())
        .collect();
    let st1 = 7i64.to_le_bytes().to_vec();
    let st2: Vec<u8> = [1.0f32, -2.0, 0.5, 65504.0]
        .iter()
        .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
        .collect();
    let z = rezip(
        &[
            ("c/data.pkl".into(), p.clone()),
            ("c/byteorder".into(), b"little".to_vec()),
            ("c/data/0".into(), st0.clone()),
            ("c/data/1".into(), st1.clone()),
            ("c/data/2".into(), st2.clone()),
        ],
        false,
    );
    // Legacy: magic, protocol 1001, sys info, the pickle, keys, storages (u64 count + bytes).
    let mut l =
        b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.\x80\x02M\xe9\x03.".to_vec();
    l.extend_from_slice(b"\x80\x02}(");
    s(&mut l, "little_endian");
    l.extend_from_slice(b"\x88u.");
    l.extend_from_slice(&p);
    l.extend_from_slice(b"\x80\x02](");
    for k in ["0", "1", "2"] {
        s(&mut l, k);
    }
    l.extend_from_slice(b"e.");
    for (n, d) in [(12u64, &st0), (1, &st1), (4, &st2)] {
        l.extend_from_slice(&n.to_le_bytes());
        l.extend_from_slice(d);
    }
    vec![z, l]
}

/// Tokens of a checkpoint's pickle that a mutation swaps for one another (types, callables,
/// refused globals, persistent-id fields).
const PTH_TOKENS: &[&[u8]] = &[
    b"FloatStorage",
    b"HalfStorage",
    b"BFloat16Storage",
    b"DoubleStorage",
    b"LongStorage",
    b"BoolStorage",
    b"ByteStorage",
    b"ComplexFloatStorage",
    b"_rebuild_tensor_v2",
    b"_rebuild_tensor",
    b"_rebuild_parameter",
    b"OrderedDict",
    b"collections",
    b"torch._utils",
    b"os\nsystem",
    b"storage",
    b"cpu",
    b"model",
    b"module.",
];

fn mutate_pickle(rng: &mut Rng, p: &mut Vec<u8>, others: &[Vec<u8>]) {
    if rng.below(3) == 0 {
        let from = PTH_TOKENS[rng.below(PTH_TOKENS.len())];
        let to = PTH_TOKENS[rng.below(PTH_TOKENS.len())];
        if let Some(at) = p.windows(from.len()).position(|w| w == from) {
            p.splice(at..at + from.len(), to.iter().copied());
            // A BINUNICODE length before it stays as it was: often wrong, on purpose.
            return;
        }
    }
    if rng.below(3) == 0 {
        // An integer operand (BININT1/BININT2/BININT) set to an interesting value.
        let ops: Vec<usize> = p
            .iter()
            .enumerate()
            .filter(|&(_, &b)| matches!(b, b'K' | b'M' | b'J'))
            .map(|(i, _)| i)
            .collect();
        if !ops.is_empty() {
            let at = ops[rng.below(ops.len())];
            let v = interesting(rng);
            let w = match p[at] {
                b'K' => 1,
                b'M' => 2,
                _ => 4,
            };
            for (k, x) in v.to_le_bytes()[..w].iter().enumerate() {
                if at + 1 + k < p.len() {
                    p[at + 1 + k] = *x;
                }
            }
            return;
        }
    }
    mutate_bytes(rng, p, others);
}

fn mutate_pth(rng: &mut Rng, seeds: &[Vec<u8>], zips: &[Vec<(String, Vec<u8>)>]) -> Vec<u8> {
    let k = rng.below(seeds.len());
    let mut b = seeds[k].clone();
    if b.starts_with(b"PK") && rng.below(3) != 0 {
        // Zip-structure aware: mutate the pickle or a storage (or drop / duplicate / rename an
        // entry) and write the archive back, so that the CRCs hold and the reader gets past them.
        let mut e = zips[k].clone();
        let i = rng.below(e.len());
        match rng.below(8) {
            0..=3 => {
                let pkl = e.iter().position(|(n, _)| n.ends_with("data.pkl")).unwrap();
                mutate_pickle(rng, &mut e[pkl].1, &[]);
            }
            4 => {
                let n = rng.below(e[i].1.len() + 1);
                e[i].1.truncate(n);
            }
            5 => {
                e.remove(i);
            }
            6 => {
                // Another data.pkl or storage, in another folder or none.
                let (n, v) = e[i].clone();
                let base = n
                    .rsplit_once('/')
                    .map_or(n.as_str(), |(_, b)| b)
                    .to_string();
                let n = [format!("x/{n}"), base, format!("{n}/{n}")][rng.below(3)].clone();
                e.insert(rng.below(e.len() + 1), (n, v));
            }
            _ => {
                let (mut n, v) = e[i].clone();
                n.push_str(["0", "/x", ".pkl"][rng.below(3)]);
                e[i] = (n, v);
            }
        }
        b = rezip(&e, rng.below(4) == 0);
    } else if !b.starts_with(b"PK") && rng.below(2) == 0 {
        // Legacy: the pickles are most of what precedes the storages; their counts are u64s.
        let end = b.len().min(1200);
        let mut head = b[..end].to_vec();
        mutate_pickle(rng, &mut head, &[]);
        head.extend_from_slice(&b[end..]);
        b = head;
    } else {
        mutate_bytes(rng, &mut b, seeds);
    }
    b
}

fn check_pth(b: &[u8]) -> Result<bool, String> {
    use medfastsam::import::pth;
    match pth::read_pth(b, "fuzz.pth") {
        Err(e) => {
            let m = e.to_string();
            if !m.starts_with("fuzz.pth: ") || m.contains('\n') {
                return Err(format!("message {m:?}"));
            }
            Ok(false)
        }
        Ok(ck) => {
            let mut names = std::collections::HashSet::new();
            for t in &ck.tensors {
                let n = t.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
                if n != Some(t.data.len()) {
                    return Err(format!(
                        "tensor {}: shape {:?} but {} values",
                        t.name,
                        t.shape,
                        t.data.len()
                    ));
                }
                if t.raw_i64.is_some() == t.dtype.is_float()
                    || t.raw_i64.as_ref().is_some_and(|v| v.len() != t.data.len())
                {
                    return Err(format!(
                        "tensor {}: integer values of a {:?}",
                        t.name, t.dtype
                    ));
                }
                if !names.insert(t.name.as_str()) {
                    return Err(format!("tensor {} twice", t.name));
                }
            }
            if ck.tensors.is_empty() {
                return Err("accepted without tensors".into());
            }
            Ok(true)
        }
    }
}

#[test]
fn fuzz_pth_checkpoints() {
    let mut seeds = vec![
        pth_fixture("formats.nested-f16.pth"),
        pth_fixture("formats.bf16-views.pth"),
        pth_fixture("formats.legacy.pth"),
    ];
    seeds.extend(small_pth_seeds());
    let zips: Vec<Vec<(String, Vec<u8>)>> = seeds
        .iter()
        .map(|s| {
            if s.starts_with(b"PK") {
                unzip(s)
            } else {
                Vec::new()
            }
        })
        .collect();
    for s in &seeds {
        assert_eq!(check_pth(s), Ok(true));
    }
    let mut rng = Rng::new(seed(7));
    let mut fz = Fuzz::new("pth");
    for _ in 0..iters() {
        let b = mutate_pth(&mut rng, &seeds, &zips);
        fz.case(Some(&b), None, || check_pth(&b));
    }
    fz.finish();
}

// ---------------------------------------------------------------------------------------------
// ONNX models (src/import/onnx.rs): the protobuf, tensor encodings (raw, typed, external), Constant
// nodes, and the MobileSAM mapping, on small models built here (not the 28 MB real export)

mod onnx_fuzz {
    use super::*;
    use medfastsam::import::onnx::{TensorData, mobilesam_state_dict, proto, read_onnx};
    use prost::Message;

    fn f32_tensor(name: &str, dims: &[i64], v: &[f32]) -> proto::TensorProto {
        proto::TensorProto {
            name: name.into(),
            dims: dims.to_vec(),
            data_type: proto::data_type::FLOAT,
            raw_data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ..Default::default()
        }
    }

    fn node(op: &str, name: &str, inputs: &[&str], outputs: &[&str]) -> proto::NodeProto {
        proto::NodeProto {
            op_type: op.into(),
            name: name.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn constant(name: &str, out: &str, t: proto::TensorProto) -> proto::NodeProto {
        let mut c = node("Constant", name, &[], &[out]);
        c.attribute.push(proto::AttributeProto {
            name: "value".into(),
            r#type: proto::attribute_type::TENSOR,
            t: Some(t),
            ..Default::default()
        });
        c
    }

    fn input(name: &str, dims: &[i64]) -> proto::ValueInfoProto {
        proto::ValueInfoProto {
            name: name.into(),
            r#type: Some(proto::TypeProto {
                tensor_type: Some(proto::TypeProtoTensor {
                    elem_type: proto::data_type::FLOAT,
                    shape: Some(proto::TensorShapeProto {
                        dim: dims
                            .iter()
                            .map(|&d| proto::Dimension {
                                dim_value: Some(d),
                                dim_param: None,
                            })
                            .collect(),
                    }),
                }),
            }),
        }
    }

    fn model(graph: proto::GraphProto) -> proto::ModelProto {
        proto::ModelProto {
            ir_version: 8,
            producer_name: "fuzz".into(),
            graph: Some(graph),
            opset_import: vec![proto::OperatorSetIdProto {
                domain: String::new(),
                version: 17,
            }],
            ..Default::default()
        }
    }

    /// A consistent TinyViT attention bias table (heads × ws² × ws²).
    fn bias_table(heads: usize, ws: usize) -> Vec<f32> {
        let n = ws * ws;
        let mut v = Vec::with_capacity(heads * n * n);
        for h in 0..heads {
            for p in 0..n {
                for q in 0..n {
                    let (dr, dc) = ((p / ws).abs_diff(q / ws), (p % ws).abs_diff(q % ws));
                    v.push((h * 100 + dr * ws + dc) as f32 * 0.01);
                }
            }
        }
        v
    }

    pub fn seeds() -> Vec<Vec<u8>> {
        // 1. Another model: y = x + b.
        let add = model(proto::GraphProto {
            node: vec![node("Add", "/Add", &["x", "b"], &["y"])],
            initializer: vec![f32_tensor("b", &[2, 3], &[1., 2., 3., 4., 5., 6.])],
            input: vec![input("x", &[2, 3])],
            output: vec![input("y", &[2, 3])],
            ..Default::default()
        });
        // 2. Typed fields, f16/f64/i64, Constant node forms, external data.
        let mut g = add.graph.clone().unwrap();
        g.initializer.push(proto::TensorProto {
            name: "typed".into(),
            dims: vec![2, 2],
            data_type: proto::data_type::FLOAT,
            float_data: vec![0.5, 1.5, -2.0, 4.0],
            ..Default::default()
        });
        g.initializer.push(proto::TensorProto {
            name: "half".into(),
            dims: vec![3],
            data_type: proto::data_type::FLOAT16,
            int32_data: vec![0x3C00, 0xC000, 0x3555],
            ..Default::default()
        });
        g.initializer.push(proto::TensorProto {
            name: "double".into(),
            dims: vec![2],
            data_type: proto::data_type::DOUBLE,
            double_data: vec![0.25, -8.0],
            ..Default::default()
        });
        g.initializer.push(proto::TensorProto {
            name: "shape".into(),
            dims: vec![3],
            data_type: proto::data_type::INT64,
            int64_data: vec![1, -1, 4],
            ..Default::default()
        });
        g.initializer.push(proto::TensorProto {
            name: "ext".into(),
            dims: vec![4],
            data_type: proto::data_type::FLOAT,
            data_location: proto::EXTERNAL,
            external_data: [("location", "w.bin"), ("offset", "16"), ("length", "16")]
                .iter()
                .map(|(k, v)| proto::StringStringEntryProto {
                    key: k.to_string(),
                    value: v.to_string(),
                })
                .collect(),
            ..Default::default()
        });
        g.node
            .push(constant("/c", "c_out", f32_tensor("", &[2], &[3.0, 4.0])));
        let mut c = node("Constant", "/c2", &[], &["c2_out"]);
        c.attribute.push(proto::AttributeProto {
            name: "value_ints".into(),
            r#type: proto::attribute_type::INTS,
            ints: vec![1, 2, 3],
            ..Default::default()
        });
        g.node.push(c);
        let typed = model(g);
        // 3. Like the encoder export: stem conv with a folded bias, an attention bias table, the
        // attention scale, a transposed Linear weight of the wrong size, a LayerNorm2d weight.
        let mut g = proto::GraphProto {
            input: vec![input("input", &[1, 3, 1024, 1024])],
            ..Default::default()
        };
        g.node.push(node(
            "Conv",
            "/patch_embed/seq/seq.0/c/Conv",
            &["input", "onnx::Conv_1", "onnx::Conv_2"],
            &["p"],
        ));
        g.node.push(node(
            "MatMul",
            "/layers.1/blocks.0/attn/qkv/MatMul",
            &["p", "onnx::MatMul_3"],
            &["qkv"],
        ));
        g.node.push(constant(
            "/layers.1/blocks.0/attn/Constant_4",
            "scale",
            f32_tensor("", &[], &[32f32.powf(-0.5)]),
        ));
        g.node.push(node(
            "Mul",
            "/layers.1/blocks.0/attn/Mul",
            &["qkv", "scale"],
            &["s"],
        ));
        g.node.push(constant(
            "/layers.1/blocks.0/attn/Constant_5",
            "tab",
            f32_tensor("", &[4, 49, 49], &bias_table(4, 7)),
        ));
        g.node.push(node(
            "Add",
            "/layers.1/blocks.0/attn/Add",
            &["s", "tab"],
            &["a"],
        ));
        g.node.push(node(
            "Mul",
            "/neck/neck.1/Mul",
            &["a", "onnx::Mul_4"],
            &["n"],
        ));
        g.initializer = vec![
            f32_tensor("onnx::Conv_1", &[32, 3, 3, 3], &[0.5; 32 * 27]),
            f32_tensor("onnx::Conv_2", &[32], &[0.25; 32]),
            f32_tensor("onnx::MatMul_3", &[4, 12], &[0.125; 48]),
            f32_tensor("onnx::Mul_4", &[256, 1, 1], &[1.0; 256]),
            f32_tensor("layers.1.blocks.0.attn.norm.weight", &[128], &[1.0; 128]),
        ];
        let encoder = model(g);
        // 4. Like the decoder export: the token table, no_mask_embed, a Gemm, a LayerNormalization.
        let mut g = proto::GraphProto {
            input: vec![
                input("image_embeddings", &[1, 256, 64, 64]),
                input("has_mask_input", &[1]),
            ],
            ..Default::default()
        };
        g.node.push(node(
            "Expand",
            "/Expand_1",
            &["onnx::Expand_1", "shape"],
            &["tok"],
        ));
        g.node
            .push(node("Sub", "/Sub_1", &["one", "has_mask_input"], &["inv"]));
        g.node
            .push(node("Mul", "/Mul_9", &["inv", "onnx::Mul_2"], &["nm"]));
        let mut gemm = node(
            "Gemm",
            "/output_hypernetworks_mlps.0/layers.0/Gemm",
            &[
                "tok",
                "mask_decoder.output_hypernetworks_mlps.0.layers.0.weight",
                "mask_decoder.output_hypernetworks_mlps.0.layers.0.bias",
            ],
            &["h"],
        );
        gemm.attribute.push(proto::AttributeProto {
            name: "transB".into(),
            r#type: proto::attribute_type::INT,
            i: 1,
            ..Default::default()
        });
        g.node.push(gemm);
        g.node.push(node(
            "LayerNormalization",
            "/transformer/layers.0/norm1/LayerNormalization",
            &[
                "h",
                "mask_decoder.transformer.layers.0.norm1.weight",
                "mask_decoder.transformer.layers.0.norm1.bias",
            ],
            &["o"],
        ));
        g.initializer = vec![
            f32_tensor("onnx::Expand_1", &[1, 5, 256], &[0.5; 5 * 256]),
            f32_tensor("one", &[], &[1.0]),
            f32_tensor("onnx::Mul_2", &[1, 256, 1, 1], &[0.25; 256]),
            f32_tensor(
                "mask_decoder.output_hypernetworks_mlps.0.layers.0.weight",
                &[8, 8],
                &[0.0; 64],
            ),
            f32_tensor(
                "mask_decoder.output_hypernetworks_mlps.0.layers.0.bias",
                &[256],
                &[0.0; 256],
            ),
            f32_tensor(
                "mask_decoder.transformer.layers.0.norm1.weight",
                &[256],
                &[1.0; 256],
            ),
            f32_tensor(
                "mask_decoder.transformer.layers.0.norm1.bias",
                &[256],
                &[0.0; 256],
            ),
        ];
        let decoder = model(g);
        [add, typed, encoder, decoder]
            .iter()
            .map(|m| m.encode_to_vec())
            .collect()
    }

    /// Every tensor of a model, initializers and Constant node values.
    fn tensors(m: &mut proto::ModelProto) -> Vec<&mut proto::TensorProto> {
        let g = m.graph.as_mut().unwrap();
        let mut v: Vec<&mut proto::TensorProto> = g.initializer.iter_mut().collect();
        for n in &mut g.node {
            for a in &mut n.attribute {
                if let Some(t) = a.t.as_mut() {
                    v.push(t);
                }
            }
        }
        v
    }

    fn mutate_tensor(rng: &mut Rng, t: &mut proto::TensorProto) {
        match rng.below(9) {
            0 => {
                let rank = rng.below(5);
                t.dims = (0..rank)
                    .map(|_| {
                        if rng.below(2) == 0 {
                            rng.below(8) as i64
                        } else {
                            interesting(rng) as i64
                        }
                    })
                    .collect();
            }
            1 if !t.dims.is_empty() => {
                let i = rng.below(t.dims.len());
                t.dims[i] = [0, 1, -1, 2, 49, 256, i64::MAX, i64::MIN][rng.below(8)];
            }
            2 => t.data_type = [0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 13, 16, 99][rng.below(13)],
            3 => {
                let n = rng.below(t.raw_data.len() + 9);
                t.raw_data.resize(n, 0x3F);
            }
            4 => {
                // Move the data to a typed field (or drop it).
                let f: Vec<f32> = t
                    .raw_data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                t.raw_data.clear();
                match rng.below(5) {
                    0 => t.float_data = f,
                    1 => t.int32_data = f.iter().map(|&x| x as i32).collect(),
                    2 => t.int64_data = f.iter().map(|&x| x as i64).collect(),
                    3 => t.double_data = f.iter().map(|&x| x as f64).collect(),
                    _ => t.uint64_data = f.iter().map(|&x| x as u64).collect(),
                }
            }
            5 => {
                t.data_location = proto::EXTERNAL;
                t.raw_data.clear();
                let mut e = vec![proto::StringStringEntryProto {
                    key: "location".into(),
                    value: ["w.bin", "../w.bin", "/w.bin", "", "missing.bin", "a/b.bin"]
                        [rng.below(6)]
                    .into(),
                }];
                for k in ["offset", "length"] {
                    if rng.below(3) > 0 {
                        let v = if rng.below(2) == 0 {
                            rng.below(80).to_string()
                        } else if rng.below(4) == 0 {
                            "-3".to_string()
                        } else {
                            interesting(rng).to_string()
                        };
                        e.push(proto::StringStringEntryProto {
                            key: k.into(),
                            value: v,
                        });
                    }
                }
                t.external_data = e;
            }
            6 => t.data_location = rng.below(3) as i32,
            7 => {
                t.name = [
                    "b",
                    "",
                    "onnx::MatMul_9",
                    "neck.0.weight",
                    "model.prompt_encoder.no_mask_embed.weight",
                    "tab",
                ][rng.below(6)]
                .into()
            }
            _ => {
                for x in t.raw_data.iter_mut().take(64) {
                    if rng.below(8) == 0 {
                        *x = rng.next_u64() as u8;
                    }
                }
            }
        }
    }

    fn mutate_graph(rng: &mut Rng, m: &mut proto::ModelProto) {
        let g = m.graph.as_mut().unwrap();
        if g.node.is_empty() {
            return;
        }
        let i = rng.below(g.node.len());
        let n = &mut g.node[i];
        match rng.below(6) {
            0 => {
                n.op_type = [
                    "Add", "Mul", "MatMul", "Gemm", "Conv", "Expand", "Constant", "Sub", "",
                ][rng.below(9)]
                .into()
            }
            1 => {
                n.name = [
                    "/layers.1/blocks.0/attn/Add",
                    "/neck/neck.1/Add_1",
                    "/patch_embed/seq/seq.2/c/Conv",
                    "/transformer/layers.0/mlp/lin1/MatMul",
                    "/mask_downscaling/mask_downscaling.1/Mul",
                    "/",
                    "",
                    "//a//b/",
                ][rng.below(8)]
                .into()
            }
            2 if !n.input.is_empty() => {
                let k = rng.below(n.input.len());
                n.input[k] =
                    ["", "tab", "onnx::Conv_2", "has_mask_input", "x"][rng.below(5)].into();
            }
            3 => {
                n.attribute.push(proto::AttributeProto {
                    name: ["transB", "alpha", "group", "value", "value_float"][rng.below(5)].into(),
                    r#type: rng.below(12) as i32,
                    i: interesting(rng) as i64,
                    f: [0.0, 1.0, 2.5, f32::NAN][rng.below(4)],
                    ..Default::default()
                });
            }
            4 => {
                g.node.remove(i);
            }
            _ => {
                let n = n.clone();
                g.node.push(n);
            }
        }
        if rng.below(6) == 0 {
            m.opset_import.clear();
        }
        if rng.below(6) == 0 {
            m.ir_version = [0, -1, 3, 1 << 40][rng.below(4)];
        }
    }

    pub fn mutate(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
        let mut b = seeds[rng.below(seeds.len())].clone();
        if rng.below(10) < 7 {
            let mut m = proto::ModelProto::decode(b.as_slice()).unwrap();
            for _ in 0..1 + rng.below(3) {
                if rng.below(3) == 0 {
                    mutate_graph(rng, &mut m);
                } else {
                    let mut ts = tensors(&mut m);
                    if !ts.is_empty() {
                        let i = rng.below(ts.len());
                        mutate_tensor(rng, ts[i]);
                    }
                }
            }
            b = m.encode_to_vec();
            if rng.below(5) == 0 {
                mutate_bytes(rng, &mut b, seeds);
            }
        } else {
            mutate_bytes(rng, &mut b, seeds);
        }
        b
    }

    pub fn check(b: &[u8]) -> Result<bool, String> {
        let ext_file: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(37)).collect();
        let resolver = |loc: &str| -> anyhow::Result<Vec<u8>> {
            match loc {
                "w.bin" => Ok(ext_file.clone()),
                "a/b.bin" => anyhow::bail!("a/b.bin:\nnot readable"),
                o => anyhow::bail!("no file {o}"),
            }
        };
        let message = |e: anyhow::Error| {
            let m = format!("{e:#}");
            if !m.starts_with("fuzz.onnx: ") || m.contains('\n') {
                Err(format!("message {m:?}"))
            } else {
                Ok(())
            }
        };
        let m = match read_onnx(b, "fuzz.onnx", &resolver) {
            Err(e) => return message(e).map(|_| false),
            Ok(m) => m,
        };
        for t in &m.tensors {
            let n = t.dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            let len = match &t.data {
                TensorData::F32(v) => Some(v.len()),
                TensorData::F64(v) => Some(v.len()),
                TensorData::I64(v) => Some(v.len()),
                TensorData::Unsupported(_) => None,
            };
            if len.is_some() && n != len {
                return Err(format!(
                    "tensor {}: dims {:?} but {len:?} values",
                    t.name, t.dims
                ));
            }
        }
        let _ = m.describe();
        for (e, d) in [(Some(&m), None), (None, Some(&m))] {
            match mobilesam_state_dict(e, d) {
                Err(e) => message(e)?,
                Ok(w) => {
                    for (k, s, v) in &w.tensors {
                        if s.iter().product::<usize>() != v.len() {
                            return Err(format!(
                                "imported {k}: shape {s:?} but {} values",
                                v.len()
                            ));
                        }
                    }
                }
            }
        }
        Ok(true)
    }
}

#[test]
fn fuzz_onnx() {
    let seeds = onnx_fuzz::seeds();
    for s in &seeds {
        assert_eq!(onnx_fuzz::check(s), Ok(true));
    }
    let mut rng = Rng::new(seed(8));
    let mut fz = Fuzz::new("onnx");
    for _ in 0..iters() {
        let b = onnx_fuzz::mutate(&mut rng, &seeds);
        fz.case(Some(&b), None, || onnx_fuzz::check(&b));
    }
    fz.finish();
}

// ---------------------------------------------------------------------------------------------
// Dataset folder layouts

/// (format, files as (relative path, kind)) with kind: "img", "mask", "xml", "split:<json>".
fn layout(format: Format) -> Vec<(String, &'static str)> {
    let v: Vec<(&str, &str)> = match format {
        Format::Generic => vec![
            ("images/a.png", "img"),
            ("masks/a.png", "mask"),
            ("images/b.jpg", "img"),
            ("masks/b.png", "mask"),
            ("images/c.bmp", "img"),
            ("masks/c.tif", "mask"),
            (
                "split.json",
                r#"split:{"train":["a"],"val":["b.jpg"],"test":["sub/c"]}"#,
            ),
        ],
        Format::Authors => vec![
            ("image_1024/x1.png", "img"),
            ("mask_1024/x1.png", "mask"),
            ("image_1024/x2.png", "img"),
            ("mask_1024/x2.png", "mask"),
            (
                "data_split.json",
                r#"split:{"train":["x1.png"],"valid":["x2"],"test":[]}"#,
            ),
        ],
        Format::Isic2018 => vec![
            ("ISIC2018_Task1-2_Training_Input/ISIC_0000001.jpg", "img"),
            (
                "ISIC2018_Task1_Training_GroundTruth/ISIC_0000001_segmentation.png",
                "mask",
            ),
            ("ISIC2018_Task1-2_Validation_Input/ISIC_0000002.jpg", "img"),
            (
                "ISIC2018_Task1_Validation_GroundTruth/ISIC_0000002_segmentation.png",
                "mask",
            ),
        ],
        Format::Ph2 => vec![
            (
                "PH2 Dataset images/IMD002/IMD002_Dermoscopic_Image/IMD002.bmp",
                "img",
            ),
            (
                "PH2 Dataset images/IMD002/IMD002_lesion/IMD002_lesion.bmp",
                "mask",
            ),
            (
                "PH2 Dataset images/IMD003/IMD003_Dermoscopic_Image/IMD003.bmp",
                "img",
            ),
            (
                "PH2 Dataset images/IMD003/IMD003_lesion/IMD003_lesion.bmp",
                "mask",
            ),
        ],
        Format::Monuseg => vec![
            ("Tissue Images/TCGA-1.tif", "img"),
            ("Annotations/TCGA-1.xml", "xml"),
            ("test/TCGA-2.tif", "img"),
            ("test/TCGA-2.xml", "xml"),
        ],
        Format::Tnbc => vec![
            ("Slide_01/01_1.png", "img"),
            ("GT_01/01_1.png", "mask"),
            ("Slide_02/02_1.png", "img"),
            ("GT_02/02_1.png", "mask"),
        ],
    };
    v.into_iter().map(|(p, k)| (p.to_string(), k)).collect()
}

const ODD_NAMES: &[&str] = &[
    ".hidden.png",
    "noext",
    "a.b.c.png",
    "space name.png",
    "ünïcode.png",
    "UPPER.PNG",
    "x.jpeg",
    "x.tif.png",
    "..png",
    ".png",
    "a.png.",
    "con.png",
    "a\\b.png",
    "-rf.png",
];

fn image_for(path: &str, kind: &str, w: u32, h: u32) -> Vec<u8> {
    use image::ImageFormat as F;
    let f = match path
        .rsplit('.')
        .next()
        .unwrap_or("")
        .to_ascii_lowercase()
        .as_str()
    {
        "jpg" | "jpeg" => F::Jpeg,
        "bmp" => F::Bmp,
        "tif" | "tiff" => F::Tiff,
        _ => F::Png,
    };
    let img = if kind == "mask" {
        image::DynamicImage::ImageLuma8(image::GrayImage::from_fn(w, h, |x, _| {
            image::Luma([if x > w / 2 { 255 } else { 0 }])
        }))
    } else {
        image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([x as u8 * 9, y as u8 * 9, 80])
        }))
    };
    encode(&img, f)
}

fn build_dataset(rng: &mut Rng, root: &Path, format: Format, seeds: &[Vec<u8>]) -> Vec<String> {
    let mut files = layout(format);
    let mut log = Vec::new();
    // Perturb the file list.
    for _ in 0..1 + rng.below(3) {
        let i = rng.below(files.len());
        match rng.below(6) {
            0 => {
                log.push(format!("remove {}", files[i].0));
                files.remove(i);
                if files.is_empty() {
                    break;
                }
            }
            1 => {
                let dir = files[i]
                    .0
                    .rsplit_once('/')
                    .map_or(String::new(), |(d, _)| format!("{d}/"));
                let name = format!("{dir}{}", ODD_NAMES[rng.below(ODD_NAMES.len())]);
                log.push(format!("add {name}"));
                files.push((name, if rng.below(2) == 0 { "img" } else { "mask" }));
            }
            2 => {
                let (p, _) = &files[i];
                let np = match p.rsplit_once('.') {
                    Some((s, _)) => format!(
                        "{s}.{}",
                        ["png", "jpg", "bmp", "tif", "xml", "txt"][rng.below(6)]
                    ),
                    None => format!("{p}.png"),
                };
                log.push(format!("rename {p} -> {np}"));
                files[i].0 = np;
            }
            _ => {}
        }
    }
    let (w, h) = (6 + rng.below(20) as u32, 4 + rng.below(12) as u32);
    for (p, kind) in &files {
        let path = root.join(p);
        let _ = std::fs::create_dir_all(path.parent().unwrap());
        let mut bytes = if let Some(s) = kind.strip_prefix("split:") {
            s.as_bytes().to_vec()
        } else if *kind == "xml" {
            XML_SEED.as_bytes().to_vec()
        } else {
            let (mw, mh) = if *kind == "mask" && rng.below(8) == 0 {
                (w + 1, h)
            } else {
                (w, h)
            };
            image_for(p, kind, mw, mh)
        };
        match rng.below(8) {
            0 => {
                bytes = if kind.starts_with("split:") {
                    let subs = [
                        "[]",
                        "{\"train\": 5}",
                        "{\"train\": [1, null]}",
                        "{\"train\": [\"../../etc/passwd\"]}",
                        "{\"val\": [\"\"]}",
                        "{",
                        "null",
                        "{\"train\": [\"a\", \"a\"]}",
                    ];
                    subs[rng.below(subs.len())].as_bytes().to_vec()
                } else if *kind == "xml" {
                    mutate_xml(rng)
                } else {
                    mutate_image(rng, seeds)
                };
                log.push(format!("mutate {p}"));
            }
            1 => {
                let n = rng.below(bytes.len() + 1);
                bytes.truncate(n);
                log.push(format!("truncate {p} to {n}"));
            }
            _ => {}
        }
        if rng.below(25) == 0 {
            // A folder where a file is expected.
            let _ = std::fs::create_dir_all(&path);
            log.push(format!("{p} is a folder"));
        } else {
            let _ = std::fs::write(&path, &bytes);
        }
    }
    if rng.below(10) == 0 {
        // A symlink loop inside the image folder.
        if let Some((p, _)) = files.first()
            && let Some((d, _)) = p.rsplit_once('/')
        {
            let link = root.join(d).join("loop");
            #[cfg(unix)]
            let _ = std::os::unix::fs::symlink("..", &link);
            log.push(format!("symlink {d}/loop -> .."));
        }
    }
    log
}

#[test]
fn fuzz_dataset_layouts() {
    // The dataset loader decodes through the process-wide budget; the fuzz tests of this binary
    // pass explicit limits elsewhere, so setting it here affects no other test.
    io::set_max_pixels(FUZZ_LIMITS.max_pixels);
    let seeds = image_seeds();
    let formats = [
        Format::Generic,
        Format::Authors,
        Format::Isic2018,
        Format::Ph2,
        Format::Monuseg,
        Format::Tnbc,
    ];
    // The unperturbed layouts open and load.
    let dir = out_dir("dataset-seeds");
    for f in formats {
        let root = dir.join(f.name());
        std::fs::create_dir_all(&root).unwrap();
        for (p, kind) in layout(f) {
            let path = root.join(&p);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            let bytes = match kind.strip_prefix("split:") {
                Some(s) => s.as_bytes().to_vec(),
                None if kind == "xml" => XML_SEED.as_bytes().to_vec(),
                None => image_for(&p, kind, 16, 12),
            };
            std::fs::write(path, bytes).unwrap();
        }
        let ds = Dataset::open(&root, f, Split::All).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert!(!ds.is_empty(), "{f}");
        for i in 0..ds.len() {
            ds.load(i).unwrap_or_else(|e| panic!("{f}: {e}"));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);

    let mut rng = Rng::new(seed(6));
    let mut fz = Fuzz::new("datasets");
    let work = fz.dir.clone();
    for i in 0..(iters() / 5).max(1) {
        let root = work.join(format!("case-{i}"));
        std::fs::create_dir_all(&root).unwrap();
        let format = formats[rng.below(formats.len())];
        let log = build_dataset(&mut rng, &root, format, &seeds);
        let open_as = if rng.below(6) == 0 {
            formats[rng.below(formats.len())]
        } else {
            format
        };
        let desc = format!("{} opened as {open_as}: {}", root.display(), log.join("; "));
        fz.case(Some(desc.as_bytes()), Some(&root), || {
            let mut accepted = false;
            for split in [Split::All, Split::Train, Split::Val, Split::Test] {
                if let Ok(ds) = Dataset::open(&root, open_as, split) {
                    accepted = true;
                    for k in 0..ds.len().min(6) {
                        match ds.load(k) {
                            Ok((img, mask)) if mask.len() != img.width * img.height => {
                                return Err(format!(
                                    "sample {k}: mask of {} values for a {}x{} image",
                                    mask.len(),
                                    img.width,
                                    img.height
                                ));
                            }
                            Ok(_) => {}
                            Err(e) if e.to_string().contains('\n') => {
                                return Err(format!("message {e}"));
                            }
                            Err(_) => {}
                        }
                    }
                }
            }
            Ok(accepted)
        });
        if fz
            .failures
            .last()
            .is_none_or(|f| !f.contains(&format!("input {i} ")))
        {
            let _ = std::fs::remove_dir_all(&root);
        }
    }
    io::set_max_pixels(0);
    fz.finish();
}

/// The harness itself: a panicking call, a call holding 1.5 GiB and a broken invariant are each
/// reported with the saved input; a clean call is not.
#[test]
fn harness_reports_panics_memory_and_invariants() {
    let mut fz = Fuzz::new("harness");
    fz.case(Some(b"ok"), None, || Ok(true));
    fz.case(Some(b"panics"), None, || -> Result<bool, String> {
        panic!("boom")
    });
    fz.case(Some(b"big"), None, || {
        // Zeroed pages are mapped lazily: counted, not touched.
        let v = vec![0u8; 3 << 29];
        Ok(v.len() > 1)
    });
    fz.case(Some(b"invariant"), None, || Err("wrong size".into()));
    let f = std::mem::take(&mut fz.failures);
    assert_eq!(f.len(), 3, "{f:?}");
    assert!(
        f[0].contains("input 1 ") && f[0].contains("panicked: boom"),
        "{}",
        f[0]
    );
    assert!(
        f[1].contains("input 2 ")
            && f[1].contains("used 1610612")
            && f[1].contains("bytes of memory"),
        "{}",
        f[1]
    );
    assert!(f[2].contains("wrong size"), "{}", f[2]);
    let saved = f[0].split(" (").nth(1).unwrap().split("):").next().unwrap();
    assert_eq!(std::fs::read(saved).unwrap(), b"panics");
    fz.finish();
}
