//! One model on several devices (`model.gpu_ids`): each replica is a model worker with
//! its own queue and batcher, and every request goes to the replica whose queue is
//! shortest, so a busy or slower GPU gets fewer items. Ties rotate, so an idle set of
//! replicas is filled evenly.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use kiln_core::{Device, Result};
use serde::Serialize;

use crate::worker::{BatchStats, ModelWorker};

/// What one replica has done, for [`Stats::replicas`](crate::Stats::replicas).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ReplicaStats {
    /// Where it runs.
    pub device: Device,
    /// Model runs.
    pub batches: u64,
    /// Items (texts, images) it ran.
    pub rows: u64,
    /// Items in its queue now.
    pub queue_depth: usize,
}

/// The workers of one model, one per device.
pub struct Replicas {
    workers: Vec<Arc<ModelWorker>>,
    next: AtomicUsize,
}

impl Replicas {
    /// Replicas over `workers`; the first is the one whose info stands for the model.
    pub fn new(workers: Vec<Arc<ModelWorker>>) -> Result<Self> {
        if workers.is_empty() {
            return Err(kiln_core::Error::InvalidInput("a model needs at least one replica".into()));
        }
        Ok(Replicas { workers, next: AtomicUsize::new(0) })
    }

    /// The replica to send the next request to: shortest queue, ties in rotation.
    pub fn pick(&self) -> &Arc<ModelWorker> {
        let n = self.workers.len();
        if n == 1 {
            return &self.workers[0];
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let best =
            (0..n).map(|k| (start + k) % n).min_by_key(|&i| self.workers[i].queue_depth()).unwrap_or(start);
        &self.workers[best]
    }

    /// The first replica.
    pub fn first(&self) -> &Arc<ModelWorker> {
        &self.workers[0]
    }

    /// Every replica, the first first.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<ModelWorker>> {
        self.workers.iter()
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.workers.len()
    }

    /// Always false: there is at least one.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Warms every replica up ([`ModelWorker::warm_up`]: every batch shape its buckets
    /// make, `max_sequence` and `item` as there) and logs what each did.
    pub async fn warm_up(&self, max_sequence: Option<usize>, item: Option<&[usize]>) -> Result<()> {
        for replica in self.iter() {
            let warm = replica.warm_up(max_sequence, item).await?;
            let (name, device) = (&replica.info().name, replica.info().device);
            match &warm.skipped {
                Some(why) => tracing::info!("no warm-up of {name} on {device}: {why}"),
                None => tracing::info!(
                    "warmed up {} batch shapes of {name} on {device} in {:.2} s",
                    warm.shapes.len(),
                    warm.elapsed.as_secs_f64()
                ),
            }
        }
        Ok(())
    }

    /// Batch counters of all replicas together.
    pub fn batch_stats(&self) -> BatchStats {
        combined(&self.downgrade()).0
    }

    /// Weak handles, for stats readers that must not keep models alive.
    pub fn downgrade(&self) -> Vec<Weak<ModelWorker>> {
        self.workers.iter().map(Arc::downgrade).collect()
    }

    /// Releases every replica's worker.
    pub async fn release(self) {
        for worker in self.workers {
            ModelWorker::release(worker).await;
        }
    }
}

/// Batch counters of all replicas together, per-replica figures, and their queue depth.
pub(crate) fn combined(workers: &[Weak<ModelWorker>]) -> (BatchStats, Vec<ReplicaStats>, usize) {
    let mut total = BatchStats::default();
    let mut each = Vec::new();
    let mut depth = 0;
    for worker in workers.iter().filter_map(Weak::upgrade) {
        let s = worker.batch_stats();
        total.batches += s.batches;
        for (size, n) in &s.batch_sizes {
            *total.batch_sizes.entry(*size).or_default() += n;
        }
        let queue_depth = worker.queue_depth();
        depth += queue_depth;
        each.push(ReplicaStats {
            device: worker.info().device,
            batches: s.batches,
            rows: crate::worker::rows(&s.batch_sizes),
            queue_depth,
        });
    }
    (total, each, depth)
}
