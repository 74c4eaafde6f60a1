//! A tracker written outside kiln, registered with one line and chosen by name.
//!
//! `csv` writes one row per metrics step to `<tracking.dir>/<run name>.csv` (or the
//! entry's `path`), with the columns the entry's `columns` names, or those of the first
//! step. It shows the whole contract: options read with `TrackerSetup::options` (a
//! misspelt key is a config error naming the entry), paths resolved against
//! `tracking.dir`, no file touched until the first write, and errors returned rather
//! than panics — kiln turns them into one warning and a counter in `stats()`.
//!
//! Run it (after `scripts/setup`):
//!
//! ```text
//! cargo run --example custom_tracker
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};

use kiln::{Error, KilnConfig, Metrics, Optimizer, Result, Stats, Tracker, TrackerSetup};
use serde::Deserialize;

/// The keys of a `[[trackers]] kind = "csv"` entry.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CsvOptions {
    /// File, relative to `tracking.dir`.
    path: Option<PathBuf>,
    /// Columns after `step`; default: the metrics of the first step.
    columns: Option<Vec<String>>,
}

/// Appends a CSV row per step.
pub struct CsvTracker {
    path: PathBuf,
    columns: Option<Vec<String>>,
    out: Option<std::io::BufWriter<std::fs::File>>,
}

impl CsvTracker {
    fn open(&mut self, first: &Metrics) -> std::io::Result<&mut std::io::BufWriter<std::fs::File>> {
        if self.out.is_none() {
            if let Some(dir) = self.path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let columns = self.columns.get_or_insert_with(|| first.keys().cloned().collect());
            let mut out = std::io::BufWriter::new(std::fs::File::create(&self.path)?);
            writeln!(out, "step,{}", columns.join(","))?;
            self.out = Some(out);
        }
        Ok(self.out.as_mut().expect("opened above"))
    }
}

impl Tracker for CsvTracker {
    fn log_metrics(&mut self, step: u64, metrics: &Metrics) -> Result<()> {
        let path = self.path.clone();
        let io = |e| Error::io("writing", path.clone(), e);
        self.open(metrics).map_err(io)?;
        let row: Vec<String> = self
            .columns
            .iter()
            .flatten()
            .map(|c| metrics.get(c).map_or(String::new(), |v| v.to_string()))
            .collect();
        let out = self.out.as_mut().expect("opened above");
        writeln!(out, "{step},{}", row.join(",")).map_err(io)
    }

    fn flush(&mut self) -> Result<()> {
        match self.out.as_mut() {
            Some(out) => out.flush().map_err(|e| Error::io("writing", self.path.clone(), e)),
            None => Ok(()),
        }
    }
}

fn build(setup: &TrackerSetup) -> Result<Box<dyn Tracker>> {
    let options: CsvOptions = setup.options()?;
    let path = setup.resolve(options.path.unwrap_or_else(|| format!("{}.csv", setup.run_name).into()));
    Ok(Box::new(CsvTracker { path, columns: options.columns, out: None }))
}

// The one line that makes `kind = "csv"` work in any config of this binary.
kiln::register_tracker!("csv", "one CSV row per metrics step", build);

/// Embeds `texts` with the config at `path` (plus `sets`) and returns the final stats.
pub async fn embed_with(path: &Path, sets: &[String], texts: &[String]) -> anyhow::Result<Stats> {
    let optimizer = Optimizer::from_config(KilnConfig::load(Some(path), sets)?).await?;
    optimizer.embed(texts).await?;
    Ok(optimizer.shutdown().await?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let texts: Vec<String> = (0..64).map(|i| format!("custom trackers see every step, text {i}")).collect();
    let sets = vec!["tracking.run_name=csv-example".to_string()];
    embed_with(Path::new("examples/custom_tracker.toml"), &sets, &texts).await?;
    print!("{}", std::fs::read_to_string("runs/csv-example.csv")?);
    Ok(())
}
