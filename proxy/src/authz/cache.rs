//! Decisions remembered per policy set, for requests whose decision depends
//! on nothing the key leaves out.
//!
//! A request whose shape is proved ([`super::shape`]) under a set whose
//! policies name no context attribute is decided from its principal entities,
//! its action and its resource (path and service) alone: the context is empty
//! and no tag entity is built. Those are a function of the key (method,
//! service, path and [`super::request::Caller`]), so the same key always gets
//! the same decision from the same set. A reload builds a new set, and with
//! it an empty cache.
//!
//! The key is the request's own bytes, compared whole on a hit; the table is
//! addressed by a keyed SipHash of them, so a client cannot aim collisions,
//! and it is bounded like the verified-token cache, in entries and in the
//! bytes its keys hold: a key is as long as the request's path, which the
//! client chooses, so without the second bound 4 096 paths of 30 KB made
//! warden hold 120 MB more.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::Mutex;

use crate::trace::Decision;

/// Entries across shards.
const ENTRIES: usize = 4096;
/// Bytes of keys across shards: 4 096 keys of 256 bytes, far above a
/// typical key (method, service, path and caller: about 100 bytes).
const KEY_BYTES: usize = 1 << 20;
/// The longest key kept. A longer one is decided each time instead: kept, a
/// few of them would push the common short keys out.
const MAX_KEY: usize = 2048;
const SHARDS: usize = 8;

/// Passes on a hash computed before the lookup.
#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys are hashed here; fold anything else in anyway.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

#[derive(Default)]
struct Shard {
    entries: HashMap<u64, (Box<[u8]>, Decision), BuildHasherDefault<Prehashed>>,
    /// The bytes of the keys in `entries`.
    key_bytes: usize,
}

pub(super) struct DecisionCache {
    hasher: RandomState,
    shards: Vec<Mutex<Shard>>,
}

impl DecisionCache {
    pub(super) fn new() -> Self {
        Self {
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
        }
    }

    fn slot(&self, key: &[u8]) -> (u64, Option<&Mutex<Shard>>) {
        let hash = self.hasher.hash_one(key);
        // The low bits pick the bucket; the high bits pick the shard.
        (hash, self.shards.get((hash >> 58) as usize % SHARDS))
    }

    pub(super) fn get(&self, key: &[u8]) -> Option<Decision> {
        let (hash, shard) = self.slot(key);
        let shard = shard?.lock().ok()?;
        shard
            .entries
            .get(&hash)
            .filter(|(k, _)| **k == *key)
            .map(|(_, d)| d.clone())
    }

    pub(super) fn insert(&self, key: &[u8], decision: Decision) {
        if key.len() > MAX_KEY {
            return;
        }
        let (hash, shard) = self.slot(key);
        let Some(Ok(mut shard)) = shard.map(|s| s.lock()) else {
            return;
        };
        if shard.entries.len() >= ENTRIES / SHARDS
            || shard.key_bytes + key.len() > KEY_BYTES / SHARDS
        {
            // Bounded: drop this shard's entries rather than grow.
            shard.entries.clear();
            shard.key_bytes = 0;
        }
        // A different key with the same hash is replaced: a miss, never a
        // wrong hit, since a hit compares the whole key.
        if let Some((old, _)) = shard.entries.insert(hash, (key.into(), decision)) {
            shard.key_bytes = shard.key_bytes.saturating_sub(old.len());
        }
        shard.key_bytes += key.len();
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map_or(0, |s| s.entries.len()))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn decision(allow: bool) -> Decision {
        Decision {
            allow,
            policies: Arc::from(vec!["p".to_owned()]),
            errors: Arc::from(Vec::new()),
            policy_set: Arc::from("h"),
        }
    }

    #[test]
    fn a_hit_needs_the_whole_key() {
        let cache = DecisionCache::new();
        cache.insert(b"GET /a", decision(true));
        assert!(cache.get(b"GET /a").is_some_and(|d| d.allow));
        assert!(cache.get(b"GET /b").is_none());
        assert!(cache.get(b"GET /a/").is_none());
        assert!(cache.get(b"GET /").is_none());
    }

    #[test]
    fn a_key_whose_hash_is_taken_is_compared_not_trusted() {
        let cache = DecisionCache::new();
        let (hash, shard) = cache.slot(b"one");
        shard
            .expect("shard")
            .lock()
            .expect("lock")
            .entries
            .insert(hash, (Box::from(&b"another"[..]), decision(true)));
        assert!(cache.get(b"one").is_none());
    }

    #[test]
    fn the_cache_is_bounded() {
        let cache = DecisionCache::new();
        for i in 0..ENTRIES * 4 {
            cache.insert(format!("key-{i}").as_bytes(), decision(false));
        }
        assert!(cache.len() <= ENTRIES, "{}", cache.len());
        assert!(cache.len() > 0);
    }

    #[test]
    fn long_keys_are_bounded_in_bytes_too() {
        let cache = DecisionCache::new();
        // Paths a client chose: at the longest key kept, then beyond it.
        for i in 0..ENTRIES * 2 {
            let key = format!("GET /{i}/{}", "a".repeat(MAX_KEY));
            cache.insert(&key.as_bytes()[..MAX_KEY], decision(true));
        }
        let mut total = 0;
        for shard in &cache.shards {
            let shard = shard.lock().expect("lock");
            let held: usize = shard.entries.values().map(|(k, _)| k.len()).sum();
            // The running count is what the shard holds.
            assert_eq!(shard.key_bytes, held);
            total += held;
        }
        assert!(total <= KEY_BYTES, "{total}");
        assert!(cache.len() > 0);
        let long = format!("GET /{}", "a".repeat(MAX_KEY));
        cache.insert(long.as_bytes(), decision(true));
        assert!(cache.get(long.as_bytes()).is_none());
    }
}
