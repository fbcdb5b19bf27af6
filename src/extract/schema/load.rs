//! A JSON Schema value -> the typed field tree, refusing what has no fixed columns, with the JSON path of the
//! construct.

use serde_json::{Map, Value, json};

use super::{Constraints, FieldDef, FieldType, OBJECT_CHILDREN};
use crate::extract::ExtractError;

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

pub(super) struct Loader<'a> {
    root: &'a Value,
    schema: String,
    /// `$ref`s being expanded (cycle detection).
    stack: Vec<String>,
}

impl<'a> Loader<'a> {
    pub fn new(root: &'a Value, schema: &str) -> Self {
        Loader {
            root,
            schema: schema.to_string(),
            stack: Vec::new(),
        }
    }

    pub fn err(&self, path: &str, reason: &str) -> ExtractError {
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

    pub fn field(
        &mut self,
        name: &str,
        s: &'a Value,
        path: &str,
    ) -> Result<FieldDef, ExtractError> {
        let Value::Object(obj) = s else {
            return Err(self.err(
                path,
                "a schema must be a JSON object (boolean schemas are not supported)",
            ));
        };
        if let Some(r) = obj.get("$ref") {
            return self.reference_field(name, obj, r, path);
        }
        for key in ["anyOf", "oneOf"] {
            if let Some(alts) = obj.get(key) {
                return self.nullable_union(name, obj, key, alts, path);
            }
        }
        self.check_keywords(obj, path)?;
        let (base, nullable) = self.type_of(obj, path)?;
        let constraints = self.constraints(obj, path)?;
        let ty = self.field_type(obj, base, path)?;
        let grounding = match obj.get("x-grounding") {
            None => !matches!(ty, FieldType::Boolean),
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(self.err(&format!("{path}.x-grounding"), "must be true or false"));
            }
        };
        let f = FieldDef {
            name: name.to_string(),
            title: obj.get("title").and_then(Value::as_str).map(str::to_string),
            description: obj
                .get("description")
                .and_then(Value::as_str)
                .map(str::to_string),
            nullable,
            required: true,
            ty,
            constraints,
            grounding,
        };
        self.check_enum(&f, path)?;
        Ok(f)
    }

    /// A `$ref` to `#/$defs/NAME` (inlined), with annotations beside it overriding the target's.
    fn reference_field(
        &mut self,
        name: &str,
        obj: &'a Map<String, Value>,
        r: &Value,
        path: &str,
    ) -> Result<FieldDef, ExtractError> {
        let reference = r
            .as_str()
            .ok_or_else(|| self.err(path, "$ref must be a string"))?;
        if self.stack.iter().any(|x| x == reference) {
            return Err(self.err(
                path,
                &format!(
                    "$ref {reference:?} is recursive (a cycle cannot become a fixed set of columns)"
                ),
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
        self.grounding_beside(&mut f, obj, path)?;
        for k in obj.keys() {
            if k != "$ref" && !ANNOTATIONS.contains(&k.as_str()) && !k.starts_with("x-") {
                return Err(self.err(path, &format!("keyword {k:?} beside $ref is not supported")));
            }
        }
        Ok(f)
    }

    /// Refuses keywords that have no fixed columns or that pixtract does not enforce, saying what to do instead.
    fn check_keywords(&self, obj: &Map<String, Value>, path: &str) -> Result<(), ExtractError> {
        for k in obj.keys() {
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
        }
        Ok(())
    }

    /// Lengths, counts, ranges, pattern, enum/const.
    fn constraints(
        &self,
        obj: &Map<String, Value>,
        path: &str,
    ) -> Result<Constraints, ExtractError> {
        let mut c = Constraints::default();
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
        Ok(c)
    }

    /// The column type of `{"type": base}` with its format or decimal annotation.
    fn field_type(
        &mut self,
        obj: &'a Map<String, Value>,
        base: &str,
        path: &str,
    ) -> Result<FieldType, ExtractError> {
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
        Ok(match base {
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
            "number" => self.number_type(obj, path)?,
            "boolean" => FieldType::Boolean,
            "object" => self.object_type(obj, path)?,
            "array" => self.array_type(obj, path)?,
            other => return Err(self.err(path, &format!("type {other:?} is not supported"))),
        })
    }

    /// A closed object's members, in declaration order.
    fn object_type(
        &mut self,
        obj: &'a Map<String, Value>,
        path: &str,
    ) -> Result<FieldType, ExtractError> {
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
                    v.as_str()
                        .ok_or_else(|| self.err(&format!("{path}.required"), "must list strings"))
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
            if k.is_empty() || OBJECT_CHILDREN.contains(&k.as_str()) {
                return Err(self.err(
                    &format!("{path}.properties.{k}"),
                    "this property name is reserved or empty",
                ));
            }
            let mut child = self.field(k, v, &format!("{path}.properties.{k}"))?;
            child.required = required.contains(&k.as_str());
            children.push(child);
        }
        Ok(FieldType::Struct(children))
    }

    /// A list of one item schema (not a list of lists).
    fn array_type(
        &mut self,
        obj: &'a Map<String, Value>,
        path: &str,
    ) -> Result<FieldType, ExtractError> {
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
        Ok(FieldType::List(Box::new(item)))
    }

    /// `"type": "number"`: Float64, or Decimal128 with `"x-decimal": [precision, scale]`.
    fn number_type(&self, obj: &Map<String, Value>, path: &str) -> Result<FieldType, ExtractError> {
        Ok(match obj.get("x-decimal") {
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
        })
    }

    /// Every enum value must fit the field's type.
    fn check_enum(&self, f: &FieldDef, path: &str) -> Result<(), ExtractError> {
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
        Ok(())
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
        self.grounding_beside(&mut f, obj, path)?;
        Ok(f)
    }

    /// `x-grounding` beside a `$ref` or a nullable union overrides the target's.
    fn grounding_beside(
        &self,
        f: &mut FieldDef,
        obj: &Map<String, Value>,
        path: &str,
    ) -> Result<(), ExtractError> {
        match obj.get("x-grounding") {
            None => Ok(()),
            Some(Value::Bool(b)) => {
                f.grounding = *b;
                Ok(())
            }
            Some(_) => Err(self.err(&format!("{path}.x-grounding"), "must be true or false")),
        }
    }
}
