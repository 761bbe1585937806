//! What SREs rely on: metrics that count exactly and pass promtool, the shipped alert rules and
//! dashboard, JSON logs without secrets, and a graceful stop on SIGTERM.

mod support;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use keygate::store::{SqliteStore, Store};
use serde_json::{Value, json};
use support::{Gateway, Upstream, key_id, problem, sample};

/// A sample's label set, as `support::sample` takes it.
type Labels<'a> = &'a [(&'a str, &'a str)];

const CONFIG_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config");

fn promtool(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .current_dir(CONFIG_DIR)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect(
            "promtool is needed: run ./scripts/test, which installs it (Debian package prometheus)",
        );
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    let output = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// After forwarded, 401, 429, 404 and 502 answers, each counter moved by exactly that many,
/// no key id or secret appears, and the output passes `promtool check metrics`.
#[tokio::test]
async fn metrics_count_exactly_and_pass_promtool() {
    let upstream = Upstream::start().await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let routes = format!(
        "routes:\n  - name: api\n    path_prefix: /api\n    upstream: {}\n  - name: down\n    path_prefix: /down\n    upstream: http://{closed}\n",
        upstream.url()
    );
    let gw = Gateway::start(&upstream, &routes).await;
    let (key, secret) = gw
        .create_key(json!({"name": "metered", "owner": "team-a", "rate_limit": {"per_second": 3}}))
        .await;
    let (_, other) = gw.create_simple_key("metered-down").await;
    let before = gw.metrics().await;

    for _ in 0..3 {
        assert_eq!(gw.call_with_key("/api/x", &secret).await.status(), 200);
    }
    for _ in 0..2 {
        gw.refused("/api/x", &secret, 429, "rate_limited").await;
    }
    for _ in 0..2 {
        let missing = gw.http.get(gw.url("/api/x")).send().await.unwrap();
        problem(missing, 401, "missing_api_key").await;
        gw.refused("/api/x", "not-a-key", 401, "invalid_api_key")
            .await;
    }
    gw.refused("/nowhere", &secret, 404, "no_route").await;
    gw.refused("/down", &other, 502, "upstream_unavailable")
        .await;

    let after = gw.metrics().await;
    let delta = |name: &str, labels: &[(&str, &str)]| {
        sample(&after, name, labels) - sample(&before, name, labels)
    };
    let requests = "keygate_requests_total";
    // Each key's first request misses the cache; the other four of `metered` hit it.
    let expected: &[(&str, Labels, f64)] = &[
        (requests, &[("route", "api"), ("outcome", "forwarded")], 3.0),
        (
            requests,
            &[("route", "api"), ("outcome", "rate_limited")],
            2.0,
        ),
        (
            requests,
            &[("route", "api"), ("outcome", "unauthorized")],
            4.0,
        ),
        (requests, &[("route", "none"), ("outcome", "no_route")], 1.0),
        (
            requests,
            &[("route", "down"), ("outcome", "upstream_error")],
            1.0,
        ),
        (
            "keygate_request_duration_seconds_count",
            &[("route", "api"), ("outcome", "forwarded")],
            3.0,
        ),
        (
            "keygate_upstream_duration_seconds_count",
            &[("route", "api")],
            3.0,
        ),
        (
            "keygate_upstream_duration_seconds_count",
            &[("route", "down")],
            1.0,
        ),
        (
            "keygate_auth_failures_total",
            &[("reason", "missing_api_key")],
            2.0,
        ),
        (
            "keygate_auth_failures_total",
            &[("reason", "invalid_api_key")],
            2.0,
        ),
        ("keygate_rate_limited_total", &[("limit", "second")], 2.0),
        ("keygate_rate_limited_total", &[("limit", "minute")], 0.0),
        (
            "keygate_key_cache_lookups_total",
            &[("result", "miss")],
            2.0,
        ),
        ("keygate_key_cache_lookups_total", &[("result", "hit")], 4.0),
        ("keygate_store_errors_total", &[("op", "key_lookup")], 0.0),
    ];
    for (name, labels, want) in expected {
        assert_eq!(delta(name, labels), *want, "{name}{labels:?}");
    }
    assert!(sample(&after, "keygate_connections_active", &[]) >= 0.0);
    assert!(after.contains("# TYPE keygate_connections_active gauge"));

    assert!(!after.contains(key_id(&key)), "a key id in a metric label");
    assert!(!after.contains(&secret[3..]), "a secret in the metrics");
    let (ok, report) = promtool(&["check", "metrics"], Some(&after));
    assert!(ok, "promtool check metrics failed:\n{report}");
}

/// The shipped Prometheus config and alert rules are valid, and the alerts fire in their unit tests.
#[test]
fn shipped_prometheus_config_and_alert_rules_pass_promtool() {
    let (ok, report) = promtool(&["check", "config", "prometheus.yml"], None);
    assert!(ok, "{report}");
    let (ok, report) = promtool(&["check", "rules", "alerts.yml"], None);
    assert!(ok, "{report}");
    assert!(report.contains("5 rules found"), "{report}");
    let (ok, report) = promtool(&["test", "rules", "alerts_test.yml"], None);
    assert!(ok, "{report}");
}

/// Every metric the dashboard and the alerts query is one keygate exposes.
#[tokio::test]
async fn dashboard_and_alerts_query_only_metrics_that_exist() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream, "").await;
    let exposed = gw.metrics().await;
    let families: Vec<&str> = exposed
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{CONFIG_DIR}/grafana/keygate.json")).unwrap(),
    )
    .unwrap();
    let mut queries: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter())
        .map(|t| t["expr"].as_str().unwrap().to_string())
        .collect();
    assert!(queries.len() >= 10);
    queries.push(std::fs::read_to_string(format!("{CONFIG_DIR}/alerts.yml")).unwrap());
    let mut used = 0;
    for query in &queries {
        for word in query.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if !word.starts_with("keygate_") {
                continue;
            }
            let family = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|suffix| word.strip_suffix(suffix))
                .filter(|base| families.contains(base))
                .unwrap_or(word);
            assert!(
                families.contains(&family),
                "`{word}` is queried but not exposed"
            );
            used += 1;
        }
    }
    assert!(used >= 15);
}

/// SIGTERM with 50 slow requests in flight: all 50 complete with 200, new connections are
/// refused, the process exits 0, and the usage of those requests is in the store.
#[tokio::test]
async fn sigterm_lets_requests_in_flight_finish() {
    let upstream = Upstream::start().await;
    let mut gw = Gateway::start_edited(&upstream, &[], support::hourly_usage_flush).await;
    let (key, secret) = gw
        .create_key(
            json!({"name": "in-flight", "owner": "team-a", "rate_limit": {"per_second": 100}}),
        )
        .await;
    let url = gw.url("/slow?ms=1500");
    let requests: Vec<_> = (0..50)
        .map(|_| {
            // One client each: 50 connections, as 50 API clients would open.
            let request = reqwest::Client::new()
                .get(&url)
                .header("x-api-key", &secret);
            tokio::spawn(async move { request.send().await.map(|r| r.status().as_u16()) })
        })
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while sample(&gw.metrics().await, "keygate_connections_active", &[]) < 50.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the 50 requests never got in flight"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gw.terminate();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        tokio::net::TcpStream::connect(gw.addr).await.is_err(),
        "a new connection was accepted after SIGTERM"
    );
    for request in requests {
        assert_eq!(request.await.unwrap().unwrap(), 200);
    }
    let status = gw.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{status:?}");
    assert!(gw.logs().contains("usage flushed"));

    let store = SqliteStore::open(&gw.dir.join("keygate.db")).unwrap();
    let stored = store.key_by_id(key_id(&key)).await.unwrap().unwrap();
    assert!(
        stored.last_used_at.is_some(),
        "usage of the in-flight requests was lost"
    );
    assert_eq!(stored.last_used_ip, Some("127.0.0.1".parse().unwrap()));
}

/// A request still running at `shutdown_timeout` is cut, the count is logged, the exit is 0.
#[tokio::test]
async fn shutdown_timeout_cuts_what_is_left() {
    let upstream = Upstream::start().await;
    let mut gw = Gateway::start(&upstream, "shutdown_timeout: 500ms\n").await;
    let (_, secret) = gw.create_simple_key("straggler").await;
    let request = gw
        .http
        .get(gw.url("/slow?ms=20000"))
        .header("x-api-key", &secret)
        .send();
    let request = tokio::spawn(request);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    gw.terminate();
    let status = gw.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        gw.logs().contains("cut connections still open"),
        "{}",
        gw.logs()
    );
    assert!(
        request.await.unwrap().is_err(),
        "the cut request cannot have succeeded"
    );
}

/// The whole flow with `--log-format json`: every line is a JSON object, access lines carry
/// the fields SREs search by, and no secret appears anywhere.
#[tokio::test]
async fn json_logs_parse_and_never_hold_a_secret() {
    let upstream = Upstream::start().await;
    let mut gw = Gateway::start_edited(&upstream, &["--log-format", "json"], |yaml| yaml).await;

    let (key, secret) = gw.create_simple_key("json-logged").await;
    assert_eq!(gw.call_with_key("/", &secret).await.status(), 200);
    let mut typo = secret.clone();
    typo.pop();
    gw.refused("/", &typo, 401, "invalid_api_key").await;
    let (_, rotated) = gw.rotate(key_id(&key), None).await;
    let new_secret = rotated["secret"].as_str().unwrap().to_string();
    assert_eq!(gw.call_with_key("/", &new_secret).await.status(), 200);
    assert_eq!(gw.revoke(key_id(&rotated)).await.0, 200);
    gw.refused("/", &new_secret, 401, "revoked_api_key").await;
    assert!(gw.stop().success());

    let logs = gw.logs();
    let mut access = Vec::new();
    for line in logs.lines() {
        let entry: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            entry["level"].is_string() && entry["timestamp"].is_string(),
            "{line}"
        );
        if entry["target"] == "keygate::access" {
            access.push(entry);
        }
    }
    assert_eq!(access.len(), 4, "one access line per data-plane request");
    let first = &access[0];
    for field in [
        "route",
        "method",
        "status",
        "outcome",
        "key_id",
        "client_ip",
        "latency_us",
    ] {
        assert!(
            !first[field].is_null(),
            "access line without {field}: {first}"
        );
    }
    assert_eq!(first["key_id"], key_id(&key));
    assert_eq!(first["outcome"], "forwarded");
    assert_eq!(access[1]["status"], 401);
    for secret in [&secret, &new_secret] {
        assert!(!logs.contains(&secret[3..]), "a secret in the logs");
    }
}

/// `workers` sets how many threads serve requests (for comparing worker for worker), and the
/// gateway says how many it runs.
#[tokio::test]
async fn workers_setting_is_followed() {
    let upstream = Upstream::start().await;
    let gw = Gateway::start(&upstream, "workers: 1\n").await;
    let (_, secret) = gw.create_simple_key("one-worker").await;
    assert_eq!(gw.call_with_key("/", &secret).await.status(), 200);
    assert!(gw.logs().contains("serving with 1 worker threads"));
    let threads = std::fs::read_dir(format!("/proc/{}/task", gw.pid()))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.trim() == "keygate-worker")
        .count();
    assert_eq!(threads, 1, "worker threads");
}
