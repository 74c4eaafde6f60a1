//! GGUF files (llama.cpp's model format): the header, metadata and tensor directory,
//! read by kiln for every provider that generates from them, and what a llama
//! decoder's [`GeneratorInfo`] takes from the metadata (shape, tokenizer, special
//! tokens, chat template). Tensor data is read on demand, one tensor at a time.
//!
//! The layout (version 2 and 3): magic `GGUF`, version, tensor count, metadata count;
//! metadata as `(key, type, value)`; per tensor its name, dimensions (innermost first),
//! GGML type and offset; the data after the directory at `general.alignment` (32).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::{Device, Error, GeneratorInfo, Result, TokenizerSource};

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Any unsigned integer type.
    U64(u64),
    /// Any signed integer type.
    I64(i64),
    /// `f32` or `f64`.
    F64(f64),
    /// A boolean.
    Bool(bool),
    /// A string.
    Str(String),
    /// An array.
    Array(Vec<Value>),
}

impl Value {
    /// The value as an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U64(v) => Some(v),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
    /// The value as a float, if it is a number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F64(v) => Some(v),
            Value::U64(v) => Some(v as f64),
            Value::I64(v) => Some(v as f64),
            _ => None,
        }
    }
}

/// GGML tensor types kiln reads (the ids are GGML's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    /// 32-bit floats.
    F32,
    /// 16-bit floats.
    F16,
    /// Blocks of 32: an f16 scale `d`, 16 bytes of 4-bit `q`; `x = d (q - 8)`.
    Q4_0,
    /// Blocks of 32: f16 `d` and `m`, 16 bytes of 4-bit `q`; `x = d q + m`.
    Q4_1,
    /// Blocks of 32: an f16 scale `d`, 32 signed bytes `q`; `x = d q`.
    Q8_0,
    /// Another GGML type (its id); kiln names it in errors.
    Other(u32),
}

impl GgmlType {
    fn from_id(id: u32) -> Self {
        match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            other => GgmlType::Other(other),
        }
    }

    /// Elements per block and bytes per block; `None` for types kiln does not read.
    pub fn block(self) -> Option<(usize, usize)> {
        match self {
            GgmlType::F32 => Some((1, 4)),
            GgmlType::F16 => Some((1, 2)),
            GgmlType::Q4_0 => Some((32, 18)),
            GgmlType::Q4_1 => Some((32, 20)),
            GgmlType::Q8_0 => Some((32, 34)),
            GgmlType::Other(_) => None,
        }
    }

    /// Lower-case name, as llama.cpp prints it.
    pub fn name(self) -> String {
        match self {
            GgmlType::F32 => "f32".into(),
            GgmlType::F16 => "f16".into(),
            GgmlType::Q4_0 => "q4_0".into(),
            GgmlType::Q4_1 => "q4_1".into(),
            GgmlType::Q8_0 => "q8_0".into(),
            GgmlType::Other(id) => format!("ggml type {id}"),
        }
    }
}

/// A tensor's entry in the directory.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// Dimensions, innermost (contiguous) first, as GGUF stores them: a matrix with
    /// `n` rows of `k` is `[k, n]`.
    pub dims: Vec<usize>,
    /// Element type.
    pub kind: GgmlType,
    /// Bytes from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// Elements.
    pub fn elements(&self) -> usize {
        self.dims.iter().product()
    }
    /// Bytes in the file; `None` for types kiln does not read or a row that is not
    /// whole blocks.
    pub fn bytes(&self) -> Option<usize> {
        let (per, bytes) = self.kind.block()?;
        let row = *self.dims.first().unwrap_or(&1);
        row.is_multiple_of(per).then(|| self.elements() / per * bytes)
    }
}

/// An open GGUF file: metadata and tensor directory in memory, data on disk.
#[derive(Debug)]
pub struct Gguf {
    path: PathBuf,
    /// Metadata by key.
    pub metadata: BTreeMap<String, Value>,
    /// Tensors by name.
    pub tensors: BTreeMap<String, TensorInfo>,
    data_start: u64,
}

const MAX_LEN: u64 = 1 << 30;

struct Cursor<R> {
    inner: R,
    at: u64,
}

impl<R: Read> Cursor<R> {
    fn bytes<const N: usize>(&mut self) -> std::io::Result<[u8; N]> {
        let mut b = [0u8; N];
        self.inner.read_exact(&mut b)?;
        self.at += N as u64;
        Ok(b)
    }
    fn u32(&mut self) -> std::io::Result<u32> {
        self.bytes().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> std::io::Result<u64> {
        self.bytes().map(u64::from_le_bytes)
    }
    fn len(&mut self) -> std::io::Result<u64> {
        let n = self.u64()?;
        if n > MAX_LEN {
            return Err(std::io::Error::other(format!("a length of {n} (damaged file?)")));
        }
        Ok(n)
    }
    fn string(&mut self) -> std::io::Result<String> {
        let n = self.len()? as usize;
        let mut b = vec![0u8; n];
        self.inner.read_exact(&mut b)?;
        self.at += n as u64;
        Ok(String::from_utf8_lossy(&b).into_owned())
    }
    fn value(&mut self, kind: u32) -> std::io::Result<Value> {
        Ok(match kind {
            0 => Value::U64(self.bytes::<1>()?[0] as u64),
            1 => Value::I64(self.bytes::<1>()?[0] as i8 as i64),
            2 => Value::U64(u16::from_le_bytes(self.bytes()?) as u64),
            3 => Value::I64(i16::from_le_bytes(self.bytes()?) as i64),
            4 => Value::U64(self.u32()? as u64),
            5 => Value::I64(i32::from_le_bytes(self.bytes()?) as i64),
            6 => Value::F64(f32::from_le_bytes(self.bytes()?) as f64),
            7 => Value::Bool(self.bytes::<1>()?[0] != 0),
            8 => Value::Str(self.string()?),
            9 => {
                let inner = self.u32()?;
                let n = self.len()?;
                (0..n).map(|_| self.value(inner)).collect::<std::io::Result<_>>().map(Value::Array)?
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(self.u64()? as i64),
            12 => Value::F64(f64::from_le_bytes(self.bytes()?)),
            other => return Err(std::io::Error::other(format!("unknown metadata type {other}"))),
        })
    }
}

impl Gguf {
    /// Reads the header, metadata and directory of `path`.
    pub fn open(path: &Path) -> Result<Gguf> {
        let file = File::open(path).map_err(|e| Error::io("opening", path, e))?;
        let bad = |e: std::io::Error| Error::model_load(path, format!("not a readable GGUF file: {e}"));
        let mut r = Cursor { inner: BufReader::new(file), at: 0 };
        if &r.bytes::<4>().map_err(bad)? != b"GGUF" {
            return Err(Error::model_load(path, "not a GGUF file (no `GGUF` magic)"));
        }
        let version = r.u32().map_err(bad)?;
        if !(2..=3).contains(&version) {
            return Err(Error::model_load(
                path,
                format!("GGUF version {version}; kiln reads versions 2 and 3"),
            ));
        }
        let tensor_count = r.len().map_err(bad)?;
        let metadata_count = r.len().map_err(bad)?;
        let mut metadata = BTreeMap::new();
        for _ in 0..metadata_count {
            let key = r.string().map_err(bad)?;
            let kind = r.u32().map_err(bad)?;
            metadata.insert(key, r.value(kind).map_err(bad)?);
        }
        let mut tensors = BTreeMap::new();
        for _ in 0..tensor_count {
            let name = r.string().map_err(bad)?;
            let ndim = r.u32().map_err(bad)?;
            if ndim > 4 {
                return Err(Error::model_load(path, format!("tensor `{name}` has {ndim} dimensions")));
            }
            let dims = (0..ndim)
                .map(|_| r.len().map(|d| d as usize))
                .collect::<std::io::Result<_>>()
                .map_err(bad)?;
            let kind = GgmlType::from_id(r.u32().map_err(bad)?);
            let offset = r.u64().map_err(bad)?;
            tensors.insert(name, TensorInfo { dims, kind, offset });
        }
        let align = metadata.get("general.alignment").and_then(Value::as_u64).unwrap_or(32).max(1);
        let data_start = r.at.div_ceil(align) * align;
        Ok(Gguf { path: path.to_path_buf(), metadata, tensors, data_start })
    }

    /// The tensor's entry, or an error naming it.
    pub fn tensor(&self, name: &str) -> Result<&TensorInfo> {
        self.tensors.get(name).ok_or_else(|| Error::model_load(&self.path, format!("no tensor `{name}`")))
    }

    /// A tensor's bytes as the file stores them.
    pub fn read(&self, name: &str) -> Result<Vec<u8>> {
        let info = self.tensor(name)?;
        let bytes = info.bytes().ok_or_else(|| {
            Error::Unsupported(format!(
                "{}: tensor `{name}` is {}; kiln reads f32, f16, q4_0, q4_1 and q8_0 tensors",
                self.path.display(),
                info.kind.name()
            ))
        })?;
        let mut file = File::open(&self.path).map_err(|e| Error::io("opening", &self.path, e))?;
        let mut data = vec![0u8; bytes];
        file.seek(SeekFrom::Start(self.data_start + info.offset))
            .and_then(|_| file.read_exact(&mut data))
            .map_err(|e| Error::model_load(&self.path, format!("reading tensor `{name}`: {e}")))?;
        Ok(data)
    }

    /// A string value.
    pub fn string(&self, key: &str) -> Option<String> {
        match self.metadata.get(key) {
            Some(Value::Str(s)) => Some(s.clone()),
            _ => None,
        }
    }

    /// An integer value, or an error naming the key.
    pub fn usize(&self, key: &str) -> Result<usize> {
        self.metadata.get(key).and_then(Value::as_u64).map(|v| v as usize).ok_or_else(|| {
            Error::model_load(&self.path, format!("metadata `{key}` is missing or not an integer"))
        })
    }

    /// A float value.
    pub fn f32(&self, key: &str) -> Option<f32> {
        self.metadata.get(key).and_then(Value::as_f64).map(|v| v as f32)
    }

    fn strings(&self, key: &str) -> Result<Vec<String>> {
        match self.metadata.get(key) {
            Some(Value::Array(items)) => Ok(items
                .iter()
                .map(|v| match v {
                    Value::Str(s) => s.clone(),
                    _ => String::new(),
                })
                .collect()),
            _ => Err(Error::model_load(&self.path, format!("metadata `{key}` is missing or not a list"))),
        }
    }

    /// The llama-architecture hyper-parameters (`general.architecture = "llama"`).
    pub fn llama(&self) -> Result<LlamaShape> {
        let arch = self.string("general.architecture").unwrap_or_default();
        if arch != "llama" {
            return Err(Error::Unsupported(format!(
                "{}: architecture `{arch}`; kiln generates with llama-architecture GGUF models",
                self.path.display()
            )));
        }
        let shape = LlamaShape {
            heads: self.usize("llama.attention.head_count")?,
            kv_heads: self.usize("llama.attention.head_count_kv")?,
            width: self.usize("llama.embedding_length")?,
            blocks: self.usize("llama.block_count")?,
            context: self.usize("llama.context_length")?,
            eps: self.f32("llama.attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            rope_base: self.f32("llama.rope.freq_base").unwrap_or(10_000.0),
        };
        let (h, kv, w) = (shape.heads, shape.kv_heads, shape.width);
        if h == 0 || kv == 0 || !h.is_multiple_of(kv) || !w.is_multiple_of(h) {
            return Err(Error::model_load(&self.path, format!("{h} heads, {kv} KV heads, width {w}")));
        }
        Ok(shape)
    }

    /// What a llama decoder from this file tells the runtime: name, context, vocabulary,
    /// the tokenizer (byte-level BPE from the metadata, or a `tokenizer.json` beside
    /// the file), special tokens, chat template and KV bytes per token at
    /// `kv_element_bytes` per cached value.
    pub fn generator_info(
        &self,
        provider: &str,
        device: Device,
        kv_element_bytes: usize,
    ) -> Result<GeneratorInfo> {
        let shape = self.llama()?;
        let path = &self.path;
        let tokens = self.strings("tokenizer.ggml.tokens")?;
        let tokenizer = match self.string("tokenizer.ggml.model").as_deref() {
            Some("gpt2") => TokenizerSource::GgufBpe {
                pre: self.string("tokenizer.ggml.pre").unwrap_or_else(|| "default".into()),
                tokens: tokens.clone(),
                merges: self.strings("tokenizer.ggml.merges")?,
                token_types: match self.metadata.get("tokenizer.ggml.token_type") {
                    Some(Value::Array(v)) => v.iter().map(|t| t.as_f64().unwrap_or(1.0) as i32).collect(),
                    _ => vec![1; tokens.len()],
                },
            },
            other => {
                let beside = path.with_file_name("tokenizer.json");
                if !beside.is_file() {
                    return Err(Error::Unsupported(format!(
                        "{}: tokenizer model `{}` in the GGUF metadata; kiln reads byte-level BPE (`gpt2`) from \
                         GGUF, or a tokenizer.json beside the model",
                        path.display(),
                        other.unwrap_or("none")
                    )));
                }
                TokenizerSource::File(beside)
            }
        };
        let name =
            path.file_stem().map_or_else(|| path.display().to_string(), |s| s.to_string_lossy().into_owned());
        let mut info = GeneratorInfo::new(name, provider, device, tokens.len(), shape.context, tokenizer);
        let id = |key: &str| self.metadata.get(key).and_then(Value::as_u64).map(|v| v as u32);
        info.bos_token_id = id("tokenizer.ggml.bos_token_id");
        info.eos_token_ids = id("tokenizer.ggml.eos_token_id").into_iter().collect();
        if let Some(eot) = id("tokenizer.ggml.eot_token_id").filter(|e| !info.eos_token_ids.contains(e)) {
            info.eos_token_ids.push(eot);
        }
        info.add_bos = matches!(self.metadata.get("tokenizer.ggml.add_bos_token"), Some(Value::Bool(true)));
        info.chat_template = self.string("tokenizer.chat_template");
        let head_dim = shape.width / shape.heads;
        info.kv_bytes_per_token = (2 * shape.blocks * shape.kv_heads * head_dim * kv_element_bytes) as u64;
        info.weight_bytes = std::fs::metadata(path).ok().map(|m| m.len());
        Ok(info)
    }
}

/// A llama decoder's hyper-parameters from GGUF metadata.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LlamaShape {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `heads`).
    pub kv_heads: usize,
    /// Hidden width.
    pub width: usize,
    /// Transformer blocks.
    pub blocks: usize,
    /// Context length, tokens.
    pub context: usize,
    /// RMS norm epsilon.
    pub eps: f32,
    /// Rotary embedding base.
    pub rope_base: f32,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn string(s: &str) -> Vec<u8> {
        let mut b = (s.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(s.as_bytes());
        b
    }

    #[test]
    fn reads_metadata_directory_and_tensor_bytes() {
        let mut f = b"GGUF".to_vec();
        f.extend(3u32.to_le_bytes());
        f.extend(1u64.to_le_bytes());
        f.extend(2u64.to_le_bytes());
        f.extend(string("general.architecture"));
        f.extend(8u32.to_le_bytes());
        f.extend(string("llama"));
        f.extend(string("list"));
        f.extend(9u32.to_le_bytes());
        f.extend(4u32.to_le_bytes());
        f.extend(2u64.to_le_bytes());
        f.extend(7u32.to_le_bytes());
        f.extend(9u32.to_le_bytes());
        f.extend(string("w"));
        f.extend(2u32.to_le_bytes());
        f.extend(2u64.to_le_bytes());
        f.extend(1u64.to_le_bytes());
        f.extend(0u32.to_le_bytes());
        f.extend(0u64.to_le_bytes());
        f.resize(f.len().div_ceil(32) * 32, 0);
        f.extend(1.5f32.to_le_bytes());
        f.extend((-2.0f32).to_le_bytes());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        std::fs::write(&path, &f).unwrap();
        let g = Gguf::open(&path).unwrap();
        assert_eq!(g.string("general.architecture").as_deref(), Some("llama"));
        assert_eq!(g.metadata["list"], Value::Array(vec![Value::U64(7), Value::U64(9)]));
        assert_eq!(g.tensor("w").unwrap().dims, [2, 1]);
        let bytes = g.read("w").unwrap();
        assert_eq!(bytes.len(), 8);
        assert_eq!(f32::from_le_bytes(bytes[4..].try_into().unwrap()), -2.0);
        assert!(g.tensor("missing").unwrap_err().to_string().contains("no tensor `missing`"));
        let err = g.llama().unwrap_err().to_string();
        assert!(err.contains("llama.attention.head_count"), "{err}");

        std::fs::write(&path, &f[..40]).unwrap();
        let err = Gguf::open(&path).unwrap_err().to_string();
        assert!(err.contains("not a readable GGUF file"), "{err}");
        std::fs::write(&path, b"GGML....").unwrap();
        assert!(Gguf::open(&path).unwrap_err().to_string().contains("magic"));
    }
}
