//! Memory admission: a model whose estimated memory exceeds what is available is
//! refused before any memory is spent, with both figures in GiB, and the optimizer
//! keeps serving the model it has.

mod support;

use std::path::Path;

use kiln::{DType, Device, Error, ModelSpec, Optimizer};

/// A BERT folder whose safetensors header declares 1 TiB of f32 weights; the file holds
/// no data, since admission reads only headers.
fn huge_model(dir: &Path) {
    std::fs::copy(support::minilm_dir().join("config.json"), dir.join("config.json")).unwrap();
    let header = br#"{"embeddings.word_embeddings.weight":{"dtype":"F32","shape":[1048576,262144],"data_offsets":[0,1099511627776]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
}

#[tokio::test]
async fn a_model_larger_than_available_memory_is_refused_and_serving_goes_on() {
    let optimizer = Optimizer::from_config(support::minilm_config(&[])).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    huge_model(dir.path());

    let err = optimizer.load_model(ModelSpec::new(dir.path(), Device::Cpu, DType::F32)).await.err().unwrap();
    let text = err.to_string();
    assert!(matches!(err, Error::OutOfMemory { .. }), "{text}");
    // 1 TiB of weights + 10% = 1126.40 GiB.
    assert!(text.contains("required 1126.40 GiB, available"), "{text}");
    assert!(text.ends_with("GiB on cpu"), "{text}");

    let v = optimizer.embed(&["still serving".to_string()]).await.unwrap();
    assert_eq!(v[0].len(), 384);
    assert_eq!(optimizer.models().loaded().len(), 1, "the refused model left nothing behind");
}

#[tokio::test]
async fn models_max_bytes_is_a_limit_too() {
    let err =
        Optimizer::from_config(support::minilm_config(&["models.max_bytes=50000000"])).await.err().unwrap();
    let text = err.to_string();
    assert!(text.contains("required 0.09 GiB, available 0.05 GiB on cpu"), "{text}");
}
