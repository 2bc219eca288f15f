//! The state_dict schema: every key of the authors' `TinySAM` with its shape, derived from the
//! configuration (docs/model.md, "Weights and key names"). Used to validate weight files, initialise
//! new models, count parameters per module and decide what `semi` training freezes.

use super::blocks::Source;
use super::config::{Config, Variant};
use super::med_fastsam::MedFastSam;
use crate::error::Result;
use std::cell::RefCell;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A trainable parameter.
    Param,
    /// BatchNorm running mean / variance (persistent buffer).
    RunningStat,
    /// BatchNorm `num_batches_tracked` (i64 scalar).
    Counter,
    /// Other persistent buffer (the random-Fourier PE matrix).
    Buffer,
}

#[derive(Clone, Debug)]
pub struct Spec {
    pub key: String,
    pub shape: Vec<usize>,
    pub kind: Kind,
}

impl Spec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Module group used by `info` (e.g. "image_encoder.layers.2").
    pub fn group(&self) -> String {
        let parts: Vec<&str> = self.key.split('.').collect();
        match parts.as_slice() {
            ["image_encoder", "layers", s, ..] => format!("image_encoder.layers.{s}"),
            ["image_encoder", m, ..] => format!("image_encoder.{m}"),
            ["mask_decoder", "transformer", ..] => "mask_decoder.transformer".into(),
            ["mask_decoder", m, ..] => format!("mask_decoder.{m}"),
            [a, b, ..] => format!("{a}.{b}"),
            [a] => a.to_string(),
            [] => String::new(),
        }
    }
    /// The paper's semi-parameter rule: every `image_encoder` tensor without `med` in its name
    /// belongs to the frozen natural-knowledge branch.
    pub fn is_natural_branch(&self) -> bool {
        self.key.starts_with("image_encoder.") && !self.key.contains("med")
    }
}

/// Records every tensor a model asks for, in order.
#[derive(Default)]
struct Recorder(RefCell<Vec<Spec>>);

impl Source for Recorder {
    type P = Spec;
    fn get(&self, key: &str, shape: &[usize], kind: Kind) -> Result<Spec> {
        let s = Spec {
            key: key.to_string(),
            shape: shape.to_vec(),
            kind,
        };
        self.0.borrow_mut().push(s.clone());
        Ok(s)
    }
    fn unused(&self, key: &str, shape: &[usize], kind: Kind) {
        self.0.borrow_mut().push(Spec {
            key: key.to_string(),
            shape: shape.to_vec(),
            kind,
        });
    }
}

/// Every state_dict entry for `cfg`, in module order: the keys the model's parts name when they
/// are built (the paper variant, which reads every Group Attention tensor), plus those the
/// forward never reads.
pub fn specs(cfg: &Config) -> Vec<Spec> {
    let rec = Recorder::default();
    // Building from the recorder only names keys and multiplies dimensions: it cannot fail.
    if cfg.arch.is_med_fastsam() {
        let _ = MedFastSam::<Spec>::build(&rec, cfg, Variant::Paper);
    } else {
        let _ = super::sam::Sam::<Spec>::build(&rec, cfg);
    }
    rec.0.into_inner()
}

/// Number of trainable parameters (buffers excluded).
pub fn param_count(cfg: &Config) -> usize {
    specs(cfg)
        .iter()
        .filter(|s| s.kind == Kind::Param)
        .map(|s| s.numel())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn paper_preset_has_the_papers_parameter_count() {
        let c = Config::paper();
        assert_eq!(param_count(&c), 14_479_104);
        let sp = specs(&c);
        assert_eq!(sp.len(), 541);
        let natural: usize = sp
            .iter()
            .filter(|s| s.kind == Kind::Param && s.is_natural_branch())
            .map(|s| s.numel())
            .sum();
        // Tuned parameters under the natural-branch rule (docs/training.md, "Modes").
        assert_eq!(param_count(&c) - natural, 8_413_572);
    }
    #[test]
    fn mobilesam_and_litemedsam_have_their_published_parameter_counts() {
        // MobileSAM: 10,130,092 with TinyViT's unused classifier head (its paper's Table 1 and the
        // Med-FastSAM paper's count); 9,808,452 without.
        assert_eq!(param_count(&Config::mobilesam()), 10_130_092);
        let lite = Config::litemedsam();
        // LiteMedSAM: MobileSAM without the head, its patch embedding 1×1 instead of 3×3:
        // the stem convolutions have 3·32·1 + 32·64·1 instead of 3·32·9 + 32·64·9 weights.
        let stem_diff = (3 * 32 + 32 * 64) * 8;
        assert_eq!(param_count(&lite), 10_130_092 - 321_640 - stem_diff);
        // No medical-branch key in either.
        for c in [Config::mobilesam(), lite] {
            assert!(specs(&c).iter().all(|s| !s.key.contains("med")));
        }
    }
}
