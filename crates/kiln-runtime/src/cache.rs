//! [`MokaCache`]: the result cache — TTL, capacity in bytes, hit/miss/eviction counts.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kiln_core::{Cache, CacheConfig, CacheKey, CacheSetup, CacheStats, NamedTensors, Result};

/// A [`Cache`] on `moka`: entries expire after `ttl_s`, and the total of their byte
/// sizes stays under `max_bytes` (least recently and frequently used go first).
pub struct MokaCache {
    inner: moka::sync::Cache<CacheKey, Arc<NamedTensors>>,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: Arc<AtomicU64>,
}

/// Bytes an entry costs beyond its tensors (key, pointers, moka's bookkeeping), so
/// tiny results are not counted as free.
const ENTRY_OVERHEAD: usize = 96;

impl MokaCache {
    /// A cache sized and timed by `config`.
    pub fn new(config: &CacheConfig) -> Self {
        let evictions = Arc::new(AtomicU64::new(0));
        let counted = evictions.clone();
        let inner = moka::sync::Cache::builder()
            .max_capacity(config.max_bytes)
            .weigher(|_key: &CacheKey, value: &Arc<NamedTensors>| {
                u32::try_from(value.byte_size() + ENTRY_OVERHEAD).unwrap_or(u32::MAX)
            })
            .time_to_live(Duration::from_secs(config.ttl_s))
            .eviction_listener(move |_key, _value, cause| {
                if cause.was_evicted() {
                    counted.fetch_add(1, Ordering::Relaxed);
                }
            })
            .build();
        MokaCache { inner, hits: AtomicU64::new(0), misses: AtomicU64::new(0), evictions }
    }
}

impl Cache for MokaCache {
    fn get(&self, key: &CacheKey) -> Option<Arc<NamedTensors>> {
        let found = self.inner.get(key);
        let counter = if found.is_some() { &self.hits } else { &self.misses };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    fn insert(&self, key: CacheKey, value: Arc<NamedTensors>) {
        self.inner.insert(key, value);
    }

    fn invalidate_all(&self) {
        self.inner.invalidate_all();
    }

    fn stats(&self) -> CacheStats {
        self.inner.run_pending_tasks();
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            entries: self.inner.entry_count(),
            bytes: self.inner.weighted_size(),
            ..CacheStats::default()
        }
    }
}

/// The `"memory"` kind takes no keys of its own.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NoOptions {}

fn build_memory(setup: &CacheSetup) -> Result<Arc<dyn Cache>> {
    let NoOptions {} = setup.options()?;
    Ok(Arc::new(MokaCache::new(&setup.config)))
}

kiln_core::register_cache!("memory", "in the process: TTL and a size bound in bytes (moka)", build_memory);

/// A content key: xxh3-128 over the parts, each length-prefixed so that no two
/// different part lists hash the same bytes.
pub fn cache_key(parts: &[&[u8]]) -> CacheKey {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    for part in parts {
        hasher.update(&(part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    CacheKey(hasher.digest128().to_le_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_core::Tensor;

    fn value(n: usize) -> Arc<NamedTensors> {
        Arc::new(NamedTensors::new().with("v", Tensor::from_vec(vec![n], vec![0f32; n]).unwrap()))
    }

    #[test]
    fn counts_hits_and_misses() {
        let cache = MokaCache::new(&CacheConfig::default());
        let key = cache_key(&[b"model", b"text"]);
        assert!(cache.get(&key).is_none());
        cache.insert(key, value(4));
        assert!(cache.get(&key).is_some());
        let stats = cache.stats();
        assert_eq!((stats.hits, stats.misses, stats.entries), (1, 1, 1));
        assert_eq!(stats.bytes, (16 + ENTRY_OVERHEAD) as u64);
    }

    #[test]
    fn capacity_in_bytes_evicts() {
        let cache = MokaCache::new(&CacheConfig { max_bytes: 10_000, ..CacheConfig::default() });
        for i in 0..100u32 {
            cache.insert(cache_key(&[&i.to_le_bytes()]), value(384)); // ~1.6 kB each
        }
        let stats = cache.stats();
        assert!(stats.bytes <= 10_000, "{stats:?}");
        assert!(stats.evictions > 0 && stats.entries < 100, "{stats:?}");
    }

    #[test]
    fn entries_expire_after_their_ttl() {
        let cache = MokaCache::new(&CacheConfig { ttl_s: 1, ..CacheConfig::default() });
        let key = cache_key(&[b"k"]);
        let inserted = std::time::Instant::now();
        cache.insert(key, value(1));
        assert!(cache.get(&key).is_some());
        // Polled with a deadline: gone after its second, not before.
        while cache.get(&key).is_some() {
            assert!(inserted.elapsed() < Duration::from_secs(10), "the entry outlived its TTL by 9 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(inserted.elapsed() >= Duration::from_millis(900), "expired early: {:?}", inserted.elapsed());
    }

    #[test]
    fn keys_separate_their_parts() {
        assert_ne!(cache_key(&[b"ab", b"c"]), cache_key(&[b"a", b"bc"]));
        assert_eq!(cache_key(&[b"a", b"b"]), cache_key(&[b"a", b"b"]));
    }
}
