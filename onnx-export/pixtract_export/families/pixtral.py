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

import gc

import torch
from torch import nn

from ..files import ExportError
from ..ops import (GROUPED_ATTENTION, VISION_ATTENTION, GroupQueryAttentionOp, additive_mask, grouped_attention,
                   vision_attention)
from ..trace import GraphPlan, TracedGraph, transpose_linears

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
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=gen) * TINY_WEIGHT_STD)
            elif name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=gen) * TINY_WEIGHT_STD)
            else:
                # RMSNorm gains: around 1 so activations keep a sane scale through the layers.
                param.copy_(1.0 + torch.randn(param.shape, generator=gen) * 0.1)
    model.eval()
    return model


# (Mistral name, Hugging Face name, RoPE rows): "{i}" is a layer number. RoPE rows name whose heads the q/k
# permutation uses. Mirrors OLD_KEY_TO_NEW_KEY_MAPPING of transformers' convert_pixtral_weights_to_hf.py, with the
# HF names of transformers 5.x (model.language_model.*, model.vision_tower.*, model.multi_modal_projector.*).
_V = "vision_encoder.transformer.layers.{i}."
_HV = "model.vision_tower.transformer.layers.{i}."
_T = "layers.{i}."
_HT = "model.language_model.layers.{i}."
NAME_TABLE = (
    ("vision_encoder.patch_conv.weight", "model.vision_tower.patch_conv.weight", None),
    ("vision_encoder.ln_pre.weight", "model.vision_tower.ln_pre.weight", None),
    (_V + "attention_norm.weight", _HV + "attention_norm.weight", None),
    (_V + "ffn_norm.weight", _HV + "ffn_norm.weight", None),
    (_V + "attention.wq.weight", _HV + "attention.q_proj.weight", "vision"),
    (_V + "attention.wk.weight", _HV + "attention.k_proj.weight", "vision"),
    (_V + "attention.wv.weight", _HV + "attention.v_proj.weight", None),
    (_V + "attention.wo.weight", _HV + "attention.o_proj.weight", None),
    (_V + "feed_forward.w1.weight", _HV + "feed_forward.gate_proj.weight", None),
    (_V + "feed_forward.w2.weight", _HV + "feed_forward.down_proj.weight", None),
    (_V + "feed_forward.w3.weight", _HV + "feed_forward.up_proj.weight", None),
    ("vision_language_adapter.w_in.weight", "model.multi_modal_projector.linear_1.weight", None),
    ("vision_language_adapter.w_in.bias", "model.multi_modal_projector.linear_1.bias", None),
    ("vision_language_adapter.w_out.weight", "model.multi_modal_projector.linear_2.weight", None),
    ("vision_language_adapter.w_out.bias", "model.multi_modal_projector.linear_2.bias", None),
    ("tok_embeddings.weight", "model.language_model.embed_tokens.weight", None),
    (_T + "attention_norm.weight", _HT + "input_layernorm.weight", None),
    (_T + "ffn_norm.weight", _HT + "post_attention_layernorm.weight", None),
    (_T + "attention.wq.weight", _HT + "self_attn.q_proj.weight", "text_q"),
    (_T + "attention.wk.weight", _HT + "self_attn.k_proj.weight", "text_kv"),
    (_T + "attention.wv.weight", _HT + "self_attn.v_proj.weight", None),
    (_T + "attention.wo.weight", _HT + "self_attn.o_proj.weight", None),
    (_T + "feed_forward.w1.weight", _HT + "mlp.gate_proj.weight", None),
    (_T + "feed_forward.w2.weight", _HT + "mlp.down_proj.weight", None),
    (_T + "feed_forward.w3.weight", _HT + "mlp.up_proj.weight", None),
    ("norm.weight", "model.language_model.norm.weight", None),
    ("output.weight", "lm_head.weight", None),
)


def rope_heads(rope: str, config) -> int:
    """The heads whose rows a q/k weight's RoPE permutation works on (NAME_TABLE's third column)."""
    return {"vision": config.vision_config.num_attention_heads, "text_q": config.text_config.num_attention_heads,
            "text_kv": config.text_config.num_key_value_heads}[rope]


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
    """One image -> projected features, the way PixtralVisionModel + the Llava projector compute them.

    Written out (instead of calling get_image_features) so the traced graph has no per-image Python lists:
    a single image attends to all of its patches, so no block mask is needed, and 2D RoPE positions come from
    the input's own height and width, so any size up to max_image_size works.
    """

    def __init__(self, model):
        super().__init__()
        self.tower = model.model.vision_tower
        self.projector = model.model.multi_modal_projector

    def forward(self, pixel_values):
        tower = self.tower
        patches = tower.patch_conv(pixel_values.to(tower.patch_conv.weight.dtype))  # [1, C, h, w]
        h, w = patches.shape[-2], patches.shape[-1]
        embeds = patches.flatten(2).transpose(1, 2)  # [1, h*w, C], row-major like HF
        embeds = tower.ln_pre(embeds)
        hpos, wpos = torch.meshgrid(
            torch.arange(h, device=embeds.device), torch.arange(w, device=embeds.device), indexing="ij"
        )
        position_ids = torch.stack([hpos.flatten(), wpos.flatten()], dim=-1)
        position_embeddings = tower.patch_positional_embedding(embeds, position_ids)
        hidden = tower.transformer(embeds, attention_mask=None, position_embeddings=position_embeddings)
        hidden = hidden.last_hidden_state if hasattr(hidden, "last_hidden_state") else hidden[0]
        features = self.projector(hidden)
        return features.squeeze(0)


class _GraphCache:
    """The cache interface MistralAttention calls: concatenates the past with this step's keys/values."""

    def __init__(self, past):
        self.past = past
        self.present = [None] * len(past)

    def update(self, key, value, layer_idx, *args, **kwargs):
        past_key, past_value = self.past[layer_idx]
        key = torch.cat([past_key, key], dim=2)
        value = torch.cat([past_value, value], dim=2)
        self.present[layer_idx] = (key, value)
        return key, value


class Decoder(nn.Module):
    """Mistral text model with an explicit KV cache; returns logits of the last position only.

    A 4,000-token prefill must not materialise [B, 4000, 131072] logits: only the next-token distribution is ever
    needed, and with left padding the last position is real for every row.
    """

    def __init__(self, model):
        super().__init__()
        self.lm = model.model.language_model
        self.lm_head = model.lm_head
        self.num_layers = model.config.text_config.num_hidden_layers

    def forward(self, inputs_embeds, attention_mask, position_ids, *past_flat):
        past = [(past_flat[2 * i], past_flat[2 * i + 1]) for i in range(self.num_layers)]
        cache = _GraphCache(past)
        mask = additive_mask(attention_mask, inputs_embeds.shape[1], inputs_embeds.dtype)
        cos, sin = self.lm.rotary_emb(inputs_embeds, position_ids=position_ids)
        hidden = inputs_embeds
        for layer in self.lm.layers:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=(cos, sin), cache=cache, use_cache=True)
            if isinstance(hidden, tuple):
                hidden = hidden[0]
        # Norm and head on the last position only (RMSNorm is per position). fp32 logits need no Cast: an identity
        # Cast on the graph output copied [B, 1, vocab] floats every step (~18% of a batch-8 step, tiny model).
        logits = self.lm_head(self.lm.norm(hidden[:, -1:, :]))
        if logits.dtype != torch.float32:
            logits = logits.to(torch.float32)
        out = [logits]
        for key, value in cache.present:
            out += [key, value]
        return tuple(out)


class GroupQueryDecoder(nn.Module):
    """The text model with ONNX Runtime's GroupQueryAttention and a cache laid out per row (right padding).

    Inputs: inputs_embeds [B,S,H], position_ids [B,S], seqlens_k [B] int32, total_sequence_length int32,
    logits_index [B] int64 (each row's last real position within this chunk), past [B,Hkv,P,D] per layer.
    The layers repeat MistralDecoderLayer's forward with the attention replaced (same weights, same RoPE code).
    """

    def __init__(self, model):
        super().__init__()
        self.lm = model.model.language_model
        self.lm_head = model.lm_head
        self.num_layers = model.config.text_config.num_hidden_layers
        t = model.config.text_config
        self.heads, self.kv_heads = t.num_attention_heads, t.num_key_value_heads
        self.head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads

    def forward(self, inputs_embeds, position_ids, seqlens_k, total_sequence_length, logits_index, *past_flat):
        from transformers.models.mistral.modeling_mistral import apply_rotary_pos_emb

        batch, seq, _ = inputs_embeds.shape
        cos, sin = self.lm.rotary_emb(inputs_embeds, position_ids=position_ids)
        hidden = inputs_embeds
        present = []
        for i, layer in enumerate(self.lm.layers):
            attn = layer.self_attn
            residual = hidden
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            q = q.transpose(1, 2).reshape(batch, seq, self.heads * self.head_dim)
            k = k.transpose(1, 2).reshape(batch, seq, self.kv_heads * self.head_dim)
            out, key, value = GroupQueryAttentionOp.apply(q, k, v, past_flat[2 * i], past_flat[2 * i + 1], seqlens_k,
                                                           total_sequence_length, self.heads, self.kv_heads)
            hidden = residual + attn.o_proj(out)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
            present += [key, value]
        # Each row's last real position (rows end at different columns under right padding).
        last = hidden[torch.arange(batch), logits_index].unsqueeze(1)
        logits = self.lm_head(self.lm.norm(last))
        if logits.dtype != torch.float32:
            logits = logits.to(torch.float32)
        return (logits, *present)


def build_graphs(model, dtype: torch.dtype, attention: str = "eager") -> list[GraphPlan]:
    """The three graphs, in the order they are written (graphs.export_graphs writes them and lists them in the
    manifest's order).

    With release=True the export consumes the model to keep peak memory near one copy of the weights: the token
    embeddings are written first and dropped (before the LM head's transposition needs its transient copy), the
    Linear layers are replaced by pre-transposed ones (same graphs; see trace._TransposedLinear), and the vision tower
    and projector are dropped once their graph is written, before the decoder (the largest) is traced. Only the
    config stays usable afterwards.
    """
    cfg = model.config
    tcfg, vcfg = cfg.text_config, cfg.vision_config

    def release_embed_tokens():
        model.model.language_model.embed_tokens = None
        gc.collect()
        transpose_linears(model)
        gc.collect()

    def vision_encoder() -> TracedGraph:
        # The example is non-square so height and width stay independent dynamic axes.
        patch = vcfg.patch_size
        vision = VisionEncoder(model)
        pixel = torch.randn(1, 3, 3 * patch, 5 * patch, dtype=dtype)
        return TracedGraph(
            vision, (pixel,), ["pixel_values"], ["image_features"],
            {"pixel_values": {2: "height", 3: "width"}, "image_features": {0: "num_patches"}},
            custom_opsets={"com.microsoft": 1},
            attention=(model.model.vision_tower.config, VISION_ATTENTION, vision_attention),
        )

    def release_vision_encoder():
        model.model.vision_tower = None
        model.model.multi_modal_projector = None
        gc.collect()

    def decoder() -> TracedGraph:
        # Traced with a non-empty past and batch 2 so no axis is specialised to 0 or 1.
        layers = tcfg.num_hidden_layers
        kv_heads = tcfg.num_key_value_heads
        head_dim = getattr(tcfg, "head_dim", None) or tcfg.hidden_size // tcfg.num_attention_heads
        batch, seq, past_len = 2, 4, 3
        embeds = torch.randn(batch, seq, tcfg.hidden_size, dtype=dtype)
        positions = torch.arange(past_len, past_len + seq, dtype=torch.int64).unsqueeze(0).repeat(batch, 1)
        past = []
        if attention == "gqa":
            module = GroupQueryDecoder(model)
            seqlens = torch.full((batch,), past_len + seq - 1, dtype=torch.int32)
            total = torch.tensor(past_len + seq, dtype=torch.int32)
            last = torch.full((batch,), seq - 1, dtype=torch.int64)
            args = [embeds, positions, seqlens, total, last]
            input_names = ["inputs_embeds", "position_ids", "seqlens_k", "total_sequence_length", "logits_index"]
            axes = {
                "inputs_embeds": {0: "batch", 1: "sequence"},
                "position_ids": {0: "batch", 1: "sequence"},
                "seqlens_k": {0: "batch"},
                "logits_index": {0: "batch"},
                "logits": {0: "batch"},
            }
            present_axis = "present_sequence"
        else:
            module = Decoder(model)
            mask = torch.ones(batch, past_len + seq, dtype=torch.int64)
            args = [embeds, mask, positions]
            input_names = ["inputs_embeds", "attention_mask", "position_ids"]
            axes = {
                "inputs_embeds": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "total_sequence"},
                "position_ids": {0: "batch", 1: "sequence"},
                "logits": {0: "batch"},
            }
            present_axis = "total_sequence"
        output_names = ["logits"]
        for i in range(layers):
            for kind in ("key", "value"):
                past.append(torch.randn(batch, kv_heads, past_len, head_dim, dtype=dtype))
                name = f"past_key_values.{i}.{kind}"
                input_names.append(name)
                axes[name] = {0: "batch", 2: "past_sequence"}
                oname = f"present.{i}.{kind}"
                output_names.append(oname)
                axes[oname] = {0: "batch", 2: present_axis}
        return TracedGraph(
            module, (*args, *past), input_names, output_names, axes,
            fixed_output_dims={("logits", 1): 1, ("logits", 2): tcfg.vocab_size},
            custom_opsets={"com.microsoft": 1} if attention == "gqa" else None,
            attention=(tcfg, GROUPED_ATTENTION, grouped_attention),
        )

    return [
        GraphPlan("embed_tokens", "embed_tokens.onnx", lambda: model.get_input_embeddings().weight,
                  release=release_embed_tokens),
        GraphPlan("vision_encoder", "vision_encoder.onnx", vision_encoder, release=release_vision_encoder),
        GraphPlan("decoder", "decoder_model_merged.onnx", decoder, manifest={
            "logits": "last_position",
            # "eager": left-padded batches, attention_mask input, the cache grows by Concat. "gqa":
            # GroupQueryAttention, right-padded rows described by seqlens_k, the cache may be one buffer bound as both
            # past and present.
            "attention": attention,
            "past_key_template": "past_key_values.{layer}.key",
            "past_value_template": "past_key_values.{layer}.value",
            "present_key_template": "present.{layer}.key",
            "present_value_template": "present.{layer}.value",
        }),
    ]
