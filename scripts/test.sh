#!/usr/bin/env bash
# The test command (README Quickstart, .ci/run): set-up if needed, then every test of the crate and the exporter that
# needs nothing beside the checkout (the corpus tests are `make test-corpus`).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
start=$(date +%s)
scripts/setup.sh
echo "setup: done in $(( $(date +%s) - start )) s"
cargo fmt --check
# Every test but those reading the shared corpus of documents made by others (`make test-corpus`, which needs the
# corpus): a clone tests itself with nothing beside it.
if command -v cargo-nextest >/dev/null 2>&1; then
  cargo nextest run --no-fail-fast -E 'not test(/corpus/)' "$@"
else
  cargo test --no-fail-fast "$@" -- --skip corpus
fi
