//! Downloads for models named by Hugging Face id (`model.path =
//! "sentence-transformers/all-MiniLM-L6-v2"`): when kiln-core finds such a model missing
//! from the Hugging Face cache and `HF_HUB_OFFLINE` is not set, this crate's
//! [`Downloader`] fetches it through the `hf-hub` crate into that same cache, laid out as
//! `huggingface_hub` writes it (blobs named by their hash, a snapshot folder of links, the
//! revision's ref), so Python tools and kiln share every download.
//!
//! Which files: the repository's file list (the Hub's model API) without the weight
//! formats kiln does not read — PyTorch pickles, TensorFlow, Flax, ONNX and OpenVINO
//! exports, GGUF quantizations: a repository often holds several of them, each as big
//! as the model. An id naming one file (`ORG/NAME/model.gguf`) fetches that file and the
//! repository's small top-level files (configs, tokenizers, templates).
//!
//! The endpoint is `HF_ENDPOINT` when set (a mirror), else huggingface.co; the token
//! `HF_TOKEN`, else the one `huggingface-cli login` saved. Progress bars show on a
//! terminal.

use std::io::IsTerminal;
use std::path::Path;

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};
use kiln_core::hub::{Downloader, HubId};

kiln_core::__private::inventory::submit! {
    Downloader { name: "hf-hub", fetch }
}

/// Extensions of weight files kiln does not read (or, for GGUF, reads only when named).
const SKIPPED: [&str; 15] = [
    ".bin",
    ".h5",
    ".msgpack",
    ".ot",
    ".pt",
    ".pth",
    ".ckpt",
    ".tflite",
    ".onnx",
    ".onnx_data",
    ".gguf",
    ".xml",
    ".mlmodel",
    ".npz",
    ".pb",
];

/// Extensions of the small files fetched beside a named file.
const SMALL: [&str; 5] = [".json", ".txt", ".model", ".jinja", ".tiktoken"];

/// Whether the repository file `path` is fetched for a model whose id names `file`
/// (or the whole repository when `None`).
pub fn wanted(path: &str, file: Option<&str>) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    if name.starts_with('.') {
        return false;
    }
    match file {
        Some(file) => path == file || (!path.contains('/') && SMALL.iter().any(|e| name.ends_with(e))),
        None => !SKIPPED.iter().any(|e| name.ends_with(e)),
    }
}

/// Fetches `id` into `cache` (see the crate's description), or says what failed.
fn fetch(id: &HubId, cache: &Path) -> Result<(), String> {
    let failed = |what: &str, e: &dyn std::fmt::Display| format!("{what}: {e}");
    let mut builder = ApiBuilder::from_cache(Cache::new(cache.to_path_buf()))
        .with_progress(std::io::stderr().is_terminal())
        .with_retries(2);
    let endpoint = std::env::var("HF_ENDPOINT").ok().filter(|e| !e.trim().is_empty());
    if let Some(endpoint) = &endpoint {
        builder = builder.with_endpoint(endpoint.trim_end_matches('/').to_string());
    }
    if let Some(token) = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()) {
        builder = builder.with_token(Some(token));
    }
    let api = builder.build().map_err(|e| failed("setting up the client", &e))?;
    let repo = api.repo(Repo::with_revision(id.repo.clone(), RepoType::Model, id.revision.clone()));
    let info = repo.info().map_err(|e| failed("reading the repository's file list", &e))?;
    let files: Vec<String> =
        info.siblings.into_iter().map(|s| s.rfilename).filter(|f| wanted(f, id.file.as_deref())).collect();
    if let Some(file) = &id.file
        && !files.contains(file)
    {
        return Err(format!("the repository has no file `{file}`"));
    }
    tracing::info!(
        "downloading {} ({} files, revision {}) from {} into {}",
        id.repo,
        files.len(),
        id.revision,
        endpoint.as_deref().unwrap_or("https://huggingface.co"),
        cache.display()
    );
    for file in &files {
        repo.get(file).map_err(|e| failed(&format!("fetching `{file}`"), &e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::wanted;

    #[test]
    fn a_repository_gives_the_files_kiln_reads() {
        for path in [
            "config.json",
            "model.safetensors",
            "model-00001-of-00002.safetensors",
            "model.safetensors.index.json",
            "tokenizer.json",
            "chat_template.jinja",
            "1_Pooling/config.json",
            "README.md",
        ] {
            assert!(wanted(path, None), "{path} is fetched");
        }
        for path in [
            "pytorch_model.bin",
            "tf_model.h5",
            "flax_model.msgpack",
            "onnx/model.onnx",
            "openvino/openvino_model.xml",
            "openvino/openvino_model.bin",
            "model-q4_0.gguf",
            ".gitattributes",
        ] {
            assert!(!wanted(path, None), "{path} is left out");
        }
        let file = Some("q4/model.Q4_1.gguf");
        assert!(wanted("q4/model.Q4_1.gguf", file));
        assert!(wanted("tokenizer.json", file) && wanted("config.json", file));
        assert!(!wanted("q8/model.Q8_0.gguf", file) && !wanted("model.safetensors", file));
    }
}
