//! One run: set-up that fails fast (model, schema, output, earlier state), then the stages wired by bounded
//! channels, then the summary and the manifest. The library returns; the binary exits: signals, exit codes and
//! the run report are `src/cli/run.rs`'s, which hands in a cancellation flag (`RunOptions::cancel`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::model_stage::{ModelStageConfig, model_stage};
use super::produce::{PromptShape, SkipRules, produce};
use super::report::{Progress, Reporter};
use super::writer::{ModelOutput, Writer, Written};
use super::{
    DecodeSummary, ModelInput, PipelineError, PipelineSpec, RunOptions, RunSummary, state,
};
use crate::extract::{ExtractionSchema, Mode, ReviewPolicy, RunContext};
use crate::model::{Device, ModelDir, ModelManifest};
use crate::sink::lease::{Holder, Lease, lease_name};
use crate::sink::{Commit, ParquetSink, SinkConfig, SinkTarget};

/// Runs a pipeline to completion (or to its failure budget, or until `opts.cancel` is set).
pub async fn run(spec: PipelineSpec, opts: RunOptions) -> Result<RunSummary, PipelineError> {
    let started = Instant::now();
    let run_id = new_run_id();
    let reporter = Reporter {
        events: opts.events.clone(),
    };
    announce(&spec, &opts, &run_id, &reporter);
    let stop = Stop::watching(opts.cancel.clone());
    let setup = prepare(&spec, &opts, &run_id)?;
    let lease = acquire_lease(&spec, &opts, &setup.target, &run_id, &stop, &reporter).await?;
    // Everything after the lease is taken runs here, so the lease is given back on every way out.
    let result = run_under_lease(&spec, &opts, setup, &stop, &lease, started, &reporter).await;
    stop.watcher.abort();
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

/// Why the run stops taking documents: `abort` is what the stages watch (set by the failure budget, a failing
/// model, or a cancellation); `interrupted` says it was the caller's cancellation.
struct Stop {
    abort: Arc<AtomicBool>,
    interrupted: Arc<AtomicBool>,
    watcher: tokio::task::JoinHandle<()>,
}

impl Stop {
    /// Turns the caller's cancellation flag (a signal, in the binary) into the run's stop, within 20 ms.
    fn watching(cancel: Option<Arc<AtomicBool>>) -> Stop {
        let abort = Arc::new(AtomicBool::new(false));
        let interrupted = Arc::new(AtomicBool::new(false));
        let (a, i) = (abort.clone(), interrupted.clone());
        let watcher = tokio::spawn(async move {
            let Some(cancel) = cancel else { return };
            while !cancel.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            i.store(true, Ordering::SeqCst);
            a.store(true, Ordering::SeqCst);
        });
        Stop {
            abort,
            interrupted,
            watcher,
        }
    }
}

fn announce(spec: &PipelineSpec, opts: &RunOptions, run_id: &str, reporter: &Reporter) {
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
}

/// What the run needs before any work, each checked now so a bad setting fails in the first second.
struct Setup {
    manifest: ModelManifest,
    device: Device,
    mode: Mode,
    review: ReviewPolicy,
    /// The output columns' schema (fields a threshold can withhold are nullable).
    schema: Option<ExtractionSchema>,
    ctx: RunContext,
    target: SinkTarget,
    sink_config: SinkConfig,
    /// The job a sharded run belongs to (named at the start: a derived id must not change at midnight).
    job: Option<String>,
}

fn prepare(spec: &PipelineSpec, opts: &RunOptions, run_id: &str) -> Result<Setup, PipelineError> {
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
    let mut review = ReviewPolicy::for_schema(
        spec.extract.min_confidence,
        spec.extract.min_confidence_fields.clone(),
        schema.as_ref(),
    )
    .map_err(PipelineError::Extract)?;
    review.require_grounding = spec.extract.require_grounding && spec.extract.grounding;
    let schema = schema.map(|s| review.output_schema(&s));
    let ctx = RunContext {
        pipeline: spec.name.clone(),
        model_id: manifest.weights_sha256.clone(),
        run_id: run_id.to_string(),
    };
    // The sink is set up before any work so a bad output URI fails in the first second, not after the model ran.
    let target = SinkTarget::parse(&spec.output.uri)?;
    let sink_config = SinkConfig {
        partition_key: (!spec.output.partition.is_empty()).then(|| spec.output.partition.clone()),
        max_rows_per_file: spec.output.max_rows_per_file,
        ..SinkConfig::default()
    };
    // The id names a folder of the output: letters, digits, '.', '_' and '-' only.
    let job = opts.shard.map(|(_, n)| {
        opts.job
            .clone()
            .unwrap_or_else(|| super::derived_job_id(spec, n))
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "._-".contains(c) {
                    c
                } else {
                    '-'
                }
            })
            .collect::<String>()
    });
    Ok(Setup {
        job,
        manifest,
        device,
        mode,
        review,
        schema,
        ctx,
        target,
        sink_config,
    })
}

/// One run at a time per output (and shard): an overlapping run (a cron overlap, a retried pod) waits here until
/// this one is done, and only then reads what is done, so no document is processed twice.
async fn acquire_lease(
    spec: &PipelineSpec,
    opts: &RunOptions,
    target: &SinkTarget,
    run_id: &str,
    stop: &Stop,
    reporter: &Reporter,
) -> Result<Lease, PipelineError> {
    let holder = Holder::this_process(run_id, Duration::from_secs(spec.output.lease_ttl_s));
    let lease_wait = opts
        .lease_wait
        .or(spec.output.lease_wait_s.map(Duration::from_secs));
    Ok(target
        .acquire_lease(
            &lease_name(opts.shard),
            &holder,
            lease_wait,
            &stop.abort,
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
        .await?)
}

/// The stages, from the output's earlier state to the committed manifest.
async fn run_under_lease(
    spec: &PipelineSpec,
    opts: &RunOptions,
    setup: Setup,
    stop: &Stop,
    lease: &Lease,
    started: Instant,
    reporter: &Reporter,
) -> Result<RunSummary, PipelineError> {
    let progress = Arc::new(Progress::default());
    let (processed, fold) = read_state(opts, &setup, reporter).await?;
    let skip = SkipRules {
        processed,
        schema_sha: setup
            .schema
            .as_ref()
            .map(|s| s.sha256.clone())
            .unwrap_or_default(),
        model_id: setup.manifest.weights_sha256.clone(),
        shard: opts.shard,
    };
    let row_schema = Arc::new(crate::extract::row_schema(setup.schema.as_ref()));
    let sink = ParquetSink::new(
        setup.target.clone(),
        setup.sink_config.clone(),
        row_schema,
        &setup.ctx.run_id,
    )?;
    // An output that cannot be written fails now, before the model loads and the documents are read.
    sink.check_writable().await?;

    let (model_tx, model_rx) = mpsc::channel::<ModelInput>(spec.model.batch_size * 2);
    let (rows_tx, rows_rx) = mpsc::channel::<ModelOutput>(4);
    let max_prompt_tokens = (spec.extract.unit == super::spec::Unit::Document).then(|| {
        spec.extract
            .max_prompt_tokens
            .unwrap_or(spec.model.token_budget)
    });
    let stage = ModelStageConfig {
        spec: spec.model.clone(),
        device: setup.device,
        mode: setup.mode.clone(),
        review: setup.review.clone(),
        pages_per_prompt: spec.extract.pages_per_prompt.max(1),
        max_prompt_tokens,
        max_side: spec.raster.view_side(setup.manifest.image.max_image_size),
        progress: progress.clone(),
        abort: stop.abort.clone(),
    };
    let (model_thread, instruction_tokens) = start_model_stage(stage, model_rx, rows_tx)?;
    // Document mode: the image tokens a window of pages may hold.
    let window_tokens = max_prompt_tokens.map(|t| t.saturating_sub(instruction_tokens));
    if let (Some(max), Some(images)) = (max_prompt_tokens, window_tokens) {
        reporter.event(
            "info",
            "document_windows",
            || format!("one row per document: windows of pages up to {max} prompt tokens ({instruction_tokens} instruction, {images} image tokens)"),
            serde_json::json!({"max_prompt_tokens": max, "instruction_tokens": instruction_tokens, "window_image_tokens": images}),
        );
    }
    let writer = Writer {
        sink,
        schema: setup.schema.clone(),
        per_document: spec.extract.unit == super::spec::Unit::Document,
        ctx: setup.ctx.clone(),
        limits: spec.limits.clone(),
        reporter: reporter.clone(),
        progress: progress.clone(),
        abort: stop.abort.clone(),
    };
    let writer = tokio::spawn(writer.run(rows_rx));
    let display = reporter.spawn_progress(progress.clone(), started);
    let shape = PromptShape {
        manifest: &setup.manifest,
        window_tokens,
    };
    let produced = produce(
        spec,
        shape,
        &skip,
        progress.clone(),
        reporter.clone(),
        model_tx,
        stop.abort.clone(),
    )
    .await;
    let (decode, written) = join_stages(model_thread, writer).await?;
    let counts = produced?;
    display.abort();
    finish_fold(fold, reporter).await;
    let ran = Ran {
        decode,
        written,
        counts,
        progress,
        started,
    };
    summarize(spec, opts, &setup, stop, lease, ran).await
}

/// What earlier runs did, from the output itself (those documents are skipped unless forced), and the writing of
/// a new index fold when this run read files outside the last one (unsharded runs and shard 0 only: the shards of
/// one job would all write the same fold). The fold is written while the run works; it is a cache, so its failure
/// is a warning.
async fn read_state(
    opts: &RunOptions,
    setup: &Setup,
    reporter: &Reporter,
) -> Result<
    (
        Arc<state::ProcessedSet>,
        Option<tokio::task::JoinHandle<Result<String, state::StateError>>>,
    ),
    PipelineError,
> {
    if opts.force {
        return Ok((Arc::new(state::ProcessedSet::default()), None));
    }
    let read_started = Instant::now();
    let processed = Arc::new(state::read_processed(&setup.target, state::StateRead::Index).await?);
    let seconds = read_started.elapsed().as_secs_f64();
    reporter.event(
        "info",
        "state_read",
        || format!("output state: {} ({seconds:.2} s)", processed.describe()),
        serde_json::json!({
            "documents_done": processed.len(),
            "fold": processed.fold.as_ref().map(|f| &f.0),
            "fold_files": processed.fold.as_ref().map(|f| f.1),
            "sidecars_read": processed.sidecars_read,
            "files_read": processed.files_read,
            "stale": processed.stale,
            "seconds": seconds,
        }),
    );
    let folds = opts.shard.is_none_or(|(index, _)| index == 0);
    let fold = (folds && processed.fold_worth_writing()).then(|| {
        let (target, set, run_id) = (
            setup.target.clone(),
            processed.clone(),
            setup.ctx.run_id.clone(),
        );
        tokio::spawn(async move { state::write_fold(&target, &set, &run_id).await })
    });
    Ok((processed, fold))
}

async fn finish_fold(
    fold: Option<tokio::task::JoinHandle<Result<String, state::StateError>>>,
    reporter: &Reporter,
) {
    let Some(fold) = fold else { return };
    let result = match fold.await {
        Ok(result) => result.map_err(|e| crate::error::chain(&e)),
        Err(join) => Err(join.to_string()),
    };
    match result {
        Ok(name) => reporter.event(
            "info",
            "index_folded",
            || format!("output index written: {name}"),
            serde_json::json!({ "fold": name }),
        ),
        Err(error) => reporter.event(
            "warn",
            "index_fold_failed",
            || {
                format!(
                    "the output index could not be written (the next run reads more files): {error}"
                )
            },
            serde_json::json!({ "error": error }),
        ),
    }
}

/// The model stage's thread, running.
type ModelThread = std::thread::JoinHandle<Result<DecodeSummary, PipelineError>>;

/// Starts the model stage's thread and waits until its engine is loaded (or failed to load: its typed error).
/// Returns the thread and the tokens of a prompt without images (what a window of pages leaves to its images).
fn start_model_stage(
    stage: ModelStageConfig,
    model_rx: mpsc::Receiver<ModelInput>,
    rows_tx: mpsc::Sender<ModelOutput>,
) -> Result<(ModelThread, usize), PipelineError> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Option<usize>>();
    let model_thread = std::thread::Builder::new()
        .name("pixtract-model".into())
        .spawn(move || model_stage(stage, model_rx, rows_tx, ready_tx))
        .map_err(|source| PipelineError::Io {
            what: "cannot start the model thread",
            source,
        })?;
    let Ok(Some(instruction_tokens)) = ready_rx.recv() else {
        return Err(match model_thread.join() {
            Ok(Err(e)) => e,
            Ok(Ok(_)) => PipelineError::Stopped("the model thread ended during start-up"),
            Err(panic) => PipelineError::ModelPanicked(panic_message(panic.as_ref())),
        });
    };
    Ok((model_thread, instruction_tokens))
}

/// Waits for the model stage, then the writer. The model's outcome first: when it failed, the producer and the
/// writer only saw their channel close; when the writer failed, the model stage only saw that, and the writer's
/// own error (the output's storage, a full disk) is the run's, with its cause.
async fn join_stages(
    model_thread: std::thread::JoinHandle<Result<DecodeSummary, PipelineError>>,
    writer: tokio::task::JoinHandle<Result<Written, PipelineError>>,
) -> Result<(DecodeSummary, Written), PipelineError> {
    let model_result = tokio::task::spawn_blocking(move || model_thread.join())
        .await
        .map_err(|source| PipelineError::Task {
            what: "waiting for the model thread",
            source,
        })?;
    let decode = match model_result {
        Ok(Ok(decode)) => decode,
        Ok(Err(PipelineError::Stopped(what))) => {
            return Err(match writer.await {
                Ok(Err(e)) => e,
                _ => PipelineError::Stopped(what),
            });
        }
        Ok(Err(e)) => return Err(e),
        Err(panic) => return Err(PipelineError::ModelPanicked(panic_message(panic.as_ref()))),
    };
    let written = writer.await.map_err(|source| PipelineError::Task {
        what: "the writer",
        source,
    })??;
    Ok((decode, written))
}

/// What the stages left: the model's decode counters, the writer's sink and tally, the producer's counts.
struct Ran {
    decode: DecodeSummary,
    written: Written,
    /// (documents, documents failed, pages, documents skipped)
    counts: (usize, usize, usize, usize),
    progress: Arc<Progress>,
    started: Instant,
}

/// The summary, written as the manifest, then `_SUCCESS`: the run's commit.
async fn summarize(
    spec: &PipelineSpec,
    opts: &RunOptions,
    setup: &Setup,
    stop: &Stop,
    lease: &Lease,
    ran: Ran,
) -> Result<RunSummary, PipelineError> {
    let Written {
        sink,
        tally,
        failure,
    } = ran.written;
    let (documents, documents_failed, pages, documents_skipped) = ran.counts;
    let failure = if stop.interrupted.load(Ordering::SeqCst) {
        Some("interrupted by a signal: documents not started are left for the next run".to_string())
    } else if let Some(stopped) = &ran.decode.stopped {
        Some(stopped.clone())
    } else if let Some(lost) = lease.lost() {
        Some(format!(
            "{lost}: stopped taking documents; those not started are left for the next run"
        ))
    } else {
        failure
    };
    let seconds = ran.started.elapsed().as_secs_f64();
    let job = setup.job.clone();
    let commit = match (&failure, opts.shard, &job) {
        (Some(_), _, _) => Commit::Stopped,
        (None, Some((index, count)), Some(job)) => Commit::Shard {
            job: job.clone(),
            index,
            count,
        },
        (None, _, _) => Commit::Whole,
    };
    let mut summary = RunSummary {
        run_id: setup.ctx.run_id.clone(),
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
        stages: ran.progress.stages(ran.started.elapsed()),
        completed: failure.is_none(),
        job,
        aborted: failure,
        output: setup.target.url(),
        files: Vec::new(),
        decode: ran.decode,
        partition: sink.partition_dir(),
        report: None,
    };
    let manifest_value = serde_json::to_value(&summary).map_err(PipelineError::Summary)?;
    let written = sink.finish(manifest_value, commit).await?;
    summary.files = written.files.iter().map(|f| f.path.clone()).collect();
    Ok(summary)
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
