"""Extracts the Otsu / PE test data from the parity fixtures (reference outputs of the authors'
PyTorch code, run in float64; see tests/data/README.md). Usage:
    python3 make_otsu_pe_fixture.py /path/to/fixtures   # writes otsu_pe_tiny.safetensors here
"""
import os
import sys

import numpy as np
from safetensors.numpy import load_file, save_file

src = sys.argv[1]
fwd = load_file(os.path.join(src, "tiny.forward.safetensors"))
wts = load_file(os.path.join(src, "tiny.weights.safetensors"))
assert np.array_equal(fwd["paper.pe.dense"], fwd["released.pe.dense"])
out = {"image": fwd["image"]}  # u8 [2, 256, 256, 3]
for v in ("paper", "released"):
    out[f"{v}.otsu.threshold"] = fwd[f"{v}.otsu.threshold"]  # f32 [2]
    m = fwd[f"{v}.otsu.mask"]  # f32 [2, 1, 256, 256], values in {0, 1}
    assert set(np.unique(m)) <= {0.0, 1.0}
    out[f"{v}.otsu.mask"] = m.astype(np.uint8)  # stored as u8 0/1 (lossless)
out["pe.gaussian_matrix"] = wts["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"].astype(np.float32)
out["pe.dense"] = fwd["paper.pe.dense"]  # f32 [256, 16, 16] (NCHW)
save_file(out, os.path.join(os.path.dirname(os.path.abspath(__file__)), "otsu_pe_tiny.safetensors"))
