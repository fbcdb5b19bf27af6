#!/usr/bin/env bash
# The main job on the built-in demo. Until the pipeline lands (issues 3-6) it checks the machine with
# `pixtract doctor` and proves the exported tiny model against transformers with the exporter's `verify`.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/setup.sh
cargo build --quiet --bin pixtract
echo
echo "== pixtract doctor"
target/debug/pixtract doctor
echo
echo "== onnx-export verify (ONNX Runtime vs transformers on the tiny model)"
.venv/bin/python onnx-export/export.py verify --model models/tiny 2> >(grep -v -i warn >&2)
