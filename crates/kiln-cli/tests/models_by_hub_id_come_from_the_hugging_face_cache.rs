//! `model.path` as a Hugging Face id: each task's example config run with the model
//! named `ORG/NAME` (or `ORG/NAME/FILE` for a one-file model) from a Hugging Face cache
//! laid out as `huggingface_hub` writes it — blobs, a snapshot of symbolic links, a ref —
//! gives exactly what the same config gives from the folder. A model that is not cached
//! is an error naming the id, the revision and the cache, at once (no network).

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

const COMMIT: &str = "4d1b7c0a9e8f6d5c4b3a2918273645546372819a";

/// Puts the files of `source` (a folder) in `cache` as the snapshot `COMMIT` of `repo`,
/// with `refs/main` naming it, the way `huggingface_hub` lays a download out.
fn cache_model(cache: &Path, repo: &str, source: &Path) {
    assert!(source.is_dir(), "{} is missing: run scripts/setup (scripts/test does)", source.display());
    let folder = cache.join(format!("models--{}", repo.replace('/', "--")));
    let snapshot = folder.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(folder.join("blobs")).unwrap();
    std::fs::create_dir_all(folder.join("refs")).unwrap();
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::write(folder.join("refs/main"), COMMIT).unwrap();
    for (i, entry) in std::fs::read_dir(source).unwrap().enumerate() {
        let path = entry.unwrap().path();
        if !path.is_file() {
            continue;
        }
        let blob = format!("{i:064x}");
        std::fs::copy(&path, folder.join("blobs").join(&blob)).unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/{blob}"), snapshot.join(path.file_name().unwrap()))
            .unwrap();
    }
}

fn kiln(cache: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .current_dir(root())
        .env("HF_HUB_CACHE", cache)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap()
}

fn rows(path: &Path, drop: &[&str]) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            if let Some(o) = v.as_object_mut() {
                for key in drop {
                    o.remove(*key);
                }
            }
            v
        })
        .collect()
}

#[test]
fn every_task_runs_its_model_by_hub_id_as_from_the_folder() {
    let work = std::env::temp_dir().join(format!("kiln-hub-{}", std::process::id()));
    let cache = work.join("hub");
    let models = root().join(".kiln/models");
    // (config, input, the folder the example uses, its id, the file inside)
    // (Classification's example needs the `ort` feature and video's several files; the
    // one-file form is generation's GGUF.)
    let cases: [(&str, &str, PathBuf, &str, Option<&str>); 3] = [
        (
            "examples/embed.toml",
            "examples/data/texts.txt",
            models.join("all-MiniLM-L6-v2"),
            "sentence-transformers/all-MiniLM-L6-v2",
            None,
        ),
        (
            "examples/generate.toml",
            "examples/data/prompts.jsonl",
            models.join("smollm2"),
            "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF",
            Some("SmolLM2-135M-Instruct.Q4_1.gguf"),
        ),
        (
            "examples/vlm.toml",
            "examples/data/vlm.jsonl",
            models.join("qwen25vl-tiny/model"),
            "kiln-fixtures/qwen25vl-tiny",
            None,
        ),
    ];
    for (config, input, source, repo, file) in cases {
        cache_model(&cache, repo, &source);
        let id = match file {
            Some(f) => format!("{repo}/{f}"),
            None => repo.to_string(),
        };
        let (from_folder, from_hub) = (work.join("folder.jsonl"), work.join("hub.jsonl"));
        let run = |output: &Path, extra: &[&str]| {
            let mut args = vec!["run", config, "--input", input, "--output", output.to_str().unwrap()];
            args.extend_from_slice(extra);
            let out = kiln(&cache, &args);
            assert!(out.status.success(), "{config} {extra:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        run(&from_folder, &[]);
        let set = format!("model.path={id}");
        run(&from_hub, &["--set", &set]);
        let timing = ["ttft_ms", "elapsed_ms", "latency_ms"];
        assert_eq!(
            rows(&from_hub, &timing),
            rows(&from_folder, &timing),
            "{config}: by id {id} and from the folder"
        );
    }

    // Not cached: the id, the revision, the cache and how to fetch it — at once.
    let started = std::time::Instant::now();
    let out = kiln(
        &cache,
        &[
            "run",
            "examples/embed.toml",
            "--input",
            "examples/data/texts.txt",
            "--output",
            "/dev/null",
            "--set",
            "model.path=org/not-cached@v2",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    for needle in [
        "org/not-cached",
        "`v2`",
        cache.to_str().unwrap(),
        "huggingface-cli download org/not-cached --revision v2",
        "HF_HUB_OFFLINE",
    ] {
        assert!(err.contains(needle), "{needle:?} not in: {err}");
    }
    assert!(started.elapsed().as_secs() < 30, "the error took {:?}", started.elapsed());
    std::fs::remove_dir_all(&work).unwrap();
}
