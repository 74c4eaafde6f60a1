//! Helpers shared by the CLI's integration tests.
#![allow(dead_code)]

pub mod serve;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The workspace root: the CLI runs from there, as the README's commands do.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

/// Runs the real `kiln` binary from the workspace root.
pub fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).current_dir(root()).output().unwrap()
}

/// The sentence-transformers reference: texts and their embeddings.
pub fn reference() -> (Vec<String>, Vec<Vec<f32>>) {
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root().join("tests/fixtures/minilm_reference.json")).unwrap())
            .unwrap();
    (
        serde_json::from_value(json["texts"].clone()).unwrap(),
        serde_json::from_value(json["embeddings"].clone()).unwrap(),
    )
}

/// Cosine similarity.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
    let n = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (n(a) * n(b))
}

/// Runs one of tests/readers/*.py with the Python that `scripts/setup readers` made
/// (real TensorBoard, wandb and PIL from PyPI) and parses what it prints.
pub fn read_with(script: &str, arg: &Path) -> serde_json::Value {
    python(script, &[arg.as_os_str()])
}

/// [`read_with`] with any arguments.
pub fn python(script: &str, args: &[&std::ffi::OsStr]) -> serde_json::Value {
    let python = std::env::var("TRACKER_READERS_PYTHON").unwrap_or_else(|_| {
        panic!("TRACKER_READERS_PYTHON is not set: run `scripts/setup readers` and `. .kiln/env` (scripts/test does)")
    });
    let out =
        Command::new(&python).arg(root().join("tests/readers").join(script)).args(args).output().unwrap();
    assert!(out.status.success(), "{script} {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The events of a JSON Lines tracker file; every line must parse.
pub fn jsonl_events(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("a line of {} is not JSON ({e}): {l}", path.display()))
        })
        .collect()
}
