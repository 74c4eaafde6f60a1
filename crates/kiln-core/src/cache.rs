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

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::tensor::NamedTensors;

/// A content hash identifying a result: model identity plus input.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey(pub [u8; 16]);

impl fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CacheKey(")?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        write!(f, ")")
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
