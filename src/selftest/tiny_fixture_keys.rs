// Included by build.rs (which embeds these gradients of the tiny fixture) and src/selftest.rs.

/// The parameters whose gradients the self-test's training-step check compares: encoder (convolution, BatchNorm,
/// MBConv, window attention and its biases, MLP, neck), the multi-scale features (MSF), the prompt
/// encoder and the mask decoder (two-way transformer, transposed convolution, hypernetwork MLP).
pub const TINY_TRAIN_GRADS: &[&str] = &[
    "image_encoder.patch_embed.seq.0.c.weight",
    "image_encoder.patch_embed.seq.0.bn.weight",
    "image_encoder.layers.0.blocks.0.conv1.c.weight",
    "image_encoder.layers.1.blocks.0.local_conv.c.weight",
    "image_encoder.layers.1.blocks.0.attn.qkv.weight",
    "image_encoder.layers.1.blocks.0.attn.attention_biases",
    "image_encoder.layers.1.blocks.0.attn.attention_biases_med",
    "image_encoder.layers.2.blocks.1.attn.med_qkv.weight",
    "image_encoder.layers.2.blocks.1.attn.proj.weight",
    "image_encoder.layers.3.blocks.0.mlp.fc2.weight",
    "image_encoder.neck.0.weight",
    "image_encoder.neck.1.weight",
    "conv1_med.features1.0.weight",
    "conv1_med.features2.0.weight",
    "prompt_encoder.mask_downscaling.0.weight",
    "mask_decoder.transformer.layers.0.self_attn.q_proj.weight",
    "mask_decoder.transformer.final_attn_token_to_image.v_proj.weight",
    "mask_decoder.output_upscaling_part1.0.weight",
    "mask_decoder.output_hypernetworks_mlps.0.layers.0.weight",
    "mask_decoder.concat_conv1.0.weight",
];
