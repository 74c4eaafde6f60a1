//! The [`Optimizer`]: builds the stack a config names and serves requests through it.

use std::sync::Arc;
use std::time::Instant;

use kiln_core::{
    Cache, Error, Inputs, KilnConfig, Metrics, ModelInfo, ModelSpec, NoCache, NoopProfiler, Outputs,
    Profiler, Provider, Result, Task, Tracker, build_provider, build_trackers,
};
use kiln_text::{Encoded, TextPipeline};
use tokio::sync::Mutex;

use crate::stats::{Counters, Stage, Stats};
use crate::worker::ModelWorker;

/// Name of the token-vector output text models are expected to produce.
pub const LAST_HIDDEN_STATE: &str = "last_hidden_state";

/// kiln's entry point: a provider, a loaded model on its worker, the text pipeline,
/// cache, profiler and trackers, composed from a [`KilnConfig`].
///
/// ```no_run
/// # async fn demo() -> kiln_core::Result<()> {
/// use kiln_core::KilnConfig;
/// use kiln_runtime::Optimizer;
///
/// let config = KilnConfig::load(Some("examples/embed.toml".as_ref()), &[])?;
/// let optimizer = Optimizer::from_config(config).await?;
/// let vectors = optimizer.embed(&["hello".to_string()]).await?;
/// assert_eq!(vectors[0].len(), 384);
/// optimizer.shutdown().await?;
/// # Ok(()) }
/// ```
pub struct Optimizer {
    config: KilnConfig,
    provider: Arc<dyn Provider>,
    worker: ModelWorker,
    text: Option<Arc<TextPipeline>>,
    cache: Arc<dyn Cache>,
    profiler: Arc<dyn Profiler>,
    trackers: Mutex<Vec<Box<dyn Tracker>>>,
    counters: Counters,
    started: Instant,
    load_time: std::time::Duration,
}

impl Optimizer {
    /// Builds the provider the config names, loads the model on its own thread, and
    /// prepares the pipeline of the config's task.
    pub async fn from_config(config: KilnConfig) -> Result<Self> {
        config.validate()?;
        let started = Instant::now();
        let provider = build_provider(&config.provider)?;
        let mut trackers = build_trackers(&config.trackers)?;
        let spec = ModelSpec::new(&config.model.path, config.model.device, config.model.dtype);
        let profiler: Arc<dyn Profiler> = Arc::new(NoopProfiler);
        let worker = {
            let _span = profiler.span("load_model");
            ModelWorker::start(provider.clone(), spec).await?
        };
        let load_time = started.elapsed();
        let text = match config.task {
            Task::Embed => Some(Arc::new(TextPipeline::from_model_dir(
                &config.model.path,
                &config.text,
                worker.info().max_sequence_length,
            )?)),
        };
        let config_json = serde_json::to_value(&config).unwrap_or_default();
        // A tracker never fails a run: its error is a warning.
        if let Err(e) = trackers.log_config(&config_json) {
            tracing::warn!("tracker failed to log the config: {e}");
        }
        Ok(Optimizer {
            config,
            provider,
            worker,
            text,
            cache: Arc::new(NoCache::default()),
            profiler,
            trackers: Mutex::new(trackers),
            counters: Counters::default(),
            started,
            load_time,
        })
    }

    /// The config in force.
    pub fn config(&self) -> &KilnConfig {
        &self.config
    }

    /// The provider serving the model.
    pub fn provider(&self) -> &Arc<dyn Provider> {
        &self.provider
    }

    /// The loaded model's description.
    pub fn model_info(&self) -> &ModelInfo {
        self.worker.info()
    }

    /// The profiler; `optimizer.profiler().span("my_stage")` times your own code too.
    pub fn profiler(&self) -> &dyn Profiler {
        &*self.profiler
    }

    /// Embeds texts: one vector per text, in order. An empty text is embedded (as
    /// sentence-transformers does), not dropped. Texts longer than the model's maximum
    /// are truncated to it.
    pub async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        Counters::add(&self.counters.requests, 1);
        let result = self.embed_inner(texts).await;
        match &result {
            Ok(_) => Counters::add(&self.counters.texts, texts.len() as u64),
            Err(e) => self.counters.error(e),
        }
        result
    }

    async fn embed_inner(&self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        let text = self.text.as_ref().ok_or_else(|| {
            Error::Unsupported(format!(
                "embed needs task = \"embed\"; this optimizer runs {:?}",
                self.config.task
            ))
        })?;
        // Batch texts of similar length together, longest first (as sentence-transformers
        // does), so short texts are not padded to a long neighbour's length; answers go
        // back to input order.
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(texts[i].len()));
        let mut out = vec![Vec::new(); texts.len()];
        for indices in order.chunks(self.config.batching.max_batch_size) {
            let chunk: Vec<String> = indices.iter().map(|&i| texts[i].clone()).collect();
            let encoded = self.tokenize(text, chunk).await?;
            let inputs = self.model_inputs(&encoded.inputs);
            let run = self.run_model(inputs).await?;
            let pipeline = text.clone();
            let started = Instant::now();
            let vectors = tokio::task::spawn_blocking(move || embeddings(&pipeline, &run, &encoded))
                .await
                .map_err(|e| Error::Shutdown(format!("pooling task failed: {e}")))??;
            self.timed(Stage::Pooling, "pool", started);
            for (&i, vector) in indices.iter().zip(vectors) {
                out[i] = vector;
            }
        }
        Ok(out)
    }

    /// Runs raw tensors through the model, validated against what it expects.
    pub async fn infer(&self, inputs: Inputs) -> Result<Outputs> {
        Counters::add(&self.counters.requests, 1);
        let result = async {
            self.model_info().validate(&inputs)?;
            self.run_model(inputs).await
        }
        .await;
        if let Err(e) = &result {
            self.counters.error(e);
        }
        result
    }

    async fn tokenize(&self, text: &Arc<TextPipeline>, chunk: Vec<String>) -> Result<Encoded> {
        let started = Instant::now();
        let pipeline = text.clone();
        let encoded = tokio::task::spawn_blocking(move || pipeline.encode(&chunk))
            .await
            .map_err(|e| Error::Shutdown(format!("tokenization task failed: {e}")))??;
        self.timed(Stage::Tokenize, "tokenize", started);
        Ok(encoded)
    }

    /// The pipeline's tensors the model declares (some exports take no token_type_ids).
    fn model_inputs(&self, all: &Inputs) -> Inputs {
        let declared = &self.model_info().inputs;
        if declared.is_empty() {
            return all.clone();
        }
        let mut inputs = Inputs::new();
        for (name, tensor) in all.iter() {
            if declared.iter().any(|s| s.name == name) {
                inputs.insert(name, tensor.clone());
            }
        }
        inputs
    }

    async fn run_model(&self, inputs: Inputs) -> Result<Outputs> {
        let queued = Instant::now();
        let run = self.worker.run(inputs).await?;
        Counters::add(&self.counters.batches, 1);
        self.counters.time(Stage::Inference, run.elapsed);
        self.profiler.record("inference", queued, run.elapsed);
        Ok(run.outputs)
    }

    fn timed(&self, stage: Stage, name: &'static str, started: Instant) {
        let elapsed = started.elapsed();
        self.counters.time(stage, elapsed);
        self.profiler.record(name, started, elapsed);
    }

    /// What the optimizer has done so far.
    pub fn stats(&self) -> Stats {
        self.counters.snapshot(self.started, self.load_time, self.cache.stats(), self.model_info().clone())
    }

    /// Logs the summary to the trackers, stops the model worker and returns final stats.
    pub async fn shutdown(self) -> Result<Stats> {
        let stats = self.stats();
        let summary = Metrics::from([
            ("requests".to_string(), stats.requests as f64),
            ("texts".to_string(), stats.texts as f64),
            ("errors".to_string(), stats.errors.values().sum::<u64>() as f64),
            ("inference_seconds".to_string(), stats.inference_seconds),
        ]);
        let mut trackers = self.trackers.lock().await;
        if let Err(e) = trackers.log_summary(&summary).and_then(|_| trackers.finish()) {
            tracing::warn!("tracker failed at shutdown: {e}");
        }
        drop(trackers);
        self.worker.shutdown().await;
        Ok(stats)
    }
}

/// Turns model outputs into one vector per text: token vectors are pooled; an output
/// that is already one vector per text is used as is (normalised if configured).
fn embeddings(text: &TextPipeline, outputs: &Outputs, encoded: &Encoded) -> Result<Vec<Vec<f32>>> {
    let tensor = match outputs.get(LAST_HIDDEN_STATE) {
        Some(t) => t,
        None => outputs.iter().next().map(|(_, t)| t).ok_or_else(|| {
            Error::InvalidInput("the model returned no outputs; an embedding model must return one".into())
        })?,
    };
    match tensor.shape() {
        [_, _, _] => text.pool(tensor, encoded),
        [batch, dim] if *batch == encoded.batch => {
            let values = tensor.to_vec::<f32>()?;
            let settings = text.settings().clone();
            let one_token = vec![1i64; *batch];
            Ok(kiln_text::pool(&values, &one_token, *batch, 1, *dim, &settings))
        }
        shape => Err(Error::InvalidInput(format!(
            "model output: expected f32 [batch, sequence, hidden] or [batch, hidden] with batch {}, got {:?}",
            encoded.batch, shape
        ))),
    }
}
