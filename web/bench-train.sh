#!/usr/bin/env bash
# Training steps per second in the page (headless Chromium, WebGPU) against the native step on the
# same machine: the tiny preset and the paper preset at 256², batch 1, semi mode (issue 13's
# benchmark; the table in web/README.md "Fine-tune in the browser" comes from it).
#
# The page trains on the four 256² quadrants of the shipped nuclei image (`node web/test/run.mjs
# train`, the worker's own ms per step, steps 2..N: the first step compiles the pipelines). The
# native side is `medfastsam bench --train PRESET:256:1:semi` (median of 3 steps after a warm-up
# step, random pixels: a step's time does not depend on the pixel values), once on the default
# adapter and once on Chromium's SwiftShader through its Vulkan ICD: the page's own driver, so
# that ratio is the cost of the browser (Dawn, the wasm engine) alone.
# The paper preset's weights are `medfastsam init --from web/pkg/mobilesam.safetensors` (the
# bundled MobileSAM web/build.sh writes); without it the paper rows are not measured.
# Numbers, never assertions.
#
# Usage: bash web/bench-train.sh [--steps N]   (needs bash web/build.sh and the release CLI)
set -euo pipefail
cd "$(dirname "$0")/.."
steps=4
while [ $# -gt 0 ]; do
  case "$1" in
    --steps) steps="$2"; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "bench-train: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])' 2>/dev/null || echo target)
cargo build --release --bin medfastsam >/dev/null
cli="$target_dir/release/medfastsam"
[ -f web/pkg/medfastsam_bg.wasm ] || { echo "bench-train: web/pkg is missing; run bash web/build.sh first" >&2; exit 1; }
icd="${MEDFASTSAM_SWIFTSHADER_ICD:-$(dirname "$(readlink -f "${CHROMIUM:-/usr/bin/chromium}")")/vk_swiftshader_icd.json}"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$cli" quickstart --rows otsu --out "$tmp/qs" >/dev/null
images=("$tmp"/qs/nuclei/images/*.png)
masks=("$tmp"/qs/nuclei/masks/*.png)
declare -A weights config
weights[tiny]=tests/data/fixtures/tiny.weights.safetensors
config[tiny]=tests/data/fixtures/tiny.config.json
if [ -f web/pkg/mobilesam.safetensors ]; then
  "$cli" init --from web/pkg/mobilesam.safetensors --out "$tmp/paper.safetensors" >/dev/null
  weights[paper]="$tmp/paper.safetensors"
fi

# Median ms of the native training step from `bench --json`, or "-" when it did not run.
native_ms() { # preset, extra env...
  local preset=$1; shift
  env "$@" "$cli" bench --json --no-kernels --no-models --reps 3 --train "$preset:256:1:semi" 2>/dev/null |
    python3 -c 'import json,sys; t=json.load(sys.stdin)["train"][0]; print("-" if t.get("error") else round(t["step_ms"]))' || echo -
}
page_ms() { # preset
  local preset=$1 cfg=()
  [ -n "${config[$preset]:-}" ] && cfg=(--config "${config[$preset]}")
  node web/test/run.mjs train --weights "${weights[$preset]}" "${cfg[@]}" --images "${images[@]}" --masks "${masks[@]}" \
    --steps "$steps" --batch 1 --mode semi --size 256 2>&1 | tee "$tmp/page-$preset.log" >&2
  python3 - "$tmp/page-$preset.log" <<'PY'
import re, sys
ms = [float(m) for m in re.findall(r"step \d+ \(epoch \d+\): .* (\d+) ms", open(sys.argv[1]).read())][1:]
print(round(sum(ms) / len(ms)) if ms else "-")
PY
}

ratio() { if [ "$1" = - ] || [ "$2" = - ]; then echo -; else python3 -c "print(f'{$1/$2:.2f}x')"; fi; }
per() { if [ "$1" = - ]; then echo -; else python3 -c "print(f'{$1/1000:.2f} s ({1000/$1:.2f} steps/s)')"; fi; }
adapter=$("$cli" info "${weights[tiny]}" 2>/dev/null | sed -n 's/^adapter: *//p')
printf '\n| preset (256², batch 1, semi) | page, SwiftShader | native, SwiftShader | native, default adapter | page / native SwiftShader | page / native default |\n|---|---|---|---|---|---|\n' > "$tmp/table"
for preset in tiny paper; do
  [ -n "${weights[$preset]:-}" ] || { echo "bench-train: no $preset weights (web/pkg/mobilesam.safetensors missing); skipped" >&2; continue; }
  p=$(page_ms "$preset")
  s=-
  [ -f "$icd" ] && s=$(native_ms "$preset" VK_ICD_FILENAMES="$icd" MEDFASTSAM_BACKEND=vulkan)
  d=$(native_ms "$preset")
  echo "| $preset | $(per "$p") | $(per "$s") | $(per "$d") | $(ratio "$p" "$s") | $(ratio "$p" "$d") |" >> "$tmp/table"
done
cat "$tmp/table"
echo "default adapter: ${adapter:-unknown}; page: Chromium WebGPU; ms per step are the page's steps 2..$steps and the native median of 3"
