//! The engine against a model's reference cases, on any device (`pixtract verify` prints what this returns).
//!
//! The cases (`<model>/reference/<case>/case.json` + PNGs) were written by `onnx-export reference` from
//! transformers with mistral-common preprocessing. The checks are the parity test's: input ids identical, pixel
//! tensors within a tolerance, first-step top-k logits within a tolerance, greedy tokens identical, and the same
//! cases run as batches giving the tokens of one-by-one runs. The test suite runs them on the CPU; `pixtract
//! verify` runs them where the user's engine runs (`--device cuda`), so a GPU install is checked against the same
//! fixtures without a Rust toolchain.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::model::manifest::DecoderAttention;
use crate::model::{
    BatchPolicy, Batching, EncodedPrompt, Generation, GenerationConfig, ModelError, NoHook,
    PixtralEngine, Prompt, PromptPart,
};

/// Max abs difference on normalised pixel values (~N(0,1) scale). mistral-common's OpenCV cubic and pixtract's
/// differ by float rounding only.
pub const PIXEL_TOLERANCE: f32 = 1e-4;
/// Max abs difference on the reference's first-step top-k logits (fp32 graphs on the CPU).
pub const LOGIT_TOLERANCE: f32 = 1e-4;

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("cannot read {} (scripts/setup.sh writes models/tiny/reference)", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not valid JSON", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("reference image {} cannot be read", path.display())]
    Image {
        path: PathBuf,
        #[source]
        source: image::ImageError,
    },
    #[error("{what}: {reason}")]
    Malformed { what: String, reason: String },
    #[error("reference case {case}")]
    Case {
        case: String,
        #[source]
        source: Box<VerifyError>,
    },
    #[error("the engine failed")]
    Model(#[from] ModelError),
    #[error("the engine returned no generation for a one-prompt batch")]
    NoGeneration,
}

fn malformed(what: impl Into<String>, reason: impl Into<String>) -> VerifyError {
    VerifyError::Malformed {
        what: what.into(),
        reason: reason.into(),
    }
}

/// A reference case (`<dir>/case.json` with its PNGs) encoded for an engine, with the case's JSON (expected
/// ids, pixel samples, logits, tokens).
#[derive(Debug, Clone)]
pub struct ReferenceCase {
    pub name: String,
    pub dir: PathBuf,
    pub json: Value,
    pub prompt: EncodedPrompt,
}

impl ReferenceCase {
    pub fn load(engine: &PixtralEngine, dir: &Path) -> Result<Self, VerifyError> {
        let path = dir.join("case.json");
        let text = std::fs::read_to_string(&path).map_err(|source| VerifyError::Read {
            path: path.clone(),
            source,
        })?;
        let json: Value =
            serde_json::from_str(&text).map_err(|source| VerifyError::Json { path, source })?;
        let mut parts = Vec::new();
        for part in json["content"].as_array().into_iter().flatten() {
            match part["type"].as_str() {
                Some("image") => {
                    let file = dir.join(part["file"].as_str().unwrap_or_default());
                    let img = image::open(&file).map_err(|source| VerifyError::Image {
                        path: file.clone(),
                        source,
                    })?;
                    parts.push(PromptPart::Image(engine.preprocessor.prepare(&img)?));
                }
                _ => parts.push(PromptPart::Text(
                    part["text"].as_str().unwrap_or_default().to_string(),
                )),
            }
        }
        let prompt = engine.tokenizer.encode(Prompt {
            system: json["system"].as_str().map(str::to_string),
            parts,
        })?;
        let name = json["name"].as_str().map_or_else(
            || {
                dir.file_name()
                    .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
            },
            str::to_string,
        );
        Ok(Self {
            name,
            dir: dir.to_path_buf(),
            json,
            prompt,
        })
    }
}

/// Where a model's reference cases are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReferenceDir {
    pub path: PathBuf,
    /// The model has none of its own: these are the tiny fp32 model's, which the other tiny exports share
    /// since they hold the same seeded weights.
    pub borrowed: bool,
}

impl ReferenceDir {
    /// What to tell the user when the cases are borrowed from another model.
    pub fn note(&self, model: &Path) -> Option<String> {
        self.borrowed.then(|| {
            format!(
                "{} has no reference/ of its own; using {} (--reference-dir to choose)",
                model.display(),
                self.path.display()
            )
        })
    }
}

/// `chosen`, else `<model>/reference`, else the tiny model's.
pub fn reference_dir_for(model: &Path, chosen: Option<&Path>) -> ReferenceDir {
    if let Some(dir) = chosen {
        return ReferenceDir {
            path: dir.to_path_buf(),
            borrowed: false,
        };
    }
    let own = model.join("reference");
    if own.is_dir() {
        return ReferenceDir {
            path: own,
            borrowed: false,
        };
    }
    ReferenceDir {
        path: PathBuf::from("models/tiny/reference"),
        borrowed: true,
    }
}

/// The reference case folders listed by `<reference_dir>/cases.json`.
pub fn reference_case_dirs(reference_dir: &Path) -> Result<Vec<PathBuf>, VerifyError> {
    let index_path = reference_dir.join("cases.json");
    let text = std::fs::read_to_string(&index_path).map_err(|source| VerifyError::Read {
        path: index_path.clone(),
        source,
    })?;
    let index: Value = serde_json::from_str(&text).map_err(|source| VerifyError::Json {
        path: index_path.clone(),
        source,
    })?;
    let what = index_path.display().to_string();
    let names = index["cases"]
        .as_array()
        .ok_or_else(|| malformed(&what, "no \"cases\" list"))?;
    names
        .iter()
        .map(|n| {
            n.as_str()
                .map(|s| reference_dir.join(s))
                .ok_or_else(|| malformed(&what, "case names must be strings"))
        })
        .collect()
}

fn u64s(case: &Value, key: &str) -> Result<Vec<u64>, VerifyError> {
    case[key]
        .as_array()
        .ok_or_else(|| malformed(format!("{key:?}"), "missing or not a list"))?
        .iter()
        .map(|v| {
            v.as_u64()
                .ok_or_else(|| malformed(format!("{key:?}"), "holds a non-integer"))
        })
        .collect()
}

fn f64_of(v: &Value, what: &str) -> Result<f64, VerifyError> {
    v.as_f64().ok_or_else(|| malformed(what, "not a number"))
}

/// How a case's prompt encoding compares with the reference's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EncodingCheck {
    pub ids_equal: bool,
    /// Largest |pixtract - reference| over the reference's sampled pixels.
    pub pixel_diff: f32,
    /// Largest mean difference of the pixel sums and absolute sums, over all images of the case.
    pub pixel_sum_diff: f64,
}

/// Compares a reference case's prompt (ids and pixel tensors) with what pixtract encoded.
pub fn check_encoding(case: &Value, prompt: &EncodedPrompt) -> Result<EncodingCheck, VerifyError> {
    let want_ids = u64s(case, "input_ids")?;
    let ids_equal = prompt.ids.len() == want_ids.len()
        && prompt
            .ids
            .iter()
            .zip(&want_ids)
            .all(|(&a, &b)| a as u64 == b);
    let metas = case["images"]
        .as_array()
        .ok_or_else(|| malformed("\"images\"", "missing or not a list"))?;
    if metas.len() != prompt.images.len() {
        return Err(malformed(
            "images",
            format!(
                "the case has {}, pixtract encoded {}",
                metas.len(),
                prompt.images.len()
            ),
        ));
    }
    let (mut worst, mut worst_sum) = (0f32, 0f64);
    for (img, meta) in prompt.images.iter().zip(metas) {
        let shape = u64s(meta, "tensor_shape")?;
        let (h, w) = (img.height(), img.width());
        if shape != [3, h as u64, w as u64] {
            return Err(malformed(
                "pixel tensor",
                format!("pixtract's is 3x{h}x{w}, the reference's {shape:?}"),
            ));
        }
        for s in meta["samples"].as_array().into_iter().flatten() {
            let idx: Vec<usize> = (0..3)
                .map(|i| s[i].as_u64().map(|v| v as usize))
                .collect::<Option<_>>()
                .ok_or_else(|| malformed(format!("pixel sample {s}"), "malformed"))?;
            let (c, y, x) = (idx[0], idx[1], idx[2]);
            let got = *img
                .pixels
                .get(c * h * w + y * w + x)
                .ok_or_else(|| malformed(format!("pixel sample {s}"), "outside the tensor"))?;
            worst = nan_max(
                worst,
                (got - f64_of(&s[3], "pixel sample value")? as f32).abs(),
            );
        }
        let n = img.pixels.len().max(1) as f64;
        let sum: f64 = img.pixels.iter().map(|&v| v as f64).sum();
        let abs: f64 = img.pixels.iter().map(|&v| v.abs() as f64).sum();
        for diff in [
            (sum - f64_of(&meta["sum"], "pixel sum")?).abs() / n,
            (abs - f64_of(&meta["abs_sum"], "pixel abs_sum")?).abs() / n,
        ] {
            worst_sum = if diff.is_nan() {
                f64::INFINITY
            } else {
                worst_sum.max(diff)
            };
        }
    }
    Ok(EncodingCheck {
        ids_equal,
        pixel_diff: worst,
        pixel_sum_diff: worst_sum,
    })
}

/// The larger of two differences, where NaN (a broken output) counts as infinitely far: `f32::max` would
/// ignore it and let a NaN pass any tolerance.
fn nan_max(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::INFINITY
    } else {
        a.max(b)
    }
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

    pub fn encoding_passes(&self) -> bool {
        self.ids_equal
            && self.pixel_diff <= PIXEL_TOLERANCE
            && self.pixel_sum_diff <= PIXEL_TOLERANCE as f64
    }

    pub fn passes(&self, logit_tolerance: f32) -> bool {
        self.encoding_passes() && self.logit_diff <= logit_tolerance && self.tokens_equal()
    }
}

/// Runs one case greedily for the reference's number of tokens and compares everything.
pub fn check_case(
    engine: &mut PixtralEngine,
    case: &ReferenceCase,
) -> Result<CaseCheck, VerifyError> {
    let json = &case.json;
    let encoding = check_encoding(json, &case.prompt)?;
    let want_tokens = u64s(json, "greedy_tokens")?;
    let config = GenerationConfig {
        max_new_tokens: json["max_new_tokens"]
            .as_u64()
            .map_or(want_tokens.len(), |n| n as usize),
        keep_first_logits: true,
        ..Default::default()
    };
    let g = generate_one(engine, &case.prompt, &config)?;
    let first = g
        .first_logits
        .as_ref()
        .ok_or_else(|| malformed("engine", "kept no first-step logits"))?;
    let top = &json["first_step_top_k"];
    let mut logit_diff = 0f32;
    for (id, want) in u64s(top, "ids")?.iter().zip(
        top["logits"]
            .as_array()
            .ok_or_else(|| malformed("first_step_top_k", "has no logits"))?,
    ) {
        let got = *first
            .get(*id as usize)
            .ok_or_else(|| malformed(format!("token id {id}"), "outside the vocabulary"))?;
        logit_diff = nan_max(
            logit_diff,
            (got - f64_of(want, "reference logit")? as f32).abs(),
        );
    }
    let same_tokens = leading_equal(&g.tokens, &want_tokens);
    Ok(CaseCheck {
        name: case.name.clone(),
        ids_equal: encoding.ids_equal,
        pixel_diff: encoding.pixel_diff,
        pixel_sum_diff: encoding.pixel_sum_diff,
        logit_diff,
        same_tokens,
        reference_tokens: want_tokens.len(),
        tokens: g.tokens,
    })
}

/// Settings of a verification run.
#[derive(Debug, Clone, Copy)]
pub struct VerifyOptions {
    /// Largest first-step logit difference accepted.
    pub logit_tolerance: f32,
    /// Batch size of the batched re-run (its tokens must equal the one-by-one runs'); 0 or 1 skips it.
    pub batch: usize,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        Self {
            logit_tolerance: LOGIT_TOLERANCE,
            batch: 4,
        }
    }
}

/// One case's outcome.
#[derive(Debug, Clone)]
pub struct CaseOutcome {
    pub check: CaseCheck,
    /// For an fp16 or quantized variant: its greedy tokens against the Python onnxruntime loop's on the same
    /// graphs (leading tokens equal, tokens expected), which `onnx-export fidelity` recorded.
    pub variant_tokens: Option<(usize, usize)>,
    pub passed: bool,
}

/// The batched re-run of every case.
#[derive(Debug, Clone)]
pub struct BatchedOutcome {
    /// How the rows were batched (`continuous` or `static`).
    pub batching: &'static str,
    pub max_rows: usize,
    pub batches: usize,
    pub cases: usize,
    /// Cases whose batched tokens differ from their one-by-one tokens.
    pub differing: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct VerifyReport {
    pub cases: Vec<CaseOutcome>,
    /// The model is a variant checked against its own onnxruntime tokens (logits not held to fp32 tolerance).
    pub against_variant: bool,
    /// One re-run per batching the model supports (continuous and static for GroupQueryAttention decoders).
    pub batched: Vec<BatchedOutcome>,
    pub elapsed: Duration,
}

impl VerifyReport {
    pub fn passed(&self) -> usize {
        self.cases.iter().filter(|c| c.passed).count()
    }

    pub fn ok(&self) -> bool {
        self.passed() == self.cases.len() && self.batched.iter().all(|b| b.differing.is_empty())
    }

    /// The largest value of `f` over the cases.
    pub fn worst(&self, f: fn(&CaseCheck) -> f64) -> f64 {
        self.cases.iter().map(|c| f(&c.check)).fold(0f64, f64::max)
    }
}

/// Checks every reference case under `reference_dir` on `engine` (model files in `model_dir`), calling
/// `on_case` as each finishes, then re-runs them as batches.
pub fn verify(
    engine: &mut PixtralEngine,
    model_dir: &Path,
    reference_dir: &Path,
    opts: VerifyOptions,
    mut on_case: impl FnMut(&CaseOutcome),
) -> Result<VerifyReport, VerifyError> {
    // A quantized or fp16 variant is not expected to give the fp32 reference's tokens: its own reference is the
    // Python onnxruntime loop's greedy tokens on the same graphs, which `onnx-export fidelity` keeps.
    let variant_reference = variant_reference(model_dir, engine.model.manifest.variant())?;
    let started = Instant::now();
    let mut cases = Vec::new();
    let mut prompts = Vec::new();
    for dir in reference_case_dirs(reference_dir)? {
        let case = ReferenceCase::load(engine, &dir)?;
        let in_case = |source: VerifyError| VerifyError::Case {
            case: format!("{} ({})", case.name, dir.display()),
            source: Box::new(source),
        };
        let check = check_case(engine, &case).map_err(in_case)?;
        let (variant_tokens, passed) = match &variant_reference {
            None => (None, check.passes(opts.logit_tolerance)),
            Some(fidelity) => {
                let (same, want) =
                    variant_tokens(engine, fidelity, &case.name, &case.prompt).map_err(in_case)?;
                (
                    Some((same, want)),
                    check.ids_equal && check.pixel_diff <= PIXEL_TOLERANCE && same == want,
                )
            }
        };
        let outcome = CaseOutcome {
            check,
            variant_tokens,
            passed,
        };
        on_case(&outcome);
        cases.push(outcome);
        prompts.push(case.prompt);
    }
    let mut batched = Vec::new();
    if opts.batch > 1 && !prompts.is_empty() {
        let batchings: &[Batching] = match engine.attention() {
            DecoderAttention::Gqa => &[Batching::Continuous, Batching::Static],
            DecoderAttention::Eager => &[Batching::Static],
        };
        for &batching in batchings {
            batched.push(batched_rerun(
                engine, &cases, &prompts, opts.batch, batching,
            )?);
        }
    }
    Ok(VerifyReport {
        cases,
        against_variant: variant_reference.is_some(),
        batched,
        elapsed: started.elapsed(),
    })
}

/// The cases again, `max_rows` at a time: each row's tokens must equal its one-by-one run's.
fn batched_rerun(
    engine: &mut PixtralEngine,
    cases: &[CaseOutcome],
    prompts: &[EncodedPrompt],
    max_rows: usize,
    batching: Batching,
) -> Result<BatchedOutcome, VerifyError> {
    let config = GenerationConfig {
        max_new_tokens: cases
            .iter()
            .map(|c| c.check.reference_tokens)
            .max()
            .unwrap_or(1),
        ..Default::default()
    };
    let policy = BatchPolicy {
        max_batch: max_rows,
        token_budget: usize::MAX,
        batching,
        ..BatchPolicy::default()
    };
    let (batched, stats) = engine.generate_many(prompts, &config, policy, &mut NoHook)?;
    let differing = cases
        .iter()
        .zip(&batched)
        .filter(|(c, b)| {
            !b.tokens.starts_with(&c.check.tokens) && !c.check.tokens.starts_with(&b.tokens)
        })
        .map(|(c, _)| c.check.name.clone())
        .collect();
    Ok(BatchedOutcome {
        batching: batching.name(),
        max_rows,
        batches: stats.batches,
        cases: cases.len(),
        differing,
    })
}

/// `<model>/fidelity.json` for a variant other than fp32 (None for fp32 or when the file is absent).
fn variant_reference(model: &Path, variant: &str) -> Result<Option<Value>, VerifyError> {
    let path = model.join("fidelity.json");
    if variant == "fp32" || !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|source| VerifyError::Read {
        path: path.clone(),
        source,
    })?;
    let value: Value =
        serde_json::from_str(&text).map_err(|source| VerifyError::Json { path, source })?;
    Ok(Some(value))
}

/// Greedy tokens of a variant (EOS ignored, as `onnx-export fidelity` ran it) against the Python onnxruntime
/// loop's: (leading tokens equal, tokens expected).
fn variant_tokens(
    engine: &mut PixtralEngine,
    fidelity: &Value,
    name: &str,
    prompt: &EncodedPrompt,
) -> Result<(usize, usize), VerifyError> {
    let want = u64s(&fidelity["cases"][name], "variant_tokens")?;
    let config = GenerationConfig {
        max_new_tokens: want.len().max(1),
        stop_on_eos: false,
        ..Default::default()
    };
    let got = generate_one(engine, prompt, &config)?;
    Ok((leading_equal(&got.tokens, &want), want.len()))
}

/// One prompt, alone in its batch.
pub fn generate_one(
    engine: &mut PixtralEngine,
    prompt: &EncodedPrompt,
    config: &GenerationConfig,
) -> Result<Generation, VerifyError> {
    let (gens, _) = engine.generate_many(
        std::slice::from_ref(prompt),
        config,
        BatchPolicy::default(),
        &mut NoHook,
    )?;
    gens.into_iter().next().ok_or(VerifyError::NoGeneration)
}

/// How many leading tokens agree.
fn leading_equal(got: &[u32], want: &[u64]) -> usize {
    got.iter()
        .zip(want)
        .take_while(|(a, b)| **a as u64 == **b)
        .count()
}
