//! Devices a model can run on, and what kiln knows about them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};

/// Where a model runs. Written in configs as `cpu`, `cuda:N` or `metal:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Device {
    /// The host CPU.
    #[default]
    Cpu,
    /// An NVIDIA GPU by CUDA ordinal.
    Cuda(usize),
    /// An Apple GPU by ordinal.
    Metal(usize),
}

impl Device {
    /// The kind without the ordinal, for capability lists.
    pub fn kind(&self) -> DeviceKind {
        match self {
            Device::Cpu => DeviceKind::Cpu,
            Device::Cuda(_) => DeviceKind::Cuda,
            Device::Metal(_) => DeviceKind::Metal,
        }
    }

    /// Whether it is a GPU (CUDA or Metal).
    pub fn is_gpu(&self) -> bool {
        !matches!(self, Device::Cpu)
    }
}

/// What is accepted where a device is written.
pub const DEVICE_SYNTAX: &str = "`cpu`, `cuda:N` or `metal:N` (N a device ordinal, e.g. cuda:0)";

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
            Device::Metal(i) => write!(f, "metal:{i}"),
        }
    }
}

impl FromStr for Device {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::InvalidInput(format!("unknown device `{s}`; accepted: {DEVICE_SYNTAX}"));
        let (kind, ordinal) = match s.split_once(':') {
            Some((k, n)) => (k, Some(n.parse::<usize>().map_err(|_| bad())?)),
            None => (s, None),
        };
        match (kind, ordinal) {
            ("cpu", None) => Ok(Device::Cpu),
            ("cuda", n) => Ok(Device::Cuda(n.unwrap_or(0))),
            ("metal", n) => Ok(Device::Metal(n.unwrap_or(0))),
            _ => Err(bad()),
        }
    }
}

impl Serialize for Device {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Device {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(|_| serde::de::Error::invalid_value(serde::de::Unexpected::Str(&s), &DEVICE_SYNTAX))
    }
}

/// `model.device` as configured: a device, or `auto` — the GPU with the most free
/// memory when the provider can run on CUDA and NVML sees a GPU, else the CPU. kiln
/// resolves it to a [`Device`] before loading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    /// Chosen at start.
    Auto,
    /// This device.
    Fixed(Device),
}

impl Default for DeviceChoice {
    fn default() -> Self {
        DeviceChoice::Fixed(Device::Cpu)
    }
}

impl DeviceChoice {
    /// The device, if fixed.
    pub fn fixed(self) -> Option<Device> {
        match self {
            DeviceChoice::Auto => None,
            DeviceChoice::Fixed(d) => Some(d),
        }
    }
}

impl PartialEq<Device> for DeviceChoice {
    fn eq(&self, other: &Device) -> bool {
        self.fixed() == Some(*other)
    }
}

impl From<Device> for DeviceChoice {
    fn from(d: Device) -> Self {
        DeviceChoice::Fixed(d)
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.fixed() {
            None => f.write_str("auto"),
            Some(d) => d.fmt(f),
        }
    }
}

/// `auto` or a device, for messages.
pub const DEVICE_CHOICE_SYNTAX: &str =
    "`auto`, `cpu`, `cuda:N` or `metal:N` (N a device ordinal, e.g. cuda:0)";

impl Serialize for DeviceChoice {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DeviceChoice {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s == "auto" {
            return Ok(DeviceChoice::Auto);
        }
        s.parse::<Device>().map(DeviceChoice::from).map_err(|_| {
            serde::de::Error::invalid_value(serde::de::Unexpected::Str(&s), &DEVICE_CHOICE_SYNTAX)
        })
    }
}

/// A family of devices, as a provider advertises what it supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum DeviceKind {
    /// Host CPU.
    Cpu,
    /// NVIDIA CUDA.
    Cuda,
    /// Apple Metal.
    Metal,
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda => "cuda:N",
            DeviceKind::Metal => "metal:N",
        })
    }
}

/// Memory figures of a device, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct MemoryInfo {
    /// Total memory.
    pub total: u64,
    /// Memory in use.
    pub used: u64,
    /// Memory available for new allocations.
    pub free: u64,
}

/// A device found on this machine, with what kiln knows about it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// The device.
    pub device: Device,
    /// A human name (CPU brand, GPU model).
    pub name: String,
    /// Its memory, when known.
    pub memory: Option<MemoryInfo>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_devices() {
        for s in ["cpu", "cuda:0", "cuda:3", "metal:0"] {
            assert_eq!(s.parse::<Device>().unwrap().to_string(), s);
        }
        assert_eq!("cuda".parse::<Device>().unwrap(), Device::Cuda(0));
    }

    #[test]
    fn rejects_unknown_devices_with_the_accepted_syntax() {
        for s in ["gpu", "cuda:x", "cpu:1", ""] {
            let err = s.parse::<Device>().unwrap_err().to_string();
            assert!(err.contains("accepted: `cpu`, `cuda:N`"), "{s}: {err}");
        }
    }
}
