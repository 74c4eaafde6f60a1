//! kiln's core: the four traits every part of kiln is built on, the plain types they
//! exchange, the config, the errors and the plugin registries.
//!
//! - [`Provider`] / [`Model`]: a backend and the models it loads ([`Generator`]: the
//!   ones that generate, a step at a time).
//! - [`Cache`]: results by content hash.
//! - [`Profiler`]: timed spans and resource samples.
//! - [`Tracker`]: where metrics go.
//!
//! Nothing here knows a backend or starts a runtime; backends, trackers and the runtime
//! depend on this crate, never the other way round.

pub mod cache;
pub mod config;
pub mod device;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod hf;
pub mod hub;
pub mod model;
pub mod pooling;
pub mod profiler;
pub mod provider;
pub mod qwen2vl;
pub mod registry;
pub mod tensor;
pub mod tensor_bytes;
pub mod tracker;

pub use async_trait::async_trait;
pub use cache::{Cache, CacheKey, CacheRegistration, CacheSetup, CacheStats, NoCache, build_cache, caches};
pub use config::{
    BatchingConfig, CacheConfig, GenerateConfig, KilnConfig, Layout, MemoryConfig, ModelConfig, ModelsConfig,
    Pooling, PreprocessConfig, ProfilerConfig, ProviderConfig, ResizeFilter, ResizeMode, SchedulerConfig,
    ServerConfig, Task, TextConfig, TrackerConfig, TrackingConfig, VideoConfig, WhenFull,
};
pub use device::{Device, DeviceChoice, DeviceInfo, DeviceKind, MemoryInfo};
pub use error::{BoxError, ConfigIssue, Error, Result, panic_message};
pub use generate::{
    Generator, GeneratorInfo, ImagePatches, Next, SequenceCache, SlotIds, StepImage, StepItem,
    TokenizerSource, VisionInfo,
};
pub use hf::max_position_embeddings;
pub use model::{Model, ModelInfo, Pending};
pub use pooling::{EmbeddingHead, HeadSite, LAST_HIDDEN_STATE, SENTENCE_EMBEDDING, pool_rows, pool_tokens};
pub use profiler::{AllocatorReport, GpuReport, NoopProfiler, ProfileReport, Profiler, Span, SpanStats};
pub use provider::{
    AllocatorMemory, Capabilities, ModelSpec, Provider, ProviderRegistration, Quantization, build_provider,
    providers,
};
pub use registry::{Registration, Registry, plugin_options};
pub use tensor::{DType, Dim, Element, Inputs, NamedTensors, Outputs, Tensor, TensorSpec};
pub use tracker::{
    Clip, Metrics, Tracker, TrackerRegistration, TrackerSetup, build_trackers, trackers, utc_datetime,
};

#[doc(hidden)]
pub mod __private {
    pub use inventory;
}
