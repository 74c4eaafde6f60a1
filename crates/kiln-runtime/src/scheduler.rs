//! The scheduler: a concurrency limit, a deadline and retries around each request.
//!
//! A request first takes a slot (at most `max_concurrent` run at once), then runs with
//! retries — exponential backoff from `backoff_ms`, doubling, with random jitter — for
//! errors the provider marks retryable ([`Error::is_retryable`]) and no others. The
//! deadline covers all of it, waiting for a slot included; when it passes, the request's
//! future is dropped, which drops its places in the model queue, and the worker skips
//! work whose caller is gone. A caller that drops its request cancels it the same way.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use kiln_core::{Error, Result, SchedulerConfig};
use tokio::sync::Semaphore;

/// Concurrency limit, deadline and retry policy for requests.
pub struct Scheduler {
    slots: Semaphore,
    timeout: Option<Duration>,
    backoff: ExponentialBuilder,
    retries: AtomicU64,
    timeouts: AtomicU64,
}

impl Scheduler {
    /// A scheduler as `config` describes.
    pub fn new(config: &SchedulerConfig) -> Self {
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(config.backoff_ms))
            .with_max_delay(Duration::from_millis(config.backoff_ms.max(1) * 64))
            .with_max_times(config.retries)
            .with_jitter();
        Scheduler {
            slots: Semaphore::new(config.max_concurrent),
            timeout: (config.timeout_ms > 0).then(|| Duration::from_millis(config.timeout_ms)),
            backoff,
            retries: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
        }
    }

    /// Runs `attempt` under the policy; `attempt` is called again for each retry.
    pub async fn call<T, F, Fut>(&self, attempt: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let run = async {
            let _slot =
                self.slots.acquire().await.map_err(|_| Error::Shutdown("the scheduler is closed".into()))?;
            attempt
                .retry(self.backoff)
                .sleep(tokio::time::sleep)
                .when(Error::is_retryable)
                .notify(|_, _| {
                    self.retries.fetch_add(1, Ordering::Relaxed);
                })
                .await
        };
        match self.timeout {
            None => run.await,
            Some(limit) => tokio::time::timeout(limit, run).await.unwrap_or_else(|_| {
                self.timeouts.fetch_add(1, Ordering::Relaxed);
                Err(Error::Timeout { after_ms: limit.as_millis() as u64, setting: "scheduler.timeout_ms" })
            }),
        }
    }

    /// Retries made so far.
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    /// Requests that passed their deadline so far.
    pub fn timeouts(&self) -> u64 {
        self.timeouts.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn config(retries: usize, timeout_ms: u64) -> SchedulerConfig {
        SchedulerConfig {
            max_concurrent: 4,
            timeout_ms,
            retries,
            backoff_ms: 1,
            ..SchedulerConfig::default()
        }
    }

    /// Fault injection: fails `failures` times with an error of the given retryability.
    async fn flaky(calls: &AtomicUsize, failures: usize, retryable: bool) -> Result<usize> {
        let n = calls.fetch_add(1, Ordering::Relaxed);
        if n < failures {
            Err(Error::Backend { provider: "test".into(), retryable, source: "fault injected".into() })
        } else {
            Ok(n)
        }
    }

    #[tokio::test]
    async fn retryable_errors_are_retried_up_to_the_limit() {
        let s = Scheduler::new(&config(3, 0));
        let calls = AtomicUsize::new(0);
        assert_eq!(s.call(|| flaky(&calls, 2, true)).await.unwrap(), 2);
        assert_eq!(s.retries(), 2);

        let calls = AtomicUsize::new(0);
        assert!(s.call(|| flaky(&calls, 10, true)).await.is_err());
        assert_eq!(calls.load(Ordering::Relaxed), 4, "first attempt + 3 retries");
    }

    #[tokio::test]
    async fn other_errors_are_not_retried() {
        let s = Scheduler::new(&config(3, 0));
        let calls = AtomicUsize::new(0);
        assert!(s.call(|| flaky(&calls, 1, false)).await.is_err());
        assert_eq!((calls.load(Ordering::Relaxed), s.retries()), (1, 0));
    }

    #[tokio::test]
    async fn the_deadline_fires_and_counts() {
        let s = Scheduler::new(&config(0, 20));
        let err = s
            .call(|| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                Ok(())
            })
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Timeout { after_ms: 20, .. }), "{err}");
        assert_eq!(s.timeouts(), 1);
        assert!(s.call(|| async { Ok(1) }).await.is_ok(), "the scheduler keeps serving");
    }

    #[tokio::test]
    async fn at_most_max_concurrent_run_at_once() {
        let s = std::sync::Arc::new(Scheduler::new(&config(0, 0)));
        let (now, peak) =
            (std::sync::Arc::new(AtomicUsize::new(0)), std::sync::Arc::new(AtomicUsize::new(0)));
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let (s, now, peak) = (s.clone(), now.clone(), peak.clone());
                tokio::spawn(async move {
                    s.call(|| async {
                        let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                        peak.fetch_max(n, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        now.fetch_sub(1, Ordering::SeqCst);
                        Ok(())
                    })
                    .await
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(peak.load(Ordering::SeqCst), 4);
    }
}
