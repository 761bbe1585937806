//! Several `keygate` processes on one real `redis-server`: shared keys, revocation reaching
//! every instance, exact global limits, and Redis dying, coming back, or hanging.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::json;
use support::redis_server::RedisServer;
use support::{Gateway, Upstream, assert_no_window_over, key_id, problem, retry_after};

/// A cache `ttl` far longer than any test: what reaches an instance in time is the change
/// feed, not expiry.
const LONG_TTL: &str = "cache:\n  ttl: 1h\n";

/// Polls `check` every 50 ms until it holds, for at most `limit`.
async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Three gateways on one Redis, with the default config.
async fn three_on(upstream: &Upstream, redis: &RedisServer) -> [Gateway; 3] {
    [
        Gateway::start_on_redis(upstream, redis, "").await,
        Gateway::start_on_redis(upstream, redis, "").await,
        Gateway::start_on_redis(upstream, redis, "").await,
    ]
}

/// Sends `n` requests with `secret` at once, spread round-robin over `gateways`; returns
/// their statuses and how long the whole burst took from first send to last answer.
async fn burst(gateways: &[&Gateway], secret: &str, n: usize) -> (Vec<u16>, Duration) {
    let start = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let gw = gateways[i % gateways.len()];
            let request = gw.http.get(gw.url("/")).header("x-api-key", secret);
            tokio::spawn(async move { request.send().await.unwrap().status().as_u16() })
        })
        .collect();
    let mut statuses = Vec::new();
    for task in tasks {
        statuses.push(task.await.unwrap());
    }
    (statuses, start.elapsed())
}

/// A key created through A works on B at once; revoked through B it is refused by A, which
/// had it cached, within a second; rotated with no grace, the old secret is refused
/// everywhere within a second and the new one works everywhere.
#[tokio::test]
async fn keys_and_their_revocation_reach_every_instance() {
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let a = Gateway::start_on_redis(&upstream, &redis, LONG_TTL).await;
    let b = Gateway::start_on_redis(&upstream, &redis, LONG_TTL).await;

    let (key, secret) = a.create_simple_key("shared").await;
    b.remember_secret(&secret);
    assert_eq!(b.call_with_key("/", &secret).await.status(), 200);
    assert_eq!(a.call_with_key("/", &secret).await.status(), 200);

    let (status, _) = b.revoke(key_id(&key)).await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_secs(1)).await;
    a.refused("/", &secret, 401, "revoked_api_key").await;
    b.refused("/", &secret, 401, "revoked_api_key").await;

    let (old, old_secret) = b.create_simple_key("rotated").await;
    a.remember_secret(&old_secret);
    assert_eq!(a.call_with_key("/", &old_secret).await.status(), 200);
    let (status, new) = b.rotate(key_id(&old), Some("0s")).await;
    assert_eq!(status, 201, "{new}");
    let new_secret = new["secret"].as_str().unwrap();
    a.remember_secret(new_secret);
    tokio::time::sleep(Duration::from_secs(1)).await;
    a.refused("/", &old_secret, 401, "expired_api_key").await;
    assert_eq!(a.call_with_key("/", new_secret).await.status(), 200);

    // Both instances recorded uses of the new key; the latest is what both report.
    assert_eq!(b.call_with_key("/", new_secret).await.status(), 200);
    let new_id = key_id(&new).to_string();
    eventually(Duration::from_secs(3), "usage merged", || async {
        let (on_a, on_b) = (a.get_key(&new_id).await, b.get_key(&new_id).await);
        on_a["last_used_at"].is_string() && on_a["last_used_at"] == on_b["last_used_at"]
    })
    .await;
}

/// 30 requests at once with one key, spread over three instances: exactly `per_second` (10)
/// are let through, the rest get 429 with Retry-After 1.
#[tokio::test]
async fn a_burst_across_three_instances_gets_exactly_the_per_second_limit() {
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let [a, b, c] = three_on(&upstream, &redis).await;
    let (_, secret) = a.create_simple_key("burst").await;
    for gw in [&b, &c] {
        gw.remember_secret(&secret);
    }
    // Each instance has the key in its cache, then the second window empties.
    for gw in [&a, &b, &c] {
        assert_eq!(gw.call_with_key("/", &secret).await.status(), 200);
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let (statuses, took) = burst(&[&a, &b, &c], &secret, 30).await;
    assert!(
        took < Duration::from_secs(1),
        "the burst took {took:?}: too slow a machine for a one-second test"
    );
    assert_eq!(
        statuses.iter().filter(|&&s| s == 200).count(),
        10,
        "{statuses:?}"
    );
    assert_eq!(statuses.iter().filter(|&&s| s == 429).count(), 20);
    let (headers, body) = c.refused("/", &secret, 429, "rate_limited").await;
    assert_eq!(retry_after(&headers), 1);
    assert!(body["detail"].as_str().unwrap().contains("second"));
    // 3 warm-up requests and 10 of the burst are counted once, whichever instance took them.
    assert_eq!(headers["x-ratelimit-remaining"], "87");
}

/// Three instances together over a minute: never more than `per_minute` in any 60 s (nor
/// `per_second` in any second), and the key works again once the minute has passed.
#[tokio::test]
async fn three_instances_together_keep_the_per_minute_limit_over_a_minute() {
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let [a, b, c] = three_on(&upstream, &redis).await;
    let gateways = [&a, &b, &c];
    let (_, secret) = a
        .create_key(json!({"name": "minute", "owner": "team-a",
                           "rate_limit": {"per_minute": 30, "per_second": 5}}))
        .await;
    for gw in [&b, &c] {
        gw.remember_secret(&secret);
    }

    let start = Instant::now();
    let mut allowed = Vec::new();
    let mut minute_refusals = 0;
    let mut i = 0;
    while start.elapsed() < Duration::from_secs(64) {
        let gw = gateways[i % 3];
        i += 1;
        let sent = start.elapsed();
        let response = gw.call_with_key("/", &secret).await;
        match response.status().as_u16() {
            200 => allowed.push((sent, start.elapsed())),
            429 => {
                let (headers, body) = problem(response, 429, "rate_limited").await;
                if body["detail"].as_str().unwrap().contains("minute") {
                    minute_refusals += 1;
                    assert!(retry_after(&headers) <= 61);
                }
            }
            other => panic!("status {other}"),
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    assert_no_window_over(&allowed, Duration::from_secs(60), 30);
    assert_no_window_over(&allowed, Duration::from_secs(1), 5);
    assert!(minute_refusals > 0, "the minute limit never refused");
    assert!(
        allowed.len() > 30,
        "only {} allowed: the key never came back after its minute",
        allowed.len()
    );
}

/// Redis killed under load: the gateways stay up, cached keys keep working past their ttl,
/// unknown keys get 503 with Retry-After and are never forwarded, usage is kept; Redis
/// restarted: new keys work again within seconds and the usage of the outage is in Redis.
#[tokio::test]
async fn redis_killed_under_load_then_restarted() {
    let mut redis = RedisServer::start();
    let upstream = Upstream::start().await;
    // Short ttl, long stale_if_error; 127.0.0.1 is trusted so the test can set a client IP.
    let extra = "cache:\n  ttl: 1s\n  stale_if_error: 5m\ntrusted_proxies: [\"127.0.0.1/32\"]\n";
    let a = Gateway::start_on_redis(&upstream, &redis, extra).await;
    let b = Gateway::start_on_redis(&upstream, &redis, extra).await;
    let (_, secret) = a
        .create_key(json!({"name": "busy", "owner": "team-a",
                           "rate_limit": {"per_minute": 1000000, "per_second": 100000}}))
        .await;
    let (_, never_used) = a.create_simple_key("never-used").await;
    // Used once before the outage (so it is cached) and once during it, from another IP.
    let (witness, witness_secret) = a.create_simple_key("witness").await;
    for gw in [&a, &b] {
        gw.remember_secret(&secret);
        gw.remember_secret(&never_used);
    }
    for gw in [&a, &b] {
        assert_eq!(gw.call_with_key("/", &secret).await.status(), 200);
    }
    assert_eq!(a.call_with_key("/", &witness_secret).await.status(), 200);

    // Load on both instances, through the kill and the restart.
    let stop = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = [&a, &b]
        .into_iter()
        .map(|gw| {
            let (http, url, secret, stop) = (
                gw.http.clone(),
                gw.url("/load"),
                secret.clone(),
                Arc::clone(&stop),
            );
            tokio::spawn(async move {
                let mut statuses = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let response = http.get(&url).header("x-api-key", &secret).send().await;
                    statuses.push(response.unwrap().status().as_u16());
                }
                statuses
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;

    redis.kill();
    let killed_at = jiff::Timestamp::now();
    // Past the 1 s ttl: cached keys are served stale; the store is known to be down.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for gw in [&a, &b] {
        let response = gw.call_from("203.0.113.7", "/during", &secret).await;
        assert_eq!(response.status(), 200);
        // A key nobody made, and one known to Redis but not to this instance's cache: neither
        // can be verified now.
        for unverifiable in [keygate::credential::generate("kg_"), never_used.clone()] {
            let response = gw.call_with_key("/unknown", &unverifiable).await;
            let (headers, _) = problem(response, 503, "store_unavailable").await;
            assert!(retry_after(&headers) >= 1);
        }
        assert_eq!(gw.probe("/readyz").await, 503);
        assert_eq!(gw.probe("/healthz").await, 200);
    }
    assert_eq!(
        upstream.count("/unknown"),
        0,
        "an unverified request was forwarded"
    );
    let response = a.call_from("203.0.113.7", "/during", &witness_secret).await;
    assert_eq!(response.status(), 200);
    // Let a usage flush fail while Redis is away.
    tokio::time::sleep(Duration::from_millis(500)).await;

    redis.restart();
    eventually(
        Duration::from_secs(10),
        "a new key can be created",
        || async {
            a.admin(
                Method::POST,
                "/v1/keys",
                Some(json!({"name": "after", "owner": "team-b"})),
            )
            .await
            .0 == 201
        },
    )
    .await;
    let (_, fresh) = a.create_simple_key("after-2").await;
    b.remember_secret(&fresh);
    eventually(Duration::from_secs(5), "the new key works on B", || async {
        b.call_with_key("/", &fresh).await.status() == 200
    })
    .await;
    assert_eq!(b.call_with_key("/", &never_used).await.status(), 200);
    for gw in [&a, &b] {
        assert_eq!(gw.probe("/readyz").await, 200);
    }
    // The use of the witness during the outage reached Redis once it came back.
    let witness_id = key_id(&witness).to_string();
    eventually(Duration::from_secs(3), "outage usage in Redis", || async {
        let key = b.get_key(&witness_id).await;
        key["last_used_ip"] == "203.0.113.7"
            && key["last_used_at"]
                .as_str()
                .unwrap()
                .parse::<jiff::Timestamp>()
                .unwrap()
                > killed_at
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let mut statuses = Vec::new();
    for task in load {
        statuses.extend(task.await.unwrap());
    }
    assert!(
        statuses.iter().all(|&s| s == 200),
        "a cached key was refused under load: {:?}",
        statuses.iter().filter(|&&s| s != 200).collect::<Vec<_>>()
    );
    assert_eq!(upstream.count("/during"), 3);
    // Both gateways were alive throughout and stop cleanly.
    for mut gw in [a, b] {
        assert!(gw.stop().success());
    }
}

/// A Redis that hangs (a paused process) does not hold up answers for cached keys: a hundred
/// requests, one after another, all get their answer while Redis is still paused; a key not
/// in the cache gets 503 rather than waiting; when Redis resumes, everything works again.
#[tokio::test]
async fn a_paused_redis_does_not_hold_up_cached_keys() {
    let redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let a = Gateway::start_on_redis(&upstream, &redis, LONG_TTL).await;
    let (_, secret) = a
        .create_key(json!({"name": "steady", "owner": "team-a",
                           "rate_limit": {"per_minute": 1000000, "per_second": 100000}}))
        .await;
    let (_, uncached) = a.create_simple_key("uncached").await;
    assert_eq!(a.call_with_key("/", &secret).await.status(), 200);

    redis.pause();
    let resumed = Arc::new(AtomicBool::new(false));
    let resumer = {
        let (resumed, pid) = (Arc::clone(&resumed), redis.pid());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            resumed.store(true, Ordering::SeqCst);
            support::signal(pid, "CONT");
        })
    };
    for i in 0..100 {
        let status = a.call_with_key("/", &secret).await.status();
        assert!(
            !resumed.load(Ordering::SeqCst),
            "request {i} was answered only after Redis resumed"
        );
        assert_eq!(status, 200, "request {i}");
    }
    a.refused("/", &uncached, 503, "store_unavailable").await;
    assert!(
        !resumed.load(Ordering::SeqCst),
        "the uncached key waited for Redis"
    );
    resumer.await.unwrap();

    eventually(Duration::from_secs(5), "the uncached key works", || async {
        a.call_with_key("/", &uncached).await.status() == 200
    })
    .await;
}

/// While Redis is away, `on_store_error: local` limits each instance on its own and
/// `on_store_error: reject` answers 503; both go back to global limits when it returns.
#[tokio::test]
async fn limits_follow_on_store_error_while_redis_is_away() {
    let mut redis = RedisServer::start();
    let upstream = Upstream::start().await;
    let local = Gateway::start_on_redis(&upstream, &redis, LONG_TTL).await;
    let reject = Gateway::start_on_redis(
        &upstream,
        &redis,
        "cache:\n  ttl: 1h\nrate_limit:\n  on_store_error: reject\n",
    )
    .await;
    let (_, secret) = local
        .create_key(json!({"name": "fallback", "owner": "team-a",
                           "rate_limit": {"per_minute": 100, "per_second": 3}}))
        .await;
    reject.remember_secret(&secret);
    for gw in [&local, &reject] {
        assert_eq!(gw.call_with_key("/", &secret).await.status(), 200);
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;

    redis.kill();
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(local.call_with_key("/", &secret).await.status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429]);
    let (headers, body) = reject.refused("/", &secret, 503, "store_unavailable").await;
    assert!(retry_after(&headers) >= 1);
    assert!(body["detail"].as_str().unwrap().contains("rate limits"));
    let metrics = reject.metrics().await;
    assert!(
        support::sample(
            &metrics,
            "keygate_store_errors_total",
            &[("op", "rate_limit")]
        ) >= 1.0
    );

    redis.restart();
    eventually(
        Duration::from_secs(10),
        "reject instance serves again",
        || async { reject.call_with_key("/", &secret).await.status() == 200 },
    )
    .await;
}
