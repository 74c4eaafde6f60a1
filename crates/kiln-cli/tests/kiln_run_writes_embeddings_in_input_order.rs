//! `kiln run` writes one JSON line per input text, in input order, equal to
//! sentence-transformers' embeddings (cosine ≥ 0.9999), for both input formats.

mod support;

use std::path::Path;

use support::{cosine, kiln, reference};

fn rows(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn lines_input_gives_ids_by_line_number_and_reference_embeddings() {
    let (texts, expected) = reference();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("texts.txt");
    let output = dir.path().join("out.jsonl");
    std::fs::write(&input, texts.join("\n") + "\n").unwrap();
    let run =
        kiln(&["run", "examples/embed.toml", "-i", input.to_str().unwrap(), "-o", output.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("embedded {} texts in", texts.len())) && stderr.contains("texts/s"),
        "{stderr}"
    );

    let rows = rows(&output);
    assert_eq!(rows.len(), texts.len(), "one line per text, the empty ones included");
    for (i, (row, want)) in rows.iter().zip(&expected).enumerate() {
        assert_eq!(row["id"], i, "ids are 0-based line numbers");
        let got: Vec<f32> = serde_json::from_value(row["embedding"].clone()).unwrap();
        assert!(cosine(&got, want) >= 0.9999, "line {i} ({:?}): cosine {}", texts[i], cosine(&got, want));
    }
    assert!(!dir.path().join("out.jsonl.partial").exists());
}

#[test]
fn jsonl_input_keeps_its_ids_and_order() {
    let (texts, expected) = reference();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("texts.jsonl");
    let output = dir.path().join("out.jsonl");
    let lines: Vec<String> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| serde_json::json!({"id": format!("doc-{}", texts.len() - i), "text": t}).to_string())
        .collect();
    std::fs::write(&input, lines.join("\n")).unwrap();
    let run = kiln(&[
        "run",
        "examples/embed.toml",
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let rows = rows(&output);
    assert_eq!(rows.len(), texts.len());
    for (i, (row, want)) in rows.iter().zip(&expected).enumerate() {
        assert_eq!(row["id"], format!("doc-{}", texts.len() - i));
        let got: Vec<f32> = serde_json::from_value(row["embedding"].clone()).unwrap();
        assert!(cosine(&got, want) >= 0.9999);
    }
}

#[test]
fn config_prints_the_merged_config_and_providers_lists_candle() {
    let out = kiln(&[
        "config",
        "examples/embed.toml",
        "--set",
        "model.dtype=bf16",
        "--set",
        "batching.max_batch_size=8",
    ]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success());
    assert!(text.contains("dtype = \"bf16\"") && text.contains("max_batch_size = 8"), "{text}");
    let back: toml::Value = toml::from_str(&text).expect("kiln config prints valid TOML");
    assert_eq!(back["provider"]["name"].as_str(), Some("candle"));

    let out = kiln(&["providers", "--json"]);
    assert!(out.status.success());
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let candle = list.as_array().unwrap().iter().find(|p| p["name"] == "candle").expect("candle is listed");
    assert_eq!(candle["capabilities"]["devices"], serde_json::json!(["cpu"]));
    assert_eq!(candle["capabilities"]["dtypes"], serde_json::json!(["f32", "f16", "bf16"]));
}

/// A file is a job, not a request: the deadline bounds each call `kiln run` makes, so a
/// file that takes far longer than `scheduler.timeout_ms` in all still completes, in
/// order, and stderr (not a terminal here) gets no progress bar.
#[test]
fn a_file_longer_than_the_request_deadline_completes_in_order() {
    let words = ["kiln", "batches", "texts", "on", "two", "cores", "and", "the", "deadline", "holds"];
    let texts: Vec<String> = (0..400)
        .map(|i| {
            let t = (0..20 + i % 21).map(|j| words[(i * 7 + j * 3) % words.len()]).collect::<Vec<_>>();
            format!("{} {i}", t.join(" "))
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("texts.txt");
    let output = dir.path().join("out.jsonl");
    std::fs::write(&input, texts.join("\n") + "\n").unwrap();
    // 400 texts of 20-40 words one at a time take over ten seconds on two cores; each
    // call (one text, four in flight) takes a small fraction of the 3 s deadline, even
    // with other tests loading the machine.
    let run = kiln(&[
        "run",
        "examples/embed.toml",
        "-i",
        input.to_str().unwrap(),
        "-o",
        output.to_str().unwrap(),
        "--set",
        "scheduler.timeout_ms=3000",
        "--set",
        "batching.max_batch_size=1",
    ]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(!stderr.contains("eta"), "no progress bar when stderr is not a terminal: {stderr}");
    let rows = rows(&output);
    assert_eq!(rows.len(), texts.len());
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row["id"], i, "input order kept");
        assert_eq!(row["embedding"].as_array().map(Vec::len), Some(384));
    }
}
