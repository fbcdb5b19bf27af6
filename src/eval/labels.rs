//! Label files: a folder of one JSON object per document (SROIE: `000.json` next to `000.jpg`, or in a `key/`
//! subfolder; invoice2data's `tests/compare/*.json`, which hold an array of one object), one `labels.jsonl`
//! whose lines carry a `document` (or `source_uri`) key, optionally a `page` (page-level labels), and the fields, or one JSON object keyed by document
//! (`ground_truth.json` as `scripts/make_samples.py` writes it). Arrays of objects are line items.

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
    /// Document key -> list key -> its items (arrays of objects in the label).
    pub lists: BTreeMap<String, BTreeMap<String, Vec<Labels>>>,
    /// Document key -> label path (`total`, `items[2].quantity`) -> where the value is printed, when the label
    /// says (`"_locations": {"total": {"page": 1, "box": [x0, y0, x1, y1]}}`, as `scripts/make_samples.py
    /// --digital` writes): for scoring the locator's boxes.
    pub locations: BTreeMap<String, BTreeMap<String, DrawnAt>>,
}

/// Where a label says its value is printed: page (1-based) and box (0-1, origin top-left).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DrawnAt {
    pub page: u32,
    pub bbox: [f64; 4],
}

fn locations_of(object: &serde_json::Map<String, Value>) -> BTreeMap<String, DrawnAt> {
    let Some(Value::Object(locs)) = object.get("_locations") else {
        return BTreeMap::new();
    };
    locs.iter()
        .filter_map(|(k, v)| {
            let page = u32::try_from(v.get("page")?.as_u64()?).ok()?;
            let b = v.get("box")?.as_array()?;
            let c = |i: usize| b.get(i).and_then(Value::as_f64);
            Some((
                k.clone(),
                DrawnAt {
                    page,
                    bbox: [c(0)?, c(1)?, c(2)?, c(3)?],
                },
            ))
        })
        .collect()
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

/// A label file's object; invoice2data writes an array of one object per document.
fn single_object(value: Value) -> Option<serde_json::Map<String, Value>> {
    match value {
        Value::Object(o) => Some(o),
        Value::Array(a) if a.len() == 1 => match a.into_iter().next() {
            Some(Value::Object(o)) => Some(o),
            _ => None,
        },
        _ => None,
    }
}

/// The arrays of objects in a label: line items.
fn lists_of(object: &serde_json::Map<String, Value>) -> BTreeMap<String, Vec<Labels>> {
    object
        .iter()
        .filter_map(|(k, v)| match v {
            Value::Array(items) if items.iter().all(Value::is_object) => Some((
                k.clone(),
                items
                    .iter()
                    .filter_map(Value::as_object)
                    .map(labels_of)
                    .collect(),
            )),
            _ => None,
        })
        .collect()
}

impl LabelSet {
    /// Reads a folder of per-document JSON files or a `.jsonl` file.
    pub fn load(path: &Path) -> Result<LabelSet, EvalError> {
        if path.is_file() {
            return if path.extension().is_some_and(|e| e == "json") {
                Self::load_document_map(path)
            } else {
                Self::load_jsonl(path)
            };
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
            let Some(object) = single_object(value) else {
                return Err(EvalError::Input(format!(
                    "{}: a label file holds one JSON object (or an array of one)",
                    file.display()
                )));
            };
            set.insert(&document_key(&file.to_string_lossy()), &object);
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
            let mut object = object.clone();
            object.remove("document");
            object.remove("source_uri");
            // A `page` (1-based) makes the line a page-level label, joined to the row that covers that page.
            let key = match object.remove("page") {
                None => document_key(doc),
                Some(page) => {
                    let page = page
                        .as_u64()
                        .and_then(|p| u32::try_from(p).ok())
                        .filter(|p| *p >= 1);
                    let page = page.ok_or_else(|| {
                        EvalError::Input(format!(
                            "{} line {}: \"page\" is a page number from 1",
                            path.display(),
                            i + 1
                        ))
                    })?;
                    super::page_key(&document_key(doc), page)
                }
            };
            set.insert(&key, &object);
        }
        Ok(set)
    }

    /// One JSON object: document (file name or URI) -> its labels.
    fn load_document_map(path: &Path) -> Result<LabelSet, EvalError> {
        let text = std::fs::read_to_string(path).map_err(|source| EvalError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let value: Value = serde_json::from_str(&text).map_err(|source| EvalError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        let not_a_map = || {
            EvalError::Input(format!(
                "{}: expected one JSON object of document name -> object of labels \
                 (or give a folder of per-document files, or a labels.jsonl)",
                path.display()
            ))
        };
        let documents = value.as_object().ok_or_else(not_a_map)?;
        let mut set = LabelSet::default();
        for (doc, labels) in documents {
            set.insert(
                &document_key(doc),
                labels.as_object().ok_or_else(not_a_map)?,
            );
        }
        if set.documents.is_empty() {
            return Err(EvalError::Input(format!(
                "{}: no documents",
                path.display()
            )));
        }
        Ok(set)
    }

    fn insert(&mut self, key: &str, object: &serde_json::Map<String, Value>) {
        self.documents.insert(key.to_string(), labels_of(object));
        let lists = lists_of(object);
        if !lists.is_empty() {
            self.lists.insert(key.to_string(), lists);
        }
        let locations = locations_of(object);
        if !locations.is_empty() {
            self.locations.insert(key.to_string(), locations);
        }
    }

    /// Every label key seen (scalars and lists), sorted.
    pub fn keys(&self) -> Vec<String> {
        let mut keys: std::collections::BTreeSet<String> = self
            .documents
            .values()
            .flat_map(|l| l.keys().cloned())
            .collect();
        keys.extend(self.lists.values().flat_map(|l| l.keys().cloned()));
        keys.into_iter().collect()
    }
}
