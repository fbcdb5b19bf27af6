"""FP8 checkpoints: per-tensor float8_e4m3 weights, each with one scale, dequantized on export tensor by tensor.

Ministral 3's instruct checkpoints ship this way (docs/mistral3-family.md §4): only the text model's q/k/v/o and MLP
projections are FP8; vision, projector, embeddings, LM head and norms stay BF16. A weight is `W = float32(W_fp8) *
scale` (transformers' Fp8Dequantize with a 1x1 scale grid), then cast to the export dtype. The scale is named
`<module>.weight_scale_inv` in the Hugging Face layout (config.json's quantization_config: quant_method fp8, no block
size) and `<module>.qscale_weight` in Mistral's consolidated one (params.json's quantization: qformat_weight
fp8_e4m3); the activation scales (`activation_scale`, `qscale_act`) only serve FP8 matmuls and are dropped, as
transformers' dequantize=True drops them.

Memory: a weight is dequantized in row slabs of at most 64 MiB of float32, straight into its export-dtype tensor,
so the transient is 64 MiB, not the float32 copy of the whole matrix (335 MB for a 16384 x 5120 one).
"""

from __future__ import annotations

import torch

from ..files import ExportError

# Per layout: the weight scale's and the (dropped) activation scale's names beside `<module>.weight`.
SCALE_SUFFIX = {"hf": "weight_scale_inv", "consolidated": "qscale_weight"}
ACTIVATION_SCALE = {"hf": "activation_scale", "consolidated": "qscale_act"}
FP8_MAX = 448.0  # largest finite float8_e4m3fn
_SLAB_BYTES = 64 * 1024 * 1024


def scale_name(weight: str, layout: str) -> str:
    return weight[: -len("weight")] + SCALE_SUFFIX[layout]


def is_scale(name: str, layout: str) -> bool:
    return name.endswith("." + SCALE_SUFFIX[layout])


def is_dropped(name: str, layout: str) -> bool:
    """Activation scales, and in Mistral's layout the fake quantizers' tensors: only FP8 matmuls use them."""
    if name.endswith("." + ACTIVATION_SCALE[layout]):
        return True
    return layout == "consolidated" and (name.endswith(".fake_quantizer") or ".fake_quantizer." in name)


def is_weight(name: str, layout: str) -> bool:
    """A tensor the model is built from (weights, FP8 or not), as opposed to the scales beside them."""
    return not is_scale(name, layout) and not is_dropped(name, layout)


def is_quantized(name: str, layout: str) -> bool:
    """The weights an FP8 checkpoint stores as FP8: the text model's attention and MLP projections."""
    if layout == "hf":
        return name.startswith("model.language_model.layers.") and name.endswith("_proj.weight")
    return name.startswith("layers.") and (".attention.w" in name or ".feed_forward.w" in name)


def read_scales(files: list[str], layout: str) -> dict:
    """Every weight scale of `files` (scalars, read before the weights they scale)."""
    from .safetensors_io import read_safetensors

    scales = {}
    for file in files:
        scales.update(read_safetensors(file, select=lambda n: is_scale(n, layout)))
    return scales


def dequantize(name: str, weight: torch.Tensor, scales: dict, layout: str, dtype: torch.dtype) -> torch.Tensor:
    """`weight` (float8_e4m3fn) times its per-tensor scale, in `dtype`, slab by slab."""
    key = scale_name(name, layout)
    scale = scales.get(key)
    if scale is None:
        raise ExportError(f"{name} is FP8 but the checkpoint has no {key}")
    if scale.numel() != 1:
        raise ExportError(f"{key} has {scale.numel()} values; pixtract dequantizes per-tensor FP8 (one scale) only")
    factor = float(scale.reshape(()).to(torch.float32))
    out = torch.empty(weight.shape, dtype=dtype)
    rows = weight.shape[0] if weight.dim() else 1
    per_row = max(1, weight.numel() // max(rows, 1)) * 4
    step = max(1, _SLAB_BYTES // per_row)
    flat_in, flat_out = weight.reshape(rows, -1), out.reshape(rows, -1)
    for start in range(0, rows, step):
        flat_out[start:start + step] = (flat_in[start:start + step].to(torch.float32) * factor).to(dtype)
    return out


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, float32 scalar scale) with the scale mapping the largest magnitude to FP8's largest
    finite value: how the random checkpoints write an FP8 checkpoint (the inverse of dequantize, up to rounding)."""
    w = weight.to(torch.float32)
    scale = (w.abs().max() / FP8_MAX).clamp(min=1e-12)
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale.reshape(())


def store_quantized(state: dict, name: str, tensor: torch.Tensor, layout: str):
    """`state[name]` as FP8 with its scale and a unit activation scale beside it, named as `layout` names them."""
    state[name], scale = quantize(tensor)
    prefix = name[: -len("weight")]
    state[prefix + SCALE_SUFFIX[layout]] = scale
    state[prefix + ACTIVATION_SCALE[layout]] = torch.ones(())


def compare_with_transformers(files: list[str], layout: str, dtype: torch.dtype = torch.float32) -> tuple[int, float]:
    """Every FP8 weight of `files` dequantized here and by transformers' own Fp8Dequantize (the op from_pretrained
    runs with dequantize=True): (weights compared, largest absolute difference). For `verify` on FP8 checkpoints."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    from .safetensors_io import read_safetensors

    theirs = Fp8Dequantize(None)
    scales = read_scales(files, layout)
    count, worst = 0, 0.0
    for file in files:
        for name, tensor in read_safetensors(file, select=lambda n: is_weight(n, layout)):
            if tensor.dtype != torch.float8_e4m3fn:
                continue
            ours = dequantize(name, tensor, scales, layout, dtype)
            ref = theirs._dequantize_one(tensor, scales[scale_name(name, layout)], dtype)
            worst = max(worst, float((ours.to(torch.float32) - ref.to(torch.float32)).abs().max()))
            count += 1
    return count, worst
