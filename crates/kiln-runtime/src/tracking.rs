//! [`TrackerHub`]: drives the configured trackers from a thread of their own.
//!
//! Inference never waits on a tracker: every `tracking.interval_ms` the hub's thread
//! takes a metrics snapshot and hands it to each tracker; file and network I/O happen
//! there. A tracker that fails — an unwritable folder, a full disk, a panic — is
//! warned about once, its failures are counted (`Stats::tracker_failures`), and it
//! keeps being offered later events, so it recovers when the disk does.

use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kiln_core::{Metrics, ProfileReport, Result, Tracker};

/// How often trackers get [`Tracker::tick`] between steps.
const TICK: Duration = Duration::from_millis(250);

/// Produces the metrics of the next step (called on the hub's thread).
pub type MetricsSource = Box<dyn FnMut() -> Metrics + Send>;

/// Failures per tracker kind, shared with the optimizer's stats.
pub type TrackerFailures = Arc<Mutex<BTreeMap<String, u64>>>;

enum Command {
    Finish { summary: Metrics, profile: Option<Box<ProfileReport>>, done: flume::Sender<()> },
}

/// The running tracker thread; [`finish`](Self::finish) logs the summary and ends it.
pub struct TrackerHub {
    commands: Option<flume::Sender<Command>>,
    thread: Option<JoinHandle<()>>,
    failures: TrackerFailures,
}

/// One tracker with its failure accounting. It is a [`Tracker`] whose calls never
/// fail, so the hub drives all of them as one `Vec<Guarded>` through kiln-core's fan-out
/// (`impl Tracker for Vec<T>`): one fan-out, not a loop per event here.
struct Guarded {
    kind: String,
    index: usize,
    tracker: Box<dyn Tracker>,
    warned: bool,
    failures: TrackerFailures,
}

impl Guarded {
    fn call(&mut self, what: &str, f: impl FnOnce(&mut dyn Tracker) -> Result<()>) {
        let result = catch_unwind(AssertUnwindSafe(|| f(&mut *self.tracker))).unwrap_or_else(|p| {
            let why = kiln_core::panic_message(&*p);
            Err(kiln_core::Error::backend(&self.kind, format!("the tracker panicked: {why}")))
        });
        if let Err(e) = result {
            *self.failures.lock().unwrap_or_else(|p| p.into_inner()).entry(self.kind.clone()).or_default() +=
                1;
            if !self.warned {
                self.warned = true;
                tracing::warn!(
                    "tracker `{}` (trackers[{}]) failed to {what}: {e}; inference goes on, and its further \
                     failures are counted in stats (tracker_failures)",
                    self.kind,
                    self.index
                );
            }
        }
    }
}

impl Tracker for Guarded {
    fn log_config(&mut self, config: &serde_json::Value) -> Result<()> {
        self.call("log the config", |t| t.log_config(config));
        Ok(())
    }
    fn log_metrics(&mut self, step: u64, metrics: &Metrics) -> Result<()> {
        self.call("log metrics", |t| t.log_metrics(step, metrics));
        Ok(())
    }
    fn log_summary(&mut self, summary: &Metrics) -> Result<()> {
        self.call("log the summary", |t| t.log_summary(summary));
        Ok(())
    }
    fn log_profile(&mut self, report: &ProfileReport) -> Result<()> {
        self.call("log the profile", |t| t.log_profile(report));
        Ok(())
    }
    fn flush(&mut self) -> Result<()> {
        self.call("flush", |t| t.flush());
        Ok(())
    }
    fn tick(&mut self) -> Result<()> {
        self.call("flush", |t| t.tick());
        Ok(())
    }
    fn finish(&mut self) -> Result<()> {
        self.call("finish", |t| t.finish());
        Ok(())
    }
}

impl TrackerHub {
    /// Starts the thread: logs `config` once, then a metrics step every `interval`, and
    /// calls every tracker's `tick` at least every 250 ms.
    /// Each tracker comes with its kind, which names it in warnings and in `failures`,
    /// where its failed calls are counted.
    pub fn start(
        trackers: Vec<(String, Box<dyn Tracker>)>,
        config: serde_json::Value,
        interval: Duration,
        mut metrics: MetricsSource,
        failures: TrackerFailures,
    ) -> Result<Self> {
        let mut guarded: Vec<Guarded> = trackers
            .into_iter()
            .enumerate()
            .map(|(index, (kind, tracker))| Guarded {
                kind,
                index,
                tracker,
                warned: false,
                failures: failures.clone(),
            })
            .collect();
        let (commands, inbox) = flume::unbounded::<Command>();
        let thread = std::thread::Builder::new()
            .name("kiln-trackers".into())
            .spawn(move || {
                // Guarded calls never fail: the results below are always Ok.
                let _ = guarded.log_config(&config);
                let mut step = 0u64;
                let mut log_step = |guarded: &mut Vec<Guarded>, metrics: &mut MetricsSource| {
                    step += 1;
                    let _ = guarded.log_metrics(step, &metrics());
                };
                let mut next_step = Instant::now() + interval;
                loop {
                    // Wake at each step and at least every TICK, so trackers can flush
                    // on their own interval between steps.
                    let wake = next_step.min(Instant::now() + TICK);
                    match inbox.recv_deadline(wake) {
                        Err(flume::RecvTimeoutError::Timeout) => {
                            if Instant::now() >= next_step {
                                log_step(&mut guarded, &mut metrics);
                                next_step += interval;
                                if next_step < Instant::now() {
                                    next_step = Instant::now() + interval; // fell behind: skip, don't burst
                                }
                            }
                            let _ = guarded.tick();
                        }
                        Ok(Command::Finish { summary, profile, done }) => {
                            // A last step, so even a run shorter than the interval has one.
                            log_step(&mut guarded, &mut metrics);
                            let _ = guarded.log_summary(&summary);
                            if let Some(p) = &profile {
                                let _ = guarded.log_profile(p);
                            }
                            let _ = guarded.finish();
                            let _ = done.send(());
                            return;
                        }
                        Err(flume::RecvTimeoutError::Disconnected) => {
                            // Dropped without finish: still leave files complete.
                            let _ = guarded.finish();
                            return;
                        }
                    }
                }
            })
            .map_err(|e| kiln_core::Error::io("starting a thread for", "the trackers", e))?;
        Ok(TrackerHub { commands: Some(commands), thread: Some(thread), failures })
    }

    /// Failures per tracker kind so far.
    pub fn failures(&self) -> TrackerFailures {
        self.failures.clone()
    }

    /// Logs a last metrics step, the summary and the profile, finishes every tracker
    /// and waits for the thread (on a blocking task, so the async runtime keeps going).
    pub async fn finish(mut self, summary: Metrics, profile: Option<ProfileReport>) {
        let (done, finished) = flume::bounded(1);
        if let Some(commands) = self.commands.take() {
            let _ = commands.send(Command::Finish { summary, profile: profile.map(Box::new), done });
            let _ = finished.recv_async().await;
        }
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

impl Drop for TrackerHub {
    fn drop(&mut self) {
        // Closing the channel makes the thread finish its trackers and exit; not joined
        // here, since drop may run on an async worker thread.
        self.commands.take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fault injection: a tracker whose writes fail (as on a full disk) or panic.
    struct Broken {
        panics: bool,
    }
    impl Tracker for Broken {
        fn log_metrics(&mut self, _: u64, _: &Metrics) -> Result<()> {
            if self.panics {
                panic!("fault injected");
            }
            Err(kiln_core::Error::io("writing", "/full", std::io::Error::other("No space left on device")))
        }
    }

    #[derive(Clone, Default)]
    struct Steps(Arc<Mutex<Vec<u64>>>);
    impl Tracker for Steps {
        fn log_metrics(&mut self, step: u64, _: &Metrics) -> Result<()> {
            self.0.lock().unwrap().push(step);
            Ok(())
        }
    }

    #[tokio::test]
    async fn failing_trackers_are_counted_and_the_others_go_on() {
        let steps = Steps::default();
        let hub = TrackerHub::start(
            vec![
                ("broken".into(), Box::new(Broken { panics: false })),
                ("panicky".into(), Box::new(Broken { panics: true })),
                ("steps".into(), Box::new(steps.clone())),
            ],
            serde_json::json!({}),
            Duration::from_millis(10),
            Box::new(Metrics::new),
            TrackerFailures::default(),
        )
        .unwrap();
        // Panics print backtraces, which can be slow: wait for steps, not for a time.
        for _ in 0..500 {
            if steps.0.lock().unwrap().len() >= 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let failures = hub.failures();
        hub.finish(Metrics::new(), None).await;
        let steps = steps.0.lock().unwrap().clone();
        assert!(steps.len() >= 3, "{steps:?}");
        assert!(steps.windows(2).all(|w| w[1] == w[0] + 1), "steps count up: {steps:?}");
        let failures = failures.lock().unwrap().clone();
        assert_eq!(failures["broken"], steps.len() as u64);
        assert_eq!(failures["panicky"], steps.len() as u64);
    }
}
