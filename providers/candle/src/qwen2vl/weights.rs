//! A Qwen2.5-VL checkpoint's tensors, whatever layout wrote them: the names the hub and
//! transformers' `save_pretrained` write (`visual.*`, `model.layers.*`, `lm_head.weight`
//! unless tied) and the ones transformers uses in memory (`model.visual.*`,
//! `model.language_model.*`), from one `model.safetensors` or the shards an index names.
//! Also mlx-vlm's names (`vision_tower.*`, `language_model.model.*`,
//! `language_model.lm_head.*`, the patch kernel channels-last). Everything is held in
//! f32: bf16 and f16 checkpoints are widened at load, and mlx-community's quantized
//! layers (config.json `quantization: {group_size, bits}`; per layer a packed uint32
//! `weight` with `scales` and `biases`) are dequantized at load — a layer is quantized
//! exactly when its `scales` are there, as mlx-vlm decides.

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
        let scales: Vec<String> =
            tensors.keys().filter_map(|k| k.strip_suffix(".scales")).map(str::to_string).collect();
        if !scales.is_empty() {
            let (group, bits) = quantization(dir)?;
            for layer in scales {
                let mut take = |name: &str| {
                    tensors.remove(&format!("{layer}.{name}")).ok_or_else(|| {
                        Error::model_load(dir, format!("quantized layer `{layer}` has no `{name}`"))
                    })
                };
                let (packed, scales, biases) = (take("weight")?, take("scales")?, take("biases")?);
                let weight = dequantize(&packed, &scales, &biases, group, bits, device)
                    .map_err(|why| Error::model_load(dir, format!("quantized layer `{layer}`: {why}")))?;
                tensors.insert(format!("{layer}.weight"), weight);
            }
        }
        let has = |prefix: &str| tensors.keys().any(|k| k.starts_with(prefix));
        let vision = if has("vision_tower.") {
            "vision_tower."
        } else if has("model.visual.") {
            "model.visual."
        } else {
            "visual."
        };
        let text = if has("language_model.model.") {
            "language_model.model."
        } else if has("model.language_model.") {
            "model.language_model."
        } else {
            "model."
        };
        if let Some(head) = tensors.remove("language_model.lm_head.weight") {
            tensors.insert("lm_head.weight".into(), head);
        }
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

/// `quantization: {group_size, bits}` of the folder's config.json (mlx-community's
/// layout); per-module overrides are refused by name.
fn quantization(dir: &Path) -> Result<(usize, usize)> {
    let path = dir.join("config.json");
    let text = std::fs::read(&path).map_err(|e| Error::io("reading", &path, e))?;
    let json: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| Error::model_load_with(&path, "invalid JSON", e))?;
    let q = json.get("quantization").ok_or_else(|| {
        Error::model_load(
            &path,
            "the weights have quantized layers (`scales`) but config.json has no `quantization`",
        )
    })?;
    let field = |k: &str| q.get(k).and_then(serde_json::Value::as_u64).map(|v| v as usize);
    let (Some(group), Some(bits)) = (field("group_size"), field("bits")) else {
        return Err(Error::model_load(&path, "`quantization` needs `group_size` and `bits`"));
    };
    if let Some(mode) = q.get("mode").and_then(serde_json::Value::as_str).filter(|m| *m != "affine") {
        return Err(Error::Unsupported(format!(
            "{}: quantization mode `{mode}`; kiln reads `affine`",
            path.display()
        )));
    }
    let known = |k: &String| matches!(k.as_str(), "group_size" | "bits" | "mode");
    if let Some(other) = q.as_object().and_then(|o| o.keys().find(|k| !known(k))) {
        return Err(Error::Unsupported(format!(
            "{}: per-module quantization (`{other}`) is not read yet; one group_size and bits for every layer is",
            path.display()
        )));
    }
    if !(2..=8).contains(&bits) || group == 0 {
        return Err(Error::model_load(
            &path,
            format!("quantization bits {bits}, group_size {group}: out of range"),
        ));
    }
    Ok((group, bits))
}

/// MLX's affine dequantization of one layer: `packed` (u32 `[out, in·bits/32]`, each row
/// a little-endian bit stream, element j at bits `[j·bits, (j+1)·bits)`), `scales` and
/// `biases` (`[out, in/group]`) → f32 `[out, in]`, `w = scale · q + bias` per group.
fn dequantize(
    packed: &Tensor,
    scales: &Tensor,
    biases: &Tensor,
    group: usize,
    bits: usize,
    device: &Device,
) -> std::result::Result<Tensor, String> {
    if packed.dtype() != DType::U32 {
        return Err(format!("its weight is {:?}, not the packed u32 of a quantized layer", packed.dtype()));
    }
    let (out, words) = packed.dims2().map_err(|e| e.to_string())?;
    let inputs = words * 32 / bits;
    let groups = inputs / group;
    let read = |t: &Tensor| -> std::result::Result<Vec<f32>, String> {
        let (rows, cols) = t.dims2().map_err(|e| e.to_string())?;
        if (rows, cols) != (out, groups) {
            return Err(format!(
                "scales/biases of [{rows}, {cols}] for a [{out}, {inputs}] weight in groups of {group}"
            ));
        }
        t.to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| e.to_string())
    };
    let (scales, biases) = (read(scales)?, read(biases)?);
    let packed = packed.flatten_all().and_then(|t| t.to_vec1::<u32>()).map_err(|e| e.to_string())?;
    let mask = (1u64 << bits) - 1;
    let mut values = vec![0f32; out * inputs];
    for r in 0..out {
        let row = &packed[r * words..(r + 1) * words];
        for j in 0..inputs {
            let bit = j * bits;
            let (word, shift) = (bit / 32, bit % 32);
            let low = u64::from(row[word]);
            let high = row.get(word + 1).map_or(0, |&w| u64::from(w));
            let q = (((high << 32) | low) >> shift) & mask;
            let g = r * groups + j / group;
            values[r * inputs + j] = scales[g] * q as f32 + biases[g];
        }
    }
    Tensor::from_vec(values, (out, inputs), device).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Packs `q` (values below 2^bits) as MLX does: one little-endian bit stream per row.
    fn pack(q: &[u64], bits: usize) -> Vec<u32> {
        let mut words = vec![0u32; q.len() * bits / 32];
        for (j, &v) in q.iter().enumerate() {
            for b in 0..bits {
                if v >> b & 1 == 1 {
                    let at = j * bits + b;
                    words[at / 32] |= 1 << (at % 32);
                }
            }
        }
        words
    }

    #[test]
    fn every_bit_width_unpacks_to_its_values_scaled_and_offset() {
        let device = Device::Cpu;
        for bits in [2usize, 3, 4, 5, 6, 8] {
            let n = 64;
            let q: Vec<u64> = (0..n as u64).map(|j| (j * 7 + 3) % (1 << bits)).collect();
            let packed = Tensor::from_vec(pack(&q, bits), (1, n * bits / 32), &device).unwrap();
            let scales = Tensor::from_vec(vec![0.5f32, 2.0], (1, 2), &device).unwrap();
            let biases = Tensor::from_vec(vec![-1.0f32, 3.0], (1, 2), &device).unwrap();
            let w =
                dequantize(&packed, &scales, &biases, 32, bits, &device).unwrap().to_vec2::<f32>().unwrap();
            for (j, &v) in q.iter().enumerate() {
                let (s, b) = if j < 32 { (0.5, -1.0) } else { (2.0, 3.0) };
                assert_eq!(w[0][j], s * v as f32 + b, "bits {bits}, element {j}");
            }
        }
    }
}
