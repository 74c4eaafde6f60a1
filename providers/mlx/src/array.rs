//! Safe MLX arrays over kiln's binding: each [`Array`] owns one handle; every op is
//! lazy (MLX builds a graph) until [`eval`] or [`Array::to_host`].

use std::ffi::{CStr, CString, c_int};
use std::ptr::NonNull;

use kiln_core::{DType, Error, Result};

use crate::NAME;
use crate::ffi;

mod decoder;

/// The shim's message for the last failure on this thread.
fn last_error() -> String {
    // SAFETY: the shim returns a pointer to its thread-local string, valid until the
    // next failing call on this thread; it is copied at once.
    unsafe { CStr::from_ptr(ffi::kiln_mlx_last_error()) }.to_string_lossy().into_owned()
}

fn backend(what: &str) -> Error {
    Error::backend(NAME, format!("{what}: {}", last_error()))
}

/// An MLX array.
pub struct Array(NonNull<ffi::RawArray>);

// SAFETY: an MLX array is a reference-counted handle (shared_ptr) to an immutable
// graph node; MLX evaluates from any thread. kiln uses each model from one thread at
// a time anyway.
unsafe impl Send for Array {}
unsafe impl Sync for Array {}

impl Drop for Array {
    fn drop(&mut self) {
        // SAFETY: the handle is ours and freed once.
        unsafe { ffi::kiln_mlx_free(self.0.as_ptr()) }
    }
}

impl std::fmt::Debug for Array {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Array({:?}, dtype code {})", self.shape(), self.dtype_code())
    }
}

impl Array {
    /// A second handle on the same array: its buffer shared, nothing copied.
    pub fn share(&self) -> Result<Array> {
        // SAFETY: a live handle.
        own(unsafe { ffi::kiln_mlx_share(self.raw()) }, "share")
    }
}

/// An array whose evaluation [`Array::start_f32`] queued.
pub struct Started {
    array: Array,
    len: usize,
}

impl Started {
    /// Waits until the device is done and copies the values out, row-major.
    pub fn wait_f32(self) -> Result<Vec<f32>> {
        let mut out = vec![0f32; self.len];
        // SAFETY: `out` holds `len` f32s, which the shim checks against the array; the
        // handle is ours.
        check(
            unsafe { ffi::kiln_mlx_read(self.array.0.as_ptr(), out.as_mut_ptr().cast(), self.len * 4) },
            "evaluating",
        )?;
        Ok(out)
    }
}

/// Takes ownership of a handle the shim returned; NULL is the shim's error.
fn own(raw: *mut ffi::RawArray, what: &str) -> Result<Array> {
    NonNull::new(raw).map(Array).ok_or_else(|| backend(what))
}

fn check(status: c_int, what: &str) -> Result<()> {
    if status == 0 { Ok(()) } else { Err(backend(what)) }
}

fn dims(shape: &[usize]) -> Result<Vec<c_int>> {
    shape
        .iter()
        .map(|&d| {
            c_int::try_from(d).map_err(|_| Error::InvalidInput(format!("dimension {d} is too large for MLX")))
        })
        .collect()
}

/// kiln's dtype as the shim's code.
pub fn code(dtype: DType) -> c_int {
    match dtype {
        DType::F32 => ffi::F32,
        DType::F16 => ffi::F16,
        DType::BF16 => ffi::BF16,
        DType::I64 => ffi::I64,
        DType::I32 => ffi::I32,
        _ => ffi::U8,
    }
}

/// Binary ops of the shim.
#[derive(Clone, Copy)]
enum Binary {
    Add = 0,
    Subtract = 1,
    Multiply = 2,
    Divide = 3,
    Maximum = 4,
    Minimum = 5,
}

/// Elementwise functions of the shim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unary {
    /// Square root.
    Sqrt = 0,
    /// `1 / (1 + e^-x)`.
    Sigmoid = 1,
    /// `e^x`.
    Exp = 2,
    /// Hyperbolic tangent.
    Tanh = 3,
    /// The error function.
    Erf = 4,
    /// `-x`.
    Negative = 5,
}

/// Reductions of the shim.
#[derive(Clone, Copy)]
enum Reduce {
    Sum = 0,
    Max = 1,
    Mean = 2,
    Argmax = 3,
}

impl Array {
    /// An array holding a copy of `data` (little-endian elements of `dtype`).
    pub fn from_bytes(data: &[u8], dtype: DType, shape: &[usize]) -> Result<Array> {
        let elements: usize = shape.iter().product();
        if elements * dtype.size() != data.len() {
            return Err(Error::InvalidInput(format!(
                "{} bytes for an MLX array of {dtype} {shape:?}",
                data.len()
            )));
        }
        let dims = dims(shape)?;
        // SAFETY: `data` holds exactly the elements `dims` and `dtype` describe; the
        // shim copies them before returning.
        own(
            unsafe {
                ffi::kiln_mlx_from_data(data.as_ptr().cast(), code(dtype), dims.as_ptr(), dims.len() as c_int)
            },
            "creating an array",
        )
    }

    /// A 0-d array.
    pub fn scalar(value: f32, dtype: DType) -> Result<Array> {
        // SAFETY: plain values.
        own(unsafe { ffi::kiln_mlx_scalar(value, code(dtype)) }, "creating a scalar")
    }

    fn raw(&self) -> *const ffi::RawArray {
        self.0.as_ptr()
    }

    /// The shape.
    pub fn shape(&self) -> Vec<usize> {
        // SAFETY: a live handle; axes within ndim.
        unsafe {
            (0..ffi::kiln_mlx_ndim(self.raw()))
                .map(|axis| ffi::kiln_mlx_dim(self.raw(), axis) as usize)
                .collect()
        }
    }

    fn dtype_code(&self) -> c_int {
        // SAFETY: a live handle.
        unsafe { ffi::kiln_mlx_dtype(self.raw()) }
    }

    /// Whether the elements are u32 (packed quantized weights).
    pub fn is_u32(&self) -> bool {
        self.dtype_code() == ffi::U32
    }

    /// The element type (f32 for codes kiln does not name).
    pub fn dtype(&self) -> DType {
        match self.dtype_code() {
            ffi::F16 => DType::F16,
            ffi::BF16 => DType::BF16,
            ffi::I64 => DType::I64,
            ffi::I32 => DType::I32,
            ffi::U8 => DType::U8,
            _ => DType::F32,
        }
    }

    /// Evaluates and copies out as f32, row-major.
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        let n: usize = self.shape().iter().product();
        let mut out = vec![0f32; n];
        // SAFETY: `out` holds `n` f32s, which the shim checks against the array.
        check(
            unsafe { ffi::kiln_mlx_to_host(self.raw(), ffi::F32, out.as_mut_ptr().cast(), n * 4) },
            "evaluating",
        )?;
        Ok(out)
    }

    /// Evaluates and copies out as u32, row-major.
    pub fn to_u32(&self) -> Result<Vec<u32>> {
        let n: usize = self.shape().iter().product();
        let mut out = vec![0u32; n];
        // SAFETY: `out` holds `n` u32s, which the shim checks against the array.
        check(
            unsafe { ffi::kiln_mlx_to_host(self.raw(), ffi::U32, out.as_mut_ptr().cast(), n * 4) },
            "evaluating",
        )?;
        Ok(out)
    }

    /// Queues this array's evaluation as f32 and returns at once: the GPU works while the
    /// caller goes on; [`Started::wait_f32`] (on any thread) waits and copies it out.
    pub fn start_f32(&self) -> Result<Started> {
        let len = self.shape().iter().product();
        // SAFETY: a live handle.
        let array = own(unsafe { ffi::kiln_mlx_start_f32(self.raw()) }, "queueing an evaluation")?;
        Ok(Started { array, len })
    }

    /// BERT's embedding sum on a CUDA GPU in one kernel: rows of this word table
    /// `[vocab, width]` by `ids` (`[batch, sequence]`, i32, each below `vocab`), plus row 0
    /// of `types`, plus position rows `0..sequence` of `positions`; `[batch * sequence,
    /// width]`. Only on the GPU (MLX's CUDA backend); the ids are not checked on the device.
    pub fn bert_embed_cuda(&self, positions: &Array, types: &Array, ids: &Array) -> Result<Array> {
        // SAFETY: live handles.
        own(
            unsafe { ffi::kiln_mlx_bert_embed_cuda(self.raw(), positions.raw(), types.raw(), ids.raw()) },
            "the embedding kernel",
        )
    }

    /// This array at `dtype`.
    pub fn astype(&self, dtype: DType) -> Result<Array> {
        // SAFETY: a live handle.
        own(unsafe { ffi::kiln_mlx_astype(self.raw(), code(dtype)) }, "astype")
    }

    fn binary(&self, op: Binary, other: &Array) -> Result<Array> {
        // SAFETY: live handles.
        own(unsafe { ffi::kiln_mlx_binary(op as c_int, self.raw(), other.raw()) }, "an elementwise op")
    }

    /// `self + other`, broadcasting.
    pub fn add(&self, other: &Array) -> Result<Array> {
        self.binary(Binary::Add, other)
    }

    /// `self * other`, broadcasting.
    pub fn mul(&self, other: &Array) -> Result<Array> {
        self.binary(Binary::Multiply, other)
    }

    /// `self / other`, broadcasting.
    pub fn div(&self, other: &Array) -> Result<Array> {
        self.binary(Binary::Divide, other)
    }

    /// Elementwise maximum, broadcasting.
    pub fn maximum(&self, other: &Array) -> Result<Array> {
        self.binary(Binary::Maximum, other)
    }

    /// `self - other`, broadcasting.
    pub fn sub(&self, other: &Array) -> Result<Array> {
        self.binary(Binary::Subtract, other)
    }

    /// Elementwise minimum, broadcasting.
    pub fn minimum(&self, other: &Array) -> Result<Array> {
        self.binary(Binary::Minimum, other)
    }

    /// An elementwise function.
    pub fn unary(&self, op: Unary) -> Result<Array> {
        // SAFETY: a live handle.
        own(unsafe { ffi::kiln_mlx_unary(op as c_int, self.raw()) }, "an elementwise function")
    }

    /// Square root.
    pub fn sqrt(&self) -> Result<Array> {
        self.unary(Unary::Sqrt)
    }

    /// `self @ other`, batched over leading axes.
    pub fn matmul(&self, other: &Array) -> Result<Array> {
        // SAFETY: live handles.
        own(unsafe { ffi::kiln_mlx_matmul(self.raw(), other.raw()) }, "matmul")
    }

    /// 2-D convolution of this `[N, H, W, C_in]` array with `weight`
    /// `[C_out, kH, kW, C_in / groups]`; `[height, width]` pairs, padding before and after.
    pub fn conv2d(
        &self,
        weight: &Array,
        stride: [i32; 2],
        pads: [[i32; 2]; 2],
        dilation: [i32; 2],
        groups: i32,
    ) -> Result<Array> {
        // SAFETY: live handles; every pointer is to two ints.
        own(
            unsafe {
                ffi::kiln_mlx_conv2d(
                    self.raw(),
                    weight.raw(),
                    stride.as_ptr(),
                    pads[0].as_ptr(),
                    pads[1].as_ptr(),
                    dilation.as_ptr(),
                    groups,
                )
            },
            "conv2d",
        )
    }

    /// Max pooling of this `[N, C, H, W]` array; `[height, width]` pairs, padding (with
    /// -inf) before and after.
    pub fn max_pool2d(&self, kernel: [i32; 2], stride: [i32; 2], pads: [[i32; 2]; 2]) -> Result<Array> {
        // SAFETY: a live handle; every pointer is to two ints.
        own(
            unsafe {
                ffi::kiln_mlx_max_pool2d(
                    self.raw(),
                    kernel.as_ptr(),
                    stride.as_ptr(),
                    pads[0].as_ptr(),
                    pads[1].as_ptr(),
                )
            },
            "max_pool2d",
        )
    }

    /// Softmax along `axis`, accumulated in f32.
    pub fn softmax(&self, axis: i32) -> Result<Array> {
        // SAFETY: a live handle.
        own(unsafe { ffi::kiln_mlx_softmax(self.raw(), axis) }, "softmax")
    }

    /// The arrays joined along `axis`.
    pub fn concat(arrays: &[&Array], axis: i32) -> Result<Array> {
        let raw = raw_handles(arrays);
        // SAFETY: live handles, `raw.len()` of them.
        own(unsafe { ffi::kiln_mlx_concat(raw.as_ptr(), raw.len(), axis) }, "concatenate")
    }

    /// `bias + self @ weight`.
    pub fn addmm(&self, weight: &Array, bias: &Array) -> Result<Array> {
        // SAFETY: live handles.
        own(unsafe { ffi::kiln_mlx_addmm(bias.raw(), self.raw(), weight.raw()) }, "addmm")
    }

    /// Axes permuted.
    pub fn transpose(&self, axes: &[i32]) -> Result<Array> {
        // SAFETY: `axes` is valid for its length.
        own(unsafe { ffi::kiln_mlx_transpose(self.raw(), axes.as_ptr(), axes.len() as c_int) }, "transpose")
    }

    /// The same elements in another shape (`-1`: inferred).
    pub fn reshape(&self, shape: &[i32]) -> Result<Array> {
        // SAFETY: `shape` is valid for its length.
        own(unsafe { ffi::kiln_mlx_reshape(self.raw(), shape.as_ptr(), shape.len() as c_int) }, "reshape")
    }

    /// Rows of this `[vocab, width]` table picked by flat `ids`: `[ids, width]`.
    pub fn embedding(&self, ids: &Array) -> Result<Array> {
        // SAFETY: live handles.
        own(unsafe { ffi::kiln_mlx_embedding(self.raw(), ids.raw()) }, "embedding")
    }

    /// `self[start..stop]` on every axis.
    pub fn slice(&self, start: &[i32], stop: &[i32]) -> Result<Array> {
        assert_eq!(start.len(), stop.len());
        // SAFETY: both slices have the same length.
        own(
            unsafe { ffi::kiln_mlx_slice(self.raw(), start.as_ptr(), stop.as_ptr(), start.len() as c_int) },
            "slice",
        )
    }

    fn reduce(&self, op: Reduce, axis: i32, keepdims: bool) -> Result<Array> {
        // SAFETY: a live handle.
        own(
            unsafe { ffi::kiln_mlx_reduce(op as c_int, self.raw(), axis, c_int::from(keepdims)) },
            "a reduction",
        )
    }

    /// Sum along `axis`.
    pub fn sum(&self, axis: i32, keepdims: bool) -> Result<Array> {
        self.reduce(Reduce::Sum, axis, keepdims)
    }

    /// Maximum along `axis`.
    pub fn max(&self, axis: i32, keepdims: bool) -> Result<Array> {
        self.reduce(Reduce::Max, axis, keepdims)
    }

    /// Mean along `axis`.
    pub fn mean(&self, axis: i32, keepdims: bool) -> Result<Array> {
        self.reduce(Reduce::Mean, axis, keepdims)
    }

    /// The index of the largest value along `axis` (u32; the first of equal ones).
    pub fn argmax(&self, axis: i32) -> Result<Array> {
        self.reduce(Reduce::Argmax, axis, false)
    }

    /// `x` where `self` is true, else `y`.
    pub fn select(&self, x: &Array, y: &Array) -> Result<Array> {
        // SAFETY: live handles.
        own(unsafe { ffi::kiln_mlx_where(self.raw(), x.raw(), y.raw()) }, "where")
    }

    /// BERT's exact GELU, compiled by MLX into one kernel.
    pub fn gelu(&self) -> Result<Array> {
        // SAFETY: a live handle.
        own(unsafe { ffi::kiln_mlx_gelu(self.raw()) }, "gelu")
    }

    /// `silu(self) * up`, a llama MLP's activation, compiled by MLX into one kernel on a
    /// GPU (three elementwise operations on the CPU).
    pub fn swiglu(&self, up: &Array) -> Result<Array> {
        // SAFETY: live handles.
        own(unsafe { ffi::kiln_mlx_swiglu(self.raw(), up.raw()) }, "swiglu")
    }

    /// LayerNorm over the last axis (MLX's fused kernel).
    pub fn layer_norm(&self, weight: &Array, bias: &Array, eps: f32) -> Result<Array> {
        // SAFETY: live handles.
        own(unsafe { ffi::kiln_mlx_layer_norm(self.raw(), weight.raw(), bias.raw(), eps) }, "layer_norm")
    }

    /// Scaled dot-product attention (MLX's fused kernel) of `self` as the queries;
    /// `[batch, heads, sequence, head_dim]` each, `mask` additive.
    pub fn attention(&self, keys: &Array, values: &Array, scale: f32, mask: Option<&Array>) -> Result<Array> {
        let mask = mask.map_or(std::ptr::null(), Array::raw);
        // SAFETY: live handles; a null mask means none.
        own(
            unsafe { ffi::kiln_mlx_attention(self.raw(), keys.raw(), values.raw(), scale, mask) },
            "attention",
        )
    }

    /// Groupwise affine quantization along the last axis: (packed, scales, biases).
    pub fn quantize(&self, group_size: usize, bits: usize) -> Result<(Array, Array, Array)> {
        let mut out = [std::ptr::null_mut(); 3];
        // SAFETY: `out` has room for the three handles the shim writes on success.
        check(
            unsafe {
                ffi::kiln_mlx_quantize(self.raw(), group_size as c_int, bits as c_int, out.as_mut_ptr())
            },
            "quantize",
        )?;
        let [w, s, b] = out;
        Ok((own(w, "quantize")?, own(s, "quantize")?, own(b, "quantize")?))
    }

    /// `self @ dequantize(w, scales, biases)^T`.
    pub fn quantized_matmul(
        &self,
        w: &Array,
        scales: &Array,
        biases: &Array,
        group_size: usize,
        bits: usize,
    ) -> Result<Array> {
        // SAFETY: live handles.
        own(
            unsafe {
                ffi::kiln_mlx_quantized_matmul(
                    self.raw(),
                    w.raw(),
                    scales.raw(),
                    biases.raw(),
                    group_size as c_int,
                    bits as c_int,
                )
            },
            "quantized_matmul",
        )
    }
}

/// Evaluates arrays together (one pass over their shared graph).
pub fn eval(arrays: &[&Array]) -> Result<()> {
    let raw = raw_handles(arrays);
    // SAFETY: live handles for the duration of the call.
    check(unsafe { ffi::kiln_mlx_eval(raw.as_ptr(), raw.len()) }, "evaluating")
}

/// Queues the arrays' evaluation and returns at once: the device computes them while
/// the host goes on (building the next graph); evaluating or reading any of them, or
/// anything built on them, later waits for it.
pub fn async_eval(arrays: &[&Array]) -> Result<()> {
    let raw = raw_handles(arrays);
    // SAFETY: live handles for the duration of the call.
    check(unsafe { ffi::kiln_mlx_async_eval(raw.as_ptr(), raw.len()) }, "queueing an evaluation")
}

/// The shim's handles of `arrays`, for a call that takes a list of them.
fn raw_handles(arrays: &[&Array]) -> Vec<*mut ffi::RawArray> {
    arrays.iter().map(|a| a.0.as_ptr()).collect()
}

/// Where this thread's MLX ops run from now on: the CPU, or GPU `index`.
pub fn set_device(gpu: Option<usize>) -> Result<()> {
    let (kind, index) = gpu.map_or((0, 0), |i| (1, i as c_int));
    // SAFETY: plain values.
    let status = unsafe { ffi::kiln_mlx_set_device(kind, index) };
    if status == 0 { Ok(()) } else { Err(Error::Unsupported(format!("provider `mlx`: {}", last_error()))) }
}

/// GPUs MLX can use in this process (0 for the CPU-only build).
pub fn gpu_count() -> usize {
    // SAFETY: no arguments.
    unsafe { ffi::kiln_mlx_gpu_count() }.max(0) as usize
}

/// Whether the loaded libmlx runs its GPU through CUDA (kiln's CUDA kernels apply).
pub fn is_cuda() -> bool {
    // SAFETY: no arguments; catches every MLX error.
    unsafe { ffi::kiln_mlx_is_cuda() == 1 }
}

/// The MLX library's version.
pub fn version() -> String {
    // SAFETY: a static string in libmlx.
    unsafe { CStr::from_ptr(ffi::kiln_mlx_version()) }.to_string_lossy().into_owned()
}

/// The BLAS linked ahead of MLX's own (OpenBLAS's configuration string), if any.
pub fn blas() -> Option<String> {
    // SAFETY: a static string (OpenBLAS's, or the shim's empty one).
    let s = unsafe { CStr::from_ptr(ffi::kiln_mlx_blas()) }.to_string_lossy().trim().to_string();
    (!s.is_empty()).then_some(s)
}

/// MLX's allocator figures: (active, peak, cache) bytes.
pub fn memory() -> (u64, u64, u64) {
    let (mut active, mut peak, mut cache) = (0usize, 0usize, 0usize);
    // SAFETY: three valid out-pointers.
    unsafe { ffi::kiln_mlx_memory(&mut active, &mut peak, &mut cache) };
    (active as u64, peak as u64, cache as u64)
}

/// Frees the buffers MLX keeps cached for reuse.
pub fn clear_cache() {
    // SAFETY: no arguments.
    unsafe { ffi::kiln_mlx_clear_cache() }
}

/// The arrays of a safetensors file, loaded lazily by MLX.
pub struct Weights(NonNull<ffi::RawWeights>);

// SAFETY: read-only after loading; see `Array`.
unsafe impl Send for Weights {}

impl Drop for Weights {
    fn drop(&mut self) {
        // SAFETY: ours, freed once.
        unsafe { ffi::kiln_mlx_weights_free(self.0.as_ptr()) }
    }
}

impl Weights {
    /// Opens `path`.
    pub fn load(path: &std::path::Path) -> Result<Weights> {
        let c = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| Error::model_load(path, "a path with a NUL byte"))?;
        // SAFETY: a valid C string.
        let raw = unsafe { ffi::kiln_mlx_load_safetensors(c.as_ptr()) };
        NonNull::new(raw).map(Weights).ok_or_else(|| Error::model_load(path, last_error()))
    }

    /// The tensor called `name`, if there is one.
    pub fn get(&self, name: &str) -> Option<Array> {
        let c = CString::new(name).ok()?;
        // SAFETY: a valid C string; NULL means absent.
        NonNull::new(unsafe { ffi::kiln_mlx_weights_get(self.0.as_ptr(), c.as_ptr()) }).map(Array)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32s(values: &[f32], shape: &[usize]) -> Array {
        Array::from_f32(values, shape).unwrap()
    }

    #[test]
    fn ops_compute_what_they_say() {
        set_device(None).unwrap();
        let x = f32s(&[1.0, 2.0, 3.0, 4.0], &[2, 2]);
        let w = f32s(&[1.0, 0.0, 0.0, 2.0], &[2, 2]);
        let b = f32s(&[10.0, 20.0], &[2]);
        // bias + x @ w
        assert_eq!(x.addmm(&w, &b).unwrap().to_f32().unwrap(), [11.0, 24.0, 13.0, 28.0]);
        assert_eq!(x.sum(1, false).unwrap().to_f32().unwrap(), [3.0, 7.0]);
        assert_eq!(x.transpose(&[1, 0]).unwrap().to_f32().unwrap(), [1.0, 3.0, 2.0, 4.0]);
        let table = f32s(&[0.0, 1.0, 10.0, 11.0, 20.0, 21.0], &[3, 2]);
        let ids = Array::from_bytes(
            &[2i32, 0, 2].iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>(),
            DType::I32,
            &[3],
        )
        .unwrap();
        assert_eq!(table.embedding(&ids).unwrap().to_f32().unwrap(), [20.0, 21.0, 0.0, 1.0, 20.0, 21.0]);
        let g = f32s(&[0.0, 1.0], &[2]).gelu().unwrap().to_f32().unwrap();
        assert!((g[1] - 0.841_344_7).abs() < 1e-5, "{g:?}");
        // silu(1) * 3 and silu(-2) * 0.5.
        let s = f32s(&[1.0, -2.0], &[2]).swiglu(&f32s(&[3.0, 0.5], &[2])).unwrap().to_f32().unwrap();
        assert!((s[0] - 2.193_175_7).abs() < 1e-5 && (s[1] + 0.119_202_92).abs() < 1e-6, "{s:?}");
    }

    #[test]
    fn mlx_errors_come_back_as_errors_naming_the_op() {
        set_device(None).unwrap();
        let x = f32s(&[1.0, 2.0, 3.0], &[1, 3]);
        let w = f32s(&[1.0, 2.0], &[2, 1]);
        let b = f32s(&[0.0], &[1]);
        // Shapes that do not multiply: MLX throws; the binding returns the message.
        let err = x.addmm(&w, &b).and_then(|y| y.to_f32()).unwrap_err().to_string();
        assert!(err.contains("mlx") && err.contains("addmm"), "{err}");
        let err = Array::from_bytes(&[0u8; 5], DType::F32, &[2]).unwrap_err().to_string();
        assert!(err.contains("5 bytes"), "{err}");
        // A group size that does not divide the rows.
        let err = f32s(&[0.0; 48], &[1, 48]).quantize(32, 8).map(|_| ()).unwrap_err().to_string();
        assert!(err.contains("quantize"), "{err}");
        // The process and MLX keep working after each failure.
        assert_eq!(x.sum(1, false).unwrap().to_f32().unwrap(), [6.0]);
    }
}
