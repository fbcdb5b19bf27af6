//! Source + raster + preprocess, feeding the model stage: lists documents, leaves out those of other shards and
//! those already in the output, fetches a bounded number ahead, rasterizes them, groups pages into prompts and
//! prepares their pixels. A document that fails becomes an error input, never a gap.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use image::DynamicImage;
use tokio::sync::mpsc;

use super::report::{Progress, Reporter, Stage};
use super::{ModelInput, PipelineError, PipelineSpec, shard_of, state};
use crate::document::{DocumentInfo, FetchError};
use crate::extract::{ErrorKind, FailedInput, PageInput, SourceInfo};
use crate::model::ImagePreprocessor;
use crate::raster::{PdfMode, RasterError, RasterOptions, Rasterizer};
use crate::source::{ListOptions, Source, SourceError};

/// How many runs try a document that keeps failing for transient reasons before its failure is recorded as
/// permanent (so a file that always crashes the renderer is not retried forever).
pub const MAX_ATTEMPTS: u32 = 3;

/// A transient failure of a document whose earlier runs failed `source.prior_attempts` times: a `retry` row (its
/// attempt counted) until the attempts run out, then a permanent error whose text says so. One rule for fetch,
/// raster and model failures.
pub(super) fn mark_transient(source: &mut SourceInfo, error: &mut String) {
    let attempt = source.prior_attempts + 1;
    if attempt < MAX_ATTEMPTS {
        source.attempt = Some(attempt);
    } else {
        error.push_str(&format!(
            " (transient, but failed {attempt} attempts: recorded as failed)"
        ));
    }
}

/// Which listed documents this run leaves alone.
pub(super) struct SkipRules {
    pub processed: Arc<state::ProcessedSet>,
    pub schema_sha: String,
    pub model_id: String,
    pub shard: Option<(u64, u64)>,
}

/// Lists, fetches and rasterizes documents, groups pages into prompts and prepares their pixels.
/// Returns (documents, documents failed, pages, documents skipped as already processed).
pub(super) async fn produce(
    spec: &PipelineSpec,
    image: &crate::model::manifest::ImageConfig,
    skip: &SkipRules,
    progress: Arc<Progress>,
    reporter: Reporter,
    model_tx: mpsc::Sender<ModelInput>,
    abort: Arc<AtomicBool>,
) -> Result<(usize, usize, usize, usize), PipelineError> {
    let source = Source::open(&spec.source.uri)?;
    let r = &spec.raster;
    let max_side = r.view_side(image.max_image_size) as u32;
    let opts = RasterOptions {
        max_side,
        max_dpi: r.max_dpi,
        password: r
            .password_env
            .as_deref()
            .and_then(|k| std::env::var(k).ok()),
        max_bytes: r.max_bytes,
        max_pages: r.max_pages as usize,
        max_pixels: r.max_pixels,
    };
    let mode = PdfMode::workers(r.workers, Duration::from_secs(r.timeout_s.max(1)))?;
    let rasterizer = Rasterizer::new(opts, mode)?;
    // The size limit is applied below, where the listed document (and its ETag) is at hand: its error row then
    // carries the ETag, and the next run recognises it as done instead of adding a new error row every night.
    let list = ListOptions {
        include: spec.source.include.clone(),
        exclude: spec.source.exclude.clone(),
        max_bytes: u64::MAX,
    };
    // Listed documents whose fetch failed, by URI: their error rows carry the listing's ETag and version.
    let failed_docs: Arc<std::sync::Mutex<HashMap<String, DocumentInfo>>> = Arc::default();
    // Listing -> shard and already-done filters (before any fetch) -> bounded concurrent fetches.
    let skipped = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // A listing that cannot go on ends the document stream here; the run fails once the documents before it are
    // done (no `_SUCCESS`). Errors of single entries flow on and become error rows.
    let (listing, fatal) = crate::source::stop_at_fatal(source.list(&list)?);
    let (processed, schema_sha, model_id, shard) = (
        skip.processed.clone(),
        skip.schema_sha.clone(),
        skip.model_id.clone(),
        skip.shard,
    );
    let skipped_count = skipped.clone();
    let fetch_source = source.clone();
    let max_bytes = r.max_bytes;
    // Whether this run processes a listed document: in its shard and not already in the output.
    let done_processed = processed.clone();
    let done_keys = (schema_sha.clone(), model_id.clone());
    // Whether an entry that failed in the listing (no ETag) is already recorded as failed for good.
    let entry_done = move |e: &SourceError| -> bool {
        e.uri().is_some_and(|uri| {
            let in_shard = shard.is_none_or(|(i, n)| shard_of(uri, n) == i);
            !in_shard
                || done_processed.contains(&state::doc_key(
                    uri,
                    None,
                    None,
                    &done_keys.0,
                    &done_keys.1,
                ))
        })
    };
    let wanted = Arc::new(move |doc: &DocumentInfo| -> (bool, bool) {
        let in_shard = shard.is_none_or(|(i, n)| shard_of(&doc.uri, n) == i);
        let key = state::doc_key(
            &doc.uri,
            doc.etag.as_deref(),
            doc.version.as_deref(),
            &schema_sha,
            &model_id,
        );
        let done = in_shard && processed.contains(&key);
        (in_shard && !done, done)
    });
    // A second, counting pass over the listing gives the progress display its total (and so an ETA) without
    // holding the listing in memory; it ends with the listing (one LIST request per 1,000 keys on S3).
    let counting = {
        let (wanted, progress) = (wanted.clone(), progress.clone());
        let counted = source.list(&list)?;
        tokio::spawn(async move {
            let mut n = 0;
            let mut counted = std::pin::pin!(counted);
            while let Some(item) = counted.next().await {
                if item.as_ref().map_or(true, |doc| wanted(doc).0) {
                    n += 1;
                }
            }
            progress.set_total(n);
        })
    };
    let fetched = listing
        .filter(move |item| {
            let keep = match item {
                Err(e) => {
                    let done = entry_done(e);
                    if done {
                        skipped_count.fetch_add(1, Ordering::SeqCst);
                    }
                    !done
                }
                Ok(doc) => {
                    let (keep, done) = wanted(doc);
                    if done {
                        skipped_count.fetch_add(1, Ordering::SeqCst);
                    }
                    keep
                }
            };
            futures::future::ready(keep)
        })
        .map({
            let progress = progress.clone();
            let failed_docs = failed_docs.clone();
            move |item| {
                let source = fetch_source.clone();
                let progress = progress.clone();
                let failed_docs = failed_docs.clone();
                async move {
                    let item = match item {
                        Ok(doc) if doc.size > max_bytes => Err((
                            doc.clone(),
                            SourceError::TooLarge {
                                uri: doc.uri.clone(),
                                size: doc.size,
                                limit: max_bytes,
                            },
                        )),
                        Ok(doc) => Ok(doc),
                        Err(e) => return Err(e),
                    };
                    let fetched = match item {
                        // A task of its own: the fetch runs to completion while the consumer is busy (the
                        // `buffered` window is a prefetch), and its time is the fetch's, not the wait for a poll.
                        Ok(doc) => {
                            let uri = doc.uri.clone();
                            let doc_for_error = doc.clone();
                            tokio::spawn(async move {
                                let t = Instant::now();
                                let fetched = source.fetch_as_listed(&doc, max_bytes).await;
                                progress.add_busy(Stage::Fetch, t.elapsed());
                                fetched
                            })
                            .await
                            .unwrap_or_else(|e| {
                                Err(SourceError::Fetch {
                                    uri,
                                    reason: format!("fetch task failed: {e}"),
                                })
                            })
                            .map_err(|e| (doc_for_error, e))
                        }
                        Err(failed) => Err(failed),
                    };
                    fetched.map_err(|(doc, e)| {
                        if let Ok(mut m) = failed_docs.lock() {
                            m.insert(doc.uri.clone(), doc);
                        }
                        e
                    })
                }
            }
        })
        .buffered(spec.source.fetch_concurrency.max(1))
        .map(|item| item.map_err(|e| RasterError::from(FetchError::from(e))));
    // Scans reach the model unscaled; `[raster] max_side` is the long side of the model's view for them too (run.rs
    // checked it is not above the model's own image size).
    let mut preprocessor = ImagePreprocessor::from_config(image);
    preprocessor.max_side = max_side as usize;
    let per_prompt = spec.extract.pages_per_prompt.max(1);
    let (mut documents, mut failed, mut pages) = (0usize, 0usize, 0usize);
    let mut docs = std::pin::pin!(rasterizer.documents(fetched, r.workers.max(1)));
    while let Some(mut doc) = docs.next().await {
        if abort.load(Ordering::SeqCst)
            || (spec.limits.max_documents > 0 && documents >= spec.limits.max_documents)
        {
            break;
        }
        documents += 1;
        progress.documents.store(documents, Ordering::Relaxed);
        // A document whose fetch failed: its listed provenance (ETag, version) rather than just its name.
        let listed = failed_docs
            .lock()
            .ok()
            .and_then(|mut m| m.remove(&doc.doc.uri));
        let info = listed.map(Arc::new).unwrap_or_else(|| doc.doc.clone());
        let prior_attempts = skip.processed.attempts(&state::doc_key(
            &info.uri,
            info.etag.as_deref(),
            info.version.as_deref(),
            &skip.schema_sha,
            &skip.model_id,
        ));
        let source_info = |start: usize, end: usize, count: Option<usize>| SourceInfo {
            uri: info.uri.clone(),
            etag: info.etag.clone(),
            version: info.version.clone(),
            page_start: start as u32,
            page_end: end as u32,
            doc_page_count: count.map(|c| c as u32),
            attempt: None,
            doc_rows: None,
            prior_attempts,
        };
        let mut group = Vec::new();
        let mut group_start = 1;
        let mut render = Duration::ZERO;
        // Each input waits here until the next one of its document is known, so that the last one goes out marked
        // with the document's row count: the writer commits a document only once it holds all its rows.
        let mut held = DocumentInputs::default();
        // Whether the page stream ended as a document ends: at its last page, or with its error.
        let mut ended = false;
        // Counted once among the failed documents, however many of its pages failed.
        let mut doc_failed = false;
        while let Some(item) = doc.pages.recv().await {
            match item {
                Ok(page) => {
                    pages += 1;
                    progress.pages.store(pages, Ordering::Relaxed);
                    render += page.render_time;
                    progress.add_busy(Stage::Raster, page.render_time);
                    let (index, count, last) = (page.page_index, page.page_count, page.is_last());
                    if group.is_empty() {
                        group_start = index + 1;
                    }
                    let pre = preprocessor.clone();
                    let (prepared, took) = tokio::task::spawn_blocking(move || {
                        let t = Instant::now();
                        let prepared = pre.prepare(&DynamicImage::ImageRgb8(page.image));
                        (prepared, t.elapsed())
                    })
                    .await
                    .map_err(|source| PipelineError::Task {
                        what: "preprocessing",
                        source,
                    })?;
                    progress.add_busy(Stage::Preprocess, took);
                    match prepared {
                        Ok(p) => group.push(p),
                        Err(e) => {
                            let input = Err(FailedInput {
                                source: source_info(index + 1, index + 1, Some(count)),
                                kind: ErrorKind::Image,
                                error: crate::error::chain(&e),
                            });
                            held.push(&model_tx, input).await?;
                        }
                    }
                    // The group goes out when full or at the document's last page, whether or not that page
                    // itself could be prepared (the group's earlier pages always get their row).
                    ended |= last;
                    if !group.is_empty() && (group.len() == per_prompt || last) {
                        let input = PageInput {
                            source: source_info(group_start, index + 1, Some(count)),
                            images: std::mem::take(&mut group),
                            fetch_ms: None,
                            raster_ms: Some(render.as_secs_f64() * 1e3),
                        };
                        render = Duration::ZERO;
                        held.push(&model_tx, Ok(input)).await?;
                    }
                }
                Err(e) if e.failed_page().is_some() => {
                    // One page failed; the document's next pages still come. The group so far goes out first
                    // (its row never spans the failed page), then the page's own error row.
                    let (page, count) = e.failed_page().unwrap_or((1, 1));
                    if !group.is_empty() {
                        let input = PageInput {
                            source: source_info(group_start, page - 1, Some(count)),
                            images: std::mem::take(&mut group),
                            fetch_ms: None,
                            raster_ms: Some(render.as_secs_f64() * 1e3),
                        };
                        render = Duration::ZERO;
                        held.push(&model_tx, Ok(input)).await?;
                    }
                    if !doc_failed {
                        doc_failed = true;
                        failed += 1;
                        progress.failed.store(failed, Ordering::Relaxed);
                    }
                    let error = crate::error::chain(&e);
                    reporter.event(
                        "warn",
                        "page_failed",
                        || format!("page failed: {}", error.escape_debug()),
                        serde_json::json!({"uri": info.uri, "page": page, "error": error}),
                    );
                    let failed = FailedInput {
                        source: source_info(page, page, Some(count)),
                        kind: error_kind(&e),
                        error,
                    };
                    held.push(&model_tx, Err(failed)).await?;
                    ended |= page >= count;
                }
                Err(e) => {
                    ended = true;
                    if !doc_failed {
                        failed += 1;
                        progress.failed.store(failed, Ordering::Relaxed);
                    }
                    let mut error = crate::error::chain(&e);
                    // A transient failure is left not done (status `retry`) until its attempts run out.
                    let mut row = source_info(0, 0, None);
                    if e.is_transient() {
                        mark_transient(&mut row, &mut error);
                    }
                    reporter.event(
                        "warn",
                        "document_failed",
                        // Names are printed escaped (a tab or newline in a name must not forge log lines).
                        || format!("document failed: {}", error.escape_debug()),
                        serde_json::json!({"uri": info.uri, "error": error}),
                    );
                    let failed = FailedInput {
                        source: row,
                        kind: error_kind(&e),
                        error,
                    };
                    held.push(&model_tx, Err(failed)).await?;
                    break;
                }
            }
        }
        if !ended {
            // The renderer's stream closed before the last page (its task died): the document must not be
            // committed as complete. A transient failure of the whole document, retried by the next run.
            let mut row = source_info(0, 0, None);
            let mut error = format!(
                "{}: the renderer stopped before the document's last page",
                info.uri.escape_debug()
            );
            mark_transient(&mut row, &mut error);
            let failed = FailedInput {
                source: row,
                kind: ErrorKind::Renderer,
                error,
            };
            held.push(&model_tx, Err(failed)).await?;
        }
        held.finish(&model_tx).await?;
    }
    counting.abort();
    let fatal = fatal.lock().ok().and_then(|mut f| f.take());
    if let Some(e) = fatal {
        return Err(PipelineError::Source(e));
    }
    Ok((documents, failed, pages, skipped.load(Ordering::SeqCst)))
}

/// The `error_kind` of a document the raster stage (or the fetch before it) could not turn into pages.
fn error_kind(e: &RasterError) -> ErrorKind {
    match e {
        RasterError::Fetch(FetchError::TooLarge { .. })
        | RasterError::TooLarge { .. }
        | RasterError::TooManyPages { .. }
        | RasterError::TooManyPixels { .. } => ErrorKind::Limit,
        RasterError::Fetch(FetchError::Failed { .. } | FetchError::Unavailable { .. }) => {
            ErrorKind::Storage
        }
        RasterError::UnknownFormat { .. } => ErrorKind::Unsupported,
        RasterError::PasswordRequired { .. } | RasterError::WrongPassword { .. } => {
            ErrorKind::Encrypted
        }
        RasterError::Empty { .. }
        | RasterError::BadShape { .. }
        | RasterError::PdfUnreadable { .. }
        | RasterError::PdfPage { .. }
        | RasterError::Decode { .. } => ErrorKind::Unreadable,
        RasterError::WorkerCrashed { .. }
        | RasterError::Timeout { .. }
        | RasterError::Renderer { .. } => ErrorKind::Renderer,
    }
}

/// One document's inputs on their way to the model stage, the latest held back until it is known whether it is the
/// document's last.
#[derive(Default)]
struct DocumentInputs {
    last: Option<ModelInput>,
    sent: u32,
}

impl DocumentInputs {
    /// Sends the input held so far and holds `input`.
    async fn push(
        &mut self,
        tx: &mpsc::Sender<ModelInput>,
        input: ModelInput,
    ) -> Result<(), PipelineError> {
        if let Some(before) = self.last.replace(input) {
            self.sent += 1;
            send(tx, before).await?;
        }
        Ok(())
    }

    /// The document is over: its last input goes out with the document's row count.
    async fn finish(mut self, tx: &mpsc::Sender<ModelInput>) -> Result<(), PipelineError> {
        let Some(mut last) = self.last.take() else {
            return Ok(());
        };
        let rows = Some(self.sent + 1);
        match &mut last {
            Ok(page) => page.source.doc_rows = rows,
            Err(failed) => failed.source.doc_rows = rows,
        }
        send(tx, last).await
    }
}

async fn send(tx: &mpsc::Sender<ModelInput>, input: ModelInput) -> Result<(), PipelineError> {
    tx.send(input)
        .await
        .map_err(|_| PipelineError::Stopped("the model stage stopped early"))
}
