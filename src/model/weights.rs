//! Weights on the host: safetensors with the authors' state_dict key names, read as f32/f16/bf16/f64
//! (widened to f32) and i64 counters; written as f32 or f16 with the configuration and variant in
//! `__metadata__`, so a file describes itself. Tensors the model does not use (classifier head,
//! point embeddings, IoU head, hypernetworks 1-3, unknown extras) are kept and written back.

use super::config::{Arch, Config, Variant};
use super::schema::{self, Kind};
use crate::error::{Error, Result};
use crate::rng::Rng;
use std::collections::{BTreeMap, HashMap};

/// How a tensor was stored (and is written back, unless f16 output is asked for).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stored {
    F32,
    F16,
    I64,
}

#[derive(Clone, Debug)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
    pub stored: Stored,
}

impl HostTensor {
    pub fn new(shape: &[usize], data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        HostTensor {
            shape: shape.to_vec(),
            data,
            stored: Stored::F32,
        }
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

pub const META_CONFIG: &str = "medfastsam.config";
pub const META_VARIANT: &str = "medfastsam.variant";

#[derive(Clone, Debug, Default)]
pub struct Weights {
    pub tensors: BTreeMap<String, HostTensor>,
    /// Configuration found in the file's metadata.
    pub config: Option<Config>,
    /// Variant found in the file's metadata.
    pub variant: Option<Variant>,
    /// Other metadata entries (kept on save).
    pub metadata: BTreeMap<String, String>,
    /// Where the weights came from (for error messages).
    pub source: String,
}

/// A number type that safetensors values are decoded into.
pub trait FromStored: Copy {
    fn from_f32(v: f32) -> Self;
    fn from_f64(v: f64) -> Self;
}

impl FromStored for f32 {
    fn from_f32(v: f32) -> Self {
        v
    }
    fn from_f64(v: f64) -> Self {
        v as f32
    }
}

impl FromStored for f64 {
    fn from_f32(v: f32) -> Self {
        v as f64
    }
    fn from_f64(v: f64) -> Self {
        v
    }
}

/// The values of a safetensors tensor stored as F32, F16, BF16, F64 or I64 (little-endian), as
/// `T`; None for any other dtype.
pub fn tensor_values<T: FromStored>(view: &safetensors::tensor::TensorView<'_>) -> Option<Vec<T>> {
    use safetensors::Dtype;
    let raw = view.data();
    let eight = |c: &[u8]| -> [u8; 8] { c.try_into().unwrap_or([0; 8]) };
    Some(match view.dtype() {
        Dtype::F32 => raw
            .chunks_exact(4)
            .map(|c| T::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        Dtype::F16 => raw
            .chunks_exact(2)
            .map(|c| T::from_f32(half::f16::from_le_bytes([c[0], c[1]]).to_f32()))
            .collect(),
        Dtype::BF16 => raw
            .chunks_exact(2)
            .map(|c| T::from_f32(half::bf16::from_le_bytes([c[0], c[1]]).to_f32()))
            .collect(),
        Dtype::F64 => raw
            .chunks_exact(8)
            .map(|c| T::from_f64(f64::from_le_bytes(eight(c))))
            .collect(),
        Dtype::I64 => raw
            .chunks_exact(8)
            .map(|c| T::from_f64(i64::from_le_bytes(eight(c)) as f64))
            .collect(),
        _ => return None,
    })
}

fn shape_str(s: &[usize]) -> String {
    format!(
        "[{}]",
        s.iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Refuses headers whose data offsets point past the end of the file before the safetensors
/// parser sees them: it adds the last offset to the header length unchecked, which overflows (a
/// panic in debug builds) for offsets near 2^64. Anything else malformed is left to the parser.
fn check_offsets(bytes: &[u8]) -> std::result::Result<(), String> {
    let Some(n) = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
    else {
        return Ok(());
    };
    let Some(header) = usize::try_from(n)
        .ok()
        .and_then(|n| bytes.get(8..8usize.checked_add(n)?))
    else {
        return Ok(());
    };
    let Ok(serde_json::Value::Object(map)) = serde_json::from_slice::<serde_json::Value>(header)
    else {
        return Ok(());
    };
    let len = bytes.len() as u64;
    for (name, v) in &map {
        let offsets = v.get("data_offsets").and_then(|o| o.as_array());
        for o in offsets.into_iter().flatten() {
            if o.as_u64().is_some_and(|o| o > len) {
                return Err(format!(
                    "tensor '{name}' has data offset {o}, past the end of the {len}-byte file"
                ));
            }
        }
    }
    Ok(())
}

/// The image format whose signature `bytes` start with (PNG, JPEG, TIFF, BMP, GIF, WebP); None
/// for a safetensors file (its JSON header starts at byte 8), whatever its first bytes.
pub fn image_kind(bytes: &[u8]) -> Option<&'static str> {
    if bytes.get(8) == Some(&b'{') {
        return None;
    }
    const SIGNATURES: [(&[u8], &str); 7] = [
        (b"\x89PNG\r\n\x1a\n", "PNG"),
        (b"\xff\xd8\xff", "JPEG"),
        (b"II*\0", "TIFF"),
        (b"MM\0*", "TIFF"),
        (b"II+\0", "BigTIFF"),
        (b"BM", "BMP"),
        (b"GIF8", "GIF"),
    ];
    if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        return Some("WebP");
    }
    SIGNATURES
        .iter()
        .find(|(sig, _)| bytes.starts_with(sig))
        .map(|(_, k)| *k)
}

impl Weights {
    /// Parses a safetensors file's bytes. `source` names the file in errors.
    pub fn from_bytes(bytes: &[u8], source: &str) -> Result<Weights> {
        let err = |m: String| Error::weights(source, m);
        if let Some(kind) = image_kind(bytes) {
            return Err(err(format!(
                "this is an image ({kind}), not weights: give it as an image to segment, and \
                 weights as a .safetensors (or .pth/.onnx) file"
            )));
        }
        check_offsets(bytes).map_err(|m| err(format!("not a valid safetensors file ({m})")))?;
        let st = safetensors::SafeTensors::deserialize(bytes)
            .map_err(|e| err(format!("not a valid safetensors file ({e})")))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
            .map_err(|e| err(format!("not a valid safetensors file ({e})")))?;
        let mut w = Weights {
            source: source.to_string(),
            ..Default::default()
        };
        if let Some(m) = meta.metadata() {
            for (k, v) in m {
                match k.as_str() {
                    META_CONFIG => {
                        w.config = Some(
                            Config::from_json(v)
                                .map_err(|e| err(format!("bad configuration in metadata: {e}")))?,
                        )
                    }
                    META_VARIANT => {
                        w.variant =
                            Some(Variant::parse(v).map_err(|e| err(format!("metadata: {e}")))?)
                    }
                    _ => {
                        w.metadata.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        for (name, view) in st.iter() {
            // Checkpoints saved from nn.DataParallel carry a `module.` prefix.
            let key = name.strip_prefix("module.").unwrap_or(name).to_string();
            let shape = view.shape().to_vec();
            use safetensors::Dtype;
            let stored = match view.dtype() {
                Dtype::F16 => Stored::F16,
                Dtype::I64 => Stored::I64,
                _ => Stored::F32,
            };
            let data: Vec<f32> = tensor_values(&view).ok_or_else(|| {
                err(format!(
                    "tensor '{key}' has unsupported dtype {:?}",
                    view.dtype()
                ))
            })?;
            if data.iter().any(|v| !v.is_finite()) {
                return Err(err(format!(
                    "tensor '{key}' contains NaN or infinite values"
                )));
            }
            w.tensors.insert(
                key,
                HostTensor {
                    shape,
                    data,
                    stored,
                },
            );
        }
        if w.tensors.is_empty() {
            return Err(err("the file holds no tensors".into()));
        }
        Ok(w)
    }

    #[cfg(not(target_arch = "wasm32"))]
    pub fn load(path: &std::path::Path) -> Result<Weights> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Weights::from_bytes(&bytes, &path.display().to_string())
    }

    pub fn get(&self, key: &str) -> Result<&HostTensor> {
        self.tensors
            .get(key)
            .ok_or_else(|| Error::weights(&self.source, format!("missing tensor '{key}'")))
    }

    /// Checks that every tensor the configuration defines is present with the right shape; the
    /// first mismatch is reported with both shapes.
    pub fn check(&self, cfg: &Config) -> Result<()> {
        for s in schema::specs(cfg) {
            match self.tensors.get(&s.key) {
                None => {
                    return Err(Error::weights(
                        &self.source,
                        format!(
                            "missing tensor '{}' (the configuration expects shape {})",
                            s.key,
                            shape_str(&s.shape)
                        ),
                    ));
                }
                Some(t) if t.shape != s.shape => {
                    return Err(Error::weights(
                        &self.source,
                        format!(
                            "tensor '{}' has shape {} but the configuration expects {}",
                            s.key,
                            shape_str(&t.shape),
                            shape_str(&s.shape)
                        ),
                    ));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Reads the architecture off the tensor shapes (for files without a configuration in their
    /// metadata). The input size cannot be inferred: `image_size` is taken from `image_size`.
    pub fn infer_config(&self, image_size: usize) -> Result<Config> {
        let bad = |m: String| {
            Error::weights(&self.source, format!("cannot infer the configuration: {m}"))
        };
        // Dimension `i` of tensor `k` (a tensor of lower rank is an error, not a panic).
        let dim = |k: &str, i: usize| -> Result<usize> {
            let sh = &self.get(k)?.shape;
            sh.get(i).copied().ok_or_else(|| {
                bad(format!(
                    "tensor '{k}' has shape {} (expected at least {} dimensions)",
                    shape_str(sh),
                    i + 1
                ))
            })
        };
        // Number of consecutive `prefix.<i>.` modules; counting stops past the largest depth a
        // configuration may have, so a hostile key list cannot make this quadratic.
        let count = |prefix: &str| -> usize {
            (0..=super::config::MAX_DEPTH + 1)
                .take_while(|i| {
                    let p = format!("{prefix}.{i}.");
                    self.tensors
                        .range(p.clone()..)
                        .next()
                        .is_some_and(|(k, _)| k.starts_with(&p))
                })
                .count()
        };
        let ratio = |name: &str, num: usize, den: usize| -> Result<usize> {
            num.checked_div(den)
                .ok_or_else(|| bad(format!("{name}: division by a zero width")))
        };
        let ie = "image_encoder";
        let mut c = Config::paper();
        c.image_size = image_size;
        // Architecture: the medical branches (Med-FastSAM) or SAM's decoder keys (MobileSAM), and
        // LiteMedSAM's 1×1 patch embedding.
        let has = |k: &str| self.tensors.contains_key(k);
        if !has("conv1_med.features1.0.weight") && has("mask_decoder.output_upscaling.0.weight") {
            let k = dim(&format!("{ie}.patch_embed.seq.0.c.weight"), 2)?;
            c.arch = if k == 1 {
                Arch::LiteMedSam
            } else {
                Arch::MobileSam
            };
            c.patch_stride = if k == 1 { 1 } else { 4 };
        } else if has("conv1_med.features1.0.weight") {
            // Med-FastSAM on the LiteMedSAM geometry: 1×1 stem and 1×1 first MSF convolution.
            let k = dim(&format!("{ie}.patch_embed.seq.0.c.weight"), 2)?;
            c.patch_stride = if k == 1 { 1 } else { 4 };
        }
        c.embed_dims[0] = dim(&format!("{ie}.patch_embed.seq.2.c.weight"), 0)?;
        for s in 0..3 {
            c.embed_dims[s + 1] = dim(&format!("{ie}.layers.{s}.downsample.conv1.c.weight"), 0)?;
        }
        for s in 0..4 {
            c.depths[s] = count(&format!("{ie}.layers.{s}.blocks"));
        }
        for s in 1..4 {
            let k = format!("{ie}.layers.{s}.blocks.0.attn.attention_biases");
            c.num_heads[s] = dim(&k, 0)?;
            c.window_sizes[s] = (dim(&k, 1)? as f64).sqrt().round() as usize;
        }
        c.num_heads[0] = (c.embed_dims[0] / 32).max(1);
        c.window_sizes[0] = c.window_sizes[1];
        if c.depths[0] > 0 {
            c.mbconv_expand_ratio = ratio(
                "mbconv_expand_ratio",
                dim(&format!("{ie}.layers.0.blocks.0.conv1.c.weight"), 0)?,
                c.embed_dims[0],
            )?;
        }
        c.mlp_ratio = ratio(
            "mlp_ratio",
            dim(&format!("{ie}.layers.1.blocks.0.mlp.fc1.weight"), 0)?,
            c.embed_dims[1],
        )?;
        c.num_classes = if c.arch.is_med_fastsam() || has(&format!("{ie}.head.weight")) {
            dim(&format!("{ie}.head.weight"), 0)?
        } else {
            0
        };
        c.transformer_dim = dim("mask_decoder.iou_token.weight", 1)?;
        c.decoder_depth = count("mask_decoder.transformer.layers");
        c.decoder_mlp_dim = dim("mask_decoder.transformer.layers.0.mlp.lin1.weight", 0)?;
        c.num_multimask_outputs = dim("mask_decoder.mask_tokens.weight", 0)?
            .checked_sub(1)
            .ok_or_else(|| {
                bad("tensor 'mask_decoder.mask_tokens.weight' holds no mask token".into())
            })?;
        c.iou_head_hidden_dim = dim("mask_decoder.iou_prediction_head.layers.0.weight", 0)?;
        c.mask_in_chans = dim("prompt_encoder.mask_downscaling.3.weight", 0)?;
        c.validate().map_err(|e| {
            Error::weights(
                &self.source,
                format!("inferred configuration is invalid: {e}"),
            )
        })?;
        Ok(c)
    }

    /// The configuration to use: `explicit` if given, else the file's metadata, else inferred from
    /// the shapes at `default_size`. The result is validated ([`Config::validate`]) and checked
    /// against the tensors.
    pub fn resolve_config(&self, explicit: Option<&Config>, default_size: usize) -> Result<Config> {
        let c = match (explicit, &self.config) {
            (Some(c), _) => c.clone(),
            (None, Some(c)) => c.clone(),
            (None, None) => self.infer_config(default_size)?,
        };
        c.validate()?;
        self.check(&c)?;
        Ok(c)
    }

    /// Freshly initialised weights for `cfg` (for training from scratch), every parameter as the
    /// authors' code initialises it (see `authors_init`), BatchNorm running statistics 0/1, the
    /// PE matrix N(0, 1).
    pub fn init(cfg: &Config, seed: u64) -> Weights {
        let mut rng = Rng::new(seed);
        let mut w = Weights {
            source: "initialisation".into(),
            ..Default::default()
        };
        let specs = schema::specs(cfg);
        let shapes: BTreeMap<&str, &[usize]> = specs
            .iter()
            .map(|s| (s.key.as_str(), s.shape.as_slice()))
            .collect();
        for s in &specs {
            let n = s.numel();
            let k = &s.key;
            let data: Vec<f32> = match s.kind {
                Kind::Counter => vec![0.0; n],
                Kind::RunningStat => vec![if k.ends_with("running_var") { 1.0 } else { 0.0 }; n],
                Kind::Buffer => (0..n).map(|_| rng.normal() as f32).collect(),
                Kind::Param => authors_init(s, &shapes, &mut rng),
            };
            let stored = if s.kind == Kind::Counter {
                Stored::I64
            } else {
                Stored::F32
            };
            w.tensors.insert(
                s.key.clone(),
                HostTensor {
                    shape: s.shape.clone(),
                    data,
                    stored,
                },
            );
        }
        w.config = Some(cfg.clone());
        w
    }

    /// Serialises as safetensors with the configuration and variant in the metadata. `f16` stores
    /// floating tensors as f16 (counters stay i64).
    pub fn to_bytes(&self, cfg: &Config, variant: Variant, f16: bool) -> Result<Vec<u8>> {
        struct V {
            dtype: safetensors::Dtype,
            shape: Vec<usize>,
            bytes: Vec<u8>,
        }
        impl safetensors::View for V {
            fn dtype(&self) -> safetensors::Dtype {
                self.dtype
            }
            fn shape(&self) -> &[usize] {
                &self.shape
            }
            fn data(&self) -> std::borrow::Cow<'_, [u8]> {
                (&self.bytes[..]).into()
            }
            fn data_len(&self) -> usize {
                self.bytes.len()
            }
        }
        let mut views = Vec::with_capacity(self.tensors.len());
        for (k, t) in &self.tensors {
            let (dtype, bytes) = match (t.stored, f16) {
                (Stored::I64, _) => (
                    safetensors::Dtype::I64,
                    t.data
                        .iter()
                        .flat_map(|&v| (v.round() as i64).to_le_bytes())
                        .collect(),
                ),
                (_, true) => (
                    safetensors::Dtype::F16,
                    t.data
                        .iter()
                        .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                        .collect(),
                ),
                (_, false) => (
                    safetensors::Dtype::F32,
                    t.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
                ),
            };
            views.push((
                k.clone(),
                V {
                    dtype,
                    shape: t.shape.clone(),
                    bytes,
                },
            ));
        }
        let mut meta: HashMap<String, String> = self.metadata.clone().into_iter().collect();
        meta.insert("format".into(), "pt".into());
        meta.insert(META_CONFIG.into(), cfg.to_json());
        meta.insert(META_VARIANT.into(), variant.name().into());
        safetensors::serialize(views, Some(meta))
            .map_err(|e| Error::weights(&self.source, format!("cannot serialise: {e}")))
    }

    /// Writes atomically (temporary file in the same folder, then rename).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn save(
        &self,
        path: &std::path::Path,
        cfg: &Config,
        variant: Variant,
        f16: bool,
    ) -> Result<()> {
        let bytes = self.to_bytes(cfg, variant, f16)?;
        crate::io::write_atomic(path, &bytes)
    }
}

/// The initial value of one parameter as the authors' PyTorch code gives it (docs/training.md,
/// "Initialisation"): TinyViT's `_init_weights` inside the image encoder (linear weights
/// normal σ 0.02, truncated at ±2 — in effect untruncated —, zero bias; LayerNorm 1/0),
/// `Conv2d_BN` BatchNorm weight 1 (0 for the last convolution of each MBConv) and bias 0,
/// relative-position bias tables zero, embeddings and tokens N(0, 1), and PyTorch's default
/// elsewhere: weights and biases of convolutions, transposed convolutions and linear layers
/// uniform in ±1/√fan_in, with fan_in = size(1) × kernel area of the weight.
fn authors_init(s: &schema::Spec, shapes: &BTreeMap<&str, &[usize]>, rng: &mut Rng) -> Vec<f32> {
    let k = s.key.as_str();
    let n = s.numel();
    let is_norm = k.contains("norm")
        || k.contains(".bn.")
        || k.contains("mask_downscaling.1")
        || k.contains("mask_downscaling.4")
        || k.contains("neck.1")
        || k.contains("neck.3")
        || k.contains("output_upscaling_part1.1")
        || k.contains("output_upscaling.1")
        || k.contains("features1.1")
        || k.contains("features2.1");
    let weight = k.ends_with("weight");
    let in_encoder = k.starts_with("image_encoder.");
    if is_norm {
        // Only the MBConv blocks' last BatchNorm (not PatchMerging's `downsample.conv3`).
        let zero_gamma = k.contains(".blocks.") && k.contains(".conv3.bn.weight");
        return vec![if weight && !zero_gamma { 1.0 } else { 0.0 }; n];
    }
    if k.contains("attention_biases") {
        return vec![0.0; n];
    }
    let embedding = (k.contains("embed") && !k.contains("patch_embed"))
        || k.ends_with("token.weight")
        || k.ends_with("tokens.weight");
    if embedding {
        return (0..n).map(|_| rng.normal() as f32).collect();
    }
    // The weight this tensor belongs to (itself, or the weight beside a bias).
    let wshape: &[usize] = if weight {
        &s.shape
    } else {
        shapes
            .get(format!("{}weight", k.trim_end_matches("bias")).as_str())
            .copied()
            .unwrap_or(&s.shape)
    };
    if in_encoder && wshape.len() == 2 {
        // TinyViT's `_init_weights` on nn.Linear.
        return if weight {
            (0..n)
                .map(|_| {
                    loop {
                        let v = rng.normal() * 0.02;
                        if v.abs() <= 2.0 {
                            break v as f32;
                        }
                    }
                })
                .collect()
        } else {
            vec![0.0; n]
        };
    }
    let fan_in: usize = wshape.iter().skip(1).product();
    let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
    (0..n).map(|_| rng.range(-bound, bound) as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::tensor_values;
    use safetensors::Dtype;
    use safetensors::tensor::TensorView;

    fn view(dtype: Dtype, bytes: &[u8], n: usize) -> TensorView<'_> {
        TensorView::new(dtype, vec![n], bytes).unwrap()
    }

    /// Each stored dtype decodes to the values written, as f32 and as f64.
    #[test]
    fn tensor_values_decodes_every_stored_dtype() {
        let vals = [1.5f64, -0.25, 3.0];
        let f32b: Vec<u8> = vals
            .iter()
            .flat_map(|&v| (v as f32).to_le_bytes())
            .collect();
        let f16b: Vec<u8> = vals
            .iter()
            .flat_map(|&v| half::f16::from_f64(v).to_le_bytes())
            .collect();
        let bf16b: Vec<u8> = vals
            .iter()
            .flat_map(|&v| half::bf16::from_f64(v).to_le_bytes())
            .collect();
        let f64b: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        for (dt, b) in [
            (Dtype::F32, &f32b),
            (Dtype::F16, &f16b),
            (Dtype::BF16, &bf16b),
            (Dtype::F64, &f64b),
        ] {
            let v = view(dt, b, 3);
            assert_eq!(tensor_values::<f64>(&v).unwrap(), vals, "{dt:?}");
            let as32: Vec<f32> = vals.iter().map(|&x| x as f32).collect();
            assert_eq!(tensor_values::<f32>(&v).unwrap(), as32, "{dt:?}");
        }
        let i64b: Vec<u8> = [7i64, -3].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(
            tensor_values::<f64>(&view(Dtype::I64, &i64b, 2)).unwrap(),
            [7.0, -3.0]
        );
        assert!(tensor_values::<f32>(&view(Dtype::U8, &[1, 2], 2)).is_none());
    }
}
