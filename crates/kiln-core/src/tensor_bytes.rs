//! [`NamedTensors`] as bytes, for caches that keep results outside the process (Redis).
//!
//! The layout is kiln's own and versioned, little-endian throughout:
//!
//! ```text
//! "KLNT" version:u8 count:u32
//! count × { name_len:u32 name:utf-8  dtype_len:u8 dtype:ascii  rank:u8 dims:u64×rank  data }
//! ```
//!
//! The data's length follows from dtype and shape. Bytes from outside (a shared store
//! another version of kiln wrote, a corrupted entry) decode to an error, never a panic
//! or an allocation larger than the input.

use crate::error::{Error, Result};
use crate::tensor::{DType, NamedTensors, Tensor};

const MAGIC: &[u8; 4] = b"KLNT";
const VERSION: u8 = 1;

impl NamedTensors {
    /// The tensors in kiln's byte layout (see [`crate::tensor_bytes`]).
    ///
    /// ```
    /// use kiln_core::{NamedTensors, Tensor};
    ///
    /// let t = NamedTensors::new().with("embedding", Tensor::from_vec(vec![2], vec![0.5f32, -1.0])?);
    /// assert_eq!(NamedTensors::from_bytes(&t.to_bytes())?, t);
    /// # Ok::<(), kiln_core::Error>(())
    /// ```
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(9 + self.byte_size() + self.len() * 48);
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&(self.len() as u32).to_le_bytes());
        for (name, tensor) in self.iter() {
            out.extend_from_slice(&(name.len() as u32).to_le_bytes());
            out.extend_from_slice(name.as_bytes());
            let dtype = tensor.dtype().as_str();
            out.push(dtype.len() as u8);
            out.extend_from_slice(dtype.as_bytes());
            out.push(tensor.shape().len() as u8);
            for &d in tensor.shape() {
                out.extend_from_slice(&(d as u64).to_le_bytes());
            }
            out.extend_from_slice(tensor.bytes());
        }
        out
    }

    /// Tensors back from [`to_bytes`](Self::to_bytes)'s layout; anything else is an
    /// [`Error::InvalidInput`] saying where it went wrong.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader { bytes, at: 0 };
        if r.take(4)? != MAGIC {
            return Err(bad("does not start with kiln's tensor magic \"KLNT\""));
        }
        let version = r.take(1)?[0];
        if version != VERSION {
            return Err(bad(&format!("has layout version {version}; this kiln reads version {VERSION}")));
        }
        let count = r.u32()?;
        let mut out = NamedTensors::new();
        for _ in 0..count {
            let name_len = r.u32()? as usize;
            let name =
                std::str::from_utf8(r.take(name_len)?).map_err(|_| bad("has a name that is not UTF-8"))?;
            let dtype_len = r.take(1)?[0] as usize;
            let dtype =
                std::str::from_utf8(r.take(dtype_len)?).map_err(|_| bad("has a dtype that is not text"))?;
            let dtype: DType = dtype.parse()?;
            let rank = r.take(1)?[0] as usize;
            let shape = (0..rank).map(|_| r.u64().map(|d| d as usize)).collect::<Result<Vec<_>>>()?;
            let size = shape
                .iter()
                .try_fold(dtype.size(), |n, &d| n.checked_mul(d))
                .ok_or_else(|| bad("has a shape larger than memory can address"))?;
            out.insert(name, Tensor::from_bytes(dtype, shape, r.take(size)?.to_vec())?);
        }
        if r.at != bytes.len() {
            return Err(bad(&format!("has {} bytes after its last tensor", bytes.len() - r.at)));
        }
        Ok(out)
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.at.checked_add(n).filter(|&end| end <= self.bytes.len()).ok_or_else(|| {
            bad(&format!(
                "ends after {} bytes, inside a field of {n} bytes at offset {}",
                self.bytes.len(),
                self.at
            ))
        })?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("took 4 bytes")))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("took 8 bytes")))
    }
}

fn bad(what: &str) -> Error {
    Error::InvalidInput(format!("stored tensors {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> NamedTensors {
        NamedTensors::new()
            .with("embedding", Tensor::from_vec(vec![3], vec![1.0f32, -2.5, 3.25]).unwrap())
            .with("ids", Tensor::from_vec(vec![2, 2], vec![1i64, 2, 3, 4]).unwrap())
            .with("empty", Tensor::from_vec::<u8>(vec![0], vec![]).unwrap())
    }

    #[test]
    fn round_trips_every_tensor_bit_for_bit() {
        let t = sample();
        assert_eq!(NamedTensors::from_bytes(&t.to_bytes()).unwrap(), t);
        assert_eq!(NamedTensors::from_bytes(&NamedTensors::new().to_bytes()).unwrap(), NamedTensors::new());
    }

    #[test]
    fn every_truncation_and_foreign_bytes_are_errors() {
        let bytes = sample().to_bytes();
        for n in 0..bytes.len() {
            let e = NamedTensors::from_bytes(&bytes[..n]).unwrap_err().to_string();
            assert!(e.contains("stored tensors"), "{n}: {e}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(NamedTensors::from_bytes(&longer).unwrap_err().to_string().contains("after its last tensor"));
        let mut version = bytes.clone();
        version[4] = 9;
        assert!(NamedTensors::from_bytes(&version).unwrap_err().to_string().contains("version 9"));
        assert!(NamedTensors::from_bytes(b"{\"json\": 1}").is_err());
    }

    #[test]
    fn an_absurd_shape_is_refused_before_allocating() {
        let mut b = Vec::new();
        b.extend_from_slice(MAGIC);
        b.push(VERSION);
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&1u32.to_le_bytes());
        b.push(b'x');
        b.push(3);
        b.extend_from_slice(b"f32");
        b.push(2);
        b.extend_from_slice(&u64::MAX.to_le_bytes());
        b.extend_from_slice(&u64::MAX.to_le_bytes());
        let e = NamedTensors::from_bytes(&b).unwrap_err().to_string();
        assert!(e.contains("larger than memory"), "{e}");
    }
}
