//! A tracker defined outside kiln (examples/custom_tracker.rs) registers with one macro
//! line, is chosen by name next to a built-in one, and sees every step; a cache and a
//! profiler of the user's register the same way and are chosen by `kind`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

#[allow(dead_code)]
#[path = "../examples/custom_tracker.rs"]
mod example;

mod support;

#[test]
fn the_example_tracker_is_registered_beside_the_built_in_ones() {
    let names = kiln::trackers().unwrap().names();
    for kind in kiln::BUILTIN_TRACKERS.iter().chain(&["csv"]) {
        assert!(names.contains(kind), "{kind} missing from {names:?}");
    }
}

#[tokio::test]
async fn the_config_naming_it_gets_a_row_per_step() {
    let dir = tempfile::tempdir().unwrap();
    let config = support::root().join("examples/custom_tracker.toml");
    let sets = vec![
        format!("model.path={:?}", support::minilm_dir().to_str().unwrap()),
        format!("tracking.dir={:?}", dir.path().to_str().unwrap()),
        "tracking.run_name=csv-test".to_string(),
        "tracking.interval_ms=20".to_string(),
        "batching.max_batch_size=2".to_string(),
    ];
    let texts: Vec<String> = (0..200).map(|i| format!("a text to embed, number {i}")).collect();
    let stats = example::embed_with(&config, &sets, &texts).await.unwrap();
    assert!(stats.tracker_failures.is_empty(), "{:?}", stats.tracker_failures);
    let csv = std::fs::read_to_string(dir.path().join("csv-test.csv")).unwrap();
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("step,throughput_rps,rows_per_s,latency_p50_ms,mean_batch_size"));
    let steps: Vec<u64> = lines.map(|l| l.split(',').next().unwrap().parse().unwrap()).collect();
    assert!(steps.len() >= 2, "{csv}");
    assert_eq!(steps, (1..=steps.len() as u64).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_misspelt_key_of_its_entry_is_a_config_error() {
    let config = support::root().join("examples/custom_tracker.toml");
    let mut config = kiln::KilnConfig::load(Some(&config), &[]).unwrap();
    config.trackers[0].options.insert("colums".into(), serde_json::json!([]));
    let e = kiln::Optimizer::from_config(config).await.err().unwrap().to_string();
    assert!(e.contains("trackers[0]") && e.contains("colums") && e.contains("columns"), "{e}");
}

/// A cache kind of this test's own: entries in a map, lookups counted.
#[derive(Default)]
struct MapCache {
    entries: Mutex<HashMap<kiln::CacheKey, Arc<kiln::NamedTensors>>>,
    batched_lookups: AtomicU64,
}

static MAP_CACHE: Mutex<Option<Arc<MapCache>>> = Mutex::new(None);

impl kiln::Cache for MapCache {
    fn get(&self, key: &kiln::CacheKey) -> Option<Arc<kiln::NamedTensors>> {
        self.entries.lock().unwrap().get(key).cloned()
    }
    fn get_many(&self, keys: &[kiln::CacheKey]) -> Vec<Option<Arc<kiln::NamedTensors>>> {
        self.batched_lookups.fetch_add(1, Ordering::Relaxed);
        keys.iter().map(|k| self.get(k)).collect()
    }
    fn insert(&self, key: kiln::CacheKey, value: Arc<kiln::NamedTensors>) {
        self.entries.lock().unwrap().insert(key, value);
    }
    fn invalidate_all(&self) {
        self.entries.lock().unwrap().clear();
    }
    fn stats(&self) -> kiln::CacheStats {
        kiln::CacheStats { entries: self.entries.lock().unwrap().len() as u64, ..Default::default() }
    }
}

fn build_map_cache(setup: &kiln::CacheSetup) -> kiln::Result<Arc<dyn kiln::Cache>> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Options {}
    let Options {} = setup.options()?;
    let cache = Arc::new(MapCache::default());
    *MAP_CACHE.lock().unwrap() = Some(cache.clone());
    Ok(cache)
}

kiln::register_cache!("test-map", "a map, for this test", build_map_cache);

/// A profiler kind of this test's own: the names of the spans it saw.
#[derive(Default)]
struct Names(Mutex<Vec<String>>);

static NAMES: Mutex<Option<Arc<Names>>> = Mutex::new(None);

impl kiln::Profiler for Names {
    fn record(&self, name: &str, _start: std::time::Instant, _elapsed: std::time::Duration) {
        self.0.lock().unwrap().push(name.to_string());
    }
}

fn build_names(setup: &kiln::runtime::ProfilerSetup) -> kiln::Result<Arc<dyn kiln::Profiler>> {
    // The runtime's one resource monitor is handed over, to subscribe to if wanted.
    let _monitor = setup.monitor.clone();
    let names = Arc::new(Names::default());
    *NAMES.lock().unwrap() = Some(names.clone());
    Ok(names)
}

kiln::runtime::register_profiler!("test-names", "span names, for this test", build_names);

#[tokio::test]
async fn a_cache_and_a_profiler_of_the_user_s_are_chosen_by_kind() {
    let optimizer = kiln::Optimizer::from_config(support::minilm_config(&[
        "cache.kind=\"test-map\"",
        "profiler.kind=\"test-names\"",
    ]))
    .await
    .unwrap();
    let texts = ["one text", "another text", "one text"].map(String::from).to_vec();
    let first = optimizer.embed(&texts).await.unwrap();
    let again = optimizer.embed(&texts).await.unwrap();
    assert_eq!(first, again);
    let cache = MAP_CACHE.lock().unwrap().clone().expect("the config built the test's cache");
    assert_eq!(cache.entries.lock().unwrap().len(), 2, "two distinct texts stored");
    assert_eq!(cache.batched_lookups.load(Ordering::Relaxed), 2, "one lookup per call, for all its texts");
    assert_eq!(optimizer.stats().cache.entries, 2, "stats() are the cache's own");
    let names = NAMES.lock().unwrap().clone().expect("the config built the test's profiler");
    let seen = names.0.lock().unwrap().clone();
    for stage in ["cache_lookup", "tokenize"] {
        assert!(seen.iter().any(|n| n == stage), "{stage} not in {seen:?}");
    }
}

#[tokio::test]
async fn unknown_kinds_and_keys_are_config_errors_naming_what_there_is() {
    let e = kiln::Optimizer::from_config(support::minilm_config(&["cache.kind=\"memcached\""]))
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("memcached") && e.contains("memory") && e.contains("test-map"), "{e}");
    let e = kiln::Optimizer::from_config(support::minilm_config(&["cache.url=\"redis://x\""]))
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("cache") && e.contains("url") && e.contains("`memory`"), "{e}");
    let e = kiln::Optimizer::from_config(support::minilm_config(&["profiler.kind=\"perf\""]))
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("perf") && e.contains("sampling"), "{e}");
}
