//! A Qwen2.5-VL checkpoint's tensors as MLX arrays: every safetensors file of the folder
//! (one, or the shards an index names), in whichever naming layout wrote them
//! ([`TensorLayout`]), mlx-community's packed layers kept packed for MLX's quantized
//! matmul.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use kiln_core::qwen2vl::TensorLayout;
use kiln_core::{DType, Error, Result};

use crate::array::{self, Array};

/// `x @ W^T (+ b)`.
pub enum Linear {
    /// MLX's groupwise affine quantization as the checkpoint stores it.
    Quantized { weight: Array, scales: Array, biases: Array, group: usize, bits: usize, bias: Option<Array> },
    /// A dense matrix, kept transposed (`[in, out]`).
    Dense { weight_t: Array, bias: Option<Array> },
}

impl Linear {
    /// `x` `[rows, in]` → `[rows, out]`.
    pub fn forward(&self, x: &Array) -> Result<Array> {
        match self {
            Linear::Quantized { weight, scales, biases, group, bits, bias } => {
                let y = x.quantized_matmul(weight, scales, biases, *group, *bits)?;
                match bias {
                    Some(b) => y.add(b),
                    None => Ok(y),
                }
            }
            Linear::Dense { weight_t, bias: Some(b) } => x.addmm(weight_t, b),
            Linear::Dense { weight_t, bias: None } => x.matmul(weight_t),
        }
    }

    /// Its arrays, to evaluate at load.
    pub fn arrays(&self) -> Vec<&Array> {
        match self {
            Linear::Quantized { weight, scales, biases, bias, .. } => {
                let mut all = vec![weight, scales, biases];
                all.extend(bias);
                all
            }
            Linear::Dense { weight_t, bias } => {
                let mut all = vec![weight_t];
                all.extend(bias);
                all
            }
        }
    }
}

/// The token embedding: dense rows, or packed rows dequantized as they are picked.
pub enum Embedding {
    /// `[vocab, hidden]`.
    Dense(Array),
    /// Packed rows with their scales and biases.
    Quantized { weight: Array, scales: Array, biases: Array, group: usize, bits: usize },
}

impl Embedding {
    /// The rows of `ids` (int32), `[ids, hidden]`.
    pub fn rows(&self, ids: &Array) -> Result<Array> {
        match self {
            Embedding::Dense(table) => table.take(ids, 0),
            Embedding::Quantized { weight, scales, biases, group, bits } => {
                weight.take(ids, 0)?.dequantize(&scales.take(ids, 0)?, &biases.take(ids, 0)?, *group, *bits)
            }
        }
    }

    /// The same matrix as an output projection (tied embeddings): no copy.
    pub fn as_linear(&self) -> Result<Linear> {
        Ok(match self {
            Embedding::Dense(table) => Linear::Dense { weight_t: table.transpose(&[1, 0])?, bias: None },
            Embedding::Quantized { weight, scales, biases, group, bits } => Linear::Quantized {
                weight: weight.share()?,
                scales: scales.share()?,
                biases: biases.share()?,
                group: *group,
                bits: *bits,
                bias: None,
            },
        })
    }

    /// Its arrays, to evaluate at load.
    pub fn arrays(&self) -> Vec<&Array> {
        match self {
            Embedding::Dense(table) => vec![table],
            Embedding::Quantized { weight, scales, biases, .. } => vec![weight, scales, biases],
        }
    }
}

/// The folder's tensors, opened lazily by MLX.
pub struct Checkpoint {
    files: Vec<(array::Weights, HashSet<String>)>,
    /// Which naming layout wrote them.
    pub layout: TensorLayout,
    quantization: Option<(usize, usize)>,
    dtype: DType,
    path: PathBuf,
}

impl Checkpoint {
    /// Opens every safetensors file of `dir`; float tensors come out at `dtype`.
    pub fn open(dir: &Path, dtype: DType) -> Result<Checkpoint> {
        let mut files = Vec::new();
        for file in kiln_core::hf::weight_files(dir)? {
            let names: HashSet<String> =
                kiln_core::hf::safetensors_header(&file)?.tensors.into_iter().map(|(n, _)| n).collect();
            files.push((array::Weights::load(&file)?, names));
        }
        let layout =
            TensorLayout::detect(files.iter().flat_map(|(_, names)| names.iter().map(String::as_str)));
        let packed = files.iter().any(|(_, names)| names.iter().any(|n| n.ends_with(".scales")));
        let quantization = match (packed, kiln_core::qwen2vl::quantization(dir)?) {
            (true, None) => {
                return Err(Error::model_load(
                    dir.join("config.json"),
                    "the weights have quantized layers (`scales`) but config.json has no `quantization`",
                ));
            }
            (_, q) => q,
        };
        Ok(Checkpoint { files, layout, quantization, dtype, path: dir.to_path_buf() })
    }

    /// Whether the checkpoint has `name`.
    pub fn has(&self, name: &str) -> bool {
        self.files.iter().any(|(_, names)| names.contains(name))
    }

    /// The tensor `name` as stored.
    fn raw(&self, name: &str) -> Result<Array> {
        self.files.iter().find(|(_, names)| names.contains(name)).and_then(|(w, _)| w.get(name)).ok_or_else(
            || Error::model_load(&self.path, format!("no tensor `{name}`; is this a Qwen2.5-VL checkpoint?")),
        )
    }

    /// The float tensor `name` at the model's dtype.
    pub fn get(&self, name: &str) -> Result<Array> {
        self.raw(name)?.astype(self.dtype)
    }

    /// `prefix.weight` (and `prefix.bias` when `bias`): packed when the checkpoint has
    /// `prefix.scales`, else dense at the model's dtype.
    pub fn linear(&self, prefix: &str, bias: bool) -> Result<Linear> {
        let bias = if bias { Some(self.get(&format!("{prefix}.bias"))?) } else { None };
        match self.packed(prefix)? {
            Some((weight, scales, biases, group, bits)) => {
                Ok(Linear::Quantized { weight, scales, biases, group, bits, bias })
            }
            None => Ok(Linear::Dense {
                weight_t: self.get(&format!("{prefix}.weight"))?.transpose(&[1, 0])?,
                bias,
            }),
        }
    }

    /// The embedding `prefix`, packed or dense as stored.
    pub fn embedding(&self, prefix: &str) -> Result<Embedding> {
        match self.packed(prefix)? {
            Some((weight, scales, biases, group, bits)) => {
                Ok(Embedding::Quantized { weight, scales, biases, group, bits })
            }
            None => Ok(Embedding::Dense(self.get(&format!("{prefix}.weight"))?)),
        }
    }

    /// A packed layer's weight, scales (at the model's dtype), biases, group and bits.
    #[allow(clippy::type_complexity)]
    fn packed(&self, prefix: &str) -> Result<Option<(Array, Array, Array, usize, usize)>> {
        if !self.has(&format!("{prefix}.scales")) {
            return Ok(None);
        }
        let (group, bits) = self.quantization.ok_or_else(|| {
            Error::model_load(
                &self.path,
                format!("`{prefix}` is packed but config.json has no `quantization`"),
            )
        })?;
        let weight = self.raw(&format!("{prefix}.weight"))?;
        if !weight.is_u32() {
            return Err(Error::model_load(
                &self.path,
                format!("`{prefix}.weight` is {}, not the packed u32 of a quantized layer", weight.dtype()),
            ));
        }
        let scales = self.get(&format!("{prefix}.scales"))?;
        let biases = self.get(&format!("{prefix}.biases"))?;
        let (w, s) = (weight.shape(), scales.shape());
        if w.len() != 2 || s.len() != 2 || w[0] != s[0] || w[1] * 32 / bits != s[1] * group {
            return Err(Error::model_load(
                &self.path,
                format!(
                    "`{prefix}`: a packed weight of {w:?} with scales of {s:?} at {bits} bits, group {group}"
                ),
            ));
        }
        Ok(Some((weight, scales, biases, group, bits)))
    }

    /// The patch convolution's kernel as `[C·T·P·P, hidden]` (transposed for `x @ W`),
    /// its rows in the processor's (channel, time, row, column) order: torch's `[hidden,
    /// C, T, P, P]`, or MLX's channels-last `[hidden, T, P, P, C]` permuted first.
    pub fn patch_matrix(&self, name: &str) -> Result<Array> {
        let kernel = self.get(name)?;
        let shape = kernel.shape();
        let kernel = match shape.as_slice() {
            [_, 3, _, _, _] => kernel,
            [_, _, _, _, 3] => kernel.transpose(&[0, 4, 1, 2, 3])?,
            other => {
                return Err(Error::model_load(
                    &self.path,
                    format!("`{name}` has shape {other:?}; expected [hidden, 3, T, P, P]"),
                ));
            }
        };
        let hidden = shape[0] as i32;
        kernel.reshape(&[hidden, -1])?.transpose(&[1, 0])
    }
}
