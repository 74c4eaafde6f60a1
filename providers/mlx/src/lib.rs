//! kiln's MLX provider (`mlx`): BERT-family encoders from Hugging Face folders
//! (`config.json` + `model.safetensors`, the folders the candle provider reads) and ONNX
//! graphs (`.onnx`) on [MLX](https://github.com/ml-explore/mlx), text generation
//! from llama-architecture GGUF files (`llama.rs`), and vision-language generation from
//! Qwen2.5-VL checkpoint folders, mlx-community's quantized ones as stored (`qwen2vl/`).
//!
//! An ONNX file is read by kiln's own decoder of the protobuf format (`onnx.rs`) and
//! compiled once into steps over MLX arrays (`graph.rs`): constants folded, weights on
//! the device at the model's dtype, batch norms folded into the convolutions before
//! them, shape arithmetic (`Shape` → `Slice` → `Concat` → `Reshape`) on the host. Each
//! batch is one lazy MLX graph, evaluated once. Operators outside `graph::OPS` are
//! refused at load by name. Depthwise convolutions run, on MLX's CPU stream, as a
//! primitive of kiln's (MLX's CPU backend runs grouped convolutions with naive loops).
//!
//! The encoder is written against MLX's API through kiln's own small binding
//! (`shim/kiln_mlx.cpp`, a C interface over MLX's C++ API, compiled against the headers
//! the MLX wheels ship): each batch builds a lazy graph — MLX's fused LayerNorm and
//! scaled-dot-product attention inside — and evaluates it once; pooling and
//! normalisation run on the device in f32, so only `[batch, hidden]` comes back.
//!
//! Devices are MLX's: `cpu`, and the GPU as `cuda:N` (the `mlx-cuda-13` library on
//! NVIDIA) or `metal:N` (MLX on macOS; untested here). One build serves both CPU and
//! CUDA: which `libmlx` the loader finds decides. Precisions f32, f16, bf16.
//! `model.quantization = "int8"` or `"int4"` quantizes the encoder's matrices with
//! MLX's groupwise affine scheme (`provider.options.group_size`, default 64) at load.
//!
//! `[provider.options]`:
//!
//! | key | default | meaning |
//! |---|---|---|
//! | `group_size` | `64` | elements sharing one scale and bias in quantized rows: 32, 64 or 128 |
//! | `clear_cache_after_load` | `true` | return MLX's cached buffers (the load's temporaries) to the system after each load |
//! | `gguf_matrices` | `"auto"` | generation from GGUF: `"quantized"` (MLX quantized matmul over the file's blocks), `"dense"` (dequantized at load), `"auto"`: quantized on a GPU, dense on the CPU |
//! | `overlap_batches` | `true` | a BERT batch is queued on the device (MLX's `async_eval`) and waited for on kiln's responder thread, so the model thread builds and queues the next batch meanwhile; `false`: each batch is waited for on the model thread |
//! | `embedding_kernel` | `false` | on MLX's CUDA GPU, BERT's embedding sum (word rows gathered, position and type rows added) in one kiln kernel (`mlx::fast::cuda_kernel`) instead of MLX's gather and two adds; single texts only (pairs take MLX's ops). Off: on an H100 it gave the same throughput as MLX's ops (61 523 against 61 387 texts/s, cosines 1.000000), so the default keeps MLX's own |
//! | `greedy_on_device` | `true` | generation: a greedy sequence's next token is picked on the device (an argmax evaluated with the step), so its id alone comes back to the host instead of its row of logits; `false`: every row copied out and sampled on the host |
//! | `decode_ahead` | `false` | generation from GGUF: a step of greedy sequences also queues the next decode step on the device (each fed the token just picked, still on the device) before returning, so the device runs step n + 1 while the host hands out step n's tokens; the next call takes the rows it finds there and runs the rest (mlx-lm's `async_eval` pattern). A queued row whose sequence ended or changed goes unused. Needs `greedy_on_device`; GPUs only (on the CPU the step runs on the host's own cores: nothing to overlap). Off by default: on an H100 it gave 1.16× and then 0.84× the throughput without it, with 90–135 ms stalls at p99 |
//!
//! ## Features
//!
//! The crate is empty unless its `libmlx` feature is on (`kiln`'s `mlx` feature turns
//! it on): building it needs MLX's headers and library (`MLX_DIR`, written by
//! `scripts/setup mlx`).

#[cfg(feature = "libmlx")]
mod array;
#[cfg(feature = "libmlx")]
mod bert;
#[cfg(feature = "libmlx")]
mod ffi;
#[cfg(feature = "libmlx")]
mod graph;
#[cfg(feature = "libmlx")]
mod imp;
#[cfg(feature = "libmlx")]
mod llama;
#[cfg(feature = "libmlx")]
mod onnx;
#[cfg(feature = "libmlx")]
mod qwen2vl;
#[cfg(all(test, feature = "libmlx"))]
mod testing;
#[cfg(feature = "libmlx")]
pub use imp::*;

/// The name configs use: `[provider] name = "mlx"`.
pub const NAME: &str = "mlx";
