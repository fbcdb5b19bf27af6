"""`bench`: the Python references for pixtract's engine benchmark, on the same prompts and images.

(a) a plain onnxruntime loop over the same three graphs (ort_loop.OrtPixtral), (b) transformers `generate()`.
Prints one JSON object; `pixtract bench engine` runs this in the same run and reports the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from . import prompting
from .export import model_from_manifest
from .ort_loop import OrtPixtral


def load_cases(reference_dir: str, names: list[str]):
    """Reference cases (`<reference_dir>/<name>/case.json` + PNGs) encoded with mistral-common, with the tekken.json
    of the model the reference folder sits in (`<model>/reference`)."""
    model_dir = os.path.dirname(os.path.normpath(reference_dir))
    has_manifest = os.path.isfile(os.path.join(model_dir, "pixtract-model.json"))
    tekken = prompting.model_tekken(model_dir) if has_manifest else None
    out = []
    for name in names:
        folder = os.path.join(reference_dir, name)
        with open(os.path.join(folder, "case.json")) as f:
            case = json.load(f)
        out.append(prompting.encode_case(folder, case["content"], case["system"], tekken))
    return out


def save_encoded(path: str, reference_dir: str, names: list[str]) -> None:
    """`encode-cases`: the reference cases as mistral-common encodes them, in one .npz (ids + pixel arrays)."""
    arrays = {}
    for name, (ids, images) in zip(names, load_cases(reference_dir, names)):
        arrays[f"{name}/ids"] = np.asarray(ids, dtype=np.int64)
        for i, img in enumerate(images):
            arrays[f"{name}/image{i}"] = img
    np.savez_compressed(path, **arrays)


def load_encoded(path: str, names: list[str]):
    """Prompts written by `save_encoded`, in the order of `names`."""
    data = np.load(path)
    out = []
    for name in names:
        if f"{name}/ids" not in data:
            raise SystemExit(f"{path} has no case {name!r} (encode it with `encode-cases`)")
        images = []
        while f"{name}/image{len(images)}" in data:
            images.append(data[f"{name}/image{len(images)}"])
        out.append((data[f"{name}/ids"].tolist(), images))
    return out


def providers(device: str):
    """onnxruntime providers for `cpu`, `cuda` or `cuda:N` (CUDA must be there: no silent CPU run)."""
    if device == "cpu":
        return ("CPUExecutionProvider",)
    if device.startswith("cuda"):
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise SystemExit(f"--device {device}: this onnxruntime has no CUDA provider (install onnxruntime-gpu)")
        if hasattr(ort, "preload_dylibs"):
            ort.preload_dylibs()
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        return (("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider")
    raise SystemExit(f"--device {device}: expected cpu, cuda or cuda:N")


def ort_batch(ort_model: OrtPixtral, batch, new_tokens: int):
    """The batch through the ONNX graphs (padded as the decoder graph wants it); returns phase times."""
    t0 = time.perf_counter()
    feats = [[ort_model.image_features(img) for img in images] for _, images in batch]
    t_vision = time.perf_counter() - t0
    t1 = time.perf_counter()
    # One embedding run over the padded batch, as pixtract does; each row then takes its own columns.
    width = max(len(seq) for seq, _ in batch)
    ids = np.full((len(batch), width), ort_model.manifest["tokens"]["pad"], dtype=np.int64)
    for row, (seq, _) in enumerate(batch):
        ids[row, width - len(seq):] = seq
    embeds = ort_model.embed.run(["inputs_embeds"], {"input_ids": ids})[0]
    rows = []
    for row, ((seq, _), f) in enumerate(zip(batch, feats)):
        e = embeds[row, width - len(seq):]
        if f:
            e[ids[row, width - len(seq):] == ort_model.img_id] = np.concatenate(f, axis=0).astype(e.dtype)
        rows.append(e)
    logits, state = ort_model.prefill(rows)
    t_prefill = time.perf_counter() - t1
    t2 = time.perf_counter()
    for _ in range(new_tokens - 1):
        logits, state = ort_model.decode(logits.argmax(-1), state)
    t_decode = time.perf_counter() - t2
    return t_vision, t_prefill, t_decode


def hf_batch(model, batch, new_tokens: int):
    """transformers generate(); vision+prefill from a 1-token run, decode as the rest of an N-token run."""
    width = max(len(ids) for ids, _ in batch)
    n = len(batch)
    ids = torch.full((n, width), 11, dtype=torch.int64)
    mask = torch.zeros((n, width), dtype=torch.int64)
    images = []
    for row, (seq, imgs) in enumerate(batch):
        ids[row, width - len(seq):] = torch.tensor(seq)
        mask[row, width - len(seq):] = 1
        images.extend(imgs)
    kwargs = {"input_ids": ids, "attention_mask": mask}
    if images:
        kwargs["pixel_values"], kwargs["image_sizes"] = prompting.pad_images(images)

    # One generate() call, split where its first token is chosen: a logits processor runs once per step, right
    # after that step's forward pass, so its first call marks the end of vision + prefill. (Two calls, one of 1
    # token and one of N, subtracted, gave a negative decode time when the 1-token call ran slower: 2026-12-07.)
    class FirstStep(LogitsProcessor):
        def __init__(self):
            self.at = None

        def __call__(self, input_ids, scores):
            if self.at is None:
                self.at = time.perf_counter()
            return scores

    mark = FirstStep()
    t = time.perf_counter()
    with torch.no_grad():
        model.generate(**kwargs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=11, eos_token_id=2, logits_processor=LogitsProcessorList([mark]))
    end = time.perf_counter()
    if mark.at is None:
        raise RuntimeError("transformers generate() never called its logits processor: no prefill/decode split")
    return mark.at - t, end - mark.at


def add_parser(sub):
    """`bench` and `bench encode-cases`: the command lines `pixtract bench engine` runs (src/bench/engine.rs)."""
    p = sub.add_parser("bench", help="Python references for `pixtract bench engine` (ORT loop, transformers)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model directory (required unless encode-cases)")
    p.add_argument("--cases", help="comma-separated reference case names, in prompt order")
    p.add_argument("--cases-from", metavar="DIR", help="folder of the reference cases (default: <model>/reference)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batch", type=int, action="append", help="batch size (repeatable; at least one)")
    p.add_argument("--repeat", type=int, default=2, help="runs per measurement; the fastest is kept")
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--spin", type=int, choices=(0, 1), default=1,
                   help="onnxruntime intra-op threads spin-wait (1, its default) or block (0)")
    p.add_argument("--device", default="cpu",
                   help="cpu, cuda or cuda:N for the onnxruntime loop (onnxruntime-gpu); transformers stays on the CPU")
    p.add_argument("--encoded", metavar="FILE.npz",
                   help="prompts already encoded by `encode-cases` (ids and pixel arrays), instead of encoding the "
                        "reference cases with mistral-common here (for a machine without it)")
    nested = p.add_subparsers(dest="bench_command", metavar="encode-cases")
    q = nested.add_parser("encode-cases", help="write reference cases, encoded with mistral-common, to one .npz",
                          description="Write reference cases, encoded with mistral-common, to one .npz")
    q.add_argument("--cases-from", metavar="DIR", required=True)
    q.add_argument("--cases", required=True, help="comma-separated case names")
    q.add_argument("--out", metavar="FILE.npz", required=True)
    p.set_defaults(bench_parser=p)
    return p


def run(args) -> int:
    if args.bench_command == "encode-cases":
        save_encoded(args.out, args.cases_from, args.cases.split(","))
        return 0
    missing = [flag for flag, value in (("--model", args.model), ("--cases", args.cases), ("--batch", args.batch))
               if not value]
    if missing:
        args.bench_parser.error(f"the following arguments are required: {', '.join(missing)}")
    torch.set_num_threads(os.cpu_count() or 1)
    if args.encoded:
        cases = load_encoded(args.encoded, args.cases.split(","))
    else:
        cases = load_cases(args.cases_from or os.path.join(args.model, "reference"), args.cases.split(","))
    with open(os.path.join(args.model, "pixtract-model.json")) as f:
        manifest = json.load(f)
    ort_model = OrtPixtral(args.model, providers=providers(args.device), spin=bool(args.spin))
    if args.device != "cpu" and ort_model.decoder.get_providers()[0] != "CUDAExecutionProvider":
        # onnxruntime falls back to the CPU with only a warning when the CUDA provider cannot load.
        raise SystemExit(f"--device {args.device}: the CUDA provider did not load "
                         f"(session providers: {ort_model.decoder.get_providers()})")
    hf = None if args.skip_transformers else model_from_manifest(manifest, None)
    # Warm-up (first runs allocate arenas and pick kernels): pixtract's bench starts this script once per round.
    ort_batch(ort_model, cases[:1], 2)
    if hf is not None:
        hf_batch(hf, cases[:1], 2)
    result = {"ort_python": {}, "transformers": {}}
    for b in args.batch:
        batches = [cases[i:i + b] for i in range(0, len(cases), b)]
        prompt_tokens = sum(len(ids) for ids, _ in cases)
        gen_tokens = len(cases) * (args.new_tokens - 1)
        best = None
        for _ in range(args.repeat):
            v = pf = d = 0.0
            for batch in batches:
                tv, tp, td = ort_batch(ort_model, batch, args.new_tokens)
                v, pf, d = v + tv, pf + tp, d + td
            if best is None or v + pf + d < sum(best):
                best = (v, pf, d)
        v, pf, d = best
        # Decoder passes after the prefill, over all batches: pixtract checks each reference's decode against them.
        steps = len(batches) * (args.new_tokens - 1)
        result["ort_python"][str(b)] = {"vision_s": v, "prefill_s": pf, "decode_s": d, "decode_steps": steps,
                                        "first_token_tok_s": prompt_tokens / (v + pf), "decode_tok_s": gen_tokens / d}
        if hf is not None:
            best = None
            for _ in range(args.repeat):
                first = dec = 0.0
                for batch in batches:
                    tf, td = hf_batch(hf, batch, args.new_tokens)
                    first, dec = first + tf, dec + td
                if best is None or first + dec < sum(best):
                    best = (first, dec)
            first, dec = best
            result["transformers"][str(b)] = {"vision_prefill_s": first, "decode_s": dec, "decode_steps": steps,
                                              "first_token_tok_s": prompt_tokens / first,
                                              "decode_tok_s": gen_tokens / dec}
    print(json.dumps(result))
    return 0
