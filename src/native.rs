//! Finding the native libraries pixtract loads at run time: libonnxruntime and libpdfium.
//!
//! Both come from PyPI wheels installed by `scripts/setup.sh` into the project's virtualenv, so nothing is
//! downloaded by the binary. Order of precedence: an explicit environment variable (`ORT_DYLIB_PATH`,
//! `PDFIUM_DYLIB_PATH`), then the virtualenv named by `PIXTRACT_VENV`, then a `.venv` in the current directory or
//! one of its parents, then a `.venv` above the executable (a `target/debug/pixtract` in a checkout).
//! An explicit variable that points nowhere is an error, never a silent fallback to another library.

use std::fmt;
use std::path::{Path, PathBuf};

/// The native libraries pixtract needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NativeLibrary {
    OnnxRuntime,
    Pdfium,
}

impl NativeLibrary {
    /// Environment variable that names the library file explicitly.
    pub fn env_var(self) -> &'static str {
        match self {
            NativeLibrary::OnnxRuntime => "ORT_DYLIB_PATH",
            NativeLibrary::Pdfium => "PDFIUM_DYLIB_PATH",
        }
    }

    fn wheel(self) -> &'static str {
        match self {
            NativeLibrary::OnnxRuntime => "onnxruntime (or onnxruntime-gpu)",
            NativeLibrary::Pdfium => "pypdfium2",
        }
    }
}

impl fmt::Display for NativeLibrary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NativeLibrary::OnnxRuntime => "libonnxruntime",
            NativeLibrary::Pdfium => "libpdfium",
        })
    }
}

/// Where a library was found, and why that place was chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LibraryLocation {
    pub library: NativeLibrary,
    pub path: PathBuf,
    pub origin: Origin,
    /// Version as far as the file tells it (the versioned file name of the onnxruntime wheel; pypdfium2's
    /// version.json for pdfium).
    pub version: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Named by its environment variable.
    EnvVar(&'static str),
    /// Found inside this virtualenv.
    Virtualenv(PathBuf),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::EnvVar(var) => write!(f, "from ${var}"),
            Origin::Virtualenv(dir) => write!(f, "from virtualenv {}", dir.display()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NativeError {
    #[error("{var}={} does not exist; point it at the {library} shared library file or unset it", path.display())]
    EnvPathMissing {
        library: NativeLibrary,
        var: &'static str,
        path: PathBuf,
    },
    #[error(
        "{library} not found (looked in: {}). Run `scripts/setup.sh` to install the {wheel} wheel into the \
         project's virtualenv, or set {var} to the library file",
        searched_list(searched),
        wheel = library.wheel(),
        var = library.env_var()
    )]
    NotFound {
        library: NativeLibrary,
        searched: Vec<PathBuf>,
    },
}

fn searched_list(paths: &[PathBuf]) -> String {
    if paths.is_empty() {
        return "no virtualenv found".to_string();
    }
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Where to look: the inputs of the search, kept explicit so tests can drive it without touching the process
/// environment.
#[derive(Debug, Clone, Default)]
pub struct SearchPaths {
    /// Values of `ORT_DYLIB_PATH` / `PDFIUM_DYLIB_PATH`.
    pub ort_override: Option<PathBuf>,
    pub pdfium_override: Option<PathBuf>,
    /// Candidate virtualenv directories, best first.
    pub virtualenvs: Vec<PathBuf>,
}

impl SearchPaths {
    /// The search this process would do: environment variables, `PIXTRACT_VENV`, `.venv` above the current
    /// directory and above the executable.
    pub fn from_env() -> Self {
        let var = |name: &str| {
            std::env::var_os(name)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let mut virtualenvs = Vec::new();
        if let Some(v) = var("PIXTRACT_VENV") {
            virtualenvs.push(v);
        }
        let mut push_ancestors = |start: &Path| {
            for dir in start.ancestors() {
                let candidate = dir.join(".venv");
                if candidate.is_dir() && !virtualenvs.contains(&candidate) {
                    virtualenvs.push(candidate);
                }
            }
        };
        if let Ok(cwd) = std::env::current_dir() {
            push_ancestors(&cwd);
        }
        if let Ok(exe) = std::env::current_exe()
            && let Some(dir) = exe.parent()
        {
            push_ancestors(dir);
        }
        SearchPaths {
            ort_override: var("ORT_DYLIB_PATH"),
            pdfium_override: var("PDFIUM_DYLIB_PATH"),
            virtualenvs,
        }
    }

    /// Locates one library following the documented precedence.
    pub fn locate(&self, library: NativeLibrary) -> Result<LibraryLocation, NativeError> {
        let explicit = match library {
            NativeLibrary::OnnxRuntime => &self.ort_override,
            NativeLibrary::Pdfium => &self.pdfium_override,
        };
        if let Some(path) = explicit {
            if !path.is_file() {
                return Err(NativeError::EnvPathMissing {
                    library,
                    var: library.env_var(),
                    path: path.clone(),
                });
            }
            return Ok(LibraryLocation {
                library,
                path: path.clone(),
                origin: Origin::EnvVar(library.env_var()),
                version: version_of(library, path),
            });
        }
        let mut searched = Vec::new();
        for venv in &self.virtualenvs {
            for site in site_packages(venv) {
                let found = match library {
                    NativeLibrary::OnnxRuntime => {
                        newest_onnxruntime(&site.join("onnxruntime").join("capi"))
                    }
                    NativeLibrary::Pdfium => {
                        let p = site.join("pypdfium2_raw").join("libpdfium.so");
                        p.is_file().then_some(p)
                    }
                };
                if let Some(path) = found {
                    return Ok(LibraryLocation {
                        library,
                        version: version_of(library, &path),
                        path,
                        origin: Origin::Virtualenv(venv.clone()),
                    });
                }
                searched.push(site);
            }
            if !searched.iter().any(|s| s.starts_with(venv)) {
                searched.push(venv.clone());
            }
        }
        Err(NativeError::NotFound { library, searched })
    }

    /// `site-packages` directories of the first virtualenv that has any (for CUDA runtime wheels).
    pub fn site_packages(&self) -> Vec<PathBuf> {
        self.virtualenvs
            .iter()
            .flat_map(|v| site_packages(v))
            .collect()
    }
}

/// `<venv>/lib/python3.*/site-packages`, newest Python first.
fn site_packages(venv: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(venv.join("lib"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
        .map(|e| e.path().join("site-packages"))
        .filter(|p| p.is_dir())
        .collect();
    out.sort();
    out.reverse();
    out
}

/// The wheel ships `libonnxruntime.so.1.32.0` and no unversioned name: take the highest version present.
fn newest_onnxruntime(capi: &Path) -> Option<PathBuf> {
    let mut best: Option<(Vec<u32>, PathBuf)> = None;
    for entry in std::fs::read_dir(capi).ok()?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("libonnxruntime.so") else {
            continue;
        };
        let version: Vec<u32> = rest
            .trim_start_matches('.')
            .split('.')
            .filter_map(|p| p.parse().ok())
            .collect();
        if best.as_ref().is_none_or(|(v, _)| version > *v) {
            best = Some((version, entry.path()));
        }
    }
    best.map(|(_, p)| p)
}

fn version_of(library: NativeLibrary, path: &Path) -> Option<String> {
    match library {
        NativeLibrary::OnnxRuntime => {
            let name = path.file_name()?.to_string_lossy().into_owned();
            let v = name.strip_prefix("libonnxruntime.so.")?;
            (!v.is_empty()).then(|| v.to_string())
        }
        NativeLibrary::Pdfium => {
            // pypdfium2 writes the pdfium build it bundles next to the library.
            let text = std::fs::read_to_string(path.parent()?.join("version.json")).ok()?;
            let json: serde_json::Value = serde_json::from_str(&text).ok()?;
            let build = json.get("build")?.as_u64()?;
            let major = json.get("major").and_then(|m| m.as_u64()).unwrap_or(0);
            Some(format!("chromium/{build} (major {major})"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_venv(root: &Path, ort_versions: &[&str], pdfium: bool) -> PathBuf {
        let venv = root.join("venv");
        let site = venv.join("lib/python3.11/site-packages");
        std::fs::create_dir_all(site.join("onnxruntime/capi")).unwrap();
        for v in ort_versions {
            std::fs::write(
                site.join(format!("onnxruntime/capi/libonnxruntime.so.{v}")),
                b"",
            )
            .unwrap();
        }
        std::fs::write(
            site.join("onnxruntime/capi/libonnxruntime_providers_shared.so"),
            b"",
        )
        .unwrap();
        if pdfium {
            std::fs::create_dir_all(site.join("pypdfium2_raw")).unwrap();
            std::fs::write(site.join("pypdfium2_raw/libpdfium.so"), b"").unwrap();
            std::fs::write(
                site.join("pypdfium2_raw/version.json"),
                br#"{"major": 159, "build": 8149}"#,
            )
            .unwrap();
        }
        venv
    }

    #[test]
    fn picks_newest_versioned_onnxruntime_in_virtualenv() {
        let dir = tempfile::tempdir().unwrap();
        let venv = fake_venv(dir.path(), &["1.31.1", "1.32.0", "1.9.0"], true);
        let search = SearchPaths {
            virtualenvs: vec![venv.clone()],
            ..Default::default()
        };
        let ort = search.locate(NativeLibrary::OnnxRuntime).unwrap();
        assert!(
            ort.path.ends_with("libonnxruntime.so.1.32.0"),
            "{:?}",
            ort.path
        );
        assert_eq!(ort.version.as_deref(), Some("1.32.0"));
        assert_eq!(ort.origin, Origin::Virtualenv(venv));
        let pdfium = search.locate(NativeLibrary::Pdfium).unwrap();
        assert_eq!(pdfium.version.as_deref(), Some("chromium/8149 (major 159)"));
    }

    #[test]
    fn env_var_wins_over_virtualenv_and_must_exist() {
        let dir = tempfile::tempdir().unwrap();
        let venv = fake_venv(dir.path(), &["1.32.0"], true);
        let custom = dir.path().join("libonnxruntime.so.1.31.1");
        std::fs::write(&custom, b"").unwrap();
        let mut search = SearchPaths {
            ort_override: Some(custom.clone()),
            virtualenvs: vec![venv],
            ..Default::default()
        };
        let ort = search.locate(NativeLibrary::OnnxRuntime).unwrap();
        assert_eq!(ort.path, custom);
        assert_eq!(ort.origin, Origin::EnvVar("ORT_DYLIB_PATH"));

        search.ort_override = Some(dir.path().join("nope.so"));
        let err = search.locate(NativeLibrary::OnnxRuntime).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("ORT_DYLIB_PATH=") && msg.contains("does not exist"),
            "{msg}"
        );
    }

    #[test]
    fn missing_library_says_how_to_fix_it() {
        let dir = tempfile::tempdir().unwrap();
        let venv = fake_venv(dir.path(), &[], false);
        let search = SearchPaths {
            virtualenvs: vec![venv],
            ..Default::default()
        };
        let msg = search
            .locate(NativeLibrary::Pdfium)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("libpdfium not found"), "{msg}");
        assert!(
            msg.contains("scripts/setup.sh") && msg.contains("PDFIUM_DYLIB_PATH"),
            "{msg}"
        );
        assert!(msg.contains("site-packages"), "{msg}");
    }
}
