//! Extraction results -> Arrow record batches: the extracted fields (typed per the schema, with a `_confidence`
//! struct beside the values of every object) followed by provenance and operations columns.
//!
//! Row layout (schema mode): `<schema fields...>`, `_confidence`, then the provenance columns
//! ([`super::values::provenance::PROVENANCE`]). Free-text mode:
//! `text`, `_confidence {text}`, then the same provenance columns. A failed document still gets a row: extracted
//! columns null, `status = "error"`, `error` says why.
//!
//! Confidence: for each member of an object, `_confidence.<member> = {min, mean}` of the probabilities of the tokens
//! that produced the member's value (tokens overlapping the value's bytes; a string's quotes excluded). Nested
//! objects and each line item carry their own `_confidence` child. Tokens forced by budget closing count as 0.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanArray, Date32Array, Decimal128Array, Float32Array, Float64Array, Int32Array,
    Int64Array, ListArray, RecordBatch, StringArray, StructArray, TimestampMicrosecondArray,
};
use arrow::buffer::{NullBuffer, OffsetBuffer};
use arrow::datatypes::{DataType, Field, Fields, Schema};
use chrono::{DateTime, Utc};

use super::ExtractError;
use super::answer::{Node, NodeValue};
use super::review::Flagged;
use super::schema::{
    ExtractionSchema, FieldDef, FieldType, confidence_field, confidence_pair_type, grounded_field,
    location_field, location_type, struct_fields, text_fields,
};
use super::values::provenance::{
    ATTEMPT, DOC_PAGE_COUNT, ERROR_KIND, ErrorKind, MODEL_ID, PAGE_END, PAGE_START, PROVENANCE,
    ProvenanceColumn, REVIEW, REVIEW_REASONS, SCHEMA_SHA256, SOURCE_ETAG, SOURCE_URI,
    SOURCE_VERSION, STATUS_OK, STATUS_RETRY,
};
use super::values::{parse_date, parse_decimal, parse_timestamp};
use crate::raster::text::Location;

/// Where a row's pages came from.
#[derive(Debug, Clone, Default)]
pub struct SourceInfo {
    pub uri: String,
    pub etag: Option<String>,
    pub version: Option<String>,
    /// 1-based, inclusive.
    pub page_start: u32,
    pub page_end: u32,
    pub doc_page_count: Option<u32>,
    /// Set on the error row of a document that failed for a transient reason (renderer crash or timeout, storage
    /// unavailable): which attempt this was. Such a row has status `retry` and the document is not done: the next
    /// run tries it again (up to its attempt limit, after which the failure is recorded as a permanent `error`).
    pub attempt: Option<u32>,
    /// Set on a document's last input by the pipeline: how many rows the document has in all. Rows finish out of
    /// order in a stream; the writer commits a document once it holds all of them (not written to the output).
    pub doc_rows: Option<u32>,
    /// Runs before this one that failed on this document for a transient reason (from the output's `retry` rows):
    /// decides whether a new transient failure is a `retry` row or, attempts used up, a permanent error.
    pub prior_attempts: u32,
}

/// Milliseconds per stage for one row. `vision_ms` and `prefill_ms` are the row's own (continuous batching) or its
/// share of its static batch by images and prompt tokens; `decode_ms` is its share of each decode step it was in
/// (the step's time over the rows working in it); `grammar_ms` is its own time in llguidance.
#[derive(Debug, Clone, Copy, Default)]
pub struct StageLatency {
    pub fetch_ms: Option<f64>,
    pub raster_ms: Option<f64>,
    pub vision_ms: Option<f64>,
    pub prefill_ms: Option<f64>,
    pub decode_ms: Option<f64>,
    pub grammar_ms: Option<f64>,
    pub parse_ms: Option<f64>,
}

/// Same for every row of a run.
#[derive(Debug, Clone)]
pub struct RunContext {
    pub pipeline: String,
    /// The model manifest's `weights_sha256` (identifies the weights, whatever the directory is called).
    pub model_id: String,
    pub run_id: String,
}

#[derive(Debug, Clone)]
pub enum Outcome {
    /// A schema answer, parsed, validated, with confidences attached.
    Extracted(Node),
    /// Free-text mode.
    Text {
        /// None when a confidence threshold withheld the transcription (`_review` says `text`).
        text: Option<String>,
        confidence: Option<(f32, f32)>,
    },
    /// Nothing usable; the message goes to `error`.
    Failed(String),
}

/// One output row before it becomes Arrow.
#[derive(Debug, Clone)]
pub struct ExtractionRecord {
    pub source: SourceInfo,
    pub processed_at: DateTime<Utc>,
    pub outcome: Outcome,
    /// Set with `Extracted`/`Text` when the answer is usable but incomplete (budget-closed): status is `error`.
    pub warning: Option<String>,
    /// What kind of failure `Failed` or `warning` is (`error_kind`); None for an ok row.
    pub error_kind: Option<ErrorKind>,
    pub finish_reason: Option<String>,
    pub raw_output: Option<String>,
    pub prompt_tokens: Option<u32>,
    pub generated_tokens: Option<u32>,
    pub latency: StageLatency,
    /// The values withheld by a confidence threshold or for want of grounding (`_review`, `_review_reasons`);
    /// see [`super::review`].
    pub review: Vec<Flagged>,
}

impl ExtractionRecord {
    /// A row for a document that failed before or during extraction.
    pub fn failed(source: SourceInfo, kind: ErrorKind, error: impl Into<String>) -> Self {
        ExtractionRecord {
            source,
            processed_at: Utc::now(),
            outcome: Outcome::Failed(error.into()),
            warning: None,
            error_kind: Some(kind),
            finish_reason: None,
            raw_output: None,
            prompt_tokens: None,
            generated_tokens: None,
            latency: StageLatency::default(),
            review: Vec::new(),
        }
    }

    /// `ok`, `error`, or `retry` (a transient failure left for the next run).
    pub fn status(&self) -> &'static str {
        if self.is_ok() {
            STATUS_OK
        } else if self.is_retry() {
            STATUS_RETRY
        } else {
            "error"
        }
    }

    /// A transient failure: the document is tried again by the next run.
    pub fn is_retry(&self) -> bool {
        matches!(self.outcome, Outcome::Failed(_)) && self.source.attempt.is_some()
    }

    pub fn is_ok(&self) -> bool {
        !matches!(self.outcome, Outcome::Failed(_)) && self.warning.is_none()
    }

    /// What the `error` column says for this row, if anything.
    pub fn error_message(&self) -> Option<&str> {
        match &self.outcome {
            Outcome::Failed(e) => Some(e),
            _ => self.warning.as_deref(),
        }
    }
}

/// Name used in `schema_name` for free-text rows.
pub const FREE_TEXT: &str = "free_text";

/// The full row schema: extracted columns (every top-level one nullable: failed rows) then provenance.
pub fn row_schema(schema: Option<&ExtractionSchema>) -> Schema {
    let children = match schema {
        Some(s) => s.fields.clone(),
        None => text_fields(),
    };
    let mut fields: Vec<Field> = struct_fields(&children)
        .iter()
        .map(|f| f.as_ref().clone().with_nullable(true))
        .collect();
    fields.extend(PROVENANCE.iter().map(ProvenanceColumn::arrow_field));
    let mut metadata = std::collections::HashMap::new();
    if let Some(s) = schema {
        metadata.insert("pixtract.schema_name".to_string(), s.name.clone());
        metadata.insert("pixtract.schema_sha256".to_string(), s.sha256.clone());
    }
    Schema::new_with_metadata(fields, metadata)
}

/// Builds one record batch (row layout above) from records.
/// Like [`to_record_batch`], but a record whose values do not convert (an integer above `i64::MAX`, a number
/// outside its decimal's precision) becomes an error row of its own instead of failing the whole batch. Returns
/// the batch and how many records were turned into error rows.
pub fn to_record_batch_per_row(
    schema: Option<&ExtractionSchema>,
    ctx: &RunContext,
    records: &[ExtractionRecord],
) -> Result<(RecordBatch, usize), ExtractError> {
    if let Ok(batch) = to_record_batch(schema, ctx, records) {
        return Ok((batch, 0));
    }
    let mut replaced = 0;
    let fixed: Vec<ExtractionRecord> = records
        .iter()
        .map(
            |r| match to_record_batch(schema, ctx, std::slice::from_ref(r)) {
                Ok(_) => r.clone(),
                Err(e) => {
                    replaced += 1;
                    let mut failed = ExtractionRecord::failed(
                        r.source.clone(),
                        ErrorKind::Answer,
                        format!(
                            "the answer does not fit the output columns: {}",
                            crate::error::chain(&e)
                        ),
                    );
                    failed.processed_at = r.processed_at;
                    failed.finish_reason = r.finish_reason.clone();
                    failed.raw_output = r.raw_output.clone();
                    failed.prompt_tokens = r.prompt_tokens;
                    failed.generated_tokens = r.generated_tokens;
                    failed.latency = r.latency;
                    failed
                }
            },
        )
        .collect();
    Ok((to_record_batch(schema, ctx, &fixed)?, replaced))
}

pub fn to_record_batch(
    schema: Option<&ExtractionSchema>,
    ctx: &RunContext,
    records: &[ExtractionRecord],
) -> Result<RecordBatch, ExtractError> {
    let arrow_schema = Arc::new(row_schema(schema));
    let mut columns: Vec<ArrayRef> = Vec::new();
    match schema {
        Some(s) => {
            let roots: Vec<Option<&Node>> = records
                .iter()
                .map(|r| match &r.outcome {
                    Outcome::Extracted(n) => Some(n),
                    _ => None,
                })
                .collect();
            let root = FieldDef {
                name: "root".into(),
                title: None,
                description: None,
                nullable: true,
                required: true,
                ty: FieldType::Struct(s.fields.clone()),
                constraints: Default::default(),
                grounding: false,
            };
            let array = build_array(&root, &roots, "$")?;
            let Some(st) = array.as_any().downcast_ref::<StructArray>() else {
                return Err(ExtractError::Internal(
                    "the root Arrow array is not a struct",
                ));
            };
            columns.extend(st.columns().iter().cloned());
        }
        None => {
            let texts: Vec<Option<&str>> = records
                .iter()
                .map(|r| match &r.outcome {
                    Outcome::Text { text, .. } => text.as_deref(),
                    _ => None,
                })
                .collect();
            columns.push(Arc::new(StringArray::from(texts)));
            let confs: Vec<Option<(f32, f32)>> = records
                .iter()
                .map(|r| match &r.outcome {
                    Outcome::Text { confidence, .. } => *confidence,
                    _ => None,
                })
                .collect();
            let present: Vec<bool> = records
                .iter()
                .map(|r| matches!(r.outcome, Outcome::Text { .. }))
                .collect();
            let pair = pair_array(&confs);
            let conf = confidence_field(&text_fields());
            let DataType::Struct(fields) = conf.data_type() else {
                return Err(ExtractError::Internal(
                    "the confidence field is not a struct",
                ));
            };
            columns.push(Arc::new(
                StructArray::try_new(fields.clone(), vec![pair], Some(NullBuffer::from(present)))
                    .map_err(ExtractError::Arrow)?,
            ));
            // A transcription is not grounded: its `_location` and `_grounded` are null.
            for field in [
                location_field(&text_fields()),
                grounded_field(&text_fields()),
            ] {
                columns.push(arrow::array::new_null_array(
                    field.data_type(),
                    records.len(),
                ));
            }
        }
    }
    let schema_name = schema.map(|s| s.name.clone()).unwrap_or(FREE_TEXT.into());
    let schema_sha = schema.map(|s| s.sha256.clone());
    let n = records.len();
    let strs = |f: &dyn Fn(&ExtractionRecord) -> Option<String>| -> ArrayRef {
        Arc::new(StringArray::from(records.iter().map(f).collect::<Vec<_>>()))
    };
    let ints = |f: &dyn Fn(&ExtractionRecord) -> Option<u32>| -> ArrayRef {
        Arc::new(Int32Array::from(
            records
                .iter()
                .map(|r| f(r).map(|v| v.min(i32::MAX as u32) as i32))
                .collect::<Vec<_>>(),
        ))
    };
    let ms = |f: &dyn Fn(&StageLatency) -> Option<f64>| -> ArrayRef {
        Arc::new(Float64Array::from(
            records.iter().map(|r| f(&r.latency)).collect::<Vec<_>>(),
        ))
    };
    let text = |v: Vec<Option<&str>>| -> ArrayRef { Arc::new(StringArray::from(v)) };
    for column in PROVENANCE {
        // One arm per column of the table: a column added there without a value here fails every test.
        columns.push(match column.name {
            SOURCE_URI => strs(&|r| Some(r.source.uri.clone())),
            SOURCE_ETAG => strs(&|r| r.source.etag.clone()),
            SOURCE_VERSION => strs(&|r| r.source.version.clone()),
            PAGE_START => ints(&|r| Some(r.source.page_start)),
            PAGE_END => ints(&|r| Some(r.source.page_end)),
            DOC_PAGE_COUNT => ints(&|r| r.source.doc_page_count),
            "pipeline" => text(vec![Some(ctx.pipeline.as_str()); n]),
            "schema_name" => text(vec![Some(schema_name.as_str()); n]),
            SCHEMA_SHA256 => text(vec![schema_sha.as_deref(); n]),
            MODEL_ID => text(vec![Some(ctx.model_id.as_str()); n]),
            "run_id" => text(vec![Some(ctx.run_id.as_str()); n]),
            "processed_at" => Arc::new(
                TimestampMicrosecondArray::from(
                    records
                        .iter()
                        .map(|r| r.processed_at.timestamp_micros())
                        .collect::<Vec<_>>(),
                )
                .with_timezone("UTC"),
            ),
            "status" => strs(&|r| Some(r.status().to_string())),
            ATTEMPT => ints(&|r| r.source.attempt),
            REVIEW => review_array(records, REVIEW, |f| f.path.as_str())?,
            REVIEW_REASONS => review_array(records, REVIEW_REASONS, |f| f.reason.as_str())?,
            "error" => strs(&|r| match &r.outcome {
                Outcome::Failed(e) => Some(e.clone()),
                _ => r.warning.clone(),
            }),
            ERROR_KIND => strs(&|r| {
                // A row that is not ok always has a kind; one built without (a bug) still says it failed.
                (!r.is_ok()).then(|| r.error_kind.unwrap_or(ErrorKind::Generation).to_string())
            }),
            "finish_reason" => strs(&|r| r.finish_reason.clone()),
            "raw_output" => strs(&|r| r.raw_output.clone()),
            "prompt_tokens" => ints(&|r| r.prompt_tokens),
            "generated_tokens" => ints(&|r| r.generated_tokens),
            "fetch_ms" => ms(&|l| l.fetch_ms),
            "raster_ms" => ms(&|l| l.raster_ms),
            "vision_ms" => ms(&|l| l.vision_ms),
            "prefill_ms" => ms(&|l| l.prefill_ms),
            "decode_ms" => ms(&|l| l.decode_ms),
            "grammar_ms" => ms(&|l| l.grammar_ms),
            "parse_ms" => ms(&|l| l.parse_ms),
            _ => return Err(ExtractError::Internal("a provenance column has no value")),
        });
    }
    RecordBatch::try_new(arrow_schema, columns).map_err(ExtractError::Arrow)
}

/// `_review` (the withheld fields' paths) or `_review_reasons` (why each was withheld) of each answered row
/// (empty when none), null for failed rows.
fn review_array(
    records: &[ExtractionRecord],
    column: &str,
    part: impl Fn(&Flagged) -> &str,
) -> Result<ArrayRef, ExtractError> {
    let mut offsets = vec![0i32];
    let mut names: Vec<&str> = Vec::new();
    for r in records {
        if !matches!(r.outcome, Outcome::Failed(_)) {
            names.extend(r.review.iter().map(&part));
        }
        offsets.push(i32::try_from(names.len()).map_err(|_| ExtractError::Shape {
            path: column.to_string(),
            reason: "too many withheld fields in one batch".into(),
        })?);
    }
    let valid = NullBuffer::from(
        records
            .iter()
            .map(|r| !matches!(r.outcome, Outcome::Failed(_)))
            .collect::<Vec<_>>(),
    );
    Ok(Arc::new(
        ListArray::try_new(
            Arc::new(Field::new("item", DataType::Utf8, false)),
            OffsetBuffer::new(offsets.into()),
            Arc::new(StringArray::from(names)),
            Some(valid),
        )
        .map_err(ExtractError::Arrow)?,
    ))
}

fn mismatch(path: &str, want: &str, node: &Node) -> ExtractError {
    ExtractError::Shape {
        path: path.to_string(),
        reason: format!("expected {want}, the answer has {:?}", node.to_value()),
    }
}

/// `{min, mean}` structs, null where absent.
fn pair_array(confs: &[Option<(f32, f32)>]) -> ArrayRef {
    let DataType::Struct(fields) = confidence_pair_type() else {
        unreachable!("pair type is a struct")
    };
    let min = Float32Array::from(
        confs
            .iter()
            .map(|c| c.map_or(0.0, |c| c.0))
            .collect::<Vec<_>>(),
    );
    let mean = Float32Array::from(
        confs
            .iter()
            .map(|c| c.map_or(0.0, |c| c.1))
            .collect::<Vec<_>>(),
    );
    let valid = NullBuffer::from(confs.iter().map(Option::is_some).collect::<Vec<_>>());
    Arc::new(StructArray::new(
        fields,
        vec![Arc::new(min), Arc::new(mean)],
        Some(valid),
    ))
}

/// One `{page, x0, y0, x1, y1}` per node (null where the value has no location).
fn location_array(nodes: &[Option<&Node>]) -> ArrayRef {
    let DataType::Struct(fields) = location_type() else {
        unreachable!("location type is a struct")
    };
    let locs: Vec<Option<Location>> = nodes.iter().map(|n| n.and_then(|n| n.location)).collect();
    let page = Int32Array::from(
        locs.iter()
            .map(|l| l.map_or(0, |l| l.page.min(i32::MAX as u32) as i32))
            .collect::<Vec<_>>(),
    );
    let coord = |k: usize| -> ArrayRef {
        Arc::new(Float32Array::from(
            locs.iter()
                .map(|l| l.and_then(|l| l.bbox).map(|b| b[k]))
                .collect::<Vec<_>>(),
        ))
    };
    let valid = NullBuffer::from(locs.iter().map(Option::is_some).collect::<Vec<_>>());
    Arc::new(StructArray::new(
        fields,
        vec![Arc::new(page), coord(0), coord(1), coord(2), coord(3)],
        Some(valid),
    ))
}

fn present<'a>(v: &Option<&'a Node>) -> Option<&'a Node> {
    v.filter(|n| !n.is_null())
}

/// Per-row scalar values: absent or JSON null stays null, every other node goes through `convert` (which says
/// what it expected when the node does not fit).
fn scalars<'a, T>(
    values: &[Option<&'a Node>],
    convert: impl Fn(&'a Node) -> Result<T, ExtractError>,
) -> Result<Vec<Option<T>>, ExtractError> {
    values
        .iter()
        .map(|v| present(v).map(&convert).transpose())
        .collect()
}

/// One column for `def` from per-row nodes (`None` or JSON null = null).
fn build_array(
    def: &FieldDef,
    values: &[Option<&Node>],
    path: &str,
) -> Result<ArrayRef, ExtractError> {
    Ok(match &def.ty {
        FieldType::Utf8 => Arc::new(StringArray::from(scalars(values, |n| match &n.value {
            NodeValue::String(s) => Ok(s.as_str()),
            _ => Err(mismatch(path, "a string", n)),
        })?)),
        FieldType::Int64 => Arc::new(Int64Array::from(scalars(values, |n| match &n.value {
            NodeValue::Number(t) => t
                .parse::<i64>()
                .map_err(|_| mismatch(path, "an integer", n)),
            _ => Err(mismatch(path, "an integer", n)),
        })?)),
        FieldType::Float64 => Arc::new(Float64Array::from(scalars(values, |n| match &n.value {
            NodeValue::Number(t) => t.parse::<f64>().map_err(|_| mismatch(path, "a number", n)),
            _ => Err(mismatch(path, "a number", n)),
        })?)),
        FieldType::Decimal { precision, scale } => {
            let out = scalars(values, |n| match &n.value {
                NodeValue::Number(t) => parse_decimal(t, *precision, *scale)
                    .ok_or_else(|| mismatch(path, &format!("a Decimal({precision}, {scale})"), n)),
                _ => Err(mismatch(path, "a number", n)),
            })?;
            Arc::new(
                Decimal128Array::from(out)
                    .with_precision_and_scale(*precision, *scale)
                    .map_err(ExtractError::Arrow)?,
            )
        }
        FieldType::Boolean => Arc::new(BooleanArray::from(scalars(values, |n| match &n.value {
            NodeValue::Bool(b) => Ok(*b),
            _ => Err(mismatch(path, "a boolean", n)),
        })?)),
        FieldType::Date32 => Arc::new(Date32Array::from(scalars(values, |n| match &n.value {
            NodeValue::String(s) => parse_date(s).ok_or_else(|| mismatch(path, "a date", n)),
            _ => Err(mismatch(path, "a date", n)),
        })?)),
        FieldType::TimestampUs => {
            let out = scalars(values, |n| match &n.value {
                NodeValue::String(s) => {
                    parse_timestamp(s).ok_or_else(|| mismatch(path, "a date-time", n))
                }
                _ => Err(mismatch(path, "a date-time", n)),
            })?;
            Arc::new(TimestampMicrosecondArray::from(out).with_timezone("UTC"))
        }
        FieldType::Struct(children) => {
            let objects: Vec<Option<&Node>> = values
                .iter()
                .map(|v| match present(v) {
                    Some(n) if matches!(n.value, NodeValue::Object(_)) => Ok(Some(n)),
                    Some(n) => Err(mismatch(path, "an object", n)),
                    None => Ok(None),
                })
                .collect::<Result<_, _>>()?;
            let mut arrays = Vec::with_capacity(children.len() + 1);
            for c in children {
                let vals: Vec<Option<&Node>> = objects
                    .iter()
                    .map(|o| o.and_then(|n| n.get(&c.name)))
                    .collect();
                arrays.push(build_array(c, &vals, &format!("{path}.{}", c.name))?);
            }
            // _confidence: one {min, mean} per member.
            let mut pairs = Vec::with_capacity(children.len());
            for c in children {
                let confs: Vec<Option<(f32, f32)>> = objects
                    .iter()
                    .map(|o| o.and_then(|n| n.get(&c.name)).and_then(|m| m.confidence))
                    .collect();
                pairs.push(pair_array(&confs));
            }
            let valid = NullBuffer::from(objects.iter().map(Option::is_some).collect::<Vec<_>>());
            let conf = confidence_field(children);
            let DataType::Struct(conf_fields) = conf.data_type() else {
                return Err(ExtractError::Internal(
                    "the confidence field is not a struct",
                ));
            };
            arrays.push(Arc::new(
                StructArray::try_new(conf_fields.clone(), pairs, Some(valid.clone()))
                    .map_err(ExtractError::Arrow)?,
            ));
            // _location and _grounded: one per member, from grounding.
            let member = |c: &FieldDef| -> Vec<Option<&Node>> {
                objects
                    .iter()
                    .map(|o| o.and_then(|n| n.get(&c.name)))
                    .collect()
            };
            let locations: Vec<ArrayRef> = children
                .iter()
                .map(|c| location_array(&member(c)))
                .collect();
            let grounded: Vec<ArrayRef> = children
                .iter()
                .map(|c| -> ArrayRef {
                    Arc::new(BooleanArray::from(
                        member(c)
                            .iter()
                            .map(|m| m.and_then(|n| n.grounded))
                            .collect::<Vec<_>>(),
                    ))
                })
                .collect();
            for (field, children_arrays) in [
                (location_field(children), locations),
                (grounded_field(children), grounded),
            ] {
                let DataType::Struct(fields) = field.data_type() else {
                    return Err(ExtractError::Internal("a per-member child is not a struct"));
                };
                arrays.push(Arc::new(
                    StructArray::try_new(fields.clone(), children_arrays, Some(valid.clone()))
                        .map_err(ExtractError::Arrow)?,
                ));
            }
            let fields: Fields = struct_fields(children);
            Arc::new(
                StructArray::try_new(fields, arrays, Some(valid)).map_err(ExtractError::Arrow)?,
            )
        }
        FieldType::List(item) => {
            let mut offsets = vec![0i32];
            let mut flat: Vec<Option<&Node>> = Vec::new();
            let mut valid = Vec::with_capacity(values.len());
            for v in values {
                match present(v) {
                    None => valid.push(false),
                    Some(n) => match &n.value {
                        NodeValue::Array(items) => {
                            valid.push(true);
                            flat.extend(items.iter().map(Some));
                        }
                        _ => return Err(mismatch(path, "an array", n)),
                    },
                }
                let len = i32::try_from(flat.len()).map_err(|_| ExtractError::Shape {
                    path: path.to_string(),
                    reason: "too many list items".into(),
                })?;
                offsets.push(len);
            }
            let child = build_array(item, &flat, &format!("{path}[]"))?;
            Arc::new(
                ListArray::try_new(
                    Arc::new(item.arrow_field()),
                    OffsetBuffer::new(offsets.into()),
                    child,
                    Some(NullBuffer::from(valid)),
                )
                .map_err(ExtractError::Arrow)?,
            )
        }
    })
}
