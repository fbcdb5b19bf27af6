"""`random-checkpoint`: a seeded random Pixtral or Mistral 3 model with real widths, written like the real repos.

The exporter's behaviour at Pixtral 12B's real widths (external data, memory, the 2 GB protobuf limit, real
head_dim and query:KV ratio) can be tested without the 25 GB download: keep every width of the published config
and only cut the number of layers. The model is built on torch's meta device and materialised directly in bf16
(the checkpoint's dtype), then every parameter is drawn in place from one generator seeded once, in name order:
no fp32 copy is ever made, so peak memory is about the bf16 weights themselves (2 bytes per parameter).

Layouts written:
  hf (Hugging Face, LlavaForConditionalGeneration, as mistral-community/pixtral-12b): config.json,
  generation_config.json, model-0000N-of-0000M.safetensors + model.safetensors.index.json (bf16, shards of at most
  --max-shard-size), tokenizer.json (Tekken converted by transformers' MistralConverter from mistral-common's
  tekken_240911.json, Pixtral's tokenizer) and tokenizer_config.json.
  consolidated (Mistral's, as mistralai/Pixtral-12B-2409): params.json, one consolidated.safetensors (bf16, Mistral
  names, q/k rows in Mistral's interleaved RoPE order; see layouts/consolidated.py) and tekken.json. Same seed, same
  weights as the hf layout.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import torch

from .families import MISTRAL3, PIXTRAL
from .files import ExportError, check_free_space, partial_output
from .layouts.meta import rebuild_buffers

# mistral-community/pixtral-12b config.json; layer counts are chosen by the caller.
PIXTRAL_12B_TEXT = dict(hidden_size=5120, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                        head_dim=128, vocab_size=131072, rope_theta=1e9, rms_norm_eps=1e-5,
                        max_position_embeddings=1024000, hidden_act="silu", sliding_window=None, bos_token_id=1,
                        eos_token_id=2, tie_word_embeddings=False)
PIXTRAL_12B_VISION = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, head_dim=64,
                          num_channels=3, patch_size=16, image_size=1024, hidden_act="silu", rope_theta=10000.0)
PIXTRAL_12B_LAYERS = (40, 24)  # text, vision

# A CI-sized Pixtral with the real geometry where it matters to the runtime: text head_dim 128 with 4 query heads per
# KV head (16:4, as 32:8 in 12B; heads x head_dim = 2048 != hidden 512, as 4096 != 5120 in 12B), vision head_dim 64,
# the real vocabulary, patch and image size; narrower widths. 144 M parameters, ~0.58 GB in fp32; setup.sh exports
# it with a lowered --external-data-threshold so its embed_tokens and decoder keep their weights in external data.
CI_TEXT = dict(PIXTRAL_12B_TEXT, hidden_size=512, intermediate_size=1024, num_attention_heads=16,
               num_key_value_heads=4, head_dim=128, max_position_embeddings=32768)
CI_VISION = dict(PIXTRAL_12B_VISION, hidden_size=256, intermediate_size=512, num_attention_heads=4, head_dim=64)

# The tiny test model's widths (families/pixtral.py tiny_config): for layout tests that need seconds, not minutes.
TINY_TEXT = dict(PIXTRAL_12B_TEXT, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, max_position_embeddings=32768)
TINY_VISION = dict(PIXTRAL_12B_VISION, hidden_size=64, intermediate_size=128, num_attention_heads=4, head_dim=16)

# The Mistral 3 family (docs/mistral3-family.md §3: transformers' config defaults, the conversion scripts and
# Megatron-Bridge's provider; the Hub's config.json files could not be read here). Vision is the same for all: Pixtral's
# tower at 14-px patches up to 1540 px, merged 2x2. Ministral 3 has YaRN over 16,384 positions and the query scale;
# its 3B ties the LM head to the embeddings; Mistral Small 3.1 is a plain Mistral text model (RoPE theta 1e9).
MISTRAL3_VISION = dict(PIXTRAL_12B_VISION, patch_size=14, image_size=1540)
_MINISTRAL = dict(num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=131072, rms_norm_eps=1e-5,
                  max_position_embeddings=262144)
MINISTRAL_3B_TEXT = dict(_MINISTRAL, hidden_size=3072, intermediate_size=9216, rope_theta=1e6, tie_word_embeddings=True)
MINISTRAL_8B_TEXT = dict(_MINISTRAL, hidden_size=4096, intermediate_size=14336, rope_theta=1e6,
                         tie_word_embeddings=False)
MINISTRAL_14B_TEXT = dict(_MINISTRAL, hidden_size=5120, intermediate_size=16384, rope_theta=1e9,
                          tie_word_embeddings=False)
SMALL_31_TEXT = dict(_MINISTRAL, hidden_size=5120, intermediate_size=32768, rope_theta=1e9,
                     max_position_embeddings=131072, tie_word_embeddings=False)
MISTRAL3_TINY_TEXT = dict(_MINISTRAL, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, rope_theta=1e6, max_position_embeddings=32768,
                          tie_word_embeddings=False)
MISTRAL3_TINY_VISION = dict(TINY_VISION, patch_size=14, image_size=1540)


@dataclass(frozen=True)
class Like:
    """One --like: the family, its text and vision widths, Ministral 3's RoPE (None: plain RoPE), the real layer
    counts (text, vision), and the Tekken version its tokenizer is."""

    family: object
    text: dict
    vision: dict
    rope: dict | None
    layers: tuple
    tekken: str


LIKE = {
    "pixtral-12b": Like(PIXTRAL, PIXTRAL_12B_TEXT, PIXTRAL_12B_VISION, None, PIXTRAL_12B_LAYERS, "v3"),
    "pixtral-ci": Like(PIXTRAL, CI_TEXT, CI_VISION, None, PIXTRAL_12B_LAYERS, "v3"),
    "pixtral-tiny": Like(PIXTRAL, TINY_TEXT, TINY_VISION, None, PIXTRAL_12B_LAYERS, "v3"),
    "ministral-3-3b": Like(MISTRAL3, MINISTRAL_3B_TEXT, MISTRAL3_VISION, "yarn", (26, 24), "v13"),
    "ministral-3-8b": Like(MISTRAL3, MINISTRAL_8B_TEXT, MISTRAL3_VISION, "yarn", (34, 24), "v13"),
    "ministral-3-14b": Like(MISTRAL3, MINISTRAL_14B_TEXT, MISTRAL3_VISION, "yarn", (40, 24), "v13"),
    "mistral-small-3.1": Like(MISTRAL3, SMALL_31_TEXT, MISTRAL3_VISION, None, (40, 24), "v7"),
    "mistral3-tiny": Like(MISTRAL3, MISTRAL3_TINY_TEXT, MISTRAL3_TINY_VISION, "yarn", (2, 2), "v13"),
}
LAYOUTS = ("hf", "consolidated")
WEIGHT_STD = 0.02  # transformers' initializer_range for Mistral/Pixtral
NORM_STD = 0.1  # RMSNorm / LayerNorm gains drawn around 1


def random_config(like: str, text_layers: int | None, vision_layers: int | None):
    """The config of a --like at the given layer counts (None: the real model's)."""
    from transformers import LlavaConfig, MistralConfig, PixtralVisionConfig

    if like not in LIKE:
        raise ExportError(f"--like {like!r}: expected one of {', '.join(LIKE)}")
    spec = LIKE[like]
    text_layers = spec.layers[0] if text_layers is None else text_layers
    vision_layers = spec.layers[1] if vision_layers is None else vision_layers
    if text_layers < 1 or vision_layers < 1:
        raise ExportError("--text-layers and --vision-layers must be >= 1")
    if spec.family is MISTRAL3:
        from .families.mistral3 import MINISTRAL3_ROPE, mistral3_config

        rope = MINISTRAL3_ROPE if spec.rope == "yarn" else None
        text = dict(spec.text, num_hidden_layers=text_layers)
        return mistral3_config(dict(spec.vision, num_hidden_layers=vision_layers), text, rope)
    text, vision = spec.text, spec.vision
    return LlavaConfig(
        vision_config=PixtralVisionConfig(**vision, num_hidden_layers=vision_layers),
        text_config=MistralConfig(**text, num_hidden_layers=text_layers),
        image_token_index=10, projector_hidden_act="gelu", vision_feature_layer=-1,
        vision_feature_select_strategy="full", multimodal_projector_bias=True, tie_word_embeddings=False,
    )


def build_random_model(config, seed: int, dtype=torch.bfloat16, weight_std: float = WEIGHT_STD, family=PIXTRAL):
    """Meta-device model materialised in `dtype`, every parameter drawn in place (name order, one generator)."""
    config._attn_implementation = "eager"
    with torch.device("meta"):
        model = family.model_class()(config)
    model = model.to(dtype).to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if param.dim() >= 2 or name.endswith("bias"):
                param.normal_(0.0, weight_std, generator=gen)
            else:
                param.normal_(1.0, NORM_STD, generator=gen)
    rebuild_buffers(model)
    model.eval()
    return model


def run_random_checkpoint(args) -> int:
    out = os.path.normpath(args.out)
    if os.path.isdir(out) and os.listdir(out):
        raise ExportError(f"{out} exists and is not empty; choose a new --out (nothing was overwritten)")
    if args.layout not in LAYOUTS:
        raise ExportError(f"--layout {args.layout}: expected one of {', '.join(LAYOUTS)}")
    config = random_config(args.like, args.text_layers, args.vision_layers)
    spec = LIKE[args.like]
    family = spec.family
    if args.fp8 and family is not MISTRAL3:
        raise ExportError(f"--fp8: {args.like} checkpoints ship in BF16; FP8 is the Ministral 3 instruct format")
    text_layers, vision_layers = config.text_config.num_hidden_layers, config.vision_config.num_hidden_layers
    with torch.device("meta"):
        params = sum(p.numel() for p in family.model_class()(config).parameters())
    need = int(params * 2 * 1.1)
    check_free_space(os.path.dirname(os.path.abspath(out)) or ".", need, "random-checkpoint")
    # Written into OUT.partial, renamed when complete; removed when anything fails (no memory, no disk, Ctrl-C).
    with partial_output(out) as partial:
        t0 = time.time()
        torch.set_num_threads(max(1, os.cpu_count() or 1))
        model = build_random_model(config, args.seed, weight_std=args.weight_std, family=family)
        print(f"built {args.like} widths, {text_layers} text + {vision_layers} vision layers: "
              f"{params / 1e9:.3f} B parameters, bf16, seed {args.seed} ({time.time() - t0:.1f} s)")
        t1 = time.time()
        if args.layout == "consolidated":
            # The same seeded weights, written under Mistral's names with q/k rows in Mistral's RoPE order.
            from .layouts.consolidated import write_consolidated

            write_consolidated(model, partial, family, fp8=args.fp8)
            family.write_default_tekken(os.path.join(partial, "tekken.json"), spec.tekken)
        else:
            from .layouts.hf import write_hf

            tekken = os.path.join(partial, "tekken.json")
            family.write_default_tekken(tekken, spec.tekken)
            write_hf(model, partial, args.max_shard_size, tekken, fp8=args.fp8)
            if family is PIXTRAL:
                os.remove(tekken)  # mistral-community/pixtral-12b ships tokenizer.json only
        del model
        with open(os.path.join(partial, "pixtract-random.json"), "w") as f:
            json.dump({"like": args.like, "family": family.name, "text_layers": text_layers,
                       "vision_layers": vision_layers, "tekken_version": spec.tekken, "fp8": args.fp8,
                       "seed": args.seed, "parameters": params, "dtype": "bfloat16", "weight_std": args.weight_std,
                       "norm_std": NORM_STD, "torch": torch.__version__}, f, indent=2)
            f.write("\n")
    size = sum(os.path.getsize(os.path.join(out, n)) for n in os.listdir(out))
    print(f"wrote {out}: {size / 1e9:.2f} GB ({time.time() - t1:.1f} s)")
    return 0
