"""The export modules and graph plans every Mistral vision family shares (Pixtral, Mistral 3): the vision tower run on
one image, the decoder with an explicit KV cache (eager, or ONNX Runtime's GroupQueryAttention), and the three
GraphPlans in the order they are written. A family passes what differs: its projector (vision_encoder's module), the
pixel unit an example image must be a multiple of, and an optional query scale applied after RoPE.

Names of the graphs follow transformers.js / onnx-community exports so other tools recognise them:
  vision_encoder.onnx        pixel_values [1,3,H,W] (H, W multiples of the family's pixel unit) -> image_features
                             [N, text_hidden]
  embed_tokens.onnx          input_ids [B,S] -> inputs_embeds [B,S,text_hidden]
  decoder_model_merged.onnx  inputs_embeds, attention_mask [B,T], position_ids [B,S], past_key_values.{i}.key/value
                             -> logits [B,1,vocab] (LAST position only), present.{i}.key/value
"""

from __future__ import annotations

import gc
from typing import Callable

import torch
from torch import nn

from ..ops import (GROUPED_ATTENTION, VISION_ATTENTION, GroupQueryAttentionOp, additive_mask, grouped_attention,
                   vision_attention)
from ..trace import GraphPlan, TracedGraph, transpose_linears


def draw_seeded_weights(model, seed: int, std: float):
    """A tiny test model's deterministic weights: every parameter redrawn from one generator seeded once, in name
    order: matrices and biases N(0, std), norm gains around 1 (N(1, 0.1)) so activations keep a sane scale."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if param.dim() >= 2 or name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=gen) * std)
            else:
                param.copy_(1.0 + torch.randn(param.shape, generator=gen) * 0.1)


def vision_tower_states(tower, pixel_values):
    """PixtralVisionModel's last hidden states for one image [1, h*w, C] (patches row-major, as HF orders them), and
    the patch grid (h, w).

    Written out (instead of calling the tower with image_sizes) so the traced graph has no per-image Python lists: a
    single image attends to all of its patches, so no block mask is needed, and 2D RoPE positions come from the
    input's own height and width, so any size up to max_image_size works.
    """
    patches = tower.patch_conv(pixel_values.to(tower.patch_conv.weight.dtype))  # [1, C, h, w]
    h, w = patches.shape[-2], patches.shape[-1]
    embeds = patches.flatten(2).transpose(1, 2)  # [1, h*w, C]
    embeds = tower.ln_pre(embeds)
    hpos, wpos = torch.meshgrid(
        torch.arange(h, device=embeds.device), torch.arange(w, device=embeds.device), indexing="ij"
    )
    position_ids = torch.stack([hpos.flatten(), wpos.flatten()], dim=-1)
    position_embeddings = tower.patch_positional_embedding(embeds, position_ids)
    hidden = tower.transformer(embeds, attention_mask=None, position_embeddings=position_embeddings)
    hidden = hidden.last_hidden_state if hasattr(hidden, "last_hidden_state") else hidden[0]
    return hidden, (h, w)


class _GraphCache:
    """The cache interface the text attention calls: concatenates the past with this step's keys/values."""

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
    """The text model with an explicit KV cache; returns logits of the last position only.

    A 4,000-token prefill must not materialise [B, 4000, 131072] logits: only the next-token distribution is ever
    needed, and with left padding the last position is real for every row. The layers get position_ids: Ministral 3's
    attention scales its queries by position (Mistral's ignores them).
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
            hidden = layer(hidden, attention_mask=mask, position_ids=position_ids, position_embeddings=(cos, sin),
                           cache=cache, use_cache=True)
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
    The layers repeat the decoder layer's forward with the attention replaced (same weights, same RoPE code).
    query_scale(position_ids) -> [B,1,S,1] multiplies the queries after RoPE, as Ministral 3's attention does (None:
    Mistral's, no scale); GroupQueryAttention's own `scale` attribute is one constant, so it cannot do it.
    """

    def __init__(self, model, query_scale: Callable | None = None):
        super().__init__()
        self.lm = model.model.language_model
        self.lm_head = model.lm_head
        self.num_layers = model.config.text_config.num_hidden_layers
        t = model.config.text_config
        self.heads, self.kv_heads = t.num_attention_heads, t.num_key_value_heads
        self.head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
        self.query_scale = query_scale

    def forward(self, inputs_embeds, position_ids, seqlens_k, total_sequence_length, logits_index, *past_flat):
        from transformers.models.mistral.modeling_mistral import apply_rotary_pos_emb

        batch, seq, _ = inputs_embeds.shape
        cos, sin = self.lm.rotary_emb(inputs_embeds, position_ids=position_ids)
        scale = self.query_scale(position_ids).to(inputs_embeds.dtype) if self.query_scale else None
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
            if scale is not None:
                q = q * scale
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


def build_graphs(model, dtype: torch.dtype, attention: str, vision_module: Callable[[], nn.Module],
                 pixel_unit: int, query_scale: Callable | None = None) -> list[GraphPlan]:
    """The three graphs, in the order they are written (graphs.export_graphs writes them and lists them in the
    manifest's order). vision_module() builds the module mapping pixel_values [1,3,H,W] to image_features, when its
    turn comes (built earlier, it would keep the tower alive past its release); its example image is 3 x 5 pixel units
    (H, W multiples of pixel_unit: the patch, times the merge for a patch merger).

    With release=True the export consumes the model to keep peak memory near one copy of the weights: the token
    embeddings are written first and dropped (before the LM head's transposition needs its transient copy), the
    Linear layers are replaced by pre-transposed ones (same graphs; see trace._TransposedLinear), and the vision tower
    and projector are dropped once their graph is written, before the decoder (the largest) is traced. Only the
    config stays usable afterwards.
    """
    tcfg = model.config.text_config

    def release_embed_tokens():
        model.model.language_model.embed_tokens = None
        gc.collect()
        transpose_linears(model)
        gc.collect()

    def vision_encoder() -> TracedGraph:
        # The example is non-square so height and width stay independent dynamic axes.
        pixel = torch.randn(1, 3, 3 * pixel_unit, 5 * pixel_unit, dtype=dtype)
        return TracedGraph(
            vision_module(), (pixel,), ["pixel_values"], ["image_features"],
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
            module = GroupQueryDecoder(model, query_scale)
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
