//! Counters the optimizer keeps, and the snapshot [`Stats`] it reports.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use kiln_core::{CacheStats, Error, ModelInfo};
use serde::Serialize;

use crate::governor::MemoryStats;
use crate::worker::BatchStats;

/// A snapshot of what the optimizer has done, serialisable to JSON.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    /// Calls to `embed` / `infer`.
    pub requests: u64,
    /// Texts embedded (cache hits included).
    pub texts: u64,
    /// Images classified (those that could be read).
    pub images: u64,
    /// Texts answered by joining a concurrent request's run for the same text
    /// (single-flight) instead of a model run of their own.
    pub coalesced: u64,
    /// Cache entries refused because they do not fit the model's output (wrong shape or
    /// length, non-finite values): each counted a miss and recomputed. A shared cache is
    /// a trust boundary.
    pub cache_invalid: u64,
    /// Model runs (batches).
    pub batches: u64,
    /// Model runs by number of items in them.
    pub batch_sizes: BTreeMap<usize, u64>,
    /// Mean items per model run.
    pub mean_batch_size: f64,
    /// Items waiting in the model's queue now.
    pub queue_depth: usize,
    /// Failed requests by error kind (`invalid_input`, `overloaded`, `timeout`, ...).
    pub errors: BTreeMap<String, u64>,
    /// Retries made after retryable failures.
    pub retries: u64,
    /// Requests that passed their deadline.
    pub timeouts: u64,
    /// End-to-end latency of successful requests.
    pub latency_ms: Percentiles,
    /// Time items waited in the queue before their batch ran (batching on).
    pub queue_wait_ms: Percentiles,
    /// End-to-end latency as cumulative counts at [`LATENCY_BUCKETS_MS`] (Prometheus' histogram).
    pub latency_buckets: Buckets,
    /// Queue waits at [`LATENCY_BUCKETS_MS`].
    pub queue_wait_buckets: Buckets,
    /// Model time per item (its batch's run time over the batch's size) at [`LATENCY_BUCKETS_MS`].
    pub inference_buckets: Buckets,
    /// Time in tokenization, seconds.
    pub tokenize_seconds: f64,
    /// Time in image pre-processing (decode, resize, normalise), seconds.
    pub preprocess_seconds: f64,
    /// Time inside the model, measured on its worker thread, seconds.
    pub inference_seconds: f64,
    /// Time in pooling and normalisation, seconds.
    pub pooling_seconds: f64,
    /// Seconds since the optimizer started.
    pub uptime_seconds: f64,
    /// Seconds it took to load the model.
    pub load_seconds: f64,
    /// Result cache counters.
    pub cache: CacheStats,
    /// The model served.
    pub model: ModelInfo,
    /// Memory peaks and pressure handling (when the governor runs).
    pub memory: Option<MemoryStats>,
    /// Failed tracker calls by tracker kind (a tracker never fails inference).
    pub tracker_failures: BTreeMap<String, u64>,
    /// Each replica's share of the work (one entry without `model.gpu_ids`).
    pub replicas: Vec<crate::replicas::ReplicaStats>,
}

impl Stats {
    /// Rows (texts, images) run through the model so far.
    pub fn rows(&self) -> u64 {
        crate::worker::rows(&self.batch_sizes)
    }
}

/// Percentiles of a latency distribution, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Percentiles {
    /// Samples recorded.
    pub count: u64,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

/// Upper bounds (milliseconds) of the latency buckets in [`Stats`]: sub-millisecond
/// cache hits to half-minute generations.
pub const LATENCY_BUCKETS_MS: &[f64] = &[
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
];

/// Cumulative counts of a distribution at fixed upper bounds: what a Prometheus
/// histogram holds, so replicas' latencies can be aggregated (quantiles of summaries
/// cannot be).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Buckets {
    /// Upper bounds in milliseconds, ascending; everything is under the implicit `+Inf`.
    pub le_ms: Vec<f64>,
    /// Samples at or under each bound.
    pub cumulative: Vec<u64>,
    /// All samples.
    pub count: u64,
    /// Their sum in milliseconds (to the histogram's 3 significant digits).
    pub sum_ms: f64,
}

/// A latency histogram in microseconds, 3 significant digits, up to an hour.
pub struct LatencyHistogram(Mutex<Histogram<u64>>);

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram(Mutex::new(Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds")))
    }
}

impl LatencyHistogram {
    /// Records one duration.
    pub fn record(&self, d: Duration) {
        let us = (d.as_micros() as u64).clamp(1, 3_600_000_000);
        let _ = self.0.lock().unwrap_or_else(|p| p.into_inner()).record(us);
    }

    /// The percentiles so far.
    pub fn percentiles(&self) -> Percentiles {
        Self::of(&self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Cumulative counts at `le_ms` so far.
    pub fn buckets(&self, le_ms: &[f64]) -> Buckets {
        let h = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let cumulative = le_ms
            .iter()
            .map(|&ms| {
                let us = (ms * 1000.0) as u64;
                // Values are recorded clamped to at least 1 us: none lies under that.
                if us < 1 { 0 } else { h.count_between(1, us) }
            })
            .collect();
        Buckets {
            le_ms: le_ms.to_vec(),
            cumulative,
            count: h.len(),
            sum_ms: h.mean() * h.len() as f64 / 1000.0,
        }
    }

    /// The percentiles so far, and starts over (for per-interval figures).
    pub fn take_percentiles(&self) -> Percentiles {
        let mut h = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let p = Self::of(&h);
        h.reset();
        p
    }

    fn of(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Percentiles {
            count: h.len(),
            mean: h.mean() / 1000.0,
            p50: ms(h.value_at_quantile(0.50)),
            p95: ms(h.value_at_quantile(0.95)),
            p99: ms(h.value_at_quantile(0.99)),
            max: ms(h.max()),
        }
    }
}

#[derive(Default)]
pub(crate) struct Counters {
    pub requests: AtomicU64,
    pub texts: AtomicU64,
    pub images: AtomicU64,
    pub coalesced: AtomicU64,
    pub cache_invalid: AtomicU64,
    tokenize_ns: AtomicU64,
    preprocess_ns: AtomicU64,
    inference_ns: AtomicU64,
    pooling_ns: AtomicU64,
    errors: Mutex<BTreeMap<&'static str, u64>>,
    latency: LatencyHistogram,
    /// Latencies since the trackers' last step.
    pub window_latency: LatencyHistogram,
    queue_wait: LatencyHistogram,
    inference: LatencyHistogram,
}

/// What the counters do not hold themselves: the figures of the other layers.
pub(crate) struct Parts {
    pub retries: u64,
    pub timeouts: u64,
    pub started: Instant,
    pub load: Duration,
    pub cache: CacheStats,
    pub batches: BatchStats,
    pub queue_depth: usize,
    pub model: ModelInfo,
    pub memory: Option<MemoryStats>,
    pub tracker_failures: BTreeMap<String, u64>,
    pub replicas: Vec<crate::replicas::ReplicaStats>,
}

pub(crate) enum Stage {
    Tokenize,
    Preprocess,
    Inference,
    Pooling,
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn time(&self, stage: Stage, elapsed: Duration) {
        let counter = match stage {
            Stage::Tokenize => &self.tokenize_ns,
            Stage::Preprocess => &self.preprocess_ns,
            Stage::Inference => {
                self.inference.record(elapsed);
                &self.inference_ns
            }
            Stage::Pooling => &self.pooling_ns,
        };
        Self::add(counter, elapsed.as_nanos() as u64);
    }

    pub fn latency(&self, d: Duration) {
        self.latency.record(d);
        self.window_latency.record(d);
    }

    pub fn queue_wait(&self, d: Duration) {
        self.queue_wait.record(d);
    }

    pub fn error(&self, error: &Error) {
        *self.errors.lock().unwrap_or_else(|p| p.into_inner()).entry(error.kind()).or_default() += 1;
    }

    pub fn snapshot(&self, parts: Parts) -> Stats {
        let Parts {
            retries,
            timeouts,
            started,
            load,
            cache,
            batches,
            queue_depth,
            model,
            memory,
            tracker_failures,
            replicas,
        } = parts;
        let secs = |c: &AtomicU64| c.load(Ordering::Relaxed) as f64 / 1e9;
        Stats {
            requests: self.requests.load(Ordering::Relaxed),
            texts: self.texts.load(Ordering::Relaxed),
            images: self.images.load(Ordering::Relaxed),
            coalesced: self.coalesced.load(Ordering::Relaxed),
            cache_invalid: self.cache_invalid.load(Ordering::Relaxed),
            batches: batches.batches,
            mean_batch_size: batches.mean_batch_size(),
            batch_sizes: batches.batch_sizes,
            queue_depth,
            errors: self
                .errors
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            retries,
            timeouts,
            latency_ms: self.latency.percentiles(),
            queue_wait_ms: self.queue_wait.percentiles(),
            latency_buckets: self.latency.buckets(LATENCY_BUCKETS_MS),
            queue_wait_buckets: self.queue_wait.buckets(LATENCY_BUCKETS_MS),
            inference_buckets: self.inference.buckets(LATENCY_BUCKETS_MS),
            tokenize_seconds: secs(&self.tokenize_ns),
            preprocess_seconds: secs(&self.preprocess_ns),
            inference_seconds: secs(&self.inference_ns),
            pooling_seconds: secs(&self.pooling_ns),
            uptime_seconds: started.elapsed().as_secs_f64(),
            load_seconds: load.as_secs_f64(),
            cache,
            model,
            memory,
            tracker_failures,
            replicas,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_known_latencies() {
        let h = LatencyHistogram::default();
        for ms in 1..=100 {
            h.record(Duration::from_millis(ms));
        }
        let p = h.percentiles();
        assert_eq!(p.count, 100);
        assert!((p.p50 - 50.0).abs() < 0.1, "{p:?}");
        assert!((p.p99 - 99.0).abs() < 0.1, "{p:?}");
        assert!((p.max - 100.0).abs() < 0.1, "{p:?}");
        assert_eq!(LatencyHistogram::default().percentiles(), Percentiles::default());
    }
}
