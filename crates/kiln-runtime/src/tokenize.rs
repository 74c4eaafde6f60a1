//! The tokenizer pool: a fixed set of threads that turn texts into unpadded token rows.
//!
//! # Design
//!
//! Tokenizing is CPU work that must neither block the async runtime nor multiply into
//! hundreds of blocking tasks when a thousand callers arrive at once (each would get a
//! thread, and the threads would fight the model's own for the cores). So a pool of
//! `text.tokenizer_threads` threads (one per core by default) takes jobs from one
//! bounded channel — callers wait for room, which is back-pressure — and a call's texts
//! are cut into pieces so that one large call keeps every thread busy. Rows leave
//! unpadded: the batcher pads once, to the longest row of the batch it forms.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::thread::JoinHandle;

use kiln_core::{Error, Result};
use kiln_text::{TextPipeline, TokenRow};
use tokio::sync::oneshot;

/// Texts per job: small enough to spread a large call over every thread, large enough
/// that the channel is not the cost.
const PIECE: usize = 16;

struct Job {
    texts: Vec<String>,
    reply: oneshot::Sender<Result<Vec<TokenRow>>>,
}

/// Threads tokenizing for one text pipeline.
pub struct TokenizerPool {
    jobs: Option<flume::Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
}

impl TokenizerPool {
    /// Starts `threads` threads (0: one per available core), each with its own copy of
    /// `pipeline`: shared, the tokenizer's internal caches are contended by every
    /// thread at once.
    pub fn start(pipeline: &TextPipeline, threads: usize) -> Result<Self> {
        let threads = if threads == 0 {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        } else {
            threads
        };
        let (jobs, inbox) = flume::bounded::<Job>(threads * 4);
        let handles = (0..threads)
            .map(|i| {
                let (pipeline, inbox) = (pipeline.clone(), inbox.clone());
                std::thread::Builder::new()
                    .name(format!("kiln-tokenize-{i}"))
                    .spawn(move || {
                        while let Ok(job) = inbox.recv() {
                            if job.reply.is_closed() {
                                continue; // the caller gave up
                            }
                            let rows = catch_unwind(AssertUnwindSafe(|| pipeline.encode_rows(&job.texts)))
                                .unwrap_or_else(|_| {
                                    Err(Error::InvalidInput("the tokenizer panicked on this text".into()))
                                });
                            let _ = job.reply.send(rows);
                        }
                    })
                    .map_err(|e| Error::io("starting a thread for", "the tokenizer pool", e))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(TokenizerPool { jobs: Some(jobs), threads: handles })
    }

    /// Threads in the pool.
    pub fn threads(&self) -> usize {
        self.threads.len()
    }

    /// Token rows of `texts`, in order.
    pub async fn encode(&self, texts: Vec<String>) -> Result<Vec<TokenRow>> {
        let jobs =
            self.jobs.as_ref().ok_or_else(|| Error::Shutdown("the tokenizer pool is stopped".into()))?;
        let stopped = || Error::Shutdown("the tokenizer pool has stopped".into());
        let mut answers = Vec::with_capacity(texts.len().div_ceil(PIECE));
        let mut texts = texts.into_iter().peekable();
        while texts.peek().is_some() {
            let piece: Vec<String> = texts.by_ref().take(PIECE).collect();
            let (reply, answer) = oneshot::channel();
            jobs.send_async(Job { texts: piece, reply }).await.map_err(|_| stopped())?;
            answers.push(answer);
        }
        let mut rows = Vec::new();
        for answer in answers {
            rows.extend(answer.await.map_err(|_| stopped())??);
        }
        Ok(rows)
    }
}

impl Drop for TokenizerPool {
    fn drop(&mut self) {
        // Closing the channel ends the threads after the jobs queued; they are not
        // joined here, since drop may run on an async worker thread.
        self.jobs.take();
        self.threads.clear();
    }
}
