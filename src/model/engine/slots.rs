//! Continuous batching over KV-cache slots (GroupQueryAttention decoders).
//!
//! One cache buffer per layer and key/value, `[slots, kv_heads, capacity, head_dim]`, bound as both past and
//! present of every decode step, so ONNX Runtime writes each step's keys/values in place. A sequence owns one
//! slot (one row) from its prefill to its last token; when it finishes, its slot is free at once and the next
//! waiting prompt is prefilled and joins the running rows at the next step. A static batch instead runs until
//! its longest answer ends, its finished rows leaving it ever smaller: extraction answers range from a few
//! tokens to hundreds, so most of a static batch's rows sit out its tail.
//!
//! Every step binds all slots: a free slot computes a pad token at position 0 that nothing reads (the next
//! prefill into that slot overwrites the row). That keeps the buffers whole, so binding them costs no copy; a
//! view of a slot range is a tensor over borrowed memory, which ort copies when bound as an input. A prompt is
//! prefilled into a one-row buffer (ONNX Runtime's CPU GroupQueryAttention takes a prompt chunk after a
//! non-empty cache only at batch 1) and copied into its slot once.

use std::time::Instant;

use super::cache::prefill_row;
use super::decode::{fail_row, finish_after, host_logits, sampler_for};
use super::decoder::GqaStep;
use super::ort_util::{copy_rows, tensor_memory};
use super::{
    Generation, GenerationConfig, GenerationStats, PixtralEngine, StepHook, default_prefill_chunk,
};
use crate::model::ModelError;
use crate::model::prompt::EncodedPrompt;
use crate::model::sampling::Sampler;

/// A sequence in a slot.
struct Running {
    /// Index into the prompts (names the sequence to the hook).
    row: usize,
    /// Tokens in the slot's cache.
    length: i64,
    /// Token to feed at the next step.
    next: u32,
    sampler: Sampler,
    out: Generation,
}

/// What is done with one row's logits: the hook masks them, the sampler picks, the hook sees the token.
/// Returns whether the sequence finished; a hook error or a fully masked row fails that sequence alone.
fn take_token(
    seq: &mut Running,
    logits: &mut [f32],
    config: &GenerationConfig,
    hook: &mut dyn StepHook,
    eos: u32,
) -> bool {
    let row = seq.row;
    if let Err(source) = hook.mask_logits(row, logits) {
        fail_row(&mut seq.out, ModelError::Hook { row, source });
        return true;
    }
    if config.keep_first_logits && seq.out.tokens.is_empty() {
        seq.out.first_logits = Some(logits.to_vec());
    }
    let Some((token, prob)) = seq.sampler.choose(logits) else {
        fail_row(&mut seq.out, ModelError::AllMasked { row });
        return true;
    };
    seq.out.tokens.push(token);
    if config.token_probs {
        seq.out.token_probs.push(prob);
    }
    let hook_done = match hook.accept_token(row, token) {
        Ok(done) => done,
        Err(source) => {
            fail_row(&mut seq.out, ModelError::Hook { row, source });
            return true;
        }
    };
    seq.next = token;
    match finish_after(token, hook_done, seq.out.tokens.len(), config, eos) {
        Some(reason) => {
            seq.out.finish = reason;
            true
        }
        None => false,
    }
}

impl PixtralEngine {
    /// Generates for `prompts` through `slots` KV-cache slots, admitting prompts in input order as slots free
    /// up. Results in input order, token for token what each prompt gives alone.
    pub(super) fn generate_continuous(
        &mut self,
        prompts: &[EncodedPrompt],
        config: &GenerationConfig,
        slots: usize,
        hook: &mut dyn StepHook,
    ) -> Result<(Vec<Generation>, GenerationStats), ModelError> {
        let all: Vec<usize> = (0..prompts.len()).collect();
        self.check_rows(prompts, &all, config)?;
        let mut stats = GenerationStats::default();
        if prompts.is_empty() {
            return Ok((Vec::new(), stats));
        }
        stats.batches = 1;
        let slots = slots.clamp(1, prompts.len());
        let capacity =
            prompts.iter().map(|p| p.ids.len()).max().unwrap_or(0) + config.max_new_tokens;
        let chunk = match config
            .prefill_chunk
            .unwrap_or_else(|| default_prefill_chunk(self.device))
        {
            0 => capacity,
            c => c,
        };
        let eos = self.model.manifest.tokens.eos;
        let pad = self.model.manifest.tokens.pad as i64;
        let vocab = self.model.manifest.text.vocab_size;
        let logits_float = self.decoder.logits_float;

        let mut cache = self.decoder.cache_buffers(slots, capacity)?;
        stats.kv_cache_memory = cache.first().map(tensor_memory);
        let mut staging = self.decoder.cache_buffers(1, capacity)?;
        let mut prompt_logits = self.decoder.logits_buffer(1)?;
        let mut step_logits = self.decoder.logits_buffer(slots)?;
        let mut widened = Vec::new();
        let mut running: Vec<Option<Running>> = (0..slots).map(|_| None).collect();
        let mut results: Vec<Option<Generation>> = vec![None; prompts.len()];
        let mut waiting = all.into_iter();

        loop {
            // Free slots take the next waiting prompts: vision, prefill into the staging row, one copy into the
            // slot, and the first token from the prompt's last position.
            for (slot, place) in running.iter_mut().enumerate() {
                while place.is_none() {
                    let Some(row) = waiting.next() else { break };
                    let t0 = Instant::now();
                    let features = self.vision_features(prompts, &[row], &mut stats)?;
                    stats.vision += t0.elapsed();
                    let t1 = Instant::now();
                    let batch = self.prompt_batch(prompts, &[row], &features)?;
                    prefill_row(
                        &mut self.decoder,
                        &batch.embeds,
                        chunk,
                        &mut staging,
                        &mut prompt_logits,
                        &mut stats,
                    )?;
                    for (dst, src) in cache.iter_mut().zip(&staging) {
                        copy_rows(src, 0, dst, slot, 1)?;
                    }
                    stats.prefill += t1.elapsed();
                    stats.prefill_tokens += batch.width;
                    let t2 = Instant::now();
                    let mut seq = Running {
                        row,
                        length: batch.width as i64,
                        next: 0,
                        sampler: sampler_for(row, config),
                        out: Generation {
                            tokens: Vec::new(),
                            token_probs: Vec::new(),
                            finish: super::FinishReason::Length,
                            prompt_tokens: batch.width,
                            first_logits: None,
                            error: None,
                        },
                    };
                    let logits = host_logits(&mut prompt_logits, logits_float, &mut widened)?;
                    let done = take_token(&mut seq, &mut logits[..vocab], config, hook, eos);
                    stats.decode_tokens += 1;
                    stats.decode_row_capacity += 1;
                    stats.decode += t2.elapsed();
                    if done {
                        results[row] = Some(seq.out);
                    } else {
                        *place = Some(seq);
                    }
                }
            }
            let busy = running.iter().flatten().count();
            if busy == 0 {
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
            for (slot, place) in running.iter_mut().enumerate() {
                let Some(seq) = place.as_mut() else { continue };
                seq.length += 1;
                let row_logits = &mut logits[slot * vocab..(slot + 1) * vocab];
                if take_token(seq, row_logits, config, hook, eos)
                    && let Some(seq) = place.take()
                {
                    results[seq.row] = Some(seq.out);
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
}
