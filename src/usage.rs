//! Last-used time and IP of keys, and audit events raised by the data plane, written to the
//! store in batches every `usage.flush_interval`: a request only touches memory.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use jiff::Timestamp;

use crate::key_state::KeyState;
use crate::lock;
use crate::ratelimit::Window;
use crate::store::{AuditEvent, AuditKind, Store, StoreError, UsageRecord};

/// A key's `rate_limited` audit event is written at most once per this period.
const RATE_LIMITED_AUDIT_EVERY: Duration = Duration::from_secs(60);

#[derive(Debug, Default)]
pub(crate) struct UsageRecorder {
    /// Keys with a use not yet taken, each once: the use itself is in the key's state, so a
    /// request only writes there, and puts the key here on its first use after a flush.
    pending: Mutex<Vec<Arc<KeyState>>>,
    /// Uses a store refused, the latest per key, written again with the next flush (however
    /// long the store stays away, one per key).
    refused: Mutex<HashMap<Arc<str>, (Timestamp, IpAddr)>>,
    audit: Mutex<Vec<AuditEvent>>,
    rate_limited_noted: DashMap<Arc<str>, Instant>,
}

impl UsageRecorder {
    /// Notes a use of a key; the latest use wins.
    pub(crate) fn record(&self, key: &Arc<KeyState>, ip: IpAddr, now: Timestamp) {
        if key.note_use(now, ip) {
            lock(&self.pending).push(Arc::clone(key));
        }
    }

    /// Notes that a key was refused by its rate limit, at most once a minute per key.
    pub(crate) fn note_rate_limited(&self, key: &Arc<str>, window: Window) {
        let now = Instant::now();
        if let Some(last) = self.rate_limited_noted.get(key)
            && now.duration_since(*last) < RATE_LIMITED_AUDIT_EVERY
        {
            return;
        }
        self.rate_limited_noted.insert(Arc::clone(key), now);
        self.push_audit(AuditEvent {
            at: Timestamp::now(),
            kind: AuditKind::RateLimited,
            key_id: key.to_string(),
            detail: serde_json::json!({ "limit": window.as_str() }),
        });
    }

    /// Forgets pending uses unwritten (benchmarks only: a flush without a store).
    pub(crate) fn discard_pending(&self) -> usize {
        let mut batch = Vec::new();
        self.take_pending(&mut batch);
        batch.len()
    }

    pub(crate) fn push_audit(&self, event: AuditEvent) {
        lock(&self.audit).push(event);
    }

    /// Moves the pending uses into `batch`, as records for the store: first those a store
    /// refused, then the newer ones.
    fn take_pending(&self, batch: &mut Vec<UsageRecord>) {
        batch.extend(
            lock(&self.refused)
                .drain()
                .map(|(key_id, (at, ip))| UsageRecord { key_id, at, ip }),
        );
        let keys = std::mem::take(&mut *lock(&self.pending));
        batch.extend(keys.iter().filter_map(|key| {
            let (at, ip) = key.take_use()?;
            Some(UsageRecord {
                key_id: Arc::clone(&key.id),
                at,
                ip,
            })
        }));
    }

    /// Writes everything pending. What the store refuses stays pending for the next flush.
    pub(crate) async fn flush(self: &Arc<Self>, store: &dyn Store) -> Result<(), StoreError> {
        // On the blocking pool: with a million keys in use a flush takes some 25,000 uses, and
        // draining them on the event loop held requests up (A/B at 1M keys: p99 16–33 ms
        // drained on the loop, 5–8 ms with no flushes, mostly 8–11 ms drained here; the runs
        // above that meet a usage-log fold). The blocking thread allocates nothing: memory a
        // pool thread allocates stays with its allocator heap while it idles, which raised peak
        // RSS at 1M keys by ~300 MB when the key ids were copied there.
        let recorder = Arc::clone(self);
        // Room for uses that come in meanwhile, so the vector is not regrown over there.
        let waiting = lock(&self.pending).len() + lock(&self.refused).len();
        let mut batch = Vec::with_capacity(waiting * 5 / 4 + 64);
        let batch: Arc<[UsageRecord]> = tokio::task::spawn_blocking(move || {
            recorder.take_pending(&mut batch);
            batch
        })
        .await
        .map_err(|e| StoreError::Unavailable(e.into()))?
        .into();
        let events = std::mem::take(&mut *lock(&self.audit));
        self.rate_limited_noted
            .retain(|_, at| at.elapsed() < RATE_LIMITED_AUDIT_EVERY);

        let mut result = Ok(());
        if !batch.is_empty() {
            let written = store.record_usage(Arc::clone(&batch)).await;
            tracing::debug!(records = batch.len(), ok = written.is_ok(), "usage flush");
            if let Err(e) = written {
                let mut refused = lock(&self.refused);
                for r in batch.iter() {
                    let (at, ip) = (r.at, r.ip);
                    refused
                        .entry(Arc::clone(&r.key_id))
                        .and_modify(|seen| {
                            if seen.0 <= at {
                                *seen = (at, ip)
                            }
                        })
                        .or_insert((at, ip));
                }
                result = Err(e);
            }
            // Dropped off the event loop too: the batch's last owner releases a key id per use,
            // some 38,000 a flush at a million keys in use, which held requests up by
            // 0.32-0.36 ms every flush (timed under the load bench's load).
            tokio::task::spawn_blocking(move || drop(batch));
        }
        if !events.is_empty()
            && let Err(e) = store.append_audit(&events).await
        {
            let mut audit = lock(&self.audit);
            let newer = std::mem::replace(&mut *audit, events);
            audit.extend(newer);
            result = result.and(Err(e));
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SqliteStore;

    #[tokio::test]
    async fn uses_a_store_refuses_stay_pending_until_a_flush_gets_through() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keygate.db");
        let store = SqliteStore::open(&path).unwrap();
        let keys = crate::bench::keys(3, "kg_");
        crate::bench::import(&store, &keys);
        let states = crate::key_state::KeyStates::new();
        let key = |i: usize| states.of(&keys[i].1.id);
        let (a, b, c) = (key(0), key(1), key(2));
        // A real failure of the store: the table uses go to is gone.
        let other = rusqlite::Connection::open(&path).unwrap();
        other
            .execute_batch("ALTER TABLE usage_batches RENAME TO away")
            .unwrap();

        // Whole milliseconds, as the store keeps them, one second apart.
        let base = Timestamp::now().as_millisecond() - 10_000;
        let at = |s: i64| Timestamp::from_millisecond(base + s * 1000).unwrap();
        let usage = Arc::new(UsageRecorder::default());
        usage.record(&a, "192.0.2.1".parse().unwrap(), at(1));
        usage.record(&c, "192.0.2.3".parse().unwrap(), at(2));
        assert!(usage.flush(&store).await.is_err());
        // Refused again: still one use per key waiting, not one per failed flush.
        usage.record(&c, "192.0.2.3".parse().unwrap(), at(2));
        assert!(usage.flush(&store).await.is_err());
        assert_eq!(lock(&usage.refused).len(), 2);
        usage.record(&b, "192.0.2.2".parse().unwrap(), at(3));
        // A later use of a key whose use was refused is the one written.
        usage.record(&c, "192.0.2.4".parse().unwrap(), at(4));
        other
            .execute_batch("ALTER TABLE away RENAME TO usage_batches")
            .unwrap();
        usage.flush(&store).await.unwrap();

        for (state, ip, when) in [
            (&a, "192.0.2.1", at(1)),
            (&b, "192.0.2.2", at(3)),
            (&c, "192.0.2.4", at(4)),
        ] {
            let id = &state.id;
            let key = store.key_by_id(id).await.unwrap().unwrap();
            assert_eq!(key.last_used_ip, Some(ip.parse().unwrap()), "{id}");
            assert_eq!(key.last_used_at, Some(when), "{id}");
        }
        assert!(lock(&usage.pending).is_empty() && lock(&usage.refused).is_empty());
    }
}
