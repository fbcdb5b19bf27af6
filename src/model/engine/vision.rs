//! The vision encoder session: one image -> `[patches, text_hidden]` features; a prompt -> its images' features in
//! `[IMG]` order. Its own type so continuous batching can run it on a thread of its own, encoding the next prompts'
//! pages while the decoder steps (`BatchPolicy::vision_ahead`).

use std::time::{Duration, Instant};

use ort::session::Session;

use super::ort_util::{FloatKind, ort_err, read_floats};
use crate::model::ModelError;
use crate::model::preprocess::PreparedImage;
use crate::model::prompt::EncodedPrompt;

pub(super) struct VisionEncoder {
    session: Session,
    float: FloatKind,
    /// Width of a feature row: the text model's hidden size (the projector's output).
    hidden: usize,
    /// The `[IMG]` token id: one feature row per `[IMG]` token of a prompt.
    img: u32,
}

/// One prompt's image features, with what producing them cost.
pub(super) struct PromptFeatures {
    pub features: Vec<f32>,
    pub images: usize,
    pub took: Duration,
}

impl VisionEncoder {
    pub fn new(session: Session, hidden: usize, img: u32) -> Result<Self, ModelError> {
        let float = FloatKind::of(&session, "pixel_values")?;
        Ok(VisionEncoder {
            session,
            float,
            hidden,
            img,
        })
    }

    /// `[patches, hidden]` features of one image, row-major.
    pub fn image_features(&mut self, image: &PreparedImage) -> Result<Vec<f32>, ModelError> {
        let (w, h) = (image.width() as i64, image.height() as i64);
        let pixels = self.float.tensor(vec![1, 3, h, w], &image.pixels)?;
        let outputs = self
            .session
            .run(ort::inputs!["pixel_values" => pixels])
            .map_err(ort_err("vision encoder"))?;
        let (shape, data) = read_floats(&outputs[0], "vision features")?;
        // One feature per (merged) patch.
        let m = image.grid.merge.max(1);
        let expected = ((image.grid.cols / m) * (image.grid.rows / m)) as i64;
        let hidden = self.hidden as i64;
        if shape != [expected, hidden] {
            return Err(ModelError::Graph(format!(
                "vision encoder returned {shape:?} for a {}x{} patch grid, expected [{expected}, {hidden}]",
                image.grid.cols, image.grid.rows
            )));
        }
        Ok(data)
    }

    /// The features of every image of `prompt`, in `[IMG]` order, checked against its number of `[IMG]` tokens.
    pub fn prompt_features(
        &mut self,
        prompt: &EncodedPrompt,
    ) -> Result<PromptFeatures, ModelError> {
        let start = Instant::now();
        let mut features = Vec::new();
        for image in &prompt.images {
            features.extend(self.image_features(image)?);
        }
        let slots = prompt.ids.iter().filter(|&&t| t == self.img).count();
        if slots * self.hidden != features.len() {
            return Err(ModelError::ImageTokens {
                slots,
                features: features.len() / self.hidden.max(1),
            });
        }
        Ok(PromptFeatures {
            features,
            images: prompt.images.len(),
            took: start.elapsed(),
        })
    }
}
