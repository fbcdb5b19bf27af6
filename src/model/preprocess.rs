//! Page images -> Pixtral pixel tensors, exactly as mistral-common prepares them (see [`crate::imaging`]).

use image::DynamicImage;

use crate::imaging::{self, PatchGrid};

use super::ModelError;
use super::manifest::ModelManifest;

/// One image ready for the vision encoder: CHW f32 normalised pixels at the patch grid's size.
#[derive(Debug, Clone)]
pub struct PreparedImage {
    pub grid: PatchGrid,
    /// Size of the image before preprocessing (after EXIF/alpha handling).
    pub source_width: u32,
    pub source_height: u32,
    /// `3 * grid.height() * grid.width()` values, channel-major.
    pub pixels: Vec<f32>,
}

impl PreparedImage {
    pub fn width(&self) -> usize {
        self.grid.width()
    }

    pub fn height(&self) -> usize {
        self.grid.height()
    }
}

/// The model's image settings from its manifest.
#[derive(Debug, Clone)]
pub struct ImagePreprocessor {
    pub max_side: usize,
    pub patch: usize,
    /// Patches per token side ([`super::manifest::ImageTokenLayout::spatial_merge`]).
    pub merge: usize,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl ImagePreprocessor {
    /// The manifest's image settings and patch merge (the one constructor: a preprocessor that forgot the merge
    /// would cover images in squares the vision graph cannot merge).
    pub fn for_model(manifest: &ModelManifest) -> Self {
        let config = &manifest.image;
        ImagePreprocessor {
            max_side: config.max_image_size,
            patch: config.patch_size,
            merge: manifest.image_layout().spatial_merge,
            mean: config.mean,
            std: config.std,
        }
    }

    pub fn grid_for(&self, width: u32, height: u32) -> PatchGrid {
        PatchGrid::for_image_merged(width, height, self.max_side, self.patch, self.merge)
    }

    /// Fails only for an image without pixels (0 wide or 0 high).
    pub fn prepare(&self, img: &DynamicImage) -> Result<PreparedImage, ModelError> {
        if img.width() == 0 || img.height() == 0 {
            return Err(ModelError::EmptyImage {
                width: img.width(),
                height: img.height(),
            });
        }
        // An RGB page (what the raster stage hands on) is used in place, not copied.
        let converted;
        let rgb = match img {
            DynamicImage::ImageRgb8(rgb) => rgb,
            other => {
                converted = imaging::to_rgb_on_white(other);
                &converted
            }
        };
        let grid = self.grid_for(rgb.width(), rgb.height());
        let (w, h) = (grid.width(), grid.height());
        let hwc = imaging::cubic_resize(rgb, w, h);
        Ok(PreparedImage {
            grid,
            source_width: rgb.width(),
            source_height: rgb.height(),
            pixels: imaging::normalize_chw(&hwc, w, h, self.mean, self.std),
        })
    }
}
