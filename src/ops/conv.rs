//! conv kernels (shaders/conv.wgsl). STUB: replaced by the real implementation on merge.
use crate::error::Result;
use crate::gpu::{Recorder, Tensor};
use crate::ops::Act;
pub fn conv2d(_rec: &mut Recorder, _x: &Tensor, _w: &Tensor, _bias: Option<&Tensor>, _stride: usize, _pad: usize, _act: Act) -> Result<Tensor> { unimplemented!() }
pub fn depthwise_conv2d(_rec: &mut Recorder, _x: &Tensor, _w: &Tensor, _bias: Option<&Tensor>, _stride: usize, _pad: usize, _act: Act) -> Result<Tensor> { unimplemented!() }
pub fn conv_transpose2x2(_rec: &mut Recorder, _x: &Tensor, _w: &Tensor, _bias: Option<&Tensor>, _act: Act) -> Result<Tensor> { unimplemented!() }
