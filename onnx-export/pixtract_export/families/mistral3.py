"""Mistral 3 (Mistral3ForConditionalGeneration: Ministral 3 3B/8B/14B, Mistral Small 3.1/3.2): Pixtral's vision
encoder at 14-px patches, a projector with a 2x2 patch merger, and a Mistral (Small) or Ministral 3 (YaRN RoPE, query
scaling by position) text model. families/__init__.py turns it into the `Family` the rest of the exporter uses; the
facts behind every choice here are in docs/mistral3-family.md (read from transformers 5.24 and mistral-common 1.13.1).

  - vision_encoder: pixel_values [1,3,H,W], H and W multiples of 28 (patch 14 x merge 2) -> image_features
    [(H/28)(W/28), text_hidden]: tower -> RMSNorm (eps of the TEXT config, as transformers builds it) -> patch merger
    (each 2x2 square of patches, features in (channel, row, column) order as torch's unfold gives them, -> Linear
    4d -> d) -> linear_1 -> GELU -> linear_2 (no biases)
  - decoder: Pixtral's graph; Ministral 3's YaRN is only other RoPE frequencies (cos/sin are computed in the graph
    from position_ids), and its query scale 1 + beta * ln(1 + floor(pos / original_max_positions)) is applied in the
    graph after RoPE (eager: transformers' own attention does it; gqa: graphs_common.GroupQueryDecoder's query_scale),
    so prompts of any length up to max_position_embeddings are computed as transformers computes them.
  - prompts: Tekken v7 and later, the system prompt between [SYSTEM_PROMPT] and [/SYSTEM_PROMPT] before [INST]
    (the manifest's "prompt"), one [IMG] per merged 28-px square.
"""

from __future__ import annotations

import torch
from torch import nn

from ..files import ExportError
from ..tekken import write_synthetic_tekken
from ..trace import GraphPlan
from .graphs_common import build_graphs as build_graphs_common
from .graphs_common import draw_seeded_weights, vision_tower_states
from .mistral_names import TEXT, VISION_TOWER, rope_heads  # noqa: F401 - rope_heads is the family's

NAME = "mistral3"

# CLIP's mean/std, as mistral-common's image encoder applies them for every Tekken image config.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

TINY_SEED = 20251202
TINY_WEIGHT_STD = 0.2
# The tiny model's Tekken version: Ministral 3's (v13); its prompt layout is v7's.
TINY_TEKKEN_VERSION = "v13"

# YaRN as Ministral 3 ships it (transformers' Ministral3Config defaults, Megatron-Bridge's provider): factor 16 over
# 16,384 original positions, attention factor 1.0, query scale beta 0.1.
MINISTRAL3_ROPE = {"type": "yarn", "factor": 16.0, "original_max_position_embeddings": 16384, "beta_fast": 32.0,
                   "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1}


def model_class():
    """The transformers class a Mistral 3 checkpoint loads into."""
    from transformers import Mistral3ForConditionalGeneration

    return Mistral3ForConditionalGeneration


def check_hf_config(path: str, cfg: dict):
    """A Hugging Face config.json that is not Mistral 3 with Pixtral vision and a Mistral / Ministral 3 text model."""
    vision = cfg.get("vision_config", {}).get("model_type")
    text = cfg.get("text_config", {}).get("model_type")
    if cfg.get("model_type") != "mistral3" or vision != "pixtral" or text not in ("mistral", "ministral3"):
        raise ExportError(f"{path}: config.json describes model_type={cfg.get('model_type')!r} with vision {vision!r} "
                          f"and text {text!r}; the Mistral 3 family is mistral3 + pixtral + mistral|ministral3")
    layer = cfg.get("vision_feature_layer", -1)
    if layer != -1:
        raise ExportError(f"{path}: vision_feature_layer {layer!r}; pixtract exports the last layer's features only")
    if cfg.get("text_config", {}).get("sliding_window"):
        raise ExportError(f"{path}: a sliding-window text model; pixtract's decoder attends to the whole prompt")
    quant = cfg.get("quantization_config")
    if quant and (quant.get("quant_method") != "fp8" or quant.get("weight_block_size")):
        raise ExportError(f"{path}: quantization_config {quant}: pixtract dequantizes per-tensor FP8 only")


def image_token_layout(config) -> dict:
    """One [IMG] token per merged square of spatial_merge x spatial_merge patches (28 px), rows ended by [IMG_BREAK],
    the last by [IMG_END] (mistral-common's ImageEncoder with spatial_merge_size 2)."""
    return {"patch_size": config.vision_config.patch_size, "spatial_merge": config.spatial_merge_size,
            "break_tokens": True}


def prompt_layout(tekken_version: str) -> dict:
    """How a prompt holds the system prompt, by Tekken version: v7 and later have [SYSTEM_PROMPT] tokens."""
    number = int(tekken_version.lstrip("v"))
    if number < 7 or number > 13:
        # v15 joins adjacent text chunks without a blank line (mistral-common's InstructRequestNormalizerV15): a layout
        # pixtract does not build yet.
        raise ExportError(f"Tekken {tekken_version}: pixtract lays out the Mistral 3 family's prompts for Tekken v7 to "
                          "v13")
    return {"system": "tokens", "tekken_version": tekken_version}


def write_default_tekken(path: str, version: str = TINY_TEKKEN_VERSION):
    """A synthetic Tekken of `version` with the family's image section (patch 14, 1540 px, merge 2): Pixtral's
    vocabulary (tekken.write_synthetic_tekken), for the tiny and random checkpoints."""
    write_synthetic_tekken(path, version, {"image_patch_size": 14, "max_image_size": 1540, "spatial_merge_size": 2})


def _text_config(width: dict, rope: dict | None):
    """MistralConfig (plain RoPE, rope=None) or Ministral3Config (YaRN + query scale) from one set of widths."""
    from transformers import Ministral3Config, MistralConfig

    common = dict(hidden_act="silu", sliding_window=None, bos_token_id=1, eos_token_id=2, pad_token_id=11)
    if rope is None:
        return MistralConfig(**width, **common)
    theta = width.pop("rope_theta")
    return Ministral3Config(**width, **common, rope_parameters={**rope, "rope_theta": theta,
                                                                "max_position_embeddings":
                                                                    width["max_position_embeddings"]})


def _config(vision: dict, text, tied: bool, bias: bool = False):
    from transformers import Mistral3Config, PixtralVisionConfig

    config = Mistral3Config(vision_config=PixtralVisionConfig(**vision), text_config=text, image_token_index=10,
                            projector_hidden_act="gelu", vision_feature_layer=-1, multimodal_projector_bias=bias,
                            spatial_merge_size=2, tie_word_embeddings=tied)
    # The sub-config's own flag decides the tie in transformers 5.x; keep both in step.
    config.text_config.tie_word_embeddings = tied
    return config


def mistral3_config(vision: dict, text: dict, rope: dict | None, bias: bool = False):
    """Mistral3Config from PixtralVisionConfig fields, text fields (with rope_theta and tie_word_embeddings) and
    Ministral 3's RoPE parameters (None: a plain Mistral text model, as Mistral Small 3.x)."""
    text = dict(text)
    return _config(vision, _text_config(text, rope), tied=bool(text.get("tie_word_embeddings", False)), bias=bias)


def tiny_config():
    """The tiny Mistral 3: the real vocabulary, token ids, patch (14), image size (1540) and merge (2); toy widths
    (text hidden 32, 4 heads / 2 KV heads, head_dim 16; vision hidden 64). Ministral 3's YaRN and query scale with
    64 original positions instead of 16,384, so a reference prompt of a few hundred tokens crosses the ramp's
    frequencies and two steps of the query scale (positions 64 and 128)."""
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, head_dim=16,
                  num_channels=3, patch_size=14, image_size=1540, hidden_act="silu", rope_theta=10000.0)
    text = _text_config(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=16, vocab_size=131072, rope_theta=1e6, rms_norm_eps=1e-5,
                             max_position_embeddings=32768, tie_word_embeddings=False),
                        {**MINISTRAL3_ROPE, "original_max_position_embeddings": 64})
    return _config(vision, text, tied=False)


def build_tiny_model(seed: int = TINY_SEED):
    """Deterministic random weights: every parameter redrawn from a generator seeded once, in name order."""
    torch.manual_seed(seed)
    config = tiny_config()
    config._attn_implementation = "eager"
    model = model_class()(config)
    draw_seeded_weights(model, seed, TINY_WEIGHT_STD)
    model.eval()
    return model


# The consolidated layout's names (mistral_names.py), as transformers' conversion_mapping.py maps Ministral 3's
# checkpoints (docs/mistral3-family.md §4): the shared rows, and a projector without biases plus the pre-projector
# norm and the patch merger.
PROJECTOR = (
    ("pre_mm_projector_norm.weight", "model.multi_modal_projector.norm.weight", None),
    ("patch_merger.merging_layer.weight", "model.multi_modal_projector.patch_merger.merging_layer.weight", None),
    ("vision_language_adapter.w_in.weight", "model.multi_modal_projector.linear_1.weight", None),
    ("vision_language_adapter.w_out.weight", "model.multi_modal_projector.linear_2.weight", None),
)
NAME_TABLE = VISION_TOWER + PROJECTOR + TEXT


def config_from_params(params: dict, path: str = "params.json"):
    """Mistral3Config for a Mistral 3 params.json: Ministral 3's when it has a `yarn` section (plus
    `llama_4_scaling`), Mistral Small's otherwise."""
    vision = params.get("vision_encoder")
    if not isinstance(vision, dict):
        raise ExportError(f"{path}: no vision_encoder section; pixtract exports vision models only")
    if vision.get("spatial_merge_size", 1) != 2 or not vision.get("add_pre_mm_projector_layer_norm"):
        raise ExportError(f"{path}: vision_encoder without a 2x2 patch merger and pre-projector norm "
                          f"(spatial_merge_size {vision.get('spatial_merge_size')!r}): not a Mistral 3 checkpoint")
    quant = params.get("quantization")
    if quant and quant.get("qformat_weight") != "fp8_e4m3":
        raise ExportError(f"{path}: quantization {quant}: pixtract dequantizes per-tensor fp8_e4m3 only")
    try:
        width = dict(hidden_size=params["dim"], intermediate_size=params["hidden_dim"],
                     num_hidden_layers=params["n_layers"], num_attention_heads=params["n_heads"],
                     num_key_value_heads=params["n_kv_heads"],
                     head_dim=params.get("head_dim", params["dim"] // params["n_heads"]),
                     vocab_size=params["vocab_size"], rope_theta=params["rope_theta"], rms_norm_eps=params["norm_eps"],
                     max_position_embeddings=params.get("max_position_embeddings", 131072),
                     tie_word_embeddings=bool(params.get("tied_embeddings", False)))
        rope = None
        if "yarn" in params:
            yarn, scaling = params["yarn"], params.get("llama_4_scaling") or {}
            # apply_scale: the attention factor from mscale; Ministral 3's checkpoints leave it off (factor 1.0).
            mscale = 0.0 if yarn.get("apply_scale") else 1.0
            rope = {"type": "yarn", "factor": float(yarn["factor"]),
                    "original_max_position_embeddings": int(yarn["original_max_position_embeddings"]),
                    "beta_fast": float(yarn.get("beta", 32.0)), "beta_slow": float(yarn.get("alpha", 1.0)),
                    "mscale": 1.0, "mscale_all_dim": mscale,
                    "llama_4_scaling_beta": float(scaling.get("beta", 0.0))}
        vision_config = dict(
            hidden_size=vision["hidden_size"], intermediate_size=vision["intermediate_size"],
            num_hidden_layers=vision["num_hidden_layers"], num_attention_heads=vision["num_attention_heads"],
            head_dim=vision["hidden_size"] // vision["num_attention_heads"], num_channels=vision["num_channels"],
            patch_size=vision["patch_size"], image_size=vision.get("max_image_size", vision["image_size"]),
            hidden_act="silu", rope_theta=vision["rope_theta"])
    except KeyError as err:
        raise ExportError(f"{path}: no {err.args[0]!r}; not a Mistral 3 params.json") from None
    return _config(vision_config, _text_config(width, rope), tied=width["tie_word_embeddings"],
                   bias=bool(vision.get("adapter_bias", False)))


def params_from_config(config) -> dict:
    """params.json as Mistral writes it for Ministral 3 / Mistral Small 3.1 (the inverse of config_from_params)."""
    t, v = config.text_config, config.vision_config
    rope = t.rope_parameters or {}
    out = {
        "dim": t.hidden_size, "n_layers": t.num_hidden_layers, "head_dim": t.head_dim,
        "hidden_dim": t.intermediate_size, "n_heads": t.num_attention_heads, "n_kv_heads": t.num_key_value_heads,
        "rope_theta": float(rope.get("rope_theta", getattr(t, "rope_theta", 0.0))), "norm_eps": t.rms_norm_eps,
        "vocab_size": t.vocab_size, "max_position_embeddings": t.max_position_embeddings,
        "tied_embeddings": bool(config.tie_word_embeddings),
        "vision_encoder": {
            "hidden_size": v.hidden_size, "num_channels": v.num_channels, "image_size": v.image_size,
            "max_image_size": v.image_size, "patch_size": v.patch_size,
            "rope_theta": float((v.rope_parameters or {}).get("rope_theta", 10000.0)),
            "intermediate_size": v.intermediate_size, "num_hidden_layers": v.num_hidden_layers,
            "num_attention_heads": v.num_attention_heads, "image_token_id": config.image_token_index,
            "image_break_token_id": 12, "image_end_token_id": 13, "adapter_bias": bool(config.multimodal_projector_bias),
            "spatial_merge_size": config.spatial_merge_size, "mm_projector_id": "patch_merge",
            "add_pre_mm_projector_layer_norm": True,
        },
    }
    if rope.get("rope_type", rope.get("type")) == "yarn":
        out["yarn"] = {"factor": rope["factor"], "original_max_position_embeddings":
                       rope["original_max_position_embeddings"], "beta": rope["beta_fast"], "alpha": rope["beta_slow"],
                       "apply_scale": rope.get("mscale_all_dim", 1.0) == 0.0}
        out["llama_4_scaling"] = {"beta": rope.get("llama_4_scaling_beta", 0.0),
                                  "original_max_position_embeddings": rope["original_max_position_embeddings"]}
    return out


class VisionEncoder(nn.Module):
    """One image -> projected features, as Mistral3Model.get_image_features computes them for one image.

    The patch merger is written as Reshape/Transpose: [h*w, d] -> [h/2, 2, w/2, 2, d] -> (row pair, column pair,
    channel, row in pair, column in pair) -> [(h/2)(w/2), 4d], the order torch's unfold gives; the image's own grid
    (h, w) comes from its pixels, so no image_sizes input is needed. The runtime feeds H and W in multiples of 28,
    so no odd row or column is left over (transformers would drop it).
    """

    def __init__(self, model):
        super().__init__()
        self.tower = model.model.vision_tower
        self.projector = model.model.multi_modal_projector
        self.merge = model.config.spatial_merge_size

    def forward(self, pixel_values):
        hidden, (h, w) = vision_tower_states(self.tower, pixel_values)
        p, m = self.projector, self.merge
        x = p.norm(hidden.squeeze(0))
        d = x.shape[-1]
        x = x.reshape(h // m, m, w // m, m, d).permute(0, 2, 4, 1, 3).reshape(-1, d * m * m)
        x = p.patch_merger.merging_layer(x)
        return p.linear_2(p.act(p.linear_1(x)))


def query_scale(config):
    """Ministral 3's query scale by position (transformers' get_llama_4_attn_scale) as a function of position_ids
    [B,S] -> [B,1,S,1]; None for a text model without one (Mistral Small)."""
    rope = getattr(config.text_config, "rope_parameters", None) or {}
    beta = rope.get("llama_4_scaling_beta")
    if not beta:
        return None
    original = float(rope["original_max_position_embeddings"])

    def scale(position_ids):
        return (1 + beta * torch.log(1 + torch.floor(position_ids.to(torch.float32) / original)))[:, None, :, None]

    return scale


def build_graphs(model, dtype: torch.dtype, attention: str = "eager") -> list[GraphPlan]:
    """The three graphs (graphs_common.build_graphs): the vision encoder with the patch merger on images in whole
    28-px squares, and the decoder with Ministral 3's query scale when the text model has one."""
    unit = model.config.vision_config.patch_size * model.config.spatial_merge_size
    return build_graphs_common(model, dtype, attention, lambda: VisionEncoder(model), unit,
                               query_scale=query_scale(model.config))
