#!/usr/bin/env bash
# The browser test: builds the page (web/build.sh) and the native CLI, segments three real images
# with the CLI and with the page in headless Chromium (WebGPU on SwiftShader), and checks
# (a) masks equal (<= 0.1 % of pixels): the 512x512 nuclei image tiled in 9 windows at 256 (as
# `segment` does by default), the H&E and IHC images stretched (`segment --resize`, the page's
# "Stretch" box), and the nuclei image's objects (count, CSV and GeoJSON) against
# `segment --instances --geojson`, (b) tiny-fixture logits within tolerance, (c) no request leaves
# the page's origin, plus progress, responsiveness, storage, and the no-WebGPU / small-limits
# messages; and from a fresh profile the demo (warnings, channel, stale marker, overlay pixels,
# viewer keys, tab order, axe-core audit, the ZIP of "Download all"), and the viewer alone
# (web/test/viewer.mjs); and "Check this GPU" (web/test/selftest.mjs): the page's selftest report
# validates against docs/selftest.schema.json and has the native `selftest --quick` verdicts; and
# fine-tuning (web/test/train.mjs): the page's gradients and 20 Adam steps equal the CLI's.
# Run from anywhere; exits non-zero on any failure. Needs what .ci/setup installs.
set -euo pipefail
cd "$(dirname "$0")/.."
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
say() { printf '[web/test.sh] %s\n' "$*"; }
die() { say "FAILED: $*" >&2; exit 1; }

chromium="${CHROMIUM:-/usr/bin/chromium}"
[ -x "$chromium" ] || die "Chromium not found at $chromium (apt-get install chromium, or set CHROMIUM)"
command -v node >/dev/null || die "node is not installed"

say "building the page (wasm32 + wasm-bindgen)"
bash web/build.sh
say "building the native CLI (release)"
cargo build --release --bin medfastsam
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])' 2>/dev/null || echo target)

if [ ! -d web/test/node_modules/playwright-core ] || [ ! -f web/test/node_modules/axe-core/axe.min.js ]; then
  say "npm ci in web/test (playwright-core and axe-core; no browser download)"
  (cd web/test && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund)
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
tiny=(--weights tests/data/fixtures/tiny.weights.safetensors --config tests/data/fixtures/tiny.config.json)
resized=(data/he/stardist-histo.jpg data/he/skimage-ihc.png)
tiled=data/dsb2018-nuclei/image.tif
say "native CLI masks and objects of ${resized[*]} (--resize --instances --geojson)"
"$target_dir/release/medfastsam" segment "${resized[@]}" "${tiny[@]}" --resize --instances --geojson \
  --out "$tmp/cli" || die "the native CLI failed"
say "native CLI mask and objects of $tiled (tiled, --instances --geojson)"
"$target_dir/release/medfastsam" segment "$tiled" "${tiny[@]}" --instances --geojson \
  --out "$tmp/cli-tiled" || die "the native CLI failed (tiled)"

prompted=()
if [ -f web/pkg/mobilesam.safetensors ]; then
  say "native CLI mask of a box prompt with the bundled MobileSAM"
  "$target_dir/release/medfastsam" segment data/he/stardist-histo.jpg --weights web/pkg/mobilesam.safetensors \
    --box 391,74,428,105 --out "$tmp/prompted" || die "the native CLI failed (MobileSAM)"
  prompted=(--cli-prompted "$tmp/prompted")
fi

say "the viewer alone (web/test/viewer.mjs)"
node web/test/viewer.mjs --chromium "$chromium" || die "viewer checks failed (see above)"

say "Check this GPU against the native selftest (web/test/selftest.mjs)"
node web/test/selftest.mjs --cli "$target_dir/release/medfastsam" --chromium "$chromium" "$@" || die "the page's GPU check failed (see above)"

say "fine-tuning in the page against the native CLI (web/test/train.mjs)"
node web/test/train.mjs --cli "$target_dir/release/medfastsam" --chromium "$chromium" || die "the page's training checks failed (see above)"

say "annotation, the training view, resume, downloads and teaching mode (web/test/train-ui.mjs)"
node web/test/train-ui.mjs --chromium "$chromium" "$@" || die "the page's annotation/training/teaching checks failed (see above)"

say "browser test"
# Extra arguments go to run.mjs (web/screenshots.sh passes --screenshots web/screenshots).
node web/test/run.mjs --cli-masks "$tmp/cli" --cli-tiled "$tmp/cli-tiled" "${prompted[@]}" --chromium "$chromium" "$@" || die "browser checks failed (see above)"
say "passed"
