//! [`Parts`]: what every front is built from, assembled once from the config.
//!
//! # Design
//!
//! kiln has three fronts — the [`Optimizer`](crate::Optimizer) (embed, classify,
//! infer), [`Generation`](crate::Generation) and the video pipeline — and each needs
//! the same set-up before its model loads: the provider the config names, the devices
//! the model goes on (`model.device`, `"auto"`, `model.gpu_ids`), the provider's
//! capabilities checked against those devices, the dtype and the quantization, the one
//! resource monitor, the profiler, and the trackers (built early, so a tracker's config
//! error fails before minutes of loading). Written once per front, those drifted: one
//! front skipped the capability check, ignored `"auto"` and `gpu_ids`, and left the
//! backend allocator out of its profile. So they are built here, once, and each front
//! takes the ready `Parts` — as TEI's `Infer::new` takes ready-made parts — and keeps
//! only what is its own (a batching worker, a generation engine, a pipeline of two
//! models). The profiler's outputs go through [`Reports`], which every front holds.

use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use kiln_core::{
    AllocatorReport, Cache, Device, DeviceKind, KilnConfig, MemoryInfo, ModelSpec, ProfileReport, Profiler,
    Provider, Result, Tracker, build_cache, build_provider, build_trackers,
};

use crate::governor::MemoryGovernor;
use crate::monitor::ResourceMonitor;
use crate::partial_file::write_atomically;
use crate::profilers::build_profiler;
use crate::tracking::{MetricsSource, TrackerFailures, TrackerHub};

/// The set-up every front shares: provider, devices, monitor, profiler and trackers,
/// checked against each other before any model is read.
///
/// ```no_run
/// # async fn demo() -> kiln_core::Result<()> {
/// use kiln_core::KilnConfig;
/// use kiln_runtime::{Optimizer, Parts};
///
/// let config = KilnConfig::load(Some("examples/embed.toml".as_ref()), &[])?;
/// let parts = Parts::from_config(config)?; // refused here if the provider cannot run it
/// println!("{} on {:?}", parts.provider.name(), parts.devices);
/// let optimizer = Optimizer::from_parts(parts).await?;
/// # optimizer.shutdown().await?;
/// # Ok(()) }
/// ```
pub struct Parts {
    /// The config in force (validated).
    pub config: KilnConfig,
    /// The provider `provider.name` names.
    pub provider: Arc<dyn Provider>,
    /// Where the model's copies go: `model.gpu_ids` as `cuda:N` each, else
    /// `model.device` with `"auto"` resolved. Never empty.
    pub devices: Vec<Device>,
    /// The runtime's one resource monitor.
    pub monitor: Arc<ResourceMonitor>,
    /// The profiler `profiler.kind` names.
    pub profiler: Arc<dyn Profiler>,
    /// The `[[trackers]]`, by kind, until a front starts them.
    trackers: Vec<(String, Box<dyn Tracker>)>,
    /// When set-up began: load times count from here.
    pub started: Instant,
}

impl Parts {
    /// Validates the config, builds the provider, trackers, monitor and profiler,
    /// chooses the devices and checks that the provider runs the model there at the
    /// configured dtype and quantization (the error names what it accepts).
    pub fn from_config(config: KilnConfig) -> Result<Self> {
        Self::build(config, None)
    }

    /// [`from_config`](Self::from_config) with these GPUs' memory in place of NVML's
    /// readings (`(N, memory)` for `cuda:N`) when `model.device = "auto"` chooses: a
    /// test double of the GPUs, for checking the choice on a machine without one.
    #[doc(hidden)]
    pub fn with_gpus(config: KilnConfig, gpus: Vec<(usize, MemoryInfo)>) -> Result<Self> {
        Self::build(config, Some(gpus))
    }

    fn build(config: KilnConfig, gpus: Option<Vec<(usize, MemoryInfo)>>) -> Result<Self> {
        config.validate()?;
        let started = Instant::now();
        let provider = build_provider(&config.provider)?;
        let trackers = build_trackers(&config.trackers, &config.tracking)?;
        let kinds = config.trackers.iter().map(|t| t.kind.clone());
        let monitor = start_monitor(&config);
        let capabilities = provider.capabilities();
        let devices = choose_devices(&config, capabilities.devices.contains(&DeviceKind::Cuda), || {
            gpus.unwrap_or_else(|| monitor.latest().unwrap_or_else(|| monitor.sample_now()).gpu_memory())
        });
        // What the provider says it cannot do is refused before anything is read.
        for device in &devices {
            capabilities.check(provider.name(), *device, config.model.dtype)?;
        }
        capabilities.check_quantization(provider.name(), config.model.quantization)?;
        let profiler = build_profiler(&config.profiler, &monitor)?;
        Ok(Parts {
            provider,
            devices,
            profiler,
            trackers: kinds.zip(trackers).collect(),
            monitor,
            started,
            config,
        })
    }

    /// The first device: where a front with one copy of its model loads it.
    pub fn device(&self) -> Device {
        self.devices[0]
    }

    /// The model the config names, on the first device, at its dtype and quantization.
    pub fn spec(&self) -> ModelSpec {
        ModelSpec::new(&self.config.model.path, self.device(), self.config.model.dtype)
            .with_quantization(self.config.model.quantization)
    }

    /// The result cache `cache.kind` names, for the fronts that cache.
    pub fn cache(&self) -> Result<Arc<dyn Cache>> {
        build_cache(&self.config.cache)
    }

    /// Takes the trackers out, for a front that drives them itself (the video task
    /// logs its video and figures once, at the end).
    pub fn take_trackers(&mut self) -> Vec<(String, Box<dyn Tracker>)> {
        std::mem::take(&mut self.trackers)
    }

    /// Starts the trackers on their own thread, logging `metrics()` every
    /// `tracking.interval_ms`; `None` when the config names none.
    pub fn start_trackers(
        &mut self,
        metrics: MetricsSource,
        failures: TrackerFailures,
    ) -> Result<Option<TrackerHub>> {
        let trackers = self.take_trackers();
        if trackers.is_empty() {
            return Ok(None);
        }
        TrackerHub::start(
            trackers,
            serde_json::to_value(&self.config).unwrap_or_default(),
            Duration::from_millis(self.config.tracking.interval_ms),
            metrics,
            failures,
        )
        .map(Some)
    }

    /// The profiler's outputs, for the front to hold.
    pub fn reports(&self) -> Reports {
        Reports::new(self.profiler.clone(), Some(self.provider.clone()), &self.config)
    }
}

/// The profiler's outputs, the same for every front: the report (with the backend
/// allocator's figures, for a backend that keeps one) and the Chrome trace, each
/// written whole.
#[derive(Clone)]
pub struct Reports {
    profiler: Arc<dyn Profiler>,
    /// Whose allocator the report reads; `None` for a model started without a
    /// provider (a generator handed over ready-made).
    provider: Option<Arc<dyn Provider>>,
    enabled: bool,
    trace: bool,
    /// What the governor gave back to the allocator, when one runs.
    governor: Option<Weak<MemoryGovernor>>,
}

impl Reports {
    /// The outputs of `profiler`, as `config.profiler` asks for them.
    pub(crate) fn new(
        profiler: Arc<dyn Profiler>,
        provider: Option<Arc<dyn Provider>>,
        config: &KilnConfig,
    ) -> Self {
        Reports {
            profiler,
            provider,
            enabled: config.profiler.enabled,
            trace: config.profiler.enabled && config.profiler.trace,
            governor: None,
        }
    }

    /// These outputs, with the bytes `governor` released from the allocator in the
    /// report.
    pub(crate) fn with_governor(mut self, governor: Option<&Arc<MemoryGovernor>>) -> Self {
        self.governor = governor.map(Arc::downgrade);
        self
    }

    /// The profiler the report reads: spans recorded here (`record`, `span`) appear in
    /// it — how a caller outside kiln (the Python package's `monitor`) adds its own.
    pub fn profiler(&self) -> &dyn Profiler {
        &*self.profiler
    }

    /// The profiler's report so far; `None` when `profiler.enabled` is off. For a
    /// backend with an allocator of its own (MLX) it carries that allocator's figures.
    pub fn report(&self) -> Option<ProfileReport> {
        if !self.enabled {
            return None;
        }
        let mut report = self.profiler.report();
        let provider = self.provider.as_ref();
        report.allocator =
            provider.and_then(|p| p.allocator_memory()).zip(provider).map(|(m, p)| AllocatorReport {
                provider: p.name().to_string(),
                active_bytes: m.active,
                peak_bytes: m.peak,
                cached_bytes: m.cached,
                released_bytes: self
                    .governor
                    .as_ref()
                    .and_then(Weak::upgrade)
                    .map_or(0, |g| g.stats().allocator_released_bytes),
            });
        Some(report)
    }

    /// Writes the report as JSON to `path` (through a temporary file, so a reader never
    /// sees half of it). `Ok(false)` when profiling is off.
    pub fn write_profile(&self, path: &Path) -> Result<bool> {
        let Some(report) = self.report() else { return Ok(false) };
        write_atomically(path, |out| {
            serde_json::to_writer_pretty(&mut *out, &report).map_err(std::io::Error::other)
        })?;
        Ok(true)
    }

    /// Writes the Chrome trace (Perfetto, chrome://tracing) to `path`. `Ok(false)`
    /// when no trace is kept (`profiler.trace` off).
    pub fn write_trace(&self, path: &Path) -> Result<bool> {
        if !self.trace {
            return Ok(false);
        }
        let mut kept = false;
        write_atomically(path, |out| {
            kept = self.profiler.write_trace(out).map_err(std::io::Error::other)?;
            Ok(())
        })?;
        Ok(kept)
    }
}

/// The runtime's one resource monitor, sampling at the shortest interval a reader of
/// periodic samples asks for (`memory.sample_interval_ms` for the governor,
/// `profiler.sample_interval_ms` for the profiler); with neither on, readings are taken
/// only when needed (admission, `auto`, tracker steps).
pub(crate) fn start_monitor(config: &KilnConfig) -> Arc<ResourceMonitor> {
    let intervals = [
        config.memory.enabled.then_some(config.memory.sample_interval_ms),
        config.profiler.enabled.then_some(config.profiler.sample_interval_ms),
    ];
    match intervals.into_iter().flatten().min() {
        Some(ms) => ResourceMonitor::start(Duration::from_millis(ms)),
        None => ResourceMonitor::on_demand(),
    }
}

/// The devices the model's copies go on: `model.gpu_ids` as `cuda:N` each, else
/// `model.device`, with `"auto"` resolved to the GPU with the most free memory (`gpus`,
/// read only then) when the provider runs on CUDA in this build, else the CPU.
fn choose_devices(
    config: &KilnConfig,
    provider_has_cuda: bool,
    gpus: impl FnOnce() -> Vec<(usize, MemoryInfo)>,
) -> Vec<Device> {
    if !config.model.gpu_ids.is_empty() {
        return config.model.gpu_ids.iter().map(|&n| Device::Cuda(n)).collect();
    }
    if let Some(device) = config.model.device.fixed() {
        return vec![device];
    }
    let chosen = match provider_has_cuda {
        true => gpus().into_iter().max_by_key(|(_, m)| m.free).map(|(n, _)| Device::Cuda(n)),
        false => None,
    };
    let device = chosen.unwrap_or(Device::Cpu);
    tracing::info!("model.device = \"auto\": {device}");
    vec![device]
}

#[cfg(test)]
mod tests {
    use kiln_core::DeviceChoice;

    use super::*;

    fn memory(free_gib: u64) -> MemoryInfo {
        MemoryInfo { total: 80 << 30, used: (80 - free_gib) << 30, free: free_gib << 30 }
    }

    #[test]
    fn auto_takes_the_gpu_with_the_most_free_memory_when_the_provider_runs_on_cuda() {
        let mut config = KilnConfig::default();
        config.model.device = DeviceChoice::Auto;
        let gpus = || vec![(0, memory(10)), (1, memory(70)), (2, memory(40))];
        assert_eq!(choose_devices(&config, true, gpus), vec![Device::Cuda(1)]);
        assert_eq!(choose_devices(&config, false, gpus), vec![Device::Cpu]);
        assert_eq!(choose_devices(&config, true, Vec::new), vec![Device::Cpu]);
    }

    #[test]
    fn gpu_ids_win_over_the_device_and_nvml_is_not_read_for_a_fixed_device() {
        let mut config = KilnConfig::default();
        config.model.gpu_ids = vec![1, 1, 0];
        let unread = || -> Vec<(usize, MemoryInfo)> { panic!("NVML read for a fixed choice") };
        assert_eq!(
            choose_devices(&config, true, unread),
            vec![Device::Cuda(1), Device::Cuda(1), Device::Cuda(0)]
        );
        config.model.gpu_ids.clear();
        assert_eq!(choose_devices(&config, true, unread), vec![Device::Cpu]);
    }
}
