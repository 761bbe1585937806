//! What this instance keeps of each key in use between requests: its rate-limit windows
//! (`scope: local`, and the fallback of `scope: global`) and its last use not yet written to
//! the store.
//!
//! Both live in one [`KeyState`] per key id, which the key's cache entry points to. A request
//! reaches them through the key it was verified as: no map lookup, no hashing of the key id,
//! one lock on memory the cache entry already brought near. The map by id in [`KeyStates`] is
//! only asked when a key is fetched from the store, so that an edited, revoked or re-fetched
//! key finds its windows as it left them. With a million keys in use, the two maps by id
//! this replaces (windows, pending uses) cost a request two more hashed lookups in tables
//! far larger than the CPU's caches, and an insertion into the pending map on each key's
//! first use after every flush.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use dashmap::DashMap;
use jiff::Timestamp;

use crate::ratelimit::{KeyWindows, Limits, Verdict, decide};

/// One key's state in this instance; see the module documentation.
#[derive(Debug)]
pub(crate) struct KeyState {
    pub(crate) id: Arc<str>,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    windows: KeyWindows,
    /// The latest use not yet taken by a usage flush, in whole milliseconds as the stores
    /// keep it (8 bytes less than a `Timestamp`, in a state kept a million times over). While
    /// there is one, the key is in the usage recorder's pending list, put there once per flush.
    last_use: Option<(i64, IpAddr)>,
}

impl KeyState {
    fn new(id: Arc<str>) -> KeyState {
        KeyState {
            id,
            inner: Mutex::default(),
        }
    }

    /// Decides one request at `now_us` ([`KeyStates::now_us`]) and counts it when allowed.
    pub(crate) fn check(&self, limits: Limits, now_us: u64) -> Verdict {
        decide(&mut crate::lock(&self.inner).windows, limits, now_us)
    }

    /// Notes a use, the latest winning. True when the key was not pending yet: the caller
    /// puts it in the pending list.
    pub(crate) fn note_use(&self, at: Timestamp, ip: IpAddr) -> bool {
        crate::lock(&self.inner)
            .last_use
            .replace((at.as_millisecond(), ip))
            .is_none()
    }

    /// The use noted since the last call, and the key no longer pending: a use noted after
    /// this puts it in the pending list again.
    pub(crate) fn take_use(&self) -> Option<(Timestamp, IpAddr)> {
        let (at, ip) = crate::lock(&self.inner).last_use.take()?;
        Some((Timestamp::from_millisecond(at).ok()?, ip))
    }

    /// Nothing counted at `now_us` any more, and no use pending.
    fn is_idle(&self, now_us: u64) -> bool {
        let mut inner = crate::lock(&self.inner);
        inner.last_use.is_none() && inner.windows.is_idle(now_us)
    }
}

/// Every key's [`KeyState`], by id.
#[derive(Debug)]
pub(crate) struct KeyStates {
    by_id: DashMap<Arc<str>, Arc<KeyState>, foldhash::fast::RandomState>,
    epoch: Instant,
}

impl KeyStates {
    pub(crate) fn new() -> KeyStates {
        KeyStates {
            by_id: DashMap::with_hasher_and_shard_amount(Default::default(), crate::KEY_MAP_SHARDS),
            epoch: Instant::now(),
        }
    }

    /// The state of key `id`, made empty on its first use.
    pub(crate) fn of(&self, id: &str) -> Arc<KeyState> {
        if let Some(state) = self.by_id.get(id) {
            return Arc::clone(&state);
        }
        let id: Arc<str> = Arc::from(id);
        let state = self
            .by_id
            .entry(Arc::clone(&id))
            .or_insert_with(|| Arc::new(KeyState::new(id)));
        Arc::clone(&state)
    }

    /// Microseconds on this instance's monotonic clock, as [`KeyState::check`] takes them.
    pub(crate) fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// Forgets the states nothing else holds (no cached key, no pending use) and with nothing
    /// left in their windows. One that is still held stays: a key cached under two entries,
    /// or fetched again meanwhile, must keep counting in one place.
    pub(crate) fn sweep(&self) {
        let now = self.now_us();
        self.by_id
            .retain(|_, state| Arc::strong_count(state) > 1 || !state.is_idle(now));
    }

    /// States held, as the sweep's pace counts them.
    pub(crate) fn len(&self) -> usize {
        self.by_id.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With a million keys in use, each request reads its key's state from memory: in two
    /// cache lines (an `Arc`'s two counts, then the state), not three.
    #[test]
    fn a_key_state_and_its_counts_fit_in_128_bytes() {
        let size = std::mem::size_of::<KeyState>() + 2 * std::mem::size_of::<usize>();
        assert!(size <= 128, "{size} bytes");
    }

    const LIMITS: Limits = Limits {
        per_minute: 100,
        per_second: 2,
    };

    #[test]
    fn a_key_fetched_again_keeps_counting_where_it_was() {
        let states = KeyStates::new();
        let now = states.now_us();
        let first = states.of("key-a");
        assert!(first.check(LIMITS, now).allowed());
        assert!(first.check(LIMITS, now).allowed());
        // The cache entry is dropped (an edit, a revocation, its ttl) and the key fetched
        // again: the new entry's state is the same one, still full for this second.
        drop(first);
        let again = states.of("key-a");
        assert!(!again.check(LIMITS, now).allowed());
        assert!(states.of("key-b").check(LIMITS, now).allowed());
    }

    #[test]
    fn a_key_is_pending_once_until_its_use_is_taken() {
        let states = KeyStates::new();
        let key = states.of("key-a");
        let (ip1, ip2) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        let (t1, t2) = (
            Timestamp::from_second(1).unwrap(),
            Timestamp::from_second(2).unwrap(),
        );
        assert!(key.note_use(t1, ip1), "first use: to be queued");
        assert!(!key.note_use(t2, ip2), "already queued");
        assert_eq!(key.take_use(), Some((t2, ip2)), "the latest use");
        assert_eq!(key.take_use(), None);
        assert!(key.note_use(t1, ip1), "used after the take: queued again");
    }

    #[test]
    fn sweep_keeps_states_in_use_and_drops_idle_ones() {
        let states = KeyStates::new();
        let held = states.of("held");
        let counting = states.of("counting");
        assert!(counting.check(LIMITS, states.now_us()).allowed());
        drop(counting);
        let pending = states.of("pending");
        pending.note_use(Timestamp::now(), "192.0.2.1".parse().unwrap());
        drop(pending);
        drop(states.of("idle"));
        states.sweep();
        assert_eq!(states.len(), 3, "only the idle, unheld state goes");
        drop(held);
        states.of("pending").take_use();
        states.sweep();
        assert_eq!(states.len(), 1, "still counting");
    }
}
