//! Document intake, first half: where documents live (local folders, S3 and S3-compatible stores) and getting
//! their bytes, through `object_store`.
//!
//! - [`Source::open`] takes a local path, `file://...`, or an object-store URL (`s3://`, `gs://`, `az://`,
//!   `abfss://`; opened by [`crate::store`] from each cloud's standard environment). A URI naming one object or
//!   file is a source of one document.
//! - [`Source::list`] is a stream (the store pages through the listing; nothing is collected), filtered by
//!   include/exclude globs; objects over the size limit come out as errors rather than vanishing.
//! - [`Source::fetch_all`] fetches listed documents with bounded concurrency, in listing order.

use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt};

pub use crate::document::{DocumentInfo, FetchError};
pub use local::escape_name;

mod local;
mod paged;

#[derive(Debug, Clone, thiserror::Error)]
pub enum SourceError {
    #[error("{uri}: not a usable source URI: {reason}")]
    BadUri { uri: String, reason: String },
    #[error("{uri}: not a usable source URI")]
    Store {
        uri: String,
        #[source]
        source: crate::store::StoreError,
    },
    #[error(
        "{uri}: {scheme}:// sources are not supported: use a local path, file://, s3://, gs:// or az://"
    )]
    UnsupportedScheme { uri: String, scheme: String },
    #[error("{uri}: no such file, directory, object or prefix")]
    NotFound { uri: String },
    #[error("bad glob {pattern:?}: {reason}")]
    BadGlob { pattern: String, reason: String },
    /// The listing cannot go on: the run fails (no `_SUCCESS`).
    #[error("{uri}: cannot list: {reason}")]
    List { uri: String, reason: String },
    /// One listed entry is skipped (odd name, link, FIFO, unreadable folder): it gets an error row of its own
    /// and the listing goes on.
    #[error("{uri}: {reason}")]
    Entry { uri: String, reason: String },
    #[error("{uri}: cannot fetch: {reason}")]
    Fetch { uri: String, reason: String },
    /// A fetch failed for a reason that may pass (server error, reset, throttling, timeout) after the store's
    /// own retries.
    #[error("{uri}: cannot fetch (storage unavailable): {reason}")]
    Unavailable { uri: String, reason: String },
    #[error("{uri}: {size} bytes is over the limit of {limit} bytes per document")]
    TooLarge { uri: String, size: u64, limit: u64 },
}

impl crate::error::Retryable for SourceError {
    /// A fetch the storage failed for a passing reason after its own retries.
    fn is_retryable(&self) -> bool {
        matches!(self, SourceError::Unavailable { .. })
    }
}

impl SourceError {
    pub fn uri(&self) -> Option<&str> {
        match self {
            SourceError::BadUri { uri, .. }
            | SourceError::Store { uri, .. }
            | SourceError::UnsupportedScheme { uri, .. }
            | SourceError::NotFound { uri }
            | SourceError::List { uri, .. }
            | SourceError::Entry { uri, .. }
            | SourceError::Fetch { uri, .. }
            | SourceError::Unavailable { uri, .. }
            | SourceError::TooLarge { uri, .. } => Some(uri),
            SourceError::BadGlob { .. } => None,
        }
    }

    /// Whether this error ends the listing (the run fails) rather than one entry (an error row).
    pub fn is_fatal(&self) -> bool {
        !matches!(
            self,
            SourceError::Entry { .. }
                | SourceError::Fetch { .. }
                | SourceError::Unavailable { .. }
                | SourceError::TooLarge { .. }
        )
    }
}

/// Ends a listing (or fetch) stream at its first fatal error ([`SourceError::is_fatal`]) and keeps that error in
/// the returned slot, so the caller can fail the run once the documents before it are done.
pub fn stop_at_fatal<S, T>(
    stream: S,
) -> (
    impl Stream<Item = Result<T, SourceError>> + Send + 'static,
    Arc<std::sync::Mutex<Option<SourceError>>>,
)
where
    S: Stream<Item = Result<T, SourceError>> + Send + 'static,
    T: Send + 'static,
{
    let slot = Arc::new(std::sync::Mutex::new(None));
    let keep = slot.clone();
    let stream = stream.take_while(move |item| {
        let go = match item {
            Err(e) if e.is_fatal() => {
                if let Ok(mut s) = keep.lock() {
                    s.get_or_insert_with(|| e.clone());
                }
                false
            }
            _ => true,
        };
        futures::future::ready(go)
    });
    (stream, slot)
}

impl From<SourceError> for FetchError {
    fn from(e: SourceError) -> FetchError {
        match e {
            SourceError::TooLarge { uri, size, limit } => FetchError::TooLarge { uri, size, limit },
            SourceError::Unavailable { uri, reason } => FetchError::Unavailable { uri, reason },
            other => FetchError::Failed {
                uri: other.uri().unwrap_or("?").to_string(),
                reason: strip_uri(&other),
            },
        }
    }
}

/// The error's message without its leading `uri: ` (the raster error adds it back).
fn strip_uri(e: &SourceError) -> String {
    let msg = crate::error::chain(e);
    match e.uri() {
        Some(uri) => msg
            .strip_prefix(uri)
            .and_then(|m| m.strip_prefix(": "))
            .map(str::to_string)
            .unwrap_or(msg),
        None => msg,
    }
}

/// Which documents a listing yields.
#[derive(Debug, Clone)]
pub struct ListOptions {
    /// Globs a document must match (any of them); empty means all. Matched against the path below the source
    /// root; a glob without `/` is matched against the file name alone (`*.pdf` matches at any depth).
    pub include: Vec<String>,
    /// Globs that exclude a document (same matching rules).
    pub exclude: Vec<String>,
    /// Larger documents are reported as [`SourceError::TooLarge`] instead of being fetched.
    pub max_bytes: u64,
}

impl Default for ListOptions {
    fn default() -> Self {
        ListOptions {
            include: Vec::new(),
            exclude: Vec::new(),
            max_bytes: 256 << 20,
        }
    }
}

/// Compiled include/exclude globs.
#[derive(Debug, Clone)]
pub struct Filter {
    include_path: GlobSet,
    include_name: GlobSet,
    exclude_path: GlobSet,
    exclude_name: GlobSet,
    any_include: bool,
}

impl Filter {
    pub fn new(include: &[String], exclude: &[String]) -> Result<Filter, SourceError> {
        let build = |patterns: &[String]| -> Result<(GlobSet, GlobSet), SourceError> {
            let (mut by_path, mut by_name) = (GlobSetBuilder::new(), GlobSetBuilder::new());
            for p in patterns {
                let glob: Glob = GlobBuilder::new(p)
                    .literal_separator(true)
                    .build()
                    .map_err(|e| SourceError::BadGlob {
                        pattern: p.clone(),
                        reason: e.kind().to_string(),
                    })?;
                if p.contains('/') {
                    by_path.add(glob);
                } else {
                    by_name.add(glob);
                }
            }
            let err = |e: globset::Error| SourceError::BadGlob {
                pattern: patterns.join(", "),
                reason: e.to_string(),
            };
            Ok((by_path.build().map_err(err)?, by_name.build().map_err(err)?))
        };
        let (include_path, include_name) = build(include)?;
        let (exclude_path, exclude_name) = build(exclude)?;
        Ok(Filter {
            include_path,
            include_name,
            exclude_path,
            exclude_name,
            any_include: !include.is_empty(),
        })
    }

    /// `relative`: the path below the source root, `/`-separated.
    pub fn matches(&self, relative: &str) -> bool {
        let name = relative.rsplit('/').next().unwrap_or(relative);
        if self.exclude_path.is_match(relative) || self.exclude_name.is_match(name) {
            return false;
        }
        !self.any_include
            || self.include_path.is_match(relative)
            || self.include_name.is_match(name)
    }
}

/// A place documents come from.
#[derive(Debug, Clone)]
pub struct Source {
    store: Arc<dyn ObjectStore>,
    /// Listing prefix inside the store (empty: the whole store / folder).
    prefix: Path,
    /// How document URIs start: `s3://bucket` or an absolute folder path.
    base: String,
    /// The URI as given, for messages.
    uri: String,
    /// A local source's canonical folder: walked and read with `std::fs` ([`local`]), not object_store.
    local_root: Option<PathBuf>,
    /// The store's raw page-by-page listing, where it has one (S3): one key object_store refuses then costs
    /// only that key ([`paged`]), not its whole page.
    pager: Option<crate::store::Pager>,
}

impl Source {
    /// Opens a local path, `file://` URL, or object-store URL (`s3://bucket[/prefix]`, `gs://`, `az://`, ...).
    pub fn open(uri: &str) -> Result<Source, SourceError> {
        let bad = |reason: String| SourceError::BadUri {
            uri: uri.to_string(),
            reason,
        };
        let scheme = crate::store::scheme(uri);
        match scheme.as_deref() {
            None => Source::local(uri, PathBuf::from(uri)),
            Some("file") => {
                let url = url::Url::parse(uri).map_err(|e| bad(e.to_string()))?;
                let path = url
                    .to_file_path()
                    .map_err(|_| bad("not a local file path".into()))?;
                Source::local(uri, path)
            }
            Some(_) if crate::store::is_object_store(uri) => {
                let opened = crate::store::open(uri).map_err(|source| SourceError::Store {
                    uri: uri.to_string(),
                    source,
                })?;
                Ok(Source {
                    store: opened.store,
                    prefix: opened.prefix,
                    base: opened.base,
                    uri: uri.to_string(),
                    local_root: None,
                    pager: opened.pager,
                })
            }
            Some(other @ ("http" | "https")) => Err(SourceError::UnsupportedScheme {
                uri: uri.to_string(),
                scheme: other.to_string(),
            }),
            Some(other) => Err(bad(format!("unknown scheme {other}://"))),
        }
    }

    fn local(uri: &str, path: PathBuf) -> Result<Source, SourceError> {
        let abs = std::fs::canonicalize(&path).map_err(|_| SourceError::NotFound {
            uri: uri.to_string(),
        })?;
        let (root, prefix) = if abs.is_dir() {
            (abs.clone(), Path::default())
        } else {
            let parent = abs.parent().unwrap_or(FsPath::new("/")).to_path_buf();
            let name = abs
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            (parent, Path::from(name))
        };
        let store = object_store::local::LocalFileSystem::new_with_prefix(&root).map_err(|e| {
            SourceError::BadUri {
                uri: uri.to_string(),
                reason: e.to_string(),
            }
        })?;
        Ok(Source {
            store: Arc::new(store),
            prefix,
            base: root.to_string_lossy().trim_end_matches('/').to_string(),
            uri: uri.to_string(),
            local_root: Some(root),
            pager: None,
        })
    }

    /// An S3 (or S3-compatible) bucket with explicit settings, for callers that do not use the environment.
    pub fn from_store(
        store: Arc<dyn ObjectStore>,
        base: &str,
        prefix: &str,
    ) -> Result<Source, SourceError> {
        let prefix = Path::parse(prefix.trim_matches('/')).map_err(|e| SourceError::BadUri {
            uri: format!("{base}/{prefix}"),
            reason: e.to_string(),
        })?;
        Ok(Source {
            store,
            prefix,
            base: base.trim_end_matches('/').to_string(),
            uri: base.to_string(),
            local_root: None,
            pager: None,
        })
    }

    /// Lists through `pager` (the same store's raw listing, e.g. an `AmazonS3`), so that a key object_store
    /// refuses is one skipped entry rather than a failed page.
    pub fn with_pager(mut self, pager: Arc<dyn object_store::list::PaginatedListStore>) -> Source {
        self.pager = Some(crate::store::Pager(pager));
        self
    }

    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    fn uri_of(&self, location: &Path) -> String {
        format!("{}/{}", self.base, location)
    }

    fn info(&self, meta: &ObjectMeta) -> DocumentInfo {
        DocumentInfo {
            uri: self.uri_of(&meta.location),
            size: meta.size,
            etag: meta.e_tag.clone(),
            version: meta.version.clone(),
            last_modified: Some(SystemTime::from(meta.last_modified)),
        }
    }

    /// A document's path below the source root (`a/b.pdf`), or its file name for a single-document source.
    pub fn relative_name(&self, doc: &DocumentInfo) -> String {
        let rel = doc
            .uri
            .strip_prefix(&self.base)
            .map(|r| r.trim_start_matches('/'))
            .unwrap_or(&doc.uri);
        let rel = self.relative(rel);
        if rel == self.prefix.as_ref() {
            return rel.rsplit('/').next().unwrap_or(rel).to_string();
        }
        rel.to_string()
    }

    fn relative<'a>(&self, location: &'a str) -> &'a str {
        let prefix = self.prefix.as_ref();
        if prefix.is_empty() {
            return location;
        }
        location
            .strip_prefix(prefix)
            .map(|r| r.trim_start_matches('/'))
            .filter(|r| !r.is_empty())
            .unwrap_or(location)
    }

    /// Lists documents as a stream. A source naming one object yields that object. Documents over
    /// `max_bytes` come out as [`SourceError::TooLarge`].
    pub fn list(
        &self,
        opts: &ListOptions,
    ) -> Result<futures::stream::BoxStream<'static, Result<DocumentInfo, SourceError>>, SourceError>
    {
        let filter = Filter::new(&opts.include, &opts.exclude)?;
        if let Some(root) = &self.local_root {
            return Ok(self.list_local(root.clone(), filter, opts.max_bytes));
        }
        let this = self.clone();
        let max_bytes = opts.max_bytes;
        let single = {
            let this = this.clone();
            async move {
                if this.prefix.as_ref().is_empty() {
                    return Ok::<_, SourceError>(None);
                }
                match this.store.head(&this.prefix).await {
                    Ok(meta) => Ok(Some(meta)),
                    Err(object_store::Error::NotFound { .. }) => Ok(None),
                    // A "directory" on a local disk is not an object; listing will tell.
                    Err(_) if this.base.starts_with('/') => Ok(None),
                    Err(e) => Err(SourceError::List {
                        uri: this.uri.clone(),
                        reason: crate::store::reason(&e),
                    }),
                }
            }
        };
        let stream =
            futures::stream::once(single)
                .map(
                    move |single| -> futures::stream::BoxStream<
                        'static,
                        Result<DocumentInfo, SourceError>,
                    > {
                        let this = this.clone();
                        let filter = filter.clone();
                        match single {
                            Err(e) => futures::stream::iter([Err(e)]).boxed(),
                            Ok(Some(meta)) => {
                                // One named document: globs do not apply to an explicit name.
                                futures::stream::iter([this.checked(meta, max_bytes)]).boxed()
                            }
                            Ok(None) => {
                                let prefix =
                                    (!this.prefix.as_ref().is_empty()).then(|| this.prefix.clone());
                                if let Some(pager) = &this.pager {
                                    return this.list_paged(pager.0.clone(), filter, max_bytes);
                                }
                                let uri = this.uri.clone();
                                let listing = this.store.list(prefix.as_ref());
                                let this2 = this.clone();
                                listing
                                    .map_err(move |e| match e {
                                        object_store::Error::NotFound { .. } => {
                                            SourceError::NotFound { uri: uri.clone() }
                                        }
                                        e => SourceError::List {
                                            uri: uri.clone(),
                                            reason: crate::store::reason(&e),
                                        },
                                    })
                                    .try_filter(move |meta| {
                                        let keep =
                                            filter.matches(this2.relative(meta.location.as_ref()));
                                        futures::future::ready(keep)
                                    })
                                    .map(move |item| {
                                        item.and_then(|meta| this.checked(meta, max_bytes))
                                    })
                                    .boxed()
                            }
                        }
                    },
                )
                .flatten();
        Ok(stream.boxed())
    }

    /// The raw page-by-page listing ([`paged`]): a key object_store refuses is one [`SourceError::Entry`].
    fn list_paged(
        &self,
        pager: Arc<dyn object_store::list::PaginatedListStore>,
        filter: Filter,
        max_bytes: u64,
    ) -> futures::stream::BoxStream<'static, Result<DocumentInfo, SourceError>> {
        let this = self.clone();
        paged::list(pager, Some(self.prefix.as_ref()), &self.uri)
            .filter_map(move |item| {
                let item = match item {
                    Err(e) => Some(Err(e)),
                    Ok(paged::PagedEntry::Object(meta)) => filter
                        .matches(this.relative(meta.location.as_ref()))
                        .then(|| this.checked(meta, max_bytes)),
                    Ok(paged::PagedEntry::Refused { key, reason }) => {
                        filter.matches(this.relative(&key)).then(|| {
                            Err(SourceError::Entry {
                                uri: format!("{}/{}", this.base, key),
                                reason,
                            })
                        })
                    }
                };
                futures::future::ready(item)
            })
            .boxed()
    }

    /// A local folder walked on a blocking thread; outcomes arrive through a small channel (the walk waits for
    /// the consumer, so memory stays flat). The return type is the same boxed stream as an object store's.
    fn list_local(
        &self,
        root: PathBuf,
        filter: Filter,
        max_bytes: u64,
    ) -> futures::stream::BoxStream<'static, Result<DocumentInfo, SourceError>> {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let (base, prefix) = (self.base.clone(), self.prefix.as_ref().to_string());
        let walk = move || {
            let walk = local::Walk {
                root: &root,
                base: &base,
                filter: &filter,
                max_bytes,
            };
            let mut emit = |item| tx.blocking_send(item).is_ok();
            if !prefix.is_empty() {
                // One named document (globs do not apply to an explicit name), or a folder below the root.
                let path = root.join(&prefix);
                if !path.is_dir() {
                    let uri = format!("{base}/{prefix}");
                    let item = match std::fs::symlink_metadata(&path) {
                        Ok(m) if m.is_file() && m.len() > max_bytes => Err(SourceError::TooLarge {
                            uri,
                            size: m.len(),
                            limit: max_bytes,
                        }),
                        Ok(m) if m.is_file() => Ok(DocumentInfo {
                            uri,
                            size: m.len(),
                            etag: Some(local::etag(&m)),
                            version: None,
                            last_modified: m.modified().ok(),
                        }),
                        Ok(_) => Err(SourceError::Entry {
                            uri,
                            reason: "not a regular file: skipped".into(),
                        }),
                        Err(_) => Err(SourceError::NotFound { uri }),
                    };
                    emit(item);
                    return;
                }
            }
            if let Err(e) = walk.run(&prefix, &mut emit) {
                emit(Err(e));
            }
        };
        // A thread of its own rather than the blocking pool: the walk lives as long as the listing is read.
        let spawned = std::thread::Builder::new()
            .name("pixtract-list".into())
            .spawn(walk);
        if let Err(e) = spawned {
            return futures::stream::iter([Err(SourceError::List {
                uri: self.uri.clone(),
                reason: format!("cannot start the listing thread: {e}"),
            })])
            .boxed();
        }
        futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        })
        .boxed()
    }

    fn checked(&self, meta: ObjectMeta, max_bytes: u64) -> Result<DocumentInfo, SourceError> {
        if meta.size > max_bytes {
            return Err(SourceError::TooLarge {
                uri: self.uri_of(&meta.location),
                size: meta.size,
                limit: max_bytes,
            });
        }
        Ok(self.info(&meta))
    }

    /// The store path of a document listed from this source.
    fn location(&self, doc: &DocumentInfo) -> Result<Path, SourceError> {
        let rel = doc
            .uri
            .strip_prefix(&self.base)
            .map(|r| r.trim_start_matches('/'))
            .ok_or_else(|| SourceError::BadUri {
                uri: doc.uri.clone(),
                reason: format!("not inside {}", self.base),
            })?;
        Path::parse(rel).map_err(|e| SourceError::BadUri {
            uri: doc.uri.clone(),
            reason: e.to_string(),
        })
    }

    /// Fetches one document's bytes; provenance (size, ETag, version) is refreshed from the response.
    pub async fn fetch(
        &self,
        doc: &DocumentInfo,
        max_bytes: u64,
    ) -> Result<(DocumentInfo, Bytes), SourceError> {
        if let Some(root) = &self.local_root {
            return self.fetch_local(root.clone(), doc, max_bytes).await;
        }
        let location = self.location(doc)?;
        let fetch_err = |e: object_store::Error| match e {
            object_store::Error::NotFound { .. } => SourceError::Fetch {
                uri: doc.uri.clone(),
                reason: "no such object (deleted since listing?)".into(),
            },
            e if crate::store::is_transient(&e) => SourceError::Unavailable {
                uri: doc.uri.clone(),
                reason: crate::store::reason(&e),
            },
            e => SourceError::Fetch {
                uri: doc.uri.clone(),
                reason: crate::store::reason(&e),
            },
        };
        let result = self.store.get(&location).await.map_err(fetch_err)?;
        let meta = result.meta.clone();
        if meta.size > max_bytes {
            return Err(SourceError::TooLarge {
                uri: doc.uri.clone(),
                size: meta.size,
                limit: max_bytes,
            });
        }
        let bytes = result.bytes().await.map_err(fetch_err)?;
        let mut info = self.info(&meta);
        info.uri = doc.uri.clone();
        info.size = bytes.len() as u64;
        Ok((info, bytes))
    }

    /// Fetches one document's bytes and keeps the identity (ETag, version) its LISTING gave: that is what the
    /// rows record and what the next run's listing is compared with (see `pipeline::state::doc_key`). A GET
    /// describes the same object differently on some stores (Azure quotes the ETag, versioned S3 and GCS add a
    /// version); an object changed between listing and GET is then simply redone by the next run.
    pub async fn fetch_as_listed(
        &self,
        doc: &DocumentInfo,
        max_bytes: u64,
    ) -> Result<(DocumentInfo, Bytes), SourceError> {
        let (fetched, bytes) = self.fetch(doc, max_bytes).await?;
        let info = DocumentInfo {
            etag: doc.etag.clone(),
            version: doc.version.clone(),
            ..fetched
        };
        Ok((info, bytes))
    }

    async fn fetch_local(
        &self,
        root: PathBuf,
        doc: &DocumentInfo,
        max_bytes: u64,
    ) -> Result<(DocumentInfo, Bytes), SourceError> {
        let rel = doc
            .uri
            .strip_prefix(&self.base)
            .map(|r| r.trim_start_matches('/').to_string())
            .unwrap_or_default();
        let read = tokio::task::spawn_blocking(move || local::read(&root, &rel, max_bytes)).await;
        let fetch_err = |reason: String| SourceError::Fetch {
            uri: doc.uri.clone(),
            reason,
        };
        let (bytes, meta) = match read {
            Ok(Ok(v)) => v,
            Ok(Err(local::ReadError::TooLarge(size))) => {
                return Err(SourceError::TooLarge {
                    uri: doc.uri.clone(),
                    size,
                    limit: max_bytes,
                });
            }
            Ok(Err(local::ReadError::Io(e))) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(fetch_err("no such file (deleted since listing?)".into()));
            }
            Ok(Err(local::ReadError::Io(e)))
                if !matches!(
                    e.kind(),
                    std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::InvalidInput
                ) =>
            {
                // EIO, a stale network mount: worth a later attempt.
                return Err(SourceError::Unavailable {
                    uri: doc.uri.clone(),
                    reason: e.to_string(),
                });
            }
            Ok(Err(e)) => return Err(fetch_err(e.to_string())),
            Err(e) => return Err(fetch_err(format!("reading task failed: {e}"))),
        };
        let info = DocumentInfo {
            uri: doc.uri.clone(),
            size: bytes.len() as u64,
            etag: Some(local::etag(&meta)),
            version: None,
            last_modified: meta.modified().ok(),
        };
        Ok((info, Bytes::from(bytes)))
    }

    /// Lists and fetches, `concurrency` fetches in flight, documents in listing order.
    pub fn fetch_all(
        &self,
        opts: &ListOptions,
        concurrency: usize,
    ) -> Result<
        impl Stream<Item = Result<(DocumentInfo, Bytes), SourceError>> + Send + 'static,
        SourceError,
    > {
        let listing = self.list(opts)?;
        let this = self.clone();
        let max_bytes = opts.max_bytes;
        Ok(listing
            .map(move |item| {
                let this = this.clone();
                async move {
                    match item {
                        Ok(doc) => this.fetch(&doc, max_bytes).await,
                        Err(e) => Err(e),
                    }
                }
            })
            .buffered(concurrency.max(1)))
    }
}
