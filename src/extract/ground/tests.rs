use super::*;
use crate::raster::text::{TextChar, TextLayer};

/// A page of monospaced lines: each character 0.01 wide, each line 0.02 high, line breaks as pdfium reports them
/// (a generated `\r\n` without a box).
fn page(lines: &[&str]) -> TextLayer {
    let mut chars = Vec::new();
    for (row, line) in lines.iter().enumerate() {
        let y0 = 0.05 + row as f32 * 0.03;
        for (col, ch) in line.chars().enumerate() {
            let x0 = 0.05 + col as f32 * 0.01;
            let bbox = if ch == ' ' {
                [0.0; 4]
            } else {
                [x0, y0, x0 + 0.01, y0 + 0.02]
            };
            chars.push(TextChar { ch, bbox });
        }
        chars.push(TextChar {
            ch: '\r',
            bbox: [0.0; 4],
        });
        chars.push(TextChar {
            ch: '\n',
            bbox: [0.0; 4],
        });
    }
    TextLayer { chars }
}

fn find(layer: &TextLayer, value: &str, kind: ValueKind, field: &str) -> Found {
    let pages = [PageText::new(1, layer)];
    locate(&pages, &Lookup::new(value, kind, field, None), &[], false)
}

fn text_at(found: &Found) -> &str {
    match found {
        Found::At { text, .. } => text,
        other => panic!("not located: {other:?}"),
    }
}

#[test]
fn numbers_are_found_in_the_notation_the_page_prints() {
    let layer = page(&[
        "Rechnung 2024/117",
        "Nettobetrag 1.234,50 EUR",
        "Gross 1,481.40",
        "Split 12 345,60",
    ]);
    assert_eq!(
        text_at(&find(&layer, "1234.5", ValueKind::Number, "subtotal")),
        "1.234,50"
    );
    assert_eq!(
        text_at(&find(&layer, "1481.40", ValueKind::Number, "total")),
        "1,481.40"
    );
    assert_eq!(
        text_at(&find(&layer, "12345.6", ValueKind::Number, "x")),
        "12 345,60"
    );
    // A long whole number grouped the page's own way (a bank code, an account number).
    let bank = page(&["BLZ 630 500 00  Konto 79471"]);
    assert_eq!(
        text_at(&find(&bank, "63050000", ValueKind::Number, "blz")),
        "630 500 00"
    );
    // 117 is part of "2024/117": a number token of its own, found; 17 is not a token on this page.
    assert_eq!(find(&layer, "17", ValueKind::Number, "x"), Found::NotFound);
}

#[test]
fn a_box_is_the_union_of_the_matched_characters() {
    let layer = page(&["Total EUR 12.00"]);
    let Found::At { location, .. } = find(&layer, "12", ValueKind::Number, "total") else {
        panic!("not found");
    };
    let b = location.bbox.unwrap();
    // "12.00" starts at column 10 and ends at column 14 on line 0.
    assert!(
        (b[0] - 0.15).abs() < 1e-6 && (b[2] - 0.20).abs() < 1e-6,
        "{b:?}"
    );
    assert!(
        (b[1] - 0.05).abs() < 1e-6 && (b[3] - 0.07).abs() < 1e-6,
        "{b:?}"
    );
    assert_eq!(location.page, 1);
}

#[test]
fn dates_are_found_in_any_usual_form() {
    let layer = page(&[
        "Datum: 07.03.2024",
        "Due: March 31, 2024",
        "Ship 2024-04-02",
    ]);
    assert_eq!(
        text_at(&find(&layer, "2024-03-07", ValueKind::Date, "invoice_date")),
        "07.03.2024"
    );
    assert_eq!(
        text_at(&find(&layer, "2024-03-31", ValueKind::Date, "due_date")),
        "March 31, 2024"
    );
    assert_eq!(
        text_at(&find(&layer, "2024-04-02", ValueKind::Date, "d")),
        "2024-04-02"
    );
    assert_eq!(
        find(&layer, "2024-03-08", ValueKind::Date, "d"),
        Found::NotFound
    );
}

#[test]
fn strings_fold_case_and_space_and_forgive_a_misread_letter() {
    let layer = page(&[
        "From: ACME   GmbH",
        "Bill to: Umbrella plc",
        "12 Rue de la Paix",
        "Paris",
    ]);
    assert_eq!(
        text_at(&find(&layer, "Acme GmbH", ValueKind::Text, "vendor")),
        "ACME   GmbH"
    );
    assert_eq!(
        text_at(&find(&layer, "Umbrela plc", ValueKind::Text, "customer")),
        "Umbrella plc"
    );
    // An address answered on one line, printed on two.
    assert!(matches!(
        find(
            &layer,
            "12 Rue de la Paix, Paris",
            ValueKind::Text,
            "address"
        ),
        Found::At { .. }
    ));
    assert_eq!(
        find(&layer, "Initech", ValueKind::Text, "vendor"),
        Found::NotFound
    );
}

#[test]
fn a_currency_code_is_found_as_its_symbol() {
    let layer = page(&["Total 12.00 €"]);
    assert_eq!(
        text_at(&find(&layer, "EUR", ValueKind::Currency, "currency")),
        "€"
    );
    assert_eq!(
        find(&layer, "GBP", ValueKind::Currency, "currency"),
        Found::NotFound
    );
}

#[test]
fn a_repeated_value_is_decided_by_its_label_or_reported_ambiguous() {
    let layer = page(&["Subtotal 10.00", "Discount 0.00", "Tax 0.00", "Total 10.00"]);
    // 10.00 twice: the label "total" (a whole word: not the "total" inside "Subtotal") picks the last line.
    let Found::At { location, .. } = find(&layer, "10", ValueKind::Number, "total") else {
        panic!("total not decided");
    };
    assert!((location.bbox.unwrap()[1] - 0.14).abs() < 1e-6);
    let Found::At { location, .. } = find(&layer, "10", ValueKind::Number, "subtotal") else {
        panic!("subtotal not decided");
    };
    assert!((location.bbox.unwrap()[1] - 0.05).abs() < 1e-6);
    // 0.00 twice and the field's words are on neither line: never picked at random.
    assert_eq!(
        find(&layer, "0", ValueKind::Number, "rounding"),
        Found::Ambiguous { places: 2 }
    );
}

#[test]
fn a_line_item_value_is_decided_by_the_line_of_its_description() {
    use crate::extract::answer::parse;
    use crate::extract::schema::ExtractionSchema;
    let layer = page(&[
        "Description      Qty  Unit   Amount",
        "Widget A          10  4.00    40.00",
        "Service B          1  4.00     4.00",
    ]);
    let schema = ExtractionSchema::from_value(
        "t",
        serde_json::json!({"type": "object", "properties": {
            "items": {"type": "array", "items": {"type": "object", "properties": {
                "description": {"type": "string"},
                "quantity": {"type": "number"},
                "unit_price": {"type": "number"},
                "amount": {"type": "number"}}}}}}),
    )
    .unwrap();
    let mut node = parse(
        r#"{"items": [{"description": "Service B", "quantity": 1, "unit_price": 4.0, "amount": 4.0}]}"#,
    )
    .unwrap();
    let pages = [PageText::new(1, &layer)];
    ground_object(&mut node, &schema.fields, &pages, true);
    let NodeValue::Array(items) = &node.get("items").unwrap().value else {
        panic!()
    };
    for key in ["description", "quantity", "unit_price", "amount"] {
        let v = items[0].get(key).unwrap();
        assert_eq!(v.grounded, Some(true), "{key}");
        let b = v
            .location
            .and_then(|l| l.bbox)
            .unwrap_or_else(|| panic!("{key} has no box"));
        assert!(
            (b[1] - 0.11).abs() < 1e-6,
            "{key} not on the Service B line: {b:?}"
        );
    }
}

#[test]
fn grounded_is_unknown_without_a_text_layer_and_for_derived_fields() {
    use crate::extract::answer::parse;
    use crate::extract::schema::ExtractionSchema;
    let schema = ExtractionSchema::from_value(
        "t",
        serde_json::json!({"type": "object", "properties": {
            "vendor": {"type": "string"},
            "paid": {"type": "boolean"},
            "discount": {"type": "number", "x-grounding": false}}}),
    )
    .unwrap();
    let layer = page(&["Vendor: Acme", "Discount -5.00"]);
    let answer = r#"{"vendor": "Globex", "paid": true, "discount": 5}"#;
    let mut node = parse(answer).unwrap();
    ground_object(&mut node, &schema.fields, &[PageText::new(1, &layer)], true);
    assert_eq!(node.get("vendor").unwrap().grounded, Some(false));
    assert_eq!(node.get("paid").unwrap().grounded, None);
    assert_eq!(node.get("discount").unwrap().grounded, None);
    // A row with a scan among its pages: not found is not known to be absent.
    let mut node = parse(answer).unwrap();
    ground_object(
        &mut node,
        &schema.fields,
        &[PageText::new(1, &layer)],
        false,
    );
    assert_eq!(node.get("vendor").unwrap().grounded, None);
}
