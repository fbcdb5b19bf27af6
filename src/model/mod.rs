//! The model stage: Pixtral exported to ONNX (manifest, ONNX Runtime sessions).

pub mod engine;
pub mod manifest;
pub mod preprocess;
pub mod prompt;
pub mod runtime;
pub mod sampling;

use std::path::PathBuf;

pub use engine::{
    AnswerLengths, BatchPolicy, Batching, EngineOptions, FinishReason, Finished, Generation,
    GenerationConfig, GenerationStats, HookError, NoHook, PixtralEngine, RowTiming, StepHook,
    StreamEngine, default_prefill_chunk, host_steps, plan_batches,
};
pub use manifest::{ModelDir, ModelManifest};
pub use preprocess::{ImagePreprocessor, PreparedImage};
pub use prompt::{EncodedPrompt, Prompt, PromptPart, PromptTokenizer};
pub use runtime::{Device, OrtRuntime};
pub use sampling::Sampling;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    // Causes are kept as `source`, never repeated in the message: a printed chain (`crate::error::chain`,
    // anyhow's `{:#}`) shows each once.
    #[error("cannot read model manifest {}", path.display())]
    ManifestRead {
        path: PathBuf,
        #[source]
        cause: std::io::Error,
    },
    #[error("model manifest {} is not valid JSON for pixtract", path.display())]
    ManifestParse {
        path: PathBuf,
        #[source]
        cause: serde_json::Error,
    },
    #[error("model manifest {}: {reason}", path.display())]
    ManifestInvalid { path: PathBuf, reason: String },
    #[error("model file {} is missing or unreadable", path.display())]
    FileMissing {
        path: PathBuf,
        #[source]
        cause: std::io::Error,
    },
    #[error("model file {} has {actual} bytes, the manifest says {expected}: incomplete copy?", path.display())]
    FileSize {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("model file {} has sha256 {actual}, the manifest says {expected}", path.display())]
    HashMismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error(transparent)]
    Native(#[from] crate::native::NativeError),
    #[error("cannot load ONNX Runtime from {}", path.display())]
    RuntimeLibrary {
        path: PathBuf,
        #[source]
        source: ort::LoadDynamicError,
    },
    #[error("cannot set up ONNX Runtime from {}", path.display())]
    RuntimeLoad {
        path: PathBuf,
        #[source]
        source: ort::Error,
    },
    #[error("invalid device {0:?}: expected cpu, cuda or cuda:N")]
    BadDevice(String),
    #[error("CUDA execution provider unavailable for {device}: {reason}")]
    CudaUnavailable { device: Device, reason: String },
    #[error("cannot create an ONNX Runtime session for {}", path.display())]
    Session {
        path: PathBuf,
        #[source]
        source: ort::Error,
    },
    #[error("cannot create an ONNX Runtime session builder")]
    SessionBuilder(#[source] ort::Error),
    #[error("cannot load tokenizer {}", path.display())]
    Tokenizer {
        path: PathBuf,
        #[source]
        source: tokenizers::Error,
    },
    #[error("tokenizer")]
    Encode(#[source] tokenizers::Error),
    #[error("ONNX Runtime failed in {stage}")]
    Ort {
        stage: &'static str,
        #[source]
        source: ort::Error,
    },
    #[error("model graph does not match its manifest: {0}")]
    Graph(String),
    #[error(
        "this model's decoder uses GroupQueryAttention in {dtype}, and ONNX Runtime's CUDA GroupQueryAttention has \
         fp16/bf16 kernels only; for {device} export with --attention gqa --dtype fp16 (the CUDA default) or \
         --attention eager"
    )]
    AttentionDevice { device: Device, dtype: String },
    #[error(
        "prompt of {prompt} tokens plus {new_tokens} new tokens exceeds the model's context of {limit} tokens"
    )]
    ContextTooLong {
        prompt: usize,
        new_tokens: usize,
        limit: usize,
    },
    #[error("prompt {row} has no tokens (an encoded prompt starts with <s>)")]
    EmptyPrompt { row: usize },
    #[error(
        "the decoder graph does not have the inputs of its manifest's \"attention\": {attention} decoders take {wanted}"
    )]
    AttentionInputs {
        attention: &'static str,
        wanted: &'static str,
    },
    #[error("prompt has {slots} [IMG] tokens but its images give {features} features")]
    ImageTokens { slots: usize, features: usize },
    #[error("image has no pixels ({width}x{height})")]
    EmptyImage { width: u32, height: u32 },
    #[error("step hook failed for sequence {row}")]
    Hook {
        row: usize,
        #[source]
        source: HookError,
    },
    #[error("every token is masked for sequence {row}")]
    AllMasked { row: usize },
}

impl crate::error::Retryable for ModelError {
    /// An ONNX Runtime run that failed (device memory, a kernel, the driver) is worth another try; a model that does
    /// not match its manifest, or an input the model refuses, fails the same way every time.
    fn is_retryable(&self) -> bool {
        matches!(self, ModelError::Ort { .. })
    }
}
