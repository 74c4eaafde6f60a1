//! [`ModelWorker`]: the handle callers hold. It starts the three threads, loads the
//! model, and puts callers' items and whole batches on the queue under
//! `queue_capacity` slots.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use kiln_core::{
    Error, Inputs, ModelInfo, ModelSpec, NoopProfiler, Profiler, Provider, Result, WhenFull, panic_message,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use super::batcher::Batcher;
use super::queue::{BatchPolicy, BatchStats, Item, ItemOutput, Job, Message, Reply, RunOutput, Whole};
use super::responder::Answer;
use super::runner::Runner;
use crate::collate::Buckets;

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
                        let buckets = thread_policy.capped_by(model.info()).buckets(model.info());
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
        let policy = policy.capped_by(&info);
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
        // Checked here, once for every provider, before taking a slot: a bad request never waits.
        self.info.validate(&inputs)?;
        let (reply, answer) = oneshot::channel();
        let slot = self.slot().await?;
        self.send(Message::Whole(Whole { inputs, reply: Reply::new(reply, Some(slot)), warmup }))?;
        answer.await.map_err(|_| Error::Shutdown("the model worker stopped before answering".into()))?
    }

    /// How collation rounds this model's batches up.
    pub fn buckets(&self) -> Buckets {
        self.policy.buckets(&self.info)
    }

    /// A new request id for [`ModelWorker::submit_as`]: the items of one caller's
    /// request carry the same one.
    pub fn request_id() -> u64 {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// Queues one item (tensors with batch dim 1, dim 1 of `length`) to be batched with
    /// other callers' items, as a request of its own; returns its own row of the outputs.
    pub async fn submit(&self, inputs: Inputs, length: usize) -> Result<ItemOutput> {
        self.submit_as(Self::request_id(), inputs, length).await
    }

    /// [`ModelWorker::submit`] for one of the items of `request` (from
    /// [`ModelWorker::request_id`]): while several requests wait, each batch takes its
    /// share of every one of them, so a small request is not queued behind all of a
    /// large one.
    pub async fn submit_as(&self, request: u64, inputs: Inputs, length: usize) -> Result<ItemOutput> {
        // A bad item is refused alone, never joining (and failing) a shared batch.
        self.info.validate(&inputs)?;
        let (reply, answer) = oneshot::channel();
        let slot = self.slot().await?;
        let enqueued = Instant::now();
        self.send(Message::Item(Item {
            request,
            inputs,
            length,
            enqueued,
            reply: Reply::new(reply, Some(slot)),
        }))?;
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
