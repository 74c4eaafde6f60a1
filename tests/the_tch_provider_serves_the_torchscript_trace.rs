//! The libtorch provider (feature `tch`): the TorchScript trace of all-MiniLM-L6-v2 that
//! `scripts/setup tch` makes with torch 2.11 gives the candle provider's embeddings for
//! every fixture text, at f32 and at reduced precision; requests are checked against
//! signature.json; what it cannot do is refused with the reason, and serving goes on.
//! The same model compiled ahead of time by AOTInductor (`model.pt2`, also made by
//! `scripts/setup tch`) gives sentence-transformers' embeddings too.
#![cfg(feature = "tch")]

mod support;

use kiln::{DType, Error, Inputs, Optimizer, Tensor};
use support::{bert_inputs, cosine, minilm_config, ones, reference, root};

fn traced_dir() -> std::path::PathBuf {
    let dir = root().join(".kiln/models/all-MiniLM-L6-v2-tch");
    assert!(dir.join("model.pt").is_file(), "{} is missing: run `scripts/setup tch`", dir.display());
    dir
}

fn compiled_dir() -> std::path::PathBuf {
    let dir = root().join(".kiln/models/all-MiniLM-L6-v2-aoti");
    assert!(dir.join("model.pt2").is_file(), "{} is missing: run `scripts/setup tch`", dir.display());
    dir
}

fn tch_config(sets: &[&str]) -> kiln::KilnConfig {
    let path = format!("model.path={:?}", traced_dir().display().to_string());
    let mut all = vec!["provider.name=\"tch\"", path.as_str()];
    all.extend(sets);
    minilm_config(&all)
}

/// The lowest cosine between the tch provider at `dtype` and candle at f32, over every
/// fixture text, and the text it was lowest for.
async fn worst_against_candle(dtype: &str) -> (f64, String) {
    let reference = reference();
    let set = format!("model.dtype=\"{dtype}\"");
    let tch = Optimizer::from_config(tch_config(&[&set])).await.unwrap();
    let candle = Optimizer::from_config(minilm_config(&[])).await.unwrap();
    let a = tch.embed(&reference.texts).await.unwrap();
    let b = candle.embed(&reference.texts).await.unwrap();
    tch.shutdown().await.unwrap();
    candle.shutdown().await.unwrap();
    let worst = reference
        .texts
        .iter()
        .zip(a.iter().zip(&b))
        .map(|(text, (x, y))| (cosine(x, y), text.clone()))
        .min_by(|p, q| p.0.total_cmp(&q.0))
        .unwrap();
    println!("tch {dtype} vs candle f32: lowest cosine {:.6} over {} texts", worst.0, reference.texts.len());
    worst
}

#[tokio::test]
async fn every_fixture_text_matches_candle_with_cosine_at_least_0_9999() {
    let reference = reference();
    let tch = Optimizer::from_config(tch_config(&[])).await.unwrap();
    let a = tch.embed(&reference.texts).await.unwrap();
    for ((text, x), r) in reference.texts.iter().zip(&a).zip(&reference.embeddings) {
        let c = cosine(x, r);
        assert!(c >= 0.9999, "tch vs sentence-transformers: cosine {c:.6} for {text:?}");
    }
    let info = tch.model_info();
    assert_eq!(info.provider, "tch");
    let names: Vec<&str> = info.inputs.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["input_ids", "attention_mask", "token_type_ids"]);
    assert_eq!(info.max_sequence_length, Some(512), "read from config.json beside model.pt");
    assert_eq!(info.weight_bytes, Some(22_565_376 * 4), "MiniLM's parameters (no pooler) at f32");
    tch.shutdown().await.unwrap();

    let (worst, text) = worst_against_candle("f32").await;
    assert!(worst >= 0.9999, "tch vs candle at f32: cosine {worst:.6} for {text:?}");
}

#[tokio::test]
async fn the_aoti_package_matches_sentence_transformers_at_every_batch_shape() {
    let reference = reference();
    let path = format!("model.path={:?}", compiled_dir().display().to_string());
    let compiled = Optimizer::from_config(tch_config(&[&path])).await.unwrap();
    let info = compiled.model_info();
    assert_eq!(info.max_batch_size, Some(256), "from signature.json's \"compiled\"");
    // All texts at once (one padded batch), then each alone (batch 1, its own length):
    // the package's shapes are dynamic.
    let together = compiled.embed(&reference.texts).await.unwrap();
    for (i, (text, r)) in reference.texts.iter().zip(&reference.embeddings).enumerate() {
        let c = cosine(&together[i], r);
        assert!(c >= 0.9999, "AOTI package vs sentence-transformers: cosine {c:.6} for {text:?}");
        let alone = compiled.embed(std::slice::from_ref(text)).await.unwrap();
        let c = cosine(&alone[0], &together[i]);
        assert!(c >= 0.99999, "alone vs in a batch: cosine {c:.6} for {text:?}");
    }
    compiled.shutdown().await.unwrap();

    // A package runs only at the precision it was compiled for.
    let e =
        Optimizer::from_config(tch_config(&[&path, "model.dtype=\"f16\""])).await.err().unwrap().to_string();
    assert!(e.contains("compiled for cpu at f32") && e.contains("scripts/export_aoti.py"), "{e}");
}

#[tokio::test]
async fn f16_and_bf16_stay_close_to_f32() {
    let (worst, text) = worst_against_candle("f16").await;
    assert!(worst >= 0.999, "f16 vs candle f32: cosine {worst:.6} for {text:?}");
    let (worst, text) = worst_against_candle("bf16").await;
    assert!(worst >= 0.999, "bf16 vs candle f32: cosine {worst:.6} for {text:?}");
}

#[tokio::test]
async fn a_request_that_does_not_fit_the_signature_names_the_input() {
    let tch = Optimizer::from_config(tch_config(&[])).await.unwrap();
    let ok = tch.infer(bert_inputs(ones(DType::I64, vec![2, 5]))).await.unwrap();
    // Loaded for the embed task, the model pools and normalises inside its run: only
    // [batch, hidden] comes back, each row of unit length.
    let embedding = ok.get("sentence_embedding").unwrap();
    assert_eq!((embedding.shape(), embedding.dtype()), ([2, 384].as_slice(), DType::F32));
    for row in embedding.to_vec::<f32>().unwrap().chunks(384) {
        assert!((row.iter().map(|x| x * x).sum::<f32>().sqrt() - 1.0).abs() < 1e-4);
    }

    let e = tch.infer(bert_inputs(ones(DType::F32, vec![2, 5]))).await.unwrap_err();
    assert!(
        matches!(e, Error::InvalidInput(_))
            && e.to_string().contains("input_ids")
            && e.to_string().contains("i64"),
        "{e}"
    );
    let e = tch.infer(bert_inputs(ones(DType::I64, vec![10]))).await.unwrap_err();
    assert!(e.to_string().contains("input_ids") && e.to_string().contains("[batch, sequence]"), "rank: {e}");
    let e = tch.infer(Inputs::new().with("input_ids", ones(DType::I64, vec![1, 3]))).await.unwrap_err();
    assert!(e.to_string().contains("attention_mask"), "{e}");
    let extra = bert_inputs(ones(DType::I64, vec![1, 3])).with("pixel_values", ones(DType::F32, vec![1, 3]));
    let e = tch.infer(extra).await.unwrap_err();
    assert!(e.to_string().contains("no input `pixel_values`"), "{e}");
    // An id past the vocabulary passes the signature and fails inside libtorch: a
    // backend error for that request, not a crash.
    let ids = Tensor::from_vec(vec![1, 2], vec![101i64, 10_000_000]).unwrap();
    let e = tch.infer(bert_inputs(ids)).await.unwrap_err();
    assert!(e.to_string().contains("tch"), "{e}");
    // And the model still serves.
    assert!(tch.infer(bert_inputs(ones(DType::I64, vec![1, 3]))).await.is_ok());
    tch.shutdown().await.unwrap();
}

#[tokio::test]
async fn what_the_provider_cannot_load_is_refused_with_the_reason() {
    // No signature.json beside the module.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(traced_dir().join("model.pt"), dir.path().join("model.pt")).unwrap();
    for name in ["config.json", "tokenizer.json"] {
        std::fs::copy(traced_dir().join(name), dir.path().join(name)).unwrap();
    }
    let set = format!("model.path={:?}", dir.path().display().to_string());
    let e = Optimizer::from_config(tch_config(&[&set])).await.err().unwrap().to_string();
    assert!(e.contains("signature.json") && e.contains("missing"), "{e}");

    // A file that is not TorchScript.
    std::fs::write(dir.path().join("model.pt"), b"not a zip archive").unwrap();
    std::fs::copy(traced_dir().join("signature.json"), dir.path().join("signature.json")).unwrap();
    let e = Optimizer::from_config(tch_config(&[&set])).await.err().unwrap().to_string();
    assert!(e.contains("model.pt") && e.contains("TorchScript"), "{e}");

    // A GPU on a machine without one (or a CPU-only libtorch) names what is missing.
    let has_gpu = std::path::Path::new("/proc/driver/nvidia/version").exists();
    if !has_gpu {
        let e =
            Optimizer::from_config(tch_config(&["model.device=\"cuda:0\""])).await.err().unwrap().to_string();
        assert!(e.contains("not cuda:0") && e.contains("CUDA: ") && e.contains("libtorch"), "{e}");
    }
    // The provider still loads models afterwards.
    let tch = Optimizer::from_config(tch_config(&[])).await.unwrap();
    assert_eq!(tch.embed(&["still serving".to_string()]).await.unwrap()[0].len(), 384);
    tch.shutdown().await.unwrap();
}
