//! The [`Cache`] trait: results kept by a key derived from the model and the input.
//!
//! # Design
//!
//! The runtime computes a [`CacheKey`] from the model's identity and the pre-processed
//! input, looks it up before queueing a request and inserts the result after. The trait
//! is synchronous and takes `&self`: implementations are shared across request tasks and
//! do their own locking, and a lookup must cost far less than inference. Values are
//! [`NamedTensors`] behind an `Arc`, so a hit hands out the stored result without a copy
//! and a cache can weigh entries by [`NamedTensors::byte_size`].
//!
//! [`NoCache`] is the implementation used when caching is off: every lookup misses,
//! and the misses are still counted, so statistics stay honest.
//!
//! Caches are plugins like providers and trackers: a crate registers a kind with
//! [`register_cache!`](crate::register_cache) and `[cache] kind = "..."` chooses it
//! ([`build_cache`]). The runtime registers `"memory"` (moka, in the process); the
//! `kiln-cache-redis` crate registers `"redis"`, shared by every replica.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::config::CacheConfig;
use crate::error::Result;
use crate::registry::Registry;
use crate::tensor::NamedTensors;

/// A content hash identifying a result: model identity plus input.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey(pub [u8; 16]);

impl CacheKey {
    /// The key as 32 lowercase hex digits: a file or Redis key name.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CacheKey({})", self.to_hex())
    }
}

/// Counters of a cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct CacheStats {
    /// Lookups that found an entry.
    pub hits: u64,
    /// Lookups that found nothing.
    pub misses: u64,
    /// Entries removed to respect capacity or TTL.
    pub evictions: u64,
    /// Entries held now.
    pub entries: u64,
    /// Bytes held now.
    pub bytes: u64,
    /// Of the hits, those a shared tier (Redis) answered; 0 for a cache without one.
    #[serde(default)]
    pub remote_hits: u64,
    /// Entries written to the shared tier.
    #[serde(default)]
    pub remote_writes: u64,
    /// Calls to the shared tier that failed; each was answered from the process instead.
    #[serde(default)]
    pub remote_errors: u64,
    /// Entries not written to the shared tier (it was down, or its queue was full).
    #[serde(default)]
    pub remote_skipped_writes: u64,
    /// Whether the shared tier answered its last call; `None` for a cache without one.
    #[serde(default)]
    pub remote_up: Option<bool>,
}

impl CacheStats {
    /// Hits over lookups; 0 when nothing was looked up.
    pub fn hit_rate(&self) -> f64 {
        let lookups = self.hits + self.misses;
        if lookups == 0 { 0.0 } else { self.hits as f64 / lookups as f64 }
    }
}

/// A store of results by [`CacheKey`].
///
/// ```
/// use std::sync::Arc;
/// use kiln_core::{Cache, CacheKey, NamedTensors, NoCache};
///
/// let cache: Arc<dyn Cache> = Arc::new(NoCache::default());
/// let key = CacheKey([7; 16]);
/// cache.insert(key, Arc::new(NamedTensors::new()));
/// assert!(cache.get(&key).is_none()); // NoCache keeps nothing...
/// assert_eq!(cache.stats().misses, 1); // ...but counts the miss.
/// ```
pub trait Cache: Send + Sync + 'static {
    /// The entry for `key`, if held (and not expired).
    fn get(&self, key: &CacheKey) -> Option<Arc<NamedTensors>>;
    /// The entries for several keys, in order: what a request's texts look up at once.
    /// A cache with a remote tier answers them in one round trip; the default asks
    /// [`get`](Self::get) for each.
    fn get_many(&self, keys: &[CacheKey]) -> Vec<Option<Arc<NamedTensors>>> {
        keys.iter().map(|k| self.get(k)).collect()
    }
    /// Stores `value` under `key`; the cache may drop it at once to respect capacity.
    fn insert(&self, key: CacheKey, value: Arc<NamedTensors>);
    /// Drops every entry (memory pressure, model reload).
    fn invalidate_all(&self);
    /// Current counters.
    fn stats(&self) -> CacheStats;
}

/// A cache that holds nothing and counts its misses.
#[derive(Debug, Default)]
pub struct NoCache {
    misses: AtomicU64,
}

impl Cache for NoCache {
    fn get(&self, _key: &CacheKey) -> Option<Arc<NamedTensors>> {
        self.misses.fetch_add(1, Ordering::Relaxed);
        None
    }
    fn insert(&self, _key: CacheKey, _value: Arc<NamedTensors>) {}
    fn invalidate_all(&self) {}
    fn stats(&self) -> CacheStats {
        CacheStats { misses: self.misses.load(Ordering::Relaxed), ..CacheStats::default() }
    }
}

crate::plugin_kind!(
    /// A cache's entry in the registry: `cache.kind` chooses it.
    CacheRegistration,
    "cache",
    CacheSetup,
    Arc<dyn Cache>
);

/// What a cache's constructor gets: the `[cache]` section.
#[derive(Debug, Clone)]
pub struct CacheSetup {
    /// The common keys (`ttl_s`, `max_bytes`) and the kind's own (`options`).
    pub config: CacheConfig,
}

impl CacheSetup {
    /// The kind's own keys as its options type; use `#[serde(deny_unknown_fields)]` so a
    /// misspelt key is an error naming `cache`.
    pub fn options<T: DeserializeOwned>(&self) -> Result<T> {
        crate::registry::plugin_options(
            &self.config.options,
            "cache",
            &format!("cache kind `{}`", self.config.kind),
        )
    }
}

/// Every cache kind linked into this binary.
pub fn caches() -> Result<Registry<CacheRegistration>> {
    Registry::collect(inventory::iter::<CacheRegistration>)
}

/// The cache `config` chooses: [`NoCache`] when `cache.enabled` is off, else the
/// registered `cache.kind` (an unknown kind is an error listing the known ones).
pub fn build_cache(config: &CacheConfig) -> Result<Arc<dyn Cache>> {
    if !config.enabled {
        return Ok(Arc::new(NoCache::default()));
    }
    (caches()?.get(&config.kind)?.build)(&CacheSetup { config: config.clone() })
}

/// Registers a cache kind: one line in the crate that defines it.
///
/// ```
/// use std::sync::Arc;
/// use kiln_core::{Cache, CacheConfig, CacheSetup, NoCache, Result};
///
/// fn build(_setup: &CacheSetup) -> Result<Arc<dyn Cache>> {
///     Ok(Arc::new(NoCache::default()))
/// }
///
/// kiln_core::register_cache!("nothing", "keeps nothing", build);
///
/// let config = CacheConfig { kind: "nothing".into(), ..CacheConfig::default() };
/// assert_eq!(kiln_core::build_cache(&config)?.stats().entries, 0);
/// # Ok::<(), kiln_core::Error>(())
/// ```
///
/// A crate that only registers plugins must be linked (`use kiln_cache_x as _;`) for its
/// registration to be seen.
#[macro_export]
macro_rules! register_cache {
    ($kind:expr, $description:expr, $build:expr $(,)?) => {
        $crate::__private::inventory::submit! {
            $crate::CacheRegistration::new($kind, $description, $build)
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hit_rate_is_hits_over_lookups() {
        assert_eq!(CacheStats::default().hit_rate(), 0.0);
        let s = CacheStats { hits: 3, misses: 1, ..Default::default() };
        assert_eq!(s.hit_rate(), 0.75);
    }
}
