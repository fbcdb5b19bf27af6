#!/usr/bin/env bash
# The device side of scripts/device-pack.sh: runs on the lent GPU machine, in the repository root, one call per
# part of the kit (the calls device-pack.sh prints).
#
#   scripts/device-gpu-bench.sh stash .device/partN/part   keep this call's part in /tmp/pixtract-kit (files there
#                                                           outlive the call while the machine stays warm)
#   scripts/device-gpu-bench.sh run                        check the parts against .device/kit.sha256, unpack,
#                                                           install the wheels, run scripts/gpu-bench.sh
#
# `run` writes $OUT/summary.md and $OUT/gpu-bench-logs.tar.gz (every step's log; the models stay on the machine)
# and stops gpu-bench after GPU_BENCH_SECONDS (540) so that the logs come back inside a call's 10 minutes. Its
# exit code is gpu-bench's (the number of failed steps), 124 when it ran out of time, 3 when the kit is
# incomplete (the message names the parts it has).
set -u
kit_dir=${PIXTRACT_KIT:-/tmp/pixtract-kit}
case ${1:-} in
  stash)
    [ $# -eq 2 ] && [ -f "$2" ] || { echo "device-gpu-bench: stash needs the part's file, got: ${*:2}" >&2; exit 2; }
    name=$(basename "$(dirname "$2")")
    # The first part starts a kit: parts of an older one must not be mixed in.
    [ "$name" = part1 ] && rm -rf "$kit_dir/parts"
    mkdir -p "$kit_dir/parts"
    cp "$2" "$kit_dir/parts/$name"
    echo "device-gpu-bench: stashed $name ($(du -h "$2" | cut -f1)); parts held: $(ls "$kit_dir/parts" | sort -V | tr '\n' ' ')"
    exit 0
    ;;
  run) ;;
  *)
    echo "usage: scripts/device-gpu-bench.sh stash .device/partN/part | run" >&2
    exit 2
    ;;
esac

out_dir=${OUT:-out/device}
mkdir -p "$out_dir"
want=$(cat .device/kit.sha256 2>/dev/null) || { echo "device-gpu-bench: .device/kit.sha256 not carried" >&2; exit 3; }
parts=$(ls -d "$kit_dir"/parts/part* 2>/dev/null | sort -V)
[ -n "$parts" ] || { echo "device-gpu-bench: no part stashed in $kit_dir/parts" >&2; exit 3; }
# shellcheck disable=SC2086 # part names have no spaces
cat $parts > "$kit_dir/kit.tar.xz" </dev/null
got=$(sha256sum "$kit_dir/kit.tar.xz" | cut -d' ' -f1)
if [ "$got" != "$want" ]; then
  echo "device-gpu-bench: the kit's parts do not add up (held: $(ls "$kit_dir/parts" 2>/dev/null | sort -V | tr '\n' ' ')):" \
    "stash every part on this warm machine first" >&2
  exit 3
fi
rm -rf "$kit_dir/x" "$kit_dir/site"
mkdir -p "$kit_dir/x"
tar -C "$kit_dir/x" -xJf "$kit_dir/kit.tar.xz" || exit 3
# One Python for the wheels and for gpu-bench's exporter: the image's torch virtualenv (PYTHON to choose another).
py=${PYTHON:-/opt/torch/.venv/bin/python}
[ -x "$py" ] || py=$(command -v python3)
export PYTHON=$py
"$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$kit_dir/site" \
  "$kit_dir"/x/wheels/*.whl || exit 3

export PYTHONPATH=$kit_dir/site${PYTHONPATH:+:$PYTHONPATH}
ORT_DYLIB_PATH=$(ls "$kit_dir"/x/ort/libonnxruntime.so.* | sort -V | tail -1)
export ORT_DYLIB_PATH
export PDFIUM_DYLIB_PATH=$kit_dir/x/lib/libpdfium.so
export PIXTRACT=$kit_dir/x/bin/pixtract
# The image's Python (torch, transformers, onnx) runs the exporter; its nvidia-* wheels hold the CUDA and cuDNN
# libraries ONNX Runtime's CUDA provider loads (pixtract looks there through PIXTRACT_VENV).
export PIXTRACT_VENV=${PIXTRACT_VENV:-$(dirname "$(dirname "$py")")}
export GPU_BENCH_WORK=${GPU_BENCH_WORK:-/tmp/gpu-bench-work}
bench_dir=/tmp/gpu-bench
rm -rf "$bench_dir"
nvidia-smi -L || true
echo "device-gpu-bench: ORT_DYLIB_PATH=$ORT_DYLIB_PATH PIXTRACT_VENV=$PIXTRACT_VENV python=$PYTHON"
timeout --signal=TERM --kill-after=15 "${GPU_BENCH_SECONDS:-540}" scripts/gpu-bench.sh "$bench_dir"
rc=$?
if [ "$rc" = 124 ]; then
  # Stopped at its limit: the summary from the steps that finished (each model is measured right after export).
  echo "device-gpu-bench: gpu-bench stopped after ${GPU_BENCH_SECONDS:-540} s; summary of what finished:"
  scripts/gpu-bench.sh --summary "$bench_dir" >/dev/null
fi
cp "$bench_dir/summary.md" "$out_dir/" 2>/dev/null
tar -C "$bench_dir" --exclude=./work -czf "$out_dir/gpu-bench-logs.tar.gz" . 2>/dev/null
cat "$bench_dir/summary.md" 2>/dev/null
exit "$rc"
