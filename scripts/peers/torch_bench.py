"""PyTorch (CPU) side of scripts/bench-peers.sh: times our PyTorch definition of Med-FastSAM
(medfastsam_torch.py, checked against the authors' float64 tensors by check_torch_model.py) on
the shapes `medfastsam bench` runs, and exports the weights it used so that the engine runs the
very same ones.

Writes, in --out:
  paper.safetensors   the paper preset's weights (random, seeded), the authors' key names
  probe.png           a 1024x1024 RGB test image (smooth blobs on a textured background)
  probe_torch.u8      PyTorch's mask of probe.png (1024*1024 bytes, 0/1): the script compares it
                      with `medfastsam segment`'s mask of the same image and weights
  torch.json          the times (median ms) and versions
"""

import argparse
import json
import os
import resource
import struct
import sys
import zlib

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import medfastsam_torch as mt  # noqa: E402
from timing import median_ms  # noqa: E402

PAPER = mt.PAPER_CONFIG


def write_png_rgb(path, img):
    """8-bit RGB PNG, filter 0 on every row."""
    h, w, _ = img.shape
    raw = b"".join(b"\x00" + img[y].tobytes() for y in range(h))

    def chunk(kind, data):
        c = kind + data
        return struct.pack(">I", len(data)) + c + struct.pack(">I", zlib.crc32(c) & 0xFFFFFFFF)

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)))
        f.write(chunk(b"IDAT", zlib.compress(raw, 6)))
        f.write(chunk(b"IEND", b""))


def probe_image(s, seed=3):
    """Bright-edged dark blobs on a lighter textured background: an Otsu prompt with some
    structure, so the mask comparison is not between two all-empty masks."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    grey = 200 + 20 * np.sin(xx / 37.0) * np.cos(yy / 23.0)
    for _ in range(40):
        cy, cx = rng.uniform(0, s, 2)
        r = rng.uniform(s / 40, s / 12)
        d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        grey = np.where(d < r, 70 + 30 * (d / r), grey)
    grey = grey + rng.normal(0, 6, (s, s))
    rgb = np.stack([grey * 0.9, grey * 0.7, grey * 1.0], -1)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def train_step_ms(cfg, weights, size, batch, reps, seed):
    cfg = dict(cfg, image_size=size)
    model = mt.build(cfg, "paper")
    if weights:
        mt.load_weights(model, weights)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (batch, size, size, 3), generator=g, dtype=torch.uint8)
    t = torch.randint(0, 2, (batch, size, size), generator=g, dtype=torch.uint8)

    def step():
        opt.zero_grad(set_to_none=True)
        total, _, _ = mt.loss(model(x), t)
        total.backward()
        opt.step()

    return median_ms(step, reps)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tiny-weights", required=True)
    ap.add_argument("--tiny-config", required=True)
    ap.add_argument("--no-train", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    res = {"torch": torch.__version__, "threads": a.threads}

    # The paper preset with seeded random weights, exported for the engine.
    model = mt.build(PAPER, "paper").eval()
    mt.save_state_dict_safetensors(model, os.path.join(a.out, "paper.safetensors"))
    img = probe_image(1024)
    write_png_rgb(os.path.join(a.out, "probe.png"), img)
    with torch.no_grad():
        x = torch.from_numpy(img)[None]
        mask = (model(x)[0, 0] > 0).to(torch.uint8).numpy()
        mask.tofile(os.path.join(a.out, "probe_torch.u8"))
        print(f"[torch] forward 1024² batch 1 ({a.threads} threads)", file=sys.stderr)
        res["paper_forward_1024_ms"] = median_ms(lambda: model(x), a.reps)
    del model

    if not a.no_train:
        tiny = json.load(open(a.tiny_config))
        print("[torch] training step tiny 256² batch 4", file=sys.stderr)
        res["train_tiny_256_4_ms"] = train_step_ms(tiny, a.tiny_weights, 256, 4, max(a.reps, 3), 1)
        print("[torch] training step paper 1024² batch 4", file=sys.stderr)
        res["train_paper_1024_4_ms"] = train_step_ms(PAPER, None, 1024, 4, min(a.reps, 3), 2)
    # Peak resident memory of this process (Linux reports KiB): the paper training step's, when run.
    res["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    json.dump(res, open(os.path.join(a.out, "torch.json"), "w"))


if __name__ == "__main__":
    main()
