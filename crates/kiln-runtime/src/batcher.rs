//! The batcher thread: forms batches from the items of many callers and collates them.
//!
//! # Design
//!
//! It takes requests from the model's one bounded queue. Items (one request's
//! tensors, batch dim 1) wait until `max_batch_size` are queued or the oldest has
//! waited `max_wait`; then the oldest goes with the waiting items closest to it in
//! length (so short texts are not padded to a long one's length), as many as
//! `max_batch_size` and `max_batch_tokens` allow, and they are collated — the one
//! place a batch is padded. The batch goes to the model thread through a one-slot
//! channel, so it is formed while the previous batch runs. Whole batches pass through
//! in order.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::Instant;

use kiln_core::{Error, Inputs, Profiler, Result};
use tokio::sync::{OwnedSemaphorePermit, oneshot};

use crate::collate::{Batch, Buckets, collate};
use crate::worker::{BatchPolicy, ItemOutput, RunOutput, panic_message};

pub(crate) struct Item {
    pub inputs: Inputs,
    pub length: usize,
    pub enqueued: Instant,
    pub reply: oneshot::Sender<Result<ItemOutput>>,
    /// Its place under `queue_capacity`, given back when the item is dropped.
    pub _slot: Option<OwnedSemaphorePermit>,
}

pub(crate) enum Message {
    Item(Item),
    Whole(Whole),
}

/// A whole batch, run as given; a warm-up run is neither counted nor timed as a
/// `model_run`.
pub(crate) struct Whole {
    pub inputs: Inputs,
    pub reply: oneshot::Sender<Result<RunOutput>>,
    pub warmup: bool,
    pub _slot: OwnedSemaphorePermit,
}

/// What the batcher hands the model thread.
pub(crate) enum Job {
    /// Items and their collated batch (or why collation failed).
    Batch { items: Vec<Item>, collated: Result<Batch> },
    /// A whole batch, as given.
    Whole(Whole),
}

/// The batcher thread: forms and collates batches.
pub(crate) struct Batcher {
    pub policy: BatchPolicy,
    pub buckets: Buckets,
    pub profiler: Arc<dyn Profiler>,
}

impl Batcher {
    pub fn serve(self, inbox: flume::Receiver<Message>, jobs: flume::Sender<Job>) {
        let mut pending: Vec<Item> = Vec::new();
        loop {
            if pending.is_empty() {
                match inbox.recv() {
                    Ok(message) => {
                        if !self.accept(message, &mut pending, &jobs) {
                            return;
                        }
                    }
                    Err(_) => return, // queue closed and drained; dropping `jobs` ends the model thread
                }
                continue;
            }
            // Wait for a full batch or for the oldest item's deadline.
            let deadline = pending[0].enqueued + self.policy.max_wait;
            while pending.len() < self.policy.max_batch_size {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                match inbox.recv_timeout(deadline - now) {
                    Ok(message) => {
                        if !self.accept(message, &mut pending, &jobs) {
                            return;
                        }
                    }
                    Err(_) => break, // timed out, or closed: run what is pending
                }
            }
            // Whatever else is already queued joins the pool the batch is chosen from.
            let window = self.policy.max_batch_size * 4;
            while pending.len() < window {
                match inbox.try_recv() {
                    Ok(message) => {
                        if !self.accept(message, &mut pending, &jobs) {
                            return;
                        }
                    }
                    Err(_) => break,
                }
            }
            pending.retain(|item| !item.reply.is_closed()); // callers that gave up
            if pending.is_empty() {
                continue;
            }
            let items = take_batch(&mut pending, self.policy.max_batch_size, self.policy.max_batch_tokens);
            let collated = {
                let _span = self.profiler.span("collate");
                // Guarded like the model: nothing an item carries may take the thread down.
                catch_unwind(AssertUnwindSafe(|| {
                    let inputs: Vec<&Inputs> = items.iter().map(|i| &i.inputs).collect();
                    collate(&inputs, &self.buckets)
                }))
                .unwrap_or_else(|p| {
                    Err(Error::backend("kiln", format!("panicked while batching: {}", panic_message(p))))
                })
            };
            if jobs.send(Job::Batch { items, collated }).is_err() {
                return; // the model thread is gone
            }
        }
    }

    /// Adds an item to the pool, or passes a whole batch on; false when the model
    /// thread is gone.
    fn accept(&self, message: Message, pending: &mut Vec<Item>, jobs: &flume::Sender<Job>) -> bool {
        match message {
            Message::Item(item) => {
                pending.push(item);
                true
            }
            Message::Whole(whole) => {
                if whole.reply.is_closed() {
                    return true;
                }
                jobs.send(Job::Whole(whole)).is_ok()
            }
        }
    }
}

/// Takes the oldest item and the others closest to it in length — at most `max` items
/// and, when `max_tokens` > 0, at most `max_tokens` padded tokens (items × the longest
/// length) — keeping the rest in arrival order. The oldest item always goes, even
/// alone over the token budget.
fn take_batch(pending: &mut Vec<Item>, max: usize, max_tokens: usize) -> Vec<Item> {
    let within_tokens =
        |count: usize, longest: usize| max_tokens == 0 || count * longest.max(1) <= max_tokens;
    if pending.len() <= max
        && within_tokens(pending.len(), pending.iter().map(|i| i.length).max().unwrap_or(0))
    {
        return std::mem::take(pending);
    }
    let anchor = pending[0].length;
    let mut order: Vec<usize> = (1..pending.len()).collect();
    order.sort_by_key(|&i| (pending[i].length.abs_diff(anchor), i));
    let mut chosen = vec![false; pending.len()];
    chosen[0] = true;
    let (mut count, mut longest) = (1, anchor);
    for &i in &order {
        if count == max {
            break;
        }
        let with = longest.max(pending[i].length);
        if !within_tokens(count + 1, with) {
            // Items further out are no shorter than this one's distance allows; a
            // shorter one may still fit, so keep looking.
            continue;
        }
        chosen[i] = true;
        count += 1;
        longest = with;
    }
    let mut batch = Vec::with_capacity(count);
    let mut rest = Vec::with_capacity(pending.len() - count);
    for (item, take) in std::mem::take(pending).into_iter().zip(chosen) {
        if take { batch.push(item) } else { rest.push(item) }
    }
    *pending = rest;
    batch
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Items of these lengths, as waiting in the pool.
    fn waiting(lengths: &[usize]) -> Vec<Item> {
        lengths
            .iter()
            .map(|&length| Item {
                inputs: Inputs::new(),
                length,
                enqueued: Instant::now(),
                reply: oneshot::channel().0,
                _slot: None,
            })
            .collect()
    }

    #[test]
    fn a_batch_is_the_oldest_item_and_its_nearest_lengths() {
        let mut pending = waiting(&[50, 3, 48, 4, 51, 5]);
        let batch = take_batch(&mut pending, 3, 0);
        assert_eq!(batch.iter().map(|i| i.length).collect::<Vec<_>>(), vec![50, 48, 51]);
        assert_eq!(pending.iter().map(|i| i.length).collect::<Vec<_>>(), vec![3, 4, 5]);
    }

    #[test]
    fn the_token_budget_bounds_padded_tokens_but_the_oldest_always_runs() {
        // 100 tokens: 50 + 48 pads to 2 × 50; a third (51) would make 153.
        let mut pending = waiting(&[50, 3, 48, 4, 51, 5]);
        let batch = take_batch(&mut pending, 8, 100);
        assert_eq!(batch.iter().map(|i| i.length).collect::<Vec<_>>(), vec![50, 48]);
        // Short texts fill a batch the long ones could not.
        let batch = take_batch(&mut pending, 8, 100);
        assert_eq!(batch.iter().map(|i| i.length).collect::<Vec<_>>(), vec![3, 4, 5]);
        let batch = take_batch(&mut pending, 8, 100);
        assert_eq!(batch.iter().map(|i| i.length).collect::<Vec<_>>(), vec![51]);
        // One item over the budget still runs, alone.
        let mut pending = waiting(&[500, 2]);
        assert_eq!(take_batch(&mut pending, 8, 100).len(), 1);
        assert_eq!(pending.len(), 1);
    }
}
