//! The KV cache of one batch between passes, in the layout its decoder graph wants, behind one type: prefill a
//! batch of prompts, take a decode step, keep the rows still generating.
//!
//! - [`KvCache::Concat`] (eager graphs): the last pass's `present.*` values, a new tensor each step (the graph
//!   concatenates), with each row's attention mask and next position (rows are left-padded).
//! - [`KvCache::InPlace`] (GroupQueryAttention graphs): one `[rows, kv_heads, capacity, head_dim]` buffer per
//!   layer and key/value, bound as both past and present, which ONNX Runtime writes in place: a decode step
//!   copies none of the cache. Host copies remain where rows change: prefilled rows are gathered into the batch
//!   buffer once, and a finished row leaving the batch compacts the others.

use ort::value::{DynTensor, DynValue};

use super::GenerationStats;
use super::decoder::{Decoder, GqaStep};
use super::ort_util::{copy_rows, memory_of, tensor_memory};
use crate::model::ModelError;
use crate::model::manifest::DecoderAttention;

pub(super) enum KvCache {
    Concat {
        past: Vec<DynValue>,
        mask_rows: Vec<Vec<i64>>,
        next_pos: Vec<i64>,
    },
    InPlace {
        buffers: Vec<DynTensor>,
        /// Each active row's length (its tokens fill the start of its row).
        lengths: Vec<i64>,
    },
}

/// A batch of prompts ready for prefill: left-padded to `width` so every row's last position is real.
pub(super) struct PromptBatch {
    /// `[rows, width, hidden]`, image features already in place of `[IMG]` tokens.
    pub embeds: Vec<f32>,
    pub width: usize,
    /// `[rows, width]`: 1 on real tokens.
    pub mask: Vec<i64>,
    /// `[rows, width]`: each real token's position in its own prompt.
    pub positions: Vec<i64>,
    /// Each row's prompt length (its real tokens are the last `len` columns).
    pub lengths: Vec<usize>,
}

impl PromptBatch {
    pub fn rows(&self) -> usize {
        self.lengths.len()
    }
}

impl KvCache {
    /// Runs every prompt of `batch` through the decoder, `chunk` tokens per pass, leaving each row's
    /// last-position logits in `logits` and room in the cache for `capacity` tokens per row (in-place caches).
    pub fn prefill(
        decoder: &mut Decoder,
        batch: &PromptBatch,
        chunk: usize,
        capacity: usize,
        logits: &mut DynTensor,
        stats: &mut GenerationStats,
    ) -> Result<KvCache, ModelError> {
        Ok(match decoder.attention {
            DecoderAttention::Eager => KvCache::Concat {
                past: prefill_padded(decoder, batch, chunk, logits, stats)?,
                mask_rows: batch
                    .mask
                    .chunks(batch.width.max(1))
                    .map(<[i64]>::to_vec)
                    .collect(),
                next_pos: batch.lengths.iter().map(|&l| l as i64).collect(),
            },
            DecoderAttention::Gqa => KvCache::InPlace {
                buffers: prefill_in_place(decoder, batch, capacity, chunk, logits, stats)?,
                lengths: batch.lengths.iter().map(|&l| l as i64).collect(),
            },
        })
    }

    /// One decode step for the `active` rows (indices into the batch) given their new tokens' embeddings.
    pub fn step(
        &mut self,
        decoder: &mut Decoder,
        embeds: &[f32],
        active: &[usize],
        logits: &mut DynTensor,
    ) -> Result<(), ModelError> {
        let n = active.len();
        match self {
            KvCache::Concat {
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
                *past = decoder.eager_pass(embeds, n, &step_mask, &step_pos, past, logits)?;
            }
            KvCache::InPlace { buffers, lengths } => {
                // seqlens_k is each row's length after this step minus one: its length now.
                let seqlens: Vec<i32> = lengths.iter().map(|&l| l as i32).collect();
                let step = GqaStep {
                    embeds,
                    batch: n,
                    // A row's new token sits at its current length.
                    positions: lengths,
                    seqlens_k: &seqlens,
                    total: lengths.iter().max().copied().unwrap_or(0) as i32 + 1,
                    logits_index: &vec![0i64; n],
                };
                decoder.gqa_pass(step, buffers, logits)?;
                for l in lengths.iter_mut() {
                    *l += 1;
                }
            }
        }
        Ok(())
    }

    /// Keeps rows `keep` (indices among the active rows): finished sequences leave the batch.
    pub fn keep_rows(&mut self, decoder: &Decoder, keep: &[usize]) -> Result<(), ModelError> {
        match self {
            KvCache::Concat { past, .. } => {
                *past = past
                    .iter()
                    .map(|v| decoder.gather_rows(v, keep))
                    .collect::<Result<Vec<_>, _>>()?;
            }
            KvCache::InPlace { buffers, lengths } => {
                // Every buffer is [rows, kv_heads, capacity, head_dim] (made by `cache_buffers`).
                let Some(&capacity) = buffers.first().and_then(|b| b.shape().get(2)) else {
                    return Ok(());
                };
                let mut kept = decoder.cache_buffers(keep.len(), capacity as usize)?;
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
}

/// Prefill of a left-padded batch through an eager decoder: each pass appends `chunk` columns to the cache;
/// every row's mask and positions cover the columns so far, so the result equals one pass over the whole width.
fn prefill_padded(
    decoder: &mut Decoder,
    batch: &PromptBatch,
    chunk: usize,
    logits: &mut DynTensor,
    stats: &mut GenerationStats,
) -> Result<Vec<DynValue>, ModelError> {
    let (rows, width, hidden) = (batch.rows(), batch.width, decoder.hidden());
    let (embeds, mask, positions) = (&batch.embeds, &batch.mask, &batch.positions);
    let mut past = decoder.empty_past(rows)?;
    let mut start = 0;
    loop {
        let end = (start + chunk).min(width);
        past = if start == 0 && end == width {
            decoder.eager_pass(embeds, rows, mask, positions, &past, logits)?
        } else {
            let cols = end - start;
            let mut e = Vec::with_capacity(rows * cols * hidden);
            let mut m = Vec::with_capacity(rows * end);
            let mut pos = Vec::with_capacity(rows * cols);
            for b in 0..rows {
                e.extend_from_slice(
                    &embeds[(b * width + start) * hidden..(b * width + end) * hidden],
                );
                m.extend_from_slice(&mask[b * width..b * width + end]);
                pos.extend_from_slice(&positions[b * width + start..b * width + end]);
            }
            decoder.eager_pass(&e, rows, &m, &pos, &past, logits)?
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
fn prefill_in_place(
    decoder: &mut Decoder,
    batch: &PromptBatch,
    capacity: usize,
    chunk: usize,
    logits: &mut DynTensor,
    stats: &mut GenerationStats,
) -> Result<Vec<DynTensor>, ModelError> {
    let (rows, width, hidden) = (batch.rows(), batch.width, decoder.hidden());
    let mut gathered = if rows > 1 {
        Some(decoder.cache_buffers(rows, capacity)?)
    } else {
        None
    };
    // At batch 1 the pass writes the batch's logits buffer itself; otherwise each row's, copied into place.
    let mut row_logits = if rows > 1 {
        Some(decoder.logits_buffer(1)?)
    } else {
        None
    };
    let mut last = Vec::new();
    for (b, &len) in batch.lengths.iter().enumerate() {
        let row = &batch.embeds[(b * width + width - len) * hidden..(b + 1) * width * hidden];
        let mut buffers = decoder.cache_buffers(1, capacity)?;
        prefill_row(
            decoder,
            row,
            chunk,
            &mut buffers,
            row_logits.as_mut().unwrap_or(&mut *logits),
            stats,
        )?;
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

/// Prefills one prompt (`embeds`: its `[len, hidden]` embeddings) into the one-row GroupQueryAttention cache
/// `buffers` (`[1, kv_heads, capacity, head_dim]` each) in `chunk`-token passes, leaving its last position's
/// logits in `logits` (`[1, 1, vocab]`). The cache's earlier contents need not be zero: the first pass starts
/// the row at length 0 and nothing past a row's length is read.
pub(super) fn prefill_row(
    decoder: &mut Decoder,
    embeds: &[f32],
    chunk: usize,
    buffers: &mut [DynTensor],
    logits: &mut DynTensor,
    stats: &mut GenerationStats,
) -> Result<(), ModelError> {
    let (_, passes) = prefill_row_chunks(decoder, embeds, 0, chunk, usize::MAX, buffers, logits)?;
    stats.prefill_passes += passes;
    Ok(())
}

/// Continues [`prefill_row`] from token `start` for at most `passes` chunks; returns the tokens now in the row
/// and the passes run.
/// The chunk boundaries are the same however the passes are spread (multiples of `chunk` from 0), so a prompt
/// prefilled a chunk at a time between decode steps gets the very cache and logits of one prefilled at once.
pub(super) fn prefill_row_chunks(
    decoder: &mut Decoder,
    embeds: &[f32],
    mut start: usize,
    chunk: usize,
    passes: usize,
    buffers: &mut [DynTensor],
    logits: &mut DynTensor,
) -> Result<(usize, usize), ModelError> {
    let hidden = decoder.hidden();
    let len = embeds.len() / hidden.max(1);
    let mut done = 0;
    while start < len && done < passes {
        let end = (start + chunk.max(1)).min(len);
        let positions: Vec<i64> = (start as i64..end as i64).collect();
        let step = GqaStep {
            embeds: &embeds[start * hidden..end * hidden],
            batch: 1,
            positions: &positions,
            seqlens_k: &[end as i32 - 1],
            total: end as i32,
            logits_index: &[(end - start) as i64 - 1],
        };
        decoder.gqa_pass(step, buffers, logits)?;
        done += 1;
        start = end;
    }
    Ok((start, done))
}
