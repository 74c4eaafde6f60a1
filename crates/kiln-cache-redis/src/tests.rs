//! Against a real `redis-server` (Debian's, see [`crate::testing`]).

use std::time::{Duration, Instant};

use kiln_core::{CacheConfig, Tensor};

use super::*;
use crate::testing::RedisServer;

fn server() -> RedisServer {
    RedisServer::start().unwrap_or_else(|why| panic!("these tests need redis-server: {why}"))
}

fn config(url: &str, extra: &[(&str, serde_json::Value)]) -> CacheConfig {
    let mut config = CacheConfig { kind: "redis".into(), ttl_s: 60, ..CacheConfig::default() };
    config.options.insert("url".into(), url.into());
    config.options.insert("retry_ms".into(), 200.into());
    for (k, v) in extra {
        config.options.insert((*k).into(), v.clone());
    }
    config
}

fn cache(config: &CacheConfig) -> Arc<dyn Cache> {
    kiln_core::build_cache(config).expect("a redis cache builds")
}

fn value(x: f32) -> Arc<NamedTensors> {
    Arc::new(
        NamedTensors::new().with("embedding", Tensor::from_vec(vec![3], vec![x, x + 1.0, x + 2.0]).unwrap()),
    )
}

/// Polls `f` until it answers, for 10 s at most.
fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "waited 10 s for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn two_replicas_share_entries_through_redis() {
    let redis = server();
    let config = config(&redis.url(), &[]);
    let (a, b) = (cache(&config), cache(&config));
    let key = CacheKey([1; 16]);
    assert!(b.get(&key).is_none());
    a.insert(key, value(1.0));
    eventually("a's write to reach redis", || (a.stats().remote_writes == 1).then_some(()));
    let hit = b.get(&key).expect("b finds what a computed");
    assert_eq!(*hit, *value(1.0));
    let s = b.stats();
    assert_eq!((s.hits, s.misses, s.remote_hits, s.remote_up), (1, 1, 1, Some(true)));
    // Kept locally too: a second lookup on b needs no round trip (and counts no remote hit).
    assert!(b.get(&key).is_some());
    assert_eq!(b.stats().remote_hits, 1);
    // Several keys in one MGET: found ones come back in place, missing ones are None.
    let other = CacheKey([2; 16]);
    let c = cache(&config);
    let both = c.get_many(&[other, key]);
    assert!(both[0].is_none());
    assert_eq!(*both[1].clone().unwrap(), *value(1.0));
}

#[test]
fn entries_expire_in_redis_after_ttl_s() {
    let redis = server();
    let config = CacheConfig { ttl_s: 1, ..config(&redis.url(), &[]) };
    let a = cache(&config);
    let key = CacheKey([3; 16]);
    a.insert(key, value(3.0));
    eventually("the write", || (a.stats().remote_writes == 1).then_some(()));
    // A fresh replica (empty local tier) sees the entry until Redis drops it.
    eventually("redis to expire the entry", || cache(&config).get(&key).is_none().then_some(()));
}

#[test]
fn a_redis_outage_degrades_to_the_local_tier_and_recovers() {
    let mut redis = server();
    let a = cache(&config(&redis.url(), &[]));
    let key = CacheKey([4; 16]);
    a.insert(key, value(4.0));
    eventually("the write", || (a.stats().remote_writes == 1).then_some(()));
    redis.kill();

    let started = Instant::now();
    assert!(a.get(&CacheKey([5; 16])).is_none(), "nothing anywhere: a miss, not an error");
    assert!(started.elapsed() < Duration::from_secs(2), "a dead redis costs one bounded call");
    let s = a.stats();
    assert_eq!((s.remote_errors, s.remote_up), (1, Some(false)));
    // While down nobody calls Redis: the local tier answers, no further error is counted.
    for _ in 0..100 {
        assert!(a.get(&key).is_some());
        assert!(a.get(&CacheKey([6; 16])).is_none());
    }
    a.insert(CacheKey([7; 16]), value(7.0));
    let s = a.stats();
    assert_eq!(s.remote_errors, 1);
    assert!(s.remote_skipped_writes >= 1, "{s:?}");

    redis.restart().unwrap();
    // After retry_ms one call probes Redis, succeeds, and sharing resumes.
    eventually("the cache to reach redis again", || {
        let _ = a.get(&CacheKey([8; 16]));
        (a.stats().remote_up == Some(true)).then_some(())
    });
    a.insert(CacheKey([9; 16]), value(9.0));
    let b = cache(&config(&redis.url(), &[]));
    eventually("the new entry to be shared", || b.get(&CacheKey([9; 16])));
}

#[test]
fn a_replica_starts_while_redis_is_unreachable() {
    let mut redis = server();
    redis.kill();
    let a = cache(&config(&redis.url(), &[]));
    assert_eq!(a.stats().remote_up, Some(false), "the start-up ping failed and was counted");
    a.insert(CacheKey([1; 16]), value(1.0));
    assert!(a.get(&CacheKey([1; 16])).is_some(), "the local tier works alone");
}

#[test]
fn bad_options_are_config_errors_naming_the_key() {
    let mut no_url = config("redis://127.0.0.1:1", &[]);
    no_url.options.remove("url");
    let e = kiln_core::build_cache(&no_url).err().expect("url is required").to_string();
    assert!(e.contains("cache") && e.contains("url"), "{e}");

    let e = kiln_core::build_cache(&config("http://example.com", &[])).err().unwrap().to_string();
    assert!(e.contains("cache.url") && e.contains("redis://"), "{e}");

    let e = kiln_core::build_cache(&config("redis://127.0.0.1:1", &[("ttl", 5.into())]))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("ttl"), "{e}");
}

#[test]
fn passwords_stay_out_of_messages() {
    assert_eq!(without_password("redis://u:secret@host:6379/0"), "redis://u:***@host:6379/0");
    assert_eq!(without_password("redis://:secret@host"), "redis://:***@host");
    assert_eq!(without_password("redis://host:6379"), "redis://host:6379");
}
