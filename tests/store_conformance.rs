//! The store conformance suite: what every `Store` backend must do, written against the trait
//! only. Each backend runs the same `conformance` function.

use std::collections::BTreeMap;
use std::sync::Arc;

use jiff::{SignedDuration, Timestamp};
use keygate::credential;
use keygate::key::{KeyRecord, new_id};
use keygate::store::{
    AuditEvent, AuditKind, KeyFilter, RedisStore, SqliteStore, Store, StoreError, UsageRecord,
};
use redis::AsyncCommands;

mod support;
use serde_json::json;
use support::redis_server::RedisServer;

fn record(name: &str, owner: &str) -> (KeyRecord, String) {
    let secret = credential::generate("kg_");
    let id = new_id();
    let key = KeyRecord {
        family: id.clone(),
        id,
        hash: credential::digest(&secret),
        prefix: credential::display_prefix(&secret).to_string(),
        name: name.into(),
        description: Some(format!("{name} 100%_done")),
        owner: owner.into(),
        created_at: Timestamp::from_millisecond(Timestamp::now().as_millisecond()).unwrap(),
        expires_at: None,
        revoked_at: None,
        last_used_at: None,
        last_used_ip: None,
        per_minute: Some(5),
        per_second: None,
        metadata: BTreeMap::from([("env".to_string(), "test".to_string())]),
    };
    (key, secret)
}

async fn list(store: &dyn Store, owner: Option<&str>, search: Option<&str>) -> Vec<KeyRecord> {
    let filter = KeyFilter {
        owner: owner.map(str::to_string),
        search: search.map(str::to_string),
    };
    store.list_keys(&filter).await.unwrap()
}

async fn conformance(store: Arc<dyn Store>) {
    store.ping().await.unwrap();
    let now = Timestamp::now();

    // Insert, then find by digest and by id, exactly as stored.
    let (a, secret) = record("alpha", "team-a");
    store.insert_key(&a, 3).await.unwrap();
    assert_eq!(
        store
            .key_by_hash(&credential::digest(&secret))
            .await
            .unwrap()
            .as_ref(),
        Some(&a)
    );
    assert_eq!(store.key_by_id(&a.id).await.unwrap().as_ref(), Some(&a));
    assert!(store.key_by_hash(&[7; 32]).await.unwrap().is_none());
    assert!(store.key_by_id("key_missing").await.unwrap().is_none());

    // Names are unique per owner among non-revoked keys; owners are separate.
    let (dup, _) = record("alpha", "team-a");
    assert!(matches!(
        store.insert_key(&dup, 3).await,
        Err(StoreError::Conflict(_))
    ));
    let (other_owner, _) = record("alpha", "team-b");
    store.insert_key(&other_owner, 3).await.unwrap();

    // max_per_owner counts non-revoked keys.
    let (b, _) = record("beta", "team-a");
    let (c, _) = record("gamma", "team-a");
    let (d, _) = record("delta", "team-a");
    store.insert_key(&b, 3).await.unwrap();
    store.insert_key(&c, 3).await.unwrap();
    assert!(matches!(
        store.insert_key(&d, 3).await,
        Err(StoreError::Conflict(_))
    ));
    let revoked = store.revoke_key(&c.id, now).await.unwrap();
    assert!(revoked.revoked_at.is_some());
    store.insert_key(&d, 3).await.unwrap();

    // Revoking again keeps the first time; unknown ids are NotFound.
    let later = now + SignedDuration::from_secs(60);
    let again = store.revoke_key(&c.id, later).await.unwrap();
    assert_eq!(again.revoked_at, revoked.revoked_at);
    assert!(matches!(
        store.revoke_key("key_missing", now).await,
        Err(StoreError::NotFound)
    ));

    // Edits: rename, clear the description; conflicts on a taken name or a revoked key.
    let edited = store
        .edit_key(&b.id, Some("beta-2"), Some(None), now)
        .await
        .unwrap();
    assert_eq!(
        (edited.name.as_str(), edited.description.as_ref()),
        ("beta-2", None)
    );
    assert_eq!(
        store.key_by_id(&b.id).await.unwrap().unwrap().name,
        "beta-2"
    );
    assert!(matches!(
        store.edit_key(&b.id, Some("alpha"), None, now).await,
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        store.edit_key(&c.id, Some("zeta"), None, now).await,
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        store.edit_key("key_missing", Some("zeta"), None, now).await,
        Err(StoreError::NotFound)
    ));

    // Rotation: the replacement shares the name; the old key's expiry is the earlier one.
    let (mut new, new_secret) = record("alpha", "team-a");
    new.family = a.family.clone();
    let grace_end = now + SignedDuration::from_hours(24);
    let old = store.rotate_key(&a.id, &new, grace_end).await.unwrap();
    assert_eq!(
        old.expires_at.map(|t| t.as_millisecond()),
        Some(grace_end.as_millisecond())
    );
    assert_eq!(
        store
            .key_by_hash(&credential::digest(&new_secret))
            .await
            .unwrap()
            .unwrap()
            .name,
        "alpha"
    );
    assert!(matches!(
        store
            .rotate_key(&c.id, &record("x-y-z", "team-a").0, now)
            .await,
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        store
            .rotate_key("key_missing", &record("x-y-z", "team-a").0, now)
            .await,
        Err(StoreError::NotFound)
    ));

    // Listing: by owner, and by search text in name, description or prefix (% and _ literal).
    let st = &*store;
    assert_eq!(list(st, None, None).await.len(), 6);
    assert_eq!(list(st, Some("team-b"), None).await.len(), 1);
    assert_eq!(list(st, None, Some("GAMMA")).await.len(), 1);
    assert_eq!(
        list(st, None, Some("0%_d")).await.len(),
        5,
        "all but the key whose description was cleared"
    );
    assert!(list(st, None, Some("1%x")).await.is_empty());
    assert!(list(st, Some("team-b"), Some("beta")).await.is_empty());
    let by_prefix: Vec<String> = list(st, None, Some(&d.prefix))
        .await
        .into_iter()
        .map(|k| k.id)
        .collect();
    assert_eq!(by_prefix, std::slice::from_ref(&d.id));

    // Usage: the latest wins, whatever order it arrives in.
    let t1 = Timestamp::from_millisecond(now.as_millisecond()).unwrap();
    let t2 = t1 + SignedDuration::from_secs(5);
    store
        .record_usage(Arc::from([used(&b.id, t2, "192.0.2.2")]))
        .await
        .unwrap();
    store
        .record_usage(Arc::from([used(&b.id, t1, "192.0.2.1")]))
        .await
        .unwrap();
    let used = store.key_by_id(&b.id).await.unwrap().unwrap();
    assert_eq!(used.last_used_at, Some(t2));
    assert_eq!(used.last_used_ip, Some("192.0.2.2".parse().unwrap()));

    // Audit: newest first, filtered by key, limited.
    let events: Vec<AuditEvent> = (0..5)
        .map(|i| AuditEvent {
            at: t1 + SignedDuration::from_secs(i),
            kind: if i % 2 == 0 {
                AuditKind::Created
            } else {
                AuditKind::RateLimited
            },
            key_id: if i < 4 { a.id.clone() } else { b.id.clone() },
            detail: json!({ "i": i }),
        })
        .collect();
    store.append_audit(&events).await.unwrap();
    let latest = store.audit(None, 2).await.unwrap();
    assert_eq!(latest.len(), 2);
    assert_eq!(latest[0].detail["i"], 4);
    let of_a = store.audit(Some(&a.id), 10).await.unwrap();
    assert_eq!(of_a.len(), 4);
    assert_eq!(of_a[0].kind, AuditKind::RateLimited);
    assert_eq!(of_a[3].detail["i"], 0);
}

/// The embedded SQLite store passes the suite, and what it wrote is there after reopening.
#[tokio::test]
async fn sqlite_store_conforms_and_persists() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/dir/keygate.db");
    conformance(Arc::new(SqliteStore::open(&path).unwrap())).await;
    let reopened = SqliteStore::open(&path).unwrap();
    assert_eq!(
        reopened
            .list_keys(&KeyFilter::default())
            .await
            .unwrap()
            .len(),
        6
    );
}

fn used(key_id: &str, at: Timestamp, ip: &str) -> UsageRecord {
    UsageRecord {
        key_id: key_id.into(),
        at,
        ip: ip.parse().unwrap(),
    }
}

async fn last_use(
    store: &SqliteStore,
    key: &KeyRecord,
) -> Vec<(Option<Timestamp>, Option<String>)> {
    let by_id = store.key_by_id(&key.id).await.unwrap().unwrap();
    let by_hash = store.key_by_hash(&key.hash).await.unwrap().unwrap();
    let listed = list(store, Some(&key.owner), None).await.remove(0);
    [by_id, by_hash, listed]
        .into_iter()
        .map(|k| (k.last_used_at, k.last_used_ip.map(|ip| ip.to_string())))
        .collect()
}

/// The embedded store appends uses to a log, compacts the log while serving and folds it into
/// its usage table when opened: every read sees the latest use wherever it is, an older use
/// never replaces a newer one on either side of a fold or a compaction, and uses still in the
/// log are there after reopening.
#[tokio::test]
async fn sqlite_usage_is_read_through_the_log_and_its_folds() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keygate.db");
    let store = SqliteStore::open(&path).unwrap();
    let (key, _) = record("used", "team-u");
    store.insert_key(&key, 10).await.unwrap();
    assert_eq!(last_use(&store, &key).await, vec![(None, None); 3]);

    let t = Timestamp::from_millisecond(Timestamp::now().as_millisecond()).unwrap();
    let at = |s: i64| t + SignedDuration::from_secs(s);
    let seen = |s: i64, ip: &str| vec![(Some(at(s)), Some(ip.to_string())); 3];

    enum Step {
        Use(i64, &'static str),
        Fold,
        Compact,
    }
    // Each step, then the latest use every read must show.
    let steps = [
        (Step::Use(2, "192.0.2.2"), (2, "192.0.2.2"), "in the log"),
        (Step::Fold, (2, "192.0.2.2"), "folded"),
        (
            Step::Use(1, "192.0.2.1"),
            (2, "192.0.2.2"),
            "older in the log",
        ),
        (Step::Fold, (2, "192.0.2.2"), "older folded"),
        (
            Step::Use(3, "192.0.2.3"),
            (3, "192.0.2.3"),
            "newer in the log",
        ),
        (Step::Compact, (3, "192.0.2.3"), "compacted"),
        (
            Step::Use(2, "192.0.2.4"),
            (3, "192.0.2.3"),
            "older after compaction",
        ),
        (Step::Compact, (3, "192.0.2.3"), "compacted again"),
    ];
    for (step, (latest, ip), what) in steps {
        match step {
            Step::Use(s, ip) => store
                .record_usage(Arc::from([used(&key.id, at(s), ip)]))
                .await
                .unwrap(),
            Step::Fold => store.fold_usage().await.unwrap(),
            Step::Compact => store.compact_usage().await.unwrap(),
        }
        assert_eq!(last_use(&store, &key).await, seen(latest, ip), "{what}");
    }
    drop(store);

    let reopened = SqliteStore::open(&path).unwrap();
    assert_eq!(
        last_use(&reopened, &key).await,
        seen(3, "192.0.2.3"),
        "after reopening"
    );
}

/// A store file written before usage had its own table keeps its keys' last use, and the
/// `keys` table loses the two columns that held it.
#[tokio::test]
async fn sqlite_store_of_schema_0_is_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keygate.db");
    let old = rusqlite::Connection::open(&path).unwrap();
    old.execute_batch(
        "CREATE TABLE keys (id TEXT PRIMARY KEY, hash BLOB NOT NULL UNIQUE, prefix TEXT NOT NULL,
             name TEXT NOT NULL, description TEXT, owner TEXT NOT NULL, family TEXT NOT NULL,
             created_at INTEGER NOT NULL, expires_at INTEGER, revoked_at INTEGER,
             last_used_at INTEGER, last_used_ip TEXT, per_minute INTEGER, per_second INTEGER,
             metadata TEXT NOT NULL);
         CREATE INDEX keys_owner ON keys (owner, name);",
    )
    .unwrap();
    let (key, _) = record("old", "team-o");
    old.execute(
        "INSERT INTO keys VALUES (?1, ?2, ?3, ?4, NULL, ?5, ?6, ?7, NULL, NULL, ?8, '198.51.100.7', 5, NULL, '{}')",
        rusqlite::params![
            key.id,
            key.hash.as_slice(),
            key.prefix,
            key.name,
            key.owner,
            key.family,
            key.created_at.as_millisecond(),
            key.created_at.as_millisecond() + 1000,
        ],
    )
    .unwrap();
    drop(old);

    assert_migrated(&path, &key, 1, "198.51.100.7").await;
    let columns = count(
        &path,
        "SELECT COUNT(*) FROM pragma_table_info('keys') WHERE name LIKE 'last_used%'",
    );
    assert_eq!(columns, 0);
}

/// The store at `path`, once opened (and so migrated), shows `key` last used `secs` after its
/// creation from `ip`, by id, by hash and in a listing.
async fn assert_migrated(path: &std::path::Path, key: &KeyRecord, secs: i64, ip: &str) {
    let store = SqliteStore::open(path).unwrap();
    let at = key.created_at + SignedDuration::from_secs(secs);
    assert_eq!(
        last_use(&store, key).await,
        vec![(Some(at), Some(ip.to_string())); 3]
    );
}

/// What a `SELECT COUNT(*) …` answers on the store file at `path`, read past the store.
fn count(path: &std::path::Path, sql: &str) -> i64 {
    rusqlite::Connection::open(path)
        .unwrap()
        .query_row(sql, [], |r| r.get(0))
        .unwrap()
}

/// A store file of schema 1, whose log of uses is a table of one row per use, keeps the latest
/// use of each key, in the log or already folded, and loses the old log table.
#[tokio::test]
async fn sqlite_store_of_schema_1_is_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keygate.db");
    let (key, _) = record("logged", "team-l");
    let store = SqliteStore::open(&path).unwrap();
    store.insert_key(&key, 10).await.unwrap();
    drop(store);
    // Back to schema 1: its log table, holding two uses, and an older use already folded.
    let t = key.created_at.as_millisecond();
    let old = rusqlite::Connection::open(&path).unwrap();
    old.execute_batch(&format!(
        "DROP TABLE usage_batches;
         CREATE TABLE usage_log (id TEXT NOT NULL, at INTEGER NOT NULL, ip TEXT NOT NULL);
         INSERT INTO key_usage VALUES ('{id}', {t} + 1000, '198.51.100.1');
         INSERT INTO usage_log VALUES ('{id}', {t} + 3000, '198.51.100.3');
         INSERT INTO usage_log VALUES ('{id}', {t} + 2000, '198.51.100.2');
         PRAGMA user_version = 1;",
        id = key.id
    ))
    .unwrap();
    drop(old);

    assert_migrated(&path, &key, 3, "198.51.100.3").await;
    let tables = count(
        &path,
        "SELECT COUNT(*) FROM sqlite_master WHERE name = 'usage_log'",
    );
    assert_eq!(tables, 0);
    let version = count(&path, "SELECT user_version FROM pragma_user_version");
    assert_eq!(version, 2, "schema version after migration");
}

/// The Redis store passes the same suite against a real `redis-server`; everything it writes is
/// under `store.key_prefix`, a second instance sees it, and no secret is in Redis in plain text.
#[tokio::test]
async fn redis_store_conforms_and_shares() {
    let redis = RedisServer::start();
    let store = RedisStore::open(&redis.url(), "kgtest:").unwrap();
    conformance(Arc::new(store)).await;

    let (key, secret) = record("shared", "team-c");
    RedisStore::open(&redis.url(), "kgtest:")
        .unwrap()
        .insert_key(&key, 10)
        .await
        .unwrap();
    let other = RedisStore::open(&redis.url(), "kgtest:").unwrap();
    assert_eq!(list(&other, None, None).await.len(), 7);
    assert_eq!(
        other.key_by_hash(&key.hash).await.unwrap().map(|k| k.id),
        Some(key.id)
    );
    // Another prefix is another deployment.
    let elsewhere = RedisStore::open(&redis.url(), "other:").unwrap();
    assert!(list(&elsewhere, None, None).await.is_empty());

    let mut conn = redis.client().await;
    let names: Vec<String> = conn.keys("*").await.unwrap();
    assert!(!names.is_empty());
    for name in &names {
        assert!(
            name.starts_with("kgtest:"),
            "`{name}` is outside the prefix"
        );
        let dump: Vec<u8> = redis::cmd("DUMP")
            .arg(name)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(
            !String::from_utf8_lossy(&dump).contains(&secret[3..]),
            "`{name}` holds the secret"
        );
    }
}
