//! `task = "classify"` with the real PP-OCR text-line orientation classifier on ONNX
//! Runtime (examples/classify.toml): lines of text rendered with Pillow's font, upright
//! and turned 180°, are told apart at least 95% of the time; an unreadable image gets
//! an error row while the others are classified.
#![cfg(feature = "ort")]

mod support;

use std::ffi::OsStr;

use support::{kiln, python};

#[test]
fn at_least_95_percent_of_text_lines_get_their_orientation() {
    let dir = tempfile::tempdir().unwrap();
    let lines = dir.path().join("lines");
    std::fs::create_dir(&lines).unwrap();
    let truth = python("pil_reference.py", &[OsStr::new("text-lines"), lines.as_os_str(), OsStr::new("50")]);
    let out = dir.path().join("orientation.jsonl");
    let run = kiln(&[
        "run",
        "examples/classify.toml",
        "--input",
        lines.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    let rows = support::jsonl_events(&out);
    assert_eq!(rows.len(), 100);
    let mut right = 0;
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row["id"], i);
        let path = row["path"].as_str().unwrap();
        let top = &row["top_k"];
        assert_eq!(top.as_array().unwrap().len(), 2, "top_k = 2: {row}");
        let (a, b) = (top[0]["score"].as_f64().unwrap(), top[1]["score"].as_f64().unwrap());
        assert!(a >= b && (a + b - 1.0).abs() < 1e-4, "softmax, best first: {row}");
        let label: u64 = top[0]["label"].as_str().unwrap().parse().unwrap();
        right += usize::from(Some(label) == truth[path].as_u64());
    }
    assert!(right >= 95, "{right} of 100 right");
}

#[test]
fn an_unreadable_image_gets_an_error_row_and_the_others_are_classified() {
    let dir = tempfile::tempdir().unwrap();
    let truth =
        python("pil_reference.py", &[OsStr::new("text-lines"), dir.path().as_os_str(), OsStr::new("2")]);
    let broken = dir.path().join("broken.png");
    std::fs::write(&broken, b"\x89PNG\r\n\x1a\nnot really").unwrap();
    let mut list: Vec<String> = truth.as_object().unwrap().keys().cloned().collect();
    list.insert(1, broken.display().to_string());
    let list_file = dir.path().join("list.txt");
    std::fs::write(&list_file, list.join("\n")).unwrap();
    let out = dir.path().join("out.jsonl");
    let run = kiln(&[
        "run",
        "examples/classify.toml",
        "--input",
        list_file.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("broken.png") && stderr.contains("1 of 5 images could not be read"), "{stderr}");
    let rows = support::jsonl_events(&out);
    assert_eq!(rows.len(), 5);
    assert!(rows[1]["error"].as_str().unwrap().contains("broken.png"), "{}", rows[1]);
    assert!(rows.iter().enumerate().all(|(i, r)| i == 1 || r["top_k"].is_array()));
}

/// `kiln serve examples/classify.toml`: `POST /classify` gives each image `kiln run`'s
/// classes and scores, for base64 JSON and for an image sent as the body; an unreadable
/// image gets its own error while the others are answered; `/info` describes a
/// classifier and the embedding routes answer 404 naming `/classify`.
#[test]
fn kiln_serve_classifies_as_kiln_run_does() {
    use base64::Engine;
    use support::serve::{call, call_raw, start, stop, wait_ready};

    let dir = tempfile::tempdir().unwrap();
    python("pil_reference.py", &[OsStr::new("text-lines"), dir.path().as_os_str(), OsStr::new("3")]);
    let out = dir.path().join("expected.jsonl");
    let run = kiln(&[
        "run",
        "examples/classify.toml",
        "--input",
        dir.path().to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let expected = support::jsonl_events(&out);
    assert_eq!(expected.len(), 6);
    let files: Vec<Vec<u8>> =
        expected.iter().map(|r| std::fs::read(r["path"].as_str().unwrap()).unwrap()).collect();

    let (server, base, stderr) = start(&["examples/classify.toml"]);
    wait_ready(&base, &stderr);
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    let mut images: Vec<String> = files.iter().map(|f| b64(f)).collect();
    images.insert(2, b64(b"\x89PNG\r\n\x1a\nnot really"));
    let (status, body) = call(&base, "POST", "/classify", Some(&serde_json::json!({ "images": images })));
    assert_eq!(status, 200, "{body}");
    let got: serde_json::Value = serde_json::from_str(&body).unwrap();
    let mut predictions = got["predictions"].as_array().unwrap().clone();
    assert_eq!(predictions.len(), 7, "{got}");
    let broken = predictions.remove(2);
    assert!(broken["error"]["message"].as_str().unwrap().contains("images[2]"), "{broken}");
    let same = |p: &serde_json::Value, row: &serde_json::Value| {
        let (a, b) = (p["top_k"].as_array().unwrap(), row["top_k"].as_array().unwrap());
        a.len() == b.len()
            && a.iter().zip(b).all(|(x, y)| {
                x["label"] == y["label"]
                    && (x["score"].as_f64().unwrap() - y["score"].as_f64().unwrap()).abs() < 1e-5
            })
    };
    for (p, row) in predictions.iter().zip(&expected) {
        assert!(same(p, row), "serve {p} against run {row}");
    }

    // One image as the body, the way `curl --data-binary @line.png` sends it.
    let (status, body) = call_raw(&base, "POST", "/classify", "image/png", &files[0]);
    assert_eq!(status, 200, "{body}");
    let got: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(same(&got["predictions"][0], &expected[0]), "{got}");

    let (status, body) = call(&base, "GET", "/info", None);
    assert_eq!(status, 200);
    assert!(body.contains("\"classifier\""), "{body}");
    let (status, body) = call(&base, "POST", "/v1/embeddings", Some(&serde_json::json!({"input": "hi"})));
    assert!(status == 404 && body.contains("POST /classify"), "{status} {body}");
    let (status, body) = call(&base, "POST", "/classify", Some(&serde_json::json!({"images": ["%%%"]})));
    assert!(status == 422 && body.contains("images[0]") && body.contains("base64"), "{status} {body}");
    stop(server, stderr);
}
