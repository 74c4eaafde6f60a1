//! A llama-architecture decoder from a GGUF file (quantized weights), kiln's
//! [`Generator`](kiln_core::Generator): every sequence has its own KV cache, and a step
//! runs a ragged batch — all sequences' new tokens are the rows of one matrix for the
//! projections and the MLP (each weight tile read once per 6 rows, whatever the batch),
//! attention runs per sequence, in parallel, over its own cache. Everything but the
//! matrix products is plain loops over f32 buffers: candle's small-tensor ops cost more
//! than the arithmetic at this size (each of its matmuls even reads `/proc/cpuinfo`).
//!
//! `provider.options.requantize` picks what the matrices become at load. By default
//! (`"auto"`, on a CPU with AVX-512 VNNI) `Q4_1` and `Q8_0` matrices stay exactly as the
//! file stores them and run through kiln's block kernel (`cpu/blocks.rs`: GGML's own
//! arithmetic, activations quantized per block of 32 as llama.cpp does — the file's
//! precision, and fewer bytes per token than int8); other types go to kiln's int8
//! kernel (`cpu/int8.rs`: per-channel weights, per-row activations). Both read a weight
//! tile once per tile of rows and split columns across the cores when there are few
//! rows (`cpu/tiles.rs`). `"int8"` forces the int8 kernel; `"q8_0"` and the other GGML
//! types re-quantize for candle's quantized matmul (a dot product per row and column: a
//! batch of rows costs each row's price); `"none"` keeps the file's types (kiln's block
//! kernel where it takes them, else candle's).

use std::fs::File;
use std::path::Path;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor, gguf_file};
use candle_core::{Device, Module, Tensor};
use half::f16;
use half::slice::HalfFloatSliceExt;
use kiln_core::gguf::{GgmlType, Gguf};
use kiln_core::{Error, Generator, GeneratorInfo, Result, SequenceCache, StepItem};
use rayon::prelude::*;

use crate::cpu::View;
use crate::cpu::blocks::{BlockDense, Format};
use crate::cpu::int8::QDense;

fn candle(e: candle_core::Error) -> Error {
    Error::backend("candle", e.to_string())
}

/// A sequence's keys and values, per layer, in f16 as llama.cpp keeps them by default:
/// half the bytes a decoding step's attention reads (it is bound by reading them) and
/// half the memory a sequence holds.
pub struct LlamaCache {
    /// Per layer, keys and values token after token: `[tokens][kv_heads][head_dim]`.
    layers: Vec<(Vec<f16>, Vec<f16>)>,
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
    /// As the file has them: kiln's block kernel for `Q4_1` / `Q8_0` where the CPU has
    /// AVX-512 VNNI, candle's quantized matmul otherwise.
    File,
    /// As the file has them where kiln's block kernel takes the type, else kiln's int8
    /// kernel (needs AVX-512 VNNI).
    Auto,
    /// Re-quantized to this GGML type (candle's kernels).
    Ggml(GgmlDType),
    /// kiln's int8 kernel.
    Int8,
}

impl Weights {
    /// The block kernel's format for a tensor of `kind`, where these weights use it.
    fn blocks(self, kind: GgmlDType) -> Option<Format> {
        let format = match kind {
            GgmlDType::Q4_1 => Format::Q4_1,
            GgmlDType::Q8_0 => Format::Q8_0,
            _ => return None,
        };
        (matches!(self, Weights::File | Weights::Auto) && QDense::fast()).then_some(format)
    }
}

/// A weight matrix and the kernel that multiplies by it.
enum Linear {
    Candle(QMatMul),
    Int8(QDense),
    Blocks(BlockDense),
}

impl Linear {
    /// `t` as `weights` turn it; `kind` is its type in the file. Also says what it became.
    fn new(t: QTensor, kind: GgmlDType, weights: Weights) -> candle_core::Result<(Linear, String)> {
        let name = |t: GgmlDType| format!("{t:?}").to_lowercase();
        let file = name(kind);
        // GGUF rows are output channels: W is [n, k].
        if let [n, k] = t.shape().dims()[..] {
            if let Some(format) = weights.blocks(kind)
                && let Some(layer) = BlockDense::from_file(format, &t.data()?, k, n)
            {
                return Ok((Linear::Blocks(layer), format!("{file} as in the file (kiln's block kernel)")));
            }
            if matches!(weights, Weights::Int8 | Weights::Auto) {
                let w = t.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
                if let Some(q) = QDense::from_output_rows(&w, vec![0.0; n], k, n) {
                    return Ok((
                        Linear::Int8(q),
                        format!("int8, kiln's kernel (re-quantized at load from {file})"),
                    ));
                }
            }
        }
        let label = match t.dtype() {
            to if to == kind => file,
            to => format!("{} (re-quantized at load from {file})", name(to)),
        };
        Ok((Linear::Candle(QMatMul::from_qtensor(t)?), label))
    }

    /// `rows` rows of `x` times W^T.
    fn forward(&self, x: &[f32], rows: usize, out: &mut Vec<f32>) -> candle_core::Result<()> {
        match self {
            Linear::Candle(m) => {
                let t = m.forward(&Tensor::from_slice(x, (rows, x.len() / rows.max(1)), &Device::Cpu)?)?;
                *out = t.flatten_all()?.to_vec1::<f32>()?;
            }
            Linear::Int8(q) => q.forward(x, rows, out),
            Linear::Blocks(q) => q.forward(x, rows, out),
        }
        Ok(())
    }
}

/// Linear layers over the same input: one joined layer where the kernel allows it (the
/// activations quantized once and the threads woken once, not once a part), else the
/// parts.
enum Group {
    /// The joined layer and each part's outputs.
    Joined(Linear, Vec<usize>),
    Parts(Vec<Linear>),
}

impl Group {
    fn new(parts: Vec<Linear>) -> Self {
        let blocks: Option<Vec<&BlockDense>> = parts
            .iter()
            .map(|p| match p {
                Linear::Blocks(b) => Some(b),
                _ => None,
            })
            .collect();
        if let Some(blocks) = blocks
            && let Some(joined) = BlockDense::concat(&blocks)
        {
            let widths = blocks.iter().map(|b| b.outputs()).collect();
            return Group::Joined(Linear::Blocks(joined), widths);
        }
        Group::Parts(parts)
    }

    /// `outs[i]` = `rows` rows of `x` times part `i`; `all` is scratch for the joined
    /// layer's rows.
    fn forward(
        &self,
        x: &[f32],
        rows: usize,
        all: &mut Vec<f32>,
        outs: &mut [&mut Vec<f32>],
    ) -> candle_core::Result<()> {
        match self {
            Group::Parts(parts) => {
                for (part, out) in parts.iter().zip(outs.iter_mut()) {
                    part.forward(x, rows, out)?;
                }
            }
            Group::Joined(layer, widths) => {
                layer.forward(x, rows, all)?;
                let total: usize = widths.iter().sum();
                let mut at = 0;
                for (&width, out) in widths.iter().zip(outs.iter_mut()) {
                    out.clear();
                    for row in all.chunks_exact(total).take(rows) {
                        out.extend_from_slice(&row[at..at + width]);
                    }
                    at += width;
                }
            }
        }
        Ok(())
    }
}

struct Layer {
    /// Q, K and V.
    attention_in: Group,
    wo: Linear,
    /// The feed-forward's gate and up.
    ffn_in: Group,
    w2: Linear,
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
    /// The model's own threads (as many as rayon's global pool has): a step runs on one
    /// of them (`Generator::step`). Its own, so that a thread waiting inside a step
    /// steals only this model's work — in the global pool it could pick up another
    /// engine's whole prompt chunk and hold its own stream up for as long.
    pool: rayon::ThreadPool,
}

/// Bytes a model loaded from `path` with `weights` holds, from the GGUF header alone
/// (tensor shapes and types): the embedding table as f32 (it is read per token), each
/// matrix in the form `weights` gives it (the tied output projection a second time),
/// the rotary tables, plus 10% for a step's activations. `None`: not a readable GGUF
/// file (loading says why).
pub fn estimate_bytes(path: &Path, weights: Weights) -> Option<u64> {
    let gguf = Gguf::open(path).ok()?;
    let in_memory = |name: &str| -> u64 {
        let Some(info) = gguf.tensors.get(name) else { return 0 };
        let n = info.elements() as u64;
        let dense = matches!(info.kind, GgmlType::F32 | GgmlType::F16);
        let blocks = match info.kind {
            GgmlType::Q4_1 => weights.blocks(GgmlDType::Q4_1),
            GgmlType::Q8_0 => weights.blocks(GgmlDType::Q8_0),
            _ => None,
        };
        match (weights, blocks, &info.dims[..]) {
            (_, _, [_]) => n * 4,
            (_, Some(format), [_, _]) => format.bytes(n as usize) as u64,
            (Weights::Int8 | Weights::Auto, _, [_, rows]) => n + 12 * *rows as u64,
            (Weights::Ggml(to), _, _) if !dense => n * to.type_size() as u64 / to.block_size() as u64,
            _ => info.bytes().unwrap_or(n as usize * 4) as u64,
        }
    };
    let mut bytes = gguf.tensors.get("token_embd.weight")?.elements() as u64 * 4;
    let output =
        if gguf.tensors.contains_key("output.weight") { "output.weight" } else { "token_embd.weight" };
    bytes += in_memory(output);
    bytes += gguf
        .tensors
        .keys()
        .filter(|n| n.starts_with("blk.") || *n == "output_norm.weight")
        .map(|n| in_memory(n))
        .sum::<u64>();
    let shape = gguf.llama().ok()?;
    bytes += (shape.context * shape.width / shape.heads * 4) as u64;
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
        let gguf = kiln_core::gguf::Gguf::open(path)?;
        let kiln_core::gguf::LlamaShape { heads, kv_heads, width, blocks, context, eps, rope_base } =
            gguf.llama()?;
        let mut file = File::open(path).map_err(|e| Error::io("opening", path, e))?;
        let content = gguf_file::Content::read(&mut file)
            .map_err(|e| Error::model_load(path, format!("not a readable GGUF file: {e}")))?;
        let head_dim = width / heads;
        // Each matrix with its type in the file.
        let mut load = |name: &str| -> Result<(QTensor, GgmlDType)> {
            let t = content
                .tensor(&mut file, name, &device)
                .map_err(|e| Error::model_load(path, format!("`{name}`: {e}")))?;
            let from = t.dtype();
            let t = match requantize {
                Some(to)
                    if from != to
                        && t.shape().dims().len() == 2
                        && !matches!(from, GgmlDType::F32 | GgmlDType::F16) =>
                {
                    let dense = t.dequantize(&device).map_err(candle)?;
                    QTensor::quantize(&dense, to).map_err(candle)?
                }
                _ => t,
            };
            Ok((t, from))
        };
        let dense = |(t, _): (QTensor, GgmlDType)| {
            t.dequantize(&Device::Cpu).and_then(|t| t.flatten_all()?.to_vec1::<f32>()).map_err(candle)
        };
        let linear = |(t, from): (QTensor, GgmlDType)| Linear::new(t, from, weights).map_err(candle);
        let embed = dense(load("token_embd.weight")?)?;
        let output = match content.tensor_infos.contains_key("output.weight") {
            true => load("output.weight")?,
            // Tied embeddings: the output projection is the embedding table.
            false => load("token_embd.weight")?,
        };
        let mut layers = Vec::with_capacity(blocks);
        // What each matrix became, once per kind.
        let mut labels: Vec<String> = Vec::new();
        for i in 0..blocks {
            let mut q = |n: &str| -> Result<Linear> {
                let (linear, label) = linear(load(&format!("blk.{i}.{n}.weight"))?)?;
                if !labels.contains(&label) {
                    labels.push(label);
                }
                Ok(linear)
            };
            layers.push(Layer {
                attention_in: Group::new(vec![q("attn_q")?, q("attn_k")?, q("attn_v")?]),
                wo: q("attn_output")?,
                ffn_in: Group::new(vec![q("ffn_gate")?, q("ffn_up")?]),
                w2: q("ffn_down")?,
                attn_norm: dense(load(&format!("blk.{i}.attn_norm.weight"))?)?,
                ffn_norm: dense(load(&format!("blk.{i}.ffn_norm.weight"))?)?,
            });
        }
        let norm = dense(load("output_norm.weight")?)?;
        let (output, output_label) = linear(output)?;
        let mut quantization = labels.join(", ");
        if !labels.contains(&output_label) {
            quantization = format!("{quantization}; output {output_label}");
        }
        let (cos, sin) = rope_tables(context, head_dim, rope_base);

        let mut info = gguf.generator_info("candle", kiln_core::Device::Cpu, 2)?;
        info.quantization = quantization;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(rayon::current_num_threads())
            .thread_name(|i| format!("kiln-llama-{i}"))
            .build()
            .map_err(|e| Error::model_load(path, format!("starting its threads: {e}")))?;
        Ok(Llama { embed, width, layers, norm, output, cos, sin, heads, kv_heads, head_dim, eps, info, pool })
    }
}

impl Generator for Llama {
    fn info(&self) -> &GeneratorInfo {
        &self.info
    }

    fn new_sequence(&self) -> Result<Box<dyn SequenceCache>> {
        Ok(Box::new(LlamaCache {
            layers: vec![(Vec::new(), Vec::new()); self.layers.len()],
            len: 0,
            bytes_per_token: self.info.kv_bytes_per_token,
        }))
    }

    /// A copy of the first `tokens` tokens' keys and values (the prefix cache's).
    fn fork(&self, cache: &mut dyn SequenceCache, tokens: usize) -> Result<Option<Box<dyn SequenceCache>>> {
        let cache = cache
            .as_any_mut()
            .downcast_mut::<LlamaCache>()
            .ok_or_else(|| Error::InvalidInput("a sequence cache from another generator".into()))?;
        if tokens > cache.len {
            return Err(Error::InvalidInput(format!(
                "a prefix of {tokens} tokens of a cache of {}",
                cache.len
            )));
        }
        let layers = cache
            .layers
            .iter()
            .map(|(k, v)| {
                let per = k.len().checked_div(cache.len).unwrap_or(0);
                (k[..tokens * per].to_vec(), v[..tokens * per].to_vec())
            })
            .collect();
        Ok(Some(Box::new(LlamaCache { layers, len: tokens, bytes_per_token: cache.bytes_per_token })))
    }

    /// One ragged step; see the module docs.
    fn step(&self, batch: &mut [StepItem<'_>]) -> Result<Vec<Vec<f32>>> {
        let mut caches: Vec<&mut LlamaCache> = Vec::with_capacity(batch.len());
        let mut ids = Vec::new();
        let mut spans = Vec::with_capacity(batch.len());
        for item in batch.iter_mut() {
            let cache = item
                .cache
                .as_any_mut()
                .downcast_mut::<LlamaCache>()
                .ok_or_else(|| Error::InvalidInput("a sequence cache from another generator".into()))?;
            self.info.check_step(item.tokens, cache.len)?;
            spans.push((ids.len(), item.tokens.len(), cache.len));
            ids.extend_from_slice(item.tokens);
            caches.push(cache);
        }
        // On one of the model's threads: each layer's products and attention are
        // parallel regions (about 240 a token), and entered from outside a pool each one
        // queued its jobs and put this thread to sleep until a woken worker had done
        // them. From inside, this thread works on them too and the other workers are
        // usually still awake from the region before.
        let logits = self.pool.install(|| self.forward(&ids, &spans, &mut caches)).map_err(candle)?;
        for (cache, &(_, n, _)) in caches.iter_mut().zip(&spans) {
            cache.len += n;
        }
        Ok(logits)
    }
}

impl Llama {
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
        let mut joined = Vec::new();
        let (mut attn, mut o, mut gate, mut up) =
            (vec![0f32; rows * nh * hd], Vec::new(), Vec::new(), Vec::new());
        // Per sequence, its layer's keys and values widened to f32 when it reads a prompt.
        let mut wide: Vec<(Vec<f32>, Vec<f32>)> = vec![(Vec::new(), Vec::new()); spans.len()];
        for (l, layer) in self.layers.iter().enumerate() {
            rms_norm(&x, &layer.attn_norm, self.eps, &mut h);
            layer.attention_in.forward(&h, rows, &mut joined, &mut [&mut q, &mut k, &mut v])?;
            for (s, &(row, t, pos)) in spans.iter().enumerate() {
                for r in 0..t {
                    self.rope(&mut q[(row + r) * nh * hd..(row + r + 1) * nh * hd], pos + r);
                    self.rope(&mut k[(row + r) * nkv * hd..(row + r + 1) * nkv * hd], pos + r);
                }
                let (kc, vc) = &mut caches[s].layers[l];
                let (kw, vw) = &mut wide[s];
                for (cache, new, wide) in [(kc, &k, kw), (vc, &v, vw)] {
                    let start = cache.len();
                    cache.resize(start + t * nkv * hd, f16::ZERO);
                    cache[start..].convert_from_f32_slice(&new[row * nkv * hd..(row + t) * nkv * hd]);
                    // A prompt's attention runs on `gemm`, in f32: its sequence's keys and
                    // values widened once for all of its jobs.
                    if t > 1 {
                        wide.resize(cache.len(), 0.0);
                        cache.convert_to_f32_slice(wide);
                    }
                }
            }
            // Jobs of (sequence, head, block of query rows): a long prompt's attention
            // spreads over every thread, and one stream's decoding over its heads.
            let mut jobs = Vec::new();
            for (s, &(row, t, pos)) in spans.iter().enumerate() {
                if t == 1 {
                    // A decoding row: one job per key and value head, for all the query
                    // heads that read it (one pass over that part of the cache).
                    let group = nh / nkv;
                    for kv in 0..nkv {
                        jobs.push(Attend { s, h: kv * group, heads: group, row, r0: 0, rows: 1, pos });
                    }
                    continue;
                }
                for h in 0..nh {
                    for r0 in (0..t).step_by(QUERY_BLOCK) {
                        jobs.push(Attend { s, h, heads: 1, row, r0, rows: QUERY_BLOCK.min(t - r0), pos });
                    }
                }
            }
            // Longest first: the last jobs to start are short.
            jobs.sort_by_key(|j| std::cmp::Reverse((j.pos + j.r0 + j.rows) * j.rows * j.heads));
            let out = crate::cpu::Shared(attn.as_mut_ptr());
            let caches: &[&mut LlamaCache] = caches;
            let wide = &wide;
            jobs.par_iter().for_each(|job| {
                let (kc, vc) = &caches[job.s].layers[l];
                let (kw, vw) = &wide[job.s];
                // SAFETY: each job writes its own rows' columns of heads `h..h + heads`
                // of `attn` (rows × nh × hd), which no other job writes.
                unsafe { attend(job, &q, (kc, vc), (kw, vw), (nh, nkv, hd), out) };
            });
            layer.wo.forward(&attn, rows, &mut o)?;
            x.iter_mut().zip(&o).for_each(|(x, o)| *x += o);
            rms_norm(&x, &layer.ffn_norm, self.eps, &mut h);
            layer.ffn_in.forward(&h, rows, &mut joined, &mut [&mut gate, &mut up])?;
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

/// The rotary tables for every position the context allows, `[position][head_dim / 2]`:
/// cos and sin of position · base^(−2i / head_dim) (GGUF's llama layout rotates the pairs
/// `(2i, 2i + 1)` by them). Also the tensor decoder's (`dense_llama`).
pub(crate) fn rope_tables(context: usize, head_dim: usize, base: f32) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    let mut cos = Vec::with_capacity(context * half);
    let mut sin = Vec::with_capacity(context * half);
    for pos in 0..context {
        for i in 0..half {
            let angle = pos as f32 / base.powf((2 * i) as f32 / head_dim as f32);
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    (cos, sin)
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

/// Query rows a job of attention takes at most.
const QUERY_BLOCK: usize = 64;

/// One job of attention: sequence `s`'s query rows `r0..r0 + rows` (of its rows starting
/// at batch row `row`; positions `pos + r0..`), heads `h..h + heads` (more than one only
/// for a decoding row: the query heads of one key and value head).
struct Attend {
    s: usize,
    h: usize,
    heads: usize,
    row: usize,
    r0: usize,
    rows: usize,
    pos: usize,
}

/// Causal attention of `job`'s query rows over the sequence's cache (`kc`, `vc` in f16;
/// `kw`, `vw` the same widened to f32 for a sequence reading a prompt, empty for a
/// decoding one), grouped-query (head `h` reads KV head `h / (nh / nkv)`): `S = Q Kᵀ /
/// √hd` by `gemm` over the keys up to the block's last position, each row's softmax over
/// the keys it may see (zeros past them), then `P V` by `gemm` into the job's rows of
/// `out` (`[rows][nh][hd]`). A single row (decoding) goes through `decode_attention`
/// instead, on the f16 cache, for all of the job's heads.
///
/// # Safety
/// `out` points at the step's `[rows][nh][hd]` attention buffer and no other job writes
/// this job's rows of head `h`.
unsafe fn attend(
    job: &Attend,
    q: &[f32],
    (kc, vc): (&[f16], &[f16]),
    (kw, vw): (&[f32], &[f32]),
    (nh, nkv, hd): (usize, usize, usize),
    out: crate::cpu::Shared,
) {
    let kv = job.h / (nh / nkv);
    let seen = job.pos + job.r0 + job.rows; // keys the block's last row sees
    let scale = 1.0 / (hd as f32).sqrt();
    crate::cpu::SCORES.with_borrow_mut(|buffer| {
        let size = job.rows * job.heads * seen;
        if buffer.len() < size {
            buffer.resize(size, 0.0);
        }
        let scores = &mut buffer[..size];
        let first = job.row + job.r0;
        if job.rows == 1 {
            // SAFETY: the output row's heads `h..h + heads` are this job's (the caller's
            // promise): `heads · hd` values at their place in the step's [rows][nh][hd]
            // buffer.
            let n = job.heads * hd;
            let out = unsafe { std::slice::from_raw_parts_mut(out.at((first * nh + job.h) * hd), n) };
            let q = &q[(first * nh + job.h) * hd..][..n];
            let shape = (job.heads, nkv * hd, seen, scale);
            crate::cpu::decode_attention(q, &kc[kv * hd..], &vc[kv * hd..], shape, scores, out);
            return;
        }
        // SAFETY: q holds the step's [rows][nh][hd] queries, kw and vw the cache's
        // [positions][nkv][hd] keys and values widened to f32 (at least `seen` positions:
        // this step's were appended before attention); scores is rows × seen; the output
        // rows are this job's (the caller's promise).
        unsafe {
            crate::cpu::product(
                (job.rows, seen, hd),
                View::rows(scores.as_mut_ptr(), seen),
                false,
                View::rows(q[(first * nh + job.h) * hd..].as_ptr(), nh * hd),
                View::transposed(kw[kv * hd..].as_ptr(), nkv * hd),
                scale,
                gemm::Parallelism::None,
            );
            for (r, row) in scores.chunks_exact_mut(seen).enumerate() {
                let visible = job.pos + job.r0 + r + 1;
                crate::cpu::softmax(&mut row[..visible]);
                row[visible..].fill(0.0);
            }
            crate::cpu::product(
                (job.rows, hd, seen),
                View::rows(out.at((first * nh + job.h) * hd), nh * hd),
                false,
                View::rows(scores.as_ptr(), seen),
                View::rows(vw[kv * hd..].as_ptr(), nkv * hd),
                1.0,
                gemm::Parallelism::None,
            );
        }
    });
}
