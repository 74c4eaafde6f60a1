//! The C interface of `shim/kiln_mlx.cpp` (kiln's binding to MLX). Only `array.rs`
//! calls these; it owns every handle they return.

use std::ffi::{c_char, c_int, c_void};

/// An MLX array (heap handle; freed with [`kiln_mlx_free`]).
#[repr(C)]
pub struct RawArray {
    _opaque: [u8; 0],
}

/// The arrays of a safetensors file.
#[repr(C)]
pub struct RawWeights {
    _opaque: [u8; 0],
}

/// kiln's dtype codes in the shim.
pub const F32: c_int = 0;
pub const F16: c_int = 1;
pub const BF16: c_int = 2;
pub const I64: c_int = 3;
pub const I32: c_int = 4;
pub const U8: c_int = 5;
pub const U32: c_int = 6;

unsafe extern "C" {
    pub fn kiln_mlx_last_error() -> *const c_char;
    pub fn kiln_mlx_version() -> *const c_char;
    pub fn kiln_mlx_blas() -> *const c_char;
    pub fn kiln_mlx_free(a: *mut RawArray);
    pub fn kiln_mlx_gpu_count() -> c_int;
    pub fn kiln_mlx_is_cuda() -> c_int;
    pub fn kiln_mlx_set_device(kind: c_int, index: c_int) -> c_int;
    pub fn kiln_mlx_from_data(
        data: *const c_void,
        dtype: c_int,
        shape: *const c_int,
        ndim: c_int,
    ) -> *mut RawArray;
    pub fn kiln_mlx_scalar(value: f32, dtype: c_int) -> *mut RawArray;
    pub fn kiln_mlx_ndim(a: *const RawArray) -> c_int;
    pub fn kiln_mlx_dim(a: *const RawArray, axis: c_int) -> c_int;
    pub fn kiln_mlx_dtype(a: *const RawArray) -> c_int;
    pub fn kiln_mlx_to_host(a: *const RawArray, dtype: c_int, out: *mut c_void, bytes: usize) -> c_int;
    pub fn kiln_mlx_eval(arrays: *const *mut RawArray, n: usize) -> c_int;
    pub fn kiln_mlx_async_eval(arrays: *const *mut RawArray, n: usize) -> c_int;
    pub fn kiln_mlx_start_f32(a: *const RawArray) -> *mut RawArray;
    pub fn kiln_mlx_read(a: *mut RawArray, out: *mut c_void, bytes: usize) -> c_int;
    pub fn kiln_mlx_bert_embed_cuda(
        words: *const RawArray,
        positions: *const RawArray,
        types: *const RawArray,
        ids: *const RawArray,
    ) -> *mut RawArray;
    pub fn kiln_mlx_astype(a: *const RawArray, dtype: c_int) -> *mut RawArray;
    pub fn kiln_mlx_binary(op: c_int, a: *const RawArray, b: *const RawArray) -> *mut RawArray;
    pub fn kiln_mlx_unary(op: c_int, a: *const RawArray) -> *mut RawArray;
    pub fn kiln_mlx_matmul(a: *const RawArray, b: *const RawArray) -> *mut RawArray;
    pub fn kiln_mlx_conv2d(
        x: *const RawArray,
        w: *const RawArray,
        stride: *const c_int,
        pad_lo: *const c_int,
        pad_hi: *const c_int,
        dilation: *const c_int,
        groups: c_int,
    ) -> *mut RawArray;
    pub fn kiln_mlx_max_pool2d(
        x: *const RawArray,
        kernel: *const c_int,
        stride: *const c_int,
        pad_lo: *const c_int,
        pad_hi: *const c_int,
    ) -> *mut RawArray;
    pub fn kiln_mlx_softmax(a: *const RawArray, axis: c_int) -> *mut RawArray;
    pub fn kiln_mlx_concat(arrays: *const *mut RawArray, n: usize, axis: c_int) -> *mut RawArray;
    pub fn kiln_mlx_addmm(c: *const RawArray, a: *const RawArray, b: *const RawArray) -> *mut RawArray;
    pub fn kiln_mlx_transpose(a: *const RawArray, axes: *const c_int, n: c_int) -> *mut RawArray;
    pub fn kiln_mlx_reshape(a: *const RawArray, shape: *const c_int, n: c_int) -> *mut RawArray;
    pub fn kiln_mlx_embedding(table: *const RawArray, ids: *const RawArray) -> *mut RawArray;
    pub fn kiln_mlx_slice(
        a: *const RawArray,
        start: *const c_int,
        stop: *const c_int,
        n: c_int,
    ) -> *mut RawArray;
    pub fn kiln_mlx_reduce(op: c_int, a: *const RawArray, axis: c_int, keepdims: c_int) -> *mut RawArray;
    pub fn kiln_mlx_where(c: *const RawArray, x: *const RawArray, y: *const RawArray) -> *mut RawArray;
    pub fn kiln_mlx_gelu(x: *const RawArray) -> *mut RawArray;
    pub fn kiln_mlx_swiglu(gate: *const RawArray, up: *const RawArray) -> *mut RawArray;
    pub fn kiln_mlx_layer_norm(
        x: *const RawArray,
        w: *const RawArray,
        b: *const RawArray,
        eps: f32,
    ) -> *mut RawArray;
    pub fn kiln_mlx_attention(
        q: *const RawArray,
        k: *const RawArray,
        v: *const RawArray,
        scale: f32,
        mask: *const RawArray,
    ) -> *mut RawArray;
    pub fn kiln_mlx_causal_attention(
        q: *const RawArray,
        k: *const RawArray,
        v: *const RawArray,
        scale: f32,
    ) -> *mut RawArray;
    pub fn kiln_mlx_rms_norm(x: *const RawArray, w: *const RawArray, eps: f32) -> *mut RawArray;
    pub fn kiln_mlx_rope(
        x: *const RawArray,
        dims: c_int,
        traditional: c_int,
        base: f32,
        offset: c_int,
    ) -> *mut RawArray;
    pub fn kiln_mlx_slice_update(
        src: *const RawArray,
        update: *const RawArray,
        start: *const c_int,
        stop: *const c_int,
        n: c_int,
    ) -> *mut RawArray;
    pub fn kiln_mlx_rope_at(
        x: *const RawArray,
        dims: c_int,
        traditional: c_int,
        base: f32,
        offsets: *const RawArray,
    ) -> *mut RawArray;
    pub fn kiln_mlx_scatter_rows(
        a: *const RawArray,
        rows: *const RawArray,
        cols: *const RawArray,
        updates: *const RawArray,
    ) -> *mut RawArray;
    pub fn kiln_mlx_take(a: *const RawArray, ids: *const RawArray, axis: c_int) -> *mut RawArray;
    pub fn kiln_mlx_zeros(shape: *const c_int, ndim: c_int, dtype: c_int) -> *mut RawArray;
    pub fn kiln_mlx_view(a: *const RawArray, dtype: c_int) -> *mut RawArray;
    pub fn kiln_mlx_quantize(
        w: *const RawArray,
        group_size: c_int,
        bits: c_int,
        out: *mut *mut RawArray,
    ) -> c_int;
    pub fn kiln_mlx_quantized_matmul(
        x: *const RawArray,
        w: *const RawArray,
        scales: *const RawArray,
        biases: *const RawArray,
        group_size: c_int,
        bits: c_int,
    ) -> *mut RawArray;
    pub fn kiln_mlx_share(a: *const RawArray) -> *mut RawArray;
    pub fn kiln_mlx_dequantize(
        w: *const RawArray,
        scales: *const RawArray,
        biases: *const RawArray,
        group_size: c_int,
        bits: c_int,
    ) -> *mut RawArray;
    pub fn kiln_mlx_load_safetensors(path: *const c_char) -> *mut RawWeights;
    pub fn kiln_mlx_weights_get(w: *const RawWeights, name: *const c_char) -> *mut RawArray;
    pub fn kiln_mlx_weights_free(w: *mut RawWeights);
    pub fn kiln_mlx_memory(active: *mut usize, peak: *mut usize, cache: *mut usize);
    pub fn kiln_mlx_clear_cache();
}
