//! Continuous batching over KV-cache slots (GroupQueryAttention decoders).
//!
//! One cache buffer per layer and key/value, `[slots, kv_heads, capacity, head_dim]`, bound as both past and
//! present of every decode step, so ONNX Runtime writes each step's keys/values in place. A sequence owns one
//! slot (one row) from its admission to its last token; when it finishes, its slot is free at once and the next
//! prompt joins the running rows. A static batch instead runs until its longest answer ends, its finished rows
//! leaving it ever smaller: extraction answers range from a few tokens to hundreds, so most of a static batch's
//! rows sit out its tail.
//!
//! Prefill is interleaved with decode: the next waiting prompt is prefilled ahead, `prefill_chunks_per_step`
//! chunks between two decode steps, into a one-row staging cache (ONNX Runtime's CPU GroupQueryAttention takes
//! a prompt chunk after a non-empty cache only at batch 1), so running rows wait for at most that many chunks,
//! never for a whole page. When a slot frees and the staged prompt is complete, the staging row is copied into
//! the slot once and the prompt's first token is taken from its last position's logits. While no row runs there
//! is nobody to stall, and prefill runs whole.
//!
//! Every step binds all slots: a free slot computes a pad token at position 0 that nothing reads (the next
//! admission into that slot overwrites the row). That keeps the buffers whole, so binding them costs no copy; a
//! view of a slot range is a tensor over borrowed memory, which ort copies when bound as an input.

use std::sync::mpsc::Receiver;
use std::time::Instant;

use ort::session::Session;
use ort::value::DynTensor;

use super::cache::prefill_row_chunks;
use super::decode::{Sequence, host_logits, take_tokens};
use super::decoder::{Decoder, GqaStep};
use super::ort_util::{copy_rows, tensor_memory};
use super::vision::{PromptFeatures, VisionEncoder};
use super::{
    BatchPolicy, Generation, GenerationConfig, GenerationStats, PixtralEngine, StepHook,
    default_prefill_chunk, embed_ids, prompt_batch,
};
use crate::model::ModelError;
use crate::model::manifest::ModelManifest;
use crate::model::prompt::EncodedPrompt;

/// A sequence in a slot.
struct Running {
    seq: Sequence,
    /// Tokens in the slot's cache.
    length: i64,
    /// Token to feed at the next step.
    next: u32,
}

/// The next prompt, being prefilled into the staging row.
struct Staged {
    row: usize,
    /// `[len, hidden]`, image features in place of its `[IMG]` tokens.
    embeds: Vec<f32>,
    len: usize,
    /// Tokens prefilled so far.
    done: usize,
}

impl Staged {
    fn complete(&self) -> bool {
        self.done >= self.len
    }
}

/// The one-row cache and logits a prompt is prefilled into before it takes a slot.
struct Staging {
    cache: Vec<DynTensor>,
    logits: DynTensor,
}

impl PixtralEngine {
    /// Generates for `prompts` through `policy.max_batch` KV-cache slots, admitting prompts in input order as
    /// slots free up and prefilling them `policy.prefill_chunks_per_step` chunks between decode steps (0: whole).
    /// Results in input order, token for token what each prompt gives alone.
    pub(super) fn generate_continuous(
        &mut self,
        prompts: &[EncodedPrompt],
        config: &GenerationConfig,
        policy: BatchPolicy,
        hook: &mut dyn StepHook,
    ) -> Result<(Vec<Generation>, GenerationStats), ModelError> {
        let all: Vec<usize> = (0..prompts.len()).collect();
        self.check_rows(prompts, &all, config)?;
        if prompts.is_empty() {
            return Ok((Vec::new(), GenerationStats::default()));
        }
        let default_chunk = default_prefill_chunk(self.device);
        let PixtralEngine {
            model,
            vision,
            embed,
            decoder,
            ..
        } = self;
        let parts = Parts {
            manifest: &model.manifest,
            embed,
            decoder,
            default_chunk,
        };
        if policy.vision_ahead == 0 {
            return run_slots(
                parts,
                Features::Inline(vision),
                prompts,
                config,
                policy,
                hook,
            );
        }
        // The vision encoder runs on a thread of its own, `vision_ahead` prompts ahead of admission, in admission
        // order. When the slots are done (or failed) the receiver is dropped, the thread's next send fails and it
        // ends; the scope waits for it.
        std::thread::scope(|scope| {
            let (ready, features) = std::sync::mpsc::sync_channel(policy.vision_ahead - 1);
            scope.spawn(move || {
                for prompt in prompts {
                    let encoded = vision.prompt_features(prompt);
                    let failed = encoded.is_err();
                    if ready.send(encoded).is_err() || failed {
                        break;
                    }
                }
            });
            run_slots(
                parts,
                Features::Ahead(features),
                prompts,
                config,
                policy,
                hook,
            )
        })
    }
}

/// What the slot loop borrows from the engine (everything but the vision encoder, which may be on its own thread).
struct Parts<'a> {
    manifest: &'a ModelManifest,
    embed: &'a mut Session,
    decoder: &'a mut Decoder,
    default_chunk: usize,
}

/// Where a joining prompt's image features come from: encoded now, between two decode steps, or received from
/// the vision thread that encoded them ahead.
enum Features<'a> {
    Inline(&'a mut VisionEncoder),
    Ahead(Receiver<Result<PromptFeatures, ModelError>>),
}

impl Features<'_> {
    /// The next prompt's features (prompts are asked for in admission order, the order the thread encodes them).
    fn next(
        &mut self,
        prompt: &EncodedPrompt,
        stats: &mut GenerationStats,
    ) -> Result<Vec<f32>, ModelError> {
        let encoded = match self {
            Features::Inline(vision) => vision.prompt_features(prompt)?,
            Features::Ahead(features) => {
                let waited = Instant::now();
                let encoded = features.recv().map_err(|_| {
                    ModelError::Graph("the vision encoder's thread ended early".into())
                })?;
                stats.vision_wait += waited.elapsed();
                encoded?
            }
        };
        stats.vision += encoded.took;
        stats.images += encoded.images;
        Ok(encoded.features)
    }
}

/// Generates for `prompts` through `policy.max_batch` KV-cache slots (see [`PixtralEngine::generate_continuous`]).
fn run_slots(
    parts: Parts<'_>,
    mut features: Features<'_>,
    prompts: &[EncodedPrompt],
    config: &GenerationConfig,
    policy: BatchPolicy,
    hook: &mut dyn StepHook,
) -> Result<(Vec<Generation>, GenerationStats), ModelError> {
    let Parts {
        manifest,
        embed,
        decoder,
        default_chunk,
    } = parts;
    let mut stats = GenerationStats {
        batches: 1,
        ..Default::default()
    };
    let slots = policy.max_batch.clamp(1, prompts.len());
    let capacity = prompts.iter().map(|p| p.ids.len()).max().unwrap_or(0) + config.max_new_tokens;
    let chunk = match config.prefill_chunk.unwrap_or(default_chunk) {
        0 => capacity,
        c => c,
    };
    let chunks_per_gap = match policy.prefill_chunks_per_step {
        0 => usize::MAX,
        n => n,
    };
    let eos = manifest.tokens.eos;
    let pad = manifest.tokens.pad as i64;
    let vocab = manifest.text.vocab_size;
    let logits_float = decoder.logits_float;

    let mut cache = decoder.cache_buffers(slots, capacity)?;
    stats.kv_cache_memory = cache.first().map(tensor_memory);
    let mut staging = Staging {
        cache: decoder.cache_buffers(1, capacity)?,
        logits: decoder.logits_buffer(1)?,
    };
    let mut step_logits = decoder.logits_buffer(slots)?;
    let mut widened = Vec::new();
    let mut running: Vec<Option<Running>> = (0..slots).map(|_| None).collect();
    let mut results: Vec<Option<Generation>> = vec![None; prompts.len()];
    let mut waiting = 0..prompts.len();
    let mut staged: Option<Staged> = None;

    loop {
        // Between two decode steps: stage the next prompt, prefill it within this gap's chunks (all of it
        // while no row runs), and admit complete ones into free slots.
        let gap = Instant::now();
        let stalled = running.iter().any(Option::is_some);
        let mut chunks_left = chunks_per_gap;
        let mut gap_tokens = 0;
        loop {
            if staged.is_none() {
                let Some(row) = waiting.next() else { break };
                staged = Some(stage(
                    embed,
                    manifest,
                    &mut features,
                    prompts,
                    row,
                    &mut stats,
                )?);
            }
            let Some(s) = staged.as_mut() else { break };
            if !s.complete() {
                let busy = running.iter().any(Option::is_some);
                let passes = if busy { chunks_left } else { usize::MAX };
                if passes == 0 {
                    break;
                }
                let t = Instant::now();
                let (done, ran) = prefill_row_chunks(
                    decoder,
                    &s.embeds,
                    s.done,
                    chunk,
                    passes,
                    &mut staging.cache,
                    &mut staging.logits,
                )?;
                stats.prefill += t.elapsed();
                stats.prefill_passes += ran;
                stats.prefill_tokens += done - s.done;
                if busy {
                    chunks_left -= ran;
                    gap_tokens += done - s.done;
                }
                s.done = done;
                if !s.complete() {
                    break;
                }
            }
            let Some(slot) = running.iter().position(Option::is_none) else {
                break;
            };
            if let Some(s) = staged.take() {
                let t = Instant::now();
                for (dst, src) in cache.iter_mut().zip(&staging.cache) {
                    copy_rows(src, 0, dst, slot, 1)?;
                }
                stats.prefill += t.elapsed();
                let t = Instant::now();
                let logits = host_logits(&mut staging.logits, logits_float, &mut widened)?;
                match admit(&s, &mut logits[..vocab], config, hook, eos) {
                    Admitted::Running(r) => running[slot] = Some(r),
                    Admitted::Finished(out) => results[s.row] = Some(out),
                }
                stats.decode_tokens += 1;
                stats.decode_row_capacity += 1;
                stats.decode += t.elapsed();
            }
        }
        if stalled {
            stats.max_stall_tokens = stats.max_stall_tokens.max(gap_tokens);
            stats.max_stall = stats.max_stall.max(gap.elapsed());
        }
        let busy = running.iter().flatten().count();
        if busy == 0 {
            // Nothing runs, so the gap above ran prefill whole and admitted until no prompt was left.
            break;
        }

        // One decode step over every slot.
        let t3 = Instant::now();
        let ids: Vec<i64> = running
            .iter()
            .map(|r| r.as_ref().map_or(pad, |r| r.next as i64))
            .collect();
        let embeds = embed_ids(embed, ids, slots)?;
        // A row's new token sits at its current length; seqlens_k is that length (length after, minus one).
        let positions: Vec<i64> = running
            .iter()
            .map(|r| r.as_ref().map_or(0, |r| r.length))
            .collect();
        let seqlens: Vec<i32> = positions.iter().map(|&p| p as i32).collect();
        let step = GqaStep {
            embeds: &embeds,
            batch: slots,
            positions: &positions,
            seqlens_k: &seqlens,
            total: positions.iter().max().copied().unwrap_or(0) as i32 + 1,
            logits_index: &vec![0i64; slots],
        };
        decoder.gqa_pass(step, &mut cache, &mut step_logits)?;
        let logits = host_logits(&mut step_logits, logits_float, &mut widened)?;
        let mut rows: Vec<(usize, &mut Running, &mut [f32])> = running
            .iter_mut()
            .zip(logits.chunks_mut(vocab))
            .enumerate()
            .filter_map(|(slot, (r, l))| r.as_mut().map(|r| (slot, r, l)))
            .collect();
        let mut step_rows: Vec<(&mut Sequence, &mut [f32])> = rows
            .iter_mut()
            .map(|(_, r, l)| (&mut r.seq, &mut **l))
            .collect();
        let next = take_tokens(&mut step_rows, config, hook, eos);
        drop(step_rows);
        let mut finished = Vec::new();
        for ((slot, r, _), next) in rows.iter_mut().zip(next) {
            r.length += 1;
            match next {
                Some(token) => r.next = token,
                None => finished.push(*slot),
            }
        }
        drop(rows);
        for slot in finished {
            if let Some(r) = running[slot].take() {
                results[r.seq.row] = Some(r.seq.out);
            }
        }
        stats.decode_tokens += busy;
        stats.decode_row_capacity += slots;
        stats.decode += t3.elapsed();
    }
    let results = results
        .into_iter()
        .map(|g| g.ok_or_else(|| ModelError::Graph("a sequence got no result".into())))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((results, stats))
}

/// Vision (now, or from the thread that encoded it ahead) and embeddings of prompt `row`, ready to prefill.
fn stage(
    embed: &mut Session,
    manifest: &ModelManifest,
    features: &mut Features<'_>,
    prompts: &[EncodedPrompt],
    row: usize,
    stats: &mut GenerationStats,
) -> Result<Staged, ModelError> {
    let image_features = features.next(&prompts[row], stats)?;
    let t1 = Instant::now();
    let batch = prompt_batch(embed, manifest, prompts, &[row], &[image_features])?;
    stats.prefill += t1.elapsed();
    Ok(Staged {
        row,
        len: batch.width,
        embeds: batch.embeds,
        done: 0,
    })
}

/// A prefilled prompt's first token, from its last position's `logits`: the running sequence, or the finished
/// one when its answer ended at once (its slot stays free).
fn admit(
    staged: &Staged,
    logits: &mut [f32],
    config: &GenerationConfig,
    hook: &mut dyn StepHook,
    eos: u32,
) -> Admitted {
    let mut seq = Sequence::new(staged.row, staged.len, config);
    match take_tokens(&mut [(&mut seq, logits)], config, hook, eos).first() {
        Some(Some(token)) => Admitted::Running(Running {
            next: *token,
            seq,
            length: staged.len as i64,
        }),
        _ => Admitted::Finished(seq.out),
    }
}

enum Admitted {
    Running(Running),
    Finished(Generation),
}
