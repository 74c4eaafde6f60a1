//! `stdout`: a compact line per step and a summary table at the end.

use std::io::Write;

use kiln_core::{Clip, Metrics, ProfileReport, Result, Tracker, TrackerSetup};
use serde::Deserialize;

/// Which stream the lines go to.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    /// Standard output.
    #[default]
    Stdout,
    /// Standard error (when standard output carries results).
    Stderr,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    #[serde(default)]
    stream: Stream,
}

/// Prints to the terminal. Writes are line-buffered by the stream itself.
pub struct StdoutTracker {
    stream: Stream,
    run_name: String,
}

impl StdoutTracker {
    /// A tracker printing to `stream`, naming `run_name` in its lines.
    pub fn new(stream: Stream, run_name: impl Into<String>) -> Self {
        StdoutTracker { stream, run_name: run_name.into() }
    }

    fn write(&self, text: &str) -> Result<()> {
        let result = match self.stream {
            Stream::Stdout => std::io::stdout().lock().write_all(text.as_bytes()),
            Stream::Stderr => std::io::stderr().lock().write_all(text.as_bytes()),
        };
        result.map_err(|e| kiln_core::Error::io("writing to", format!("{:?}", self.stream).to_lowercase(), e))
    }
}

pub(crate) fn build(setup: &TrackerSetup) -> Result<Box<dyn Tracker>> {
    let options: Options = setup.options()?;
    Ok(Box::new(StdoutTracker::new(options.stream, &setup.run_name)))
}

/// The step line: the figures an operator scans for, in a fixed order.
pub(crate) fn step_line(run: &str, step: u64, m: &Metrics) -> String {
    let get = |k: &str| m.get(k).copied();
    let mut parts = vec![format!("[{run}] step {step}")];
    if let (Some(r), Some(t)) = (get("throughput_rps"), get("rows_per_s")) {
        parts.push(format!("{r:.1} req/s {t:.1} rows/s"));
    }
    if let (Some(p50), Some(p99)) = (get("latency_p50_ms"), get("latency_p99_ms")) {
        parts.push(format!("p50 {p50:.2} ms p99 {p99:.2} ms"));
    }
    if let Some(b) = get("mean_batch_size") {
        parts.push(format!("batch {b:.1}"));
    }
    if let Some(c) = get("cache_hit_rate") {
        parts.push(format!("cache {:.0}%", c * 100.0));
    }
    if let Some(q) = get("queue_depth") {
        parts.push(format!("queue {q:.0}"));
    }
    if let Some(r) = get("rss_mib") {
        parts.push(format!("rss {r:.0} MiB"));
    }
    if let Some(e) = get("errors") {
        parts.push(format!("errors {e:.0}"));
    }
    let known = [
        "throughput_rps",
        "texts_per_s",
        "rows_per_s",
        "latency_p50_ms",
        "latency_p95_ms",
        "latency_p99_ms",
        "mean_batch_size",
        "cache_hit_rate",
        "queue_depth",
        "rss_mib",
        "errors",
        "errors_total",
        "system_memory_used_fraction",
    ];
    // Metrics of custom sources still show, after the known ones.
    for (k, v) in m.iter().filter(|(k, _)| !known.contains(&k.as_str())) {
        parts.push(format!("{k} {v}"));
    }
    parts.join(" | ") + "\n"
}

/// A two-column table, names left, values right-aligned.
pub(crate) fn summary_table(title: &str, m: &Metrics) -> String {
    let width = m.keys().map(String::len).max().unwrap_or(0).max(6);
    let mut out = format!("{title}\n");
    for (k, v) in m {
        let value = if v.fract() == 0.0 && v.abs() < 1e15 { format!("{v:.0}") } else { format!("{v:.4}") };
        out.push_str(&format!("  {k:<width$}  {value:>14}\n"));
    }
    out
}

impl Tracker for StdoutTracker {
    fn log_metrics(&mut self, step: u64, metrics: &Metrics) -> Result<()> {
        self.write(&step_line(&self.run_name, step, metrics))
    }

    fn log_summary(&mut self, summary: &Metrics) -> Result<()> {
        self.write(&summary_table(&format!("[{}] summary", self.run_name), summary))
    }

    fn log_profile(&mut self, report: &ProfileReport) -> Result<()> {
        self.write(&format!("[{}] profile\n{}", self.run_name, report.to_markdown()))
    }

    fn log_video(&mut self, step: u64, tag: &str, clip: &Clip<'_>) -> Result<()> {
        self.write(&format!(
            "[{}] step {step} | video {tag}: {} frames {}x{} at {} fps ({} KiB GIF)\n",
            self.run_name,
            clip.frames,
            clip.width,
            clip.height,
            clip.fps,
            clip.gif.len().div_ceil(1024)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_step_line_has_the_operator_figures() {
        let m = Metrics::from([
            ("throughput_rps".into(), 812.0),
            ("rows_per_s".into(), 3248.25),
            ("latency_p50_ms".into(), 3.1),
            ("latency_p99_ms".into(), 9.8),
            ("cache_hit_rate".into(), 0.61),
            ("my_metric".into(), 2.0),
        ]);
        let line = step_line("run", 3, &m);
        assert_eq!(
            line,
            "[run] step 3 | 812.0 req/s 3248.2 rows/s | p50 3.10 ms p99 9.80 ms | cache 61% | my_metric 2\n"
        );
        let table = summary_table("s", &Metrics::from([("requests".into(), 42.0), ("p".into(), 0.5)]));
        assert!(table.contains("requests              42") && table.contains("0.5000"), "{table}");
    }
}
