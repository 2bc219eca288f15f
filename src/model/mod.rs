//! The Med-FastSAM model: configuration, weights, and the three parts named as in the paper
//! (LKA-Encoder, CP-Encoder, MSF-Decoder with SAM's two-way transformer).

pub mod blocks;
pub mod config;
pub mod cp_encoder;
pub mod lka_encoder;
pub mod med_fastsam;
pub mod memory;
pub mod msf_decoder;
pub mod sam;
pub mod schema;
pub mod two_way_transformer;
pub mod weights;

pub use blocks::Mode;
pub use config::{Arch, Config, Variant};
pub use med_fastsam::{MedFastSam, Output, Saved, Stages};
pub use weights::Weights;

/// How an inference model stores its weights on the device (`--precision`).
///
/// At `F16` the weights of linear layers and 1×1 convolutions (the GEMMs' B operands: 94 % of
/// the paper model's weight bytes at 1024², 92 % of MobileSAM's, 77 % of the tiny test model's)
/// are stored as f16 and widened to f32 as the GEMM loads them; every product, sum, activation
/// and every other weight stays f32. Training always runs in f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Precision {
    /// [`Precision::F32`] unless the adapter is a GPU with `shader-f16`, where halving the
    /// weight reads pays ([`Precision::resolve`]); a weight beyond f16's range then stays f32.
    #[default]
    Auto,
    F32,
    F16,
}

impl Precision {
    pub fn parse(s: &str) -> crate::error::Result<Precision> {
        match s {
            "auto" => Ok(Precision::Auto),
            "f32" => Ok(Precision::F32),
            "f16" => Ok(Precision::F16),
            _ => Err(crate::error::Error::Invalid(format!(
                "--precision must be auto, f32 or f16, got `{s}`"
            ))),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Precision::Auto => "auto",
            Precision::F32 => "f32",
            Precision::F16 => "f16",
        }
    }
    /// The storage `Auto` picks on `gpu`: f16 on a hardware GPU that offers `shader-f16`, f32 on
    /// CPU adapters (lavapipe, SwiftShader), where widening costs more than the halved reads save.
    pub fn resolve(self, gpu: &crate::gpu::Gpu) -> Precision {
        match self {
            Precision::Auto => {
                let hw = !matches!(gpu.info.device_type, wgpu::DeviceType::Cpu);
                if hw && gpu.features.contains(wgpu::Features::SHADER_F16) {
                    Precision::F16
                } else {
                    Precision::F32
                }
            }
            p => p,
        }
    }
}
