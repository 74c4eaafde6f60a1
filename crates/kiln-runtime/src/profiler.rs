//! [`SamplingProfiler`]: span statistics, resource figures from the monitor, a JSON report
//! and a Chrome trace.
//!
//! Recording a span costs one uncontended lock and a histogram increment (80–190 ns
//! in the criterion bench, by machine; docs/benchmarks.md),
//! so the optimizer leaves spans on around every stage. The trace (every span and
//! sample, for Perfetto) is kept only when asked for, up to `profiler.max_trace_events`.
//! Resource figures come from a [`ResourceMonitor`] (sysinfo for memory and CPU, NVML
//! for NVIDIA GPUs, loaded at run time, so a machine without a driver just has no GPU
//! figures): the optimizer's one monitor, or one of its own when started alone.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use kiln_core::{Error, GpuReport, ProfileReport, Profiler, ProfilerConfig, Result, SpanStats};
use serde_json::json;

use crate::devices::GpuDevice;
use crate::monitor::{Reading, ResourceMonitor, Subscription};

static NEXT_THREAD: AtomicU64 = AtomicU64::new(1);
thread_local! {
    /// A small per-thread number for trace events (OS thread ids are not portable).
    static THREAD: u64 = NEXT_THREAD.fetch_add(1, Ordering::Relaxed);
}

/// The profiler the optimizer uses when `profiler.enabled` is on.
///
/// ```
/// use kiln_core::{Profiler, ProfilerConfig};
/// use kiln_runtime::SamplingProfiler;
///
/// let profiler = SamplingProfiler::start(ProfilerConfig { trace: true, ..Default::default() });
/// {
///     let _span = (&*profiler as &dyn Profiler).span("image_processing");
/// }
/// let report = profiler.report();
/// assert_eq!(report.spans["image_processing"].count, 1);
/// assert!(report.peak_rss_bytes.unwrap() > 0);
/// let mut trace = Vec::new();
/// assert!(profiler.write_trace(&mut trace)?);
/// # Ok::<(), kiln_core::Error>(())
/// ```
pub struct SamplingProfiler {
    epoch: Instant,
    config: ProfilerConfig,
    spans: Mutex<Spans>,
    resources: Mutex<Resources>,
    monitor: Arc<ResourceMonitor>,
    subscription: Mutex<Option<Subscription>>,
}

#[derive(Default)]
struct Spans {
    by_name: HashMap<Box<str>, SpanAgg>,
    events: Vec<Event>,
    dropped: u64,
    threads: HashMap<u64, String>,
}

struct SpanAgg {
    name: Arc<str>,
    /// Nanoseconds; sub-microsecond stages (cache lookups) keep their resolution.
    histogram: Histogram<u64>,
    total_ns: u128,
}

struct Event {
    name: Arc<str>,
    start_ns: u64,
    duration_ns: u64,
    thread: u64,
}

impl SamplingProfiler {
    /// Creates the profiler with a resource monitor of its own, sampling every
    /// `sample_interval_ms` (a first reading at once) until the profiler is dropped or
    /// [`stop`](Self::stop)ped.
    pub fn start(config: ProfilerConfig) -> Arc<Self> {
        let monitor = ResourceMonitor::start(Duration::from_millis(config.sample_interval_ms));
        Self::with_monitor(config, monitor)
    }

    /// Creates the profiler on a shared monitor: it aggregates every reading the
    /// monitor's thread takes, at the monitor's interval.
    pub fn with_monitor(config: ProfilerConfig, monitor: Arc<ResourceMonitor>) -> Arc<Self> {
        let profiler = Arc::new(SamplingProfiler {
            epoch: Instant::now(),
            resources: Mutex::new(Resources::new(config.trace)),
            config,
            spans: Mutex::new(Spans::default()),
            monitor: monitor.clone(),
            subscription: Mutex::new(None),
        });
        // The reading before this one may be a tick old; the run starts now.
        profiler.record_reading(&monitor.sample_now());
        let weak: Weak<SamplingProfiler> = Arc::downgrade(&profiler);
        let subscription = monitor.subscribe(move |reading| {
            if let Some(p) = weak.upgrade() {
                p.record_reading(reading);
            }
        });
        *lock(&profiler.subscription) = Some(subscription);
        profiler
    }

    /// Stops taking resource readings; spans still record. Idempotent.
    pub fn stop(&self) {
        lock(&self.subscription).take();
    }

    fn record_reading(&self, reading: &Reading) {
        let at_ns = reading.at.saturating_duration_since(self.epoch).as_nanos() as u64;
        lock(&self.resources).record(reading, at_ns, self.config.max_trace_events);
    }

    fn span_stats(&self) -> (std::collections::BTreeMap<String, SpanStats>, u64) {
        let spans = lock(&self.spans);
        let ms = |ns: u64| ns as f64 / 1e6;
        let stats = spans
            .by_name
            .iter()
            .map(|(name, agg)| {
                let h = &agg.histogram;
                let stats = SpanStats {
                    count: h.len(),
                    total_ms: agg.total_ns as f64 / 1e6,
                    mean_ms: agg.total_ns as f64 / 1e6 / h.len().max(1) as f64,
                    p50_ms: ms(h.value_at_quantile(0.50)),
                    p95_ms: ms(h.value_at_quantile(0.95)),
                    p99_ms: ms(h.value_at_quantile(0.99)),
                    max_ms: ms(h.max()),
                };
                (name.to_string(), stats)
            })
            .collect();
        (stats, spans.dropped)
    }
}

impl Profiler for SamplingProfiler {
    fn record(&self, name: &str, start: Instant, elapsed: Duration) {
        let duration_ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        let thread = if self.config.trace { THREAD.with(|t| *t) } else { 0 };
        let mut spans = lock(&self.spans);
        let agg = match spans.by_name.get_mut(name) {
            Some(agg) => agg,
            None => spans.by_name.entry(name.into()).or_insert_with(|| SpanAgg {
                name: name.into(),
                histogram: Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("valid bounds"),
                total_ns: 0,
            }),
        };
        agg.histogram.saturating_record(duration_ns.max(1));
        agg.total_ns += u128::from(duration_ns);
        if self.config.trace {
            let name = agg.name.clone();
            if spans.events.len() >= self.config.max_trace_events {
                spans.dropped += 1;
                return;
            }
            let start_ns = start.saturating_duration_since(self.epoch).as_nanos() as u64;
            spans.events.push(Event { name, start_ns, duration_ns, thread });
            spans.threads.entry(thread).or_insert_with(|| {
                std::thread::current().name().map_or_else(|| format!("thread {thread}"), str::to_string)
            });
        }
    }

    fn report(&self) -> ProfileReport {
        // The state at the end counts too, however short the run.
        self.record_reading(&self.monitor.sample_now());
        let (spans, dropped) = self.span_stats();
        let r = lock(&self.resources);
        let gpus: Vec<GpuReport> = r.gpus.iter().map(GpuAgg::report).collect();
        ProfileReport {
            duration_s: self.epoch.elapsed().as_secs_f64(),
            spans,
            samples: r.samples,
            peak_rss_bytes: (r.peak_rss > 0).then_some(r.peak_rss),
            peak_system_memory_used_bytes: (r.peak_system_used > 0).then_some(r.peak_system_used),
            system_memory_total_bytes: (r.system_total > 0).then_some(r.system_total),
            mean_cpu_percent: (r.cpu_samples > 0).then(|| r.cpu_sum / r.cpu_samples as f64),
            peak_gpu_memory_bytes: (!gpus.is_empty()).then_some(r.peak_gpu_used),
            gpus,
            trace_events_dropped: dropped,
            allocator: None,
        }
    }

    fn write_trace(&self, out: &mut dyn Write) -> Result<bool> {
        if !self.config.trace {
            return Ok(false);
        }
        let io = |e: std::io::Error| Error::io("writing", "the Chrome trace", e);
        let pid = std::process::id();
        let us = |ns: u64| ns as f64 / 1000.0;
        let mut first = true;
        let mut event = |out: &mut dyn Write, value: serde_json::Value| -> std::io::Result<()> {
            out.write_all(if first { b"\n" } else { b",\n" })?;
            first = false;
            serde_json::to_writer(&mut *out, &value).map_err(std::io::Error::other)
        };
        out.write_all(b"{\"displayTimeUnit\":\"ms\",\"traceEvents\":[").map_err(io)?;
        event(
            out,
            json!({"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": "kiln"}}),
        )
        .map_err(io)?;
        {
            let spans = lock(&self.spans);
            let lanes = assign_lanes(&spans.events);
            let mut named = std::collections::BTreeSet::new();
            for (e, &tid) in spans.events.iter().zip(&lanes) {
                if named.insert(tid) {
                    let (thread, lane) = (tid / LANES, tid % LANES);
                    let base =
                        spans.threads.get(&thread).cloned().unwrap_or_else(|| format!("thread {thread}"));
                    let name = if lane == 0 { base } else { format!("{base} (overlap {lane})") };
                    event(out, json!({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": name}}))
                        .map_err(io)?;
                    event(
                        out,
                        json!({"name": "thread_sort_index", "ph": "M", "pid": pid, "tid": tid, "args": {"sort_index": tid}}),
                    )
                    .map_err(io)?;
                }
                event(
                    out,
                    json!({"name": &*e.name, "cat": "kiln", "ph": "X", "ts": us(e.start_ns),
                           "dur": us(e.duration_ns), "pid": pid, "tid": tid}),
                )
                .map_err(io)?;
            }
        }
        let r = lock(&self.resources);
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        for s in &r.trace {
            let ts = us(s.at_ns);
            event(
                out,
                json!({"name": "memory", "ph": "C", "ts": ts, "pid": pid,
                       "args": {"rss_mib": mib(s.rss), "system_used_mib": mib(s.system_used)}}),
            )
            .map_err(io)?;
            if let Some(cpu) = s.cpu {
                event(
                    out,
                    json!({"name": "cpu", "ph": "C", "ts": ts, "pid": pid, "args": {"process_percent": cpu}}),
                )
                .map_err(io)?;
            }
            for g in &s.gpus {
                let mut args = serde_json::Map::new();
                args.insert("memory_used_mib".into(), json!(mib(g.memory.used)));
                for (key, value) in [
                    ("utilization_percent", g.utilization_percent.map(f64::from)),
                    ("temperature_c", g.temperature_c.map(f64::from)),
                    ("power_w", g.power_w),
                ] {
                    if let Some(v) = value {
                        args.insert(key.into(), json!(v));
                    }
                }
                event(
                    out,
                    json!({"name": format!("gpu{}", gpu_index(g)), "ph": "C", "ts": ts, "pid": pid, "args": args}),
                )
                .map_err(io)?;
            }
        }
        out.write_all(b"\n]}\n").map_err(io)?;
        Ok(true)
    }
}

/// Synthetic trace tids: `thread * LANES + lane`.
const LANES: u64 = 1000;

/// Spans recorded on one OS thread can overlap without nesting (async tasks interleave
/// on tokio's threads), which trace viewers draw wrongly or drop. Each span goes to the
/// first lane of its thread where it either follows or nests inside what is open, so
/// every lane is a proper stack; lane 0 keeps the thread's own row.
fn assign_lanes(events: &[Event]) -> Vec<u64> {
    let mut order: Vec<usize> = (0..events.len()).collect();
    order.sort_by_key(|&i| (events[i].thread, events[i].start_ns, std::cmp::Reverse(events[i].duration_ns)));
    let mut tids = vec![0; events.len()];
    let mut lanes: Vec<Vec<u64>> = Vec::new(); // open end times per lane of the current thread
    let mut current = None;
    for i in order {
        let e = &events[i];
        if current != Some(e.thread) {
            current = Some(e.thread);
            lanes.clear();
        }
        let end = e.start_ns + e.duration_ns;
        let mut chosen = None;
        for (lane, open) in lanes.iter_mut().enumerate() {
            while open.last().is_some_and(|&top| top <= e.start_ns) {
                open.pop();
            }
            if open.last().is_none_or(|&top| top >= end) {
                chosen = Some(lane);
                break;
            }
        }
        let lane = chosen.unwrap_or_else(|| {
            lanes.push(Vec::new());
            lanes.len() - 1
        });
        lanes[lane].push(end);
        tids[i] = e.thread * LANES + (lane as u64).min(LANES - 1);
    }
    tids
}

/// Resource figures: the aggregates, and (when tracing) every sample.
struct Resources {
    samples: u64,
    peak_rss: u64,
    peak_system_used: u64,
    system_total: u64,
    cpu_sum: f64,
    cpu_samples: u64,
    peak_gpu_used: u64,
    gpus: Vec<GpuAgg>,
    keep_trace: bool,
    trace: Vec<Sample>,
}

struct Sample {
    at_ns: u64,
    rss: u64,
    system_used: u64,
    cpu: Option<f64>,
    gpus: Vec<GpuDevice>,
}

#[derive(Default)]
struct GpuAgg {
    index: u32,
    name: String,
    memory_total: u64,
    peak_used: u64,
    samples: u64,
    utilization: (f64, u64),
    max_temperature: Option<u32>,
    power: (f64, u64),
}

impl GpuAgg {
    fn report(&self) -> GpuReport {
        let mean = |(sum, n): (f64, u64)| (n > 0).then(|| sum / n as f64);
        GpuReport {
            index: self.index,
            name: self.name.clone(),
            memory_total_bytes: self.memory_total,
            peak_memory_used_bytes: self.peak_used,
            mean_utilization_percent: mean(self.utilization),
            max_temperature_c: self.max_temperature,
            mean_power_w: mean(self.power),
            samples: self.samples,
        }
    }
}

impl Resources {
    fn new(keep_trace: bool) -> Self {
        Resources {
            samples: 0,
            peak_rss: 0,
            peak_system_used: 0,
            system_total: 0,
            cpu_sum: 0.0,
            cpu_samples: 0,
            peak_gpu_used: 0,
            gpus: Vec::new(),
            keep_trace,
            trace: Vec::new(),
        }
    }

    fn record(&mut self, reading: &Reading, at_ns: u64, max_trace: usize) {
        let memory = &reading.memory;
        self.system_total = memory.system.total;
        let sample = Sample {
            at_ns,
            rss: memory.process_rss,
            system_used: memory.system.used,
            cpu: memory.process_cpu_percent,
            gpus: reading.gpus.clone(),
        };
        self.record_gpus(&sample.gpus);
        self.samples += 1;
        self.peak_rss = self.peak_rss.max(sample.rss);
        self.peak_system_used = self.peak_system_used.max(sample.system_used);
        if let Some(cpu) = sample.cpu {
            self.cpu_sum += cpu;
            self.cpu_samples += 1;
        }
        if self.keep_trace && self.trace.len() < max_trace {
            self.trace.push(sample);
        }
    }

    fn record_gpus(&mut self, gpus: &[GpuDevice]) {
        let mut used_total = 0;
        for g in gpus {
            let index = gpu_index(g);
            if self.gpus.iter().all(|a| a.index != index) {
                self.gpus.push(GpuAgg {
                    index,
                    name: g.name.clone(),
                    memory_total: g.memory.total,
                    ..GpuAgg::default()
                });
            }
            let agg = self.gpus.iter_mut().find(|a| a.index == index).expect("added above");
            agg.samples += 1;
            agg.peak_used = agg.peak_used.max(g.memory.used);
            if let Some(u) = g.utilization_percent {
                agg.utilization = (agg.utilization.0 + f64::from(u), agg.utilization.1 + 1);
            }
            if let Some(t) = g.temperature_c {
                agg.max_temperature = Some(agg.max_temperature.map_or(t, |m| m.max(t)));
            }
            if let Some(p) = g.power_w {
                agg.power = (agg.power.0 + p, agg.power.1 + 1);
            }
            used_total += g.memory.used;
        }
        self.peak_gpu_used = self.peak_gpu_used.max(used_total);
    }
}

/// The NVML index of a GPU reading (`cuda:N`).
fn gpu_index(g: &GpuDevice) -> u32 {
    match g.device {
        kiln_core::Device::Cuda(n) => n as u32,
        _ => 0,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(thread: u64, start: u64, end: u64) -> Event {
        Event { name: "s".into(), start_ns: start, duration_ns: end - start, thread }
    }

    #[test]
    fn overlapping_spans_get_lanes_nested_ones_share() {
        // request [0,100) holds tokenize [10,20); another request [50,150) overlaps the
        // first without nesting, so it needs a lane of its own.
        let events = [ev(1, 0, 100), ev(1, 10, 20), ev(1, 50, 150), ev(1, 200, 210), ev(2, 0, 100)];
        let tids = assign_lanes(&events);
        assert_eq!(tids, [1000, 1000, 1001, 1000, 2000]);
    }

    #[test]
    fn report_counts_spans_and_percentiles() {
        let p = SamplingProfiler::start(ProfilerConfig::default());
        let now = Instant::now();
        for ms in 1..=100 {
            p.record("stage", now, Duration::from_millis(ms));
        }
        let r = p.report();
        let s = &r.spans["stage"];
        assert_eq!(s.count, 100);
        assert!((s.p50_ms - 50.0).abs() < 0.1 && (s.p99_ms - 99.0).abs() < 0.1, "{s:?}");
        assert!((s.total_ms - 5050.0).abs() < 1.0 && (s.mean_ms - 50.5).abs() < 0.01, "{s:?}");
        assert!(r.samples >= 1, "report takes a sample, however short the run: {r:?}");
        assert!(r.peak_rss_bytes.unwrap() > 1 << 20);
        let mut out = Vec::new();
        assert!(!p.write_trace(&mut out).unwrap(), "no trace unless asked for");
    }

    #[test]
    fn the_trace_is_bounded() {
        let p = SamplingProfiler::start(ProfilerConfig {
            trace: true,
            max_trace_events: 3,
            ..Default::default()
        });
        for _ in 0..5 {
            p.record("x", Instant::now(), Duration::from_micros(1));
        }
        assert_eq!(p.report().trace_events_dropped, 2);
        let mut out = Vec::new();
        assert!(p.write_trace(&mut out).unwrap());
        let trace: serde_json::Value = serde_json::from_slice(&out).unwrap();
        let spans = trace["traceEvents"].as_array().unwrap().iter().filter(|e| e["ph"] == "X").count();
        assert_eq!(spans, 3);
        p.stop();
        p.stop();
    }
}
