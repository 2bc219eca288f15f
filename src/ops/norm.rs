//! norm kernels (shaders/norm.wgsl). STUB: replaced by the real implementation on merge.
use crate::error::Result;
use crate::gpu::{Recorder, Tensor};
use crate::ops::Act;
pub fn layer_norm(_rec: &mut Recorder, _x: &Tensor, _w: &Tensor, _b: &Tensor, _eps: f32, _act: Act) -> Result<Tensor> { unimplemented!() }
