"""Pixtral (LlavaForConditionalGeneration: Pixtral vision encoder + Llava projector + Mistral text model): everything
the exporter knows that is specific to this model family. families/__init__.py turns it into the `Family` the rest of
the exporter uses.

  - the model: transformers' class, what config.json must say, the tiny seeded random model the tests use
  - weight names: the consolidated layout's Mistral names <-> the Hugging Face names, and params.json <-> config
  - the three graphs' export modules (vision_encoder, embed_tokens, decoder) and the plan build_graphs returns
  - the image-token layout the runtime lays out prompts with (image_token_layout)

Names of the graphs follow transformers.js / onnx-community exports so other tools recognise them:
  vision_encoder.onnx        pixel_values [1,3,H,W] (H, W multiples of the patch size) -> image_features [N, text_hidden]
  embed_tokens.onnx          input_ids [B,S] -> inputs_embeds [B,S,text_hidden]
  decoder_model_merged.onnx  inputs_embeds, attention_mask [B,T], position_ids [B,S], past_key_values.{i}.key/value
                             -> logits [B,1,vocab] (LAST position only), present.{i}.key/value

Consolidated names. transformers ships the conversion as a script in its source tree,
`src/transformers/models/pixtral/convert_pixtral_weights_to_hf.py` (OLD_KEY_TO_NEW_KEY_MAPPING, permute_for_rope,
MISTRAL_CONFIG_MAPPING), but not in the wheel: transformers 5.24 as installed here has no such file and no loader for
Mistral's native Pixtral checkpoints (its conversion_mapping.py knows Mistral-native names only for another model,
"mistral_large4", whose text attention differs). So the name table below mirrors that upstream script, written as
one two-way table (read and write use the same rows); layouts/consolidated.py applies it.

Config: params.json keys become MistralConfig / PixtralVisionConfig fields the way the upstream script maps them
(dim -> hidden_size, hidden_dim -> intermediate_size, n_heads, n_kv_heads, n_layers), plus norm_eps ->
rms_norm_eps, which the script passes under its Mistral name (MistralConfig then silently keeps its 1e-6 default;
Pixtral's is 1e-5).
"""

from __future__ import annotations

import torch
from torch import nn

from ..files import ExportError, tekken_path
from ..trace import GraphPlan
from .graphs_common import build_graphs as build_graphs_common
from .graphs_common import draw_seeded_weights, vision_tower_states
from .mistral_names import TEXT, VISION_TOWER, rope_heads  # noqa: F401 - rope_heads is the family's

NAME = "pixtral"

# Mean/std of Pixtral's image normalisation (CLIP's), as mistral-common applies them.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

TINY_SEED = 20240911
# Weights drawn from N(0, 0.2): with transformers' default 0.02 the tiny model's top logits nearly tie and greedy
# decoding flips on rounding noise; 0.2 keeps the top-1/top-2 gaps around 0.1-0.5.
TINY_WEIGHT_STD = 0.2


def model_class():
    """The transformers class a Pixtral checkpoint loads into."""
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration


def check_hf_config(path: str, cfg: dict):
    """A Hugging Face config.json that is not Llava + Pixtral vision: one clear error."""
    if cfg.get("model_type") != "llava" or cfg.get("vision_config", {}).get("model_type") != "pixtral":
        raise ExportError(
            f"{path}: config.json describes model_type={cfg.get('model_type')!r} with vision "
            f"{cfg.get('vision_config', {}).get('model_type')!r}; pixtract exports Llava + Pixtral vision only"
        )


def image_token_layout(config) -> dict:
    """How a prompt holds an image (mistral-common's image encoder): one [IMG] token per patch_size x patch_size
    patch, no patch merger (spatial_merge 1), and each row of patches ended by [IMG_BREAK], the last by [IMG_END]
    instead (break_tokens)."""
    return {"patch_size": config.vision_config.patch_size, "spatial_merge": 1, "break_tokens": True}


def prompt_layout(tekken_version: str) -> dict:
    """Pixtral's tokenizer is Tekken v3: a system prompt is written at the start of the user turn (text + "\n\n"),
    as mistral-common's V3 instruct tokenizer does."""
    return {"system": "user_prefix", "tekken_version": tekken_version}


def write_default_tekken(path: str, version: str = "v3"):
    """Pixtral's own Tekken file (tekken_240911.json from mistral-common, v3), for the tiny and random checkpoints."""
    import shutil

    if version != "v3":
        raise ExportError(f"Tekken {version}: Pixtral's tokenizer is v3")
    shutil.copyfile(tekken_path(), path)


def tiny_config():
    """The tiny Pixtral: the real vocabulary, token ids, patch and image size and RoPE thetas; toy widths (text
    hidden 32, 4 heads / 2 KV heads, head_dim 16; vision hidden 64, head_dim 16, divisible by 4 for the 2D RoPE)."""
    from transformers import LlavaConfig, MistralConfig, PixtralVisionConfig

    vision = PixtralVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        head_dim=16,
        num_channels=3,
        patch_size=16,
        image_size=1024,
        hidden_act="silu",
        rope_theta=10000.0,
    )
    text = MistralConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=131072,
        rope_theta=1e9,
        rms_norm_eps=1e-5,
        max_position_embeddings=32768,
        sliding_window=None,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=11,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=10,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )


def build_tiny_model(seed: int = TINY_SEED):
    """Deterministic random weights: every parameter is redrawn from a generator seeded once, in name order."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    config = tiny_config()
    config._attn_implementation = "eager"
    model = LlavaForConditionalGeneration(config)
    draw_seeded_weights(model, seed, TINY_WEIGHT_STD)
    model.eval()
    return model


# The consolidated layout's names (mistral_names.py): the shared vision tower and text rows, and the Llava adapter
# with its biases (OLD_KEY_TO_NEW_KEY_MAPPING of transformers' convert_pixtral_weights_to_hf.py).
PROJECTOR = (
    ("vision_language_adapter.w_in.weight", "model.multi_modal_projector.linear_1.weight", None),
    ("vision_language_adapter.w_in.bias", "model.multi_modal_projector.linear_1.bias", None),
    ("vision_language_adapter.w_out.weight", "model.multi_modal_projector.linear_2.weight", None),
    ("vision_language_adapter.w_out.bias", "model.multi_modal_projector.linear_2.bias", None),
)
NAME_TABLE = VISION_TOWER + PROJECTOR + TEXT


def config_from_params(params: dict, path: str = "params.json"):
    """LlavaConfig for a Pixtral params.json (text keys at the top level, the vision encoder's under vision_encoder)."""
    from transformers import LlavaConfig, MistralConfig, PixtralVisionConfig

    vision = params.get("vision_encoder")
    if not isinstance(vision, dict):
        raise ExportError(f"{path}: no vision_encoder section; pixtract exports Pixtral (text + vision) only")
    # Mistral Small 3.x / Ministral share the layout but add a patch merger and a pre-projector norm: another model.
    if vision.get("mm_projector_id") or vision.get("add_pre_mm_projector_layer_norm") or \
            vision.get("spatial_merge_size", 1) != 1:
        raise ExportError(f"{path}: a vision encoder with a patch merger (mm_projector_id / spatial_merge_size) is "
                          "Mistral 3, not Pixtral 12B; pixtract exports Pixtral only")
    try:
        text = MistralConfig(
            hidden_size=params["dim"], intermediate_size=params["hidden_dim"], num_hidden_layers=params["n_layers"],
            num_attention_heads=params["n_heads"], num_key_value_heads=params["n_kv_heads"],
            head_dim=params.get("head_dim", params["dim"] // params["n_heads"]), vocab_size=params["vocab_size"],
            rope_theta=params["rope_theta"], rms_norm_eps=params["norm_eps"],
            max_position_embeddings=params.get("max_position_embeddings", 1024000), hidden_act="silu",
            sliding_window=None, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
        )
        vision_config = PixtralVisionConfig(
            hidden_size=vision["hidden_size"], intermediate_size=vision["intermediate_size"],
            num_hidden_layers=vision["num_hidden_layers"], num_attention_heads=vision["num_attention_heads"],
            head_dim=vision["hidden_size"] // vision["num_attention_heads"], num_channels=vision["num_channels"],
            patch_size=vision["patch_size"], image_size=vision["image_size"], hidden_act="silu",
            rope_theta=vision["rope_theta"],
        )
    except KeyError as err:
        raise ExportError(f"{path}: no {err.args[0]!r}; not a Pixtral params.json") from None
    return LlavaConfig(
        vision_config=vision_config, text_config=text, image_token_index=vision.get("image_token_id", 10),
        projector_hidden_act="gelu", vision_feature_layer=-1, vision_feature_select_strategy="full",
        multimodal_projector_bias=bool(vision.get("adapter_bias", True)), tie_word_embeddings=False,
    )


def params_from_config(config) -> dict:
    """params.json as Mistral writes it for Pixtral-12B-2409 (the inverse of config_from_params)."""
    t, v = config.text_config, config.vision_config
    rope = t.rope_parameters["rope_theta"] if getattr(t, "rope_parameters", None) else t.rope_theta
    vrope = v.rope_parameters["rope_theta"] if getattr(v, "rope_parameters", None) else v.rope_theta
    return {
        "dim": t.hidden_size, "n_layers": t.num_hidden_layers, "head_dim": t.head_dim,
        "hidden_dim": t.intermediate_size, "n_heads": t.num_attention_heads, "n_kv_heads": t.num_key_value_heads,
        "rope_theta": float(rope), "norm_eps": t.rms_norm_eps, "vocab_size": t.vocab_size,
        "max_position_embeddings": t.max_position_embeddings,
        "vision_encoder": {
            "hidden_size": v.hidden_size, "num_channels": v.num_channels, "image_size": v.image_size,
            "patch_size": v.patch_size, "rope_theta": float(vrope), "intermediate_size": v.intermediate_size,
            "num_hidden_layers": v.num_hidden_layers, "num_attention_heads": v.num_attention_heads,
            "image_token_id": config.image_token_index, "image_break_token_id": 12, "image_end_token_id": 13,
            "adapter_bias": bool(config.multimodal_projector_bias),
        },
    }


class VisionEncoder(nn.Module):
    """One image -> projected features, the way PixtralVisionModel + the Llava projector compute them (the tower as
    graphs_common.vision_tower_states runs it)."""

    def __init__(self, model):
        super().__init__()
        self.tower = model.model.vision_tower
        self.projector = model.model.multi_modal_projector

    def forward(self, pixel_values):
        hidden, _ = vision_tower_states(self.tower, pixel_values)
        features = self.projector(hidden)
        return features.squeeze(0)


def build_graphs(model, dtype: torch.dtype, attention: str = "eager") -> list[GraphPlan]:
    """The three graphs (graphs_common.build_graphs): Pixtral's vision encoder on images in whole 16-px patches, and
    Mistral's decoder (no query scale)."""
    return build_graphs_common(model, dtype, attention, lambda: VisionEncoder(model),
                               model.config.vision_config.patch_size)
