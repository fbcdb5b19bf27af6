//! The review page: for each row with values to check (withheld into `_review`, or not found on a page with a text
//! layer: `_grounded = false`), its pages as images with a box around every located value and the values beside
//! them. One static HTML file (no script, nothing fetched): the pages are re-rendered from the source documents
//! through the raster stage and embedded as JPEG at a size a screen needs; a document whose ETag no longer matches
//! its row is not shown (the row says why).

use std::fmt::Write as _;
use std::io::Cursor;

use arrow::array::{Array, AsArray, RecordBatch, StructArray};
use arrow::datatypes::DataType;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use image::DynamicImage;

use super::ReportError;
use super::html::escape;
use crate::extract::values::provenance;
use crate::pipeline::pages::read_document;
use crate::raster::RasterOptions;
use crate::sink::SinkTarget;
use crate::sink::committed::{Columns, Committed, OnBatches};

/// One value of a row: its path (`total`, `items[2].quantity`), its text, where it is printed and whether found.
#[derive(Debug, Clone, PartialEq)]
pub struct ReviewValue {
    pub path: String,
    pub value: Option<String>,
    pub page: Option<u32>,
    pub bbox: Option<[f32; 4]>,
    pub grounded: Option<bool>,
    /// Why it was withheld (`low_confidence`, `ungrounded`), when it was.
    pub withheld: Option<String>,
}

/// A row to review.
#[derive(Debug, Clone)]
pub struct ReviewRow {
    pub source_uri: String,
    pub etag: Option<String>,
    pub page_start: u32,
    pub page_end: u32,
    pub values: Vec<ReviewValue>,
    /// The pages as JPEG (page number, width, height, bytes); empty with `refused` when they cannot be shown.
    pub pages: Vec<(u32, u32, u32, Vec<u8>)>,
    pub refused: Option<String>,
}

impl ReviewValue {
    /// Withheld, or not found on a page that has a text layer: what a person should look at.
    fn to_check(&self) -> bool {
        self.withheld.is_some() || self.grounded == Some(false)
    }
}

impl ReviewRow {
    fn needs_review(&self) -> bool {
        self.values.iter().any(ReviewValue::to_check)
    }
}

/// Long side of the embedded page images, in pixels.
pub const PAGE_SIDE: u32 = 1100;

/// The values of row `row` of an object (a batch as the top level, a struct column, a line item), with their
/// `_location` and `_grounded` children, depth first.
fn walk(object: &StructArray, row: usize, prefix: &str, out: &mut Vec<ReviewValue>) {
    let child = |name: &str| {
        object
            .column_by_name(name)
            .and_then(|c| c.as_any().downcast_ref::<StructArray>())
    };
    let (locations, grounded) = (child("_location"), child("_grounded"));
    let DataType::Struct(fields) = object.data_type() else {
        return;
    };
    for (field, column) in fields.iter().zip(object.columns()) {
        let name = field.name();
        if name.starts_with('_') || (prefix.is_empty() && provenance::is_reserved(name)) {
            continue;
        }
        let path = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        if column.is_null(row) {
            out.push(value_at(&path, None, locations, grounded, name, row));
            continue;
        }
        match column.data_type() {
            DataType::Struct(_) => walk(column.as_struct(), row, &path, out),
            DataType::List(item) if matches!(item.data_type(), DataType::Struct(_)) => {
                let list = column.as_list::<i32>();
                let items = list.value(row);
                let items = items.as_struct();
                for i in 0..items.len() {
                    walk(items, i, &format!("{path}[{i}]"), out);
                }
            }
            _ => {
                let text = ArrayFormatter::try_new(column.as_ref(), &FormatOptions::default())
                    .ok()
                    .map(|f| f.value(row).to_string());
                out.push(value_at(&path, text, locations, grounded, name, row));
            }
        }
    }
}

fn value_at(
    path: &str,
    value: Option<String>,
    locations: Option<&StructArray>,
    grounded: Option<&StructArray>,
    name: &str,
    row: usize,
) -> ReviewValue {
    let loc = locations
        .and_then(|l| l.column_by_name(name))
        .map(|c| c.as_struct())
        .filter(|l| !l.is_null(row));
    let coord = |l: &StructArray, k: &str| -> Option<f32> {
        let c = l
            .column_by_name(k)?
            .as_primitive_opt::<arrow::datatypes::Float32Type>()?;
        (!c.is_null(row)).then(|| c.value(row))
    };
    let page = loc.and_then(|l| {
        let p = l
            .column_by_name("page")?
            .as_primitive_opt::<arrow::datatypes::Int32Type>()?;
        u32::try_from(p.value(row)).ok()
    });
    let bbox = loc.and_then(|l| {
        Some([
            coord(l, "x0")?,
            coord(l, "y0")?,
            coord(l, "x1")?,
            coord(l, "y1")?,
        ])
    });
    let grounded = grounded
        .and_then(|g| g.column_by_name(name))
        .and_then(|c| {
            c.as_boolean_opt()
                .map(|b| (!b.is_null(row)).then(|| b.value(row)))
        })
        .flatten();
    ReviewValue {
        path: path.to_string(),
        value,
        page,
        bbox,
        grounded,
        withheld: None,
    }
}

/// Collects the rows to review from committed batches (at most `limit`).
struct Collect {
    rows: Vec<ReviewRow>,
    limit: usize,
    more: usize,
}

impl OnBatches for Collect {
    fn batch(&mut self, batch: &RecordBatch) -> bool {
        let top = StructArray::from(batch.clone());
        let strings = |name: &str| {
            batch
                .column_by_name(name)
                .and_then(|c| c.as_string_opt::<i32>().cloned())
        };
        let ints = |name: &str| {
            batch
                .column_by_name(name)
                .and_then(|c| c.as_primitive_opt::<arrow::datatypes::Int32Type>().cloned())
        };
        let (Some(uris), Some(status)) =
            (strings(provenance::SOURCE_URI), strings(provenance::STATUS))
        else {
            return true;
        };
        let etags = strings(provenance::SOURCE_ETAG);
        let (starts, ends) = (ints(provenance::PAGE_START), ints(provenance::PAGE_END));
        let lists = |name: &str| {
            batch
                .column_by_name(name)
                .and_then(|c| c.as_list_opt::<i32>().cloned())
        };
        let (review, reasons) = (lists(provenance::REVIEW), lists(provenance::REVIEW_REASONS));
        for row in 0..batch.num_rows() {
            // Failed rows hold no values; a budget-closed row's values are worth a look like any other's.
            if status.is_null(row) {
                continue;
            }
            let mut values = Vec::new();
            walk(&top, row, "", &mut values);
            let texts = |l: &Option<arrow::array::ListArray>| -> Vec<String> {
                l.as_ref()
                    .filter(|l| !l.is_null(row))
                    .map(|l| {
                        let v = l.value(row);
                        let s = v.as_string::<i32>();
                        (0..s.len()).map(|i| s.value(i).to_string()).collect()
                    })
                    .unwrap_or_default()
            };
            let (paths, why) = (texts(&review), texts(&reasons));
            for (i, path) in paths.iter().enumerate() {
                let reason = why
                    .get(i)
                    .cloned()
                    .unwrap_or_else(|| "low_confidence".into());
                match values.iter_mut().find(|v| &v.path == path) {
                    Some(v) => v.withheld = Some(reason),
                    None => values.push(ReviewValue {
                        path: path.clone(),
                        value: None,
                        page: None,
                        bbox: None,
                        grounded: None,
                        withheld: Some(reason),
                    }),
                }
            }
            let page = |a: &Option<arrow::array::Int32Array>| {
                a.as_ref().map_or(0, |a| a.value(row).max(0) as u32)
            };
            let candidate = ReviewRow {
                source_uri: uris.value(row).to_string(),
                etag: etags
                    .as_ref()
                    .filter(|e| !e.is_null(row))
                    .map(|e| e.value(row).to_string()),
                page_start: page(&starts),
                page_end: page(&ends),
                values,
                pages: Vec::new(),
                refused: None,
            };
            if candidate.needs_review() {
                if self.rows.len() < self.limit {
                    self.rows.push(candidate);
                } else {
                    self.more += 1;
                }
            }
        }
        true
    }
}

/// The rows of `output` to review (at most `limit`; also how many more there are), their pages rendered.
pub async fn collect(output: &str, limit: usize) -> Result<(Vec<ReviewRow>, usize), ReportError> {
    let target = SinkTarget::parse(output).map_err(ReportError::Write)?;
    let out = Committed::open(&target)
        .map_err(ReportError::List)?
        .ok_or_else(|| ReportError::NoOutput(target.url()))?;
    let listing = out.list().await.map_err(ReportError::List)?;
    let mut collect = Collect {
        rows: Vec::new(),
        limit,
        more: 0,
    };
    for entry in listing.iter().filter(|e| e.is_data()) {
        out.read_parquet(entry, Columns::AllBut(&["raw_output"]), &mut collect)
            .await?;
    }
    for row in &mut collect.rows {
        render_pages(row).await;
    }
    Ok((collect.rows, collect.more))
}

/// Re-renders the row's pages from its source document, as JPEG; a document that changed since (another ETag) or
/// cannot be read is refused with the reason.
async fn render_pages(row: &mut ReviewRow) {
    let opts = RasterOptions {
        max_side: PAGE_SIDE,
        ..Default::default()
    };
    let doc = match read_document(&row.source_uri, opts).await {
        Err(e) => {
            row.refused = Some(format!(
                "cannot read the document: {}",
                crate::error::chain(&e)
            ));
            return;
        }
        Ok(None) => {
            row.refused = Some("the document is no longer there".into());
            return;
        }
        Ok(Some(doc)) => doc,
    };
    if let (Some(was), Some(now)) = (&row.etag, &doc.doc.etag)
        && was != now
    {
        row.refused = Some(format!(
            "the document changed since this row was written (ETag {was}, now {now}): its pages would not show what the model read"
        ));
        return;
    }
    if let Some(e) = &doc.error {
        row.refused = Some(crate::error::chain(e));
        return;
    }
    for page in doc.pages.into_iter().flatten() {
        let number = page.page_index as u32 + 1;
        if number < row.page_start || number > row.page_end {
            continue;
        }
        // Scans come at full resolution: down to what a screen shows.
        let image = DynamicImage::ImageRgb8(page.image)
            .thumbnail(PAGE_SIDE, PAGE_SIDE)
            .to_rgb8();
        let mut jpeg = Vec::new();
        let encoder =
            image::codecs::jpeg::JpegEncoder::new_with_quality(Cursor::new(&mut jpeg), 80);
        if image.write_with_encoder(encoder).is_ok() {
            row.pages
                .push((number, image.width(), image.height(), jpeg));
        }
    }
}

fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The page as HTML.
pub fn render(rows: &[ReviewRow], more: usize, output: &str) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>pixtract review: {}</title><style>\
         body{{font:14px system-ui,sans-serif;margin:1.5em;color:#222}} h2{{font-size:1.05em;margin-top:2em}}\
         .row{{display:flex;gap:1.5em;align-items:flex-start;flex-wrap:wrap}}\
         .page{{position:relative;display:inline-block;border:1px solid #999;max-width:62vw}}\
         .page img{{display:block;width:100%;height:auto}}\
         .box{{position:absolute;border:2px solid #1a7f37;box-sizing:border-box}}\
         .box.check{{border-color:#d1242f;background:rgba(209,36,47,.12)}}\
         .box span{{position:absolute;left:-1.5em;top:-.1em;font-size:10px;background:#1a7f37;color:#fff;padding:0 3px;border-radius:2px}}\
         .box.check span{{background:#d1242f}}\
         table{{border-collapse:collapse}} td,th{{border-bottom:1px solid #ddd;padding:2px 8px;text-align:left}}\
         tr.check td{{background:#fde7e9}} .refused{{color:#d1242f}}</style></head><body>\
         <h1>Values to review</h1><p>{} rows of <code>{}</code> hold a value withheld (<code>_review</code>) or not \
         found on its page (<code>_grounded = false</code>){}. Boxes: where each value is printed \
         (red: withheld or to check).</p>",
        escape(output),
        rows.len(),
        escape(output),
        if more > 0 {
            format!("; {more} more not shown (raise --max-rows)")
        } else {
            String::new()
        }
    );
    for row in rows {
        render_row(&mut h, row);
    }
    h.push_str("</body></html>\n");
    h
}

fn render_row(h: &mut String, row: &ReviewRow) {
    let _ = write!(
        h,
        "<h2>{} <small>pages {}-{}</small></h2>",
        escape(&row.source_uri),
        row.page_start,
        row.page_end
    );
    if let Some(why) = &row.refused {
        let _ = write!(
            h,
            "<p class=\"refused\">Pages not shown: {}</p>",
            escape(why)
        );
    }
    h.push_str("<div class=\"row\">");
    // Boxes carry a number, not the field's name (names would cover the line above): the table says which.
    let numbers: Vec<Option<usize>> = {
        let mut n = 0;
        row.values
            .iter()
            .map(|v| {
                v.bbox.map(|_| {
                    n += 1;
                    n
                })
            })
            .collect()
    };
    for (number, _, _, jpeg) in &row.pages {
        let _ = write!(
            h,
            "<div class=\"page\" data-page=\"{number}\"><img alt=\"page {number}\" src=\"data:image/jpeg;base64,{}\">",
            base64(jpeg)
        );
        for (v, n) in row.values.iter().zip(&numbers) {
            let (Some(b), Some(n)) = (v.bbox, n) else {
                continue;
            };
            if v.page != Some(*number) {
                continue;
            }
            let check = v.to_check();
            let _ = write!(
                h,
                "<div class=\"box{}\" data-path=\"{}\" title=\"{}\" style=\"left:{:.3}%;top:{:.3}%;width:{:.3}%;height:{:.3}%\"><span>{n}</span></div>",
                if check { " check" } else { "" },
                escape(&v.path),
                escape(&v.path),
                b[0] * 100.0,
                b[1] * 100.0,
                (b[2] - b[0]) * 100.0,
                (b[3] - b[1]) * 100.0,
            );
        }
        h.push_str("</div>");
    }
    h.push_str(
        "<table><tr><th>box</th><th>field</th><th>value</th><th>on the page</th><th>why</th></tr>",
    );
    for (v, n) in row.values.iter().zip(&numbers) {
        let check = v.to_check();
        let on_page = match (v.grounded, v.page, v.bbox) {
            (Some(false), ..) => "not found".to_string(),
            (_, Some(p), Some(_)) => format!("page {p}"),
            (Some(true), ..) => "printed in several places".to_string(),
            _ => "-".to_string(),
        };
        let why = match (v.withheld.as_deref(), v.grounded) {
            (Some("ungrounded"), _) => "withheld: not on the page",
            (Some(_), _) => "withheld: low confidence",
            (None, Some(false)) => "check: not on the page",
            _ => "",
        };
        let _ = write!(
            h,
            "<tr{}><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            if check { " class=\"check\"" } else { "" },
            n.map(|n| n.to_string()).unwrap_or_default(),
            escape(&v.path),
            escape(v.value.as_deref().unwrap_or("null")),
            on_page,
            why
        );
    }
    h.push_str("</table></div>");
}
