//! Hugging Face model folders: which safetensors files hold the weights, and how many
//! bytes they take at a given precision — read from the headers, before any loading,
//! for memory admission. Shared by the providers that read these folders.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::{
    DType, Dim, Error, Inputs, LAST_HIDDEN_STATE, Model, ModelInfo, ModelSpec, Result, Tensor, TensorSpec,
};

/// The safetensors files of a folder: one `model.safetensors`, or the shards an
/// index names.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        #[derive(Deserialize)]
        struct Index {
            weight_map: std::collections::BTreeMap<String, String>,
        }
        let text = std::fs::read(&index).map_err(|e| Error::io("reading", &index, e))?;
        let parsed: Index =
            serde_json::from_slice(&text).map_err(|e| Error::model_load_with(&index, "invalid index", e))?;
        let mut files: Vec<PathBuf> = parsed.weight_map.values().map(|f| dir.join(f)).collect();
        files.sort();
        files.dedup();
        return Ok(files);
    }
    let hint = if dir.join("pytorch_model.bin").is_file() {
        "; pytorch_model.bin is not read: convert it to safetensors"
    } else {
        ""
    };
    Err(Error::model_load(dir, format!("no model.safetensors (or model.safetensors.index.json){hint}")))
}

/// Bytes the weights take at `dtype`, from the safetensors headers (no tensor is read).
/// With `quantized` (bytes an element, scales included), the encoder's matrices count
/// that much an element; the embeddings stay at `dtype`.
pub fn weight_bytes(files: &[PathBuf], dtype: DType, quantized: Option<f64>) -> Result<u64> {
    weight_bytes_as(files, dtype, quantized, None)
}

/// [`weight_bytes`] of an mlx-community checkpoint whose layers of `bits`-bit packed
/// `u32` weights are dequantized to `dtype` at load: each packed word becomes `32 / bits`
/// elements of `dtype`.
pub fn dequantized_weight_bytes(files: &[PathBuf], dtype: DType, bits: usize) -> Result<u64> {
    weight_bytes_with(files, |_, stored, is_float, _| {
        if stored == "U32" {
            (32 / bits.max(1)) as f64 * dtype.size() as f64
        } else if is_float {
            dtype.size() as f64
        } else {
            stored_size(stored) as f64
        }
    })
}

/// Bytes a checkpoint takes when its matrices stay as stored (packed `u32`, bf16, f16:
/// a `.weight` of rank 2) and every other float tensor (norms, biases, quantization
/// scales) is widened to f32.
pub fn compact_weight_bytes(files: &[PathBuf]) -> Result<u64> {
    weight_bytes_with(files, |name, stored, is_float, rank| {
        if is_float && !(rank == 2 && name.ends_with(".weight")) { 4.0 } else { stored_size(stored) as f64 }
    })
}

fn stored_size(dtype: &str) -> usize {
    match dtype {
        "F64" | "I64" | "U64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        _ => 1,
    }
}

fn weight_bytes_as(
    files: &[PathBuf],
    dtype: DType,
    quantized: Option<f64>,
    unpacked: Option<usize>,
) -> Result<u64> {
    weight_bytes_with(files, |name, stored, is_float, rank| match quantized {
        _ if unpacked.is_some() && stored == "U32" => {
            (32 / unpacked.unwrap_or(32).max(1)) as f64 * dtype.size() as f64
        }
        Some(bytes) if rank == 2 && name.contains("encoder.") && name.ends_with(".weight") => bytes,
        // Float weights are converted to the model dtype; integer buffers keep their size.
        _ if is_float => dtype.size() as f64,
        _ => stored_size(stored) as f64,
    })
}

/// A safetensors file opened and its header read: the tensors' entries (`dtype`,
/// `shape`, `data_offsets`) by name, `__metadata__` left out, and where their data
/// starts. What reads the header only (sizes, for admission) and what reads the
/// tensors one at a time both start here.
pub struct SafetensorsHeader {
    /// The file, open for reading at offsets.
    pub file: std::fs::File,
    /// Its length in bytes.
    pub size: u64,
    /// The tensors' entries by name.
    pub tensors: serde_json::Map<String, serde_json::Value>,
    /// Offset of the data that `data_offsets` count from.
    pub data_start: u64,
}

/// Opens `path` and reads its safetensors header; a header longer than the file (or
/// 100 MiB) or not JSON is an error naming the file.
pub fn safetensors_header(path: &Path) -> Result<SafetensorsHeader> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(path).map_err(|e| Error::io("opening", path, e))?;
    let mut len = [0u8; 8];
    file.read_exact_at(&mut len, 0).map_err(|e| Error::io("reading", path, e))?;
    let len = u64::from_le_bytes(len);
    let size = file.metadata().map_err(|e| Error::io("reading", path, e))?.len();
    if len > size.saturating_sub(8) || len > 100 << 20 {
        return Err(Error::model_load(
            path,
            format!("not a safetensors file: a header of {len} bytes in a file of {size}"),
        ));
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact_at(&mut header, 8).map_err(|e| Error::io("reading", path, e))?;
    let mut tensors: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| Error::model_load_with(path, "not a safetensors file", e))?;
    tensors.remove("__metadata__");
    Ok(SafetensorsHeader { file, size, tensors, data_start: 8 + len })
}

/// Σ elements × `per_element(name, stored dtype, is float, rank)` over the tensors of
/// `files`, from their safetensors headers.
fn weight_bytes_with(files: &[PathBuf], per_element: impl Fn(&str, &str, bool, usize) -> f64) -> Result<u64> {
    let mut total = 0u64;
    for file in files {
        for (name, entry) in safetensors_header(file)?.tensors {
            let dims = entry["shape"].as_array().cloned().unwrap_or_default();
            let elements: u64 = dims.iter().filter_map(|d| d.as_u64()).product();
            let stored = entry["dtype"].as_str().unwrap_or("");
            let is_float = matches!(stored, "F64" | "F32" | "F16" | "BF16");
            total += (elements as f64 * per_element(&name, stored, is_float, dims.len())).ceil() as u64;
        }
    }
    Ok(total)
}

/// `max_position_embeddings` from the `config.json` in `dir` (Hugging Face text models),
/// for providers whose model file does not say how long a sequence may be.
pub fn max_position_embeddings(dir: &std::path::Path) -> Option<usize> {
    let text = std::fs::read(dir.join("config.json")).ok()?;
    let config: serde_json::Value = serde_json::from_slice(&text).ok()?;
    config.get("max_position_embeddings")?.as_u64().map(|n| n as usize)
}

/// The folder's `config.json` as a BERT config of the caller's type `T`: the file must
/// exist (else an error naming the folder layout), parse as JSON, say `model_type`
/// `bert` or nothing (else `Unsupported`, naming `provider`), and fit `T`.
pub fn bert_config<T: DeserializeOwned>(dir: &Path, provider: &str) -> Result<T> {
    let path = dir.join("config.json");
    let text = std::fs::read(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::model_load(
                dir,
                "no config.json; expected a Hugging Face BERT folder (config.json + model.safetensors)",
            )
        } else {
            Error::io("reading", &path, e)
        }
    })?;
    let value: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| Error::model_load_with(&path, "invalid JSON", e))?;
    match value.get("model_type").and_then(serde_json::Value::as_str) {
        Some("bert") | None => {}
        Some(other) => {
            return Err(Error::Unsupported(format!(
                "{}: model_type `{other}`; provider `{provider}` loads model_type `bert`",
                path.display()
            )));
        }
    }
    serde_json::from_value(value).map_err(|e| Error::model_load_with(&path, "not a BERT config", e))
}

/// What a BERT-family encoder from the folder `spec.path` takes and gives, as every
/// provider that loads these folders describes it: `input_ids`, `attention_mask` and
/// `token_type_ids` (i64, `[batch, sequence]`) in, [`LAST_HIDDEN_STATE`]
/// (`[batch, sequence, hidden]` of `output`) out — or the pooled embedding when
/// `spec.head` is set (the model pools on its device) — with `weight_bytes` and the
/// longest sequence its positions allow.
pub fn bert_model_info(
    spec: &ModelSpec,
    provider: &str,
    output: DType,
    hidden: usize,
    max_positions: usize,
    weight_bytes: u64,
) -> ModelInfo {
    let dir = &spec.path;
    let name =
        dir.file_name().map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into_owned());
    let token_dims = || vec![Dim::Dynamic("batch".into()), Dim::Dynamic("sequence".into())];
    let mut info = ModelInfo::new(name, provider, spec.device, spec.dtype);
    info.inputs = ["input_ids", "attention_mask", "token_type_ids"]
        .into_iter()
        .map(|n| TensorSpec::new(n, DType::I64, token_dims()))
        .collect();
    info.outputs = vec![TensorSpec::new(
        LAST_HIDDEN_STATE,
        output,
        vec![Dim::Dynamic("batch".into()), Dim::Dynamic("sequence".into()), Dim::Fixed(hidden)],
    )];
    // Always applicable: the model takes the attention mask and its output is token vectors.
    info.declare_head(spec.head);
    info.weight_bytes = Some(weight_bytes);
    info.max_sequence_length = Some(max_positions);
    info
}

/// Runs a padded batch of two through a just-loaded encoder, so that a precision the
/// provider cannot compute on the device is refused at load, with its reason — not on
/// the first request or, worse, as NaN embeddings. The error names `provider`, the
/// dtype and the device.
pub fn probe_encoder(model: &dyn Model, provider: &str, spec: &ModelSpec) -> Result<()> {
    let unsupported = |why: String| {
        Error::Unsupported(format!(
            "provider `{provider}` cannot run {} on {}: {why}",
            spec.dtype, spec.device
        ))
    };
    let inputs = Inputs::new()
        .with("input_ids", Tensor::from_vec(vec![2, 3], vec![101i64, 7592, 102, 101, 102, 0])?)
        .with("attention_mask", Tensor::from_vec(vec![2, 3], vec![1i64, 1, 1, 1, 1, 0])?)
        .with("token_type_ids", Tensor::from_vec(vec![2, 3], vec![0i64; 6])?);
    let outputs = model.run(&inputs).map_err(|e| unsupported(e.to_string()))?;
    let first = model.info().outputs.first().map(|o| o.name.as_str()).unwrap_or(LAST_HIDDEN_STATE);
    if !outputs.require(first)?.to_f32_vec()?.iter().all(|v| v.is_finite()) {
        return Err(unsupported("the probe batch produced non-finite values".into()));
    }
    Ok(())
}
