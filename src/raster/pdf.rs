//! PDF pages through pdfium, rendered directly at model size.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use image::RgbImage;
use pdfium_render::prelude::*;

use super::text::TextLayer;
use super::{DocumentInfo, DocumentKind, PageRaster, RasterError, RasterOptions};
use crate::native::{NativeLibrary, SearchPaths};

/// The process's pdfium, bound once (pdfium-render refuses a second binding).
pub fn pdfium() -> Result<&'static Pdfium, RasterError> {
    static PDFIUM: OnceLock<Result<Pdfium, String>> = OnceLock::new();
    PDFIUM
        .get_or_init(|| {
            let loc = SearchPaths::from_env()
                .locate(NativeLibrary::Pdfium)
                .map_err(|e| e.to_string())?;
            let bindings = Pdfium::bind_to_library(&loc.path)
                .map_err(|e| format!("cannot load {}: {e}", loc.path.display()))?;
            Ok(Pdfium::new(bindings))
        })
        .as_ref()
        .map_err(|reason| RasterError::Renderer {
            reason: reason.clone(),
        })
}

/// Pixel size of a page of `width` x `height` points: long side `max_side`, aspect kept, at most `max_dpi`.
pub fn render_size(width_pt: f32, height_pt: f32, opts: &RasterOptions) -> Option<(u32, u32)> {
    if !(width_pt.is_finite() && height_pt.is_finite() && width_pt > 0.0 && height_pt > 0.0) {
        return None;
    }
    let mut scale = opts.max_side as f64 / width_pt.max(height_pt) as f64;
    if let Some(dpi) = opts.max_dpi {
        scale = scale.min(dpi as f64 / 72.0);
    }
    let px = |pt: f32| ((pt as f64 * scale).round() as u32).clamp(1, opts.max_side);
    Some((px(width_pt), px(height_pt)))
}

/// Opening errors in words: pdfium's own errors only say their variant names.
fn open_error(doc: &DocumentInfo, e: PdfiumError, opts: &RasterOptions) -> RasterError {
    let uri = doc.uri.clone();
    match e {
        PdfiumError::PdfiumLibraryInternalError(PdfiumInternalError::PasswordError) => {
            if opts.password.is_some() {
                RasterError::WrongPassword { uri }
            } else {
                RasterError::PasswordRequired { uri }
            }
        }
        PdfiumError::PdfiumLibraryInternalError(PdfiumInternalError::FormatError) => {
            RasterError::PdfUnreadable {
                uri,
                reason: "damaged, truncated or not a PDF (pdfium could not parse it)".into(),
            }
        }
        PdfiumError::PdfiumLibraryInternalError(PdfiumInternalError::SecurityError) => {
            RasterError::PdfUnreadable {
                uri,
                reason: "unsupported security handler (encryption scheme)".into(),
            }
        }
        PdfiumError::PdfiumLibraryInternalError(PdfiumInternalError::FileError) => {
            RasterError::PdfUnreadable {
                uri,
                reason: "pdfium could not read the data".into(),
            }
        }
        other => RasterError::PdfUnreadable {
            uri,
            reason: format!("pdfium refused it ({})", describe(&other)),
        },
    }
}

/// A short description of a pdfium error for page-level failures.
fn describe(e: &PdfiumError) -> String {
    match e {
        PdfiumError::PdfiumLibraryInternalError(PdfiumInternalError::PageError) => {
            "pdfium could not load the page".into()
        }
        PdfiumError::PdfiumLibraryInternalError(PdfiumInternalError::FormatError) => {
            "the page content is damaged".into()
        }
        PdfiumError::PdfiumLibraryInternalError(_) => "pdfium internal error".into(),
        other => {
            // Variant name only: pdfium-render's Display is its Debug text.
            let s = format!("{other:?}");
            let name: String = s
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            format!("pdfium error {name}")
        }
    }
}

/// Renders every page of a PDF in this process. A page that cannot be rendered is handed on as its error
/// ([`RasterError::PdfPage`]) and the next page is tried: one damaged page must not cost the document's others.
pub fn render(
    doc: &Arc<DocumentInfo>,
    bytes: &[u8],
    opts: &RasterOptions,
    on_page: &mut dyn FnMut(Result<PageRaster, RasterError>) -> bool,
) -> Result<(), RasterError> {
    let pdfium = pdfium()?;
    let document = pdfium
        .load_pdf_from_byte_slice(bytes, opts.password.as_deref())
        .map_err(|e| open_error(doc, e, opts))?;
    let pages = document.pages();
    let count = pages.len().max(0) as usize;
    if count == 0 {
        // An encrypted document opened without the right password can show up as "no pages" rather than as
        // a password error (pdfium 8149 does so on two encrypted pdf.js test files).
        let encrypted = !matches!(
            document.permissions().security_handler_revision(),
            Ok(PdfSecurityHandlerRevision::Unprotected)
        );
        if encrypted {
            return Err(if opts.password.is_some() {
                RasterError::WrongPassword {
                    uri: doc.uri.clone(),
                }
            } else {
                RasterError::PasswordRequired {
                    uri: doc.uri.clone(),
                }
            });
        }
        return Err(RasterError::PdfUnreadable {
            uri: doc.uri.clone(),
            reason: "the document has no pages".into(),
        });
    }
    if count > opts.max_pages {
        return Err(RasterError::TooManyPages {
            uri: doc.uri.clone(),
            pages: count,
            limit: opts.max_pages,
        });
    }
    for index in 0..count {
        let start = Instant::now();
        let rendered = render_page(doc, pages, index, count, opts);
        let keep_going = on_page(rendered.map(|(image, text)| PageRaster {
            doc: doc.clone(),
            kind: DocumentKind::Pdf,
            page_index: index,
            page_count: count,
            image,
            render_time: start.elapsed(),
            text,
        }));
        if !keep_going {
            break;
        }
    }
    Ok(())
}

/// One page at model size, with its text layer when asked.
fn render_page(
    doc: &DocumentInfo,
    pages: &PdfPages,
    index: usize,
    count: usize,
    opts: &RasterOptions,
) -> Result<(RgbImage, Option<Arc<TextLayer>>), RasterError> {
    let page_err = |reason: String| RasterError::PdfPage {
        uri: doc.uri.clone(),
        page: index + 1,
        count,
        reason,
    };
    let page = pages
        .get(index as PdfPageIndex)
        .map_err(|e| page_err(describe(&e)))?;
    let (w, h) = render_size(page.width().value, page.height().value, opts)
        .ok_or_else(|| page_err("the page has an empty or invalid size".into()))?;
    let config = PdfRenderConfig::new()
        .set_target_size(w as Pixels, h as Pixels)
        .set_maximum_width(opts.max_side as Pixels)
        .set_maximum_height(opts.max_side as Pixels)
        // 24-bit, with pdfium writing R,G,B in that order (FPDF_REVERSE_BYTE_ORDER): each row is already the
        // RgbImage's row, so the copy below is one memcpy per row, no per-pixel shuffle.
        .set_format(PdfBitmapFormat::BGR)
        .set_reverse_byte_order(true)
        .set_clear_color(PdfColor::WHITE);
    let bitmap = page
        .render_with_config(&config)
        .map_err(|e| page_err(describe(&e)))?;
    let image = rgb_rows(&bitmap).ok_or_else(|| page_err("unexpected bitmap layout".into()))?;
    let text = if opts.text_layer {
        super::text::page_text(&page)
    } else {
        None
    };
    Ok((image, text))
}

/// The bitmap's rows without stride padding (24-bit RGB, see the render config).
fn rgb_rows(bitmap: &PdfBitmap) -> Option<RgbImage> {
    let (w, h) = (bitmap.width() as usize, bitmap.height() as usize);
    if w == 0 || h == 0 {
        return None;
    }
    let raw = bitmap.as_raw_bytes();
    let stride = raw.len() / h;
    if stride < w * 3 {
        return None;
    }
    if stride == w * 3 {
        return RgbImage::from_raw(w as u32, h as u32, raw);
    }
    let mut out = Vec::with_capacity(w * h * 3);
    for row in raw.chunks_exact(stride).take(h) {
        out.extend_from_slice(&row[..w * 3]);
    }
    RgbImage::from_raw(w as u32, h as u32, out)
}
