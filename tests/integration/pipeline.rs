//! `pixtract run` end to end on real parts: documents in a folder -> pdfium / image decoding -> the tiny model
//! constrained by the receipt schema -> Parquet, read back by DuckDB.

use std::path::Path;
use std::process::Command;

use crate::util::{
    PdfPage, invoice_content, make_pdf, pixtract, python, repo_root, text, tiny_model,
};

fn duckdb(sql: &str) -> String {
    let out = Command::new(python())
        .args(["-c", &format!("import duckdb\nfor r in duckdb.sql({sql:?}).fetchall(): print('|'.join(map(str, r)))")])
        .output()
        .expect("run duckdb");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn write_spec(dir: &Path, inputs: &Path, output: &Path) -> std::path::PathBuf {
    let spec = format!(
        r#"name = "e2e"
[source]
uri = "{}"
[raster]
workers = 1
[model]
dir = "{}"
batch_size = 4
max_new_tokens = 48
[extract]
schema = "{}"
[output]
uri = "{}"
"#,
        inputs.display(),
        tiny_model().display(),
        repo_root().join("schemas/receipt.json").display(),
        output.display()
    );
    let path = dir.join("e2e.toml");
    std::fs::write(&path, spec).unwrap();
    path
}

#[test]
fn run_turns_a_folder_into_parquet_with_error_rows_for_bad_documents() {
    let tmp = tempfile::tempdir().unwrap();
    let inputs = tmp.path().join("in");
    std::fs::create_dir(&inputs).unwrap();
    let pages = vec![
        PdfPage::new(612.0, 792.0, invoice_content("INVOICE 1", 4)),
        PdfPage::new(612.0, 792.0, invoice_content("INVOICE 1 page 2", 2)),
    ];
    std::fs::write(inputs.join("invoice.pdf"), make_pdf(&pages)).unwrap();
    std::fs::copy(
        tiny_model().join("reference/rgba/image0.png"),
        inputs.join("logo.png"),
    )
    .unwrap();
    let good = make_pdf(&pages[..1]);
    std::fs::write(inputs.join("truncated.pdf"), &good[..good.len() / 3]).unwrap();
    std::fs::write(inputs.join("random.pdf"), crate::util::noise(5000, 7)).unwrap();
    std::fs::write(inputs.join("empty.jpg"), b"").unwrap();
    let output = tmp.path().join("out");
    let spec = write_spec(tmp.path(), &inputs, &output);

    let out = pixtract(&["run", spec.to_str().unwrap()], &[], &repo_root());
    let t = text(&out);
    // Some documents failed, each with its row: exit code 2, not a crash.
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(t.contains("5 documents (3 failed), 3 pages, 6 rows"), "{t}");

    let glob = format!("{}/**/*.parquet", output.display());
    let rows = duckdb(&format!(
        "SELECT regexp_replace(source_uri, '.*/', ''), page_start, doc_page_count, status, \
         finish_reason IS NOT NULL, coalesce(error, '') FROM read_parquet('{glob}', hive_partitioning = true) \
         ORDER BY 1, 2"
    ));
    let lines: Vec<Vec<&str>> = rows.lines().map(|l| l.split('|').collect()).collect();
    assert_eq!(lines.len(), 6, "{rows}");
    // Every page that rendered went through the model (finish_reason set), with its page number.
    let model_rows: Vec<(&str, &str)> = lines
        .iter()
        .filter(|l| l[4] == "True")
        .map(|l| (l[0], l[1]))
        .collect();
    assert_eq!(
        model_rows,
        vec![
            ("invoice.pdf", "1"),
            ("invoice.pdf", "2"),
            ("logo.png", "1")
        ],
        "{rows}"
    );
    assert!(
        lines.iter().any(|l| l[0] == "invoice.pdf" && l[2] == "2"),
        "page count: {rows}"
    );
    // Broken documents: an error row each, naming the document and the cause.
    for name in ["empty.jpg", "random.pdf", "truncated.pdf"] {
        let l = lines
            .iter()
            .find(|l| l[0] == name)
            .unwrap_or_else(|| panic!("no row for {name}: {rows}"));
        assert_eq!(l[3], "error", "{rows}");
        assert!(l[5].contains(name), "error names the document: {rows}");
    }
    // Typed columns and the partition column as DuckDB sees them.
    let types = duckdb(&format!(
        "SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM read_parquet('{glob}', hive_partitioning = true)) \
         WHERE column_name IN ('transaction_date', 'total', 'items', 'dt', 'processed_at')"
    ));
    assert!(types.contains("transaction_date|DATE"), "{types}");
    assert!(types.contains("total|DOUBLE"), "{types}");
    assert!(types.contains("items|STRUCT("), "{types}");
    assert!(types.contains("dt|DATE"), "{types}");
    // Manifest and _SUCCESS written last, next to the data.
    let partition = std::fs::read_dir(&output)
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path();
    assert!(partition.join("_SUCCESS").is_file());
    assert!(
        std::fs::read_dir(&partition)
            .unwrap()
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().contains("inprogress")),
        "no partial files"
    );
}

#[test]
fn run_refuses_bad_specs_before_doing_work() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = tmp.path().join("bad.toml");
    std::fs::write(&spec, "name = \"x\"\nsurprise = 1\n").unwrap();
    let out = pixtract(&["run", spec.to_str().unwrap()], &[], &repo_root());
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("bad.toml") && t.contains("surprise"), "{t}");

    let inputs = tmp.path().join("in");
    std::fs::create_dir(&inputs).unwrap();
    let spec = write_spec(tmp.path(), &inputs, &tmp.path().join("out"));
    let out = pixtract(
        &[
            "run",
            spec.to_str().unwrap(),
            "--model",
            "/nonexistent/model",
        ],
        &[],
        &repo_root(),
    );
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("/nonexistent/model/pixtract-model.json"), "{t}");
}
