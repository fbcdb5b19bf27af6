//! Source + raster + preprocess, feeding the model stage: lists documents, leaves out those of other shards and
//! those already in the output, fetches a bounded number ahead, rasterizes them, groups pages into prompts and
//! prepares their pixels. A document that fails becomes an error input, never a gap.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use image::DynamicImage;
use tokio::sync::mpsc;

use super::report::{Progress, Reporter, Stage};
use super::{ModelInput, PipelineError, PipelineSpec, shard_of, state};
use crate::document::{DocumentInfo, FetchError};
use crate::extract::{PageInput, SourceInfo};
use crate::model::ImagePreprocessor;
use crate::raster::{PdfMode, RasterError, RasterOptions, Rasterizer};
use crate::source::{ListOptions, Source, SourceError};

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
    let mode = PdfMode::workers(r.workers, Duration::from_secs(r.timeout_s.max(1)))?;
    let rasterizer = Rasterizer::new(opts, mode)?;
    let list = ListOptions {
        include: spec.source.include.clone(),
        exclude: spec.source.exclude.clone(),
        max_bytes: r.max_bytes,
    };
    // Listing -> shard and already-done filters (before any fetch) -> bounded concurrent fetches.
    let skipped = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let listing = source.list(&list)?;
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
                                Err(SourceError::Fetch {
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
        .map(|item| item.map_err(|e| RasterError::from(FetchError::from(e))));
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
                    .map_err(|source| PipelineError::Task {
                        what: "preprocessing",
                        source,
                    })?;
                    progress.add_busy(Stage::Preprocess, took);
                    match prepared {
                        Ok(p) => group.push(p),
                        Err(e) => {
                            let input = Err((
                                source_info(index + 1, index + 1, Some(count)),
                                crate::error::chain(&e),
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
                    let error = crate::error::chain(&e);
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
    tx.send(input)
        .await
        .map_err(|_| PipelineError::Stopped("the model stage stopped early"))
}
