//! What earlier runs already did, read from the output itself (the single source of truth): every visible
//! Parquet file is complete (files appear atomically), and its rows say which document, at which ETag/version,
//! with which schema and model, covered which pages.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use arrow::array::{Array, AsArray};
use arrow::datatypes::Int32Type;
use futures::TryStreamExt;
use object_store::ObjectStore;
use object_store::buffered::BufReader;
use object_store::path::Path as ObjectPath;
use parquet::arrow::{ParquetRecordBatchStreamBuilder, ProjectionMask};

/// Why the output's earlier state could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot list the output")]
    Store(#[from] object_store::Error),
    #[error("cannot read a Parquet file of the output")]
    Parquet(#[from] parquet::errors::ParquetError),
}
use crate::extract::values::provenance::{
    ATTEMPT, DOC_PAGE_COUNT, MODEL_ID, PAGE_END, PAGE_START, SCHEMA_SHA256, SOURCE_ETAG,
    SOURCE_URI, SOURCE_VERSION, STATUS, STATUS_RETRY,
};
use crate::sink::SinkTarget;

/// Identity of a processed document: (uri, etag or version, schema sha256, model id).
pub type DocKey = (String, String, String, String);

#[derive(Debug, Default)]
pub struct ProcessedSet {
    done: HashSet<DocKey>,
    /// Documents not done whose earlier attempts failed for transient reasons: how many attempts so far.
    attempts: HashMap<DocKey, u32>,
    pub files_read: usize,
    /// `.parquet` files in the output that could not be read or are not pixtract's (ignored with a warning).
    pub skipped_files: Vec<String>,
}

impl ProcessedSet {
    /// Transient failures recorded for this document by earlier runs (0: none).
    pub fn attempts(&self, key: &DocKey) -> u32 {
        self.attempts.get(key).copied().unwrap_or(0)
    }

    pub fn contains(&self, key: &DocKey) -> bool {
        self.done.contains(key)
    }

    pub fn len(&self) -> usize {
        self.done.len()
    }

    pub fn is_empty(&self) -> bool {
        self.done.is_empty()
    }
}

/// The document's key for skipping: its version when the store has versions, else its ETag.
pub fn doc_key(
    uri: &str,
    etag: Option<&str>,
    version: Option<&str>,
    schema: &str,
    model: &str,
) -> DocKey {
    (
        uri.to_string(),
        version.or(etag).unwrap_or_default().to_string(),
        schema.to_string(),
        model.to_string(),
    )
}

/// Reads every committed Parquet file under the target. A document counts as processed when its rows reach its
/// last page, or when it has a document-level error row (page 0: it never rendered) that is not a transient
/// failure (status `retry`, left for the next run). Unreadable or foreign `.parquet` files are skipped with a
/// warning; only a listing that fails is an error.
pub async fn read_processed(target: &SinkTarget) -> Result<ProcessedSet, StateError> {
    let (store, prefix): (Arc<dyn ObjectStore>, Option<ObjectPath>) = match target {
        SinkTarget::Local(dir) => {
            if !dir.is_dir() {
                return Ok(ProcessedSet::default());
            }
            let fs = object_store::local::LocalFileSystem::new_with_prefix(dir)?;
            (Arc::new(fs), None)
        }
        SinkTarget::Store { store, prefix, .. } => (
            store.clone(),
            (!prefix.as_ref().is_empty()).then(|| prefix.clone()),
        ),
    };
    // The whole listing again when a page breaks off (object_store retries requests, not cut bodies).
    let files: Vec<_> = crate::store::list_all(store.as_ref(), prefix.as_ref())
        .await?
        .into_iter()
        .filter(|m| crate::sink::is_committed_data_file(m.location.filename().unwrap_or_default()))
        .collect();
    // Per key: highest page reached, page count, document-level (permanent) error seen, transient attempts.
    let mut cover: HashMap<DocKey, Cover> = HashMap::new();
    let mut set = ProcessedSet::default();
    for meta in files {
        // A stray or broken `.parquet` (zero bytes, truncated, someone else's columns) is skipped with a
        // warning: it must never stop a run from starting.
        // A read that failed in the storage (a request, a body cut mid-way) is made again: skipping a committed
        // file would redo its documents. Still failing, it stops the run before anything is redone. Filling
        // `cover` twice is harmless (maxima and flags).
        let mut delays = crate::store::retry_delays();
        let read = loop {
            match read_file(&store, &meta, &mut cover).await {
                Err(e) if crate::store::failed_in_storage(&e) => match delays.next() {
                    Some(delay) => tokio::time::sleep(delay).await,
                    None => return Err(e),
                },
                other => break other,
            }
        };
        match read {
            Ok(true) => set.files_read += 1,
            Ok(false) => {
                tracing::warn!(file = %meta.location, "not a pixtract output file (other columns): ignored");
                set.skipped_files.push(meta.location.to_string());
            }
            Err(e) => {
                tracing::warn!(file = %meta.location, error = %crate::error::chain(&e), "unreadable Parquet file in the output: ignored");
                set.skipped_files.push(meta.location.to_string());
            }
        }
    }
    for (key, c) in cover {
        if c.doc_error || c.count.is_some_and(|n| c.reached >= n) {
            set.done.insert(key);
        } else if c.attempts > 0 {
            set.attempts.insert(key, c.attempts);
        }
    }
    Ok(set)
}

#[derive(Default)]
struct Cover {
    reached: i32,
    count: Option<i32>,
    doc_error: bool,
    attempts: u32,
}

/// Reads one output file into `cover`. Ok(false): not one of ours (its columns differ).
async fn read_file(
    store: &Arc<dyn ObjectStore>,
    meta: &object_store::ObjectMeta,
    cover: &mut HashMap<DocKey, Cover>,
) -> Result<bool, StateError> {
    let reader = BufReader::new(store.clone(), meta);
    let builder = ParquetRecordBatchStreamBuilder::new(reader).await?;
    let columns = [
        SOURCE_URI,
        SOURCE_ETAG,
        SOURCE_VERSION,
        SCHEMA_SHA256,
        MODEL_ID,
        PAGE_START,
        PAGE_END,
        DOC_PAGE_COUNT,
    ];
    let schema = builder.schema().clone();
    let mut indices = Vec::new();
    for c in columns {
        match schema.index_of(c) {
            Ok(i) => indices.push(i),
            // Not one of ours: nothing to learn from it.
            Err(_) => return Ok(false),
        }
    }
    // Newer outputs say which rows were transient failures; older ones have no such rows.
    for c in [STATUS, ATTEMPT] {
        if let Ok(i) = schema.index_of(c) {
            indices.push(i);
        }
    }
    let mask = ProjectionMask::roots(builder.parquet_schema(), indices);
    let mut stream = builder.with_projection(mask).build()?;
    let mut ours = true;
    while let Some(batch) = stream.try_next().await? {
        let text = |name: &str| {
            batch
                .column_by_name(name)
                // `_opt`: a foreign file with other column types is skipped, never a panic.
                .and_then(|c| c.as_string_opt::<i32>().cloned())
        };
        let int = |name: &str| {
            batch
                .column_by_name(name)
                .and_then(|c| c.as_primitive_opt::<Int32Type>().cloned())
        };
        let (Some(uri), Some(etag), Some(version), Some(schema_sha), Some(model)) = (
            text(SOURCE_URI),
            text(SOURCE_ETAG),
            text(SOURCE_VERSION),
            text(SCHEMA_SHA256),
            text(MODEL_ID),
        ) else {
            ours = false;
            continue;
        };
        let (Some(start), Some(end), Some(count)) =
            (int(PAGE_START), int(PAGE_END), int(DOC_PAGE_COUNT))
        else {
            ours = false;
            continue;
        };
        let (status, attempt) = (text(STATUS), int(ATTEMPT));
        for i in 0..batch.num_rows() {
            let opt =
                |a: &arrow::array::StringArray| (!a.is_null(i)).then(|| a.value(i).to_string());
            let key = doc_key(
                uri.value(i),
                opt(&etag).as_deref(),
                opt(&version).as_deref(),
                &opt(&schema_sha).unwrap_or_default(),
                &opt(&model).unwrap_or_default(),
            );
            let retry = status
                .as_ref()
                .is_some_and(|s| !s.is_null(i) && s.value(i) == STATUS_RETRY);
            let entry = cover.entry(key).or_default();
            if retry {
                // A transient failure: not done; counts as one attempt.
                let n = attempt
                    .as_ref()
                    .filter(|a| !a.is_null(i))
                    .map(|a| a.value(i).max(1) as u32)
                    .unwrap_or(1);
                entry.attempts = entry.attempts.max(n);
                continue;
            }
            if !end.is_null(i) {
                entry.reached = entry.reached.max(end.value(i));
            }
            if !count.is_null(i) {
                entry.count = Some(count.value(i));
            }
            if !start.is_null(i) && start.value(i) == 0 {
                entry.doc_error = true;
            }
        }
    }
    Ok(ours)
}
