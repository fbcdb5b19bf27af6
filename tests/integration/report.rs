//! The run report in a real headless browser: a small real run (tiny model, good and broken documents) with
//! `--report`, then `pixtract report` with `pixtract eval --json` figures; the page is opened in chromium over the
//! DevTools protocol, and what its tables and charts say is compared with the Parquet rows read back by DuckDB,
//! the manifest and the eval JSON.

use std::path::Path;

use serde_json::Value;

use crate::browser::Browser;
use crate::pipeline::duckdb;
use crate::util::{
    PdfPage, invoice_content, make_pdf, pixtract, read_json, repo_root, text, tiny_gqa_model,
};

/// The rows of a table in the page, as cell texts (a list's items one per line).
fn table_cells(browser: &mut Browser, selector: &str) -> Vec<Vec<String>> {
    let value = browser.eval(&format!(
        "[...document.querySelectorAll('{selector} tbody tr')].map(tr => [...tr.children].map(c => c.querySelector('li') ? [...c.querySelectorAll('li')].map(li => li.textContent).join('\\n') : c.textContent.trim()))"
    ));
    serde_json::from_value(value).unwrap()
}

/// The `<text>` elements of the SVG charts in a section.
fn chart_texts(browser: &mut Browser, section: &str) -> Vec<String> {
    let value = browser.eval(&format!(
        "[...document.querySelectorAll('#{section} svg text')].map(t => t.textContent.trim())"
    ));
    serde_json::from_value(value).unwrap()
}

fn number(cell: &str) -> usize {
    cell.parse()
        .unwrap_or_else(|e| panic!("{cell:?} is not a count: {e}"))
}

fn percent(part: usize, whole: usize) -> String {
    if whole == 0 {
        "n/a".into()
    } else {
        format!("{:.1}%", part as f64 / whole as f64 * 100.0)
    }
}

/// The SQL condition under which a field of DuckDB type `ty` holds a value, as the report defines it.
fn filled_sql(field: &str, ty: &str) -> String {
    if ty.ends_with("[]") {
        format!("({field} IS NOT NULL AND len({field}) > 0)")
    } else if ty == "VARCHAR" {
        format!("({field} IS NOT NULL AND trim({field}) <> '')")
    } else {
        format!("({field} IS NOT NULL)")
    }
}

fn write_inputs(inputs: &Path) {
    std::fs::create_dir_all(inputs).unwrap();
    let pages = vec![
        PdfPage::new(612.0, 792.0, invoice_content("INVOICE 7", 4)),
        PdfPage::new(612.0, 792.0, invoice_content("INVOICE 7 page 2", 2)),
    ];
    std::fs::write(inputs.join("invoice.pdf"), make_pdf(&pages)).unwrap();
    std::fs::copy(
        repo_root().join("models/tiny/reference/rgba/image0.png"),
        inputs.join("logo.png"),
    )
    .unwrap();
    let good = make_pdf(&pages[..1]);
    std::fs::write(inputs.join("truncated.pdf"), &good[..good.len() / 3]).unwrap();
    std::fs::write(inputs.join("empty.jpg"), b"").unwrap();
    std::fs::write(
        inputs.join("notes.pdf"),
        b"these are not the bytes of a PDF",
    )
    .unwrap();
}

#[test]
fn run_report_in_headless_chromium_holds_the_runs_numbers() {
    let tmp = tempfile::tempdir().unwrap();
    let inputs = tmp.path().join("in");
    write_inputs(&inputs);
    let output = tmp.path().join("out");
    let spec = tmp.path().join("report.toml");
    std::fs::write(
        &spec,
        format!(
            "name = \"report-test\"\n[source]\nuri = \"{}\"\n[raster]\nworkers = 1\n[model]\ndir = \"{}\"\n\
             batch_size = 4\nmax_new_tokens = 512\n[extract]\nschema = \"{}\"\n[output]\nuri = \"{}\"\n",
            inputs.display(),
            tiny_gqa_model().display(),
            repo_root().join("schemas/receipt.json").display(),
            output.display()
        ),
    )
    .unwrap();
    let run = pixtract(
        &["run", spec.to_str().unwrap(), "--report"],
        &[],
        &repo_root(),
    );
    // Broken documents make it a finished run with failures (2), not a crash.
    assert_eq!(run.status.code(), Some(2), "{}", text(&run));

    // The run wrote its report beside its manifest.
    let partition = std::fs::read_dir(&output)
        .unwrap()
        .flatten()
        .find(|e| e.path().is_dir() && e.file_name().to_string_lossy().starts_with("dt="))
        .expect("partition directory")
        .path();
    let manifest_path = std::fs::read_dir(&partition)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("_manifest-")
        })
        .expect("manifest");
    let manifest = read_json(&manifest_path);
    let run_id = manifest["run_id"].as_str().unwrap().to_string();
    let run_report = partition.join(format!("_report-{run_id}.html"));
    assert!(run_report.is_file(), "{}", text(&run));
    // The decoder's figures from the manifest: slot admissions and the idle share of row places.
    let html = std::fs::read_to_string(&run_report).unwrap();
    let decode = &manifest["summary"]["decode"];
    assert_eq!(decode["batching"], "continuous", "{manifest}");
    assert_eq!(
        summary_value(&html, "slot_admissions"),
        decode["admissions"].to_string(),
        "{decode}"
    );
    assert_eq!(
        summary_value(&html, "idle_row_share"),
        format!("{:.1}%", 100.0 * decode["idle_row_share"].as_f64().unwrap()),
        "{decode}"
    );
    assert!(
        text(&run).contains(&format!("_report-{run_id}.html")),
        "{}",
        text(&run)
    );

    // Accuracy figures: labels for two documents, scored by `pixtract eval --json`.
    let labels = tmp.path().join("labels.jsonl");
    std::fs::write(
        &labels,
        "{\"document\": \"invoice.pdf\", \"company\": \"ACME\", \"total\": \"9.99\", \"date\": \"2024-03-07\"}\n\
         {\"document\": \"logo.png\", \"company\": \"Logo Shop\", \"total\": \"1.00\"}\n",
    )
    .unwrap();
    let eval = pixtract(
        &[
            "eval",
            "--predictions",
            output.to_str().unwrap(),
            "--labels",
            labels.to_str().unwrap(),
            "--json",
        ],
        &[],
        &repo_root(),
    );
    assert!(eval.status.success(), "{}", text(&eval));
    let eval_json = tmp.path().join("eval.json");
    std::fs::write(&eval_json, &eval.stdout).unwrap();
    let eval: Value = serde_json::from_slice(&eval.stdout).unwrap();

    let page = tmp.path().join("report.html");
    let out = pixtract(
        &[
            "report",
            output.to_str().unwrap(),
            "--out",
            page.to_str().unwrap(),
            "--eval",
            eval_json.to_str().unwrap(),
        ],
        &[],
        &repo_root(),
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains(&run_id), "{}", text(&out));

    let mut browser = Browser::start();
    let url = browser.open(&page);

    // What the run committed, read back by DuckDB.
    let glob = format!("{}/**/*.parquet", output.display());
    let from = format!("read_parquet('{glob}', hive_partitioning = true)");
    let totals = duckdb(&format!(
        "SELECT count(*), count(*) FILTER (WHERE status = 'ok'), count(*) FILTER (WHERE status = 'error'), \
         count(DISTINCT source_uri), coalesce(sum(page_end - page_start + 1) FILTER (WHERE page_start > 0), 0) \
         FROM {from}"
    ));
    let totals: Vec<usize> = totals.trim().split('|').map(number).collect();
    let summary: std::collections::HashMap<String, String> = serde_json::from_value(browser.eval(
        "Object.fromEntries([...document.querySelectorAll('#summary-table td')].map(td => [td.dataset.key, td.textContent]))",
    ))
    .unwrap();
    assert_eq!(
        browser.eval("document.getElementById('run-id').textContent"),
        Value::from(run_id.clone())
    );
    for (key, expected) in ["rows", "rows_ok", "rows_error", "documents", "pages"]
        .iter()
        .zip(&totals)
    {
        assert_eq!(
            number(&summary[*key]),
            *expected,
            "summary {key}: {summary:?}"
        );
    }
    // The run's own summary agrees with its rows.
    assert_eq!(manifest["summary"]["rows"].as_u64(), Some(totals[0] as u64));
    assert_eq!(
        manifest["summary"]["pages"].as_u64(),
        Some(totals[4] as u64)
    );

    // Throughput: every row and page falls in some bin.
    let bins = table_cells(&mut browser, "#throughput-table");
    assert!(!bins.is_empty());
    assert_eq!(bins.iter().map(|b| number(&b[1])).sum::<usize>(), totals[0]);
    assert_eq!(bins.iter().map(|b| number(&b[2])).sum::<usize>(), totals[4]);
    assert!(
        browser
            .eval("document.querySelectorAll('#throughput svg rect').length")
            .as_u64()
            > Some(bins.len() as u64),
        "a bar per bin"
    );

    // Stage busy shares: the manifest's figures, in the table and as the chart's bar labels.
    let stages = table_cells(&mut browser, "#stages-table");
    let recorded = manifest["summary"]["stages"].as_array().unwrap();
    assert_eq!(stages.len(), recorded.len());
    let stage_labels = chart_texts(&mut browser, "stages");
    for (row, stage) in stages.iter().zip(recorded) {
        assert_eq!(row[0], stage["stage"].as_str().unwrap());
        assert_eq!(
            row[1],
            format!("{:.3}", stage["busy_seconds"].as_f64().unwrap())
        );
        let share = format!("{:.1}%", stage["share"].as_f64().unwrap() * 100.0);
        assert_eq!(row[2], share);
        assert!(
            stage_labels.contains(&row[0]) && stage_labels.contains(&share),
            "{stage_labels:?}"
        );
    }

    // Errors by cause: every failed row is in exactly one group (status, error_kind, cause) with its document,
    // and the cause is part of its message.
    let failed = duckdb(&format!(
        "SELECT status, error_kind, source_uri, error FROM {from} WHERE status <> 'ok' \
         ORDER BY source_uri, page_start"
    ));
    let failed: Vec<Vec<&str>> = failed.lines().map(|l| l.splitn(4, '|').collect()).collect();
    let groups = table_cells(&mut browser, "#error-table");
    let documents_of =
        |g: &Vec<String>| -> Vec<String> { g[4].split_whitespace().map(str::to_string).collect() };
    assert_eq!(
        groups.iter().map(|g| number(&g[3])).sum::<usize>(),
        failed.len()
    );
    let in_group = |g: &Vec<String>, row: &Vec<&str>| {
        g[0] == row[0]
            && g[1] == row[1]
            && row[3].contains(g[2].as_str())
            && documents_of(g).iter().any(|d| d == row[2])
    };
    for row in &failed {
        let matching = groups.iter().filter(|g| in_group(g, row)).count();
        assert_eq!(matching, 1, "{row:?} in {groups:?}");
    }
    for g in &groups {
        let rows = failed.iter().filter(|r| in_group(g, r)).count();
        assert_eq!(number(&g[3]), rows, "{g:?}");
    }
    for (name, kind) in [
        ("empty.jpg", "unreadable"),
        ("truncated.pdf", "unreadable"),
        ("notes.pdf", "unsupported"),
    ] {
        assert!(
            groups.iter().any(|g| g[1] == kind && g[4].contains(name)),
            "{name} in the error table as {kind}: {groups:?}"
        );
    }

    // Fill rates and confidence histograms, per schema field, against DuckDB.
    let types = duckdb(&format!(
        "SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM {from})"
    ));
    let types: std::collections::HashMap<&str, &str> =
        types.lines().filter_map(|l| l.split_once('|')).collect();
    let schema = read_json(&repo_root().join("schemas/receipt.json"));
    let fields: Vec<String> = schema["properties"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    let fill = table_cells(&mut browser, "#fill-table");
    let confidence = table_cells(&mut browser, "#confidence-table");
    let fill_labels = chart_texts(&mut browser, "fill");
    let histogram_labels = chart_texts(&mut browser, "confidence");
    assert_eq!(fill.len(), fields.len(), "{fill:?}");
    for ((field, row), bins) in fields.iter().zip(&fill).zip(&confidence) {
        let filled = filled_sql(field, types[field.as_str()]);
        let counts = duckdb(&format!(
            "SELECT count(*), count(*) FILTER (WHERE {filled}), count(*) FILTER (WHERE status = 'ok'), \
             count(*) FILTER (WHERE status = 'ok' AND {filled}) FROM {from} WHERE finish_reason IS NOT NULL"
        ));
        let counts: Vec<usize> = counts.trim().split('|').map(number).collect();
        let expected = vec![
            field.clone(),
            counts[0].to_string(),
            counts[1].to_string(),
            percent(counts[1], counts[0]),
            counts[2].to_string(),
            counts[3].to_string(),
            percent(counts[3], counts[2]),
        ];
        assert_eq!(row, &expected, "fill rate of {field}");
        // The chart: the field's name and both of its rates as bar labels.
        for label in [field, &expected[3], &expected[6]] {
            assert!(
                fill_labels.contains(label),
                "{label} in the fill chart: {fill_labels:?}"
            );
        }
        let histogram = duckdb(&format!(
            "SELECT least(floor(_confidence.{field}.min * 10), 9)::INTEGER AS bin, count(*) FROM {from} \
             WHERE finish_reason IS NOT NULL AND {filled} AND _confidence.{field}.min IS NOT NULL GROUP BY bin"
        ));
        let mut expected_bins = vec![0usize; 10];
        for line in histogram.lines() {
            let (bin, n) = line.split_once('|').unwrap();
            expected_bins[number(bin)] = number(n);
        }
        assert_eq!(bins[0], *field);
        let shown: Vec<usize> = bins[1..11].iter().map(|c| number(c)).collect();
        assert_eq!(shown, expected_bins, "confidence histogram of {field}");
        let caption = format!("{field} ({} values)", expected_bins.iter().sum::<usize>());
        assert!(
            histogram_labels.contains(&caption),
            "{caption} in {histogram_labels:?}"
        );
    }

    // Accuracy: the eval JSON's figures, per field and micro.
    let scores = table_cells(&mut browser, "#eval-table");
    let eval_fields = eval["fields"].as_array().unwrap();
    assert_eq!(scores.len(), eval_fields.len());
    for (row, f) in scores.iter().zip(eval_fields) {
        assert_eq!(row[0], f["field"].as_str().unwrap());
        assert_eq!(number(&row[1]), f["labelled"].as_u64().unwrap() as usize);
        for (cell, key) in row[6..9].iter().zip(["precision", "recall", "f1"]) {
            assert_eq!(
                *cell,
                format!("{:.3}", f[key].as_f64().unwrap()),
                "{key} of {row:?}"
            );
        }
    }
    assert_eq!(
        browser.eval("document.getElementById('micro-f1').textContent"),
        Value::from(format!("{:.3}", eval["micro"]["f1"].as_f64().unwrap()))
    );

    // The report the run wrote holds the same tables (only the time it was made differs).
    let written = std::fs::read_to_string(&run_report).unwrap();
    let cli = std::fs::read_to_string(&page).unwrap();
    let section = |html: &str, id: &str| -> String {
        let start = html
            .find(&format!("<table id=\"{id}\""))
            .unwrap_or_else(|| panic!("{id}"));
        let end = start + html[start..].find("</table>").unwrap();
        html[start..end].to_string()
    };
    for id in [
        "error-table",
        "fill-table",
        "confidence-table",
        "stages-table",
    ] {
        assert_eq!(section(&written, id), section(&cli, id), "{id}");
    }

    // A static page: nothing but the file itself was requested, and nothing went to the console as an error.
    let screenshot = browser.screenshot(1000);
    assert!(browser.log.errors.is_empty(), "{:?}", browser.log.errors);
    assert_eq!(browser.log.requests, vec![url], "requests");
    let shot = repo_root().join("target/report-test/report.png");
    std::fs::create_dir_all(shot.parent().unwrap()).unwrap();
    std::fs::write(&shot, &screenshot).unwrap();
    assert_eq!(&screenshot[1..4], b"PNG");
    eprintln!("screenshot: {}", shot.display());
}

/// The `<td data-key=KEY>` value of the page's summary table.
fn summary_value(html: &str, key: &str) -> String {
    let marker = format!("data-key=\"{key}\">");
    let start = html
        .find(&marker)
        .unwrap_or_else(|| panic!("no summary {key}"))
        + marker.len();
    html[start..start + html[start..].find('<').unwrap()].to_string()
}

fn summary_table(html: &str) -> &str {
    let start = html
        .find("<table id=\"summary-table\"")
        .expect("summary table");
    &html[start..start + html[start..].find("</table>").unwrap()]
}

#[test]
fn report_reads_an_s3_output_and_picks_the_run() {
    use futures::TryStreamExt;
    use object_store::ObjectStoreExt;
    let moto = crate::util::Moto::start();
    moto.create_bucket("lake");
    let store = moto.store("lake");
    let env = moto.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let tmp = tempfile::tempdir().unwrap();
    let inputs = tmp.path().join("in");
    std::fs::create_dir_all(&inputs).unwrap();
    std::fs::copy(
        repo_root().join("models/tiny/reference/rgba/image0.png"),
        inputs.join("logo.png"),
    )
    .unwrap();
    std::fs::write(inputs.join("empty.jpg"), b"").unwrap();
    let spec = crate::pipeline::write_spec(tmp.path(), &inputs, Path::new("s3://lake/out/"));
    let first = pixtract(
        &["run", spec.to_str().unwrap(), "--report"],
        &env,
        &repo_root(),
    );
    assert_eq!(first.status.code(), Some(2), "{}", text(&first));
    // The second run finds both documents done: a run with a manifest and no rows.
    let second = pixtract(&["run", spec.to_str().unwrap()], &env, &repo_root());
    assert_eq!(second.status.code(), Some(0), "{}", text(&second));

    let rt = tokio::runtime::Runtime::new().unwrap();
    let keys: Vec<String> = rt.block_on(async {
        store
            .list(Some(&object_store::path::Path::from("out")))
            .map_ok(|m| m.location.to_string())
            .try_collect()
            .await
            .unwrap()
    });
    let get = |key: &str| -> Vec<u8> {
        rt.block_on(async {
            let path = object_store::path::Path::from(key);
            store
                .get(&path)
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap()
                .to_vec()
        })
    };
    let mut manifests: Vec<serde_json::Value> = keys
        .iter()
        .filter(|k| k.contains("/_manifest-"))
        .map(|k| serde_json::from_slice(&get(k)).unwrap())
        .collect();
    manifests.sort_by_key(|m| m["run_id"].as_str().unwrap().to_string());
    assert_eq!(manifests.len(), 2, "{keys:?}");
    let (run1, run2) = (
        manifests[0]["run_id"].as_str().unwrap(),
        manifests[1]["run_id"].as_str().unwrap(),
    );
    let stored_key = keys
        .iter()
        .find(|k| k.ends_with(&format!("/_report-{run1}.html")))
        .unwrap_or_else(|| panic!("the first run's report beside its manifest: {keys:?}"));
    let stored = String::from_utf8(get(stored_key)).unwrap();
    assert!(
        !keys.iter().any(|k| k.contains(&format!("_report-{run2}"))),
        "no report unless asked: {keys:?}"
    );

    // Default: the latest run, here the one that skipped everything.
    let latest = tmp.path().join("latest.html");
    let out = pixtract(
        &["report", "s3://lake/out", "--out", latest.to_str().unwrap()],
        &env,
        &repo_root(),
    );
    assert!(out.status.success(), "{}", text(&out));
    let latest = std::fs::read_to_string(&latest).unwrap();
    assert!(latest.contains(&format!("<span id=\"run-id\">{run2}</span>")));
    assert_eq!(summary_value(&latest, "rows"), "0");
    assert_eq!(
        summary_value(&latest, "documents_skipped"),
        manifests[1]["summary"]["documents_skipped"].to_string()
    );

    // --run: the first run, read from S3, says what the report the run wrote says.
    let earlier = tmp.path().join("earlier.html");
    let out = pixtract(
        &[
            "report",
            "s3://lake/out",
            "--run",
            run1,
            "--out",
            earlier.to_str().unwrap(),
        ],
        &env,
        &repo_root(),
    );
    assert!(out.status.success(), "{}", text(&out));
    let earlier = std::fs::read_to_string(&earlier).unwrap();
    assert_eq!(summary_table(&earlier), summary_table(&stored));
    assert_eq!(
        summary_value(&earlier, "rows"),
        manifests[0]["summary"]["rows"].to_string()
    );
    assert!(
        earlier.contains("empty.jpg"),
        "the failed document is named"
    );

    // A run that is not there: exit 1, naming the runs that are.
    let out = pixtract(
        &[
            "report",
            "s3://lake/out",
            "--run",
            "nope",
            "--out",
            tmp.path().join("x.html").to_str().unwrap(),
        ],
        &env,
        &repo_root(),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("no run nope") && text(&out).contains(run1),
        "{}",
        text(&out)
    );
}
