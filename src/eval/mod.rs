//! Accuracy against labelled documents: predictions (pixtract's Parquet output) joined to labels by document,
//! values normalised per field type, per-field precision / recall / F1 and exact-match accuracy (micro and macro),
//! and calibration of the per-field confidences (reliability bins, expected calibration error, the confidence
//! threshold that reaches a target precision).
//!
//! Scoring follows SROIE's key information extraction task: a field is right when its normalised value equals
//! the label's. Per field and document the outcome is one of: `correct` (TP), `wrong` (a value that differs: FP
//! and FN), `missed` (labelled, predicted null or no row: FN), `spurious` (predicted where the label is empty: FP),
//! `absent` (neither: not counted).

mod labels;
mod normalise;
mod predictions;
mod report;

use std::path::PathBuf;

pub use labels::{LabelSet, Labels};
pub use normalise::{FieldKind, normalise};
pub use predictions::{Prediction, Predictions};
pub use report::{
    Calibration, FieldOutcome, FieldScore, Outcome, Report, Threshold, write_outcomes,
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
    for map in &opts.mapping {
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
            let prediction = predictions.documents.get(doc);
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
        .filter(|d| !predictions.documents.contains_key(*d))
        .cloned()
        .collect();
    let unlabelled = predictions
        .documents
        .keys()
        .filter(|d| !labels.documents.contains_key(*d))
        .count();
    let order: Vec<String> = opts.mapping.iter().map(|m| m.field.clone()).collect();
    Ok(Report::build(
        outcomes,
        &order,
        unmatched,
        unlabelled,
        opts.target_precision,
        opts.bins,
    ))
}

/// A document's key for joining: the file stem of its URI's last segment (`s3://b/x/000.jpg` -> `000`).
pub fn document_key(uri: &str) -> String {
    let last = uri.rsplit(['/', '\\']).next().unwrap_or(uri);
    match last.rsplit_once('.') {
        Some((stem, _)) if !stem.is_empty() => stem.to_string(),
        _ => last.to_string(),
    }
}
