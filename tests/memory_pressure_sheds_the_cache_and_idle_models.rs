//! Above the high watermark the memory governor clears the result cache and unloads
//! idle models — never the one being served — and records peaks; serving goes on.
//! The watermarks here sit below any real machine's usage, so the pressure is real
//! readings against a low bar, not a mocked probe.

mod support;

use std::time::Duration;

use kiln::{DType, Device, ModelSpec, Optimizer};

/// The tests here count the process's monitor threads: one optimizer at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test]
async fn under_pressure_the_cache_is_cleared_and_idle_models_unloaded() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let optimizer = Optimizer::from_config(support::minilm_config(&[
        "memory.high_watermark=0.001",
        "memory.low_watermark=0.0005",
        "memory.sample_interval_ms=20",
    ]))
    .await
    .unwrap();
    let copy = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(support::minilm_dir().join(f), copy.path().join(f)).unwrap();
    }
    drop(optimizer.load_model(ModelSpec::new(copy.path(), Device::Cpu, DType::F32)).await.unwrap());
    optimizer.embed(&["fill the cache".to_string(), "with two entries".to_string()]).await.unwrap();

    // The governor samples on its own interval: poll for its reaction, with a deadline.
    let stats = support::eventually(Duration::from_secs(10), || {
        let stats = optimizer.stats();
        let memory = stats.memory.as_ref().expect("the governor runs by default");
        // moka applies a clear lazily: its entry count follows within a few reads.
        let cleared = memory.cache_clears >= 1 && stats.cache.entries == 0;
        if memory.samples >= 3 && memory.models_unloaded >= 1 && cleared {
            Ok(stats)
        } else {
            Err(format!(
                "no full reaction to memory pressure: {memory:?}, {} cache entries",
                stats.cache.entries
            ))
        }
    })
    .await;
    let memory = stats.memory.expect("the governor runs by default");
    assert!(memory.samples >= 3 && memory.pressure_events >= 1, "{memory:?}");
    assert!(memory.cache_clears >= 1, "{memory:?}");
    assert_eq!(stats.cache.entries, 0, "the cache was cleared");
    assert_eq!(memory.models_unloaded, 1, "the idle copy was unloaded: {memory:?}");
    assert_eq!(optimizer.models().loaded().len(), 1, "the model in use stays");
    assert!(memory.peak_rss_bytes > 100 << 20 && memory.peak_system_used_bytes > 0, "{memory:?}");
    assert_eq!(optimizer.embed(&["still serving".to_string()]).await.unwrap()[0].len(), 384);
}

/// Threads of this process with this name (Linux: /proc/self/task/*/comm).
fn threads_named(name: &str) -> usize {
    let tasks = std::fs::read_dir("/proc/self/task").expect("/proc/self/task (Linux)");
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim_end() == name)
        .count()
}

#[tokio::test]
async fn one_monitor_thread_feeds_the_governor_the_profiler_and_the_trackers() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let runs = tempfile::tempdir().unwrap();
    let dir = format!("tracking.dir={:?}", runs.path().display().to_string());
    let optimizer = Optimizer::from_config(support::minilm_config(&[
        "profiler.enabled=true",
        "profiler.sample_interval_ms=20",
        "memory.sample_interval_ms=1000",
        "tracking.interval_ms=50",
        &dir,
        "trackers=[{kind=\"jsonl\"}]",
    ]))
    .await
    .unwrap();
    assert_eq!(threads_named("kiln-monitor"), 1, "one sampling thread for every reader");
    assert_eq!(threads_named("kiln-profiler"), 0, "the profiler has no sampler of its own");
    // The governor reads the shared monitor, at the shorter of the two intervals: 20
    // readings within the deadline, where its own 1 s interval would give at most 8.
    let memory = support::eventually(Duration::from_secs(8), || {
        let memory = optimizer.stats().memory.expect("the governor runs by default");
        if memory.samples >= 20 { Ok(memory) } else { Err(format!("{} governor samples", memory.samples)) }
    })
    .await;
    let profile = optimizer.reports().report().expect("the profiler is on");
    assert!(profile.samples >= memory.samples, "profiler {} vs governor {}", profile.samples, memory.samples);
    assert!(profile.peak_rss_bytes.unwrap_or(0) >= memory.peak_rss_bytes.min(1));
    drop(optimizer);
    support::eventually(Duration::from_secs(5), || match threads_named("kiln-monitor") {
        0 => Ok(()),
        n => Err(format!("{n} monitor threads left after the optimizer was dropped")),
    })
    .await;
}

#[test]
fn watermarks_are_validated() {
    let err = kiln::KilnConfig::load(
        None,
        &["memory.high_watermark=1.5".into(), "memory.low_watermark=0.95".into()],
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("`memory.high_watermark`: found 1.5, expected a fraction in (0, 1]"), "{err}");
    let err = kiln::KilnConfig::load(
        None,
        &["memory.high_watermark=0.5".into(), "memory.low_watermark=0.6".into()],
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("`memory.low_watermark`: found 0.6, expected at most memory.high_watermark (0.5)"),
        "{err}"
    );
}
