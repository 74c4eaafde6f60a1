//! Images in prompts, for vision-language generators: where each image comes from (a
//! file or a `data:` URL — kiln fetches nothing), the model's processor, the limit on
//! images per prompt, and the expansion of the chat template's one placeholder per
//! image into one per image token.

use base64::Engine as _;
use kiln_core::{Error, ImagePatches, KilnConfig, Result, VisionInfo};
use kiln_text::chat::Part;
use kiln_vision::{ImageInput, QwenVlProcessor, QwenVlSettings};

use super::engine::JobImage;

/// A vision-language model's image side.
pub(super) struct Vision {
    info: VisionInfo,
    processor: QwenVlProcessor,
    max_images: usize,
}

impl Vision {
    /// The processor `info` names, with the checkpoint's settings and the config's limits
    /// (`generate.max_image_pixels`, `preprocess.max_pixels` / `max_bytes` for decoding).
    pub(super) fn new(info: &VisionInfo, config: &KilnConfig) -> Result<Self> {
        if info.processor != "qwen2-vl" {
            return Err(Error::Unsupported(format!(
                "the generator's images need processor `{}`; kiln has `qwen2-vl`",
                info.processor
            )));
        }
        let mut settings = QwenVlSettings::from_model_dir(&info.dir)?;
        let limit = config.generate.max_image_pixels;
        if limit > 0 && limit < settings.max_pixels {
            settings.max_pixels = limit.max(settings.min_pixels);
        }
        let processor =
            QwenVlProcessor::new(settings, config.preprocess.max_pixels, config.preprocess.max_bytes)?;
        Ok(Vision { info: info.clone(), processor, max_images: config.generate.max_images })
    }

    /// Patches per image token: merge².
    pub(super) fn tokens_per_patch_divisor(&self) -> usize {
        self.info.merge_size.max(1).pow(2)
    }

    /// `text` (the rendered prompt, one placeholder per image) with each placeholder
    /// repeated once per token of its image, and the images processed.
    pub(super) fn expand(&self, text: &str, inputs: &[ImageInput]) -> Result<(String, Vec<JobImage>)> {
        if inputs.len() > self.max_images {
            return Err(Error::InvalidInput(format!(
                "a prompt of {} images; at most generate.max_images = {} are accepted",
                inputs.len(),
                self.max_images
            )));
        }
        let placeholder = self.info.image_token.as_str();
        let pieces: Vec<&str> = text.split(placeholder).collect();
        if pieces.len() - 1 != inputs.len() {
            return Err(Error::InvalidInput(format!(
                "the chat template placed {} image placeholders ({placeholder}) for {} images",
                pieces.len() - 1,
                inputs.len()
            )));
        }
        let merge = self.info.merge_size.max(1);
        let mut images = Vec::with_capacity(inputs.len());
        let mut out = String::with_capacity(text.len());
        for (i, input) in inputs.iter().enumerate() {
            let processed = self.processor.process(input)?;
            out.push_str(pieces[i]);
            out.push_str(&placeholder.repeat(processed.tokens(merge)));
            let mut hash = xxhash_rust::xxh3::Xxh3::new();
            for d in processed.grid_thw {
                hash.update(&(d as u64).to_le_bytes());
            }
            for v in &processed.pixel_values {
                hash.update(&v.to_le_bytes());
            }
            images.push(JobImage {
                key: hash.digest128(),
                patches: ImagePatches { values: processed.pixel_values, grid_thw: processed.grid_thw },
            });
        }
        out.push_str(pieces[inputs.len()]);
        Ok((out, images))
    }
}

/// Where an image part's image is: a file, or the bytes of a `data:` URL. Remote URLs
/// are refused: kiln reaches no network on a request's behalf.
pub(super) fn image_input(part: &Part) -> Result<ImageInput> {
    let url = match part {
        Part::Image { path: Some(path), .. } => return Ok(ImageInput::path(path)),
        Part::Image { url: Some(url), .. } => url,
        Part::ImageUrl { image_url } => &image_url.url,
        Part::Image { .. } => {
            return Err(Error::InvalidInput("an image part needs a `path` or a `url` (a data: URL)".into()));
        }
        Part::Text { .. } => return Err(Error::InvalidInput("a text part is not an image".into())),
    };
    let Some(rest) = url.strip_prefix("data:") else {
        let shown: String = url.chars().take(64).collect();
        return Err(Error::InvalidInput(format!(
            "image URL `{shown}`: kiln fetches no remote URLs; send the image as a data: URL (base64) or a file"
        )));
    };
    let (meta, data) = rest
        .split_once(',')
        .ok_or_else(|| Error::InvalidInput("a data: URL without a `,` before its data".into()))?;
    if !meta.ends_with(";base64") {
        return Err(Error::InvalidInput(format!(
            "a data: URL of `{meta}`; images are accepted base64-encoded (data:image/png;base64,...)"
        )));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| Error::InvalidInput(format!("a data: URL's base64 does not decode: {e}")))?;
    Ok(ImageInput::bytes(format!("data: URL ({meta})"), bytes))
}

#[cfg(test)]
mod tests {
    use kiln_text::chat::ImageUrl;

    use super::*;

    #[test]
    fn image_parts_become_files_or_data_and_remote_urls_are_refused() {
        let file = image_input(&Part::Image { path: Some("a.png".into()), url: None }).unwrap();
        assert_eq!(file.name(), "a.png");
        let data = Part::ImageUrl {
            image_url: ImageUrl { url: "data:image/png;base64,aGVsbG8=".into(), detail: None },
        };
        match image_input(&data).unwrap() {
            ImageInput::Bytes { bytes, .. } => assert_eq!(&bytes[..], b"hello"),
            other => panic!("{other:?}"),
        }
        let remote = Part::ImageUrl {
            image_url: ImageUrl { url: "https://example.com/cat.png".into(), detail: None },
        };
        let e = image_input(&remote).unwrap_err().to_string();
        assert!(e.contains("fetches no remote URLs") && e.contains("https://example.com/cat.png"), "{e}");
        let e = image_input(&Part::Image { path: None, url: Some("data:text/plain,hi".into()) }).unwrap_err();
        assert!(e.to_string().contains("base64"), "{e}");
        assert!(
            image_input(&Part::Image { path: None, url: Some("data:image/png;base64,!!".into()) }).is_err()
        );
    }
}
