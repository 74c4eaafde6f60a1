//! The provider itself; compiled with the `libmlx` feature (see the crate docs).

use std::path::Path;
use std::sync::Arc;

use kiln_core::hf::{bert_config, bert_model_info, probe_encoder, weight_bytes, weight_files};
use kiln_core::{
    Capabilities, DType, Device, DeviceKind, Dim, EmbeddingHead, Error, Inputs, Model, ModelInfo, ModelSpec,
    Outputs, Pending, Provider, ProviderConfig, Quantization, Result, SENTENCE_EMBEDDING, Tensor, TensorSpec,
    async_trait,
};
use serde::Deserialize;

use crate::NAME;
use crate::array;
use crate::bert::{Batch, Bert, BertConfig, Quant};
use crate::graph::Graph;
use crate::onnx;

/// The name of the token-vector output (no embedding head asked for).
pub use kiln_core::LAST_HIDDEN_STATE;

/// `[provider.options]` of the MLX provider.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MlxOptions {
    /// Elements sharing one scale and bias in a quantized row: 32, 64 or 128.
    pub group_size: usize,
    /// Return MLX's cached buffers to the system after each load.
    pub clear_cache_after_load: bool,
    /// A GGUF file's quantized matrices: `"quantized"` (MLX's quantized matmul, the
    /// file's blocks re-packed), `"dense"` (dequantized at load, MLX's BLAS/GEMM), or
    /// `"auto"`: quantized on a GPU, dense on the CPU, where MLX's quantized matmul is
    /// a scalar loop (~2 tokens/s for a 135M model on 2 cores; dense ~12).
    pub gguf_matrices: String,
    /// A BERT batch is queued on the device and waited for on kiln's responder thread
    /// (`Model::start`), so the model thread builds the next batch's graph meanwhile;
    /// `false`: each batch is waited for on the model thread.
    pub overlap_batches: bool,
    /// On a CUDA GPU, BERT's embedding sum (word rows gathered, position and type rows
    /// added) in one kiln kernel instead of MLX's gather and two adds. Off by default:
    /// on an H100 the bench gave the same throughput either way
    /// (`scripts/device/mlx_gpu.sh`).
    pub embedding_kernel: bool,
    /// Generation: a greedy sequence's next token is picked on the device (the argmax
    /// evaluated with the step), so only its id comes back to the host instead of its
    /// row of logits; `false`: every row of logits is copied out and sampled on the host.
    pub greedy_on_device: bool,
    /// Generation from GGUF: a step whose sequences are greedy also queues the next
    /// decode step on the device (fed the tokens just picked) before it returns, so the
    /// device computes step n + 1 while the host hands out step n's tokens; the next
    /// call takes what it finds there. Needs `greedy_on_device`; GPUs only (on the
    /// CPU the host's own cores compute the step). Off by default: on an H100 it
    /// measured 1.16× and 0.84× the throughput without it, with stalls of 90–135 ms
    /// at p99 (docs/benchmarks.md).
    pub decode_ahead: bool,
}

impl Default for MlxOptions {
    fn default() -> Self {
        MlxOptions {
            group_size: 64,
            clear_cache_after_load: true,
            gguf_matrices: "auto".into(),
            overlap_batches: true,
            embedding_kernel: false,
            greedy_on_device: true,
            decode_ahead: false,
        }
    }
}

/// The MLX provider.
#[derive(Debug)]
pub struct MlxProvider {
    options: MlxOptions,
}

fn build(config: &ProviderConfig) -> Result<Arc<dyn Provider>> {
    let options: MlxOptions = config.options()?;
    if ![32, 64, 128].contains(&options.group_size) {
        return Err(Error::Config(vec![kiln_core::ConfigIssue::new(
            "provider.options.group_size",
            options.group_size.to_string(),
            "32, 64 or 128",
        )]));
    }
    if !["auto", "quantized", "dense"].contains(&options.gguf_matrices.as_str()) {
        return Err(Error::Config(vec![kiln_core::ConfigIssue::new(
            "provider.options.gguf_matrices",
            options.gguf_matrices.clone(),
            "\"auto\", \"quantized\" or \"dense\"",
        )]));
    }
    Ok(Arc::new(MlxProvider { options }))
}

kiln_core::register_provider!(
    NAME,
    "BERT encoders and ONNX graphs on MLX (cpu; cuda:N with mlx-cuda; metal:N on macOS)",
    build
);

/// The GPU kind MLX's GPU is on this platform.
fn gpu_kind() -> DeviceKind {
    if cfg!(target_os = "macos") { DeviceKind::Metal } else { DeviceKind::Cuda }
}

/// MLX's device for a kiln device: `None` for the CPU, the GPU index otherwise.
fn mlx_device(device: Device) -> Result<Option<usize>> {
    match device {
        Device::Cpu => Ok(None),
        Device::Cuda(n) | Device::Metal(n) if device.kind() == gpu_kind() => {
            let count = array::gpu_count();
            if n >= count {
                let why = if count == 0 {
                    format!(
                        "the MLX library loaded ({}) has no GPU device; on NVIDIA put mlx-cuda-13's libmlx.so first \
                         on LD_LIBRARY_PATH",
                        array::version()
                    )
                } else {
                    format!("MLX sees {count} GPU(s)")
                };
                return Err(Error::Unsupported(format!("provider `mlx` cannot use {device}: {why}")));
            }
            Ok(Some(n))
        }
        other => Err(Error::Unsupported(format!(
            "provider `mlx` runs on cpu or {}:N here, not {other}",
            gpu_kind()
        ))),
    }
}

fn quant(spec: &ModelSpec, group_size: usize) -> Option<Quant> {
    match spec.quantization {
        Quantization::Int8 => Some(Quant { bits: 8, group_size }),
        Quantization::Int4 => Some(Quant { bits: 4, group_size }),
        _ => None,
    }
}

/// Bytes an element of a quantized matrix takes: the packed bits plus a scale and a
/// bias (model dtype) per group.
fn quantized_bytes(q: Quant, dtype: DType) -> f64 {
    q.bits as f64 / 8.0 + 2.0 * dtype.size() as f64 / q.group_size as f64
}

fn read_config(dir: &Path) -> Result<BertConfig> {
    let path = dir.join("config.json");
    let config: BertConfig = bert_config(dir, NAME)?;
    if !matches!(config.hidden_act.as_str(), "gelu" | "gelu_python") {
        return Err(Error::Unsupported(format!(
            "{}: hidden_act `{}`; provider `mlx` runs BERTs with exact gelu",
            path.display(),
            config.hidden_act
        )));
    }
    if config.num_attention_heads == 0 || !config.hidden_size.is_multiple_of(config.num_attention_heads) {
        return Err(Error::model_load(&path, "hidden_size is not a multiple of num_attention_heads"));
    }
    Ok(config)
}

#[async_trait]
impl Provider for MlxProvider {
    fn name(&self) -> &str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        let mut caps = Capabilities {
            formats: vec![
                "Hugging Face BERT folder (config.json + model.safetensors)".into(),
                format!("ONNX graph (.onnx) of the operators {}", crate::graph::OPS.join(", ")),
            ],
            quantization: vec![Quantization::Int8, Quantization::Int4],
            ..Capabilities::cpu_only(vec![DType::F32, DType::F16, DType::BF16])
        };
        let blas = array::blas().map_or_else(|| "MLX's own BLAS".to_string(), |b| format!("BLAS {b}"));
        caps.notes.push(format!(
            "MLX {}, {blas}; int8/int4: MLX's groupwise affine quantization (group size {})",
            array::version(),
            self.options.group_size
        ));
        if array::gpu_count() > 0 {
            caps.devices.push(gpu_kind());
        } else {
            caps.notes.push(format!("{}: the MLX library loaded has no GPU device", gpu_kind()));
        }
        caps
    }

    /// Weights at the model's dtype (quantized matrices at their packed size), from
    /// the safetensors headers, plus 10% for activations.
    fn estimate_memory(&self, spec: &ModelSpec) -> Result<Option<u64>> {
        if is_onnx(&spec.path) {
            // Weights at the model's dtype (the file holds f32), plus 10%.
            let bytes = std::fs::metadata(&spec.path).map_or(0, |m| m.len()) * spec.dtype.size() as u64 / 4;
            return Ok(Some(bytes + bytes / 10));
        }
        if is_gguf(&spec.path) {
            // The file's blocks as MLX holds them (the same bytes per weight, give or
            // take the scales' dtype), the embedding table dense at the model's dtype.
            let Ok(gguf) = kiln_core::gguf::Gguf::open(&spec.path) else { return Ok(None) };
            let table = gguf.tensors.get("token_embd.weight").map_or(0, |t| t.elements() * spec.dtype.size());
            let file = std::fs::metadata(&spec.path).map_or(0, |m| m.len() as usize);
            let bytes = (file + table) as u64;
            return Ok(Some(bytes + bytes / 10));
        }
        if !spec.path.join("config.json").is_file() {
            return Ok(None);
        }
        let Ok(files) = weight_files(&spec.path) else { return Ok(None) };
        let per_element = quant(spec, self.options.group_size).map(|q| quantized_bytes(q, spec.dtype));
        let bytes = weight_bytes(&files, spec.dtype, per_element)?;
        Ok(Some(bytes + bytes / 10))
    }

    /// MLX's allocator (active, peak and cached bytes; one allocator per process).
    fn allocator_memory(&self) -> Option<kiln_core::AllocatorMemory> {
        let (active, peak, cached) = array::memory();
        Some(kiln_core::AllocatorMemory { active, peak, cached })
    }

    /// MLX's `clear_cache`: the buffers it keeps for reuse go back to the system.
    fn release_cached_memory(&self) -> u64 {
        let (_, _, cached) = array::memory();
        array::clear_cache();
        let (_, _, left) = array::memory();
        cached.saturating_sub(left)
    }

    /// llama-architecture GGUF files, their quantized matrices as MLX quantized
    /// matmuls (see `llama.rs`); Qwen2.5-VL checkpoint folders, mlx-community's packed
    /// layers as stored (see `qwen2vl/`).
    async fn load_generator(&self, spec: &ModelSpec) -> Result<Arc<dyn kiln_core::Generator>> {
        let gpu = mlx_device(spec.device)?;
        if spec.path.is_dir() && kiln_core::qwen2vl::is_checkpoint(&spec.path) {
            if spec.quantization != Quantization::None {
                return Err(Error::Unsupported(format!(
                    "provider `mlx` runs Qwen2.5-VL checkpoints as stored (mlx-community's packed layers through \
                     MLX's quantized matmul); model.quantization = \"{}\" is not taken for them: convert the \
                     checkpoint with mlx-vlm instead",
                    spec.quantization
                )));
            }
            let bytes = weight_bytes(&weight_files(&spec.path)?, spec.dtype, None)?;
            let mut model = crate::qwen2vl::QwenVl::load(&spec.path, gpu, spec.device, spec.dtype, bytes)?;
            model.greedy_on_device = self.options.greedy_on_device;
            if self.options.clear_cache_after_load {
                array::clear_cache();
            }
            return Ok(Arc::new(model));
        }
        if !spec.path.is_file() {
            let why = if spec.path.exists() {
                "not a GGUF file nor a Qwen2.5-VL checkpoint folder; mlx generates from those"
            } else {
                "no such file"
            };
            return Err(Error::model_load(&spec.path, why));
        }
        let dense = match self.options.gguf_matrices.as_str() {
            "dense" => true,
            "quantized" => false,
            _ => gpu.is_none(),
        };
        let mut llama = crate::llama::Llama::load(&spec.path, gpu, spec.device, spec.dtype, dense)?;
        llama.greedy_on_device = self.options.greedy_on_device;
        // On the CPU the "device" is the host's own cores: nothing to overlap with.
        llama.decode_ahead = self.options.decode_ahead && gpu.is_some();
        if self.options.clear_cache_after_load {
            array::clear_cache();
        }
        Ok(Arc::new(llama))
    }

    async fn load(&self, spec: &ModelSpec) -> Result<Arc<dyn Model>> {
        let dir = &spec.path;
        let gpu = mlx_device(spec.device)?;
        if is_onnx(dir) {
            return load_graph(spec, gpu);
        }
        if !dir.is_dir() {
            return Err(Error::model_load(
                dir,
                if dir.exists() {
                    "not a folder or an .onnx file; mlx loads Hugging Face folders and ONNX graphs"
                } else {
                    "no such folder"
                },
            ));
        }
        let config = read_config(dir)?;
        let files = weight_files(dir)?;
        let [file] = files.as_slice() else {
            return Err(Error::Unsupported(format!(
                "{}: sharded checkpoints ({} files) are not read by provider `mlx` yet",
                dir.display(),
                files.len()
            )));
        };
        let quant = quant(spec, self.options.group_size);
        let weight_bytes = weight_bytes(&files, spec.dtype, quant.map(|q| quantized_bytes(q, spec.dtype)))?;
        array::set_device(gpu)?;
        let mut bert = Bert::load(file, &config, spec.dtype, quant)?;
        bert.cuda_embedding = gpu.is_some() && self.options.embedding_kernel && array::is_cuda();
        if self.options.clear_cache_after_load {
            array::clear_cache();
        }
        let info = bert_model_info(
            spec,
            NAME,
            DType::F32,
            config.hidden_size,
            config.max_position_embeddings,
            weight_bytes,
        );
        let model = MlxBert { bert, gpu, head: info.head, overlap: self.options.overlap_batches, info };
        probe_encoder(&model, NAME, spec)?;
        Ok(Arc::new(model))
    }
}

/// A loaded BERT on MLX.
struct MlxBert {
    /// Run from the model's one worker thread; MLX arrays are `Sync` handles.
    bert: Bert,
    gpu: Option<usize>,
    head: Option<EmbeddingHead>,
    /// `provider.options.overlap_batches`.
    overlap: bool,
    info: ModelInfo,
}

impl MlxBert {
    fn batch(&self, inputs: &Inputs) -> Result<Batch> {
        let ids = inputs.require("input_ids")?;
        let [batch, sequence] = ids.shape() else {
            return Err(Error::InvalidInput("input_ids must be [batch, sequence]".into()));
        };
        let (batch, sequence) = (*batch, *sequence);
        let values = |name: &str| -> Result<Vec<i64>> { inputs.require(name)?.to_vec::<i64>() };
        // The thread running a model may not be the one that loaded it.
        array::set_device(self.gpu)?;
        Ok(Batch {
            ids: values("input_ids")?,
            types: values("token_type_ids")?,
            mask: values("attention_mask")?,
            batch,
            sequence,
        })
    }
}

/// The outputs of a BERT batch from its f32 values: pooled `[batch, hidden]` with a
/// head, token vectors `[batch, sequence, hidden]` without.
fn bert_outputs(name: &str, pooled: bool, out: Vec<f32>, batch: usize, sequence: usize) -> Result<Outputs> {
    let tensor = if pooled {
        Tensor::from_vec(vec![batch, out.len() / batch.max(1)], out)?
    } else {
        Tensor::from_vec(vec![batch, sequence, out.len() / (batch * sequence).max(1)], out)?
    };
    Ok(Outputs::new().with(name, tensor))
}

impl Model for MlxBert {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn run(&self, inputs: &Inputs) -> Result<Outputs> {
        let b = self.batch(inputs)?;
        let out = self.bert.graph(&b, self.head)?.to_f32()?;
        debug_assert!(self.head.is_none() || self.info.outputs[0].name == SENTENCE_EMBEDDING);
        bert_outputs(&self.info.outputs[0].name, self.head.is_some(), out, b.batch, b.sequence)
    }

    fn start(&self, inputs: &Inputs) -> Result<Pending> {
        if !self.overlap {
            return self.run(inputs).map(Pending::ready);
        }
        let b = self.batch(inputs)?;
        let started = self.bert.graph(&b, self.head)?.start_f32()?;
        let (pooled, name, batch, sequence) =
            (self.head.is_some(), self.info.outputs[0].name.clone(), b.batch, b.sequence);
        Ok(Pending::later(move || bert_outputs(&name, pooled, started.wait_f32()?, batch, sequence)))
    }
}

fn is_onnx(path: &Path) -> bool {
    path.is_file() && path.extension().is_some_and(|e| e.eq_ignore_ascii_case("onnx"))
}

/// kiln's dtype for an ONNX element type of a graph input or output.
fn onnx_dtype(elem: i32) -> Option<DType> {
    match elem {
        onnx::FLOAT | onnx::FLOAT16 | onnx::DOUBLE => Some(DType::F32),
        onnx::INT64 => Some(DType::I64),
        onnx::INT32 => Some(DType::I32),
        _ => None,
    }
}

fn graph_spec(v: &onnx::ValueInfo, path: &Path) -> Result<TensorSpec> {
    let dtype = onnx_dtype(v.elem_type).ok_or_else(|| {
        Error::Unsupported(format!(
            "{}: `{}` has ONNX element type {}; provider `mlx` passes float, int32 and int64 tensors",
            path.display(),
            v.name,
            v.elem_type
        ))
    })?;
    let dims = v
        .dims
        .iter()
        .enumerate()
        .map(|(i, d)| d.map_or_else(|| Dim::Dynamic(format!("dim_{i}")), |d| Dim::Fixed(d as usize)))
        .collect();
    Ok(TensorSpec::new(&v.name, dtype, dims))
}

/// An ONNX graph compiled to MLX ([`Graph`]).
fn load_graph(spec: &ModelSpec, gpu: Option<usize>) -> Result<Arc<dyn Model>> {
    let path = &spec.path;
    if spec.quantization != Quantization::None {
        return Err(Error::Unsupported(format!(
            "provider `mlx` quantizes BERT folders; ONNX graphs run at f32, f16 or bf16 (model.quantization = \"{}\")",
            spec.quantization
        )));
    }
    let model = onnx::load(path)?;
    array::set_device(gpu)?;
    let graph = Graph::compile(&model, spec.dtype).map_err(|why| Error::model_load(path, why))?;
    let name =
        path.file_stem().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned());
    let mut info = ModelInfo::new(name, NAME, spec.device, spec.dtype);
    info.inputs = model.inputs.iter().map(|v| graph_spec(v, path)).collect::<Result<_>>()?;
    info.outputs = model
        .outputs
        .iter()
        .map(|v| graph_spec(v, path).map(|s| TensorSpec { dtype: DType::F32, ..s }))
        .collect::<Result<_>>()?;
    if spec.head.is_some() && info.declare_head(spec.head).is_some() {
        return Err(Error::Unsupported(format!(
            "{}: provider `mlx` pools embeddings for BERT folders; an ONNX graph runs as it is (tasks classify and \
             infer)",
            path.display()
        )));
    }
    info.weight_bytes = std::fs::metadata(path).ok().map(|m| m.len());
    array::clear_cache();
    Ok(Arc::new(MlxGraph { graph, gpu, info }))
}

/// A loaded ONNX graph on MLX.
struct MlxGraph {
    graph: Graph,
    gpu: Option<usize>,
    info: ModelInfo,
}

impl Model for MlxGraph {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn run(&self, inputs: &Inputs) -> Result<Outputs> {
        array::set_device(self.gpu)?;
        let arrays = self
            .graph
            .input_names()
            .map(|name| {
                let t = inputs.require(name)?;
                array::Array::from_bytes(t.bytes(), t.dtype(), t.shape())
            })
            .collect::<Result<Vec<_>>>()?;
        let mut out = Outputs::new();
        for (spec, (shape, values)) in self.info.outputs.iter().zip(self.graph.run(arrays)?) {
            out = out.with(&spec.name, Tensor::from_vec(shape, values)?);
        }
        Ok(out)
    }
}

fn is_gguf(path: &Path) -> bool {
    path.is_file() && path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}
