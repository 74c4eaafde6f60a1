//! The memory governor: samples memory on an interval and sheds load under pressure.
//!
//! Above `memory.high_watermark` (used fraction of system memory) it clears the result
//! cache, then unloads idle models, least recently used first, until usage is under
//! `memory.low_watermark` or nothing idle is left. It records peaks as it goes. GPU
//! memory (NVML, every GPU of the machine) counts the same way: a GPU above the high
//! watermark is pressure, and idle models are unloaded until every figure is under the
//! low one. Backends with an allocator of their own (MLX) report it through
//! [`Provider::allocator_memory`]; under pressure the governor first asks them to give
//! their cached buffers back ([`Provider::release_cached_memory`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kiln_core::{Cache, MemoryConfig, Provider};
use serde::Serialize;

use crate::models::ModelManager;
use crate::monitor::{Reading, ResourceMonitor, Subscription};

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
    /// Backends' own allocators (MLX), summed: bytes in live tensors at the latest
    /// sample, the highest seen, and cached for reuse at the latest sample.
    pub allocator_active_bytes: u64,
    /// See `allocator_active_bytes`.
    pub allocator_peak_bytes: u64,
    /// See `allocator_active_bytes`.
    pub allocator_cached_bytes: u64,
    /// Bytes the backends' allocators gave back under pressure.
    pub allocator_released_bytes: u64,
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
    _subscription: Subscription,
}

impl MemoryGovernor {
    /// Starts governing on the current tokio runtime: every reading the monitor's
    /// thread takes is checked against the watermarks (the monitor's interval is the
    /// governor's).
    pub fn start(
        config: MemoryConfig,
        monitor: Arc<ResourceMonitor>,
        cache: Arc<dyn Cache>,
        models: Arc<ModelManager>,
        providers: Vec<Arc<dyn Provider>>,
    ) -> Self {
        let shared = Arc::new(Shared::default());
        let state = shared.clone();
        // The monitor's thread only posts the reading; shedding load awaits model
        // unloads, which belongs on the runtime.
        let (post, mut readings) = tokio::sync::watch::channel::<Option<Arc<Reading>>>(None);
        let subscription = monitor.subscribe(move |reading| {
            post.send_replace(Some(reading.clone()));
        });
        let task = tokio::spawn(async move {
            while readings.changed().await.is_ok() {
                let Some(reading) = readings.borrow_and_update().clone() else { continue };
                state.record_allocators(&providers);
                if !state.record(&reading, config.high_watermark) {
                    continue;
                }
                tracing::warn!(
                    "memory {:.0}% used (system) / {:.0}% (fullest GPU), above the high watermark {:.0}%: \
                     clearing the result cache",
                    reading.memory.used_fraction() * 100.0,
                    reading.gpu_used_fraction() * 100.0,
                    config.high_watermark * 100.0
                );
                cache.invalidate_all();
                let released: u64 = providers.iter().map(|p| p.release_cached_memory()).sum();
                {
                    let mut stats = state.stats.lock().unwrap_or_else(|p| p.into_inner());
                    stats.cache_clears += 1;
                    stats.allocator_released_bytes += released;
                }
                while monitor.sample_now().fullest_fraction() > config.low_watermark
                    && models.unload_lru_idle().await
                {
                    state.models_unloaded.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        MemoryGovernor { shared, task, _subscription: subscription }
    }

    /// What it has seen and done so far.
    pub fn stats(&self) -> MemoryStats {
        let mut stats = *self.shared.stats.lock().unwrap_or_else(|p| p.into_inner());
        stats.models_unloaded = self.shared.models_unloaded.load(Ordering::Relaxed);
        stats
    }
}

impl Shared {
    /// Records what the backends' own allocators hold now.
    fn record_allocators(&self, providers: &[Arc<dyn Provider>]) {
        let figures: Vec<_> = providers.iter().filter_map(|p| p.allocator_memory()).collect();
        if figures.is_empty() {
            return;
        }
        let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        stats.allocator_active_bytes = figures.iter().map(|m| m.active).sum();
        stats.allocator_cached_bytes = figures.iter().map(|m| m.cached).sum();
        stats.allocator_peak_bytes = stats.allocator_peak_bytes.max(figures.iter().map(|m| m.peak).sum());
    }

    /// Records a sample; returns whether it is above the high watermark.
    fn record(&self, reading: &Reading, high: f64) -> bool {
        let sample = &reading.memory;
        let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        stats.samples += 1;
        stats.peak_rss_bytes = stats.peak_rss_bytes.max(sample.process_rss);
        stats.peak_system_used_bytes = stats.peak_system_used_bytes.max(sample.system.used);
        stats.used_fraction = sample.used_fraction();
        stats.gpu_used_fraction = reading.gpu_used_fraction();
        stats.peak_gpu_used_bytes =
            reading.gpus.iter().map(|g| g.memory.used).fold(stats.peak_gpu_used_bytes, u64::max);
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

    use std::time::Instant;

    use kiln_core::{Device, MemoryInfo};

    use crate::devices::GpuDevice;
    use crate::memory::MemorySample;

    fn memory(total: u64, used: u64) -> MemoryInfo {
        MemoryInfo { total, used, free: total - used }
    }

    fn reading(gpus: &[(usize, MemoryInfo)]) -> Reading {
        let memory = MemorySample { system: memory(100, 10), process_rss: 5, ..MemorySample::default() };
        let gpus = gpus
            .iter()
            .map(|&(n, memory)| GpuDevice {
                device: Device::Cuda(n),
                name: format!("GPU {n}"),
                uuid: None,
                memory,
                utilization_percent: None,
                temperature_c: None,
                power_w: None,
            })
            .collect();
        Reading { at: Instant::now(), memory, gpus }
    }

    #[test]
    fn a_full_gpu_is_pressure_and_its_peak_is_kept() {
        let shared = Shared::default();
        let calm = reading(&[(0, memory(80, 8)), (1, memory(80, 40))]);
        assert!(!shared.record(&calm, 0.9), "system 10%, GPUs 10% and 50%");
        let full = reading(&[(0, memory(80, 8)), (1, memory(80, 76))]);
        assert!(shared.record(&full, 0.9), "GPU 1 at 95% is above 90%");
        assert!(shared.record(&reading(&[]), 0.05), "system 10% is above 5% with no GPU at all");
        let stats = *shared.stats.lock().unwrap();
        assert_eq!((stats.samples, stats.pressure_events, stats.peak_gpu_used_bytes), (3, 2, 76));
        assert_eq!(stats.gpu_used_fraction, 0.0, "the last sample had no GPU");
    }
}
