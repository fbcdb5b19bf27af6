#!/usr/bin/env bash
# Packs what a lent GPU machine needs for `scripts/gpu-bench.sh` into .device/ (git-ignored), in carries of at
# most 64 MiB each, and prints the device calls to make. The machine has no network, a Python 3.12 with torch,
# transformers, onnx, onnxscript and a CPU onnxruntime (/opt/torch/.venv), and starts bare on every loan.
#
#   scripts/device-pack.sh            then the calls it prints, back to back (a machine stays warm ~30 s)
#
# Packed into one archive (kit.tar.xz), cut into parts of PART_MIB (56) MiB, .device/partN/part, one per call:
#   bin/pixtract      the binary, stripped (PIXTRACT, default target/release/pixtract, else target/debug)
#   lib/libpdfium.so  from the project's virtualenv
#   ort/              ONNX Runtime's CUDA build (onnxruntime-gpu at the version requirements-gpu.txt pins): its
#                     libraries alone
#   wheels/           what the exporter needs and the device lacks: mistral-common (Pixtral's Tekken tokenizer
#                     file, the prompt format) and its dependencies, for CPython 3.12 x86-64, at this project's
#                     virtualenv's versions
# models/tiny/reference (the prompts the benchmarks cycle; git-ignored, 5 MB) travels with the last call.
# The device side is scripts/device-gpu-bench.sh: `stash` keeps each call's part in /tmp, `run` checks and
# unpacks the kit, installs the wheels, runs gpu-bench.sh and packs its logs into one file under $OUT.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
pack=.device
part_mib=${PART_MIB:-56}
ort_gpu=$(sed -n 's/^onnxruntime-gpu==//p' onnx-export/requirements-gpu.txt)
py=.venv/bin/python
[ -x "$py" ] || { echo "device-pack: $py missing: run scripts/setup.sh first" >&2; exit 2; }
bin=${PIXTRACT:-}
if [ -z "$bin" ]; then
  if [ -x target/release/pixtract ]; then bin=target/release/pixtract; else bin=target/debug/pixtract; fi
fi
[ -x "$bin" ] || { echo "device-pack: no binary at $bin: cargo build first" >&2; exit 2; }
[ -d models/tiny/reference ] || { echo "device-pack: models/tiny/reference missing: run scripts/setup.sh" >&2; exit 2; }

rm -rf "$pack" "$pack.partial"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
kit=$tmp/kit
mkdir -p "$kit"/{bin,lib,wheels,ort} "$pack.partial"
strip -o "$kit/bin/pixtract" "$bin"
pdfium=$("$py" -c 'import pypdfium2_raw, os; print(os.path.join(os.path.dirname(pypdfium2_raw.__file__), "libpdfium.so"))')
cp "$pdfium" "$kit/lib/libpdfium.so"

download() {
  "$py" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$@"
}
# The exporter's imports the device image lacks, at the versions this project's virtualenv runs.
pins=()
for name in mistral_common pydantic pydantic_core annotated_types typing_inspection jsonschema \
  jsonschema_specifications referencing rpds_py pydantic_extra_types pycountry; do
  pins+=("$name==$("$py" -c "import importlib.metadata as m; print(m.version('$name'))")")
done
download "$kit/wheels" "${pins[@]}"
download "$tmp" "onnxruntime-gpu==$ort_gpu"
unzip -q -j "$tmp"/onnxruntime_gpu-*.whl 'onnxruntime/capi/libonnxruntime*' -d "$kit/ort"

tar -C "$kit" -cf - . | xz -T0 -6 > "$tmp/kit.tar.xz"
sha256sum "$tmp/kit.tar.xz" | cut -d' ' -f1 > "$pack.partial/kit.sha256"
split -b "${part_mib}m" -d -a 1 "$tmp/kit.tar.xz" "$tmp/part"
n=0
for p in "$tmp"/part*; do
  n=$((n + 1))
  mkdir -p "$pack.partial/part$n"
  mv "$p" "$pack.partial/part$n/part"
done
mv "$pack.partial" "$pack"

grep -qx '/.device/' .gitignore || echo "device-pack: add /.device/ to .gitignore" >&2
echo "device-pack: $pack ready: kit.tar.xz $(du -h "$tmp/kit.tar.xz" | cut -f1) in $n part(s) of <= $part_mib MiB \
(binary, pdfium, onnxruntime-gpu $ort_gpu, ${#pins[@]} wheels)"
echo
echo "Device calls, back to back (a machine stays warm ~30 s between calls):"
for i in $(seq 1 "$n"); do
  if [ "$i" -lt "$n" ]; then
    echo "  $i. carry [\".device/part$i\"], timeout_s 120, command: scripts/device-gpu-bench.sh stash .device/part$i/part"
  else
    echo "  $i. carry [\".device/part$i\", \".device/kit.sha256\", \"models/tiny/reference\"], timeout_s 600, command:"
    echo "     scripts/device-gpu-bench.sh stash .device/part$i/part && scripts/device-gpu-bench.sh run"
  fi
done
