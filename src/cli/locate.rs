//! `pixtract locate`: the grounding locator on its own, for checking a document by hand and for tests.

use std::process::ExitCode;

use serde::Serialize;

use pixtract::error::chain;
use pixtract::extract::ground::{Found, Lookup, PageText, ValueKind, locate_group};
use pixtract::pipeline::pages::read_documents;
use pixtract::raster::RasterOptions;

/// Arguments of `pixtract locate`.
#[derive(Debug, Clone, clap::Args)]
pub struct LocateArgs {
    /// The document: a PDF file path or a file://, s3://, gs:// or az:// URL of one.
    #[arg(value_name = "DOC")]
    doc: String,
    /// A value to find, as a label file holds it: `total=4.11`, `date=2014-08-03`, `vendor=Acme GmbH`
    /// (repeatable). Numbers are found in any notation the page prints (4.11, 1.234,50), dates in any usual form
    /// (03/08/2014, 3 Aug 2014), currency codes as their symbols. Keys of one line item
    /// (`items[2].quantity`, `items[2].unit_price`) are located together: a value printed on several lines is
    /// taken from the line the item's other values are on.
    #[arg(long = "value", value_name = "KEY=TEXT", required = true)]
    values: Vec<String>,
    /// Print one JSON array: {"key", "value", "found", "page", "box": [x0, y0, x1, y1], "text"} per value (page
    /// 1-based; box 0-1 with the origin at the top left of the page as rendered; text: what the page prints
    /// there). "found" is "found", "ambiguous" (printed in several places, none chosen) or "not found".
    #[arg(long)]
    json: bool,
    /// Password for an encrypted PDF.
    #[arg(long, env = "PIXTRACT_PDF_PASSWORD", hide_env_values = true)]
    password: Option<String>,
}

#[derive(Serialize)]
struct Located {
    key: String,
    value: String,
    found: &'static str,
    page: Option<u32>,
    #[serde(rename = "box")]
    bbox: Option<[f32; 4]>,
    text: Option<String>,
    /// Places the value is printed in when ambiguous.
    #[serde(skip_serializing_if = "Option::is_none")]
    places: Option<usize>,
}

/// Runs `pixtract locate`. Exit code: 0 every value found in one place, 2 some ambiguous or not found, 1 the
/// document could not be read or has no text layer.
pub fn locate(args: LocateArgs) -> ExitCode {
    let fatal = |msg: String| {
        eprintln!("error: {msg}");
        ExitCode::FAILURE
    };
    let mut pairs = Vec::new();
    for v in &args.values {
        match v.split_once('=') {
            Some((k, t)) if !k.trim().is_empty() => {
                pairs.push((k.trim().to_string(), t.to_string()))
            }
            _ => {
                return fatal(format!(
                    "--value {v:?}: expected KEY=TEXT (for example total=4.11)"
                ));
            }
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fatal(format!("cannot start the async runtime: {e}")),
    };
    let opts = RasterOptions {
        // The text layer does not depend on the render size: render small.
        max_side: 256,
        password: args.password.clone(),
        text_layer: true,
        ..Default::default()
    };
    let mut docs = Vec::new();
    let read = runtime.block_on(read_documents(&args.doc, opts, Vec::new(), |d| {
        docs.push(d);
        docs.len() < 2
    }));
    if let Err(e) = read {
        return fatal(chain(&e));
    }
    let doc = match docs.as_slice() {
        [] => return fatal(format!("no document at {}", args.doc)),
        [d] => d,
        _ => return fatal(format!("{} names several documents: give one", args.doc)),
    };
    if let Some(e) = &doc.error {
        return fatal(chain(e));
    }
    for page in &doc.pages {
        if let Err(e) = page {
            eprintln!("warning: {} (its text is not searched)", chain(e));
        }
    }
    let pages = doc.text_pages();
    if pages.is_empty() {
        return fatal(format!(
            "{}: no page has a text layer (a scan, or a PDF of images): nothing to locate values in",
            doc.doc.uri
        ));
    }
    let results = locate_values(&pages, &pairs);
    let complete = results.iter().all(|r| r.found == "found");
    if args.json {
        match serde_json::to_string_pretty(&results) {
            Ok(s) => println!("{s}"),
            Err(e) => return fatal(format!("cannot write JSON: {e}")),
        }
    } else {
        for r in &results {
            let place = match (r.page, r.bbox) {
                (Some(p), Some(b)) => {
                    format!(
                        "page {p} [{:.3}, {:.3}, {:.3}, {:.3}]",
                        b[0], b[1], b[2], b[3]
                    )
                }
                _ => String::new(),
            };
            let text = r
                .text
                .as_deref()
                .map(|t| format!("{t:?}"))
                .unwrap_or_default();
            let places = r.places.map(|n| format!("{n} places")).unwrap_or_default();
            println!(
                "{:<10} {:<28} {:<32} {place} {text}{places}",
                r.found,
                r.key,
                format!("{:?}", r.value)
            );
        }
    }
    if complete {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    }
}

/// Locates the values, those of one object (the same key up to its last `.`) together.
fn locate_values(pages: &[PageText], pairs: &[(String, String)]) -> Vec<Located> {
    let object_of = |key: &str| {
        key.rsplit_once('.')
            .map(|(o, _)| o.to_string())
            .unwrap_or_default()
    };
    let mut objects: Vec<String> = pairs.iter().map(|(k, _)| object_of(k)).collect();
    objects.dedup();
    let mut out: Vec<Option<Located>> = pairs.iter().map(|_| None).collect();
    let mut seen = std::collections::HashSet::new();
    for object in objects.into_iter().filter(|o| seen.insert(o.clone())) {
        let members: Vec<usize> = (0..pairs.len())
            .filter(|&i| object_of(&pairs[i].0) == object)
            .collect();
        let lookups: Vec<Lookup> = members
            .iter()
            .map(|&i| {
                let (key, value) = &pairs[i];
                let name = key.rsplit('.').next().unwrap_or(key);
                Lookup::new(value, ValueKind::guess(value), name, None)
            })
            .collect();
        let found = locate_group(pages, &lookups, object.contains('['));
        for (&i, f) in members.iter().zip(found) {
            let (key, value) = (pairs[i].0.clone(), pairs[i].1.clone());
            out[i] = Some(match f {
                Found::At { location, text } => Located {
                    key,
                    value,
                    found: "found",
                    page: Some(location.page),
                    bbox: location.bbox,
                    text: Some(text),
                    places: None,
                },
                Found::Ambiguous { places } => Located {
                    key,
                    value,
                    found: "ambiguous",
                    page: None,
                    bbox: None,
                    text: None,
                    places: Some(places),
                },
                Found::NotFound => Located {
                    key,
                    value,
                    found: "not found",
                    page: None,
                    bbox: None,
                    text: None,
                    places: None,
                },
            });
        }
    }
    out.into_iter().flatten().collect()
}
