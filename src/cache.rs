//! The in-process cache of keys in front of the store: verified keys for `ttl`, unknown
//! ones for `negative_ttl`, so that neither a busy client nor a flood of random keys asks
//! the store on every request. While the store is down, verified keys keep working for
//! `stale_if_error` past their `ttl`.

use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use hyper::header::HeaderValue;

use crate::config::CacheConfig;
use crate::key::{KeyRecord, Status};
use crate::ratelimit::Limits;

/// Unknown keys remembered at most: past this, a flood of random keys is not cached
/// (each such request then costs a store lookup, and the per-IP failed-auth limit applies).
const MAX_NEGATIVE_ENTRIES: usize = 1_000_000;

/// A verified key: only what the hot path needs, already built (a cached key costs memory
/// a million times over, so the rest of the record stays in the store).
#[derive(Debug)]
pub(crate) struct CachedKey {
    pub(crate) id: Arc<str>,
    revoked: bool,
    expires_at: Option<jiff::Timestamp>,
    pub(crate) limits: Limits,
    pub(crate) policy: HeaderValue,
    pub(crate) id_header: HeaderValue,
    pub(crate) owner_header: HeaderValue,
}

impl CachedKey {
    pub(crate) fn new(record: KeyRecord, defaults: Limits) -> CachedKey {
        let limits = record.limits(defaults);
        let header = |text: String| {
            HeaderValue::from_maybe_shared(bytes::Bytes::from(text))
                .unwrap_or(HeaderValue::from_static(""))
        };
        CachedKey {
            id: Arc::from(record.id.as_str()),
            revoked: record.revoked_at.is_some(),
            expires_at: record.expires_at,
            policy: limits.policy_header(),
            limits,
            id_header: header(record.id),
            owner_header: header(record.owner),
        }
    }

    /// The key's status now, as [`KeyRecord::status`] computes it.
    pub(crate) fn status(&self, now: jiff::Timestamp) -> Status {
        crate::key::status_at(self.revoked, self.expires_at, now)
    }
}

#[derive(Debug)]
struct Entry {
    key: Option<Arc<CachedKey>>,
    fetched: Instant,
}

/// What the cache knows of a digest.
#[derive(Debug)]
pub(crate) enum Lookup {
    /// Within its ttl: `None` means known to be unknown.
    Fresh(Option<Arc<CachedKey>>),
    /// Past its ttl but within `stale_if_error`: use only if the store cannot answer.
    Stale(Arc<CachedKey>),
    Miss,
}

/// Hashes a SHA-256 digest by taking 8 of its bytes: they are already uniform, and nobody can
/// pick secrets whose digests collide on them, so SipHash's work would buy nothing here.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn write(&mut self, bytes: &[u8]) {
        // `[u8; 32]` hashes as its length, then its bytes: keep the bytes' first word.
        if let Some(word) = bytes.first_chunk::<8>() {
            self.0 ^= u64::from_ne_bytes(*word);
        }
    }

    fn write_usize(&mut self, _length: usize) {}

    fn finish(&self) -> u64 {
        self.0
    }
}

#[derive(Debug)]
pub(crate) struct KeyCache {
    map: DashMap<[u8; 32], Entry, BuildHasherDefault<DigestHasher>>,
    ttl: Duration,
    negative_ttl: Duration,
    stale_if_error: Duration,
}

impl KeyCache {
    pub(crate) fn new(config: &CacheConfig) -> KeyCache {
        KeyCache {
            map: DashMap::with_hasher_and_shard_amount(Default::default(), crate::KEY_MAP_SHARDS),
            ttl: config.ttl,
            negative_ttl: config.negative_ttl,
            stale_if_error: config.stale_if_error,
        }
    }

    pub(crate) fn get(&self, hash: &[u8; 32]) -> Lookup {
        let Some(entry) = self.map.get(hash) else {
            return Lookup::Miss;
        };
        let age = entry.fetched.elapsed();
        match &entry.key {
            Some(key) if age < self.ttl => Lookup::Fresh(Some(Arc::clone(key))),
            Some(key) if age < self.ttl + self.stale_if_error => Lookup::Stale(Arc::clone(key)),
            None if age < self.negative_ttl => Lookup::Fresh(None),
            _ => Lookup::Miss,
        }
    }

    pub(crate) fn insert(&self, hash: [u8; 32], key: Option<Arc<CachedKey>>) {
        if key.is_none() && self.map.len() >= MAX_NEGATIVE_ENTRIES {
            return;
        }
        self.map.insert(
            hash,
            Entry {
                key,
                fetched: Instant::now(),
            },
        );
    }

    /// Forgets a key so the next request asks the store (after a revocation or an edit).
    pub(crate) fn invalidate(&self, hash: &[u8; 32]) {
        self.map.remove(hash);
    }

    /// Forgets everything.
    pub(crate) fn clear(&self) {
        self.map.clear();
    }

    /// Makes every verified key stale and forgets unknown ones: after changes may have been
    /// missed, each key is asked of the store again on its next use (and still served while
    /// the store cannot answer, within `stale_if_error`).
    pub(crate) fn expire_all(&self) {
        let Some(stale) = Instant::now().checked_sub(self.ttl) else {
            self.map.clear();
            return;
        };
        self.map.retain(|_, e| {
            if e.key.is_none() {
                return false;
            }
            e.fetched = e.fetched.min(stale);
            true
        });
    }

    /// Drops entries that can no longer be used.
    pub(crate) fn sweep(&self) {
        let (ttl, negative_ttl) = (self.ttl + self.stale_if_error, self.negative_ttl);
        let now = Instant::now();
        self.map.retain(|_, e| {
            let age = now.saturating_duration_since(e.fetched);
            if e.key.is_some() {
                age < ttl
            } else {
                age < negative_ttl
            }
        });
    }
}
