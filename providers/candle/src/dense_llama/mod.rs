//! A llama-architecture decoder from a GGUF file on candle tensors: kiln's
//! [`Generator`](kiln_core::Generator) for GPUs (`cuda:N`), where the host-side decoder
//! of `llama.rs` and its CPU kernels cannot run.
//!
//! The file's matrices are dequantized at load to the model's dtype (f16, bf16 or f32)
//! and multiplied by cuBLAS; Q, K and V are one matrix, gate and up another. A step is
//! a ragged batch as on the CPU: every sequence's new tokens are the rows of one matrix
//! for the projections and the MLP. Keys and values live in per-layer tensors shared by
//! all sequences (`kv.rs`, a slot each): a step writes its rows' keys with one in-place
//! scatter per layer; the decoding rows (one token each) attend together with one
//! batched product over all slots, masked to each slot's length, so the kernels a step
//! launches do not grow with the number of streams; a prompt's rows attend over their
//! own slot with a causal mask. Norms and softmax accumulate in f32 (candle's kernels).
//!
//! That is the step from candle's operations (about 24 launches a layer). On a GPU a
//! step runs on kiln's CUDA kernels instead (`gpu.rs`, eight launches a layer: rotary
//! and the cache writes fused, every row's attention over its slot in one kernel),
//! unless `provider.options.cuda_kernels` is off or the step's longest row sees more keys
//! than the attention kernel holds. The operations path runs on candle's CPU backend
//! too, which is how the tests check it against the CPU decoder on the same file.

use std::fs::File;
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::quantized::gguf_file;
use candle_core::{DType as CDType, Device as CDevice, IndexOp, Tensor};
use candle_nn::ops::{rms_norm, softmax_last_dim};
use candle_nn::rotary_emb::rope_i;
use kiln_core::gguf::Gguf;
use kiln_core::{Error, Generator, GeneratorInfo, Next, Result, SequenceCache, StepItem};

#[cfg(feature = "cuda")]
mod gpu;
mod kv;

use kv::{Geometry, Pool, SharedPool, TensorCache, lock};

fn candle(e: candle_core::Error) -> Error {
    Error::backend("candle", e.to_string())
}

struct Layer {
    attn_norm: Tensor,
    /// `[(heads + 2 kv_heads) · head_dim, width]`: rows q | k | v.
    qkv: Tensor,
    wo: Tensor,
    ffn_norm: Tensor,
    /// `[2 · ffn, width]`: rows gate | up.
    gate_up: Tensor,
    down: Tensor,
}

/// The loaded decoder.
pub struct DenseLlama {
    device: CDevice,
    /// `[vocab, width]`, the model's dtype.
    embed: Tensor,
    /// `[vocab, width]`: the embedding table itself when the file ties them.
    output: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    /// `[position, head_dim / 2]`, f32.
    cos: Tensor,
    sin: Tensor,
    /// Steps run on kiln's CUDA kernels (`gpu.rs`), not candle's operations.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    kernels: bool,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    ffn: usize,
    eps: f32,
    geometry: Geometry,
    pool: SharedPool,
    /// Whether `step_next` picks greedy items' tokens on the device
    /// (`provider.options.greedy_on_device`; on after `load`).
    pub(crate) greedy_on_device: bool,
    pub(crate) info: GeneratorInfo,
}

/// Bytes a model from `path` holds at `dtype`: every tensor of the file dequantized, the
/// rotary tables, plus 10% for a step's activations. `None`: not a readable GGUF file.
pub fn estimate_bytes(path: &Path, dtype: CDType) -> Option<u64> {
    let gguf = Gguf::open(path).ok()?;
    let elements: u64 = gguf.tensors.values().map(|t| t.elements() as u64).sum();
    let shape = gguf.llama().ok()?;
    let bytes =
        (elements + (shape.context * shape.width / shape.heads) as u64) * dtype.size_in_bytes() as u64;
    Some(bytes + bytes / 10)
}

impl DenseLlama {
    /// Reads `path` (GGUF, `general.architecture = "llama"`) onto `device` at `dtype`.
    /// `kernels`: steps on kiln's CUDA kernels where the device is a GPU (else candle's
    /// operations, as on the CPU).
    pub fn load(
        path: &Path,
        device: &CDevice,
        dtype: CDType,
        kiln_device: kiln_core::Device,
        kernels: bool,
    ) -> Result<Self> {
        let gguf = Gguf::open(path)?;
        let kiln_core::gguf::LlamaShape { heads, kv_heads, width, blocks, context, eps, rope_base } =
            gguf.llama()?;
        let head_dim = width / heads;
        let mut file = File::open(path).map_err(|e| Error::io("opening", path, e))?;
        let content = gguf_file::Content::read(&mut file)
            .map_err(|e| Error::model_load(path, format!("not a readable GGUF file: {e}")))?;
        // Each tensor dequantized on the CPU (candle's GGML code), then moved.
        let mut host = |name: &str| -> Result<Tensor> {
            content
                .tensor(&mut file, name, &CDevice::Cpu)
                .and_then(|t| t.dequantize(&CDevice::Cpu))
                .map_err(|e| Error::model_load(path, format!("`{name}`: {e}")))
        };
        let put = |t: Tensor| t.to_dtype(dtype).and_then(|t| t.to_device(device)).map_err(candle);
        let embed = put(host("token_embd.weight")?)?;
        let output = match content.tensor_infos.contains_key("output.weight") {
            true => put(host("output.weight")?)?,
            false => embed.clone(),
        };
        let mut layers = Vec::with_capacity(blocks);
        let mut ffn = 0;
        for i in 0..blocks {
            let mut get = |n: &str| host(&format!("blk.{i}.{n}.weight"));
            let qkv = Tensor::cat(&[get("attn_q")?, get("attn_k")?, get("attn_v")?], 0).map_err(candle)?;
            let (gate, up) = (get("ffn_gate")?, get("ffn_up")?);
            ffn = gate.dim(0).map_err(candle)?;
            layers.push(Layer {
                attn_norm: put(get("attn_norm")?)?,
                qkv: put(qkv)?,
                wo: put(get("attn_output")?)?,
                ffn_norm: put(get("ffn_norm")?)?,
                gate_up: put(Tensor::cat(&[gate, up], 0).map_err(candle)?)?,
                down: put(get("ffn_down")?)?,
            });
        }
        let norm = put(host("output_norm.weight")?)?;
        let (cos, sin) = crate::llama::rope_tables(context, head_dim, rope_base);
        let table = |v: Vec<f32>| Tensor::from_vec(v, (context, head_dim / 2), device).map_err(candle);
        let (cos, sin) = (table(cos)?, table(sin)?);

        let mut info = gguf.generator_info("candle", kiln_device, dtype.size_in_bytes())?;
        info.quantization = format!("{} (dequantized at load from the file's types)", dtype.as_str());
        info.weight_bytes = estimate_bytes(path, dtype);
        let geometry = Geometry { layers: blocks, kv_heads, head_dim, dtype };
        Ok(DenseLlama {
            device: device.clone(),
            embed,
            output,
            layers,
            norm,
            cos,
            sin,
            // `slot_attention` holds a query head in 256 floats of shared memory.
            kernels: kernels && cfg!(feature = "cuda") && device.is_cuda() && head_dim <= 256,
            heads,
            kv_heads,
            head_dim,
            ffn,
            eps,
            geometry,
            pool: Arc::new(Mutex::new(Pool::default())),
            greedy_on_device: true,
            info,
        })
    }

    fn cache<'a>(&self, cache: &'a mut dyn SequenceCache) -> Result<&'a mut TensorCache> {
        cache
            .as_any_mut()
            .downcast_mut::<TensorCache>()
            .filter(|c| Arc::ptr_eq(&c.pool, &self.pool))
            .ok_or_else(|| Error::InvalidInput("a sequence cache from another generator".into()))
    }
}

impl Generator for DenseLlama {
    fn info(&self) -> &GeneratorInfo {
        &self.info
    }

    fn new_sequence(&self) -> Result<Box<dyn SequenceCache>> {
        let slot = lock(&self.pool).acquire();
        Ok(Box::new(TensorCache {
            slot,
            len: 0,
            bytes_per_token: self.info.kv_bytes_per_token,
            pool: self.pool.clone(),
        }))
    }

    /// A new slot holding the first `tokens` tokens' keys and values (the prefix
    /// cache's).
    fn fork(&self, cache: &mut dyn SequenceCache, tokens: usize) -> Result<Option<Box<dyn SequenceCache>>> {
        let cache = self.cache(cache)?;
        if tokens > cache.len {
            return Err(Error::InvalidInput(format!(
                "a prefix of {tokens} tokens of a cache of {}",
                cache.len
            )));
        }
        let mut pool = lock(&self.pool);
        let slot = pool.acquire();
        let capacity = pool.capacity;
        let copied = pool
            .reserve(capacity, &self.geometry, &self.device)
            .and_then(|_| pool.copy_slot(cache.slot, slot));
        if let Err(e) = copied {
            pool.release(slot);
            return Err(candle(e));
        }
        drop(pool);
        Ok(Some(Box::new(TensorCache {
            slot,
            len: tokens,
            bytes_per_token: self.info.kv_bytes_per_token,
            pool: self.pool.clone(),
        })))
    }

    /// One ragged step; see the module docs.
    fn step(&self, batch: &mut [StepItem<'_>]) -> Result<Vec<Vec<f32>>> {
        self.stepped(batch, false)?.into_iter().map(Next::into_logits).collect()
    }

    /// The step, the greedy items' tokens picked on the device: their rows of logits
    /// stay there.
    fn step_next(&self, batch: &mut [StepItem<'_>]) -> Result<Vec<Next>> {
        self.stepped(batch, self.greedy_on_device)
    }
}

impl DenseLlama {
    /// A step; where `pick` is set, the items marked greedy get their token alone.
    fn stepped(&self, batch: &mut [StepItem<'_>], pick: bool) -> Result<Vec<Next>> {
        let greedy: Vec<bool> = batch.iter().map(|item| pick && item.greedy).collect();
        let mut spans = Vec::with_capacity(batch.len());
        let mut ids = Vec::new();
        for item in batch.iter_mut() {
            let cache = self.cache(item.cache)?;
            self.info.check_step(item.tokens, cache.len)?;
            spans.push(Span { row: ids.len(), tokens: item.tokens.len(), pos: cache.len, slot: cache.slot });
            ids.extend_from_slice(item.tokens);
        }
        let mut pool = lock(&self.pool);
        let longest = spans.iter().map(|s| s.pos + s.tokens).max().unwrap_or(0);
        pool.reserve(longest, &self.geometry, &self.device).map_err(candle)?;
        #[cfg(feature = "cuda")]
        let logits = if self.kernels && longest <= gpu::MAX_KEYS {
            self.forward_kernels(&ids, &spans, &pool)
        } else {
            self.forward(&ids, &spans, &pool)
        };
        #[cfg(not(feature = "cuda"))]
        let logits = self.forward(&ids, &spans, &pool);
        let next = logits.and_then(|logits| self.pick(&logits, &greedy)).map_err(candle)?;
        drop(pool);
        for (item, span) in batch.iter_mut().zip(&spans) {
            self.cache(item.cache)?.len += span.tokens;
        }
        Ok(next)
    }

    /// Per row of `logits` (`[rows, vocab]`, f32, on the device): its token where
    /// `greedy`, else the row copied out. The token is the first index of the row's
    /// largest value, as the runtime's sampler picks it: the maximum, then the smallest
    /// index holding it (candle's own argmax does not promise the first on a GPU).
    fn pick(&self, logits: &Tensor, greedy: &[bool]) -> candle_core::Result<Vec<Next>> {
        let vocab = logits.dim(1)?;
        let tokens = match greedy.iter().any(|&g| g) {
            false => Vec::new(),
            true => {
                let hit = logits.broadcast_eq(&logits.max_keepdim(1)?)?;
                let index = Tensor::arange(0u32, vocab as u32, &self.device)?.broadcast_as(logits.shape())?;
                let past = Tensor::new(vocab as u32, &self.device)?.broadcast_as(logits.shape())?;
                hit.where_cond(&index, &past)?.min(1)?.to_vec1::<u32>()?
            }
        };
        let wanted: Vec<u32> = (0..greedy.len() as u32).filter(|&i| !greedy[i as usize]).collect();
        let rows = match wanted.len() {
            0 => Vec::new(),
            n if n == greedy.len() => logits.to_vec2::<f32>()?,
            n => logits.index_select(&Tensor::from_vec(wanted, n, &self.device)?, 0)?.to_vec2::<f32>()?,
        };
        let mut rows = rows.into_iter();
        Ok(greedy
            .iter()
            .enumerate()
            .map(|(i, &g)| match g {
                // Every value NaN: no index holds the maximum; the sampler's answer is 0.
                true => Next::Token(if (tokens[i] as usize) < vocab { tokens[i] } else { 0 }),
                false => Next::Logits(rows.next().expect("a row per item asking for logits")),
            })
            .collect())
    }
}

/// One sequence of a step: its first row in the step's matrix, its new tokens, the
/// position of the first, its slot.
struct Span {
    row: usize,
    tokens: usize,
    pos: usize,
    slot: usize,
}

/// What every layer of one step shares: built once on the host and uploaded.
struct StepPlan {
    /// Per row, its position's rotary values: `[rows, 1, head_dim / 2]`.
    cos: Tensor,
    sin: Tensor,
    /// Where each row's keys of each key/value head go in a layer's tensor viewed as
    /// `[slots · kv_heads · capacity, head_dim]`: `[rows · kv_heads, head_dim]`.
    kv_index: Tensor,
    /// The decoding rows, if any.
    decode: Option<Decode>,
    /// Per prompt item (index into the spans), its causal mask `[tokens, pos + tokens]`.
    prompts: Vec<(usize, Tensor)>,
}

/// A step's decoding rows (one token of a sequence each), attending together.
struct Decode {
    /// Their rows in the step's matrix (`[n]`); `None` when they are all its rows.
    rows: Option<Tensor>,
    /// Their slots as scatter rows for the queries: `[n, heads · head_dim]`.
    scatter: Tensor,
    /// Their slots as gather indices: `[n]`.
    gather: Tensor,
    /// Each slot's length mask over the first `keys` positions: `[slots, 1, 1, keys]`,
    /// 0 or −∞.
    mask: Tensor,
    keys: usize,
    /// Every slot's queries, `[slots, heads · head_dim]`: zeros but the decoding rows',
    /// which each layer scatters over the last layer's.
    queries: Tensor,
}

impl DenseLlama {
    fn plan(&self, spans: &[Span], pool: &Pool) -> candle_core::Result<StepPlan> {
        let (dev, dtype) = (&self.device, self.geometry.dtype);
        let (nkv, hd, nh) = (self.kv_heads, self.head_dim, self.heads);
        let (cap, slots) = (pool.capacity, pool.slots);
        let mut positions = Vec::new();
        let mut kv_index = Vec::new();
        for s in spans {
            for p in s.pos..s.pos + s.tokens {
                positions.push(p as u32);
                for h in 0..nkv {
                    let row = ((s.slot * nkv + h) * cap + p) as u32;
                    kv_index.extend(std::iter::repeat_n(row, hd));
                }
            }
        }
        let rows = positions.len();
        let positions = Tensor::from_vec(positions, rows, dev)?;
        let half = hd / 2;
        let cos = self.cos.index_select(&positions, 0)?.to_dtype(dtype)?.reshape((rows, 1, half))?;
        let sin = self.sin.index_select(&positions, 0)?.to_dtype(dtype)?.reshape((rows, 1, half))?;
        let kv_index = Tensor::from_vec(kv_index, (rows * nkv, hd), dev)?;

        let decoding: Vec<&Span> = spans.iter().filter(|s| s.tokens == 1).collect();
        let decode = if decoding.is_empty() {
            None
        } else {
            let keys = decoding.iter().map(|s| s.pos + 1).max().unwrap_or(1);
            // Slots not decoding this step see their first key: their rows are computed
            // and dropped, and a row that sees nothing would be NaN.
            let mut seen = vec![1; slots];
            for s in &decoding {
                seen[s.slot] = s.pos + 1;
            }
            let mask: Vec<f32> = seen
                .iter()
                .flat_map(|&n| (0..keys).map(move |j| if j < n { 0.0 } else { f32::NEG_INFINITY }))
                .collect();
            let mask = Tensor::from_vec(mask, (slots, 1, 1, keys), dev)?.to_dtype(dtype)?;
            let scatter: Vec<u32> =
                decoding.iter().flat_map(|s| std::iter::repeat_n(s.slot as u32, nh * hd)).collect();
            let scatter = Tensor::from_vec(scatter, (decoding.len(), nh * hd), dev)?;
            let gather: Vec<u32> = decoding.iter().map(|s| s.slot as u32).collect();
            let gather = Tensor::from_vec(gather, decoding.len(), dev)?;
            let rows = if decoding.len() == spans.len() {
                None
            } else {
                let picked: Vec<u32> = decoding.iter().map(|s| s.row as u32).collect();
                Some(Tensor::from_vec(picked, decoding.len(), dev)?)
            };
            let queries = Tensor::zeros((slots, nh * hd), dtype, dev)?;
            Some(Decode { rows, scatter, gather, mask, keys, queries })
        };
        let mut prompts = Vec::new();
        for (i, s) in spans.iter().enumerate().filter(|(_, s)| s.tokens > 1) {
            let keys = s.pos + s.tokens;
            let mask: Vec<f32> = (0..s.tokens)
                .flat_map(|r| (0..keys).map(move |j| if j <= s.pos + r { 0.0 } else { f32::NEG_INFINITY }))
                .collect();
            prompts.push((i, Tensor::from_vec(mask, (s.tokens, keys), dev)?.to_dtype(dtype)?));
        }
        Ok(StepPlan { cos, sin, kv_index, decode, prompts })
    }

    fn forward(&self, ids: &[u32], spans: &[Span], pool: &Pool) -> candle_core::Result<Tensor> {
        let (nh, nkv, hd, ffn) = (self.heads, self.kv_heads, self.head_dim, self.ffn);
        let group = nh / nkv;
        let slots = pool.slots;
        let rows = ids.len();
        let scale = 1.0 / (hd as f64).sqrt();
        let plan = self.plan(spans, pool)?;
        // Every row decodes: the batched attention's rows are the step's, in order.
        let all_decode = plan.decode.as_ref().is_some_and(|d| d.rows.is_none());
        let mut x = self.embed.index_select(&Tensor::from_slice(ids, rows, &self.device)?, 0)?;
        for (layer, (kc, vc)) in self.layers.iter().zip(&pool.layers) {
            let h = rms_norm(&x, &layer.attn_norm, self.eps)?;
            let qkv = h.matmul(&layer.qkv.t()?)?;
            let q = rope_i(&qkv.narrow(1, 0, nh * hd)?.reshape((rows, nh, 1, hd))?, &plan.cos, &plan.sin)?;
            let k = rope_i(
                &qkv.narrow(1, nh * hd, nkv * hd)?.reshape((rows, nkv, 1, hd))?,
                &plan.cos,
                &plan.sin,
            )?;
            let v = qkv.narrow(1, (nh + nkv) * hd, nkv * hd)?.reshape((rows * nkv, hd))?;
            let (k_rows, v_rows) = (kc.reshape(((), hd))?, vc.reshape(((), hd))?);
            k_rows.scatter_set(&plan.kv_index, &k.reshape((rows * nkv, hd))?, 0)?;
            v_rows.scatter_set(&plan.kv_index, &v, 0)?;
            let q = q.reshape((rows, nh * hd))?;

            let decoded = match &plan.decode {
                Some(d) => {
                    let mine = match &d.rows {
                        None => q.clone(),
                        Some(rows) => q.index_select(rows, 0)?,
                    };
                    d.queries.scatter_set(&d.scatter, &mine, 0)?;
                    let all = d.queries.reshape((slots, nkv, group, hd))?;
                    let scores =
                        (all.matmul(&kc.narrow(2, 0, d.keys)?.t()?)? * scale)?.broadcast_add(&d.mask)?;
                    let out = softmax_last_dim(&scores)?.matmul(&vc.narrow(2, 0, d.keys)?)?;
                    Some(out.reshape((slots, nh * hd))?.index_select(&d.gather, 0)?)
                }
                None => None,
            };
            let attn = match decoded {
                Some(all) if all_decode => all,
                decoded => {
                    let mut prompts = plan.prompts.iter().peekable();
                    let mut pieces = Vec::with_capacity(spans.len());
                    let mut next_decoded = 0;
                    for (i, s) in spans.iter().enumerate() {
                        if let Some((_, mask)) = prompts.next_if(|p| p.0 == i) {
                            pieces.push(self.prompt_attention(&q, s, (kc, vc), mask, scale)?);
                        } else if let Some(d) = &decoded {
                            pieces.push(d.narrow(0, next_decoded, 1)?);
                            next_decoded += 1;
                        }
                    }
                    Tensor::cat(&pieces, 0)?
                }
            };
            x = (x + attn.matmul(&layer.wo.t()?)?)?;
            let h = rms_norm(&x, &layer.ffn_norm, self.eps)?;
            let gate_up = h.matmul(&layer.gate_up.t()?)?;
            let act = (gate_up.narrow(1, 0, ffn)?.silu()? * gate_up.narrow(1, ffn, ffn)?)?;
            x = (x + act.matmul(&layer.down.t()?)?)?;
        }
        // Only each sequence's last position is sampled from.
        let last: Vec<u32> = spans.iter().map(|s| (s.row + s.tokens - 1) as u32).collect();
        let last = x.index_select(&Tensor::from_vec(last, spans.len(), &self.device)?, 0)?;
        let h = rms_norm(&last, &self.norm, self.eps)?;
        h.matmul(&self.output.t()?)?.to_dtype(CDType::F32)
    }

    /// Causal attention of one prompt's rows over its slot: queries `[tokens, heads ·
    /// head_dim]` of `q` from the span's first row, keys and values the slot's first
    /// `pos + tokens`; the rows come back `[tokens, heads · head_dim]`.
    fn prompt_attention(
        &self,
        q: &Tensor,
        s: &Span,
        (kc, vc): (&Tensor, &Tensor),
        mask: &Tensor,
        scale: f64,
    ) -> candle_core::Result<Tensor> {
        let (nh, nkv, hd) = (self.heads, self.kv_heads, self.head_dim);
        let (t, keys) = (s.tokens, s.pos + s.tokens);
        let group = nh / nkv;
        // [t, nh, hd] → [nh, t, hd]; a key/value head's query heads are adjacent, so
        // they read it as one [group · t, hd] matrix.
        let q = q.narrow(0, s.row, t)?.reshape((t, nh, hd))?.transpose(0, 1)?.contiguous()?;
        let q = q.reshape((nkv, group * t, hd))?;
        let k = kc.i(s.slot)?.narrow(1, 0, keys)?;
        let v = vc.i(s.slot)?.narrow(1, 0, keys)?;
        let scores = (q.matmul(&k.t()?)? * scale)?.reshape((nkv, group, t, keys))?.broadcast_add(mask)?;
        let p = softmax_last_dim(&scores)?.reshape((nkv, group * t, keys))?;
        let out = p.matmul(&v)?.reshape((nh, t, hd))?.transpose(0, 1)?;
        out.reshape((t, nh * hd))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::GgmlDType;

    use super::*;
    use crate::llama::{Llama, Weights};

    fn smollm2() -> std::path::PathBuf {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../.kiln/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
        assert!(path.is_file(), "{} is missing: run scripts/setup generate", path.display());
        path
    }

    /// The first index of the largest value (as kiln's sampler picks it).
    fn argmax(v: &[f32]) -> u32 {
        let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        v.iter().position(|&l| l == max).unwrap() as u32
    }

    /// A sequence on both decoders: `(dense, cpu)`.
    type Pair = (Box<dyn SequenceCache>, Box<dyn SequenceCache>);

    /// Runs the same step on both decoders.
    fn step_both(dense: &DenseLlama, cpu: &Llama, items: &mut [(&[u32], &mut Pair)], what: &str) -> f32 {
        let mut batch: Vec<StepItem> = Vec::new();
        let mut others: Vec<StepItem> = Vec::new();
        for (tokens, (d, c)) in items.iter_mut() {
            batch.push(StepItem::new(tokens, d.as_mut()));
            others.push(StepItem::new(tokens, c.as_mut()));
        }
        let got = dense.step(&mut batch).unwrap();
        let want = cpu.step(&mut others).unwrap();
        assert_eq!(got.len(), want.len());
        let mut worst = 0f32;
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let diff = g.iter().zip(w).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert_eq!(argmax(g), argmax(w), "{what}, item {i}: the best token differs");
            worst = worst.max(diff);
        }
        println!("{what}: logits within {worst:e} of the CPU decoder's");
        worst
    }

    /// The tensor decoder on candle's CPU backend, f32, against the CPU decoder with the
    /// file's matrices dequantized to f32 (`requantize = "f32"`), the same best token
    /// and logits close at every step: two prompts in one step, decoding steps, a prompt
    /// joining decoding sequences, a forked prefix, a slot given back and reused by a
    /// shorter sequence, the tensors growing past 256 tokens while sequences hold keys,
    /// and a new sequence after every one was dropped.
    #[test]
    fn dense_decoder_matches_the_cpu_decoder_on_the_gguf_file() {
        let path = smollm2();
        let dense =
            DenseLlama::load(&path, &CDevice::Cpu, CDType::F32, kiln_core::Device::Cpu, false).unwrap();
        let cpu = Llama::load(&path, Weights::Ggml(GgmlDType::F32)).unwrap();
        let pair = || (dense.new_sequence().unwrap(), cpu.new_sequence().unwrap());
        // The CPU decoder keeps keys and values in f16 (this one at the model's dtype):
        // that rounding, not the arithmetic, is most of the difference.
        let tol = 5e-2;
        let prompt = |n: usize, seed: u32| -> Vec<u32> {
            (0..n as u32).map(|i| (i * 7919 + seed * 104_729) % 49_000 + 17).collect()
        };
        let (mut a, mut b) = (pair(), pair());
        let (pa, pb) = (prompt(7, 1), prompt(4, 2));
        assert!(step_both(&dense, &cpu, &mut [(&pa, &mut a), (&pb, &mut b)], "two prompts") < tol);
        for t in 0..3u32 {
            let (ta, tb) = ([100 + t], [200 + t]);
            assert!(step_both(&dense, &cpu, &mut [(&ta, &mut a), (&tb, &mut b)], "decoding") < tol);
        }
        let mut c = pair();
        let pc = prompt(5, 3);
        let (ta, tb) = ([300u32], [301u32]);
        let mixed = [(&ta[..], &mut a), (&pc[..], &mut c), (&tb[..], &mut b)];
        let mut mixed = mixed;
        assert!(step_both(&dense, &cpu, &mut mixed, "a prompt joining two decoding sequences") < tol);

        // A prefix of a, continued with two tokens.
        let mut d =
            (dense.fork(a.0.as_mut(), 8).unwrap().unwrap(), cpu.fork(a.1.as_mut(), 8).unwrap().unwrap());
        let td = [400u32, 401];
        assert!(step_both(&dense, &cpu, &mut [(&td, &mut d)], "a forked prefix continued") < tol);

        // b's slot back, taken by e: b's keys past e's length must not be seen.
        drop(b);
        let mut e = pair();
        let pe = prompt(2, 4);
        let ta = [500u32];
        assert!(step_both(&dense, &cpu, &mut [(&pe, &mut e), (&ta, &mut a)], "a reused slot") < tol);
        let te = [501u32];
        assert!(step_both(&dense, &cpu, &mut [(&te, &mut e), (&ta, &mut a)], "a reused slot decoding") < tol);

        // Past the first 256 tokens of capacity.
        let mut f = pair();
        let pf = prompt(300, 5);
        assert!(
            step_both(&dense, &cpu, &mut [(&pf, &mut f), (&te, &mut e)], "a long prompt growing the tensors")
                < tol
        );
        let (tf, ta) = ([600u32], [601u32]);
        assert!(
            step_both(&dense, &cpu, &mut [(&tf, &mut f), (&ta, &mut a), (&te, &mut e)], "after growing")
                < tol
        );
        assert_eq!(a.0.len(), a.1.len());
        assert_eq!(f.0.len(), 301);

        // Every sequence gone: the tensors are released, and a new sequence starts over.
        drop((a, c, d, e, f));
        assert!(lock(&dense.pool).layers.is_empty(), "the slot tensors outlived their sequences");
        let mut g = pair();
        let pg = prompt(9, 6);
        assert!(step_both(&dense, &cpu, &mut [(&pg, &mut g)], "a sequence after all were gone") < tol);
    }

    /// `step_next` picks a greedy item's token on the device: the first index of the
    /// largest of the logits `step` gives for the same inputs (two decoders, the same
    /// steps), beside an item wanting its logits and in an all-greedy step; a row of
    /// equal logits gives its first index, as the runtime's sampler does.
    #[test]
    fn greedy_items_get_the_argmax_of_their_logits_picked_on_the_device() {
        let path = smollm2();
        let load =
            || DenseLlama::load(&path, &CDevice::Cpu, CDType::F32, kiln_core::Device::Cpu, false).unwrap();
        let (reference, picker) = (load(), load());
        let prompts: [Vec<u32>; 3] =
            [vec![1, 504, 3458, 282], vec![1, 2683, 314], (0..20).map(|i| 100 + i * 7).collect()];
        let mut theirs: Vec<_> = prompts.iter().map(|_| reference.new_sequence().unwrap()).collect();
        let mut ours: Vec<_> = prompts.iter().map(|_| picker.new_sequence().unwrap()).collect();
        let mut feed: Vec<Vec<u32>> = prompts.to_vec();
        for greedy in [[true, false, true], [true, true, true]] {
            let mut items: Vec<_> =
                feed.iter().zip(&mut theirs).map(|(f, c)| StepItem::new(f, c.as_mut())).collect();
            let logits = reference.step(&mut items).unwrap();
            let mut items: Vec<_> =
                feed.iter().zip(&mut ours).map(|(f, c)| StepItem::new(f, c.as_mut())).collect();
            items.iter_mut().zip(greedy).for_each(|(i, g)| i.greedy = g);
            let next = picker.step_next(&mut items).unwrap();
            let expected: Vec<Next> = logits
                .iter()
                .zip(greedy)
                .map(|(l, g)| if g { Next::Token(argmax(l)) } else { Next::Logits(l.clone()) })
                .collect();
            assert_eq!(next, expected, "greedy {greedy:?}");
            feed = logits.iter().map(|l| vec![argmax(l)]).collect();
        }
        // Ties go to the first index; a row of NaNs to 0.
        let rows = Tensor::new(&[[1f32, 3.0, 3.0, 2.0], [5.0, 5.0, 5.0, 5.0], [f32::NAN; 4]], &CDevice::Cpu)
            .unwrap();
        let picked = picker.pick(&rows, &[true, true, true]).unwrap();
        assert_eq!(picked, [Next::Token(1), Next::Token(0), Next::Token(0)]);
    }

    /// f16 on the CPU backend: the same best tokens as f32 for a prompt and a decoding
    /// step, logits close.
    #[test]
    fn dense_decoder_in_f16_stays_near_f32() {
        let path = smollm2();
        let wide =
            DenseLlama::load(&path, &CDevice::Cpu, CDType::F32, kiln_core::Device::Cpu, false).unwrap();
        let half =
            DenseLlama::load(&path, &CDevice::Cpu, CDType::F16, kiln_core::Device::Cpu, false).unwrap();
        let (mut a, mut b) = (wide.new_sequence().unwrap(), half.new_sequence().unwrap());
        let prompt: Vec<u32> = vec![1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365];
        for tokens in [&prompt[..], &[28][..]] {
            let w = wide.step(&mut [StepItem::new(tokens, a.as_mut())]).unwrap().remove(0);
            let h = half.step(&mut [StepItem::new(tokens, b.as_mut())]).unwrap().remove(0);
            let argmax = |v: &[f32]| v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
            let diff = w.iter().zip(&h).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            println!("f16 against f32: logits within {diff}");
            assert_eq!(argmax(&w), argmax(&h));
            assert!(diff < 0.5, "f16 logits {diff} from f32's");
        }
    }

    /// A cache of another generator is refused, not downcast.
    #[test]
    fn a_cache_of_another_generator_is_refused() {
        let path = smollm2();
        let one = DenseLlama::load(&path, &CDevice::Cpu, CDType::F32, kiln_core::Device::Cpu, false).unwrap();
        let other =
            DenseLlama::load(&path, &CDevice::Cpu, CDType::F32, kiln_core::Device::Cpu, false).unwrap();
        let mut cache = other.new_sequence().unwrap();
        let err = one.step(&mut [StepItem::new(&[1, 2], cache.as_mut())]).unwrap_err();
        assert!(err.to_string().contains("another generator"), "{err}");
    }
}
