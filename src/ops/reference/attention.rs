//! CPU f64 reference: window partition / reverse, TinyViT windowed attention with relative position
//! bias, SAM multi-head attention, and their backward passes (plain loops from the definitions:
//! logits, softmax, weighted sum; the backward materialises the probability matrix).

/// Number of windows along each axis for a `h x w` map and window `ws` (zero padding bottom/right).
pub fn n_windows(h: usize, w: usize, ws: usize) -> (usize, usize) {
    (h.div_ceil(ws), w.div_ceil(ws))
}

/// x [B,H,W,C] -> windows [B*nWh*nWw, ws*ws, C], zero padded.
pub fn window_partition(x: &[f64], b: usize, h: usize, w: usize, c: usize, ws: usize) -> Vec<f64> {
    let (nwh, nww) = n_windows(h, w, ws);
    let n = ws * ws;
    let mut out = vec![0.0; b * nwh * nww * n * c];
    for bi in 0..b {
        for wr in 0..nwh {
            for wc in 0..nww {
                let win = (bi * nwh + wr) * nww + wc;
                for tr in 0..ws {
                    for tc in 0..ws {
                        let (r, col) = (wr * ws + tr, wc * ws + tc);
                        if r >= h || col >= w {
                            continue;
                        }
                        for ch in 0..c {
                            out[(win * n + tr * ws + tc) * c + ch] =
                                x[((bi * h + r) * w + col) * c + ch];
                        }
                    }
                }
            }
        }
    }
    out
}

/// res [B,H,W,C] + crop(reverse(y)).
pub fn window_reverse_add(
    y: &[f64],
    res: &[f64],
    b: usize,
    h: usize,
    w: usize,
    c: usize,
    ws: usize,
) -> Vec<f64> {
    let mut out = res.to_vec();
    let (nwh, nww) = n_windows(h, w, ws);
    let n = ws * ws;
    for bi in 0..b {
        for r in 0..h {
            for col in 0..w {
                let win = (bi * nwh + r / ws) * nww + col / ws;
                let t = (r % ws) * ws + col % ws;
                for ch in 0..c {
                    out[((bi * h + r) * w + col) * c + ch] += y[(win * n + t) * c + ch];
                }
            }
        }
    }
    out
}

/// Gradient of `window_partition` w.r.t. x: reverse + crop of the window gradients.
pub fn window_partition_backward(
    dwin: &[f64],
    b: usize,
    h: usize,
    w: usize,
    c: usize,
    ws: usize,
) -> Vec<f64> {
    window_reverse_add(dwin, &vec![0.0; b * h * w * c], b, h, w, c, ws)
}

/// Gradients of `window_reverse_add` w.r.t. (y, res).
pub fn window_reverse_add_backward(
    dout: &[f64],
    b: usize,
    h: usize,
    w: usize,
    c: usize,
    ws: usize,
) -> (Vec<f64>, Vec<f64>) {
    (window_partition(dout, b, h, w, c, ws), dout.to_vec())
}

/// One attention problem of one head: q [lq][d], k/v [lk][d], additive bias [lq][lk] (optional).
struct Head {
    q: Vec<Vec<f64>>,
    k: Vec<Vec<f64>>,
    v: Vec<Vec<f64>>,
    bias: Option<Vec<Vec<f64>>>,
    scale: f64,
}

struct HeadFwd {
    p: Vec<Vec<f64>>,
    out: Vec<Vec<f64>>,
    lse: Vec<f64>,
}

fn head_forward(hd: &Head) -> HeadFwd {
    let (lq, lk) = (hd.q.len(), hd.k.len());
    let d = hd.v[0].len();
    let mut p = vec![vec![0.0; lk]; lq];
    let mut out = vec![vec![0.0; d]; lq];
    let mut lse = vec![0.0; lq];
    for i in 0..lq {
        let mut logits = vec![0.0; lk];
        for j in 0..lk {
            let dot: f64 = (0..hd.q[i].len()).map(|e| hd.q[i][e] * hd.k[j][e]).sum();
            logits[j] = dot * hd.scale + hd.bias.as_ref().map_or(0.0, |b| b[i][j]);
        }
        let mx = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = logits.iter().map(|&s| (s - mx).exp()).sum();
        lse[i] = mx + sum.ln();
        for j in 0..lk {
            p[i][j] = (logits[j] - mx).exp() / sum;
            for (o, &vv) in out[i].iter_mut().zip(&hd.v[j]) {
                *o += p[i][j] * vv;
            }
        }
    }
    HeadFwd { p, out, lse }
}

struct HeadGrad {
    dq: Vec<Vec<f64>>,
    dk: Vec<Vec<f64>>,
    dv: Vec<Vec<f64>>,
    /// d loss / d logits (= d loss / d bias[i][j]).
    ds: Vec<Vec<f64>>,
}

fn head_backward(hd: &Head, dout: &[Vec<f64>]) -> HeadGrad {
    let f = head_forward(hd);
    let (lq, lk) = (hd.q.len(), hd.k.len());
    let dqk = hd.q[0].len();
    let d = hd.v[0].len();
    let mut dv = vec![vec![0.0; d]; lk];
    let mut dq = vec![vec![0.0; dqk]; lq];
    let mut dk = vec![vec![0.0; dqk]; lk];
    let mut ds = vec![vec![0.0; lk]; lq];
    for i in 0..lq {
        // dP_ij = dout_i . v_j ; softmax backward: dS_ij = P_ij (dP_ij - sum_l P_il dP_il)
        let dp: Vec<f64> = (0..lk)
            .map(|j| (0..d).map(|e| dout[i][e] * hd.v[j][e]).sum())
            .collect();
        let rs: f64 = (0..lk).map(|j| f.p[i][j] * dp[j]).sum();
        for j in 0..lk {
            ds[i][j] = f.p[i][j] * (dp[j] - rs);
            for e in 0..d {
                dv[j][e] += f.p[i][j] * dout[i][e];
            }
            for e in 0..dqk {
                dq[i][e] += ds[i][j] * hd.k[j][e] * hd.scale;
                dk[j][e] += ds[i][j] * hd.q[i][e] * hd.scale;
            }
        }
    }
    HeadGrad { dq, dk, dv, ds }
}

fn rel_index(i: usize, j: usize, ws: usize) -> usize {
    let (ri, ci, rj, cj) = (i / ws, i % ws, j / ws, j % ws);
    ri.abs_diff(rj) * ws + ci.abs_diff(cj)
}

/// Extracts head `h` of window `z` from the interleaved qkv [NW, n, 3C].
fn window_head(
    qkv: &[f64],
    bias: &[f64],
    z: usize,
    h: usize,
    ws: usize,
    c: usize,
    heads: usize,
) -> Head {
    let n = ws * ws;
    let d = c / heads;
    let row = |i: usize, part: usize| -> Vec<f64> {
        (0..d)
            .map(|e| qkv[(z * n + i) * 3 * c + h * 3 * d + part * d + e])
            .collect()
    };
    Head {
        q: (0..n).map(|i| row(i, 0)).collect(),
        k: (0..n).map(|i| row(i, 1)).collect(),
        v: (0..n).map(|i| row(i, 2)).collect(),
        bias: Some(
            (0..n)
                .map(|i| (0..n).map(|j| bias[h * n + rel_index(i, j, ws)]).collect())
                .collect(),
        ),
        scale: 1.0 / (d as f64).sqrt(),
    }
}

/// TinyViT windowed attention: qkv [NW, n, 3C] (per head interleaved q|k|v), bias [heads, n].
/// Returns out [NW, n, C] and lse [NW, heads, n].
pub fn window_attention(
    qkv: &[f64],
    bias: &[f64],
    ws: usize,
    c: usize,
    heads: usize,
) -> (Vec<f64>, Vec<f64>) {
    let n = ws * ws;
    let nw = qkv.len() / (n * 3 * c);
    let d = c / heads;
    let mut out = vec![0.0; nw * n * c];
    let mut lse = vec![0.0; nw * heads * n];
    for z in 0..nw {
        for h in 0..heads {
            let f = head_forward(&window_head(qkv, bias, z, h, ws, c, heads));
            for i in 0..n {
                lse[(z * heads + h) * n + i] = f.lse[i];
                for e in 0..d {
                    out[(z * n + i) * c + h * d + e] = f.out[i][e];
                }
            }
        }
    }
    (out, lse)
}

/// Gradients of `window_attention` w.r.t. qkv [NW, n, 3C] and bias [heads, n] (summed over windows).
pub fn window_attention_backward(
    qkv: &[f64],
    bias: &[f64],
    dout: &[f64],
    ws: usize,
    c: usize,
    heads: usize,
) -> (Vec<f64>, Vec<f64>) {
    let n = ws * ws;
    let nw = qkv.len() / (n * 3 * c);
    let d = c / heads;
    let mut dqkv = vec![0.0; qkv.len()];
    let mut dbias = vec![0.0; heads * n];
    for z in 0..nw {
        for h in 0..heads {
            let hd = window_head(qkv, bias, z, h, ws, c, heads);
            let dor: Vec<Vec<f64>> = (0..n)
                .map(|i| (0..d).map(|e| dout[(z * n + i) * c + h * d + e]).collect())
                .collect();
            let g = head_backward(&hd, &dor);
            for i in 0..n {
                for e in 0..d {
                    let base = (z * n + i) * 3 * c + h * 3 * d + e;
                    dqkv[base] = g.dq[i][e];
                    dqkv[base + d] = g.dk[i][e];
                    dqkv[base + 2 * d] = g.dv[i][e];
                }
                for j in 0..n {
                    dbias[h * n + rel_index(i, j, ws)] += g.ds[i][j];
                }
            }
        }
    }
    (dqkv, dbias)
}

/// Shape of an [`mha`] problem: batch `b`, query / key lengths, embedding `e` split into `heads`.
#[derive(Clone, Copy, Debug)]
pub struct MhaShape {
    pub b: usize,
    pub lq: usize,
    pub lk: usize,
    pub e: usize,
    pub heads: usize,
}

/// Head `h` of batch entry `bz`.
fn mha_head(q: &[f64], k: &[f64], v: &[f64], s: MhaShape, bz: usize, h: usize) -> Head {
    let MhaShape {
        lq, lk, e, heads, ..
    } = s;
    let c = e / heads;
    let rows = |t: &[f64], len: usize| -> Vec<Vec<f64>> {
        (0..len)
            .map(|i| (0..c).map(|x| t[(bz * len + i) * e + h * c + x]).collect())
            .collect()
    };
    Head {
        q: rows(q, lq),
        k: rows(k, lk),
        v: rows(v, lk),
        bias: None,
        scale: 1.0 / (c as f64).sqrt(),
    }
}

/// SAM attention core: q [B,Lq,E], k/v [B,Lk,E], contiguous heads. Returns out [B,Lq,E] and
/// lse [B, heads, Lq].
pub fn mha(q: &[f64], k: &[f64], v: &[f64], s: MhaShape) -> (Vec<f64>, Vec<f64>) {
    let MhaShape {
        b,
        lq,
        lk: _,
        e,
        heads,
    } = s;
    let c = e / heads;
    let mut out = vec![0.0; b * lq * e];
    let mut lse = vec![0.0; b * heads * lq];
    for bz in 0..b {
        for h in 0..heads {
            let f = head_forward(&mha_head(q, k, v, s, bz, h));
            for i in 0..lq {
                lse[(bz * heads + h) * lq + i] = f.lse[i];
                for x in 0..c {
                    out[(bz * lq + i) * e + h * c + x] = f.out[i][x];
                }
            }
        }
    }
    (out, lse)
}

/// Gradients of `mha` w.r.t. q, k, v.
#[allow(clippy::type_complexity)]
pub fn mha_backward(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    dout: &[f64],
    s: MhaShape,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let MhaShape {
        b,
        lq,
        lk,
        e,
        heads,
    } = s;
    let c = e / heads;
    let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
    for bz in 0..b {
        for h in 0..heads {
            let hd = mha_head(q, k, v, s, bz, h);
            let dor: Vec<Vec<f64>> = (0..lq)
                .map(|i| {
                    (0..c)
                        .map(|x| dout[(bz * lq + i) * e + h * c + x])
                        .collect()
                })
                .collect();
            let g = head_backward(&hd, &dor);
            for x in 0..c {
                for i in 0..lq {
                    dq[(bz * lq + i) * e + h * c + x] = g.dq[i][x];
                }
                for j in 0..lk {
                    dk[(bz * lk + j) * e + h * c + x] = g.dk[j][x];
                    dv[(bz * lk + j) * e + h * c + x] = g.dv[j][x];
                }
            }
        }
    }
    (dq, dk, dv)
}
