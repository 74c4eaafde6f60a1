//! Qwen2.5-VL on candle: a vision tower that turns images into tokens of the language
//! model's width, and a Qwen2 decoder with multimodal rotary positions that reads them
//! in place of the prompt's `<|image_pad|>` tokens.
//!
//! # Design
//!
//! kiln's own implementation, written from the architecture (transformers'
//! `modeling_qwen2_5_vl.py` and mlx-vlm's `qwen2_5_vl` read for reference; nothing
//! copied): [`config`] reads both `config.json` layouts (shared with the MLX provider, in `kiln_core::qwen2vl`),
//! [`weights`] the tensor naming layouts, [`vision`] is the tower, [`text`] the decoder and its KV cache, [`rope`] the
//! positions. A prompt runs in two parts: its images through the tower
//! ([`QwenVl::encode_images`], cacheable per image), then the prefill of its tokens with
//! the images' rows in place ([`QwenVl::prefill`], which computes each token's time,
//! height and width position and remembers the sequence's rope delta); each further
//! token is one [`QwenVl::decode`] step at `index + delta` on all three streams.
//! Everything computes in f32 (weights widened from their stored precision); it is checked against transformers on the
//! same weights (`tests/` of this crate).

pub mod generator;
mod host;
pub mod text;
pub mod vision;
pub mod weights;

use std::path::Path;

use candle_core::{Device, Tensor};
pub use kiln_core::qwen2vl::{config, rope};
use kiln_core::{Error, Result};

pub use config::QwenVlConfig;
pub use generator::QwenVlGenerator;
pub use text::KvCache;
pub use weights::Arithmetic;

use crate::backend;
use rope::rope_index;
use text::TextModel;
use vision::VisionTower;
use weights::Weights;

/// A loaded Qwen2.5-VL checkpoint.
pub struct QwenVl {
    config: QwenVlConfig,
    vision: VisionTower,
    text: TextModel,
    device: Device,
}

impl QwenVl {
    /// Loads the checkpoint folder `dir` (config.json and its safetensors) onto `device`.
    /// On the CPU, quantized and 16-bit linear layers stay as stored and are widened as
    /// they compute ([`weights`]).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        Self::load_as(dir, device, device.is_cpu())
    }

    /// As [`QwenVl::load`]; `compact` false widens every layer to f32 at load (more
    /// memory; the reference the compact layers are tested against).
    pub fn load_as(dir: &Path, device: &Device, compact: bool) -> Result<Self> {
        Self::load_with(dir, device, compact, Arithmetic::AsStored)
    }

    /// As [`QwenVl::load_as`], the compact layers computing in `arithmetic` (int8
    /// activations on 4-bit layers, or bf16 on AMX tiles).
    pub fn load_with(dir: &Path, device: &Device, compact: bool, arithmetic: Arithmetic) -> Result<Self> {
        let config = QwenVlConfig::from_model_dir(dir)?;
        let weights = Weights::load_with(dir, device, compact, arithmetic)?;
        Ok(QwenVl {
            vision: VisionTower::load(&weights, &config.vision)?,
            text: TextModel::load(&weights, &config)?,
            config,
            device: device.clone(),
        })
    }

    /// The checkpoint's config.
    pub fn config(&self) -> &QwenVlConfig {
        &self.config
    }

    /// An empty cache for a new sequence.
    pub fn new_cache(&self) -> KvCache {
        self.text.new_cache()
    }

    /// The images' patch rows (`[Σ patches, values]`, as the processor gives them, images
    /// one after another) → one row per image token, `[Σ patches / merge², hidden]`.
    pub fn encode_images(&self, pixels: &[f32], grids: &[[usize; 3]]) -> Result<Tensor> {
        let v = &self.config.vision;
        let patches = kiln_core::qwen2vl::check_patches(pixels.len(), grids, v)?;
        let unit = v.spatial_merge_size * v.spatial_merge_size;
        let width = pixels.len() / patches;
        let pixels = Tensor::from_slice(pixels, (patches, width), &self.device).map_err(backend)?;
        let out = self.vision.forward(&pixels, grids)?;
        debug_assert_eq!(out.dims()[0], patches / unit);
        Ok(out)
    }

    /// Runs a new sequence's prompt `ids` (with `images`' rows — from
    /// [`encode_images`](Self::encode_images) on `grids` — in place of its image pad
    /// tokens) into `cache`, and returns the logits of its last `keep` tokens.
    pub fn prefill(
        &self,
        ids: &[u32],
        images: Option<&Tensor>,
        grids: &[[usize; 3]],
        cache: &mut KvCache,
        keep: usize,
    ) -> Result<Tensor> {
        if !cache.is_empty() {
            return Err(Error::InvalidInput(
                "prefill needs an empty cache: a sequence's prompt runs once".into(),
            ));
        }
        if ids.is_empty() {
            return Err(Error::InvalidInput("an empty prompt".into()));
        }
        let merge = self.config.vision.spatial_merge_size;
        let index = rope_index(ids, grids, merge, self.config.image_token_id)?;
        let x = self.text.embed(ids, images)?;
        let logits = self.text.forward(&x, &index.positions, cache, keep)?;
        cache.set_rope_delta(index.delta);
        Ok(logits)
    }

    /// More text tokens after what `cache` holds (at the positions that follow): the
    /// logits after the last, `[vocab]`.
    pub fn extend(&self, ids: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        let at = cache.next_position();
        let x = self.text.embed(ids, None)?;
        let stream: Vec<i64> = (0..ids.len() as i64).map(|k| at + k).collect();
        let positions = [stream.clone(), stream.clone(), stream];
        let logits = self.text.forward(&x, &positions, cache, 1)?;
        logits.squeeze(0).map_err(backend)
    }

    /// One more token for each of several sequences, in one batch: `[batch, vocab]`.
    pub fn decode_batch(&self, tokens: &[u32], caches: &mut [&mut KvCache]) -> Result<Tensor> {
        if tokens.len() != caches.len() || tokens.is_empty() {
            return Err(Error::InvalidInput(format!(
                "{} tokens for {} sequences",
                tokens.len(),
                caches.len()
            )));
        }
        let positions: Vec<i64> = caches.iter().map(|c| c.next_position()).collect();
        self.text.decode_batch(tokens, &positions, caches)
    }

    /// One more token of a sequence whose prompt is in `cache`: its logits, `[vocab]`.
    pub fn decode(&self, token: u32, cache: &mut KvCache) -> Result<Tensor> {
        let at = cache.next_position();
        let x = self.text.embed(&[token], None)?;
        let positions = [vec![at], vec![at], vec![at]];
        let logits = self.text.forward(&x, &positions, cache, 1)?;
        logits.squeeze(0).map_err(backend)
    }
}
