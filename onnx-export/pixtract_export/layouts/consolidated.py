"""Mistral's consolidated layout (as mistralai/Pixtral-12B-2409): params.json, consolidated.safetensors, tekken.json.

The exporter reads it by converting in memory to the Hugging Face names of the family's transformers model (for
Pixtral the LlavaForConditionalGeneration names of mistral-community/pixtral-12b), so everything after loading is the
same code for both layouts. This module is the mechanism; what is specific to a model family comes from the family
(families/): its name table (`weight_names`: Mistral name, Hugging Face name, RoPE rows), the head count of each
kind of RoPE rows (`rope_heads`), and params.json <-> config (`config_from_params`, `params_from_config`).

The row permutation of q/k is not re-implemented: it is transformers' own `PermuteForRope` conversion op
(transformers.core_model_loading), and its `reverse_op` for writing.

Why q/k are permuted. Mistral's reference code applies RoPE to interleaved pairs (dims 2i, 2i+1 form one complex
number); transformers' Mistral and Pixtral apply it "rotate-half" (dim i pairs with dim i + head_dim/2). The
upstream conversion script (transformers' convert_pixtral_weights_to_hf.py) therefore permutes the output rows of
every q and k projection, per head: text wq with the 32 query heads, text wk with the 8 KV heads (not the query
heads), vision wq and wk with the 16 vision heads (the 2D RoPE of the vision encoder is interleaved the same way).
v, o, MLPs, norms and the adapter are renamed only.
"""

from __future__ import annotations

import json
import os
import re
import types

import torch

from ..files import ExportError
from .meta import rebuild_buffers
from .safetensors_io import read_safetensors

FILES = ("params.json", "consolidated.safetensors", "tekken.json")


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)") + r"\Z")


def _tables(family) -> tuple[list, list]:
    """The family's name table compiled both ways: Mistral -> Hugging Face, Hugging Face -> Mistral."""
    to_hf = [(_pattern(m), h, rope) for m, h, rope in family.weight_names]
    to_mistral = [(_pattern(h), m, rope) for m, h, rope in family.weight_names]
    return to_hf, to_mistral


def _rename(name: str, table) -> tuple[str, str | None] | None:
    for pattern, template, rope in table:
        found = pattern.match(name)
        if found:
            return template.replace("{i}", found.groupdict().get("i") or ""), rope
    return None


def permute_rows(tensor: torch.Tensor, rope: str, config, to_hf: bool, family) -> torch.Tensor:
    """Interleaved-pair RoPE rows (Mistral) <-> rotate-half rows (transformers), with transformers' own op."""
    from transformers.core_model_loading import PermuteForRope

    op = PermuteForRope()
    if not to_hf:
        op = op.reverse_op
    # The op reads the head count from config.num_attention_heads; for the text k projection that must be the KV
    # heads, so it is handed exactly the count this tensor needs.
    heads = types.SimpleNamespace(num_attention_heads=family.rope_heads(rope, config))
    return op.convert({"w": tensor}, source_patterns=["w"], target_patterns=["w"], config=heads)["w"].contiguous()


def read_config(path: str, family):
    with open(os.path.join(path, "params.json")) as f:
        try:
            params = json.load(f)
        except json.JSONDecodeError as err:
            raise ExportError(f"{path}/params.json: not JSON ({err})") from None
    return family.config_from_params(params, os.path.join(path, "params.json"))


def load_consolidated(path: str, dtype: torch.dtype, family):
    """The model of a consolidated folder, with Hugging Face names, in `dtype`. Tensors are read one at a time from
    the safetensors file (read_safetensors: not mapped), renamed, their q/k rows permuted, cast (FP8 weights
    dequantized with their scales, layouts/fp8.py), and assigned into a model built on the meta device: the weights
    are held once (plus one tensor in flight), as for the Hugging Face layout."""
    config = read_config(path, family)
    to_hf, _ = _tables(family)

    def rename(key):
        renamed = _rename(key, to_hf)
        return renamed if renamed else (None, None)

    files = [os.path.join(path, "consolidated.safetensors")]
    return load_streamed(config, files, dtype, family, "consolidated", rename,
                         f"{path}/consolidated.safetensors does not match its params.json")


def load_streamed(config, files: list[str], dtype: torch.dtype, family, layout: str, rename, mismatch: str):
    """A meta-built model of `config` given the tensors of `files`, read one at a time: rename(key) -> (Hugging Face
    name, RoPE rows | None) (name None: not a weight of this model), q/k rows permuted when RoPE rows are named, FP8
    weights dequantized (their scales read first), everything cast to `dtype`. A tied model (Ministral 3 3B) has no
    LM head of its own: it is tied after loading."""
    from . import fp8

    config._attn_implementation = "eager"
    with torch.device("meta"):
        model = family.model_class()(config)
    wanted = {name for name, _ in model.named_parameters()}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    scales = fp8.read_scales(files, layout)
    if scales:
        print(f"  FP8 weights (per-tensor float8_e4m3, {len(scales)} scales): dequantized to "
              f"{str(dtype).replace('torch.', '')} as they are read")
    weights, unknown = {}, []
    for file in files:
        for key, tensor in read_safetensors(file, select=lambda n: fp8.is_weight(n, layout)):
            name, rope = rename(key)
            if tied and name == "lm_head.weight":
                continue  # transformers' save_pretrained stores a tied head too; the model ties it to the embeddings
            if name is None or name not in wanted:
                unknown.append(key)
                continue
            if tensor.dtype == torch.float8_e4m3fn:
                tensor = fp8.dequantize(key, tensor, scales, layout, dtype)
            if rope:
                tensor = permute_rows(tensor, rope, config, to_hf=True, family=family)
            weights[name] = tensor.to(dtype)
            del tensor
    missing = sorted(wanted - weights.keys())
    if unknown or missing:
        raise ExportError(f"{mismatch}: {len(unknown)} unknown tensors {unknown[:3]}, {len(missing)} missing "
                          f"{missing[:3]}")
    model.load_state_dict(weights, strict=False, assign=True)
    del weights
    if tied:
        model.tie_weights()
    rebuild_buffers(model)
    model.config.dtype = dtype
    model.eval()
    return model


def write_consolidated(model, out: str, family, fp8: bool = False):
    """consolidated.safetensors + params.json of a Hugging Face-named model (the inverse of load_consolidated); the
    caller writes tekken.json. fp8: the text model's projections stored as per-tensor FP8 with their `qscale_weight`
    (and a unit `qscale_act`), params.json's quantization naming fp8_e4m3, as Ministral 3's instruct checkpoints."""
    from safetensors.torch import save_file

    from .fp8 import is_quantized, store_quantized

    _, to_mistral = _tables(family)
    params = dict(model.named_parameters())  # a tied LM head is listed once: Mistral stores no output.weight then
    state = {}
    for name, tensor in model.state_dict().items():
        renamed = _rename(name, to_mistral)
        if renamed is None or name not in params:
            continue  # buffers (RoPE inverse frequencies) and tied copies: not stored by Mistral either
        key, rope = renamed
        tensor = permute_rows(tensor, rope, model.config, to_hf=False, family=family) if rope else tensor.contiguous()
        if fp8 and is_quantized(key, "consolidated"):
            store_quantized(state, key, tensor, "consolidated")
        else:
            state[key] = tensor
    unmapped = sorted(n for n, _ in model.named_parameters() if _rename(n, to_mistral) is None)
    if unmapped:
        raise ExportError(f"consolidated layout: no Mistral name for {unmapped[:3]}")
    save_file(state, os.path.join(out, "consolidated.safetensors"), metadata={"format": "pt"})
    params_json = family.params_from_config(model.config)
    if fp8:
        params_json["quantization"] = {"qformat_weight": "fp8_e4m3", "qscheme_act": "TENSOR"}
    with open(os.path.join(out, "params.json"), "w") as f:
        json.dump(params_json, f, indent=2)
        f.write("\n")
