//! Pixtral's chat layout on the Tekken tokenizer, as mistral-common's V3 instruct tokenizer builds it.
//!
//! `<s>[INST]` + user content + `[/INST]`. Content is a list of images and texts; an image of `cols x rows` patches
//! is `rows x ([IMG]*cols + [IMG_BREAK])` with the very last token replaced by `[IMG_END]`. A system prompt is
//! prepended to the (last) user message: `system + "\n\n" + text` as one string for a text-only message, or as its
//! own text chunk before the first chunk otherwise. When the content is texts followed by one image, the image
//! moves first (mistral-common's `force_img_first`).

use std::path::Path;

use tokenizers::Tokenizer;

use super::ModelError;
use super::manifest::SpecialTokens;
use super::preprocess::PreparedImage;

/// One part of a user message.
#[derive(Debug, Clone)]
pub enum PromptPart {
    Image(PreparedImage),
    Text(String),
}

/// A single-turn request: optional system prompt and the user's parts, in order.
#[derive(Debug, Clone, Default)]
pub struct Prompt {
    pub system: Option<String>,
    pub parts: Vec<PromptPart>,
}

/// Token ids ready for the engine, with the images in the order of their `[IMG]` runs.
#[derive(Debug, Clone)]
pub struct EncodedPrompt {
    pub ids: Vec<u32>,
    pub images: Vec<PreparedImage>,
}

pub struct PixtralTokenizer {
    tokenizer: Tokenizer,
    special: SpecialTokens,
}

impl PixtralTokenizer {
    pub fn from_file(path: &Path, special: SpecialTokens) -> Result<Self, ModelError> {
        let tokenizer = Tokenizer::from_file(path).map_err(|source| ModelError::Tokenizer {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(PixtralTokenizer { tokenizer, special })
    }

    pub fn inner(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn special(&self) -> &SpecialTokens {
        &self.special
    }

    /// Text to ids, no BOS/EOS (Tekken adds none by itself).
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        self.tokenizer
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(ModelError::Encode)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
        self.tokenizer.decode(ids, true).map_err(ModelError::Encode)
    }

    pub fn encode(&self, prompt: Prompt) -> Result<EncodedPrompt, ModelError> {
        let s = &self.special;
        let mut ids = vec![s.bos, s.inst];
        let mut images = Vec::new();
        let mut parts = prompt.parts;
        let system = prompt.system.filter(|t| !t.is_empty());
        match parts.as_slice() {
            [PromptPart::Text(text)] => {
                let text = match &system {
                    Some(sys) => format!("{sys}\n\n{text}"),
                    None => text.clone(),
                };
                ids.extend(self.encode_text(&text)?);
            }
            _ => {
                let texts_then_image = parts.len() >= 2
                    && matches!(parts.last(), Some(PromptPart::Image(_)))
                    && parts[..parts.len() - 1]
                        .iter()
                        .all(|p| matches!(p, PromptPart::Text(_)));
                if texts_then_image && let Some(image) = parts.pop() {
                    parts.insert(0, image);
                }
                if let Some(sys) = &system
                    && !parts.is_empty()
                {
                    ids.extend(self.encode_text(&format!("{sys}\n\n"))?);
                }
                for part in parts {
                    match part {
                        PromptPart::Text(text) => ids.extend(self.encode_text(&text)?),
                        PromptPart::Image(image) => {
                            // One [IMG] per (merged) patch: `merge` x `merge` patches are one token.
                            let g = image.grid;
                            let m = g.merge.max(1);
                            for _ in 0..g.rows / m {
                                ids.extend(std::iter::repeat_n(s.img, g.cols / m));
                                ids.push(s.img_break);
                            }
                            if let Some(last) = ids.last_mut() {
                                *last = s.img_end;
                            }
                            images.push(image);
                        }
                    }
                }
            }
        }
        ids.push(s.inst_end);
        Ok(EncodedPrompt { ids, images })
    }
}
