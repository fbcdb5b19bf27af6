//! The decode loop of a static batch, and the per-row step both batchings share: the hook masks each row's
//! logits, each row's sampler picks a token, the hook sees it, and a row that failed or finished leaves.

use half::f16;
use ort::value::DynTensor;

use super::cache::KvCache;
use super::ort_util::{FloatKind, ort_err};
use super::{FinishReason, Generation, GenerationConfig, PixtralEngine, StepHook};
use crate::model::ModelError;
use crate::model::prompt::EncodedPrompt;
use crate::model::sampling::Sampler;

/// Rows at or above which `take_tokens` chooses on a second thread when it computes token probabilities (a
/// softmax scan costs ~60-90 us per row; a scoped thread ~20-40 us to start). An argmax-only scan runs at memory
/// speed and stays on the calling thread: a second thread there only fights ONNX Runtime's spinning pool.
const PARALLEL_CHOOSE_ROWS: usize = 4;

/// One sequence being generated: which prompt it is (`row` names it to the hook), its sampler (seeded by the
/// row, so a sequence draws the same tokens in any batch) and what it has produced so far.
pub(super) struct Sequence {
    pub row: usize,
    sampler: Sampler,
    pub out: Generation,
}

impl Sequence {
    pub fn new(row: usize, prompt_tokens: usize, config: &GenerationConfig) -> Self {
        let sampler = Sampler::new(&config.sampling, row as u64);
        let sampler = if config.token_probs {
            sampler
        } else {
            sampler.without_probabilities()
        };
        Sequence {
            row,
            sampler,
            out: Generation {
                tokens: Vec::new(),
                token_probs: Vec::new(),
                finish: FinishReason::Length,
                prompt_tokens,
                first_logits: None,
                error: None,
            },
        }
    }

    /// Ends this sequence with its error (the rest of the batch goes on).
    fn fail(&mut self, error: ModelError) {
        self.out.finish = FinishReason::Failed;
        self.out.error = Some(crate::error::chain(&error));
    }
}

/// One step's token for each of `rows` (a sequence and its row of the pass's logits), for the static and the
/// continuous loop alike: 1. the hook masks each row (in row order: it owns per-row grammar state); 2. each
/// row's sampler chooses (rows are independent: split over two threads where the scans cost more than a
/// thread); 3. the hook sees each chosen token, in row order, and the sequence finishes on EOS, the hook's
/// say-so or its budget. A failing hook or a fully masked row ends that sequence alone with its error.
///
/// Returns, per row, the token to feed next, or `None` when the sequence finished (its `out.finish` says why).
pub(super) fn take_tokens(
    rows: &mut [(&mut Sequence, &mut [f32])],
    config: &GenerationConfig,
    hook: &mut dyn StepHook,
    eos: u32,
) -> Vec<Option<u32>> {
    let mut failed = vec![false; rows.len()];
    let mut masks: Vec<(usize, &mut [f32])> = rows
        .iter_mut()
        .map(|(seq, logits)| (seq.row, &mut **logits))
        .collect();
    let masked = hook.mask_rows(&mut masks);
    drop(masks);
    for (((seq, logits), failed), masked) in rows.iter_mut().zip(&mut failed).zip(masked) {
        if let Err(source) = masked {
            let row = seq.row;
            seq.fail(ModelError::Hook { row, source });
            *failed = true;
        } else if config.keep_first_logits && seq.out.tokens.is_empty() {
            seq.out.first_logits = Some(logits.to_vec());
        }
    }
    let picks = choose_all(rows, &failed);
    let mut next = Vec::with_capacity(rows.len());
    for (((seq, _), pick), failed) in rows.iter_mut().zip(picks).zip(failed) {
        if failed {
            next.push(None);
            continue;
        }
        let row = seq.row;
        let Some((token, prob)) = pick else {
            seq.fail(ModelError::AllMasked { row });
            next.push(None);
            continue;
        };
        seq.out.tokens.push(token);
        if config.token_probs {
            seq.out.token_probs.push(prob);
        }
        let hook_done = match hook.accept_token(row, token) {
            Ok(done) => done,
            Err(source) => {
                seq.fail(ModelError::Hook { row, source });
                next.push(None);
                continue;
            }
        };
        match finish_after(token, hook_done, seq.out.tokens.len(), config, eos) {
            Some(reason) => {
                seq.out.finish = reason;
                next.push(None);
            }
            None => next.push(Some(token)),
        }
    }
    next
}

/// Each row's sampler's choice over its (masked) logits; `None` for failed rows and fully masked ones.
fn choose_all(
    rows: &mut [(&mut Sequence, &mut [f32])],
    failed: &[bool],
) -> Vec<Option<(u32, f32)>> {
    let mut jobs: Vec<(&mut Sampler, &[f32])> = rows
        .iter_mut()
        .zip(failed)
        .filter(|(_, failed)| !**failed)
        .map(|((seq, logits), _)| (&mut seq.sampler, &**logits))
        .collect();
    let run = |jobs: &mut [(&mut Sampler, &[f32])]| -> Vec<Option<(u32, f32)>> {
        jobs.iter_mut().map(|(s, l)| s.choose(l)).collect()
    };
    let chosen = if jobs.len() < PARALLEL_CHOOSE_ROWS
        || !jobs.iter().all(|(s, _)| s.computes_probabilities())
    {
        run(&mut jobs)
    } else {
        let half = jobs.len() / 2;
        let (front, back) = jobs.split_at_mut(half);
        std::thread::scope(|scope| {
            let back = scope.spawn(|| run(back));
            let mut out = run(front);
            // A panic in the helper thread is a bug in `choose`; propagate it rather than invent a result.
            out.extend(back.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
            out
        })
    };
    let mut chosen = chosen.into_iter();
    failed
        .iter()
        .map(|&f| if f { None } else { chosen.next().flatten() })
        .collect()
}

/// What a static batch's decode gives back: its sequences, the tokens decoded (rows x steps) and the row slots
/// the steps offered (the batch's size each step).
pub(super) struct DecodeOutcome {
    pub generations: Vec<Generation>,
    pub decode_tokens: usize,
    pub row_capacity: usize,
    /// Decoder passes after the prefill, and the time they took (the rest of decode is host work).
    pub steps: usize,
    pub forward: std::time::Duration,
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
/// token budget.
fn finish_after(
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

impl PixtralEngine {
    /// Decodes the prefilled batch until every row has finished. `rows` index into `prompts` and name the
    /// sequences to the hook; `logits` holds the prefill's last-position logits.
    pub(super) fn decode(
        &mut self,
        cache: &mut KvCache,
        mut logits: DynTensor,
        prompts: &[&EncodedPrompt],
        rows: &[usize],
        config: &GenerationConfig,
        hook: &mut dyn StepHook,
    ) -> Result<DecodeOutcome, ModelError> {
        let mut decode_tokens = 0;
        let mut row_capacity = 0;
        let mut steps = 0;
        let mut forward = std::time::Duration::ZERO;
        let eos = self.model.manifest.tokens.eos;
        let vocab = self.model.manifest.text.vocab_size;
        let mut seqs: Vec<Sequence> = rows
            .iter()
            .zip(prompts)
            .map(|(&r, p)| Sequence::new(r, p.ids.len(), config))
            .collect();
        // Positions in `seqs` still generating, ascending; row j of the logits is sequence active[j].
        let mut active: Vec<usize> = (0..rows.len()).collect();
        let mut widened: Vec<f32> = Vec::new(); // fp16 logits as f32, reused across steps
        loop {
            let logits_data = host_logits(&mut logits, self.decoder.logits_float, &mut widened)?;
            let mut wanted = active.iter().peekable();
            let mut step: Vec<(&mut Sequence, &mut [f32])> = seqs
                .iter_mut()
                .enumerate()
                .filter(|(b, _)| wanted.next_if_eq(&b).is_some())
                .map(|(_, seq)| seq)
                .zip(logits_data.chunks_mut(vocab))
                .collect();
            let next = take_tokens(&mut step, config, hook, eos);
            decode_tokens += active.len();
            row_capacity += rows.len();
            // Finished sequences leave the batch: keep only the others' cache rows.
            let keep: Vec<usize> = (0..active.len()).filter(|&j| next[j].is_some()).collect();
            if keep.is_empty() {
                return Ok(DecodeOutcome {
                    generations: seqs.into_iter().map(|s| s.out).collect(),
                    decode_tokens,
                    row_capacity,
                    steps,
                    forward,
                });
            }
            let chosen: Vec<i64> = next.iter().flatten().map(|&t| t as i64).collect();
            if keep.len() < active.len() {
                cache.keep_rows(&self.decoder, &keep)?;
                active = keep.iter().map(|&j| active[j]).collect();
                logits = self.decoder.logits_buffer(active.len())?;
            }
            let embeds = self.embed_ids(chosen, active.len())?;
            let pass = std::time::Instant::now();
            cache.step(&mut self.decoder, &embeds, &active, &mut logits)?;
            forward += pass.elapsed();
            steps += 1;
        }
    }
}

/// The host side of decode steps, without a model: `rows` sequences whose logits `fill` writes each step (outside
/// the timing), masked, chosen and accepted by [`take_tokens`], the code every decode step runs. A sequence that
/// finishes is replaced by a new one (a new row id), as a freed slot takes the next prompt. Returns each step's
/// host time. For `bench grammar`: what a step costs besides its forward pass.
pub fn host_steps(
    rows: usize,
    steps: usize,
    vocab: usize,
    config: &GenerationConfig,
    hook: &mut dyn StepHook,
    eos: u32,
    mut fill: impl FnMut(usize, &mut [f32]),
) -> Vec<std::time::Duration> {
    let mut next_row = rows;
    let mut seqs: Vec<Sequence> = (0..rows).map(|r| Sequence::new(r, 0, config)).collect();
    let mut logits = vec![0f32; rows * vocab];
    let mut times = Vec::with_capacity(steps);
    for _ in 0..steps {
        for (seq, row_logits) in seqs.iter().zip(logits.chunks_mut(vocab)) {
            fill(seq.row, row_logits);
        }
        let t = std::time::Instant::now();
        let mut step: Vec<(&mut Sequence, &mut [f32])> =
            seqs.iter_mut().zip(logits.chunks_mut(vocab)).collect();
        let next = take_tokens(&mut step, config, hook, eos);
        drop(step);
        times.push(t.elapsed());
        for (seq, next) in seqs.iter_mut().zip(next) {
            if next.is_none() {
                *seq = Sequence::new(next_row, 0, config);
                next_row += 1;
            }
        }
    }
    times
}
