//! `pixtract bench batching`: continuous batching against static batching, same engine, same prompts, same
//! batch size, same run.
//!
//! The workload is what extraction looks like: many prompts whose answers differ a lot in length (a receipt
//! with two items, an invoice with forty lines). Answer lengths are drawn from a seeded generator and enforced by
//! a step hook that ends each sequence after its length (as the grammar ends an answer), so both modes generate
//! exactly the same tokens. Reported: generated tokens/s end to end (vision, prefill and decode), decode tokens/s,
//! the share of decode row slots that idled, the longest stall of running rows between two decode steps (prompt
//! tokens prefilled, and time), the shares of wall time in the vision encoder and in prefill, and the ratio; and
//! whether every sequence's tokens equal its prompt's one-by-one run. Continuous batching runs three times: joining
//! prompts prefilled whole (running rows wait for each page), prefill interleaved with decode steps, and the latter
//! with the vision encoder on its own thread.
//!
//! Each round also measures what a decode step costs on this machine at 1 row and at the batch size, fitted as
//! `fixed + per_row x rows`, and from it the fastest decode any scheduler over the same slots could reach: every
//! pass at full width, as few passes as the answers need. Static batches shrink as rows finish, so they pay the
//! per-row part only for rows that work, as continuous batching does; what continuous batching can save is the
//! fixed part of the passes static batches spend on their long tails, and their cache compactions as rows finish.
//! Where a step costs the same at 1 or 8 rows (a large model whose decode reads all its weights every step) that
//! is the busy-row ratio; where rows dominate (the tiny model's 131,072 x 32 LM head on a CPU) it is near 1. Each
//! mode's decode gain is reported as a share of the possible gain, and the per-round ratios' medians at the end.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};

use pixtract::model::runtime::Threads;
use pixtract::model::sampling::splitmix64;
use pixtract::model::{
    AnswerLengths, BatchPolicy, Batching, Device, EncodedPrompt, EngineOptions, GenerationConfig,
    GenerationStats, OrtRuntime, PixtralEngine, plan_batches,
};
use pixtract::verify::{self, ReferenceCase};

use super::engine::DEFAULT_CASES;

/// What `pixtract bench batching` measures (the command line's flags, documented there).
#[derive(Debug, Clone)]
pub struct BatchingBench {
    pub model: PathBuf,
    pub reference_dir: Option<PathBuf>,
    pub prompts: usize,
    pub min_tokens: usize,
    pub max_tokens: usize,
    pub batch: usize,
    pub repeat: usize,
    pub seed: u64,
    pub prefill_chunks_per_step: usize,
    pub prefill_chunk: Option<usize>,
    pub vision_ahead: usize,
    pub threads: usize,
    pub device: Device,
    pub spin: bool,
}

/// Answer lengths in `min..=max`, reproducible from the seed alone (the sampler's SplitMix64 stream).
fn lengths(n: usize, min: usize, max: usize, seed: u64) -> Vec<usize> {
    let mut state = seed;
    (0..n)
        .map(|_| min + (splitmix64(&mut state) % (max - min + 1) as u64) as usize)
        .collect()
}

struct Pass {
    seconds: f64,
    tokens: Vec<Vec<u32>>,
    stats: GenerationStats,
}

impl Pass {
    fn generated(&self) -> usize {
        self.tokens.iter().map(Vec::len).sum()
    }
    fn tok_s(&self) -> f64 {
        self.generated() as f64 / self.seconds
    }
    fn decode_tok_s(&self) -> f64 {
        self.stats.decode_tokens as f64 / self.stats.decode.as_secs_f64()
    }
    fn idle_share(&self) -> f64 {
        1.0 - self.stats.decode_tokens as f64 / self.stats.decode_row_capacity.max(1) as f64
    }
    /// Shares of the pass's wall time in the vision encoder and in prefill (the rest is decode and host work).
    fn vision_share(&self) -> f64 {
        self.stats.vision.as_secs_f64() / self.seconds
    }
    fn prefill_share(&self) -> f64 {
        self.stats.prefill.as_secs_f64() / self.seconds
    }
}

/// What one decode step costs on this machine: `fixed_ms + per_row_ms x rows` (fitted from steps at 1 row and at
/// the batch size; the tiny and CI models' steps at 1, 2, 4 and 8 rows lie on that line within 4%).
#[derive(Debug, Clone, Copy)]
struct StepCost {
    fixed_ms: f64,
    per_row_ms: f64,
}

impl StepCost {
    fn at(&self, rows: usize) -> f64 {
        self.fixed_ms + self.per_row_ms * rows as f64
    }
}

/// Decode passes the workload's sequences are in, summed: a sequence of `n` tokens takes its first from prefill.
fn row_passes(answer: &[usize]) -> usize {
    answer.iter().map(|&n| n.saturating_sub(1)).sum()
}

/// Decoder passes of a workload batched statically: (passes, row-passes). `batches` are the engine's own static
/// plan (longest prompts first, within the batch size and token budget: [`plan_batches`]) as indices into
/// `answer`. A sequence's first token comes from its prefill, so a sequence of `n` tokens is in `n - 1` decode
/// passes, and a batch runs as many passes as its longest sequence needs.
fn static_passes(answer: &[usize], batches: &[Vec<usize>]) -> (usize, usize) {
    let passes = batches
        .iter()
        .map(|b| {
            b.iter()
                .map(|&i| answer[i])
                .max()
                .map_or(0, |n| n.saturating_sub(1))
        })
        .sum();
    (passes, row_passes(answer))
}

/// Decode time of a workload batched statically, as `cost` predicts it: the fixed part on every pass of a batch's
/// longest row, the per-row part for working rows only (finished rows leave the batch). What static batching
/// measures beyond this is its own overhead: compacting the cache and reallocating logits as rows finish.
fn static_model_ms(cost: StepCost, answer: &[usize], batches: &[Vec<usize>]) -> f64 {
    let (passes, row_passes) = static_passes(answer, batches);
    passes as f64 * cost.fixed_ms + row_passes as f64 * cost.per_row_ms
}

/// Decode time of the ideal continuous schedule: every pass at full width (`batch` working rows), as few passes
/// as the workload's row-passes allow. No scheduler over `batch` slots decodes the workload faster.
fn ideal_continuous_ms(cost: StepCost, answer: &[usize], batch: usize) -> f64 {
    row_passes(answer).div_ceil(batch.max(1)) as f64 * cost.at(batch)
}

/// Measures [`StepCost`]: `prompts` one by one and then together in one static batch, every answer `tokens` long
/// (all rows work on every pass, so the batch's passes are at full width).
fn step_cost(
    engine: &mut PixtralEngine,
    prompts: &[EncodedPrompt],
    tokens: usize,
    config: &GenerationConfig,
) -> anyhow::Result<StepCost> {
    let n = prompts.len();
    let answer = vec![tokens; n];
    let passes = (tokens - 1) as f64;
    // No token budget: all `n` prompts must share one batch whatever their lengths.
    let static_policy = |max_batch: usize| BatchPolicy {
        max_batch,
        token_budget: usize::MAX,
        batching: Batching::Static,
        ..BatchPolicy::default()
    };
    let alone = pass(engine, prompts, &answer, config, static_policy(1))?;
    let together = pass(engine, prompts, &answer, config, static_policy(n))?;
    let one_ms = alone.stats.decode.as_secs_f64() * 1e3 / (passes * n as f64);
    let all_ms = together.stats.decode.as_secs_f64() * 1e3 / passes;
    let per_row_ms = ((all_ms - one_ms) / (n - 1) as f64).max(0.0);
    Ok(StepCost {
        fixed_ms: (one_ms - per_row_ms).max(0.0),
        per_row_ms,
    })
}

/// How much of the gain possible over static (`ceiling`, a speed ratio) a mode's `ratio` got: 1 = all of it, 0 =
/// none, negative = slower than static.
fn gain_share(ratio: f64, ceiling: f64) -> f64 {
    (ratio - 1.0) / (ceiling - 1.0)
}

/// [`gain_share`] as a percentage, or "n/a" when the ceiling leaves under 2% to gain (the share would be noise
/// divided by almost nothing).
fn gain_share_text(ratio: f64, ceiling: f64) -> String {
    if ceiling - 1.0 < 0.02 {
        "n/a".to_string()
    } else {
        format!("{:.0}%", 100.0 * gain_share(ratio, ceiling))
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

fn pass(
    engine: &mut PixtralEngine,
    prompts: &[EncodedPrompt],
    answer: &[usize],
    config: &GenerationConfig,
    policy: BatchPolicy,
) -> anyhow::Result<Pass> {
    let mut hook = AnswerLengths::new(answer.to_vec());
    let t0 = Instant::now();
    let (gens, stats) = engine.generate_many(prompts, config, policy, &mut hook)?;
    Ok(Pass {
        seconds: t0.elapsed().as_secs_f64(),
        tokens: gens.into_iter().map(|g| g.tokens).collect(),
        stats,
    })
}

/// Runs the benchmark and prints its table. Fails when the two modes' tokens differ or differ from the
/// one-by-one runs.
pub fn run(args: BatchingBench) -> anyhow::Result<()> {
    if args.min_tokens == 0 || args.min_tokens > args.max_tokens {
        bail!(
            "answer lengths {}..={}: need 1 <= --min-tokens <= --max-tokens",
            args.min_tokens,
            args.max_tokens
        );
    }
    let pool = Threads {
        intra_op: args.threads,
        spin: args.spin,
    };
    let rt = OrtRuntime::load_from_env_with_pool(pool)?;
    let mut engine = PixtralEngine::load(
        &rt,
        &args.model,
        EngineOptions {
            device: args.device,
        },
    )?;
    let reference = verify::reference_dir_for(&args.model, args.reference_dir.as_deref());
    if let Some(note) = reference.note(&args.model) {
        eprintln!("{note}");
    }
    let mut pool_prompts = Vec::new();
    for name in DEFAULT_CASES.split(',') {
        let dir = reference.path.join(name);
        let case = ReferenceCase::load(&engine, &dir)
            .with_context(|| format!("reference case {}", dir.display()))?;
        pool_prompts.push(case.prompt);
    }
    let prompts: Vec<EncodedPrompt> = (0..args.prompts)
        .map(|i| pool_prompts[i % pool_prompts.len()].clone())
        .collect();
    let answer = lengths(args.prompts, args.min_tokens, args.max_tokens, args.seed);
    let config = GenerationConfig {
        max_new_tokens: args.max_tokens,
        stop_on_eos: false,
        token_probs: false,
        prefill_chunk: args.prefill_chunk,
        ..Default::default()
    };
    let inter = args.prefill_chunks_per_step.max(1);
    let ahead = args.vision_ahead.max(1);
    // (name, batching, prefill chunks per decode step, prompts encoded ahead by the vision thread)
    let modes = [
        ("static", Batching::Static, 0, 0),
        ("cont-whole", Batching::Continuous, 0, 0),
        ("cont-inter", Batching::Continuous, inter, 0),
        ("cont-ahead", Batching::Continuous, inter, ahead),
    ];
    let policy = |batching, prefill_chunks_per_step, vision_ahead| BatchPolicy {
        max_batch: args.batch,
        batching,
        prefill_chunks_per_step,
        vision_ahead,
        ..BatchPolicy::default()
    };

    // One by one, each distinct prompt to the longest answer: every sequence must be a prefix of its prompt's.
    let alone_lengths = vec![args.max_tokens; pool_prompts.len()];
    let alone = pass(
        &mut engine,
        &pool_prompts,
        &alone_lengths,
        &config,
        BatchPolicy {
            max_batch: 1,
            batching: Batching::Static,
            ..BatchPolicy::default()
        },
    )?;
    println!(
        "{} prompts from {} reference cases ({} prompt tokens), answers {}..={} tokens (seed {}), {} generated \
         tokens per pass, batch size {}, model {}, {}",
        prompts.len(),
        pool_prompts.len(),
        prompts.iter().map(|p| p.ids.len()).sum::<usize>(),
        args.min_tokens,
        args.max_tokens,
        args.seed,
        answer.iter().sum::<usize>(),
        args.batch,
        args.model.display(),
        engine.attention().name(),
    );
    println!(
        "modes: static; cont-whole: continuous, joining prompts prefilled whole; cont-inter: continuous, {inter} \
         prefill chunk(s) of {} tokens between decode steps; cont-ahead: cont-inter with the vision encoder on its own \
         thread, {ahead} prompt(s) ahead (vision = that thread's busy time, vision wait = the decoder waiting for it)",
        config
            .prefill_chunk
            .unwrap_or_else(|| pixtract::model::default_prefill_chunk(args.device)),
    );
    println!(
        "{:>5}  {:<10}  {:>8}  {:>10}  {:>12}  {:>9}  {:>14}  {:>12}  {:>8}  {:>11}  {:>9}",
        "round",
        "batching",
        "wall s",
        "tok/s",
        "decode tok/s",
        "idle rows",
        "max stall tok",
        "max stall ms",
        "vision",
        "vision wait",
        "prefill"
    );
    // The step-cost probe runs the workload's first `batch` prompts (fewer when there are fewer prompts).
    let probe_rows = args.batch.min(prompts.len());
    let probe = probe_rows >= 2 && args.max_tokens >= 2;
    // The static pass's own batches, as the engine plans them (longest prompts first, within the token budget).
    let static_plan = plan_batches(
        &prompts.iter().map(|p| p.ids.len()).collect::<Vec<_>>(),
        policy(Batching::Static, 0, 0),
    );
    let mut best: [Option<f64>; 4] = [None; 4];
    let mut ratios: [Vec<f64>; 3] = Default::default();
    let mut decode_ratios: [Vec<f64>; 3] = Default::default();
    let mut ceilings = Vec::new();
    for round in 1..=args.repeat.max(1) {
        // Alternating within the round, so drift on a shared machine hits every mode alike.
        let mut round_tok_s = [0.0; 4];
        let mut round_decode_ms = [0.0; 4];
        for (i, &(name, batching, chunks, ahead)) in modes.iter().enumerate() {
            let p = pass(
                &mut engine,
                &prompts,
                &answer,
                &config,
                policy(batching, chunks, ahead),
            )?;
            check_tokens(&p, &alone, &answer, pool_prompts.len(), name)?;
            println!(
                "{round:>5}  {name:<10}  {:>8.2}  {:>10.1}  {:>12.1}  {:>8.1}%  {:>14}  {:>12.1}  {:>7.1}%  {:>10.1}%  {:>8.1}%",
                p.seconds,
                p.tok_s(),
                p.decode_tok_s(),
                100.0 * p.idle_share(),
                p.stats.max_stall_tokens,
                p.stats.max_stall.as_secs_f64() * 1e3,
                100.0 * p.vision_share(),
                100.0 * p.stats.vision_wait.as_secs_f64() / p.seconds,
                100.0 * p.prefill_share(),
            );
            round_tok_s[i] = p.tok_s();
            round_decode_ms[i] = p.stats.decode.as_secs_f64() * 1e3;
            best[i] = Some(best[i].map_or(p.tok_s(), |b: f64| b.max(p.tok_s())));
        }
        println!(
            "{round:>5}  end to end: cont-whole / static {:.2}x, cont-inter / static {:.2}x, cont-ahead / static {:.2}x",
            round_tok_s[1] / round_tok_s[0],
            round_tok_s[2] / round_tok_s[0],
            round_tok_s[3] / round_tok_s[0]
        );
        for i in 0..3 {
            ratios[i].push(round_tok_s[i + 1] / round_tok_s[0]);
        }
        if probe {
            let cost = step_cost(
                &mut engine,
                &prompts[..probe_rows],
                args.max_tokens,
                &config,
            )?;
            let static_ms = round_decode_ms[0];
            let model_ms = static_model_ms(cost, &answer, &static_plan);
            let ideal_ms = ideal_continuous_ms(cost, &answer, args.batch);
            // From the probe alone (the passes' own noise does not enter): what fewer, fuller passes can save.
            let ceiling = model_ms / ideal_ms;
            let decode: Vec<f64> = (1..4)
                .map(|i| round_decode_ms[0] / round_decode_ms[i])
                .collect();
            let share = |d: f64| gain_share_text(d, ceiling);
            println!(
                "{round:>5}  decode step here: {:.3} ms + {:.3} ms per row ({:.3} ms at 1 row, {:.3} ms at {probe_rows}). \
                 Decode of this workload: static {static_ms:.0} ms measured, {model_ms:.0} ms from the step cost \
                 (the difference is noise and static's own work: cache compactions as rows finish); every pass \
                 full over {} slots {ideal_ms:.0} ms: scheduling ceiling {ceiling:.2}x. Decode / static: cont-whole \
                 {:.2}x, cont-inter {:.2}x, cont-ahead {:.2}x ({}, {}, {} of the ceiling's gain)",
                cost.fixed_ms,
                cost.per_row_ms,
                cost.at(1),
                cost.at(probe_rows),
                args.batch,
                decode[0],
                decode[1],
                decode[2],
                share(decode[0]),
                share(decode[1]),
                share(decode[2]),
            );
            for (i, d) in decode.iter().enumerate() {
                decode_ratios[i].push(*d);
            }
            ceilings.push(ceiling);
        }
    }
    if let [Some(s), Some(w), Some(c), Some(a)] = best {
        println!(
            "fastest rounds: static {s:.1} tok/s, continuous with whole prefills {w:.1} tok/s ({:.2}x), continuous \
             interleaved {c:.1} tok/s ({:.2}x), interleaved with vision ahead {a:.1} tok/s ({:.2}x); every \
             sequence's tokens equal its prompt's one-by-one run in every mode",
            w / s,
            c / s,
            a / s
        );
    }
    let [whole, inter, ahead] = &mut ratios;
    println!(
        "medians over {} round(s), end to end / static: cont-whole {:.2}x, cont-inter {:.2}x, cont-ahead {:.2}x",
        args.repeat.max(1),
        median(whole),
        median(inter),
        median(ahead)
    );
    if probe {
        let ceiling = median(&mut ceilings);
        let [whole, inter, ahead] = &mut decode_ratios;
        let (whole, inter, ahead) = (median(whole), median(inter), median(ahead));
        let share = |d: f64| gain_share_text(d, ceiling);
        println!(
            "medians, decode / static: cont-whole {whole:.2}x, cont-inter {inter:.2}x, cont-ahead {ahead:.2}x; \
             scheduling ceiling {ceiling:.2}x ({}, {}, {} of its gain)",
            share(whole),
            share(inter),
            share(ahead),
        );
    }
    Ok(())
}

/// Each sequence's tokens are the first `answer[i]` of its prompt's one-by-one run.
fn check_tokens(
    pass: &Pass,
    alone: &Pass,
    answer: &[usize],
    pool: usize,
    mode: &str,
) -> anyhow::Result<()> {
    for (i, tokens) in pass.tokens.iter().enumerate() {
        let want = &alone.tokens[i % pool];
        let n = answer[i].min(want.len());
        if tokens.len() != answer[i] || tokens[..] != want[..n] {
            bail!(
                "{mode} batching: sequence {i} generated {:?}, its prompt alone {:?}",
                &tokens[..tokens.len().min(16)],
                &want[..n.min(16)]
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_lengths_are_seeded_and_in_range() {
        let a = lengths(64, 8, 256, 7);
        assert_eq!(a, lengths(64, 8, 256, 7));
        assert_ne!(a, lengths(64, 8, 256, 8));
        assert!(a.iter().all(|&l| (8..=256).contains(&l)));
        // Spread, not a constant: the workload needs short and long answers.
        assert!(a.iter().min() < Some(&40) && a.iter().max() > Some(&220));
    }

    #[test]
    fn static_batches_run_as_long_as_their_longest_row() {
        // Batches [5, 2] and [3]: 4 + 2 passes; rows work 4 + 1 + 2 passes (first tokens come from prefill).
        assert_eq!(static_passes(&[5, 2, 3], &[vec![0, 1], vec![2]]), (6, 7));
        // The plan decides the batches, not input order: [5, 3] and [2].
        assert_eq!(static_passes(&[5, 2, 3], &[vec![0, 2], vec![1]]), (5, 7));
        assert_eq!(static_passes(&[1, 1], &[vec![0, 1]]), (0, 0));
    }

    #[test]
    fn the_ideal_schedule_gains_the_busy_row_ratio_when_steps_cost_the_same_at_any_width() {
        let answer = [9, 1, 1, 1, 5, 5, 5, 5];
        // Static: 8 + 4 passes; rows work 8 + 16 = 24 passes, 6 passes at full width.
        let flat = StepCost {
            fixed_ms: 1.0,
            per_row_ms: 0.0,
        };
        let plan = [vec![0, 1, 2, 3], vec![4, 5, 6, 7]];
        assert!((static_model_ms(flat, &answer, &plan) - 12.0).abs() < 1e-12);
        assert!((ideal_continuous_ms(flat, &answer, 4) - 6.0).abs() < 1e-12);
        // Steps that cost only per row: static batches pay for working rows alone, nothing is left to gain.
        let rows_only = StepCost {
            fixed_ms: 0.0,
            per_row_ms: 1.0,
        };
        assert!((static_model_ms(rows_only, &answer, &plan) - 24.0).abs() < 1e-12);
        assert!((ideal_continuous_ms(rows_only, &answer, 4) - 24.0).abs() < 1e-12);
        assert!((gain_share(1.5, 2.0) - 0.5).abs() < 1e-12);
    }
}
