"""`export`: checkpoint or tiny model -> model directory."""

from __future__ import annotations

import argparse
import os
import time

import torch

from . import families
from .files import ExportError, check_free_space, partial_output
from .graphs import export_graphs
from .layouts import checkpoint_layout, load_checkpoint, write_tokenizer
from .manifest import build_manifest, write_manifest
from .memory import memory_note, run_peak_gb

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def load_source(family, args_checkpoint, tiny_seed, dtype):
    """The torch model and the manifest's "source" section."""
    if args_checkpoint:
        model = load_checkpoint(os.path.abspath(args_checkpoint), dtype, family)
        name = os.path.basename(os.path.normpath(args_checkpoint))
        return model, {"kind": "checkpoint", "model_id": name, "path": os.path.abspath(args_checkpoint),
                       "layout": checkpoint_layout(args_checkpoint)}
    seed = family.tiny_seed if tiny_seed is None else tiny_seed
    model = family.build_tiny_model(seed).to(dtype)
    return model, {"kind": "tiny", "model_id": f"{family.name}-tiny-random-{seed}", "seed": seed}


def model_from_manifest(manifest: dict, checkpoint: str | None, dtype=torch.float32):
    """Rebuild the torch model a manifest was exported from (for verify/reference)."""
    src = manifest["source"]
    family = families.get(manifest.get("family", families.PIXTRAL.name))
    if checkpoint:
        return load_checkpoint(os.path.abspath(checkpoint), dtype, family)
    if src["kind"] == "tiny":
        return family.build_tiny_model(src["seed"]).to(dtype)
    if os.path.isdir(src.get("path", "")):
        return load_checkpoint(src["path"], dtype, family)
    raise ExportError(f"the manifest's checkpoint {src.get('path')!r} is not here: pass --checkpoint DIR")


def _parameter_count(family, checkpoint: str | None) -> int:
    """Parameters of the model about to be exported, from its config alone (meta device, no weights read)."""
    from .sizes import _config

    config, _ = _config(checkpoint, tiny=not checkpoint, family=family)
    with torch.device("meta"):
        return sum(p.numel() for p in family.model_class()(config).parameters())


def run_export(args) -> int:
    out = os.path.normpath(args.out)
    if os.path.isdir(out) and os.listdir(out):
        raise ExportError(f"{out} exists and is not empty; choose a new --out (nothing was overwritten)")
    if args.quantize:
        # Export the float graphs beside the output, quantize into it, then drop the float copy.
        import shutil

        from .quantize import run_quantize

        float_dir = os.path.normpath(out) + ".float-export"
        shutil.rmtree(float_dir, ignore_errors=True)
        float_args = argparse.Namespace(**{**vars(args), "out": float_dir, "quantize": None})
        run_export(float_args)
        args.model, args.bits = float_dir, int(args.quantize[3:])
        try:
            return run_quantize(args)
        finally:
            shutil.rmtree(float_dir, ignore_errors=True)
    if args.checkpoint:
        checkpoint_layout(args.checkpoint)  # one clear line when the folder is not a checkpoint
    family = families.for_checkpoint(args.checkpoint, getattr(args, "family", None))
    dtype = DTYPES[args.dtype]
    # The graphs hold every parameter once in the export dtype; 10% for the graph structure and alignment.
    need = int(_parameter_count(family, args.checkpoint) * torch.finfo(dtype).bits // 8 * 1.1)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    check_free_space(parent, need, "export")
    # Written under OUT.partial and renamed when complete: an interrupted export never leaves a model under OUT.
    final = out
    with partial_output(final) as out:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
        t0 = time.time()
        model, source = load_source(family, args.checkpoint, args.seed, dtype)
        params = sum(p.numel() for p in model.parameters())
        print(f"loaded {source['model_id']}: {params / 1e6:.1f} M parameters, {args.dtype} ({time.time() - t0:.1f} s; "
              f"{memory_note(reset_peak=True)})")
        t1 = time.time()
        # The model is consumed (pre-transposed, parts released as their graphs are written): only its config is used
        # afterwards.
        graphs = export_graphs(family, model, out, dtype, args.attention, release=True,
                               external_threshold=getattr(args, "external_data_threshold", None))
        tokenizer, tekken = write_tokenizer(out, args.checkpoint, family)
        source["parameters"] = params
        manifest = build_manifest(family, model, graphs, tokenizer, args.dtype, source, tekken)
        path = write_manifest(out, manifest)
        total = sum(g["bytes"] + g.get("external_data", {}).get("bytes", 0) for g in graphs.values())
        del model
    note = memory_note()
    print(f"exported {family.name}'s 3 graphs ({total / 1e6:.1f} MB) in {time.time() - t1:.1f} s ({note}; peak over the whole "
          f"export {run_peak_gb():.2f} GB)")
    print(f"manifest {os.path.join(final, os.path.basename(path))}\nweights sha256 {manifest['weights_sha256']}")
    return 0
