//! A PDF page's text layer: every character pdfium reads from the page's content, with its box in the frame of the
//! rendered page image (0-1, origin top-left, the page's `/Rotate` applied), so a value the model read can be found
//! on the page without trusting the model ([`crate::extract::ground`]).
//!
//! Scans have no text layer (`None`): there is nothing to check a value against, which is not the same as a value
//! not being there.

use std::sync::Arc;

use pdfium_render::prelude::*;

/// Characters kept per page. A real page holds a few thousand; a hostile one could hold millions of tiny glyphs,
/// and the layer travels through the worker protocol: past this the rest of the page is not searched.
pub const MAX_CHARS_PER_PAGE: usize = 200_000;

/// Bytes per character in [`TextLayer::encode`]: the code point and four `f32`s.
const CHAR_BYTES: usize = 20;

/// One character of the page's text, in reading order as pdfium gives it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TextChar {
    pub ch: char,
    /// `[x0, y0, x1, y1]`: page-relative, 0-1, origin top-left, `x0 <= x1`, `y0 <= y1`. Characters pdfium inserts
    /// between words and lines (spaces, line breaks) have an empty box.
    pub bbox: [f32; 4],
}

impl TextChar {
    pub fn has_box(&self) -> bool {
        self.bbox[2] > self.bbox[0] || self.bbox[3] > self.bbox[1]
    }
}

/// Where a value is on its document: the page (1-based) and, when the text layer holds it, its box in the frame
/// of [`TextChar::bbox`]. The `_location` column's shape.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Location {
    pub page: u32,
    pub bbox: Option<[f32; 4]>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct TextLayer {
    pub chars: Vec<TextChar>,
}

impl TextLayer {
    /// The page's text as one string (characters in order).
    pub fn text(&self) -> String {
        self.chars.iter().map(|c| c.ch).collect()
    }

    /// Wire format for the worker protocol: per character its code point (`u32 LE`) and box (`4 x f32 LE`).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.reserve(self.chars.len() * CHAR_BYTES);
        for c in &self.chars {
            out.extend_from_slice(&(c.ch as u32).to_le_bytes());
            for v in c.bbox {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
    }

    /// Reads `count` characters written by [`TextLayer::encode`]; None when the bytes do not hold exactly that.
    pub fn decode(bytes: &[u8], count: usize) -> Option<TextLayer> {
        if count > MAX_CHARS_PER_PAGE || bytes.len() != count * CHAR_BYTES {
            return None;
        }
        let chars = bytes
            .chunks_exact(CHAR_BYTES)
            .map(|c| {
                let word = |i: usize| [c[i], c[i + 1], c[i + 2], c[i + 3]];
                let ch = char::from_u32(u32::from_le_bytes(word(0)))?;
                let f = |i: usize| f32::from_le_bytes(word(4 + 4 * i));
                Some(TextChar {
                    ch,
                    bbox: [f(0), f(1), f(2), f(3)],
                })
            })
            .collect::<Option<Vec<_>>>()?;
        Some(TextLayer { chars })
    }

    /// Bytes [`TextLayer::encode`] writes for `count` characters.
    pub fn encoded_len(count: usize) -> usize {
        count * CHAR_BYTES
    }
}

/// The affine map from PDF user space (points) to the displayed page (0-1, origin top-left), asked of pdfium
/// itself (`FPDF_PageToDevice`), so the page's `/Rotate`, its media box origin and the y flip come out exactly as
/// when the page is rendered.
struct ToDisplay {
    origin: (f64, f64),
    per_x: (f64, f64),
    per_y: (f64, f64),
}

/// Device size the map is asked at: a stretched square of this many pixels gives 0-1 coordinates times it.
const DEVICE: i32 = 1 << 20;
/// Points between the probe positions (far enough apart that integer device coordinates stay precise).
const PROBE: f32 = 1000.0;

impl ToDisplay {
    fn of(page: &PdfPage) -> Option<ToDisplay> {
        let config = PdfRenderConfig::new().set_target_size(DEVICE, DEVICE);
        let at = |x: f32, y: f32| -> Option<(f64, f64)> {
            let (px, py) = page
                .points_to_pixels(PdfPoints::new(x), PdfPoints::new(y), &config)
                .ok()?;
            Some((px as f64 / DEVICE as f64, py as f64 / DEVICE as f64))
        };
        let origin = at(0.0, 0.0)?;
        let x = at(PROBE, 0.0)?;
        let y = at(0.0, PROBE)?;
        let per = |p: (f64, f64)| {
            (
                (p.0 - origin.0) / PROBE as f64,
                (p.1 - origin.1) / PROBE as f64,
            )
        };
        Some(ToDisplay {
            origin,
            per_x: per(x),
            per_y: per(y),
        })
    }

    fn point(&self, x: f32, y: f32) -> (f64, f64) {
        let (x, y) = (x as f64, y as f64);
        (
            self.origin.0 + x * self.per_x.0 + y * self.per_y.0,
            self.origin.1 + x * self.per_x.1 + y * self.per_y.1,
        )
    }

    /// A user-space rectangle as a displayed box (the four corners' bounds: a rotation swaps the axes); None
    /// when its centre lies off the page (text outside the crop box prints nothing a reader can see).
    fn rect(&self, r: &PdfRect) -> Option<[f32; 4]> {
        let corners = [
            self.point(r.left().value, r.bottom().value),
            self.point(r.right().value, r.bottom().value),
            self.point(r.left().value, r.top().value),
            self.point(r.right().value, r.top().value),
        ];
        let fold = |f: fn(f64, f64) -> f64, pick: fn(&(f64, f64)) -> f64, init: f64| {
            corners.iter().map(pick).fold(init, f)
        };
        let b = [
            fold(f64::min, |c| c.0, f64::INFINITY),
            fold(f64::min, |c| c.1, f64::INFINITY),
            fold(f64::max, |c| c.0, f64::NEG_INFINITY),
            fold(f64::max, |c| c.1, f64::NEG_INFINITY),
        ];
        let (cx, cy) = ((b[0] + b[2]) / 2.0, (b[1] + b[3]) / 2.0);
        if !((0.0..=1.0).contains(&cx) && (0.0..=1.0).contains(&cy)) {
            return None;
        }
        Some(b.map(|v| v.clamp(0.0, 1.0) as f32))
    }
}

/// The text layer of a loaded page; None when the page has no text (a scan inside a PDF) or pdfium cannot read it.
pub fn page_text(page: &PdfPage) -> Option<Arc<TextLayer>> {
    let text = page.text().ok()?;
    let map = ToDisplay::of(page)?;
    let chars = text.chars();
    let mut out = Vec::with_capacity(chars.len().min(MAX_CHARS_PER_PAGE));
    for c in chars.iter().take(MAX_CHARS_PER_PAGE) {
        let Some(ch) = c.unicode_char() else { continue };
        let generated = c.is_generated().unwrap_or(false) || ch == '\r' || ch == '\n';
        let bbox = if generated {
            [0.0; 4]
        } else {
            match c.loose_bounds() {
                Ok(r) => match map.rect(&r) {
                    Some(b) => b,
                    None => continue,
                },
                Err(_) => [0.0; 4],
            }
        };
        out.push(TextChar { ch, bbox });
    }
    if !out.iter().any(|c| c.has_box() && !c.ch.is_whitespace()) {
        return None;
    }
    Some(Arc::new(TextLayer { chars: out }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wire_format_round_trips_and_refuses_a_wrong_length() {
        let layer = TextLayer {
            chars: vec![
                TextChar {
                    ch: '€',
                    bbox: [0.1, 0.2, 0.3, 0.4],
                },
                TextChar {
                    ch: ' ',
                    bbox: [0.0; 4],
                },
            ],
        };
        let mut bytes = Vec::new();
        layer.encode(&mut bytes);
        assert_eq!(bytes.len(), TextLayer::encoded_len(2));
        assert_eq!(TextLayer::decode(&bytes, 2), Some(layer));
        assert_eq!(TextLayer::decode(&bytes, 3), None);
        assert_eq!(TextLayer::decode(&bytes[..39], 2), None);
        assert_eq!(TextLayer::decode(&[0xff; 20], 1), None, "not a code point");
    }
}
