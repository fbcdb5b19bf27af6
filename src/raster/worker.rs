//! PDF rendering in worker processes: `pixtract raster-worker` children, one document at a time each.
//!
//! pdfium serialises every call behind one global lock and can crash or loop on hostile files; its authors
//! advise processes for parallelism. A worker that dies or overruns the per-document timeout costs that
//! document an error ([`RasterError::WorkerCrashed`], [`RasterError::Timeout`]) and is replaced on the next
//! document; the others carry on.
//!
//! Protocol over the child's stdin/stdout, both ways the same frame: `u32 LE` header length, header (JSON),
//! `u64 LE` payload length, payload. Request: header [`Request`], payload the document bytes. Replies, in order:
//! [`Reply::Page`] (payload: RGB8 pixels, row-major, then the page's text layer if it has one) per page, then [`Reply::Done`] or [`Reply::Error`].

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use image::RgbImage;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::{Semaphore, mpsc};

use super::text::{MAX_CHARS_PER_PAGE, TextLayer};
use super::{DocumentInfo, DocumentKind, PageRaster, RasterError, RasterOptions};
use crate::native::{NativeLibrary, SearchPaths};

/// Hidden subcommand name the parent runs.
pub const SUBCOMMAND: &str = "raster-worker";

/// Set to `1` in a worker's environment to enable fault injection for tests: a document whose URI ends in
/// `.crash-fault.pdf` aborts the worker, one ending in `.hang-fault.pdf` makes it sleep forever.
pub const FAULT_ENV: &str = "PIXTRACT_WORKER_FAULTS";

/// Largest header accepted (a sanity bound against a garbled stream).
const MAX_HEADER: u32 = 1 << 20;

#[derive(Debug, Serialize, Deserialize)]
pub struct Request {
    pub doc: DocumentInfo,
    pub opts: RasterOptions,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Reply {
    Page {
        index: usize,
        count: usize,
        width: u32,
        height: u32,
        render_ns: u64,
        /// Characters of the page's text layer after the pixels in the payload ([`TextLayer::encode`]); None
        /// when the page has none.
        #[serde(default)]
        text_chars: Option<usize>,
    },
    /// One page failed; the document's next pages follow.
    PageError(RasterError),
    Done,
    Error(RasterError),
}

fn write_frame(out: &mut impl Write, header: &[u8], payload: &[u8]) -> std::io::Result<()> {
    out.write_all(&(header.len() as u32).to_le_bytes())?;
    out.write_all(header)?;
    out.write_all(&(payload.len() as u64).to_le_bytes())?;
    out.write_all(payload)?;
    out.flush()
}

fn read_frame(input: &mut impl Read) -> std::io::Result<Option<(Vec<u8>, Vec<u8>)>> {
    let mut len = [0u8; 4];
    match input.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let hlen = u32::from_le_bytes(len);
    if hlen > MAX_HEADER {
        return Err(std::io::Error::other("frame header too large"));
    }
    let mut header = vec![0u8; hlen as usize];
    input.read_exact(&mut header)?;
    let mut plen = [0u8; 8];
    input.read_exact(&mut plen)?;
    let mut payload = vec![0u8; u64::from_le_bytes(plen) as usize];
    input.read_exact(&mut payload)?;
    Ok(Some((header, payload)))
}

/// Every rendered page is a fresh 2-4 MB buffer (pdfium's bitmap, the RGB rows), which glibc serves with mmap and
/// returns with munmap: each page paid ~1,000 page faults and the kernel's zeroing (13% of the raster processes'
/// time in clear_page). A worker is one thread rendering one page at a time, so raising the mmap threshold keeps
/// those buffers in its heap for the next page at the cost of one page's worth of memory. (Not in the parent: its
/// many threads each keep an arena, and the same setting there raised `pixtract pages` from 68 to 369 MB.)
fn keep_page_buffers_in_the_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; called before the worker allocates its first page.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
    }
}

/// Address space a worker may map (pdfium on a hostile file fails an allocation there and the worker dies with
/// one document's error, instead of the machine swapping). `PIXTRACT_WORKER_MAX_MEMORY_MB` overrides it.
pub const WORKER_ADDRESS_SPACE: u64 = 4 << 30;
/// The variable that sets a worker's address-space limit, in MiB.
pub const MEMORY_ENV: &str = "PIXTRACT_WORKER_MAX_MEMORY_MB";

/// The variables a worker keeps from the parent's environment (everything else, cloud credentials included, is
/// cleared): the pdfium path is set explicitly, these only help it run and log.
const WORKER_ENV: &[&str] = &[
    "PATH",
    "LD_LIBRARY_PATH",
    "TMPDIR",
    "LANG",
    "LC_ALL",
    "RUST_BACKTRACE",
    FAULT_ENV,
    MEMORY_ENV,
];

/// A worker's own process settings: Ctrl-C in the terminal is the parent's business (the parent decides whether
/// a document in flight finishes), and its memory is capped.
fn harden_worker() {
    #[cfg(unix)]
    // SAFETY: setting a signal's disposition to SIG_IGN and lowering this process's own rlimit have no memory
    // effects; called first thing in the worker, before any other thread exists.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        let bytes = std::env::var(MEMORY_ENV)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .map(|mb| mb << 20)
            .unwrap_or(WORKER_ADDRESS_SPACE);
        let limit = libc::rlimit {
            rlim_cur: bytes as libc::rlim_t,
            rlim_max: bytes as libc::rlim_t,
        };
        if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
            eprintln!("pixtract raster-worker: cannot set the address-space limit");
        }
    }
}

/// The worker's main loop: requests from stdin until it closes. Returns the process exit code.
pub fn run_worker() -> ExitCode {
    harden_worker();
    keep_page_buffers_in_the_heap();
    let faults = std::env::var(FAULT_ENV).is_ok_and(|v| v == "1");
    let mut stdin = std::io::stdin().lock();
    let mut stdout = std::io::BufWriter::new(std::io::stdout().lock());
    loop {
        let (header, payload) = match read_frame(&mut stdin) {
            Ok(Some(frame)) => frame,
            Ok(None) => return ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("pixtract raster-worker: reading a request: {e}");
                return ExitCode::FAILURE;
            }
        };
        let request: Request = match serde_json::from_slice(&header) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("pixtract raster-worker: bad request: {e}");
                return ExitCode::FAILURE;
            }
        };
        if faults {
            if request.doc.uri.ends_with(".crash-fault.pdf") {
                std::process::abort();
            }
            if request.doc.uri.ends_with(".hang-fault.pdf") {
                loop {
                    std::thread::sleep(Duration::from_secs(3600));
                }
            }
        }
        let doc = Arc::new(request.doc);
        let mut io_error = None;
        let mut payload_out = Vec::new();
        let result = super::pdf::render(&doc, &payload, &request.opts, &mut |page| {
            payload_out.clear();
            let reply = match &page {
                Ok(page) => {
                    payload_out.extend_from_slice(page.image.as_raw());
                    if let Some(text) = &page.text {
                        text.encode(&mut payload_out);
                    }
                    Reply::Page {
                        index: page.page_index,
                        count: page.page_count,
                        width: page.image.width(),
                        height: page.image.height(),
                        render_ns: page.render_time.as_nanos() as u64,
                        text_chars: page.text.as_ref().map(|t| t.chars.len()),
                    }
                }
                Err(e) => Reply::PageError(e.clone()),
            };
            let header = serde_json::to_vec(&reply).unwrap_or_default();
            match write_frame(&mut stdout, &header, &payload_out) {
                Ok(()) => true,
                Err(e) => {
                    io_error = Some(e);
                    false
                }
            }
        });
        if let Some(e) = io_error {
            eprintln!("pixtract raster-worker: writing a page: {e}");
            return ExitCode::FAILURE;
        }
        let reply = match result {
            Ok(()) => Reply::Done,
            Err(e) => Reply::Error(e),
        };
        let header = serde_json::to_vec(&reply).unwrap_or_default();
        if let Err(e) = write_frame(&mut stdout, &header, &[]) {
            eprintln!("pixtract raster-worker: writing a reply: {e}");
            return ExitCode::FAILURE;
        }
    }
}

struct Worker {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

/// Why a rendering session with a worker ended early.
enum SessionEnd {
    /// The worker broke the protocol or its pipe closed: it died.
    Broken(String),
    /// The receiver of the pages went away; the worker is mid-document and must be discarded.
    ConsumerGone,
    /// The worker ran past the time budget.
    TimedOut,
}

/// A fixed number of worker processes, started lazily and replaced when they die.
pub struct WorkerPool {
    exe: PathBuf,
    pdfium: PathBuf,
    timeout: Duration,
    permits: Semaphore,
    idle: Mutex<Vec<Worker>>,
}

impl WorkerPool {
    pub fn new(exe: PathBuf, workers: usize, timeout: Duration) -> Result<WorkerPool, RasterError> {
        // Locate pdfium here so a missing library is one clear error up front, and every worker binds the same.
        let pdfium = SearchPaths::from_env()
            .locate(NativeLibrary::Pdfium)
            .map_err(|e| RasterError::Renderer {
                reason: e.to_string(),
            })?
            .path;
        Ok(WorkerPool {
            exe,
            pdfium,
            timeout,
            permits: Semaphore::new(workers.max(1)),
            idle: Mutex::new(Vec::new()),
        })
    }

    fn spawn(&self) -> Result<Worker, String> {
        let mut command = Command::new(&self.exe);
        // A cleared environment: no cloud credentials or tokens in a process that parses hostile files.
        command.env_clear();
        for key in WORKER_ENV {
            if let Some(value) = std::env::var_os(key) {
                command.env(key, value);
            }
        }
        // Its own process group: a Ctrl-C in the terminal (SIGINT to the foreground group) reaches the parent
        // only, which finishes the documents in flight rather than losing them with their renderer.
        #[cfg(unix)]
        command.process_group(0);
        let mut child = command
            .arg(SUBCOMMAND)
            .env(NativeLibrary::Pdfium.env_var(), &self.pdfium)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start {} {SUBCOMMAND}: {e}", self.exe.display()))?;
        let stdin = child.stdin.take().ok_or("worker has no stdin")?;
        let stdout = child.stdout.take().ok_or("worker has no stdout")?;
        enlarge_pipe(&stdout);
        Ok(Worker {
            child,
            stdin,
            stdout: BufReader::with_capacity(1 << 20, stdout),
        })
    }

    /// Renders one PDF in a worker, sending its pages (then an error, if any) to `tx`.
    pub async fn render(
        &self,
        doc: Arc<DocumentInfo>,
        bytes: Bytes,
        opts: Arc<RasterOptions>,
        tx: mpsc::Sender<Result<PageRaster, RasterError>>,
    ) {
        let Ok(_permit) = self.permits.acquire().await else {
            return;
        };
        let pooled = self.idle.lock().ok().and_then(|mut idle| idle.pop());
        tracing::debug!(uri = %doc.uri, pooled = pooled.is_some(), "worker session starts");
        let mut worker = match pooled {
            Some(w) => w,
            None => match self.spawn() {
                Ok(w) => w,
                Err(reason) => {
                    let _ = tx.send(Err(RasterError::Renderer { reason })).await;
                    return;
                }
            },
        };
        match self.session(&mut worker, &doc, &bytes, &opts, &tx).await {
            Ok(()) => {
                if let Ok(mut idle) = self.idle.lock() {
                    idle.push(worker);
                }
            }
            Err(end) => {
                let error = match end {
                    SessionEnd::ConsumerGone => None,
                    SessionEnd::TimedOut => Some(RasterError::Timeout {
                        uri: doc.uri.clone(),
                        seconds: self.timeout.as_secs().max(1),
                    }),
                    SessionEnd::Broken(reason) => Some(RasterError::WorkerCrashed {
                        uri: doc.uri.clone(),
                        reason: death_reason(&mut worker.child, reason).await,
                    }),
                };
                let _ = worker.child.start_kill();
                let _ = worker.child.wait().await;
                if let Some(e) = error {
                    let _ = tx.send(Err(e)).await;
                }
            }
        }
    }

    async fn session(
        &self,
        worker: &mut Worker,
        doc: &Arc<DocumentInfo>,
        bytes: &[u8],
        opts: &RasterOptions,
        tx: &mpsc::Sender<Result<PageRaster, RasterError>>,
    ) -> Result<(), SessionEnd> {
        // The budget counts the worker's time only, not time spent waiting for a slow consumer.
        let mut budget = self.timeout;
        let request = Request {
            doc: (**doc).clone(),
            opts: opts.clone(),
        };
        let header = serde_json::to_vec(&request).map_err(|e| SessionEnd::Broken(e.to_string()))?;
        let started = Instant::now();
        let write = async {
            let w = &mut worker.stdin;
            w.write_all(&(header.len() as u32).to_le_bytes()).await?;
            w.write_all(&header).await?;
            w.write_all(&(bytes.len() as u64).to_le_bytes()).await?;
            w.write_all(bytes).await?;
            w.flush().await
        };
        match tokio::time::timeout(budget, write).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(SessionEnd::Broken(format!("sending the document: {e}"))),
            Err(_) => return Err(SessionEnd::TimedOut),
        }
        budget = budget.saturating_sub(started.elapsed());
        loop {
            let started = Instant::now();
            // No page is larger than max_side x max_side RGB plus its capped text layer: a longer frame is garbage,
            // never allocated.
            let max_payload = (opts.max_side as u64 + 1).pow(2) * 3
                + TextLayer::encoded_len(MAX_CHARS_PER_PAGE) as u64;
            let frame = match tokio::time::timeout(
                budget,
                read_frame_async(&mut worker.stdout, max_payload),
            )
            .await
            {
                Ok(Ok(frame)) => frame,
                Ok(Err(e)) => return Err(SessionEnd::Broken(e)),
                Err(_) => return Err(SessionEnd::TimedOut),
            };
            budget = budget.saturating_sub(started.elapsed());
            let (header, payload) = frame;
            let reply: Reply = serde_json::from_slice(&header)
                .map_err(|e| SessionEnd::Broken(format!("garbled reply: {e}")))?;
            match reply {
                Reply::Page {
                    index,
                    count,
                    width,
                    height,
                    render_ns,
                    text_chars,
                } => {
                    let mut payload = payload;
                    let pixels = (width as usize) * (height as usize) * 3;
                    if payload.len() < pixels {
                        return Err(SessionEnd::Broken(
                            "page pixels do not match the page size".into(),
                        ));
                    }
                    let text_bytes = payload.split_off(pixels);
                    let text = match text_chars {
                        None if text_bytes.is_empty() => None,
                        None => {
                            return Err(SessionEnd::Broken(
                                "page payload longer than its pixels".into(),
                            ));
                        }
                        Some(n) => Some(Arc::new(
                            TextLayer::decode(&text_bytes, n)
                                .ok_or_else(|| SessionEnd::Broken("garbled text layer".into()))?,
                        )),
                    };
                    let image = RgbImage::from_raw(width, height, payload).ok_or_else(|| {
                        SessionEnd::Broken("page pixels do not match the page size".into())
                    })?;
                    let page = PageRaster {
                        doc: doc.clone(),
                        kind: DocumentKind::Pdf,
                        page_index: index,
                        page_count: count,
                        image,
                        render_time: Duration::from_nanos(render_ns),
                        text,
                    };
                    if tx.send(Ok(page)).await.is_err() {
                        return Err(SessionEnd::ConsumerGone);
                    }
                }
                Reply::PageError(e) => {
                    if tx.send(Err(e)).await.is_err() {
                        return Err(SessionEnd::ConsumerGone);
                    }
                }
                Reply::Done => return Ok(()),
                Reply::Error(e) => {
                    let _ = tx.send(Err(e)).await;
                    return Ok(());
                }
            }
        }
    }
}

async fn read_frame_async(
    input: &mut BufReader<ChildStdout>,
    max_payload: u64,
) -> Result<(Vec<u8>, Vec<u8>), String> {
    let eof = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            "its output ended".to_string()
        } else {
            format!("reading its output: {e}")
        }
    };
    let hlen = input.read_u32_le().await.map_err(eof)?;
    if hlen > MAX_HEADER {
        return Err("garbled reply (header too large)".into());
    }
    let mut header = vec![0u8; hlen as usize];
    input.read_exact(&mut header).await.map_err(eof)?;
    let plen = input.read_u64_le().await.map_err(eof)?;
    // A page is at most max_side^2 RGB pixels; refuse longer frames rather than allocating them.
    if plen > max_payload {
        return Err(format!(
            "garbled reply (payload of {plen} bytes, over a page's {max_payload})"
        ));
    }
    let mut payload = vec![0u8; plen as usize];
    input.read_exact(&mut payload).await.map_err(eof)?;
    Ok((header, payload))
}

/// The worker's exit status in words, when it has one shortly after its pipe broke.
async fn death_reason(child: &mut Child, fallback: String) -> String {
    match tokio::time::timeout(Duration::from_secs(2), child.wait()).await {
        Ok(Ok(status)) => {
            #[cfg(unix)]
            {
                use std::os::unix::process::ExitStatusExt;
                if let Some(sig) = status.signal() {
                    let name = match sig {
                        4 => " (SIGILL)",
                        6 => " (SIGABRT)",
                        7 => " (SIGBUS)",
                        8 => " (SIGFPE)",
                        9 => " (SIGKILL, out of memory?)",
                        11 => " (SIGSEGV)",
                        _ => "",
                    };
                    return format!("killed by signal {sig}{name}");
                }
            }
            match status.code() {
                Some(code) => format!("exited with status {code}"),
                None => fallback,
            }
        }
        _ => fallback,
    }
}

/// A page is ~2.4 MB of RGB; through Linux's default 64 KiB pipe that is ~40 write/wake/read round trips between
/// worker and parent per page (measured: 2 workers slower than 1 in-process renderer). A pipe of the allowed
/// maximum (`/proc/sys/fs/pipe-max-size`, 1 MiB by default; 4 MiB when permitted) takes a page in a few.
#[cfg(target_os = "linux")]
fn enlarge_pipe(stdout: &tokio::process::ChildStdout) {
    use std::os::fd::AsRawFd;
    let fd = stdout.as_raw_fd();
    let max = std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .unwrap_or(1 << 20);
    for size in [4 << 20, max] {
        // SAFETY: fcntl on a pipe descriptor we own; F_SETPIPE_SZ only resizes the kernel buffer.
        if unsafe { libc::fcntl(fd, libc::F_SETPIPE_SZ, size) } >= 0 {
            return;
        }
    }
    tracing::debug!("could not enlarge the worker pipe; using the default size");
}

#[cfg(not(target_os = "linux"))]
fn enlarge_pipe(_stdout: &tokio::process::ChildStdout) {}
