//! The tch provider checks the libtorch the process runs with: one of another PyTorch
//! release is refused at start with an error naming both versions, not a crash deep
//! inside libtorch. Fault injection: a folder of hard links to the real torch 2.11
//! libraries whose `version.py` claims 2.10.0, first on LD_LIBRARY_PATH.
#![cfg(feature = "tch")]

mod support;

use std::path::PathBuf;
use std::process::Command;

fn torch_lib() -> PathBuf {
    let libtorch =
        std::env::var_os("LIBTORCH").expect("LIBTORCH is not set: run `scripts/setup tch`, `. .kiln/env`");
    PathBuf::from(libtorch).join("lib")
}

fn kiln(args: &[&str], ld_library_path: &str) -> (Option<i32>, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env("LD_LIBRARY_PATH", ld_library_path)
        .current_dir(support::root())
        .output()
        .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (output.status.code(), text(&output.stdout), text(&output.stderr))
}

#[test]
fn the_right_libtorch_is_listed_and_another_release_is_refused_by_name() {
    let real = torch_lib();
    let path = std::env::var("LD_LIBRARY_PATH").unwrap_or_default();

    let (code, stdout, stderr) = kiln(&["providers", "--json"], &path);
    assert_eq!(code, Some(0), "{stderr}");
    let rows: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let tch = rows.as_array().unwrap().iter().find(|r| r["name"] == "tch").expect("tch is listed");
    let formats = tch["capabilities"]["formats"].to_string();
    assert!(formats.contains("TorchScript") && formats.contains("2.11.0"), "{tch}");

    let fake = tempfile::tempdir_in(support::root().join("target")).unwrap();
    let lib = fake.path().join("lib");
    std::fs::create_dir(&lib).unwrap();
    for entry in std::fs::read_dir(&real).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::hard_link(entry.path(), lib.join(entry.file_name())).unwrap();
        }
    }
    std::fs::write(fake.path().join("version.py"), "__version__ = '2.10.0+cpu'\n").unwrap();
    let path = format!("{}:{path}", lib.display());
    let out = fake.path().join("out.jsonl");
    let out = out.to_str().unwrap();
    let (code, _, stderr) = kiln(
        &["run", "examples/embed-tch.toml", "--input", "examples/data/texts.txt", "--output", out],
        &path,
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("is PyTorch 2.10.0")
            && stderr.contains("for PyTorch 2.11.0")
            && stderr.contains("scripts/setup tch"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}
