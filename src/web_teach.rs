//! The page's teaching mode (wasm32 + the `web` feature): one forward of the prepared Med-FastSAM
//! on an image, keeping the named stage outputs (`MedFastSam::forward` with `keep_stages`), read
//! back and turned into pictures on the host (`crate::teach`): the model's input, the Otsu coarse
//! prompt, the first three principal components of the LKA-Encoder's embedding and of the two
//! multi-scale features (msf.r2, msf.r1), the low-resolution logits and the final mask.

use crate::channel::ChannelTransform;
use crate::io;
use crate::teach::{logit_rgba, pca_rgba, unit_rgba};
use crate::trained_on::TrainedOn;
use crate::web::{resolve_channel, segmenter, to_js, weights};
use js_sys::{Array, Object, Reflect, Uint8Array};
use wasm_bindgen::prelude::*;

fn set(o: &Object, k: &str, v: impl Into<JsValue>) -> Result<(), JsValue> {
    Reflect::set(o, &JsValue::from_str(k), &v.into()).map(|_| ())
}

fn map(id: &str, side: usize, rgba: &[u8]) -> Result<Object, JsValue> {
    let o = Object::new();
    set(&o, "id", id)?;
    set(&o, "width", side as f64)?;
    set(&o, "height", side as f64)?;
    set(&o, "rgba", Uint8Array::from(rgba))?;
    Ok(o)
}

fn shares(s: [f64; 3]) -> Array {
    s.iter().map(|&v| JsValue::from(v)).collect()
}

/// Runs the prepared model on one image file (stretched to the input size S, after the channel
/// transform `channel`, empty = the weights' own, as `segment_image`), keeping its stages, and
/// returns `{size, grid, threshold, foreground, maps: [{id, width, height, rgba, explained?}]}`
/// with the maps `input`, `coarse`, `embedding` (PCA, S/16), `msf_r2` (PCA, S/4), `msf_r1` (PCA,
/// S/8), `lowres_logits` (S/4, blue < 0 < red) and `mask` (S).
#[wasm_bindgen]
pub async fn teach_maps(
    bytes: Vec<u8>,
    name: String,
    channel: String,
    macenko: bool,
) -> Result<JsValue, JsValue> {
    let seg = segmenter()?;
    let w = weights()?;
    let trained = TrainedOn::from_metadata(&w.metadata, "the weights").map_err(to_js)?;
    drop(w);
    let (ch, vectors) = resolve_channel(&channel, macenko, trained.as_ref()).map_err(to_js)?;
    let img = io::decode_rgb(&bytes, &name).map_err(to_js)?;
    drop(bytes);
    let (xf, _) = ChannelTransform::for_image(ch, vectors, &img);
    let input = if xf.is_identity() {
        img
    } else {
        xf.apply(&img)
    };
    let s = seg.model.cfg.image_size;
    let resized = input.resize(s, s);
    let gpu = seg.gpu;
    let px = gpu
        .upload_u32(&resized.packed(), &[1, s, s])
        .map_err(to_js)?;
    let mut rec = gpu.new_recorder();
    let out = seg.model.forward(&mut rec, &px, true).map_err(to_js)?;
    rec.submit().map_err(to_js)?;
    let stage = |n: &str| {
        out.stages
            .get(n)
            .cloned()
            .ok_or_else(|| JsValue::from_str(&format!("the forward kept no stage {n}")))
    };
    let read = |t: crate::gpu::Tensor| async move { gpu.read_async(&t).await.map_err(to_js) };
    let emb_t = stage("encoder.embedding")?;
    let r2_t = stage("msf.r2")?;
    let r1_t = stage("msf.r1")?;
    let (g, d) = (emb_t.shape[1], emb_t.shape[3]);
    let (g2, c2) = (r2_t.shape[1], r2_t.shape[3]);
    let (g1, c1) = (r1_t.shape[1], r1_t.shape[3]);
    let emb = read(emb_t).await?;
    let r2 = read(r2_t).await?;
    let r1 = read(r1_t).await?;
    let coarse = read(out.coarse.clone()).await?;
    let low_t = out.lowres_logits.clone();
    let lr = low_t.shape[1];
    let low = read(low_t).await?;
    let logits = read(out.logits.clone()).await?;
    let threshold = read(out.threshold.clone()).await?[0];

    let mut rgba_in = Vec::with_capacity(s * s * 4);
    for p in resized.data.chunks_exact(3) {
        rgba_in.extend_from_slice(&[p[0], p[1], p[2], 255]);
    }
    let (emb_rgba, emb_share) = pca_rgba(&emb, g * g, d).map_err(to_js)?;
    let (r2_rgba, r2_share) = pca_rgba(&r2, g2 * g2, c2).map_err(to_js)?;
    let (r1_rgba, r1_share) = pca_rgba(&r1, g1 * g1, c1).map_err(to_js)?;
    let scale = low.iter().fold(0f32, |m, v| m.max(v.abs()));
    let mask: Vec<f32> = logits
        .iter()
        .map(|&v| if v > 0.0 { 1.0 } else { 0.0 })
        .collect();
    let fg = mask.iter().sum::<f32>() as f64 / mask.len().max(1) as f64;
    let coarse_fg = coarse.iter().filter(|&&v| v > 0.5).count() as f64 / coarse.len().max(1) as f64;

    let maps = Array::new();
    let m0 = map("input", s, &rgba_in)?;
    maps.push(&m0);
    let mc = map("coarse", s, &unit_rgba(&coarse))?;
    maps.push(&mc);
    let e = map("embedding", g, &emb_rgba)?;
    set(&e, "explained", shares(emb_share))?;
    set(&e, "channels", d as f64)?;
    maps.push(&e);
    let m2 = map("msf_r2", g2, &r2_rgba)?;
    set(&m2, "explained", shares(r2_share))?;
    set(&m2, "channels", c2 as f64)?;
    maps.push(&m2);
    let m1 = map("msf_r1", g1, &r1_rgba)?;
    set(&m1, "explained", shares(r1_share))?;
    set(&m1, "channels", c1 as f64)?;
    maps.push(&m1);
    let l = map("lowres_logits", lr, &logit_rgba(&low, scale))?;
    set(&l, "scale", scale as f64)?;
    maps.push(&l);
    let mm = map("mask", s, &unit_rgba(&mask))?;
    maps.push(&mm);

    let o = Object::new();
    set(&o, "size", s as f64)?;
    set(&o, "grid", g as f64)?;
    set(&o, "threshold", threshold as f64)?;
    set(&o, "foreground", fg)?;
    set(&o, "coarse_foreground", coarse_fg)?;
    set(&o, "variant", seg.model.variant.name())?;
    set(&o, "channel", xf.describe())?;
    set(&o, "maps", maps)?;
    Ok(o.into())
}
