//! Document intake, second half: bytes of one document -> RGB pages, at the size the model will use.
//!
//! - Type detection by content ([`DocumentKind::detect`]): PDF, JPEG, PNG, TIFF, WebP; anything else is an error.
//! - PDF pages are rendered by pdfium directly at model size (long side at most [`RasterOptions::max_side`],
//!   aspect kept, optionally capped in DPI), in worker processes ([`worker`]) so that a crash or hang inside
//!   pdfium costs one document, not the job.
//! - Scans (JPEG, PNG, WebP, every page of a TIFF) are decoded at full resolution with EXIF/TIFF orientation
//!   applied and alpha composited on white, and handed on UNSCALED: the only resize allowed before the model is
//!   Pixtral's own ([`crate::imaging`]), because an antialiased pre-downscale changes the model's tokens.
//! - Limits on bytes, pages and pixels turn hostile inputs into [`RasterError`]s that name the document.

pub mod pdf;
pub mod scan;
pub mod text;
pub mod worker;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use image::RgbImage;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

pub use crate::document::{DocumentInfo, FetchError};

/// One page, ready for the model stage.
#[derive(Debug, Clone)]
pub struct PageRaster {
    pub doc: Arc<DocumentInfo>,
    pub kind: DocumentKind,
    /// 0-based.
    pub page_index: usize,
    pub page_count: usize,
    /// PDF: rendered at model size. Scans: full resolution, orientation applied, alpha on white.
    pub image: RgbImage,
    /// Time spent rendering or decoding this page.
    pub render_time: Duration,
    /// The page's text with character boxes (PDF pages with text, when [`RasterOptions::text_layer`] asks for it);
    /// None for scans and for pages without text.
    pub text: Option<Arc<text::TextLayer>>,
}

impl PageRaster {
    pub fn is_last(&self) -> bool {
        self.page_index + 1 >= self.page_count
    }
}

/// Document types recognised by their first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DocumentKind {
    Pdf,
    Jpeg,
    Png,
    Tiff,
    WebP,
}

impl std::fmt::Display for DocumentKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DocumentKind::Pdf => "PDF",
            DocumentKind::Jpeg => "JPEG",
            DocumentKind::Png => "PNG",
            DocumentKind::Tiff => "TIFF",
            DocumentKind::WebP => "WebP",
        })
    }
}

impl DocumentKind {
    /// Detects the type from the content. PDF readers accept a `%PDF-` header anywhere in the first KiB
    /// (mail gateways prepend junk), so this does too.
    pub fn detect(bytes: &[u8]) -> Option<DocumentKind> {
        if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
            return Some(DocumentKind::Jpeg);
        }
        if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
            return Some(DocumentKind::Png);
        }
        if bytes.starts_with(b"II*\0")
            || bytes.starts_with(b"MM\0*")
            || bytes.starts_with(b"II+\0")
            || bytes.starts_with(b"MM\0+")
        {
            return Some(DocumentKind::Tiff);
        }
        if bytes.len() >= 12 && &bytes[0..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
            return Some(DocumentKind::WebP);
        }
        let head = &bytes[..bytes.len().min(1024)];
        if head.windows(5).any(|w| w == b"%PDF-") {
            return Some(DocumentKind::Pdf);
        }
        // A PDF that lost its header line still reads as one (`1 0 obj ... endobj`): let pdfium judge it.
        let has = |needle: &[u8]| head.windows(needle.len()).any(|w| w == needle);
        if has(b" obj") && has(b"endobj") {
            return Some(DocumentKind::Pdf);
        }
        None
    }
}

/// Longest side a scan may have, in pixels (a 2 m receipt at 300 DPI is ~24,000).
pub const MAX_SCAN_SIDE: u64 = 60_000;
/// Largest ratio of a scan's long side to its short side (a receipt is ~1:25).
pub const MAX_SCAN_ASPECT: u64 = 100;

/// How documents are rasterized. The defaults suit Pixtral (long side 1024).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RasterOptions {
    /// PDF pages are rendered with their long side at this many pixels (the model's image size).
    pub max_side: u32,
    /// Optional cap on the PDF render resolution, so small pages (receipts, labels) are not blown up past it.
    pub max_dpi: Option<f32>,
    /// Password for encrypted PDFs.
    pub password: Option<String>,
    /// Documents larger than this are refused.
    pub max_bytes: u64,
    /// Documents with more pages than this are refused.
    pub max_pages: usize,
    /// Images with more pixels than this are refused before decoding (decompression bombs).
    pub max_pixels: u64,
    /// Read each PDF page's text layer too (for grounding extracted values on the page).
    pub text_layer: bool,
}

impl Default for RasterOptions {
    fn default() -> Self {
        RasterOptions {
            max_side: 1024,
            max_dpi: None,
            password: None,
            max_bytes: 256 << 20,
            max_pages: 2000,
            max_pixels: 100_000_000,
            text_layer: false,
        }
    }
}

/// Why a document (or one of its pages) could not be rasterized. Every message names the document.
/// Serializable: PDF worker processes send these to the parent as they are.
#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize, Deserialize)]
pub enum RasterError {
    #[error("{uri}: empty file (0 bytes)")]
    Empty { uri: String },
    #[error(
        "{uri}: not a supported document type (content starts with {head}); supported: PDF, JPEG, PNG, TIFF, WebP"
    )]
    UnknownFormat { uri: String, head: String },
    #[error("{uri}: {size} bytes is over the limit of {limit} bytes per document")]
    TooLarge { uri: String, size: u64, limit: u64 },
    #[error("{uri}: {pages} pages is over the limit of {limit} pages per document")]
    TooManyPages {
        uri: String,
        pages: usize,
        limit: usize,
    },
    #[error(
        "{uri}: page {page}: image of {width}x{height} pixels is over the limit of {limit} pixels (decompression bomb?)"
    )]
    TooManyPixels {
        uri: String,
        page: usize,
        width: u64,
        height: u64,
        limit: u64,
    },
    #[error("{uri}: page {page}: image of {width}x{height} pixels has an unusable shape: {reason}")]
    BadShape {
        uri: String,
        page: usize,
        width: u64,
        height: u64,
        reason: String,
    },
    #[error("{uri}: the PDF is encrypted and needs a password; none was configured")]
    PasswordRequired { uri: String },
    #[error("{uri}: the PDF is encrypted and the configured password does not open it")]
    WrongPassword { uri: String },
    #[error("{uri}: not a readable PDF: {reason}")]
    PdfUnreadable { uri: String, reason: String },
    /// One page of a document that rendered otherwise: its neighbours still get their rows.
    #[error("{uri}: page {page}: cannot render: {reason}")]
    PdfPage {
        uri: String,
        page: usize,
        /// The document's page count.
        count: usize,
        reason: String,
    },
    #[error("{uri}: cannot decode the {kind} image: {reason}")]
    Decode {
        uri: String,
        kind: DocumentKind,
        reason: String,
    },
    #[error("{uri}: the PDF renderer process died on this document ({reason}); it was replaced")]
    WorkerCrashed { uri: String, reason: String },
    #[error(
        "{uri}: rendering took longer than {seconds} s; the renderer process was stopped and replaced"
    )]
    Timeout { uri: String, seconds: u64 },
    /// The source could not hand the document's bytes on (listing, fetching, size limit).
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error("PDF renderer unavailable: {reason}")]
    Renderer { reason: String },
}

impl crate::error::Retryable for RasterError {
    /// A later attempt may succeed (renderer crash or timeout, renderer unavailable, storage unavailable): such a
    /// document is left not done for the next run. Everything else is permanent: recorded once.
    fn is_retryable(&self) -> bool {
        match self {
            RasterError::WorkerCrashed { .. }
            | RasterError::Timeout { .. }
            | RasterError::Renderer { .. } => true,
            RasterError::Fetch(e) => crate::error::Retryable::is_retryable(e),
            _ => false,
        }
    }
}

impl RasterError {
    /// The document the error is about (None for errors of the renderer itself).
    pub fn uri(&self) -> Option<&str> {
        use RasterError::*;
        match self {
            Empty { uri }
            | UnknownFormat { uri, .. }
            | TooLarge { uri, .. }
            | TooManyPages { uri, .. }
            | TooManyPixels { uri, .. }
            | BadShape { uri, .. }
            | PasswordRequired { uri }
            | WrongPassword { uri }
            | PdfUnreadable { uri, .. }
            | PdfPage { uri, .. }
            | Decode { uri, .. }
            | WorkerCrashed { uri, .. }
            | Timeout { uri, .. } => Some(uri),
            Fetch(e) => Some(e.uri()),
            Renderer { .. } => None,
        }
    }

    /// (page, page count) when this is one page's failure, after which the document's other pages still come.
    pub fn failed_page(&self) -> Option<(usize, usize)> {
        match self {
            RasterError::PdfPage { page, count, .. } => Some((*page, *count)),
            _ => None,
        }
    }
}

/// Checks that apply before any decoding: size, emptiness, type.
pub fn precheck(
    doc: &DocumentInfo,
    bytes: &[u8],
    opts: &RasterOptions,
) -> Result<DocumentKind, RasterError> {
    if bytes.is_empty() {
        return Err(RasterError::Empty {
            uri: doc.uri.clone(),
        });
    }
    if bytes.len() as u64 > opts.max_bytes {
        return Err(RasterError::TooLarge {
            uri: doc.uri.clone(),
            size: bytes.len() as u64,
            limit: opts.max_bytes,
        });
    }
    DocumentKind::detect(bytes).ok_or_else(|| RasterError::UnknownFormat {
        uri: doc.uri.clone(),
        head: describe_head(bytes),
    })
}

/// The first bytes, printable ones as text and the others as hex, for error messages.
fn describe_head(bytes: &[u8]) -> String {
    let head = &bytes[..bytes.len().min(8)];
    if head
        .iter()
        .all(|b| b.is_ascii_graphic() || *b == b' ' || *b == b'\n' || *b == b'\r')
    {
        format!("{:?}", String::from_utf8_lossy(head))
    } else {
        let hex: Vec<String> = head.iter().map(|b| format!("{b:02x}")).collect();
        format!("bytes {}", hex.join(" "))
    }
}

/// Rasterizes one document in this process, handing each page to `on_page` as soon as it is ready (return
/// `false` to stop): a page, or one page's failure ([`RasterError::failed_page`]) after which the next page
/// still comes. A failure of the whole document is the returned error. PDFs go through this process's pdfium:
/// use [`Rasterizer`] for crash isolation.
pub fn rasterize_blocking(
    doc: &Arc<DocumentInfo>,
    bytes: &[u8],
    opts: &RasterOptions,
    on_page: &mut dyn FnMut(Result<PageRaster, RasterError>) -> bool,
) -> Result<(), RasterError> {
    let kind = precheck(doc, bytes, opts)?;
    match kind {
        DocumentKind::Pdf => pdf::render(doc, bytes, opts, on_page),
        DocumentKind::Tiff => scan::decode_tiff(doc, bytes, opts, &mut |page| on_page(Ok(page))),
        DocumentKind::Jpeg | DocumentKind::Png | DocumentKind::WebP => {
            let page = scan::decode_single(doc, kind, bytes, opts)?;
            on_page(Ok(page));
            Ok(())
        }
    }
}

/// How PDFs are rendered.
#[derive(Debug, Clone)]
pub enum PdfMode {
    /// In this process (no crash isolation; pdfium serialises all calls).
    InProcess,
    /// In `workers` child processes running `<exe> raster-worker`, each document under `timeout`.
    Workers {
        exe: PathBuf,
        workers: usize,
        timeout: Duration,
    },
}

impl PdfMode {
    /// Worker processes of this very executable (the `pixtract` binary).
    pub fn workers(workers: usize, timeout: Duration) -> Result<PdfMode, RasterError> {
        let exe = std::env::current_exe().map_err(|e| RasterError::Renderer {
            reason: format!("cannot find the pixtract executable for worker processes: {e}"),
        })?;
        Ok(PdfMode::Workers {
            exe,
            workers: workers.max(1),
            timeout,
        })
    }
}

/// One document's pages as they come, in page order; an error ends the document.
pub struct DocumentPages {
    pub doc: Arc<DocumentInfo>,
    pub pages: mpsc::Receiver<Result<PageRaster, RasterError>>,
}

/// Rasterizes documents asynchronously: scans on the blocking thread pool, PDFs in worker processes.
pub struct Rasterizer {
    opts: Arc<RasterOptions>,
    pool: Option<Arc<worker::WorkerPool>>,
}

impl Rasterizer {
    pub fn new(opts: RasterOptions, mode: PdfMode) -> Result<Rasterizer, RasterError> {
        let pool = match mode {
            PdfMode::InProcess => None,
            PdfMode::Workers {
                exe,
                workers,
                timeout,
            } => Some(Arc::new(worker::WorkerPool::new(exe, workers, timeout)?)),
        };
        Ok(Rasterizer {
            opts: Arc::new(opts),
            pool,
        })
    }

    pub fn options(&self) -> &RasterOptions {
        &self.opts
    }

    /// Starts rasterizing one document; pages arrive on the returned channel (bounded: a slow consumer holds
    /// the renderer back rather than piling pages up in memory).
    pub fn document(&self, doc: DocumentInfo, bytes: Bytes) -> DocumentPages {
        let doc = Arc::new(doc);
        let (tx, rx) = mpsc::channel(2);
        let opts = self.opts.clone();
        let pool = self.pool.clone();
        let task_doc = doc.clone();
        tracing::debug!(uri = %task_doc.uri, "document task spawned");
        tokio::spawn(async move {
            let kind = match precheck(&task_doc, &bytes, &opts) {
                Ok(kind) => kind,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            match (kind, pool) {
                (DocumentKind::Pdf, Some(pool)) => {
                    pool.render(task_doc, bytes, opts, tx).await;
                }
                _ => {
                    let err_tx = tx.clone();
                    let joined = tokio::task::spawn_blocking(move || {
                        rasterize_blocking(&task_doc, &bytes, &opts, &mut |page| {
                            tx.blocking_send(page).is_ok()
                        })
                    })
                    .await;
                    let result = match joined {
                        Ok(r) => r,
                        Err(e) => Err(RasterError::Renderer {
                            reason: format!("rasterizing thread failed: {e}"),
                        }),
                    };
                    if let Err(e) = result {
                        let _ = err_tx.send(Err(e)).await;
                    }
                }
            }
        });
        DocumentPages { doc, pages: rx }
    }

    /// Rasterizes a stream of fetched documents, `parallel` at a time, yielding each document's pages in
    /// document order. Memory stays bounded: at most `parallel` documents are in flight, each with a couple of
    /// pages buffered.
    pub fn documents<'a, S>(
        &'a self,
        docs: S,
        parallel: usize,
    ) -> impl Stream<Item = DocumentPages> + 'a
    where
        S: Stream<Item = Result<(DocumentInfo, Bytes), RasterError>> + 'a,
    {
        // The rendering task starts in `map` itself, when `buffered` pulls the document into its window, not
        // when its future is first polled: `buffered` polls queued futures only until one completes, so a start
        // inside an async block would wait until the consumer asked for that document (one render at a time).
        docs.map(move |item| {
            futures::future::ready(match item {
                Ok((doc, bytes)) => self.document(doc, bytes),
                Err(e) => {
                    let (tx, rx) = mpsc::channel(1);
                    let doc = Arc::new(DocumentInfo::named(e.uri().unwrap_or("?"), 0));
                    let _ = tx.try_send(Err(e));
                    DocumentPages { doc, pages: rx }
                }
            })
        })
        .buffered(parallel.max(1))
    }

    /// Like [`Rasterizer::documents`], flattened to pages and per-document errors.
    pub fn pages<'a, S>(
        &'a self,
        docs: S,
        parallel: usize,
    ) -> impl Stream<Item = Result<PageRaster, RasterError>> + 'a
    where
        S: Stream<Item = Result<(DocumentInfo, Bytes), RasterError>> + 'a,
    {
        self.documents(docs, parallel).flat_map(|d| {
            futures::stream::unfold(d.pages, |mut rx| async move {
                rx.recv().await.map(|item| (item, rx))
            })
        })
    }
}
