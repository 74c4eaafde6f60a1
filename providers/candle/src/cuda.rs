//! BERT on NVIDIA GPUs with kiln's own kernels between cuBLAS's matrix products.
//!
//! Profiled with Nsight Compute on an H200 (`scripts/device/candle_kernels.sh`),
//! candle-transformers' graph spent 47 ms on a batch of 256 × 128 tokens of MiniLM in
//! f16, 31 ms of it in candle's broadcast adds and divides (a bias over rows, the mask
//! over heads, a five-pass softmax) and 2 ms in the matrix products. Here every step
//! between two products is one kernel (`kernels/bert.cu`, compiled to PTX by nvcc at
//! build time): embeddings + LayerNorm, QKV bias + head split (+ the 1/√d scale),
//! masked softmax, head merge, bias + residual + LayerNorm, bias + GELU, and the
//! embedding head. Q, K and V are one product. The products stay candle's (cuBLAS).
//!
//! Each kernel is launched through a [`CustomOp1`] whose output candle allocates and
//! owns; all work runs on the device's one stream, in order.
//!
//! A batch with an embedding head can be started without waiting for it
//! ([`Model::start`](kiln_core::Model::start), `provider.options.overlap_batches`): its
//! result is copied into page-locked host memory behind the kernels on the same stream,
//! and only the responder thread waits for that copy — so the model thread launches the
//! next batch while this one runs, and the GPU does not idle through the host's copy
//! back and launches between batches.

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc;
use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
use candle_core::cuda_backend::cudarc::driver::{
    CudaEvent, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PinnedHostSlice, PushKernelArg,
};
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, DType as CDType, Device as CDevice, Layout, Shape, Storage,
    Tensor as CTensor, bail,
};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::Config as BertConfig;
use kiln_core::{
    DType, EmbeddingHead, Error, Inputs, Outputs, Pending, Pooling, Result, SENTENCE_EMBEDDING, Tensor,
};

use crate::{BertEncoder, LAST_HIDDEN_STATE, backend, output_dtype};

/// The kernels, as PTX for the build's `CUDA_COMPUTE_CAP` (the driver compiles it for
/// the GPU it runs on).
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/bert.ptx"));
const MODULE: &str = "kiln_bert";
/// The llama decoder's kernels (`kernels/llama.cu`, `dense_llama/gpu.rs`).
const LLAMA_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/llama.ptx"));
const LLAMA_MODULE: &str = "kiln_llama";

/// Which PTX module a kernel is in.
#[derive(Clone, Copy)]
pub(crate) enum Kernels {
    Bert,
    Llama,
}

/// A dense layer: weight `[outputs, inputs]` as stored, and its bias.
struct Dense {
    weight: CTensor,
    bias: CTensor,
}

struct Norm {
    gamma: CTensor,
    beta: CTensor,
}

struct Layer {
    /// Q, K and V as one layer of `3 * hidden` outputs (rows q | k | v).
    qkv: Dense,
    attention_out: Dense,
    attention_norm: Norm,
    up: Dense,
    down: Dense,
    output_norm: Norm,
}

/// BERT weights on a GPU, at the model's dtype.
pub(crate) struct CudaBert {
    hidden: usize,
    heads: usize,
    eps: f32,
    vocab: usize,
    positions: usize,
    types: usize,
    word: CTensor,
    position: CTensor,
    token_type: CTensor,
    embedding_norm: Norm,
    layers: Vec<Layer>,
    /// Page-locked buffers for started batches' results, kept between batches (pinning
    /// host memory is a slow driver call); `None`: batches are not overlapped.
    results: Option<Arc<Mutex<Vec<PinnedHostSlice<f32>>>>>,
    /// Attention in one kernel (`fused_attention` in bert.cu) where it applies.
    fused_attention: bool,
}

fn dense(vb: &VarBuilder, inputs: usize, outputs: usize) -> candle_core::Result<Dense> {
    Ok(Dense { weight: vb.get((outputs, inputs), "weight")?, bias: vb.get(outputs, "bias")? })
}

fn norm(vb: &VarBuilder, hidden: usize) -> candle_core::Result<Norm> {
    Ok(Norm { gamma: vb.get(hidden, "weight")?, beta: vb.get(hidden, "bias")? })
}

impl CudaBert {
    /// Why kiln's CUDA kernels cannot run this BERT, if they cannot: beyond what the
    /// CPU kernels need (`cpu::unsupported`), they take eight columns at a time.
    pub(crate) fn unsupported(config: &BertConfig) -> Option<&'static str> {
        let head_dim = config.hidden_size / config.num_attention_heads.max(1);
        if !config.hidden_size.is_multiple_of(8)
            || !config.intermediate_size.is_multiple_of(8)
            || !head_dim.is_multiple_of(8)
        {
            return Some("hidden, head and feed-forward sizes must be multiples of 8");
        }
        crate::cpu::unsupported(config)
    }

    /// Reads the weights from `vb` (a var builder on the GPU at the model's dtype, at
    /// the model's root: bare names, or `bert.`-prefixed as task heads save them).
    /// `overlap`: batches with an embedding head may be started without waiting for
    /// them; `fused_attention`: attention in one kernel where it applies.
    pub(crate) fn load(
        vb: &VarBuilder,
        config: &BertConfig,
        overlap: bool,
        fused_attention: bool,
    ) -> candle_core::Result<Self> {
        crate::weights::at_bert_root(vb, |vb| Self::load_at(vb, config, overlap, fused_attention))
    }

    fn load_at(
        vb: &VarBuilder,
        config: &BertConfig,
        overlap: bool,
        fused_attention: bool,
    ) -> candle_core::Result<Self> {
        let h = config.hidden_size;
        let e = vb.pp("embeddings");
        let layers = crate::weights::encoder_layers(vb, config, dense, norm)?
            .into_iter()
            .map(|l| {
                let (q, k, v) = (l.query, l.key, l.value);
                Ok(Layer {
                    qkv: Dense {
                        weight: CTensor::cat(&[&q.weight, &k.weight, &v.weight], 0)?,
                        bias: CTensor::cat(&[&q.bias, &k.bias, &v.bias], 0)?,
                    },
                    attention_out: l.attention_out,
                    attention_norm: l.attention_norm,
                    up: l.up,
                    down: l.down,
                    output_norm: l.output_norm,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(CudaBert {
            hidden: h,
            heads: config.num_attention_heads,
            eps: config.layer_norm_eps as f32,
            vocab: config.vocab_size,
            positions: config.max_position_embeddings,
            types: config.type_vocab_size,
            word: e.pp("word_embeddings").get((config.vocab_size, h), "weight")?,
            position: e.pp("position_embeddings").get((config.max_position_embeddings, h), "weight")?,
            token_type: e.pp("token_type_embeddings").get((config.type_vocab_size, h), "weight")?,
            embedding_norm: norm(&e.pp("LayerNorm"), h)?,
            layers,
            results: overlap.then(Default::default),
            fused_attention,
        })
    }

    /// Checks a batch's ids against the model before they reach the GPU, where an out
    /// of range index would read other memory.
    pub(crate) fn check(&self, ids: &[i64], types: &[i64], sequence: usize) -> Result<()> {
        if sequence > self.positions {
            return Err(Error::InvalidInput(format!(
                "a sequence of {sequence} tokens is longer than the model's {} positions",
                self.positions
            )));
        }
        let out_of =
            |values: &[i64], limit: usize| values.iter().find(|&&v| v < 0 || v as usize >= limit).copied();
        if let Some(id) = out_of(ids, self.vocab) {
            return Err(Error::InvalidInput(format!(
                "token id {id} is outside the vocabulary (0..{})",
                self.vocab
            )));
        }
        if let Some(t) = out_of(types, self.types) {
            return Err(Error::InvalidInput(format!("token type {t} is outside 0..{}", self.types)));
        }
        Ok(())
    }

    /// The encoder: ids and token types `[batch, sequence]` (i64) and the attention
    /// mask as f32 `[batch, sequence]`, to token vectors `[batch * sequence, hidden]`.
    pub(crate) fn forward(
        &self,
        ids: &CTensor,
        types: &CTensor,
        mask: &CTensor,
    ) -> candle_core::Result<CTensor> {
        let (batch, sequence) = ids.dims2()?;
        let (h, heads) = (self.hidden, self.heads);
        let head_dim = h / heads;
        let tokens = batch * sequence;
        let dtype = self.word.dtype();
        let mut x = Launch {
            kernels: Kernels::Bert,
            kernel: "embed",
            others: &[
                types,
                &self.word,
                &self.position,
                &self.token_type,
                &self.embedding_norm.gamma,
                &self.embedding_norm.beta,
            ],
            out: (Shape::from((tokens, h)), dtype),
            scalars: &[
                Arg::I32(sequence as i32),
                Arg::I32(h as i32),
                Arg::I32(self.vocab as i32),
                Arg::I32(self.types as i32),
                Arg::F32(self.eps),
            ],
            config: blocks(tokens, 1),
        }
        .run(ids)?;
        let scale = 1.0 / (head_dim as f32).sqrt();
        // The fused kernel's limits (kernels/bert.cu: FA_D, FA_KEYS); tensor cores take
        // 2-byte types only.
        let fused = self.fused_attention && head_dim == 32 && sequence <= 128 && dtype != CDType::F32;
        for layer in &self.layers {
            let qkv = x.matmul(&layer.qkv.weight.t()?)?;
            let merged = if fused {
                Launch {
                    kernels: Kernels::Bert,
                    kernel: "fused_attention",
                    others: &[&layer.qkv.bias, mask],
                    out: (Shape::from((tokens, h)), dtype),
                    scalars: &[Arg::I32(sequence as i32), Arg::I32(heads as i32), Arg::F32(scale)],
                    // One block of four warps per (text, head).
                    config: blocks(batch * heads, 1),
                }
                .run(&qkv)?
            } else {
                self.attention(&qkv, &layer.qkv.bias, mask, batch, sequence, scale)?
            };
            x = bias_residual_norm(
                &merged.matmul(&layer.attention_out.weight.t()?)?,
                &layer.attention_out.bias,
                &x,
                &layer.attention_norm,
                self.eps,
            )?;
            let up = x.matmul(&layer.up.weight.t()?)?;
            let width = up.dim(1)?;
            let up = Launch {
                kernels: Kernels::Bert,
                kernel: "bias_gelu",
                others: &[&layer.up.bias],
                out: (up.shape().clone(), dtype),
                scalars: &[Arg::I32(tokens as i32), Arg::I32(width as i32)],
                config: columns(width, tokens),
            }
            .run(&up)?;
            x = bias_residual_norm(
                &up.matmul(&layer.down.weight.t()?)?,
                &layer.down.bias,
                &x,
                &layer.output_norm,
                self.eps,
            )?;
        }
        Ok(x)
    }

    /// Attention in five launches: the QKV product plus its bias split into heads, the
    /// scores' product, the masked softmax, the context's product, heads merged — to
    /// the context `[batch * sequence, hidden]`.
    fn attention(
        &self,
        qkv: &CTensor,
        bias: &CTensor,
        mask: &CTensor,
        batch: usize,
        sequence: usize,
        scale: f32,
    ) -> candle_core::Result<CTensor> {
        let (h, heads) = (self.hidden, self.heads);
        let head_dim = h / heads;
        let tokens = batch * sequence;
        let dtype = qkv.dtype();
        let attention_rows = batch * heads * sequence;
        let split = Launch {
            kernels: Kernels::Bert,
            kernel: "split_heads",
            others: &[bias],
            out: (Shape::from((3, batch, heads, sequence, head_dim)), dtype),
            scalars: &[
                Arg::I32(batch as i32),
                Arg::I32(sequence as i32),
                Arg::I32(heads as i32),
                Arg::I32(head_dim as i32),
                Arg::F32(scale),
            ],
            config: columns(3 * h, tokens),
        }
        .run(qkv)?;
        let (q, k, v) = (split.get(0)?, split.get(1)?, split.get(2)?);
        let scores = q.matmul(&k.t()?)?;
        let probabilities = Launch {
            kernels: Kernels::Bert,
            kernel: "masked_softmax",
            others: &[mask],
            out: (scores.shape().clone(), dtype),
            scalars: &[Arg::I64(attention_rows as i64), Arg::I32(heads as i32), Arg::I32(sequence as i32)],
            // One warp a row: four rows a block.
            config: blocks(attention_rows.div_ceil(THREADS / 32), 1),
        }
        .run(&scores)?;
        let context = probabilities.matmul(&v)?;
        Launch {
            kernels: Kernels::Bert,
            kernel: "merge_heads",
            others: &[],
            out: (Shape::from((tokens, h)), dtype),
            scalars: &[
                Arg::I32(tokens as i32),
                Arg::I32(sequence as i32),
                Arg::I32(heads as i32),
                Arg::I32(head_dim as i32),
            ],
            config: columns(h, tokens),
        }
        .run(&context)
    }
}

/// A started batch's result buffer and the event after its copy: dropped unread (the
/// batch's waiter gone), it waits for the copy before the buffer is freed, so the
/// device never writes into freed memory.
struct InFlight {
    buffer: Option<PinnedHostSlice<f32>>,
    done: CudaEvent,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.buffer.is_some() {
            let _ = self.done.synchronize();
        }
    }
}

/// `LayerNorm(x + bias + residual)`, rows of `[tokens, hidden]`.
fn bias_residual_norm(
    x: &CTensor,
    bias: &CTensor,
    residual: &CTensor,
    norm: &Norm,
    eps: f32,
) -> candle_core::Result<CTensor> {
    let (tokens, cols) = x.dims2()?;
    // A warp a row holds up to 1024 values in registers (`bias_residual_norm_warp`).
    if cols <= 1024 {
        return Launch {
            kernels: Kernels::Bert,
            kernel: "bias_residual_norm_warp",
            others: &[bias, residual, &norm.gamma, &norm.beta],
            out: (x.shape().clone(), x.dtype()),
            scalars: &[Arg::I32(tokens as i32), Arg::I32(cols as i32), Arg::F32(eps)],
            config: blocks(tokens.div_ceil(THREADS / 32), 1),
        }
        .run(x);
    }
    Launch {
        kernels: Kernels::Bert,
        kernel: "bias_residual_norm",
        others: &[bias, residual, &norm.gamma, &norm.beta],
        out: (x.shape().clone(), x.dtype()),
        scalars: &[Arg::I32(cols as i32), Arg::F32(eps)],
        config: blocks(tokens, 1),
    }
    .run(x)
}

/// The embedding head on the GPU: token vectors `[batch * sequence, hidden]` and the
/// f32 mask `[batch, sequence]` to f32 `[batch, hidden]`, with the arithmetic of
/// [`kiln_core::pool_tokens`].
pub(crate) fn pool(hidden: &CTensor, mask: &CTensor, head: EmbeddingHead) -> candle_core::Result<CTensor> {
    let (batch, sequence) = mask.dims2()?;
    let width = hidden.dim(1)?;
    let pooling = match head.pooling {
        Pooling::Cls => 0,
        Pooling::Mean => 1,
        Pooling::MeanSqrtLen => 2,
        Pooling::Max => 3,
    };
    Launch {
        kernels: Kernels::Bert,
        kernel: "pool",
        others: &[mask],
        out: (Shape::from((batch, width)), CDType::F32),
        scalars: &[
            Arg::I32(sequence as i32),
            Arg::I32(width as i32),
            Arg::I32(pooling),
            Arg::I32(i32::from(head.normalize)),
        ],
        config: blocks(batch, 1),
    }
    .run(hidden)
}

/// Threads in a block, for every kernel.
pub(crate) const THREADS: usize = 128;

/// A launch of `x` × `y` blocks of [`THREADS`] threads.
pub(crate) fn blocks(x: usize, y: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (x as u32, y as u32, 1), block_dim: (THREADS as u32, 1, 1), shared_mem_bytes: 0 }
}

/// A launch of the column kernels (bias + GELU, head split, head merge) over `count`
/// columns of `tokens` rows: eight columns a thread across a block, four token rows a
/// block on the grid's y dimension.
fn columns(count: usize, tokens: usize) -> LaunchConfig {
    blocks((count / 8).div_ceil(THREADS), tokens.div_ceil(4).min(65535))
}

/// A scalar kernel argument.
#[derive(Clone, Copy)]
pub(crate) enum Arg {
    I32(i32),
    I64(i64),
    F32(f32),
}

/// One kernel launch: `KERNEL_<dtype of the first input>(first, others.., out,
/// scalars..)`, every tensor contiguous, the output a new tensor of `out`.
pub(crate) struct Launch<'a> {
    pub(crate) kernels: Kernels,
    pub(crate) kernel: &'static str,
    pub(crate) others: &'a [&'a CTensor],
    pub(crate) out: (Shape, CDType),
    pub(crate) scalars: &'a [Arg],
    pub(crate) config: LaunchConfig,
}

impl Launch<'_> {
    pub(crate) fn run(&self, first: &CTensor) -> candle_core::Result<CTensor> {
        first.apply_op1_no_bwd(self)
    }
}

/// The device address of a contiguous tensor's first element.
fn address(storage: &CudaStorage, layout: &Layout, stream: &CudaStream) -> candle_core::Result<u64> {
    fn at<T>(slice: &CudaSlice<T>, offset: usize, stream: &CudaStream) -> u64 {
        // The guard records the read for candle's event tracking; one stream orders it.
        let (ptr, _read) = slice.device_ptr(stream);
        ptr + (offset * std::mem::size_of::<T>()) as u64
    }
    if !layout.is_contiguous() {
        bail!(
            "a kiln kernel's input is not contiguous (shape {:?}, stride {:?})",
            layout.dims(),
            layout.stride()
        );
    }
    let offset = layout.start_offset();
    Ok(match &storage.slice {
        CudaStorageSlice::F16(s) => at(s, offset, stream),
        CudaStorageSlice::BF16(s) => at(s, offset, stream),
        CudaStorageSlice::F32(s) => at(s, offset, stream),
        CudaStorageSlice::I64(s) => at(s, offset, stream),
        _ => bail!("a kiln kernel got a tensor of {:?}", storage.dtype()),
    })
}

fn suffix(dtype: CDType) -> candle_core::Result<&'static str> {
    Ok(match dtype {
        CDType::F16 => "f16",
        CDType::BF16 => "bf16",
        CDType::F32 => "f32",
        other => bail!("kiln's CUDA kernels run f16, bf16 and f32, not {other:?}"),
    })
}

impl CustomOp1 for Launch<'_> {
    fn name(&self) -> &'static str {
        self.kernel
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        bail!("{} is one of kiln's CUDA kernels; it has no CPU version", self.kernel)
    }

    fn cuda_fwd(&self, storage: &CudaStorage, layout: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let device = storage.device();
        let stream = device.cuda_stream();
        // Named after the model's dtype, the first floating input's (the embedding
        // kernel's first inputs are ids).
        let model_dtype = std::iter::once(storage.dtype())
            .chain(self.others.iter().map(|t| t.dtype()))
            .find(|d| d.is_float())
            .unwrap_or(storage.dtype());
        let name = format!("{}_{}", self.kernel, suffix(model_dtype)?);
        let (module, ptx) = match self.kernels {
            Kernels::Bert => (MODULE, PTX),
            Kernels::Llama => (LLAMA_MODULE, LLAMA_PTX),
        };
        let func = device.get_or_load_custom_func(&name, module, ptx)?;
        let mut addresses = vec![address(storage, layout, &stream)?];
        for other in self.others {
            let (other_storage, other_layout) = other.storage_and_layout();
            let Storage::Cuda(other_storage) = &*other_storage else {
                bail!("{name}: an input is not on the GPU");
            };
            addresses.push(address(other_storage, other_layout, &stream)?);
        }
        let (shape, dtype) = &self.out;
        let count = shape.elem_count();
        // SAFETY: every element is written by the kernel before anything reads it.
        let slice = unsafe {
            match dtype {
                CDType::F16 => CudaStorageSlice::F16(device.alloc::<half::f16>(count)?),
                CDType::BF16 => CudaStorageSlice::BF16(device.alloc::<half::bf16>(count)?),
                CDType::F32 => CudaStorageSlice::F32(device.alloc::<f32>(count)?),
                other => bail!("{name}: no output of {other:?}"),
            }
        };
        let out = CudaStorage { slice, device: device.clone() };
        addresses.push(address(&out, &Layout::contiguous(shape.clone()), &stream)?);
        let mut builder = func.builder();
        for address in &addresses {
            builder.arg(address);
        }
        for scalar in self.scalars {
            match scalar {
                Arg::I32(v) => builder.arg(v),
                Arg::I64(v) => builder.arg(v),
                Arg::F32(v) => builder.arg(v),
            };
        }
        // SAFETY: the arguments match the kernel's parameters (kernels/bert.cu), and
        // every address stays allocated until the stream has run the kernel: candle
        // frees device memory in stream order.
        unsafe { builder.launch(self.config) }.w()?;
        Ok((out, shape.clone()))
    }
}

impl BertEncoder {
    /// A batch through [`CudaBert`]: ids checked on the host, the encoder and the
    /// embedding head on the GPU, only the result copied back.
    pub(crate) fn run_cuda(&self, model: &CudaBert, inputs: &Inputs) -> Result<Outputs> {
        let (hidden, mask) = self.queue_cuda(model, inputs)?;
        let to_host = |t: &CTensor| t.to_device(&CDevice::Cpu).and_then(|t| t.flatten_all());
        if let Some(head) = self.info.head {
            let pooled = pool(&hidden, &mask, head).map_err(backend)?;
            let values = to_host(&pooled).and_then(|t| t.to_vec1::<f32>()).map_err(backend)?;
            return Ok(
                Outputs::new().with(SENTENCE_EMBEDDING, Tensor::from_vec(pooled.dims().to_vec(), values)?)
            );
        }
        let (batch, sequence) = mask.dims2().map_err(backend)?;
        let width = hidden.dim(1).map_err(backend)?;
        let shape = vec![batch, sequence, width];
        let tensor = if output_dtype(self.info.dtype) == DType::F16 {
            Tensor::from_vec(
                shape,
                to_host(&hidden).and_then(|t| t.to_vec1::<half::f16>()).map_err(backend)?,
            )?
        } else {
            let values =
                hidden.to_dtype(CDType::F32).and_then(|t| to_host(&t)).and_then(|t| t.to_vec1::<f32>());
            Tensor::from_vec(shape, values.map_err(backend)?)?
        };
        Ok(Outputs::new().with(LAST_HIDDEN_STATE, tensor))
    }

    /// A batch started ([`Model::start`](kiln_core::Model::start)): the encoder and the
    /// head queued, the pooled rows' copy into a page-locked buffer queued behind them;
    /// the returned [`Pending`] waits for that copy on the responder thread. Token
    /// vectors (no head) and `overlap_batches = false` run as [`run_cuda`](Self::run_cuda).
    pub(crate) fn start_cuda(&self, model: &CudaBert, inputs: &Inputs) -> Result<Pending> {
        let (Some(head), Some(results), CDevice::Cuda(device)) =
            (self.info.head, &model.results, &self.device)
        else {
            return self.run_cuda(model, inputs).map(Pending::ready);
        };
        let (hidden, mask) = self.queue_cuda(model, inputs)?;
        let pooled = pool(&hidden, &mask, head).map_err(backend)?;
        let shape = pooled.dims().to_vec();
        let len = pooled.elem_count();
        let stream = device.cuda_stream();
        let reused = results.lock().unwrap_or_else(|e| e.into_inner()).pop().filter(|b| b.len() >= len);
        let mut buffer = match reused {
            Some(buffer) => buffer,
            // SAFETY: the buffer's contents are read only after the copy below wrote
            // them. Flags 0: cached memory, which the host reads fast (the default,
            // write-combined, is for host-to-device copies). A power of two, so batches
            // of other sizes reuse it.
            None => unsafe { stream.context().alloc_pinned_with_flags::<f32>(len.next_power_of_two(), 0) }
                .w()
                .map_err(backend)?,
        };
        let done = {
            let (storage, layout) = pooled.storage_and_layout();
            let Storage::Cuda(storage) = &*storage else {
                return Err(backend(candle_core::Error::Msg("the pooled rows are not on the GPU".into())));
            };
            let start = layout.start_offset();
            let rows = storage.as_cuda_slice::<f32>().map_err(backend)?.slice(start..start + len);
            let (from, _read) = rows.device_ptr(&stream);
            // The buffer is idle (its own event was never recorded: it is only written here).
            let to = buffer.as_mut_ptr().w().map_err(backend)?;
            // SAFETY: `to` is page-locked memory of at least `len` f32 owned by `buffer`,
            // which `InFlight` keeps alive until `done` says the copy is over; `from` is
            // `len` f32 of the pooled rows, freed by candle in stream order after it.
            // cudarc's own `memcpy_dtoh` would copy the buffer's whole length.
            unsafe {
                let to = std::slice::from_raw_parts_mut(to, len);
                cudarc::driver::result::memcpy_dtoh_async(to, from, stream.cu_stream())
                    .w()
                    .map_err(backend)?;
            }
            stream.record_event(Some(CUevent_flags::CU_EVENT_BLOCKING_SYNC)).w().map_err(backend)?
        };
        let flight = InFlight { buffer: Some(buffer), done };
        let results = Arc::clone(results);
        Ok(Pending::later(move || {
            let mut flight = flight;
            flight.done.synchronize().w().map_err(backend)?;
            let buffer = flight.buffer.take().expect("taken once");
            // SAFETY: the copy wrote the first `len` values and is over (`done`).
            let values =
                unsafe { std::slice::from_raw_parts(buffer.as_ptr().w().map_err(backend)?, len) }.to_vec();
            results.lock().unwrap_or_else(|e| e.into_inner()).push(buffer);
            Ok(Outputs::new().with(SENTENCE_EMBEDDING, Tensor::from_vec(shape, values)?))
        }))
    }

    /// The batch's ids checked on the host and the encoder queued on the GPU: its token
    /// vectors `[batch * sequence, hidden]` and the f32 mask `[batch, sequence]`.
    fn queue_cuda(&self, model: &CudaBert, inputs: &Inputs) -> Result<(CTensor, CTensor)> {
        let host = |name: &str| inputs.require(name).and_then(|t| t.to_vec::<i64>());
        let (ids, types) = (host("input_ids")?, host("token_type_ids")?);
        let shape = inputs.require("input_ids")?.shape().to_vec();
        let &[batch, sequence] = shape.as_slice() else {
            return Err(Error::InvalidInput(format!(
                "input_ids has shape {shape:?}; expected [batch, sequence]"
            )));
        };
        model.check(&ids, &types, sequence)?;
        let on_device = |values: Vec<i64>| CTensor::from_vec(values, (batch, sequence), &self.device);
        let mask = self.tensor(inputs, "attention_mask")?.to_dtype(CDType::F32).map_err(backend)?;
        let (ids, types) = (on_device(ids).map_err(backend)?, on_device(types).map_err(backend)?);
        let hidden = model.forward(&ids, &types, &mask).map_err(backend)?;
        Ok((hidden, mask))
    }
}
