//! The batcher thread: forms batches from the items of many callers and collates them.
//!
//! # Design
//!
//! It takes requests from the model's one bounded queue. Items (one request's
//! tensors, batch dim 1) wait until `max_batch_size` are queued or the oldest has
//! waited `max_wait`; then the oldest goes with the waiting items closest to it in
//! length (so short texts are not padded to a long one's length), as many as
//! `max_batch_size` and `max_batch_tokens` allow, and they are collated — the one
//! place a batch is padded. A batch closes only when the model thread says it is ready
//! for one ([`Message::Ready`], through the same queue): while the model is busy, the
//! batch that is due keeps gathering the items that arrive (up to `max_batch_size`),
//! rather than being frozen and waiting in a slot — under load, batches are fuller
//! and items wait less. It goes to the model thread through a one-slot channel. Whole
//! batches pass through in order.
//!
//! Fairness: items carry their request's id. When a request has more items waiting than
//! its share of a batch, the batch takes every waiting request's oldest item first and
//! no request past its share (see `take_batch`): a request of a few texts that arrives
//! behind one of hundreds runs in the next batch, not after all of them.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::Instant;

use kiln_core::{Error, Inputs, Profiler};

use super::queue::{BatchPolicy, Item, Job, Message};
use crate::collate::{Buckets, collate};

/// How often a batcher waiting for a busy model thread checks that it is still there.
const MODEL_CHECK: std::time::Duration = std::time::Duration::from_millis(100);

/// The batcher thread: forms and collates batches.
pub(crate) struct Batcher {
    pub policy: BatchPolicy,
    pub buckets: Buckets,
    pub profiler: Arc<dyn Profiler>,
}

impl Batcher {
    pub fn serve(self, inbox: flume::Receiver<Message>, jobs: flume::Sender<Job>) {
        let mut state = State { pending: Vec::new(), model_ready: false };
        loop {
            if state.pending.is_empty() {
                match inbox.recv() {
                    Ok(message) => {
                        if !self.accept(message, &mut state, &jobs) {
                            return;
                        }
                    }
                    Err(_) => return, // queue closed and drained; dropping `jobs` ends the model thread
                }
                continue;
            }
            // Gather until the batch is due — full, or the oldest item's deadline has
            // passed — and the model thread is ready for it.
            let deadline = state.pending[0].enqueued + self.policy.max_wait;
            loop {
                let due = state.pending.len() >= self.policy.max_batch_size || Instant::now() >= deadline;
                if due && state.model_ready {
                    break;
                }
                // Due and waiting for the model: look now and then whether the model
                // thread is still there, so its callers hear of it rather than time out.
                let until = if due { Instant::now() + MODEL_CHECK } else { deadline };
                let received = match inbox.recv_deadline(until) {
                    Ok(message) => Some(message),
                    Err(flume::RecvTimeoutError::Timeout) if due && jobs.is_disconnected() => return,
                    Err(flume::RecvTimeoutError::Timeout) => continue,
                    Err(flume::RecvTimeoutError::Disconnected) => None,
                };
                match received {
                    Some(message) => {
                        if !self.accept(message, &mut state, &jobs) {
                            return;
                        }
                    }
                    // Closed and drained: no word will come from the model thread.
                    None => state.model_ready = true,
                }
            }
            // Whatever else is already queued joins the pool the batch is chosen from —
            // all of it (the queue's capacity bounds it), so a small request that came
            // after a large one is seen and gets its share of this batch.
            while let Ok(message) = inbox.try_recv() {
                if !self.accept(message, &mut state, &jobs) {
                    return;
                }
            }
            state.pending.retain(|item| !item.reply.is_closed()); // callers that gave up
            if state.pending.is_empty() {
                continue;
            }
            let items = take_batch(
                &mut state.pending,
                self.policy.max_batch_size * 4,
                self.policy.max_batch_size,
                self.policy.max_batch_tokens,
            );
            let collated = {
                let _span = self.profiler.span("collate");
                // Guarded like the model: nothing an item carries may take the thread down.
                catch_unwind(AssertUnwindSafe(|| {
                    let inputs: Vec<&Inputs> = items.iter().map(|i| &i.inputs).collect();
                    collate(&inputs, &self.buckets)
                }))
                .unwrap_or_else(|p| {
                    Err(Error::backend(
                        "kiln",
                        format!("panicked while batching: {}", kiln_core::panic_message(&*p)),
                    ))
                })
            };
            state.model_ready = false;
            if jobs.send(Job::Batch { items, collated }).is_err() {
                return; // the model thread is gone
            }
        }
    }

    /// Adds an item to the pool, or passes a whole batch on; false when the model
    /// thread is gone.
    fn accept(&self, message: Message, state: &mut State, jobs: &flume::Sender<Job>) -> bool {
        match message {
            Message::Item(item) => {
                state.pending.push(item);
                true
            }
            Message::Whole(whole) => {
                if whole.reply.is_closed() {
                    return true;
                }
                state.model_ready = false;
                jobs.send(Job::Whole(whole)).is_ok()
            }
            Message::Ready => {
                state.model_ready = true;
                true
            }
        }
    }
}

/// What the batcher holds between messages.
struct State {
    /// Items not yet in a batch, oldest first.
    pending: Vec<Item>,
    /// The model thread said it is ready, and nothing was sent to it since.
    model_ready: bool,
}

/// Takes a batch from `pending` (oldest first): the oldest item and the others closest
/// to it in length among the oldest `window`, at most `max` items and, when
/// `max_tokens` > 0, at most `max_tokens` padded tokens (items × the longest length),
/// keeping the rest in arrival order. The oldest item always goes, even alone over the
/// token budget.
///
/// Fairness: when one request has more items waiting than its share of `max` (an equal
/// part for every waiting request), the batch first takes the waiting requests' items a
/// round at a time (each request's next oldest, none past its share), then fills by
/// length with whatever room is left — a small request behind a large one runs in this
/// batch, and the token budget cannot be spent by the large one alone. Without such a request (many single-text callers) batches
/// group by length as they always did.
fn take_batch(pending: &mut Vec<Item>, window: usize, max: usize, max_tokens: usize) -> Vec<Item> {
    let within_tokens =
        |count: usize, longest: usize| max_tokens == 0 || count * longest.max(1) <= max_tokens;
    if pending.len() <= max
        && within_tokens(pending.len(), pending.iter().map(|i| i.length).max().unwrap_or(0))
    {
        return std::mem::take(pending);
    }
    // Each waiting request's items, oldest first, in the order the requests came.
    let mut index: std::collections::HashMap<u64, usize> = std::collections::HashMap::new();
    let mut requests: Vec<Vec<usize>> = Vec::new();
    for (i, item) in pending.iter().enumerate() {
        let r = *index.entry(item.request).or_insert_with(|| {
            requests.push(Vec::new());
            requests.len() - 1
        });
        requests[r].push(i);
    }
    let share = max.div_ceil(requests.len());
    let crowded = requests.len() > 1 && requests.iter().any(|items| items.len() > share);
    let of = |i: usize| index[&pending[i].request];

    let anchor = pending[0].length;
    let mut chosen = vec![false; pending.len()];
    let mut taken = vec![0usize; requests.len()];
    chosen[0] = true;
    taken[0] = 1;
    let (mut count, mut longest) = (1, anchor);
    let mut take =
        |i: usize, capped: bool, count: &mut usize, longest: &mut usize, taken: &mut Vec<usize>| {
            let with = (*longest).max(pending[i].length);
            if chosen[i] || *count == max || !within_tokens(*count + 1, with) {
                return;
            }
            if capped && taken[of(i)] >= share {
                return;
            }
            chosen[i] = true;
            taken[of(i)] += 1;
            *count += 1;
            *longest = with;
        };
    if crowded {
        // A round at a time, each request's next oldest item, until each has its share
        // (so the token budget is shared too, not spent by the first request).
        let mut next = vec![0usize; requests.len()];
        loop {
            let mut left = false;
            for (r, items) in requests.iter().enumerate() {
                if let Some(&i) = items.get(next[r])
                    && taken[r] < share
                {
                    next[r] += 1;
                    left = true;
                    take(i, true, &mut count, &mut longest, &mut taken);
                }
            }
            if count == max || !left {
                break;
            }
        }
    }
    // Then by length, as many as there is room for (crowded, from every item: a small
    // request's may sit behind the window).
    let reach = if crowded { pending.len() } else { pending.len().min(window.max(max)) };
    let mut order: Vec<usize> = (1..reach).collect();
    order.sort_by_key(|&i| (pending[i].length.abs_diff(anchor), i));
    for &i in &order {
        if count == max {
            break;
        }
        // Items further out are no shorter than this one's distance allows; a shorter
        // one may still fit the token budget, so keep looking.
        take(i, false, &mut count, &mut longest, &mut taken);
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
    use tokio::sync::oneshot;

    use super::super::queue::Reply;
    use super::*;

    /// Items of these lengths, as waiting in the pool, all of one request.
    fn waiting(lengths: &[usize]) -> Vec<Item> {
        lengths.iter().map(|&length| item(1, length)).collect()
    }

    fn item(request: u64, length: usize) -> Item {
        Item {
            request,
            inputs: Inputs::new(),
            length,
            enqueued: Instant::now(),
            reply: Reply::new(oneshot::channel().0, None),
        }
    }

    /// A request of 3 items behind one of 40: the next batch of 8 takes all 3 (its share
    /// is 4), and the large request's oldest items with them; under a token budget the
    /// small request still gets its items in.
    #[test]
    fn a_small_request_behind_a_large_one_runs_in_the_next_batch() {
        let mut pending: Vec<Item> = (0..40).map(|_| item(1, 50)).chain((0..3).map(|_| item(2, 5))).collect();
        let batch = take_batch(&mut pending, 32, 8, 0);
        assert_eq!(batch.len(), 8);
        assert_eq!(batch.iter().filter(|i| i.request == 2).count(), 3, "the small request's items all ran");
        assert_eq!(pending.len(), 35);
        assert!(pending.iter().all(|i| i.request == 1));
        let mut pending: Vec<Item> =
            (0..40).map(|_| item(1, 256)).chain((0..3).map(|_| item(2, 5))).collect();
        let batch = take_batch(&mut pending, 32, 32, 2048);
        assert_eq!(batch.iter().filter(|i| i.request == 2).count(), 3, "within the token budget too");
        assert!(batch.len() * 256 <= 2048);
        // Alone, a request's batches are the nearest lengths, as before.
        let mut alone = waiting(&[50, 3, 48, 4, 51, 5]);
        let batch = take_batch(&mut alone, 12, 3, 0);
        assert_eq!(batch.iter().map(|i| i.length).collect::<Vec<_>>(), vec![50, 48, 51]);
    }

    #[test]
    fn a_batch_is_the_oldest_item_and_its_nearest_lengths() {
        let mut pending = waiting(&[50, 3, 48, 4, 51, 5]);
        let batch = take_batch(&mut pending, 12, 3, 0);
        assert_eq!(batch.iter().map(|i| i.length).collect::<Vec<_>>(), vec![50, 48, 51]);
        assert_eq!(pending.iter().map(|i| i.length).collect::<Vec<_>>(), vec![3, 4, 5]);
    }

    #[test]
    fn the_token_budget_bounds_padded_tokens_but_the_oldest_always_runs() {
        // 100 tokens: 50 + 48 pads to 2 × 50; a third (51) would make 153.
        let mut pending = waiting(&[50, 3, 48, 4, 51, 5]);
        let batch = take_batch(&mut pending, 32, 8, 100);
        assert_eq!(batch.iter().map(|i| i.length).collect::<Vec<_>>(), vec![50, 48]);
        // Short texts fill a batch the long ones could not.
        let batch = take_batch(&mut pending, 32, 8, 100);
        assert_eq!(batch.iter().map(|i| i.length).collect::<Vec<_>>(), vec![3, 4, 5]);
        let batch = take_batch(&mut pending, 32, 8, 100);
        assert_eq!(batch.iter().map(|i| i.length).collect::<Vec<_>>(), vec![51]);
        // One item over the budget still runs, alone.
        let mut pending = waiting(&[500, 2]);
        assert_eq!(take_batch(&mut pending, 32, 8, 100).len(), 1);
        assert_eq!(pending.len(), 1);
    }
}
