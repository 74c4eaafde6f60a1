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

    /// Rotary embedding of `[batch, heads, 1, dims]`, batch row `i` at position
    /// `offsets[i]` (an int32 vector).
    pub fn rope_at(&self, dims: usize, base: f32, offsets: &Array) -> Result<Array> {
        // SAFETY: live handles.
        own(unsafe { ffi::kiln_mlx_rope_at(self.raw(), dims as c_int, 1, base, offsets.raw()) }, "rope")
    }

    /// `self` (4-d) with the slice at `(rows[i], :, cols[i], :)` replaced by `updates[i]`
    /// (`[n, 1, d1, 1, d3]`).
    pub fn scatter_rows(&self, rows: &Array, cols: &Array, updates: &Array) -> Result<Array> {
        // SAFETY: live handles.
        own(
            unsafe { ffi::kiln_mlx_scatter_rows(self.raw(), rows.raw(), cols.raw(), updates.raw()) },
            "scatter",
        )
    }

    /// The entries of `self` at `ids` along `axis`.
    pub fn take(&self, ids: &Array, axis: i32) -> Result<Array> {
        // SAFETY: live handles.
        own(unsafe { ffi::kiln_mlx_take(self.raw(), ids.raw(), axis) }, "take")
    }

    /// The affine-quantized rows `self` (packed u32) with their `scales` and `biases`
    /// as dense values, in the scales' dtype.
    pub fn dequantize(
        &self,
        scales: &Array,
        biases: &Array,
        group_size: usize,
        bits: usize,
    ) -> Result<Array> {
        // SAFETY: live handles.
        own(
            unsafe {
                ffi::kiln_mlx_dequantize(
                    self.raw(),
                    scales.raw(),
                    biases.raw(),
                    group_size as c_int,
                    bits as c_int,
                )
            },
            "dequantize",
        )
    }

    /// An f32 array of `shape` from host values (row-major).
    pub fn from_f32(values: &[f32], shape: &[usize]) -> Result<Array> {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Array::from_bytes(&bytes, DType::F32, shape)
    }

    /// An int32 vector.
    pub fn from_i32(values: &[i32]) -> Result<Array> {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Array::from_bytes(&bytes, DType::I32, &[values.len()])
    }
}
