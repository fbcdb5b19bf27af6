//! The merge rules a schema states for document mode (`"x-merge"` beside a top-level field), checked when the
//! schema loads; how they are applied: `extract::merge`.

use serde_json::Value;

use super::{FieldDef, FieldType};

/// How the windows' values of one field become the document's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeRule {
    First,
    Last,
    MaxConfidence,
    Sum,
    Concat,
}

impl MergeRule {
    pub const NAMES: [&'static str; 5] = ["first", "last", "max_confidence", "sum", "concat"];

    pub fn parse(name: &str) -> Option<MergeRule> {
        Some(match name {
            "first" => MergeRule::First,
            "last" => MergeRule::Last,
            "max_confidence" => MergeRule::MaxConfidence,
            "sum" => MergeRule::Sum,
            "concat" => MergeRule::Concat,
            _ => return None,
        })
    }

    /// The rule a field gets when the schema states none.
    pub fn default_for(field: &FieldDef) -> MergeRule {
        if matches!(field.ty, FieldType::List(_)) {
            return MergeRule::Concat;
        }
        let name = field.name.to_ascii_lowercase();
        let totals = ["total", "subtotal", "tax", "amount_due", "balance"];
        if totals.iter().any(|t| name.contains(t)) {
            MergeRule::Last
        } else {
            MergeRule::First
        }
    }

    /// Whether the rule can apply to a field of this type (checked when the schema is loaded).
    pub fn fits(&self, ty: &FieldType) -> bool {
        match self {
            MergeRule::Sum => matches!(
                ty,
                FieldType::Int64 | FieldType::Float64 | FieldType::Decimal { .. }
            ),
            MergeRule::Concat => matches!(ty, FieldType::List(_) | FieldType::Utf8),
            _ => true,
        }
    }
}

/// The rules of a schema's top-level fields: `x-merge` where stated (checked), the default elsewhere. Err: (the
/// schema path, why).
pub(super) fn rules_of(
    source: &Value,
    fields: &[FieldDef],
) -> Result<Vec<MergeRule>, (String, String)> {
    fields
        .iter()
        .map(|f| {
            let stated = source
                .get("properties")
                .and_then(|p| p.get(&f.name))
                .and_then(|p| p.get("x-merge"));
            let Some(stated) = stated else {
                return Ok(MergeRule::default_for(f));
            };
            let path = format!("$.properties.{}.x-merge", f.name);
            let rule = stated.as_str().and_then(MergeRule::parse).ok_or_else(|| {
                (
                    path.clone(),
                    format!("{stated} is not one of {}", MergeRule::NAMES.join(", ")),
                )
            })?;
            if !rule.fits(&f.ty) {
                return Err((
                    path,
                    format!(
                        "{stated} does not apply to this field's type (sum: numbers; concat: arrays and strings)"
                    ),
                ));
            }
            Ok(rule)
        })
        .collect()
}
