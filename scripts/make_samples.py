#!/usr/bin/env python3
"""Synthetic receipts and invoices with known ground truth, for the demo and the tests (deterministic, made locally).

Usage: make_samples.py OUT_DIR               -> OUT_DIR/*.{jpg,png,pdf} + OUT_DIR/ground_truth.json
       make_samples.py OUT_DIR --multipage   -> invoices of 1, 2, 3, 5, 8 and 12 pages whose line-item tables run
                                                across page breaks (header on page 1, totals on the last), with
                                                their line items in OUT_DIR/ground_truth.json
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
    truth = {"merchant_name": merchant, "merchant_address": address, "transaction_date": date,
             "currency": currency, "total": round(total, 2), "payment_method": payment,
             "items": [{"description": a, "quantity": b, "unit_price": c, "total_price": round(b * c, 2)}
                       for a, b, c in items]}
    return img, truth


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
    truth = {"invoice_id": number, "vendor_name": vendor, "customer_name": customer, "invoice_date": issued,
             "due_date": due, "currency": currency, "subtotal": round(subtotal, 2),
             "total_tax": round(subtotal * vat, 2), "invoice_total": round(subtotal * (1 + vat), 2)}
    return out, truth


MULTIPAGE = [1, 2, 3, 5, 8, 12]
# Line-item rows on the first page (below the header), on a middle page, and on the last page (above the totals).
ROWS_FIRST, ROWS_MIDDLE, ROWS_LAST = 14, 22, 10


def multipage_invoice(pages):
    """An invoice of `pages` pages: its line items fill every page, the table continued across each break."""
    number = f"MP-{pages:02d}-2024"
    n_items = ROWS_FIRST if pages == 1 else ROWS_FIRST + ROWS_MIDDLE * (pages - 2) + ROWS_LAST
    if pages == 1:
        n_items = ROWS_LAST
    items = [(f"Part {pages:02d}-{i:03d}", 1 + i % 7, round(3.5 + (i * 37 % 200) / 4, 2)) for i in range(n_items)]
    subtotal = round(sum(q * p for _, q, p in items), 2)
    vat = 0.2
    rows_on = [ROWS_LAST] if pages == 1 else [ROWS_FIRST] + [ROWS_MIDDLE] * (pages - 2) + [ROWS_LAST]
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
    truth = {"invoice_id": number, "vendor_name": "Contoso Supplies Ltd", "customer_name": "Fabrikam Inc",
             "invoice_date": "2024-04-02", "due_date": "2024-05-02", "currency": "EUR", "subtotal": subtotal,
             "total_tax": round(subtotal * vat, 2), "invoice_total": round(subtotal * (1 + vat), 2),
             "pages": pages,
             "items": [{"description": a, "quantity": b, "unit_price": c, "amount": round(b * c, 2)}
                       for a, b, c in items]}
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
    elif len(sys.argv) == 2 and not sys.argv[1].startswith("-"):
        main(sys.argv[1])
    else:
        sys.exit(__doc__)
