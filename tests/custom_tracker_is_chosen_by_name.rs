//! A tracker defined outside kiln (examples/custom_tracker.rs) registers with one macro
//! line, is chosen by name next to a built-in one, and sees every step.

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
