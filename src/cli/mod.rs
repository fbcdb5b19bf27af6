//! The command line: one file per command, each parsing its arguments, calling the library and turning the
//! outcome into text and an exit code. Errors become `anyhow` messages here and nowhere deeper.

mod bench;
mod doctor;
mod eval;
mod events;
mod generate;
mod locate;
mod pages;
mod report;
mod review;
mod run;
mod verify;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Turn piles of receipts and invoices into tables: documents from S3 or local storage are rasterized, read by
/// a Mistral vision-language model (Pixtral 12B, or the Mistral 3 family: Ministral 3, Mistral Small 3.x) through
/// ONNX Runtime, and written as schema-typed Parquet.
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
    /// Run a pipeline: documents from a folder or S3 -> pages -> the model (schema-constrained) -> Parquet.
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
    Run(run::RunArgs),
    /// Check libraries, GPU support and model directories; exits 1 and says how to fix what is missing.
    ///
    /// Examples:
    ///
    ///   pixtract doctor                          # every models/*/ under the current directory, on cpu
    ///
    ///   pixtract doctor --model models/pixtral-12b-fp16 --device cuda --verify-hashes
    Doctor(doctor::DoctorArgs),
    /// Write every page of every document under URI as PNG, exactly as the model will see it.
    ///
    /// PDFs are rendered by pdfium in worker processes straight at model size; scans (JPEG, PNG, WebP, TIFF) are
    /// decoded at full resolution with EXIF orientation applied; both then get the model's own resize. Prints one
    /// line per document (pages and render time, or why it failed). Exit code 0: all rendered; 2: some failed;
    /// 1: nothing could be done.
    ///
    /// Examples:
    ///
    ///   pixtract pages invoices/ --out /tmp/pages
    ///
    ///   AWS_ENDPOINT_URL=http://127.0.0.1:9000 pixtract pages s3://mail/2024/ --include '*.pdf' --out /tmp/p
    Pages(pages::PagesArgs),
    /// Find values in a PDF's text layer: the page and box where each is printed, whatever its notation.
    ///
    /// The same locator `pixtract run` uses to fill `_location` and `_grounded`: numbers in any common notation,
    /// dates in any usual form, strings case- and space-folded with a small edit distance, a value printed in
    /// several places decided by its label or its line item's line, else reported ambiguous. Works on PDFs with
    /// a text layer (born-digital); scans have none. Exit code 0: every value found in one place; 2: some
    /// ambiguous or not found; 1: the document could not be read or has no text layer.
    ///
    /// Examples:
    ///
    ///   pixtract locate invoice.pdf --value invoice_id=INV-2024-0042 --value total=1234.50 --value date=2024-03-01
    ///
    ///   pixtract locate s3://mail/inv.pdf --value 'items[0].description=Widget A' --value 'items[0].amount=40' --json
    Locate(locate::LocateArgs),
    /// Run the model on images and a prompt; print the answer, then per-phase timings on stderr.
    ///
    /// Images are preprocessed exactly as mistral-common does (the reference of Mistral's models), the prompt follows
    /// the chat layout of the model's Tekken version, decoding is greedy unless --temperature is given.
    ///
    /// Examples:
    ///
    ///   pixtract generate --model models/tiny --image receipt.jpg --prompt "What is the total?"
    ///
    ///   pixtract generate --model models/pixtral-12b-fp16 --device cuda --image p1.png --image p2.png --prompt "Invoice number?"
    Generate(generate::GenerateArgs),
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
    Verify(verify::VerifyArgs),
    /// Score an output against labelled documents: per-field precision, recall, F1 and exact-match accuracy
    /// (micro and macro), calibration of the confidences, and the threshold per field that reaches a target
    /// precision.
    ///
    /// Values are compared per type: amounts as decimals ("$8.20" = 8.2), dates from the label's own format
    /// ("05 MAR 2018" = 2018-03-05), text case- and whitespace-folded. Exit code 0 when it ran, 1 when it could not.
    ///
    /// Examples:
    ///
    ///   pixtract eval --predictions out/receipts --labels ../shared/corpus/receipts-sroie
    ///
    ///   pixtract eval --predictions out/inv --labels labels.jsonl --map amount=total --map date=invoice_date --json
    Eval(eval::EvalArgs),
    /// Write one run's report as a static HTML file: throughput over time, stage busy shares, errors by cause
    /// with their documents, per-field fill rates and confidence histograms, and accuracy from `pixtract eval`.
    ///
    /// Reads the run's committed Parquet files and manifest from its output (folder or object store). The page
    /// is self-contained: no script, nothing fetched. Exit code 0 when written, 1 when it could not be.
    ///
    /// Examples:
    ///
    ///   pixtract report out/demo/parquet --out report.html
    ///
    ///   pixtract eval --predictions out/r --labels labels/ --json > eval.json; pixtract report out/r --eval eval.json
    Report(report::ReportArgs),
    /// Write the values a person should check as one static HTML page: each row with a value withheld
    /// (`_review`: low confidence, or not on the page under `require_grounding`) or not found on its page
    /// (`_grounded = false`), its pages re-rendered from the source documents with a box around every located
    /// value, and the values beside them. A document whose ETag changed since its row is not shown (the page
    /// says why). Exit code 0 when written, 1 when it could not be.
    ///
    /// Examples:
    ///
    ///   pixtract review out/invoices --out review.html
    ///
    ///   pixtract review s3://lake/invoices/ --out /tmp/review.html --max-rows 20
    Review(review::ReviewArgs),
    /// Benchmarks, each against its reference in the same run, reported as ratios.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Internal: a PDF renderer process speaking the worker protocol on stdin/stdout.
    #[command(name = "raster-worker", hide = true)]
    RasterWorker,
}

pub fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Run(args) => run::run(args),
        Command::Doctor(args) => doctor::doctor(args),
        Command::Pages(args) => pages::pages(args),
        Command::Locate(args) => locate::locate(args),
        Command::Generate(args) => report("generate", generate::generate(args)),
        Command::Verify(args) => verify::verify(args),
        Command::Eval(args) => report("eval", eval::eval(args)),
        Command::Report(args) => report("report", report::report(args)),
        Command::Review(args) => report("review", review::review(args)),
        Command::Bench(command) => bench::bench(command),
        Command::RasterWorker => pixtract::raster::worker::run_worker(),
    }
}

/// The exit code of a command that either did its job (0) or could not (1, its error chain on stderr).
fn report(command: &str, outcome: anyhow::Result<()>) -> ExitCode {
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "pixtract {command}: error: {}",
                pixtract::error::redact(&format!("{e:#}"))
            );
            ExitCode::FAILURE
        }
    }
}
