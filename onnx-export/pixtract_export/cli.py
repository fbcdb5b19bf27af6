"""Command line of pixtract-export: export, verify, reference, quantize, fidelity, sizes, random-checkpoint, and
the two Python references pixtract's benchmarks run (bench, pipeline-reference)."""

from __future__ import annotations

import argparse
import os
import sys

from . import ATTENTION_KINDS
from .files import ExportError

DESCRIPTION = """\
Turn Pixtral (the Hugging Face layout of mistral-community/pixtral-12b, or Mistral's consolidated layout of
mistralai/Pixtral-12B-2409, converted in memory to the Hugging Face names) into the
three ONNX graphs pixtract runs, plus tokenizer.json and a manifest (pixtract-model.json) holding every number the
runtime needs. Never touches the network: the checkpoint must already be on disk.

  export --checkpoint DIR --out DIR [--dtype fp16]   the real model (fp16 for GPUs)
  export ... --quantize int4 [--block-size 32]       export, then quantize the decoder's weights (q4f16 with fp16)
  export --tiny --out DIR                            seeded random tiny Pixtral with the real tokenizer (tests)
  quantize --model DIR --out DIR --bits 4|8          weight-only MatMulNBits variant of an fp32/fp16 export
  fidelity --model VARIANT --baseline DIR            a variant against fp32 on the reference cases
  sizes [--checkpoint DIR]                           weight bytes per variant (default: Pixtral 12B's config)
  verify --model DIR                                 ONNX Runtime vs torch parity + greedy vs generate()
  reference --model DIR                              fixtures the Rust tests compare against
  random-checkpoint --like pixtral-12b --text-layers N --vision-layers M --out DIR
                                                     seeded random checkpoint with the real widths
                                                     (--layout hf or consolidated)
"""


def _add_export(sub):
    p = sub.add_parser("export", help="export ONNX graphs + tokenizer + manifest",
                       description="Export Pixtral to ONNX. Exactly one of --checkpoint or --tiny.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="DIR", help="local checkpoint directory in either layout: Hugging Face "
                     "(config.json + *.safetensors, a download of mistral-community/pixtral-12b) or Mistral's "
                     "consolidated one (params.json + consolidated.safetensors + tekken.json, a download of "
                     "mistralai/Pixtral-12B-2409); the exporter says which it found")
    src.add_argument("--tiny", action="store_true", help="build the tiny seeded random Pixtral instead (8.6 M params)")
    p.add_argument("--out", required=True, metavar="DIR", help="output model directory (created; must be empty)")
    p.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32",
                   help="weights and activations; logits are always fp32 (default: fp32). fp16 halves the weights "
                        "and runs on ONNX Runtime's CPU provider as well as on CUDA (the tiny fp16 model's fidelity "
                        "and engine tests run on the CPU); the dtype for GPUs")
    p.add_argument("--family", choices=["pixtral", "mistral3"], default=None,
                   help="with --tiny: whose tiny model (default pixtral; mistral3: patch 14, 2x2 patch merger, "
                        "Ministral 3's YaRN and query scale, a v13 Tekken). With --checkpoint the family is read "
                        "from the checkpoint (config.json's model_type, params.json's vision encoder)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the tiny model's weights (default: pixtral 20240911, mistral3 20251202)")
    p.add_argument("--attention", choices=list(ATTENTION_KINDS), default="eager",
                   help="decoder attention. eager (default): transformers' attention, left-padded batches, the KV "
                        "cache grows by Concat; runs on every provider and dtype. gqa: ONNX Runtime's "
                        "GroupQueryAttention: rows keep their own lengths (no attention over padding) and pixtract "
                        "writes the cache in place (one buffer bound as past and present, one slot per running "
                        "sequence: continuous batching); on CUDA only with --dtype fp16 (ONNX Runtime's CUDA kernel "
                        "has no fp32), the export meant for GPUs; the eager fp32 export stays for parity checks")
    p.add_argument("--external-data-threshold", type=_bytes, default=None, metavar="BYTES",
                   help="a graph with more weight bytes than this keeps them in one `<graph>.onnx_data` file beside "
                        "it (default 1GiB; protobuf caps a single file at 2 GB). Accepts 64MiB, 1GiB, ...: tests set "
                        "it low to exercise external data on a small model")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="after exporting, quantize the decoder's MatMul weights with ONNX Runtime's MatMulNBits "
                        "(weight-only; with --dtype fp16 this gives q8f16 / q4f16). Same as running `quantize` "
                        "on the export")
    _add_quant_options(p)


def _bytes(text: str) -> int:
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    low = text.strip().lower()
    for unit, factor in units.items():
        if low.endswith(unit) and low[: -len(unit)].strip().isdigit():
            return int(low[: -len(unit)]) * factor
    if low.isdigit():
        return int(low)
    raise argparse.ArgumentTypeError(f"{text!r}: expected bytes such as 67108864, 64MiB or 1GiB")


def _add_quant_options(p):
    p.add_argument("--block-size", type=int, default=32,
                   help="weights per scale/zero point along the input dimension (default 32: closer to the "
                        "float weights than 128 for 11%% more bytes; see README)")
    p.add_argument("--graphs", default="decoder",
                   help="comma-separated graphs to quantize: decoder, vision_encoder (default: decoder; "
                        "embed_tokens is a lookup and stays float)")
    p.add_argument("--keep-lm-head", action="store_true",
                   help="leave the LM head (vocab x hidden) in float: larger, closer logits")
    p.add_argument("--symmetric", action="store_true", help="symmetric blocks without zero points")
    p.add_argument("--accuracy-level", type=int, choices=[0, 1, 2, 3, 4], default=None,
                   help="MatMulNBits accuracy_level: minimum compute precision (0 unset, 1 fp32, 2 fp16, 3 bf16, "
                        "4 int8 activations: fastest on CPU, least exact). Default: unset")


def _add_quantize(sub):
    p = sub.add_parser("quantize", help="weight-only int8/int4 variant of an exported model (MatMulNBits)",
                       description="Quantize the constant MatMul weights of an fp32 or fp16 export to ONNX "
                                   "Runtime's MatMulNBits (round-to-nearest, no calibration; the graph written is "
                                   "byte for byte what ONNX Runtime's MatMulNBitsQuantizer writes). Weights are "
                                   "read and quantized one at a time, in 64 MiB slabs: memory is about 0.65 GB + "
                                   "the quantized graph + 1.3 GB, not the source graph (~8.6 GB for Pixtral 12B "
                                   "q4f16). Written to OUT.partial and renamed when complete. The other graphs and "
                                   "the tokenizer are linked or copied; the manifest records exactly what each "
                                   "graph holds.")
    p.add_argument("--model", required=True, metavar="DIR", help="fp32 or fp16 model directory written by `export`")
    p.add_argument("--out", required=True, metavar="DIR", help="output model directory (created; must be empty)")
    p.add_argument("--bits", type=int, choices=[4, 8], required=True, help="bits per weight")
    _add_quant_options(p)


def _add_fidelity(sub):
    p = sub.add_parser("fidelity", help="compare a variant with the fp32 model on the reference cases",
                       description="Run a variant (fp16, int8, int4, ...) and its fp32 baseline through ONNX "
                                   "Runtime on the baseline's reference cases. Reports greedy-token agreement "
                                   "(identical prefix and overall), and per step (teacher-forced on the baseline's "
                                   "tokens) the logits' cosine similarity and top-1 agreement. Writes "
                                   "<variant>/fidelity.json. Exits 1 below the given minimums.")
    p.add_argument("--model", required=True, metavar="DIR", help="the variant's model directory")
    p.add_argument("--baseline", required=True, metavar="DIR",
                   help="the fp32 model directory holding reference/ (e.g. models/tiny)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens per case (default 32)")
    p.add_argument("--min-top1", type=float, default=0.0,
                   help="fail when the per-step top-1 agreement is below this share (default 0: report only)")
    p.add_argument("--min-cosine", type=float, default=0.0,
                   help="fail when the mean logits cosine similarity is below this (default 0: report only)")


def _add_sizes(sub):
    p = sub.add_parser("sizes", help="weight bytes per variant, computed from parameter shapes and formats",
                       description="Count the parameters of each graph (from a checkpoint's config.json, without "
                                   "loading weights; default: Pixtral 12B's published config) and compute the "
                                   "bytes each variant stores: float weights, MatMulNBits packed weights, scales and "
                                   "zero points. With --model, also checks the formula against an exported "
                                   "directory's actual initializers.")
    p.add_argument("--checkpoint", metavar="DIR", help="checkpoint directory whose config.json (or params.json, "
                   "consolidated layout) to use")
    p.add_argument("--tiny", action="store_true", help="the tiny test model's config")
    p.add_argument("--like", metavar="NAME", default=None,
                   help="a published model's widths and depth, as random-checkpoint --like names them "
                        "(ministral-3-3b, ministral-3-8b, ministral-3-14b, mistral-small-3.1, pixtral-12b)")
    p.add_argument("--model", metavar="DIR", action="append", default=[],
                   help="exported model directory to check the computed bytes against (repeatable)")
    p.add_argument("--block-size", type=int, default=32, help="block size of the quantized variants (default 32)")
    p.add_argument("--context", type=int, default=8192,
                   help="tokens of KV cache assumed for the minimum GPU memory (default 8192)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _add_verify(sub):
    p = sub.add_parser("verify", help="ONNX Runtime vs torch parity; exits 1 beyond tolerance",
                       description="Compare the exported graphs (ONNX Runtime) with the torch model they came from: "
                                   "vision features at several sizes, batched left-padded prefill, decode steps, "
                                   "and greedy tokens vs transformers generate(). Exits 1 when beyond tolerance.")
    p.add_argument("--model", required=True, metavar="DIR", help="model directory written by `export`")
    p.add_argument("--checkpoint", metavar="DIR",
                   help="the checkpoint it was exported from (default: rebuild the tiny model from the manifest)")
    p.add_argument("--new-tokens", type=int, default=20, help="greedy tokens compared with generate() (default 20)")


def _add_reference(sub):
    p = sub.add_parser("reference", help="write reference fixtures for the Rust tests",
                       description="Write <model>/reference/: per case the input PNGs, the prompt, expected input "
                                   "ids, pixel tensor statistics, first-step top-k logits and 32 greedy tokens "
                                   "from transformers, with mistral-common preprocessing and token layout.")
    p.add_argument("--model", required=True, metavar="DIR", help="model directory written by `export`")
    p.add_argument("--checkpoint", metavar="DIR",
                   help="the checkpoint it was exported from (default: rebuild the tiny model from the manifest)")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per case (default 32)")


def _add_random_checkpoint(sub):
    p = sub.add_parser(
        "random-checkpoint", help="seeded random Pixtral / Mistral 3 checkpoint with real widths",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write a seeded random checkpoint on disk, laid out like the real model's repository "
                    "(Hugging Face: config.json, sharded bf16 safetensors + index, tokenizer.json; or Mistral's "
                    "consolidated layout), to exercise `export` at the real model's widths without downloading it.",
        epilog="""\
--like pixtral-12b keeps every width of Pixtral 12B (text hidden 5120, 32 heads / 8 KV heads, head_dim 128, ffn
14336, vocab 131072, rope_theta 1e9; vision hidden 1024, 16 heads, head_dim 64, ffn 4096, patch 16, image 1024);
the layer counts default to the real model's (40 text, 24 vision) and may be cut. Sizes at bf16:
  --text-layers 2 --vision-layers 2    1.95 B parameters, 3.9 GB on disk, 4.6 GB peak RSS, ~1 min to build
  each further text layer              +0.273 B parameters (+0.55 GB)
--like pixtral-ci is the CI-sized model with the real geometry (text head_dim 128 with 16 heads / 4 KV heads,
vision head_dim 64, the real vocabulary) and narrower widths (text hidden 512, vision hidden 256): 0.144 B.
--like pixtral-tiny has the tiny test model's widths (text hidden 32, vision hidden 64, real vocabulary): 8.6 M.

The Mistral 3 family (docs/mistral3-family.md; vision: Pixtral's tower at 14-px patches up to 1540 px, a 2x2 patch
merger; text heads 32 / 8 KV, head_dim 128; a synthetic Tekken of the version each model ships, Pixtral's vocabulary):
  --like ministral-3-3b      hidden 3072, 26 layers, ffn 9216, YaRN (theta 1e6), tied LM head: 3.85 B parameters
  --like ministral-3-8b      hidden 4096, 34 layers, ffn 14336, YaRN (theta 1e6): 8.92 B
  --like ministral-3-14b     hidden 5120, 40 layers, ffn 16384, YaRN (theta 1e9): 13.9 B
  --like mistral-small-3.1   hidden 5120, 40 layers, ffn 32768, plain RoPE theta 1e9, Tekken v7: 24.0 B
  --like mistral3-tiny       the tiny Mistral 3's widths with Ministral 3's real YaRN

The weights are drawn from one generator seeded with --seed, parameter by parameter in name order (matrices and
biases N(0, --weight-std), norm gains N(1, 0.1)), directly in bf16 on a meta-built model: the same seed and versions give
the same bytes. The checkpoint is written to OUT.partial and renamed when complete.

Example (then export it like a downloaded checkpoint):
  export.py random-checkpoint --like pixtral-12b --text-layers 2 --vision-layers 2 --seed 1 --out ckpt/wide
  export.py export --checkpoint ckpt/wide --dtype fp16 --out models/wide-fp16
""")
    from .random_checkpoint import LIKE

    p.add_argument("--like", default="pixtral-12b", choices=list(LIKE),
                   help="whose widths to copy (default: pixtral-12b)")
    p.add_argument("--text-layers", type=int, default=None, metavar="N",
                   help="decoder layers (default: the real model's; 12B has 40, Ministral 3 3B 26)")
    p.add_argument("--vision-layers", type=int, default=None, metavar="M",
                   help="vision layers (default: the real model's, 24)")
    p.add_argument("--layout", choices=["hf", "consolidated"], default="hf",
                   help="hf (default): the Hugging Face LlavaForConditionalGeneration layout of "
                        "mistral-community/pixtral-12b. consolidated: Mistral's layout of mistralai/Pixtral-12B-2409 "
                        "(params.json, consolidated.safetensors, tekken.json), same weights for the same seed")
    p.add_argument("--seed", type=int, default=0, help="weights seed (default 0)")
    p.add_argument("--fp8", action="store_true",
                   help="store the text model's projections as per-tensor FP8 (float8_e4m3 + one scale each), as "
                        "Ministral 3's instruct checkpoints ship (Mistral 3 family only); `export` dequantizes them")
    p.add_argument("--weight-std", type=float, default=0.02,
                   help="std of the matrices and biases (default 0.02, transformers' initializer_range). At 0.02 a "
                        "random model's greedy output is one token repeated; tests use a larger std (models/ci: 0.06) "
                        "so tokens vary and top-1/top-2 logit gaps stay clear of rounding noise")
    p.add_argument("--max-shard-size", type=_bytes, default="2GB", metavar="BYTES",
                   help="largest safetensors shard (default 2GB, as the real repo; 500MB, 1GiB, ...)")
    p.add_argument("--out", required=True, metavar="DIR", help="checkpoint directory (created; must be empty)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pixtract-export", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_export(sub)
    _add_verify(sub)
    _add_reference(sub)
    _add_quantize(sub)
    _add_fidelity(sub)
    _add_sizes(sub)
    _add_random_checkpoint(sub)
    from . import bench, refpipe

    bench.add_parser(sub)
    refpipe.add_parser(sub)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.command == "bench":
            return bench.run(args)
        if args.command == "pipeline-reference":
            return refpipe.run(args)
        if args.command == "export":
            from .export import run_export

            return run_export(args)
        if args.command == "verify":
            from .verify import run_verify

            return run_verify(args)
        if args.command == "quantize":
            from .quantize import run_quantize

            return run_quantize(args)
        if args.command == "fidelity":
            from .fidelity import run_fidelity

            return run_fidelity(args)
        if args.command == "random-checkpoint":
            from .random_checkpoint import run_random_checkpoint

            return run_random_checkpoint(args)
        if args.command == "sizes":
            from .sizes import run_sizes

            return run_sizes(args)
        from .reference import run_reference

        return run_reference(args)
    except ExportError as err:
        print(f"pixtract-export: error: {err}", file=sys.stderr)
        return 2
