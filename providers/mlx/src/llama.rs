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
//! the projections and the MLP; the keys and values live in buffers shared by all
//! sequences, a slot each (`kv.rs`): a lone sequence attends on its own, prompts of
//! similar lengths attend together in one padded SDPA with a causal mask each
//! (`prompts.rs`), and the sequences that add one token attend together — one scatter of
//! their new keys, one batched SDPA with a length mask per row — so the host builds the
//! same few ops per layer whatever the batch. MLX's fused kernels do RMS norm, rotary embeddings and
//! attention. The logits and the updated buffers are evaluated together; a greedy
//! sequence's token is picked there too (`step_next`), so only its id comes to the host.

use std::path::Path;

use half::f16;
use kiln_core::gguf::{GgmlType, Gguf, LlamaShape};
use kiln_core::{DType, Device, Error, Generator, GeneratorInfo, Next, Result, SequenceCache, StepItem};

use crate::array::{self, Array};

mod kv;
mod prompts;
pub use kv::MlxCache;
use kv::{Ahead, Geometry, SharedPool};

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
    pool: SharedPool,
    /// Whether `step_next` picks greedy items' tokens on the device
    /// (`provider.options.greedy_on_device`; on after `load`).
    pub greedy_on_device: bool,
    /// Whether a step of greedy sequences also queues the next decode step on the
    /// device before returning (`provider.options.decode_ahead`; off after `load`).
    pub decode_ahead: bool,
    /// What the runtime needs to know.
    pub info: GeneratorInfo,
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
        Array::from_f32(&values, &shape)?.astype(self.dtype)
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
            scales: Array::from_f32(&scales, &[n, groups])?.astype(self.dtype)?,
            biases: Array::from_f32(&biases, &[n, groups])?.astype(self.dtype)?,
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
        Ok(Llama {
            embed,
            layers,
            norm,
            output,
            shape,
            head_dim,
            dtype,
            device,
            pool: SharedPool::default(),
            greedy_on_device: true,
            decode_ahead: false,
            info,
        })
    }
}

impl Generator for Llama {
    fn info(&self) -> &GeneratorInfo {
        &self.info
    }

    /// An empty cache (a slot in the shared buffers).
    fn new_sequence(&self) -> Result<Box<dyn SequenceCache>> {
        let mut pool = kv::lock(&self.pool);
        let (slot, epoch) = (pool.acquire(), pool.epoch);
        Ok(Box::new(MlxCache {
            slot,
            serial: kv::serial(),
            len: 0,
            bytes_per_token: self.info.kv_bytes_per_token,
            pool: self.pool.clone(),
            epoch,
        }))
    }

    /// One ragged step: see the module docs.
    fn step(&self, batch: &mut [StepItem<'_>]) -> Result<Vec<Vec<f32>>> {
        self.stepped(batch, false)?.into_iter().map(Next::into_logits).collect()
    }

    /// The step, with the greedy items' tokens picked on the device: only their ids
    /// come back to the host, not their rows of logits.
    fn step_next(&self, batch: &mut [StepItem<'_>]) -> Result<Vec<Next>> {
        self.stepped(batch, self.greedy_on_device)
    }
}

impl Llama {
    /// A step; where `pick` is set, the items marked greedy get their token alone (the
    /// argmax of their logits, evaluated with the rest of the step).
    ///
    /// With `decode_ahead`, the step also queues the next one: each greedy item fed the
    /// token just picked for it, built on the device's not yet computed argmax and queued
    /// before this step's tokens are read, so the device runs step n + 1 while the host
    /// hands out step n's tokens and the runtime comes back (mlx-lm's `async_eval`
    /// pattern). The next call takes the queued step's tokens for every item it finds
    /// there — same sequence, position and token — and runs the rest (prompts joining,
    /// sampled items) as usual. A queued row whose sequence ended or changed is left
    /// unused: its keys and values sit past its sequence's length, where nothing reads
    /// before writing.
    fn stepped(&self, batch: &mut [StepItem<'_>], pick: bool) -> Result<Vec<Next>> {
        array::set_device(self.device)?;
        let greedy: Vec<bool> = batch.iter().map(|item| pick && item.greedy).collect();
        let tokens: Vec<&[u32]> = batch.iter().map(|item| item.tokens).collect();
        let n = batch.len();
        let mut caches: Vec<&mut MlxCache> = Vec::with_capacity(batch.len());
        for item in batch.iter_mut() {
            let cache = item
                .cache
                .as_any_mut()
                .downcast_mut::<MlxCache>()
                .filter(|c| std::sync::Arc::ptr_eq(&c.pool, &self.pool))
                .ok_or_else(|| Error::InvalidInput("a sequence cache from another generator".into()))?;
            self.info.check_step(item.tokens, cache.len)?;
            caches.push(cache);
        }
        let mut pool = kv::lock(&self.pool);
        if caches.iter().any(|c| c.len > 0 && c.epoch != pool.epoch) {
            return Err(Error::InvalidInput(
                "a sequence whose keys were lost when an earlier step failed; start it again".into(),
            ));
        }
        // Taken out whatever happens: a queued step serves only the call after it.
        let ahead = pool.ahead.take();
        // Per item, its row in the queued step, if that step ran it.
        let found: Vec<Option<usize>> = (0..n)
            .map(|i| {
                let rows = &ahead.as_ref()?.rows;
                let key = (caches[i].serial, caches[i].len, *tokens[i].first()?);
                (greedy[i] && tokens[i].len() == 1).then(|| rows.iter().position(|r| *r == key))?
            })
            .collect();
        // The items this call runs, in order, and their spans of the step's rows.
        let todo: Vec<usize> = (0..n).filter(|&i| found[i].is_none()).collect();
        let mut ids: Vec<i32> = Vec::new();
        let mut spans = Vec::with_capacity(todo.len());
        for &i in &todo {
            spans.push(Span {
                row: ids.len(),
                tokens: tokens[i].len(),
                pos: caches[i].len,
                slot: caches[i].slot,
            });
            ids.extend(tokens[i].iter().map(|&t| t as i32));
        }
        // The next step's items: the greedy ones with room for one more token.
        let next: Vec<usize> = match self.decode_ahead {
            true => (0..n)
                .filter(|&i| greedy[i] && self.info.check_step(&[0], caches[i].len + tokens[i].len()).is_ok())
                .collect(),
            false => Vec::new(),
        };
        let geometry = Geometry {
            layers: self.layers.len(),
            kv_heads: self.shape.kv_heads,
            head_dim: self.head_dim,
            dtype: self.dtype,
        };
        // Of the items run here, the ones whose logits go to the host.
        let wanted: Vec<i32> = (0..todo.len()).filter(|&k| !greedy[todo[k]]).map(|k| k as i32).collect();
        let any_picked = todo.iter().any(|&i| greedy[i]);
        let run = |pool: &mut kv::Pool| -> Result<(Option<Array>, Option<Array>, Option<Array>)> {
            let (mut picked, mut rows) = (None, None);
            if !todo.is_empty() {
                reserve(pool, &spans, &geometry)?;
                let logits = self.forward(&Array::from_i32(&ids)?, &spans, &mut pool.layers)?;
                picked = any_picked.then(|| logits.argmax(-1)).transpose()?;
                rows = match wanted.len() {
                    0 => None,
                    n if n == todo.len() => Some(logits),
                    _ => Some(logits.take(&Array::from_i32(&wanted)?, 0)?),
                };
            }
            let queued = match next.is_empty() {
                true => None,
                false => {
                    let fed = self.fed_tokens(&next, &found, &todo, ahead.as_ref(), picked.as_ref())?;
                    let spans: Vec<Span> = next
                        .iter()
                        .enumerate()
                        .map(|(row, &i)| Span {
                            row,
                            tokens: 1,
                            pos: caches[i].len + tokens[i].len(),
                            slot: caches[i].slot,
                        })
                        .collect();
                    reserve(pool, &spans, &geometry)?;
                    let queued = self.forward(&fed, &spans, &mut pool.layers)?.argmax(-1)?;
                    let mut pending = vec![&queued];
                    pending.extend(pool.layers.iter().flat_map(|(k, v)| [k, v]));
                    array::async_eval(&pending)?;
                    Some(queued)
                }
            };
            let mut pending: Vec<&Array> = picked.iter().chain(&rows).collect();
            if queued.is_none() {
                pending.extend(pool.layers.iter().flat_map(|(k, v)| [k, v]));
            }
            pending.extend(ahead.as_ref().map(|a| &a.tokens));
            array::eval(&pending)?;
            Ok((picked, rows, queued))
        };
        let (picked, rows, queued) = run(&mut pool).inspect_err(|_| pool.discard())?;
        let picked = picked.map(|t| t.to_u32()).transpose()?.unwrap_or_default();
        let values = rows.map(|r| r.to_f32()).transpose()?.unwrap_or_default();
        let earlier = match found.iter().any(Option::is_some) {
            true => ahead.as_ref().map(|a| a.tokens.to_u32()).transpose()?.unwrap_or_default(),
            false => Vec::new(),
        };
        let mut logits = values.chunks((values.len() / wanted.len().max(1)).max(1));
        // `todo` is in the batch's order: the k-th item run here is the k-th without a row.
        let mut run_here = 0..;
        let out: Vec<Next> = (0..n)
            .map(|i| match found[i] {
                Some(row) => Next::Token(earlier[row]),
                None => {
                    let k = run_here.next().expect("an endless range");
                    match greedy[i] {
                        true => Next::Token(picked[k]),
                        false => {
                            Next::Logits(logits.next().expect("a row per item asking for logits").to_vec())
                        }
                    }
                }
            })
            .collect();
        if let Some(queued) = queued {
            let rows = next
                .iter()
                .map(|&i| {
                    let Next::Token(t) = out[i] else { unreachable!("only greedy items are queued") };
                    (caches[i].serial, caches[i].len + tokens[i].len(), t)
                })
                .collect();
            pool.ahead = Some(Ahead { rows, tokens: queued });
        }
        let epoch = pool.epoch;
        drop(pool);
        for (cache, item) in caches.iter_mut().zip(&tokens) {
            cache.len += item.len();
            cache.epoch = epoch;
        }
        Ok(out)
    }

    /// The tokens fed to the queued step's rows (`next`, items of the batch), on the
    /// device: each picked either by the step queued before (`found`) or by this one
    /// (`picked`, one per greedy item of `todo`), gathered into the rows' order.
    fn fed_tokens(
        &self,
        next: &[usize],
        found: &[Option<usize>],
        todo: &[usize],
        ahead: Option<&Ahead>,
        picked: Option<&Array>,
    ) -> Result<Array> {
        let earlier = ahead.map_or(0, |a| a.rows.len());
        // `picked` has a row per item run here, in `todo`'s order.
        let index: Vec<i32> = next
            .iter()
            .map(|&i| match found[i] {
                Some(row) => row as i32,
                None => (earlier + todo.iter().position(|&j| j == i).expect("an item run here")) as i32,
            })
            .collect();
        let sources: Vec<&Array> = ahead.map(|a| &a.tokens).into_iter().chain(picked).collect();
        let all = match sources.len() {
            1 => sources[0].share()?,
            _ => Array::concat(&sources, 0)?,
        };
        let whole = all.shape()[0];
        match index.len() == whole && index.iter().enumerate().all(|(k, &r)| k as i32 == r) {
            true => Ok(all),
            false => all.take(&Array::from_i32(&index)?, 0),
        }
    }

    /// The lazy graph of a step; `kv` (per layer, the shared key and value buffers)
    /// gets the new keys and values. Prompts (several tokens) attend one by one;
    /// single tokens all at once, over their slots, with a length mask per row.
    fn forward(&self, ids: &Array, spans: &[Span], kv: &mut [(Array, Array)]) -> Result<Array> {
        let (nh, nkv, hd) = (self.shape.heads as i32, self.shape.kv_heads as i32, self.head_dim as i32);
        let (eps, base) = (self.shape.eps, self.shape.rope_base);
        let scale = 1.0 / (self.head_dim as f32).sqrt();
        let mut x = self.embed.embedding(ids)?;
        // A lone sequence attends on its own even for one token: a slice of its slot is
        // cheaper than the gather and mask of the batched path (3 against 5 ms a step
        // on the H200).
        let alone = spans.len() == 1;
        let (prompts, singles): (Vec<&Span>, Vec<&Span>) = spans.iter().partition(|s| alone || s.tokens > 1);
        // The decode rows, their slots and positions, and the mask of each row's length.
        let decode = match singles.is_empty() {
            true => None,
            false => {
                let longest = singles.iter().map(|s| s.pos + 1).max().unwrap_or(1);
                let mut mask = Vec::with_capacity(singles.len() * longest);
                for s in &singles {
                    mask.extend((0..longest).map(|j| if j <= s.pos { 0f32 } else { f32::NEG_INFINITY }));
                }
                let mask = Array::from_f32(&mask, &[singles.len(), 1, 1, longest])?.astype(self.dtype)?;
                let field =
                    |f: fn(&Span) -> usize| -> Vec<i32> { singles.iter().map(|s| f(s) as i32).collect() };
                let in_order = prompts.is_empty();
                let rows = field(|s| s.row);
                Some(Decode {
                    rows: kv::Rows::new(
                        (!in_order).then_some(&rows[..]),
                        &field(|s| s.slot),
                        &field(|s| s.pos),
                    )?,
                    mask,
                    longest: longest as i32,
                    n: singles.len() as i32,
                })
            }
        };
        // Prompts of similar lengths attend together (`prompts.rs`), the rest one by one.
        let prompts::Plan { batched, grouped: in_groups, separate } = match alone {
            true => prompts::Plan { batched: None, grouped: Vec::new(), separate: prompts },
            false => prompts::plan(&prompts, self.dtype)?,
        };
        let heads = kv::Heads { q: nh, kv: nkv, dim: hd };
        // The attention output comes out as the separate prompts, the grouped ones, then
        // the decode rows; this puts the rows back in the step's order.
        let grouped: Vec<usize> =
            separate.iter().chain(&in_groups).chain(&singles).flat_map(|s| s.row..s.row + s.tokens).collect();
        let reorder = match grouped.iter().enumerate().all(|(at, &row)| at == row) {
            true => None,
            false => {
                let mut back = vec![0i32; grouped.len()];
                for (at, &row) in grouped.iter().enumerate() {
                    back[row] = at as i32;
                }
                Some(Array::from_i32(&back)?)
            }
        };
        for (layer, (kbuf, vbuf)) in self.layers.iter().zip(kv.iter_mut()) {
            let h = x.rms_norm(&layer.attn_norm, eps)?;
            let (q, k, v) = (layer.wq.forward(&h)?, layer.wk.forward(&h)?, layer.wv.forward(&h)?);
            let mut pieces = Vec::with_capacity(separate.len() + 2);
            for s in &separate {
                let (r0, r1, t) = (s.row as i32, (s.row + s.tokens) as i32, s.tokens as i32);
                let (p0, p1, slot) = (s.pos as i32, (s.pos + s.tokens) as i32, s.slot as i32);
                let heads = |a: &Array, n: i32| -> Result<Array> {
                    a.slice(&[r0, 0], &[r1, n * hd])?.reshape(&[1, t, n, hd])?.transpose(&[0, 2, 1, 3])
                };
                let qs = heads(&q, nh)?.rope(self.head_dim, base, s.pos)?;
                let ks = heads(&k, nkv)?.rope(self.head_dim, base, s.pos)?;
                *kbuf = kbuf.slice_update(&ks, &[slot, 0, p0, 0], &[slot + 1, nkv, p1, hd])?;
                *vbuf = vbuf.slice_update(&heads(&v, nkv)?, &[slot, 0, p0, 0], &[slot + 1, nkv, p1, hd])?;
                let keys = kbuf.slice(&[slot, 0, 0, 0], &[slot + 1, nkv, p1, hd])?;
                let values = vbuf.slice(&[slot, 0, 0, 0], &[slot + 1, nkv, p1, hd])?;
                let o = match s.tokens {
                    1 => qs.attention(&keys, &values, scale, None)?,
                    _ => qs.causal_attention(&keys, &values, scale)?,
                };
                pieces.push(o.transpose(&[0, 2, 1, 3])?.reshape(&[t, nh * hd])?);
            }
            if let Some(b) = &batched {
                b.attend((&q, &k, &v), (&mut *kbuf, &mut *vbuf), heads, base, scale, &mut pieces)?;
            }
            if let Some(d) = &decode {
                let qs = d.rows.store((&q, &k, &v), (&mut *kbuf, &mut *vbuf), heads, base)?;
                let slots = &d.rows.slots;
                let (keys, values) =
                    (kv::gather(kbuf, slots, d.longest)?, kv::gather(vbuf, slots, d.longest)?);
                let o = qs.attention(&keys, &values, scale, Some(&d.mask))?;
                pieces.push(o.transpose(&[0, 2, 1, 3])?.reshape(&[d.n, nh * hd])?);
            }
            let mut attn = match pieces.len() {
                1 => pieces.pop().expect("one piece"),
                _ => Array::concat(&pieces.iter().collect::<Vec<_>>(), 0)?,
            };
            if let Some(back) = &reorder {
                attn = attn.take(back, 0)?;
            }
            x = x.add(&layer.wo.forward(&attn)?)?;
            let h = x.rms_norm(&layer.ffn_norm, eps)?;
            let gate = layer.gate.forward(&h)?;
            let act = gate.swiglu(&layer.up.forward(&h)?)?;
            x = x.add(&layer.down.forward(&act)?)?;
        }
        // Only each sequence's last position is sampled from.
        let last: Vec<i32> = spans.iter().map(|s| (s.row + s.tokens - 1) as i32).collect();
        let rows = x.embedding(&Array::from_i32(&last)?)?;
        self.output.forward(&rows.rms_norm(&self.norm, eps)?)?.astype(DType::F32)
    }
}

/// Room in the pool's buffers for every span's slot and tokens.
fn reserve(pool: &mut kv::Pool, spans: &[Span], geometry: &Geometry) -> Result<()> {
    let slots = spans.iter().map(|s| s.slot + 1).max().unwrap_or(0);
    let length = spans.iter().map(|s| s.pos + s.tokens).max().unwrap_or(0);
    pool.reserve(slots, length, geometry)
}

/// A sequence's part of a step: its first row, its new tokens, the position of the
/// first, and its slot in the KV buffers.
struct Span {
    row: usize,
    tokens: usize,
    pos: usize,
    slot: usize,
}

/// The single-token rows of a step, attended together.
struct Decode {
    /// Their rows in the step, each at its sequence's slot and position.
    rows: kv::Rows,
    /// `[n, 1, 1, longest]`: 0 up to each row's position, -inf after.
    mask: Array,
    longest: i32,
    n: i32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::argmax;

    /// The real SmolLM2 file, its matrices dequantized (the CPU's default).
    fn smollm() -> Llama {
        let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../.kiln/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
        assert!(
            path.is_file(),
            "{} is missing: run `scripts/setup generate` (scripts/test does)",
            path.display()
        );
        Llama::load(&path, None, Device::Cpu, DType::F32, true).unwrap()
    }

    /// `n` greedy tokens of `prompt` stepped alone through `step` (logits to the host,
    /// nothing queued ahead).
    fn alone(g: &Llama, prompt: &[u32], n: usize) -> Vec<u32> {
        let mut cache = g.new_sequence().unwrap();
        let (mut feed, mut out) = (prompt.to_vec(), Vec::new());
        for _ in 0..n {
            let logits = g.step(&mut [StepItem::new(&feed, cache.as_mut())]).unwrap().remove(0);
            out.push(argmax(&logits));
            feed = vec![argmax(&logits)];
        }
        out
    }

    /// The decode step queued ahead serves the next call's items it ran and only those:
    /// sequences join, one asks for its logits for a step (and is then run, not taken
    /// from the queued step), one ends, and each sequence's tokens stay the ones it gets
    /// alone.
    #[test]
    fn steps_queued_ahead_give_each_sequence_the_tokens_it_gets_alone() {
        array::set_device(None).unwrap();
        let mut g = smollm();
        assert!(!g.decode_ahead && g.greedy_on_device, "off and on after load");
        g.decode_ahead = true;
        let prompts: [Vec<u32>; 3] =
            [vec![1, 504, 3458, 282], vec![1, 2683, 314, 9], (0..30).map(|i| 100 + i * 7).collect()];
        let steps = 10;
        let expected: Vec<Vec<u32>> = prompts.iter().map(|p| alone(&g, p, steps)).collect();
        // Sequence 2 joins at step 3; sequence 1 wants its logits at step 5; sequence 0
        // ends after step 6.
        let mut caches: Vec<Option<Box<dyn SequenceCache>>> = vec![None, None, None];
        let mut got: Vec<Vec<u32>> = vec![Vec::new(); 3];
        let mut served = 0;
        for step in 0..steps + 3 {
            if step == 0 || step == 3 {
                for s in [0, 1, 2].into_iter().filter(|&s| (s == 2) == (step == 3)) {
                    caches[s] = Some(g.new_sequence().unwrap());
                }
            }
            if step == 7 {
                caches[0] = None;
            }
            let live: Vec<usize> = (0..3).filter(|&s| caches[s].is_some() && got[s].len() < steps).collect();
            if live.is_empty() {
                break;
            }
            let feeds: Vec<Vec<u32>> =
                live.iter().map(|&s| got[s].last().map_or(prompts[s].clone(), |&t| vec![t])).collect();
            // How many of this call's items the queued step ran.
            {
                let pool = kv::lock(&g.pool);
                let rows = pool.ahead.as_ref().map(|a| a.rows.clone()).unwrap_or_default();
                let mut cache_key = |s: usize| {
                    let c = caches[s].as_mut().unwrap().as_any_mut().downcast_mut::<MlxCache>().unwrap();
                    (c.serial, c.len)
                };
                for (&s, feed) in live.iter().zip(&feeds) {
                    let (serial, len) = cache_key(s);
                    let sampled = s == 1 && step == 5;
                    if !sampled && feed.len() == 1 && rows.contains(&(serial, len, feed[0])) {
                        served += 1;
                    }
                }
            }
            let mut held: Vec<&mut Box<dyn SequenceCache>> = Vec::new();
            for (s, cache) in caches.iter_mut().enumerate() {
                if live.contains(&s) {
                    held.push(cache.as_mut().unwrap());
                }
            }
            let mut items: Vec<StepItem<'_>> = feeds
                .iter()
                .zip(held)
                .zip(&live)
                .map(|((feed, cache), &s)| StepItem {
                    greedy: !(s == 1 && step == 5),
                    ..StepItem::new(feed, cache.as_mut())
                })
                .collect();
            let next = g.step_next(&mut items).unwrap();
            for (&s, next) in live.iter().zip(next) {
                got[s].push(match next {
                    Next::Token(t) => t,
                    Next::Logits(l) => argmax(&l),
                });
            }
        }
        assert_eq!(got[0], expected[0][..7], "sequence 0, ended after 7 tokens");
        assert_eq!(got[1], expected[1], "sequence 1");
        assert_eq!(got[2], expected[2], "sequence 2, joined at step 3");
        // Every decode item came from a step queued ahead but sequence 1's at step 5
        // (sampled) and at step 6 (its sampled token was not queued): 24 decode items, 22.
        assert_eq!(served, 22, "items served by steps queued ahead");
        // With the option off, nothing is queued and the tokens are the same.
        g.decode_ahead = false;
        let mut cache = g.new_sequence().unwrap();
        let mut items = [StepItem { greedy: true, ..StepItem::new(&prompts[0], cache.as_mut()) }];
        assert_eq!(g.step_next(&mut items).unwrap(), [Next::Token(expected[0][0])]);
        assert!(kv::lock(&g.pool).ahead.is_none());
    }

    /// Prompts stepped together — grouped and padded (`prompts.rs`), one of them the
    /// second chunk of a sequence's prompt, beside a sequence decoding — get the logits
    /// each gets stepped alone.
    #[test]
    fn prompts_stepped_together_get_the_logits_each_gets_alone() {
        array::set_device(None).unwrap();
        let g = smollm();
        let ids =
            |p: usize, n: usize| -> Vec<u32> { (0..n).map(|i| (100 + 13 * p + 7 * i) as u32).collect() };
        // Prompts of 30, 9, 8 (one group) and 7, 5 (another, with the chunk below).
        let prompts: Vec<Vec<u32>> = [5, 9, 7, 8, 30].iter().enumerate().map(|(p, &n)| ids(p, n)).collect();
        let (head, chunk) = (ids(7, 6), ids(8, 7));
        let decoding = vec![1, 504, 3458, 282];
        // The sequences that have stepped before: the chunked prompt's first 6 tokens,
        // the decoding sequence's prompt (it then adds its greedy token).
        let started = |first: &[u32]| -> (Box<dyn SequenceCache>, Vec<f32>) {
            let mut cache = g.new_sequence().unwrap();
            let logits = g.step(&mut [StepItem::new(first, cache.as_mut())]).unwrap().remove(0);
            (cache, logits)
        };
        let token = {
            let (_, logits) = started(&decoding);
            vec![argmax(&logits)]
        };
        let mut expected: Vec<Vec<f32>> = prompts
            .iter()
            .map(|p| g.step(&mut [StepItem::new(p, g.new_sequence().unwrap().as_mut())]).unwrap().remove(0))
            .collect();
        for (first, then) in [(&head, &chunk), (&decoding, &token)] {
            let (mut cache, _) = started(first);
            expected.push(g.step(&mut [StepItem::new(then, cache.as_mut())]).unwrap().remove(0));
        }
        let mut fresh: Vec<Box<dyn SequenceCache>> =
            prompts.iter().map(|_| g.new_sequence().unwrap()).collect();
        let (mut chunked, _) = started(&head);
        let (mut decoder, _) = started(&decoding);
        let mut items: Vec<StepItem<'_>> =
            prompts.iter().zip(fresh.iter_mut()).map(|(p, c)| StepItem::new(p, c.as_mut())).collect();
        // The decoding sequence in the middle of the step, the chunk at its end.
        items.insert(2, StepItem::new(&token, decoder.as_mut()));
        items.push(StepItem::new(&chunk, chunked.as_mut()));
        let got = g.step(&mut items).unwrap();
        // In `expected`'s order: the prompts, the chunk, the decoding sequence.
        for (i, &at) in [0, 1, 3, 4, 5, 6, 2].iter().enumerate() {
            let (got, want) = (&got[at], &expected[i]);
            let worst = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst < 2e-3, "sequence {i}: logits differ by {worst} from its step alone");
            assert_eq!(argmax(got), argmax(want), "sequence {i}");
        }
    }

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
