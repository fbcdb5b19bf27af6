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
fn sroie_labels_as_predictions_score_one() {
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
fn perturbed_predictions_score_as_counted_by_hand() {
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
fn eval_cli_prints_the_table_and_writes_outcomes_duckdb_reads() {
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
