//! The tiny preset end to end: the forward pass against the parity fixture's logits, and one
//! training step's loss and gradients. The fixture comes from `Options::tiny_fixture`, the
//! embedded copy ([`embedded_tiny_fixture`]) or a folder (`Options::fixtures`,
//! MEDFASTSAM_FIXTURES).

use super::backward::Parts;
use super::*;
use crate::model::weights::HostTensor;
use crate::model::{Config, MedFastSam, Variant, Weights};
use safetensors::{Dtype, SafeTensors};
use std::sync::Arc;

/// Where the model checks read the fixture.
#[derive(Clone)]
pub(super) enum TinySource {
    /// The compact file (build.rs) given by the caller.
    Bytes(Arc<Vec<u8>>),
    /// The compact file embedded in the binary.
    #[cfg(not(target_arch = "wasm32"))]
    Static(&'static [u8]),
    /// A folder holding `tiny.config.json`, `tiny.weights.safetensors`,
    /// `tiny.forward.safetensors` and `tiny.train.safetensors`.
    #[cfg(not(target_arch = "wasm32"))]
    Dir(std::path::PathBuf),
    /// Nothing to read: the checks are skipped with this reason.
    Missing(String),
}

impl TinySource {
    /// `opts.fixtures`, else `opts.tiny_fixture`, else (natively) MEDFASTSAM_FIXTURES, else the
    /// embedded copy.
    pub(super) fn of(opts: &Options) -> TinySource {
        #[cfg(not(target_arch = "wasm32"))]
        if let Some(d) = &opts.fixtures {
            return TinySource::Dir(d.clone());
        }
        if let Some(b) = &opts.tiny_fixture {
            return TinySource::Bytes(b.clone());
        }
        #[cfg(not(target_arch = "wasm32"))]
        {
            if let Some(d) = std::env::var_os("MEDFASTSAM_FIXTURES") {
                return TinySource::Dir(d.into());
            }
            match embedded_tiny_fixture() {
                Some(b) => TinySource::Static(b),
                None => TinySource::Missing(
                    "the tiny fixture is not embedded in this build (tests/data/fixtures was \
                     absent when it was compiled); give --fixtures DIR"
                        .into(),
                ),
            }
        }
        #[cfg(target_arch = "wasm32")]
        TinySource::Missing("the tiny fixture was not loaded".into())
    }

    fn compact(&self) -> Option<&[u8]> {
        match self {
            TinySource::Bytes(b) => Some(b.as_slice()),
            #[cfg(not(target_arch = "wasm32"))]
            TinySource::Static(b) => Some(b),
            _ => None,
        }
    }

    /// The bytes of one fixture file (`part`: "forward" or "train") and the prefix of its keys.
    fn file(&self, part: &str) -> anyhow::Result<(std::borrow::Cow<'_, [u8]>, String)> {
        if let Some(b) = self.compact() {
            return Ok((b.into(), format!("fixture.{part}.")));
        }
        let bytes = self.read(&format!("tiny.{part}.safetensors"))?;
        Ok((bytes.into(), String::new()))
    }

    /// A file of the fixture folder; a missing one skips the check.
    fn read(&self, name: &str) -> anyhow::Result<Vec<u8>> {
        match self {
            TinySource::Missing(why) => Err(Skip(why.clone()).into()),
            #[cfg(not(target_arch = "wasm32"))]
            TinySource::Dir(dir) => {
                let p = dir.join(name);
                if !p.is_file() {
                    return Err(Skip(format!(
                        "fixture not found: {} (give --fixtures DIR or MEDFASTSAM_FIXTURES)",
                        p.display()
                    ))
                    .into());
                }
                std::fs::read(&p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))
            }
            _ => Err(Skip(format!("no fixture folder to read {name} from")).into()),
        }
    }

    /// The configuration and the weights.
    fn model(&self) -> anyhow::Result<(Config, Weights)> {
        let Some(bytes) = self.compact() else {
            let cfg = std::str::from_utf8(&self.read("tiny.config.json")?)
                .map_err(|e| anyhow::anyhow!("tiny.config.json: {e}"))
                .and_then(|s| Ok(Config::from_json(s)?))?;
            let w = Weights::from_bytes(
                &self.read("tiny.weights.safetensors")?,
                "tiny.weights.safetensors",
            )?;
            return Ok((cfg, w));
        };
        let bad = |m: String| anyhow::anyhow!("the tiny fixture: {m}");
        let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| bad(e.to_string()))?;
        let text = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get(crate::model::weights::META_CONFIG))
            .ok_or_else(|| bad("no configuration in the metadata".into()))?;
        let cfg = Config::from_json(text)?;
        let st = SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
        let mut w = Weights {
            source: "the embedded tiny fixture".into(),
            config: Some(cfg.clone()),
            ..Default::default()
        };
        for (k, v) in st.iter() {
            if k.starts_with("fixture.") {
                continue;
            }
            let data = floats(&v).map_err(|e| bad(format!("{k}: {e}")))?;
            let mut t = HostTensor::new(v.shape(), data.iter().map(|&x| x as f32).collect());
            if v.dtype() == Dtype::I64 {
                t.stored = crate::model::weights::Stored::I64;
            }
            w.tensors.insert(k.to_string(), t);
        }
        Ok((cfg, w))
    }
}

/// A tensor's values (f32, f64 or i64) as f64.
fn floats(v: &safetensors::tensor::TensorView<'_>) -> anyhow::Result<Vec<f64>> {
    match v.dtype() {
        Dtype::F32 | Dtype::F64 | Dtype::I64 => {
            crate::model::weights::tensor_values(v).ok_or_else(|| anyhow::anyhow!("unreadable"))
        }
        t => anyhow::bail!("{t:?}, not f32, f64 or i64"),
    }
}

/// Tensors of one fixture part by their key (without the prefix).
struct Part<'a> {
    st: SafeTensors<'a>,
    prefix: String,
}

impl<'a> Part<'a> {
    fn open(bytes: &'a [u8], prefix: String) -> anyhow::Result<Part<'a>> {
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| anyhow::anyhow!("the tiny fixture ({prefix}): {e}"))?;
        Ok(Part { st, prefix })
    }

    fn get(&self, k: &str) -> anyhow::Result<safetensors::tensor::TensorView<'a>> {
        let key = format!("{}{k}", self.prefix);
        self.st
            .tensor(&key)
            .map_err(|e| anyhow::anyhow!("the tiny fixture: tensor {key}: {e}"))
    }

    fn floats(&self, k: &str) -> anyhow::Result<Vec<f64>> {
        floats(&self.get(k)?).map_err(|e| anyhow::anyhow!("the tiny fixture: {k}: {e}"))
    }

    /// A u8 RGB image `[B, H, W, 3]` packed as the model's pixels, and `[B, H, W]`.
    fn image(&self, k: &str) -> anyhow::Result<(Vec<u32>, Vec<usize>)> {
        let img = self.get(k)?;
        let sh = img.shape().to_vec();
        if sh.len() != 4 || sh[3] != 3 || img.dtype() != Dtype::U8 {
            anyhow::bail!("the tiny fixture: {k} is not u8 [B, H, W, 3]");
        }
        let px = img
            .data()
            .chunks_exact(3)
            .map(|p| p[0] as u32 | (p[1] as u32) << 8 | (p[2] as u32) << 16)
            .collect();
        Ok((px, sh[..3].to_vec()))
    }
}

/// The tiny preset end to end (image -> logits) against the authors' f64 PyTorch logits of
/// the parity fixture, at the parity tests' logit tolerance.
pub(super) fn tiny_check(name: &str, variant: Variant, src: TinySource) -> Check {
    Check {
        name: name.to_string(),
        family: "model",
        shape: format!("tiny preset, {} variant", variant.name()),
        tolerance: 2e-3,
        body: body(move |gpu: &Gpu| {
            let src = src.clone();
            Box::pin(async move {
                let (cfg, w) = src.model()?;
                let model = MedFastSam::new(gpu, &w, &cfg, variant)?;
                let (bytes, prefix) = src.file("forward")?;
                let fx = Part::open(&bytes, prefix)?;
                let (px, sh) = fx.image("image")?;
                let tpx = gpu.upload_u32(&px, &sh)?;
                // [B, 1, S, S] in the fixture and [B, S, S, 1] here: the same order.
                let want = fx.floats(&format!("{}.logits", variant.name()))?;
                let mut rec = gpu.new_recorder();
                let out = model.forward(&mut rec, &tpx, false)?;
                rec.submit()?;
                let got = gpu.read_async(&out.logits).await?;
                let ms =
                    time_async(gpu, 1, |rec| model.forward(rec, &tpx, false).map(|_| ())).await?;
                let mut p = Parts::default();
                p.push("logits", got, want);
                let mut o = p.outcome(Some(ms), None, None);
                o.entry = "MedFastSam::forward".into();
                Ok(o)
            })
        }),
    }
}

/// One training step of the tiny preset (paper variant, every parameter trainable, BatchNorm with
/// batch statistics, the paper's loss) on the fixture's batch of 2: the loss, its focal and Dice
/// parts and the gradients of [`TINY_TRAIN_GRADS`] against PyTorch's float64 run, each tensor
/// against its own scale (fixtures/README.md: gradients within 1e-3).
pub(super) fn train_step_check(name: &str, src: TinySource) -> Check {
    Check {
        name: name.to_string(),
        family: "model",
        shape: format!(
            "tiny preset, paper variant, batch 2, loss + {} gradients",
            TINY_TRAIN_GRADS.len()
        ),
        tolerance: 1e-3,
        body: body(move |gpu: &Gpu| {
            let src = src.clone();
            Box::pin(async move {
                use crate::ops::loss::{LossConfig, seg_loss};
                use crate::train::params::{ParamStore, TrainMode};
                let (cfg, w) = src.model()?;
                let (bytes, prefix) = src.file("train")?;
                let fx = Part::open(&bytes, prefix)?;
                let (px, sh) = fx.image("image")?;
                let target = fx.get("target")?;
                if target.dtype() != Dtype::U8 || target.shape() != sh.as_slice() {
                    anyhow::bail!("the tiny fixture: target is not u8 {sh:?}");
                }
                let target: Vec<f32> = target.data().iter().map(|&v| v as f32).collect();
                let ps = ParamStore::new(gpu, &w, &cfg, Variant::Paper, TrainMode::Full)?;
                let tpx = gpu.upload_u32(&px, &sh)?;
                let tt = gpu.upload(&target, &[sh[0], sh[1], sh[2], 1])?;
                let model = MedFastSam::from_params(&ps)?;
                let lc = LossConfig::default();
                let step = |rec: &mut crate::gpu::Recorder| -> crate::Result<crate::gpu::Tensor> {
                    ps.zero_grads(rec);
                    let (out, saved) = model.forward_train(rec, &tpx)?;
                    let (loss, dlogits) = seg_loss(rec, &out.logits, &tt, &lc)?;
                    model.backward(rec, saved, &dlogits)?;
                    Ok(loss)
                };
                let mut rec = gpu.new_recorder();
                let loss = step(&mut rec)?;
                rec.submit()?;
                let l = gpu.read_async(&loss).await?;
                let mut p = Parts::default();
                for (i, k) in ["loss", "loss.focal", "loss.dice"].iter().enumerate() {
                    p.push(k, l.get(i).copied().into_iter().collect(), fx.floats(k)?);
                }
                for k in TINY_TRAIN_GRADS {
                    let g = ps
                        .grads
                        .get(*k)
                        .ok_or_else(|| anyhow::anyhow!("no gradient for {k}"))?;
                    let want = fx.floats(&format!("grad.{k}"))?;
                    p.push(&format!("grad.{k}"), gpu.read_async(g).await?, want);
                }
                // A warm step (the first one created the pipelines).
                let ms = time_async(gpu, 1, |rec| step(rec).map(|_| ())).await?;
                let mut o = p.outcome(Some(ms), None, None);
                o.entry = "MedFastSam::forward_train + backward".into();
                Ok(o)
            })
        }),
    }
}
