//! The Pixtral engine: vision encoder, token embeddings and the KV-cache decoder on ONNX Runtime.
//!
//! The KV cache lives in ONNX Runtime values: each step's `present.*` outputs are bound as the next step's
//! `past_key_values.*` inputs through IO binding, without a copy. Outputs are bound to the session's device (on
//! CUDA the cache never crosses to the host); only the last-position logits come back to the host, where the
//! per-step hook (grammar masks) and sampling run.
//!
//! Decoders exported with GroupQueryAttention (`--attention gqa`, CPU) go one step further: the cache is one
//! buffer per layer and key/value, bound as both past and present, which ONNX Runtime writes in place, so a decode
//! step copies none of the cache (`DecodeCache::InPlace`). Host copies remain where rows change: prefilled rows are
//! gathered into the batch buffer once, and a finished row leaving the batch compacts the others.

use std::time::{Duration, Instant};

use half::f16;
use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{IoBinding, Session};
use ort::value::{DynTensor, DynValue, Tensor, TensorElementType, ValueType};

use super::ModelError;
use super::manifest::{DecoderAttention, ModelDir};
use super::preprocess::{ImagePreprocessor, PreparedImage};
use super::prompt::{EncodedPrompt, PixtralTokenizer};
use super::runtime::{Device, OrtRuntime};
use super::sampling::{Sampler, Sampling};

/// Float type a graph takes (from its declared input types, so fp32 and fp16 exports run the same code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FloatKind {
    F32,
    F16,
}

impl FloatKind {
    fn of(session: &Session, input: &str) -> Result<FloatKind, ModelError> {
        let outlet = session
            .inputs()
            .iter()
            .find(|o| o.name() == input)
            .ok_or_else(|| ModelError::Graph(format!("graph has no input {input}")))?;
        Self::of_type(outlet.dtype(), input)
    }

    fn of_output(session: &Session, output: &str) -> Result<FloatKind, ModelError> {
        let outlet = session
            .outputs()
            .iter()
            .find(|o| o.name() == output)
            .ok_or_else(|| ModelError::Graph(format!("graph has no output {output}")))?;
        Self::of_type(outlet.dtype(), output)
    }

    fn of_type(dtype: &ValueType, input: &str) -> Result<FloatKind, ModelError> {
        match dtype {
            ValueType::Tensor {
                ty: TensorElementType::Float32,
                ..
            } => Ok(FloatKind::F32),
            ValueType::Tensor {
                ty: TensorElementType::Float16,
                ..
            } => Ok(FloatKind::F16),
            other => Err(ModelError::Graph(format!(
                "{input} has type {other:?}; expected float32 or float16"
            ))),
        }
    }

    fn element_type(self) -> TensorElementType {
        match self {
            FloatKind::F32 => TensorElementType::Float32,
            FloatKind::F16 => TensorElementType::Float16,
        }
    }

    fn tensor(self, shape: Vec<i64>, data: &[f32]) -> Result<DynValue, ModelError> {
        let value = match self {
            FloatKind::F32 => Tensor::from_array((shape, data.to_vec()))
                .map_err(ort_err("create f32 tensor"))?
                .into_dyn(),
            FloatKind::F16 => Tensor::from_array((
                shape,
                data.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>(),
            ))
            .map_err(ort_err("create f16 tensor"))?
            .into_dyn(),
        };
        Ok(value)
    }
}

fn ort_err<E: std::fmt::Display>(stage: &'static str) -> impl Fn(E) -> ModelError {
    move |e| ModelError::Ort {
        stage,
        reason: e.to_string(),
    }
}

/// Host copy of a float tensor (f32 or f16), as f32.
fn read_floats(value: &DynValue, stage: &'static str) -> Result<(Vec<i64>, Vec<f32>), ModelError> {
    if let Ok((shape, data)) = value.try_extract_tensor::<f32>() {
        return Ok((shape.to_vec(), data.to_vec()));
    }
    let (shape, data) = value.try_extract_tensor::<f16>().map_err(ort_err(stage))?;
    Ok((shape.to_vec(), data.iter().map(|v| v.to_f32()).collect()))
}

/// Rows at or above which `choose_rows` uses a second thread when it computes token probabilities (a softmax
/// scan costs ~60-90 us per row; a scoped thread ~20-40 us to start). An argmax-only scan runs at memory speed
/// and stays on the calling thread: a second thread there only fights ONNX Runtime's spinning pool.
const PARALLEL_CHOOSE_ROWS: usize = 4;

/// `samplers[b].choose(row j's logits)` for every active row `j` (sequence `b = active[j]`).
fn choose_rows(
    samplers: &mut [Sampler],
    active: &[usize],
    logits: &[f32],
    vocab: usize,
) -> Vec<Option<(u32, f32)>> {
    // Each active row's sampler, in active order (active is ascending, so a single pass hands them out).
    let mut mine: Vec<&mut Sampler> = Vec::with_capacity(active.len());
    let mut wanted = active.iter().peekable();
    for (b, sampler) in samplers.iter_mut().enumerate() {
        if wanted.peek() == Some(&&b) {
            mine.push(sampler);
            wanted.next();
        }
    }
    let rows: Vec<&[f32]> = logits.chunks(vocab).take(active.len()).collect();
    let run = |samplers: &mut [&mut Sampler], rows: &[&[f32]]| -> Vec<Option<(u32, f32)>> {
        samplers
            .iter_mut()
            .zip(rows)
            .map(|(s, r)| s.choose(r))
            .collect()
    };
    if active.len() < PARALLEL_CHOOSE_ROWS || !mine.iter().all(|s| s.computes_probabilities()) {
        return run(&mut mine, &rows);
    }
    let half = active.len() / 2;
    let (s_front, s_back) = mine.split_at_mut(half);
    let (r_front, r_back) = rows.split_at(half);
    std::thread::scope(|scope| {
        let back = scope.spawn(|| run(s_back, r_back));
        let mut out = run(s_front, r_front);
        // A panic in the helper thread is a bug in `choose`; propagate it rather than invent a result.
        out.extend(back.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
        out
    })
}

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
/// CPU: 256. Smaller score tensors stay in cache: on the tiny model (2 cores, 8 reference prompts, settings
/// alternated in one process, fastest of 4) vision+prefill ran 19.6k tok/s at batch 1 and 9.3k at batch 8 with
/// 256-token chunks, 16.7k and 6.2k with 1,024 (128: 19.3k / 10.0k; 512: 18.4k / 8.9k; one pass: 16.3k / 5.4k).
/// CUDA: 1024, so each pass reuses a 12B model's weights over enough tokens to be compute-bound (a full 1024x1024
/// page, 4,160 image tokens, takes 5 passes).
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
pub trait StepHook {
    /// May set disallowed tokens to `f32::NEG_INFINITY`.
    fn mask_logits(&mut self, row: usize, logits: &mut [f32]) -> Result<(), String>;
    /// Called with the chosen token; returns true when the sequence is complete (e.g. grammar accepted).
    fn accept_token(&mut self, row: usize, token: u32) -> Result<bool, String>;
}

/// No masking.
pub struct NoHook;

impl StepHook for NoHook {
    fn mask_logits(&mut self, _row: usize, _logits: &mut [f32]) -> Result<(), String> {
        Ok(())
    }
    fn accept_token(&mut self, _row: usize, _token: u32) -> Result<bool, String> {
        Ok(false)
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
    /// Where ONNX Runtime actually put the KV cache (read back from the decoder's `present.*` outputs, e.g.
    /// "Cuda:0"): evidence that the cache stays on the device, not a setting echoed back.
    pub kv_cache_memory: Option<String>,
}

impl GenerationStats {
    fn add(&mut self, other: &GenerationStats) {
        self.vision += other.vision;
        self.prefill += other.prefill;
        self.decode += other.decode;
        self.images += other.images;
        self.prefill_tokens += other.prefill_tokens;
        self.decode_tokens += other.decode_tokens;
        self.batches += other.batches;
        self.prefill_passes += other.prefill_passes;
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
}

impl Default for BatchPolicy {
    fn default() -> Self {
        BatchPolicy {
            max_batch: 8,
            token_budget: 16_384,
        }
    }
}

pub struct PixtralEngine {
    pub model: ModelDir,
    pub tokenizer: PixtralTokenizer,
    pub preprocessor: ImagePreprocessor,
    device: Device,
    vision: Session,
    embed: Session,
    decoder: Session,
    vision_float: FloatKind,
    decoder_float: FloatKind,
    /// Type of the KV cache (`past_key_values.*`), as the graph declares it.
    cache_float: FloatKind,
    /// Type of the logits output: fp32 in pixtract's exports; fp16 logits (other exporters) are widened on the host.
    logits_float: FloatKind,
    past_names: Vec<String>,
    present_names: Vec<String>,
    kv_memory: MemoryInfo<'static>,
    attention: DecoderAttention,
}

impl PixtralEngine {
    /// Opens the three graphs and the tokenizer of a model directory on `opts.device`.
    pub fn load(
        rt: &OrtRuntime,
        dir: &std::path::Path,
        opts: EngineOptions,
    ) -> Result<Self, ModelError> {
        let model = ModelDir::open(dir)?;
        let m = &model.manifest;
        // Checked before any session opens.
        let attention = m.graphs.decoder.attention;
        attention.check_device(opts.device)?;
        let open = |file: &str| rt.open_session(&model.path_of(file), opts.device);
        let vision = open(&m.graphs.vision_encoder.file)?;
        let embed = open(&m.graphs.embed_tokens.file)?;
        let decoder = open(&m.graphs.decoder.file)?;
        let tokenizer = PixtralTokenizer::from_file(&model.path_of(&m.tokenizer.file), m.tokens)?;
        let vision_float = FloatKind::of(&vision, "pixel_values")?;
        let wanted = match attention {
            DecoderAttention::Eager => "attention_mask",
            DecoderAttention::Gqa => "seqlens_k",
        };
        if !decoder.inputs().iter().any(|i| i.name() == wanted) {
            return Err(ModelError::AttentionInputs {
                attention: attention.name(),
                wanted,
            });
        }
        let decoder_float = FloatKind::of(&decoder, "inputs_embeds")?;
        let cache_float = FloatKind::of(&decoder, "past_key_values.0.key")?;
        let logits_float = FloatKind::of_output(&decoder, "logits")?;
        let mut past_names = Vec::new();
        let mut present_names = Vec::new();
        for layer in 0..m.text.num_layers {
            for kind in ["key", "value"] {
                past_names.push(format!("past_key_values.{layer}.{kind}"));
                present_names.push(format!("present.{layer}.{kind}"));
            }
        }
        let kv_memory = match opts.device {
            Device::Cpu => MemoryInfo::new(
                AllocationDevice::CPU,
                0,
                AllocatorType::Arena,
                MemoryType::Default,
            ),
            Device::Cuda(id) => MemoryInfo::new(
                AllocationDevice::CUDA,
                id,
                AllocatorType::Arena,
                MemoryType::Default,
            ),
        }
        .map_err(ort_err("memory info"))?;
        let preprocessor = ImagePreprocessor::from_config(&m.image);
        Ok(PixtralEngine {
            model,
            tokenizer,
            preprocessor,
            device: opts.device,
            vision,
            embed,
            decoder,
            vision_float,
            decoder_float,
            cache_float,
            logits_float,
            past_names,
            present_names,
            kv_memory,
            attention,
        })
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// The decoder graph's attention (how it pads rows and keeps the cache).
    pub fn attention(&self) -> DecoderAttention {
        self.attention
    }

    /// Largest prompt + generation the model accepts.
    pub fn context_limit(&self) -> usize {
        self.model.manifest.text.max_position_embeddings
    }

    /// Vision encoder on one image: `[patches, text_hidden]` features, row-major.
    pub fn image_features(&mut self, image: &PreparedImage) -> Result<Vec<f32>, ModelError> {
        let (w, h) = (image.width() as i64, image.height() as i64);
        let pixels = self.vision_float.tensor(vec![1, 3, h, w], &image.pixels)?;
        let outputs = self
            .vision
            .run(ort::inputs!["pixel_values" => pixels])
            .map_err(ort_err("vision encoder"))?;
        let (shape, data) = read_floats(&outputs[0], "vision features")?;
        let expected = (image.grid.cols * image.grid.rows) as i64;
        let hidden = self.model.manifest.text.hidden_size as i64;
        if shape != [expected, hidden] {
            return Err(ModelError::Graph(format!(
                "vision encoder returned {shape:?} for a {}x{} patch grid, expected [{expected}, {hidden}]",
                image.grid.cols, image.grid.rows
            )));
        }
        Ok(data)
    }

    /// Token embeddings `[batch, seq, hidden]` (host, f32).
    fn embed_ids(&mut self, ids: Vec<i64>, batch: usize) -> Result<Vec<f32>, ModelError> {
        let seq = ids.len() / batch.max(1);
        let input = Tensor::from_array((vec![batch as i64, seq as i64], ids))
            .map_err(ort_err("input ids"))?;
        let outputs = self
            .embed
            .run(ort::inputs!["input_ids" => input])
            .map_err(ort_err("embed tokens"))?;
        Ok(read_floats(&outputs[0], "embeddings")?.1)
    }

    fn empty_past(&self, batch: usize) -> Result<Vec<DynValue>, ModelError> {
        let t = &self.model.manifest.text;
        let shape = vec![
            batch as i64,
            t.num_key_value_heads as i64,
            0,
            t.head_dim as i64,
        ];
        (0..self.past_names.len())
            .map(|_| self.cache_float.tensor(shape.clone(), &[]))
            .collect()
    }

    /// A host buffer for `rows` last-position logits (`[rows, 1, vocab]`, the graph's logits type).
    fn logits_buffer(&self, rows: usize) -> Result<DynTensor, ModelError> {
        let vocab = self.model.manifest.text.vocab_size as i64;
        let ty = self.logits_float.element_type();
        DynTensor::new(&Allocator::default(), ty, vec![rows as i64, 1, vocab])
            .map_err(ort_err("logits buffer"))
    }

    /// A decoder binding holding what both decoder kinds take: `inputs_embeds` `[batch, seq, hidden]` (seq from
    /// `positions`), `position_ids` `[batch, seq]`, and the caller's `logits` buffer as the `logits` output.
    fn step_binding(
        &self,
        embeds: &[f32],
        batch: usize,
        positions: &[i64],
        logits: &mut DynTensor,
    ) -> Result<IoBinding, ModelError> {
        let hidden = self.model.manifest.text.hidden_size;
        let seq = positions.len() / batch.max(1);
        let embeds = self
            .decoder_float
            .tensor(vec![batch as i64, seq as i64, hidden as i64], embeds)?;
        let positions = Tensor::from_array((vec![batch as i64, seq as i64], positions.to_vec()))
            .map_err(ort_err("position ids"))?;
        let bind = ort_err("decoder binding");
        let mut binding = self.decoder.create_binding().map_err(&bind)?;
        binding
            .bind_input("inputs_embeds", &embeds)
            .map_err(&bind)?;
        binding
            .bind_input("position_ids", &positions)
            .map_err(&bind)?;
        binding.bind_output("logits", &mut *logits).map_err(&bind)?;
        Ok(binding)
    }

    /// One decoder pass through IO binding: writes the last-position logits into `logits` (`[batch, 1, vocab]`,
    /// host) and returns the new cache.
    ///
    /// The logits buffer is the caller's and is reused step after step: a buffer ONNX Runtime allocated per run was
    /// fresh memory each time (4 MB at batch 8), and the lm_head wrote it, and the argmax read it, at page-fault and
    /// memory speed instead of cache speed (argmax 0.41-0.64 ms per batch-8 step vs 0.22 ms on a warm buffer).
    fn eager_pass(
        &mut self,
        embeds: &[f32],
        batch: usize,
        mask: &[i64],
        positions: &[i64],
        past: &[DynValue],
        logits: &mut DynTensor,
    ) -> Result<Vec<DynValue>, ModelError> {
        let total = mask.len() / batch;
        let mask = Tensor::from_array((vec![batch as i64, total as i64], mask.to_vec()))
            .map_err(ort_err("attention mask"))?;
        let bind = ort_err("decoder binding");
        let mut binding = self.step_binding(embeds, batch, positions, logits)?;
        binding.bind_input("attention_mask", &mask).map_err(&bind)?;
        for (name, value) in self.past_names.iter().zip(past) {
            binding.bind_input(name, value).map_err(&bind)?;
        }
        // Re-bound every step: a buffer bound once would keep step 1's shape (FACTS.md).
        for name in &self.present_names {
            binding
                .bind_output_to_device(name, &self.kv_memory)
                .map_err(&bind)?;
        }
        let mut outputs = self
            .decoder
            .run_binding(&binding)
            .map_err(ort_err("decoder"))?;
        let mut present = Vec::with_capacity(self.present_names.len());
        for name in &self.present_names {
            present.push(
                outputs
                    .remove(name.as_str())
                    .ok_or_else(|| ModelError::Graph(format!("decoder returned no {name}")))?,
            );
        }
        Ok(present)
    }

    /// Prefill of a left-padded batch through an eager decoder: each pass appends `chunk` columns to the cache;
    /// every row's mask and positions cover the columns so far, so the result equals one pass over the whole width.
    #[allow(clippy::too_many_arguments)]
    fn prefill_padded(
        &mut self,
        embeds: &[f32],
        batch: usize,
        width: usize,
        mask: &[i64],
        positions: &[i64],
        chunk: usize,
        logits: &mut DynTensor,
        stats: &mut GenerationStats,
    ) -> Result<Vec<DynValue>, ModelError> {
        let hidden = self.model.manifest.text.hidden_size;
        let mut past = self.empty_past(batch)?;
        let mut start = 0;
        loop {
            let end = (start + chunk).min(width);
            past = if start == 0 && end == width {
                self.eager_pass(embeds, batch, mask, positions, &past, logits)?
            } else {
                let cols = end - start;
                let mut e = Vec::with_capacity(batch * cols * hidden);
                let mut m = Vec::with_capacity(batch * end);
                let mut pos = Vec::with_capacity(batch * cols);
                for b in 0..batch {
                    e.extend_from_slice(
                        &embeds[(b * width + start) * hidden..(b * width + end) * hidden],
                    );
                    m.extend_from_slice(&mask[b * width..b * width + end]);
                    pos.extend_from_slice(&positions[b * width + start..b * width + end]);
                }
                self.eager_pass(&e, batch, &m, &pos, &past, logits)?
            };
            stats.prefill_passes += 1;
            if stats.kv_cache_memory.is_none() {
                stats.kv_cache_memory = past.first().and_then(memory_of);
            }
            if end >= width {
                return Ok(past);
            }
            start = end;
        }
    }

    /// Prefill through a GroupQueryAttention decoder: row by row (ONNX Runtime's CPU kernel takes a prompt chunk
    /// after a non-empty cache only at batch 1), each row in `chunk`-token passes written in place into its own
    /// cache buffer, then the rows gathered into one `[rows, kv_heads, capacity, head_dim]` buffer per layer and
    /// key/value. No row attends over another row's padding, at prefill or later.
    ///
    /// `embeds` is the left-padded `[rows, width, hidden]` batch; row b's prompt is its last `lengths[b]` columns.
    #[allow(clippy::too_many_arguments)]
    fn prefill_in_place(
        &mut self,
        embeds: &[f32],
        width: usize,
        lengths: &[usize],
        capacity: usize,
        chunk: usize,
        logits: &mut DynTensor,
        stats: &mut GenerationStats,
    ) -> Result<Vec<DynTensor>, ModelError> {
        let hidden = self.model.manifest.text.hidden_size;
        let batch = lengths.len();
        let mut gathered = if batch > 1 {
            Some(self.cache_buffers(batch, capacity)?)
        } else {
            None
        };
        // At batch 1 the pass writes the batch's logits buffer itself; otherwise each row's, copied into place.
        let mut row_logits = if batch > 1 {
            Some(self.logits_buffer(1)?)
        } else {
            None
        };
        let mut last = Vec::new();
        for (b, &len) in lengths.iter().enumerate() {
            let row = &embeds[(b * width + width - len) * hidden..(b + 1) * width * hidden];
            let mut buffers = self.cache_buffers(1, capacity)?;
            let mut start = 0;
            while start < len {
                let end = (start + chunk).min(len);
                let positions: Vec<i64> = (start as i64..end as i64).collect();
                self.gqa_pass(
                    &row[start * hidden..end * hidden],
                    1,
                    &positions,
                    &[end as i32 - 1],
                    end as i32,
                    &[(end - start) as i64 - 1],
                    &mut buffers,
                    row_logits.as_mut().unwrap_or(&mut *logits),
                )?;
                stats.prefill_passes += 1;
                start = end;
            }
            if let Some(row_logits) = &row_logits {
                copy_rows(row_logits, 0, logits, b, 1)?;
            }
            if stats.kv_cache_memory.is_none() {
                stats.kv_cache_memory = buffers.first().map(tensor_memory);
            }
            match gathered.as_mut() {
                Some(all) => {
                    for (dst, src) in all.iter_mut().zip(&buffers) {
                        copy_rows(src, 0, dst, b, 1)?;
                    }
                }
                None => last = buffers,
            }
        }
        Ok(gathered.unwrap_or(last))
    }

    /// Zeroed host cache buffers `[rows, kv_heads, capacity, head_dim]`, one per layer and key/value. Made with
    /// ONNX Runtime's allocator: only such tensors can be bound as outputs, which is what lets the decoder write
    /// into them in place.
    fn cache_buffers(&self, rows: usize, capacity: usize) -> Result<Vec<DynTensor>, ModelError> {
        let t = &self.model.manifest.text;
        let ty = self.cache_float.element_type();
        let shape = vec![
            rows as i64,
            t.num_key_value_heads as i64,
            capacity as i64,
            t.head_dim as i64,
        ];
        (0..self.past_names.len())
            .map(|_| {
                let mut buffer = DynTensor::new(&Allocator::default(), ty, shape.clone())
                    .map_err(ort_err("cache buffer"))?;
                let bytes = host_tensor_bytes(&buffer)?;
                // SAFETY: a host tensor just allocated for `bytes` bytes (shape x element size, checked host).
                unsafe { std::ptr::write_bytes(buffer.data_ptr_mut().cast::<u8>(), 0, bytes) };
                Ok(buffer)
            })
            .collect()
    }

    /// One pass of a GroupQueryAttention decoder with `buffers` bound as both `past_key_values.*` and `present.*`:
    /// ONNX Runtime writes the new keys/values at each row's position in place (no copy of the cache) and the
    /// logits of each row's `logits_index` into `logits`.
    #[allow(clippy::too_many_arguments)]
    fn gqa_pass(
        &mut self,
        embeds: &[f32],
        batch: usize,
        positions: &[i64],
        seqlens_k: &[i32],
        total: i32,
        logits_index: &[i64],
        buffers: &mut [DynTensor],
        logits: &mut DynTensor,
    ) -> Result<(), ModelError> {
        let seqlens = Tensor::from_array((vec![batch as i64], seqlens_k.to_vec()))
            .map_err(ort_err("seqlens_k"))?;
        let total = Tensor::from_array((Vec::<i64>::new(), vec![total]))
            .map_err(ort_err("total sequence length"))?;
        let index = Tensor::from_array((vec![batch as i64], logits_index.to_vec()))
            .map_err(ort_err("logits index"))?;
        let bind = ort_err("decoder binding");
        let mut binding = self.step_binding(embeds, batch, positions, logits)?;
        binding.bind_input("seqlens_k", &seqlens).map_err(&bind)?;
        binding
            .bind_input("total_sequence_length", &total)
            .map_err(&bind)?;
        binding.bind_input("logits_index", &index).map_err(&bind)?;
        for ((past, present), buffer) in self
            .past_names
            .iter()
            .zip(&self.present_names)
            .zip(buffers.iter_mut())
        {
            binding.bind_input(past, &*buffer).map_err(&bind)?;
            binding.bind_output(present, &mut *buffer).map_err(&bind)?;
        }
        self.decoder
            .run_binding(&binding)
            .map_err(ort_err("decoder"))?;
        Ok(())
    }

    /// One decode step for the `active` rows (indices into the batch) given their new tokens' embeddings.
    fn decode_step(
        &mut self,
        cache: &mut DecodeCache,
        embeds: &[f32],
        active: &[usize],
        logits: &mut DynTensor,
    ) -> Result<(), ModelError> {
        let n = active.len();
        match cache {
            DecodeCache::Concat {
                past,
                mask_rows,
                next_pos,
            } => {
                let mut step_mask = Vec::new();
                let mut step_pos = Vec::with_capacity(n);
                for &b in active {
                    mask_rows[b].push(1);
                    step_mask.extend_from_slice(&mask_rows[b]);
                    step_pos.push(next_pos[b]);
                    next_pos[b] += 1;
                }
                *past = self.eager_pass(embeds, n, &step_mask, &step_pos, past, logits)?;
            }
            DecodeCache::InPlace { buffers, lengths } => {
                // seqlens_k is each row's length after this step minus one: its length now.
                let seqlens: Vec<i32> = lengths.iter().map(|&l| l as i32).collect();
                let total = lengths.iter().max().copied().unwrap_or(0) as i32 + 1;
                let index = vec![0i64; n];
                // A row's new token sits at its current length.
                self.gqa_pass(embeds, n, lengths, &seqlens, total, &index, buffers, logits)?;
                for l in lengths.iter_mut() {
                    *l += 1;
                }
            }
        }
        Ok(())
    }

    /// Keeps rows `keep` (indices among the active rows) of the cache: finished sequences leave the batch.
    fn keep_rows(&self, cache: &mut DecodeCache, keep: &[usize]) -> Result<(), ModelError> {
        match cache {
            DecodeCache::Concat { past, .. } => {
                *past = past
                    .iter()
                    .map(|v| self.gather_rows(v, keep))
                    .collect::<Result<Vec<_>, _>>()?;
            }
            DecodeCache::InPlace { buffers, lengths } => {
                // Every buffer is [rows, kv_heads, capacity, head_dim] (made by `cache_buffers`).
                let Some(&capacity) = buffers.first().and_then(|b| b.shape().get(2)) else {
                    return Ok(());
                };
                let capacity = capacity as usize;
                let mut kept = self.cache_buffers(keep.len(), capacity)?;
                for (dst, src) in kept.iter_mut().zip(buffers.iter()) {
                    for (j, &k) in keep.iter().enumerate() {
                        copy_rows(src, k, dst, j, 1)?;
                    }
                }
                *buffers = kept;
                *lengths = keep.iter().map(|&k| lengths[k]).collect();
            }
        }
        Ok(())
    }

    /// Generates for many prompts: grouped by length into batches under `policy`, results in input order.
    pub fn generate_many(
        &mut self,
        prompts: &[EncodedPrompt],
        config: &GenerationConfig,
        policy: BatchPolicy,
        hook: &mut dyn StepHook,
    ) -> Result<(Vec<Generation>, GenerationStats), ModelError> {
        let mut order: Vec<usize> = (0..prompts.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(prompts[i].ids.len()));
        let mut results: Vec<Option<Generation>> = vec![None; prompts.len()];
        let mut stats = GenerationStats::default();
        let mut start = 0;
        while start < order.len() {
            let longest = prompts[order[start]].ids.len();
            let mut end = start + 1;
            while end < order.len()
                && end - start < policy.max_batch.max(1)
                && longest * (end - start + 1) <= policy.token_budget.max(longest)
            {
                end += 1;
            }
            let rows = &order[start..end];
            let (gens, s) = self.generate_rows(prompts, rows, config, hook)?;
            stats.add(&s);
            for (row, g) in rows.iter().zip(gens) {
                results[*row] = Some(g);
            }
            start = end;
        }
        let results = results
            .into_iter()
            .map(|g| g.ok_or_else(|| ModelError::Graph("a sequence got no result".into())))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((results, stats))
    }

    /// Generates for one batch: `rows` index into `prompts` (and name the sequences to the hook).
    pub fn generate_rows(
        &mut self,
        prompts: &[EncodedPrompt],
        rows: &[usize],
        config: &GenerationConfig,
        hook: &mut dyn StepHook,
    ) -> Result<(Vec<Generation>, GenerationStats), ModelError> {
        let mut stats = GenerationStats {
            batches: 1,
            ..Default::default()
        };
        let tokens = self.model.manifest.tokens;
        let hidden = self.model.manifest.text.hidden_size;
        let vocab = self.model.manifest.text.vocab_size;
        let limit = self.context_limit();
        for &r in rows {
            let p = &prompts[r];
            if p.ids.is_empty() {
                return Err(ModelError::EmptyPrompt { row: r });
            }
            if p.ids.len() + config.max_new_tokens > limit {
                return Err(ModelError::ContextTooLong {
                    prompt: p.ids.len(),
                    new_tokens: config.max_new_tokens,
                    limit,
                });
            }
        }

        // Vision features per sequence, in [IMG] order.
        let t0 = Instant::now();
        let mut features: Vec<Vec<f32>> = Vec::with_capacity(rows.len());
        for &r in rows {
            let p = &prompts[r];
            let mut f = Vec::new();
            for image in &p.images {
                f.extend(self.image_features(image)?);
                stats.images += 1;
            }
            let slots = p.ids.iter().filter(|&&t| t == tokens.img).count();
            if slots * hidden != f.len() {
                return Err(ModelError::ImageTokens {
                    slots,
                    features: f.len() / hidden.max(1),
                });
            }
            features.push(f);
        }
        stats.vision = t0.elapsed();

        // Prefill: left-padded so every row's last position is real.
        let t1 = Instant::now();
        let batch = rows.len();
        let width = rows
            .iter()
            .map(|&r| prompts[r].ids.len())
            .max()
            .unwrap_or(0);
        let mut ids = vec![tokens.pad as i64; batch * width];
        let mut mask = vec![0i64; batch * width];
        let mut positions = vec![0i64; batch * width];
        for (b, &r) in rows.iter().enumerate() {
            let p = &prompts[r].ids;
            let offset = width - p.len();
            for (i, &t) in p.iter().enumerate() {
                ids[b * width + offset + i] = t as i64;
                mask[b * width + offset + i] = 1;
                positions[b * width + offset + i] = i as i64;
            }
        }
        let mut embeds = self.embed_ids(ids.clone(), batch)?;
        for (b, f) in features.iter().enumerate() {
            let mut next = 0;
            for i in 0..width {
                if ids[b * width + i] == tokens.img as i64 {
                    let dst = (b * width + i) * hidden;
                    embeds[dst..dst + hidden]
                        .copy_from_slice(&f[next * hidden..(next + 1) * hidden]);
                    next += 1;
                }
            }
        }
        let chunk = match config
            .prefill_chunk
            .unwrap_or_else(|| default_prefill_chunk(self.device))
        {
            0 => width.max(1),
            c => c,
        };
        let mut logits = self.logits_buffer(batch)?;
        let mut cache = match self.attention {
            DecoderAttention::Eager => {
                let past = self.prefill_padded(
                    &embeds,
                    batch,
                    width,
                    &mask,
                    &positions,
                    chunk,
                    &mut logits,
                    &mut stats,
                )?;
                DecodeCache::Concat {
                    past,
                    mask_rows: (0..batch)
                        .map(|b| mask[b * width..(b + 1) * width].to_vec())
                        .collect(),
                    next_pos: rows.iter().map(|&r| prompts[r].ids.len() as i64).collect(),
                }
            }
            DecoderAttention::Gqa => {
                // Each row's real tokens are the last `len` columns of the left-padded embeddings.
                let lengths: Vec<usize> = rows.iter().map(|&r| prompts[r].ids.len()).collect();
                let capacity = width + config.max_new_tokens;
                let buffers = self.prefill_in_place(
                    &embeds,
                    width,
                    &lengths,
                    capacity,
                    chunk,
                    &mut logits,
                    &mut stats,
                )?;
                DecodeCache::InPlace {
                    buffers,
                    lengths: lengths.iter().map(|&l| l as i64).collect(),
                }
            }
        };
        stats.prefill = t1.elapsed();
        stats.prefill_tokens = rows.iter().map(|&r| prompts[r].ids.len()).sum();

        // Decode.
        let t2 = Instant::now();
        let mut active: Vec<usize> = (0..batch).collect(); // positions in `rows` still generating
        let mut outs: Vec<Generation> = rows
            .iter()
            .map(|&r| Generation {
                tokens: Vec::new(),
                token_probs: Vec::new(),
                finish: FinishReason::Length,
                prompt_tokens: prompts[r].ids.len(),
                first_logits: None,
            })
            .collect();
        let mut widened: Vec<f32> = Vec::new(); // fp16 logits as f32, reused across steps
        let mut samplers: Vec<Sampler> = rows
            .iter()
            .map(|&r| {
                let sampler = Sampler::new(&config.sampling, r as u64);
                if config.token_probs {
                    sampler
                } else {
                    sampler.without_probabilities()
                }
            })
            .collect();
        loop {
            let mut finished = Vec::new();
            let mut chosen = Vec::with_capacity(active.len());
            // Masked in place: the host logits buffer ONNX Runtime wrote is ours until the next step.
            let logits_data: &mut [f32] = match self.logits_float {
                FloatKind::F32 => {
                    logits
                        .try_extract_tensor_mut::<f32>()
                        .map_err(ort_err("logits"))?
                        .1
                }
                FloatKind::F16 => {
                    let (_, half) = logits
                        .try_extract_tensor::<f16>()
                        .map_err(ort_err("logits"))?;
                    widened.clear();
                    widened.extend(half.iter().map(|v| v.to_f32()));
                    &mut widened
                }
            };
            // 1. The hook masks each row (sequential: it owns per-row grammar state).
            for (j, &b) in active.iter().enumerate() {
                let row = rows[b];
                let slice = &mut logits_data[j * vocab..(j + 1) * vocab];
                hook.mask_logits(row, slice)
                    .map_err(|reason| ModelError::Hook { row, reason })?;
                if config.keep_first_logits && outs[b].tokens.is_empty() {
                    outs[b].first_logits = Some(slice.to_vec());
                }
            }
            // 2. Each row's token and probability: independent rows, so split over two threads at batch sizes
            // where the scans (131k logits each) cost more than a thread.
            let picks = choose_rows(&mut samplers, &active, logits_data, vocab);
            // 3. The hook sees each chosen token, in row order.
            for (j, &b) in active.iter().enumerate() {
                let row = rows[b];
                let (token, prob) = picks[j].ok_or(ModelError::Hook {
                    row,
                    reason: "every token is masked".into(),
                })?;
                outs[b].tokens.push(token);
                if config.token_probs {
                    outs[b].token_probs.push(prob);
                }
                let hook_done = hook
                    .accept_token(row, token)
                    .map_err(|reason| ModelError::Hook { row, reason })?;
                if config.stop_on_eos && token == tokens.eos {
                    outs[b].finish = FinishReason::Eos;
                    finished.push(j);
                } else if hook_done {
                    outs[b].finish = FinishReason::Hook;
                    finished.push(j);
                } else if outs[b].tokens.len() >= config.max_new_tokens {
                    outs[b].finish = FinishReason::Length;
                    finished.push(j);
                } else {
                    chosen.push(token as i64);
                }
            }
            stats.decode_tokens += active.len();
            if finished.len() == active.len() {
                break;
            }
            if !finished.is_empty() {
                // Finished sequences leave the batch: keep only the others' cache rows.
                let keep: Vec<usize> = (0..active.len())
                    .filter(|j| !finished.contains(j))
                    .collect();
                self.keep_rows(&mut cache, &keep)?;
                active = keep.iter().map(|&j| active[j]).collect();
                logits = self.logits_buffer(active.len())?;
            }
            let n = active.len();
            let embeds = self.embed_ids(chosen, n)?;
            self.decode_step(&mut cache, &embeds, &active, &mut logits)?;
        }
        stats.decode = t2.elapsed();
        Ok((outs, stats))
    }

    /// Rows `keep` of a `[batch, ...]` cache tensor (via the host: this runs once per finished sequence).
    fn gather_rows(&self, value: &DynValue, keep: &[usize]) -> Result<DynValue, ModelError> {
        let host;
        let value = if self.device == Device::Cpu {
            value
        } else {
            let tensor = value
                .view()
                .downcast::<ort::value::DynTensorValueType>()
                .map_err(ort_err("cache to host"))?;
            host = tensor
                .to(AllocationDevice::CPU, 0)
                .map_err(ort_err("cache to host"))?
                .into_dyn();
            &host
        };
        let (shape, data) = read_floats(value, "cache rows")?;
        let row = data.len() / (shape[0].max(1) as usize);
        let mut out = Vec::with_capacity(row * keep.len());
        for &k in keep {
            out.extend_from_slice(&data[k * row..(k + 1) * row]);
        }
        let mut new_shape = shape;
        new_shape[0] = keep.len() as i64;
        self.cache_float.tensor(new_shape, &out)
    }
}

/// The KV cache between decode steps, in the layout the decoder graph wants.
enum DecodeCache {
    /// Eager graphs: the last pass's `present.*` (a new tensor each step), and per batch row its attention mask
    /// and next position (left padding).
    Concat {
        past: Vec<DynValue>,
        mask_rows: Vec<Vec<i64>>,
        next_pos: Vec<i64>,
    },
    /// GroupQueryAttention graphs: one `[active rows, kv_heads, capacity, head_dim]` buffer per layer and
    /// key/value, bound as both past and present; each active row's length (its tokens fill the row's start).
    InPlace {
        buffers: Vec<DynTensor>,
        lengths: Vec<i64>,
    },
}

/// Bytes of a host float tensor's data (shape x element size); an error for device memory or other element
/// types, so the raw copies below never run past a buffer.
fn host_tensor_bytes(tensor: &DynTensor) -> Result<usize, ModelError> {
    if tensor.memory_info().allocation_device() != AllocationDevice::CPU {
        return Err(ModelError::Graph(format!(
            "cache buffer in {} memory: the in-place cache is host memory",
            tensor_memory(tensor)
        )));
    }
    let size = match tensor.data_type() {
        TensorElementType::Float32 => 4,
        TensorElementType::Float16 => 2,
        other => {
            return Err(ModelError::Graph(format!(
                "cache or logits of type {other:?}: expected float32 or float16"
            )));
        }
    };
    let elements: i64 = tensor.shape().iter().product();
    Ok(elements.max(0) as usize * size)
}

/// Copies `rows` rows (along the first axis) of host tensor `src` from row `from` into `dst` at row `to`. Both
/// must be host float tensors of the same type and the same size per row (checked).
fn copy_rows(
    src: &DynTensor,
    from: usize,
    dst: &mut DynTensor,
    to: usize,
    rows: usize,
) -> Result<(), ModelError> {
    let rows_of = |t: &DynTensor| t.shape().first().map_or(0, |&r| r.max(0) as usize);
    let (src_rows, dst_rows) = (rows_of(src), rows_of(dst));
    let (src_bytes, dst_bytes) = (host_tensor_bytes(src)?, host_tensor_bytes(dst)?);
    let row = src_bytes / src_rows.max(1);
    if src.data_type() != dst.data_type()
        || src_rows == 0
        || row != dst_bytes / dst_rows.max(1)
        || from + rows > src_rows
        || to + rows > dst_rows
    {
        return Err(ModelError::Graph(format!(
            "cannot copy rows {from}..{} of {:?} into rows {to}.. of {:?}",
            from + rows,
            src.shape(),
            dst.shape()
        )));
    }
    // SAFETY: both are host tensors of the same float type (checked by `host_tensor_bytes`); the byte ranges were
    // checked against their sizes just above, and `src` and `dst` are distinct tensors (`dst` is borrowed mutably).
    unsafe {
        std::ptr::copy_nonoverlapping(
            src.data_ptr().cast::<u8>().add(from * row),
            dst.data_ptr_mut().cast::<u8>().add(to * row),
            rows * row,
        );
    }
    Ok(())
}

/// "Device:id" of a tensor's memory as ONNX Runtime reports it.
fn memory_of(value: &DynValue) -> Option<String> {
    let tensor = value
        .view()
        .downcast::<ort::value::DynTensorValueType>()
        .ok()?;
    Some(tensor_memory(&tensor))
}

fn tensor_memory(tensor: &DynTensor) -> String {
    let info = tensor.memory_info();
    format!("{}:{}", info.allocation_device().as_str(), info.device_id())
}
