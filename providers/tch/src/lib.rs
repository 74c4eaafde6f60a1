//! kiln's libtorch provider (`tch`): TorchScript modules on CPU or CUDA, through tch 0.24
//! and PyTorch 2.11.0's libtorch.
//!
//! A model is a folder with `model.pt` (a TorchScript module, `torch.jit.trace` or
//! `torch.jit.script`, saved with `torch.jit.save`) and `signature.json`, or the `.pt`
//! file itself with `signature.json` beside it. TorchScript keeps no machine-readable
//! schema of `forward`'s tensors, so the signature says what the module expects and
//! returns, and every request is checked against it before libtorch sees it:
//!
//! ```json
//! {
//!   "inputs": [
//!     {"name": "input_ids", "dtype": "i64", "shape": ["batch", "sequence"]},
//!     {"name": "attention_mask", "dtype": "i64", "shape": ["batch", "sequence"]},
//!     {"name": "token_type_ids", "dtype": "i64", "shape": ["batch", "sequence"]}
//!   ],
//!   "outputs": [{"name": "last_hidden_state", "dtype": "model", "shape": ["batch", "sequence", 384]}]
//! }
//! ```
//!
//! Inputs are passed to `forward` positionally, in the order listed. `forward` may
//! return one tensor (the first output), a tuple or list (outputs in order) or a dict
//! keyed by output name. `"model"` as a dtype means the configured `model.dtype`.
//! `scripts/trace_bert_torchscript.py` writes both files for a BERT folder.
//!
//! The module is converted at load to `model.dtype` (f32, f16, bf16; floating
//! parameters only) and moved to `model.device` (`cpu` or `cuda:N`), and runs under
//! no-grad. bf16 outputs are widened to f32 on the device before the copy back.
//!
//! `[provider.options]`:
//!
//! | key | default | meaning |
//! |---|---|---|
//! | `threads` | `0` | libtorch's intra-op CPU threads; 0: its own choice (the physical cores) |
//! | `overlap_batches` | `true` | on a GPU, a batch is started (its copies, kernels and the result's copy to page-locked memory queued) and waited for on kiln's responder thread, through a CUDA event, so the next batch queues behind it; `false`: each batch is waited for on the model thread |
//! | `jit_profiling` | libtorch's (on) | TorchScript's profiling executor |
//! | `jit_optimize` | libtorch's (on) | TorchScript's graph optimisations |
//! | `cuda_graphs` | `128` | on a GPU, how many batch shapes a model captures as CUDA graphs (after two eager runs of a shape) and replays with one launch from then on; `0`: off |
//!
//! ## CUDA graphs
//!
//! kiln pads batches to shape buckets and warms each up at load, so on a GPU every
//! bucket's forward (the module and the embedding head) is captured once, through
//! libtorch's own `at::cuda::CUDAGraph` (tch binds none; `cuda/graphs.cpp` is a C ABI
//! over it, built against the CUDA libtorch and embedded), and replayed: one launch a
//! batch instead of one a kernel. One model's graphs share a memory pool. A capture
//! that fails (a module that waits on the GPU inside `forward`, say) turns graphs off
//! for that model with a warning, and it runs eagerly. `kiln providers` says whether
//! this build has graphs.
//!
//! ## libtorch at run time
//!
//! The binary links libtorch dynamically: `LD_LIBRARY_PATH` must name its `lib/`
//! folder (`scripts/setup tch` writes it into `.kiln/env`). Linkers drop
//! `libtorch_cuda.so` because nothing refers to it by symbol, and without it libtorch
//! sees no GPU, so the provider loads it itself, from the folder the running
//! `libtorch_cpu.so` came from, the first time CUDA is asked about. The running
//! libtorch's version is checked against the one tch binds; a mismatch is an error
//! naming both.
//!
//! ## Features
//!
//! The crate is empty unless its `libtorch` feature is on (`kiln`'s `tch` feature turns
//! it on), so `cargo build --workspace` and `cargo clippy --workspace` work on
//! machines without libtorch.

#[cfg(feature = "libtorch")]
mod aoti;
#[cfg(feature = "libtorch")]
mod events;
#[cfg(feature = "libtorch")]
mod graphs;
#[cfg(feature = "libtorch")]
mod version;

#[cfg(feature = "libtorch")]
mod imp;
#[cfg(feature = "libtorch")]
pub use imp::*;

/// The name configs use: `[provider] name = "tch"`.
pub const NAME: &str = "tch";

/// The PyTorch release this build binds (tch 0.24: 2.11.0).
pub const EXPECTED_TORCH: &str = env!("TCH_PROVIDER_EXPECTED_TORCH");
