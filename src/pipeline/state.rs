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

/// The document's key for skipping: its normalised ETag, or its version when the store gives no ETag.
///
/// Both sides of the comparison go through here (the state reader for the rows of earlier runs, the producer for
/// the listing), and rows record the LISTING's identity, because stores describe one object differently in a
/// listing and in a GET: Azure lists an ETag without the quotes its GET answers with; versioned S3 and GCS answer
/// a GET with a version (`x-amz-version-id`, the generation) their listings leave out. The ETag comes first
/// because every store lists one; rows written before this rule (quoted GET ETags next to GET versions) then
/// still match their listing.
pub fn doc_key(
    uri: &str,
    etag: Option<&str>,
    version: Option<&str>,
    schema: &str,
    model: &str,
) -> DocKey {
    let identity = etag
        .map(normalise_etag)
        .filter(|e| !e.is_empty())
        .or(version)
        .unwrap_or_default();
    (
        uri.to_string(),
        identity.to_string(),
        schema.to_string(),
        model.to_string(),
    )
}

/// An ETag as an opaque value: without its surrounding quotes (HTTP's entity-tag syntax, which some stores keep
/// and some drop) and without the weak-validator prefix `W/`.
pub fn normalise_etag(etag: &str) -> &str {
    let etag = etag.trim();
    let etag = etag.strip_prefix("W/").unwrap_or(etag);
    etag.strip_prefix('"')
        .and_then(|e| e.strip_suffix('"'))
        .unwrap_or(etag)
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{ArrayRef, Int32Array, RecordBatch, StringArray};
    use arrow::datatypes::{Field, Schema};

    use super::*;

    #[test]
    fn etags_compare_without_quotes_or_weak_prefix() {
        for raw in ["abc", "\"abc\"", "W/\"abc\"", " \"abc\" "] {
            assert_eq!(normalise_etag(raw), "abc", "{raw:?}");
        }
        // Not a pair of quotes: left as it is.
        assert_eq!(normalise_etag("\""), "\"");
    }

    #[test]
    fn the_etag_wins_over_the_version_and_the_version_stands_in_for_a_missing_etag() {
        let key = |etag, version| doc_key("s3://b/a.pdf", etag, version, "s", "m").1;
        assert_eq!(key(Some("\"e1\""), Some("v9")), "e1");
        assert_eq!(key(Some("e1"), None), "e1");
        assert_eq!(key(None, Some("v9")), "v9");
        assert_eq!(key(Some(""), Some("v9")), "v9");
        assert_eq!(key(None, None), "");
    }

    /// (uri, ETag, version) of one row.
    type Row<'a> = (&'a str, Option<&'a str>, Option<&'a str>);

    /// One row per document, covering its only page, with the provenance columns the reader needs.
    fn write_rows(dir: &std::path::Path, rows: &[Row]) {
        let text = |f: &dyn Fn(&Row) -> Option<String>| {
            Arc::new(rows.iter().map(f).collect::<StringArray>()) as ArrayRef
        };
        let same = |v: &str| {
            let v = v.to_string();
            Arc::new(
                rows.iter()
                    .map(|_| Some(v.clone()))
                    .collect::<StringArray>(),
            ) as ArrayRef
        };
        let one = Arc::new(Int32Array::from(vec![1; rows.len()])) as ArrayRef;
        let columns = [
            (SOURCE_URI, text(&|r| Some(r.0.to_string()))),
            (SOURCE_ETAG, text(&|r| r.1.map(str::to_string))),
            (SOURCE_VERSION, text(&|r| r.2.map(str::to_string))),
            (SCHEMA_SHA256, same("schema")),
            (MODEL_ID, same("model")),
            (PAGE_START, one.clone()),
            (PAGE_END, one.clone()),
            (DOC_PAGE_COUNT, one),
        ];
        let schema = Arc::new(Schema::new(
            columns
                .iter()
                .map(|(name, a)| Field::new(*name, a.data_type().clone(), true))
                .collect::<Vec<_>>(),
        ));
        let batch =
            RecordBatch::try_new(schema.clone(), columns.into_iter().map(|c| c.1).collect())
                .expect("batch");
        let file = std::fs::File::create(dir.join("part-0.parquet")).expect("create");
        let mut writer = parquet::arrow::ArrowWriter::try_new(file, schema, None).expect("writer");
        writer.write(&batch).expect("write");
        writer.close().expect("close");
    }

    /// Rows written before the listing's identity was recorded hold what the GET answered: a quoted ETag next to a
    /// version (versioned S3), a quoted ETag where the listing has none (Azure), a generation (GCS). They still
    /// count as done for the identity the next listing gives.
    #[tokio::test]
    async fn rows_written_the_old_way_match_the_listing() {
        let tmp = tempfile::tempdir().expect("tempdir");
        write_rows(
            tmp.path(),
            &[
                (
                    "s3://b/a.png",
                    Some("\"9b2cf535f27731c9\""),
                    Some("3HL4kqtJlcpXroDTDmJ"),
                ),
                ("az://c/b.png", Some("\"0x227B725616B56C0\""), None),
                (
                    "gs://g/c.png",
                    Some("CKih16GjycICEAE="),
                    Some("1733553601234567"),
                ),
            ],
        );
        let set = read_processed(&SinkTarget::Local(tmp.path().to_path_buf()))
            .await
            .expect("read");
        assert_eq!(set.files_read, 1);
        // As the listings give them: S3 keeps the quotes and has no version; Azure drops the quotes; GCS lists
        // the ETag alone.
        for (uri, etag) in [
            ("s3://b/a.png", "\"9b2cf535f27731c9\""),
            ("az://c/b.png", "0x227B725616B56C0"),
            ("gs://g/c.png", "CKih16GjycICEAE="),
        ] {
            let key = doc_key(uri, Some(etag), None, "schema", "model");
            assert!(set.contains(&key), "{key:?} not done in {set:?}");
        }
        // A changed object (another ETag) is not done.
        let changed = doc_key("s3://b/a.png", Some("\"ffff\""), None, "schema", "model");
        assert!(!set.contains(&changed));
    }
}
