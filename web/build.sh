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
echo "web/build.sh: built web/pkg ($(du -h web/pkg/medfastsam_bg.wasm | cut -f1) wasm)"
