//! The MLX provider (feature `mlx`): all-MiniLM-L6-v2 from the same folder the candle
//! provider reads, on MLX's CPU, gives sentence-transformers' embeddings for every
//! fixture text at f32; f16, bf16 and 8-bit weights stay close; 4-bit loads and is
//! measured; what it cannot do is refused with the reason, and serving goes on.
#![cfg(feature = "mlx")]

mod support;

use kiln::{Error, Optimizer};
use support::{cosine, embed_each_at_once, minilm_config, reference};

fn mlx_config(sets: &[&str]) -> kiln::KilnConfig {
    let mut all = vec!["provider.name=\"mlx\"", "scheduler.timeout_ms=600000"];
    all.extend(sets);
    minilm_config(&all)
}

/// The lowest cosine to sentence-transformers over the fixture texts, and its text.
async fn worst(sets: &[&str]) -> (f64, String) {
    let reference = reference();
    let optimizer = Optimizer::from_config(mlx_config(sets)).await.unwrap();
    let started = std::time::Instant::now();
    let ours = optimizer.embed(&reference.texts).await.unwrap();
    println!("mlx {sets:?}: {:.2} s", started.elapsed().as_secs_f64());
    optimizer.shutdown().await.unwrap();
    let worst = reference
        .texts
        .iter()
        .zip(ours.iter().zip(&reference.embeddings))
        .map(|(text, (a, b))| (cosine(a, b), text.clone()))
        .min_by(|p, q| p.0.total_cmp(&q.0))
        .unwrap();
    println!("mlx {sets:?}: lowest cosine {:.6} over {} texts", worst.0, reference.texts.len());
    worst
}

#[tokio::test]
async fn every_fixture_text_matches_sentence_transformers_at_f32() {
    let (c, text) = worst(&[]).await;
    assert!(c >= 0.9999, "cosine {c:.6} for {text:?}");
    let optimizer = Optimizer::from_config(mlx_config(&[])).await.unwrap();
    let info = optimizer.model_info();
    assert_eq!(info.provider, "mlx");
    // MiniLM's parameters (pooler included) at f32 and its i64 position_ids buffer.
    assert_eq!(info.weight_bytes, Some(22_713_216 * 4 + 512 * 8), "read from the safetensors headers");
    assert_eq!(info.outputs[0].name, kiln::SENTENCE_EMBEDDING, "pooled on MLX's device");
    let one = optimizer.embed(&["alone in its batch".to_string()]).await.unwrap();
    let norm = one[0].iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-4, "normalised: {norm}");
    optimizer.shutdown().await.unwrap();
}

#[tokio::test]
async fn batches_queued_on_the_device_give_the_embeddings_of_batches_waited_for() {
    // The default queues each batch (MLX's async_eval) and waits on the responder thread;
    // `overlap_batches = false` waits on the model thread. Concurrent callers, small
    // batches, so several are queued at once: every caller gets its own text's embedding.
    let reference = reference();
    for overlap in ["true", "false"] {
        let set = format!("provider.options.overlap_batches={overlap}");
        let config = mlx_config(&[&set, "batching.max_batch_size=4", "cache.enabled=false"]);
        let optimizer = std::sync::Arc::new(Optimizer::from_config(config).await.unwrap());
        let texts =
            (0..3 * reference.texts.len()).map(|i| reference.texts[i % reference.texts.len()].clone());
        for (i, result) in embed_each_at_once(&optimizer, texts).await.into_iter().enumerate() {
            let got = result.unwrap().remove(0);
            let want = &reference.embeddings[i % reference.texts.len()];
            let c = cosine(&got, want);
            assert!(c >= 0.9999, "{set}: caller {i}: cosine {c:.6}");
        }
        assert!(optimizer.stats().batches >= 2, "{set}: {:?}", optimizer.stats());
        std::sync::Arc::into_inner(optimizer).unwrap().shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn reduced_precision_and_quantized_weights_stay_close() {
    // One text a batch, so each runs at its own length: MLX's CPU backend has no fast
    // f16 or quantized products on x86, and a padded batch costs minutes here.
    for (set, min) in [
        ("model.quantization=\"int8\"", 0.99),
        ("model.dtype=\"f16\"", 0.999),
        ("model.dtype=\"bf16\"", 0.995),
        // 4-bit MiniLM is coarse (0.90 measured with groups of 64); the bound says it
        // still points the same way.
        ("model.quantization=\"int4\"", 0.85),
    ] {
        let (c, text) = worst(&[set, "batching.max_batch_size=1"]).await;
        assert!(c >= min, "{set}: cosine {c:.6} for {text:?} (wanted ≥ {min})");
    }
}

#[tokio::test]
async fn what_mlx_cannot_do_is_refused_with_the_reason() {
    let err = Optimizer::from_config(mlx_config(&["model.device=\"metal:0\""])).await.err().unwrap();
    assert!(matches!(err, Error::Unsupported(_)), "{err}");
    assert!(err.to_string().contains("metal:0"), "{err}");
    let err = Optimizer::from_config(mlx_config(&["provider.options.group_size=48"])).await.err().unwrap();
    assert!(err.to_string().contains("32, 64 or 128"), "{err}");
    // A GPU this libmlx does not have: refused before loading.
    let err = Optimizer::from_config(mlx_config(&["model.device=\"cuda:7\""])).await.err().unwrap();
    assert!(err.to_string().contains("cuda:7"), "{err}");
}

#[tokio::test]
async fn mlx_allocator_figures_reach_the_governor_and_the_profiler_and_its_cache_is_released_under_pressure()
{
    // Watermarks under any real machine's usage: every sample is pressure.
    let optimizer = Optimizer::from_config(mlx_config(&[
        "profiler.enabled=true",
        "memory.high_watermark=0.001",
        "memory.low_watermark=0.0005",
        "memory.sample_interval_ms=20",
    ]))
    .await
    .unwrap();
    let texts: Vec<String> = reference().texts;
    optimizer.embed(&texts).await.unwrap();
    let memory = support::eventually(std::time::Duration::from_secs(10), || {
        let memory = optimizer.stats().memory.expect("the governor runs by default");
        if memory.allocator_active_bytes > 0 && memory.allocator_released_bytes > 0 {
            Ok(memory)
        } else {
            Err(format!("MLX's allocator not seen or nothing released: {memory:?}"))
        }
    })
    .await;
    // MiniLM's weights stay live at f32 (~91 MB); the batch's buffers were cached, then released.
    assert!(memory.allocator_active_bytes > 80 << 20, "{memory:?}");
    assert!(memory.allocator_peak_bytes >= memory.allocator_active_bytes, "{memory:?}");
    // The provider's own view agrees: after a release, nothing is cached. MLX's allocator is
    // the process's, and this file's other tests run on it at the same time and may cache
    // again between the release and the read, so release and read until a read follows a
    // release with nothing in between.
    let provider =
        kiln::build_provider(&kiln::ProviderConfig { name: "mlx".into(), ..Default::default() }).unwrap();
    support::eventually(std::time::Duration::from_secs(30), || {
        provider.release_cached_memory();
        match provider.allocator_memory().unwrap().cached {
            0 => Ok(()),
            cached => Err(format!("{cached} bytes still cached right after a release")),
        }
    })
    .await;
    assert_eq!(optimizer.embed(&["still serving".to_string()]).await.unwrap()[0].len(), 384);
    // The profiler's report carries the same allocator, by name, in JSON and Markdown.
    let report = optimizer.reports().report().expect("profiler on");
    let allocator = report.allocator.clone().expect("MLX keeps an allocator of its own");
    assert_eq!(allocator.provider, "mlx");
    assert!(
        allocator.peak_bytes >= allocator.active_bytes && allocator.active_bytes > 80 << 20,
        "{allocator:?}"
    );
    assert!(allocator.released_bytes >= memory.allocator_released_bytes, "{allocator:?} {memory:?}");
    assert!(report.to_markdown().contains("mlx allocator: peak"), "{}", report.to_markdown());
}
