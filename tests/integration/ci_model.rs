//! The CI-sized model with Pixtral 12B's geometry (models/ci): text head_dim 128 with a 4:1 query:KV head ratio,
//! vision head_dim 64, the real vocabulary, and embed_tokens + decoder weights in external data files, exported by
//! the Python exporter from a seeded random checkpoint in the mistral-community/pixtral-12b layout. What the tiny
//! model cannot show: heads x head_dim != hidden, several query heads per KV head in the engine's cache handling,
//! and graphs whose weights live beside them.

use pixtract::model::manifest::sha256_file;

use crate::util::{ci_checkpoint, ci_model, export_tool, pixtract, read_json, repo_root, text};

#[test]
fn ci_model_has_the_real_head_geometry_and_external_data() {
    let model = ci_model();
    let m = read_json(&model.join("pixtract-model.json"));
    assert_eq!(m["text"]["head_dim"], 128);
    assert_eq!(m["text"]["num_attention_heads"], 16);
    assert_eq!(m["text"]["num_key_value_heads"], 4);
    assert_ne!(
        m["text"]["num_attention_heads"].as_u64().unwrap() * 128,
        m["text"]["hidden_size"].as_u64().unwrap(),
        "heads x head_dim must differ from hidden, as in Pixtral 12B"
    );
    assert_eq!(m["text"]["vocab_size"], 131072);
    assert_eq!(m["vision"]["head_dim"], 64);
    assert_eq!(m["source"]["kind"], "checkpoint");
    for graph in ["embed_tokens", "decoder"] {
        let ext = &m["graphs"][graph]["external_data"];
        let file = ext["file"]
            .as_str()
            .unwrap_or_else(|| panic!("{graph} has no external data: {m}"));
        let len = std::fs::metadata(model.join(file)).unwrap().len();
        assert_eq!(ext["bytes"].as_u64().unwrap(), len, "{graph}");
        assert!(len > 64 << 20, "{graph}: {len} bytes");
    }
    // The sizes arithmetic (parameter shapes x formats) equals the initializers, and the manifest the files on disk.
    let out = export_tool(&[
        "sizes",
        "--checkpoint",
        ci_checkpoint().to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
    ]);
    let t = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{t}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(t.matches("(ok)").count(), 6, "{t}");
    assert!(!t.contains("MISMATCH"), "{t}");
}

/// Rust engine vs transformers on the CI model's own reference cases: input ids identical, first-step logits within
/// tolerance, 32 greedy tokens identical, batched runs equal one-by-one runs.
#[test]
fn ci_model_engine_matches_transformers() {
    let model = ci_model();
    let out = pixtract(
        &["verify", "--model", model.to_str().unwrap()],
        &[],
        &repo_root(),
    );
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("11/11 cases pass"), "{t}");
    assert!(
        t.contains("tokens equal to one-by-one runs in 11/11 cases"),
        "{t}"
    );
}

/// The exporter's own parity: ONNX Runtime vs the torch model loaded from the checkpoint (vision at several sizes,
/// batched left-padded prefill, decode steps, greedy tokens vs generate()).
#[test]
fn ci_model_exporter_verify_passes() {
    let out = export_tool(&[
        "verify",
        "--model",
        ci_model().to_str().unwrap(),
        "--checkpoint",
        ci_checkpoint().to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "verify failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("[ok] prefill logits"), "{stdout}");
    assert!(stdout.contains("[ok] decode steps"), "{stdout}");
    assert!(
        stdout.contains("[ok] greedy tokens: 20/20 identical"),
        "{stdout}"
    );
    assert!(!stdout.contains("FAIL"), "{stdout}");
}

/// `pixtract doctor --model DIR --verify-hashes`.
fn doctor_verify_hashes(model: &std::path::Path) -> std::process::Output {
    pixtract(
        &[
            "doctor",
            "--model",
            model.to_str().unwrap(),
            "--verify-hashes",
        ],
        &[],
        &repo_root(),
    )
}

/// `doctor --verify-hashes` hashes the external data files too: one changed byte in the decoder's data is named.
#[test]
fn doctor_verifies_external_data_hashes() {
    let src = ci_model();
    let ok = doctor_verify_hashes(&src);
    let t = text(&ok);
    assert!(ok.status.success(), "{t}");
    assert!(t.contains("sha256 verified"), "{t}");

    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&src).unwrap().flatten() {
        if entry.path().is_file() {
            std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
        }
    }
    let data = dir.path().join("decoder_model_merged.onnx_data");
    let mut bytes = std::fs::read(&data).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&data, &bytes).unwrap();
    let out = doctor_verify_hashes(dir.path());
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(
        t.contains("decoder_model_merged.onnx_data has sha256"),
        "{t}"
    );
}

/// Quantizing a model whose float graphs keep external data: the int4 decoder fits in one file, and the manifest must
/// not keep listing the float decoder's `.onnx_data` (it once did: doctor then failed on a file that is not there).
#[test]
fn quantized_ci_model_lists_only_its_own_files() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("ci-int4");
    let out = export_tool(&[
        "quantize",
        "--model",
        ci_model().to_str().unwrap(),
        "--bits",
        "4",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = read_json(&out_dir.join("pixtract-model.json"));
    assert_eq!(m["variant"], "int4");
    assert!(m["graphs"]["decoder"].get("external_data").is_none(), "{m}");
    assert!(m["graphs"]["embed_tokens"]["external_data"]["file"].is_string());
    let ok = doctor_verify_hashes(&out_dir);
    let t = text(&ok);
    assert!(ok.status.success(), "{t}");
    assert!(t.contains("sha256 verified"), "{t}");
}

/// The same seed and arguments write the same checkpoint bytes (the CI checkpoint is rebuilt and compared).
#[test]
fn random_checkpoint_is_deterministic() {
    let tmp = tempfile::tempdir().unwrap();
    let again = tmp.path().join("ci-checkpoint");
    let out = export_tool(&[
        "random-checkpoint",
        "--like",
        "pixtral-ci",
        "--text-layers",
        "2",
        "--vision-layers",
        "2",
        "--seed",
        "20241203",
        "--weight-std",
        "0.06",
        "--out",
        again.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "pixtract-random.json",
    ] {
        assert_eq!(
            sha256_file(&again.join(file)).unwrap(),
            sha256_file(&ci_checkpoint().join(file)).unwrap(),
            "{file} differs between two runs with the same seed"
        );
    }
}
