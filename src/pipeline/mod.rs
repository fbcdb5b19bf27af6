//! The job runner: source -> raster -> preprocess -> model (+ grammar) -> rows -> Parquet, as one stream.
//!
//! Stages are connected by bounded channels, so memory stays flat whatever the corpus size: listing and fetching
//! run ahead only as far as the raster stage takes documents, the raster stage only as far as the model takes
//! prompts. The model stage owns the engine on its own thread and forms batches from whatever prompts are ready.
//! Every document ends as rows: pages that rendered become extractions, a failure becomes an error row.

pub mod bench;
pub mod cli;
pub mod report;
pub mod spec;
pub mod state;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use image::DynamicImage;
use tokio::sync::mpsc;

use crate::extract::{
    ExtractionRecord, ExtractionSchema, Extractor, Mode, PageInput, RunContext, SourceInfo,
    to_record_batch,
};
use crate::model::runtime::Threads;
use crate::model::{
    BatchPolicy, Device, EngineOptions, GenerationConfig, ImagePreprocessor, ModelDir, OrtRuntime,
};
use crate::raster::{PdfMode, RasterError, RasterOptions, Rasterizer};
use crate::sink::{ParquetSink, SinkConfig, SinkTarget};
use crate::source::{ListOptions, Source};

pub use report::{LogFormat, StageBusy};
use report::{Progress, Reporter, Stage};
pub use spec::PipelineSpec;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("pipeline spec {}: {reason}", path.display())]
    Spec { path: PathBuf, reason: String },
    #[error("{stage}: {reason}")]
    Stage { stage: &'static str, reason: String },
}

fn stage<E: std::fmt::Display>(stage: &'static str) -> impl Fn(E) -> PipelineError {
    move |e| PipelineError::Stage {
        stage,
        reason: e.to_string(),
    }
}

/// What a run did; also stored in the output manifest.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RunSummary {
    pub run_id: String,
    pub pipeline: String,
    pub documents: usize,
    pub documents_failed: usize,
    /// Documents skipped because an earlier run's output already holds them (same ETag/version, schema, model).
    pub documents_skipped: usize,
    /// This run's shard (index, count) when sharded.
    pub shard: Option<(u64, u64)>,
    pub pages: usize,
    pub rows: usize,
    pub rows_ok: usize,
    pub rows_failed: usize,
    pub prompt_tokens: u64,
    pub generated_tokens: u64,
    pub seconds: f64,
    pub pages_per_second: f64,
    pub model_busy_seconds: f64,
    /// Busy time per stage (fetch, raster, preprocess, model, write) and its share of the wall time.
    pub stages: Vec<StageBusy>,
    pub aborted: Option<String>,
    pub output: String,
    pub files: Vec<String>,
}

/// Inputs for the model stage: one prompt's pages, or a document that failed before the model.
type ModelInput = Result<PageInput, (SourceInfo, String)>;

/// How this invocation relates to other runs over the same input and output.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Reprocess documents the output already holds.
    pub force: bool,
    /// Process only documents whose stable URI hash falls in shard `index` of `count`.
    pub shard: Option<(u64, u64)>,
    /// How progress and events are reported on stderr.
    pub log: LogFormat,
}

/// The shard a document belongs to: first 8 bytes of sha256(uri), modulo the shard count. Stable across runs,
/// machines and listing order.
pub fn shard_of(uri: &str, count: u64) -> u64 {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(uri.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first) % count.max(1)
}

/// Runs a pipeline to completion (or to its failure budget). Blocks the calling thread.
pub fn run_blocking(spec: PipelineSpec, opts: RunOptions) -> Result<RunSummary, PipelineError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(stage("async runtime"))?;
    rt.block_on(run(spec, opts))
}

pub async fn run(spec: PipelineSpec, opts: RunOptions) -> Result<RunSummary, PipelineError> {
    let started = Instant::now();
    let run_id = new_run_id();
    let abort = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(Progress::default());
    let reporter = Reporter { format: opts.log };
    reporter.event(
        "info",
        "run_started",
        || format!("run {run_id} started"),
        serde_json::json!({
            "run_id": run_id,
            "pipeline": spec.name,
            "source": spec.source.uri,
            "output": spec.output.uri,
            "model": spec.model.dir.display().to_string(),
            "device": spec.model.device,
            "shard": opts.shard.map(|(i, n)| format!("{i}/{n}")),
            "force": opts.force,
        }),
    );
    // Installed first, so a signal during start-up is handled too.
    // SIGINT/SIGTERM: stop taking new documents, finish what is in flight, commit it, and say so. A second
    // signal is left to the default handler's successor: the process ends, and the output is still resumable
    // because only complete files are ever visible.
    let interrupted = Arc::new(AtomicBool::new(false));
    let signal_task = {
        let (abort, interrupted) = (abort.clone(), interrupted.clone());
        tokio::spawn(async move {
            let term = async {
                #[cfg(unix)]
                if let Ok(mut s) =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                {
                    s.recv().await;
                    return;
                }
                std::future::pending::<()>().await
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term => {}
            }
            eprintln!(
                "pixtract run: signal received: finishing documents in flight, then committing (repeat to abort)"
            );
            interrupted.store(true, Ordering::SeqCst);
            abort.store(true, Ordering::SeqCst);
            let _ = tokio::signal::ctrl_c().await;
            std::process::exit(130);
        })
    };

    let model_dir = ModelDir::open(&spec.model.dir).map_err(stage("model"))?;
    let manifest = model_dir.manifest.clone();
    let device: Device = spec.model.device.parse().map_err(stage("model"))?;
    let mode = match &spec.extract.schema {
        Some(path) => Mode::Schema(Box::new(
            ExtractionSchema::load(path).map_err(stage("schema"))?,
        )),
        None => Mode::FreeText,
    };
    let schema = match &mode {
        Mode::Schema(s) => Some((**s).clone()),
        Mode::FreeText => None,
    };
    let ctx = RunContext {
        pipeline: spec.name.clone(),
        model_id: manifest.weights_sha256.clone(),
        run_id: run_id.clone(),
    };

    // The sink is set up before any work so a bad output URI fails in the first second, not after the model ran.
    let target = SinkTarget::parse(&spec.output.uri).map_err(stage("output"))?;
    let sink_config = SinkConfig {
        partition_key: (!spec.output.partition.is_empty()).then(|| spec.output.partition.clone()),
        max_rows_per_file: spec.output.max_rows_per_file,
        ..SinkConfig::default()
    };
    // What earlier runs did, from the output itself: those documents are skipped unless forced.
    let processed = if opts.force {
        state::ProcessedSet::default()
    } else {
        state::read_processed(&target).await?
    };
    let skip = SkipRules {
        processed: Arc::new(processed),
        schema_sha: schema
            .as_ref()
            .map(|s| s.sha256.clone())
            .unwrap_or_default(),
        model_id: manifest.weights_sha256.clone(),
        shard: opts.shard,
    };
    let row_schema = Arc::new(crate::extract::row_schema(schema.as_ref()));
    let mut sink = ParquetSink::new(target.clone(), sink_config, row_schema, &run_id)
        .map_err(stage("output"))?;

    // Model stage: its own thread owns the engine (ONNX Runtime sessions are driven synchronously).
    let (model_tx, model_rx) = mpsc::channel::<ModelInput>(spec.model.batch_size * 2);
    let (rows_tx, mut rows_rx) = mpsc::channel::<(Vec<ExtractionRecord>, Duration)>(4);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    let model_spec = spec.model.clone();
    let model_thread = std::thread::Builder::new()
        .name("pixtract-model".into())
        .spawn(move || model_stage(model_spec, device, mode, model_rx, rows_tx, ready_tx))
        .map_err(stage("model thread"))?;
    match ready_rx.recv() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            return Err(PipelineError::Stage {
                stage: "model",
                reason: e,
            });
        }
        Err(_) => {
            return Err(PipelineError::Stage {
                stage: "model",
                reason: "model thread ended during start-up".into(),
            });
        }
    }

    // Writer: rows to Parquet as they come.
    let limits = spec.limits.clone();
    let writer_abort = abort.clone();
    let writer_progress = progress.clone();
    let writer = tokio::spawn(async move {
        let mut tally = RowTally::default();
        let mut failure: Option<String> = None;
        let mut held: Vec<ExtractionRecord> = Vec::new();
        while let Some((records, busy)) = rows_rx.recv().await {
            tally.busy += busy;
            writer_progress.add_busy(Stage::Model, busy);
            for r in &records {
                tally.rows += 1;
                if r.is_ok() {
                    tally.ok += 1;
                } else {
                    tally.failed += 1;
                }
                // Document-level failures (page 0) were reported when they happened.
                if !r.is_ok() && r.source.page_start > 0 {
                    let error = r.error_message().unwrap_or_default().to_string();
                    reporter.event(
                        "warn",
                        "row_failed",
                        || {
                            format!(
                                "error row: {} pages {}-{}: {error}",
                                r.source.uri, r.source.page_start, r.source.page_end
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
            writer_progress.rows.store(tally.rows, Ordering::Relaxed);
            writer_progress
                .rows_failed
                .store(tally.failed, Ordering::Relaxed);
            writer_progress
                .generated_tokens
                .store(tally.generated_tokens, Ordering::Relaxed);
            // Rows go to the sink a whole document at a time, so a file rotation never falls inside a document
            // and a kill between two commits never leaves half a document committed (the next run would redo the
            // document and duplicate the committed half). Rows of a document still in progress wait in `held`.
            let finished = records.iter().filter(|r| completes_document(r)).count();
            writer_progress
                .documents_done
                .fetch_add(finished, Ordering::Relaxed);
            held.extend(records);
            if let Some(last) = held.iter().rposition(completes_document) {
                let ready: Vec<ExtractionRecord> = held.drain(..=last).collect();
                let t = Instant::now();
                let batch =
                    to_record_batch(schema.as_ref(), &ctx, &ready).map_err(stage("rows"))?;
                sink.write_unit(&batch).await.map_err(stage("output"))?;
                writer_progress.add_busy(Stage::Write, t.elapsed());
            }
            if failure.is_none()
                && tally.rows >= limits.failure_min_docs
                && tally.failed as f64 > limits.max_failed_share * tally.rows as f64
            {
                failure = Some(format!(
                    "failure budget exceeded: {} of {} rows failed (limit {:.0}%)",
                    tally.failed,
                    tally.rows,
                    limits.max_failed_share * 100.0
                ));
                writer_abort.store(true, Ordering::SeqCst);
            }
        }
        if !held.is_empty() {
            // Only when the run stopped inside a document: its rows are left out so that the next run, which
            // redoes the whole document, writes each page exactly once.
            let uri = held[0].source.uri.clone();
            reporter.event(
                "warn",
                "document_incomplete",
                || format!("{uri}: stopped before its last page; left for the next run ({} rows not written)", held.len()),
                serde_json::json!({"uri": uri, "rows": held.len()}),
            );
        }
        Ok::<_, PipelineError>((sink, tally, failure))
    });

    // Source + raster + preprocess, feeding the model stage.
    let display = reporter.spawn_progress(progress.clone(), started);
    let produced = produce(
        &spec,
        &manifest.image,
        &skip,
        progress.clone(),
        reporter,
        model_tx,
        abort.clone(),
    )
    .await;
    let model_result = tokio::task::spawn_blocking(move || model_thread.join())
        .await
        .map_err(stage("model thread"))?;
    let (sink, tally, failure) = writer.await.map_err(stage("writer"))??;
    let (documents, documents_failed, pages, documents_skipped) = produced?;
    if let Ok(Err(e)) = model_result {
        return Err(PipelineError::Stage {
            stage: "model",
            reason: e,
        });
    }

    signal_task.abort();
    display.abort();
    let failure = if interrupted.load(Ordering::SeqCst) {
        Some("interrupted by a signal: documents not started are left for the next run".to_string())
    } else {
        failure
    };
    let seconds = started.elapsed().as_secs_f64();
    let mut summary = RunSummary {
        run_id: run_id.clone(),
        pipeline: spec.name.clone(),
        documents,
        documents_failed,
        documents_skipped,
        shard: opts.shard,
        pages,
        rows: tally.rows,
        rows_ok: tally.ok,
        rows_failed: tally.failed,
        prompt_tokens: tally.prompt_tokens,
        generated_tokens: tally.generated_tokens,
        seconds,
        pages_per_second: pages as f64 / seconds.max(1e-9),
        model_busy_seconds: tally.busy.as_secs_f64(),
        stages: progress.stages(started.elapsed()),
        aborted: failure,
        output: target.url(),
        files: Vec::new(),
    };
    let manifest_value = serde_json::to_value(&summary).map_err(stage("summary"))?;
    let written = sink.finish(manifest_value).await.map_err(stage("output"))?;
    summary.files = written.files.iter().map(|f| f.path.clone()).collect();
    Ok(summary)
}

/// Whether this row is its document's last: the last page (or the last prompt's pages) or a document-level error.
fn completes_document(r: &ExtractionRecord) -> bool {
    r.source.page_start == 0
        || r.source
            .doc_page_count
            .is_none_or(|count| r.source.page_end >= count)
}

#[derive(Debug, Default)]
struct RowTally {
    rows: usize,
    ok: usize,
    failed: usize,
    prompt_tokens: u64,
    generated_tokens: u64,
    busy: Duration,
}

fn new_run_id() -> String {
    let now = chrono::Utc::now();
    let salt = (now.timestamp_subsec_nanos() as u64) ^ ((std::process::id() as u64) << 20);
    format!("{}-{:06x}", now.format("%Y%m%dT%H%M%SZ"), salt & 0xff_ffff)
}

/// Which listed documents this run leaves alone.
struct SkipRules {
    processed: Arc<state::ProcessedSet>,
    schema_sha: String,
    model_id: String,
    shard: Option<(u64, u64)>,
}

/// Lists, fetches and rasterizes documents, groups pages into prompts and prepares their pixels.
/// Returns (documents, documents failed, pages, documents skipped as already processed).
async fn produce(
    spec: &PipelineSpec,
    image: &crate::model::manifest::ImageConfig,
    skip: &SkipRules,
    progress: Arc<Progress>,
    reporter: Reporter,
    model_tx: mpsc::Sender<ModelInput>,
    abort: Arc<AtomicBool>,
) -> Result<(usize, usize, usize, usize), PipelineError> {
    let source = Source::open(&spec.source.uri).map_err(stage("source"))?;
    let r = &spec.raster;
    let max_side = if r.max_side == 0 {
        image.max_image_size as u32
    } else {
        r.max_side
    };
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
    let mode = PdfMode::workers(r.workers, Duration::from_secs(r.timeout_s.max(1)))
        .map_err(stage("raster"))?;
    let rasterizer = Rasterizer::new(opts, mode).map_err(stage("raster"))?;
    let list = ListOptions {
        include: spec.source.include.clone(),
        exclude: spec.source.exclude.clone(),
        max_bytes: r.max_bytes,
    };
    // Listing -> shard and already-done filters (before any fetch) -> bounded concurrent fetches.
    let skipped = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let listing = source.list(&list).map_err(stage("source"))?;
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
    let wanted = Arc::new(move |doc: &crate::source::DocumentInfo| -> (bool, bool) {
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
        let counted = source.list(&list).map_err(stage("source"))?;
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
                Err(_) => true,
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
            move |item| {
                let source = fetch_source.clone();
                let progress = progress.clone();
                async move {
                    match item {
                        // A task of its own: the fetch runs to completion while the consumer is busy (the
                        // `buffered` window is a prefetch), and its time is the fetch's, not the wait for a poll.
                        Ok(doc) => {
                            let uri = doc.uri.clone();
                            tokio::spawn(async move {
                                let t = Instant::now();
                                let fetched = source.fetch(&doc, max_bytes).await;
                                progress.add_busy(Stage::Fetch, t.elapsed());
                                fetched
                            })
                            .await
                            .unwrap_or_else(|e| {
                                Err(crate::source::SourceError::Fetch {
                                    uri,
                                    reason: format!("fetch task failed: {e}"),
                                })
                            })
                        }
                        Err(e) => Err(e),
                    }
                }
            }
        })
        .buffered(spec.source.fetch_concurrency.max(1))
        .map(|item| item.map_err(RasterError::from));
    let preprocessor = ImagePreprocessor::from_config(image);
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
        let info = doc.doc.clone();
        let source_info = |start: usize, end: usize, count: Option<usize>| SourceInfo {
            uri: info.uri.clone(),
            etag: info.etag.clone(),
            version: info.version.clone(),
            page_start: start as u32,
            page_end: end as u32,
            doc_page_count: count.map(|c| c as u32),
        };
        let mut group = Vec::new();
        let mut group_start = 1;
        let mut render = Duration::ZERO;
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
                    .map_err(stage("preprocess"))?;
                    progress.add_busy(Stage::Preprocess, took);
                    match prepared {
                        Ok(p) => group.push(p),
                        Err(e) => {
                            let input = Err((
                                source_info(index + 1, index + 1, Some(count)),
                                e.to_string(),
                            ));
                            send(&model_tx, input).await?;
                            continue;
                        }
                    }
                    if group.len() == per_prompt || last {
                        let input = PageInput {
                            source: source_info(group_start, index + 1, Some(count)),
                            images: std::mem::take(&mut group),
                            fetch_ms: None,
                            raster_ms: Some(render.as_secs_f64() * 1e3),
                        };
                        render = Duration::ZERO;
                        send(&model_tx, Ok(input)).await?;
                    }
                }
                Err(e) => {
                    failed += 1;
                    progress.failed.store(failed, Ordering::Relaxed);
                    let error = e.to_string();
                    reporter.event(
                        "warn",
                        "document_failed",
                        || format!("document failed: {}: {error}", info.uri),
                        serde_json::json!({"uri": info.uri, "error": error}),
                    );
                    send(&model_tx, Err((source_info(0, 0, None), error))).await?;
                    break;
                }
            }
        }
    }
    counting.abort();
    Ok((documents, failed, pages, skipped.load(Ordering::SeqCst)))
}

async fn send(tx: &mpsc::Sender<ModelInput>, input: ModelInput) -> Result<(), PipelineError> {
    tx.send(input).await.map_err(|_| PipelineError::Stage {
        stage: "model",
        reason: "model stage stopped early".into(),
    })
}

/// Owns the engine: takes whatever prompts are ready (up to the batch size), extracts, hands rows on.
fn model_stage(
    spec: spec::ModelSpec,
    device: Device,
    mode: Mode,
    mut inputs: mpsc::Receiver<ModelInput>,
    rows: mpsc::Sender<(Vec<ExtractionRecord>, Duration)>,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
) -> Result<(), String> {
    let start = || -> Result<_, String> {
        let rt = OrtRuntime::load_from_env_with_pool(Threads {
            intra_op: spec.threads,
            spin: spec.spin,
        })
        .map_err(|e| e.to_string())?;
        let opts = EngineOptions { device };
        let engine =
            crate::model::PixtralEngine::load(&rt, &spec.dir, opts).map_err(|e| e.to_string())?;
        let config = GenerationConfig {
            max_new_tokens: spec.max_new_tokens,
            prefill_chunk: spec.prefill_chunk,
            ..Default::default()
        };
        let policy = BatchPolicy {
            max_batch: spec.batch_size,
            token_budget: spec.token_budget,
        };
        let extractor = Extractor::new(&engine, mode, config, policy).map_err(|e| e.to_string())?;
        Ok((rt, engine, extractor))
    };
    let (_rt, mut engine, extractor) = match start() {
        Ok(v) => {
            let _ = ready.send(Ok(()));
            v
        }
        Err(e) => {
            let _ = ready.send(Err(e.clone()));
            return Err(e);
        }
    };
    while let Some(first) = inputs.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < spec.batch_size {
            match inputs.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let t = Instant::now();
        let records = match extractor.run(&mut engine, batch) {
            Ok(out) => out.records,
            Err(e) => return Err(format!("extraction failed: {e}")),
        };
        if rows.blocking_send((records, t.elapsed())).is_err() {
            return Err("writer stopped".into());
        }
    }
    Ok(())
}
