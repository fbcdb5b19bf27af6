//! `pixtract eval --grounding`: how grounding relates to accuracy, per field.
//!
//! Two views. The predictions' own `_grounded` flags, set against the labels: how often a value the page prints
//! (grounded) is right, and how often one it does not print is; so grounding can be weighed against confidence as
//! a reason to review. And the labels themselves located in their documents' text layers (the documents re-read
//! from each prediction row's `source_uri`): the share of labelled values a digital page prints where the locator
//! finds them, and, when the labels say where each value is drawn (`_locations`), the share of boxes found there.

use std::collections::BTreeMap;

use super::labels::{DrawnAt, Labels};
use super::normalise::{FieldKind, normalise};
use super::report::{GroundingScore, Outcome, Report};
use super::{EvalError, FieldMap, LabelSet, Predictions};
use crate::extract::ground::{Found, Lookup, ValueKind, locate_group};
use crate::pipeline::pages::read_document;
use crate::raster::RasterOptions;

/// The predictions' `_grounded` against the labels, per scalar field of `report`.
pub fn of_predictions(
    report: &Report,
    predictions: &Predictions,
) -> BTreeMap<String, GroundingScore> {
    let mut out: BTreeMap<String, GroundingScore> = BTreeMap::new();
    let mut right: BTreeMap<(String, bool), (usize, usize)> = BTreeMap::new();
    for o in &report.outcomes {
        if o.predicted.is_none() {
            continue;
        }
        let score = out
            .entry(o.field.clone())
            .or_insert_with(|| GroundingScore {
                field: o.field.clone(),
                ..Default::default()
            });
        let grounded = predictions
            .get(&o.document)
            .and_then(|p| p.grounded.get(&o.field).copied().flatten());
        match grounded {
            Some(true) => score.grounded += 1,
            Some(false) => score.ungrounded += 1,
            None => score.unknown += 1,
        }
        if let (Some(g), Outcome::Correct | Outcome::Wrong) = (grounded, o.outcome) {
            let tally = right.entry((o.field.clone(), g)).or_default();
            tally.1 += 1;
            tally.0 += usize::from(o.outcome == Outcome::Correct);
        }
    }
    for ((field, grounded), (correct, all)) in right {
        if let Some(score) = out.get_mut(&field) {
            let share = Some(correct as f64 / all.max(1) as f64);
            if grounded {
                score.correct_when_grounded = share;
            } else {
                score.correct_when_ungrounded = share;
            }
        }
    }
    out
}

fn value_kind(kind: FieldKind, key: &str) -> ValueKind {
    match kind {
        FieldKind::Amount => ValueKind::Number,
        FieldKind::Date => ValueKind::Date,
        FieldKind::Text if key.to_ascii_lowercase().contains("currency") => ValueKind::Currency,
        FieldKind::Text => ValueKind::Text,
    }
}

/// The labelled value as the locator looks for it: amounts and dates canonical, text as labelled.
fn canonical(value: &str, kind: FieldKind) -> Option<String> {
    match kind {
        FieldKind::Text => Some(value.to_string()).filter(|v| !v.trim().is_empty()),
        _ => normalise(value, kind, false),
    }
}

/// One object of a label to locate together: (label path, field name for the figures, value, kind).
type Group = Vec<(String, String, String, ValueKind)>;

/// The label's values in locating groups: its mapped scalars together, each line item on its own.
fn groups_of(
    labels: &Labels,
    lists: Option<&BTreeMap<String, Vec<Labels>>>,
    mapping: &[FieldMap],
    predictions: &Predictions,
) -> Vec<(Group, bool)> {
    let mut out = Vec::new();
    let mut top = Group::new();
    for map in mapping {
        if let Some(kinds) = predictions.list_kinds_of(&map.field) {
            let Some(items) = lists.and_then(|l| l.get(&map.label)) else {
                continue;
            };
            for (i, item) in items.iter().enumerate() {
                let group: Group = item
                    .iter()
                    .filter_map(|(k, v)| {
                        let kind = *kinds.get(k)?;
                        Some((
                            format!("{}[{i}].{k}", map.label),
                            format!("{}.{k}", map.field),
                            canonical(v, kind)?,
                            value_kind(kind, k),
                        ))
                    })
                    .collect();
                out.push((group, true));
            }
        } else if let (Some(kind), Some(v)) =
            (predictions.kind_of(&map.field), labels.get(&map.label))
            && let Some(value) = canonical(v, kind)
        {
            top.push((
                map.label.clone(),
                map.field.clone(),
                value,
                value_kind(kind, &map.field),
            ));
        }
    }
    out.insert(0, (top, false));
    out
}

fn holds(found: &Found, drawn: &DrawnAt) -> bool {
    let Found::At { location, .. } = found else {
        return false;
    };
    let Some(b) = location.bbox else {
        return false;
    };
    let (cx, cy) = (
        (drawn.bbox[0] + drawn.bbox[2]) / 2.0,
        (drawn.bbox[1] + drawn.bbox[3]) / 2.0,
    );
    location.page == drawn.page
        && b[0] as f64 <= cx
        && cx <= b[2] as f64
        && b[1] as f64 <= cy
        && cy <= b[3] as f64
}

/// Locates every labelled value in its document's text layer (documents re-read from the prediction rows'
/// `source_uri`; scans and documents that cannot be read are skipped and counted), adding the figures to
/// `scores`. Returns (documents searched, documents without a text layer or unreadable).
pub async fn locate_labels(
    labels: &LabelSet,
    predictions: &Predictions,
    mapping: &[FieldMap],
    scores: &mut BTreeMap<String, GroundingScore>,
) -> Result<(usize, usize), EvalError> {
    let (mut searched, mut skipped) = (0, 0);
    for (doc, label) in &labels.documents {
        let Some(prediction) = predictions.get(doc) else {
            continue;
        };
        let opts = RasterOptions {
            max_side: 256,
            text_layer: true,
            ..Default::default()
        };
        let read = read_document(&prediction.source_uri, opts)
            .await
            .map_err(|e| {
                EvalError::Input(format!(
                    "{}: {}",
                    prediction.source_uri,
                    crate::error::chain(&e)
                ))
            })?;
        let Some(read) = read else {
            skipped += 1;
            continue;
        };
        let pages = read.text_pages();
        if pages.is_empty() {
            skipped += 1;
            continue;
        }
        searched += 1;
        let drawn = labels.locations.get(doc);
        for (group, in_list) in groups_of(label, labels.lists.get(doc), mapping, predictions) {
            let lookups: Vec<Lookup> = group
                .iter()
                .map(|(_, field, value, kind)| {
                    let name = field.rsplit('.').next().unwrap_or(field);
                    Lookup::new(value, *kind, name, None)
                })
                .collect();
            let found = locate_group(&pages, &lookups, in_list);
            for ((path, field, _, _), f) in group.iter().zip(found) {
                let score = scores
                    .entry(field.clone())
                    .or_insert_with(|| GroundingScore {
                        field: field.clone(),
                        ..Default::default()
                    });
                score.labelled += 1;
                match &f {
                    Found::At { .. } => score.found += 1,
                    Found::Ambiguous { .. } => score.ambiguous += 1,
                    Found::NotFound => score.not_found += 1,
                }
                if let (Found::At { .. }, Some(at)) = (&f, drawn.and_then(|d| d.get(path))) {
                    score.boxes_checked += 1;
                    score.boxes_right += usize::from(holds(&f, at));
                }
            }
        }
    }
    Ok((searched, skipped))
}

/// The figures as a table.
pub fn table(scores: &BTreeMap<String, GroundingScore>) -> String {
    let pct = |a: usize, b: usize| {
        if b == 0 {
            "-".to_string()
        } else {
            format!("{:.1}%", 100.0 * a as f64 / b as f64)
        }
    };
    let share = |s: Option<f64>| s.map_or("-".to_string(), |v| format!("{:.1}%", 100.0 * v));
    let mut out = format!(
        "{:<24} {:>8} {:>8} {:>8} {:>9} {:>9} | {:>8} {:>8} {:>8} {:>8} {:>8}\n",
        "field",
        "grounded",
        "ungrnd",
        "unknown",
        "right|g",
        "right|ung",
        "labelled",
        "found",
        "ambig",
        "missing",
        "box ok"
    );
    let mut total = GroundingScore::default();
    for s in scores.values() {
        out.push_str(&format!(
            "{:<24} {:>8} {:>8} {:>8} {:>9} {:>9} | {:>8} {:>8} {:>8} {:>8} {:>8}\n",
            s.field,
            s.grounded,
            s.ungrounded,
            s.unknown,
            share(s.correct_when_grounded),
            share(s.correct_when_ungrounded),
            s.labelled,
            pct(s.found, s.labelled),
            s.ambiguous,
            s.not_found,
            pct(s.boxes_right, s.boxes_checked),
        ));
        total.grounded += s.grounded;
        total.ungrounded += s.ungrounded;
        total.unknown += s.unknown;
        total.labelled += s.labelled;
        total.found += s.found;
        total.ambiguous += s.ambiguous;
        total.not_found += s.not_found;
        total.boxes_checked += s.boxes_checked;
        total.boxes_right += s.boxes_right;
    }
    out.push_str(&format!(
        "{:<24} {:>8} {:>8} {:>8} {:>9} {:>9} | {:>8} {:>8} {:>8} {:>8} {:>8}\n",
        "all",
        total.grounded,
        total.ungrounded,
        total.unknown,
        "",
        "",
        total.labelled,
        pct(total.found, total.labelled),
        total.ambiguous,
        total.not_found,
        format!("{} / {}", total.boxes_right, total.boxes_checked),
    ));
    out
}
