//! `cache.kind = "redis"`: a result cache shared by every replica of a model.
//!
//! ```toml
//! [cache]
//! kind = "redis"
//! url = "redis://redis:6379/0"   # redis://[user:password@]host:port/db
//! ttl_s = 600                    # entries expire in Redis and locally
//! max_bytes = 268435456          # the local tier's size
//! ```
//!
//! A lookup goes to an in-process tier first (kiln's moka cache, sized by `max_bytes`),
//! then to Redis for the keys it lacks, in one `MGET`; what Redis had is kept locally
//! too. A result is inserted locally at once and written to Redis (`SET .. EX ttl_s`)
//! by a thread of its own, pipelined, so no request waits on a write. Keys are
//! `prefix` + the 128-bit content key, which already names the model, its provider and
//! its pre-processing: replicas of one config share entries, different ones cannot mix.
//!
//! Redis is never a reason for a request to fail. Every call is bounded by `timeout_ms`;
//! a failed call is counted ([`CacheStats::remote_errors`]), logged once, and for the
//! next `retry_ms` nobody calls Redis: the replica serves from its local tier, then one
//! call probes Redis again. [`Cache::invalidate_all`] (memory pressure) empties the local
//! tier only: the shared entries belong to every replica.
//!
//! Lookups are synchronous, as [`Cache`] is: one round trip on the request's task,
//! typically tens of microseconds to a Redis in the same cluster.

mod remote;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kiln_core::{Cache, CacheKey, CacheSetup, CacheStats, ConfigIssue, Error, NamedTensors, Result};
use kiln_runtime::MokaCache;
use serde::Deserialize;

use remote::Remote;

kiln_core::register_cache!(
    "redis",
    "shared by replicas: Redis (cache.url) behind a local in-process tier",
    build
);

/// The keys `[cache]` takes for `kind = "redis"`, besides `ttl_s` and `max_bytes`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisOptions {
    /// `redis://[user:password@]host:port/db` (or `unix:///path`).
    pub url: String,
    /// Prepended to every key, to share one Redis between deployments.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Milliseconds a connect, read or write may take before the call counts as failed.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Milliseconds without calls to Redis after a failure.
    #[serde(default = "default_retry_ms")]
    pub retry_ms: u64,
    /// Idle connections kept for lookups.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Writes waiting for the writer thread at most; beyond it a write is skipped (and counted).
    #[serde(default = "default_write_queue")]
    pub write_queue: usize,
}

fn default_prefix() -> String {
    "kiln:".into()
}
fn default_timeout_ms() -> u64 {
    100
}
fn default_retry_ms() -> u64 {
    2000
}
fn default_max_connections() -> usize {
    16
}
fn default_write_queue() -> usize {
    4096
}

/// The registry's constructor: the options checked, Redis pinged once (a failure is a
/// warning — the replica starts on its local tier — not a failed start).
fn build(setup: &CacheSetup) -> Result<Arc<dyn Cache>> {
    let options: RedisOptions = setup.options()?;
    let cache = RedisCache::new(&setup.config, options)?;
    cache.remote.call(|c| redis::cmd("PING").query::<String>(c));
    Ok(Arc::new(cache))
}

/// A [`Cache`] in two tiers: moka in the process, Redis shared by every replica.
pub struct RedisCache {
    local: MokaCache,
    remote: Arc<Remote>,
    prefix: String,
    writes: flume::Sender<(CacheKey, Arc<NamedTensors>)>,
    counts: Arc<Counts>,
}

#[derive(Default)]
struct Counts {
    hits: AtomicU64,
    misses: AtomicU64,
    remote_hits: AtomicU64,
    remote_writes: AtomicU64,
    /// Writes not made: the queue was full or Redis was down.
    skipped_writes: AtomicU64,
}

impl RedisCache {
    /// A cache on the Redis at `options.url`; no connection is made yet.
    pub fn new(config: &kiln_core::CacheConfig, options: RedisOptions) -> Result<Self> {
        let client = redis::Client::open(options.url.as_str()).map_err(|e| {
            Error::Config(vec![ConfigIssue::new(
                "cache.url",
                format!("`{}` is not a Redis URL: {e}", without_password(&options.url)),
                "redis://[user:password@]host:port[/db] or unix:///path (TLS, rediss://, is not built in)",
            )])
        })?;
        let remote = Arc::new(Remote::new(
            client,
            without_password(&options.url),
            Duration::from_millis(options.timeout_ms.max(1)),
            Duration::from_millis(options.retry_ms),
            options.max_connections.max(1),
        ));
        let counts = Arc::new(Counts::default());
        let (writes, queued) = flume::bounded(options.write_queue.max(1));
        let writer = Writer {
            remote: remote.clone(),
            counts: counts.clone(),
            prefix: options.prefix.clone(),
            ttl_s: config.ttl_s.max(1),
        };
        std::thread::Builder::new()
            .name("kiln-redis-writer".into())
            .spawn(move || writer.run(queued))
            .map_err(|e| Error::backend("redis", format!("cannot start the writer thread: {e}")))?;
        Ok(RedisCache { local: MokaCache::new(config), remote, prefix: options.prefix, writes, counts })
    }
}

impl Cache for RedisCache {
    fn get(&self, key: &CacheKey) -> Option<Arc<NamedTensors>> {
        self.get_many(std::slice::from_ref(key)).pop().flatten()
    }

    fn get_many(&self, keys: &[CacheKey]) -> Vec<Option<Arc<NamedTensors>>> {
        let mut found: Vec<Option<Arc<NamedTensors>>> = keys.iter().map(|k| self.local.get(k)).collect();
        let missing: Vec<usize> = (0..keys.len()).filter(|&i| found[i].is_none()).collect();
        if !missing.is_empty() {
            let names: Vec<String> = missing.iter().map(|&i| key_name(&self.prefix, &keys[i])).collect();
            let stored =
                self.remote.call(|c| redis::cmd("MGET").arg(&names).query::<Vec<Option<Vec<u8>>>>(c));
            for (&i, bytes) in missing.iter().zip(stored.unwrap_or_default()) {
                let Some(bytes) = bytes else { continue };
                match NamedTensors::from_bytes(&bytes) {
                    Ok(value) => {
                        let value = Arc::new(value);
                        self.local.insert(keys[i], value.clone());
                        self.counts.remote_hits.fetch_add(1, Ordering::Relaxed);
                        found[i] = Some(value);
                    }
                    // Another kiln's layout, or damage: a miss, recomputed and overwritten.
                    Err(e) => tracing::debug!("redis entry {} unreadable: {e}", names[i]),
                }
            }
        }
        let hits = found.iter().filter(|f| f.is_some()).count() as u64;
        self.counts.hits.fetch_add(hits, Ordering::Relaxed);
        self.counts.misses.fetch_add(keys.len() as u64 - hits, Ordering::Relaxed);
        found
    }

    fn insert(&self, key: CacheKey, value: Arc<NamedTensors>) {
        self.local.insert(key, value.clone());
        if !self.remote.is_up() || self.writes.try_send((key, value)).is_err() {
            self.counts.skipped_writes.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn invalidate_all(&self) {
        self.local.invalidate_all();
    }

    fn stats(&self) -> CacheStats {
        let local = self.local.stats();
        let c = &self.counts;
        CacheStats {
            hits: c.hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            remote_hits: c.remote_hits.load(Ordering::Relaxed),
            remote_writes: c.remote_writes.load(Ordering::Relaxed),
            remote_errors: self.remote.errors.load(Ordering::Relaxed),
            remote_skipped_writes: c.skipped_writes.load(Ordering::Relaxed),
            remote_up: Some(self.remote.is_up()),
            ..local
        }
    }
}

/// Writes results to Redis off the request path, pipelining whatever queued up.
struct Writer {
    remote: Arc<Remote>,
    counts: Arc<Counts>,
    prefix: String,
    ttl_s: u64,
}

impl Writer {
    /// Until the cache (the queue's sender) is dropped.
    fn run(self, queued: flume::Receiver<(CacheKey, Arc<NamedTensors>)>) {
        while let Ok(first) = queued.recv() {
            let batch: Vec<_> = std::iter::once(first).chain(queued.try_iter().take(255)).collect();
            let mut pipe = redis::pipe();
            for (key, value) in &batch {
                pipe.cmd("SET")
                    .arg(key_name(&self.prefix, key))
                    .arg(value.to_bytes())
                    .arg("EX")
                    .arg(self.ttl_s)
                    .ignore();
            }
            let n = batch.len() as u64;
            match self.remote.call(|c| pipe.query::<()>(c)) {
                Some(()) => self.counts.remote_writes.fetch_add(n, Ordering::Relaxed),
                None => self.counts.skipped_writes.fetch_add(n, Ordering::Relaxed),
            };
        }
    }
}

fn key_name(prefix: &str, key: &CacheKey) -> String {
    format!("{prefix}{}", key.to_hex())
}

/// The URL with any password replaced, for logs and errors.
fn without_password(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let user = &url[scheme + 3..at];
            let user = user.split(':').next().unwrap_or("");
            format!("{}://{user}:***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

pub mod testing;

#[cfg(test)]
mod tests;
