//! `pixtract bench ...`: the benchmarks' flags; the measuring lives in `crate::bench`.

use std::path::PathBuf;
use std::process::ExitCode;

use pixtract::model::Device;

use crate::bench::batching::BatchingBench;
use crate::bench::engine::{DEFAULT_CASES, EngineBench};
use crate::bench::grammar::GrammarBench;
use crate::bench::pipeline::PipelineBench;
use crate::bench::raster::RasterBench;
use crate::bench::state::{Measure, StateBench};

#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Engine throughput on the tiny model: pixtract vs a Python onnxruntime loop over the same graphs and vs
    /// transformers generate(); vision+prefill and decode tokens/s at each batch size.
    ///
    /// Example: pixtract bench engine --batch 1 --batch 8 --new-tokens 32
    Engine(EngineBenchArgs),
    /// PDF rendering: pixtract (one process, then N worker processes) vs poppler's pdftoppm at the same long
    /// side, same files, same run, pages/s and ratio; plus JPEG scans decoded and Pixtral-resized per second.
    /// Needs pdftoppm (Debian: apt-get install poppler-utils).
    ///
    /// Example: pixtract bench raster --pdf invoices/ --workers 2 --repeat 3
    Raster(RasterBenchArgs),
    /// The whole job, documents in and Parquet out: `pixtract run` vs a Python reference pipeline (pypdfium2,
    /// mistral-common, transformers generate(), pyarrow) on the same documents, same run, pages/s and ratio.
    ///
    /// Example: pixtract bench pipeline --source out/demo/inputs --max-new-tokens 32
    Pipeline(PipelineBenchArgs),
    /// Continuous vs static batching in the same run: many prompts whose answers differ in length (drawn from a
    /// seeded generator, each ended by a step hook as a grammar ends an answer), same batch size; tokens/s, the
    /// share of decode rows idle, the longest stall of running rows for joining prompts, the ratio. Continuous
    /// runs three times: prompts prefilled whole, prefill interleaved with decode steps, and the latter with the
    /// vision encoder on its own thread. Each round also measures a decode step at 1 row and at the batch size
    /// and says how fast any scheduler could decode this workload on this machine (all passes at full width),
    /// and what share of that gain each mode got; medians over the rounds at the end. Fails unless every
    /// sequence equals its prompt's one-by-one run.
    ///
    /// Example: pixtract bench batching --prompts 64 --min-tokens 8 --max-tokens 256 --batch 8
    Batching(BatchingBenchArgs),
    /// The host work of a decode step under a JSON Schema grammar, forward pass excluded: llguidance masks per
    /// second on one core, and the host milliseconds per step at 8, 32 and 64 rows (masks, choosing each token
    /// with its probability, accepting it) with the masks one by one and spread over the cores, against a named
    /// budget: 10% of a Pixtral 12B decode step on an H100 at that batch (the arithmetic is printed).
    ///
    /// Example: pixtract bench grammar --schema schemas/receipt.json --schema schemas/invoice.json
    Grammar(GrammarBenchArgs),
    /// A run's start-up over a long output history: the time and peak memory from listing the output to knowing
    /// which documents are done, reading every committed file (runs before the index), the index's sidecars
    /// alone, the index as a nightly run finds it (last night's fold and one sidecar), and, as the reference,
    /// only the last run's file. Writes a synthetic history with the production sink first (kept in --dir for
    /// the next call); each read runs in a process of its own for its own peak RSS; medians over the rounds.
    ///
    /// Example: pixtract bench state --runs 365 --docs 10000 --rounds 3
    State(StateBenchArgs),
}

/// Exit code 0 when the benchmark ran, 1 (with the reason) when it could not.
pub fn bench(command: BenchCommand) -> ExitCode {
    let (name, outcome) = match command {
        BenchCommand::Engine(args) => ("bench engine", crate::bench::engine::run(args.into())),
        BenchCommand::Raster(args) => ("bench raster", crate::bench::raster::run(args.into())),
        BenchCommand::Pipeline(args) => {
            ("bench pipeline", crate::bench::pipeline::run(args.into()))
        }
        BenchCommand::Batching(args) => {
            ("bench batching", crate::bench::batching::run(args.into()))
        }
        BenchCommand::Grammar(args) => ("bench grammar", crate::bench::grammar::run(args.into())),
        BenchCommand::State(args) => ("bench state", args.run()),
    };
    super::report(name, outcome)
}

/// The project's virtualenv Python (`scripts/setup.sh`), where the references' packages are.
fn default_python() -> PathBuf {
    PathBuf::from(".venv/bin/python")
}

/// Where and how the engine benchmarks run ONNX Runtime.
#[derive(Debug, clap::Args)]
pub struct RuntimeArgs {
    /// ONNX Runtime intra-op threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// cpu, cuda or cuda:N. For `bench engine` the Python onnxruntime loop runs there too (cuda needs
    /// onnxruntime-gpu in --python's environment; transformers is then left out: it would run on the CPU).
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// Let ONNX Runtime's idle threads spin-wait between ops (ONNX Runtime's default; faster on an otherwise idle
    /// machine). `--spin false` when other work shares the cores.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    spin: bool,
}

#[derive(Debug, clap::Args)]
pub struct EngineBenchArgs {
    /// Model directory, as `scripts/setup.sh` makes them: models/tiny-gqa (GroupQueryAttention decoder, the
    /// cache written in place: pixtract's fastest CPU path), models/tiny (eager decoder), or a variant.
    #[arg(long, value_name = "DIR", default_value = "models/tiny-gqa")]
    model: PathBuf,
    /// Folder holding the reference cases (default: <model>/reference, else models/tiny/reference: the
    /// gqa export and the quantized variants share the fp32 tiny model's).
    #[arg(long, value_name = "DIR")]
    reference_dir: Option<PathBuf>,
    /// Reference cases used as prompts, comma-separated.
    #[arg(long, default_value = DEFAULT_CASES, value_delimiter = ',')]
    cases: Vec<String>,
    /// New tokens per sequence (EOS ignored).
    #[arg(long, default_value_t = 32)]
    new_tokens: usize,
    /// Batch sizes to measure; repeatable.
    #[arg(long = "batch", default_values_t = vec![1, 8])]
    batches: Vec<usize>,
    /// Rounds: each runs pixtract once, then the Python references once; each side's fastest round is reported.
    #[arg(long, default_value_t = 2)]
    repeat: usize,
    /// Python interpreter with the export stack (default: the project's .venv).
    #[arg(long)]
    python: Option<PathBuf>,
    /// The prompts for the Python side already encoded (`onnx-export/export.py bench encode-cases`), for a
    /// machine whose Python has no mistral-common.
    #[arg(long, value_name = "FILE.npz")]
    python_encoded: Option<PathBuf>,
    /// Measure pixtract only.
    #[arg(long)]
    no_reference: bool,
    /// Skip transformers generate() (slow), keep the Python ONNX Runtime loop.
    #[arg(long)]
    skip_transformers: bool,
    #[command(flatten)]
    runtime: RuntimeArgs,
    /// Prompt tokens per prefill pass for pixtract (0: all at once, as the Python loop does; default 256 on cpu,
    /// 1024 on cuda).
    #[arg(long, value_name = "TOKENS")]
    prefill_chunk: Option<usize>,
}

impl From<EngineBenchArgs> for EngineBench {
    fn from(a: EngineBenchArgs) -> Self {
        Self {
            model: a.model,
            reference_dir: a.reference_dir,
            cases: a
                .cases
                .into_iter()
                .map(|c| c.trim().to_string())
                .filter(|c| !c.is_empty())
                .collect(),
            new_tokens: a.new_tokens,
            batches: a.batches,
            repeat: a.repeat,
            python: a.python.unwrap_or_else(default_python),
            python_encoded: a.python_encoded,
            no_reference: a.no_reference,
            skip_transformers: a.skip_transformers,
            threads: a.runtime.threads,
            device: a.runtime.device,
            spin: a.runtime.spin,
            prefill_chunk: a.prefill_chunk,
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct RasterBenchArgs {
    /// PDFs to render (files or folders). Default: a generated 20-page invoice (text and tables).
    #[arg(long = "pdf", value_name = "PATH")]
    pdfs: Vec<PathBuf>,
    /// JPEG scans to decode and resize (files or folders). Default: ../shared/corpus/receipts-sroie if present.
    #[arg(long = "jpeg", value_name = "PATH")]
    jpegs: Vec<PathBuf>,
    /// Long side in pixels for both renderers.
    #[arg(long, default_value_t = 1024)]
    max_side: u32,
    /// Worker processes for the parallel run (pdftoppm gets as many concurrent processes).
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Passes over the inputs per measurement.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
}

impl From<RasterBenchArgs> for RasterBench {
    fn from(a: RasterBenchArgs) -> Self {
        Self {
            pdfs: a.pdfs,
            jpegs: a.jpegs,
            max_side: a.max_side,
            workers: a.workers,
            repeat: a.repeat,
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct PipelineBenchArgs {
    /// Folder of documents (PDF, JPEG, PNG, TIFF, WebP), e.g. out/demo/inputs after `make demo`.
    #[arg(long, value_name = "DIR")]
    source: PathBuf,
    /// Pipeline spec whose raster and model settings both sides use (its schema is ignored: free-text mode).
    #[arg(long, default_value = "pipelines/demo.toml")]
    spec: PathBuf,
    /// Model directory (overrides the spec's).
    #[arg(long, value_name = "DIR")]
    model: Option<PathBuf>,
    /// Tokens generated per page at most (both sides stop at </s>).
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    /// Python interpreter with the export stack (default: the project's .venv).
    #[arg(long)]
    python: Option<PathBuf>,
}

impl From<PipelineBenchArgs> for PipelineBench {
    fn from(a: PipelineBenchArgs) -> Self {
        Self {
            source: a.source,
            spec: a.spec,
            model: a.model,
            max_new_tokens: a.max_new_tokens,
            python: a.python.unwrap_or_else(default_python),
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct BatchingBenchArgs {
    /// Model directory with a GroupQueryAttention decoder (continuous batching needs its slot cache; an eager
    /// export runs both passes statically).
    #[arg(long, value_name = "DIR", default_value = "models/tiny-gqa")]
    model: PathBuf,
    /// Folder holding the reference cases whose prompts are cycled (default: <model>/reference, else
    /// models/tiny/reference).
    #[arg(long, value_name = "DIR")]
    reference_dir: Option<PathBuf>,
    /// Prompts per pass.
    #[arg(long, default_value_t = 64)]
    prompts: usize,
    /// Shortest answer, in tokens.
    #[arg(long, default_value_t = 8)]
    min_tokens: usize,
    /// Longest answer, in tokens.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Rows decoded together: the static batch size and the continuous slot count.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Rounds, each running static, continuous with whole prefills, continuous with prefill interleaved, and the
    /// latter with the vision encoder on its own thread, encoding ahead, then the step-cost probe. Compare
    /// within a round or the medians: on a shared machine single passes swing by a third.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Seed of the answer lengths.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Prefill chunks of a joining prompt between two decode steps in the interleaved continuous pass.
    #[arg(long, default_value_t = 1)]
    prefill_chunks_per_step: usize,
    /// Prompt tokens per prefill pass (unset: 256 on cpu, 1024 on cuda).
    #[arg(long)]
    prefill_chunk: Option<usize>,
    /// Prompts the vision thread encodes ahead in the cont-ahead pass.
    #[arg(long, default_value_t = 2)]
    vision_ahead: usize,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

#[derive(Debug, clap::Args)]
pub struct GrammarBenchArgs {
    /// Model directory whose tokenizer, EOS and vocabulary the grammar uses (every export of Pixtral has the same
    /// 131,072-token Tekken vocabulary).
    #[arg(long, value_name = "DIR", default_value = "models/tiny")]
    model: PathBuf,
    /// JSON Schema files (repeat the flag); default: schemas/receipt.json and schemas/invoice.json.
    #[arg(long = "schema", value_name = "FILE")]
    schemas: Vec<PathBuf>,
    /// Rows per step (repeat the flag); default: 8, 32 and 64.
    #[arg(long = "rows", value_name = "N")]
    rows: Vec<usize>,
    /// Steps per measurement (the median is reported).
    #[arg(long, default_value_t = 64)]
    steps: usize,
    /// Answer budget: past it minus the closing reserve, rows close their JSON (as extraction does).
    #[arg(long, default_value_t = 512)]
    max_new_tokens: usize,
    /// Seed of the logits.
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

impl From<GrammarBenchArgs> for GrammarBench {
    fn from(a: GrammarBenchArgs) -> Self {
        Self {
            model: a.model,
            schemas: if a.schemas.is_empty() {
                vec!["schemas/receipt.json".into(), "schemas/invoice.json".into()]
            } else {
                a.schemas
            },
            rows: if a.rows.is_empty() {
                vec![8, 32, 64]
            } else {
                a.rows
            },
            steps: a.steps.max(1),
            max_new_tokens: a.max_new_tokens,
            seed: a.seed,
        }
    }
}

impl From<BatchingBenchArgs> for BatchingBench {
    fn from(a: BatchingBenchArgs) -> Self {
        Self {
            model: a.model,
            reference_dir: a.reference_dir,
            prompts: a.prompts,
            min_tokens: a.min_tokens,
            max_tokens: a.max_tokens,
            batch: a.batch,
            repeat: a.repeat,
            seed: a.seed,
            prefill_chunks_per_step: a.prefill_chunks_per_step,
            prefill_chunk: a.prefill_chunk,
            vision_ahead: a.vision_ahead,
            threads: a.runtime.threads,
            device: a.runtime.device,
            spin: a.runtime.spin,
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct StateBenchArgs {
    /// Nightly runs in the history.
    #[arg(long, default_value_t = 365)]
    runs: usize,
    /// Documents per run.
    #[arg(long, default_value_t = 10_000)]
    docs: usize,
    /// Rounds of the four reads (medians reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Where the history is written and kept (a year of 10,000 documents a night takes ~300 MB).
    #[arg(long, value_name = "DIR", default_value = "target/bench-state")]
    dir: PathBuf,
    /// Internal: measure one read of the history in --dir, in this process, and print it as JSON.
    #[arg(long, hide = true, value_parser = ["files", "sidecars", "index", "last-run"])]
    measure: Option<String>,
}

impl StateBenchArgs {
    fn run(self) -> anyhow::Result<()> {
        match self.measure.as_deref() {
            Some(name) => {
                let measure = Measure::from_name(name)
                    .ok_or_else(|| anyhow::anyhow!("no measurement {name:?}"))?;
                crate::bench::state::measure_here(&self.dir, measure)
            }
            None => crate::bench::state::run(StateBench {
                dir: self.dir,
                runs: self.runs,
                docs: self.docs,
                rounds: self.rounds.max(1),
            }),
        }
    }
}
