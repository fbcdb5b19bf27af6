//! Source + raster + preprocess, feeding the model stage: lists documents, leaves out those of other shards and
//! those already in the output, fetches a bounded number ahead, rasterizes them, groups pages into prompts and
//! prepares their pixels. A document that fails becomes an error input, never a gap.

use crate::error::Retryable;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use image::{DynamicImage, RgbImage};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::report::{Progress, Reporter, Stage};
use super::{ModelInput, PipelineError, PipelineSpec, shard_of, state};
use crate::document::{DocumentInfo, FetchError};
use crate::extract::{ErrorKind, FailedInput, PageInput, SourceInfo};
use crate::model::manifest::{ImageConfig, ModelManifest};
use crate::model::{ImagePreprocessor, ModelError, PreparedImage};
use crate::raster::text::TextLayer;
use crate::raster::{PageRaster, PdfMode, RasterError, RasterOptions, Rasterizer};
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
#[derive(Clone)]
pub(super) struct SkipRules {
    pub processed: Arc<state::ProcessedSet>,
    pub schema_sha: String,
    pub model_id: String,
    pub shard: Option<(u64, u64)>,
}

impl SkipRules {
    fn in_shard(&self, uri: &str) -> bool {
        self.shard.is_none_or(|(i, n)| shard_of(uri, n) == i)
    }

    /// Whether this run processes a listed document: in its shard and not already in the output.
    /// Returns (processed by this run, left out as already in the output).
    fn wanted(&self, doc: &DocumentInfo) -> (bool, bool) {
        let in_shard = self.in_shard(&doc.uri);
        let key = state::doc_key(
            &doc.uri,
            doc.etag.as_deref(),
            doc.version.as_deref(),
            &self.schema_sha,
            &self.model_id,
        );
        let done = in_shard && self.processed.contains(&key);
        (in_shard && !done, done)
    }

    /// Whether an entry that failed in the listing (no ETag) is already recorded as failed for good.
    fn entry_done(&self, e: &SourceError) -> bool {
        e.uri().is_some_and(|uri| {
            !self.in_shard(uri)
                || self.processed.contains(&state::doc_key(
                    uri,
                    None,
                    None,
                    &self.schema_sha,
                    &self.model_id,
                ))
        })
    }

    /// Whether a listing item goes on to be fetched; one left out as already done is counted in `skipped`.
    fn keeps(&self, item: &Result<DocumentInfo, SourceError>, skipped: &AtomicUsize) -> bool {
        match item {
            Err(e) => {
                let done = self.entry_done(e);
                if done {
                    skipped.fetch_add(1, Ordering::SeqCst);
                }
                !done
            }
            Ok(doc) => {
                let (keep, done) = self.wanted(doc);
                if done {
                    skipped.fetch_add(1, Ordering::SeqCst);
                }
                keep
            }
        }
    }

    /// Transient failures earlier runs recorded for the document (its rows carry them, for [`mark_transient`]).
    fn prior_attempts(&self, info: &DocumentInfo) -> u32 {
        self.processed.attempts(&state::doc_key(
            &info.uri,
            info.etag.as_deref(),
            info.version.as_deref(),
            &self.schema_sha,
            &self.model_id,
        ))
    }
}

/// Lists, fetches and rasterizes documents, groups pages into prompts and prepares their pixels.
/// Returns (documents, documents failed, pages, documents skipped as already processed).
/// What the prompts are made of: the model's image settings and image-token layout (its manifest) and, in document
/// mode, the image tokens a window of pages may hold.
pub(super) struct PromptShape<'a> {
    pub manifest: &'a ModelManifest,
    pub window_tokens: Option<usize>,
}

pub(super) async fn produce(
    spec: &PipelineSpec,
    shape: PromptShape<'_>,
    skip: &SkipRules,
    progress: Arc<Progress>,
    reporter: Reporter,
    model_tx: mpsc::Sender<ModelInput>,
    abort: Arc<AtomicBool>,
) -> Result<(usize, usize, usize, usize), PipelineError> {
    let (image, window_tokens) = (&shape.manifest.image, shape.window_tokens);
    let source = Source::open(&spec.source.uri)?;
    let (rasterizer, max_side) = build_rasterizer(spec, image)?;
    let failed_docs = FailedFetches::default();
    let listing = listing(spec, &source, skip, &progress)?;
    let fetched = fetch_ahead(listing.documents, &source, spec, &progress, &failed_docs);
    let mut feed = PageFeed::new(
        spec,
        shape.manifest,
        max_side,
        &progress,
        reporter,
        &model_tx,
    );
    feed.window_tokens = window_tokens;
    let mut documents = 0usize;
    let mut docs = std::pin::pin!(rasterizer.documents(fetched, spec.raster.workers.max(1)));
    while let Some(mut doc) = docs.next().await {
        if abort.load(Ordering::SeqCst)
            || (spec.limits.max_documents > 0 && documents >= spec.limits.max_documents)
        {
            break;
        }
        documents += 1;
        progress.documents.store(documents, Ordering::Relaxed);
        let info = listed_info(&failed_docs, &doc.doc);
        let prior_attempts = skip.prior_attempts(&info);
        DocumentFeed::new(&mut feed, info, prior_attempts)
            .feed(&mut doc.pages)
            .await?;
    }
    listing.counting.abort();
    let fatal = listing.fatal.lock().ok().and_then(|mut f| f.take());
    if let Some(e) = fatal {
        return Err(PipelineError::Source(e));
    }
    let skipped = listing.skipped.load(Ordering::SeqCst);
    Ok((documents, feed.failed, feed.pages, skipped))
}

/// The rasterizer `[raster]` describes, and the long side of the model's view it renders at (the preprocessor's
/// limit for scans too).
fn build_rasterizer(
    spec: &PipelineSpec,
    image: &ImageConfig,
) -> Result<(Rasterizer, u32), PipelineError> {
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
        text_layer: spec.extract.grounding && spec.extract.mode.as_deref() != Some("free-text"),
    };
    let mode = PdfMode::workers(r.workers, Duration::from_secs(r.timeout_s.max(1)))?;
    let rasterizer = Rasterizer::new(opts, mode)?;
    Ok((rasterizer, max_side))
}

/// Listed documents whose fetch failed, by URI: their error rows carry the listing's ETag and version.
type FailedFetches = Arc<std::sync::Mutex<HashMap<String, DocumentInfo>>>;

/// The listing this run works through, and what `produce` reads from it once the documents are done.
struct Listing<S> {
    /// Listing -> shard and already-done filters (before any fetch).
    documents: S,
    /// Where a listing that cannot go on leaves its error.
    fatal: Arc<std::sync::Mutex<Option<SourceError>>>,
    /// The counting pass ([`count_wanted`]), stopped once the documents are done.
    counting: JoinHandle<()>,
    /// Documents left out as already in the output.
    skipped: Arc<AtomicUsize>,
}

/// Lists the source's documents, leaving out (before any fetch) those of other shards and those already done, and
/// starts the counting pass for the progress display.
fn listing(
    spec: &PipelineSpec,
    source: &Source,
    skip: &SkipRules,
    progress: &Arc<Progress>,
) -> Result<Listing<impl Stream<Item = Result<DocumentInfo, SourceError>> + use<>>, PipelineError> {
    // The size limit is applied in `fetch_listed`, where the listed document (and its ETag) is at hand: its error
    // row then carries the ETag, and the next run recognises it as done instead of adding a new error row every
    // night.
    let list = ListOptions {
        include: spec.source.include.clone(),
        exclude: spec.source.exclude.clone(),
        max_bytes: u64::MAX,
    };
    let skipped = Arc::new(AtomicUsize::new(0));
    // A listing that cannot go on ends the document stream here; the run fails once the documents before it are
    // done (no `_SUCCESS`). Errors of single entries flow on and become error rows.
    let (listed, fatal) = crate::source::stop_at_fatal(source.list(&list)?);
    let rules = Arc::new(skip.clone());
    let counting = count_wanted(source.list(&list)?, rules.clone(), progress.clone());
    let skipped_count = skipped.clone();
    let documents =
        listed.filter(move |item| futures::future::ready(rules.keeps(item, &skipped_count)));
    Ok(Listing {
        documents,
        fatal,
        counting,
        skipped,
    })
}

/// A second, counting pass over the listing gives the progress display its total (and so an ETA) without
/// holding the listing in memory; it ends with the listing (one LIST request per 1,000 keys on S3).
fn count_wanted(
    counted: futures::stream::BoxStream<'static, Result<DocumentInfo, SourceError>>,
    rules: Arc<SkipRules>,
    progress: Arc<Progress>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut n = 0;
        let mut counted = std::pin::pin!(counted);
        while let Some(item) = counted.next().await {
            if item.as_ref().map_or(true, |doc| rules.wanted(doc).0) {
                n += 1;
            }
        }
        progress.set_total(n);
    })
}

/// Bounded concurrent fetches: up to `[source] fetch_concurrency` listed documents are fetched ahead of the
/// rasterizer, delivered in listing order.
fn fetch_ahead<S>(
    listed: S,
    source: &Source,
    spec: &PipelineSpec,
    progress: &Arc<Progress>,
    failed_docs: &FailedFetches,
) -> impl Stream<Item = Result<(DocumentInfo, Bytes), RasterError>> + use<S>
where
    S: Stream<Item = Result<DocumentInfo, SourceError>>,
{
    let fetch_source = source.clone();
    let max_bytes = spec.raster.max_bytes;
    let progress = progress.clone();
    let failed_docs = failed_docs.clone();
    listed
        .map(move |item| {
            let source = fetch_source.clone();
            let progress = progress.clone();
            let failed_docs = failed_docs.clone();
            fetch_listed(source, item, max_bytes, progress, failed_docs)
        })
        .buffered(spec.source.fetch_concurrency.max(1))
        .map(|item| item.map_err(|e| RasterError::from(FetchError::from(e))))
}

/// One listing item's bytes: a document over `max_bytes` fails without a fetch, and a document whose fetch failed
/// is noted in `failed_docs` (its error row then carries the listed ETag and version); the listing's own errors
/// pass through.
async fn fetch_listed(
    source: Source,
    item: Result<DocumentInfo, SourceError>,
    max_bytes: u64,
    progress: Arc<Progress>,
    failed_docs: FailedFetches,
) -> Result<(DocumentInfo, Bytes), SourceError> {
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

/// The document as its rows name it. A document whose fetch failed: its listed provenance (ETag, version) rather
/// than just its name.
fn listed_info(failed_docs: &FailedFetches, doc: &Arc<DocumentInfo>) -> Arc<DocumentInfo> {
    let listed = failed_docs.lock().ok().and_then(|mut m| m.remove(&doc.uri));
    listed.map(Arc::new).unwrap_or_else(|| doc.clone())
}

/// What every document's pages share on their way to the model stage (how they are prepared and grouped, where
/// they go), and the run's counts of failed documents and pages.
struct PageFeed<'a> {
    preprocessor: ImagePreprocessor,
    per_prompt: usize,
    /// Document mode: the image tokens one window of pages may hold (a window takes at least one page).
    window_tokens: Option<usize>,
    progress: &'a Progress,
    reporter: Reporter,
    model_tx: &'a mpsc::Sender<ModelInput>,
    failed: usize,
    pages: usize,
}

impl<'a> PageFeed<'a> {
    fn new(
        spec: &PipelineSpec,
        manifest: &ModelManifest,
        max_side: u32,
        progress: &'a Progress,
        reporter: Reporter,
        model_tx: &'a mpsc::Sender<ModelInput>,
    ) -> Self {
        // Scans reach the model unscaled; `[raster] max_side` is the long side of the model's view for them too
        // (run.rs checked it is not above the model's own image size).
        let mut preprocessor = ImagePreprocessor::for_model(manifest);
        preprocessor.max_side = max_side as usize;
        PageFeed {
            preprocessor,
            per_prompt: spec.extract.pages_per_prompt.max(1),
            window_tokens: None,
            progress,
            reporter,
            model_tx,
            failed: 0,
            pages: 0,
        }
    }

    /// Prepares a page's pixels on the blocking pool (CPU work that must not stall the async stages), its time
    /// counted as the preprocess stage's.
    async fn prepare(
        &self,
        image: RgbImage,
    ) -> Result<Result<PreparedImage, ModelError>, PipelineError> {
        let pre = self.preprocessor.clone();
        let (prepared, took) = tokio::task::spawn_blocking(move || {
            let t = Instant::now();
            let prepared = pre.prepare(&DynamicImage::ImageRgb8(image));
            (prepared, t.elapsed())
        })
        .await
        .map_err(|source| PipelineError::Task {
            what: "preprocessing",
            source,
        })?;
        self.progress.add_busy(Stage::Preprocess, took);
        Ok(prepared)
    }
}

/// One document's pages, as the renderer sends them, turned into model inputs: prepared pages grouped into prompts,
/// and an error row for each failed page or for the failed document.
struct DocumentFeed<'f, 'a> {
    feed: &'f mut PageFeed<'a>,
    info: Arc<DocumentInfo>,
    prior_attempts: u32,
    /// Prepared pages not yet sent, the first of them page `group_start` (1-based).
    group: Vec<PreparedImage>,
    /// The group's pages' numbers and text layers.
    group_text: Vec<(u32, Option<Arc<TextLayer>>)>,
    group_start: usize,
    /// Image tokens of the group (document mode's windows).
    group_tokens: usize,
    /// Render time of the group's pages.
    render: Duration,
    /// Each input waits here until the next one of its document is known, so that the last one goes out marked
    /// with the document's row count: the writer commits a document only once it holds all its rows.
    held: DocumentInputs,
    /// Whether the page stream ended as a document ends: at its last page, or with its error.
    ended: bool,
    /// Counted once among the failed documents, however many of its pages failed.
    doc_failed: bool,
}

impl<'f, 'a> DocumentFeed<'f, 'a> {
    fn new(feed: &'f mut PageFeed<'a>, info: Arc<DocumentInfo>, prior_attempts: u32) -> Self {
        DocumentFeed {
            feed,
            info,
            prior_attempts,
            group: Vec::new(),
            group_text: Vec::new(),
            group_start: 1,
            group_tokens: 0,
            render: Duration::ZERO,
            held: DocumentInputs::default(),
            ended: false,
            doc_failed: false,
        }
    }

    /// Takes the document's pages until its stream ends or the document fails, then sends its last input.
    async fn feed(
        mut self,
        pages: &mut mpsc::Receiver<Result<PageRaster, RasterError>>,
    ) -> Result<(), PipelineError> {
        while let Some(item) = pages.recv().await {
            match item {
                Ok(page) => self.page(page).await?,
                Err(e) if e.failed_page().is_some() => self.failed_page(&e).await?,
                Err(e) => {
                    self.failed(&e).await?;
                    break;
                }
            }
        }
        self.finish().await
    }

    /// A row's provenance: the document as listed, pages `start..=end` of `count` (0, 0: the whole document).
    fn source_info(&self, start: usize, end: usize, count: Option<usize>) -> SourceInfo {
        SourceInfo {
            uri: self.info.uri.clone(),
            etag: self.info.etag.clone(),
            version: self.info.version.clone(),
            page_start: start as u32,
            page_end: end as u32,
            doc_page_count: count.map(|c| c as u32),
            attempt: None,
            doc_rows: None,
            prior_attempts: self.prior_attempts,
        }
    }

    async fn push(&mut self, input: ModelInput) -> Result<(), PipelineError> {
        self.held.push(self.feed.model_tx, input).await
    }

    /// A rendered page: prepared, added to the group, and the group sent when full or at the document's last page.
    async fn page(&mut self, page: PageRaster) -> Result<(), PipelineError> {
        self.feed.pages += 1;
        self.feed
            .progress
            .pages
            .store(self.feed.pages, Ordering::Relaxed);
        self.render += page.render_time;
        self.feed.progress.add_busy(Stage::Raster, page.render_time);
        let (index, count, last) = (page.page_index, page.page_count, page.is_last());
        let text = page.text.clone();
        let prepared = self.feed.prepare(page.image).await?;
        // Document mode: a page that would overflow the window closes it first (pages before it go together).
        let tokens = prepared.as_ref().map_or(0, |p| p.grid.num_tokens());
        if let Some(window) = self.feed.window_tokens
            && !self.group.is_empty()
            && self.group_tokens + tokens > window
        {
            self.send_group(index, count).await?;
        }
        if self.group.is_empty() {
            self.group_start = index + 1;
        }
        match prepared {
            Ok(p) => {
                self.group_tokens += tokens;
                self.group.push(p);
                self.group_text.push((index as u32 + 1, text));
            }
            Err(e) => {
                let input = Err(FailedInput {
                    source: self.source_info(index + 1, index + 1, Some(count)),
                    kind: ErrorKind::Image,
                    error: crate::error::chain(&e),
                });
                self.push(input).await?;
            }
        }
        // The group goes out when full or at the document's last page, whether or not that page
        // itself could be prepared (the group's earlier pages always get their row).
        self.ended |= last;
        let full = self.feed.window_tokens.is_none() && self.group.len() == self.feed.per_prompt;
        if !self.group.is_empty() && (full || last) {
            self.send_group(index + 1, count).await?;
        }
        Ok(())
    }

    /// Sends the group, pages `group_start..=end` of `count`, as one prompt's input.
    async fn send_group(&mut self, end: usize, count: usize) -> Result<(), PipelineError> {
        let input = PageInput {
            source: self.source_info(self.group_start, end, Some(count)),
            images: std::mem::take(&mut self.group),
            text_layers: std::mem::take(&mut self.group_text),
            fetch_ms: None,
            raster_ms: Some(self.render.as_secs_f64() * 1e3),
        };
        self.render = Duration::ZERO;
        self.group_tokens = 0;
        self.push(Ok(input)).await
    }

    fn count_failed(&mut self) {
        if !self.doc_failed {
            self.doc_failed = true;
            self.feed.failed += 1;
            self.feed
                .progress
                .failed
                .store(self.feed.failed, Ordering::Relaxed);
        }
    }

    /// One page failed; the document's next pages still come. The group so far goes out first (its row never
    /// spans the failed page), then the page's own error row.
    async fn failed_page(&mut self, e: &RasterError) -> Result<(), PipelineError> {
        let (page, count) = e.failed_page().unwrap_or((1, 1));
        if !self.group.is_empty() {
            self.send_group(page - 1, count).await?;
        }
        self.count_failed();
        let error = crate::error::chain(e);
        self.feed.reporter.event(
            "warn",
            "page_failed",
            || format!("page failed: {}", error.escape_debug()),
            serde_json::json!({"uri": self.info.uri, "page": page, "error": error}),
        );
        let failed = FailedInput {
            source: self.source_info(page, page, Some(count)),
            kind: error_kind(e),
            error,
        };
        self.push(Err(failed)).await?;
        self.ended |= page >= count;
        Ok(())
    }

    /// The document failed as a whole (fetch, limits, unreadable, renderer): one error row for it, page 0, and no
    /// more of its pages.
    async fn failed(&mut self, e: &RasterError) -> Result<(), PipelineError> {
        self.ended = true;
        self.count_failed();
        let mut error = crate::error::chain(e);
        // A transient failure is left not done (status `retry`) until its attempts run out.
        let mut row = self.source_info(0, 0, None);
        if e.is_retryable() {
            mark_transient(&mut row, &mut error);
        }
        self.feed.reporter.event(
            "warn",
            "document_failed",
            // Names are printed escaped (a tab or newline in a name must not forge log lines).
            || format!("document failed: {}", error.escape_debug()),
            serde_json::json!({"uri": self.info.uri, "error": error}),
        );
        let failed = FailedInput {
            source: row,
            kind: error_kind(e),
            error,
        };
        self.push(Err(failed)).await
    }

    /// The page stream is over: the document's last input goes out, marked with its row count.
    async fn finish(mut self) -> Result<(), PipelineError> {
        if !self.ended {
            // The renderer's stream closed before the last page (its task died): the document must not be
            // committed as complete. A transient failure of the whole document, retried by the next run.
            let mut row = self.source_info(0, 0, None);
            let mut error = format!(
                "{}: the renderer stopped before the document's last page",
                self.info.uri.escape_debug()
            );
            mark_transient(&mut row, &mut error);
            let failed = FailedInput {
                source: row,
                kind: ErrorKind::Renderer,
                error,
            };
            self.push(Err(failed)).await?;
        }
        self.held.finish(self.feed.model_tx).await
    }
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
