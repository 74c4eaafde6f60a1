//! The Qwen2-VL / Qwen2.5-VL image processor: what transformers' `Qwen2VLImageProcessor`
//! does to an image before the vision tower sees it, so a checkpoint's images become
//! the same numbers in kiln as in Python.
//!
//! # Design
//!
//! Each image keeps its own size, rounded by [`smart_resize`] to multiples of
//! `patch_size × merge_size` (28) with its pixel count inside
//! `[min_pixels, max_pixels]` and its aspect ratio kept. It is resized on 8-bit RGB with
//! PIL's bicubic filter ([`resize_bicubic`]: the same fixed-point arithmetic as Pillow,
//! so the bytes are Pillow's), rescaled by 1/255 (in f64, then f32, as numpy does),
//! normalised with the checkpoint's mean and std (CLIP's), duplicated in time to
//! `temporal_patch_size` frames, and cut into `patch_size`² patches laid out in
//! **merge-block order**: the `merge_size`² patches of each merge unit are consecutive
//! rows, merge units row-major — the order the vision tower's merger and rotary
//! positions expect. One row is `C × T × P × P` values (1176), channel-major.
//!
//! Settings come from the checkpoint's `preprocessor_config.json` (`min_pixels` /
//! `max_pixels`, or `size.shortest_edge` / `size.longest_edge`), never hard-coded, and
//! a user may lower `max_pixels` to bound the image tokens.

use std::path::Path;

use image::RgbImage;
use kiln_core::{Error, Result};

use crate::ImageInput;
use crate::decode::{Alpha, decode};

/// A processor's settings, as a checkpoint's `preprocessor_config.json` gives them.
#[derive(Debug, Clone, PartialEq)]
pub struct QwenVlSettings {
    /// Fewest pixels an image is resized to (rounded sizes grow to reach it).
    pub min_pixels: u64,
    /// Most pixels an image is resized to (rounded sizes shrink to stay under it).
    pub max_pixels: u64,
    /// Side of a square patch, in pixels (14).
    pub patch_size: usize,
    /// Frames per patch in time; a still image is repeated this many times (2).
    pub temporal_patch_size: usize,
    /// Patches merged per side into one token by the vision tower (2).
    pub merge_size: usize,
    /// Per-channel mean, RGB.
    pub image_mean: [f32; 3],
    /// Per-channel standard deviation, RGB.
    pub image_std: [f32; 3],
}

/// CLIP's mean and std, which Qwen2-VL's processor defaults to: the decimals the
/// checkpoints write, rounded to f32 as numpy rounds them.
#[allow(clippy::excessive_precision)]
const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
#[allow(clippy::excessive_precision)]
const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

impl Default for QwenVlSettings {
    /// transformers' defaults for the class (`min_pixels` 56², `max_pixels` 28² × 1280).
    fn default() -> Self {
        QwenVlSettings {
            min_pixels: 56 * 56,
            max_pixels: 28 * 28 * 1280,
            patch_size: 14,
            temporal_patch_size: 2,
            merge_size: 2,
            image_mean: CLIP_MEAN,
            image_std: CLIP_STD,
        }
    }
}

impl QwenVlSettings {
    /// The settings of the checkpoint folder `dir` (its `preprocessor_config.json`):
    /// `min_pixels` / `max_pixels` when present, else `size.shortest_edge` /
    /// `size.longest_edge`, else the class defaults; the other keys likewise.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("preprocessor_config.json");
        let text = std::fs::read(&path).map_err(|e| Error::io("reading", &path, e))?;
        let json: serde_json::Value =
            serde_json::from_slice(&text).map_err(|e| Error::model_load_with(&path, "invalid JSON", e))?;
        let mut s = QwenVlSettings::default();
        let int = |key: &str| json.get(key).and_then(serde_json::Value::as_u64);
        let size = |key: &str| json.get("size").and_then(|v| v.get(key)).and_then(serde_json::Value::as_u64);
        if let Some(v) = int("min_pixels").or_else(|| size("shortest_edge")) {
            s.min_pixels = v;
        }
        if let Some(v) = int("max_pixels").or_else(|| size("longest_edge")) {
            s.max_pixels = v;
        }
        for (key, field) in
            [("patch_size", &mut s.patch_size), ("temporal_patch_size", &mut s.temporal_patch_size)]
        {
            if let Some(v) = int(key) {
                *field = v as usize;
            }
        }
        if let Some(v) = int("merge_size") {
            s.merge_size = v as usize;
        }
        let triple = |key: &str| -> Option<[f32; 3]> {
            let v = json.get(key)?.as_array()?;
            let f: Vec<f32> = v.iter().filter_map(|x| x.as_f64().map(|x| x as f32)).collect();
            <[f32; 3]>::try_from(f).ok()
        };
        if let Some(m) = triple("image_mean") {
            s.image_mean = m;
        }
        if let Some(m) = triple("image_std") {
            s.image_std = m;
        }
        s.check().map_err(|why| Error::model_load(&path, why))?;
        Ok(s)
    }

    /// Why these settings cannot work, if so.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.patch_size == 0 || self.merge_size == 0 || self.temporal_patch_size == 0 {
            return Err("patch_size, merge_size and temporal_patch_size must be at least 1".into());
        }
        if self.min_pixels > self.max_pixels {
            return Err(format!("min_pixels {} is over max_pixels {}", self.min_pixels, self.max_pixels));
        }
        let unit = (self.patch_size * self.merge_size) as u64;
        if self.max_pixels < unit * unit {
            return Err(format!(
                "max_pixels {} is under one merged patch ({unit}×{unit} = {} pixels)",
                self.max_pixels,
                unit * unit
            ));
        }
        if self.image_std.contains(&0.0) {
            return Err("image_std has a 0".into());
        }
        Ok(())
    }

    /// Values in one patch row: channels × frames × patch².
    pub fn patch_values(&self) -> usize {
        3 * self.temporal_patch_size * self.patch_size * self.patch_size
    }
}

/// `(height, width)` rounded to multiples of `factor` — to the nearest, halves to even,
/// as Python's `round` — then scaled (keeping the aspect ratio) so the pixel count is
/// within `[min_pixels, max_pixels]`: transformers' `smart_resize`. An aspect ratio over
/// 200 is refused.
pub fn smart_resize(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: u64,
    max_pixels: u64,
) -> Result<(usize, usize)> {
    if height == 0 || width == 0 {
        return Err(Error::InvalidInput(format!("an image of {width}×{height} has no pixels")));
    }
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    let ratio = h.max(w) / h.min(w);
    if ratio > 200.0 {
        return Err(Error::InvalidInput(format!(
            "an image of {width}×{height} has an aspect ratio of {ratio:.1}; at most 200 is accepted"
        )));
    }
    let mut h_bar = ((h / f).round_ties_even() * f) as u64;
    let mut w_bar = ((w / f).round_ties_even() * f) as u64;
    if h_bar * w_bar > max_pixels {
        let beta = (h * w / max_pixels as f64).sqrt();
        h_bar = (factor as u64).max(((h / beta / f).floor() * f) as u64);
        w_bar = (factor as u64).max(((w / beta / f).floor() * f) as u64);
    } else if h_bar * w_bar < min_pixels {
        let beta = (min_pixels as f64 / (h * w)).sqrt();
        h_bar = ((h * beta / f).ceil() * f) as u64;
        w_bar = ((w * beta / f).ceil() * f) as u64;
    }
    Ok((h_bar as usize, w_bar as usize))
}

/// One image, processed: its patch rows and its grid.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessedImage {
    /// `[grid_t × grid_h × grid_w, C × T × P × P]`, row-major, in merge-block order.
    pub pixel_values: Vec<f32>,
    /// Patches in time, height and width (`image_grid_thw`).
    pub grid_thw: [usize; 3],
}

impl ProcessedImage {
    /// Patch rows (`grid_t × grid_h × grid_w`).
    pub fn patches(&self) -> usize {
        self.grid_thw.iter().product()
    }

    /// Tokens the image becomes in the prompt once merged: patches / merge².
    pub fn tokens(&self, merge_size: usize) -> usize {
        self.patches() / (merge_size * merge_size).max(1)
    }
}

/// Qwen2-VL's image processor with a checkpoint's settings.
#[derive(Debug, Clone)]
pub struct QwenVlProcessor {
    settings: QwenVlSettings,
    /// Largest image decoded at all (pixel bombs are refused from the header).
    max_decode_pixels: u64,
    /// Largest file read.
    max_bytes: u64,
}

impl QwenVlProcessor {
    /// A processor with `settings`; images over `max_decode_pixels` pixels or
    /// `max_bytes` bytes are refused before decoding.
    pub fn new(settings: QwenVlSettings, max_decode_pixels: u64, max_bytes: u64) -> Result<Self> {
        settings.check().map_err(|why| Error::InvalidInput(format!("Qwen2-VL processor settings: {why}")))?;
        Ok(QwenVlProcessor { settings, max_decode_pixels, max_bytes })
    }

    /// The settings in force.
    pub fn settings(&self) -> &QwenVlSettings {
        &self.settings
    }

    /// Reads, decodes (alpha dropped, as `convert("RGB")` does) and processes one image;
    /// errors name the image.
    pub fn process(&self, input: &ImageInput) -> Result<ProcessedImage> {
        let bytes = input.read(self.max_bytes)?;
        let name = input.name();
        // JPEGs through libjpeg-turbo at full scale (mozjpeg), as Pillow decodes them: the
        // image crate's decoder differs by a few levels.
        let decoded = decode(&bytes, &name, self.max_decode_pixels, Alpha::Drop, &|_| Some(8))?;
        self.process_rgb(&decoded.rgb).map_err(|e| match e {
            Error::InvalidInput(m) => Error::InvalidInput(format!("image {name}: {m}")),
            other => other,
        })
    }

    /// Processes decoded 8-bit RGB.
    #[allow(clippy::needless_range_loop)] // the patch layout reads best as indices
    pub fn process_rgb(&self, rgb: &RgbImage) -> Result<ProcessedImage> {
        let s = &self.settings;
        let factor = s.patch_size * s.merge_size;
        let (h, w) =
            smart_resize(rgb.height() as usize, rgb.width() as usize, factor, s.min_pixels, s.max_pixels)?;
        let resized = resize_bicubic(rgb, w as u32, h as u32);
        let (p, m, t) = (s.patch_size, s.merge_size, s.temporal_patch_size);
        let (grid_h, grid_w) = (h / p, w / p);
        // Per channel and byte value, the normalised f32, computed as numpy does.
        let mut table = [[0f32; 256]; 3];
        for (c, row) in table.iter_mut().enumerate() {
            for (v, out) in row.iter_mut().enumerate() {
                let x = (v as f64 * (1.0f64 / 255.0)) as f32;
                *out = (x - s.image_mean[c]) / s.image_std[c];
            }
        }
        let width = s.patch_values();
        let mut values = vec![0f32; grid_h * grid_w * width];
        let pixels = resized.as_raw();
        let mut row = 0;
        for hb in 0..grid_h / m {
            for wb in 0..grid_w / m {
                for mh in 0..m {
                    for mw in 0..m {
                        let out = &mut values[row * width..(row + 1) * width];
                        let (y0, x0) = ((hb * m + mh) * p, (wb * m + mw) * p);
                        for c in 0..3 {
                            for tt in 0..t {
                                let base = (c * t + tt) * p * p;
                                for pi in 0..p {
                                    let src = ((y0 + pi) * w + x0) * 3 + c;
                                    for pj in 0..p {
                                        out[base + pi * p + pj] = table[c][pixels[src + pj * 3] as usize];
                                    }
                                }
                            }
                        }
                        row += 1;
                    }
                }
            }
        }
        Ok(ProcessedImage { pixel_values: values, grid_thw: [1, grid_h, grid_w] })
    }
}

/// Fixed-point bits of Pillow's 8-bit resampling coefficients.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's bicubic kernel (a = −0.5, support 2).
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// One axis of a resize: for each output index, the first input index and the
/// fixed-point weights of the inputs from there (Pillow's `precompute_coeffs` and
/// `normalize_coeffs_8bpc`).
fn coefficients(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            // C's (int) cast: truncation toward zero.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            // Pillow multiplies by the reciprocal; dividing can differ in the last bit.
            let ss = 1.0 / filterscale;
            let raw: Vec<f64> = (xmin..xmax).map(|x| bicubic((x as f64 - center + 0.5) * ss)).collect();
            let total: f64 = raw.iter().sum();
            let fixed = raw
                .iter()
                .map(|&w| {
                    let w = if total != 0.0 { w / total } else { w };
                    let scaled = w * f64::from(1u32 << PRECISION_BITS);
                    (if w < 0.0 { -0.5 + scaled } else { 0.5 + scaled }) as i32
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes 8-bit RGB to `width` × `height` with Pillow's bicubic filter, bit for bit as
/// `Image.resize(size, Image.BICUBIC)` does: separable, antialiased when shrinking,
/// fixed-point weights, the horizontal pass first (only over the rows the vertical pass
/// reads) and rounded to 8 bits between the passes; an axis whose size does not change
/// is not resampled.
#[allow(clippy::needless_range_loop)] // three channels, by index, as Pillow's loops
pub fn resize_bicubic(src: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (in_w, in_h) = (src.width() as usize, src.height() as usize);
    let (out_w, out_h) = (width as usize, height as usize);
    if (in_w, in_h) == (out_w, out_h) || out_w == 0 || out_h == 0 {
        return if out_w == 0 || out_h == 0 { RgbImage::new(width, height) } else { src.clone() };
    }
    let vertical = coefficients(in_h, out_h);
    let (first_row, last_row) =
        (vertical.first().map_or(0, |(y, _)| *y), vertical.last().map_or(0, |(y, k)| y + k.len()));
    let pixels = src.as_raw();
    // Horizontal pass over the rows the vertical pass uses.
    let (rows, row_width, horizontal_out): (usize, usize, Vec<u8>) = if out_w != in_w {
        let horizontal = coefficients(in_w, out_w);
        let rows = last_row - first_row;
        let mut out = vec![0u8; rows * out_w * 3];
        for r in 0..rows {
            let line = &pixels[(first_row + r) * in_w * 3..(first_row + r + 1) * in_w * 3];
            for (xx, (xmin, k)) in horizontal.iter().enumerate() {
                let mut acc = [1i32 << (PRECISION_BITS - 1); 3];
                for (i, &weight) in k.iter().enumerate() {
                    let px = &line[(xmin + i) * 3..(xmin + i) * 3 + 3];
                    for c in 0..3 {
                        acc[c] += i32::from(px[c]) * weight;
                    }
                }
                let o = (r * out_w + xx) * 3;
                for c in 0..3 {
                    out[o + c] = clip8(acc[c]);
                }
            }
        }
        (rows, out_w, out)
    } else {
        (in_h, in_w, Vec::new())
    };
    let (source, offset) = if out_w != in_w { (&horizontal_out[..], first_row) } else { (&pixels[..], 0) };
    if out_h == in_h {
        debug_assert_eq!(rows, in_h);
        return RgbImage::from_raw(width, height, source.to_vec()).expect("sized to the output");
    }
    let mut out = vec![0u8; out_h * row_width * 3];
    for (yy, (ymin, k)) in vertical.iter().enumerate() {
        let ymin = ymin - offset;
        for xx in 0..row_width {
            let mut acc = [1i32 << (PRECISION_BITS - 1); 3];
            for (i, &weight) in k.iter().enumerate() {
                let o = ((ymin + i) * row_width + xx) * 3;
                for c in 0..3 {
                    acc[c] += i32::from(source[o + c]) * weight;
                }
            }
            let o = (yy * row_width + xx) * 3;
            for c in 0..3 {
                out[o + c] = clip8(acc[c]);
            }
        }
    }
    RgbImage::from_raw(width, height, out).expect("sized to the output")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smart_resize_rounds_half_to_even_and_keeps_within_the_bounds() {
        // Qwen2.5-VL's checkpoint settings.
        let r = |h, w| smart_resize(h, w, 28, 3136, 12_845_056).unwrap();
        assert_eq!(r(480, 640), (476, 644));
        assert_eq!(r(1080, 1920), (1092, 1932));
        // The class default max_pixels (28² × 1280) shrinks 1080p.
        assert_eq!(smart_resize(1080, 1920, 28, 3136, 28 * 28 * 1280).unwrap(), (728, 1316));
        assert_eq!(r(224, 224), (224, 224));
        assert_eq!(r(10, 10), (56, 56), "grown to min_pixels");
        // 70/28 = 2.5 rounds to 2, 98/28 = 3.5 to 4, as Python's round does.
        assert_eq!(smart_resize(70, 98, 28, 0, u64::MAX).unwrap(), (56, 112));
        let (h, w) = smart_resize(4000, 6000, 28, 3136, 12_845_056).unwrap();
        assert_eq!((h, w), (2912, 4368));
        assert!((h * w) as u64 <= 12_845_056);
    }

    #[test]
    fn an_extreme_aspect_ratio_is_refused_by_name() {
        let e = smart_resize(10, 2500, 28, 3136, 1 << 30).unwrap_err().to_string();
        assert!(e.contains("aspect ratio of 250.0") && e.contains("at most 200"), "{e}");
    }

    #[test]
    fn patches_come_in_merge_block_order() {
        // A 56×56 image whose pixel value encodes its 14-px patch: after processing,
        // rows go (0,0) (0,1) (1,0) (1,1) within each 2×2 merge unit.
        let settings = QwenVlSettings {
            min_pixels: 56 * 56,
            max_pixels: 56 * 56,
            image_mean: [0.0; 3],
            image_std: [1.0; 3],
            ..QwenVlSettings::default()
        };
        let p = QwenVlProcessor::new(settings, 1 << 20, 1 << 20).unwrap();
        let img = RgbImage::from_fn(56, 56, |x, y| image::Rgb([(10 * (y / 14) + x / 14) as u8, 0, 0]));
        let out = p.process_rgb(&img).unwrap();
        assert_eq!(out.grid_thw, [1, 4, 4]);
        assert_eq!(out.tokens(2), 4);
        let row_patch = |row: usize| (out.pixel_values[row * 1176] * 255.0).round() as u32;
        let order: Vec<u32> = (0..16).map(row_patch).collect();
        assert_eq!(order, vec![0, 1, 10, 11, 2, 3, 12, 13, 20, 21, 30, 31, 22, 23, 32, 33]);
        // Both frames of a patch hold the same image.
        assert_eq!(out.pixel_values[0], out.pixel_values[196]);
    }

    #[test]
    fn resizing_to_the_same_size_is_a_copy_and_a_flat_image_stays_flat() {
        let img = RgbImage::from_pixel(37, 23, image::Rgb([200, 100, 7]));
        assert_eq!(resize_bicubic(&img, 37, 23), img);
        let big = resize_bicubic(&img, 90, 11);
        assert!(big.pixels().all(|p| p.0 == [200, 100, 7]));
    }
}
