//! Above the high watermark the memory governor clears the result cache and unloads
//! idle models — never the one being served — and records peaks; serving goes on.
//! The watermarks here sit below any real machine's usage, so the pressure is real
//! readings against a low bar, not a mocked probe.

mod support;

use std::time::Duration;

use kiln::{DType, Device, ModelSpec, Optimizer};

#[tokio::test]
async fn under_pressure_the_cache_is_cleared_and_idle_models_unloaded() {
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
