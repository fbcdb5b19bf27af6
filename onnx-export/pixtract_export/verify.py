"""`verify`: the exported graphs under ONNX Runtime against the torch model, with figures and a loud failure."""

from __future__ import annotations

import gc
import json
import os
import sys

import numpy as np
import torch

from . import prompting, samples
from .export import model_from_manifest
from .memory import memory_note, run_peak_gb
from .ort_loop import OrtPixtral

# fp32 tolerances: vision relative to the features' magnitude (they reach ~40 on the tiny model), logits absolute.
TOL = {"fp32": {"vision_rel": 2e-5, "logits": 1e-4}, "fp16": {"vision_rel": 2e-2, "logits": 5e-2}}

VISION_CASES = [
    ("64x48 small", 64, 48),
    ("300x200 non-square", 300, 200),
    ("380x1500 tall, above 1024", 380, 1500),
    ("2000x1400 wide, above 1024", 2000, 1400),
]


class Report:
    def __init__(self):
        self.failures = []

    def check(self, label: str, ok: bool, text: str):
        print(f"  [{'ok' if ok else 'FAIL'}] {label}: {text}")
        if not ok:
            self.failures.append(label)


def _hf_features(model, chw: np.ndarray) -> np.ndarray:
    px = torch.from_numpy(chw)[None]
    sizes = torch.tensor([[chw.shape[1], chw.shape[2]]])
    with torch.no_grad():
        # The feature layer and selection come from the model's config (last layer, every patch, for both families).
        out = model.model.get_image_features(pixel_values=px, image_sizes=sizes)
    feats = out.pooler_output if hasattr(out, "pooler_output") else out
    return feats[0].float().numpy()


def _hf_embeds(model, ids: np.ndarray, images: list[np.ndarray]) -> torch.Tensor:
    with torch.no_grad():
        emb = model.get_input_embeddings()(torch.from_numpy(ids))
        if images:
            feats = torch.cat([torch.from_numpy(_hf_features(model, i)) for i in images], 0)
            emb[torch.from_numpy(ids == model.config.image_token_index)] = feats
    return emb


def _cache_of(out):
    # transformers 5.x renamed the output field past_key_values -> cache; read whichever this version has.
    return out["cache"] if "cache" in out else out["past_key_values"]


def _inputs(pad: int, tekken: str) -> dict:
    """Every input both sides see: the vision cases' pixels, the batch of two prompts (left-padded, as the eager
    graph wants) and the greedy prompt. Pure preprocessing (mistral-common), no model."""
    vision = []
    for label, w, h in VISION_CASES:
        img = samples.document(w, h, seed=w * 7 + h, lines=samples.RECEIPT_LINES)
        _, images = prompting.encode([{"type": "image", "image": img}, {"type": "text", "text": "x"}], tekken=tekken)
        vision.append((label, images[0]))
    receipt = samples.document(300, 420, seed=5, lines=samples.RECEIPT_LINES)
    ids_a, imgs_a = prompting.encode([{"type": "image", "image": receipt},
                                      {"type": "text", "text": "Extract the total as JSON."}], tekken=tekken)
    ids_b, _ = prompting.encode([{"type": "text", "text": "Bonjour, quel est le total ? 合计 😀"}], tekken=tekken)
    width = max(len(ids_a), len(ids_b))
    ids = np.full((2, width), pad, dtype=np.int64)
    mask = np.zeros((2, width), dtype=np.int64)
    for row, seq in enumerate([ids_a, ids_b]):
        ids[row, width - len(seq):] = seq
        mask[row, width - len(seq):] = 1
    ids_g, imgs_g = prompting.encode([{"type": "image", "image": receipt},
                                      {"type": "text", "text": "Transcribe this receipt."}], tekken=tekken)
    return {"vision": vision, "rows": [ids_a, ids_b], "imgs_a": imgs_a, "ids": ids, "mask": mask, "width": width,
            "ids_g": ids_g, "imgs_g": imgs_g}


def _torch_reference(model, inp: dict, new_tokens: int, decode_steps: int = 4) -> dict:
    """Everything verify compares, computed by transformers alone: vision features per case, the batch's embeddings
    and prefill logits, the logits of `decode_steps` greedy steps (the tokens fed to ONNX Runtime too), and
    generate()'s greedy tokens. Only the last position's logits are computed (logits_to_keep=1): the full
    [2, 549, 131072] fp32 logits of the prefill alone are 0.58 GB."""
    ref = {"vision": [_hf_features(model, chw) for _, chw in inp["vision"]]}
    mask = inp["mask"]
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    with torch.no_grad():
        emb_t = _hf_embeds(model, inp["ids"], inp["imgs_a"])
        out = model(inputs_embeds=emb_t, attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(positions), use_cache=True, logits_to_keep=1)
    logits, cache = out.logits[:, -1].float().numpy(), _cache_of(out)
    ref["embeds"], ref["prefill"], ref["steps"], ref["step_tokens"] = emb_t.numpy(), logits, [], []
    for _ in range(decode_steps):
        nxt = logits.argmax(-1)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((2, 1), dtype=np.int64)], axis=1)
        positions = positions[:, -1:] + 1
        with torch.no_grad():
            e = model.get_input_embeddings()(torch.from_numpy(nxt))
            out = model(inputs_embeds=e, attention_mask=torch.from_numpy(mask),
                        position_ids=torch.from_numpy(positions), cache=cache, use_cache=True, logits_to_keep=1)
        logits, cache = out.logits[:, -1].float().numpy(), _cache_of(out)
        ref["step_tokens"].append(nxt[:, 0])
        ref["steps"].append(logits)
    del cache, out
    ids_g = inp["ids_g"]
    px, sizes = prompting.pad_images(inp["imgs_g"])
    with torch.no_grad():
        gen = model.generate(input_ids=torch.tensor([ids_g]), attention_mask=torch.ones(1, len(ids_g),
                             dtype=torch.int64), pixel_values=px, image_sizes=sizes,
                             max_new_tokens=new_tokens, do_sample=False, eos_token_id=2, pad_token_id=11)
    ref["greedy"] = gen[0, len(ids_g):].tolist()
    return ref


def _check_fp8(rep: Report, manifest: dict, checkpoint: str | None):
    """An FP8 checkpoint: the dequantization the export used (layouts/fp8.py) against transformers' own, weight by
    weight (the torch reference above was loaded through the same dequantization, so it cannot show this)."""
    import glob

    from .layouts import checkpoint_layout
    from .layouts.fp8 import compare_with_transformers

    path = checkpoint or manifest["source"].get("path")
    if not path or not os.path.isdir(path):
        return
    layout = checkpoint_layout(path)
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    count, worst = compare_with_transformers(files, layout)
    if count:
        print("FP8 checkpoint (per-tensor float8_e4m3 weights, dequantized on export):")
        rep.check("fp8 dequantize", worst == 0.0, f"{count} weights, max abs diff {worst:.1e} against transformers' "
                  "Fp8Dequantize (fp32)")


def run_verify(args) -> int:
    with open(os.path.join(args.model, "pixtract-model.json")) as f:
        manifest = json.load(f)
    dtype = manifest["dtype"]
    tol = TOL[dtype]
    print(f"verify {args.model}: {manifest['model_id']} ({dtype}), ONNX Runtime CPU vs torch fp32")
    inp = _inputs(manifest["tokens"]["pad"], prompting.model_tekken(args.model))
    # One side at a time: the torch model (fp32, the size of the fp32 graphs) is run for every reference figure and
    # released before ONNX Runtime loads the graphs, so the peak is the larger of the two instead of their sum (16.0
    # GB -> see docs/real-checkpoints.md at Pixtral 12B's widths with 2 layers).
    torch.manual_seed(0)
    model = model_from_manifest(manifest, args.checkpoint, torch.float32)
    print(f"torch model loaded ({memory_note()})")
    ref = _torch_reference(model, inp, args.new_tokens)
    del model
    gc.collect()
    print(f"torch reference computed and released ({memory_note()})")
    try:
        ort_model = OrtPixtral(args.model)
        ort_model.greedy([1, 3, 1032, 4], [], 1)
    except Exception as err:  # noqa: BLE001 - report why ONNX Runtime cannot run it, then fail
        print(f"  [FAIL] ONNX Runtime (CPU) cannot run this model: {str(err).splitlines()[0]}")
        if dtype == "fp16":
            print("  fp16 graphs are meant for the CUDA execution provider; verify them on a GPU machine "
                  "(scripts/setup.sh --gpu) or export fp32 for CPU.")
        return 1
    print(f"ONNX Runtime sessions open ({memory_note()})")
    rep = Report()

    print("vision encoder (image -> mistral-common preprocessing -> features):")
    for (label, chw), want in zip(inp["vision"], ref["vision"]):
        got = ort_model.image_features(chw).astype(np.float32)
        mag = float(np.abs(want).max())
        diff = float(np.abs(want - got).max()) if want.shape == got.shape else float("inf")
        limit = tol["vision_rel"] * max(mag, 1.0)
        rep.check(f"vision {label}", diff <= limit,
                  f"pixels {chw.shape[2]}x{chw.shape[1]} -> features {list(got.shape)}, max|feat| {mag:.2f}, "
                  f"max abs diff {diff:.2e} (limit {limit:.2e})")

    print("decoder: batch of 2 prompts of unequal length (padded as the graph wants), prefill + 4 decode steps:")
    ids, width, rows_ids = inp["ids"], inp["width"], inp["rows"]
    emb_o = ort_model.embeddings(ids, inp["imgs_a"])
    emb_diff = float(np.abs(emb_o.astype(np.float32) - ref["embeds"]).max())
    rows = [emb_o[row, width - len(seq):] for row, seq in enumerate(rows_ids)]
    got_logits, state = ort_model.prefill(rows)
    worst = float(np.abs(ref["prefill"] - got_logits).max())
    rep.check("prefill logits", worst <= tol["logits"],
              f"lengths {len(rows_ids[0])} and {len(rows_ids[1])} padded to {width}, embeddings diff {emb_diff:.2e}, "
              f"logits max abs diff {worst:.2e} (limit {tol['logits']:.0e}), |logits| max "
              f"{float(np.abs(ref['prefill']).max()):.2f}")
    step_diffs = []
    for nxt, want in zip(ref["step_tokens"], ref["steps"]):
        got_logits, state = ort_model.decode(nxt, state)
        step_diffs.append(float(np.abs(want - got_logits).max()))
    rep.check("decode steps", max(step_diffs) <= tol["logits"],
              "max abs diff per step " + ", ".join(f"{d:.2e}" for d in step_diffs))

    print(f"greedy generation, {args.new_tokens} tokens (ONNX Runtime loop vs transformers generate()):")
    ours, _ = ort_model.greedy(inp["ids_g"], inp["imgs_g"], args.new_tokens)
    theirs = ref["greedy"]
    same = sum(1 for a, b in zip(ours, theirs) if a == b)
    ok = ours == theirs
    if dtype != "fp32" and not ok:
        print(f"  note: {dtype} greedy tokens may drift from fp32 torch; reported, not failed")
        ok = True
    rep.check("greedy tokens", ok, f"{same}/{max(len(ours), len(theirs))} identical (prompt {len(inp['ids_g'])} "
              "tokens)")
    _check_fp8(rep, manifest, args.checkpoint)
    print(f"memory: {memory_note()}; peak over the whole verify {run_peak_gb():.2f} GB")

    if rep.failures:
        print(f"verify FAILED: {', '.join(rep.failures)}", file=sys.stderr)
        return 1
    print("verify passed")
    return 0
