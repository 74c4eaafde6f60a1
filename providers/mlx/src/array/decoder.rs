//! The ops a decoder (llama) needs beyond the encoders': RMS norm, rotary embeddings,
//! causal attention, in-place cache updates, and views of packed weights.

use std::ffi::c_int;

use kiln_core::{DType, Result};

use super::{Array, code, dims, own};
use crate::ffi;

impl Array {
    /// Zeros of `shape` and `dtype`.
    pub fn zeros(shape: &[usize], dtype: DType) -> Result<Array> {
        let d = dims(shape)?;
        // SAFETY: `d` holds `d.len()` dimensions.
        own(unsafe { ffi::kiln_mlx_zeros(d.as_ptr(), d.len() as c_int, code(dtype)) }, "zeros")
    }

    /// The same bytes seen as `uint32` (MLX's packed quantized weights).
    pub fn view_u32(&self) -> Result<Array> {
        // SAFETY: a live handle.
        own(unsafe { ffi::kiln_mlx_view(self.raw(), ffi::U32) }, "view as uint32")
    }

    /// RMS norm over the last axis, scaled by `weight` (MLX's fused kernel).
    pub fn rms_norm(&self, weight: &Array, eps: f32) -> Result<Array> {
        // SAFETY: live handles.
        own(unsafe { ffi::kiln_mlx_rms_norm(self.raw(), weight.raw(), eps) }, "rms_norm")
    }

    /// Rotary embedding of `[..., tokens, dims]` from position `offset`, rotating
    /// adjacent pairs (GGUF's llama layout).
    pub fn rope(&self, dims: usize, base: f32, offset: usize) -> Result<Array> {
        // SAFETY: a live handle and plain values.
        own(unsafe { ffi::kiln_mlx_rope(self.raw(), dims as c_int, 1, base, offset as c_int) }, "rope")
    }

    /// Causal attention of `self` (queries `[1, heads, t, head_dim]`, the last `t`
    /// positions) over `keys` and `values` (`[1, kv_heads, n, head_dim]`, grouped-query
    /// when fewer heads).
    pub fn causal_attention(&self, keys: &Array, values: &Array, scale: f32) -> Result<Array> {
        // SAFETY: live handles.
        own(
            unsafe { ffi::kiln_mlx_causal_attention(self.raw(), keys.raw(), values.raw(), scale) },
            "causal attention",
        )
    }

    /// `self` with `[start, stop)` replaced by `update`.
    pub fn slice_update(&self, update: &Array, start: &[i32], stop: &[i32]) -> Result<Array> {
        // SAFETY: live handles; `start` and `stop` have the same length.
        own(
            unsafe {
                ffi::kiln_mlx_slice_update(
                    self.raw(),
                    update.raw(),
                    start.as_ptr(),
                    stop.as_ptr(),
                    start.len().min(stop.len()) as c_int,
                )
            },
            "slice_update",
        )
    }
}
