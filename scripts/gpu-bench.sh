#!/usr/bin/env bash
# The GPU benchmark at Pixtral 12B's shape, in one go: what a device run executes, prepared and dry-run here.
#
#   scripts/gpu-bench.sh [OUT_DIR]                         on the GPU machine (defaults below)
#   GPU_BENCH_DEVICE=cpu GPU_BENCH_MODELS=models/tiny-gqa scripts/gpu-bench.sh out/gpu-bench-dry   the CPU dry run
#   scripts/gpu-bench.sh --summary OUT_DIR                 step 4 alone, from the logs a run (maybe stopped) left
#
# Steps, each timed, every step run even if one before it failed (exit code = failed steps):
#  1. Physical limits, measured on the same device by torch: memory bandwidth from a large device-to-device copy
#     (bytes read + written / s) and dense fp16 matmul FLOP/s (8192^3 GEMMs; fp32 on the CPU).
#  2. Models, each measured (3.) as soon as it is exported, the smallest first, so that a run stopped by its time
#     limit still has whole figures: unless GPU_BENCH_MODELS names existing exports, a seeded random checkpoint with
#     Pixtral 12B's exact
#     configuration at each depth in GPU_BENCH_DEPTHS (text layers; vision keeps 2) is written by
#     `export.py random-checkpoint` and exported fp16 (GPU_BENCH_ATTENTION, default gqa: GroupQueryAttention with
#     the KV-cache slots in device memory and continuous batching, the pipeline's CUDA default; `eager` is the path
#     already run on an H200 with the tiny model) on this machine: the weights never cross the network or the
#     64 MiB carry limit.
#  3. Per model, with pixtract: `doctor`; decode tokens/s at batch 1, 8 and 32 (`bench engine --no-reference`,
#     reference prompts repeated); prefill tokens/s on a 1024x1024 page (`generate`, 4,160 image tokens);
#     continuous vs static batching on a receipt/invoice-like workload of ~300 answer tokens (`bench batching`);
#     `pixtract run` over 64 scans of different sizes, static then continuous (the manifests' decode objects,
#     wall time); peak device memory (nvidia-smi sampled every 0.2 s while pixtract runs).
#  4. summary.md in OUT_DIR: each figure beside its limit: batch-1 decode vs bandwidth / decoder weight bytes,
#     prefill vs dense FLOP/s (2 x decoder parameters FLOPs per token, attention's own FLOPs left out: model
#     FLOPs utilisation, an underestimate at 4,160 tokens). With 2 or more depths, batch-1 decode step time,
#     prefill time per token and decoder bytes are fitted linearly in the layer count and extrapolated to 40
#     layers, printed as an extrapolation.
#
# Environment: PIXTRACT (binary, default target/release/pixtract, else target/debug/pixtract), PYTHON (default
# .venv/bin/python; on the device image PIXTRACT_VENV=/opt/torch/.venv), GPU_BENCH_DEVICE (cuda), GPU_BENCH_DEPTHS
# ("2 4"), GPU_BENCH_ATTENTION (gqa), GPU_BENCH_MODELS (existing exports; skips step 2), GPU_BENCH_WORK (where
# checkpoints and exports go, default OUT_DIR/work), GPU_BENCH_PROMPTS (64), GPU_BENCH_NEW_TOKENS (32 for the
# batch sweep).
set -u
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
summary_only=0
if [ "${1:-}" = --summary ]; then
  summary_only=1
  shift
fi
out=${1:-out/gpu-bench}
mkdir -p "$out"
device=${GPU_BENCH_DEVICE:-cuda}
depths=${GPU_BENCH_DEPTHS:-2 4}
attention=${GPU_BENCH_ATTENTION:-gqa}
work=${GPU_BENCH_WORK:-$out/work}
prompts=${GPU_BENCH_PROMPTS:-64}
new_tokens=${GPU_BENCH_NEW_TOKENS:-32}
python=${PYTHON:-${PIXTRACT_VENV:+$PIXTRACT_VENV/bin/python}}
python=${python:-.venv/bin/python}
bin=${PIXTRACT:-}
if [ -z "$bin" ]; then
  if [ -x target/release/pixtract ]; then bin=target/release/pixtract; else bin=target/debug/pixtract; fi
fi
failed=0
step() {
  local name=$1; shift
  echo
  echo "== $name: $*"
  local t0=$SECONDS
  if "$@" >"$out/$name.log" 2>&1; then
    echo "   ok ($((SECONDS - t0)) s) -> $out/$name.log"
  else
    echo "   FAILED ($((SECONDS - t0)) s), last lines of $out/$name.log:"
    tail -n 5 "$out/$name.log" | sed 's/^/   | /'
    failed=$((failed + 1))
  fi
}

gpu_index=${device#cuda}; gpu_index=${gpu_index#:}; gpu_index=${gpu_index:-0}
# Samples device memory while a command runs; the peak goes to "$out/$name.peak_mib".
with_peak_memory() {
  local name=$1; shift
  if [ "$device" = cpu ] || ! command -v nvidia-smi >/dev/null 2>&1; then
    "$@"
    return
  fi
  ( peak=0
    while :; do
      used=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i "$gpu_index" 2>/dev/null | head -1)
      [ -n "$used" ] && [ "$used" -gt "$peak" ] && peak=$used && echo "$peak" >"$out/$name.peak_mib"
      sleep 0.2
    done ) &
  local sampler=$!
  "$@"
  local rc=$?
  kill "$sampler" 2>/dev/null
  wait "$sampler" 2>/dev/null
  return $rc
}

# 1. Limits.
[ "$summary_only" = 1 ] || step limits "$python" - "$device" "$out/limits.json" <<'PY'
import json, sys, time
import torch
dev = sys.argv[1] if sys.argv[1].startswith("cuda") else "cpu"
sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
n = (4 << 30) // 2 if dev.startswith("cuda") else (512 << 20) // 2
a = torch.empty(n, dtype=torch.float16, device=dev); b = torch.empty_like(a)
b.copy_(a); sync()
best = 0.0
for _ in range(5):
    t = time.perf_counter(); b.copy_(a); sync(); s = time.perf_counter() - t
    best = max(best, 2 * a.numel() * 2 / s)
dtype = torch.float16 if dev.startswith("cuda") else torch.float32
m = 8192 if dev.startswith("cuda") else 2048
x = torch.randn(m, m, dtype=dtype, device=dev); y = torch.randn(m, m, dtype=dtype, device=dev)
x @ y; sync()
flops = 0.0
for _ in range(5):
    t = time.perf_counter(); x @ y; sync(); s = time.perf_counter() - t
    flops = max(flops, 2 * m ** 3 / s)
name = torch.cuda.get_device_name(0) if dev.startswith("cuda") else "cpu"
res = {"device": name, "bandwidth_bytes_s": best, "dense_flops": flops, "dense_dtype": str(dtype)}
json.dump(res, open(sys.argv[2], "w"))
print(res)
PY

# 3. Measurements of one model.
ref=models/tiny/reference
cases=grayscale,rgba,system_prompt,multilingual_image,tall_receipt,text_only,multilingual,two_images
cases32=$cases,$cases,$cases,$cases
page=$out/page-1024.png
measure() {
  local model=$1 tag
  tag=$(basename "$model")
  step "doctor-$tag" "$bin" doctor --model "$model" --device "$device"
  step "decode-$tag" with_peak_memory "decode-$tag" "$bin" bench engine --model "$model" --reference-dir "$ref" \
    --device "$device" --no-reference --repeat 2 --new-tokens "$new_tokens" --cases "$cases32" \
    --batch 1 --batch 8 --batch 32
  step "prefill-$tag" with_peak_memory "prefill-$tag" "$bin" generate --model "$model" --device "$device" \
    --image "$page" --prompt "Transcribe every line of this invoice." --max-new-tokens 8
  step "batching-$tag" with_peak_memory "batching-$tag" "$bin" bench batching --model "$model" \
    --reference-dir "$ref" --device "$device" --prompts "$prompts" --min-tokens 150 --max-tokens 450 \
    --batch 8 --repeat 1
  # `pixtract run` itself, static then continuous, same documents, same model: the manifests' decode objects
  # (admissions, idle row share, host ms per step, ceiling) and wall times land in the logs.
  local b
  for b in static continuous; do
    rm -rf "$out/run-$tag-$b"
    printf '%s\n' "name = \"gpu-run-$b\"" "[source]" "uri = \"$out/run-inputs\"" "[model]" "dir = \"$model\"" \
      "device = \"$device\"" "batch_size = 8" "batching = \"$b\"" "max_new_tokens = 256" "[extract]" \
      "schema = \"schemas/receipt.json\"" "[output]" "uri = \"$out/run-$tag-$b\"" > "$out/run-$tag-$b.toml"
    step "run-$tag-$b" with_peak_memory "run-$tag-$b" "$bin" run "$out/run-$tag-$b.toml" --log-format json
    cat "$out/run-$tag-$b"/*/_manifest-*.json 2>/dev/null | "$python" -c "
import json, sys
m = json.load(sys.stdin)['summary']; d = m['decode']
print('run $b: %.1f s, %d rows, decode %s' % (m['seconds'], m['rows'], json.dumps(d)))" || true
  done
}

# 2. Models, each measured as soon as it exists.
models=${GPU_BENCH_MODELS:-}
if [ "$summary_only" = 0 ]; then
  "$python" -c "
from PIL import Image, ImageDraw
im = Image.new('RGB', (1024, 1024), 'white'); d = ImageDraw.Draw(im)
for i in range(60): d.text((40, 16 * i + 8), f'line {i:02d}  item {i * 7 % 13}  qty {i % 4 + 1}  EUR {i * 3.17:8.2f}', fill='black')
im.save('$page')" || failed=$((failed + 1))
  # 64 scans of different sizes and texts for the `pixtract run` comparison.
  "$python" scripts/make_stream_workload.py 64 "$out/run-inputs" >/dev/null || failed=$((failed + 1))
  if [ -n "$models" ]; then
    for model in $models; do measure "$model"; done
  else
    mkdir -p "$work"
    for d in $depths; do
      ckpt=$work/pixtral12b-$d
      model=$work/pixtral12b-$d-fp16-$attention
      step "checkpoint-$d" "$python" onnx-export/export.py random-checkpoint --like pixtral-12b \
        --text-layers "$d" --vision-layers 2 --out "$ckpt"
      step "export-$d" /usr/bin/time -v "$python" onnx-export/export.py export --checkpoint "$ckpt" \
        --dtype fp16 --attention "$attention" --out "$model"
      # The checkpoint is only the export's input: its disk goes back before the next depth's.
      rm -rf "$ckpt"
      models="$models $model"
      measure "$model"
    done
  fi
fi
[ -n "$models" ] || models=$(ls -d "$work"/pixtral12b-*-fp16-* 2>/dev/null | sort -V | tr '\n' ' ')

# 4. Summary.
"$python" - "$out" "$models" <<'PY' || failed=$((failed + 1))
import json, os, re, sys
out, models = sys.argv[1], sys.argv[2].split()
lim = json.load(open(os.path.join(out, "limits.json"))) if os.path.exists(os.path.join(out, "limits.json")) else {}
def read(name):
    p = os.path.join(out, name)
    return open(p).read() if os.path.exists(p) else ""
lines = ["# gpu-bench summary", "", f"limits: {lim}", ""]
lines.append("| model | decoder bytes | params | b1 decode tok/s | b1 limit (bw/bytes) | share | b8 | b32 | prefill tok/s | MFU | continuous (vision ahead)/static | decode: ahead / static (fastest possible) | peak MiB |")
lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
fits = []
for m in models:
    tag = os.path.basename(m)
    try:
        man = json.load(open(os.path.join(m, "pixtract-model.json")))
    except OSError:
        continue
    dec_bytes = sum(os.path.getsize(os.path.join(m, f)) for f in os.listdir(m) if f.startswith("decoder_model_merged"))
    # Weights a prompt token meets in the decoder: its parameters less the LM head (run on the last position only).
    text = man.get("text", {})
    elem = 2 if "16" in str(man.get("dtype", "fp32")) else 4
    params = dec_bytes / elem - text.get("vocab_size", 0) * text.get("hidden_size", 0)
    dec = {int(b): float(t) for b, t in re.findall(r"^(\d+)\s+pixtract \(Rust\)\s+\S+\s+(\S+)", read(f"decode-{tag}.log"), re.M)}
    pre = re.search(r"prefill [\d.]+ ms \(([\d.]+) tokens/s\)", read(f"prefill-{tag}.log"))
    pre = float(pre.group(1)) if pre else float("nan")
    ratio = re.search(r"vision ahead [\d.]+ tok/s \(([\d.]+)x\); every", read(f"batching-{tag}.log"))
    ratio = ratio.group(1) + "x" if ratio else "n/a"
    possible = re.search(r"scheduling ceiling ([\d.]+)x\. Decode / static: .*cont-ahead ([\d.]+)x", read(f"batching-{tag}.log"))
    possible = f"{possible.group(2)}x ({possible.group(1)}x)" if possible else "n/a"
    peak = max([int(read(f"{k}-{tag}.peak_mib") or 0) for k in ("decode", "prefill", "batching")])
    bw = lim.get("bandwidth_bytes_s", float("nan")); fl = lim.get("dense_flops", float("nan"))
    b1 = dec.get(1, float("nan")); limit = bw / dec_bytes if dec_bytes else float("nan")
    mfu = pre * 2 * params / fl if fl == fl else float("nan")
    lines.append(f"| {tag} | {dec_bytes/1e9:.2f} GB | {params/1e9:.2f} B | {b1:.1f} | {limit:.1f} | {b1/limit:.0%} | {dec.get(8, float('nan')):.1f} | {dec.get(32, float('nan')):.1f} | {pre:.0f} | {mfu:.1%} | {ratio} | {possible} | {peak or 'n/a'} |")
    fits.append((text.get("num_layers", 0), dec_bytes, params, 1 / b1, 1 / dec.get(8, float("nan")), 1 / pre))

# Per-layer fit: seconds per batch-1 token, per batch-8 token and per prefill token, and decoder bytes and
# parameters, each linear in the layer count (least squares), extrapolated to Pixtral 12B's 40 layers.
good = [f for f in fits if all(v == v and v not in (float("inf"),) for v in f)]
if len({f[0] for f in good}) >= 2:
    def at(i, layers):
        xs = [f[0] for f in good]; ys = [f[i] for f in good]
        mx = sum(xs) / len(xs); my = sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        return my + slope * (layers - mx), slope
    L = 40
    dec40, dec_per_layer = at(1, L); params40, _ = at(2, L)
    b1_40 = 1 / at(3, L)[0]; b8_40 = 1 / at(4, L)[0]; pre40 = 1 / at(5, L)[0]
    bw = lim.get("bandwidth_bytes_s", float("nan")); fl = lim.get("dense_flops", float("nan"))
    limit40 = bw / dec40
    page_s = 4400 / pre40 + 300 / b8_40
    lines += ["", f"Extrapolated to {L} text layers (linear fit over {sorted({f[0] for f in good})} layers; an "
              "extrapolation, not a measurement):", "",
              f"- decoder {dec40 / 1e9:.2f} GB ({dec_per_layer / 1e9:.3f} GB per layer), {params40 / 1e9:.2f} B parameters",
              f"- batch-1 decode {b1_40:.1f} tok/s vs {limit40:.1f} tok/s bandwidth limit ({b1_40 / limit40:.0%}); batch 8 {b8_40:.1f} tok/s",
              f"- prefill {pre40:.0f} tok/s, model FLOPs utilisation {pre40 * 2 * params40 / fl:.1%}",
              f"- a 1024x1024 page (~4,400 prompt tokens, 300 answer tokens, 8 rows decoding together, prefill not "
              f"overlapped): {page_s:.2f} s of GPU time, {1 / page_s:.2f} pages/s"]
open(os.path.join(out, "summary.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
echo
echo "gpu-bench: $failed failed step(s); logs and summary.md in $out"
exit "$failed"
