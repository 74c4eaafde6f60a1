//! Counters the optimizer keeps, and the snapshot [`Stats`] it reports.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kiln_core::{CacheStats, Error, ModelInfo};
use serde::Serialize;

/// A snapshot of what the optimizer has done, serialisable to JSON.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    /// Calls to `embed` / `infer`.
    pub requests: u64,
    /// Texts embedded.
    pub texts: u64,
    /// Model runs (batches).
    pub batches: u64,
    /// Failed requests by error kind (`invalid_input`, `backend`, ...).
    pub errors: BTreeMap<String, u64>,
    /// Time in tokenization, seconds.
    pub tokenize_seconds: f64,
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
}

#[derive(Default)]
pub(crate) struct Counters {
    pub requests: AtomicU64,
    pub texts: AtomicU64,
    pub batches: AtomicU64,
    tokenize_ns: AtomicU64,
    inference_ns: AtomicU64,
    pooling_ns: AtomicU64,
    errors: Mutex<BTreeMap<&'static str, u64>>,
}

pub(crate) enum Stage {
    Tokenize,
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
            Stage::Inference => &self.inference_ns,
            Stage::Pooling => &self.pooling_ns,
        };
        Self::add(counter, elapsed.as_nanos() as u64);
    }

    pub fn error(&self, error: &Error) {
        *self.errors.lock().unwrap_or_else(|p| p.into_inner()).entry(error.kind()).or_default() += 1;
    }

    pub fn snapshot(&self, started: Instant, load: Duration, cache: CacheStats, model: ModelInfo) -> Stats {
        let secs = |c: &AtomicU64| c.load(Ordering::Relaxed) as f64 / 1e9;
        Stats {
            requests: self.requests.load(Ordering::Relaxed),
            texts: self.texts.load(Ordering::Relaxed),
            batches: self.batches.load(Ordering::Relaxed),
            errors: self
                .errors
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            tokenize_seconds: secs(&self.tokenize_ns),
            inference_seconds: secs(&self.inference_ns),
            pooling_seconds: secs(&self.pooling_ns),
            uptime_seconds: started.elapsed().as_secs_f64(),
            load_seconds: load.as_secs_f64(),
            cache,
            model,
        }
    }
}
