#!/usr/bin/env bash
# The whole test suite: native tests on whatever wgpu adapter exists (lavapipe without a GPU), the
# paper-configuration parity tests when MEDFASTSAM_FIXTURES names the folder of the large fixtures
# (full.*.safetensors; see docs/fixtures.md), and the browser test.
set -euo pipefail
# A relative MEDFASTSAM_FIXTURES is taken from the caller's directory.
if [ -n "${MEDFASTSAM_FIXTURES:-}" ] && [ -d "$MEDFASTSAM_FIXTURES" ]; then
  export MEDFASTSAM_FIXTURES="$(cd "$MEDFASTSAM_FIXTURES" && pwd)"
fi
cd "$(dirname "$0")/.."
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
if [ -n "${MEDFASTSAM_FIXTURES:-}" ] && [ ! -f "$MEDFASTSAM_FIXTURES/full.forward.safetensors" ]; then
  echo "[test] warning: MEDFASTSAM_FIXTURES=$MEDFASTSAM_FIXTURES holds no full.forward.safetensors;" \
    "the paper-configuration parity tests will be reported ignored" >&2
fi
echo "[test] MEDFASTSAM_FIXTURES=${MEDFASTSAM_FIXTURES:-<unset: paper-configuration parity tests are reported ignored>}"
# Style is enforced: formatting, and clippy with warnings as errors natively (every target) and for
# the browser build (wasm32 + the web feature).
echo "[test] cargo fmt --check; cargo clippy -D warnings (native all targets, wasm32 --features web)"
cargo fmt --check
cargo clippy --release --all-targets -- -D warnings
# The optional OpenSlide reader where its library is installed (.ci/setup installs it).
openslide=0
if pkg-config --exists openslide 2>/dev/null; then
  openslide=1
  cargo clippy --release --all-targets --features openslide -- -D warnings
else
  echo "[test] warning: libopenslide-dev not installed; the feature openslide is not built and its tests are reported ignored" >&2
fi
if rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown; then
  cargo clippy --release --target wasm32-unknown-unknown --lib --features web -- -D warnings
fi
status=0
cargo test --release --no-fail-fast || status=$?
if [ "$openslide" = 1 ]; then
  # The readers with OpenSlide in (it takes over slides from the built-in TIFF reader).
  cargo test --release --no-fail-fast --features openslide --test slide_openslide --test stream || status=$?
fi
[ "$status" = 0 ] || exit "$status"
if [ -x web/test.sh ] && [ "${SKIP_BROWSER:-0}" != 1 ]; then
  bash web/test.sh
fi
