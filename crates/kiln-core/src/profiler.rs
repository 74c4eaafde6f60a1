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

    /// Writes the spans and samples kept so far as Chrome trace-event JSON (loads in
    /// Perfetto and chrome://tracing). `Ok(false)`: this profiler keeps no trace.
    fn write_trace(&self, _out: &mut dyn std::io::Write) -> crate::Result<bool> {
        Ok(false)
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
#[serde(default)]
pub struct ProfileReport {
    /// Seconds covered, from the profiler's start to the report.
    pub duration_s: f64,
    /// Statistics per span name.
    pub spans: BTreeMap<String, SpanStats>,
    /// Resource samples taken.
    pub samples: u64,
    /// Highest process resident memory seen, in bytes.
    pub peak_rss_bytes: Option<u64>,
    /// Highest system memory in use seen, in bytes.
    pub peak_system_memory_used_bytes: Option<u64>,
    /// System memory, in bytes.
    pub system_memory_total_bytes: Option<u64>,
    /// Mean process CPU use, in percent of one core (200 = two cores busy).
    pub mean_cpu_percent: Option<f64>,
    /// Highest GPU memory in use seen, in bytes, summed over GPUs.
    pub peak_gpu_memory_bytes: Option<u64>,
    /// Per NVIDIA GPU; empty without a driver.
    pub gpus: Vec<GpuReport>,
    /// Trace events not kept because `profiler.max_trace_events` was reached.
    pub trace_events_dropped: u64,
    /// The backend's own allocator, for providers that keep one (MLX); `None` for the
    /// others, whose device memory the GPU figures above already show.
    pub allocator: Option<AllocatorReport>,
}

/// What a backend's own allocator held ([`Provider::allocator_memory`](crate::Provider::allocator_memory)),
/// read when the report is made.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AllocatorReport {
    /// The provider's registered name.
    pub provider: String,
    /// Bytes in live tensors at the report.
    pub active_bytes: u64,
    /// The allocator's own high-water mark of live tensors (not sampled: MLX counts
    /// every allocation, from the process's start).
    pub peak_bytes: u64,
    /// Freed buffers the allocator keeps for reuse, at the report.
    pub cached_bytes: u64,
    /// Bytes the allocator gave back when the memory governor asked (0 with the
    /// governor off).
    pub released_bytes: u64,
}

/// What the sampler saw of one GPU.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GpuReport {
    /// NVML index.
    pub index: u32,
    /// Product name.
    pub name: String,
    /// Memory on the device, in bytes.
    pub memory_total_bytes: u64,
    /// Highest memory in use seen (by all processes), in bytes.
    pub peak_memory_used_bytes: u64,
    /// Mean utilisation, percent.
    pub mean_utilization_percent: Option<f64>,
    /// Highest temperature, degrees Celsius.
    pub max_temperature_c: Option<u32>,
    /// Mean power draw, watts.
    pub mean_power_w: Option<f64>,
    /// Samples taken of this GPU.
    pub samples: u64,
}

impl ProfileReport {
    /// The report as a Markdown table per span plus a line of resource peaks, as the
    /// stdout and TensorBoard trackers show it.
    pub fn to_markdown(&self) -> String {
        use std::fmt::Write;
        let mut out =
            String::from("| span | count | total ms | mean ms | p50 ms | p95 ms | p99 ms | max ms |\n");
        out.push_str("|---|---:|---:|---:|---:|---:|---:|---:|\n");
        for (name, s) in &self.spans {
            let _ = writeln!(
                out,
                "| {name} | {} | {:.1} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} |",
                s.count, s.total_ms, s.mean_ms, s.p50_ms, s.p95_ms, s.p99_ms, s.max_ms
            );
        }
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        let _ = write!(out, "\n{:.1} s, {} samples", self.duration_s, self.samples);
        if let Some(b) = self.peak_rss_bytes {
            let _ = write!(out, "; peak RSS {:.1} MiB", mib(b));
        }
        if let Some(c) = self.mean_cpu_percent {
            let _ = write!(out, "; mean CPU {c:.0}%");
        }
        if let Some(b) = self.peak_gpu_memory_bytes {
            let _ = write!(out, "; peak GPU memory {:.1} MiB", mib(b));
        }
        if let Some(a) = &self.allocator {
            let _ = write!(
                out,
                "\n\n{} allocator: peak {:.1} MiB, active {:.1} MiB, cached {:.1} MiB, released {:.1} MiB",
                a.provider,
                mib(a.peak_bytes),
                mib(a.active_bytes),
                mib(a.cached_bytes),
                mib(a.released_bytes)
            );
        }
        for g in &self.gpus {
            let _ = write!(
                out,
                "\n\nGPU {} ({}): peak {:.0} of {:.0} MiB",
                g.index,
                g.name,
                mib(g.peak_memory_used_bytes),
                mib(g.memory_total_bytes)
            );
            if let Some(u) = g.mean_utilization_percent {
                let _ = write!(out, ", mean utilisation {u:.0}%");
            }
            if let Some(t) = g.max_temperature_c {
                let _ = write!(out, ", max {t} °C");
            }
            if let Some(p) = g.mean_power_w {
                let _ = write!(out, ", mean {p:.0} W");
            }
        }
        out.push('\n');
        out
    }
}
