//! The model stage: Pixtral exported to ONNX (manifest, ONNX Runtime sessions).

pub mod manifest;
pub mod runtime;

use std::path::PathBuf;

pub use manifest::{ModelDir, ModelManifest};
pub use runtime::{Device, OrtRuntime};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read model manifest {}: {source}", path.display())]
    ManifestRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("model manifest {} is not valid JSON for pixtract: {source}", path.display())]
    ManifestParse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("model manifest {}: {reason}", path.display())]
    ManifestInvalid { path: PathBuf, reason: String },
    #[error("model file {} is missing or unreadable: {source}", path.display())]
    FileMissing {
        path: PathBuf,
        source: std::io::Error,
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
    #[error("cannot load ONNX Runtime from {}: {reason}", path.display())]
    RuntimeLoad { path: PathBuf, reason: String },
    #[error("invalid device {0:?}: expected cpu, cuda or cuda:N")]
    BadDevice(String),
    #[error("CUDA execution provider unavailable for {device}: {reason}")]
    CudaUnavailable { device: Device, reason: String },
    #[error("cannot create ONNX Runtime session for {}: {reason}", path.display())]
    Session { path: PathBuf, reason: String },
}
