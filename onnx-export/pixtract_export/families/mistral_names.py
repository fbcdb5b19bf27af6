"""Weight names both Mistral vision families share: Mistral's consolidated names <-> transformers 5.x's, for Pixtral's
vision tower and the Mistral text model, and the heads each kind of RoPE rows is permuted with. A family's NAME_TABLE
is VISION_TOWER + its own projector rows + TEXT (families/pixtral.py, families/mistral3.py).

Rows are (Mistral name, Hugging Face name, RoPE rows); "{i}" is a layer number. They mirror the upstream conversion
scripts (transformers' convert_pixtral_weights_to_hf.py OLD_KEY_TO_NEW_KEY_MAPPING; conversion_mapping.py for
Ministral 3) with the names of transformers 5.x (model.language_model.*, model.vision_tower.*).
"""

from __future__ import annotations

_V = "vision_encoder.transformer.layers.{i}."
_HV = "model.vision_tower.transformer.layers.{i}."
_T = "layers.{i}."
_HT = "model.language_model.layers.{i}."

VISION_TOWER = (
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
)

# A tied LM head (Ministral 3 3B) is one parameter: the checkpoint stores no output.weight then.
TEXT = (
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
    """The heads whose rows a q/k weight's RoPE permutation works on (a name table's third column): the vision
    heads, the text query heads, or the text KV heads (not the query heads) for wk."""
    return {"vision": config.vision_config.num_attention_heads, "text_q": config.text_config.num_attention_heads,
            "text_kv": config.text_config.num_key_value_heads}[rope]
