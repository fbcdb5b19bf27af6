//! Below the schema and the rows, so neither imports the other: how answer text becomes typed values
//! (dates, timestamps, decimals) and the one table of pixtract's own provenance columns.

use chrono::{DateTime, NaiveDate, Utc};

pub mod provenance {
    //! pixtract's own columns, after the extracted ones: names, Arrow types and order in ONE table, which the
    //! row builder, the schema loader (reserved names) and the output-state reader all read.

    use arrow::datatypes::{DataType, Field, TimeUnit};

    /// Arrow type of a provenance column.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum ColumnKind {
        Utf8,
        Int32,
        Float64,
        TimestampUtc,
        /// `List<Utf8>` (items non-null).
        Utf8List,
    }

    #[derive(Debug, Clone, Copy)]
    pub struct ProvenanceColumn {
        pub name: &'static str,
        pub kind: ColumnKind,
        pub nullable: bool,
    }

    impl ProvenanceColumn {
        pub fn arrow_field(&self) -> Field {
            let ty = match self.kind {
                ColumnKind::Utf8 => DataType::Utf8,
                ColumnKind::Int32 => DataType::Int32,
                ColumnKind::Float64 => DataType::Float64,
                ColumnKind::TimestampUtc => {
                    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
                }
                ColumnKind::Utf8List => DataType::List(std::sync::Arc::new(Field::new(
                    "item",
                    DataType::Utf8,
                    false,
                ))),
            };
            Field::new(self.name, ty, self.nullable)
        }
    }

    // The names other modules look columns up by.
    pub const SOURCE_URI: &str = "source_uri";
    pub const SOURCE_ETAG: &str = "source_etag";
    pub const SOURCE_VERSION: &str = "source_version";
    pub const PAGE_START: &str = "page_start";
    pub const PAGE_END: &str = "page_end";
    pub const DOC_PAGE_COUNT: &str = "doc_page_count";
    pub const SCHEMA_SHA256: &str = "schema_sha256";
    pub const MODEL_ID: &str = "model_id";
    pub const STATUS: &str = "status";
    pub const ATTEMPT: &str = "attempt";
    /// The fields whose values a confidence threshold withheld (written as null): what a person should check.
    pub const REVIEW: &str = "_review";
    /// Why each `_review` value was withheld, in the same order: `low_confidence` or `ungrounded`.
    pub const REVIEW_REASONS: &str = "_review_reasons";
    /// `status` of a usable row.
    pub const STATUS_OK: &str = "ok";
    /// `status` of a transient failure's row: the document is not done, the next run retries it.
    pub const STATUS_RETRY: &str = "retry";
    /// What kind of failure a row that is not `ok` records: one of [`ErrorKind`]'s names, for queries and alerts
    /// that must not depend on the wording of `error`.
    pub const ERROR_KIND: &str = "error_kind";

    /// The `error_kind` of a row whose status is not `ok`: a closed vocabulary, stable across releases (new kinds
    /// may be added; a name never changes meaning).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
    pub enum ErrorKind {
        /// The storage could not list or hand over the document (not found, denied, unavailable after retries), or
        /// the listing refused the entry (a symbolic link not followed, a FIFO, a name that is not UTF-8).
        Storage,
        /// Over a configured limit: bytes per document, pages per document, pixels per page.
        Limit,
        /// Not a document type pixtract reads (PDF, JPEG, PNG, TIFF, WebP).
        Unsupported,
        /// An encrypted PDF with no password configured, or the wrong one.
        Encrypted,
        /// A supported type that does not decode: empty, truncated or corrupt file, a page that does not render,
        /// an image of unusable shape.
        Unreadable,
        /// The PDF renderer crashed or timed out on the document, or could not start.
        Renderer,
        /// A decoded page could not be prepared for the model.
        Image,
        /// The prompt could not be built, or it and the answer budget exceed the model's context.
        Prompt,
        /// The model failed on the row (or on its whole batch), or the grammar failed.
        Generation,
        /// The answer is not valid JSON, does not match the schema, or does not fit the output columns.
        Answer,
        /// The answer reached the token budget: closed early (later fields forced to null/empty) or a
        /// transcription cut. The row has values; they are incomplete.
        Budget,
    }

    impl ErrorKind {
        pub const ALL: [ErrorKind; 11] = [
            ErrorKind::Storage,
            ErrorKind::Limit,
            ErrorKind::Unsupported,
            ErrorKind::Encrypted,
            ErrorKind::Unreadable,
            ErrorKind::Renderer,
            ErrorKind::Image,
            ErrorKind::Prompt,
            ErrorKind::Generation,
            ErrorKind::Answer,
            ErrorKind::Budget,
        ];

        /// The name written to `error_kind`.
        pub fn as_str(self) -> &'static str {
            match self {
                ErrorKind::Storage => "storage",
                ErrorKind::Limit => "limit",
                ErrorKind::Unsupported => "unsupported",
                ErrorKind::Encrypted => "encrypted",
                ErrorKind::Unreadable => "unreadable",
                ErrorKind::Renderer => "renderer",
                ErrorKind::Image => "image",
                ErrorKind::Prompt => "prompt",
                ErrorKind::Generation => "generation",
                ErrorKind::Answer => "answer",
                ErrorKind::Budget => "budget",
            }
        }

        pub fn parse(name: &str) -> Option<ErrorKind> {
            ErrorKind::ALL.into_iter().find(|k| k.as_str() == name)
        }
    }

    impl std::fmt::Display for ErrorKind {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.as_str())
        }
    }

    const fn col(name: &'static str, kind: ColumnKind, nullable: bool) -> ProvenanceColumn {
        ProvenanceColumn {
            name,
            kind,
            nullable,
        }
    }

    use ColumnKind::{Float64, Int32, TimestampUtc, Utf8, Utf8List};

    /// In output order. Schema properties may not use these names.
    pub const PROVENANCE: &[ProvenanceColumn] = &[
        col(SOURCE_URI, Utf8, false),
        col(SOURCE_ETAG, Utf8, true),
        col(SOURCE_VERSION, Utf8, true),
        col(PAGE_START, Int32, false),
        col(PAGE_END, Int32, false),
        col(DOC_PAGE_COUNT, Int32, true),
        col("pipeline", Utf8, false),
        col("schema_name", Utf8, false),
        col(SCHEMA_SHA256, Utf8, true),
        col(MODEL_ID, Utf8, false),
        col("run_id", Utf8, false),
        col("processed_at", TimestampUtc, false),
        col(STATUS, Utf8, false),
        col("error", Utf8, true),
        col(ERROR_KIND, Utf8, true),
        col(ATTEMPT, Int32, true),
        col(REVIEW, Utf8List, true),
        col(REVIEW_REASONS, Utf8List, true),
        col("finish_reason", Utf8, true),
        col("raw_output", Utf8, true),
        col("prompt_tokens", Int32, true),
        col("generated_tokens", Int32, true),
        col("fetch_ms", Float64, true),
        col("raster_ms", Float64, true),
        col("vision_ms", Float64, true),
        col("prefill_ms", Float64, true),
        col("decode_ms", Float64, true),
        col("grammar_ms", Float64, true),
        col("parse_ms", Float64, true),
    ];

    /// Whether `name` is one of pixtract's own columns.
    pub fn is_reserved(name: &str) -> bool {
        PROVENANCE.iter().any(|c| c.name == name)
    }
}

/// `YYYY-MM-DD` -> days since 1970-01-01.
pub fn parse_date(s: &str) -> Option<i32> {
    let d = NaiveDate::parse_from_str(s, "%Y-%m-%d").ok()?;
    let epoch = NaiveDate::from_ymd_opt(1970, 1, 1)?;
    i32::try_from((d - epoch).num_days()).ok()
}

/// RFC 3339 -> microseconds since the epoch (UTC).
pub fn parse_timestamp(s: &str) -> Option<i64> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|d| d.with_timezone(&Utc).timestamp_micros())
}

/// A JSON number's text -> unscaled i128 at `scale` (round half away from zero), None if it does not fit
/// `precision` digits.
pub fn parse_decimal(text: &str, precision: u8, scale: i8) -> Option<i128> {
    let (mantissa, exp) = match text.find(['e', 'E']) {
        Some(i) => (&text[..i], text[i + 1..].parse::<i32>().ok()?),
        None => (text, 0),
    };
    let (neg, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => (true, m),
        None => (false, mantissa),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if int.is_empty() || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let digits = format!("{int}{frac}");
    let digits = digits.trim_start_matches('0');
    // Checked: an exponent near i32::MAX must give None, not an overflow.
    let shift = exp
        .checked_sub(i32::try_from(frac.len()).ok()?)?
        .checked_add(i32::from(scale))?;
    let mut value: i128 = 0;
    let (keep, dropped) = if shift >= 0 {
        (digits, "")
    } else {
        let cut = digits.len().saturating_sub(shift.unsigned_abs() as usize);
        digits.split_at(cut)
    };
    for b in keep.bytes() {
        value = value.checked_mul(10)?.checked_add(i128::from(b - b'0'))?;
    }
    if shift > 0 {
        for _ in 0..shift {
            value = value.checked_mul(10)?;
        }
    }
    // Dropped digits: round half away from zero on the first one (when enough digits were dropped).
    let dropped_all = shift < 0 && shift.unsigned_abs() as usize > digits.len();
    if !dropped_all && dropped.as_bytes().first().is_some_and(|&d| d >= b'5') {
        value = value.checked_add(1)?;
    }
    if value >= 10i128.checked_pow(u32::from(precision))? {
        return None;
    }
    Some(if neg { -value } else { value })
}

#[cfg(test)]
mod tests {
    use super::parse_decimal;
    use super::provenance::ErrorKind;

    #[test]
    fn error_kinds_have_distinct_names_that_parse_back() {
        let names: std::collections::BTreeSet<&str> =
            ErrorKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(names.len(), ErrorKind::ALL.len());
        for kind in ErrorKind::ALL {
            assert_eq!(ErrorKind::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(ErrorKind::parse("Storage"), None);
    }

    #[test]
    fn decimals_parse_exactly() {
        assert_eq!(parse_decimal("12.34", 10, 2), Some(1234));
        assert_eq!(parse_decimal("-0.005", 10, 2), Some(-1));
        assert_eq!(parse_decimal("0.004", 10, 2), Some(0));
        assert_eq!(parse_decimal("1e3", 10, 2), Some(100_000));
        assert_eq!(parse_decimal("1.5E-1", 10, 2), Some(15));
        assert_eq!(parse_decimal("100", 3, 1), None);
        assert_eq!(parse_decimal("99.9", 3, 1), Some(999));
        assert_eq!(parse_decimal("7", 5, 0), Some(7));
        assert_eq!(parse_decimal("0.0001", 5, 2), Some(0));
        assert_eq!(parse_decimal("1e2147483647", 38, 2), None);
        assert_eq!(parse_decimal("1e-2147483648", 38, 2), Some(0));
    }
}
