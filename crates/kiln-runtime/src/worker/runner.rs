//! The model thread: runs what the batcher hands it and passes each started batch to
//! the responder.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_core::{Inputs, Model, Outputs, Profiler, Result};

use super::queue::{BatchStats, Item, Job, Message, RunOutput, isolate};
use super::responder::{Answer, Responder, guarded};
use crate::collate::{Batch, Buckets, collate};

/// The model thread: runs batches and starts their answers.
pub(super) struct Runner {
    /// The batcher's queue, for [`Message::Ready`].
    pub ready: flume::WeakSender<Message>,
    pub model: Arc<dyn Model>,
    pub provider: String,
    /// To the responder thread.
    pub answers: flume::Sender<Answer>,
    /// Only for re-collating a batch some of whose callers gave up; the batcher
    /// collates the rest.
    pub buckets: Buckets,
    pub stats: Arc<Mutex<BatchStats>>,
    pub profiler: Arc<dyn Profiler>,
}

impl Runner {
    pub fn serve(self, jobs: flume::Receiver<Job>) {
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
                    whole.reply.answer(result.map(|(outputs, elapsed)| RunOutput { outputs, elapsed }));
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

    /// What the responder thread does, for this thread to do itself when there is no
    /// responder thread.
    pub fn responder(&self) -> Responder {
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
            Err(e) => isolate(items, e, |item| {
                let collated = collate(&[&item.inputs], &self.buckets);
                self.run_items(vec![item], collated);
            }),
        }
    }
}
