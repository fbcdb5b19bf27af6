#!/usr/bin/env python3
"""Writes a folder of hostile inputs for pixtract's reliability checks (issue 17). Standard library only.

    python3 scripts/make_nasty_inputs.py OUT_DIR [--outside DIR]

Covers: odd names (tab, newline, non-UTF-8 bytes, `#<digits>` suffix, leading dash, very long), symbolic links
(loop, self, into a subfolder, to a file inside, leading outside, broken), a FIFO, an unreadable folder (only
unreadable when not run as root), empty / truncated / garbage / wrong-extension documents, PNG decompression
bombs (a 1 x 100,000,000 strip, a 100,000,000 x 1 strip, a 10,000 x 10,000 zlib bomb at the pixel limit,
a header lying about its size), a PDF with a huge page and one with an absurd page count claim, a TIFF with a
giant declared size, and a few good documents so that a run has something to extract.

Never commit the generated files: they are regenerated on demand (a few MB in all).
"""

import argparse
import os
import struct
import sys
import zlib


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png(width: int, height: int, color_type: int = 0, row_byte: int = 255, idat: bytes = None) -> bytes:
    """A PNG of 8-bit samples; every row filter 0 and the same byte (compresses ~1000:1)."""
    channels = {0: 1, 2: 3, 6: 4}[color_type]
    if idat is None:
        comp = zlib.compressobj(9)
        row = b"\x00" + bytes([row_byte]) * (width * channels)
        parts = []
        # Stream rows in chunks to keep this script's memory small.
        batch = max(1, (1 << 20) // len(row))
        left = height
        while left > 0:
            n = min(batch, left)
            parts.append(comp.compress(row * n))
            left -= n
        parts.append(comp.flush())
        idat = b"".join(parts)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def pdf(pages) -> bytes:
    """A minimal PDF; `pages` is a list of (width_pt, height_pt, content stream bytes)."""
    objs = []
    kids = []
    n_pages = len(pages)
    # 1: catalog, 2: pages, then per page: page + content, then font.
    font_id = 3 + 2 * n_pages
    for i, (w, h, content) in enumerate(pages):
        page_id = 3 + 2 * i
        kids.append(f"{page_id} 0 R")
    objs.append(b"<< /Type /Catalog /Pages 2 0 R >>")
    objs.append(f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {n_pages} >>".encode())
    for i, (w, h, content) in enumerate(pages):
        content_id = 4 + 2 * i
        objs.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 {w} {h}] /Contents {content_id} 0 R "
            f"/Resources << /Font << /F1 {font_id} 0 R >> >> >>".encode()
        )
        objs.append(b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream")
    objs.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    out = bytearray(b"%PDF-1.7\n")
    offsets = []
    for i, body in enumerate(objs):
        offsets.append(len(out))
        out += f"{i + 1} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
    for off in offsets:
        out += f"{off:010d} 00000 n \n".encode()
    out += f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def text_page(title: str) -> bytes:
    lines = [f"BT /F1 18 Tf 72 720 Td ({title}) Tj ET"]
    for i in range(8):
        lines.append(f"BT /F1 11 Tf 72 {680 - 18 * i} Td (Item {i + 1}   qty 1   {3 + i}.50 EUR) Tj ET")
    lines.append("BT /F1 12 Tf 72 500 Td (TOTAL 44.00 EUR) Tj ET")
    return "\n".join(lines).encode()


def tiff_header_only(width: int, height: int) -> bytes:
    """A little-endian TIFF whose IFD claims width x height 8-bit grey, with 10 bytes of strip."""
    entries = [
        (256, 4, 1, width),  # ImageWidth LONG
        (257, 4, 1, height),  # ImageLength LONG
        (258, 3, 1, 8),  # BitsPerSample
        (259, 3, 1, 1),  # Compression none
        (262, 3, 1, 1),  # Photometric BlackIsZero
        (273, 4, 1, 8 + 2 + 12 * 9 + 4),  # StripOffsets
        (277, 3, 1, 1),  # SamplesPerPixel
        (278, 4, 1, height),  # RowsPerStrip
        (279, 4, 1, 10),  # StripByteCounts
    ]
    out = bytearray(b"II*\x00" + struct.pack("<I", 8))
    out += struct.pack("<H", len(entries))
    for tag, typ, count, value in entries:
        if typ == 3:
            out += struct.pack("<HHIHH", tag, typ, count, value, 0)
        else:
            out += struct.pack("<HHII", tag, typ, count, value)
    out += struct.pack("<I", 0)
    out += b"\x80" * 10
    return bytes(out)


def write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--outside", help="folder for the target of the link leading outside (default: OUT.outside)")
    args = ap.parse_args()
    out = os.path.abspath(args.out)
    outside = os.path.abspath(args.outside or out.rstrip("/") + ".outside")
    os.makedirs(out, exist_ok=False)
    os.makedirs(outside, exist_ok=True)
    j = lambda *p: os.path.join(out, *p)  # noqa: E731

    good_pdf = pdf([(612, 792, text_page("INVOICE 1001"))])
    two_pages = pdf([(612, 792, text_page("INVOICE 2002 p1")), (612, 792, text_page("INVOICE 2002 p2"))])
    small_png = png(64, 48, 2, 200)

    # Good documents.
    write(j("good.pdf"), good_pdf)
    write(j("good_two_pages.pdf"), two_pages)
    write(j("good.png"), small_png)

    # Odd names.
    write(j("tab\tname.pdf"), good_pdf)
    write(j("new\nline.pdf"), good_pdf)
    write(os.path.join(out.encode(), b"latin1_\xe9t\xe9.pdf"), good_pdf)
    write(j("upload.pdf#123"), good_pdf)
    write(j("-starts-with-dash.png"), small_png)
    write(j(("long_" * 48) + ".png"), small_png)
    write(j("spaces and 'quotes' \"double\".png"), small_png)
    write(j("emoji_\U0001F9FE.png"), small_png)

    # Links.
    os.symlink("loop_b", j("loop_a"))
    os.symlink("loop_a", j("loop_b"))
    os.symlink(".", j("self_link"))
    os.makedirs(j("sub"))
    write(j("sub", "inner.pdf"), good_pdf)
    os.symlink("sub", j("sub_link"))
    os.symlink("good.pdf", j("alias.pdf"))
    os.symlink("does_not_exist.pdf", j("broken_link.pdf"))
    write(os.path.join(outside, "secret.pdf"), good_pdf)
    os.symlink(os.path.join(outside, "secret.pdf"), j("outside_link.pdf"))

    # Not regular files.
    os.mkfifo(j("fifo.pdf"))

    # An unreadable folder (root reads it anyway).
    os.makedirs(j("locked"))
    write(j("locked", "hidden.pdf"), good_pdf)
    os.chmod(j("locked"), 0)

    # Broken documents.
    write(j("empty.pdf"), b"")
    write(j("truncated.pdf"), good_pdf[: len(good_pdf) // 2])
    write(j("garbage.pdf"), os.urandom(4096))
    write(j("text_named.pdf"), b"just some text, not a PDF\n" * 10)
    write(j("png_named.jpg"), small_png)
    write(j("truncated.png"), small_png[:40])

    # Decompression bombs and absurd shapes.
    write(j("strip_1x100M.png"), png(1, 100_000_000))  # ~100 KB: 100 M rows of 1 pixel
    write(j("strip_100Mx1.png"), png(100_000_000, 1))
    write(j("bomb_10000x10000.png"), png(10_000, 10_000))  # at the default pixel limit, ~100 KB
    write(j("bomb_rgba_9000x9000.png"), png(9_000, 9_000, 6))
    lying = png(60_000, 60_000, 2, idat=zlib.compress(b"\x00" * 1000))
    write(j("header_lies_60000x60000.png"), lying)
    write(j("tiff_claims_50000x50000.tif"), tiff_header_only(50_000, 50_000))
    write(j("huge_page.pdf"), pdf([(14400, 14400, text_page("HUGE"))]))
    write(j("sliver_page.pdf"), pdf([(14400, 3, b"")]))
    claims = two_pages.replace(b"/Count 2", b"/Count 999999999")
    write(j("claims_many_pages.pdf"), claims)

    n = sum(len(files) + len(dirs) for _, dirs, files in os.walk(out))
    print(f"{out}: {n} entries (links not followed); link target folder {outside}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
