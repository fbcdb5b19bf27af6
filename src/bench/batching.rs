//! `pixtract bench batching`: continuous batching against static batching, same engine, same prompts, same
//! batch size, same run.
//!
//! The workload is what extraction looks like: many prompts whose answers differ a lot in length (a receipt
//! with two items, an invoice with forty lines). Answer lengths are drawn from a seeded generator and enforced by
//! a step hook that ends each sequence after its length (as the grammar ends an answer), so both modes generate
//! exactly the same tokens. Reported: generated tokens/s end to end (vision, prefill and decode), decode tokens/s,
//! the share of decode row slots that idled, the longest stall of running rows between two decode steps (prompt
//! tokens prefilled, and time), the shares of wall time in the vision encoder and in prefill, and the ratio; and
//! whether every sequence's tokens equal its prompt's one-by-one run. Continuous batching runs twice: joining prompts prefilled whole (running rows wait for each page), and
//! prefill interleaved with decode steps.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};

use pixtract::model::runtime::Threads;
use pixtract::model::sampling::splitmix64;
use pixtract::model::{
    AnswerLengths, BatchPolicy, Batching, Device, EncodedPrompt, EngineOptions, GenerationConfig,
    GenerationStats, OrtRuntime, PixtralEngine,
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
    let mut best: [Option<f64>; 4] = [None; 4];
    for round in 1..=args.repeat.max(1) {
        // Alternating within the round, so drift on a shared machine hits every mode alike.
        let mut round_tok_s = [0.0; 4];
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
            best[i] = Some(best[i].map_or(p.tok_s(), |b: f64| b.max(p.tok_s())));
        }
        println!(
            "{round:>5}  cont-whole / static: {:.2}x, cont-inter / static: {:.2}x, cont-ahead / static: {:.2}x",
            round_tok_s[1] / round_tok_s[0],
            round_tok_s[2] / round_tok_s[0],
            round_tok_s[3] / round_tok_s[0]
        );
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
}
