"""The Hugging Face layout (config.json + *.safetensors, as mistral-community/pixtral-12b): read with transformers'
from_pretrained into the family's model class, written with save_pretrained plus the tokenizer files the Hugging Face
repo ships."""

from __future__ import annotations

import json
import os

import torch

from ..files import tekken_path

FILES = ("config.json", "*.safetensors")


def load_hf(path: str, dtype: torch.dtype, family):
    """The model of a Hugging Face checkpoint folder, in `dtype`, as `family`'s transformers model. Never the
    network."""
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    family.check_hf_config(path, cfg)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if (cfg.get("quantization_config") or {}).get("quant_method") == "fp8":
        return load_hf_fp8(path, dtype, family)
    # Loaded in the dtype the weights are stored in, then cast module by module: asking from_pretrained for another
    # dtype held the stored copy and the cast copy at once (bf16 -> fp16 of 2.5 B parameters: 10.5 GB peak for 5 GB
    # of weights). Only parameters are cast, one at a time; buffers (RoPE inverse frequencies, fp32) stay as
    # from_pretrained(dtype=...) leaves them.
    stored = cfg.get("dtype") or cfg.get("torch_dtype") or cfg.get("text_config", {}).get("dtype")
    stored = getattr(torch, stored, None) if isinstance(stored, str) else None
    if not isinstance(stored, torch.dtype) or not stored.is_floating_point:
        stored = dtype
    model = family.model_class().from_pretrained(
        path, dtype=stored, local_files_only=True, attn_implementation="eager"
    )
    if stored != dtype:
        with torch.no_grad():
            for param in model.parameters():
                param.data = param.data.to(dtype)
        model.config.dtype = dtype
    model.eval()
    return model


# Names older Hugging Face conversions used (transformers 4.x) -> transformers 5's, as from_pretrained renames them.
_OLD_PREFIXES = (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                 ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector."))


def load_hf_fp8(path: str, dtype: torch.dtype, family):
    """An FP8 checkpoint in the Hugging Face layout, without from_pretrained (which needs `accelerate` and, on GPUs of
    compute capability 8.9 and above, keeps FP8 modules): its safetensors files streamed tensor by tensor, FP8 weights
    dequantized with their weight_scale_inv (layouts/fp8.py), into a meta-built model, as for the consolidated
    layout."""
    import glob

    from .consolidated import load_streamed

    config = family.model_class().config_class.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the exported weights are dequantized

    def rename(key):
        for old, new in _OLD_PREFIXES:
            if key.startswith(old):
                return new + key[len(old):], None
        return key, None

    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    return load_streamed(config, files, dtype, family, "hf", rename, f"{path}: the safetensors files do not match "
                         "config.json")


def write_tokenizer_files(out: str, tekken: str | None = None):
    """tokenizer.json (+ tokenizer_config.json) as the Hugging Face repos ship them, converted from `tekken` (default
    Pixtral's, as mistral-community/pixtral-12b)."""
    from transformers.integrations.mistral.tokenizer import MistralConverter

    MistralConverter(vocab_file=tekken or tekken_path()).converted().save(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                   "unk_token": "<unk>", "pad_token": "<pad>", "add_bos_token": False, "add_eos_token": False,
                   "model_max_length": 1000000000000000019884624838656}, f, indent=2)
        f.write("\n")


def read_config(path: str, family):
    """The config of a Hugging Face checkpoint folder (config.json), without its weights."""
    return family.model_class().config_class.from_pretrained(path)


def write_hf(model, out: str, max_shard_size, tekken: str | None = None, fp8: bool = False):
    """The Hugging Face layout of `model`: config.json, generation_config.json, safetensors shards of at most
    max_shard_size + their index, and the tokenizer files (converted from `tekken`, default Pixtral's).

    fp8: the text model's projections as per-tensor FP8 with `weight_scale_inv` (and a unit `activation_scale`) in one
    model.safetensors, config.json's quantization_config as Ministral 3's instruct checkpoints have it."""
    if not fp8:
        model.save_pretrained(out, max_shard_size=max_shard_size, safe_serialization=True)
        write_tokenizer_files(out, tekken)
        return
    from safetensors.torch import save_file

    from .fp8 import is_quantized, store_quantized

    state = {}
    # A tied LM head is listed once (save_pretrained would store it twice; the loader takes either).
    for name, tensor in model.named_parameters():
        tensor = tensor.detach().contiguous()
        if is_quantized(name, "hf"):
            store_quantized(state, name, tensor, "hf")
        else:
            state[name] = tensor
    save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": None,
                                  "modules_to_not_convert": ["model.vision_tower", "model.multi_modal_projector",
                                                             "lm_head"]}
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    write_tokenizer_files(out, tekken)
