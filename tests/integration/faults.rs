//! Transient storage faults: a seeded fault-injecting proxy (tests/fault_proxy.py) in front of moto answers a share
//! of the requests with 503 SlowDown, a connection reset, a stall, or a body cut mid-way. Runs over it, without
//! `--force`, must end with every page of every document exactly once, and the documents whose fetch still failed
//! after the store's own retries recorded as `retry` rows with their attempt count, then done by a later run.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use object_store::{ObjectStoreExt, PutPayload};

use crate::lease::{download_parquet, put_inputs};
use crate::pipeline::{duckdb, invoice_pdf, write_spec};
use crate::util::{pixtract, python, repo_root, text};

/// The proxy process; stopped (SIGTERM, so it prints its summary) when dropped.
struct FaultProxy {
    child: Child,
    port: u16,
}

impl FaultProxy {
    fn start(
        upstream: &str,
        seed: u64,
        share: f64,
        kinds: &str,
        log: &Path,
        dir: &Path,
    ) -> FaultProxy {
        Self::start_with(upstream, seed, share, kinds, log, dir, &[])
    }

    fn start_with(
        upstream: &str,
        seed: u64,
        share: f64,
        kinds: &str,
        log: &Path,
        dir: &Path,
        extra: &[&str],
    ) -> FaultProxy {
        let script = repo_root().join("tests/fault_proxy.py");
        assert!(script.is_file(), "{} missing", script.display());
        let port_file = dir.join("proxy.port");
        let child = Command::new(python())
            .arg(&script)
            .args(["--upstream", upstream, "--seed", &seed.to_string()])
            .args(["--fault-share", &share.to_string()])
            .args(["--kinds", kinds, "--stall-s", "1.0"])
            .args(extra)
            .arg("--port-file")
            .arg(&port_file)
            .arg("--log")
            .arg(log)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tests/fault_proxy.py");
        let deadline = Instant::now() + Duration::from_secs(30);
        let port = loop {
            if let Some(p) = std::fs::read_to_string(&port_file)
                .ok()
                .and_then(|t| t.trim().parse::<u16>().ok())
            {
                break p;
            }
            assert!(Instant::now() < deadline, "the fault proxy did not start");
            std::thread::sleep(Duration::from_millis(50));
        };
        FaultProxy { child, port }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the child this struct started; no memory is passed.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let _ = self.child.wait();
    }
}

/// Faults injected, by kind, from the proxy's JSON-lines log; and the number of requests.
fn faults_in(log: &Path) -> (usize, BTreeMap<String, usize>) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut kinds = BTreeMap::new();
    let mut requests = 0;
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("proxy log line");
        requests += 1;
        if let Some(kind) = v["fault"].as_str() {
            *kinds.entry(kind.to_string()).or_insert(0) += 1;
        }
    }
    (requests, kinds)
}

#[test]
fn runs_through_ten_percent_faulty_storage_end_with_every_page_exactly_once() {
    faulty_storage_phase(0.1, 17, "503,reset,stall,truncate", 6, &[0, 2]);
}

/// Half the requests faulty: some fetches fail even after the store's retries (`retry` rows with their attempt,
/// done by a later run), and a run whose listing, lease or commit fails after its retries ends with exit 1 and no
/// `_SUCCESS`, leaving what it committed; later runs finish the job, still every page exactly once.
#[test]
fn runs_through_half_faulty_storage_end_with_every_page_exactly_once() {
    faulty_storage_phase(0.5, 23, "503,reset,truncate", 15, &[0, 1, 2]);
}

fn faulty_storage_phase(share: f64, seed: u64, kinds: &str, max_runs: usize, exits: &[i32]) {
    let moto = crate::util::Moto::start();
    moto.create_bucket("lake");
    let store = moto.store("lake");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (pngs, pdfs) = (12, 6);
    put_inputs(&rt, &store, pngs);
    rt.block_on(async {
        for d in 0..pdfs {
            store
                .put(
                    &object_store::path::Path::from(format!("in/inv{d:02}.pdf")),
                    PutPayload::from(invoice_pdf(d, 2)),
                )
                .await
                .unwrap();
        }
    });
    let expected_pages = pngs + pdfs * 2;
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("proxy.jsonl");
    let proxy = FaultProxy::start(&moto.endpoint(), seed, share, kinds, &log, tmp.path());
    let spec = write_spec(
        tmp.path(),
        Path::new("s3://lake/in/"),
        Path::new("s3://lake/out/"),
    );
    let mut text_spec = std::fs::read_to_string(&spec).unwrap();
    // Small files: many PUTs, so the sink's requests meet faults too. A lease left behind by a run whose release
    // failed expires in seconds.
    text_spec.push_str("max_rows_per_file = 3\nlease_ttl_s = 4\n");
    std::fs::write(&spec, text_spec).unwrap();
    // Source and output both through the proxy.
    let endpoint = proxy.endpoint();
    let env: Vec<(&str, &str)> = vec![
        ("AWS_ENDPOINT_URL", endpoint.as_str()),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_REGION", "us-east-1"),
    ];
    let mut runs = Vec::new();
    let mut settled = false;
    for run in 0..max_runs {
        let out = pixtract(&["run", spec.to_str().unwrap()], &env, &repo_root());
        let t = text(&out);
        assert!(
            out.status.code().is_some_and(|c| exits.contains(&c)),
            "run {run} did not finish: {t}\n{}",
            runs.join("\n")
        );
        assert!(!t.contains("StringToSign") && !t.contains("<Error>"), "{t}");
        let first = t
            .lines()
            .find(|l| l.starts_with("run "))
            .unwrap_or("")
            .to_string();
        let failed = t
            .lines()
            .find(|l| l.starts_with("pixtract run: error:"))
            .unwrap_or("")
            .chars()
            .take(300)
            .collect::<String>();
        runs.push(format!(
            "run {run}: exit {:?}: {first}{failed}",
            out.status.code()
        ));
        if first.contains(": 0 documents (0 failed,") {
            settled = true;
            break;
        }
    }
    let runs = runs.join("\n");
    // The report reads the output back through the same faulty storage: its listing, the run's manifest and
    // every data file, each read again when the storage fails it.
    let report = tmp.path().join("report.html");
    let out = pixtract(
        &[
            "report",
            "s3://lake/out/",
            "--out",
            report.to_str().unwrap(),
        ],
        &env,
        &repo_root(),
    );
    let t = text(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "report through faulty storage: {t}"
    );
    let html = std::fs::read_to_string(&report).expect("report written");
    assert!(
        html.contains("<html") || html.contains("<!DOCTYPE"),
        "{html:.300}"
    );
    drop(proxy);
    let (requests, injected) = faults_in(&log);
    println!("{runs}\nproxy: {requests} requests, faults {injected:?}");
    assert!(
        settled,
        "still documents left after {max_runs} runs:\n{runs}"
    );
    for kind in kinds.split(',') {
        assert!(
            injected.get(kind).copied().unwrap_or(0) > 0,
            "no {kind} fault was injected ({injected:?}): the test proves nothing"
        );
    }

    // Read back directly from moto (not through the proxy).
    let local = tmp.path().join("copy");
    download_parquet(&rt, &store, "out", &local);
    let glob = format!("{}/**/*.parquet", local.display());
    let pages = duckdb(&format!(
        "SELECT regexp_replace(source_uri, '.*/', ''), page_start, count(*) \
         FROM read_parquet('{glob}', hive_partitioning = true) WHERE status <> 'retry' GROUP BY ALL ORDER BY ALL"
    ));
    let lines: Vec<&str> = pages.lines().collect();
    assert_eq!(
        lines.len(),
        expected_pages,
        "every page of every document: {pages}\n{runs}"
    );
    assert!(
        lines.iter().all(|l| l.ends_with("|1")),
        "each page exactly once: {pages}\n{runs}"
    );
    // Transient failures left for a later run: recorded with their attempt, never as a document's outcome.
    let retries = duckdb(&format!(
        "SELECT regexp_replace(source_uri, '.*/', ''), attempt, error \
         FROM read_parquet('{glob}', hive_partitioning = true) WHERE status = 'retry' ORDER BY ALL"
    ));
    println!("retry rows:\n{retries}");
    let final_errors = duckdb(&format!(
        "SELECT regexp_replace(source_uri, '.*/', ''), error \
         FROM read_parquet('{glob}', hive_partitioning = true) \
         WHERE status = 'error' AND (error LIKE '%unavailable%' OR error LIKE '%reset%' OR error LIKE '%SlowDown%') \
         ORDER BY ALL"
    ));
    assert!(
        final_errors.trim().is_empty(),
        "a storage fault became a document's final error: {final_errors}\n{runs}"
    );
}

/// The output's storage refuses writes mid-run (a bucket policy changed: 403 AccessDenied on every data file after
/// the first): the run ends with exit 1 and a message that carries the storage's own words, the data file it was
/// writing, and nothing half-written is visible; the committed file's documents are done, and once the storage
/// takes writes again the next run does the rest, each page exactly once.
#[test]
fn an_output_that_refuses_writes_mid_run_is_the_runs_error() {
    let moto = crate::util::Moto::start();
    moto.create_bucket("lake");
    let store = moto.store("lake");
    let rt = tokio::runtime::Runtime::new().unwrap();
    put_inputs(&rt, &store, 8);
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("proxy.jsonl");
    let spec = write_spec(
        tmp.path(),
        Path::new("s3://lake/in/"),
        Path::new("s3://lake/out/"),
    );
    let mut text_spec = std::fs::read_to_string(&spec).unwrap();
    text_spec.push_str("max_rows_per_file = 2\n");
    std::fs::write(&spec, text_spec).unwrap();
    let run = |endpoint: &str| {
        let env: Vec<(&str, &str)> = vec![
            ("AWS_ENDPOINT_URL", endpoint),
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
            ("AWS_REGION", "us-east-1"),
        ];
        pixtract(&["run", spec.to_str().unwrap()], &env, &repo_root())
    };
    {
        let proxy = FaultProxy::start_with(
            &moto.endpoint(),
            0,
            0.0,
            "503",
            &log,
            tmp.path(),
            &["--deny-writes-to", "/lake/out/dt", "--deny-after", "1"],
        );
        let out = run(&proxy.endpoint());
        let t = text(&out);
        assert_eq!(out.status.code(), Some(1), "{t}");
        let error = t
            .lines()
            .find(|l| l.starts_with("pixtract run: error:"))
            .unwrap_or_else(|| panic!("no error line: {t}"));
        eprintln!("{error}");
        assert!(
            error.contains("AccessDenied"),
            "the storage's words: {error}"
        );
        assert!(
            error.contains(".parquet"),
            "the file being written: {error}"
        );
        assert!(
            !error.contains("the writer stopped"),
            "the cause, not its symptom: {error}"
        );
    }
    let denied = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .filter(|l| l.contains("\"deny\""))
        .count();
    assert!(denied >= 1, "no write was refused");
    // The one file that passed is committed (whole documents, one page each); the rest of the run is not.
    let committed = duckdb_rows(&rt, &store);
    assert!((1..8).contains(&committed), "{committed} rows committed");
    let out = run(&moto.endpoint());
    let t = text(&out);
    assert!(
        t.contains(&format!(
            "{} documents (0 failed, {committed} skipped as already done)",
            8 - committed
        )),
        "{t}"
    );
    assert_eq!(duckdb_rows(&rt, &store), 8, "each page exactly once");
}

/// Rows in the committed data files under `out/`.
fn duckdb_rows(
    rt: &tokio::runtime::Runtime,
    store: &std::sync::Arc<dyn object_store::ObjectStore>,
) -> usize {
    let dir = tempfile::tempdir().unwrap();
    let objects = download_parquet(rt, store, "out/", dir.path());
    if !objects.iter().any(|o| o.ends_with(".parquet")) {
        return 0;
    }
    duckdb(&format!(
        "SELECT count(*) FROM read_parquet('{}/**/*.parquet')",
        dir.path().display()
    ))
    .trim()
    .parse()
    .unwrap()
}
