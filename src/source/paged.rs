//! Listing an object store page by page through its raw listing (S3 ListObjectsV2), so that one key object_store's
//! `Path` refuses does not take its whole page with it.
//!
//! object_store parses every key of a page into a `Path` and fails the page at the first key it refuses: an empty
//! segment (`a//b.pdf`, a key starting or ending in `/` after the prefix), a `.` or `..` segment, or an ASCII control
//! character. Its error names that key (`path::Error::EmptySegment { path }` / `BadSegment { path, .. }`), but not
//! where it sits in the page. So the walk asks for the same page again with half as many keys (`max-keys`), then
//! half again, until a page of one key is that key: it becomes an entry of its own (skipped with its reason, since
//! the client cannot address it for a GET either), and the listing goes on right after it (`start-after` = the raw
//! key). Pages without such keys cost one request, as before; each refused key costs about 2 x log2(1000) ~ 20
//! small requests.

use std::collections::VecDeque;
use std::sync::Arc;

use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::ObjectMeta;
use object_store::list::{PaginatedListOptions, PaginatedListStore};

use super::SourceError;

/// Keys per page when nothing is being narrowed down (S3's own maximum).
const FULL_PAGE: usize = 1000;

/// One entry of the raw listing.
pub(super) enum PagedEntry {
    Object(ObjectMeta),
    /// A key object_store cannot hold: the raw key and why.
    Refused {
        key: String,
        reason: String,
    },
}

struct Walk {
    pager: Arc<dyn PaginatedListStore>,
    /// With its trailing `/` (the raw listing does not add one).
    prefix: Option<String>,
    /// The source URI, for messages.
    uri: String,
    /// Where the next page starts: a continuation token, else `start-after` this raw key, else the beginning.
    token: Option<String>,
    start_after: Option<String>,
    max_keys: usize,
    ready: VecDeque<Result<PagedEntry, SourceError>>,
    finished: bool,
}

/// Lists every key under `prefix` (a folder: `in` lists `in/...`; None: the whole bucket).
pub(super) fn list(
    pager: Arc<dyn PaginatedListStore>,
    prefix: Option<&str>,
    uri: &str,
) -> BoxStream<'static, Result<PagedEntry, SourceError>> {
    let walk = Walk {
        pager,
        prefix: prefix
            .filter(|p| !p.is_empty())
            .map(|p| format!("{}/", p.trim_end_matches('/'))),
        uri: uri.to_string(),
        token: None,
        start_after: None,
        max_keys: FULL_PAGE,
        ready: VecDeque::new(),
        finished: false,
    };
    futures::stream::unfold(walk, |mut walk| async move {
        let item = walk.next().await?;
        Some((item, walk))
    })
    .boxed()
}

impl Walk {
    async fn next(&mut self) -> Option<Result<PagedEntry, SourceError>> {
        loop {
            if let Some(item) = self.ready.pop_front() {
                return Some(item);
            }
            if self.finished {
                return None;
            }
            let opts = PaginatedListOptions {
                // S3 ignores start-after once a continuation token is given.
                offset: self
                    .token
                    .is_none()
                    .then(|| self.start_after.clone())
                    .flatten(),
                page_token: self.token.clone(),
                max_keys: Some(self.max_keys),
                ..Default::default()
            };
            // A page whose body was cut mid-way is asked for again from the same place.
            let (pager, prefix) = (&self.pager, self.prefix.as_deref());
            match crate::store::retry_transient(|| pager.list_paginated(prefix, opts.clone())).await
            {
                Ok(page) => {
                    self.ready.extend(
                        page.result
                            .objects
                            .into_iter()
                            .map(|meta| Ok(PagedEntry::Object(meta))),
                    );
                    match page.page_token {
                        Some(token) => self.token = Some(token),
                        None => self.finished = true,
                    }
                }
                Err(object_store::Error::InvalidPath { source }) => {
                    let Some((key, reason)) = refused(&source)
                        // The store would be ignoring start-after: never walk in a circle.
                        .filter(|(key, _)| self.start_after.as_ref() != Some(key))
                    else {
                        self.finished = true;
                        return Some(Err(SourceError::List {
                            uri: self.uri.clone(),
                            reason: format!(
                                "the listing holds a key it cannot step past: {source}"
                            ),
                        }));
                    };
                    if self.max_keys > 1 {
                        // The same position with a shorter page: the refused key is in it or further on.
                        self.max_keys /= 2;
                        continue;
                    }
                    // A page of one key that fails is that key. Go on right after it.
                    self.ready.push_back(Ok(PagedEntry::Refused {
                        key: key.clone(),
                        reason,
                    }));
                    self.token = None;
                    self.start_after = Some(key);
                    self.max_keys = FULL_PAGE;
                }
                Err(object_store::Error::NotFound { .. }) => {
                    self.finished = true;
                    return Some(Err(SourceError::NotFound {
                        uri: self.uri.clone(),
                    }));
                }
                Err(e) => {
                    self.finished = true;
                    return Some(Err(SourceError::List {
                        uri: self.uri.clone(),
                        reason: crate::store::reason(&e),
                    }));
                }
            }
        }
    }
}

/// The raw key object_store refused, and why, in words (None: an error that names no key).
fn refused(e: &object_store::path::Error) -> Option<(String, String)> {
    use object_store::path::Error as E;
    match e {
        E::EmptySegment { path } => Some((
            path.clone(),
            "the key has an empty path segment (`//`, or a `/` at its start or end), which the storage client \
             cannot address: skipped"
                .into(),
        )),
        E::BadSegment { path, source } => Some((
            path.clone(),
            format!("the key has a segment the storage client cannot address ({source}): skipped"),
        )),
        _ => None,
    }
}
