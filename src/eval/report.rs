//! Scores from per-field outcomes: counts, precision / recall / F1, exact-match accuracy, calibration.

use std::path::Path;
use std::sync::Arc;

use arrow::array::{ArrayRef, Float64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use serde::Serialize;

use super::EvalError;

/// Per-field counts, by field name.
type Counts = std::collections::BTreeMap<String, FieldScore>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Correct,
    Wrong,
    Missed,
    Spurious,
    Absent,
}

impl Outcome {
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Correct => "correct",
            Outcome::Wrong => "wrong",
            Outcome::Missed => "missed",
            Outcome::Spurious => "spurious",
            Outcome::Absent => "absent",
        }
    }
}

/// One document's one field.
#[derive(Debug, Clone, Serialize)]
pub struct FieldOutcome {
    pub document: String,
    pub field: String,
    pub predicted: Option<String>,
    pub expected: Option<String>,
    pub outcome: Outcome,
    pub confidence: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct FieldScore {
    pub field: String,
    pub correct: usize,
    pub wrong: usize,
    pub missed: usize,
    pub spurious: usize,
    /// Documents whose label has this field.
    pub labelled: usize,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// correct / labelled.
    pub accuracy: f64,
}

impl FieldScore {
    fn add(&mut self, o: Outcome) {
        match o {
            Outcome::Correct => self.correct += 1,
            Outcome::Wrong => self.wrong += 1,
            Outcome::Missed => self.missed += 1,
            Outcome::Spurious => self.spurious += 1,
            Outcome::Absent => {}
        }
    }

    fn finish(&mut self) {
        let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        self.labelled = self.correct + self.wrong + self.missed;
        self.precision = ratio(self.correct, self.correct + self.wrong + self.spurious);
        self.recall = ratio(self.correct, self.labelled);
        self.f1 = if self.precision + self.recall == 0.0 {
            0.0
        } else {
            2.0 * self.precision * self.recall / (self.precision + self.recall)
        };
        self.accuracy = ratio(self.correct, self.labelled);
    }
}

/// Accuracy against confidence over the predicted values that have a label.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Calibration {
    /// Per bin `[lo, hi)`: values, mean confidence, accuracy.
    pub bins: Vec<(f64, f64, usize, f64, f64)>,
    /// Expected calibration error: sum over bins of |accuracy - confidence| weighted by the bin's share.
    pub ece: f64,
    pub values: usize,
}

/// Per field: the lowest confidence threshold at which the values kept reach the target precision.
#[derive(Debug, Clone, Serialize)]
pub struct Threshold {
    pub field: String,
    /// None: no threshold reaches the target.
    pub threshold: Option<f64>,
    pub precision: f64,
    /// Share of the field's predicted values kept at that threshold.
    pub kept: f64,
}

/// One field's grounding figures.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GroundingScore {
    pub field: String,
    /// Predicted (non-null) values, by their `_grounded`.
    pub grounded: usize,
    pub ungrounded: usize,
    pub unknown: usize,
    /// Of the predicted values with a label: the share right among the grounded ones, and among the ungrounded.
    pub correct_when_grounded: Option<f64>,
    pub correct_when_ungrounded: Option<f64>,
    /// Labelled values searched in the text layers of their documents (documents with a text layer only).
    pub labelled: usize,
    /// Found in one place, in several places (ambiguous), nowhere.
    pub found: usize,
    pub ambiguous: usize,
    pub not_found: usize,
    /// Values found in one place whose label says where they are drawn, and of those, how many boxes hold the
    /// centre of the drawn box on the same page.
    pub boxes_checked: usize,
    pub boxes_right: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub fields: Vec<FieldScore>,
    /// Counts summed over fields.
    pub micro: FieldScore,
    /// Unweighted means of the per-field precision, recall, F1 and accuracy.
    pub macro_precision: f64,
    pub macro_recall: f64,
    pub macro_f1: f64,
    pub macro_accuracy: f64,
    pub calibration: Calibration,
    pub target_precision: f64,
    pub thresholds: Vec<Threshold>,
    /// Labelled documents with no prediction row (their fields count as missed).
    pub unmatched_documents: Vec<String>,
    /// Predicted documents without labels (not scored).
    pub unlabelled_documents: usize,
    /// Line items scored as sets (Donut's field F1 and tree-edit-distance accuracy), one per list field.
    pub items: Vec<super::items::ItemScore>,
    /// `--grounding`: per field, the predictions' `_grounded` against the labels, and the labels located in
    /// their documents' text layers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grounding: Option<Vec<GroundingScore>>,
    #[serde(skip)]
    pub outcomes: Vec<FieldOutcome>,
}

impl Report {
    pub(super) fn build(
        outcomes: Vec<FieldOutcome>,
        order: &[String],
        unmatched_documents: Vec<String>,
        unlabelled_documents: usize,
        target_precision: f64,
        bins: usize,
    ) -> Report {
        let mut counts: Counts = Counts::new();
        let mut micro = FieldScore {
            field: "micro".into(),
            ..Default::default()
        };
        for o in &outcomes {
            counts
                .entry(o.field.clone())
                .or_insert_with(|| FieldScore {
                    field: o.field.clone(),
                    ..Default::default()
                })
                .add(o.outcome);
            micro.add(o.outcome);
        }
        micro.finish();
        let fields: Vec<FieldScore> = order
            .iter()
            .filter_map(|f| counts.remove(f))
            .map(|mut s| {
                s.finish();
                s
            })
            .collect();
        let mean = |f: fn(&FieldScore) -> f64| {
            if fields.is_empty() {
                0.0
            } else {
                fields.iter().map(f).sum::<f64>() / fields.len() as f64
            }
        };
        let thresholds = order
            .iter()
            .map(|f| threshold_for(&outcomes, f, target_precision))
            .collect();
        Report {
            macro_precision: mean(|s| s.precision),
            macro_recall: mean(|s| s.recall),
            macro_f1: mean(|s| s.f1),
            macro_accuracy: mean(|s| s.accuracy),
            calibration: calibrate(&outcomes, bins.max(1)),
            fields,
            micro,
            target_precision,
            thresholds,
            unmatched_documents,
            unlabelled_documents,
            items: Vec::new(),
            grounding: None,
            outcomes,
        }
    }

    /// The table `pixtract eval` prints.
    pub fn table(&self) -> String {
        let mut s = format!(
            "{:<20} {:>8} {:>6} {:>6} {:>6} {:>9} {:>7} {:>7} {:>7} {:>8}\n",
            "field",
            "labelled",
            "right",
            "wrong",
            "missed",
            "spurious",
            "prec",
            "recall",
            "F1",
            "accuracy"
        );
        for f in self.fields.iter().chain(std::iter::once(&self.micro)) {
            s += &format!(
                "{:<20} {:>8} {:>6} {:>6} {:>6} {:>9} {:>7.3} {:>7.3} {:>7.3} {:>8.3}\n",
                f.field,
                f.labelled,
                f.correct,
                f.wrong,
                f.missed,
                f.spurious,
                f.precision,
                f.recall,
                f.f1,
                f.accuracy
            );
        }
        s += &format!(
            "{:<20} {:>8} {:>6} {:>6} {:>6} {:>9} {:>7.3} {:>7.3} {:>7.3} {:>8.3}\n",
            "macro",
            "",
            "",
            "",
            "",
            "",
            self.macro_precision,
            self.macro_recall,
            self.macro_f1,
            self.macro_accuracy
        );
        s += &format!(
            "\ncalibration over {} labelled values with a confidence: ECE {:.3}\n",
            self.calibration.values, self.calibration.ece
        );
        for (lo, hi, n, conf, acc) in &self.calibration.bins {
            if *n > 0 {
                s += &format!(
                    "  confidence [{lo:.1}, {hi:.1}): {n:>5} values, mean confidence {conf:.3}, accuracy {acc:.3}\n"
                );
            }
        }
        s += &format!(
            "\nthreshold for precision >= {:.3} (values below it would go to review):\n",
            self.target_precision
        );
        for t in &self.thresholds {
            s += &match t.threshold {
                Some(th) => format!(
                    "  {:<20} confidence >= {th:.4}: precision {:.3}, keeps {:.1}% of its values\n",
                    t.field,
                    t.precision,
                    100.0 * t.kept
                ),
                None => format!("  {:<20} no threshold reaches it\n", t.field),
            };
        }
        for i in &self.items {
            s += &format!(
                "\nline items '{}' as sets over {} documents: {} labelled / {} predicted items; leaves {} labelled, \
                 {} predicted, {} matched: precision {:.3}, recall {:.3}, F1 {:.3}; tree-edit accuracy {:.3}\n",
                i.field,
                i.documents,
                i.labelled_items,
                i.predicted_items,
                i.labelled_leaves,
                i.predicted_leaves,
                i.matched_leaves,
                i.precision,
                i.recall,
                i.f1,
                i.ted_accuracy
            );
        }
        if !self.unmatched_documents.is_empty() {
            s += &format!(
                "\n{} labelled document(s) without a prediction (counted as missed): {}\n",
                self.unmatched_documents.len(),
                self.unmatched_documents.join(", ")
            );
        }
        s
    }
}

fn calibrate(outcomes: &[FieldOutcome], bins: usize) -> Calibration {
    let scored: Vec<(f64, bool)> = outcomes
        .iter()
        .filter(|o| matches!(o.outcome, Outcome::Correct | Outcome::Wrong))
        .filter_map(|o| {
            o.confidence
                .map(|c| (c.clamp(0.0, 1.0), o.outcome == Outcome::Correct))
        })
        .collect();
    let mut out = Calibration {
        values: scored.len(),
        ..Default::default()
    };
    for b in 0..bins {
        let (lo, hi) = (b as f64 / bins as f64, (b + 1) as f64 / bins as f64);
        let inside: Vec<&(f64, bool)> = scored
            .iter()
            .filter(|(c, _)| *c >= lo && (*c < hi || (b + 1 == bins && *c <= hi)))
            .collect();
        let n = inside.len();
        let (conf, acc) = if n == 0 {
            (0.0, 0.0)
        } else {
            (
                inside.iter().map(|(c, _)| c).sum::<f64>() / n as f64,
                inside.iter().filter(|(_, ok)| *ok).count() as f64 / n as f64,
            )
        };
        if !scored.is_empty() {
            out.ece += (acc - conf).abs() * n as f64 / scored.len() as f64;
        }
        out.bins.push((lo, hi, n, conf, acc));
    }
    out
}

fn threshold_for(outcomes: &[FieldOutcome], field: &str, target: f64) -> Threshold {
    // Predicted values of the field, most confident first: correct ones count for precision, wrong and
    // spurious against it. A value without a confidence can never pass a threshold.
    let mut values: Vec<(f64, bool)> = outcomes
        .iter()
        .filter(|o| o.field == field)
        .filter(|o| {
            matches!(
                o.outcome,
                Outcome::Correct | Outcome::Wrong | Outcome::Spurious
            )
        })
        .map(|o| {
            (
                o.confidence.unwrap_or(f64::NEG_INFINITY),
                o.outcome == Outcome::Correct,
            )
        })
        .collect();
    values.sort_by(|a, b| b.0.total_cmp(&a.0));
    let total = values.len();
    let mut best = Threshold {
        field: field.to_string(),
        threshold: None,
        precision: 0.0,
        kept: 0.0,
    };
    let mut right = 0;
    for (i, &(c, ok)) in values.iter().enumerate() {
        right += usize::from(ok);
        // Only cut between distinct confidences: a threshold keeps every value at or above it.
        let next_differs = values.get(i + 1).is_none_or(|n| n.0 < c);
        let precision = right as f64 / (i + 1) as f64;
        if next_differs && c.is_finite() && precision >= target {
            best = Threshold {
                field: field.to_string(),
                threshold: Some(c),
                precision,
                kept: (i + 1) as f64 / total as f64,
            };
        }
    }
    best
}

/// Writes one row per document and field (document, field, predicted, expected, outcome, confidence) as Parquet,
/// for slicing errors with SQL.
pub fn write_outcomes(report: &Report, path: &Path) -> Result<(), EvalError> {
    let text = |f: fn(&FieldOutcome) -> Option<String>| -> ArrayRef {
        Arc::new(report.outcomes.iter().map(f).collect::<StringArray>())
    };
    let schema = Arc::new(Schema::new(vec![
        Field::new("document", DataType::Utf8, false),
        Field::new("field", DataType::Utf8, false),
        Field::new("predicted", DataType::Utf8, true),
        Field::new("expected", DataType::Utf8, true),
        Field::new("outcome", DataType::Utf8, false),
        Field::new("confidence", DataType::Float64, true),
    ]));
    let write_err = |source| EvalError::Write {
        path: path.to_path_buf(),
        source,
    };
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            text(|o| Some(o.document.clone())),
            text(|o| Some(o.field.clone())),
            text(|o| o.predicted.clone()),
            text(|o| o.expected.clone()),
            text(|o| Some(o.outcome.name().to_string())),
            Arc::new(
                report
                    .outcomes
                    .iter()
                    .map(|o| o.confidence)
                    .collect::<Float64Array>(),
            ),
        ],
    )
    .map_err(|e| write_err(e.into()))?;
    // Written beside the target and renamed, so a half-written file is never visible under its name.
    let partial = path.with_extension("parquet.partial");
    let file = std::fs::File::create(&partial).map_err(|source| EvalError::Read {
        path: partial.clone(),
        source,
    })?;
    let mut writer = ArrowWriter::try_new(file, schema, None).map_err(write_err)?;
    writer.write(&batch).map_err(write_err)?;
    writer.close().map_err(write_err)?;
    std::fs::rename(&partial, path).map_err(|source| EvalError::Read {
        path: path.to_path_buf(),
        source,
    })
}
