//! What travels through a model's worker: the policy it batches by, the messages on its
//! queue, the jobs the batcher hands the model thread, and what callers get back. A
//! leaf: it names nothing else of the worker, and every other part of it reads this.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kiln_core::{Error, Inputs, ModelInfo, Outputs, Result, WhenFull};
use tokio::sync::{OwnedSemaphorePermit, oneshot};

use crate::collate::{Batch, Buckets, has_sequence_dim};

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

    /// The batch limits in force for `info`'s model: this policy's, capped by the
    /// model's own [`ModelInfo::max_batch_size`].
    pub fn capped_by(&self, info: &ModelInfo) -> BatchPolicy {
        let mut policy = self.clone();
        if let Some(model_max) = info.max_batch_size.filter(|&m| m > 0) {
            policy.max_batch_size = policy.max_batch_size.min(model_max);
        }
        policy.max_batch_size = policy.max_batch_size.max(1);
        policy
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

/// Where a caller's answer goes, holding its place under `queue_capacity` until then.
pub(crate) struct Reply<T> {
    sender: oneshot::Sender<Result<T>>,
    /// Given back before the answer is sent (see [`answer`](Self::answer)).
    slot: Option<OwnedSemaphorePermit>,
}

impl<T> Reply<T> {
    pub(crate) fn new(sender: oneshot::Sender<Result<T>>, slot: Option<OwnedSemaphorePermit>) -> Self {
        Reply { sender, slot }
    }

    /// Whether the caller gave up (its receiver is gone).
    pub(crate) fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }

    /// Answers the caller, its queue slot given back first: a caller that submits
    /// again as soon as it has its answer finds the slot free.
    pub(crate) fn answer(self, result: Result<T>) {
        let Reply { sender, slot } = self;
        drop(slot);
        let _ = sender.send(result);
    }
}

/// One caller's item: tensors with batch dim 1, to share a batch with others.
pub(crate) struct Item {
    /// The request it belongs to ([`super::ModelWorker::request_id`]): items of one
    /// request share it, so a batch can give every waiting request its share.
    pub request: u64,
    pub inputs: Inputs,
    /// Its sequence length (dim 1), what batches are grouped by.
    pub length: usize,
    pub enqueued: Instant,
    pub reply: Reply<ItemOutput>,
}

impl Item {
    /// Answers the caller (slot first, see [`Reply::answer`]).
    pub fn answer(self, result: Result<ItemOutput>) {
        self.reply.answer(result);
    }
}

/// A whole batch, run as given; a warm-up run is neither counted nor timed as a
/// `model_run`.
pub(crate) struct Whole {
    pub inputs: Inputs,
    pub reply: Reply<RunOutput>,
    pub warmup: bool,
}

/// What the model's one queue carries to the batcher.
pub(crate) enum Message {
    Item(Item),
    Whole(Whole),
    /// From the model thread: nothing is waiting for it; it is ready for a batch.
    Ready,
}

/// What the batcher hands the model thread.
pub(crate) enum Job {
    /// Items and their collated batch (or why collation failed).
    Batch { items: Vec<Item>, collated: Result<Batch> },
    /// A whole batch, as given.
    Whole(Whole),
}

/// A batch of `items` failed with `error`. Alone, an item's error is its own; the items
/// of a shared batch are each run again alone (`run_alone`), so only the item that
/// causes the failure gets it. The one place a shared batch's failure is handled: the
/// model thread calls it when a batch fails to start, the responder when its outputs
/// fail on the device.
pub(crate) fn isolate(items: Vec<Item>, error: Error, mut run_alone: impl FnMut(Item)) {
    if items.len() == 1 {
        if let Some(item) = items.into_iter().next() {
            item.answer(Err(error));
        }
        return;
    }
    for item in items {
        run_alone(item);
    }
}
