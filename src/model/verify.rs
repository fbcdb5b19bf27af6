//! `pixtract verify`: the engine against a model's reference cases, on any device.
//!
//! The cases (`<model>/reference/<case>/case.json` + PNGs) were written by `onnx-export reference` from
//! transformers with mistral-common preprocessing. The checks are the parity test's: input ids identical, pixel
//! tensors within a tolerance, first-step top-k logits within a tolerance, greedy tokens identical, and the same
//! cases run as batches giving the tokens of one-by-one runs. The test suite runs them on the CPU; this command
//! runs them where the user's engine runs (`--device cuda`), so a GPU install is checked against the same
//! fixtures without a Rust toolchain.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, anyhow, bail};
use serde_json::Value;

use super::runtime::Threads;
use super::{
    BatchPolicy, Device, EncodedPrompt, EngineOptions, Generation, GenerationConfig, NoHook,
    PixtralEngine,
};

/// Max abs difference on normalised pixel values (~N(0,1) scale). mistral-common's OpenCV cubic and pixtract's
/// differ by float rounding only (~1e-6 seen).
pub const PIXEL_TOLERANCE: f32 = 1e-4;
/// Max abs difference on the reference's first-step top-k logits (fp32 graphs on the CPU: ~1e-6 seen).
pub const LOGIT_TOLERANCE: f32 = 1e-4;

#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// Model directory written by onnx-export.
    #[arg(long, value_name = "DIR", default_value = "models/tiny")]
    pub model: PathBuf,
    /// Folder holding the reference cases (default: <model>/reference, else models/tiny/reference: the tiny
    /// model's other exports, e.g. models/tiny-gqa, share its weights and so its reference). Quantized variants
    /// have none of their own: point this at the fp32 model's and expect token differences.
    #[arg(long, value_name = "DIR")]
    pub reference_dir: Option<PathBuf>,
    /// cpu, cuda or cuda:N. CUDA that cannot register is an error, never a silent CPU run.
    #[arg(long, default_value = "cpu")]
    pub device: Device,
    /// Largest first-step logit difference accepted.
    #[arg(long, default_value_t = LOGIT_TOLERANCE)]
    pub logit_tolerance: f32,
    /// Batch size of the batched re-run (its tokens must equal the one-by-one runs'); 0 skips it.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
}

/// What one reference case gave.
#[derive(Debug, Clone)]
pub struct CaseCheck {
    pub name: String,
    pub ids_equal: bool,
    /// Largest |pixtract - reference| over the reference's sampled pixels, and the mean difference of the pixel
    /// sums and absolute sums, over all images of the case.
    pub pixel_diff: f32,
    pub pixel_sum_diff: f64,
    pub logit_diff: f32,
    /// Leading greedy tokens equal to the reference's, of how many.
    pub same_tokens: usize,
    pub reference_tokens: usize,
    pub tokens: Vec<u32>,
}

impl CaseCheck {
    pub fn tokens_equal(&self) -> bool {
        self.same_tokens == self.reference_tokens && self.tokens.len() == self.reference_tokens
    }

    pub fn passes(&self, logit_tolerance: f32) -> bool {
        self.ids_equal
            && self.pixel_diff <= PIXEL_TOLERANCE
            && self.pixel_sum_diff <= PIXEL_TOLERANCE as f64
            && self.logit_diff <= logit_tolerance
            && self.tokens_equal()
    }
}

/// Where a model's reference cases are: `chosen`, else `<model>/reference`, else the tiny model's (with a note on
/// stderr), which the other tiny exports share since they hold the same seeded weights.
pub fn reference_dir_for(model: &Path, chosen: Option<&Path>) -> PathBuf {
    if let Some(dir) = chosen {
        return dir.to_path_buf();
    }
    let own = model.join("reference");
    if own.is_dir() {
        return own;
    }
    let tiny = PathBuf::from("models/tiny/reference");
    eprintln!(
        "{} has no reference/ of its own; using {} (--reference-dir to choose)",
        model.display(),
        tiny.display()
    );
    tiny
}

/// The reference case folders listed by `<reference_dir>/cases.json`.
pub fn reference_case_dirs(reference_dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let index_path = reference_dir.join("cases.json");
    let text = std::fs::read_to_string(&index_path).with_context(|| {
        format!(
            "reference cases index {} (scripts/setup.sh writes models/tiny/reference)",
            index_path.display()
        )
    })?;
    let index: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", index_path.display()))?;
    let names = index["cases"]
        .as_array()
        .ok_or_else(|| anyhow!("{} has no \"cases\" list", index_path.display()))?;
    names
        .iter()
        .map(|n| {
            n.as_str()
                .map(|s| reference_dir.join(s))
                .ok_or_else(|| anyhow!("{}: case names must be strings", index_path.display()))
        })
        .collect()
}

fn u64s(case: &Value, key: &str) -> anyhow::Result<Vec<u64>> {
    case[key]
        .as_array()
        .ok_or_else(|| anyhow!("case has no {key:?} list"))?
        .iter()
        .map(|v| {
            v.as_u64()
                .ok_or_else(|| anyhow!("{key:?} holds a non-integer"))
        })
        .collect()
}

fn f64_of(v: &Value, what: &str) -> anyhow::Result<f64> {
    v.as_f64().ok_or_else(|| anyhow!("{what} is not a number"))
}

/// Compares a reference case's prompt (ids and pixel tensors) with what pixtract encoded: (ids equal, largest
/// sampled pixel difference, largest mean difference of the sums).
pub fn check_encoding(case: &Value, prompt: &EncodedPrompt) -> anyhow::Result<(bool, f32, f64)> {
    let want_ids = u64s(case, "input_ids")?;
    let ids_equal = prompt.ids.len() == want_ids.len()
        && prompt
            .ids
            .iter()
            .zip(&want_ids)
            .all(|(&a, &b)| a as u64 == b);
    let metas = case["images"]
        .as_array()
        .ok_or_else(|| anyhow!("case has no \"images\" list"))?;
    if metas.len() != prompt.images.len() {
        bail!(
            "case has {} images, pixtract encoded {}",
            metas.len(),
            prompt.images.len()
        );
    }
    let (mut worst, mut worst_sum) = (0f32, 0f64);
    for (img, meta) in prompt.images.iter().zip(metas) {
        let shape = u64s(meta, "tensor_shape")?;
        let (h, w) = (img.height(), img.width());
        if shape != [3, h as u64, w as u64] {
            bail!("pixel tensor 3x{h}x{w}, the reference has {shape:?}");
        }
        for s in meta["samples"].as_array().into_iter().flatten() {
            let idx: Vec<usize> = (0..3)
                .map(|i| s[i].as_u64().map(|v| v as usize))
                .collect::<Option<_>>()
                .ok_or_else(|| anyhow!("malformed pixel sample {s}"))?;
            let (c, y, x) = (idx[0], idx[1], idx[2]);
            let got = *img
                .pixels
                .get(c * h * w + y * w + x)
                .ok_or_else(|| anyhow!("pixel sample {s} outside the tensor"))?;
            worst = worst.max((got - f64_of(&s[3], "pixel sample value")? as f32).abs());
        }
        let n = img.pixels.len().max(1) as f64;
        let sum: f64 = img.pixels.iter().map(|&v| v as f64).sum();
        let abs: f64 = img.pixels.iter().map(|&v| v.abs() as f64).sum();
        worst_sum = worst_sum
            .max((sum - f64_of(&meta["sum"], "pixel sum")?).abs() / n)
            .max((abs - f64_of(&meta["abs_sum"], "pixel abs_sum")?).abs() / n);
    }
    Ok((ids_equal, worst, worst_sum))
}

/// Runs one case greedily for the reference's number of tokens and compares everything.
pub fn check_case(
    engine: &mut PixtralEngine,
    name: &str,
    case: &Value,
    prompt: &EncodedPrompt,
) -> anyhow::Result<CaseCheck> {
    let (ids_equal, pixel_diff, pixel_sum_diff) = check_encoding(case, prompt)?;
    let want_tokens = u64s(case, "greedy_tokens")?;
    let config = GenerationConfig {
        max_new_tokens: case["max_new_tokens"]
            .as_u64()
            .map_or(want_tokens.len(), |n| n as usize),
        keep_first_logits: true,
        ..Default::default()
    };
    let g = generate_one(engine, prompt, &config)?;
    let first = g
        .first_logits
        .as_ref()
        .ok_or_else(|| anyhow!("engine kept no first-step logits"))?;
    let top = &case["first_step_top_k"];
    let mut logit_diff = 0f32;
    for (id, want) in u64s(top, "ids")?.iter().zip(
        top["logits"]
            .as_array()
            .ok_or_else(|| anyhow!("first_step_top_k has no logits"))?,
    ) {
        let got = *first
            .get(*id as usize)
            .ok_or_else(|| anyhow!("token id {id} outside the vocabulary"))?;
        logit_diff = logit_diff.max((got - f64_of(want, "reference logit")? as f32).abs());
    }
    let same_tokens = leading_equal(&g.tokens, &want_tokens);
    Ok(CaseCheck {
        name: name.to_string(),
        ids_equal,
        pixel_diff,
        pixel_sum_diff,
        logit_diff: if logit_diff.is_nan() {
            f32::INFINITY
        } else {
            logit_diff
        },
        same_tokens,
        reference_tokens: want_tokens.len(),
        tokens: g.tokens,
    })
}

pub fn run(args: VerifyArgs) -> ExitCode {
    match verify(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(2),
        Err(e) => {
            eprintln!("pixtract verify: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn verify(args: &VerifyArgs) -> anyhow::Result<bool> {
    let rt = super::OrtRuntime::load_from_env_with_pool(Threads::default())?;
    let opts = EngineOptions {
        device: args.device,
    };
    let mut engine = PixtralEngine::load(&rt, &args.model, opts)
        .with_context(|| format!("loading model {}", args.model.display()))?;
    let reference_dir = reference_dir_for(&args.model, args.reference_dir.as_deref());
    // A quantized or fp16 variant is not expected to give the fp32 reference's tokens: its own reference is the
    // Python onnxruntime loop's greedy tokens on the same graphs, which `onnx-export fidelity` keeps.
    let variant_reference = variant_reference(&args.model, engine.model.manifest.variant())?;
    let started = Instant::now();
    let mut checks = Vec::new();
    let mut prompts = Vec::new();
    let mut passed = 0;
    for dir in reference_case_dirs(&reference_dir)? {
        let (case, prompt) = super::bench::load_reference_case(&engine, &dir)?;
        let name = case["name"].as_str().unwrap_or("?").to_string();
        let check = check_case(&mut engine, &name, &case, &prompt)
            .with_context(|| format!("case {name} ({})", dir.display()))?;
        let mut line = format!(
            "{:<20} ids {} | pixels max {:.1e} | first-step logits max {:.1e} | tokens {}/{} of the fp32 reference",
            check.name,
            if check.ids_equal { "equal" } else { "DIFFER" },
            check.pixel_diff,
            check.logit_diff,
            check.same_tokens,
            check.reference_tokens,
        );
        let ok = match &variant_reference {
            None => check.passes(args.logit_tolerance),
            Some(fidelity) => {
                let (same, want) = variant_tokens(&mut engine, fidelity, &name, &prompt)?;
                line.push_str(&format!(
                    " | tokens {same}/{want} of onnxruntime (python) on these graphs"
                ));
                check.ids_equal && check.pixel_diff <= PIXEL_TOLERANCE && same == want
            }
        };
        if !ok {
            line.push_str("  FAIL");
        }
        println!("{line}");
        passed += usize::from(ok);
        checks.push(check);
        prompts.push(prompt);
    }
    let worst = |f: fn(&CaseCheck) -> f64| checks.iter().map(f).fold(0f64, f64::max);
    println!(
        "parity on {} ({}, {}): {passed}/{} cases pass{}; largest first-step logit diff {:.2e} (tolerance {:.0e}), \
         largest pixel diff {:.2e} (tolerance {:.0e}), greedy tokens identical to the fp32 reference in {}/{}",
        engine.device(),
        engine.model.manifest.model_id,
        engine.model.manifest.variant(),
        checks.len(),
        if variant_reference.is_some() {
            " (against the variant's own onnxruntime tokens in fidelity.json; logits are not held to the fp32 tolerance)"
        } else {
            ""
        },
        worst(|c| c.logit_diff as f64),
        args.logit_tolerance,
        worst(|c| c.pixel_diff as f64),
        PIXEL_TOLERANCE,
        checks.iter().filter(|c| c.tokens_equal()).count(),
        checks.len(),
    );
    let mut batched_ok = true;
    if args.batch > 1 && !prompts.is_empty() {
        let config = GenerationConfig {
            max_new_tokens: checks.iter().map(|c| c.reference_tokens).max().unwrap_or(1),
            ..Default::default()
        };
        let policy = BatchPolicy {
            max_batch: args.batch,
            token_budget: usize::MAX,
        };
        let (batched, stats) = engine.generate_many(&prompts, &config, policy, &mut NoHook)?;
        let differing: Vec<&str> = checks
            .iter()
            .zip(&batched)
            .filter(|(c, b)| !b.tokens.starts_with(&c.tokens) && !c.tokens.starts_with(&b.tokens))
            .map(|(c, _)| c.name.as_str())
            .collect();
        batched_ok = differing.is_empty();
        println!(
            "batched (up to {} rows, {} batches): tokens equal to one-by-one runs in {}/{} cases{}",
            args.batch,
            stats.batches,
            checks.len() - differing.len(),
            checks.len(),
            if batched_ok {
                String::new()
            } else {
                format!("; differ: {}", differing.join(", "))
            }
        );
    }
    println!("verified in {:.1} s", started.elapsed().as_secs_f64());
    Ok(passed == checks.len() && batched_ok)
}

/// `<model>/fidelity.json` for a variant other than fp32 (None for fp32 or when the file is absent).
fn variant_reference(model: &Path, variant: &str) -> anyhow::Result<Option<Value>> {
    let path = model.join("fidelity.json");
    if variant == "fp32" || !path.is_file() {
        return Ok(None);
    }
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let value: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    Ok(Some(value))
}

/// Greedy tokens of a variant (EOS ignored, as `onnx-export fidelity` ran it) against the Python onnxruntime
/// loop's: (leading tokens equal, tokens expected).
fn variant_tokens(
    engine: &mut PixtralEngine,
    fidelity: &Value,
    name: &str,
    prompt: &EncodedPrompt,
) -> anyhow::Result<(usize, usize)> {
    let want = u64s(&fidelity["cases"][name], "variant_tokens")
        .with_context(|| format!("fidelity.json, case {name}"))?;
    let config = GenerationConfig {
        max_new_tokens: want.len().max(1),
        stop_on_eos: false,
        ..Default::default()
    };
    let got = generate_one(engine, prompt, &config)?;
    Ok((leading_equal(&got.tokens, &want), want.len()))
}

/// One prompt, alone in its batch.
fn generate_one(
    engine: &mut PixtralEngine,
    prompt: &EncodedPrompt,
    config: &GenerationConfig,
) -> anyhow::Result<Generation> {
    let (gens, _) = engine.generate_many(
        std::slice::from_ref(prompt),
        config,
        BatchPolicy::default(),
        &mut NoHook,
    )?;
    gens.into_iter()
        .next()
        .ok_or_else(|| anyhow!("the engine returned no generation"))
}

/// How many leading tokens agree.
fn leading_equal(got: &[u32], want: &[u64]) -> usize {
    got.iter()
        .zip(want)
        .take_while(|(a, b)| **a as u64 == **b)
        .count()
}
