//! `pixtract doctor`: what this machine can run, and how to fix what is missing.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::error::chain;
use crate::model::manifest::DecoderAttention;
use crate::model::{Device, ModelDir, OrtRuntime};
use crate::native::{LibraryLocation, NativeLibrary, SearchPaths};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// Not needed for what was asked, but worth knowing (e.g. no CUDA when running on CPU).
    Note,
    Fail,
}

#[derive(Debug, Clone)]
pub struct Check {
    pub name: String,
    pub status: Status,
    pub detail: String,
}

#[derive(Debug, Clone, Default)]
pub struct DoctorReport {
    pub checks: Vec<Check>,
}

impl DoctorReport {
    pub fn ok(&self) -> bool {
        self.checks.iter().all(|c| c.status != Status::Fail)
    }

    fn push(&mut self, name: impl Into<String>, status: Status, detail: impl Into<String>) {
        self.checks.push(Check {
            name: name.into(),
            status,
            detail: detail.into(),
        });
    }
}

impl fmt::Display for DoctorReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let width = self.checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
        for c in &self.checks {
            let tag = match c.status {
                Status::Ok => "ok  ",
                Status::Note => "note",
                Status::Fail => "FAIL",
            };
            let mut lines = c.detail.lines();
            writeln!(
                f,
                "[{tag}] {:width$}  {}",
                c.name,
                lines.next().unwrap_or("")
            )?;
            for line in lines {
                writeln!(f, "       {:width$}  {line}", "")?;
            }
        }
        let failed = self
            .checks
            .iter()
            .filter(|c| c.status == Status::Fail)
            .count();
        if failed == 0 {
            writeln!(f, "all checks passed")
        } else {
            writeln!(f, "{failed} check(s) failed: see FAIL lines above")
        }
    }
}

#[derive(Debug, Clone)]
pub struct DoctorOptions {
    /// Model directories to check; empty means every `models/*/` under the current directory.
    pub models: Vec<PathBuf>,
    /// The device the user intends to run on: CUDA failing is then a failure, not a note.
    pub device: Device,
    /// Recompute sha256 of every model file (slow for 25 GB models).
    pub verify_hashes: bool,
}

/// Runs every check. Never panics on a broken environment: each problem becomes a FAIL line.
pub fn run(opts: &DoctorOptions, search: &SearchPaths) -> DoctorReport {
    let mut report = DoctorReport::default();
    if search.virtualenvs.is_empty() {
        report.push(
            "virtualenv",
            Status::Note,
            "no .venv found (set PIXTRACT_VENV, or run scripts/setup.sh in the checkout)",
        );
    } else {
        report.push(
            "virtualenv",
            Status::Ok,
            search
                .virtualenvs
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        );
    }

    let runtime = match search.locate(NativeLibrary::OnnxRuntime) {
        Ok(loc) => {
            let desc = describe(&loc);
            match OrtRuntime::load(loc) {
                Ok(rt) => {
                    report.push("onnxruntime", Status::Ok, desc);
                    Some(rt)
                }
                Err(e) => {
                    report.push("onnxruntime", Status::Fail, chain(&e));
                    None
                }
            }
        }
        Err(e) => {
            report.push("onnxruntime", Status::Fail, chain(&e));
            None
        }
    };

    match search.locate(NativeLibrary::Pdfium) {
        Ok(loc) => match check_pdfium(&loc.path) {
            Ok(()) => report.push(
                "pdfium",
                Status::Ok,
                format!("{} (rendered a test page)", describe(&loc)),
            ),
            Err(e) => report.push(
                "pdfium",
                Status::Fail,
                format!("{}: {e}", loc.path.display()),
            ),
        },
        Err(e) => report.push("pdfium", Status::Fail, chain(&e)),
    }

    if let Some(rt) = &runtime {
        let cuda = match opts.device {
            Device::Cuda(id) => Device::Cuda(id),
            Device::Cpu => Device::Cuda(0),
        };
        match rt.session_builder(cuda) {
            Ok(_) => report.push(
                "cuda",
                Status::Ok,
                format!("CUDA execution provider registers on {cuda}"),
            ),
            Err(e) => {
                let status = if opts.device == Device::Cpu {
                    Status::Note
                } else {
                    Status::Fail
                };
                let mut text = chain(&e);
                if status == Status::Note {
                    text.push_str("\n(not needed: running on cpu)");
                }
                report.push("cuda", status, text);
            }
        }
    }

    let models = if opts.models.is_empty() {
        discover_models(Path::new("models"))
    } else {
        opts.models.clone()
    };
    if models.is_empty() {
        report.push(
            "model",
            Status::Fail,
            "no model directory found under ./models; `scripts/setup.sh` exports the tiny test model, \
             `python onnx-export/export.py export --checkpoint DIR --out models/pixtral-12b --dtype fp16` the \
             real one; or pass --model DIR",
        );
    }
    for dir in models {
        let name = format!("model {}", dir.display());
        match check_model(&dir, runtime.as_ref(), opts) {
            Ok(detail) => report.push(name, Status::Ok, detail),
            Err(e) => report.push(name, Status::Fail, e),
        }
    }
    report
}

/// 512 B, 160.0 KiB, 650.0 MiB, 1.2 GiB.
fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

fn describe(loc: &LibraryLocation) -> String {
    format!(
        "{} (version {}, {})",
        loc.path.display(),
        loc.version.as_deref().unwrap_or("unknown"),
        loc.origin
    )
}

fn discover_models(root: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join(crate::model::manifest::MANIFEST_FILE).is_file())
        .collect();
    out.sort();
    out
}

fn check_pdfium(path: &Path) -> Result<(), String> {
    use pdfium_render::prelude::*;
    let bindings = Pdfium::bind_to_library(path).map_err(|e| format!("cannot bind: {e}"))?;
    let pdfium = Pdfium::new(bindings);
    let mut doc = pdfium
        .create_new_pdf()
        .map_err(|e| format!("cannot create a document: {e}"))?;
    let page = doc
        .pages_mut()
        .create_page_at_end(PdfPagePaperSize::a4())
        .map_err(|e| format!("cannot add a page: {e}"))?;
    let bitmap = page
        .render_with_config(&PdfRenderConfig::new().set_target_width(64))
        .map_err(|e| format!("cannot render: {e}"))?;
    if bitmap.width() != 64 {
        return Err(format!("rendered width {} instead of 64", bitmap.width()));
    }
    Ok(())
}

fn check_model(
    dir: &Path,
    runtime: Option<&OrtRuntime>,
    opts: &DoctorOptions,
) -> Result<String, String> {
    let model = ModelDir::open(dir).map_err(|e| e.to_string())?;
    if opts.verify_hashes {
        model.verify_hashes().map_err(|e| e.to_string())?;
    }
    let m = &model.manifest;
    let mut lines = vec![format!(
        "{} ({}), text {} layers x {} heads ({} KV, head_dim {}, {} attention), vision {} layers, vocab {}, {:.1} MB{}",
        m.model_id,
        m.describe_weights(),
        m.text.num_layers,
        m.text.num_attention_heads,
        m.text.num_key_value_heads,
        m.text.head_dim,
        m.graphs.decoder.attention.name(),
        m.vision.num_layers,
        m.text.vocab_size,
        model.weight_bytes() as f64 / 1e6,
        if opts.verify_hashes {
            ", sha256 verified"
        } else {
            ""
        }
    )];
    // What memory a batch will want beside the weights: the figure users size `batch_size` by.
    let per_token = m.kv_cache_bytes_per_token();
    let page = m.max_image_tokens();
    let layout = m.image_layout();
    lines.push(format!(
        "family {} (manifest version {}): {}-px patches{}, {} image tokens for a full-size page",
        m.family(),
        m.format_version,
        layout.patch_size,
        if layout.spatial_merge > 1 {
            format!(", {0}x{0} merged per token", layout.spatial_merge)
        } else {
            String::new()
        },
        page
    ));
    lines.push(format!(
        "KV cache {} per token ({}); a full-size page ({page} image tokens) {} per sequence in flight",
        human_bytes(per_token as u64),
        m.dtype,
        human_bytes((per_token * page) as u64),
    ));
    // How a run batches with this export, and what to export instead for a GPU.
    lines.push(match m.graphs.decoder.attention {
        DecoderAttention::Gqa => "batching: continuous (GroupQueryAttention export: KV-cache slots, a finished \
             answer's slot refilled at once)"
            .to_string(),
        DecoderAttention::Eager => format!(
            "batching: static (eager export: a batch runs until its longest answer ends){}",
            if matches!(opts.device, Device::Cuda(_)) {
                "; for CUDA export with `--attention gqa --dtype fp16`: continuous batching over KV-cache slots \
                 in device memory"
            } else {
                ""
            }
        ),
    });
    m.graphs
        .decoder
        .attention
        .check_device(opts.device, &m.dtype)
        .map_err(|err| format!("{}\n{err}", lines[0]))?;
    let Some(rt) = runtime else {
        return Err(format!(
            "{}\ncannot open sessions without ONNX Runtime",
            lines[0]
        ));
    };
    let mut timings = Vec::new();
    for (name, graph) in m.graphs.iter() {
        let start = Instant::now();
        rt.open_session(&model.path_of(&graph.file), opts.device)
            .map_err(|e| {
                let mut msg = format!("{}\n{name}: {e}", lines[0]);
                if m.dtype == "fp16" && opts.device == Device::Cpu {
                    msg.push_str(
                        "\nfp16 graphs are meant for the CUDA provider: use --device cuda, or export fp32 \
                         for CPU runs",
                    );
                }
                msg
            })?;
        timings.push(format!("{name} {} ms", start.elapsed().as_millis().max(1)));
    }
    lines.push(format!(
        "sessions open on {}: {}",
        opts.device,
        timings.join(", ")
    ));
    Ok(lines.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::human_bytes;

    #[test]
    fn human_bytes_picks_the_unit_that_keeps_the_number_small() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(40 * 2 * 8 * 128 * 2), "160.0 KiB");
        assert_eq!(human_bytes(40 * 2 * 8 * 128 * 2 * 4160), "650.0 MiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }
}
