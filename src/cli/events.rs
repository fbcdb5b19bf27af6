//! How `pixtract run` shows a run's events on stderr: a spinner on a terminal, plain lines (logs of scheduled
//! jobs) or JSON lines (log pipelines: Loki, CloudWatch, Datadog parse one object per line). The library only
//! hands events to an [`EventSink`]; this is the binary's.

use std::sync::Mutex;
use std::time::Duration;

use pixtract::pipeline::EventSink;
use serde_json::Value;

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
}

/// The binary's event sink: stderr in the chosen format.
pub struct StderrEvents {
    format: LogFormat,
    /// A live spinner (auto format on a terminal), else a progress line every `every`.
    bar: Option<indicatif::ProgressBar>,
    every: Duration,
    /// When the last progress line was written (run time).
    last: Mutex<Duration>,
}

impl StderrEvents {
    pub fn new(format: LogFormat) -> StderrEvents {
        use std::io::IsTerminal;
        let bar = (format == LogFormat::Auto && std::io::stderr().is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::new_spinner();
            bar.set_style(
                indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            bar
        });
        // Every 10 s by default; PIXTRACT_PROGRESS_SECONDS sets another period (log volume vs detail).
        let every = std::env::var("PIXTRACT_PROGRESS_SECONDS")
            .ok()
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| *s > 0.0)
            .unwrap_or(10.0);
        StderrEvents {
            format,
            bar,
            every: Duration::from_secs_f64(every),
            last: Mutex::new(Duration::ZERO),
        }
    }

    /// The run is over: the spinner goes.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl EventSink for StderrEvents {
    fn event(&self, level: &str, name: &str, text: &str, fields: &Value) {
        let line = match self.format {
            LogFormat::Json => {
                let mut obj = serde_json::Map::new();
                obj.insert(
                    "ts".into(),
                    chrono::Utc::now()
                        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                        .into(),
                );
                obj.insert("level".into(), level.into());
                obj.insert("event".into(), name.into());
                if let Value::Object(f) = fields {
                    obj.extend(f.clone());
                }
                Value::Object(obj).to_string()
            }
            LogFormat::Auto | LogFormat::Plain => format!("pixtract run: {text}"),
        };
        match &self.bar {
            // Above the spinner, not through it.
            Some(bar) => bar.suspend(|| eprintln!("{line}")),
            None => eprintln!("{line}"),
        }
    }

    fn progress(&self, line: &str, fields: &Value, elapsed: Duration) {
        if let Some(bar) = &self.bar {
            bar.set_message(line.to_string());
            bar.tick();
            return;
        }
        let due = match self.last.lock() {
            Ok(mut last) if elapsed >= *last + self.every => {
                *last = elapsed;
                true
            }
            _ => false,
        };
        if due {
            let text = format!("[{:.0} s] {line}", elapsed.as_secs_f64());
            self.event("info", "progress", &text, fields);
        }
    }
}
