//! Med-FastSAM initialised from a pretrained SAM (docs/import.md, "Initialising Med-FastSAM"): the
//! paper's transfer recipe. Every tensor the pretrained model has under the same name and shape
//! is copied bit for bit — the TinyViT natural-knowledge branch and neck, the prompt encoder
//! (whose mask-downscaling path is the CP-Encoder), the two-way transformer, tokens,
//! hypernetwork MLPs and IoU head, and SAM's single upsampling path renamed to the split decoder's
//! `output_upscaling_part1/part2` — and the modules the paper adds (the Group Attention and MLP
//! medical branches, `conv1_med`, the fusion convolutions) start as the authors' code initialises
//! them ([`Weights::init`]).
//!
//! The geometry comes from the pretrained model: MobileSAM gives the paper's 1024² input with a
//! stride-4 patch embedding; LiteMedSAM a 256² input with its 1×1 patch embedding and a 64×64
//! embedding — a Med-FastSAM with a medical-pretrained natural branch.

use super::convert::UPSCALING_RENAMES;
use crate::error::{Error, Result};
use crate::model::schema::{self, Kind};
use crate::model::{Arch, Config, Weights};
use serde::{Deserialize, Serialize};

/// Metadata key recording where each tensor of an initialised model came from (JSON of
/// [`Provenance`]).
pub const META_INIT: &str = "medfastsam.init";

/// What an initialisation took from the pretrained file and what it initialised.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// File name of the pretrained weights.
    pub from: String,
    /// sha256 of that file.
    pub from_sha256: String,
    /// Its architecture (`mobilesam`, `litemedsam`, `med-fastsam`).
    pub from_arch: String,
    /// Seed of the initialisation of the other tensors.
    pub seed: u64,
    /// Keys copied from the pretrained file (target name ← source name where they differ).
    pub copied: Vec<String>,
    /// Keys initialised as the authors' code does.
    pub initialised: Vec<String>,
    /// Keys of the pretrained file the model does not have.
    pub unused: Vec<String>,
}

impl Provenance {
    /// Reads the record of a weights file, if it has one.
    pub fn of(w: &Weights) -> Option<Provenance> {
        serde_json::from_str(w.metadata.get(META_INIT)?).ok()
    }

    /// Per module group (as `info` groups keys): (group, tensors copied, tensors initialised).
    pub fn by_group(&self, cfg: &Config) -> Vec<(String, usize, usize)> {
        let copied: std::collections::HashSet<&str> = self
            .copied
            .iter()
            .map(|k| k.split(" ← ").next().unwrap_or(k))
            .collect();
        let mut out: Vec<(String, usize, usize)> = Vec::new();
        for s in schema::specs(cfg) {
            let g = s.group();
            let c = copied.contains(s.key.as_str()) as usize;
            match out.last_mut() {
                Some((last, nc, ni)) if *last == g => {
                    *nc += c;
                    *ni += 1 - c;
                }
                _ => out.push((g, c, 1 - c)),
            }
        }
        out
    }
}

/// The Med-FastSAM configuration initialised from `pretrained`: the preset's architecture at the
/// pretrained model's input size and patch stride. Every other shape-bearing field must agree
/// with the pretrained model's; the error lists those that do not.
pub fn target_config(pretrained: &Config, preset: &Config, preset_name: &str) -> Result<Config> {
    let mut c = preset.clone();
    c.arch = Arch::MedFastSam;
    c.image_size = pretrained.image_size;
    c.patch_stride = pretrained.patch_stride;
    let p = pretrained;
    let mut diffs = Vec::new();
    let mut cmp = |name: &str, a: String, b: String| {
        if a != b {
            diffs.push(format!("{name} {a} (pretrained {b})"));
        }
    };
    cmp(
        "embed_dims",
        format!("{:?}", c.embed_dims),
        format!("{:?}", p.embed_dims),
    );
    cmp(
        "depths",
        format!("{:?}", c.depths),
        format!("{:?}", p.depths),
    );
    cmp(
        "num_heads",
        format!("{:?}", c.num_heads),
        format!("{:?}", p.num_heads),
    );
    cmp(
        "window_sizes",
        format!("{:?}", c.window_sizes),
        format!("{:?}", p.window_sizes),
    );
    for (name, a, b) in [
        ("decoder_depth", c.decoder_depth, p.decoder_depth),
        ("decoder_mlp_dim", c.decoder_mlp_dim, p.decoder_mlp_dim),
        ("transformer_dim", c.transformer_dim, p.transformer_dim),
        ("decoder_heads", c.decoder_heads, p.decoder_heads),
        ("mlp_ratio", c.mlp_ratio, p.mlp_ratio),
        (
            "mbconv_expand_ratio",
            c.mbconv_expand_ratio,
            p.mbconv_expand_ratio,
        ),
        (
            "num_multimask_outputs",
            c.num_multimask_outputs,
            p.num_multimask_outputs,
        ),
        (
            "iou_head_hidden_dim",
            c.iou_head_hidden_dim,
            p.iou_head_hidden_dim,
        ),
        ("mask_in_chans", c.mask_in_chans, p.mask_in_chans),
    ] {
        cmp(name, a.to_string(), b.to_string());
    }
    if !diffs.is_empty() {
        return Err(Error::Config(format!(
            "the {preset_name} preset cannot take the pretrained tensors: its {}",
            diffs.join(", ")
        )));
    }
    c.validate()?;
    Ok(c)
}

/// TinyViT's classifier (`norm_head`, `head`): never called by the segmentation forward, absent
/// from exports and LiteMedSAM; initialised when the pretrained file lacks it.
fn is_classifier(key: &str) -> bool {
    key.starts_with("image_encoder.head.") || key.starts_with("image_encoder.norm_head.")
}

/// The pretrained name of a Med-FastSAM key (SAM's `output_upscaling.{0,1,3}` for the split
/// decoder's parts; the same name otherwise).
fn source_key(key: &str) -> String {
    for (from, to) in UPSCALING_RENAMES {
        if let Some(rest) = key.strip_prefix(to) {
            return format!("{from}{rest}");
        }
    }
    key.to_string()
}

/// Med-FastSAM weights for `target` from `pretrained` (see the module documentation). Copied
/// tensors keep their values bit for bit, BatchNorm running statistics and counters included;
/// the record of what came from where is returned and stored in the metadata under [`META_INIT`].
pub fn init_from(
    pretrained: &Weights,
    target: &Config,
    seed: u64,
    from: &str,
    from_sha256: &str,
) -> Result<(Weights, Provenance)> {
    let from_arch = pretrained
        .config
        .as_ref()
        .map(|c| c.arch)
        .unwrap_or_default();
    let mut w = Weights::init(target, seed);
    let mut prov = Provenance {
        from: from.to_string(),
        from_sha256: from_sha256.to_string(),
        from_arch: from_arch.name().to_string(),
        seed,
        ..Default::default()
    };
    let mut used = std::collections::HashSet::new();
    for s in schema::specs(target) {
        let src = source_key(&s.key);
        let Some(t) = pretrained.tensors.get(&src) else {
            prov.initialised.push(s.key.clone());
            continue;
        };
        // An unused classifier head may differ (e.g. other class counts); everything else must fit.
        if t.shape != s.shape {
            if is_classifier(&s.key) {
                prov.initialised.push(s.key.clone());
                continue;
            }
            return Err(Error::weights(
                from,
                format!(
                    "tensor '{src}' has shape {:?} but the Med-FastSAM configuration needs {:?} for '{}'",
                    t.shape, s.shape, s.key
                ),
            ));
        }
        let mut t = t.clone();
        if s.kind == Kind::Counter {
            t.stored = crate::model::weights::Stored::I64;
        }
        w.tensors.insert(s.key.clone(), t);
        used.insert(src.clone());
        prov.copied.push(if src == s.key {
            s.key.clone()
        } else {
            format!("{} ← {src}", s.key)
        });
    }
    prov.unused = pretrained
        .tensors
        .keys()
        .filter(|k| !used.contains(*k))
        .cloned()
        .collect();
    let natural = schema::specs(target)
        .iter()
        .filter(|s| s.is_natural_branch() && !is_classifier(&s.key))
        .filter(|s| !prov.copied.iter().any(|c| c == &s.key))
        .map(|s| s.key.clone())
        .collect::<Vec<_>>();
    if let Some(k) = natural.first() {
        return Err(Error::weights(
            from,
            format!(
                "has no tensor '{k}' ({} natural-branch tensors missing): it is not a SAM-family model with a TinyViT encoder",
                natural.len()
            ),
        ));
    }
    w.config = Some(target.clone());
    w.source = from.to_string();
    w.metadata.insert(
        META_INIT.to_string(),
        serde_json::to_string(&prov).map_err(|e| Error::Invalid(e.to_string()))?,
    );
    Ok((w, prov))
}
