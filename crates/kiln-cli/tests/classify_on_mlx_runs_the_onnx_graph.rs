//! `task = "classify"` on the MLX provider (examples/classify-mlx.toml): the PP-OCR
//! text-line orientation classifier's ONNX file, compiled by kiln's ONNX-on-MLX graph
//! runner, tells upright from upside-down lines at least 95% of the time; with the `ort`
//! feature also built, its scores equal ONNX Runtime's on the same images. An operator
//! MLX does not run is refused at load, by name.
#![cfg(feature = "mlx")]

mod support;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::Path;

use support::{kiln, python};

/// Each image's scores by label, from a classify run of `config` over `input`.
fn classify(config: &str, input: &Path, out: &Path, sets: &[&str]) -> HashMap<String, HashMap<String, f64>> {
    let mut args = vec!["run", config, "--input", input.to_str().unwrap(), "--output", out.to_str().unwrap()];
    for s in sets {
        args.extend(["--set", s]);
    }
    let run = kiln(&args);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    support::jsonl_events(out)
        .iter()
        .map(|row| {
            let scores = row["top_k"]
                .as_array()
                .unwrap_or_else(|| panic!("no top_k: {row}"))
                .iter()
                .map(|t| (t["label"].as_str().unwrap().to_string(), t["score"].as_f64().unwrap()))
                .collect();
            (row["path"].as_str().unwrap().to_string(), scores)
        })
        .collect()
}

fn best(scores: &HashMap<String, f64>) -> u64 {
    scores.iter().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0.parse().unwrap()
}

#[test]
fn mlx_runs_the_pp_ocr_classifier_from_its_onnx_file() {
    let dir = tempfile::tempdir().unwrap();
    let lines = dir.path().join("lines");
    std::fs::create_dir(&lines).unwrap();
    let truth = python("pil_reference.py", &[OsStr::new("text-lines"), lines.as_os_str(), OsStr::new("50")]);
    let mlx = classify("examples/classify-mlx.toml", &lines, &dir.path().join("mlx.jsonl"), &[]);
    assert_eq!(mlx.len(), 100);
    let right = mlx.iter().filter(|(path, s)| Some(best(s)) == truth[path.as_str()].as_u64()).count();
    assert!(right >= 95, "{right} of 100 right");

    // f16 on MLX's CPU stays close to f32.
    let half = classify(
        "examples/classify-mlx.toml",
        &lines,
        &dir.path().join("f16.jsonl"),
        &["model.dtype=\"f16\""],
    );
    let worst = |a: &HashMap<String, HashMap<String, f64>>, b: &HashMap<String, HashMap<String, f64>>| {
        a.iter().flat_map(|(path, s)| s.iter().map(move |(l, v)| (v - b[path][l]).abs())).fold(0.0, f64::max)
    };
    let f16_gap = worst(&half, &mlx);
    println!("f16 against f32 on MLX: largest score difference {f16_gap:.2e}");
    assert!(f16_gap < 1e-2, "{f16_gap}");

    if cfg!(feature = "ort") {
        let ort = classify("examples/classify.toml", &lines, &dir.path().join("ort.jsonl"), &[]);
        let gap = worst(&mlx, &ort);
        println!("MLX against ONNX Runtime: largest score difference {gap:.2e} over {} images", ort.len());
        assert!(gap < 1e-5, "{gap}");
    }
}

#[test]
fn an_operator_mlx_does_not_run_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    // A one-node ONNX model (LpNormalization), hand-encoded: protobuf fields of
    // ModelProto { opset_import { version 13 }, graph { node, input, output } }.
    fn field(number: u8, payload: &[u8]) -> Vec<u8> {
        assert!(payload.len() < 128);
        [vec![number << 3 | 2, payload.len() as u8], payload.to_vec()].concat()
    }
    let value = |name: &[u8]| field(1, name);
    let node = [field(1, b"x"), field(2, b"y"), field(3, b"norm"), field(4, b"LpNormalization")].concat();
    let graph = [field(1, &node), field(11, &value(b"x")), field(12, &value(b"y"))].concat();
    let opset = [0x10, 13];
    let model = dir.path().join("norm.onnx");
    std::fs::write(&model, [field(8, &opset), field(7, &graph)].concat()).unwrap();
    let run = kiln(&[
        "run",
        "examples/classify-mlx.toml",
        "--input",
        "crates/kiln-fuzz/seeds/image",
        "--output",
        dir.path().join("out.jsonl").to_str().unwrap(),
        "--set",
        &format!("model.path=\"{}\"", model.display()),
    ]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("norm.onnx") && stderr.contains("LpNormalization") && stderr.contains("Conv"),
        "names the file, the operator and what is run: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}
