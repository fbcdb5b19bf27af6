//! pixtract: documents from S3 or local storage -> Pixtral (ONNX Runtime) -> schema-typed Parquet.
//!
//! Modules follow the data flow; each stage knows its input and output types, never the next stage:
//! - [`imaging`]: Pixtral's exact image geometry and cubic resize, shared by the raster and model stages
//! - [`native`]: finding libonnxruntime and libpdfium (PyPI wheels in the project's virtualenv)
//! - [`model`]: the exported Pixtral graphs (manifest, ONNX Runtime sessions)
//! - [`source`]: listing and fetching documents (local folders, S3) with provenance
//! - [`raster`]: documents -> RGB pages at model size (pdfium in worker processes, scans at full resolution)
//! - [`doctor`]: what this machine can run

pub mod doctor;
pub mod imaging;
pub mod model;
pub mod native;
pub mod raster;
pub mod source;
