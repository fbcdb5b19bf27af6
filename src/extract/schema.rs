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

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Fields, Schema, TimeUnit};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::ExtractError;
use super::rows::PROVENANCE_COLUMNS;

/// Name of the per-object confidence child (top-level column and inside every struct).
pub const CONFIDENCE: &str = "_confidence";

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

/// Arrow fields of an object: its members, then `_confidence`.
pub fn struct_fields(children: &[FieldDef]) -> Fields {
    let mut fields: Vec<Field> = children.iter().map(FieldDef::arrow_field).collect();
    fields.push(confidence_field(children));
    Fields::from(fields)
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
}

impl ExtractionSchema {
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
        let mut loader = Loader {
            root: &value,
            schema: name.to_string(),
            stack: Vec::new(),
        };
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
            if PROVENANCE_COLUMNS.contains(&f.name.as_str()) || f.name == CONFIDENCE {
                return Err(loader.err(
                    &format!("$.properties.{}", f.name),
                    "this name is one of pixtract's own columns; rename the property",
                ));
            }
        }
        Ok(ExtractionSchema {
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

    /// The whole row layout: extracted columns then provenance/operations columns.
    pub fn arrow_schema(&self) -> Schema {
        super::rows::row_schema(Some(self))
    }

    /// The JSON Schema handed to llguidance: references inlined, annotations dropped, objects closed,
    /// decimals bounded, compact JSON (no free whitespace: a model cannot pad forever).
    pub fn grammar_schema(&self) -> Value {
        let mut root = object_grammar(&self.fields);
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
            Value::Object(m) => validate_object(&self.fields, m, "$", &mut errors),
            other => errors.push(format!("$: expected an object, got {}", kind_of(other))),
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
                .map(|f| (f.name.clone(), minimal_value(f)))
                .collect(),
        )
    }
}

fn minimal_value(f: &FieldDef) -> Value {
    if f.nullable {
        return Value::Null;
    }
    if let Some(values) = &f.constraints.enum_values
        && let Some(v) = values.first()
    {
        return v.clone();
    }
    match &f.ty {
        FieldType::Utf8 => {
            Value::String("x".repeat(f.constraints.min_length.unwrap_or(0) as usize))
        }
        FieldType::Int64 | FieldType::Float64 | FieldType::Decimal { .. } => json!(0),
        FieldType::Boolean => json!(false),
        FieldType::Date32 => json!("2000-01-01"),
        FieldType::TimestampUs => json!("2000-01-01T00:00:00Z"),
        FieldType::Struct(children) => Value::Object(
            children
                .iter()
                .filter(|c| c.required)
                .map(|c| (c.name.clone(), minimal_value(c)))
                .collect(),
        ),
        FieldType::List(item) => Value::Array(vec![
            minimal_value(item);
            f.constraints.min_items.unwrap_or(0) as usize
        ]),
    }
}

fn object_grammar(children: &[FieldDef]) -> Value {
    let mut props = Map::new();
    for c in children {
        props.insert(c.name.clone(), field_grammar(c));
    }
    let required: Vec<Value> = children
        .iter()
        .filter(|c| c.required)
        .map(|c| Value::String(c.name.clone()))
        .collect();
    json!({"type": "object", "properties": props, "required": required, "additionalProperties": false})
}

fn field_grammar(f: &FieldDef) -> Value {
    let c = &f.constraints;
    let mut m = Map::new();
    let base = match &f.ty {
        FieldType::Utf8 | FieldType::Date32 | FieldType::TimestampUs => "string",
        FieldType::Int64 => "integer",
        FieldType::Float64 | FieldType::Decimal { .. } => "number",
        FieldType::Boolean => "boolean",
        FieldType::Struct(children) => {
            let Value::Object(obj) = object_grammar(children) else {
                unreachable!("object_grammar returns an object")
            };
            m = obj;
            "object"
        }
        FieldType::List(item) => {
            m.insert("items".into(), field_grammar(item));
            "array"
        }
    };
    m.insert(
        "type".into(),
        if f.nullable {
            json!([base, "null"])
        } else {
            json!(base)
        },
    );
    match &f.ty {
        FieldType::Date32 => {
            m.insert("format".into(), json!("date"));
        }
        FieldType::TimestampUs => {
            m.insert("format".into(), json!("date-time"));
        }
        FieldType::Decimal { precision, scale } => {
            let bound = 10f64.powi(i32::from(*precision) - i32::from(*scale));
            m.insert("exclusiveMinimum".into(), json!(-bound));
            m.insert("exclusiveMaximum".into(), json!(bound));
            if *scale > 0 {
                m.insert(
                    "multipleOf".into(),
                    json!(format!("1e-{scale}").parse::<f64>().unwrap_or(1.0)),
                );
            }
        }
        _ => {}
    }
    let mut put = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            m.entry(k.to_string()).or_insert(v);
        }
    };
    put(
        "enum",
        c.enum_values.as_ref().map(|v| Value::Array(v.clone())),
    );
    put("pattern", c.pattern.as_ref().map(|p| json!(p)));
    put("minLength", c.min_length.map(|v| json!(v)));
    put("maxLength", c.max_length.map(|v| json!(v)));
    put("minimum", c.minimum.map(|v| json!(v)));
    put("maximum", c.maximum.map(|v| json!(v)));
    put("exclusiveMinimum", c.exclusive_minimum.map(|v| json!(v)));
    put("exclusiveMaximum", c.exclusive_maximum.map(|v| json!(v)));
    put("multipleOf", c.multiple_of.map(|v| json!(v)));
    put("minItems", c.min_items.map(|v| json!(v)));
    put("maxItems", c.max_items.map(|v| json!(v)));
    Value::Object(m)
}

const ANNOTATIONS: &[&str] = &[
    "title",
    "description",
    "$schema",
    "$id",
    "$comment",
    "examples",
    "default",
    "$defs",
    "definitions",
];

struct Loader<'a> {
    root: &'a Value,
    schema: String,
    /// `$ref`s being expanded (cycle detection).
    stack: Vec<String>,
}

impl<'a> Loader<'a> {
    fn err(&self, path: &str, reason: &str) -> ExtractError {
        ExtractError::Unsupported {
            schema: self.schema.clone(),
            path: path.to_string(),
            reason: reason.to_string(),
        }
    }

    fn resolve(&mut self, path: &str, reference: &str) -> Result<&'a Value, ExtractError> {
        let rest = reference
            .strip_prefix("#/$defs/")
            .map(|n| ("$defs", n))
            .or_else(|| {
                reference
                    .strip_prefix("#/definitions/")
                    .map(|n| ("definitions", n))
            });
        let Some((section, name)) = rest else {
            return Err(self.err(
                path,
                &format!("$ref {reference:?}: only local #/$defs/NAME or #/definitions/NAME references are supported"),
            ));
        };
        let root: &'a Value = self.root;
        root.get(section)
            .and_then(|d| d.get(name))
            .ok_or_else(|| self.err(path, &format!("$ref {reference:?} points to nothing")))
    }

    fn field(&mut self, name: &str, s: &'a Value, path: &str) -> Result<FieldDef, ExtractError> {
        let Value::Object(obj) = s else {
            return Err(self.err(
                path,
                "a schema must be a JSON object (boolean schemas are not supported)",
            ));
        };
        if let Some(r) = obj.get("$ref") {
            let reference = r
                .as_str()
                .ok_or_else(|| self.err(path, "$ref must be a string"))?;
            if self.stack.iter().any(|x| x == reference) {
                return Err(self.err(
                    path,
                    &format!("$ref {reference:?} is recursive (a cycle cannot become a fixed set of columns)"),
                ));
            }
            let target = self.resolve(path, reference)?;
            self.stack.push(reference.to_string());
            let mut f = self.field(name, target, &format!("{path}.$ref"))?;
            self.stack.pop();
            // Annotations beside the $ref override the target's.
            if let Some(t) = obj.get("title").and_then(Value::as_str) {
                f.title = Some(t.to_string());
            }
            if let Some(d) = obj.get("description").and_then(Value::as_str) {
                f.description = Some(d.to_string());
            }
            for k in obj.keys() {
                if k != "$ref" && !ANNOTATIONS.contains(&k.as_str()) && !k.starts_with("x-") {
                    return Err(
                        self.err(path, &format!("keyword {k:?} beside $ref is not supported"))
                    );
                }
            }
            return Ok(f);
        }
        for key in ["anyOf", "oneOf"] {
            if let Some(alts) = obj.get(key) {
                return self.nullable_union(name, obj, key, alts, path);
            }
        }
        for (k, v) in obj {
            let known = matches!(
                k.as_str(),
                "type"
                    | "properties"
                    | "required"
                    | "additionalProperties"
                    | "items"
                    | "minItems"
                    | "maxItems"
                    | "minLength"
                    | "maxLength"
                    | "pattern"
                    | "format"
                    | "enum"
                    | "const"
                    | "minimum"
                    | "maximum"
                    | "exclusiveMinimum"
                    | "exclusiveMaximum"
                    | "multipleOf"
            ) || ANNOTATIONS.contains(&k.as_str())
                || k.starts_with("x-");
            if !known {
                let why = match k.as_str() {
                    "allOf" => "allOf is not supported: merge the schemas into one object",
                    "patternProperties" => "patternProperties (a map) has no fixed columns",
                    "prefixItems" => {
                        "tuple arrays (prefixItems) are not supported: use an array of objects"
                    }
                    "not" | "if" | "then" | "else" => "conditional schemas are not supported",
                    "dependentSchemas" | "dependentRequired" => {
                        "dependent schemas are not supported"
                    }
                    _ => "unknown or unsupported keyword",
                };
                return Err(self.err(&format!("{path}.{k}"), why));
            }
            let _ = v;
        }
        let (base, nullable) = self.type_of(obj, path)?;
        let mut f = FieldDef {
            name: name.to_string(),
            title: obj.get("title").and_then(Value::as_str).map(str::to_string),
            description: obj
                .get("description")
                .and_then(Value::as_str)
                .map(str::to_string),
            nullable,
            required: true,
            ty: FieldType::Utf8,
            constraints: Constraints::default(),
        };
        let num = |k: &str| -> Result<Option<f64>, ExtractError> {
            match obj.get(k) {
                None => Ok(None),
                Some(v) => v
                    .as_f64()
                    .map(Some)
                    .ok_or_else(|| self.err(&format!("{path}.{k}"), "must be a number")),
            }
        };
        let count = |k: &str| -> Result<Option<u64>, ExtractError> {
            match obj.get(k) {
                None => Ok(None),
                Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                    self.err(&format!("{path}.{k}"), "must be a non-negative integer")
                }),
            }
        };
        let c = &mut f.constraints;
        c.min_length = count("minLength")?;
        c.max_length = count("maxLength")?;
        c.min_items = count("minItems")?;
        c.max_items = count("maxItems")?;
        c.minimum = num("minimum")?;
        c.maximum = num("maximum")?;
        c.exclusive_minimum = num("exclusiveMinimum")?;
        c.exclusive_maximum = num("exclusiveMaximum")?;
        c.multiple_of = num("multipleOf")?;
        if let Some(p) = obj.get("pattern") {
            let p = p
                .as_str()
                .ok_or_else(|| self.err(&format!("{path}.pattern"), "must be a string"))?;
            regex::Regex::new(p).map_err(|e| {
                self.err(
                    &format!("{path}.pattern"),
                    &format!("invalid regular expression: {e}"),
                )
            })?;
            c.pattern = Some(p.to_string());
        }
        if let Some(e) = obj.get("enum") {
            let values = e
                .as_array()
                .filter(|a| !a.is_empty())
                .ok_or_else(|| self.err(&format!("{path}.enum"), "must be a non-empty array"))?;
            c.enum_values = Some(values.clone());
        }
        if let Some(v) = obj.get("const") {
            c.enum_values = Some(vec![v.clone()]);
        }
        let format = obj.get("format").and_then(Value::as_str);
        if obj.contains_key("format") && format.is_none() {
            return Err(self.err(&format!("{path}.format"), "must be a string"));
        }
        if format.is_some() && base != "string" {
            return Err(self.err(
                &format!("{path}.format"),
                "format is only supported on strings",
            ));
        }
        if obj.contains_key("x-decimal") && base != "number" {
            return Err(self.err(
                &format!("{path}.x-decimal"),
                "x-decimal needs \"type\": \"number\"",
            ));
        }
        f.ty = match base {
            "string" => match format {
                None => FieldType::Utf8,
                Some("date") => FieldType::Date32,
                Some("date-time") => FieldType::TimestampUs,
                Some(other) => {
                    return Err(self.err(
                        &format!("{path}.format"),
                        &format!("format {other:?} is not supported (date, date-time, or none)"),
                    ));
                }
            },
            "integer" => FieldType::Int64,
            "number" => match obj.get("x-decimal") {
                None => FieldType::Float64,
                Some(d) => {
                    let pair = d.as_array().and_then(|a| match a.as_slice() {
                        [p, s] => Some((p.as_u64()?, s.as_u64()?)),
                        _ => None,
                    });
                    match pair {
                        Some((p, s)) if (1..=38).contains(&p) && s <= p => FieldType::Decimal {
                            precision: p as u8,
                            scale: s as i8,
                        },
                        _ => {
                            return Err(self.err(
                                &format!("{path}.x-decimal"),
                                "must be [precision, scale] with 1 <= precision <= 38 and 0 <= scale <= precision",
                            ));
                        }
                    }
                }
            },
            "boolean" => FieldType::Boolean,
            "object" => {
                match obj.get("additionalProperties") {
                    None | Some(Value::Bool(false)) => {}
                    Some(_) => {
                        return Err(self.err(
                            &format!("{path}.additionalProperties"),
                            "maps (additionalProperties true or a schema) have no fixed columns: declare the properties",
                        ));
                    }
                }
                let props = match obj.get("properties") {
                    Some(Value::Object(p)) => p,
                    Some(_) => {
                        return Err(self.err(&format!("{path}.properties"), "must be an object"));
                    }
                    None => {
                        return Err(self.err(
                            path,
                            "an object needs \"properties\" (free-form objects have no columns)",
                        ));
                    }
                };
                let required: Vec<&str> = match obj.get("required") {
                    None => Vec::new(),
                    Some(Value::Array(a)) => a
                        .iter()
                        .map(|v| {
                            v.as_str().ok_or_else(|| {
                                self.err(&format!("{path}.required"), "must list strings")
                            })
                        })
                        .collect::<Result<_, _>>()?,
                    Some(_) => {
                        return Err(self.err(&format!("{path}.required"), "must be an array"));
                    }
                };
                for r in &required {
                    if !props.contains_key(*r) {
                        return Err(self.err(
                            &format!("{path}.required"),
                            &format!("{r:?} is required but not declared in properties"),
                        ));
                    }
                }
                let mut children = Vec::new();
                for (k, v) in props {
                    if k.is_empty() || k == CONFIDENCE {
                        return Err(self.err(
                            &format!("{path}.properties.{k}"),
                            "this property name is reserved or empty",
                        ));
                    }
                    let mut child = self.field(k, v, &format!("{path}.properties.{k}"))?;
                    child.required = required.contains(&k.as_str());
                    children.push(child);
                }
                FieldType::Struct(children)
            }
            "array" => {
                let items = match obj.get("items") {
                    Some(Value::Object(_)) => &obj["items"],
                    Some(Value::Array(_)) => {
                        return Err(self.err(
                            &format!("{path}.items"),
                            "tuple arrays (an items list) are not supported: use an array of objects",
                        ));
                    }
                    _ => return Err(self.err(path, "an array needs \"items\" with one schema")),
                };
                let mut item = self.field("item", items, &format!("{path}.items"))?;
                item.required = true;
                if matches!(item.ty, FieldType::List(_)) {
                    return Err(self.err(
                        &format!("{path}.items"),
                        "arrays of arrays are not supported: wrap the inner array in an object",
                    ));
                }
                FieldType::List(Box::new(item))
            }
            other => return Err(self.err(path, &format!("type {other:?} is not supported"))),
        };
        if let Some(values) = &f.constraints.enum_values {
            for v in values {
                let ok = match (&f.ty, v) {
                    (_, Value::Null) => f.nullable,
                    (FieldType::Utf8, Value::String(_)) => true,
                    (FieldType::Int64, Value::Number(n)) => n.is_i64(),
                    (FieldType::Float64, Value::Number(_)) => true,
                    (FieldType::Boolean, Value::Bool(_)) => true,
                    _ => false,
                };
                if !ok {
                    return Err(self.err(
                        &format!("{path}.enum"),
                        &format!("value {v} does not match the field's type"),
                    ));
                }
            }
        }
        Ok(f)
    }

    /// `{"type": T}` / `{"type": [T, "null"]}` -> (T, nullable).
    fn type_of(&self, obj: &Map<String, Value>, path: &str) -> Result<(&'a str, bool), ExtractError>
    where
        'a: 'a,
    {
        let types: Vec<&str> = match obj.get("type") {
            Some(Value::String(t)) => vec![t.as_str()],
            Some(Value::Array(a)) => a
                .iter()
                .map(|t| {
                    t.as_str()
                        .ok_or_else(|| self.err(&format!("{path}.type"), "must list type names"))
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(self.err(&format!("{path}.type"), "must be a string or a list")),
            None => {
                return Err(self.err(
                    path,
                    "every field needs a \"type\" (untyped values have no column type)",
                ));
            }
        };
        let nullable = types.contains(&"null");
        let rest: Vec<&str> = types.into_iter().filter(|t| *t != "null").collect();
        let base = match rest.as_slice() {
            [one] => *one,
            [] => {
                return Err(self.err(
                    &format!("{path}.type"),
                    "a field that can only be null has no column",
                ));
            }
            _ => {
                return Err(self.err(
                    &format!("{path}.type"),
                    "unions of several types are not supported (only one type, optionally with null)",
                ));
            }
        };
        let base: &'a str = match base {
            "string" => "string",
            "integer" => "integer",
            "number" => "number",
            "boolean" => "boolean",
            "object" => "object",
            "array" => "array",
            other => {
                return Err(self.err(&format!("{path}.type"), &format!("unknown type {other:?}")));
            }
        };
        Ok((base, nullable))
    }

    /// `anyOf` / `oneOf`: only `[X, {"type": "null"}]` (either order) = nullable X.
    fn nullable_union(
        &mut self,
        name: &str,
        obj: &'a Map<String, Value>,
        key: &str,
        alts: &'a Value,
        path: &str,
    ) -> Result<FieldDef, ExtractError> {
        let err = || {
            self.err(
                &format!("{path}.{key}"),
                &format!(
                    "{key} is only supported as [schema, {{\"type\": \"null\"}}] (a nullable value)"
                ),
            )
        };
        let list = alts.as_array().ok_or_else(err)?;
        if list.len() != 2 {
            return Err(err());
        }
        let is_null = |v: &Value| {
            v.get("type") == Some(&json!("null")) && v.as_object().is_some_and(|o| o.len() <= 3)
        };
        let other = match (is_null(&list[0]), is_null(&list[1])) {
            (true, false) => &list[1],
            (false, true) => &list[0],
            _ => return Err(err()),
        };
        for k in obj.keys() {
            if k != key && !ANNOTATIONS.contains(&k.as_str()) && !k.starts_with("x-") {
                return Err(self.err(
                    path,
                    &format!("keyword {k:?} beside {key} is not supported"),
                ));
            }
        }
        let mut f = self.field(name, other, &format!("{path}.{key}"))?;
        f.nullable = true;
        if let Some(t) = obj.get("title").and_then(Value::as_str) {
            f.title = Some(t.to_string());
        }
        if let Some(d) = obj.get("description").and_then(Value::as_str) {
            f.description = Some(d.to_string());
        }
        Ok(f)
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn validate_object(
    children: &[FieldDef],
    m: &Map<String, Value>,
    path: &str,
    errors: &mut Vec<String>,
) {
    for k in m.keys() {
        if !children.iter().any(|c| &c.name == k) {
            errors.push(format!("{path}.{k}: not declared in the schema"));
        }
    }
    for c in children {
        match m.get(&c.name) {
            None if c.required => errors.push(format!("{path}.{}: required but missing", c.name)),
            None => {}
            Some(v) => validate_value(c, v, &format!("{path}.{}", c.name), errors),
        }
    }
}

fn validate_value(f: &FieldDef, v: &Value, path: &str, errors: &mut Vec<String>) {
    let c = &f.constraints;
    if v.is_null() {
        if !f.nullable {
            errors.push(format!("{path}: null but the field is not nullable"));
        }
        return;
    }
    if let Some(values) = &c.enum_values
        && !values.contains(v)
    {
        errors.push(format!("{path}: {v} is not one of the allowed values"));
    }
    let mut wrong =
        |want: &str| errors.push(format!("{path}: expected {want}, got {}", kind_of(v)));
    match (&f.ty, v) {
        (FieldType::Utf8 | FieldType::Date32 | FieldType::TimestampUs, Value::String(s)) => {
            let n = s.chars().count() as u64;
            if c.min_length.is_some_and(|m| n < m) || c.max_length.is_some_and(|m| n > m) {
                errors.push(format!("{path}: length {n} outside the schema's bounds"));
            }
            if let Some(p) = &c.pattern
                && !regex::Regex::new(p).is_ok_and(|r| r.is_match(s))
            {
                errors.push(format!("{path}: {s:?} does not match pattern {p:?}"));
            }
            if f.ty == FieldType::Date32 && super::rows::parse_date(s).is_none() {
                errors.push(format!("{path}: {s:?} is not a date (YYYY-MM-DD)"));
            }
            if f.ty == FieldType::TimestampUs && super::rows::parse_timestamp(s).is_none() {
                errors.push(format!("{path}: {s:?} is not an RFC 3339 date-time"));
            }
        }
        (FieldType::Int64, Value::Number(n)) if n.is_i64() || n.is_u64() => {
            check_range(c, n.as_f64().unwrap_or(0.0), path, errors)
        }
        (FieldType::Int64, _) => wrong("an integer"),
        (FieldType::Float64 | FieldType::Decimal { .. }, Value::Number(n)) => {
            let x = n.as_f64().unwrap_or(f64::NAN);
            check_range(c, x, path, errors);
            if let FieldType::Decimal { precision, scale } = f.ty
                && super::rows::parse_decimal(&n.to_string(), precision, scale).is_none()
            {
                errors.push(format!(
                    "{path}: {n} does not fit Decimal({precision}, {scale})"
                ));
            }
        }
        (FieldType::Boolean, Value::Bool(_)) => {}
        (FieldType::Struct(children), Value::Object(m)) => {
            validate_object(children, m, path, errors)
        }
        (FieldType::List(item), Value::Array(a)) => {
            let n = a.len() as u64;
            if c.min_items.is_some_and(|m| n < m) || c.max_items.is_some_and(|m| n > m) {
                errors.push(format!("{path}: {n} items outside the schema's bounds"));
            }
            for (i, x) in a.iter().enumerate() {
                validate_value(item, x, &format!("{path}[{i}]"), errors);
            }
        }
        (FieldType::Utf8 | FieldType::Date32 | FieldType::TimestampUs, _) => wrong("a string"),
        (FieldType::Float64 | FieldType::Decimal { .. }, _) => wrong("a number"),
        (FieldType::Boolean, _) => wrong("a boolean"),
        (FieldType::Struct(_), _) => wrong("an object"),
        (FieldType::List(_), _) => wrong("an array"),
    }
}

fn check_range(c: &Constraints, x: f64, path: &str, errors: &mut Vec<String>) {
    let bad = c.minimum.is_some_and(|m| x < m)
        || c.maximum.is_some_and(|m| x > m)
        || c.exclusive_minimum.is_some_and(|m| x <= m)
        || c.exclusive_maximum.is_some_and(|m| x >= m);
    if bad {
        errors.push(format!("{path}: {x} outside the schema's range"));
    }
    if let Some(step) = c.multiple_of
        && step > 0.0
    {
        let q = x / step;
        if (q - q.round()).abs() > 1e-6 {
            errors.push(format!("{path}: {x} is not a multiple of {step}"));
        }
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
