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
    WhenFull, panic_message,
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
                            format!("panicked while loading: {}", panic_message(&*p)),
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
                    // The slot goes back before the answer, as for items.
                    let Whole { reply, _slot, .. } = whole;
                    drop(_slot);
                    let _ = reply.send(result.map(|(outputs, elapsed)| RunOutput { outputs, elapsed }));
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
                if let Some(item) = items.into_iter().next() {
                    item.answer(Err(e));
                }
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
        Err(Error::backend(provider, format!("panicked while {doing}: {}", panic_message(&*p))))
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
                if let Some(item) = items.into_iter().next() {
                    item.answer(Err(e));
                }
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
                            item.answer(Err(e));
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
                    item.answer(Ok(ItemOutput { outputs, queue_wait, batch_size, run_time }));
                }
            }
            Err(e) => {
                let message = e.to_string();
                for item in items {
                    item.answer(Err(Error::backend("kiln", message.clone())));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
