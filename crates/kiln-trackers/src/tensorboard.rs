//! `tensorboard`: TensorBoard event files.
//!
//! A file `events.out.tfevents.<time>.<host>.<pid>.kiln` in `<logdir>/<run_name>/`
//! holds TFRecords — length, masked CRC32C of the length, an `Event` protobuf, masked
//! CRC32C of the data — as TensorFlow writes them: a `brain.Event:2` version event
//! first, then one event per step with a scalar per metric, the config and the
//! profile as text (TensorBoard's text plugin), and the summary both as scalars under
//! `summary/` at the last step and as a text table.

use std::path::PathBuf;

use kiln_core::{Clip, Metrics, ProfileReport, Result, Tracker, TrackerSetup};
use serde::Deserialize;

use crate::proto::Message;
use crate::{FlushClock, RecordFile, hostname, unix_time};

const CRC32C: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    /// Folder of runs, relative to `tracking.dir`; default `tensorboard`.
    logdir: Option<PathBuf>,
    flush_interval_s: Option<f64>,
}

/// Writes TensorBoard event files.
pub struct TensorBoardTracker {
    file: RecordFile,
    clock: FlushClock,
    last_step: u64,
}

pub(crate) fn build(setup: &TrackerSetup) -> Result<Box<dyn Tracker>> {
    let options: Options = setup.options()?;
    let run_dir = setup.resolve(options.logdir.unwrap_or_else(|| "tensorboard".into())).join(&setup.run_name);
    let clock =
        FlushClock::new(options.flush_interval_s, &format!("trackers[{}].flush_interval_s", setup.index))?;
    Ok(Box::new(TensorBoardTracker::new(run_dir, clock)))
}

/// TFRecord's checksum: CRC32C, rotated and offset so data holding CRCs does not
/// checksum to itself.
fn masked_crc(data: &[u8]) -> u32 {
    let crc = CRC32C.checksum(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord around `data`.
fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

fn event(step: u64) -> Message {
    Message::new().double(1, unix_time()).int(2, step as i64)
}

/// `Summary.Value` of a scalar.
fn scalar(tag: &str, value: f64) -> Message {
    Message::new().string(1, tag).float(2, value as f32)
}

/// `Summary.Value` of TensorBoard's text plugin: a string tensor with its metadata.
fn text(tag: &str, markdown: &str) -> Message {
    let plugin = Message::new().message(1, Message::new().string(1, "text"));
    let tensor =
        Message::new().int(1, 7 /* DT_STRING */).message(2, Message::new()).bytes(8, markdown.as_bytes());
    Message::new().string(1, tag).message(9, plugin).message(8, tensor)
}

impl TensorBoardTracker {
    /// A tracker writing into `run_dir` (created on first flush).
    pub(crate) fn new(run_dir: PathBuf, clock: FlushClock) -> Self {
        let host = hostname().filter(|h| !h.contains('/')).unwrap_or_else(|| "localhost".into());
        let name = format!("events.out.tfevents.{}.{host}.{}.kiln", unix_time() as u64, std::process::id());
        let mut file = RecordFile::new(run_dir.join(name));
        file.push(&record(&event(0).string(3, "brain.Event:2").0));
        TensorBoardTracker { file, clock, last_step: 0 }
    }

    fn write(&mut self, step: u64, values: Vec<Message>) -> Result<()> {
        let summary = values.into_iter().fold(Message::new(), |s, v| s.message(1, v));
        self.file.push(&record(&event(step).message(5, summary).0));
        self.tick()
    }
}

impl Tracker for TensorBoardTracker {
    fn log_config(&mut self, config: &serde_json::Value) -> Result<()> {
        let pretty = serde_json::to_string_pretty(config).unwrap_or_default();
        // Indented by four spaces: a Markdown code block, as the text plugin renders it.
        let markdown: String = pretty.lines().map(|l| format!("    {l}\n")).collect();
        self.write(0, vec![text("config", &markdown)])
    }

    fn log_metrics(&mut self, step: u64, metrics: &Metrics) -> Result<()> {
        self.last_step = step;
        self.write(step, metrics.iter().filter(|(_, v)| v.is_finite()).map(|(k, v)| scalar(k, *v)).collect())
    }

    fn log_summary(&mut self, summary: &Metrics) -> Result<()> {
        let mut values: Vec<Message> = summary
            .iter()
            .filter(|(_, v)| v.is_finite())
            .map(|(k, v)| scalar(&format!("summary/{k}"), *v))
            .collect();
        let mut table = String::from("| metric | value |\n|---|---:|\n");
        for (k, v) in summary {
            table.push_str(&format!("| {k} | {v} |\n"));
        }
        values.push(text("summary", &table));
        self.write(self.last_step, values)
    }

    fn log_profile(&mut self, report: &ProfileReport) -> Result<()> {
        self.write(self.last_step, vec![text("profile", &report.to_markdown())])
    }

    /// An image summary holding the GIF: TensorBoard's image dashboard plays it.
    fn log_video(&mut self, step: u64, tag: &str, clip: &Clip<'_>) -> Result<()> {
        let image = Message::new()
            .int(1, i64::from(clip.height))
            .int(2, i64::from(clip.width))
            .int(3, 3 /* RGB */)
            .bytes(4, clip.gif);
        self.write(step, vec![Message::new().string(1, tag).message(4, image)])
    }

    fn tick(&mut self) -> Result<()> {
        if self.clock.due() { self.flush() } else { Ok(()) }
    }

    fn flush(&mut self) -> Result<()> {
        self.clock.reset();
        self.file.commit()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_framed_as_tfrecord() {
        // CRC32C("123456789") = 0xE3069283 (the standard check value).
        assert_eq!(CRC32C.checksum(b"123456789"), 0xe306_9283);
        let r = record(b"abc");
        assert_eq!(r.len(), 8 + 4 + 3 + 4);
        assert_eq!(&r[..8], &3u64.to_le_bytes());
        assert_eq!(&r[12..15], b"abc");
        assert_eq!(u32::from_le_bytes(r[15..].try_into().unwrap()), masked_crc(b"abc"));
    }
}
