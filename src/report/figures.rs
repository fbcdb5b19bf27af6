//! The report's numbers, computed from a run's rows: throughput per time bin, errors grouped by cause, per-field
//! fill rates and confidence histograms. Pure functions of the rows, so the page and its tests agree by
//! construction on nothing but the definitions written here.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use super::read::RowFacts;

/// Rows and pages committed in one time bin, `[start, start + width)` seconds after the run started.
#[derive(Debug, Clone, PartialEq)]
pub struct ThroughputBin {
    pub start_s: f64,
    pub width_s: f64,
    pub rows: usize,
    pub pages: usize,
}

/// Pages a row covers: its page range, none for a document-level error row (page 0).
pub fn pages_of(row: &RowFacts) -> usize {
    if row.page_start <= 0 {
        0
    } else {
        (row.page_end - row.page_start + 1).max(0) as usize
    }
}

/// A bin width from a 1-2-5 ladder of seconds giving at most `max_bins` bins over `span_s`.
fn bin_width(span_s: f64, max_bins: usize) -> f64 {
    const LADDER: [f64; 14] = [
        1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0, 7200.0,
    ];
    LADDER
        .iter()
        .copied()
        .find(|w| span_s / w < max_bins as f64)
        .unwrap_or_else(|| (span_s / max_bins as f64 / 3600.0).ceil() * 3600.0)
}

/// Rows and pages per time bin, by `processed_at`, from `start` (the run's start; the first row's time when
/// unknown). Rows without a timestamp are left out.
pub fn throughput(rows: &[RowFacts], start: Option<DateTime<Utc>>) -> Vec<ThroughputBin> {
    let times: Vec<(f64, &RowFacts)> = {
        let first = start.or_else(|| rows.iter().filter_map(|r| r.processed_at).min());
        let Some(first) = first else {
            return Vec::new();
        };
        rows.iter()
            .filter_map(|r| {
                let t = r.processed_at?;
                Some((((t - first).num_microseconds()? as f64 / 1e6).max(0.0), r))
            })
            .collect()
    };
    let span = times.iter().map(|(t, _)| *t).fold(0.0, f64::max);
    let width = bin_width(span, 60);
    let n = (span / width).floor() as usize + 1;
    let mut bins: Vec<ThroughputBin> = (0..n)
        .map(|i| ThroughputBin {
            start_s: i as f64 * width,
            width_s: width,
            rows: 0,
            pages: 0,
        })
        .collect();
    for (t, row) in times {
        let i = ((t / width).floor() as usize).min(n - 1);
        bins[i].rows += 1;
        bins[i].pages += pages_of(row);
    }
    bins
}

/// The cause of an error, for grouping: the message without the document's URI in front, up to its first
/// detail (`:`, `(`, `;`), so that "x.pdf: empty file (0 bytes)" and "y.jpg: empty file (0 bytes)" share the cause
/// "empty file", and a budget-closed answer's token counts do not split its group.
pub fn cause_of(error: &str, source_uri: &str) -> String {
    let rest = error
        .strip_prefix(source_uri)
        .and_then(|r| r.strip_prefix(':'))
        .unwrap_or(error)
        .trim_start();
    let end = rest.find([':', '(', ';']).unwrap_or(rest.len());
    let cause = rest[..end].trim();
    if cause.is_empty() {
        "(no message)".to_string()
    } else {
        cause.to_string()
    }
}

/// Rows that failed for one cause.
#[derive(Debug, Clone, PartialEq)]
pub struct ErrorGroup {
    /// `error`, or `retry` for a transient failure the next run tries again.
    pub status: String,
    /// `error_kind` ("unknown" for outputs written before the column existed).
    pub kind: String,
    pub cause: String,
    pub rows: usize,
    /// Each document once, in URI order.
    pub documents: Vec<String>,
    /// One full message, as an example.
    pub example: String,
}

/// Every row that is not `ok`, grouped by (status, kind, cause), most rows first.
pub fn errors_by_cause(rows: &[RowFacts]) -> Vec<ErrorGroup> {
    let mut groups: BTreeMap<(String, String, String), ErrorGroup> = BTreeMap::new();
    for row in rows.iter().filter(|r| r.status != "ok") {
        let message = row.error.clone().unwrap_or_default();
        let cause = cause_of(&message, &row.source_uri);
        let kind = row.error_kind.clone().unwrap_or_else(|| "unknown".into());
        let group = groups
            .entry((row.status.clone(), kind.clone(), cause.clone()))
            .or_insert_with(|| ErrorGroup {
                status: row.status.clone(),
                kind,
                cause,
                rows: 0,
                documents: Vec::new(),
                example: message,
            });
        group.rows += 1;
        group.documents.push(row.source_uri.clone());
    }
    let mut out: Vec<ErrorGroup> = groups
        .into_values()
        .map(|mut g| {
            g.documents.sort();
            g.documents.dedup();
            g
        })
        .collect();
    out.sort_by(|a, b| b.rows.cmp(&a.rows).then_with(|| a.cause.cmp(&b.cause)));
    out
}

/// Confidence histogram bins over [0, 1]: bin i holds [i/BINS, (i+1)/BINS), the last one includes 1.
pub const CONFIDENCE_BINS: usize = 10;

/// One schema field over the run's answered rows.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldFill {
    pub field: String,
    /// Rows the model answered (status ok, or a budget-closed answer written as an error row).
    pub answered: usize,
    pub filled: usize,
    pub ok_rows: usize,
    pub ok_filled: usize,
    /// Filled values by confidence (`_confidence.<field>.min`), [`CONFIDENCE_BINS`] bins.
    pub confidence_bins: Vec<usize>,
    /// Filled values without a recorded confidence.
    pub without_confidence: usize,
}

impl FieldFill {
    pub fn rate(&self) -> Option<f64> {
        (self.answered > 0).then(|| self.filled as f64 / self.answered as f64)
    }

    pub fn ok_rate(&self) -> Option<f64> {
        (self.ok_rows > 0).then(|| self.ok_filled as f64 / self.ok_rows as f64)
    }
}

/// The bin of a confidence in [0, 1] (values outside are clamped).
pub fn confidence_bin(c: f32) -> usize {
    ((c.clamp(0.0, 1.0) * CONFIDENCE_BINS as f32).floor() as usize).min(CONFIDENCE_BINS - 1)
}

/// Per field: how often it holds a value, and how confident the values are.
pub fn field_fill(field_names: &[String], rows: &[RowFacts]) -> Vec<FieldFill> {
    field_names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let mut f = FieldFill {
                field: name.clone(),
                answered: 0,
                filled: 0,
                ok_rows: 0,
                ok_filled: 0,
                confidence_bins: vec![0; CONFIDENCE_BINS],
                without_confidence: 0,
            };
            for row in rows.iter().filter(|r| r.answered) {
                let facts = row.fields.get(i).copied().unwrap_or_default();
                let ok = row.status == "ok";
                f.answered += 1;
                f.ok_rows += usize::from(ok);
                if facts.filled {
                    f.filled += 1;
                    f.ok_filled += usize::from(ok);
                    match facts.confidence {
                        Some(c) => f.confidence_bins[confidence_bin(c)] += 1,
                        None => f.without_confidence += 1,
                    }
                }
            }
            f
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(
        uri: &str,
        start: i32,
        end: i32,
        status: &str,
        error: Option<&str>,
        at_s: i64,
    ) -> RowFacts {
        RowFacts {
            source_uri: uri.into(),
            page_start: start,
            page_end: end,
            status: status.into(),
            error: error.map(str::to_string),
            error_kind: error.map(|_| "unreadable".to_string()),
            processed_at: DateTime::<Utc>::from_timestamp(1_700_000_000 + at_s, 0),
            answered: start > 0,
            fields: Vec::new(),
        }
    }

    #[test]
    fn causes_drop_the_document_and_the_details() {
        assert_eq!(
            cause_of("/in/x.jpg: empty file (0 bytes)", "/in/x.jpg"),
            "empty file"
        );
        assert_eq!(
            cause_of(
                "answer reached the token budget (96 new tokens) and was closed early",
                "/in/y.pdf"
            ),
            "answer reached the token budget"
        );
        assert_eq!(
            cause_of("s3://b/z.pdf: cannot fetch: HTTP 503", "s3://b/z.pdf"),
            "cannot fetch"
        );
        assert_eq!(cause_of("", "a"), "(no message)");
    }

    #[test]
    fn errors_group_by_cause_with_each_document_once() {
        let rows = vec![
            row(
                "/a.pdf",
                1,
                1,
                "error",
                Some("answer reached the token budget (9)"),
                0,
            ),
            row(
                "/a.pdf",
                2,
                2,
                "error",
                Some("answer reached the token budget (9)"),
                1,
            ),
            row(
                "/b.jpg",
                0,
                0,
                "error",
                Some("/b.jpg: empty file (0 bytes)"),
                1,
            ),
            row("/c.jpg", 1, 1, "ok", None, 2),
        ];
        let groups = errors_by_cause(&rows);
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0].cause, "answer reached the token budget");
        assert_eq!(
            (groups[0].rows, groups[0].documents.clone()),
            (2, vec!["/a.pdf".to_string()])
        );
        assert_eq!(
            (groups[1].cause.as_str(), groups[1].rows),
            ("empty file", 1)
        );
    }

    #[test]
    fn throughput_bins_count_rows_and_pages_by_time() {
        let rows = vec![
            row("/a.pdf", 1, 2, "ok", None, 0),
            row("/b.jpg", 0, 0, "error", Some("x"), 0),
            row("/c.jpg", 1, 1, "ok", None, 3),
        ];
        let bins = throughput(&rows, None);
        assert_eq!(bins.len(), 4, "{bins:?}");
        assert_eq!((bins[0].rows, bins[0].pages), (2, 2));
        assert_eq!((bins[3].rows, bins[3].pages), (1, 1));
        assert_eq!(bins.iter().map(|b| b.rows).sum::<usize>(), 3);
        assert_eq!(bin_width(3600.0, 60), 120.0);
    }

    #[test]
    fn confidence_bins_cover_zero_to_one() {
        assert_eq!(confidence_bin(0.0), 0);
        assert_eq!(confidence_bin(0.95), 9);
        assert_eq!(confidence_bin(1.0), 9);
        assert_eq!(confidence_bin(0.1), 1);
    }
}
