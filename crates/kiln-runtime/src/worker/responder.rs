//! The responder thread: waits for each started batch's outputs, splits them into each
//! item's rows and answers the callers, so the model thread is free for the next batch
//! as soon as it has started this one.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::Instant;

use kiln_core::{Error, Model, Outputs, Pending, Profiler, Result, panic_message};

use super::queue::{Item, ItemOutput, isolate};
use crate::collate::{Buckets, collate, split};

/// `f`, with a panic turned into the provider's error: nothing a backend does may take
/// a worker thread down.
pub(super) fn guarded<T>(provider: &str, doing: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| {
        Err(Error::backend(provider, format!("panicked while {doing}: {}", panic_message(&*p))))
    })
}

/// A started batch on its way back to its callers.
pub(super) struct Answer {
    pub items: Vec<Item>,
    pub pending: Pending,
    /// The batch's padded sequence length and rows, for splitting its outputs.
    pub sequence: usize,
    pub rows: usize,
    /// When the batch's run started.
    pub started: Instant,
}

/// The responder thread: waits for each started batch's outputs and answers its callers.
pub(super) struct Responder {
    pub model: Arc<dyn Model>,
    pub provider: String,
    /// For re-running the items of a batch that failed on the device, one by one.
    pub buckets: Buckets,
    pub profiler: Arc<dyn Profiler>,
}

impl Responder {
    pub fn serve(self, answers: flume::Receiver<Answer>) {
        while let Ok(answer) = answers.recv() {
            self.answer(answer);
        }
    }

    /// Waits for the outputs (span `device_wait`) and answers every caller; a shared
    /// batch whose outputs failed is run again item by item, so only the culprit fails.
    pub fn answer(&self, answer: Answer) {
        let Answer { items, pending, sequence, rows, started } = answer;
        let span = self.profiler.span("device_wait");
        let outputs = guarded(&self.provider, "waiting for a batch", || pending.wait());
        drop(span);
        match outputs {
            Ok(outputs) => self.deliver(items, &outputs, (sequence, rows), started),
            Err(e) => isolate(items, e, |item| self.run_alone(item)),
        }
    }

    /// One item of a batch that failed on the device, run again on its own, here.
    fn run_alone(&self, item: Item) {
        let started = Instant::now();
        let ran = collate(&[&item.inputs], &self.buckets).and_then(|batch| {
            let _span = self.profiler.span("model_run");
            let outputs = guarded(&self.provider, "running", || self.model.run(&batch.inputs))?;
            Ok((batch, outputs))
        });
        match ran {
            Ok((batch, outputs)) => self.deliver(vec![item], &outputs, (batch.sequence, batch.rows), started),
            Err(e) => item.answer(Err(e)),
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
