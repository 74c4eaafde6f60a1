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
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;

use crate::config::{TrackerConfig, TrackingConfig};
use crate::error::Result;
use crate::profiler::ProfileReport;
use crate::registry::Registry;

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
    /// The profiler's report (spans, peaks, samples), once at the end when profiling is on.
    fn log_profile(&mut self, _report: &ProfileReport) -> Result<()> {
        Ok(())
    }
    /// Writes out anything buffered.
    fn flush(&mut self) -> Result<()> {
        Ok(())
    }
    /// Called a few times a second between events; a buffering tracker flushes here
    /// when its own flush interval has passed, so writes never wait for the next step.
    fn tick(&mut self) -> Result<()> {
        Ok(())
    }
    /// A video made by the run (the video task), under `tag` at `step`.
    fn log_video(&mut self, _step: u64, _tag: &str, _clip: &Clip<'_>) -> Result<()> {
        Ok(())
    }

    /// Ends the run; flushes by default.
    fn finish(&mut self) -> Result<()> {
        self.flush()
    }
}

/// A short video for [`Tracker::log_video`]: its size and rate, and the frames encoded as
/// one animated GIF — what TensorBoard's image dashboard and W&B's video panel both play.
#[derive(Debug, Clone, Copy)]
pub struct Clip<'a> {
    /// Frame width, pixels.
    pub width: u32,
    /// Frame height, pixels.
    pub height: u32,
    /// Frames per second.
    pub fps: u32,
    /// Frames in the video.
    pub frames: usize,
    /// The animated GIF.
    pub gif: &'a [u8],
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
    fn log_profile(&mut self, report: &ProfileReport) -> Result<()> {
        (**self).log_profile(report)
    }
    fn log_video(&mut self, step: u64, tag: &str, clip: &Clip<'_>) -> Result<()> {
        (**self).log_video(step, tag, clip)
    }
    fn flush(&mut self) -> Result<()> {
        (**self).flush()
    }
    fn tick(&mut self) -> Result<()> {
        (**self).tick()
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
    fn log_profile(&mut self, report: &ProfileReport) -> Result<()> {
        self.as_mut().map_or(Ok(()), |t| t.log_profile(report))
    }
    fn log_video(&mut self, step: u64, tag: &str, clip: &Clip<'_>) -> Result<()> {
        self.as_mut().map_or(Ok(()), |t| t.log_video(step, tag, clip))
    }
    fn flush(&mut self) -> Result<()> {
        self.as_mut().map_or(Ok(()), |t| t.flush())
    }
    fn tick(&mut self) -> Result<()> {
        self.as_mut().map_or(Ok(()), |t| t.tick())
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
    fn log_profile(&mut self, report: &ProfileReport) -> Result<()> {
        fan_out(self, |t| t.log_profile(report))
    }
    fn log_video(&mut self, step: u64, tag: &str, clip: &Clip<'_>) -> Result<()> {
        fan_out(self, |t| t.log_video(step, tag, clip))
    }
    fn flush(&mut self) -> Result<()> {
        fan_out(self, |t| t.flush())
    }
    fn tick(&mut self) -> Result<()> {
        fan_out(self, |t| t.tick())
    }
    fn finish(&mut self) -> Result<()> {
        fan_out(self, |t| t.finish())
    }
}

crate::plugin_kind!(
    /// A tracker's entry in the registry: `[[trackers]] kind` chooses it. Builders read
    /// options only and touch no files: I/O happens on first write, where a failure is
    /// the runtime's warning, not a failed start.
    TrackerRegistration,
    "tracker",
    TrackerSetup,
    Box<dyn Tracker>
);

/// Every tracker kind linked into this binary.
pub fn trackers() -> Result<Registry<TrackerRegistration>> {
    Registry::collect(inventory::iter::<TrackerRegistration>)
}

/// What a tracker's constructor gets: its `[[trackers]]` entry, where it sits in the
/// list, the run's name and the folder relative paths resolve against.
#[derive(Debug, Clone)]
pub struct TrackerSetup {
    /// Position in the `[[trackers]]` list, for error messages.
    pub index: usize,
    /// The entry: kind and the tracker's own keys.
    pub config: TrackerConfig,
    /// `tracking.dir`.
    pub dir: PathBuf,
    /// `tracking.run_name`, or `kiln-YYYYMMDD-HHMMSS` (UTC) of the start.
    pub run_name: String,
}

impl TrackerSetup {
    /// The entry's keys (other than `kind`) as the tracker's own options type; use
    /// `#[serde(deny_unknown_fields)]` so a misspelt key is an error naming the entry.
    pub fn options<T: DeserializeOwned>(&self) -> Result<T> {
        crate::registry::plugin_options(
            &self.config.options,
            &format!("trackers[{}]", self.index),
            &format!("tracker `{}`", self.config.kind),
        )
    }

    /// `path` if absolute, else `path` inside `tracking.dir`.
    pub fn resolve(&self, path: impl AsRef<Path>) -> PathBuf {
        self.dir.join(path)
    }
}

/// Builds the trackers a config lists, as one fan-out tracker. An unknown kind is an
/// error listing the known ones.
pub fn build_trackers(configs: &[TrackerConfig], tracking: &TrackingConfig) -> Result<Vec<Box<dyn Tracker>>> {
    let registry = trackers()?;
    let run_name = tracking.run_name.clone().unwrap_or_else(|| {
        let (y, mo, d, h, mi, s) = utc_datetime(SystemTime::now());
        format!("kiln-{y:04}{mo:02}{d:02}-{h:02}{mi:02}{s:02}")
    });
    configs
        .iter()
        .enumerate()
        .map(|(index, c)| {
            let setup = TrackerSetup {
                index,
                config: c.clone(),
                dir: tracking.dir.clone(),
                run_name: run_name.clone(),
            };
            (registry.get(&c.kind)?.build)(&setup)
        })
        .collect()
}

/// `(year, month, day, hour, minute, second)` of a time, in UTC.
pub fn utc_datetime(time: SystemTime) -> (i64, u32, u32, u32, u32, u32) {
    let secs = time.duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Days to civil date (Howard Hinnant's algorithm), proleptic Gregorian.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day, (rem / 3600) as u32, (rem % 3600 / 60) as u32, (rem % 60) as u32)
}

/// Registers a tracker kind: one line in the crate that defines it.
///
/// ```
/// use kiln_core::{Result, Tracker, TrackerConfig, TrackerSetup, TrackingConfig};
///
/// struct Quiet;
/// impl Tracker for Quiet {}
///
/// fn build(_setup: &TrackerSetup) -> Result<Box<dyn Tracker>> {
///     Ok(Box::new(Quiet))
/// }
///
/// kiln_core::register_tracker!("quiet", "logs nothing", build);
///
/// let config = TrackerConfig { kind: "quiet".into(), options: Default::default() };
/// let trackers = kiln_core::build_trackers(&[config], &TrackingConfig::default())?;
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
        let count = Count::default();
        let mut set: Vec<Box<dyn Tracker>> = vec![Box::new(count.clone()), Box::new(None::<Count>)];
        set.log_metrics(0, &Metrics::new()).unwrap();
        set.log_metrics(1, &Metrics::new()).unwrap();
        set.finish().unwrap();
        assert_eq!(count.0.load(Ordering::Relaxed), 2, "every step reached the boxed member");
    }

    #[test]
    fn utc_dates_of_known_instants() {
        let at = |s: u64| utc_datetime(UNIX_EPOCH + std::time::Duration::from_secs(s));
        assert_eq!(at(0), (1970, 1, 1, 0, 0, 0));
        assert_eq!(at(951_782_400), (2000, 2, 29, 0, 0, 0));
        assert_eq!(at(1_795_305_601), (2026, 11, 22, 0, 0, 1));
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
