//! ONNX Runtime: one environment per process, sessions on CPU or CUDA.
//!
//! CUDA registers with `error_on_failure`: ONNX Runtime's default is to fall back to CPU silently, which would turn
//! a misconfigured GPU job into a run 100x slower that nobody notices.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ort::session::Session;
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};

use super::ModelError;
use crate::native::{LibraryLocation, SearchPaths};

/// Where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(i32),
}

impl FromStr for Device {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.trim().to_ascii_lowercase();
        match lower.as_str() {
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda(0)),
            _ => lower
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<i32>().ok())
                .filter(|n| *n >= 0)
                .map(Device::Cuda)
                .ok_or_else(|| ModelError::BadDevice(s.to_string())),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Settings of the runtime's shared intra-op pool (all sessions of the process run on it).
#[derive(Debug, Clone, Copy, Default)]
pub struct Threads {
    /// Zero means ONNX Runtime's default (one per physical core).
    pub intra_op: usize,
    /// Let idle pool threads spin-wait for the next op (ONNX Runtime's default; off here unless asked).
    pub spin: bool,
}

/// The process's ONNX Runtime environment, loaded from a located libonnxruntime.
pub struct OrtRuntime {
    pub library: LibraryLocation,
    env: ort::environment::Environment,
}

impl OrtRuntime {
    /// Loads libonnxruntime with the default shared thread pool (one thread per core, no spin-waiting).
    /// Must happen before any other ort call (ort panics without a library).
    pub fn load(library: LibraryLocation) -> Result<Self, ModelError> {
        Self::load_with_pool(library, Threads::default())
    }

    /// Loads libonnxruntime; sessions share one intra-op pool of `pool.intra_op` threads (0: one per core),
    /// spin-waiting between ops when `pool.spin` (faster on an otherwise idle machine, harmful when shared).
    pub fn load_with_pool(library: LibraryLocation, pool: Threads) -> Result<Self, ModelError> {
        let fail = |source: ort::Error| ModelError::RuntimeLoad {
            path: library.path.clone(),
            source,
        };
        let builder =
            ort::init_from(&library.path).map_err(|source| ModelError::RuntimeLibrary {
                path: library.path.clone(),
                source,
            })?;
        // One intra-op pool for every session of the process (vision, embeddings, decoder) instead of one each:
        // three pools on a small box wake and preempt one another (docs/benchmarks.md has the prefill figures).
        let pool = ort::environment::GlobalThreadPoolOptions::default()
            .with_spin_control(pool.spin)
            .and_then(|p| p.with_intra_threads(pool.intra_op))
            .map_err(fail)?;
        let env = builder
            .with_name("pixtract")
            .with_telemetry(false)
            .with_global_thread_pool(pool)
            .build()
            .map_err(fail)?;
        Ok(OrtRuntime { library, env })
    }

    /// Loads the libonnxruntime this process finds by the documented search (env var, then virtualenv).
    pub fn load_from_env() -> Result<Self, ModelError> {
        Self::load_from_env_with_pool(Threads::default())
    }

    /// `load_from_env` with the shared pool's settings.
    pub fn load_from_env_with_pool(pool: Threads) -> Result<Self, ModelError> {
        Self::load_with_pool(
            SearchPaths::from_env().locate(crate::native::NativeLibrary::OnnxRuntime)?,
            pool,
        )
    }

    pub fn environment(&self) -> &ort::environment::Environment {
        &self.env
    }

    /// A session builder for `device`, on the runtime's shared intra-op pool. For CUDA the provider must
    /// register or this fails, saying why.
    pub fn session_builder(&self, device: Device) -> Result<SessionBuilder, ModelError> {
        let err = |e: ort::Error<SessionBuilder>| ModelError::SessionBuilder(e.into());
        let mut builder = Session::builder(&self.env)
            .map_err(ModelError::SessionBuilder)?
            .with_optimization_level(GraphOptimizationLevel::All)
            .map_err(err)?;
        if let Device::Cuda(id) = device {
            preload_cuda_wheels(&SearchPaths::from_env());
            // Heuristic conv algorithms: every page has its own patch grid, so the vision encoder's Conv sees a new
            // shape per image and the default exhaustive search would benchmark cuDNN again for each one.
            // TF32 stays off: fp32 graphs are chosen for exact arithmetic (parity); speed comes from fp16 graphs.
            let cuda = ort::ep::CUDA::default()
                .with_device_id(id)
                .with_conv_algorithm_search(ort::ep::cuda::ConvAlgorithmSearch::Heuristic)
                .with_tf32(false)
                .build()
                .error_on_failure();
            builder = builder.with_execution_providers([cuda]).map_err(|e| {
                ModelError::CudaUnavailable {
                    device,
                    reason: cuda_hint(&e.to_string()),
                }
            })?;
        }
        Ok(builder)
    }

    /// Opens one graph file on `device`.
    pub fn open_session(&self, path: &Path, device: Device) -> Result<Session, ModelError> {
        let mut builder = self.session_builder(device)?;
        builder
            .commit_from_file(path)
            .map_err(|source| ModelError::Session {
                path: path.to_path_buf(),
                source,
            })
    }
}

fn cuda_hint(reason: &str) -> String {
    let mut out = reason.trim().trim_end_matches('.').to_string();
    if out.is_empty() {
        out = "registration failed".into();
    }
    if out.contains("cannot open shared object file") {
        // The CUDA build is there but a library it links (cuBLAS, cuDNN, cudart, ...) is not.
        out.push_str(
            ". The CUDA provider needs CUDA 13 and cuDNN 9 libraries: `scripts/setup.sh --gpu` installs them as \
             nvidia-* wheels into the virtualenv (PIXTRACT_VENV names another one holding them), or put them on \
             LD_LIBRARY_PATH; use --device cpu to run on the CPU",
        );
    } else {
        out.push_str(
            ". The CPU onnxruntime wheel has no CUDA provider: run `scripts/setup.sh --gpu` (onnxruntime-gpu, CUDA \
             13) on a machine with an NVIDIA driver, or set ORT_DYLIB_PATH to a CUDA-enabled libonnxruntime; use \
             --device cpu to run on the CPU",
        );
    }
    out
}

/// The onnxruntime-gpu wheel's CUDA provider needs cuBLAS, cuDNN, ... from the `nvidia-*` wheels, which are not on
/// the loader's path. Preloading them by full path lets the provider find them without LD_LIBRARY_PATH.
fn preload_cuda_wheels(search: &SearchPaths) {
    const WANTED: &[&str] = &[
        "libcudart.so.13",
        "libcublasLt.so.13",
        "libcublas.so.13",
        "libnvrtc.so.13",
        "libcurand.so.10",
        "libcufft.so.12",
        "libcudnn.so.9",
        "libcudnn_graph.so.9",
        "libcudnn_ops.so.9",
        "libcudnn_heuristic.so.9",
        "libcudnn_adv.so.9",
        "libcudnn_cnn.so.9",
        "libcudnn_engines_precompiled.so.9",
        "libcudnn_engines_runtime_compiled.so.9",
    ];
    let mut dirs = Vec::new();
    for site in search.site_packages() {
        collect_lib_dirs(&site.join("nvidia"), 0, &mut dirs);
    }
    for name in WANTED {
        if let Some(path) = dirs.iter().map(|d| d.join(name)).find(|p| p.is_file()) {
            // Failure here is reported by the provider's own registration error, which names the library.
            let _ = ort::util::preload_dylib(&path);
        }
    }
}

fn collect_lib_dirs(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) {
    if depth > 3 {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n == "lib") {
                out.push(path.clone());
            }
            collect_lib_dirs(&path, depth + 1, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices() {
        assert_eq!("cpu".parse::<Device>().unwrap(), Device::Cpu);
        assert_eq!("CUDA".parse::<Device>().unwrap(), Device::Cuda(0));
        assert_eq!("cuda:3".parse::<Device>().unwrap(), Device::Cuda(3));
        for bad in ["cuda:-1", "cuda:x", "tpu", ""] {
            let err = bad.parse::<Device>().unwrap_err().to_string();
            assert!(err.contains("expected cpu, cuda or cuda:N"), "{bad}: {err}");
        }
        assert_eq!(Device::Cuda(1).to_string(), "cuda:1");
    }
}
