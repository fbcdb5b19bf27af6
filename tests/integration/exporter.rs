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
        err.contains("lacks config.json and *.safetensors")
            && err.contains("lacks params.json and consolidated.safetensors and tekken.json")
            && err.contains("pixtral-12b"),
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

/// Mistral's consolidated layout against Mistral's own RoPE convention, not against our own inverse: layer 0's q/k
/// projections of the consolidated file, rotated as Mistral's reference code does (dims 2i, 2i+1 as one complex
/// number; the vision encoder's even frequencies on the patch row, odd ones on the column), must give the attention
/// scores that the Hugging Face checkpoint's q/k give under transformers' own rotary embeddings and
/// `apply_rotary_pos_emb`. The same scores from the consolidated weights fed unpermuted to transformers are the
/// control: they must differ, or the check could not fail.
const ROPE_CONVENTION_CHECK: &str = r#"
import glob, json, sys, torch
from safetensors import safe_open
from transformers import LlavaConfig
from transformers.models.mistral.modeling_mistral import MistralRotaryEmbedding, apply_rotary_pos_emb
from transformers.models.pixtral.modeling_pixtral import PixtralVisionRotaryEmbedding

hf_dir, mistral_dir = sys.argv[1], sys.argv[2]
cfg = LlavaConfig.from_pretrained(hf_dir)
t, v = cfg.text_config, cfg.vision_config
hf = {}
for path in glob.glob(hf_dir + "/*.safetensors"):
    with safe_open(path, "pt") as f:
        # save_pretrained writes the names mistral-community's files have (language_model.model.*, vision_tower.*)
        hf.update({k.replace("language_model.model.", "text.").replace("vision_tower.", "vision."): f.get_tensor(k).double()
                   for k in f.keys() if ".layers.0." in k and ("q_proj" in k or "k_proj" in k)})
with safe_open(mistral_dir + "/consolidated.safetensors", "pt") as f:
    mi = {k: f.get_tensor(k).double() for k in f.keys() if "layers.0.attention.w" in k}
gen = torch.Generator().manual_seed(0)
rope_theta = lambda c: c.rope_parameters["rope_theta"] if getattr(c, "rope_parameters", None) else c.rope_theta

def complex_rope(x, angles):
    # fp32 angles, as in Mistral's reference code and in transformers, so both sides round them alike
    rot = torch.polar(torch.ones_like(angles), angles).to(torch.complex128)
    return torch.view_as_real(torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous()) * rot).flatten(-2)

def scores(q, k, group):  # q [H, N, d], k [KV, N, d] -> [H, N, N]
    return torch.stack([q[h] @ k[h // group].T for h in range(q.shape[0])])

n, d, H, KV = 6, t.head_dim, t.num_attention_heads, t.num_key_value_heads
pos = torch.tensor([0, 1, 7, 100, 4000, 123456])
x = torch.randn(n, t.hidden_size, generator=gen, dtype=torch.float64)
cos, sin = MistralRotaryEmbedding(t)(x[None].float(), pos[None])
def hf_text(wq, wk):
    q = (x @ wq.T).view(n, H, d).transpose(0, 1)[None]
    k = (x @ wk.T).view(n, KV, d).transpose(0, 1)[None]
    q, k = apply_rotary_pos_emb(q, k, cos.double(), sin.double())
    return scores(q[0], k[0], H // KV)
ang = torch.outer(pos.float(), 1.0 / (rope_theta(t) ** (torch.arange(0, d, 2).float() / d)))[:, None, :]
ref = scores(complex_rope((x @ mi["layers.0.attention.wq.weight"].T).view(n, H, d), ang).transpose(0, 1),
             complex_rope((x @ mi["layers.0.attention.wk.weight"].T).view(n, KV, d), ang).transpose(0, 1), H // KV)
got = hf_text(hf["text.layers.0.self_attn.q_proj.weight"], hf["text.layers.0.self_attn.k_proj.weight"])
unpermuted = hf_text(mi["layers.0.attention.wq.weight"], mi["layers.0.attention.wk.weight"])

hh, ww = torch.meshgrid(torch.arange(3), torch.arange(5), indexing="ij")
grid = torch.stack([hh.flatten(), ww.flatten()], -1)
vn, VH = grid.shape[0], v.num_attention_heads
vd = v.hidden_size // VH
y = torch.randn(vn, v.hidden_size, generator=gen, dtype=torch.float64)
vcos, vsin = PixtralVisionRotaryEmbedding(v)(y.float(), grid)
def hf_vision(wq, wk):
    q = (y @ wq.T).view(vn, VH, vd).transpose(0, 1)[None]
    k = (y @ wk.T).view(vn, VH, vd).transpose(0, 1)[None]
    q, k = apply_rotary_pos_emb(q, k, vcos.double(), vsin.double(), unsqueeze_dim=0)
    return scores(q[0], k[0], 1)
vinv = 1.0 / (rope_theta(v) ** (torch.arange(0, vd, 2).float() / vd))
vang = torch.cat([torch.outer(grid[:, 0].float(), vinv[0::2]), torch.outer(grid[:, 1].float(), vinv[1::2])], -1)[:, None, :]
p, hp = "vision_encoder.transformer.layers.0.attention.", "vision.transformer.layers.0.attention."
vref = scores(complex_rope((y @ mi[p + "wq.weight"].T).view(vn, VH, vd), vang).transpose(0, 1),
              complex_rope((y @ mi[p + "wk.weight"].T).view(vn, VH, vd), vang).transpose(0, 1), 1)
vgot = hf_vision(hf[hp + "q_proj.weight"], hf[hp + "k_proj.weight"])
vunpermuted = hf_vision(mi[p + "wq.weight"], mi[p + "wk.weight"])
rel = lambda a, b: float((a - b).abs().max() / b.abs().max())
print(json.dumps({"text": rel(got, ref), "text_unpermuted": rel(unpermuted, ref),
                  "vision": rel(vgot, vref), "vision_unpermuted": rel(vunpermuted, vref)}))
"#;

fn random_checkpoint(layout: &str, out: &Path) {
    let out_s = out.to_str().unwrap();
    let run = export_tool(&[
        "random-checkpoint",
        "--like",
        "pixtral-tiny",
        "--text-layers",
        "2",
        "--vision-layers",
        "2",
        "--seed",
        "7",
        "--weight-std",
        "0.2",
        "--layout",
        layout,
        "--out",
        out_s,
    ]);
    assert!(
        run.status.success(),
        "random-checkpoint --layout {layout}: {}",
        String::from_utf8_lossy(&run.stderr)
    );
}

/// Issue 15: the same seeded weights written in Mistral's consolidated layout (params.json,
/// consolidated.safetensors, tekken.json; the mistralai/Pixtral-12B-2409 download) and in the Hugging Face layout
/// (mistral-community/pixtral-12b) export to byte-identical graphs and tokenizer; the exporter says which layout it
/// found; a folder with only part of a layout gets one line naming what is missing.
#[test]
fn consolidated_layout_exports_the_same_graphs_as_the_hf_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let (hf_ckpt, mistral_ckpt) = (tmp.path().join("ck-hf"), tmp.path().join("ck-mistral"));
    random_checkpoint("hf", &hf_ckpt);
    random_checkpoint("consolidated", &mistral_ckpt);
    for file in ["params.json", "consolidated.safetensors", "tekken.json"] {
        assert!(mistral_ckpt.join(file).is_file(), "{file} not written");
    }
    assert!(!mistral_ckpt.join("config.json").exists());

    let rope = python_json(
        ROPE_CONVENTION_CHECK,
        &[hf_ckpt.to_str().unwrap(), mistral_ckpt.to_str().unwrap()],
    );
    for part in ["text", "vision"] {
        let diff = rope[part].as_f64().unwrap();
        let control = rope[format!("{part}_unpermuted")].as_f64().unwrap();
        assert!(
            diff < 1e-6,
            "{part} q/k not in Mistral's RoPE order: {rope}"
        );
        assert!(control > 0.1, "{part}: the control cannot fail: {rope}");
    }

    let mut exported = Vec::new();
    for (ckpt, layout_line) in [
        (&hf_ckpt, "Hugging Face layout"),
        (&mistral_ckpt, "Mistral consolidated layout"),
    ] {
        let out = tmp.path().join(format!(
            "model-{}",
            ckpt.file_name().unwrap().to_string_lossy()
        ));
        let run = export_tool(&[
            "export",
            "--checkpoint",
            ckpt.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        let stdout = String::from_utf8_lossy(&run.stdout);
        assert!(
            run.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&run.stderr)
        );
        assert!(stdout.contains(layout_line), "{stdout}");
        exported.push(out);
    }
    let (from_hf, from_mistral) = (tree_hashes(&exported[0]), tree_hashes(&exported[1]));
    assert_eq!(
        from_hf.keys().collect::<Vec<_>>(),
        from_mistral.keys().collect::<Vec<_>>()
    );
    for file in [
        "vision_encoder.onnx",
        "embed_tokens.onnx",
        "decoder_model_merged.onnx",
        "tokenizer.json",
    ] {
        assert_eq!(from_hf[file], from_mistral[file], "{file} differs");
    }
    let manifests = [
        read_json(&exported[0].join("pixtract-model.json")),
        read_json(&exported[1].join("pixtract-model.json")),
    ];
    assert_eq!(
        manifests[0]["weights_sha256"],
        manifests[1]["weights_sha256"]
    );
    assert_eq!(manifests[0]["text"], manifests[1]["text"]);
    assert_eq!(manifests[0]["vision"], manifests[1]["vision"]);
    assert_eq!(manifests[0]["source"]["layout"], "hf");
    assert_eq!(manifests[1]["source"]["layout"], "consolidated");

    // A cut download (the file ends inside a tensor): one line naming the file and the tensor, no traceback.
    let weights = mistral_ckpt.join("consolidated.safetensors");
    let len = std::fs::metadata(&weights).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&weights)
        .unwrap()
        .set_len(len * 3 / 5)
        .unwrap();
    let run = export_tool(&[
        "export",
        "--checkpoint",
        mistral_ckpt.to_str().unwrap(),
        "--out",
        tmp.path().join("cut").to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(2), "{err}");
    assert!(
        err.contains("consolidated.safetensors: ")
            && err.contains("the download is cut or corrupt"),
        "{err}"
    );
    assert!(!err.contains("Traceback"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        !tmp.path().join("cut").exists(),
        "nothing is left under --out"
    );

    // Part of a layout: one line that names what is missing, no traceback.
    std::fs::remove_file(mistral_ckpt.join("tekken.json")).unwrap();
    let run = export_tool(&[
        "export",
        "--checkpoint",
        mistral_ckpt.to_str().unwrap(),
        "--out",
        tmp.path().join("never").to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(2), "{err}");
    assert!(err.contains("lacks tekken.json"), "{err}");
    assert!(err.contains("lacks config.json"), "{err}");
    assert!(!err.contains("Traceback"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

/// `random-checkpoint` writes into OUT.partial and removes it when it fails: Ctrl-C while the weights are being
/// built or written leaves neither OUT nor OUT.partial (the folder OUT is in need not exist: it is created). A bad
/// shard size is refused before any work, naming the flag.
#[test]
fn an_interrupted_random_checkpoint_leaves_nothing_half_written() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("new-folder/ck");
    let partial = tmp.path().join("new-folder/ck.partial");
    let mut child = std::process::Command::new(crate::util::python())
        .arg(crate::util::repo_root().join("onnx-export/export.py"))
        .args([
            "random-checkpoint",
            "--like",
            "pixtral-ci",
            "--text-layers",
            "2",
        ])
        .args(["--vision-layers", "2", "--out", out.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The CI-sized checkpoint takes seconds to build and write: time enough to see OUT.partial and interrupt.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !partial.is_dir() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "random-checkpoint ended before writing {}",
            partial.display()
        );
        assert!(
            std::time::Instant::now() < deadline,
            "no OUT.partial after 120 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let run = child.wait_with_output().unwrap();
    assert!(!run.status.success(), "interrupted run exited 0");
    assert!(
        !out.exists(),
        "{} exists after an interrupted run",
        out.display()
    );
    assert!(
        !partial.exists(),
        "{} left behind: {}",
        partial.display(),
        String::from_utf8_lossy(&run.stderr)
    );

    let bad = export_tool(&[
        "random-checkpoint",
        "--like",
        "pixtral-tiny",
        "--text-layers",
        "1",
        "--vision-layers",
        "1",
        "--max-shard-size",
        "12parsecs",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(bad.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("--max-shard-size") && stderr.contains("12parsecs"),
        "{stderr}"
    );
    assert!(!out.exists() && !partial.exists());
}
