//! The provider conformance suite (`kiln-conformance`) on every provider this build has,
//! each on MiniLM in its own format: embeddings equal sentence-transformers' (the
//! fixture of `tests/fixtures/minilm_reference.json`), independent of the batch they
//! ran in, bad inputs refused by name, panics contained. A provider that is not built
//! here has no test here; one that is built but not set up fails, naming the set-up.

mod support;

use kiln_conformance::{Fixture, Tolerance, check_embedding_provider};

fn fixture() -> Fixture {
    Fixture::from_json(&support::root().join("tests/fixtures/minilm_reference.json")).unwrap()
}

/// MiniLM on `provider`, from `dir` (relative to the workspace root), with `sets`.
fn config(provider: &str, dir: &str, sets: &[&str]) -> kiln::KilnConfig {
    let dir = support::root().join(dir);
    assert!(dir.is_dir(), "{} is missing: run `scripts/setup {provider}` (scripts/test does)", dir.display());
    let provider = format!("provider.name={provider:?}");
    let path = format!("model.path={:?}", dir.display().to_string());
    let mut all = vec![provider.as_str(), path.as_str(), "scheduler.timeout_ms=600000"];
    all.extend(sets);
    support::minilm_config(&all)
}

#[cfg(feature = "candle")]
#[tokio::test]
async fn candle_passes() {
    let config = config("candle", kiln::config::DEFAULT_MODEL_DIR, &[]);
    check_embedding_provider(config, Some(&fixture()), Tolerance::F32).await;
}

#[cfg(feature = "candle")]
#[tokio::test]
async fn candle_int8_passes() {
    // int8 weights: within 0.99 of the reference (docs/benchmarks.md), the same result
    // in any batch.
    let config = config("candle", kiln::config::DEFAULT_MODEL_DIR, &["model.quantization=\"int8\""]);
    let tolerance = Tolerance { reference: 0.99, across_batches: 0.9999 };
    check_embedding_provider(config, Some(&fixture()), tolerance).await;
}

#[cfg(feature = "ort")]
#[tokio::test]
async fn ort_passes() {
    assert!(
        std::env::var_os("ORT_DYLIB_PATH").is_some(),
        "ORT_DYLIB_PATH is not set: run `scripts/setup ort` and `. .kiln/env` (scripts/test does)"
    );
    let config = config("ort", ".kiln/models/all-MiniLM-L6-v2-onnx", &[]);
    check_embedding_provider(config, Some(&fixture()), Tolerance::F32).await;
}

#[cfg(feature = "tch")]
#[tokio::test]
async fn tch_passes() {
    let config = config("tch", ".kiln/models/all-MiniLM-L6-v2-tch", &[]);
    check_embedding_provider(config, Some(&fixture()), Tolerance::F32).await;
}

#[cfg(feature = "mlx")]
#[tokio::test]
async fn mlx_passes() {
    let config = config("mlx", kiln::config::DEFAULT_MODEL_DIR, &[]);
    check_embedding_provider(config, Some(&fixture()), Tolerance::F32).await;
}
