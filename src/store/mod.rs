//! The key store: the trait every backend implements, and the backends. This is the only
//! place that knows how keys, usage and audit events are laid out in storage.

mod redis_store;
mod sqlite;

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use jiff::Timestamp;

use crate::key::KeyRecord;

pub use redis_store::RedisStore;
pub use sqlite::SqliteStore;

/// Why a store operation did not happen.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no such key")]
    NotFound,
    /// The change would break a rule (name taken, too many keys, key not editable).
    #[error("{0}")]
    Conflict(String),
    /// The store could not be reached or failed; the operation may or may not have happened.
    #[error("store unavailable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Which keys `list_keys` returns. Status filtering is the caller's: it depends on the time.
#[derive(Debug, Clone, Default)]
pub struct KeyFilter {
    pub owner: Option<String>,
    /// Case-insensitive substring of name, description or display prefix.
    pub search: Option<String>,
}

/// A key's latest use, as the gateway saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRecord {
    /// Shared with the gateway's own maps: a flush copies no key id.
    pub key_id: Arc<str>,
    pub at: Timestamp,
    pub ip: IpAddr,
}

/// What happened to a key, for the audit log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditKind {
    Created,
    Edited,
    Revoked,
    Rotated,
    RateLimited,
}

impl AuditKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AuditKind::Created => "created",
            AuditKind::Edited => "edited",
            AuditKind::Revoked => "revoked",
            AuditKind::Rotated => "rotated",
            AuditKind::RateLimited => "rate_limited",
        }
    }

    pub fn parse(text: &str) -> Option<AuditKind> {
        [
            AuditKind::Created,
            AuditKind::Edited,
            AuditKind::Revoked,
            AuditKind::Rotated,
            AuditKind::RateLimited,
        ]
        .into_iter()
        .find(|k| k.as_str() == text)
    }
}

/// One audit event.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEvent {
    pub at: Timestamp,
    pub kind: AuditKind,
    pub key_id: String,
    /// Event-specific facts (never a secret).
    pub detail: serde_json::Value,
}

/// A key store. Every method is one atomic step: it happens entirely or not at all.
#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Adds a new key. `Conflict` if the owner already has a non-revoked key of that name
    /// in another rotation family, or already has `max_per_owner` non-revoked keys.
    async fn insert_key(&self, key: &KeyRecord, max_per_owner: u32) -> Result<(), StoreError>;

    /// Adds `new` as the replacement of `old_id` and makes the old key expire at
    /// `old_expires_at` unless it already expires earlier. Returns the old key as updated.
    /// `NotFound` if there is no such key, `Conflict` if it is revoked.
    async fn rotate_key(
        &self,
        old_id: &str,
        new: &KeyRecord,
        old_expires_at: Timestamp,
    ) -> Result<KeyRecord, StoreError>;

    /// The key whose secret has this SHA-256 digest.
    async fn key_by_hash(&self, hash: &[u8; 32]) -> Result<Option<KeyRecord>, StoreError>;

    /// The key with this id.
    async fn key_by_id(&self, id: &str) -> Result<Option<KeyRecord>, StoreError>;

    /// Keys matching the filter, oldest first.
    async fn list_keys(&self, filter: &KeyFilter) -> Result<Vec<KeyRecord>, StoreError>;

    /// Changes name and/or description (`Some(None)` clears it). `Conflict` for a revoked or
    /// expired key (at `now`) or a name the owner already uses.
    async fn edit_key(
        &self,
        id: &str,
        name: Option<&str>,
        description: Option<Option<&str>>,
        now: Timestamp,
    ) -> Result<KeyRecord, StoreError>;

    /// Revokes a key at `at`; revoking a revoked key keeps its first `revoked_at`.
    async fn revoke_key(&self, id: &str, at: Timestamp) -> Result<KeyRecord, StoreError>;

    /// Records last uses; a record older than what the store has is ignored (latest wins).
    /// Shared, not borrowed: a store that writes on another thread takes the batch along
    /// without copying it (a flush can hold tens of thousands of records).
    async fn record_usage(&self, batch: Arc<[UsageRecord]>) -> Result<(), StoreError>;

    /// Appends audit events.
    async fn append_audit(&self, events: &[AuditEvent]) -> Result<(), StoreError>;

    /// The latest `limit` events, newest first, optionally of one key.
    async fn audit(
        &self,
        key_id: Option<&str>,
        limit: usize,
    ) -> Result<Vec<AuditEvent>, StoreError>;

    /// Answers when the store is reachable.
    async fn ping(&self) -> Result<(), StoreError>;
}

/// Whether the store answered lately, so that requests do not wait on a store known to be
/// down: the request path marks it down on a failure, the background probe marks it up again.
#[derive(Debug, Default)]
pub(crate) struct StoreHealth {
    down: AtomicBool,
}

impl StoreHealth {
    pub(crate) fn is_up(&self) -> bool {
        !self.down.load(Ordering::Relaxed)
    }

    pub(crate) fn failed(&self, cause: &(dyn std::error::Error + 'static)) {
        if !self.down.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                cause = %crate::error_chain(cause),
                "store unreachable: serving cached keys, unknown keys get 503, limits follow on_store_error"
            );
        }
    }

    pub(crate) fn answered(&self) {
        if self.down.swap(false, Ordering::Relaxed) {
            tracing::info!("store reachable again");
        }
    }
}
