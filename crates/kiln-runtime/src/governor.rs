//! The memory governor: samples memory on an interval and sheds load under pressure.
//!
//! Above `memory.high_watermark` (used fraction of system memory) it clears the result
//! cache, then unloads idle models, least recently used first, until usage is under
//! `memory.low_watermark` or nothing idle is left. It records peaks as it goes. GPU
//! memory (NVML, every GPU of the machine) counts the same way: a GPU above the high
//! watermark is pressure, and idle models are unloaded until every figure is under the
//! low one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_core::{Cache, MemoryConfig, MemoryInfo};
use serde::Serialize;

use crate::memory::{MemoryProbe, MemorySample};
use crate::models::ModelManager;

/// What the governor has seen and done.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct MemoryStats {
    /// Samples taken.
    pub samples: u64,
    /// Highest resident memory of this process, bytes.
    pub peak_rss_bytes: u64,
    /// Highest system memory in use, bytes.
    pub peak_system_used_bytes: u64,
    /// Samples above the high watermark.
    pub pressure_events: u64,
    /// Times the result cache was cleared under pressure.
    pub cache_clears: u64,
    /// Models unloaded under pressure.
    pub models_unloaded: u64,
    /// The latest sample's used fraction of system memory.
    pub used_fraction: f64,
    /// Highest memory in use on any NVIDIA GPU, bytes (0 without one).
    pub peak_gpu_used_bytes: u64,
    /// The latest sample's highest used fraction over the GPUs (0 without one).
    pub gpu_used_fraction: f64,
}

#[derive(Default)]
struct Shared {
    stats: Mutex<MemoryStats>,
    models_unloaded: AtomicU64,
}

/// A running governor; stops when dropped.
pub struct MemoryGovernor {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl MemoryGovernor {
    /// Starts sampling on the current tokio runtime.
    pub fn start(config: MemoryConfig, cache: Arc<dyn Cache>, models: Arc<ModelManager>) -> Self {
        let shared = Arc::new(Shared::default());
        let state = shared.clone();
        let task = tokio::spawn(async move {
            let mut probe = MemoryProbe::default();
            let mut ticks = tokio::time::interval(Duration::from_millis(config.sample_interval_ms));
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let sample = probe.sample();
                let gpus = probe.gpus();
                let pressured = state.record(&sample, &gpus, config.high_watermark);
                if !pressured {
                    continue;
                }
                tracing::warn!(
                    "memory {:.0}% used (system) / {:.0}% (fullest GPU), above the high watermark {:.0}%: \
                     clearing the result cache",
                    sample.used_fraction() * 100.0,
                    gpu_fraction(&gpus) * 100.0,
                    config.high_watermark * 100.0
                );
                cache.invalidate_all();
                state.stats.lock().unwrap_or_else(|p| p.into_inner()).cache_clears += 1;
                let fullest =
                    |probe: &mut MemoryProbe| probe.sample().used_fraction().max(gpu_fraction(&probe.gpus()));
                while fullest(&mut probe) > config.low_watermark && models.unload_lru_idle().await {
                    state.models_unloaded.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        MemoryGovernor { shared, task }
    }

    /// What it has seen and done so far.
    pub fn stats(&self) -> MemoryStats {
        let mut stats = *self.shared.stats.lock().unwrap_or_else(|p| p.into_inner());
        stats.models_unloaded = self.shared.models_unloaded.load(Ordering::Relaxed);
        stats
    }
}

/// The highest used fraction over the GPUs; 0 without any.
fn gpu_fraction(gpus: &[(usize, MemoryInfo)]) -> f64 {
    gpus.iter().filter(|(_, m)| m.total > 0).map(|(_, m)| m.used as f64 / m.total as f64).fold(0.0, f64::max)
}

impl Shared {
    /// Records a sample; returns whether it is above the high watermark.
    fn record(&self, sample: &MemorySample, gpus: &[(usize, MemoryInfo)], high: f64) -> bool {
        let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        stats.samples += 1;
        stats.peak_rss_bytes = stats.peak_rss_bytes.max(sample.process_rss);
        stats.peak_system_used_bytes = stats.peak_system_used_bytes.max(sample.system.used);
        stats.used_fraction = sample.used_fraction();
        stats.gpu_used_fraction = gpu_fraction(gpus);
        stats.peak_gpu_used_bytes =
            gpus.iter().map(|(_, m)| m.used).fold(stats.peak_gpu_used_bytes, u64::max);
        let pressured =
            (sample.system.total > 0 && sample.used_fraction() > high) || stats.gpu_used_fraction > high;
        stats.pressure_events += u64::from(pressured);
        pressured
    }
}

impl Drop for MemoryGovernor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory(total: u64, used: u64) -> MemoryInfo {
        MemoryInfo { total, used, free: total - used }
    }

    #[test]
    fn a_full_gpu_is_pressure_and_its_peak_is_kept() {
        let shared = Shared::default();
        let sample = MemorySample { system: memory(100, 10), process_rss: 5, ..MemorySample::default() };
        let calm = [(0, memory(80, 8)), (1, memory(80, 40))];
        assert!(!shared.record(&sample, &calm, 0.9), "system 10%, GPUs 10% and 50%");
        let full = [(0, memory(80, 8)), (1, memory(80, 76))];
        assert!(shared.record(&sample, &full, 0.9), "GPU 1 at 95% is above 90%");
        assert!(shared.record(&sample, &[], 0.05), "system 10% is above 5% with no GPU at all");
        let stats = *shared.stats.lock().unwrap();
        assert_eq!((stats.samples, stats.pressure_events, stats.peak_gpu_used_bytes), (3, 2, 76));
        assert_eq!(stats.gpu_used_fraction, 0.0, "the last sample had no GPU");
    }
}
