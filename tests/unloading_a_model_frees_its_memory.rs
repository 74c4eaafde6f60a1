//! Unloading a model gives its memory back (RSS falls), and `models.max_loaded`
//! unloads the least recently used idle model. Alone in its file, so no other test
//! moves this process's RSS while it measures.

mod support;

use kiln::runtime::process_rss;
use kiln::{DType, Device, ModelSpec, Optimizer};

#[tokio::test]
async fn unloading_frees_memory_and_max_loaded_unloads_the_least_recently_used() {
    let optimizer = Optimizer::from_config(support::minilm_config(&["models.max_loaded=2"])).await.unwrap();
    let copies = tempfile::tempdir().unwrap();
    let copy = |name: &str| {
        let dir = copies.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(support::minilm_dir().join(f), dir.join(f)).unwrap();
        }
        ModelSpec::new(dir, Device::Cpu, DType::F32)
    };

    let before = process_rss();
    let a = optimizer.load_model(copy("a")).await.unwrap();
    let ids = kiln::Inputs::new()
        .with("input_ids", kiln::Tensor::from_vec(vec![1, 2], vec![101i64, 102]).unwrap())
        .with("attention_mask", kiln::Tensor::from_vec(vec![1, 2], vec![1i64, 1]).unwrap())
        .with("token_type_ids", kiln::Tensor::from_vec(vec![1, 2], vec![0i64, 0]).unwrap());
    a.run(ids).await.unwrap();
    let loaded = process_rss();
    let key = optimizer.models().loaded().into_iter().find(|m| m.key.path.ends_with("a")).unwrap().key;
    drop(a);
    assert!(optimizer.models().unload(&key).await, "an idle model unloads");
    let after = process_rss();
    eprintln!("RSS: before {} MiB, loaded {} MiB, unloaded {} MiB", before >> 20, loaded >> 20, after >> 20);
    assert!(loaded > before + (60 << 20), "loading 87 MiB of weights shows in RSS");
    assert!(after + (60 << 20) < loaded, "unloading gives the memory back");

    // max_loaded = 2: the default model (in use by the optimizer) and one more.
    let b = optimizer.load_model(copy("b")).await.unwrap();
    drop(b);
    let _c = optimizer.load_model(copy("c")).await.unwrap();
    let paths: Vec<_> = optimizer.models().loaded().into_iter().map(|m| m.key.path).collect();
    assert_eq!(paths.len(), 2, "{paths:?}");
    assert!(paths.iter().any(|p| p.ends_with("c")) && !paths.iter().any(|p| p.ends_with("b")), "{paths:?}");
    assert_eq!(optimizer.embed(&["the default model stays".to_string()]).await.unwrap()[0].len(), 384);
}
