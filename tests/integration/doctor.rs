use crate::util::{pixtract, repo_root, text, tiny_model};

#[test]
fn doctor_finds_libraries_and_opens_the_tiny_model() {
    let model = tiny_model();
    let out = pixtract(
        &[
            "doctor",
            "--model",
            model.to_str().unwrap(),
            "--verify-hashes",
        ],
        &[],
        &repo_root(),
    );
    let t = text(&out);
    assert!(out.status.success(), "doctor failed:\n{t}");
    assert!(
        t.contains("[ok  ] onnxruntime") && t.contains("libonnxruntime.so.1."),
        "{t}"
    );
    assert!(
        t.contains("[ok  ] pdfium") && t.contains("rendered a test page"),
        "{t}"
    );
    assert!(t.contains("pixtral-tiny-random-"), "{t}");
    assert!(t.contains("sha256 verified"), "{t}");
    assert!(
        t.contains("sessions open on cpu: vision_encoder") && t.contains("decoder"),
        "{t}"
    );
    // The KV cache figure follows the manifest's architecture (tiny: well under a KiB per token).
    let m = crate::util::read_json(&model.join("pixtract-model.json"));
    let text_cfg = &m["text"];
    let per_token = text_cfg["num_layers"].as_u64().unwrap()
        * 2
        * text_cfg["num_key_value_heads"].as_u64().unwrap()
        * text_cfg["head_dim"].as_u64().unwrap()
        * 4;
    let side =
        m["image"]["max_image_size"].as_u64().unwrap() / m["image"]["patch_size"].as_u64().unwrap();
    assert!(
        t.contains(&format!(
            "KV cache {per_token} B per token (fp32); a full-size page ({} image tokens)",
            side * (side + 1)
        )),
        "{t}"
    );
    assert!(
        t.contains("batching: static (eager export: a batch runs until its longest answer ends)"),
        "{t}"
    );
    assert!(t.contains("all checks passed"), "{t}");
    // A GroupQueryAttention export batches continuously.
    let gqa = crate::util::tiny_gqa_model();
    let out = pixtract(
        &["doctor", "--model", gqa.to_str().unwrap()],
        &[],
        &repo_root(),
    );
    let t = text(&out);
    assert!(out.status.success(), "doctor failed:\n{t}");
    assert!(t.contains("batching: continuous"), "{t}");
}

#[test]
fn doctor_fails_with_a_fix_when_a_library_is_missing() {
    let out = pixtract(
        &["doctor", "--model", tiny_model().to_str().unwrap()],
        &[("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so")],
        &repo_root(),
    );
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("[FAIL] onnxruntime"), "{t}");
    assert!(
        t.contains("ORT_DYLIB_PATH=/nonexistent/libonnxruntime.so does not exist"),
        "{t}"
    );

    // Run from a directory without models/: doctor fails and says how to export one.
    let empty = tempfile::tempdir().unwrap();
    let out = pixtract(&["doctor"], &[], empty.path());
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("no model directory found"), "{t}");
    assert!(
        t.contains("scripts/setup.sh") && t.contains("--checkpoint"),
        "{t}"
    );
}

#[test]
fn doctor_refuses_cuda_instead_of_falling_back_to_cpu() {
    if std::path::Path::new("/dev/nvidia0").exists() {
        // On a GPU machine with the GPU wheel this registers; the CPU-only assertion below does not apply.
        return;
    }
    let out = pixtract(
        &[
            "doctor",
            "--model",
            tiny_model().to_str().unwrap(),
            "--device",
            "cuda",
        ],
        &[],
        &repo_root(),
    );
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("[FAIL] cuda"), "{t}");
    assert!(t.contains("scripts/setup.sh --gpu"), "{t}");
}

#[test]
fn doctor_reports_a_damaged_model_directory() {
    let src = tiny_model();
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&src).unwrap().flatten() {
        if entry.path().is_file() {
            std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
        }
    }
    // Truncate the decoder as an interrupted copy would.
    let decoder = dir.path().join("decoder_model_merged.onnx");
    let bytes = std::fs::read(&decoder).unwrap();
    std::fs::write(&decoder, &bytes[..bytes.len() / 2]).unwrap();
    let out = pixtract(
        &["doctor", "--model", dir.path().to_str().unwrap()],
        &[],
        &repo_root(),
    );
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("decoder_model_merged.onnx has"), "{t}");
    assert!(t.contains("incomplete copy?"), "{t}");
}
