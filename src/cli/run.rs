//! `pixtract run`: a pipeline spec with command-line overrides, its summary and exit code.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use pixtract::error::chain;
use pixtract::pipeline::{Events, PipelineError, PipelineSpec, RunOptions, RunSummary};

use super::events::{LogFormat, StderrEvents};
use pixtract::sink::SinkTarget;

/// `--log-format`: how progress and events go to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormatArg {
    /// A live spinner on a terminal, plain lines otherwise.
    Auto,
    /// Plain lines: a progress line every 10 s, one line per failed document.
    Plain,
    /// One JSON object per line: run_started, progress (every 10 s), document_failed, row_failed, run_finished.
    Json,
}

impl From<LogFormatArg> for LogFormat {
    fn from(arg: LogFormatArg) -> Self {
        match arg {
            LogFormatArg::Auto => LogFormat::Auto,
            LogFormatArg::Plain => LogFormat::Plain,
            LogFormatArg::Json => LogFormat::Json,
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Pipeline spec (TOML), e.g. pipelines/demo.toml. Every key is documented in pipelines/receipts.toml.
    spec: PathBuf,
    /// Override [source] uri.
    #[arg(long, env = "PIXTRACT_SOURCE")]
    source: Option<String>,
    /// Override [output] uri.
    #[arg(long, env = "PIXTRACT_OUTPUT")]
    output: Option<String>,
    /// Override [model] dir.
    #[arg(long, env = "PIXTRACT_MODEL")]
    model: Option<PathBuf>,
    /// Override [model] device: cpu, cuda or cuda:N.
    #[arg(long, env = "PIXTRACT_DEVICE")]
    device: Option<String>,
    /// Override [model] max_new_tokens.
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// Override [limits] max_documents (0: all).
    #[arg(long)]
    max_documents: Option<usize>,
    /// Reprocess documents the output already holds (same ETag/version, schema and model are skipped otherwise).
    #[arg(long)]
    force: bool,
    /// Process shard I of N (documents assigned by a stable hash of their URI). Without it, the index comes from
    /// JOB_COMPLETION_INDEX (Kubernetes Indexed Jobs) or AWS_BATCH_JOB_ARRAY_INDEX (AWS Batch array jobs) with the
    /// count from PIXTRACT_SHARDS, or from a Slurm array (SLURM_ARRAY_TASK_ID minus SLURM_ARRAY_TASK_MIN, of
    /// SLURM_ARRAY_TASK_COUNT).
    #[arg(long, value_name = "I/N")]
    shard: Option<String>,
    /// The job the shards belong to: shards of one job give the same id, and the job's `_SUCCESS` appears once
    /// every shard completed. Default: the scheduler's (SLURM_ARRAY_JOB_ID, AWS Batch's parent job id), else
    /// derived from the spec's name, the output, the shard count and the UTC date.
    #[arg(long, value_name = "ID", env = "PIXTRACT_JOB_ID")]
    job_id: Option<String>,
    /// How progress and events go to stderr: auto (a live line on a terminal, plain lines otherwise), plain, or
    /// json (one object per line: run_started, progress every 10 s or PIXTRACT_PROGRESS_SECONDS, with
    /// documents_total and eta_s once the listing is counted, document_failed, row_failed, run_finished; the
    /// summary on stdout is then JSON too).
    #[arg(long, value_enum, default_value = "auto", env = "PIXTRACT_LOG_FORMAT")]
    log_format: LogFormatArg,
    /// Also write the run report (one HTML file, as `pixtract report` makes) beside the manifest; same as
    /// `[output] report = true`.
    #[arg(long)]
    report: bool,
    /// While another run writes to the same output (and shard), wait at most SECONDS for it to finish, then give
    /// up with exit code 4 (0: do not wait). Default: `[output] lease_wait_s`, else wait as long as it takes. Two
    /// overlapping runs never both process a document: the second waits for the first's lease, then skips what it
    /// did.
    #[arg(long, value_name = "SECONDS")]
    lease_wait: Option<u64>,
}

/// `--shard i/n`, else a scheduler's index variable with PIXTRACT_SHARDS.
fn shard_from(arg: Option<&str>) -> Result<Option<(u64, u64)>, String> {
    let parse = |i: &str, n: &str, what: &str| -> Result<Option<(u64, u64)>, String> {
        let i: u64 = i
            .trim()
            .parse()
            .map_err(|_| format!("{what}: shard index {i:?} is not a number"))?;
        let n: u64 = n
            .trim()
            .parse()
            .map_err(|_| format!("{what}: shard count {n:?} is not a number"))?;
        if n == 0 || i >= n {
            return Err(format!(
                "{what}: shard {i}/{n} is out of range (need 0 <= I < N)"
            ));
        }
        Ok(Some((i, n)))
    };
    if let Some(s) = arg {
        let (i, n) = s
            .split_once('/')
            .ok_or_else(|| format!("--shard {s:?}: expected I/N, e.g. 0/4"))?;
        return parse(i, n, "--shard");
    }
    for var in ["JOB_COMPLETION_INDEX", "AWS_BATCH_JOB_ARRAY_INDEX"] {
        if let Ok(index) = std::env::var(var) {
            let count = std::env::var("PIXTRACT_SHARDS")
                .map_err(|_| format!("{var} is set: set PIXTRACT_SHARDS to the number of shards (the job's completions / array size)"))?;
            return parse(&index, &count, var);
        }
    }
    // A Slurm array's task ids start at its --array minimum (often 1): the shard is the offset from it.
    if let Ok(task) = std::env::var("SLURM_ARRAY_TASK_ID") {
        let what = "SLURM_ARRAY_TASK_ID";
        let number = |var: &str| -> Result<u64, String> {
            let v = std::env::var(var)
                .map_err(|_| format!("{what} is set but {var} is not: not a Slurm array job?"))?;
            v.trim()
                .parse()
                .map_err(|_| format!("{var}: {v:?} is not a number"))
        };
        let task: u64 = task
            .trim()
            .parse()
            .map_err(|_| format!("{what}: {task:?} is not a number"))?;
        let (min, count) = (
            number("SLURM_ARRAY_TASK_MIN")?,
            number("SLURM_ARRAY_TASK_COUNT")?,
        );
        // A stepped array (--array=0-30:2) numbers its tasks min, min+step, ...: the shard is the position.
        let step = number("SLURM_ARRAY_TASK_STEP").unwrap_or(1).max(1);
        let offset = task
            .checked_sub(min)
            .ok_or_else(|| format!("{what} {task} is below SLURM_ARRAY_TASK_MIN {min}"))?;
        if offset % step != 0 {
            return Err(format!(
                "{what} {task} is not on the array's step {step} from {min}: a sparse --array list cannot be sharded; give --shard I/N"
            ));
        }
        let index = offset / step;
        return parse(&index.to_string(), &count.to_string(), what);
    }
    Ok(None)
}

/// The scheduler's id for the job a shard belongs to: a Slurm array's job id, AWS Batch's parent job id (an array
/// child's id is `<parent>:<index>`).
fn scheduler_job_id() -> Option<String> {
    if let Ok(id) = std::env::var("SLURM_ARRAY_JOB_ID") {
        return Some(format!("slurm-{}", id.trim()));
    }
    // Only an array job's children share a parent; separate Batch jobs each have their own id.
    std::env::var("AWS_BATCH_JOB_ARRAY_INDEX").ok()?;
    std::env::var("AWS_BATCH_JOB_ID").ok().map(|id| {
        let parent = id.split(':').next().unwrap_or(&id).trim().to_string();
        format!("aws-batch-{parent}")
    })
}

/// The spec file with the command line's overrides, checked, and the shard to process.
fn spec_with_overrides(args: RunArgs) -> anyhow::Result<(PipelineSpec, Option<(u64, u64)>)> {
    let mut spec = PipelineSpec::load(&args.spec)?;
    if let Some(v) = args.source {
        spec.source.uri = v;
    }
    if let Some(v) = args.output {
        spec.output.uri = v;
    }
    if let Some(v) = args.model {
        spec.model.dir = v;
    }
    if let Some(v) = args.device {
        spec.model.device = v;
    }
    if let Some(v) = args.max_new_tokens {
        spec.model.max_new_tokens = v;
    }
    if let Some(v) = args.max_documents {
        spec.limits.max_documents = v;
    }
    if args.report {
        spec.output.report = true;
    }
    let shard = shard_from(args.shard.as_deref()).map_err(anyhow::Error::msg)?;
    spec.validate().map_err(anyhow::Error::msg)?;
    Ok((spec, shard))
}

/// Exit codes: 0 every row ok; 2 finished with failed documents or rows (each has an error row); 3 stopped early
/// by the failure budget or SIGINT/SIGTERM (what was done is committed; the next run does the rest); 1 could not
/// run (bad spec, model, output); 4 another run held the output for longer than `--lease-wait` (nothing done).
pub fn run(args: RunArgs) -> ExitCode {
    let log_format = LogFormat::from(args.log_format);
    let force = args.force;
    let job = args.job_id.clone().or_else(scheduler_job_id);
    let lease_wait = args.lease_wait.map(std::time::Duration::from_secs);
    let (spec, shard) = match spec_with_overrides(args) {
        Ok(v) => v,
        Err(e) => {
            eprintln!(
                "pixtract run: error: {}",
                pixtract::error::redact(&format!("{e:#}"))
            );
            return ExitCode::FAILURE;
        }
    };
    if log_format != LogFormat::Json {
        eprintln!(
            "pixtract run: pipeline {} | {} -> {} | model {} on {}",
            spec.name,
            spec.source.uri,
            spec.output.uri,
            spec.model.dir.display(),
            spec.model.device
        );
    }
    let cancel = Arc::new(AtomicBool::new(false));
    let events = Arc::new(StderrEvents::new(log_format));
    let opts = RunOptions {
        force,
        shard,
        events: Events(Some(events.clone())),
        lease_wait,
        cancel: Some(cancel.clone()),
        job,
    };
    let json = log_format == LogFormat::Json;
    let (report_to, output_uri) = (spec.output.report, spec.output.uri.clone());
    let result = run_with_signals(spec, opts, cancel);
    events.finish();
    let result = result.map(|(mut s, rt)| {
        // The run's rows are committed by now: a report that cannot be written is a warning, not a failed run.
        if report_to {
            match rt.block_on(write_report(&output_uri, &s)) {
                Ok(rel) => s.report = Some(rel),
                Err(e) => eprintln!(
                    "pixtract run: warning: the run report could not be written: {}",
                    chain(&e)
                ),
            }
        }
        s
    });
    match result {
        Err(e) => {
            if json {
                eprintln!(
                    "{}",
                    serde_json::json!({"ts": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                        "level": "error", "event": "run_failed", "error": chain(&e)})
                );
            } else {
                eprintln!("pixtract run: error: {}", chain(&e));
            }
            if matches!(
                e,
                PipelineError::Lease(pixtract::sink::lease::LeaseError::Busy { .. })
            ) {
                ExitCode::from(4)
            } else {
                ExitCode::FAILURE
            }
        }
        Ok(s) if json => {
            let mut v = serde_json::to_value(&s).unwrap_or_default();
            if let Some(obj) = v.as_object_mut() {
                obj.insert("event".into(), "run_finished".into());
                obj.insert("exit_code".into(), exit_code_of(&s).into());
            }
            println!("{v}");
            ExitCode::from(exit_code_of(&s))
        }
        Ok(s) => {
            println!(
                "run {}{}: {} documents ({} failed, {} skipped as already done), {} pages, {} rows ({} ok, {} error) in {:.1} s ({:.2} pages/s, model busy {:.1} s)\ntokens: {} prompt, {} generated\noutput: {} ({} file(s), then the manifest{})",
                s.run_id,
                s.shard
                    .map(|(i, n)| format!(" (shard {i}/{n})"))
                    .unwrap_or_default(),
                s.documents,
                s.documents_failed,
                s.documents_skipped,
                s.pages,
                s.rows,
                s.rows_ok,
                s.rows_failed,
                s.seconds,
                s.pages_per_second,
                s.model_busy_seconds,
                s.prompt_tokens,
                s.generated_tokens,
                s.output,
                s.files.len(),
                match (s.completed, s.shard) {
                    (false, _) => "; no _SUCCESS: stopped early".to_string(),
                    (true, Some((_, n))) => format!(
                        "; _SUCCESS once all {n} shards of job {} completed",
                        s.job.as_deref().unwrap_or("?")
                    ),
                    (true, None) => " and _SUCCESS".to_string(),
                }
            );
            if s.rows_for_review > 0 {
                println!(
                    "review: {} row(s) have values withheld by min_confidence (null, named in _review)",
                    s.rows_for_review
                );
            }
            println!(
                "stages (busy seconds, share of wall time): {}",
                s.stages
                    .iter()
                    .map(|b| format!(
                        "{} {:.1} s ({:.0}%)",
                        b.stage,
                        b.busy_seconds,
                        b.share * 100.0
                    ))
                    .collect::<Vec<_>>()
                    .join(" | ")
            );
            if let Some(report) = &s.report {
                println!("report: {}/{report}", s.output.trim_end_matches('/'));
            }
            if let Some(reason) = &s.aborted {
                eprintln!("pixtract run: aborted: {reason}");
            }
            ExitCode::from(exit_code_of(&s))
        }
    }
}

/// Runs the pipeline on a runtime of its own while SIGINT/SIGTERM set `cancel`: stop taking documents, finish
/// those in flight, commit, and say so (exit 3). A second signal ends the process at once (exit 130); the output
/// is still resumable because only complete files are ever visible.
fn run_with_signals(
    spec: PipelineSpec,
    opts: RunOptions,
    cancel: Arc<AtomicBool>,
) -> Result<(RunSummary, tokio::runtime::Runtime), PipelineError> {
    let rt = pixtract::pipeline::runtime()?;
    let summary = rt.block_on(async {
        // Installed before the run starts, so a signal during start-up is handled too.
        let signals = tokio::spawn(async move {
            stop_signal().await;
            eprintln!(
                "pixtract run: signal received: finishing documents in flight, then committing (repeat to abort)"
            );
            cancel.store(true, Ordering::SeqCst);
            // The second signal, SIGINT or SIGTERM (tokio replaced SIGTERM's default action), ends the process.
            stop_signal().await;
            std::process::exit(130);
        });
        let summary = pixtract::pipeline::run(spec, opts).await;
        signals.abort();
        summary
    })?;
    Ok((summary, rt))
}

/// The next SIGINT or SIGTERM.
async fn stop_signal() {
    let term = async {
        #[cfg(unix)]
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
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
}

/// Writes the run's report beside its manifest; returns its path relative to the output.
async fn write_report(
    output_uri: &str,
    s: &RunSummary,
) -> Result<String, pixtract::report::ReportError> {
    let target = SinkTarget::parse(output_uri).map_err(pixtract::report::ReportError::Write)?;
    pixtract::report::write_beside_run(&target, &s.partition, &s.run_id).await
}

fn exit_code_of(s: &RunSummary) -> u8 {
    if s.aborted.is_some() {
        3
    } else if s.rows_failed > 0 || s.documents_failed > 0 {
        2
    } else {
        0
    }
}
