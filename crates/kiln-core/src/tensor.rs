//! A backend-neutral tensor: a dtype, a shape and little-endian bytes.
//!
//! Providers convert from and to their own tensor types at the edge; everything between
//! (pre-processing, caching, batching, splitting outputs) works on this one type.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Element type of a [`Tensor`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum DType {
    /// 32-bit IEEE float.
    F32,
    /// 16-bit IEEE float.
    F16,
    /// 16-bit brain float.
    BF16,
    /// 64-bit signed integer (token ids in most exports).
    I64,
    /// 32-bit signed integer.
    I32,
    /// 8-bit unsigned integer (raw pixels).
    U8,
}

impl DType {
    /// Every dtype, in the order they are listed in messages.
    pub const ALL: [DType; 6] = [DType::F32, DType::F16, DType::BF16, DType::I64, DType::I32, DType::U8];

    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::I64 => 8,
            DType::U8 => 1,
        }
    }

    /// Whether this is a floating-point type (a valid model precision).
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }

    /// The lowercase name used in configs and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I64 => "i64",
            DType::I32 => "i32",
            DType::U8 => "u8",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        DType::ALL.into_iter().find(|d| d.as_str() == s).ok_or_else(|| {
            let names: Vec<_> = DType::ALL.iter().map(|d| d.as_str()).collect();
            Error::InvalidInput(format!("unknown dtype `{s}`; accepted: {}", names.join(", ")))
        })
    }
}

/// Element types that can be viewed as the bytes of a [`Tensor`].
pub trait Element: bytemuck::Pod {
    /// The dtype these elements have.
    const DTYPE: DType;
}
impl Element for f32 {
    const DTYPE: DType = DType::F32;
}
impl Element for half::f16 {
    const DTYPE: DType = DType::F16;
}
impl Element for half::bf16 {
    const DTYPE: DType = DType::BF16;
}
impl Element for i64 {
    const DTYPE: DType = DType::I64;
}
impl Element for i32 {
    const DTYPE: DType = DType::I32;
}
impl Element for u8 {
    const DTYPE: DType = DType::U8;
}

/// A dense, row-major tensor in host memory.
///
/// The bytes are little-endian elements of `dtype`; their count always equals the
/// product of `shape` (checked by every constructor).
#[derive(Clone, PartialEq)]
pub struct Tensor {
    dtype: DType,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl Tensor {
    /// A tensor from typed elements.
    pub fn from_vec<T: Element>(shape: Vec<usize>, values: Vec<T>) -> Result<Self> {
        let data = bytemuck::allocation::pod_collect_to_vec::<T, u8>(&values);
        Self::from_bytes(T::DTYPE, shape, data)
    }

    /// A tensor from raw little-endian bytes; the byte count must match dtype and shape.
    pub fn from_bytes(dtype: DType, shape: Vec<usize>, data: Vec<u8>) -> Result<Self> {
        // A shape from a request or a model file may be absurd: its size must not wrap.
        let Some(expected) = shape.iter().try_fold(dtype.size(), |n, &d| n.checked_mul(d)) else {
            return Err(Error::InvalidInput(format!(
                "tensor of dtype {dtype} and shape {shape:?} would be larger than memory can address"
            )));
        };
        if data.len() != expected {
            return Err(Error::InvalidInput(format!(
                "tensor of dtype {dtype} and shape {shape:?} needs {expected} bytes, got {}",
                data.len()
            )));
        }
        Ok(Tensor { dtype, shape, data })
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The dimensions, outermost first.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The raw little-endian bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies the elements out as `T`, which must be this tensor's dtype.
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        if T::DTYPE != self.dtype {
            return Err(Error::InvalidInput(format!("tensor holds {}, asked for {}", self.dtype, T::DTYPE)));
        }
        // pod_collect_to_vec copies, so a byte buffer of any alignment is fine.
        Ok(bytemuck::allocation::pod_collect_to_vec::<u8, T>(&self.data))
    }

    /// The elements as f32: f32 copied, f16 and bf16 widened (exactly). Other dtypes
    /// are an error naming the dtype, since integers are not model outputs to pool.
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        match self.dtype {
            DType::F32 => self.to_vec::<f32>(),
            DType::F16 => Ok(self.to_vec::<half::f16>()?.into_iter().map(f32::from).collect()),
            DType::BF16 => Ok(self.to_vec::<half::bf16>()?.into_iter().map(f32::from).collect()),
            other => Err(Error::InvalidInput(format!("tensor holds {other}; expected f32, f16 or bf16"))),
        }
    }

    /// Borrows the elements as `T` without copying, when the buffer happens to be aligned.
    pub fn as_slice<T: Element>(&self) -> Option<&[T]> {
        if T::DTYPE != self.dtype {
            return None;
        }
        bytemuck::try_cast_slice(&self.data).ok()
    }
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tensor({} {:?}, {} bytes)", self.dtype, self.shape, self.data.len())
    }
}

/// One dimension of a [`TensorSpec`]: a fixed size or a symbolic (dynamic) one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Dim {
    /// A size every input must have.
    Fixed(usize),
    /// Any size; the name (`batch`, `sequence`) is for messages.
    Dynamic(String),
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Dynamic(name) => f.write_str(name),
        }
    }
}

/// What a model expects of one named input, or promises of one output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    /// The input or output name, as the model knows it.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Dimensions; dynamic ones accept any size.
    pub shape: Vec<Dim>,
}

impl TensorSpec {
    /// A spec from a name, dtype and dims.
    pub fn new(name: impl Into<String>, dtype: DType, shape: Vec<Dim>) -> Self {
        TensorSpec { name: name.into(), dtype, shape }
    }

    /// Checks a tensor against this spec; the error names the input, expected and got.
    pub fn check(&self, tensor: &Tensor) -> Result<()> {
        let got_shape = tensor.shape();
        let shape_ok = got_shape.len() == self.shape.len()
            && self.shape.iter().zip(got_shape).all(|(d, &n)| match d {
                Dim::Fixed(want) => *want == n,
                Dim::Dynamic(_) => true,
            });
        if tensor.dtype() != self.dtype || !shape_ok {
            return Err(Error::InvalidInput(format!(
                "input `{}`: expected {} [{}], got {} {:?}",
                self.name,
                self.dtype,
                self.shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "),
                tensor.dtype(),
                got_shape
            )));
        }
        Ok(())
    }
}

/// Named tensors, in a stable order: a model's inputs or outputs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NamedTensors {
    entries: Vec<(String, Tensor)>,
}

/// A model's inputs.
pub type Inputs = NamedTensors;
/// A model's outputs.
pub type Outputs = NamedTensors;

impl NamedTensors {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces a tensor under `name`.
    pub fn insert(&mut self, name: impl Into<String>, tensor: Tensor) {
        let name = name.into();
        match self.entries.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = tensor,
            None => self.entries.push((name, tensor)),
        }
    }

    /// Builder form of [`NamedTensors::insert`].
    pub fn with(mut self, name: impl Into<String>, tensor: Tensor) -> Self {
        self.insert(name, tensor);
        self
    }

    /// The tensor under `name`.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.entries.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    /// The tensor under `name`, or an error that lists the names there are.
    pub fn require(&self, name: &str) -> Result<&Tensor> {
        self.get(name).ok_or_else(|| {
            Error::InvalidInput(format!("missing tensor `{name}`; present: [{}]", self.names().join(", ")))
        })
    }

    /// Removes and returns the tensor under `name`.
    pub fn remove(&mut self, name: &str) -> Option<Tensor> {
        let i = self.entries.iter().position(|(n, _)| n == name)?;
        Some(self.entries.remove(i).1)
    }

    /// Names, in insertion order.
    pub fn names(&self) -> Vec<&str> {
        self.entries.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// Iterates over `(name, tensor)` pairs.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.entries.iter().map(|(n, t)| (n.as_str(), t))
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Total bytes held, for cache weighing and memory accounting.
    pub fn byte_size(&self) -> usize {
        self.entries.iter().map(|(_, t)| t.bytes().len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_round_trips_typed_values() {
        let t = Tensor::from_vec(vec![2, 3], vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        assert_eq!(t.dtype(), DType::F32);
        assert_eq!(t.bytes().len(), 24);
        assert_eq!(t.to_vec::<f32>().unwrap(), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert!(t.to_vec::<i64>().is_err());
    }

    #[test]
    fn byte_count_must_match_shape() {
        let err = Tensor::from_bytes(DType::I64, vec![2, 2], vec![0; 8]).unwrap_err();
        assert!(err.to_string().contains("needs 32 bytes, got 8"), "{err}");
    }

    #[test]
    fn spec_check_names_input_expected_and_got() {
        let spec = TensorSpec::new("x", DType::F32, vec![Dim::Dynamic("batch".into()), Dim::Fixed(3)]);
        spec.check(&Tensor::from_vec(vec![5, 3], vec![0f32; 15]).unwrap()).unwrap();
        let err = spec.check(&Tensor::from_vec(vec![5, 4], vec![0f32; 20]).unwrap()).unwrap_err();
        assert_eq!(err.to_string(), "invalid input: input `x`: expected f32 [batch, 3], got f32 [5, 4]");
        let err = spec.check(&Tensor::from_vec(vec![5, 3], vec![0i64; 15]).unwrap()).unwrap_err();
        assert!(err.to_string().contains("got i64 [5, 3]"));
    }

    #[test]
    fn dtype_parse_lists_accepted_names() {
        assert_eq!("bf16".parse::<DType>().unwrap(), DType::BF16);
        let err = "f64".parse::<DType>().unwrap_err().to_string();
        assert!(err.contains("f32, f16, bf16, i64, i32, u8"), "{err}");
    }

    #[test]
    fn named_tensors_keep_order_and_report_missing_names() {
        let t = Tensor::from_vec(vec![1], vec![1i64]).unwrap();
        let mut named = NamedTensors::new().with("b", t.clone()).with("a", t.clone());
        named.insert("b", t);
        assert_eq!(named.names(), vec!["b", "a"]);
        let err = named.require("c").unwrap_err().to_string();
        assert!(err.contains("missing tensor `c`; present: [b, a]"), "{err}");
    }
}
