//! `pixtract bench pipeline`: the whole job (documents in, Parquet out) against a Python reference pipeline doing
//! the same job on the same documents in the same run: pypdfium2 rendering, mistral-common preprocessing,
//! transformers `generate()` and pyarrow writing (onnx-export `pipeline-reference`).
//!
//! Both run in free-text mode (transcription, greedy, the same instruction and token limit): the reference has no
//! grammar-constrained decoding, so schema mode would not be the same job.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::bail;

use pixtract::pipeline::{Events, PipelineSpec, RunOptions, run_blocking};

const SUFFIXES: [&str; 7] = ["pdf", "jpg", "jpeg", "png", "tif", "tiff", "webp"];

/// What `pixtract bench pipeline` runs (the command line's flags, documented there).
#[derive(Debug, Clone)]
pub struct PipelineBench {
    pub source: PathBuf,
    pub spec: PathBuf,
    pub model: Option<PathBuf>,
    pub max_new_tokens: usize,
    pub python: PathBuf,
}

/// Runs both pipelines and prints their table.
pub fn run(args: PipelineBench) -> anyhow::Result<()> {
    if !args.source.is_dir() {
        bail!(
            "--source {}: not a folder (run `make demo` for out/demo/inputs, or point it at your documents)",
            args.source.display()
        );
    }
    let mut spec = PipelineSpec::load(&args.spec)?;
    spec.extract.schema = None;
    spec.model.max_new_tokens = args.max_new_tokens;
    if let Some(m) = &args.model {
        spec.model.dir = m.clone();
    }
    spec.source.uri = args.source.display().to_string();
    // The documents the reference picks (by suffix), so both sides see the same set.
    spec.source.include = SUFFIXES
        .iter()
        .flat_map(|s| [format!("*.{s}"), format!("*.{}", s.to_ascii_uppercase())])
        .collect();
    let scratch =
        std::env::temp_dir().join(format!("pixtract-bench-pipeline-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    spec.output.uri = scratch.join("pixtract").display().to_string();
    let max_side = spec.raster.max_side;
    let max_dpi = spec.raster.max_dpi;
    let model_dir = spec.model.dir.clone();
    let instruction = pixtract::extract::prompt::free_text_instruction();

    eprintln!(
        "pixtract bench pipeline: pixtract run (free text, {} new tokens) ...",
        args.max_new_tokens
    );
    let ours = run_blocking(
        spec.clone(),
        RunOptions {
            force: true,
            shard: None,
            events: Events::default(),
            ..RunOptions::default()
        },
    )?;
    eprintln!("pixtract bench pipeline: Python reference ...");
    let reference = python_reference(&args, &model_dir, &scratch, &instruction, max_side, max_dpi)?;
    let _ = std::fs::remove_dir_all(&scratch);

    let their_pages = reference["pages"].as_u64().unwrap_or(0) as usize;
    let their_seconds = reference["seconds"].as_f64().unwrap_or(f64::NAN);
    println!(
        "pipeline bench: {} ({} documents), model {}, free-text mode, up to {} new tokens per page, cpu",
        args.source.display(),
        ours.documents,
        model_dir.display(),
        args.max_new_tokens
    );
    println!(
        "{:<34} {:>6} {:>6} {:>10} {:>9} {:>9}",
        "implementation", "pages", "rows", "gen tokens", "seconds", "pages/s"
    );
    println!(
        "{:<34} {:>6} {:>6} {:>10} {:>9.2} {:>9.3}",
        "pixtract run",
        ours.pages,
        ours.rows,
        ours.generated_tokens,
        ours.seconds,
        ours.pages_per_second
    );
    println!(
        "{:<34} {:>6} {:>6} {:>10} {:>9.2} {:>9.3}",
        "python (pypdfium2+transformers)",
        their_pages,
        reference["rows"].as_u64().unwrap_or(0),
        reference["generated_tokens"].as_u64().unwrap_or(0),
        their_seconds,
        their_pages as f64 / their_seconds
    );
    println!(
        "pixtract / python pages per second: {:.2}x",
        ours.pages_per_second / (their_pages as f64 / their_seconds)
    );
    println!(
        "pixtract stages (busy s): {}",
        ours.stages
            .iter()
            .map(|b| format!("{} {:.2}", b.stage, b.busy_seconds))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "python stages (s): render {:.2}, preprocess {:.2}, generate {:.2}, write {:.2}",
        reference["render_s"].as_f64().unwrap_or(f64::NAN),
        reference["preprocess_s"].as_f64().unwrap_or(f64::NAN),
        reference["generate_s"].as_f64().unwrap_or(f64::NAN),
        reference["write_s"].as_f64().unwrap_or(f64::NAN)
    );
    if ours.pages != their_pages {
        eprintln!(
            "pixtract bench pipeline: note: the two sides saw different page counts ({} vs {their_pages})",
            ours.pages
        );
    }
    Ok(())
}

fn python_reference(
    args: &PipelineBench,
    model: &Path,
    scratch: &Path,
    instruction: &str,
    max_side: u32,
    max_dpi: Option<f32>,
) -> anyhow::Result<serde_json::Value> {
    let mut cmd = Command::new(&args.python);
    cmd.arg(super::EXPORTER)
        .arg("pipeline-reference")
        .arg("--source")
        .arg(&args.source)
        .arg("--model")
        .arg(model)
        .arg("--out")
        .arg(scratch.join("python"))
        .arg("--prompt")
        .arg(instruction)
        .arg("--max-new-tokens")
        .arg(args.max_new_tokens.to_string())
        .arg("--suffixes")
        .arg(SUFFIXES.map(|s| format!(".{s}")).join(","));
    if max_side > 0 {
        cmd.arg("--max-side").arg(max_side.to_string());
    }
    if let Some(dpi) = max_dpi {
        cmd.arg("--max-dpi").arg(dpi.to_string());
    }
    super::run_python_reference(&mut cmd)
}
