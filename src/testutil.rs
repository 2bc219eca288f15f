//! Helpers of the tests (feature `testing`, on for `cargo test` through the crate's
//! dev-dependency on itself; not in the CLI or the wasm build): the tests' GPU, deterministic
//! random data and error measures.

pub use crate::rng::Rng;

pub fn to_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// The error measures are the product's (`medfastsam selftest` reports them).
pub use crate::selftest::{max_abs, rel_err};

/// Panics with a readable message when `rel_err(got, want) > tol`.
#[track_caller]
pub fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length mismatch");
    let e = rel_err(got, want);
    // NaN errors fail too.
    if e.is_nan() || e > tol {
        let (i, _) = got
            .iter()
            .zip(want)
            .enumerate()
            .map(|(i, (&g, &w))| (i, (g as f64 - w).abs()))
            .fold((0, -1.0), |a, b| if b.1 > a.1 { b } else { a });
        panic!(
            "{what}: relative error {e:.3e} > {tol:.1e} (worst at index {i}: got {} want {})",
            got[i], want[i]
        );
    }
}

/// The GPU used by tests: the adapter the runtime picks (lavapipe on CI). Fails loudly with
/// installation advice when none is present; never skips.
#[cfg(not(target_arch = "wasm32"))]
pub fn test_gpu() -> &'static crate::gpu::Gpu {
    static GPU: std::sync::OnceLock<crate::gpu::Gpu> = std::sync::OnceLock::new();
    GPU.get_or_init(|| {
        let req = crate::gpu::AdapterRequest::default().with_env();
        match crate::gpu::Gpu::new(&req) {
            Ok(g) => {
                eprintln!("test adapter: {}", g.summary());
                g
            }
            Err(e) => panic!(
                "GPU tests need a wgpu adapter and none was found: {e}\n\
                 On Debian/Ubuntu without a GPU install the software Vulkan driver: \
                 apt-get install -y mesa-vulkan-drivers libvulkan1"
            ),
        }
    })
}
