//! A Qwen2.5-VL checkpoint's tensors, whatever layout wrote them: the names the hub and
//! transformers' `save_pretrained` write (`visual.*`, `model.layers.*`, `lm_head.weight`
//! unless tied) and the ones transformers uses in memory (`model.visual.*`,
//! `model.language_model.*`), from one `model.safetensors` or the shards an index names.
//! Everything is held in f32 (bf16 and f16 checkpoints are widened at load).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use kiln_core::{Error, Result};

use crate::backend;

/// `y = x · Wᵀ + b`.
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// `x · Wᵀ + b` over the last dim of `x`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.broadcast_matmul(&self.weight.t().map_err(backend)?).map_err(backend)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b).map_err(backend),
            None => Ok(y),
        }
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }
}

/// RMSNorm as transformers computes it: `x · rsqrt(mean(x²) + eps) · weight`, in f32.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.sqr().and_then(|s| s.mean_keepdim(candle_core::D::Minus1)).map_err(backend)?;
    let scale = (mean + eps).and_then(|v| v.sqrt()).and_then(|v| v.recip()).map_err(backend)?;
    x.broadcast_mul(&scale).and_then(|h| h.broadcast_mul(weight)).map_err(backend)
}

/// The checkpoint's tensors by name.
pub struct Weights {
    tensors: HashMap<String, Tensor>,
    device: Device,
    path: std::path::PathBuf,
    vision: &'static str,
    text: &'static str,
}

impl Weights {
    /// Reads every safetensors file of the folder `dir` onto `device`, as f32.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let files = kiln_core::hf::weight_files(dir)?;
        let mut tensors = HashMap::new();
        for file in &files {
            let loaded = candle_core::safetensors::load(file, device)
                .map_err(|e| Error::model_load(file, format!("cannot read its safetensors: {e}")))?;
            for (name, tensor) in loaded {
                let tensor = match tensor.dtype() {
                    DType::F32 | DType::U32 | DType::U8 | DType::I64 => tensor,
                    _ => tensor.to_dtype(DType::F32).map_err(backend)?,
                };
                tensors.insert(name, tensor);
            }
        }
        let vision =
            if tensors.keys().any(|k| k.starts_with("model.visual.")) { "model.visual." } else { "visual." };
        let text = if tensors.keys().any(|k| k.starts_with("model.language_model.")) {
            "model.language_model."
        } else {
            "model."
        };
        Ok(Weights { tensors, device: device.clone(), path: dir.to_path_buf(), vision, text })
    }

    /// Where the tensors are.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// `visual.` or `model.visual.`, as the checkpoint names the vision tower.
    pub fn vision_prefix(&self) -> &'static str {
        self.vision
    }

    /// `model.` or `model.language_model.`, as the checkpoint names the text model.
    pub fn text_prefix(&self) -> &'static str {
        self.text
    }

    /// The tensor `name`, or an error naming it and the folder.
    pub fn get(&self, name: &str) -> Result<Tensor> {
        self.tensors.get(name).cloned().ok_or_else(|| {
            Error::model_load(&self.path, format!("no tensor `{name}`; is this a Qwen2.5-VL checkpoint?"))
        })
    }

    /// Whether the checkpoint has `name`.
    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The linear layer `prefix` (`prefix.weight`, and `prefix.bias` when `bias`).
    pub fn linear(&self, prefix: &str, bias: bool) -> Result<Linear> {
        let weight = self.get(&format!("{prefix}.weight"))?;
        let bias = if bias { Some(self.get(&format!("{prefix}.bias"))?) } else { None };
        Ok(Linear { weight, bias })
    }

    /// The patch convolution's kernel as a `[hidden, C·T·P·P]` matrix whose columns are
    /// in the processor's (channel, time, row, column) order: torch's `[hidden, C, T, P,
    /// P]` reshaped, or MLX's channels-last `[hidden, T, P, P, C]` permuted first.
    pub fn patch_matrix(&self, kernel: Tensor, hidden: usize) -> Result<Tensor> {
        let dims = kernel.dims().to_vec();
        let kernel = match dims.as_slice() {
            [_, 3, _, _, _] => kernel,
            [_, _, _, _, 3] => kernel.permute((0, 4, 1, 2, 3)).map_err(backend)?,
            other => {
                return Err(Error::model_load(
                    &self.path,
                    format!("patch_embed.proj.weight has shape {other:?}; expected [hidden, 3, T, P, P]"),
                ));
            }
        };
        let columns = kernel.elem_count() / hidden;
        kernel.contiguous().and_then(|k| k.reshape((hidden, columns))).map_err(backend)
    }
}
