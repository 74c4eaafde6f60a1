//! The provider conformance suite: one set of checks every kiln provider passes — what
//! a fifth provider's author runs first.
//!
//! # Design
//!
//! kiln's providers differ in everything but what the runtime relies on, so the
//! runtime's reliance is written down once, here, and each provider's tests call it
//! with that provider's config (burn's backend-tests idea). Every check goes through the
//! runtime as a user's request does — [`Parts`] for the set-up, a [`ModelWorker`] or an
//! [`Optimizer`] around the model — because that is where a provider's mistakes show:
//!
//! 1. [`fixture_agreement`]: the embeddings equal a reference (sentence-transformers')
//!    within a stated cosine.
//! 2. [`batch_composition_independence`]: a text's embedding does not depend on the
//!    batch it ran in — alone, with all the others, or in reverse order.
//! 3. [`bad_inputs_are_refused_by_name`]: the model declares its inputs; a request
//!    missing one, of the wrong dtype or rank, or with one it does not take is refused
//!    by the worker with an error naming that input; ids beyond any vocabulary fail (or
//!    not) without taking the worker down.
//! 4. [`panics_are_contained`]: a batch that panics after the provider started it
//!    fails only that batch's own request — the items of a shared batch are run again
//!    alone and answered — and the model answers as before afterwards.
//!
//! [`check_embedding_provider`] runs them all. A check panics, as a test assertion
//! does, with a message naming the check and what it saw.
//!
//! ```no_run
//! # async fn demo() {
//! // In your provider's tests, with the config that loads its embedding model:
//! let config = kiln_core::KilnConfig::load(Some("examples/embed.toml".as_ref()), &[]).unwrap();
//! kiln_conformance::check_embedding_provider(config, None, kiln_conformance::Tolerance::F32).await;
//! # }
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use kiln_core::{
    Capabilities, DType, Dim, Inputs, KilnConfig, Model, ModelInfo, ModelSpec, Outputs, Pending, Provider,
    Result, Tensor, async_trait,
};
use kiln_runtime::{BatchPolicy, ModelWorker, Optimizer, Parts};

/// Texts and the embeddings a reference implementation gives them.
#[derive(Debug, Clone)]
pub struct Fixture {
    /// The texts.
    pub texts: Vec<String>,
    /// One reference vector per text.
    pub embeddings: Vec<Vec<f32>>,
}

impl Fixture {
    /// A fixture from a JSON file `{"texts": [...], "embeddings": [[...], ...]}` (the
    /// shape of `tests/fixtures/minilm_reference.json`).
    pub fn from_json(path: &std::path::Path) -> std::result::Result<Self, String> {
        let text = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        let json: serde_json::Value =
            serde_json::from_slice(&text).map_err(|e| format!("parsing {}: {e}", path.display()))?;
        let texts = serde_json::from_value(json["texts"].clone())
            .map_err(|e| format!("{}: `texts`: {e}", path.display()))?;
        let embeddings = serde_json::from_value(json["embeddings"].clone())
            .map_err(|e| format!("{}: `embeddings`: {e}", path.display()))?;
        Ok(Fixture { texts, embeddings })
    }
}

/// How close results must be, as the cosine of two vectors.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerance {
    /// Against the fixture's reference.
    pub reference: f64,
    /// The same input in two different batches.
    pub across_batches: f64,
}

impl Tolerance {
    /// f32 on both sides: differences only from summation order.
    pub const F32: Tolerance = Tolerance { reference: 0.9999, across_batches: 0.99999 };
    /// f16 or bf16, or quantized weights.
    pub const HALF: Tolerance = Tolerance { reference: 0.999, across_batches: 0.9995 };
}

/// Every check of the suite on the embedding model `config` names (`task = "embed"`);
/// [`fixture_agreement`] only with a fixture.
pub async fn check_embedding_provider(config: KilnConfig, fixture: Option<&Fixture>, tolerance: Tolerance) {
    let mut config = config;
    // Results computed, never served from the cache: a cached answer hides a batch's.
    config.cache.enabled = false;
    let optimizer = Optimizer::from_config(config.clone())
        .await
        .unwrap_or_else(|e| panic!("conformance: the optimizer does not load the model: {e}"));
    if let Some(fixture) = fixture {
        fixture_agreement(&optimizer, fixture, tolerance).await;
    }
    let texts: Vec<String> = match fixture {
        Some(f) => f.texts.clone(),
        None => (0..12).map(|i| format!("text number {i} {}", "and more words ".repeat(i))).collect(),
    };
    batch_composition_independence(&optimizer, &texts, tolerance).await;
    optimizer.shutdown().await.unwrap_or_else(|e| panic!("conformance: shutting the optimizer down: {e}"));
    bad_inputs_are_refused_by_name(config.clone()).await;
    panics_are_contained(config, tolerance).await;
}

/// Check 1: every fixture text's embedding is within `tolerance.reference` of the
/// reference's.
pub async fn fixture_agreement(optimizer: &Optimizer, fixture: &Fixture, tolerance: Tolerance) {
    let ours = optimizer
        .embed(&fixture.texts)
        .await
        .unwrap_or_else(|e| panic!("conformance, fixture agreement: embedding the fixture: {e}"));
    assert_eq!(ours.len(), fixture.texts.len(), "conformance, fixture agreement: one vector per text");
    for ((text, a), b) in fixture.texts.iter().zip(&ours).zip(&fixture.embeddings) {
        assert_eq!(a.len(), b.len(), "conformance, fixture agreement: dimensions for {text:?}");
        let c = cosine(a, b);
        assert!(
            c >= tolerance.reference,
            "conformance, fixture agreement: cosine {c:.6} < {} for {text:?}",
            tolerance.reference
        );
    }
}

/// Check 2: each text's embedding alone, among all `texts`, and among them in reverse
/// order agree within `tolerance.across_batches`. The optimizer must not cache.
pub async fn batch_composition_independence(optimizer: &Optimizer, texts: &[String], tolerance: Tolerance) {
    let embed = |texts: Vec<String>| async move {
        optimizer.embed(&texts).await.unwrap_or_else(|e| {
            panic!("conformance, batch composition: embedding {} texts: {e}", texts.len())
        })
    };
    let mut alone = Vec::with_capacity(texts.len());
    for text in texts {
        alone.extend(embed(vec![text.clone()]).await);
    }
    let together = embed(texts.to_vec()).await;
    let mut reversed = embed(texts.iter().rev().cloned().collect()).await;
    reversed.reverse();
    for (i, text) in texts.iter().enumerate() {
        for (how, other) in [("with all the others", &together[i]), ("in reverse order", &reversed[i])] {
            let c = cosine(&alone[i], other);
            assert!(
                c >= tolerance.across_batches,
                "conformance, batch composition: {text:?} alone and {how} differ (cosine {c:.7} < {})",
                tolerance.across_batches
            );
        }
    }
}

/// Check 3: the worker refuses requests the model's declared inputs do not allow, with
/// an error naming the input, and keeps serving.
pub async fn bad_inputs_are_refused_by_name(config: KilnConfig) {
    let parts = Parts::from_config(config).unwrap_or_else(|e| panic!("conformance, bad inputs: set-up: {e}"));
    let worker = ModelWorker::start(parts.provider.clone(), parts.spec(), BatchPolicy::default())
        .await
        .unwrap_or_else(|e| panic!("conformance, bad inputs: loading: {e}"));
    let info = worker.info().clone();
    assert!(
        !info.inputs.is_empty(),
        "conformance, bad inputs: model `{}` declares no inputs (ModelInfo::inputs), so kiln cannot check a request",
        info.name
    );
    let good = example_inputs(&info, 2, 5);
    worker
        .run(good.clone())
        .await
        .unwrap_or_else(|e| panic!("conformance, bad inputs: a good request failed: {e}"));
    let first = &info.inputs[0];
    let name = first.name.as_str();
    let mut missing = good.clone();
    missing.remove(name);
    let mut wrong_dtype = good.clone();
    let shape = good.require(name).expect("built from the spec").shape().to_vec();
    let other = if first.dtype == DType::F32 { DType::I64 } else { DType::F32 };
    wrong_dtype.insert(name, zeros(other, shape.clone()));
    let mut wrong_rank = good.clone();
    wrong_rank.insert(name, zeros(first.dtype, shape.iter().copied().chain([1]).collect()));
    let mut unknown = good.clone();
    unknown.insert("not_an_input_of_this_model", zeros(DType::I64, vec![2, 5]));
    for (what, inputs, named) in [
        ("missing", missing, name),
        ("of the wrong dtype", wrong_dtype, name),
        ("of the wrong rank", wrong_rank, name),
        ("not declared", unknown, "not_an_input_of_this_model"),
    ] {
        match worker.run(inputs).await {
            Ok(_) => panic!("conformance, bad inputs: a request with input `{named}` {what} was run"),
            Err(e) => assert!(
                e.to_string().contains(named),
                "conformance, bad inputs: the error for input `{named}` {what} does not name it: {e}"
            ),
        }
    }
    // Integer ids no vocabulary has: an error or an answer, never a dead worker.
    if info.inputs.iter().any(|s| s.dtype == DType::I64) {
        let mut huge = good.clone();
        for spec in info.inputs.iter().filter(|s| s.dtype == DType::I64) {
            let shape = good.require(&spec.name).expect("built from the spec").shape().to_vec();
            let n = shape.iter().product();
            huge.insert(
                &spec.name,
                Tensor::from_vec(shape, vec![i64::MAX / 2; n]).expect("sized to its shape"),
            );
        }
        let _ = worker.run(huge).await;
    }
    worker
        .run(good)
        .await
        .unwrap_or_else(|e| panic!("conformance, bad inputs: a good request after the bad ones failed: {e}"));
    worker.shutdown().await;
}

/// Check 4: a batch that panics after the provider started it (fault injection: a
/// wrapper around the real model) fails only its own request, and the model answers
/// as before afterwards.
pub async fn panics_are_contained(config: KilnConfig, tolerance: Tolerance) {
    let parts = Parts::from_config(config).unwrap_or_else(|e| panic!("conformance, panics: set-up: {e}"));
    let armed = Arc::new(AtomicUsize::new(0));
    let provider = Arc::new(PanicAfterStart { inner: parts.provider.clone(), armed: armed.clone() });
    let policy = BatchPolicy { max_wait: std::time::Duration::from_millis(20), ..BatchPolicy::default() };
    let worker = Arc::new(
        ModelWorker::start(provider, parts.spec(), policy)
            .await
            .unwrap_or_else(|e| panic!("conformance, panics: loading: {e}")),
    );
    let info = worker.info().clone();
    let items: Vec<(Inputs, usize)> = (0..6).map(|i| (example_inputs(&info, 1, 3 + i), 3 + i)).collect();
    let submit = |(inputs, length): (Inputs, usize)| {
        let worker = worker.clone();
        async move { worker.submit(inputs, length).await.map(|out| flatten(&out.outputs)) }
    };
    let mut clean = Vec::new();
    for item in items.clone() {
        clean.push(
            submit(item).await.unwrap_or_else(|e| panic!("conformance, panics: a clean item failed: {e}")),
        );
    }
    // One panic in a shared batch: its items run again alone, and all are answered.
    armed.store(1, Ordering::SeqCst);
    let shared = futures_util::future::join_all(items.iter().cloned().map(submit)).await;
    for (i, (result, expected)) in shared.into_iter().zip(&clean).enumerate() {
        let got = result.unwrap_or_else(|e| {
            panic!("conformance, panics: item {i} of a shared batch that panicked was not answered: {e}")
        });
        let c = cosine(&got, expected);
        assert!(
            c >= tolerance.across_batches,
            "conformance, panics: item {i} changed after a panic (cosine {c:.7})"
        );
    }
    // One panic on a lone item: that item's own error, naming the panic.
    armed.store(1, Ordering::SeqCst);
    match submit(items[0].clone()).await {
        Ok(_) => panic!("conformance, panics: the fault was not injected (the wrapper did not run)"),
        Err(e) => {
            assert!(e.to_string().contains("panicked"), "conformance, panics: the error does not say so: {e}")
        }
    }
    let again = submit(items[0].clone())
        .await
        .unwrap_or_else(|e| panic!("conformance, panics: the model does not answer after a panic: {e}"));
    let c = cosine(&again, &clean[0]);
    assert!(
        c >= tolerance.across_batches,
        "conformance, panics: answers changed after a panic (cosine {c:.7})"
    );
    if let Ok(worker) = Arc::try_unwrap(worker) {
        worker.shutdown().await;
    }
}

/// Inputs of every declared tensor: batch `rows`, sequence `length` for dynamic dims,
/// small integer ids (valid in any vocabulary of 100 tokens or more), ones for a mask.
fn example_inputs(info: &ModelInfo, rows: usize, length: usize) -> Inputs {
    let mut inputs = Inputs::new();
    for spec in &info.inputs {
        let shape: Vec<usize> = spec
            .shape
            .iter()
            .enumerate()
            .map(|(i, d)| match (i, d) {
                (_, Dim::Fixed(n)) => *n,
                (0, Dim::Dynamic(_)) => rows,
                (_, Dim::Dynamic(_)) => length,
            })
            .collect();
        let n: usize = shape.iter().product();
        let tensor = match spec.dtype {
            DType::I64 if spec.name.contains("mask") => Tensor::from_vec(shape, vec![1i64; n]),
            DType::I64 if spec.name.contains("type") => Tensor::from_vec(shape, vec![0i64; n]),
            DType::I64 => Tensor::from_vec(shape, (0..n).map(|k| 1 + (k * 7 % 97) as i64).collect()),
            DType::F32 => Tensor::from_vec(shape, (0..n).map(|k| (k % 13) as f32 / 13.0).collect()),
            other => Ok(zeros(other, shape)),
        };
        inputs.insert(&spec.name, tensor.expect("sized to its shape"));
    }
    inputs
}

fn zeros(dtype: DType, shape: Vec<usize>) -> Tensor {
    let bytes = shape.iter().product::<usize>() * dtype.size();
    Tensor::from_bytes(dtype, shape, vec![0; bytes]).expect("sized to its shape")
}

/// Every float output, one after another in name order.
fn flatten(outputs: &Outputs) -> Vec<f32> {
    outputs
        .iter()
        .filter(|(_, t)| t.dtype().is_float())
        .flat_map(|(_, t)| t.to_f32_vec().unwrap_or_default())
        .collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    if a.len() != b.len() || na == 0.0 || nb == 0.0 {
        return if a == b { 1.0 } else { 0.0 };
    }
    dot / (na * nb)
}

/// Fault injection: the real provider, whose models panic once the batch's work is
/// started while `armed` counts down.
struct PanicAfterStart {
    inner: Arc<dyn Provider>,
    armed: Arc<AtomicUsize>,
}

struct PanickingModel {
    inner: Arc<dyn Model>,
    armed: Arc<AtomicUsize>,
}

impl PanickingModel {
    fn disarm_once(&self) -> bool {
        self.armed.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
    }
}

impl Model for PanickingModel {
    fn info(&self) -> &ModelInfo {
        self.inner.info()
    }
    fn run(&self, inputs: &Inputs) -> Result<Outputs> {
        let outputs = self.inner.run(inputs);
        assert!(!self.disarm_once(), "fault injected: panic after the run");
        outputs
    }
    fn start(&self, inputs: &Inputs) -> Result<Pending> {
        let pending = self.inner.start(inputs)?;
        // The started work is dropped unwaited, as a real panic mid-batch would leave it.
        assert!(!self.disarm_once(), "fault injected: panic after the batch was started");
        Ok(pending)
    }
}

#[async_trait]
impl Provider for PanicAfterStart {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn load(&self, spec: &ModelSpec) -> Result<Arc<dyn Model>> {
        let inner = self.inner.load(spec).await?;
        Ok(Arc::new(PanickingModel { inner, armed: self.armed.clone() }))
    }
}
