//! What this machine has to run models on: the CPU (sysinfo) and each NVIDIA GPU
//! (NVML, loaded at run time — without a driver the list is just the CPU).

use kiln_core::{Device, MemoryInfo};
use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use serde::Serialize;
use sysinfo::{CpuRefreshKind, MemoryRefreshKind, RefreshKind, System};

/// Where the NVML library is looked for, in order.
const NVML_LIBRARIES: &[&str] = &["libnvidia-ml.so.1", "libnvidia-ml.so"];

/// Loads NVML; `Err` says why there are no GPU figures.
pub fn open_nvml() -> Result<Nvml, String> {
    let mut last = String::from("no NVML library found");
    for lib in NVML_LIBRARIES {
        match Nvml::builder().lib_path(std::ffi::OsStr::new(lib)).init() {
            Ok(nvml) => return Ok(nvml),
            Err(e) => last = format!("{lib}: {e}"),
        }
    }
    Err(last)
}

/// The machine's devices.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceReport {
    /// The CPU and system memory.
    pub cpu: CpuDevice,
    /// NVIDIA GPUs, by NVML index (= `cuda:N` for CUDA's default ordering by PCI bus).
    pub gpus: Vec<GpuDevice>,
    /// The NVIDIA driver's version, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub driver_version: Option<String>,
    /// The highest CUDA version the driver supports (`13.0`), when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cuda_version: Option<String>,
    /// Why there are no GPUs, when there are none (no driver, no NVML).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub no_gpu_reason: Option<String>,
}

/// The CPU.
#[derive(Debug, Clone, Serialize)]
pub struct CpuDevice {
    /// `cpu`.
    pub device: Device,
    /// Brand string.
    pub name: String,
    /// Physical cores, when known.
    pub cores: Option<usize>,
    /// Logical CPUs.
    pub threads: usize,
    /// System memory, bytes.
    pub memory: MemoryInfo,
}

/// One NVIDIA GPU.
#[derive(Debug, Clone, Serialize)]
pub struct GpuDevice {
    /// `cuda:N`.
    pub device: Device,
    /// Product name.
    pub name: String,
    /// Stable identifier.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// Memory, bytes.
    pub memory: MemoryInfo,
    /// Utilisation, percent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub utilization_percent: Option<u32>,
    /// Temperature, °C.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature_c: Option<u32>,
    /// Power draw, watts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub power_w: Option<f64>,
}

/// The memory of one NVML device.
fn memory_of(d: &nvml_wrapper::Device) -> Option<MemoryInfo> {
    let m = d.memory_info().ok()?;
    Some(MemoryInfo { total: m.total, used: m.used, free: m.free })
}

/// The memory of every GPU NVML sees, by NVML index (a GPU whose memory cannot be read
/// is left out): what admission, `auto` and the governor need, without the rest of
/// [`read_gpus`].
pub fn gpu_memory(nvml: &Nvml) -> Vec<(usize, MemoryInfo)> {
    let count = nvml.device_count().unwrap_or(0);
    (0..count)
        .filter_map(|index| Some((index as usize, memory_of(&nvml.device_by_index(index).ok()?)?)))
        .collect()
}

/// Every GPU NVML sees, read now (a GPU whose memory cannot be read is left out).
pub fn read_gpus(nvml: &Nvml) -> Vec<GpuDevice> {
    let count = nvml.device_count().unwrap_or(0);
    (0..count)
        .filter_map(|index| {
            let d = nvml.device_by_index(index).ok()?;
            Some(GpuDevice {
                device: Device::Cuda(index as usize),
                name: d.name().unwrap_or_else(|_| format!("GPU {index}")),
                uuid: d.uuid().ok(),
                memory: memory_of(&d)?,
                utilization_percent: d.utilization_rates().ok().map(|u| u.gpu),
                temperature_c: d.temperature(TemperatureSensor::Gpu).ok(),
                power_w: d.power_usage().ok().map(|mw| f64::from(mw) / 1000.0),
            })
        })
        .collect()
}

/// Reads the CPU and, through NVML, every NVIDIA GPU.
pub fn discover() -> DeviceReport {
    let kind = RefreshKind::nothing()
        .with_memory(MemoryRefreshKind::nothing().with_ram())
        .with_cpu(CpuRefreshKind::nothing());
    let (name, threads, memory) = match System::new_with_specifics(kind) {
        Ok(system) => {
            let total = system.total_memory();
            let free = system.available_memory();
            (
                system.cpus().first().map(|c| c.brand().trim().to_string()).unwrap_or_default(),
                system.cpus().len(),
                MemoryInfo { total, used: total.saturating_sub(free), free },
            )
        }
        Err(_) => (
            String::new(),
            std::thread::available_parallelism().map_or(1, |n| n.get()),
            MemoryInfo::default(),
        ),
    };
    let cpu =
        CpuDevice { device: Device::Cpu, name, cores: System::physical_core_count().ok(), threads, memory };
    let nvml = match open_nvml() {
        Ok(nvml) => nvml,
        Err(reason) => {
            return DeviceReport {
                cpu,
                gpus: Vec::new(),
                driver_version: None,
                cuda_version: None,
                no_gpu_reason: Some(format!("no NVIDIA GPU: {reason}")),
            };
        }
    };
    let gpus = read_gpus(&nvml);
    let cuda_version = nvml.sys_cuda_driver_version().ok().map(|v| {
        format!(
            "{}.{}",
            nvml_wrapper::cuda_driver_version_major(v),
            nvml_wrapper::cuda_driver_version_minor(v)
        )
    });
    DeviceReport {
        no_gpu_reason: gpus.is_empty().then(|| "NVML found no GPU".to_string()),
        cpu,
        gpus,
        driver_version: nvml.sys_driver_version().ok(),
        cuda_version,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_is_always_there() {
        let r = discover();
        assert!(r.cpu.threads >= 1 && r.cpu.memory.total > 0, "{r:?}");
        // Without a driver (CI), no GPUs and a reason instead of an error.
        if r.gpus.is_empty() {
            assert!(r.no_gpu_reason.is_some());
        }
    }
}
