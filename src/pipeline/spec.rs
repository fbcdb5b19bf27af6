//! Pipeline specs (`pipelines/*.toml`): every key documented, unknown keys refused, paths relative to the
//! directory the job runs from. CLI flags override the file (see `pixtract run --help`).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::PipelineError;
use crate::model::{BatchPolicy, Batching};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSpec {
    /// Name stored in every output row (`pipeline` column).
    pub name: String,
    pub source: SourceSpec,
    #[serde(default)]
    pub raster: RasterSpec,
    pub model: ModelSpec,
    pub extract: ExtractSpec,
    pub output: OutputSpec,
    #[serde(default)]
    pub limits: LimitsSpec,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSpec {
    /// Folder, file, file:// URL, s3://bucket/prefix (AWS_* environment for credentials/endpoint), gs://bucket/prefix
    /// (GOOGLE_*) or az://container/prefix (AZURE_*).
    pub uri: String,
    /// Only documents matching one of these globs (a glob without '/' matches the file name). Empty: all.
    #[serde(default)]
    pub include: Vec<String>,
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Documents fetched concurrently.
    #[serde(default = "default_fetch_concurrency")]
    pub fetch_concurrency: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RasterSpec {
    /// Long side of the model's view, for PDF pages (rendered at it) and scans (resized to it by Pixtral's rule)
    /// alike; 0: the model manifest's max image size, which is also its upper bound.
    #[serde(default)]
    pub max_side: u32,
    /// Optional DPI cap for rendering small PDF pages.
    #[serde(default)]
    pub max_dpi: Option<f32>,
    /// PDF renderer processes.
    #[serde(default = "default_workers")]
    pub workers: usize,
    /// Seconds a renderer may spend on one document.
    #[serde(default = "default_timeout")]
    pub timeout_s: u64,
    /// Environment variable holding the password for encrypted PDFs.
    #[serde(default)]
    pub password_env: Option<String>,
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
    #[serde(default = "default_max_pages")]
    pub max_pages: u32,
    #[serde(default = "default_max_pixels")]
    pub max_pixels: u64,
}

impl RasterSpec {
    /// The long side of the model's view: `max_side`, or the model's own image size when it is 0.
    pub fn view_side(&self, model_max: usize) -> usize {
        match self.max_side {
            0 => model_max,
            side => side as usize,
        }
    }
}

impl Default for RasterSpec {
    fn default() -> Self {
        RasterSpec {
            max_side: 0,
            max_dpi: None,
            workers: default_workers(),
            timeout_s: default_timeout(),
            password_env: None,
            max_bytes: default_max_bytes(),
            max_pages: default_max_pages(),
            max_pixels: default_max_pixels(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Model directory written by onnx-export.
    pub dir: PathBuf,
    /// cpu, cuda or cuda:N.
    #[serde(default = "default_device")]
    pub device: String,
    /// ONNX Runtime intra-op threads (0: one per core).
    #[serde(default)]
    pub threads: usize,
    /// Let ONNX Runtime's idle threads spin-wait between ops (its own default). On by default: the model stage is
    /// most of a run's time, and spinning made the demo job faster, raster workers included (docs/benchmarks.md).
    /// Turn it off when other work must share the cores.
    #[serde(default = "default_spin")]
    pub spin: bool,
    /// Sequences per forward pass.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Upper bound on padded prompt tokens per prefill.
    #[serde(default = "default_token_budget")]
    pub token_budget: usize,
    /// "continuous" (default): a finished sequence's KV-cache slot takes the next waiting prompt at once
    /// (GroupQueryAttention exports); "static": batches run until their longest answer ends. Eager exports
    /// always batch statically.
    #[serde(default)]
    pub batching: Batching,
    /// Prompt tokens per prefill pass (0: whole prompts; unset: 256 on cpu, 1024 on cuda). Bounds the attention
    /// scores a prefill holds.
    #[serde(default)]
    pub prefill_chunk: Option<usize>,
    /// Continuous batching: prefill chunks of a joining prompt between two decode steps (0: whole prompts at
    /// once, running rows waiting for them).
    #[serde(default = "default_prefill_chunks_per_step")]
    pub prefill_chunks_per_step: usize,
    /// Continuous batching: prompts whose pages the vision encoder encodes ahead, on a thread of its own, while
    /// the decoder steps (0: between two decode steps, running rows waiting).
    #[serde(default = "default_vision_ahead")]
    pub vision_ahead: usize,
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtractSpec {
    /// JSON Schema file of what to extract; leave out (with mode = "free-text") for plain transcription.
    #[serde(default)]
    pub schema: Option<PathBuf>,
    /// "schema" (default when a schema is given) or "free-text".
    #[serde(default)]
    pub mode: Option<String>,
    /// Pages of one document sent together as one prompt (1: page by page). Page mode only.
    #[serde(default = "default_pages_per_prompt")]
    pub pages_per_prompt: usize,
    /// "page" (default): a row per page (or per `pages_per_prompt` pages). "document": one row per document, its
    /// pages in one prompt when they fit `max_prompt_tokens`, else in windows of pages whose answers merge by the
    /// schema's `x-merge` rules.
    #[serde(default)]
    pub unit: Unit,
    /// Document mode: the most tokens one prompt (a window of pages) may hold, instruction and images together.
    /// Unset: `[model] token_budget` (one window is prefilled within the padded-token bound of one prefill).
    #[serde(default)]
    pub max_prompt_tokens: Option<usize>,
    /// Confidence threshold for every field (0-1, the `min` of its `_confidence`): a value below it is written as
    /// null and its field named in the row's `_review` list. Unset: values are written as they are.
    #[serde(default)]
    pub min_confidence: Option<f32>,
    /// Per-field thresholds by path (`total`, `items.total_price`), overriding `min_confidence`.
    #[serde(default)]
    pub min_confidence_fields: std::collections::BTreeMap<String, f32>,
    /// Look every extracted value up in the text layer of the pages its row covers (PDF pages with text) and
    /// write where it was found (`_location`) and whether it was (`_grounded`). Costs reading each PDF page's text
    /// (about a millisecond a page); `false` leaves both columns null.
    #[serde(default = "default_true")]
    pub grounding: bool,
    /// A value the page's text layer does not hold (`_grounded = false`) is written as null and named in
    /// `_review`, as a value under `min_confidence` is. Values of pages without a text layer (scans) and fields
    /// with `x-grounding: false` are not affected.
    #[serde(default)]
    pub require_grounding: bool,
}

fn default_true() -> bool {
    true
}

/// What one output row stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unit {
    #[default]
    Page,
    Document,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    /// Folder, s3://bucket/prefix, gs://bucket/prefix or az://container/prefix for the Parquet files, manifest and
    /// _SUCCESS (credentials from the store's standard environment).
    pub uri: String,
    /// Hive partition key for the run date (`dt=YYYY-MM-DD/`); "" for none.
    #[serde(default = "default_partition")]
    pub partition: String,
    #[serde(default = "default_rows_per_file")]
    pub max_rows_per_file: usize,
    /// Also write the run report (`_report-<run id>.html`, see `pixtract report`) beside the manifest.
    #[serde(default)]
    pub report: bool,
    /// Object stores: seconds an output lease lives without renewal (renewed every quarter of it). A run killed
    /// without a chance to release its lease blocks the next run for at most this long. Local folders use a lock
    /// the kernel drops when the process ends, so this does not apply there.
    #[serde(default = "default_lease_ttl_s")]
    pub lease_ttl_s: u64,
    /// Seconds to wait while another run holds the output lease before giving up with exit code 4 (absent: wait as
    /// long as it takes; 0: do not wait).
    #[serde(default)]
    pub lease_wait_s: Option<u64>,
}

fn default_lease_ttl_s() -> u64 {
    120
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSpec {
    /// Abort the run cleanly once more than this share of rows failed (after `failure_min_docs`). Default 1.0
    /// (never): a nightly job over a mixed bucket should not leave tonight's good documents undone because many
    /// scans were bad; every failure is a row and exit code 2 says so. Model failures are `retry` rows, not
    /// permanent ones, so a broken device does not mark documents done.
    #[serde(default = "default_failure_share")]
    pub max_failed_share: f64,
    /// Documents seen before the share applies (a first bad file does not abort a big job).
    #[serde(default = "default_failure_min_docs")]
    pub failure_min_docs: usize,
    /// Stop after this many documents (0: no limit); handy for trying a spec on a big bucket.
    #[serde(default)]
    pub max_documents: usize,
}

impl Default for LimitsSpec {
    fn default() -> Self {
        LimitsSpec {
            max_failed_share: default_failure_share(),
            failure_min_docs: default_failure_min_docs(),
            max_documents: 0,
        }
    }
}

fn default_fetch_concurrency() -> usize {
    8
}
fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}
fn default_timeout() -> u64 {
    60
}
fn default_max_bytes() -> u64 {
    256 << 20
}
fn default_max_pages() -> u32 {
    2000
}
fn default_max_pixels() -> u64 {
    100_000_000
}
fn default_spin() -> bool {
    true
}
fn default_device() -> String {
    "cpu".into()
}
fn default_batch() -> usize {
    8
}
fn default_prefill_chunks_per_step() -> usize {
    BatchPolicy::default().prefill_chunks_per_step
}
fn default_vision_ahead() -> usize {
    BatchPolicy::default().vision_ahead
}
fn default_token_budget() -> usize {
    16_384
}
fn default_max_new_tokens() -> usize {
    512
}
fn default_pages_per_prompt() -> usize {
    1
}
fn default_partition() -> String {
    "dt".into()
}
fn default_rows_per_file() -> usize {
    1_000_000
}
fn default_failure_share() -> f64 {
    1.0
}
fn default_failure_min_docs() -> usize {
    20
}

impl PipelineSpec {
    pub fn load(path: &Path) -> Result<PipelineSpec, PipelineError> {
        let text = std::fs::read_to_string(path).map_err(|source| PipelineError::SpecRead {
            path: path.to_path_buf(),
            source,
        })?;
        let spec: PipelineSpec =
            toml::from_str(&text).map_err(|source| PipelineError::SpecParse {
                path: path.to_path_buf(),
                source,
            })?;
        spec.validate().map_err(|reason| PipelineError::Spec {
            path: path.to_path_buf(),
            reason,
        })?;
        Ok(spec)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.name.is_empty() {
            return Err("name must not be empty".into());
        }
        if self.model.batch_size == 0 || self.model.max_new_tokens == 0 {
            return Err("model.batch_size and model.max_new_tokens must be at least 1".into());
        }
        if self.extract.pages_per_prompt == 0 {
            return Err("extract.pages_per_prompt must be at least 1".into());
        }
        if self.extract.unit == Unit::Document && self.extract.pages_per_prompt != 1 {
            return Err("extract.pages_per_prompt has no meaning with unit = \"document\" (a document's pages go together, in windows of max_prompt_tokens): remove it".into());
        }
        if self.extract.require_grounding && !self.extract.grounding {
            return Err("extract.require_grounding = true needs extract.grounding = true (a value cannot be checked against a text layer that is not read)".into());
        }
        if self.extract.require_grounding && self.extract.mode.as_deref() == Some("free-text") {
            return Err("extract.require_grounding applies to schema extraction (a transcription is not looked up on the page)".into());
        }
        if self.extract.max_prompt_tokens.is_some() && self.extract.unit != Unit::Document {
            return Err("extract.max_prompt_tokens applies to unit = \"document\" only".into());
        }
        match (self.extract.mode.as_deref(), &self.extract.schema) {
            (None | Some("schema"), Some(_)) | (Some("free-text"), None) => {}
            (None | Some("schema"), None) => {
                return Err(
                    "extract.schema is required unless extract.mode = \"free-text\"".into(),
                );
            }
            (Some("free-text"), Some(_)) => {
                return Err("extract.mode = \"free-text\" takes no schema".into());
            }
            (Some(other), _) => {
                return Err(format!(
                    "extract.mode {other:?}: expected \"schema\" or \"free-text\""
                ));
            }
        }
        if self.output.lease_ttl_s < 2 {
            return Err("output.lease_ttl_s must be at least 2 seconds".into());
        }
        if !(0.0..=1.0).contains(&self.limits.max_failed_share) {
            return Err("limits.max_failed_share must be between 0 and 1".into());
        }
        Ok(())
    }
}
