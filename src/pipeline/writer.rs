//! The writer: rows to Parquet as they come, a whole document at a time, with the failure budget.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::PipelineError;
use super::report::{Progress, Reporter, Stage};
use super::spec::LimitsSpec;
use crate::extract::merge::merge_document;
use crate::extract::{
    ErrorKind, ExtractionRecord, ExtractionSchema, RunContext, to_record_batch_per_row,
};
use crate::sink::ParquetSink;

/// What the model stage hands the writer: a batch's rows and the time the model spent on them.
pub(super) type ModelOutput = (Vec<ExtractionRecord>, Duration);

pub(super) struct Writer {
    pub sink: ParquetSink,
    pub schema: Option<ExtractionSchema>,
    /// Document mode: a document's windows become its one row when all are in.
    pub per_document: bool,
    pub ctx: RunContext,
    pub limits: LimitsSpec,
    pub reporter: Reporter,
    pub progress: Arc<Progress>,
    /// Set when the failure budget is exceeded: the producer stops taking documents.
    pub abort: Arc<AtomicBool>,
}

/// What the writer leaves when its input ends.
pub(super) struct Written {
    pub sink: ParquetSink,
    pub tally: RowTally,
    /// Why the run stopped early (failure budget), if it did.
    pub failure: Option<String>,
}

#[derive(Debug, Default)]
pub(super) struct RowTally {
    pub rows: usize,
    pub ok: usize,
    pub failed: usize,
    /// Rows with at least one value withheld by a confidence threshold (`_review` not empty).
    pub for_review: usize,
    pub prompt_tokens: u64,
    pub generated_tokens: u64,
    pub busy: Duration,
}

impl Writer {
    pub async fn run(
        mut self,
        mut rows_rx: mpsc::Receiver<ModelOutput>,
    ) -> Result<Written, PipelineError> {
        let mut tally = RowTally::default();
        let mut failure: Option<String> = None;
        let mut held = Documents {
            per_document: self.per_document,
            ..Documents::default()
        };
        while let Some((records, busy)) = rows_rx.recv().await {
            tally.busy += busy;
            self.progress.add_busy(Stage::Model, busy);
            for r in &records {
                tally.rows += 1;
                // Only answered rows carry withheld fields (a failed row's `_review` is null).
                if !r.review.is_empty() {
                    tally.for_review += 1;
                }
                if r.is_ok() {
                    tally.ok += 1;
                } else {
                    tally.failed += 1;
                }
                // Document-level failures (page 0) were reported when they happened.
                if !r.is_ok() && r.source.page_start > 0 {
                    let error = r.error_message().unwrap_or_default().to_string();
                    self.reporter.event(
                        "warn",
                        "row_failed",
                        || {
                            format!(
                                "error row: {} pages {}-{}: {}",
                                r.source.uri.escape_debug(),
                                r.source.page_start,
                                r.source.page_end,
                                error.escape_debug()
                            )
                        },
                        serde_json::json!({
                            "uri": r.source.uri,
                            "page_start": r.source.page_start,
                            "page_end": r.source.page_end,
                            "error": error,
                        }),
                    );
                }
                tally.prompt_tokens += r.prompt_tokens.unwrap_or(0) as u64;
                tally.generated_tokens += r.generated_tokens.unwrap_or(0) as u64;
            }
            self.progress.rows.store(tally.rows, Ordering::Relaxed);
            self.progress
                .rows_failed
                .store(tally.failed, Ordering::Relaxed);
            self.progress
                .generated_tokens
                .store(tally.generated_tokens, Ordering::Relaxed);
            // Rows go to the sink a whole document at a time, so a file rotation never falls inside a document
            // and a kill between two commits never leaves half a document committed (the next run would redo the
            // document and duplicate the committed half). Rows finish out of order in a stream: those of a
            // document still in progress wait in `held` until all of them are in.
            let (ready, collapsed) = held.add(records, self.schema.as_ref());
            // A document's retry rows became one document-level retry row, a document's windows its one row: the
            // tally follows what is written.
            tally.rows -= collapsed.removed_ok + collapsed.removed_failed;
            tally.ok -= collapsed.removed_ok;
            tally.failed -= collapsed.removed_failed;
            tally.rows += collapsed.added + collapsed.added_ok;
            tally.failed += collapsed.added;
            tally.ok += collapsed.added_ok;
            if !ready.is_empty() {
                let finished = ready.iter().filter(|r| r.source.doc_rows.is_some()).count();
                self.progress
                    .documents_done
                    .fetch_add(finished, Ordering::Relaxed);
                let t = Instant::now();
                // A row whose values do not convert is an error row of its own, not a failed run.
                let (batch, replaced) =
                    to_record_batch_per_row(self.schema.as_ref(), &self.ctx, &ready)
                        .map_err(PipelineError::Rows)?;
                if replaced > 0 {
                    tally.ok = tally.ok.saturating_sub(replaced);
                    tally.failed += replaced;
                    self.reporter.event(
                        "warn",
                        "rows_not_convertible",
                        || format!("{replaced} answer(s) did not fit the output columns: written as error rows"),
                        serde_json::json!({"rows": replaced}),
                    );
                }
                self.sink.write_unit(&batch).await?;
                self.progress.add_busy(Stage::Write, t.elapsed());
            }
            if failure.is_none()
                && tally.rows >= self.limits.failure_min_docs
                && tally.failed as f64 > self.limits.max_failed_share * tally.rows as f64
            {
                failure = Some(format!(
                    "failure budget exceeded: {} of {} rows failed (limit {:.0}%)",
                    tally.failed,
                    tally.rows,
                    self.limits.max_failed_share * 100.0
                ));
                self.abort.store(true, Ordering::SeqCst);
            }
        }
        for (uri, rows) in held.incomplete() {
            // Only when the run stopped inside a document: its rows are left out so that the next run, which
            // redoes the whole document, writes each page exactly once.
            self.reporter.event(
                "warn",
                "document_incomplete",
                || format!("{uri}: stopped before its last page; left for the next run ({rows} rows not written)"),
                serde_json::json!({"uri": uri, "rows": rows}),
            );
        }
        Ok(Written {
            sink: self.sink,
            tally,
            failure,
        })
    }
}

/// What [`retry_whole`] changed: rows taken out (by outcome) and document-level retry rows put in.
#[derive(Default)]
struct Collapsed {
    removed_ok: usize,
    removed_failed: usize,
    /// Failed rows put in.
    added: usize,
    added_ok: usize,
}

impl Collapsed {
    /// Counts rows taken out of what is written, by outcome.
    fn take_out(&mut self, rows: &[ExtractionRecord]) {
        for r in rows {
            if r.is_ok() {
                self.removed_ok += 1;
            } else {
                self.removed_failed += 1;
            }
        }
    }
}

/// Document mode: a complete document's rows (its windows) become its one row ([`merge_document`]).
fn merge_whole(
    rows: Vec<ExtractionRecord>,
    schema: Option<&ExtractionSchema>,
    collapsed: &mut Collapsed,
) -> Vec<ExtractionRecord> {
    if rows.len() < 2 {
        return rows;
    }
    collapsed.take_out(&rows);
    let Some(merged) = merge_document(schema, rows) else {
        return Vec::new();
    };
    if merged.is_ok() {
        collapsed.added_ok += 1;
    } else {
        collapsed.added += 1;
    }
    vec![merged]
}

/// A complete document with a `retry` row (a transient failure of some of its pages) is written as one
/// document-level retry row: the next run redoes the whole document once, its attempts counted, instead of the
/// state taking the document as done without those pages, or the other pages being written twice.
fn retry_whole(rows: Vec<ExtractionRecord>, collapsed: &mut Collapsed) -> Vec<ExtractionRecord> {
    let Some(retry) = rows
        .iter()
        .find(|r| r.source.attempt.is_some() && !r.is_ok())
    else {
        return rows;
    };
    let mut source = retry.source.clone();
    let (start, end) = (source.page_start, source.page_end);
    source.page_start = 0;
    source.page_end = 0;
    source.doc_rows = Some(1);
    let kind = retry.error_kind.unwrap_or(ErrorKind::Generation);
    let error = format!(
        "pages {start}-{end}: {} (the whole document is left for the next run)",
        retry.error_message().unwrap_or("failed")
    );
    collapsed.take_out(&rows);
    collapsed.added += 1;
    vec![ExtractionRecord::failed(source, kind, error)]
}

/// Rows of documents not yet complete, by document URI.
#[derive(Default)]
struct Documents {
    /// Document mode: each complete document is merged into one row.
    per_document: bool,
    rows: HashMap<String, Vec<ExtractionRecord>>,
    /// Row counts of documents whose last row (the one carrying `doc_rows`) has come.
    expected: HashMap<String, usize>,
}

impl Documents {
    /// Takes rows in any order; returns the rows of every document now complete, each document's rows together,
    /// in page order, and what replacing retry rows changed.
    fn add(
        &mut self,
        records: Vec<ExtractionRecord>,
        schema: Option<&ExtractionSchema>,
    ) -> (Vec<ExtractionRecord>, Collapsed) {
        let mut collapsed = Collapsed::default();
        let mut touched = Vec::new();
        for r in records {
            let uri = r.source.uri.clone();
            if let Some(n) = r.source.doc_rows {
                self.expected.insert(uri.clone(), n as usize);
            }
            self.rows.entry(uri.clone()).or_default().push(r);
            if !touched.contains(&uri) {
                touched.push(uri);
            }
        }
        let mut ready = Vec::new();
        for uri in touched {
            let have = self.rows.get(&uri).map_or(0, Vec::len);
            // `>=`: a URI listed twice in one run (a listing error's "?") must not hold its rows forever.
            if self.expected.get(&uri).is_some_and(|&n| have >= n) {
                self.expected.remove(&uri);
                let mut rows = self.rows.remove(&uri).unwrap_or_default();
                // Page order, a document-level error row (page 0) after the pages before it.
                rows.sort_by_key(|r| (r.source.page_start == 0, r.source.page_start));
                let rows = retry_whole(rows, &mut collapsed);
                if self.per_document {
                    ready.extend(merge_whole(rows, schema, &mut collapsed));
                } else {
                    ready.extend(rows);
                }
            }
        }
        (ready, collapsed)
    }

    /// Documents left incomplete, with their rows held.
    fn incomplete(&self) -> Vec<(String, usize)> {
        let mut left: Vec<(String, usize)> = self
            .rows
            .iter()
            .map(|(uri, rows)| (uri.clone(), rows.len()))
            .collect();
        left.sort();
        left
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extract::SourceInfo;

    fn row(page: u32, attempt: Option<u32>, doc_rows: Option<u32>) -> ExtractionRecord {
        let source = SourceInfo {
            uri: "s3://b/inv.pdf".into(),
            page_start: page,
            page_end: page,
            doc_page_count: Some(3),
            attempt,
            doc_rows,
            ..SourceInfo::default()
        };
        ExtractionRecord::failed(
            source,
            ErrorKind::Generation,
            "generation: ONNX Runtime failed",
        )
    }

    #[test]
    fn a_document_commits_once_all_its_rows_are_in_whatever_their_order() {
        let mut docs = Documents::default();
        // Page 3 (the last input, carrying the row count) finishes first.
        let (ready, _) = docs.add(vec![row(3, None, Some(3))], None);
        assert!(ready.is_empty());
        let (ready, _) = docs.add(vec![row(1, None, None)], None);
        assert!(ready.is_empty());
        let (ready, _) = docs.add(vec![row(2, None, None)], None);
        let pages: Vec<u32> = ready.iter().map(|r| r.source.page_start).collect();
        assert_eq!(pages, vec![1, 2, 3]);
        assert!(docs.incomplete().is_empty());
    }

    /// Document mode: the windows of a document (arriving out of order) become one row over all its pages.
    #[test]
    fn document_mode_writes_one_row_per_document_from_its_windows() {
        let schema = ExtractionSchema::from_value(
            "s",
            serde_json::json!({
                "type": "object",
                "properties": {
                    "invoice_id": {"type": ["string", "null"]},
                    "invoice_total": {"type": ["number", "null"]},
                    "items": {"type": "array", "items": {"type": "string"}}
                },
                "required": ["invoice_id", "invoice_total", "items"],
                "additionalProperties": false
            }),
        )
        .expect("schema");
        let window = |start: u32, end: u32, text: &str, doc_rows: Option<u32>| {
            let mut r = row(start, None, doc_rows);
            r.source.page_end = end;
            r.source.doc_page_count = Some(4);
            r.outcome =
                crate::extract::Outcome::Extracted(crate::extract::answer::parse(text).unwrap());
            r.error_kind = None;
            r.prompt_tokens = Some(100);
            r
        };
        let mut docs = Documents {
            per_document: true,
            ..Documents::default()
        };
        let (ready, collapsed) = docs.add(
            vec![
                window(
                    3,
                    4,
                    r#"{"invoice_id": null, "invoice_total": 12.50, "items": ["c"]}"#,
                    Some(2),
                ),
                window(
                    1,
                    2,
                    r#"{"invoice_id": "INV-1", "invoice_total": null, "items": ["a", "b"]}"#,
                    None,
                ),
            ],
            Some(&schema),
        );
        assert_eq!(ready.len(), 1, "{ready:?}");
        let r = &ready[0];
        assert!(r.is_ok(), "{r:?}");
        assert_eq!((r.source.page_start, r.source.page_end), (1, 4));
        assert_eq!(r.prompt_tokens, Some(200));
        let crate::extract::Outcome::Extracted(answer) = &r.outcome else {
            panic!("{r:?}")
        };
        assert_eq!(
            answer.to_value(),
            serde_json::json!({"invoice_id": "INV-1", "invoice_total": 12.50, "items": ["a", "b", "c"]})
        );
        assert_eq!(
            (collapsed.removed_ok, collapsed.added_ok, collapsed.added),
            (2, 1, 0)
        );
    }

    #[test]
    fn a_document_with_a_retry_row_is_written_as_one_document_level_retry_row() {
        let mut docs = Documents::default();
        let (ready, collapsed) = docs.add(
            vec![
                row(1, Some(1), None),
                row(2, None, None),
                row(3, None, Some(3)),
            ],
            None,
        );
        assert_eq!(ready.len(), 1, "{ready:?}");
        let r = &ready[0];
        assert_eq!((r.source.page_start, r.source.attempt), (0, Some(1)));
        assert!(r.is_retry(), "{r:?}");
        assert!(
            r.error_message().unwrap_or("").contains("pages 1-1"),
            "{r:?}"
        );
        assert_eq!(
            (
                collapsed.removed_ok,
                collapsed.removed_failed,
                collapsed.added
            ),
            (0, 3, 1)
        );
    }
}
