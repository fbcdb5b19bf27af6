"""`pipeline-reference`: the same job as `pixtract run` in free-text mode, written the way a Python team would.

pypdfium2 renders PDF pages at the model's size, PIL opens scans (EXIF orientation applied, alpha on white),
mistral-common preprocesses and builds the prompt, transformers `generate()` answers (greedy, batch 1), pyarrow
writes one Parquet file. `pixtract bench pipeline` runs this and `pixtract run` on the same documents in the same
run and prints the ratio. Prints one JSON line with the counts and timings.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from . import prompting
from .export import model_from_manifest

PDF_MAGIC = b"%PDF"


def _pages(path: str, max_side: int, max_dpi: float | None):
    """PIL RGB images of a document's pages at the model's size (PDF) or full resolution (scans)."""
    from PIL import Image, ImageOps

    with open(path, "rb") as f:
        head = f.read(1024)
    if PDF_MAGIC in head:
        import pypdfium2 as pdfium

        pdf = pdfium.PdfDocument(path)
        try:
            for page in pdf:
                w, h = page.get_size()
                scale = max_side / max(w, h)
                if max_dpi:
                    scale = min(scale, max_dpi / 72.0)
                yield page.render(scale=scale).to_pil().convert("RGB")
        finally:
            pdf.close()
        return
    with Image.open(path) as im:
        frames = getattr(im, "n_frames", 1)
        for i in range(frames):
            im.seek(i)
            frame = ImageOps.exif_transpose(im)
            if frame.mode in ("RGBA", "LA", "P"):
                rgba = frame.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                frame = Image.alpha_composite(white, rgba)
            yield frame.convert("RGB")


def add_parser(sub):
    """`pipeline-reference`: the command line `pixtract bench pipeline` runs (src/bench/pipeline.rs)."""
    p = sub.add_parser("pipeline-reference", help="Python reference pipeline for `pixtract bench pipeline` "
                       "(pypdfium2, transformers generate, pyarrow)", description=__doc__)
    p.add_argument("--source", required=True, help="folder of documents")
    p.add_argument("--model", required=True, help="model directory (its torch model is rebuilt from the manifest)")
    p.add_argument("--out", required=True, help="output folder for the Parquet file")
    p.add_argument("--prompt", required=True, help="instruction after the page image")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--max-side", type=int, default=1024)
    p.add_argument("--max-dpi", type=float, default=None)
    p.add_argument("--suffixes", default=".pdf,.jpg,.jpeg,.png,.tif,.tiff,.webp")
    return p


def run(args) -> int:

    import pyarrow as pa
    import pyarrow.parquet as pq

    t0 = time.perf_counter()
    torch.set_num_threads(os.cpu_count() or 1)
    with open(os.path.join(args.model, "pixtract-model.json")) as f:
        manifest = json.load(f)
    model = model_from_manifest(manifest, None)
    eos, pad = manifest["tokens"]["eos"], manifest["tokens"]["pad"]
    tekken = prompting.model_tekken(args.model)
    suffixes = tuple(s.strip().lower() for s in args.suffixes.split(","))
    files = sorted(n for n in os.listdir(args.source) if n.lower().endswith(suffixes))
    rows = {"source_uri": [], "page": [], "status": [], "error": [], "text": [], "prompt_tokens": [],
            "generated_tokens": []}
    timing = {"render_s": 0.0, "preprocess_s": 0.0, "generate_s": 0.0, "write_s": 0.0}
    pages = generated = 0
    for name in files:
        path = os.path.join(args.source, name)
        try:
            it = _pages(path, args.max_side, args.max_dpi)
            index = 0
            while True:
                t = time.perf_counter()
                try:
                    image = next(it)
                except StopIteration:
                    break
                finally:
                    timing["render_s"] += time.perf_counter() - t
                index += 1
                pages += 1
                t = time.perf_counter()
                ids, images = prompting.encode([{"type": "image", "image": image},
                                                {"type": "text", "text": args.prompt}], tekken=tekken)
                px, sizes = prompting.pad_images(images)
                timing["preprocess_s"] += time.perf_counter() - t
                t = time.perf_counter()
                with torch.no_grad():
                    out = model.generate(input_ids=torch.tensor([ids]),
                                         attention_mask=torch.ones(1, len(ids), dtype=torch.int64),
                                         pixel_values=px, image_sizes=sizes, max_new_tokens=args.max_new_tokens,
                                         do_sample=False, eos_token_id=eos, pad_token_id=pad)
                new = out[0, len(ids):].tolist()
                timing["generate_s"] += time.perf_counter() - t
                generated += len(new)
                for k, v in (("source_uri", path), ("page", index), ("status", "ok"), ("error", None),
                             ("text", prompting.decode([i for i in new if i != eos], tekken)),
                             ("prompt_tokens", len(ids)), ("generated_tokens", len(new))):
                    rows[k].append(v)
        except Exception as err:  # noqa: BLE001 - a bad document is an error row, as in pixtract
            for k, v in (("source_uri", path), ("page", 0), ("status", "error"), ("error", f"{name}: {err}"),
                         ("text", None), ("prompt_tokens", None), ("generated_tokens", None)):
                rows[k].append(v)
    t = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    pq.write_table(pa.table(rows), os.path.join(args.out, "part-0.parquet"))
    timing["write_s"] = time.perf_counter() - t
    seconds = time.perf_counter() - t0
    print(json.dumps({"documents": len(files), "pages": pages, "rows": len(rows["page"]),
                      "rows_failed": rows["status"].count("error"), "generated_tokens": generated,
                      "seconds": seconds, "pages_per_second": pages / seconds, **timing}))
    return 0
