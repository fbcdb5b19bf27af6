//! The `pixtract` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use pixtract::doctor::{self, DoctorOptions};
use pixtract::model::Device;
use pixtract::native::SearchPaths;

/// Turn piles of receipts and invoices into tables: documents from S3 or local storage are rasterized, read by
/// the Pixtral vision-language model through ONNX Runtime, and written as schema-typed Parquet.
///
/// Native libraries (libonnxruntime, libpdfium) come from the project's virtualenv (`scripts/setup.sh`), or from
/// ORT_DYLIB_PATH / PDFIUM_DYLIB_PATH. Start with `pixtract doctor`.
#[derive(Debug, Parser)]
#[command(name = "pixtract", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check libraries, GPU support and model directories; exits 1 and says how to fix what is missing.
    ///
    /// Examples:
    ///   pixtract doctor                          # every models/*/ under the current directory, on cpu
    ///   pixtract doctor --model models/pixtral-12b-fp16 --device cuda --verify-hashes
    Doctor {
        /// Model directory (holding pixtract-model.json) to check; repeatable. Default: every models/*/.
        #[arg(long = "model", value_name = "DIR")]
        models: Vec<PathBuf>,
        /// Device you intend to run on: cpu, cuda or cuda:N. With cuda, a CUDA provider that does not register
        /// is a failure (otherwise it is only noted).
        #[arg(long, default_value = "cpu", value_parser = parse_device)]
        device: Device,
        /// Recompute the sha256 of every model file and compare with the manifest (slow on large models).
        #[arg(long)]
        verify_hashes: bool,
    },
}

fn parse_device(s: &str) -> Result<Device, String> {
    s.parse::<Device>().map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PIXTRACT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Doctor {
            models,
            device,
            verify_hashes,
        } => {
            let opts = DoctorOptions {
                models,
                device,
                verify_hashes,
            };
            let report = doctor::run(&opts, &SearchPaths::from_env());
            print!("{report}");
            if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
