//! Reading documents' pages outside a run: `pixtract locate`, `pixtract eval --grounding` and the review page
//! render documents (and read their text layers) through the same source and raster stages a run uses, one
//! document at a time.

use std::sync::Arc;

use futures::StreamExt;

use super::PipelineError;
use crate::document::FetchError;
use crate::extract::ground::PageText;
use crate::raster::{DocumentInfo, PageRaster, PdfMode, RasterError, RasterOptions, Rasterizer};
use crate::source::{ListOptions, Source};

/// One document's pages, in order; a page that failed is its error. `error` is the document's own failure (it
/// could not be fetched or opened).
pub struct ReadDocument {
    pub doc: Arc<DocumentInfo>,
    /// The document's name below the URI it was listed from.
    pub name: String,
    pub pages: Vec<Result<PageRaster, RasterError>>,
    pub error: Option<RasterError>,
}

impl ReadDocument {
    /// The text layers of the pages that rendered and have one, each with its page number (1-based).
    pub fn text_pages(&self) -> Vec<PageText<'_>> {
        self.pages
            .iter()
            .filter_map(|p| p.as_ref().ok())
            .filter_map(|p| Some(PageText::new(p.page_index as u32 + 1, p.text.as_deref()?)))
            .collect()
    }
}

/// The first document [`read_documents`] finds at `uri` (a row's `source_uri`), None when there is none.
pub async fn read_document(
    uri: &str,
    opts: RasterOptions,
) -> Result<Option<ReadDocument>, PipelineError> {
    let mut read = None;
    read_documents(uri, opts, Vec::new(), |d| {
        read = Some(d);
        false
    })
    .await?;
    Ok(read)
}

/// Reads every document under `uri` (a file, folder or object store URL) matching `include` (every document when
/// empty) and hands each to `each` once all its pages are read; `each` returns false to stop. PDFs render in one
/// worker process, so a document that crashes pdfium costs only itself.
pub async fn read_documents(
    uri: &str,
    opts: RasterOptions,
    include: Vec<String>,
    mut each: impl FnMut(ReadDocument) -> bool,
) -> Result<(), PipelineError> {
    let source = Source::open(uri)?;
    let timeout = std::time::Duration::from_secs(120);
    let list = ListOptions {
        include,
        exclude: Vec::new(),
        max_bytes: opts.max_bytes,
    };
    let rasterizer = Rasterizer::new(opts, PdfMode::workers(1, timeout)?)?;
    let fetched = source.fetch_all(&list, 4)?;
    let (fetched, listing) = crate::source::stop_at_fatal(fetched);
    let fetched = fetched.map(|r| r.map_err(|e| RasterError::from(FetchError::from(e))));
    let mut stream = std::pin::pin!(rasterizer.documents(fetched, 1));
    while let Some(mut doc) = stream.next().await {
        let mut read = ReadDocument {
            name: source.relative_name(&doc.doc),
            doc: doc.doc.clone(),
            pages: Vec::new(),
            error: None,
        };
        while let Some(item) = doc.pages.recv().await {
            match item {
                Err(e) if e.failed_page().is_none() => read.error = Some(e),
                page => read.pages.push(page),
            }
        }
        if !each(read) {
            break;
        }
    }
    if let Some(e) = listing.lock().ok().and_then(|mut f| f.take()) {
        return Err(e.into());
    }
    Ok(())
}
