"""`reference`: fixtures the Rust tests compare against, from transformers with mistral-common's preprocessing.

Each case is a folder under <model>/reference/ holding its input PNG(s) and case.json. Images are written first
and read back from the PNG, so the references describe exactly the bytes the Rust side will decode.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import torch
from PIL import Image

from . import prompting, samples
from .export import model_from_manifest

TOP_K = 10
PIXEL_SAMPLES = 48


def _cases(spatial_merge: int = 1):
    """The cases; with a patch merger (Mistral 3) the smallest image is 40x9, two merged tokens: an image of one token
    cannot be referenced, because transformers 5.24's Mistral3Model.get_image_features squeezes a single-token
    image's feature axis away and fails (pixtract itself lays out and runs one-token images)."""
    s = samples
    tiny_w = 12 if spatial_merge == 1 else 40
    receipt_tall = s.document(380, 1500, 11, s.RECEIPT_LINES)
    return [
        ("wide_page", "landscape invoice page, 900x560", None,
         [("image", s.document(900, 560, 1, s.INVOICE_LINES)), ("text", "Extract the invoice fields as JSON.")]),
        ("tall_receipt", "long receipt 380x1500, long side above 1024 so it is downscaled", None,
         [("image", receipt_tall), ("text", "What is the total?")]),
        ("tiny_image", f"{tiny_w}x9 image, less than one patch high", None,
         [("image", s.document(tiny_w, 9, 2, ["x"])), ("text", "Describe the image.")]),
        ("large_scan", "2200x1600 scan, downscaled to 1024 wide", None,
         [("image", s.document(2200, 1600, 3, s.INVOICE_LINES)), ("text", "Read the invoice number.")]),
        ("rgba", "RGBA with transparent and half-transparent areas (composited on white)", None,
         [("image", s.document(320, 240, 4, s.RECEIPT_LINES, mode="RGBA")), ("text", "Read the logo.")]),
        ("grayscale", "8-bit grayscale scan", None,
         [("image", s.document(400, 520, 5, s.RECEIPT_LINES, mode="L")), ("text", "Transcribe the receipt.")]),
        ("two_images", "two pages in one prompt", None,
         [("image", s.document(500, 350, 6, s.INVOICE_LINES)), ("image", s.document(240, 400, 7, s.RECEIPT_LINES)),
          ("text", "Compare the two documents.")]),
        ("text_only", "no image", None, [("text", "List three fields a receipt usually has.")]),
        ("multilingual", "French, German, Chinese and emoji text", None,
         [("text", "Quel est le montant TTC ? Wie hoch ist die Mehrwertsteuer? 总金额是多少？ 🧾💶✅")]),
        ("multilingual_image", "image with a non-English prompt", None,
         [("image", s.document(360, 300, 8, s.RECEIPT_LINES)),
          ("text", "Extrais le nom du commerçant et la date. Gib den Betrag in € an. 请用中文回答。")]),
        ("system_prompt", "system prompt before the user turn", "You extract data from receipts. Answer in JSON.",
         [("image", s.document(300, 300, 9, s.RECEIPT_LINES)), ("text", "Extract the merchant.")]),
    ]


def _pixel_stats(chw: np.ndarray, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    c, h, w = chw.shape
    picks = []
    for _ in range(PIXEL_SAMPLES):
        ci, y, x = int(rng.integers(c)), int(rng.integers(h)), int(rng.integers(w))
        picks.append([ci, y, x, float(chw[ci, y, x])])
    a = chw.astype(np.float64)
    return {
        "tensor_shape": [c, h, w],
        "sum": float(a.sum()),
        "abs_sum": float(np.abs(a).sum()),
        "sum_sq": float((a * a).sum()),
        "min": float(a.min()),
        "max": float(a.max()),
        "samples": picks,
    }


def run_reference(args) -> int:
    with open(os.path.join(args.model, "pixtract-model.json")) as f:
        manifest = json.load(f)
    model = model_from_manifest(manifest, args.checkpoint, torch.float32)
    root = os.path.join(args.model, "reference")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    index = []
    tekken = prompting.model_tekken(args.model)
    merge = manifest.get("image_tokens", {}).get("spatial_merge", 1)
    for n, (name, description, system, parts) in enumerate(_cases(merge)):
        folder = os.path.join(root, name)
        os.makedirs(folder)
        content, files = [], []
        for part_kind, value in parts:
            if part_kind == "image":
                fname = f"image{len(files)}.png"
                value.save(os.path.join(folder, fname), format="PNG")
                files.append(fname)
                content.append({"type": "image", "file": fname})
            else:
                content.append({"type": "text", "text": value})
        ids, images = prompting.encode_case(folder, content, system, tekken)
        image_meta = []
        for k, (fname, chw) in enumerate(zip(files, images)):
            with Image.open(os.path.join(folder, fname)) as im:
                size, mode = im.size, im.mode
            meta = {"file": fname, "width": size[0], "height": size[1], "mode": mode}
            meta.update(_pixel_stats(chw, seed=1000 * n + k))
            image_meta.append(meta)
        inputs = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.int64)}
        if images:
            inputs["pixel_values"], inputs["image_sizes"] = prompting.pad_images(images)
        with torch.no_grad():
            logits = model(**inputs).logits[0, -1].float()
            top = torch.topk(logits, TOP_K)
            gen = model.generate(**inputs, max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=2,
                                 pad_token_id=11)
        new = gen[0, len(ids):].tolist()
        case = {
            "name": name,
            "description": description,
            "system": system,
            "content": content,
            "input_ids": ids,
            "images": image_meta,
            "first_step_top_k": {"ids": top.indices.tolist(), "logits": [float(v) for v in top.values]},
            "max_new_tokens": args.new_tokens,
            "greedy_tokens": new,
            "stopped_on_eos": bool(new and new[-1] == 2 and len(new) < args.new_tokens),
            "greedy_text": prompting.decode(new, tekken),
        }
        with open(os.path.join(folder, "case.json"), "w") as f:
            json.dump(case, f, indent=1, ensure_ascii=False)
            f.write("\n")
        gap = float(top.values[0] - top.values[1])
        print(f"  {name}: {len(ids)} prompt tokens, {len(images)} image(s), top-1/top-2 gap {gap:.3f}, "
              f"{len(new)} greedy tokens")
        index.append(name)
    with open(os.path.join(root, "cases.json"), "w") as f:
        json.dump({"cases": index, "top_k": TOP_K, "generator": "transformers generate(), greedy, fp32",
                   "preprocessing": "mistral-common", "model_weights_sha256": manifest["weights_sha256"]}, f,
                  indent=1)
        f.write("\n")
    print(f"reference fixtures: {len(index)} cases in {root}")
    return 0
