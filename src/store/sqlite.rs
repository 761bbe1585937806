//! The embedded store: one SQLite file (bundled library, WAL journal). SQLite gives atomic,
//! crash-safe commits and the queries that list, search and audit need, without a server.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use async_trait::async_trait;
use jiff::Timestamp;
use rusqlite::{Connection, OptionalExtension, Row, Transaction, params};

use super::{AuditEvent, AuditKind, KeyFilter, Store, StoreError, UsageRecord};
use crate::key::KeyRecord;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS keys (
    id           TEXT PRIMARY KEY,
    hash         BLOB NOT NULL UNIQUE,
    prefix       TEXT NOT NULL,
    name         TEXT NOT NULL,
    description  TEXT,
    owner        TEXT NOT NULL,
    family       TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    expires_at   INTEGER,
    revoked_at   INTEGER,
    per_minute   INTEGER,
    per_second   INTEGER,
    metadata     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS keys_owner ON keys (owner, name);
CREATE TABLE IF NOT EXISTS key_usage (
    id TEXT PRIMARY KEY,
    at INTEGER NOT NULL,
    ip TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS usage_batches (
    seq  INTEGER PRIMARY KEY,
    uses BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    seq    INTEGER PRIMARY KEY AUTOINCREMENT,
    at     INTEGER NOT NULL,
    kind   TEXT NOT NULL,
    key_id TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_key ON audit (key_id, seq);
";

/// `PRAGMA user_version` of the schema above. Version 0 kept the last use in two columns of
/// `keys`, version 1 its log of uses as one row per use (`usage_log`); [`migrate`] moves both
/// to `key_usage`.
const SCHEMA_VERSION: i64 = 2;

/// Columns of [`key_from_row`], from `keys AS k LEFT JOIN key_usage AS u`.
const COLUMNS: &str = "k.id, k.hash, k.prefix, k.name, k.description, k.owner, k.family, \
    k.created_at, k.expires_at, k.revoked_at, u.at, u.ip, k.per_minute, k.per_second, k.metadata";

const FROM: &str = "keys AS k LEFT JOIN key_usage AS u ON u.id = k.id";

/// The data plane's lookup. `+?1`, not `?1`: on a join SQLite's planner reads the bound value
/// to guess how selective the term is, which marks the statement to be compiled again whenever
/// its bindings are cleared, as rusqlite's statement cache does after each use. Each lookup
/// then parsed and planned the query anew: 176,000 instructions (callgrind) of a cache miss's
/// 200,000. The unary plus hides the value from the planner; the index on `hash` still serves.
const KEY_BY_HASH: &str = "SELECT k.id, k.hash, k.prefix, k.name, k.description, k.owner, \
    k.family, k.created_at, k.expires_at, k.revoked_at, u.at, u.ip, k.per_minute, k.per_second, \
    k.metadata FROM keys AS k LEFT JOIN key_usage AS u ON u.id = k.id WHERE k.hash = +?1";

/// Uses logged in `usage_batches` that trigger a compaction of the log (see
/// [`Writer::compact_usage`]), at least; with more keys in the log, [`COMPACT_RATIO`] times as
/// many uses as keys.
const COMPACT_AT: usize = 200_000;

/// A log of `n` keys is compacted when it holds this many times `n` uses, so that a compaction
/// writes at most one use for every three logged since the last. At twice, it was one for one:
/// with a million keys in use, a compaction of 0.5-0.7 s for every million uses, 2% of the
/// core keygate shares with its upstream in the load bench (30,000 requests/s), on top of the
/// sweeps and flushes a thousand keys do not cost. The price is disk: the log holds up to four
/// uses a key, some 40 bytes each (160 MB at a million keys, beside the keys' 400 MB), read
/// back once when the store is opened.
const COMPACT_RATIO: usize = 4;

/// The size of the batches a compaction writes (some 25,000 uses each).
const COMPACTED_BATCH_BYTES: usize = 1 << 20;

/// The embedded store. SQLite connections are not `Sync`: each sits behind a mutex and every
/// call runs on the blocking pool, never on the async workers. Writes and admin reads share
/// one connection; the data plane's lookup by hash has its own, so it never waits behind a
/// write (WAL readers see the last commit).
///
/// Last use is written as a log. With a million keys in use, a flush of a second names some
/// 20,000 keys, each on a different page: updating them in place dirtied 20,000 pages per
/// flush and cost a third of a core. So a flush appends its uses to a log, as one row of
/// `usage_batches` (a few sequential pages), and the latest use of each key in the log is kept
/// in memory; reads take the latest of `key_usage` and memory.
///
/// The log is kept short by compaction, not by folding it into `key_usage` while serving: once
/// it holds [`COMPACT_AT`] uses, or [`COMPACT_RATIO`] times the keys it names, it is replaced by
/// batches of each key's latest use, written from memory. At a million keys a fold upserted a
/// million rows of `key_usage` every million uses, 2.4–3.8 s of the one core the load bench
/// gives keygate and its upstream, and each 10 s run it fell in served 25–40% fewer requests;
/// the compaction writes the same uses as sequential blobs (0.23–0.51 s under the same load
/// for 450,000 to a million keys, once per million uses). The fold into `key_usage` is done when the store is opened, from the
/// log read back. The cost is memory: the latest use of each key used since the store was
/// opened stays in memory, some 60–80 bytes a key, where a fold emptied that map.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    writer: Arc<Mutex<Writer>>,
    reader: Arc<Mutex<Connection>>,
    /// The latest use per key in the log, not yet folded into `key_usage`. Changed only by the
    /// writer; a compaction reads it while lookups do.
    unfolded: Arc<RwLock<Unfolded>>,
}

#[derive(Debug, Default)]
struct Unfolded {
    /// By the gateway's own `Arc` of each key id: noting a use copies no text.
    latest: HashMap<Arc<str>, (i64, IpAddr), foldhash::fast::RandomState>,
    /// Uses in the log, all keys together.
    logged: usize,
}

impl Unfolded {
    fn note(&mut self, key_id: &Arc<str>, at: i64, ip: IpAddr) {
        match self.latest.get_mut(&**key_id) {
            Some(seen) if seen.0 > at => {}
            Some(seen) => *seen = (at, ip),
            None => {
                self.latest.insert(Arc::clone(key_id), (at, ip));
            }
        }
        self.logged += 1;
    }

    /// Applies a newer unfolded use to a record read from the tables.
    fn patch(&self, key: &mut KeyRecord) {
        if let Some(&(at, ip)) = self.latest.get(key.id.as_str())
            && key
                .last_used_at
                .is_none_or(|seen| seen.as_millisecond() <= at)
            && let Ok(at) = Timestamp::from_millisecond(at)
        {
            key.last_used_at = Some(at);
            key.last_used_ip = Some(ip);
        }
    }
}

#[derive(Debug)]
struct Writer {
    conn: Connection,
    unfolded: Arc<RwLock<Unfolded>>,
    /// A flush's uses as a `usage_batches` blob, kept between flushes for its capacity.
    blob: Vec<u8>,
    /// Logged uses that trigger a compaction: [`COMPACT_AT`], or [`COMPACT_RATIO`] times the
    /// keys in the log.
    compact_at: usize,
}

impl Writer {
    fn unfolded(&self) -> RwLockReadGuard<'_, Unfolded> {
        self.unfolded.read().unwrap_or_else(|p| p.into_inner())
    }

    fn unfolded_mut(&self) -> RwLockWriteGuard<'_, Unfolded> {
        self.unfolded.write().unwrap_or_else(|p| p.into_inner())
    }

    fn get_key(&self, id: &str) -> Result<Option<KeyRecord>, StoreError> {
        let mut key = get_key(&self.conn, id)?;
        if let Some(key) = &mut key {
            self.unfolded().patch(key);
        }
        Ok(key)
    }

    /// Writes the latest use of each key in the log into `key_usage`, in key order so that
    /// each page of `key_usage` is written once, and empties the log. The latest uses come
    /// from memory: the log is not read back, nor sorted by SQLite. Done when the store is
    /// opened; while serving, [`Writer::compact_usage`] keeps the log short at a fraction of
    /// the cost (a million keys: 1.3–2.0 µs a key measured alone, 2.4–3.8 s under load).
    fn fold_usage(&mut self) -> Result<(), StoreError> {
        let started = std::time::Instant::now();
        let mut uses: Vec<(Arc<str>, i64, IpAddr)> = self
            .unfolded()
            .latest
            .iter()
            .map(|(id, &(at, ip))| (Arc::clone(id), at, ip))
            .collect();
        uses.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let tx = self.conn.transaction().map_err(unavailable)?;
        {
            let mut upsert = tx
                .prepare_cached(
                    "INSERT INTO key_usage (id, at, ip) VALUES (?1, ?2, ?3) \
                     ON CONFLICT (id) DO UPDATE SET at = excluded.at, ip = excluded.ip \
                     WHERE excluded.at >= key_usage.at",
                )
                .map_err(unavailable)?;
            let mut ip_text = String::new();
            for (id, at, ip) in &uses {
                ip_text.clear();
                let _ = write!(ip_text, "{ip}");
                upsert
                    .execute(params![&**id, at, ip_text])
                    .map_err(unavailable)?;
            }
        }
        tx.execute("DELETE FROM usage_batches", [])
            .map_err(unavailable)?;
        tx.commit().map_err(unavailable)?;
        *self.unfolded_mut() = Unfolded::default();
        self.compact_at = COMPACT_AT;
        tracing::debug!(keys = uses.len(), elapsed = ?started.elapsed(), "usage log folded");
        Ok(())
    }

    /// Replaces the log by batches holding the latest use of each key in it, from memory, in
    /// one transaction: what the log says is the same before and after. Batches of about
    /// [`COMPACTED_BATCH_BYTES`], so that neither this nor SQLite holds a copy of the whole.
    fn compact_usage(&mut self) -> Result<(), StoreError> {
        let started = std::time::Instant::now();
        let mut blob = std::mem::take(&mut self.blob);
        // Read while lookups read it too; only this writer changes it. The field, not
        // `Writer::unfolded`, so that the connection can be borrowed beside it.
        let unfolded = self.unfolded.read().unwrap_or_else(|p| p.into_inner());
        let written = self
            .conn
            .transaction()
            .and_then(|tx| {
                tx.execute("DELETE FROM usage_batches", [])?;
                let mut insert =
                    tx.prepare_cached("INSERT INTO usage_batches (uses) VALUES (?1)")?;
                blob.clear();
                for (id, &(at, ip)) in &unfolded.latest {
                    encode_use(id, at, ip, &mut blob);
                    if blob.len() >= COMPACTED_BATCH_BYTES {
                        insert.execute(params![blob.as_slice()])?;
                        blob.clear();
                    }
                }
                if !blob.is_empty() {
                    insert.execute(params![blob.as_slice()])?;
                }
                drop(insert);
                tx.commit()
            })
            .map_err(unavailable);
        let keys = unfolded.latest.len();
        drop(unfolded);
        blob.clear();
        self.blob = blob;
        written?;
        self.unfolded_mut().logged = keys;
        self.compact_at = COMPACT_AT.max(COMPACT_RATIO * keys);
        tracing::debug!(keys, elapsed = ?started.elapsed(), "usage log compacted");
        Ok(())
    }

    /// Takes into memory the uses a previous run logged and did not fold, then folds them.
    fn recover_usage(&mut self) -> Result<(), StoreError> {
        let mut unreadable = 0;
        {
            let mut batches = self
                .conn
                .prepare("SELECT uses FROM usage_batches ORDER BY seq")
                .map_err(unavailable)?;
            let mut rows = batches.query([]).map_err(unavailable)?;
            let mut unfolded = self.unfolded_mut();
            while let Some(row) = rows.next().map_err(unavailable)? {
                let blob = row
                    .get_ref(0)
                    .ok()
                    .and_then(|v| v.as_blob().ok())
                    .unwrap_or(&[]);
                let complete = decode_uses(blob, |id, at, ip| {
                    unfolded.note(&Arc::from(id), at, ip);
                });
                if !complete {
                    unreadable += 1;
                }
            }
        }
        if unreadable > 0 {
            tracing::warn!(
                batches = unreadable,
                "usage log: batches of uses unreadable past some point; their readable uses kept"
            );
        }
        self.fold_usage()
    }
}

/// Appends a flush's uses to `out` as one `usage_batches` blob: per use, the key id's length
/// (u16, little-endian) and bytes, the time (i64 milliseconds, little-endian), then the IP's
/// length (4 or 16) and bytes.
fn encode_uses(uses: &[UsageRecord], out: &mut Vec<u8>) {
    for use_ in uses {
        encode_use(&use_.key_id, millis(use_.at), use_.ip, out);
    }
}

/// One use of [`encode_uses`]; `at` in milliseconds.
fn encode_use(key_id: &str, at: i64, ip: IpAddr, out: &mut Vec<u8>) {
    let id = key_id.as_bytes();
    let Ok(len) = u16::try_from(id.len()) else {
        return; // no key id is this long; it could not be read back
    };
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(id);
    out.extend_from_slice(&at.to_le_bytes());
    match ip {
        IpAddr::V4(ip) => {
            out.push(4);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(16);
            out.extend_from_slice(&ip.octets());
        }
    }
}

/// Calls `f` with each use of an [`encode_uses`] blob; `false` if the blob ends in the middle
/// of a use or holds something else.
fn decode_uses(mut blob: &[u8], mut f: impl FnMut(&str, i64, IpAddr)) -> bool {
    fn take<'a>(blob: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, rest) = blob.split_at_checked(n)?;
        *blob = rest;
        Some(head)
    }
    let mut one = |blob: &mut &[u8]| -> Option<()> {
        let len = u16::from_le_bytes(take(blob, 2)?.try_into().ok()?);
        let id = std::str::from_utf8(take(blob, len.into())?).ok()?;
        let at = i64::from_le_bytes(take(blob, 8)?.try_into().ok()?);
        let ip = match take(blob, 1)?[0] {
            4 => IpAddr::from(<[u8; 4]>::try_from(take(blob, 4)?).ok()?),
            16 => IpAddr::from(<[u8; 16]>::try_from(take(blob, 16)?).ok()?),
            _ => return None,
        };
        f(id, at, ip);
        Some(())
    };
    while !blob.is_empty() {
        if one(&mut blob).is_none() {
            return false;
        }
    }
    true
}

fn unavailable(e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::Unavailable(Box::new(e))
}

impl SqliteStore {
    /// Opens (creating if needed) the store file and its directory.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(unavailable)?;
        }
        let mut conn = connect(path)?;
        migrate(&mut conn)?;
        let reader = connect(path)?;
        let unfolded = Arc::new(RwLock::new(Unfolded::default()));
        let mut writer = Writer {
            conn,
            unfolded: Arc::clone(&unfolded),
            blob: Vec::new(),
            compact_at: COMPACT_AT,
        };
        writer.recover_usage()?;
        Ok(SqliteStore {
            writer: Arc::new(Mutex::new(writer)),
            reader: Arc::new(Mutex::new(reader)),
            unfolded,
        })
    }

    /// Folds the usage log into `key_usage` now rather than when the store is next opened
    /// (tests).
    #[doc(hidden)]
    pub async fn fold_usage(&self) -> Result<(), StoreError> {
        self.run(Writer::fold_usage).await
    }

    /// Compacts the usage log now rather than at [`COMPACT_AT`] uses (tests).
    #[doc(hidden)]
    pub async fn compact_usage(&self) -> Result<(), StoreError> {
        self.run(Writer::compact_usage).await
    }

    /// Writes many keys in one transaction, without the name and per-owner rules of
    /// [`Store::insert_key`]: for loading benchmark stores of a million keys in seconds.
    #[doc(hidden)]
    pub fn import<'a>(
        &self,
        keys: impl IntoIterator<Item = &'a KeyRecord>,
    ) -> Result<(), StoreError> {
        let mut writer = crate::lock(&self.writer);
        let tx = writer.conn.transaction().map_err(unavailable)?;
        for key in keys {
            insert(&tx, key)?;
        }
        tx.commit().map_err(unavailable)
    }

    /// Runs `f` on the writing connection, on the blocking pool.
    async fn run<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Writer) -> Result<T, StoreError> + Send + 'static,
    {
        let writer = Arc::clone(&self.writer);
        tokio::task::spawn_blocking(move || {
            let mut writer = crate::lock(&writer);
            f(&mut writer)
        })
        .await
        .map_err(unavailable)?
    }
}

fn connect(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).map_err(unavailable)?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(unavailable)?;
    // WAL: readers never block the writer; FULL: a commit survives a power cut.
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(unavailable)?;
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(unavailable)?;
    Ok(conn)
}

/// Brings a store file to [`SCHEMA_VERSION`].
fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn.transaction().map_err(unavailable)?;
    let version: i64 = tx
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(unavailable)?;
    if version >= SCHEMA_VERSION {
        return Ok(());
    }
    tx.execute_batch(SCHEMA).map_err(unavailable)?;
    // A version-0 file has the last use in `keys` itself.
    if count(
        &tx,
        "SELECT COUNT(*) FROM pragma_table_info('keys') WHERE name = 'last_used_at'",
    )? > 0
    {
        tx.execute_batch(
            "INSERT INTO key_usage (id, at, ip)              SELECT id, last_used_at, coalesce(last_used_ip, '') FROM keys              WHERE last_used_at IS NOT NULL;              ALTER TABLE keys DROP COLUMN last_used_at;              ALTER TABLE keys DROP COLUMN last_used_ip;",
        )
        .map_err(unavailable)?;
    }
    // A version-1 file logs uses one row each, in `usage_log`.
    if count(
        &tx,
        "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'usage_log'",
    )? > 0
    {
        tx.execute_batch(
            "INSERT INTO key_usage (id, at, ip) \
             SELECT id, max(at), ip FROM usage_log WHERE true GROUP BY id \
             ON CONFLICT (id) DO UPDATE SET at = excluded.at, ip = excluded.ip \
             WHERE excluded.at >= key_usage.at; \
             DROP TABLE usage_log;",
        )
        .map_err(unavailable)?;
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)
        .map_err(unavailable)?;
    tx.commit().map_err(unavailable)
}

/// The one number a `SELECT COUNT(*) …` without parameters answers.
fn count(conn: &Connection, sql: &str) -> Result<i64, StoreError> {
    conn.query_row(sql, [], |r| r.get(0)).map_err(unavailable)
}

fn millis(at: Timestamp) -> i64 {
    at.as_millisecond()
}

fn from_millis(ms: i64) -> rusqlite::Result<Timestamp> {
    Timestamp::from_millisecond(ms).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Integer, Box::new(e))
    })
}

fn opt_from_millis(ms: Option<i64>) -> rusqlite::Result<Option<Timestamp>> {
    ms.map(from_millis).transpose()
}

fn key_from_row(row: &Row<'_>) -> rusqlite::Result<KeyRecord> {
    let hash: Vec<u8> = row.get(1)?;
    let ip: Option<String> = row.get(11)?;
    let metadata: String = row.get(14)?;
    Ok(KeyRecord {
        id: row.get(0)?,
        hash: hash.try_into().unwrap_or([0; 32]),
        prefix: row.get(2)?,
        name: row.get(3)?,
        description: row.get(4)?,
        owner: row.get(5)?,
        family: row.get(6)?,
        created_at: from_millis(row.get(7)?)?,
        expires_at: opt_from_millis(row.get(8)?)?,
        revoked_at: opt_from_millis(row.get(9)?)?,
        last_used_at: opt_from_millis(row.get(10)?)?,
        last_used_ip: ip.and_then(|ip| ip.parse::<IpAddr>().ok()),
        per_minute: row.get(12)?,
        per_second: row.get(13)?,
        metadata: serde_json::from_str(&metadata).unwrap_or_default(),
    })
}

fn get_key(tx: &Connection, id: &str) -> Result<Option<KeyRecord>, StoreError> {
    tx.query_row(
        &format!("SELECT {COLUMNS} FROM {FROM} WHERE k.id = ?1"),
        params![id],
        key_from_row,
    )
    .optional()
    .map_err(unavailable)
}

/// `Conflict` when another rotation family of this owner has a non-revoked key named `name`.
fn check_name_free(
    tx: &Transaction<'_>,
    owner: &str,
    name: &str,
    family: &str,
) -> Result<(), StoreError> {
    let taken: i64 = tx
        .query_row(
            "SELECT COUNT(*) FROM keys WHERE owner = ?1 AND name = ?2 \
             AND revoked_at IS NULL AND family != ?3",
            params![owner, name, family],
            |r| r.get(0),
        )
        .map_err(unavailable)?;
    if taken > 0 {
        return Err(StoreError::Conflict(format!(
            "owner `{owner}` already has a key named `{name}`"
        )));
    }
    Ok(())
}

fn insert(tx: &Transaction<'_>, key: &KeyRecord) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO keys (id, hash, prefix, name, description, owner, family, created_at, \
         expires_at, revoked_at, per_minute, per_second, metadata) VALUES \
         (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
        params![
            key.id,
            key.hash.as_slice(),
            key.prefix,
            key.name,
            key.description,
            key.owner,
            key.family,
            millis(key.created_at),
            key.expires_at.map(millis),
            key.revoked_at.map(millis),
            key.per_minute,
            key.per_second,
            serde_json::to_string(&key.metadata).expect("string map serializes"),
        ],
    )
    .map_err(unavailable)?;
    if let (Some(at), Some(ip)) = (key.last_used_at, key.last_used_ip) {
        tx.execute(
            "INSERT OR REPLACE INTO key_usage (id, at, ip) VALUES (?1, ?2, ?3)",
            params![key.id, millis(at), ip.to_string()],
        )
        .map_err(unavailable)?;
    }
    Ok(())
}

#[async_trait]
impl Store for SqliteStore {
    async fn insert_key(&self, key: &KeyRecord, max_per_owner: u32) -> Result<(), StoreError> {
        let key = key.clone();
        self.run(move |w| {
            let tx = w.conn.transaction().map_err(unavailable)?;
            check_name_free(&tx, &key.owner, &key.name, &key.family)?;
            let live: i64 = tx
                .query_row(
                    "SELECT COUNT(*) FROM keys WHERE owner = ?1 AND revoked_at IS NULL",
                    params![key.owner],
                    |r| r.get(0),
                )
                .map_err(unavailable)?;
            if live >= i64::from(max_per_owner) {
                return Err(StoreError::Conflict(format!(
                    "owner `{}` already has {live} keys, the most allowed (keys.max_per_owner); revoke one first",
                    key.owner
                )));
            }
            insert(&tx, &key)?;
            tx.commit().map_err(unavailable)
        })
        .await
    }

    async fn rotate_key(
        &self,
        old_id: &str,
        new: &KeyRecord,
        old_expires_at: Timestamp,
    ) -> Result<KeyRecord, StoreError> {
        let (old_id, new) = (old_id.to_string(), new.clone());
        self.run(move |w| {
            let tx = w.conn.transaction().map_err(unavailable)?;
            let mut old = get_key(&tx, &old_id)?.ok_or(StoreError::NotFound)?;
            if old.revoked_at.is_some() {
                return Err(StoreError::Conflict(
                    "a revoked key cannot be rotated".into(),
                ));
            }
            let expires = match old.expires_at {
                Some(at) if at < old_expires_at => at,
                _ => old_expires_at,
            };
            tx.execute(
                "UPDATE keys SET expires_at = ?2 WHERE id = ?1",
                params![old_id, millis(expires)],
            )
            .map_err(unavailable)?;
            old.expires_at = Some(expires);
            insert(&tx, &new)?;
            tx.commit().map_err(unavailable)?;
            w.unfolded().patch(&mut old);
            Ok(old)
        })
        .await
    }

    async fn key_by_hash(&self, hash: &[u8; 32]) -> Result<Option<KeyRecord>, StoreError> {
        let hash = *hash;
        let (reader, unfolded) = (Arc::clone(&self.reader), Arc::clone(&self.unfolded));
        tokio::task::spawn_blocking(move || {
            let conn = crate::lock(&reader);
            // The one query of the data plane: prepared once per connection, not per request.
            let mut key = conn
                .prepare_cached(KEY_BY_HASH)
                .and_then(|mut query| query.query_row(params![hash.as_slice()], key_from_row))
                .optional()
                .map_err(unavailable)?;
            if let Some(key) = &mut key {
                unfolded
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .patch(key);
            }
            Ok(key)
        })
        .await
        .map_err(unavailable)?
    }

    async fn key_by_id(&self, id: &str) -> Result<Option<KeyRecord>, StoreError> {
        let id = id.to_string();
        self.run(move |w| w.get_key(&id)).await
    }

    async fn list_keys(&self, filter: &KeyFilter) -> Result<Vec<KeyRecord>, StoreError> {
        let filter = filter.clone();
        self.run(move |w| {
            let search = filter.search.as_deref().map(|s| {
                let escaped = s
                    .replace('\\', "\\\\")
                    .replace('%', "\\%")
                    .replace('_', "\\_");
                format!("%{escaped}%")
            });
            let mut stmt = w
                .conn
                .prepare_cached(&format!(
                    "SELECT {COLUMNS} FROM {FROM} \
                     WHERE (?1 IS NULL OR k.owner = ?1) \
                     AND (?2 IS NULL OR k.name LIKE ?2 ESCAPE '\\' \
                          OR k.description LIKE ?2 ESCAPE '\\' OR k.prefix LIKE ?2 ESCAPE '\\') \
                     ORDER BY k.created_at, k.id"
                ))
                .map_err(unavailable)?;
            let mut keys = stmt
                .query_map(params![filter.owner, search], key_from_row)
                .map_err(unavailable)?
                .collect::<rusqlite::Result<Vec<_>>>()
                .map_err(unavailable)?;
            let unfolded = w.unfolded();
            for key in &mut keys {
                unfolded.patch(key);
            }
            Ok(keys)
        })
        .await
    }

    async fn edit_key(
        &self,
        id: &str,
        name: Option<&str>,
        description: Option<Option<&str>>,
        now: Timestamp,
    ) -> Result<KeyRecord, StoreError> {
        let id = id.to_string();
        let name = name.map(str::to_string);
        let description = description.map(|d| d.map(str::to_string));
        self.run(move |w| {
            let tx = w.conn.transaction().map_err(unavailable)?;
            let mut key = get_key(&tx, &id)?.ok_or(StoreError::NotFound)?;
            if !key.status(now).is_usable() {
                return Err(StoreError::Conflict(format!(
                    "key `{id}` is {} and can no longer be edited",
                    key.status(now).as_str()
                )));
            }
            if let Some(name) = name {
                if name != key.name {
                    check_name_free(&tx, &key.owner, &name, &key.family)?;
                }
                key.name = name;
            }
            if let Some(description) = description {
                key.description = description;
            }
            tx.execute(
                "UPDATE keys SET name = ?2, description = ?3 WHERE id = ?1",
                params![id, key.name, key.description],
            )
            .map_err(unavailable)?;
            tx.commit().map_err(unavailable)?;
            w.unfolded().patch(&mut key);
            Ok(key)
        })
        .await
    }

    async fn revoke_key(&self, id: &str, at: Timestamp) -> Result<KeyRecord, StoreError> {
        let id = id.to_string();
        self.run(move |w| {
            let tx = w.conn.transaction().map_err(unavailable)?;
            tx.execute(
                "UPDATE keys SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
                params![id, millis(at)],
            )
            .map_err(unavailable)?;
            let mut key = get_key(&tx, &id)?.ok_or(StoreError::NotFound)?;
            tx.commit().map_err(unavailable)?;
            w.unfolded().patch(&mut key);
            Ok(key)
        })
        .await
    }

    async fn record_usage(&self, batch: Arc<[UsageRecord]>) -> Result<(), StoreError> {
        self.run(move |w| {
            // One row for the whole flush: a row per use cost more than the rest of the store's
            // work at a million keys in use.
            w.blob.clear();
            encode_uses(&batch, &mut w.blob);
            w.conn
                .prepare_cached("INSERT INTO usage_batches (uses) VALUES (?1)")
                .and_then(|mut insert| insert.execute(params![w.blob.as_slice()]))
                .map_err(unavailable)?;
            let mut unfolded = w.unfolded_mut();
            for record in batch.iter() {
                unfolded.note(&record.key_id, millis(record.at), record.ip);
            }
            let full = unfolded.logged >= w.compact_at;
            drop(unfolded);
            // The uses are in the store already; a compaction that fails is tried again at the
            // next flush.
            if full && let Err(e) = w.compact_usage() {
                tracing::warn!(error = %e, "compacting the usage log failed; retrying at the next flush");
            }
            Ok(())
        })
        .await
    }

    async fn append_audit(&self, events: &[AuditEvent]) -> Result<(), StoreError> {
        let events = events.to_vec();
        self.run(move |w| {
            let tx = w.conn.transaction().map_err(unavailable)?;
            {
                let mut stmt = tx
                    .prepare_cached(
                        "INSERT INTO audit (at, kind, key_id, detail) VALUES (?1, ?2, ?3, ?4)",
                    )
                    .map_err(unavailable)?;
                for event in &events {
                    stmt.execute(params![
                        millis(event.at),
                        event.kind.as_str(),
                        event.key_id,
                        event.detail.to_string()
                    ])
                    .map_err(unavailable)?;
                }
            }
            tx.commit().map_err(unavailable)
        })
        .await
    }

    async fn audit(
        &self,
        key_id: Option<&str>,
        limit: usize,
    ) -> Result<Vec<AuditEvent>, StoreError> {
        let key_id = key_id.map(str::to_string);
        self.run(move |w| {
            let mut stmt = w
                .conn
                .prepare_cached(
                    "SELECT at, kind, key_id, detail FROM audit \
                     WHERE (?1 IS NULL OR key_id = ?1) ORDER BY seq DESC LIMIT ?2",
                )
                .map_err(unavailable)?;
            stmt.query_map(params![key_id, limit as i64], |row| {
                let kind: String = row.get(1)?;
                let detail: String = row.get(3)?;
                Ok(AuditEvent {
                    at: from_millis(row.get(0)?)?,
                    kind: AuditKind::parse(&kind).unwrap_or(AuditKind::Edited),
                    key_id: row.get(2)?,
                    detail: serde_json::from_str(&detail).unwrap_or_default(),
                })
            })
            .map_err(unavailable)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(unavailable)
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.run(|w| {
            w.conn
                .query_row("SELECT 1", [], |_| Ok(()))
                .map_err(unavailable)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use rusqlite::StatementStatus;

    use super::*;

    #[test]
    fn a_batch_of_uses_reads_back_as_written_and_a_cut_one_up_to_the_cut() {
        let at = Timestamp::from_millisecond(1_790_000_000_123).unwrap();
        let uses = [
            ("01J9ZK5QW7X8Y9Z0A1B2C3D4E5", "192.0.2.1"),
            ("k", "2001:db8::7"),
        ]
        .map(|(id, ip)| UsageRecord {
            key_id: Arc::from(id),
            at,
            ip: ip.parse().unwrap(),
        });
        let mut blob = Vec::new();
        encode_uses(&uses, &mut blob);
        let read = |blob: &[u8]| {
            let mut seen = Vec::new();
            let complete = decode_uses(blob, |id, ms, ip| seen.push((id.to_string(), ms, ip)));
            (complete, seen)
        };
        let written: Vec<_> = uses
            .iter()
            .map(|u| (u.key_id.to_string(), millis(u.at), u.ip))
            .collect();
        assert_eq!(read(&blob), (true, written.clone()));
        assert_eq!(
            read(&blob[..blob.len() - 1]),
            (false, written[..1].to_vec())
        );
        assert_eq!(read(&[]), (true, Vec::new()));
    }

    /// A log past [`COMPACT_AT`] uses becomes batches holding each key's latest use once, and
    /// reads back as such when the store is opened again.
    #[tokio::test]
    async fn a_long_usage_log_is_compacted_to_the_latest_use_of_each_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.db");
        let store = SqliteStore::open(&path).unwrap();
        let keys = crate::bench::keys(2, "kg_");
        crate::bench::import(&store, &keys);
        let (a, b) = (&keys[0].1, &keys[1].1);
        // Half the threshold on one key; the other half on more keys than one batch holds.
        const OTHERS: usize = 60_000;
        let t0 = 1_790_000_000_000;
        let half = COMPACT_AT / 2;
        let use_of = |id: &str, i: usize, ip: &str| UsageRecord {
            key_id: Arc::from(id),
            at: Timestamp::from_millisecond(t0 + i as i64).unwrap(),
            ip: ip.parse().unwrap(),
        };
        let first: Arc<[UsageRecord]> = (0..half).map(|i| use_of(&a.id, i, "192.0.2.1")).collect();
        let second: Arc<[UsageRecord]> = (0..half)
            .map(|i| match i {
                0 => use_of(&b.id, i, "2001:db8::2"),
                _ => use_of(&format!("other-{}", i % OTHERS), i, "198.51.100.7"),
            })
            .collect();
        store.record_usage(first).await.unwrap();
        store.record_usage(second).await.unwrap();

        let mut expected: HashMap<String, (i64, IpAddr)> = (half - OTHERS..half)
            .map(|i| {
                (
                    format!("other-{}", i % OTHERS),
                    use_of("", i, "198.51.100.7"),
                )
            })
            .map(|(id, u)| (id, (millis(u.at), u.ip)))
            .collect();
        expected.insert(
            a.id.clone(),
            (t0 + half as i64 - 1, "192.0.2.1".parse().unwrap()),
        );
        expected.insert(b.id.clone(), (t0, "2001:db8::2".parse().unwrap()));
        {
            let writer = store.writer.lock().unwrap();
            let blobs: Vec<Vec<u8>> = writer
                .conn
                .prepare("SELECT uses FROM usage_batches")
                .unwrap()
                .query_map([], |row| row.get(0))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            assert!(blobs.len() > 1, "{} batches", blobs.len());
            let mut logged = HashMap::new();
            for blob in &blobs {
                assert!(decode_uses(blob, |id, at, ip| {
                    assert!(
                        logged.insert(id.to_string(), (at, ip)).is_none(),
                        "{id} twice"
                    );
                }));
            }
            assert_eq!(logged, expected);
        }
        drop(store);

        let reopened = SqliteStore::open(&path).unwrap();
        for key in [a, b] {
            let (at, ip) = expected[&key.id];
            let found = reopened.key_by_id(&key.id).await.unwrap().unwrap();
            assert_eq!(found.last_used_at.map(|t| t.as_millisecond()), Some(at));
            assert_eq!(found.last_used_ip, Some(ip));
        }
    }

    /// Lookups of different keys reuse the one compiled query (see [`KEY_BY_HASH`]).
    #[tokio::test]
    async fn key_lookups_are_not_compiled_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("keys.db")).unwrap();
        let keys = crate::bench::keys(3, "kg_");
        store.import(keys.iter().map(|(_, record)| record)).unwrap();
        for (_, record) in keys.iter().chain(&keys) {
            let found = store.key_by_hash(&record.hash).await.unwrap().unwrap();
            assert_eq!(found.id, record.id);
        }
        assert!(store.key_by_hash(&[7; 32]).await.unwrap().is_none());

        let reader = store.reader.lock().unwrap();
        let query = reader.prepare_cached(KEY_BY_HASH).unwrap();
        assert_eq!(query.get_status(StatementStatus::RePrepare), 0);
    }
}
