//! Extraction as a stream: inputs are added one at a time as they arrive, each [`ExtractionStream::step`]
//! advances the engine by one step and returns the records of the inputs that finished. The model stage feeds it
//! from its channel (a page arriving while rows decode takes the next free slot); [`Extractor::run`] adds a whole
//! list and steps until it is done.

use crate::error::Retryable;
use std::collections::HashMap;
use std::time::Duration;

use super::{
    ErrorKind, ExtractionRecord, Extractor, FailedInput, Mode, PageInput, RowReport,
    SchemaConstraint, SourceInfo, StageLatency,
};
use crate::model::{
    Generation, GenerationStats, ModelError, NoHook, PixtralEngine, Prompt, PromptPart,
    StreamEngine,
};

/// One input's result: its record, and for inputs that reached the model, the generation and grammar report.
#[derive(Debug)]
pub struct Extracted {
    /// The id [`ExtractionStream::add`] gave the input.
    pub input: usize,
    pub record: ExtractionRecord,
    pub generation: Option<Generation>,
    pub report: Option<RowReport>,
    /// The engine step failed for a reason a later run may not meet ([`ModelError::is_transient`]): the caller
    /// decides whether the row is a `retry`.
    pub transient: bool,
}

/// What an input in the engine carries to its record.
struct Pending {
    source: SourceInfo,
    text_layers: Vec<(u32, Option<std::sync::Arc<crate::raster::text::TextLayer>>)>,
    fetch_ms: Option<f64>,
    raster_ms: Option<f64>,
}

pub struct ExtractionStream<'x> {
    extractor: &'x Extractor,
    engine: StreamEngine,
    constraint: Option<SchemaConstraint>,
    pending: HashMap<usize, Pending>,
    next_id: usize,
}

impl Extractor {
    /// A stream over `engine` for prompts of up to `max_prompt_tokens` tokens ([`Extractor::max_prompt_tokens`]).
    pub fn stream(&self, engine: &PixtralEngine, max_prompt_tokens: usize) -> ExtractionStream<'_> {
        let constraint = match (&self.mode, &self.env) {
            (Mode::Schema(s), Some(env)) => Some(
                SchemaConstraint::new(env.clone(), s, self.config.max_new_tokens)
                    .with_trace(self.trace),
            ),
            _ => None,
        };
        ExtractionStream {
            extractor: self,
            engine: engine.stream(self.config.clone(), self.policy, max_prompt_tokens),
            constraint,
            pending: HashMap::new(),
            next_id: 0,
        }
    }

    /// The longest prompt this extractor builds from `pages` pages whose long side is at most `max_side` pixels:
    /// the instruction, the chat tokens and each page's `[IMG]`/`[IMG_BREAK]` grid at its largest. Sizes the KV
    /// cache of a stream whose prompts are not known in advance.
    pub fn max_prompt_tokens(
        &self,
        engine: &PixtralEngine,
        pages: usize,
        max_side: usize,
    ) -> Result<usize, ModelError> {
        let pre = &engine.preprocessor;
        let side = max_side.min(pre.max_side) as u32;
        let page = pre.grid_for(side, side).num_tokens();
        Ok(self.instruction_tokens(engine)? + pages.max(1) * page)
    }

    /// Tokens of a prompt without images: the chat tokens and the instruction.
    pub fn instruction_tokens(&self, engine: &PixtralEngine) -> Result<usize, ModelError> {
        let text = engine.tokenizer.encode(Prompt {
            system: None,
            parts: vec![PromptPart::Text(self.instruction())],
        })?;
        Ok(text.ids.len())
    }
}

impl ExtractionStream<'_> {
    /// Adds one input; returns its id, and its record at once when it cannot reach the model (it failed before,
    /// its prompt cannot be built, or it does not fit the context).
    pub fn add(
        &mut self,
        engine: &PixtralEngine,
        input: Result<PageInput, FailedInput>,
    ) -> (usize, Option<ExtractionRecord>) {
        let id = self.next_id;
        self.next_id += 1;
        let page = match input {
            Err(failed) => {
                let record = ExtractionRecord::failed(failed.source, failed.kind, failed.error);
                return (id, Some(record));
            }
            Ok(page) => page,
        };
        let prompt = match self.extractor.encode(engine, page.images) {
            Ok(p) => p,
            Err(e) => {
                let error = format!("prompt: {}", crate::error::chain(&e));
                let record = ExtractionRecord::failed(page.source, ErrorKind::Prompt, error);
                return (id, Some(record));
            }
        };
        let (len, new_tokens) = (prompt.ids.len(), self.extractor.config.max_new_tokens);
        if let Err(e) = self.engine.add(id, prompt) {
            let error = match e {
                ModelError::ContextTooLong { limit, .. } => format!(
                    "prompt of {len} tokens + {new_tokens} new tokens exceeds the model's context of {limit}"
                ),
                e => format!("prompt: {}", crate::error::chain(&e)),
            };
            let record = ExtractionRecord::failed(page.source, ErrorKind::Prompt, error);
            return (id, Some(record));
        }
        let pending = Pending {
            source: page.source,
            text_layers: page.text_layers,
            fetch_ms: page.fetch_ms,
            raster_ms: page.raster_ms,
        };
        self.pending.insert(id, pending);
        (id, None)
    }

    /// Whether the feeder should add more before the next step.
    pub fn has_capacity(&self) -> bool {
        self.engine.has_capacity()
    }

    pub fn is_idle(&self) -> bool {
        self.engine.is_idle()
    }

    /// Inputs in the engine (waiting, prefilling or generating).
    pub fn in_flight(&self) -> usize {
        self.engine.in_flight()
    }

    /// One engine step; the inputs that finished, as records. When the step itself fails (ONNX Runtime, the
    /// device), every input in the engine gets an error row naming the cause, and the stream goes on empty.
    pub fn step(&mut self, engine: &mut PixtralEngine) -> Vec<Extracted> {
        let stepped = match self.constraint.as_mut() {
            Some(c) => self.engine.step(engine, c),
            None => self.engine.step(engine, &mut NoHook),
        };
        match stepped {
            Ok(finished) => finished
                .into_iter()
                .filter_map(|f| {
                    let report = self.constraint.as_mut().and_then(|c| c.take_report(f.id));
                    let pending = self.pending.remove(&f.id)?;
                    let latency = StageLatency {
                        fetch_ms: pending.fetch_ms,
                        raster_ms: pending.raster_ms,
                        vision_ms: Some(ms(f.timing.vision)),
                        prefill_ms: Some(ms(f.timing.prefill)),
                        decode_ms: Some(ms(f.timing.decode)),
                        grammar_ms: report.as_ref().map(|r| ms(r.grammar_time)),
                        parse_ms: None,
                    };
                    let record = self.extractor.record(
                        engine,
                        pending.source,
                        &f.generation,
                        report.as_ref(),
                        &pending.text_layers,
                        latency,
                    );
                    Some(Extracted {
                        input: f.id,
                        record,
                        generation: Some(f.generation),
                        report,
                        transient: false,
                    })
                })
                .collect(),
            Err(e) => {
                let transient = e.is_retryable();
                let error = format!("generation: {}", crate::error::chain(&e));
                self.engine
                    .abandon()
                    .into_iter()
                    .filter_map(|id| {
                        if let Some(c) = self.constraint.as_mut() {
                            c.take_report(id);
                        }
                        let pending = self.pending.remove(&id)?;
                        let record = ExtractionRecord::failed(
                            pending.source,
                            ErrorKind::Generation,
                            error.clone(),
                        );
                        Some(Extracted {
                            input: id,
                            record,
                            generation: None,
                            report: None,
                            transient,
                        })
                    })
                    .collect()
            }
        }
    }

    /// The engine's counters and times so far.
    pub fn stats(&self) -> &GenerationStats {
        &self.engine.stats
    }

    /// Time spent in llguidance so far (masks and token consumption, every row).
    pub fn grammar_time(&self) -> Duration {
        self.constraint
            .as_ref()
            .map_or(Duration::ZERO, |c| c.grammar_time)
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
