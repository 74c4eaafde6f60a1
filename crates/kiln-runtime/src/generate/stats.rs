//! What generation counts: [`GenerationStats`] (`Generation::stats`, the trackers'
//! `generate/*` metrics) and the counters the engine thread updates to make them.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use hdrhistogram::Histogram;
use serde::Serialize;

/// What generation has done so far (`Generation::stats`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct GenerationStats {
    /// Requests accepted.
    pub requests: u64,
    /// Requests refused because the queue was full.
    pub rejected: u64,
    /// Sequences that ended normally.
    pub completed: u64,
    /// Sequences whose stream was dropped before the end.
    pub cancelled: u64,
    /// Sequences that failed.
    pub failed: u64,
    /// Prompt tokens prefilled.
    pub prompt_tokens: u64,
    /// Tokens generated.
    pub generated_tokens: u64,
    /// Steps run.
    pub steps: u64,
    /// Sequences per step, on average (batch occupancy).
    pub mean_sequences_per_step: f64,
    /// Most sequences in one step.
    pub max_sequences_per_step: u64,
    /// Sequences running now.
    pub running: u64,
    /// Requests waiting for a slot now.
    pub waiting: u64,
    /// Bytes the running sequences' KV caches hold now.
    pub kv_cache_bytes: u64,
    /// Most KV-cache bytes held at once.
    pub peak_kv_cache_bytes: u64,
    /// Steps at which a waiting request was held back because memory was above
    /// `memory.high_watermark` (nothing joins a running batch then).
    pub pressure_holds: u64,
    /// Vision-language models: images in prompts.
    pub images: u64,
    /// Of those, answered by the image cache (no vision tower run).
    pub image_cache_hits: u64,
    /// Image tokens the vision tower made (cache hits not counted).
    pub image_tokens: u64,
    /// Time in the vision tower, milliseconds, all images together.
    pub image_encode_ms: f64,
    /// Prompts that continued from a kept prompt's cache (`generate.prefix_cache_mb`).
    pub prefix_cache_hits: u64,
    /// Prompt tokens those took from the kept caches instead of computing them.
    pub prefix_cached_tokens: u64,
    /// Bytes the kept prompts' caches hold now.
    pub prefix_cache_bytes: u64,
    /// Time to first token, milliseconds: p50, p99.
    pub ttft_ms: [f64; 2],
    /// Between a sequence's tokens, milliseconds: p50, p99, max.
    pub inter_token_ms: [f64; 3],
}

/// The engine's counters; [`snapshot`](Self::snapshot) makes the [`GenerationStats`].
#[derive(Default)]
pub(super) struct Counters {
    requests: AtomicU64,
    rejected: AtomicU64,
    state: Mutex<State>,
}

/// What the engine updates under one lock.
#[derive(Default)]
pub(super) struct State {
    pub(super) stats: GenerationStats,
    pub(super) sequences_in_steps: u64,
    pub(super) ttft: Option<Histogram<u64>>,
    pub(super) itl: Option<Histogram<u64>>,
}

fn micros(h: &Option<Histogram<u64>>, q: f64) -> f64 {
    h.as_ref().filter(|h| !h.is_empty()).map_or(0.0, |h| h.value_at_quantile(q) as f64 / 1000.0)
}

/// Records `d` in microseconds in the histogram `h`, made on first use.
pub(super) fn record(h: &mut Option<Histogram<u64>>, d: std::time::Duration) {
    let h = h.get_or_insert_with(|| Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds"));
    let _ = h.record((d.as_micros() as u64).max(1));
}

impl Counters {
    pub(super) fn submitted(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }
    pub(super) fn rejected(&self) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
    }
    pub(super) fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()))
    }
    pub(super) fn snapshot(&self) -> GenerationStats {
        self.with(|s| {
            let mut stats = s.stats.clone();
            stats.requests = self.requests.load(Ordering::Relaxed);
            stats.rejected = self.rejected.load(Ordering::Relaxed);
            stats.mean_sequences_per_step =
                if stats.steps > 0 { s.sequences_in_steps as f64 / stats.steps as f64 } else { 0.0 };
            stats.ttft_ms = [micros(&s.ttft, 0.5), micros(&s.ttft, 0.99)];
            stats.inter_token_ms = [micros(&s.itl, 0.5), micros(&s.itl, 0.99), micros(&s.itl, 1.0)];
            stats
        })
    }
}
