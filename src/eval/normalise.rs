//! Values made comparable per field type: amounts as decimals (currency signs and thousands separators
//! dropped), dates from the label's own format to ISO, text case- and whitespace-folded.

use chrono::{Datelike, NaiveDate};

/// How a field's values are compared, from the prediction column's Arrow type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldKind {
    Text,
    Amount,
    Date,
}

/// Label date formats seen in receipt and invoice datasets (SROIE: `25/12/2018`, `14-03-18`, `05 MAR 2018`,
/// and once `12/28/2017`), day-first before month-first: a date both readings allow is read day-first.
const DATE_FORMATS: &[&str] = &[
    "%Y-%m-%d",
    "%d/%m/%Y",
    "%d-%m-%Y",
    "%d.%m.%Y",
    "%d/%m/%y",
    "%d-%m-%y",
    "%d.%m.%y",
    "%d %b %Y",
    "%d %B %Y",
    "%d %b %y",
    "%b %d, %Y",
    "%B %d, %Y",
    "%d-%b-%Y",
    "%d-%b-%y",
    "%Y/%m/%d",
    "%m/%d/%Y",
    "%m-%d-%Y",
];

/// The comparable form of `value`, or None when it is empty. A value that does not parse as its kind is kept as
/// folded text, so it can still equal (or differ from) the other side.
pub fn normalise(value: &str, kind: FieldKind, exact: bool) -> Option<String> {
    let trimmed = value.trim();
    if trimmed.is_empty() {
        return None;
    }
    let parsed = match kind {
        FieldKind::Amount => amount(trimmed),
        FieldKind::Date => date(trimmed),
        FieldKind::Text => None,
    };
    Some(parsed.unwrap_or_else(|| {
        if exact {
            trimmed.to_string()
        } else {
            trimmed
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
                .to_uppercase()
        }
    }))
}

fn amount(text: &str) -> Option<String> {
    let kept: String = text
        .chars()
        .filter(|c| c.is_ascii_digit() || matches!(c, '.' | ',' | '-'))
        .collect();
    // "1,234.50" -> thousands commas; "12,50" -> a decimal comma.
    let number = match (kept.contains(','), kept.contains('.')) {
        (true, true) => kept.replace(',', ""),
        (true, false) if kept.rsplit(',').next().is_some_and(|d| d.len() == 2) => {
            kept.replace(',', ".")
        }
        (true, false) => kept.replace(',', ""),
        _ => kept,
    };
    let value: f64 = number.parse().ok()?;
    value.is_finite().then(|| format!("{value:.2}"))
}

fn date(text: &str) -> Option<String> {
    // chrono's %b wants "Mar", not "MAR".
    let titled: String = text
        .split(' ')
        .map(|w| {
            let mut chars = w.chars();
            match chars.next() {
                Some(first) if w.chars().all(|c| c.is_ascii_alphabetic()) => {
                    first.to_ascii_uppercase().to_string() + &chars.as_str().to_ascii_lowercase()
                }
                _ => w.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join(" ");
    DATE_FORMATS
        .iter()
        .filter_map(|f| NaiveDate::parse_from_str(&titled, f).ok())
        // chrono's %Y also takes "18": a two-digit year is %y's to read.
        .find(|d| d.year() >= 1000)
        .map(|d| d.format("%Y-%m-%d").to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_dates_and_text_normalise() {
        let a = |s| normalise(s, FieldKind::Amount, false);
        assert_eq!(a("$8.20"), Some("8.20".into()));
        assert_eq!(a("RM 1,234.5"), Some("1234.50".into()));
        assert_eq!(a("12,50"), Some("12.50".into()));
        assert_eq!(a("9"), Some("9.00".into()));
        assert_eq!(a("  "), None);
        let d = |s| normalise(s, FieldKind::Date, false);
        assert_eq!(d("25/12/2018"), Some("2018-12-25".into()));
        assert_eq!(d("14-03-18"), Some("2018-03-14".into()));
        assert_eq!(d("05 MAR 2018"), Some("2018-03-05".into()));
        assert_eq!(d("2018-03-05"), Some("2018-03-05".into()));
        assert_eq!(d("12/28/2017"), Some("2017-12-28".into()));
        assert_eq!(d("not a date"), Some("NOT A DATE".into()));
        assert_eq!(
            normalise(" Book  Ta .K\n", FieldKind::Text, false),
            Some("BOOK TA .K".into())
        );
        assert_eq!(
            normalise(" Book  Ta .K\n", FieldKind::Text, true),
            Some("Book  Ta .K".into())
        );
    }
}
