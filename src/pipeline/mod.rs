//! The job runner: source -> raster -> preprocess -> model (+ grammar) -> rows -> Parquet, as one stream.
//!
//! Stages are connected by bounded channels, so memory stays flat whatever the corpus size: listing and fetching
//! run ahead only as far as the raster stage takes documents, the raster stage only as far as the model takes
//! prompts. The model stage owns the engine on its own thread and forms batches from whatever prompts are ready.
//! Every document ends as rows: pages that rendered become extractions, a failure becomes an error row.

mod model_stage;
pub mod pages;
mod produce;
pub mod report;
mod run;
pub mod spec;
pub mod state;
mod writer;

use std::path::PathBuf;

use crate::extract::{ExtractError, FailedInput, PageInput};
use crate::model::ModelError;
use crate::raster::RasterError;
use crate::sink::SinkError;
use crate::source::SourceError;

pub use report::{EventSink, Events, StageBusy};
pub use run::run;
pub use spec::PipelineSpec;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("cannot read pipeline spec {}", path.display())]
    SpecRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pipeline spec {} is not valid", path.display())]
    SpecParse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("pipeline spec {}: {reason}", path.display())]
    Spec { path: PathBuf, reason: String },
    #[error(
        "[raster] max_side = {asked} is larger than the model's image size {model} ({}); use 0 (the model's) or less",
        dir.display()
    )]
    ModelView {
        asked: u32,
        model: usize,
        dir: PathBuf,
    },
    #[error(
        "[raster] password_env = {name:?}, but no such environment variable is set: every encrypted PDF would fail; set it or remove the key"
    )]
    PasswordEnvUnset { name: String },
    #[error("source")]
    Source(#[from] SourceError),
    #[error("raster")]
    Raster(#[from] RasterError),
    #[error("model")]
    Model(#[from] ModelError),
    #[error("schema")]
    Schema(#[source] ExtractError),
    #[error("extraction failed")]
    Extract(#[source] ExtractError),
    #[error("building rows")]
    Rows(#[source] ExtractError),
    #[error("output")]
    Sink(#[from] SinkError),
    #[error("output state")]
    State(#[from] state::StateError),
    #[error("output lease")]
    Lease(#[from] crate::sink::lease::LeaseError),
    #[error("run summary")]
    Summary(#[source] serde_json::Error),
    #[error("{what}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} failed")]
    Task {
        what: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
    #[error("the model thread panicked: {0}")]
    ModelPanicked(String),
    #[error("{0}")]
    Stopped(&'static str),
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
    /// Rows with values withheld by `[extract] min_confidence` (named in their `_review` column).
    pub rows_for_review: usize,
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
    /// What the decoder did: admissions into KV-cache slots, steps, idle row share, host time per step.
    pub decode: DecodeSummary,
    /// Whether the run did all it was asked (false when stopped early: no `_SUCCESS` then).
    pub completed: bool,
    /// The job a shard belongs to (sharded runs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// The partition folder the run wrote into, relative to the output ("" when unpartitioned).
    #[serde(skip)]
    pub partition: String,
    /// Where the run report went (`[output] report`), relative to the output; set after the manifest is written.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report: Option<String>,
}

/// What the model stage's engine did over a run (the manifest's `decode` object).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct DecodeSummary {
    /// "continuous" or "static" (an eager decoder batches statically whatever the spec says).
    pub batching: String,
    /// KV-cache slots (continuous) or the largest batch (static): `[model] batch_size`.
    pub slots: usize,
    /// Prompts admitted into KV-cache slots (continuous batching; 0 for static batches).
    pub admissions: usize,
    /// Decoder passes over generated tokens.
    pub steps: usize,
    /// Row places those passes offered (slots per step; a static batch's size per step) plus one per first token.
    pub row_steps: usize,
    /// Row places that held a live sequence.
    pub live_row_steps: usize,
    /// Share of `row_steps` spent on no live sequence (free slots, rows of a static batch that had finished).
    pub idle_row_share: f64,
    /// Host time per decode step outside the forward pass: grammar masks, sampling, bookkeeping.
    pub host_ms_per_step: f64,
    /// Forward-pass time per decode step.
    pub forward_ms_per_step: f64,
    /// Time in llguidance, all rows (schema mode).
    pub grammar_ms: f64,
    /// The most any scheduler over these slots could gain in decode passes over static batches of `slots`
    /// prompts in arrival order, for this run's own answer lengths, where a step costs the same at any width (the
    /// GPU regime; `bench batching` fits the CPU's per-row cost): static's passes over `ceil(row-passes / slots)`.
    pub ceiling: f64,
    /// Why the model stage stopped early (the engine failed on several steps in a row), if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stopped: Option<String>,
}

impl DecodeSummary {
    /// From the engine's counters; `answers` are the generated rows' answer lengths in the order they finished.
    pub fn new(
        stats: &crate::model::GenerationStats,
        grammar: std::time::Duration,
        batching: crate::model::Batching,
        slots: usize,
        answers: &[u32],
    ) -> Self {
        let steps = stats.steps.max(1) as f64;
        let host = stats.decode.saturating_sub(stats.forward);
        DecodeSummary {
            batching: batching.name().to_string(),
            slots,
            admissions: stats.admissions,
            steps: stats.steps,
            row_steps: stats.decode_row_capacity,
            live_row_steps: stats.decode_tokens,
            idle_row_share: 1.0
                - stats.decode_tokens as f64 / stats.decode_row_capacity.max(1) as f64,
            host_ms_per_step: host.as_secs_f64() * 1e3 / steps,
            forward_ms_per_step: stats.forward.as_secs_f64() * 1e3 / steps,
            grammar_ms: grammar.as_secs_f64() * 1e3,
            ceiling: scheduling_ceiling(answers, slots),
            stopped: None,
        }
    }
}

/// Decode passes of static batches of `slots` consecutive answers (each as long as its longest answer; a first
/// token comes from prefill) over the fewest passes any schedule needs (every pass full). 1 when nothing decoded.
pub fn scheduling_ceiling(answers: &[u32], slots: usize) -> f64 {
    let slots = slots.max(1);
    let passes = |n: &u32| n.saturating_sub(1) as usize;
    let static_passes: usize = answers
        .chunks(slots)
        .map(|b| b.iter().map(passes).max().unwrap_or(0))
        .sum();
    let ideal = answers.iter().map(passes).sum::<usize>().div_ceil(slots);
    if ideal == 0 {
        1.0
    } else {
        static_passes as f64 / ideal as f64
    }
}

/// Inputs for the model stage: one prompt's pages, or a document that failed before the model.
type ModelInput = Result<PageInput, FailedInput>;

/// How this invocation relates to other runs over the same input and output.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Reprocess documents the output already holds.
    pub force: bool,
    /// Process only documents whose stable URI hash falls in shard `index` of `count`.
    pub shard: Option<(u64, u64)>,
    /// Where progress and events go (none: the run reports nothing; the binary prints them on stderr).
    pub events: Events,
    /// How long to wait while another run holds the output's lease (None: `[output] lease_wait_s`, else as long
    /// as it takes).
    pub lease_wait: Option<std::time::Duration>,
    /// Set by the caller to stop the run early (the binary sets it on SIGINT/SIGTERM): documents in flight are
    /// finished and committed, those not started are left for the next run, and the summary says it was stopped.
    pub cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// The job a sharded run belongs to (`--job-id`, or the scheduler's): the shards of one job share it, and the
    /// job's `_SUCCESS` appears when all of them completed. None: derived from the spec's name, the output, the
    /// shard count and the UTC date.
    pub job: Option<String>,
}

/// The job id of shard runs that were given none: the same for every shard of one spec, output and count on one
/// UTC day, so the nightly shards of one job meet and the next night's job starts afresh.
pub fn derived_job_id(spec: &PipelineSpec, count: u64) -> String {
    use sha2::{Digest, Sha256};
    let day = chrono::Utc::now().format("%Y-%m-%d");
    let key = format!("{}\n{}\n{count}\n{day}", spec.name, spec.output.uri);
    let digest = Sha256::digest(key.as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
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

/// The async runtime a run needs (all drivers: timers, I/O, signals).
pub fn runtime() -> Result<tokio::runtime::Runtime, PipelineError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|source| PipelineError::Io {
            what: "cannot start the async runtime",
            source,
        })
}

/// Runs a pipeline to completion (or to its failure budget). Blocks the calling thread.
pub fn run_blocking(spec: PipelineSpec, opts: RunOptions) -> Result<RunSummary, PipelineError> {
    runtime()?.block_on(run(spec, opts))
}
