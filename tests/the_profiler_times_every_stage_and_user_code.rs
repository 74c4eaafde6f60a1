//! The profiler is on by default: every stage of a request gets its span, users time
//! their own code with `optimizer.profiler().span(..)`, and turning it off leaves no
//! report.

mod support;

use std::time::Duration;

#[tokio::test]
async fn stages_and_user_spans_are_in_the_report() {
    let optimizer = kiln::Optimizer::from_config(support::minilm_config(&[])).await.unwrap();
    let texts: Vec<String> = (0..10).map(|i| format!("profiled text {i}")).collect();
    optimizer.embed(&texts).await.unwrap();
    optimizer.embed(&texts[..3]).await.unwrap(); // all cache hits
    {
        let _span = optimizer.profiler().span("image_processing");
        std::thread::sleep(Duration::from_millis(5));
    }
    let report = optimizer.reports().report().expect("on by default");
    let count = |name: &str| report.spans.get(name).map_or(0, |s| s.count);
    assert_eq!(count("image_processing"), 1);
    assert!(report.spans["image_processing"].total_ms >= 5.0, "{report:?}");
    assert_eq!(count("request"), 2);
    assert_eq!(count("cache_lookup"), 2);
    assert_eq!(count("tokenize"), 1, "the second call was all hits");
    assert_eq!(count("queue_wait"), 10, "one per text through the model");
    assert_eq!(count("load_model"), 1);
    assert!(count("batch_run") >= 1 && count("model_run") >= count("batch_run") && count("collate") >= 1);
    // candle pools inside its run: there is no host pooling to time.
    assert_eq!(count("pool"), 0);
    let s = &report.spans["request"];
    // Percentiles and max come from a histogram of 3 significant digits (values are
    // rounded up to their bucket by up to 0.1%); the total is exact.
    assert!(s.p50_ms <= s.p99_ms && s.p99_ms <= s.max_ms && s.max_ms <= s.total_ms * 1.001, "{s:?}");
    assert!(report.peak_rss_bytes.unwrap() > 50 << 20);
    // candle keeps no allocator of its own: its memory is the process's (RSS above).
    assert!(report.allocator.is_none(), "{:?}", report.allocator);

    let dir = tempfile::tempdir().unwrap();
    assert!(optimizer.reports().write_profile(&dir.path().join("p.json")).unwrap());
    let written: kiln::ProfileReport =
        serde_json::from_slice(&std::fs::read(dir.path().join("p.json")).unwrap()).unwrap();
    assert_eq!(written.spans["queue_wait"].count, 10);
    assert!(
        !optimizer.reports().write_trace(&dir.path().join("t.json")).unwrap(),
        "no trace unless profiler.trace"
    );
    assert!(!dir.path().join("t.json").exists());
    optimizer.shutdown().await.unwrap();
}

#[tokio::test]
async fn turned_off_it_reports_nothing() {
    let optimizer =
        kiln::Optimizer::from_config(support::minilm_config(&["profiler.enabled=false"])).await.unwrap();
    optimizer.embed(&["a text".to_string()]).await.unwrap();
    let _span = optimizer.profiler().span("still callable");
    assert!(optimizer.reports().report().is_none());
    let dir = tempfile::tempdir().unwrap();
    assert!(!optimizer.reports().write_profile(&dir.path().join("p.json")).unwrap());
    drop(_span);
    optimizer.shutdown().await.unwrap();
}
