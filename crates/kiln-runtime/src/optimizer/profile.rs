//! The profiler's outputs: the report (with the backend allocator's figures, which only
//! the optimizer can read: it holds the provider) and the Chrome trace, written whole.

use std::path::Path;

use kiln_core::{AllocatorReport, Error, ProfileReport, Result};

use super::Optimizer;
use crate::partial_file::PartialFile;

impl Optimizer {
    /// The profiler's report so far; `None` when `profiler.enabled` is off. For a
    /// backend with an allocator of its own (MLX) it carries that allocator's figures.
    pub fn profile_report(&self) -> Option<ProfileReport> {
        if !self.config.profiler.enabled {
            return None;
        }
        let mut report = self.profiler.report();
        report.allocator = self.provider.allocator_memory().map(|m| AllocatorReport {
            provider: self.config.provider.name.clone(),
            active_bytes: m.active,
            peak_bytes: m.peak,
            cached_bytes: m.cached,
            released_bytes: self.governor.as_ref().map_or(0, |g| g.stats().allocator_released_bytes),
        });
        Some(report)
    }

    /// Writes the profiler's report as JSON to `path` (through a temporary file, so a
    /// reader never sees half of it). `Ok(false)` when profiling is off.
    pub fn write_profile(&self, path: &Path) -> Result<bool> {
        let Some(report) = self.profile_report() else { return Ok(false) };
        write_atomically(path, |out| {
            serde_json::to_writer_pretty(&mut *out, &report).map_err(std::io::Error::other)
        })?;
        Ok(true)
    }

    /// Writes the Chrome trace (Perfetto, chrome://tracing) to `path`. `Ok(false)`
    /// when no trace is kept (`profiler.trace` off).
    pub fn write_trace(&self, path: &Path) -> Result<bool> {
        if !(self.config.profiler.enabled && self.config.profiler.trace) {
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

/// Writes a file through a [`PartialFile`], creating its folder, so readers see all or
/// nothing.
pub(crate) fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut dyn std::io::Write) -> std::io::Result<()>,
) -> Result<()> {
    let result = (|| {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let mut file = PartialFile::create(path)?;
        write(file.writer())?;
        file.commit()
    })();
    result.map_err(|e| Error::io("writing", path, e))
}
