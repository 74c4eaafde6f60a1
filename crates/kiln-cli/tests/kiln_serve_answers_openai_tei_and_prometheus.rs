//! `kiln serve` on a loopback port (the default config: MiniLM on candle, CPU), called
//! the way users call it (tests/readers/serve_clients.py, `scripts/setup serve`): the
//! real `openai` package gets the embeddings `kiln run` writes (cosine ≥ 0.9999), as
//! floats and as base64, and truncated with `dimensions` (re-normalised); TEI's `/embed`
//! and `/info` answer; `/metrics` parses with prometheus_client's parser and counts the
//! requests; bad requests get 422 / 413 / 404 with a JSON error naming the problem, a
//! call without the API key 401 (health and metrics stay open); CORS allows the
//! configured origin only; SIGTERM drains and
//! shuts down cleanly. With a generate config the `openai` package chats, streams and
//! completes.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{cosine, kiln, root};

/// Runs one of the clients' scripts with the Python of `scripts/setup serve`.
fn clients(script: &str, args: &[&str]) -> serde_json::Value {
    let python = std::env::var("SERVE_CLIENTS_PYTHON").unwrap_or_else(|_| {
        panic!(
            "SERVE_CLIENTS_PYTHON is not set: run `scripts/setup serve` and `. .kiln/env` (scripts/test does)"
        )
    });
    let out =
        Command::new(python).arg(root().join("tests/readers").join(script)).args(args).output().unwrap();
    assert!(out.status.success(), "{script} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Starts `kiln serve ARGS` on a free loopback port: the process, its address, and
/// its stderr lines after the first.
fn start(args: &[&str]) -> (Server, String, std::sync::mpsc::Receiver<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["serve", "--port", "0"])
        .args(args)
        .current_dir(root())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (lines, stderr) = std::sync::mpsc::channel();
    let pipe = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let server = Server(child);
    let first = stderr.recv_timeout(Duration::from_secs(60)).expect("kiln serve printed nothing");
    let base = first
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no address in {first:?}"))
        .to_string();
    (server, base, stderr)
}

/// SIGTERM: the server stops accepting, drains, and exits cleanly with its summary line.
fn stop(mut server: Server, stderr: std::sync::mpsc::Receiver<String>) {
    let pid = server.0.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    // Its stderr closes when it exits: read to the end, within a deadline.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut rest = Vec::new();
    loop {
        match stderr.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => rest.push(line),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                panic!("kiln serve did not stop within 60 s of SIGTERM: {rest:?}")
            }
        }
    }
    let status = server.0.wait().unwrap();
    assert!(status.success(), "{rest:?}");
    assert!(rest.iter().any(|l| l.contains("shut down after")), "{rest:?}");
}

fn vectors(v: &serde_json::Value) -> Vec<Vec<f32>> {
    serde_json::from_value(v.clone()).unwrap()
}

/// The server process, killed if the test fails before it stops it.
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_real_clients_get_kiln_run_s_embeddings_and_errors_they_can_read() {
    let (texts, _) = support::reference();
    let texts: Vec<String> = texts.into_iter().take(6).collect();
    let (server, base, stderr) = start(&[
        "--set",
        "server.max_inputs=64",
        "--set",
        "server.api_keys=[\"test-key\"]",
        "--set",
        "server.cors_origins=[\"https://app.example\"]",
    ]);
    let texts_json = serde_json::to_string(&texts).unwrap();
    let got = clients("serve_clients.py", &[&base, "all-MiniLM-L6-v2", &texts_json, "test-key"]);

    // What `kiln run` writes for the same texts.
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("texts.txt");
    std::fs::write(&input, texts.join("\n") + "\n").unwrap();
    let output = dir.path().join("out.jsonl");
    let run = kiln(&["run", "--input", input.to_str().unwrap(), "--output", output.to_str().unwrap()]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let expected: Vec<Vec<f32>> = support::jsonl_events(&output)
        .iter()
        .map(|row| serde_json::from_value(row["embedding"].clone()).unwrap())
        .collect();
    for (name, got) in
        [("float", &got["openai_float"]), ("base64", &got["openai_base64"]), ("tei", &got["tei"]["vectors"])]
    {
        let got = vectors(got);
        assert_eq!(got.len(), texts.len(), "{name}");
        for (a, b) in got.iter().zip(&expected) {
            assert!(cosine(a, b) >= 0.9999, "{name}: cosine {}", cosine(a, b));
        }
    }
    let raw: Vec<f32> = serde_json::from_value(got["raw_base64_first"].clone()).unwrap();
    assert_eq!(raw, vectors(&got["openai_float"])[0], "base64 holds the same little-endian f32s");
    for (short, full) in vectors(&got["openai_dims"]).iter().zip(&expected) {
        assert_eq!(short.len(), 64);
        let norm: f32 = short.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "re-normalised: {norm}");
        assert!(cosine(short, &full[..64]) > 0.9999);
    }
    assert!(got["openai_usage"].as_u64().unwrap() > texts.len() as u64, "{}", got["openai_usage"]);
    assert_eq!(got["wrong_model"]["status"], 404, "{}", got["wrong_model"]);
    assert!(got["wrong_model"]["message"].as_str().unwrap().contains("serves `all-MiniLM-L6-v2`"));
    assert_eq!(got["info"]["body"]["model_id"], "all-MiniLM-L6-v2");
    assert_eq!(got["info"]["body"]["model_type"]["embedding"]["pooling"], "mean");

    // Prometheus: what the clients sent, counted.
    let metrics = &got["metrics"];
    let sample = |family: &str, name: &str| {
        metrics[family]["samples"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s[0] == name)
            .map(|s| s[2].as_f64().unwrap())
    };
    assert!(sample("kiln_texts", "kiln_texts_total").unwrap() >= (4 * texts.len()) as f64, "{metrics}");
    assert_eq!(metrics["kiln_request_latency_seconds"]["type"], "summary");
    assert_eq!(metrics["kiln_batch_size"]["type"], "histogram");
    assert!(sample("kiln_batch_size", "kiln_batch_size_count").unwrap() >= 1.0);

    // CORS: the configured origin is allowed, another gets no allow header.
    assert_eq!(got["cors"]["https://app.example"]["allow"], "https://app.example", "{}", got["cors"]);
    assert!(got["cors"]["https://elsewhere.example"]["allow"].is_null(), "{}", got["cors"]);

    let bad = &got["bad"];
    let error = |k: &str| {
        (bad[k]["status"].as_u64().unwrap(), bad[k]["body"]["error"]["message"].as_str().unwrap().to_string())
    };
    let (status, message) = error("wrong_type");
    assert!(status == 422 && message.contains("`normalize`") && message.contains("boolean"), "{message}");
    let (status, message) = error("too_many");
    assert!(status == 413 && message.contains("10000 inputs") && message.contains("at most 64"), "{message}");
    let (status, message) = error("too_large");
    assert!(status == 413 && message.contains("server.max_body_bytes"), "{message}");
    assert_eq!(error("not_json").0, 422);
    let (status, message) = error("no_route");
    assert!(status == 404 && message.contains("POST /v1/embeddings"), "{message}");
    let (status, message) = error("no_key");
    assert!(status == 401 && message.contains("server.api_keys"), "{message}");

    stop(server, stderr);
}

/// A generate config (examples/generate.toml, SmolLM2 on candle): the real `openai`
/// package's chat completion gets llama.cpp's answer, streamed as the same text piece by
/// piece over server-sent events; a plain completion stops at `max_tokens`; the
/// embeddings route is refused by name; the metrics count the tokens.
#[test]
fn the_openai_client_chats_and_streams_with_a_generate_config() {
    let (server, base, stderr) = start(&["examples/generate.toml"]);
    let got = clients("chat_clients.py", &[&base, "SmolLM2-135M-Instruct.Q4_1.gguf"]);
    assert_eq!(got["chat"]["content"], "The capital of Germany is Berlin.", "{got}");
    assert_eq!(got["chat"]["finish"], "stop");
    let pieces: Vec<String> = serde_json::from_value(got["stream"]["pieces"].clone()).unwrap();
    assert!(pieces.len() > 3, "streamed piece by piece: {pieces:?}");
    assert_eq!(pieces.concat(), "The capital of Germany is Berlin.");
    assert_eq!(got["stream"]["finishes"], serde_json::json!(["stop"]));
    assert_eq!(got["completion"]["finish"], "length", "{got}");
    assert!(!got["completion"]["text"].as_str().unwrap().is_empty());
    assert_eq!(got["embeddings"]["status"], 404, "{got}");
    let tokens = got["metrics"]["kiln_generate_tokens"][0][1].as_f64().unwrap();
    assert!(tokens >= 14.0, "{}", got["metrics"]);
    stop(server, stderr);
}

/// `kiln bench --http`: the same calls in-process and over HTTP; past the queue's
/// capacity (rejecting, not waiting) HTTP callers get only 429s and the server goes on
/// answering the rest.
#[test]
fn over_capacity_http_callers_get_429s_and_the_rest_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let run = kiln(&[
        "bench",
        "--requests",
        "200",
        "--concurrency",
        "32",
        "--http",
        "--set",
        "batching.queue_capacity=4",
        "--set",
        "batching.when_full=\"reject\"",
        "--json",
        json.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{}{stdout}", String::from_utf8_lossy(&run.stderr));
    assert!(stdout.contains("throughput ratio HTTP / in-process"), "{stdout}");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let http = &report["http"];
    let kinds: Vec<&String> = http["errors_by_kind"].as_object().unwrap().keys().collect();
    assert_eq!(kinds, ["http_429"], "{http}");
    assert!(http["errors"].as_u64().unwrap() > 0 && http["throughput_rps"].as_f64().unwrap() > 0.0, "{http}");
    assert_eq!(http["mismatches"], 0, "{http}");
}

/// The Open Inference Protocol v2 through the real `tritonclient[http]`: health,
/// readiness, the model's tensors as `ModelInfo` lists them, and an infer of BERT token
/// ids whose sentence embedding is `kiln run`'s for the same text; a wrong datatype and
/// an unknown model are refused with the reason.
#[test]
fn tritonclient_infers_the_model_s_own_tensors() {
    let (server, base, stderr) = start(&[]);
    let host = base.trim_start_matches("http://").to_string();
    let got = clients("oip_clients.py", &[&host, "all-MiniLM-L6-v2"]);
    assert_eq!(
        (&got["live"], &got["ready"], &got["model_ready"]),
        (&true.into(), &true.into(), &true.into())
    );
    let names: Vec<&str> =
        got["metadata"]["inputs"].as_array().unwrap().iter().map(|i| i["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["input_ids", "attention_mask", "token_type_ids"], "{}", got["metadata"]);
    let embedding: Vec<Vec<f32>> =
        serde_json::from_value(got["outputs"]["sentence_embedding"].clone()).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("text.txt");
    std::fs::write(&input, "hello world\n").unwrap();
    let output = dir.path().join("out.jsonl");
    let run = kiln(&["run", "--input", input.to_str().unwrap(), "--output", output.to_str().unwrap()]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let expected: Vec<f32> =
        serde_json::from_value(support::jsonl_events(&output)[0]["embedding"].clone()).unwrap();
    assert!(cosine(&embedding[0], &expected) >= 0.9999, "cosine {}", cosine(&embedding[0], &expected));

    let message = got["bad"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("input_ids") && message.contains("i64"), "{}", got["bad"]);
    assert!(got["unknown"]["message"].as_str().unwrap_or_default().contains("serves `all-MiniLM-L6-v2`"));
    stop(server, stderr);
}
