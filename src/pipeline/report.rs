//! What a run tells its operator while it runs: live counters, per-stage busy time, progress and events,
//! as a terminal spinner, plain lines (logs of scheduled jobs) or JSON lines (log pipelines: Loki, CloudWatch,
//! Datadog parse one object per line).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Value, json};

/// How `pixtract run` reports on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// A live spinner on a terminal, plain lines otherwise.
    #[default]
    Auto,
    /// Plain lines: a progress line every 10 s, one line per failed document.
    Plain,
    /// One JSON object per line: run_started, progress (every 10 s), document_failed, row_failed, run_finished.
    Json,
    /// Nothing but errors that stop the run (benchmarks).
    Quiet,
}

/// Live counters and per-stage busy time, shared by the stages and the progress display.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    pub documents: AtomicUsize,
    pub failed: AtomicUsize,
    pub pages: AtomicUsize,
    pub rows: AtomicUsize,
    pub rows_failed: AtomicUsize,
    pub generated_tokens: AtomicU64,
    /// Documents whose last row reached the writer.
    pub documents_done: AtomicUsize,
    /// Decode row places offered and those that held a live sequence (the model stage's running counts).
    pub row_steps: AtomicUsize,
    pub live_row_steps: AtomicUsize,
    /// Documents this run will process (listing counted in the background); 0 until known.
    total: AtomicUsize,
    /// Nanoseconds each stage spent working, summed over its parallel workers.
    busy: [AtomicU64; STAGES.len()],
}

/// Stages whose busy time is measured, in data-flow order.
pub(crate) const STAGES: [&str; 5] = ["fetch", "raster", "preprocess", "model", "write"];

#[derive(Debug, Clone, Copy)]
pub(crate) enum Stage {
    Fetch = 0,
    Raster = 1,
    Preprocess = 2,
    Model = 3,
    Write = 4,
}

/// A stage's work over the run: `share` = busy seconds / wall seconds, so a stage with two workers both always
/// busy shows 2.0, and the model stage's share says how much of the run the device was working.
#[derive(Debug, Clone, Serialize)]
pub struct StageBusy {
    pub stage: String,
    pub busy_seconds: f64,
    pub share: f64,
}

impl Progress {
    /// The number of documents the run will process, once the counting pass over the listing is done.
    pub fn set_total(&self, documents: usize) {
        // Stored +1 so that 0 means "not known yet" and an empty listing still reads as known.
        self.total.store(documents + 1, Ordering::Relaxed);
    }

    fn total(&self) -> Option<usize> {
        self.total.load(Ordering::Relaxed).checked_sub(1)
    }

    /// Seconds left at the documents-per-second rate so far; None until the total and a rate are known.
    fn eta_seconds(&self, started: Instant) -> Option<f64> {
        let total = self.total()?;
        let done = self.documents_done.load(Ordering::Relaxed);
        let secs = started.elapsed().as_secs_f64();
        if done == 0 || secs <= 0.0 {
            return None;
        }
        Some(total.saturating_sub(done) as f64 * secs / done as f64)
    }

    pub fn add_busy(&self, stage: Stage, d: Duration) {
        self.busy[stage as usize].fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }

    pub fn stages(&self, wall: Duration) -> Vec<StageBusy> {
        let wall = wall.as_secs_f64().max(1e-9);
        STAGES
            .iter()
            .zip(&self.busy)
            .map(|(name, ns)| {
                let busy = ns.load(Ordering::Relaxed) as f64 / 1e9;
                StageBusy {
                    stage: name.to_string(),
                    busy_seconds: busy,
                    share: busy / wall,
                }
            })
            .collect()
    }

    fn fields(&self, started: Instant) -> Value {
        let secs = started.elapsed().as_secs_f64().max(1e-9);
        let pages = self.pages.load(Ordering::Relaxed);
        json!({
            "elapsed_s": (secs * 10.0).round() / 10.0,
            "documents": self.documents.load(Ordering::Relaxed),
            "documents_done": self.documents_done.load(Ordering::Relaxed),
            "documents_failed": self.failed.load(Ordering::Relaxed),
            "pages": pages,
            "pages_per_s": (pages as f64 / secs * 100.0).round() / 100.0,
            "rows": self.rows.load(Ordering::Relaxed),
            "rows_failed": self.rows_failed.load(Ordering::Relaxed),
            "generated_tokens_per_s": (self.generated_tokens.load(Ordering::Relaxed) as f64 / secs).round(),
            "documents_total": self.total(),
            "eta_s": self.eta_seconds(started).map(|e| e.round()),
            "idle_row_share": self.idle_row_share().map(|s| (s * 1000.0).round() / 1000.0),
        })
    }

    /// Share of decode row places that held no live sequence so far; None before the first step.
    fn idle_row_share(&self) -> Option<f64> {
        let offered = self.row_steps.load(Ordering::Relaxed);
        let live = self.live_row_steps.load(Ordering::Relaxed);
        (offered > 0).then(|| 1.0 - live as f64 / offered as f64)
    }

    fn line(&self, started: Instant) -> String {
        let f = self.fields(started);
        let total = self.total().map(|t| format!("/{t}")).unwrap_or_default();
        let eta = match self.eta_seconds(started) {
            Some(s) if s >= 3600.0 => format!(
                " | ETA {}h{:02}m",
                (s / 3600.0) as u64,
                ((s % 3600.0) / 60.0) as u64
            ),
            Some(s) => format!(" | ETA {}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64),
            None => String::new(),
        };
        let idle = self
            .idle_row_share()
            .map(|s| format!(" | idle rows {:.0}%", s * 100.0))
            .unwrap_or_default();
        format!(
            "documents {}{total} done ({} read, {} failed) | pages {} ({}/s) | rows {} ({} error) | {} generated tokens/s{idle}{eta}",
            f["documents_done"],
            f["documents"],
            f["documents_failed"],
            f["pages"],
            f["pages_per_s"],
            f["rows"],
            f["rows_failed"],
            f["generated_tokens_per_s"]
        )
    }
}

/// Writes events in the chosen format. Plain lines start with `pixtract run:`; JSON lines carry `ts`, `level`
/// and `event` plus the event's fields.
#[derive(Debug, Clone, Copy)]
pub struct Reporter {
    pub format: LogFormat,
}

impl Reporter {
    pub fn event(&self, level: &str, event: &str, text: impl FnOnce() -> String, fields: Value) {
        match self.format {
            LogFormat::Json => {
                let mut obj = serde_json::Map::new();
                obj.insert(
                    "ts".into(),
                    chrono::Utc::now()
                        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                        .into(),
                );
                obj.insert("level".into(), level.into());
                obj.insert("event".into(), event.into());
                if let Value::Object(f) = fields {
                    obj.extend(f);
                }
                eprintln!("{}", Value::Object(obj));
            }
            LogFormat::Auto | LogFormat::Plain => eprintln!("pixtract run: {}", text()),
            LogFormat::Quiet => {}
        }
    }

    /// A spinner with live counts on a terminal (auto); a progress event every 10 s otherwise.
    pub(crate) fn spawn_progress(
        self,
        progress: std::sync::Arc<Progress>,
        started: Instant,
    ) -> tokio::task::JoinHandle<()> {
        use std::io::IsTerminal;
        tokio::spawn(async move {
            if self.format == LogFormat::Quiet {
                return;
            }
            if self.format == LogFormat::Auto && std::io::stderr().is_terminal() {
                let bar = indicatif::ProgressBar::new_spinner();
                bar.set_style(
                    indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
                        .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
                );
                loop {
                    bar.set_message(progress.line(started));
                    bar.tick();
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            } else {
                // Every 10 s by default; PIXTRACT_PROGRESS_SECONDS sets another period (log volume vs detail).
                let every = std::env::var("PIXTRACT_PROGRESS_SECONDS")
                    .ok()
                    .and_then(|v| v.trim().parse::<f64>().ok())
                    .filter(|s| *s > 0.0)
                    .unwrap_or(10.0);
                loop {
                    tokio::time::sleep(Duration::from_secs_f64(every)).await;
                    self.event(
                        "info",
                        "progress",
                        || {
                            format!(
                                "[{:.0} s] {}",
                                started.elapsed().as_secs_f64(),
                                progress.line(started)
                            )
                        },
                        progress.fields(started),
                    );
                }
            }
        })
    }
}
