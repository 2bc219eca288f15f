//! pe kernels (shaders/pe.wgsl). STUB: replaced by the real implementation on merge.
use crate::error::Result;
use crate::gpu::{Recorder, Tensor};
pub fn dense_pe(_rec: &mut Recorder, _gauss: &Tensor, _h: usize, _w: usize) -> Result<Tensor> { unimplemented!() }
