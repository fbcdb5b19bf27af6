//! Parity of the Rust engine with the reference fixtures that `onnx-export reference` wrote from transformers
//! (mistral-common preprocessing and token layout): input ids identical, pixel tensors within tolerance,
//! first-step top-k logits within 1e-4, 32 greedy tokens identical; batched runs equal one-by-one runs.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use pixtract::model::manifest::DecoderAttention;
use pixtract::model::{
    AnswerLengths, BatchPolicy, Batching, Device, EncodedPrompt, EngineOptions, FinishReason,
    GenerationConfig, GenerationStats, HookError, NoHook, PixtralEngine,
};
use pixtract::verify::{
    self, LOGIT_TOLERANCE as LOGIT_TOL, PIXEL_TOLERANCE as PIXEL_TOL, ReferenceCase,
};

use crate::util::{read_json, runtime, tiny_gqa_model, tiny_model};

fn load_engine(
    cell: &'static std::sync::OnceLock<Mutex<PixtralEngine>>,
    dir: fn() -> PathBuf,
) -> std::sync::MutexGuard<'static, PixtralEngine> {
    cell.get_or_init(|| {
        let opts = EngineOptions {
            device: Device::Cpu,
        };
        Mutex::new(PixtralEngine::load(runtime(), &dir(), opts).expect("engine loads"))
    })
    .lock()
    .unwrap_or_else(|e| e.into_inner())
}

/// The engine on the tiny model (eager decoder: left-padded batches, cache grown by Concat).
pub fn engine() -> std::sync::MutexGuard<'static, PixtralEngine> {
    static ENGINE: std::sync::OnceLock<Mutex<PixtralEngine>> = std::sync::OnceLock::new();
    load_engine(&ENGINE, tiny_model)
}

/// The engine on the same tiny model exported with GroupQueryAttention (right-padded rows, cache in place): the
/// engine tests below run on both, against the same transformers fixtures.
pub fn gqa_engine() -> std::sync::MutexGuard<'static, PixtralEngine> {
    static ENGINE: std::sync::OnceLock<Mutex<PixtralEngine>> = std::sync::OnceLock::new();
    load_engine(&ENGINE, tiny_gqa_model)
}

pub type Case = ReferenceCase;

fn case_dirs() -> Vec<PathBuf> {
    verify::reference_case_dirs(&tiny_model().join("reference")).expect("reference cases")
}

pub fn load_case(engine: &PixtralEngine, dir: &Path) -> Case {
    ReferenceCase::load(engine, dir).unwrap_or_else(|e| panic!("{}: {e:?}", dir.display()))
}

/// Every reference case, and its prompt alone (what `generate_many` takes), in case order.
fn reference_prompts(engine: &PixtralEngine) -> (Vec<Case>, Vec<EncodedPrompt>) {
    let cases: Vec<Case> = case_dirs().iter().map(|d| load_case(engine, d)).collect();
    let prompts = cases.iter().map(|c| c.prompt.clone()).collect();
    (cases, prompts)
}

/// Each check runs on both exports of the tiny model, as two tests (eager, gqa), so a failure names its export.
macro_rules! on_both_exports {
    ($($check:ident => $eager:ident, $gqa:ident;)*) => {$(
        #[test]
        fn $eager() {
            $check(&mut engine());
        }

        #[test]
        fn $gqa() {
            $check(&mut gqa_engine());
        }
    )*};
}

on_both_exports! {
    check_every_case => every_reference_case_matches_transformers, gqa_every_reference_case_matches_transformers;
    check_chunked_prefill => chunked_prefill_equals_one_pass, gqa_chunked_prefill_equals_one_pass;
    check_batched => batched_generation_equals_one_by_one, gqa_batched_generation_equals_one_by_one;
    check_leaving => sequences_leaving_the_batch_do_not_disturb_the_others, gqa_sequences_leaving_the_batch_do_not_disturb_the_others;
    check_bad_inputs => bad_inputs_are_clear_errors, gqa_bad_inputs_are_clear_errors;
}

fn check_every_case(engine: &mut PixtralEngine) {
    let dirs = case_dirs();
    assert!(dirs.len() >= 11, "expected the 11 reference cases");
    let mut failures = Vec::new();
    let (mut worst_logit, mut worst_pixel) = (0f32, 0f32);
    for dir in &dirs {
        let case = load_case(engine, dir);
        let check =
            verify::check_case(engine, &case).unwrap_or_else(|e| panic!("{}: {e:#}", case.name));
        worst_logit = worst_logit.max(check.logit_diff);
        worst_pixel = worst_pixel.max(check.pixel_diff);
        assert!(check.pixel_sum_diff < PIXEL_TOL as f64, "{check:?}");
        if !check.ids_equal {
            failures.push(format!("{}: input ids differ", case.name));
        } else if !check.tokens_equal() {
            failures.push(format!(
                "{}: greedy tokens differ after {} of {}",
                case.name, check.same_tokens, check.reference_tokens
            ));
        }
    }
    println!(
        "parity: {}/{} cases, largest first-step logit diff {worst_logit:.2e}, largest pixel diff {worst_pixel:.2e}",
        dirs.len() - failures.len(),
        dirs.len()
    );
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(worst_pixel <= PIXEL_TOL, "pixel diff {worst_pixel}");
    assert!(worst_logit <= LOGIT_TOL, "logit diff {worst_logit}");
}

fn check_chunked_prefill(engine: &mut PixtralEngine) {
    let (cases, prompts) = reference_prompts(engine);
    let longest = prompts.iter().map(|p| p.ids.len()).max().unwrap();
    let run = |engine: &mut PixtralEngine, chunk: usize| {
        let config = GenerationConfig {
            max_new_tokens: 12,
            keep_first_logits: true,
            prefill_chunk: Some(chunk),
            ..Default::default()
        };
        // Batches of 4 (left-padded), so chunks also cut through padding.
        let policy = BatchPolicy {
            max_batch: 4,
            token_budget: 1 << 20,
            ..Default::default()
        };
        let (gens, stats) = engine
            .generate_many(&prompts, &config, policy, &mut NoHook)
            .unwrap();
        (gens, stats)
    };
    let (whole, one) = run(engine, 0);
    // 100 does not divide the widths: uneven last chunks; the longest prompt takes many passes.
    let (chunked, many) = run(engine, 100);
    assert!(
        longest > 1000,
        "a long prompt is among the cases: {longest}"
    );
    // One pass per batch (eager: the batch at once) or per row (gqa: rows prefill one by one).
    let passes = match engine.attention() {
        DecoderAttention::Eager => one.batches,
        DecoderAttention::Gqa => prompts.len(),
    };
    assert_eq!(one.prefill_passes, passes, "{one:?}");
    assert!(
        many.prefill_passes >= one.prefill_passes + longest / 100,
        "{one:?} vs {many:?}"
    );
    let mut worst = 0f32;
    for ((w, c), case) in whole.iter().zip(&chunked).zip(&cases) {
        assert_eq!(w.tokens, c.tokens, "{}", case.name);
        let (a, b) = (
            w.first_logits.as_ref().unwrap(),
            c.first_logits.as_ref().unwrap(),
        );
        worst = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(worst, f32::max);
    }
    println!("chunked (100) vs one-pass prefill: largest first-step logit diff {worst:.2e}");
    assert!(worst <= LOGIT_TOL, "{worst}");
}

fn check_batched(engine: &mut PixtralEngine) {
    let (cases, prompts) = reference_prompts(engine);
    let config = GenerationConfig {
        max_new_tokens: 12,
        ..Default::default()
    };
    let (batched, stats) = engine
        .generate_many(
            &prompts,
            &config,
            BatchPolicy {
                max_batch: 4,
                token_budget: 8192,
                ..Default::default()
            },
            &mut NoHook,
        )
        .unwrap();
    assert!(
        stats.batches < prompts.len(),
        "rows were batched: {stats:?}"
    );
    for (i, case) in cases.iter().enumerate() {
        let (alone, _) = engine
            .generate_many(
                std::slice::from_ref(&prompts[i]),
                &config,
                BatchPolicy::default(),
                &mut NoHook,
            )
            .unwrap();
        assert_eq!(batched[i].tokens, alone[0].tokens, "{}", case.name);
    }
}

fn check_leaving(engine: &mut PixtralEngine) {
    // A row stopped early by the hook leaves the batch; the remaining rows continue from a compacted cache.
    struct StopRowAfter(usize, usize);
    impl pixtract::model::StepHook for StopRowAfter {
        fn mask_logits(&mut self, _: usize, _: &mut [f32]) -> Result<(), HookError> {
            Ok(())
        }
        fn accept_token(&mut self, row: usize, _: u32) -> Result<bool, HookError> {
            if row == self.0 {
                self.1 -= 1;
                return Ok(self.1 == 0);
            }
            Ok(false)
        }
    }
    let dirs = case_dirs();
    let names = ["text_only", "multilingual", "rgba"];
    let prompts: Vec<EncodedPrompt> = names
        .iter()
        .map(|n| {
            let dir = dirs.iter().find(|d| d.ends_with(n)).unwrap();
            load_case(engine, dir).prompt
        })
        .collect();
    let config = GenerationConfig {
        max_new_tokens: 10,
        ..Default::default()
    };
    let policy = BatchPolicy {
        max_batch: 3,
        token_budget: 1 << 20,
        ..Default::default()
    };
    let (full, _) = engine
        .generate_many(&prompts, &config, policy, &mut NoHook)
        .unwrap();
    let (cut, _) = engine
        .generate_many(&prompts, &config, policy, &mut StopRowAfter(1, 3))
        .unwrap();
    assert_eq!(cut[1].tokens.len(), 3);
    assert_eq!(cut[1].tokens[..], full[1].tokens[..3]);
    assert_eq!(cut[0].tokens, full[0].tokens);
    assert_eq!(cut[2].tokens, full[2].tokens);
}

fn idle_share(stats: &GenerationStats) -> f64 {
    1.0 - stats.decode_tokens as f64 / stats.decode_row_capacity.max(1) as f64
}

#[test]
fn gqa_continuous_batching_equals_one_by_one_in_any_arrival_order() {
    let mut engine = gqa_engine();
    let (cases, prompts) = reference_prompts(&engine);
    let n = prompts.len();
    // Answers of 2..=23 tokens: rows retire at different steps and slots are refilled mid-run.
    let lengths: Vec<usize> = (0..n).map(|i| 2 + (i * 7) % 22).collect();
    let config = GenerationConfig {
        max_new_tokens: *lengths.iter().max().unwrap(),
        stop_on_eos: false,
        ..Default::default()
    };
    let one_by_one = BatchPolicy {
        max_batch: 1,
        batching: Batching::Static,
        ..Default::default()
    };
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            let (g, _) = engine
                .generate_many(std::slice::from_ref(p), &config, one_by_one, &mut NoHook)
                .unwrap();
            g[0].tokens.clone()
        })
        .collect();
    let interleaved: Vec<usize> = (0..n).step_by(2).chain((1..n).step_by(2)).collect();
    let orders = [
        (0..n).collect::<Vec<_>>(),
        (0..n).rev().collect(),
        interleaved,
    ];
    for order in &orders {
        let arriving: Vec<EncodedPrompt> = order.iter().map(|&i| prompts[i].clone()).collect();
        let wanted: Vec<usize> = order.iter().map(|&i| lengths[i]).collect();
        for slots in [2, 3] {
            let policy = |batching| BatchPolicy {
                max_batch: slots,
                batching,
                ..Default::default()
            };
            let (gens, continuous) = engine
                .generate_many(
                    &arriving,
                    &config,
                    policy(Batching::Continuous),
                    &mut AnswerLengths::new(wanted.clone()),
                )
                .unwrap();
            for (j, &i) in order.iter().enumerate() {
                assert_eq!(
                    gens[j].tokens[..],
                    alone[i][..lengths[i]],
                    "{} arriving {j}th of {order:?}, {slots} slots",
                    cases[i].name
                );
                assert_eq!(gens[j].finish, FinishReason::Hook);
            }
            // Pages encoded between decode steps (0) or ahead on the vision thread (1, 4; the default is 2): the
            // same tokens, the same images.
            if slots == 2 {
                for vision_ahead in [0, 1, 4] {
                    let (again, stats) = engine
                        .generate_many(
                            &arriving,
                            &config,
                            BatchPolicy {
                                vision_ahead,
                                ..policy(Batching::Continuous)
                            },
                            &mut AnswerLengths::new(wanted.clone()),
                        )
                        .unwrap();
                    assert_eq!(stats.images, continuous.images);
                    for (a, b) in again.iter().zip(&gens) {
                        assert_eq!(a.tokens, b.tokens, "vision_ahead {vision_ahead}");
                    }
                }
            }
            // The same work statically batched leaves more decode rows idle (counted, not timed).
            let (statically, stat) = engine
                .generate_many(
                    &arriving,
                    &config,
                    policy(Batching::Static),
                    &mut AnswerLengths::new(wanted.clone()),
                )
                .unwrap();
            assert_eq!(continuous.decode_tokens, stat.decode_tokens);
            assert!(
                idle_share(&continuous) < idle_share(&stat),
                "idle rows: continuous {continuous:?} vs static {stat:?}"
            );
            for (c, s) in gens.iter().zip(&statically) {
                assert_eq!(c.tokens, s.tokens);
            }
        }
    }
}

#[test]
fn gqa_prefill_interleaved_with_decode_bounds_the_stall_and_keeps_the_tokens() {
    let mut engine = gqa_engine();
    let (cases, prompts) = reference_prompts(&engine);
    let chunk = 64;
    let longest = prompts.iter().map(|p| p.ids.len()).max().unwrap();
    assert!(longest > 2 * chunk, "a prompt of several chunks is needed");
    let lengths: Vec<usize> = (0..prompts.len()).map(|i| 3 + (i * 5) % 17).collect();
    let config = GenerationConfig {
        max_new_tokens: *lengths.iter().max().unwrap(),
        stop_on_eos: false,
        prefill_chunk: Some(chunk),
        ..Default::default()
    };
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            let one = BatchPolicy {
                max_batch: 1,
                batching: Batching::Static,
                ..Default::default()
            };
            let (g, _) = engine
                .generate_many(std::slice::from_ref(p), &config, one, &mut NoHook)
                .unwrap();
            g[0].tokens.clone()
        })
        .collect();
    let mut stalls = Vec::new();
    for chunks_per_step in [0, 1, 2] {
        let policy = BatchPolicy {
            max_batch: 3,
            batching: Batching::Continuous,
            prefill_chunks_per_step: chunks_per_step,
            ..Default::default()
        };
        let (gens, stats) = engine
            .generate_many(
                &prompts,
                &config,
                policy,
                &mut AnswerLengths::new(lengths.clone()),
            )
            .unwrap();
        for (i, g) in gens.iter().enumerate() {
            assert_eq!(
                g.tokens[..],
                alone[i][..lengths[i]],
                "{}, {chunks_per_step} prefill chunks per step",
                cases[i].name
            );
        }
        stalls.push(stats.max_stall_tokens);
    }
    // Whole prefills make running rows wait for a whole prompt (prompts join while others run); interleaved, for
    // at most the chunks a gap allows.
    assert!(stalls[0] > 2 * chunk, "stalls {stalls:?}");
    assert!((1..=chunk).contains(&stalls[1]), "stalls {stalls:?}");
    assert!((1..=2 * chunk).contains(&stalls[2]), "stalls {stalls:?}");
}

#[test]
fn fp32_gqa_models_refuse_cuda_with_the_reason() {
    // Checked before any session opens, so it holds on machines without CUDA too: an fp32 GroupQueryAttention node
    // would otherwise run on the CPU provider behind the user's back (fp16 gqa exports do run on CUDA).
    let opts = EngineOptions {
        device: Device::Cuda(0),
    };
    let err = match PixtralEngine::load(runtime(), &tiny_gqa_model(), opts) {
        Ok(_) => panic!("a gqa model loaded for cuda"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("GroupQueryAttention in fp32")
            && err.contains("--attention gqa --dtype fp16")
            && err.contains("--attention eager"),
        "{err}"
    );
}

fn check_bad_inputs(engine: &mut PixtralEngine) {
    // An empty prompt next to a real one: an error naming it, not a row decoded from stale logits.
    let prompts = [
        EncodedPrompt {
            ids: vec![1, 3, 1032, 4],
            images: vec![],
        },
        EncodedPrompt {
            ids: vec![],
            images: vec![],
        },
    ];
    let err = engine
        .generate_many(
            &prompts,
            &GenerationConfig::default(),
            BatchPolicy::default(),
            &mut NoHook,
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("prompt 1 has no tokens"), "{err}");

    // A prompt longer than the context the manifest allows.
    let limit = engine.context_limit();
    let long = EncodedPrompt {
        ids: vec![1; limit],
        images: vec![],
    };
    let err = engine
        .generate_many(
            &[long],
            &GenerationConfig::default(),
            BatchPolicy::default(),
            &mut NoHook,
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("exceeds the model's context"), "{err}");

    // [IMG] slots without an image.
    let orphan = EncodedPrompt {
        ids: vec![1, 3, 10, 10, 13, 4],
        images: vec![],
    };
    // A static batch fails as a whole; through KV-cache slots the prompt fails alone, as a failed sequence, and
    // the others go on. Either way the cause is named.
    let err = match engine.generate_many(
        &[orphan],
        &GenerationConfig::default(),
        BatchPolicy::default(),
        &mut NoHook,
    ) {
        Err(e) => e.to_string(),
        Ok((gens, _)) => {
            assert_eq!(gens[0].finish, FinishReason::Failed, "{gens:?}");
            assert!(gens[0].tokens.is_empty(), "{gens:?}");
            gens[0].error.clone().unwrap_or_default()
        }
    };
    assert!(err.contains("[IMG] tokens"), "{err}");

    let empty = image::DynamicImage::new_rgb8(0, 7);
    let err = engine.preprocessor.prepare(&empty).unwrap_err().to_string();
    assert!(err.contains("no pixels (0x7)"), "{err}");
}

#[test]
fn generate_cli_answers_and_reports_bad_images() {
    use crate::util::{pixtract, repo_root, text};
    let model = tiny_model();
    let image = model.join("reference/rgba/image0.png");
    let out = pixtract(
        &[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--image",
            image.to_str().unwrap(),
            "--prompt",
            "Read the logo.",
            "--max-new-tokens",
            "32",
        ],
        &[],
        &repo_root(),
    );
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    // The same greedy tokens as transformers, decoded.
    let case = read_json(&model.join("reference/rgba/case.json"));
    let want = case["greedy_text"].as_str().unwrap();
    let answer = String::from_utf8_lossy(&out.stdout);
    assert_eq!(answer.trim_end_matches('\n'), want, "{t}");
    assert!(
        t.contains("prompt 322 tokens") && t.contains("decode") && t.contains("tokens/s"),
        "{t}"
    );

    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("scan.png");
    std::fs::write(&fake, b"this is not a picture").unwrap();
    let out = pixtract(
        &[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--image",
            fake.to_str().unwrap(),
            "--prompt",
            "x",
        ],
        &[],
        &repo_root(),
    );
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("scan.png is not a readable image"), "{t}");
    assert_eq!(t.matches("Invalid PNG signature").count(), 1, "{t}");
}

/// `pixtract verify` passes on the tiny model and fails (exit 2, the case named) when a reference token is wrong.
#[test]
fn verify_cli_checks_the_reference_cases_and_names_a_mismatch() {
    use crate::util::{pixtract, repo_root, text};
    let model = tiny_model();
    let ok = pixtract(
        &["verify", "--model", model.to_str().unwrap()],
        &[],
        &repo_root(),
    );
    let t = text(&ok);
    assert!(ok.status.success(), "{t}");
    assert!(t.contains("11/11 cases pass"), "{t}");
    assert!(
        t.contains("tokens equal to one-by-one runs in 11/11 cases"),
        "{t}"
    );
    assert!(t.contains("parity on cpu"), "{t}");

    // A copy of the reference cases with one greedy token changed.
    let tmp = tempfile::tempdir().unwrap();
    let src = model.join("reference");
    for entry in std::fs::read_dir(&src).unwrap().flatten() {
        let to = tmp.path().join(entry.file_name());
        if entry.path().is_dir() {
            std::fs::create_dir(&to).unwrap();
            for f in std::fs::read_dir(entry.path()).unwrap().flatten() {
                std::fs::copy(f.path(), to.join(f.file_name())).unwrap();
            }
        } else {
            std::fs::copy(entry.path(), &to).unwrap();
        }
    }
    let case_path = tmp.path().join("rgba/case.json");
    let mut case = read_json(&case_path);
    let t5 = case["greedy_tokens"][5].as_u64().unwrap();
    case["greedy_tokens"][5] = serde_json::json!(t5 + 1);
    std::fs::write(&case_path, serde_json::to_string(&case).unwrap()).unwrap();
    let bad = pixtract(
        &[
            "verify",
            "--model",
            model.to_str().unwrap(),
            "--reference-dir",
            tmp.path().to_str().unwrap(),
            "--batch",
            "0",
        ],
        &[],
        &repo_root(),
    );
    let t = text(&bad);
    assert_eq!(bad.status.code(), Some(2), "{t}");
    let line = t
        .lines()
        .find(|l| l.starts_with("rgba "))
        .unwrap_or_else(|| panic!("no rgba line: {t}"));
    assert!(
        line.contains("tokens 5/32") && line.ends_with("FAIL"),
        "{line}"
    );
    assert!(t.contains("10/11 cases pass"), "{t}");
}

/// The GroupQueryAttention export holds the tiny model's weights but no reference of its own: `verify` uses the tiny
/// model's, says so, and the GQA decoder passes every check against transformers.
#[test]
fn verify_cli_passes_the_gqa_export_against_the_shared_reference() {
    use crate::util::{pixtract, repo_root, text};
    let model = tiny_gqa_model();
    assert!(!model.join("reference").exists());
    let out = pixtract(
        &["verify", "--model", model.to_str().unwrap(), "--batch", "3"],
        &[],
        &repo_root(),
    );
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("using models/tiny/reference"), "{t}");
    assert!(t.contains("11/11 cases pass"), "{t}");
    assert!(
        t.contains("tokens equal to one-by-one runs in 11/11 cases"),
        "{t}"
    );
}

/// Without token probabilities greedy decoding is an argmax only: the same tokens, no probabilities recorded.
#[test]
fn token_probabilities_are_optional_and_change_no_token() {
    let mut engine = engine();
    let (cases, prompts) = reference_prompts(&engine);
    let policy = BatchPolicy {
        max_batch: 4,
        token_budget: 8192,
        ..Default::default()
    };
    let with = GenerationConfig {
        max_new_tokens: 12,
        ..Default::default()
    };
    let without = GenerationConfig {
        token_probs: false,
        ..with.clone()
    };
    let (a, _) = engine
        .generate_many(&prompts, &with, policy, &mut NoHook)
        .unwrap();
    let (b, _) = engine
        .generate_many(&prompts, &without, policy, &mut NoHook)
        .unwrap();
    for ((x, y), case) in a.iter().zip(&b).zip(&cases) {
        assert_eq!(x.tokens, y.tokens, "{}", case.name);
        assert_eq!(x.token_probs.len(), x.tokens.len(), "{}", case.name);
        assert!(y.token_probs.is_empty(), "{}", case.name);
    }
}

/// `pixtract bench engine` runs the Python onnxruntime loop in the same run (here from prompts that
/// `bench encode-cases` wrote, as on a machine without mistral-common) and prints ratios.
#[test]
fn bench_engine_compares_with_the_python_loop() {
    use crate::util::{export_tool, pixtract, repo_root, text};
    let tmp = tempfile::tempdir().unwrap();
    let encoded = tmp.path().join("cases.npz");
    let reference = tiny_model().join("reference");
    let out = export_tool(&[
        "bench",
        "encode-cases",
        "--cases-from",
        reference.to_str().unwrap(),
        "--cases",
        "rgba,text_only",
        "--out",
        encoded.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let out = pixtract(
        &[
            "bench",
            "engine",
            "--cases",
            "rgba,text_only",
            "--batch",
            "2",
            "--repeat",
            "1",
            "--new-tokens",
            "4",
            "--skip-transformers",
            "--spin",
            "false",
            "--python-encoded",
            encoded.to_str().unwrap(),
        ],
        &[],
        &repo_root(),
    );
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    let row = t
        .lines()
        .find(|l| l.starts_with("2 ") && l.contains("python onnxruntime loop"))
        .unwrap_or_else(|| panic!("no Python row: {t}"));
    assert!(row.trim_end().ends_with('x'), "{row}");
    assert!(t.contains("2 prompts"), "{t}");
}

/// One sequence's grammar (hook) error ends that sequence with its error; the other sequences of the batch
/// generate exactly what they generate without it.
#[test]
fn one_rows_hook_error_fails_that_row_only() {
    use pixtract::model::{FinishReason, StepHook};
    struct FailRow(usize);
    impl StepHook for FailRow {
        fn mask_logits(&mut self, _row: usize, _logits: &mut [f32]) -> Result<(), HookError> {
            Ok(())
        }
        fn accept_token(&mut self, row: usize, _token: u32) -> Result<bool, HookError> {
            if row == self.0 {
                Err("the grammar rejected the token".into())
            } else {
                Ok(false)
            }
        }
    }
    let mut engine = engine();
    let (_, prompts) = reference_prompts(&engine);
    let prompts = &prompts[..3];
    let config = GenerationConfig {
        max_new_tokens: 6,
        ..Default::default()
    };
    let policy = BatchPolicy {
        max_batch: 4,
        token_budget: 1 << 20,
        ..Default::default()
    };
    let (plain, _) = engine
        .generate_many(prompts, &config, policy, &mut NoHook)
        .unwrap();
    let (gens, _) = engine
        .generate_many(prompts, &config, policy, &mut FailRow(1))
        .unwrap();
    assert_eq!(gens[1].finish, FinishReason::Failed);
    let error = gens[1].error.as_deref().unwrap_or_default();
    assert!(error.contains("the grammar rejected the token"), "{error}");
    for i in [0, 2] {
        assert_ne!(gens[i].finish, FinishReason::Failed);
        assert_eq!(gens[i].tokens, plain[i].tokens, "row {i}");
    }
}
