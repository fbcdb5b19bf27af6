//! Local folders, walked with `std::fs` rather than object_store's `LocalFileSystem` listing: that listing stops
//! at its first error (one odd name, one unreadable folder, one symlink loop ends it), skips names ending in
//! `#<digits>` (its own upload staging files) and follows links outside the folder. Here every entry gets an
//! outcome of its own: a document, or a [`SourceError::Entry`] saying why it is skipped; only a root that cannot
//! be read ends the listing ([`SourceError::List`]).
//!
//! Rules: symbolic links are never followed (a link to something inside the folder is listed under the target's
//! own name; one leading outside is not read; broken links and loops are reported); FIFOs, sockets and devices
//! are reported, never opened; names that are not UTF-8 are reported with their bytes escaped.

use std::fs::Metadata;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::SystemTime;

use super::{DocumentInfo, Filter, SourceError};

/// A document's ETag, the same as object_store's local store computes (inode, mtime, size), so that outputs of
/// earlier runs keep matching.
pub(super) fn etag(meta: &Metadata) -> String {
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .unwrap_or_default()
        .as_micros();
    format!("\"{:x}-{:x}-{:x}\"", meta.ino(), mtime, meta.len())
}

/// A name as it can be printed: UTF-8 as is, other bytes as `\xNN`.
pub fn escape_name(name: &std::ffi::OsStr) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut out = String::new();
    for chunk in name.as_bytes().utf8_chunks() {
        out.push_str(chunk.valid());
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// What kind of non-regular file this is, in words.
fn kind_of(ft: &std::fs::FileType) -> &'static str {
    if ft.is_fifo() {
        "a FIFO (named pipe)"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_char_device() {
        "a character device"
    } else {
        "not a regular file"
    }
}

pub(super) struct Walk<'a> {
    /// Canonical source folder.
    pub root: &'a Path,
    /// How URIs start (the root as text, no trailing `/`).
    pub base: &'a str,
    pub filter: &'a Filter,
    pub max_bytes: u64,
}

impl Walk<'_> {
    fn uri(&self, rel: &str) -> String {
        format!("{}/{}", self.base, rel)
    }

    fn entry(&self, rel: &str, reason: impl Into<String>) -> SourceError {
        SourceError::Entry {
            uri: self.uri(rel),
            reason: reason.into(),
        }
    }

    /// Walks `start` (a folder below the root, `""` for the root itself), handing every outcome to `emit`
    /// (which returns false to stop). An error reading `start` itself is the listing's failure.
    pub fn run(
        &self,
        start: &str,
        emit: &mut dyn FnMut(Result<DocumentInfo, SourceError>) -> bool,
    ) -> Result<(), SourceError> {
        let dir = if start.is_empty() {
            self.root.to_path_buf()
        } else {
            self.root.join(start)
        };
        let entries = read_sorted(&dir).map_err(|e| SourceError::List {
            uri: if start.is_empty() {
                self.base.to_string()
            } else {
                self.uri(start)
            },
            reason: e.to_string(),
        })?;
        self.walk_entries(&dir, start, entries, emit);
        Ok(())
    }

    /// Returns false when `emit` asked to stop.
    fn walk_entries(
        &self,
        dir: &Path,
        rel_dir: &str,
        entries: Vec<std::ffi::OsString>,
        emit: &mut dyn FnMut(Result<DocumentInfo, SourceError>) -> bool,
    ) -> bool {
        for name in entries {
            let path = dir.join(&name);
            let printable = escape_name(&name);
            let rel = if rel_dir.is_empty() {
                printable.clone()
            } else {
                format!("{rel_dir}/{printable}")
            };
            let Some(_) = name.to_str() else {
                if self.filter.matches(&rel)
                    && !emit(Err(self.entry(
                        &rel,
                        "the file name is not valid UTF-8 (shown with its bytes escaped): skipped",
                    )))
                {
                    return false;
                }
                continue;
            };
            let meta = match std::fs::symlink_metadata(&path) {
                Ok(m) => m,
                Err(e) => {
                    if !emit(Err(
                        self.entry(&rel, format!("cannot read its metadata: {e}"))
                    )) {
                        return false;
                    }
                    continue;
                }
            };
            let ft = meta.file_type();
            if ft.is_dir() {
                match read_sorted(&path) {
                    Ok(children) => {
                        if !self.walk_entries(&path, &rel, children, emit) {
                            return false;
                        }
                    }
                    Err(e) => {
                        if !emit(Err(
                            self.entry(&rel, format!("cannot read this folder: {e}"))
                        )) {
                            return false;
                        }
                    }
                }
                continue;
            }
            let item = if ft.is_symlink() {
                self.link(&path, &rel)
            } else if ft.is_file() {
                if !self.filter.matches(&rel) {
                    continue;
                }
                if meta.len() > self.max_bytes {
                    Some(Err(SourceError::TooLarge {
                        uri: self.uri(&rel),
                        size: meta.len(),
                        limit: self.max_bytes,
                    }))
                } else {
                    Some(Ok(DocumentInfo {
                        uri: self.uri(&rel),
                        size: meta.len(),
                        etag: Some(etag(&meta)),
                        version: None,
                        last_modified: meta.modified().ok(),
                    }))
                }
            } else {
                self.filter
                    .matches(&rel)
                    .then(|| Err(self.entry(&rel, format!("{}: skipped", kind_of(&ft)))))
            };
            if let Some(item) = item
                && !emit(item)
            {
                return false;
            }
        }
        true
    }

    /// A symbolic link's outcome: never followed, always said why (None: a link to a file the globs exclude).
    fn link(&self, path: &Path, rel: &str) -> Option<Result<DocumentInfo, SourceError>> {
        let shown = std::fs::read_link(path)
            .map(|t| escape_name(t.as_os_str()))
            .unwrap_or_else(|_| "?".into());
        let target = match std::fs::canonicalize(path) {
            Ok(t) => t,
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Some(Err(
                    self.entry(rel, format!("symbolic link loop (-> {shown}): skipped"))
                ));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Some(Err(self.entry(
                    rel,
                    format!("broken symbolic link (-> {shown}, which does not exist): skipped"),
                )));
            }
            Err(e) => {
                return Some(Err(self.entry(
                    rel,
                    format!("symbolic link (-> {shown}) cannot be resolved: {e}: skipped"),
                )));
            }
        };
        let is_dir = target.is_dir();
        if !is_dir && !self.filter.matches(rel) {
            return None;
        }
        let what = if is_dir { "folder" } else { "file" };
        Some(Err(match target.strip_prefix(self.root) {
            Ok(inside) if inside.as_os_str().is_empty() => self.entry(
                rel,
                "symbolic link to the source folder itself: not followed",
            ),
            Ok(inside) => self.entry(
                rel,
                format!(
                    "symbolic link to the {what} {} inside the source folder: not followed (listed under its own name)",
                    escape_name(inside.as_os_str())
                ),
            ),
            Err(_) => self.entry(
                rel,
                format!(
                    "symbolic link leading outside the source folder (-> {}): not followed",
                    escape_name(target.as_os_str())
                ),
            ),
        }))
    }
}

/// A folder's entry names, sorted by their bytes (a stable listing order).
fn read_sorted(dir: &Path) -> std::io::Result<Vec<std::ffi::OsString>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        names.push(entry?.file_name());
    }
    names.sort();
    Ok(names)
}

/// Reads one listed local document: the path must stay below the root, must not be a link (`O_NOFOLLOW`), is
/// opened without blocking (a FIFO swapped in since the listing cannot hang the run) and must be a regular file.
/// Returns the bytes and fresh metadata (size, ETag, mtime).
pub(super) fn read(
    root: &Path,
    rel: &str,
    max_bytes: u64,
) -> Result<(Vec<u8>, Metadata), ReadError> {
    let rel_path = Path::new(rel);
    if rel.is_empty()
        || rel_path
            .components()
            .any(|c| !matches!(c, Component::Normal(_)))
    {
        return Err(ReadError::Outside);
    }
    let path: PathBuf = root.join(rel_path);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => ReadError::Link,
            _ => ReadError::Io(e),
        })?;
    let meta = file.metadata().map_err(ReadError::Io)?;
    if !meta.file_type().is_file() {
        return Err(ReadError::NotRegular(kind_of(&meta.file_type())));
    }
    if meta.len() > max_bytes {
        return Err(ReadError::TooLarge(meta.len()));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    (&file)
        .take(max_bytes + 1)
        .read_to_end(&mut bytes)
        .map_err(ReadError::Io)?;
    if bytes.len() as u64 > max_bytes {
        return Err(ReadError::TooLarge(bytes.len() as u64));
    }
    drop(file);
    Ok((bytes, meta))
}

#[derive(Debug, thiserror::Error)]
pub(super) enum ReadError {
    #[error("not below the source folder")]
    Outside,
    #[error("became a symbolic link since the listing: not followed")]
    Link,
    #[error("{0}: skipped")]
    NotRegular(&'static str),
    #[error("{0} bytes")]
    TooLarge(u64),
    #[error(transparent)]
    Io(std::io::Error),
}
