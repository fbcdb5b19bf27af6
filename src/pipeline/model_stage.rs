//! The model stage: its own thread owns the engine (ONNX Runtime sessions are driven synchronously) and streams
//! prompts through it: whatever arrives is added while the engine has room, every step hands the rows that
//! finished to the writer, and a freed KV-cache slot takes the next waiting prompt at the next step.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::produce::mark_transient;
use super::report::Progress;
use super::{DecodeSummary, ModelInput, PipelineError, spec};
use crate::extract::{ExtractionRecord, ExtractionStream, Extractor, Mode, Outcome, ReviewPolicy};
use crate::model::runtime::Threads;
use crate::model::{
    BatchPolicy, Device, EngineOptions, GenerationConfig, OrtRuntime, PixtralEngine,
};

/// What the model stage needs besides its channels.
pub(super) struct ModelStageConfig {
    pub spec: spec::ModelSpec,
    pub device: Device,
    pub mode: Mode,
    pub review: ReviewPolicy,
    /// Pages per prompt and the long side of a page: the longest prompt, which sizes the KV-cache slots.
    pub pages_per_prompt: usize,
    /// Document mode: the longest prompt (a window of pages), instead of `pages_per_prompt` pages.
    pub max_prompt_tokens: Option<usize>,
    pub max_side: usize,
    /// Where the decode counters go for the progress line.
    pub progress: std::sync::Arc<Progress>,
    /// Set when the engine keeps failing: the producer stops taking documents.
    pub abort: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// Engine steps failing one after another (each on different prompts) before the device is taken to be broken and
/// the run stops (exit 3) instead of writing every remaining document as a `retry` row.
const FAILED_STEPS_TO_STOP: usize = 3;

/// Loads the engine, says whether that worked on `ready`, then streams `inputs` through it until the channel
/// closes and the engine is idle. Returns what the decoder did.
pub(super) fn model_stage(
    config: ModelStageConfig,
    inputs: mpsc::Receiver<ModelInput>,
    rows: mpsc::Sender<(Vec<ExtractionRecord>, Duration)>,
    ready: std::sync::mpsc::Sender<Option<usize>>,
) -> Result<DecodeSummary, PipelineError> {
    let started = start(&config).and_then(|(rt, engine, extractor)| {
        let instruction = extractor
            .instruction_tokens(&engine)
            .map_err(PipelineError::Model)?;
        Ok((rt, engine, extractor, instruction))
    });
    let (_rt, mut engine, extractor, instruction) = match started {
        Ok(v) => {
            let _ = ready.send(Some(v.3));
            v
        }
        Err(e) => {
            // The run takes the typed error from this thread's result.
            let _ = ready.send(None);
            return Err(e);
        }
    };
    let max_prompt = match config.max_prompt_tokens {
        Some(tokens) => tokens.max(instruction + 1),
        None => extractor
            .max_prompt_tokens(&engine, config.pages_per_prompt, config.max_side)
            .map_err(PipelineError::Model)?,
    };
    let mut stream = extractor.stream(&engine, max_prompt);
    // (input id = arrival order, answer length): the ceiling groups static batches in arrival order.
    let mut answers: Vec<(usize, u32)> = Vec::new();
    let stopped = feed(
        &mut engine,
        &mut stream,
        inputs,
        &rows,
        &mut answers,
        &config,
    )?;
    answers.sort_unstable();
    let lengths: Vec<u32> = answers.iter().map(|&(_, n)| n).collect();
    let mut summary = DecodeSummary::new(
        stream.stats(),
        stream.grammar_time(),
        config.spec.batching,
        config.spec.batch_size,
        &lengths,
    );
    summary.stopped = stopped;
    Ok(summary)
}

/// ONNX Runtime, the engine and the extractor, as the spec asks.
fn start(
    config: &ModelStageConfig,
) -> Result<(OrtRuntime, PixtralEngine, Extractor), PipelineError> {
    let spec = &config.spec;
    let rt = OrtRuntime::load_from_env_with_pool(Threads {
        intra_op: spec.threads,
        spin: spec.spin,
    })?;
    let opts = EngineOptions {
        device: config.device,
    };
    let engine = PixtralEngine::load(&rt, &spec.dir, opts)?;
    let generation = GenerationConfig {
        max_new_tokens: spec.max_new_tokens,
        prefill_chunk: spec.prefill_chunk,
        ..Default::default()
    };
    let policy = BatchPolicy {
        max_batch: spec.batch_size,
        token_budget: spec.token_budget,
        batching: spec.batching,
        prefill_chunks_per_step: spec.prefill_chunks_per_step,
        vision_ahead: spec.vision_ahead,
        // On a GPU the host cores are idle during the forward pass: the grammar's masks are computed then.
        overlap_masks: matches!(config.device, Device::Cuda(_)),
    };
    let mut extractor = Extractor::new(&engine, config.mode.clone(), generation, policy)
        .map_err(PipelineError::Extract)?;
    extractor.review = config.review.clone();
    Ok((rt, engine, extractor))
}

/// The stream loop: take what is ready (waiting only when the engine has nothing to do), step, hand the finished
/// rows on. `answers` gets each generated row's answer length, in the order rows finished. Returns why it stopped
/// early (the engine kept failing), if it did.
fn feed(
    engine: &mut PixtralEngine,
    stream: &mut ExtractionStream<'_>,
    mut inputs: mpsc::Receiver<ModelInput>,
    rows: &mpsc::Sender<(Vec<ExtractionRecord>, Duration)>,
    answers: &mut Vec<(usize, u32)>,
    config: &ModelStageConfig,
) -> Result<Option<String>, PipelineError> {
    let progress = &config.progress;
    let mut failed_steps = 0;
    let mut stopped = None;
    let mut open = true;
    let mut out: Vec<ExtractionRecord> = Vec::new();
    // Model time since rows were last handed on (most steps finish no row).
    let mut busy = Duration::ZERO;
    loop {
        while open && stream.has_capacity() {
            let input = if stream.is_idle() && out.is_empty() {
                match inputs.blocking_recv() {
                    Some(input) => input,
                    None => {
                        open = false;
                        break;
                    }
                }
            } else {
                match inputs.try_recv() {
                    Ok(input) => input,
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            };
            if let (_, Some(record)) = stream.add(engine, input) {
                out.push(record);
            }
        }
        if !stream.is_idle() {
            let t = Instant::now();
            let mut step_failed = false;
            for mut done in stream.step(engine) {
                if let Some(g) = &done.generation {
                    answers.push((done.input, g.tokens.len() as u32));
                }
                if done.transient {
                    step_failed = true;
                    mark_retry(&mut done.record);
                }
                out.push(done.record);
            }
            failed_steps = if step_failed { failed_steps + 1 } else { 0 };
            if failed_steps >= FAILED_STEPS_TO_STOP && stopped.is_none() {
                let cause = out
                    .last()
                    .and_then(|r| r.error_message())
                    .unwrap_or_default()
                    .to_string();
                stopped = Some(format!(
                    "the model failed on {failed_steps} steps in a row, last: {cause}; documents not finished are left for the next run"
                ));
                config.abort.store(true, Ordering::SeqCst);
                // What is still queued is not tried: its documents stay incomplete and are not written.
                open = false;
                while inputs.blocking_recv().is_some() {}
            }
            busy += t.elapsed();
            let stats = stream.stats();
            progress
                .row_steps
                .store(stats.decode_row_capacity, Ordering::Relaxed);
            progress
                .live_row_steps
                .store(stats.decode_tokens, Ordering::Relaxed);
        }
        if !out.is_empty()
            && rows
                .blocking_send((std::mem::take(&mut out), std::mem::take(&mut busy)))
                .is_err()
        {
            return Err(PipelineError::Stopped(
                "the writer stopped before the model stage",
            ));
        }
        if !open && stream.is_idle() {
            return Ok(stopped);
        }
    }
}

/// A row whose engine step failed for a transient reason (an error row, made by the stream): `retry` until its
/// document's attempts run out.
fn mark_retry(record: &mut ExtractionRecord) {
    if let Outcome::Failed(error) = &mut record.outcome {
        mark_transient(&mut record.source, error);
    }
}
