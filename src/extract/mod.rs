//! The extraction stage: a JSON Schema drives the prompt, constrains decoding (llguidance) and types the columns.
//!
//! - [`schema`]: [`ExtractionSchema::load`] (JSON Schema -> field tree -> Arrow schema; unsupported constructs
//!   refused with their JSON path; sha256 of the canonical JSON), grammar schema, answer validation.
//! - [`prompt`]: the instruction built from titles and descriptions.
//! - [`constraint`]: [`GrammarEnv`] (once per process) and [`SchemaConstraint`], the engine's step hook.
//! - [`answer`]: the answer's JSON with byte spans, for per-field confidence.
//! - [`review`]: confidence thresholds (a value below its field's is written as null and named in `_review`).
//! - [`rows`]: results -> Arrow record batches with provenance and operations columns.
//! - [`Extractor`]: pages -> prompts -> constrained generation -> [`ExtractionRecord`]s, one per input, failures
//!   included.

pub mod answer;
pub mod constraint;
pub mod ground;
pub mod merge;
pub mod prompt;
pub mod review;
pub mod rows;
pub mod schema;
pub mod stream;
pub mod values;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;

use crate::raster::text::TextLayer;

pub use constraint::{GrammarEnv, RowReport, SchemaConstraint, StepTrace};
pub use review::ReviewPolicy;
pub use rows::{
    ExtractionRecord, Outcome, RunContext, SourceInfo, StageLatency, row_schema, to_record_batch,
    to_record_batch_per_row,
};
pub use schema::{ExtractionSchema, FieldDef, FieldType};
pub use stream::{Extracted, ExtractionStream};
pub use values::provenance::ErrorKind;

use crate::model::{
    BatchPolicy, EncodedPrompt, FinishReason, Generation, GenerationConfig, GenerationStats,
    PixtralEngine, PreparedImage, Prompt, PromptPart,
};

#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    #[error("cannot read schema {}", path.display())]
    SchemaRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("schema {} is not valid JSON", path.display())]
    SchemaParse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("schema {schema}: unsupported construct at {path}: {reason}")]
    Unsupported {
        schema: String,
        path: String,
        reason: String,
    },
    /// llguidance could not set up or compile a grammar (its errors are `anyhow` values, kept whole).
    #[error("grammar: {what}")]
    Grammar {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot load tokenizer {} for llguidance", path.display())]
    GrammarTokenizer {
        path: PathBuf,
        #[source]
        source: tokenizers::Error,
    },
    #[error("building Arrow columns")]
    Arrow(#[from] arrow::error::ArrowError),
    /// The answer's JSON does not have the shape the schema's Arrow type needs.
    #[error("{path}: {reason}")]
    Shape { path: String, reason: String },
    #[error("model")]
    Model(#[from] crate::model::ModelError),
    /// A setting that cannot apply to this schema (a threshold out of range, a field that does not exist).
    #[error("{0}")]
    Config(String),
    /// A broken promise inside pixtract, not a property of the input.
    #[error("internal error: {0}")]
    Internal(&'static str),
}

/// Schema-constrained extraction, or plain transcription.
#[derive(Debug, Clone)]
pub enum Mode {
    Schema(Box<ExtractionSchema>),
    FreeText,
}

/// One document (or page range) to extract from. `images` are prepared with the engine's preprocessor.
#[derive(Debug, Clone)]
pub struct PageInput {
    pub source: SourceInfo,
    pub images: Vec<PreparedImage>,
    /// Each page's number (1-based) and text layer (None: a scan, or grounding off), for grounding the answer.
    pub text_layers: Vec<(u32, Option<Arc<TextLayer>>)>,
    pub fetch_ms: Option<f64>,
    pub raster_ms: Option<f64>,
}

/// A document (or page) that failed before the model: it becomes an error row of its own.
#[derive(Debug, Clone)]
pub struct FailedInput {
    pub source: SourceInfo,
    pub kind: ErrorKind,
    /// The `error` column: names the document and the cause.
    pub error: String,
}

/// Results of one [`Extractor::run`], in input order.
#[derive(Debug)]
pub struct ExtractionOutput {
    pub records: Vec<ExtractionRecord>,
    /// The raw generations (None where the input failed before the model).
    pub generations: Vec<Option<Generation>>,
    /// Grammar reports (schema mode).
    pub reports: Vec<Option<RowReport>>,
    pub stats: GenerationStats,
    /// Time spent in llguidance (masks + token consumption).
    pub grammar_time: std::time::Duration,
}

/// Grounds an answer against its prompt's pages ([`ground`]); a one-page prompt's values all come from that page,
/// which their `_location` says even where no box was found.
fn ground(
    node: &mut answer::Node,
    fields: &[FieldDef],
    text_layers: &[(u32, Option<Arc<TextLayer>>)],
) {
    let pages: Vec<ground::PageText> = text_layers
        .iter()
        .filter_map(|(page, layer)| Some(ground::PageText::new(*page, layer.as_deref()?)))
        .collect();
    if !pages.is_empty() {
        let complete = pages.len() == text_layers.len();
        ground::ground_object(node, fields, &pages, complete);
    }
    if let [(page, _)] = text_layers {
        ground::set_page(node, *page);
    }
}

pub struct Extractor {
    mode: Mode,
    env: Option<Arc<GrammarEnv>>,
    pub config: GenerationConfig,
    pub policy: BatchPolicy,
    /// Keep per-step traces in the reports (tests, debugging).
    pub trace: bool,
    /// Confidence thresholds (none by default): values below theirs are nulled and named in `_review`.
    pub review: ReviewPolicy,
}

impl Extractor {
    /// Prepares extraction on `engine`'s tokenizer: builds the grammar environment once per process and compiles
    /// the schema's grammar, so a schema llguidance cannot handle fails here, not at the first document.
    pub fn new(
        engine: &PixtralEngine,
        mode: Mode,
        config: GenerationConfig,
        policy: BatchPolicy,
    ) -> Result<Self, ExtractError> {
        let env = match &mode {
            Mode::Schema(schema) => {
                let env = GrammarEnv::for_engine(engine)?;
                env.check(schema)?;
                Some(env)
            }
            Mode::FreeText => None,
        };
        Ok(Extractor {
            mode,
            env,
            config,
            policy,
            trace: false,
            review: ReviewPolicy::default(),
        })
    }

    pub fn schema(&self) -> Option<&ExtractionSchema> {
        match &self.mode {
            Mode::Schema(s) => Some(s),
            Mode::FreeText => None,
        }
    }

    pub fn instruction(&self) -> String {
        match &self.mode {
            Mode::Schema(s) => prompt::schema_instruction(s),
            Mode::FreeText => prompt::free_text_instruction(),
        }
    }

    /// The chat prompt for some page images: the images, then the instruction.
    pub fn encode(
        &self,
        engine: &PixtralEngine,
        images: Vec<PreparedImage>,
    ) -> Result<EncodedPrompt, ExtractError> {
        let mut parts: Vec<PromptPart> = images.into_iter().map(PromptPart::Image).collect();
        parts.push(PromptPart::Text(self.instruction()));
        Ok(engine.tokenizer.encode(Prompt {
            system: None,
            parts,
        })?)
    }

    /// Extracts every input; each gives exactly one record (failed inputs and failed generations included), in
    /// input order. All inputs go into one [`ExtractionStream`] at once, stepped until it is done.
    pub fn run(
        &self,
        engine: &mut PixtralEngine,
        inputs: Vec<Result<PageInput, FailedInput>>,
    ) -> Result<ExtractionOutput, ExtractError> {
        let n = inputs.len();
        let mut records: Vec<Option<ExtractionRecord>> = vec![None; n];
        let mut generations: Vec<Option<Generation>> = vec![None; n];
        let mut reports: Vec<Option<RowReport>> = vec![None; n];
        // Slots sized for the longest prompt given (a prompt's length does not depend on the stream's capacity).
        // The instruction is encoded once; each page adds its `[IMG]`/`[IMG_BREAK]` grid.
        let grids = inputs
            .iter()
            .filter_map(|i| i.as_ref().ok())
            .map(|p| p.images.iter().map(|i| i.grid.num_tokens()).sum::<usize>())
            .max()
            .unwrap_or(0);
        let longest = self.instruction_tokens(engine).unwrap_or(0) + grids;
        let mut stream = self.stream(engine, longest);
        for input in inputs {
            let (id, record) = stream.add(engine, input);
            if let (Some(slot), Some(record)) = (records.get_mut(id), record) {
                *slot = Some(record);
            }
        }
        while !stream.is_idle() {
            for done in stream.step(engine) {
                let i = done.input;
                if i < n {
                    records[i] = Some(done.record);
                    generations[i] = done.generation;
                    reports[i] = done.report;
                }
            }
        }
        let (stats, grammar_time) = (stream.stats().clone(), stream.grammar_time());
        let records = records
            .into_iter()
            .map(|r| r.ok_or(ExtractError::Internal("an input got no record")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ExtractionOutput {
            records,
            generations,
            reports,
            stats,
            grammar_time,
        })
    }

    /// Turns one generation into a record: decode, parse, validate, confidences, grounding against the prompt's
    /// pages' text layers (`text_layers`: each page's number and layer), thresholds.
    pub fn record(
        &self,
        engine: &PixtralEngine,
        source: SourceInfo,
        generation: &Generation,
        report: Option<&RowReport>,
        text_layers: &[(u32, Option<Arc<TextLayer>>)],
        mut latency: StageLatency,
    ) -> ExtractionRecord {
        let t0 = Instant::now();
        let closing_from = report.and_then(|r| r.closing_from);
        let finish = match (closing_from, generation.finish) {
            (Some(_), _) => "budget",
            (None, FinishReason::Eos) => "eos",
            (None, FinishReason::Length) => "length",
            (None, FinishReason::Hook) => "grammar",
            (_, FinishReason::Failed) => "error",
        };
        let mut rec = ExtractionRecord {
            source,
            processed_at: Utc::now(),
            outcome: Outcome::Failed(String::new()),
            warning: None,
            error_kind: None,
            finish_reason: Some(finish.to_string()),
            raw_output: None,
            prompt_tokens: Some(generation.prompt_tokens as u32),
            generated_tokens: Some(generation.tokens.len() as u32),
            latency,
            review: Vec::new(),
        };
        if generation.finish == FinishReason::Failed {
            // This row alone failed during generation (grammar error): its own error row.
            rec.error_kind = Some(ErrorKind::Generation);
            rec.outcome = Outcome::Failed(format!(
                "generation: {}",
                generation.error.as_deref().unwrap_or("failed")
            ));
            if let Some(env) = &self.env {
                rec.raw_output = Some(env.answer_text(&generation.tokens).0);
            }
            return rec;
        }
        let mut probs = generation.token_probs.clone();
        if let Some(from) = closing_from {
            probs.iter_mut().skip(from).for_each(|p| *p = 0.0);
        }
        match (&self.mode, &self.env) {
            (Mode::Schema(schema), Some(env)) => {
                let (text, ends) = env.answer_text(&generation.tokens);
                rec.raw_output = Some(text.clone());
                rec.outcome = match answer::parse(&text) {
                    Err(e) => Outcome::Failed(format!("answer is not valid JSON ({finish}): {e}")),
                    Ok(mut node) => match schema.validate(&node.to_value()) {
                        Err(errors) => Outcome::Failed(format!(
                            "answer does not match schema {}: {}",
                            schema.name,
                            errors.join("; ")
                        )),
                        Ok(()) => {
                            node.attach_confidence(&ends, &probs);
                            ground(&mut node, &schema.fields, text_layers);
                            rec.review = self.review.apply(&mut node, &schema.fields);
                            Outcome::Extracted(node)
                        }
                    },
                };
                if let Some(from) = closing_from {
                    rec.warning = Some(format!(
                        "answer reached the token budget ({} new tokens) and was closed early from token {from}: \
                         later fields are forced (null/empty)",
                        self.config.max_new_tokens
                    ));
                }
            }
            _ => {
                let ids: Vec<u32> = generation
                    .tokens
                    .iter()
                    .copied()
                    .take_while(|&t| t != engine.model.manifest.tokens.eos)
                    .collect();
                match engine.tokenizer.decode(&ids) {
                    Err(e) => rec.outcome = Outcome::Failed(format!("decode: {e}")),
                    Ok(text) => {
                        let conf = answer::span_confidence(
                            0,
                            usize::MAX,
                            &(1..=ids.len()).collect::<Vec<_>>(),
                            &probs,
                        );
                        rec.raw_output = Some(text.clone());
                        rec.outcome = if self.review.review_text(conf) {
                            rec.review = vec![review::Flagged {
                                path: "text".to_string(),
                                reason: review::ReviewReason::LowConfidence,
                            }];
                            Outcome::Text {
                                text: None,
                                confidence: conf,
                            }
                        } else {
                            Outcome::Text {
                                text: Some(text),
                                confidence: conf,
                            }
                        };
                        if generation.finish == FinishReason::Length {
                            rec.warning = Some(format!(
                                "transcription reached max_new_tokens ({}) and may be cut",
                                self.config.max_new_tokens
                            ));
                        }
                    }
                }
            }
        }
        if matches!(rec.outcome, Outcome::Failed(_)) {
            rec.error_kind.get_or_insert(ErrorKind::Answer);
        } else if rec.warning.is_some() {
            rec.error_kind = Some(ErrorKind::Budget);
        }
        latency.parse_ms = Some(t0.elapsed().as_secs_f64() * 1e3);
        rec.latency = latency;
        rec
    }
}
