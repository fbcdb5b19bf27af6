"""Mistral's consolidated layout (mistralai/Pixtral-12B-2409): params.json, consolidated.safetensors, tekken.json.

The exporter reads it by converting in memory to the Hugging Face LlavaForConditionalGeneration names (the
mistral-community/pixtral-12b layout), so everything after loading is the same code for both layouts.

Where the mapping comes from. transformers ships the conversion as a script in its source tree,
`src/transformers/models/pixtral/convert_pixtral_weights_to_hf.py` (OLD_KEY_TO_NEW_KEY_MAPPING, permute_for_rope,
MISTRAL_CONFIG_MAPPING), but not in the wheel: transformers 5.24 as installed here has no such file and no loader for
Mistral's native Pixtral checkpoints (its conversion_mapping.py knows Mistral-native names only for another model,
"mistral_large4", whose text attention differs). So the name table below mirrors that upstream script, written as
one two-way table (read and write use the same rows). The row permutation of q/k is not re-implemented: it is
transformers' own `PermuteForRope` conversion op (transformers.core_model_loading), and its `reverse_op` for
writing.

Why q/k are permuted. Mistral's reference code applies RoPE to interleaved pairs (dims 2i, 2i+1 form one complex
number); transformers' Mistral and Pixtral apply it "rotate-half" (dim i pairs with dim i + head_dim/2). The
upstream script therefore permutes the output rows of every q and k projection, per head: text wq with the 32 query
heads, text wk with the 8 KV heads (not the query heads), vision wq and wk with the 16 vision heads (the 2D RoPE of
the vision encoder is interleaved the same way). v, o, MLPs, norms and the adapter are renamed only.

Config: params.json keys become MistralConfig / PixtralVisionConfig fields the way the upstream script maps them
(dim -> hidden_size, hidden_dim -> intermediate_size, n_heads, n_kv_heads, n_layers), plus norm_eps ->
rms_norm_eps, which the script passes under its Mistral name (MistralConfig then silently keeps its 1e-6 default;
Pixtral's is 1e-5).
"""

from __future__ import annotations

import json
import os
import re
import types

import torch

from .model import ExportError

FILES = ("params.json", "consolidated.safetensors", "tekken.json")

# (Mistral name, Hugging Face name, RoPE rows): "{i}" is a layer number. RoPE rows name whose heads the q/k
# permutation uses. Mirrors OLD_KEY_TO_NEW_KEY_MAPPING of transformers' convert_pixtral_weights_to_hf.py, with the
# HF names of transformers 5.x (model.language_model.*, model.vision_tower.*, model.multi_modal_projector.*).
_V = "vision_encoder.transformer.layers.{i}."
_HV = "model.vision_tower.transformer.layers.{i}."
_T = "layers.{i}."
_HT = "model.language_model.layers.{i}."
NAME_TABLE = [
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
]


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)") + r"\Z")


_TO_HF = [(_pattern(m), h, rope) for m, h, rope in NAME_TABLE]
_TO_MISTRAL = [(_pattern(h), m, rope) for m, h, rope in NAME_TABLE]


def _rename(name: str, table) -> tuple[str, str | None] | None:
    for pattern, template, rope in table:
        found = pattern.match(name)
        if found:
            return template.replace("{i}", found.groupdict().get("i") or ""), rope
    return None


def hf_name(mistral_name: str) -> tuple[str, str | None] | None:
    """(Hugging Face name, RoPE rows) of a consolidated tensor name; None for a name the table does not know."""
    return _rename(mistral_name, _TO_HF)


def mistral_name(hf: str) -> tuple[str, str | None] | None:
    return _rename(hf, _TO_MISTRAL)


def _heads(rope: str, config) -> int:
    return {"vision": config.vision_config.num_attention_heads, "text_q": config.text_config.num_attention_heads,
            "text_kv": config.text_config.num_key_value_heads}[rope]


def permute_rows(tensor: torch.Tensor, rope: str, config, to_hf: bool) -> torch.Tensor:
    """Interleaved-pair RoPE rows (Mistral) <-> rotate-half rows (transformers), with transformers' own op."""
    from transformers.core_model_loading import PermuteForRope

    op = PermuteForRope()
    if not to_hf:
        op = op.reverse_op
    # The op reads the head count from config.num_attention_heads; for the text k projection that must be the KV
    # heads, so it is handed exactly the count this tensor needs.
    heads = types.SimpleNamespace(num_attention_heads=_heads(rope, config))
    return op.convert({"w": tensor}, source_patterns=["w"], target_patterns=["w"], config=heads)["w"].contiguous()


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


def read_config(path: str):
    with open(os.path.join(path, "params.json")) as f:
        try:
            params = json.load(f)
        except json.JSONDecodeError as err:
            raise ExportError(f"{path}/params.json: not JSON ({err})") from None
    return config_from_params(params, os.path.join(path, "params.json"))


_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
# A header larger than this is not a safetensors header (the format's own readers refuse above 100 MB too).
_MAX_HEADER_BYTES = 100 * 1024 * 1024


def read_safetensors(path: str):
    """Yields (name, tensor) of a safetensors file, one tensor at a time, each read with plain file reads into its
    own buffer. safetensors' safe_open maps the file, and every page a tensor was read from stays resident (and
    counted in the process's RSS) until the file is closed: reading a 3.9 GB consolidated.safetensors that way
    added 2.5 GB to the export's peak; the real 25 GB file would add up to its whole size."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        header_len = int.from_bytes(head, "little") if len(head) == 8 else -1
        if header_len < 2 or header_len > min(_MAX_HEADER_BYTES, size - 8):
            raise ExportError(f"{path}: not a safetensors file (header length {header_len}, file {size} bytes)")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ExportError(f"{path}: not a safetensors file (header: {err})") from None
        base = 8 + header_len
        entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                         key=lambda kv: kv[1]["data_offsets"][0])
        for name, info in entries:
            dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise ExportError(f"{path}: {name} is {info.get('dtype')}; expected BF16, F16 or F32")
            begin, end = info["data_offsets"]
            shape = list(info["shape"])
            want = end - begin
            if want != torch.Size(shape).numel() * torch.finfo(dtype).bits // 8 or base + end > size:
                raise ExportError(f"{path}: {name} ({info.get('dtype')} {shape}) does not fit bytes {begin}-{end} "
                                  f"of a {size}-byte file; the download is cut or corrupt")
            buffer = bytearray(want)
            f.seek(base + begin)
            if f.readinto(buffer) != want:
                raise ExportError(f"{path}: {name}: short read; the file changed while it was read")
            if not want:
                yield name, torch.empty(shape, dtype=dtype)
                continue
            yield name, torch.frombuffer(buffer, dtype=dtype).reshape(shape)


def load_consolidated(path: str, dtype: torch.dtype):
    """The model of a consolidated folder, with Hugging Face names, in `dtype`. Tensors are read one at a time from
    the safetensors file (read_safetensors: not mapped), renamed, their q/k rows permuted, cast, and assigned into a
    model built on the meta device: the weights are held once (plus one tensor in flight), as for the Hugging Face
    layout."""
    from transformers import LlavaForConditionalGeneration

    from .checkpoint import rebuild_buffers

    config = read_config(path)
    config._attn_implementation = "eager"
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    wanted = {name for name, _ in model.named_parameters()}
    weights, unknown = {}, []
    for key, tensor in read_safetensors(os.path.join(path, "consolidated.safetensors")):
        renamed = hf_name(key)
        if renamed is None or renamed[0] not in wanted:
            unknown.append(key)
            continue
        name, rope = renamed
        if rope:
            tensor = permute_rows(tensor, rope, config, to_hf=True)
        weights[name] = tensor.to(dtype)
        del tensor
    missing = sorted(wanted - weights.keys())
    if unknown or missing:
        raise ExportError(f"{path}/consolidated.safetensors does not match its params.json: "
                          f"{len(unknown)} unknown tensors {unknown[:3]}, {len(missing)} missing {missing[:3]}")
    model.load_state_dict(weights, strict=True, assign=True)
    del weights
    rebuild_buffers(model)
    model.config.dtype = dtype
    model.eval()
    return model


def write_consolidated(model, out: str):
    """consolidated.safetensors + params.json of a Hugging Face-named model (the inverse of load_consolidated); the
    caller writes tekken.json."""
    from safetensors.torch import save_file

    state = {}
    for name, tensor in model.state_dict().items():
        renamed = mistral_name(name)
        if renamed is None:
            continue  # buffers (RoPE inverse frequencies): not stored by Mistral either
        key, rope = renamed
        state[key] = permute_rows(tensor, rope, model.config, to_hf=False) if rope else tensor.contiguous()
    unmapped = sorted(n for n, _ in model.named_parameters() if mistral_name(n) is None)
    if unmapped:
        raise ExportError(f"consolidated layout: no Mistral name for {unmapped[:3]}")
    save_file(state, os.path.join(out, "consolidated.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out, "params.json"), "w") as f:
        json.dump(params_from_config(model.config), f, indent=2)
        f.write("\n")
