//! Scans: JPEG, PNG, WebP through the `image` crate; TIFF (every page) through the `tiff` crate.
//!
//! Images are decoded at full resolution (within the pixel limit), orientation applied (EXIF, or the TIFF
//! Orientation tag), alpha composited on white, and handed on unscaled: the model's Pixtral resize is the only
//! resize they get.

use std::io::Cursor;
use std::sync::Arc;
use std::time::Instant;

use image::metadata::Orientation;
use image::{DynamicImage, ImageBuffer, ImageDecoder, ImageFormat, ImageReader};

use super::{
    DocumentInfo, DocumentKind, MAX_SCAN_ASPECT, MAX_SCAN_SIDE, PageRaster, RasterError,
    RasterOptions,
};
use crate::imaging::into_rgb_on_white;

fn check_pixels(
    doc: &DocumentInfo,
    page: usize,
    width: u32,
    height: u32,
    opts: &RasterOptions,
) -> Result<(), RasterError> {
    let (w, h) = (width as u64, height as u64);
    if w * h > opts.max_pixels {
        return Err(RasterError::TooManyPixels {
            uri: doc.uri.clone(),
            page,
            width: w,
            height: h,
            limit: opts.max_pixels,
        });
    }
    let shape = |reason: String| RasterError::BadShape {
        uri: doc.uri.clone(),
        page,
        width: w,
        height: h,
        reason,
    };
    let (long, short) = (w.max(h), w.min(h));
    if short == 0 {
        return Err(shape("no pixels".into()));
    }
    if long > MAX_SCAN_SIDE {
        return Err(shape(format!(
            "its long side is over the limit of {MAX_SCAN_SIDE} pixels"
        )));
    }
    if long > short.saturating_mul(MAX_SCAN_ASPECT) {
        return Err(shape(format!(
            "its aspect ratio is over the limit of 1:{MAX_SCAN_ASPECT}"
        )));
    }
    Ok(())
}

/// Memory all scan decodes in this process may hold at once: each decode reserves its image's bytes before
/// decoding (the pixel limit bounds one image; this bounds several decoded in parallel, so a folder of
/// decompression bombs at the pixel limit cannot take hundreds of MB each at the same time).
pub const DECODE_BUDGET_BYTES: u64 = 512 << 20;

struct DecodeBudget {
    used: std::sync::Mutex<u64>,
    freed: std::sync::Condvar,
}

static BUDGET: DecodeBudget = DecodeBudget {
    used: std::sync::Mutex::new(0),
    freed: std::sync::Condvar::new(),
};

/// A reservation of decode memory, returned when dropped.
struct Reserved(u64);

/// Waits until `bytes` fit in the budget (an image larger than the whole budget waits until it is alone).
fn reserve(bytes: u64) -> Reserved {
    let bytes = bytes.min(DECODE_BUDGET_BYTES);
    let mut used = BUDGET.used.lock().unwrap_or_else(|p| p.into_inner());
    while *used + bytes > DECODE_BUDGET_BYTES {
        used = BUDGET.freed.wait(used).unwrap_or_else(|p| p.into_inner());
    }
    *used += bytes;
    Reserved(bytes)
}

impl Drop for Reserved {
    fn drop(&mut self) {
        let mut used = BUDGET.used.lock().unwrap_or_else(|p| p.into_inner());
        *used = used.saturating_sub(self.0);
        BUDGET.freed.notify_all();
    }
}

fn decode_err(doc: &DocumentInfo, kind: DocumentKind, e: impl std::fmt::Display) -> RasterError {
    RasterError::Decode {
        uri: doc.uri.clone(),
        kind,
        reason: e.to_string(),
    }
}

/// Memory the image crate may allocate for one image before its header is read: the pixel limit at 16-bit
/// RGBA, plus slack. Once the size is known, [`decode_single`] narrows it to that image's own bytes.
fn image_limits(opts: &RasterOptions) -> image::Limits {
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(opts.max_pixels.saturating_mul(8).saturating_add(64 << 20));
    limits
}

/// Slack over an image's own decoded size that its decoder may allocate (rows, tables, zlib window).
const DECODE_SLACK: u64 = 16 << 20;

/// JPEG, PNG or WebP: one page.
pub fn decode_single(
    doc: &Arc<DocumentInfo>,
    kind: DocumentKind,
    bytes: &[u8],
    opts: &RasterOptions,
) -> Result<PageRaster, RasterError> {
    let start = Instant::now();
    let format = match kind {
        DocumentKind::Jpeg => ImageFormat::Jpeg,
        DocumentKind::Png => ImageFormat::Png,
        DocumentKind::WebP => ImageFormat::WebP,
        DocumentKind::Tiff => ImageFormat::Tiff,
        DocumentKind::Pdf => {
            return Err(decode_err(doc, kind, "a PDF is not an image"));
        }
    };
    // The JPEG decoder fills what a cut file lacks with grey and reports success: such a page would reach the
    // model as good. A cut file is an error instead (the document is not whole; the row says so).
    if kind == DocumentKind::Jpeg && !jpeg_scan_is_complete(bytes) {
        return Err(decode_err(
            doc,
            kind,
            "the JPEG is truncated: its image data has no end-of-image marker (the file was cut short)",
        ));
    }
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    reader.limits(image_limits(opts));
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| decode_err(doc, kind, e))?;
    let (w, h) = decoder.dimensions();
    check_pixels(doc, 1, w, h, opts)?;
    // A broken EXIF block must not cost the page: no orientation is the safe reading.
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    // What this decode holds at its peak: the decoded image; an RGB copy unless it is 8-bit RGB or RGBA (those
    // become RGB in their own buffer); a rotated copy when the EXIF orientation turns it.
    let decoded = decoder.total_bytes();
    let rgb_copy = match decoder.color_type() {
        image::ColorType::Rgb8 | image::ColorType::Rgba8 => 0,
        _ => w as u64 * h as u64 * 3,
    };
    let rotated_copy = if orientation == Orientation::NoTransforms {
        0
    } else {
        decoded
    };
    let need = decoded
        .saturating_add(rgb_copy)
        .saturating_add(rotated_copy);
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(decoded.saturating_add(DECODE_SLACK));
    decoder
        .set_limits(limits)
        .map_err(|e| decode_err(doc, kind, e))?;
    let _reserved = reserve(need);
    let mut img = DynamicImage::from_decoder(decoder).map_err(|e| decode_err(doc, kind, e))?;
    img.apply_orientation(orientation);
    Ok(PageRaster {
        doc: doc.clone(),
        kind,
        page_index: 0,
        page_count: 1,
        image: into_rgb_on_white(img),
        render_time: start.elapsed(),
        text: None,
    })
}

/// Whether a JPEG's last scan (its last start-of-scan marker, FF DA) is followed by an end-of-image marker
/// (FF D9). Inside entropy-coded data a 0xFF byte is always stuffed (FF 00) or a restart marker, so FF D9 after the
/// last scan starts means the scan ended; data appended after the end (some cameras add trailers) does not matter.
fn jpeg_scan_is_complete(bytes: &[u8]) -> bool {
    let Some(last_scan) = bytes.windows(2).rposition(|w| w == [0xFF, 0xDA]) else {
        // No scan at all: the decoder reports that itself.
        return true;
    };
    bytes[last_scan..].windows(2).any(|w| w == [0xFF, 0xD9])
}

/// Every page of a TIFF (fax TIFFs are multi-page 1-bit).
pub fn decode_tiff(
    doc: &Arc<DocumentInfo>,
    bytes: &[u8],
    opts: &RasterOptions,
    on_page: &mut dyn FnMut(PageRaster) -> bool,
) -> Result<(), RasterError> {
    let kind = DocumentKind::Tiff;
    let open = || -> Result<tiff::decoder::Decoder<Cursor<&[u8]>>, RasterError> {
        let mut limits = tiff::decoder::Limits::default();
        limits.decoding_buffer_size =
            (opts.max_pixels.saturating_mul(8)).min(usize::MAX as u64) as usize;
        Ok(tiff::decoder::Decoder::new(Cursor::new(bytes))
            .map_err(|e| decode_err(doc, kind, e))?
            .with_limits(limits))
    };
    // First pass: count pages (walks the directory chain only).
    let mut dec = open()?;
    let mut count = 1usize;
    while dec.more_images() {
        dec.next_image().map_err(|e| decode_err(doc, kind, e))?;
        count += 1;
        if count > opts.max_pages {
            return Err(RasterError::TooManyPages {
                uri: doc.uri.clone(),
                pages: count,
                limit: opts.max_pages,
            });
        }
    }
    let mut dec = open()?;
    for index in 0..count {
        let start = Instant::now();
        if index > 0 {
            dec.next_image().map_err(|e| decode_err(doc, kind, e))?;
        }
        let page_err = |reason: String| RasterError::Decode {
            uri: doc.uri.clone(),
            kind,
            reason: format!("page {}: {reason}", index + 1),
        };
        let (w, h) = dec.dimensions().map_err(|e| page_err(e.to_string()))?;
        check_pixels(doc, index + 1, w, h, opts)?;
        // Up to 16-bit RGBA decoded, then its RGB copy.
        let _reserved = reserve(w as u64 * h as u64 * 11);
        let color = dec.colortype().map_err(|e| page_err(e.to_string()))?;
        let orientation = dec
            .find_tag_unsigned::<u16>(tiff::tags::Tag::Orientation)
            .ok()
            .flatten()
            .and_then(|v| u8::try_from(v).ok())
            .and_then(Orientation::from_exif)
            .unwrap_or(Orientation::NoTransforms);
        let data = dec.read_image().map_err(|e| page_err(e.to_string()))?;
        let mut img = tiff_to_image(w, h, color, data).map_err(page_err)?;
        img.apply_orientation(orientation);
        let page = PageRaster {
            doc: doc.clone(),
            kind,
            page_index: index,
            page_count: count,
            image: into_rgb_on_white(img),
            render_time: start.elapsed(),
            text: None,
        };
        if !on_page(page) {
            break;
        }
    }
    Ok(())
}

fn tiff_to_image(
    w: u32,
    h: u32,
    color: tiff::ColorType,
    data: tiff::decoder::DecodingResult,
) -> Result<DynamicImage, String> {
    use tiff::ColorType as C;
    use tiff::decoder::DecodingResult as D;
    let bad = || format!("pixel data does not match {color:?} at {w}x{h}");
    let img = match (color, data) {
        (C::Gray(b @ (1 | 2 | 4)), D::U8(v)) => {
            DynamicImage::ImageLuma8(unpack_gray(w, h, b, &v).ok_or_else(bad)?)
        }
        (C::Gray(8), D::U8(v)) => {
            DynamicImage::ImageLuma8(ImageBuffer::from_raw(w, h, v).ok_or_else(bad)?)
        }
        (C::Gray(16), D::U16(v)) => {
            DynamicImage::ImageLuma16(ImageBuffer::from_raw(w, h, v).ok_or_else(bad)?)
        }
        (C::GrayA(8), D::U8(v)) => {
            DynamicImage::ImageLumaA8(ImageBuffer::from_raw(w, h, v).ok_or_else(bad)?)
        }
        (C::GrayA(16), D::U16(v)) => {
            DynamicImage::ImageLumaA16(ImageBuffer::from_raw(w, h, v).ok_or_else(bad)?)
        }
        (C::RGB(8), D::U8(v)) => {
            DynamicImage::ImageRgb8(ImageBuffer::from_raw(w, h, v).ok_or_else(bad)?)
        }
        (C::RGB(16), D::U16(v)) => {
            DynamicImage::ImageRgb16(ImageBuffer::from_raw(w, h, v).ok_or_else(bad)?)
        }
        (C::RGBA(8), D::U8(v)) => {
            DynamicImage::ImageRgba8(ImageBuffer::from_raw(w, h, v).ok_or_else(bad)?)
        }
        (C::RGBA(16), D::U16(v)) => {
            DynamicImage::ImageRgba16(ImageBuffer::from_raw(w, h, v).ok_or_else(bad)?)
        }
        (C::CMYK(8), D::U8(v)) => {
            let rgb: Vec<u8> = v
                .chunks_exact(4)
                .flat_map(|p| {
                    let k = 255 - p[3] as u32;
                    [0, 1, 2].map(|i| ((255 - p[i] as u32) * k / 255) as u8)
                })
                .collect();
            DynamicImage::ImageRgb8(ImageBuffer::from_raw(w, h, rgb).ok_or_else(bad)?)
        }
        (C::CMYK(16), D::U16(v)) => {
            let rgb: Vec<u16> = v
                .chunks_exact(4)
                .flat_map(|p| {
                    let k = 65535 - p[3] as u64;
                    [0, 1, 2].map(|i| ((65535 - p[i] as u64) * k / 65535) as u16)
                })
                .collect();
            DynamicImage::ImageRgb16(ImageBuffer::from_raw(w, h, rgb).ok_or_else(bad)?)
        }
        (other, _) => return Err(format!("unsupported TIFF pixel format {other:?}")),
    };
    Ok(img)
}

/// Unpacks 1/2/4-bit grey rows (each row starts on a byte; the tiff crate has already turned WhiteIsZero
/// into BlackIsZero) to 8-bit.
fn unpack_gray(w: u32, h: u32, bits: u8, packed: &[u8]) -> Option<image::GrayImage> {
    let (w, h, bits) = (w as usize, h as usize, bits as usize);
    let row_bytes = (w * bits).div_ceil(8);
    if packed.len() < row_bytes * h {
        return None;
    }
    let max = (1u32 << bits) - 1;
    let mut out = Vec::with_capacity(w * h);
    for row in packed.chunks_exact(row_bytes).take(h) {
        for x in 0..w {
            let bit = x * bits;
            let byte = row[bit / 8];
            let shift = 8 - bits - (bit % 8);
            let v = (byte >> shift) as u32 & max;
            out.push((v * 255 / max) as u8);
        }
    }
    image::GrayImage::from_raw(w as u32, h as u32, out)
}
