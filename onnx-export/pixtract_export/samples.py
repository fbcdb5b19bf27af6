"""Deterministic synthetic page images for verify and the reference fixtures (drawn, never downloaded)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def _rng(seed: int):
    return np.random.default_rng(seed)


def document(width: int, height: int, seed: int, lines: list[str], mode: str = "RGB") -> Image.Image:
    """A page with text lines, rules and mild scanner noise: smooth areas and sharp edges, like a receipt."""
    rng = _rng(seed)
    base = np.full((height, width, 3), 245, dtype=np.int16)
    base += rng.integers(-6, 7, size=(height, width, 1), dtype=np.int16)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    y = max(2, height // 20)
    step = max(6, height // (len(lines) + 3))
    for i, text in enumerate(lines):
        draw.text((max(1, width // 15), y), text, fill=(20 + 10 * i % 60, 20, 30))
        y += step
        if i % 3 == 2 and y < height:
            draw.line([(width // 15, y - step // 3), (width - width // 15, y - step // 3)], fill=(90, 90, 90), width=1)
    if width >= 40 and height >= 40:
        x0, y0 = int(width * 0.6), int(height * 0.05)
        draw.rectangle([x0, y0, x0 + width // 5, y0 + height // 12], outline=(180, 30, 30), width=2)
    if mode == "L":
        return img.convert("L")
    if mode == "RGBA":
        rgba = img.convert("RGBA")
        alpha = np.full((height, width), 255, dtype=np.uint8)
        alpha[:, : width // 3] = 0  # fully transparent strip: must come out white
        alpha[: height // 3, width // 3:] = 128  # half transparent band
        rgba.putalpha(Image.fromarray(alpha, "L"))
        return rgba
    return img


RECEIPT_LINES = ["CAFE DU MARCHE", "12 Rue de la Paix", "2024-03-18 12:41", "Espresso   2 x 2.50   5.00",
                 "Croissant  1 x 1.80   1.80", "TOTAL EUR 6.80", "CARTE BANCAIRE"]
INVOICE_LINES = ["INVOICE INV-2024-0042", "Acme GmbH, Berlin", "Due 2024-04-30", "Widget A   10  4.00  40.00",
                 "Service B   1 99.00  99.00", "Subtotal 139.00", "VAT 19% 26.41", "Total 165.41"]
