//! otsu kernels (shaders/otsu.wgsl). STUB: replaced by the real implementation on merge.
use crate::error::Result;
use crate::gpu::{Recorder, Tensor};
#[derive(Clone, Copy, Debug, PartialEq, Eq)] pub enum OtsuRule { Paper, Released }
pub fn otsu(_rec: &mut Recorder, _px: &Tensor, _x_norm: &Tensor, _rule: OtsuRule) -> Result<(Tensor, Tensor)> { unimplemented!() }
