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
    /// Run a pipeline: documents from a folder or S3 -> pages -> Pixtral (schema-constrained) -> Parquet.
    ///
    /// Every document ends as rows: one per prompt (page, or group of pages), or an error row saying why it failed.
    /// Files appear only when complete; a manifest and _SUCCESS are written last. Exit codes: 0 all rows ok,
    /// 2 finished with failed documents/rows, 3 stopped early (failure budget, SIGINT/SIGTERM: in-flight work is
    /// finished and committed, the next run does the rest), 1 could not run.
    ///
    /// Examples:
    ///
    ///   pixtract run pipelines/demo.toml
    ///
    ///   pixtract run pipelines/receipts.toml --source s3://mail/receipts/ --output s3://lake/receipts/ --device cuda
    Run(pixtract::pipeline::cli::RunArgs),
    /// Check libraries, GPU support and model directories; exits 1 and says how to fix what is missing.
    ///
    /// Examples:
    ///
    ///   pixtract doctor                          # every models/*/ under the current directory, on cpu
    ///
    ///   pixtract doctor --model models/pixtral-12b-fp16 --device cuda --verify-hashes
    Doctor {
        /// Model directory (holding pixtract-model.json) to check; repeatable. Default: every models/*/.
        #[arg(long = "model", value_name = "DIR")]
        models: Vec<PathBuf>,
        /// Device you intend to run on: cpu, cuda or cuda:N. With cuda, a CUDA provider that does not register
        /// is a failure (otherwise it is only noted).
        #[arg(long, default_value = "cpu")]
        device: Device,
        /// Recompute the sha256 of every model file and compare with the manifest (slow on large models).
        #[arg(long)]
        verify_hashes: bool,
    },
    /// Write every page of every document under URI as PNG, exactly as the model will see it.
    ///
    /// PDFs are rendered by pdfium in worker processes straight at model size; scans (JPEG, PNG, WebP, TIFF) are
    /// decoded at full resolution with EXIF orientation applied; both then get Pixtral's own resize. Prints one
    /// line per document (pages and render time, or why it failed). Exit code 0: all rendered; 2: some failed;
    /// 1: nothing could be done.
    ///
    /// Examples:
    ///
    ///   pixtract pages invoices/ --out /tmp/pages
    ///
    ///   AWS_ENDPOINT_URL=http://127.0.0.1:9000 pixtract pages s3://mail/2024/ --include '*.pdf' --out /tmp/p
    Pages(pixtract::raster::cli::PagesArgs),
    /// Run Pixtral on images and a prompt; print the answer, then per-phase timings on stderr.
    ///
    /// Images are preprocessed exactly as mistral-common does (Pixtral's reference), the prompt follows Pixtral's
    /// chat layout, decoding is greedy unless --temperature is given.
    ///
    /// Examples:
    ///
    ///   pixtract generate --model models/tiny --image receipt.jpg --prompt "What is the total?"
    ///
    ///   pixtract generate --model models/pixtral-12b-fp16 --device cuda --image p1.png --image p2.png --prompt "Invoice number?"
    Generate(pixtract::model::cli::GenerateArgs),
    /// Check the engine against the model's reference cases (from transformers): input ids, pixel tensors,
    /// first-step logits, greedy tokens, batched = one by one. Run it once on a new machine or GPU.
    ///
    /// Exit code 0: every case passes; 2: some differ (listed); 1: could not run.
    ///
    /// Examples:
    ///
    ///   pixtract verify --model models/tiny
    ///
    ///   pixtract verify --model models/tiny --device cuda
    Verify(pixtract::model::verify::VerifyArgs),
    /// Benchmarks, each against its reference in the same run, reported as ratios.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Internal: a PDF renderer process speaking the worker protocol on stdin/stdout.
    #[command(name = "raster-worker", hide = true)]
    RasterWorker,
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Engine throughput on the tiny model: pixtract vs a Python onnxruntime loop over the same graphs and vs
    /// transformers generate(); vision+prefill and decode tokens/s at each batch size.
    ///
    /// Example: pixtract bench engine --batch 1 --batch 8 --new-tokens 32
    Engine(pixtract::model::bench::EngineBenchArgs),
    /// PDF rendering: pixtract (one process, then N worker processes) vs poppler's pdftoppm at the same long
    /// side, same files, same run, pages/s and ratio; plus JPEG scans decoded and Pixtral-resized per second.
    /// Needs pdftoppm (Debian: apt-get install poppler-utils).
    ///
    /// Example: pixtract bench raster --pdf invoices/ --workers 2 --repeat 3
    Raster(pixtract::raster::bench::RasterBenchArgs),
    /// The whole job, documents in and Parquet out: `pixtract run` vs a Python reference pipeline (pypdfium2,
    /// mistral-common, transformers generate(), pyarrow) on the same documents, same run, pages/s and ratio.
    ///
    /// Example: pixtract bench pipeline --source out/demo/inputs --max-new-tokens 32
    Pipeline(pixtract::pipeline::bench::PipelineBenchArgs),
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
        Command::Bench(BenchCommand::Engine(args)) => pixtract::model::bench::run(args),
        Command::Bench(BenchCommand::Raster(args)) => pixtract::raster::bench::run(args),
        Command::Bench(BenchCommand::Pipeline(args)) => pixtract::pipeline::bench::run(args),
        Command::Run(args) => pixtract::pipeline::cli::run(args),
        Command::Generate(args) => pixtract::model::cli::generate(args),
        Command::Verify(args) => pixtract::model::verify::run(args),
        Command::Pages(args) => pixtract::raster::cli::pages(args),
        Command::RasterWorker => pixtract::raster::worker::run_worker(),
    }
}
