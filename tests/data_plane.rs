//! The data plane as an API client and an upstream see it, through the real binary.

mod support;

use std::time::Duration;

use http_body_util::BodyExt;
use serde_json::{Value, json};
use support::{Gateway, Upstream, key_id, memory_kib, problem, retry_after};

/// Each kind of bad credential gets 401 with its own problem code and a Bearer challenge.
#[tokio::test]
async fn every_bad_credential_gets_401_with_its_code() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream, "").await;
    let (_, good) = gw.create_simple_key("good-key").await;

    let missing = gw.http.get(gw.url("/x")).send().await.unwrap();
    let (headers, body) = problem(missing, 401, "missing_api_key").await;
    assert_eq!(headers["www-authenticate"], "Bearer realm=\"keygate\"");
    assert!(body["detail"].as_str().unwrap().contains("X-API-Key"));

    // Wrong checksum: refused without a store lookup.
    let mut malformed = good.clone();
    malformed.replace_range(5..6, if &good[5..6] == "a" { "b" } else { "a" });
    gw.refused("/x", &malformed, 401, "invalid_api_key").await;
    gw.refused("/x", "not-a-key", 401, "invalid_api_key").await;

    // Well-formed but unknown.
    let unknown = keygate::credential::generate("kg_");
    gw.refused("/x", &unknown, 401, "invalid_api_key").await;

    // Two different credentials.
    let bearer_unknown = format!("Bearer {unknown}");
    let conflicting = [
        ("x-api-key", good.as_str()),
        ("authorization", &bearer_unknown),
    ];
    let response = gw.call_with_headers("/x", &conflicting).await;
    problem(response, 401, "invalid_api_key").await;
    let repeated = [("x-api-key", good.as_str()), ("x-api-key", &unknown)];
    let response = gw.call_with_headers("/x", &repeated).await;
    problem(response, 401, "invalid_api_key").await;

    // The same key in both headers is fine, and Bearer is case-insensitive.
    let bearer_good = format!("bearer {good}");
    let both = [
        ("x-api-key", good.as_str()),
        ("authorization", &bearer_good),
    ];
    assert_eq!(gw.call_with_headers("/x", &both).await.status(), 200);

    // Expired: a key that expires in 2 s, used after that.
    let expires_at = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(2);
    let (_, short) = gw
        .create_key(
            json!({"name": "short-lived", "owner": "team-a", "expires_at": expires_at.to_string()}),
        )
        .await;
    assert_eq!(gw.call_with_key("/x", &short).await.status(), 200);
    tokio::time::sleep(Duration::from_millis(2300)).await;
    gw.refused("/x", &short, 401, "expired_api_key").await;

    // Revoked: refused on the very next request, though the key was cached.
    let (key, revoked) = gw.create_simple_key("to-revoke").await;
    assert_eq!(gw.call_with_key("/x", &revoked).await.status(), 200);
    assert_eq!(gw.revoke(key_id(&key)).await.0, 200);
    gw.refused("/x", &revoked, 401, "revoked_api_key").await;
}

/// The upstream sees the request as sent, minus the credential and hop-by-hop headers, plus
/// trustworthy X-Keygate-* and X-Forwarded-* headers; the client sees the upstream's answer
/// without its hop-by-hop headers, plus rate-limit headers.
/// The same with a body (through hyper's client) and without one (the lean exchange).
#[tokio::test]
async fn forwarding_rewrites_exactly_what_the_spec_says() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream, "").await;
    let (key, secret) = gw
        .create_key(json!({"name": "forwarder", "owner": "team-b"}))
        .await;

    for (method, body, remaining) in [("POST", "hello body", 99), ("GET", "", 98)] {
        let mut request = gw.http.request(
            method.parse().unwrap(),
            gw.url("/orders/42?expand=items&x=%20y"),
        );
        if !body.is_empty() {
            request = request.body(body);
        }
        let response = request
            .header("authorization", format!("Bearer {secret}"))
            .header("x-keygate-key-id", "forged")
            .header("X-Keygate-Admin", "true")
            .header("x-forwarded-for", "203.0.113.9")
            .header("connection", "x-private")
            .header("x-private", "secret-hop")
            .header("x-end-to-end", "kept")
            .header("host", "api.example.com")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()["ratelimit-policy"],
            "\"minute\";q=100;w=60, \"second\";q=10;w=1"
        );
        assert_eq!(response.headers()["x-ratelimit-limit"], "100");
        for hop_by_hop in ["connection", "x-upstream-private", "keep-alive"] {
            assert!(
                !response.headers().contains_key(hop_by_hop),
                "{method}: {hop_by_hop} passed on"
            );
        }
        assert_eq!(
            response.headers()["x-ratelimit-remaining"],
            remaining.to_string().as_str()
        );
        assert!(
            response.headers()["ratelimit"]
                .to_str()
                .unwrap()
                .starts_with(&format!("\"minute\";r={remaining};t="))
        );
        let seen: Value = response.json().await.unwrap();
        let h = &seen["headers"];
        assert_eq!(seen["method"], method);
        assert_eq!(seen["path"], "/orders/42");
        assert_eq!(seen["query"], "expand=items&x=%20y");
        assert_eq!(seen["body_bytes"], body.len());
        assert!(
            h.get("authorization").is_none(),
            "credential forwarded: {h}"
        );
        assert_eq!(h["x-keygate-key-id"], json!([key["id"]]), "{method}");
        assert_eq!(h["x-keygate-owner"], json!(["team-b"]));
        assert!(h.get("x-keygate-admin").is_none());
        assert!(h.get("x-private").is_none() && h.get("connection").is_none());
        assert_eq!(h["x-end-to-end"], json!(["kept"]));
        // The peer is not a trusted proxy: its X-Forwarded-For is replaced, not believed.
        assert_eq!(h["x-forwarded-for"], json!(["127.0.0.1"]));
        assert_eq!(h["x-forwarded-proto"], json!(["http"]));
        assert_eq!(h["x-forwarded-host"], json!(["api.example.com"]));
        assert_eq!(h["host"], json!([upstream.addr.to_string()]));
    }

    // X-API-Key is removed the same way.
    let seen: Value = gw.call_with_key("/", &secret).await.json().await.unwrap();
    assert!(seen["headers"].get("x-api-key").is_none());
}

/// Behind a trusted proxy, the client IP is the right-most untrusted X-Forwarded-For entry,
/// and it is what last_used_ip records.
#[tokio::test]
async fn trusted_proxies_are_believed_and_usage_is_recorded() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream, "trusted_proxies: [127.0.0.0/8]\n").await;
    let (key, secret) = gw.create_simple_key("behind-proxy").await;
    let id = key_id(&key);
    assert!(gw.get_key(id).await["last_used_at"].is_null());
    let seen: Value = gw
        .call_from("198.51.100.7, 10.1.1.1", "/", &secret)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        seen["headers"]["x-forwarded-for"],
        json!(["198.51.100.7, 10.1.1.1, 127.0.0.1"])
    );
    // flush_interval is 200ms in tests.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let key = gw.get_key(id).await;
    assert_eq!(key["last_used_ip"], "10.1.1.1");
    let used: jiff::Timestamp = key["last_used_at"].as_str().unwrap().parse().unwrap();
    assert!(jiff::Timestamp::now().duration_since(used) < jiff::SignedDuration::from_secs(5));
}

/// Routing comes first (404 whatever the credentials), then host, prefix, strip_prefix and
/// public routes.
#[tokio::test]
async fn routes_match_host_and_prefix_and_public_paths_need_no_key() {
    let upstream = Upstream::start().await;
    let extra = format!(
        "routes:
  - name: status
    path_prefix: /status
    upstream: {u}
    auth: none
  - name: v2
    path_prefix: /v2/
    host: API.example.com
    upstream: {u}/internal
    strip_prefix: true
  - name: v1
    path_prefix: /v1/
    upstream: {u}
",
        u = upstream.url()
    );
    let gw = Gateway::start(&upstream, &extra).await;
    let (_, secret) = gw.create_simple_key("router").await;

    let response = gw.call_with_key("/nothing-here", &secret).await;
    problem(response, 404, "no_route").await;
    problem(
        gw.http.get(gw.url("/elsewhere")).send().await.unwrap(),
        404,
        "no_route",
    )
    .await;

    let public: Value = gw
        .http
        .get(gw.url("/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(public["path"], "/status");
    assert!(public["headers"].get("x-keygate-key-id").is_none());

    let stripped: Value = gw
        .http
        .get(gw.url("/v2/users"))
        .header("host", "api.example.COM:8443")
        .header("x-api-key", &secret)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stripped["path"], "/internal/users");
    // Wrong host: the v2 route does not take it, and no other route does either.
    let response = gw
        .http
        .get(gw.url("/v2/users"))
        .header("host", "other.example.com")
        .header("x-api-key", &secret)
        .send()
        .await
        .unwrap();
    problem(response, 404, "no_route").await;
    let v1: Value = gw
        .call_with_key("/v1/a", &secret)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v1["path"], "/v1/a");
}

/// An upstream that refuses connections gives 502, one slower than the route's timeout 504.
#[tokio::test]
async fn upstream_failures_are_502_and_504() {
    let upstream = Upstream::start().await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let extra = format!(
        "routes:
  - name: down
    path_prefix: /down
    upstream: http://{closed}
  - name: slow
    path_prefix: /
    upstream: {}
    timeout: 300ms
",
        upstream.url()
    );
    let gw = Gateway::start(&upstream, &extra).await;
    let (_, secret) = gw.create_simple_key("upstream-fail").await;
    gw.refused("/down", &secret, 502, "upstream_unavailable")
        .await;
    gw.refused("/slow?ms=2000", &secret, 504, "upstream_timeout")
        .await;
    assert_eq!(gw.call_with_key("/slow?ms=10", &secret).await.status(), 200);
}

/// A header block over max_header_bytes gets 431 problem+json.
#[tokio::test]
async fn oversized_headers_get_431() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream, "limits:\n  max_header_bytes: 4096\n").await;
    let (_, secret) = gw.create_simple_key("big-headers").await;
    let response = gw
        .http
        .get(gw.url("/"))
        .header("x-api-key", &secret)
        .header("x-padding", "p".repeat(5000))
        .send()
        .await
        .unwrap();
    problem(response, 431, "headers_too_large").await;
}

/// A client IP that keeps failing authentication is refused with 429 before its keys are
/// even looked at, valid ones included.
#[tokio::test]
async fn repeated_failed_authentication_is_throttled_per_ip() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream, "limits:\n  failed_auth_per_minute_per_ip: 5\n").await;
    let (_, secret) = gw.create_simple_key("victim-key").await;
    for _ in 0..5 {
        gw.refused("/", "guess", 401, "invalid_api_key").await;
    }
    let (headers, _) = gw
        .refused("/", "guess", 429, "too_many_failed_attempts")
        .await;
    assert!(retry_after(&headers) >= 1);
    gw.refused("/", &secret, 429, "too_many_failed_attempts")
        .await;
}

/// 50 MB up and 50 MB down stream through without the gateway's memory growing by that much.
#[tokio::test]
async fn large_bodies_stream_without_buffering() {
    const SIZE: u64 = 50 * 1024 * 1024;
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream, "").await;
    let (_, secret) = gw.create_simple_key("big-body").await;
    // Warm up connections and allocator before measuring.
    assert_eq!(gw.call_with_key("/", &secret).await.status(), 200);
    let (before, _) = memory_kib(gw.pid());

    let request = hyper::Request::post(gw.url("/upload"))
        .header("x-api-key", &secret)
        .body(support::Chunks::new(SIZE))
        .unwrap();
    let response = support::streaming_client().request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let seen: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(seen["body_bytes"], SIZE);

    let mut download = gw
        .call_with_key(&format!("/big?bytes={SIZE}"), &secret)
        .await;
    assert_eq!(download.status(), 200);
    let mut received = 0u64;
    while let Some(chunk) = download.chunk().await.unwrap() {
        received += chunk.len() as u64;
    }
    assert_eq!(received, SIZE);

    let (_, peak) = memory_kib(gw.pid());
    let grown_mib = peak.saturating_sub(before) / 1024;
    assert!(
        grown_mib < 20,
        "gateway memory grew by {grown_mib} MiB for 50 MiB bodies"
    );
}

/// Keys, and their recorded usage, survive a restart of the gateway; SIGTERM exits 0.
#[tokio::test]
async fn keys_survive_a_restart() {
    let upstream = Upstream::start().await;
    let mut gw = Gateway::start_edited(&upstream, &[], support::hourly_usage_flush).await;
    let (key, secret) = gw.create_simple_key("durable").await;
    assert_eq!(gw.call_with_key("/", &secret).await.status(), 200);
    // The flush interval is an hour: only the shutdown flush can have written the usage.
    assert!(gw.stop().success());

    let gw = gw.start_again().await;
    let stored = gw.get_key(key_id(&key)).await;
    assert_eq!(stored["name"], "durable");
    assert_eq!(stored["last_used_ip"], "127.0.0.1");
    assert_eq!(gw.call_with_key("/", &secret).await.status(), 200);
}
