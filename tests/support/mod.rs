//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// The workspace root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The all-MiniLM-L6-v2 folder `scripts/setup` fills. Tests fail, never skip, without it.
pub fn minilm_dir() -> PathBuf {
    let dir = root().join(kiln::config::DEFAULT_MODEL_DIR);
    assert!(
        dir.join("model.safetensors").is_file(),
        "{} is missing: run `scripts/setup` (the README's test command does)",
        dir.display()
    );
    dir
}

/// SmolLM2-135M-Instruct's GGUF file `scripts/setup generate` fetches; tests fail, never
/// skip, without it.
pub fn smollm_gguf() -> PathBuf {
    let path = root().join(".kiln/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.is_file(),
        "{} is missing: run `scripts/setup generate` (scripts/test does)",
        path.display()
    );
    path
}

/// A generate-task config for SmolLM2 on candle, CPU, with `sets` applied.
pub fn smollm_config(sets: &[&str]) -> kiln::KilnConfig {
    let mut all = vec![
        "task=\"generate\"".to_string(),
        format!("model.path={:?}", smollm_gguf().display().to_string()),
    ];
    all.extend(sets.iter().map(|s| s.to_string()));
    kiln::KilnConfig::load(None, &all).expect("valid test config")
}

/// A config for MiniLM on candle, CPU, with `sets` applied as `--set` flags would be.
pub fn minilm_config(sets: &[&str]) -> kiln::KilnConfig {
    let mut all = vec![format!("model.path={:?}", minilm_dir().display().to_string())];
    all.extend(sets.iter().map(|s| s.to_string()));
    kiln::KilnConfig::load(None, &all).expect("valid test config")
}

/// Cosine similarity.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// Cosine of each vector of `ours` to the reference's, with the worst and the mean.
pub fn cosines_to(ours: &[Vec<f32>], reference: &Reference) -> (Vec<f64>, f64, f64) {
    let cosines: Vec<f64> = ours.iter().zip(&reference.embeddings).map(|(a, b)| cosine(a, b)).collect();
    let worst = cosines.iter().copied().fold(1.0, f64::min);
    let mean = cosines.iter().sum::<f64>() / cosines.len().max(1) as f64;
    (cosines, worst, mean)
}

/// The sentence-transformers reference: texts and their embeddings.
pub struct Reference {
    pub texts: Vec<String>,
    pub embeddings: Vec<Vec<f32>>,
}

pub fn reference() -> Reference {
    let path = root().join("tests/fixtures/minilm_reference.json");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let texts = json["texts"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect();
    let embeddings = serde_json::from_value(json["embeddings"].clone()).unwrap();
    Reference { texts, embeddings }
}

/// A tensor of ones: f32 for `DType::F32`, i64 for anything else.
pub fn ones(dtype: kiln::DType, shape: Vec<usize>) -> kiln::Tensor {
    let n = shape.iter().product::<usize>();
    match dtype {
        kiln::DType::F32 => kiln::Tensor::from_vec(shape, vec![1.0f32; n]).unwrap(),
        _ => kiln::Tensor::from_vec(shape, vec![1i64; n]).unwrap(),
    }
}

/// A BERT request around `ids`: attention mask and token types of ones, its shape.
pub fn bert_inputs(ids: kiln::Tensor) -> kiln::Inputs {
    let shape = ids.shape().to_vec();
    kiln::Inputs::new()
        .with("input_ids", ids)
        .with("attention_mask", ones(kiln::DType::I64, shape.clone()))
        .with("token_type_ids", ones(kiln::DType::I64, shape))
}

/// Polls `check` every 10 ms until it returns `Ok`, for at most `within`; `Err` carries
/// what is still missing, which the failure reports. Tests wait for a condition this
/// way, never for a fixed time.
pub async fn eventually<T>(within: std::time::Duration, mut check: impl FnMut() -> Result<T, String>) -> T {
    let started = std::time::Instant::now();
    loop {
        match check() {
            Ok(value) => return value,
            Err(missing) => {
                assert!(started.elapsed() < within, "still not the case after {within:?}: {missing}")
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Each text embedded by a caller of its own, all at once (one tokio task each, so
/// the callers race into the model's batches): the answers in the texts' order.
pub async fn embed_each_at_once(
    optimizer: &std::sync::Arc<kiln::Optimizer>,
    texts: impl IntoIterator<Item = String>,
) -> Vec<kiln::Result<Vec<Vec<f32>>>> {
    let calls: Vec<_> = texts
        .into_iter()
        .map(|text| {
            let optimizer = optimizer.clone();
            tokio::spawn(async move { optimizer.embed(&[text]).await })
        })
        .collect();
    let mut answers = Vec::with_capacity(calls.len());
    for call in calls {
        answers.push(call.await.expect("no caller task panicked"));
    }
    answers
}

/// Each prompt's greedy tokens generated alone, one after another, then all submitted
/// at once (sharing steps): what batching must not change.
pub async fn alone_and_together(
    g: &kiln::runtime::Generation,
    prompts: &[&str],
) -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
    let ask = |q: &str| kiln::runtime::Prompt::Text(q.to_string());
    let mut alone = Vec::new();
    for p in prompts {
        alone.push(g.generate(ask(p)).await.unwrap().tokens);
    }
    let streams: Vec<_> = prompts.iter().map(|p| g.stream(ask(p)).unwrap()).collect();
    let mut together = Vec::new();
    for s in streams {
        together.push(s.finish().await.unwrap().tokens);
    }
    (alone, together)
}
