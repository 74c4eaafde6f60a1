//! What kiln adds on top of the model, measured against the model alone in one run.
//!
//! - `embed_32`: `Optimizer::embed` of 32 texts (tokenize, queue, collate, split; cache
//!   off) against `direct_32`: the candle model's `run` (pooling and normalisation
//!   included, as kiln loads it) on the same texts tokenized once beforehand. Target:
//!   kiln within 3% of direct.
//! - `cache_hit`: `Optimizer::embed` of one text that is in the cache. Target: median
//!   ≤ 20 µs.
//! - The profiler's cost (on by default): `embed_32` against `embed_32_unprofiled`
//!   (`profiler.enabled = false`), `cache_hit` against `cache_hit_unprofiled`, and
//!   `span`, one span recorded into a `SamplingProfiler`. Target: ≤ 1% at batch 32.
//!
//! ```text
//! scripts/setup && cargo bench --bench overhead
//! ```
//! Prints the ratio of the medians after the measurements.

use std::path::PathBuf;
use std::sync::Arc;

use criterion::{Criterion, criterion_group};
use kiln::runtime::SamplingProfiler;
use kiln::text::TextPipeline;
use kiln::{DType, Device, KilnConfig, ModelSpec, Optimizer, Profiler, ProfilerConfig, Provider, TextConfig};

fn minilm() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(kiln::config::DEFAULT_MODEL_DIR);
    assert!(dir.join("model.safetensors").is_file(), "{} is missing: run scripts/setup", dir.display());
    dir
}

/// 32 texts of 12 to 40 words, fixed.
fn texts() -> Vec<String> {
    let words =
        ["model", "inference", "batch", "latency", "memory", "cache", "token", "vector", "the", "of", "and"];
    (0..32)
        .map(|i| (0..12 + i).map(|j| words[(i * 7 + j * 3) % words.len()]).collect::<Vec<_>>().join(" "))
        .collect()
}

fn overhead(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = minilm();
    let texts = texts();
    let sets = vec![format!("model.path={:?}", dir.display().to_string()), "cache.enabled=false".to_string()];
    let optimizer = runtime.block_on(Optimizer::from_config(KilnConfig::load(None, &sets).unwrap())).unwrap();
    let unprofiled_sets: Vec<String> =
        sets.iter().cloned().chain(["profiler.enabled=false".to_string()]).collect();
    let unprofiled =
        runtime.block_on(Optimizer::from_config(KilnConfig::load(None, &unprofiled_sets).unwrap())).unwrap();

    let provider = kiln_provider_candle::CandleProvider::default();
    // The model as kiln loads it for embedding: pooling and normalisation in its run.
    let head = kiln::text::embedding_head(&dir, &TextConfig::default()).unwrap();
    let spec = ModelSpec::new(&dir, Device::Cpu, DType::F32).with_head(head);
    let model = runtime.block_on(provider.load(&spec)).unwrap();
    let pipeline = TextPipeline::from_model_dir(&dir, &TextConfig::default(), Some(512)).unwrap();
    let inputs = pipeline.encode(&texts).unwrap().inputs;

    let mut group = c.benchmark_group("overhead");
    group.sample_size(10);
    group.bench_function("direct_32", |b| b.iter(|| model.run(&inputs).unwrap()));
    group.bench_function("embed_32", |b| b.iter(|| runtime.block_on(optimizer.embed(&texts)).unwrap()));
    group.bench_function("embed_32_unprofiled", |b| {
        b.iter(|| runtime.block_on(unprofiled.embed(&texts)).unwrap())
    });
    group.finish();
    let report = optimizer.profiler().report();
    let spans_per_call =
        report.spans.values().map(|s| s.count).sum::<u64>() / report.spans["request"].count.max(1);
    println!("spans recorded per embed_32 call: {spans_per_call}");

    let profiler = SamplingProfiler::start(ProfilerConfig::default());
    let profiler: &dyn Profiler = &*profiler;
    c.bench_function("span", |b| b.iter(|| drop(profiler.span("stage"))));

    let cached = Arc::new(
        runtime
            .block_on(Optimizer::from_config(
                KilnConfig::load(None, &[format!("model.path={:?}", dir.display().to_string())]).unwrap(),
            ))
            .unwrap(),
    );
    let one = vec!["a text that is in the cache".to_string()];
    runtime.block_on(cached.embed(&one)).unwrap();
    c.bench_function("cache_hit", |b| b.iter(|| runtime.block_on(cached.embed(&one)).unwrap()));
    let cached_unprofiled = runtime
        .block_on(Optimizer::from_config(
            KilnConfig::load(
                None,
                &[
                    format!("model.path={:?}", dir.display().to_string()),
                    "profiler.enabled=false".to_string(),
                ],
            )
            .unwrap(),
        ))
        .unwrap();
    runtime.block_on(cached_unprofiled.embed(&one)).unwrap();
    c.bench_function("cache_hit_unprofiled", |b| {
        b.iter(|| runtime.block_on(cached_unprofiled.embed(&one)).unwrap())
    });
}

/// Medians from criterion's own estimates, as ratios.
fn report() {
    let median_ns = |id: &str| -> Option<f64> {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("target/criterion")
            .join(id)
            .join("new/estimates.json");
        let json: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
        json["median"]["point_estimate"].as_f64()
    };
    if let (Some(direct), Some(embed)) = (median_ns("overhead/direct_32"), median_ns("overhead/embed_32")) {
        println!(
            "embed_32 / direct_32 median: {:.4} ({:+.2}% overhead; target <= 3%)",
            embed / direct,
            (embed / direct - 1.0) * 100.0
        );
    }
    if let Some(hit) = median_ns("cache_hit") {
        println!("cache hit median: {:.2} us (target <= 20 us)", hit / 1000.0);
    }
    if let (Some(on), Some(off)) = (median_ns("overhead/embed_32"), median_ns("overhead/embed_32_unprofiled"))
    {
        println!(
            "embed_32 profiled / unprofiled median: {:.4} ({:+.2}%; target <= 1%)",
            on / off,
            (on / off - 1.0) * 100.0
        );
    }
    if let (Some(on), Some(off)) = (median_ns("cache_hit"), median_ns("cache_hit_unprofiled")) {
        println!(
            "cache_hit profiled / unprofiled median: {:.4} ({:+.2}%)",
            on / off,
            (on / off - 1.0) * 100.0
        );
    }
    if let Some(span) = median_ns("span") {
        println!("one span: {span:.1} ns");
    }
}

criterion_group!(benches, overhead);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    report();
}
