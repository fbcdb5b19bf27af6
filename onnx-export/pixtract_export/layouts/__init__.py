"""Checkpoint layouts on disk, read into a family's transformers model (the family is passed in: layouts sit below
families/ and import none of them).

  hf.py            the Hugging Face layout: config.json + *.safetensors (mistral-community/pixtral-12b)
  consolidated.py  Mistral's consolidated layout: params.json + consolidated.safetensors + tekken.json
                   (mistralai/Pixtral-12B-2409), converted in memory to the Hugging Face names
  meta.py          buffers of a model built on the meta device

This module tells the layouts apart and dispatches to them.
"""

from __future__ import annotations

import os
import shutil

from ..files import ExportError

LAYOUT_NAMES = {"hf": "Hugging Face layout (config.json + safetensors, as mistral-community/pixtral-12b)",
                "consolidated": "Mistral consolidated layout (params.json + consolidated.safetensors + tekken.json, "
                                "as mistralai/Pixtral-12B-2409), converted in memory to the Hugging Face names"}


def checkpoint_layout(path: str) -> str:
    """"hf" (config.json + *.safetensors) or "consolidated" (params.json + consolidated.safetensors + tekken.json);
    otherwise one line naming what each layout lacks."""
    from .consolidated import FILES as CONSOLIDATED_FILES
    from .hf import FILES as HF_FILES

    if not os.path.isdir(path):
        raise ExportError(f"{path}: no such checkpoint directory")
    names = set(os.listdir(path))
    has = lambda want: any(n.endswith(".safetensors") for n in names) if want == "*.safetensors" else want in names
    hf_missing = [n for n in HF_FILES if not has(n)]
    consolidated_missing = [n for n in CONSOLIDATED_FILES if not has(n)]
    # config.json decides for the HF layout: the mistralai repo ships no config.json, and a folder holding both
    # is read as the Hugging Face one.
    if not hf_missing:
        return "hf"
    if not consolidated_missing:
        return "consolidated"
    raise ExportError(f"{path}: not a Pixtral or Mistral 3 checkpoint: the Hugging Face layout "
                      f"(mistral-community/pixtral-12b) lacks {' and '.join(hf_missing)}; Mistral's consolidated "
                      f"layout (mistralai/Pixtral-12B-2409) lacks {' and '.join(consolidated_missing)}")


def load_checkpoint(path: str, dtype, family):
    """A local checkpoint directory in either layout (checkpoint_layout), as `family`'s model. Never the network."""
    layout = checkpoint_layout(path)
    print(f"checkpoint {path}: {LAYOUT_NAMES[layout]}")
    if layout == "consolidated":
        from .consolidated import load_consolidated

        return load_consolidated(path, dtype, family)
    from .hf import load_hf

    return load_hf(path, dtype, family)


def read_config(path: str, family):
    """The config of a checkpoint directory in either layout, without its weights."""
    if checkpoint_layout(path) == "consolidated":
        from .consolidated import read_config as read_params

        return read_params(path, family)
    from .hf import read_config as read_hf_config

    return read_hf_config(path, family)


def write_tokenizer(out_dir: str, checkpoint: str | None, family) -> tuple[str, str]:
    """tekken.json and tokenizer.json (for the Rust `tokenizers` crate) in out_dir; returns their paths.

    tekken.json is the checkpoint's own; a checkpoint without one (the Hugging Face Pixtral repo) gets Pixtral's from
    mistral-common, and the tiny model its family's (family.write_default_tekken). Its version decides the prompt
    layout the manifest records. tokenizer.json is the checkpoint's own when it has one, otherwise converted from
    tekken.json the way transformers converts it.
    """
    tekken_dst = os.path.join(out_dir, "tekken.json")
    own = os.path.join(checkpoint, "tekken.json") if checkpoint else ""
    if os.path.isfile(own):
        shutil.copyfile(own, tekken_dst)
    elif checkpoint and family.name != "pixtral":
        raise ExportError(f"{checkpoint}: no tekken.json; a {family.name} checkpoint's Tekken version decides its "
                          "prompt layout (Mistral's repositories ship tekken.json: copy it beside config.json)")
    else:
        family.write_default_tekken(tekken_dst)
    dst = os.path.join(out_dir, "tokenizer.json")
    if checkpoint and os.path.isfile(os.path.join(checkpoint, "tokenizer.json")):
        shutil.copyfile(os.path.join(checkpoint, "tokenizer.json"), dst)
        return dst, tekken_dst
    from transformers.integrations.mistral.tokenizer import MistralConverter

    MistralConverter(vocab_file=tekken_dst).converted().save(dst)
    return dst, tekken_dst
