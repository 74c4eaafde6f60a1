//! The config's sections: one typed struct per `[section]`, with its defaults.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::device::{Device, DeviceChoice};
use crate::error::{ConfigIssue, Error, Result};
use crate::provider::Quantization;
use crate::tensor::DType;

use super::{KilnConfig, check_range, config_issues};

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
    /// The provider's options as its own type; errors name `provider.options` and the
    /// provider.
    pub fn options<T: DeserializeOwned>(&self) -> Result<T> {
        crate::registry::plugin_options(
            &self.options,
            "provider.options",
            &format!("provider `{}`", self.name),
        )
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

    pub(super) fn check(&self, issues: &mut Vec<ConfigIssue>) {
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
///
/// `kind` picks the implementation from the cache registry
/// ([`build_cache`](crate::build_cache)): `"memory"` (in-process, the default) or a
/// registered one such as `"redis"`; the kind's own keys sit beside the common ones and
/// are checked by it (a key no kind takes is an error naming it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CacheConfig {
    /// Keep results.
    pub enabled: bool,
    /// Registered cache kind.
    pub kind: String,
    /// Seconds an entry lives.
    pub ttl_s: u64,
    /// Bytes of results kept at most in the process (entries weighed by size).
    pub max_bytes: u64,
    /// The kind's own keys (`url` for `"redis"`, ...).
    #[serde(flatten)]
    pub options: serde_json::Map<String, serde_json::Value>,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            enabled: true,
            kind: "memory".into(),
            ttl_s: 600,
            max_bytes: 256 << 20,
            options: Default::default(),
        }
    }
}

/// `[profiler]`: timed spans around every stage and a background resource sampler.
///
/// `kind` picks the implementation from the runtime's profiler registry: `"sampling"`
/// (the default) or a registered one, whose own keys sit beside the common ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ProfilerConfig {
    /// Record spans and samples (cheap enough to leave on).
    pub enabled: bool,
    /// Registered profiler kind.
    pub kind: String,
    /// Milliseconds between resource samples (RSS, system memory, CPU%, GPUs).
    pub sample_interval_ms: u64,
    /// Keep every span and sample for a Chrome trace (`kiln run --trace` turns it on).
    pub trace: bool,
    /// Trace events kept at most; later ones are counted as dropped.
    pub max_trace_events: usize,
    /// The kind's own keys.
    #[serde(flatten)]
    pub options: serde_json::Map<String, serde_json::Value>,
}

impl Default for ProfilerConfig {
    fn default() -> Self {
        ProfilerConfig {
            enabled: true,
            kind: "sampling".into(),
            sample_interval_ms: 500,
            trace: false,
            max_trace_events: 1_000_000,
            options: Default::default(),
        }
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
