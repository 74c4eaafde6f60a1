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

use std::process::Command;
use std::time::{Duration, Instant};

use support::serve::{Server, call, metric, start, stop, wait_ready};
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

/// The status line `kiln serve` answers when a client sends `head` (request line,
/// headers and whatever part of the body it chooses) on a fresh connection and then
/// nothing more; read within 10 s.
fn status_after(base: &str, head: impl FnOnce(&str) -> String) -> String {
    use std::io::{Read, Write};
    let address = base.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    stream.write_all(head(address).as_bytes()).unwrap();
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    while !answer.ends_with(b"\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => answer.push(byte[0]),
            other => {
                panic!("no status line within 10 s ({other:?}); read {:?}", String::from_utf8_lossy(&answer))
            }
        }
    }
    String::from_utf8_lossy(&answer).trim_end().to_string()
}

/// A POST to `path` that announces `length` bytes of body and sends none of them.
fn status_without_body(base: &str, path: &str, length: usize) -> String {
    status_after(base, |address| {
        format!(
            "POST {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
        )
    })
}

/// A POST to `path` with the API key `key` that announces 100 bytes of body, sends 5
/// and stalls.
fn status_with_stalled_body(base: &str, path: &str, key: &str) -> String {
    status_after(base, |address| {
        format!(
            "POST {path} HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"in"
        )
    })
}

fn vectors(v: &serde_json::Value) -> Vec<Vec<f32>> {
    serde_json::from_value(v.clone()).unwrap()
}

#[test]
fn the_real_clients_get_kiln_run_s_embeddings_and_errors_they_can_read() {
    let (texts, _) = support::reference();
    let texts: Vec<String> = texts.into_iter().take(6).collect();
    let (server, base, stderr) = start(&[
        "--set",
        "server.max_inputs=64",
        "--set",
        "batching.queue_capacity=8",
        "--set",
        "server.body_timeout_ms=2000",
        "--set",
        "server.api_keys=[\"test-key\"]",
        "--set",
        "server.cors_origins=[\"https://app.example\"]",
    ]);
    let texts_json = serde_json::to_string(&texts).unwrap();
    wait_ready(&base, &stderr);
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
    assert_eq!(metrics["kiln_request_latency_seconds"]["type"], "histogram");
    let requests = sample("kiln_request_latency_seconds", "kiln_request_latency_seconds_count").unwrap();
    let under_30s = metrics["kiln_request_latency_seconds"]["samples"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s[1]["le"] == "30.0" || s[1]["le"] == "30")
        .map(|s| s[2].as_f64().unwrap());
    assert!(requests >= 4.0 && under_30s == Some(requests), "{}", metrics["kiln_request_latency_seconds"]);
    assert_eq!(metrics["kiln_inference_item_seconds"]["type"], "histogram");
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
    // Every model route needs the key, /info and the protocol's readiness too; the
    // probes' routes stay open.
    // More inputs than the queue holds could never be served: 413 naming both numbers.
    let (status, message) = error("over_queue");
    assert!(status == 413 && message.contains("9 inputs") && message.contains("queue holds 8"), "{message}");
    let (status, message) = error("trailing");
    assert!(status == 422 && message.contains("bytes after the JSON value"), "{message}");
    let (status, message) = error("long_model");
    assert!(status == 404 && message.len() < 300 && message.contains("(100000 bytes)"), "{message}");
    // The Open Inference Protocol's infer has the same bounds: rows, sequence length.
    assert_eq!(got["oip_rows"]["status"], 413, "{}", got["oip_rows"]);
    assert!(got["oip_rows"]["body"]["error"].as_str().unwrap().contains("9 rows"), "{}", got["oip_rows"]);
    assert_eq!(got["oip_long"]["status"], 413, "{}", got["oip_long"]);
    assert!(
        got["oip_long"]["body"]["error"].as_str().unwrap().contains("sequences of 600"),
        "{}",
        got["oip_long"]
    );
    let (status, message) = error("info_no_key");
    assert!(status == 401 && message.contains("server.api_keys"), "{message}");
    assert_eq!(bad["v2_ready_no_key"]["status"], 401, "{}", bad["v2_ready_no_key"]);
    assert!(bad["v2_ready_no_key"]["body"]["error"].as_str().unwrap().contains("server.api_keys"));
    assert_eq!(got["v2_live_no_key"], 200);
    // The key is checked before the body is read: a client that announces 3 MB and
    // sends none of it is refused at once, not waited for.
    assert_eq!(status_without_body(&base, "/embed", 3_000_000), "HTTP/1.1 401 Unauthorized");
    // With the key, a body that stalls part way is cut at server.body_timeout_ms (2 s
    // here) with 408, not held open.
    let started = std::time::Instant::now();
    let stalled = status_with_stalled_body(&base, "/embed", "test-key");
    assert_eq!(stalled, "HTTP/1.1 408 Request Timeout");
    assert!(started.elapsed() < std::time::Duration::from_secs(8), "{:?}", started.elapsed());

    stop(server, stderr);
}

/// A generate config (examples/generate.toml, SmolLM2 on candle): the real `openai`
/// package's chat completion gets llama.cpp's answer, streamed as the same text piece by
/// piece over server-sent events; a plain completion stops at `max_tokens`; the
/// embeddings route is refused by name; the metrics count the tokens.
#[test]
fn the_openai_client_chats_and_streams_with_a_generate_config() {
    let (server, base, stderr) = start(&["examples/generate.toml"]);
    wait_ready(&base, &stderr);
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
/// an unknown model are refused with the reason. TEI's `truncate: false` is honoured.
#[test]
fn tritonclient_infers_the_model_s_own_tensors() {
    let (server, base, stderr) = start(&[]);
    let host = base.trim_start_matches("http://").to_string();
    wait_ready(&base, &stderr);
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

    // The binary tensor data extension gives the same floats, bit for bit.
    assert_eq!(got["binary_outputs"], got["outputs"], "binary and JSON tensors differ");
    assert!(got["extensions"].as_array().unwrap().iter().any(|e| e == "binary_tensor_data"));

    let message = got["bad"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("input_ids") && message.contains("i64"), "{}", got["bad"]);
    assert!(got["unknown"]["message"].as_str().unwrap_or_default().contains("serves `all-MiniLM-L6-v2`"));

    // More rows than a batch (32 by default): run a batch at a time, joined in order —
    // each row's embedding is the one-row call's.
    let rows = 40;
    let ids: Vec<i64> = (0..rows).flat_map(|_| [101, 7592, 2088, 102]).collect();
    let input = |name: &str, data: &Vec<i64>| serde_json::json!({"name": name, "shape": [rows, 4], "datatype": "INT64", "data": data});
    let body = serde_json::json!({"inputs": [
        input("input_ids", &ids),
        input("attention_mask", &vec![1; rows * 4]),
        input("token_type_ids", &vec![0; rows * 4]),
    ]});
    let (status, text) = call(&base, "POST", "/v2/models/all-MiniLM-L6-v2/infer", Some(&body));
    assert_eq!(status, 200, "{text}");
    let answer: serde_json::Value = serde_json::from_str(&text).unwrap();
    let output = &answer["outputs"][0];
    assert_eq!(output["shape"], serde_json::json!([rows, 384]), "{output}");
    let flat: Vec<f32> = serde_json::from_value(output["data"].clone()).unwrap();
    for row in flat.chunks(384) {
        assert!(
            cosine(row, &embedding[0]) >= 0.9999,
            "a row of the 40-row infer: {}",
            cosine(row, &embedding[0])
        );
    }

    // TEI's `truncate: false` refuses a text longer than the model takes, naming it;
    // unset, `server.auto_truncate` (on) cuts it as every other kiln path does.
    let long = "word ".repeat(600);
    let (status, body) = call(
        &base,
        "POST",
        "/embed",
        Some(&serde_json::json!({"inputs": ["short", long], "truncate": false})),
    );
    assert!(status == 413 && body.contains("inputs[1]") && body.contains("256 tokens"), "{status} {body}");
    let (status, body) = call(&base, "POST", "/embed", Some(&serde_json::json!({"inputs": ["short", long]})));
    assert_eq!(status, 200, "{body}");
    let exactly = "word ".repeat(254); // 254 words and [CLS], [SEP]: the model's 256, nothing cut
    let (status, body) =
        call(&base, "POST", "/embed", Some(&serde_json::json!({"inputs": [exactly], "truncate": false})));
    assert_eq!(status, 200, "{body}");
    stop(server, stderr);
}

/// The server's resident memory, MiB (Linux `/proc`).
fn rss_mib(server: &Server) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.0.id())).unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib / 1024.0
}

/// 100 connections that each send 2 MB of a 2 MiB body and stall hold at most
/// `server.max_buffered_body_mb` (64 MiB) of the server's memory — the bodies past the
/// budget are not read — and every one is answered 408 by the body timeout; the server
/// answers on.
#[test]
fn stalled_bodies_hold_no_more_than_the_body_budget() {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    let (server, base, stderr) = start(&["--set", "server.body_timeout_ms=4000"]);
    wait_ready(&base, &stderr);
    assert_eq!(embed(&base, &["warm"]).len(), 1);
    let before = rss_mib(&server);
    let address = base.trim_start_matches("http://").to_string();
    let started = Instant::now();
    let senders: Vec<_> = (0..100)
        .map(|_| {
            let address = address.clone();
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(&address).unwrap();
                s.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
                let head = format!(
                    "POST /embed HTTP/1.1\r\nHost: kiln\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                    2 << 20
                );
                s.write_all(head.as_bytes()).unwrap();
                // 2 MB, or as much as the server and the kernel take before the write
                // times out (a body past the budget is not read).
                let chunk = vec![b' '; 64 << 10];
                for _ in 0..30 {
                    if s.write_all(&chunk).is_err() {
                        break;
                    }
                }
                s
            })
        })
        .collect();
    let streams: Vec<TcpStream> = senders.into_iter().map(|t| t.join().unwrap()).collect();
    let held = rss_mib(&server) - before;
    assert!(held < 100.0, "100 stalled 2 MB bodies added {held:.0} MiB (budget 64 MiB)");
    // Each is let go by the body timeout, waiting for the budget included: answered 408,
    // or — where unread bytes were left in the server's socket — reset as it closes.
    let (mut answered, mut still_held) = (0, 0);
    for mut s in streams {
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let mut head = [0u8; 12];
        match s.read_exact(&mut head) {
            Ok(()) if head.starts_with(b"HTTP/1.1 408") => answered += 1,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                still_held += 1
            }
            _ => {}
        }
    }
    assert_eq!(still_held, 0, "stalled bodies still held after the body timeout");
    assert!(answered > 0, "no stalled body was answered 408");
    assert!(started.elapsed() < Duration::from_secs(20), "the stalled bodies took {:?}", started.elapsed());
    assert_eq!(embed(&base, &["still serving"]).len(), 1);
    stop(server, stderr);
}

/// An infer request of many batches gets one deadline, `scheduler.timeout_ms`, for all
/// of them: 400 rows of 128 tokens, 4 rows a batch (each far within the deadline), end
/// with 504 naming the setting at about the deadline, and the server answers on.
#[test]
fn an_infer_request_of_many_batches_has_one_deadline() {
    let (server, base, stderr) =
        start(&["--set", "scheduler.timeout_ms=1500", "--set", "batching.max_batch_size=4"]);
    wait_ready(&base, &stderr);
    let (rows, length) = (400, 128);
    let ids: Vec<i64> = (0..rows * length).map(|i| if i % length == 0 { 101 } else { 2088 }).collect();
    let input = |name: &str, data: &Vec<i64>| serde_json::json!({"name": name, "shape": [rows, length], "datatype": "INT64", "data": data});
    let body = serde_json::json!({"inputs": [
        input("input_ids", &ids),
        input("attention_mask", &vec![1; rows * length]),
        input("token_type_ids", &vec![0; rows * length]),
    ]});
    let started = Instant::now();
    let (status, text) = call(&base, "POST", "/v2/models/all-MiniLM-L6-v2/infer", Some(&body));
    let took = started.elapsed();
    assert!(status == 504 && text.contains("scheduler.timeout_ms"), "{status} {text}");
    assert!(took < Duration::from_secs(6), "answered after {took:?}");
    assert_eq!(embed(&base, &["still serving"]).len(), 1);
    stop(server, stderr);
}

fn embed(base: &str, texts: &[&str]) -> Vec<Vec<f32>> {
    let (status, body) = call(
        base,
        "POST",
        "/v1/embeddings",
        Some(&serde_json::json!({"input": texts, "model": "all-MiniLM-L6-v2"})),
    );
    assert_eq!(status, 200, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| serde_json::from_value(d["embedding"].clone()).unwrap())
        .collect()
}

/// Two replicas on one real `redis-server` (Debian's, `scripts/setup serve`): a text one
/// replica embedded is a cache hit on the other, which runs no model for it; with Redis
/// killed mid-run every request still succeeds, from each replica's own tier, and
/// `/metrics` shows the failed calls and the shared tier down.
#[test]
fn replicas_share_results_through_redis_and_outlive_it() {
    let mut redis = kiln_cache_redis::testing::RedisServer::start()
        .unwrap_or_else(|why| panic!("this test needs redis-server: {why}"));
    let url = format!("cache.url=\"{}\"", redis.url());
    let args = ["--set", "cache.kind=\"redis\"", "--set", &url, "--set", "cache.retry_ms=200"];
    let (a, base_a, stderr_a) = start(&args);
    let (b, base_b, stderr_b) = start(&args);
    wait_ready(&base_a, &stderr_a);
    wait_ready(&base_b, &stderr_b);

    let from_a = embed(&base_a, &["shared between replicas"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&base_a, "kiln_cache_remote_writes_total") < 1.0 {
        assert!(Instant::now() < deadline, "replica a never wrote its result to redis");
        std::thread::sleep(Duration::from_millis(20));
    }
    let batches_before = metric(&base_b, "kiln_batches_total");
    let from_b = embed(&base_b, &["shared between replicas"]);
    assert_eq!(from_a, from_b, "b serves a's stored result bit for bit");
    assert_eq!(metric(&base_b, "kiln_cache_remote_hits_total"), 1.0);
    assert_eq!(metric(&base_b, "kiln_batches_total"), batches_before, "b ran no model for it");
    assert_eq!(metric(&base_b, "kiln_cache_remote_up"), 1.0);

    redis.kill();
    for i in 0..10 {
        for base in [&base_a, &base_b] {
            let text = format!("after the outage {i}");
            let got = embed(base, &[&text, "shared between replicas"]);
            assert_eq!(got.len(), 2);
        }
    }
    for base in [&base_a, &base_b] {
        assert!(metric(base, "kiln_cache_remote_errors_total") >= 1.0);
        assert_eq!(metric(base, "kiln_cache_remote_up"), 0.0);
        let (_, text) = call(base, "GET", "/metrics", None);
        assert!(!text.contains("kiln_errors_total{"), "no request failed:\n{text}");
    }
    stop(a, stderr_a);
    stop(b, stderr_b);
}

/// A vision-language config (examples/vlm.toml, the Qwen2.5-VL fixture of `scripts/setup
/// vlm`): the real `openai` package sends two images as `image_url` data: URLs and gets
/// the answer transformers gives (its usage counts the image tokens); a remote URL, a
/// data: URL that is no image and a file outside `server.allowed_media_dir` are refused
/// by name, a file inside it is read.
#[test]
fn the_openai_client_sends_images_to_a_vision_language_model() {
    let fixture = support::root().join(".kiln/models/qwen25vl-tiny");
    assert!(fixture.join("prompt.json").is_file(), "run `scripts/setup vlm` (scripts/test does)");
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture.join("prompt.json")).unwrap()).unwrap();
    let images = fixture.join("images");
    let media = format!("server.allowed_media_dir={:?}", images.display().to_string());
    let (server, base, stderr) = start(&["examples/vlm.toml", "--set", &media]);
    wait_ready(&base, &stderr);
    let path = |name: &str| images.join(name).display().to_string();
    let got = clients(
        "vlm_clients.py",
        &[&base, "model", &path("landscape.png"), &path("portrait.png"), "square.png"],
    );
    let compare = &got["compare"];
    let prompt_tokens = reference["input_ids"].as_array().unwrap().len() as u64;
    assert_eq!(compare["usage"][0].as_u64(), Some(prompt_tokens), "{got}");
    assert!(compare["usage"][1].as_u64().unwrap() > 0, "{got}");
    let refused = |k: &str| (got[k]["status"].as_u64(), got[k]["message"].as_str().unwrap_or("").to_string());
    let (status, message) = refused("remote");
    assert!(status == Some(422) && message.contains("fetches no remote URLs"), "{message}");
    let (status, message) = refused("not_image");
    assert!(status == Some(422) && message.contains("not an image"), "{message}");
    let (status, message) = refused("outside");
    assert!(
        status == Some(422) && message.contains("not a file inside server.allowed_media_dir"),
        "{message}"
    );
    assert!(got["inside"]["usage"][0].as_u64().unwrap() > 0, "{got}");
    stop(server, stderr);
}

/// Reads from `stream` until the peer closes it (or a status line arrives): what came,
/// and how long it took. Panics past `within`.
fn until_closed(stream: &mut std::net::TcpStream, within: Duration) -> (String, Duration) {
    use std::io::Read;
    let started = Instant::now();
    stream.set_read_timeout(Some(within)).unwrap();
    let mut got = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buffer[..n]),
            // A reset is a close too.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("still open after {within:?} ({e}); read {:?}", String::from_utf8_lossy(&got)),
        }
    }
    (String::from_utf8_lossy(&got).into_owned(), started.elapsed())
}

/// Issue 30's connection bounds over loopback: a client that sends half its headers and
/// stalls, and a kept-alive connection left idle, are closed after
/// `server.header_timeout_ms`; past `server.max_connections` a connection gets 503 with
/// `Retry-After` at once while the server keeps answering once the others go; SIGTERM
/// with a half-sent body (whose own timeout is a minute) exits within
/// `server.shutdown_timeout_ms`.
#[test]
fn connections_are_bounded_in_time_and_number() {
    use std::io::Write;
    use std::net::TcpStream;
    let (server, base, stderr) = start(&[
        "--set",
        "server.header_timeout_ms=1000",
        "--set",
        "server.max_connections=6",
        "--set",
        "server.shutdown_timeout_ms=2000",
        "--set",
        "server.body_timeout_ms=60000",
    ]);
    wait_ready(&base, &stderr);
    let address = base.trim_start_matches("http://").to_string();

    // Half the headers, then nothing: closed after the header timeout.
    let mut slow = TcpStream::connect(&address).unwrap();
    slow.write_all(b"POST /embed HTTP/1.1\r\nHost: kiln\r\nContent-Ty").unwrap();
    let (_, took) = until_closed(&mut slow, Duration::from_secs(10));
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_secs(5),
        "half headers held {took:?}"
    );

    // A whole request on a kept-alive connection, answered, then idle: closed too.
    let mut idle = TcpStream::connect(&address).unwrap();
    idle.write_all(format!("GET /health HTTP/1.1\r\nHost: {address}\r\n\r\n").as_bytes()).unwrap();
    let (answer, took) = until_closed(&mut idle, Duration::from_secs(10));
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(took < Duration::from_secs(5), "an idle kept-alive connection held {took:?}");

    // Six connections open and silent fill the cap: the seventh is refused at once.
    // The server takes connections in the order they came (one accept loop, the count
    // taken as it accepts), so the seventh is counted after the six.
    let held: Vec<TcpStream> = (0..6).map(|_| TcpStream::connect(&address).unwrap()).collect();
    let mut over = TcpStream::connect(&address).unwrap();
    let (answer, took) = until_closed(&mut over, Duration::from_secs(5));
    assert!(
        answer.starts_with("HTTP/1.1 503")
            && answer.contains("retry-after: 1")
            && answer.contains("server.max_connections"),
        "{answer}"
    );
    assert!(took < Duration::from_secs(1), "refused in {took:?}");
    // The silent ones go at the header timeout; then the server answers again.
    let deadline = Instant::now() + Duration::from_secs(10);
    // One GET /health; a refused connection (closed as we write) is not an answer yet.
    let healthy = || {
        use std::io::Read;
        let mut stream = TcpStream::connect(&address).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        stream
            .write_all(
                format!("GET /health HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .ok()?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).ok()?;
        Some(answer.starts_with("HTTP/1.1 200"))
    };
    loop {
        if healthy() == Some(true) {
            break;
        }
        assert!(Instant::now() < deadline, "still refusing 10 s after the silent connections timed out");
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(held);

    // Headers and 5 of 100 body bytes, then SIGTERM: the drain ends at 2 s, not at the
    // body's 60 s.
    let mut half = TcpStream::connect(&address).unwrap();
    half.write_all(
        format!("POST /embed HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"in")
            .as_bytes(),
    )
    .unwrap();
    // Answered on a later connection: the half-sent one was accepted before it.
    assert_eq!(healthy(), Some(true));
    let started = Instant::now();
    stop(server, stderr);
    assert!(started.elapsed() < Duration::from_secs(10), "shutdown took {:?}", started.elapsed());
    drop(half);
}
