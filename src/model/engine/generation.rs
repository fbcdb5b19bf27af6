//! What a caller asks of the engine and what it gets back: options, generation settings, the per-step hook,
//! results and timings, the batch policy.

use std::time::Duration;

use crate::model::runtime::Device;
use crate::model::sampling::Sampling;

/// Options for loading the engine.
#[derive(Debug, Clone, Copy)]
pub struct EngineOptions {
    pub device: Device,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            device: Device::Cpu,
        }
    }
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerationConfig {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Stop a sequence at `</s>`. Benchmarks turn this off to generate a fixed number of tokens.
    pub stop_on_eos: bool,
    /// Keep the first step's full logits (after the hook) in the output, for parity checks.
    pub keep_first_logits: bool,
    /// Record each chosen token's probability in `Generation::token_probs` (extraction turns them into field
    /// confidences). Without it greedy decoding only takes the argmax: no softmax pass over the vocabulary.
    pub token_probs: bool,
    /// Prompt tokens per prefill pass (0: the whole prompt in one pass). The exported decoder computes attention
    /// explicitly, so one pass over S tokens holds `[batch, heads, S, S]` scores per layer: 0.24 GB per row for a
    /// 3,900-token page on the tiny model, 1.35 GB per row at 4,600 tokens on Pixtral 12B (fp16). In chunks of C
    /// the scores are `[batch, heads, C, S]`: memory falls by S/C for a few more graph runs.
    /// None: [`default_prefill_chunk`] for the engine's device.
    pub prefill_chunk: Option<usize>,
}

/// Prompt tokens per prefill pass when the configuration names none.
///
/// CPU: 256, so the score tensors of a pass stay in cache (the chunk sizes measured against each other are in
/// docs/benchmarks.md). CUDA: 1024, so each pass reuses a 12B model's weights over enough tokens to be
/// compute-bound (a full 1024x1024 page, 4,160 image tokens, takes 5 passes).
pub fn default_prefill_chunk(device: Device) -> usize {
    match device {
        Device::Cpu => 256,
        Device::Cuda(_) => 1024,
    }
}

impl Default for GenerationConfig {
    fn default() -> Self {
        GenerationConfig {
            max_new_tokens: 256,
            sampling: Sampling::Greedy,
            stop_on_eos: true,
            keep_first_logits: false,
            token_probs: true,
            prefill_chunk: None,
        }
    }
}

/// Per-step hook over one sequence's logits: masks (e.g. a grammar) and sees each chosen token.
/// `row` is the sequence's index in the caller's request list, whatever batch it runs in.
/// `Send`: the engine may call [`StepHook::prepare_masks`] on a helper thread while the forward pass runs.
pub trait StepHook: Send {
    /// May set disallowed tokens to `f32::NEG_INFINITY`.
    fn mask_logits(&mut self, row: usize, logits: &mut [f32]) -> Result<(), HookError>;
    /// Called with the chosen token; returns true when the sequence is complete (e.g. grammar accepted).
    fn accept_token(&mut self, row: usize, token: u32) -> Result<bool, HookError>;
    /// Masks every row of one step (`(row, logits)`), a result per row. A hook whose rows are independent may
    /// spread them over threads; by default they are masked one after another.
    fn mask_rows(&mut self, rows: &mut [(usize, &mut [f32])]) -> Vec<Result<(), HookError>> {
        rows.iter_mut()
            .map(|(row, logits)| self.mask_logits(*row, logits))
            .collect()
    }
    /// Called while a step's forward pass runs, with the rows the step will mask: a hook whose mask depends only on
    /// the tokens accepted so far (a grammar) may compute it now, off the critical path. Errors surface at
    /// `mask_logits`. Default: nothing.
    fn prepare_masks(&mut self, _rows: &[usize]) {}
}

/// A step hook's own error, kept whole as the source of [`crate::model::ModelError::Hook`].
pub type HookError = Box<dyn std::error::Error + Send + Sync>;

/// No masking.
pub struct NoHook;

impl StepHook for NoHook {
    fn mask_logits(&mut self, _row: usize, _logits: &mut [f32]) -> Result<(), HookError> {
        Ok(())
    }
    fn accept_token(&mut self, _row: usize, _token: u32) -> Result<bool, HookError> {
        Ok(false)
    }
}

/// Ends sequence `row` after `lengths[row]` tokens, as a grammar ends an answer: per-sequence budgets for
/// workloads whose answers differ in length (benchmarks, tests of rows retiring at different steps).
pub struct AnswerLengths {
    lengths: Vec<usize>,
    seen: Vec<usize>,
}

impl AnswerLengths {
    pub fn new(lengths: Vec<usize>) -> Self {
        let seen = vec![0; lengths.len()];
        AnswerLengths { lengths, seen }
    }
}

impl StepHook for AnswerLengths {
    fn mask_logits(&mut self, _row: usize, _logits: &mut [f32]) -> Result<(), HookError> {
        Ok(())
    }
    fn accept_token(&mut self, row: usize, _token: u32) -> Result<bool, HookError> {
        let (Some(seen), Some(&length)) = (self.seen.get_mut(row), self.lengths.get(row)) else {
            return Err(format!("no answer length for sequence {row}").into());
        };
        *seen += 1;
        Ok(*seen >= length)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// Generated `</s>` (included in `tokens`).
    Eos,
    /// Reached `max_new_tokens`.
    Length,
    /// The hook declared the sequence complete.
    Hook,
    /// This sequence alone failed (its hook erred, or masked every token): `Generation::error` says why. The
    /// other sequences of the batch go on.
    Failed,
}

/// One sequence's result.
#[derive(Debug, Clone)]
pub struct Generation {
    pub tokens: Vec<u32>,
    /// Probability of each chosen token under the (masked) distribution it was drawn from (empty when
    /// `GenerationConfig::token_probs` is off).
    pub token_probs: Vec<f32>,
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    pub first_logits: Option<Vec<f32>>,
    /// Why the sequence failed ([`FinishReason::Failed`]).
    pub error: Option<String>,
}

impl Generation {
    /// A sequence that failed before its first token (its pages could not be encoded), with the cause.
    pub fn failed(prompt_tokens: usize, error: &crate::model::ModelError) -> Self {
        Generation {
            tokens: Vec::new(),
            token_probs: Vec::new(),
            finish: FinishReason::Failed,
            prompt_tokens,
            first_logits: None,
            error: Some(crate::error::chain(error)),
        }
    }
}

/// Time spent per phase, summed over a call.
#[derive(Debug, Clone, Default)]
pub struct GenerationStats {
    pub vision: Duration,
    pub prefill: Duration,
    pub decode: Duration,
    pub images: usize,
    pub prefill_tokens: usize,
    pub decode_tokens: usize,
    pub batches: usize,
    /// Decoder passes over prompt tokens (more than `batches` when prefill is chunked).
    pub prefill_passes: usize,
    /// Row slots the decode steps offered (rows x steps: a static batch's size, or the slot count, per step);
    /// `decode_tokens` of them did work, the rest idled (rows finished while their batch ran on).
    pub decode_row_capacity: usize,
    /// Where ONNX Runtime actually put the KV cache (read back from the decoder's `present.*` outputs, e.g.
    /// "Cuda:0"): evidence that the cache stays on the device, not a setting echoed back.
    pub kv_cache_memory: Option<String>,
    /// Continuous batching: the most prompt tokens prefilled between two decode steps while rows were running
    /// (what a running row waited for, in tokens).
    pub max_stall_tokens: usize,
    /// Continuous batching: the longest wait of running rows between two decode steps (joining prompts' vision,
    /// prefill and first tokens).
    pub max_stall: Duration,
    /// Continuous batching with `vision_ahead`: how long the decoder waited for the vision thread's features
    /// (`vision` is then that thread's busy time, mostly hidden behind decode steps).
    pub vision_wait: Duration,
    /// Prompts admitted into KV-cache slots (continuous batching).
    pub admissions: usize,
    /// Decoder passes over generated tokens (decode steps).
    pub steps: usize,
    /// Time in those passes' forward runs; `decode - forward` is host work (masks, sampling, bookkeeping).
    pub forward: Duration,
}

impl GenerationStats {
    pub(super) fn add(&mut self, other: &GenerationStats) {
        self.vision += other.vision;
        self.prefill += other.prefill;
        self.decode += other.decode;
        self.images += other.images;
        self.prefill_tokens += other.prefill_tokens;
        self.decode_tokens += other.decode_tokens;
        self.batches += other.batches;
        self.prefill_passes += other.prefill_passes;
        self.decode_row_capacity += other.decode_row_capacity;
        self.max_stall_tokens = self.max_stall_tokens.max(other.max_stall_tokens);
        self.max_stall = self.max_stall.max(other.max_stall);
        self.vision_wait += other.vision_wait;
        self.admissions += other.admissions;
        self.steps += other.steps;
        self.forward += other.forward;
        if self.kv_cache_memory.is_none() {
            self.kv_cache_memory.clone_from(&other.kv_cache_memory);
        }
    }
}

/// How many sequences share one forward pass.
#[derive(Debug, Clone, Copy)]
pub struct BatchPolicy {
    pub max_batch: usize,
    /// Upper bound on padded prompt tokens in one prefill (rows x longest prompt).
    pub token_budget: usize,
    pub batching: Batching,
    /// Continuous batching: prefill chunks of a joining prompt run between two decode steps while rows are
    /// running (0: the whole prompt at once). Bounds how long a running row waits for a page's prefill.
    pub prefill_chunks_per_step: usize,
    /// Continuous batching: prompts whose pages the vision encoder encodes ahead, on a thread of its own, while the
    /// decoder steps (0: each joining prompt's pages are encoded between two decode steps, as running rows wait).
    pub vision_ahead: usize,
    /// Continuous batching: let the hook prepare a step's masks on another thread while the step's forward pass
    /// runs. Worth it when the forward pass runs on a GPU and leaves the host cores idle; on a CPU both would share
    /// the same cores (the pipeline turns it on for CUDA).
    pub overlap_masks: bool,
}

impl Default for BatchPolicy {
    fn default() -> Self {
        BatchPolicy {
            max_batch: 8,
            token_budget: 16_384,
            batching: Batching::default(),
            prefill_chunks_per_step: 1,
            vision_ahead: 2,
            overlap_masks: false,
        }
    }
}

/// How rows of a batch are refilled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Batching {
    /// `max_batch` KV-cache slots: a finished sequence frees its slot at once and the next waiting prompt is
    /// prefilled into it, joining the running rows at the next step (GroupQueryAttention decoders; an eager
    /// decoder runs static batches).
    #[default]
    Continuous,
    /// Batches planned up front by length; a batch runs until its longest answer ends and nothing joins it.
    Static,
}

impl Batching {
    pub fn name(self) -> &'static str {
        match self {
            Batching::Continuous => "continuous",
            Batching::Static => "static",
        }
    }
}
