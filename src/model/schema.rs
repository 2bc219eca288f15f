//! The state_dict schema: every key of the authors' `TinySAM` with its shape, derived from the
//! configuration (docs/model.md, "Weights and key names"). Used to validate weight files, initialise
//! new models, count parameters per module and decide what `semi` training freezes.

use super::config::Config;

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

struct B(Vec<Spec>);

impl B {
    fn p(&mut self, key: impl Into<String>, shape: &[usize]) {
        self.0.push(Spec { key: key.into(), shape: shape.to_vec(), kind: Kind::Param });
    }
    fn linear(&mut self, pre: &str, out: usize, inp: usize) {
        self.p(format!("{pre}.weight"), &[out, inp]);
        self.p(format!("{pre}.bias"), &[out]);
    }
    fn norm(&mut self, pre: &str, c: usize) {
        self.p(format!("{pre}.weight"), &[c]);
        self.p(format!("{pre}.bias"), &[c]);
    }
    /// TinyViT Conv2d_BN: conv without bias + BatchNorm2d.
    fn conv_bn(&mut self, pre: &str, out: usize, in_per_group: usize, k: usize) {
        self.p(format!("{pre}.c.weight"), &[out, in_per_group, k, k]);
        self.p(format!("{pre}.bn.weight"), &[out]);
        self.p(format!("{pre}.bn.bias"), &[out]);
        for s in ["running_mean", "running_var"] {
            self.0.push(Spec { key: format!("{pre}.bn.{s}"), shape: vec![out], kind: Kind::RunningStat });
        }
        self.0.push(Spec { key: format!("{pre}.bn.num_batches_tracked"), shape: vec![], kind: Kind::Counter });
    }
    fn conv(&mut self, pre: &str, out: usize, inp: usize, k: usize, bias: bool) {
        self.p(format!("{pre}.weight"), &[out, inp, k, k]);
        if bias {
            self.p(format!("{pre}.bias"), &[out]);
        }
    }
    fn sam_attention(&mut self, pre: &str, d: usize, inner: usize) {
        for n in ["q_proj", "k_proj", "v_proj"] {
            self.linear(&format!("{pre}.{n}"), inner, d);
        }
        self.linear(&format!("{pre}.out_proj"), d, inner);
    }
    fn mlp(&mut self, pre: &str, dims: &[usize]) {
        for (i, w) in dims.windows(2).enumerate() {
            self.linear(&format!("{pre}.layers.{i}"), w[1], w[0]);
        }
    }
}

/// Every state_dict entry for `cfg`, in module order.
pub fn specs(cfg: &Config) -> Vec<Spec> {
    let mut b = B(Vec::new());
    let e = &cfg.embed_dims;
    let ie = "image_encoder";
    // Stem (PatchEmbed): 3 -> C0/2 -> C0, both 3x3 stride 2.
    b.conv_bn(&format!("{ie}.patch_embed.seq.0"), e[0] / 2, 3, 3);
    b.conv_bn(&format!("{ie}.patch_embed.seq.2"), e[0], e[0] / 2, 3);
    for s in 0..4 {
        let d = e[s];
        let pre = format!("{ie}.layers.{s}");
        for blk in 0..cfg.depths[s] {
            let p = format!("{pre}.blocks.{blk}");
            if s == 0 {
                let h = d * cfg.mbconv_expand_ratio;
                b.conv_bn(&format!("{p}.conv1"), h, d, 1);
                b.conv_bn(&format!("{p}.conv2"), h, 1, 3);
                b.conv_bn(&format!("{p}.conv3"), d, h, 1);
            } else {
                let (heads, ws) = (cfg.num_heads[s], cfg.window_sizes[s]);
                b.p(format!("{p}.attn.attention_biases"), &[heads, ws * ws]);
                b.p(format!("{p}.attn.attention_biases_med"), &[heads, ws * ws]);
                b.norm(&format!("{p}.attn.norm"), d);
                b.linear(&format!("{p}.attn.qkv"), 3 * d, d);
                b.linear(&format!("{p}.attn.proj"), d, d);
                b.linear(&format!("{p}.attn.med_qkv"), 3 * d, d);
                for m in ["mlp", "mlp_med"] {
                    b.norm(&format!("{p}.{m}.norm"), d);
                    b.linear(&format!("{p}.{m}.fc1"), cfg.mlp_ratio * d, d);
                    b.linear(&format!("{p}.{m}.fc2"), d, cfg.mlp_ratio * d);
                }
                b.conv_bn(&format!("{p}.local_conv"), d, 1, 3);
            }
        }
        if s < 3 {
            let o = e[s + 1];
            b.conv_bn(&format!("{pre}.downsample.conv1"), o, d, 1);
            b.conv_bn(&format!("{pre}.downsample.conv2"), o, 1, 3);
            b.conv_bn(&format!("{pre}.downsample.conv3"), o, o, 1);
        }
    }
    let dm = cfg.transformer_dim;
    b.norm(&format!("{ie}.norm_head"), e[3]);
    b.linear(&format!("{ie}.head"), cfg.num_classes, e[3]);
    b.conv(&format!("{ie}.neck.0"), dm, e[3], 1, false);
    b.norm(&format!("{ie}.neck.1"), dm);
    b.conv(&format!("{ie}.neck.2"), dm, dm, 3, false);
    b.norm(&format!("{ie}.neck.3"), dm);

    let pe = "prompt_encoder";
    b.0.push(Spec {
        key: format!("{pe}.pe_layer.positional_encoding_gaussian_matrix"),
        shape: vec![2, dm / 2],
        kind: Kind::Buffer,
    });
    for i in 0..4 {
        b.p(format!("{pe}.point_embeddings.{i}.weight"), &[1, dm]);
    }
    b.p(format!("{pe}.not_a_point_embed.weight"), &[1, dm]);
    let mic = cfg.mask_in_chans;
    b.conv(&format!("{pe}.mask_downscaling.0"), mic / 4, 1, 2, true);
    b.norm(&format!("{pe}.mask_downscaling.1"), mic / 4);
    b.conv(&format!("{pe}.mask_downscaling.3"), mic, mic / 4, 2, true);
    b.norm(&format!("{pe}.mask_downscaling.4"), mic);
    b.conv(&format!("{pe}.mask_downscaling.6"), dm, mic, 1, true);
    b.p(format!("{pe}.no_mask_embed.weight"), &[1, dm]);

    let md = "mask_decoder";
    let t = format!("{md}.transformer");
    for l in 0..cfg.decoder_depth {
        let p = format!("{t}.layers.{l}");
        b.sam_attention(&format!("{p}.self_attn"), dm, dm);
        b.norm(&format!("{p}.norm1"), dm);
        b.sam_attention(&format!("{p}.cross_attn_token_to_image"), dm, dm / 2);
        b.norm(&format!("{p}.norm2"), dm);
        b.linear(&format!("{p}.mlp.lin1"), cfg.decoder_mlp_dim, dm);
        b.linear(&format!("{p}.mlp.lin2"), dm, cfg.decoder_mlp_dim);
        b.norm(&format!("{p}.norm3"), dm);
        b.norm(&format!("{p}.norm4"), dm);
        b.sam_attention(&format!("{p}.cross_attn_image_to_token"), dm, dm / 2);
    }
    b.sam_attention(&format!("{t}.final_attn_token_to_image"), dm, dm / 2);
    b.norm(&format!("{t}.norm_final_attn"), dm);
    let nt = cfg.num_mask_tokens();
    b.p(format!("{md}.iou_token.weight"), &[1, dm]);
    b.p(format!("{md}.mask_tokens.weight"), &[nt, dm]);
    // ConvTranspose weights are [in, out, k, k].
    b.p(format!("{md}.output_upscaling_part1.0.weight"), &[dm, dm / 4, 2, 2]);
    b.p(format!("{md}.output_upscaling_part1.0.bias"), &[dm / 4]);
    b.norm(&format!("{md}.output_upscaling_part1.1"), dm / 4);
    b.conv(&format!("{md}.concat_conv1.0"), dm / 4, dm / 4 + dm / 4, 1, true);
    b.conv(&format!("{md}.concat_conv2.0"), dm / 8, dm / 8 + dm / 8, 1, true);
    b.p(format!("{md}.output_upscaling_part2.0.weight"), &[dm / 4, dm / 8, 2, 2]);
    b.p(format!("{md}.output_upscaling_part2.0.bias"), &[dm / 8]);
    for k in 0..nt {
        b.mlp(&format!("{md}.output_hypernetworks_mlps.{k}"), &[dm, dm, dm, dm / 8]);
    }
    let ih = cfg.iou_head_hidden_dim;
    b.mlp(&format!("{md}.iou_prediction_head"), &[dm, ih, ih, nt]);

    b.conv("conv1_med.features1.0", dm / 8, 3, 4, true);
    b.norm("conv1_med.features1.1", dm / 8);
    b.conv("conv1_med.features2.0", dm / 4, dm / 8, 2, true);
    b.norm("conv1_med.features2.1", dm / 4);
    b.0
}

/// Number of trainable parameters (buffers excluded).
pub fn param_count(cfg: &Config) -> usize {
    specs(cfg).iter().filter(|s| s.kind == Kind::Param).map(|s| s.numel()).sum()
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
        let natural: usize =
            sp.iter().filter(|s| s.kind == Kind::Param && s.is_natural_branch()).map(|s| s.numel()).sum();
        // Tuned parameters under the natural-branch rule (docs/training.md, "Modes").
        assert_eq!(param_count(&c) - natural, 8_413_572);
    }
}
