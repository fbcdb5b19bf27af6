"""The three ONNX graphs pixtract runs (the manifest describing them is manifest.py).

Names follow transformers.js / onnx-community exports so other tools recognise them:
  vision_encoder.onnx        pixel_values [1,3,H,W] (H, W multiples of the patch size) -> image_features [N, text_hidden]
  embed_tokens.onnx          input_ids [B,S] -> inputs_embeds [B,S,text_hidden]
  decoder_model_merged.onnx  inputs_embeds, attention_mask [B,T], position_ids [B,S], past_key_values.{i}.key/value
                             -> logits [B,1,vocab] (LAST position only), present.{i}.key/value
"""

from __future__ import annotations

import os

import onnx
import torch
from torch import nn

from . import ATTENTION_KINDS, __version__
from .manifest import graph_entry, tensor_nbytes, weights_digest

OPSET = 17
# Above this many bytes of weights a graph keeps its tensors in a side file (protobuf caps a file at 2 GB).
EXTERNAL_DATA_THRESHOLD = 1 << 30


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


class EmbedTokens(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.embed = model.get_input_embeddings()

    def forward(self, input_ids):
        return self.embed(input_ids)


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


class _UseAttention:
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


class _MultiHeadAttentionOp(torch.autograd.Function):
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
    out = _MultiHeadAttentionOp.apply(flat(query), flat(key), flat(value), module.num_heads)
    return out.unflatten(2, (module.num_heads, module.head_dim)), None


VISION_ATTENTION = "pixtract_vision_mha"


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


class _GroupQueryAttentionOp(torch.autograd.Function):
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
            out, key, value = _GroupQueryAttentionOp.apply(q, k, v, past_flat[2 * i], past_flat[2 * i + 1], seqlens_k,
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



def _export(module, args, path, input_names, output_names, dynamic_axes, fixed_output_dims=None, custom_opsets=None,
            threshold=None):
    """Traces module to ONNX at path; weights go to `<file>_data` beside it when they are too large for one file.

    Returns (graph proto, external, weights digest). With external data the returned proto's initializers point
    into `<file>_data` (no weight bytes held in memory): the weights are moved tensor by tensor from the
    exporter's scratch files into the one data file, so a graph of several GB is never held twice.
    """
    import shutil
    import tempfile

    # Export into a scratch folder first: for >2 GB models the legacy exporter scatters one file per tensor.
    scratch = tempfile.mkdtemp(prefix="pixtract-export-", dir=os.path.dirname(path))
    try:
        raw = os.path.join(scratch, "graph.onnx")
        with torch.no_grad():
            torch.onnx.export(
                module,
                args,
                raw,
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=dynamic_axes,
                opset_version=OPSET,
                do_constant_folding=True,
                dynamo=False,
                custom_opsets=custom_opsets,
            )
        model = onnx.load(raw, load_external_data=False)
        model.producer_name = "pixtract-export"
        model.producer_version = __version__
        # Shape inference loses static sizes through some slices (e.g. logits[:, -1:] becomes "Castlogits_dim_1"):
        # restate what the wrapper guarantees so the manifest and ONNX Runtime report it.
        for (out_name, axis), size in (fixed_output_dims or {}).items():
            for out in model.graph.output:
                if out.name == out_name:
                    out.type.tensor_type.shape.dim[axis].dim_value = size
        external = save_graph(model, path, source_dir=scratch, threshold=threshold)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    digest = weights_digest(model, os.path.dirname(path))
    from .model import memory_note

    print(f"  {os.path.basename(path)} written ({memory_note(reset_peak=True)})", flush=True)
    return model, external, digest


# Initializers of at least this many bytes go to the data file (smaller ones stay inline, as onnx.save does).
EXTERNAL_MIN_TENSOR_BYTES = 1024
# Offsets of tensors of at least 1 MiB in the data file are multiples of this, so ONNX Runtime can map them.
EXTERNAL_ALIGN = 64 * 1024


def _is_external(t: onnx.TensorProto) -> bool:
    return t.HasField("data_location") and t.data_location == onnx.TensorProto.EXTERNAL


def _tensor_bytes(t: onnx.TensorProto, base_dir: str) -> bytes:
    """The raw little-endian bytes of one initializer, read from its external file when it has one."""
    if _is_external(t):
        info = {e.key: e.value for e in t.external_data}
        with open(os.path.join(base_dir, info["location"]), "rb") as f:
            f.seek(int(info.get("offset", 0)))
            length = int(info["length"]) if "length" in info else -1
            return f.read(length)
    if t.HasField("raw_data"):
        return t.raw_data
    from onnx import numpy_helper

    return numpy_helper.to_array(t).tobytes()


def save_graph(model: onnx.ModelProto, path: str, source_dir: str | None = None,
               threshold: int | None = None) -> bool:
    """Writes model to path; returns whether its weights went to `<file>_data`.

    Initializers may still live in files under source_dir (an exporter's scratch output, or the model directory
    a graph was loaded from with load_external_data=False). Above `threshold` bytes of weights (default
    EXTERNAL_DATA_THRESHOLD) every initializer of >= 1 KiB is copied, one at a time, into a single data file and
    the proto keeps only references: the proto written stays far below protobuf's 2 GB limit and the weights are
    never all in memory. Below it, the weights are read back inline and the graph is one file.
    """
    threshold = EXTERNAL_DATA_THRESHOLD if threshold is None else threshold
    inits = model.graph.initializer
    weight_bytes = sum(tensor_nbytes(t) for t in inits)
    external = weight_bytes > threshold
    if not external:
        for t in inits:
            if _is_external(t):
                t.raw_data = _tensor_bytes(t, source_dir or "")
                del t.external_data[:]
                t.data_location = onnx.TensorProto.DEFAULT
        onnx.save_model(model, path)
        return False
    location = os.path.basename(path) + "_data"
    data_path = os.path.join(os.path.dirname(path), location)
    if source_dir and os.path.abspath(os.path.join(source_dir, location)) == os.path.abspath(data_path):
        raise ValueError(f"save_graph: {data_path} would overwrite the data it is read from")
    with open(data_path, "wb") as data:
        for t in inits:
            if tensor_nbytes(t) < EXTERNAL_MIN_TENSOR_BYTES:
                if _is_external(t):
                    t.raw_data = _tensor_bytes(t, source_dir or "")
                    del t.external_data[:]
                    t.data_location = onnx.TensorProto.DEFAULT
                continue
            blob = _tensor_bytes(t, source_dir or "")
            if len(blob) >= (1 << 20):
                pad = (-data.tell()) % EXTERNAL_ALIGN
                data.write(b"\0" * pad)
            offset = data.tell()
            data.write(blob)
            del blob
            t.ClearField("raw_data")
            for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
                t.ClearField(field)
            del t.external_data[:]
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(tensor_nbytes(t)))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
            t.data_location = onnx.TensorProto.EXTERNAL
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    return True


class _TransposedLinear(nn.Module):
    """nn.Linear with its weight stored already transposed ([in, out]): `x @ weight_t (+ bias)`.

    The TorchScript exporter writes nn.Linear on 3-D inputs as MatMul(x, Transpose(W)) and constant folding then
    materialises W^T as a new initializer while W is still held by torch: during the export every Linear weight
    existed twice. Transposed beforehand, the graph is the same MatMul (+ Add) on an [in, out] constant, with no
    folding copy, and the initializer keeps the parameter's name.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x):
        y = torch.matmul(x, self.weight_t)
        return y if self.bias is None else y + self.bias


def transpose_linears(root: nn.Module):
    """Replaces every nn.Linear under root by a _TransposedLinear, one at a time (peak: one extra weight).

    Works from the Linear modules' names: a list of the modules themselves would keep every replaced weight alive
    until the end (a second copy of all of them: +3.5 GB for the 4-layer wide decoder).
    """
    names = [name for name, module in root.named_modules() if isinstance(module, nn.Linear)]
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, attr, _TransposedLinear(getattr(parent, attr)))


def write_embed_tokens(weight: torch.Tensor, path: str, threshold: int | None = None):
    """embed_tokens.onnx written directly: one Gather(embed.weight, input_ids), the graph the TorchScript exporter
    gives for nn.Embedding (same names, opset, IR version), without tracing.

    Traced, the table (131072 x 5120: 1.3 GB in fp16) was serialized in memory and parsed back, about three copies
    at once; here its bytes go from the torch tensor straight to the file (or inline below the threshold).
    Returns (proto, external, weights digest) like _export.
    """
    from onnx import TensorProto, helper

    weight = weight.detach().contiguous()
    elem = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16}[weight.dtype]
    vocab, hidden = weight.shape
    table = onnx.TensorProto(name="embed.weight", data_type=elem, dims=[vocab, hidden])
    graph = helper.make_graph(
        [helper.make_node("Gather", ["embed.weight", "input_ids"], ["inputs_embeds"], name="/embed/Gather")],
        "main_graph",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("inputs_embeds", elem, ["batch", "sequence", hidden])],
        [table],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8,
                              producer_name="pixtract-export", producer_version=__version__)
    table = model.graph.initializer[0]
    view = weight.view(torch.uint8) if weight.dtype == torch.float16 else weight
    raw = memoryview(view.numpy()).cast("B")
    threshold = EXTERNAL_DATA_THRESHOLD if threshold is None else threshold
    if len(raw) > threshold:
        location = os.path.basename(path) + "_data"
        with open(os.path.join(os.path.dirname(path), location), "wb") as f:
            f.write(raw)
        for key, value in (("location", location), ("offset", "0"), ("length", str(len(raw)))):
            entry = table.external_data.add()
            entry.key, entry.value = key, value
        table.data_location = TensorProto.EXTERNAL
        external = True
    else:
        table.raw_data = raw.tobytes()
        external = False
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    digest = weights_digest(model, os.path.dirname(path))
    from .model import memory_note

    print(f"  {os.path.basename(path)} written ({memory_note(reset_peak=True)})", flush=True)
    return model, external, digest


def export_graphs(model, out_dir: str, dtype: torch.dtype, attention: str = "eager", release: bool = False,
                  external_threshold: int | None = None) -> dict:
    """Writes the three graphs into out_dir; returns the manifest's "graphs" section.

    release=True consumes the model to keep peak memory near one copy of the weights: the token embeddings are
    written first and dropped (before the LM head's transposition needs its transient copy), the Linear layers are
    replaced by pre-transposed ones (same graphs; see _TransposedLinear), and the vision tower and projector are
    dropped once their graph is written, before the decoder (the largest) is traced. Only the config stays usable
    afterwards.
    """
    if attention not in ATTENTION_KINDS:
        raise ValueError(f"attention {attention!r}: expected one of {ATTENTION_KINDS}")
    import gc

    path = os.path.join(out_dir, "embed_tokens.onnx")
    proto, ext, digest = write_embed_tokens(model.get_input_embeddings().weight, path, external_threshold)
    embed_entry = graph_entry(path, proto, ext, digest)
    del proto
    if release:
        model.model.language_model.embed_tokens = None
        gc.collect()
        transpose_linears(model)
        gc.collect()
    cfg = model.config
    tcfg, vcfg = cfg.text_config, cfg.vision_config
    layers = tcfg.num_hidden_layers
    kv_heads = tcfg.num_key_value_heads
    head_dim = getattr(tcfg, "head_dim", None) or tcfg.hidden_size // tcfg.num_attention_heads
    patch = vcfg.patch_size
    graphs = {}

    # Vision: the example is non-square so height and width stay independent dynamic axes.
    vision = VisionEncoder(model)
    pixel = torch.randn(1, 3, 3 * patch, 5 * patch, dtype=dtype)
    path = os.path.join(out_dir, "vision_encoder.onnx")
    with _UseAttention(model.model.vision_tower.config, VISION_ATTENTION, vision_attention):
        proto, ext, digest = _export(
            vision, (pixel,), path, ["pixel_values"], ["image_features"],
            {"pixel_values": {2: "height", 3: "width"}, "image_features": {0: "num_patches"}},
            custom_opsets={"com.microsoft": 1}, threshold=external_threshold,
        )
    graphs["vision_encoder"] = graph_entry(path, proto, ext, digest)
    del vision, proto
    if release:
        model.model.vision_tower = None
        model.model.multi_modal_projector = None
        gc.collect()

    graphs["embed_tokens"] = embed_entry

    # Decoder: traced with a non-empty past and batch 2 so no axis is specialised to 0 or 1.
    batch, seq, past_len = 2, 4, 3
    embeds = torch.randn(batch, seq, tcfg.hidden_size, dtype=dtype)
    positions = torch.arange(past_len, past_len + seq, dtype=torch.int64).unsqueeze(0).repeat(batch, 1)
    past = []
    if attention == "gqa":
        decoder = GroupQueryDecoder(model)
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
        decoder = Decoder(model)
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
    path = os.path.join(out_dir, "decoder_model_merged.onnx")
    with _UseAttention(tcfg, GROUPED_ATTENTION, grouped_attention):
        proto, ext, digest = _export(decoder, (*args, *past), path, input_names, output_names, axes,
                             fixed_output_dims={("logits", 1): 1, ("logits", 2): tcfg.vocab_size},
                             custom_opsets={"com.microsoft": 1} if attention == "gqa" else None,
                             threshold=external_threshold)
    graphs["decoder"] = graph_entry(path, proto, ext, digest)
    graphs["decoder"]["logits"] = "last_position"
    # "eager": left-padded batches, attention_mask input, the cache grows by Concat. "gqa": GroupQueryAttention,
    # right-padded rows described by seqlens_k, the cache may be one buffer bound as both past and present.
    graphs["decoder"]["attention"] = attention
    graphs["decoder"]["past_key_template"] = "past_key_values.{layer}.key"
    graphs["decoder"]["past_value_template"] = "past_key_values.{layer}.value"
    graphs["decoder"]["present_key_template"] = "present.{layer}.key"
    graphs["decoder"]["present_value_template"] = "present.{layer}.value"
    return graphs
