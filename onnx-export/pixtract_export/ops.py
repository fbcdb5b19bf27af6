"""Custom attention for the traced graphs: ONNX Runtime's contrib ops as single traced nodes, the grouped eager
attention of the decoder, its additive mask, and the context that swaps a model's attention while one graph is
traced. Model-agnostic: a family's export modules (families/) choose which to use."""

from __future__ import annotations

import torch
from torch import nn


def additive_mask(attention_mask: torch.Tensor, query_len: int, dtype: torch.dtype) -> torch.Tensor:
    """[B,T] 0/1 padding mask -> [B,1,S,T] additive causal mask for the last S positions.

    A query may also always see itself: a left-padding query row would otherwise mask every key, and in fp16 an
    all -inf row turns into NaN that would then sit in the KV cache. Real tokens never see padding either way.
    """
    total = attention_mask.shape[1]
    past = total - query_len
    q = torch.arange(query_len, device=attention_mask.device).unsqueeze(1) + past  # absolute query positions
    k = torch.arange(total, device=attention_mask.device).unsqueeze(0)
    causal = k <= q  # [S, T]
    allowed = causal.unsqueeze(0) & attention_mask.bool().unsqueeze(1)  # [B, S, T]
    allowed = allowed | (k == q).unsqueeze(0)
    zero = torch.zeros((), dtype=dtype)
    neg = torch.full((), torch.finfo(dtype).min, dtype=dtype)
    return torch.where(allowed, zero, neg).unsqueeze(1)


def grouped_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """transformers' eager attention without `repeat_kv`: the query heads that share a key/value head are stacked
    into one matmul against that head, so the graph never copies the cache per query head.

    repeat_kv gives query head i the key/value head i // groups; [B, H, S, D] -> [B, KV, groups * S, D] keeps that
    pairing. Each score is the same length-D dot product as in eager attention. Measured on the tiny decoder at
    batch 8 and 1,160 positions (ONNX Runtime CPU): the Expand nodes of repeat_kv took ~14% of a decode step.
    """
    batch, heads, seq, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    q = query.reshape(batch, kv_heads, groups * seq, dim)
    scores = torch.matmul(q, key.transpose(2, 3)) * scaling  # [B, KV, groups*S, T]
    if attention_mask is not None:
        # [B, 1, S, T] masks every group alike.
        scores = scores.reshape(batch, kv_heads, groups, seq, -1) + attention_mask.unsqueeze(1)
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs.reshape(batch, kv_heads, groups * seq, -1), value)  # [B, KV, groups*S, D]
    return out.reshape(batch, heads, seq, dim).transpose(1, 2).contiguous(), None


GROUPED_ATTENTION = "pixtract_grouped"


class UseAttention:
    """While one graph is exported, the layers of `config` use the attention function registered as `name` (the model
    object the reference fixtures come from, and the other graphs, keep transformers' eager attention)."""

    def __init__(self, config, name, function):
        self.config, self.name, self.function = config, name, function

    def __enter__(self):
        from transformers import AttentionInterface

        AttentionInterface.register(self.name, self.function)
        self.saved = self.config._attn_implementation
        self.config._attn_implementation = self.name
        return self

    def __exit__(self, *exc):
        self.config._attn_implementation = self.saved
        return False


class MultiHeadAttentionOp(torch.autograd.Function):
    """ONNX Runtime's `com.microsoft.MultiHeadAttention` as one traced node: query/key/value [B,S,H*D] -> [B,S,H*D],
    softmax(q k^T / sqrt(D)) v per head, unmasked. Its CPU kernel never materialises the [H,S,S] scores as separate
    MatMul/Softmax outputs, and its CUDA kernels pick fused (flash / memory-efficient) attention: the vision encoder's
    scores grow with the square of an image's patches (4,096 for a full page: 16 x 4,096^2 per layer in Pixtral 12B).
    `forward` computes the same math in torch, so the traced module still returns the right features.
    """

    @staticmethod
    def forward(ctx, query, key, value, num_heads):
        batch, seq, width = query.shape
        heads = lambda t: t.view(batch, seq, num_heads, width // num_heads).transpose(1, 2)
        scores = torch.matmul(heads(query), heads(key).transpose(-1, -2)) * (width // num_heads) ** -0.5
        probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        return torch.matmul(probs, heads(value)).transpose(1, 2).reshape(batch, seq, width)

    @staticmethod
    def symbolic(g, query, key, value, num_heads):
        return g.op("com.microsoft::MultiHeadAttention", query, key, value, num_heads_i=num_heads)


def vision_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """PixtralAttention's attention as one MultiHeadAttention node ([B,H,S,D] in, [B,S,H,D] out as transformers
    expects). One image per run attends to all of its patches, so there is no mask; the scale is MultiHeadAttention's
    default 1/sqrt(head_dim), which is Pixtral's."""
    if attention_mask is not None or abs(scaling - module.head_dim ** -0.5) > 1e-9:
        raise ValueError("vision_attention: expected an unmasked attention scaled by 1/sqrt(head_dim)")
    # Heads and head_dim from the module (plain ints): sizes read off traced tensors cannot be op attributes.
    flat = lambda t: t.transpose(1, 2).flatten(2)
    out = MultiHeadAttentionOp.apply(flat(query), flat(key), flat(value), module.num_heads)
    return out.unflatten(2, (module.num_heads, module.head_dim)), None


VISION_ATTENTION = "pixtract_vision_mha"


class GroupQueryAttentionOp(torch.autograd.Function):
    """ONNX Runtime's `com.microsoft.GroupQueryAttention` as one traced node.

    query [B,S,Hq*D], key/value [B,S,Hkv*D] (rotated already), past_key/value [B,Hkv,P,D], seqlens_k [B] int32 (each
    row's valid tokens after this step, minus one), total_sequence_length int32 -> output [B,S,Hq*D], present_key/
    value. Each row's cache holds its tokens at [0, seqlens_k] (right padding), so a batch of unequal prompts attends
    over its own length only. When the caller binds the same buffer as past and present (IO binding), ONNX Runtime
    writes the new keys/values in place instead of concatenating the whole cache every step.
    `forward` only has to give the tracer the outputs' shapes; the graph is checked against transformers.
    """

    @staticmethod
    def forward(ctx, query, key, value, past_key, past_value, seqlens_k, total, num_heads, kv_num_heads):
        return query.clone(), past_key.clone(), past_value.clone()

    @staticmethod
    def symbolic(g, query, key, value, past_key, past_value, seqlens_k, total, num_heads, kv_num_heads):
        return g.op("com.microsoft::GroupQueryAttention", query, key, value, past_key, past_value, seqlens_k, total,
                    num_heads_i=num_heads, kv_num_heads_i=kv_num_heads, outputs=3)
