//! Issue 30: the Mistral 3 family (Ministral 3, Mistral Small 3.x) through the same exporter and engine. The tiny
//! seeded Mistral 3 (`models/tiny-mistral3`: 14-px patches merged 2x2, Ministral 3's YaRN and query scale, a v13
//! Tekken) against transformers and mistral-common; FP8 checkpoints in both layouts; the prompt layout of every
//! Tekken version; and `pixtract run` laying pages out in merged tokens.

use std::collections::BTreeMap;
use std::path::Path;

use image::{DynamicImage, Rgb, RgbImage};
use pixtract::model::manifest::{SpecialTokens, SystemPlacement};
use pixtract::model::{ImagePreprocessor, ModelDir, Prompt, PromptPart, PromptTokenizer};

use crate::pipeline::{duckdb, write_spec};
use crate::util::{
    self, PdfPage, export_tool, pixtract, python_json, read_json, repo_root, text,
    tiny_mistral3_model, tiny_model,
};

/// `pixtract verify` on a model (against its own reference cases, or those of `reference`), which must pass 11/11;
/// returns its output.
fn pixtract_verify(model: &Path, reference: Option<&Path>) -> String {
    let mut args = vec!["verify", "--model", model.to_str().unwrap()];
    if let Some(dir) = reference {
        args.extend(["--reference-dir", dir.to_str().unwrap()]);
    }
    let out = pixtract(&args, &[], &repo_root());
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("11/11 cases pass"), "{t}");
    t
}

/// `pixtract verify` (the Rust engine) against the fixtures transformers and mistral-common wrote for the tiny Mistral
/// 3: the same prompt ids (the system prompt between [SYSTEM_PROMPT] tokens, two images, an image under one 28-px
/// square high, a 2200x1600 scan viewed at 1540 px), pixels, first-step logits and 32 greedy tokens, 11 of 11.
#[test]
fn pixtract_verify_passes_on_the_tiny_mistral3_model() {
    let model = tiny_mistral3_model();
    let manifest = read_json(&model.join("pixtract-model.json"));
    assert_eq!(manifest["family"], "mistral3");
    assert_eq!(manifest["image_tokens"]["patch_size"], 14);
    assert_eq!(manifest["image_tokens"]["spatial_merge"], 2);
    assert_eq!(manifest["prompt"]["system"], "tokens");
    assert_eq!(manifest["tokenizer"]["tekken_version"], "v13");
    assert_eq!(manifest["text"]["rope"]["rope_type"], "yarn");

    // The reference's own ids come from mistral-common: the v13 layout puts the system prompt first.
    let case = read_json(&model.join("reference/system_prompt/case.json"));
    let ids: Vec<u64> = case["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(&ids[..2], &[1, 17], "<s>[SYSTEM_PROMPT]: {ids:?}");
    let end = ids.iter().position(|&i| i == 18).expect("[/SYSTEM_PROMPT]");
    assert_eq!(ids[end + 1], 3, "[INST] right after the system prompt");
    // 300x300 -> 11 x 11 merged tokens, each row closed by a break: 121 [IMG], 10 [IMG_BREAK], 1 [IMG_END].
    assert_eq!(ids.iter().filter(|&&i| i == 10).count(), 11 * 11);
    assert_eq!(ids.iter().filter(|&&i| i == 12).count(), 10);

    let t = pixtract_verify(&model, None);
    assert_eq!(t.matches("ids equal").count(), 11, "{t}");
    assert!(
        t.contains("greedy tokens identical to the fp32 reference in 11/11"),
        "{t}"
    );
}

/// The exporter's own parity check on the tiny Mistral 3, eager and GroupQueryAttention: vision features (patch
/// merger) at four sizes, a 189-token batch (the query scale steps at positions 64 and 128 of the tiny config), decode
/// steps, 20 greedy tokens against transformers' generate().
#[test]
fn exporter_verify_passes_on_the_tiny_mistral3_eager_and_gqa() {
    let tmp = tempfile::tempdir().unwrap();
    let gqa = tmp.path().join("gqa");
    let out = export_tool(&[
        "export",
        "--tiny",
        "--family",
        "mistral3",
        "--attention",
        "gqa",
        "--out",
        gqa.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    for model in [tiny_mistral3_model(), gqa.clone()] {
        let out = export_tool(&["verify", "--model", model.to_str().unwrap()]);
        let t = text(&out);
        assert!(out.status.success(), "{t}");
        assert_eq!(t.matches("[ok] vision").count(), 4, "{t}");
        assert!(t.contains("[ok] prefill logits: lengths 189 and 17"), "{t}");
        assert!(t.contains("[ok] greedy tokens: 20/20 identical"), "{t}");
        assert!(!t.contains("FAIL"), "{t}");
    }
    // The Rust engine on the GroupQueryAttention export: the query scale in its graph, rows batched continuously.
    let t = pixtract_verify(&gqa, Some(&tiny_mistral3_model().join("reference")));
    assert!(
        t.contains("batched, continuous (up to 4 rows, 1 batches): tokens equal to one-by-one runs in 11/11 cases"),
        "{t}"
    );
}

fn random_mistral3(layout: &str, fp8: bool, out: &Path) {
    let mut args = vec![
        "random-checkpoint",
        "--like",
        "mistral3-tiny",
        "--seed",
        "11",
        "--weight-std",
        "0.2",
        "--layout",
        layout,
        "--out",
        out.to_str().unwrap(),
    ];
    if fp8 {
        args.push("--fp8");
    }
    let run = export_tool(&args);
    assert!(run.status.success(), "{}", text(&run));
}

/// Ministral 3's instruct checkpoints ship as per-tensor FP8: written in both layouts (the Hugging Face one with
/// weight_scale_inv and a quantization_config, Mistral's with qscale_weight), each exports to the same weights;
/// the exporter's dequantization equals transformers' Fp8Dequantize on every FP8 weight; the graphs pass verify
/// against the dequantized torch model and `pixtract verify` against transformers' fixtures.
#[test]
fn fp8_checkpoints_in_both_layouts_dequantize_as_transformers_does() {
    let tmp = tempfile::tempdir().unwrap();
    let mut weights = Vec::new();
    for layout in ["hf", "consolidated"] {
        let ckpt = tmp.path().join(format!("ck-{layout}"));
        random_mistral3(layout, true, &ckpt);
        let model = tmp.path().join(format!("m-{layout}"));
        let out = export_tool(&[
            "export",
            "--checkpoint",
            ckpt.to_str().unwrap(),
            "--out",
            model.to_str().unwrap(),
        ]);
        let t = text(&out);
        assert!(out.status.success(), "{t}");
        assert!(
            t.contains("FP8 weights (per-tensor float8_e4m3, 14 scales)"),
            "{t}"
        );
        let manifest = read_json(&model.join("pixtract-model.json"));
        assert_eq!(manifest["family"], "mistral3");
        weights.push(manifest["weights_sha256"].as_str().unwrap().to_string());
    }
    assert_eq!(weights[0], weights[1], "both layouts hold the same weights");

    let model = tmp.path().join("m-hf");
    let out = export_tool(&["verify", "--model", model.to_str().unwrap()]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains("[ok] fp8 dequantize: 14 weights, max abs diff 0.0e+00"),
        "{t}"
    );
    let out = export_tool(&["reference", "--model", model.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    pixtract_verify(&model, None);

    // The same seed in BF16 is other weights (FP8 rounding), so the FP8 path was really taken.
    let bf16 = tmp.path().join("ck-bf16");
    random_mistral3("hf", false, &bf16);
    let plain = tmp.path().join("m-bf16");
    let out = export_tool(&[
        "export",
        "--checkpoint",
        bf16.to_str().unwrap(),
        "--out",
        plain.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let manifest = read_json(&plain.join("pixtract-model.json"));
    assert_ne!(manifest["weights_sha256"].as_str().unwrap(), weights[0]);
}

/// Requests encoded by mistral-common with a Tekken file of each version: Pixtral's own (v3) and synthetic v7, v11 and
/// v13 files with the Mistral 3 image section (patch 14, 1540 px, merge 2) written by the exporter.
const ENCODE_REQUESTS: &str = r#"
import json, os, sys
sys.path.insert(0, os.path.join(sys.argv[1], "onnx-export"))
from PIL import Image
from pixtract_export import prompting
from pixtract_export.files import tekken_path
from pixtract_export.families.mistral3 import write_default_tekken
from transformers.integrations.mistral.tokenizer import MistralConverter

out = sys.argv[2]
images = {"page": (900, 1300), "small": (60, 30), "wide": (2000, 700)}
for name, (w, h) in images.items():
    img = Image.new("RGB", (w, h), (255, 255, 255))
    for x in range(0, w, 7):
        for y in range(0, h, 11):
            img.putpixel((x, y), ((x * 3) % 256, (y * 5) % 256, (x + y) % 256))
    img.save(os.path.join(out, name + ".png"))
requests = {
    "system_image_text": ("Extract the receipt as JSON.", [("image", "page"), ("text", "Total and date?")]),
    "system_text_only": ("Be terse.", [("text", "Bonjour, quel est le total ? 😀")]),
    "texts_then_image": (None, [("text", "Read this."), ("text", "Then the date."), ("image", "small")]),
    "two_images": (None, [("image", "wide"), ("image", "small"), ("text", "Compare.")]),
}
result = {}
for version in ["v3", "v7", "v11", "v13"]:
    folder = os.path.join(out, version)
    os.makedirs(folder)
    tekken = os.path.join(folder, "tekken.json")
    if version == "v3":
        import shutil
        shutil.copyfile(tekken_path(), tekken)
    else:
        write_default_tekken(tekken, version)
    MistralConverter(vocab_file=tekken).converted().save(os.path.join(folder, "tokenizer.json"))
    result[version] = {}
    for key, (system, parts) in requests.items():
        content = [{"type": "image", "file": v + ".png"} if k == "image" else {"type": "text", "text": v}
                   for k, v in parts]
        ids, _ = prompting.encode_case(out, content, system, tekken)
        result[version][key] = {"system": system, "parts": parts, "ids": ids}
print(json.dumps(result))
"#;

/// pixtract lays out a prompt as mistral-common does for every Tekken version a supported model ships: v3 (Pixtral:
/// the system prompt opens the user turn) and v7, v11, v13 (Mistral Small 3.1, 3.2, Ministral 3: between
/// [SYSTEM_PROMPT] tokens), with images of 16-px patches or 2x2-merged 14-px patches, texts then an image (the image
/// moves first), two images.
#[test]
fn prompt_ids_match_mistral_common_for_every_tekken_version() {
    let tmp = tempfile::tempdir().unwrap();
    let root = repo_root();
    let expected = python_json(
        ENCODE_REQUESTS,
        &[root.to_str().unwrap(), tmp.path().to_str().unwrap()],
    );
    // Token ids and image normalisation (CLIP's, the same for both families) from the tiny Mistral 3's manifest.
    let manifest = ModelDir::open(tiny_mistral3_model()).unwrap().manifest;
    let special: SpecialTokens = manifest.tokens;
    let family_pre = ImagePreprocessor::for_model(&manifest);
    let mut checked = 0;
    for (version, cases) in expected.as_object().unwrap() {
        let (placement, patch, merge, max_side) = if version == "v3" {
            (SystemPlacement::UserPrefix, 16, 1, 1024)
        } else {
            (SystemPlacement::Tokens, 14, 2, 1540)
        };
        let tokenizer = PromptTokenizer::from_file(
            &tmp.path().join(version).join("tokenizer.json"),
            special,
            placement,
        )
        .unwrap();
        let pre = ImagePreprocessor {
            max_side,
            patch,
            merge,
            ..family_pre.clone()
        };
        for (key, case) in cases.as_object().unwrap() {
            let parts = case["parts"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| {
                    let (kind, value) = (p[0].as_str().unwrap(), p[1].as_str().unwrap());
                    if kind == "image" {
                        let img = image::open(tmp.path().join(format!("{value}.png"))).unwrap();
                        PromptPart::Image(pre.prepare(&img).unwrap())
                    } else {
                        PromptPart::Text(value.to_string())
                    }
                })
                .collect();
            let prompt = Prompt {
                system: case["system"].as_str().map(str::to_string),
                parts,
            };
            let ours = tokenizer.encode(prompt).unwrap().ids;
            let theirs: Vec<u32> = case["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(ours, theirs, "{version} {key}");
            checked += 1;
        }
    }
    assert_eq!(checked, 16);
}

/// `pixtract run` with a Mistral 3 model: a page costs one token per merged 28-px square plus a break per row. The
/// same 1000x1000 scan viewed whole (36 x 36 merged tokens: 36 x 37 = 1,332) and at 700 px (25 x 26 = 650) differs
/// by exactly 682 prompt tokens; a US-letter PDF page at the family's default view (1540 px: 1190 x 1540, 43 x 55
/// tokens) is 55 x 44 = 2,420 image tokens, as `pixtract pages` and `pixtract generate` count it.
#[test]
fn pixtract_run_lays_out_pages_in_merged_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let inputs = tmp.path().join("in");
    std::fs::create_dir(&inputs).unwrap();
    let scan = DynamicImage::ImageRgb8(RgbImage::from_fn(1000, 1000, |x, y| {
        Rgb([(x % 251) as u8, (y % 241) as u8, ((x + y) % 239) as u8])
    }));
    std::fs::write(
        inputs.join("scan.png"),
        util::encode(&scan, image::ImageFormat::Png),
    )
    .unwrap();
    let letter = vec![PdfPage::new(612.0, 792.0, util::invoice_content("M3", 3))];
    std::fs::write(inputs.join("letter.pdf"), util::make_pdf(&letter)).unwrap();

    let mut prompt_tokens: Vec<BTreeMap<String, i64>> = Vec::new();
    for (name, max_side) in [("full", 0), ("small", 700)] {
        let dir = tmp.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        let output = dir.join("out");
        let spec = write_spec(&dir, &inputs, &output);
        let body = std::fs::read_to_string(&spec)
            .unwrap()
            .replace(
                &tiny_model().display().to_string(),
                &tiny_mistral3_model().display().to_string(),
            )
            .replace(
                "[raster]\nworkers = 1\n",
                &format!("[raster]\nworkers = 1\nmax_side = {max_side}\n"),
            );
        std::fs::write(&spec, body).unwrap();
        let out = pixtract(&["run", spec.to_str().unwrap()], &[], &repo_root());
        assert!(matches!(out.status.code(), Some(0 | 2)), "{}", text(&out));
        let glob = format!("{}/**/*.parquet", output.display());
        // The tiny random model's answers often run past max_new_tokens (an error row naming the answer); the
        // prompt is what is counted here, and every row must have reached the model.
        let table = duckdb(&format!(
            "SELECT regexp_replace(source_uri, '.*/', ''), prompt_tokens, status, coalesce(error, '') FROM read_parquet('{glob}', hive_partitioning = true)"
        ));
        let mut rows = BTreeMap::new();
        for line in table.lines() {
            let cols: Vec<&str> = line.splitn(4, '|').collect();
            assert!(
                cols[2] == "ok" || cols[3].contains("answer"),
                "only the answer may fail: {line}"
            );
            rows.insert(
                cols[0].to_string(),
                cols[1].parse::<i64>().expect("prompt_tokens"),
            );
        }
        assert_eq!(rows.len(), 2, "both documents reached the model: {table}");
        prompt_tokens.push(rows);
    }
    let (full, small) = (&prompt_tokens[0], &prompt_tokens[1]);
    assert_eq!(
        full["scan.png"] - small["scan.png"],
        36 * 37 - 25 * 26,
        "{full:?} {small:?}"
    );
    // The PDF page at the default view holds its 2,420 image tokens plus the same text as the scan's prompt.
    assert_eq!(
        full["letter.pdf"] - full["scan.png"],
        55 * 44 - 36 * 37,
        "{full:?}"
    );

    let out = pixtract(
        &[
            "pages",
            inputs.to_str().unwrap(),
            "--out",
            tmp.path().join("pages").to_str().unwrap(),
            "--model",
            tiny_mistral3_model().to_str().unwrap(),
        ],
        &[],
        tmp.path(),
    );
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains("letter.pdf  1 pages  2420 image tokens (2420 a page)"),
        "{t}"
    );
    assert!(
        t.contains("scan.png  1 pages  1332 image tokens (1332 a page)"),
        "{t}"
    );
    let out = pixtract(
        &[
            "generate",
            "--model",
            tiny_mistral3_model().to_str().unwrap(),
            "--image",
            inputs.join("scan.png").to_str().unwrap(),
            "--prompt",
            "Total?",
            "--max-new-tokens",
            "1",
        ],
        &[],
        tmp.path(),
    );
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("72x72 patches, 1332 image tokens"), "{t}");
}
