"""`sizes`: weight bytes per variant, computed from the model's parameter shapes and the storage formats.

The model is built on torch's meta device (shapes, no weights), so Pixtral 12B's figures need only its config.
Each parameter lands in one graph the way `export` splits the model (vision tower + projector -> vision_encoder,
token embeddings -> embed_tokens, text layers + LM head -> decoder). Float tensors take 4 or 2 bytes per value.
A MatMul weight [K in, N out] quantized by MatMulNBits at b bits with block size B stores (onnxruntime's layout):
  packed weights  N * ceil(K/B) * B * b / 8 bytes
  scales          N * ceil(K/B) values in the activation dtype
  zero points     N * ceil(ceil(K/B) * b / 8) bytes (asymmetric only)
`--model DIR` checks this arithmetic against an exported directory's actual initializers.
"""

from __future__ import annotations

import json
import math
import os
import sys

import onnx

from .files import ExportError
from .onnx_io import tensor_nbytes

# mistral-community/pixtral-12b config.json, used when no checkpoint is given.
PIXTRAL_12B = {
    "text": dict(hidden_size=5120, intermediate_size=14336, num_hidden_layers=40, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=128, vocab_size=131072, rope_theta=1e9, rms_norm_eps=1e-5,
                 max_position_embeddings=1024000, tie_word_embeddings=False),
    "vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   head_dim=64, num_channels=3, patch_size=16, image_size=1024, hidden_act="silu",
                   rope_theta=10000.0),
}

# (name, activation bytes, bits or None): the variants `export`/`quantize` write, decoder quantized.
VARIANTS = [("fp32", 4, None), ("fp16", 2, None), ("int8", 4, 8), ("int4", 4, 4), ("q8f16", 2, 8),
            ("q4f16", 2, 4)]
# CUDA context, cuBLAS/cuDNN workspaces and ONNX Runtime's arena slack: an allowance, stated rather than measured.
RUNTIME_ALLOWANCE = 1 << 30


def _config(checkpoint: str | None, tiny: bool, family=None):
    from transformers import LlavaConfig, MistralConfig, PixtralVisionConfig

    from . import families
    from .layouts import checkpoint_layout, read_config

    family = family or families.for_checkpoint(checkpoint)
    if tiny:
        return family.tiny_config(), "tiny test model"
    if checkpoint:
        kind = "params.json" if checkpoint_layout(checkpoint) == "consolidated" else "config"
        return read_config(checkpoint, family), f"{kind} of {checkpoint}"
    return LlavaConfig(
        vision_config=PixtralVisionConfig(**PIXTRAL_12B["vision"]),
        text_config=MistralConfig(**PIXTRAL_12B["text"]),
        image_token_index=10, projector_hidden_act="gelu", vision_feature_layer=-1,
        vision_feature_select_strategy="full", multimodal_projector_bias=True, tie_word_embeddings=False,
    ), "Pixtral 12B (mistral-community/pixtral-12b config)"


def tensor_inventory(config) -> dict:
    """{graph: {"matmul": [(K, N)], "float": values}} for the export's split of the model."""
    import torch
    from torch import nn

    from . import families

    family = families.MISTRAL3 if config.model_type == "mistral3" else families.PIXTRAL
    with torch.device("meta"):
        model = family.model_class()(config)
    linear_weights = {f"{name}.weight": mod for name, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    inv = {g: {"matmul": [], "float": 0} for g in ("vision_encoder", "embed_tokens", "decoder")}
    for name, param in model.named_parameters():
        if "vision_tower" in name or "multi_modal_projector" in name:
            graph = "vision_encoder"
        elif name.endswith("embed_tokens.weight"):
            graph = "embed_tokens"
        else:
            graph = "decoder"
        if name in linear_weights:
            n, k = param.shape  # nn.Linear stores [out, in]; the ONNX MatMul weight is its transpose [in, out]
            inv[graph]["matmul"].append((k, n))
        else:
            inv[graph]["float"] += param.numel()
    if getattr(config, "tie_word_embeddings", False):
        # A tied LM head is one parameter, but the decoder graph holds its own (transposed) copy of it.
        inv["decoder"]["matmul"].append((config.text_config.hidden_size, config.text_config.vocab_size))
    return inv


def matmul_nbits_bytes(k: int, n: int, bits: int, block: int, scale_bytes: int, symmetric: bool = False) -> int:
    blocks = math.ceil(k / block)
    packed = n * blocks * block * bits // 8
    scales = n * blocks * scale_bytes
    zeros = 0 if symmetric else n * math.ceil(blocks * bits / 8)
    return packed + scales + zeros


def graph_bytes(inv: dict, act_bytes: int, bits: int | None, block: int, quantized=("decoder",)) -> dict:
    out = {}
    for graph, parts in inv.items():
        total = parts["float"] * act_bytes
        for k, n in parts["matmul"]:
            if bits and graph in quantized:
                total += matmul_nbits_bytes(k, n, bits, block, act_bytes)
            else:
                total += k * n * act_bytes
        out[graph] = total
    return out


def kv_cache_bytes(config, tokens: int, act_bytes: int) -> int:
    t = config.text_config
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    return 2 * t.num_hidden_layers * t.num_key_value_heads * head_dim * tokens * act_bytes


def attention_scores_bytes(config, tokens: int, act_bytes: int) -> int:
    """The exported decoder computes attention explicitly: one layer's [heads, S, S] scores exist at a time."""
    return config.text_config.num_attention_heads * tokens * tokens * act_bytes


def measured_bytes(model_dir: str) -> dict:
    with open(os.path.join(model_dir, "pixtract-model.json")) as f:
        manifest = json.load(f)
    out = {}
    for graph, entry in manifest["graphs"].items():
        # Sizes from the initializers' dims and types: external data is never read (a 12B decoder is 24 GB).
        proto = onnx.load(os.path.join(model_dir, entry["file"]), load_external_data=False)
        out[graph] = sum(tensor_nbytes(t) for t in proto.graph.initializer)
    return manifest, out


def files_on_disk(model_dir: str, manifest: dict) -> list[dict]:
    """Per graph: the bytes the manifest records (graph + external data) against the files' sizes on disk."""
    rows = []
    for graph, entry in manifest["graphs"].items():
        files = [entry["file"]] + ([entry["external_data"]["file"]] if "external_data" in entry else [])
        recorded = entry["bytes"] + entry.get("external_data", {}).get("bytes", 0)
        on_disk = sum(os.path.getsize(os.path.join(model_dir, f)) for f in files
                      if os.path.isfile(os.path.join(model_dir, f)))
        rows.append({"graph": graph, "files": files, "recorded": recorded, "on_disk": on_disk,
                     "ok": recorded == on_disk})
    return rows


def run_sizes(args) -> int:
    if getattr(args, "like", None):
        from .random_checkpoint import random_config

        config, label = random_config(args.like, None, None), f"{args.like} (published widths and depth)"
    else:
        config, label = _config(args.checkpoint, args.tiny)
    inv = tensor_inventory(config)
    params = {g: p["float"] + sum(k * n for k, n in p["matmul"]) for g, p in inv.items()}
    rows = []
    for name, act, bits in VARIANTS:
        per_graph = graph_bytes(inv, act, bits, args.block_size)
        weights = sum(per_graph.values())
        kv = kv_cache_bytes(config, args.context, act)
        scores = attention_scores_bytes(config, args.context, act)
        rows.append({"variant": name, "graphs": per_graph, "weights": weights, "kv_cache": kv,
                     "attention_scores": scores, "min_gpu": weights + kv + scores + RUNTIME_ALLOWANCE})
    checks = []
    disk = []
    failed = False
    for model_dir in args.model:
        manifest, actual = measured_bytes(model_dir)
        for row in files_on_disk(model_dir, manifest):
            failed |= not row["ok"]
            disk.append({"model": model_dir, "initializers": actual[row["graph"]], **row})
        q = manifest.get("quantization") or {}
        act = 2 if manifest["dtype"] == "fp16" else 4
        computed = graph_bytes(inv, act, q.get("bits"), q.get("block_size", args.block_size),
                               tuple(q.get("graphs", {}).keys()))
        for graph in actual:
            diff = actual[graph] - computed[graph]
            ok = abs(diff) <= max(4096, 0.001 * computed[graph])
            failed |= not ok
            checks.append({"model": model_dir, "variant": manifest.get("variant", manifest["dtype"]),
                           "graph": graph, "computed": computed[graph], "actual": actual[graph], "ok": ok})
    if args.json:
        json.dump({"model": label, "parameters": params, "block_size": args.block_size, "context": args.context,
                   "runtime_allowance": RUNTIME_ALLOWANCE, "variants": rows, "checks": checks,
                   "files": disk}, sys.stdout, indent=1)
        print()
    else:
        gb, unit = (1e9, "GB") if rows[0]["weights"] >= 1e9 else (1e6, "MB")
        print(f"{label}: {sum(params.values()) / 1e9:.3f} B parameters (vision_encoder "
              f"{params['vision_encoder'] / 1e9:.3f} B, embed_tokens {params['embed_tokens'] / 1e9:.3f} B, decoder "
              f"{params['decoder'] / 1e9:.3f} B); quantized variants: decoder MatMuls, block size {args.block_size}")
        print(f"minimum GPU memory = weights + KV cache for {args.context} tokens + one layer's attention scores "
              f"for a {args.context}-token prefill + {RUNTIME_ALLOWANCE / 2**30:.0f} GiB runtime allowance, batch 1")
        print(f"| variant | vision_encoder {unit} | embed_tokens {unit} | decoder {unit} | weights {unit} | "
              f"KV cache {unit} | min GPU memory GB |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            g = r["graphs"]
            print(f"| {r['variant']} | {g['vision_encoder'] / gb:.3f} | {g['embed_tokens'] / gb:.3f} | "
                  f"{g['decoder'] / gb:.3f} | {r['weights'] / gb:.3f} | {r['kv_cache'] / gb:.3f} | "
                  f"{r['min_gpu'] / 1e9:.2f} |")
        for c in checks:
            print(f"check {c['model']} ({c['variant']}) {c['graph']}: computed {c['computed']:,} bytes, actual "
                  f"initializers {c['actual']:,} ({'ok' if c['ok'] else 'MISMATCH'})")
        for d in disk:
            print(f"files {d['model']} {d['graph']}: {' + '.join(d['files'])} = {d['on_disk']:,} bytes on disk, "
                  f"manifest {d['recorded']:,}, initializers {d['initializers']:,} "
                  f"({'ok' if d['ok'] else 'MISMATCH'})")
    if failed:
        print("sizes: the computed bytes or the files on disk do not match an exported model (see MISMATCH above)", file=sys.stderr)
        return 1
    return 0
