//! The output lease: one run at a time writes to an output (per shard), so two overlapping runs (a cron overlap, a
//! retried pod while the old one still runs) never both process the same documents.
//!
//! - Local folder: an exclusive `flock` on `.pixtract-lease[-shard-I-of-N]` in the output folder. The kernel drops
//!   it when the process ends, however it ends (kill -9 included), so a local lease never needs to expire. The
//!   file stays (hidden; deleting a lock file races with the next locker); it holds the holder's description.
//! - Object store: the object `_pixtract-lease[-shard-I-of-N].json`, created with a conditional put (S3
//!   `If-None-Match: *`, GCS generation 0, Azure `If-None-Match`), renewed every `ttl / 4` with a conditional
//!   update on its ETag and deleted at the end. A holder that dies stops renewing: once the object is older than
//!   its `ttl` (by the store's clock, `Last-Modified`), a waiting run takes it over with a conditional update, so
//!   of two waiters exactly one wins. A run that finds its renewal refused (someone took over after it stalled for
//!   longer than the ttl) learns it from [`Lease::lost`] and stops taking new documents.
//!
//! A retried request can succeed at the store and still be reported as failed (its response was lost): a refused
//! create or update is therefore followed by a read, and a lease object naming this run is this run's.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};
use serde::{Deserialize, Serialize};

use super::SinkTarget;

/// Who holds a lease: written into the lease file or object, shown to a run that has to wait.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Holder {
    pub run_id: String,
    pub host: String,
    pub pid: u32,
    pub started_at: DateTime<Utc>,
    /// Object stores: how long the lease lives without renewal.
    #[serde(default)]
    pub ttl_s: u64,
}

impl Holder {
    /// This process, for run `run_id`.
    pub fn this_process(run_id: &str, ttl: Duration) -> Holder {
        Holder {
            run_id: run_id.to_string(),
            host: host_name(),
            pid: std::process::id(),
            started_at: Utc::now(),
            ttl_s: ttl.as_secs(),
        }
    }
}

impl Holder {
    /// A holder the lease does not name (its description unreadable, or not a pixtract lease): `who` says so.
    fn unknown(who: &str, started_at: DateTime<Utc>, ttl_s: u64) -> Holder {
        Holder {
            run_id: who.to_string(),
            host: "unknown".into(),
            pid: 0,
            started_at,
            ttl_s,
        }
    }
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "run {} (host {}, pid {}, started {})",
            self.run_id,
            self.host,
            self.pid,
            self.started_at.format("%Y-%m-%d %H:%M:%S UTC")
        )
    }
}

fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `len` bytes into the buffer it is given.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("lease file {}", path.display())]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("lease object {key}")]
    Object {
        key: String,
        #[source]
        source: object_store::Error,
    },
    #[error(
        "another run holds the output {output}: {holder}; gave up waiting after {waited_s} s (--lease-wait)"
    )]
    Busy {
        output: String,
        holder: String,
        waited_s: u64,
    },
    #[error("interrupted while waiting for the output lease of {output} (held by {holder})")]
    Interrupted { output: String, holder: String },
}

/// The lease's name for a shard (`None`: the whole output).
pub fn lease_name(shard: Option<(u64, u64)>) -> String {
    match shard {
        Some((i, n)) => format!("lease-shard-{i}-of-{n}"),
        None => "lease".to_string(),
    }
}

/// A held lease. Release it with [`Lease::release`]; dropped without that, a local lease ends with the file
/// descriptor and an object-store lease expires after its ttl.
pub struct Lease {
    kind: LeaseKind,
}

enum LeaseKind {
    Local {
        // Holding the descriptor holds the lock.
        _file: std::fs::File,
    },
    Store {
        store: Arc<dyn ObjectStore>,
        key: ObjectPath,
        run_id: String,
        renew: tokio::task::JoinHandle<()>,
        state: Arc<Mutex<RenewState>>,
    },
    /// The store cannot write conditionally: runs are not kept apart (said once, as a warning).
    Unsupported,
}

#[derive(Default)]
struct RenewState {
    version: Option<UpdateVersion>,
    lost: Option<String>,
}

/// One attempt's outcome.
pub enum Attempt {
    Held(Lease),
    /// Someone else holds it.
    Busy(Holder),
}

impl Lease {
    /// Why this run no longer holds the lease (another run took it over after a renewal failed for longer than
    /// the ttl), if so.
    pub fn lost(&self) -> Option<String> {
        match &self.kind {
            LeaseKind::Store { state, .. } => lock(state).lost.clone(),
            _ => None,
        }
    }

    /// Whether overlapping runs are kept apart (false on a store without conditional writes).
    pub fn enforced(&self) -> bool {
        !matches!(self.kind, LeaseKind::Unsupported)
    }

    /// Gives the lease back: the lock is dropped, or the lease object deleted if it is still this run's.
    pub async fn release(self) -> Result<(), LeaseError> {
        match self.kind {
            LeaseKind::Local { .. } | LeaseKind::Unsupported => Ok(()),
            LeaseKind::Store {
                store,
                key,
                run_id,
                renew,
                state,
            } => {
                renew.abort();
                if lock(&state).lost.is_some() {
                    return Ok(());
                }
                // Still ours (a takeover would have changed the holder): delete it so the next run need not wait.
                match read_holder(store.as_ref(), &key).await? {
                    Some((holder, _)) if holder.as_ref().is_some_and(|h| h.run_id == run_id) => {
                        store
                            .delete(&key)
                            .await
                            .map_err(|source| LeaseError::Object {
                                key: key.to_string(),
                                source,
                            })
                    }
                    _ => Ok(()),
                }
            }
        }
    }
}

fn lock(state: &Mutex<RenewState>) -> std::sync::MutexGuard<'_, RenewState> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

impl SinkTarget {
    /// Tries once to take the output's lease `name` for `holder`.
    /// `on_lost` is set when a held object-store lease is later taken over by another run.
    pub async fn try_lease(
        &self,
        name: &str,
        holder: &Holder,
        on_lost: &Arc<AtomicBool>,
    ) -> Result<Attempt, LeaseError> {
        match self {
            SinkTarget::Local(root) => try_local(root, name, holder),
            SinkTarget::Store { store, prefix, .. } => {
                let key = super::join_key(prefix, &format!("_pixtract-{name}.json"));
                try_store(store.clone(), key, holder, on_lost.clone()).await
            }
        }
    }

    /// Takes the lease, waiting while another run holds it: polls, gives up after `wait` (None: waits as long as
    /// it takes) or when `stop` becomes true (a signal). `waiting` is told who holds it, on the first busy attempt
    /// and every minute after. Once held, `stop` is set if the lease is ever lost.
    pub async fn acquire_lease(
        &self,
        name: &str,
        holder: &Holder,
        wait: Option<Duration>,
        stop: &Arc<AtomicBool>,
        mut waiting: impl FnMut(&Holder, Duration),
    ) -> Result<Lease, LeaseError> {
        let started = std::time::Instant::now();
        let poll = match self {
            SinkTarget::Local(_) => Duration::from_millis(500),
            SinkTarget::Store { .. } => Duration::from_secs((holder.ttl_s / 8).clamp(1, 5)),
        };
        let mut last_said: Option<std::time::Instant> = None;
        loop {
            let other = match self.try_lease(name, holder, stop).await? {
                Attempt::Held(lease) => return Ok(lease),
                Attempt::Busy(other) => other,
            };
            let waited = started.elapsed();
            if wait.is_some_and(|w| waited >= w) {
                return Err(LeaseError::Busy {
                    output: self.url(),
                    holder: other.to_string(),
                    waited_s: waited.as_secs(),
                });
            }
            if last_said.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                waiting(&other, waited);
                last_said = Some(std::time::Instant::now());
            }
            // Sleep in small steps so a signal is noticed quickly.
            let until = std::time::Instant::now() + poll;
            while std::time::Instant::now() < until {
                if stop.load(Ordering::SeqCst) {
                    return Err(LeaseError::Interrupted {
                        output: self.url(),
                        holder: other.to_string(),
                    });
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

fn try_local(root: &std::path::Path, name: &str, holder: &Holder) -> Result<Attempt, LeaseError> {
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsRawFd;
    let path = root.join(format!(".pixtract-{name}"));
    let io = |source| LeaseError::Io {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(root).map_err(|source| LeaseError::Io {
        path: root.to_path_buf(),
        source,
    })?;
    // Opened without truncation: the holder's description must survive until the lock is ours.
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io)?;
    // SAFETY: flock on a descriptor this function owns; no memory is passed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::WouldBlock {
            return Err(io(err));
        }
        let mut text = String::new();
        // The holder may be rewriting it; an unreadable description is still a held lock.
        let _ = file.read_to_string(&mut text);
        let other = serde_json::from_str(&text)
            .unwrap_or_else(|_| Holder::unknown("unknown", Utc::now(), 0));
        return Ok(Attempt::Busy(other));
    }
    let body = serde_json::to_vec_pretty(holder).unwrap_or_default();
    file.set_len(0)
        .and_then(|_| file.rewind())
        .and_then(|_| file.write_all(&body))
        .and_then(|_| file.flush())
        .map_err(io)?;
    Ok(Attempt::Held(Lease {
        kind: LeaseKind::Local { _file: file },
    }))
}

/// The lease object's holder (None when its body is not a holder: a foreign or damaged object, which expires by
/// its age like any other) and version; None when there is no lease object.
async fn read_holder(
    store: &dyn ObjectStore,
    key: &ObjectPath,
) -> Result<Option<(Option<Holder>, ObjectVersion)>, LeaseError> {
    let object_err = |source| LeaseError::Object {
        key: key.to_string(),
        source,
    };
    // The object and its body in one retried unit: a body cut mid-way is read again.
    let read = crate::store::retry_transient(|| async {
        let got = store.get(key).await?;
        let meta = got.meta.clone();
        let bytes = got.bytes().await?;
        Ok((meta, bytes))
    })
    .await;
    let (meta, bytes) = match read {
        Ok(v) => v,
        Err(object_store::Error::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(object_err(e)),
    };
    let holder = serde_json::from_slice::<Holder>(&bytes).ok();
    Ok(Some((
        holder,
        ObjectVersion {
            version: UpdateVersion {
                e_tag: meta.e_tag,
                version: meta.version,
            },
            last_modified: meta.last_modified,
        },
    )))
}

struct ObjectVersion {
    version: UpdateVersion,
    last_modified: DateTime<Utc>,
}

fn put_mode(mode: PutMode) -> PutOptions {
    PutOptions {
        mode,
        ..PutOptions::default()
    }
}

async fn try_store(
    store: Arc<dyn ObjectStore>,
    key: ObjectPath,
    holder: &Holder,
    on_lost: Arc<AtomicBool>,
) -> Result<Attempt, LeaseError> {
    let object_err = |source| LeaseError::Object {
        key: key.to_string(),
        source,
    };
    let body = || PutPayload::from(serde_json::to_vec_pretty(holder).unwrap_or_default());
    let ttl = Duration::from_secs(holder.ttl_s.max(1));
    // A few rounds: the lease can be released or taken over between the refused create and the read.
    for _ in 0..8 {
        let taken = match crate::store::retry_transient(|| {
            store.put_opts(&key, body(), put_mode(PutMode::Create))
        })
        .await
        {
            Ok(put) => Some(UpdateVersion {
                e_tag: put.e_tag,
                version: put.version,
            }),
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) => None,
            Err(object_store::Error::NotImplemented { .. }) => {
                tracing::warn!(
                    lease = %key,
                    "the output store cannot write conditionally: overlapping runs on this output are not kept apart"
                );
                return Ok(Attempt::Held(Lease {
                    kind: LeaseKind::Unsupported,
                }));
            }
            Err(e) => return Err(object_err(e)),
        };
        let version = match taken {
            Some(v) => v,
            None => {
                let Some((current, seen)) = read_holder(store.as_ref(), &key).await? else {
                    continue; // released in between: create again
                };
                match current {
                    // Our own create, retried after its response was lost.
                    Some(h) if h.run_id == holder.run_id => seen.version,
                    current => {
                        let age = Utc::now() - seen.last_modified;
                        let their_ttl = current
                            .as_ref()
                            .map(|h| Duration::from_secs(h.ttl_s.max(1)))
                            .unwrap_or(ttl);
                        if age.to_std().is_ok_and(|age| age <= their_ttl) {
                            return Ok(Attempt::Busy(current.unwrap_or_else(|| {
                                Holder::unknown(
                                    "unknown (not a pixtract lease)",
                                    seen.last_modified,
                                    their_ttl.as_secs(),
                                )
                            })));
                        }
                        // Expired: take it over, if nobody else did since we read it.
                        let takeover = put_mode(PutMode::Update(seen.version));
                        match crate::store::retry_transient(|| {
                            store.put_opts(&key, body(), takeover.clone())
                        })
                        .await
                        {
                            Ok(put) => {
                                tracing::warn!(lease = %key, previous = ?current.map(|h| h.to_string()), "took over an expired output lease (its run stopped renewing it)");
                                UpdateVersion {
                                    e_tag: put.e_tag,
                                    version: put.version,
                                }
                            }
                            Err(
                                object_store::Error::Precondition { .. }
                                | object_store::Error::NotFound { .. }
                                | object_store::Error::AlreadyExists { .. },
                            ) => continue,
                            Err(e) => return Err(object_err(e)),
                        }
                    }
                }
            }
        };
        let state = Arc::new(Mutex::new(RenewState {
            version: Some(version),
            lost: None,
        }));
        let renew = tokio::spawn(renew_loop(
            store.clone(),
            key.clone(),
            holder.clone(),
            ttl,
            state.clone(),
            on_lost,
        ));
        return Ok(Attempt::Held(Lease {
            kind: LeaseKind::Store {
                store,
                key,
                run_id: holder.run_id.clone(),
                renew,
                state,
            },
        }));
    }
    // Eight rounds of create / read / takeover all lost to other runs: it is theirs.
    Ok(Attempt::Busy(Holder::unknown(
        "another run (the lease changed hands while this run tried to take it)",
        Utc::now(),
        ttl.as_secs(),
    )))
}

/// Renews the lease every `ttl / 4` until aborted; records in `state` when another run has taken it over.
async fn renew_loop(
    store: Arc<dyn ObjectStore>,
    key: ObjectPath,
    holder: Holder,
    ttl: Duration,
    state: Arc<Mutex<RenewState>>,
    on_lost: Arc<AtomicBool>,
) {
    let every = (ttl / 4).max(Duration::from_millis(250));
    loop {
        tokio::time::sleep(every).await;
        let Some(version) = lock(&state).version.clone() else {
            return;
        };
        let body = PutPayload::from(serde_json::to_vec_pretty(&holder).unwrap_or_default());
        match store
            .put_opts(&key, body, put_mode(PutMode::Update(version)))
            .await
        {
            Ok(put) => {
                lock(&state).version = Some(UpdateVersion {
                    e_tag: put.e_tag,
                    version: put.version,
                });
            }
            Err(
                object_store::Error::Precondition { .. } | object_store::Error::NotFound { .. },
            ) => {
                // Refused: either our own renewal went through and its answer was lost, or another run took over.
                match read_holder(store.as_ref(), &key).await {
                    Ok(Some((Some(h), seen))) if h.run_id == holder.run_id => {
                        lock(&state).version = Some(seen.version);
                    }
                    Ok(current) => {
                        let by = current
                            .and_then(|(h, _)| h)
                            .map(|h| h.to_string())
                            .unwrap_or_else(|| "nobody (the lease object is gone)".into());
                        let mut s = lock(&state);
                        s.lost = Some(format!(
                            "lost the output lease (renewal refused; now held by {by})"
                        ));
                        s.version = None;
                        on_lost.store(true, Ordering::SeqCst);
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(lease = %key, error = %crate::error::chain(&e), "cannot read the output lease after a refused renewal; trying again");
                    }
                }
            }
            Err(e) => {
                // Transient (object_store already retried): keep trying; the ttl leaves room for several misses.
                tracing::warn!(lease = %key, error = %crate::error::chain(&e), "renewing the output lease failed; trying again");
            }
        }
    }
}
