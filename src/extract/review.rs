//! Confidence thresholds: "a null value is better than a wrong value". A value whose confidence (the `min` of its
//! `_confidence` pair: its weakest token) is below the threshold set for its field is written as null, and the
//! field's path goes to the row's `_review` list, so a person knows what to check and nothing disappears silently.
//! The confidence itself stays in `_confidence`, which says why the value was withheld.
//!
//! Thresholds are keyed by field path without list indices: `total`, `merchant.name`, `items.total_price` (a member
//! of each line item), `tags` (each item of a list of scalars). `_review` names the value itself, indices included:
//! `items[2].total_price`. A value without a confidence cannot pass a threshold.

use std::collections::BTreeMap;

use super::ExtractError;
use super::answer::{Node, NodeValue};
use super::schema::{ExtractionSchema, FieldDef, FieldType};

/// Per-field confidence thresholds: a default for every scalar field and overrides by path; and whether a value
/// its pages' text layer does not hold is withheld too (`[extract] require_grounding`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReviewPolicy {
    default: Option<f32>,
    per_field: BTreeMap<String, f32>,
    pub require_grounding: bool,
}

/// Why a value was withheld: `_review_reasons`, in the order of `_review`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ReviewReason {
    /// Below its field's confidence threshold.
    LowConfidence,
    /// Not in the text layer of a page that has one (`require_grounding`).
    Ungrounded,
}

impl ReviewReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ReviewReason::LowConfidence => "low_confidence",
            ReviewReason::Ungrounded => "ungrounded",
        }
    }
}

/// A withheld value: its path (indices included: `items[2].total_price`) and why.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Flagged {
    pub path: String,
    pub reason: ReviewReason,
}

fn check_threshold(what: &str, value: f32) -> Result<f32, ExtractError> {
    if (0.0..=1.0).contains(&value) {
        Ok(value)
    } else {
        Err(ExtractError::Config(format!(
            "{what} = {value}: a confidence threshold lies between 0 and 1"
        )))
    }
}

/// Every scalar field's threshold key, in schema order (`items.total_price`, `tags`, ...).
fn scalar_paths(fields: &[FieldDef], prefix: &str, out: &mut Vec<String>) {
    for f in fields {
        let path = if prefix.is_empty() {
            f.name.clone()
        } else {
            format!("{prefix}.{}", f.name)
        };
        collect_type(&f.ty, &path, out);
    }
}

fn collect_type(ty: &FieldType, path: &str, out: &mut Vec<String>) {
    match ty {
        FieldType::Struct(children) => scalar_paths(children, path, out),
        FieldType::List(item) => collect_type(&item.ty, path, out),
        _ => out.push(path.to_string()),
    }
}

impl ReviewPolicy {
    /// `default` applies to every scalar field; `per_field` overrides it by path (checked against the schema: an
    /// unknown path is refused with the paths that exist). `fields` is the schema's top level (free-text: `text`).
    pub fn new(
        default: Option<f32>,
        per_field: BTreeMap<String, f32>,
        fields: &[FieldDef],
    ) -> Result<ReviewPolicy, ExtractError> {
        if let Some(d) = default {
            check_threshold("extract.min_confidence", d)?;
        }
        let mut known = Vec::new();
        scalar_paths(fields, "", &mut known);
        for (path, value) in &per_field {
            check_threshold(&format!("extract.min_confidence_fields.{path}"), *value)?;
            if !known.iter().any(|k| k == path) {
                return Err(ExtractError::Config(format!(
                    "extract.min_confidence_fields: {path:?} is not a scalar field of the schema; fields: {}",
                    known.join(", ")
                )));
            }
        }
        Ok(ReviewPolicy {
            default,
            per_field,
            require_grounding: false,
        })
    }

    /// [`ReviewPolicy::new`] over the extraction's fields: the schema's, or free text's one field `text`.
    pub fn for_schema(
        default: Option<f32>,
        per_field: BTreeMap<String, f32>,
        schema: Option<&ExtractionSchema>,
    ) -> Result<ReviewPolicy, ExtractError> {
        match schema {
            Some(s) => Self::new(default, per_field, &s.fields),
            None => Self::new(default, per_field, &super::schema::text_fields()),
        }
    }

    /// No threshold and no grounding requirement: values are written as they are.
    pub fn is_empty(&self) -> bool {
        self.default.is_none() && self.per_field.is_empty() && !self.require_grounding
    }

    fn threshold(&self, path: &str) -> Option<f32> {
        self.per_field.get(path).copied().or(self.default)
    }

    /// Nulls every value below its field's threshold, and with `require_grounding` every value found in no text
    /// layer (`grounded == false`); returns the values' paths (indices included) and why, in answer order.
    /// `fields` describes `node`'s members.
    pub fn apply(&self, node: &mut Node, fields: &[FieldDef]) -> Vec<Flagged> {
        let mut flagged = Vec::new();
        if !self.is_empty() {
            self.apply_object(node, fields, "", "", &mut flagged);
        }
        flagged
    }

    /// Free-text mode: the whole transcription is one value, the field `text`.
    pub fn review_text(&self, confidence: Option<(f32, f32)>) -> bool {
        self.threshold("text")
            .is_some_and(|t| confidence.is_none_or(|(min, _)| min < t))
    }

    fn apply_object(
        &self,
        node: &mut Node,
        fields: &[FieldDef],
        key_prefix: &str,
        shown_prefix: &str,
        flagged: &mut Vec<Flagged>,
    ) {
        let NodeValue::Object(members) = &mut node.value else {
            return;
        };
        for (name, value) in members.iter_mut() {
            let Some(def) = fields.iter().find(|f| &f.name == name) else {
                continue;
            };
            let key = join(key_prefix, name);
            let shown = join(shown_prefix, name);
            self.apply_value(value, &def.ty, &key, &shown, flagged);
        }
    }

    fn apply_value(
        &self,
        value: &mut Node,
        ty: &FieldType,
        key: &str,
        shown: &str,
        flagged: &mut Vec<Flagged>,
    ) {
        match ty {
            FieldType::Struct(children) => self.apply_object(value, children, key, shown, flagged),
            FieldType::List(item) => {
                if let NodeValue::Array(items) = &mut value.value {
                    for (i, it) in items.iter_mut().enumerate() {
                        self.apply_value(it, &item.ty, key, &format!("{shown}[{i}]"), flagged);
                    }
                }
            }
            _ => {
                if value.is_null() {
                    return;
                }
                let low = self
                    .threshold(key)
                    .is_some_and(|t| value.confidence.is_none_or(|(min, _)| min < t));
                let reason = if low {
                    ReviewReason::LowConfidence
                } else if self.require_grounding && value.grounded == Some(false) {
                    ReviewReason::Ungrounded
                } else {
                    return;
                };
                value.value = NodeValue::Null;
                flagged.push(Flagged {
                    path: shown.to_string(),
                    reason,
                });
            }
        }
    }

    /// The schema the output columns are built from: every field a threshold can null becomes nullable in Arrow
    /// (the extraction schema itself, which the grammar and validation use, is left as it is).
    pub fn output_schema(&self, schema: &ExtractionSchema) -> ExtractionSchema {
        let mut out = schema.clone();
        if !self.is_empty() {
            self.relax(&mut out.fields, "");
        }
        out
    }

    fn relax(&self, fields: &mut [FieldDef], prefix: &str) {
        for f in fields {
            let key = join(prefix, &f.name);
            self.relax_type(f, &key);
        }
    }

    fn relax_type(&self, f: &mut FieldDef, key: &str) {
        match &mut f.ty {
            FieldType::Struct(children) => self.relax(children, key),
            FieldType::List(item) => self.relax_type(item, key),
            _ => {
                if self.threshold(key).is_some() || (self.require_grounding && f.grounding) {
                    f.nullable = true;
                }
            }
        }
    }
}

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}
