//! The language model: a Qwen2 decoder (RMSNorm, attention with q/k/v biases and
//! grouped KV heads, SwiGLU) whose rotary positions come three to a token (M-RoPE), with
//! a KV cache per sequence.

use candle_core::{D, Device, Tensor};
use kiln_core::{Error, Result};

use super::config::QwenVlConfig;
use super::host::{self, Heads, Span};
use super::rope::mrope_cos_sin;
use super::vision::{rotary_tensors, rotate};
use super::weights::{Linear, Mlp, Weights, add_rms_norm, rms_norm, with_rows};
use crate::backend;

struct Layer {
    input_norm: Tensor,
    post_norm: Tensor,
    qkv: Qkv,
    o: Linear,
    mlp: Mlp,
}

/// The query, key and value projections: one layer when they can be joined
/// ([`Linear::concat`], bf16 tile layers), else three.
enum Qkv {
    Joined(Linear),
    Split(Linear, Linear, Linear),
}

impl Qkv {
    fn new(q: Linear, k: Linear, v: Linear) -> Qkv {
        match Linear::concat(&[&q, &k, &v]) {
            Some(joined) => Qkv::Joined(joined),
            None => Qkv::Split(q, k, v),
        }
    }

    /// q, k and v of `h` as rows of `q | k | v`, `widths` values each: the joined
    /// layer's own output, or three layers' results side by side.
    fn rows(&self, h: &Tensor, widths: [usize; 3]) -> Result<Vec<f32>> {
        match self {
            Qkv::Joined(all) => all.forward_rows(h),
            Qkv::Split(q, k, v) => {
                let parts = [q.forward_rows(h)?, k.forward_rows(h)?, v.forward_rows(h)?];
                let tokens = parts[0].len() / widths[0];
                let mut rows = Vec::with_capacity(tokens * widths.iter().sum::<usize>());
                for t in 0..tokens {
                    for (part, width) in parts.iter().zip(widths) {
                        rows.extend_from_slice(&part[t * width..(t + 1) * width]);
                    }
                }
                Ok(rows)
            }
        }
    }

    /// q, k and v of `h` (`[tokens, hidden]`) as `[tokens, heads · d]` tensors.
    fn forward(&self, h: &Tensor, widths: [usize; 3]) -> Result<[Tensor; 3]> {
        match self {
            Qkv::Split(q, k, v) => Ok([q.forward(h)?, k.forward(h)?, v.forward(h)?]),
            Qkv::Joined(all) => {
                let all = all.forward(h)?;
                let part = |at, width| all.narrow(1, at, width).and_then(|t| t.contiguous()).map_err(backend);
                Ok([
                    part(0, widths[0])?,
                    part(widths[0], widths[1])?,
                    part(widths[0] + widths[1], widths[2])?,
                ])
            }
        }
    }
}

/// One sequence's keys and values, per layer `[kv_heads, tokens, head_dim]`, and the
/// offset decoding adds to a token's index to get its position.
pub struct KvCache {
    keys: Vec<Option<Tensor>>,
    values: Vec<Option<Tensor>>,
    tokens: usize,
    rope_delta: i64,
}

impl KvCache {
    /// Tokens held.
    pub fn len(&self) -> usize {
        self.tokens
    }

    /// Whether nothing is held yet.
    pub fn is_empty(&self) -> bool {
        self.tokens == 0
    }

    /// Bytes held (f32 keys and values).
    pub fn bytes(&self) -> u64 {
        self.keys.iter().chain(&self.values).flatten().map(|t| (t.elem_count() * 4) as u64).sum()
    }

    /// Where the next token goes on all three position streams.
    pub fn next_position(&self) -> i64 {
        self.tokens as i64 + self.rope_delta
    }

    pub(super) fn set_rope_delta(&mut self, delta: i64) {
        self.rope_delta = delta;
    }

    /// A cache of the first `tokens` tokens, the same rope delta: views of the same
    /// storage (appending makes new tensors, so neither sees the other's later tokens).
    pub fn prefix(&self, tokens: usize) -> Result<KvCache> {
        if tokens > self.tokens {
            return Err(Error::InvalidInput(format!(
                "a prefix of {tokens} tokens of a cache of {}",
                self.tokens
            )));
        }
        let cut = |all: &[Option<Tensor>]| -> Result<Vec<Option<Tensor>>> {
            all.iter()
                .map(|t| match t {
                    Some(t) if tokens > 0 => t.narrow(1, 0, tokens).map(Some).map_err(backend),
                    _ => Ok(None),
                })
                .collect()
        };
        Ok(KvCache {
            keys: cut(&self.keys)?,
            values: cut(&self.values)?,
            tokens,
            rope_delta: self.rope_delta,
        })
    }
}

/// The decoder.
pub struct TextModel {
    config: QwenVlConfig,
    embed: Linear,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Linear,
    device: Device,
}

impl TextModel {
    /// The decoder's weights from `weights`.
    pub fn load(weights: &Weights, config: &QwenVlConfig) -> Result<Self> {
        let p = weights.text_prefix();
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let l = format!("{p}layers.{i}.");
                Ok(Layer {
                    input_norm: weights.get(&format!("{l}input_layernorm.weight"))?,
                    post_norm: weights.get(&format!("{l}post_attention_layernorm.weight"))?,
                    qkv: Qkv::new(
                        weights.linear(&format!("{l}self_attn.q_proj"), true)?,
                        weights.linear(&format!("{l}self_attn.k_proj"), true)?,
                        weights.linear(&format!("{l}self_attn.v_proj"), true)?,
                    ),
                    o: weights.linear(&format!("{l}self_attn.o_proj"), false)?,
                    mlp: Mlp::new(
                        weights.linear(&format!("{l}mlp.gate_proj"), false)?,
                        weights.linear(&format!("{l}mlp.up_proj"), false)?,
                        weights.linear(&format!("{l}mlp.down_proj"), false)?,
                    ),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let embed = weights.linear(&format!("{p}embed_tokens"), false)?;
        // Tied checkpoints write no lm_head; some untied ones are saved tied anyway.
        let lm_head = if !config.tie_word_embeddings && weights.has("lm_head.weight") {
            weights.linear("lm_head", false)?
        } else {
            weights.tied_head(&embed)?
        };
        Ok(TextModel {
            config: config.clone(),
            embed,
            layers,
            norm: weights.get(&format!("{p}norm.weight"))?,
            lm_head,
            device: weights.device().clone(),
        })
    }

    /// An empty cache for one sequence.
    pub fn new_cache(&self) -> KvCache {
        let n = self.layers.len();
        KvCache { keys: vec![None; n], values: vec![None; n], tokens: 0, rope_delta: 0 }
    }

    /// Token embeddings `[tokens, hidden]`, with `images`' rows (one per
    /// `<|image_pad|>`, in order) in place of the image pad tokens' when given (their
    /// count must match); without images every id is embedded as it is.
    pub fn embed(&self, ids: &[u32], images: Option<&Tensor>) -> Result<Tensor> {
        let vocab = self.config.vocab_size as u32;
        if let Some(bad) = ids.iter().find(|&&t| t >= vocab) {
            return Err(Error::InvalidInput(format!("token id {bad} is outside the vocabulary of {vocab}")));
        }
        let mut x = self.embed.rows(ids, &self.device)?;
        // Without images the pad token is embedded as a token like any other: a model may
        // generate it, and transformers embeds it so when no pixels come with it.
        if let Some(rows) = images {
            let n = rows.dim(0).map_err(backend)?;
            if let Some(pick) = kiln_core::qwen2vl::image_row_picks(ids, self.config.image_token_id, n)? {
                let both = Tensor::cat(&[&x, rows], 0).map_err(backend)?;
                let pick = Tensor::new(pick.as_slice(), &self.device).map_err(backend)?;
                x = both.index_select(&pick, 0).map_err(backend)?;
            }
        }
        Ok(x)
    }

    /// Runs `x` (`[tokens, hidden]`, the tokens after those `cache` holds) at
    /// `positions` (time, height, width per token), appending their keys and values to
    /// `cache`; returns the logits of the last `keep` tokens, `[keep, vocab]`.
    pub fn forward(
        &self,
        x: &Tensor,
        positions: &[Vec<i64>; 3],
        cache: &mut KvCache,
        keep: usize,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (tokens, _) = x.dims2().map_err(backend)?;
        let (heads, kv_heads, head_dim) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim());
        let (cos_rows, sin_rows) = mrope_cos_sin(positions, head_dim, c.rope_theta, c.mrope_section);
        let past = cache.tokens;
        // The CPU rotates and attends on the layers' rows (`host.rs`); a GPU runs graphs.
        let graph = if self.device.is_cpu() {
            None
        } else {
            let (cos, sin) = rotary_tensors(&cos_rows, &sin_rows, head_dim, &self.device)?;
            Some((causal_mask(tokens, past, &self.device)?, cos, sin))
        };
        let widths = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim];
        let mut x = x.clone();
        let mut h = rms_norm(&x, self.norm_before(0), c.rms_norm_eps)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let attended = match &graph {
                None => {
                    let width: usize = widths.iter().sum();
                    let mut rows = layer.qkv.rows(&h, widths)?;
                    // q's heads and k's are adjacent in a row: one pass rotates both.
                    host::rotate(&mut rows, width, 0, heads + kv_heads, head_dim, &cos_rows, &sin_rows);
                    // The new keys or values (columns `at..` of each row), `[kv_heads, tokens, d]`.
                    let new = |at: usize| {
                        let part: Vec<f32> =
                            rows.chunks_exact(width).flat_map(|r| &r[at..at + widths[1]]).copied().collect();
                        Tensor::from_vec(part, (tokens, kv_heads, head_dim), &self.device)
                            .and_then(|t| t.transpose(0, 1))
                            .map_err(backend)
                    };
                    let k = append(&mut cache.keys[i], new(widths[0])?)?;
                    let v = append(&mut cache.values[i], new(widths[0] + widths[1])?)?;
                    let total = past + tokens;
                    let mut out = vec![0f32; tokens * heads * head_dim];
                    with_rows(&k, |k| {
                        with_rows(&v, |v| {
                            host::attention(
                                Heads::in_rows(&rows, 0, width, head_dim),
                                Heads::head_major(k, total, head_dim),
                                Heads::head_major(v, total, head_dim),
                                (heads, kv_heads, head_dim),
                                &[Span { queries: 0..tokens, keys: 0..total, causal: Some(past) }],
                                &mut out,
                            )
                        })
                    })??;
                    Tensor::from_vec(out, (tokens, heads * head_dim), &self.device).map_err(backend)?
                }
                Some((mask, cos, sin)) => {
                    let [q, k, v] = layer.qkv.forward(&h, widths)?;
                    let q = q.reshape((tokens, heads, head_dim)).map_err(backend)?;
                    let k = k.reshape((tokens, kv_heads, head_dim)).map_err(backend)?;
                    let v = v.reshape((tokens, kv_heads, head_dim)).map_err(backend)?;
                    let q = rotate(&q, cos, sin)?.transpose(0, 1).map_err(backend)?; // [heads, tokens, d]
                    let k = rotate(&k, cos, sin)?.transpose(0, 1).map_err(backend)?;
                    let v = v.transpose(0, 1).map_err(backend)?;
                    let (k, v) = (append(&mut cache.keys[i], k)?, append(&mut cache.values[i], v)?);
                    attend(&q, &k, &v, mask, heads / kv_heads, head_dim)?
                        .transpose(0, 1)
                        .and_then(|a| a.reshape((tokens, heads * head_dim)))
                        .map_err(backend)?
                }
            };
            (x, h) = self.residuals(layer, i, &x, &attended)?;
        }
        cache.tokens += tokens;
        // `h` is the final norm's output.
        let last = h.narrow(0, tokens - keep.min(tokens), keep.min(tokens)).map_err(backend)?;
        self.lm_head.forward(&last)
    }
}

impl TextModel {
    /// One token for each of several sequences at once: `tokens[b]` at position
    /// `positions[b]` (the same on all three streams, as after a prompt) appended to
    /// `caches[b]`. The projections and the MLP run as one batch — the weights are read
    /// once for all the sequences — and attention runs per sequence over its own cache.
    /// Returns `[batch, vocab]`.
    pub fn decode_batch(
        &self,
        tokens: &[u32],
        positions: &[i64],
        caches: &mut [&mut KvCache],
    ) -> Result<Tensor> {
        let c = &self.config;
        let batch = tokens.len();
        let (heads, kv_heads, head_dim) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim());
        let streams = [positions.to_vec(), positions.to_vec(), positions.to_vec()];
        let (cos, sin) = mrope_cos_sin(&streams, head_dim, c.rope_theta, c.mrope_section);
        let (cos, sin) = rotary_tensors(&cos, &sin, head_dim, &self.device)?;
        let widths = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim];
        let mut x = self.embed(tokens, None)?;
        let mut h = rms_norm(&x, self.norm_before(0), c.rms_norm_eps)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let [q, k, v] = layer.qkv.forward(&h, widths)?;
            let q = rotate(&q.reshape((batch, heads, head_dim)).map_err(backend)?, &cos, &sin)?;
            let k = rotate(&k.reshape((batch, kv_heads, head_dim)).map_err(backend)?, &cos, &sin)?;
            let v = v.reshape((batch, kv_heads, head_dim)).map_err(backend)?;
            let mut outs = Vec::with_capacity(batch);
            for (b, cache) in caches.iter_mut().enumerate() {
                let row = |t: &Tensor| t.narrow(0, b, 1).and_then(|t| t.transpose(0, 1)).map_err(backend);
                let (qb, kb, vb) = (row(&q)?, row(&k)?, row(&v)?);
                let (kb, vb) = (append(&mut cache.keys[i], kb)?, append(&mut cache.values[i], vb)?);
                let mask = causal_mask(1, kb.dim(1).map_err(backend)? - 1, &self.device)?;
                let out = attend(&qb, &kb, &vb, &mask, heads / kv_heads, head_dim)?;
                outs.push(
                    out.transpose(0, 1).and_then(|o| o.reshape((1, heads * head_dim))).map_err(backend)?,
                );
            }
            let attended = Tensor::cat(&outs, 0).map_err(backend)?;
            (x, h) = self.residuals(layer, i, &x, &attended)?;
        }
        for cache in caches.iter_mut() {
            cache.tokens += 1;
        }
        self.lm_head.forward(&h)
    }

    /// The norm in front of layer `i`: its input norm, or after the last layer the final one.
    fn norm_before(&self, i: usize) -> &Tensor {
        self.layers.get(i).map_or(&self.norm, |l| &l.input_norm)
    }

    /// Layer `i`'s second half after its attention (`attended`, on the residual stream
    /// `x`): the output projection and the MLP, each added to the stream together with
    /// the norm that follows it (`add_rms_norm`). Returns the stream and its norm for
    /// what comes next (layer `i + 1`, or the output head).
    fn residuals(&self, layer: &Layer, i: usize, x: &Tensor, attended: &Tensor) -> Result<(Tensor, Tensor)> {
        let eps = self.config.rms_norm_eps;
        let (sum, h) = add_rms_norm(x, &layer.o.forward(attended)?, &layer.post_norm, eps)?;
        add_rms_norm(&sum, &layer.mlp.forward(&h)?, self.norm_before(i + 1), eps)
    }
}

/// `cache` with `new` (`[kv_heads, tokens, d]`) appended along the tokens; the whole.
fn append(cache: &mut Option<Tensor>, new: Tensor) -> Result<Tensor> {
    let all = match cache.take() {
        Some(old) => Tensor::cat(&[&old, &new], 1).map_err(backend)?,
        None => new.contiguous().map_err(backend)?,
    };
    *cache = Some(all.clone());
    Ok(all)
}

/// `[tokens, past + tokens]`: 0 where a query may look, −∞ where it may not (a later
/// token).
fn causal_mask(tokens: usize, past: usize, device: &Device) -> Result<Tensor> {
    let total = past + tokens;
    let values: Vec<f32> = (0..tokens)
        .flat_map(|i| (0..total).map(move |j| if j <= past + i { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    Tensor::from_vec(values, (tokens, total), device).map_err(backend)
}

/// Causal attention with `group` query heads per KV head: q `[heads, n, d]`, k and v
/// `[kv_heads, total, d]` → `[heads, n, d]`.
fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    group: usize,
    head_dim: usize,
) -> Result<Tensor> {
    let (kv_heads, total, d) = k.dims3().map_err(backend)?;
    let repeat = |t: &Tensor| {
        t.unsqueeze(1)
            .and_then(|t| t.expand((kv_heads, group, total, d)))
            .and_then(|t| t.reshape((kv_heads * group, total, d)))
    };
    let (k, v) = (repeat(k).map_err(backend)?, repeat(v).map_err(backend)?);
    let q = q.contiguous().map_err(backend)?;
    let scores =
        (q.matmul(&k.t().map_err(backend)?).map_err(backend)? / (head_dim as f64).sqrt()).map_err(backend)?;
    let scores = scores.broadcast_add(mask).map_err(backend)?;
    let probs = candle_nn::ops::softmax(&scores, D::Minus1).map_err(backend)?;
    probs.matmul(&v).map_err(backend)
}
