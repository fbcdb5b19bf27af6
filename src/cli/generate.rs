//! `pixtract generate`: one prompt over one or more images, answer and per-phase timings.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};

use pixtract::model::runtime::Threads;
use pixtract::model::{
    BatchPolicy, Device, EngineOptions, GenerationConfig, NoHook, OrtRuntime, PixtralEngine,
    Prompt, PromptPart, Sampling,
};

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// Model directory written by onnx-export (holds pixtract-model.json).
    #[arg(long, value_name = "DIR", default_value = "models/tiny")]
    pub model: PathBuf,
    /// Image file (JPEG, PNG, WebP, TIFF first page); repeat for several images in one prompt, in order.
    #[arg(long = "image", value_name = "FILE")]
    pub images: Vec<PathBuf>,
    /// The user's text, placed after the images.
    #[arg(long)]
    pub prompt: String,
    /// Optional system prompt (Pixtral prepends it to the user message; the Mistral 3 family puts it between
    /// [SYSTEM_PROMPT] tokens before it).
    #[arg(long)]
    pub system: Option<String>,
    /// Stop after this many new tokens (or at </s>).
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// cpu, cuda or cuda:N. CUDA that cannot register is an error, never a silent CPU run.
    #[arg(long, default_value = "cpu")]
    pub device: Device,
    /// ONNX Runtime intra-op threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Let ONNX Runtime's idle threads spin-wait between ops (ONNX Runtime's default; faster on an otherwise idle
    /// machine). `--spin false` when other work shares the cores.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub spin: bool,
    /// Sample at this temperature instead of greedy decoding.
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Nucleus sampling mass (with --temperature).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Seed of the sampler (with --temperature).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Keep generating past </s> (for timing a fixed number of tokens).
    #[arg(long)]
    pub ignore_eos: bool,
    /// Prompt tokens per prefill pass (0: all at once; default 256 on cpu, 1024 on cuda). Smaller chunks hold
    /// less attention memory.
    #[arg(long, value_name = "TOKENS")]
    pub prefill_chunk: Option<usize>,
}

pub fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    if args.max_new_tokens == 0 {
        bail!("--max-new-tokens must be at least 1");
    }
    let rt = OrtRuntime::load_from_env_with_pool(Threads {
        intra_op: args.threads,
        spin: args.spin,
    })?;
    let opts = EngineOptions {
        device: args.device,
    };
    let t_load = Instant::now();
    let mut engine = PixtralEngine::load(&rt, &args.model, opts)
        .with_context(|| format!("loading model {}", args.model.display()))?;
    let load = t_load.elapsed();

    let t_pre = Instant::now();
    let mut parts = Vec::new();
    for path in &args.images {
        let reader = image::ImageReader::open(path)
            .with_context(|| format!("cannot open image {}", path.display()))?
            .with_guessed_format()
            .with_context(|| format!("cannot read image {}", path.display()))?;
        if reader.format().is_none() {
            bail!(
                "{} is not an image: its content is none of JPEG, PNG, WebP, TIFF (use `pixtract pages` for PDFs)",
                path.display()
            );
        }
        // The decoder's own error chain repeats itself; one line with its message is clearer.
        let img = reader
            .decode()
            .map_err(|e| anyhow::anyhow!("{} is not a readable image: {e}", path.display()))?;
        let prepared = engine
            .preprocessor
            .prepare(&img)
            .with_context(|| format!("image {}", path.display()))?;
        parts.push(PromptPart::Image(prepared));
    }
    parts.push(PromptPart::Text(args.prompt.clone()));
    let prompt = engine.tokenizer.encode(Prompt {
        system: args.system.clone(),
        parts,
    })?;
    let preprocess = t_pre.elapsed();
    let grids: Vec<String> = prompt
        .images
        .iter()
        .map(|i| {
            format!(
                "{}x{} patches, {} image tokens",
                i.grid.cols,
                i.grid.rows,
                i.grid.num_tokens()
            )
        })
        .collect();

    let config = GenerationConfig {
        max_new_tokens: args.max_new_tokens,
        sampling: match args.temperature {
            Some(t) => Sampling::Sample {
                temperature: t,
                top_p: args.top_p,
                seed: args.seed,
            },
            None => Sampling::Greedy,
        },
        stop_on_eos: !args.ignore_eos,
        keep_first_logits: false,
        // The answer is printed, not scored: no per-token probabilities to compute.
        token_probs: false,
        prefill_chunk: args.prefill_chunk,
    };
    let prompt_len = prompt.ids.len();
    let (gens, stats) =
        engine.generate_many(&[prompt], &config, BatchPolicy::default(), &mut NoHook)?;
    let g = &gens[0];
    println!("{}", engine.tokenizer.decode(&g.tokens)?);
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    let per_s = |n: usize, d: std::time::Duration| n as f64 / d.as_secs_f64().max(1e-9);
    eprintln!(
        "model {} ({}) on {} (loaded in {:.0} ms)\nprompt {prompt_len} tokens ({} image(s){}{}), generated {} tokens \
         (finish: {:?})\npreprocess {:.1} ms | vision {:.1} ms | prefill {:.1} ms ({:.0} tokens/s) | decode {:.1} ms \
         ({:.1} tokens/s) | KV cache in {} memory",
        engine.model.manifest.model_id,
        engine.model.manifest.variant(),
        engine.device(),
        ms(load),
        args.images.len(),
        if grids.is_empty() { "" } else { ": " },
        grids.join(", "),
        g.tokens.len(),
        g.finish,
        ms(preprocess),
        ms(stats.vision),
        ms(stats.prefill),
        per_s(stats.prefill_tokens, stats.prefill),
        ms(stats.decode),
        per_s(stats.decode_tokens.saturating_sub(1), stats.decode),
        stats.kv_cache_memory.as_deref().unwrap_or("unknown"),
    );
    Ok(())
}
