//! An answer against its schema: every violation with its JSON path.

use serde_json::{Map, Value};

use super::{Constraints, FieldDef, FieldType};
use crate::extract::values::{parse_date, parse_decimal, parse_timestamp};

pub(super) fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

pub(super) fn validate_object(
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
            if f.ty == FieldType::Date32 && parse_date(s).is_none() {
                errors.push(format!("{path}: {s:?} is not a date (YYYY-MM-DD)"));
            }
            if f.ty == FieldType::TimestampUs && parse_timestamp(s).is_none() {
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
                && parse_decimal(&n.to_string(), precision, scale).is_none()
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
