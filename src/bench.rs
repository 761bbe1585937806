//! Entry points for `benches/`: the real request pipeline's parts, driven without a socket.
//! Not an API; hidden from the docs and free to change with the benchmarks.

use std::net::IpAddr;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use hyper::HeaderMap;

use crate::config::Config;
use crate::gateway::Gateway;
use crate::key::KeyRecord;
use crate::store::{SqliteStore, Store};

/// A gateway on the embedded store, as `serve` builds it, minus the listeners.
#[derive(Debug)]
pub struct HotPath {
    gateway: Gateway,
}

impl HotPath {
    pub fn new(config: Config, store: SqliteStore) -> HotPath {
        let store: Arc<dyn Store> = Arc::new(store);
        let gateway =
            Gateway::new(Arc::new(config), store, None).expect("routes of a valid config");
        HotPath { gateway }
    }

    /// What a request with these headers gets before it is forwarded: failed-auth check,
    /// credential, shape and checksum, digest, cache (else store) lookup, status, usage record
    /// and both rate-limit windows. `true` when it would be forwarded.
    pub async fn admit(&self, headers: &HeaderMap, client_ip: IpAddr) -> bool {
        let now = crate::clock::now();
        let Ok((key, _)) = self.gateway.authenticate(headers, client_ip, now).await else {
            return false;
        };
        self.gateway.usage.record(&key.state, client_ip, now);
        matches!(self.gateway.rate_check(&key).await, Ok(v) if v.refused_by.is_none())
    }

    /// [`HotPath::admit`] for a key already in the cache: then nothing waits, so the future is
    /// polled once, in place, without an executor. Panics if it would have waited.
    pub fn admit_cached(&self, headers: &HeaderMap, client_ip: IpAddr) -> bool {
        let future = pin!(self.admit(headers, client_ip));
        match future.poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(admitted) => admitted,
            Poll::Pending => panic!("a cache hit waited"),
        }
    }

    /// Caches these keys as a store lookup would, in the order given, without the store: how
    /// a million keys get in use in seconds instead of a million lookups.
    pub fn cache(&self, records: impl IntoIterator<Item = KeyRecord>) {
        for record in records {
            self.gateway.remember(record.hash, Some(record));
        }
    }

    /// Forgets every cached key, so the next request of each asks the store.
    pub fn clear_cache(&self) {
        self.gateway.cache.clear();
    }

    /// Drops the recorded usage, as a flush would, so a long benchmark does not grow it.
    pub fn drop_usage(&self) -> usize {
        self.gateway.usage.discard_pending()
    }
}

/// Keys for a benchmark's store, each with its secret; limits high enough that nothing is
/// refused.
pub fn keys(count: usize, prefix: &str) -> Vec<(String, KeyRecord)> {
    let now = jiff::Timestamp::now();
    (0..count)
        .map(|i| {
            let secret = crate::credential::generate(prefix);
            let id = crate::key::new_id();
            let record = KeyRecord {
                hash: crate::credential::digest(&secret),
                prefix: crate::credential::display_prefix(&secret).to_string(),
                name: format!("bench-{i}"),
                description: None,
                owner: format!("bench-{}", i % 1000),
                family: id.clone(),
                id,
                created_at: now,
                expires_at: None,
                revoked_at: None,
                last_used_at: None,
                last_used_ip: None,
                per_minute: Some(1_000_000_000),
                per_second: Some(1_000_000_000),
                metadata: Default::default(),
            };
            (secret, record)
        })
        .collect()
}

/// Writes keys into an embedded store in one transaction, without the per-owner rules.
pub fn import(store: &SqliteStore, keys: &[(String, KeyRecord)]) {
    store
        .import(keys.iter().map(|(_, record)| record))
        .expect("import");
}
