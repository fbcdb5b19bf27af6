//! The index of done documents: a cache of what the committed Parquet files say, so that a run's start-up costs
//! what its new work costs, not what the output's whole history holds.
//!
//! Two kinds of index objects live under `_index/` in the output, both in one binary format:
//! - a **sidecar** per data file (`_index/<partition>/<file stem>.pxi`), written by the sink right after the file
//!   is committed: the document keys its rows cover;
//! - a **fold**, written by a run after it read the state: every document key done
//!   in the files it names, already combined (`_index/_fold-<run id>.pxi`).
//!
//! The output stays the source of truth: an index object is used only for data files the listing still shows at
//! the size it recorded; a fold that names a file the listing lacks (a partition deleted by hand to force a redo)
//! is stale and the state is rebuilt from the sidecars and files that remain. A data file with no sidecar (written
//! before the index existed, or a crash between the file and its sidecar) is read itself.
//!
//! Keys are 128-bit prefixes of SHA-256 over the document key's four parts: 3.65 million documents (a year of
//! 10,000 a night) take 58 MB, and the chance that two of them collide is below 10^-25.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

use arrow::array::{Array, AsArray, RecordBatch, StringArray};
use arrow::datatypes::Int32Type;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::extract::values::provenance::{
    ATTEMPT, DOC_PAGE_COUNT, MODEL_ID, PAGE_END, PAGE_START, SCHEMA_SHA256, SOURCE_ETAG,
    SOURCE_URI, SOURCE_VERSION, STATUS, STATUS_RETRY,
};

/// The folder of index objects, under the output's root.
pub const INDEX_DIR: &str = "_index";
/// Index objects' extension (not `.parquet`: no reader of the data globs them).
pub const INDEX_EXT: &str = ".pxi";

/// Identity of a processed document: (uri, etag or version, schema sha256, model id).
pub type DocKey = (String, String, String, String);

/// A document key's hash: the first 16 bytes of SHA-256 over its parts.
pub type KeyHash = u128;

/// Why an index object could not be used. Never fatal to a run: the files it covers are read instead.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("not a pixtract index (format {0:?})")]
    Format(String),
    #[error("index truncated or damaged: {0}")]
    Damaged(String),
    #[error("reading the index")]
    Io(#[from] std::io::Error),
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

/// The key's hash. Each part is length-prefixed, so no two keys share an input.
pub fn key_hash(key: &DocKey) -> KeyHash {
    let mut h = Sha256::new();
    for part in [&key.0, &key.1, &key.2, &key.3] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    let digest = h.finalize();
    let mut first = [0u8; 16];
    first.copy_from_slice(&digest[..16]);
    u128::from_le_bytes(first)
}

/// Key hashes are uniform already: the table uses their low bits as they are.
#[derive(Default, Clone, Copy)]
pub struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u128(&mut self, v: u128) {
        self.0 = v as u64;
    }
}

type Hashed = BuildHasherDefault<PassThrough>;

/// What the rows of one document say so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cover {
    /// The highest page a row reached.
    pub reached: i32,
    /// The document's page count, when a row said it.
    pub count: Option<i32>,
    /// A document-level row (page 0: it never rendered) that is not a transient failure.
    pub doc_error: bool,
    /// Transient failures recorded (status `retry`): attempts so far.
    pub attempts: u32,
}

impl Cover {
    /// Done: its rows reach its last page, or it failed for good as a whole.
    pub fn complete(&self) -> bool {
        self.doc_error || self.count.is_some_and(|n| self.reached >= n)
    }

    fn merge(&mut self, other: &Cover) {
        self.reached = self.reached.max(other.reached);
        if other.count.is_some() {
            self.count = other.count;
        }
        self.doc_error |= other.doc_error;
        self.attempts = self.attempts.max(other.attempts);
    }
}

/// Covers by key hash, collected from rows (one data file's, or a sink's open file's).
#[derive(Debug, Default, Clone)]
pub struct FileCovers {
    covers: HashMap<KeyHash, Cover, Hashed>,
}

impl FileCovers {
    pub fn len(&self) -> usize {
        self.covers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.covers.is_empty()
    }

    /// The columns a batch needs for [`FileCovers::add_batch`]; `STATUS` and `ATTEMPT` are optional (outputs
    /// written before them have no transient rows).
    pub const REQUIRED: [&'static str; 8] = [
        SOURCE_URI,
        SOURCE_ETAG,
        SOURCE_VERSION,
        SCHEMA_SHA256,
        MODEL_ID,
        PAGE_START,
        PAGE_END,
        DOC_PAGE_COUNT,
    ];
    pub const OPTIONAL: [&'static str; 2] = [STATUS, ATTEMPT];

    /// Adds a batch's rows. False when the batch is not pixtract's (a provenance column missing or of another
    /// type): nothing is added.
    pub fn add_batch(&mut self, batch: &RecordBatch) -> bool {
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
            return false;
        };
        let (Some(start), Some(end), Some(count)) =
            (int(PAGE_START), int(PAGE_END), int(DOC_PAGE_COUNT))
        else {
            return false;
        };
        let (status, attempt) = (text(STATUS), int(ATTEMPT));
        fn opt(a: &StringArray, i: usize) -> Option<&str> {
            (!a.is_null(i)).then(|| a.value(i))
        }
        for i in 0..batch.num_rows() {
            let key = doc_key(
                uri.value(i),
                opt(&etag, i),
                opt(&version, i),
                opt(&schema_sha, i).unwrap_or_default(),
                opt(&model, i).unwrap_or_default(),
            );
            let retry = status
                .as_ref()
                .is_some_and(|s| !s.is_null(i) && s.value(i) == STATUS_RETRY);
            let mut row = Cover::default();
            if retry {
                // A transient failure: not done; counts as one attempt.
                row.attempts = attempt
                    .as_ref()
                    .filter(|a| !a.is_null(i))
                    .map(|a| a.value(i).max(1) as u32)
                    .unwrap_or(1);
            } else {
                if !end.is_null(i) {
                    row.reached = end.value(i);
                }
                if !count.is_null(i) {
                    row.count = Some(count.value(i));
                }
                row.doc_error = !start.is_null(i) && start.value(i) == 0;
            }
            self.covers.entry(key_hash(&key)).or_default().merge(&row);
        }
        true
    }
}

/// The done documents of an output, as hashes: complete keys in a set, the rest (partly covered, or with
/// transient failures) with what their rows said so far.
#[derive(Debug, Default)]
pub struct DoneIndex {
    done: HashSet<KeyHash, Hashed>,
    open: HashMap<KeyHash, Cover, Hashed>,
}

impl DoneIndex {
    pub fn contains(&self, key: &DocKey) -> bool {
        self.done.contains(&key_hash(key))
    }

    /// Transient failures recorded for a document not done (0: none).
    pub fn attempts(&self, key: &DocKey) -> u32 {
        self.open.get(&key_hash(key)).map_or(0, |c| c.attempts)
    }

    pub fn len(&self) -> usize {
        self.done.len()
    }

    pub fn is_empty(&self) -> bool {
        self.done.is_empty()
    }

    /// Combines what another file said of a key with what is known.
    pub fn absorb(&mut self, key: KeyHash, cover: &Cover) {
        if self.done.contains(&key) {
            return;
        }
        let merged = self.open.entry(key).or_default();
        merged.merge(cover);
        if merged.complete() {
            self.mark_done(key);
        }
    }

    /// Done in one file is done: what other files said of the key no longer matters.
    fn mark_done(&mut self, key: KeyHash) {
        self.open.remove(&key);
        self.done.insert(key);
    }

    /// Combines another index (a sidecar's) with this one.
    pub fn absorb_index(&mut self, other: DoneIndex) {
        for key in other.done {
            self.mark_done(key);
        }
        for (key, cover) in other.open {
            self.absorb(key, &cover);
        }
    }

    pub fn absorb_file(&mut self, file: FileCovers) {
        for (key, cover) in file.covers {
            self.absorb(key, &cover);
        }
    }
}

/// One data file an index object covers: its path relative to the output's root, and its size when indexed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexedFile {
    pub path: String,
    pub bytes: u64,
}

/// The name of a data file's sidecar, relative to the output's root.
pub fn sidecar_name(data_rel: &str) -> String {
    let stem = data_rel.strip_suffix(".parquet").unwrap_or(data_rel);
    format!("{INDEX_DIR}/{stem}{INDEX_EXT}")
}

/// The data file a sidecar name stands for (None: not a sidecar; folds are not).
pub fn data_file_of_sidecar(rel: &str) -> Option<String> {
    let stem = rel.strip_prefix(INDEX_DIR)?.strip_prefix('/')?;
    let stem = stem.strip_suffix(INDEX_EXT)?;
    (!is_fold(rel)).then(|| format!("{stem}.parquet"))
}

/// The name of a run's fold, relative to the output's root. Run ids begin with their UTC start time, so folds
/// sort by age; the `_` keeps them apart from any sidecar (data files never begin with one).
pub fn fold_name(run_id: &str) -> String {
    format!("{INDEX_DIR}/_fold-{run_id}{INDEX_EXT}")
}

pub fn is_fold(rel: &str) -> bool {
    rel.strip_prefix(INDEX_DIR)
        .and_then(|r| r.strip_prefix("/_fold-"))
        .is_some_and(|r| r.ends_with(INDEX_EXT) && !r.contains('/'))
}

const MAGIC: &[u8; 12] = b"PIXTRACT-IDX";
/// Bumped whenever the key hash or the layout changes: an index of another version is read as absent.
const VERSION: u32 = 1;
const END: &[u8; 4] = b"END.";
/// Bytes per open entry: hash, reached, count (-1: none), doc_error, attempts.
const OPEN_ENTRY: usize = 16 + 4 + 4 + 1 + 4;
/// Hashes per read while loading a fold.
const CHUNK: usize = 8192;

/// Encodes an index object: the files it covers, then the done hashes, then the open covers.
pub fn encode<'a>(
    files: &[IndexedFile],
    done: impl ExactSizeIterator<Item = &'a KeyHash>,
    open: impl ExactSizeIterator<Item = (&'a KeyHash, &'a Cover)>,
) -> Vec<u8> {
    let (n_done, n_open) = (done.len(), open.len());
    let mut out = Vec::with_capacity(64 + files.len() * 80 + n_done * 16 + n_open * OPEN_ENTRY);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(files.len() as u64).to_le_bytes());
    for f in files {
        out.extend_from_slice(&(f.path.len() as u32).to_le_bytes());
        out.extend_from_slice(f.path.as_bytes());
        out.extend_from_slice(&f.bytes.to_le_bytes());
    }
    out.extend_from_slice(&(n_done as u64).to_le_bytes());
    for key in done {
        out.extend_from_slice(&key.to_le_bytes());
    }
    out.extend_from_slice(&(n_open as u64).to_le_bytes());
    for (key, cover) in open {
        out.extend_from_slice(&key.to_le_bytes());
        out.extend_from_slice(&cover.reached.to_le_bytes());
        out.extend_from_slice(&cover.count.unwrap_or(-1).to_le_bytes());
        out.push(u8::from(cover.doc_error));
        out.extend_from_slice(&cover.attempts.to_le_bytes());
    }
    out.extend_from_slice(END);
    out.extend_from_slice(&(n_done as u64).to_le_bytes());
    out.extend_from_slice(&(n_open as u64).to_le_bytes());
    out
}

impl FileCovers {
    /// A sidecar for one data file.
    pub fn encode(&self, file: &IndexedFile) -> Vec<u8> {
        let (done, open): (Vec<_>, Vec<_>) = self.covers.iter().partition(|(_, c)| c.complete());
        encode(
            std::slice::from_ref(file),
            done.into_iter().map(|(k, _)| k),
            open.into_iter(),
        )
    }
}

impl DoneIndex {
    /// A fold: everything known, for the files named.
    pub fn encode(&self, files: &[IndexedFile]) -> Vec<u8> {
        encode(files, self.done.iter(), self.open.iter())
    }
}

/// Reads an index object's header: the files it covers. `size` is the object's size, which bounds every count
/// read from it (a damaged header must not make the reader allocate without bound).
pub async fn read_files<R: AsyncRead + Unpin>(
    reader: &mut R,
    size: u64,
) -> Result<Vec<IndexedFile>, IndexError> {
    let mut magic = [0u8; 12];
    reader.read_exact(&mut magic).await?;
    let version = reader.read_u32_le().await?;
    if &magic != MAGIC || version != VERSION {
        return Err(IndexError::Format(format!(
            "{} v{version}",
            String::from_utf8_lossy(&magic)
        )));
    }
    let n_files = reader.read_u64_le().await?;
    if n_files.saturating_mul(12) > size {
        return Err(IndexError::Damaged(format!(
            "{n_files} files in {size} bytes"
        )));
    }
    let mut files = Vec::with_capacity(n_files as usize);
    for _ in 0..n_files {
        let len = reader.read_u32_le().await? as u64;
        if len > size {
            return Err(IndexError::Damaged(format!(
                "a name of {len} bytes in {size}"
            )));
        }
        let mut name = vec![0u8; len as usize];
        reader.read_exact(&mut name).await?;
        let path = String::from_utf8(name)
            .map_err(|_| IndexError::Damaged("a file name that is not UTF-8".into()))?;
        let bytes = reader.read_u64_le().await?;
        files.push(IndexedFile { path, bytes });
    }
    Ok(files)
}

/// Reads the rest of an index object (after [`read_files`]) into `index`, checking the trailer. On an error the
/// index may hold part of the object: callers read into an index of their own and drop it.
pub async fn read_covers<R: AsyncRead + Unpin>(
    reader: &mut R,
    size: u64,
    index: &mut DoneIndex,
) -> Result<(), IndexError> {
    let n_done = reader.read_u64_le().await?;
    if n_done.saturating_mul(16) > size {
        return Err(IndexError::Damaged(format!(
            "{n_done} keys in {size} bytes"
        )));
    }
    index.done.reserve(n_done as usize);
    let mut buf = vec![0u8; CHUNK * 16];
    let mut left = n_done as usize;
    while left > 0 {
        let take = left.min(CHUNK);
        reader.read_exact(&mut buf[..take * 16]).await?;
        for raw in buf[..take * 16].chunks_exact(16) {
            let mut key = [0u8; 16];
            key.copy_from_slice(raw);
            let key = u128::from_le_bytes(key);
            index.mark_done(key);
        }
        left -= take;
    }
    let n_open = reader.read_u64_le().await?;
    if n_open.saturating_mul(OPEN_ENTRY as u64) > size {
        return Err(IndexError::Damaged(format!(
            "{n_open} open keys in {size} bytes"
        )));
    }
    let mut entry = [0u8; OPEN_ENTRY];
    for _ in 0..n_open {
        reader.read_exact(&mut entry).await?;
        let field = |at: usize| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&entry[at..at + 4]);
            b
        };
        let mut key = [0u8; 16];
        key.copy_from_slice(&entry[..16]);
        let count = i32::from_le_bytes(field(20));
        let cover = Cover {
            reached: i32::from_le_bytes(field(16)),
            count: (count >= 0).then_some(count),
            doc_error: entry[24] != 0,
            attempts: u32::from_le_bytes(field(25)),
        };
        index.absorb(u128::from_le_bytes(key), &cover);
    }
    let mut end = [0u8; 4];
    reader.read_exact(&mut end).await?;
    let (done_again, open_again) = (reader.read_u64_le().await?, reader.read_u64_le().await?);
    if &end != END || done_again != n_done || open_again != n_open {
        return Err(IndexError::Damaged("the trailer does not match".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(uri: &str) -> DocKey {
        doc_key(uri, Some("\"e\""), None, "schema", "model")
    }

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

    #[test]
    fn parts_are_length_prefixed_in_the_hash() {
        let a = ("ab".to_string(), "c".into(), "s".into(), "m".into());
        let b = ("a".to_string(), "bc".into(), "s".into(), "m".into());
        assert_ne!(key_hash(&a), key_hash(&b));
        assert_eq!(key_hash(&a), key_hash(&a.clone()));
    }

    #[test]
    fn covers_from_two_files_complete_a_document_and_done_absorbs_later_retries() {
        let mut index = DoneIndex::default();
        let doc = key_hash(&key("a.pdf"));
        let pages_1_2 = Cover {
            reached: 2,
            count: Some(3),
            ..Cover::default()
        };
        index.absorb(doc, &pages_1_2);
        assert!(!index.contains(&key("a.pdf")));
        let retry = Cover {
            attempts: 2,
            ..Cover::default()
        };
        index.absorb(doc, &retry);
        assert_eq!(index.attempts(&key("a.pdf")), 2);
        index.absorb(
            doc,
            &Cover {
                reached: 3,
                ..Cover::default()
            },
        );
        assert!(index.contains(&key("a.pdf")));
        assert_eq!(index.attempts(&key("a.pdf")), 0);
    }

    #[tokio::test]
    async fn an_index_round_trips_and_a_damaged_one_is_refused() {
        let mut index = DoneIndex::default();
        for i in 0..20_000 {
            let doc = key_hash(&key(&format!("doc{i}.pdf")));
            let cover = if i % 10 == 0 {
                Cover {
                    attempts: 1,
                    ..Cover::default()
                }
            } else {
                Cover {
                    reached: 1,
                    count: Some(1),
                    ..Cover::default()
                }
            };
            index.absorb(doc, &cover);
        }
        let files = vec![IndexedFile {
            path: "dt=2026-12-07/part-r-00000.parquet".into(),
            bytes: 1234,
        }];
        let bytes = index.encode(&files);
        let size = bytes.len() as u64;
        let mut reader = bytes.as_slice();
        assert_eq!(read_files(&mut reader, size).await.expect("files"), files);
        let mut back = DoneIndex::default();
        read_covers(&mut reader, size, &mut back)
            .await
            .expect("covers");
        assert_eq!(back.len(), 18_000);
        assert!(back.contains(&key("doc1.pdf")));
        assert_eq!(back.attempts(&key("doc10.pdf")), 1);

        // Cut short: refused, never a panic or a huge allocation.
        for cut in [10, 40, bytes.len() / 2, bytes.len() - 3] {
            let mut reader = &bytes[..cut];
            let mut partial = DoneIndex::default();
            let read = match read_files(&mut reader, cut as u64).await {
                Ok(_) => read_covers(&mut reader, cut as u64, &mut partial)
                    .await
                    .is_ok(),
                Err(_) => false,
            };
            assert!(!read, "cut at {cut} read as whole");
        }
        // A header claiming more than the object holds.
        let mut damaged = bytes.clone();
        damaged[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        let mut reader = damaged.as_slice();
        assert!(matches!(
            read_files(&mut reader, size).await,
            Err(IndexError::Damaged(_))
        ));
    }

    #[test]
    fn sidecar_and_fold_names() {
        let rel = "dt=2026-12-07/part-r-00003.parquet";
        let side = sidecar_name(rel);
        assert_eq!(side, "_index/dt=2026-12-07/part-r-00003.pxi");
        assert_eq!(data_file_of_sidecar(&side).as_deref(), Some(rel));
        let fold = fold_name("20261207T000000Z-ab");
        assert!(is_fold(&fold));
        assert!(!is_fold(&side));
        assert_eq!(data_file_of_sidecar(&fold), None);
    }
}
