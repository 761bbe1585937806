//! The Redis store: every instance of a deployment shares keys, usage and audit through one
//! Redis, and hears about every change to a key on a pub/sub channel.
//!
//! Layout, every name under `store.key_prefix` (P):
//! - `P{keys}:key:<id>`: a hash per key, one field per record field (times in epoch ms);
//! - `P{keys}:hash:<sha-256 hex>` → id;
//! - `P{keys}:ids` and `P{keys}:owner:<owner>`: sorted sets of ids by creation time;
//! - `P{keys}:live:<owner>`: the owner's non-revoked ids (name and count rules);
//! - `P{keys}:audit` and `P{keys}:audit:<id>`: audit events as JSON, newest first;
//! - `P rl:{<id>}`: a key's rate-limit windows (see `ratelimit::global`);
//! - channel `P changes`: the SHA-256 hex of every key that changed.
//!
//! Everything a multi-key change touches shares the `{keys}` hash tag, so each change is one
//! Lua script on one node, also on Redis Cluster; rate-limit state is one Redis key per API key,
//! spread over the cluster. Scripts publish the change they make, so no change goes unannounced
//! (a message can still be lost to a disconnect: the cache `ttl` bounds that, and every
//! reconnection of the listener marks the whole cache stale).

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use jiff::Timestamp;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Client, Script};

use super::{AuditEvent, AuditKind, KeyFilter, Store, StoreError, UsageRecord};
use crate::key::KeyRecord;

/// The longest any store operation may take before it counts as failed. The connection
/// manager waits for reconnection attempts, so without this a request could hang on them.
const OP_TIMEOUT: Duration = Duration::from_secs(1);

/// Usage records per script call, so one flush never blocks Redis for long.
const USAGE_CHUNK: usize = 500;

/// Helpers shared by the key scripts. `KEYS[1]` is always the `{keys}` base.
const LIB: &str = r#"
local base = KEYS[1]
local function key_of(id) return base .. ':key:' .. id end
local function changed(hash) redis.call('PUBLISH', ARGV[1], hash) end
local function name_taken(owner, name, family)
  for _, other in ipairs(redis.call('SMEMBERS', base .. ':live:' .. owner)) do
    local f = redis.call('HMGET', key_of(other), 'name', 'family')
    if f[1] == name and f[2] ~= family then return true end
  end
  return false
end
local function insert(from)
  local rec, flat = {}, {}
  for i = from, #ARGV, 2 do
    rec[ARGV[i]] = ARGV[i + 1]
    flat[#flat + 1] = ARGV[i]
    flat[#flat + 1] = ARGV[i + 1]
  end
  redis.call('HSET', key_of(rec.id), unpack(flat))
  redis.call('SET', base .. ':hash:' .. rec.hash, rec.id)
  redis.call('ZADD', base .. ':ids', rec.created_at, rec.id)
  redis.call('ZADD', base .. ':owner:' .. rec.owner, rec.created_at, rec.id)
  if not rec.revoked_at then redis.call('SADD', base .. ':live:' .. rec.owner, rec.id) end
  changed(rec.hash)
  return rec
end
local function whole(id)
  local all = redis.call('HGETALL', key_of(id))
  table.insert(all, 1, 'ok')
  return all
end
"#;

/// ARGV: channel, max_per_owner, then the record's field/value pairs.
const INSERT: &str = r#"
local owner, name, family = nil, nil, nil
for i = 3, #ARGV, 2 do
  if ARGV[i] == 'owner' then owner = ARGV[i + 1] end
  if ARGV[i] == 'name' then name = ARGV[i + 1] end
  if ARGV[i] == 'family' then family = ARGV[i + 1] end
end
if name_taken(owner, name, family) then return {'name_taken'} end
local live = redis.call('SCARD', base .. ':live:' .. owner)
if live >= tonumber(ARGV[2]) then return {'too_many', tostring(live)} end
insert(3)
return {'ok'}
"#;

/// ARGV: channel, old id, old key's new expiry (ms), then the new record's pairs.
const ROTATE: &str = r#"
local old = key_of(ARGV[2])
if redis.call('EXISTS', old) == 0 then return {'not_found'} end
if redis.call('HEXISTS', old, 'revoked_at') == 1 then return {'revoked'} end
local current = redis.call('HGET', old, 'expires_at')
if not current or tonumber(current) > tonumber(ARGV[3]) then
  redis.call('HSET', old, 'expires_at', ARGV[3])
end
changed(redis.call('HGET', old, 'hash'))
insert(4)
return whole(ARGV[2])
"#;

/// ARGV: channel, id, now (ms), has name ('1'/'0'), name, description action
/// ('keep'/'set'/'clear'), description.
const EDIT: &str = r#"
local k = key_of(ARGV[2])
if redis.call('EXISTS', k) == 0 then return {'not_found'} end
if redis.call('HEXISTS', k, 'revoked_at') == 1 then return {'not_editable', 'revoked'} end
local expires = redis.call('HGET', k, 'expires_at')
if expires and tonumber(expires) <= tonumber(ARGV[3]) then return {'not_editable', 'expired'} end
if ARGV[4] == '1' then
  local f = redis.call('HMGET', k, 'name', 'owner', 'family')
  if ARGV[5] ~= f[1] and name_taken(f[2], ARGV[5], f[3]) then return {'name_taken'} end
  redis.call('HSET', k, 'name', ARGV[5])
end
if ARGV[6] == 'set' then redis.call('HSET', k, 'description', ARGV[7]) end
if ARGV[6] == 'clear' then redis.call('HDEL', k, 'description') end
changed(redis.call('HGET', k, 'hash'))
return whole(ARGV[2])
"#;

/// ARGV: channel, id, revocation time (ms).
const REVOKE: &str = r#"
local k = key_of(ARGV[2])
if redis.call('EXISTS', k) == 0 then return {'not_found'} end
if redis.call('HEXISTS', k, 'revoked_at') == 0 then
  redis.call('HSET', k, 'revoked_at', ARGV[3])
  redis.call('SREM', base .. ':live:' .. redis.call('HGET', k, 'owner'), ARGV[2])
end
changed(redis.call('HGET', k, 'hash'))
return whole(ARGV[2])
"#;

/// ARGV: (id, time ms, ip) triples. The latest use wins; unknown ids are skipped.
const USAGE: &str = r#"
for i = 1, #ARGV, 3 do
  local k = key_of(ARGV[i])
  if redis.call('EXISTS', k) == 1 then
    local current = redis.call('HGET', k, 'last_used_at')
    if not current or tonumber(current) <= tonumber(ARGV[i + 1]) then
      redis.call('HSET', k, 'last_used_at', ARGV[i + 1], 'last_used_ip', ARGV[i + 2])
    end
  end
end
return 0
"#;

/// ARGV: channel (unused), digest hex. One round trip for a cache miss.
const BY_HASH: &str = r#"
local id = redis.call('GET', base .. ':hash:' .. ARGV[2])
if not id then return {'not_found'} end
return whole(id)
"#;

fn script(body: &str) -> Script {
    Script::new(&format!("{LIB}{body}"))
}

static INSERT_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(INSERT));
static ROTATE_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(ROTATE));
static EDIT_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(EDIT));
static REVOKE_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(REVOKE));
static USAGE_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(USAGE));
static BY_HASH_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(BY_HASH));

fn unavailable(e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::Unavailable(Box::new(e))
}

/// Something Redis answered that this version of keygate did not write.
#[derive(Debug, thiserror::Error)]
#[error("unexpected data in Redis: {0}")]
struct Corrupt(String);

fn corrupt(what: impl Into<String>) -> StoreError {
    unavailable(Corrupt(what.into()))
}

#[derive(Debug, thiserror::Error)]
#[error("Redis did not answer within {0:?}")]
struct TimedOut(Duration);

/// Lowercase hex of a digest: how digests appear in Redis names and change messages.
fn hex(bytes: &[u8; 32]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The digest of a lowercase hex string, if it is one.
fn unhex(text: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if text.len() != 64 {
        return None;
    }
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// A key record as the field/value pairs of its Redis hash.
fn fields(key: &KeyRecord) -> Vec<(&'static str, String)> {
    let mut f = vec![
        ("id", key.id.clone()),
        ("hash", hex(&key.hash)),
        ("prefix", key.prefix.clone()),
        ("name", key.name.clone()),
        ("owner", key.owner.clone()),
        ("family", key.family.clone()),
        ("created_at", key.created_at.as_millisecond().to_string()),
        (
            "metadata",
            serde_json::to_string(&key.metadata).expect("string map serializes"),
        ),
    ];
    let optional = [
        ("description", key.description.clone()),
        (
            "expires_at",
            key.expires_at.map(|t| t.as_millisecond().to_string()),
        ),
        (
            "revoked_at",
            key.revoked_at.map(|t| t.as_millisecond().to_string()),
        ),
        (
            "last_used_at",
            key.last_used_at.map(|t| t.as_millisecond().to_string()),
        ),
        ("last_used_ip", key.last_used_ip.map(|ip| ip.to_string())),
        ("per_minute", key.per_minute.map(|n| n.to_string())),
        ("per_second", key.per_second.map(|n| n.to_string())),
    ];
    f.extend(optional.into_iter().filter_map(|(k, v)| Some((k, v?))));
    f
}

/// A key record from its Redis hash.
fn record(mut h: HashMap<String, String>) -> Result<KeyRecord, StoreError> {
    let mut take = |field: &str| {
        h.remove(field)
            .ok_or_else(|| corrupt(format!("key without `{field}`")))
    };
    fn time(ms: &str) -> Result<Timestamp, StoreError> {
        ms.parse::<i64>()
            .ok()
            .and_then(|ms| Timestamp::from_millisecond(ms).ok())
            .ok_or_else(|| corrupt(format!("bad time `{ms}`")))
    }
    fn number<T: std::str::FromStr>(text: &str) -> Result<T, StoreError> {
        text.parse()
            .map_err(|_| corrupt(format!("bad number `{text}`")))
    }
    let id = take("id")?;
    let hash = unhex(&take("hash")?).ok_or_else(|| corrupt("bad digest"))?;
    let prefix = take("prefix")?;
    let name = take("name")?;
    let owner = take("owner")?;
    let family = take("family")?;
    let created_at = time(&take("created_at")?)?;
    let metadata = serde_json::from_str(&take("metadata")?).map_err(|_| corrupt("bad metadata"))?;
    Ok(KeyRecord {
        id,
        hash,
        prefix,
        name,
        description: h.remove("description"),
        owner,
        family,
        created_at,
        expires_at: h.remove("expires_at").as_deref().map(time).transpose()?,
        revoked_at: h.remove("revoked_at").as_deref().map(time).transpose()?,
        last_used_at: h.remove("last_used_at").as_deref().map(time).transpose()?,
        last_used_ip: h
            .remove("last_used_ip")
            .as_deref()
            .map(number::<IpAddr>)
            .transpose()?,
        per_minute: h.remove("per_minute").as_deref().map(number).transpose()?,
        per_second: h.remove("per_second").as_deref().map(number).transpose()?,
        metadata,
    })
}

/// A script's answer: a status word, then (for `ok`) the key's hash as field/value pairs.
fn outcome(mut reply: Vec<String>) -> Result<(String, Vec<String>), StoreError> {
    if reply.is_empty() {
        return Err(corrupt("empty script reply"));
    }
    let status = reply.remove(0);
    Ok((status, reply))
}

fn pairs(flat: Vec<String>) -> HashMap<String, String> {
    let mut map = HashMap::with_capacity(flat.len() / 2);
    let mut it = flat.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        map.insert(k, v);
    }
    map
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct StoredEvent {
    at: i64,
    kind: String,
    key_id: String,
    detail: serde_json::Value,
}

/// The store on a Redis server, shared by every instance that points at it.
#[derive(Clone)]
pub struct RedisStore {
    client: Client,
    conn: ConnectionManager,
    /// `P{keys}`: the base of every key-related name.
    base: String,
    channel: String,
    prefix: String,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password: never print it.
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Prepares the connection; it is made lazily and remade in the background when lost, so
    /// this succeeds while Redis is down (the gateway then starts unready).
    pub fn open(url: &str, prefix: &str) -> Result<RedisStore, StoreError> {
        let client = Client::open(url).map_err(unavailable)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(500)))
            .set_response_timeout(Some(OP_TIMEOUT))
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(100))
            .set_max_delay(Duration::from_millis(500));
        let conn =
            ConnectionManager::new_lazy_with_config(client.clone(), config).map_err(unavailable)?;
        Ok(RedisStore {
            client,
            conn,
            base: format!("{prefix}{{keys}}"),
            channel: format!("{prefix}changes"),
            prefix: prefix.to_string(),
        })
    }

    /// A handle on the shared connection, for the global rate limiter.
    pub(crate) fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// `store.key_prefix`.
    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Runs one Redis operation with [`OP_TIMEOUT`], mapping every failure to `Unavailable`.
    async fn call<T>(
        &self,
        op: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(OP_TIMEOUT, op).await {
            Ok(result) => result.map_err(unavailable),
            Err(_) => Err(unavailable(TimedOut(OP_TIMEOUT))),
        }
    }

    async fn run_script(
        &self,
        script: &Script,
        args: Vec<String>,
    ) -> Result<(String, Vec<String>), StoreError> {
        let mut invocation = script.key(&self.base);
        invocation.arg(&self.channel);
        for arg in args {
            invocation.arg(arg);
        }
        let mut conn = self.conn.clone();
        outcome(self.call(invocation.invoke_async(&mut conn)).await?)
    }

    async fn hgetall_many(&self, ids: &[String]) -> Result<Vec<KeyRecord>, StoreError> {
        let mut keys = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(1000) {
            let mut pipe = redis::pipe();
            for id in chunk {
                pipe.hgetall(format!("{}:key:{id}", self.base));
            }
            let mut conn = self.conn.clone();
            let maps: Vec<HashMap<String, String>> = self.call(pipe.query_async(&mut conn)).await?;
            for map in maps.into_iter().filter(|m| !m.is_empty()) {
                keys.push(record(map)?);
            }
        }
        Ok(keys)
    }

    /// Calls `on_change` with the digest of every key changed by any instance, for as long as
    /// the process runs. After each (re)subscription `on_resync` is called: changes may have
    /// been missed while the subscription was down.
    pub(crate) async fn follow_changes(&self, on_change: impl Fn([u8; 32]), on_resync: impl Fn()) {
        let mut failures = 0u32;
        loop {
            match self.subscribe().await {
                Ok(mut pubsub) => {
                    failures = 0;
                    on_resync();
                    tracing::debug!(channel = %self.channel, "following key changes");
                    let mut messages = pubsub.on_message();
                    while let Some(message) = messages.next().await {
                        let payload: String = message.get_payload().unwrap_or_default();
                        match unhex(&payload) {
                            Some(hash) => on_change(hash),
                            None => tracing::warn!("ignored a malformed key-change message"),
                        }
                    }
                    tracing::warn!("key-change subscription lost; resubscribing");
                }
                Err(e) => {
                    failures += 1;
                    if failures == 1 {
                        tracing::warn!(cause = %crate::error_chain(&e), "cannot subscribe to key changes; retrying");
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn subscribe(&self) -> Result<redis::aio::PubSub, StoreError> {
        let mut pubsub = self.call(self.client.get_async_pubsub()).await?;
        self.call(pubsub.subscribe(&self.channel)).await?;
        Ok(pubsub)
    }
}

fn key_args(key: &KeyRecord) -> impl Iterator<Item = String> {
    fields(key)
        .into_iter()
        .flat_map(|(k, v)| [k.to_string(), v])
}

#[async_trait]
impl Store for RedisStore {
    async fn insert_key(&self, key: &KeyRecord, max_per_owner: u32) -> Result<(), StoreError> {
        let args = std::iter::once(max_per_owner.to_string())
            .chain(key_args(key))
            .collect();
        let (status, rest) = self.run_script(&INSERT_SCRIPT, args).await?;
        match status.as_str() {
            "ok" => Ok(()),
            "name_taken" => Err(StoreError::Conflict(format!(
                "owner `{}` already has a key named `{}`",
                key.owner, key.name
            ))),
            "too_many" => Err(StoreError::Conflict(format!(
                "owner `{}` already has {} keys, the most allowed (keys.max_per_owner); revoke one first",
                key.owner,
                rest.first().map_or("?", String::as_str)
            ))),
            other => Err(corrupt(format!("insert answered `{other}`"))),
        }
    }

    async fn rotate_key(
        &self,
        old_id: &str,
        new: &KeyRecord,
        old_expires_at: Timestamp,
    ) -> Result<KeyRecord, StoreError> {
        let args = [
            old_id.to_string(),
            old_expires_at.as_millisecond().to_string(),
        ]
        .into_iter()
        .chain(key_args(new))
        .collect();
        match self.run_script(&ROTATE_SCRIPT, args).await? {
            (s, rest) if s == "ok" => record(pairs(rest)),
            (s, _) if s == "not_found" => Err(StoreError::NotFound),
            (s, _) if s == "revoked" => Err(StoreError::Conflict(
                "a revoked key cannot be rotated".into(),
            )),
            (other, _) => Err(corrupt(format!("rotate answered `{other}`"))),
        }
    }

    async fn key_by_hash(&self, hash: &[u8; 32]) -> Result<Option<KeyRecord>, StoreError> {
        match self.run_script(&BY_HASH_SCRIPT, vec![hex(hash)]).await? {
            (s, rest) if s == "ok" && !rest.is_empty() => record(pairs(rest)).map(Some),
            _ => Ok(None),
        }
    }

    async fn key_by_id(&self, id: &str) -> Result<Option<KeyRecord>, StoreError> {
        let mut conn = self.conn.clone();
        let map: HashMap<String, String> = self
            .call(conn.hgetall(format!("{}:key:{id}", self.base)))
            .await?;
        if map.is_empty() {
            return Ok(None);
        }
        record(map).map(Some)
    }

    async fn list_keys(&self, filter: &KeyFilter) -> Result<Vec<KeyRecord>, StoreError> {
        let index = match &filter.owner {
            Some(owner) => format!("{}:owner:{owner}", self.base),
            None => format!("{}:ids", self.base),
        };
        let mut conn = self.conn.clone();
        let ids: Vec<String> = self.call(conn.zrange(index, 0, -1)).await?;
        let mut keys = self.hgetall_many(&ids).await?;
        if let Some(search) = filter.search.as_deref().map(str::to_lowercase) {
            keys.retain(|k| {
                k.name.to_lowercase().contains(&search)
                    || k.prefix.to_lowercase().contains(&search)
                    || k.description
                        .as_deref()
                        .is_some_and(|d| d.to_lowercase().contains(&search))
            });
        }
        Ok(keys)
    }

    async fn edit_key(
        &self,
        id: &str,
        name: Option<&str>,
        description: Option<Option<&str>>,
        now: Timestamp,
    ) -> Result<KeyRecord, StoreError> {
        let (action, text) = match description {
            None => ("keep", ""),
            Some(None) => ("clear", ""),
            Some(Some(text)) => ("set", text),
        };
        let args = vec![
            id.to_string(),
            now.as_millisecond().to_string(),
            if name.is_some() { "1" } else { "0" }.to_string(),
            name.unwrap_or_default().to_string(),
            action.to_string(),
            text.to_string(),
        ];
        match self.run_script(&EDIT_SCRIPT, args).await? {
            (s, rest) if s == "ok" => record(pairs(rest)),
            (s, _) if s == "not_found" => Err(StoreError::NotFound),
            (s, rest) if s == "not_editable" => Err(StoreError::Conflict(format!(
                "key `{id}` is {} and can no longer be edited",
                rest.first().map_or("?", String::as_str)
            ))),
            (s, _) if s == "name_taken" => {
                let owner = self
                    .key_by_id(id)
                    .await?
                    .map(|k| k.owner)
                    .unwrap_or_default();
                Err(StoreError::Conflict(format!(
                    "owner `{owner}` already has a key named `{}`",
                    name.unwrap_or_default()
                )))
            }
            (other, _) => Err(corrupt(format!("edit answered `{other}`"))),
        }
    }

    async fn revoke_key(&self, id: &str, at: Timestamp) -> Result<KeyRecord, StoreError> {
        let args = vec![id.to_string(), at.as_millisecond().to_string()];
        match self.run_script(&REVOKE_SCRIPT, args).await? {
            (s, rest) if s == "ok" => record(pairs(rest)),
            (s, _) if s == "not_found" => Err(StoreError::NotFound),
            (other, _) => Err(corrupt(format!("revoke answered `{other}`"))),
        }
    }

    async fn record_usage(&self, batch: Arc<[UsageRecord]>) -> Result<(), StoreError> {
        for chunk in batch.chunks(USAGE_CHUNK) {
            let mut invocation = USAGE_SCRIPT.key(&self.base);
            for r in chunk {
                invocation
                    .arg(&*r.key_id)
                    .arg(r.at.as_millisecond())
                    .arg(r.ip.to_string());
            }
            let mut conn = self.conn.clone();
            let _: i64 = self.call(invocation.invoke_async(&mut conn)).await?;
        }
        Ok(())
    }

    async fn append_audit(&self, events: &[AuditEvent]) -> Result<(), StoreError> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        for e in events {
            let json = serde_json::to_string(&StoredEvent {
                at: e.at.as_millisecond(),
                kind: e.kind.as_str().to_string(),
                key_id: e.key_id.clone(),
                detail: e.detail.clone(),
            })
            .expect("event serializes");
            pipe.lpush(format!("{}:audit", self.base), &json).ignore();
            pipe.lpush(format!("{}:audit:{}", self.base, e.key_id), &json)
                .ignore();
        }
        let mut conn = self.conn.clone();
        self.call(pipe.query_async::<()>(&mut conn)).await
    }

    async fn audit(
        &self,
        key_id: Option<&str>,
        limit: usize,
    ) -> Result<Vec<AuditEvent>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let list = match key_id {
            Some(id) => format!("{}:audit:{id}", self.base),
            None => format!("{}:audit", self.base),
        };
        let stop = isize::try_from(limit).unwrap_or(isize::MAX) - 1;
        let mut conn = self.conn.clone();
        let raw: Vec<String> = self.call(conn.lrange(list, 0, stop)).await?;
        raw.iter()
            .map(|json| {
                let e: StoredEvent =
                    serde_json::from_str(json).map_err(|_| corrupt("bad audit event"))?;
                Ok(AuditEvent {
                    at: Timestamp::from_millisecond(e.at).map_err(|_| corrupt("bad audit time"))?,
                    kind: AuditKind::parse(&e.kind).ok_or_else(|| corrupt("bad audit kind"))?,
                    key_id: e.key_id,
                    detail: e.detail,
                })
            })
            .collect()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        self.call(redis::cmd("PING").query_async::<String>(&mut conn))
            .await
            .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips() {
        let digest: [u8; 32] = std::array::from_fn(|i| (i * 37) as u8);
        let text = hex(&digest);
        assert_eq!(text.len(), 64);
        assert_eq!(unhex(&text), Some(digest));
        assert_eq!(unhex("zz"), None);
        assert_eq!(unhex(&"g".repeat(64)), None);
    }
}
