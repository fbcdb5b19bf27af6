//! The run report: one static HTML file about one run, read back from the run's output (a folder or an object
//! store): throughput over time, stage busy shares, errors by cause with their documents, per-field fill rates
//! and confidence histograms, and accuracy figures when `pixtract eval --json` output is given.
//!
//! Everything comes from what the run committed: the Parquet rows (`processed_at`, `status`, `error`, the schema
//! fields and `_confidence`) and the manifest's run summary (stage busy times). The page has no script and fetches
//! nothing: charts are SVG drawn by plotters, each followed by the table of the numbers it plots.

mod charts;
pub mod eval;
pub mod figures;
mod html;
pub mod read;
pub mod review;

use std::path::PathBuf;

use chrono::{DateTime, Utc};

pub use eval::EvalFigures;
pub use figures::{ErrorGroup, FieldFill, ThroughputBin};
pub use read::{RunOutput, read_run};

use crate::sink::{SinkError, SinkTarget};

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("nothing to report: no pixtract run found in {0}")]
    NoOutput(String),
    #[error("no run {run} in the output; runs there: {}", if runs.is_empty() { "none".to_string() } else { runs.join(", ") })]
    RunNotFound { run: String, runs: Vec<String> },
    #[error("cannot list the output")]
    List(#[source] object_store::Error),
    #[error("cannot read the output")]
    Committed(#[from] crate::sink::committed::ReadError),
    #[error("{key} is not a pixtract manifest")]
    Manifest {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{file} has no column '{column}' of pixtract's type: not a pixtract output file")]
    NotOurs { file: String, column: String },
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not the JSON of `pixtract eval --json`", path.display())]
    Eval {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("drawing a chart: {0}")]
    Chart(String),
    #[error("writing the report")]
    Write(#[source] SinkError),
}

/// A run's figures, ready to render.
#[derive(Debug, Clone)]
pub struct RunReport {
    pub run: RunOutput,
    pub throughput: Vec<ThroughputBin>,
    pub errors: Vec<ErrorGroup>,
    pub fields: Vec<FieldFill>,
    pub eval: Option<EvalFigures>,
    pub generated_at: DateTime<Utc>,
}

impl RunReport {
    /// The figures of one run read back from its output.
    pub fn from_run(run: RunOutput, eval: Option<EvalFigures>) -> RunReport {
        let start = run.manifest.as_ref().map(|m| m.started_at);
        RunReport {
            throughput: figures::throughput(&run.rows, start),
            errors: figures::errors_by_cause(&run.rows),
            fields: figures::field_fill(&run.field_names, &run.rows),
            eval,
            generated_at: Utc::now(),
            run,
        }
    }

    /// The page: one self-contained HTML document.
    pub fn html(&self) -> Result<String, ReportError> {
        html::render(self)
    }
}

/// Reads run `run_id` (the latest when None) from the output at `target` and renders its report.
pub async fn build(
    target: &SinkTarget,
    run_id: Option<&str>,
    eval: Option<EvalFigures>,
) -> Result<String, ReportError> {
    let run = read_run(target, run_id).await?;
    RunReport::from_run(run, eval).html()
}

/// Writes run `run_id`'s report beside its manifest, in its `partition` folder ("" for none); returns its path
/// relative to the output.
pub async fn write_beside_run(
    target: &SinkTarget,
    partition: &str,
    run_id: &str,
) -> Result<String, ReportError> {
    let name = file_name(run_id);
    let rel = if partition.is_empty() {
        name
    } else {
        format!("{partition}/{name}")
    };
    let page = build(target, Some(run_id), None).await?;
    target
        .put_whole(&rel, page.into_bytes(), run_id)
        .await
        .map_err(ReportError::Write)?;
    Ok(rel)
}

/// The report's name beside a run's manifest: one per run, like `_manifest-<run id>.json`, so runs and shards
/// writing to the same partition never replace each other's; the leading `_` keeps it out of data readers' globs.
pub fn file_name(run_id: &str) -> String {
    format!("_report-{run_id}.html")
}
