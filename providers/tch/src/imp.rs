//! The provider itself; compiled with the `libtorch` feature (see the crate docs).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use kiln_core::{
    Capabilities, DType, Device, DeviceKind, Dim, EmbeddingHead, Error, HeadSite, Inputs, Model, ModelInfo,
    ModelSpec, Outputs, Pending, Pooling, Provider, ProviderConfig, Result, SENTENCE_EMBEDDING, Tensor,
    TensorSpec, async_trait,
};
use serde::Deserialize;
use tch::{IValue, Kind};

use crate::{EXPECTED_TORCH, NAME};

use crate::{aoti, events, graphs, version};

/// `[provider.options]` of the tch provider.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TchOptions {
    /// On a GPU, return from starting a batch once its work is queued, so the next
    /// batch's copies and kernels queue behind it (see `Model::start`); off, each batch
    /// is waited for on the model thread.
    pub overlap_batches: bool,
    /// libtorch's intra-op CPU threads (0: its own choice).
    pub threads: usize,
    /// TorchScript's profiling executor (libtorch's default: on). It re-profiles and
    /// re-optimises the graph for input shapes it has not seen, which costs runs
    /// when every batch has another sequence length.
    pub jit_profiling: Option<bool>,
    /// TorchScript's graph optimisations (libtorch's default: on).
    pub jit_optimize: Option<bool>,
    /// On a GPU, how many batch shapes a model may capture as CUDA graphs (see
    /// `graphs`); 0 turns graphs off.
    pub cuda_graphs: usize,
}

impl Default for TchOptions {
    fn default() -> Self {
        TchOptions {
            overlap_batches: true,
            threads: 0,
            jit_profiling: None,
            jit_optimize: None,
            cuda_graphs: 128,
        }
    }
}

/// The libtorch provider.
#[derive(Debug)]
pub struct TchProvider {
    overlap_batches: bool,
    cuda_graphs: usize,
}

fn build(config: &ProviderConfig) -> Result<Arc<dyn Provider>> {
    let options: TchOptions = config.options()?;
    libtorch()?;
    if options.threads > 0 {
        tch::set_num_threads(options.threads as i32);
    }
    if let Some(on) = options.jit_profiling {
        tch::jit::f_set_profiling_mode(on).map_err(backend)?;
    }
    if let Some(on) = options.jit_optimize {
        tch::jit::set_graph_executor_optimize(on);
    }
    Ok(Arc::new(TchProvider { overlap_batches: options.overlap_batches, cuda_graphs: options.cuda_graphs }))
}

fn backend(e: impl std::fmt::Display) -> Error {
    Error::backend(NAME, e.to_string())
}

/// The libtorch this process runs with.
#[derive(Debug)]
struct LibTorch {
    /// The folder `libtorch_cpu.so` was mapped from.
    lib_dir: Option<PathBuf>,
    /// Its version, when the folder says.
    version: Option<String>,
}

/// The running libtorch, checked once against [`EXPECTED_TORCH`].
fn libtorch() -> Result<&'static LibTorch> {
    static LIB: OnceLock<std::result::Result<LibTorch, String>> = OnceLock::new();
    LIB.get_or_init(|| {
        let lib_dir = mapped_library_dir("libtorch_cpu.so");
        let version = lib_dir.as_deref().and_then(version::torch_version);
        if let Some(found) = &version
            && !version::same_release(found, EXPECTED_TORCH)
        {
            return Err(format!(
                "the libtorch in {} is PyTorch {found}; this kiln was built with tch for PyTorch {EXPECTED_TORCH} \
                 (`scripts/setup tch` installs it; LD_LIBRARY_PATH must name its torch/lib first)",
                lib_dir.as_deref().unwrap_or(Path::new("?")).display()
            ));
        }
        Ok(LibTorch { lib_dir, version })
    })
    .as_ref()
    .map_err(|e| Error::Unsupported(e.clone()))
}

/// The folder a shared library of this process was mapped from, by `/proc/self/maps`.
fn mapped_library_dir(file: &str) -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines().find_map(|line| {
        let path = Path::new(line.split_whitespace().nth(5)?);
        (path.file_name()? == file).then(|| path.parent().map(Path::to_path_buf))?
    })
}

/// Whether libtorch can use CUDA, loading `libtorch_cuda.so` on first call; the error
/// says why not.
pub(crate) fn cuda() -> std::result::Result<i64, String> {
    static CUDA: OnceLock<std::result::Result<i64, String>> = OnceLock::new();
    CUDA.get_or_init(|| {
        let lib = libtorch().map_err(|e| e.to_string())?;
        let dir = lib.lib_dir.clone().ok_or("libtorch_cpu.so is not mapped into this process")?;
        let file = dir.join("libtorch_cuda.so");
        if !file.is_file() {
            return Err(format!("{} has no libtorch_cuda.so (a CPU-only libtorch)", dir.display()));
        }
        load_global(&file)?;
        let count = tch::Cuda::device_count();
        if count == 0 || !tch::Cuda::is_available() {
            return Err(format!(
                "libtorch_cuda loaded from {} but libtorch sees no CUDA device (driver or GPU missing)",
                dir.display()
            ));
        }
        Ok(count)
    })
    .clone()
}

/// Loads a library with its symbols global, for good: CUDA registers itself with
/// libtorch from the library's static constructors.
fn load_global(file: &Path) -> std::result::Result<(), String> {
    use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
    // SAFETY: loading runs the library's initialisers, which is the point; it is
    // libtorch's own CUDA half, from the folder of the libtorch already loaded.
    let library = unsafe { Library::open(Some(file), RTLD_NOW | RTLD_GLOBAL) }
        .map_err(|e| format!("cannot load {}: {e}", file.display()))?;
    // Never unloaded: what it registers lives as long as the process.
    std::mem::forget(library);
    Ok(())
}

fn tch_device(device: Device) -> Result<tch::Device> {
    match device {
        Device::Cpu => Ok(tch::Device::Cpu),
        Device::Cuda(n) => {
            let count = cuda().map_err(|why| Error::Unsupported(format!("cuda:{n} requested, but {why}")))?;
            if n as i64 >= count {
                return Err(Error::Unsupported(format!(
                    "cuda:{n} requested, but libtorch sees {count} CUDA device(s): cuda:0..cuda:{}",
                    count - 1
                )));
            }
            Ok(tch::Device::Cuda(n))
        }
        other => Err(Error::Unsupported(format!("provider `tch` runs on cpu or cuda:N, not {other}"))),
    }
}

/// kiln's dtypes and libtorch's kinds, both ways.
const KINDS: [(DType, Kind); 6] = [
    (DType::F32, Kind::Float),
    (DType::F16, Kind::Half),
    (DType::BF16, Kind::BFloat16),
    (DType::I64, Kind::Int64),
    (DType::I32, Kind::Int),
    (DType::U8, Kind::Uint8),
];

fn kind(dtype: DType) -> Option<Kind> {
    KINDS.iter().find(|(d, _)| *d == dtype).map(|&(_, k)| k)
}

fn dtype_of(kind: Kind) -> Option<DType> {
    KINDS.iter().find(|(_, k)| *k == kind).map(|&(d, _)| d)
}

/// `signature.json`: what `forward` takes and returns.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Signature {
    inputs: Vec<SignatureTensor>,
    outputs: Vec<SignatureTensor>,
    /// For an AOTInductor package: what it was compiled for.
    #[serde(default)]
    compiled: Option<Compiled>,
}

/// What an AOTInductor package was compiled for (`scripts/export_aoti.py` writes it).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Compiled {
    /// `cpu` or `cuda`.
    device: String,
    /// The precision of its weights and kernels.
    dtype: DType,
    /// The largest batch and sequence its dynamic shapes allow.
    max_batch: Option<usize>,
    max_length: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SignatureTensor {
    name: String,
    dtype: String,
    shape: Vec<Dim>,
}

impl SignatureTensor {
    fn spec(&self, file: &Path, model_dtype: DType) -> Result<TensorSpec> {
        let dtype = if self.dtype == "model" {
            model_dtype
        } else {
            self.dtype.parse::<DType>().map_err(|_| {
                Error::model_load(
                    file,
                    format!(
                        "`{}` has dtype {:?}; expected one of f32, f16, bf16, i64, i32, u8, model",
                        self.name, self.dtype
                    ),
                )
            })?
        };
        Ok(TensorSpec::new(&self.name, dtype, self.shape.clone()))
    }
}

/// Whether a model file is an AOTInductor package (`.pt2`) rather than TorchScript.
fn is_package(file: &Path) -> bool {
    file.extension().is_some_and(|e| e == "pt2")
}

/// The model file (`model.pt2`, an AOTInductor package, else `model.pt`, TorchScript)
/// and its `signature.json`, from a folder or the file.
fn model_files(path: &Path) -> Result<(PathBuf, PathBuf)> {
    let (dir, file) = if path.is_dir() {
        let package = path.join("model.pt2");
        (path.to_path_buf(), if package.is_file() { package } else { path.join("model.pt") })
    } else {
        (path.parent().unwrap_or(Path::new(".")).to_path_buf(), path.to_path_buf())
    };
    if !file.is_file() {
        let why =
            if path.is_dir() { "no model.pt2 or model.pt in this folder" } else { "no such file or folder" };
        return Err(Error::model_load(path, why));
    }
    let signature = dir.join("signature.json");
    if !signature.is_file() {
        return Err(Error::model_load(
            &signature,
            "missing: TorchScript does not record forward's tensors, so kiln needs them listed \
             ({\"inputs\": [{\"name\", \"dtype\", \"shape\"}..], \"outputs\": [..]}; see kiln-provider-tch's docs; \
             scripts/trace_bert_torchscript.py writes one)",
        ));
    }
    Ok((file, signature))
}

/// A loaded TorchScript module. `forward` is thread-safe in libtorch, but `CModule` is
/// not `Sync` in tch; the model's worker thread is its only caller, so the lock is
/// never contended.
struct TchModel {
    info: ModelInfo,
    module: Mutex<Module>,
    device: tch::Device,
    /// With an embedding head: where it applies (forward's token output and the
    /// attention mask input, by position).
    head: Option<HeadSite>,
    /// `provider.options.overlap_batches`.
    overlap: bool,
    /// On a GPU with `cuda_graphs` > 0 and the graph library loaded: the batch shapes
    /// seen and the graphs captured for them.
    graphs: Option<Mutex<Graphs>>,
}

/// What runs a batch: a TorchScript module or an AOTInductor package.
enum Module {
    Script(tch::CModule),
    Compiled(aoti::Package),
}

impl Module {
    /// Queues the model on device tensors; a package's outputs come as a tuple.
    fn forward(&self, args: &[tch::Tensor]) -> Result<IValue> {
        match self {
            Module::Script(module) => {
                let args: Vec<IValue> = args.iter().map(|t| IValue::Tensor(t.shallow_clone())).collect();
                module.forward_is(&args).map_err(backend)
            }
            Module::Compiled(package) => {
                let mut outputs = package.run(args).map_err(backend)?;
                Ok(if outputs.len() == 1 {
                    IValue::Tensor(outputs.remove(0))
                } else {
                    IValue::Tuple(outputs.into_iter().map(IValue::Tensor).collect())
                })
            }
        }
    }
}

/// Eager runs of a batch shape before it is captured: TorchScript's profiling
/// executor profiles the first and optimises at the second (compiling fused kernels),
/// and neither may happen inside a capture.
const EAGER_RUNS: u32 = 2;

/// One model's CUDA graphs, one per batch shape (every input's shape).
struct Graphs {
    device: usize,
    pool: graphs::Pool,
    /// `provider.options.cuda_graphs`.
    limit: usize,
    /// Eager runs so far of shapes not captured yet.
    seen: HashMap<Vec<Vec<i64>>, u32>,
    ready: HashMap<Vec<Vec<i64>>, Captured>,
    /// Set when a capture failed: the model runs eagerly from then on.
    off: bool,
}

/// A captured forward: the device tensors it reads its inputs from and writes its
/// outputs to, at every replay.
struct Captured {
    graph: graphs::Graph,
    inputs: Vec<tch::Tensor>,
    outputs: NamedOutputs,
}

impl Captured {
    /// Queues a copy of `args` into the graph's inputs and a replay (see
    /// [`Captured::run`]).
    fn replay(&mut self, args: &[tch::Tensor]) -> Result<NamedOutputs> {
        for (input, arg) in self.inputs.iter_mut().zip(args) {
            input.f_copy_(arg).map_err(backend)?;
        }
        self.run()
    }

    /// Queues a replay on the inputs as they are; the outputs are the graph's own
    /// tensors, which the next replay overwrites — a copy to the host queued before it
    /// on the same stream reads this batch's.
    fn run(&self) -> Result<NamedOutputs> {
        self.graph.replay().map_err(backend)?;
        Ok(self.outputs.iter().map(|(name, t)| (name.clone(), t.shallow_clone())).collect())
    }
}

#[async_trait]
impl Provider for TchProvider {
    fn name(&self) -> &str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        let mut devices = vec![DeviceKind::Cpu];
        let mut notes = Vec::new();
        match cuda() {
            Ok(_) => {
                devices.push(DeviceKind::Cuda);
                notes.push(match graphs::available() {
                    Ok(()) => "CUDA graphs: one per batch shape (provider.options.cuda_graphs)".into(),
                    Err(why) => format!("CUDA graphs: none ({why})"),
                });
            }
            Err(why) => notes.push(format!("CUDA: {why}")),
        }
        let lib = libtorch().ok();
        let version = lib.and_then(|l| l.version.clone()).unwrap_or_else(|| "unknown version".into());
        Capabilities {
            devices,
            dtypes: vec![DType::F32, DType::F16, DType::BF16],
            quantization: Vec::new(),
            formats: vec![format!(
                "TorchScript (.pt file, or a folder with model.pt) + signature.json; libtorch {version}"
            )],
            max_batch_size: None,
            notes,
        }
    }

    async fn load(&self, spec: &ModelSpec) -> Result<Arc<dyn Model>> {
        let device = tch_device(spec.device)?;
        let (file, signature_file) = model_files(&spec.path)?;
        let text = std::fs::read(&signature_file).map_err(|e| Error::io("read", &signature_file, e))?;
        let signature: Signature = serde_json::from_slice(&text)
            .map_err(|e| Error::model_load(&signature_file, format!("not a kiln signature: {e}")))?;
        if signature.inputs.is_empty() || signature.outputs.is_empty() {
            return Err(Error::model_load(&signature_file, "lists no inputs or no outputs; it needs both"));
        }
        let model_kind = kind(spec.dtype).filter(|_| spec.dtype.is_float()).ok_or_else(|| {
            Error::Unsupported(format!("model.dtype {} is not one of f32, f16, bf16", spec.dtype))
        })?;
        let module = if is_package(&file) {
            Module::Compiled(load_package(&file, &signature_file, signature.compiled.as_ref(), spec, device)?)
        } else {
            let mut module = tch::CModule::load_on_device(&file, device).map_err(|e| {
                Error::model_load(&file, format!("libtorch cannot load it as TorchScript: {e}"))
            })?;
            module.to(device, model_kind, false);
            module.set_eval();
            Module::Script(module)
        };

        let name = spec.path.file_stem().map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned());
        let mut info = ModelInfo::new(name, NAME, spec.device, spec.dtype);
        info.inputs =
            signature.inputs.iter().map(|t| t.spec(&signature_file, spec.dtype)).collect::<Result<_>>()?;
        // bf16 leaves the device as f32 (see `from_tch`).
        let out_dtype = if spec.dtype == DType::BF16 { DType::F32 } else { spec.dtype };
        info.outputs =
            signature.outputs.iter().map(|t| t.spec(&signature_file, out_dtype)).collect::<Result<_>>()?;
        info.weight_bytes = Some(match &module {
            Module::Script(module) => module
                .named_parameters()
                .map_err(backend)?
                .iter()
                .map(|(_, t)| (t.numel() * t.kind().elt_size_in_bytes()) as u64)
                .sum(),
            // The package holds its weights at their compiled precision, and its code.
            Module::Compiled(_) => std::fs::metadata(&file).map_err(|e| Error::io("read", &file, e))?.len(),
        });
        info.max_sequence_length =
            kiln_core::max_position_embeddings(file.parent().unwrap_or(Path::new(".")));
        if let Some(compiled) = &signature.compiled {
            // The package's dynamic shapes end there; kiln's batches must too.
            info.max_batch_size = compiled.max_batch;
            if let Some(n) = compiled.max_length {
                info.max_sequence_length = Some(info.max_sequence_length.map_or(n, |m| m.min(n)));
            }
        }
        let head = info.declare_head(spec.head);
        let graphs = match device {
            tch::Device::Cuda(n) if self.cuda_graphs > 0 => match graphs::Pool::new() {
                Ok(pool) => Some(Mutex::new(Graphs {
                    device: n,
                    pool,
                    limit: self.cuda_graphs,
                    seen: HashMap::new(),
                    ready: HashMap::new(),
                    off: false,
                })),
                Err(why) => {
                    tracing::warn!(model = %info.name, "no CUDA graphs: {why}; batches run eagerly");
                    None
                }
            },
            _ => None,
        };
        Ok(Arc::new(TchModel {
            info,
            module: Mutex::new(module),
            device,
            head,
            overlap: self.overlap_batches,
            graphs,
        }))
    }

    fn estimate_memory(&self, spec: &ModelSpec) -> Result<Option<u64>> {
        // The file holds the weights (at the dtype they were saved in) and the code;
        // converting to a narrower dtype only shrinks them.
        let (file, _) = model_files(&spec.path)?;
        Ok(std::fs::metadata(&file).ok().map(|m| m.len() + m.len() / 5))
    }
}

/// An AOTInductor package, checked against what the config asks for: a package runs
/// only on the device type and at the precision it was compiled for.
fn load_package(
    file: &Path,
    signature_file: &Path,
    compiled: Option<&Compiled>,
    spec: &ModelSpec,
    device: tch::Device,
) -> Result<aoti::Package> {
    let compiled = compiled.ok_or_else(|| {
        Error::model_load(
            signature_file,
            "has no \"compiled\": {\"device\", \"dtype\"}; an AOTInductor package is compiled for one device \
             type and precision, which kiln checks the config against (scripts/export_aoti.py writes it)",
        )
    })?;
    let wanted = if device == tch::Device::Cpu { "cpu" } else { "cuda" };
    if compiled.device != wanted || compiled.dtype != spec.dtype {
        return Err(Error::Unsupported(format!(
            "{} was compiled for {} at {}; the config asks for {} at {}: set model.device and model.dtype to match, \
             or compile it again (scripts/export_aoti.py --device {wanted} --dtype {})",
            file.display(),
            compiled.device,
            compiled.dtype,
            spec.device,
            spec.dtype,
            spec.dtype
        )));
    }
    let package = aoti::Package::load(file, device).map_err(|e| Error::model_load(file, e))?;
    let built_for = package.device_type().map_err(|e| Error::model_load(file, e))?;
    if built_for != compiled.device {
        return Err(Error::model_load(
            file,
            format!(
                "signature.json says it was compiled for {}, the package itself says {built_for}",
                compiled.device
            ),
        ));
    }
    Ok(package)
}

fn to_tch(t: &Tensor, device: tch::Device) -> Result<tch::Tensor> {
    let kind =
        kind(t.dtype()).ok_or_else(|| Error::Unsupported(format!("kiln cannot pass {}", t.dtype())))?;
    let shape: Vec<i64> = t.shape().iter().map(|&d| d as i64).collect();
    let host = tch::Tensor::f_from_data_size(t.bytes(), &shape, kind).map_err(backend)?;
    if device == tch::Device::Cpu {
        return Ok(host);
    }
    // From page-locked memory (libtorch's host allocator keeps and reuses the pages, and
    // holds them until the copy is done) the copy does not block: the forward's kernels
    // queue behind it while the host goes on launching them.
    let pinned = host.f_pin_memory(device).map_err(backend)?;
    pinned.f_to_device_(device, kind, true, false).map_err(backend)
}

/// An output on its way to the host: bf16 widened to f32 on the device (kiln reads
/// no bf16 from libtorch), copied without blocking into page-locked memory when
/// `non_blocking` (the copy is then ready once the stream reaches it).
fn to_host(t: &tch::Tensor, non_blocking: bool) -> Result<tch::Tensor> {
    let kind = if t.kind() == Kind::BFloat16 { Kind::Float } else { t.kind() };
    t.f_to_device_(tch::Device::Cpu, kind, non_blocking, false).map_err(backend)
}

/// A host tensor as kiln's.
fn from_host(name: &str, t: &tch::Tensor) -> Result<Tensor> {
    let t = t.f_contiguous().map_err(backend)?;
    let dtype = dtype_of(t.kind()).ok_or_else(|| {
        Error::backend(
            NAME,
            format!("output `{name}` has element type {:?}, which kiln does not read", t.kind()),
        )
    })?;
    let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
    let numel = t.numel();
    let mut bytes = vec![0u8; numel * dtype.size()];
    t.f_copy_data_u8(&mut bytes, numel).map_err(backend)?;
    Tensor::from_bytes(dtype, shape, bytes)
}

/// Named outputs: on the device, or copies on their way to the host.
type NamedOutputs = Vec<(String, tch::Tensor)>;

impl TchModel {
    /// `forward`'s result as named tensors: one tensor, a tuple or list in output
    /// order, or a dict keyed by output name.
    fn outputs(&self, result: IValue) -> Result<NamedOutputs> {
        let names: Vec<&str> = self.info.outputs.iter().map(|o| o.name.as_str()).collect();
        let unexpected = |what: &str| {
            Error::backend(
                NAME,
                format!("forward returned {what}; kiln reads tensors, tuples, lists and dicts of tensors"),
            )
        };
        let tensor = |v: &IValue, name: &str| match v {
            IValue::Tensor(t) => Ok((name.to_string(), t.shallow_clone())),
            other => Err(unexpected(&format!("{other:?} for `{name}`"))),
        };
        match result {
            IValue::Tensor(t) => Ok(vec![(names[0].to_string(), t)]),
            IValue::Tuple(items) | IValue::GenericList(items) => {
                if items.len() != names.len() {
                    return Err(Error::backend(
                        NAME,
                        format!(
                            "forward returned {} values; signature.json lists {} outputs",
                            items.len(),
                            names.len()
                        ),
                    ));
                }
                items.iter().zip(&names).map(|(v, name)| tensor(v, name)).collect()
            }
            IValue::GenericDict(pairs) => names
                .iter()
                .map(|name| {
                    let v = pairs
                        .iter()
                        .find(|(k, _)| matches!(k, IValue::String(s) if s == name))
                        .map(|(_, v)| v)
                        .ok_or_else(|| {
                            Error::backend(NAME, format!("forward's dict has no output `{name}`"))
                        })?;
                    tensor(v, name)
                })
                .collect(),
            other => Err(unexpected(&format!("{other:?}"))),
        }
    }

    /// Queues the batch's work on the device: `forward` (and the embedding head) on
    /// inputs copied there, as a graph's replay once the shape has one. Returns the
    /// outputs as device tensors.
    fn forward(&self, inputs: &Inputs) -> Result<NamedOutputs> {
        let args = self
            .info
            .inputs
            .iter()
            .map(|spec| to_tch(inputs.require(&spec.name)?, self.device))
            .collect::<Result<Vec<_>>>()?;
        let _no_grad = tch::no_grad_guard();
        if let Some(graphs) = &self.graphs
            && let Some(outputs) = self.forward_graphed(graphs, &args)?
        {
            return Ok(outputs);
        }
        self.queue(&args)
    }

    /// The batch as a graph's replay: `None` while the shape is warming up, past the
    /// limit of graphs, or once a capture failed (the caller runs it eagerly).
    fn forward_graphed(&self, graphs: &Mutex<Graphs>, args: &[tch::Tensor]) -> Result<Option<NamedOutputs>> {
        let mut graphs = graphs.lock().unwrap_or_else(|p| p.into_inner());
        let graphs = &mut *graphs;
        if graphs.off {
            return Ok(None);
        }
        let shape: Vec<Vec<i64>> = args.iter().map(tch::Tensor::size).collect();
        if let Some(captured) = graphs.ready.get_mut(&shape) {
            return captured.replay(args).map(Some);
        }
        if graphs.ready.len() >= graphs.limit {
            return Ok(None);
        }
        let runs = graphs.seen.entry(shape.clone()).or_insert(0);
        *runs += 1;
        if *runs <= EAGER_RUNS {
            return Ok(None);
        }
        graphs.seen.remove(&shape);
        // The graph's inputs live outside its pool and hold this batch already.
        let inputs: Vec<tch::Tensor> = args.iter().map(tch::Tensor::copy).collect();
        match graphs::Graph::capture(graphs.device, &graphs.pool, || self.queue(&inputs)) {
            Ok((graph, outputs)) => {
                tracing::debug!(model = %self.info.name, ?shape, graphs = graphs.ready.len() + 1, "captured a CUDA graph");
                let captured = Captured { graph, inputs, outputs };
                // A capture runs nothing: this batch, already in the inputs, is the
                // graph's first replay.
                let outputs = captured.run()?;
                graphs.ready.insert(shape, captured);
                Ok(Some(outputs))
            }
            Err(why) => {
                tracing::warn!(model = %self.info.name, "CUDA graphs off: {why}; batches run eagerly");
                graphs.off = true;
                Ok(None)
            }
        }
    }

    /// Queues `forward` and the embedding head on device tensors.
    fn queue(&self, args: &[tch::Tensor]) -> Result<NamedOutputs> {
        let result = self.module.lock().unwrap_or_else(|p| p.into_inner()).forward(args)?;
        let Some(site) = &self.head else { return self.outputs(result) };
        let tokens = match &result {
            IValue::Tensor(t) if site.tokens == 0 => t.shallow_clone(),
            IValue::Tuple(items) | IValue::GenericList(items) => match items.get(site.tokens) {
                Some(IValue::Tensor(t)) => t.shallow_clone(),
                _ => return Err(backend(format!("forward's output `{}` is not a tensor", site.tokens_name))),
            },
            _ => return Err(backend(format!("forward returned no `{}` to pool", site.tokens_name))),
        };
        let pooled = pool(&tokens, &args[site.mask], site.head).map_err(backend)?;
        Ok(vec![(SENTENCE_EMBEDDING.to_string(), pooled)])
    }
}

impl TchModel {
    /// The batch's outputs on their way to the host (see [`to_host`]).
    fn forward_to_host(&self, inputs: &Inputs, non_blocking: bool) -> Result<NamedOutputs> {
        self.forward(inputs)?.iter().map(|(name, t)| Ok((name.clone(), to_host(t, non_blocking)?))).collect()
    }
}

fn read_outputs(host: &[(String, tch::Tensor)]) -> Result<Outputs> {
    let mut out = Outputs::new();
    for (name, t) in host {
        out.insert(name.clone(), from_host(name, t)?);
    }
    Ok(out)
}

impl Model for TchModel {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn run(&self, inputs: &Inputs) -> Result<Outputs> {
        read_outputs(&self.forward_to_host(inputs, false)?)
    }

    /// On a GPU: the batch's work and its result's copy to page-locked host memory are
    /// queued, and an event after them is what the responder waits for — so the next
    /// batch's copies and kernels queue behind this one while it runs.
    fn start(&self, inputs: &Inputs) -> Result<Pending> {
        let tch::Device::Cuda(device) = self.device else { return self.run(inputs).map(Pending::ready) };
        if !self.overlap || events::available().is_err() {
            return self.run(inputs).map(Pending::ready);
        }
        let host = self.forward_to_host(inputs, true)?;
        let done = events::Event::record(device).map_err(backend)?;
        Ok(Pending::later(move || {
            done.wait().map_err(backend)?;
            read_outputs(&host)
        }))
    }
}

/// The embedding head on the model's device, in f32: token vectors `[batch, sequence,
/// hidden]` and the mask `[batch, sequence]` to `[batch, hidden]`, with the arithmetic
/// of [`kiln_core::pool_tokens`]. Only the result is copied to the host.
fn pool(
    tokens: &tch::Tensor,
    mask: &tch::Tensor,
    head: EmbeddingHead,
) -> std::result::Result<tch::Tensor, tch::TchError> {
    let hidden = tokens.f_to_kind(Kind::Float)?;
    let mask = mask.f_to_kind(Kind::Float)?.f_unsqueeze(-1)?; // [batch, sequence, 1]
    let pooled = match head.pooling {
        Pooling::Cls => hidden.f_select(1, 0)?,
        Pooling::Mean | Pooling::MeanSqrtLen => {
            let sum = hidden.f_mul(&mask)?.f_sum_dim_intlist(1, false, Kind::Float)?;
            let count = mask.f_sum_dim_intlist(1, false, Kind::Float)?.f_clamp_min(1e-9)?;
            let count = if head.pooling == Pooling::Mean { count } else { count.f_sqrt()? };
            sum.f_div(&count)?
        }
        Pooling::Max => {
            let padding = mask.f_eq(0.0)?;
            let max = hidden.f_masked_fill(&padding, f64::from(f32::MIN))?.f_amax(1, false)?;
            // A text of no real tokens gets zeros, as on the host.
            max.f_mul(&mask.f_amax(1, false)?)?
        }
    };
    if !head.normalize {
        return Ok(pooled);
    }
    let norm =
        pooled.f_mul(&pooled)?.f_sum_dim_intlist(1, true, Kind::Float)?.f_sqrt()?.f_clamp_min(1e-12)?;
    pooled.f_div(&norm)
}

kiln_core::register_provider!(
    NAME,
    "libtorch: TorchScript modules (cpu; cuda:N with a CUDA libtorch)",
    build
);
