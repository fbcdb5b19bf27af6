//! Grounding on born-digital PDFs: the locator through `pixtract locate` against the boxes the sample generator
//! recorded where it drew each value, and through `pixtract run` into `_location` / `_grounded`.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::util::{pixtract, python, repo_root, text};

/// `scripts/make_samples.py DIR --digital`: text PDFs and their ground truth with `_locations`.
pub fn digital_samples(dir: &Path) -> (PathBuf, Value) {
    let out = std::process::Command::new(python())
        .arg(repo_root().join("scripts/make_samples.py"))
        .arg(dir)
        .arg("--digital")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let truth: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("ground_truth.json")).unwrap())
            .unwrap();
    (dir.to_path_buf(), truth)
}

/// Every labelled value of a document as `KEY=TEXT` (line items as `items[i].key`).
fn label_pairs(labels: &Value) -> Vec<(String, String)> {
    let show = |v: &Value| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut out = Vec::new();
    for (k, v) in labels.as_object().unwrap() {
        match (k.as_str(), v) {
            (k, _) if k.starts_with('_') => {}
            ("items", Value::Array(items)) => {
                for (i, item) in items.iter().enumerate() {
                    for (kk, vv) in item.as_object().unwrap() {
                        out.push((format!("items[{i}].{kk}"), show(vv)));
                    }
                }
            }
            (k, v) => out.push((k.to_string(), show(v))),
        }
    }
    out
}

fn locate_json(doc: &Path, pairs: &[(String, String)]) -> (std::process::Output, Vec<Value>) {
    let mut args = vec![
        "locate".to_string(),
        doc.display().to_string(),
        "--json".into(),
    ];
    for (k, v) in pairs {
        args.push("--value".into());
        args.push(format!("{k}={v}"));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = pixtract(&args, &[], &repo_root());
    let parsed: Vec<Value> =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    (out, parsed)
}

/// The centre of the box where the generator drew the value lies in the box the locator found, on the same page.
fn box_holds(found: &Value, drawn: &Value) -> bool {
    let b: Vec<f64> = serde_json::from_value(found["box"].clone()).unwrap();
    let t: Vec<f64> = serde_json::from_value(drawn["box"].clone()).unwrap();
    let (cx, cy) = ((t[0] + t[2]) / 2.0, (t[1] + t[3]) / 2.0);
    found["page"] == drawn["page"] && b[0] <= cx && cx <= b[2] && b[1] <= cy && cy <= b[3]
}

/// Every labelled value of the generated invoices and receipts (European notation, a `/Rotate 90` page, line
/// items on pages 2 and 3 included): found in one place where the generator drew it, or reported ambiguous
/// (printed twice on its line with nothing to tell the two apart); never a wrong place, never not found.
#[test]
fn locate_finds_every_labelled_value_where_it_was_drawn() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, truth) = digital_samples(&tmp.path().join("digital"));
    let (mut values, mut located, mut ambiguous) = (0, 0, 0);
    for (name, labels) in truth.as_object().unwrap() {
        let pairs = label_pairs(labels);
        let (_, results) = locate_json(&dir.join(name), &pairs);
        assert_eq!(results.len(), pairs.len(), "{name}");
        for r in &results {
            values += 1;
            let key = r["key"].as_str().unwrap();
            match r["found"].as_str().unwrap() {
                "found" => {
                    located += 1;
                    let drawn = &labels["_locations"][key];
                    assert!(drawn.is_object(), "{name} {key}: no recorded box");
                    assert!(
                        box_holds(r, drawn),
                        "{name} {key}: found {r} but drawn at {drawn}"
                    );
                }
                "ambiguous" => {
                    ambiguous += 1;
                    assert!(r["places"].as_u64().unwrap() >= 2, "{r}");
                }
                other => panic!("{name} {key}={}: {other}", r["value"]),
            }
        }
    }
    // The generator's European and rotated invoices are among them; most values have one place.
    assert!(truth.get("digital_globex_landscape.pdf").is_some());
    assert!(truth.get("digital_mueller_rechnung.pdf").is_some());
    assert!(values >= 300, "{values}");
    assert!(
        located * 10 >= values * 9,
        "{located} of {values} located, {ambiguous} ambiguous"
    );
}

/// The notations: a European invoice's "1.234,50", "07.03.2024" and "6 April 2024" found from the canonical
/// values; a value the page does not print is "not found" (exit 2); a scan has no text layer (exit 1).
#[test]
fn locate_reads_the_pages_notation_and_says_what_it_cannot() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, _) = digital_samples(&tmp.path().join("digital"));
    let doc = dir.join("digital_mueller_rechnung.pdf");
    let pairs = [
        ("invoice_total", "4261.39"),
        ("invoice_date", "2024-03-07"),
        ("due_date", "2024-04-06"),
        ("vendor_name", "Müller & Sohne GmbH"),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()));
    let (out, results) = locate_json(&doc, &pairs);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let printed: Vec<&str> = results
        .iter()
        .map(|r| r["text"].as_str().unwrap())
        .collect();
    assert_eq!(
        printed,
        [
            "4.261,39",
            "07.03.2024",
            "6 April 2024",
            "Müller & Söhne GmbH"
        ]
    );
    let (out, results) = locate_json(&doc, &[("total".into(), "4261.40".into())]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert_eq!(results[0]["found"], "not found");
    assert!(results[0]["box"].is_null());

    let scan = tmp.path().join("scan.png");
    image::RgbImage::from_pixel(64, 64, image::Rgb([255, 255, 255]))
        .save(&scan)
        .unwrap();
    let out = pixtract(
        &["locate", scan.to_str().unwrap(), "--value", "total=1"],
        &[],
        &repo_root(),
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("no page has a text layer"),
        "{}",
        text(&out)
    );
}

/// A schema whose values the grammar forces (each an `enum` of one value), so the tiny random model answers
/// exactly these and what grounding does with them is known: the acme invoice's printed values, a vendor it
/// does not print, a currency marked `x-grounding: false`, and one line item.
fn forced_schema(dir: &Path) -> PathBuf {
    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "invoice_id": {"type": "string", "enum": ["INV-2024-0042"]},
            "vendor_name": {"type": "string", "enum": ["Initech LLC"]},
            "invoice_date": {"type": "string", "format": "date", "pattern": "^2024-03-01$"},
            "invoice_total": {"type": "number", "enum": [165.41]},
            "currency": {"type": "string", "enum": ["EUR"], "x-grounding": false},
            "items": {"type": "array", "minItems": 1, "maxItems": 1, "items": {
                "type": "object",
                "properties": {
                    "description": {"type": "string", "enum": ["Service B"]},
                    "quantity": {"type": "number", "enum": [1]},
                    "amount": {"type": "number", "enum": [99]}
                },
                "required": ["description", "quantity", "amount"]
            }}
        },
        "required": ["invoice_id", "vendor_name", "invoice_date", "invoice_total", "currency", "items"]
    });
    let path = dir.join("forced.json");
    std::fs::write(&path, serde_json::to_string_pretty(&schema).unwrap()).unwrap();
    path
}

fn run_spec(dir: &Path, inputs: &Path, output: &Path, extract: &str) -> std::process::Output {
    let spec = format!(
        "name = \"grounding\"\n[source]\nuri = \"{}\"\n[raster]\nworkers = 1\nmax_side = 512\n[model]\ndir = \"{}\"\n\
         batch_size = 2\nmax_new_tokens = 600\n[extract]\nschema = \"{}\"\n{extract}\n[output]\nuri = \"{}\"\n",
        inputs.display(),
        crate::util::tiny_model().display(),
        forced_schema(dir).display(),
        output.display()
    );
    let path = dir.join(format!(
        "{}.toml",
        output.file_name().unwrap().to_string_lossy()
    ));
    std::fs::write(&path, spec).unwrap();
    pixtract(&["run", path.to_str().unwrap()], &[], &repo_root())
}

/// `pixtract run` over a born-digital invoice and a scan: `_location` and `_grounded` read back with DuckDB
/// (boxes where the generator drew the values, the line item's values on its own line, the unprinted vendor
/// `false`, the derived currency and every scan value null), then `require_grounding` writing the ungrounded
/// vendor as null, named in `_review` with the reason `ungrounded`.
#[test]
fn run_writes_where_each_value_is_printed_and_require_grounding_withholds_the_rest() {
    use crate::pipeline::duckdb;
    let tmp = tempfile::tempdir().unwrap();
    let (samples, truth) = digital_samples(&tmp.path().join("digital"));
    let inputs = tmp.path().join("in");
    std::fs::create_dir(&inputs).unwrap();
    std::fs::copy(
        samples.join("digital_acme_invoice.pdf"),
        inputs.join("acme.pdf"),
    )
    .unwrap();
    image::RgbImage::from_pixel(400, 300, image::Rgb([250, 250, 250]))
        .save(inputs.join("scan.png"))
        .unwrap();
    let drawn = &truth["digital_acme_invoice.pdf"]["_locations"];

    let output = tmp.path().join("out");
    let out = run_spec(tmp.path(), &inputs, &output, "");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let glob = format!("{}/**/*.parquet", output.display());
    let rows = duckdb(&format!(
        "SELECT regexp_replace(source_uri, '.*/', ''), invoice_id, vendor_name, \
         _grounded.invoice_id, _grounded.vendor_name, _grounded.invoice_date, _grounded.invoice_total, \
         _grounded.currency, items[1]._grounded.quantity, \
         _location.invoice_id.page, _location.invoice_id.x0, _location.invoice_id.y0, \
         _location.invoice_id.x1, _location.invoice_id.y1, \
         _location.invoice_total.x0, _location.invoice_total.y0, _location.invoice_total.x1, \
         _location.invoice_total.y1, \
         items[1]._location.description.y0, items[1]._location.quantity.y0, items[1]._location.amount.y0, \
         items[1]._location.quantity.x0, items[1]._location.quantity.x1, \
         _location.vendor_name.page, _location.vendor_name.x0, len(_review) \
         FROM read_parquet('{glob}', hive_partitioning = true) ORDER BY 1"
    ));
    let lines: Vec<Vec<&str>> = rows.lines().map(|l| l.split('|').collect()).collect();
    assert_eq!(lines.len(), 2, "{rows}");
    let (acme, scan) = (&lines[0], &lines[1]);
    assert_eq!(acme[0], "acme.pdf");
    // Printed values found; the vendor the page does not print is false; the derived currency unknown.
    assert_eq!(
        acme[1..9],
        [
            "INV-2024-0042",
            "Initech LLC",
            "True",
            "False",
            "True",
            "True",
            "None",
            "True"
        ],
        "{rows}"
    );
    let f = |s: &str| -> f64 { s.parse().unwrap_or_else(|_| panic!("{s:?} in {rows}")) };
    let holds = |b: &[&str], key: &str| {
        let t = &drawn[key]["box"];
        let (cx, cy) = (
            (t[0].as_f64().unwrap() + t[2].as_f64().unwrap()) / 2.0,
            (t[1].as_f64().unwrap() + t[3].as_f64().unwrap()) / 2.0,
        );
        f(b[0]) <= cx && cx <= f(b[2]) && f(b[1]) <= cy && cy <= f(b[3])
    };
    assert_eq!(acme[9], "1");
    assert!(
        holds(&acme[10..14], "invoice_id"),
        "invoice_id box {:?} vs {}",
        &acme[10..14],
        drawn["invoice_id"]
    );
    assert!(
        holds(&acme[14..18], "invoice_total"),
        "total box {:?} vs {}",
        &acme[14..18],
        drawn["invoice_total"]
    );
    // The line item's quantity "1" is printed in many places: its row (Service B's line) decides.
    let line = drawn["items[1].quantity"]["box"][1].as_f64().unwrap();
    for y in &acme[18..21] {
        assert!(
            (f(y) - line).abs() < 0.01,
            "item values not on the Service B line: {:?} vs {line}",
            &acme[18..21]
        );
    }
    assert!(holds(
        &[
            acme[21],
            acme[18],
            acme[22],
            &(f(acme[18]) + 0.02).to_string()
        ],
        "items[1].quantity"
    ));
    // Not found: only the page is known (a one-page row), no box.
    assert_eq!(acme[23..], ["1", "None", "0"], "{rows}");
    // A scan: no text layer, nothing grounded either way; its values came from its one page.
    assert_eq!(scan[0], "scan.png");
    assert_eq!(scan[3..9], ["None"; 6], "{rows}");
    assert_eq!(scan[9..11], ["1", "None"], "{rows}");

    // `pixtract eval --grounding`: the grounded invoice number is right, the ungrounded vendor wrong; the labels
    // located in the invoice's text layer where the generator drew them. The scan has no label (not scored).
    let labels = tmp.path().join("labels.json");
    std::fs::write(
        &labels,
        serde_json::json!({"acme.pdf": truth["digital_acme_invoice.pdf"]}).to_string(),
    )
    .unwrap();
    let out = pixtract(
        &[
            "eval",
            "--predictions",
            output.to_str().unwrap(),
            "--labels",
            labels.to_str().unwrap(),
            "--grounding",
            "--json",
        ],
        &[],
        &repo_root(),
    );
    assert!(out.status.success(), "{}", text(&out));
    let report: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    let field = |name: &str| -> &Value {
        report["grounding"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["field"] == name)
            .unwrap_or_else(|| panic!("{name}: {report}"))
    };
    assert_eq!(
        (
            field("invoice_id")["grounded"].as_u64(),
            field("invoice_id")["correct_when_grounded"].as_f64()
        ),
        (Some(1), Some(1.0))
    );
    assert_eq!(
        (
            field("vendor_name")["ungrounded"].as_u64(),
            field("vendor_name")["correct_when_ungrounded"].as_f64()
        ),
        (Some(1), Some(0.0))
    );
    for name in ["invoice_id", "vendor_name", "invoice_total", "invoice_date"] {
        let g = field(name);
        assert_eq!(
            (
                g["labelled"].as_u64(),
                g["found"].as_u64(),
                g["boxes_right"].as_u64()
            ),
            (Some(1), Some(1), Some(1)),
            "{name}: {g}"
        );
    }

    let strict = tmp.path().join("strict");
    let out = run_spec(tmp.path(), &inputs, &strict, "require_grounding = true");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let glob = format!("{}/**/*.parquet", strict.display());
    let rows = duckdb(&format!(
        "SELECT regexp_replace(source_uri, '.*/', ''), invoice_id, coalesce(vendor_name, 'NULL'), \
         _review, _review_reasons, _grounded.vendor_name, status \
         FROM read_parquet('{glob}', hive_partitioning = true) ORDER BY 1"
    ));
    assert_eq!(
        rows.trim(),
        "acme.pdf|INV-2024-0042|NULL|['vendor_name']|['ungrounded']|False|ok\n\
         scan.png|INV-2024-0042|Initech LLC|[]|[]|None|ok",
        "{rows}"
    );
}

/// `pixtract review` in a real browser: the invoice whose vendor `require_grounding` withheld, its page
/// re-rendered with a box where each located value is printed (the box's place on the image agrees with
/// `_location`, and holds where the generator drew the value), the withheld vendor marked with its reason; the
/// scan (nothing to check) left out; then the document changed on disk: its pages refused, saying why.
#[test]
fn review_page_boxes_each_value_where_it_is_printed() {
    use crate::browser::Browser;
    let tmp = tempfile::tempdir().unwrap();
    let (samples, truth) = digital_samples(&tmp.path().join("digital"));
    let inputs = tmp.path().join("in");
    std::fs::create_dir(&inputs).unwrap();
    std::fs::copy(
        samples.join("digital_acme_invoice.pdf"),
        inputs.join("acme.pdf"),
    )
    .unwrap();
    image::RgbImage::from_pixel(400, 300, image::Rgb([250, 250, 250]))
        .save(inputs.join("scan.png"))
        .unwrap();
    let output = tmp.path().join("out");
    let out = run_spec(tmp.path(), &inputs, &output, "require_grounding = true");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let page = tmp.path().join("review.html");
    let review = |page: &Path| {
        let out = pixtract(
            &[
                "review",
                output.to_str().unwrap(),
                "--out",
                page.to_str().unwrap(),
            ],
            &[],
            &repo_root(),
        );
        assert!(out.status.success(), "{}", text(&out));
        text(&out)
    };
    let said = review(&page);
    assert!(
        said.contains("1 rows to review (0 more not shown, 0 without their pages)"),
        "{said}"
    );

    let mut browser = Browser::start();
    let url = browser.open(&page);
    let rows = browser.eval("[...document.querySelectorAll('h2')].map(h => h.textContent)");
    assert_eq!(rows.as_array().unwrap().len(), 1, "{rows}");
    assert!(rows[0].as_str().unwrap().contains("acme.pdf"), "{rows}");
    // Each box's place on the page image, as shares of the image (what the reader sees), by value path.
    let boxes = browser.eval(
        "Object.fromEntries([...document.querySelectorAll('.page .box')].map(b => { \
           const img = b.parentElement.querySelector('img').getBoundingClientRect(); \
           const r = b.getBoundingClientRect(); \
           return [b.dataset.path, [(r.left - img.left) / img.width, (r.top - img.top) / img.height, \
                   (r.right - img.left) / img.width, (r.bottom - img.top) / img.height, b.className]]; }))",
    );
    let drawn = &truth["digital_acme_invoice.pdf"]["_locations"];
    for (path, label) in [
        ("invoice_id", "invoice_id"),
        ("invoice_total", "invoice_total"),
        ("invoice_date", "invoice_date"),
        ("items[0].description", "items[1].description"),
        ("items[0].quantity", "items[1].quantity"),
        ("items[0].amount", "items[1].amount"),
    ] {
        let b = boxes[path]
            .as_array()
            .unwrap_or_else(|| panic!("no box for {path}: {boxes}"));
        let t = &drawn[label]["box"];
        let centre = |i: usize| (t[i].as_f64().unwrap() + t[i + 2].as_f64().unwrap()) / 2.0;
        let (x0, y0, x1, y1) = (
            b[0].as_f64().unwrap(),
            b[1].as_f64().unwrap(),
            b[2].as_f64().unwrap(),
            b[3].as_f64().unwrap(),
        );
        assert!(
            x0 <= centre(0) && centre(0) <= x1 && y0 <= centre(1) && centre(1) <= y1,
            "{path}: box on screen {b:?}, drawn at {t}"
        );
        assert_eq!(b[4], "box", "{path} is not to check");
    }
    assert!(
        boxes.get("vendor_name").is_none(),
        "the vendor was not found: no box"
    );
    let flagged = browser.eval(
        "[...document.querySelectorAll('tr.check')].map(tr => [...tr.children].map(td => td.textContent))",
    );
    assert_eq!(
        flagged,
        serde_json::json!([[
            "",
            "vendor_name",
            "null",
            "not found",
            "withheld: not on the page"
        ]])
    );
    let screenshot = browser.screenshot(1200);
    assert!(browser.log.errors.is_empty(), "{:?}", browser.log.errors);
    // The page images are data: URLs inside the file; nothing else is requested.
    let fetched: Vec<&String> = browser
        .log
        .requests
        .iter()
        .filter(|r| !r.starts_with("data:"))
        .collect();
    assert_eq!(fetched, vec![&url], "a static page: nothing fetched");
    let shot = repo_root().join("target/review-test/review.png");
    std::fs::create_dir_all(shot.parent().unwrap()).unwrap();
    std::fs::write(&shot, &screenshot).unwrap();
    eprintln!("screenshot: {}", shot.display());

    // The document changed since the run: its pages are not shown, and the page says why.
    let mut bytes = std::fs::read(inputs.join("acme.pdf")).unwrap();
    bytes.extend_from_slice(b"\n% edited\n");
    std::fs::write(inputs.join("acme.pdf"), bytes).unwrap();
    let changed = tmp.path().join("changed.html");
    let said = review(&changed);
    assert!(said.contains("1 without their pages"), "{said}");
    let html = std::fs::read_to_string(&changed).unwrap();
    assert!(
        html.contains("the document changed since this row was written"),
        "{html}"
    );
    assert!(
        !html.contains("<img"),
        "no page image of a changed document"
    );
}

/// Document mode (issue: one row per invoice) keeps where each merged value came from: a 3-page born-digital
/// invoice answered in windows of one page, the grammar forcing the invoice's own number and total into every
/// window's answer. The number merges `first` (window 1: page 1, where the header prints it), the total `last`
/// (window 3: page 3, the only page printing it), each with its box; the windows that do not print the total
/// are not what the row keeps.
#[test]
fn document_mode_keeps_the_page_each_merged_value_came_from() {
    use crate::pipeline::duckdb;
    let tmp = tempfile::tempdir().unwrap();
    let (samples, truth) = digital_samples(&tmp.path().join("digital"));
    let inputs = tmp.path().join("in");
    std::fs::create_dir(&inputs).unwrap();
    std::fs::copy(
        samples.join("digital_invoice_03_pages.pdf"),
        inputs.join("three.pdf"),
    )
    .unwrap();
    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "invoice_id": {"type": "string", "enum": ["MP-03-2024"], "x-merge": "first"},
            "invoice_total": {"type": "number", "enum": [6004.8], "x-merge": "last"}
        },
        "required": ["invoice_id", "invoice_total"]
    });
    let schema_path = tmp.path().join("three.json");
    std::fs::write(&schema_path, schema.to_string()).unwrap();
    let output = tmp.path().join("out");
    // A page at 512 px is 32 rows of 26 tokens (832) plus the instruction: 1,700 tokens hold one page, not two.
    let spec = format!(
        "name = \"doc\"\n[source]\nuri = \"{}\"\n[raster]\nworkers = 1\nmax_side = 512\n[model]\ndir = \"{}\"\n\
         batch_size = 2\nmax_new_tokens = 200\n[extract]\nschema = \"{}\"\nunit = \"document\"\n\
         max_prompt_tokens = 1700\n[output]\nuri = \"{}\"\n",
        inputs.display(),
        crate::util::tiny_model().display(),
        schema_path.display(),
        output.display()
    );
    let spec_path = tmp.path().join("doc.toml");
    std::fs::write(&spec_path, spec).unwrap();
    let out = pixtract(&["run", spec_path.to_str().unwrap()], &[], &repo_root());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let glob = format!("{}/**/*.parquet", output.display());
    let rows = duckdb(&format!(
        "SELECT page_start, page_end, len(string_split(raw_output, '[pages ')) - 1, \
         _location.invoice_id.page, _location.invoice_id.x0, _location.invoice_id.y0, \
         _location.invoice_id.x1, _location.invoice_id.y1, _grounded.invoice_id, \
         _location.invoice_total.page, _location.invoice_total.x0, _location.invoice_total.y0, \
         _location.invoice_total.x1, _location.invoice_total.y1, _grounded.invoice_total \
         FROM read_parquet('{glob}', hive_partitioning = true)"
    ));
    let row: Vec<&str> = rows.trim().split('|').collect();
    assert_eq!(
        row[..4],
        ["1", "3", "3", "1"],
        "one row, three windows: {rows}"
    );
    let drawn = &truth["digital_invoice_03_pages.pdf"]["_locations"];
    let holds = |b: &[&str], key: &str| {
        let f = |s: &str| -> f64 { s.parse().unwrap_or_else(|_| panic!("{s:?} in {rows}")) };
        let t = &drawn[key]["box"];
        let cx = (t[0].as_f64().unwrap() + t[2].as_f64().unwrap()) / 2.0;
        let cy = (t[1].as_f64().unwrap() + t[3].as_f64().unwrap()) / 2.0;
        f(b[0]) <= cx && cx <= f(b[2]) && f(b[1]) <= cy && cy <= f(b[3])
    };
    assert!(holds(&row[4..8], "invoice_id"), "{rows}");
    assert_eq!(row[8], "True");
    assert_eq!(row[9], "3", "the total came from the last window: {rows}");
    assert!(holds(&row[10..14], "invoice_total"), "{rows}");
    assert_eq!(row[14], "True");
}
