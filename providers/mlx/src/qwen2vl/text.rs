//! The language model on MLX: a Qwen2 decoder (RMSNorm, attention with q/k/v biases and
//! grouped KV heads through MLX's fused attention, SwiGLU) whose rotary positions come
//! three to a token (M-RoPE, cos and sin from `kiln_core::qwen2vl::mrope_cos_sin`), with
//! a KV buffer per sequence that grows in blocks and is written in place.

use kiln_core::qwen2vl::{QwenVlConfig, mrope_cos_sin};
use kiln_core::{DType, Error, Result};

use super::rotate;
use super::weights::{Checkpoint, Embedding, Linear};
use crate::array::Array;

/// Tokens a sequence's KV buffers grow by: a buffer is re-allocated once every this
/// many tokens, not at every step.
const GROW: usize = 256;

struct Layer {
    input_norm: Array,
    post_norm: Array,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// One sequence's keys and values: per layer `[1, kv_heads, capacity, head_dim]`
/// buffers of which the first `tokens` rows hold values, and the offset decoding adds
/// to a token's index to get its position.
pub struct KvCache {
    layers: Vec<(Array, Array)>,
    capacity: usize,
    tokens: usize,
    rope_delta: i64,
    bytes_per_token: u64,
}

impl KvCache {
    /// Tokens held.
    pub fn len(&self) -> usize {
        self.tokens
    }

    /// Bytes its buffers take.
    pub fn bytes(&self) -> u64 {
        self.capacity as u64 * self.bytes_per_token
    }

    /// Where the next token goes on all three position streams.
    pub fn next_position(&self) -> i64 {
        self.tokens as i64 + self.rope_delta
    }

    /// A cache of the first `tokens` tokens, the same rope delta: handles on the same
    /// buffers. Whichever writes next gets its own copy (MLX writes in place only into a
    /// buffer nothing else holds), so neither sees the other's later tokens.
    pub fn prefix(&self, tokens: usize) -> Result<KvCache> {
        if tokens > self.tokens {
            return Err(Error::InvalidInput(format!(
                "a prefix of {tokens} tokens of a cache of {}",
                self.tokens
            )));
        }
        let layers =
            self.layers.iter().map(|(k, v)| Ok((k.share()?, v.share()?))).collect::<Result<Vec<_>>>()?;
        Ok(KvCache {
            layers,
            capacity: self.capacity,
            tokens,
            rope_delta: self.rope_delta,
            bytes_per_token: self.bytes_per_token,
        })
    }

    /// Its buffers, to evaluate with a step's logits.
    pub fn arrays(&self) -> impl Iterator<Item = &Array> {
        self.layers.iter().flat_map(|(k, v)| [k, v])
    }
}

/// The decoder.
pub struct TextModel {
    config: QwenVlConfig,
    embed: Embedding,
    layers: Vec<Layer>,
    norm: Array,
    lm_head: Linear,
    dtype: DType,
}

impl TextModel {
    /// The decoder's tensors from `weights`.
    pub fn load(weights: &Checkpoint, config: &QwenVlConfig, dtype: DType) -> Result<Self> {
        let p = weights.layout.text;
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let l = format!("{p}layers.{i}.");
                Ok(Layer {
                    input_norm: weights.get(&format!("{l}input_layernorm.weight"))?,
                    post_norm: weights.get(&format!("{l}post_attention_layernorm.weight"))?,
                    q: weights.linear(&format!("{l}self_attn.q_proj"), true)?,
                    k: weights.linear(&format!("{l}self_attn.k_proj"), true)?,
                    v: weights.linear(&format!("{l}self_attn.v_proj"), true)?,
                    o: weights.linear(&format!("{l}self_attn.o_proj"), false)?,
                    gate: weights.linear(&format!("{l}mlp.gate_proj"), false)?,
                    up: weights.linear(&format!("{l}mlp.up_proj"), false)?,
                    down: weights.linear(&format!("{l}mlp.down_proj"), false)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let embed = weights.embedding(&format!("{p}embed_tokens"))?;
        let head = weights.layout.lm_head;
        // Tied checkpoints write no head; some untied ones are saved tied anyway.
        let lm_head = if !config.tie_word_embeddings && weights.has(&format!("{head}.weight")) {
            weights.linear(head, false)?
        } else {
            embed.as_linear()?
        };
        Ok(TextModel {
            config: config.clone(),
            embed,
            layers,
            norm: weights.get(&format!("{p}norm.weight"))?,
            lm_head,
            dtype,
        })
    }

    /// Its arrays, to evaluate at load.
    pub fn arrays(&self) -> Vec<&Array> {
        let mut all = vec![&self.norm];
        all.extend(self.embed.arrays());
        all.extend(self.lm_head.arrays());
        for l in &self.layers {
            all.extend([&l.input_norm, &l.post_norm]);
            for lin in [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down] {
                all.extend(lin.arrays());
            }
        }
        all
    }

    /// Bytes of keys and values a token takes.
    pub fn kv_bytes_per_token(&self) -> u64 {
        let c = &self.config;
        (c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim() * self.dtype.size()) as u64
    }

    /// An empty cache for one sequence.
    pub fn new_cache(&self) -> KvCache {
        KvCache {
            layers: Vec::new(),
            capacity: 0,
            tokens: 0,
            rope_delta: 0,
            bytes_per_token: self.kv_bytes_per_token(),
        }
    }

    /// Token embeddings `[tokens, hidden]`, with `images`' rows (`[pads, hidden]`, one
    /// per `<|image_pad|>`, in order) in place of the pad tokens' when given.
    pub fn embed(&self, ids: &[u32], images: Option<&Array>) -> Result<Array> {
        let vocab = self.config.vocab_size as u32;
        if let Some(bad) = ids.iter().find(|&&t| t >= vocab) {
            return Err(Error::InvalidInput(format!("token id {bad} is outside the vocabulary of {vocab}")));
        }
        let as_i32: Vec<i32> = ids.iter().map(|&t| t as i32).collect();
        let x = self.embed.rows(&Array::from_i32(&as_i32)?)?;
        let Some(rows) = images else { return Ok(x) };
        match kiln_core::qwen2vl::image_row_picks(ids, self.config.image_token_id, rows.shape()[0])? {
            None => Ok(x),
            Some(pick) => {
                let pick: Vec<i32> = pick.into_iter().map(|i| i as i32).collect();
                Array::concat(&[&x, rows], 0)?.take(&Array::from_i32(&pick)?, 0)
            }
        }
    }

    /// cos and sin `[tokens, 1, head_dim]` for `positions` (time, height, width).
    fn rotary(&self, positions: &[Vec<i64>; 3]) -> Result<(Array, Array)> {
        let c = &self.config;
        let (cos, sin) = mrope_cos_sin(positions, c.head_dim(), c.rope_theta, c.mrope_section);
        let shape = [positions[0].len(), 1, c.head_dim()];
        Ok((
            Array::from_f32(&cos, &shape)?.astype(self.dtype)?,
            Array::from_f32(&sin, &shape)?.astype(self.dtype)?,
        ))
    }

    /// Room in `cache` for `more` tokens (new buffers when it has none or too few).
    fn reserve(&self, cache: &mut KvCache, more: usize) -> Result<()> {
        let need = cache.tokens + more;
        if need <= cache.capacity {
            return Ok(());
        }
        let c = &self.config;
        let capacity = need.div_ceil(GROW) * GROW;
        let shape = [1, c.num_key_value_heads, capacity - cache.capacity, c.head_dim()];
        if cache.layers.is_empty() {
            for _ in 0..self.layers.len() {
                cache.layers.push((Array::zeros(&shape, self.dtype)?, Array::zeros(&shape, self.dtype)?));
            }
        } else {
            for (k, v) in cache.layers.iter_mut() {
                *k = Array::concat(&[&*k, &Array::zeros(&shape, self.dtype)?], 2)?;
                *v = Array::concat(&[&*v, &Array::zeros(&shape, self.dtype)?], 2)?;
            }
        }
        cache.capacity = capacity;
        Ok(())
    }

    /// Writes `k` and `v` (`[1, kv_heads, t, d]`) after what `cache` holds in layer `i`
    /// and returns the layer's keys and values so far (`[1, kv_heads, held + t, d]`).
    fn append(
        &self,
        cache: &mut KvCache,
        i: usize,
        k: &Array,
        v: &Array,
        t: usize,
    ) -> Result<(Array, Array)> {
        let c = &self.config;
        let (kvh, d) = (c.num_key_value_heads as i32, c.head_dim() as i32);
        let (p0, p1) = (cache.tokens as i32, (cache.tokens + t) as i32);
        let (kb, vb) = &mut cache.layers[i];
        *kb = kb.slice_update(k, &[0, 0, p0, 0], &[1, kvh, p1, d])?;
        *vb = vb.slice_update(v, &[0, 0, p0, 0], &[1, kvh, p1, d])?;
        Ok((kb.slice(&[0, 0, 0, 0], &[1, kvh, p1, d])?, vb.slice(&[0, 0, 0, 0], &[1, kvh, p1, d])?))
    }

    /// Runs `x` (`[tokens, hidden]`, the tokens after those `cache` holds) at `positions`
    /// into `cache`; the logits of the last `keep` of its first `real` tokens, `[keep,
    /// vocab]` f32 (lazy). Tokens past `real` are padding (a prompt padded to a length
    /// bucket): they attend only to what precedes them, so nothing before them sees them;
    /// their keys and values sit past the cache's length, overwritten by the next tokens.
    pub fn forward(
        &self,
        x: Array,
        positions: &[Vec<i64>; 3],
        cache: &mut KvCache,
        keep: usize,
        real: usize,
    ) -> Result<Array> {
        let c = &self.config;
        let t = positions[0].len();
        let real = real.clamp(1, t);
        let (heads, kvh, d) =
            (c.num_attention_heads as i32, c.num_key_value_heads as i32, c.head_dim() as i32);
        let (cos, sin) = self.rotary(positions)?;
        self.reserve(cache, t)?;
        let scale = 1.0 / (d as f32).sqrt();
        let eps = c.rms_norm_eps as f32;
        let n = t as i32;
        // [t, n·d] → [1, n, t, d]
        let heads_first = |a: Array, n_heads: i32| -> Result<Array> {
            a.transpose(&[1, 0, 2])?.reshape(&[1, n_heads, n, d])
        };
        let mut x = x;
        for (i, layer) in self.layers.iter().enumerate() {
            let h = x.rms_norm(&layer.input_norm, eps)?;
            let q = rotate(&layer.q.forward(&h)?.reshape(&[n, heads, d])?, &cos, &sin)?;
            let k = rotate(&layer.k.forward(&h)?.reshape(&[n, kvh, d])?, &cos, &sin)?;
            let v = layer.v.forward(&h)?.reshape(&[n, kvh, d])?;
            let (q, k, v) = (heads_first(q, heads)?, heads_first(k, kvh)?, heads_first(v, kvh)?);
            let (keys, values) = self.append(cache, i, &k, &v, t)?;
            let o = match t {
                1 => q.attention(&keys, &values, scale, None)?,
                _ => q.causal_attention(&keys, &values, scale)?,
            };
            let o = o.reshape(&[heads, n, d])?.transpose(&[1, 0, 2])?.reshape(&[n, heads * d])?;
            x = x.add(&layer.o.forward(&o)?)?;
            x = x.add(&self.mlp(layer, &x, eps)?)?;
        }
        cache.tokens += real;
        let (keep, real) = (keep.clamp(1, real) as i32, real as i32);
        let hidden = c.hidden_size as i32;
        let last = x.slice(&[real - keep, 0], &[real, hidden])?.rms_norm(&self.norm, eps)?;
        self.lm_head.forward(&last)?.astype(DType::F32)
    }

    fn mlp(&self, layer: &Layer, x: &Array, eps: f32) -> Result<Array> {
        let h = x.rms_norm(&layer.post_norm, eps)?;
        let gate = layer.gate.forward(&h)?;
        layer.down.forward(&gate.swiglu(&layer.up.forward(&h)?)?)
    }

    /// One token for each of several sequences at once, each at its cache's next
    /// position: the projections and the MLP as one batch (the weights read once for
    /// all), attention per sequence over its own buffers. `[batch, vocab]` f32 (lazy).
    pub fn decode_batch(&self, tokens: &[u32], caches: &mut [&mut KvCache]) -> Result<Array> {
        let c = &self.config;
        let b = tokens.len() as i32;
        let (heads, kvh, d) =
            (c.num_attention_heads as i32, c.num_key_value_heads as i32, c.head_dim() as i32);
        let positions: Vec<i64> = caches.iter().map(|c| c.next_position()).collect();
        let (cos, sin) = self.rotary(&[positions.clone(), positions.clone(), positions])?;
        for cache in caches.iter_mut() {
            self.reserve(cache, 1)?;
        }
        let scale = 1.0 / (d as f32).sqrt();
        let eps = c.rms_norm_eps as f32;
        let mut x = self.embed(tokens, None)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let h = x.rms_norm(&layer.input_norm, eps)?;
            let q = rotate(&layer.q.forward(&h)?.reshape(&[b, heads, d])?, &cos, &sin)?;
            let k = rotate(&layer.k.forward(&h)?.reshape(&[b, kvh, d])?, &cos, &sin)?;
            let v = layer.v.forward(&h)?.reshape(&[b, kvh, d])?;
            let mut outs = Vec::with_capacity(caches.len());
            for (s, cache) in caches.iter_mut().enumerate() {
                let s = s as i32;
                // Row s as [1, n, 1, d].
                let row = |a: &Array, n: i32| a.slice(&[s, 0, 0], &[s + 1, n, d])?.reshape(&[1, n, 1, d]);
                let (keys, values) = self.append(cache, i, &row(&k, kvh)?, &row(&v, kvh)?, 1)?;
                outs.push(row(&q, heads)?.attention(&keys, &values, scale, None)?.reshape(&[1, heads * d])?);
            }
            let o = Array::concat(&outs.iter().collect::<Vec<_>>(), 0)?;
            x = x.add(&layer.o.forward(&o)?)?;
            x = x.add(&self.mlp(layer, &x, eps)?)?;
        }
        for cache in caches.iter_mut() {
            cache.tokens += 1;
        }
        self.lm_head.forward(&x.rms_norm(&self.norm, eps)?)?.astype(DType::F32)
    }

    /// Sets the rope delta a prompt's positions left (decoding continues from it).
    pub fn set_rope_delta(cache: &mut KvCache, delta: i64) {
        cache.rope_delta = delta;
    }
}

/// Evaluates a step's `logits` with every cache buffer it wrote, and copies the logits
/// to the host as rows of `vocab`.
#[cfg(test)]
pub fn evaluate(logits: &Array, caches: &[&KvCache]) -> Result<Vec<Vec<f32>>> {
    let mut pending = vec![logits];
    for cache in caches {
        pending.extend(cache.arrays());
    }
    crate::array::eval(&pending)?;
    let shape = logits.shape();
    let vocab = *shape.last().unwrap_or(&1);
    Ok(logits.to_f32()?.chunks(vocab.max(1)).map(<[f32]>::to_vec).collect())
}
