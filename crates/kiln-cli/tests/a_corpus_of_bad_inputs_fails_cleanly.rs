//! The committed corpus of bad inputs (`tests/bad-inputs/`): each case exits 1 with an
//! `error:` line naming what was wrong, never a panic, and leaves no output file.

mod support;

use std::process::Command;

use support::root;

/// (command, corpus file, what the error must say). `run` is `kiln run CONFIG -i
/// texts/ok.txt` for configs and `kiln run examples/embed.toml -i FILE` for texts;
/// `preprocess` is `kiln preprocess examples/preprocess.toml FILE`.
const CASES: &[(&str, &str, &str)] = &[
    ("config", "configs/malformed.toml", "TOML parse error at line 1, column 7"),
    ("config", "configs/binary.toml", "stream did not contain valid UTF-8"),
    ("config", "configs/duplicate_key.toml", "TOML parse error at line 3, column 1"),
    (
        "config",
        "configs/unknown_key.toml",
        "`model.pth`: found an unknown key, expected one of the keys path",
    ),
    ("config", "configs/unknown_section.toml", "`modle`: found an unknown key"),
    ("config", "configs/wrong_type.toml", "`batching.max_batch_size`: found string \"many\", expected usize"),
    (
        "config",
        "configs/out_of_range.toml",
        "`scheduler.max_inputs_per_call`: found 0, expected an integer in 1..=",
    ),
    ("config", "configs/negative.toml", "`scheduler.timeout_ms`: found signed int `-5`, expected u64"),
    (
        "config",
        "configs/bad_dtype.toml",
        "`model.dtype`: found string \"f64\", expected one of f32, f16, bf16",
    ),
    (
        "config",
        "configs/bad_device.toml",
        "`model.device`: found string \"tpu:0\", expected `auto`, `cpu`, `cuda:N`",
    ),
    ("config", "configs/bad_pooling.toml", "`text.pooling`: found \"weighted\", expected one of cls, mean"),
    ("text", "texts/empty.txt", "the input has no texts"),
    ("text", "texts/invalid_utf8.txt", "line 2 is not valid UTF-8"),
    ("text", "texts/utf16.txt", "line 1 is not valid UTF-8"),
    ("text", "texts/bad_json.jsonl", "line 2: invalid JSON"),
    ("text", "texts/no_text.jsonl", "line 1: no \"text\" field"),
    ("text", "texts/text_not_string.jsonl", "line 1: \"text\" must be a string, found 5"),
    ("text", "texts/array_line.jsonl", "line 1: expected a JSON object"),
    ("text", "texts/deep.jsonl", "line 1: invalid JSON (recursion limit exceeded"),
    ("image", "images/empty.png", "the file is empty"),
    ("image", "images/notes.png", "not an image kiln recognises; accepted: JPEG, PNG"),
    ("image", "images/truncated.png", "truncated or corrupt"),
    ("image", "images/bad_crc.png", "CRC error"),
    ("image", "images/bomb.png", "100000×100000 = 10000.0 megapixels, over preprocess.max_pixels"),
];

#[test]
fn every_bad_input_exits_1_naming_the_problem() {
    let corpus = root().join("crates/kiln-cli/tests/bad-inputs");
    let out = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for &(kind, file, expect) in CASES {
        let path = corpus.join(file);
        assert!(path.is_file(), "corpus file {file} is missing");
        let (path, ok) = (path.to_str().unwrap(), corpus.join("texts/ok.txt"));
        let output = out.path().join(format!("{}.out", file.replace('/', "_")));
        let output = output.to_str().unwrap();
        let args: Vec<&str> = match kind {
            "config" => vec!["run", path, "-i", ok.to_str().unwrap(), "-o", output],
            "text" => vec!["run", "examples/embed.toml", "-i", path, "-o", output],
            _ => vec!["preprocess", "examples/preprocess.toml", "--out", output, path],
        };
        let run = Command::new(env!("CARGO_BIN_EXE_kiln")).args(&args).current_dir(root()).output().unwrap();
        let stderr = String::from_utf8_lossy(&run.stderr);
        let problems = [
            (run.status.code() != Some(1), format!("exit {:?}", run.status.code())),
            (stderr.contains("panicked"), "a panic".to_string()),
            (!stderr.lines().any(|l| l.starts_with("error: ")), "no `error:` line".to_string()),
            (!stderr.contains(expect), format!("no {expect:?}")),
            (std::path::Path::new(output).exists(), "an output file".to_string()),
        ];
        for (bad, what) in problems {
            if bad {
                failures.push(format!("{file}: {what}\n{stderr}"));
            }
        }
    }
    assert!(failures.is_empty(), "{} of {} cases:\n{}", failures.len(), CASES.len(), failures.join("\n"));
}
