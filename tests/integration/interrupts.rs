//! The kill and signal matrix: one output, 20 runs each stopped at a seeded random point by SIGINT or SIGTERM to
//! its process group (as a terminal's Ctrl-C, `timeout` or systemd stop do) or by SIGKILL, then one run left to
//! finish. At the end every page of every document is in the output exactly once, and no document was recorded as
//! done by an error that the interruption caused.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::pipeline::{
    assert_parquet_readable, duckdb, invoice_pdf, parquet_files, small_inputs_n, write_spec,
};
use crate::util::{pixtract, repo_root, text, tiny_gqa_model, tiny_model};

/// Every document with page rows in the output has all its pages there: a stop never commits part of one.
fn assert_no_document_committed_with_a_page_missing(output: &std::path::Path, when: &str) {
    if parquet_files(output).is_empty() {
        return;
    }
    let glob = format!("{}/**/*.parquet", output.display());
    let partial = duckdb(&format!(
        "SELECT source_uri, count(DISTINCT page_start), max(doc_page_count) \
         FROM read_parquet('{glob}', hive_partitioning = true) WHERE page_start > 0 \
         GROUP BY source_uri HAVING count(DISTINCT page_start) <> max(doc_page_count)"
    ));
    assert!(
        partial.trim().is_empty(),
        "{when}: documents committed with pages missing (uri|pages|page count):\n{partial}"
    );
}

/// A small deterministic generator (xorshift64*), so a failing seed reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Debug, Clone, Copy)]
enum Stop {
    GroupSigint,
    GroupSigterm,
    Kill9,
}

#[test]
fn twenty_interrupted_runs_then_one_more_leave_every_page_exactly_once() {
    let tmp = tempfile::tempdir().unwrap();
    let inputs = tmp.path().join("in");
    std::fs::create_dir(&inputs).unwrap();
    // Two-page PDFs go through the renderer worker processes; PNGs are decoded in the run itself.
    let pdfs = 30;
    for d in 0..pdfs {
        std::fs::write(inputs.join(format!("inv{d:02}.pdf")), invoice_pdf(d, 2)).unwrap();
    }
    small_inputs_n(&inputs, 10);
    let expected_pages = pdfs * 2 + 10;
    let output = tmp.path().join("out");
    let spec = write_spec(tmp.path(), &inputs, &output);
    let mut text_spec = std::fs::read_to_string(&spec).unwrap();
    // Small files: more commits, so stops land between commits as well as inside one. The GroupQueryAttention
    // export streams through KV-cache slots (continuous batching, the default): pages of a document finish out of
    // order, and a document must be committed only once all its pages are in.
    text_spec = text_spec
        .replace("batch_size = 4", "batch_size = 2")
        .replace(
            &tiny_model().display().to_string(),
            &tiny_gqa_model().display().to_string(),
        );
    text_spec.push_str("max_rows_per_file = 2\n");
    std::fs::write(&spec, text_spec).unwrap();

    let mut rng = Rng(0x5EED_2026_1203);
    let mut log = Vec::new();
    let mut stopped = 0;
    for run in 0..20 {
        let stop = match rng.below(3) {
            0 => Stop::GroupSigint,
            1 => Stop::GroupSigterm,
            _ => Stop::Kill9,
        };
        // When: 0-2.5 s after the start (start-up, listing, model load, the first batches), or right after the
        // next commit. Enough documents that every run still has work when it is stopped.
        let after_commits = rng.below(2) as usize;
        let delay = Duration::from_millis(rng.below(2500));
        let before = parquet_files(&output).len();
        let mut child = Command::new(env!("CARGO_BIN_EXE_pixtract"))
            .args(["run", spec.to_str().unwrap()])
            .current_dir(repo_root())
            .env("PIXTRACT_VENV", repo_root().join(".venv"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            // Its own group, so a group signal reaches the run and what it started, not this test.
            .process_group(0)
            .spawn()
            .unwrap();
        let started = Instant::now();
        let deadline = started + Duration::from_secs(120);
        let mut finished_first = None;
        if after_commits == 0 {
            while started.elapsed() < delay {
                if let Some(status) = child.try_wait().unwrap() {
                    finished_first = Some(status);
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        } else {
            while parquet_files(&output).len() < before + after_commits && Instant::now() < deadline
            {
                if let Some(status) = child.try_wait().unwrap() {
                    finished_first = Some(status);
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        if finished_first.is_none() {
            stopped += 1;
            let pid = child.id() as i32;
            // SAFETY: kill(2) with a pid this test started; no memory is passed.
            let rc = unsafe {
                match stop {
                    Stop::GroupSigint => libc::kill(-pid, libc::SIGINT),
                    Stop::GroupSigterm => libc::kill(-pid, libc::SIGTERM),
                    Stop::Kill9 => libc::kill(pid, libc::SIGKILL),
                }
            };
            assert_eq!(rc, 0, "run {run}: cannot signal {pid}");
        }
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        // A group signal lets the run commit what is in flight and exit 3 (or 130 for a signal before its handler
        // was installed, as the default action); SIGKILL ends it at once; a run may also have finished first.
        let code = out.status.code();
        match (finished_first, stop) {
            (Some(_), _) => assert!(matches!(code, Some(0 | 2)), "run {run}: {stderr}"),
            (None, Stop::Kill9) => assert_eq!(code, None, "run {run}: {stderr}"),
            // SIGINT and SIGTERM alike are handled once the run is up (after start-up's first milliseconds, or
            // once it committed): never the signal's default death, and exit 3 unless the work was all done.
            (None, _) if after_commits > 0 || delay >= Duration::from_millis(200) => assert!(
                matches!(code, Some(0 | 2 | 3)),
                "run {run}: {stop:?} was not handled: {code:?} {stderr}"
            ),
            (None, _) => assert!(
                matches!(code, Some(0 | 2 | 3) | None),
                "run {run}: {code:?} {stderr}"
            ),
        }
        assert!(!stderr.contains("panicked"), "run {run} panicked: {stderr}");
        assert_parquet_readable(&output, &format!("after run {run} ({stop:?})"));
        assert_no_document_committed_with_a_page_missing(&output, &format!("run {run} ({stop:?})"));
        let committed = parquet_files(&output).len();
        log.push(format!(
            "run {run:2}: {stop:?} {} -> exit {code:?}, {} file(s) committed in all",
            if finished_first.is_some() {
                "(finished before the stop)".to_string()
            } else if after_commits == 0 {
                format!("after {} ms", delay.as_millis())
            } else {
                format!("after {after_commits} more commit(s)")
            },
            committed
        ));
    }
    // Strict: runs that finished before their stop prove nothing about stops.
    assert!(
        stopped >= 18,
        "only {stopped} of 20 runs were stopped while working:\n{}",
        log.join("\n")
    );
    let last = pixtract(&["run", spec.to_str().unwrap()], &[], &repo_root());
    let t = text(&last);
    assert!(matches!(last.status.code(), Some(0 | 2)), "{t}");
    let glob = format!("{}/**/*.parquet", output.display());
    let pages = duckdb(&format!(
        "SELECT regexp_replace(source_uri, '.*/', ''), page_start, count(*), \
         string_agg(DISTINCT status, ','), max(coalesce(error, '')) \
         FROM read_parquet('{glob}', hive_partitioning = true) GROUP BY ALL ORDER BY ALL"
    ));
    let lines: Vec<&str> = pages.lines().collect();
    let log = log.join("\n");
    println!("{log}\nlast run: {}", t.lines().next().unwrap_or(""));
    assert_eq!(
        lines.len(),
        expected_pages,
        "every page of every document: {pages}\n{log}"
    );
    assert!(
        lines.iter().all(|l| l.split('|').nth(2) == Some("1")),
        "each page exactly once: {pages}\n{log}"
    );
    for cause in ["renderer process died", "signal", "interrupted"] {
        assert!(
            !pages.contains(cause),
            "an interruption was recorded as a document's outcome ({cause}): {pages}\n{log}"
        );
    }
    // Nothing is left for a later run.
    let again = pixtract(&["run", spec.to_str().unwrap()], &[], &repo_root());
    let t2 = text(&again);
    assert_eq!(again.status.code(), Some(0), "{t2}");
    assert!(
        t2.contains(&format!(
            "0 documents (0 failed, {} skipped as already done)",
            pdfs + 10
        )),
        "{t2}"
    );
}
