//! Training: parameters and optimiser state on the device, the explicit backward of the model,
//! datasets, metrics and the training loop.

#[cfg(not(target_arch = "wasm32"))]
pub mod cleanup;
pub mod datasets;
#[cfg(not(target_arch = "wasm32"))]
pub mod distill;
pub mod gradients;
pub mod metrics;
pub mod params;
pub mod trainer;

#[cfg(not(target_arch = "wasm32"))]
pub use cleanup::remove_stale_temp_files;
