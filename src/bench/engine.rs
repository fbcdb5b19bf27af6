//! `pixtract bench engine`: the engine against its references in the same run, as ratios.
//!
//! Same prompts and images (the model's reference cases), same number of new tokens (EOS ignored), same machine
//! and run: pixtract vs (a) a plain Python loop over the same three ONNX graphs with onnxruntime and
//! (b) transformers `generate()` (both in `onnx-export/pixtract_export/bench.py`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::bail;

use pixtract::model::runtime::Threads;
use pixtract::model::{
    Device, EncodedPrompt, EngineOptions, GenerationConfig, NoHook, OrtRuntime, PixtralEngine,
};
use pixtract::verify::{self, ReferenceCase};

/// What `pixtract bench engine` measures (the command line's flags, documented there).
#[derive(Debug, Clone)]
pub struct EngineBench {
    pub model: PathBuf,
    pub reference_dir: Option<PathBuf>,
    /// Reference case names used as prompts.
    pub cases: Vec<String>,
    pub new_tokens: usize,
    pub batches: Vec<usize>,
    pub repeat: usize,
    pub python: PathBuf,
    pub python_encoded: Option<PathBuf>,
    pub no_reference: bool,
    pub skip_transformers: bool,
    pub threads: usize,
    pub device: Device,
    pub spin: bool,
    pub prefill_chunk: Option<usize>,
}

/// The reference cases `bench engine` uses as prompts by default: images of every shape, text only, two images.
pub const DEFAULT_CASES: &str = "grayscale,rgba,system_prompt,multilingual_image,tall_receipt,text_only,multilingual,two_images";

#[derive(Debug, Clone, Copy, Default)]
struct Phase {
    first_token_s: f64,
    decode_s: f64,
    first_token_tok_s: f64,
    decode_tok_s: f64,
}

impl Phase {
    fn total_s(&self) -> f64 {
        self.first_token_s + self.decode_s
    }
}

fn load_prompts(
    engine: &PixtralEngine,
    reference_dir: &Path,
    cases: &[String],
) -> anyhow::Result<Vec<EncodedPrompt>> {
    let mut out = Vec::new();
    for name in cases {
        out.push(ReferenceCase::load(engine, &reference_dir.join(name))?.prompt);
    }
    if out.is_empty() {
        bail!("no cases given");
    }
    Ok(out)
}

/// Runs the benchmark and prints its table.
pub fn run(args: EngineBench) -> anyhow::Result<()> {
    let pool = Threads {
        intra_op: args.threads,
        spin: args.spin,
    };
    let rt = OrtRuntime::load_from_env_with_pool(pool)?;
    let opts = EngineOptions {
        device: args.device,
    };
    let mut engine = PixtralEngine::load(&rt, &args.model, opts)?;
    let reference = verify::reference_dir_for(&args.model, args.reference_dir.as_deref());
    if let Some(note) = reference.note(&args.model) {
        eprintln!("{note}");
    }
    let reference_dir = reference.path;
    let prompts = load_prompts(&engine, &reference_dir, &args.cases)?;
    let prompt_tokens: usize = prompts.iter().map(|p| p.ids.len()).sum();
    let gen_tokens = prompts.len() * args.new_tokens.saturating_sub(1);
    let config = GenerationConfig {
        max_new_tokens: args.new_tokens,
        stop_on_eos: false,
        // As the references: tokens only (the pipeline's extraction also asks for their probabilities).
        token_probs: false,
        prefill_chunk: args.prefill_chunk,
        ..Default::default()
    };
    // Warm-up: first runs allocate arenas and pick kernels.
    engine.generate_rows(&prompts, &[0], &config, &mut NoHook)?;
    // Rounds alternate pixtract and the Python references (one pass each per round), and each side keeps its
    // fastest round: on a shared machine speed drifts by 10-20% over a minute, and measuring one side entirely
    // before the other turned that drift into the ratio.
    let rounds = args.repeat.max(1);
    // The least time a decode step can take anywhere: reading the decoder's weights once at 1 TB/s (more than any
    // CPU's memory bandwidth). A reference decode faster than that per step is a broken measurement.
    let floor_s = decoder_bytes(&args.model) as f64 / 1e12;
    // ours[round][i]: pixtract's pass at batch size args.batches[i]; theirs[round]: the Python bench right after it.
    let mut ours: Vec<Vec<Phase>> = Vec::with_capacity(rounds);
    let mut theirs: Vec<RoundResult> = Vec::new();
    for _ in 0..rounds {
        let mut phases = Vec::with_capacity(args.batches.len());
        for &b in &args.batches {
            phases.push(measure(
                &mut engine,
                &prompts,
                b,
                &config,
                prompt_tokens,
                gen_tokens,
            )?);
        }
        ours.push(phases);
        if !args.no_reference {
            let round = python_reference(&args, &reference_dir)?;
            check_reference(&round, floor_s, theirs.len() + 1)?;
            theirs.push(round);
        }
    }
    let fastest: Vec<(usize, Phase)> = args
        .batches
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            let best = ours
                .iter()
                .map(|round| round[i])
                .min_by(|x, y| x.total_s().total_cmp(&y.total_s()));
            (b, best.unwrap_or_default())
        })
        .collect();
    let reference = fastest_reference(&theirs, &args.batches, prompt_tokens, gen_tokens);
    println!(
        "engine bench: {} prompts ({} prompt tokens, {} images), {} new tokens each (EOS ignored), model {} ({}), {}",
        prompts.len(),
        prompt_tokens,
        prompts.iter().map(|p| p.images.len()).sum::<usize>(),
        args.new_tokens,
        engine.model.manifest.model_id,
        engine.model.manifest.describe_weights(),
        engine.device()
    );
    println!(
        "{:<6} {:<22} {:>16} {:>16} {:>12} {:>12}",
        "batch", "implementation", "vision+prefill/s", "decode tok/s", "x prefill", "x decode"
    );
    for (b, p) in &fastest {
        println!(
            "{:<6} {:<22} {:>16.0} {:>16.1} {:>12} {:>12}",
            b, "pixtract (Rust)", p.first_token_tok_s, p.decode_tok_s, "", ""
        );
        if let Some(r) = &reference {
            for (key, label) in [
                ("ort_python", "python onnxruntime loop"),
                ("transformers", "transformers generate"),
            ] {
                if let Some(entry) = r[key].get(b.to_string()) {
                    let first = entry["first_token_tok_s"].as_f64().unwrap_or(f64::NAN);
                    let decode = entry["decode_tok_s"].as_f64().unwrap_or(f64::NAN);
                    println!(
                        "{:<6} {:<22} {:>16.0} {:>16.1} {:>11.2}x {:>11.2}x",
                        b,
                        label,
                        first,
                        decode,
                        p.first_token_tok_s / first,
                        p.decode_tok_s / decode
                    );
                }
            }
        }
    }
    if let (Some((_, one)), Some((bmax, many))) = (fastest.first(), fastest.last())
        && fastest.len() > 1
    {
        println!(
            "pixtract decode throughput, batch {bmax} vs batch {}: {:.2}x",
            fastest[0].0,
            many.decode_tok_s / one.decode_tok_s
        );
    }
    if rounds > 1 && !args.no_reference {
        // Each round's pixtract pass against the Python loop's pass right after it: how much of a ratio is drift.
        for (i, &b) in args.batches.iter().enumerate() {
            let ratios: Vec<String> = ours
                .iter()
                .zip(&theirs)
                .filter_map(|(round, r)| {
                    let decode = r["ort_python"].get(b.to_string())?["decode_tok_s"].as_f64()?;
                    Some(format!("{:.2}x", round[i].decode_tok_s / decode))
                })
                .collect();
            println!(
                "batch {b}: decode vs the python onnxruntime loop, round by round: {}",
                ratios.join(" ")
            );
        }
    }
    println!(
        "(x = pixtract's tokens/s divided by the reference's, same prompts; {rounds} round(s) alternating pixtract and the references, fastest round of each; vision+prefill/s = prompt tokens / (vision + prefill time))"
    );
    Ok(())
}

/// One pass of pixtract over all prompts in batches of `b` (in the given order, as the Python side forms them).
fn measure(
    engine: &mut PixtralEngine,
    prompts: &[EncodedPrompt],
    b: usize,
    config: &GenerationConfig,
    prompt_tokens: usize,
    gen_tokens: usize,
) -> anyhow::Result<Phase> {
    let (mut first, mut decode) = (0.0, 0.0);
    for chunk in prompts.chunks(b.max(1)) {
        let rows: Vec<usize> = (0..chunk.len()).collect();
        let (_, s) = engine.generate_rows(chunk, &rows, config, &mut NoHook)?;
        first += (s.vision + s.prefill).as_secs_f64();
        decode += s.decode.as_secs_f64();
    }
    Ok(Phase {
        first_token_s: first,
        decode_s: decode,
        first_token_tok_s: prompt_tokens as f64 / first,
        decode_tok_s: gen_tokens as f64 / decode,
    })
}

/// Bytes of the decoder graph and its external data (`decoder_model_merged.onnx*`).
fn decoder_bytes(model: &Path) -> u64 {
    let Ok(dir) = pixtract::model::ModelDir::open(model) else {
        return 0;
    };
    let graph = dir.path_of(&dir.manifest.graphs.decoder.file);
    let stem = graph
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    std::fs::read_dir(graph.parent().unwrap_or(model))
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(&stem))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Fails the round when a reference's figures are outside what a machine can do: a phase that took no time, or a
/// decode faster per step than reading the decoder once (`floor_s`). Such a figure is a broken measurement (the
/// 2026-12-07 run printed transformers' decode at 248,000,000,000 tok/s), never a result to print as a ratio.
fn check_reference(round: &RoundResult, floor_s: f64, index: usize) -> anyhow::Result<()> {
    for key in ["ort_python", "transformers"] {
        let Some(batches) = round[key].as_object() else {
            continue;
        };
        for (batch, e) in batches {
            let first =
                e["vision_s"].as_f64().unwrap_or(0.0) + e["prefill_s"].as_f64().unwrap_or(0.0);
            let first = e["vision_prefill_s"].as_f64().unwrap_or(first);
            let decode = e["decode_s"].as_f64().unwrap_or(0.0);
            let steps = e["decode_steps"].as_f64().unwrap_or(1.0).max(1.0);
            anyhow::ensure!(
                first > 0.0 && decode > 0.0,
                "round {index}: the reference {key} at batch {batch} reports vision+prefill {first} s and decode \
                 {decode} s: a phase that took no time is a broken measurement"
            );
            anyhow::ensure!(
                decode >= floor_s * steps,
                "round {index}: the reference {key} at batch {batch} decoded {steps} steps in {decode:.6} s, under \
                 the {:.6} s that reading the decoder's weights once per step takes at 1 TB/s: a broken measurement",
                floor_s * steps
            );
        }
    }
    Ok(())
}

/// One round's output of the Python bench (`{"ort_python": {"<batch>": {...}}, "transformers": {...}}`).
type RoundResult = serde_json::Value;

/// Per implementation and batch size, the entry of the round with the least total time.
fn fastest_reference(
    rounds: &[RoundResult],
    batches: &[usize],
    prompt_tokens: usize,
    gen_tokens: usize,
) -> Option<serde_json::Value> {
    if rounds.is_empty() {
        return None;
    }
    let total = |e: &serde_json::Value| -> f64 {
        let first = e["first_token_tok_s"].as_f64().unwrap_or(0.0);
        let decode = e["decode_tok_s"].as_f64().unwrap_or(0.0);
        prompt_tokens as f64 / first + gen_tokens as f64 / decode
    };
    let mut out = serde_json::json!({});
    for key in ["ort_python", "transformers"] {
        let mut per_batch = serde_json::Map::new();
        for b in batches {
            let best = rounds
                .iter()
                .filter_map(|r| r[key].get(b.to_string()))
                .min_by(|x, y| total(x).total_cmp(&total(y)));
            if let Some(entry) = best {
                per_batch.insert(b.to_string(), entry.clone());
            }
        }
        out[key] = serde_json::Value::Object(per_batch);
    }
    Some(out)
}

fn python_reference(args: &EngineBench, reference_dir: &Path) -> anyhow::Result<serde_json::Value> {
    let mut cmd = Command::new(&args.python);
    cmd.arg(super::EXPORTER)
        .arg("bench")
        .arg("--model")
        .arg(&args.model)
        .arg("--cases-from")
        .arg(reference_dir)
        .arg("--cases")
        .arg(args.cases.join(","))
        .arg("--new-tokens")
        .arg(args.new_tokens.to_string())
        .arg("--repeat")
        .arg("1");
    for b in &args.batches {
        cmd.arg("--batch").arg(b.to_string());
    }
    cmd.arg("--spin")
        .arg(if args.spin { "1" } else { "0" })
        .arg("--device")
        .arg(args.device.to_string());
    if let Some(encoded) = &args.python_encoded {
        cmd.arg("--encoded").arg(encoded);
    }
    if args.skip_transformers || args.device != Device::Cpu {
        cmd.arg("--skip-transformers");
    }
    super::run_python_reference(&mut cmd)
}

#[cfg(test)]
mod reference_checks {
    use super::*;

    #[test]
    fn a_reference_decode_faster_than_reading_the_weights_fails_the_round() {
        let round = |decode: f64| {
            serde_json::json!({
                "ort_python": {"8": {"vision_s": 0.1, "prefill_s": 0.2, "decode_s": 0.5, "decode_steps": 30}},
                "transformers": {"8": {"vision_prefill_s": 0.3, "decode_s": decode, "decode_steps": 30}},
            })
        };
        // 35 MB of decoder: 35 us per step at 1 TB/s, 1.05 ms for 30 steps.
        let floor = 35e6 / 1e12;
        assert!(check_reference(&round(0.5), floor, 1).is_ok());
        // The 2026-12-07 figure: a decode time clamped to 1e-9 s.
        let err = check_reference(&round(1e-9), floor, 2)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("round 2") && err.contains("transformers"),
            "{err}"
        );
        let err = check_reference(&round(0.0), floor, 3)
            .unwrap_err()
            .to_string();
        assert!(err.contains("took no time"), "{err}");
    }
}
