//! `pixtract eval` on SROIE's labels: the labels themselves as predictions score 1.0; seeded perturbations score
//! what the metric's definition says, counted here by hand; calibration and the threshold search on confidences
//! chosen so their answers are known. Predictions are real Parquet files; the per-field outcomes are read back by
//! DuckDB.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    ArrayRef, Date32Array, Float32Array, Float64Array, RecordBatch, StringArray, StructArray,
};
use arrow::datatypes::{DataType, Field, Fields, Schema};
use chrono::{Datelike, NaiveDate};
use parquet::arrow::ArrowWriter;
use pixtract::eval::{self, EvalOptions, FieldMap, LabelSet, Outcome, Predictions};

use crate::util::{pixtract, python_stdout, repo_root, text};

/// SROIE receipts with their labels. Absent, the test FAILS (set PIXTRACT_CORPUS to the corpus' parent).
fn sroie() -> PathBuf {
    let dir = std::env::var_os("PIXTRACT_CORPUS")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("../shared/corpus"))
        .join("receipts-sroie");
    assert!(
        dir.is_dir(),
        "corpus folder {} is absent (set PIXTRACT_CORPUS to its parent)",
        dir.display()
    );
    dir
}

/// A label's date as a date, parsed here independently of the evaluator (the formats SROIE uses).
fn label_date(s: &str) -> Option<NaiveDate> {
    let titled = s
        .split(' ')
        .map(|w| {
            if w.chars().all(|c| c.is_ascii_alphabetic()) && !w.is_empty() {
                w[..1].to_uppercase() + &w[1..].to_lowercase()
            } else {
                w.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(" ");
    [
        "%d/%m/%Y", "%d-%m-%Y", "%d/%m/%y", "%d-%m-%y", "%d %b %Y", "%d.%m.%Y", "%m/%d/%Y",
    ]
    .iter()
    .filter_map(|f| NaiveDate::parse_from_str(&titled, f).ok())
    // %Y also reads "18" as the year 18.
    .find(|d| d.year() >= 1000)
}

/// One receipt as the pipeline would write it.
#[derive(Clone, Debug)]
struct Row {
    doc: String,
    merchant_name: Option<String>,
    merchant_address: Option<String>,
    date: Option<NaiveDate>,
    total: Option<f64>,
    /// `_confidence.total.min`.
    total_confidence: Option<f32>,
}

fn rows_from_labels(labels: &LabelSet) -> Vec<Row> {
    labels
        .documents
        .iter()
        .map(|(doc, l)| {
            let text = |k: &str| l.get(k).filter(|v| !v.trim().is_empty()).cloned();
            Row {
                doc: doc.clone(),
                merchant_name: text("company"),
                merchant_address: text("address"),
                date: l.get("date").and_then(|d| label_date(d.trim())),
                total: text("total").and_then(|t| t.trim_start_matches('$').trim().parse().ok()),
                total_confidence: Some(0.9),
            }
        })
        .collect()
}

fn write_predictions(dir: &Path, rows: &[Row]) {
    std::fs::create_dir_all(dir.join("dt=2026-12-03")).unwrap();
    let pair = Fields::from(vec![
        Field::new("min", DataType::Float32, true),
        Field::new("mean", DataType::Float32, true),
    ]);
    let conf_fields = Fields::from(vec![Field::new(
        "total",
        DataType::Struct(pair.clone()),
        true,
    )]);
    let schema = Arc::new(Schema::new(vec![
        Field::new("merchant_name", DataType::Utf8, true),
        Field::new("merchant_address", DataType::Utf8, true),
        Field::new("transaction_date", DataType::Date32, true),
        Field::new("total", DataType::Float64, true),
        Field::new("_confidence", DataType::Struct(conf_fields.clone()), true),
        Field::new("source_uri", DataType::Utf8, false),
        Field::new("status", DataType::Utf8, false),
    ]));
    let epoch = NaiveDate::from_ymd_opt(1970, 1, 1).unwrap();
    let conf: ArrayRef = Arc::new(Float32Array::from(
        rows.iter().map(|r| r.total_confidence).collect::<Vec<_>>(),
    ));
    let total_pair = StructArray::new(pair, vec![conf.clone(), conf], None);
    let confidence = StructArray::new(conf_fields, vec![Arc::new(total_pair) as ArrayRef], None);
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from(
                rows.iter()
                    .map(|r| r.merchant_name.clone())
                    .collect::<Vec<_>>(),
            )),
            Arc::new(StringArray::from(
                rows.iter()
                    .map(|r| r.merchant_address.clone())
                    .collect::<Vec<_>>(),
            )),
            Arc::new(Date32Array::from(
                rows.iter()
                    .map(|r| r.date.map(|d| (d - epoch).num_days() as i32))
                    .collect::<Vec<_>>(),
            )),
            Arc::new(Float64Array::from(
                rows.iter().map(|r| r.total).collect::<Vec<_>>(),
            )),
            Arc::new(confidence),
            Arc::new(StringArray::from(
                rows.iter()
                    .map(|r| format!("file:///scans/{}.jpg", r.doc))
                    .collect::<Vec<_>>(),
            )),
            Arc::new(StringArray::from(vec!["ok"; rows.len()])),
        ],
    )
    .unwrap();
    let file = std::fs::File::create(dir.join("dt=2026-12-03/part-1-00000.parquet")).unwrap();
    let mut w = ArrowWriter::try_new(file, schema, None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

fn options() -> EvalOptions {
    EvalOptions {
        mapping: eval::sroie_mapping(),
        exact: false,
        target_precision: 0.99,
        bins: 10,
    }
}

fn score(rows: &[Row], labels: &LabelSet) -> eval::Report {
    let dir = tempfile::tempdir().unwrap();
    write_predictions(dir.path(), rows);
    let predictions = Predictions::load(&dir.path().to_string_lossy()).unwrap();
    eval::evaluate(&predictions, labels, &options()).unwrap()
}

#[test]
fn corpus_sroie_labels_as_predictions_score_one() {
    let labels = LabelSet::load(&sroie()).unwrap();
    assert!(labels.documents.len() >= 40, "{}", labels.documents.len());
    let report = score(&rows_from_labels(&labels), &labels);
    for f in &report.fields {
        assert_eq!(f.wrong + f.missed + f.spurious, 0, "{f:?}");
        assert_eq!(f.f1, 1.0, "{f:?}");
    }
    assert_eq!(report.micro.f1, 1.0);
    assert_eq!(report.macro_f1, 1.0);
    // An empty label (SROIE 033 has no total) is neither right nor wrong.
    let totals = &report.fields.iter().find(|f| f.field == "total").unwrap();
    let labelled_totals = labels
        .documents
        .values()
        .filter(|l| l.get("total").is_some_and(|t| !t.trim().is_empty()))
        .count();
    assert_eq!(totals.labelled, labelled_totals);
}

#[test]
fn corpus_perturbed_predictions_score_as_counted_by_hand() {
    let labels = LabelSet::load(&sroie()).unwrap();
    let mut rows = rows_from_labels(&labels);
    // Documents with all four labels present, so each perturbation's effect is one outcome.
    let complete: Vec<usize> = (0..rows.len())
        .filter(|&i| {
            let r = &rows[i];
            r.merchant_name.is_some()
                && r.merchant_address.is_some()
                && r.date.is_some()
                && r.total.is_some()
        })
        .collect();
    assert!(complete.len() >= 14, "{}", complete.len());
    // 3 wrong totals (a digit off), 2 dates with day and month swapped, 4 names missing, 1 spurious-free document
    // dropped entirely (4 fields missed).
    for &i in &complete[0..3] {
        rows[i].total = rows[i].total.map(|t| t + 1.0);
    }
    let mut swapped = 0;
    for &i in &complete[3..complete.len() - 5] {
        let d = rows[i].date.unwrap();
        // Day and month swapped: a real date only when the day is 12 or less, and a change only when they differ.
        if swapped < 2
            && let Some(s) = NaiveDate::from_ymd_opt(d.year(), d.day(), d.month())
            && s != d
        {
            rows[i].date = Some(s);
            swapped += 1;
        }
    }
    assert_eq!(swapped, 2);
    let names_missing: Vec<usize> = complete[complete.len() - 5..complete.len() - 1].to_vec();
    for &i in &names_missing {
        rows[i].merchant_name = None;
    }
    let dropped = complete[complete.len() - 1];
    let dropped_doc = rows[dropped].doc.clone();
    rows.remove(dropped);

    let report = score(&rows, &labels);
    let field = |name: &str| {
        report
            .fields
            .iter()
            .find(|f| f.field == name)
            .unwrap()
            .clone()
    };
    let labelled = |key: &str| {
        labels
            .documents
            .values()
            .filter(|l| l.get(key).is_some_and(|v| !v.trim().is_empty()))
            .count()
    };
    // total: 3 wrong, 1 missed (dropped document).
    let t = field("total");
    assert_eq!((t.wrong, t.missed, t.spurious), (3, 1, 0));
    assert_eq!(t.correct, labelled("total") - 4);
    let p = t.correct as f64 / (t.correct + 3) as f64;
    let r = t.correct as f64 / labelled("total") as f64;
    assert!((t.precision - p).abs() < 1e-12 && (t.recall - r).abs() < 1e-12);
    assert!((t.f1 - 2.0 * p * r / (p + r)).abs() < 1e-12);
    // date: 2 wrong, 1 missed; name: 4 + 1 missed; address: 1 missed.
    let d = field("transaction_date");
    assert_eq!((d.wrong, d.missed), (2, 1));
    let n = field("merchant_name");
    assert_eq!((n.wrong, n.missed), (0, 5));
    assert_eq!(n.precision, 1.0);
    assert_eq!(
        n.recall,
        (labelled("company") - 5) as f64 / labelled("company") as f64
    );
    let a = field("merchant_address");
    assert_eq!((a.wrong, a.missed), (0, 1));
    assert_eq!(report.unmatched_documents, vec![dropped_doc]);
    assert_eq!(report.micro.wrong, 5);
    assert_eq!(report.micro.missed, 8);
    assert!(
        (report.macro_f1 - (t.f1 + d.f1 + n.f1 + a.f1) / 4.0).abs() < 1e-12,
        "{report:?}"
    );
}

#[test]
fn calibration_and_threshold_on_known_confidences() {
    // 40 totals: 20 at confidence 0.95, all right; 20 at 0.55, half right.
    let dir = tempfile::tempdir().unwrap();
    let mut labels = String::new();
    let mut rows = Vec::new();
    for i in 0..40 {
        let doc = format!("doc{i:02}");
        labels += &format!(
            "{{\"document\": \"{doc}.pdf\", \"total\": \"{}.00\"}}\n",
            10 + i
        );
        let right = i < 20 || i % 2 == 0;
        rows.push(Row {
            doc,
            merchant_name: None,
            merchant_address: None,
            date: None,
            total: Some(10.0 + i as f64 + if right { 0.0 } else { 0.5 }),
            total_confidence: Some(if i < 20 { 0.95 } else { 0.55 }),
        });
    }
    std::fs::write(dir.path().join("labels.jsonl"), labels).unwrap();
    write_predictions(&dir.path().join("out"), &rows);
    let labels = LabelSet::load(&dir.path().join("labels.jsonl")).unwrap();
    let predictions = Predictions::load(&dir.path().join("out").to_string_lossy()).unwrap();
    let mut opts = options();
    opts.mapping = vec!["total=total".parse::<FieldMap>().unwrap()];
    let report = eval::evaluate(&predictions, &labels, &opts).unwrap();
    let cal = &report.calibration;
    assert_eq!(cal.values, 40);
    let bin = |lo: f64| cal.bins.iter().find(|b| (b.0 - lo).abs() < 1e-9).unwrap();
    assert_eq!(bin(0.9).2, 20);
    assert!((bin(0.9).4 - 1.0).abs() < 1e-9);
    assert_eq!(bin(0.5).2, 20);
    assert!((bin(0.5).4 - 0.5).abs() < 1e-9);
    // |1.0 - 0.95| * 1/2 + |0.5 - 0.55| * 1/2
    assert!((cal.ece - 0.05).abs() < 1e-6, "{}", cal.ece);
    let th = &report.thresholds[0];
    assert!((th.threshold.unwrap() - 0.95).abs() < 1e-6, "{th:?}");
    assert_eq!((th.precision, th.kept), (1.0, 0.5));
    opts.target_precision = 0.7;
    let report = eval::evaluate(&predictions, &labels, &opts).unwrap();
    // Keeping everything gives 30/40 = 0.75 >= 0.7.
    let th = &report.thresholds[0];
    assert!(
        (th.threshold.unwrap() - 0.55).abs() < 1e-6 && th.kept == 1.0,
        "{th:?}"
    );
    assert!(
        report
            .outcomes
            .iter()
            .all(|o| matches!(o.outcome, Outcome::Correct | Outcome::Wrong))
    );
}

#[test]
fn corpus_eval_cli_prints_the_table_and_writes_outcomes_duckdb_reads() {
    let labels = LabelSet::load(&sroie()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut rows = rows_from_labels(&labels);
    rows[0].total = rows[0].total.map(|t| t + 0.01);
    write_predictions(&dir.path().join("out"), &rows);
    let outcomes = dir.path().join("outcomes.parquet");
    let out = pixtract(
        &[
            "eval",
            "--predictions",
            &dir.path().join("out").to_string_lossy(),
            "--labels",
            &sroie().to_string_lossy(),
            "--out-parquet",
            &outcomes.to_string_lossy(),
        ],
        &[],
        &repo_root(),
    );
    let printed = text(&out);
    assert!(out.status.success(), "{printed}");
    assert!(
        printed.contains("merchant_name") && printed.contains("macro"),
        "{printed}"
    );
    let wrong = python_stdout(
        &format!(
            "import duckdb\nprint(duckdb.sql(\"SELECT document, field, outcome FROM '{}' WHERE outcome <> 'correct' AND outcome <> 'absent'\").fetchall())",
            outcomes.display()
        ),
        &[] as &[&str],
    );
    assert_eq!(
        wrong.trim(),
        format!("[('{}', 'total', 'wrong')]", rows[0].doc)
    );
    // No labels: one clear error, exit 1.
    let out = pixtract(
        &[
            "eval",
            "--predictions",
            &dir.path().join("out").to_string_lossy(),
            "--labels",
            &dir.path().join("nowhere").to_string_lossy(),
        ],
        &[],
        &repo_root(),
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("reading labels"), "{}", text(&out));
}

/// Predictions as a real Parquet file: `rows` (JSON objects in the output's column names) written by DuckDB, whose
/// types it infers; `extra` adds typed columns to the SELECT (`, NULL::DATE AS due_date`).
fn predictions_parquet(dir: &Path, rows: &[serde_json::Value], extra: &str) -> PathBuf {
    let jsonl = dir.join("predictions.jsonl");
    std::fs::write(
        &jsonl,
        rows.iter()
            .map(|p| p.to_string() + "\n")
            .collect::<String>(),
    )
    .unwrap();
    let parquet = dir.join("predictions.parquet");
    python_stdout(
        &format!(
            "import duckdb\nduckdb.sql(\"COPY (SELECT *{extra} FROM read_json('{}')) TO '{}' (FORMAT parquet)\")",
            jsonl.display(),
            parquet.display()
        ),
        &[] as &[&str],
    );
    parquet
}

/// The demo's `ground_truth.json` (written by scripts/make_samples.py) as labels, its receipts as predictions with
/// known faults: one line item's `total_price` off by a digit, one item dropped, one `total` off by a digit, and
/// in the labels one date rewritten day-first (`07/03/2024`), which still counts as right. Line items are scored
/// as sets of leaves (Donut's field F1) and by tree edit distance; the expected figures are counted here from the
/// ground truth itself.
#[test]
fn demo_ground_truth_scores_line_items_as_sets_and_scalars_by_outcome() {
    use serde_json::{Value, json};
    let dir = tempfile::tempdir().unwrap();
    let samples = dir.path().join("samples");
    let made = std::process::Command::new(repo_root().join(".venv/bin/python"))
        .arg(repo_root().join("scripts/make_samples.py"))
        .arg(&samples)
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let truth: serde_json::Map<String, Value> =
        serde_json::from_str(&std::fs::read_to_string(samples.join("ground_truth.json")).unwrap())
            .unwrap();
    let receipts: Vec<(&String, &Value)> = truth
        .iter()
        .filter(|(_, t)| t.get("items").is_some())
        .collect();
    let invoices = truth.len() - receipts.len();
    assert!(receipts.len() >= 3 && invoices >= 1, "{truth:?}");

    // Predictions: every receipt's truth, then the faults.
    let (off_item, dropped, off_total, day_first) = (0, 1, 2, 0);
    let mut preds: Vec<Value> = receipts
        .iter()
        .map(|(name, t)| {
            let mut p = (*t).clone();
            p["source_uri"] = json!(format!("file:///in/{name}"));
            p["status"] = json!("ok");
            p
        })
        .collect();
    let bump = |v: &Value| json!(v.as_f64().unwrap() + 1.0);
    let old = preds[off_item]["items"][0]["total_price"].clone();
    preds[off_item]["items"][0]["total_price"] = bump(&old);
    let items_of_dropped = preds[dropped]["items"].as_array().unwrap().len();
    preds[dropped]["items"].as_array_mut().unwrap().pop();
    let old_total = preds[off_total]["total"].clone();
    preds[off_total]["total"] = bump(&old_total);
    let parquet = predictions_parquet(dir.path(), &preds, "");
    // Labels: the file as written, but one receipt's date day-first.
    let mut labels = truth.clone();
    let iso = labels[receipts[day_first].0]["transaction_date"]
        .as_str()
        .unwrap()
        .to_string();
    let (y, m, d) = (&iso[0..4], &iso[5..7], &iso[8..10]);
    labels[receipts[day_first].0]["transaction_date"] = json!(format!("{d}/{m}/{y}"));
    let labels_file = dir.path().join("ground_truth.json");
    std::fs::write(&labels_file, Value::Object(labels).to_string()).unwrap();

    let out = pixtract(
        &[
            "eval",
            "--predictions",
            &parquet.to_string_lossy(),
            "--labels",
            &labels_file.to_string_lossy(),
            "--json",
        ],
        &[],
        &repo_root(),
    );
    let printed = text(&out);
    assert!(out.status.success(), "{printed}");
    let report: Value = serde_json::from_str(printed.lines().last().unwrap()).unwrap();

    // Line items: 4 leaves per item (description, quantity, unit_price, total_price).
    let label_items: Vec<usize> = receipts
        .iter()
        .map(|(_, t)| t["items"].as_array().unwrap().len())
        .collect();
    let labelled_leaves = 4 * label_items.iter().sum::<usize>();
    let predicted_leaves = labelled_leaves - 4;
    let matched = predicted_leaves - 1;
    let items = &report["items"][0];
    assert_eq!(items["field"], "items");
    assert_eq!(items["documents"], receipts.len());
    assert_eq!(items["labelled_leaves"], labelled_leaves);
    assert_eq!(items["predicted_leaves"], predicted_leaves);
    assert_eq!(items["matched_leaves"], matched);
    let close = |v: &Value, want: f64| (v.as_f64().unwrap() - want).abs() < 1e-9;
    assert!(
        close(
            &items["precision"],
            matched as f64 / predicted_leaves as f64
        ),
        "{items}"
    );
    assert!(
        close(&items["recall"], matched as f64 / labelled_leaves as f64),
        "{items}"
    );
    // Tree edit distance: the empty list costs (items + leaves) inserts; one wrong leaf is one relabel; a
    // dropped item is its node and its 4 leaves.
    let worst = |n: usize| (5 * n) as f64;
    let ted: f64 = label_items
        .iter()
        .enumerate()
        .map(|(i, &n)| match i {
            _ if i == off_item => 1.0 - 1.0 / worst(n),
            _ if i == dropped => 1.0 - 5.0 / worst(items_of_dropped),
            _ => 1.0,
        })
        .sum::<f64>()
        / receipts.len() as f64;
    assert!(close(&items["ted_accuracy"], ted), "{items} vs {ted}");

    // Scalars: the label keys that name output columns; the invoices have no row, so their labelled currency is
    // missed; one total is wrong; the day-first date is right.
    let field = |name: &str| {
        report["fields"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["field"] == name)
            .unwrap_or_else(|| panic!("no field {name} in {report}"))
            .clone()
    };
    let total = field("total");
    assert_eq!(total["wrong"], 1);
    assert_eq!(total["correct"], receipts.len() - 1);
    let date = field("transaction_date");
    assert_eq!(date["correct"], receipts.len());
    let currency = field("currency");
    assert_eq!(currency["missed"], invoices);
    assert_eq!(
        report["unmatched_documents"].as_array().unwrap().len(),
        invoices
    );
}

/// invoice2data's label files (an array of one object per document, its own key names) through the shipped
/// mapping file; labels written here in invoice2data's format, predictions in schemas/invoice.json's columns.
#[test]
fn invoice2data_labels_score_through_the_mapping_file() {
    use serde_json::{Value, json};
    let dir = tempfile::tempdir().unwrap();
    let compare = dir.path().join("compare");
    std::fs::create_dir(&compare).unwrap();
    let invoices = [
        (
            "AmazonWebServices",
            "Amazon Web Services, Inc.",
            "335128327",
            "2014-05-07",
            2.78,
        ),
        ("FlipkartTest", "Flipkart", "FIN00412", "2016-03-21", 1420.0),
        ("oyo", "OYO", "IBZY2087", "2017-12-31", 1939.0),
    ];
    let mut preds = Vec::new();
    for (i, (name, issuer, number, date, amount)) in invoices.iter().enumerate() {
        let label = json!([{"issuer": issuer, "invoice_number": number, "date": date, "amount": amount,
                            "currency": "EUR", "desc": format!("Invoice from {issuer}")}]);
        std::fs::write(compare.join(format!("{name}.json")), label.to_string()).unwrap();
        // The second invoice's number is misread.
        let read_number = if i == 1 { "FIN00413" } else { number };
        preds.push(
            json!({"source_uri": format!("s3://in/{name}.pdf"), "status": "ok",
            "vendor_name": issuer, "invoice_id": read_number, "invoice_date": date,
            "invoice_total": amount, "currency": "EUR"}),
        );
    }
    // The invoice schema's other mapped columns, null as a run writes what it did not find.
    let parquet = predictions_parquet(
        dir.path(),
        &preds,
        ", NULL::DATE AS due_date, NULL::DOUBLE AS subtotal, NULL::DOUBLE AS total_tax, \
         NULL::VARCHAR AS vendor_tax_id",
    );
    let out = pixtract(
        &[
            "eval",
            "--predictions",
            &parquet.to_string_lossy(),
            "--labels",
            &compare.to_string_lossy(),
            "--mapping",
            &repo_root()
                .join("schemas/mappings/invoice2data.toml")
                .to_string_lossy(),
            "--json",
        ],
        &[],
        &repo_root(),
    );
    let printed = text(&out);
    assert!(out.status.success(), "{printed}");
    let report: Value = serde_json::from_str(printed.lines().last().unwrap()).unwrap();
    let scores: std::collections::BTreeMap<String, (u64, u64, u64)> = report["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let n = |k: &str| f[k].as_u64().unwrap();
            (
                f["field"].as_str().unwrap().to_string(),
                (n("correct"), n("wrong"), n("missed")),
            )
        })
        .collect();
    let n = invoices.len() as u64;
    assert_eq!(scores["vendor_name"], (n, 0, 0), "{scores:?}");
    assert_eq!(scores["invoice_id"], (n - 1, 1, 0), "{scores:?}");
    assert_eq!(scores["invoice_date"], (n, 0, 0), "{scores:?}");
    assert_eq!(scores["invoice_total"], (n, 0, 0), "{scores:?}");
    assert_eq!(scores["currency"], (n, 0, 0), "{scores:?}");
    // Keys the labels do not have (due dates, untaxed amounts) are absent, not missed.
    assert_eq!(scores["due_date"], (0, 0, 0), "{scores:?}");

    // A mapping to a column the predictions lack is refused, naming it and the columns there are.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[fields]\nissuer = \"vendor\"\n").unwrap();
    let out = pixtract(
        &[
            "eval",
            "--predictions",
            &parquet.to_string_lossy(),
            "--labels",
            &compare.to_string_lossy(),
            "--mapping",
            &bad.to_string_lossy(),
        ],
        &[],
        &repo_root(),
    );
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("'vendor'") && t.contains("vendor_name"), "{t}");
}

/// Predictions read from an S3 prefix (moto on loopback), as a nightly job's output lives: the same scores as the
/// same files read locally, and an uncommitted `.`-file beside them is not read.
#[test]
fn corpus_eval_reads_predictions_from_an_s3_prefix() {
    use object_store::ObjectStoreExt;
    let labels = LabelSet::load(&sroie()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut rows = rows_from_labels(&labels);
    let with_total = rows.iter().position(|r| r.total.is_some()).unwrap();
    rows[with_total].total = rows[with_total].total.map(|t| t + 1.0);
    let local = dir.path().join("out");
    write_predictions(&local, &rows);
    let moto = crate::util::Moto::start();
    moto.create_bucket("lake");
    let store = moto.store("lake");
    let part = std::fs::read(local.join("dt=2026-12-03/part-1-00000.parquet")).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        store
            .put(
                &"eval/dt=2026-12-03/part-1-00000.parquet".into(),
                part.into(),
            )
            .await
            .unwrap();
        // Half-written garbage under a dot name: a reader that took it would fail.
        store
            .put(
                &"eval/dt=2026-12-03/.part-2-00000.parquet.tmp".into(),
                b"not parquet".to_vec().into(),
            )
            .await
            .unwrap();
    });
    let env = moto.env();
    let envs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let run = |predictions: &str| {
        let out = pixtract(
            &[
                "eval",
                "--predictions",
                predictions,
                "--labels",
                &sroie().to_string_lossy(),
                "--json",
            ],
            &envs,
            &repo_root(),
        );
        let printed = text(&out);
        assert!(out.status.success(), "{printed}");
        let mut report: serde_json::Value =
            serde_json::from_str(printed.lines().last().unwrap()).unwrap();
        report["fields"].take()
    };
    let from_s3 = run("s3://lake/eval");
    assert_eq!(from_s3, run(&local.to_string_lossy()));
    let total = from_s3
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["field"] == "total")
        .unwrap();
    assert_eq!(total["wrong"], 1, "{total}");
}

/// Page-level labels (`labels.jsonl` lines with a `page`) join the row that covers that page: a two-page invoice
/// extracted page by page is scored per page, and a row covering pages 1-2 (pages_per_prompt = 2) answers for both.
#[test]
fn page_level_labels_join_the_row_that_covers_the_page() {
    use serde_json::json;
    let dir = tempfile::tempdir().unwrap();
    let preds = [
        json!({"source_uri": "s3://in/inv.pdf", "page_start": 1, "page_end": 1, "status": "ok", "total": 10.0}),
        json!({"source_uri": "s3://in/inv.pdf", "page_start": 2, "page_end": 2, "status": "ok", "total": 21.0}),
        json!({"source_uri": "s3://in/two.pdf", "page_start": 1, "page_end": 2, "status": "ok", "total": 7.5}),
    ];
    let parquet = predictions_parquet(dir.path(), &preds, "");
    let labels = dir.path().join("labels.jsonl");
    let lines = [
        json!({"document": "inv.pdf", "page": 1, "total": "10.00"}),
        json!({"document": "inv.pdf", "page": 2, "total": "20.00"}),
        json!({"document": "two.pdf", "page": 2, "total": "7.50"}),
    ];
    std::fs::write(
        &labels,
        lines
            .iter()
            .map(|l| l.to_string() + "\n")
            .collect::<String>(),
    )
    .unwrap();
    let out = pixtract(
        &[
            "eval",
            "--predictions",
            &parquet.to_string_lossy(),
            "--labels",
            &labels.to_string_lossy(),
            "--map",
            "total=total",
            "--out-parquet",
            &dir.path().join("o.parquet").to_string_lossy(),
        ],
        &[],
        &repo_root(),
    );
    let printed = text(&out);
    assert!(out.status.success(), "{printed}");
    // Every labelled document has predictions: none unlabelled.
    assert!(printed.contains(", 0 without labels"), "{printed}");
    let outcomes = python_stdout(
        &format!(
            "import duckdb\nfor r in duckdb.sql(\"SELECT document, outcome FROM '{}' ORDER BY 1\").fetchall(): print(*r)",
            dir.path().join("o.parquet").display()
        ),
        &[] as &[&str],
    );
    assert_eq!(
        outcomes.trim(),
        "inv#p1 correct\ninv#p2 wrong\ntwo#p2 correct"
    );
    // A page number that is not one is refused with the line.
    std::fs::write(
        &labels,
        "{\"document\": \"inv.pdf\", \"page\": 0, \"total\": 1}\n",
    )
    .unwrap();
    let out = pixtract(
        &[
            "eval",
            "--predictions",
            &parquet.to_string_lossy(),
            "--labels",
            &labels.to_string_lossy(),
            "--map",
            "total=total",
        ],
        &[],
        &repo_root(),
    );
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("line 1") && t.contains("\"page\""), "{t}");
}

/// The shipped `schemas/mappings/sroie.toml` says what the built-in default says (one is documentation of the
/// other; they must not drift apart).
#[test]
fn shipped_sroie_mapping_file_equals_the_default() {
    let mut from_file =
        eval::mapping_from_file(&repo_root().join("schemas/mappings/sroie.toml")).unwrap();
    let mut built_in = eval::sroie_mapping();
    from_file.sort_by(|a, b| a.label.cmp(&b.label));
    built_in.sort_by(|a, b| a.label.cmp(&b.label));
    assert_eq!(from_file, built_in);
}
