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
