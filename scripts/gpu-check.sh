#!/usr/bin/env bash
# The CUDA checks, in one go, on the tiny models that `scripts/setup.sh` builds: what a user with an NVIDIA GPU
# runs once to see that pixtract's CUDA path works there, and what the project's GPU figures come from.
#
#   scripts/setup.sh --gpu && scripts/gpu-check.sh [OUT_DIR]
#
# Steps: `pixtract doctor --device cuda`; `pixtract verify` on cuda for the fp32 model (parity with transformers'
# reference cases: ids, pixels, first-step logits, greedy tokens, batched = one by one) and for the fp16 and
# q4f16 variants (reported, not counted: their CPU onnxruntime tokens may flip at near ties on CUDA); `pixtract
# bench engine` on cpu and on cuda (same binary, same prompts, back to back); `pixtract generate` on a receipt
# scan; the demo job (`pipelines/demo.toml`) with `--device cuda`, Parquet under OUT_DIR. Every step runs even if
# one before it failed; the exit code is the number of failed steps.
#
# Then, when a Python with onnxruntime-gpu is there (GPU_CHECK_PYTHON, default .venv/bin/python), `pixtract bench
# engine --device cuda` against the plain Python onnxruntime loop on the same GPU, same graphs, same prompts.
#
# Environment: PIXTRACT (binary, default target/debug/pixtract), ORT_DYLIB_PATH / PIXTRACT_VENV as for any
# pixtract command (a CUDA-enabled libonnxruntime: the onnxruntime-gpu wheel's), GPU_CHECK_MODELS (default
# "models/tiny models/tiny-fp16 models/tiny-q4f16"), GPU_CHECK_PYTHON, GPU_CHECK_ENCODED (prompts from
# `onnx-export/export.py bench encode-cases`, for a Python without mistral-common).
set -u
bin=${PIXTRACT:-target/debug/pixtract}
out=${1:-out/gpu-check}
models=${GPU_CHECK_MODELS:-models/tiny models/tiny-fp16 models/tiny-q4f16}
mkdir -p "$out"
failed=0
step() {
  echo
  echo "== $*"
  local t0=$SECONDS
  "$@"
  local rc=$?
  echo "-- exit $rc in $((SECONDS - t0)) s"
  [ "$rc" = 0 ] || failed=$((failed + 1))
}
report() {
  echo
  echo "== $* (reported, not counted)"
  "$@"
  echo "-- exit $?"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
step "$bin" doctor --device cuda --model models/tiny
for m in $models; do
  if [ "$m" = models/tiny ]; then
    step "$bin" verify --model "$m" --reference-dir models/tiny/reference --device cuda
  else
    # fp16/int4 variants are held to their CPU onnxruntime tokens, and CUDA's fp16 kernels round differently: on
    # the random tiny model, whose logits are near ties, a token or two may flip. Reported, not counted.
    report "$bin" verify --model "$m" --reference-dir models/tiny/reference --device cuda
  fi
done
for m in $models; do
  step "$bin" bench engine --model "$m" --reference-dir models/tiny/reference --no-reference --repeat 3 --device cpu
  step "$bin" bench engine --model "$m" --reference-dir models/tiny/reference --no-reference --repeat 3 --device cuda
done
receipt=$(ls out/demo/inputs/sroie_*.jpg ../shared/corpus/receipts-sroie/*/*.jpg 2>/dev/null | head -1)
if [ -n "$receipt" ]; then
  step "$bin" generate --model models/tiny --device cuda --image "$receipt" \
    --prompt "What is the total amount on this receipt?" --max-new-tokens 48
fi
if [ -d out/demo/inputs ]; then
  # The demo's CPU model has a GroupQueryAttention decoder (CPU only): on CUDA it runs the eager export.
  sed -e 's|^device = .*|device = "cuda"|' -e "s|^uri = \"out/demo/parquet\"|uri = \"$out/parquet\"|" \
    -e 's|^dir = "models/tiny-gqa"|dir = "models/tiny"|' \
    pipelines/demo.toml >"$out/demo-cuda.toml"
  step "$bin" run "$out/demo-cuda.toml" --log-format plain
fi
python=${GPU_CHECK_PYTHON:-.venv/bin/python}
if [ -x "$python" ] || command -v "$python" >/dev/null 2>&1; then
  for m in $models; do
    step "$bin" bench engine --model "$m" --reference-dir models/tiny/reference --device cuda --repeat 3 \
      --python "$python" ${GPU_CHECK_ENCODED:+--python-encoded "$GPU_CHECK_ENCODED"}
  done
fi
echo
echo "gpu-check: $failed step(s) failed"
exit "$failed"
