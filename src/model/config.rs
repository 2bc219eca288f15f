//! Model configuration: every size is a parameter (docs/model.md). Presets `paper` and `tiny`; JSON in
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

/// Largest input side S.
pub const MAX_IMAGE_SIZE: usize = 16384;
/// Largest channel width (embed_dims, transformer_dim, iou_head_hidden_dim, mask_in_chans) and
/// head count.
pub const MAX_WIDTH: usize = 4096;
/// Largest decoder MLP width.
pub const MAX_MLP_DIM: usize = 65536;
/// Largest mlp_ratio and mbconv_expand_ratio.
pub const MAX_RATIO: usize = 16;
/// Most blocks per stage and decoder layers.
pub const MAX_DEPTH: usize = 64;
/// Largest attention window side (the window kernels hold ws² ≤ 256 keys).
pub const MAX_WINDOW: usize = 16;
/// Most multimask outputs.
pub const MAX_MULTIMASK: usize = 64;
/// Largest classifier head (unused by the model, kept for key compatibility).
pub const MAX_CLASSES: usize = 65536;
/// Most parameters (2^30, 4 GiB as f32; the paper model has 14.5 M).
pub const MAX_PARAMS: u64 = 1 << 30;
/// Largest attention head dimension the kernels support.
pub const MAX_HEAD_DIM: usize = crate::ops::attention::MAX_HEAD_DIM;

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
    /// Size of the (unused) classifier head kept for key compatibility (0: no head, as in
    /// LiteMedSAM's checkpoint).
    #[serde(default = "d1000")]
    pub num_classes: usize,
    /// Which network these sizes describe (default Med-FastSAM; `mobilesam` and `litemedsam` are
    /// SAM with prompts, built from the same blocks without the medical branches).
    #[serde(default, skip_serializing_if = "Arch::is_default")]
    pub arch: Arch,
    /// Stride of the patch embedding: 4 (two 3×3 stride-2 convolutions, TinyViT) or 1 (two 1×1
    /// convolutions, LiteMedSAM). The embedding grid is S / (4 · patch_stride).
    #[serde(default = "d4", skip_serializing_if = "is_four")]
    pub patch_stride: usize,
}

fn is_four(v: &usize) -> bool {
    *v == 4
}

/// The network a configuration describes (docs/model.md, "Architectures").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Arch {
    /// The paper's prompt-free model (LKA-Encoder with the medical branches, CP-Encoder,
    /// MSF-Decoder).
    #[default]
    #[serde(rename = "med-fastsam")]
    MedFastSam,
    /// MobileSAM: TinyViT-5M at 1024², SAM's prompt encoder and mask decoder.
    #[serde(rename = "mobilesam")]
    MobileSam,
    /// LiteMedSAM: the same with a 1×1 patch embedding at 256² (64×64 embedding), box prompts.
    #[serde(rename = "litemedsam")]
    LiteMedSam,
}

impl Arch {
    pub fn is_default(&self) -> bool {
        *self == Arch::MedFastSam
    }
    pub fn name(self) -> &'static str {
        match self {
            Arch::MedFastSam => "med-fastsam",
            Arch::MobileSam => "mobilesam",
            Arch::LiteMedSam => "litemedsam",
        }
    }
    pub fn parse(s: &str) -> Result<Arch> {
        match s {
            "med-fastsam" | "medfastsam" => Ok(Arch::MedFastSam),
            "mobilesam" => Ok(Arch::MobileSam),
            "litemedsam" => Ok(Arch::LiteMedSam),
            o => Err(Error::Config(format!(
                "unknown architecture '{o}' (expected med-fastsam, mobilesam or litemedsam)"
            ))),
        }
    }
    /// Whether the image encoder has the medical branches (`med_qkv`, `mlp_med`, ...) and the
    /// model is prompt-free.
    pub fn is_med_fastsam(self) -> bool {
        self == Arch::MedFastSam
    }
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
            arch: Arch::MedFastSam,
            patch_stride: 4,
        }
    }

    /// MobileSAM (`vit_t`): the paper's sizes without the medical branches, 10,130,092
    /// parameters with TinyViT's unused classifier head.
    pub fn mobilesam() -> Config {
        Config {
            arch: Arch::MobileSam,
            ..Config::paper()
        }
    }

    /// LiteMedSAM: TinyViT-5M widths with a 1×1 patch embedding at 256², no classifier head.
    pub fn litemedsam() -> Config {
        Config {
            arch: Arch::LiteMedSam,
            image_size: 256,
            patch_stride: 1,
            num_classes: 0,
            ..Config::paper()
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
            "mobilesam" => Ok(Config::mobilesam()),
            "litemedsam" => Ok(Config::litemedsam()),
            other => Err(Error::Config(format!(
                "unknown preset '{other}' (expected paper, tiny, mobilesam or litemedsam)"
            ))),
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
        // The file is named once: "configuration: <file>: <problem>".
        Config::from_json(&text).map_err(|e| match e {
            Error::Config(m) => Error::Config(format!("{}: {m}", path.display())),
            other => Error::Config(format!("{}: {other}", path.display())),
        })
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("config serialises")
    }

    /// A copy at another input size (everything else equal).
    pub fn with_image_size(&self, s: usize) -> Result<Config> {
        let c = Config {
            image_size: s,
            ..self.clone()
        };
        c.validate()?;
        Ok(c)
    }

    /// Checks every field, in one place (every way a configuration is made — JSON, presets,
    /// weights metadata, shape inference, `with_image_size` — goes through here): lengths, ranges
    /// (nothing that divides or sizes a tensor may be zero), divisibility, head dimensions the
    /// attention kernels support, upper bounds that keep every tensor size below 2^32 values (the
    /// kernels index with u32, and wasm32's usize is 32 bits), all in checked u64 arithmetic.
    /// Errors name the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        let range = |name: &str, v: usize, lo: usize, hi: usize| -> Result<()> {
            if v < lo || v > hi {
                return bad(format!("{name} is {v}; it must be in {lo}..={hi}"));
            }
            Ok(())
        };
        let s = self.image_size;
        range("image_size", s, 16, MAX_IMAGE_SIZE)?;
        if !s.is_multiple_of(16) {
            return bad(format!("image_size {s} must be a multiple of 16"));
        }
        if self.patch_stride != 4 && self.patch_stride != 1 {
            return bad(format!(
                "patch_stride is {}; it must be 4 (TinyViT) or 1 (LiteMedSAM)",
                self.patch_stride
            ));
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
        for i in 0..4 {
            range(
                &format!("embed_dims[{i}]"),
                self.embed_dims[i],
                1,
                MAX_WIDTH,
            )?;
            // Stage 0 (MBConv blocks) may be empty; every TinyViT stage needs a block.
            range(
                &format!("depths[{i}]"),
                self.depths[i],
                (i > 0) as usize,
                MAX_DEPTH,
            )?;
            range(
                &format!("window_sizes[{i}]"),
                self.window_sizes[i],
                1,
                MAX_WINDOW,
            )?;
            range(&format!("num_heads[{i}]"), self.num_heads[i], 1, MAX_WIDTH)?;
        }
        if !self.embed_dims[0].is_multiple_of(2) {
            return bad(format!(
                "embed_dims[0] {} must be even (the stem's first convolution has half as many channels)",
                self.embed_dims[0]
            ));
        }
        for i in 1..4 {
            let (d, h) = (self.embed_dims[i], self.num_heads[i]);
            if d % h != 0 {
                return bad(format!(
                    "num_heads[{i}] {h} does not divide embed_dims[{i}] {d}"
                ));
            }
            if d / h > MAX_HEAD_DIM {
                return bad(format!(
                    "num_heads[{i}] {h}: head dimension embed_dims[{i}]/num_heads[{i}] = {} exceeds {MAX_HEAD_DIM}",
                    d / h
                ));
            }
        }
        range("mlp_ratio", self.mlp_ratio, 1, MAX_RATIO)?;
        range(
            "mbconv_expand_ratio",
            self.mbconv_expand_ratio,
            1,
            MAX_RATIO,
        )?;
        let dm = self.transformer_dim;
        range("transformer_dim", dm, 8, MAX_WIDTH)?;
        if !dm.is_multiple_of(8) {
            return bad(format!("transformer_dim {dm} must be a multiple of 8"));
        }
        range("decoder_heads", self.decoder_heads, 1, dm / 2)?;
        if !(dm / 2).is_multiple_of(self.decoder_heads) {
            return bad(format!(
                "decoder_heads {} must divide transformer_dim/2 = {} (the cross-attention width)",
                self.decoder_heads,
                dm / 2
            ));
        }
        if dm / self.decoder_heads > MAX_HEAD_DIM {
            return bad(format!(
                "decoder_heads {}: head dimension transformer_dim/decoder_heads = {} exceeds {MAX_HEAD_DIM}",
                self.decoder_heads,
                dm / self.decoder_heads
            ));
        }
        range("decoder_depth", self.decoder_depth, 1, MAX_DEPTH)?;
        range("decoder_mlp_dim", self.decoder_mlp_dim, 1, MAX_MLP_DIM)?;
        range(
            "num_multimask_outputs",
            self.num_multimask_outputs,
            0,
            MAX_MULTIMASK,
        )?;
        range(
            "iou_head_hidden_dim",
            self.iou_head_hidden_dim,
            1,
            MAX_WIDTH,
        )?;
        range("mask_in_chans", self.mask_in_chans, 4, MAX_WIDTH)?;
        if !self.mask_in_chans.is_multiple_of(4) {
            return bad(format!(
                "mask_in_chans {} must be a multiple of 4",
                self.mask_in_chans
            ));
        }
        range("num_classes", self.num_classes, 0, MAX_CLASSES)?;

        // Sizes derived from the fields, in u64 with checked products: the largest per-image
        // feature map and the parameter count.
        let prod = |f: &[usize]| -> Option<u64> {
            f.iter().try_fold(1u64, |a, &v| a.checked_mul(v as u64))
        };
        let e = &self.embed_dims;
        let (r4, r8, r16) = (self.stage_res(0), self.stage_res(1), self.stage_res(2));
        let stem = s / (self.patch_stride / 2).max(1);
        let maps: [(&str, &str, Option<u64>); 6] = [
            (
                "image_size",
                "the full-resolution logits (S²)",
                prod(&[s, s]),
            ),
            (
                "image_size",
                "the stem's output (S/2 or S squared × embed_dims[0]/2)",
                prod(&[stem, stem, e[0] / 2]),
            ),
            (
                "mbconv_expand_ratio",
                "stage 0's MBConv hidden map (stage 0's resolution squared × embed_dims[0] × mbconv_expand_ratio)",
                prod(&[r4, r4, e[0], self.mbconv_expand_ratio]),
            ),
            (
                "embed_dims",
                "stage 1's qkv or MLP hidden map (stage 1's resolution squared × embed_dims[1] × max(3, mlp_ratio))",
                prod(&[r8, r8, e[1], self.mlp_ratio.max(3)]),
            ),
            (
                "embed_dims",
                "stage 2-3's qkv or MLP hidden map (the grid squared × max(embed_dims[2..4]) × max(3, mlp_ratio))",
                prod(&[r16, r16, e[2].max(e[3]), self.mlp_ratio.max(3)]),
            ),
            (
                "transformer_dim",
                "the decoder's upscaled map ((4 × grid)² × transformer_dim/4)",
                prod(&[self.lowres(), self.lowres(), dm / 4]),
            ),
        ];
        for (field, what, n) in maps {
            match n {
                Some(n) if n <= u32::MAX as u64 => {}
                _ => {
                    return bad(format!(
                        "{field}: with image_size {s}, {what} has {} values, above the 2^32 - 1 a tensor may hold",
                        n.map_or("more than 2^64".to_string(), |n| n.to_string())
                    ));
                }
            }
        }
        let params = super::schema::specs(self)
            .iter()
            .try_fold(0u64, |a, sp| prod(&sp.shape).and_then(|n| a.checked_add(n)));
        match params {
            Some(n) if n <= MAX_PARAMS => Ok(()),
            n => bad(format!(
                "the configuration has {} parameters, above the maximum {MAX_PARAMS} (check embed_dims, \
                 depths, decoder_mlp_dim, num_classes)",
                n.map_or("more than 2^64".to_string(), |n| n.to_string())
            )),
        }
    }

    /// Side of the token grid (S/16; S/4 with a stride-1 patch embedding) = embedding and
    /// dense-prompt resolution.
    pub fn grid(&self) -> usize {
        self.image_size / (4 * self.patch_stride)
    }
    /// Side of the low-resolution mask (4 × grid).
    pub fn lowres(&self) -> usize {
        4 * self.grid()
    }
    /// Resolution at the input of stage `s` (0..4): S/p, S/2p, S/4p, S/4p for patch stride p.
    pub fn stage_res(&self, s: usize) -> usize {
        let r0 = self.image_size / self.patch_stride;
        match s {
            0 => r0,
            1 => r0 / 2,
            _ => r0 / 4,
        }
    }
    pub fn num_mask_tokens(&self) -> usize {
        self.num_multimask_outputs + 1
    }
}

/// Which forward the model computes (docs/model.md, "Group Attention and the two variants").
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
            o => Err(Error::Config(format!(
                "unknown variant '{o}' (expected paper or released)"
            ))),
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
