#!/usr/bin/env python3
"""Checks the value boxes that `make_samples.py OUT_DIR --digital` records against the PDFs themselves (pypdfium2).

Usage: check_sample_boxes.py OUT_DIR

For every document of OUT_DIR/ground_truth.json with "_locations", and every located value:
  - text: the page's characters (pdfium's text layer, tight char boxes mapped to the page as displayed: after
    /Rotate, origin top left, 0..1) whose centres lie inside the recorded box must spell the recorded text
    (whitespace removed on both sides);
  - value: the recorded text must read as the label's value (1.234,50 / 1,234.50 -> 1234.5; 07.03.2024 and
    6 April 2024 -> 2024-03-07 / 2024-04-06; anything else compared as is);
  - ink: rendered with pdfium (which applies /Rotate), the box must hold dark pixels, so that the frame is
    checked against real rendering and not only against the text layer.
Prints a table per document and exits 1 on any failure.
"""
import argparse
import datetime
import json
import os
import re
import sys

import pypdfium2 as pdfium

SCALE = 2.0  # render at 144 dpi
DARK = 110   # a grey level below this is ink


def displayed_from_user(x, y, bbox, rotation):
    """A point in PDF user space -> (u, v) in points on the page as displayed (clockwise /Rotate applied), origin
    top left, v down; bbox the page's (x0, y0, x1, y1) in user space."""
    ux, uy = x - bbox[0], bbox[3] - y
    w, h = bbox[2] - bbox[0], bbox[3] - bbox[1]
    return {0: (ux, uy), 90: (h - uy, ux), 180: (w - ux, h - uy), 270: (uy, w - ux)}[rotation % 360]


def page_chars(page):
    """[(char, (cx, cy))]: each character of the page's text layer and the centre of its tight box, in 0..1 of the
    page as displayed."""
    rotation = page.get_rotation()
    bbox = page.get_bbox()
    w, h = bbox[2] - bbox[0], bbox[3] - bbox[1]
    dw, dh = (w, h) if rotation in (0, 180) else (h, w)
    textpage = page.get_textpage()
    out = []
    for i in range(textpage.count_chars()):
        ch = textpage.get_text_range(i, 1)
        if not ch or ch.isspace():
            continue
        left, bottom, right, top = textpage.get_charbox(i, loose=False)
        u, v = displayed_from_user((left + right) / 2, (bottom + top) / 2, bbox, rotation)
        out.append((ch, (u / dw, v / dh)))
    textpage.close()
    return out


def label_value(truth, path):
    """'items[2].unit_price' -> truth['items'][2]['unit_price']."""
    value = truth
    for name, index in re.findall(r"([^.\[\]]+)(?:\[(\d+)\])?", path):
        value = value[name]
        if index:
            value = value[int(index)]
    return value


def reads_as(text, value):
    """Whether the printed text is the label's value, whatever the notation."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        t = text.strip()
        if re.fullmatch(r"-?\d{1,3}(\.\d{3})*,\d+|-?\d+,\d+", t):  # European: 1.234,50
            t = t.replace(".", "").replace(",", ".")
        else:
            t = t.replace(",", "")
        try:
            return abs(float(t) - float(value)) < 1e-9
        except ValueError:
            return False
    if isinstance(value, str) and re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
        for fmt in ("%Y-%m-%d", "%d.%m.%Y", "%d %B %Y"):
            try:
                return datetime.datetime.strptime(text.strip(), fmt).date().isoformat() == value
            except ValueError:
                pass
        return False
    return text == value


def ink_in(image, box):
    """Whether the box (0..1 of the displayed page) holds a dark pixel of the rendered page (a greyscale PIL
    image)."""
    w, h = image.size
    x0, y0 = max(0, int(box[0] * w)), max(0, int(box[1] * h))
    x1, y1 = min(w, int(box[2] * w + 0.999)), min(h, int(box[3] * h + 0.999))
    if x1 <= x0 or y1 <= y0:
        return False
    return image.crop((x0, y0, x1, y1)).getextrema()[0] < DARK


def check_document(path, truth, failures, notes):
    locations = truth["_locations"]
    pdf = pdfium.PdfDocument(path)
    by_page = {}
    for label, loc in locations.items():
        by_page.setdefault(loc["page"], []).append((label, loc))
    text_ok = value_ok = ink_ok = 0
    rotations = set()
    name = os.path.basename(path)
    for number, located in sorted(by_page.items()):
        page = pdf[number - 1]
        rotation = page.get_rotation()
        rotations.add(rotation)
        bbox = page.get_bbox()
        size = page.get_size()
        image = page.render(scale=SCALE).to_pil().convert("L")
        if rotation:
            notes.append(f"{name} p{number}: /Rotate {rotation}; bbox (user space) {tuple(round(v, 1) for v in bbox)}; "
                         f"get_size() {tuple(round(v, 1) for v in size)}; rendered {image.size[0]}x{image.size[1]} px")
        # The rendered image is the displayed page: check that get_size() is the displayed size too.
        if abs(image.size[0] - size[0] * SCALE) > 1 or abs(image.size[1] - size[1] * SCALE) > 1:
            failures.append(f"{name} p{number}: rendered {image.size} px but get_size() {size} (x{SCALE})")
        chars = page_chars(page)
        for label, loc in located:
            x0, y0, x1, y1 = loc["box"]
            inside = "".join(ch for ch, (cx, cy) in chars if x0 <= cx <= x1 and y0 <= cy <= y1)
            want = re.sub(r"\s+", "", loc["text"])
            if inside == want:
                text_ok += 1
            else:
                failures.append(f"{name} p{number} {label}: box {loc['box']} holds {inside!r}, recorded "
                                f"{loc['text']!r}")
            try:
                value = label_value(truth, label)
            except (KeyError, IndexError, TypeError):
                value = None
                failures.append(f"{name} {label}: no such label in the ground truth")
            if value is not None:
                if reads_as(loc["text"], value):
                    value_ok += 1
                else:
                    failures.append(f"{name} {label}: printed {loc['text']!r} does not read as {value!r}")
            if ink_in(image, loc["box"]):
                ink_ok += 1
            else:
                failures.append(f"{name} p{number} {label}: no ink in box {loc['box']} of the rendered page")
        page.close()
    pages = len(pdf)
    pdf.close()
    return dict(name=name, pages=pages, rotation="/".join(str(r) for r in sorted(rotations)),
                values=len(locations), text=text_ok, value=value_ok, ink=ink_ok,
                located_pages=len(by_page))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="the folder make_samples.py OUT_DIR --digital wrote")
    args = parser.parse_args()
    with open(os.path.join(args.out_dir, "ground_truth.json")) as f:
        truth = json.load(f)
    documents = {name: t for name, t in truth.items() if isinstance(t, dict) and "_locations" in t}
    failures, notes, rows = [], [], []
    if not documents:
        failures.append("no document with _locations in ground_truth.json")
    for name, t in sorted(documents.items()):
        path = os.path.join(args.out_dir, name)
        if not os.path.isfile(path):
            failures.append(f"{name}: missing")
            continue
        rows.append(check_document(path, t, failures, notes))
    header = ("document", "pages", "rot", "values", "text ok", "value ok", "ink ok")
    table = [header] + [(r["name"], r["pages"], r["rotation"], r["values"], r["text"], r["value"], r["ink"])
                        for r in rows]
    table.append(("total", sum(r["pages"] for r in rows), "", sum(r["values"] for r in rows),
                  sum(r["text"] for r in rows), sum(r["value"] for r in rows), sum(r["ink"] for r in rows)))
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for k, row in enumerate(table):
        if k in (1, len(table) - 1):
            print("  ".join("-" * w for w in widths))
        print("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    for note in notes:
        print("note:", note)
    if failures:
        print(f"FAILED: {len(failures)} problem(s)")
        for failure in failures[:50]:
            print("  " + failure)
        sys.exit(1)
    print(f"ok: {len(rows)} documents, {sum(r['values'] for r in rows)} values, every box matched")


if __name__ == "__main__":
    main()
