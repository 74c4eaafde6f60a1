//! The profiler registry: `[profiler] kind = "..."` chooses the [`Profiler`] the
//! optimizer and generation time their stages with.
//!
//! It lives in the runtime rather than beside the trait in `kiln-core` because a
//! profiler's constructor gets the runtime's [`ResourceMonitor`]: the one sampler of
//! memory, CPU and GPUs that the memory governor, `stats()` and the profiler share, so
//! their figures agree and nothing samples twice. `"sampling"` ([`SamplingProfiler`])
//! is built in; a crate registers another with [`register_profiler!`](crate::register_profiler).

use std::sync::Arc;

use kiln_core::{NoopProfiler, Profiler, ProfilerConfig, Registry, Result};
use serde::de::DeserializeOwned;

use crate::monitor::ResourceMonitor;
use crate::profiler::SamplingProfiler;

kiln_core::plugin_kind!(
    /// A profiler's entry in the registry: `profiler.kind` chooses it.
    ProfilerRegistration,
    "profiler",
    ProfilerSetup,
    Arc<dyn Profiler>
);

/// What a profiler's constructor gets.
#[derive(Clone)]
pub struct ProfilerSetup {
    /// `[profiler]`: the common keys and the kind's own (`options`).
    pub config: ProfilerConfig,
    /// The runtime's resource sampler; subscribe to it rather than sampling again.
    pub monitor: Arc<ResourceMonitor>,
}

impl ProfilerSetup {
    /// The kind's own keys as its options type; use `#[serde(deny_unknown_fields)]` so a
    /// misspelt key is an error naming `profiler`.
    pub fn options<T: DeserializeOwned>(&self) -> Result<T> {
        kiln_core::plugin_options(
            &self.config.options,
            "profiler",
            &format!("profiler kind `{}`", self.config.kind),
        )
    }
}

/// Every profiler kind linked into this binary.
pub fn profilers() -> Result<Registry<ProfilerRegistration>> {
    Registry::collect(kiln_core::__private::inventory::iter::<ProfilerRegistration>)
}

/// The profiler `config` chooses: [`NoopProfiler`] when `profiler.enabled` is off, else
/// the registered `profiler.kind` (an unknown kind is an error listing the known ones).
pub fn build_profiler(config: &ProfilerConfig, monitor: &Arc<ResourceMonitor>) -> Result<Arc<dyn Profiler>> {
    if !config.enabled {
        return Ok(Arc::new(NoopProfiler));
    }
    let setup = ProfilerSetup { config: config.clone(), monitor: monitor.clone() };
    (profilers()?.get(&config.kind)?.build)(&setup)
}

/// Registers a profiler kind: one line in the crate that defines it.
///
/// ```
/// use std::sync::Arc;
/// use std::time::{Duration, Instant};
/// use kiln_core::{Profiler, ProfilerConfig, Result};
/// use kiln_runtime::{ProfilerSetup, ResourceMonitor, build_profiler};
///
/// struct Quiet;
/// impl Profiler for Quiet {
///     fn record(&self, _name: &str, _start: Instant, _elapsed: Duration) {}
/// }
///
/// fn build(_setup: &ProfilerSetup) -> Result<Arc<dyn Profiler>> {
///     Ok(Arc::new(Quiet))
/// }
///
/// kiln_runtime::register_profiler!("quiet", "records nothing", build);
///
/// let config = ProfilerConfig { kind: "quiet".into(), ..ProfilerConfig::default() };
/// let profiler = build_profiler(&config, &ResourceMonitor::on_demand())?;
/// assert!(profiler.report().spans.is_empty());
/// # Ok::<(), kiln_core::Error>(())
/// ```
#[macro_export]
macro_rules! register_profiler {
    ($kind:expr, $description:expr, $build:expr $(,)?) => {
        $crate::__private::inventory::submit! {
            $crate::ProfilerRegistration::new($kind, $description, $build)
        }
    };
}

/// The `"sampling"` kind takes no keys of its own.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NoOptions {}

fn build_sampling(setup: &ProfilerSetup) -> Result<Arc<dyn Profiler>> {
    let NoOptions {} = setup.options()?;
    Ok(SamplingProfiler::with_monitor(setup.config.clone(), setup.monitor.clone()))
}

register_profiler!(
    "sampling",
    "span histograms, resource samples (memory, CPU, NVIDIA GPUs) and an optional Chrome trace",
    build_sampling
);
