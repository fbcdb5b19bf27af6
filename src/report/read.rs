//! Reading one run back from its output: the run's manifest (when it finished) and its Parquet rows, reduced to
//! what the report shows (where each row came from, its status and error, when it was processed, and per schema
//! field whether it holds a value and how sure the model was).

use std::collections::BTreeSet;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch, StructArray};
use arrow::datatypes::{DataType, Float32Type, Int32Type, TimestampMicrosecondType};
use chrono::{DateTime, Utc};
use serde::Deserialize;

use super::ReportError;
use crate::extract::values::provenance::{
    ERROR_KIND, PAGE_END, PAGE_START, SOURCE_URI, STATUS, is_reserved,
};
use crate::sink::committed::{Columns, Committed, OnBatches};
use crate::sink::{SinkManifest, SinkTarget};

/// The confidence struct column: per field `{min, mean}`.
const CONFIDENCE: &str = "_confidence";

/// One stage's busy time as the run summary in the manifest records it.
#[derive(Debug, Clone, Deserialize)]
pub struct StageShare {
    pub stage: String,
    pub busy_seconds: f64,
    /// Busy seconds / wall seconds (above 1 when the stage has parallel workers).
    pub share: f64,
}

/// The part of the run summary (`summary` in the manifest) the report shows.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SummaryFigures {
    #[serde(default)]
    pub pipeline: String,
    #[serde(default)]
    pub documents: usize,
    #[serde(default)]
    pub documents_failed: usize,
    #[serde(default)]
    pub documents_skipped: usize,
    #[serde(default)]
    pub pages: usize,
    #[serde(default)]
    pub rows: usize,
    #[serde(default)]
    pub rows_ok: usize,
    #[serde(default)]
    pub rows_failed: usize,
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub generated_tokens: u64,
    #[serde(default)]
    pub seconds: f64,
    #[serde(default)]
    pub pages_per_second: f64,
    #[serde(default)]
    pub stages: Vec<StageShare>,
    #[serde(default)]
    pub aborted: Option<String>,
    /// The decoder's counters (runs before 2026-12-07 have none).
    #[serde(default)]
    pub decode: Option<DecodeFigures>,
}

/// The part of the manifest's `decode` object the report shows.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct DecodeFigures {
    #[serde(default)]
    pub batching: String,
    #[serde(default)]
    pub slots: usize,
    #[serde(default)]
    pub admissions: usize,
    #[serde(default)]
    pub steps: usize,
    #[serde(default)]
    pub idle_row_share: f64,
    #[serde(default)]
    pub host_ms_per_step: f64,
    #[serde(default)]
    pub ceiling: f64,
}

/// One output row, reduced.
#[derive(Debug, Clone)]
pub struct RowFacts {
    pub source_uri: String,
    /// 0 for a document-level error row (the document never reached the model).
    pub page_start: i32,
    pub page_end: i32,
    pub status: String,
    pub error: Option<String>,
    /// `error_kind` (None for ok rows, and for outputs written before the column existed).
    pub error_kind: Option<String>,
    pub processed_at: Option<DateTime<Utc>>,
    /// The model answered this row (its values were written, complete or budget-closed).
    pub answered: bool,
    /// Per schema field, in column order: whether it holds a value, and the least probable token's probability.
    pub fields: Vec<FieldFacts>,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct FieldFacts {
    pub filled: bool,
    pub confidence: Option<f32>,
}

/// One run, read back from its output.
#[derive(Debug, Clone)]
pub struct RunOutput {
    pub run_id: String,
    pub target: String,
    /// Every run found in the output (sorted; run ids start with their UTC start time).
    pub runs: Vec<String>,
    /// None when the run did not finish (killed): its committed files are still read.
    pub manifest: Option<SinkManifest>,
    pub summary: Option<SummaryFigures>,
    /// The schema's top-level fields, in column order.
    pub field_names: Vec<String>,
    pub rows: Vec<RowFacts>,
    /// The run's Parquet files read.
    pub files: Vec<String>,
}

/// The run id in a data file name `<prefix>-<run id>-<NNNNN>.parquet` (the sink's naming).
fn run_of_file(name: &str) -> Option<&str> {
    let stem = name.strip_suffix(".parquet")?;
    let (rest, seq) = stem.rsplit_once('-')?;
    if seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (_prefix, run) = rest.split_once('-')?;
    (!run.is_empty()).then_some(run)
}

/// The run id in `_manifest-<run id>.json`.
fn run_of_manifest(name: &str) -> Option<&str> {
    name.strip_prefix("_manifest-")?.strip_suffix(".json")
}

/// Reads run `run_id` (or the latest run in the output) from `target`.
pub async fn read_run(target: &SinkTarget, run_id: Option<&str>) -> Result<RunOutput, ReportError> {
    let out = Committed::open(target)
        .map_err(ReportError::List)?
        .ok_or_else(|| ReportError::NoOutput(target.url()))?;
    let listing = out.list().await.map_err(ReportError::List)?;
    // Hidden objects (uncommitted writes) are not listed.
    let runs: BTreeSet<String> = listing
        .iter()
        .filter_map(|e| run_of_file(e.name()).or_else(|| run_of_manifest(e.name())))
        .map(str::to_string)
        .collect();
    let run_id = match run_id {
        Some(r) if runs.contains(r) => r.to_string(),
        Some(r) => {
            return Err(ReportError::RunNotFound {
                run: r.to_string(),
                runs: runs.into_iter().collect(),
            });
        }
        // Run ids begin with their start time (`20261203T092957Z-...`): the greatest is the latest.
        None => runs
            .iter()
            .next_back()
            .cloned()
            .ok_or_else(|| ReportError::NoOutput(target.url()))?,
    };
    let mut manifest = None;
    let mut data_files = Vec::new();
    for entry in &listing {
        if run_of_manifest(entry.name()) == Some(run_id.as_str()) {
            let bytes = out.get(entry).await?;
            let parsed: SinkManifest =
                serde_json::from_slice(&bytes).map_err(|source| ReportError::Manifest {
                    key: entry.rel.clone(),
                    source,
                })?;
            manifest = Some(parsed);
        } else if entry.is_data() && run_of_file(entry.name()) == Some(run_id.as_str()) {
            data_files.push(entry);
        }
    }
    data_files.sort_by(|a, b| a.rel.cmp(&b.rel));
    let summary = manifest
        .as_ref()
        .map(|m| {
            serde_json::from_value::<SummaryFigures>(m.summary.clone()).map_err(|source| {
                ReportError::Manifest {
                    key: format!("_manifest-{run_id}.json (summary)"),
                    source,
                }
            })
        })
        .transpose()?;
    let mut read = RunRows::default();
    for entry in &data_files {
        read.file = entry.rel.clone();
        read.mark = read.rows.len();
        // Everything but the raw answer, the largest column and one the report never shows.
        out.read_parquet(entry, Columns::AllBut(&["raw_output"]), &mut read)
            .await?;
        if let Some(e) = read.error.take() {
            return Err(e);
        }
    }
    Ok(RunOutput {
        run_id,
        target: target.url(),
        runs: runs.into_iter().collect(),
        manifest,
        summary,
        field_names: read.field_names,
        rows: read.rows,
        files: data_files.iter().map(|e| e.rel.clone()).collect(),
    })
}

/// The rows of a run's files as they are read: a read made again (it failed in the storage) drops the rows of its
/// file read so far.
#[derive(Default)]
struct RunRows {
    field_names: Vec<String>,
    rows: Vec<RowFacts>,
    /// The file being read, and the rows before it.
    file: String,
    mark: usize,
    error: Option<ReportError>,
}

impl OnBatches for RunRows {
    fn restart(&mut self) {
        self.rows.truncate(self.mark);
    }

    fn batch(&mut self, batch: &RecordBatch) -> bool {
        for field in batch.schema().fields() {
            let name = field.name();
            if !name.starts_with('_') && !is_reserved(name) && !self.field_names.contains(name) {
                self.field_names.push(name.clone());
            }
        }
        match rows_of(batch, &self.field_names, &self.file, &mut self.rows) {
            Ok(()) => true,
            Err(e) => {
                self.error = Some(e);
                false
            }
        }
    }
}

/// Whether the schema field's value in `column` at `i` counts as filled: not null, a string not blank, a list not
/// empty.
fn is_filled(column: &ArrayRef, i: usize) -> bool {
    if column.is_null(i) {
        return false;
    }
    match column.data_type() {
        DataType::Utf8 => !column.as_string::<i32>().value(i).trim().is_empty(),
        DataType::LargeUtf8 => !column.as_string::<i64>().value(i).trim().is_empty(),
        DataType::List(_) => !column.as_list::<i32>().value(i).is_empty(),
        DataType::LargeList(_) => !column.as_list::<i64>().value(i).is_empty(),
        _ => true,
    }
}

/// `_confidence.<field>.min` at row `i`.
fn confidence(conf: Option<&StructArray>, field: &str, i: usize) -> Option<f32> {
    let per_field = conf?.column_by_name(field)?.as_struct_opt()?;
    if per_field.is_null(i) {
        return None;
    }
    let min = per_field
        .column_by_name("min")?
        .as_primitive_opt::<Float32Type>()?;
    (!min.is_null(i)).then(|| min.value(i))
}

fn rows_of(
    batch: &RecordBatch,
    field_names: &[String],
    file: &str,
    rows: &mut Vec<RowFacts>,
) -> Result<(), ReportError> {
    let missing = |column: &str| ReportError::NotOurs {
        file: file.to_string(),
        column: column.to_string(),
    };
    let text = |name: &'static str| {
        batch
            .column_by_name(name)
            .and_then(|c| c.as_string_opt::<i32>().cloned())
            .ok_or_else(|| missing(name))
    };
    let int = |name: &'static str| {
        batch
            .column_by_name(name)
            .and_then(|c| c.as_primitive_opt::<Int32Type>().cloned())
            .ok_or_else(|| missing(name))
    };
    let uri = text(SOURCE_URI)?;
    let status = text(STATUS)?;
    let error = text("error")?;
    // Optional: outputs written before 2026-12-04 have no error_kind column.
    let error_kind = batch
        .column_by_name(ERROR_KIND)
        .and_then(|c| c.as_string_opt::<i32>().cloned());
    let finish = text("finish_reason")?;
    let (start, end) = (int(PAGE_START)?, int(PAGE_END)?);
    let processed = batch
        .column_by_name("processed_at")
        .and_then(|c| c.as_primitive_opt::<TimestampMicrosecondType>().cloned())
        .ok_or_else(|| missing("processed_at"))?;
    let conf = batch
        .column_by_name(CONFIDENCE)
        .and_then(|c| c.as_struct_opt());
    let columns: Vec<Option<&ArrayRef>> = field_names
        .iter()
        .map(|f| batch.column_by_name(f))
        .collect();
    for i in 0..batch.num_rows() {
        let opt = |a: &arrow::array::StringArray| (!a.is_null(i)).then(|| a.value(i).to_string());
        let answered = !finish.is_null(i);
        let fields = field_names
            .iter()
            .zip(&columns)
            .map(|(name, column)| match column {
                Some(c) if answered => FieldFacts {
                    filled: is_filled(c, i),
                    confidence: is_filled(c, i).then(|| confidence(conf, name, i)).flatten(),
                },
                _ => FieldFacts::default(),
            })
            .collect();
        rows.push(RowFacts {
            source_uri: opt(&uri).unwrap_or_default(),
            page_start: if start.is_null(i) { 0 } else { start.value(i) },
            page_end: if end.is_null(i) { 0 } else { end.value(i) },
            status: opt(&status).unwrap_or_default(),
            error: opt(&error),
            error_kind: error_kind.as_ref().and_then(opt),
            processed_at: (!processed.is_null(i))
                .then(|| DateTime::<Utc>::from_timestamp_micros(processed.value(i)))
                .flatten(),
            answered,
            fields,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_ids_come_from_the_sinks_file_names() {
        assert_eq!(
            run_of_file("part-20261203T092957Z-f09403-00000.parquet"),
            Some("20261203T092957Z-f09403")
        );
        assert_eq!(run_of_file("part-x.parquet"), None);
        assert_eq!(run_of_file("notes.txt"), None);
        assert_eq!(
            run_of_manifest("_manifest-20261203T092957Z-f09403.json"),
            Some("20261203T092957Z-f09403")
        );
        assert_eq!(run_of_manifest("_SUCCESS"), None);
    }
}
