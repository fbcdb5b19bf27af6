//! Reading what the sink committed, for every reader of an output (the state of incremental runs, `report`,
//! `eval`): one listing, one rule for which files are committed data, and one Parquet read that is made again
//! when it failed in the storage.

use crate::error::Retryable;
use std::sync::Arc;

use arrow::array::RecordBatch;
use futures::TryStreamExt;
use object_store::buffered::BufReader;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectMeta, ObjectStore};
use parquet::arrow::{ParquetRecordBatchStreamBuilder, ProjectionMask};

use super::SinkTarget;

/// Why a committed file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("reading {file}")]
    Store {
        file: String,
        #[source]
        source: object_store::Error,
    },
    #[error("reading {file}")]
    Parquet {
        file: String,
        #[source]
        source: parquet::errors::ParquetError,
    },
}

impl crate::error::Retryable for ReadError {
    /// The read failed in the storage for a reason that may pass (decided from the typed source); a damaged file
    /// fails the same way every time.
    fn is_retryable(&self) -> bool {
        match self {
            ReadError::Store { source, .. } => crate::store::worth_retrying(source),
            ReadError::Parquet { source, .. } => crate::store::failed_in_storage(source),
        }
    }
}

/// One object of the output: its path relative to the output's root, and what the store says of it.
#[derive(Debug, Clone)]
pub struct Entry {
    pub rel: String,
    pub meta: ObjectMeta,
}

impl Entry {
    pub fn name(&self) -> &str {
        self.rel.rsplit('/').next().unwrap_or(&self.rel)
    }

    /// Committed data (see [`super::is_committed_data_file`]).
    pub fn is_data(&self) -> bool {
        super::is_committed_data_file(self.name())
    }
}

/// An output opened for reading.
#[derive(Clone)]
pub struct Committed {
    store: Arc<dyn ObjectStore>,
    prefix: Option<ObjectPath>,
}

impl Committed {
    /// None for a local output folder that does not exist (nothing committed yet).
    pub fn open(target: &SinkTarget) -> Result<Option<Committed>, object_store::Error> {
        Ok(match target {
            SinkTarget::Local(dir) => {
                if !dir.is_dir() {
                    return Ok(None);
                }
                let fs = object_store::local::LocalFileSystem::new_with_prefix(dir)?;
                Some(Committed {
                    store: Arc::new(fs),
                    prefix: None,
                })
            }
            SinkTarget::Store { store, prefix, .. } => Some(Committed {
                store: store.clone(),
                prefix: (!prefix.as_ref().is_empty()).then(|| prefix.clone()),
            }),
        })
    }

    /// Every object under the output, hidden ones (uncommitted writes) left out. The whole listing is asked again
    /// when a page breaks off.
    pub async fn list(&self) -> Result<Vec<Entry>, object_store::Error> {
        let listing = crate::store::list_all(self.store.as_ref(), self.prefix.as_ref()).await?;
        Ok(listing
            .into_iter()
            .filter_map(|meta| {
                let rel = self.relative(&meta.location)?;
                let hidden = rel.split('/').any(|part| part.starts_with('.'));
                (!hidden).then_some(Entry { rel, meta })
            })
            .collect())
    }

    fn relative(&self, location: &ObjectPath) -> Option<String> {
        match &self.prefix {
            None => Some(location.to_string()),
            Some(p) => location.prefix_match(p).map(|parts| {
                parts
                    .map(|p| p.as_ref().to_string())
                    .collect::<Vec<_>>()
                    .join("/")
            }),
        }
    }

    /// The object's bytes (a read cut mid-way made again).
    pub async fn get(&self, entry: &Entry) -> Result<bytes::Bytes, ReadError> {
        crate::store::read_all(self.store.as_ref(), &entry.meta.location)
            .await
            .map_err(|source| ReadError::Store {
                file: entry.rel.clone(),
                source,
            })
    }

    /// A buffered reader over the object, for readers that stream.
    pub fn reader(&self, entry: &Entry) -> BufReader {
        BufReader::new(self.store.clone(), &entry.meta)
    }

    /// Reads a Parquet file's `columns`, batch by batch, into `on`. Ok(false): the file lacks a required column
    /// (not one of ours), or `on` stopped the read. A read that failed in the storage is made again from the start
    /// (object_store retries requests, not bodies cut mid-way), `on.restart()` called before each attempt.
    pub async fn read_parquet(
        &self,
        entry: &Entry,
        columns: Columns<'_>,
        on: &mut dyn OnBatches,
    ) -> Result<bool, ReadError> {
        let mut delays = crate::store::retry_delays();
        loop {
            on.restart();
            match self.read_once(entry, columns, on).await {
                Err(e) if e.is_retryable() => match delays.next() {
                    Some(delay) => tokio::time::sleep(delay).await,
                    None => return Err(e),
                },
                other => return other,
            }
        }
    }

    async fn read_once(
        &self,
        entry: &Entry,
        columns: Columns<'_>,
        on: &mut dyn OnBatches,
    ) -> Result<bool, ReadError> {
        let perr = |source| ReadError::Parquet {
            file: entry.rel.clone(),
            source,
        };
        let builder = ParquetRecordBatchStreamBuilder::new(self.reader(entry))
            .await
            .map_err(perr)?;
        let schema = builder.schema().clone();
        let mut indices = Vec::new();
        match columns {
            Columns::Named { required, optional } => {
                for c in required {
                    match schema.index_of(c) {
                        Ok(i) => indices.push(i),
                        Err(_) => return Ok(false),
                    }
                }
                indices.extend(optional.iter().filter_map(|c| schema.index_of(c).ok()));
            }
            Columns::AllBut(left_out) => indices.extend(
                (0..schema.fields().len())
                    .filter(|&i| !left_out.contains(&schema.field(i).name().as_str())),
            ),
        }
        let mask = ProjectionMask::roots(builder.parquet_schema(), indices);
        let mut stream = builder.with_projection(mask).build().map_err(perr)?;
        while let Some(batch) = stream.try_next().await.map_err(perr)? {
            if !on.batch(&batch) {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// Which columns a read takes (the fewer, the less is read: Parquet is columnar).
#[derive(Debug, Clone, Copy)]
pub enum Columns<'a> {
    /// These, and those of `optional` the file has; a file without one of `required` is not read.
    Named {
        required: &'a [&'a str],
        optional: &'a [&'a str],
    },
    /// Every column but these.
    AllBut(&'a [&'a str]),
}

/// What a read hands its batches to.
pub trait OnBatches: Send {
    /// Before each attempt: a read made again starts from the file's first batch.
    fn restart(&mut self) {}
    /// One batch; false stops the read (the receiver keeps why).
    fn batch(&mut self, batch: &RecordBatch) -> bool;
}
