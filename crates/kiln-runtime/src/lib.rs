//! kiln's runtime: the [`Optimizer`] and what it wraps around a model.
//!
//! Every front starts from [`Parts`]: the provider looked up by name, the devices,
//! the resource monitor, the profiler and the trackers, built and checked once from the
//! config. The optimizer loads the model on a dedicated
//! worker thread ([`worker`]) that batches the requests of concurrent callers
//! ([`collate`] pads them into one batch and splits the outputs back). Repeated inputs
//! are answered from the result cache ([`cache`]); the [`scheduler`] bounds concurrency,
//! enforces deadlines and retries retryable failures; concurrent requests for the same
//! uncached text share one run ([`inflight`]); texts are tokenized by a pool of threads
//! ([`tokenize`]) into unpadded rows, and models pool them into embeddings on their own
//! device where the provider can; [`Stats`] counts it all. None of it names a backend.

pub mod cache;
pub mod collate;
pub mod devices;
pub mod disk_cache;
pub mod generate;
pub mod governor;
pub mod inflight;
pub mod memory;
pub mod models;
pub mod monitor;
pub mod optimizer;
pub mod partial_file;
pub mod parts;
pub mod profiler;
pub mod profilers;
pub mod replicas;
pub mod scheduler;
pub mod stats;
pub mod tokenize;
pub mod tracking;
pub mod worker;

pub use cache::{MokaCache, cache_key};
pub use devices::{CpuDevice, DeviceReport, GpuDevice, discover as discover_devices};
pub use disk_cache::DiskCache;
pub use generate::{Event, FinishReason, Generated, Generation, GenerationStats, Prompt, TokenStream};
pub use governor::{MemoryGovernor, MemoryStats};
pub use memory::{MemoryProbe, MemorySample, process_rss};
pub use models::{LoadedModel, ModelKey, ModelManager};
pub use monitor::{Reading, ResourceMonitor, Subscription};
pub use optimizer::{Classification, LAST_HIDDEN_STATE, Optimizer, Scored, TaskInput, TaskOutput};
pub use partial_file::{PartialFile, write_atomically};
pub use parts::{Parts, Reports};
pub use profiler::SamplingProfiler;
pub use profilers::{ProfilerRegistration, ProfilerSetup, build_profiler, profilers};
pub use replicas::{ReplicaStats, Replicas};
pub use scheduler::Scheduler;
pub use stats::{Buckets, LATENCY_BUCKETS_MS, LatencyHistogram, Percentiles, Stats};
pub use tokenize::TokenizerPool;
pub use tracking::{MetricsSource, TrackerFailures, TrackerHub};
pub use worker::{BatchPolicy, BatchStats, ItemOutput, ModelWorker, RunOutput, WarmUp};

#[doc(hidden)]
pub mod __private {
    pub use kiln_core::__private::inventory;
}
