"""Med-FastSAM in plain PyTorch (CPU), written for this project as an independent peer.

It is defined from the facts of the authors' code that docs/model.md and docs/fixtures.md
record, and mirrors the semantics of our Rust model (src/model/*.rs). Parameter names are the
authors' state_dict keys, so a fixture's weights load with strict key checking and
``torch.save(model.state_dict())`` gives an ordinary checkpoint.

    model = build(config_dict, "paper")         # or "released"
    load_weights(model, "tiny.weights.safetensors")
    logits = model(images_u8)                   # (B, S, S, 3) uint8 RGB -> (B, 1, S, S) logits
    total, focal, dice = loss(logits, target_u8)

Only torch and numpy are used; safetensors files are read and written by the small helpers below.
"""

from __future__ import annotations

import json
import math
import struct
from collections import OrderedDict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

VARIANTS = ("paper", "released")

# ImageNet normalisation on 0..255 values (SAM's pixel_mean / pixel_std).
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
# ITU-R 601 grey weights used by the authors' Otsu.
GREY_WEIGHTS = (0.2989, 0.5870, 0.1140)

LN_EPS = 1e-5  # token LayerNorm (TinyViT attention/MLP, two-way transformer)
LN2D_EPS = 1e-6  # channel LayerNorm of feature maps (SAM's LayerNorm2d)


# --------------------------------------------------------------------------- configuration

DEFAULTS = {
    "transformer_dim": 256,
    "decoder_heads": 8,
    "mlp_ratio": 4,
    "mbconv_expand_ratio": 4,
    "num_multimask_outputs": 3,
    "iou_head_hidden_dim": 256,
    "mask_in_chans": 16,
    "num_classes": 1000,
}

PAPER_CONFIG = {
    "image_size": 1024,
    "embed_dims": [64, 128, 160, 320],
    "depths": [2, 2, 6, 2],
    "num_heads": [2, 4, 5, 10],
    "window_sizes": [7, 7, 14, 7],
    "decoder_depth": 2,
    "decoder_mlp_dim": 2048,
}

TINY_CONFIG = {
    "image_size": 256,
    "embed_dims": [32, 64, 96, 128],
    "depths": [1, 1, 2, 1],
    "num_heads": [1, 2, 3, 4],
    "window_sizes": [7, 7, 14, 7],
    "decoder_depth": 2,
    "decoder_mlp_dim": 128,
}


def full_config(config: dict) -> dict:
    """The configuration with every optional field filled in, after basic checks."""
    cfg = dict(DEFAULTS)
    cfg.update(config)
    if cfg.get("arch", "med-fastsam") not in ("med-fastsam", "medfastsam"):
        raise ValueError(f"only the med-fastsam architecture is defined here, not {cfg['arch']!r}")
    if cfg.get("patch_stride", 4) != 4:
        raise ValueError("only patch_stride 4 (TinyViT's stem) is defined here")
    for k in ("embed_dims", "depths", "num_heads", "window_sizes"):
        if len(cfg[k]) != 4:
            raise ValueError(f"{k} must have 4 entries")
    if cfg["image_size"] % 16:
        raise ValueError("image_size must be a multiple of 16")
    for s in range(1, 4):
        if cfg["embed_dims"][s] % cfg["num_heads"][s]:
            raise ValueError(f"num_heads[{s}] must divide embed_dims[{s}]")
    return cfg


# --------------------------------------------------------------------------- small blocks


class Conv2dBN(nn.Sequential):
    """A bias-free convolution followed by BatchNorm (TinyViT's Conv2d_BN: keys ``c`` and ``bn``)."""

    def __init__(self, cin, cout, k=1, stride=1, pad=0, groups=1):
        super().__init__()
        self.add_module("c", nn.Conv2d(cin, cout, k, stride, pad, groups=groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(cout, eps=1e-5, momentum=0.1))


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of an NCHW map, at every pixel (biased variance)."""

    def __init__(self, channels, eps=LN2D_EPS):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x):
        mu = x.mean(1, keepdim=True)
        var = (x - mu).pow(2).mean(1, keepdim=True)
        x = (x - mu) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


# --------------------------------------------------------------------------- LKA-Encoder


class PatchEmbed(nn.Module):
    """Stem: two 3x3 stride-2 Conv2d_BN with a GELU between them (S -> S/4)."""

    def __init__(self, c0):
        super().__init__()
        self.seq = nn.Sequential(
            Conv2dBN(3, c0 // 2, 3, 2, 1), nn.GELU(), Conv2dBN(c0 // 2, c0, 3, 2, 1)
        )

    def forward(self, x):
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, depthwise 3x3, 1x1 project; the last GELU follows the add."""

    def __init__(self, d, hidden):
        super().__init__()
        self.conv1 = Conv2dBN(d, hidden)
        self.conv2 = Conv2dBN(hidden, hidden, 3, 1, 1, groups=hidden)
        self.conv3 = Conv2dBN(hidden, d)

    def forward(self, x):
        h = F.gelu(self.conv1(x))
        h = F.gelu(self.conv2(h))
        return F.gelu(x + self.conv3(h))


class PatchMerging(nn.Module):
    """1x1 conv, depthwise 3x3 (stride 2, or 1 into the last stage), 1x1 conv; returns tokens."""

    def __init__(self, d, out, stride, res):
        super().__init__()
        self.res = res  # input resolution (square)
        self.conv1 = Conv2dBN(d, out)
        self.conv2 = Conv2dBN(out, out, 3, stride, 1, groups=out)
        self.conv3 = Conv2dBN(out, out)

    def forward(self, x):
        if x.dim() == 3:  # tokens (B, L, C) -> NCHW
            b = x.shape[0]
            x = x.view(b, self.res, self.res, -1).permute(0, 3, 1, 2)
        x = F.gelu(self.conv1(x))
        x = F.gelu(self.conv2(x))
        x = self.conv3(x)
        return x.flatten(2).transpose(1, 2)


class ConvStage(nn.Module):
    """Stage 0: MBConv blocks on the NCHW map, then patch merging to tokens."""

    def __init__(self, cfg):
        super().__init__()
        d = cfg["embed_dims"][0]
        res = cfg["image_size"] // 4
        self.blocks = nn.ModuleList(
            MBConv(d, d * cfg["mbconv_expand_ratio"]) for _ in range(cfg["depths"][0])
        )
        self.downsample = PatchMerging(d, cfg["embed_dims"][1], 2, res)

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x)


class GroupAttention(nn.Module):
    """Windowed multi-head attention with a learned relative bias and the medical branch.

    The input is a batch of windows (Bw, ws*ws, d). Both branches share ``norm`` and ``proj``.
    ``released``: proj(MHA_nat(LN x)). ``paper``: with x_nat = proj(MHA_nat(LN x)),
    proj(x_nat + MHA_med(x_nat + LN x)), the med branch using ``attention_biases_med``.
    The q/k/v channels are grouped per head: head h owns [h*3*kd, (h+1)*3*kd) as q | k | v.
    """

    def __init__(self, d, heads, ws, variant):
        super().__init__()
        self.heads, self.ws, self.variant = heads, ws, variant
        self.kd = d // heads
        self.scale = self.kd ** -0.5
        n = ws * ws
        self.attention_biases = nn.Parameter(torch.zeros(heads, n))
        self.attention_biases_med = nn.Parameter(torch.zeros(heads, n))
        self.norm = nn.LayerNorm(d, eps=LN_EPS)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.med_qkv = nn.Linear(d, 3 * d)
        # Bias index of a token pair: |row difference| * ws + |column difference|.
        r = torch.arange(ws).repeat_interleave(ws)
        c = torch.arange(ws).repeat(ws)
        idx = (r[:, None] - r[None, :]).abs() * ws + (c[:, None] - c[None, :]).abs()
        self.register_buffer("bias_idxs", idx, persistent=False)

    def _mha(self, qkv, biases):
        bw, n, _ = qkv.shape
        qkv = qkv.view(bw, n, self.heads, 3 * self.kd)
        q, k, v = qkv.split([self.kd, self.kd, self.kd], dim=3)
        q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))
        logits = (q @ k.transpose(-2, -1)) * self.scale + biases[:, self.bias_idxs]
        a = logits.softmax(dim=-1) @ v
        return a.transpose(1, 2).reshape(bw, n, self.heads * self.kd)

    def forward(self, xw):
        u = self.norm(xw)
        x_nat = self.proj(self._mha(self.qkv(u), self.attention_biases))
        if self.variant == "released":
            return x_nat
        a_med = self._mha(self.med_qkv(x_nat + u), self.attention_biases_med)
        return self.proj(x_nat + a_med)


class Mlp(nn.Module):
    """Pre-LayerNorm MLP d -> r*d -> d with an exact GELU (no residual here)."""

    def __init__(self, d, hidden):
        super().__init__()
        self.norm = nn.LayerNorm(d, eps=LN_EPS)
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """Group Attention on zero-padded windows (padding neither masked nor kept), residual;
    depthwise 3x3 Conv2d_BN (no residual); then the Hybrid Expert Head, applied in sequence:
    x += MLP_nat(x); x += MLP_med(x)."""

    def __init__(self, cfg, s, variant):
        super().__init__()
        d = cfg["embed_dims"][s]
        self.ws = cfg["window_sizes"][s]
        self.attn = GroupAttention(d, cfg["num_heads"][s], self.ws, variant)
        self.mlp = Mlp(d, cfg["mlp_ratio"] * d)
        self.mlp_med = Mlp(d, cfg["mlp_ratio"] * d)
        self.local_conv = Conv2dBN(d, d, 3, 1, 1, groups=d)

    def forward(self, x, res):
        b, n, c = x.shape
        ws = self.ws
        pad = (ws - res % ws) % ws
        hp = res + pad
        nw = hp // ws
        xs = F.pad(x.view(b, res, res, c), (0, 0, 0, pad, 0, pad))
        xw = xs.view(b, nw, ws, nw, ws, c).transpose(2, 3).reshape(b * nw * nw, ws * ws, c)
        y = self.attn(xw)
        y = y.view(b, nw, nw, ws, ws, c).transpose(2, 3).reshape(b, hp, hp, c)
        x = x + y[:, :res, :res].reshape(b, n, c)
        x = self.local_conv(x.transpose(1, 2).reshape(b, c, res, res))
        x = x.view(b, c, n).transpose(1, 2)
        x = x + self.mlp(x)
        return x + self.mlp_med(x)


class VitStage(nn.Module):
    """Stages 1-3: TinyViT blocks on tokens, then patch merging (none after stage 3)."""

    def __init__(self, cfg, s, variant):
        super().__init__()
        self.res = cfg["image_size"] // (8 if s == 1 else 16)
        self.blocks = nn.ModuleList(TinyViTBlock(cfg, s, variant) for _ in range(cfg["depths"][s]))
        if s < 3:
            stride = 1 if s == 2 else 2  # the last merge keeps the resolution
            self.downsample = PatchMerging(cfg["embed_dims"][s], cfg["embed_dims"][s + 1], stride, self.res)
        else:
            self.downsample = None

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x, self.res)
        return x if self.downsample is None else self.downsample(x)


class LKAEncoder(nn.Module):
    """TinyViT-5M-shaped encoder with Group Attention and the Hybrid Expert Head, plus SAM's neck.
    ``norm_head``/``head`` (the classifier) are kept for the key set but never called."""

    def __init__(self, cfg, variant):
        super().__init__()
        e = cfg["embed_dims"]
        dm = cfg["transformer_dim"]
        self.grid = cfg["image_size"] // 16
        self.patch_embed = PatchEmbed(e[0])
        self.layers = nn.ModuleList([ConvStage(cfg)] + [VitStage(cfg, s, variant) for s in (1, 2, 3)])
        self.norm_head = nn.LayerNorm(e[3])
        self.head = nn.Linear(e[3], cfg["num_classes"]) if cfg["num_classes"] > 0 else nn.Identity()
        self.neck = nn.Sequential(
            nn.Conv2d(e[3], dm, 1, bias=False),
            LayerNorm2d(dm),
            nn.Conv2d(dm, dm, 3, padding=1, bias=False),
            LayerNorm2d(dm),
        )

    def neck_forward(self, tokens):
        b, _, c = tokens.shape
        x = tokens.view(b, self.grid, self.grid, c).permute(0, 3, 1, 2)
        return self.neck(x)

    def forward(self, x, capture=None):
        x = self.patch_embed(x)
        if capture is not None:
            capture["encoder.patch_embed"] = x.detach()
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if capture is not None:
                capture[f"encoder.layers.{i}"] = x.detach()
        return self.neck_forward(x)


# --------------------------------------------------------------------------- CP-Encoder


class PositionEmbeddingRandom(nn.Module):
    """SAM's random-Fourier position encoding; the 2 x D/2 Gaussian matrix is a saved buffer."""

    def __init__(self, half):
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(2, half))

    def dense(self, h, w):
        """(D, h, w) encoding of the cell centres of an h x w grid."""
        g = self.positional_encoding_gaussian_matrix
        ys = (torch.arange(h, dtype=g.dtype) + 0.5) / h
        xs = (torch.arange(w, dtype=g.dtype) + 0.5) / w
        coords = torch.stack(torch.broadcast_tensors(xs[None, :], ys[:, None]), dim=-1)  # (h,w,2): x, y
        z = 2 * math.pi * ((2 * coords - 1) @ g)
        return torch.cat([torch.sin(z), torch.cos(z)], dim=-1).permute(2, 0, 1)


class CPEncoder(nn.Module):
    """SAM's prompt encoder as Med-FastSAM uses it: only the dense path (``mask_downscaling``)
    turns the low-resolution Otsu mask into a dense prompt. The point/box/no-mask embeddings
    are kept for the key set and never used."""

    def __init__(self, cfg):
        super().__init__()
        dm, mic = cfg["transformer_dim"], cfg["mask_in_chans"]
        self.pe_layer = PositionEmbeddingRandom(dm // 2)
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, dm) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, dm)
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mic // 4, 2, 2),
            LayerNorm2d(mic // 4),
            nn.GELU(),
            nn.Conv2d(mic // 4, mic, 2, 2),
            LayerNorm2d(mic),
            nn.GELU(),
            nn.Conv2d(mic, dm, 1),
        )
        self.no_mask_embed = nn.Embedding(1, dm)

    def forward(self, mask_lowres):
        return self.mask_downscaling(mask_lowres)


def grey_for_otsu(images_u8, variant):
    """Grey image (B, H, W) in float64 on which the variant's Otsu runs.

    paper: (0.2989 R + 0.5870 G + 0.1140 B) / 255 of the raw pixels.
    released: the same weights applied to the ImageNet-normalised channels."""
    x = images_u8.to(torch.float64)
    w = torch.tensor(GREY_WEIGHTS, dtype=torch.float64)
    if variant == "paper":
        return (x * w).sum(-1) / 255.0
    mean = torch.tensor(PIXEL_MEAN, dtype=torch.float64)
    std = torch.tensor(PIXEL_STD, dtype=torch.float64)
    return (((x - mean) / std) * w).sum(-1)


def otsu_index(grey):
    """Otsu's t* (0..255) of one grey image: a 256-bin histogram of the values inside [0, 1]
    (others ignored; 1.0 goes to the last bin), between-class variance
    (mu_T w - mu)^2 / (w (1 - w) + 1e-8), first maximum. 0 when no value is in range."""
    g = grey.reshape(-1)
    g = g[(g >= 0) & (g <= 1)]
    if g.numel() == 0:
        return 0
    bins = torch.floor(g * 256).clamp(max=255).long()
    hist = torch.bincount(bins, minlength=256).to(torch.float64)
    p = hist / hist.sum()
    omega = torch.cumsum(p, 0)
    mu = torch.cumsum(p * torch.arange(256, dtype=torch.float64), 0)
    sigma = (mu[-1] * omega - mu) ** 2 / (omega * (1 - omega) + 1e-8)
    return int(torch.argmax(sigma))


class OtsuPrompt(nn.Module):
    """The CP-Encoder's coarse prompt: per image Otsu threshold t*/255 and the binary mask
    (paper: grey >= t, released: grey > t). Computed in float64 from the u8 pixels whatever the
    model's dtype; it is not differentiated (as in the reference)."""

    def __init__(self, variant):
        super().__init__()
        self.variant = variant

    @torch.no_grad()
    def forward(self, images_u8):
        grey = grey_for_otsu(images_u8, self.variant)
        t = torch.tensor([otsu_index(gi) / 255.0 for gi in grey], dtype=torch.float64)
        tt = t[:, None, None]
        mask = grey >= tt if self.variant == "paper" else grey > tt
        return t, mask[:, None]


# --------------------------------------------------------------------------- MSF-Decoder


class MSFFeatures(nn.Module):
    """Multi-scale patch embeddings (``conv1_med``): r2 = GELU(LN2d(conv k4 s4)(x)) at S/4 and
    r1 = GELU(LN2d(conv k2 s2)(r2)) at S/8."""

    def __init__(self, cfg):
        super().__init__()
        dm = cfg["transformer_dim"]
        self.features1 = nn.Sequential(nn.Conv2d(3, dm // 8, 4, 4), LayerNorm2d(dm // 8), nn.GELU())
        self.features2 = nn.Sequential(nn.Conv2d(dm // 8, dm // 4, 2, 2), LayerNorm2d(dm // 4), nn.GELU())

    def forward(self, x):
        r2 = self.features1(x)
        return r2, self.features2(r2)


class SamAttention(nn.Module):
    """SAM's attention: q/k/v projections to ``inner`` channels, contiguous heads, out projection."""

    def __init__(self, d, heads, downsample=1):
        super().__init__()
        inner = d // downsample
        self.heads = heads
        self.q_proj = nn.Linear(d, inner)
        self.k_proj = nn.Linear(d, inner)
        self.v_proj = nn.Linear(d, inner)
        self.out_proj = nn.Linear(inner, d)

    def _split(self, x):
        b, n, c = x.shape
        return x.reshape(b, n, self.heads, c // self.heads).transpose(1, 2)

    def forward(self, q, k, v):
        q, k, v = self._split(self.q_proj(q)), self._split(self.k_proj(k)), self._split(self.v_proj(v))
        a = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        o = a.softmax(dim=-1) @ v
        b, h, n, c = o.shape
        return self.out_proj(o.transpose(1, 2).reshape(b, n, h * c))


class MLPBlock(nn.Module):
    """Linear, ReLU, Linear (the two-way transformer's MLP)."""

    def __init__(self, d, hidden):
        super().__init__()
        self.lin1 = nn.Linear(d, hidden)
        self.lin2 = nn.Linear(hidden, d)

    def forward(self, x):
        return self.lin2(F.relu(self.lin1(x)))


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, token->image cross-attention, token MLP, image->token cross-attention,
    each followed by a residual add and LayerNorm (the first layer's self-attention replaces the
    tokens and sees no position encoding)."""

    def __init__(self, d, heads, mlp_dim, skip_first_layer_pe):
        super().__init__()
        self.self_attn = SamAttention(d, heads)
        self.norm1 = nn.LayerNorm(d, eps=LN_EPS)
        self.cross_attn_token_to_image = SamAttention(d, heads, 2)
        self.norm2 = nn.LayerNorm(d, eps=LN_EPS)
        self.mlp = MLPBlock(d, mlp_dim)
        self.norm3 = nn.LayerNorm(d, eps=LN_EPS)
        self.norm4 = nn.LayerNorm(d, eps=LN_EPS)
        self.cross_attn_image_to_token = SamAttention(d, heads, 2)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries, keys, query_pe, key_pe):
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    """SAM's two-way transformer between the output tokens and the image tokens."""

    def __init__(self, depth, d, heads, mlp_dim):
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(d, heads, mlp_dim, skip_first_layer_pe=(i == 0)) for i in range(depth)
        )
        self.final_attn_token_to_image = SamAttention(d, heads, 2)
        self.norm_final_attn = nn.LayerNorm(d, eps=LN_EPS)

    def forward(self, image, image_pe, tokens):
        """image (B, D, h, w), image_pe (B, D, h, w), tokens (B, T, D) -> (tokens, image tokens)."""
        keys = image.flatten(2).permute(0, 2, 1)
        key_pe = image_pe.flatten(2).permute(0, 2, 1)
        queries = tokens
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, key_pe)
        q, k = queries + tokens, keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys


class HyperMLP(nn.Module):
    """A stack of Linear layers with ReLU between them (SAM's MLP; keys ``layers.{i}``)."""

    def __init__(self, din, hidden, dout, n):
        super().__init__()
        dims = [din] + [hidden] * (n - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:] + [dout]))

    def forward(self, x):
        for i, lin in enumerate(self.layers):
            x = lin(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class MSFDecoder(nn.Module):
    """SAM's mask decoder with the multi-scale fusion: two-way transformer, then
    ConvT -> LN2d -> GELU, concat r1, 1x1 conv, ConvT -> GELU, concat r2, 1x1 conv, and the
    first mask token's hypernetwork dotted with the features. The IoU head and the other
    hypernetworks do not reach the output and are not evaluated."""

    def __init__(self, cfg):
        super().__init__()
        dm = cfg["transformer_dim"]
        nt = cfg["num_multimask_outputs"] + 1
        self.transformer = TwoWayTransformer(cfg["decoder_depth"], dm, cfg["decoder_heads"], cfg["decoder_mlp_dim"])
        self.iou_token = nn.Embedding(1, dm)
        self.mask_tokens = nn.Embedding(nt, dm)
        self.output_upscaling_part1 = nn.Sequential(
            nn.ConvTranspose2d(dm, dm // 4, 2, 2), LayerNorm2d(dm // 4), nn.GELU()
        )
        self.concat_conv1 = nn.Sequential(nn.Conv2d(dm // 2, dm // 4, 1))
        self.concat_conv2 = nn.Sequential(nn.Conv2d(dm // 4, dm // 8, 1))
        self.output_upscaling_part2 = nn.Sequential(nn.ConvTranspose2d(dm // 4, dm // 8, 2, 2), nn.GELU())
        self.output_hypernetworks_mlps = nn.ModuleList(HyperMLP(dm, dm, dm // 8, 3) for _ in range(nt))
        self.iou_prediction_head = HyperMLP(dm, cfg["iou_head_hidden_dim"], nt, 3)

    def two_way(self, embedding, dense, pe):
        """(B, D, g, g) embedding + dense prompt, (D, g, g) PE -> tokens (B, T, D), image (B, D, g, g)."""
        b, d, h, w = embedding.shape
        tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], 0)
        tokens = tokens.unsqueeze(0).expand(b, -1, -1)
        pe = pe.unsqueeze(0).expand(b, -1, -1, -1)
        hs, keys = self.transformer(embedding + dense, pe, tokens)
        return hs, keys.transpose(1, 2).reshape(b, d, h, w)

    def mask_head(self, hs, image, r1, r2):
        """Low-resolution logits (B, 1, 4g, 4g) from the transformer outputs and (r1, r2)."""
        u = self.output_upscaling_part1(image)
        u = self.concat_conv1(torch.cat([u, r1], 1))
        u = self.output_upscaling_part2(u)
        feats = self.concat_conv2(torch.cat([u, r2], 1))
        w = self.output_hypernetworks_mlps[0](hs[:, 1])  # (B, C)
        b, c, h, ww = feats.shape
        return (w.unsqueeze(1) @ feats.view(b, c, h * ww)).view(b, 1, h, ww)


# --------------------------------------------------------------------------- the model


class MedFastSAM(nn.Module):
    """The whole model: u8 RGB (B, S, S, 3) -> logits (B, 1, S, S).

    Submodules carry the authors' names (``image_encoder``, ``prompt_encoder``,
    ``mask_decoder``, ``conv1_med``). Pass a dict as ``capture`` to receive the stage outputs
    named in the fixtures' README (detached); pass ``mask_lowres`` to use a given low-resolution
    coarse mask instead of the one Otsu gives (for stage-by-stage checks)."""

    def __init__(self, cfg, variant):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, not {variant!r}")
        self.cfg, self.variant = cfg, variant
        self.image_encoder = LKAEncoder(cfg, variant)
        self.prompt_encoder = CPEncoder(cfg)
        self.mask_decoder = MSFDecoder(cfg)
        self.conv1_med = MSFFeatures(cfg)
        self.otsu = OtsuPrompt(variant)

    @property
    def dtype(self):
        return self.mask_decoder.iou_token.weight.dtype

    def normalise(self, images_u8):
        """u8 NHWC -> ImageNet-normalised NCHW in the model's dtype."""
        x = images_u8.permute(0, 3, 1, 2).to(self.dtype)
        # The constants are made in float64 and then rounded once to the model's dtype.
        mean = torch.tensor(PIXEL_MEAN, dtype=torch.float64).to(self.dtype).view(1, 3, 1, 1)
        std = torch.tensor(PIXEL_STD, dtype=torch.float64).to(self.dtype).view(1, 3, 1, 1)
        return (x - mean) / std

    def dense_pe(self):
        g = self.cfg["image_size"] // 16
        return self.prompt_encoder.pe_layer.dense(g, g)

    def forward(self, images_u8, capture=None, mask_lowres=None):
        s = self.cfg["image_size"]
        if images_u8.dim() != 4 or tuple(images_u8.shape[1:]) != (s, s, 3):
            raise ValueError(f"expected (B, {s}, {s}, 3) u8 images, got {tuple(images_u8.shape)}")
        x = self.normalise(images_u8)
        emb = self.image_encoder(x, capture)
        r2, r1 = self.conv1_med(x)
        thr, mask = self.otsu(images_u8)
        low = F.interpolate(mask.to(self.dtype), size=(s // 4, s // 4), mode="bilinear", align_corners=False)
        if mask_lowres is not None:
            low = mask_lowres.to(self.dtype)
        dense = self.prompt_encoder(low)
        pe = self.dense_pe()
        hs, image = self.mask_decoder.two_way(emb, dense, pe)
        lowres = self.mask_decoder.mask_head(hs, image, r1, r2)
        logits = F.interpolate(lowres, size=(s, s), mode="bilinear", align_corners=False)
        if capture is not None:
            for k, v in (
                ("encoder.embedding", emb), ("msf.r2", r2), ("msf.r1", r1), ("otsu.threshold", thr),
                ("otsu.mask", mask.to(torch.float64)), ("otsu.mask_lowres", low), ("pe.dense", pe),
                ("prompt.dense", dense), ("decoder.tokens", hs), ("decoder.image", image),
                ("decoder.lowres_logits", lowres), ("logits", logits),
            ):
                capture[k] = v.detach()
        return logits


def build(config: dict, variant: str) -> MedFastSAM:
    """A Med-FastSAM with PyTorch's default initialisation (and a N(0,1) PE matrix)."""
    return MedFastSAM(full_config(config), variant)


# --------------------------------------------------------------------------- loss


def loss(logits, target_u8, alpha=0.25, gamma=2.0, smooth=1.0, lam=0.8):
    """(total, focal, dice) of the fixtures' README: focal (alpha 0.25, gamma 2) averaged over
    every pixel of the batch, Dice (smoothing 1) per image then averaged; total 0.8 F + 0.2 D."""
    t = target_u8.to(logits.dtype).reshape(logits.shape)
    p = torch.sigmoid(logits)
    bce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    a_t = alpha * t + (1 - alpha) * (1 - t)
    focal = (a_t * bce * (1 - p_t) ** gamma).mean()
    b = logits.shape[0]
    pf, tf = p.reshape(b, -1), t.reshape(b, -1)
    dice = (1 - (2 * (pf * tf).sum(1) + smooth) / (pf.sum(1) + tf.sum(1) + smooth)).mean()
    return lam * focal + (1 - lam) * dice, focal, dice


# --------------------------------------------------------------------------- safetensors

_DT = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_DT_BACK = {np.dtype(v): k for k, v in _DT.items()}


def read_safetensors(path):
    """{name: torch tensor} of a safetensors file (BF16 widened to F32)."""
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    base = 8 + n
    out = OrderedDict()
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        buf = raw[base + a : base + b]
        dt = info["dtype"]
        if dt == "BF16":
            u = np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16
            arr = u.view(np.float32)
        elif dt in _DT:
            arr = np.frombuffer(buf, dtype=np.dtype(_DT[dt]).newbyteorder("<"))
        else:
            raise ValueError(f"{path}: unsupported dtype {dt} for {name}")
        out[name] = torch.from_numpy(arr.astype(arr.dtype.newbyteorder("="), copy=True).reshape(info["shape"]))
    return out


def write_safetensors(tensors, path, metadata=None):
    """Writes {name: tensor} (any of the dtypes above) as a safetensors file."""
    header, blobs, off = {}, [], 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, t in tensors.items():
        arr = t.detach().cpu().contiguous().numpy()
        dt = _DT_BACK.get(arr.dtype)
        if dt is None:
            raise ValueError(f"cannot store {name} of dtype {arr.dtype}")
        data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": dt, "shape": list(arr.shape), "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for blob in blobs:
            f.write(blob)


def load_weights(model, path):
    """Loads a safetensors state_dict with the authors' keys, strictly: a missing or unexpected
    key or a shape mismatch raises. f16/f32 values are converted to the model's dtype."""
    sd = read_safetensors(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        raise KeyError(
            f"{path}: {len(missing)} missing key(s) {missing[:8]}, {len(unexpected)} unexpected key(s) {unexpected[:8]}"
        )
    conv = OrderedDict()
    for k, ref in own.items():
        t = sd[k]
        if tuple(t.shape) != tuple(ref.shape):
            raise ValueError(f"{path}: {k} has shape {tuple(t.shape)}, the model wants {tuple(ref.shape)}")
        conv[k] = t.to(ref.dtype)
    model.load_state_dict(conv, strict=True)
    return model


def save_state_dict_safetensors(model, path):
    """Writes the model's state_dict (floating tensors as f32, counters as i64)."""
    out = OrderedDict()
    for k, v in model.state_dict().items():
        out[k] = v.to(torch.float32) if v.is_floating_point() else v
    write_safetensors(out, path)
