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
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fast_image_resize::images::{Image as FirImage, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits};
use kiln_core::{DType, Error, Layout, PreprocessConfig, ResizeFilter, ResizeMode, Result, Tensor};
use rayon::prelude::*;

/// The formats kiln decodes, for messages.
pub const ACCEPTED_FORMATS: &str = "JPEG, PNG, WebP, BMP, GIF (first frame), TIFF";

/// File name extensions of [`ACCEPTED_FORMATS`], for listing folders.
pub const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"];

/// One image to process: a file, or bytes with a name for messages.
#[derive(Debug, Clone)]
pub enum ImageInput {
    /// A file, read when processed.
    Path(PathBuf),
    /// Encoded bytes already in memory.
    Bytes {
        /// Used in error messages.
        name: String,
        /// The encoded image.
        bytes: Arc<[u8]>,
    },
}

impl ImageInput {
    /// A file.
    pub fn path(path: impl Into<PathBuf>) -> Self {
        ImageInput::Path(path.into())
    }

    /// Bytes, named `name` in messages.
    pub fn bytes(name: impl Into<String>, bytes: impl Into<Arc<[u8]>>) -> Self {
        ImageInput::Bytes { name: name.into(), bytes: bytes.into() }
    }

    /// How messages name this image.
    pub fn name(&self) -> String {
        match self {
            ImageInput::Path(p) => p.display().to_string(),
            ImageInput::Bytes { name, .. } => name.clone(),
        }
    }

    fn read(&self, max_bytes: u64) -> Result<std::borrow::Cow<'_, [u8]>> {
        let too_big = |n: u64| {
            Error::InvalidInput(format!(
                "image {}: {n} bytes, over preprocess.max_bytes = {max_bytes}; raise it to accept larger files",
                self.name()
            ))
        };
        match self {
            ImageInput::Bytes { bytes, .. } => {
                if bytes.len() as u64 > max_bytes {
                    return Err(too_big(bytes.len() as u64));
                }
                Ok(std::borrow::Cow::Borrowed(bytes))
            }
            ImageInput::Path(path) => {
                let meta = std::fs::metadata(path).map_err(|e| Error::io("reading image", path, e))?;
                if meta.is_dir() {
                    return Err(Error::InvalidInput(format!(
                        "image {}: is a directory, not an image",
                        path.display()
                    )));
                }
                if meta.len() > max_bytes {
                    return Err(too_big(meta.len()));
                }
                Ok(std::borrow::Cow::Owned(
                    std::fs::read(path).map_err(|e| Error::io("reading image", path, e))?,
                ))
            }
        }
    }
}

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

    /// Decodes `bytes` to upright 8-bit RGB, checking size limits from the header first.
    /// A large JPEG may come back decoded at a reduced scale (`fast_jpeg`); the
    /// result's `source` is always the full upright size.
    pub fn decode(&self, bytes: &[u8], name: &str) -> Result<Decoded> {
        let bad = |what: String| Error::InvalidInput(format!("image {name}: {what}"));
        if bytes.is_empty() {
            return Err(bad("the file is empty (0 bytes)".into()));
        }
        let format = image::guess_format(bytes)
            .map_err(|_| bad(format!("not an image kiln recognises; accepted: {ACCEPTED_FORMATS}")))?;
        if !matches!(
            format,
            ImageFormat::Jpeg
                | ImageFormat::Png
                | ImageFormat::WebP
                | ImageFormat::Bmp
                | ImageFormat::Gif
                | ImageFormat::Tiff
        ) {
            return Err(Error::Unsupported(format!(
                "image {name}: {format:?} images are not supported; accepted: {ACCEPTED_FORMATS}"
            )));
        }
        // A JPEG cut short decodes "successfully" with the missing part filled in (libjpeg
        // and zune both do); like PIL, refuse it.
        if format == ImageFormat::Jpeg && !ends_with_eoi(bytes) {
            return Err(bad("the JPEG is truncated or corrupt: it has no end-of-image marker".into()));
        }
        let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
        let mut limits = Limits::default();
        // 16-bit RGBA is the widest decoded pixel; leave room for decoder buffers.
        limits.max_alloc = Some(self.config.max_pixels.saturating_mul(8).saturating_add(64 << 20));
        reader.limits(limits);
        let mut decoder =
            reader.into_decoder().map_err(|e| bad(format!("cannot read the {format:?} header: {e}")))?;
        let (width, height) = decoder.dimensions();
        let pixels = u64::from(width) * u64::from(height);
        if pixels == 0 {
            return Err(bad(format!("the header says {width}×{height}: no pixels")));
        }
        if pixels > self.config.max_pixels {
            return Err(bad(format!(
                "{width}×{height} = {:.1} megapixels, over preprocess.max_pixels = {:.1} megapixels (refused \
                 before decoding); raise it to accept larger images",
                pixels as f64 / 1e6,
                self.config.max_pixels as f64 / 1e6
            )));
        }
        let orientation = decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms);
        use image::metadata::Orientation as O;
        let turned = matches!(orientation, O::Rotate90 | O::Rotate270 | O::Rotate90FlipH | O::Rotate270FlipH);
        let source = if turned { (height, width) } else { (width, height) };
        if format == ImageFormat::Jpeg
            && self.config.fast_jpeg
            && let Some(numerator) = self.jpeg_scale(source)
            && let Some(rgb) = decode_jpeg_scaled(bytes, numerator)
        {
            let mut image = DynamicImage::ImageRgb8(rgb);
            image.apply_orientation(orientation);
            return Ok(Decoded { rgb: image.into_rgb8(), source });
        }
        let mut image = DynamicImage::from_decoder(decoder)
            .map_err(|e| bad(format!("cannot decode the {format:?} data (truncated or corrupt?): {e}")))?;
        image.apply_orientation(orientation);
        Ok(Decoded { rgb: to_rgb(image, self.config.pad_color), source })
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

/// A decoded, upright RGB image and the full size of its source.
#[derive(Debug, Clone)]
pub struct Decoded {
    /// The pixels; smaller than `source` when decoded at a reduced scale.
    pub rgb: image::RgbImage,
    /// Width and height of the upright source image.
    pub source: (u32, u32),
}

/// Whether a JPEG ends with its end-of-image marker (trailing zero padding allowed).
fn ends_with_eoi(bytes: &[u8]) -> bool {
    let trimmed = bytes.iter().rposition(|&b| b != 0).map_or(bytes, |end| &bytes[..=end]);
    trimmed.ends_with(&[0xFF, 0xD9])
}

/// Decodes a baseline or progressive YCbCr/gray JPEG at `numerator`/8 scale with
/// libjpeg-turbo (mozjpeg). `None` when it cannot — CMYK, or any libjpeg error — and
/// the caller decodes in full.
fn decode_jpeg_scaled(bytes: &[u8], numerator: u8) -> Option<image::RgbImage> {
    std::panic::catch_unwind(|| {
        let mut d = mozjpeg::Decompress::new_mem(bytes).ok()?;
        if !matches!(d.color_space(), mozjpeg::ColorSpace::JCS_YCbCr | mozjpeg::ColorSpace::JCS_GRAYSCALE) {
            return None;
        }
        d.scale(numerator);
        let mut started = d.rgb().ok()?;
        let (w, h) = (started.width() as u32, started.height() as u32);
        let pixels = started.read_scanlines::<u8>().ok()?;
        started.finish().ok()?;
        image::RgbImage::from_raw(w, h, pixels)
    })
    .ok()
    .flatten()
}

/// 8-bit RGB; alpha is composited on `pad` (straight alpha, rounded as PIL does).
fn to_rgb(image: DynamicImage, pad: [u8; 3]) -> image::RgbImage {
    if !image.color().has_alpha() {
        return image.into_rgb8();
    }
    let rgba = image.into_rgba8();
    let (w, h) = rgba.dimensions();
    let mut out = Vec::with_capacity(w as usize * h as usize * 3);
    for px in rgba.pixels() {
        let a = u32::from(px[3]);
        for c in 0..3 {
            let v = u32::from(px[c]) * a + u32::from(pad[c]) * (255 - a);
            out.push(((v + 127) / 255) as u8);
        }
    }
    image::RgbImage::from_raw(w, h, out).expect("3 bytes per pixel")
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

/// The image files of `paths`: files as given, folders expanded to the files in them
/// with an image extension (sorted, not recursive). A folder with none is an error.
pub fn expand_paths(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for path in paths {
        if !path.is_dir() {
            out.push(path.clone());
            continue;
        }
        let mut found: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| Error::io("listing", path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && has_image_extension(p))
            .collect();
        if found.is_empty() {
            return Err(Error::InvalidInput(format!(
                "folder {} holds no images (looked for files ending in .{})",
                path.display(),
                IMAGE_EXTENSIONS.join(", .")
            )));
        }
        found.sort();
        out.extend(found);
    }
    Ok(out)
}

/// Whether `path` ends in one of [`IMAGE_EXTENSIONS`] (any case).
pub fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

/// Writes `tensor` as a NumPy `.npy` file (format 1.0, C order).
pub fn write_npy(path: &Path, tensor: &Tensor) -> Result<()> {
    let descr = match tensor.dtype() {
        DType::F32 => "<f4",
        DType::F16 => "<f2",
        DType::U8 => "|u1",
        DType::I64 => "<i8",
        DType::I32 => "<i4",
        other => return Err(Error::Unsupported(format!("no .npy type for {other}"))),
    };
    let shape: Vec<String> = tensor.shape().iter().map(|d| d.to_string()).collect();
    let shape = if shape.len() == 1 { format!("({},)", shape[0]) } else { format!("({})", shape.join(", ")) };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    // Magic (6) + version (2) + length (2) + header, padded with spaces to a multiple
    // of 64 and ended by a newline.
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + tensor.bytes().len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(tensor.bytes());
    std::fs::write(path, out).map_err(|e| Error::io("writing", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipeline(f: impl FnOnce(&mut PreprocessConfig)) -> ImagePipeline {
        let mut c = PreprocessConfig { cache_bytes: 0, threads: 1, ..Default::default() };
        f(&mut c);
        ImagePipeline::new(&c).unwrap()
    }

    fn png(img: DynamicImage) -> Vec<u8> {
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), ImageFormat::Png).unwrap();
        out
    }

    #[test]
    fn letterbox_geometry_matches_the_seed() {
        let p = pipeline(|_| {});
        // 1920×1080 into 224: long side 224, short floor(224·1080/1920) = 126, top 49.
        let f = p.fit(1920, 1080);
        assert_eq!((f.width, f.height, f.left, f.top, f.crop), (224, 126, 0, 49, None));
        let f = p.fit(100, 301);
        assert_eq!((f.width, f.height, f.left, f.top), (74, 224, 75, 0));
        let p = pipeline(|c| (c.width, c.height) = (192, 48));
        // PP-OCR's 3×48×192: a wide line fills the width, a squarer one the height.
        assert_eq!(p.fit(400, 50).width, 192);
        let f = p.fit(100, 100);
        assert_eq!((f.width, f.height, f.left, f.top), (48, 48, 72, 0));
    }

    #[test]
    fn shortest_edge_crops_the_centre() {
        let p = pipeline(|c| {
            c.mode = ResizeMode::ShortestEdge;
            c.shortest_edge = Some(256);
        });
        let f = p.fit(512, 1024); // resized to 256×512, crop 224×224 at (16, 144)
        assert_eq!((f.width, f.height, f.left, f.top), (224, 224, 0, 0));
        assert_eq!(f.crop, Some((32.0, 288.0, 448.0, 448.0)));
    }

    #[test]
    fn pixels_are_normalised_into_chw_and_padding_is_the_pad_colour() {
        let p = pipeline(|c| {
            (c.width, c.height) = (4, 4);
            c.mean = [0.5; 3];
            c.std = [0.5; 3];
            c.pad_color = [255, 0, 0];
            c.filter = ResizeFilter::Nearest;
        });
        // A 4×2 image of pure green: rows 1–2 of the output, padding red above and below.
        let green = DynamicImage::ImageRgb8(image::RgbImage::from_pixel(4, 2, image::Rgb([0, 255, 0])));
        let t = p.process_one(&ImageInput::bytes("green.png", png(green))).unwrap();
        assert_eq!(t.shape(), [1, 3, 4, 4]);
        let v = t.to_vec::<f32>().unwrap();
        let at = |c: usize, y: usize, x: usize| v[c * 16 + y * 4 + x];
        assert_eq!((at(0, 0, 0), at(1, 0, 0)), (1.0, -1.0), "pad: red");
        assert_eq!((at(0, 1, 2), at(1, 1, 2), at(2, 2, 3)), (-1.0, 1.0, -1.0), "image: green");
        assert_eq!(at(1, 3, 0), -1.0);
    }

    #[test]
    fn alpha_is_composited_on_the_pad_colour_and_16_bit_is_scaled() {
        let p = pipeline(|c| {
            (c.width, c.height, c.dtype, c.pad_color) = (2, 2, DType::U8, [0, 0, 200]);
        });
        let half_white = image::RgbaImage::from_pixel(2, 2, image::Rgba([255, 255, 255, 128]));
        let t =
            p.process_one(&ImageInput::bytes("a.png", png(DynamicImage::ImageRgba8(half_white)))).unwrap();
        // 255·128/255 + 200·127/255 ≈ 228 in blue; 128 in red and green.
        assert_eq!(t.bytes()[0], 128);
        assert_eq!(t.bytes()[8], 228);
        let white16 = image::ImageBuffer::<image::Luma<u16>, _>::from_pixel(2, 2, image::Luma([65535u16]));
        let t = p.process_one(&ImageInput::bytes("w.png", png(DynamicImage::ImageLuma16(white16)))).unwrap();
        assert!(t.bytes().iter().all(|&b| b == 255));
    }

    /// PNG's chunk checksum (CRC-32, IEEE), bit by bit.
    fn crc32(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }

    #[test]
    fn bad_inputs_fail_alone_with_the_file_named() {
        let p = pipeline(|c| c.max_pixels = 1_000_000);
        let good = png(DynamicImage::new_rgb8(8, 8));
        let mut truncated = png(DynamicImage::ImageRgb8(image::RgbImage::from_fn(64, 64, |x, y| {
            image::Rgb([x as u8, y as u8, (x * y) as u8])
        })));
        truncated.truncate(truncated.len() / 2);
        // A PNG header claiming 50 000 × 50 000: refused from the header.
        let mut bomb = png(DynamicImage::new_rgb8(1, 1));
        bomb[16..20].copy_from_slice(&50_000u32.to_be_bytes());
        bomb[20..24].copy_from_slice(&50_000u32.to_be_bytes());
        let crc = crc32(&bomb[12..29]);
        bomb[29..33].copy_from_slice(&crc.to_be_bytes());
        let inputs = [
            ImageInput::bytes("good.png", good.clone()),
            ImageInput::bytes("empty.png", Vec::new()),
            ImageInput::bytes("notes.txt", b"just some text, not an image".to_vec()),
            ImageInput::bytes("half.png", truncated),
            ImageInput::bytes("bomb.png", bomb),
            ImageInput::bytes(
                "icon.ico",
                b"\x00\x00\x01\x00\x01\x00\x10\x10\x00\x00\x01\x00\x20\x00".to_vec(),
            ),
            ImageInput::bytes("good2.png", good),
        ];
        let batch = p.process(&inputs).unwrap();
        assert_eq!(batch.tensor.shape()[0], 2);
        assert_eq!(batch.rows[0].as_ref().unwrap(), &0);
        assert_eq!(batch.rows[6].as_ref().unwrap(), &1);
        let msg = |i: usize| batch.rows[i].as_ref().unwrap_err().to_string();
        assert!(msg(1).contains("empty.png") && msg(1).contains("empty"), "{}", msg(1));
        assert!(msg(2).contains("notes.txt") && msg(2).contains("JPEG, PNG"), "{}", msg(2));
        assert!(msg(3).contains("half.png") && msg(3).contains("truncated or corrupt"), "{}", msg(3));
        assert!(
            msg(4).contains("bomb.png") && msg(4).contains("50000×50000") && msg(4).contains("max_pixels"),
            "{}",
            msg(4)
        );
        assert!(msg(5).contains("icon.ico") && msg(5).contains("not supported"), "{}", msg(5));
    }

    #[test]
    fn every_accepted_format_decodes_to_the_same_pixels() {
        let p =
            pipeline(|c| (c.width, c.height, c.dtype, c.filter) = (6, 4, DType::U8, ResizeFilter::Nearest));
        let source = image::RgbImage::from_fn(6, 4, |x, y| image::Rgb([x as u8 * 40, y as u8 * 60, 200]));
        let expected =
            p.process_one(&ImageInput::bytes("png", png(DynamicImage::ImageRgb8(source.clone())))).unwrap();
        for format in [ImageFormat::Bmp, ImageFormat::Gif, ImageFormat::Tiff, ImageFormat::WebP] {
            let mut bytes = Vec::new();
            let image = if format == ImageFormat::Gif {
                DynamicImage::ImageRgba8(DynamicImage::ImageRgb8(source.clone()).into_rgba8())
            } else {
                DynamicImage::ImageRgb8(source.clone())
            };
            image.write_to(&mut Cursor::new(&mut bytes), format).unwrap();
            let t = p.process_one(&ImageInput::bytes(format!("{format:?}"), bytes)).unwrap();
            // GIF quantises to a palette; the others are lossless here.
            let tolerance = if format == ImageFormat::Gif { 16 } else { 0 };
            let worst = t.bytes().iter().zip(expected.bytes()).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
            assert!(worst <= tolerance, "{format:?}: off by {worst}");
        }
    }

    #[test]
    fn the_cache_answers_a_repeated_image() {
        let p = ImagePipeline::new(&PreprocessConfig { threads: 1, ..Default::default() }).unwrap();
        let img = png(DynamicImage::ImageRgb8(image::RgbImage::from_fn(30, 20, |x, y| {
            image::Rgb([x as u8, y as u8, 7])
        })));
        let a = p.process_one(&ImageInput::bytes("a", img.clone())).unwrap();
        let b = p.process_one(&ImageInput::bytes("b", img)).unwrap();
        assert_eq!(a, b);
        p.cache.as_ref().unwrap().run_pending_tasks();
        assert_eq!(p.cache.as_ref().unwrap().entry_count(), 1);
    }

    #[test]
    fn npy_header_is_aligned_and_describes_the_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let t = Tensor::from_vec(vec![2, 3], vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        write_npy(&dir.path().join("x.npy"), &t).unwrap();
        let bytes = std::fs::read(dir.path().join("x.npy")).unwrap();
        let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + header_len) % 64, 0);
        let header = std::str::from_utf8(&bytes[10..10 + header_len]).unwrap();
        assert!(header.contains("'descr': '<f4'") && header.contains("'shape': (2, 3)"), "{header}");
        assert_eq!(bytes.len(), 10 + header_len + 24);
    }
}
