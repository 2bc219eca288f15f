//! Shared helpers of the integration tests: fixture loading, layout conversion, uploads, error
//! checks, and the lock of the tests that must not share the GPU concurrently.
#![allow(dead_code)]

pub mod cli;

use std::path::PathBuf;

pub fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

pub fn fixtures_dir() -> PathBuf {
    data_dir().join("fixtures")
}

/// The folder of the large paper-configuration fixtures named by `MEDFASTSAM_FIXTURES`. Tests
/// using it carry `#[cfg_attr(not(full_fixtures), ignore = ...)]` (see build.rs), so without the
/// variable they are reported as ignored; if they run anyway, a missing folder is a failure.
pub fn full_fixtures() -> PathBuf {
    let p = std::env::var("MEDFASTSAM_FIXTURES")
        .expect("MEDFASTSAM_FIXTURES must name the folder with full.forward.safetensors");
    let p = PathBuf::from(p);
    assert!(
        p.join("full.forward.safetensors").exists(),
        "{}: no full.forward.safetensors",
        p.display()
    );
    p
}

/// A safetensors file loaded into memory, with typed accessors.
pub struct Fixture {
    bytes: Vec<u8>,
    pub name: String,
}

impl Fixture {
    pub fn open(path: PathBuf) -> Fixture {
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Fixture {
            bytes,
            name: path.display().to_string(),
        }
    }
    fn st(&self) -> safetensors::SafeTensors<'_> {
        safetensors::SafeTensors::deserialize(&self.bytes).unwrap()
    }
    pub fn has(&self, key: &str) -> bool {
        self.st().tensor(key).is_ok()
    }
    pub fn shape(&self, key: &str) -> Vec<usize> {
        self.st()
            .tensor(key)
            .unwrap_or_else(|_| panic!("{}: no tensor {key}", self.name))
            .shape()
            .to_vec()
    }
    /// Any numeric tensor as f32.
    pub fn f32(&self, key: &str) -> Vec<f32> {
        let st = self.st();
        let t = st
            .tensor(key)
            .unwrap_or_else(|_| panic!("{}: no tensor {key}", self.name));
        let d = t.data();
        use safetensors::Dtype::*;
        match t.dtype() {
            F32 => d
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            F16 => d
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            U8 => d.iter().map(|&v| v as f32).collect(),
            I64 => d
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f32)
                .collect(),
            other => panic!("{key}: dtype {other:?}"),
        }
    }
    pub fn u8(&self, key: &str) -> Vec<u8> {
        let st = self.st();
        let t = st.tensor(key).unwrap();
        assert_eq!(t.dtype(), safetensors::Dtype::U8);
        t.data().to_vec()
    }
}

/// NCHW -> NHWC.
pub fn nchw_to_nhwc(x: &[f32], shape: &[usize]) -> Vec<f32> {
    let (b, c, h, w) = (shape[0], shape[1], shape[2], shape[3]);
    let mut y = vec![0f32; x.len()];
    for bi in 0..b {
        for ci in 0..c {
            for yi in 0..h {
                for xi in 0..w {
                    y[((bi * h + yi) * w + xi) * c + ci] = x[((bi * c + ci) * h + yi) * w + xi];
                }
            }
        }
    }
    y
}

/// u8 RGB [B,H,W,3] -> packed u32 pixels [B,H,W].
pub fn pack_rgb(x: &[u8]) -> Vec<u32> {
    x.chunks_exact(3)
        .map(|p| p[0] as u32 | (p[1] as u32) << 8 | (p[2] as u32) << 16)
        .collect()
}

/// `max |got - want| / max |want|`.
pub fn rel(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f64, |m, &v| m.max(v.abs() as f64));
    let e = got.iter().zip(want).fold(0f64, |m, (&g, &w)| {
        if !g.is_finite() {
            f64::INFINITY
        } else {
            m.max((g as f64 - w as f64).abs())
        }
    });
    if scale > 0.0 { e / scale } else { e }
}

/// Uploads f32 values of `shape`.
pub fn up(gpu: &medfastsam::gpu::Gpu, v: &[f32], shape: &[usize]) -> medfastsam::gpu::Tensor {
    gpu.upload(v, shape).unwrap()
}

pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Asserts and prints the relative error (max abs error / max |want|); returns it.
#[track_caller]
pub fn check(what: &str, got: &[f32], want: &[f64], tol: f64) -> f64 {
    let e = medfastsam::testutil::rel_err(got, want);
    eprintln!("{what}: rel err {e:.2e}");
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:.1e}");
    e
}

/// The GPU is shared by the tests of a file, which run on several threads; the buffer pool hands
/// a buffer freed (at drop, before its recording is submitted) by one thread to another, whose
/// submission can then be overtaken. Tests that hit this take turns through this lock.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static M: std::sync::Mutex<()> = std::sync::Mutex::new(());
    M.lock().unwrap_or_else(|e| e.into_inner())
}

/// Dice of two masks (foreground > 0), 1 when both are empty: an independent count for checking
/// the metrics the tools print.
pub fn dice(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut inter, mut sum) = (0usize, 0usize);
    for (&x, &y) in a.iter().zip(b) {
        inter += (x > 0 && y > 0) as usize;
        sum += (x > 0) as usize + (y > 0) as usize;
    }
    if sum == 0 {
        1.0
    } else {
        2.0 * inter as f64 / sum as f64
    }
}
