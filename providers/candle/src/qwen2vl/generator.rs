//! Qwen2.5-VL as a kiln [`Generator`]: the runtime's steps over sequences, a prompt's
//! first step with its images' rows, and the vision tower behind `encode_images`.

use std::path::Path;

use candle_core::{Device, Tensor as CTensor};
use kiln_core::qwen2vl;
use kiln_core::{
    Error, Generator, GeneratorInfo, ImagePatches, Result, SequenceCache, StepItem, Tensor, TokenizerSource,
    VisionInfo,
};

use super::{Arithmetic, KvCache, QwenVl};
use crate::backend;

/// A loaded Qwen2.5-VL checkpoint that generates.
pub struct QwenVlGenerator {
    model: QwenVl,
    info: GeneratorInfo,
}

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

impl QwenVlGenerator {
    /// The checkpoint folder `dir` on the CPU, in f32: its weights, tokenizer, chat
    /// template and processor settings (read again by the runtime's processor).
    pub fn load(dir: &Path, weight_bytes: u64) -> Result<Self> {
        Self::load_with(dir, weight_bytes, Arithmetic::AsStored)
    }

    /// As [`QwenVlGenerator::load`], the layers computing in `arithmetic`.
    pub fn load_with(dir: &Path, weight_bytes: u64, arithmetic: Arithmetic) -> Result<Self> {
        let model = QwenVl::load_with(dir, &Device::Cpu, true, arithmetic)?;
        let c = model.config().clone();
        let tokenizer = qwen2vl::tokenizer_file(dir)?;
        let name =
            dir.file_name().map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into_owned());
        let mut info = GeneratorInfo::new(
            name,
            crate::NAME,
            kiln_core::Device::Cpu,
            c.vocab_size,
            c.max_position_embeddings,
            TokenizerSource::File(tokenizer.clone()),
        );
        info.eos_token_ids = qwen2vl::eos_tokens(dir, &c);
        info.chat_template = qwen2vl::chat_template(dir);
        info.kv_bytes_per_token = (c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim() * 4) as u64;
        info.weight_bytes = Some(weight_bytes);
        info.quantization = match (qwen2vl::quantization(dir)?, arithmetic) {
            (Some((group, 4)), Arithmetic::Int8Activations) => {
                format!("4-bit mlx affine (group {group}), as Q4_1 blocks with int8 activations")
            }
            (Some((group, bits)), _) => {
                format!("{bits}-bit mlx affine (group {group}), kept packed, widened to f32 as it computes")
            }
            (None, Arithmetic::Bf16) => "none (bf16 products on the CPU's tiles)".into(),
            (None, Arithmetic::Int8Activations) if crate::cpu::int8::QDense::fast() => {
                "int8 per output channel (quantized at load), activations int8 per row".into()
            }
            (None, _) => "none (f32)".into(),
        };
        info.vision = Some(VisionInfo {
            processor: "qwen2-vl".into(),
            dir: dir.to_path_buf(),
            image_token: qwen2vl::token_text(&tokenizer, c.image_token_id)
                .unwrap_or_else(|| "<|image_pad|>".into()),
            image_token_id: c.image_token_id,
            merge_size: c.vision.spatial_merge_size,
            weight_bytes: 0,
        });
        Ok(QwenVlGenerator { model, info })
    }
}

impl Generator for QwenVlGenerator {
    fn info(&self) -> &GeneratorInfo {
        &self.info
    }

    fn new_sequence(&self) -> Result<Box<dyn SequenceCache>> {
        Ok(Box::new(Sequence(self.model.new_cache())))
    }

    fn step(&self, batch: &mut [StepItem<'_>]) -> Result<Vec<Vec<f32>>> {
        for item in batch.iter() {
            self.info.check_step(item.tokens, item.cache.len())?;
        }
        // Sequences decoding one token go as one batch; prompts (and the rare several
        // tokens after a prompt) run on their own.
        let mut out: Vec<Option<Vec<f32>>> = vec![None; batch.len()];
        let mut decoding: Vec<usize> = Vec::new();
        for (n, item) in batch.iter_mut().enumerate() {
            let cache =
                &mut item.cache.as_any_mut().downcast_mut::<Sequence>().expect("a Qwen2.5-VL cache").0;
            let logits = if cache.is_empty() {
                let grids: Vec<[usize; 3]> = item.images.iter().map(|i| i.grid_thw).collect();
                let rows = match item.images {
                    [] => None,
                    images => Some(image_rows(images.iter().map(|i| i.embedding))?),
                };
                self.model
                    .prefill(item.tokens, rows.as_ref(), &grids, cache, 1)?
                    .squeeze(0)
                    .map_err(backend)?
            } else if item.tokens.len() == 1 {
                decoding.push(n);
                continue;
            } else {
                self.model.extend(item.tokens, cache)?
            };
            out[n] = Some(logits.to_vec1::<f32>().map_err(backend)?);
        }
        if !decoding.is_empty() {
            let tokens: Vec<u32> = decoding.iter().map(|&n| batch[n].tokens[0]).collect();
            let mut caches: Vec<&mut KvCache> = batch
                .iter_mut()
                .enumerate()
                .filter(|(n, _)| decoding.contains(n))
                .map(|(_, item)| {
                    &mut item.cache.as_any_mut().downcast_mut::<Sequence>().expect("a Qwen2.5-VL cache").0
                })
                .collect();
            let logits = self.model.decode_batch(&tokens, &mut caches)?.to_vec2::<f32>().map_err(backend)?;
            for (&n, row) in decoding.iter().zip(logits) {
                out[n] = Some(row);
            }
        }
        Ok(out.into_iter().map(|l| l.expect("every item stepped")).collect())
    }

    /// Views of the same keys and values, cut at `tokens`.
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
        let rows = self.model.encode_images(&values, &grids)?;
        let (_, hidden) = rows.dims2().map_err(backend)?;
        let all = rows.flatten_all().and_then(|r| r.to_vec1::<f32>()).map_err(backend)?;
        let merge = self.model.config().vision.spatial_merge_size;
        qwen2vl::split_image_rows(&all, hidden, &grids, merge)
    }
}

/// The images' rows one after another, as one `[Σ tokens, hidden]` tensor.
fn image_rows<'a>(images: impl Iterator<Item = &'a Tensor>) -> Result<CTensor> {
    let (values, [rows, hidden]) = qwen2vl::joined_image_rows(images)?;
    CTensor::from_vec(values, (rows, hidden), &Device::Cpu).map_err(backend)
}
