//! Model configuration: every size is a parameter (SPEC.md §1). Presets `paper` and `tiny`; JSON in
//! the format of fixtures/tiny.config.json, with optional fields for the decoder sizes.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

fn d256() -> usize {
    256
}
fn d8() -> usize {
    8
}
fn d4() -> usize {
    4
}
fn d3() -> usize {
    3
}
fn d16() -> usize {
    16
}
fn d1000() -> usize {
    1000
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Input side S (square, stretched); token grid S/16, low-res mask S/4.
    pub image_size: usize,
    /// Widths of the four LKA-Encoder stages.
    pub embed_dims: Vec<usize>,
    /// Blocks per stage (stage 0 = MBConv blocks, stages 1-3 = TinyViT blocks).
    pub depths: Vec<usize>,
    /// Heads per stage (stage 0 unused).
    pub num_heads: Vec<usize>,
    /// Attention window per stage (stage 0 unused).
    pub window_sizes: Vec<usize>,
    /// Two-way transformer depth and MLP width.
    pub decoder_depth: usize,
    pub decoder_mlp_dim: usize,
    #[serde(default = "d256")]
    pub transformer_dim: usize,
    #[serde(default = "d8")]
    pub decoder_heads: usize,
    #[serde(default = "d4")]
    pub mlp_ratio: usize,
    #[serde(default = "d4")]
    pub mbconv_expand_ratio: usize,
    /// SAM's multimask outputs (the decoder has this + 1 mask tokens; only token 0 is used).
    #[serde(default = "d3")]
    pub num_multimask_outputs: usize,
    #[serde(default = "d256")]
    pub iou_head_hidden_dim: usize,
    /// Mask-downscaling width (SAM's mask_in_chans).
    #[serde(default = "d16")]
    pub mask_in_chans: usize,
    /// Size of the (unused) classifier head kept for key compatibility.
    #[serde(default = "d1000")]
    pub num_classes: usize,
}

impl Config {
    /// The paper configuration (1024², TinyViT-5M widths): 14,479,104 parameters.
    pub fn paper() -> Config {
        Config {
            image_size: 1024,
            embed_dims: vec![64, 128, 160, 320],
            depths: vec![2, 2, 6, 2],
            num_heads: vec![2, 4, 5, 10],
            window_sizes: vec![7, 7, 14, 7],
            decoder_depth: 2,
            decoder_mlp_dim: 2048,
            transformer_dim: 256,
            decoder_heads: 8,
            mlp_ratio: 4,
            mbconv_expand_ratio: 4,
            num_multimask_outputs: 3,
            iou_head_hidden_dim: 256,
            mask_in_chans: 16,
            num_classes: 1000,
        }
    }

    /// The small configuration of fixtures/tiny.config.json (256²).
    pub fn tiny() -> Config {
        Config {
            image_size: 256,
            embed_dims: vec![32, 64, 96, 128],
            depths: vec![1, 1, 2, 1],
            num_heads: vec![1, 2, 3, 4],
            window_sizes: vec![7, 7, 14, 7],
            decoder_depth: 2,
            decoder_mlp_dim: 128,
            ..Config::paper()
        }
    }

    pub fn preset(name: &str) -> Result<Config> {
        match name {
            "paper" => Ok(Config::paper()),
            "tiny" => Ok(Config::tiny()),
            other => Err(Error::Config(format!("unknown preset '{other}' (expected paper or tiny)"))),
        }
    }

    pub fn from_json(text: &str) -> Result<Config> {
        let c: Config = serde_json::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
        c.validate()?;
        Ok(c)
    }

    #[cfg(not(target_arch = "wasm32"))]
    pub fn from_file(path: &std::path::Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Config::from_json(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("config serialises")
    }

    /// A copy at another input size (everything else equal).
    pub fn with_image_size(&self, s: usize) -> Result<Config> {
        let c = Config { image_size: s, ..self.clone() };
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.image_size == 0 || self.image_size % 16 != 0 {
            return bad(format!("image_size {} must be a positive multiple of 16", self.image_size));
        }
        for (name, v) in [
            ("embed_dims", &self.embed_dims),
            ("depths", &self.depths),
            ("num_heads", &self.num_heads),
            ("window_sizes", &self.window_sizes),
        ] {
            if v.len() != 4 {
                return bad(format!("{name} must have 4 entries (got {})", v.len()));
            }
        }
        if self.embed_dims[0] % 2 != 0 || self.embed_dims.contains(&0) {
            return bad(format!("embed_dims {:?} must be positive and embed_dims[0] even", self.embed_dims));
        }
        for s in 1..4 {
            let (d, h, w) = (self.embed_dims[s], self.num_heads[s], self.window_sizes[s]);
            if h == 0 || d % h != 0 {
                return bad(format!("stage {s}: width {d} is not divisible by {h} heads"));
            }
            if d / h > 64 {
                return bad(format!("stage {s}: head dimension {} exceeds 64", d / h));
            }
            if w == 0 || w * w > 256 {
                return bad(format!("stage {s}: window size {w} must be 1..=16"));
            }
        }
        if self.transformer_dim % self.decoder_heads != 0 || (self.transformer_dim / 2) % self.decoder_heads != 0 {
            return bad(format!(
                "transformer_dim {} must be divisible by 2 x decoder_heads {}",
                self.transformer_dim, self.decoder_heads
            ));
        }
        if self.transformer_dim % 8 != 0 {
            return bad(format!("transformer_dim {} must be a multiple of 8", self.transformer_dim));
        }
        if self.decoder_depth == 0 || self.decoder_mlp_dim == 0 || self.depths[1..].contains(&0) {
            return bad("decoder_depth, decoder_mlp_dim and depths[1..] must be positive".into());
        }
        Ok(())
    }

    /// Side of the token grid (S/16) = embedding and dense-prompt resolution.
    pub fn grid(&self) -> usize {
        self.image_size / 16
    }
    /// Side of the low-resolution mask (S/4).
    pub fn lowres(&self) -> usize {
        self.image_size / 4
    }
    /// Resolution at the input of stage `s` (0..4): S/4, S/8, S/16, S/16.
    pub fn stage_res(&self, s: usize) -> usize {
        match s {
            0 => self.image_size / 4,
            1 => self.image_size / 8,
            _ => self.image_size / 16,
        }
    }
    pub fn num_mask_tokens(&self) -> usize {
        self.num_multimask_outputs + 1
    }
}

/// Which forward the model computes (SPEC.md §1, fixtures/README.md "The two variants").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    /// The paper's equations: live Group Attention med branch, Otsu on the raw image with `>=`.
    #[default]
    Paper,
    /// The authors' released code: Group Attention returns the natural branch only, Otsu on the
    /// normalised input with `>`.
    Released,
}

impl Variant {
    pub fn name(self) -> &'static str {
        match self {
            Variant::Paper => "paper",
            Variant::Released => "released",
        }
    }
    pub fn parse(s: &str) -> Result<Variant> {
        match s {
            "paper" => Ok(Variant::Paper),
            "released" => Ok(Variant::Released),
            o => Err(Error::Config(format!("unknown variant '{o}' (expected paper or released)"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn tiny_json_matches_preset() {
        let text = r#"{"image_size":256,"embed_dims":[32,64,96,128],"depths":[1,1,2,1],
            "num_heads":[1,2,3,4],"window_sizes":[7,7,14,7],"decoder_depth":2,"decoder_mlp_dim":128}"#;
        assert_eq!(Config::from_json(text).unwrap(), Config::tiny());
    }
    #[test]
    fn rejects_bad_configs() {
        assert!(Config::paper().with_image_size(1000).is_err());
        let mut c = Config::paper();
        c.num_heads[2] = 3;
        assert!(c.validate().is_err());
        assert!(Config::from_json("{\"image_size\": 256}").is_err());
    }
}
