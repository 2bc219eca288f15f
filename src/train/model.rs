//! Training glue: the model's forward in train mode and its backward on the parameters of a
//! [`ParamStore`] (the forward and backward of every part live next to each other in
//! src/model/; docs/training.md).

use super::params::ParamStore;
use crate::error::{Error, Result};
use crate::gpu::{Recorder, Tensor};
use crate::model::{MedFastSam, Mode, Output, Saved};

#[doc(hidden)]
pub use crate::model::lka_encoder::FORCE_MBCONV_GROUPS;

/// What a training forward returns besides its cache (logits, coarse prompt, threshold).
pub type TrainOutput = Output;

/// Everything the backward of one training forward needs: the model built on the parameters and
/// what its train-mode forward kept.
pub struct Cache {
    model: MedFastSam,
    saved: Saved,
}

impl MedFastSam {
    /// The model on the training parameters already on the device (no copy): train mode for
    /// training, eval mode (BatchNorm with running statistics, not folded) for validation.
    pub fn from_params(ps: &ParamStore) -> Result<MedFastSam> {
        MedFastSam::build(ps, &ps.cfg, ps.variant)
    }
}

/// Training forward on packed pixels `[B,S,S]`: logits `[B,S,S,1]`. BatchNorm layers that train
/// use batch statistics and update their running statistics.
pub fn forward_train(
    ps: &ParamStore,
    rec: &mut Recorder,
    px: &Tensor,
) -> Result<(TrainOutput, Cache)> {
    let model = MedFastSam::from_params(ps)?;
    let (out, saved) = model.forward_mode(rec, px, Mode::Train, false)?;
    let saved = saved
        .ok_or_else(|| Error::Invalid("train-mode forward kept nothing for the backward".into()))?;
    Ok((out, Cache { model, saved }))
}

/// Backward from `dlogits` (`[B,S,S,1]`), accumulating into the parameter gradients.
pub fn backward(_ps: &ParamStore, rec: &mut Recorder, c: &Cache, dlogits: &Tensor) -> Result<()> {
    c.model.backward(rec, &c.saved, dlogits)
}
