//! Qwen2.5-VL on MLX, kiln's [`Generator`] for vision-language prompts: the checkpoint
//! folder as stored — Hugging Face safetensors (f32, bf16, f16) or mlx-community's
//! packed layers, which go to MLX's `quantized_matmul` (and, for a packed embedding, its
//! `dequantize` of the picked rows) exactly as mlx-vlm runs them. Non-packed tensors
//! compute at the model's dtype (`model.dtype`; f32 by default).
//!
//! # Design
//!
//! What the candle provider's Qwen2.5-VL shares with this one — config, M-RoPE
//! positions, the tower's window layout and rotary table, the folder's naming layouts
//! and chat template — lives in `kiln_core::qwen2vl`; this module writes the arrays: the
//! tower ([`vision`]), the decoder and its per-sequence KV buffers ([`text`]), the
//! tensors ([`weights`]). A prompt's images go through the tower in one lazy graph
//! evaluated once (the runtime caches its rows per image); a step builds one graph for
//! all its sequences — prompts each on their own, the sequences adding one token
//! together through the batched projections — and evaluates the logits with every KV
//! buffer written.

#[cfg(test)]
mod tests;
mod text;
mod vision;
mod weights;

use std::path::Path;

use kiln_core::qwen2vl::{self, QwenVlConfig};
use kiln_core::{
    DType, Device, Error, Generator, GeneratorInfo, ImagePatches, Next, Result, SequenceCache, StepItem,
    Tensor, TokenizerSource, VisionInfo,
};

use crate::array::{self, Array, Unary};
use text::KvCache;
use text::TextModel;
use vision::VisionTower;
use weights::Checkpoint;

/// Prompt lengths on a GPU are padded to a multiple of this (see `QwenVl::prefill_lazy`).
const PROMPT_BUCKET: usize = 64;

/// `x · cos + rotate_half(x) · sin` for `x` `[tokens, heads, d]` and cos/sin
/// `[tokens, 1, d]`.
fn rotate(x: &Array, cos: &Array, sin: &Array) -> Result<Array> {
    let shape: Vec<i32> = x.shape().iter().map(|&s| s as i32).collect();
    let [t, h, d] = shape[..] else {
        return Err(Error::InvalidInput(format!(
            "rotary input of shape {shape:?}; expected [tokens, heads, d]"
        )));
    };
    let half = d / 2;
    let first = x.slice(&[0, 0, 0], &[t, h, half])?;
    let second = x.slice(&[0, 0, half], &[t, h, d])?;
    let rotated = Array::concat(&[&second.unary(Unary::Negative)?, &first], 2)?;
    x.mul(cos)?.add(&rotated.mul(sin)?)
}

/// A loaded Qwen2.5-VL checkpoint on MLX.
pub struct QwenVl {
    config: QwenVlConfig,
    vision: VisionTower,
    text: TextModel,
    device: Option<usize>,
    dtype: DType,
    info: GeneratorInfo,
    /// Prompts are padded to a multiple of this many tokens: [`PROMPT_BUCKET`] on a GPU,
    /// 1 on the CPU.
    prompt_bucket: usize,
    /// Whether `step_next` picks greedy items' tokens on the device
    /// (`provider.options.greedy_on_device`; on after `load`).
    pub greedy_on_device: bool,
}

impl QwenVl {
    /// Loads the checkpoint folder `dir` onto MLX's `device` (`None`: the CPU) computing
    /// at `dtype`; `kiln_device` and `weight_bytes` describe it to the runtime.
    pub fn load(
        dir: &Path,
        device: Option<usize>,
        kiln_device: Device,
        dtype: DType,
        weight_bytes: u64,
    ) -> Result<QwenVl> {
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(Error::Unsupported(format!(
                "provider `mlx` computes Qwen2.5-VL in f32, f16 or bf16, not {dtype}"
            )));
        }
        array::set_device(device)?;
        let config = QwenVlConfig::from_model_dir(dir)?;
        let checkpoint = Checkpoint::open(dir, dtype)?;
        let vision = VisionTower::load(&checkpoint, &config.vision, dtype, device.is_some())?;
        let text = TextModel::load(&checkpoint, &config, dtype)?;
        let mut all = vision.arrays();
        all.extend(text.arrays());
        array::eval(&all)?;
        drop(checkpoint);

        let tokenizer = qwen2vl::tokenizer_file(dir)?;
        let name =
            dir.file_name().map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into_owned());
        let mut info = GeneratorInfo::new(
            name,
            crate::NAME,
            kiln_device,
            config.vocab_size,
            config.max_position_embeddings,
            TokenizerSource::File(tokenizer.clone()),
        );
        info.eos_token_ids = qwen2vl::eos_tokens(dir, &config);
        info.chat_template = qwen2vl::chat_template(dir);
        info.kv_bytes_per_token = text.kv_bytes_per_token();
        info.weight_bytes = Some(weight_bytes);
        info.quantization = match qwen2vl::quantization(dir)? {
            Some((group, bits)) => {
                format!(
                    "{bits}-bit mlx affine (group {group}) as stored: MLX quantized matmul, {dtype} activations"
                )
            }
            None => format!("none ({dtype})"),
        };
        info.vision = Some(VisionInfo {
            processor: "qwen2-vl".into(),
            dir: dir.to_path_buf(),
            image_token: qwen2vl::token_text(&tokenizer, config.image_token_id)
                .unwrap_or_else(|| "<|image_pad|>".into()),
            image_token_id: config.image_token_id,
            merge_size: config.vision.spatial_merge_size,
            weight_bytes: 0,
        });
        let prompt_bucket = if device.is_some() { PROMPT_BUCKET } else { 1 };
        Ok(QwenVl { config, vision, text, device, dtype, info, prompt_bucket, greedy_on_device: true })
    }

    /// The checkpoint's config.
    #[cfg(test)]
    pub fn config(&self) -> &QwenVlConfig {
        &self.config
    }

    /// Pads prompts to multiples of `tokens` (a GPU's bucketing, tested on the CPU).
    #[cfg(test)]
    pub fn set_prompt_bucket(&mut self, tokens: usize) {
        self.prompt_bucket = tokens.max(1);
    }

    /// The tower's attention per image with a window mask (a GPU's way) or per window.
    #[cfg(test)]
    pub fn set_masked_attention(&mut self, masked: bool) {
        self.vision.set_masked(masked);
    }

    /// An empty cache for a new sequence.
    pub fn new_cache(&self) -> KvCache {
        self.text.new_cache()
    }

    /// The images' patch rows (as the processor gives them, images one after another) →
    /// one row per image token, `[Σ patches / merge², hidden]`, evaluated.
    pub fn encode_images(&self, pixels: &[f32], grids: &[[usize; 3]]) -> Result<Array> {
        array::set_device(self.device)?;
        let patches = qwen2vl::check_patches(pixels.len(), grids, &self.config.vision)?;
        let rows = self.vision.forward(pixels, patches, grids)?;
        array::eval(&[&rows])?;
        Ok(rows)
    }

    /// Runs a new sequence's prompt `ids` (with `images`' rows in place of its image pad
    /// tokens) into `cache`: the logits of its last `keep` tokens, rows of `vocab`.
    #[cfg(test)]
    pub fn prefill(
        &self,
        ids: &[u32],
        images: Option<&Array>,
        grids: &[[usize; 3]],
        cache: &mut KvCache,
        keep: usize,
    ) -> Result<Vec<Vec<f32>>> {
        array::set_device(self.device)?;
        let logits = self.prefill_lazy(ids, images, grids, cache, keep)?;
        text::evaluate(&logits, &[cache])
    }

    fn prefill_lazy(
        &self,
        ids: &[u32],
        images: Option<&Array>,
        grids: &[[usize; 3]],
        cache: &mut KvCache,
        keep: usize,
    ) -> Result<Array> {
        if cache.len() != 0 {
            return Err(Error::InvalidInput(
                "prefill needs an empty cache: a sequence's prompt runs once".into(),
            ));
        }
        if ids.is_empty() {
            return Err(Error::InvalidInput("an empty prompt".into()));
        }
        let index = qwen2vl::rope_index(
            ids,
            grids,
            self.config.vision.spatial_merge_size,
            self.config.image_token_id,
        )?;
        let images = images.map(|rows| rows.astype(self.dtype)).transpose()?;
        // On a GPU the prompt is padded to a multiple of PROMPT_BUCKET tokens: MLX builds
        // (and keeps, per thread) a cuDNN attention graph for each query length, which cost
        // 40–90 ms whenever a prompt of a new length came (docs/benchmarks.md, issue 29 on
        // the GPU); with buckets a new length mostly finds its graph built. The padding is
        // a few dozen tokens of a GPU's idle capacity; on the CPU it would be real work.
        let real = ids.len();
        let padded = real.next_multiple_of(self.prompt_bucket);
        let mut positions = index.positions;
        let mut ids = std::borrow::Cow::Borrowed(ids);
        if padded > real {
            let pad = self.info.eos_token_ids.first().copied().unwrap_or(0);
            ids.to_mut().resize(padded, pad);
            for stream in positions.iter_mut() {
                let last = stream.last().copied().unwrap_or(0);
                stream.extend((1..=(padded - real) as i64).map(|k| last + k));
            }
        }
        let x = self.text.embed(&ids, images.as_ref())?;
        let logits = self.text.forward(x, &positions, cache, keep, real)?;
        TextModel::set_rope_delta(cache, index.delta);
        Ok(logits)
    }

    /// More text tokens after what `cache` holds (lazy logits of the last).
    fn extend_lazy(&self, ids: &[u32], cache: &mut KvCache) -> Result<Array> {
        let at = cache.next_position();
        let x = self.text.embed(ids, None)?;
        let stream: Vec<i64> = (0..ids.len() as i64).map(|k| at + k).collect();
        self.text.forward(x, &[stream.clone(), stream.clone(), stream], cache, 1, ids.len())
    }

    /// One more token of a sequence whose prompt is in `cache`: its logits.
    #[cfg(test)]
    pub fn decode(&self, token: u32, cache: &mut KvCache) -> Result<Vec<f32>> {
        array::set_device(self.device)?;
        let logits = self.text.decode_batch(&[token], &mut [&mut *cache])?;
        Ok(text::evaluate(&logits, &[cache])?.remove(0))
    }
}

/// The runtime's view of a sequence.
struct Sequence(KvCache);

impl SequenceCache for Sequence {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn bytes(&self) -> u64 {
        self.0.bytes()
    }
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

impl Generator for QwenVl {
    fn info(&self) -> &GeneratorInfo {
        &self.info
    }

    fn new_sequence(&self) -> Result<Box<dyn SequenceCache>> {
        Ok(Box::new(Sequence(self.new_cache())))
    }

    /// Prompts (and the rare several tokens after one) each on their own, the sequences
    /// adding one token together; one evaluation for the whole step.
    fn step(&self, batch: &mut [StepItem<'_>]) -> Result<Vec<Vec<f32>>> {
        self.stepped(batch, false)?.into_iter().map(Next::into_logits).collect()
    }

    /// The step, the greedy items' tokens picked on the device (151 936 logits a row
    /// stay there).
    fn step_next(&self, batch: &mut [StepItem<'_>]) -> Result<Vec<Next>> {
        self.stepped(batch, self.greedy_on_device)
    }

    /// Handles on the same buffers, cut at `tokens` (copied on the next write).
    fn fork(&self, cache: &mut dyn SequenceCache, tokens: usize) -> Result<Option<Box<dyn SequenceCache>>> {
        let cache = cache
            .as_any_mut()
            .downcast_mut::<Sequence>()
            .ok_or_else(|| Error::InvalidInput("a sequence cache from another generator".into()))?;
        Ok(Some(Box::new(Sequence(cache.0.prefix(tokens)?))))
    }

    fn encode_images(&self, images: &[ImagePatches]) -> Result<Vec<Tensor>> {
        let grids: Vec<[usize; 3]> = images.iter().map(|i| i.grid_thw).collect();
        let values: Vec<f32> = images.iter().flat_map(|i| i.values.iter().copied()).collect();
        let rows = self.encode_images(&values, &grids)?.astype(DType::F32)?;
        let merge = self.config.vision.spatial_merge_size;
        qwen2vl::split_image_rows(&rows.to_f32()?, self.config.hidden_size, &grids, merge)
    }
}

impl QwenVl {
    /// A step; where `pick` is set, the items marked greedy get their token alone (the
    /// argmax of their logits, evaluated with the rest of the step).
    fn stepped(&self, batch: &mut [StepItem<'_>], pick: bool) -> Result<Vec<Next>> {
        array::set_device(self.device)?;
        let greedy: Vec<bool> = batch.iter().map(|item| pick && item.greedy).collect();
        for item in batch.iter() {
            self.info.check_step(item.tokens, item.cache.len())?;
        }
        let mut lazy: Vec<Option<Array>> = (0..batch.len()).map(|_| None).collect();
        let mut decoding = Vec::new();
        for (n, item) in batch.iter_mut().enumerate() {
            let cache = &mut item
                .cache
                .as_any_mut()
                .downcast_mut::<Sequence>()
                .ok_or_else(|| Error::InvalidInput("a sequence cache from another generator".into()))?
                .0;
            if cache.len() == 0 {
                let grids: Vec<[usize; 3]> = item.images.iter().map(|i| i.grid_thw).collect();
                let rows = match item.images {
                    [] => None,
                    images => Some(image_rows(images.iter().map(|i| i.embedding))?),
                };
                lazy[n] = Some(self.prefill_lazy(item.tokens, rows.as_ref(), &grids, cache, 1)?);
            } else if item.tokens.len() == 1 {
                decoding.push(n);
            } else {
                lazy[n] = Some(self.extend_lazy(item.tokens, cache)?);
            }
            if greedy[n]
                && let Some(logits) = &lazy[n]
            {
                lazy[n] = Some(logits.argmax(-1)?);
            }
        }
        let mut decoded = None;
        if !decoding.is_empty() {
            let tokens: Vec<u32> = decoding.iter().map(|&n| batch[n].tokens[0]).collect();
            let mut caches: Vec<&mut KvCache> = batch
                .iter_mut()
                .enumerate()
                .filter(|(n, _)| decoding.contains(n))
                .map(|(_, item)| {
                    &mut item.cache.as_any_mut().downcast_mut::<Sequence>().expect("checked above").0
                })
                .collect();
            decoded = Some(self.text.decode_batch(&tokens, &mut caches)?);
        }
        // The decoding rows' tokens where any is greedy; their logits where any is not.
        let picked = match decoding.iter().any(|&n| greedy[n]) {
            true => decoded.as_ref().map(|d| d.argmax(-1)).transpose()?,
            false => None,
        };
        if decoding.iter().all(|&n| greedy[n]) {
            decoded = None;
        }
        // One evaluation: every logits row and every buffer written.
        let mut pending: Vec<&Array> = lazy.iter().flatten().collect();
        pending.extend(decoded.iter().chain(&picked));
        let caches: Vec<&KvCache> = batch
            .iter_mut()
            .map(|item| &item.cache.as_any_mut().downcast_mut::<Sequence>().expect("checked above").0)
            .collect();
        for cache in &caches {
            pending.extend(cache.arrays());
        }
        array::eval(&pending)?;
        let mut out: Vec<Option<Next>> = lazy
            .iter()
            .zip(&greedy)
            .map(|(l, &g)| match (l, g) {
                (None, _) => Ok(None),
                (Some(t), true) => Ok(Some(Next::Token(t.to_u32()?[0]))),
                (Some(l), false) => Ok(Some(Next::Logits(l.to_f32()?))),
            })
            .collect::<Result<_>>()?;
        if let Some(tokens) = picked {
            for (&n, t) in decoding.iter().zip(tokens.to_u32()?) {
                if greedy[n] {
                    out[n] = Some(Next::Token(t));
                }
            }
        }
        if let Some(decoded) = decoded {
            let values = decoded.to_f32()?;
            let vocab = values.len() / decoding.len();
            for (&n, row) in decoding.iter().zip(values.chunks(vocab)) {
                if !greedy[n] {
                    out[n] = Some(Next::Logits(row.to_vec()));
                }
            }
        }
        Ok(out.into_iter().map(|l| l.expect("every item stepped")).collect())
    }
}

/// The images' rows one after another, as one `[Σ tokens, hidden]` f32 array.
fn image_rows<'a>(images: impl Iterator<Item = &'a Tensor>) -> Result<Array> {
    let (values, shape) = qwen2vl::joined_image_rows(images)?;
    Array::from_f32(&values, &shape)
}
