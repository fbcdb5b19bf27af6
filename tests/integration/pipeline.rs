//! `pixtract run` end to end on real parts: documents in a folder -> pdfium / image decoding -> the tiny model
//! constrained by the receipt schema -> Parquet, read back by DuckDB.

use std::path::Path;

use crate::util::{
    PdfPage, invoice_content, make_pdf, pixtract, python_stdout, repo_root, text, tiny_model,
};

pub fn duckdb(sql: &str) -> String {
    let script = format!(
        "import duckdb\nfor r in duckdb.sql({sql:?}).fetchall(): print('|'.join(map(str, r)))"
    );
    python_stdout(&script, &[] as &[&str])
}

pub fn write_spec(dir: &Path, inputs: &Path, output: &Path) -> std::path::PathBuf {
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
    assert!(
        t.contains("5 documents (3 failed, 0 skipped as already done), 3 pages, 6 rows"),
        "{t}"
    );

    let glob = format!("{}/**/*.parquet", output.display());
    let rows = duckdb(&format!(
        "SELECT regexp_replace(source_uri, '.*/', ''), page_start, doc_page_count, status, \
         finish_reason IS NOT NULL, coalesce(error, ''), coalesce(error_kind, '-') \
         FROM read_parquet('{glob}', hive_partitioning = true) ORDER BY 1, 2"
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
    // Broken documents: an error row each, naming the document and the cause, with the kind of failure.
    for (name, kind) in [
        ("empty.jpg", "unreadable"),
        ("random.pdf", "unsupported"),
        ("truncated.pdf", "unreadable"),
    ] {
        let l = lines
            .iter()
            .find(|l| l[0] == name)
            .unwrap_or_else(|| panic!("no row for {name}: {rows}"));
        assert_eq!(l[3], "error", "{rows}");
        assert!(l[5].contains(name), "error names the document: {rows}");
        assert_eq!(l[6], kind, "{name}: {rows}");
    }
    // Every row that is not ok has a kind (model rows of the random tiny model fail as answers or budgets);
    // ok rows have none.
    for l in &lines {
        match l[3] {
            "ok" => assert_eq!(l[6], "-", "{rows}"),
            _ if l[4] == "True" => assert!(["answer", "budget"].contains(&l[6]), "{rows}"),
            _ => assert_ne!(l[6], "-", "{rows}"),
        }
    }
    // Typed columns and the partition column as DuckDB sees them.
    let types = duckdb(&format!(
        "SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM read_parquet('{glob}', hive_partitioning = true)) \
         WHERE column_name IN ('transaction_date', 'total', 'items', 'dt', 'processed_at')"
    ));
    assert!(types.contains("transaction_date|DATE"), "{types}");
    assert!(types.contains("total|DECIMAL(18,3)"), "{types}");
    assert!(types.contains("items|STRUCT("), "{types}");
    assert!(types.contains("dt|DATE"), "{types}");
    // Manifest and _SUCCESS written last, next to the data.
    // (Beside the partition folder: only the hidden lock file of the output lease.)
    let entries: Vec<std::path::PathBuf> = std::fs::read_dir(&output)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    let partition = entries
        .iter()
        .find(|p| p.is_dir() && p.file_name().unwrap().to_string_lossy().starts_with("dt="))
        .unwrap_or_else(|| panic!("no partition folder: {entries:?}"))
        .clone();
    assert!(
        entries.iter().all(|p| p == &partition
            || p.file_name()
                .is_some_and(|n| n == ".pixtract-lease" || n == "_index")),
        "{entries:?}"
    );
    assert!(partition.join("_SUCCESS").is_file());
    assert!(
        std::fs::read_dir(&partition)
            .unwrap()
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().contains("inprogress")),
        "no partial files"
    );
    // Plain reporting: each failed document named on stderr, stage busy times in the summary.
    let stderr = String::from_utf8_lossy(&out.stderr);
    for name in ["empty.jpg", "random.pdf", "truncated.pdf"] {
        assert!(
            stderr
                .lines()
                .any(|l| l.starts_with("pixtract run: document failed:") && l.contains(name)),
            "{stderr}"
        );
    }
    assert!(
        t.contains("stages (busy seconds, share of wall time): fetch "),
        "{t}"
    );

    // JSON reporting: every stderr line is an event object, the summary on stdout is one object.
    let json_out = tmp.path().join("out-json");
    let out = pixtract(
        &[
            "run",
            spec.to_str().unwrap(),
            "--output",
            json_out.to_str().unwrap(),
            "--log-format",
            "json",
        ],
        &[("PIXTRACT_PROGRESS_SECONDS", "0.2")],
        &repo_root(),
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert_eq!(events[0]["event"], "run_started", "{events:?}");
    assert!(
        events
            .iter()
            .all(|e| e["ts"].is_string() && e["level"].is_string())
    );
    let failed: Vec<&str> = events
        .iter()
        .filter(|e| e["event"] == "document_failed")
        .map(|e| e["uri"].as_str().unwrap())
        .collect();
    assert_eq!(failed.len(), 3, "{events:?}");
    for name in ["empty.jpg", "random.pdf", "truncated.pdf"] {
        assert!(failed.iter().any(|u| u.ends_with(name)), "{failed:?}");
    }
    // Progress events know the total once the listing is counted, and then give an ETA.
    let progress: Vec<&serde_json::Value> =
        events.iter().filter(|e| e["event"] == "progress").collect();
    assert!(
        progress
            .iter()
            .any(|e| e["documents_total"] == 5 && e["eta_s"].is_number()),
        "{progress:?}"
    );
    let summary: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).expect("summary JSON");
    assert_eq!(summary["event"], "run_finished");
    assert_eq!(summary["exit_code"], 2);
    assert_eq!(summary["documents"], 5);
    assert_eq!(summary["documents_failed"], 3);
    assert_eq!(summary["rows"], 6);
    let stages: Vec<&str> = summary["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stage"].as_str().unwrap())
        .collect();
    assert_eq!(stages, ["fetch", "raster", "preprocess", "model", "write"]);
    let busy = |name: &str| {
        summary["stages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["stage"] == name)
            .unwrap()["busy_seconds"]
            .as_f64()
            .unwrap()
    };
    assert!(
        busy("model") > 0.0 && busy("raster") > 0.0 && busy("write") > 0.0,
        "{summary}"
    );
    // The run manifest holds the same summary, stage times included.
    let manifest = std::fs::read_dir(&json_out)
        .unwrap()
        .flatten()
        .filter(|p| p.path().is_dir())
        .flat_map(|p| std::fs::read_dir(p.path()).unwrap().flatten())
        .find(|e| e.file_name().to_string_lossy().starts_with("_manifest-"))
        .expect("run manifest");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(manifest.path()).unwrap()).unwrap();
    assert_eq!(
        manifest["summary"]["stages"].as_array().map(Vec::len),
        Some(5),
        "{manifest}"
    );
}

/// The rows of a run's output that batching must not change, one line per row, in document and page order.
fn rows_that_batching_must_not_change(output: &Path) -> Vec<String> {
    let glob = format!("{}/**/*.parquet", output.display());
    duckdb(&format!(
        "SELECT regexp_replace(source_uri, '.*/', ''), page_start, page_end, status, finish_reason, \
         generated_tokens, raw_output, to_json(_confidence), coalesce(error, '') \
         FROM read_parquet('{glob}', hive_partitioning = true) ORDER BY 1, 2"
    ))
    .lines()
    .map(str::to_string)
    .collect()
}

/// The run manifest's `decode` object (the only manifest under `output`).
fn decode_of(output: &Path) -> serde_json::Value {
    let manifest = std::fs::read_dir(output)
        .unwrap()
        .flatten()
        .flat_map(|e| {
            if e.path().is_dir() {
                std::fs::read_dir(e.path()).unwrap().flatten().collect()
            } else {
                vec![e]
            }
        })
        .find(|e| e.file_name().to_string_lossy().starts_with("_manifest-"))
        .expect("run manifest");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(manifest.path()).unwrap()).unwrap();
    manifest["summary"]["decode"].clone()
}

#[test]
fn static_and_continuous_runs_write_the_same_rows_and_say_what_the_decoder_did() {
    let tmp = tempfile::tempdir().unwrap();
    let inputs = tmp.path().join("in");
    // Scans of different sizes and texts (answers of different lengths) and two-page PDFs (pages of one document
    // finish out of order in a stream).
    let made = python_stdout(
        &format!(
            "import runpy, sys; sys.argv = ['make_stream_workload.py', '14', {:?}]; \
             runpy.run_path({:?}, run_name='__main__')",
            inputs.display().to_string(),
            repo_root()
                .join("scripts/make_stream_workload.py")
                .display()
                .to_string()
        ),
        &[] as &[&str],
    );
    assert!(made.contains("14 scans"), "{made}");
    for d in 0..2 {
        std::fs::write(inputs.join(format!("inv{d}.pdf")), invoice_pdf(d, 2)).unwrap();
    }
    let mut outputs = Vec::new();
    for batching in ["static", "continuous"] {
        let output = tmp.path().join(format!("out-{batching}"));
        let spec = write_spec(tmp.path(), &inputs, &output);
        let text_spec = std::fs::read_to_string(&spec)
            .unwrap()
            .replace(
                &tiny_model().display().to_string(),
                &crate::util::tiny_gqa_model().display().to_string(),
            )
            .replace(
                "batch_size = 4",
                &format!("batch_size = 3\nbatching = \"{batching}\""),
            );
        std::fs::write(&spec, text_spec).unwrap();
        let out = pixtract(&["run", spec.to_str().unwrap()], &[], &repo_root());
        let t = text(&out);
        assert!(matches!(out.status.code(), Some(0 | 2)), "{batching}: {t}");
        assert!(t.contains("16 documents"), "{batching}: {t}");
        outputs.push(output);
    }
    let (static_rows, continuous_rows) = (
        rows_that_batching_must_not_change(&outputs[0]),
        rows_that_batching_must_not_change(&outputs[1]),
    );
    assert_eq!(
        static_rows.len(),
        18,
        "14 scans + 2 x 2 pages:\n{static_rows:#?}"
    );
    assert_eq!(
        static_rows, continuous_rows,
        "batching changed what was extracted"
    );
    let (s, c) = (decode_of(&outputs[0]), decode_of(&outputs[1]));
    eprintln!("static: {s}\ncontinuous: {c}");
    assert_eq!(s["batching"], "static", "{s}");
    assert_eq!(s["admissions"], 0, "{s}");
    assert_eq!(c["batching"], "continuous", "{c}");
    // Every page went through a slot, so slots were refilled (3 slots, 18 pages).
    assert_eq!(c["admissions"], 18, "{c}");
    for d in [&s, &c] {
        let idle = d["idle_row_share"].as_f64().unwrap();
        assert!((0.0..1.0).contains(&idle), "{d}");
        assert!(d["steps"].as_u64().unwrap() > 0, "{d}");
        assert!(d["ceiling"].as_f64().unwrap() >= 1.0, "{d}");
    }
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

    // A password variable that is not set is an error at start, naming it (not an error row per encrypted PDF).
    let mut text_spec = std::fs::read_to_string(&spec).unwrap();
    text_spec = text_spec.replace(
        "[raster]\n",
        "[raster]\npassword_env = \"PIXTRACT_TEST_UNSET_PDF_PASSWORD\"\n",
    );
    std::fs::write(&spec, text_spec).unwrap();
    let out = pixtract(&["run", spec.to_str().unwrap()], &[], &repo_root());
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(
        t.contains("PIXTRACT_TEST_UNSET_PDF_PASSWORD")
            && t.contains("no such environment variable"),
        "{t}"
    );
    assert!(
        !tmp.path().join("out").exists(),
        "nothing may be written: {t}"
    );
}

/// Eight small documents (copies of reference images under different names).
fn small_inputs(dir: &Path) {
    small_inputs_n(dir, 8)
}

pub fn small_inputs_n(dir: &Path, n: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let refs = ["rgba", "grayscale", "tiny_image", "system_prompt"];
    for i in 0..n {
        let src = tiny_model().join(format!("reference/{}/image0.png", refs[i % refs.len()]));
        std::fs::copy(src, dir.join(format!("doc{i}.png"))).unwrap();
    }
}

pub fn rows_by_uri(output: &Path) -> Vec<(String, String)> {
    if parquet_files(output).is_empty() {
        return Vec::new();
    }
    let glob = format!("{}/**/*.parquet", output.display());
    duckdb(&format!(
        "SELECT regexp_replace(source_uri, '.*/', ''), run_id FROM read_parquet('{glob}', hive_partitioning = true) ORDER BY 1, 2"
    ))
    .lines()
    .map(|l| {
        let (a, b) = l.split_once('|').unwrap();
        (a.to_string(), b.to_string())
    })
    .collect()
}

/// Files under `dir` (recursively) whose names end with `suffix`.
fn files_under(dir: &Path, suffix: &str) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(files_under(&path, suffix));
        } else if path.to_string_lossy().ends_with(suffix) {
            found.push(path);
        }
    }
    found
}

#[test]
fn second_run_skips_done_documents_and_a_touched_file_is_redone() {
    let tmp = tempfile::tempdir().unwrap();
    let inputs = tmp.path().join("in");
    small_inputs(&inputs);
    let output = tmp.path().join("out");
    let spec = write_spec(tmp.path(), &inputs, &output);
    let run = |extra: &[&str]| {
        let mut args = vec!["run", spec.to_str().unwrap()];
        args.extend_from_slice(extra);
        let out = pixtract(&args, &[], &repo_root());
        let t = text(&out);
        assert!(matches!(out.status.code(), Some(0 | 2)), "{t}");
        t
    };
    let first = run(&[]);
    assert!(
        first.contains("8 documents (0 failed, 0 skipped as already done)"),
        "{first}"
    );
    assert_eq!(rows_by_uri(&output).len(), 8);

    // The committed file has its index sidecar; the first run found nothing to fold.
    let sidecars = files_under(&output.join("_index"), ".pxi");
    assert_eq!(sidecars.len(), 1, "{sidecars:?}");
    assert!(!first.contains("output index written"), "{first}");

    let second = run(&[]);
    assert!(
        second.contains("0 documents (0 failed, 8 skipped as already done)"),
        "{second}"
    );
    assert_eq!(rows_by_uri(&output).len(), 8, "nothing new written");
    // The state came from the sidecar, and the run folded it for the next.
    assert!(
        second.contains("8 documents done: no index, 1 sidecars, 0 files read"),
        "{second}"
    );
    assert!(
        second.contains("output index written: _index/_fold-"),
        "{second}"
    );

    // A changed file (new mtime -> new ETag) is processed again; only it.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let doc = inputs.join("doc3.png");
    let bytes = std::fs::read(&doc).unwrap();
    std::fs::write(&doc, &bytes).unwrap();
    let third = run(&[]);
    assert!(
        third.contains("1 documents (0 failed, 7 skipped as already done)"),
        "{third}"
    );
    let rows = rows_by_uri(&output);
    assert_eq!(
        rows.iter().filter(|(u, _)| u == "doc3.png").count(),
        2,
        "{rows:?}"
    );
    assert_eq!(rows.len(), 9);

    // The fold covers the first run's file, the touched document's file has its sidecar.
    assert!(
        third.contains("8 documents done: index _index/_fold-"),
        "{third}"
    );

    // A damaged fold is not used (a warning), and the sidecars say the same.
    let fold = files_under(&output.join("_index"), ".pxi")
        .into_iter()
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("_fold-")
        })
        .expect("a fold");
    std::fs::write(&fold, b"PIXTRACT-IDX garbage").unwrap();
    let damaged = run(&[]);
    assert!(damaged.contains("unusable index fold"), "{damaged}");
    assert!(
        damaged.contains("0 documents (0 failed, 8 skipped as already done)"),
        "{damaged}"
    );

    // A partition deleted by hand to force a redo: the fold names files that are gone, so it is not used, and
    // every document is done again.
    for entry in std::fs::read_dir(&output).unwrap() {
        let path = entry.unwrap().path();
        if path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("dt=")
        {
            std::fs::remove_dir_all(&path).unwrap();
        }
    }
    let redone = run(&[]);
    assert!(
        redone.contains("which the output no longer has"),
        "{redone}"
    );
    assert!(
        redone.contains("8 documents (0 failed, 0 skipped as already done)"),
        "{redone}"
    );
    assert_eq!(rows_by_uri(&output).len(), 8);

    let forced = run(&["--force"]);
    assert!(
        forced.contains("8 documents (0 failed, 0 skipped as already done)"),
        "{forced}"
    );
}

#[test]
fn four_concurrent_shards_cover_the_input_exactly_once() {
    let tmp = tempfile::tempdir().unwrap();
    let inputs = tmp.path().join("in");
    small_inputs(&inputs);
    let output = tmp.path().join("out");
    let spec = write_spec(tmp.path(), &inputs, &output);
    // Kubernetes Indexed Job style, one after another: the index from the scheduler, the count from the job spec.
    for i in 0..4 {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_pixtract"))
            .args(["run", spec.to_str().unwrap()])
            .current_dir(repo_root())
            .env("PIXTRACT_VENV", repo_root().join(".venv"))
            .env("JOB_COMPLETION_INDEX", i.to_string())
            .env("PIXTRACT_SHARDS", "4")
            .output()
            .expect("run shard");
        let t = text(&out);
        assert!(matches!(out.status.code(), Some(0 | 2)), "{t}");
        assert!(t.contains(&format!("(shard {i}/4)")), "{t}");
    }
    // The same four shards at once with --shard, into a second output.
    let handles: Vec<_> = (0..4)
        .map(|i| {
            std::process::Command::new(env!("CARGO_BIN_EXE_pixtract"))
                .args([
                    "run",
                    spec.to_str().unwrap(),
                    "--force",
                    "--shard",
                    &format!("{i}/4"),
                ])
                .current_dir(repo_root())
                .env("PIXTRACT_VENV", repo_root().join(".venv"))
                .env("PIXTRACT_OUTPUT", tmp.path().join("out2"))
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn shard")
        })
        .collect();
    let mut total = 0;
    for h in handles {
        let out = h.wait_with_output().unwrap();
        let t = text(&out);
        assert!(matches!(out.status.code(), Some(0 | 2)), "{t}");
        assert!(t.contains("/4)"), "{t}");
        total += 1;
    }
    assert_eq!(total, 4);
    for out in [&output, &tmp.path().join("out2")] {
        let rows = rows_by_uri(out);
        let mut names: Vec<&str> = rows.iter().map(|(u, _)| u.as_str()).collect();
        names.dedup();
        assert_eq!(rows.len(), 8, "every document exactly once: {rows:?}");
        assert_eq!(names.len(), 8, "{rows:?}");
        let runs: std::collections::BTreeSet<&str> = rows.iter().map(|(_, r)| r.as_str()).collect();
        assert!(
            runs.len() > 1,
            "documents were spread over shards: {rows:?}"
        );
    }
}

/// Starts `pixtract run SPEC` and kills it (SIGKILL) once `files` Parquet files are committed under `output`
/// (0: 300 ms into start-up); at most 60 s. Fails the test when the run had already ended: a kill that cut
/// nothing short proves nothing.
fn kill_run_after(spec: &Path, output: &Path, files: usize) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_pixtract"))
        .args(["run", spec.to_str().unwrap()])
        .current_dir(repo_root())
        .env("PIXTRACT_VENV", repo_root().join(".venv"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    if files == 0 {
        std::thread::sleep(std::time::Duration::from_millis(300));
    } else {
        while parquet_files(output).len() < files && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
    let finished = child.try_wait().ok().flatten();
    assert!(
        finished.is_none(),
        "the run ended ({finished:?}) before the kill after {files} file(s): nothing was cut short"
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// An invoice PDF of `pages` pages titled `INV {doc} p{page}`.
pub fn invoice_pdf(doc: usize, pages: usize) -> Vec<u8> {
    let pages: Vec<PdfPage> = (1..=pages)
        .map(|p| PdfPage::new(612.0, 792.0, invoice_content(&format!("INV {doc} p{p}"), 2)))
        .collect();
    make_pdf(&pages)
}

/// Every visible Parquet file under `output` is complete: DuckDB reads its footer and rows.
pub fn assert_parquet_readable(output: &Path, what: &str) {
    for file in parquet_files(output) {
        let rows = duckdb(&format!(
            "SELECT count(*) FROM read_parquet('{}')",
            file.display()
        ));
        assert!(
            rows.trim().parse::<u64>().is_ok(),
            "{what}: {} unreadable",
            file.display()
        );
    }
}

pub fn parquet_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "parquet") {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn killed_runs_resume_with_every_document_exactly_once() {
    // kill -9 at several points, then rerun: during start-up (300 ms), and right after the 1st and 2nd committed
    // file (the rest of the run uncommitted). Fixed points, so a failure reproduces.
    for (seed, after_files) in [(1u32, 0usize), (2, 1), (3, 2)] {
        let tmp = tempfile::tempdir().unwrap();
        let inputs = tmp.path().join("in");
        small_inputs(&inputs);
        let output = tmp.path().join("out");
        let spec = write_spec(tmp.path(), &inputs, &output);
        // Small files, so a kill lands between commits as well as inside one ([output] is the spec's last table).
        let mut text_spec = std::fs::read_to_string(&spec).unwrap();
        text_spec.push_str("max_rows_per_file = 2\n");
        std::fs::write(&spec, text_spec).unwrap();
        kill_run_after(&spec, &output, after_files);
        // Whatever the kill left, every visible Parquet file is complete.
        assert_parquet_readable(&output, &format!("seed {seed}"));
        let committed = parquet_files(&output).len();
        let out = pixtract(&["run", spec.to_str().unwrap()], &[], &repo_root());
        let t = text(&out);
        assert!(matches!(out.status.code(), Some(0 | 2)), "seed {seed}: {t}");
        println!(
            "seed {seed}: killed with {committed} file(s) committed; rerun: {}",
            t.lines().next().unwrap_or("")
        );
        let rows = rows_by_uri(&output);
        let mut names: Vec<&str> = rows.iter().map(|(u, _)| u.as_str()).collect();
        names.dedup();
        assert_eq!(
            rows.len(),
            8,
            "seed {seed}: every document exactly once: {rows:?}\n{t}"
        );
        assert_eq!(names.len(), 8, "seed {seed}: {rows:?}");
    }
}

#[test]
fn sigint_finishes_in_flight_work_and_the_next_run_does_the_rest() {
    // Multi-page PDFs, rendered by worker processes. The signal goes to the run's whole process group, as a
    // terminal's Ctrl-C does: the workers (in a group of their own, ignoring SIGINT) must not die with it, and the
    // document in flight must not be recorded as done by a "renderer process died" row.
    use std::os::unix::process::CommandExt;
    let tmp = tempfile::tempdir().unwrap();
    let inputs = tmp.path().join("in");
    std::fs::create_dir(&inputs).unwrap();
    let n = 40;
    for d in 0..n {
        std::fs::write(inputs.join(format!("inv{d:02}.pdf")), invoice_pdf(d, 2)).unwrap();
    }
    let output = tmp.path().join("out");
    let spec = write_spec(tmp.path(), &inputs, &output);
    let mut text_spec = std::fs::read_to_string(&spec).unwrap();
    text_spec.push_str("max_rows_per_file = 2\n");
    std::fs::write(&spec, text_spec).unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_pixtract"))
        .args(["run", spec.to_str().unwrap()])
        .current_dir(repo_root())
        .env("PIXTRACT_VENV", repo_root().join(".venv"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        // A group of its own, so the group signal below reaches the run and what it started, not this test.
        .process_group(0)
        .spawn()
        .unwrap();
    // Once work is flowing: the first document committed (2 rows per file, so each document closes a file). The
    // deadline only guards against a hang; the run takes far longer than the first commit.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
    while parquet_files(&output).is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let status = std::process::Command::new("kill")
        .args(["-INT", "--", &format!("-{}", child.id())])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let t = text(&out);
    // Strict: a run that finished before the signal arrived proves nothing, so it fails the test.
    assert_eq!(out.status.code(), Some(3), "{t}");
    assert!(t.contains("interrupted by a signal"), "{t}");
    assert!(!t.contains("renderer process died"), "{t}");
    let done = rows_by_uri(&output);
    let mut done_docs: Vec<&str> = done.iter().map(|(u, _)| u.as_str()).collect();
    done_docs.dedup();
    assert!(
        !done_docs.is_empty() && done_docs.len() < n,
        "{} documents committed: {t}",
        done_docs.len()
    );
    let again = pixtract(&["run", spec.to_str().unwrap()], &[], &repo_root());
    let t2 = text(&again);
    assert!(matches!(again.status.code(), Some(0 | 2)), "{t2}");
    assert!(
        t2.contains(&format!(
            "{} documents (0 failed, {} skipped as already done)",
            n - done_docs.len(),
            done_docs.len()
        )),
        "{t}\n{t2}"
    );
    let glob = format!("{}/**/*.parquet", output.display());
    let pages = duckdb(&format!(
        "SELECT regexp_replace(source_uri, '.*/', ''), page_start, count(*), max(coalesce(error, '')) \
         FROM read_parquet('{glob}', hive_partitioning = true) GROUP BY ALL ORDER BY ALL"
    ));
    let lines: Vec<&str> = pages.lines().collect();
    assert_eq!(lines.len(), n * 2, "every page of every document: {pages}");
    assert!(
        lines.iter().all(|l| l.split('|').nth(2) == Some("1")),
        "each page exactly once: {pages}"
    );
    assert!(!pages.contains("renderer process died"), "{pages}");
}

#[test]
fn four_shards_over_an_s3_prefix_write_parquet_to_s3_exactly_once() {
    use futures::TryStreamExt;
    use object_store::{ObjectStoreExt, PutPayload};
    let moto = crate::util::Moto::start();
    moto.create_bucket("lake");
    let store = moto.store("lake");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let names: Vec<String> = (0..8).map(|i| format!("in/doc{i}.png")).collect();
    let refs = ["rgba", "grayscale", "tiny_image", "system_prompt"];
    rt.block_on(async {
        for (i, name) in names.iter().enumerate() {
            let bytes =
                std::fs::read(tiny_model().join(format!("reference/{}/image0.png", refs[i % 4])))
                    .unwrap();
            store
                .put(
                    &object_store::path::Path::from(name.as_str()),
                    PutPayload::from(bytes),
                )
                .await
                .unwrap();
        }
        // Not a document: the include glob leaves it out.
        store
            .put(
                &object_store::path::Path::from("in/notes.txt"),
                PutPayload::from(b"x".to_vec()),
            )
            .await
            .unwrap();
    });
    let tmp = tempfile::tempdir().unwrap();
    let spec = write_spec(
        tmp.path(),
        Path::new("s3://lake/in/"),
        Path::new("s3://lake/out/"),
    );
    let text_spec = std::fs::read_to_string(&spec)
        .unwrap()
        .replace("[raster]", "include = [\"*.png\"]\n[raster]");
    std::fs::write(&spec, text_spec).unwrap();
    let env = moto.env();
    let children: Vec<_> = (0..4)
        .map(|i| {
            let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_pixtract"));
            cmd.args(["run", spec.to_str().unwrap(), "--shard", &format!("{i}/4")])
                .current_dir(repo_root())
                .env("PIXTRACT_VENV", repo_root().join(".venv"))
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped());
            for (k, v) in &env {
                cmd.env(k, v);
            }
            cmd.spawn().expect("spawn shard")
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        let t = text(&out);
        assert!(matches!(out.status.code(), Some(0 | 2)), "{t}");
    }
    // Every committed object under out/, copied down for DuckDB (no httpfs offline).
    let local = tmp.path().join("copy");
    let objects: Vec<_> = rt.block_on(async {
        store
            .list(Some(&object_store::path::Path::from("out")))
            .try_collect::<Vec<_>>()
            .await
            .unwrap()
    });
    let parquet: Vec<_> = objects
        .iter()
        .filter(|m| m.location.as_ref().ends_with(".parquet"))
        .collect();
    assert!(
        parquet.len() >= 2,
        "one file per shard that had documents: {objects:?}"
    );
    assert_eq!(
        objects
            .iter()
            .filter(|m| m.location.as_ref().ends_with("_SUCCESS"))
            .count(),
        1,
        "one partition, _SUCCESS written by the shards: {objects:?}"
    );
    for m in &parquet {
        let bytes =
            rt.block_on(async { store.get(&m.location).await.unwrap().bytes().await.unwrap() });
        let path = local.join(m.location.as_ref());
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
    let rows = rows_by_uri(&local);
    let uris: Vec<&str> = rows.iter().map(|(u, _)| u.as_str()).collect();
    let mut unique = uris.clone();
    unique.dedup();
    assert_eq!((uris.len(), unique.len()), (8, 8), "{rows:?}");
    let glob = format!("{}/**/*.parquet", local.display());
    let sources = duckdb(&format!(
        "SELECT DISTINCT source_uri FROM read_parquet('{glob}') ORDER BY 1"
    ));
    assert!(
        sources.lines().all(|l| l.starts_with("s3://lake/in/doc")),
        "{sources}"
    );

    // A second sharded pass finds everything done, reading the state back from S3.
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_pixtract"));
    cmd.args(["run", spec.to_str().unwrap(), "--shard", "0/4"])
        .current_dir(repo_root())
        .env("PIXTRACT_VENV", repo_root().join(".venv"));
    for (k, v) in &env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let t = text(&out);
    assert!(t.contains("0 documents (0 failed,"), "{t}");
    assert!(
        !t.contains(", 0 skipped as already done)"),
        "shard 0 had documents to skip: {t}"
    );
}

#[test]
fn bench_pipeline_runs_both_sides_on_the_same_documents() {
    let tmp = tempfile::tempdir().unwrap();
    let inputs = tmp.path().join("in");
    std::fs::create_dir(&inputs).unwrap();
    let pages = vec![PdfPage::new(612.0, 792.0, invoice_content("INVOICE 7", 2))];
    std::fs::write(inputs.join("invoice.pdf"), make_pdf(&pages)).unwrap();
    std::fs::copy(
        tiny_model().join("reference/grayscale/image0.png"),
        inputs.join("scan.png"),
    )
    .unwrap();
    std::fs::write(inputs.join("notes.txt"), "not a document").unwrap();
    let out = pixtract(
        &[
            "bench",
            "pipeline",
            "--source",
            inputs.to_str().unwrap(),
            "--max-new-tokens",
            "4",
        ],
        &[],
        &repo_root(),
    );
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    // Same 2 documents (the .txt is neither side's), 2 pages, 4 tokens each on both sides.
    let row = |label: &str| -> Vec<String> {
        t.lines()
            .find(|l| l.starts_with(label))
            .unwrap_or_else(|| panic!("no {label} line: {t}"))
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    let ours = row("pixtract run");
    let theirs = row("python (pypdfium2+transformers)");
    assert_eq!(&ours[2..5], ["2", "2", "8"], "{t}");
    assert_eq!(&theirs[2..5], ["2", "2", "8"], "{t}");
    assert!(t.contains("pixtract / python pages per second: "), "{t}");
}

#[test]
fn multi_page_documents_never_straddle_a_commit() {
    // 3-page PDFs with 2 rows per file: a file may only close at a document boundary (files grow past the
    // limit instead), so a kill between commits never leaves part of a document committed, and the rerun
    // writes every page exactly once.
    let tmp = tempfile::tempdir().unwrap();
    let inputs = tmp.path().join("in");
    std::fs::create_dir(&inputs).unwrap();
    for d in 0..4 {
        std::fs::write(inputs.join(format!("inv{d}.pdf")), invoice_pdf(d, 3)).unwrap();
    }
    small_inputs_n(&inputs, 2);
    let output = tmp.path().join("out");
    let spec = write_spec(tmp.path(), &inputs, &output);
    let mut text_spec = std::fs::read_to_string(&spec).unwrap();
    text_spec = text_spec.replace("batch_size = 4", "batch_size = 2");
    text_spec.push_str("max_rows_per_file = 2\n");
    std::fs::write(&spec, text_spec).unwrap();

    kill_run_after(&spec, &output, 1);
    let whole_documents = |what: &str| {
        let glob = format!("{}/**/*.parquet", output.display());
        // Per file and document: rows present vs the document's page count.
        let per_file = duckdb(&format!(
            "SELECT filename, regexp_replace(source_uri, '.*/', ''), count(*), max(doc_page_count) \
             FROM read_parquet('{glob}', hive_partitioning = true, filename = true) GROUP BY ALL ORDER BY ALL"
        ));
        for line in per_file.lines() {
            let f: Vec<&str> = line.split('|').collect();
            assert_eq!(
                f[2], f[3],
                "{what}: a file holds part of a document: {per_file}"
            );
        }
        per_file
    };
    let after_kill = whole_documents("after kill -9");
    let out = pixtract(&["run", spec.to_str().unwrap()], &[], &repo_root());
    let t = text(&out);
    assert!(matches!(out.status.code(), Some(0 | 2)), "{t}");
    whole_documents("after the rerun");
    let glob = format!("{}/**/*.parquet", output.display());
    let pages = duckdb(&format!(
        "SELECT regexp_replace(source_uri, '.*/', ''), page_start, count(*) \
         FROM read_parquet('{glob}', hive_partitioning = true) GROUP BY ALL ORDER BY ALL"
    ));
    let lines: Vec<&str> = pages.lines().collect();
    assert_eq!(
        lines.len(),
        4 * 3 + 2,
        "every page of every document: {pages}"
    );
    assert!(
        lines.iter().all(|l| l.ends_with("|1")),
        "each exactly once: {pages}\nafter kill: {after_kill}"
    );
}

/// Values as `pixtract run` wrote them: per document (file name), per top-level scalar field of the receipt schema,
/// whether the value is null and its `_confidence.<field>.min`; plus the document's `_review` list. Rows with an
/// answer only (budget-closed ones included: their forced values have confidence 0).
struct FieldView {
    null: bool,
    confidence: Option<f64>,
}

const RECEIPT_SCALARS: &[&str] = &[
    "merchant_name",
    "merchant_address",
    "merchant_phone",
    "transaction_date",
    "transaction_time",
    "currency",
    "subtotal",
    "total_tax",
    "tip",
    "total",
    "payment_method",
];

fn field_views(output: &Path) -> std::collections::BTreeMap<String, (Vec<FieldView>, Vec<String>)> {
    let glob = format!("{}/**/*.parquet", output.display());
    let cols: Vec<String> = RECEIPT_SCALARS
        .iter()
        .map(|f| format!("{f} IS NULL, _confidence.{f}.min"))
        .collect();
    let sql = format!(
        "SELECT regexp_replace(source_uri, '.*/', ''), {}, array_to_string(_review, ';') \
         FROM read_parquet('{glob}', hive_partitioning = true) WHERE _confidence IS NOT NULL ORDER BY 1",
        cols.join(", ")
    );
    duckdb(&sql)
        .lines()
        .map(|line| {
            let parts: Vec<&str> = line.split('|').collect();
            assert_eq!(parts.len(), 2 + 2 * RECEIPT_SCALARS.len(), "{line}");
            let views = (0..RECEIPT_SCALARS.len())
                .map(|i| FieldView {
                    null: parts[1 + 2 * i] == "True",
                    confidence: parts[2 + 2 * i].parse().ok(),
                })
                .collect();
            let review = parts[parts.len() - 1]
                .split(';')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect();
            (parts[0].to_string(), (views, review))
        })
        .collect()
}

#[test]
fn confidence_thresholds_write_weak_values_as_null_and_name_them_in_review() {
    let tmp = tempfile::tempdir().unwrap();
    let inputs = tmp.path().join("in");
    small_inputs_n(&inputs, 6);
    // The same documents without and with thresholds: greedy decoding gives the same answers both times.
    let plain = tmp.path().join("plain");
    let spec = write_spec(tmp.path(), &inputs, &plain);
    // Room for whole answers, so rows have values to judge (48 tokens closes them all by budget).
    let room = std::fs::read_to_string(&spec)
        .unwrap()
        .replace("max_new_tokens = 48", "max_new_tokens = 400");
    std::fs::write(&spec, room).unwrap();
    let out = pixtract(&["run", spec.to_str().unwrap()], &[], &repo_root());
    assert!(matches!(out.status.code(), Some(0 | 2)), "{}", text(&out));
    let before = field_views(&plain);
    assert!(!before.is_empty(), "no ok rows to compare");

    // A threshold that splits the values actually seen: the median confidence of the non-null ones.
    let mut seen: Vec<f64> = before
        .values()
        .flat_map(|(v, _)| v.iter().filter(|f| !f.null).filter_map(|f| f.confidence))
        .collect();
    seen.sort_by(f64::total_cmp);
    assert!(seen.len() >= 4, "too few values to split: {seen:?}");
    let threshold = seen[seen.len() / 2];
    let reviewed = tmp.path().join("reviewed");
    let base = std::fs::read_to_string(&spec).unwrap().replace(
        &plain.display().to_string(),
        &reviewed.display().to_string(),
    );
    // `total` is exempt by its own threshold of 0: a per-field value overrides the default.
    let with_thresholds = base.replace(
        "[extract]\n",
        &format!(
            "[extract]\nmin_confidence = {threshold}\nmin_confidence_fields = {{ total = 0.0 }}\n"
        ),
    );
    let spec2 = tmp.path().join("reviewed.toml");
    std::fs::write(&spec2, with_thresholds).unwrap();
    let out = pixtract(&["run", spec2.to_str().unwrap()], &[], &repo_root());
    assert!(matches!(out.status.code(), Some(0 | 2)), "{}", text(&out));
    let summary = text(&out);
    let after = field_views(&reviewed);
    let rows_for_review = after.values().filter(|(_, r)| !r.is_empty()).count();
    assert!(
        summary.contains(&format!(
            "review: {rows_for_review} row(s) have values withheld"
        )),
        "{summary}"
    );
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>()
    );

    let (mut withheld, mut kept) = (0, 0);
    for (doc, (fields_before, review_before)) in &before {
        assert!(
            review_before.is_empty(),
            "{doc}: no threshold, no review: {review_before:?}"
        );
        let (fields_after, review_after) = &after[doc];
        let mut expected_review = Vec::new();
        for (i, name) in RECEIPT_SCALARS.iter().enumerate() {
            let (b, a) = (&fields_before[i], &fields_after[i]);
            // The confidence column is written either way: it says why a value was withheld.
            assert_eq!(b.confidence, a.confidence, "{doc}.{name}");
            let weak = !b.null && *name != "total" && b.confidence.is_none_or(|c| c < threshold);
            if weak {
                expected_review.push(name.to_string());
                assert!(
                    a.null,
                    "{doc}.{name}: confidence {:?} < {threshold} but kept",
                    b.confidence
                );
                withheld += 1;
            } else {
                assert_eq!(
                    a.null, b.null,
                    "{doc}.{name}: changed though not below the threshold"
                );
                kept += usize::from(!b.null);
            }
        }
        // Line items' members are listed with their index (`items[0].description`), after the top-level fields.
        let top: Vec<String> = review_after
            .iter()
            .filter(|r| !r.starts_with("items["))
            .cloned()
            .collect();
        assert_eq!(top, expected_review, "{doc}");
        for r in review_after.iter().filter(|r| r.starts_with("items[")) {
            let member = r.split_once("].").map(|(_, m)| m).unwrap_or("");
            assert!(
                ["description", "quantity", "unit_price", "total_price"].contains(&member),
                "{doc}: {r}"
            );
        }
    }
    assert!(
        withheld > 0 && kept > 0,
        "the threshold split nothing: withheld {withheld}, kept {kept}"
    );

    // A threshold for a field the schema does not have is refused before any work, naming the fields there are.
    let bad = base.replace(
        "[extract]\n",
        "[extract]\nmin_confidence_fields = { totl = 0.9 }\n",
    );
    let spec3 = tmp.path().join("bad.toml");
    std::fs::write(&spec3, bad).unwrap();
    let out = pixtract(&["run", spec3.to_str().unwrap()], &[], &repo_root());
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(
        t.contains("\"totl\"") && t.contains("items.total_price"),
        "{t}"
    );
}

/// `[raster] max_side` is the long side of the model's view for scans as for PDF pages: an 800x600 PNG reaches the
/// model at 256x192 (16 x 12 patches of 16 px) instead of unscaled (50 x 38), so its prompt is exactly the
/// difference in image tokens (a row of patches + its break token each) shorter; a PDF page is rendered smaller.
/// A view above the model's own image size is refused before any work.
#[test]
fn raster_max_side_sets_the_model_view_of_scans_and_pdfs() {
    let tmp = tempfile::tempdir().unwrap();
    let inputs = tmp.path().join("in");
    std::fs::create_dir(&inputs).unwrap();
    let scan = image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(800, 600, |x, y| {
        image::Rgb([(x % 251) as u8, (y % 241) as u8, ((x + y) % 239) as u8])
    }));
    std::fs::write(
        inputs.join("scan.png"),
        crate::util::encode(&scan, image::ImageFormat::Png),
    )
    .unwrap();
    std::fs::write(inputs.join("invoice.pdf"), invoice_pdf(0, 1)).unwrap();
    let mut prompt_tokens = Vec::new();
    for (name, max_side) in [("full", 0), ("small", 256)] {
        let dir = tmp.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        let output = dir.join("out");
        let spec = write_spec(&dir, &inputs, &output);
        let body = std::fs::read_to_string(&spec).unwrap().replace(
            "[raster]\nworkers = 1\n",
            &format!("[raster]\nworkers = 1\nmax_side = {max_side}\n"),
        );
        std::fs::write(&spec, body).unwrap();
        let out = pixtract(&["run", spec.to_str().unwrap()], &[], &repo_root());
        assert!(matches!(out.status.code(), Some(0 | 2)), "{}", text(&out));
        let glob = format!("{}/**/*.parquet", output.display());
        let rows: std::collections::BTreeMap<String, i64> = duckdb(&format!(
            "SELECT regexp_replace(source_uri, '.*/', ''), prompt_tokens FROM read_parquet('{glob}', hive_partitioning = true)"
        ))
        .lines()
        .map(|l| {
            let (doc, tokens) = l.split_once('|').unwrap();
            (doc.to_string(), tokens.parse().expect("prompt_tokens"))
        })
        .collect();
        assert_eq!(rows.len(), 2, "{rows:?}");
        prompt_tokens.push(rows);
    }
    let (full, small) = (&prompt_tokens[0], &prompt_tokens[1]);
    assert_eq!(
        full["scan.png"] - small["scan.png"],
        38 * (50 + 1) - 12 * (16 + 1),
        "{full:?} {small:?}"
    );
    assert!(
        small["invoice.pdf"] < full["invoice.pdf"],
        "{full:?} {small:?}"
    );

    let spec = write_spec(tmp.path(), &inputs, &tmp.path().join("never"));
    let body = std::fs::read_to_string(&spec)
        .unwrap()
        .replace("[raster]\n", "[raster]\nmax_side = 2048\n");
    std::fs::write(&spec, body).unwrap();
    let out = pixtract(&["run", spec.to_str().unwrap()], &[], &repo_root());
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(
        t.contains("max_side = 2048 is larger than the model's image size 1024"),
        "{t}"
    );
    assert!(!tmp.path().join("never").exists(), "{t}");
}

/// Every `_SUCCESS` under a local output.
fn success_markers(output: &Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![output.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if e.file_name() == "_SUCCESS" {
                found.push(p);
            }
        }
    }
    found
}

#[test]
fn a_sharded_job_writes_success_only_when_its_last_shard_completes() {
    let tmp = tempfile::tempdir().unwrap();
    let inputs = tmp.path().join("in");
    small_inputs(&inputs);
    let output = tmp.path().join("out");
    let spec = write_spec(tmp.path(), &inputs, &output);
    let shard = |i: u64, spec: &Path| {
        let (spec, shard) = (spec.to_path_buf(), format!("{i}/4"));
        std::thread::spawn(move || {
            pixtract(
                &[
                    "run",
                    spec.to_str().unwrap(),
                    "--shard",
                    &shard,
                    "--job-id",
                    "nightly/42",
                ],
                &[],
                &repo_root(),
            )
        })
    };
    // Three of the four shards, started together: each completes, none may say the job is done.
    let first: Vec<_> = (0..3).map(|i| shard(i, &spec)).collect();
    for (i, h) in first.into_iter().enumerate() {
        let out = h.join().unwrap();
        // 2: the tiny model's answers fail to parse; every document still has its row.
        assert!(
            matches!(out.status.code(), Some(0 | 2)),
            "shard {i}: {}",
            text(&out)
        );
    }
    assert!(
        success_markers(&output).is_empty(),
        "_SUCCESS before the last shard: {:?}",
        success_markers(&output)
    );
    // The last shard stopped early (its failure budget, by a broken document of its own): still no `_SUCCESS`.
    let bad = (0..1000)
        .map(|k| inputs.join(format!("broken{k}.pdf")))
        .find(|p| pixtract::pipeline::shard_of(&p.display().to_string(), 4) == 3)
        .unwrap();
    std::fs::write(&bad, b"%PDF-1.7 not really").unwrap();
    let strict = tmp.path().join("strict.toml");
    let mut strict_text = std::fs::read_to_string(&spec).unwrap();
    strict_text.push_str("[limits]\nmax_failed_share = 0.0\nfailure_min_docs = 1\n");
    std::fs::write(&strict, strict_text).unwrap();
    let stopped = shard(3, &strict).join().unwrap();
    let t = text(&stopped);
    assert_eq!(stopped.status.code(), Some(3), "{t}");
    assert!(t.contains("failure budget"), "{t}");
    assert!(success_markers(&output).is_empty(), "{t}");
    // Its manifest is there, marked not completed, with the job's id (made safe for a folder name).
    let manifests: Vec<serde_json::Value> = std::fs::read_dir(&output)
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .flat_map(|d| std::fs::read_dir(d.path()).unwrap().flatten())
        .filter(|e| e.file_name().to_string_lossy().starts_with("_manifest-"))
        .map(|e| serde_json::from_slice(&std::fs::read(e.path()).unwrap()).unwrap())
        .collect();
    assert_eq!(manifests.len(), 4, "{manifests:?}");
    let incomplete: Vec<_> = manifests
        .iter()
        .filter(|m| m["summary"]["completed"] == false)
        .collect();
    assert_eq!(incomplete.len(), 1, "{manifests:?}");
    assert!(
        manifests
            .iter()
            .all(|m| m["summary"]["job"] == "nightly-42"),
        "{manifests:?}"
    );
    // The last shard run again, completing: now the job is done, one `_SUCCESS`.
    std::fs::remove_file(&bad).unwrap();
    let last = shard(3, &spec).join().unwrap();
    assert!(matches!(last.status.code(), Some(0 | 2)), "{}", text(&last));
    assert_eq!(success_markers(&output).len(), 1, "{}", text(&last));
}

/// `bench state` over a small history: each read finds every document the history holds (the fold's read covers
/// every run but the last, whose sidecar it reads), and the reference only the last run's.
#[test]
fn bench_state_reads_the_whole_history_each_way() {
    let tmp = tempfile::tempdir().unwrap();
    let out = pixtract(
        &[
            "bench",
            "state",
            "--runs",
            "4",
            "--docs",
            "50",
            "--rounds",
            "1",
            "--dir",
            tmp.path().to_str().unwrap(),
        ],
        &[],
        &repo_root(),
    );
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    let row = |label: &str| -> Vec<String> {
        t.lines()
            .find(|l| l.starts_with(&format!("| {label} |")))
            .unwrap_or_else(|| panic!("no {label} row: {t}"))
            .split('|')
            .map(|c| c.trim().to_string())
            .collect()
    };
    for label in ["files", "sidecars", "index"] {
        assert_eq!(row(label)[2], "200", "{t}");
    }
    assert_eq!(row("last-run")[2], "50", "{t}");
    assert!(
        t.contains("round 1 index") && t.contains("0 files, 1 sidecars, fold of 3"),
        "{t}"
    );
    assert!(t.contains("0 files, 4 sidecars, fold of 0"), "{t}");
    assert!(t.contains("4 files, 0 sidecars, fold of 0"), "{t}");
}

/// A PDF whose page 2 of 3 cannot be rendered: page 2 gets its error row, pages 1 and 3 their answers, in one run
/// and with two pages per prompt; the document then counts as done (nothing redone by a rerun).
#[test]
fn a_page_that_fails_to_render_costs_only_its_own_row() {
    for pages_per_prompt in [1, 2] {
        let tmp = tempfile::tempdir().unwrap();
        let inputs = tmp.path().join("in");
        std::fs::create_dir(&inputs).unwrap();
        let pages: Vec<PdfPage> = (1..=3)
            .map(|p| PdfPage::new(612.0, 792.0, invoice_content(&format!("INV p{p}"), 2)))
            .collect();
        std::fs::write(
            inputs.join("broken.pdf"),
            crate::util::make_pdf_with_broken_page(&pages, Some(1)),
        )
        .unwrap();
        let output = tmp.path().join("out");
        let spec = write_spec(tmp.path(), &inputs, &output);
        let text_spec = std::fs::read_to_string(&spec).unwrap();
        std::fs::write(
            &spec,
            text_spec.replace(
                "[extract]\n",
                &format!("[extract]\npages_per_prompt = {pages_per_prompt}\n"),
            ),
        )
        .unwrap();
        let out = pixtract(&["run", spec.to_str().unwrap()], &[], &repo_root());
        let t = text(&out);
        assert_eq!(out.status.code(), Some(2), "a page failed: {t}");
        assert!(
            t.contains("page failed:") && t.contains("page 2: cannot render"),
            "{t}"
        );
        let glob = format!("{}/**/*.parquet", output.display());
        let rows = duckdb(&format!(
            "SELECT page_start, page_end, raw_output IS NOT NULL, coalesce(error, ''), coalesce(error_kind, '') FROM read_parquet('{glob}') ORDER BY page_start"
        ));
        let rows: Vec<Vec<&str>> = rows.lines().map(|l| l.split('|').collect()).collect();
        // With two pages per prompt too: page 1 goes alone (its group never spans the failed page), page 3 is the
        // last group.
        assert_eq!(rows.len(), 3, "{rows:?}");
        for (start, end) in [("1", "1"), ("3", "3")] {
            assert!(
                // The random tiny model's answer may not parse; that it answered is what counts here.
                rows.iter()
                    .any(|r| r[0] == start && r[1] == end && r[2] == "True"),
                "no answered row for pages {start}-{end}: {rows:?}"
            );
        }
        let failed = rows.iter().find(|r| r[0] == "2").expect("a row for page 2");
        assert_eq!(
            (failed[1], failed[2], failed[4]),
            ("2", "False", "unreadable"),
            "{rows:?}"
        );
        assert!(failed[3].contains("page 2: cannot render"), "{rows:?}");

        let again = pixtract(&["run", spec.to_str().unwrap()], &[], &repo_root());
        let t = text(&again);
        assert!(
            t.contains("0 documents (0 failed, 1 skipped as already done)"),
            "{t}"
        );
    }
}

/// Document mode: a document whose page 2 cannot be rendered still gets its one row, an error row covering pages
/// 1-3 that names the failed page; the rerun does not redo it (an unreadable page is not transient).
#[test]
fn document_mode_a_failed_page_makes_the_documents_row_an_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let inputs = tmp.path().join("in");
    std::fs::create_dir(&inputs).unwrap();
    let pages: Vec<PdfPage> = (1..=3)
        .map(|p| PdfPage::new(612.0, 792.0, invoice_content(&format!("INV p{p}"), 2)))
        .collect();
    std::fs::write(
        inputs.join("broken.pdf"),
        crate::util::make_pdf_with_broken_page(&pages, Some(1)),
    )
    .unwrap();
    let output = tmp.path().join("out");
    let spec = write_spec(tmp.path(), &inputs, &output);
    let text_spec = std::fs::read_to_string(&spec).unwrap();
    std::fs::write(
        &spec,
        text_spec
            .replace("[extract]\n", "[extract]\nunit = \"document\"\n")
            .replace("receipt.json", "invoice.json"),
    )
    .unwrap();
    let out = pixtract(&["run", spec.to_str().unwrap()], &[], &repo_root());
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "a page failed: {t}");
    let glob = format!("{}/**/*.parquet", output.display());
    let rows = duckdb(&format!(
        "SELECT page_start, page_end, status, coalesce(error_kind, ''), coalesce(error, '') \
         FROM read_parquet('{glob}')"
    ));
    let row: Vec<&str> = rows.trim().split('|').collect();
    assert_eq!(
        row[..3],
        ["1", "3", "error"],
        "one error row for the document: {rows}"
    );
    // The row names the failed window's pages and cause (beside whatever the random tiny model's own windows did;
    // `error_kind` is the first failed window's).
    assert!(
        row[4].contains("pages 2-2: ") && row[4].contains("page 2: cannot render"),
        "{rows}"
    );
    assert!(
        ["unreadable", "answer", "budget"].contains(&row[3]),
        "{rows}"
    );
    let again = pixtract(&["run", spec.to_str().unwrap()], &[], &repo_root());
    assert!(
        text(&again).contains("0 documents (0 failed, 1 skipped as already done)"),
        "{}",
        text(&again)
    );
}

/// A document row as the document-mode test reads it: file name, page_start, page_end, raw_output,
/// generated_tokens.
type DocRow = (String, i64, i64, String, i64);

/// The windows each document row was answered in, from its `raw_output` (one `[pages a-b] ...` line per window;
/// a one-window document has its answer alone).
fn windows_of(raw: &str) -> usize {
    let prefixed = raw.lines().filter(|l| l.starts_with("[pages ")).count();
    prefixed.max(1)
}

/// Document mode over generated multi-page invoices (1-12 pages, line items across page breaks): one row per
/// document covering all its pages, under budgets that make windows of 1, 2 and 4 pages; and a one-page document
/// gets page mode's very answer.
#[test]
fn document_mode_writes_one_row_per_invoice_in_windows_of_pages() {
    let tmp = tempfile::tempdir().unwrap();
    let inputs = tmp.path().join("in");
    let made = std::process::Command::new(crate::util::python())
        .arg(repo_root().join("scripts/make_samples.py"))
        .arg(&inputs)
        .arg("--multipage")
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", text(&made));
    // The labels go beside the inputs, not among them (a .json is not a document).
    let labels = tmp.path().join("labels.json");
    std::fs::rename(inputs.join("ground_truth.json"), &labels).unwrap();
    // `invoice_05_pages.pdf`: 5 pages.
    let pages_of = |name: &str| -> i64 { name.split('_').nth(1).unwrap().parse().unwrap() };
    let run = |name: &str, extract: &str| -> (String, Vec<DocRow>) {
        let output = tmp.path().join(name);
        let spec = write_spec(tmp.path(), &inputs, &output);
        let text_spec = std::fs::read_to_string(&spec)
            .unwrap()
            .replace("[extract]\n", &format!("[extract]\n{extract}\n"))
            .replace("[raster]\n", "[raster]\nmax_side = 256\n")
            .replace("receipt.json", "invoice.json")
            .replace(
                &tiny_model().display().to_string(),
                &crate::util::tiny_gqa_model().display().to_string(),
            );
        std::fs::write(&spec, text_spec).unwrap();
        let out = pixtract(&["run", spec.to_str().unwrap()], &[], &repo_root());
        let t = text(&out);
        assert!(matches!(out.status.code(), Some(0 | 2)), "{t}");
        let glob = format!("{}/**/*.parquet", output.display());
        let rows = duckdb(&format!(
            "SELECT regexp_replace(source_uri, '.*/', ''), page_start, page_end, replace(coalesce(raw_output, ''), chr(10), '\\n'), generated_tokens FROM read_parquet('{glob}') ORDER BY 1, 2"
        ));
        let rows = rows
            .lines()
            .map(|l| {
                let c: Vec<&str> = l.split('|').collect();
                (
                    c[0].to_string(),
                    c[1].parse().unwrap(),
                    c[2].parse().unwrap(),
                    c[3].replace("\\n", "\n"),
                    c[4].parse().unwrap_or(0),
                )
            })
            .collect();
        (t, rows)
    };
    // The instruction's tokens, from a first run's log; a page at max_side 256 is 16 x 14 = 224 image tokens.
    let (t, whole) = run("whole", "unit = \"document\"\nmax_prompt_tokens = 60000");
    let instruction: usize = t
        .split("tokens (")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no window line: {t}"));
    assert_eq!(whole.len(), 6, "one row per document: {whole:?}");
    // `eval` joins each document row to its document's labels, line items scored as sets over the whole invoice.
    let eval = pixtract(
        &[
            "eval",
            "--predictions",
            tmp.path().join("whole").to_str().unwrap(),
            "--labels",
            labels.to_str().unwrap(),
            "--map",
            "items=items",
            "--map",
            "invoice_id=invoice_id",
        ],
        &[],
        &repo_root(),
    );
    let t = text(&eval);
    assert_eq!(eval.status.code(), Some(0), "{t}");
    assert!(
        t.contains("6 labelled documents, 6 predicted (6 rows"),
        "{t}"
    );
    // 10 + 24 + 46 + 90 + 156 + 244 items across the six invoices' pages.
    assert!(t.contains("over 6 documents: 570 labelled"), "{t}");
    for (uri, start, end, raw, _) in &whole {
        assert_eq!((*start, *end), (1, pages_of(uri)), "{uri}");
        assert_eq!(windows_of(raw), 1, "{uri}: {raw}");
    }
    for per_window in [1usize, 2, 4] {
        let budget = instruction + per_window * 224;
        let (_, rows) = run(
            &format!("w{per_window}"),
            &format!("unit = \"document\"\nmax_prompt_tokens = {budget}"),
        );
        assert_eq!(rows.len(), 6, "{rows:?}");
        for (uri, start, end, raw, _) in &rows {
            let pages = pages_of(uri);
            assert_eq!((*start, *end), (1, pages), "{uri}");
            assert_eq!(
                windows_of(raw),
                (pages as usize).div_ceil(per_window),
                "{uri} with {per_window} pages per window: {raw}"
            );
        }
    }
    // A one-page document: document mode's row is page mode's answer, token for token.
    let (_, pages) = run("pages", "unit = \"page\"");
    let single = |rows: &[DocRow]| {
        rows.iter()
            .find(|r| r.0 == "invoice_01_pages.pdf")
            .map(|r| (r.3.clone(), r.4))
            .unwrap()
    };
    assert_eq!(single(&whole), single(&pages));
}
