//! Models named by Hugging Face id (`sentence-transformers/all-MiniLM-L6-v2`,
//! optionally `@revision`; always `ORG/NAME` — the hub's old one-word names such as
//! `gpt2` now live under an organisation, and a lone word is more likely a folder), found in the Hugging Face cache exactly where
//! `huggingface_hub` puts them — so a model a user fetched with `huggingface-cli
//! download`, `hf download` or any Python library is used as it is, with no copy.
//!
//! # The cache, as `huggingface_hub` lays it out
//!
//! The cache folder is `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`. A model `ORG/NAME` lives in `models--ORG--NAME/`:
//! `refs/<branch or tag>` is a file holding a commit hash, `snapshots/<commit>/` holds
//! the files of that commit (symbolic links into `blobs/`, which the file system
//! follows). A revision given as a full commit hash names its snapshot directly.
//!
//! # Offline first
//!
//! The cache is read first, and a model found there is used without any network call.
//! A model that is not there is fetched by the [`Downloader`] the build registered — the
//! `kiln` crate's `hub` feature (on by default) registers `kiln-hub`'s, which downloads
//! through the `hf-hub` crate into this same cache — unless `HF_HUB_OFFLINE` is set, as
//! `huggingface_hub` reads it. Offline, or with no downloader, or when the download
//! fails, it is an error naming the id, the revision, the folder searched and the
//! command that fetches it; with `HF_HUB_OFFLINE` set that error comes at once — never a
//! hang or a network call. kiln-core itself reaches no network.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// A model id, the revision asked for and, for a provider that reads one file (an ONNX
/// graph, a GGUF), the file inside the repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubId {
    /// `ORG/NAME`.
    pub repo: String,
    /// A branch, a tag or a commit hash; `main` when none is given.
    pub revision: String,
    /// A file in the repository (`ORG/NAME/model.onnx`), or the whole snapshot folder.
    pub file: Option<String>,
}

impl HubId {
    /// `text` read as `ORG/NAME[@REVISION][/FILE]`, or `None` when it cannot be one:
    /// empty parts, no `/`, a leading `.` or `/`, `..` anywhere, or characters a hub
    /// id does not use (letters, digits, `-`, `_`, `.`).
    pub fn parse(text: &str) -> Option<HubId> {
        let mut parts = text.split('/');
        let (org, name) = (parts.next()?, parts.next()?);
        let file: Vec<&str> = parts.collect();
        let (name, revision) = match name.split_once('@') {
            Some((name, rev)) => (name, rev),
            None => (name, "main"),
        };
        let word = |p: &str| {
            !p.is_empty()
                && !p.starts_with('.')
                && !p.contains("..")
                && p.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        if !word(org) || !word(name) || !word(revision) || !file.iter().all(|p| word(p)) {
            return None;
        }
        Some(HubId {
            repo: format!("{org}/{name}"),
            revision: revision.to_string(),
            file: (!file.is_empty()).then(|| file.join("/")),
        })
    }

    /// The model's folder in `cache`: `models--ORG--NAME`.
    pub fn folder(&self, cache: &Path) -> PathBuf {
        cache.join(format!("models--{}", self.repo.replace('/', "--")))
    }
}

/// The Hugging Face cache folder as `huggingface_hub` finds it from `var` (the
/// environment): `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`.
pub fn cache_dir_from(var: impl Fn(&str) -> Option<String>) -> PathBuf {
    let set = |k: &str| var(k).filter(|v| !v.is_empty());
    if let Some(dir) = set("HF_HUB_CACHE") {
        return expand_home(&dir, &var);
    }
    if let Some(home) = set("HF_HOME") {
        return expand_home(&home, &var).join("hub");
    }
    let base = set("XDG_CACHE_HOME")
        .map(|d| expand_home(&d, &var))
        .unwrap_or_else(|| PathBuf::from(set("HOME").unwrap_or_else(|| "/".into())).join(".cache"));
    base.join("huggingface").join("hub")
}

fn expand_home(path: &str, var: &impl Fn(&str) -> Option<String>) -> PathBuf {
    match (path.strip_prefix("~/"), var("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => PathBuf::from(path),
    }
}

/// The cache folder for this process's environment.
pub fn cache_dir() -> PathBuf {
    cache_dir_from(|k| std::env::var(k).ok())
}

/// The snapshot folder of `id` in `cache`, or an error saying what was looked for and
/// how to fetch the model.
pub fn resolve_in(id: &HubId, cache: &Path) -> Result<PathBuf> {
    let folder = id.folder(cache);
    let is_commit = id.revision.len() == 40 && id.revision.chars().all(|c| c.is_ascii_hexdigit());
    let looked_for;
    let commit = if is_commit {
        looked_for = folder.join("snapshots").join(&id.revision);
        Some(id.revision.clone())
    } else {
        let reference = folder.join("refs").join(&id.revision);
        looked_for = reference.clone();
        std::fs::read_to_string(&reference).ok().map(|s| s.trim().to_string())
    };
    if let Some(commit) = commit {
        let snapshot = folder.join("snapshots").join(&commit);
        if snapshot.is_dir() {
            let Some(file) = &id.file else { return Ok(snapshot) };
            let path = snapshot.join(file);
            if path.exists() {
                return Ok(path);
            }
            return Err(not_cached(id, cache, &path, &format!("in the cache without `{file}`")));
        }
        return Err(not_cached(id, cache, &snapshot, "the revision's snapshot folder is missing"));
    }
    Err(not_cached(id, cache, &looked_for, "not in the cache"))
}

/// `text` as a local path if one exists there, else as a hub id resolved in this
/// process's cache — fetched into it first when it is missing, a [`Downloader`] is
/// registered and `HF_HUB_OFFLINE` is not set; `None` when it is neither (the caller
/// reports the missing path).
pub fn resolve_path(text: &Path, local: &Path) -> Option<Result<PathBuf>> {
    if local.exists() {
        return None;
    }
    let id = HubId::parse(text.to_str()?)?;
    let cache = cache_dir();
    Some(resolve_in(&id, &cache).or_else(|missing| {
        let downloader = inventory::iter::<Downloader>().next();
        match downloader {
            Some(d) if !offline() => match (d.fetch)(&id, &cache) {
                Ok(()) => resolve_in(&id, &cache),
                Err(e) => Err(not_cached(
                    &id,
                    &cache,
                    &id.folder(&cache),
                    &format!("not in the cache, and downloading it ({}) failed: {e}", d.name),
                )),
            },
            _ => Err(missing),
        }
    }))
}

/// Fetches a model that is not in the cache: what the `kiln` crate's `hub` feature
/// registers (`kiln-hub`, through the `hf-hub` crate). A build without one reads the cache
/// only.
pub struct Downloader {
    /// What fetches, for messages (`"hf-hub"`).
    pub name: &'static str,
    /// Puts `id`'s files into `cache` as `huggingface_hub` lays them out (blobs, a snapshot
    /// of links, the ref), so [`resolve_in`] then finds them; or says what failed.
    pub fetch: fn(id: &HubId, cache: &Path) -> std::result::Result<(), String>,
}

inventory::collect!(Downloader);

/// Whether `HF_HUB_OFFLINE` is set (to anything but empty or `0`), as `huggingface_hub`
/// reads it: then kiln makes no network call for a model.
pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0")
}

fn not_cached(id: &HubId, cache: &Path, looked_for: &Path, why: &str) -> Error {
    let revision = if id.revision == "main" { String::new() } else { format!(" --revision {}", id.revision) };
    let downloads = if offline() {
        "HF_HUB_OFFLINE is set, so kiln downloads nothing"
    } else if inventory::iter::<Downloader>().next().is_none() {
        "this build of kiln downloads nothing (no `hub` feature)"
    } else {
        "set HF_HUB_OFFLINE=1 to never try a download"
    };
    Error::model_load(
        looked_for,
        format!(
            "model `{}` (revision `{}`) is {why} (the Hugging Face cache searched: {}, from HF_HUB_CACHE, \
             HF_HOME or ~/.cache/huggingface/hub; {downloads}). Fetch it with `huggingface-cli download \
             {}{revision}` (into that cache), or set model.path to a folder",
            id.repo,
            id.revision,
            cache.display(),
            id.repo,
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_and_paths_do_not() {
        let id = HubId::parse("sentence-transformers/all-MiniLM-L6-v2").unwrap();
        assert_eq!(
            (id.repo.as_str(), id.revision.as_str()),
            ("sentence-transformers/all-MiniLM-L6-v2", "main")
        );
        let id = HubId::parse("Qwen/Qwen2.5-VL-3B-Instruct@v1.0").unwrap();
        assert_eq!((id.repo.as_str(), id.revision.as_str()), ("Qwen/Qwen2.5-VL-3B-Instruct", "v1.0"));
        let id = HubId::parse("org/gguf@abc/q4/model.gguf").unwrap();
        assert_eq!(
            (id.repo.as_str(), id.revision.as_str(), id.file.as_deref()),
            ("org/gguf", "abc", Some("q4/model.gguf"))
        );
        for path in [
            "gpt2",
            "./model",
            "/abs/model",
            "../up/x",
            "a//b",
            "",
            "org/na me",
            "org/x@",
            "org/x@../y",
            "a/b/../c",
        ] {
            assert_eq!(HubId::parse(path), None, "{path:?} is not an id");
        }
    }

    #[test]
    fn the_cache_is_found_as_huggingface_hub_finds_it() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        assert_eq!(cache_dir_from(env(&[("HF_HUB_CACHE", "/c"), ("HF_HOME", "/h")])), PathBuf::from("/c"));
        assert_eq!(cache_dir_from(env(&[("HF_HOME", "/h"), ("HOME", "/u")])), PathBuf::from("/h/hub"));
        assert_eq!(cache_dir_from(env(&[("HOME", "/u")])), PathBuf::from("/u/.cache/huggingface/hub"));
        assert_eq!(cache_dir_from(env(&[("HF_HOME", "~/hf"), ("HOME", "/u")])), PathBuf::from("/u/hf/hub"));
        assert_eq!(
            cache_dir_from(env(&[("XDG_CACHE_HOME", "/x"), ("HOME", "/u")])),
            PathBuf::from("/x/huggingface/hub")
        );
    }

    #[test]
    fn refs_and_commits_name_snapshots_and_a_missing_model_says_how_to_fetch_it() {
        let cache = std::env::temp_dir().join(format!("kiln-hub-test-{}", std::process::id()));
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let folder = cache.join("models--org--name");
        std::fs::create_dir_all(folder.join("snapshots").join(commit)).unwrap();
        std::fs::create_dir_all(folder.join("refs")).unwrap();
        std::fs::write(folder.join("refs/main"), format!("{commit}\n")).unwrap();
        std::fs::write(folder.join("refs/v2"), "ffffffffffffffffffffffffffffffffffffffff").unwrap();
        let snapshot = folder.join("snapshots").join(commit);
        assert_eq!(resolve_in(&HubId::parse("org/name").unwrap(), &cache).unwrap(), snapshot);
        assert_eq!(
            resolve_in(&HubId::parse(&format!("org/name@{commit}")).unwrap(), &cache).unwrap(),
            snapshot
        );
        let err = resolve_in(&HubId::parse("org/other@dev").unwrap(), &cache).unwrap_err().to_string();
        for needle in [
            "org/other",
            "`dev`",
            "models--org--other/refs/dev",
            "huggingface-cli download org/other --revision dev",
        ] {
            assert!(err.contains(needle), "{needle:?} not in: {err}");
        }
        let err = resolve_in(&HubId::parse("org/name@v2").unwrap(), &cache).unwrap_err().to_string();
        assert!(err.contains("snapshot folder is missing"), "{err}");
        std::fs::write(snapshot.join("model.onnx"), b"").unwrap();
        assert_eq!(
            resolve_in(&HubId::parse("org/name/model.onnx").unwrap(), &cache).unwrap(),
            snapshot.join("model.onnx")
        );
        let err = resolve_in(&HubId::parse("org/name/other.onnx").unwrap(), &cache).unwrap_err().to_string();
        assert!(err.contains("without `other.onnx`"), "{err}");
        std::fs::remove_dir_all(&cache).unwrap();
    }
}
