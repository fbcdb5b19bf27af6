//! What a run tells its operator while it runs: live counters, per-stage busy time, progress and events, handed to
//! the caller's [`EventSink`] (the binary draws them as a terminal spinner, plain lines or JSON lines).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Value, json};

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

/// Where a run's events go. The library only reports; the caller decides what an event becomes: the binary prints
/// plain lines, JSON lines or a spinner on stderr (`--log-format`), a library user may collect them. Each event
/// has a name (`run_started`, `state_read`, `document_failed`, `page_failed`, `row_failed`, `run_finished`, ...), a
/// sentence, and its fields as a JSON object.
pub trait EventSink: Send + Sync {
    /// One event: its level (`info`, `warn`), its name (`run_started`, `document_failed`, ...), a sentence, and its
    /// fields.
    fn event(&self, level: &str, name: &str, text: &str, fields: &Value);

    /// The live counters (a sentence and the `progress` event's fields), about five times a second while the run
    /// works: a spinner redraws at that rate, a log writes one line every so many seconds.
    fn progress(&self, _line: &str, _fields: &Value, _elapsed: Duration) {}
}

/// The sink a run was given (none: the run reports nothing).
#[derive(Clone, Default)]
pub struct Events(pub Option<std::sync::Arc<dyn EventSink>>);

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Events(sink)"
        } else {
            "Events(none)"
        })
    }
}

/// How the stages report: through the run's [`EventSink`], the sentence made only when there is one.
#[derive(Debug, Clone, Default)]
pub struct Reporter {
    pub events: Events,
}

impl Reporter {
    pub fn event(&self, level: &str, event: &str, text: impl FnOnce() -> String, fields: Value) {
        if let Some(sink) = &self.events.0 {
            sink.event(level, event, &text(), &fields);
        }
    }

    /// The live counters to the sink, every 200 ms.
    pub(crate) fn spawn_progress(
        &self,
        progress: std::sync::Arc<Progress>,
        started: Instant,
    ) -> tokio::task::JoinHandle<()> {
        let sink = self.events.0.clone();
        tokio::spawn(async move {
            let Some(sink) = sink else { return };
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                sink.progress(
                    &progress.line(started),
                    &progress.fields(started),
                    started.elapsed(),
                );
            }
        })
    }
}
