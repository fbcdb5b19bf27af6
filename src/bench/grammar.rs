//! `pixtract bench grammar`: the host work of a decode step under a JSON Schema grammar, without the forward pass,
//! against the budget a GPU step leaves for it.
//!
//! Rows are the extraction hook (`SchemaConstraint`, llguidance) over Pixtral's 131,072-token vocabulary, fed
//! seeded random logits (what the forward pass would return, filled outside the timing); each step masks every
//! row, chooses its token with its probability (as extraction does, for confidences) and accepts it, through the
//! engine's own per-step code (`host_steps`). A row whose answer ends is replaced by a new one, as a freed slot
//! takes the next prompt.
//!
//! The budget: 10% of a Pixtral 12B decode step on an H100 at that batch. A decode step reads every weight once and
//! every row's KV cache: 25.4 GB of fp16 weights plus 160 KiB per token per row, a page-sized row holding ~4,400
//! tokens (4,160 image tokens of a 1024x1024 page and the instruction: 0.72 GB), at the H100 SXM's 3.35 TB/s.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use pixtract::extract::{ExtractionSchema, GrammarEnv, SchemaConstraint};
use pixtract::model::{GenerationConfig, ModelDir, StepHook, host_steps};

pub struct GrammarBench {
    /// Model directory: its tokenizer, EOS and vocabulary.
    pub model: PathBuf,
    pub schemas: Vec<PathBuf>,
    pub rows: Vec<usize>,
    pub steps: usize,
    pub max_new_tokens: usize,
    pub seed: u64,
}

/// fp16 weights of Pixtral 12B (the exported decoder, embeddings and LM head; docs/quantization.md).
const WEIGHT_BYTES: f64 = 25.4e9;
/// KV cache per token: 40 layers x 2 x 8 KV heads x 128 x 2 bytes.
const KV_BYTES_PER_TOKEN: f64 = 163_840.0;
/// Tokens a page-sized row holds: 4,160 image tokens and the instruction.
const ROW_TOKENS: f64 = 4_400.0;
/// H100 SXM memory bandwidth, bytes per second.
const H100_BANDWIDTH: f64 = 3.35e12;
/// The share of a step the host may take.
const BUDGET_SHARE: f64 = 0.10;

/// Milliseconds a 12B decode step at `rows` rows takes on an H100 at full memory bandwidth.
fn h100_step_ms(rows: usize) -> f64 {
    (WEIGHT_BYTES + rows as f64 * ROW_TOKENS * KV_BYTES_PER_TOKEN) / H100_BANDWIDTH * 1e3
}

/// Seeded logits in [-4, 4): each row and step gets its own.
struct Logits(u64);

impl Logits {
    fn fill(&mut self, row: usize, out: &mut [f32]) {
        let mut x = self.0 ^ (row as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        for v in out.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *v = (x >> 40) as f32 / (1u64 << 24) as f32 * 8.0 - 4.0;
        }
        self.0 = x;
    }
}

pub fn run(args: GrammarBench) -> anyhow::Result<()> {
    let model = ModelDir::open(&args.model)?;
    let m = &model.manifest;
    let (eos, vocab) = (m.tokens.eos, m.text.vocab_size);
    let env = GrammarEnv::shared(&model.path_of(&m.tokenizer.file), eos, vocab)?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "bench grammar: {} tokens, {} steps per measurement, {threads} core(s); host time per step = masks + \
         choosing (with probabilities) + accepting, forward pass excluded",
        vocab, args.steps
    );
    println!(
        "| schema | masks/s per core | rows | host ms/step, masks one by one | host ms/step, masks on {threads} cores | \
         budget ms (10% of a 12B H100 step) | share of budget |"
    );
    println!("|---|---|---|---|---|---|---|");
    for path in &args.schemas {
        let schema = ExtractionSchema::load(path)
            .with_context(|| format!("loading schema {}", path.display()))?;
        let per_core = masks_per_second(&env, &schema, &args, vocab);
        for &rows in &args.rows {
            let sequential = step_ms(&env, &schema, &args, rows, vocab, eos, false);
            let parallel = step_ms(&env, &schema, &args, rows, vocab, eos, true);
            let budget = BUDGET_SHARE * h100_step_ms(rows);
            println!(
                "| {} | {per_core:.0} | {rows} | {sequential:.2} | {parallel:.2} | {budget:.2} | {:.0}% |",
                schema.name,
                100.0 * parallel / budget
            );
        }
    }
    println!(
        "(budget: (25.4 GB fp16 weights + rows x 4,400 tokens x 160 KiB) / 3.35 TB/s x 10%; median step of {} steps)",
        args.steps
    );
    Ok(())
}

/// Masks per second on one core: one row, one mask at a time, token chosen as the best allowed logit.
fn masks_per_second(
    env: &Arc<GrammarEnv>,
    schema: &ExtractionSchema,
    args: &GrammarBench,
    vocab: usize,
) -> f64 {
    let mut hook = SchemaConstraint::new(env.clone(), schema, args.max_new_tokens);
    let mut logits = vec![0f32; vocab];
    let mut source = Logits(args.seed);
    let (mut row, mut masked, mut spent) = (0usize, 0usize, Duration::ZERO);
    for _ in 0..args.steps * 4 {
        source.fill(row, &mut logits);
        let t = std::time::Instant::now();
        let ok = hook.mask_logits(row, &mut logits).is_ok();
        spent += t.elapsed();
        masked += 1;
        let best = logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |(i, _)| i as u32);
        let done = !ok || hook.accept_token(row, best).unwrap_or(true) || best == env.eos();
        if done {
            row += 1;
        }
    }
    masked as f64 / spent.as_secs_f64().max(1e-9)
}

/// Median host milliseconds per step at `rows` rows.
fn step_ms(
    env: &Arc<GrammarEnv>,
    schema: &ExtractionSchema,
    args: &GrammarBench,
    rows: usize,
    vocab: usize,
    eos: u32,
    parallel: bool,
) -> f64 {
    let mut hook: Box<dyn StepHook> = Box::new(
        SchemaConstraint::new(env.clone(), schema, args.max_new_tokens)
            .with_parallel_masks(parallel),
    );
    let config = GenerationConfig {
        max_new_tokens: args.max_new_tokens,
        ..Default::default()
    };
    let mut source = Logits(args.seed);
    let mut times = host_steps(
        rows,
        args.steps,
        vocab,
        &config,
        hook.as_mut(),
        eos,
        |row, out| source.fill(row, out),
    );
    times.sort();
    times
        .get(times.len() / 2)
        .map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_follows_the_bandwidth_arithmetic() {
        // 25.4 GB / 3.35 TB/s = 7.58 ms at no rows; each page-sized row adds 0.72 GB = 0.215 ms.
        assert!((h100_step_ms(0) - 7.582).abs() < 0.01);
        assert!((h100_step_ms(64) - h100_step_ms(0) - 64.0 * 0.2152).abs() < 0.05);
    }

    #[test]
    fn logits_are_seeded_and_in_range() {
        let (mut a, mut b) = (Logits(3), Logits(3));
        let (mut x, mut y) = (vec![0f32; 1000], vec![0f32; 1000]);
        a.fill(1, &mut x);
        b.fill(1, &mut y);
        assert_eq!(x, y);
        assert!(x.iter().all(|v| (-4.0..4.0).contains(v)));
        a.fill(2, &mut y);
        assert_ne!(x, y);
    }
}
