//! One model on dedicated threads, with its batching queue.
//!
//! # Design
//!
//! Three threads serve a model, so that the device never waits for kiln. Read the
//! folder in the order a request goes through it:
//!
//! - [`queue`]: what travels — the [`BatchPolicy`], the messages on the model's one
//!   bounded queue (a caller's item, a whole batch, the model thread's "ready"), the
//!   jobs handed to the model thread, what callers get back, and the two rules every
//!   part follows: a caller's queue slot is given back before its answer is sent
//!   (`Reply::answer`), and a shared batch that fails is run again item by item so only
//!   the item that causes the failure gets it (`isolate`).
//! - [`batcher`]: the **batcher thread** forms and collates the next batch from the
//!   queue while the model is busy; a batch closes when the model thread says it is
//!   ready for one.
//! - [`runner`]: the **model thread** loads the model and runs what the batcher hands it
//!   through a one-slot channel — while batch N runs, batch N+1 is formed. It *starts* a
//!   batch ([`Model::start`](kiln_core::Model::start)): a GPU provider returns once the
//!   batch's work is queued on the device, so batch N+1's copies and kernels are queued
//!   while batch N still runs and the device does not idle between batches (at most
//!   three batches are between the model thread and the callers: one started, one
//!   handed over, one being answered).
//! - [`responder`]: the **responder thread** waits for batch N-1's outputs, splits them
//!   and answers its callers.
//! - [`handle`]: [`ModelWorker`], what callers hold: it starts the threads, loads the
//!   model and puts items and whole batches on the queue; [`warmup`] runs every batch
//!   shape before the first request.
//!
//! The batch limits are the configured policy capped by the model's own
//! [`ModelInfo::max_batch_size`](kiln_core::ModelInfo::max_batch_size). Batches are
//! rounded up to the policy's [`Buckets`](crate::collate::Buckets). Whole batches
//! (`infer`, embedding with batching off) pass through the same threads, in order, and
//! run as given. Every run is timed where it happens. A panic inside a backend is caught
//! and becomes that batch's error; a batch whose outputs fail on the device (in
//! [`Pending::wait`](kiln_core::Pending::wait)) is retried item by item by the
//! responder, as one that fails to start is by the model thread. Every thread keeps
//! serving.

mod batcher;
mod handle;
mod queue;
mod responder;
mod runner;
mod warmup;

pub use handle::ModelWorker;
pub use queue::{BatchPolicy, BatchStats, ItemOutput, RunOutput, rows};
pub use warmup::WarmUp;

#[cfg(test)]
mod tests;
