//! Accuracy against labelled documents: predictions (pixtract's Parquet output) joined to labels by document,
//! values normalised per field type, per-field precision / recall / F1 and exact-match accuracy (micro and macro),
//! and calibration of the per-field confidences (reliability bins, expected calibration error, the confidence
//! threshold that reaches a target precision).
//!
//! Scoring follows SROIE's key information extraction task: a field is right when its normalised value equals
//! the label's. Per field and document the outcome is one of: `correct` (TP), `wrong` (a value that differs: FP
//! and FN), `missed` (labelled, predicted null or no row: FN), `spurious` (predicted where the label is empty: FP),
//! `absent` (neither: not counted). Line items (a label's array of objects against a `List<Struct>` column) are
//! scored as sets of leaves with Donut's field F1 and tree-edit-distance accuracy ([`items`]).

pub mod grounding;
mod items;
mod labels;
mod normalise;
mod predictions;
mod report;

use std::path::PathBuf;

pub use items::{Item, ItemScore, ted_accuracy};
pub use labels::{DrawnAt, LabelSet, Labels};
pub use normalise::{FieldKind, normalise};
pub use predictions::{Prediction, Predictions, page_key};
pub use report::{
    Calibration, FieldOutcome, FieldScore, GroundingScore, Outcome, Report, Threshold,
    write_outcomes,
};

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not valid JSON")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot read Parquet file {path}")]
    Parquet {
        path: PathBuf,
        #[source]
        source: parquet::errors::ParquetError,
    },
    #[error("cannot read Parquet file {path}")]
    Arrow {
        path: PathBuf,
        #[source]
        source: arrow::error::ArrowError,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: parquet::errors::ParquetError,
    },
    #[error("cannot open the output {uri}")]
    Output {
        uri: String,
        #[source]
        source: Box<crate::sink::SinkError>,
    },
    #[error("cannot read the output")]
    Committed(#[from] crate::sink::committed::ReadError),
    #[error("object store: {key}")]
    Object {
        key: String,
        #[source]
        source: object_store::Error,
    },
    #[error("{0}")]
    Input(String),
}

/// Which label key is scored against which prediction column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldMap {
    pub label: String,
    pub field: String,
}

impl std::str::FromStr for FieldMap {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('=') {
            Some((l, f)) if !l.trim().is_empty() && !f.trim().is_empty() => Ok(FieldMap {
                label: l.trim().to_string(),
                field: f.trim().to_string(),
            }),
            _ => Err(format!(
                "'{s}': expected LABEL_KEY=FIELD, e.g. company=merchant_name"
            )),
        }
    }
}

/// Reads a mapping file: TOML with one table `[fields]` of `label_key = "output_column"` (see
/// `schemas/mappings/`).
pub fn mapping_from_file(path: &std::path::Path) -> Result<Vec<FieldMap>, EvalError> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct MappingFile {
        fields: std::collections::BTreeMap<String, String>,
    }
    let text = std::fs::read_to_string(path).map_err(|source| EvalError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let file: MappingFile = toml::from_str(&text).map_err(|e| {
        EvalError::Input(format!(
            "{}: not a mapping file ([fields] with label_key = \"column\"): {e}",
            path.display()
        ))
    })?;
    if file.fields.is_empty() {
        return Err(EvalError::Input(format!(
            "{}: [fields] maps nothing",
            path.display()
        )));
    }
    Ok(file
        .fields
        .into_iter()
        .map(|(label, field)| FieldMap { label, field })
        .collect())
}

/// The mapping when none is given: SROIE's when the labels have SROIE's keys, else every label key that names an
/// output column, scored against that column.
pub fn default_mapping(labels: &LabelSet, predictions: &Predictions) -> Vec<FieldMap> {
    let keys = labels.keys();
    let sroie = sroie_mapping();
    if sroie.iter().all(|m| keys.contains(&m.label)) {
        return sroie;
    }
    let columns = predictions.field_names();
    keys.into_iter()
        .filter(|k| columns.contains(k))
        .map(|k| FieldMap {
            label: k.clone(),
            field: k,
        })
        .collect()
}

/// SROIE's four keys against `schemas/receipt.json`.
pub fn sroie_mapping() -> Vec<FieldMap> {
    [
        ("company", "merchant_name"),
        ("date", "transaction_date"),
        ("address", "merchant_address"),
        ("total", "total"),
    ]
    .into_iter()
    .map(|(l, f)| FieldMap {
        label: l.into(),
        field: f.into(),
    })
    .collect()
}

#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub mapping: Vec<FieldMap>,
    /// Compare strings as they are (no case or whitespace folding).
    pub exact: bool,
    /// Precision the per-field confidence threshold must reach.
    pub target_precision: f64,
    /// Reliability bins over [0, 1].
    pub bins: usize,
}

/// Scores `predictions` against `labels`.
pub fn evaluate(
    predictions: &Predictions,
    labels: &LabelSet,
    opts: &EvalOptions,
) -> Result<Report, EvalError> {
    let mut outcomes = Vec::new();
    let mut item_scores = Vec::new();
    for map in &opts.mapping {
        if let Some(kinds) = predictions.list_kinds_of(&map.field) {
            let mut scorer = items::ItemScorer::new(&map.field);
            for (doc, lists) in &labels.lists {
                let Some(label) = lists.get(&map.label) else {
                    continue;
                };
                let predicted = predictions
                    .get(doc)
                    .and_then(|p| p.lists.get(&map.field).cloned().flatten());
                scorer.add(predicted.as_deref(), label, kinds, opts.exact);
            }
            item_scores.push(scorer.finish());
            continue;
        }
        let kind = predictions.kind_of(&map.field).ok_or_else(|| {
            EvalError::Input(format!(
                "the predictions have no column '{}' (mapped from label key '{}'); columns: {}",
                map.field,
                map.label,
                predictions.field_names().join(", ")
            ))
        })?;
        for (doc, label) in &labels.documents {
            let expected = label
                .get(&map.label)
                .and_then(|v| normalise(v, kind, opts.exact));
            let prediction = predictions.get(doc);
            let predicted_raw =
                prediction.and_then(|p| p.values.get(&map.field).cloned().flatten());
            let predicted = predicted_raw
                .as_deref()
                .and_then(|v| normalise(v, kind, opts.exact));
            let confidence =
                prediction.and_then(|p| p.confidence.get(&map.field).copied().flatten());
            let outcome = match (&expected, &predicted) {
                (Some(e), Some(p)) if e == p => Outcome::Correct,
                (Some(_), Some(_)) => Outcome::Wrong,
                (Some(_), None) => Outcome::Missed,
                (None, Some(_)) => Outcome::Spurious,
                (None, None) => Outcome::Absent,
            };
            outcomes.push(report::FieldOutcome {
                document: doc.clone(),
                field: map.field.clone(),
                predicted: predicted_raw,
                expected: label
                    .get(&map.label)
                    .cloned()
                    .filter(|v| !v.trim().is_empty()),
                outcome,
                confidence,
            });
        }
    }
    let unmatched: Vec<String> = labels
        .documents
        .keys()
        .filter(|d| predictions.get(d).is_none())
        .cloned()
        .collect();
    let unlabelled = predictions
        .documents
        .keys()
        .filter(|d| {
            // Labelled as a document, or page by page (`<document>#p<page>` keys).
            let pages = format!("{d}#p");
            !labels.documents.contains_key(*d)
                && !labels
                    .documents
                    .range(pages.clone()..)
                    .next()
                    .is_some_and(|(k, _)| k.starts_with(&pages))
        })
        .count();
    if opts.mapping.is_empty() {
        return Err(EvalError::Input(format!(
            "no label key names an output column (label keys: {}; columns: {}): give --map or --mapping",
            labels.keys().join(", "),
            predictions.field_names().join(", ")
        )));
    }
    // Scalar fields only: list fields have their own scores in `items`.
    let order: Vec<String> = opts
        .mapping
        .iter()
        .filter(|m| predictions.list_kinds_of(&m.field).is_none())
        .map(|m| m.field.clone())
        .collect();
    let mut report = Report::build(
        outcomes,
        &order,
        unmatched,
        unlabelled,
        opts.target_precision,
        opts.bins,
    );
    report.items = item_scores;
    Ok(report)
}

/// A document's key for joining: the file stem of its URI's last segment (`s3://b/x/000.jpg` -> `000`).
pub fn document_key(uri: &str) -> String {
    let last = uri.rsplit(['/', '\\']).next().unwrap_or(uri);
    match last.rsplit_once('.') {
        Some((stem, _)) if !stem.is_empty() => stem.to_string(),
        _ => last.to_string(),
    }
}
