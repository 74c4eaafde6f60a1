//! A llama-architecture decoder from a GGUF file (quantized weights), kiln's
//! [`Generator`](kiln_core::Generator): every sequence has its own KV cache, and a step
//! runs a ragged batch — all sequences' new tokens are the rows of one matrix for the
//! projections and the MLP (each weight tile read once per 6 rows, whatever the batch),
//! attention runs per sequence, in parallel, over its own cache. Everything but the
//! matrix products is plain loops over f32 buffers: candle's small-tensor ops cost more
//! than the arithmetic at this size (each of its matmuls even reads `/proc/cpuinfo`).
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
use candle_core::{Device, Module, Tensor};
use kiln_core::{Error, GeneratorInfo, Result, SequenceCache, StepItem, TokenizerSource};
use rayon::prelude::*;

use crate::cpu::int8::QDense;

fn candle(e: candle_core::Error) -> Error {
    Error::backend("candle", e.to_string())
}

/// A sequence's keys and values, per layer: `[kv_heads, tokens, head_dim]` each.
pub struct LlamaCache {
    /// Per layer, keys and values token after token: `[tokens][kv_heads][head_dim]`.
    layers: Vec<(Vec<f32>, Vec<f32>)>,
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

    /// `rows` rows of `x` times W^T.
    fn forward(&self, x: &[f32], rows: usize, out: &mut Vec<f32>) -> candle_core::Result<()> {
        match self {
            Linear::Candle(m) => {
                let t = m.forward(&Tensor::from_slice(x, (rows, x.len() / rows.max(1)), &Device::Cpu)?)?;
                *out = t.flatten_all()?.to_vec1::<f32>()?;
            }
            Linear::Int8(q) => q.forward(x, rows, out),
        }
        Ok(())
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
    attn_norm: Vec<f32>,
    ffn_norm: Vec<f32>,
}

/// The loaded decoder.
pub struct Llama {
    /// `[vocab][width]`.
    embed: Vec<f32>,
    width: usize,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    output: Linear,
    /// `[position][head_dim / 2]`.
    cos: Vec<f32>,
    sin: Vec<f32>,
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

/// Bytes a model loaded from `path` with `weights` holds, from the GGUF header alone
/// (tensor shapes and types): the embedding table as f32 (it is read per token), each
/// matrix in the form `weights` gives it (the tied output projection a second time),
/// the rotary tables, plus 10% for a step's activations. `None`: not a readable GGUF
/// file (loading says why).
pub fn estimate_bytes(path: &Path, weights: Weights) -> Option<u64> {
    let mut file = File::open(path).ok()?;
    let content = gguf_file::Content::read(&mut file).ok()?;
    let elements = |name: &str| content.tensor_infos.get(name).map(|t| t.shape.elem_count() as u64);
    let in_memory = |name: &str| -> u64 {
        let Some(info) = content.tensor_infos.get(name) else { return 0 };
        let n = info.shape.elem_count() as u64;
        let as_file = |t: GgmlDType| n * t.type_size() as u64 / t.block_size() as u64;
        let matrix = info.shape.dims().len() == 2;
        match weights {
            _ if !matrix => n * 4,
            Weights::Int8 => n + 12 * info.shape.dims()[0] as u64,
            Weights::Ggml(to) if !matches!(info.ggml_dtype, GgmlDType::F32 | GgmlDType::F16) => as_file(to),
            _ => as_file(info.ggml_dtype),
        }
    };
    let mut bytes = elements("token_embd.weight")? * 4;
    let output = if content.tensor_infos.contains_key("output.weight") {
        "output.weight"
    } else {
        "token_embd.weight"
    };
    bytes += in_memory(output);
    bytes += content
        .tensor_infos
        .keys()
        .filter(|n| n.starts_with("blk.") || *n == "output_norm.weight")
        .map(|n| in_memory(n))
        .sum::<u64>();
    let meta = |key: &str| content.metadata.get(key).and_then(|v| v.to_u32().ok()).unwrap_or(0) as u64;
    let (width, heads) = (meta("llama.embedding_length"), meta("llama.attention.head_count").max(1));
    bytes += meta("llama.context_length") * (width / heads) * 4;
    Some(bytes + bytes / 10)
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
        let dense = |t: QTensor| {
            t.dequantize(&Device::Cpu).and_then(|t| t.flatten_all()?.to_vec1::<f32>()).map_err(candle)
        };
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
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(context * half);
        let mut sin = Vec::with_capacity(context * half);
        for pos in 0..context {
            for i in 0..half {
                let angle = pos as f32 / rope_base.powf((2 * i) as f32 / head_dim as f32);
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }

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
        Ok(Llama { embed, width, layers, norm, output, cos, sin, heads, kv_heads, head_dim, eps, info })
    }

    pub fn new_cache(&self) -> LlamaCache {
        LlamaCache {
            layers: vec![(Vec::new(), Vec::new()); self.layers.len()],
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

    /// `spans`: per sequence (first row, rows, position of its first new token). The
    /// activations are plain `[rows][width]` buffers: the projections and the MLP go
    /// through [`Linear`] for all rows at once; attention runs per sequence (in parallel)
    /// over its own cache, with no tensor per head.
    fn forward(
        &self,
        ids: &[u32],
        spans: &[(usize, usize, usize)],
        caches: &mut [&mut LlamaCache],
    ) -> candle_core::Result<Vec<Vec<f32>>> {
        let (d, hd, nh, nkv) = (self.width, self.head_dim, self.heads, self.kv_heads);
        let rows = ids.len();
        let mut x: Vec<f32> = Vec::with_capacity(rows * d);
        for &id in ids {
            x.extend_from_slice(&self.embed[id as usize * d..(id as usize + 1) * d]);
        }
        let (mut h, mut q, mut k, mut v) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut attn, mut o, mut gate, mut up) =
            (vec![0f32; rows * nh * hd], Vec::new(), Vec::new(), Vec::new());
        for (l, layer) in self.layers.iter().enumerate() {
            rms_norm(&x, &layer.attn_norm, self.eps, &mut h);
            layer.wq.forward(&h, rows, &mut q)?;
            layer.wk.forward(&h, rows, &mut k)?;
            layer.wv.forward(&h, rows, &mut v)?;
            for (s, &(row, t, pos)) in spans.iter().enumerate() {
                for r in 0..t {
                    self.rope(&mut q[(row + r) * nh * hd..(row + r + 1) * nh * hd], pos + r);
                    self.rope(&mut k[(row + r) * nkv * hd..(row + r + 1) * nkv * hd], pos + r);
                }
                let (kc, vc) = &mut caches[s].layers[l];
                kc.extend_from_slice(&k[row * nkv * hd..(row + t) * nkv * hd]);
                vc.extend_from_slice(&v[row * nkv * hd..(row + t) * nkv * hd]);
            }
            // Each sequence's rows of `attn` are its own: split them off and fill in parallel.
            let mut parts: Vec<(&mut [f32], usize, usize, usize, &LlamaCache)> =
                Vec::with_capacity(spans.len());
            let mut rest = attn.as_mut_slice();
            for (&(row, t, pos), cache) in spans.iter().zip(caches.iter()) {
                let (mine, tail) = rest.split_at_mut(t * nh * hd);
                parts.push((mine, row, t, pos, &**cache));
                rest = tail;
            }
            parts.into_par_iter().for_each(|(out, row, t, pos, cache)| {
                let (kc, vc) = &cache.layers[l];
                attend(&q[row * nh * hd..(row + t) * nh * hd], kc, vc, pos, t, nh, nkv, hd, out);
            });
            layer.wo.forward(&attn, rows, &mut o)?;
            x.iter_mut().zip(&o).for_each(|(x, o)| *x += o);
            rms_norm(&x, &layer.ffn_norm, self.eps, &mut h);
            layer.w1.forward(&h, rows, &mut gate)?;
            layer.w3.forward(&h, rows, &mut up)?;
            gate.iter_mut().zip(&up).for_each(|(g, u)| *g = *g / (1.0 + (-*g).exp()) * u);
            layer.w2.forward(&gate, rows, &mut o)?;
            x.iter_mut().zip(&o).for_each(|(x, o)| *x += o);
        }
        // Only each sequence's last position is sampled from.
        let mut last = Vec::with_capacity(spans.len() * d);
        for &(row, t, _) in spans {
            last.extend_from_slice(&x[(row + t - 1) * d..(row + t) * d]);
        }
        rms_norm(&last, &self.norm, self.eps, &mut h);
        let mut logits = Vec::new();
        self.output.forward(&h, spans.len(), &mut logits)?;
        let vocab = logits.len() / spans.len().max(1);
        Ok(logits.chunks(vocab).map(<[f32]>::to_vec).collect())
    }

    /// Rotates each head's pairs `(2i, 2i + 1)` of one row by position `pos` (GGUF's
    /// llama layout).
    fn rope(&self, row: &mut [f32], pos: usize) {
        let half = self.head_dim / 2;
        let (cos, sin) = (&self.cos[pos * half..(pos + 1) * half], &self.sin[pos * half..(pos + 1) * half]);
        for head in row.chunks_mut(self.head_dim) {
            for i in 0..half {
                let (a, b) = (head[2 * i], head[2 * i + 1]);
                head[2 * i] = a * cos[i] - b * sin[i];
                head[2 * i + 1] = a * sin[i] + b * cos[i];
            }
        }
    }
}

/// `y = x / rms(x) * w` per row of `x`.
fn rms_norm(x: &[f32], w: &[f32], eps: f32, y: &mut Vec<f32>) {
    y.clear();
    for row in x.chunks(w.len()) {
        let ms = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        y.extend(row.iter().zip(w).map(|(v, w)| v * inv * w));
    }
}

/// Causal attention of one sequence's `t` new query rows (positions `pos..pos + t`)
/// over its cache (`pos + t` tokens), grouped-query: head `h` reads KV head
/// `h / (nh / nkv)`. Writes `[t][nh][hd]` into `out`.
#[allow(clippy::too_many_arguments)]
fn attend(
    q: &[f32],
    kc: &[f32],
    vc: &[f32],
    pos: usize,
    t: usize,
    nh: usize,
    nkv: usize,
    hd: usize,
    out: &mut [f32],
) {
    let group = nh / nkv;
    let scale = 1.0 / (hd as f32).sqrt();
    let mut scores = Vec::with_capacity(pos + t);
    for r in 0..t {
        let seen = pos + r + 1;
        for h in 0..nh {
            let kv = h / group;
            let qh = &q[(r * nh + h) * hd..(r * nh + h + 1) * hd];
            scores.clear();
            scores.extend((0..seen).map(|j| {
                let kj = &kc[(j * nkv + kv) * hd..(j * nkv + kv + 1) * hd];
                qh.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() * scale
            }));
            let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
            let mut sum = 0.0;
            scores.iter_mut().for_each(|s| {
                *s = (*s - max).exp();
                sum += *s;
            });
            let oh = &mut out[(r * nh + h) * hd..(r * nh + h + 1) * hd];
            oh.fill(0.0);
            for (j, p) in scores.iter().enumerate() {
                let vj = &vc[(j * nkv + kv) * hd..(j * nkv + kv + 1) * hd];
                let p = p / sum;
                oh.iter_mut().zip(vj).for_each(|(o, v)| *o += p * v);
            }
        }
    }
}
