//! One run: set-up that fails fast (model, schema, output, earlier state), then the stages wired by bounded
//! channels, then the summary and the manifest.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::model_stage::{ModelStageConfig, model_stage};
use super::produce::{SkipRules, produce};
use super::report::{Progress, Reporter};
use super::writer::{ModelOutput, Writer, Written};
use super::{ModelInput, PipelineError, PipelineSpec, RunOptions, RunSummary, state};
use crate::extract::{ExtractionSchema, Mode, ReviewPolicy, RunContext};
use crate::model::{Device, ModelDir};
use crate::sink::lease::{Holder, lease_name};
use crate::sink::{ParquetSink, SinkConfig, SinkTarget};

/// Runs a pipeline to completion (or to its failure budget or a signal).
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

    let model_dir = ModelDir::open(&spec.model.dir)?;
    let manifest = model_dir.manifest.clone();
    // The vision encoder knows positions up to its image size: a larger view cannot be encoded.
    if spec.raster.max_side as usize > manifest.image.max_image_size {
        return Err(PipelineError::ModelView {
            asked: spec.raster.max_side,
            model: manifest.image.max_image_size,
            dir: spec.model.dir.clone(),
        });
    }
    let device: Device = spec.model.device.parse()?;
    // Checked now, not at the first encrypted PDF: a missing variable would turn every one into an error row.
    if let Some(name) = &spec.raster.password_env
        && std::env::var_os(name).is_none()
    {
        return Err(PipelineError::PasswordEnvUnset { name: name.clone() });
    }
    let mode = match &spec.extract.schema {
        Some(path) => Mode::Schema(Box::new(
            ExtractionSchema::load(path).map_err(PipelineError::Schema)?,
        )),
        None => Mode::FreeText,
    };
    let schema = match &mode {
        Mode::Schema(s) => Some((**s).clone()),
        Mode::FreeText => None,
    };
    let review = ReviewPolicy::for_schema(
        spec.extract.min_confidence,
        spec.extract.min_confidence_fields.clone(),
        schema.as_ref(),
    )
    .map_err(PipelineError::Extract)?;
    // The columns: fields a threshold can withhold are nullable there (the grammar keeps the schema as written).
    let schema = schema.map(|s| review.output_schema(&s));
    let ctx = RunContext {
        pipeline: spec.name.clone(),
        model_id: manifest.weights_sha256.clone(),
        run_id: run_id.clone(),
    };

    // The sink is set up before any work so a bad output URI fails in the first second, not after the model ran.
    let target = SinkTarget::parse(&spec.output.uri)?;
    let sink_config = SinkConfig {
        partition_key: (!spec.output.partition.is_empty()).then(|| spec.output.partition.clone()),
        max_rows_per_file: spec.output.max_rows_per_file,
        ..SinkConfig::default()
    };
    // One run at a time per output (and shard): an overlapping run (a cron overlap, a retried pod) waits here
    // until this one is done, and only then reads what is done, so no document is processed twice.
    let holder = Holder::this_process(&run_id, Duration::from_secs(spec.output.lease_ttl_s));
    let lease_wait = opts
        .lease_wait
        .or(spec.output.lease_wait_s.map(Duration::from_secs));
    let lease = target
        .acquire_lease(
            &lease_name(opts.shard),
            &holder,
            lease_wait,
            &abort,
            |other, waited| {
                reporter.event(
                    "warn",
                    "lease_wait",
                    || {
                        format!(
                            "waiting for the output: {other} is writing to it ({} s so far; --lease-wait bounds the wait)",
                            waited.as_secs()
                        )
                    },
                    serde_json::json!({"holder": other, "waited_s": waited.as_secs()}),
                )
            },
        )
        .await?;
    // Everything after the lease is taken runs in this block, so the lease is given back on every way out.
    let result: Result<RunSummary, PipelineError> = async {
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
        let sink = ParquetSink::new(target.clone(), sink_config, row_schema, &run_id)?;
        // An output that cannot be written fails now, before the model loads and the documents are read.
        sink.check_writable().await?;

        // Model stage: its own thread owns the engine (ONNX Runtime sessions are driven synchronously).
        let (model_tx, model_rx) = mpsc::channel::<ModelInput>(spec.model.batch_size * 2);
        let (rows_tx, rows_rx) = mpsc::channel::<ModelOutput>(4);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<bool>();
        let stage = ModelStageConfig {
            spec: spec.model.clone(),
            device,
            mode,
            review,
            pages_per_prompt: spec.extract.pages_per_prompt.max(1),
            max_side: match spec.raster.max_side {
                0 => manifest.image.max_image_size,
                side => side as usize,
            },
            progress: progress.clone(),
            abort: abort.clone(),
        };
        let model_thread = std::thread::Builder::new()
            .name("pixtract-model".into())
            .spawn(move || model_stage(stage, model_rx, rows_tx, ready_tx))
            .map_err(|source| PipelineError::Io {
                what: "cannot start the model thread",
                source,
            })?;
        if ready_rx.recv() != Ok(true) {
            // Start-up failed: the thread's own result holds the typed error.
            return Err(match model_thread.join() {
                Ok(Err(e)) => e,
                Ok(Ok(_)) => PipelineError::Stopped("the model thread ended during start-up"),
                Err(panic) => PipelineError::ModelPanicked(panic_message(panic.as_ref())),
            });
        }

        // Writer: rows to Parquet as they come.
        let writer = Writer {
            sink,
            schema,
            ctx,
            limits: spec.limits.clone(),
            reporter,
            progress: progress.clone(),
            abort: abort.clone(),
        };
        let writer = tokio::spawn(writer.run(rows_rx));

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
            .map_err(|source| PipelineError::Task {
                what: "waiting for the model thread",
                source,
            })?;
        // The model's outcome first: when it failed, the producer and the writer only saw their channel close.
        let decode = match model_result {
            Ok(Ok(decode)) => decode,
            // A writer that failed (the output's storage, a full disk) closed its channel, and the model stage saw
            // only that: the writer's own error is the run's, with its cause.
            Ok(Err(PipelineError::Stopped(what))) => {
                return Err(match writer.await {
                    Ok(Err(e)) => e,
                    _ => PipelineError::Stopped(what),
                });
            }
            Ok(Err(e)) => return Err(e),
            Err(panic) => return Err(PipelineError::ModelPanicked(panic_message(panic.as_ref()))),
        };
        let Written {
            sink,
            tally,
            failure,
        } = writer.await.map_err(|source| PipelineError::Task {
            what: "the writer",
            source,
        })??;
        let (documents, documents_failed, pages, documents_skipped) = produced?;

        display.abort();
        let failure = if interrupted.load(Ordering::SeqCst) {
            Some(
                "interrupted by a signal: documents not started are left for the next run"
                    .to_string(),
            )
        } else if let Some(stopped) = &decode.stopped {
            Some(stopped.clone())
        } else if let Some(lost) = lease.lost() {
            Some(format!(
                "{lost}: stopped taking documents; those not started are left for the next run"
            ))
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
            rows_for_review: tally.for_review,
            prompt_tokens: tally.prompt_tokens,
            generated_tokens: tally.generated_tokens,
            seconds,
            pages_per_second: pages as f64 / seconds.max(1e-9),
            model_busy_seconds: tally.busy.as_secs_f64(),
            stages: progress.stages(started.elapsed()),
            aborted: failure,
            output: target.url(),
            files: Vec::new(),
            decode,
            report: None,
        };
        let manifest_value = serde_json::to_value(&summary).map_err(PipelineError::Summary)?;
        let partition = sink.partition_dir();
        let written = sink.finish(manifest_value).await?;
        summary.files = written.files.iter().map(|f| f.path.clone()).collect();
        if spec.output.report {
            summary.report = write_report(&target, &partition, &run_id, reporter).await;
        }
        Ok(summary)
    }
    .await;
    signal_task.abort();
    if let Err(e) = lease.release().await {
        let error = crate::error::chain(&e);
        reporter.event(
            "warn",
            "lease_release_failed",
            || format!("the output lease could not be released (it expires by itself): {error}"),
            serde_json::json!({"error": error}),
        );
    }
    result
}

/// Writes the run's report beside its manifest. The run's rows are committed by then: a report that cannot be
/// written is a warning event, not a failed run. Returns the report's path relative to the output.
async fn write_report(
    target: &SinkTarget,
    partition: &str,
    run_id: &str,
    reporter: Reporter,
) -> Option<String> {
    let name = crate::report::file_name(run_id);
    let rel = if partition.is_empty() {
        name
    } else {
        format!("{partition}/{name}")
    };
    let written = async {
        let page = crate::report::build(target, Some(run_id), None).await?;
        target
            .put_whole(&rel, page.into_bytes(), run_id)
            .await
            .map_err(crate::report::ReportError::Write)
    }
    .await;
    match written {
        Ok(()) => Some(rel),
        Err(e) => {
            let error = crate::error::chain(&e);
            reporter.event(
                "warn",
                "report_failed",
                || format!("the run report could not be written: {error}"),
                serde_json::json!({"error": error}),
            );
            None
        }
    }
}

/// The text of a panic's payload (a `&str` or `String` for `panic!` with a message).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

fn new_run_id() -> String {
    let now = chrono::Utc::now();
    let salt = (now.timestamp_subsec_nanos() as u64) ^ ((std::process::id() as u64) << 20);
    format!("{}-{:06x}", now.format("%Y%m%dT%H%M%SZ"), salt & 0xff_ffff)
}
