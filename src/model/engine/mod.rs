//! The Pixtral engine: vision encoder, token embeddings and the KV-cache decoder on ONNX Runtime.
//!
//! The KV cache lives in ONNX Runtime values bound through IO binding ([`cache`]); outputs are bound to the
//! session's device (on CUDA the cache never crosses to the host); only the last-position logits come back to
//! the host, where the per-step hook (grammar masks) and sampling run ([`decode`]). Which prompts share a
//! batch is the [`scheduler`]'s call; how a decoder pass is bound is the [`decoder`]'s.

mod cache;
mod decode;
pub use decode::host_steps;
mod decoder;
mod generation;
mod ort_util;
mod scheduler;
pub use scheduler::plan_batches;
mod slots;
mod stream;
pub use stream::{Finished, RowTiming, StreamEngine};
mod vision;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use ort::session::Session;
use ort::value::Tensor;

pub use generation::{
    AnswerLengths, BatchPolicy, Batching, EngineOptions, FinishReason, Generation,
    GenerationConfig, GenerationStats, HookError, NoHook, StepHook, default_prefill_chunk,
};

use super::ModelError;
use super::manifest::{DecoderAttention, ModelDir, ModelManifest};
use super::preprocess::{ImagePreprocessor, PreparedImage};
use super::prompt::{EncodedPrompt, PromptTokenizer};
use super::runtime::{Device, OrtRuntime};
use cache::{KvCache, PromptBatch};
use decoder::Decoder;
use ort_util::{ort_err, read_floats};
use vision::VisionEncoder;

pub struct PixtralEngine {
    pub model: ModelDir,
    pub tokenizer: PromptTokenizer,
    pub preprocessor: ImagePreprocessor,
    device: Device,
    /// Shared with the vision thread of continuous batching (`BatchPolicy::vision_ahead`); locked per prompt.
    vision: Arc<Mutex<VisionEncoder>>,
    embed: Session,
    decoder: Decoder,
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
        m.graphs
            .decoder
            .attention
            .check_device(opts.device, &m.dtype)?;
        let open = |file: &str| rt.open_session(&model.path_of(file), opts.device);
        let vision = Arc::new(Mutex::new(VisionEncoder::new(
            open(&m.graphs.vision_encoder.file)?,
            m.text.hidden_size,
            m.tokens.img,
        )?));
        let embed = open(&m.graphs.embed_tokens.file)?;
        let decoder = Decoder::new(open(&m.graphs.decoder.file)?, m, opts.device)?;
        let tokenizer = PromptTokenizer::from_file(
            &model.path_of(&m.tokenizer.file),
            m.tokens,
            m.system_placement(),
        )?;
        let preprocessor = ImagePreprocessor::for_model(m);
        Ok(PixtralEngine {
            model,
            tokenizer,
            preprocessor,
            device: opts.device,
            vision,
            embed,
            decoder,
        })
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// The decoder graph's attention (how it pads rows and keeps the cache).
    pub fn attention(&self) -> DecoderAttention {
        self.decoder.attention
    }

    /// Largest prompt + generation the model accepts.
    pub fn context_limit(&self) -> usize {
        self.model.manifest.text.max_position_embeddings
    }

    /// Vision encoder on one image: `[patches, text_hidden]` features, row-major.
    pub fn image_features(&mut self, image: &PreparedImage) -> Result<Vec<f32>, ModelError> {
        self.vision
            .lock()
            .map_err(|_| ModelError::Graph("the vision encoder's lock is poisoned".into()))?
            .image_features(image)
    }

    /// Generates for many prompts under `policy`, results in input order: every prompt added to a
    /// [`StreamEngine`] at once, stepped until it is idle (slots refilled as sequences finish, or static batches
    /// longest first). The hook sees prompt `i` as row `i`.
    pub fn generate_many(
        &mut self,
        prompts: &[EncodedPrompt],
        config: &GenerationConfig,
        policy: BatchPolicy,
        hook: &mut dyn StepHook,
    ) -> Result<(Vec<Generation>, GenerationStats), ModelError> {
        let all: Vec<&EncodedPrompt> = prompts.iter().collect();
        let ids: Vec<usize> = (0..prompts.len()).collect();
        self.check_rows(&all, &ids, config)?;
        let longest = prompts.iter().map(|p| p.ids.len()).max().unwrap_or(0);
        let mut stream = self.stream(config.clone(), policy, longest);
        for (id, prompt) in prompts.iter().enumerate() {
            stream.add(id, prompt.clone())?;
        }
        let mut results: Vec<Option<Generation>> = vec![None; prompts.len()];
        while !stream.is_idle() {
            for finished in stream.step(self, hook)? {
                if let Some(slot) = results.get_mut(finished.id) {
                    *slot = Some(finished.generation);
                }
            }
        }
        let stats = stream.finish();
        let results = results
            .into_iter()
            .map(|g| g.ok_or_else(|| ModelError::Graph("a sequence got no result".into())))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((results, stats))
    }

    /// Generates for one static batch: `rows` index into `prompts` (and name the sequences to the hook).
    pub fn generate_rows(
        &mut self,
        prompts: &[EncodedPrompt],
        rows: &[usize],
        config: &GenerationConfig,
        hook: &mut dyn StepHook,
    ) -> Result<(Vec<Generation>, GenerationStats), ModelError> {
        let batch = rows
            .iter()
            .map(|&r| {
                prompts
                    .get(r)
                    .ok_or_else(|| ModelError::Graph(format!("no prompt {r} in the batch")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.run_batch(&batch, rows, config, hook)
    }

    /// Runs one static batch to its end: `prompts` with the ids the hook knows them by.
    pub fn run_batch(
        &mut self,
        prompts: &[&EncodedPrompt],
        ids: &[usize],
        config: &GenerationConfig,
        hook: &mut dyn StepHook,
    ) -> Result<(Vec<Generation>, GenerationStats), ModelError> {
        let mut stats = GenerationStats {
            batches: 1,
            ..Default::default()
        };
        self.check_rows(prompts, ids, config)?;

        let t0 = Instant::now();
        let features = self.vision_features(prompts, &mut stats)?;
        stats.vision = t0.elapsed();

        let t1 = Instant::now();
        let batch = prompt_batch(&mut self.embed, &self.model.manifest, prompts, &features)?;
        let chunk = match config
            .prefill_chunk
            .unwrap_or_else(|| default_prefill_chunk(self.device))
        {
            0 => batch.width.max(1),
            c => c,
        };
        let capacity = batch.width + config.max_new_tokens;
        let mut logits = self.decoder.logits_buffer(prompts.len())?;
        let mut cache = KvCache::prefill(
            &mut self.decoder,
            &batch,
            chunk,
            capacity,
            &mut logits,
            &mut stats,
        )?;
        stats.prefill = t1.elapsed();
        stats.prefill_tokens = batch.lengths.iter().sum();

        let t2 = Instant::now();
        let decoded = self.decode(&mut cache, logits, prompts, ids, config, hook)?;
        stats.decode = t2.elapsed();
        stats.decode_tokens = decoded.decode_tokens;
        stats.decode_row_capacity = decoded.row_capacity;
        stats.steps = decoded.steps;
        stats.forward = decoded.forward;
        Ok((decoded.generations, stats))
    }

    /// Every row has a prompt that, with its new tokens, fits the context.
    fn check_rows(
        &self,
        prompts: &[&EncodedPrompt],
        ids: &[usize],
        config: &GenerationConfig,
    ) -> Result<(), ModelError> {
        let limit = self.context_limit();
        for (p, &id) in prompts.iter().zip(ids) {
            if p.ids.is_empty() {
                return Err(ModelError::EmptyPrompt { row: id });
            }
            if p.ids.len() + config.max_new_tokens > limit {
                return Err(ModelError::ContextTooLong {
                    prompt: p.ids.len(),
                    new_tokens: config.max_new_tokens,
                    limit,
                });
            }
        }
        Ok(())
    }

    /// Token embeddings `[batch, seq, hidden]` (host, f32).
    fn embed_ids(&mut self, ids: Vec<i64>, batch: usize) -> Result<Vec<f32>, ModelError> {
        embed_ids(&mut self.embed, ids, batch)
    }

    /// Vision features per row, in `[IMG]` order, checked against the row's number of `[IMG]` tokens.
    fn vision_features(
        &mut self,
        prompts: &[&EncodedPrompt],
        stats: &mut GenerationStats,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let mut vision = self
            .vision
            .lock()
            .map_err(|_| ModelError::Graph("the vision encoder's lock is poisoned".into()))?;
        let mut features = Vec::with_capacity(prompts.len());
        for p in prompts {
            let f = vision.prompt_features(p)?;
            stats.images += f.images;
            features.push(f.features);
        }
        Ok(features)
    }
}

/// Token embeddings `[batch, seq, hidden]` (host, f32).
fn embed_ids(embed: &mut Session, ids: Vec<i64>, batch: usize) -> Result<Vec<f32>, ModelError> {
    let seq = ids.len() / batch.max(1);
    let input =
        Tensor::from_array((vec![batch as i64, seq as i64], ids)).map_err(ort_err("input ids"))?;
    let outputs = embed
        .run(ort::inputs!["input_ids" => input])
        .map_err(ort_err("embed tokens"))?;
    Ok(read_floats(&outputs[0], "embeddings")?.1)
}

/// The rows' prompts left-padded to one width, embedded, with each row's image features in place of its `[IMG]`
/// tokens.
fn prompt_batch(
    embed: &mut Session,
    manifest: &ModelManifest,
    prompts: &[&EncodedPrompt],
    features: &[Vec<f32>],
) -> Result<PromptBatch, ModelError> {
    let tokens = manifest.tokens;
    let hidden = manifest.text.hidden_size;
    let batch = prompts.len();
    let width = prompts.iter().map(|p| p.ids.len()).max().unwrap_or(0);
    let mut ids = vec![tokens.pad as i64; batch * width];
    let mut mask = vec![0i64; batch * width];
    let mut positions = vec![0i64; batch * width];
    for (b, prompt) in prompts.iter().enumerate() {
        let p = &prompt.ids;
        let offset = width - p.len();
        for (i, &t) in p.iter().enumerate() {
            ids[b * width + offset + i] = t as i64;
            mask[b * width + offset + i] = 1;
            positions[b * width + offset + i] = i as i64;
        }
    }
    let mut embeds = embed_ids(embed, ids.clone(), batch)?;
    for (b, f) in features.iter().enumerate() {
        let mut next = 0;
        for i in 0..width {
            if ids[b * width + i] == tokens.img as i64 {
                let dst = (b * width + i) * hidden;
                embeds[dst..dst + hidden].copy_from_slice(&f[next * hidden..(next + 1) * hidden]);
                next += 1;
            }
        }
    }
    Ok(PromptBatch {
        embeds,
        width,
        mask,
        positions,
        lengths: prompts.iter().map(|p| p.ids.len()).collect(),
    })
}
