//! Predictions: the Parquet files of a pixtract output (a folder, read recursively, or one file), one entry per
//! document with each schema field's value as text and its confidence (`_confidence.<field>.min`).

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use arrow::array::{Array, AsArray, RecordBatch, StructArray};
use arrow::datatypes::{DataType, Float32Type, Float64Type};
use arrow::util::display::{ArrayFormatter, FormatOptions};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::file::reader::ChunkReader;

use super::items::Item;
use super::normalise::FieldKind;
use super::{EvalError, document_key};
use crate::extract::values::provenance;
use crate::sink::SinkTarget;
use crate::sink::committed::{Columns, Committed, Entry, OnBatches};

#[derive(Debug, Clone, Default)]
pub struct Prediction {
    pub source_uri: String,
    pub status: Option<String>,
    /// Field -> value as text (None: null).
    pub values: BTreeMap<String, Option<String>>,
    /// Field -> the least probable token's probability behind its value.
    pub confidence: BTreeMap<String, Option<f64>>,
    /// Field -> whether its value was found in its pages' text layer (`_grounded`; None: unknown).
    pub grounded: BTreeMap<String, Option<bool>>,
    /// List-of-struct field (line items) -> its items, member -> value as text (None: null list).
    pub lists: BTreeMap<String, Option<Vec<Item>>>,
}

#[derive(Debug, Clone, Default)]
pub struct Predictions {
    /// Document key -> its row (the first `ok` row of the document, else its first row).
    pub documents: BTreeMap<String, Prediction>,
    /// Page key (`<document key>#p<page>`, 1-based) -> the row that covers the page, for page-level labels.
    pub pages: BTreeMap<String, Prediction>,
    kinds: BTreeMap<String, FieldKind>,
    /// List-of-struct field -> its members' kinds.
    list_kinds: BTreeMap<String, BTreeMap<String, FieldKind>>,
    pub files: usize,
    pub rows: usize,
}

fn kind_of_type(t: &DataType) -> Option<FieldKind> {
    match t {
        DataType::Date32 | DataType::Date64 => Some(FieldKind::Date),
        DataType::Float16
        | DataType::Float32
        | DataType::Float64
        | DataType::Decimal128(..)
        | DataType::Decimal256(..)
        | DataType::Int8
        | DataType::Int16
        | DataType::Int32
        | DataType::Int64 => Some(FieldKind::Amount),
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View | DataType::Timestamp(..) => {
            Some(FieldKind::Text)
        }
        DataType::Boolean => Some(FieldKind::Text),
        _ => None,
    }
}

impl Predictions {
    /// Reads every committed Parquet file under `path`: a local folder (`file://` accepted) or an object-store
    /// prefix (`s3://`, `gs://`, `az://`; credentials from the store's environment), through the one reader of
    /// committed output the runs' state and `report` use; or one local `.parquet` file named on its own.
    pub fn load(path: &str) -> Result<Predictions, EvalError> {
        let local = PathBuf::from(path.strip_prefix("file://").unwrap_or(path));
        if !crate::store::is_object_store(path) && local.is_file() {
            let mut out = Predictions::default();
            let f = File::open(&local).map_err(|source| EvalError::Read {
                path: local.clone(),
                source,
            })?;
            out.add_parquet(f, &local)?;
            return Ok(out);
        }
        if !crate::store::is_object_store(path) && !local.is_dir() {
            return Err(EvalError::Input(format!(
                "{}: no such folder or file (a pixtract output folder or one .parquet file)",
                local.display()
            )));
        }
        let target = SinkTarget::parse(path).map_err(|source| EvalError::Output {
            uri: path.to_string(),
            source: Box::new(source),
        })?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| EvalError::Read {
                path: PathBuf::from(path),
                source,
            })?;
        runtime.block_on(Self::load_committed(&target))
    }

    async fn load_committed(target: &SinkTarget) -> Result<Predictions, EvalError> {
        let listing_error = |source| EvalError::Object {
            key: target.url(),
            source,
        };
        let Some(out) = Committed::open(target).map_err(listing_error)? else {
            return Err(EvalError::Input(format!(
                "{}: no such folder (a pixtract output)",
                target.url()
            )));
        };
        let listing = out.list().await.map_err(listing_error)?;
        let mut files: Vec<&Entry> = listing.iter().filter(|e| e.is_data()).collect();
        files.sort_by(|a, b| a.rel.cmp(&b.rel));
        if files.is_empty() {
            return Err(EvalError::Input(format!(
                "{}: no Parquet files (a pixtract output)",
                target.url()
            )));
        }
        let mut predictions = Predictions::default();
        for entry in files {
            // A file's batches are held until it is read whole: a read made again after a storage failure must
            // not add its first rows twice.
            let mut batches = FileBatches::default();
            out.read_parquet(entry, Columns::AllBut(&[]), &mut batches)
                .await?;
            let name = PathBuf::from(format!("{}/{}", target.url(), entry.rel));
            for batch in &batches.0 {
                predictions.add_batch(batch, &name)?;
            }
            predictions.files += 1;
        }
        Ok(predictions)
    }

    /// Adds every row of one Parquet file (a local file or an object's bytes); `name` is for messages.
    fn add_parquet<R: ChunkReader + 'static>(
        &mut self,
        data: R,
        name: &Path,
    ) -> Result<(), EvalError> {
        let reader = ParquetRecordBatchReaderBuilder::try_new(data)
            .and_then(|b| b.build())
            .map_err(|source| EvalError::Parquet {
                path: name.to_path_buf(),
                source,
            })?;
        for batch in reader {
            let batch = batch.map_err(|source| EvalError::Arrow {
                path: name.to_path_buf(),
                source,
            })?;
            self.add_batch(&batch, name)?;
        }
        self.files += 1;
        Ok(())
    }

    /// Adds one record batch's rows (also used by tests building predictions in memory).
    pub fn add_batch(&mut self, batch: &RecordBatch, file: &Path) -> Result<(), EvalError> {
        let schema = batch.schema();
        let text = |name: &str| -> Result<Option<Vec<Option<String>>>, EvalError> {
            let Some(column) = batch.column_by_name(name) else {
                return Ok(None);
            };
            let formatter = ArrayFormatter::try_new(column.as_ref(), &FormatOptions::default())
                .map_err(|source| EvalError::Arrow {
                    path: file.to_path_buf(),
                    source,
                })?;
            Ok(Some(
                (0..column.len())
                    .map(|i| (!column.is_null(i)).then(|| formatter.value(i).to_string()))
                    .collect(),
            ))
        };
        let uris = text(provenance::SOURCE_URI)?.ok_or_else(|| {
            EvalError::Input(format!(
                "{}: no {} column: not a pixtract output",
                file.display(),
                provenance::SOURCE_URI
            ))
        })?;
        let statuses = text("status")?;
        let page_number = |name: &str| -> Result<Vec<Option<u32>>, EvalError> {
            Ok(text(name)?
                .unwrap_or_default()
                .into_iter()
                .map(|v| v.and_then(|t| t.parse().ok()))
                .collect())
        };
        let (page_starts, page_ends) = (
            page_number(provenance::PAGE_START)?,
            page_number(provenance::PAGE_END)?,
        );
        let confidence = batch
            .column_by_name("_confidence")
            .and_then(|c| c.as_any().downcast_ref::<StructArray>());
        let mut fields = Vec::new();
        let mut lists = Vec::new();
        for field in schema.fields() {
            let name = field.name();
            if name.starts_with('_') || provenance::is_reserved(name) {
                continue;
            }
            if let DataType::List(item) = field.data_type()
                && let DataType::Struct(members) = item.data_type()
                && let Some(column) = batch.column_by_name(name)
            {
                let kinds: BTreeMap<String, FieldKind> = members
                    .iter()
                    .filter(|m| !m.name().starts_with('_'))
                    .filter_map(|m| kind_of_type(m.data_type()).map(|k| (m.name().clone(), k)))
                    .collect();
                let items = list_items(column.as_ref(), &kinds, file)?;
                self.list_kinds.insert(name.clone(), kinds);
                lists.push((name.clone(), items));
                continue;
            }
            let Some(kind) = kind_of_type(field.data_type()) else {
                continue;
            };
            self.kinds.insert(name.clone(), kind);
            let conf = confidence
                .and_then(|c| c.column_by_name(name))
                .and_then(|c| c.as_any().downcast_ref::<StructArray>())
                .and_then(|pair| pair.column_by_name("min"))
                .map(|min| -> Vec<Option<f64>> {
                    (0..min.len())
                        .map(|i| {
                            if min.is_null(i) {
                                None
                            } else if let Some(a) = min.as_primitive_opt::<Float32Type>() {
                                Some(a.value(i) as f64)
                            } else {
                                min.as_primitive_opt::<Float64Type>().map(|a| a.value(i))
                            }
                        })
                        .collect()
                });
            let grounded: Option<Vec<Option<bool>>> = batch
                .column_by_name("_grounded")
                .and_then(|c| c.as_any().downcast_ref::<StructArray>())
                .and_then(|g| g.column_by_name(name))
                .and_then(|c| c.as_boolean_opt())
                .map(|b| {
                    (0..b.len())
                        .map(|i| (!b.is_null(i)).then(|| b.value(i)))
                        .collect()
                });
            fields.push((
                name.clone(),
                text(name)?.unwrap_or_default(),
                conf,
                grounded,
            ));
        }
        for (row, uri) in uris.into_iter().enumerate() {
            self.rows += 1;
            let Some(uri) = uri else { continue };
            let status = statuses.as_ref().and_then(|s| s[row].clone());
            let key = document_key(&uri);
            let better = |old: Option<&Prediction>| match old {
                None => true,
                Some(old) => old.status.as_deref() != Some("ok") && status.as_deref() == Some("ok"),
            };
            let pages: Vec<String> = match (
                page_starts.get(row).copied().flatten(),
                page_ends.get(row).copied().flatten(),
            ) {
                // Page 0 is a document-level failure's row: it covers no page.
                (Some(first), Some(last)) if first >= 1 && last >= first => (first
                    ..=last.min(first.saturating_add(10_000)))
                    .map(|p| page_key(&key, p))
                    .collect(),
                _ => Vec::new(),
            };
            let for_document = better(self.documents.get(&key));
            let for_pages: Vec<String> = pages
                .into_iter()
                .filter(|k| better(self.pages.get(k)))
                .collect();
            if !for_document && for_pages.is_empty() {
                continue;
            }
            let mut p = Prediction {
                source_uri: uri,
                status,
                ..Default::default()
            };
            for (name, items) in &lists {
                p.lists
                    .insert(name.clone(), items.get(row).cloned().flatten());
            }
            for (name, values, conf, grounded) in &fields {
                p.values
                    .insert(name.clone(), values.get(row).cloned().flatten());
                p.grounded.insert(
                    name.clone(),
                    grounded
                        .as_ref()
                        .and_then(|g| g.get(row).copied().flatten()),
                );
                p.confidence.insert(
                    name.clone(),
                    conf.as_ref().and_then(|c| c.get(row).copied().flatten()),
                );
            }
            for k in for_pages {
                self.pages.insert(k, p.clone());
            }
            if for_document {
                self.documents.insert(key, p);
            }
        }
        Ok(())
    }

    /// The row for a label's key: a document key, or a page key (`<document>#p<page>`) for page-level labels.
    pub fn get(&self, key: &str) -> Option<&Prediction> {
        self.documents.get(key).or_else(|| self.pages.get(key))
    }

    /// The member kinds of a list-of-struct field, if `field` is one.
    pub fn list_kinds_of(&self, field: &str) -> Option<&BTreeMap<String, FieldKind>> {
        self.list_kinds.get(field)
    }

    pub fn kind_of(&self, field: &str) -> Option<FieldKind> {
        self.kinds.get(field).copied()
    }

    pub fn field_names(&self) -> Vec<String> {
        self.kinds
            .keys()
            .chain(self.list_kinds.keys())
            .cloned()
            .collect()
    }
}

/// The key of page `page` (1-based) of the document keyed `document`.
pub fn page_key(document: &str, page: u32) -> String {
    format!("{document}#p{page}")
}

/// Per row of a `List<Struct>` column: its items with the members of `kinds` as text.
fn list_items(
    column: &dyn Array,
    kinds: &BTreeMap<String, FieldKind>,
    file: &Path,
) -> Result<Vec<Option<Vec<Item>>>, EvalError> {
    let arrow_err = |source| EvalError::Arrow {
        path: file.to_path_buf(),
        source,
    };
    let Some(list) = column.as_list_opt::<i32>() else {
        return Ok(vec![None; column.len()]);
    };
    let Some(structs) = list.values().as_struct_opt() else {
        return Ok(vec![None; column.len()]);
    };
    let mut members = Vec::new();
    for name in kinds.keys() {
        if let Some(child) = structs.column_by_name(name) {
            let formatter = ArrayFormatter::try_new(child.as_ref(), &FormatOptions::default())
                .map_err(arrow_err)?;
            members.push((name.clone(), child, formatter));
        }
    }
    let offsets = list.value_offsets();
    Ok((0..list.len())
        .map(|row| {
            if list.is_null(row) {
                return None;
            }
            let (start, end) = (offsets[row] as usize, offsets[row + 1] as usize);
            Some(
                (start..end)
                    .map(|i| {
                        members
                            .iter()
                            .filter(|(_, child, _)| !child.is_null(i))
                            .map(|(name, _, f)| (name.clone(), f.value(i).to_string()))
                            .collect()
                    })
                    .collect(),
            )
        })
        .collect())
}

/// One file's batches, in order.
#[derive(Default)]
struct FileBatches(Vec<RecordBatch>);

impl OnBatches for FileBatches {
    fn restart(&mut self) {
        self.0.clear();
    }

    fn batch(&mut self, batch: &RecordBatch) -> bool {
        self.0.push(batch.clone());
        true
    }
}
