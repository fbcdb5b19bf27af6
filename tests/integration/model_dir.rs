use std::collections::BTreeMap;

use pixtract::model::{Device, ModelDir};

use crate::util::{read_json, runtime, tiny_model};

#[test]
fn manifest_describes_the_tiny_model() {
    let model = ModelDir::open(tiny_model()).expect("tiny model opens");
    let m = &model.manifest;
    assert_eq!(m.dtype, "fp32");
    assert_eq!(m.text.num_layers, 2);
    assert_eq!(m.text.num_key_value_heads, 2);
    assert_eq!(m.text.head_dim, 16);
    assert_eq!(m.text.vocab_size, 131_072);
    assert_eq!(m.vision.patch_size, 16);
    assert_eq!(m.image.max_image_size, 1024);
    assert_eq!(
        (
            m.tokens.bos,
            m.tokens.eos,
            m.tokens.img,
            m.tokens.img_break,
            m.tokens.img_end
        ),
        (1, 2, 10, 12, 13)
    );
    model.verify_hashes().expect("hashes match the manifest");
}

/// The manifest's input/output names and types are what ONNX Runtime reports for the graphs.
#[test]
fn manifest_io_matches_the_graphs_onnx_runtime_loads() {
    let model = ModelDir::open(tiny_model()).unwrap();
    let rt = runtime();
    for (name, graph) in model.manifest.graphs.iter() {
        let session = rt
            .open_session(&model.path_of(&graph.file), Device::Cpu)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let actual: BTreeMap<String, String> = session
            .inputs()
            .iter()
            .chain(session.outputs().iter())
            .map(|o| (o.name().to_string(), format!("{:?}", o.dtype())))
            .collect();
        let expected: Vec<&str> = graph
            .inputs
            .iter()
            .chain(graph.outputs.iter())
            .map(|t| t.name.as_str())
            .collect();
        assert_eq!(actual.len(), expected.len(), "{name}: {actual:?}");
        for spec in graph.inputs.iter().chain(graph.outputs.iter()) {
            let ty = actual
                .get(&spec.name)
                .unwrap_or_else(|| panic!("{name}: ONNX Runtime has no {}", spec.name));
            let want = match spec.dtype.as_str() {
                "float32" => "Float32",
                "float16" => "Float16",
                "int64" => "Int64",
                other => panic!("unexpected dtype {other}"),
            };
            assert!(ty.contains(want), "{name}.{}: {ty} vs {want}", spec.name);
        }
    }
    // The decoder returns the last position's logits only: [batch, 1, vocab].
    let logits = &model.manifest.graphs.decoder.outputs[0];
    assert_eq!(logits.name, "logits");
    assert_eq!(logits.shape[1], serde_json::json!(1));
    assert_eq!(logits.shape[2], serde_json::json!(131_072));
}

#[test]
fn broken_manifests_are_refused_with_the_reason() {
    let src = tiny_model();
    let manifest = read_json(&src.join("pixtract-model.json"));
    let dir = tempfile::tempdir().unwrap();
    let write = |value: &serde_json::Value| {
        std::fs::write(
            dir.path().join("pixtract-model.json"),
            serde_json::to_string(value).unwrap(),
        )
        .unwrap();
    };

    let mut wrong_version = manifest.clone();
    wrong_version["format_version"] = serde_json::json!(99);
    write(&wrong_version);
    let err = ModelDir::open(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("version 99") && err.contains("re-export"),
        "{err}"
    );

    // Version 2 names the family and its image-token layout; version 1 (no family) is Pixtral's.
    let mut v2 = manifest.clone();
    v2["format_version"] = serde_json::json!(2);
    v2["family"] = serde_json::json!("pixtral");
    v2["image_tokens"] =
        serde_json::json!({"patch_size": 16, "spatial_merge": 1, "break_tokens": true});
    let mut v1 = manifest.clone();
    v1["format_version"] = serde_json::json!(1);
    if let Some(o) = v1.as_object_mut() {
        o.remove("family");
        o.remove("image_tokens");
    }
    for accepted in [&v1, &v2] {
        write(accepted);
        let err = ModelDir::open(dir.path()).unwrap_err().to_string();
        // The manifest is read; what is missing is the graphs (this folder holds the manifest alone).
        assert!(err.contains("missing or unreadable"), "{err}");
    }
    let mut unnamed = v2.clone();
    unnamed.as_object_mut().unwrap().remove("family");
    write(&unnamed);
    let err = ModelDir::open(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("names no family") && err.contains("export.py"),
        "{err}"
    );
    // The Mistral 3 family is read with its 2x2 merge; a layout that is not its own is refused.
    let mut mistral3 = v2.clone();
    mistral3["family"] = serde_json::json!("mistral3");
    mistral3["image_tokens"]["spatial_merge"] = serde_json::json!(2);
    write(&mistral3);
    let err = ModelDir::open(dir.path()).unwrap_err().to_string();
    assert!(err.contains("missing or unreadable"), "{err}");
    mistral3["image_tokens"]["spatial_merge"] = serde_json::json!(1);
    write(&mistral3);
    let err = ModelDir::open(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("is not mistral3's") && err.contains("2x2 patches a token"),
        "{err}"
    );
    let mut other = v2.clone();
    other["family"] = serde_json::json!("gemma3");
    write(&other);
    let err = ModelDir::open(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("model family \"gemma3\"")
            && err.contains("runs pixtral, mistral3")
            && err.contains("export.py"),
        "{err}"
    );

    let mut fewer_layers = manifest.clone();
    fewer_layers["text"]["num_layers"] = serde_json::json!(3);
    write(&fewer_layers);
    let err = ModelDir::open(dir.path()).unwrap_err().to_string();
    assert!(err.contains("past_key_values.2.key"), "{err}");

    write(&manifest);
    let err = ModelDir::open(dir.path()).unwrap_err().to_string();
    assert!(err.contains("missing or unreadable"), "{err}");

    std::fs::write(dir.path().join("pixtract-model.json"), "{ not json").unwrap();
    let err = ModelDir::open(dir.path()).unwrap_err().to_string();
    assert!(err.contains("not valid JSON"), "{err}");
}
