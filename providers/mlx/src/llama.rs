//! A llama-architecture decoder from a GGUF file on MLX, kiln's
//! [`Generator`](kiln_core::Generator).
//!
//! The file's quantized matrices go to MLX's quantized matmul as they are: GGUF's Q4_1
//! block (32 weights, `x = d q + m`) *is* MLX's 4-bit affine group of 32 (scale `d`,
//! bias `m`), Q4_0 is the same with bias `-8d`, and Q8_0 is MLX's 8-bit group with the
//! codes shifted by 128 (bias `-128 d`): only the bits are re-packed, the weights stay
//! exactly the file's. Activations stay at the model's dtype (f32 on the CPU by
//! default), so nothing else is rounded on the way. On the CPU the matrices are
//! dequantized at load instead (the same values, dense): MLX's CPU backend multiplies
//! by quantized matrices with scalar loops, its dense matmul goes through BLAS.
//!
//! A step is one lazy MLX graph: every sequence's new tokens are rows of one matrix for
//! the projections and the MLP; attention runs per sequence over its own KV cache
//! (MLX arrays `[1, kv_heads, capacity, head_dim]` grown 256 tokens at a time and
//! written in place with `slice_update`), with MLX's fused kernels for RMS norm, rotary
//! embeddings and scaled-dot-product attention. The logits and the updated caches are
//! evaluated together.

use std::path::Path;

use half::f16;
use kiln_core::gguf::{GgmlType, Gguf, LlamaShape};
use kiln_core::{DType, Device, Error, GeneratorInfo, Result, SequenceCache, StepItem};

use crate::array::{self, Array, Unary};

/// Tokens a cache grows by.
const CACHE_CHUNK: usize = 256;

/// `x @ W^T`.
enum Linear {
    /// MLX's groupwise affine quantization, group 32.
    Quantized { weight: Array, scales: Array, biases: Array, bits: usize },
    /// A dense matrix, kept transposed (`[k, n]`).
    Dense { weight_t: Array },
}

impl Linear {
    fn forward(&self, x: &Array) -> Result<Array> {
        match self {
            Linear::Quantized { weight, scales, biases, bits } => {
                x.quantized_matmul(weight, scales, biases, 32, *bits)
            }
            Linear::Dense { weight_t } => x.matmul(weight_t),
        }
    }

    fn arrays(&self) -> Vec<&Array> {
        match self {
            Linear::Quantized { weight, scales, biases, .. } => vec![weight, scales, biases],
            Linear::Dense { weight_t } => vec![weight_t],
        }
    }
}

struct Layer {
    attn_norm: Array,
    ffn_norm: Array,
    wq: Linear,
    wk: Linear,
    wv: Linear,
    wo: Linear,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// A loaded decoder.
pub struct Llama {
    embed: Array,
    layers: Vec<Layer>,
    norm: Array,
    output: Linear,
    shape: LlamaShape,
    head_dim: usize,
    dtype: DType,
    device: Option<usize>,
    /// What the runtime needs to know.
    pub info: GeneratorInfo,
}

/// A sequence's keys and values on the device, per layer.
pub struct MlxCache {
    layers: Vec<(Array, Array)>,
    len: usize,
    capacity: usize,
    bytes_per_token: u64,
}

impl SequenceCache for MlxCache {
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

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// GGUF blocks of `n` rows of `k` as MLX's packed codes (`[n, k * bits / 8]` bytes),
/// scales and biases (`[n, k / 32]` each, f32), and the bit width.
/// Packed codes, scales, biases and the bit width of a quantized matrix.
struct Packed {
    codes: Vec<u8>,
    scales: Vec<f32>,
    biases: Vec<f32>,
    bits: usize,
}

fn repack(kind: GgmlType, data: &[u8], n: usize, k: usize) -> Option<Packed> {
    let blocks = n * k / 32;
    let (mut scales, mut biases) = (Vec::with_capacity(blocks), Vec::with_capacity(blocks));
    match kind {
        GgmlType::Q4_0 | GgmlType::Q4_1 => {
            let size = if kind == GgmlType::Q4_1 { 20 } else { 18 };
            let mut codes = Vec::with_capacity(blocks * 16);
            for block in data.chunks_exact(size) {
                let d = f16_at(block, 0);
                let (bias, qs) = if kind == GgmlType::Q4_1 {
                    (f16_at(block, 2), &block[4..20])
                } else {
                    (-8.0 * d, &block[2..18])
                };
                scales.push(d);
                biases.push(bias);
                // GGUF: byte j holds weights j (low nibble) and j + 16 (high). MLX: byte i
                // holds weights 2i (low) and 2i + 1 (high).
                let q = |e: usize| if e < 16 { qs[e] & 0x0f } else { qs[e - 16] >> 4 };
                codes.extend((0..16).map(|i| q(2 * i) | (q(2 * i + 1) << 4)));
            }
            Some(Packed { codes, scales, biases, bits: 4 })
        }
        GgmlType::Q8_0 => {
            let mut codes = Vec::with_capacity(blocks * 32);
            for block in data.chunks_exact(34) {
                let d = f16_at(block, 0);
                scales.push(d);
                biases.push(-128.0 * d);
                codes.extend(block[2..34].iter().map(|&q| (q as i8 as i16 + 128) as u8));
            }
            Some(Packed { codes, scales, biases, bits: 8 })
        }
        _ => None,
    }
}

/// A GGUF tensor as f32 values (dequantized).
fn dense(kind: GgmlType, data: &[u8], elements: usize) -> Option<Vec<f32>> {
    match kind {
        GgmlType::F32 => {
            Some(data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
        }
        GgmlType::F16 => {
            Some(data.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect())
        }
        _ => {
            let k = 32;
            let Packed { codes, scales, biases, bits } = repack(kind, data, elements / k, k)?;
            let per_byte = 8 / bits;
            let mut out = Vec::with_capacity(elements);
            for (g, (s, b)) in scales.iter().zip(&biases).enumerate() {
                let group = &codes[g * 32 / per_byte..(g + 1) * 32 / per_byte];
                for e in 0..32 {
                    let q = if bits == 8 { group[e] } else { (group[e / 2] >> (4 * (e % 2))) & 0x0f };
                    out.push(s * q as f32 + b);
                }
            }
            Some(out)
        }
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Reads the tensors of one file onto the device.
struct Loader<'a> {
    gguf: &'a Gguf,
    path: &'a Path,
    dtype: DType,
    /// Matrices dequantized to the model's dtype (the CPU: see [`Llama::load`]).
    dense_matrices: bool,
}

impl Loader<'_> {
    fn unsupported(&self, name: &str, kind: GgmlType) -> Error {
        Error::Unsupported(format!(
            "{}: tensor `{name}` is {}; the MLX provider reads q4_0, q4_1, q8_0, f16 and f32 GGUF tensors",
            self.path.display(),
            kind.name()
        ))
    }

    /// A 1-D or 2-D tensor, dense at the model's dtype.
    fn dense(&self, name: &str) -> Result<Array> {
        let info = self.gguf.tensor(name)?;
        let values = dense(info.kind, &self.gguf.read(name)?, info.elements())
            .ok_or_else(|| self.unsupported(name, info.kind))?;
        let shape: Vec<usize> = info.dims.iter().rev().copied().collect();
        Array::from_bytes(&f32_bytes(&values), DType::F32, &shape)?.astype(self.dtype)
    }

    /// A matrix of `n` rows of `k` (GGUF rows are output channels).
    fn linear(&self, name: &str) -> Result<Linear> {
        let info = self.gguf.tensor(name)?;
        let [k, n] = info.dims[..] else {
            return Err(Error::model_load(self.path, format!("`{name}` is {:?}, not a matrix", info.dims)));
        };
        if self.dense_matrices || matches!(info.kind, GgmlType::F32 | GgmlType::F16) {
            return Ok(Linear::Dense { weight_t: self.dense(name)?.transpose(&[1, 0])? });
        }
        let data = self.gguf.read(name)?;
        let Packed { codes, scales, biases, bits } =
            repack(info.kind, &data, n, k).ok_or_else(|| self.unsupported(name, info.kind))?;
        let groups = k / 32;
        Ok(Linear::Quantized {
            weight: Array::from_bytes(&codes, DType::U8, &[n, k * bits / 8])?.view_u32()?,
            scales: Array::from_bytes(&f32_bytes(&scales), DType::F32, &[n, groups])?.astype(self.dtype)?,
            biases: Array::from_bytes(&f32_bytes(&biases), DType::F32, &[n, groups])?.astype(self.dtype)?,
            bits,
        })
    }
}

impl Llama {
    /// Reads `path` onto MLX's `device` (`None`: the CPU) at `dtype`.
    /// `dense_matrices`: dequantize the matrices at load (see the module docs).
    pub fn load(
        path: &Path,
        device: Option<usize>,
        kiln_device: Device,
        dtype: DType,
        dense_matrices: bool,
    ) -> Result<Llama> {
        array::set_device(device)?;
        let gguf = Gguf::open(path)?;
        let shape = gguf.llama()?;
        let mut info = gguf.generator_info(crate::NAME, kiln_device, dtype.size())?;
        let loader = Loader { gguf: &gguf, path, dtype, dense_matrices };
        let mut layers = Vec::with_capacity(shape.blocks);
        for i in 0..shape.blocks {
            let name = |n: &str| format!("blk.{i}.{n}.weight");
            layers.push(Layer {
                attn_norm: loader.dense(&name("attn_norm"))?,
                ffn_norm: loader.dense(&name("ffn_norm"))?,
                wq: loader.linear(&name("attn_q"))?,
                wk: loader.linear(&name("attn_k"))?,
                wv: loader.linear(&name("attn_v"))?,
                wo: loader.linear(&name("attn_output"))?,
                gate: loader.linear(&name("ffn_gate"))?,
                up: loader.linear(&name("ffn_up"))?,
                down: loader.linear(&name("ffn_down"))?,
            });
        }
        let embed = loader.dense("token_embd.weight")?;
        let output = match gguf.tensors.contains_key("output.weight") {
            true => loader.linear("output.weight")?,
            // Tied embeddings: the output projection is the embedding table (the same
            // array when the matrices are dense).
            false if dense_matrices => Linear::Dense { weight_t: embed.transpose(&[1, 0])? },
            false => loader.linear("token_embd.weight")?,
        };
        let norm = loader.dense("output_norm.weight")?;
        let mut all: Vec<&Array> = vec![&embed, &norm];
        all.extend(output.arrays());
        for l in &layers {
            all.extend([&l.attn_norm, &l.ffn_norm]);
            for lin in [&l.wq, &l.wk, &l.wv, &l.wo, &l.gate, &l.up, &l.down] {
                all.extend(lin.arrays());
            }
        }
        array::eval(&all)?;
        let file_type = gguf.tensor("blk.0.attn_q.weight").map(|t| t.kind.name()).unwrap_or_default();
        info.quantization = match dense_matrices {
            true => format!("{file_type} dequantized to {dtype} at load (MLX's BLAS on the cpu)"),
            false => format!("{file_type} as in the file (MLX quantized matmul, {dtype} activations)"),
        };
        let head_dim = shape.width / shape.heads;
        Ok(Llama { embed, layers, norm, output, shape, head_dim, dtype, device, info })
    }

    /// An empty cache.
    pub fn new_cache(&self) -> MlxCache {
        MlxCache { layers: Vec::new(), len: 0, capacity: 0, bytes_per_token: self.info.kv_bytes_per_token }
    }

    /// Makes room for `need` tokens, copying what the cache holds into larger buffers.
    fn reserve(&self, cache: &mut MlxCache, need: usize) -> Result<()> {
        if need <= cache.capacity {
            return Ok(());
        }
        let capacity = need.div_ceil(CACHE_CHUNK) * CACHE_CHUNK;
        let (kv, hd) = (self.shape.kv_heads, self.head_dim);
        let grown = |old: Option<&Array>| -> Result<Array> {
            let fresh = Array::zeros(&[1, kv, capacity, hd], self.dtype)?;
            match old {
                Some(old) if cache.len > 0 => {
                    let held = old.slice(&[0, 0, 0, 0], &[1, kv as i32, cache.len as i32, hd as i32])?;
                    fresh.slice_update(&held, &[0, 0, 0, 0], &[1, kv as i32, cache.len as i32, hd as i32])
                }
                _ => Ok(fresh),
            }
        };
        let layers = (0..self.layers.len())
            .map(|l| {
                let old = cache.layers.get(l);
                Ok((grown(old.map(|o| &o.0))?, grown(old.map(|o| &o.1))?))
            })
            .collect::<Result<Vec<_>>>()?;
        cache.layers = layers;
        cache.capacity = capacity;
        Ok(())
    }

    /// One ragged step: see the module docs.
    pub fn step(&self, batch: &mut [StepItem<'_>]) -> Result<Vec<Vec<f32>>> {
        array::set_device(self.device)?;
        let mut caches: Vec<&mut MlxCache> = Vec::with_capacity(batch.len());
        let mut ids: Vec<i32> = Vec::new();
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
                .downcast_mut::<MlxCache>()
                .ok_or_else(|| Error::InvalidInput("a sequence cache from another generator".into()))?;
            if cache.len + item.tokens.len() > self.info.context_length {
                return Err(Error::InvalidInput(format!(
                    "{} tokens would exceed the context of {}",
                    cache.len + item.tokens.len(),
                    self.info.context_length
                )));
            }
            spans.push((ids.len(), item.tokens.len(), cache.len));
            ids.extend(item.tokens.iter().map(|&t| t as i32));
            caches.push(cache);
        }
        for (cache, &(_, t, pos)) in caches.iter_mut().zip(&spans) {
            self.reserve(cache, pos + t)?;
        }
        let logits = self.forward(&ids, &spans, &mut caches)?;
        let mut pending: Vec<&Array> = vec![&logits];
        for cache in &caches {
            pending.extend(cache.layers.iter().flat_map(|(k, v)| [k, v]));
        }
        array::eval(&pending)?;
        let values = logits.to_f32()?;
        for (cache, &(_, t, _)) in caches.iter_mut().zip(&spans) {
            cache.len += t;
        }
        let vocab = values.len() / spans.len().max(1);
        Ok(values.chunks(vocab).map(<[f32]>::to_vec).collect())
    }

    /// The lazy graph of a step; the caches get their new keys and values.
    fn forward(
        &self,
        ids: &[i32],
        spans: &[(usize, usize, usize)],
        caches: &mut [&mut MlxCache],
    ) -> Result<Array> {
        let (nh, nkv, hd) = (self.shape.heads as i32, self.shape.kv_heads as i32, self.head_dim as i32);
        let (eps, base) = (self.shape.eps, self.shape.rope_base);
        let scale = 1.0 / (self.head_dim as f32).sqrt();
        let bytes: Vec<u8> = ids.iter().flat_map(|i| i.to_le_bytes()).collect();
        let mut x = self.embed.embedding(&Array::from_bytes(&bytes, DType::I32, &[ids.len()])?)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let h = x.rms_norm(&layer.attn_norm, eps)?;
            let (q, k, v) = (layer.wq.forward(&h)?, layer.wk.forward(&h)?, layer.wv.forward(&h)?);
            let mut outs = Vec::with_capacity(spans.len());
            for (&(row, t, pos), cache) in spans.iter().zip(caches.iter_mut()) {
                let (r0, r1, ti, p0, p1) =
                    (row as i32, (row + t) as i32, t as i32, pos as i32, (pos + t) as i32);
                let heads = |a: &Array, n: i32| -> Result<Array> {
                    a.slice(&[r0, 0], &[r1, n * hd])?.reshape(&[1, ti, n, hd])?.transpose(&[0, 2, 1, 3])
                };
                let qs = heads(&q, nh)?.rope(self.head_dim, base, pos)?;
                let ks = heads(&k, nkv)?.rope(self.head_dim, base, pos)?;
                let vs = heads(&v, nkv)?;
                let (kc, vc) = &mut cache.layers[l];
                *kc = kc.slice_update(&ks, &[0, 0, p0, 0], &[1, nkv, p1, hd])?;
                *vc = vc.slice_update(&vs, &[0, 0, p0, 0], &[1, nkv, p1, hd])?;
                let keys = kc.slice(&[0, 0, 0, 0], &[1, nkv, p1, hd])?;
                let values = vc.slice(&[0, 0, 0, 0], &[1, nkv, p1, hd])?;
                let o = if t == 1 {
                    qs.attention(&keys, &values, scale, None)?
                } else {
                    qs.causal_attention(&keys, &values, scale)?
                };
                outs.push(o.transpose(&[0, 2, 1, 3])?.reshape(&[ti, nh * hd])?);
            }
            let attn = if outs.len() == 1 {
                outs.pop().expect("one output")
            } else {
                Array::concat(&outs.iter().collect::<Vec<_>>(), 0)?
            };
            x = x.add(&layer.wo.forward(&attn)?)?;
            let h = x.rms_norm(&layer.ffn_norm, eps)?;
            let gate = layer.gate.forward(&h)?;
            let act = gate.mul(&gate.unary(Unary::Sigmoid)?)?.mul(&layer.up.forward(&h)?)?;
            x = x.add(&layer.down.forward(&act)?)?;
        }
        // Only each sequence's last position is sampled from.
        let last: Vec<u8> =
            spans.iter().flat_map(|&(row, t, _)| ((row + t - 1) as i32).to_le_bytes()).collect();
        let rows = x.embedding(&Array::from_bytes(&last, DType::I32, &[spans.len()])?)?;
        self.output.forward(&rows.rms_norm(&self.norm, eps)?)?.astype(DType::F32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repacked_blocks_dequantize_to_the_gguf_values() {
        // One Q4_1 block: d = 0.5, m = -1, weights j -> (j * 7) % 16.
        let mut block = f16::from_f32(0.5).to_le_bytes().to_vec();
        block.extend(f16::from_f32(-1.0).to_le_bytes());
        let q: Vec<u8> = (0..32).map(|j| (j * 7 % 16) as u8).collect();
        block.extend((0..16).map(|j| q[j] | (q[j + 16] << 4)));
        let values = dense(GgmlType::Q4_1, &block, 32).unwrap();
        let expected: Vec<f32> = q.iter().map(|&q| 0.5 * q as f32 - 1.0).collect();
        assert_eq!(values, expected);
        // Q8_0: d = 0.25, q = j - 16.
        let mut block = f16::from_f32(0.25).to_le_bytes().to_vec();
        block.extend((0..32).map(|j| (j as i8 - 16) as u8));
        let values = dense(GgmlType::Q8_0, &block, 32).unwrap();
        assert_eq!(values, (0..32).map(|j| 0.25 * (j as f32 - 16.0)).collect::<Vec<_>>());
        // Q4_0: d = 2, q = j % 16 -> 2 (q - 8).
        let mut block = f16::from_f32(2.0).to_le_bytes().to_vec();
        block.extend((0..16).map(|j| j as u8 | ((j as u8) << 4)));
        let values = dense(GgmlType::Q4_0, &block, 32).unwrap();
        assert_eq!(values, (0..32).map(|j| 2.0 * ((j % 16) as f32 - 8.0)).collect::<Vec<_>>());
        assert!(dense(GgmlType::Other(14), &block, 32).is_none());
    }
}
