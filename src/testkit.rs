//! Generated documents for tests and benchmarks: small, valid PDFs written from their objects, so no binary
//! fixture is committed and every byte of a test document is visible in code.

/// A 20-page invoice-like PDF: Helvetica text and ruled tables.
pub fn sample_invoice_pdf(pages: usize) -> Vec<u8> {
    let mut objects: Vec<Vec<u8>> = vec![
        b"<< /Type /Catalog /Pages 2 0 R >>".to_vec(),
        Vec::new(),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>".to_vec(),
    ];
    let mut kids = Vec::new();
    for p in 0..pages {
        let page_id = objects.len() + 1;
        kids.push(format!("{page_id} 0 R"));
        let mut c = format!("BT /F1 24 Tf 72 740 Td (INVOICE 2024-{p:04}) Tj ET\n0 0 0 RG 0.8 w\n");
        for r in 0..30 {
            let y = 700 - r * 20;
            c += &format!("72 {y} m 540 {y} l S\n");
            c += &format!(
                "BT /F1 10 Tf 78 {} Td (Item {r} description of goods) Tj 300 0 Td ({}) Tj 100 0 Td ({}.{:02}) Tj ET\n",
                y - 14,
                r % 7 + 1,
                r * 3 + 1,
                r * 7 % 100
            );
        }
        for x in [72, 370, 470, 540] {
            c += &format!("{x} 700 m {x} 100 l S\n");
        }
        objects.push(
            format!(
                "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> /Contents {} 0 R >>",
                page_id + 1
            )
            .into_bytes(),
        );
        let mut s = format!("<< /Length {} >>\nstream\n", c.len()).into_bytes();
        s.extend_from_slice(c.as_bytes());
        s.extend_from_slice(b"\nendstream");
        objects.push(s);
    }
    objects[1] = format!(
        "<< /Type /Pages /Kids [{}] /Count {pages} >>",
        kids.join(" ")
    )
    .into_bytes();
    pdf_from_objects(&objects)
}

/// A PDF file from its objects (numbered 1.. in order, object 1 the catalog), with a classic xref table.
/// Generated test and bench documents share it.
pub fn pdf_from_objects(objects: &[Vec<u8>]) -> Vec<u8> {
    // The binary comment marks the file as binary for tools that sniff the second line.
    let mut out = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n".to_vec();
    let mut offsets = Vec::new();
    for (i, o) in objects.iter().enumerate() {
        offsets.push(out.len());
        out.extend_from_slice(format!("{} 0 obj\n", i + 1).as_bytes());
        out.extend_from_slice(o);
        out.extend_from_slice(b"\nendobj\n");
    }
    let xref = out.len();
    out.extend_from_slice(
        format!("xref\n0 {}\n0000000000 65535 f \n", objects.len() + 1).as_bytes(),
    );
    for off in offsets {
        out.extend_from_slice(format!("{off:010} 00000 n \n").as_bytes());
    }
    out.extend_from_slice(
        format!(
            "trailer\n<< /Size {} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n",
            objects.len() + 1
        )
        .as_bytes(),
    );
    out
}
