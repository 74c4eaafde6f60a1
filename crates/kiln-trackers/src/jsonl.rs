//! `jsonl`: one JSON object per event, one event per line.
//!
//! Events: `{"event": "config", "run", "time", "config"}`, `{"event": "metrics", "run",
//! "time", "step", "metrics"}`, `{"event": "summary", ..., "summary"}`, `{"event":
//! "profile", ..., "profile"}` and `{"event": "end", ...}`. `time` is Unix seconds.
//! Lines are written whole on flush, so a killed run leaves a file of complete lines.

use std::path::PathBuf;

use kiln_core::{Clip, Metrics, ProfileReport, Result, Tracker, TrackerSetup};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{FlushClock, RecordFile, unix_time};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    /// File, relative to `tracking.dir`; default `<run_name>.jsonl`.
    path: Option<PathBuf>,
    flush_interval_s: Option<f64>,
}

/// Appends events as JSON Lines.
pub struct JsonlTracker {
    file: RecordFile,
    clock: FlushClock,
    run: String,
}

pub(crate) fn build(setup: &TrackerSetup) -> Result<Box<dyn Tracker>> {
    let options: Options = setup.options()?;
    let path = setup.resolve(options.path.unwrap_or_else(|| format!("{}.jsonl", setup.run_name).into()));
    let clock =
        FlushClock::new(options.flush_interval_s, &format!("trackers[{}].flush_interval_s", setup.index))?;
    Ok(Box::new(JsonlTracker { file: RecordFile::new(path), clock, run: setup.run_name.clone() }))
}

impl JsonlTracker {
    fn event(&mut self, event: &str, key: &str, value: Value, step: Option<u64>) -> Result<()> {
        let mut line = json!({"event": event, "run": self.run, "time": unix_time()});
        if let Some(step) = step {
            line["step"] = json!(step);
        }
        if !key.is_empty() {
            line[key] = value;
        }
        let mut bytes =
            serde_json::to_vec(&line).map_err(|e| kiln_core::Error::InvalidInput(e.to_string()))?;
        bytes.push(b'\n');
        self.file.push(&bytes);
        self.tick()
    }
}

impl Tracker for JsonlTracker {
    fn log_config(&mut self, config: &Value) -> Result<()> {
        self.event("config", "config", config.clone(), None)
    }

    fn log_metrics(&mut self, step: u64, metrics: &Metrics) -> Result<()> {
        self.event("metrics", "metrics", json!(metrics), Some(step))
    }

    fn log_summary(&mut self, summary: &Metrics) -> Result<()> {
        self.event("summary", "summary", json!(summary), None)
    }

    fn log_profile(&mut self, report: &ProfileReport) -> Result<()> {
        self.event("profile", "profile", json!(report), None)
    }

    /// The video's description (not its bytes: a JSON line is no place for a GIF).
    fn log_video(&mut self, step: u64, tag: &str, clip: &Clip<'_>) -> Result<()> {
        let video = json!({"tag": tag, "frames": clip.frames, "width": clip.width, "height": clip.height,
                           "fps": clip.fps, "gif_bytes": clip.gif.len()});
        self.event("video", "video", video, Some(step))
    }

    fn tick(&mut self) -> Result<()> {
        if self.clock.due() { self.flush() } else { Ok(()) }
    }

    fn flush(&mut self) -> Result<()> {
        self.clock.reset();
        self.file.commit()
    }

    fn finish(&mut self) -> Result<()> {
        self.event("end", "", Value::Null, None)?;
        self.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(dir: &std::path::Path, index: usize, options: Value) -> TrackerSetup {
        TrackerSetup {
            index,
            config: kiln_core::TrackerConfig {
                kind: "jsonl".into(),
                options: serde_json::from_value(options).unwrap(),
            },
            dir: dir.into(),
            run_name: "r".into(),
        }
    }

    #[test]
    fn writes_one_object_per_line_and_only_on_flush() {
        let dir = tempfile::tempdir().unwrap();
        let setup = setup(dir.path(), 0, json!({"flush_interval_s": 3600}));
        let mut t = build(&setup).unwrap();
        let path = dir.path().join("r.jsonl");
        t.log_config(&json!({"a": 1})).unwrap();
        t.log_metrics(1, &Metrics::from([("x".into(), 1.5)])).unwrap();
        assert!(!path.exists(), "nothing is written before a flush");
        t.flush().unwrap();
        t.log_metrics(2, &Metrics::from([("x".into(), 2.5)])).unwrap();
        t.finish().unwrap();
        let lines: Vec<Value> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let events: Vec<&str> = lines.iter().map(|l| l["event"].as_str().unwrap()).collect();
        assert_eq!(events, ["config", "metrics", "metrics", "end"]);
        assert_eq!(lines[2]["step"], 2);
        assert_eq!(lines[2]["metrics"]["x"], 2.5);
    }

    #[test]
    fn tick_flushes_once_the_interval_has_passed() {
        let dir = tempfile::tempdir().unwrap();
        let setup = setup(dir.path(), 0, json!({"flush_interval_s": 0.2}));
        let mut t = build(&setup).unwrap();
        t.log_metrics(1, &Metrics::new()).unwrap();
        t.tick().unwrap();
        let path = dir.path().join("r.jsonl");
        assert!(!path.exists(), "not due yet");
        std::thread::sleep(std::time::Duration::from_millis(250));
        t.tick().unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 1);
    }

    #[test]
    fn a_misspelt_key_names_the_entry() {
        let setup = setup(std::path::Path::new("."), 3, json!({"pth": "x"}));
        let e = build(&setup).err().unwrap().to_string();
        assert!(e.contains("trackers[3]") && e.contains("pth") && e.contains("path"), "{e}");
    }
}
