//! The Python exporter is a real tool: its `verify` must pass on the tiny model, and exporting twice must give
//! byte-identical graphs, tokenizer and reference fixtures.

use std::collections::BTreeMap;
use std::path::Path;

use pixtract::model::manifest::sha256_file;

use crate::util::{export_tool, python_json, read_json, tiny_gqa_model, tiny_model};

#[test]
fn verify_passes_on_the_tiny_model_with_identical_greedy_tokens() {
    let out = export_tool(&["verify", "--model", tiny_model().to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "verify failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.matches("[ok] vision").count(), 4, "{stdout}");
    assert!(stdout.contains("[ok] prefill logits"), "{stdout}");
    assert!(stdout.contains("[ok] decode steps"), "{stdout}");
    assert!(
        stdout.contains("[ok] greedy tokens: 20/20 identical"),
        "{stdout}"
    );
    assert!(!stdout.contains("FAIL"), "{stdout}");
}

fn tree_hashes(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            let name = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            if name.starts_with('.') {
                continue; // set-up stamp
            }
            if path.is_dir() {
                stack.push(path);
            } else {
                out.insert(name, sha256_file(&path).unwrap());
            }
        }
    }
    out
}

#[test]
fn tiny_export_and_reference_are_deterministic() {
    let tmp = tempfile::tempdir().unwrap();
    let again = tmp.path().join("tiny");
    let out = export_tool(&["export", "--tiny", "--out", again.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = export_tool(&["reference", "--model", again.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let first = tree_hashes(&tiny_model());
    let second = tree_hashes(&again);
    assert_eq!(
        first.keys().collect::<Vec<_>>(),
        second.keys().collect::<Vec<_>>()
    );
    for (file, hash) in &first {
        assert_eq!(hash, &second[file], "{file} differs between two exports");
    }
    let manifest = read_json(&again.join("pixtract-model.json"));
    assert_eq!(
        manifest["weights_sha256"],
        read_json(&tiny_model().join("pixtract-model.json"))["weights_sha256"]
    );
    // The fixtures cover every case the foundation issue lists.
    let cases = read_json(&again.join("reference/cases.json"));
    let names: Vec<&str> = cases["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    for want in [
        "wide_page",
        "tall_receipt",
        "tiny_image",
        "large_scan",
        "rgba",
        "grayscale",
        "two_images",
        "text_only",
        "multilingual",
    ] {
        assert!(names.contains(&want), "missing case {want}: {names:?}");
    }
    for name in names {
        let case = read_json(&again.join("reference").join(name).join("case.json"));
        assert_eq!(
            case["greedy_tokens"].as_array().unwrap().len(),
            32,
            "{name}"
        );
        assert_eq!(
            case["first_step_top_k"]["ids"].as_array().unwrap().len(),
            10
        );
    }
}

#[test]
fn exporter_refuses_bad_input_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let out = export_tool(&[
        "export",
        "--checkpoint",
        tmp.path().to_str().unwrap(),
        "--out",
        tmp.path().join("out").to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("no config.json") && err.contains("pixtral-12b"),
        "{err}"
    );
    assert!(!err.contains("Traceback"), "{err}");

    let out = export_tool(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for cmd in ["export", "verify", "reference"] {
        assert!(help.contains(cmd), "{help}");
    }
}

/// The decoder export's two speed properties (docs/exporter.md, "Attention variants"): no per-query-head copy of the KV cache
/// (transformers' `repeat_kv` exports as Expand over the cache) and no float->float Cast producing fp32 logits.
/// Each was a pure copy of ~14% / ~18% of a batch-8 decode step on the tiny model.
#[test]
fn decoder_graph_copies_neither_the_cache_per_head_nor_the_logits() {
    let script = r#"
import json, sys, onnx
m = onnx.load(sys.argv[1], load_external_data=False)
producer = {o: n.op_type for n in m.graph.node for o in n.output}
logits_type = next(o.type.tensor_type.elem_type for o in m.graph.output if o.name == "logits")
print(json.dumps({
    "expand": sum(n.op_type == "Expand" for n in m.graph.node),
    "logits_producer": producer["logits"],
    "logits_fp32": logits_type == onnx.TensorProto.FLOAT,
    "past_inputs": sum(i.name.startswith("past_key_values.") for i in m.graph.input),
}))
"#;
    let decoder = tiny_model().join("decoder_model_merged.onnx");
    let facts = python_json(script, &[decoder.to_str().unwrap()]);
    assert_eq!(facts["past_inputs"], 4, "{facts}");
    assert_eq!(
        facts["expand"], 0,
        "KV cache expanded per query head: {facts}"
    );
    assert_eq!(facts["logits_fp32"], true, "{facts}");
    assert_ne!(
        facts["logits_producer"], "Cast",
        "identity Cast on fp32 logits: {facts}"
    );
}

/// The `--attention gqa` decoder (models/tiny-gqa): every cache input feeds only a GroupQueryAttention node and
/// every cache output comes from one, so a caller that binds one buffer as both gets the cache written in place;
/// nothing in the graph concatenates or copies it, and no attention mask is needed (rows carry their lengths).
#[test]
fn gqa_decoder_graph_hands_the_cache_only_to_group_query_attention() {
    let script = r#"
import json, sys, onnx
m = onnx.load(sys.argv[1], load_external_data=False)
consumers = {}
for n in m.graph.node:
    for i in n.input:
        consumers.setdefault(i, []).append(n.op_type)
producer = {o: n.op_type for n in m.graph.node for o in n.output}
print(json.dumps({
    "inputs": [i.name for i in m.graph.input],
    "past_consumers": sorted({op for i in m.graph.input if i.name.startswith("past_key_values.")
                              for op in consumers.get(i.name, [])}),
    "present_producers": sorted({producer[o.name] for o in m.graph.output if o.name.startswith("present.")}),
    "gqa_nodes": sum(n.op_type == "GroupQueryAttention" and n.domain == "com.microsoft" for n in m.graph.node),
}))
"#;
    let decoder = tiny_gqa_model().join("decoder_model_merged.onnx");
    let facts = python_json(script, &[decoder.to_str().unwrap()]);
    assert_eq!(facts["gqa_nodes"], 2, "one per layer: {facts}");
    assert_eq!(
        facts["past_consumers"],
        serde_json::json!(["GroupQueryAttention"]),
        "{facts}"
    );
    assert_eq!(
        facts["present_producers"],
        serde_json::json!(["GroupQueryAttention"]),
        "{facts}"
    );
    let inputs = facts["inputs"].as_array().unwrap();
    assert!(!inputs.iter().any(|i| i == "attention_mask"), "{facts}");
    assert!(inputs.iter().any(|i| i == "seqlens_k"), "{facts}");
}

/// The vision encoder's attention is one MultiHeadAttention node per layer (no MatMul/Softmax/MatMul chain that
/// materialises every layer's [heads, patches, patches] scores), in every export of the tiny model; the parity tests
/// hold its features to transformers'.
#[test]
fn vision_encoder_attends_through_multi_head_attention() {
    let script = r#"
import json, sys, onnx
m = onnx.load(sys.argv[1], load_external_data=False)
ops = [(n.domain, n.op_type) for n in m.graph.node]
print(json.dumps({
    "mha_nodes": sum(op == ("com.microsoft", "MultiHeadAttention") for op in ops),
    "softmax_nodes": sum(t == "Softmax" for _, t in ops),
}))
"#;
    for model in [tiny_model(), tiny_gqa_model()] {
        let manifest = read_json(&model.join("pixtract-model.json"));
        let layers = manifest["vision"]["num_layers"].as_u64().unwrap();
        let graph = model.join("vision_encoder.onnx");
        let facts = python_json(script, &[graph.to_str().unwrap()]);
        assert_eq!(facts["mha_nodes"], layers, "{}: {facts}", model.display());
        assert_eq!(facts["softmax_nodes"], 0, "{}: {facts}", model.display());
    }
}
