"""`fidelity`: how far a variant (fp16, int8, int4, q4f16 ...) drifts from its fp32 baseline.

Both models run through the same plain ONNX Runtime loop on the baseline's reference cases (same prompts, same
preprocessed pixels). Two views:
  free-running  each model decodes greedily on its own; agreement = share of tokens before the first divergence,
                and share of identical tokens position by position;
  teacher-forced both models are fed the baseline's greedy tokens, so every step compares the two distributions
                for the same context: cosine similarity of the logits and top-1 agreement.
On a random-weight tiny model these figures exercise the machinery only; they say little about Pixtral 12B.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from .bench import load_cases
from .files import ExportError
from .ort_loop import OrtPixtral


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return (a64 * b64).sum(-1) / (np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1))


def _prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def compare(variant: OrtPixtral, baseline: OrtPixtral, ids, images, new_tokens: int) -> dict:
    base_tokens, _ = baseline.greedy(ids, images, new_tokens, stop_on_eos=False)
    var_tokens, _ = variant.greedy(ids, images, new_tokens, stop_on_eos=False)
    base_logits = baseline.forced(ids, images, base_tokens)
    var_logits = variant.forced(ids, images, base_tokens)
    cos = _cosine(base_logits, var_logits)
    top1 = (base_logits.argmax(-1) == var_logits.argmax(-1))
    return {
        "prompt_tokens": len(ids),
        "baseline_tokens": base_tokens,
        "variant_tokens": var_tokens,
        "prefix_agreement": _prefix(base_tokens, var_tokens),
        "identical_tokens": int(sum(1 for x, y in zip(base_tokens, var_tokens) if x == y)),
        "steps": len(base_tokens),
        "cosine_per_step": [round(float(c), 6) for c in cos],
        "top1_per_step": [bool(t) for t in top1],
        "max_abs_logit_diff": float(np.abs(base_logits - var_logits).max()),
    }


def run_fidelity(args) -> int:
    for d in (args.model, args.baseline):
        if not os.path.isfile(os.path.join(d, "pixtract-model.json")):
            raise ExportError(f"{d} is not a model directory (no pixtract-model.json)")
    ref_dir = os.path.join(args.baseline, "reference")
    if not os.path.isdir(ref_dir):
        raise ExportError(f"{args.baseline} has no reference/ cases; run `reference --model {args.baseline}`")
    variant, baseline = OrtPixtral(args.model), OrtPixtral(args.baseline)
    vm, bm = variant.manifest, baseline.manifest
    if vm["source"].get("model_id", vm["model_id"]) != bm["source"].get("model_id", bm["model_id"]):
        raise ExportError(f"{args.model} ({vm['model_id']}) and {args.baseline} ({bm['model_id']}) are different "
                          "models")
    names = sorted(n for n in os.listdir(ref_dir) if os.path.isfile(os.path.join(ref_dir, n, "case.json")))
    cases = load_cases(ref_dir, names)
    t0 = time.time()
    results = {}
    print(f"fidelity of {vm.get('variant', vm['dtype'])} ({args.model}) against "
          f"{bm.get('variant', bm['dtype'])} ({args.baseline}), {args.new_tokens} tokens per case")
    print(f"  {'case':<20} {'prefix':>7} {'same':>7} {'top-1':>7} {'cos mean':>9} {'cos min':>9}")
    for name, (ids, images) in zip(names, cases):
        r = compare(variant, baseline, ids, images, args.new_tokens)
        results[name] = r
        print(f"  {name:<20} {r['prefix_agreement']:>3}/{r['steps']:<3} {r['identical_tokens']:>3}/{r['steps']:<3} "
              f"{sum(r['top1_per_step']):>3}/{r['steps']:<3} {np.mean(r['cosine_per_step']):>9.6f} "
              f"{min(r['cosine_per_step']):>9.6f}")
    steps = sum(r["steps"] for r in results.values())
    summary = {
        "cases": len(results),
        "steps": steps,
        "prefix_agreement": sum(r["prefix_agreement"] for r in results.values()) / steps,
        "identical_tokens": sum(r["identical_tokens"] for r in results.values()) / steps,
        "cases_identical": sum(1 for r in results.values() if r["prefix_agreement"] == r["steps"]),
        "top1_agreement": sum(sum(r["top1_per_step"]) for r in results.values()) / steps,
        "cosine_mean": float(np.mean([c for r in results.values() for c in r["cosine_per_step"]])),
        "cosine_min": float(min(c for r in results.values() for c in r["cosine_per_step"])),
        "seconds": round(time.time() - t0, 1),
    }
    print(f"  overall: tokens before first divergence {summary['prefix_agreement']:.1%}, identical tokens "
          f"{summary['identical_tokens']:.1%}, cases fully identical {summary['cases_identical']}/{len(results)}, "
          f"top-1 agreement {summary['top1_agreement']:.1%}, logits cosine mean {summary['cosine_mean']:.6f} "
          f"min {summary['cosine_min']:.6f}")
    report = {
        "variant": vm.get("variant", vm["dtype"]),
        "baseline": bm.get("variant", bm["dtype"]),
        "baseline_weights_sha256": bm["weights_sha256"],
        "weights_sha256": vm["weights_sha256"],
        "new_tokens": args.new_tokens,
        "summary": summary,
        "cases": results,
    }
    path = os.path.join(args.model, "fidelity.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    print(f"  written {path}")
    failed = []
    if summary["top1_agreement"] < args.min_top1:
        failed.append(f"top-1 agreement {summary['top1_agreement']:.3f} < --min-top1 {args.min_top1}")
    if summary["cosine_mean"] < args.min_cosine:
        failed.append(f"cosine mean {summary['cosine_mean']:.4f} < --min-cosine {args.min_cosine}")
    if failed:
        print("fidelity FAILED: " + "; ".join(failed), file=sys.stderr)
        return 1
    return 0
