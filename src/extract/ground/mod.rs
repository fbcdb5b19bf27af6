//! Grounding: each extracted value looked up in the text layer of the pages its row covers, so a value the model
//! read can be checked against what the page prints, without trusting the model.
//!
//! A value is searched by its type: numbers in every common notation ([`notation::readings`]), dates in the
//! usual orders and spellings ([`notation::date_forms`]), currency codes as the code or a symbol, strings case-
//! and space-folded, then with a small edit distance, then line by line (addresses). A value printed in several
//! places is resolved by its context: for a line item, the line its other values sit on; for a header value, the
//! nearest label word of its field (name or title: "Total", "Invoice no.") to its left or above. When neither
//! decides, the value is *ambiguous*: it is on the page (grounded) but no place is picked, never one at random.
//!
//! Pages without a text layer (scans) ground nothing: `_grounded` is null there, not false.

pub mod notation;
mod page;

pub use page::{PageText, Span, fold};

use chrono::NaiveDate;

use super::answer::{Node, NodeValue};
use super::schema::{FieldDef, FieldType};
use crate::raster::text::Location;

/// How a value is looked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueKind {
    Number,
    Date,
    Currency,
    Text,
}

impl ValueKind {
    /// The kind a value given as text looks like (for values without a schema: `pixtract locate`).
    pub fn guess(value: &str) -> ValueKind {
        let v = value.trim();
        if notation::canonical_number(v).is_some() {
            ValueKind::Number
        } else if parse_date(v).is_some() {
            ValueKind::Date
        } else if v.len() == 3
            && v.chars().all(|c| c.is_ascii_uppercase())
            && !notation::currency_symbols(v).is_empty()
        {
            ValueKind::Currency
        } else {
            ValueKind::Text
        }
    }

    /// The kind of a schema field's values; None for fields whose values are not searched (booleans, objects,
    /// lists).
    pub fn of_field(field: &FieldDef) -> Option<ValueKind> {
        let currency = field.name.to_ascii_lowercase().contains("currency");
        match &field.ty {
            FieldType::Int64 | FieldType::Float64 | FieldType::Decimal { .. } => {
                Some(ValueKind::Number)
            }
            FieldType::Date32 | FieldType::TimestampUs => Some(ValueKind::Date),
            FieldType::Utf8 if currency => Some(ValueKind::Currency),
            FieldType::Utf8 => Some(ValueKind::Text),
            FieldType::Boolean | FieldType::Struct(_) | FieldType::List(_) => None,
        }
    }
}

/// What the search of one value found.
#[derive(Debug, Clone, PartialEq)]
pub enum Found {
    /// One place: where, and the page's text there.
    At {
        location: Location,
        text: String,
    },
    /// Printed in `places` places and no context says which is meant.
    Ambiguous {
        places: usize,
    },
    NotFound,
}

impl Found {
    /// `_grounded`: the value is on the page (in one place or several).
    pub fn grounded(&self) -> bool {
        !matches!(self, Found::NotFound)
    }
}

/// A value to look for.
#[derive(Debug, Clone)]
pub struct Lookup<'a> {
    pub value: &'a str,
    pub kind: ValueKind,
    /// Folded label words of its field ("invoice", "total"), for choosing among several places.
    pub labels: Vec<Vec<char>>,
}

impl<'a> Lookup<'a> {
    /// Label words from a field's name and title (`invoice_date` -> "invoice", "date").
    pub fn new(value: &'a str, kind: ValueKind, name: &str, title: Option<&str>) -> Lookup<'a> {
        const GENERIC: [&str; 6] = ["the", "and", "of", "per", "name", "items"];
        let mut labels: Vec<Vec<char>> = name
            .split(|c: char| !c.is_alphanumeric())
            .chain(title.unwrap_or("").split(|c: char| !c.is_alphanumeric()))
            .filter(|w| w.chars().count() >= 3 && !GENERIC.contains(&w.to_lowercase().as_str()))
            .map(fold)
            .collect();
        labels.sort();
        labels.dedup();
        Lookup {
            value,
            kind,
            labels,
        }
    }
}

/// Where a value could be: (index into the pages, span).
type Candidate = (usize, Span);

fn parse_date(v: &str) -> Option<NaiveDate> {
    NaiveDate::parse_from_str(v.get(..10)?, "%Y-%m-%d").ok()
}

/// Every place the value is printed, by its kind.
fn candidates(pages: &[PageText], lookup: &Lookup) -> Vec<Candidate> {
    let value = lookup.value.trim();
    let on_pages = |f: &dyn Fn(&PageText) -> Vec<Span>| -> Vec<Candidate> {
        pages
            .iter()
            .enumerate()
            .flat_map(|(p, page)| f(page).into_iter().map(move |s| (p, s)))
            .collect()
    };
    let mut out = match lookup.kind {
        ValueKind::Number => match notation::canonical_number(value) {
            Some(want) => {
                let mut found = on_pages(&|page| {
                    page.number_tokens()
                        .into_iter()
                        .filter(|(token, _)| notation::readings(token).contains(&want))
                        .map(|(_, span)| span)
                        .collect()
                });
                // A long whole number is an account, IBAN part or order number more often than an amount: the
                // page may group its digits its own way ("630 500 00" for 63050000).
                let digits: Vec<char> = value.chars().collect();
                if found.is_empty() && digits.len() >= 6 && digits.iter().all(char::is_ascii_digit)
                {
                    found = on_pages(&|page| page.find(&digits, true));
                }
                found
            }
            None => text_candidates(pages, value),
        },
        ValueKind::Date => match parse_date(value) {
            Some(date) => {
                let forms: Vec<Vec<char>> = notation::date_forms(date)
                    .iter()
                    .map(|f| f.chars().collect())
                    .collect();
                on_pages(&|page| forms.iter().flat_map(|f| page.find(f, true)).collect())
            }
            None => text_candidates(pages, value),
        },
        ValueKind::Currency => {
            let code = on_pages(&|page| page.find(&fold(value), true));
            if code.is_empty() {
                on_pages(&|page| {
                    notation::currency_symbols(value)
                        .iter()
                        .flat_map(|s| page.find(&fold(s), s.chars().any(char::is_alphabetic)))
                        .collect()
                })
            } else {
                code
            }
        }
        ValueKind::Text => text_candidates(pages, value),
    };
    out.sort_by_key(|(p, s)| (*p, s.first, s.last));
    out.dedup();
    // A span inside another (a date form matching part of a longer one) is the same place.
    let all = out.clone();
    out.retain(|(p, s)| {
        !all.iter()
            .any(|(q, t)| q == p && t != s && t.first <= s.first && s.last <= t.last)
    });
    out
}

/// A string on any of the pages: exactly (folded, any spacing); else, on no page exactly, the places within the
/// least edit distance allowed; else line by line.
fn text_candidates(pages: &[PageText], value: &str) -> Vec<Candidate> {
    let needle = fold(value);
    if needle.is_empty() {
        return Vec::new();
    }
    let whole = needle.first().is_some_and(|c| c.is_alphanumeric())
        && needle.last().is_some_and(|c| c.is_alphanumeric());
    let exact: Vec<Candidate> = pages
        .iter()
        .enumerate()
        .flat_map(|(p, page)| page.find(&needle, whole).into_iter().map(move |s| (p, s)))
        .collect();
    if !exact.is_empty() {
        return exact;
    }
    // One edit per 10 characters: a misread letter in a name, not another name. Never in a value with digits
    // (an IBAN, an invoice number): one digit off is another value.
    let n = needle.len();
    if (10..=120).contains(&n) && !needle.iter().any(char::is_ascii_digit) {
        let max_edits = n / 10;
        let fuzzy: Vec<(Candidate, usize)> = pages
            .iter()
            .enumerate()
            .flat_map(|(p, page)| {
                page.find_fuzzy(&needle, max_edits)
                    .into_iter()
                    .filter(move |(s, _)| !whole || page.stands_alone(*s))
                    .map(move |(s, d)| ((p, s), d))
            })
            .collect();
        if let Some(best) = fuzzy.iter().map(|(_, d)| *d).min() {
            return fuzzy
                .into_iter()
                .filter(|(_, d)| *d == best)
                .map(|(c, _)| c)
                .collect();
        }
    }
    pages
        .iter()
        .enumerate()
        .filter_map(|(p, page)| parts_span(page, value).map(|s| (p, s)))
        .collect()
}

/// A multi-line value (an address) printed line by line: every part found on the page, each part's occurrence
/// nearest the first's; the span from the first part to the last.
fn parts_span(page: &PageText, value: &str) -> Option<Span> {
    let parts: Vec<Vec<char>> = value
        .split(['\n', ',', ';'])
        .map(fold)
        .filter(|p| p.len() >= 2)
        .collect();
    if parts.len() < 2 {
        return None;
    }
    let mut chosen: Vec<Span> = Vec::new();
    for part in &parts {
        let found = page.find(part, true);
        let pick = match chosen.first() {
            None => found.first().copied(),
            Some(anchor) => found
                .iter()
                .min_by_key(|s| s.first.abs_diff(anchor.first))
                .copied(),
        }?;
        chosen.push(pick);
    }
    let first = chosen.iter().map(|s| s.first).min()?;
    let last = chosen.iter().map(|s| s.last).max()?;
    Some(Span { first, last })
}

/// Looks a value up on `pages`; with `anchors` (where the other values of its object are), a value printed in
/// several places may be decided by the line it shares with one of them; `anchors_first` tries them before the
/// label words (line items: a column header is above every row, so its label decides nothing).
pub fn locate(
    pages: &[PageText],
    lookup: &Lookup,
    anchors: &[Location],
    anchors_first: bool,
) -> Found {
    let found = candidates(pages, lookup);
    let at = |(p, span): Candidate| -> Option<Found> {
        let page = &pages[p];
        Some(Found::At {
            location: page.location(span)?,
            text: page.text_of(span),
        })
    };
    match found.len() {
        0 => return Found::NotFound,
        1 => return at(found[0]).unwrap_or(Found::Ambiguous { places: 1 }),
        _ => {}
    }
    let boxes: Vec<Option<Location>> = found
        .iter()
        .map(|&(p, span)| pages[p].location(span))
        .collect();
    if let Some(first) = running_header(pages, &found, &boxes) {
        return at(found[first]).unwrap_or(Found::Ambiguous {
            places: found.len(),
        });
    }
    let all: Vec<usize> = (0..found.len()).collect();
    // A place another value of the item already holds is not this value's.
    let on_lines: Vec<usize> = on_anchor_lines(&boxes, anchors)
        .into_iter()
        .filter(|&i| !anchors.iter().any(|a| Some(*a) == boxes[i]))
        .collect();
    let by_label = |among: &[usize]| nearest_label(pages, &found, &boxes, &lookup.labels, among);
    let pick = if anchors_first && anchors.is_empty() {
        // Wait for the row's other values: the nearest header alone would pick the first row.
        None
    } else if anchors_first && !on_lines.is_empty() {
        // A line item's value: on its row; among several there, the column whose header names the field.
        if on_lines.len() == 1 {
            Some(on_lines[0])
        } else {
            by_label(&on_lines)
        }
    } else {
        by_label(&all)
    };
    match pick {
        Some(i) => at(found[i]).unwrap_or(Found::Ambiguous {
            places: found.len(),
        }),
        None => Found::Ambiguous {
            places: found.len(),
        },
    }
}

/// Locates the values of one object together: each on its own first, then those printed in several places again,
/// with the places of the others as anchors (`in_list`: a line item, whose row decides before its labels).
pub fn locate_group(pages: &[PageText], lookups: &[Lookup], in_list: bool) -> Vec<Found> {
    let mut found: Vec<Found> = lookups
        .iter()
        .map(|l| locate(pages, l, &[], in_list))
        .collect();
    // Header values are decided by their labels alone: another field's place says nothing about theirs (two
    // fields with the same date would take each other's place).
    if !in_list {
        return found;
    }
    let mut anchors: Vec<Location> = found
        .iter()
        .filter_map(|f| match f {
            Found::At { location, .. } => Some(*location),
            _ => None,
        })
        .collect();
    if anchors.is_empty() {
        anchors.extend(shared_line(pages, lookups));
    }
    if !anchors.is_empty() {
        for (f, l) in found.iter_mut().zip(lookups) {
            if matches!(f, Found::Ambiguous { .. }) {
                *f = locate(pages, l, &anchors, in_list);
            }
        }
    }
    found
}

/// A line item none of whose values is printed only once: the one line where more of its values are printed
/// than on any other (at least two), as an anchor spanning the line.
fn shared_line(pages: &[PageText], lookups: &[Lookup]) -> Option<Location> {
    let places: Vec<Vec<Location>> = lookups
        .iter()
        .map(|l| {
            candidates(pages, l)
                .into_iter()
                .filter_map(|(p, span)| pages[p].location(span))
                .collect()
        })
        .collect();
    let mut best: Vec<(usize, Location)> = Vec::new();
    for (i, own) in places.iter().enumerate() {
        for place in own {
            let Some(b) = place.bbox else { continue };
            let others = places
                .iter()
                .enumerate()
                .filter(|(j, theirs)| {
                    *j != i
                        && theirs.iter().any(|t| {
                            t.page == place.page && t.bbox.is_some_and(|tb| same_line(&tb, &b))
                        })
                })
                .count();
            best.push((others, *place));
        }
    }
    let top = best.iter().map(|(n, _)| *n).max().filter(|n| *n >= 1)?;
    let lines: Vec<&Location> = best
        .iter()
        .filter(|(n, _)| *n == top)
        .map(|(_, l)| l)
        .collect();
    let first = lines[0];
    let fb = first.bbox?;
    // Every place with the top count must be on that one line, else two lines tie.
    let one_line = lines
        .iter()
        .all(|l| l.page == first.page && l.bbox.is_some_and(|b| same_line(&b, &fb)));
    one_line.then_some(Location {
        page: first.page,
        bbox: Some([0.0, fb[1], 1.0, fb[3]]),
    })
}

/// A value printed once per page at the same place with the same text (a header or footer repeated on every
/// page: the invoice number, the vendor): the first page's.
fn running_header(
    pages: &[PageText],
    found: &[Candidate],
    boxes: &[Option<Location>],
) -> Option<usize> {
    let first = boxes.first()?.as_ref()?.bbox?;
    let text = pages[found[0].0].text_of(found[0].1);
    let mut seen = std::collections::HashSet::new();
    for (i, (p, span)) in found.iter().enumerate() {
        let b = boxes[i]?.bbox?;
        let same_box = (0..4).all(|k| (b[k] - first[k]).abs() < 0.005);
        if !seen.insert(*p) || !same_box || pages[*p].text_of(*span) != text {
            return None;
        }
    }
    Some(0)
}

/// Vertical overlap of two boxes, as a share of the shorter one's height.
fn same_line(a: &[f32; 4], b: &[f32; 4]) -> bool {
    let overlap = a[3].min(b[3]) - a[1].max(b[1]);
    let shorter = (a[3] - a[1]).min(b[3] - b[1]).max(1e-6);
    overlap / shorter > 0.5
}

/// The candidates on the line of an anchor (the same page).
fn on_anchor_lines(boxes: &[Option<Location>], anchors: &[Location]) -> Vec<usize> {
    boxes
        .iter()
        .enumerate()
        .filter(|(_, b)| {
            b.is_some_and(|b| {
                anchors.iter().any(|a| {
                    a.page == b.page
                        && matches!((a.bbox, b.bbox), (Some(x), Some(y)) if same_line(&x, &y))
                })
            })
        })
        .map(|(i, _)| i)
        .collect()
}

/// Of the candidates `among`, the one nearest a label word to its left on its line or above it (a column
/// header: page-relative distance, the vertical part counting double, plus the horizontal offset from the
/// header); chosen only when clearly nearer than the next.
fn nearest_label(
    pages: &[PageText],
    found: &[Candidate],
    boxes: &[Option<Location>],
    labels: &[Vec<char>],
    among: &[usize],
) -> Option<usize> {
    if labels.is_empty() {
        return None;
    }
    let mut label_boxes: Vec<Vec<[f32; 4]>> = vec![Vec::new(); pages.len()];
    for (p, page) in pages.iter().enumerate() {
        for word in labels {
            for span in page.find(word, true) {
                if let Some(Location { bbox: Some(b), .. }) = page.location(span) {
                    label_boxes[p].push(b);
                }
            }
        }
    }
    let distance = |i: usize| -> Option<f32> {
        let c = boxes[i]?.bbox?;
        label_boxes[found[i].0]
            .iter()
            .filter_map(|l| {
                if same_line(l, &c) && l[2] <= c[0] + 1e-3 {
                    Some(c[0] - l[2])
                } else if l[3] <= c[1] + 1e-3 && l[0] <= c[2] && c[0] <= l[2] + 0.3 {
                    let dx = (l[0] - c[0])
                        .abs()
                        .min((l[2] - c[2]).abs())
                        .min(((l[0] + l[2]) - (c[0] + c[2])).abs() / 2.0);
                    Some(2.0 * (c[1] - l[3]) + dx + 0.02)
                } else {
                    None
                }
            })
            .reduce(f32::min)
    };
    let mut scored: Vec<(f32, usize)> = among
        .iter()
        .copied()
        .filter_map(|i| distance(i).map(|d| (d, i)))
        .collect();
    scored.sort_by(|a, b| a.0.total_cmp(&b.0));
    match scored.as_slice() {
        [] => None,
        [(_, i)] => Some(*i),
        // Clearly nearer: half as far again, or 2% of the page nearer (columns under one header line).
        [(d1, i), (d2, _), ..] => (*d2 >= 1.5 * d1 + 0.005 || *d2 - *d1 >= 0.02).then_some(*i),
    }
}

/// The text a scalar node holds, as a page would print it; None for null, empty strings (nothing to look for:
/// the same as null), booleans and containers.
fn node_text(node: &Node) -> Option<&str> {
    match &node.value {
        NodeValue::String(s) if !s.trim().is_empty() => Some(s),
        NodeValue::Number(n) => Some(n),
        _ => None,
    }
}

/// Grounds every value of an answer object against `pages` (the text layers of the pages its row covers): sets
/// each node's `grounded` and, where one place was found, `location`. `complete` says every page of the row has
/// a text layer: a value not found where some page has none (a scan among digital pages) is unknown, not false.
/// Fields with `x-grounding: false` and values of kinds no page prints (booleans) stay unknown.
pub fn ground_object(node: &mut Node, fields: &[FieldDef], pages: &[PageText], complete: bool) {
    ground_members(node, fields, pages, complete, false);
}

fn ground_members(
    node: &mut Node,
    fields: &[FieldDef],
    pages: &[PageText],
    complete: bool,
    in_list: bool,
) {
    let NodeValue::Object(members) = &mut node.value else {
        return;
    };
    let mut at: Vec<usize> = Vec::new();
    let mut lookups: Vec<Lookup> = Vec::new();
    for (i, (name, value)) in members.iter().enumerate() {
        let Some(field) = fields.iter().find(|f| &f.name == name) else {
            continue;
        };
        let (Some(kind), Some(text)) = (ValueKind::of_field(field), node_text(value)) else {
            continue;
        };
        if !field.grounding || pages.is_empty() {
            continue;
        }
        at.push(i);
        lookups.push(Lookup::new(text, kind, &field.name, field.title.as_deref()));
    }
    let found = locate_group(pages, &lookups, in_list);
    let results: Vec<(usize, Found)> = at.into_iter().zip(found).collect();
    for (i, found) in results {
        let value = &mut members[i].1;
        match found {
            Found::At { location, .. } => {
                value.location = Some(location);
                value.grounded = Some(true);
            }
            Found::Ambiguous { .. } => value.grounded = Some(true),
            Found::NotFound => value.grounded = complete.then_some(false),
        }
    }
    // Nested objects and line items, each against the same pages.
    for (name, value) in members.iter_mut() {
        let Some(field) = fields.iter().find(|f| &f.name == name) else {
            continue;
        };
        match (&field.ty, &mut value.value) {
            (FieldType::Struct(children), NodeValue::Object(_)) => {
                ground_members(value, children, pages, complete, in_list)
            }
            (FieldType::List(item), NodeValue::Array(items)) => {
                if let FieldType::Struct(children) = &item.ty {
                    for it in items.iter_mut() {
                        ground_members(it, children, pages, complete, true);
                    }
                }
            }
            _ => {}
        }
    }
}

/// Every value of an answer gets `page` as its location's page where grounding left it without one (a row of
/// one page: the page a value came from is known even when its box is not).
pub fn set_page(node: &mut Node, page: u32) {
    match &mut node.value {
        NodeValue::Object(members) => members.iter_mut().for_each(|(_, n)| set_page(n, page)),
        NodeValue::Array(items) => items.iter_mut().for_each(|n| set_page(n, page)),
        NodeValue::Null => {}
        _ => {
            node.location.get_or_insert(Location { page, bbox: None });
        }
    }
}

#[cfg(test)]
mod tests;
