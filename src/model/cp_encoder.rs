//! CP-Encoder (paper §3.2, Eq. 6-9): the Otsu coarse prompt (ops::otsu, on the GPU) turned into a
//! dense prompt by SAM's mask_downscaling: conv2×2 s2 → LN2d → GELU → conv2×2 s2 → LN2d → GELU → conv1×1.

use super::lka_encoder::LN2D_EPS;
use super::med_fastsam::MedFastSam;
use crate::error::Result;
use crate::gpu::{Recorder, Tensor};
use crate::ops::conv::conv2d;
use crate::ops::matmul::{linear, Act};
use crate::ops::norm::layer_norm;

impl MedFastSam {
    /// Coarse mask at S/4 `[B, S/4, S/4, 1]` (values in {0, .25, .5, .75, 1}) → dense prompt `[B, S/16, S/16, D]`.
    pub fn cp_encode(&self, rec: &mut Recorder, mask_lowres: &Tensor) -> Result<Tensor> {
        let p = |i: usize, n: &str| format!("prompt_encoder.mask_downscaling.{i}.{n}");
        let h = conv2d(rec, mask_lowres, self.t(&p(0, "weight"))?, Some(self.t(&p(0, "bias"))?), 2, 0, Act::None)?;
        let h = layer_norm(rec, &h, self.t(&p(1, "weight"))?, self.t(&p(1, "bias"))?, LN2D_EPS, Act::Gelu)?;
        let h = conv2d(rec, &h, self.t(&p(3, "weight"))?, Some(self.t(&p(3, "bias"))?), 2, 0, Act::None)?;
        let h = layer_norm(rec, &h, self.t(&p(4, "weight"))?, self.t(&p(4, "bias"))?, LN2D_EPS, Act::Gelu)?;
        let w6 = self.t(&p(6, "weight"))?;
        linear(rec, &h, &w6.reshape(&[w6.shape[0], w6.shape[1]]), Some(self.t(&p(6, "bias"))?), Act::None, None)
    }
}
