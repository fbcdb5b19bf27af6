//! What the stages say about a document, below all of them: where it came from ([`DocumentInfo`]) and why its
//! bytes could not be had ([`FetchError`]). The source stage produces both; the raster stage takes them in.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// Where a document came from: enough to find it again and to tell whether it changed.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DocumentInfo {
    /// `s3://bucket/key`, or an absolute local path.
    pub uri: String,
    /// Size in bytes.
    pub size: u64,
    pub etag: Option<String>,
    pub version: Option<String>,
    pub last_modified: Option<SystemTime>,
}

impl DocumentInfo {
    /// A document known only by a name (bytes in memory, tests).
    pub fn named(uri: impl Into<String>, size: u64) -> DocumentInfo {
        DocumentInfo {
            uri: uri.into(),
            size,
            ..Default::default()
        }
    }
}

/// Why a listed document's bytes could not be handed on by the source. Serializable and cloneable like the
/// raster errors that carry it (PDF worker processes send errors to the parent as they are).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum FetchError {
    #[error("{uri}: {size} bytes is over the limit of {limit} bytes per document")]
    TooLarge { uri: String, size: u64, limit: u64 },
    /// Listing or fetching failed for good (the reason says which).
    #[error("{uri}: {reason}")]
    Failed { uri: String, reason: String },
    /// The storage was unavailable after its retries (5xx, reset, throttling, timeout): worth a later attempt.
    #[error("{uri}: {reason}")]
    Unavailable { uri: String, reason: String },
}

impl crate::error::Retryable for FetchError {
    /// The storage was unavailable after its own retries.
    fn is_retryable(&self) -> bool {
        matches!(self, FetchError::Unavailable { .. })
    }
}

impl FetchError {
    pub fn uri(&self) -> &str {
        match self {
            FetchError::TooLarge { uri, .. }
            | FetchError::Failed { uri, .. }
            | FetchError::Unavailable { uri, .. } => uri,
        }
    }
}
