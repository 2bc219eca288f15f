//! CPU f64 reference: dense, depthwise and 2x2 stride-2 transposed convolutions and their
//! gradients, written as plain loops from the definitions. Feature maps are channels-last
//! `[B, H, W, C]`; weights use PyTorch layouts (Conv2d `[Co, Ci/groups, k, k]`, ConvTranspose2d
//! `[Ci, Co, k, k]`). Backward functions return fresh gradients (they do not accumulate).

use crate::ops::Act;

/// Geometry of a square-kernel convolution over a channels-last input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvShape {
    pub b: usize,
    pub h: usize,
    pub w: usize,
    pub ci: usize,
    pub co: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
}

impl ConvShape {
    /// How a check or a benchmark names this shape.
    pub fn label(&self) -> String {
        format!(
            "B{} {}x{} Ci{} Co{} k{} s{} p{}",
            self.b, self.h, self.w, self.ci, self.co, self.k, self.stride, self.pad
        )
    }
    /// Input channels per output channel of the weight tensor: 1 for a depthwise convolution.
    pub fn weight_in(&self, depthwise: bool) -> usize {
        if depthwise { 1 } else { self.ci }
    }
    pub fn oh(&self) -> usize {
        (self.h + 2 * self.pad - self.k) / self.stride + 1
    }
    pub fn ow(&self) -> usize {
        (self.w + 2 * self.pad - self.k) / self.stride + 1
    }
    /// Input pixel read by output (oy, ox) through tap (ky, kx), if inside the image.
    fn input_at(&self, oy: usize, ox: usize, ky: usize, kx: usize) -> Option<(usize, usize)> {
        let iy = (oy * self.stride + ky) as isize - self.pad as isize;
        let ix = (ox * self.stride + kx) as isize - self.pad as isize;
        if iy < 0 || ix < 0 || iy >= self.h as isize || ix >= self.w as isize {
            None
        } else {
            Some((iy as usize, ix as usize))
        }
    }
}

/// Dense convolution: `y[b,oy,ox,o] = act(bias[o] + sum_{i,ky,kx} x[b,iy,ix,i] * w[o,i,ky,kx])`.
pub fn conv2d(s: &ConvShape, x: &[f64], w: &[f64], bias: Option<&[f64]>, act: Act) -> Vec<f64> {
    let (oh, ow, k) = (s.oh(), s.ow(), s.k);
    let mut y = vec![0.0; s.b * oh * ow * s.co];
    for b in 0..s.b {
        for oy in 0..oh {
            for ox in 0..ow {
                for o in 0..s.co {
                    let mut acc = bias.map_or(0.0, |bv| bv[o]);
                    for ky in 0..k {
                        for kx in 0..k {
                            let Some((iy, ix)) = s.input_at(oy, ox, ky, kx) else {
                                continue;
                            };
                            for i in 0..s.ci {
                                acc += x[((b * s.h + iy) * s.w + ix) * s.ci + i]
                                    * w[((o * s.ci + i) * k + ky) * k + kx];
                            }
                        }
                    }
                    y[((b * oh + oy) * ow + ox) * s.co + o] = super::act(acc, act);
                }
            }
        }
    }
    y
}

/// Gradients of [`conv2d`] without activation, given `dy` = dL/dy: `(dx, dw, dbias)`.
pub fn conv2d_backward(
    s: &ConvShape,
    x: &[f64],
    w: &[f64],
    dy: &[f64],
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (oh, ow, k) = (s.oh(), s.ow(), s.k);
    let mut dx = vec![0.0; x.len()];
    let mut dw = vec![0.0; w.len()];
    let mut db = vec![0.0; s.co];
    for b in 0..s.b {
        for oy in 0..oh {
            for ox in 0..ow {
                for o in 0..s.co {
                    let g = dy[((b * oh + oy) * ow + ox) * s.co + o];
                    db[o] += g;
                    for ky in 0..k {
                        for kx in 0..k {
                            let Some((iy, ix)) = s.input_at(oy, ox, ky, kx) else {
                                continue;
                            };
                            for i in 0..s.ci {
                                let xi = ((b * s.h + iy) * s.w + ix) * s.ci + i;
                                let wi = ((o * s.ci + i) * k + ky) * k + kx;
                                dx[xi] += g * w[wi];
                                dw[wi] += g * x[xi];
                            }
                        }
                    }
                }
            }
        }
    }
    (dx, dw, db)
}

/// Depthwise convolution (`co == ci`, groups = channels), `w [C, 1, k, k]`.
pub fn depthwise_conv2d(
    s: &ConvShape,
    x: &[f64],
    w: &[f64],
    bias: Option<&[f64]>,
    act: Act,
) -> Vec<f64> {
    let (oh, ow, k, c) = (s.oh(), s.ow(), s.k, s.ci);
    let mut y = vec![0.0; s.b * oh * ow * c];
    for b in 0..s.b {
        for oy in 0..oh {
            for ox in 0..ow {
                for ch in 0..c {
                    let mut acc = bias.map_or(0.0, |bv| bv[ch]);
                    for ky in 0..k {
                        for kx in 0..k {
                            if let Some((iy, ix)) = s.input_at(oy, ox, ky, kx) {
                                acc += x[((b * s.h + iy) * s.w + ix) * c + ch]
                                    * w[(ch * k + ky) * k + kx];
                            }
                        }
                    }
                    y[((b * oh + oy) * ow + ox) * c + ch] = super::act(acc, act);
                }
            }
        }
    }
    y
}

/// Gradients of [`depthwise_conv2d`] without activation: `(dx, dw, dbias)`.
pub fn depthwise_conv2d_backward(
    s: &ConvShape,
    x: &[f64],
    w: &[f64],
    dy: &[f64],
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (oh, ow, k, c) = (s.oh(), s.ow(), s.k, s.ci);
    let mut dx = vec![0.0; x.len()];
    let mut dw = vec![0.0; w.len()];
    let mut db = vec![0.0; c];
    for b in 0..s.b {
        for oy in 0..oh {
            for ox in 0..ow {
                for ch in 0..c {
                    let g = dy[((b * oh + oy) * ow + ox) * c + ch];
                    db[ch] += g;
                    for ky in 0..k {
                        for kx in 0..k {
                            if let Some((iy, ix)) = s.input_at(oy, ox, ky, kx) {
                                let xi = ((b * s.h + iy) * s.w + ix) * c + ch;
                                let wi = (ch * k + ky) * k + kx;
                                dx[xi] += g * w[wi];
                                dw[wi] += g * x[xi];
                            }
                        }
                    }
                }
            }
        }
    }
    (dx, dw, db)
}

/// ConvTranspose2d, kernel 2, stride 2, `w [Ci, Co, 2, 2]`: x `[B,H,W,Ci]` -> `[B,2H,2W,Co]`,
/// `y[b, 2i+a, 2j+c, o] = act(bias[o] + sum_ci x[b,i,j,ci] * w[ci,o,a,c])`.
/// Shape of a [`conv_transpose2x2`]: x `[b, h, w, ci]`, `co` output channels.
#[derive(Clone, Copy, Debug)]
pub struct ConvTShape {
    pub b: usize,
    pub h: usize,
    pub w: usize,
    pub ci: usize,
    pub co: usize,
}

pub fn conv_transpose2x2(
    s: ConvTShape,
    x: &[f64],
    wt: &[f64],
    bias: Option<&[f64]>,
    act: Act,
) -> Vec<f64> {
    let ConvTShape { b, h, w, ci, co } = s;
    let (oh, ow) = (2 * h, 2 * w);
    let mut y = vec![0.0; b * oh * ow * co];
    for bb in 0..b {
        for yy in 0..oh {
            for xx in 0..ow {
                let (i, a, j, c) = (yy / 2, yy % 2, xx / 2, xx % 2);
                for o in 0..co {
                    let mut acc = bias.map_or(0.0, |bv| bv[o]);
                    for q in 0..ci {
                        acc +=
                            x[((bb * h + i) * w + j) * ci + q] * wt[((q * co + o) * 2 + a) * 2 + c];
                    }
                    y[((bb * oh + yy) * ow + xx) * co + o] = super::act(acc, act);
                }
            }
        }
    }
    y
}

/// Gradients of [`conv_transpose2x2`] without activation: `(dx, dw, dbias)`.
pub fn conv_transpose2x2_backward(
    s: ConvTShape,
    x: &[f64],
    wt: &[f64],
    dy: &[f64],
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let ConvTShape { b, h, w, ci, co } = s;
    let (oh, ow) = (2 * h, 2 * w);
    let mut dx = vec![0.0; x.len()];
    let mut dw = vec![0.0; wt.len()];
    let mut db = vec![0.0; co];
    for bb in 0..b {
        for yy in 0..oh {
            for xx in 0..ow {
                let (i, a, j, c) = (yy / 2, yy % 2, xx / 2, xx % 2);
                for o in 0..co {
                    let g = dy[((bb * oh + yy) * ow + xx) * co + o];
                    db[o] += g;
                    for q in 0..ci {
                        let xi = ((bb * h + i) * w + j) * ci + q;
                        let wi = ((q * co + o) * 2 + a) * 2 + c;
                        dx[xi] += g * wt[wi];
                        dw[wi] += g * x[xi];
                    }
                }
            }
        }
    }
    (dx, dw, db)
}
