//! What earlier runs already did, read from the output itself (the single source of truth): every visible
//! Parquet file is complete (files appear atomically), and its rows say which document, at which ETag/version,
//! with which schema and model, covered which pages.
//!
//! The index under `_index/` ([`crate::sink::index`]) makes this cost what the new work costs: the newest fold
//! holds every key done in the files it names, each later file has a sidecar, and only a file with neither is read
//! itself. The index is checked against the listing: a fold naming a file the output no longer has (a partition
//! deleted by hand to force a redo) is not used, and the state is rebuilt from the sidecars and files that remain.

use crate::error::Retryable;
use std::collections::{BTreeMap, HashMap, HashSet};

use futures::StreamExt;

use crate::sink::SinkTarget;
use crate::sink::committed::{Columns, Committed, Entry, OnBatches, ReadError};
use crate::sink::index::{self, DoneIndex, FileCovers, IndexError, IndexedFile};
pub use crate::sink::index::{DocKey, doc_key, normalise_etag};

/// Why the output's earlier state could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot list the output")]
    Store(#[from] object_store::Error),
    #[error("cannot read the output's committed files")]
    Read(#[from] ReadError),
    #[error("cannot write the output's index")]
    Sink(#[from] crate::sink::SinkError),
}

/// How the state is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StateRead {
    /// The index where it is current, the files where it is not.
    #[default]
    Index,
    /// Every committed file itself, the index ignored (how runs read the state before the index; `bench state`).
    Files,
}

/// Sidecars fetched at once: small objects, where a store's round trip is the cost.
const SIDECAR_FETCHES: usize = 16;

#[derive(Debug, Default)]
pub struct ProcessedSet {
    index: DoneIndex,
    /// Every data file whose rows the state holds, at the size the listing showed (what a fold written from this
    /// state names).
    files: Vec<IndexedFile>,
    /// Folds in the output at start-up (oldest first).
    folds: Vec<String>,
    /// The fold used, and how many files it covered.
    pub fold: Option<(String, usize)>,
    /// Why the newest fold was not used (it names files the output no longer has).
    pub stale: Option<String>,
    /// Sidecars read (files after the fold).
    pub sidecars_read: usize,
    /// Data files read themselves (no index covered them).
    pub files_read: usize,
    /// `.parquet` files in the output that could not be read or are not pixtract's (ignored with a warning).
    pub skipped_files: Vec<String>,
}

impl ProcessedSet {
    /// Transient failures recorded for this document by earlier runs (0: none).
    pub fn attempts(&self, key: &DocKey) -> u32 {
        self.index.attempts(key)
    }

    pub fn contains(&self, key: &DocKey) -> bool {
        self.index.contains(key)
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Whether a new fold would spare the next run work: files were read outside the fold.
    pub fn fold_worth_writing(&self) -> bool {
        !self.files.is_empty() && (self.sidecars_read + self.files_read > 0 || self.stale.is_some())
    }

    /// How the state was read, in a line.
    pub fn describe(&self) -> String {
        let fold = match &self.fold {
            Some((name, files)) => format!("index {name} ({files} files)"),
            None => "no index".to_string(),
        };
        let stale = self
            .stale
            .as_ref()
            .map(|s| format!("; index not used: {s}"))
            .unwrap_or_default();
        format!(
            "{} documents done: {fold}, {} sidecars, {} files read{stale}",
            self.len(),
            self.sidecars_read,
            self.files_read
        )
    }
}

/// A fold's files, checked against the listing.
enum FoldCheck {
    /// Every file it names is there at its size: its keys were read.
    Current(DoneIndex, Vec<IndexedFile>),
    /// It names a file the output no longer has, or has at another size.
    Stale(String),
}

/// Reads the output's state: done documents and transient attempts. Unreadable or foreign `.parquet` files are
/// skipped with a warning, unusable index objects too (their files are read instead); a listing or a read that
/// keeps failing in the storage is an error (skipping a committed file would redo its documents).
pub async fn read_processed(
    target: &SinkTarget,
    mode: StateRead,
) -> Result<ProcessedSet, StateError> {
    let Some(out) = Committed::open(target)? else {
        return Ok(ProcessedSet::default());
    };
    let listing = out.list().await?;
    let mut data: BTreeMap<&str, &Entry> = BTreeMap::new();
    let mut sidecars: HashMap<String, &Entry> = HashMap::new();
    let mut folds: Vec<&Entry> = Vec::new();
    for entry in &listing {
        if entry.is_data() {
            data.insert(&entry.rel, entry);
        } else if index::is_fold(&entry.rel) {
            folds.push(entry);
        } else if let Some(file) = index::data_file_of_sidecar(&entry.rel) {
            sidecars.insert(file, entry);
        }
    }
    folds.sort_by(|a, b| a.rel.cmp(&b.rel));
    let mut set = ProcessedSet {
        folds: folds.iter().map(|f| f.rel.clone()).collect(),
        ..ProcessedSet::default()
    };
    let mut covered: HashSet<String> = HashSet::new();
    if mode == StateRead::Index {
        // The newest usable fold; an older one is only tried when a newer is damaged (a stale fold's elders are
        // staler).
        for fold in folds.iter().rev() {
            match read_fold(&out, fold, &data).await {
                Ok(FoldCheck::Current(index, files)) => {
                    set.fold = Some((fold.rel.clone(), files.len()));
                    set.index = index;
                    covered = files.iter().map(|f| f.path.clone()).collect();
                    set.files = files;
                    break;
                }
                Ok(FoldCheck::Stale(reason)) => {
                    tracing::info!(fold = %fold.rel, "{reason}: the state is rebuilt from the files");
                    set.stale = Some(reason);
                    break;
                }
                Err(e) => {
                    tracing::warn!(fold = %fold.rel, error = %crate::error::chain(&e), "unusable index fold: ignored");
                }
            }
        }
    }
    let rest: Vec<&Entry> = data
        .values()
        .copied()
        .filter(|e| !covered.contains(&e.rel))
        .collect();
    let (with_sidecar, mut without): (Vec<&Entry>, Vec<&Entry>) = rest
        .into_iter()
        .partition(|e| mode == StateRead::Index && sidecars.contains_key(&e.rel));
    let mut fetched = futures::stream::iter(with_sidecar.into_iter().map(|file| {
        let (out, side) = (&out, sidecars[&file.rel]);
        async move { (file, read_sidecar(out, side, file).await) }
    }))
    .buffered(SIDECAR_FETCHES);
    while let Some((file, read)) = fetched.next().await {
        match read {
            Ok(Some(covers)) => {
                set.index.absorb_index(covers);
                set.sidecars_read += 1;
                set.files.push(indexed(file));
            }
            Ok(None) => without.push(file),
            Err(e) => {
                tracing::warn!(file = %file.rel, error = %crate::error::chain(&e), "unusable index sidecar: the file is read instead");
                without.push(file);
            }
        }
    }
    for file in without {
        let mut covers = CoverBatches::default();
        let columns = Columns::Named {
            required: &FileCovers::REQUIRED,
            optional: &FileCovers::OPTIONAL,
        };
        match out.read_parquet(file, columns, &mut covers).await {
            Ok(true) => {
                set.index.absorb_file(covers.0);
                set.files_read += 1;
                set.files.push(indexed(file));
            }
            Ok(_) => {
                tracing::warn!(file = %file.rel, "not a pixtract output file (other columns): ignored");
                set.skipped_files.push(file.rel.clone());
            }
            Err(e) if e.is_retryable() => return Err(e.into()),
            Err(e) => {
                tracing::warn!(file = %file.rel, error = %crate::error::chain(&e), "unreadable Parquet file in the output: ignored");
                set.skipped_files.push(file.rel.clone());
            }
        }
    }
    Ok(set)
}

/// A data file's rows read into covers; stops at a batch that is not pixtract's.
#[derive(Default)]
struct CoverBatches(FileCovers);

impl OnBatches for CoverBatches {
    fn restart(&mut self) {
        self.0 = FileCovers::default();
    }

    fn batch(&mut self, batch: &arrow::array::RecordBatch) -> bool {
        self.0.add_batch(batch)
    }
}

fn indexed(file: &Entry) -> IndexedFile {
    IndexedFile {
        path: file.rel.clone(),
        bytes: file.meta.size,
    }
}

/// Why an index object was not used.
#[derive(Debug, thiserror::Error)]
enum UnusableIndex {
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error(transparent)]
    Index(#[from] IndexError),
}

/// Reads a fold: first the files it names (checked against the listing), then, when they are all there, its keys,
/// streamed (a year of history is tens of megabytes: never held twice).
async fn read_fold(
    out: &Committed,
    fold: &Entry,
    data: &BTreeMap<&str, &Entry>,
) -> Result<FoldCheck, UnusableIndex> {
    let mut reader = tokio::io::BufReader::with_capacity(1 << 20, out.reader(fold));
    let size = fold.meta.size;
    let files = index::read_files(&mut reader, size).await?;
    for f in &files {
        match data.get(f.path.as_str()) {
            None => {
                return Ok(FoldCheck::Stale(format!(
                    "{} names {}, which the output no longer has",
                    fold.rel, f.path
                )));
            }
            Some(e) if e.meta.size != f.bytes => {
                return Ok(FoldCheck::Stale(format!(
                    "{} names {} at {} bytes, the output has {}",
                    fold.rel, f.path, f.bytes, e.meta.size
                )));
            }
            Some(_) => {}
        }
    }
    let mut index = DoneIndex::default();
    index::read_covers(&mut reader, size, &mut index).await?;
    Ok(FoldCheck::Current(index, files))
}

/// Reads a data file's sidecar. Ok(None): it is not for this file as the listing shows it (another size).
async fn read_sidecar(
    out: &Committed,
    sidecar: &Entry,
    file: &Entry,
) -> Result<Option<DoneIndex>, UnusableIndex> {
    let bytes = out.get(sidecar).await?;
    let size = bytes.len() as u64;
    let mut reader = bytes.as_ref();
    let files = index::read_files(&mut reader, size).await?;
    if files != [indexed(file)] {
        return Ok(None);
    }
    let mut index = DoneIndex::default();
    index::read_covers(&mut reader, size, &mut index).await?;
    Ok(Some(index))
}

/// Writes a fold of `set` as run `run_id`'s (`_index/_fold-<run id>.pxi`), then deletes the folds older than the
/// one `set` was read from (that one stays: a run starting now may be reading it). Returns the fold's name.
pub async fn write_fold(
    target: &SinkTarget,
    set: &ProcessedSet,
    run_id: &str,
) -> Result<String, StateError> {
    let name = index::fold_name(run_id);
    let bytes = set.index.encode(&set.files);
    target.put_whole(&name, bytes, run_id).await?;
    let used = set.fold.as_ref().map(|(f, _)| f.as_str());
    for old in set
        .folds
        .iter()
        .filter(|f| **f < name && Some(f.as_str()) != used)
    {
        target.delete(old).await?;
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{ArrayRef, Int32Array, RecordBatch, StringArray};
    use arrow::datatypes::{Field, Schema};

    use crate::extract::values::provenance::{
        DOC_PAGE_COUNT, MODEL_ID, PAGE_END, PAGE_START, SCHEMA_SHA256, SOURCE_ETAG, SOURCE_URI,
        SOURCE_VERSION,
    };

    use super::*;

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
        let set = read_processed(
            &SinkTarget::Local(tmp.path().to_path_buf()),
            StateRead::Index,
        )
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
