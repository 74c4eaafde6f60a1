//! `kiln bench` drives the real model and writes the figures it prints as JSON, with a
//! baseline from `--compare` measured in the same run.

mod support;

use support::kiln;

#[test]
fn bench_writes_the_documented_json_keys_with_a_baseline() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let run = kiln(&[
        "bench",
        "examples/embed.toml",
        "--requests",
        "40",
        "--concurrency",
        "8",
        "--unique-ratio",
        "0.5",
        "--words",
        "3-8",
        "--compare",
        "batching.enabled=false",
        "--set",
        "batching.max_wait_ms=20",
        "--json",
        json.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert!(stdout.contains("throughput ratio kiln / baseline (batching.enabled=false)"), "{stdout}");

    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(report["requests"], 40);
    assert_eq!(report["errors"], 0);
    assert_eq!(report["mismatches"], 0, "every answer is its own text's");
    let rss = |k: &str| report[k].as_u64().unwrap();
    assert!(rss("rss_before_bytes") > 1 << 20 && rss("rss_after_bytes") > 1 << 20, "{report}");
    assert!(report["throughput_rps"].as_f64().unwrap() > 0.0);
    for p in ["p50", "p95", "p99", "max"] {
        assert!(report["latency_ms"][p].as_f64().is_some(), "latency_ms.{p}");
    }
    // 20 distinct texts over 40 requests: at most 20 hits (fewer when a repeat
    // arrives while its first copy is still in flight).
    let hit_rate = report["cache_hit_rate"].as_f64().unwrap();
    assert!(hit_rate > 0.0 && hit_rate <= 0.5, "{hit_rate}");
    assert!(report["mean_batch_size"].as_f64().unwrap() >= 1.0);
    assert_eq!(report["baseline"]["mean_batch_size"], 1.0, "batching off runs each call alone");
    assert_eq!(report["baseline"]["overrides"][0], "batching.enabled=false");
    assert!(report["throughput_ratio"].as_f64().unwrap() > 0.0);
}

#[test]
fn bench_refuses_bad_arguments_clearly() {
    let run = kiln(&["bench", "examples/embed.toml", "--requests", "5", "--unique-ratio", "1.5"]);
    assert_eq!(run.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&run.stderr).contains("--unique-ratio must be in (0, 1], got 1.5"));
}

#[test]
fn bench_sends_the_lines_of_a_texts_file_and_refuses_an_empty_one() {
    let dir = tempfile::tempdir().unwrap();
    let texts = dir.path().join("texts.txt");
    std::fs::write(&texts, "first text\n\nsecond text\nthird text\n").unwrap();
    let json = dir.path().join("bench.json");
    let run = kiln(&[
        "bench",
        "examples/embed.toml",
        "--texts",
        texts.to_str().unwrap(),
        "--requests",
        "9",
        "--concurrency",
        "3",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!((report["requests"].as_u64(), report["errors"].as_u64()), (Some(9), Some(0)));
    // 3 distinct texts cycled over 9 calls: each call is a cache hit or a model row (a
    // text in flight twice at once misses twice), and every text reaches the model once.
    let hits = (report["cache_hit_rate"].as_f64().unwrap() * 9.0).round() as u64;
    let replicas = report["replicas"].as_array().unwrap();
    assert_eq!(replicas.len(), 1, "{report}");
    let rows = replicas[0]["rows"].as_u64().unwrap();
    assert!(hits + rows == 9 && rows >= 3, "{report}");

    std::fs::write(&texts, "\n  \n").unwrap();
    let run = kiln(&["bench", "examples/embed.toml", "--texts", texts.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no non-empty lines; expected one text per line"), "{stderr}");
}
