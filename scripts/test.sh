#!/usr/bin/env bash
# The test command (README Quickstart, .ci/run): set-up if needed, then every test of the crate and the exporter.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
start=$(date +%s)
scripts/setup.sh
echo "setup: done in $(( $(date +%s) - start )) s"
cargo fmt --check
if command -v cargo-nextest >/dev/null 2>&1; then
  cargo nextest run --no-fail-fast "$@"
else
  cargo test --no-fail-fast "$@"
fi
