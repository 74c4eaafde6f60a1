//! A llama-architecture decoder from a GGUF file (quantized weights), kiln's
//! [`Generator`]: every sequence has its own KV cache, and a step runs a ragged batch —
//! all sequences' new tokens are the rows of one matrix for the projections and the MLP
//! (each quantized weight read once per step, whatever the batch), attention runs per
//! sequence over its own cache.
//!
//! `provider.options.requantize` picks what the matrices become at load: `"int8"` (the
//! default where the CPU has AVX-512 VNNI) runs them through kiln's own int8 kernel
//! (`cpu/int8.rs`: per-channel weights, per-row activations, weights read once per tile
//! of 6 rows, columns split across the cores when there are few rows); `"q8_0"` and the
//! other GGML types through candle's quantized matmul (a dot product per row and column:
//! a batch of rows costs each row's price); `"none"` as the file has them.

use std::fs::File;
use std::path::Path;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor, gguf_file};
use candle_core::{DType, Device, IndexOp, Module, Tensor};
use kiln_core::{Error, GeneratorInfo, Result, SequenceCache, StepItem, TokenizerSource};

use crate::cpu::int8::QDense;

fn candle(e: candle_core::Error) -> Error {
    Error::backend("candle", e.to_string())
}

/// A sequence's keys and values, per layer: `[kv_heads, tokens, head_dim]` each.
pub struct LlamaCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
    bytes_per_token: u64,
}

impl SequenceCache for LlamaCache {
    fn len(&self) -> usize {
        self.len
    }
    fn bytes(&self) -> u64 {
        self.len as u64 * self.bytes_per_token
    }
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

/// What the weight matrices become at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Weights {
    /// As the file has them.
    File,
    /// Re-quantized to this GGML type (candle's kernels).
    Ggml(GgmlDType),
    /// kiln's int8 kernel.
    Int8,
}

/// A weight matrix and the kernel that multiplies by it.
enum Linear {
    Candle(QMatMul),
    Int8(QDense),
}

impl Linear {
    fn new(t: QTensor, weights: Weights) -> candle_core::Result<Linear> {
        if weights == Weights::Int8
            && let [n, k] = t.shape().dims()[..]
        {
            // GGUF rows are output channels: W is [n, k].
            let w = t.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
            if let Some(q) = QDense::from_output_rows(&w, vec![0.0; n], k, n) {
                return Ok(Linear::Int8(q));
            }
        }
        QMatMul::from_qtensor(t).map(Linear::Candle)
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Linear::Candle(m) => m.forward(x),
            Linear::Int8(q) => {
                let (rows, _) = x.dims2()?;
                let mut out = Vec::new();
                q.forward(&x.flatten_all()?.to_vec1::<f32>()?, rows, &mut out);
                Tensor::from_vec(out, (rows, q.outputs()), x.device())
            }
        }
    }
}

struct Layer {
    wq: Linear,
    wk: Linear,
    wv: Linear,
    wo: Linear,
    w1: Linear,
    w2: Linear,
    w3: Linear,
    attn_norm: Tensor,
    ffn_norm: Tensor,
}

/// The loaded decoder.
pub struct Llama {
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    output: Linear,
    cos: Tensor,
    sin: Tensor,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    eps: f32,
    pub(crate) info: GeneratorInfo,
}

/// Metadata helpers over a GGUF header.
struct Meta<'a>(&'a gguf_file::Content, &'a Path);

impl Meta<'_> {
    fn get(&self, key: &str) -> Result<&gguf_file::Value> {
        self.0
            .metadata
            .get(key)
            .ok_or_else(|| Error::model_load(self.1, format!("no `{key}` in the GGUF metadata")))
    }
    fn u32(&self, key: &str) -> Result<u32> {
        self.get(key)?.to_u32().map_err(|e| Error::model_load(self.1, format!("`{key}`: {e}")))
    }
    fn string(&self, key: &str) -> Option<String> {
        self.0.metadata.get(key).and_then(|v| v.to_string().ok()).cloned()
    }
    fn strings(&self, key: &str) -> Result<Vec<String>> {
        let values =
            self.get(key)?.to_vec().map_err(|e| Error::model_load(self.1, format!("`{key}`: {e}")))?;
        values
            .iter()
            .map(|v| v.to_string().cloned().map_err(|e| Error::model_load(self.1, format!("`{key}`: {e}"))))
            .collect()
    }
}

impl Llama {
    /// Reads `path` (GGUF, `general.architecture = "llama"`).
    pub fn load(path: &Path, weights: Weights) -> Result<Llama> {
        let requantize = match weights {
            Weights::Ggml(t) => Some(t),
            _ => None,
        };
        let device = Device::Cpu;
        let mut file = File::open(path).map_err(|e| Error::io("opening", path, e))?;
        let content = gguf_file::Content::read(&mut file)
            .map_err(|e| Error::model_load(path, format!("not a readable GGUF file: {e}")))?;
        let meta = Meta(&content, path);
        let arch = meta.string("general.architecture").unwrap_or_default();
        if arch != "llama" {
            return Err(Error::Unsupported(format!(
                "{}: architecture `{arch}`; provider `candle` generates with llama-architecture GGUF models",
                path.display()
            )));
        }
        let heads = meta.u32("llama.attention.head_count")? as usize;
        let kv_heads = meta.u32("llama.attention.head_count_kv")? as usize;
        let width = meta.u32("llama.embedding_length")? as usize;
        let blocks = meta.u32("llama.block_count")? as usize;
        let context = meta.u32("llama.context_length")? as usize;
        let eps = meta.get("llama.attention.layer_norm_rms_epsilon")?.to_f32().unwrap_or(1e-5);
        let rope_base =
            meta.0.metadata.get("llama.rope.freq_base").and_then(|v| v.to_f32().ok()).unwrap_or(10_000.0);
        if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) || !width.is_multiple_of(heads) {
            return Err(Error::model_load(
                path,
                format!("{heads} heads, {kv_heads} KV heads, width {width}"),
            ));
        }
        let head_dim = width / heads;
        let mut quantization = None;
        let mut load = |name: &str| -> Result<QTensor> {
            let t = content
                .tensor(&mut file, name, &device)
                .map_err(|e| Error::model_load(path, format!("`{name}`: {e}")))?;
            let from = t.dtype();
            if name.starts_with("blk.") && t.shape().dims().len() == 2 {
                quantization.get_or_insert(from);
            }
            match requantize {
                Some(to)
                    if from != to
                        && t.shape().dims().len() == 2
                        && !matches!(from, GgmlDType::F32 | GgmlDType::F16) =>
                {
                    let dense = t.dequantize(&device).map_err(candle)?;
                    QTensor::quantize(&dense, to).map_err(candle)
                }
                _ => Ok(t),
            }
        };
        let dense = |t: QTensor| t.dequantize(&Device::Cpu).map_err(candle);
        let embed = dense(load("token_embd.weight")?)?;
        let output = match content.tensor_infos.contains_key("output.weight") {
            true => load("output.weight")?,
            // Tied embeddings: the output projection is the embedding table.
            false => load("token_embd.weight")?,
        };
        let mut layers = Vec::with_capacity(blocks);
        for i in 0..blocks {
            let mut q = |n: &str| {
                load(&format!("blk.{i}.{n}.weight")).and_then(|t| Linear::new(t, weights).map_err(candle))
            };
            layers.push(Layer {
                wq: q("attn_q")?,
                wk: q("attn_k")?,
                wv: q("attn_v")?,
                wo: q("attn_output")?,
                w1: q("ffn_gate")?,
                w2: q("ffn_down")?,
                w3: q("ffn_up")?,
                attn_norm: dense(load(&format!("blk.{i}.attn_norm.weight"))?)?,
                ffn_norm: dense(load(&format!("blk.{i}.ffn_norm.weight"))?)?,
            });
        }
        let norm = dense(load("output_norm.weight")?)?;
        let output = Linear::new(output, weights).map_err(candle)?;
        let from = quantization.map_or_else(|| "f32".to_string(), |q| format!("{q:?}").to_lowercase());
        let quantization = match weights {
            Weights::Ggml(to) => {
                format!("{} (re-quantized at load from {from})", format!("{to:?}").to_lowercase())
            }
            Weights::Int8 => format!("int8, kiln's kernel (re-quantized at load from {from})"),
            Weights::File => from,
        };
        // Rotary tables for every position the context allows.
        let inv: Vec<f32> =
            (0..head_dim).step_by(2).map(|i| 1.0 / rope_base.powf(i as f32 / head_dim as f32)).collect();
        let positions = Tensor::arange(0, context as u32, &device)
            .and_then(|t| t.to_dtype(DType::F32))
            .map_err(candle)?;
        let angles = positions
            .reshape((context, 1))
            .and_then(|p| p.matmul(&Tensor::new(inv.as_slice(), &device)?.reshape((1, inv.len()))?))
            .map_err(candle)?;
        let (cos, sin) = (angles.cos().map_err(candle)?, angles.sin().map_err(candle)?);

        let tokens = meta.strings("tokenizer.ggml.tokens")?;
        let tokenizer = match meta.string("tokenizer.ggml.model").as_deref() {
            Some("gpt2") => TokenizerSource::GgufBpe {
                pre: meta.string("tokenizer.ggml.pre").unwrap_or_else(|| "default".into()),
                tokens: tokens.clone(),
                merges: meta.strings("tokenizer.ggml.merges")?,
                token_types: match meta
                    .get("tokenizer.ggml.token_type")
                    .and_then(|v| v.to_vec().map_err(candle))
                {
                    Ok(v) => v.iter().map(|t| t.to_i32().unwrap_or(1)).collect(),
                    Err(_) => vec![1; tokens.len()],
                },
            },
            other => {
                let beside = path.with_file_name("tokenizer.json");
                if !beside.is_file() {
                    return Err(Error::Unsupported(format!(
                        "{}: tokenizer model `{}` in the GGUF metadata; kiln reads byte-level BPE (`gpt2`) from \
                         GGUF, or a tokenizer.json beside the model",
                        path.display(),
                        other.unwrap_or("none")
                    )));
                }
                TokenizerSource::File(beside)
            }
        };
        let name =
            path.file_stem().map_or_else(|| path.display().to_string(), |s| s.to_string_lossy().into_owned());
        let mut info =
            GeneratorInfo::new(name, "candle", kiln_core::Device::Cpu, tokens.len(), context, tokenizer);
        let id = |key: &str| meta.0.metadata.get(key).and_then(|v| v.to_u32().ok());
        info.bos_token_id = id("tokenizer.ggml.bos_token_id");
        info.eos_token_ids = id("tokenizer.ggml.eos_token_id").into_iter().collect();
        if let Some(eot) = id("tokenizer.ggml.eot_token_id").filter(|e| !info.eos_token_ids.contains(e)) {
            info.eos_token_ids.push(eot);
        }
        info.add_bos = meta
            .0
            .metadata
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false);
        info.chat_template = meta.string("tokenizer.chat_template");
        info.kv_bytes_per_token = (2 * blocks * kv_heads * head_dim * 4) as u64;
        info.weight_bytes = std::fs::metadata(path).ok().map(|m| m.len());
        info.quantization = quantization;
        Ok(Llama { embed, layers, norm, output, cos, sin, heads, kv_heads, head_dim, eps, info })
    }

    pub fn new_cache(&self) -> LlamaCache {
        LlamaCache {
            layers: vec![None; self.layers.len()],
            len: 0,
            bytes_per_token: self.info.kv_bytes_per_token,
        }
    }

    /// One ragged step; see the module docs.
    pub fn step(&self, batch: &mut [StepItem<'_>]) -> Result<Vec<Vec<f32>>> {
        let mut caches: Vec<&mut LlamaCache> = Vec::with_capacity(batch.len());
        let mut ids = Vec::new();
        let mut spans = Vec::with_capacity(batch.len());
        for item in batch.iter_mut() {
            if item.tokens.is_empty() {
                return Err(Error::InvalidInput("a step item without tokens".into()));
            }
            if let Some(&bad) = item.tokens.iter().find(|&&t| t as usize >= self.info.vocab_size) {
                return Err(Error::InvalidInput(format!(
                    "token id {bad} is outside the vocabulary of {}",
                    self.info.vocab_size
                )));
            }
            let cache = item
                .cache
                .as_any_mut()
                .downcast_mut::<LlamaCache>()
                .ok_or_else(|| Error::InvalidInput("a sequence cache from another generator".into()))?;
            if cache.len + item.tokens.len() > self.info.context_length {
                return Err(Error::InvalidInput(format!(
                    "{} tokens would exceed the context of {}",
                    cache.len + item.tokens.len(),
                    self.info.context_length
                )));
            }
            spans.push((ids.len(), item.tokens.len(), cache.len));
            ids.extend_from_slice(item.tokens);
            caches.push(cache);
        }
        let logits = self.forward(&ids, &spans, &mut caches).map_err(candle)?;
        for (cache, &(_, n, _)) in caches.iter_mut().zip(&spans) {
            cache.len += n;
        }
        Ok(logits)
    }

    /// `spans`: per sequence (first row, rows, position of its first new token).
    fn forward(
        &self,
        ids: &[u32],
        spans: &[(usize, usize, usize)],
        caches: &mut [&mut LlamaCache],
    ) -> candle_core::Result<Vec<Vec<f32>>> {
        let device = Device::Cpu;
        let mut x = self.embed.index_select(&Tensor::new(ids, &device)?, 0)?;
        let (hd, nh, nkv) = (self.head_dim, self.heads, self.kv_heads);
        let group = nh / nkv;
        for (l, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, self.eps)?;
            let (q, k, v) = (layer.wq.forward(&h)?, layer.wk.forward(&h)?, layer.wv.forward(&h)?);
            let mut outs = Vec::with_capacity(spans.len());
            for (s, &(row, t, pos)) in spans.iter().enumerate() {
                let heads = |m: &Tensor, n: usize| {
                    m.narrow(0, row, t)?.reshape((1, t, n, hd))?.transpose(1, 2)?.contiguous()
                };
                let (cos, sin) = (self.cos.narrow(0, pos, t)?, self.sin.narrow(0, pos, t)?);
                let qi = candle_nn::rotary_emb::rope_i(&heads(&q, nh)?, &cos, &sin)?;
                let ki = candle_nn::rotary_emb::rope_i(&heads(&k, nkv)?, &cos, &sin)?.squeeze(0)?;
                let vi = heads(&v, nkv)?.squeeze(0)?;
                let (ks, vs) = match caches[s].layers[l].take() {
                    Some((kc, vc)) => (Tensor::cat(&[&kc, &ki], 1)?, Tensor::cat(&[&vc, &vi], 1)?),
                    None => (ki, vi),
                };
                let total = ks.dim(1)?;
                // Queries grouped by the KV head they share: [kv_heads, group * t, head_dim].
                let qg = qi.squeeze(0)?.reshape((nkv, group * t, hd))?;
                let mut att = (qg.matmul(&ks.t()?)? / (hd as f64).sqrt())?;
                if t > 1 {
                    // Row r is query position r % t: it sees keys up to pos + r % t.
                    let mask: Vec<f32> = (0..group * t)
                        .flat_map(|r| {
                            (0..total).map(move |j| if j > pos + r % t { f32::NEG_INFINITY } else { 0.0 })
                        })
                        .collect();
                    att = att.broadcast_add(&Tensor::from_vec(mask, (1, group * t, total), &device)?)?;
                }
                let att = candle_nn::ops::softmax_last_dim(&att)?;
                let y = att.matmul(&vs)?.reshape((nh, t, hd))?.transpose(0, 1)?.reshape((t, nh * hd))?;
                outs.push(y);
                caches[s].layers[l] = Some((ks, vs));
            }
            let attn = Tensor::cat(&outs, 0)?;
            x = (x + layer.wo.forward(&attn)?)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, self.eps)?;
            let gate = candle_nn::ops::silu(&layer.w1.forward(&h)?)?;
            x = (x + layer.w2.forward(&(gate * layer.w3.forward(&h)?)?)?)?;
        }
        // Only each sequence's last position is sampled from.
        let last: Vec<u32> = spans.iter().map(|&(row, t, _)| (row + t - 1) as u32).collect();
        let x = x.index_select(&Tensor::new(last.as_slice(), &device)?, 0)?;
        let x = candle_nn::ops::rms_norm(&x, &self.norm, self.eps)?;
        let logits = self.output.forward(&x)?;
        (0..spans.len()).map(|i| logits.i(i)?.to_dtype(DType::F32)?.to_vec1::<f32>()).collect()
    }
}
