use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use pixtract::model::OrtRuntime;
use pixtract::native::{NativeLibrary, SearchPaths};

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The tiny model made by `scripts/setup.sh`. Missing is a failure with the fix, not a skip.
pub fn tiny_model() -> PathBuf {
    let dir = repo_root().join("models/tiny");
    assert!(
        dir.join("pixtract-model.json").is_file(),
        "{} has no exported tiny model: run `scripts/setup.sh` (or `make test`, which runs it)",
        dir.display()
    );
    dir
}

pub fn python() -> PathBuf {
    let py = repo_root().join(".venv/bin/python");
    assert!(
        py.is_file(),
        "{} missing: run `scripts/setup.sh`",
        py.display()
    );
    py
}

pub fn search_paths() -> SearchPaths {
    SearchPaths {
        virtualenvs: vec![repo_root().join(".venv")],
        ..Default::default()
    }
}

/// One ONNX Runtime environment per process (ort allows no second one).
pub fn runtime() -> &'static OrtRuntime {
    static RT: OnceLock<OrtRuntime> = OnceLock::new();
    RT.get_or_init(|| {
        let lib = search_paths()
            .locate(NativeLibrary::OnnxRuntime)
            .expect("libonnxruntime in .venv: run scripts/setup.sh");
        OrtRuntime::load(lib).expect("ONNX Runtime loads")
    })
}

/// Runs the pixtract binary with a clean library environment (no inherited overrides).
pub fn pixtract(args: &[&str], envs: &[(&str, &str)], cwd: &Path) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pixtract"));
    cmd.args(args)
        .current_dir(cwd)
        .env_remove("ORT_DYLIB_PATH")
        .env_remove("PDFIUM_DYLIB_PATH")
        .env("PIXTRACT_VENV", repo_root().join(".venv"));
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().expect("run pixtract")
}

pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}
