//! The [`Profiler`] trait: where the time of each stage goes.
//!
//! # Design
//!
//! Stages are timed with [`Span`] guards: `let _s = profiler.span("tokenize");` records
//! from creation until drop. A span only reads the clock twice and calls
//! [`Profiler::record`] once, so spans can stay on in production; what a profiler does
//! with the records (aggregate, keep a trace, sample memory in the background) is its
//! own business. Every hook but `record` has a default, and `span` lives on
//! `dyn Profiler` so the trait stays object safe and callers hold `Arc<dyn Profiler>`.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Receives timed spans and produces a report.
///
/// ```
/// use std::sync::{Arc, Mutex};
/// use std::time::{Duration, Instant};
/// use kiln_core::Profiler;
///
/// /// Remembers the names of spans.
/// #[derive(Default)]
/// struct Names(Mutex<Vec<String>>);
/// impl Profiler for Names {
///     fn record(&self, name: &str, _start: Instant, _elapsed: Duration) {
///         self.0.lock().unwrap().push(name.to_string());
///     }
/// }
///
/// let names = Arc::new(Names::default());
/// let profiler: Arc<dyn Profiler> = names.clone();
/// {
///     let _span = profiler.span("image_processing");
/// }
/// assert_eq!(*names.0.lock().unwrap(), ["image_processing"]);
/// ```
pub trait Profiler: Send + Sync + 'static {
    /// A span called `name` started at `start` and lasted `elapsed`.
    fn record(&self, name: &str, start: Instant, elapsed: Duration);

    /// Takes one resource sample (memory, CPU, GPU); called on an interval by the runtime.
    fn sample(&self) {}

    /// What was recorded so far.
    fn report(&self) -> ProfileReport {
        ProfileReport::default()
    }
}

impl dyn Profiler {
    /// Starts a span that is recorded when the returned guard drops.
    pub fn span(&self, name: impl Into<Cow<'static, str>>) -> Span<'_> {
        Span { profiler: self, name: name.into(), start: Instant::now() }
    }
}

/// A running span; records itself into its profiler on drop.
#[must_use = "a span records when dropped; bind it with `let _span = ...`"]
pub struct Span<'a> {
    profiler: &'a dyn Profiler,
    name: Cow<'static, str>,
    start: Instant,
}

impl Drop for Span<'_> {
    fn drop(&mut self) {
        self.profiler.record(&self.name, self.start, self.start.elapsed());
    }
}

/// A profiler that records nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoopProfiler;

impl Profiler for NoopProfiler {
    fn record(&self, _name: &str, _start: Instant, _elapsed: Duration) {}
}

/// Timing statistics of one span name, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SpanStats {
    /// How many spans of this name were recorded.
    pub count: u64,
    /// Sum of their durations.
    pub total_ms: f64,
    /// Mean duration.
    pub mean_ms: f64,
    /// Median.
    pub p50_ms: f64,
    /// 95th percentile.
    pub p95_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Longest.
    pub max_ms: f64,
}

/// What a profiler reports.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProfileReport {
    /// Statistics per span name.
    pub spans: BTreeMap<String, SpanStats>,
    /// Highest process resident memory seen, in bytes.
    pub peak_rss_bytes: Option<u64>,
    /// Highest GPU memory in use seen, in bytes.
    pub peak_gpu_memory_bytes: Option<u64>,
    /// Mean process CPU use, in percent of one core.
    pub mean_cpu_percent: Option<f64>,
}
