//! Continuous batching over KV-cache slots (GroupQueryAttention decoders): the KV-cache variant that
//! [`super::stream::StreamEngine`] steps through.
//!
//! One cache buffer per layer and key/value, `[slots, kv_heads, capacity, head_dim]`, bound as both past and
//! present of every decode step, so ONNX Runtime writes each step's keys/values in place. A sequence owns one
//! slot (one row) from its admission to its last token; when it finishes, its slot is free at once and the next
//! prompt joins the running rows. A static batch instead runs until its longest answer ends, its finished rows
//! leaving it ever smaller: extraction answers range from a few tokens to hundreds, so most of a static batch's
//! rows sit out its tail.
//!
//! Prefill is interleaved with decode: the next waiting prompt is prefilled ahead, as many chunks between two
//! decode steps as the scheduler allows, into a one-row staging cache (ONNX Runtime's CPU GroupQueryAttention
//! takes a prompt chunk after a non-empty cache only at batch 1), so running rows wait for at most that many
//! chunks, never for a whole page. When a slot frees and the staged prompt is complete, the staging row is copied
//! into the slot once and the prompt's first token is taken from its last position's logits.
//!
//! Every step binds all slots: a free slot computes a pad token at position 0 that nothing reads (the next
//! admission into that slot overwrites the row). That keeps the buffers whole, so binding them costs no copy; a
//! view of a slot range is a tensor over borrowed memory, which ort copies when bound as an input.

use std::time::{Duration, Instant};

use ort::session::Session;
use ort::value::DynTensor;

use super::cache::prefill_row_chunks;
use super::decode::{Sequence, host_logits, take_tokens};
use super::decoder::{Decoder, GqaStep};
use super::ort_util::{copy_rows, tensor_memory};
use super::{GenerationConfig, GenerationStats, StepHook, embed_ids, prompt_batch};
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
pub(super) struct Staged {
    pub id: usize,
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

/// What a slot step borrows from the engine (everything but the vision encoder).
pub(super) struct SlotParts<'a> {
    pub manifest: &'a ModelManifest,
    pub embed: &'a mut Session,
    pub decoder: &'a mut Decoder,
    pub config: &'a GenerationConfig,
    /// Prompt tokens per prefill pass.
    pub chunk: usize,
}

/// A row's work during one call, for the per-row timing columns: time that was its own (`prefill`), and its share
/// of steps it decoded in with others (`decode`: each step's time over its working rows).
pub(super) type Charge = (usize, Phase, Duration);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    Prefill,
    Decode,
}

/// A sequence that finished: its id and result.
pub(super) type Ended = (usize, crate::model::Generation);

/// The slots' cache, the staging row and the rows running in them.
pub(super) struct SlotState {
    cache: Vec<DynTensor>,
    staging_cache: Vec<DynTensor>,
    staging_logits: DynTensor,
    step_logits: DynTensor,
    /// fp16 logits widened to f32, reused across steps.
    widened: Vec<f32>,
    running: Vec<Option<Running>>,
    staged: Option<Staged>,
}

impl SlotState {
    /// `slots` rows of `capacity` tokens each (prompt and answer), plus the staging row.
    pub fn new(decoder: &Decoder, slots: usize, capacity: usize) -> Result<Self, ModelError> {
        Ok(SlotState {
            cache: decoder.cache_buffers(slots, capacity)?,
            staging_cache: decoder.cache_buffers(1, capacity)?,
            staging_logits: decoder.logits_buffer(1)?,
            step_logits: decoder.logits_buffer(slots)?,
            widened: Vec::new(),
            running: (0..slots).map(|_| None).collect(),
            staged: None,
        })
    }

    /// Where ONNX Runtime put the slot cache.
    pub fn memory(&self) -> Option<String> {
        self.cache.first().map(tensor_memory)
    }

    /// Rows generating now.
    pub fn busy(&self) -> usize {
        self.running.iter().flatten().count()
    }

    pub fn staged(&self) -> Option<usize> {
        self.staged.as_ref().map(|s| s.id)
    }

    /// Embeds prompt `id` (its image features already encoded) into the staging row, ready to prefill.
    pub fn stage(
        &mut self,
        parts: &mut SlotParts<'_>,
        id: usize,
        prompt: &EncodedPrompt,
        features: Vec<f32>,
    ) -> Result<(), ModelError> {
        let batch = prompt_batch(parts.embed, parts.manifest, &[prompt], &[features])?;
        self.staged = Some(Staged {
            id,
            len: batch.width,
            embeds: batch.embeds,
            done: 0,
        });
        Ok(())
    }

    /// Prefills up to `passes` chunks of the staged prompt; returns (tokens prefilled, passes run, whether the
    /// staged prompt is now complete).
    pub fn prefill(
        &mut self,
        parts: &mut SlotParts<'_>,
        passes: usize,
        stats: &mut GenerationStats,
    ) -> Result<(usize, usize, bool), ModelError> {
        let Some(s) = self.staged.as_mut() else {
            return Ok((0, 0, false));
        };
        if s.complete() {
            return Ok((0, 0, true));
        }
        let (done, ran) = prefill_row_chunks(
            parts.decoder,
            &s.embeds,
            s.done,
            parts.chunk,
            passes,
            &mut self.staging_cache,
            &mut self.staging_logits,
        )?;
        stats.prefill_passes += ran;
        let tokens = done - s.done;
        stats.prefill_tokens += tokens;
        s.done = done;
        Ok((tokens, ran, s.complete()))
    }

    /// Moves the complete staged prompt into a free slot and takes its first token from its last position's
    /// logits. Returns its id and, when the answer ended at once, its generation (the slot stays free).
    /// None when nothing complete is staged or no slot is free.
    pub fn admit(
        &mut self,
        parts: &mut SlotParts<'_>,
        hook: &mut dyn StepHook,
    ) -> Result<Option<(usize, Option<crate::model::Generation>)>, ModelError> {
        let Some(slot) = self.running.iter().position(Option::is_none) else {
            return Ok(None);
        };
        if !self.staged.as_ref().is_some_and(Staged::complete) {
            return Ok(None);
        }
        let Some(s) = self.staged.take() else {
            return Ok(None);
        };
        for (dst, src) in self.cache.iter_mut().zip(&self.staging_cache) {
            copy_rows(src, 0, dst, slot, 1)?;
        }
        let (eos, vocab) = (parts.manifest.tokens.eos, parts.manifest.text.vocab_size);
        let logits = host_logits(
            &mut self.staging_logits,
            parts.decoder.logits_float,
            &mut self.widened,
        )?;
        let mut seq = Sequence::new(s.id, s.len, parts.config);
        let first = take_tokens(
            &mut [(&mut seq, &mut logits[..vocab])],
            parts.config,
            hook,
            eos,
        );
        match first.first() {
            Some(Some(token)) => {
                self.running[slot] = Some(Running {
                    next: *token,
                    seq,
                    length: s.len as i64,
                });
                Ok(Some((s.id, None)))
            }
            _ => Ok(Some((s.id, Some(seq.out)))),
        }
    }

    /// One decode step over every slot. Returns the sequences that finished and each working row's share of the
    /// step's time; adds the step's forward-pass time to `forward`.
    pub fn decode_step(
        &mut self,
        parts: &mut SlotParts<'_>,
        hook: &mut dyn StepHook,
        forward: &mut Duration,
        overlap_masks: bool,
    ) -> Result<(Vec<Ended>, Vec<Charge>), ModelError> {
        let t = Instant::now();
        let slots = self.running.len();
        let pad = parts.manifest.tokens.pad as i64;
        let (eos, vocab) = (parts.manifest.tokens.eos, parts.manifest.text.vocab_size);
        let ids: Vec<i64> = self
            .running
            .iter()
            .map(|r| r.as_ref().map_or(pad, |r| r.next as i64))
            .collect();
        let embeds = embed_ids(parts.embed, ids, slots)?;
        // A row's new token sits at its current length; seqlens_k is that length (length after, minus one).
        let positions: Vec<i64> = self
            .running
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
        let pass = Instant::now();
        if overlap_masks {
            // This step's masks depend only on tokens already accepted: the hook computes them on a helper thread
            // while the decoder runs.
            let live: Vec<usize> = self.running.iter().flatten().map(|r| r.seq.row).collect();
            let (decoder, cache, logits) =
                (&mut *parts.decoder, &mut self.cache, &mut self.step_logits);
            std::thread::scope(|scope| {
                let helper = scope.spawn(|| hook.prepare_masks(&live));
                let ran = decoder.gqa_pass(step, cache, logits);
                // A panic in the hook is a bug: propagate it rather than invent masks.
                if let Err(panic) = helper.join() {
                    std::panic::resume_unwind(panic);
                }
                ran
            })?;
        } else {
            parts
                .decoder
                .gqa_pass(step, &mut self.cache, &mut self.step_logits)?;
        }
        *forward += pass.elapsed();
        let logits = host_logits(
            &mut self.step_logits,
            parts.decoder.logits_float,
            &mut self.widened,
        )?;
        let mut rows: Vec<(usize, &mut Running, &mut [f32])> = self
            .running
            .iter_mut()
            .zip(logits.chunks_mut(vocab))
            .enumerate()
            .filter_map(|(slot, (r, l))| r.as_mut().map(|r| (slot, r, l)))
            .collect();
        let mut step_rows: Vec<(&mut Sequence, &mut [f32])> = rows
            .iter_mut()
            .map(|(_, r, l)| (&mut r.seq, &mut **l))
            .collect();
        let next = take_tokens(&mut step_rows, parts.config, hook, eos);
        drop(step_rows);
        let mut finished_slots = Vec::new();
        let mut working = Vec::with_capacity(rows.len());
        for ((slot, r, _), next) in rows.iter_mut().zip(next) {
            r.length += 1;
            working.push(r.seq.row);
            match next {
                Some(token) => r.next = token,
                None => finished_slots.push(*slot),
            }
        }
        drop(rows);
        let finished = finished_slots
            .into_iter()
            .filter_map(|slot| self.running[slot].take())
            .map(|r| (r.seq.row, r.seq.out))
            .collect();
        let share = t.elapsed() / working.len().max(1) as u32;
        let charges = working
            .into_iter()
            .map(|id| (id, Phase::Decode, share))
            .collect();
        Ok((finished, charges))
    }
}
