//! pixtract: documents from S3 or local storage -> Pixtral (ONNX Runtime) -> schema-typed Parquet.
//!
//! Modules follow the data flow; each stage knows its input and output types, never the next stage:
//! - [`native`]: finding libonnxruntime and libpdfium (PyPI wheels in the project's virtualenv)
//! - [`model`]: the exported Pixtral graphs (manifest, ONNX Runtime sessions)
//! - [`doctor`]: what this machine can run

pub mod doctor;
pub mod model;
pub mod native;
