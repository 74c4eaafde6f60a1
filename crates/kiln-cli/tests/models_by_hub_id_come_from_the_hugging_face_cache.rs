//! `model.path` as a Hugging Face id: each task's example config run with the model
//! named `ORG/NAME` (or `ORG/NAME/FILE` for a one-file model) from a Hugging Face cache
//! laid out as `huggingface_hub` writes it — blobs, a snapshot of symbolic links, a ref —
//! gives exactly what the same config gives from the folder. A model that is not cached
//! is an error naming the id, the revision and the cache, at once with `HF_HUB_OFFLINE`
//! (no network); without it, the model is downloaded into the cache — here from
//! [`FakeHub`], a test double of huggingface.co on loopback (this machine reaches no
//! network), answering hf-hub's requests as the Hub does.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

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

/// A test double of huggingface.co: one repository's files at one commit, served on
/// loopback as the Hub's API answers the hf-hub crate — the file list at
/// `/api/models/REPO/revision/REV`, each file at `/REPO/resolve/REV/PATH` with its commit
/// (`x-repo-commit`), an ETag and byte ranges. Every request path is logged.
struct FakeHub {
    url: String,
    requests: Arc<Mutex<Vec<String>>>,
}

impl FakeHub {
    fn serve(repo: &str, files: Vec<(String, Vec<u8>)>) -> FakeHub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (log, repo, files) = (requests.clone(), repo.to_string(), Arc::new(files));
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (log, repo, files) = (log.clone(), repo.clone(), files.clone());
                std::thread::spawn(move || FakeHub::answer(stream, &repo, &files, &log));
            }
        });
        FakeHub { url, requests }
    }

    fn answer(stream: TcpStream, repo: &str, files: &[(String, Vec<u8>)], log: &Mutex<Vec<String>>) {
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
        let mut range = None;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap() == 0 || header.trim().is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("range")
            {
                range = value.trim().strip_prefix("bytes=").map(str::to_string);
            }
        }
        log.lock().unwrap().push(path.clone());
        let mut out = stream;
        let api = format!("/api/models/{repo}/revision/");
        let resolve = format!("/{repo}/resolve/");
        let (status, headers, body): (&str, Vec<String>, Vec<u8>) = if path.starts_with(&api) {
            let siblings: Vec<_> = files.iter().map(|(f, _)| serde_json::json!({"rfilename": f})).collect();
            let info = serde_json::json!({"sha": COMMIT, "siblings": siblings});
            ("200 OK", vec!["content-type: application/json".into()], info.to_string().into_bytes())
        } else if let Some(rest) = path.strip_prefix(&resolve)
            && let Some((_, name)) = rest.split_once('/')
            && let Some(index) = files.iter().position(|(f, _)| f == name)
        {
            let data = &files[index].1;
            let (start, end) = match range.as_deref().and_then(|r| r.split_once('-')) {
                Some((a, b)) => {
                    let a: usize = a.parse().unwrap_or(0);
                    let b: usize =
                        if b.is_empty() { data.len().saturating_sub(1) } else { b.parse().unwrap() };
                    (a.min(data.len()), (b + 1).min(data.len()))
                }
                None => (0, data.len()),
            };
            let headers = vec![
                format!("x-repo-commit: {COMMIT}"),
                format!("etag: \"{index:064x}\""),
                format!("content-range: bytes {start}-{}/{}", end.max(start + 1) - 1, data.len()),
            ];
            ("206 Partial Content", headers, data[start..end.max(start)].to_vec())
        } else {
            ("404 Not Found", Vec::new(), b"not found".to_vec())
        };
        let mut head =
            format!("HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n", body.len());
        for h in headers {
            head.push_str(&h);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        let _ = out.write_all(head.as_bytes()).and_then(|()| out.write_all(&body));
    }
}

/// Every file under `dir`, as paths relative to it (`/`-separated) and their bytes.
fn files_of(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let name = path.strip_prefix(dir).unwrap().to_string_lossy().replace('\\', "/");
                out.push((name, std::fs::read(&path).unwrap()));
            }
        }
    }
    out
}

#[test]
fn a_missing_model_is_downloaded_into_the_cache_unless_offline() {
    let work = std::env::temp_dir().join(format!("kiln-hub-download-{}", std::process::id()));
    let cache = work.join("hub");
    std::fs::create_dir_all(&cache).unwrap();
    let source = root().join(".kiln/models/all-MiniLM-L6-v2");
    assert!(source.is_dir(), "{} is missing: run scripts/setup (scripts/test does)", source.display());
    let repo = "sentence-transformers/all-MiniLM-L6-v2";
    let mut files = files_of(&source);
    // What a real repository also holds and kiln does not read: never fetched.
    files.push(("pytorch_model.bin".into(), vec![0; 1000]));
    files.push(("onnx/model.onnx".into(), vec![0; 1000]));
    let hub = FakeHub::serve(repo, files);

    let run = |output: &Path, extra: &[&str], online: bool| {
        let mut args = vec!["run", "examples/embed.toml", "--input", "examples/data/texts.txt"];
        args.extend(["--output", output.to_str().unwrap()]);
        args.extend_from_slice(extra);
        let mut command = Command::new(env!("CARGO_BIN_EXE_kiln"));
        command.args(&args).current_dir(root()).env("HF_HUB_CACHE", &cache).env_remove("HF_TOKEN");
        if online {
            command.env_remove("HF_HUB_OFFLINE").env("HF_ENDPOINT", &hub.url);
        } else {
            command.env("HF_HUB_OFFLINE", "1").env("HF_ENDPOINT", "http://127.0.0.1:9");
        }
        let out = command.output().unwrap();
        assert!(out.status.success(), "{extra:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let (from_folder, downloaded, cached) =
        (work.join("folder.jsonl"), work.join("downloaded.jsonl"), work.join("cached.jsonl"));
    let set = format!("model.path={repo}");
    run(&from_folder, &[], false);
    run(&downloaded, &["--set", &set], true);
    let timing = ["latency_ms"];
    assert_eq!(rows(&downloaded, &timing), rows(&from_folder, &timing), "downloaded and from the folder");

    // huggingface_hub's layout: the ref, a snapshot of links into blobs.
    let folder = cache.join("models--sentence-transformers--all-MiniLM-L6-v2");
    assert_eq!(std::fs::read_to_string(folder.join("refs/main")).unwrap().trim(), COMMIT);
    let snapshot = folder.join("snapshots").join(COMMIT);
    for name in ["config.json", "model.safetensors", "1_Pooling/config.json"] {
        let link = snapshot.join(name);
        assert!(
            std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink(),
            "{name} links into blobs"
        );
        assert_eq!(
            std::fs::read(&link).unwrap(),
            std::fs::read(source.join(name)).unwrap(),
            "{name}'s bytes"
        );
    }
    let requests = hub.requests.lock().unwrap().clone();
    for skipped in ["pytorch_model.bin", "onnx/model.onnx", ".gitattributes"] {
        assert!(!snapshot.join(skipped).exists(), "{skipped} was fetched");
        assert!(!requests.iter().any(|r| r.ends_with(skipped)), "{skipped} was requested");
    }

    // Now cached: offline, the same results without a request.
    let before = requests.len();
    run(&cached, &["--set", &set], false);
    assert_eq!(rows(&cached, &timing), rows(&from_folder, &timing), "from the cache, offline");
    assert_eq!(hub.requests.lock().unwrap().len(), before, "no request once cached");
    std::fs::remove_dir_all(&work).unwrap();
}
