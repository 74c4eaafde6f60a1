//! The [`Optimizer`]: builds the stack a config names and serves requests through it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_core::{
    Cache, Error, Inputs, KilnConfig, ModelInfo, ModelSpec, Outputs, Profiler, Provider, Result, Task,
};

use crate::governor::MemoryGovernor;
use crate::inflight::InFlight;
use crate::models::ModelManager;
use crate::parts::{Parts, Reports};
use crate::replicas::Replicas;
use crate::scheduler::Scheduler;
use crate::stats::{Counters, Stage, Stats};
use crate::tracking::{TrackerFailures, TrackerHub};
use crate::worker::{BatchPolicy, ModelWorker};

mod classify;
mod embed;
mod metrics;

use classify::Classifier;
pub use classify::{Classification, Scored};
use embed::TextPath;
use metrics::{IntervalMetrics, StatsSource, summary_metrics};

pub use kiln_core::LAST_HIDDEN_STATE;

/// kiln's entry point: a provider, a loaded model on its batching worker, the text
/// pipeline, the result cache, profiler and trackers, composed from a [`KilnConfig`].
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
    models: Arc<ModelManager>,
    governor: Option<Arc<MemoryGovernor>>,
    policy: BatchPolicy,
    /// The model's workers: one, or one per `model.gpu_ids` entry.
    replicas: Replicas,
    text: Option<TextPath>,
    vision: Option<Arc<Classifier>>,
    /// Texts being embedded now, so that concurrent copies share one run.
    inflight: Arc<InFlight>,
    /// Model identity and text settings: the prefix of every cache key.
    identity: String,
    cache: Arc<dyn Cache>,
    scheduler: Arc<Scheduler>,
    profiler: Arc<dyn Profiler>,
    /// The profiler's outputs.
    reports: Reports,
    trackers: Option<TrackerHub>,
    counters: Arc<Counters>,
    /// What `stats()` reads; the tracker thread holds a clone.
    stats: StatsSource,
}

impl Optimizer {
    /// Builds the provider the config names, loads the model on its own thread, and
    /// prepares the pipeline of the config's task: [`Parts::from_config`], then
    /// [`from_parts`](Self::from_parts).
    pub async fn from_config(config: KilnConfig) -> Result<Self> {
        if matches!(config.task, Task::Generate | Task::Video) {
            return Err(elsewhere(config.task));
        }
        Self::from_parts(Parts::from_config(config)?).await
    }

    /// Loads the model of `parts` — one copy per device — on batching workers and
    /// prepares the pipeline of the config's task.
    pub async fn from_parts(mut parts: Parts) -> Result<Self> {
        let config = parts.config.clone();
        if matches!(config.task, Task::Generate | Task::Video) {
            return Err(elsewhere(config.task));
        }
        let started = parts.started;
        let (provider, monitor, profiler) =
            (parts.provider.clone(), parts.monitor.clone(), parts.profiler.clone());
        let devices = parts.devices.clone();
        let mut spec = parts.spec();
        if config.task == Task::Embed {
            // Known before loading, so the provider can pool on its device.
            spec = spec.with_head(kiln_text::embedding_head(&config.model.path, &config.text)?);
        }
        // Before the model loads: a cache's config error (a Redis URL) fails fast.
        let cache = parts.cache()?;
        let b = &config.batching;
        let policy = BatchPolicy {
            max_batch_size: b.max_batch_size,
            max_batch_tokens: b.max_batch_tokens,
            max_wait: Duration::from_millis(b.max_wait_ms),
            queue_capacity: b.queue_capacity,
            when_full: b.when_full,
            batch_multiple: b.batch_multiple_on(devices[0]),
            sequence_multiple: b.sequence_multiple_on(devices[0]),
        };
        let models = Arc::new(
            ModelManager::new(config.models.clone())
                .with_profiler(profiler.clone())
                .with_monitor(monitor.clone()),
        );
        let mut workers = Vec::with_capacity(devices.len());
        for (replica, device) in devices.iter().enumerate() {
            let spec = ModelSpec { device: *device, ..spec.clone() };
            workers.push(models.load_replica(provider.clone(), spec, policy.clone(), replica).await?);
        }
        let replicas = Replicas::new(workers)?;
        let worker = replicas.first().clone();
        let (text, vision) = match config.task {
            Task::Embed => (Some(TextPath::new(&config, worker.info(), &spec, provider.name())?), None),
            Task::Classify => (None, Some(Arc::new(Classifier::new(&config, worker.info())?))),
            Task::Generate | Task::Video => return Err(elsewhere(config.task)),
        };
        if config.batching.warmup_on(devices[0]) {
            // The longest text the pipeline lets through bounds the sequences.
            let max_sequence = text.as_ref().map(|t| t.pipeline.settings().max_length);
            // An image is the pipeline's [3, H, W] (or [H, W, 3]).
            let item = vision.as_ref().map(|v| v.pipeline.shape(1)[1..].to_vec());
            replicas.warm_up(max_sequence, item.as_deref()).await?;
        }
        let load_time = started.elapsed();
        let identity =
            format!("{}|{:?}|{:?}", provider.name(), spec, text.as_ref().map(|t| t.pipeline.settings()));
        let scheduler = Arc::new(Scheduler::new(&config.scheduler));
        let governor = config.memory.enabled.then(|| {
            Arc::new(MemoryGovernor::start(
                config.memory.clone(),
                monitor.clone(),
                cache.clone(),
                models.clone(),
                vec![provider.clone()],
            ))
        });
        let counters = Arc::new(Counters::default());
        let stats = StatsSource {
            counters: counters.clone(),
            scheduler: scheduler.clone(),
            cache: cache.clone(),
            workers: replicas.downgrade(),
            model: worker.info().clone(),
            governor: governor.as_ref().map(Arc::downgrade),
            started,
            load_time,
            failures: TrackerFailures::default(),
        };
        let trackers = parts.start_trackers(
            Box::new(IntervalMetrics::new(stats.clone(), monitor.clone())).into_fn(),
            stats.failures.clone(),
        )?;
        let reports = parts.reports().with_governor(governor.as_ref());
        Ok(Optimizer {
            config,
            provider,
            models,
            governor,
            policy,
            replicas,
            text,
            vision,
            inflight: Arc::new(InFlight::default()),
            identity,
            cache,
            scheduler,
            profiler,
            reports,
            trackers,
            counters,
            stats,
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

    /// The model manager: what is loaded, and unloading.
    pub fn models(&self) -> &ModelManager {
        &self.models
    }

    /// Loads another model with this optimizer's provider, subject to memory admission
    /// (`required X GiB, available Y GiB` when it does not fit) and the `[models]` limits.
    /// The returned worker runs whole batches (`run`) or batched items (`submit`).
    pub async fn load_model(&self, spec: ModelSpec) -> Result<Arc<ModelWorker>> {
        self.models.load(self.provider.clone(), spec, self.policy.clone()).await
    }

    /// The loaded model's description.
    pub fn model_info(&self) -> &ModelInfo {
        self.replicas.first().info()
    }

    /// The profiler; `optimizer.profiler().span("my_stage")` times your own code too:
    ///
    /// ```no_run
    /// # fn demo(optimizer: &kiln_runtime::Optimizer) {
    /// let _span = optimizer.profiler().span("image_processing");
    /// // ... recorded until `_span` drops
    /// # }
    /// ```
    pub fn profiler(&self) -> &dyn Profiler {
        &*self.profiler
    }

    /// What every public call gets: a `request` span, the request count, the
    /// scheduler (slot, deadline, retries) unless `check` already failed, and its
    /// latency or error kind in the stats.
    async fn request<T, F, Fut>(&self, check: Result<()>, attempt: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let _span = self.profiler.span("request");
        let started = Instant::now();
        Counters::add(&self.counters.requests, 1);
        let result = match check {
            Ok(()) => self.scheduler.call(attempt).await,
            Err(e) => Err(e),
        };
        match &result {
            Ok(_) => self.counters.latency(started.elapsed()),
            Err(e) => self.counters.error(e),
        }
        result
    }

    /// A call of `count` inputs within `scheduler.max_inputs_per_call`, or the error
    /// that says how to split it.
    fn check_call_size(&self, count: usize, what: &str) -> Result<()> {
        let limit = self.config.scheduler.max_inputs_per_call;
        if count > limit {
            return Err(Error::InvalidInput(format!(
                "a call of {count} {what} is over scheduler.max_inputs_per_call ({limit}); \
                 split it into calls of at most {limit} (kiln run does)"
            )));
        }
        Ok(())
    }

    /// Runs raw tensors through the model as one batch, validated against what it expects.
    pub async fn infer(&self, inputs: Inputs) -> Result<Outputs> {
        // The worker checks the inputs against the model's before they take a place in its queue.
        self.request(Ok(()), || self.run_model(inputs.clone())).await
    }

    /// Runs a list of tasks concurrently under the same limits; one result per task, in
    /// order. One task failing does not fail the others.
    pub async fn run_batch(&self, tasks: Vec<TaskInput>) -> Vec<Result<TaskOutput>> {
        futures_util::future::join_all(tasks.into_iter().map(|task| async move {
            match task {
                TaskInput::Embed(texts) => self.embed(&texts).await.map(TaskOutput::Embeddings),
                TaskInput::Infer(inputs) => self.infer(inputs).await.map(TaskOutput::Outputs),
            }
        }))
        .await
    }

    /// The pipeline's tensors the model declares (some exports take no token_type_ids).
    fn model_inputs(&self, all: Inputs) -> Inputs {
        let declared = &self.model_info().inputs;
        if declared.is_empty() {
            return all;
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
        // The worker thread records `model_run` itself.
        let run = self.replicas.pick().run(inputs).await?;
        self.counters.time(Stage::Inference, run.elapsed);
        Ok(run.outputs)
    }

    fn timed(&self, stage: Stage, name: &'static str, started: Instant) {
        let elapsed = started.elapsed();
        self.counters.time(stage, elapsed);
        self.profiler.record(name, started, elapsed);
    }

    /// The profiler's outputs, as every front writes them: `reports().report()` (the
    /// report so far, with the backend allocator's figures; `None` with
    /// `profiler.enabled` off), `write_profile(path)` and `write_trace(path)`.
    pub fn reports(&self) -> &Reports {
        &self.reports
    }

    /// What the optimizer has done so far.
    pub fn stats(&self) -> Stats {
        self.stats.snapshot()
    }

    /// Logs a last metrics step, the summary and the profiler report to the trackers,
    /// finishes them, stops the model worker and returns the final stats.
    pub async fn shutdown(mut self) -> Result<Stats> {
        if let Some(hub) = self.trackers.take() {
            let summary = summary_metrics(&self.stats());
            hub.finish(summary, self.reports.report()).await;
        }
        let stats = self.stats();
        drop(self.governor);
        self.models.clear();
        self.replicas.release().await;
        Ok(stats)
    }
}

/// The tasks with a front of their own, not batches of items: generation steps over
/// sequences, the video task runs a pipeline of two models.
fn elsewhere(task: Task) -> Error {
    let front = if task == Task::Video { "kiln_video::VideoPipeline" } else { "kiln_runtime::Generation" };
    Error::Unsupported(format!(
        "task = \"{}\" runs through {front} (as `kiln run` does), not the Optimizer",
        task.as_str()
    ))
}

/// One task of [`Optimizer::run_batch`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum TaskInput {
    /// Embed these texts.
    Embed(Vec<String>),
    /// Run these tensors through the model.
    Infer(Inputs),
}

/// The result of one [`TaskInput`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum TaskOutput {
    /// One vector per text.
    Embeddings(Vec<Vec<f32>>),
    /// The model's outputs.
    Outputs(Outputs),
}
