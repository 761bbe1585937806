//! The in-process cache of keys in front of the store: verified keys for `ttl`, unknown
//! ones for `negative_ttl`, so that neither a busy client nor a flood of random keys asks
//! the store on every request. While the store is down, verified keys keep working for
//! `stale_if_error` past their `ttl`.

use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use hyper::header::HeaderValue;

use crate::config::CacheConfig;
use crate::key::{KeyRecord, Status};
use crate::key_state::KeyState;
use crate::ratelimit::Limits;

/// Unknown keys remembered at most: past this, a flood of random keys is not cached
/// (each such request then costs a store lookup, and the per-IP failed-auth limit applies).
const MAX_NEGATIVE_ENTRIES: usize = 1_000_000;

/// A verified key: only what the hot path needs, already built (a cached key costs memory
/// a million times over, so the rest of the record stays in the store). Built by
/// [`KeyCache::build`].
///
/// Kept in the cache's table itself, not behind an `Arc` of its own: a request reads it from
/// the bucket its digest was just compared in. With a million keys in use, the `Arc`'s
/// counter was one more random cache miss a request, the third of the lookup's three.
#[derive(Debug, Clone)]
pub(crate) struct CachedKey {
    /// The key's windows and pending use, shared with every other entry of the same key id.
    pub(crate) state: Arc<KeyState>,
    /// What the key has in common with every key of the same owner and limits.
    pub(crate) profile: &'static Profile,
    expires_at: Option<jiff::Timestamp>,
    revoked: bool,
}

/// An owner and limits, with their header values, made once and shared by the cached keys
/// that have them: at a million keys, 80 bytes a key kept once per owner instead.
///
/// Profiles are never dropped (the cache keeps each one it made, as there are few), so they
/// are made `'static`, their header texts too: a request copies a key's profile and its
/// headers without counting references, where counters shared by all of an owner's keys
/// were written by every worker on every request.
#[derive(Debug)]
pub(crate) struct Profile {
    pub(crate) limits: Limits,
    /// `RateLimit-Policy`.
    pub(crate) policy: HeaderValue,
    /// `X-RateLimit-Limit`.
    pub(crate) limit_header: HeaderValue,
    /// `X-Keygate-Owner`.
    pub(crate) owner_header: HeaderValue,
}

impl CachedKey {
    pub(crate) fn id(&self) -> &Arc<str> {
        &self.state.id
    }

    /// `X-Keygate-Key-Id`, over the key's own `Arc` of its id (no copy of the text). Made per
    /// request rather than kept: one allocation from the thread's own free list, where a value
    /// kept in the entry was one more allocation a key (~70 bytes at a million keys) and, for
    /// its counter, one more random cache miss a request.
    pub(crate) fn id_header(&self) -> HeaderValue {
        HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(IdBytes(Arc::clone(self.id()))))
            .unwrap_or(HeaderValue::from_static(""))
    }

    /// The key's status at `now`, a coarse reading ([`crate::clock::now`]), as
    /// [`KeyRecord::status`] computes it. Within a second of the key's expiry the precise clock
    /// decides instead: the coarse one lags by a tick or more (longer while the CPU keeping
    /// time is descheduled, on a busy VM), and a key rotated with no grace must be refused at
    /// once.
    pub(crate) fn status(&self, now: jiff::Timestamp) -> Status {
        let now = match self.expires_at {
            Some(at) if at.duration_since(now).abs() < NEAR_EXPIRY => jiff::Timestamp::now(),
            _ => now,
        };
        crate::key::status_at(self.revoked, self.expires_at, now)
    }
}

/// A header value of a [`Profile`], over text that lives as long as the process: its clones
/// count no references.
fn leak(value: HeaderValue) -> HeaderValue {
    let text: &'static [u8] = Box::leak(value.as_bytes().into());
    HeaderValue::from_maybe_shared(bytes::Bytes::from_static(text)).unwrap_or(value)
}

/// How near its expiry a key's status is decided on the precise clock; see [`CachedKey::status`].
const NEAR_EXPIRY: jiff::SignedDuration = jiff::SignedDuration::from_secs(1);

/// A key id's `Arc` as the bytes of a header value.
struct IdBytes(Arc<str>);

impl AsRef<[u8]> for IdBytes {
    fn as_ref(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

/// The [`Profile`]s of cached keys. Grows with the owners and limits of keys fetched, never
/// with requests; not swept (a profile is a few dozen bytes).
type Profiles = DashMap<(Box<str>, Limits), &'static Profile, foldhash::fast::RandomState>;

#[derive(Debug)]
struct Entry {
    key: Option<CachedKey>,
    /// [`KeyCache::now_ms`] when fetched: half of an `Instant`, in an entry kept a million
    /// times over.
    fetched: u64,
}

/// What the cache knows of a digest.
#[derive(Debug)]
pub(crate) enum Lookup {
    /// Within its ttl: `None` means known to be unknown.
    Fresh(Option<CachedKey>),
    /// Past its ttl but within `stale_if_error`: use only if the store cannot answer.
    Stale(CachedKey),
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
    defaults: Limits,
    profiles: Profiles,
    ttl: Duration,
    negative_ttl: Duration,
    stale_if_error: Duration,
}

impl KeyCache {
    /// `defaults`: the limits of keys without their own.
    pub(crate) fn new(config: &CacheConfig, defaults: Limits) -> KeyCache {
        KeyCache {
            map: DashMap::with_hasher_and_shard_amount(Default::default(), crate::KEY_MAP_SHARDS),
            defaults,
            profiles: DashMap::default(),
            ttl: config.ttl,
            negative_ttl: config.negative_ttl,
            stale_if_error: config.stale_if_error,
        }
    }

    /// The cached form of a record; `state` is the key's, from
    /// [`crate::key_state::KeyStates::of`].
    pub(crate) fn build(&self, record: KeyRecord, state: Arc<KeyState>) -> CachedKey {
        debug_assert_eq!(*state.id, *record.id);
        let limits = record.limits(self.defaults);
        CachedKey {
            state,
            profile: self.profile(record.owner, limits),
            expires_at: record.expires_at,
            revoked: record.revoked_at.is_some(),
        }
    }

    fn profile(&self, owner: String, limits: Limits) -> &'static Profile {
        let key = (owner.into_boxed_str(), limits);
        if let Some(profile) = self.profiles.get(&key) {
            return *profile;
        }
        let owner_header = HeaderValue::from_str(&key.0).unwrap_or(HeaderValue::from_static(""));
        *self.profiles.entry(key).or_insert_with(|| {
            Box::leak(Box::new(Profile {
                limits,
                policy: leak(limits.policy_header()),
                limit_header: leak(limits.limit_header()),
                owner_header: leak(owner_header),
            }))
        })
    }

    /// Milliseconds on the cache's clock, coarse ([`crate::clock`]): ages are compared with
    /// ttls of seconds. It starts 2^40 ms (35 years) in, so that "fetched a `ttl` ago" can be
    /// written however young the machine is.
    fn now_ms(&self) -> u64 {
        (1 << 40) + crate::clock::monotonic_ms()
    }

    pub(crate) fn get(&self, hash: &[u8; 32]) -> Lookup {
        let Some(entry) = self.map.get(hash) else {
            return Lookup::Miss;
        };
        let age = Duration::from_millis(self.now_ms().saturating_sub(entry.fetched));
        match &entry.key {
            Some(key) if age < self.ttl => Lookup::Fresh(Some(key.clone())),
            Some(key) if age < self.ttl + self.stale_if_error => Lookup::Stale(key.clone()),
            None if age < self.negative_ttl => Lookup::Fresh(None),
            _ => Lookup::Miss,
        }
    }

    pub(crate) fn insert(&self, hash: [u8; 32], key: Option<CachedKey>) {
        if key.is_none() && self.map.len() >= MAX_NEGATIVE_ENTRIES {
            return;
        }
        self.map.insert(
            hash,
            Entry {
                key,
                fetched: self.now_ms(),
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
        let stale = self.now_ms().saturating_sub(self.ttl.as_millis() as u64);
        self.map.retain(|_, e| {
            if e.key.is_none() {
                return false;
            }
            e.fetched = e.fetched.min(stale);
            true
        });
    }

    /// Entries, live or expired, as the sweep's pace counts them.
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// Drops entries that can no longer be used.
    pub(crate) fn sweep(&self) {
        let (ttl, negative_ttl) = (self.ttl + self.stale_if_error, self.negative_ttl);
        let now = self.now_ms();
        self.map.retain(|_, e| {
            let age = Duration::from_millis(now.saturating_sub(e.fetched));
            if e.key.is_some() {
                age < ttl
            } else {
                age < negative_ttl
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key_state::KeyStates;

    fn expiring_at(at: jiff::Timestamp) -> CachedKey {
        let limits = Limits {
            per_minute: 100,
            per_second: 10,
        };
        let cache = KeyCache::new(&CacheConfig::default(), limits);
        let (_, mut record) = crate::bench::keys(1, "kg_").remove(0);
        record.expires_at = Some(at);
        let state = KeyStates::new().of(&record.id);
        cache.build(record, state)
    }

    /// A coarse reading lagging behind (a busy VM) must not let through a key that expired a
    /// moment ago, as one rotated with no grace does.
    #[test]
    fn near_its_expiry_a_key_is_judged_on_the_precise_clock() {
        let precise = jiff::Timestamp::now();
        let lagging = precise - jiff::SignedDuration::from_millis(30);
        let just_expired = expiring_at(precise - jiff::SignedDuration::from_millis(1));
        assert_eq!(just_expired.status(lagging), Status::Expired);
        // Far from it, the reading given decides: nothing else is asked of the clock (a reading
        // two hours on finds the key expired, whatever the time).
        let in_an_hour = expiring_at(precise + jiff::SignedDuration::from_secs(3600));
        assert_eq!(in_an_hour.status(precise), Status::ExpiringSoon);
        let two_hours_on = precise + jiff::SignedDuration::from_secs(7200);
        assert_eq!(in_an_hour.status(two_hours_on), Status::Expired);
        let long_gone = expiring_at(precise - jiff::SignedDuration::from_secs(3600));
        assert_eq!(long_gone.status(precise), Status::Expired);
    }
}
