//! One model on dedicated threads, with its batching queue.
//!
//! # Design
//!
//! Three threads serve a model, so that the device never waits for kiln: the
//! [batcher](crate::batcher) forms and collates the next batch from one bounded queue,
//! the **model thread** loads the model and runs what the batcher hands it through a
//! one-slot channel — while batch N runs, batch N+1 is formed — and the **responder**
//! waits for batch N-1's outputs, splits them and answers its callers. The model thread
//! *starts* a batch ([`Model::start`]): a GPU provider returns once the batch's work is
//! queued on the device, so batch N+1's copies and kernels are queued while batch N
//! still runs and the device does not idle between batches (at most three batches are
//! between the model thread and the callers: one started, one handed over, one being
//! answered). The batch limits are the
//! configured policy capped by the model's own [`ModelInfo::max_batch_size`]. Batches
//! are rounded up to the policy's [`Buckets`], and [`ModelWorker::warm_up`]
//! (`warmup.rs`) runs each bucket.
//!
//! Whole batches (`infer`, embedding with batching off) pass through the same two
//! threads, in order, and run as given. Every run is timed where it happens. A panic
//! inside a backend is caught and becomes that batch's error; if a shared batch fails,
//! its items are retried one by one so only the item that causes the failure gets it.
//! A batch whose outputs fail on the device (in [`Pending::wait`]) is retried the same
//! way, by the responder. Both threads keep serving.

use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kiln_core::{
    Error, Inputs, Model, ModelInfo, ModelSpec, NoopProfiler, Outputs, Pending, Profiler, Provider, Result,
    WhenFull,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use crate::batcher::{Batcher, Item, Job, Message, Whole};
use crate::collate::{Batch, Buckets, collate, has_sequence_dim, split};

/// What a whole-batch run returns: the outputs and how long the model itself took.
#[derive(Debug)]
pub struct RunOutput {
    /// The model's outputs.
    pub outputs: Outputs,
    /// Time spent in `Model::run`, measured on the model thread.
    pub elapsed: Duration,
}

/// What one batched item gets back.
#[derive(Debug)]
pub struct ItemOutput {
    /// This item's row of every output (batch dim 1, sequence dims trimmed to its length).
    pub outputs: Outputs,
    /// Time from submission to the start of its batch's run.
    pub queue_wait: Duration,
    /// Items in the batch it ran in.
    pub batch_size: usize,
    /// Time from the start of its batch's run to its outputs being on the host
    /// (`Model::start` and the wait for what it started).
    pub run_time: Duration,
}

/// How the worker groups items.
#[derive(Debug, Clone)]
pub struct BatchPolicy {
    /// Most items in one run (further capped by the model's own `max_batch_size`).
    pub max_batch_size: usize,
    /// Most padded tokens (items × the longest item's length) in one run; 0: no limit.
    /// A single item longer than this still runs, alone.
    pub max_batch_tokens: usize,
    /// Longest the oldest item waits for company.
    pub max_wait: Duration,
    /// Items (and whole batches) waiting or running at most; the bound covers the
    /// channel, the batcher's pending pool, the batch formed next and the one running.
    pub queue_capacity: usize,
    /// Wait for room, or refuse at once, when the queue is full.
    pub when_full: WhenFull,
    /// Batch rows rounded up to a multiple of this with rows of zeros, within the
    /// limits above (see [`Buckets`]); 1: no rows added.
    pub batch_multiple: usize,
    /// Padded sequence lengths rounded up to a multiple of this, within the model's
    /// positions; 1: padded to the longest item. Only for models with a sequence dim.
    pub sequence_multiple: usize,
}

impl BatchPolicy {
    /// How collation rounds batches of this model up.
    pub fn buckets(&self, info: &ModelInfo) -> Buckets {
        Buckets {
            batch_multiple: self.batch_multiple.max(1),
            sequence_multiple: if has_sequence_dim(info) { self.sequence_multiple.max(1) } else { 1 },
            max_rows: self.max_batch_size.max(1),
            max_tokens: self.max_batch_tokens,
            max_sequence: info.max_sequence_length,
        }
    }
}

impl Default for BatchPolicy {
    fn default() -> Self {
        BatchPolicy {
            max_batch_size: 32,
            max_batch_tokens: 0,
            max_wait: Duration::from_millis(5),
            queue_capacity: 4096,
            when_full: WhenFull::Wait,
            batch_multiple: 1,
            sequence_multiple: 1,
        }
    }
}

/// Batch counters the worker keeps.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct BatchStats {
    /// Model runs.
    pub batches: u64,
    /// Runs by number of items (whole batches count by their batch dim).
    pub batch_sizes: BTreeMap<usize, u64>,
}

impl BatchStats {
    /// Mean items per run.
    pub fn mean_batch_size(&self) -> f64 {
        if self.batches == 0 { 0.0 } else { rows(&self.batch_sizes) as f64 / self.batches as f64 }
    }
}

/// Rows (items) run through the model, from a histogram of runs by batch size.
pub fn rows(batch_sizes: &BTreeMap<usize, u64>) -> u64 {
    batch_sizes.iter().map(|(size, n)| *size as u64 * n).sum()
}

/// A handle to a model running on its own threads.
pub struct ModelWorker {
    queue: Option<flume::Sender<Message>>,
    slots: Arc<Semaphore>,
    threads: Vec<JoinHandle<()>>,
    info: ModelInfo,
    policy: BatchPolicy,
    stats: Arc<Mutex<BatchStats>>,
    profiler: Arc<dyn Profiler>,
}

pub(crate) fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_string())
}

/// The batch limits in force: the policy's, capped by the model's.
fn effective_policy(policy: &BatchPolicy, info: &ModelInfo) -> BatchPolicy {
    let mut policy = policy.clone();
    if let Some(model_max) = info.max_batch_size.filter(|&m| m > 0) {
        policy.max_batch_size = policy.max_batch_size.min(model_max);
    }
    policy.max_batch_size = policy.max_batch_size.max(1);
    policy
}

impl ModelWorker {
    /// Starts the threads, loads the model, and returns once it is ready.
    pub async fn start(provider: Arc<dyn Provider>, spec: ModelSpec, policy: BatchPolicy) -> Result<Self> {
        Self::start_profiled(provider, spec, policy, Arc::new(NoopProfiler)).await
    }

    /// [`start`](Self::start), recording spans: `load_model`, `collate` (on the batcher),
    /// `batch_run` (model and split) and each answered item's `queue_wait`.
    pub async fn start_profiled(
        provider: Arc<dyn Provider>,
        spec: ModelSpec,
        policy: BatchPolicy,
        profiler: Arc<dyn Profiler>,
    ) -> Result<Self> {
        // Unbounded channel: the bound is the slots, which also count what the threads
        // have already taken out of the channel.
        let (queue, inbox) = flume::unbounded::<Message>();
        // The model thread tells the batcher it is ready through the same queue; a weak
        // handle, so closing the queue still ends the batcher.
        let ready_signal = queue.downgrade();
        let slots = Arc::new(Semaphore::new(policy.queue_capacity.max(1)));
        let (ready, is_ready) = oneshot::channel::<Result<ModelInfo>>();
        // One slot: one batch formed and waiting while one runs.
        let (jobs, job_inbox) = flume::bounded::<Job>(1);
        let runtime = tokio::runtime::Handle::current();
        let stats = Arc::new(Mutex::new(BatchStats::default()));
        let thread_stats = stats.clone();
        let model_profiler = profiler.clone();
        let thread_policy = policy.clone();
        let name = provider.name().to_string();
        let model_thread = std::thread::Builder::new()
            .name(format!("kiln-model-{name}"))
            .spawn(move || {
                let profiler = model_profiler;
                let provider_name = provider.name().to_string();
                let load_span = profiler.span("load_model");
                let loaded = catch_unwind(AssertUnwindSafe(|| runtime.block_on(provider.load(&spec))))
                    .unwrap_or_else(|p| {
                        Err(Error::backend(
                            &provider_name,
                            format!("panicked while loading: {}", panic_message(p)),
                        ))
                    });
                drop(load_span);
                match loaded {
                    Ok(model) => {
                        let _ = ready.send(Ok(model.info().clone()));
                        let buckets = effective_policy(&thread_policy, model.info()).buckets(model.info());
                        // Splitting outputs and waking 256 callers took the model thread
                        // ~0.7 ms a batch, with the GPU idle: a thread of its own does it.
                        // One slot: a started batch waits there while the one before it
                        // is answered, which bounds the batches queued on the device.
                        let (answers, answer_inbox) = flume::bounded::<Answer>(1);
                        let runner = Runner {
                            ready: ready_signal,
                            model,
                            provider: provider_name.clone(),
                            answers,
                            buckets,
                            stats: thread_stats,
                            profiler,
                        };
                        let responder = runner.responder();
                        let responder = std::thread::Builder::new()
                            .name(format!("kiln-reply-{provider_name}"))
                            .spawn(move || responder.serve(answer_inbox));
                        // Without a responder thread the model thread answers itself.
                        runner.serve(job_inbox);
                        if let Ok(responder) = responder {
                            let _ = responder.join(); // every answer sent before the thread ends
                        }
                    }
                    Err(e) => {
                        let _ = ready.send(Err(e));
                    }
                }
            })
            .map_err(|e| Error::io("starting a thread for", "the model worker", e))?;
        let info = match is_ready.await {
            Ok(Ok(info)) => info,
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(Error::Shutdown("the model worker exited while loading".into())),
        };
        let policy = effective_policy(&policy, &info);
        let batcher =
            Batcher { policy: policy.clone(), buckets: policy.buckets(&info), profiler: profiler.clone() };
        let batcher_thread = std::thread::Builder::new()
            .name(format!("kiln-batch-{name}"))
            .spawn(move || batcher.serve(inbox, jobs))
            .map_err(|e| Error::io("starting a thread for", "the batcher", e))?;
        Ok(ModelWorker {
            queue: Some(queue),
            slots,
            threads: vec![batcher_thread, model_thread],
            info,
            policy,
            stats,
            profiler,
        })
    }

    /// The loaded model's description.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// The batch limits in force (the configured policy capped by the model's limits).
    pub fn policy(&self) -> &BatchPolicy {
        &self.policy
    }

    /// Items waiting or running.
    pub fn queue_depth(&self) -> usize {
        self.policy.queue_capacity.max(1) - self.slots.available_permits()
    }

    /// Batch counters so far.
    pub fn batch_stats(&self) -> BatchStats {
        self.stats.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A place under `queue_capacity`: waited for, or refused at once, per the policy.
    async fn slot(&self) -> Result<OwnedSemaphorePermit> {
        let stopped = || Error::Shutdown("the model worker has stopped".into());
        match self.policy.when_full {
            WhenFull::Wait => self.slots.clone().acquire_owned().await.map_err(|_| stopped()),
            WhenFull::Reject => self.slots.clone().try_acquire_owned().map_err(|e| match e {
                tokio::sync::TryAcquireError::NoPermits => {
                    Error::Overloaded { model: self.info.name.clone(), capacity: self.policy.queue_capacity }
                }
                tokio::sync::TryAcquireError::Closed => stopped(),
            }),
        }
    }

    fn send(&self, message: Message) -> Result<()> {
        let queue =
            self.queue.as_ref().ok_or_else(|| Error::Shutdown("the model worker is stopped".into()))?;
        queue.send(message).map_err(|_| Error::Shutdown("the model worker has stopped".into()))
    }

    /// Runs one whole batch, as given, on the model thread.
    pub async fn run(&self, inputs: Inputs) -> Result<RunOutput> {
        self.run_whole(inputs, false).await
    }

    pub(crate) async fn run_whole(&self, inputs: Inputs, warmup: bool) -> Result<RunOutput> {
        let (reply, answer) = oneshot::channel();
        let slot = self.slot().await?;
        self.send(Message::Whole(Whole { inputs, reply, warmup, _slot: slot }))?;
        answer.await.map_err(|_| Error::Shutdown("the model worker stopped before answering".into()))?
    }

    /// How collation rounds this model's batches up.
    pub fn buckets(&self) -> Buckets {
        self.policy.buckets(&self.info)
    }

    /// Queues one item (tensors with batch dim 1, dim 1 of `length`) to be batched with
    /// other callers' items; returns its own row of the outputs.
    pub async fn submit(&self, inputs: Inputs, length: usize) -> Result<ItemOutput> {
        let (reply, answer) = oneshot::channel();
        let slot = self.slot().await?;
        let enqueued = Instant::now();
        self.send(Message::Item(Item { inputs, length, enqueued, reply, _slot: Some(slot) }))?;
        let out = answer
            .await
            .map_err(|_| Error::Shutdown("the model worker stopped before answering".into()))??;
        // Recorded here, by each caller, not by the model thread: 256 records a batch
        // under the profiler's lock kept the GPU waiting ~1 ms between batches.
        self.profiler.record("queue_wait", enqueued, out.queue_wait);
        Ok(out)
    }

    /// Lets go of a shared worker: if this was the last handle, shuts it down and waits
    /// for its threads; otherwise the last holder's drop ends it later.
    pub async fn release(worker: Arc<ModelWorker>) {
        if let Ok(worker) = Arc::try_unwrap(worker) {
            worker.shutdown().await;
        }
    }

    /// Stops taking work, lets queued work finish, and waits for the threads to end.
    pub async fn shutdown(mut self) {
        self.queue.take();
        let threads = std::mem::take(&mut self.threads);
        let _ = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        })
        .await;
    }
}

impl Drop for ModelWorker {
    fn drop(&mut self) {
        // Closing the queue ends the threads once queued work is done; not joined here,
        // since drop may run on an async worker thread.
        self.queue.take();
    }
}

/// The model thread: runs batches and answers their callers.
struct Runner {
    /// The batcher's queue, for [`Message::Ready`].
    ready: flume::WeakSender<Message>,
    model: Arc<dyn Model>,
    provider: String,
    /// To the responder thread.
    answers: flume::Sender<Answer>,
    /// Only for re-collating a batch some of whose callers gave up; the batcher
    /// collates the rest.
    buckets: Buckets,
    stats: Arc<Mutex<BatchStats>>,
    profiler: Arc<dyn Profiler>,
}

impl Runner {
    fn serve(self, jobs: flume::Receiver<Job>) {
        loop {
            if jobs.is_empty()
                && let Some(queue) = self.ready.upgrade()
            {
                let _ = queue.send(Message::Ready);
            }
            let Ok(job) = jobs.recv() else { break };
            match job {
                Job::Whole(whole) => {
                    if whole.reply.is_closed() {
                        continue;
                    }
                    let result = if whole.warmup {
                        self.warm(&whole.inputs)
                    } else {
                        let rows = whole
                            .inputs
                            .iter()
                            .next()
                            .and_then(|(_, t)| t.shape().first().copied())
                            .unwrap_or(1);
                        self.run_model(&whole.inputs, rows)
                    };
                    let _ = whole.reply.send(result.map(|(outputs, elapsed)| RunOutput { outputs, elapsed }));
                }
                Job::Batch { mut items, collated } => {
                    // Callers that gave up while the batch waited are not run.
                    if items.iter().any(|i| i.reply.is_closed()) {
                        items.retain(|i| !i.reply.is_closed());
                        if !items.is_empty() {
                            let inputs: Vec<&Inputs> = items.iter().map(|i| &i.inputs).collect();
                            let collated = collate(&inputs, &self.buckets);
                            self.run_items(items, collated);
                        }
                        continue;
                    }
                    self.run_items(items, collated);
                }
            }
        }
    }

    /// A warm-up run: timed as `warmup`, not counted among the model's batches.
    fn warm(&self, inputs: &Inputs) -> Result<(Outputs, Duration)> {
        let (result, elapsed) = self.guarded_run("warmup", inputs);
        result.map(|outputs| (outputs, elapsed))
    }

    /// `Model::run` under a span, timed, a panic turned into the run's error.
    fn guarded_run(&self, span: &'static str, inputs: &Inputs) -> (Result<Outputs>, Duration) {
        let _span = self.profiler.span(span);
        let start = Instant::now();
        let result = guarded(&self.provider, "running", || self.model.run(inputs));
        (result, start.elapsed())
    }

    /// What the responder thread does, for this thread to do itself.
    fn responder(&self) -> Responder {
        Responder {
            model: self.model.clone(),
            provider: self.provider.clone(),
            buckets: self.buckets,
            profiler: self.profiler.clone(),
        }
    }

    fn count_batch(&self, rows: usize) {
        let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        stats.batches += 1;
        *stats.batch_sizes.entry(rows).or_default() += 1;
    }

    fn run_model(&self, inputs: &Inputs, rows: usize) -> Result<(Outputs, Duration)> {
        let (result, elapsed) = self.guarded_run("model_run", inputs);
        self.count_batch(rows);
        result.map(|outputs| (outputs, elapsed))
    }

    fn run_items(&self, items: Vec<Item>, collated: Result<Batch>) {
        let started = Instant::now();
        let span = self.profiler.span("batch_run");
        let result = collated.and_then(|batch| {
            let span = self.profiler.span("model_run");
            let pending = guarded(&self.provider, "running", || self.model.start(&batch.inputs));
            drop(span);
            self.count_batch(items.len());
            pending.map(|pending| (batch, pending))
        });
        drop(span);
        match result {
            // The responder waits for the outputs and answers, so the model thread is
            // free for the next batch at once.
            Ok((batch, pending)) => {
                let answer = Answer { items, pending, sequence: batch.sequence, rows: batch.rows, started };
                if let Err(flume::SendError(answer)) = self.answers.send(answer) {
                    self.responder().answer(answer); // no responder thread
                }
            }
            // Alone, an item's error is its own.
            Err(e) if items.len() == 1 => {
                let _ = items.into_iter().next().map(|item| item.reply.send(Err(e)));
            }
            // A shared batch failed: run each item alone, so only the culprit fails.
            Err(_) => {
                for item in items {
                    let collated = collate(&[&item.inputs], &self.buckets);
                    self.run_items(vec![item], collated);
                }
            }
        }
    }
}

/// `f`, with a panic turned into the provider's error.
fn guarded<T>(provider: &str, doing: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| {
        Err(Error::backend(provider, format!("panicked while {doing}: {}", panic_message(p))))
    })
}

/// A started batch on its way back to its callers.
struct Answer {
    items: Vec<Item>,
    pending: Pending,
    sequence: usize,
    rows: usize,
    /// When the batch's run started.
    started: Instant,
}

/// The responder thread: waits for each started batch's outputs and answers its callers.
struct Responder {
    model: Arc<dyn Model>,
    provider: String,
    /// For re-running the items of a batch that failed on the device, one by one.
    buckets: Buckets,
    profiler: Arc<dyn Profiler>,
}

impl Responder {
    fn serve(self, answers: flume::Receiver<Answer>) {
        while let Ok(answer) = answers.recv() {
            self.answer(answer);
        }
    }

    /// Waits for the outputs (span `device_wait`) and answers every caller; a shared
    /// batch whose outputs failed is run again item by item, so only the culprit fails.
    fn answer(&self, answer: Answer) {
        let Answer { items, pending, sequence, rows, started } = answer;
        let span = self.profiler.span("device_wait");
        let outputs = guarded(&self.provider, "waiting for a batch", || pending.wait());
        drop(span);
        match outputs {
            Ok(outputs) => self.deliver(items, &outputs, (sequence, rows), started),
            Err(e) if items.len() == 1 => {
                let _ = items.into_iter().next().map(|item| item.reply.send(Err(e)));
            }
            Err(_) => {
                for item in items {
                    let started = Instant::now();
                    let ran = collate(&[&item.inputs], &self.buckets).and_then(|batch| {
                        let _span = self.profiler.span("model_run");
                        let outputs = guarded(&self.provider, "running", || self.model.run(&batch.inputs))?;
                        Ok((batch, outputs))
                    });
                    match ran {
                        Ok((batch, outputs)) => {
                            self.deliver(vec![item], &outputs, (batch.sequence, batch.rows), started)
                        }
                        Err(e) => {
                            let _ = item.reply.send(Err(e));
                        }
                    }
                }
            }
        }
    }

    /// Splits a batch's outputs (of `shape`: padded sequence, rows) into each item's
    /// rows and answers every caller (span `split`). Outputs that cannot be split are
    /// the model's error for every item.
    fn deliver(&self, items: Vec<Item>, outputs: &Outputs, shape: (usize, usize), started: Instant) {
        let run_time = started.elapsed();
        let span = self.profiler.span("split");
        let lengths: Vec<usize> = items.iter().map(|i| i.length).collect();
        let (sequence, rows) = shape;
        let info = self.model.info();
        let split = guarded("kiln", "splitting", || split(outputs, &lengths, sequence, rows, info));
        drop(span);
        let batch_size = items.len();
        match split {
            Ok(per_item) => {
                for (item, outputs) in items.into_iter().zip(per_item) {
                    let queue_wait = started.saturating_duration_since(item.enqueued);
                    let _ = item.reply.send(Ok(ItemOutput { outputs, queue_wait, batch_size, run_time }));
                }
            }
            Err(e) => {
                let message = e.to_string();
                for item in items {
                    let _ = item.reply.send(Err(Error::backend("kiln", message.clone())));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_core::{Capabilities, DType, Device, Dim, Tensor, TensorSpec, async_trait};

    /// Fault injection: a model that panics on input id 13 and otherwise returns its
    /// input ids as floats, with the batch size it saw.
    struct Faulty(ModelInfo);
    impl Model for Faulty {
        fn info(&self) -> &ModelInfo {
            &self.0
        }
        fn run(&self, inputs: &Inputs) -> Result<Outputs> {
            let ids = inputs.require("input_ids")?;
            let values = ids.to_vec::<i64>()?;
            assert!(!values.contains(&13), "fault injected: id 13");
            let batch = ids.shape()[0];
            Ok(Outputs::new()
                .with(
                    "echo",
                    Tensor::from_vec(ids.shape().to_vec(), values.iter().map(|&v| v as f32).collect())?,
                )
                .with("batch", Tensor::from_vec(vec![batch], vec![batch as f32; batch])?))
        }
    }
    /// Fault injection for started batches: `start` returns before the batch's work
    /// is done, like a GPU provider's. The first batch's outputs come only once a
    /// second batch was started (the worker must not wait for one batch before
    /// starting the next), and a batch with id 13 fails while it is waited for.
    struct OnDevice {
        model: Arc<Faulty>,
        started: Arc<std::sync::atomic::AtomicUsize>,
    }
    impl Model for OnDevice {
        fn info(&self) -> &ModelInfo {
            self.model.info()
        }
        fn run(&self, inputs: &Inputs) -> Result<Outputs> {
            self.model.run(inputs)
        }
        fn start(&self, inputs: &Inputs) -> Result<Pending> {
            use std::sync::atomic::Ordering::SeqCst;
            let number = self.started.fetch_add(1, SeqCst) + 1;
            let (model, started, inputs) = (self.model.clone(), self.started.clone(), inputs.clone());
            Ok(Pending::later(move || {
                let deadline = Instant::now() + Duration::from_secs(10);
                while number == 1 && started.load(SeqCst) < 2 {
                    if Instant::now() > deadline {
                        return Err(Error::backend("on-device", "batch 2 never started while batch 1 ran"));
                    }
                    std::thread::yield_now();
                }
                model.run(&inputs)
            }))
        }
    }

    /// Holds its first run until the test opens [`GATE`]: a model busy for as long as
    /// the test needs.
    struct Gated {
        model: Faulty,
        runs: std::sync::atomic::AtomicUsize,
    }
    static GATE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    /// Set once the first run is held at the gate.
    static HELD: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    impl Model for Gated {
        fn info(&self) -> &ModelInfo {
            self.model.info()
        }
        fn run(&self, inputs: &Inputs) -> Result<Outputs> {
            use std::sync::atomic::Ordering::SeqCst;
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.runs.fetch_add(1, SeqCst) == 0 && !GATE.load(SeqCst) {
                self.runs.store(0, SeqCst);
                HELD.store(true, SeqCst);
                assert!(Instant::now() < deadline, "the test never opened the gate");
                std::thread::yield_now();
            }
            self.model.run(inputs)
        }
    }

    struct FaultyProvider;
    #[async_trait]
    impl Provider for FaultyProvider {
        fn name(&self) -> &str {
            "faulty"
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities::cpu_only(vec![DType::F32])
        }
        async fn load(&self, spec: &ModelSpec) -> Result<Arc<dyn Model>> {
            if spec.path.as_os_str() == "panic" {
                panic!("fault injected: load");
            }
            let seq = || vec![Dim::Dynamic("batch".into()), Dim::Dynamic("sequence".into())];
            let mut info = ModelInfo::new("faulty", "faulty", spec.device, spec.dtype);
            // A model that declares a batch limit of its own.
            if spec.path.as_os_str() == "max2" {
                info.max_batch_size = Some(2);
            }
            info.inputs = vec![TensorSpec::new("input_ids", DType::I64, seq())];
            info.outputs = vec![
                TensorSpec::new("echo", DType::F32, seq()),
                TensorSpec::new("batch", DType::F32, vec![Dim::Dynamic("batch".into())]),
            ];
            if spec.path.as_os_str() == "gate" {
                return Ok(Arc::new(Gated { model: Faulty(info), runs: Default::default() }));
            }
            if spec.path.as_os_str() == "device" {
                return Ok(Arc::new(OnDevice { model: Arc::new(Faulty(info)), started: Arc::default() }));
            }
            Ok(Arc::new(Faulty(info)))
        }
    }

    async fn worker(policy: BatchPolicy) -> Arc<ModelWorker> {
        Arc::new(
            ModelWorker::start(
                Arc::new(FaultyProvider),
                ModelSpec::new("m", Device::Cpu, DType::F32),
                policy,
            )
            .await
            .unwrap(),
        )
    }

    fn item(ids: Vec<i64>) -> (Inputs, usize) {
        let n = ids.len();
        (Inputs::new().with("input_ids", Tensor::from_vec(vec![1, n], ids).unwrap()), n)
    }

    #[tokio::test]
    async fn concurrent_items_share_batches_and_each_gets_its_own_row() {
        let policy = BatchPolicy { max_wait: Duration::from_millis(50), ..BatchPolicy::default() };
        let w = worker(policy).await;
        let calls: Vec<_> = (0..40i64)
            .map(|i| {
                let w = w.clone();
                tokio::spawn(async move {
                    let (inputs, len) = item((0..(i % 5 + 1)).map(|k| 100 * i + k).collect());
                    (i, w.submit(inputs, len).await.unwrap())
                })
            })
            .collect();
        let mut shared = 0;
        for call in calls {
            let (i, out) = call.await.unwrap();
            let echo = out.outputs.require("echo").unwrap();
            let want: Vec<f32> = (0..(i % 5 + 1)).map(|k| (100 * i + k) as f32).collect();
            assert_eq!(
                echo.to_vec::<f32>().unwrap(),
                want,
                "item {i} got its own row, trimmed to its length"
            );
            shared += usize::from(out.batch_size > 1);
        }
        assert!(shared > 0, "with 40 concurrent callers some batches are shared: {:?}", w.batch_stats());
        assert!(w.batch_stats().mean_batch_size() > 1.0);
    }

    #[tokio::test]
    async fn a_failing_item_fails_alone_and_the_worker_keeps_serving() {
        let policy = BatchPolicy { max_wait: Duration::from_millis(50), ..BatchPolicy::default() };
        let w = worker(policy).await;
        let calls: Vec<_> = [vec![1, 2], vec![13], vec![3]]
            .into_iter()
            .map(|ids| {
                let w = w.clone();
                tokio::spawn(async move {
                    let (inputs, len) = item(ids);
                    w.submit(inputs, len).await
                })
            })
            .collect();
        let mut results = Vec::new();
        for c in calls {
            results.push(c.await.unwrap());
        }
        assert!(results[0].is_ok() && results[2].is_ok());
        let err = results[1].as_ref().unwrap_err().to_string();
        assert!(err.contains("panicked while running: fault injected: id 13"), "{err}");
        let (inputs, len) = item(vec![4]);
        assert!(w.submit(inputs, len).await.is_ok(), "still serving");
    }

    #[tokio::test]
    async fn the_next_batch_starts_while_one_is_on_the_device_and_a_failed_wait_fails_only_its_culprit() {
        let policy = BatchPolicy { max_wait: Duration::from_millis(50), ..BatchPolicy::default() };
        let w = Arc::new(
            ModelWorker::start(
                Arc::new(FaultyProvider),
                ModelSpec::new("device", Device::Cpu, DType::F32),
                policy,
            )
            .await
            .unwrap(),
        );
        let submit = |ids: Vec<i64>| {
            let w = w.clone();
            tokio::spawn(async move {
                let (inputs, len) = item(ids);
                w.submit(inputs, len).await
            })
        };
        let first = submit(vec![1]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while w.batch_stats().batches < 1 {
            assert!(Instant::now() < deadline, "batch 1 never started");
            tokio::task::yield_now().await;
        }
        let rest: Vec<_> = [vec![2, 3], vec![13], vec![4]].into_iter().map(submit).collect();
        let first = first.await.unwrap();
        assert!(first.is_ok(), "{first:?}");
        let mut results = Vec::new();
        for call in rest {
            results.push(call.await.unwrap());
        }
        assert_eq!(
            results[0].as_ref().unwrap().outputs.require("echo").unwrap().to_vec::<f32>().unwrap(),
            [2.0, 3.0]
        );
        assert!(results[2].is_ok(), "{:?}", results[2]);
        let err = results[1].as_ref().unwrap_err().to_string();
        assert!(err.contains("fault injected: id 13"), "{err}");
    }

    #[tokio::test]
    async fn a_due_batch_keeps_gathering_while_the_model_is_busy() {
        // Every item is due at once; the batches still wait for the model.
        let policy = BatchPolicy { max_wait: Duration::ZERO, max_batch_size: 64, ..BatchPolicy::default() };
        let w = Arc::new(
            ModelWorker::start(
                Arc::new(FaultyProvider),
                ModelSpec::new("gate", Device::Cpu, DType::F32),
                policy,
            )
            .await
            .unwrap(),
        );
        let submit = |i: i64| {
            let w = w.clone();
            tokio::spawn(async move {
                let (inputs, len) = item(vec![100 + i]);
                w.submit(inputs, len).await.map(|out| out.batch_size)
            })
        };
        let first = submit(0);
        let deadline = Instant::now() + Duration::from_secs(10);
        let wait_for = |n: usize| {
            let w = w.clone();
            async move {
                while w.queue_depth() < n {
                    assert!(Instant::now() < deadline, "{} of {n} items queued", w.queue_depth());
                    tokio::task::yield_now().await;
                }
            }
        };
        while !HELD.load(std::sync::atomic::Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "batch 1 never started");
            tokio::task::yield_now().await;
        }
        // One at a time, each one due before the next comes, while batch 1 runs.
        let mut rest = Vec::new();
        for i in 1..=20 {
            rest.push(submit(i));
            wait_for(1 + i as usize).await;
        }
        GATE.store(true, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(first.await.unwrap().unwrap(), 1);
        for call in rest {
            assert_eq!(
                call.await.unwrap().unwrap(),
                20,
                "the 20 items that came during batch 1 share batch 2"
            );
        }
        assert_eq!(w.batch_stats().batches, 2);
    }

    #[tokio::test]
    async fn a_full_queue_answers_overloaded_and_recovers() {
        // Capacity 1 and a long wait keep the first item queued while the others arrive.
        let policy = BatchPolicy {
            max_wait: Duration::from_millis(300),
            queue_capacity: 1,
            when_full: WhenFull::Reject,
            max_batch_size: 64,
            ..BatchPolicy::default()
        };
        let w = worker(policy).await;
        let calls: Vec<_> = (0..20)
            .map(|i| {
                let w = w.clone();
                tokio::spawn(async move {
                    let (inputs, len) = item(vec![100 + i]); // clear of the fault-injecting id 13
                    w.submit(inputs, len).await
                })
            })
            .collect();
        let mut overloaded = 0;
        for c in calls {
            match c.await.unwrap() {
                Ok(_) => {}
                Err(Error::Overloaded { capacity: 1, .. }) => overloaded += 1,
                Err(e) => panic!("unexpected {e}"),
            }
        }
        assert_eq!(overloaded, 19, "one item holds the only slot; every other caller meets the full queue");
        let (inputs, len) = item(vec![1]);
        assert!(w.submit(inputs, len).await.is_ok(), "recovered once the queue drained");
    }

    #[tokio::test]
    async fn a_dropped_caller_cancels_its_queued_item() {
        let policy = BatchPolicy { max_wait: Duration::from_millis(200), ..BatchPolicy::default() };
        let w = worker(policy).await;
        // The caller gives up after 20 ms, while its item waits for company.
        let (inputs, len) = item(vec![13]); // would panic the model if it ever ran
        assert!(tokio::time::timeout(Duration::from_millis(20), w.submit(inputs, len)).await.is_err());
        // No waiting needed: the next item goes into the same batching window, and the
        // abandoned one, had it not been dropped, would have joined it and panicked the
        // model.
        let (inputs, len) = item(vec![1]);
        assert!(w.submit(inputs, len).await.is_ok());
        let stats = w.batch_stats();
        assert_eq!(
            (stats.batches, stats.batch_sizes.get(&1)),
            (1, Some(&1)),
            "one run of one item: {stats:?}"
        );
    }

    #[tokio::test]
    async fn a_panicking_load_is_an_error_not_a_crash() {
        let err = ModelWorker::start(
            Arc::new(FaultyProvider),
            ModelSpec::new("panic", Device::Cpu, DType::F32),
            BatchPolicy::default(),
        )
        .await
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("panicked while loading: fault injected: load"), "{err}");
    }

    #[tokio::test]
    async fn a_model_that_declares_a_batch_limit_never_gets_more() {
        let policy = BatchPolicy { max_wait: Duration::from_millis(50), ..BatchPolicy::default() };
        let w = Arc::new(
            ModelWorker::start(
                Arc::new(FaultyProvider),
                ModelSpec::new("max2", Device::Cpu, DType::F32),
                policy,
            )
            .await
            .unwrap(),
        );
        assert_eq!(w.policy().max_batch_size, 2);
        let calls: Vec<_> = (0..12i64)
            .map(|i| {
                let w = w.clone();
                tokio::spawn(async move {
                    let (inputs, len) = item(vec![100 + i]);
                    w.submit(inputs, len).await.unwrap().batch_size
                })
            })
            .collect();
        for call in calls {
            assert!(call.await.unwrap() <= 2);
        }
        let stats = w.batch_stats();
        assert_eq!(rows(&stats.batch_sizes), 12, "{stats:?}");
        assert!(stats.batch_sizes.keys().all(|&size| size <= 2), "{stats:?}");
    }

    /// Records the shape of every run; fault injection: fails like a device out of
    /// memory above a number of tokens.
    struct ShapeRecorder {
        info: ModelInfo,
        seen: Arc<Mutex<Vec<(usize, usize)>>>,
        max_tokens: usize,
    }
    impl Model for ShapeRecorder {
        fn info(&self) -> &ModelInfo {
            &self.info
        }
        fn run(&self, inputs: &Inputs) -> Result<Outputs> {
            let ids = inputs.require("input_ids")?;
            let (rows, sequence) = (ids.shape()[0], ids.shape()[1]);
            if rows * sequence > self.max_tokens {
                return Err(Error::backend("recorder", "fault injected: out of memory"));
            }
            self.seen.lock().unwrap().push((rows, sequence));
            Ok(Outputs::new().with("score", Tensor::from_vec(vec![rows], vec![1f32; rows])?))
        }
    }
    struct RecorderProvider(Arc<Mutex<Vec<(usize, usize)>>>, usize);
    #[async_trait]
    impl Provider for RecorderProvider {
        fn name(&self) -> &str {
            "recorder"
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities::cpu_only(vec![DType::F32])
        }
        async fn load(&self, spec: &ModelSpec) -> Result<Arc<dyn Model>> {
            let mut info = ModelInfo::new("recorder", "recorder", spec.device, spec.dtype);
            info.inputs = vec![TensorSpec::new(
                "input_ids",
                DType::I64,
                vec![Dim::Dynamic("batch".into()), Dim::Dynamic("sequence".into())],
            )];
            info.outputs = vec![TensorSpec::new("score", DType::F32, vec![Dim::Dynamic("batch".into())])];
            info.max_sequence_length = Some(20);
            Ok(Arc::new(ShapeRecorder { info, seen: self.0.clone(), max_tokens: self.1 }))
        }
    }

    async fn recorder(max_tokens: usize) -> (ModelWorker, Arc<Mutex<Vec<(usize, usize)>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let policy = BatchPolicy {
            max_batch_size: 8,
            batch_multiple: 4,
            sequence_multiple: 8,
            max_wait: Duration::from_millis(1),
            ..BatchPolicy::default()
        };
        let provider = Arc::new(RecorderProvider(seen.clone(), max_tokens));
        let w =
            ModelWorker::start(provider, ModelSpec::new("m", Device::Cpu, DType::F32), policy).await.unwrap();
        (w, seen)
    }

    #[tokio::test]
    async fn warm_up_runs_every_bucket_largest_first_and_batches_use_the_buckets() {
        let (w, seen) = recorder(usize::MAX).await;
        let warm = w.warm_up(None).await.unwrap();
        // Sequences 8, 16 and 20 (the model's 20 positions cap the third bucket), rows 4 and 8.
        let shapes = vec![(8, 20), (4, 20), (8, 16), (4, 16), (8, 8), (4, 8)];
        assert_eq!(warm.shapes, shapes);
        let runs: Vec<_> = shapes.iter().flat_map(|&s| [s; 3]).collect();
        assert_eq!(*seen.lock().unwrap(), runs, "each shape three times, in order");
        assert_eq!(w.batch_stats().batches, 0, "warm-up runs are not the model's batches");
        // text.max_length bounds the sequences warmed up.
        seen.lock().unwrap().clear();
        assert_eq!(w.warm_up(Some(5)).await.unwrap().shapes, vec![(8, 8), (4, 8)]);

        seen.lock().unwrap().clear();
        let (inputs, len) = item(vec![1, 2, 3]);
        let out = w.submit(inputs, len).await.unwrap();
        assert_eq!(out.outputs.require("score").unwrap().shape(), &[1], "the item gets its own row");
        assert_eq!(*seen.lock().unwrap(), vec![(4, 8)], "one item runs as a bucket of 4 x 8");
        assert_eq!(w.batch_stats().batch_sizes.get(&1), Some(&1), "counted by items, not added rows");
    }

    #[tokio::test]
    async fn a_warm_up_that_does_not_fit_names_the_shape_and_the_settings() {
        let (w, _) = recorder(100).await;
        let err = w.warm_up(None).await.unwrap_err().to_string();
        assert!(err.contains("a batch of 8 x 20 tokens"), "{err}");
        assert!(err.contains("fault injected: out of memory"), "{err}");
        assert!(err.contains("batching.max_batch_size"), "{err}");
        // The worker still serves what fits.
        let (inputs, len) = item(vec![1, 2]);
        assert!(w.submit(inputs, len).await.is_ok());
    }

    #[tokio::test]
    async fn a_model_without_known_shapes_is_not_warmed_up() {
        let w = worker(BatchPolicy::default()).await;
        let warm = w.warm_up(None).await.unwrap();
        assert!(warm.shapes.is_empty());
        assert!(warm.skipped.unwrap().contains("no known maximum"));
    }
}
