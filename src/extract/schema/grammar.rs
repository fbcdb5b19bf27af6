//! The JSON Schema handed to llguidance, and the smallest valid answer (what the closing reserve is sized by).

use serde_json::{Map, Value, json};

use super::{FieldDef, FieldType};

pub(super) fn object_grammar(children: &[FieldDef]) -> Value {
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

/// A smallest valid value of a field (nulls, empty strings and lists, lower bounds).
pub(super) fn minimal_value(f: &FieldDef) -> Value {
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
