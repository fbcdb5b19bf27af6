//! Document mode: one row per document from the answers of its windows of pages.
//!
//! A document too long for one prompt is answered in windows of consecutive pages, each under the same grammar.
//! Each top-level field of the schema then takes its document value from the windows' values by a rule the schema
//! may state (`"x-merge"` beside the field) or a default:
//!
//! | rule | value | default for |
//! |---|---|---|
//! | `first` | the first window's non-null value | scalars and objects (header fields: number, date, vendor) |
//! | `last` | the last window's non-null value | fields named like totals (`total`, `subtotal`, `tax`, `amount_due`, `balance`) |
//! | `max_confidence` | the non-null value whose least probable token was the most probable | - |
//! | `sum` | the numbers added exactly (decimal text, no float rounding) | - |
//! | `concat` | arrays joined in page order, an item repeated across a window boundary kept once; strings joined by a line break | arrays (line items) |
//!
//! A merged value keeps the confidence of the value chosen (`sum`, `concat`: the least of the parts' minima and
//! the mean of their means) and the pages it came from.

use std::collections::BTreeMap;

use super::answer::{Node, NodeValue};
use super::rows::{ExtractionRecord, Outcome, StageLatency};
use super::schema::{ExtractionSchema, MergeRule};

/// One window's answer: its pages and its parsed JSON object (confidences attached).
#[derive(Debug, Clone)]
pub struct WindowAnswer {
    pub page_start: u32,
    pub page_end: u32,
    pub answer: Node,
}

/// The document's answer, and per field the pages its value came from (None: every window had null).
#[derive(Debug, Clone)]
pub struct MergedAnswer {
    pub answer: Node,
    pub pages: BTreeMap<String, Option<(u32, u32)>>,
}

/// Merges the windows' answers (in any order; merged in page order) field by field.
pub fn merge_windows(schema: &ExtractionSchema, windows: &[WindowAnswer]) -> MergedAnswer {
    let mut ordered: Vec<&WindowAnswer> = windows.iter().collect();
    ordered.sort_by_key(|w| w.page_start);
    let mut members = Vec::with_capacity(schema.fields.len());
    let mut pages = BTreeMap::new();
    for (field, rule) in schema.fields.iter().zip(schema.merge_rules()) {
        // (window, its value) for the windows where the field is not null.
        let values: Vec<(&WindowAnswer, &Node)> = ordered
            .iter()
            .filter_map(|w| w.answer.get(&field.name).map(|n| (*w, n)))
            .filter(|(_, n)| !n.is_null())
            .collect();
        let (node, from) = merge_field(rule, &values);
        pages.insert(field.name.clone(), from);
        members.push((field.name.clone(), node));
    }
    MergedAnswer {
        answer: node(NodeValue::Object(members), None),
        pages,
    }
}

fn node(value: NodeValue, confidence: Option<(f32, f32)>) -> Node {
    Node {
        value,
        start: 0,
        end: 0,
        confidence,
        location: None,
        grounded: None,
    }
}

/// Pages of the windows a value was taken from.
fn span(values: &[(&WindowAnswer, &Node)]) -> Option<(u32, u32)> {
    let start = values.iter().map(|(w, _)| w.page_start).min()?;
    let end = values.iter().map(|(w, _)| w.page_end).max()?;
    Some((start, end))
}

fn merge_field(rule: MergeRule, values: &[(&WindowAnswer, &Node)]) -> (Node, Option<(u32, u32)>) {
    let Some(first) = values.first() else {
        return (node(NodeValue::Null, None), None);
    };
    let one = |(w, n): &(&WindowAnswer, &Node)| ((*n).clone(), Some((w.page_start, w.page_end)));
    match rule {
        MergeRule::First => one(first),
        MergeRule::Last => one(values.last().unwrap_or(first)),
        MergeRule::MaxConfidence => {
            let mut best = first;
            for v in values {
                let score = |n: &Node| n.confidence.map_or(0.0, |c| c.0);
                if score(v.1) > score(best.1) {
                    best = v;
                }
            }
            one(best)
        }
        MergeRule::Sum => match sum_numbers(values.iter().map(|(_, n)| *n)) {
            Some(total) => (
                node(NodeValue::Number(total), combined_confidence(values)),
                span(values),
            ),
            // Not numbers after all (the grammar gives numbers): the first value stands.
            None => one(first),
        },
        MergeRule::Concat => (concat(values), span(values)),
    }
}

/// The least of the parts' minima and the mean of their means.
fn combined_confidence(values: &[(&WindowAnswer, &Node)]) -> Option<(f32, f32)> {
    min_and_mean(values.iter().filter_map(|(_, n)| n.confidence))
}

/// (least of the minima, mean of the means) of (min, mean) confidences; None when there are none.
fn min_and_mean(parts: impl Iterator<Item = (f32, f32)>) -> Option<(f32, f32)> {
    let parts: Vec<(f32, f32)> = parts.collect();
    if parts.is_empty() {
        return None;
    }
    let min = parts.iter().map(|c| c.0).fold(f32::INFINITY, f32::min);
    let mean = parts.iter().map(|c| c.1).sum::<f32>() / parts.len() as f32;
    Some((min, mean))
}

fn concat(values: &[(&WindowAnswer, &Node)]) -> Node {
    let confidence = combined_confidence(values);
    if values
        .iter()
        .all(|(_, n)| matches!(n.value, NodeValue::String(_)))
    {
        let text: Vec<&str> = values
            .iter()
            .filter_map(|(_, n)| match &n.value {
                NodeValue::String(s) => Some(s.as_str()),
                _ => None,
            })
            .collect();
        return node(NodeValue::String(text.join("\n")), confidence);
    }
    let mut items: Vec<Node> = Vec::new();
    for (_, n) in values {
        let NodeValue::Array(window_items) = &n.value else {
            continue;
        };
        // A row that a page break cut shows at the end of one window and again at the start of the next (windows
        // overlap by design or the model repeats a carried-over line): kept once.
        let repeated = match (items.last(), window_items.first()) {
            (Some(last), Some(next)) => last.to_value() == next.to_value(),
            _ => false,
        };
        items.extend(window_items.iter().skip(usize::from(repeated)).cloned());
    }
    node(NodeValue::Array(items), confidence)
}

/// Adds JSON numbers exactly, as decimals: `19.99 + 0.01 = 20.00`, never `20.000000000000004`. None when a value
/// is not a plain decimal number (an exponent, or digits beyond 30) or the sum overflows.
pub fn sum_numbers<'a>(values: impl Iterator<Item = &'a Node>) -> Option<String> {
    let mut parts = Vec::new();
    for n in values {
        let NodeValue::Number(text) = &n.value else {
            return None;
        };
        parts.push(parse_decimal(text)?);
    }
    let scale = parts.iter().map(|p| p.1).max()?;
    let mut total: i128 = 0;
    for (digits, s) in parts {
        let scaled = digits.checked_mul(10i128.checked_pow(scale - s)?)?;
        total = total.checked_add(scaled)?;
    }
    Some(format_decimal(total, scale))
}

/// (digits, scale): `-12.340` is (-12340, 3).
fn parse_decimal(text: &str) -> Option<(i128, u32)> {
    let (negative, body) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (int, frac) = body.split_once('.').unwrap_or((body, ""));
    if int.is_empty()
        || int.len() + frac.len() > 30
        || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let digits: i128 = format!("{int}{frac}").parse().ok()?;
    Some((if negative { -digits } else { digits }, frac.len() as u32))
}

fn format_decimal(value: i128, scale: u32) -> String {
    let sign = if value < 0 { "-" } else { "" };
    let digits = value.unsigned_abs().to_string();
    if scale == 0 {
        return format!("{sign}{digits}");
    }
    let digits = format!("{digits:0>width$}", width = scale as usize + 1);
    let (int, frac) = digits.split_at(digits.len() - scale as usize);
    format!("{sign}{int}.{frac}")
}

/// A document's one row from its windows' rows (document mode). Every window answered: the answers merged
/// ([`merge_windows`]; free text joined in page order). A window failed: the document's row is an error row naming
/// the pages of each failed window (a transient failure keeps its `retry`: the next run tries the document again).
/// Either way the row covers the whole document (`page_start` 1, `page_end` its last page).
pub fn merge_document(
    schema: Option<&ExtractionSchema>,
    mut windows: Vec<ExtractionRecord>,
) -> Option<ExtractionRecord> {
    windows.sort_by_key(|w| w.source.page_start);
    let first = windows.first()?.clone();
    if windows.len() == 1 && first.source.page_start <= 1 {
        return Some(first);
    }
    let mut row = first.clone();
    row.source.page_start = windows
        .iter()
        .map(|w| w.source.page_start)
        .min()
        .unwrap_or(1)
        .min(1);
    row.source.page_end = windows.iter().map(|w| w.source.page_end).max().unwrap_or(0);
    row.source.doc_rows = Some(1);
    row.processed_at = windows
        .iter()
        .map(|w| w.processed_at)
        .max()
        .unwrap_or(first.processed_at);
    let sum = |f: &dyn Fn(&ExtractionRecord) -> Option<u32>| -> Option<u32> {
        windows
            .iter()
            .map(f)
            .try_fold(0u32, |a, b| b.map(|b| a + b))
    };
    row.prompt_tokens = sum(&|w| w.prompt_tokens);
    row.generated_tokens = sum(&|w| w.generated_tokens);
    let ms = |f: &dyn Fn(&StageLatency) -> Option<f64>| -> Option<f64> {
        windows
            .iter()
            .map(|w| f(&w.latency))
            .reduce(|a, b| match (a, b) {
                (Some(a), Some(b)) => Some(a + b),
                (a, b) => a.or(b),
            })?
    };
    row.latency = StageLatency {
        fetch_ms: ms(&|l| l.fetch_ms),
        raster_ms: ms(&|l| l.raster_ms),
        vision_ms: ms(&|l| l.vision_ms),
        prefill_ms: ms(&|l| l.prefill_ms),
        decode_ms: ms(&|l| l.decode_ms),
        grammar_ms: ms(&|l| l.grammar_ms),
        parse_ms: ms(&|l| l.parse_ms),
    };
    let pages =
        |w: &ExtractionRecord| format!("pages {}-{}", w.source.page_start, w.source.page_end);
    // Each window's raw answer on a line of its own, in page order.
    let raw: Vec<String> = windows
        .iter()
        .filter_map(|w| w.raw_output.as_ref().map(|r| format!("[{}] {r}", pages(w))))
        .collect();
    row.raw_output = (!raw.is_empty()).then(|| raw.join("\n"));
    row.finish_reason = if windows.iter().any(|w| w.finish_reason.is_none()) {
        None
    } else if windows
        .iter()
        .any(|w| w.finish_reason.as_deref() == Some("length"))
    {
        Some("length".into())
    } else {
        windows.last().and_then(|w| w.finish_reason.clone())
    };
    let warnings: Vec<String> = windows
        .iter()
        .filter_map(|w| w.warning.as_ref().map(|m| format!("{}: {m}", pages(w))))
        .collect();
    row.warning = (!warnings.is_empty()).then(|| warnings.join("; "));
    row.error_kind = windows.iter().find_map(|w| w.error_kind);
    row.review = windows.iter().flat_map(|w| w.review.clone()).collect();
    row.review.sort();
    row.review.dedup();
    let failures: Vec<String> = windows
        .iter()
        .filter_map(|w| match &w.outcome {
            Outcome::Failed(e) => Some(format!("{}: {e}", pages(w))),
            _ => None,
        })
        .collect();
    if !failures.is_empty() {
        row.outcome = Outcome::Failed(failures.join("; "));
        let failed = windows
            .iter()
            .filter(|w| matches!(w.outcome, Outcome::Failed(_)));
        row.source.attempt = failed.clone().find_map(|w| w.source.attempt);
        row.error_kind = failed.clone().find_map(|w| w.error_kind);
        row.warning = None;
        return Some(row);
    }
    row.outcome = match schema {
        Some(schema) => {
            let answers: Vec<WindowAnswer> = windows
                .iter()
                .filter_map(|w| match &w.outcome {
                    Outcome::Extracted(answer) => Some(WindowAnswer {
                        page_start: w.source.page_start,
                        page_end: w.source.page_end,
                        answer: answer.clone(),
                    }),
                    _ => None,
                })
                .collect();
            Outcome::Extracted(merge_windows(schema, &answers).answer)
        }
        None => {
            let texts: Vec<&str> = windows
                .iter()
                .filter_map(|w| match &w.outcome {
                    Outcome::Text { text: Some(t), .. } => Some(t.as_str()),
                    _ => None,
                })
                .collect();
            let confidence = min_and_mean(windows.iter().filter_map(|w| match &w.outcome {
                Outcome::Text { confidence, .. } => *confidence,
                _ => None,
            }));
            Outcome::Text {
                text: Some(texts.join("\n\n")),
                confidence,
            }
        }
    };
    Some(row)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::extract::answer::parse as parse_answer;

    fn schema() -> ExtractionSchema {
        ExtractionSchema::from_value(
            "invoice",
            json!({
                "type": "object",
                "properties": {
                    "invoice_id": {"type": ["string", "null"]},
                    "vendor": {"type": ["string", "null"], "x-merge": "max_confidence"},
                    "notes": {"type": ["string", "null"], "x-merge": "concat"},
                    "pages_total": {"type": ["number", "null"], "x-decimal": [12, 3], "x-merge": "sum"},
                    "invoice_total": {"type": ["number", "null"]},
                    "items": {"type": "array", "items": {
                        "type": "object",
                        "properties": {"description": {"type": "string"}, "amount": {"type": "number"}},
                        "required": ["description", "amount"],
                        "additionalProperties": false
                    }}
                },
                "required": ["invoice_id", "vendor", "notes", "pages_total", "invoice_total", "items"],
                "additionalProperties": false
            }),
        )
        .expect("schema")
    }

    /// A window's answer from its JSON text, every value given `confidence`.
    fn window(pages: (u32, u32), text: &str, confidence: f32) -> WindowAnswer {
        let mut answer = parse_answer(text).expect("answer parses");
        set_confidence(&mut answer, confidence);
        WindowAnswer {
            page_start: pages.0,
            page_end: pages.1,
            answer,
        }
    }

    fn set_confidence(n: &mut Node, c: f32) {
        n.confidence = Some((c, c));
        match &mut n.value {
            NodeValue::Array(items) => items.iter_mut().for_each(|i| set_confidence(i, c)),
            NodeValue::Object(m) => m.iter_mut().for_each(|(_, v)| set_confidence(v, c)),
            _ => {}
        }
    }

    /// Three windows of a 6-page invoice: the header on the first, line items across all three (one item cut by
    /// the boundary between windows 2 and 3, so both show it), a running total on two windows.
    #[test]
    fn windows_merge_into_one_row_by_each_fields_rule() {
        let windows = [
            window(
                (1, 2),
                r#"{"invoice_id": "INV-7", "vendor": "ACME", "notes": "net 30", "pages_total": 10.5, "invoice_total": null,
                    "items": [{"description": "bolts", "amount": 1.25}, {"description": "nuts", "amount": 0.75}]}"#,
                0.6,
            ),
            window(
                (3, 4),
                r#"{"invoice_id": null, "vendor": "ACME Corp", "notes": null, "pages_total": 0.25, "invoice_total": 90.00,
                    "items": [{"description": "washers", "amount": 2.00}, {"description": "rivets", "amount": 3.10}]}"#,
                0.9,
            ),
            window(
                (5, 6),
                r#"{"invoice_id": "INV-8", "vendor": null, "notes": "paid", "pages_total": 1.125, "invoice_total": 97.10,
                    "items": [{"description": "rivets", "amount": 3.10}, {"description": "glue", "amount": 4.00}]}"#,
                0.8,
            ),
        ];
        // Given out of order: merged in page order.
        let shuffled = [windows[2].clone(), windows[0].clone(), windows[1].clone()];
        let merged = merge_windows(&schema(), &shuffled);
        assert_eq!(
            merged.answer.to_value(),
            json!({
                "invoice_id": "INV-7",
                "vendor": "ACME Corp",
                "notes": "net 30\npaid",
                "pages_total": 11.875,
                "invoice_total": 97.10,
                "items": [
                    {"description": "bolts", "amount": 1.25},
                    {"description": "nuts", "amount": 0.75},
                    {"description": "washers", "amount": 2.00},
                    {"description": "rivets", "amount": 3.10},
                    {"description": "glue", "amount": 4.00}
                ]
            })
        );
        let pages = |f: &str| merged.pages[f];
        assert_eq!(pages("invoice_id"), Some((1, 2)), "first");
        assert_eq!(pages("vendor"), Some((3, 4)), "max_confidence");
        assert_eq!(pages("invoice_total"), Some((5, 6)), "last (a total)");
        assert_eq!(pages("items"), Some((1, 6)), "concat");
        assert_eq!(pages("pages_total"), Some((1, 6)), "sum");
        // The sum is exact decimal text, its confidence the least of its parts.
        let total = merged.answer.get("pages_total").unwrap();
        assert_eq!(total.value, NodeValue::Number("11.875".into()));
        assert_eq!(total.confidence.map(|c| c.0), Some(0.6));
        // The chosen value keeps its own confidence.
        assert_eq!(
            merged.answer.get("vendor").unwrap().confidence,
            Some((0.9, 0.9))
        );
    }

    #[test]
    fn a_field_null_in_every_window_stays_null_with_no_pages() {
        let windows = [
            window(
                (1, 1),
                r#"{"invoice_id": null, "vendor": null, "notes": null, "pages_total": null, "invoice_total": null, "items": []}"#,
                0.5,
            ),
            window(
                (2, 2),
                r#"{"invoice_id": null, "vendor": null, "notes": null, "pages_total": null, "invoice_total": null, "items": []}"#,
                0.5,
            ),
        ];
        let merged = merge_windows(&schema(), &windows);
        assert!(merged.answer.get("invoice_id").unwrap().is_null());
        assert_eq!(merged.pages["invoice_id"], None);
        assert_eq!(merged.answer.get("items").unwrap().to_value(), json!([]));
    }

    #[test]
    fn one_window_is_its_own_answer() {
        let text = r#"{"invoice_id": "A", "vendor": "V", "notes": "n", "pages_total": 2.50, "invoice_total": 3, "items": [{"description": "x", "amount": 1}]}"#;
        let merged = merge_windows(&schema(), &[window((1, 1), text, 0.7)]);
        assert_eq!(
            merged.answer.to_value(),
            parse_answer(text).unwrap().to_value()
        );
        // The number keeps its written text (2.50, not 2.5) for the decimal column.
        assert_eq!(
            merged.answer.get("pages_total").unwrap().value,
            NodeValue::Number("2.50".into())
        );
    }

    /// A window that failed makes the document's row an error row over the whole document, naming the failed
    /// window's pages; a transient failure keeps its attempt (status `retry`).
    #[test]
    fn a_failed_window_makes_the_documents_row_an_error_naming_its_pages() {
        use crate::extract::{ErrorKind, SourceInfo};
        let source = |start: u32, end: u32| SourceInfo {
            uri: "s3://b/inv.pdf".into(),
            page_start: start,
            page_end: end,
            doc_page_count: Some(6),
            ..SourceInfo::default()
        };
        let mut answered = ExtractionRecord::failed(source(1, 3), ErrorKind::Generation, "x");
        answered.outcome = Outcome::Extracted(
            parse_answer(r#"{"invoice_id": "A", "vendor": null, "notes": null, "pages_total": null, "invoice_total": 1, "items": []}"#)
                .unwrap(),
        );
        answered.error_kind = None;
        let mut failed_source = source(4, 6);
        failed_source.attempt = Some(1);
        let failed = ExtractionRecord::failed(
            failed_source,
            ErrorKind::Generation,
            "generation: ONNX Runtime failed",
        );
        let row = merge_document(Some(&schema()), vec![failed, answered]).expect("a row");
        assert_eq!((row.source.page_start, row.source.page_end), (1, 6));
        assert!(row.is_retry(), "{row:?}");
        assert_eq!(
            row.error_message(),
            Some("pages 4-6: generation: ONNX Runtime failed")
        );
        assert_eq!(row.error_kind, Some(ErrorKind::Generation));
    }

    #[test]
    fn decimals_add_exactly() {
        let n = |t: &str| node(NodeValue::Number(t.into()), None);
        let sum = |ts: &[&str]| sum_numbers(ts.iter().map(|t| n(t)).collect::<Vec<_>>().iter());
        assert_eq!(sum(&["0.1", "0.2"]).as_deref(), Some("0.3"));
        assert_eq!(sum(&["19.99", "0.01"]).as_deref(), Some("20.00"));
        assert_eq!(sum(&["-5", "1.899"]).as_deref(), Some("-3.101"));
        assert_eq!(
            sum(&["1e3", "1"]),
            None,
            "an exponent is not summed as text"
        );
    }

    #[test]
    fn stated_rules_are_checked_against_the_fields_type() {
        let bad = |merge: &str, ty: serde_json::Value| {
            ExtractionSchema::from_value(
                "s",
                json!({"type": "object", "properties": {"f": {"type": ty, "x-merge": merge}}, "required": ["f"], "additionalProperties": false}),
            )
            .err()
            .map(|e| e.to_string())
        };
        assert!(bad("sum", json!("string")).is_some_and(|e| e.contains("does not apply")));
        assert!(bad("average", json!("number")).is_some_and(|e| e.contains("not one of")));
        assert!(bad("concat", json!("string")).is_none());
    }
}
