//! One integration-test crate (as ripgrep does): every test drives real parts: the pixtract binary, ONNX Runtime
//! and pdfium from the project's virtualenv, the exported tiny model and the Python exporter.

mod browser;
mod ci_model;
mod doctor;
mod engine;
mod eval;
mod exporter;
mod extract;
mod faults;
mod grounding;
mod interrupts;
mod layers;
mod lease;
mod mistral3;
mod model_dir;
mod pipeline;
mod raster;
mod reliability;
mod report;
mod sink;
mod source;
mod stores;
mod util;
mod variants;
