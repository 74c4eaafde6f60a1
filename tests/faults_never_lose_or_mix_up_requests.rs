//! Under injected faults every caller gets exactly its own answer: retryable failures
//! are retried (and only those), deadlines fire and the process keeps serving, and in
//! a batch of tasks one failure does not fail the others.
//!
//! The faults come from `FaultInjectingProvider`, a test double that wraps the real
//! `hashing` provider of examples/custom_provider.rs (cheap enough for 10 000 requests).

#[allow(dead_code)]
#[path = "../examples/custom_provider.rs"]
mod example;

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kiln::runtime::{TaskInput, TaskOutput};
use kiln::{
    Capabilities, Error, Inputs, KilnConfig, Model, ModelInfo, ModelSpec, Optimizer, Outputs, Provider,
    ProviderConfig, Result, Tensor, async_trait,
};
use serde::Deserialize;

/// Test double (fault injection): every `fail_every`-th model run fails with a backend
/// error of the given retryability; the first `slow_runs` runs first sleep `delay_ms`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultOptions {
    #[serde(default)]
    fail_every: u64,
    #[serde(default)]
    retryable: bool,
    #[serde(default)]
    delay_ms: u64,
    #[serde(default)]
    slow_runs: u64,
}

struct FaultInjectingProvider {
    inner: Arc<dyn Provider>,
    options: FaultOptions,
}

struct FaultInjectingModel {
    inner: Arc<dyn Model>,
    runs: AtomicU64,
    options: FaultOptions,
}

#[async_trait]
impl Provider for FaultInjectingProvider {
    fn name(&self) -> &str {
        "fault-injecting"
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn load(&self, spec: &ModelSpec) -> Result<Arc<dyn Model>> {
        let inner = self.inner.load(spec).await?;
        Ok(Arc::new(FaultInjectingModel { inner, runs: AtomicU64::new(0), options: self.options.clone() }))
    }
}

impl Model for FaultInjectingModel {
    fn info(&self) -> &ModelInfo {
        self.inner.info()
    }
    fn run(&self, inputs: &Inputs) -> Result<Outputs> {
        let n = self.runs.fetch_add(1, Ordering::Relaxed) + 1;
        if n <= self.options.slow_runs {
            std::thread::sleep(Duration::from_millis(self.options.delay_ms));
        }
        if self.options.fail_every > 0 && n.is_multiple_of(self.options.fail_every) {
            return Err(Error::Backend {
                provider: "fault-injecting".into(),
                retryable: self.options.retryable,
                source: format!("fault injected into run {n}").into(),
            });
        }
        self.inner.run(inputs)
    }
}

fn build(config: &ProviderConfig) -> Result<Arc<dyn Provider>> {
    let mut hashing = ProviderConfig { name: "hashing".into(), ..Default::default() };
    hashing.options.insert("dim".into(), 32.into());
    Ok(Arc::new(FaultInjectingProvider {
        inner: kiln::build_provider(&hashing)?,
        options: config.options()?,
    }))
}

kiln::register_provider!("fault-injecting", "test double: injects faults into the hashing provider", build);

fn config(faults: &str, extra: &[&str]) -> KilnConfig {
    let mut sets = vec![
        format!("model.path={:?}", support::minilm_dir().display().to_string()),
        "provider.name=fault-injecting".to_string(),
        format!("provider.options={faults}"),
        "cache.enabled=false".to_string(),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    KilnConfig::load(None, &sets).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_requests_with_20_percent_retryable_faults_each_get_their_own_answer() {
    const N: usize = 10_000;
    let texts: Vec<String> =
        (0..N).map(|i| format!("request {i} asks about item {} of {}", i * 7 % 13, i % 97)).collect();
    // The answers without faults, from the same provider.
    let clean = Optimizer::from_config(config("{}", &[])).await.unwrap();
    let expected = clean.embed(&texts).await.unwrap();
    clean.shutdown().await.unwrap();

    let faulty = Arc::new(
        Optimizer::from_config(config(
            "{ fail_every = 5, retryable = true }",
            &["scheduler.retries=3", "scheduler.backoff_ms=1", "batching.max_wait_ms=2"],
        ))
        .await
        .unwrap(),
    );
    let (mut answered, mut wrong, mut failed) = (0, 0, Vec::new());
    for (i, result) in support::embed_each_at_once(&faulty, texts).await.into_iter().enumerate() {
        answered += 1;
        match result {
            Ok(mut v) => {
                assert_eq!(v.len(), 1, "exactly one vector for one text");
                let got = v.remove(0);
                if support::cosine(&got, &expected[i]) < 0.99999 {
                    wrong += 1;
                }
            }
            Err(e) => failed.push(e),
        }
    }
    let stats = faulty.stats();
    assert_eq!(answered, N, "none lost");
    assert_eq!(wrong, 0, "every caller got the answer to its own text");
    // A text fails only if the batch and then its solo rerun fail on all 4 attempts.
    assert!(failed.len() <= 5, "{} of {N} failed after retries: {:?}", failed.len(), failed.first());
    assert!(failed.iter().all(|e| e.is_retryable()), "{failed:?}");
    assert!(stats.retries > 0, "faults were injected and retried: {stats:?}");
    assert_eq!(stats.requests, N as u64);
    eprintln!(
        "10 000 requests: {} retries, {} failed after retries, {} model runs, mean batch {:.1}",
        stats.retries,
        failed.len(),
        stats.batches,
        stats.mean_batch_size
    );
}

#[tokio::test]
async fn non_retryable_faults_are_not_retried() {
    let optimizer =
        Optimizer::from_config(config("{ fail_every = 1, retryable = false }", &["scheduler.retries=3"]))
            .await
            .unwrap();
    let err = optimizer.embed(&["doomed".to_string()]).await.unwrap_err();
    assert!(!err.is_retryable() && err.to_string().contains("fault injected"), "{err}");
    let stats = optimizer.stats();
    assert_eq!(stats.retries, 0);
    assert_eq!(stats.errors.get("backend"), Some(&1));
}

#[tokio::test]
async fn a_deadline_fires_and_the_next_request_is_served() {
    let optimizer = Optimizer::from_config(config(
        "{ delay_ms = 400, slow_runs = 1 }",
        &["scheduler.timeout_ms=100", "batching.max_wait_ms=0"],
    ))
    .await
    .unwrap();
    let err = optimizer.embed(&["slow".to_string()]).await.unwrap_err();
    assert!(matches!(err, Error::Timeout { after_ms: 100, .. }), "{err}");
    // The slow run goes on after its caller gave up; wait (polling, with a deadline)
    // until it has finished, so the next request is not queued behind it.
    support::eventually(Duration::from_secs(10), || {
        (optimizer.stats().batches >= 1)
            .then_some(())
            .ok_or_else(|| "the slow run has not finished".to_string())
    })
    .await;
    assert_eq!(optimizer.embed(&["fast".to_string()]).await.unwrap()[0].len(), 32);
    let stats = optimizer.stats();
    assert_eq!((stats.timeouts, stats.errors.get("timeout")), (1, Some(&1)));
}

#[tokio::test]
async fn a_call_over_the_input_limit_is_refused_and_the_next_is_served() {
    let optimizer = Optimizer::from_config(config("{}", &["scheduler.max_inputs_per_call=3"])).await.unwrap();
    let four: Vec<String> = (0..4).map(|i| format!("text {i}")).collect();
    let err = optimizer.embed(&four).await.unwrap_err();
    assert!(matches!(err, Error::InvalidInput(_)), "{err}");
    assert!(err.to_string().contains("a call of 4 texts is over scheduler.max_inputs_per_call (3)"), "{err}");
    assert_eq!(optimizer.stats().batches, 0, "the refused call ran nothing");
    assert_eq!(optimizer.embed(&four[..3]).await.unwrap().len(), 3);
}

#[tokio::test]
async fn in_run_batch_one_failure_does_not_fail_the_others() {
    let optimizer = Optimizer::from_config(config("{}", &[])).await.unwrap();
    let wrong = Inputs::new().with("pixels", Tensor::from_vec(vec![1, 3], vec![0f32; 3]).unwrap());
    let results = optimizer
        .run_batch(vec![
            TaskInput::Embed(vec!["first".into()]),
            TaskInput::Infer(wrong),
            TaskInput::Embed(vec!["third".into(), "fourth".into()]),
        ])
        .await;
    assert!(matches!(&results[0], Ok(TaskOutput::Embeddings(v)) if v.len() == 1));
    let err = results[1].as_ref().unwrap_err().to_string();
    assert!(err.contains("missing tensor `input_ids`"), "{err}");
    assert!(matches!(&results[2], Ok(TaskOutput::Embeddings(v)) if v.len() == 2));
}
