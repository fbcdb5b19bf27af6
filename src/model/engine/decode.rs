//! The decode loop: per step, the hook masks each row's logits, each row's sampler picks a token, the hook sees
//! it, finished rows leave the batch, and the others' next tokens go through the decoder.

use half::f16;
use ort::value::DynTensor;

use super::cache::KvCache;
use super::ort_util::{FloatKind, ort_err};
use super::{FinishReason, Generation, GenerationConfig, PixtralEngine, StepHook};
use crate::model::ModelError;
use crate::model::prompt::EncodedPrompt;
use crate::model::sampling::Sampler;

/// Rows at or above which `choose_rows` uses a second thread when it computes token probabilities (a softmax
/// scan costs ~60-90 us per row; a scoped thread ~20-40 us to start). An argmax-only scan runs at memory speed
/// and stays on the calling thread: a second thread there only fights ONNX Runtime's spinning pool.
const PARALLEL_CHOOSE_ROWS: usize = 4;

/// `samplers[b].choose(row j's logits)` for every active row `j` (sequence `b = active[j]`).
pub(super) fn choose_rows(
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

/// What a static batch's decode gives back: its sequences, the tokens decoded (rows x steps) and the row slots
/// the steps offered (the batch's size each step).
pub(super) struct DecodeOutcome {
    pub generations: Vec<Generation>,
    pub decode_tokens: usize,
    pub row_capacity: usize,
}

/// The host logits of a pass as mutable f32 rows: the buffer itself for fp32 logits (masked in place: it is
/// ours until the next pass), or `widened` holding fp16 logits as f32.
pub(super) fn host_logits<'a>(
    logits: &'a mut DynTensor,
    kind: FloatKind,
    widened: &'a mut Vec<f32>,
) -> Result<&'a mut [f32], ModelError> {
    Ok(match kind {
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
            widened
        }
    })
}

/// Why a sequence that just produced `token` stops, if it does: EOS (when configured), the hook's say-so, or its
/// token budget. One rule for the static and the continuous decode loops.
pub(super) fn finish_after(
    token: u32,
    hook_done: bool,
    generated: usize,
    config: &GenerationConfig,
    eos: u32,
) -> Option<FinishReason> {
    if config.stop_on_eos && token == eos {
        Some(FinishReason::Eos)
    } else if hook_done {
        Some(FinishReason::Hook)
    } else if generated >= config.max_new_tokens {
        Some(FinishReason::Length)
    } else {
        None
    }
}

/// A sampler for sequence `row`: seeded by the row, so a sequence draws the same tokens in any batch.
pub(super) fn sampler_for(row: usize, config: &GenerationConfig) -> Sampler {
    let sampler = Sampler::new(&config.sampling, row as u64);
    if config.token_probs {
        sampler
    } else {
        sampler.without_probabilities()
    }
}

impl PixtralEngine {
    /// Decodes the prefilled batch until every row has finished. `rows` index into `prompts` and name the
    /// sequences to the hook; `logits` holds the prefill's last-position logits.
    pub(super) fn decode(
        &mut self,
        cache: &mut KvCache,
        mut logits: DynTensor,
        prompts: &[EncodedPrompt],
        rows: &[usize],
        config: &GenerationConfig,
        hook: &mut dyn StepHook,
    ) -> Result<DecodeOutcome, ModelError> {
        let mut decode_tokens = 0;
        let mut row_capacity = 0;
        let eos = self.model.manifest.tokens.eos;
        let vocab = self.model.manifest.text.vocab_size;
        let mut active: Vec<usize> = (0..rows.len()).collect(); // positions in `rows` still generating
        let mut outs: Vec<Generation> = rows
            .iter()
            .map(|&r| Generation {
                tokens: Vec::new(),
                token_probs: Vec::new(),
                finish: FinishReason::Length,
                prompt_tokens: prompts[r].ids.len(),
                first_logits: None,
                error: None,
            })
            .collect();
        let mut widened: Vec<f32> = Vec::new(); // fp16 logits as f32, reused across steps
        let mut samplers: Vec<Sampler> = rows.iter().map(|&r| sampler_for(r, config)).collect();
        loop {
            let mut finished = Vec::new();
            let mut chosen = Vec::with_capacity(active.len());
            let logits_data = host_logits(&mut logits, self.decoder.logits_float, &mut widened)?;
            // 1. The hook masks each row (sequential: it owns per-row grammar state). A row whose hook fails
            // finishes with that error; the others go on.
            let mut failed = vec![false; active.len()];
            for (j, &b) in active.iter().enumerate() {
                let row = rows[b];
                let slice = &mut logits_data[j * vocab..(j + 1) * vocab];
                if let Err(source) = hook.mask_logits(row, slice) {
                    fail_row(&mut outs[b], ModelError::Hook { row, source });
                    failed[j] = true;
                    continue;
                }
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
                if failed[j] {
                    finished.push(j);
                    continue;
                }
                let Some((token, prob)) = picks[j] else {
                    fail_row(&mut outs[b], ModelError::AllMasked { row });
                    finished.push(j);
                    continue;
                };
                outs[b].tokens.push(token);
                if config.token_probs {
                    outs[b].token_probs.push(prob);
                }
                let hook_done = match hook.accept_token(row, token) {
                    Ok(done) => done,
                    Err(source) => {
                        fail_row(&mut outs[b], ModelError::Hook { row, source });
                        finished.push(j);
                        continue;
                    }
                };
                match finish_after(token, hook_done, outs[b].tokens.len(), config, eos) {
                    Some(reason) => {
                        outs[b].finish = reason;
                        finished.push(j);
                    }
                    None => chosen.push(token as i64),
                }
            }
            decode_tokens += active.len();
            row_capacity += rows.len();
            if finished.len() == active.len() {
                return Ok(DecodeOutcome {
                    generations: outs,
                    decode_tokens,
                    row_capacity,
                });
            }
            if !finished.is_empty() {
                // Finished sequences leave the batch: keep only the others' cache rows.
                let keep: Vec<usize> = (0..active.len())
                    .filter(|j| !finished.contains(j))
                    .collect();
                cache.keep_rows(&self.decoder, &keep)?;
                active = keep.iter().map(|&j| active[j]).collect();
                logits = self.decoder.logits_buffer(active.len())?;
            }
            let embeds = self.embed_ids(chosen, active.len())?;
            cache.step(&mut self.decoder, &embeds, &active, &mut logits)?;
        }
    }
}

/// Ends one sequence with its error (the rest of the batch goes on).
pub(super) fn fail_row(out: &mut Generation, error: ModelError) {
    out.finish = FinishReason::Failed;
    out.error = Some(crate::error::chain(&error));
}
