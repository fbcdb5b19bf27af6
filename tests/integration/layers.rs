//! The library's structure, checked on every test run: no import circle between files, no stage importing a
//! later stage, clap only in the binary's command line (`scripts/check_layers.py`, which names each violation).

use std::process::Command;

use crate::util::repo_root;

#[test]
fn modules_form_layers_without_circles() {
    let root = repo_root();
    let out = Command::new("python3")
        .arg(root.join("scripts/check_layers.py"))
        .arg(root.join("src"))
        .output()
        .expect("python3 runs scripts/check_layers.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("layers ok"), "{stdout}");
}

/// The exporter's package has no import circle either (`onnx-export/check_imports.py`, lazy imports included):
/// families above checkpoint layouts above leaf helpers.
#[test]
fn exporter_modules_import_without_circles() {
    let root = repo_root();
    let out = Command::new("python3")
        .arg(root.join("onnx-export/check_imports.py"))
        .output()
        .expect("python3 runs onnx-export/check_imports.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("no import circles"), "{stdout}");
}
