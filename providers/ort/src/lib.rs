//! kiln's ONNX Runtime provider (`ort`): any `.onnx` model, with libonnxruntime loaded at
//! run time from `ORT_DYLIB_PATH` (`scripts/setup ort` installs it from PyPI's
//! `onnxruntime` and writes the variable into `.kiln/env`).
//!
//! A model's inputs and outputs are read from the session — names, element types and
//! shapes with their symbolic dimensions — into [`ModelInfo`], so every request is
//! checked against them before it reaches ONNX Runtime, with an error naming the input,
//! what is expected and what came.
//!
//! A text encoder's embedding head runs where the token vectors are. A graph that
//! returns `last_hidden_state` is pooled inside [`Model::run`] straight from ONNX
//! Runtime's output buffer. A graph with the head built in (`scripts/onnx_head.py`, what
//! the GPU wants: ONNX Runtime copies each output to the host, and token vectors are
//! `sequence` times the bytes of the answer) says so in its metadata —
//! `kiln.embedding_head` (`{"pooling": "mean", "normalize": true}`) and `kiln.dtype`,
//! the precision its encoder runs in — and its `sentence_embedding` is passed through
//! once the head is checked against the one the model folder asks for.
//!
//! `[provider.options]`:
//!
//! | key | default | meaning |
//! |---|---|---|
//! | `optimization_level` | `"all"` | `disable`, `basic`, `extended`, `all` graph optimisations |
//! | `intra_threads` | `0` | threads inside an operator; 0: ONNX Runtime's choice |
//! | `inter_threads` | `0` | threads across operators; 0: ONNX Runtime's choice |
//! | `allow_spinning` | `true` | intra-op threads spin waiting for work; `false` when models run side by side |
//! | `execution_providers` | `["cpu"]` | in order of preference: `cuda`, `cpu`; `cuda` needs a library built with it |
//! | `memory_pattern` | `true` | pre-plan memory for repeated shapes |
//! | `cpu_arena` | `true` | the CPU arena allocator |
//! | `cudnn_conv_algo_search` | `"heuristic"` | how the CUDA provider picks a convolution's algorithm for each new input shape: `heuristic` (cuDNN's heuristics), `exhaustive` (times every algorithm: ONNX Runtime's own default, seconds for every batch size dynamic batching makes), `default` |
//! | `tf32` | unset | on CUDA, f32 convolutions and matrix products on TF32 tensor cores (`true`) or in full f32 (`false`); unset keeps ONNX Runtime's default (TF32 on, on Ampere and later GPUs) |
//! | `overlap` | `false` | run each batch on the runtime's responder thread while the model thread collates the next (measured slower on an H100: off by default) |

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use kiln_core::{
    Capabilities, DType, Device, DeviceKind, Dim, EmbeddingHead, Error, HeadSite, Inputs, Model, ModelInfo,
    ModelSpec, Outputs, Pending, Provider, ProviderConfig, Quantization, Result, SENTENCE_EMBEDDING, Tensor,
    TensorSpec, async_trait,
};
use ort::ep::ExecutionProvider;
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::{DynValue, TensorElementType, ValueType};
use serde::Deserialize;

/// The name configs use: `[provider] name = "ort"`.
pub const NAME: &str = "ort";

/// The variable naming libonnxruntime.
pub const DYLIB_VAR: &str = "ORT_DYLIB_PATH";

/// Graph optimisation level.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OptimizationLevel {
    /// None.
    Disable,
    /// Constant folding, redundant node elimination.
    Basic,
    /// Plus complex fusions.
    Extended,
    /// Everything, layout optimisations included.
    #[default]
    All,
}

/// `[provider.options]` of the ort provider.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OrtOptions {
    /// Graph optimisations.
    pub optimization_level: OptimizationLevel,
    /// Threads inside an operator (0: ONNX Runtime's choice).
    pub intra_threads: usize,
    /// Threads across operators (0: ONNX Runtime's choice).
    pub inter_threads: usize,
    /// Execution providers in order of preference: `cuda`, `cpu`.
    pub execution_providers: Vec<String>,
    /// Pre-planned memory for repeated shapes.
    pub memory_pattern: bool,
    /// The CPU arena allocator.
    pub cpu_arena: bool,
    /// Intra-op threads spin while waiting for work (ONNX Runtime's default): fastest
    /// for one model alone, but two models running at once (the video pipeline's
    /// stages) then take each other's cores; `false` lets them share.
    pub allow_spinning: bool,
    /// Each batch's run on the runtime's responder thread while the model thread
    /// collates the next (see [`Model::start`] for [`OrtModel`]); off by default.
    pub overlap: bool,
    /// How the CUDA provider picks each convolution's algorithm for a new input shape.
    pub cudnn_conv_algo_search: ConvSearch,
    /// On CUDA, f32 convolutions and matrix products on TF32 tensor cores (10 bits of
    /// mantissa) or in full f32; `None` keeps ONNX Runtime's default (TF32 on). On an
    /// H100 the video models with TF32 were 1.8e-4 (UNet) and 1.1e-2 (RIFE) mean abs from
    /// the CPU's f32, without it 1.2e-6 and 2.7e-5 (docs/benchmarks.md).
    pub tf32: Option<bool>,
}

/// `cudnn_conv_algo_search`: cuDNN's choice of convolution algorithm on CUDA.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ConvSearch {
    /// Time every algorithm once per input shape (ONNX Runtime's own default): the
    /// fastest for one shape seen again and again, but seconds for each new one, and
    /// dynamic batching makes a new shape of every batch size (the video pipeline on an
    /// H100 ran 0.03–0.14× its one-frame-at-a-time reference with it).
    Exhaustive,
    /// cuDNN's heuristics, nothing timed: kiln's default (the same runs 0.19–0.43×).
    #[default]
    Heuristic,
    /// cuDNN's default algorithm.
    Default,
}

impl Default for OrtOptions {
    fn default() -> Self {
        OrtOptions {
            optimization_level: OptimizationLevel::All,
            intra_threads: 0,
            inter_threads: 0,
            execution_providers: vec!["cpu".into()],
            memory_pattern: true,
            cpu_arena: true,
            allow_spinning: true,
            overlap: false,
            cudnn_conv_algo_search: ConvSearch::default(),
            tf32: None,
        }
    }
}

/// The ONNX Runtime provider.
#[derive(Debug)]
pub struct OrtProvider {
    options: OrtOptions,
}

fn build(config: &ProviderConfig) -> Result<Arc<dyn Provider>> {
    let options: OrtOptions = config.options()?;
    for ep in &options.execution_providers {
        if !matches!(ep.as_str(), "cpu" | "cuda") {
            return Err(Error::Config(vec![kiln_core::ConfigIssue::new(
                "provider.options.execution_providers",
                format!("{ep:?}"),
                "a list of \"cuda\", \"cpu\"",
            )]));
        }
    }
    Ok(Arc::new(OrtProvider { options }))
}

fn backend(e: impl std::fmt::Display) -> Error {
    Error::backend(NAME, e.to_string())
}

/// The process-wide ONNX Runtime environment, loaded once from `ORT_DYLIB_PATH`.
fn environment() -> Result<&'static ort::environment::Environment> {
    static ENV: OnceLock<std::result::Result<ort::environment::Environment, String>> = OnceLock::new();
    ENV.get_or_init(|| {
        let path = std::env::var_os(DYLIB_VAR).map(PathBuf::from).ok_or_else(|| {
            format!(
                "{DYLIB_VAR} is not set: point it at libonnxruntime.so (`scripts/setup ort` installs onnxruntime==1.31.1 \
                 from PyPI and writes {DYLIB_VAR} into .kiln/env; then `. .kiln/env`)"
            )
        })?;
        if !path.is_file() {
            return Err(format!("{DYLIB_VAR}={} is not a file; it must name libonnxruntime.so", path.display()));
        }
        let loaded = std::panic::catch_unwind(|| {
            ort::init_from(&path).map_err(|e| e.to_string())?.with_name("kiln").build().map_err(|e| e.to_string())
        });
        match loaded {
            Ok(Ok(env)) => Ok(env),
            Ok(Err(e)) => Err(format!(
                "{DYLIB_VAR}={}: cannot load ONNX Runtime: {e} (kiln expects ONNX Runtime 1.24 or newer; \
                 `scripts/setup ort` installs 1.31.1)",
                path.display()
            )),
            Err(_) => Err(format!(
                "{DYLIB_VAR}={}: loading ONNX Runtime panicked; is it libonnxruntime.so of version 1.24 or newer?",
                path.display()
            )),
        }
    })
    .as_ref()
    .map_err(|e| Error::Unsupported(e.clone()))
}

/// Whether the NVIDIA driver's library loads here: the CUDA execution provider needs it,
/// and a GPU build of ONNX Runtime says CUDA is available without it.
fn cuda_driver() -> bool {
    static DRIVER: OnceLock<bool> = OnceLock::new();
    // SAFETY: loading libcuda runs its initialisers, which have no preconditions; the
    // library is dropped (unloaded) at once.
    *DRIVER.get_or_init(|| unsafe { libloading::Library::new("libcuda.so.1") }.is_ok())
}

/// The graph to load: `model.onnx` in a folder, or the file itself; with
/// `quantization = "int8"`, `model_int8.onnx` in the folder, or `NAME_int8.onnx` beside
/// `NAME.onnx` (a file whose name already ends in `_int8.onnx` is taken as it is).
fn model_file(path: &Path, quantization: Quantization) -> Result<PathBuf> {
    let int8 = quantization == Quantization::Int8;
    let how = "scripts/setup ort writes one for MiniLM (scripts/optimize_onnx.py); for another model, \
               onnxruntime.quantization.quantize_dynamic makes one";
    if path.is_dir() {
        let name = if int8 { "model_int8.onnx" } else { "model.onnx" };
        let file = path.join(name);
        if file.is_file() {
            return Ok(file);
        }
        let why = if int8 {
            format!("no {name} in this folder (model.quantization = \"int8\"); {how}")
        } else {
            format!("no {name} in this folder")
        };
        return Err(Error::model_load(path, why));
    }
    if !path.is_file() {
        return Err(Error::model_load(path, "no such file or folder"));
    }
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    if !int8 || stem.ends_with("_int8") {
        return Ok(path.to_path_buf());
    }
    let file = path.with_file_name(format!("{stem}_int8.onnx"));
    if file.is_file() {
        return Ok(file);
    }
    Err(Error::model_load(
        path,
        format!("no {} beside it (model.quantization = \"int8\"); {how}", file.display()),
    ))
}

fn kiln_dtype(ty: TensorElementType) -> Option<DType> {
    Some(match ty {
        TensorElementType::Float32 => DType::F32,
        TensorElementType::Float16 => DType::F16,
        TensorElementType::Bfloat16 => DType::BF16,
        TensorElementType::Int64 => DType::I64,
        TensorElementType::Int32 => DType::I32,
        TensorElementType::Uint8 => DType::U8,
        _ => return None,
    })
}

/// A session input or output as a [`TensorSpec`]: fixed dims as numbers, dynamic ones
/// by their symbol (or `dim_i` when the graph gives none).
fn tensor_spec(name: &str, ty: &ValueType) -> Result<TensorSpec> {
    let ValueType::Tensor { ty, shape, dimension_symbols } = ty else {
        return Err(Error::Unsupported(format!("`{name}` is not a tensor ({ty}); kiln passes tensors only")));
    };
    let dtype = kiln_dtype(*ty).ok_or_else(|| {
        Error::Unsupported(format!("`{name}` has element type {ty:?}, which kiln does not pass"))
    })?;
    let dims = shape
        .iter()
        .enumerate()
        .map(|(i, &d)| {
            if d >= 0 {
                Dim::Fixed(d as usize)
            } else {
                let symbol = dimension_symbols.get(i).filter(|s| !s.is_empty()).cloned();
                Dim::Dynamic(symbol.unwrap_or_else(|| format!("dim_{i}")))
            }
        })
        .collect();
    Ok(TensorSpec::new(name, dtype, dims))
}

/// A loaded ONNX model.
struct OrtModel {
    info: ModelInfo,
    run: Arc<Execution>,
    /// [`Model::start`] hands the run to the runtime's responder thread, so the model
    /// thread collates the next batch meanwhile (`overlap`; off unless asked for).
    pipelined: bool,
}

/// A session and what to make of its outputs. `Session::run` needs `&mut`; the model's
/// worker thread (or, pipelined, the responder thread) is its only caller at a time.
struct Execution {
    session: Mutex<Session>,
    /// With an embedding head: where it applies (the graph's token output, pooled under
    /// the attention mask before anything else is copied).
    head: Option<HeadSite>,
    /// The graph applies the head itself: its `sentence_embedding` is the answer.
    graph_head: bool,
    /// The outputs returned when there is no head.
    outputs: Vec<String>,
}

/// Metadata key: the embedding head a graph applies itself (JSON of [`EmbeddingHead`]).
pub const HEAD_KEY: &str = "kiln.embedding_head";
/// Metadata key: the precision a graph's encoder runs in when its outputs do not say
/// (a float16 encoder with float32 inputs and outputs).
pub const DTYPE_KEY: &str = "kiln.dtype";

/// What a graph's metadata says it computes.
#[derive(Debug, Default, PartialEq)]
struct GraphNotes {
    head: Option<EmbeddingHead>,
    dtype: Option<DType>,
}

impl GraphNotes {
    fn read(session: &Session, file: &Path) -> Result<Self> {
        let metadata = session.metadata().map_err(backend)?;
        Self::parse(metadata.custom(HEAD_KEY).as_deref(), metadata.custom(DTYPE_KEY).as_deref())
            .map_err(|e| Error::model_load(file, e))
    }

    fn parse(head: Option<&str>, dtype: Option<&str>) -> std::result::Result<Self, String> {
        let head = head
            .map(|h| {
                serde_json::from_str::<EmbeddingHead>(h).map_err(|e| {
                    format!(
                        "metadata {HEAD_KEY} = {h:?} is not an embedding head ({e}); expected e.g. \
                         {{\"pooling\": \"mean\", \"normalize\": true}}"
                    )
                })
            })
            .transpose()?;
        let dtype = dtype
            .map(|d| {
                d.parse::<DType>()
                    .ok()
                    .filter(|d| d.is_float())
                    .ok_or_else(|| format!("metadata {DTYPE_KEY} = {d:?} is not one of f32, f16, bf16"))
            })
            .transpose()?;
        Ok(GraphNotes { head, dtype })
    }
}

impl OrtProvider {
    fn session(&self, file: &Path, device: Device) -> Result<Session> {
        let o = &self.options;
        let wants_cuda =
            matches!(device, Device::Cuda(_)) || o.execution_providers.iter().any(|e| e == "cuda");
        // The CPU may stand in for CUDA only where the config allows it: a model placed on
        // the CPU whose execution providers list "cpu" after "cuda".
        let cpu_allowed = o.execution_providers.iter().any(|e| e == "cpu") && device == Device::Cpu;
        if !wants_cuda {
            return self.session_on(file, None);
        }
        let cuda = if let Device::Cuda(n) = device { n as i32 } else { 0 };
        let why = if !ort::ep::CUDA::is_available().unwrap_or(false) {
            "the CUDA execution provider is not in the library it names (PyPI's onnxruntime is CPU-only; \
             onnxruntime-gpu has CUDA: `scripts/setup ort-gpu`)"
                .to_string()
        } else {
            match self.session_on(file, Some(cuda)) {
                Ok(session) => return Ok(session),
                Err(e) if !cpu_allowed => return Err(e),
                Err(e) => e.to_string(),
            }
        };
        if !cpu_allowed {
            return Err(Error::Unsupported(format!(
                "{DYLIB_VAR}: {why}; use device = \"cpu\" or such a library"
            )));
        }
        tracing::warn!("ONNX Runtime cannot run on CUDA here ({why}); running on cpu");
        self.session_on(file, None)
    }

    /// A session with the CUDA execution provider on device `cuda` first (a failure to
    /// register it is an error, naming ONNX Runtime's reason), else on the CPU alone.
    fn session_on(&self, file: &Path, cuda: Option<i32>) -> Result<Session> {
        let env = environment()?;
        let o = &self.options;
        let level = match o.optimization_level {
            OptimizationLevel::Disable => GraphOptimizationLevel::Disable,
            OptimizationLevel::Basic => GraphOptimizationLevel::Level1,
            OptimizationLevel::Extended => GraphOptimizationLevel::Level2,
            OptimizationLevel::All => GraphOptimizationLevel::Level3,
        };
        let mut eps = Vec::new();
        if let Some(id) = cuda {
            // ONNX Runtime would otherwise log a failed registration and run the graph on
            // the CPU under a model that says cuda.
            use ort::ep::cuda::ConvAlgorithmSearch;
            let search = match o.cudnn_conv_algo_search {
                ConvSearch::Exhaustive => ConvAlgorithmSearch::Exhaustive,
                ConvSearch::Heuristic => ConvAlgorithmSearch::Heuristic,
                ConvSearch::Default => ConvAlgorithmSearch::Default,
            };
            let mut cuda = ort::ep::CUDA::default().with_device_id(id).with_conv_algorithm_search(search);
            if let Some(tf32) = o.tf32 {
                cuda = cuda.with_tf32(tf32);
            }
            eps.push(cuda.build().error_on_failure());
        }
        eps.push(ort::ep::CPU::default().with_arena_allocator(o.cpu_arena).build());
        let cuda_error = |e: &dyn std::fmt::Display| {
            Error::Unsupported(format!(
                "ONNX Runtime's CUDA execution provider did not start on cuda:{}: {e} (it needs an NVIDIA driver, \
                 and CUDA 13's cuBLAS, cuDNN 9 and runtime on LD_LIBRARY_PATH: `scripts/setup ort-gpu`)",
                cuda.unwrap_or(0)
            ))
        };
        let mut builder = Session::builder(env)
            .map_err(backend)?
            .with_optimization_level(level)
            .map_err(backend)?
            .with_memory_pattern(o.memory_pattern)
            .map_err(backend)?
            .with_execution_providers(eps)
            .map_err(|e| if cuda.is_some() { cuda_error(&e) } else { backend(e) })?;
        if o.intra_threads > 0 {
            builder = builder.with_intra_threads(o.intra_threads).map_err(backend)?;
        }
        if o.inter_threads > 0 {
            builder = builder.with_inter_threads(o.inter_threads).map_err(backend)?;
        }
        if !o.allow_spinning {
            builder = builder.with_intra_op_spinning(false).map_err(backend)?;
        }
        builder.commit_from_file(file).map_err(|e| Error::model_load(file, e.to_string()))
    }
}

#[async_trait]
impl Provider for OrtProvider {
    fn name(&self) -> &str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        let in_library = environment().is_ok() && ort::ep::CUDA::is_available().unwrap_or(false);
        let note = match (in_library, cuda_driver()) {
            (true, true) => None,
            (true, false) => Some(
                "CUDA: the ONNX Runtime loaded has its CUDA execution provider, but this machine has no NVIDIA \
                 driver (libcuda.so.1 does not load)"
                    .to_string(),
            ),
            (false, _) => Some(format!(
                "CUDA: the ONNX Runtime {DYLIB_VAR} names has no CUDA execution provider (PyPI's onnxruntime is \
                 CPU-only; onnxruntime-gpu has it: `scripts/setup ort-gpu`)"
            )),
        };
        let mut devices = vec![DeviceKind::Cpu];
        if note.is_none() {
            devices.push(DeviceKind::Cuda);
        }
        Capabilities {
            devices,
            dtypes: vec![DType::F32, DType::F16],
            quantization: vec![Quantization::Int8],
            formats: vec!["ONNX (.onnx file, or a folder with model.onnx; int8: model_int8.onnx)".into()],
            max_batch_size: None,
            notes: note.into_iter().collect(),
        }
    }

    async fn load(&self, spec: &ModelSpec) -> Result<Arc<dyn Model>> {
        let file = model_file(&spec.path, spec.quantization)?;
        let session = self.session(&file, spec.device)?;
        let inputs =
            session.inputs().iter().map(|o| tensor_spec(o.name(), o.dtype())).collect::<Result<Vec<_>>>()?;
        let outputs =
            session.outputs().iter().map(|o| tensor_spec(o.name(), o.dtype())).collect::<Result<Vec<_>>>()?;
        let notes = GraphNotes::read(&session, &file)?;
        // A graph runs at its own precision; the config must say which.
        let graph_dtype = notes
            .dtype
            .or_else(|| outputs.iter().map(|o| o.dtype).find(|d| d.is_float()))
            .unwrap_or(DType::F32);
        if spec.dtype != graph_dtype {
            return Err(Error::Unsupported(format!(
                "{} computes in {graph_dtype}; set model.dtype = \"{graph_dtype}\" (ONNX Runtime runs a graph at the \
                 precision it was exported in)",
                file.display()
            )));
        }
        let name = spec.path.file_stem().map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned());
        let mut info = ModelInfo::new(name, NAME, spec.device, graph_dtype);
        info.inputs = inputs;
        info.outputs = outputs;
        info.weight_bytes = std::fs::metadata(&file).ok().map(|m| m.len());
        info.max_sequence_length =
            kiln_core::max_position_embeddings(file.parent().unwrap_or(Path::new(".")));
        if let Some(graph_head) = notes.head {
            let embedding = graph_head_output(&info.outputs, &file)?;
            if spec.head != Some(graph_head) {
                return Err(Error::model_load(
                    &file,
                    format!(
                        "the graph applies the embedding head {graph_head:?} ({HEAD_KEY}), but this model is asked \
                         for {:?}; set text.pooling / text.normalize to match, or use the graph without the head",
                        spec.head
                    ),
                ));
            }
            info.outputs = vec![embedding];
            info.head = Some(graph_head);
            return Ok(OrtModel::loaded(info, session, None, true, self.options.overlap));
        }
        // ONNX Runtime's outputs are host memory (it copies them back from a GPU), so
        // pooling inside `run` reads them in place instead of copying them out whole.
        let head = info.declare_head(spec.head);
        Ok(OrtModel::loaded(info, session, head, false, self.options.overlap))
    }

    fn estimate_memory(&self, spec: &ModelSpec) -> Result<Option<u64>> {
        // Weights as stored, plus ONNX Runtime's planning and arena overhead.
        let file = model_file(&spec.path, spec.quantization)?;
        Ok(std::fs::metadata(&file).ok().map(|m| m.len() + m.len() / 5))
    }
}

/// The `sentence_embedding` output `[batch, hidden]` of a graph that applies the head,
/// as kiln returns it (f32).
fn graph_head_output(outputs: &[TensorSpec], file: &Path) -> Result<TensorSpec> {
    let found =
        outputs.iter().find(|o| o.name == SENTENCE_EMBEDDING && o.shape.len() == 2 && o.dtype.is_float());
    let spec = found.ok_or_else(|| {
        let have: Vec<String> = outputs.iter().map(|o| format!("{} {:?}", o.name, o.shape)).collect();
        Error::model_load(
            file,
            format!(
                "its metadata says it applies the embedding head ({HEAD_KEY}), but it has no float \
                 `{SENTENCE_EMBEDDING}` [batch, hidden] output (outputs: {})",
                have.join(", ")
            ),
        )
    })?;
    Ok(TensorSpec::new(SENTENCE_EMBEDDING, DType::F32, spec.shape.clone()))
}

fn to_value(name: &str, t: &Tensor) -> Result<DynValue> {
    let shape: Vec<i64> = t.shape().iter().map(|&d| d as i64).collect();
    let value = match t.dtype() {
        DType::F32 => ort::value::Tensor::from_array((shape, t.to_vec::<f32>()?)).map(|v| v.into_dyn()),
        DType::F16 => ort::value::Tensor::from_array((shape, t.to_vec::<half::f16>()?)).map(|v| v.into_dyn()),
        DType::I64 => ort::value::Tensor::from_array((shape, t.to_vec::<i64>()?)).map(|v| v.into_dyn()),
        DType::I32 => ort::value::Tensor::from_array((shape, t.to_vec::<i32>()?)).map(|v| v.into_dyn()),
        DType::U8 => ort::value::Tensor::from_array((shape, t.to_vec::<u8>()?)).map(|v| v.into_dyn()),
        other => {
            return Err(Error::Unsupported(format!(
                "input `{name}`: kiln cannot pass {other} to ONNX Runtime"
            )));
        }
    };
    value.map_err(backend)
}

fn from_value(name: &str, value: &DynValue) -> Result<Tensor> {
    let ty = value.dtype();
    let ValueType::Tensor { ty, .. } = ty else {
        return Err(Error::backend(NAME, format!("output `{name}` is not a tensor")));
    };
    macro_rules! extract {
        ($t:ty) => {{
            let (shape, data) = value.try_extract_tensor::<$t>().map_err(backend)?;
            Tensor::from_vec(shape.iter().map(|&d| d as usize).collect(), data.to_vec())
        }};
    }
    match ty {
        TensorElementType::Float32 => extract!(f32),
        TensorElementType::Float16 => extract!(half::f16),
        TensorElementType::Int64 => extract!(i64),
        TensorElementType::Int32 => extract!(i32),
        TensorElementType::Uint8 => extract!(u8),
        other => Err(Error::backend(
            NAME,
            format!("output `{name}` has element type {other:?}, which kiln does not read"),
        )),
    }
}

/// A run's inputs, named as the session names them.
type Feeds = Vec<(String, DynValue)>;

impl OrtModel {
    fn loaded(
        info: ModelInfo,
        session: Session,
        head: Option<HeadSite>,
        graph_head: bool,
        pipelined: bool,
    ) -> Arc<dyn Model> {
        let outputs = info.outputs.iter().map(|o| o.name.clone()).collect();
        let run = Arc::new(Execution { session: Mutex::new(session), head, graph_head, outputs });
        Arc::new(OrtModel { info, run, pipelined })
    }

    /// The session's inputs as ONNX Runtime values, and the attention mask when kiln
    /// pools: everything a request can get wrong is found here, before the run.
    fn prepare(&self, inputs: &Inputs) -> Result<(Feeds, Option<Vec<i64>>)> {
        let values = self
            .info
            .inputs
            .iter()
            .map(|spec| Ok((spec.name.clone(), to_value(&spec.name, inputs.require(&spec.name)?)?)))
            .collect::<Result<Feeds>>()?;
        let mask = match self.run.head {
            Some(_) => Some(inputs.require("attention_mask")?.to_vec::<i64>()?),
            None => None,
        };
        Ok((values, mask))
    }
}

impl Model for OrtModel {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn run(&self, inputs: &Inputs) -> Result<Outputs> {
        let (values, mask) = self.prepare(inputs)?;
        self.run.execute(values, mask.as_deref())
    }

    /// On CUDA, ONNX Runtime's `run` holds its caller until the outputs are back on the
    /// host; run there, it would leave the GPU idle while the model thread collates
    /// the next batch. So the run goes to the runtime's responder thread and the model
    /// thread goes on (batches still run one at a time: the session is behind a lock).
    fn start(&self, inputs: &Inputs) -> Result<Pending> {
        let (values, mask) = self.prepare(inputs)?;
        if !self.pipelined {
            return self.run.execute(values, mask.as_deref()).map(Pending::ready);
        }
        let run = self.run.clone();
        Ok(Pending::later(move || run.execute(values, mask.as_deref())))
    }
}

impl Execution {
    fn execute(&self, values: Feeds, mask: Option<&[i64]>) -> Result<Outputs> {
        let mut session = self.session.lock().unwrap_or_else(|p| p.into_inner());
        let outputs = session.run(values).map_err(backend)?;
        if self.graph_head {
            let embedding = from_value(SENTENCE_EMBEDDING, &outputs[SENTENCE_EMBEDDING])?;
            let embedding = if embedding.dtype() == DType::F32 {
                embedding
            } else {
                Tensor::from_vec(embedding.shape().to_vec(), embedding.to_f32_vec()?)?
            };
            return Ok(Outputs::new().with(SENTENCE_EMBEDDING, embedding));
        }
        if let (Some(site), Some(mask)) = (&self.head, mask) {
            let value = &outputs[site.tokens_name.as_str()];
            let pooled = match value.try_extract_tensor::<f32>() {
                Ok((shape, data)) => pool(shape, data, mask, site.head),
                Err(_) => {
                    let (shape, data) = value.try_extract_tensor::<half::f16>().map_err(backend)?;
                    let data: Vec<f32> = data.iter().map(|v| v.to_f32()).collect();
                    pool(shape, &data, mask, site.head)
                }
            }?;
            return Ok(Outputs::new().with(SENTENCE_EMBEDDING, pooled));
        }
        let mut out = Outputs::new();
        for name in &self.outputs {
            out.insert(name.clone(), from_value(name, &outputs[name.as_str()])?);
        }
        Ok(out)
    }
}

/// Token vectors `[batch, sequence, hidden]` pooled under the mask into `[batch, hidden]`.
fn pool(shape: &ort::value::Shape, data: &[f32], mask: &[i64], head: EmbeddingHead) -> Result<Tensor> {
    let &[batch, sequence, hidden] = &shape[..] else {
        return Err(Error::backend(
            NAME,
            format!("token output has shape {shape:?}; expected [batch, sequence, hidden]"),
        ));
    };
    let (batch, sequence, hidden) = (batch as usize, sequence as usize, hidden as usize);
    if mask.len() != batch * sequence {
        return Err(Error::backend(
            NAME,
            format!(
                "token output [{batch}, {sequence}, {hidden}] does not match the attention mask ({} values)",
                mask.len()
            ),
        ));
    }
    Tensor::from_vec(vec![batch, hidden], kiln_core::pool_tokens(data, mask, batch, sequence, hidden, head))
}

kiln_core::register_provider!(
    NAME,
    "ONNX Runtime: .onnx models (cpu; cuda with a CUDA build of the library)",
    build
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int8_picks_the_quantized_graph_beside_the_f32_one_and_says_how_to_make_it() {
        let dir = std::env::temp_dir().join(format!("kiln-ort-model-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("model.onnx"), b"").unwrap();
        assert_eq!(model_file(&dir, Quantization::None).unwrap(), dir.join("model.onnx"));
        let e = model_file(&dir, Quantization::Int8).unwrap_err().to_string();
        assert!(e.contains("no model_int8.onnx in this folder") && e.contains("quantize_dynamic"), "{e}");
        let e = model_file(&dir.join("model.onnx"), Quantization::Int8).unwrap_err().to_string();
        assert!(e.contains("model_int8.onnx beside it"), "{e}");

        std::fs::write(dir.join("model_int8.onnx"), b"").unwrap();
        assert_eq!(model_file(&dir, Quantization::Int8).unwrap(), dir.join("model_int8.onnx"));
        assert_eq!(
            model_file(&dir.join("model.onnx"), Quantization::Int8).unwrap(),
            dir.join("model_int8.onnx")
        );
        let named = dir.join("model_int8.onnx");
        assert_eq!(model_file(&named, Quantization::Int8).unwrap(), named);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn graph_metadata_is_read_as_a_head_and_a_dtype_and_a_bad_value_is_named() {
        assert_eq!(GraphNotes::parse(None, None).unwrap(), GraphNotes::default());
        let notes =
            GraphNotes::parse(Some(r#"{"pooling": "mean_sqrt_len", "normalize": false}"#), Some("f16"))
                .unwrap();
        let head = EmbeddingHead { pooling: kiln_core::Pooling::MeanSqrtLen, normalize: false };
        assert_eq!(notes, GraphNotes { head: Some(head), dtype: Some(DType::F16) });
        let e = GraphNotes::parse(Some(r#"{"pooling": "median"}"#), None).unwrap_err();
        assert!(e.contains(HEAD_KEY) && e.contains("median"), "{e}");
        let e = GraphNotes::parse(None, Some("i64")).unwrap_err();
        assert!(e.contains(DTYPE_KEY) && e.contains("\"i64\""), "{e}");
    }
}
