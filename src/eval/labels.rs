//! Label files: a folder of one JSON object per document (SROIE: `000.json` next to `000.jpg`, or in a `key/`
//! subfolder; invoice2data's `tests/compare/*.json`), or one `labels.jsonl` whose lines carry a `document` (or
//! `source_uri`) key and the fields.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

use super::{EvalError, document_key};

/// One document's labels: key -> value as text (numbers written as JSON writes them).
pub type Labels = BTreeMap<String, String>;

#[derive(Debug, Clone, Default)]
pub struct LabelSet {
    /// Document key (file stem) -> labels.
    pub documents: BTreeMap<String, Labels>,
}

fn text_of(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn labels_of(object: &serde_json::Map<String, Value>) -> Labels {
    object
        .iter()
        .filter_map(|(k, v)| text_of(v).map(|t| (k.clone(), t)))
        .collect()
}

impl LabelSet {
    /// Reads a folder of per-document JSON files or a `.jsonl` file.
    pub fn load(path: &Path) -> Result<LabelSet, EvalError> {
        if path.is_file() {
            return Self::load_jsonl(path);
        }
        let dir = if path.join("key").is_dir() {
            path.join("key")
        } else {
            path.to_path_buf()
        };
        let jsonl = dir.join("labels.jsonl");
        if jsonl.is_file() {
            return Self::load_jsonl(&jsonl);
        }
        let read_dir = std::fs::read_dir(&dir).map_err(|source| EvalError::Read {
            path: dir.clone(),
            source,
        })?;
        let mut set = LabelSet::default();
        for entry in read_dir {
            let entry = entry.map_err(|source| EvalError::Read {
                path: dir.clone(),
                source,
            })?;
            let file = entry.path();
            if file.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let text = std::fs::read_to_string(&file).map_err(|source| EvalError::Read {
                path: file.clone(),
                source,
            })?;
            let value: Value = serde_json::from_str(&text).map_err(|source| EvalError::Json {
                path: file.clone(),
                source,
            })?;
            let Value::Object(object) = value else {
                return Err(EvalError::Input(format!(
                    "{}: a label file holds one JSON object",
                    file.display()
                )));
            };
            let key = document_key(&file.to_string_lossy());
            set.documents.insert(key, labels_of(&object));
        }
        if set.documents.is_empty() {
            return Err(EvalError::Input(format!(
                "{}: no label files (*.json, key/*.json or labels.jsonl)",
                path.display()
            )));
        }
        Ok(set)
    }

    fn load_jsonl(path: &Path) -> Result<LabelSet, EvalError> {
        let text = std::fs::read_to_string(path).map_err(|source| EvalError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut set = LabelSet::default();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let value: Value = serde_json::from_str(line).map_err(|source| EvalError::Json {
                path: path.to_path_buf(),
                source,
            })?;
            let object = value.as_object().ok_or_else(|| {
                EvalError::Input(format!(
                    "{} line {}: not a JSON object",
                    path.display(),
                    i + 1
                ))
            })?;
            let doc = object
                .get("document")
                .or_else(|| object.get("source_uri"))
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    EvalError::Input(format!(
                        "{} line {}: no \"document\" or \"source_uri\" key",
                        path.display(),
                        i + 1
                    ))
                })?;
            let mut labels = labels_of(object);
            labels.remove("document");
            labels.remove("source_uri");
            set.documents.insert(document_key(doc), labels);
        }
        Ok(set)
    }
}
