//! Reading and decoding one image, for every processor: the input (a file or bytes),
//! size limits checked before any pixel is decoded, format recognised from the content,
//! EXIF orientation, 8-bit RGB out.

use std::io::Cursor;
use std::path::PathBuf;
use std::sync::Arc;

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits};
use kiln_core::{Error, Result};

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

    pub(crate) fn read(&self, max_bytes: u64) -> Result<std::borrow::Cow<'_, [u8]>> {
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

/// Decodes `bytes` to upright 8-bit RGB, refusing more than `max_pixels` from the
/// header, before any pixel is decoded. `alpha` says what becomes of transparency;
/// `jpeg_scale` may ask for a large JPEG at a reduced DCT scale (numerator over 8) given
/// its upright size; the result's `source` is always the full upright size.
pub fn decode(
    bytes: &[u8],
    name: &str,
    max_pixels: u64,
    alpha: Alpha,
    jpeg_scale: &dyn Fn((u32, u32)) -> Option<u8>,
) -> Result<Decoded> {
    // A decoder that panics on corrupt data (fuzzing found zune-jpeg 0.5.15 indexing
    // out of bounds in its IDCT) fails this image, not the caller's thread.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        decode_unguarded(bytes, name, max_pixels, alpha, jpeg_scale)
    }))
    .unwrap_or_else(|panic| {
        Err(Error::InvalidInput(format!(
            "image {name}: the decoder failed on corrupt data ({}); the image is skipped",
            kiln_core::panic_message(&*panic)
        )))
    })
}

fn decode_unguarded(
    bytes: &[u8],
    name: &str,
    max_pixels: u64,
    alpha: Alpha,
    jpeg_scale: &dyn Fn((u32, u32)) -> Option<u8>,
) -> Result<Decoded> {
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
    limits.max_alloc = Some(max_pixels.saturating_mul(8).saturating_add(64 << 20));
    reader.limits(limits);
    let mut decoder =
        reader.into_decoder().map_err(|e| bad(format!("cannot read the {format:?} header: {e}")))?;
    let (width, height) = decoder.dimensions();
    let pixels = u64::from(width) * u64::from(height);
    if pixels == 0 {
        return Err(bad(format!("the header says {width}×{height}: no pixels")));
    }
    if pixels > max_pixels {
        return Err(bad(format!(
            "{width}×{height} = {:.1} megapixels, over preprocess.max_pixels = {:.1} megapixels (refused \
             before decoding); raise it to accept larger images",
            pixels as f64 / 1e6,
            max_pixels as f64 / 1e6
        )));
    }
    let orientation = decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms);
    use image::metadata::Orientation as O;
    let turned = matches!(orientation, O::Rotate90 | O::Rotate270 | O::Rotate90FlipH | O::Rotate270FlipH);
    let source = if turned { (height, width) } else { (width, height) };
    if format == ImageFormat::Jpeg
        && let Some(numerator) = jpeg_scale(source)
        && let Some(rgb) = decode_jpeg_scaled(bytes, numerator)
    {
        let mut image = DynamicImage::ImageRgb8(rgb);
        image.apply_orientation(orientation);
        return Ok(Decoded { rgb: image.into_rgb8(), source });
    }
    let mut image = DynamicImage::from_decoder(decoder)
        .map_err(|e| bad(format!("cannot decode the {format:?} data (truncated or corrupt?): {e}")))?;
    image.apply_orientation(orientation);
    Ok(Decoded { rgb: to_rgb(image, alpha), source })
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

/// What becomes of an image's transparency.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpha {
    /// Composited on this colour (straight alpha, rounded as PIL does).
    Composite([u8; 3]),
    /// Dropped, as PIL's `convert("RGB")` does (what Hugging Face processors do).
    Drop,
}

/// 8-bit RGB; alpha composited or dropped as `alpha` says.
pub(crate) fn to_rgb(image: DynamicImage, alpha: Alpha) -> image::RgbImage {
    let pad = match alpha {
        _ if !image.color().has_alpha() => return image.into_rgb8(),
        Alpha::Drop => return image.into_rgb8(),
        Alpha::Composite(pad) => pad,
    };
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
