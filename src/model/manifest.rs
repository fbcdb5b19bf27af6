//! `pixtract-model.json`: every number the runtime needs, written by `onnx-export` next to the graphs.
//!
//! The runtime never hard-codes model sizes: layer counts, KV heads, token ids, image normalisation and the
//! graphs' input/output names all come from here, so the tiny test model and Pixtral 12B run the same code.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::ModelError;
use super::runtime::Device;

pub const MANIFEST_FILE: &str = "pixtract-model.json";
const FORMAT: &str = "pixtract-model";
/// Manifest versions this pixtract reads: 1 (every Pixtral export before the family split: Pixtral implied) and 2
/// (the family and its image-token layout recorded).
const FORMAT_VERSIONS: [u32; 2] = [1, 2];
/// Model families this pixtract runs, each with the patch merge its image-token layout must have: Pixtral (one token
/// per 16-px patch) and the Mistral 3 family (Ministral 3, Mistral Small 3.x: one token per 2x2 square of 14-px
/// patches).
pub const FAMILIES: [(&str, usize); 2] = [("pixtral", 1), ("mistral3", 2)];
/// How to make a manifest this pixtract reads.
const EXPORT_HINT: &str = "re-export it with this checkout's onnx-export: `.venv/bin/python onnx-export/export.py \
     export --checkpoint CHECKPOINT_DIR --out MODEL_DIR`";

#[derive(Debug, Clone, Deserialize)]
pub struct ModelManifest {
    pub format: String,
    pub format_version: u32,
    pub model_id: String,
    pub source: serde_json::Value,
    /// "fp32" or "fp16": activations, KV cache and unquantized weights; logits are always fp32.
    pub dtype: String,
    /// What the weights hold: fp32, fp16, or a quantized variant (int8, int4, q8f16, q4f16). Absent in
    /// manifests written before variants existed, which are plain `dtype` exports.
    #[serde(default)]
    pub variant: Option<String>,
    /// Present when `onnx-export quantize` rewrote graphs' MatMuls as MatMulNBits.
    #[serde(default)]
    pub quantization: Option<Quantization>,
    pub weights_sha256: String,
    pub text: TextConfig,
    pub vision: VisionConfig,
    pub image: ImageConfig,
    pub tokens: SpecialTokens,
    pub tokenizer: FileEntry,
    pub graphs: Graphs,
    pub exporter: serde_json::Value,
    /// The model family (version 2; version 1 manifests are Pixtral's).
    #[serde(default)]
    pub family: Option<String>,
    /// How an image's patches become prompt tokens (version 2; version 1: Pixtral's, no merge).
    #[serde(default)]
    pub image_tokens: Option<ImageTokenLayout>,
    /// Where the system prompt goes, by the tokenizer's Tekken version (absent before the Mistral 3 family: Pixtral's
    /// v3 layout).
    #[serde(default)]
    pub prompt: Option<PromptLayout>,
}

/// How a prompt holds the system prompt (mistral-common's instruct tokenizers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SystemPlacement {
    /// Tekken v3 (Pixtral): written at the start of the user turn, `system + "\n\n"`.
    #[default]
    UserPrefix,
    /// Tekken v7 and later: `[SYSTEM_PROMPT]system[/SYSTEM_PROMPT]` before `[INST]`.
    Tokens,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PromptLayout {
    pub system: SystemPlacement,
    #[serde(default)]
    pub tekken_version: Option<String>,
}

/// How an image's patch grid becomes prompt tokens: `spatial_merge` x `spatial_merge` patches make one token
/// (1: Pixtral; 2: the Mistral 3 family's patch merger), each row of tokens closed by `[IMG_BREAK]` when
/// `break_tokens` (the last by `[IMG_END]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct ImageTokenLayout {
    pub patch_size: usize,
    pub spatial_merge: usize,
    pub break_tokens: bool,
}

/// Weight-only quantization record written by `onnx-export quantize`.
#[derive(Debug, Clone, Deserialize)]
pub struct Quantization {
    pub method: String,
    pub bits: u32,
    pub block_size: u32,
    pub symmetric: bool,
    #[serde(default)]
    pub accuracy_level: u32,
    /// Per quantized graph: MatMul counts and parameters (kept as JSON; shown, not interpreted).
    pub graphs: std::collections::BTreeMap<String, serde_json::Value>,
}

impl ModelManifest {
    /// The variant name users see: "int4", "q4f16", ... or the dtype for float exports.
    pub fn variant(&self) -> &str {
        self.variant.as_deref().unwrap_or(&self.dtype)
    }

    /// Bytes one token takes in the KV cache: a key and a value per layer and KV head, in the cache's float type
    /// (`dtype`: quantized variants quantize weights only). Pixtral 12B in fp16: 40 x 2 x 8 x 128 x 2 = 160 KiB.
    pub fn kv_cache_bytes_per_token(&self) -> usize {
        let t = &self.text;
        let float_bytes = if self.dtype == "fp16" { 2 } else { 4 };
        t.num_layers * 2 * t.num_key_value_heads * t.head_dim * float_bytes
    }

    /// The model family ("pixtral" for version 1 manifests).
    pub fn family(&self) -> &str {
        self.family.as_deref().unwrap_or("pixtral")
    }

    /// Where the system prompt goes (Pixtral's v3 layout when the manifest says nothing).
    pub fn system_placement(&self) -> SystemPlacement {
        self.prompt.as_ref().map(|p| p.system).unwrap_or_default()
    }

    /// How images become prompt tokens: the manifest's, or Pixtral's (no merge, row breaks) for version 1.
    pub fn image_layout(&self) -> ImageTokenLayout {
        self.image_tokens.unwrap_or(ImageTokenLayout {
            patch_size: self.image.patch_size,
            spatial_merge: 1,
            break_tokens: true,
        })
    }

    /// Prompt tokens of the largest image preprocessing lets through: a square of `max_image_size`, each row of
    /// (merged) patches `[IMG]` tokens closed by `[IMG_BREAK]` (`[IMG_END]` on the last).
    pub fn max_image_tokens(&self) -> usize {
        let layout = self.image_layout();
        let side =
            self.image.max_image_size / self.image.patch_size.max(1) / layout.spatial_merge.max(1);
        side * (side + usize::from(layout.break_tokens))
    }

    /// One line on what the weights hold, e.g. "q4f16: decoder MatMuls 4-bit, block 32".
    pub fn describe_weights(&self) -> String {
        match &self.quantization {
            None => self.variant().to_string(),
            Some(q) => format!(
                "{}: {} MatMuls {}-bit{}, block {}, activations {}",
                self.variant(),
                q.graphs.keys().cloned().collect::<Vec<_>>().join("+"),
                q.bits,
                if q.symmetric { " symmetric" } else { "" },
                q.block_size,
                self.dtype
            ),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct TextConfig {
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
}

#[derive(Debug, Clone, Deserialize)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_attention_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub patch_size: usize,
    pub image_size: usize,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ImageConfig {
    pub patch_size: usize,
    pub max_image_size: usize,
    pub rescale: f64,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub resize: String,
    pub background: [u8; 3],
}

#[derive(Debug, Clone, Copy, Deserialize)]
pub struct SpecialTokens {
    pub unk: u32,
    pub bos: u32,
    pub eos: u32,
    pub inst: u32,
    pub inst_end: u32,
    pub img: u32,
    pub pad: u32,
    pub img_break: u32,
    pub img_end: u32,
    pub system_prompt: u32,
    pub system_prompt_end: u32,
}

#[derive(Debug, Clone, Deserialize)]
pub struct FileEntry {
    pub file: String,
    pub sha256: String,
    #[serde(default)]
    pub bytes: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Graphs {
    pub vision_encoder: GraphEntry,
    pub embed_tokens: GraphEntry,
    pub decoder: GraphEntry,
}

impl Graphs {
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &GraphEntry)> {
        [
            ("vision_encoder", &self.vision_encoder),
            ("embed_tokens", &self.embed_tokens),
            ("decoder", &self.decoder),
        ]
        .into_iter()
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct GraphEntry {
    pub file: String,
    pub bytes: u64,
    pub sha256: String,
    pub weights_sha256: String,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    #[serde(default)]
    pub external_data: Option<FileEntry>,
    /// Decoder only: how its attention treats padding and the cache (absent in older manifests: eager).
    #[serde(default)]
    pub attention: DecoderAttention,
}

/// The decoder graph's attention, as `onnx-export export --attention` wrote it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DecoderAttention {
    /// transformers' attention: left-padded batches with an `attention_mask` input; `present.*` is the past
    /// concatenated with this step's keys/values (a new tensor each step).
    #[default]
    Eager,
    /// ONNX Runtime's GroupQueryAttention: each row's tokens sit at the start of its cache row (right padding,
    /// lengths in `seqlens_k`), and the cache may be one buffer bound as both past and present, written in place.
    Gqa,
}

impl DecoderAttention {
    /// Whether pixtract can run this decoder, whose activations are `dtype` ("fp32" or "fp16"), on `device`:
    /// eager everywhere; gqa on the CPU, and on CUDA in fp16 only: ONNX Runtime's CUDA GroupQueryAttention has
    /// fp16/bf16 kernels and no fp32 one (an fp32 node would quietly fall back to the CPU provider, the cache
    /// crossing to the host every step).
    pub fn check_device(self, device: Device, dtype: &str) -> Result<(), ModelError> {
        if self == DecoderAttention::Gqa && device != Device::Cpu && dtype != "fp16" {
            return Err(ModelError::AttentionDevice {
                device,
                dtype: dtype.to_string(),
            });
        }
        Ok(())
    }

    pub fn name(self) -> &'static str {
        match self {
            DecoderAttention::Eager => "eager",
            DecoderAttention::Gqa => "gqa",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct TensorSpec {
    pub name: String,
    /// numpy dtype name: "float32", "float16", "int64".
    pub dtype: String,
    /// Fixed sizes as numbers, dynamic axes by name.
    pub shape: Vec<serde_json::Value>,
}

/// A model directory whose manifest has been read and checked for consistency.
#[derive(Debug, Clone)]
pub struct ModelDir {
    pub dir: PathBuf,
    pub manifest: ModelManifest,
}

impl ModelDir {
    /// Reads and checks `<dir>/pixtract-model.json`: format, version, internal consistency, files present with
    /// the sizes the manifest records. Hashes are checked separately by [`ModelDir::verify_hashes`] (slow on
    /// a 25 GB model).
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, ModelError> {
        let dir = dir.as_ref().to_path_buf();
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(|cause| ModelError::ManifestRead {
            path: path.clone(),
            cause,
        })?;
        let manifest: ModelManifest =
            serde_json::from_str(&text).map_err(|cause| ModelError::ManifestParse {
                path: path.clone(),
                cause,
            })?;
        let invalid = |reason: String| ModelError::ManifestInvalid {
            path: path.clone(),
            reason,
        };
        if manifest.format != FORMAT || !FORMAT_VERSIONS.contains(&manifest.format_version) {
            return Err(invalid(format!(
                "format {:?} version {}, this pixtract reads {FORMAT:?} versions {FORMAT_VERSIONS:?}; {EXPORT_HINT}",
                manifest.format, manifest.format_version
            )));
        }
        if manifest.format_version >= 2
            && (manifest.family.is_none() || manifest.image_tokens.is_none())
        {
            return Err(invalid(format!(
                "version {} names no family or image-token layout; {EXPORT_HINT}",
                manifest.format_version
            )));
        }
        let Some(&(_, merge)) = FAMILIES.iter().find(|(name, _)| *name == manifest.family()) else {
            return Err(invalid(format!(
                "model family {:?}: this pixtract runs {}; {EXPORT_HINT}",
                manifest.family(),
                FAMILIES.map(|(name, _)| name).join(", ")
            )));
        };
        let layout = manifest.image_layout();
        if layout.patch_size != manifest.image.patch_size
            || layout.spatial_merge != merge
            || !layout.break_tokens
        {
            return Err(invalid(format!(
                "image-token layout {layout:?} is not {}'s (patch {}, {merge}x{merge} patches a token, row breaks)",
                manifest.family(),
                manifest.image.patch_size
            )));
        }
        let t = &manifest.text;
        if t.num_layers == 0 || t.num_key_value_heads == 0 || t.head_dim == 0 || t.vocab_size == 0 {
            return Err(invalid("text config has a zero size".into()));
        }
        if !t.num_attention_heads.is_multiple_of(t.num_key_value_heads) {
            return Err(invalid(format!(
                "{} attention heads is not a multiple of {} KV heads",
                t.num_attention_heads, t.num_key_value_heads
            )));
        }
        let img = &manifest.image;
        if img.patch_size == 0 || img.max_image_size < img.patch_size {
            return Err(invalid(format!(
                "image patch size {} / max image size {} make no sense",
                img.patch_size, img.max_image_size
            )));
        }
        if !matches!(manifest.dtype.as_str(), "fp32" | "fp16") {
            return Err(invalid(format!(
                "dtype {:?} (expected fp32 or fp16)",
                manifest.dtype
            )));
        }
        if let Some(q) = &manifest.quantization {
            if !matches!(q.bits, 4 | 8) {
                return Err(invalid(format!(
                    "quantization with {} bits (expected 4 or 8)",
                    q.bits
                )));
            }
            if let Some(graph) = q
                .graphs
                .keys()
                .find(|g| !matches!(g.as_str(), "vision_encoder" | "embed_tokens" | "decoder"))
            {
                return Err(invalid(format!(
                    "quantization names unknown graph {graph:?}"
                )));
            }
        }
        let decoder = &manifest.graphs.decoder;
        for layer in 0..t.num_layers {
            for kind in ["key", "value"] {
                let input = format!("past_key_values.{layer}.{kind}");
                let output = format!("present.{layer}.{kind}");
                if !decoder.inputs.iter().any(|s| s.name == input)
                    || !decoder.outputs.iter().any(|s| s.name == output)
                {
                    return Err(invalid(format!(
                        "decoder graph lacks {input} / {output} for layer {layer} of {}",
                        t.num_layers
                    )));
                }
            }
        }
        let model = ModelDir { dir, manifest };
        for (file, expected) in model.files() {
            let p = model.dir.join(&file);
            let meta = std::fs::metadata(&p).map_err(|cause| ModelError::FileMissing {
                path: p.clone(),
                cause,
            })?;
            if let Some(bytes) = expected.1
                && meta.len() != bytes
            {
                return Err(ModelError::FileSize {
                    path: p,
                    expected: bytes,
                    actual: meta.len(),
                });
            }
        }
        Ok(model)
    }

    /// Every file the manifest lists, with (sha256, size when recorded).
    pub fn files(&self) -> Vec<(String, (String, Option<u64>))> {
        let m = &self.manifest;
        let mut out = vec![(
            m.tokenizer.file.clone(),
            (m.tokenizer.sha256.clone(), m.tokenizer.bytes),
        )];
        for (_, g) in m.graphs.iter() {
            out.push((g.file.clone(), (g.sha256.clone(), Some(g.bytes))));
            if let Some(ext) = &g.external_data {
                out.push((ext.file.clone(), (ext.sha256.clone(), ext.bytes)));
            }
        }
        out
    }

    pub fn path_of(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// Recomputes the sha256 of every file and compares with the manifest.
    pub fn verify_hashes(&self) -> Result<(), ModelError> {
        for (file, (expected, _)) in self.files() {
            let path = self.dir.join(&file);
            let actual = sha256_file(&path).map_err(|cause| ModelError::FileMissing {
                path: path.clone(),
                cause,
            })?;
            if actual != expected {
                return Err(ModelError::HashMismatch {
                    path,
                    expected,
                    actual,
                });
            }
        }
        Ok(())
    }

    /// Total bytes of graphs and their external data.
    pub fn weight_bytes(&self) -> u64 {
        self.manifest
            .graphs
            .iter()
            .map(|(_, g)| g.bytes + g.external_data.as_ref().and_then(|e| e.bytes).unwrap_or(0))
            .sum()
    }
}

pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gqa_runs_on_cuda_in_fp16_only() {
        let cuda = Device::Cuda(0);
        assert!(DecoderAttention::Gqa.check_device(cuda, "fp16").is_ok());
        let err = DecoderAttention::Gqa
            .check_device(cuda, "fp32")
            .expect_err("fp32 gqa on cuda");
        assert!(err.to_string().contains("--dtype fp16"), "{err}");
        for dtype in ["fp32", "fp16"] {
            assert!(
                DecoderAttention::Gqa
                    .check_device(Device::Cpu, dtype)
                    .is_ok()
            );
            assert!(DecoderAttention::Eager.check_device(cuda, dtype).is_ok());
        }
    }
}
