//! `pixtract verify`: the engine against a model's reference cases, one line per case and a summary.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use pixtract::model::runtime::Threads;
use pixtract::model::{Device, EngineOptions, OrtRuntime, PixtralEngine};
use pixtract::verify::{
    self, CaseOutcome, LOGIT_TOLERANCE, PIXEL_TOLERANCE, VerifyOptions, VerifyReport,
};

#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// Model directory written by onnx-export.
    #[arg(long, value_name = "DIR", default_value = "models/tiny")]
    model: PathBuf,
    /// Folder holding the reference cases (default: <model>/reference, else models/tiny/reference: the tiny
    /// model's other exports, e.g. models/tiny-gqa, share its weights and so its reference). Quantized variants
    /// have none of their own: point this at the fp32 model's and expect token differences.
    #[arg(long, value_name = "DIR")]
    reference_dir: Option<PathBuf>,
    /// cpu, cuda or cuda:N. CUDA that cannot register is an error, never a silent CPU run.
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// Largest first-step logit difference accepted.
    #[arg(long, default_value_t = LOGIT_TOLERANCE)]
    logit_tolerance: f32,
    /// Batch size of the batched re-run (its tokens must equal the one-by-one runs'); 0 skips it.
    #[arg(long, default_value_t = 4)]
    batch: usize,
}

/// Exit code 0 when every case passes, 2 when some differ, 1 when it could not run.
pub fn verify(args: VerifyArgs) -> ExitCode {
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(2),
        Err(e) => {
            eprintln!(
                "pixtract verify: error: {}",
                pixtract::error::redact(&format!("{e:#}"))
            );
            ExitCode::FAILURE
        }
    }
}

fn run(args: &VerifyArgs) -> anyhow::Result<bool> {
    let rt = OrtRuntime::load_from_env_with_pool(Threads::default())?;
    let opts = EngineOptions {
        device: args.device,
    };
    let mut engine = PixtralEngine::load(&rt, &args.model, opts)
        .with_context(|| format!("loading model {}", args.model.display()))?;
    let reference = verify::reference_dir_for(&args.model, args.reference_dir.as_deref());
    if let Some(note) = reference.note(&args.model) {
        eprintln!("{note}");
    }
    let opts = VerifyOptions {
        logit_tolerance: args.logit_tolerance,
        batch: args.batch,
    };
    let report = verify::verify(&mut engine, &args.model, &reference.path, opts, print_case)?;
    print_summary(&report, &engine, args.logit_tolerance);
    Ok(report.ok())
}

fn print_case(outcome: &CaseOutcome) {
    let check = &outcome.check;
    let mut line = format!(
        "{:<20} ids {} | pixels max {:.1e} | first-step logits max {:.1e} | tokens {}/{} of the fp32 reference",
        check.name,
        if check.ids_equal { "equal" } else { "DIFFER" },
        check.pixel_diff,
        check.logit_diff,
        check.same_tokens,
        check.reference_tokens,
    );
    if let Some((same, want)) = outcome.variant_tokens {
        line.push_str(&format!(
            " | tokens {same}/{want} of onnxruntime (python) on these graphs"
        ));
    }
    if !outcome.passed {
        line.push_str("  FAIL");
    }
    println!("{line}");
}

fn print_summary(report: &VerifyReport, engine: &PixtralEngine, logit_tolerance: f32) {
    let n = report.cases.len();
    println!(
        "parity on {} ({}, {}): {}/{n} cases pass{}; largest first-step logit diff {:.2e} (tolerance {:.0e}), \
         largest pixel diff {:.2e} (tolerance {:.0e}), greedy tokens identical to the fp32 reference in {}/{n}",
        engine.device(),
        engine.model.manifest.model_id,
        engine.model.manifest.variant(),
        report.passed(),
        if report.against_variant {
            " (against the variant's own onnxruntime tokens in fidelity.json; logits are not held to the fp32 tolerance)"
        } else {
            ""
        },
        report.worst(|c| c.logit_diff as f64),
        logit_tolerance,
        report.worst(|c| c.pixel_diff as f64),
        PIXEL_TOLERANCE,
        report
            .cases
            .iter()
            .filter(|c| c.check.tokens_equal())
            .count(),
    );
    for b in &report.batched {
        println!(
            "batched, {} (up to {} rows, {} batches): tokens equal to one-by-one runs in {}/{} cases{}",
            b.batching,
            b.max_rows,
            b.batches,
            b.cases - b.differing.len(),
            b.cases,
            if b.differing.is_empty() {
                String::new()
            } else {
                format!("; differ: {}", b.differing.join(", "))
            }
        );
    }
    println!("verified in {:.1} s", report.elapsed.as_secs_f64());
}
