//! Helpers shared by tests, benchmarks and the CLI self-checks: deterministic random data and
//! error measures. (Not part of the model.)

/// Deterministic xorshift64* generator.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in [lo, hi).
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }
    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
    /// `n` values uniform in [-1, 1), rounded to f32 (so CPU and GPU see the same numbers).
    pub fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.range(-1.0, 1.0) as f32).collect()
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

pub fn to_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// `max |got - want| / max |want|` (relative to the tensor's scale; 0 when both are zero).
pub fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let scale = want.iter().fold(0.0f64, |m, &w| m.max(w.abs()));
    let err = got.iter().zip(want).fold(0.0f64, |m, (&g, &w)| {
        if g.is_nan() || !g.is_finite() {
            f64::INFINITY
        } else {
            m.max((g as f64 - w).abs())
        }
    });
    if scale == 0.0 { err } else { err / scale }
}

/// Maximum absolute difference.
pub fn max_abs(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    got.iter().zip(want).fold(0.0f64, |m, (&g, &w)| {
        if !g.is_finite() { f64::INFINITY } else { m.max((g as f64 - w).abs()) }
    })
}

/// Panics with a readable message when `rel_err(got, want) > tol`.
#[track_caller]
pub fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    let e = rel_err(got, want);
    if !(e <= tol) {
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
