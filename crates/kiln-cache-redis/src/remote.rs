//! The Redis side: a small pool of synchronous connections, every call bounded by the
//! configured timeout, and a breaker that stops calling a Redis that failed until
//! `retry_ms` has passed (then one call probes it).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use redis::{Connection, RedisResult};

/// Connections and health of one Redis server.
pub(crate) struct Remote {
    client: redis::Client,
    /// The URL without its password, for messages.
    pub(crate) shown: String,
    timeout: Duration,
    retry: Duration,
    pool_size: usize,
    idle: Mutex<Vec<Connection>>,
    /// While set and in the future, nobody calls Redis.
    down_until: Mutex<Option<Instant>>,
    up: AtomicBool,
    /// Calls that failed (each one answered from the local tier instead).
    pub(crate) errors: AtomicU64,
}

impl Remote {
    pub(crate) fn new(
        client: redis::Client,
        shown: String,
        timeout: Duration,
        retry: Duration,
        pool_size: usize,
    ) -> Self {
        Remote {
            client,
            shown,
            timeout,
            retry,
            pool_size,
            idle: Mutex::new(Vec::new()),
            down_until: Mutex::new(None),
            up: AtomicBool::new(true),
            errors: AtomicU64::new(0),
        }
    }

    /// Whether the last call succeeded (or none failed yet).
    pub(crate) fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Runs `call` on a pooled connection; `None` when Redis is known to be down or the
    /// call fails (the failure is counted and, on the first after a success, logged).
    pub(crate) fn call<T>(&self, call: impl FnOnce(&mut Connection) -> RedisResult<T>) -> Option<T> {
        if !self.may_call() {
            return None;
        }
        let pooled = lock(&self.idle).pop();
        let mut connection = match pooled.map(Ok).unwrap_or_else(|| self.connect()) {
            Ok(c) => c,
            Err(e) => return self.failed(&e),
        };
        match call(&mut connection) {
            Ok(value) => {
                self.succeeded();
                let mut idle = lock(&self.idle);
                if idle.len() < self.pool_size {
                    idle.push(connection);
                }
                Some(value)
            }
            // The connection may hold half a reply: it is dropped, not pooled.
            Err(e) => self.failed(&e),
        }
    }

    /// Lets a call through unless Redis failed less than `retry` ago. The first caller
    /// after that becomes the probe and pushes the deadline on, so an outage costs one
    /// timed-out call per `retry`, not one per request.
    fn may_call(&self) -> bool {
        let mut down = lock(&self.down_until);
        match *down {
            Some(until) if Instant::now() < until => false,
            Some(_) => {
                *down = Some(Instant::now() + self.retry);
                true
            }
            None => true,
        }
    }

    fn connect(&self) -> RedisResult<Connection> {
        let connection = self.client.get_connection_with_timeout(self.timeout)?;
        connection.set_read_timeout(Some(self.timeout))?;
        connection.set_write_timeout(Some(self.timeout))?;
        Ok(connection)
    }

    fn succeeded(&self) {
        *lock(&self.down_until) = None;
        if !self.up.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "redis cache at {} answers again: entries are shared with the other replicas",
                self.shown
            );
        }
    }

    fn failed<T>(&self, error: &redis::RedisError) -> Option<T> {
        self.errors.fetch_add(1, Ordering::Relaxed);
        *lock(&self.down_until) = Some(Instant::now() + self.retry);
        lock(&self.idle).clear();
        if self.up.swap(false, Ordering::Relaxed) {
            tracing::warn!(
                "redis cache at {} failed ({error}): serving from the local tier only, trying again every {} ms",
                self.shown,
                self.retry.as_millis()
            );
        }
        None
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
