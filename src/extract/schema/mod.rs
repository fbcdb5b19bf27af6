//! JSON Schema -> a typed field tree -> Arrow schema, grammar schema for llguidance, validation of answers.
//!
//! Supported (everything else is refused at load with the JSON path of the construct):
//! - `type`: `string`, `integer`, `number`, `boolean`, `object`, `array`, each optionally paired with `"null"`
//!   (`["string", "null"]`), or `anyOf`/`oneOf` of exactly one schema and `{"type": "null"}`.
//! - objects: `properties`, `required`, `additionalProperties: false` (absent means false: answers never carry
//!   undeclared keys). Maps (`additionalProperties` true or a schema, `patternProperties`) are refused.
//! - arrays: `items` as one schema (tuples via `prefixItems` / an `items` list are refused), `minItems`, `maxItems`.
//! - strings: `minLength`, `maxLength`, `pattern`, `enum`, `format: date` (Date32) and `format: date-time`
//!   (Timestamp(us, UTC)); other formats are refused.
//! - numbers: `minimum`, `maximum`, `exclusiveMinimum`, `exclusiveMaximum`, `multipleOf`.
//! - decimals: `"type": "number", "x-decimal": [precision, scale]` -> Decimal128(precision, scale); the grammar then
//!   allows at most `scale` fraction digits and `precision - scale` integer digits, so every answer fits.
//! - `$ref` to `#/$defs/NAME` or `#/definitions/NAME` (inlined; a cycle is refused).
//! - annotations: `title`, `description`, `$schema`, `$id`, `$comment`, `examples`, `default`, `$defs`,
//!   `definitions`, and any `x-` key.
//!
//! The top level must be an object. Its property names must not collide with pixtract's own columns.

mod grammar;
mod load;
mod merge_rule;
mod validate;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Fields, TimeUnit};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::ExtractError;
use super::values::provenance;
use load::Loader;
pub use merge_rule::MergeRule;

/// Name of the per-object confidence child (top-level column and inside every struct).
pub const CONFIDENCE: &str = "_confidence";
/// Name of the per-object location child: where each member's value is printed (`{page, x0, y0, x1, y1}`).
pub const LOCATION: &str = "_location";
/// Name of the per-object grounding child: whether each member's value is in its pages' text layer.
pub const GROUNDED: &str = "_grounded";
/// The children pixtract adds to every object, after its members: no property may take these names.
pub const OBJECT_CHILDREN: [&str; 3] = [CONFIDENCE, LOCATION, GROUNDED];

/// Column type of one field.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldType {
    Utf8,
    Int64,
    Float64,
    Decimal { precision: u8, scale: i8 },
    Boolean,
    Date32,
    TimestampUs,
    Struct(Vec<FieldDef>),
    List(Box<FieldDef>),
}

/// Validation facts the grammar enforces and [`ExtractionSchema::validate`] checks again.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Constraints {
    pub enum_values: Option<Vec<Value>>,
    pub pattern: Option<String>,
    pub min_length: Option<u64>,
    pub max_length: Option<u64>,
    pub minimum: Option<f64>,
    pub maximum: Option<f64>,
    pub exclusive_minimum: Option<f64>,
    pub exclusive_maximum: Option<f64>,
    pub multiple_of: Option<f64>,
    pub min_items: Option<u64>,
    pub max_items: Option<u64>,
}

/// One field of an extraction schema.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldDef {
    pub name: String,
    pub title: Option<String>,
    pub description: Option<String>,
    /// The value may be JSON `null`.
    pub nullable: bool,
    /// The key must be present (object members only).
    pub required: bool,
    pub ty: FieldType,
    pub constraints: Constraints,
    /// Whether the value is printed on the page and can be looked up there (`x-grounding`, default true except
    /// for booleans): false for values the model derives (a currency code from a symbol, a sign turned around).
    pub grounding: bool,
}

impl FieldDef {
    /// Arrow column nullability: null values or a key that may be left out.
    pub fn arrow_nullable(&self) -> bool {
        self.nullable || !self.required
    }

    pub fn arrow_type(&self) -> DataType {
        match &self.ty {
            FieldType::Utf8 => DataType::Utf8,
            FieldType::Int64 => DataType::Int64,
            FieldType::Float64 => DataType::Float64,
            FieldType::Decimal { precision, scale } => DataType::Decimal128(*precision, *scale),
            FieldType::Boolean => DataType::Boolean,
            FieldType::Date32 => DataType::Date32,
            FieldType::TimestampUs => {
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
            }
            FieldType::Struct(children) => DataType::Struct(struct_fields(children)),
            FieldType::List(item) => DataType::List(Arc::new(item.arrow_field())),
        }
    }

    pub fn arrow_field(&self) -> Field {
        Field::new(&self.name, self.arrow_type(), self.arrow_nullable())
    }
}

/// `{min: Float32, mean: Float32}`: token probabilities behind one value.
pub fn confidence_pair_type() -> DataType {
    DataType::Struct(Fields::from(vec![
        Field::new("min", DataType::Float32, false),
        Field::new("mean", DataType::Float32, false),
    ]))
}

/// The `_confidence` struct of an object with `children`: one `{min, mean}` per field.
pub fn confidence_field(children: &[FieldDef]) -> Field {
    let fields: Vec<Field> = children
        .iter()
        .map(|c| Field::new(&c.name, confidence_pair_type(), true))
        .collect();
    Field::new(CONFIDENCE, DataType::Struct(Fields::from(fields)), true)
}

/// `{page, x0, y0, x1, y1}`: the page (1-based) and the box (0-1, origin top-left of the page as rendered; null
/// when only the page is known).
pub fn location_type() -> DataType {
    let coord = |n: &str| Field::new(n, DataType::Float32, true);
    DataType::Struct(Fields::from(vec![
        Field::new("page", DataType::Int32, false),
        coord("x0"),
        coord("y0"),
        coord("x1"),
        coord("y1"),
    ]))
}

/// The `_location` struct of an object with `children`: one location per field (null for objects and lists,
/// whose own members carry theirs).
pub fn location_field(children: &[FieldDef]) -> Field {
    let fields: Vec<Field> = children
        .iter()
        .map(|c| Field::new(&c.name, location_type(), true))
        .collect();
    Field::new(LOCATION, DataType::Struct(Fields::from(fields)), true)
}

/// The `_grounded` struct of an object with `children`: one boolean per field.
pub fn grounded_field(children: &[FieldDef]) -> Field {
    let fields: Vec<Field> = children
        .iter()
        .map(|c| Field::new(&c.name, DataType::Boolean, true))
        .collect();
    Field::new(GROUNDED, DataType::Struct(Fields::from(fields)), true)
}

/// Arrow fields of an object: its members, then `_confidence`, `_location` and `_grounded`.
pub fn struct_fields(children: &[FieldDef]) -> Fields {
    let mut fields: Vec<Field> = children.iter().map(FieldDef::arrow_field).collect();
    fields.push(confidence_field(children));
    fields.push(location_field(children));
    fields.push(grounded_field(children));
    Fields::from(fields)
}

/// Free-text mode's one field, `text`: the row layout of a transcription.
pub fn text_fields() -> Vec<FieldDef> {
    vec![FieldDef {
        name: "text".into(),
        title: None,
        description: None,
        nullable: true,
        required: true,
        ty: FieldType::Utf8,
        constraints: Default::default(),
        grounding: false,
    }]
}

/// A loaded, checked extraction schema.
#[derive(Debug, Clone)]
pub struct ExtractionSchema {
    /// File stem (`receipt` for `schemas/receipt.json`) or the name given to [`ExtractionSchema::from_value`].
    pub name: String,
    pub title: Option<String>,
    pub description: Option<String>,
    /// Top-level members, in declaration order.
    pub fields: Vec<FieldDef>,
    /// sha256 (hex) of the canonical JSON of the source schema (object keys sorted, no whitespace).
    pub sha256: String,
    /// The schema as written.
    pub source: Value,
    /// How each top-level field's windows merge in document mode (`x-merge`, or the default), in field order.
    merge: Vec<MergeRule>,
}

impl ExtractionSchema {
    /// Each top-level field's merge rule (document mode), in field order.
    pub fn merge_rules(&self) -> impl Iterator<Item = MergeRule> + '_ {
        self.merge.iter().copied()
    }

    /// Reads and checks a JSON Schema file; the name is the file stem.
    pub fn load(path: &Path) -> Result<Self, ExtractError> {
        let text = std::fs::read_to_string(path).map_err(|source| ExtractError::SchemaRead {
            path: path.to_path_buf(),
            source,
        })?;
        let value: Value =
            serde_json::from_str(&text).map_err(|source| ExtractError::SchemaParse {
                path: path.to_path_buf(),
                source,
            })?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "schema".into());
        Self::from_value(&name, value).map_err(|e| match e {
            ExtractError::Unsupported {
                path: p, reason, ..
            } => ExtractError::Unsupported {
                schema: path.display().to_string(),
                path: p,
                reason,
            },
            other => other,
        })
    }

    /// Checks a JSON Schema value.
    pub fn from_value(name: &str, value: Value) -> Result<Self, ExtractError> {
        let mut loader = Loader::new(&value, name);
        let root = loader.field("$", &value, "$")?;
        let FieldType::Struct(fields) = root.ty else {
            return Err(loader.err(
                "$",
                "the top level must be an object (`\"type\": \"object\"`)",
            ));
        };
        if root.nullable {
            return Err(loader.err("$", "the top level cannot be nullable"));
        }
        if fields.is_empty() {
            return Err(loader.err("$.properties", "the schema declares no properties"));
        }
        for f in &fields {
            if provenance::is_reserved(&f.name) || OBJECT_CHILDREN.contains(&f.name.as_str()) {
                return Err(loader.err(
                    &format!("$.properties.{}", f.name),
                    "this name is one of pixtract's own columns; rename the property",
                ));
            }
        }
        let merge = merge_rule::rules_of(&value, &fields)
            .map_err(|(path, reason)| loader.err(&path, &reason))?;
        Ok(ExtractionSchema {
            merge,
            name: name.to_string(),
            title: value
                .get("title")
                .and_then(Value::as_str)
                .map(str::to_string),
            description: value
                .get("description")
                .and_then(Value::as_str)
                .map(str::to_string),
            fields,
            sha256: sha256_hex(canonical_json(&value).as_bytes()),
            source: value,
        })
    }

    /// The extracted columns (members + `_confidence`), without the provenance columns.
    pub fn arrow_fields(&self) -> Fields {
        struct_fields(&self.fields)
    }

    /// The JSON Schema handed to llguidance: references inlined, annotations dropped, objects closed,
    /// decimals bounded, compact JSON (no free whitespace: a model cannot pad forever).
    pub fn grammar_schema(&self) -> Value {
        let mut root = grammar::object_grammar(&self.fields);
        if let Value::Object(m) = &mut root {
            m.insert(
                "x-guidance".into(),
                json!({"whitespace_flexible": false, "item_separator": ",", "key_separator": ":"}),
            );
        }
        root
    }

    /// Checks an answer against the schema: types, nullability, required and undeclared keys, enums, lengths,
    /// patterns, formats, ranges, item counts. Returns every violation with its JSON path.
    pub fn validate(&self, answer: &Value) -> Result<(), Vec<String>> {
        let mut errors = Vec::new();
        match answer {
            Value::Object(m) => validate::validate_object(&self.fields, m, "$", &mut errors),
            other => errors.push(format!(
                "$: expected an object, got {}",
                validate::kind_of(other)
            )),
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// A smallest valid answer (nulls, empty strings and lists, lower bounds): sizes the closing reserve.
    pub fn minimal_answer(&self) -> Value {
        Value::Object(
            self.fields
                .iter()
                .filter(|f| f.required)
                .map(|f| (f.name.clone(), grammar::minimal_value(f)))
                .collect(),
        )
    }
}

/// Object keys sorted at every level, no whitespace.
pub fn canonical_json(v: &Value) -> String {
    fn sorted(v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                let b: BTreeMap<&String, Value> = m.iter().map(|(k, v)| (k, sorted(v))).collect();
                Value::Object(b.into_iter().map(|(k, v)| (k.clone(), v)).collect())
            }
            Value::Array(a) => Value::Array(a.iter().map(sorted).collect()),
            other => other.clone(),
        }
    }
    sorted(v).to_string()
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}
