//! The model stage: its own thread owns the engine (ONNX Runtime sessions are driven synchronously) and forms
//! batches from whatever prompts are ready.

use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::{ModelInput, PipelineError, spec};
use crate::extract::{ExtractionRecord, Extractor, Mode, ReviewPolicy};
use crate::model::runtime::Threads;
use crate::model::{
    BatchPolicy, Device, EngineOptions, GenerationConfig, OrtRuntime, PixtralEngine,
};

/// Owns the engine: takes whatever prompts are ready (up to the batch size), extracts, hands rows on.
pub(super) fn model_stage(
    spec: spec::ModelSpec,
    device: Device,
    mode: Mode,
    review: ReviewPolicy,
    mut inputs: mpsc::Receiver<ModelInput>,
    rows: mpsc::Sender<(Vec<ExtractionRecord>, Duration)>,
    ready: std::sync::mpsc::Sender<bool>,
) -> Result<(), PipelineError> {
    let start = || -> Result<_, PipelineError> {
        let rt = OrtRuntime::load_from_env_with_pool(Threads {
            intra_op: spec.threads,
            spin: spec.spin,
        })?;
        let opts = EngineOptions { device };
        let engine = PixtralEngine::load(&rt, &spec.dir, opts)?;
        let config = GenerationConfig {
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
        };
        let mut extractor =
            Extractor::new(&engine, mode, config, policy).map_err(PipelineError::Extract)?;
        extractor.review = review;
        Ok((rt, engine, extractor))
    };
    let (_rt, mut engine, extractor) = match start() {
        Ok(v) => {
            let _ = ready.send(true);
            v
        }
        Err(e) => {
            // The run takes the typed error from this thread's result.
            let _ = ready.send(false);
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
        let records = extractor
            .run(&mut engine, batch)
            .map_err(PipelineError::Extract)?
            .records;
        if rows.blocking_send((records, t.elapsed())).is_err() {
            return Err(PipelineError::Stopped(
                "the writer stopped before the model stage",
            ));
        }
    }
    Ok(())
}
