#!/usr/bin/env bash
# Regenerates the page's demo model, web/demo/tiny-nuclei.f16.safetensors: the tiny Med-FastSAM
# preset trained from scratch by `medfastsam quickstart --rows tiny` on the 2018 Data Science Bowl
# nuclei image (data/dsb2018-nuclei), stored as f16. What it was trained on (and the held-out
# Dice) is in the file's metadata; `medfastsam info` shows it. About 4 minutes on 2 CPU cores.
# Update web/demo/demo.json's provenance with the numbers this prints.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
cargo build --release --bin medfastsam
bin=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/medfastsam
"$bin" quickstart --rows tiny --f16 --minutes 30 --seed 0 --out "$out"
cp "$out/tiny-nuclei.safetensors" web/demo/tiny-nuclei.f16.safetensors.tmp
mv web/demo/tiny-nuclei.f16.safetensors.tmp web/demo/tiny-nuclei.f16.safetensors
cat "$out/results.csv"
"$bin" info web/demo/tiny-nuclei.f16.safetensors | grep -A1 '^trained on'
