#!/usr/bin/env bash
# Regenerates the screenshots in web/README.md (first visit, demo result, viewer, dark mode,
# 420 px wide; annotation, training with its plot, teaching mode from web/test/train-ui.mjs): the browser test (web/test.sh) run with --screenshots web/screenshots, so the
# pictures show the page as the test leaves it. Same needs as web/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
bash web/test.sh --screenshots web/screenshots
ls -l web/screenshots
