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


def write_hf(model, out: str, max_shard_size, tekken: str | None = None):
    """The Hugging Face layout of `model`: config.json, generation_config.json, safetensors shards of at most
    max_shard_size + their index, and the tokenizer files (converted from `tekken`, default Pixtral's)."""
    model.save_pretrained(out, max_shard_size=max_shard_size, safe_serialization=True)
    write_tokenizer_files(out, tekken)
