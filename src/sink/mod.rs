//! The Parquet sink: Arrow record batches -> Parquet files on a local directory or an object store (S3).
//!
//! Layout under the target: `[<partition_key>=<YYYY-MM-DD>/]<file_prefix>-<run_id>-<NNNNN>.parquet` (Hive-style
//! partition by run date, key `dt` by default, or none), then `_manifest.json` (files, row counts, sizes, run
//! summary) and `_SUCCESS`, both written last, only when every file is complete.
//!
//! Files appear atomically:
//! - local: written to a hidden `.<name>.inprogress` beside the final name, fsynced, renamed, directory fsynced;
//!   an interrupted writer leaves no `*.parquet` (the hidden file is removed on drop or on [`ParquetSink::abort`],
//!   and readers skip dot-files anyway);
//! - object store: `object_store::buffered::BufWriter` to the final key: one PUT for a file smaller than the part
//!   size, else a multipart upload that becomes visible only when completed; an interrupted upload is aborted by
//!   [`ParquetSink::abort`] and is never visible in any case (S3 shows no object for an uncompleted upload).
//!
//! Files: ZSTD (level 3 by default), page-level statistics, row groups of `row_group_size` rows, a new file every
//! `max_rows_per_file` rows.

pub mod committed;
pub mod index;
pub mod lease;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use chrono::{DateTime, NaiveDate, Utc};
use object_store::buffered::BufWriter;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use parquet::arrow::AsyncArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("invalid sink target {target:?}: {reason}")]
    Target { target: String, reason: String },
    #[error("invalid sink target {target:?}")]
    Open {
        target: String,
        #[source]
        source: crate::store::StoreError,
    },
    #[error("cannot configure object store for {target}")]
    Store {
        target: String,
        #[source]
        source: object_store::Error,
    },
    #[error("local file {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {file}")]
    Parquet {
        file: String,
        #[source]
        source: parquet::errors::ParquetError,
    },
    #[error("object {key}")]
    Object {
        key: String,
        #[source]
        source: object_store::Error,
    },
    #[error("batch schema differs from the sink's schema: {0}")]
    SchemaMismatch(String),
    #[error("invalid sink configuration: {0}")]
    Config(String),
}

impl crate::error::Retryable for SinkError {
    /// A write or read the storage failed for a passing reason (decided from the object_store error inside);
    /// a bad target, a local I/O error (a full disk) or a schema mismatch fails the same way again.
    fn is_retryable(&self) -> bool {
        match self {
            SinkError::Object { source, .. } => crate::store::worth_retrying(source),
            SinkError::Parquet { source, .. } => crate::store::failed_in_storage(source),
            _ => false,
        }
    }
}

/// S3 (or S3-compatible) connection settings.
#[derive(Debug, Clone, Default)]
pub struct S3Config {
    pub bucket: String,
    /// e.g. `http://127.0.0.1:9000` for a local S3; None = AWS.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// Allow `http://` endpoints.
    pub allow_http: bool,
}

/// Where the files go.
#[derive(Clone)]
pub enum SinkTarget {
    Local(PathBuf),
    Store {
        store: Arc<dyn ObjectStore>,
        prefix: ObjectPath,
        /// For messages and the manifest (e.g. `s3://bucket/prefix`).
        url: String,
    },
}

impl std::fmt::Debug for SinkTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.url())
    }
}

impl SinkTarget {
    pub fn local(dir: impl Into<PathBuf>) -> Self {
        SinkTarget::Local(dir.into())
    }

    /// `s3://bucket/prefix` on the endpoint and credentials of `cfg` (its bucket is taken from the URL), for callers
    /// that configure S3 explicitly rather than from the environment: the production client (`store::open`, its
    /// retries and listing), with these settings over the environment's.
    pub fn s3(url: &str, cfg: &S3Config) -> Result<Self, SinkError> {
        if !url.starts_with("s3://") {
            return Err(SinkError::Target {
                target: url.into(),
                reason: "expected s3://bucket/prefix".into(),
            });
        }
        let mut options: Vec<(&str, &str)> = vec![("aws_virtual_hosted_style_request", "false")];
        if cfg.allow_http {
            options.push(("aws_allow_http", "true"));
        }
        for (key, value) in [
            ("aws_endpoint", &cfg.endpoint),
            ("aws_region", &cfg.region),
            ("aws_access_key_id", &cfg.access_key_id),
            ("aws_secret_access_key", &cfg.secret_access_key),
        ] {
            if let Some(v) = value {
                options.push((key, v));
            }
        }
        let opened = crate::store::open_with(url, &options).map_err(|source| SinkError::Open {
            target: url.into(),
            source,
        })?;
        Ok(SinkTarget::Store {
            url: opened.url(),
            store: opened.store,
            prefix: opened.prefix,
        })
    }

    /// A path, `file://` URL, or object-store URL (`s3://`, `gs://`, `az://`, `abfss://`), the stores configured
    /// from their standard environment (see [`crate::store`]).
    pub fn parse(target: &str) -> Result<Self, SinkError> {
        if crate::store::is_object_store(target) {
            let opened = crate::store::open(target).map_err(|source| SinkError::Open {
                target: target.into(),
                source,
            })?;
            Ok(SinkTarget::Store {
                url: opened.url(),
                store: opened.store,
                prefix: opened.prefix,
            })
        } else if let Some(p) = target.strip_prefix("file://") {
            Ok(Self::local(p))
        } else if target.contains("://") {
            Err(SinkError::Target {
                target: target.into(),
                reason: "supported: a local path, file://, s3://, gs://, az://, abfss://".into(),
            })
        } else {
            Ok(Self::local(target))
        }
    }

    pub fn url(&self) -> String {
        match self {
            SinkTarget::Local(p) => p.display().to_string(),
            SinkTarget::Store { url, .. } => url.clone(),
        }
    }

    /// Names of the objects (files) directly under `rel` (none when it does not exist).
    pub async fn list_names(&self, rel: &str) -> Result<Vec<String>, SinkError> {
        match self {
            SinkTarget::Local(root) => {
                let dir = root.join(rel);
                match std::fs::read_dir(&dir) {
                    Ok(entries) => Ok(entries
                        .flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .filter(|n| !n.starts_with('.'))
                        .collect()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
                    Err(source) => Err(SinkError::Io { path: dir, source }),
                }
            }
            SinkTarget::Store { store, prefix, .. } => {
                let key = join_key(prefix, rel);
                let listed = crate::store::list_all(store.as_ref(), Some(&key))
                    .await
                    .map_err(|source| SinkError::Object {
                        key: key.to_string(),
                        source,
                    })?;
                Ok(listed
                    .into_iter()
                    .filter_map(|m| m.location.filename().map(str::to_string))
                    .collect())
            }
        }
    }

    /// Deletes the object at `rel` (relative to the target); one already gone is no error.
    pub async fn delete(&self, rel: &str) -> Result<(), SinkError> {
        match self {
            SinkTarget::Local(root) => {
                let path = root.join(rel);
                match std::fs::remove_file(&path) {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    Err(source) => Err(SinkError::Io { path, source }),
                }
            }
            SinkTarget::Store { store, prefix, .. } => {
                let key = join_key(prefix, rel);
                match crate::store::retry_transient(|| store.delete(&key)).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                    Err(source) => Err(SinkError::Object {
                        key: key.to_string(),
                        source,
                    }),
                }
            }
        }
    }

    /// Writes a small object at `rel` (relative to the target) so that it appears whole or not at all: local via a
    /// hidden temporary file (named with `writer`, e.g. the run id, so concurrent writers of the same name never
    /// rename each other's file away), fsynced and renamed; object store via one PUT.
    pub async fn put_whole(
        &self,
        rel: &str,
        bytes: Vec<u8>,
        writer: &str,
    ) -> Result<(), SinkError> {
        match self {
            SinkTarget::Local(root) => {
                let path = root.join(rel);
                let io = |p: &Path| {
                    let p = p.to_path_buf();
                    move |source| SinkError::Io { path: p, source }
                };
                if let Some(d) = path.parent() {
                    std::fs::create_dir_all(d).map_err(io(d))?;
                }
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                // Per run: concurrent shards all write the partition's `_SUCCESS`, and a shared temporary name
                // would let one writer rename another's file away (seen as ENOENT under 4 concurrent shards).
                let tmp = path.with_file_name(format!(".{name}.{writer}.inprogress"));
                std::fs::write(&tmp, &bytes).map_err(io(&tmp))?;
                publish_local(&tmp, &path).map(|_| ())
            }
            SinkTarget::Store { store, prefix, .. } => {
                let key = join_key(prefix, rel);
                store
                    .put(&key, PutPayload::from(bytes))
                    .await
                    .map(|_| ())
                    .map_err(|source| SinkError::Object {
                        key: key.to_string(),
                        source,
                    })
            }
        }
    }
}

/// How files are laid out and encoded.
#[derive(Debug, Clone)]
pub struct SinkConfig {
    /// Hive partition key for the run date (`dt=2024-03-07/`); None writes at the top of the target.
    pub partition_key: Option<String>,
    /// The run date used in the partition (UTC date of the run start by default).
    pub partition_date: NaiveDate,
    pub file_prefix: String,
    pub max_rows_per_file: usize,
    pub row_group_size: usize,
    pub zstd_level: i32,
    /// Object stores: bytes buffered before switching from one PUT to a multipart upload (also the part size).
    pub part_size: usize,
}

impl Default for SinkConfig {
    fn default() -> Self {
        SinkConfig {
            partition_key: Some("dt".into()),
            partition_date: Utc::now().date_naive(),
            file_prefix: "part".into(),
            max_rows_per_file: 1_000_000,
            // Extraction rows are a few KB: 64k rows is ~100+ MB before compression, a good scan unit.
            row_group_size: 65_536,
            zstd_level: 3,
            part_size: 10 * 1024 * 1024,
        }
    }
}

/// One written file, as the manifest lists it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileEntry {
    /// Relative to the target.
    pub path: String,
    pub rows: u64,
    pub bytes: u64,
    pub row_groups: usize,
}

/// `_manifest.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SinkManifest {
    pub format: String,
    pub run_id: String,
    pub target: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub files: Vec<FileEntry>,
    pub total_rows: u64,
    /// Caller's run summary (counts by status, timings, model, schema...).
    pub summary: serde_json::Value,
}

enum OpenFile {
    Local {
        writer: Option<AsyncArrowWriter<tokio::fs::File>>,
        tmp: PathBuf,
        final_path: PathBuf,
        rel: String,
        rows: u64,
    },
    Store {
        writer: Option<AsyncArrowWriter<BufWriter>>,
        key: ObjectPath,
        rel: String,
        rows: u64,
    },
}

impl OpenFile {
    fn rows(&self) -> u64 {
        match self {
            OpenFile::Local { rows, .. } | OpenFile::Store { rows, .. } => *rows,
        }
    }
}

impl Drop for OpenFile {
    fn drop(&mut self) {
        // An unfinished local file is removed; an unfinished upload was never visible.
        if let OpenFile::Local { writer, tmp, .. } = self
            && writer.is_some()
        {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

/// Whether a file named `name` under an output is committed data, the one rule every reader of the output uses (the
/// output state of incremental runs, `eval`, `report`): a `.parquet` file that is neither hidden (the sink writes
/// into `.<name>.inprogress` and renames or completes the upload only when the file is whole) nor `_`-prefixed
/// (`_manifest-*.json`, `_SUCCESS`: bookkeeping, not rows).
pub fn is_committed_data_file(name: &str) -> bool {
    name.ends_with(".parquet") && !name.starts_with('.') && !name.starts_with('_')
}

/// What a finished run commits after its manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Commit {
    /// The run stopped early (signal, failure budget, a failing model): manifest only, no `_SUCCESS`.
    Stopped,
    /// The whole job is this run: `_SUCCESS`.
    Whole,
    /// Shard `index` of `count` of job `job`: `_SUCCESS` once every shard of the job has completed.
    Shard { job: String, index: u64, count: u64 },
}

/// Writes record batches of one schema as Parquet files, then the manifest and `_SUCCESS`.
pub struct ParquetSink {
    target: SinkTarget,
    config: SinkConfig,
    schema: SchemaRef,
    run_id: String,
    started_at: DateTime<Utc>,
    current: Option<OpenFile>,
    /// The document keys the open file's rows cover, for its index sidecar; None once a batch without pixtract's
    /// provenance columns was written (no sidecar then: the next run reads the file itself).
    covers: Option<index::FileCovers>,
    files: Vec<FileEntry>,
    seq: usize,
}

impl ParquetSink {
    pub fn new(
        target: SinkTarget,
        config: SinkConfig,
        schema: SchemaRef,
        run_id: &str,
    ) -> Result<Self, SinkError> {
        if config.max_rows_per_file == 0 || config.row_group_size == 0 {
            return Err(SinkError::Config(
                "max_rows_per_file and row_group_size must be > 0".into(),
            ));
        }
        if run_id.is_empty() || run_id.contains(['/', '\\']) {
            return Err(SinkError::Config(format!(
                "run id {run_id:?} must be non-empty without slashes"
            )));
        }
        if config.part_size < 5 * 1024 * 1024 {
            return Err(SinkError::Config(
                "part_size below 5 MiB: S3 refuses multipart parts that small".into(),
            ));
        }
        Ok(ParquetSink {
            target,
            config,
            schema,
            run_id: run_id.to_string(),
            started_at: Utc::now(),
            current: None,
            covers: None,
            files: Vec::new(),
            seq: 0,
        })
    }

    pub fn files(&self) -> &[FileEntry] {
        &self.files
    }

    /// The partition directory, relative to the target (`dt=2024-03-07` or empty).
    pub fn partition_dir(&self) -> String {
        match &self.config.partition_key {
            Some(k) => format!("{k}={}", self.config.partition_date.format("%Y-%m-%d")),
            None => String::new(),
        }
    }

    fn properties(&self) -> Result<WriterProperties, SinkError> {
        let level = ZstdLevel::try_new(self.config.zstd_level).map_err(|e| {
            SinkError::Config(format!("zstd level {}: {e}", self.config.zstd_level))
        })?;
        Ok(WriterProperties::builder()
            .set_compression(Compression::ZSTD(level))
            .set_statistics_enabled(EnabledStatistics::Page)
            .set_max_row_group_row_count(Some(self.config.row_group_size))
            .set_created_by(format!("pixtract {}", env!("CARGO_PKG_VERSION")))
            .build())
    }

    async fn open(&mut self) -> Result<(), SinkError> {
        let name = format!(
            "{}-{}-{:05}.parquet",
            self.config.file_prefix, self.run_id, self.seq
        );
        self.seq += 1;
        let dir = self.partition_dir();
        let rel = if dir.is_empty() {
            name.clone()
        } else {
            format!("{dir}/{name}")
        };
        let props = self.properties()?;
        self.covers = Some(index::FileCovers::default());
        let perr = |file: &str| {
            let file = file.to_string();
            move |source| SinkError::Parquet { file, source }
        };
        self.current = Some(match &self.target {
            SinkTarget::Local(root) => {
                let d = root.join(&dir);
                tokio::fs::create_dir_all(&d)
                    .await
                    .map_err(|source| SinkError::Io {
                        path: d.clone(),
                        source,
                    })?;
                let tmp = d.join(format!(".{name}.inprogress"));
                let file = tokio::fs::File::create(&tmp)
                    .await
                    .map_err(|source| SinkError::Io {
                        path: tmp.clone(),
                        source,
                    })?;
                let writer = AsyncArrowWriter::try_new(file, self.schema.clone(), Some(props))
                    .map_err(perr(&rel))?;
                OpenFile::Local {
                    writer: Some(writer),
                    tmp,
                    final_path: d.join(&name),
                    rel,
                    rows: 0,
                }
            }
            SinkTarget::Store { store, prefix, .. } => {
                let key = join_key(prefix, &rel);
                let buf =
                    BufWriter::with_capacity(store.clone(), key.clone(), self.config.part_size);
                let writer = AsyncArrowWriter::try_new(buf, self.schema.clone(), Some(props))
                    .map_err(perr(&rel))?;
                OpenFile::Store {
                    writer: Some(writer),
                    key,
                    rel,
                    rows: 0,
                }
            }
        });
        Ok(())
    }

    /// Appends a batch that must not be split across files (e.g. all rows of some documents, so that a crash
    /// between two files never commits half a document): if it does not fit in the open file, that file is
    /// closed first; a batch larger than `max_rows_per_file` gets a file of its own. `max_rows_per_file` is then
    /// a soft limit.
    pub async fn write_unit(&mut self, batch: &RecordBatch) -> Result<(), SinkError> {
        let open_rows = self.current.as_ref().map_or(0, OpenFile::rows);
        if open_rows > 0
            && open_rows + batch.num_rows() as u64 > self.config.max_rows_per_file as u64
        {
            self.close_current().await?;
        }
        let limit = self.config.max_rows_per_file;
        self.config.max_rows_per_file = limit.max(batch.num_rows());
        let result = self.write(batch).await;
        self.config.max_rows_per_file = limit;
        result?;
        if self.current.as_ref().map_or(0, OpenFile::rows) >= limit as u64 {
            self.close_current().await?;
        }
        Ok(())
    }

    /// Appends a batch (its schema must be the sink's); starts a new file past `max_rows_per_file`.
    pub async fn write(&mut self, batch: &RecordBatch) -> Result<(), SinkError> {
        if batch.schema().fields() != self.schema.fields() {
            return Err(SinkError::SchemaMismatch(format!(
                "batch has {} columns ({:?}...), the sink {}",
                batch.num_columns(),
                batch
                    .schema()
                    .fields()
                    .iter()
                    .take(3)
                    .map(|f| f.name())
                    .collect::<Vec<_>>(),
                self.schema.fields().len()
            )));
        }
        let mut offset = 0;
        while offset < batch.num_rows() {
            if self.current.is_none() {
                self.open().await?;
            }
            let room = self.config.max_rows_per_file as u64
                - self.current.as_ref().map_or(0, OpenFile::rows);
            let take = (room as usize).min(batch.num_rows() - offset);
            let part = batch.slice(offset, take);
            let result = match self.current.as_mut() {
                Some(OpenFile::Local {
                    writer: Some(w),
                    rel,
                    rows,
                    ..
                }) => (w.write(&part).await, rel, rows),
                Some(OpenFile::Store {
                    writer: Some(w),
                    rel,
                    rows,
                    ..
                }) => (w.write(&part).await, rel, rows),
                _ => return Err(SinkError::Config("no open file".into())),
            };
            match result {
                (Err(source), rel, _) => {
                    return Err(SinkError::Parquet {
                        file: rel.clone(),
                        source,
                    });
                }
                (Ok(()), _, rows) => *rows += take as u64,
            }
            if let Some(covers) = self.covers.as_mut()
                && !covers.add_batch(&part)
            {
                self.covers = None;
            }
            offset += take;
            if self.current.as_ref().map_or(0, OpenFile::rows)
                >= self.config.max_rows_per_file as u64
            {
                self.close_current().await?;
            }
        }
        Ok(())
    }

    /// Completes the open file and makes it visible under its final name.
    async fn close_current(&mut self) -> Result<(), SinkError> {
        let Some(mut file) = self.current.take() else {
            return Ok(());
        };
        let entry = match &mut file {
            OpenFile::Local {
                writer,
                tmp,
                final_path,
                rel,
                rows,
            } => {
                let w = writer
                    .take()
                    .ok_or_else(|| SinkError::Config("closed twice".into()))?;
                let meta = match w.close().await {
                    Ok(m) => m,
                    Err(source) => {
                        let _ = std::fs::remove_file(&*tmp);
                        return Err(SinkError::Parquet {
                            file: rel.clone(),
                            source,
                        });
                    }
                };
                let bytes = publish_local(tmp, final_path)?;
                FileEntry {
                    path: rel.clone(),
                    rows: *rows,
                    bytes,
                    row_groups: meta.num_row_groups(),
                }
            }
            OpenFile::Store {
                writer,
                key,
                rel,
                rows,
            } => {
                let w = writer
                    .take()
                    .ok_or_else(|| SinkError::Config("closed twice".into()))?;
                let meta = w.close().await.map_err(|source| SinkError::Parquet {
                    file: rel.clone(),
                    source,
                })?;
                let SinkTarget::Store { store, .. } = &self.target else {
                    return Err(SinkError::Config("store file on a local target".into()));
                };
                let head = store.head(key).await.map_err(|source| SinkError::Object {
                    key: key.to_string(),
                    source,
                })?;
                FileEntry {
                    path: rel.clone(),
                    rows: *rows,
                    bytes: head.size,
                    row_groups: meta.num_row_groups(),
                }
            }
        };
        self.write_sidecar(&entry).await;
        self.files.push(entry);
        Ok(())
    }

    /// The committed file's index sidecar ([`index`]). A cache: when it cannot be written the next run reads the
    /// file itself, so a failure is a warning.
    async fn write_sidecar(&mut self, entry: &FileEntry) {
        let Some(covers) = self.covers.take().filter(|c| !c.is_empty()) else {
            return;
        };
        let file = index::IndexedFile {
            path: entry.path.clone(),
            bytes: entry.bytes,
        };
        let name = index::sidecar_name(&entry.path);
        // Through the target, not `put_small`: a borrow of the whole sink (not `Sync`) would make the writer's
        // future not `Send`.
        let written = self
            .target
            .put_whole(&name, covers.encode(&file), &self.run_id)
            .await;
        if let Err(e) = written {
            tracing::warn!(sidecar = %name, error = %crate::error::chain(&e), "cannot write the index sidecar; the next run reads the file itself");
        }
    }

    /// Completes the last file, then writes `_manifest.json` and finally, as `commit` says, `_SUCCESS` (in the
    /// partition directory).
    pub async fn finish(
        mut self,
        summary: serde_json::Value,
        commit: Commit,
    ) -> Result<SinkManifest, SinkError> {
        self.close_current().await?;
        let manifest = SinkManifest {
            format: "pixtract-sink/1".into(),
            run_id: self.run_id.clone(),
            target: self.target.url(),
            started_at: self.started_at,
            finished_at: Utc::now(),
            total_rows: self.files.iter().map(|f| f.rows).sum(),
            files: self.files.clone(),
            summary,
        };
        let json = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| SinkError::Config(format!("manifest JSON: {e}")))?;
        let dir = self.partition_dir();
        let rel = |name: &str| {
            if dir.is_empty() {
                name.to_string()
            } else {
                format!("{dir}/{name}")
            }
        };
        let manifest_name = format!("_manifest-{}.json", self.run_id);
        self.put_small(&rel(&manifest_name), json).await?;
        let complete = match &commit {
            Commit::Stopped => false,
            Commit::Whole => true,
            Commit::Shard { job, index, count } => {
                // Each shard leaves a marker at the output's root (shards of one job may write different
                // partitions: a job running past midnight), naming its partition, then lists the markers: whichever
                // finishes last sees all of them (object stores list what was written before, S3 and GCS
                // strongly) and writes `_SUCCESS` into every partition of the job. Two shards finishing together
                // may both write them: the same empty objects, so no conditional put is needed for `_SUCCESS` to
                // appear exactly when the job is complete.
                let markers = format!("_job-{job}");
                let marker = format!("{markers}/shard-{index}-of-{count}@{}", encode_marker(&dir));
                self.put_small(&marker, Vec::new()).await?;
                let suffix = format!("-of-{count}");
                let mut shards = std::collections::BTreeSet::new();
                let mut partitions = std::collections::BTreeSet::new();
                for name in self.target.list_names(&markers).await? {
                    let Some((shard, partition)) = name.split_once('@') else {
                        continue;
                    };
                    if let Some(i) = shard
                        .strip_prefix("shard-")
                        .and_then(|s| s.strip_suffix(&suffix))
                    {
                        shards.insert(i.to_string());
                        partitions.insert(decode_marker(partition));
                    }
                }
                if shards.len() as u64 >= *count {
                    for partition in partitions.iter().filter(|p| **p != dir) {
                        let success = if partition.is_empty() {
                            "_SUCCESS".to_string()
                        } else {
                            format!("{partition}/_SUCCESS")
                        };
                        self.put_small(&success, Vec::new()).await?;
                    }
                    true
                } else {
                    false
                }
            }
        };
        if complete {
            self.put_small(&rel("_SUCCESS"), Vec::new()).await?;
        }
        Ok(manifest)
    }

    /// Whole-object write: local via temp + rename, object store via one PUT.
    async fn put_small(&self, rel: &str, bytes: Vec<u8>) -> Result<(), SinkError> {
        self.target.put_whole(rel, bytes, &self.run_id).await
    }

    /// Writes and removes a small probe object (`.pixtract-write-check-<run id>`) in the output, so an output that
    /// cannot be written (permissions, missing bucket, read-only mount) fails the run before the model starts,
    /// not after hours of work.
    pub async fn check_writable(&self) -> Result<(), SinkError> {
        let rel = format!(".pixtract-write-check-{}", self.run_id);
        self.put_small(&rel, b"probe".to_vec()).await?;
        match &self.target {
            SinkTarget::Local(root) => {
                let path = root.join(&rel);
                std::fs::remove_file(&path).map_err(|source| SinkError::Io { path, source })
            }
            SinkTarget::Store { store, prefix, .. } => {
                let key = join_key(prefix, &rel);
                // The probe was written: the output is writable. A delete that still fails (transiently) leaves a
                // hidden probe behind, which readers skip; it must not stop the run.
                match crate::store::retry_transient(|| store.delete(&key)).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => {
                        tracing::warn!(probe = %key, error = %crate::error::chain(&e), "cannot delete the output's write probe; it stays (hidden)")
                    }
                }
                Ok(())
            }
        }
    }

    /// Gives up the open file: local temp file removed, multipart upload aborted. Completed files stay, and no
    /// `_SUCCESS` is written.
    pub async fn abort(mut self) -> Result<(), SinkError> {
        if let Some(mut file) = self.current.take() {
            match &mut file {
                OpenFile::Local { writer, tmp, .. } => {
                    writer.take();
                    let _ = std::fs::remove_file(&*tmp);
                }
                OpenFile::Store { writer, key, .. } => {
                    if let Some(w) = writer.take() {
                        let mut buf = w.into_inner();
                        buf.abort().await.map_err(|source| SinkError::Object {
                            key: key.to_string(),
                            source,
                        })?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// A partition folder inside a marker's name: `%`, `/` and `@` escaped.
fn encode_marker(partition: &str) -> String {
    partition
        .replace('%', "%25")
        .replace('/', "%2F")
        .replace('@', "%40")
}

fn decode_marker(encoded: &str) -> String {
    encoded
        .replace("%40", "@")
        .replace("%2F", "/")
        .replace("%25", "%")
}

fn join_key(prefix: &ObjectPath, rel: &str) -> ObjectPath {
    let p = prefix.as_ref();
    if p.is_empty() {
        ObjectPath::from(rel)
    } else {
        ObjectPath::from(format!("{p}/{rel}"))
    }
}

/// Makes a fully written local temporary file visible under its final name: fsync the file, rename, fsync the
/// directory (so the rename itself survives a power cut). Returns the file's size. One path for data files, the
/// manifest and `_SUCCESS` alike.
fn publish_local(tmp: &Path, final_path: &Path) -> Result<u64, SinkError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SinkError::Io { path, source }
    };
    std::fs::File::open(tmp)
        .and_then(|f| f.sync_all())
        .map_err(io(tmp))?;
    let bytes = std::fs::metadata(tmp).map_err(io(tmp))?.len();
    std::fs::rename(tmp, final_path).map_err(io(final_path))?;
    if let Some(dir) = final_path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir))?;
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::is_committed_data_file;

    #[test]
    fn only_whole_data_files_are_committed() {
        assert!(is_committed_data_file(
            "part-20261204T000000Z-ab12-00000.parquet"
        ));
        assert!(!is_committed_data_file(
            ".part-x-00000.parquet.run1.inprogress"
        ));
        assert!(!is_committed_data_file(".part-x-00000.parquet"));
        assert!(!is_committed_data_file("_manifest-run1.json"));
        assert!(!is_committed_data_file("_SUCCESS"));
        assert!(!is_committed_data_file("_x.parquet"));
        assert!(!is_committed_data_file("notes.txt"));
    }
}
