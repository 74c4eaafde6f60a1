//! Every kind of bad input ends with exit code 1, one `error:` line naming what was
//! wrong and what is accepted, no panic, and no output file.

mod support;

use std::process::Command;

use support::{kiln, root};

/// Runs `kiln run examples/embed.toml` with an input of `content` and extra args;
/// returns stderr after checking the failure is clean.
fn fails(content: &[u8], file_name: &str, extra: &[&str], envs: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join(file_name);
    std::fs::write(&input, content).unwrap();
    let output = dir.path().join("out.jsonl");
    let mut args =
        vec!["run", "examples/embed.toml", "-i", input.to_str().unwrap(), "-o", output.to_str().unwrap()];
    args.extend(extra);
    let run = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(&args)
        .envs(envs.iter().copied())
        .current_dir(root())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr).to_string();
    assert_eq!(run.status.code(), Some(1), "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!output.exists(), "no output file after a failure");
    assert!(!dir.path().join("out.jsonl.partial").exists());
    stderr
}

#[test]
fn unknown_provider_lists_the_known_ones() {
    let err = fails(b"hi\n", "t.txt", &["--set", "provider.name=tensorflow"], &[]);
    assert!(err.contains("unknown provider `tensorflow`; known providers: candle"), "{err}");
}

#[test]
fn missing_model_folder() {
    let err = fails(b"hi\n", "t.txt", &["--set", "model.path=/no/such/model"], &[]);
    assert!(err.contains("cannot load model from /no/such/model: no such folder"), "{err}");
}

#[test]
fn model_folder_without_config_json() {
    let empty = tempfile::tempdir().unwrap();
    let set = format!("model.path={}", empty.path().display());
    let err = fails(b"hi\n", "t.txt", &["--set", &set], &[]);
    assert!(err.contains("no config.json; expected a Hugging Face BERT folder"), "{err}");
}

#[test]
fn empty_input_file() {
    let err = fails(b"", "t.txt", &[], &[]);
    assert!(err.contains("the input has no texts"), "{err}");
}

#[test]
fn invalid_utf8_names_the_line() {
    let err = fails(b"good\nstill good\n\xc3\x28 bad\n", "t.txt", &[], &[]);
    assert!(err.contains("line 3 is not valid UTF-8"), "{err}");
}

#[test]
fn one_bad_jsonl_line_names_its_number() {
    let err = fails(b"{\"text\": \"a\"}\n{\"text\": \"b\"}\n{\"id\": 3}\n", "t.jsonl", &[], &[]);
    assert!(err.contains("line 3: no \"text\" field"), "{err}");
}

#[test]
fn invalid_config_values_name_key_value_and_expectation() {
    let err =
        fails(b"hi\n", "t.txt", &["--set", "batching.max_batch_size=0"], &[("KILN_MODEL__DTYPE", "f64")]);
    assert!(err.contains("`model.dtype`: found string \"f64\", expected one of f32, f16, bf16"), "{err}");
    assert!(err.contains("environment variable KILN_MODEL__DTYPE"), "{err}");
    assert!(err.contains("`batching.max_batch_size`: found 0, expected an integer in 1..=4096"), "{err}");
}

#[test]
fn missing_config_file() {
    let run = kiln(&["run", "nope.toml", "-i", "x", "-o", "y"]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1));
    assert!(stderr.contains("reading config nope.toml: no such file"), "{stderr}");
}
