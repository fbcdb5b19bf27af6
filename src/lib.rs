//! pixtract: documents from S3 or local storage -> Pixtral (ONNX Runtime) -> schema-typed Parquet.
//!
//! Modules follow the data flow; each stage knows its input and output types, never the next stage:
//! - [`document`]: what every stage says about a document (provenance, fetch errors)
//! - [`imaging`]: Pixtral's exact image geometry and cubic resize, shared by the raster and model stages
//! - [`native`]: finding libonnxruntime and libpdfium (PyPI wheels in the project's virtualenv)
//! - [`model`]: the exported Pixtral graphs (manifest, ONNX Runtime sessions)
//! - [`source`]: listing and fetching documents (local folders, S3) with provenance
//! - [`raster`]: documents -> RGB pages at model size (pdfium in worker processes, scans at full resolution)
//! - [`extract`]: JSON Schema -> prompt, llguidance-constrained decoding, typed Arrow rows with confidences
//! - [`sink`]: Arrow batches -> Parquet on local disk or S3 (atomic files, Hive partitions, manifest, _SUCCESS)
//! - [`store`]: object-store URLs (s3://, gs://, az://) shared by the source and the sink
//! - [`doctor`]: what this machine can run
//! - [`eval`]: accuracy of an output against labelled documents (per-field scores, calibration)
//! - [`report`]: one run read back from its output as a static HTML page (throughput, stages, errors, fill rates)
//! - [`verify`]: the engine against a model's reference cases (typed results)
//! - [`testkit`]: generated documents for tests and benchmarks

pub mod doctor;
pub mod document;
pub mod error;
pub mod eval;
pub mod extract;
pub mod imaging;
pub mod model;
pub mod native;
pub mod pipeline;
pub mod raster;
pub mod report;
pub mod sink;
pub mod source;
pub mod store;
pub mod testkit;
pub mod verify;
