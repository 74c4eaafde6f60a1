//! `examples/observability.toml` with all four trackers, `--profile` and `--trace`: the
//! files are read back with the real readers — TensorBoard's EventAccumulator, the
//! wandb package's DataStore, Python's json — and agree with each other. A run killed
//! with SIGKILL leaves its TensorBoard and JSON Lines files readable.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{jsonl_events, kiln, read_with, root};

/// `n` distinct texts, one per line.
fn texts(dir: &Path, n: usize) -> std::path::PathBuf {
    let path = dir.join("texts.txt");
    let lines: Vec<String> = (0..n)
        .map(|i| format!("text number {i} about kilns, firing clay and glazes at {} degrees", 900 + i))
        .collect();
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

#[test]
fn every_tracker_profile_and_trace_read_back_with_the_real_readers() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let input = texts(dir, 600);
    let out = dir.join("embeddings.jsonl");
    let runs = dir.join("runs");
    let (profile, trace) = (dir.join("profile.json"), dir.join("trace.json"));
    let result = kiln(&[
        "run",
        "examples/observability.toml",
        "--input",
        input.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--set",
        &format!("tracking.dir={:?}", runs.to_str().unwrap()),
        "--set",
        "tracking.run_name=obs-test",
        "--set",
        "tracking.interval_ms=100",
        // Small batches spread the run over several metric steps.
        "--set",
        "batching.max_batch_size=4",
        "--profile",
        profile.to_str().unwrap(),
        "--trace",
        trace.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(result.status.success(), "{stderr}");
    assert!(
        stderr.contains("[obs-test] step 1 |") && stderr.contains("[obs-test] summary"),
        "stdout tracker: {stderr}"
    );

    // JSON Lines: config, metric steps 1..=n in order, summary, profile, end.
    let events = jsonl_events(&runs.join("obs-test.jsonl"));
    let kinds: Vec<&str> = events.iter().map(|e| e["event"].as_str().unwrap()).collect();
    let metrics: Vec<&Value> = events.iter().filter(|e| e["event"] == "metrics").collect();
    let n = metrics.len();
    assert!(n >= 3, "a run of several 100 ms intervals has several steps: {kinds:?}");
    assert_eq!(kinds[0], "config");
    assert_eq!(kinds[n + 1..], ["summary", "profile", "end"]);
    let steps: Vec<u64> = metrics.iter().map(|m| m["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=n as u64).collect::<Vec<_>>());
    let summary = &events[n + 1]["summary"];
    assert_eq!(summary["texts"], 600.0);

    // TensorBoard: every scalar at the steps and values the JSON Lines file has.
    let tb = read_with("read_tensorboard.py", &runs.join("tensorboard/obs-test"));
    for m in &metrics {
        let step = m["step"].as_u64().unwrap();
        for (key, value) in m["metrics"].as_object().unwrap() {
            let points = tb["scalars"][key].as_array().unwrap_or_else(|| panic!("TensorBoard lacks `{key}`"));
            let point = points
                .iter()
                .find(|p| p[0].as_u64() == Some(step))
                .unwrap_or_else(|| panic!("TensorBoard lacks `{key}` at step {step}"));
            let (seen, want) = (point[1].as_f64().unwrap(), value.as_f64().unwrap());
            assert!((seen - want).abs() <= want.abs() * 1e-6 + 1e-6, "{key}@{step}: {seen} vs {want}");
        }
    }
    assert_eq!(tb["scalars"]["throughput_rps"].as_array().unwrap().len(), n);
    assert_eq!(tb["scalars"]["summary/texts"][0][1], 600.0);
    assert!(tb["texts"]["config"][0].as_str().unwrap().contains("all-MiniLM-L6-v2"));
    assert!(tb["texts"]["profile"][0].as_str().unwrap().contains("| model_run |"));

    // wandb: header and run first, a history row per step, the summary, exit 0.
    let wandb_dir = std::fs::read_dir(runs.join("wandb")).unwrap().next().unwrap().unwrap().path();
    let name = wandb_dir.file_name().unwrap().to_str().unwrap().to_string();
    assert!(name.starts_with("offline-run-"), "{name}");
    let id = name.rsplit('-').next().unwrap();
    let wb = read_with("read_wandb.py", &wandb_dir.join(format!("run-{id}.wandb")));
    let wb_kinds: Vec<&str> = wb["kinds"].as_array().unwrap().iter().map(|k| k.as_str().unwrap()).collect();
    assert_eq!(wb_kinds[..2], ["header", "run"]);
    assert_eq!(wb_kinds.last(), Some(&"exit"));
    assert_eq!(wb["exit_code"], 0);
    assert_eq!(wb["run"]["run_id"], id);
    assert_eq!(wb["run"]["project"], "kiln-examples");
    assert_eq!(wb["run"]["display_name"], "obs-test");
    assert_eq!(wb["run"]["config"]["batching"], events[0]["config"]["batching"]);
    let history = wb["history"].as_array().unwrap();
    assert_eq!(history.len(), n);
    for (row, m) in history.iter().zip(&metrics) {
        assert_eq!(row["_step"], m["step"]);
        assert_eq!(row["step.num"], m["step"]);
        assert_eq!(row["throughput_rps"], m["metrics"]["throughput_rps"]);
    }
    assert_eq!(wb["summary"]["texts"], 600.0);
    assert!(wb["summary"]["profile"]["spans"]["model_run"]["count"].as_u64().unwrap() >= 150);

    // The profile: every stage, with counts that add up.
    let report: Value = serde_json::from_slice(&std::fs::read(&profile).unwrap()).unwrap();
    for stage in [
        "request",
        "cache_lookup",
        "tokenize",
        "queue_wait",
        "batch_run",
        "model_run",
        "collate",
        "load_model",
    ] {
        assert!(report["spans"][stage]["count"].as_u64().unwrap() >= 1, "no `{stage}` span: {report}");
    }
    assert_eq!(report["spans"]["queue_wait"]["count"], 600, "one queue wait per text");
    assert!(report["peak_rss_bytes"].as_u64().unwrap() > 50 << 20);
    assert!(report["samples"].as_u64().unwrap() >= 1);

    // The trace, loaded with Python's json: complete events with pid/tid, counters.
    let t = read_with("read_chrome_trace.py", &trace);
    assert_eq!(t["complete_events_have_fields"], true);
    assert_eq!(t["spans"]["queue_wait"], 600);
    assert_eq!(t["spans"]["load_model"], 1);
    assert!(
        t["counters"]["memory"].as_u64().unwrap() >= 1 && t["rss_mib_max"].as_f64().unwrap() > 50.0,
        "{t}"
    );
    assert!(
        t["threads"].as_array().unwrap().iter().any(|n| n.as_str().unwrap().starts_with("kiln-model")),
        "{t}"
    );
}

#[test]
fn a_run_killed_with_sigkill_leaves_readable_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let config = dir.join("kill.toml");
    let model = root().join(".kiln/models/all-MiniLM-L6-v2");
    std::fs::write(
        &config,
        format!(
            "[model]\npath = {:?}\n[tracking]\ninterval_ms = 50\ndir = {:?}\nrun_name = \"killed\"\n\
             [[trackers]]\nkind = \"jsonl\"\nflush_interval_s = 0.1\n\
             [[trackers]]\nkind = \"tensorboard\"\nflush_interval_s = 0.1\n",
            model.to_str().unwrap(),
            dir.to_str().unwrap()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["bench", config.to_str().unwrap(), "--requests", "1000000", "--concurrency", "8"])
        .current_dir(root())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let jsonl = dir.join("killed.jsonl");
    let started = Instant::now();
    while std::fs::read_to_string(&jsonl).map_or(0, |s| s.matches("\"event\":\"metrics\"").count()) < 5 {
        assert!(started.elapsed() < Duration::from_secs(120), "no metrics were flushed in 2 minutes");
        assert!(child.try_wait().unwrap().is_none(), "kiln bench exited early");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL: no flush, no finish
    child.wait().unwrap();

    let events = jsonl_events(&jsonl); // every line parses
    assert_eq!(events[0]["event"], "config");
    assert!(events.iter().all(|e| e["event"] != "end"), "a killed run never ended");
    let steps: Vec<u64> = events.iter().filter_map(|e| e["step"].as_u64()).collect();
    assert!(steps.len() >= 5 && steps.iter().zip(1..).all(|(&s, i)| s == i), "{steps:?}");

    let tb = read_with("read_tensorboard.py", &dir.join("tensorboard/killed"));
    let tb_steps: Vec<u64> =
        tb["scalars"]["throughput_rps"].as_array().unwrap().iter().map(|p| p[0].as_u64().unwrap()).collect();
    assert!(tb_steps.len() >= 3 && tb_steps.iter().zip(1..).all(|(&s, i)| s == i), "{tb_steps:?}");
}
