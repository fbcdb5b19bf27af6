//! fp16 and weight-only quantized variants (`onnx-export quantize`, MatMulNBits) run in the Rust engine with no
//! code change: the engine reads input, KV-cache and logits types from the graphs. Each variant's greedy tokens
//! must equal the ones the plain Python ONNX Runtime loop produced for the same variant (recorded by
//! `onnx-export fidelity` in <variant>/fidelity.json), case by case; and the size arithmetic behind docs/quantization.md's
//! Pixtral 12B table must match the variants' actual initializers byte for byte.

use std::path::PathBuf;

use pixtract::model::{
    BatchPolicy, Device, EngineOptions, GenerationConfig, ModelDir, NoHook, PixtralEngine,
};

use crate::engine::load_case;
use crate::util::{export_tool, python_stdout, read_json, repo_root, runtime, tiny_model};

const VARIANTS: [(&str, &str, Option<u32>); 4] = [
    ("fp16", "fp16", None),
    ("int8", "fp32", Some(8)),
    ("int4", "fp32", Some(4)),
    ("q4f16", "fp16", Some(4)),
];

fn variant_dir(name: &str) -> PathBuf {
    let dir = repo_root().join(format!("models/tiny-{name}"));
    assert!(
        dir.join("fidelity.json").is_file(),
        "{} missing: run `scripts/setup.sh`",
        dir.display()
    );
    dir
}

#[test]
fn every_variant_matches_its_onnxruntime_python_tokens() {
    let reference = tiny_model().join("reference");
    let names: Vec<String> = read_json(&reference.join("cases.json"))["cases"]
        .as_array()
        .expect("cases list")
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect();
    let mut failures = Vec::new();
    for (variant, dtype, bits) in VARIANTS {
        let dir = variant_dir(variant);
        let model = ModelDir::open(&dir).expect("variant manifest opens");
        let m = &model.manifest;
        assert_eq!(m.variant(), variant);
        assert_eq!(m.dtype, dtype);
        assert_eq!(m.quantization.as_ref().map(|q| q.bits), bits, "{variant}");
        model.verify_hashes().expect("hashes match the manifest");
        let fidelity = read_json(&dir.join("fidelity.json"));
        assert_eq!(
            fidelity["weights_sha256"].as_str(),
            Some(m.weights_sha256.as_str())
        );

        let opts = EngineOptions {
            device: Device::Cpu,
        };
        let mut engine = PixtralEngine::load(runtime(), &dir, opts).expect("variant loads");
        let config = GenerationConfig {
            max_new_tokens: fidelity["new_tokens"].as_u64().unwrap() as usize,
            stop_on_eos: false,
            ..Default::default()
        };
        let mut same_cases = 0;
        for name in &names {
            let case = load_case(&engine, &reference.join(name));
            let (gens, _) = engine
                .generate_many(
                    std::slice::from_ref(&case.prompt),
                    &config,
                    BatchPolicy::default(),
                    &mut NoHook,
                )
                .expect("generate");
            let want: Vec<u32> = fidelity["cases"][name]["variant_tokens"]
                .as_array()
                .unwrap_or_else(|| panic!("{variant}: fidelity.json lacks {name}"))
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            if gens[0].tokens == want {
                same_cases += 1;
            } else {
                let prefix = gens[0]
                    .tokens
                    .iter()
                    .zip(&want)
                    .take_while(|(a, b)| a == b)
                    .count();
                failures.push(format!("{variant}/{name}: tokens differ after {prefix}"));
            }
        }
        println!(
            "{variant} ({}): {same_cases}/{} cases token-identical to the Python onnxruntime loop",
            m.describe_weights(),
            names.len()
        );
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn computed_weight_bytes_match_every_exported_variant() {
    let mut args: Vec<std::ffi::OsString> = vec!["sizes".into(), "--tiny".into()];
    for dir in std::iter::once(tiny_model()).chain(VARIANTS.iter().map(|v| variant_dir(v.0))) {
        args.push("--model".into());
        args.push(dir.into());
    }
    let out = export_tool(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // 5 models x 3 graphs, each computed == actual, and each graph's files on disk == the manifest's bytes.
    for kind in ["check ", "files "] {
        assert_eq!(
            stdout
                .lines()
                .filter(|l| l.starts_with(kind) && l.ends_with("(ok)"))
                .count(),
            15,
            "{stdout}"
        );
    }
    assert!(!stdout.contains("MISMATCH"), "{stdout}");
}

#[test]
fn quantize_refuses_bad_requests_clearly() {
    let scratch = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = export_tool(args);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let tiny = tiny_model();
    let tiny = tiny.to_str().unwrap();
    let out = scratch.path().join("q");
    let out = out.to_str().unwrap();
    let int4 = variant_dir("int4");
    let cases: [(Vec<&str>, &str); 4] = [
        (
            vec![
                "quantize",
                "--model",
                int4.to_str().unwrap(),
                "--out",
                out,
                "--bits",
                "4",
            ],
            "already quantized",
        ),
        (
            vec![
                "quantize",
                "--model",
                tiny,
                "--out",
                out,
                "--bits",
                "4",
                "--block-size",
                "48",
            ],
            "power of two",
        ),
        (
            vec![
                "quantize",
                "--model",
                tiny,
                "--out",
                out,
                "--bits",
                "4",
                "--graphs",
                "embed_tokens",
            ],
            "Gather",
        ),
        (
            vec!["quantize", "--model", out, "--out", tiny, "--bits", "8"],
            "not a model directory",
        ),
    ];
    for (args, want) in cases {
        let (code, stderr) = run(&args);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
        assert!(!stderr.contains("Traceback"), "{args:?}: {stderr}");
    }
    // Nothing was written by the refusals, and the source model is untouched.
    assert!(
        !scratch
            .path()
            .join("q")
            .join("pixtract-model.json")
            .exists()
    );
    ModelDir::open(tiny_model())
        .unwrap()
        .verify_hashes()
        .unwrap();
}

#[test]
fn a_decoder_with_fp16_logits_runs_too() {
    // Other exporters emit fp16 logits from fp16 graphs; pixtract's keep fp32. Append a Cast to the fp16 variant's
    // decoder so its declared logits type is float16, and check the engine widens them and decodes the same way.
    let scratch = tempfile::tempdir().unwrap();
    let src = variant_dir("fp16");
    let dst = scratch.path().join("fp16-logits");
    let script = r#"
import json, os, shutil, sys
import onnx
from onnx import helper, TensorProto
src, dst = sys.argv[1], sys.argv[2]
shutil.copytree(src, dst)
path = os.path.join(dst, "decoder_model_merged.onnx")
m = onnx.load(path)
out = next(o for o in m.graph.output if o.name == "logits")
producer = next(n for n in m.graph.node if "logits" in n.output)
producer.output[list(producer.output).index("logits")] = "logits_fp32"
m.graph.node.append(helper.make_node("Cast", ["logits_fp32"], ["logits"], to=TensorProto.FLOAT16))
out.type.tensor_type.elem_type = TensorProto.FLOAT16
onnx.save(m, path)
man = json.load(open(os.path.join(dst, "pixtract-model.json")))
for o in man["graphs"]["decoder"]["outputs"]:
    if o["name"] == "logits":
        o["dtype"] = "float16"
import hashlib
man["graphs"]["decoder"]["bytes"] = os.path.getsize(path)
man["graphs"]["decoder"]["sha256"] = hashlib.sha256(open(path, "rb").read()).hexdigest()
json.dump(man, open(os.path.join(dst, "pixtract-model.json"), "w"), indent=1)
"#;
    python_stdout(script, &[&src, &dst]);

    let opts = EngineOptions {
        device: Device::Cpu,
    };
    let config = GenerationConfig {
        max_new_tokens: 16,
        stop_on_eos: false,
        ..Default::default()
    };
    let reference = tiny_model().join("reference");
    let mut widened = PixtralEngine::load(runtime(), &dst, opts).expect("fp16-logits model loads");
    let mut plain = PixtralEngine::load(runtime(), &src, opts).expect("fp16 variant loads");
    let (mut same, mut total) = (0, 0);
    for name in ["wide_page", "text_only", "two_images"] {
        let case = load_case(&plain, &reference.join(name));
        let run = |engine: &mut PixtralEngine| {
            engine
                .generate_many(
                    std::slice::from_ref(&case.prompt),
                    &config,
                    BatchPolicy::default(),
                    &mut NoHook,
                )
                .expect("generate")
                .0
                .remove(0)
        };
        let (a, b) = (run(&mut widened), run(&mut plain));
        assert_eq!(a.tokens.len(), 16);
        assert!(a.token_probs.iter().all(|p| *p > 0.0 && *p <= 1.0));
        // fp16 rounding of the logits may only flip near-ties: the first token must agree.
        assert_eq!(a.tokens[0], b.tokens[0], "{name}");
        same += a
            .tokens
            .iter()
            .zip(&b.tokens)
            .filter(|(x, y)| x == y)
            .count();
        total += a.tokens.len();
    }
    println!("fp16 logits: {same}/{total} tokens equal to the fp32-logits decoder");
    assert!(same * 10 >= total * 8, "{same}/{total}");
}

/// ONNX Runtime's MatMulNBitsQuantizer on the whole decoder in memory, then the graph `quantize` wrote with its
/// external data read back: same nodes (serialized), same opsets, same initializers (name, dims, type, bytes) in the
/// same order. Printed as one JSON line.
const COMPARE_WITH_ORT_QUANTIZER: &str = r#"
import json, logging, sys
import onnx
from onnx import numpy_helper
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
src, ours, bits, sym, acc, exclude = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1", int(sys.argv[5]) or None, sys.argv[6:]
q = MatMulNBitsQuantizer(onnx.load(src, load_external_data=True), bits=bits, block_size=32, is_symmetric=sym,
                         accuracy_level=acc, nodes_to_exclude=exclude)
logging.disable(logging.INFO)  # the quantizer logs every node it skips
q.process()
ref = q.model.model
got = onnx.load(ours, load_external_data=True)
def inits(m):
    return [(t.name, list(t.dims), t.data_type, numpy_helper.to_array(t).tobytes()) for t in m.graph.initializer]
a, b = inits(ref), inits(got)
print(json.dumps({
    "nodes_equal": [n.SerializeToString() for n in ref.graph.node] == [n.SerializeToString() for n in got.graph.node],
    "opsets_equal": sorted((o.domain, o.version) for o in ref.opset_import) == sorted((o.domain, o.version) for o in got.opset_import),
    "initializer_names_equal": [x[0] for x in a] == [x[0] for x in b],
    "initializers_differing": [x[0] for x, y in zip(a, b) if x != y],
    "matmulnbits": sum(n.op_type == "MatMulNBits" for n in got.graph.node),
    "initializers": len(b),
}))
"#;

/// `quantize` reads and quantizes one weight at a time (its memory is one weight, not the graph); the graph it
/// writes must still be exactly what ONNX Runtime's own whole-graph quantizer writes: fp32 and fp16 sources, 4 and 8
/// bits, symmetric with an accuracy level and a kept LM head, and the CI model whose decoder weights are read from
/// its external data file.
#[test]
fn streaming_quantizer_writes_what_onnxruntime_quantizer_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let ci = crate::util::ci_model();
    let fp16 = repo_root().join("models/tiny-fp16");
    // (source, bits, symmetric, accuracy level, keep the LM head)
    let cases = [
        (tiny_model(), 4, false, 0, false),
        (tiny_model(), 8, true, 4, true),
        (fp16, 4, false, 0, false),
        (ci, 4, false, 0, false),
    ];
    for (i, (src, bits, symmetric, accuracy, keep_lm_head)) in cases.into_iter().enumerate() {
        let out_dir = tmp.path().join(format!("q{i}"));
        let mut args: Vec<String> = vec![
            "quantize".into(),
            "--model".into(),
            src.to_string_lossy().into(),
            "--out".into(),
            out_dir.to_string_lossy().into(),
            "--bits".into(),
            bits.to_string(),
        ];
        if symmetric {
            args.push("--symmetric".into());
        }
        if accuracy > 0 {
            args.extend(["--accuracy-level".into(), accuracy.to_string()]);
        }
        if keep_lm_head {
            args.push("--keep-lm-head".into());
        }
        let out = export_tool(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut py_args: Vec<String> = vec![
            src.join("decoder_model_merged.onnx")
                .to_string_lossy()
                .into(),
            out_dir
                .join("decoder_model_merged.onnx")
                .to_string_lossy()
                .into(),
            bits.to_string(),
            (symmetric as u8).to_string(),
            accuracy.to_string(),
        ];
        if keep_lm_head {
            py_args.push("/lm_head/MatMul".into());
        }
        let stdout = python_stdout(COMPARE_WITH_ORT_QUANTIZER, &py_args);
        let cmp: serde_json::Value =
            serde_json::from_str(stdout.lines().last().unwrap_or("")).expect("json line");
        let what = format!("{} bits {bits} sym {symmetric}: {cmp}", src.display());
        assert_eq!(cmp["nodes_equal"], true, "{what}");
        assert_eq!(cmp["opsets_equal"], true, "{what}");
        assert_eq!(cmp["initializer_names_equal"], true, "{what}");
        assert_eq!(
            cmp["initializers_differing"],
            serde_json::json!([]),
            "{what}"
        );
        // q, k, v, o, gate, up, down per text layer, and the LM head unless it is kept.
        let manifest = read_json(&out_dir.join("pixtract-model.json"));
        let layers = manifest["text"]["num_layers"]
            .as_u64()
            .expect("text layers");
        let want = 7 * layers + u64::from(!keep_lm_head);
        assert_eq!(cmp["matmulnbits"], want, "{what}");
        assert_eq!(
            manifest["quantization"]["graphs"]["decoder"]["quantized_matmuls"], want,
            "{what}"
        );
    }
}
