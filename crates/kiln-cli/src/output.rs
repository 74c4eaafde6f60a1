//! What `kiln` writes, one way for every task: outputs appear whole or not at all
//! (through a [`PartialFile`](kiln::runtime::PartialFile)), one JSON object a line; the
//! profiler's report and trace come from the front's [`Reports`]; progress bars only on
//! a terminal.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use kiln::KilnConfig;
use kiln::runtime::Reports;

/// Writes `output` through a [`PartialFile`](kiln::runtime::PartialFile): only a
/// complete output takes the requested name, and a failed one leaves nothing behind.
pub(crate) async fn write_output(
    output: &Path,
    write: impl AsyncFnOnce(&mut std::io::BufWriter<std::fs::File>) -> Result<()>,
) -> Result<()> {
    let mut file = kiln::runtime::PartialFile::create(output)
        .with_context(|| format!("creating output {}.partial", output.display()))?;
    write(file.writer()).await?;
    file.commit().with_context(|| format!("writing output {}", output.display()))
}

/// One JSON Lines row.
pub(crate) fn write_row(out: &mut impl Write, row: &impl serde::Serialize) -> Result<()> {
    serde_json::to_writer(&mut *out, row)?;
    out.write_all(b"\n")?;
    Ok(())
}

/// `--profile` and `--trace`: the profiler's report and Chrome trace.
#[derive(Debug, Clone, Default, Args)]
pub struct ProfilerOutputs {
    /// Write the profiler's report (spans: count, total, mean, p50/p95/p99, max; peak
    /// RSS and GPU memory; mean CPU%) as JSON to this file. Turns the profiler on.
    #[arg(long, value_name = "FILE.json")]
    pub profile: Option<PathBuf>,
    /// Write a Chrome trace (every span, and resource samples as counters) to this
    /// file; open it in https://ui.perfetto.dev or chrome://tracing. Turns tracing on.
    #[arg(long, value_name = "FILE.json")]
    pub trace: Option<PathBuf>,
}

impl ProfilerOutputs {
    /// Turns on in `config` what the requested outputs need.
    pub fn apply(&self, config: &mut KilnConfig) {
        if self.profile.is_some() || self.trace.is_some() {
            config.profiler.enabled = true;
        }
        if self.trace.is_some() {
            config.profiler.trace = true;
        }
    }

    /// Writes what was asked for from a front's profiler outputs.
    pub fn write(&self, reports: &Reports) -> Result<()> {
        if let Some(path) = &self.profile {
            reports.write_profile(path)?;
            eprintln!("kiln: profile written to {}", path.display());
        }
        if let Some(path) = &self.trace {
            reports.write_trace(path)?;
            eprintln!("kiln: trace written to {} (open in https://ui.perfetto.dev)", path.display());
        }
        Ok(())
    }
}

/// A progress bar on stderr when it is a terminal (indicatif draws nothing otherwise).
pub(crate) fn progress_bar(total: usize, unit: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total as u64);
    let template = format!("{{bar:40}} {{pos}}/{{len}} {unit} ({{per_sec}}, eta {{eta}})");
    if let Ok(style) = indicatif::ProgressStyle::with_template(&template) {
        bar.set_style(style);
    }
    bar
}
