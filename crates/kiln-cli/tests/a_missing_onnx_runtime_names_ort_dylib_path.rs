//! Without libonnxruntime, or with the wrong file, `kiln run` on the ort provider ends
//! with one line naming ORT_DYLIB_PATH and what it must point at.
#![cfg(feature = "ort")]

mod support;

use std::process::Command;

fn run_with(dylib: Option<&str>) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let mut command = Command::new(env!("CARGO_BIN_EXE_kiln"));
    command
        .args(["run", "examples/embed-ort.toml", "--input", "examples/data/texts.txt", "--output"])
        .arg(&out)
        .current_dir(support::root());
    match dylib {
        Some(path) => command.env("ORT_DYLIB_PATH", path),
        None => command.env_remove("ORT_DYLIB_PATH"),
    };
    let output = command.output().unwrap();
    (output.status.code(), String::from_utf8_lossy(&output.stderr).into_owned())
}

#[test]
fn unset_wrong_and_missing_libraries_are_named() {
    let (code, stderr) = run_with(None);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("ORT_DYLIB_PATH is not set") && stderr.contains("scripts/setup ort"), "{stderr}");

    let (code, stderr) = run_with(Some("/nonexistent/libonnxruntime.so"));
    assert_eq!(code, Some(1));
    assert!(stderr.contains("ORT_DYLIB_PATH=/nonexistent/libonnxruntime.so is not a file"), "{stderr}");

    let not_a_library = support::root().join("README.md");
    let (code, stderr) = run_with(Some(not_a_library.to_str().unwrap()));
    assert_eq!(code, Some(1));
    assert!(stderr.contains("ORT_DYLIB_PATH=") && stderr.contains("cannot load ONNX Runtime"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
