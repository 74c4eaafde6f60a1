//! Trackers that cannot write, or that hang, never fail or hold up inference: failures
//! are counted in `stats().tracker_failures`, and requests are answered while a
//! tracker is stuck.

mod support;

use std::sync::Mutex;
use std::time::Duration;

use kiln::{Metrics, Result, Tracker, TrackerSetup};

/// Fault injection: a tracker whose `log_metrics` blocks until the test lets it go.
struct Stuck;

static GATE: Mutex<Option<std::sync::mpsc::Receiver<()>>> = Mutex::new(None);
static STEPS_ENTERED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl Tracker for Stuck {
    fn log_metrics(&mut self, _: u64, _: &Metrics) -> Result<()> {
        STEPS_ENTERED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if let Some(gate) = GATE.lock().unwrap().take() {
            let _ = gate.recv(); // first step: wait for the test
        }
        Ok(())
    }
}

fn stuck(_: &TrackerSetup) -> Result<Box<dyn Tracker>> {
    Ok(Box::new(Stuck))
}

kiln::register_tracker!("stuck-test-double", "fault injection: blocks until released", stuck);

fn texts(n: usize, tag: &str) -> Vec<String> {
    (0..n).map(|i| format!("{tag} text {i}")).collect()
}

#[tokio::test]
async fn unwritable_tracker_files_are_counted_and_inference_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let not_a_dir = dir.path().join("a-file");
    std::fs::write(&not_a_dir, "").unwrap();
    let mut config = support::minilm_config(&[
        &format!("tracking.dir={:?}", not_a_dir.to_str().unwrap()),
        "tracking.interval_ms=20",
    ]);
    for kind in ["jsonl", "tensorboard", "wandb"] {
        let options = serde_json::from_value(serde_json::json!({"flush_interval_s": 0})).unwrap();
        config.trackers.push(kiln::TrackerConfig { kind: kind.into(), options });
    }
    let optimizer = kiln::Optimizer::from_config(config).await.unwrap();
    for round in 0..5 {
        let vectors = optimizer.embed(&texts(8, &format!("round {round}"))).await.unwrap();
        assert_eq!(vectors.len(), 8);
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let stats = optimizer.shutdown().await.unwrap();
    for kind in ["jsonl", "tensorboard", "wandb"] {
        let failures = stats.tracker_failures.get(kind).copied().unwrap_or(0);
        assert!(failures >= 2, "{kind}: {:?}", stats.tracker_failures);
    }
    assert!(stats.errors.is_empty(), "no request failed: {:?}", stats.errors);
}

#[tokio::test]
async fn a_stuck_tracker_does_not_hold_up_requests() {
    let (release, gate) = std::sync::mpsc::channel();
    *GATE.lock().unwrap() = Some(gate);
    let mut config = support::minilm_config(&["tracking.interval_ms=10"]);
    config
        .trackers
        .push(kiln::TrackerConfig { kind: "stuck-test-double".into(), options: Default::default() });
    let optimizer = kiln::Optimizer::from_config(config).await.unwrap();
    while STEPS_ENTERED.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The tracker thread is now blocked inside log_metrics; requests are still served.
    for round in 0..3 {
        assert_eq!(optimizer.embed(&texts(4, &format!("stuck {round}"))).await.unwrap().len(), 4);
    }
    assert!(optimizer.stats().requests >= 3);
    release.send(()).unwrap();
    optimizer.shutdown().await.unwrap();
}
