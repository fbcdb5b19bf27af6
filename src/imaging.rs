//! Pixtral's image geometry and resize, exactly as mistral-common (Mistral's reference, also vLLM's) does it.
//!
//! This is the one resize in the code base: the raster stage uses it to hand pages on at model size, the model
//! stage to build pixel tensors. It must stay bit-faithful: an antialiased resampler (Pillow-style, or the image
//! crate's filters) changes the model's greedy tokens (measured in docs/benchmarks.md).
//!
//! mistral-common: PIL image -> RGB (non-RGB via RGBA composited on white) -> u8 to f32 -> OpenCV `INTER_CUBIC`
//! resize (IPP path: f64 coordinates, always 4 taps, a = -0.75, no antialiasing, output not clamped) ->
//! /255 -> (x - mean) / std, all in f32 -> CHW.

use image::{DynamicImage, RgbImage};

/// Size of the patch grid an image becomes, and the pixel size it is resized to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PatchGrid {
    pub cols: usize,
    pub rows: usize,
    pub patch: usize,
    /// Patches merged into one token per side (1: Pixtral; the model's `image_tokens.spatial_merge`).
    pub merge: usize,
}

impl PatchGrid {
    /// mistral-common's rule: scale the long side down to `max_side` (never up), rounding half to even as
    /// Python's `round` does, then cover the image with whole patches.
    pub fn for_image(width: u32, height: u32, max_side: usize, patch: usize) -> PatchGrid {
        let (mut w, mut h) = (width.max(1) as f64, height.max(1) as f64);
        let ratio = f64::max(h / max_side as f64, w / max_side as f64);
        if ratio > 1.0 {
            w = (w / ratio).round_ties_even().max(1.0);
            h = (h / ratio).round_ties_even().max(1.0);
        }
        let (w, h) = (w as usize, h as usize);
        PatchGrid {
            cols: (w - 1) / patch + 1,
            rows: (h - 1) / patch + 1,
            patch,
            merge: 1,
        }
    }

    /// [`PatchGrid::for_image`] for a model that merges `merge` x `merge` patches into one token: the image is
    /// covered by whole merged squares (`patch * merge` pixels), as mistral-common does for the Mistral 3 family
    /// (a 1020-px side becomes 1036 px: 74 patches, 37 tokens), so every patch has its square.
    pub fn for_image_merged(
        width: u32,
        height: u32,
        max_side: usize,
        patch: usize,
        merge: usize,
    ) -> PatchGrid {
        let merge = merge.max(1);
        let unit = PatchGrid::for_image(width, height, max_side, patch * merge);
        PatchGrid {
            cols: unit.cols * merge,
            rows: unit.rows * merge,
            patch,
            merge,
        }
    }

    pub fn width(&self) -> usize {
        self.cols * self.patch
    }

    pub fn height(&self) -> usize {
        self.rows * self.patch
    }

    /// Image tokens in the prompt: a row of [IMG] per row of (merged) patches, each closed by one [IMG_BREAK]
    /// (the last one is [IMG_END]).
    pub fn num_tokens(&self) -> usize {
        let m = self.merge.max(1);
        (self.cols / m + 1) * (self.rows / m)
    }
}

/// RGB with transparency composited on white the way PIL's `paste` does: per channel
/// `(c*a + 255*(255-a)) / 255`, rounded half up. Grey is replicated; 16-bit channels are scaled to 8 bits.
/// [`to_rgb_on_white`] of an image this call may consume: an RGB8 image is returned as it is, and an RGBA8 one
/// is composited in place in its own buffer (no second full-size copy: a 100-megapixel RGBA scan peaks at its
/// 400 MB rather than 400 + 400 + 300 MB). Same pixels as [`to_rgb_on_white`].
pub fn into_rgb_on_white(img: DynamicImage) -> RgbImage {
    let rgba = match img {
        DynamicImage::ImageRgb8(rgb) => return rgb,
        DynamicImage::ImageRgba8(rgba) => rgba,
        other => return to_rgb_on_white(&other),
    };
    let (w, h) = rgba.dimensions();
    let mut buf = rgba.into_raw();
    let pixels = buf.len() / 4;
    // Pixel i is read from [4i, 4i+4) before [3i, 3i+3) is written; 3i+2 < 4j for every later j, so no unread
    // source byte is overwritten.
    for i in 0..pixels {
        let a = buf[4 * i + 3] as u32;
        for c in 0..3 {
            let x = buf[4 * i + c] as u32 * a + 255 * (255 - a);
            buf[3 * i + c] = ((2 * x + 255) / 510) as u8;
        }
    }
    buf.truncate(pixels * 3);
    buf.shrink_to_fit();
    match RgbImage::from_raw(w, h, buf) {
        Some(rgb) => rgb,
        // Unreachable: the buffer holds exactly w x h x 3 bytes by construction.
        None => RgbImage::new(w, h),
    }
}

pub fn to_rgb_on_white(img: &DynamicImage) -> RgbImage {
    if !img.color().has_alpha() {
        return img.to_rgb8();
    }
    let rgba = img.to_rgba8();
    let (w, h) = rgba.dimensions();
    let mut out = RgbImage::new(w, h);
    for (src, dst) in rgba.pixels().zip(out.pixels_mut()) {
        let a = src.0[3] as u32;
        for c in 0..3 {
            let x = src.0[c] as u32 * a + 255 * (255 - a);
            dst.0[c] = ((2 * x + 255) / 510) as u8;
        }
    }
    out
}

/// Per output index: the 4 source indices (clamped) and their f32 weights, as OpenCV's IPP cubic computes them.
struct AxisTaps {
    index: Vec<[usize; 4]>,
    weight: Vec<[f32; 4]>,
}

impl AxisTaps {
    fn new(src: usize, dst: usize) -> AxisTaps {
        const A: f64 = -0.75;
        let scale = src as f64 / dst as f64;
        let last = src as isize - 1;
        let mut index = Vec::with_capacity(dst);
        let mut weight = Vec::with_capacity(dst);
        for d in 0..dst {
            let c = (d as f64 + 0.5) * scale - 0.5;
            let s = c.floor();
            let t = c - s;
            let s = s as isize;
            let w0 = ((A * (t + 1.0) - 5.0 * A) * (t + 1.0) + 8.0 * A) * (t + 1.0) - 4.0 * A;
            let w1 = ((A + 2.0) * t - (A + 3.0)) * t * t + 1.0;
            let u = 1.0 - t;
            let w2 = ((A + 2.0) * u - (A + 3.0)) * u * u + 1.0;
            let w3 = ((A * (u + 1.0) - 5.0 * A) * (u + 1.0) + 8.0 * A) * (u + 1.0) - 4.0 * A;
            index.push([
                (s - 1).clamp(0, last) as usize,
                s.clamp(0, last) as usize,
                (s + 1).clamp(0, last) as usize,
                (s + 2).clamp(0, last) as usize,
            ]);
            weight.push([w0 as f32, w1 as f32, w2 as f32, w3 as f32]);
        }
        AxisTaps { index, weight }
    }
}

/// Resizes an RGB image to `dst_w` x `dst_h` with OpenCV's float cubic; returns HWC f32 on the 0..255 scale,
/// not clamped (cubic overshoot below 0 and above 255 is part of what the model sees).
///
/// The horizontal pass runs only over the source rows the vertical taps read (at most `4 * dst_h`, each once),
/// so the intermediate holds `min(src_h, 4 * dst_h) x dst_w x 3` floats whatever the source height: a 1-pixel
/// wide, 100-million-pixel tall image needs 64 rows, not 100 million. Same arithmetic in the same order as a full
/// horizontal pass, so the values are identical.
pub fn cubic_resize(src: &RgbImage, dst_w: usize, dst_h: usize) -> Vec<f32> {
    let (sw, sh) = (src.width() as usize, src.height() as usize);
    let xt = AxisTaps::new(sw, dst_w);
    let yt = AxisTaps::new(sh, dst_h);
    let raw = src.as_raw();
    // Source rows the vertical taps use, ascending, and each one's slot in the intermediate.
    let mut used: Vec<usize> = yt.index.iter().flatten().copied().collect();
    used.sort_unstable();
    used.dedup();
    let stride = dst_w * 3;
    let mut horizontal = vec![0f32; used.len() * stride];
    for (slot, &y) in used.iter().enumerate() {
        let row = &raw[y * sw * 3..(y + 1) * sw * 3];
        let out = &mut horizontal[slot * stride..(slot + 1) * stride];
        for x in 0..dst_w {
            let idx = &xt.index[x];
            let w = &xt.weight[x];
            for c in 0..3 {
                let p = |k: usize| row[idx[k] * 3 + c] as f32;
                out[x * 3 + c] = w[0] * p(0) + w[1] * p(1) + w[2] * p(2) + w[3] * p(3);
            }
        }
    }
    // `used` is sorted: a binary search finds a source row's slot.
    let slot = |y: usize| used.binary_search(&y).unwrap_or(0);
    let mut out = vec![0f32; dst_h * stride];
    for y in 0..dst_h {
        let idx = &yt.index[y];
        let w = &yt.weight[y];
        let row = |k: usize| {
            let s = slot(idx[k]);
            &horizontal[s * stride..(s + 1) * stride]
        };
        let rows = [row(0), row(1), row(2), row(3)];
        let dst = &mut out[y * stride..(y + 1) * stride];
        for (i, v) in dst.iter_mut().enumerate() {
            *v = w[0] * rows[0][i] + w[1] * rows[1][i] + w[2] * rows[2][i] + w[3] * rows[3][i];
        }
    }
    out
}

/// The image as the model sees it, back in 8 bits (rounded, clamped): for `pixtract pages` and previews.
pub fn model_view(img: &DynamicImage, max_side: usize, patch: usize) -> RgbImage {
    // An RGB page is used in place: a copy of a 100-megapixel scan is 300 MB.
    let converted;
    let rgb = match img {
        DynamicImage::ImageRgb8(rgb) => rgb,
        other => {
            converted = to_rgb_on_white(other);
            &converted
        }
    };
    let grid = PatchGrid::for_image(rgb.width(), rgb.height(), max_side, patch);
    let (w, h) = (grid.width(), grid.height());
    let data = cubic_resize(rgb, w, h);
    let bytes = data
        .iter()
        .map(|v| v.round().clamp(0.0, 255.0) as u8)
        .collect();
    RgbImage::from_raw(w as u32, h as u32, bytes).expect("buffer sized w*h*3")
}

/// Normalised CHW tensor data: `((x / 255) - mean) / std` in f32, the order of mistral-common's numpy ops.
pub fn normalize_chw(
    hwc: &[f32],
    width: usize,
    height: usize,
    mean: [f32; 3],
    std: [f32; 3],
) -> Vec<f32> {
    let plane = width * height;
    let mut out = vec![0f32; 3 * plane];
    for (i, px) in hwc.chunks_exact(3).enumerate() {
        for c in 0..3 {
            out[c * plane + i] = (px[c] / 255.0 - mean[c]) / std[c];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_follows_mistral_common_rounding() {
        // 3000x1502: ratio 2.9296875 -> 1024 x 512.68.. -> 513 rows of pixels -> 33 patch rows (HF floors to 32).
        let g = PatchGrid::for_image(3000, 1502, 1024, 16);
        assert_eq!((g.cols, g.rows), (64, 33));
        // Below one patch: one patch each way.
        assert_eq!(PatchGrid::for_image(12, 9, 1024, 16).num_tokens(), 2);
        // Never upscaled past the image's own patch cover.
        let g = PatchGrid::for_image(40, 20, 1024, 16);
        assert_eq!((g.width(), g.height(), g.num_tokens()), (48, 32, 8));
        // Extreme aspect ratio keeps at least one pixel.
        let g = PatchGrid::for_image(100_000, 10, 1024, 16);
        assert_eq!((g.cols, g.rows), (64, 1));
        assert_eq!(
            PatchGrid::for_image(1024, 1024, 1024, 16).num_tokens(),
            4160
        );
    }

    #[test]
    fn a_patch_merger_counts_one_token_per_merged_square() {
        // The Mistral 3 family's layout: 14-px patches, 2x2 merged. A 1024-px page: 74 patches a side, 37 tokens
        // a side plus a break per row; at the family's 1540 px: 110 -> 55.
        let merged = |side: u32, max: usize| PatchGrid::for_image_merged(side, side, max, 14, 2);
        assert_eq!(merged(1024, 1540).num_tokens(), 37 * 38);
        assert_eq!(merged(1540, 1540).num_tokens(), 55 * 56);
        // Covered by whole 28-px squares: 1020 px -> 1036 (74 patches), not 1022 (73, unmergeable).
        let g = merged(1020, 1540);
        assert_eq!((g.cols, g.width(), g.num_tokens()), (74, 1036, 37 * 38));
        // An A4 page at 150 dpi, scaled to 1540 on its long side: 39 x 55 tokens (mistral-common: 2,200).
        let a4 = PatchGrid::for_image_merged(2480, 3508, 1540, 14, 2);
        assert_eq!(a4.num_tokens(), (39 + 1) * 55);
        // Pixtral's, for comparison: 4,160 for a 1024-px page.
        assert_eq!(
            PatchGrid::for_image(1024, 1024, 1024, 16).num_tokens(),
            64 * 65
        );
    }

    #[test]
    fn rgba_composited_in_place_equals_the_copying_path() {
        let mut seed = 7u32;
        let img = image::RgbaImage::from_fn(37, 23, |_, _| {
            let mut px = [0u8; 4];
            for v in &mut px {
                seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                *v = (seed >> 16) as u8;
            }
            image::Rgba(px)
        });
        let copied = to_rgb_on_white(&DynamicImage::ImageRgba8(img.clone()));
        let in_place = into_rgb_on_white(DynamicImage::ImageRgba8(img));
        assert_eq!(copied, in_place);
        let rgb = RgbImage::from_fn(5, 3, |x, y| image::Rgb([x as u8, y as u8, 1]));
        assert_eq!(into_rgb_on_white(DynamicImage::ImageRgb8(rgb.clone())), rgb);
        let gray = image::GrayImage::from_fn(4, 4, |x, _| image::Luma([x as u8 * 60]));
        let gray = DynamicImage::ImageLuma8(gray);
        assert_eq!(into_rgb_on_white(gray.clone()), to_rgb_on_white(&gray));
    }

    #[test]
    fn cubic_is_identity_at_same_size_and_exact_on_constants() {
        let img = RgbImage::from_fn(7, 5, |x, y| image::Rgb([(x * 30) as u8, (y * 40) as u8, 9]));
        let out = cubic_resize(&img, 7, 5);
        let expect: Vec<f32> = img.as_raw().iter().map(|&v| v as f32).collect();
        assert_eq!(out, expect);
        let flat = RgbImage::from_pixel(13, 29, image::Rgb([200, 100, 0]));
        for v in cubic_resize(&flat, 16, 48).chunks(3) {
            for (a, b) in v.iter().zip([200.0f32, 100.0, 0.0]) {
                assert!((a - b).abs() < 1e-3, "{a} vs {b}");
            }
        }
    }

    #[test]
    fn cubic_overshoots_at_edges_like_opencv() {
        // A hard black/white edge upscaled: a = -0.75 rings below 0 and above 255, and nothing clamps it.
        let img = RgbImage::from_fn(4, 1, |x, _| {
            if x < 2 {
                image::Rgb([0, 0, 0])
            } else {
                image::Rgb([255, 255, 255])
            }
        });
        let out = cubic_resize(&img, 16, 1);
        let min = out.iter().cloned().fold(f32::MAX, f32::min);
        let max = out.iter().cloned().fold(f32::MIN, f32::max);
        assert!(min < -1.0 && max > 256.0, "min {min} max {max}");
    }

    #[test]
    fn alpha_composites_on_white_like_pil_paste() {
        let mut img = image::RgbaImage::new(3, 1);
        img.put_pixel(0, 0, image::Rgba([10, 20, 30, 0]));
        img.put_pixel(1, 0, image::Rgba([10, 20, 30, 255]));
        img.put_pixel(2, 0, image::Rgba([0, 100, 255, 128]));
        let rgb = to_rgb_on_white(&DynamicImage::ImageRgba8(img));
        assert_eq!(rgb.get_pixel(0, 0).0, [255, 255, 255]);
        assert_eq!(rgb.get_pixel(1, 0).0, [10, 20, 30]);
        // 0*128 + 255*127 = 32385 -> 127.0 ; 100*128 + 32385 = 45185 -> 177.2 -> 177
        assert_eq!(rgb.get_pixel(2, 0).0, [127, 177, 255]);
    }
}
