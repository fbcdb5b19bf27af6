#!/usr/bin/env python3
"""A folder of N synthetic receipt scans of different sizes and contents, for comparing static and continuous
batching in `pixtract run` (deterministic: the same N gives the same files).

Pages differ in size (so prompts differ in length) and in text (so the model's answers differ in length).

Usage: make_stream_workload.py N OUT_DIR
"""
import os
import random
import sys

from PIL import Image, ImageDraw


def receipt(rng: random.Random, index: int) -> Image.Image:
    width = rng.choice([160, 224, 288, 352, 448])
    height = rng.choice([192, 256, 320, 416, 512])
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    lines = rng.randint(2, 12)
    for k in range(lines):
        item = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ ") for _ in range(rng.randint(3, 14)))
        price = f"{rng.randint(1, 999)}.{rng.randint(0, 99):02d}"
        draw.text((6, 6 + 14 * k), f"{item} {price}", fill=(0, 0, 0))
    draw.text((6, height - 18), f"TOTAL #{index}", fill=(0, 0, 0))
    # Some noise so pages are not flat.
    for _ in range(rng.randint(0, 400)):
        x, y = rng.randrange(width), rng.randrange(height)
        img.putpixel((x, y), (rng.randrange(256),) * 3)
    return img


def main() -> int:
    if len(sys.argv) != 3 or sys.argv[1] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    try:
        n = int(sys.argv[1])
    except ValueError:
        print(f"make_stream_workload.py: N must be a number, got {sys.argv[1]!r}", file=sys.stderr)
        return 2
    out = sys.argv[2]
    os.makedirs(out, exist_ok=True)
    rng = random.Random(20261207)
    for i in range(n):
        receipt(rng, i).save(os.path.join(out, f"scan_{i:04d}.png"))
    print(f"{n} scans in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
