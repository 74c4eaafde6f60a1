//! The [`Tracker`] trait: where a run's numbers go (stdout, files, W&B, ...).
//!
//! # Design
//!
//! Like a `tracing` layer, a tracker is a sink with every hook defaulting to a no-op, so
//! a tracker implements only what it needs. Hooks take `&mut self`: the runtime drives
//! trackers from one background task, so they need no locking of their own, and they
//! are `Send` to move there. Hooks return `Result`, but the runtime treats a failure
//! as a warning and a counter — a tracker never fails inference.
//!
//! `Vec<T>`, `Box<T>` and `Option<T>` of trackers are trackers, so a set chosen in a
//! config at run time is one value: `Vec<Box<dyn Tracker>>` fans each call out to all
//! of them, and one failing member does not stop the others.

use std::collections::BTreeMap;

use crate::config::TrackerConfig;
use crate::error::Result;
use crate::registry::{Registration, Registry};

/// Named scalar metrics at one step.
pub type Metrics = BTreeMap<String, f64>;

/// A sink for a run's config, periodic metrics and final summary.
///
/// ```
/// use kiln_core::{Metrics, Result, Tracker};
///
/// /// Counts the metric rows it was given.
/// #[derive(Default)]
/// struct Rows(u64);
/// impl Tracker for Rows {
///     fn log_metrics(&mut self, _step: u64, _metrics: &Metrics) -> Result<()> {
///         self.0 += 1;
///         Ok(())
///     }
/// }
///
/// let mut trackers: Vec<Box<dyn Tracker>> = vec![Box::new(Rows::default()), Box::new(Rows::default())];
/// trackers.log_metrics(1, &Metrics::from([("throughput_rps".to_string(), 812.0)]))?;
/// trackers.finish()?; // every hook but log_metrics kept its no-op default
/// # Ok::<(), kiln_core::Error>(())
/// ```
pub trait Tracker: Send + 'static {
    /// The run's resolved config, once at start.
    fn log_config(&mut self, _config: &serde_json::Value) -> Result<()> {
        Ok(())
    }
    /// Metrics at `step` (an interval counter, monotonically increasing).
    fn log_metrics(&mut self, _step: u64, _metrics: &Metrics) -> Result<()> {
        Ok(())
    }
    /// Final figures, once at the end.
    fn log_summary(&mut self, _summary: &Metrics) -> Result<()> {
        Ok(())
    }
    /// Writes out anything buffered.
    fn flush(&mut self) -> Result<()> {
        Ok(())
    }
    /// Ends the run; flushes by default.
    fn finish(&mut self) -> Result<()> {
        self.flush()
    }
}

impl<T: Tracker + ?Sized> Tracker for Box<T> {
    fn log_config(&mut self, config: &serde_json::Value) -> Result<()> {
        (**self).log_config(config)
    }
    fn log_metrics(&mut self, step: u64, metrics: &Metrics) -> Result<()> {
        (**self).log_metrics(step, metrics)
    }
    fn log_summary(&mut self, summary: &Metrics) -> Result<()> {
        (**self).log_summary(summary)
    }
    fn flush(&mut self) -> Result<()> {
        (**self).flush()
    }
    fn finish(&mut self) -> Result<()> {
        (**self).finish()
    }
}

impl<T: Tracker> Tracker for Option<T> {
    fn log_config(&mut self, config: &serde_json::Value) -> Result<()> {
        self.as_mut().map_or(Ok(()), |t| t.log_config(config))
    }
    fn log_metrics(&mut self, step: u64, metrics: &Metrics) -> Result<()> {
        self.as_mut().map_or(Ok(()), |t| t.log_metrics(step, metrics))
    }
    fn log_summary(&mut self, summary: &Metrics) -> Result<()> {
        self.as_mut().map_or(Ok(()), |t| t.log_summary(summary))
    }
    fn flush(&mut self) -> Result<()> {
        self.as_mut().map_or(Ok(()), |t| t.flush())
    }
    fn finish(&mut self) -> Result<()> {
        self.as_mut().map_or(Ok(()), |t| t.finish())
    }
}

/// Calls `f` on every member; all are called, the first error is returned.
fn fan_out<T>(members: &mut [T], mut f: impl FnMut(&mut T) -> Result<()>) -> Result<()> {
    let mut first = Ok(());
    for member in members {
        let result = f(member);
        if first.is_ok() {
            first = result;
        }
    }
    first
}

impl<T: Tracker> Tracker for Vec<T> {
    fn log_config(&mut self, config: &serde_json::Value) -> Result<()> {
        fan_out(self, |t| t.log_config(config))
    }
    fn log_metrics(&mut self, step: u64, metrics: &Metrics) -> Result<()> {
        fan_out(self, |t| t.log_metrics(step, metrics))
    }
    fn log_summary(&mut self, summary: &Metrics) -> Result<()> {
        fan_out(self, |t| t.log_summary(summary))
    }
    fn flush(&mut self) -> Result<()> {
        fan_out(self, |t| t.flush())
    }
    fn finish(&mut self) -> Result<()> {
        fan_out(self, |t| t.finish())
    }
}

/// A tracker's entry in the registry: a kind name and a constructor.
#[derive(Debug)]
pub struct TrackerRegistration {
    /// Name used in configs (`[[trackers]] kind = "..."`).
    pub kind: &'static str,
    /// One line for listings.
    pub description: &'static str,
    /// Builds the tracker from its config entry.
    pub build: fn(&TrackerConfig) -> Result<Box<dyn Tracker>>,
}

impl TrackerRegistration {
    /// Const constructor, used by [`register_tracker!`](crate::register_tracker).
    pub const fn new(
        kind: &'static str,
        description: &'static str,
        build: fn(&TrackerConfig) -> Result<Box<dyn Tracker>>,
    ) -> Self {
        TrackerRegistration { kind, description, build }
    }
}

impl Registration for TrackerRegistration {
    const KIND: &'static str = "tracker";
    fn name(&self) -> &'static str {
        self.kind
    }
    fn description(&self) -> &'static str {
        self.description
    }
}

inventory::collect!(TrackerRegistration);

/// Every tracker kind linked into this binary.
pub fn trackers() -> Result<Registry<TrackerRegistration>> {
    Registry::collect(inventory::iter::<TrackerRegistration>)
}

/// Builds the trackers a config lists, as one fan-out tracker.
pub fn build_trackers(configs: &[TrackerConfig]) -> Result<Vec<Box<dyn Tracker>>> {
    let registry = trackers()?;
    configs.iter().map(|c| (registry.get(&c.kind)?.build)(c)).collect()
}

/// Registers a tracker kind: one line in the crate that defines it.
///
/// ```
/// use kiln_core::{Result, Tracker, TrackerConfig};
///
/// struct Quiet;
/// impl Tracker for Quiet {}
///
/// fn build(_config: &TrackerConfig) -> Result<Box<dyn Tracker>> {
///     Ok(Box::new(Quiet))
/// }
///
/// kiln_core::register_tracker!("quiet", "logs nothing", build);
///
/// let config = TrackerConfig { kind: "quiet".into(), options: Default::default() };
/// let trackers = kiln_core::build_trackers(&[config])?;
/// assert_eq!(trackers.len(), 1);
/// # Ok::<(), kiln_core::Error>(())
/// ```
#[macro_export]
macro_rules! register_tracker {
    ($kind:expr, $description:expr, $build:expr $(,)?) => {
        $crate::__private::inventory::submit! {
            $crate::TrackerRegistration::new($kind, $description, $build)
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;

    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[derive(Default, Clone)]
    struct Count(Arc<AtomicU64>);
    impl Tracker for Count {
        fn log_metrics(&mut self, _: u64, _: &Metrics) -> Result<()> {
            self.0.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    }

    /// Fault injection: a tracker whose every write fails.
    struct AlwaysFails;
    impl Tracker for AlwaysFails {
        fn log_metrics(&mut self, _: u64, _: &Metrics) -> Result<()> {
            Err(Error::Unsupported("disk full".into()))
        }
    }

    #[test]
    fn tracker_is_object_safe_and_boxes_fan_out() {
        let mut set: Vec<Box<dyn Tracker>> = vec![Box::new(Count::default()), Box::new(None::<Count>)];
        set.log_metrics(0, &Metrics::new()).unwrap();
        set.finish().unwrap();
    }

    #[test]
    fn a_failing_member_does_not_stop_the_others() {
        let after = Count::default();
        let mut mixed: Vec<Box<dyn Tracker>> = vec![Box::new(AlwaysFails), Box::new(after.clone())];
        let err = mixed.log_metrics(0, &Metrics::new()).unwrap_err();
        assert!(err.to_string().contains("disk full"));
        assert_eq!(after.0.load(Ordering::Relaxed), 1, "the member after the failing one still ran");
    }
}
