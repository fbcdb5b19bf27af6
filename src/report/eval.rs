//! The figures of `pixtract eval --json`, read back for the report. Only what the report shows is read; unknown
//! keys are ignored so a newer eval output still loads.

use std::path::Path;

use serde::Deserialize;

use super::ReportError;

#[derive(Debug, Clone, Deserialize)]
pub struct EvalFieldScore {
    pub field: String,
    #[serde(default)]
    pub labelled: usize,
    #[serde(default)]
    pub correct: usize,
    #[serde(default)]
    pub wrong: usize,
    #[serde(default)]
    pub missed: usize,
    #[serde(default)]
    pub spurious: usize,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    #[serde(default)]
    pub accuracy: f64,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct EvalCalibration {
    /// Per bin: (lo, hi, values, mean confidence, accuracy).
    #[serde(default)]
    pub bins: Vec<(f64, f64, usize, f64, f64)>,
    #[serde(default)]
    pub ece: f64,
    #[serde(default)]
    pub values: usize,
}

#[derive(Debug, Clone, Deserialize)]
pub struct EvalThreshold {
    pub field: String,
    pub threshold: Option<f64>,
    pub precision: f64,
    pub kept: f64,
}

/// `pixtract eval --json`'s report.
#[derive(Debug, Clone, Deserialize)]
pub struct EvalFigures {
    pub fields: Vec<EvalFieldScore>,
    pub micro: EvalFieldScore,
    #[serde(default)]
    pub macro_precision: f64,
    #[serde(default)]
    pub macro_recall: f64,
    #[serde(default)]
    pub macro_f1: f64,
    #[serde(default)]
    pub calibration: EvalCalibration,
    #[serde(default)]
    pub target_precision: f64,
    #[serde(default)]
    pub thresholds: Vec<EvalThreshold>,
    #[serde(default)]
    pub unmatched_documents: Vec<String>,
    #[serde(default)]
    pub unlabelled_documents: usize,
}

impl EvalFigures {
    /// Reads the JSON `pixtract eval --json` printed (its last non-empty line, so a file holding the whole
    /// stdout works too).
    pub fn load(path: &Path) -> Result<EvalFigures, ReportError> {
        let text = std::fs::read_to_string(path).map_err(|source| ReportError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let json = text
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or_default();
        serde_json::from_str(json).map_err(|source| ReportError::Eval {
            path: path.to_path_buf(),
            source,
        })
    }
}
