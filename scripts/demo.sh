#!/usr/bin/env bash
# The main job on the built-in demo. Until `pixtract run` lands (job-runner issue) it shows each finished stage:
# the machine check, the exported tiny model against transformers, sample documents rendered as the model sees
# them, and the engine reading a receipt.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
scripts/setup.sh
cargo build --quiet --bin pixtract
px=target/debug/pixtract
echo
echo "== pixtract doctor"
$px doctor
echo
echo "== onnx-export verify (ONNX Runtime vs transformers on the tiny model)"
.venv/bin/python onnx-export/export.py verify --model models/tiny
samples=models/tiny/reference
corpus=../shared/corpus/receipts-sroie
echo
echo "== pixtract pages (documents as the model sees them) -> out/demo/pages"
rm -rf out/demo/pages
if [ -d "$corpus" ]; then src=$corpus; else src=$samples; fi
$px pages "$src" --include '*.jpg' --include '*.png' --out out/demo/pages | tail -n 5 || true
echo
image=$samples/tall_receipt/image0.png
[ -f "$corpus/000.jpg" ] && image=$corpus/000.jpg
echo "== pixtract generate on $image (tiny random model: the words are noise, the machinery is real)"
$px generate --model models/tiny --image "$image" --prompt "Extract the merchant, date and total as JSON." \
  --max-new-tokens 24
