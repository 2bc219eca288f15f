//! medfastsam: prompt-free medical image segmentation (Med-FastSAM, NeurIPS 2024) on wgpu, with every
//! numerical kernel a hand-written WGSL compute shader.

pub mod channel;
mod eigen;
pub mod error;
pub mod gpu;
pub mod import;
pub mod instances;
pub mod io;
pub mod model;
pub mod ops;
pub mod rng;
pub mod segment;
pub mod selftest;
pub mod stream;
pub mod teach;
#[cfg(any(test, feature = "testing"))]
pub mod testutil;
pub mod tile;
pub mod train;
pub mod trained_on;
#[cfg(all(target_arch = "wasm32", feature = "web"))]
pub mod web;
#[cfg(all(target_arch = "wasm32", feature = "web"))]
pub mod web_teach;
#[cfg(all(target_arch = "wasm32", feature = "web"))]
pub mod web_train;

pub use error::{Error, Result};
