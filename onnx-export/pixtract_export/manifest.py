"""pixtract-model.json: the manifest, the contract between the exporter and the Rust runtime.

pixtract reads it (src/model/manifest.rs) to find the graphs and their external data files, check their sha256
(`pixtract doctor --verify-hashes`), and take every number it needs (widths, token ids, image normalisation)
without looking at a checkpoint. `format_version` changes when a field pixtract reads changes meaning.

Format 2 adds "family" (the model family the graphs come from, families/) and "image_tokens" (how a prompt lays out
an image's tokens: patch_size, spatial_merge, break_tokens), both from the family; everything else is format 1's.
Exports since the Mistral 3 family also record "prompt" (where the system prompt goes, by Tekken version: "system":
"user_prefix" (v3) or "tokens" (v7+)), the tokenizer's tekken.json ("tokenizer.tekken_file", "tekken_version") and the
text model's RoPE parameters ("text.rope"); a manifest without "prompt" is Pixtral's v3 layout.
"""

from __future__ import annotations

import hashlib
import json
import os

import onnx

from . import __version__
from .files import sha256_file
from .onnx_io import OPSET, weights_digest

MANIFEST_FILE = "pixtract-model.json"
# 2: the manifest names the model family ("family") and the image-token layout ("image_tokens").
FORMAT_VERSION = 2
# The graphs every family exports, in the manifest's order (src/model/manifest.rs reads them by these names).
GRAPH_KEYS = ("vision_encoder", "embed_tokens", "decoder")


def _io(values):
    out = []
    for v in values:
        t = v.type.tensor_type
        dims = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
        out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": dims})
    return out


def graph_entry(path: str, proto: onnx.ModelProto, external: bool, digest: str | None = None) -> dict:
    """The manifest's record of one written graph: its file, its external data file (when it has one), hashes."""
    entry = {
        "file": os.path.basename(path),
        "bytes": os.path.getsize(path),
        "sha256": sha256_file(path),
        "weights_sha256": digest or weights_digest(proto, os.path.dirname(path)),
        "inputs": _io(proto.graph.input),
        "outputs": _io(proto.graph.output),
    }
    if external:
        data = path + "_data"
        entry["external_data"] = {"file": os.path.basename(data), "bytes": os.path.getsize(data),
                                  "sha256": sha256_file(data)}
    return entry


def build_manifest(family, model, graphs: dict, tokenizer_path: str, dtype_name: str, source: dict,
                   tekken_path: str) -> dict:
    from .tekken import tekken_version

    import mistral_common
    import onnxruntime
    import torch
    import transformers

    cfg = model.config
    t, v = cfg.text_config, cfg.vision_config
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    weights = hashlib.sha256("".join(graphs[k]["weights_sha256"] for k in sorted(graphs)).encode()).hexdigest()
    version = tekken_version(tekken_path)
    return {
        "format": "pixtract-model",
        "format_version": FORMAT_VERSION,
        "family": family.name,
        "model_id": source["model_id"],
        "source": source,
        "dtype": dtype_name,
        # What the weights hold: fp32/fp16 here; `quantize` writes int8/int4/q8f16/q4f16 and a "quantization" record.
        "variant": dtype_name,
        "quantization": None,
        "weights_sha256": weights,
        "text": {
            "hidden_size": t.hidden_size,
            "num_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads,
            "head_dim": head_dim,
            "intermediate_size": t.intermediate_size,
            "vocab_size": t.vocab_size,
            "rope_theta": float(t.rope_parameters["rope_theta"]) if getattr(t, "rope_parameters", None)
            else float(t.rope_theta),
            "rms_norm_eps": t.rms_norm_eps,
            "max_position_embeddings": t.max_position_embeddings,
            # The RoPE the decoder graph computes (cos/sin from position_ids in the graph): recorded, not used.
            "rope": dict(getattr(t, "rope_parameters", None) or {}),
        },
        "vision": {
            "hidden_size": v.hidden_size,
            "num_layers": v.num_hidden_layers,
            "num_attention_heads": v.num_attention_heads,
            "head_dim": getattr(v, "head_dim", None) or v.hidden_size // v.num_attention_heads,
            "intermediate_size": v.intermediate_size,
            "patch_size": v.patch_size,
            "image_size": v.image_size,
        },
        "image": {
            "patch_size": v.patch_size,
            "max_image_size": v.image_size,
            "rescale": 1.0 / 255.0,
            "mean": list(family.image_mean),
            "std": list(family.image_std),
            "resize": "mistral-common: long side <= max_image_size (round half to even), "
                      "4-tap cubic a=-0.75 on f32 (OpenCV INTER_CUBIC)",
            "background": [255, 255, 255],
        },
        "image_tokens": family.image_token_layout(cfg),
        "tokens": {
            "unk": 0, "bos": 1, "eos": 2, "inst": 3, "inst_end": 4, "img": cfg.image_token_index, "pad": 11,
            "img_break": 12, "img_end": 13, "system_prompt": 17, "system_prompt_end": 18,
        },
        "tokenizer": {"file": os.path.basename(tokenizer_path), "sha256": sha256_file(tokenizer_path),
                      "tekken_file": os.path.basename(tekken_path), "tekken_version": version},
        "prompt": family.prompt_layout(version),
        "graphs": graphs,
        "exporter": {
            "name": "pixtract-export",
            "version": __version__,
            "onnx_exporter": "torchscript",
            "opset": OPSET,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
            "mistral_common": mistral_common.__version__,
        },
    }


def write_manifest(out_dir: str, manifest: dict) -> str:
    path = os.path.join(out_dir, MANIFEST_FILE)
    with open(path, "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    return path


def read_manifest(model_dir: str) -> dict:
    with open(os.path.join(model_dir, MANIFEST_FILE)) as f:
        return json.load(f)
