//! The handles behind the resource monitor: system and process figures from the
//! operating system (sysinfo) and, for NVIDIA GPUs, NVML (opened on the first GPU
//! question; without a driver a GPU reports no figures and the reason is logged once
//! at debug level). The runtime reads them through its one
//! [`ResourceMonitor`](crate::monitor::ResourceMonitor).

use kiln_core::MemoryInfo;
use sysinfo::{MemoryRefreshKind, Pid, ProcessRefreshKind, ProcessesToUpdate, RefreshKind, System};

/// A point-in-time reading of system and process memory, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct MemorySample {
    /// System memory: total, used, available.
    pub system: MemoryInfo,
    /// This process's resident set size.
    pub process_rss: u64,
    /// This process's CPU use since the previous reading, percent of one core; only from
    /// a probe made [`with_cpu`](MemoryProbe::with_cpu), and not on its first reading.
    pub process_cpu_percent: Option<f64>,
}

impl MemorySample {
    /// Used system memory as a fraction of total.
    pub fn used_fraction(&self) -> f64 {
        if self.system.total == 0 { 0.0 } else { self.system.used as f64 / self.system.total as f64 }
    }
}

/// Reads memory figures; keeps its `System` between readings so each is cheap. Where
/// the operating system cannot be read, it reports zeros and no available memory, and
/// loads go unchecked.
pub struct MemoryProbe {
    system: Option<System>,
    pid: Option<Pid>,
    cpu: bool,
    readings: u64,
    /// NVML, opened on the first GPU question; `Err` (no driver) is kept, not retried.
    nvml: Option<std::result::Result<nvml_wrapper::Nvml, String>>,
}

impl Default for MemoryProbe {
    fn default() -> Self {
        let kind = RefreshKind::nothing().with_memory(MemoryRefreshKind::nothing().with_ram());
        let system = System::new_with_specifics(kind)
            .inspect_err(|e| tracing::warn!("cannot read system memory ({e}); memory checks are off"))
            .ok();
        MemoryProbe { system, pid: sysinfo::get_current_pid().ok(), cpu: false, readings: 0, nvml: None }
    }
}

impl MemoryProbe {
    /// A probe that also reads the process's CPU use (the profiler's sampler).
    pub fn with_cpu() -> Self {
        MemoryProbe { cpu: true, ..MemoryProbe::default() }
    }

    /// System and process memory now (and CPU use, for a probe [`with_cpu`](Self::with_cpu)).
    pub fn sample(&mut self) -> MemorySample {
        let Some(system) = self.system.as_mut() else {
            return MemorySample::default();
        };
        system.refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
        let total = system.total_memory();
        let free = system.available_memory();
        let mut sample = MemorySample {
            system: MemoryInfo { total, used: total.saturating_sub(free), free },
            ..MemorySample::default()
        };
        if let Some(pid) = self.pid {
            let kind = ProcessRefreshKind::nothing().with_memory();
            let kind = if self.cpu { kind.with_cpu() } else { kind };
            system.refresh_processes_specifics(ProcessesToUpdate::Some(&[pid]), true, kind);
            if let Some(p) = system.process(pid) {
                sample.process_rss = p.memory();
                // The first reading has no interval to measure CPU time over.
                if self.cpu && self.readings > 0 {
                    sample.process_cpu_percent = Some(f64::from(p.cpu_usage()));
                }
            }
        }
        self.readings += 1;
        sample
    }

    /// NVML, opened on first use and kept; `None` without a driver (not retried).
    pub fn nvml(&mut self) -> Option<&nvml_wrapper::Nvml> {
        self.nvml
            .get_or_insert_with(|| {
                crate::devices::open_nvml().inspect_err(|e| tracing::debug!("no NVIDIA GPU figures: {e}"))
            })
            .as_ref()
            .ok()
    }
}

/// This process's resident set size now, in bytes.
pub fn process_rss() -> u64 {
    MemoryProbe::default().sample().process_rss
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_real_figures() {
        let s = MemoryProbe::default().sample();
        assert!(s.system.total > 0 && s.system.free <= s.system.total, "{s:?}");
        assert!(s.process_rss > 1 << 20, "a running test process holds more than 1 MiB: {s:?}");
        assert!((0.0..=1.0).contains(&s.used_fraction()));
    }
}
