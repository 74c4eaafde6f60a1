//! Single-flight: concurrent requests for the same uncached input share one model run.
//!
//! # Design
//!
//! The result cache answers a repeated input only once its first copy is done; until
//! then every copy would miss and be computed again. So the first caller to miss
//! *leads* — it registers the key, computes, puts the result in the cache and
//! publishes it — and every caller that arrives for the key meanwhile *follows*: it
//! waits for the leader's value instead of queueing another model run. A leader that
//! fails or is cancelled (its deadline passed, its caller went away) publishes nothing;
//! its followers then try again themselves, under their own deadlines, so one
//! caller's failure never becomes another's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kiln_core::CacheKey;
use tokio::sync::watch;

/// A published result.
pub type Shared = Arc<Vec<f32>>;

/// The keys being computed now.
#[derive(Default)]
pub struct InFlight {
    keys: Mutex<HashMap<CacheKey, watch::Receiver<Option<Shared>>>>,
}

/// What a caller does for a key.
pub enum Claim {
    /// Compute it, then [`Leader::publish`].
    Lead(Leader),
    /// Wait for the leader with [`follow`].
    Follow(watch::Receiver<Option<Shared>>),
}

/// The caller computing a key; dropping it unregisters the key.
pub struct Leader {
    owner: Arc<InFlight>,
    key: CacheKey,
    value: watch::Sender<Option<Shared>>,
}

impl InFlight {
    /// Leads `key` if nobody computes it, else follows the one who does.
    pub fn claim(self: &Arc<Self>, key: CacheKey) -> Claim {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(running) = keys.get(&key) {
            return Claim::Follow(running.clone());
        }
        let (value, running) = watch::channel(None);
        keys.insert(key, running);
        Claim::Lead(Leader { owner: self.clone(), key, value })
    }

    /// Keys being computed now.
    pub fn len(&self) -> usize {
        self.keys.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether nothing is being computed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Leader {
    /// Gives the value to the followers (and unregisters the key).
    pub fn publish(self, value: Shared) {
        let _ = self.value.send(Some(value));
    }

    /// Publishes `value` and hands it back for the leader's own caller (a copy only when
    /// a follower still holds it).
    pub fn publish_and_keep(self, value: Vec<f32>) -> Vec<f32> {
        let shared = Arc::new(value);
        self.publish(shared.clone());
        Arc::unwrap_or_clone(shared)
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        // The key is this leader's for as long as it lives: a claim only registers a
        // key nobody holds, and only its leader's drop removes it.
        self.owner.keys.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.key);
    }
}

/// The leader's value, or `None` when it ended without one (failed or cancelled).
pub async fn follow(mut running: watch::Receiver<Option<Shared>>) -> Option<Shared> {
    loop {
        if let Some(value) = running.borrow_and_update().clone() {
            return Some(value);
        }
        if running.changed().await.is_err() {
            return running.borrow().clone();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn followers_get_the_leaders_value_and_the_key_is_freed() {
        let flights = Arc::new(InFlight::default());
        let key = CacheKey([1; 16]);
        let Claim::Lead(leader) = flights.claim(key) else { panic!("the first caller leads") };
        let Claim::Follow(a) = flights.claim(key) else { panic!("the second follows") };
        let Claim::Follow(b) = flights.claim(key) else { panic!("the third follows") };
        let waiting = tokio::spawn(follow(a));
        leader.publish(Arc::new(vec![1.0, 2.0]));
        assert_eq!(*waiting.await.unwrap().unwrap(), vec![1.0, 2.0]);
        assert_eq!(*follow(b).await.unwrap(), vec![1.0, 2.0], "a late follower still reads it");
        assert!(flights.is_empty());
        assert!(matches!(flights.claim(key), Claim::Lead(_)), "a new request leads again");
    }

    #[tokio::test]
    async fn a_leader_that_gives_up_releases_its_followers() {
        let flights = Arc::new(InFlight::default());
        let key = CacheKey([2; 16]);
        let Claim::Lead(leader) = flights.claim(key) else { panic!("leads") };
        let Claim::Follow(f) = flights.claim(key) else { panic!("follows") };
        let waiting = tokio::spawn(follow(f));
        drop(leader);
        assert!(waiting.await.unwrap().is_none(), "no value: the follower computes it itself");
        assert!(flights.is_empty());
    }
}
