//! A BERT encoder written against MLX: the graph is built per batch from lazy ops and
//! evaluated once, with MLX's fused LayerNorm and scaled-dot-product attention, and
//! the embedding head (pooling, normalisation) on the device in f32.

use std::path::Path;

use kiln_core::{DType, EmbeddingHead, Error, Pooling, Result};
use serde::Deserialize;

use crate::array::{Array, Weights};

/// The parts of a Hugging Face BERT `config.json` the encoder reads.
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
}

fn default_act() -> String {
    "gelu".into()
}

fn default_type_vocab() -> usize {
    2
}

fn default_eps() -> f64 {
    1e-12
}

/// Weight quantization: MLX's groupwise affine scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quant {
    /// 4 or 8.
    pub bits: usize,
    /// Elements sharing a scale and a bias along a row (32, 64 or 128).
    pub group_size: usize,
}

/// `x @ W^T + b`, the weight kept transposed (a view) or quantized.
enum Linear {
    Dense { weight_t: Array, bias: Array },
    Quantized { weight: Array, scales: Array, biases: Array, bias: Array, quant: Quant },
}

impl Linear {
    fn forward(&self, x: &Array) -> Result<Array> {
        match self {
            Linear::Dense { weight_t, bias } => x.addmm(weight_t, bias),
            Linear::Quantized { weight, scales, biases, bias, quant } => {
                x.quantized_matmul(weight, scales, biases, quant.group_size, quant.bits)?.add(bias)
            }
        }
    }

    fn arrays(&self) -> Vec<&Array> {
        match self {
            Linear::Dense { weight_t, bias } => vec![weight_t, bias],
            Linear::Quantized { weight, scales, biases, bias, .. } => vec![weight, scales, biases, bias],
        }
    }
}

struct Norm {
    weight: Array,
    bias: Array,
}

struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attention_out: Linear,
    attention_norm: Norm,
    up: Linear,
    down: Linear,
    output_norm: Norm,
}

/// One batch's inputs, each `[batch, sequence]` row-major.
pub struct Batch {
    pub ids: Vec<i64>,
    pub types: Vec<i64>,
    pub mask: Vec<i64>,
    pub batch: usize,
    pub sequence: usize,
}

/// A loaded encoder.
pub struct Bert {
    word: Array,
    position: Array,
    token_type: Array,
    embedding_norm: Norm,
    layers: Vec<Layer>,
    heads: usize,
    hidden: usize,
    eps: f32,
    dtype: DType,
    /// Sum the embeddings with kiln's CUDA kernel ([`Array::bert_embed_cuda`]) for
    /// single texts; set on an MLX CUDA GPU.
    pub cuda_embedding: bool,
}

/// Reads the tensors of a checkpoint, at `prefix` (`""` or `"bert."`).
struct Reader<'a> {
    weights: &'a Weights,
    prefix: &'a str,
    dtype: DType,
    file: &'a Path,
}

impl Reader<'_> {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Array> {
        let full = format!("{}{name}", self.prefix);
        let array = self.weights.get(&full).ok_or_else(|| {
            Error::model_load(self.file, format!("no tensor `{full}`; not a BERT checkpoint?"))
        })?;
        if array.shape() != shape {
            return Err(Error::model_load(
                self.file,
                format!("tensor `{full}` is {:?}, a BERT of this config.json needs {shape:?}", array.shape()),
            ));
        }
        array.astype(self.dtype)
    }

    fn norm(&self, name: &str, width: usize) -> Result<Norm> {
        Ok(Norm {
            weight: self.tensor(&format!("{name}.weight"), &[width])?,
            bias: self.tensor(&format!("{name}.bias"), &[width])?,
        })
    }

    fn linear(&self, name: &str, inputs: usize, outputs: usize, quant: Option<Quant>) -> Result<Linear> {
        let weight = self.tensor(&format!("{name}.weight"), &[outputs, inputs])?;
        let bias = self.tensor(&format!("{name}.bias"), &[outputs])?;
        Ok(match quant {
            None => Linear::Dense { weight_t: weight.transpose(&[1, 0])?, bias },
            Some(quant) => {
                let (weight, scales, biases) = weight.quantize(quant.group_size, quant.bits)?;
                Linear::Quantized { weight, scales, biases, bias, quant }
            }
        })
    }
}

impl Bert {
    /// Loads the encoder from `file` at `dtype`, its encoder's matrices quantized when
    /// asked; everything is evaluated here, so a bad checkpoint fails the load.
    pub fn load(file: &Path, config: &BertConfig, dtype: DType, quant: Option<Quant>) -> Result<Bert> {
        let weights = Weights::load(file)?;
        let prefix = if weights.get("embeddings.word_embeddings.weight").is_some() { "" } else { "bert." };
        let r = Reader { weights: &weights, prefix, dtype, file };
        let (h, ff) = (config.hidden_size, config.intermediate_size);
        if let Some(q) = quant
            && (!h.is_multiple_of(q.group_size) || !ff.is_multiple_of(q.group_size))
        {
            return Err(Error::Unsupported(format!(
                "provider `mlx`: quantization group size {} does not divide hidden_size {h} and intermediate_size \
                 {ff}",
                q.group_size
            )));
        }
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let l = format!("encoder.layer.{i}");
                Ok(Layer {
                    query: r.linear(&format!("{l}.attention.self.query"), h, h, quant)?,
                    key: r.linear(&format!("{l}.attention.self.key"), h, h, quant)?,
                    value: r.linear(&format!("{l}.attention.self.value"), h, h, quant)?,
                    attention_out: r.linear(&format!("{l}.attention.output.dense"), h, h, quant)?,
                    attention_norm: r.norm(&format!("{l}.attention.output.LayerNorm"), h)?,
                    up: r.linear(&format!("{l}.intermediate.dense"), h, ff, quant)?,
                    down: r.linear(&format!("{l}.output.dense"), ff, h, quant)?,
                    output_norm: r.norm(&format!("{l}.output.LayerNorm"), h)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let bert = Bert {
            word: r.tensor("embeddings.word_embeddings.weight", &[config.vocab_size, h])?,
            position: r
                .tensor("embeddings.position_embeddings.weight", &[config.max_position_embeddings, h])?,
            token_type: r.tensor("embeddings.token_type_embeddings.weight", &[config.type_vocab_size, h])?,
            embedding_norm: r.norm("embeddings.LayerNorm", h)?,
            layers,
            heads: config.num_attention_heads,
            hidden: h,
            eps: config.layer_norm_eps as f32,
            dtype,
            cuda_embedding: false,
        };
        let mut all = vec![&bert.word, &bert.position, &bert.token_type];
        all.extend([&bert.embedding_norm.weight, &bert.embedding_norm.bias]);
        for l in &bert.layers {
            for linear in [&l.query, &l.key, &l.value, &l.attention_out, &l.up, &l.down] {
                all.extend(linear.arrays());
            }
            all.extend([
                &l.attention_norm.weight,
                &l.attention_norm.bias,
                &l.output_norm.weight,
                &l.output_norm.bias,
            ]);
        }
        crate::array::eval(&all)?;
        Ok(bert)
    }

    /// Token vectors `[batch, sequence, hidden]` at the model's dtype, lazily. `ids`
    /// and `types` are flat (`[batch * sequence]`); `types` is `None` when every type id
    /// is 0 (single texts), which adds row 0 instead of gathering it per token.
    fn encode(
        &self,
        ids: &Array,
        types: Option<&Array>,
        mask: &Array,
        batch: usize,
        sequence: usize,
    ) -> Result<Array> {
        let (b, s, h) = (batch as i32, sequence as i32, self.hidden as i32);
        let x = match types {
            None if self.cuda_embedding => {
                self.word.bert_embed_cuda(&self.position, &self.token_type, &ids.reshape(&[b, s])?)?
            }
            types => {
                let positions = self.position.slice(&[0, 0], &[s, h])?;
                let words = self.word.embedding(ids)?.reshape(&[b, s, h])?;
                match types {
                    Some(types) => words.add(&self.token_type.embedding(types)?.reshape(&[b, s, h])?)?,
                    None => words.add(&self.token_type.slice(&[0, 0], &[1, h])?)?,
                }
                .add(&positions)?
            }
        };
        // Activations stay [tokens, hidden] between attentions, so every dense layer is
        // one large product (on CUDA, a 3-d input ran as 256 small batched ones).
        let mut x = x
            .layer_norm(&self.embedding_norm.weight, &self.embedding_norm.bias, self.eps)?
            .reshape(&[b * s, h])?;
        let heads = self.heads as i32;
        let head_dim = h / heads;
        let scale = 1.0 / (head_dim as f32).sqrt();
        let split = |t: Array| t.reshape(&[b, s, heads, head_dim])?.transpose(&[0, 2, 1, 3]);
        for l in &self.layers {
            let q = split(l.query.forward(&x)?)?;
            let k = split(l.key.forward(&x)?)?;
            let v = split(l.value.forward(&x)?)?;
            let context =
                q.attention(&k, &v, scale, Some(mask))?.transpose(&[0, 2, 1, 3])?.reshape(&[b * s, h])?;
            let attended = l.attention_out.forward(&context)?.add(&x)?;
            x = attended.layer_norm(&l.attention_norm.weight, &l.attention_norm.bias, self.eps)?;
            let gelu = l.up.forward(&x)?.gelu()?;
            let out = l.down.forward(&gelu)?.add(&x)?;
            x = out.layer_norm(&l.output_norm.weight, &l.output_norm.bias, self.eps)?;
        }
        let x = x.reshape(&[b, s, h])?;
        Ok(x)
    }

    /// A batch's result as a lazy MLX graph, for [`Array::to_f32`] or
    /// [`Array::start_f32`]: with a head, `[batch, hidden]` pooled (and normalised) in
    /// f32; without, the token vectors `[batch, sequence, hidden]` in f32.
    pub fn graph(&self, batch: &Batch, head: Option<EmbeddingHead>) -> Result<Array> {
        let Batch { ids, types, mask, batch, sequence } = batch;
        let (batch, sequence) = (*batch, *sequence);
        let vocab = self.word.shape()[0];
        // An id past the table would read out of bounds in the embedding kernel (MLX's
        // gather clamps it silently), so both paths refuse it here.
        if let Some(&bad) = ids.iter().find(|&&x| !(0..vocab as i64).contains(&x)) {
            return Err(Error::InvalidInput(format!(
                "input_ids value {bad} is out of range: the vocabulary has {vocab} tokens (ids 0..{vocab})"
            )));
        }
        let to_i32 = |v: &[i64], what: &str| -> Result<Vec<u8>> {
            v.iter()
                .map(|&x| {
                    i32::try_from(x)
                        .map(i32::to_le_bytes)
                        .map_err(|_| Error::InvalidInput(format!("{what} value {x} is out of range")))
                })
                .collect::<Result<Vec<_>>>()
                .map(|v| v.concat())
        };
        let flat = [batch * sequence];
        let ids = Array::from_bytes(&to_i32(ids, "input_ids")?, DType::I32, &flat)?;
        let types = match types.iter().all(|&t| t == 0) {
            true => None,
            false => Some(Array::from_bytes(&to_i32(types, "token_type_ids")?, DType::I32, &flat)?),
        };
        // Additive mask [batch, 1, 1, sequence], made at the model's dtype on the host: 0
        // for real tokens, the dtype's most negative finite value for padding (finite,
        // so a masked score is never NaN).
        let (zero, lowest): (&[u8], &[u8]) = match self.dtype {
            DType::F16 => (&[0, 0], &[0xFF, 0xFB]),
            DType::BF16 => (&[0, 0], &[0x7F, 0xFF]),
            _ => (&[0, 0, 0, 0], &[0xFF, 0xFF, 0x7F, 0xFF]),
        };
        let additive: Vec<u8> =
            mask.iter().flat_map(|&m| if m != 0 { zero } else { lowest }).copied().collect();
        let additive = Array::from_bytes(&additive, self.dtype, &[batch, 1, 1, sequence])?;
        let tokens = self.encode(&ids, types.as_ref(), &additive, batch, sequence)?.astype(DType::F32)?;
        let Some(head) = head else { return Ok(tokens) };
        let keep: Vec<u8> = mask.iter().flat_map(|&m| f32::from(u8::from(m != 0)).to_le_bytes()).collect();
        let keep = Array::from_bytes(&keep, DType::F32, &[batch, sequence, 1])?;
        let pooled = match head.pooling {
            Pooling::Cls => tokens
                .slice(&[0, 0, 0], &[batch as i32, 1, self.hidden as i32])?
                .reshape(&[batch as i32, self.hidden as i32])?,
            Pooling::Mean | Pooling::MeanSqrtLen => {
                let sum = tokens.mul(&keep)?.sum(1, false)?;
                let count = keep.sum(1, false)?.maximum(&Array::scalar(1e-9, DType::F32)?)?;
                let count = if head.pooling == Pooling::Mean { count } else { count.sqrt()? };
                sum.div(&count)?
            }
            Pooling::Max => {
                let lowest = Array::scalar(f32::MIN, DType::F32)?;
                keep.astype(DType::U8)?.select(&tokens, &lowest)?.max(1, false)?
            }
        };
        if head.normalize {
            let norm =
                pooled.mul(&pooled)?.sum(1, true)?.sqrt()?.maximum(&Array::scalar(1e-12, DType::F32)?)?;
            pooled.div(&norm)
        } else {
            Ok(pooled)
        }
    }
}
