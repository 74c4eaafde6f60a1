//! `GET /metrics`: Prometheus' text format, written from [`kiln::Stats`] (no second
//! bookkeeping): counters, gauges, and histograms — request latency, queue wait and
//! model time per item at kiln's fixed buckets (so replicas aggregate with
//! `histogram_quantile`), and the batch size.

use std::fmt::Write;
use std::sync::Arc;

use axum::extract::State as Shared;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use crate::State;

/// Appends one metric family.
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{labels} {value}");
    }
}

fn one(value: f64) -> Vec<(String, f64)> {
    vec![(String::new(), value)]
}

/// A latency histogram from kiln's buckets (milliseconds in, seconds out).
fn histogram(out: &mut String, name: &str, help: &str, b: &kiln::runtime::Buckets) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    for (le, n) in b.le_ms.iter().zip(&b.cumulative) {
        let _ = writeln!(out, "{name}_bucket{{le=\"{}\"}} {n}", le / 1000.0);
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", b.count);
    let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", b.sum_ms / 1000.0, b.count);
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The text of every metric.
pub fn render(stats: &kiln::Stats, model: &str) -> String {
    let mut out = String::new();
    let s = stats;
    let info = format!(
        "{{model=\"{}\",provider=\"{}\",device=\"{}\",dtype=\"{}\"}}",
        escape(model),
        escape(&s.model.provider),
        s.model.device,
        s.model.dtype
    );
    family(&mut out, "kiln_model_info", "gauge", "The model served (labels).", &[(info, 1.0)]);
    family(&mut out, "kiln_requests_total", "counter", "Requests accepted.", &one(s.requests as f64));
    family(&mut out, "kiln_texts_total", "counter", "Texts embedded.", &one(s.texts as f64));
    family(&mut out, "kiln_images_total", "counter", "Images classified.", &one(s.images as f64));
    family(&mut out, "kiln_batches_total", "counter", "Batches run by the model.", &one(s.batches as f64));
    let errors: Vec<(String, f64)> =
        s.errors.iter().map(|(kind, n)| (format!("{{kind=\"{}\"}}", escape(kind)), *n as f64)).collect();
    family(&mut out, "kiln_errors_total", "counter", "Failed requests by kind.", &errors);
    family(&mut out, "kiln_retries_total", "counter", "Retried batches.", &one(s.retries as f64));
    family(
        &mut out,
        "kiln_timeouts_total",
        "counter",
        "Requests past their deadline.",
        &one(s.timeouts as f64),
    );
    family(&mut out, "kiln_queue_depth", "gauge", "Requests waiting or running.", &one(s.queue_depth as f64));
    histogram(&mut out, "kiln_request_latency_seconds", "From submission to answer.", &s.latency_buckets);
    histogram(
        &mut out,
        "kiln_queue_wait_seconds",
        "From submission to the batch's start.",
        &s.queue_wait_buckets,
    );
    histogram(
        &mut out,
        "kiln_inference_item_seconds",
        "Model time per item: its batch's run time over the batch's size.",
        &s.inference_buckets,
    );
    let _ = writeln!(out, "# HELP kiln_batch_size Items per batch.\n# TYPE kiln_batch_size histogram");
    let (mut seen, mut sum) = (0u64, 0f64);
    for (size, n) in &s.batch_sizes {
        seen += n;
        sum += (*size as u64 * n) as f64;
        let _ = writeln!(out, "kiln_batch_size_bucket{{le=\"{size}\"}} {seen}");
    }
    let _ = writeln!(
        out,
        "kiln_batch_size_bucket{{le=\"+Inf\"}} {seen}\nkiln_batch_size_sum {sum}\nkiln_batch_size_count {seen}"
    );
    for (name, help, v) in [
        ("kiln_tokenize_seconds_total", "Time tokenizing.", s.tokenize_seconds),
        ("kiln_preprocess_seconds_total", "Time pre-processing images.", s.preprocess_seconds),
        ("kiln_inference_seconds_total", "Time in the model.", s.inference_seconds),
        ("kiln_pooling_seconds_total", "Time pooling on the host.", s.pooling_seconds),
    ] {
        family(&mut out, name, "counter", help, &one(v));
    }
    family(&mut out, "kiln_cache_hits_total", "counter", "Result cache hits.", &one(s.cache.hits as f64));
    family(
        &mut out,
        "kiln_cache_misses_total",
        "counter",
        "Result cache misses.",
        &one(s.cache.misses as f64),
    );
    family(
        &mut out,
        "kiln_cache_entries",
        "gauge",
        "Entries in the result cache.",
        &one(s.cache.entries as f64),
    );
    family(&mut out, "kiln_cache_bytes", "gauge", "Bytes in the result cache.", &one(s.cache.bytes as f64));
    if let Some(up) = s.cache.remote_up {
        let c = &s.cache;
        for (name, help, v) in [
            ("kiln_cache_remote_hits_total", "Hits the shared tier (Redis) answered.", c.remote_hits),
            ("kiln_cache_remote_writes_total", "Entries written to the shared tier.", c.remote_writes),
            (
                "kiln_cache_remote_errors_total",
                "Failed calls to the shared tier, each answered from this replica instead.",
                c.remote_errors,
            ),
            (
                "kiln_cache_remote_skipped_writes_total",
                "Entries not written to the shared tier (down, or its queue full).",
                c.remote_skipped_writes,
            ),
        ] {
            family(&mut out, name, "counter", help, &one(v as f64));
        }
        family(
            &mut out,
            "kiln_cache_remote_up",
            "gauge",
            "1 while the shared tier answers, 0 while this replica serves from its own tier.",
            &one(f64::from(u8::from(up))),
        );
    }
    family(
        &mut out,
        "kiln_coalesced_total",
        "counter",
        "Texts answered by a concurrent run.",
        &one(s.coalesced as f64),
    );
    family(&mut out, "kiln_uptime_seconds", "gauge", "Since the optimizer started.", &one(s.uptime_seconds));
    family(
        &mut out,
        "kiln_model_load_seconds",
        "gauge",
        "Loading and warming the model.",
        &one(s.load_seconds),
    );
    if let Some(m) = &s.memory {
        family(
            &mut out,
            "kiln_peak_rss_bytes",
            "gauge",
            "Highest resident memory.",
            &one(m.peak_rss_bytes as f64),
        );
        family(&mut out, "kiln_memory_used_ratio", "gauge", "System memory in use.", &one(m.used_fraction));
        family(
            &mut out,
            "kiln_gpu_memory_used_ratio",
            "gauge",
            "Fullest GPU's memory in use.",
            &one(m.gpu_used_fraction),
        );
        family(
            &mut out,
            "kiln_peak_gpu_used_bytes",
            "gauge",
            "Highest GPU memory in use.",
            &one(m.peak_gpu_used_bytes as f64),
        );
        family(
            &mut out,
            "kiln_memory_pressure_total",
            "counter",
            "Samples above the high watermark.",
            &one(m.pressure_events as f64),
        );
    }
    out
}

/// The text of every metric of a generate-task server.
pub fn render_generation(s: &kiln::runtime::GenerationStats, model: &str) -> String {
    let mut out = String::new();
    let info = format!("{{model=\"{}\"}}", escape(model));
    family(&mut out, "kiln_model_info", "gauge", "The model served (labels).", &[(info, 1.0)]);
    for (name, help, v) in [
        ("kiln_generate_requests_total", "Generation requests accepted.", s.requests),
        ("kiln_generate_rejected_total", "Requests refused with a full queue.", s.rejected),
        ("kiln_generate_completed_total", "Sequences that ended normally.", s.completed),
        ("kiln_generate_cancelled_total", "Sequences whose caller went away.", s.cancelled),
        ("kiln_generate_failed_total", "Sequences that failed.", s.failed),
        ("kiln_generate_prompt_tokens_total", "Prompt tokens prefilled.", s.prompt_tokens),
        ("kiln_generate_tokens_total", "Tokens generated.", s.generated_tokens),
        ("kiln_generate_steps_total", "Generator steps.", s.steps),
    ] {
        family(&mut out, name, "counter", help, &one(v as f64));
    }
    for (name, help, v) in [
        ("kiln_generate_running", "Sequences running now.", s.running as f64),
        ("kiln_generate_waiting", "Requests waiting for a slot.", s.waiting as f64),
        ("kiln_generate_sequences_per_step", "Mean sequences per step.", s.mean_sequences_per_step),
        ("kiln_generate_kv_cache_bytes", "KV-cache bytes held now.", s.kv_cache_bytes as f64),
        ("kiln_generate_ttft_p50_seconds", "Time to first token, median.", s.ttft_ms[0] / 1000.0),
        ("kiln_generate_ttft_p99_seconds", "Time to first token, 99th percentile.", s.ttft_ms[1] / 1000.0),
        ("kiln_generate_inter_token_p50_seconds", "Between tokens, median.", s.inter_token_ms[0] / 1000.0),
        (
            "kiln_generate_inter_token_p99_seconds",
            "Between tokens, 99th percentile.",
            s.inter_token_ms[1] / 1000.0,
        ),
    ] {
        family(&mut out, name, "gauge", help, &one(v));
    }
    out
}

/// `GET /metrics`.
pub(crate) async fn prometheus(Shared(state): Shared<Arc<State>>) -> Response {
    let text = match (state.optimizer(), state.generation()) {
        (Some(o), _) => render(&o.stats(), state.model_name()),
        (None, Some(g)) => render_generation(&g.stats(), state.model_name()),
        (None, None) => "# the model is loading\n".to_string(),
    };
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}
