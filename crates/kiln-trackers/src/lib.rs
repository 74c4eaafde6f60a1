//! kiln's trackers: where a run's config, metrics, summary and profile go.
//!
//! Each is chosen by kind in a config's `[[trackers]]` list, several at once:
//!
//! | kind | writes | read it with |
//! |---|---|---|
//! | `stdout` | a compact line per step, a summary table at the end | your terminal |
//! | `jsonl` | one JSON object per event | `jq`, pandas, any JSON reader |
//! | `tensorboard` | `events.out.tfevents.*`: scalars per step, config, summary and profile as text | `tensorboard --logdir` |
//! | `wandb` | an offline W&B run (`wandb/offline-run-*/run-*.wandb`) | `wandb sync` |
//!
//! File trackers buffer in memory and write whole records on flush (every
//! `flush_interval_s` and at the end), so a process killed at any moment leaves files
//! that read back up to the last flush. A failed write truncates the file back to its
//! last complete record and reports the error; the runtime turns that into one warning
//! and a counter, and inference goes on.
//!
//! Builders read options only; files are created on first flush.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kiln_core::{Error, Result};

mod jsonl;
mod proto;
mod stdout;
mod tensorboard;
mod wandb;

pub use jsonl::JsonlTracker;
pub use stdout::{StdoutTracker, Stream};
pub use tensorboard::TensorBoardTracker;
pub use wandb::{Mode as WandbMode, WandbTracker};

/// The tracker kinds this crate registers.
pub const KINDS: &[&str] = &["stdout", "jsonl", "tensorboard", "wandb"];

/// Default seconds between flushes of the file trackers.
const DEFAULT_FLUSH_INTERVAL_S: f64 = 5.0;

/// Bytes a file tracker keeps buffered while its writes fail, before dropping them.
const MAX_BUFFERED: usize = 64 << 20;

/// Seconds since the Unix epoch, as trackers stamp events.
pub(crate) fn unix_time() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// This machine's name, as trackers record it.
pub(crate) fn hostname() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    Some(name.trim().to_string()).filter(|h| !h.is_empty())
}

/// Decides when a buffered tracker flushes.
pub(crate) struct FlushClock {
    interval: Duration,
    last: Instant,
}

impl FlushClock {
    pub fn new(seconds: Option<f64>, key: &str) -> Result<Self> {
        let s = seconds.unwrap_or(DEFAULT_FLUSH_INTERVAL_S);
        if !(s.is_finite() && (0.0..=86_400.0).contains(&s)) {
            return Err(Error::Config(vec![kiln_core::ConfigIssue::new(
                key,
                s.to_string(),
                "seconds in 0..=86400 (0: flush after every event)",
            )]));
        }
        Ok(FlushClock { interval: Duration::from_secs_f64(s), last: Instant::now() })
    }

    /// Whether the interval has passed since the last flush.
    pub fn due(&self) -> bool {
        self.last.elapsed() >= self.interval
    }

    pub fn reset(&mut self) {
        self.last = Instant::now();
    }
}

/// An append-only file written in whole records: bytes are buffered and written on
/// [`commit`](Self::commit); a failed write is cut back to the last commit, so the file
/// never ends in half a record that later appends would bury.
pub(crate) struct RecordFile {
    path: PathBuf,
    file: Option<File>,
    committed: u64,
    buffer: Vec<u8>,
    dropped: u64,
}

impl RecordFile {
    pub fn new(path: PathBuf) -> Self {
        RecordFile { path, file: None, committed: 0, buffer: Vec::new(), dropped: 0 }
    }

    /// Bytes written and buffered so far (the offset the next record starts at).
    pub fn len(&self) -> u64 {
        self.committed + self.buffer.len() as u64
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// Writes the buffer out and syncs it to the OS (not to the disk: a killed process
    /// keeps what the kernel has).
    pub fn commit(&mut self) -> Result<()> {
        if self.buffer.is_empty() && self.file.is_some() {
            return Ok(());
        }
        let result = self.try_commit();
        if result.is_err() && self.buffer.len() > MAX_BUFFERED {
            self.dropped += self.buffer.len() as u64;
            self.buffer.clear();
        }
        result.map_err(|e| {
            let e = if self.dropped > 0 {
                std::io::Error::new(
                    e.kind(),
                    format!("{e}; {} bytes of records dropped so far", self.dropped),
                )
            } else {
                e
            };
            Error::io("writing tracker records to", &self.path, e)
        })
    }

    fn try_commit(&mut self) -> std::io::Result<()> {
        if self.file.is_none() {
            if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            let file = OpenOptions::new().create(true).append(true).open(&self.path)?;
            self.committed = file.metadata()?.len();
            self.file = Some(file);
        }
        let file = self.file.as_mut().expect("opened above");
        match file.write_all(&self.buffer).and_then(|_| file.flush()) {
            Ok(()) => {
                self.committed += self.buffer.len() as u64;
                self.buffer.clear();
                Ok(())
            }
            Err(e) => {
                // Cut a partial write back so the file stays whole records; the
                // buffer is kept for the next try.
                let _ = file.set_len(self.committed);
                Err(e)
            }
        }
    }
}

/// A fresh run id.
pub(crate) fn run_id(seed: &str) -> String {
    // Eight lowercase letters and digits, as W&B's run ids; unique per start.
    let mut h =
        xxhash_rust::xxh3::xxh3_64(format!("{seed}|{}|{}", std::process::id(), unix_time()).as_bytes());
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    (0..8)
        .map(|_| {
            let c = ALPHABET[(h % 36) as usize] as char;
            h /= 36;
            c
        })
        .collect()
}

kiln_core::register_tracker!("stdout", "a compact line per step and a summary table", stdout::build);
kiln_core::register_tracker!("jsonl", "one JSON object per event, in a .jsonl file", jsonl::build);
kiln_core::register_tracker!(
    "tensorboard",
    "TensorBoard event files (scalars, config, summary)",
    tensorboard::build
);
kiln_core::register_tracker!(
    "wandb",
    "a Weights & Biases run, offline (wandb sync) or synced at the end",
    wandb::build
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_files_append_whole_commits() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = RecordFile::new(dir.path().join("a/b.log"));
        f.push(b"one\n");
        assert_eq!(f.len(), 4);
        f.commit().unwrap();
        f.push(b"two\n");
        f.commit().unwrap();
        assert_eq!(std::fs::read(dir.path().join("a/b.log")).unwrap(), b"one\ntwo\n");
    }

    #[test]
    fn an_unwritable_place_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("file"), "").unwrap();
        let mut f = RecordFile::new(dir.path().join("file/x.log"));
        f.push(b"x");
        let e = f.commit().unwrap_err().to_string();
        assert!(e.contains("file/x.log"), "{e}");
    }

    #[test]
    fn every_kind_is_registered() {
        let registry = kiln_core::trackers().unwrap();
        for kind in KINDS {
            registry.get(kind).unwrap();
        }
        let e = registry.get("tensorbored").unwrap_err().to_string();
        assert!(e.contains("tensorboard") && e.contains("wandb"), "{e}");
    }
}
