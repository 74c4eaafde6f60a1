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
