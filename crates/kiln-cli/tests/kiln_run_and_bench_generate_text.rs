//! `task = "generate"` from the command line (examples/generate.toml, the real SmolLM2
//! GGUF): `kiln run` answers a JSON Lines file of prompts and chat messages in input
//! order, however small the queue (with the profiler's spans per step and request, the
//! Chrome trace, and the trackers' metrics and summary); `kiln bench` measures one stream against several and writes the figures; a
//! malformed prompt record is refused naming the line.

mod support;

use support::kiln;

#[test]
fn kiln_run_answers_prompts_and_messages_in_input_order() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("answers.jsonl");
    let run = kiln(&[
        "run",
        "examples/generate.toml",
        "--input",
        "examples/data/prompts.jsonl",
        "--output",
        out.to_str().unwrap(),
        "--set",
        "generate.max_new_tokens=16",
        // A queue of one: the prompts go in as earlier ones finish, none is refused.
        "--set",
        "batching.queue_capacity=1",
        "--profile",
        dir.path().join("profile.json").to_str().unwrap(),
        "--trace",
        dir.path().join("trace.json").to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    // The profile: one span per step, one per request, and the load.
    let profile: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("profile.json")).unwrap()).unwrap();
    let count = |span: &str| profile["spans"][span]["count"].as_u64().unwrap_or(0);
    assert_eq!((count("generate_request"), count("load_model")), (3, 1), "{profile}");
    assert!(count("generate_step") >= 8 && count("generate_sample") == count("generate_step"), "{profile}");
    assert!(stderr.contains("generated") && stderr.contains("tokens/s"), "{stderr}");
    let trace: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("trace.json")).unwrap()).unwrap();
    let events = trace["traceEvents"].as_array().or(trace.as_array()).expect("trace events");
    let steps = events.iter().filter(|e| e["name"] == "generate_step").count() as u64;
    assert_eq!(steps, count("generate_step"), "one trace event per step");
    let rows = support::jsonl_events(&out);
    let ids: Vec<&str> = rows.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["germany", "japan", "haiku"]);
    assert_eq!(rows[0]["text"], "The capital of Germany is Berlin.");
    assert!(rows[1]["text"].as_str().unwrap().contains("Tokyo"), "{}", rows[1]);
    for r in &rows {
        let n = r["tokens"].as_u64().unwrap();
        assert!((1..=16).contains(&n) && r["token_ids"].as_array().unwrap().len() as u64 == n, "{r}");
        assert!(["stop", "length"].contains(&r["finish_reason"].as_str().unwrap()), "{r}");
    }

    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"id\": 1, \"prompt\": \"hi\"}\n{\"id\": 2, \"prompt\": 7}\n").unwrap();
    let run = kiln(&[
        "run",
        "examples/generate.toml",
        "--input",
        bad.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("bad.jsonl:2") && !stderr.contains("panicked"), "{stderr}");
}

#[test]
fn the_jsonl_tracker_gets_generation_metrics_and_the_summary() {
    let dir = tempfile::tempdir().unwrap();
    let example = std::fs::read_to_string(support::root().join("examples/generate.toml")).unwrap();
    let gguf = support::root().join(".kiln/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let config = example
        .replace("../.kiln/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", gguf.to_str().unwrap())
        + &format!(
            "\n[tracking]\ndir = {:?}\n\n[[trackers]]\nkind = \"jsonl\"\n",
            dir.path().display().to_string()
        );
    let file = dir.path().join("generate.toml");
    std::fs::write(&file, config).unwrap();
    let out = dir.path().join("answers.jsonl");
    let run = kiln(&[
        "run",
        file.to_str().unwrap(),
        "--input",
        "examples/data/prompts.jsonl",
        "--output",
        out.to_str().unwrap(),
        "--set",
        "generate.max_new_tokens=8",
    ]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let log = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "jsonl") && p != &out)
        .expect("the jsonl tracker's file");
    let events = support::jsonl_events(&log);
    let summary = events.iter().find(|e| e["event"] == "summary").unwrap_or_else(|| panic!("{events:?}"));
    let text = summary.to_string();
    assert!(text.contains("generate/generated_tokens") && text.contains("generate/ttft_p50_ms"), "{text}");
    let step = events.iter().find(|e| e["event"] == "metrics").unwrap_or_else(|| panic!("{events:?}"));
    assert!(step["metrics"]["generate/requests"].as_f64().unwrap() >= 3.0, "{step}");
    assert_eq!(events.last().unwrap()["event"], "end", "{events:?}");
}

/// `kiln bench CONFIG` over 4 prompts, one stream then 4, 8 new tokens each (and
/// `extra` arguments): its stdout and its `--json` report.
fn bench_4_by_4(config: &str, extra: &[&str]) -> (String, serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let mut args = vec![
        "bench",
        config,
        "--requests",
        "4",
        "--concurrency",
        "4",
        "--json",
        json.to_str().unwrap(),
        "--set",
        "generate.max_new_tokens=8",
    ];
    args.extend_from_slice(extra);
    let run = kiln(&args);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let report = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    (String::from_utf8_lossy(&run.stdout).into_owned(), report)
}

#[test]
fn kiln_bench_compares_one_stream_with_several() {
    let (stdout, report) = bench_4_by_4("examples/generate.toml", &[]);
    assert!(stdout.contains("4 streams / 1 stream"), "{stdout}");
    let many = &report["concurrent"];
    assert_eq!(many["errors"], 0, "{report}");
    assert!(many["generated_tokens"].as_u64().unwrap() > 0, "{report}");
    assert!(many["mean_sequences_per_step"].as_f64().unwrap() > 1.0, "four streams share steps: {report}");
    assert!(
        report["ratio"].as_f64().unwrap() > 0.0 && many["ttft_ms"]["p50"].as_f64().unwrap() > 0.0,
        "{report}"
    );
}

#[cfg(feature = "mlx")]
#[test]
fn kiln_run_generates_on_mlx_with_its_example() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("answers.jsonl");
    let run = kiln(&[
        "run",
        "examples/generate-mlx.toml",
        "--input",
        "examples/data/prompts.jsonl",
        "--output",
        out.to_str().unwrap(),
        "--set",
        "generate.max_new_tokens=12",
    ]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(stderr.contains("with mlx (q4_1 dequantized to f32"), "{stderr}");
    let rows = support::jsonl_events(&out);
    assert_eq!(rows[0]["text"], "The capital of Germany is Berlin.", "{rows:?}");
}

/// examples/vlm.toml on the Qwen2.5-VL fixture (`scripts/setup vlm`): `kiln run` reads
/// chat messages with image parts (paths relative to the input file), and the first
/// prompt — the fixture's two images and "Compare these images." — gets transformers'
/// greedy tokens; each row counts its image tokens.
#[test]
fn kiln_run_answers_about_images_with_a_vision_language_model() {
    let fixture = support::root().join(".kiln/models/qwen25vl-tiny");
    assert!(fixture.join("prompt.json").is_file(), "run `scripts/setup vlm` (scripts/test does)");
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture.join("prompt.json")).unwrap()).unwrap();
    let greedy: Vec<u64> = serde_json::from_value(reference["greedy_tokens"].clone()).unwrap();
    let eos = reference["special_ids"]["<|im_end|>"].as_u64().unwrap();
    let expected: Vec<u64> = greedy.into_iter().take_while(|&t| t != eos).collect();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("answers.jsonl");
    let run = kiln(&[
        "run",
        "examples/vlm.toml",
        "--input",
        "examples/data/vlm.jsonl",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let rows: Vec<serde_json::Value> =
        std::fs::read_to_string(&out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["id"], "compare");
    let ids: Vec<u64> = serde_json::from_value(rows[0]["token_ids"].clone()).unwrap();
    assert_eq!(ids, expected, "transformers' greedy tokens");
    // 12×18 and 20×12 patches, merged 2×2: 54 + 60 image tokens.
    assert_eq!(rows[0]["image_tokens"], 114);
    assert_eq!(rows[1]["id"], "one");
    assert!(rows[1]["image_tokens"].as_u64().unwrap() > 0, "{}", rows[1]);
}

/// `kiln bench` on a vision-language config: one image per prompt, the image-cache phase
/// (the same image asked twice on one engine) and both phases without errors.
#[test]
fn kiln_bench_measures_a_vision_language_model_and_its_image_cache() {
    assert!(
        support::root().join(".kiln/models/qwen25vl-tiny/prompt.json").is_file(),
        "run `scripts/setup vlm`"
    );
    let (_, report) = bench_4_by_4("examples/vlm.toml", &[]);
    assert_eq!(
        (report["single_stream"]["errors"].as_u64(), report["concurrent"]["errors"].as_u64()),
        (Some(0), Some(0))
    );
    let cache = &report["image_cache"];
    assert!(cache["image_tokens"].as_u64().unwrap() > 0, "{report}");
    assert!(
        cache["first_ttft_ms"].as_f64().unwrap() > 0.0 && cache["repeat_ttft_ms"].as_f64().unwrap() > 0.0
    );
    // The prompts of a `kiln run` input file: the first asks about two images (54 + 60
    // image tokens, as `kiln run` gives them).
    let (_, report) = bench_4_by_4("examples/vlm.toml", &["--texts", "examples/data/vlm.jsonl"]);
    assert_eq!(report["image_cache"]["image_tokens"], 114, "{report}");
    assert_eq!(report["concurrent"]["errors"].as_u64(), Some(0), "{report}");
}

/// examples/vlm-mlx.toml: the fixture's 4-bit mlx-community folder on provider `mlx`,
/// its packed layers as stored — the first prompt gets mlx-vlm's greedy tokens.
#[cfg(feature = "mlx")]
#[test]
fn kiln_run_answers_about_images_on_mlx_with_its_example() {
    let fixture = support::root().join(".kiln/models/qwen25vl-tiny");
    assert!(fixture.join("mlx-q4/reference.json").is_file(), "run `scripts/setup vlm` (scripts/test does)");
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture.join("prompt.json")).unwrap()).unwrap();
    let q4: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture.join("mlx-q4/reference.json")).unwrap()).unwrap();
    let greedy: Vec<u64> = serde_json::from_value(q4["greedy_tokens"].clone()).unwrap();
    let eos = reference["special_ids"]["<|im_end|>"].as_u64().unwrap();
    let expected: Vec<u64> = greedy.into_iter().take_while(|&t| t != eos).collect();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("answers.jsonl");
    let run = kiln(&[
        "run",
        "examples/vlm-mlx.toml",
        "--input",
        "examples/data/vlm.jsonl",
        "--output",
        out.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(stderr.contains("MLX quantized matmul"), "{stderr}");
    let rows: Vec<serde_json::Value> =
        std::fs::read_to_string(&out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let ids: Vec<u64> = serde_json::from_value(rows[0]["token_ids"].clone()).unwrap();
    assert_eq!(ids, expected, "mlx-vlm's greedy tokens");
    assert_eq!(rows[0]["image_tokens"], 114);
}
