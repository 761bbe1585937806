//! Last-used time and IP of keys, and audit events raised by the data plane, written to the
//! store in batches every `usage.flush_interval`: a request only touches memory.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use jiff::Timestamp;

use crate::ratelimit::Window;
use crate::store::{AuditEvent, AuditKind, Store, StoreError, UsageRecord};

/// A key's `rate_limited` audit event is written at most once per this period.
const RATE_LIMITED_AUDIT_EVERY: Duration = Duration::from_secs(60);

#[derive(Debug)]
pub(crate) struct UsageRecorder {
    pending: DashMap<Arc<str>, (Timestamp, IpAddr), foldhash::fast::RandomState>,
    audit: Mutex<Vec<AuditEvent>>,
    rate_limited_noted: DashMap<Arc<str>, Instant>,
}

impl Default for UsageRecorder {
    fn default() -> UsageRecorder {
        UsageRecorder {
            pending: DashMap::with_hasher_and_shard_amount(
                Default::default(),
                crate::KEY_MAP_SHARDS,
            ),
            audit: Mutex::default(),
            rate_limited_noted: DashMap::new(),
        }
    }
}

impl UsageRecorder {
    /// Notes a use of a key; the latest use wins.
    pub(crate) fn record(&self, key: &Arc<str>, ip: IpAddr) {
        let now = Timestamp::now();
        match self.pending.get_mut(key) {
            Some(mut entry) => *entry = (now, ip),
            None => {
                self.pending.insert(Arc::clone(key), (now, ip));
            }
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
        let n = self.pending.len();
        self.pending.clear();
        n
    }

    pub(crate) fn push_audit(&self, event: AuditEvent) {
        self.audit
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(event);
    }

    /// Writes everything pending. What the store refuses stays pending for the next flush.
    pub(crate) async fn flush(&self, store: &dyn Store) -> Result<(), StoreError> {
        let keys: Vec<Arc<str>> = self.pending.iter().map(|e| Arc::clone(e.key())).collect();
        let mut batch = Vec::with_capacity(keys.len());
        for key in keys {
            if let Some((key, (at, ip))) = self.pending.remove(&key) {
                batch.push((key, at, ip));
            }
        }
        let events = std::mem::take(&mut *self.audit.lock().unwrap_or_else(|p| p.into_inner()));
        self.rate_limited_noted
            .retain(|_, at| at.elapsed() < RATE_LIMITED_AUDIT_EVERY);

        let mut result = Ok(());
        if !batch.is_empty() {
            let records: Vec<UsageRecord> = batch
                .iter()
                .map(|(key, at, ip)| UsageRecord {
                    key_id: key.to_string(),
                    at: *at,
                    ip: *ip,
                })
                .collect();
            let written = store.record_usage(&records).await;
            tracing::debug!(records = records.len(), ok = written.is_ok(), "usage flush");
            if let Err(e) = written {
                for (key, at, ip) in batch {
                    // Keep what came in meanwhile if it is newer.
                    self.pending
                        .entry(key)
                        .and_modify(|v| {
                            if v.0 < at {
                                *v = (at, ip)
                            }
                        })
                        .or_insert((at, ip));
                }
                result = Err(e);
            }
        }
        if !events.is_empty()
            && let Err(e) = store.append_audit(&events).await
        {
            let mut audit = self.audit.lock().unwrap_or_else(|p| p.into_inner());
            let newer = std::mem::replace(&mut *audit, events);
            audit.extend(newer);
            result = result.and(Err(e));
        }
        result
    }
}
