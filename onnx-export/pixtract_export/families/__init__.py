"""Model families: what the exporter needs to know of one kind of model, behind one interface (`Family`).

A family module (pixtral.py) holds everything specific to its models; this module turns it into a `Family` and keeps
the registry. Everything else (the checkpoint layouts, tracing, the manifest, the commands) is the same code for every
family and reaches a family only through this interface: layouts/ and trace.py are below the families and are handed
a Family (or the plans it builds), never import one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..files import ExportError
from . import mistral3, pixtral


@dataclass(frozen=True)
class Family:
    """One model family, as the rest of the exporter sees it."""

    # The manifest's "family".
    name: str
    # The model: its transformers class (imported when asked), the check of a Hugging Face config.json
    # (raises ExportError for another model), and the tiny seeded random model the tests export.
    model_class: Callable[[], type]
    check_hf_config: Callable[[str, dict], None]
    tiny_seed: int
    tiny_config: Callable[[], object]
    build_tiny_model: Callable[[int], object]
    # Mistral's consolidated layout: (Mistral name, Hugging Face name, RoPE rows) rows with "{i}" for a layer
    # number; the head count of each kind of RoPE rows; params.json <-> config.
    weight_names: tuple
    rope_heads: Callable[[str, object], int]
    config_from_params: Callable[[dict, str], object]
    params_from_config: Callable[[object], dict]
    # The graphs: (model, dtype, attention) -> [trace.GraphPlan] in the order they are written.
    build_graphs: Callable[..., list]
    # The manifest: how a prompt lays out an image's tokens ({"patch_size", "spatial_merge", "break_tokens"}), and
    # the image normalisation (mean, std per channel).
    image_token_layout: Callable[[object], dict]
    image_mean: tuple
    image_std: tuple
    # The prompt: how the system prompt is written for a Tekken version ({"system": "user_prefix" | "tokens",
    # "tekken_version"}), and the tekken.json the tiny and random models ship (write_default_tekken(path[, version]):
    # the family's own version by default).
    prompt_layout: Callable[[str], dict]
    write_default_tekken: Callable[..., None]


def _from_module(module) -> Family:
    return Family(
        name=module.NAME,
        model_class=module.model_class,
        check_hf_config=module.check_hf_config,
        tiny_seed=module.TINY_SEED,
        tiny_config=module.tiny_config,
        build_tiny_model=module.build_tiny_model,
        weight_names=module.NAME_TABLE,
        rope_heads=module.rope_heads,
        config_from_params=module.config_from_params,
        params_from_config=module.params_from_config,
        build_graphs=module.build_graphs,
        image_token_layout=module.image_token_layout,
        image_mean=module.IMAGE_MEAN,
        image_std=module.IMAGE_STD,
        prompt_layout=module.prompt_layout,
        write_default_tekken=module.write_default_tekken,
    )


PIXTRAL = _from_module(pixtral)
MISTRAL3 = _from_module(mistral3)
FAMILIES = {f.name: f for f in (PIXTRAL, MISTRAL3)}


def get(name: str) -> Family:
    """The family a manifest names (manifests written before families existed name none: Pixtral)."""
    if name not in FAMILIES:
        raise ExportError(f"model family {name!r}: this exporter knows {', '.join(FAMILIES)}")
    return FAMILIES[name]


def for_checkpoint(path: str | None, tiny: str | None = None) -> Family:
    """The family of a checkpoint directory: config.json's model_type (mistral3 / llava) in the Hugging Face layout,
    params.json's vision encoder (a patch merger: Mistral 3) in the consolidated one. Without a checkpoint, the tiny
    test model of the family named `tiny` (default Pixtral)."""
    import json
    import os

    if not path:
        return get(tiny or PIXTRAL.name)
    for name, key in (("config.json", "model_type"), ("params.json", "vision_encoder")):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            continue
        try:
            with open(file) as f:
                data = json.load(f)
        except (OSError, ValueError) as err:
            raise ExportError(f"{file}: not readable JSON ({err})") from None
        if name == "config.json":
            return MISTRAL3 if data.get(key) == "mistral3" else PIXTRAL
        vision = data.get(key) or {}
        merges = vision.get("spatial_merge_size", 1) != 1 or vision.get("mm_projector_id")
        return MISTRAL3 if merges else PIXTRAL
    return PIXTRAL
