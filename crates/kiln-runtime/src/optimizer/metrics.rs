//! What the trackers get from the optimizer: each step's metrics (rates over the
//! interval, latency percentiles, levels now) and the summary at the end.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use kiln_core::{Cache, Metrics, ModelInfo};

use crate::governor::MemoryGovernor;
use crate::monitor::ResourceMonitor;
use crate::scheduler::Scheduler;
use crate::stats::{Counters, Parts, Stats};
use crate::tracking::TrackerFailures;
use crate::worker::ModelWorker;

/// Everything [`Stats`] is made of. The tracker thread holds a clone; the worker and
/// governor are weak so that it never keeps a model alive.
#[derive(Clone)]
pub(super) struct StatsSource {
    pub(super) counters: Arc<Counters>,
    pub(super) scheduler: Arc<Scheduler>,
    pub(super) cache: Arc<dyn Cache>,
    pub(super) workers: Vec<Weak<ModelWorker>>,
    pub(super) model: ModelInfo,
    pub(super) governor: Option<Weak<MemoryGovernor>>,
    pub(super) started: Instant,
    pub(super) load_time: Duration,
    pub(super) failures: TrackerFailures,
}

impl StatsSource {
    pub(super) fn snapshot(&self) -> Stats {
        let (batches, replicas, queue_depth) = crate::replicas::combined(&self.workers);
        self.counters.snapshot(Parts {
            retries: self.scheduler.retries(),
            timeouts: self.scheduler.timeouts(),
            started: self.started,
            load: self.load_time,
            cache: self.cache.stats(),
            batches,
            queue_depth,
            replicas,
            model: self.model.clone(),
            memory: self.governor.as_ref().and_then(Weak::upgrade).map(|g| g.stats()),
            tracker_failures: self.failures.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        })
    }
}

/// The metrics of each tracker step: rates over the interval since the last step,
/// latency percentiles of the requests finished in it, and levels now.
pub(super) struct IntervalMetrics {
    source: StatsSource,
    monitor: Arc<ResourceMonitor>,
    last: Option<(Instant, Stats)>,
}

impl IntervalMetrics {
    pub(super) fn new(source: StatsSource, monitor: Arc<ResourceMonitor>) -> Self {
        IntervalMetrics { source, monitor, last: None }
    }

    pub(super) fn into_fn(mut self: Box<Self>) -> crate::tracking::MetricsSource {
        Box::new(move || self.step())
    }

    fn step(&mut self) -> Metrics {
        let now = Instant::now();
        let stats = self.source.snapshot();
        let window = self.source.counters.window_latency.take_percentiles();
        let (since, before) = match &self.last {
            Some((at, s)) => (*at, Some(s)),
            None => (self.source.started, None),
        };
        let secs = now.duration_since(since).as_secs_f64().max(1e-9);
        let delta = |f: fn(&Stats) -> u64| (f(&stats) - before.map_or(0, f)) as f64;
        let errors = |s: &Stats| s.errors.values().sum::<u64>();
        // The monitor's latest reading, unless it has no thread to keep one current.
        let reading = match self.monitor.interval() {
            Some(_) => self.monitor.latest().unwrap_or_else(|| self.monitor.sample_now()),
            None => self.monitor.sample_now(),
        };
        let memory = &reading.memory;
        let mut m = Metrics::new();
        let mut put = |k: &str, v: f64| {
            m.insert(k.to_string(), v);
        };
        put("throughput_rps", delta(|s| s.requests) / secs);
        put("texts_per_s", delta(|s| s.texts) / secs);
        if window.count > 0 {
            put("latency_p50_ms", window.p50);
            put("latency_p95_ms", window.p95);
            put("latency_p99_ms", window.p99);
        }
        // Rows through the model, as they finish: steady even while one large call runs.
        put("rows_per_s", delta(Stats::rows) / secs);
        let batches = delta(|s| s.batches);
        if batches > 0.0 {
            put("mean_batch_size", delta(Stats::rows) / batches);
        }
        put("cache_hit_rate", stats.cache.hit_rate());
        put("queue_depth", stats.queue_depth as f64);
        put("rss_mib", memory.process_rss as f64 / (1u64 << 20) as f64);
        put("system_memory_used_fraction", memory.used_fraction());
        // A backend with an allocator of its own (MLX), as the governor last read it.
        if let Some(m) = stats.memory.as_ref().filter(|m| m.allocator_active_bytes > 0) {
            put("allocator_active_mib", m.allocator_active_bytes as f64 / (1u64 << 20) as f64);
            put("allocator_cached_mib", m.allocator_cached_bytes as f64 / (1u64 << 20) as f64);
        }
        put("errors", delta(errors));
        put("errors_total", errors(&stats) as f64);
        self.last = Some((now, stats));
        m
    }
}

/// The figures logged once at the end.
pub(super) fn summary_metrics(stats: &Stats) -> Metrics {
    let errors = stats.errors.values().sum::<u64>();
    let uptime = stats.uptime_seconds.max(1e-9);
    let mut m = Metrics::from([
        ("requests".to_string(), stats.requests as f64),
        ("texts".to_string(), stats.texts as f64),
        ("images".to_string(), stats.images as f64),
        ("errors".to_string(), errors as f64),
        ("retries".to_string(), stats.retries as f64),
        ("timeouts".to_string(), stats.timeouts as f64),
        ("uptime_s".to_string(), stats.uptime_seconds),
        ("load_s".to_string(), stats.load_seconds),
        ("throughput_rps".to_string(), stats.requests as f64 / uptime),
        ("texts_per_s".to_string(), stats.texts as f64 / uptime),
        ("latency_p50_ms".to_string(), stats.latency_ms.p50),
        ("latency_p95_ms".to_string(), stats.latency_ms.p95),
        ("latency_p99_ms".to_string(), stats.latency_ms.p99),
        ("latency_max_ms".to_string(), stats.latency_ms.max),
        ("queue_wait_p50_ms".to_string(), stats.queue_wait_ms.p50),
        ("queue_wait_p99_ms".to_string(), stats.queue_wait_ms.p99),
        ("batches".to_string(), stats.batches as f64),
        ("mean_batch_size".to_string(), stats.mean_batch_size),
        ("cache_hit_rate".to_string(), stats.cache.hit_rate()),
        ("tokenize_s".to_string(), stats.tokenize_seconds),
        ("preprocess_s".to_string(), stats.preprocess_seconds),
        ("inference_s".to_string(), stats.inference_seconds),
        ("pooling_s".to_string(), stats.pooling_seconds),
    ]);
    if let Some(memory) = &stats.memory {
        m.insert("peak_rss_mib".into(), memory.peak_rss_bytes as f64 / (1u64 << 20) as f64);
    }
    m
}
