//! kiln's configuration: one typed tree, merged from layers and validated on load.
//!
//! Layers, later ones winning: built-in defaults < a TOML file < `KILN_*` environment
//! variables (`KILN_MODEL__DTYPE=f16` sets `model.dtype`; `__` separates sections) <
//! `--set section.key=value` flags. Every problem — an unknown key, a value of the wrong
//! type, an unknown variant, a number out of range — is reported at once with its key,
//! the value found, what is accepted and which layer set it.
//!
//! Relative paths written in a config file are relative to that file; relative paths
//! from the environment or `--set` are relative to the working directory.

use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::{Dict, Map};
use figment::{Figment, Metadata, Profile, Provider as FigmentProvider};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::device::{Device, DeviceChoice};
use crate::error::{ConfigIssue, Error, Result};
use crate::provider::Quantization;
use crate::tensor::DType;

/// Prefix of environment variables read as config.
pub const ENV_PREFIX: &str = "KILN_";

/// Environment variables with the prefix that are not config keys.
const ENV_IGNORED: &[&str] = &["log"];

/// The whole configuration of a kiln run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KilnConfig {
    /// What the run does with its inputs.
    pub task: Task,
    /// Which backend, and its own options.
    pub provider: ProviderConfig,
    /// Which model, where, at which precision.
    pub model: ModelConfig,
    /// Text pre- and post-processing.
    pub text: TextConfig,
    /// Image pre-processing.
    pub preprocess: PreprocessConfig,
    /// The classify task's labels and top-k.
    pub classify: ClassifyConfig,
    /// Batching of requests.
    pub batching: BatchingConfig,
    /// Limits on loaded models.
    pub models: ModelsConfig,
    /// The memory governor.
    pub memory: MemoryConfig,
    /// Concurrency, deadlines and retries.
    pub scheduler: SchedulerConfig,
    /// The result cache.
    pub cache: CacheConfig,
    /// Spans and resource sampling.
    pub profiler: ProfilerConfig,
    /// How often metrics go to the trackers, and where their files go.
    pub tracking: TrackingConfig,
    /// Where metrics go; several at once.
    pub trackers: Vec<TrackerConfig>,
}

impl Default for KilnConfig {
    fn default() -> Self {
        KilnConfig {
            task: Task::Embed,
            provider: ProviderConfig::default(),
            model: ModelConfig::default(),
            text: TextConfig::default(),
            preprocess: PreprocessConfig::default(),
            classify: ClassifyConfig::default(),
            batching: BatchingConfig::default(),
            models: ModelsConfig::default(),
            memory: MemoryConfig::default(),
            scheduler: SchedulerConfig::default(),
            cache: CacheConfig::default(),
            profiler: ProfilerConfig::default(),
            tracking: TrackingConfig::default(),
            trackers: Vec::new(),
        }
    }
}

/// The kind of work a run does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// Texts in, one embedding vector per text out.
    Embed,
    /// Images in, the top-k labels with their probabilities out.
    Classify,
}

/// `[provider]`: the backend by registered name, plus options it reads itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProviderConfig {
    /// Registered provider name (`kiln providers` lists them).
    pub name: String,
    /// Provider-specific options, read by the provider with [`ProviderConfig::options`].
    pub options: serde_json::Map<String, serde_json::Value>,
}

impl Default for ProviderConfig {
    fn default() -> Self {
        ProviderConfig { name: "candle".into(), options: serde_json::Map::new() }
    }
}

impl ProviderConfig {
    /// The provider's options as its own type; errors name `provider.options`.
    pub fn options<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_value(serde_json::Value::Object(self.options.clone())).map_err(|e| {
            Error::Config(vec![ConfigIssue::new(
                "provider.options",
                e.to_string(),
                format!("options that provider `{}` accepts", self.name),
            )])
        })
    }
}

/// `[model]`: what to load.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Model file or folder.
    pub path: PathBuf,
    /// Where it runs: `cpu`, `cuda:N`, `metal:N` or `auto`.
    pub device: DeviceChoice,
    /// Its precision: f32, f16 or bf16.
    #[serde(deserialize_with = "float_dtype")]
    pub dtype: DType,
    /// Weight quantization: `none` or `int8` (providers that take it list it in
    /// `kiln providers`).
    pub quantization: Quantization,
    /// One replica per listed GPU (`cuda:N` ordinals; a GPU may be listed twice for two
    /// replicas on it); requests go to the replica with the shortest queue. Empty (the
    /// default): one model on `device`. Needs `device` to be `auto` or `cuda:N`.
    pub gpu_ids: Vec<usize>,
}

fn float_dtype<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<DType, D::Error> {
    const EXPECTED: &str = "one of f32, f16, bf16";
    let s = String::deserialize(d)?;
    match s.parse::<DType>() {
        Ok(dtype) if dtype.is_float() => Ok(dtype),
        _ => Err(serde::de::Error::invalid_value(serde::de::Unexpected::Str(&s), &EXPECTED)),
    }
}

/// Where `scripts/setup` puts all-MiniLM-L6-v2, the default model.
pub const DEFAULT_MODEL_DIR: &str = ".kiln/models/all-MiniLM-L6-v2";

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            path: DEFAULT_MODEL_DIR.into(),
            device: DeviceChoice::Fixed(Device::Cpu),
            dtype: DType::F32,
            quantization: Quantization::None,
            gpu_ids: Vec::new(),
        }
    }
}

/// Pooling of token vectors into one text vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// The first token's vector.
    Cls,
    /// Mean over real (unpadded) tokens.
    Mean,
    /// Element-wise max over real tokens.
    Max,
    /// Sum over real tokens divided by the square root of their count.
    MeanSqrtLen,
}

/// `[text]`: overrides of what the model folder says about text processing.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TextConfig {
    /// Truncate to this many word pieces (default: the folder's `max_seq_length`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_length: Option<usize>,
    /// Pooling (default: the folder's pooling config, else mean).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pooling: Option<Pooling>,
    /// L2-normalise embeddings (default: whether `modules.json` has a Normalize step).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub normalize: Option<bool>,
    /// Threads of the tokenizer pool (0: one per CPU core).
    pub tokenizer_threads: usize,
    /// Characters of a text that are tokenized at most; the rest is never read
    /// (default: 128 × `max_length`; 0: no cut). See docs/config.md.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_chars: Option<usize>,
}

/// `[classify]`: how the classify task reads a model's scores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClassifyConfig {
    /// A text file with one label per line, in class order (default: class numbers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub labels: Option<PathBuf>,
    /// How many of the best classes to report.
    pub top_k: usize,
    /// Apply softmax to the model's output (off when the model outputs probabilities).
    pub softmax: bool,
}

impl Default for ClassifyConfig {
    fn default() -> Self {
        ClassifyConfig { labels: None, top_k: 5, softmax: true }
    }
}

/// `[preprocess]`: how images become model input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PreprocessConfig {
    /// How the image is fitted to `width` × `height`.
    pub mode: ResizeMode,
    /// Output width in pixels.
    pub width: u32,
    /// Output height in pixels.
    pub height: u32,
    /// `shortest_edge` mode: the shorter side is resized to this before the centre
    /// crop (default: the larger of `width` and `height`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shortest_edge: Option<u32>,
    /// Resampling filter.
    pub filter: ResizeFilter,
    /// Where a letterboxed image sits: `center` (the seed's) or `start` (top-left, as
    /// PaddleOCR's classifier pads).
    pub align: Align,
    /// RGB of the letterbox padding, also what transparent pixels are composited on.
    pub pad_color: [u8; 3],
    /// Pixel values (0..=255) are multiplied by this, then `(v - mean) / std`.
    pub scale: f32,
    /// Per-channel mean (R, G, B), after `scale`.
    pub mean: [f32; 3],
    /// Per-channel standard deviation (R, G, B), after `scale`.
    pub std: [f32; 3],
    /// Memory layout of one image.
    pub layout: Layout,
    /// Element type: f32, f16 (normalised) or u8 (the resized pixels, not normalised).
    pub dtype: DType,
    /// Largest image accepted, in pixels, checked from the header before decoding.
    pub max_pixels: u64,
    /// Largest encoded file accepted, in bytes, checked before reading.
    pub max_bytes: u64,
    /// Threads of the pre-processing pool; 0: one per core.
    pub threads: usize,
    /// Bytes of pre-processed images kept by content hash; 0: no cache.
    pub cache_bytes: u64,
    /// Decode JPEGs at 1/2, 1/4 or 1/8 scale (in the DCT domain) when the decoded image
    /// stays at least twice the resized size; much faster for large photos, within
    /// 1/255 mean absolute difference of a full decode (docs/vision.md).
    pub fast_jpeg: bool,
}

impl Default for PreprocessConfig {
    fn default() -> Self {
        PreprocessConfig {
            mode: ResizeMode::Letterbox,
            width: 224,
            height: 224,
            shortest_edge: None,
            filter: ResizeFilter::Lanczos3,
            align: Align::Center,
            pad_color: [0, 0, 0],
            scale: 1.0 / 255.0,
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
            layout: Layout::Chw,
            dtype: DType::F32,
            max_pixels: 64_000_000,
            max_bytes: 64 << 20,
            threads: 0,
            cache_bytes: 64 << 20,
            fast_jpeg: true,
        }
    }
}

/// How an image is fitted to the output size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResizeMode {
    /// Keep the aspect ratio: the limiting side fills the output, the other is
    /// `floor(target × short / long)`, centred at `floor((target − side) / 2)` on the
    /// pad colour.
    Letterbox,
    /// Stretch to the output size.
    Resize,
    /// Resize the shorter side to `shortest_edge`, then crop the centre.
    ShortestEdge,
}

/// Placement of a letterboxed image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Align {
    /// Centred: offsets `floor((target − side) / 2)`.
    Center,
    /// Top-left, padding right and below.
    Start,
}

/// Resampling filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResizeFilter {
    /// Lanczos with a = 3 (PIL's `LANCZOS`).
    Lanczos3,
    /// Bilinear (PIL's `BILINEAR`).
    Bilinear,
    /// Bicubic (PIL's `BICUBIC`).
    Bicubic,
    /// Nearest neighbour.
    Nearest,
}

/// Layout of one image in a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// Channels, height, width (PyTorch, ONNX vision models).
    Chw,
    /// Height, width, channels (TensorFlow).
    Hwc,
}

impl PreprocessConfig {
    /// Loads only the `[preprocess]` section from the layers (file, `KILN_PREPROCESS__*`,
    /// `--set preprocess.*`), so a config whose model is absent still serves.
    pub fn load(file: Option<&Path>, sets: &[String]) -> Result<Self> {
        let figment = KilnConfig::figment(file, sets)?;
        let config: PreprocessConfig =
            figment.extract_inner("preprocess").map_err(|e| Error::Config(config_issues(e, "preprocess")))?;
        config.validate()?;
        Ok(config)
    }

    /// Range checks; every problem is reported.
    pub fn validate(&self) -> Result<()> {
        let mut issues = Vec::new();
        self.check(&mut issues);
        if issues.is_empty() { Ok(()) } else { Err(Error::Config(issues)) }
    }

    fn check(&self, issues: &mut Vec<ConfigIssue>) {
        check_range(issues, "preprocess.width", self.width as usize, 1, 16_384);
        check_range(issues, "preprocess.height", self.height as usize, 1, 16_384);
        if let Some(edge) = self.shortest_edge {
            check_range(issues, "preprocess.shortest_edge", edge as usize, 1, 16_384);
        }
        if !matches!(self.dtype, DType::F32 | DType::F16 | DType::U8) {
            issues.push(ConfigIssue::new(
                "preprocess.dtype",
                format!("\"{}\"", self.dtype),
                "one of f32, f16, u8",
            ));
        }
        if !(self.scale.is_finite() && self.scale != 0.0) {
            issues.push(ConfigIssue::new(
                "preprocess.scale",
                self.scale.to_string(),
                "a finite, non-zero number",
            ));
        }
        if self.std.iter().any(|s| !(s.is_finite() && *s != 0.0)) || self.mean.iter().any(|m| !m.is_finite())
        {
            issues.push(ConfigIssue::new(
                "preprocess.std",
                format!("mean {:?}, std {:?}", self.mean, self.std),
                "finite means and finite, non-zero standard deviations",
            ));
        }
        if self.max_pixels == 0 {
            issues.push(ConfigIssue::new("preprocess.max_pixels", "0", "at least 1"));
        }
        if self.max_bytes == 0 {
            issues.push(ConfigIssue::new("preprocess.max_bytes", "0", "at least 1"));
        }
        check_range(issues, "preprocess.threads", self.threads, 0, 1024);
    }
}

/// `[batching]`: how requests are grouped into model batches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchingConfig {
    /// Group the texts of concurrent callers into shared batches. When off, each call
    /// runs alone, in chunks of `max_batch_size`.
    pub enabled: bool,
    /// Most texts in one model run.
    pub max_batch_size: usize,
    /// Most padded tokens in one model run (texts × the longest text's tokens); 0: no
    /// limit. With a large `max_batch_size`, short texts fill big batches and long ones
    /// smaller batches of about the same cost.
    pub max_batch_tokens: usize,
    /// How long the oldest waiting text may wait for others to fill its batch.
    pub max_wait_ms: u64,
    /// Texts that may wait in a model's queue.
    pub queue_capacity: usize,
    /// What a caller meets when the queue is full.
    pub when_full: WhenFull,
    /// Batch rows rounded up to a multiple of this (rows of zeros, never past
    /// `max_batch_size` or `max_batch_tokens`), so that the model meets a few shapes
    /// again and again. Default: 32 on GPUs, where a backend sets up its kernels per
    /// shape, and 1 (no rows added) on the CPU, where added rows are only work.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_multiple: Option<usize>,
    /// Padded sequence lengths rounded up to a multiple of this (never past the model's
    /// positions). Default: 16 on GPUs, 1 (the longest text of the batch) on the CPU.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sequence_multiple: Option<usize>,
    /// Run every batch shape these multiples produce once at load, largest first, so
    /// that the first requests do not pay for the backend's set-up and a batch too big
    /// for the device fails at start. Default: on for GPUs, off on the CPU.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup: Option<bool>,
}

impl BatchingConfig {
    /// `batch_multiple` in force on `device`.
    pub fn batch_multiple_on(&self, device: Device) -> usize {
        self.batch_multiple.unwrap_or(if device.is_gpu() { 32 } else { 1 })
    }

    /// `sequence_multiple` in force on `device`.
    pub fn sequence_multiple_on(&self, device: Device) -> usize {
        self.sequence_multiple.unwrap_or(if device.is_gpu() { 16 } else { 1 })
    }

    /// Whether the model is warmed up on `device`.
    pub fn warmup_on(&self, device: Device) -> bool {
        self.warmup.unwrap_or(device.is_gpu())
    }
}

impl Default for BatchingConfig {
    fn default() -> Self {
        BatchingConfig {
            enabled: true,
            max_batch_size: 32,
            max_batch_tokens: 0,
            max_wait_ms: 5,
            queue_capacity: 4096,
            when_full: WhenFull::Wait,
            batch_multiple: None,
            sequence_multiple: None,
            warmup: None,
        }
    }
}

/// Behaviour at a full queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WhenFull {
    /// The caller waits for room (back-pressure).
    Wait,
    /// The caller gets [`Error::Overloaded`] at once.
    Reject,
}

/// `[models]`: how many models stay loaded, and how much memory they may hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelsConfig {
    /// Models loaded at once; loading one more unloads the least recently used idle one.
    pub max_loaded: usize,
    /// Bytes of (estimated) model memory at most; 0: only what the device has free.
    pub max_bytes: u64,
}

impl Default for ModelsConfig {
    fn default() -> Self {
        ModelsConfig { max_loaded: 4, max_bytes: 0 }
    }
}

/// `[memory]`: the governor that watches memory and sheds caches and idle models.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MemoryConfig {
    /// Run the governor.
    pub enabled: bool,
    /// Milliseconds between samples.
    pub sample_interval_ms: u64,
    /// Used fraction of memory above which the governor sheds.
    pub high_watermark: f64,
    /// Used fraction it sheds down to (as far as idle models and the cache allow).
    pub low_watermark: f64,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig { enabled: true, sample_interval_ms: 1000, high_watermark: 0.90, low_watermark: 0.80 }
    }
}

/// `[scheduler]`: how many requests run at once, how long they may take, and how
/// failures the provider marks retryable are retried.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SchedulerConfig {
    /// Requests in flight at most; more wait for a slot.
    pub max_concurrent: usize,
    /// Deadline of a request in milliseconds, waiting for a slot included; 0: none.
    pub timeout_ms: u64,
    /// Retries after the first attempt, for retryable errors only.
    pub retries: usize,
    /// First backoff delay; it doubles per retry, with random jitter.
    pub backoff_ms: u64,
    /// Inputs (texts, images) one call may carry; a larger call is refused before any
    /// work, so one call cannot hold unbounded memory.
    pub max_inputs_per_call: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_concurrent: 1024,
            timeout_ms: 30_000,
            retries: 2,
            backoff_ms: 10,
            max_inputs_per_call: 65_536,
        }
    }
}

/// `[cache]`: results kept by content hash, so a repeated input skips the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Keep results.
    pub enabled: bool,
    /// Seconds an entry lives.
    pub ttl_s: u64,
    /// Bytes of results kept at most (entries weighed by size).
    pub max_bytes: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig { enabled: true, ttl_s: 600, max_bytes: 256 << 20 }
    }
}

/// `[profiler]`: timed spans around every stage and a background resource sampler.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProfilerConfig {
    /// Record spans and samples (cheap enough to leave on).
    pub enabled: bool,
    /// Milliseconds between resource samples (RSS, system memory, CPU%, GPUs).
    pub sample_interval_ms: u64,
    /// Keep every span and sample for a Chrome trace (`kiln run --trace` turns it on).
    pub trace: bool,
    /// Trace events kept at most; later ones are counted as dropped.
    pub max_trace_events: usize,
}

impl Default for ProfilerConfig {
    fn default() -> Self {
        ProfilerConfig { enabled: true, sample_interval_ms: 500, trace: false, max_trace_events: 1_000_000 }
    }
}

/// `[tracking]`: the interval of metrics sent to the trackers and their common folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrackingConfig {
    /// Milliseconds between metric steps.
    pub interval_ms: u64,
    /// Folder that relative tracker paths (`path`, `logdir`, `dir`) are resolved
    /// against; relative itself to the working directory.
    pub dir: PathBuf,
    /// Name of the run (default: `kiln-` and the start time, UTC).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_name: Option<String>,
}

impl Default for TrackingConfig {
    fn default() -> Self {
        TrackingConfig { interval_ms: 5000, dir: "runs".into(), run_name: None }
    }
}

/// `[[trackers]]`: one tracker by kind, with its own keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrackerConfig {
    /// Registered tracker kind.
    pub kind: String,
    /// Everything else in the entry, read by the tracker.
    #[serde(flatten)]
    pub options: serde_json::Map<String, serde_json::Value>,
}

impl KilnConfig {
    /// The layered sources: defaults, `file` (if any), `KILN_*` variables, `--set` flags.
    pub fn figment(file: Option<&Path>, sets: &[String]) -> Result<Figment> {
        let mut figment = Figment::from(Serialized::defaults(KilnConfig::default()));
        if let Some(file) = file {
            // figment ignores a missing file; a config the user named must exist.
            if !file.is_file() {
                let e = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
                return Err(Error::io("reading config", file, e));
            }
            // Parsed once here, so a syntax error is one issue naming the file rather than
            // the same error from every section figment extracts.
            let text = std::fs::read_to_string(file).map_err(|e| Error::io("reading config", file, e))?;
            if let Err(e) = toml::from_str::<toml::Table>(&text) {
                let mut issue = ConfigIssue::new(
                    "(config)",
                    format!("TOML that does not parse: {}", e.to_string().trim_end()),
                    "valid TOML (see docs/config.md)",
                );
                issue.origin = Some(file.display().to_string());
                return Err(Error::Config(vec![issue]));
            }
            figment = figment.merge(Toml::file_exact(file));
        }
        figment = figment.merge(Env::prefixed(ENV_PREFIX).split("__").ignore(ENV_IGNORED));
        Ok(figment.merge(SetFlags::parse(sets)?))
    }

    /// Loads, resolves and validates the config from its layers.
    pub fn load(file: Option<&Path>, sets: &[String]) -> Result<Self> {
        Self::from_figment(&Self::figment(file, sets)?)
    }

    /// Extracts, resolves relative paths and validates.
    pub fn from_figment(figment: &Figment) -> Result<Self> {
        let mut config = extract_all(figment)?;
        if let Some(dir) = file_dir(figment, "model.path") {
            config.model.path = dir.join(&config.model.path);
        }
        if let (Some(dir), Some(labels)) = (file_dir(figment, "classify.labels"), &config.classify.labels) {
            config.classify.labels = Some(dir.join(labels));
        }
        config.validate()?;
        Ok(config)
    }

    /// Range checks serde cannot express; every problem is reported.
    pub fn validate(&self) -> Result<()> {
        let mut issues = Vec::new();
        if !self.model.dtype.is_float() {
            issues.push(ConfigIssue::new(
                "model.dtype",
                format!("\"{}\"", self.model.dtype),
                "one of f32, f16, bf16",
            ));
        }
        if self.provider.name.trim().is_empty() {
            issues.push(ConfigIssue::new(
                "provider.name",
                "\"\"",
                "a registered provider name (see `kiln providers`)",
            ));
        }
        if self.model.path.as_os_str().is_empty() {
            issues.push(ConfigIssue::new("model.path", "\"\"", "a model file or folder"));
        }
        if !self.model.gpu_ids.is_empty()
            && !matches!(self.model.device, DeviceChoice::Auto | DeviceChoice::Fixed(Device::Cuda(_)))
        {
            issues.push(ConfigIssue::new(
                "model.device",
                format!("\"{}\" with model.gpu_ids = {:?}", self.model.device, self.model.gpu_ids),
                "\"auto\" or \"cuda:N\" when gpu_ids lists GPUs for replicas",
            ));
        }
        if self.model.gpu_ids.len() > 64 {
            issues.push(ConfigIssue::new(
                "model.gpu_ids",
                format!("{} entries", self.model.gpu_ids.len()),
                "at most 64 replicas",
            ));
        }
        check_range(&mut issues, "batching.max_batch_size", self.batching.max_batch_size, 1, 4096);
        check_range(&mut issues, "batching.max_batch_tokens", self.batching.max_batch_tokens, 0, 1 << 24);
        check_range(&mut issues, "text.tokenizer_threads", self.text.tokenizer_threads, 0, 1024);
        check_range(&mut issues, "batching.max_wait_ms", self.batching.max_wait_ms as usize, 0, 10_000);
        check_range(&mut issues, "batching.queue_capacity", self.batching.queue_capacity, 1, 1 << 20);
        if let Some(m) = self.batching.batch_multiple {
            check_range(&mut issues, "batching.batch_multiple", m, 1, 4096);
        }
        if let Some(m) = self.batching.sequence_multiple {
            check_range(&mut issues, "batching.sequence_multiple", m, 1, 4096);
        }
        let m = &self.memory;
        check_range(&mut issues, "memory.sample_interval_ms", m.sample_interval_ms as usize, 10, 3_600_000);
        for (key, value) in
            [("memory.high_watermark", m.high_watermark), ("memory.low_watermark", m.low_watermark)]
        {
            if !(value > 0.0 && value <= 1.0) {
                issues.push(ConfigIssue::new(key, value.to_string(), "a fraction in (0, 1]"));
            }
        }
        if m.low_watermark > m.high_watermark {
            issues.push(ConfigIssue::new(
                "memory.low_watermark",
                m.low_watermark.to_string(),
                format!("at most memory.high_watermark ({})", m.high_watermark),
            ));
        }
        check_range(&mut issues, "models.max_loaded", self.models.max_loaded, 1, 1024);
        check_range(&mut issues, "scheduler.max_concurrent", self.scheduler.max_concurrent, 1, 1 << 20);
        check_range(&mut issues, "scheduler.timeout_ms", self.scheduler.timeout_ms as usize, 0, 3_600_000);
        check_range(
            &mut issues,
            "scheduler.max_inputs_per_call",
            self.scheduler.max_inputs_per_call,
            1,
            1 << 24,
        );
        check_range(&mut issues, "scheduler.retries", self.scheduler.retries, 0, 100);
        check_range(&mut issues, "scheduler.backoff_ms", self.scheduler.backoff_ms as usize, 0, 60_000);
        check_range(&mut issues, "cache.ttl_s", self.cache.ttl_s as usize, 1, 365 * 24 * 3600);
        if self.cache.max_bytes < 1024 {
            issues.push(ConfigIssue::new(
                "cache.max_bytes",
                self.cache.max_bytes.to_string(),
                "at least 1024 (use `cache.enabled = false` to turn the cache off)",
            ));
        }
        if let Some(n) = self.text.max_length {
            check_range(&mut issues, "text.max_length", n, 1, 65_536);
        }
        if let Some(n) = self.text.max_chars {
            check_range(&mut issues, "text.max_chars", n, 0, 1 << 30);
        }
        self.preprocess.check(&mut issues);
        check_range(&mut issues, "classify.top_k", self.classify.top_k, 1, 1_000_000);
        let p = &self.profiler;
        check_range(&mut issues, "profiler.sample_interval_ms", p.sample_interval_ms as usize, 10, 3_600_000);
        check_range(&mut issues, "profiler.max_trace_events", p.max_trace_events, 1, 100_000_000);
        check_range(&mut issues, "tracking.interval_ms", self.tracking.interval_ms as usize, 10, 86_400_000);
        if self.tracking.run_name.as_ref().is_some_and(|n| !valid_run_name(n)) {
            issues.push(ConfigIssue::new(
                "tracking.run_name",
                format!("{:?}", self.tracking.run_name.as_deref().unwrap_or_default()),
                "a name of letters, digits, '-', '_' and '.', not starting with '.'",
            ));
        }
        for (i, t) in self.trackers.iter().enumerate() {
            if t.kind.trim().is_empty() {
                issues.push(ConfigIssue::new(
                    format!("trackers[{i}].kind"),
                    "\"\"",
                    "a registered tracker kind",
                ));
            }
        }
        if issues.is_empty() { Ok(()) } else { Err(Error::Config(issues)) }
    }

    /// The config as pretty TOML, as `kiln config` prints it.
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string_pretty(self)
            .map_err(|e| Error::InvalidInput(format!("config cannot be written as TOML: {e}")))
    }
}

/// Run names become folder names; keep them portable.
fn valid_run_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn check_range(issues: &mut Vec<ConfigIssue>, key: &str, value: usize, min: usize, max: usize) {
    if !(min..=max).contains(&value) {
        issues.push(ConfigIssue::new(key, value.to_string(), format!("an integer in {min}..={max}")));
    }
}

/// Extracts section by section, so a problem in one section does not hide those in
/// the others (serde stops at the first error of a value).
fn extract_all(figment: &Figment) -> Result<KilnConfig> {
    fn section<T: DeserializeOwned>(f: &Figment, key: &str, issues: &mut Vec<ConfigIssue>) -> Option<T> {
        match f.extract_inner::<T>(key) {
            Ok(v) => Some(v),
            Err(e) => {
                issues.extend(config_issues(e, key));
                None
            }
        }
    }
    let mut issues = Vec::new();
    let known = [
        "task",
        "provider",
        "model",
        "text",
        "preprocess",
        "classify",
        "batching",
        "models",
        "memory",
        "scheduler",
        "cache",
        "profiler",
        "tracking",
        "trackers",
    ];
    // A source that does not parse (a TOML syntax error) fails every section alike:
    // report it once, not once per section.
    let top = figment.data().map_err(|e| Error::Config(config_issues(e, "")))?;
    {
        for (key, value) in top.get(&Profile::Default).into_iter().flatten() {
            if !known.contains(&key.as_str()) {
                let mut issue =
                    ConfigIssue::new(key, "an unknown key", format!("one of the keys {}", known.join(", ")));
                issue.origin =
                    figment.get_metadata(value.tag()).map(|m| origin(m, None, std::slice::from_ref(key)));
                issues.push(issue);
            }
        }
    }
    let config = KilnConfig {
        task: section(figment, "task", &mut issues).unwrap_or(Task::Embed),
        provider: section(figment, "provider", &mut issues).unwrap_or_default(),
        model: section(figment, "model", &mut issues).unwrap_or_default(),
        text: section(figment, "text", &mut issues).unwrap_or_default(),
        preprocess: section(figment, "preprocess", &mut issues).unwrap_or_default(),
        classify: section(figment, "classify", &mut issues).unwrap_or_default(),
        batching: section(figment, "batching", &mut issues).unwrap_or_default(),
        models: section(figment, "models", &mut issues).unwrap_or_default(),
        memory: section(figment, "memory", &mut issues).unwrap_or_default(),
        scheduler: section(figment, "scheduler", &mut issues).unwrap_or_default(),
        cache: section(figment, "cache", &mut issues).unwrap_or_default(),
        profiler: section(figment, "profiler", &mut issues).unwrap_or_default(),
        tracking: section(figment, "tracking", &mut issues).unwrap_or_default(),
        trackers: section(figment, "trackers", &mut issues).unwrap_or_default(),
    };
    if issues.is_empty() {
        return Ok(config);
    }
    // Sections that failed hold defaults, which pass; the others are range-checked now
    // so one run reports every problem.
    if let Err(Error::Config(more)) = config.validate() {
        issues.extend(more);
    }
    Err(Error::Config(issues))
}

/// The folder of the config file that set `key`, if a file set it and the value is relative.
fn file_dir(figment: &Figment, key: &str) -> Option<PathBuf> {
    let value = figment.find_value(key).ok()?;
    if Path::new(value.as_str()?).is_absolute() {
        return None;
    }
    match &figment.get_metadata(value.tag())?.source {
        Some(figment::Source::File(file)) => file.parent().map(Path::to_path_buf),
        _ => None,
    }
}

/// Turns figment's errors for `section` into issues with key, value, expectation, origin.
fn config_issues(error: figment::Error, section: &str) -> Vec<ConfigIssue> {
    use figment::error::Kind;
    error
        .into_iter()
        .map(|mut e| {
            // `extract_inner(section)` appends the section to the error's path instead of
            // putting it first; put it first.
            if e.path.last().is_some_and(|p| p == section) {
                e.path.pop();
            }
            if e.path.first().is_none_or(|p| p != section) {
                e.path.insert(0, section.to_string());
            }
            let key = e.path.join(".");
            let origin = e.metadata.as_ref().map(|m| origin(m, e.profile.as_ref(), &e.path));
            let mut issue = match &e.kind {
                // figment's path already ends with the unknown field.
                Kind::UnknownField(_, expected) => ConfigIssue::new(
                    key.clone(),
                    "an unknown key",
                    format!("one of the keys {}", expected.join(", ")),
                ),
                Kind::UnknownVariant(found, expected) => ConfigIssue::new(
                    key.clone(),
                    format!("\"{found}\""),
                    format!("one of {}", expected.join(", ")),
                ),
                Kind::InvalidType(found, expected) | Kind::InvalidValue(found, expected) => {
                    ConfigIssue::new(key.clone(), found.to_string(), expected.clone())
                }
                Kind::MissingField(field) => ConfigIssue::new(
                    if key.is_empty() { field.to_string() } else { format!("{key}.{field}") },
                    "nothing",
                    "a value",
                ),
                other => ConfigIssue::new(
                    if key.is_empty() { "(config)".to_string() } else { key.clone() },
                    other.to_string(),
                    "a valid config (see docs/config.md)",
                ),
            };
            issue.origin = origin;
            issue
        })
        .collect()
}

fn origin(metadata: &Metadata, profile: Option<&Profile>, path: &[String]) -> String {
    match &metadata.source {
        Some(figment::Source::File(file)) => file.display().to_string(),
        _ if metadata.name.contains("environment variable") => {
            format!("environment variable {ENV_PREFIX}{}", path.join("__").to_uppercase())
        }
        _ => {
            let profile = profile.cloned().unwrap_or_default();
            format!("{} `{}`", metadata.name, metadata.interpolate(&profile, path))
        }
    }
}

/// `--set section.key=value` flags as a figment layer. Values are read as TOML
/// (`32`, `true`, `[1, 2]`, `"x"`); anything that is not valid TOML is a string.
struct SetFlags(toml::Table);

impl SetFlags {
    fn parse(sets: &[String]) -> Result<Self> {
        let mut root = toml::Table::new();
        for set in sets {
            let parsed = set.split_once('=').and_then(|(key, raw)| {
                let parts: Vec<&str> = key.trim().split('.').collect();
                parts.iter().all(|p| !p.is_empty()).then_some((parts, raw))
            });
            let Some((parts, raw)) = parsed else {
                return Err(Error::Config(vec![ConfigIssue::new(
                    "--set",
                    format!("`{set}`"),
                    "section.key=value, e.g. --set model.dtype=f16",
                )]));
            };
            let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or_else(|| toml::Value::String(raw.to_string()));
            let (last, sections) = parts.split_last().expect("split yields at least one part");
            let mut table = &mut root;
            for part in sections {
                let entry = table.entry(part.to_string()).or_insert_with(|| toml::Table::new().into());
                if !entry.is_table() {
                    *entry = toml::Table::new().into();
                }
                table = entry.as_table_mut().expect("made a table just above");
            }
            table.insert(last.to_string(), value);
        }
        Ok(SetFlags(root))
    }
}

impl FigmentProvider for SetFlags {
    fn metadata(&self) -> Metadata {
        Metadata::named("--set flag").interpolater(|_, keys| keys.join("."))
    }
    fn data(&self) -> std::result::Result<Map<Profile, Dict>, figment::Error> {
        Serialized::defaults(&self.0).data()
    }
}

#[cfg(test)]
// figment::Jail closures must return figment::Error, which is large.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;

    /// Jail closures return figment's error type; carry ours in its message.
    fn jail_err(e: Error) -> figment::Error {
        figment::Error::from(e.to_string())
    }

    fn load_in(jail: &Jail, toml: &str, sets: &[&str]) -> Result<KilnConfig> {
        jail.create_file("kiln.toml", toml).unwrap();
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        KilnConfig::load(Some(Path::new("kiln.toml")), &sets)
    }

    #[test]
    fn defaults_are_candle_minilm_on_cpu() {
        let c = KilnConfig::default();
        assert_eq!(c.provider.name, "candle");
        assert_eq!(c.model.path, PathBuf::from(DEFAULT_MODEL_DIR));
        assert_eq!(
            (c.model.device, c.model.dtype, c.task),
            (DeviceChoice::Fixed(Device::Cpu), DType::F32, Task::Embed)
        );
        assert!(c.model.gpu_ids.is_empty());
        c.validate().unwrap();
    }

    /// A file that is not TOML is one error, with the parse error and the file — not
    /// one per config section (issue 17: it was printed 14 times).
    #[test]
    fn a_file_that_does_not_parse_is_reported_once() {
        Jail::expect_with(|jail| {
            let Err(Error::Config(issues)) = load_in(jail, "[model\npath = \"x\"\n", &[]) else {
                panic!("a malformed file must be a config error");
            };
            assert_eq!(issues.len(), 1, "{issues:?}");
            let text = issues[0].to_string();
            assert!(text.contains("line 1") && text.contains("kiln.toml"), "{text}");
            Ok(())
        });
    }

    #[test]
    fn layers_apply_in_order_file_env_set() {
        Jail::expect_with(|jail| {
            let file = "[model]\ndtype = \"f16\"\ndevice = \"cuda:1\"\n[batching]\nmax_batch_size = 8\n";
            let c = load_in(jail, file, &[]).map_err(jail_err)?;
            assert_eq!(
                (c.model.dtype, c.model.device, c.batching.max_batch_size),
                (DType::F16, DeviceChoice::Fixed(Device::Cuda(1)), 8)
            );

            jail.set_env("KILN_MODEL__DTYPE", "bf16");
            jail.set_env("KILN_BATCHING__MAX_BATCH_SIZE", "16");
            let c = load_in(jail, file, &[]).map_err(jail_err)?;
            assert_eq!((c.model.dtype, c.batching.max_batch_size), (DType::BF16, 16));
            assert_eq!(c.model.device, Device::Cuda(1), "keys the env does not set keep the file's value");

            let c =
                load_in(jail, file, &["model.dtype=f32", "batching.max_batch_size=4", "provider.name=mine"])
                    .map_err(jail_err)?;
            assert_eq!((c.model.dtype, c.batching.max_batch_size), (DType::F32, 4));
            assert_eq!(c.provider.name, "mine");
            Ok(())
        });
    }

    #[test]
    fn relative_model_path_in_a_file_is_relative_to_the_file() {
        Jail::expect_with(|jail| {
            std::fs::create_dir("conf").unwrap();
            jail.create_file("conf/k.toml", "[model]\npath = \"models/m\"\n")?;
            let c = KilnConfig::load(Some(Path::new("conf/k.toml")), &[]).map_err(jail_err)?;
            assert_eq!(c.model.path, PathBuf::from("conf/models/m"));
            let c = KilnConfig::load(Some(Path::new("conf/k.toml")), &["model.path=other".into()])
                .map_err(jail_err)?;
            assert_eq!(
                c.model.path,
                PathBuf::from("other"),
                "--set paths stay relative to the working directory"
            );
            Ok(())
        });
    }

    #[test]
    fn every_bad_value_is_reported_with_key_value_expectation_and_origin() {
        Jail::expect_with(|jail| {
            let file = "[model]\ndtype = \"f64\"\n[text]\ncolour = 3\n[extra]\nx = 1\n";
            let err = load_in(jail, file, &[]).unwrap_err().to_string();
            assert!(
                err.contains("`model.dtype`: found string \"f64\", expected one of f32, f16, bf16"),
                "{err}"
            );
            assert!(err.contains("(set in kiln.toml)"), "{err}");
            assert!(err.contains("`text.colour`: found an unknown key, expected one of the keys max_length, pooling, normalize"), "{err}");
            assert!(
                err.contains("`extra`: found an unknown key, expected one of the keys task, provider"),
                "{err}"
            );

            let err = load_in(jail, "", &["batching.max_batch_size=0", "text.max_length=0"])
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("`batching.max_batch_size`: found 0, expected an integer in 1..=4096"),
                "{err}"
            );
            assert!(err.contains("`text.max_length`: found 0, expected an integer in 1..=65536"), "{err}");
            let err = load_in(jail, "", &["batching.batch_multiple=0", "batching.sequence_multiple=5000"])
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("`batching.batch_multiple`: found 0, expected an integer in 1..=4096"),
                "{err}"
            );
            assert!(err.contains("`batching.sequence_multiple`: found 5000"), "{err}");
            let b = load_in(jail, "", &[]).unwrap().batching;
            assert_eq!((b.batch_multiple_on(Device::Cpu), b.sequence_multiple_on(Device::Cpu)), (1, 1));
            assert_eq!(
                (b.batch_multiple_on(Device::Cuda(0)), b.sequence_multiple_on(Device::Cuda(0))),
                (32, 16)
            );
            assert!(!b.warmup_on(Device::Cpu) && b.warmup_on(Device::Cuda(0)));

            jail.set_env("KILN_MODEL__DEVICE", "gpu0");
            let err = load_in(jail, "", &["batching.max_batch_size=5000"]).unwrap_err().to_string();
            assert!(
                err.contains("`batching.max_batch_size`: found 5000"),
                "range problems come with type problems: {err}"
            );
            assert!(
                err.contains("`model.device`: found string \"gpu0\", expected `auto`, `cpu`, `cuda:N`"),
                "{err}"
            );
            assert!(err.contains("environment variable KILN_MODEL__DEVICE"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn device_auto_and_gpu_replicas() {
        Jail::expect_with(|jail| {
            let c =
                load_in(jail, "[model]\ndevice = \"auto\"\ngpu_ids = [0, 1, 1]\n", &[]).map_err(jail_err)?;
            assert_eq!((c.model.device, c.model.gpu_ids.clone()), (DeviceChoice::Auto, vec![0, 1, 1]));
            assert_eq!(c.model.device.to_string(), "auto");
            let err = load_in(jail, "[model]\ngpu_ids = [0]\n", &[]).unwrap_err().to_string();
            assert!(
                err.contains(
                    "`model.device`: found \"cpu\" with model.gpu_ids = [0], expected \"auto\" or \"cuda:N\""
                ),
                "{err}"
            );
            Ok(())
        });
    }

    #[test]
    fn bad_set_flags_and_types_are_reported() {
        Jail::expect_with(|jail| {
            let err = load_in(jail, "", &["nonsense"]).unwrap_err().to_string();
            assert!(err.contains("`--set`: found `nonsense`, expected section.key=value"), "{err}");
            let err = load_in(jail, "", &["batching.max_batch_size=lots"]).unwrap_err().to_string();
            assert!(err.contains("`batching.max_batch_size`: found string \"lots\""), "{err}");
            assert!(err.contains("--set flag"), "{err}");
            let err = load_in(jail, "task = \"dance\"\n", &[]).unwrap_err().to_string();
            assert!(err.contains("`task`: found \"dance\", expected one of embed"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn a_named_config_file_must_exist() {
        let err = KilnConfig::load(Some(Path::new("/no/such/kiln.toml")), &[]).unwrap_err().to_string();
        assert_eq!(err, "reading config /no/such/kiln.toml: no such file");
    }

    #[test]
    fn printed_config_loads_back_to_the_same_config() {
        Jail::expect_with(|jail| {
            let mut c = KilnConfig::default();
            c.text.pooling = Some(Pooling::Cls);
            c.trackers.push(TrackerConfig { kind: "stdout".into(), options: Default::default() });
            jail.create_file("round.toml", &c.to_toml().map_err(jail_err)?)?;
            let back = KilnConfig::load(Some(Path::new("round.toml")), &[]).map_err(jail_err)?;
            assert_eq!(back, c);
            Ok(())
        });
    }
}
