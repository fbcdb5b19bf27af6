//! Benchmarks, each against its named reference in the same run, reported as ratios: PDF rendering against
//! poppler (`raster`), the engine against a Python onnxruntime loop and transformers (`engine`), the whole job
//! against a Python pipeline (`pipeline`), continuous batching against static batching (`batching`).

pub mod batching;
pub mod engine;
pub mod grammar;
pub mod pipeline;
pub mod raster;
pub mod state;

use std::process::Command;

use anyhow::{Context, bail};

/// The exporter's command line, whose subcommands hold the Python references (run from the checkout).
const EXPORTER: &str = "onnx-export/export.py";

/// Runs a Python reference (an exporter subcommand) and parses the JSON object it prints last. A failure
/// carries the reference's last stderr line (its error), not a Debug dump.
fn run_python_reference(cmd: &mut Command) -> anyhow::Result<serde_json::Value> {
    let out = cmd.output().with_context(|| {
        format!(
            "running {} (run from the checkout, after scripts/setup.sh)",
            cmd.get_program().to_string_lossy()
        )
    })?;
    if !out.status.success() {
        bail!(
            "Python reference failed: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or("");
    serde_json::from_str(line).with_context(|| format!("reference printed {line:?}"))
}
