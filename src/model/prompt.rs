//! The chat layout on the Tekken tokenizer, as mistral-common's instruct tokenizers build a single user turn.
//!
//! `<s>[INST]` + user content + `[/INST]`. Content is a list of images and texts; an image of `cols x rows` tokens
//! (patches, or merged squares of patches for the Mistral 3 family) is `rows x ([IMG]*cols + [IMG_BREAK])` with the
//! very last token replaced by `[IMG_END]`. When the content is texts followed by one image, the image moves first
//! (mistral-common's `force_img_first`); adjacent texts are joined by a blank line. Where a system prompt goes
//! depends on the Tekken version ([`SystemPlacement`], from the manifest):
//! - v3 (Pixtral): prepended to the user message: `system + "\n\n" + text` as one string for a text-only message,
//!   or as its own text chunk before the first chunk otherwise;
//! - v7 and later (Mistral 3): `<s>[SYSTEM_PROMPT]system[/SYSTEM_PROMPT][INST]...`, the user turn untouched.

use std::path::Path;

use tokenizers::Tokenizer;

use super::ModelError;
use super::manifest::{SpecialTokens, SystemPlacement};
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

pub struct PromptTokenizer {
    tokenizer: Tokenizer,
    special: SpecialTokens,
    system: SystemPlacement,
}

impl PromptTokenizer {
    pub fn from_file(
        path: &Path,
        special: SpecialTokens,
        system: SystemPlacement,
    ) -> Result<Self, ModelError> {
        let tokenizer = Tokenizer::from_file(path).map_err(|source| ModelError::Tokenizer {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(PromptTokenizer {
            tokenizer,
            special,
            system,
        })
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
        let mut ids = vec![s.bos];
        let mut images = Vec::new();
        let mut system = prompt.system.filter(|t| !t.is_empty());
        if self.system == SystemPlacement::Tokens
            && let Some(sys) = system.take()
        {
            ids.push(s.system_prompt);
            ids.extend(self.encode_text(&sys)?);
            ids.push(s.system_prompt_end);
        }
        ids.push(s.inst);
        // Adjacent texts are one chunk joined by a blank line and empty texts are dropped, as mistral-common's request
        // normalizer does (chunk_join_str "\n\n" up to Tekken v13).
        let mut parts: Vec<PromptPart> = Vec::with_capacity(prompt.parts.len());
        for part in prompt.parts {
            match (parts.last_mut(), part) {
                (_, PromptPart::Text(text)) if text.is_empty() => {}
                (Some(PromptPart::Text(prev)), PromptPart::Text(text)) => {
                    prev.push_str("\n\n");
                    prev.push_str(&text);
                }
                (_, part) => parts.push(part),
            }
        }
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
