//! Constrained decoding with llguidance: one grammar matcher per sequence, applied in the engine's step hook.
//!
//! - [`GrammarEnv`]: llguidance's view of Pixtral's tokenizer (byte tokens, token trie, parser factory); building it
//!   costs ~0.7 s, so [`GrammarEnv::shared`] keeps one per tokenizer file for the process.
//! - [`SchemaConstraint`]: a [`StepHook`] that masks disallowed tokens to `-inf` and feeds each chosen token to the
//!   row's matcher; the row is complete when the JSON value closes (the grammar accepts). A row that is about to
//!   run out of `max_new_tokens` switches to *closing*: each step then takes the allowed token that ends the
//!   current structure soonest (`"`, `]`, `}`, `null`, `,`, `1`, ...), so the answer is still valid JSON; such a row
//!   is reported as budget-closed and its forced tokens count as probability 0 in confidences.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{TokEnv, TokenId};
use llguidance::{Matcher, ParserFactory};
use toktrie_hf_tokenizers::ByteTokenizer;

use super::ExtractError;
use super::schema::ExtractionSchema;
use crate::model::{HookError, StepHook};

/// llguidance's tokenizer environment and parser factory for one tokenizer.
pub struct GrammarEnv {
    env: TokEnv,
    factory: ParserFactory,
    eos: u32,
    vocab: usize,
    /// Closing preference: token ids of `"`, `]`, `}`, `null`, `,`, `1`, `[`, `{` (those that exist as one token).
    /// `1`, not `0`: a number bounded away from zero (`-0.000...`) only ends after a non-zero digit.
    closers: Vec<u32>,
}

impl GrammarEnv {
    /// Builds the environment from a `tokenizer.json`; `eos` ends a sequence, `vocab` is the logits width.
    pub fn from_tokenizer(
        tokenizer: tokenizers::Tokenizer,
        eos: u32,
        vocab: usize,
    ) -> Result<Self, ExtractError> {
        let mut bt = ByteTokenizer::from_tokenizer(tokenizer)
            .map_err(grammar_err("byte tokenizer for llguidance"))?;
        bt.set_eos_token(eos);
        let env = bt
            .into_tok_env(Some(vocab))
            .map_err(grammar_err("token environment"))?;
        let mut factory = ParserFactory::new_simple(&env).map_err(grammar_err("parser factory"))?;
        factory.quiet();
        let trie = env.tok_trie();
        let closers = ["\"", "]", "}", "null", ",", "1", "[", "{"]
            .iter()
            .filter_map(|s| {
                let ids = trie.greedy_tokenize(s.as_bytes());
                (ids.len() == 1).then(|| ids[0])
            })
            .collect();
        Ok(GrammarEnv {
            env,
            factory,
            eos,
            vocab,
            closers,
        })
    }

    /// One environment per tokenizer file per process.
    pub fn shared(
        tokenizer_json: &Path,
        eos: u32,
        vocab: usize,
    ) -> Result<Arc<GrammarEnv>, ExtractError> {
        static CACHE: Mutex<Option<HashMap<PathBuf, Arc<GrammarEnv>>>> = Mutex::new(None);
        let key = tokenizer_json
            .canonicalize()
            .unwrap_or_else(|_| tokenizer_json.to_path_buf());
        let mut guard = CACHE.lock().unwrap_or_else(|e| e.into_inner());
        let cache = guard.get_or_insert_with(HashMap::new);
        if let Some(env) = cache.get(&key) {
            return Ok(env.clone());
        }
        let tok = tokenizers::Tokenizer::from_file(tokenizer_json).map_err(|source| {
            ExtractError::GrammarTokenizer {
                path: tokenizer_json.to_path_buf(),
                source,
            }
        })?;
        let env = Arc::new(GrammarEnv::from_tokenizer(tok, eos, vocab)?);
        cache.insert(key, env.clone());
        Ok(env)
    }

    /// For a loaded engine: its tokenizer file, EOS and vocabulary.
    pub fn for_engine(
        engine: &crate::model::PixtralEngine,
    ) -> Result<Arc<GrammarEnv>, ExtractError> {
        let m = &engine.model.manifest;
        GrammarEnv::shared(
            &engine.model.path_of(&m.tokenizer.file),
            m.tokens.eos,
            m.text.vocab_size,
        )
    }

    /// Bytes of one token as the grammar sees them.
    pub fn token_bytes(&self, token: u32) -> &[u8] {
        self.env.tok_trie().token(token)
    }

    pub fn eos(&self) -> u32 {
        self.eos
    }

    /// Token ids of a text, as the trie tokenizes greedily (sizing only).
    pub fn count_tokens(&self, text: &str) -> usize {
        self.env.tok_trie().greedy_tokenize(text.as_bytes()).len()
    }

    /// The answer text of generated tokens and the end offset of each token in it. Stops at EOS; special tokens
    /// contribute no bytes.
    pub fn answer_text(&self, tokens: &[u32]) -> (String, Vec<usize>) {
        let trie = self.env.tok_trie();
        let mut bytes = Vec::new();
        let mut ends = Vec::with_capacity(tokens.len());
        for &t in tokens {
            if t == self.eos {
                break;
            }
            if !trie.is_special_token(t) {
                bytes.extend_from_slice(trie.token(t));
            }
            ends.push(bytes.len());
        }
        // Grammar-constrained output is whole UTF-8; an unconstrained one may end mid-character.
        match String::from_utf8(bytes) {
            Ok(s) => (s, ends),
            Err(e) => {
                let valid = e.utf8_error().valid_up_to();
                let mut bytes = e.into_bytes();
                bytes.truncate(valid);
                let ends = ends.into_iter().map(|x| x.min(valid)).collect();
                (String::from_utf8(bytes).unwrap_or_default(), ends)
            }
        }
    }

    fn matcher(&self, grammar: &TopLevelGrammar) -> Matcher {
        Matcher::new(self.factory.create_parser(grammar.clone()))
    }

    /// Compiles a schema's grammar once, to refuse what llguidance cannot build at load time.
    pub fn check(&self, schema: &ExtractionSchema) -> Result<(), ExtractError> {
        let grammar = TopLevelGrammar::from_json_schema(schema.grammar_schema());
        let mut m = self.matcher(&grammar);
        m.compute_mask()
            .map(|_| ())
            .map_err(|e| ExtractError::Grammar {
                what: format!("schema {:?} does not compile to a grammar", schema.name),
                source: e.into(),
            })
    }
}

/// What happened at one decoding step of one row (kept when tracing).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepTrace {
    /// Highest raw logit before masking (what an unconstrained greedy run would take).
    pub raw_argmax: u32,
    pub raw_argmax_allowed: bool,
    pub allowed_tokens: u32,
    pub closing: bool,
}

/// Per-row outcome of constrained decoding.
#[derive(Debug, Clone, Default)]
pub struct RowReport {
    /// Step index at which the row switched to closing mode (budget), if it did.
    pub closing_from: Option<usize>,
    /// The grammar accepted the answer.
    pub accepted: bool,
    pub error: Option<String>,
    pub trace: Vec<StepTrace>,
    /// This row's time in llguidance (masks and token consumption).
    pub grammar_time: std::time::Duration,
}

struct RowState {
    matcher: Matcher,
    steps: usize,
    report: RowReport,
    /// The mask for the next step, computed ahead (while the forward pass ran) by `prepare_masks`.
    prepared: Option<llguidance::toktrie::SimpleVob>,
}

/// A JSON-Schema constraint over a batch of sequences (`row` = index in the request list).
pub struct SchemaConstraint {
    env: Arc<GrammarEnv>,
    grammar: TopLevelGrammar,
    rows: HashMap<usize, RowState>,
    max_new_tokens: usize,
    reserve: usize,
    trace: bool,
    /// Compute a step's masks on several threads (default on; `bench grammar` compares both).
    parallel: bool,
    /// Accumulated time computing masks and consuming tokens.
    pub grammar_time: std::time::Duration,
}

impl SchemaConstraint {
    /// `max_new_tokens` must be the generation config's: the closing reserve is counted from it.
    pub fn new(env: Arc<GrammarEnv>, schema: &ExtractionSchema, max_new_tokens: usize) -> Self {
        let minimal = schema.minimal_answer().to_string();
        // Closing costs at most about the smallest answer's tokens; twice that plus slack covers a structure
        // open at any depth.
        let reserve = 2 * env.count_tokens(&minimal) + 16;
        SchemaConstraint {
            grammar: TopLevelGrammar::from_json_schema(schema.grammar_schema()),
            env,
            rows: HashMap::new(),
            max_new_tokens,
            reserve,
            trace: false,
            parallel: true,
            grammar_time: std::time::Duration::ZERO,
        }
    }

    /// Record a [`StepTrace`] per step (costs one extra pass over the logits).
    pub fn with_trace(mut self, on: bool) -> Self {
        self.trace = on;
        self
    }

    /// Compute a step's masks on several threads, or one after another.
    pub fn with_parallel_masks(mut self, on: bool) -> Self {
        self.parallel = on;
        self
    }

    /// Tokens kept back for closing the JSON before `max_new_tokens`.
    pub fn closing_reserve(&self) -> usize {
        self.reserve
    }

    pub fn report(&self, row: usize) -> Option<&RowReport> {
        self.rows.get(&row).map(|r| &r.report)
    }

    /// A finished row's report, its grammar state dropped (a stream's rows come and go: memory stays flat).
    pub fn take_report(&mut self, row: usize) -> Option<RowReport> {
        self.rows.remove(&row).map(|r| r.report)
    }

    pub fn env(&self) -> &Arc<GrammarEnv> {
        &self.env
    }

    fn row(&mut self, row: usize) -> &mut RowState {
        let env = &self.env;
        let grammar = &self.grammar;
        self.rows.entry(row).or_insert_with(|| RowState {
            matcher: env.matcher(grammar),
            steps: 0,
            report: RowReport::default(),
            prepared: None,
        })
    }
}

/// An llguidance set-up error, kept whole as the source of [`ExtractError::Grammar`].
fn grammar_err<E: Into<BoxError>>(what: &str) -> impl FnOnce(E) -> ExtractError {
    let what = what.to_string();
    move |e| ExtractError::Grammar {
        what,
        source: e.into(),
    }
}

/// Why the grammar could not take a decoding step (llguidance's own errors kept as sources).
#[derive(Debug, thiserror::Error)]
pub enum GrammarStepError {
    #[error("grammar mask")]
    Mask(#[source] BoxError),
    #[error("the grammar allows no token")]
    NoTokenAllowed,
    #[error("grammar rejected token {token}")]
    Rejected {
        token: u32,
        #[source]
        source: BoxError,
    },
    #[error("grammar failed after token {token}: {reason}")]
    Failed { token: u32, reason: String },
    #[error("grammar state")]
    State(#[source] BoxError),
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What masking one row needs besides the row's own state (shared, read-only, by every row of a step).
struct MaskSettings<'a> {
    closers: &'a [u32],
    /// Steps after which a row switches to closing mode.
    budget: usize,
    vocab: usize,
    trace: bool,
}

/// Masks one row's logits by its grammar state (closing mode past the budget); returns the time it took.
fn mask_row(
    settings: &MaskSettings<'_>,
    state: &mut RowState,
    logits: &mut [f32],
) -> Result<std::time::Duration, HookError> {
    let t0 = std::time::Instant::now();
    let vocab = settings.vocab.min(logits.len());
    let mask = match state.prepared.take() {
        Some(mask) => mask,
        None => state
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| GrammarStepError::Mask(e.into()))?,
    };
    let raw_argmax = if settings.trace { argmax(logits) } else { 0 };
    let closing = state.steps >= settings.budget;
    if closing && state.report.closing_from.is_none() {
        state.report.closing_from = Some(state.steps);
    }
    let mut allowed = 0u32;
    if closing {
        // Keep one token: the first allowed closer, else the best allowed logit.
        let pick = settings
            .closers
            .iter()
            .copied()
            .find(|&t| mask.is_allowed(t as TokenId))
            .or_else(|| {
                let mut best: Option<(usize, f32)> = None;
                for (i, &v) in logits.iter().enumerate().take(vocab) {
                    if mask.is_allowed(i as TokenId) && best.is_none_or(|(_, b)| v > b) {
                        best = Some((i, v));
                    }
                }
                best.map(|(i, _)| i as u32)
            })
            .ok_or(GrammarStepError::NoTokenAllowed)?;
        for (i, v) in logits.iter_mut().enumerate() {
            if i as u32 != pick {
                *v = f32::NEG_INFINITY;
            } else if !v.is_finite() {
                *v = 0.0;
            }
        }
        allowed = 1;
    } else {
        // Word by word: most 32-token words are all allowed or all masked.
        let words = mask.as_slice();
        for (k, chunk) in logits.chunks_mut(32).enumerate() {
            let w = if k * 32 < vocab {
                words.get(k).copied().unwrap_or(0)
            } else {
                0
            };
            let w = if (k + 1) * 32 > vocab {
                w & (u32::MAX >> (32 - (vocab - k * 32).min(32)).min(31))
            } else {
                w
            };
            match w {
                u32::MAX => allowed += 32,
                0 => chunk.fill(f32::NEG_INFINITY),
                _ => {
                    allowed += w.count_ones();
                    for (b, v) in chunk.iter_mut().enumerate() {
                        if w & (1 << b) == 0 {
                            *v = f32::NEG_INFINITY;
                        }
                    }
                }
            }
        }
        if allowed == 0 {
            return Err(GrammarStepError::NoTokenAllowed.into());
        }
    }
    if settings.trace {
        state.report.trace.push(StepTrace {
            raw_argmax,
            raw_argmax_allowed: mask.is_allowed(raw_argmax as TokenId),
            allowed_tokens: allowed,
            closing,
        });
    }
    let took = t0.elapsed();
    state.report.grammar_time += took;
    Ok(took)
}

/// Rows at or above which a step's masks are computed on several threads (a mask costs ~10-30 us on Pixtral's
/// 131k vocabulary; a scoped thread ~20-40 us to start).
const PARALLEL_MASK_ROWS: usize = 4;

impl<'a> MaskSettings<'a> {
    fn new(env: &'a GrammarEnv, max_new_tokens: usize, reserve: usize, trace: bool) -> Self {
        MaskSettings {
            closers: &env.closers,
            budget: max_new_tokens.saturating_sub(reserve),
            vocab: env.vocab,
            trace,
        }
    }
}

impl StepHook for SchemaConstraint {
    fn mask_logits(&mut self, row: usize, logits: &mut [f32]) -> Result<(), HookError> {
        self.row(row);
        let settings = MaskSettings::new(&self.env, self.max_new_tokens, self.reserve, self.trace);
        let Some(state) = self.rows.get_mut(&row) else {
            return Err(GrammarStepError::State("row state vanished".into()).into());
        };
        let took = mask_row(&settings, state, logits)?;
        self.grammar_time += took;
        Ok(())
    }

    /// Computes the rows' next masks now (the engine calls this while the forward pass runs); a row whose mask
    /// fails here is computed again, and fails with its error, at `mask_logits`.
    fn prepare_masks(&mut self, rows: &[usize]) {
        for &row in rows {
            let t0 = std::time::Instant::now();
            let state = self.row(row);
            state.prepared = state.matcher.compute_mask_or_eos().ok();
            let took = t0.elapsed();
            state.report.grammar_time += took;
            self.grammar_time += took;
        }
    }

    /// Every row's mask of one step, the rows split over the machine's cores: each row's matcher is its own, so
    /// rows are independent (llguidance's mask is the host work that grows with the batch).
    fn mask_rows(&mut self, rows: &mut [(usize, &mut [f32])]) -> Vec<Result<(), HookError>> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        if !self.parallel || rows.len() < PARALLEL_MASK_ROWS || threads < 2 {
            return rows
                .iter_mut()
                .map(|(row, logits)| self.mask_logits(*row, logits))
                .collect();
        }
        for (row, _) in rows.iter() {
            self.row(*row);
        }
        let t0 = std::time::Instant::now();
        let settings = MaskSettings::new(&self.env, self.max_new_tokens, self.reserve, self.trace);
        // Disjoint &mut to each row's state, in `rows` order (a row named twice is a caller's bug: an error).
        let mut by_row: HashMap<usize, &mut RowState> =
            self.rows.iter_mut().map(|(k, v)| (*k, v)).collect();
        let mut jobs: Vec<(Option<&mut RowState>, &mut [f32])> = rows
            .iter_mut()
            .map(|(row, logits)| (by_row.remove(row), &mut **logits))
            .collect();
        let per_thread = jobs.len().div_ceil(threads.min(8));
        let results: Vec<Result<(), HookError>> = std::thread::scope(|scope| {
            let settings = &settings;
            let handles: Vec<_> = jobs
                .chunks_mut(per_thread)
                .map(|chunk| {
                    scope.spawn(move || {
                        chunk
                            .iter_mut()
                            .map(|(state, logits)| match state {
                                Some(state) => mask_row(settings, state, logits).map(|_| ()),
                                None => Err(GrammarStepError::State(
                                    "a row named twice in one step".into(),
                                )
                                .into()),
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                // A panic in a mask thread is a bug in llguidance or here: propagate it, do not invent a result.
                .flat_map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        });
        self.grammar_time += t0.elapsed();
        results
    }

    fn accept_token(&mut self, row: usize, token: u32) -> Result<bool, HookError> {
        let t0 = std::time::Instant::now();
        let eos = self.env.eos;
        let state = self.row(row);
        state.steps += 1;
        if token == eos {
            let accepting = state.matcher.is_accepting().unwrap_or(false);
            state.report.accepted = accepting;
            return Ok(true);
        }
        if let Err(e) = state.matcher.consume_token(token as TokenId) {
            let err = GrammarStepError::Rejected {
                token,
                source: e.into(),
            };
            state.report.error = Some(crate::error::chain(&err));
            return Err(err.into());
        }
        if state.matcher.is_error() {
            let err = GrammarStepError::Failed {
                token,
                reason: state.matcher.get_error().unwrap_or_default(),
            };
            state.report.error = Some(crate::error::chain(&err));
            return Err(err.into());
        }
        let done = state.matcher.is_stopped()
            || state
                .matcher
                .is_accepting()
                .map_err(|e| GrammarStepError::State(e.into()))?;
        if done {
            state.report.accepted = true;
        }
        let took = t0.elapsed();
        state.report.grammar_time += took;
        self.grammar_time += took;
        Ok(done)
    }
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut bv = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > bv {
            bv = v;
            best = i;
        }
    }
    best as u32
}
