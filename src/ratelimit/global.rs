//! `rate_limit.scope: global`: the windows of every key live in Redis, and every instance asks
//! Redis for each decision, so the limits hold for all instances together, exactly.
//!
//! The rule is the same sliding window as [`super::decide`], written again in Lua so it runs
//! atomically inside Redis on Redis's clock (one clock for all instances). Two things keep the
//! Redis round trip from being the throughput ceiling:
//! - batching: requests queue for one worker, which sends all waiting decisions in one script
//!   call, several calls in flight; under load a round trip carries hundreds of decisions;
//! - refusals are remembered: when Redis refuses a key until T, this instance refuses that key
//!   locally until T without asking (exact: other instances can only add to the count, and T is
//!   measured from when the question was sent, so the local refusal never outlasts Redis's). A
//!   client hammering past its limit costs Redis nothing.
//!
//! A decision that does not come back within [`DECISION_BUDGET`] is an error; the caller then
//! follows `on_store_error` and marks the store down, so later requests do not wait at all.

use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use redis::Script;
use redis::aio::ConnectionManager;
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::{Limits, Verdict, Window, whole_seconds_up};

/// How long a request waits for Redis's decision before the limits count as unknowable.
pub(crate) const DECISION_BUDGET: Duration = Duration::from_millis(250);

/// Decisions per script call at most: keeps each call short for Redis.
const MAX_BATCH: usize = 512;

/// Script calls in flight at once per instance.
const IN_FLIGHT: usize = 4;

/// Decisions waiting at most; past this the request is treated as Redis being unreachable.
const QUEUE: usize = 65_536;

/// The Lua twin of `window::decide`. KEYS: one per decision, `P rl:{<id>}` (a key may
/// repeat); ARGV: the time in µs since the epoch, or `-` for Redis's own clock (what the
/// gateway sends: one clock for all instances), then per_minute, per_second for each. Returns four integers per decision:
/// refused by (0 none, 1 minute, 2 second), µs until allowed, remaining, reset seconds.
///
/// State per API key, all under its `{<id>}` hash tag: lists `…:m` and `…:s` of "slot:count"
/// (minute and second windows, oldest first) and the hash itself holding both totals. A
/// decision touches only the ends of the lists, so its cost does not grow with the rate.
/// Everything expires when its newest minute slot stops counting.
const DECIDE: &str = r#"
local MINUTE_W, MINUTE_S = 60000000, 1000000
local SECOND_W, SECOND_S = 1000000, 1000
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end

local function expiry(w, s, slot) return (slot + 1) * s - 1 + w end
local function secs_up(us) return math.floor((us + 999999) / 1000000) end
local function entry(text)
  local slot, n = string.match(text, '^(%d+):(%d+)$')
  return tonumber(slot), tonumber(n)
end
-- Drops slots that stopped counting; returns the new total and the oldest slot left.
local function prune(list, total, w, s)
  while true do
    local head = redis.call('LINDEX', list, 0)
    if not head then return 0, nil end
    local slot, n = entry(head)
    if expiry(w, s, slot) > now then return total, slot end
    redis.call('LPOP', list)
    total = total - n
  end
end
local function wait_below(list, w, s, limit, count)
  local excess = math.max(count + 1 - limit, 0)
  local i = 0
  while true do
    local e = redis.call('LINDEX', list, i)
    if not e then return 0 end
    local slot, n = entry(e)
    if n >= excess then return math.max(expiry(w, s, slot) - now, 0) end
    excess = excess - n
    i = i + 1
  end
end
-- Counts one request now; returns the list's length when it opened a new slot, else 0.
local function add(list, s)
  local slot = math.floor(now / s)
  local last = redis.call('LINDEX', list, -1)
  if last then
    local last_slot, n = entry(last)
    if last_slot == slot then
      redis.call('LSET', list, -1, slot .. ':' .. (n + 1))
      return 0
    end
  end
  return redis.call('RPUSH', list, slot .. ':1')
end

local out = {}
for i, key in ipairs(KEYS) do
  local per_minute, per_second = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  local m, s = key .. ':m', key .. ':s'
  local totals = redis.call('HMGET', key, 'm', 's')
  local old_minute, old_second = tonumber(totals[1]) or 0, tonumber(totals[2]) or 0
  local minute_count, oldest = prune(m, old_minute, MINUTE_W, MINUTE_S)
  local second_count = prune(s, old_second, SECOND_W, SECOND_S)
  local minute_full, second_full = minute_count >= per_minute, second_count >= per_second
  local refused, wait, remaining = 0, 0, 0
  local m_len, s_len = 0, 0
  if minute_full or second_full then
    if minute_full then wait = wait_below(m, MINUTE_W, MINUTE_S, per_minute, minute_count) end
    if second_full then
      wait = math.max(wait, wait_below(s, SECOND_W, SECOND_S, per_second, second_count))
    end
    refused = minute_full and 1 or 2
    remaining = math.max(per_minute - minute_count, 0)
  else
    m_len = add(m, MINUTE_S)
    s_len = add(s, SECOND_S)
    oldest = oldest or math.floor(now / MINUTE_S)
    minute_count, second_count = minute_count + 1, second_count + 1
    remaining = per_minute - minute_count
  end
  if minute_count ~= old_minute or second_count ~= old_second then
    redis.call('HSET', key, 'm', minute_count, 's', second_count)
  end
  -- Everything is useless once the newest minute slot stops counting.
  local gone = math.ceil(expiry(MINUTE_W, MINUTE_S, math.floor(now / MINUTE_S)) / 1000)
  if m_len > 0 then
    redis.call('PEXPIREAT', key, gone)
    redis.call('PEXPIREAT', m, gone)
    redis.call('PEXPIREAT', s, gone)
  elseif s_len == 1 then
    redis.call('PEXPIREAT', s, gone)
  end
  local reset = 0
  if oldest then reset = secs_up(math.max(expiry(MINUTE_W, MINUTE_S, oldest) - now, 0)) end
  out[#out + 1] = refused
  out[#out + 1] = wait
  out[#out + 1] = remaining
  out[#out + 1] = reset
end
return out
"#;

static DECIDE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(DECIDE));

/// Why Redis gave no decision.
#[derive(Debug, thiserror::Error)]
pub(crate) enum GlobalError {
    #[error("Redis gave no rate-limit decision within {DECISION_BUDGET:?}")]
    TimedOut,
    #[error("rate-limit decision failed")]
    Redis(#[source] Arc<redis::RedisError>),
    #[error("too many rate-limit decisions waiting for Redis")]
    Overloaded,
}

/// One decision Redis made, and when it is valid from.
#[derive(Debug, Clone, Copy)]
struct Decision {
    verdict: Verdict,
    /// µs until the key would be allowed, when refused.
    wait_us: u64,
}

#[derive(Debug)]
struct Ask {
    redis_key: String,
    limits: Limits,
    reply: oneshot::Sender<Result<Decision, Arc<redis::RedisError>>>,
}

/// A refusal remembered from Redis.
#[derive(Debug, Clone, Copy)]
struct Refusal {
    until: Instant,
    reset_at: Instant,
    verdict: Verdict,
}

#[derive(Debug)]
pub(crate) struct GlobalLimiter {
    queue: mpsc::Sender<Ask>,
    refused: DashMap<Arc<str>, Refusal, foldhash::fast::RandomState>,
    prefix: String,
}

impl GlobalLimiter {
    /// Starts the batching worker on the current runtime.
    pub(crate) fn start(conn: ConnectionManager, prefix: &str) -> GlobalLimiter {
        let (queue, asks) = mpsc::channel(QUEUE);
        tokio::spawn(batch_worker(asks, conn));
        GlobalLimiter {
            queue,
            refused: DashMap::default(),
            prefix: prefix.to_string(),
        }
    }

    /// A refusal Redis gave that still holds, with its headers brought up to date.
    pub(crate) fn remembered_refusal(&self, key: &Arc<str>) -> Option<Verdict> {
        let refusal = *self.refused.get(key)?;
        let now = Instant::now();
        if now >= refusal.until {
            return None;
        }
        Some(Verdict {
            retry_after_secs: whole_seconds_up(refusal.until - now),
            reset_secs: whole_seconds_up(refusal.reset_at.saturating_duration_since(now)),
            ..refusal.verdict
        })
    }

    /// Asks Redis to decide one request of `key` (counted when allowed). Callers look at
    /// [`GlobalLimiter::remembered_refusal`] first.
    pub(crate) async fn check(
        &self,
        key: &Arc<str>,
        limits: Limits,
    ) -> Result<Verdict, GlobalError> {
        let sent = Instant::now();
        let (reply, answer) = oneshot::channel();
        let ask = Ask {
            redis_key: format!("{}rl:{{{key}}}", self.prefix),
            limits,
            reply,
        };
        self.queue
            .try_send(ask)
            .map_err(|_| GlobalError::Overloaded)?;
        let decision = match tokio::time::timeout(DECISION_BUDGET, answer).await {
            Ok(Ok(Ok(decision))) => decision,
            Ok(Ok(Err(e))) => return Err(GlobalError::Redis(e)),
            Ok(Err(_)) | Err(_) => return Err(GlobalError::TimedOut),
        };
        if decision.verdict.refused_by.is_some() {
            self.refused.insert(
                Arc::clone(key),
                Refusal {
                    until: sent + Duration::from_micros(decision.wait_us),
                    reset_at: sent + Duration::from_secs(decision.verdict.reset_secs),
                    verdict: decision.verdict,
                },
            );
        }
        Ok(decision.verdict)
    }

    /// Forgets refusals that have run out.
    pub(crate) fn sweep(&self) {
        let now = Instant::now();
        self.refused.retain(|_, r| r.until > now);
    }
}

/// Takes waiting decisions in batches and sends each batch as one script call.
async fn batch_worker(mut asks: mpsc::Receiver<Ask>, conn: ConnectionManager) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    while let Some(first) = asks.recv().await {
        // Waiting for a slot first lets the batch grow while earlier calls are in flight.
        let permit = Arc::clone(&slots)
            .acquire_owned()
            .await
            .expect("semaphore never closed");
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match asks.try_recv() {
                Ok(ask) => batch.push(ask),
                Err(_) => break,
            }
        }
        let mut conn = conn.clone();
        tokio::spawn(async move {
            decide_batch(&mut conn, batch).await;
            drop(permit);
        });
    }
}

async fn decide_batch(conn: &mut ConnectionManager, batch: Vec<Ask>) {
    // Asks whose requester gave up are dropped here, so nothing is counted for them.
    let batch: Vec<Ask> = batch.into_iter().filter(|a| !a.reply.is_closed()).collect();
    if batch.is_empty() {
        return;
    }
    let mut invocation = DECIDE_SCRIPT.prepare_invoke();
    invocation.arg("-");
    for ask in &batch {
        invocation
            .key(&ask.redis_key)
            .arg(ask.limits.per_minute)
            .arg(ask.limits.per_second);
    }
    match invocation.invoke_async::<Vec<i64>>(conn).await {
        Ok(values) if values.len() == 4 * batch.len() => {
            for (ask, v) in batch.into_iter().zip(values.chunks_exact(4)) {
                let _ = ask.reply.send(Ok(decision(v)));
            }
        }
        Ok(values) => {
            let e = Arc::new(redis::RedisError::from((
                redis::ErrorKind::Parse,
                "rate-limit script",
                format!("{} values for {} decisions", values.len(), batch.len()),
            )));
            for ask in batch {
                let _ = ask.reply.send(Err(Arc::clone(&e)));
            }
        }
        Err(e) => {
            let e = Arc::new(e);
            for ask in batch {
                let _ = ask.reply.send(Err(Arc::clone(&e)));
            }
        }
    }
}

fn decision(v: &[i64]) -> Decision {
    let as_u64 = |n: i64| u64::try_from(n).unwrap_or(0);
    let refused_by = match v[0] {
        1 => Some(Window::Minute),
        2 => Some(Window::Second),
        _ => None,
    };
    let wait_us = as_u64(v[1]);
    Decision {
        verdict: Verdict {
            refused_by,
            retry_after_secs: if refused_by.is_some() {
                whole_seconds_up(Duration::from_micros(wait_us))
            } else {
                0
            },
            remaining: u32::try_from(v[2]).unwrap_or(0),
            reset_secs: as_u64(v[3]),
        },
        wait_us,
    }
}

/// One decision of the Lua rule at a given time (µs since the epoch), for tests comparing it
/// with [`super::decide`]. The gateway itself always uses Redis's clock.
#[doc(hidden)]
pub async fn decide_in_redis(
    conn: &mut impl redis::aio::ConnectionLike,
    key: &str,
    limits: Limits,
    now_us: u64,
) -> redis::RedisResult<Verdict> {
    let values: Vec<i64> = DECIDE_SCRIPT
        .key(key)
        .arg(now_us)
        .arg(limits.per_minute)
        .arg(limits.per_second)
        .invoke_async(conn)
        .await?;
    Ok(decision(&values).verdict)
}
