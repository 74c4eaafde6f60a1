//! kiln's image pipeline: bytes or files in, one batch tensor out.
//!
//! Each image is read (refused above `preprocess.max_bytes` before reading), its format
//! recognised from its content, its size read from the header (refused above
//! `preprocess.max_pixels` before any pixel is decoded — a decompression bomb costs
//! nothing), decoded, turned upright per its EXIF orientation and converted to 8-bit
//! RGB (gray, gray + alpha, RGBA, 16-bit and CMYK included; transparent pixels are
//! composited on `pad_color`). It is then fitted to the output size — `letterbox`,
//! `resize` or `shortest_edge` + centre crop — with a SIMD convolution resizer
//! (`fast_image_resize`; Lanczos3 by default, as PIL), and written straight into its
//! slot of one pre-allocated batch buffer: scaling, mean/std normalisation and the
//! CHW or HWC layout happen in that single pass, through a per-channel lookup table
//! of the output element's bytes. Images run in parallel on the pipeline's own rayon
//! pool; a bounded cache keyed by content hash and settings skips all of it for an
//! image seen before.
//!
//! A failing image fails alone: [`Batch::rows`] says, per input, which row it became
//! or the error naming the file and what was wrong.
//!
//! ```no_run
//! use kiln_vision::{ImageInput, ImagePipeline};
//!
//! let pipeline = ImagePipeline::new(&kiln_core::PreprocessConfig::default())?;
//! let batch = pipeline.process(&[ImageInput::path("cat.jpg"), ImageInput::path("dog.png")])?;
//! assert_eq!(batch.tensor.shape(), [2, 3, 224, 224]);
//! # Ok::<(), kiln_core::Error>(())
//! ```

use std::cell::RefCell;
use std::sync::Arc;

use fast_image_resize::images::{Image as FirImage, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use kiln_core::{DType, Error, Layout, PreprocessConfig, ResizeFilter, ResizeMode, Result, Tensor};
use rayon::prelude::*;

mod decode;
mod files;
pub mod qwen2vl;
pub use decode::{ACCEPTED_FORMATS, Alpha, Decoded, IMAGE_EXTENSIONS, ImageInput, decode};
pub use files::{expand_paths, has_image_extension, read_npy, write_npy};
pub use qwen2vl::{ProcessedImage, QwenVlProcessor, QwenVlSettings};

/// The result of [`ImagePipeline::process`].
#[derive(Debug)]
pub struct Batch {
    /// One row per image that succeeded, in input order: `[n, 3, H, W]` (CHW) or
    /// `[n, H, W, 3]` (HWC).
    pub tensor: Tensor,
    /// Per input: the row of `tensor` it became, or why it failed.
    pub rows: Vec<Result<usize>>,
}

/// Where the resized image sits in the output, and the region of the source it covers.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Fit {
    /// Size the whole source would be resized to.
    resized: (u32, u32),
    /// Size the source (or its crop) is resized to.
    width: u32,
    height: u32,
    /// Offset of the resized image in the output.
    left: u32,
    top: u32,
    /// Source crop (left, top, width, height), in source pixels.
    crop: Option<(f64, f64, f64, f64)>,
}

/// Decodes and prepares images per a [`PreprocessConfig`].
pub struct ImagePipeline {
    config: PreprocessConfig,
    pool: rayon::ThreadPool,
    /// Output element bytes of every (channel, pixel value), and the pad colour's.
    lut: Lut,
    cache: Option<moka::sync::Cache<u128, Arc<Vec<u8>>>>,
    /// Settings that change the output, hashed into every cache key.
    settings: String,
}

enum Lut {
    F32(Box<[[[u8; 4]; 256]; 3]>),
    F16(Box<[[[u8; 2]; 256]; 3]>),
    U8(Box<[[[u8; 1]; 256]; 3]>),
}

impl ImagePipeline {
    /// A pipeline for `config` (validated), with its own thread pool.
    pub fn new(config: &PreprocessConfig) -> Result<Self> {
        config.validate()?;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(config.threads)
            .thread_name(|i| format!("kiln-vision-{i}"))
            .build()
            .map_err(|e| Error::Unsupported(format!("cannot start the pre-processing threads: {e}")))?;
        let value = |c: usize, v: usize| (v as f32 * config.scale - config.mean[c]) / config.std[c];
        let lut = match config.dtype {
            DType::F32 => Lut::F32(Box::new(std::array::from_fn(|c| {
                std::array::from_fn(|v| value(c, v).to_le_bytes())
            }))),
            DType::F16 => Lut::F16(Box::new(std::array::from_fn(|c| {
                std::array::from_fn(|v| half::f16::from_f32(value(c, v)).to_le_bytes())
            }))),
            _ => Lut::U8(Box::new(std::array::from_fn(|_| std::array::from_fn(|v| [v as u8])))),
        };
        let cache = (config.cache_bytes > 0).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(config.cache_bytes)
                .weigher(|_: &u128, row: &Arc<Vec<u8>>| u32::try_from(row.len()).unwrap_or(u32::MAX))
                .build()
        });
        let c = config;
        let settings = format!(
            "{:?}|{}x{}|{:?}|{:?}|{:?}|{}|{:?}|{:?}|{:?}|{}",
            c.mode,
            c.width,
            c.height,
            c.shortest_edge,
            c.filter,
            c.pad_color,
            c.scale,
            c.mean,
            c.std,
            c.layout,
            c.dtype
        );
        Ok(ImagePipeline { config: config.clone(), pool, lut, cache, settings })
    }

    /// The settings in force.
    pub fn config(&self) -> &PreprocessConfig {
        &self.config
    }

    /// Shape of a batch of `n` images.
    pub fn shape(&self, n: usize) -> Vec<usize> {
        let (h, w) = (self.config.height as usize, self.config.width as usize);
        match self.config.layout {
            Layout::Chw => vec![n, 3, h, w],
            Layout::Hwc => vec![n, h, w, 3],
        }
    }

    fn row_bytes(&self) -> usize {
        3 * self.config.width as usize * self.config.height as usize * self.config.dtype.size()
    }

    /// Processes `inputs` in parallel into one batch; an image that fails takes no row
    /// and its error (naming it) is in [`Batch::rows`]. `Err` only if the batch
    /// buffer itself cannot be made.
    pub fn process(&self, inputs: &[ImageInput]) -> Result<Batch> {
        let row_bytes = self.row_bytes();
        let mut buffer = vec![0u8; row_bytes * inputs.len()];
        let results: Vec<Result<()>> = self.pool.install(|| {
            inputs
                .par_iter()
                .zip(buffer.par_chunks_mut(row_bytes.max(1)))
                .map(|(input, row)| self.process_into(input, row))
                .collect()
        });
        // Close the gaps failed images left, keeping input order.
        let mut rows = Vec::with_capacity(inputs.len());
        let mut next = 0usize;
        for (i, result) in results.into_iter().enumerate() {
            match result {
                Ok(()) => {
                    if next != i {
                        buffer.copy_within(i * row_bytes..(i + 1) * row_bytes, next * row_bytes);
                    }
                    rows.push(Ok(next));
                    next += 1;
                }
                Err(e) => rows.push(Err(e)),
            }
        }
        buffer.truncate(next * row_bytes);
        let tensor = Tensor::from_bytes(self.config.dtype, self.shape(next), buffer)?;
        Ok(Batch { tensor, rows })
    }

    /// One image as a `[1, ...]` tensor.
    pub fn process_one(&self, input: &ImageInput) -> Result<Tensor> {
        let mut row = vec![0u8; self.row_bytes()];
        self.process_into(input, &mut row)?;
        Tensor::from_bytes(self.config.dtype, self.shape(1), row)
    }

    fn process_into(&self, input: &ImageInput, row: &mut [u8]) -> Result<()> {
        let bytes = input.read(self.config.max_bytes)?;
        let key = self.cache.as_ref().map(|_| {
            let mut h = xxhash_rust::xxh3::Xxh3::new();
            h.update(self.settings.as_bytes());
            h.update(&bytes);
            h.digest128()
        });
        if let (Some(cache), Some(key)) = (&self.cache, key)
            && let Some(hit) = cache.get(&key)
        {
            row.copy_from_slice(&hit);
            return Ok(());
        }
        let decoded = self.decode(&bytes, &input.name())?;
        self.fit_into(&decoded, row).map_err(|e| match e {
            Error::InvalidInput(m) => Error::InvalidInput(format!("image {}: {m}", input.name())),
            other => other,
        })?;
        if let (Some(cache), Some(key)) = (&self.cache, key) {
            cache.insert(key, Arc::new(row.to_vec()));
        }
        Ok(())
    }

    /// Decodes `bytes` to upright 8-bit RGB, checking size limits from the header first
    /// (`preprocess.max_pixels`); transparent pixels are composited on `pad_color`. A
    /// large JPEG may come back decoded at a reduced scale (`fast_jpeg`); the result's
    /// `source` is always the full upright size.
    pub fn decode(&self, bytes: &[u8], name: &str) -> Result<Decoded> {
        let scale = |upright: (u32, u32)| if self.config.fast_jpeg { self.jpeg_scale(upright) } else { None };
        decode::decode(bytes, name, self.config.max_pixels, Alpha::Composite(self.config.pad_color), &scale)
    }

    /// The DCT scale (numerator over 8) to decode a JPEG at: the smallest that keeps the
    /// decoded image at least twice the size it is resized to, so the resizer still
    /// does the filtering; `None` when a full decode is needed.
    fn jpeg_scale(&self, upright: (u32, u32)) -> Option<u8> {
        let (rw, rh) = self.fit(upright.0, upright.1).resized;
        let (uw, uh) = (u64::from(upright.0), u64::from(upright.1));
        [1u8, 2, 4].into_iter().find(|&n| {
            let scaled = |side: u64| (side * u64::from(n)).div_ceil(8);
            scaled(uw) >= 2 * u64::from(rw) && scaled(uh) >= 2 * u64::from(rh)
        })
    }

    /// Where an image of `width` × `height` goes in the output.
    fn fit(&self, width: u32, height: u32) -> Fit {
        let (tw, th) = (self.config.width, self.config.height);
        let (w, h) = (u64::from(width), u64::from(height));
        match self.config.mode {
            ResizeMode::Resize => {
                Fit { resized: (tw, th), width: tw, height: th, left: 0, top: 0, crop: None }
            }
            ResizeMode::Letterbox => {
                // The limiting side fills the output; the other is floored, as PIL code
                // computing int(side * target / long) does.
                let (nw, nh) = if w * u64::from(th) >= h * u64::from(tw) {
                    (tw, ((u64::from(tw) * h) / w).max(1) as u32)
                } else {
                    (((u64::from(th) * w) / h).max(1) as u32, th)
                };
                Fit {
                    resized: (nw, nh),
                    width: nw,
                    height: nh,
                    left: (tw - nw) / 2,
                    top: (th - nh) / 2,
                    crop: None,
                }
            }
            ResizeMode::ShortestEdge => {
                let edge = u64::from(self.config.shortest_edge.unwrap_or(tw.max(th)));
                let (rw, rh) =
                    if w <= h { (edge, (edge * h / w).max(1)) } else { ((edge * w / h).max(1), edge) };
                // Crop the centre of the resized image; where it is smaller than the
                // output on a side, that side is padded instead.
                let (cw, ch) = (rw.min(u64::from(tw)), rh.min(u64::from(th)));
                let (cl, ct) = ((rw - cw) / 2, (rh - ch) / 2);
                let (sx, sy) = (w as f64 / rw as f64, h as f64 / rh as f64);
                Fit {
                    resized: (rw as u32, rh as u32),
                    width: cw as u32,
                    height: ch as u32,
                    left: (tw - cw as u32) / 2,
                    top: (th - ch as u32) / 2,
                    crop: Some((cl as f64 * sx, ct as f64 * sy, cw as f64 * sx, ch as f64 * sy)),
                }
            }
        }
    }

    /// Resizes `decoded` per the mode and writes it, normalised, into `row`.
    fn fit_into(&self, decoded: &Decoded, row: &mut [u8]) -> Result<()> {
        let image = &decoded.rgb;
        let fit = self.fit(decoded.source.0, decoded.source.1);
        let src = ImageRef::new(image.width(), image.height(), image.as_raw(), PixelType::U8x3)
            .map_err(|e| Error::InvalidInput(format!("image buffer: {e}")))?;
        let mut dst = FirImage::new(fit.width, fit.height, PixelType::U8x3);
        let algorithm = match self.config.filter {
            ResizeFilter::Lanczos3 => ResizeAlg::Convolution(FilterType::Lanczos3),
            ResizeFilter::Bilinear => ResizeAlg::Convolution(FilterType::Bilinear),
            ResizeFilter::Bicubic => ResizeAlg::Convolution(FilterType::CatmullRom),
            ResizeFilter::Nearest => ResizeAlg::Nearest,
        };
        let mut options = ResizeOptions::new().resize_alg(algorithm);
        if let Some((l, t, w, h)) = fit.crop {
            // The crop is in source pixels; the decoded image may be smaller.
            let sx = f64::from(image.width()) / f64::from(decoded.source.0);
            let sy = f64::from(image.height()) / f64::from(decoded.source.1);
            options = options.crop(l * sx, t * sy, w * sx, h * sy);
        }
        thread_local!(static RESIZER: RefCell<Resizer> = RefCell::new(Resizer::new()));
        RESIZER
            .with(|r| r.borrow_mut().resize(&src, &mut dst, &options))
            .map_err(|e| Error::InvalidInput(format!("cannot be resized: {e}")))?;
        let placed = Placed {
            pixels: dst.buffer(),
            width: fit.width as usize,
            height: fit.height as usize,
            left: fit.left as usize,
            top: fit.top as usize,
        };
        let (w, h, pad) = (self.config.width as usize, self.config.height as usize, self.config.pad_color);
        match &self.lut {
            Lut::F32(lut) => write_image(row, lut, pad, &placed, w, h, self.config.layout),
            Lut::F16(lut) => write_image(row, lut, pad, &placed, w, h, self.config.layout),
            Lut::U8(lut) => write_image(row, lut, pad, &placed, w, h, self.config.layout),
        }
        Ok(())
    }
}

/// A resized image and where it goes.
struct Placed<'a> {
    pixels: &'a [u8],
    width: usize,
    height: usize,
    left: usize,
    top: usize,
}

/// Writes the output image: `lut[c][v]` is the element bytes of value `v` in channel
/// `c`; outside the placed image, the pad colour's.
fn write_image<const E: usize>(
    row: &mut [u8],
    lut: &[[[u8; E]; 256]; 3],
    pad: [u8; 3],
    img: &Placed<'_>,
    width: usize,
    height: usize,
    layout: Layout,
) {
    let inside = |y: usize| y >= img.top && y < img.top + img.height;
    match layout {
        Layout::Chw => {
            for (c, plane) in row.chunks_exact_mut(width * height * E).enumerate() {
                let (table, pad_value) = (&lut[c], lut[c][pad[c] as usize]);
                for (y, out) in plane.chunks_exact_mut(width * E).enumerate() {
                    if !inside(y) {
                        out.chunks_exact_mut(E).for_each(|px| px.copy_from_slice(&pad_value));
                        continue;
                    }
                    let src = &img.pixels[(y - img.top) * img.width * 3..][..img.width * 3];
                    let (before, rest) = out.split_at_mut(img.left * E);
                    let (middle, after) = rest.split_at_mut(img.width * E);
                    before.chunks_exact_mut(E).for_each(|px| px.copy_from_slice(&pad_value));
                    after.chunks_exact_mut(E).for_each(|px| px.copy_from_slice(&pad_value));
                    for (px, rgb) in middle.chunks_exact_mut(E).zip(src.chunks_exact(3)) {
                        px.copy_from_slice(&table[rgb[c] as usize]);
                    }
                }
            }
        }
        Layout::Hwc => {
            let pad_px: [[u8; E]; 3] = std::array::from_fn(|c| lut[c][pad[c] as usize]);
            for (y, out) in row.chunks_exact_mut(width * 3 * E).enumerate() {
                for (x, px) in out.chunks_exact_mut(3 * E).enumerate() {
                    let value = |c: usize| {
                        if inside(y) && x >= img.left && x < img.left + img.width {
                            lut[c][img.pixels[((y - img.top) * img.width + x - img.left) * 3 + c] as usize]
                        } else {
                            pad_px[c]
                        }
                    };
                    for (c, slot) in px.chunks_exact_mut(E).enumerate() {
                        slot.copy_from_slice(&value(c));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
