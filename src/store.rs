//! Object-store URLs: the one place that turns `s3://`, `gs://`, `az://` / `abfss://` into an `ObjectStore`,
//! shared by the source (documents in) and the sink (Parquet out), so both read the same environment the same way.
//!
//! - `s3://bucket/prefix` (`s3a://` too): `AWS_*` variables. `AWS_ENDPOINT_URL[_S3]` points at an S3-compatible
//!   store; plain http is allowed for a loopback endpoint, or anywhere with `AWS_ALLOW_HTTP=true`.
//! - `gs://bucket/prefix`: `GOOGLE_*` variables (`GOOGLE_APPLICATION_CREDENTIALS`, `GOOGLE_SERVICE_ACCOUNT`).
//! - `az://container/prefix` with `AZURE_STORAGE_ACCOUNT_NAME`, or `abfs[s]://container@account.dfs.core.
//!   windows.net/prefix`: `AZURE_*` variables (`AZURE_STORAGE_USE_EMULATOR=true` for Azurite).

use std::sync::Arc;

use object_store::ObjectStore;
use object_store::list::PaginatedListStore;
use object_store::path::Path;

/// An opened object-store URL.
#[derive(Debug, Clone)]
pub struct StoreUrl {
    pub store: Arc<dyn ObjectStore>,
    /// How object URIs start: `s3://bucket`, `gs://bucket`, `az://container`, ...
    pub base: String,
    /// The URL's path inside the bucket or container.
    pub prefix: Path,
    /// The same store's raw, page-by-page listing (S3): lets a listing step past a key that object_store's
    /// `Path` cannot hold (`a//b.pdf`) instead of failing the whole page ([`crate::source`]).
    pub pager: Option<Pager>,
}

/// A store's page-by-page listing (object_store's [`PaginatedListStore`]), which has no `Debug` of its own.
#[derive(Clone)]
pub struct Pager(pub Arc<dyn PaginatedListStore>);

impl std::fmt::Debug for Pager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pager")
    }
}

impl StoreUrl {
    /// The URL back in its normalised form: `<base>[/<prefix>]`.
    pub fn url(&self) -> String {
        if self.prefix.as_ref().is_empty() {
            self.base.clone()
        } else {
            format!("{}/{}", self.base, self.prefix)
        }
    }
}

/// Whether `uri` names an object store this module opens (else: a local path, `file://`, or unsupported).
pub fn is_object_store(uri: &str) -> bool {
    matches!(
        scheme(uri).as_deref(),
        Some("s3" | "s3a" | "gs" | "az" | "azure" | "abfs" | "abfss")
    )
}

/// The URI's scheme, lower-cased (None for a plain path).
pub fn scheme(uri: &str) -> Option<String> {
    uri.split_once("://").map(|(s, _)| s.to_ascii_lowercase())
}

/// Whether an endpoint URL points at this machine (plain http is then allowed without asking).
fn is_loopback(endpoint: &str) -> bool {
    url::Url::parse(endpoint)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
        .is_some_and(|h| h == "localhost" || h == "127.0.0.1" || h == "[::1]" || h == "::1")
}

/// Why an object-store URL could not be opened. Cloneable (object_store's errors are shared), since the
/// source's errors travel with every listed entry.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("not a valid URL")]
    Url(#[from] url::ParseError),
    #[error("no bucket name")]
    NoBucket,
    #[error("no container name")]
    NoContainer,
    #[error("{0}:// is not an object store")]
    NotAnObjectStore(String),
    #[error("not a URL")]
    NotAUrl,
    #[error("cannot configure the object store")]
    Configure(#[source] Arc<object_store::Error>),
    #[error("not a valid object path")]
    Prefix(#[source] Arc<object_store::path::Error>),
}

fn configure(e: object_store::Error) -> StoreError {
    StoreError::Configure(Arc::new(e))
}

/// Opens an object-store URL from the standard environment of its cloud.
pub fn open(uri: &str) -> Result<StoreUrl, StoreError> {
    open_with(uri, &[])
}

/// Opens an object-store URL from the standard environment of its cloud, with `options` (object_store's
/// configuration keys of that cloud, e.g. `aws_endpoint`) set over it: one client, with the same retries and
/// listing, for callers that configure a store explicitly.
pub fn open_with(uri: &str, options: &[(&str, &str)]) -> Result<StoreUrl, StoreError> {
    let url = url::Url::parse(uri)?;
    let host = url.host_str().filter(|h| !h.is_empty());
    let mut pager: Option<Pager> = None;
    let (store, base): (Arc<dyn ObjectStore>, String) = match scheme(uri).as_deref() {
        Some("s3" | "s3a") => {
            let bucket = host.ok_or(StoreError::NoBucket)?;
            let mut builder = object_store::aws::AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .with_retry(retry_config());
            let endpoint = std::env::var("AWS_ENDPOINT_URL_S3")
                .or_else(|_| std::env::var("AWS_ENDPOINT_URL"))
                .or_else(|_| std::env::var("AWS_ENDPOINT"))
                .ok();
            if let Some(endpoint) = endpoint.filter(|e| is_loopback(e)) {
                builder = builder.with_allow_http(true).with_endpoint(endpoint);
            }
            for (key, value) in options {
                builder = builder.with_config(key.parse().map_err(configure)?, *value);
            }
            let store = Arc::new(builder.build().map_err(configure)?);
            pager = Some(Pager(store.clone()));
            (store, format!("s3://{bucket}"))
        }
        Some("gs") => {
            let bucket = host.ok_or(StoreError::NoBucket)?;
            let mut builder = object_store::gcp::GoogleCloudStorageBuilder::from_env()
                .with_bucket_name(bucket)
                .with_retry(retry_config());
            for (key, value) in options {
                builder = builder.with_config(key.parse().map_err(configure)?, *value);
            }
            let store = builder.build().map_err(configure)?;
            (Arc::new(store), format!("gs://{bucket}"))
        }
        Some(scheme @ ("az" | "azure" | "abfs" | "abfss")) => {
            let host = host.ok_or(StoreError::NoContainer)?;
            // az://container/..., or abfs[s]://container@account.dfs.core.windows.net/... (object_store reads
            // the account from that host).
            let base = match url.username() {
                "" => format!("{scheme}://{host}"),
                container => format!("{scheme}://{container}@{host}"),
            };
            let mut builder = object_store::azure::MicrosoftAzureBuilder::from_env()
                .with_url(base.clone())
                .with_retry(retry_config());
            for (key, value) in options {
                builder = builder.with_config(key.parse().map_err(configure)?, *value);
            }
            let store = builder.build().map_err(configure)?;
            (Arc::new(store), base)
        }
        Some(other) => return Err(StoreError::NotAnObjectStore(other.to_string())),
        None => return Err(StoreError::NotAUrl),
    };
    let prefix =
        Path::parse(url.path().trim_matches('/')).map_err(|e| StoreError::Prefix(Arc::new(e)))?;
    Ok(StoreUrl {
        store,
        base,
        prefix,
        pager,
    })
}

/// Whether a store error may pass on a later attempt (after the client's own retries): anything but a missing
/// object, refused credentials or access, an invalid path or an unsupported operation.
pub fn is_transient(e: &object_store::Error) -> bool {
    use object_store::Error as E;
    !matches!(
        e,
        E::NotFound { .. }
            | E::PermissionDenied { .. }
            | E::Unauthenticated { .. }
            | E::InvalidPath { .. }
            | E::NotSupported { .. }
            | E::NotImplemented { .. }
            | E::UnknownConfigurationKey { .. }
    ) && !reason(e).starts_with("HTTP 4")
}

/// The pauses before each further try of a request that failed transiently: 200 ms doubling to 5 s, 8 of them.
/// One policy for [`retry_transient`] and the callers that cannot hand it a closure (a read that fills caller
/// state as it goes).
pub fn retry_delays() -> impl Iterator<Item = std::time::Duration> {
    std::iter::successors(Some(std::time::Duration::from_millis(200)), |d| {
        Some((*d * 2).min(std::time::Duration::from_secs(5)))
    })
    .take(8)
}

impl crate::error::Retryable for object_store::Error {
    /// Anything but a missing object, refused credentials or access, an invalid path, an unsupported operation or
    /// a refused condition.
    fn is_retryable(&self) -> bool {
        worth_retrying(self)
    }
}

/// Whether a storage error may pass if the request is made again (not a refused condition).
pub fn worth_retrying(e: &object_store::Error) -> bool {
    use object_store::Error as E;
    !matches!(e, E::AlreadyExists { .. } | E::Precondition { .. }) && is_transient(e)
}

/// Runs a store request again, with backoff ([`retry_delays`]), while it fails for a transient reason. For what
/// object_store's own retries leave out: a response body cut mid-way (a listing page, an object read), and
/// non-idempotent requests whose connection broke (a conditional write, a bulk DELETE), which object_store cannot
/// know took effect. Callers make a repeat harmless (a listing page asked again from the same place, a delete of
/// what may be gone, a conditional write followed by a read).
pub async fn retry_transient<T, F, Fut>(mut request: F) -> Result<T, object_store::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, object_store::Error>>,
{
    let mut delays = retry_delays();
    loop {
        match request().await {
            Err(e) if worth_retrying(&e) => match delays.next() {
                Some(delay) => {
                    tracing::debug!(error = %crate::error::chain(&e), "storage request failed; trying again");
                    tokio::time::sleep(delay).await;
                }
                None => return Err(e),
            },
            result => return result,
        }
    }
}

/// Whether an error failed in the storage for a reason that may pass (rather than in the content read, which fails
/// the same way every time): an `object_store::Error` somewhere in its chain, directly or as an `io::Error`'s
/// payload (how the Parquet reader carries it), that [`worth_retrying`] accepts.
pub fn failed_in_storage(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(err) = next {
        let storage = err.downcast_ref::<object_store::Error>().or_else(|| {
            err.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<object_store::Error>())
        });
        if let Some(storage) = storage {
            return worth_retrying(storage);
        }
        next = err.source();
    }
    false
}

/// Every object under `prefix`, the listing asked again from the start while it fails for a transient reason
/// (object_store retries each page request, not a page whose body is cut).
pub async fn list_all(
    store: &dyn ObjectStore,
    prefix: Option<&Path>,
) -> Result<Vec<object_store::ObjectMeta>, object_store::Error> {
    use futures::TryStreamExt;
    retry_transient(|| store.list(prefix).try_collect()).await
}

/// One object's bytes, the read made again while it fails for a transient reason (a body cut mid-way included).
pub async fn read_all(
    store: &dyn ObjectStore,
    location: &Path,
) -> Result<bytes::Bytes, object_store::Error> {
    use object_store::ObjectStoreExt;
    retry_transient(|| async { store.get(location).await?.bytes().await }).await
}

/// Retries with exponential backoff, set explicitly (not left to the library's defaults): transient errors
/// (5xx, connection resets, throttling, timeouts) are retried up to 6 times within 3 minutes per request.
pub fn retry_config() -> object_store::RetryConfig {
    object_store::RetryConfig {
        backoff: object_store::BackoffConfig {
            init_backoff: std::time::Duration::from_millis(200),
            max_backoff: std::time::Duration::from_secs(20),
            base: 2.0,
        },
        max_retries: 6,
        retry_timeout: std::time::Duration::from_secs(180),
    }
}

/// object_store's error in words: the S3 error code and message when the server sent them (`NoSuchBucket:
/// The specified bucket does not exist`), else the HTTP status (with what to check on 401/403), else the first
/// line of the error text.
pub fn reason(e: &object_store::Error) -> String {
    let text = e.to_string();
    if let Some(summary) = crate::error::xml_error_summary(&text) {
        return summary;
    }
    if let Some(pos) = text.find("status code: ") {
        let status = &text[pos + "status code: ".len()..];
        let status = status.split(':').next().unwrap_or(status).trim();
        return if status.starts_with("401") || status.starts_with("403") {
            format!(
                "HTTP {status} (credentials missing, expired or without access to this bucket/container)"
            )
        } else {
            format!("HTTP {status}")
        };
    }
    let first = text.lines().next().unwrap_or(&text);
    first.chars().take(300).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_object_store_schemes() {
        for uri in [
            "s3://b/x",
            "S3A://b",
            "gs://b/p",
            "az://c/p",
            "abfss://c@a.dfs.core.windows.net/p",
        ] {
            assert!(is_object_store(uri), "{uri}");
        }
        for uri in [
            "/data/x",
            "file:///data",
            "https://example.com/x",
            "relative/dir",
        ] {
            assert!(!is_object_store(uri), "{uri}");
        }
        assert!(matches!(open("gs:///x"), Err(StoreError::NoBucket)));
        assert!(is_loopback("http://127.0.0.1:9000") && !is_loopback("http://10.0.0.1:9000"));
    }
}
