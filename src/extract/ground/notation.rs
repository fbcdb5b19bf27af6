//! How values are printed: numbers in the common decimal notations, dates in the usual orders and spellings,
//! currency codes as their symbols. Each function turns a value as the answer (or a label file) holds it into
//! what to look for on the page.

use chrono::{Datelike, NaiveDate};

/// A decimal as comparable text: no sign, no leading zeros before the point, no trailing zeros after it, no point
/// when there is no fraction (`"0012.50"` -> `"12.5"`, `"-3.00"` -> `"3"`). None when `text` is not a number.
pub fn canonical_number(text: &str) -> Option<String> {
    let t = text.trim();
    let t = t.strip_prefix(['-', '+']).unwrap_or(t);
    // Exponent forms are not what a page prints; the answer's grammar writes plain decimals.
    if t.is_empty() || !t.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return None;
    }
    let (int, frac) = t.split_once('.').unwrap_or((t, ""));
    if frac.contains('.') || (int.is_empty() && frac.is_empty()) {
        return None;
    }
    let int = int.trim_start_matches('0');
    let frac = frac.trim_end_matches('0');
    let int = if int.is_empty() { "0" } else { int };
    Some(if frac.is_empty() {
        int.to_string()
    } else {
        format!("{int}.{frac}")
    })
}

/// The numbers a printed token of digits and separators can stand for, canonical ([`canonical_number`]):
/// `1,234.50` (point decimal, comma/apostrophe/space groups), `1.234,50` (comma decimal, point/space groups),
/// plain digits. A token whose groups do not fit any notation gives nothing.
pub fn readings(token: &str) -> Vec<String> {
    let mut groups: Vec<&str> = Vec::new();
    let mut seps: Vec<char> = Vec::new();
    let mut start = 0;
    for (i, c) in token.char_indices() {
        if !c.is_ascii_digit() {
            groups.push(&token[start..i]);
            seps.push(c);
            start = i + c.len_utf8();
        }
    }
    groups.push(&token[start..]);
    // "03", "0042": an identifier's digits (an invoice or part number), not an amount.
    if groups.iter().any(|g| g.is_empty()) || (groups[0].len() > 1 && groups[0].starts_with('0')) {
        return Vec::new();
    }
    let mut out = Vec::new();
    let grouped = |gs: &[&str]| gs.iter().skip(1).all(|g| g.len() == 3) && gs[0].len() <= 3;
    let same = |ss: &[char]| ss.windows(2).all(|w| w[0] == w[1]);
    if seps.is_empty() {
        out.extend(canonical_number(token));
        return out;
    }
    // Every separator groups thousands: an integer.
    if grouped(&groups) && same(&seps) {
        out.extend(canonical_number(&groups.concat()));
    }
    // The last separator is the decimal mark, the others group thousands with another character.
    let (last, rest) = (seps[seps.len() - 1], &seps[..seps.len() - 1]);
    let int_groups = &groups[..groups.len() - 1];
    if matches!(last, '.' | ',')
        && rest.iter().all(|&s| s != last)
        && same(rest)
        && (rest.is_empty() || grouped(int_groups))
    {
        let text = format!("{}.{}", int_groups.concat(), groups[groups.len() - 1]);
        out.extend(canonical_number(&text));
    }
    out.dedup();
    out
}

/// True for the characters that may sit between digit groups of one printed number.
pub fn is_number_separator(c: char) -> bool {
    matches!(
        c,
        '.' | ',' | '\'' | '\u{2019}' | ' ' | '\u{a0}' | '\u{202f}' | '\u{2009}'
    )
}

const MONTHS: [&str; 12] = [
    "january",
    "february",
    "march",
    "april",
    "may",
    "june",
    "july",
    "august",
    "september",
    "october",
    "november",
    "december",
];

/// The ways a page prints `date`, folded as the page text is (lowercase, no spaces): ISO; day-first and
/// month-first with `/`, `.` or `-`, two- or four-digit years, with or without leading zeros; the month spelled
/// in full or in three letters, day first or month first.
pub fn date_forms(date: NaiveDate) -> Vec<String> {
    let (y, m, d) = (date.year(), date.month(), date.day());
    let yy = format!("{:02}", y.rem_euclid(100));
    let mut out = vec![
        format!("{y:04}-{m:02}-{d:02}"),
        format!("{y:04}/{m:02}/{d:02}"),
    ];
    for sep in ['/', '.', '-'] {
        for (dd, mm) in [
            (format!("{d:02}"), format!("{m:02}")),
            (d.to_string(), m.to_string()),
        ] {
            for year in [y.to_string(), yy.clone()] {
                out.push(format!("{dd}{sep}{mm}{sep}{year}"));
                out.push(format!("{mm}{sep}{dd}{sep}{year}"));
            }
        }
    }
    let full = MONTHS[(m - 1) as usize];
    for month in [full, &full[..3]] {
        for day in [d.to_string(), format!("{d:02}")] {
            out.push(format!("{day}{month}{y}"));
            out.push(format!("{day}{month},{y}"));
            out.push(format!("{day}.{month}{y}"));
            out.push(format!("{day}-{month}-{y}"));
            out.push(format!("{day}-{month}-{yy}"));
            out.push(format!("{month}{day},{y}"));
            out.push(format!("{month}{day}{y}"));
        }
    }
    out.sort();
    out.dedup();
    out
}

/// The symbols a currency code is printed as (the code itself is looked for first).
pub fn currency_symbols(code: &str) -> &'static [&'static str] {
    match code.to_ascii_uppercase().as_str() {
        "EUR" => &["€"],
        "USD" => &["us$", "$"],
        "GBP" => &["£"],
        "JPY" => &["¥", "円"],
        "CNY" => &["¥", "元"],
        "CAD" => &["ca$", "c$", "$"],
        "AUD" => &["a$", "au$", "$"],
        "CHF" => &["fr."],
        "INR" => &["₹", "rs."],
        "KRW" => &["₩"],
        "RUB" => &["₽"],
        "PLN" => &["zł"],
        "SEK" | "NOK" | "DKK" => &["kr"],
        "BRL" => &["r$"],
        "MXN" => &["mx$", "$"],
        "TRY" => &["₺"],
        "ILS" => &["₪"],
        "VND" => &["₫"],
        "THB" => &["฿"],
        "MYR" => &["rm"],
        "NGN" => &["₦"],
        _ => &[],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_in_every_common_notation() {
        let one = |t: &str| readings(t);
        assert_eq!(one("1,234.50"), vec!["1234.5"]);
        assert_eq!(one("1.234,50"), vec!["1234.5"]);
        assert_eq!(one("1 234,50"), vec!["1234.5"]);
        assert_eq!(one("1'234.50"), vec!["1234.5"]);
        assert_eq!(one("1234.5"), vec!["1234.5"]);
        assert_eq!(one("0.00"), vec!["0"]);
        // Ambiguous on its face: a thousands group or a decimal with three places.
        assert_eq!(one("1,234"), vec!["1234", "1.234"]);
        assert!(one("1.2.3").is_empty(), "two decimal marks");
        assert!(one("12,34,56").is_empty());
        assert!(
            one("03").is_empty() && one("0042").is_empty(),
            "identifiers"
        );
        assert_eq!(canonical_number("-004.100"), Some("4.1".into()));
        assert_eq!(canonical_number("12"), Some("12".into()));
        assert_eq!(canonical_number("1e5"), None);
    }

    #[test]
    fn dates_have_their_printed_forms() {
        let forms = date_forms(NaiveDate::from_ymd_opt(2024, 3, 7).unwrap());
        for f in [
            "2024-03-07",
            "07.03.2024",
            "7/3/2024",
            "03/07/2024",
            "07/03/24",
            "7march2024",
            "mar7,2024",
            "07-mar-24",
        ] {
            assert!(forms.contains(&f.to_string()), "{f} missing");
        }
    }
}
