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

use std::time::Instant;

use ort::value::DynTensor;

use super::cache::prefill_row_chunks;
use super::decode::{Sequence, host_logits, take_tokens};
use super::decoder::GqaStep;
use super::ort_util::{copy_rows, tensor_memory};
use super::{
    BatchPolicy, Generation, GenerationConfig, GenerationStats, PixtralEngine, StepHook,
    default_prefill_chunk,
};
use crate::model::ModelError;
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
        let mut stats = GenerationStats::default();
        if prompts.is_empty() {
            return Ok((Vec::new(), stats));
        }
        stats.batches = 1;
        let slots = policy.max_batch.clamp(1, prompts.len());
        let capacity =
            prompts.iter().map(|p| p.ids.len()).max().unwrap_or(0) + config.max_new_tokens;
        let chunk = match config
            .prefill_chunk
            .unwrap_or_else(|| default_prefill_chunk(self.device))
        {
            0 => capacity,
            c => c,
        };
        let chunks_per_gap = match policy.prefill_chunks_per_step {
            0 => usize::MAX,
            n => n,
        };
        let eos = self.model.manifest.tokens.eos;
        let pad = self.model.manifest.tokens.pad as i64;
        let vocab = self.model.manifest.text.vocab_size;
        let logits_float = self.decoder.logits_float;

        let mut cache = self.decoder.cache_buffers(slots, capacity)?;
        stats.kv_cache_memory = cache.first().map(tensor_memory);
        let mut staging = Staging {
            cache: self.decoder.cache_buffers(1, capacity)?,
            logits: self.decoder.logits_buffer(1)?,
        };
        let mut step_logits = self.decoder.logits_buffer(slots)?;
        let mut widened = Vec::new();
        let mut running: Vec<Option<Running>> = (0..slots).map(|_| None).collect();
        let mut results: Vec<Option<Generation>> = vec![None; prompts.len()];
        let mut waiting = all.into_iter();
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
                    staged = Some(self.stage(prompts, row, &mut stats)?);
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
                        &mut self.decoder,
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
            let embeds = self.embed_ids(ids, slots)?;
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
            self.decoder.gqa_pass(step, &mut cache, &mut step_logits)?;
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

    /// Vision and embeddings of prompt `row`, ready to prefill.
    fn stage(
        &mut self,
        prompts: &[EncodedPrompt],
        row: usize,
        stats: &mut GenerationStats,
    ) -> Result<Staged, ModelError> {
        let t0 = Instant::now();
        let features = self.vision_features(prompts, &[row], stats)?;
        stats.vision += t0.elapsed();
        let t1 = Instant::now();
        let batch = self.prompt_batch(prompts, &[row], &features)?;
        stats.prefill += t1.elapsed();
        Ok(Staged {
            row,
            len: batch.width,
            embeds: batch.embeds,
            done: 0,
        })
    }
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
