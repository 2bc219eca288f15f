//! attention kernels (shaders/attention.wgsl). STUB: replaced by the real implementation on merge.
use crate::error::Result;
use crate::gpu::{Recorder, Tensor};
pub fn window_partition(_rec: &mut Recorder, _x: &Tensor, _ws: usize) -> Result<Tensor> { unimplemented!() }
pub fn window_reverse_add(_rec: &mut Recorder, _y: &Tensor, _res: &Tensor, _ws: usize) -> Result<Tensor> { unimplemented!() }
pub fn window_attention(_rec: &mut Recorder, _qkv: &Tensor, _bias: &Tensor, _heads: usize, _ws: usize) -> Result<Tensor> { unimplemented!() }
pub fn mha(_rec: &mut Recorder, _q: &Tensor, _k: &Tensor, _v: &Tensor, _heads: usize) -> Result<Tensor> { unimplemented!() }
