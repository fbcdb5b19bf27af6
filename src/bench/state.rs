//! `pixtract bench state`: what a run's start-up costs over a long output history, the index against reading
//! every committed file, and against the reference of reading only the last run's files.
//!
//! The history is synthetic and written by the production sink (so every file has the sidecar a run writes):
//! `runs` nightly runs of `docs` one-page documents each, one date partition per run, rows carrying pixtract's
//! provenance columns plus an answer column. The index fold is the one a run would have written at the start of
//! the last night (covering every run before it); the last run's file then has only its sidecar. Each measurement
//! runs in a child process of its own, so its peak RSS (`VmHWM`) is its own: the state read, timed from the
//! listing to the set of done keys in memory, which is everything a run does before its first document is fetched.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use arrow::array::{ArrayRef, Int32Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use chrono::{Duration, NaiveDate};

use pixtract::extract::values::provenance::{
    ATTEMPT, DOC_PAGE_COUNT, MODEL_ID, PAGE_END, PAGE_START, SCHEMA_SHA256, SOURCE_ETAG,
    SOURCE_URI, SOURCE_VERSION, STATUS,
};
use pixtract::pipeline::state::{self, StateRead};
use pixtract::sink::{Commit, ParquetSink, SinkConfig, SinkTarget};

pub struct StateBench {
    /// Where the history is written (kept between calls with the same size: generating it takes a while).
    pub dir: PathBuf,
    pub runs: usize,
    pub docs: usize,
    pub rounds: usize,
}

/// How a measurement reads the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Measure {
    /// Every committed file read itself (runs before the index).
    Files,
    /// The index with no fold: every file's sidecar (a rebuild after a fold went stale).
    Sidecars,
    /// The fold of every run before the last, and the last run's sidecar (a nightly start-up).
    Index,
    /// The reference: only the last run's file, read itself.
    LastRun,
}

const MEASURES: [Measure; 4] = [
    Measure::Files,
    Measure::Sidecars,
    Measure::Index,
    Measure::LastRun,
];

const FIRST_DAY: (i32, u32, u32) = (2025, 12, 7);

/// What one child measured.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Measured {
    pub seconds: f64,
    pub peak_rss_mb: f64,
    /// Resident memory before the read began (the binary and its runtime).
    pub base_rss_mb: f64,
    pub documents_done: usize,
    pub files_read: usize,
    pub sidecars_read: usize,
    pub fold_files: usize,
}

pub fn run(bench: StateBench) -> anyhow::Result<()> {
    if bench.runs < 2 || bench.docs == 0 {
        bail!("--runs must be 2 or more and --docs 1 or more");
    }
    let history = bench
        .dir
        .join(format!("history-{}x{}", bench.runs, bench.docs));
    let generation = pixtract::pipeline::runtime()?.block_on(ensure_history(&history, &bench))?;
    println!(
        "history: {} runs x {} documents = {} rows in {} ({})",
        bench.runs,
        bench.docs,
        bench.runs * bench.docs,
        history.display(),
        generation
    );
    let mut table: Vec<(Measure, Vec<Measured>)> = MEASURES.iter().map(|m| (*m, vec![])).collect();
    for round in 1..=bench.rounds {
        for (measure, results) in table.iter_mut() {
            let m = measure_in_child(&history, *measure)?;
            println!(
                "round {round} {:<9} {:>7.2} s {:>8.1} MB peak ({:.1} MB before) {:>9} done, {} files, {} sidecars, fold of {}",
                name(*measure),
                m.seconds,
                m.peak_rss_mb,
                m.base_rss_mb,
                m.documents_done,
                m.files_read,
                m.sidecars_read,
                m.fold_files
            );
            results.push(m);
        }
    }
    print_table(&table, bench.runs, bench.docs)
}

impl Measure {
    pub fn from_name(name: &str) -> Option<Measure> {
        MEASURES.into_iter().find(|m| self::name(*m) == name)
    }
}

fn name(m: Measure) -> &'static str {
    match m {
        Measure::Files => "files",
        Measure::Sidecars => "sidecars",
        Measure::Index => "index",
        Measure::LastRun => "last-run",
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn print_table(table: &[(Measure, Vec<Measured>)], runs: usize, docs: usize) -> anyhow::Result<()> {
    let reference = table
        .iter()
        .find(|(m, _)| *m == Measure::LastRun)
        .map(|(_, r)| median(r.iter().map(|m| m.seconds).collect()))
        .context("no reference measured")?;
    println!();
    println!(
        "| read | documents done | start-up s (median) | peak RSS MB (median) | vs last run's files |"
    );
    println!("|---|---:|---:|---:|---:|");
    for (measure, results) in table {
        let seconds = median(results.iter().map(|m| m.seconds).collect());
        let rss = median(results.iter().map(|m| m.peak_rss_mb).collect());
        let done = results.first().map_or(0, |m| m.documents_done);
        println!(
            "| {} | {done} | {seconds:.2} | {rss:.0} | {:.1}x |",
            name(*measure),
            seconds / reference
        );
        let expected = if *measure == Measure::LastRun {
            docs
        } else {
            runs * docs
        };
        if done != expected {
            bail!(
                "{} found {done} documents done, the history holds {expected}",
                name(*measure)
            );
        }
    }
    println!(
        "goal (issue 27): start-up over the history under 10 s and 300 MB on the 2-core machine"
    );
    Ok(())
}

fn measure_in_child(history: &Path, measure: Measure) -> anyhow::Result<Measured> {
    let exe = std::env::current_exe().context("finding pixtract's own binary")?;
    let out = std::process::Command::new(exe)
        .args(["bench", "state", "--measure", name(measure), "--dir"])
        .arg(history)
        .env("RUST_LOG", "error")
        .output()
        .context("starting the measuring process")?;
    if !out.status.success() {
        bail!(
            "measuring {} failed: {}",
            name(measure),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or("");
    serde_json::from_str(line).with_context(|| format!("the measuring process printed {line:?}"))
}

/// The child's side: one read of the state, as `measure` says, printed as JSON.
pub fn measure_here(history: &Path, measure: Measure) -> anyhow::Result<()> {
    let runtime = pixtract::pipeline::runtime()?;
    let base = rss_mb("VmRSS")?;
    let fold = history.join(pixtract::sink::index::INDEX_DIR);
    let (target, mode) = match measure {
        Measure::Files => (history.to_path_buf(), StateRead::Files),
        Measure::Index | Measure::Sidecars => (history.to_path_buf(), StateRead::Index),
        Measure::LastRun => (last_partition(history)?, StateRead::Files),
    };
    // Without the fold: it is set aside for this read and put back.
    let set_aside = if measure == Measure::Sidecars {
        Some(set_fold_aside(&fold)?)
    } else {
        None
    };
    let started = Instant::now();
    let read = runtime.block_on(state::read_processed(&SinkTarget::local(&target), mode));
    let seconds = started.elapsed().as_secs_f64();
    if let Some(moved) = set_aside {
        for (from, to) in moved {
            std::fs::rename(&to, &from)
                .with_context(|| format!("putting {} back", from.display()))?;
        }
    }
    let set = read.context("reading the state")?;
    let measured = Measured {
        seconds,
        peak_rss_mb: rss_mb("VmHWM")?,
        base_rss_mb: base,
        documents_done: set.len(),
        files_read: set.files_read,
        sidecars_read: set.sidecars_read,
        fold_files: set.fold.as_ref().map_or(0, |f| f.1),
    };
    println!("{}", serde_json::to_string(&measured)?);
    Ok(())
}

/// Moves the folds out of the index folder; returns (original, moved) pairs.
fn set_fold_aside(index_dir: &Path) -> anyhow::Result<Vec<(PathBuf, PathBuf)>> {
    let mut moved = Vec::new();
    for entry in std::fs::read_dir(index_dir).context("reading the index folder")? {
        let path = entry?.path();
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        if name.starts_with("_fold-") {
            let aside = index_dir.with_file_name(format!("aside-{name}"));
            std::fs::rename(&path, &aside)?;
            moved.push((path, aside));
        }
    }
    Ok(moved)
}

fn last_partition(history: &Path) -> anyhow::Result<PathBuf> {
    let mut partitions: Vec<PathBuf> = std::fs::read_dir(history)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("dt="))
        })
        .collect();
    partitions.sort();
    partitions.pop().context("the history has no partition")
}

fn rss_mb(field: &str) -> anyhow::Result<f64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {field} in /proc/self/status"))?;
    Ok(kb / 1024.0)
}

/// Writes the history unless a complete one is there (its marker file); returns how it was got.
async fn ensure_history(history: &Path, bench: &StateBench) -> anyhow::Result<String> {
    let marker = history.join(".complete");
    if marker.exists() {
        return Ok("reused".into());
    }
    if history.exists() {
        std::fs::remove_dir_all(history)?;
    }
    std::fs::create_dir_all(history)?;
    let started = Instant::now();
    let target = SinkTarget::local(history);
    for run in 0..bench.runs - 1 {
        write_run(&target, run, bench.docs).await?;
    }
    // The last night's start: the state as a run reads it, then the fold it writes.
    let fold_started = Instant::now();
    let set = state::read_processed(&target, StateRead::Index).await?;
    let fold = state::write_fold(&target, &set, &run_id(bench.runs - 1)).await?;
    let fold_seconds = fold_started.elapsed().as_secs_f64();
    let fold_bytes = std::fs::metadata(history.join(&fold))?.len();
    write_run(&target, bench.runs - 1, bench.docs).await?;
    std::fs::write(&marker, b"")?;
    Ok(format!(
        "written in {:.0} s; the fold of {} runs: {:.1} MB, read and written in {fold_seconds:.1} s",
        started.elapsed().as_secs_f64(),
        bench.runs - 1,
        fold_bytes as f64 / 1e6
    ))
}

fn run_id(run: usize) -> String {
    let day = first_day() + Duration::days(run as i64);
    format!("{}T020000Z-{run:06x}", day.format("%Y%m%d"))
}

fn first_day() -> NaiveDate {
    let (y, m, d) = FIRST_DAY;
    NaiveDate::from_ymd_opt(y, m, d).unwrap_or_default()
}

/// One night's output: `docs` one-page documents, written by the production sink (data file and sidecar).
async fn write_run(target: &SinkTarget, run: usize, docs: usize) -> anyhow::Result<()> {
    let text = |f: &dyn Fn(usize) -> String| {
        Arc::new((0..docs).map(|i| Some(f(i))).collect::<StringArray>()) as ArrayRef
    };
    let int = |v: i32| Arc::new(Int32Array::from(vec![v; docs])) as ArrayRef;
    let day = first_day() + Duration::days(run as i64);
    let columns: Vec<(&str, ArrayRef)> = vec![
        (
            SOURCE_URI,
            text(&|i| format!("s3://receipts/{}/scan-{i:06}.pdf", day.format("%Y/%m/%d"))),
        ),
        (
            SOURCE_ETAG,
            text(&|i| format!("\"{:032x}\"", fake_etag(run, i))),
        ),
        (SOURCE_VERSION, Arc::new(StringArray::new_null(docs))),
        (SCHEMA_SHA256, text(&|_| "5c".repeat(32))),
        (MODEL_ID, text(&|_| "a7".repeat(32))),
        (PAGE_START, int(1)),
        (PAGE_END, int(1)),
        (DOC_PAGE_COUNT, int(1)),
        (STATUS, text(&|_| "ok".into())),
        (ATTEMPT, int(1)),
        (
            "total",
            text(&|i| format!("{}.{:02}", fake_etag(run, i) % 500, i % 100)),
        ),
    ];
    let schema = Arc::new(Schema::new(
        columns
            .iter()
            .map(|(n, a)| Field::new(*n, a.data_type().clone(), true))
            .collect::<Vec<_>>(),
    ));
    debug_assert!(
        schema
            .fields()
            .iter()
            .all(|f| f.data_type() != &DataType::Null)
    );
    let batch = RecordBatch::try_new(schema.clone(), columns.into_iter().map(|c| c.1).collect())?;
    let config = SinkConfig {
        partition_date: day,
        ..SinkConfig::default()
    };
    let mut sink = ParquetSink::new(target.clone(), config, schema, &run_id(run))?;
    sink.write_unit(&batch).await?;
    sink.finish(serde_json::json!({}), Commit::Whole).await?;
    Ok(())
}

fn fake_etag(run: usize, doc: usize) -> u128 {
    let mut x = (run as u128) << 64 | doc as u128;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd_c4ce_b9fe_1a85_ec53);
    x ^ (x >> 29)
}
