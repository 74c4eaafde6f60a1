//! `wandb`: a Weights & Biases run in the offline format `wandb sync` uploads.
//!
//! Layout, as the `wandb` package writes with `WANDB_MODE=offline`:
//! `<dir>/wandb/offline-run-<YYYYMMDD_HHMMSS>-<id>/run-<id>.wandb` (time in UTC), plus
//! `files/wandb-summary.json` at the end. The `.wandb` file is W&B's LevelDB-style log:
//! a 7-byte `:W&B` header, then records in 32 KiB blocks, each with a CRC-32 of its
//! type and data, a length and a type (full, or first/middle/last pieces of a record
//! that spans blocks). Each record is a `wandb_internal.Record` protobuf: a header, the
//! run (id, project, entity, name, host, start time, config), a history row and a
//! summary update per step, the final summary (with the profile under `profile`), and
//! an exit record.
//!
//! `mode = "online"` writes the same run and uploads it at the end with `wandb sync`
//! (the `wandb` command must be installed and logged in, e.g. `WANDB_API_KEY`); a
//! failed upload is a tracker error and leaves the offline run to sync by hand.

use std::path::PathBuf;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use kiln_core::{Clip, Error, Metrics, ProfileReport, Result, Tracker, TrackerSetup, utc_datetime};
use serde::Deserialize;
use serde_json::Value;

use crate::proto::Message;
use crate::{FlushClock, RecordFile, hostname, run_id, unix_time};

const CRC32: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);
const BLOCK: usize = 32 * 1024;
const HEADER: usize = 7;
const FULL: u8 = 1;
const FIRST: u8 = 2;
const MIDDLE: u8 = 3;
const LAST: u8 = 4;

/// Offline (default) or uploaded at the end.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Write the run for `wandb sync` later.
    #[default]
    Offline,
    /// Write the run, then `wandb sync` it at the end.
    Online,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    /// Folder the `wandb/` folder goes in, relative to `tracking.dir`; default: it.
    dir: Option<PathBuf>,
    project: Option<String>,
    entity: Option<String>,
    run_name: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    mode: Mode,
    flush_interval_s: Option<f64>,
}

/// Writes a W&B run.
pub struct WandbTracker {
    log: RecordFile,
    run_dir: PathBuf,
    clock: FlushClock,
    mode: Mode,
    id: String,
    project: String,
    entity: Option<String>,
    name: String,
    tags: Vec<String>,
    num: i64,
    started: (SystemTime, Instant),
    run_written: bool,
    summary: serde_json::Map<String, Value>,
}

pub(crate) fn build(setup: &TrackerSetup) -> Result<Box<dyn Tracker>> {
    let o: Options = setup.options()?;
    let now = SystemTime::now();
    let id = run_id(&setup.run_name);
    let (y, mo, d, h, mi, s) = utc_datetime(now);
    let base = setup.resolve(o.dir.unwrap_or_default()).join("wandb");
    let run_dir = base.join(format!("offline-run-{y:04}{mo:02}{d:02}_{h:02}{mi:02}{s:02}-{id}"));
    let clock = FlushClock::new(o.flush_interval_s, &format!("trackers[{}].flush_interval_s", setup.index))?;
    let mut log = RecordFile::new(run_dir.join(format!("run-{id}.wandb")));
    // File header: ident, magic (low 16 bits of crc32("Weights & Biases")), version 0.
    log.push(b":W&B");
    log.push(&0xBEE1u16.to_le_bytes());
    log.push(&[0]);
    let mut tracker = WandbTracker {
        log,
        run_dir,
        clock,
        mode: o.mode,
        id,
        project: o.project.unwrap_or_else(|| "kiln".into()),
        entity: o.entity,
        name: o.run_name.unwrap_or_else(|| setup.run_name.clone()),
        tags: o.tags,
        num: 0,
        started: (now, Instant::now()),
        run_written: false,
        summary: serde_json::Map::new(),
    };
    let version = Message::new().string(1, concat!("kiln ", env!("CARGO_PKG_VERSION"))).string(2, "0.40.0");
    tracker.record(21, Message::new().message(1, version));
    Ok(Box::new(tracker))
}

fn json(v: &Value) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

/// A `HistoryItem`/`SummaryItem`/`ConfigItem`: key and JSON value.
fn item(key: &str, value: &Value) -> Message {
    Message::new().string(2, key).string(16, &json(value))
}

impl WandbTracker {
    /// Appends one `Record` with its `field` set to `body`, in LevelDB-log framing.
    fn record(&mut self, field: u32, body: Message) {
        self.num += 1;
        let data = Message::new().int(1, self.num).message(field, body).0;
        let mut rest = &data[..];
        let mut first = true;
        loop {
            let offset = self.log.len() as usize % BLOCK;
            let mut space = BLOCK - offset;
            if space < HEADER {
                self.log.push(&vec![0; space]);
                space = BLOCK;
            }
            let room = space - HEADER;
            let (kind, piece) = match (first, rest.len() <= room) {
                (true, true) => (FULL, rest),
                (true, false) => (FIRST, &rest[..room]),
                (false, true) => (LAST, rest),
                (false, false) => (MIDDLE, &rest[..room]),
            };
            let mut digest = CRC32.digest();
            digest.update(&[kind]);
            digest.update(piece);
            self.log.push(&digest.finalize().to_le_bytes());
            self.log.push(&(piece.len() as u16).to_le_bytes());
            self.log.push(&[kind]);
            self.log.push(piece);
            rest = &rest[piece.len()..];
            first = false;
            if kind == FULL || kind == LAST {
                return;
            }
        }
    }

    fn write_run(&mut self, config: Option<&Value>) {
        if self.run_written {
            return;
        }
        self.run_written = true;
        let since = self.started.0.duration_since(UNIX_EPOCH).unwrap_or_default();
        let start = Message::new().int(1, since.as_secs() as i64).int(2, i64::from(since.subsec_nanos()));
        let mut config_record = Message::new();
        if let Some(Value::Object(map)) = config {
            for (k, v) in map {
                config_record = config_record.message(1, Message::new().string(1, k).string(16, &json(v)));
            }
        }
        let host = hostname().unwrap_or_default();
        let mut run = Message::new().string(1, &self.id.clone());
        if let Some(entity) = self.entity.clone() {
            run = run.string(2, &entity);
        }
        run = run.string(3, &self.project.clone()).message(4, config_record).string(8, &self.name.clone());
        for tag in self.tags.clone() {
            run = run.string(10, &tag);
        }
        run = run.string(13, &host).message(17, start);
        self.record(17, run);
    }

    fn runtime(&self) -> f64 {
        self.started.1.elapsed().as_secs_f64()
    }

    /// A history row at `step` (with W&B's `_step`, `_runtime`, `_timestamp`) and the
    /// summary update that goes with it: W&B keeps a run's summary as the latest value
    /// of each key, updated per row.
    fn history_row(&mut self, step: u64, mut row: Vec<(String, Value)>) {
        row.push(("_step".into(), Value::from(step)));
        row.push(("_runtime".into(), Value::from(self.runtime())));
        row.push(("_timestamp".into(), Value::from(unix_time())));
        let mut history = Message::new();
        let mut summary = Message::new();
        for (k, v) in &row {
            history = history.message(1, item(k, v));
            summary = summary.message(1, item(k, v));
            self.summary.insert(k.clone(), v.clone());
        }
        history = history.message(2, Message::new().int(1, step as i64));
        self.record(3, summary);
        self.record(2, history);
    }
}

impl Tracker for WandbTracker {
    fn log_config(&mut self, config: &Value) -> Result<()> {
        self.write_run(Some(config));
        self.tick()
    }

    fn log_metrics(&mut self, step: u64, metrics: &Metrics) -> Result<()> {
        self.write_run(None);
        self.history_row(step, metrics.iter().map(|(k, v)| (k.clone(), Value::from(*v))).collect());
        self.tick()
    }

    /// W&B's video media: the GIF under `files/media/videos/`, a history row whose `tag`
    /// is the `video-file` record pointing at it, and a files record so `wandb sync`
    /// uploads it.
    fn log_video(&mut self, step: u64, tag: &str, clip: &Clip<'_>) -> Result<()> {
        use sha2::Digest;
        self.write_run(None);
        let sha256: String = sha2::Sha256::digest(clip.gif).iter().map(|b| format!("{b:02x}")).collect();
        let safe: String =
            tag.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' }).collect();
        let path = format!("media/videos/{safe}_{step}_{}.gif", &sha256[..20]);
        let file = self.run_dir.join("files").join(&path);
        std::fs::create_dir_all(file.parent().expect("a folder"))
            .and_then(|_| std::fs::write(&file, clip.gif))
            .map_err(|e| Error::io("writing", &file, e))?;
        let media = serde_json::json!({"_type": "video-file", "path": path, "sha256": sha256,
                                       "size": clip.gif.len(), "width": clip.width, "height": clip.height});
        self.history_row(step, vec![(tag.to_string(), media)]);
        // FilesRecord { FilesItem { path, policy: NOW } }.
        self.record(6, Message::new().message(1, Message::new().string(1, &path).int(2, 0)));
        self.tick()
    }

    fn log_summary(&mut self, summary: &Metrics) -> Result<()> {
        self.write_run(None);
        let mut update = Message::new();
        for (k, v) in summary {
            update = update.message(1, item(k, &Value::from(*v)));
            self.summary.insert(k.clone(), Value::from(*v));
        }
        self.record(3, update);
        self.tick()
    }

    fn log_profile(&mut self, report: &ProfileReport) -> Result<()> {
        self.write_run(None);
        let value = serde_json::to_value(report).unwrap_or(Value::Null);
        self.summary.insert("profile".into(), value.clone());
        self.record(3, Message::new().message(1, item("profile", &value)));
        self.tick()
    }

    fn tick(&mut self) -> Result<()> {
        if self.clock.due() { self.flush() } else { Ok(()) }
    }

    fn flush(&mut self) -> Result<()> {
        self.clock.reset();
        self.log.commit()
    }

    fn finish(&mut self) -> Result<()> {
        self.write_run(None);
        let runtime = self.runtime();
        self.record(18, Message::new().int(1, 0).int(2, runtime as i64));
        self.flush()?;
        let files = self.run_dir.join("files");
        std::fs::create_dir_all(&files)
            .and_then(|_| {
                let summary = serde_json::to_vec_pretty(&self.summary).unwrap_or_default();
                std::fs::write(files.join("wandb-summary.json"), summary)
            })
            .map_err(|e| Error::io("writing", files.join("wandb-summary.json"), e))?;
        if self.mode == Mode::Online {
            self.sync()?;
        }
        Ok(())
    }
}

impl WandbTracker {
    /// Uploads the finished run with the `wandb` command.
    fn sync(&self) -> Result<()> {
        let mut command = std::process::Command::new("wandb");
        command.arg("sync").arg("--project").arg(&self.project);
        if let Some(entity) = &self.entity {
            command.arg("--entity").arg(entity);
        }
        let status = command.arg(&self.run_dir).status().map_err(|e| {
            Error::io(
                "running `wandb sync` (mode = \"online\" needs the wandb command: pip install wandb) for",
                &self.run_dir,
                e,
            )
        })?;
        if status.success() {
            Ok(())
        } else {
            Err(Error::Unsupported(format!(
                "`wandb sync {}` failed ({status}); is WANDB_API_KEY set and W&B reachable? The offline run stays \
                 there to sync by hand",
                self.run_dir.display()
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracker(dir: &std::path::Path) -> Box<dyn Tracker> {
        let setup = TrackerSetup {
            index: 0,
            config: kiln_core::TrackerConfig { kind: "wandb".into(), options: Default::default() },
            dir: dir.into(),
            run_name: "r".into(),
        };
        build(&setup).unwrap()
    }

    /// Reads the framing back: (type, payload) pieces, checking every CRC and pad.
    fn pieces(bytes: &[u8]) -> Vec<(u8, usize)> {
        assert_eq!(&bytes[..7], b":W&B\xe1\xbe\x00");
        let mut at = 7;
        let mut out = Vec::new();
        while at < bytes.len() {
            if BLOCK - at % BLOCK < HEADER {
                assert!(bytes[at..at + BLOCK - at % BLOCK].iter().all(|&b| b == 0));
                at += BLOCK - at % BLOCK;
                continue;
            }
            let crc = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
            let len = u16::from_le_bytes(bytes[at + 4..at + 6].try_into().unwrap()) as usize;
            let kind = bytes[at + 6];
            let data = &bytes[at + 7..at + 7 + len];
            let mut digest = CRC32.digest();
            digest.update(&[kind]);
            digest.update(data);
            assert_eq!(crc, digest.finalize());
            assert!(at % BLOCK + 7 + len <= BLOCK, "a piece stays in its block");
            out.push((kind, len));
            at += 7 + len;
        }
        out
    }

    #[test]
    fn records_larger_than_a_block_are_split_into_pieces() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = tracker(dir.path());
        let big: Metrics = (0..6000).map(|i| (format!("metric_{i:05}"), i as f64)).collect();
        t.log_metrics(1, &big).unwrap();
        t.finish().unwrap();
        let file = std::fs::read_dir(dir.path().join("wandb")).unwrap().next().unwrap().unwrap().path();
        let name = file.file_name().unwrap().to_str().unwrap().to_string();
        assert!(
            name.starts_with("offline-run-") && name.len() == "offline-run-20261122_204854-zr847utd".len(),
            "{name}"
        );
        let id = &name[name.len() - 8..];
        let bytes = std::fs::read(file.join(format!("run-{id}.wandb"))).unwrap();
        let kinds: Vec<u8> = pieces(&bytes).into_iter().map(|(k, _)| k).collect();
        assert!(kinds.contains(&FIRST) && kinds.contains(&MIDDLE) && kinds.contains(&LAST), "{kinds:?}");
        assert!(file.join("files/wandb-summary.json").is_file());
    }
}
