"""Command line of pixtract-export: `export`, `verify`, `reference`."""

from __future__ import annotations

import argparse
import os
import sys

from .model import ExportError

DESCRIPTION = """\
Turn Pixtral (Hugging Face LlavaForConditionalGeneration, the mistral-community/pixtral-12b layout) into the
three ONNX graphs pixtract runs, plus tokenizer.json and a manifest (pixtract-model.json) holding every number the
runtime needs. Never touches the network: the checkpoint must already be on disk.

  export --checkpoint DIR --out DIR [--dtype fp16]   the real model (fp16 for GPUs)
  export --tiny --out DIR                            seeded random tiny Pixtral with the real tokenizer (tests)
  verify --model DIR                                 ONNX Runtime vs torch parity + greedy vs generate()
  reference --model DIR                              fixtures the Rust tests compare against
"""


def _add_export(sub):
    p = sub.add_parser("export", help="export ONNX graphs + tokenizer + manifest",
                       description="Export Pixtral to ONNX. Exactly one of --checkpoint or --tiny.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="DIR", help="local Hugging Face checkpoint directory (config.json + "
                     "*.safetensors), e.g. a download of mistral-community/pixtral-12b")
    src.add_argument("--tiny", action="store_true", help="build the tiny seeded random Pixtral instead (8.6 M params)")
    p.add_argument("--out", required=True, metavar="DIR", help="output model directory (created; must be empty)")
    p.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32",
                   help="weights and activations; logits are always fp32 (default: fp32). fp16 is for the CUDA "
                        "provider: ONNX Runtime's CPU provider lacks fp16 kernels for parts of these graphs")
    p.add_argument("--seed", type=int, default=None, help="seed of the tiny model's weights (default: 20240911)")


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pixtract-export", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_export(sub)
    _add_verify(sub)
    _add_reference(sub)
    sub.add_parser("bench", help="Python references for `pixtract bench engine` (ORT loop, transformers)",
                   add_help=False)
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["bench"]:
        from .bench import main as bench_main

        return bench_main(argv[1:])
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            from .export import run_export

            return run_export(args)
        if args.command == "verify":
            from .verify import run_verify

            return run_verify(args)
        from .reference import run_reference

        return run_reference(args)
    except ExportError as err:
        print(f"pixtract-export: error: {err}", file=sys.stderr)
        return 2
