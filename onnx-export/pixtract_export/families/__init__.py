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
from . import pixtral


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
    )


PIXTRAL = _from_module(pixtral)
FAMILIES = {f.name: f for f in (PIXTRAL,)}


def get(name: str) -> Family:
    """The family a manifest names (manifests written before families existed name none: Pixtral)."""
    if name not in FAMILIES:
        raise ExportError(f"model family {name!r}: this exporter knows {', '.join(FAMILIES)}")
    return FAMILIES[name]


def for_checkpoint(path: str | None) -> Family:
    """The family of a checkpoint directory (None: the tiny test model). Pixtral is the only family so far; a second
    one is told apart here (config.json's model_type, params.json's vision_encoder)."""
    return PIXTRAL
