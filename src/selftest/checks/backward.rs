//! The training kernels' checks: backward passes (attention, norms, activation, convolutions),
//! BatchNorm in training mode, the paper's loss, the transposed convolution, the positional
//! encoding. Each compares every output tensor with the f64 reference of `ops::reference`; the
//! check's error is the worst tensor's (see [`Parts`]).

use super::*;
use crate::ops::attention::Window;
use crate::ops::conv::ConvGrads;
use crate::ops::norm::{BnLayer, NormGrads};
use crate::ops::reference::conv::ConvTShape;

/// Named parts of a check's output (dx, dw, ...), each compared against its own scale.
#[derive(Default)]
pub(super) struct Parts {
    got: Vec<f32>,
    want: Vec<f64>,
    parts: Vec<(String, usize)>,
}

impl Parts {
    /// Adds one tensor; a length mismatch makes it non-finite (infinite error), never a panic.
    pub(super) fn push(&mut self, name: &str, mut got: Vec<f32>, want: Vec<f64>) {
        got.resize(want.len(), f32::NAN);
        self.parts.push((name.to_string(), want.len()));
        self.got.extend(got);
        self.want.extend(want);
    }

    pub(super) fn outcome(
        self,
        ms: Option<f64>,
        flops: Option<f64>,
        bytes: Option<f64>,
    ) -> Outcome {
        Outcome {
            got: self.got,
            want: self.want,
            entry: String::new(),
            ms,
            flops,
            bytes,
            parts: self.parts,
        }
    }
}

/// Random values scaled by `s`.
fn scaled(rng: &mut Rng, n: usize, s: f32) -> Vec<f32> {
    rng.vec(n).iter().map(|v| v * s).collect()
}

/// The TinyViT window attention (packed `qkv`, learned bias), forward or forward + backward.
pub(super) fn window_check(
    name: &str,
    d: [usize; 4],
    backward: bool,
    tol: f64,
    seed: u64,
) -> Check {
    let [nw, ws, c, heads] = d;
    Check {
        name: name.to_string(),
        family: "attention",
        shape: format!("{nw} windows {ws}x{ws} C{c} h{heads}"),
        tolerance: tol,
        body: body(move |gpu: &Gpu| {
            Box::pin(async move {
                use crate::ops::attention::{
                    window_attention, window_attention_backward, window_attention_train,
                };
                use reference::attention as ra;
                let n = ws * ws;
                let win = Window { heads, ws };
                let mut rng = Rng::new(seed);
                // Logits of a few units: the softmax is neither flat nor one-hot.
                let qkv = scaled(&mut rng, nw * n * 3 * c, 1.5);
                let bias = rng.vec(heads * n);
                let dout = rng.vec(nw * n * c);
                let tq = gpu.upload(&qkv, &[nw, n, 3 * c])?;
                let tb = gpu.upload(&bias, &[heads, n])?;
                let tdo = gpu.upload(&dout, &[nw, n, c])?;
                let tdb = gpu.upload(&vec![0.0; heads * n], &[heads, n])?;
                let mut p = Parts::default();
                let flops = 4.0 * (nw * n * n * c) as f64;
                if !backward {
                    let mut rec = gpu.new_recorder();
                    let out = window_attention(&mut rec, &tq, &tb, win)?;
                    rec.submit()?;
                    let (want, _) = ra::window_attention(&f64s(&qkv), &f64s(&bias), ws, c, heads);
                    p.push("out", gpu.read_async(&out).await?, want);
                    let ms = time_async(gpu, REPS, |rec| {
                        window_attention(rec, &tq, &tb, win).map(|_| ())
                    })
                    .await?;
                    return Ok(p.outcome(Some(ms), Some(flops), None));
                }
                let mut rec = gpu.new_recorder();
                let saved = window_attention_train(&mut rec, &tq, &tb, win)?;
                let dqkv = window_attention_backward(&mut rec, &tq, &tb, &saved, &tdo, win, &tdb)?;
                rec.submit()?;
                let (wq, wb) = ra::window_attention_backward(
                    &f64s(&qkv),
                    &f64s(&bias),
                    &f64s(&dout),
                    ws,
                    c,
                    heads,
                );
                p.push("dqkv", gpu.read_async(&dqkv).await?, wq);
                p.push("dbias", gpu.read_async(&tdb).await?, wb);
                let ms = time_async(gpu, REPS, |rec| {
                    window_attention_backward(rec, &tq, &tb, &saved, &tdo, win, &tdb).map(|_| ())
                })
                .await?;
                Ok(p.outcome(Some(ms), Some(2.5 * flops), None))
            })
        }),
    }
}

/// SAM attention (`mha`) backward: dq, dk, dv of `sum(dout * mha(q, k, v))`.
pub(super) fn mha_backward_check(name: &str, d: [usize; 5], tol: f64, seed: u64) -> Check {
    let [b, lq, lk, e, heads] = d;
    Check {
        name: name.to_string(),
        family: "attention",
        shape: format!("B{b} Lq{lq} Lk{lk} E{e} h{heads}"),
        tolerance: tol,
        body: body(move |gpu: &Gpu| {
            Box::pin(async move {
                use crate::ops::attention::{mha_backward, mha_train};
                let mut rng = Rng::new(seed);
                let q = scaled(&mut rng, b * lq * e, 1.5);
                let k = scaled(&mut rng, b * lk * e, 1.5);
                let v = rng.vec(b * lk * e);
                let dout = rng.vec(b * lq * e);
                let tq = gpu.upload(&q, &[b, lq, e])?;
                let tk = gpu.upload(&k, &[b, lk, e])?;
                let tv = gpu.upload(&v, &[b, lk, e])?;
                let tdo = gpu.upload(&dout, &[b, lq, e])?;
                let mut rec = gpu.new_recorder();
                let saved = mha_train(&mut rec, &tq, &tk, &tv, heads)?;
                let (dq, dk, dv) = mha_backward(&mut rec, &tq, &tk, &tv, &saved, &tdo, heads)?;
                rec.submit()?;
                let shape = reference::attention::MhaShape {
                    b,
                    lq,
                    lk,
                    e,
                    heads,
                };
                let (wq, wk, wv) = reference::attention::mha_backward(
                    &f64s(&q),
                    &f64s(&k),
                    &f64s(&v),
                    &f64s(&dout),
                    shape,
                );
                let mut p = Parts::default();
                p.push("dq", gpu.read_async(&dq).await?, wq);
                p.push("dk", gpu.read_async(&dk).await?, wk);
                p.push("dv", gpu.read_async(&dv).await?, wv);
                let ms = time_async(gpu, REPS, |rec| {
                    mha_backward(rec, &tq, &tk, &tv, &saved, &tdo, heads).map(|_| ())
                })
                .await?;
                Ok(p.outcome(Some(ms), Some(10.0 * (b * lq * lk * e) as f64), None))
            })
        }),
    }
}

/// LayerNorm (with GELU) backward: dx, dw, db.
pub(super) fn ln_backward_check(name: &str, rows: usize, c: usize, tol: f64, seed: u64) -> Check {
    Check {
        name: name.to_string(),
        family: "norm",
        shape: format!("{rows}x{c}, GELU"),
        tolerance: tol,
        body: body(move |gpu: &Gpu| {
            Box::pin(async move {
                use crate::ops::norm::{layer_norm_backward, layer_norm_train};
                let mut rng = Rng::new(seed);
                let (x, w, b, dy) = (rng.vec(rows * c), rng.vec(c), rng.vec(c), rng.vec(rows * c));
                let tx = gpu.upload(&x, &[rows, c])?;
                let (tw, tb) = (gpu.upload(&w, &[c])?, gpu.upload(&b, &[c])?);
                let tdy = gpu.upload(&dy, &[rows, c])?;
                let (tdw, tdb) = (
                    gpu.upload(&vec![0.0; c], &[c])?,
                    gpu.upload(&vec![0.0; c], &[c])?,
                );
                let grads = NormGrads {
                    dw: &tdw,
                    db: &tdb,
                    dx_acc: None,
                };
                let mut rec = gpu.new_recorder();
                let (_, saved) = layer_norm_train(&mut rec, &tx, &tw, &tb, 1e-5, Act::Gelu)?;
                let dx = layer_norm_backward(&mut rec, &tx, &tw, &saved, &tdy, grads)?;
                rec.submit()?;
                let (rx, rw, rb) = reference::norm::layer_norm_backward(
                    &f64s(&x),
                    &f64s(&w),
                    &f64s(&b),
                    &f64s(&dy),
                    c,
                    1e-5,
                    Act::Gelu,
                );
                let mut p = Parts::default();
                p.push("dx", gpu.read_async(&dx).await?, rx);
                p.push("dw", gpu.read_async(&tdw).await?, rw);
                p.push("db", gpu.read_async(&tdb).await?, rb);
                let ms = time_async(gpu, REPS, |rec| {
                    layer_norm_backward(rec, &tx, &tw, &saved, &tdy, grads).map(|_| ())
                })
                .await?;
                Ok(p.outcome(Some(ms), None, Some(12.0 * (rows * c) as f64)))
            })
        }),
    }
}

/// BatchNorm2d in training mode (batch statistics, GELU): the output and the updated running
/// statistics, or (`backward`) dx, dw, db through the batch statistics.
pub(super) fn bn_train_check(
    name: &str,
    rows: usize,
    c: usize,
    backward: bool,
    tol: f64,
    seed: u64,
) -> Check {
    Check {
        name: name.to_string(),
        family: "norm",
        shape: format!("{rows}x{c}, GELU, momentum 0.1"),
        tolerance: tol,
        body: body(move |gpu: &Gpu| {
            Box::pin(async move {
                use crate::ops::norm::{batch_norm_backward, batch_norm_train};
                let mut rng = Rng::new(seed);
                // An offset mean: the variance must not be E[x^2] - E[x]^2.
                let x: Vec<f32> = (0..rows * c).map(|_| (3.0 + rng.normal()) as f32).collect();
                let (w, b, rm) = (rng.vec(c), rng.vec(c), rng.vec(c));
                let rv: Vec<f32> = (0..c).map(|_| rng.range(0.1, 2.0) as f32).collect();
                let dy = rng.vec(rows * c);
                let t = |v: &[f32], s: &[usize]| gpu.upload(v, s);
                let (tx, tw, tb) = (t(&x, &[rows, c])?, t(&w, &[c])?, t(&b, &[c])?);
                let (trm, trv) = (t(&rm, &[c])?, t(&rv, &[c])?);
                let tdy = t(&dy, &[rows, c])?;
                let (tdw, tdb) = (t(&vec![0.0; c], &[c])?, t(&vec![0.0; c], &[c])?);
                let layer = || BnLayer {
                    w: &tw,
                    b: &tb,
                    running_mean: &trm,
                    running_var: &trv,
                };
                let grads = NormGrads {
                    dw: &tdw,
                    db: &tdb,
                    dx_acc: None,
                };
                let mut rec = gpu.new_recorder();
                let (y, saved) = batch_norm_train(&mut rec, &tx, layer(), 0.1, 1e-5, Act::Gelu)?;
                let dx = if backward {
                    Some(batch_norm_backward(
                        &mut rec, &tx, &tw, &saved, &tdy, grads,
                    )?)
                } else {
                    None
                };
                rec.submit()?;
                let (x6, w6, b6, rm6, rv6) = (f64s(&x), f64s(&w), f64s(&b), f64s(&rm), f64s(&rv));
                let bn = reference::norm::BnLayer {
                    w: &w6,
                    b: &b6,
                    running_mean: &rm6,
                    running_var: &rv6,
                };
                let mut p = Parts::default();
                if let Some(dx) = dx {
                    let (rx, rw, rb) = reference::norm::batch_norm_backward(
                        &x6,
                        bn,
                        &f64s(&dy),
                        c,
                        1e-5,
                        Act::Gelu,
                        true,
                    );
                    p.push("dx", gpu.read_async(&dx).await?, rx);
                    p.push("dw", gpu.read_async(&tdw).await?, rw);
                    p.push("db", gpu.read_async(&tdb).await?, rb);
                    let ms = time_async(gpu, REPS, |rec| {
                        batch_norm_backward(rec, &tx, &tw, &saved, &tdy, grads).map(|_| ())
                    })
                    .await?;
                    return Ok(p.outcome(Some(ms), None, Some(16.0 * (rows * c) as f64)));
                }
                let (ry, _, _, _, rrm, rrv) =
                    reference::norm::batch_norm_train(&x6, bn, c, 0.1, 1e-5, Act::Gelu);
                p.push("y", gpu.read_async(&y).await?, ry);
                p.push("running_mean", gpu.read_async(&trm).await?, rrm);
                p.push("running_var", gpu.read_async(&trv).await?, rrv);
                // Timed on copies of the running statistics (each call updates them).
                let (crm, crv) = (t(&rm, &[c])?, t(&rv, &[c])?);
                let ms = time_async(gpu, REPS, |rec| {
                    let l = BnLayer {
                        w: &tw,
                        b: &tb,
                        running_mean: &crm,
                        running_var: &crv,
                    };
                    batch_norm_train(rec, &tx, l, 0.1, 1e-5, Act::Gelu).map(|_| ())
                })
                .await?;
                Ok(p.outcome(Some(ms), None, Some(12.0 * (rows * c) as f64)))
            })
        }),
    }
}

/// `dy * gelu'(x)` over a wide range (erf's derivative point by point).
pub(super) fn gelu_backward_check(name: &str, n: usize, tol: f64, seed: u64) -> Check {
    Check {
        name: name.to_string(),
        family: "elementwise",
        shape: format!("{n} in [-10, 10]"),
        tolerance: tol,
        body: body(move |gpu: &Gpu| {
            Box::pin(async move {
                let mut rng = Rng::new(seed);
                let x: Vec<f32> = (0..n)
                    .map(|i| (-10.0 + 20.0 * i as f64 / (n - 1).max(1) as f64) as f32)
                    .collect();
                let dy = rng.vec(n);
                let (tx, tdy) = (gpu.upload(&x, &[n])?, gpu.upload(&dy, &[n])?);
                let op = crate::ops::elementwise::act_backward;
                let mut rec = gpu.new_recorder();
                let dx = op(&mut rec, &tx, &tdy, Act::Gelu)?;
                rec.submit()?;
                let want = x
                    .iter()
                    .zip(&dy)
                    .map(|(&a, &g)| g as f64 * reference::gelu_grad(a as f64))
                    .collect();
                let mut p = Parts::default();
                p.push("dx", gpu.read_async(&dx).await?, want);
                let ms =
                    time_async(gpu, REPS, |rec| op(rec, &tx, &tdy, Act::Gelu).map(|_| ())).await?;
                Ok(p.outcome(Some(ms), None, Some(12.0 * n as f64)))
            })
        }),
    }
}

/// The paper's loss (0.8 focal + 0.2 Dice): its three values and dL/dlogits.
pub(super) fn loss_check(name: &str, d: [usize; 3], tol: f64, seed: u64) -> Check {
    let [b, h, w] = d;
    Check {
        name: name.to_string(),
        family: "loss",
        shape: format!("B{b} {h}x{w}, 30% foreground, logits x4"),
        tolerance: tol,
        body: body(move |gpu: &Gpu| {
            Box::pin(async move {
                use crate::ops::loss::{LossConfig, seg_loss};
                use reference::loss as rl;
                let n = b * h * w;
                let mut rng = Rng::new(seed);
                let l = scaled(&mut rng, n, 4.0);
                let t: Vec<f32> = (0..n)
                    .map(|_| if rng.uniform() < 0.3 { 1.0 } else { 0.0 })
                    .collect();
                let (tl, tt) = (
                    gpu.upload(&l, &[b, h, w, 1])?,
                    gpu.upload(&t, &[b, h, w, 1])?,
                );
                let cfg = LossConfig::default();
                let mut rec = gpu.new_recorder();
                let (vals, grad) = seg_loss(&mut rec, &tl, &tt, &cfg)?;
                rec.submit()?;
                let prm = rl::LossParams::default();
                let (l6, t6) = (f64s(&l), f64s(&t));
                let (tot, focal, dice) = rl::seg_loss(&l6, &t6, b, &prm);
                let v = gpu.read_async(&vals).await?;
                let mut p = Parts::default();
                for (i, (k, r)) in [("loss", tot), ("focal", focal), ("dice", dice)]
                    .iter()
                    .enumerate()
                {
                    p.push(k, v.get(i).copied().into_iter().collect(), vec![*r]);
                }
                p.push(
                    "dlogits",
                    gpu.read_async(&grad).await?,
                    rl::seg_loss_grad(&l6, &t6, b, &prm),
                );
                let ms =
                    time_async(gpu, REPS, |rec| seg_loss(rec, &tl, &tt, &cfg).map(|_| ())).await?;
                Ok(p.outcome(Some(ms), None, Some(16.0 * n as f64)))
            })
        }),
    }
}

/// Dense or depthwise convolution backward: dx, dw, dbias of `sum(dy * conv(x))`.
pub(super) fn conv_backward_check(
    name: &str,
    s: ConvShape,
    depthwise: bool,
    tol: f64,
    seed: u64,
) -> Check {
    Check {
        name: name.to_string(),
        family: if depthwise { "depthwise" } else { "conv" },
        shape: s.label(),
        tolerance: tol,
        body: body(move |gpu: &Gpu| {
            Box::pin(async move {
                let mut rng = Rng::new(seed);
                let wi = s.weight_in(depthwise);
                let xs = [s.b, s.h, s.w, s.ci];
                let ws = [s.co, wi, s.k, s.k];
                let ys = [s.b, s.oh(), s.ow(), s.co];
                let (x, w, dy) = (
                    rng.vec(xs.iter().product()),
                    rng.vec(ws.iter().product()),
                    rng.vec(ys.iter().product()),
                );
                let (tx, tw, tdy) = (
                    gpu.upload(&x, &xs)?,
                    gpu.upload(&w, &ws)?,
                    gpu.upload(&dy, &ys)?,
                );
                let zeros = |shape: &[usize]| gpu.upload(&vec![0.0; shape.iter().product()], shape);
                let (dx, dw, db) = (zeros(&xs)?, zeros(&ws)?, zeros(&[s.co])?);
                let geom = ConvGeom {
                    stride: s.stride,
                    pad: s.pad,
                };
                let op = |rec: &mut crate::gpu::Recorder| {
                    let g = ConvGrads {
                        dx: Some(&dx),
                        dw: Some(&dw),
                        dbias: Some(&db),
                    };
                    if depthwise {
                        conv::depthwise_conv2d_backward(rec, &tx, &tw, &tdy, geom, g)
                    } else {
                        conv::conv2d_backward(rec, &tx, &tw, &tdy, geom, g)
                    }
                };
                let mut rec = gpu.new_recorder();
                op(&mut rec)?;
                rec.submit()?;
                let (x6, w6, dy6) = (f64s(&x), f64s(&w), f64s(&dy));
                let (rx, rw, rb) = if depthwise {
                    reference::conv::depthwise_conv2d_backward(&s, &x6, &w6, &dy6)
                } else {
                    reference::conv::conv2d_backward(&s, &x6, &w6, &dy6)
                };
                let mut p = Parts::default();
                p.push("dx", gpu.read_async(&dx).await?, rx);
                p.push("dw", gpu.read_async(&dw).await?, rw);
                p.push("dbias", gpu.read_async(&db).await?, rb);
                // (Timed calls accumulate into the gradients read above.)
                let ms = time_async(gpu, REPS, op).await?;
                let macs = (s.b * s.oh() * s.ow() * s.co * wi * s.k * s.k) as f64;
                Ok(p.outcome(Some(ms), Some(4.0 * macs), None))
            })
        }),
    }
}

/// The decoder's 2x2 stride-2 transposed convolution `w [Ci, Co, 2, 2]`: forward (bias, GELU) or
/// backward (dx, dw, dbias).
pub(super) fn convt_check(name: &str, s: ConvTShape, backward: bool, tol: f64, seed: u64) -> Check {
    let ConvTShape { b, h, w, ci, co } = s;
    Check {
        name: name.to_string(),
        family: "conv",
        shape: format!("B{b} {h}x{w} Ci{ci} Co{co} k2 s2"),
        tolerance: tol,
        body: body(move |gpu: &Gpu| {
            Box::pin(async move {
                let mut rng = Rng::new(seed);
                let xs = [b, h, w, ci];
                let ws = [ci, co, 2, 2];
                let ys = [b, 2 * h, 2 * w, co];
                let x = rng.vec(xs.iter().product());
                let wt = rng.vec(ws.iter().product());
                let bias = rng.vec(co);
                let dy = rng.vec(ys.iter().product());
                let (tx, tw, tb) = (
                    gpu.upload(&x, &xs)?,
                    gpu.upload(&wt, &ws)?,
                    gpu.upload(&bias, &[co])?,
                );
                let (x6, w6) = (f64s(&x), f64s(&wt));
                let macs = (b * 4 * h * w * ci * co) as f64;
                let mut p = Parts::default();
                if !backward {
                    let op = |rec: &mut crate::gpu::Recorder| {
                        conv::conv_transpose2x2(rec, &tx, &tw, Some(&tb), Act::Gelu)
                    };
                    let mut rec = gpu.new_recorder();
                    let y = op(&mut rec)?;
                    rec.submit()?;
                    let want = reference::conv::conv_transpose2x2(
                        s,
                        &x6,
                        &w6,
                        Some(&f64s(&bias)),
                        Act::Gelu,
                    );
                    p.push("y", gpu.read_async(&y).await?, want);
                    let ms = time_async(gpu, REPS, |rec| op(rec).map(|_| ())).await?;
                    return Ok(p.outcome(Some(ms), Some(2.0 * macs), None));
                }
                let tdy = gpu.upload(&dy, &ys)?;
                let zeros = |shape: &[usize]| gpu.upload(&vec![0.0; shape.iter().product()], shape);
                let (dx, dw, db) = (zeros(&xs)?, zeros(&ws)?, zeros(&[co])?);
                let op = |rec: &mut crate::gpu::Recorder| {
                    let g = ConvGrads {
                        dx: Some(&dx),
                        dw: Some(&dw),
                        dbias: Some(&db),
                    };
                    conv::conv_transpose2x2_backward(rec, &tx, &tw, &tdy, g)
                };
                let mut rec = gpu.new_recorder();
                op(&mut rec)?;
                rec.submit()?;
                let (rx, rw, rb) =
                    reference::conv::conv_transpose2x2_backward(s, &x6, &w6, &f64s(&dy));
                p.push("dx", gpu.read_async(&dx).await?, rx);
                p.push("dw", gpu.read_async(&dw).await?, rw);
                p.push("dbias", gpu.read_async(&db).await?, rb);
                let ms = time_async(gpu, REPS, op).await?;
                Ok(p.outcome(Some(ms), Some(4.0 * macs), None))
            })
        }),
    }
}

/// The prompt encoder's dense random-Fourier positional encoding of an `h x w` grid from a random
/// Gaussian matrix (entries of a few units, as the model's).
pub(super) fn pe_check(name: &str, h: usize, w: usize, tol: f64, seed: u64) -> Check {
    Check {
        name: name.to_string(),
        family: "pe",
        shape: format!("{h}x{w}x256"),
        tolerance: tol,
        body: body(move |gpu: &Gpu| {
            Box::pin(async move {
                let mut rng = Rng::new(seed);
                let g: Vec<f32> = (0..256).map(|_| rng.normal() as f32).collect();
                let tg = gpu.upload(&g, &[2, 128])?;
                let op = crate::ops::pe::dense_pe;
                let mut rec = gpu.new_recorder();
                let y = op(&mut rec, &tg, h, w)?;
                rec.submit()?;
                let mut p = Parts::default();
                p.push(
                    "pe",
                    gpu.read_async(&y).await?,
                    reference::pe::dense_pe(&f64s(&g), h, w),
                );
                let ms = time_async(gpu, REPS, |rec| op(rec, &tg, h, w).map(|_| ())).await?;
                Ok(p.outcome(Some(ms), None, Some(1024.0 * (h * w) as f64)))
            })
        }),
    }
}
