//! Per-key rate limits as a client sees them: 429, Retry-After, and the guarantee that no
//! 60-second span holds more than per_minute allowed requests.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::{Gateway, Upstream, assert_no_window_over, key_id, problem, retry_after};

/// The shipped defaults (100/minute, 10/second): the 11th request within a second is refused
/// for 1 s; at 10 per second the 101st is refused for about 50 s; after Retry-After the key
/// works again; and no 60-second (or 1-second) span ever holds more than the limit.
#[tokio::test]
async fn shipped_defaults_hold_over_a_minute_and_a_half() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream, "").await;
    let (_, secret) = gw.create_simple_key("defaults").await;
    let start = Instant::now();
    // (sent, received) of each allowed request: the gateway decided somewhere in between.
    let mut allowed: Vec<(Duration, Duration)> = Vec::new();
    let send = || start.elapsed();

    // A burst of 11: ten pass, the eleventh waits a second.
    for _ in 0..10 {
        let sent = send();
        let response = gw.call_with_key("/", &secret).await;
        assert_eq!(response.status(), 200);
        allowed.push((sent, start.elapsed()));
    }
    let (headers, _) = gw.refused("/", &secret, 429, "rate_limited").await;
    assert_eq!(retry_after(&headers), 1);
    assert_eq!(headers["x-ratelimit-remaining"], "90");
    tokio::time::sleep(Duration::from_millis(1000)).await;

    // Then 10 per second until the minute's 100 are used up.
    let refused = loop {
        let sent = send();
        let response = gw.call_with_key("/", &secret).await;
        if response.status() == 429 {
            break response;
        }
        assert_eq!(response.status(), 200);
        allowed.push((sent, start.elapsed()));
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(allowed.len(), 100);
    let (headers, body) = problem(refused, 429, "rate_limited").await;
    assert!(body["detail"].as_str().unwrap().contains("minute"));
    let wait = retry_after(&headers);
    let expected = 61.0 - start.elapsed().as_secs_f64();
    assert!(
        (wait as f64 - expected).abs() <= 1.5,
        "Retry-After {wait}, expected about {expected:.1}"
    );
    assert!((45..=52).contains(&wait), "Retry-After {wait}");
    assert_eq!(headers["x-ratelimit-remaining"], "0");
    assert_eq!(
        headers["ratelimit-policy"],
        "\"minute\";q=100;w=60, \"second\";q=10;w=1"
    );

    // One second short of Retry-After the key is still refused; after it, allowed again.
    let refused_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(wait - 1)).await;
    gw.refused("/", &secret, 429, "rate_limited").await;
    tokio::time::sleep(
        (refused_at + Duration::from_secs(wait)).saturating_duration_since(Instant::now()),
    )
    .await;
    let sent = send();
    let response = gw.call_with_key("/", &secret).await;
    assert_eq!(response.status(), 200);
    allowed.push((sent, start.elapsed()));

    // Keep hammering for a while and check every window of the whole run.
    let until = Instant::now() + Duration::from_secs(12);
    while Instant::now() < until {
        let sent = send();
        let response = gw.call_with_key("/", &secret).await;
        if response.status() == 200 {
            allowed.push((sent, start.elapsed()));
        } else {
            assert_eq!(response.status(), 429);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_no_window_over(&allowed, Duration::from_secs(60), 100);
    assert_no_window_over(&allowed, Duration::from_secs(1), 10);
}

/// A key created with its own limits follows them, and says so in its headers.
#[tokio::test]
async fn a_key_with_its_own_limits_follows_them() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream, "").await;
    let (key, secret) = gw
        .create_key(json!({"name": "tight", "owner": "team-a", "rate_limit": {"per_minute": 4, "per_second": 2}}))
        .await;
    assert_eq!(key["rate_limit"], json!({"per_minute": 4, "per_second": 2}));
    let (_, default_secret) = gw.create_simple_key("loose").await;

    let first = gw.call_with_key("/", &secret).await;
    assert_eq!(
        first.headers()["ratelimit-policy"],
        "\"minute\";q=4;w=60, \"second\";q=2;w=1"
    );
    assert_eq!(first.headers()["x-ratelimit-limit"], "4");
    assert_eq!(first.headers()["x-ratelimit-remaining"], "3");
    assert_eq!(gw.call_with_key("/", &secret).await.status(), 200);
    let (headers, _) = gw.refused("/", &secret, 429, "rate_limited").await;
    assert_eq!(retry_after(&headers), 1);
    tokio::time::sleep(Duration::from_millis(1050)).await;
    assert_eq!(gw.call_with_key("/", &secret).await.status(), 200);
    assert_eq!(gw.call_with_key("/", &secret).await.status(), 200);
    tokio::time::sleep(Duration::from_millis(1050)).await;
    let (headers, _) = gw.refused("/", &secret, 429, "rate_limited").await;
    assert!((57..=61).contains(&retry_after(&headers)), "{headers:?}");
    // An edit makes the gateway fetch the key again; its windows stay as they were.
    let (status, _) = gw
        .admin(
            reqwest::Method::PATCH,
            &format!("/v1/keys/{}", key_id(&key)),
            Some(json!({"description": "edited while limited"})),
        )
        .await;
    assert_eq!(status, 200);
    let (headers, _) = gw.refused("/", &secret, 429, "rate_limited").await;
    assert!((56..=61).contains(&retry_after(&headers)), "{headers:?}");
    // Another key with the defaults is unaffected.
    for _ in 0..5 {
        assert_eq!(gw.call_with_key("/", &default_secret).await.status(), 200);
    }
    // Being refused is recorded in the audit log.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let events = gw.audit_events(&format!("?key_id={}", key_id(&key))).await;
    assert!(events.iter().any(|e| e == "rate_limited"), "{events:?}");
}

/// Many clients at once with one key: exactly per_second are let through in a burst.
#[tokio::test]
async fn concurrent_burst_lets_exactly_the_limit_through() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream, "").await;
    let (_, secret) = gw
        .create_key(json!({"name": "burst", "owner": "team-a", "rate_limit": {"per_minute": 1000, "per_second": 7}}))
        .await;
    let url = gw.url("/");
    let tasks: Vec<_> = (0..30)
        .map(|_| {
            let request = gw.http.get(&url).header("x-api-key", &secret);
            tokio::spawn(async move { request.send().await.unwrap().status().as_u16() })
        })
        .collect();
    let mut statuses = Vec::new();
    for task in tasks {
        statuses.push(task.await.unwrap());
    }
    assert_eq!(
        statuses.iter().filter(|&&s| s == 200).count(),
        7,
        "{statuses:?}"
    );
    assert_eq!(statuses.iter().filter(|&&s| s == 429).count(), 23);
}
