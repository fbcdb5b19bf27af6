#!/usr/bin/env python3
"""Synthetic receipts and invoices with known ground truth, for the demo and the tests (deterministic, made locally).

Usage: make_samples.py OUT_DIR               -> OUT_DIR/*.{jpg,png,pdf} + OUT_DIR/ground_truth.json
       make_samples.py OUT_DIR --multipage   -> invoices of 1, 2, 3, 5, 8 and 12 pages whose line-item tables run
                                                across page breaks (header on page 1, totals on the last), with
                                                their line items in OUT_DIR/ground_truth.json
       make_samples.py OUT_DIR --digital     -> born-digital PDFs with a real text layer (reportlab), OUT_DIR/
                                                digital_<name>.pdf: the receipts (the Japanese one only where a
                                                TrueType font with its glyphs is installed) and invoices above, a
                                                3-page multi-page invoice, a landscape invoice on a /Rotate 90 page
                                                and one in European notation (1.234,50; 07.03.2024; 6 April 2024).
                                                OUT_DIR/ground_truth.json holds the canonical values and, per
                                                document, "_locations": label path ("total", "items[2].unit_price")
                                                -> {"page": 1-based, "box": [x0, y0, x1, y1], "text": as printed},
                                                the box in 0..1 of the page as displayed (after /Rotate, origin top
                                                left: the frame of a rendered image). Same bytes on every run.
                                                Checked by scripts/check_sample_boxes.py OUT_DIR.
"""
import json
import os
import sys

from PIL import Image, ImageDraw, ImageFont

RECEIPTS = [
    ("cafe_lumiere", "Café Lumière", "12 Rue de la Paix, Paris", "2024-03-07", "EUR",
     [("Espresso", 2, 2.50), ("Croissant", 1, 1.80)], "CARD"),
    ("baeckerei_mueller", "Bäckerei Müller", "Hauptstraße 5, Berlin", "2024-03-07", "EUR",
     [("Brezel", 2, 0.90), ("Kaffee", 1, 3.00)], "CASH"),
    ("corner_market", "Corner Market", "88 King St, Toronto", "2024-03-08", "CAD",
     [("Milk 2L", 1, 4.49), ("Bread", 2, 3.25), ("Apples", 3, 0.99)], "DEBIT"),
    ("tokyo_store", "東京ストア", "東京都千代田区1-1", "2024-03-08", "JPY",
     [("お茶", 2, 150.0), ("おにぎり", 3, 180.0)], "CASH"),
]
INVOICES = [
    ("acme_invoice", "INV-2024-0042", "Acme GmbH", "Globex Corp", "2024-03-01", "2024-03-31", "EUR",
     [("Widget A", 10, 4.00), ("Service B", 1, 99.00)], 0.19, 1),
    ("initech_invoice", "2024/117", "Initech LLC", "Umbrella plc", "2024-02-15", "2024-03-15", "USD",
     [("Consulting hours", 12, 150.00), ("Travel", 1, 420.00), ("Licence", 3, 99.00)], 0.0, 2),
]


def font(size):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType default font sizes
        return ImageFont.load_default()


def receipt(merchant, address, date, currency, items, payment):
    img = Image.new("RGB", (420, 760), (250, 250, 246))
    d = ImageDraw.Draw(img)
    y = 20
    for text, size in [(merchant, 28), (address, 16), (f"{date}  12:41", 16)]:
        d.text((20, y), text, fill=(15, 15, 15), font=font(size))
        y += size + 14
    d.line([(20, y), (400, y)], fill=(60, 60, 60), width=2)
    y += 14
    total = 0.0
    for desc, qty, price in items:
        amount = round(qty * price, 2)
        total += amount
        d.text((20, y), f"{desc}", fill=(0, 0, 0), font=font(18))
        d.text((230, y), f"{qty} x {price:.2f}", fill=(0, 0, 0), font=font(18))
        d.text((340, y), f"{amount:.2f}", fill=(0, 0, 0), font=font(18))
        y += 30
    d.line([(20, y), (400, y)], fill=(60, 60, 60), width=2)
    y += 14
    d.text((20, y), f"TOTAL {currency}", fill=(0, 0, 0), font=font(24))
    d.text((300, y), f"{total:.2f}", fill=(0, 0, 0), font=font(24))
    d.text((20, y + 44), f"Paid by {payment}", fill=(0, 0, 0), font=font(16))
    return img, receipt_truth(merchant, address, date, currency, items, payment)


def receipt_truth(merchant, address, date, currency, items, payment):
    total = 0.0
    for _, qty, price in items:
        total += round(qty * price, 2)
    return {"merchant_name": merchant, "merchant_address": address, "transaction_date": date,
            "currency": currency, "total": round(total, 2), "payment_method": payment,
            "items": [{"description": a, "quantity": b, "unit_price": c, "total_price": round(b * c, 2)}
                      for a, b, c in items]}


def invoice_pages(number, vendor, customer, issued, due, currency, items, vat, pages):
    out = []
    subtotal = sum(q * p for _, q, p in items)
    for page in range(pages):
        img = Image.new("RGB", (850, 1100), "white")
        d = ImageDraw.Draw(img)
        d.text((50, 40), f"INVOICE {number}", fill="black", font=font(36))
        d.text((50, 100), f"From: {vendor}", fill="black", font=font(20))
        d.text((50, 130), f"Bill to: {customer}", fill="black", font=font(20))
        d.text((520, 100), f"Date: {issued}", fill="black", font=font(20))
        d.text((520, 130), f"Due: {due}", fill="black", font=font(20))
        d.text((720, 1050), f"Page {page + 1}/{pages}", fill="black", font=font(16))
        if page == 0:
            y = 220
            for header, x in [("Description", 50), ("Qty", 450), ("Unit", 560), ("Amount", 700)]:
                d.text((x, y), header, fill="black", font=font(20))
            y += 40
            for desc, qty, price in items:
                for text, x in [(desc, 50), (str(qty), 450), (f"{price:.2f}", 560), (f"{qty * price:.2f}", 700)]:
                    d.text((x, y), text, fill="black", font=font(20))
                y += 34
        if page == pages - 1:
            y = 700
            d.text((450, y), f"Subtotal {currency} {subtotal:.2f}", fill="black", font=font(22))
            d.text((450, y + 40), f"VAT {vat * 100:.0f}% {subtotal * vat:.2f}", fill="black", font=font(22))
            d.text((450, y + 80), f"Total {currency} {subtotal * (1 + vat):.2f}", fill="black", font=font(26))
        out.append(img)
    return out, invoice_truth(number, vendor, customer, issued, due, currency, items, vat)


def invoice_truth(number, vendor, customer, issued, due, currency, items, vat):
    """An invoice's header and totals (no line items: the image invoices have never labelled theirs)."""
    subtotal = sum(q * p for _, q, p in items)
    return {"invoice_id": number, "vendor_name": vendor, "customer_name": customer, "invoice_date": issued,
            "due_date": due, "currency": currency, "subtotal": round(subtotal, 2),
            "total_tax": round(subtotal * vat, 2), "invoice_total": round(subtotal * (1 + vat), 2)}


MULTIPAGE = [1, 2, 3, 5, 8, 12]
# Line-item rows on the first page (below the header), on a middle page, and on the last page (above the totals).
ROWS_FIRST, ROWS_MIDDLE, ROWS_LAST = 14, 22, 10


def multipage_data(pages):
    """The multi-page invoice's data: number, line items, subtotal, VAT rate, line-item rows on each page, labels."""
    number = f"MP-{pages:02d}-2024"
    n_items = ROWS_FIRST if pages == 1 else ROWS_FIRST + ROWS_MIDDLE * (pages - 2) + ROWS_LAST
    if pages == 1:
        n_items = ROWS_LAST
    items = [(f"Part {pages:02d}-{i:03d}", 1 + i % 7, round(3.5 + (i * 37 % 200) / 4, 2)) for i in range(n_items)]
    subtotal = round(sum(q * p for _, q, p in items), 2)
    vat = 0.2
    rows_on = [ROWS_LAST] if pages == 1 else [ROWS_FIRST] + [ROWS_MIDDLE] * (pages - 2) + [ROWS_LAST]
    truth = {"invoice_id": number, "vendor_name": "Contoso Supplies Ltd", "customer_name": "Fabrikam Inc",
             "invoice_date": "2024-04-02", "due_date": "2024-05-02", "currency": "EUR", "subtotal": subtotal,
             "total_tax": round(subtotal * vat, 2), "invoice_total": round(subtotal * (1 + vat), 2),
             "pages": pages,
             "items": [{"description": a, "quantity": b, "unit_price": c, "amount": round(b * c, 2)}
                       for a, b, c in items]}
    return number, items, subtotal, vat, rows_on, truth


def multipage_invoice(pages):
    """An invoice of `pages` pages: its line items fill every page, the table continued across each break."""
    number, items, subtotal, vat, rows_on, truth = multipage_data(pages)
    out, at = [], 0
    for page, rows in enumerate(rows_on):
        img = Image.new("RGB", (850, 1100), "white")
        d = ImageDraw.Draw(img)
        y = 40
        if page == 0:
            d.text((50, 40), f"INVOICE {number}", fill="black", font=font(36))
            d.text((50, 100), "From: Contoso Supplies Ltd", fill="black", font=font(20))
            d.text((50, 130), "Bill to: Fabrikam Inc", fill="black", font=font(20))
            d.text((520, 100), "Date: 2024-04-02", fill="black", font=font(20))
            d.text((520, 130), "Due: 2024-05-02", fill="black", font=font(20))
            y = 200
        else:
            d.text((50, y), f"INVOICE {number} (continued)", fill="black", font=font(20))
            y += 40
        for header, x in [("Description", 50), ("Qty", 450), ("Unit", 560), ("Amount", 700)]:
            d.text((x, y), header, fill="black", font=font(20))
        y += 36
        for desc, qty, price in items[at:at + rows]:
            for text, x in [(desc, 50), (str(qty), 450), (f"{price:.2f}", 560), (f"{qty * price:.2f}", 700)]:
                d.text((x, y), text, fill="black", font=font(18))
            y += 30
        at += rows
        if page == pages - 1:
            y += 30
            d.text((450, y), f"Subtotal EUR {subtotal:.2f}", fill="black", font=font(22))
            d.text((450, y + 40), f"VAT 20% {subtotal * vat:.2f}", fill="black", font=font(22))
            d.text((450, y + 80), f"Total EUR {subtotal * (1 + vat):.2f}", fill="black", font=font(26))
        else:
            d.text((560, 1010), "continued on next page", fill="black", font=font(16))
        d.text((720, 1050), f"Page {page + 1}/{pages}", fill="black", font=font(16))
        out.append(img)
    return out, truth


def main_multipage(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    truth = {}
    for pages in MULTIPAGE:
        imgs, t = multipage_invoice(pages)
        path = os.path.join(out_dir, f"invoice_{pages:02d}_pages.pdf")
        imgs[0].save(path, save_all=True, append_images=imgs[1:], resolution=100.0)
        truth[os.path.basename(path)] = t
    with open(os.path.join(out_dir, "ground_truth.json"), "w") as f:
        json.dump(truth, f, indent=1, ensure_ascii=False)
    print(f"{len(truth)} multi-page invoices ({sum(MULTIPAGE)} pages) in {out_dir}")


# --- Born-digital PDFs (--digital): real text objects written with reportlab, every labelled value's box recorded.

DIGITAL_EPOCH = 1709251200  # 2024-03-01T00:00:00Z: the creation date written into every digital PDF
LETTER = (612.0, 792.0)
RECEIPT_PAGE = (228.0, 400.0)  # an 80 mm till roll
# The landscape invoice on a /Rotate 90 page: its MediaBox is portrait (612 x 792), shown as 792 x 612.
ROTATED = ("globex_landscape", "GX-7781", "Globex Corp", "Hooli Inc", "2024-03-07", "2024-04-06", "USD",
           [("Annual maintenance", 1, 1840.00), ("Spare filters", 24, 12.75), ("On-site visit", 2, 310.00)], 0.08)
# European notation: decimal comma, dot thousands, dates as 07.03.2024 and 6 April 2024; labels canonical.
EUROPEAN = ("mueller_rechnung", "RE-2024-0307", "Müller & Söhne GmbH", "Schneider Bau AG", "2024-03-07",
            "2024-04-06", "EUR", [("Beratung (Stunden)", 12, 115.50), ("Softwarelizenz", 1, 1234.50),
                                  ("Schulung", 2, 480.25)], 0.19)


def european(x):
    """1234.5 -> '1.234,50'."""
    return f"{x:,.2f}".replace(",", "_").replace(".", ",").replace("_", ".")


def long_date(iso):
    """'2024-04-06' -> '6 April 2024'."""
    months = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
              "November", "December"]
    y, m, d = (int(v) for v in iso.split("-"))
    return f"{d} {months[m - 1]} {y}"


def dotted_date(iso):
    """'2024-03-07' -> '07.03.2024'."""
    y, m, d = iso.split("-")
    return f"{d}.{m}.{y}"


def displayed_from_user(x, y, bbox, rotation):
    """A point in PDF user space -> (u, v) in points on the page as displayed (after the clockwise /Rotate),
    origin top left, v down; bbox the page's (x0, y0, x1, y1). The same frame as a rendered image of the page."""
    ux, uy = x - bbox[0], bbox[3] - y  # unrotated, origin top left
    w, h = bbox[2] - bbox[0], bbox[3] - bbox[1]
    return {0: (ux, uy), 90: (h - uy, ux), 180: (w - ux, h - uy), 270: (uy, w - ux)}[rotation % 360]


class DigitalDoc:
    """A reportlab canvas that lays text out on the page as displayed (points from its top-left corner, y the
    baseline) and records the box of every labelled piece in the displayed frame, normalised to 0..1.

    With rotation 90 the MediaBox is the displayed size turned (portrait for a landscape page), the page carries
    /Rotate 90 and the content is drawn turned back, so that it reads upright once the viewer applies /Rotate."""

    def __init__(self, path, size, fonts, rotation=0):
        from reportlab.pdfgen.canvas import Canvas
        self.size = size  # displayed (width, height)
        self.rotation = rotation
        w, h = size
        self.media = (w, h) if rotation in (0, 180) else (h, w)
        self.fonts = fonts  # (regular, bold)
        # reportlab writes a page with /Rotate 90 or 270 with its MediaBox turned: [0 0 height width] of
        # `pagesize`. So `pagesize` is the displayed size, and the MediaBox comes out as self.media.
        self.canvas = Canvas(path, pagesize=size, invariant=1, initialFontName=fonts[0])
        self.canvas.setCreator("pixtract scripts/make_samples.py --digital")
        self.canvas.setTitle(os.path.basename(path))
        self.page = 0
        self.locations = {}
        self._begin()

    def _matrix(self):
        """Drawing frame (the displayed page, origin bottom left, y up) -> user space, as (a, b, c, d, e, f)."""
        mw, mh = self.media
        return {0: (1, 0, 0, 1, 0, 0), 90: (0, 1, -1, 0, mw, 0), 180: (-1, 0, 0, -1, mw, mh),
                270: (0, -1, 1, 0, 0, mh)}[self.rotation]

    def _begin(self):
        self.page += 1
        self.canvas.setPageRotation(self.rotation)
        self.canvas.saveState()
        self.canvas.transform(*self._matrix())

    def new_page(self):
        self.canvas.restoreState()
        self.canvas.showPage()
        self._begin()

    def save(self):
        self.canvas.restoreState()
        self.canvas.showPage()
        self.canvas.save()

    def line(self, x0, x1, y, width=0.8):
        h = self.size[1]
        self.canvas.setLineWidth(width)
        self.canvas.line(x0, h - y, x1, h - y)

    def text(self, x, y, parts, size, bold=False, align="left"):
        """Draws the parts as one string with its baseline at y (points from the top), starting at x (or ending
        there, align="right"); parts are text or (text, label path) pieces, each labelled piece's box recorded."""
        from reportlab.pdfbase.pdfmetrics import getAscentDescent, stringWidth
        parts = [p if isinstance(p, tuple) else (p, None) for p in parts]
        name = self.fonts[1 if bold else 0]
        full = "".join(t for t, _ in parts)
        if align == "right":
            x -= stringWidth(full, name, size)
        baseline = self.size[1] - y
        self.canvas.setFont(name, size)
        self.canvas.drawString(x, baseline, full)
        ascent, descent = getAscentDescent(name, size)
        at = x
        for piece, label in parts:
            width = stringWidth(piece, name, size)
            if label is not None:
                assert label not in self.locations, f"{label} printed twice"
                self.locations[label] = {"page": self.page, "box": self._box(at, baseline + descent, at + width,
                                                                             baseline + ascent),
                                         "text": piece}
            at += width  # no kerning: a piece starts where the widths of the pieces before it end

    def _box(self, x0, y0, x1, y1):
        """A box in the drawing frame -> [x0, y0, x1, y1] in 0..1 of the displayed page, origin top left."""
        a, b, c, d, e, f = self._matrix()
        mw, mh = self.media
        corners = []
        for x, y in [(x0, y0), (x1, y0), (x0, y1), (x1, y1)]:
            ux, uy = a * x + c * y + e, b * x + d * y + f
            corners.append(displayed_from_user(ux, uy, (0.0, 0.0, mw, mh), self.rotation))
        w, h = self.size
        return [round(min(u for u, _ in corners) / w, 5), round(min(v for _, v in corners) / h, 5),
                round(max(u for u, _ in corners) / w, 5), round(max(v for _, v in corners) / h, 5)]


def japanese_font(texts):
    """A TrueType font on this machine (fc-list :lang=ja) with a glyph for every character of `texts`, registered
    with reportlab as "JP"; None where there is none (CFF-outline OpenType fonts cannot be embedded by reportlab)."""
    import subprocess
    from reportlab.pdfbase import pdfmetrics
    from reportlab.pdfbase.ttfonts import TTFont
    try:
        listed = subprocess.run(["fc-list", ":lang=ja", "file"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return None
    needed = {ord(ch) for t in texts for ch in t if not ch.isspace()}
    for path in sorted({line.split(":")[0].strip() for line in listed.splitlines() if line.strip()}):
        if not path.lower().endswith((".ttf", ".ttc", ".otf")):
            continue
        try:
            face = TTFont("JP", path, subfontIndex=0)
        except Exception:  # CFF outlines, unreadable collections
            continue
        if needed <= set(face.face.charToGlyph):
            pdfmetrics.registerFont(face)
            return "JP", path
    return None


def digital_receipt(path, merchant, address, date, currency, items, payment, fonts):
    truth = receipt_truth(merchant, address, date, currency, items, payment)
    doc = DigitalDoc(path, RECEIPT_PAGE, fonts)
    width = RECEIPT_PAGE[0]
    doc.text(14, 30, [(merchant, "merchant_name")], 14, bold=True)
    doc.text(14, 46, [(address, "merchant_address")], 8)
    doc.text(14, 58, [(date, "transaction_date"), "  12:41"], 8)
    doc.line(14, width - 14, 66)
    y = 82
    for i, (item, (desc, qty, price)) in enumerate(zip(truth["items"], items)):
        doc.text(14, y, [(desc, f"items[{i}].description")], 9)
        doc.text(118, y, [(str(qty), f"items[{i}].quantity"), " x ", (f"{price:.2f}", f"items[{i}].unit_price")], 9)
        doc.text(width - 14, y, [(f"{item['total_price']:.2f}", f"items[{i}].total_price")], 9, align="right")
        y += 14
    doc.line(14, width - 14, y - 4)
    y += 14
    doc.text(14, y, ["TOTAL ", (currency, "currency")], 12, bold=True)
    doc.text(width - 14, y, [(f"{truth['total']:.2f}", "total")], 12, bold=True, align="right")
    doc.text(14, y + 22, ["Paid by ", (payment, "payment_method")], 9)
    doc.text(14, y + 40, ["Thank you!"], 8)
    doc.save()
    truth["_locations"] = doc.locations
    return truth


def digital_invoice(path, spec, fonts, rotation=0, notation="iso", rows_on=None):
    """An invoice on Letter pages (landscape when rotation is 90): header on every page (labelled on the first),
    line items over `rows_on` rows per page (all on the first by default), totals on the last page."""
    number, vendor, customer, issued, due, currency, items, vat = spec
    truth = invoice_truth(number, vendor, customer, issued, due, currency, items, vat)
    truth["items"] = [{"description": a, "quantity": b, "unit_price": c, "amount": round(b * c, 2)}
                      for a, b, c in items]
    rows_on = rows_on or [len(items)]
    assert round(truth["subtotal"] + truth["total_tax"], 2) == truth["invoice_total"], f"{number}: totals off by a cent"
    money = european if notation == "european" else (lambda v: f"{v:.2f}")
    words = (dict(title="RECHNUNG", vendor="Lieferant: ", customer="Rechnung an: ", date="Datum: ",
                  due="Fällig am: ", desc="Beschreibung", qty="Menge", unit="Einzelpreis", amount="Betrag",
                  subtotal="Zwischensumme ", vat="MwSt", total="Gesamt ", page="Seite", cont="Fortsetzung")
             if notation == "european" else
             dict(title="INVOICE", vendor="From: ", customer="Bill to: ", date="Date: ", due="Due: ",
                  desc="Description", qty="Qty", unit="Unit", amount="Amount", subtotal="Subtotal ", vat="VAT",
                  total="Total ", page="Page", cont="continued on next page"))
    shown_issued, shown_due = (dotted_date(issued), long_date(due)) if notation == "european" else (issued, due)
    doc = DigitalDoc(path, (LETTER[1], LETTER[0]) if rotation in (90, 270) else LETTER, fonts, rotation)
    width, height = doc.size
    right = width - 36
    cols = [(36, "left"), (right - 250, "right"), (right - 120, "right"), (right, "right")]
    at = 0
    for page, rows in enumerate(rows_on):
        if page:
            doc.new_page()
        first = page == 0
        lab = (lambda label: label) if first else (lambda label: None)  # the header is labelled on page 1 only
        doc.text(36, 50, [words["title"] + " ", (number, lab("invoice_id"))], 20, bold=True)
        doc.text(36, 80, [words["vendor"], (vendor, lab("vendor_name"))], 11)
        doc.text(36, 96, [words["customer"], (customer, lab("customer_name"))], 11)
        doc.text(right - 170, 80, [words["date"], (shown_issued, lab("invoice_date"))], 11)
        doc.text(right - 170, 96, [words["due"], (shown_due, lab("due_date"))], 11)
        y = 136
        if rows:
            for head, (x, align) in zip([words["desc"], words["qty"], words["unit"], words["amount"]], cols):
                doc.text(x, y, [head], 10, bold=True, align=align)
            doc.line(36, right, y + 5)
            y += 20
            for i in range(at, at + rows):
                desc, qty, price = items[i]
                cells = [(desc, "description"), (str(qty), "quantity"), (money(price), "unit_price"),
                         (money(truth["items"][i]["amount"]), "amount")]
                for (text, key), (x, align) in zip(cells, cols):
                    doc.text(x, y, [(text, f"items[{i}].{key}")], 10, align=align)
                y += 17
            at += rows
        if page == len(rows_on) - 1:
            y += 24
            doc.line(right - 230, right, y - 14)
            doc.text(right, y, [words["subtotal"], currency + " ", (money(truth["subtotal"]), "subtotal")], 11,
                     align="right")
            doc.text(right, y + 18, [f"{words['vat']} {vat * 100:.0f}% ",
                                     (money(truth["total_tax"]), "total_tax")], 11, align="right")
            doc.text(right, y + 40, [words["total"], (currency, "currency"), " ",
                                     (money(truth["invoice_total"]), "invoice_total")], 13, bold=True,
                     align="right")
        else:
            doc.text(right, height - 40, [words["cont"]], 9, align="right")
        doc.text(right, height - 24, [f"{words['page']} {page + 1}/{len(rows_on)}"], 9, align="right")
    doc.save()
    truth["_locations"] = doc.locations
    return truth


def main_digital(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    saved = os.environ.get("SOURCE_DATE_EPOCH")
    os.environ["SOURCE_DATE_EPOCH"] = str(DIGITAL_EPOCH)  # reportlab's invariant mode takes its date from here
    try:
        truth = digital_documents(out_dir)
    finally:
        if saved is None:
            del os.environ["SOURCE_DATE_EPOCH"]
        else:
            os.environ["SOURCE_DATE_EPOCH"] = saved
    with open(os.path.join(out_dir, "ground_truth.json"), "w") as f:
        json.dump(truth, f, indent=1, ensure_ascii=False)
    n = sum(len(t["_locations"]) for t in truth.values())
    print(f"{len(truth)} born-digital PDFs in {out_dir} ({n} located values)")


def digital_documents(out_dir):
    latin = ("Helvetica", "Helvetica-Bold")  # the standard 14: WinAnsi covers é, è, ä, ü, ß; nothing embedded
    truth = {}

    def name(n):
        return os.path.join(out_dir, f"digital_{n}.pdf")
    for key, merchant, address, date, currency, items, payment in RECEIPTS:
        texts = [merchant, address, currency, payment] + [d for d, _, _ in items]
        fonts = latin
        if not all(_winansi(t) for t in texts):
            found = japanese_font(texts)
            if found is None:
                print(f"note: digital_{key}.pdf skipped: no TrueType font with its glyphs on this machine "
                      "(fc-list :lang=ja); Helvetica cannot print them", file=sys.stderr)
                continue
            print(f"note: digital_{key}.pdf embeds {found[1]}", file=sys.stderr)
            fonts = (found[0], found[0])
        path = name(key)
        truth[os.path.basename(path)] = digital_receipt(path, merchant, address, date, currency, items, payment,
                                                        fonts)
    for key, number, vendor, customer, issued, due, currency, items, vat, pages in INVOICES:
        # As the image invoices: line items on the first page, totals on the last, the header on each.
        rows_on = [len(items)] + [0] * (pages - 1)
        path = name(key)
        truth[os.path.basename(path)] = digital_invoice(
            path, (number, vendor, customer, issued, due, currency, items, vat), latin, rows_on=rows_on)
    number, items, _, vat, rows_on, mp = multipage_data(3)
    path = name("invoice_03_pages")
    truth[os.path.basename(path)] = digital_invoice(
        path, (number, mp["vendor_name"], mp["customer_name"], mp["invoice_date"], mp["due_date"], mp["currency"],
               items, vat), latin, rows_on=rows_on)
    path = name(ROTATED[0])
    truth[os.path.basename(path)] = digital_invoice(path, ROTATED[1:], latin, rotation=90)
    path = name(EUROPEAN[0])
    truth[os.path.basename(path)] = digital_invoice(path, EUROPEAN[1:], latin, notation="european")
    return truth


def _winansi(text):
    try:
        text.encode("cp1252")
        return True
    except UnicodeEncodeError:
        return False


def main(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    truth = {}
    for i, spec in enumerate(RECEIPTS):
        img, t = receipt(*spec[1:])
        ext = "jpg" if i % 2 == 0 else "png"
        path = os.path.join(out_dir, f"receipt_{spec[0]}.{ext}")
        img.save(path, quality=90) if ext == "jpg" else img.save(path)
        truth[os.path.basename(path)] = t
    for spec in INVOICES:
        pages, t = invoice_pages(*spec[1:])
        path = os.path.join(out_dir, f"invoice_{spec[0]}.pdf")
        pages[0].save(path, save_all=True, append_images=pages[1:], resolution=100.0)
        truth[os.path.basename(path)] = t
    with open(os.path.join(out_dir, "ground_truth.json"), "w") as f:
        json.dump(truth, f, indent=1, ensure_ascii=False)
    print(f"{len(truth)} sample documents in {out_dir}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[2] == "--multipage":
        main_multipage(sys.argv[1])
    elif len(sys.argv) == 3 and sys.argv[2] == "--digital":
        main_digital(sys.argv[1])
    elif len(sys.argv) == 2 and not sys.argv[1].startswith("-"):
        main(sys.argv[1])
    else:
        sys.exit(__doc__)
