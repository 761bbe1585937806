//! Throughput of `rate_limit.scope: global` (every decision made in Redis) against
//! `scope: local` (decided in memory), both on the Redis store, same machine, same run.
//!
//! Starts a `redis-server` on a free port, an in-process upstream, and the release `keygate`
//! binary once per scope; creates 100 keys with limits high enough that every request is
//! allowed (the worst case for global: each request is a decision Redis must make); then
//! drives it with 64 keep-alive connections for a few seconds each. Prints requests per
//! second, latency percentiles, and global/local ratios. Needs `redis-server` on the PATH.
//!
//! Run: `cargo bench --bench scopes`

use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

const KEYS: usize = 100;
const CONNECTIONS: usize = 64;
const WARM_UP: Duration = Duration::from_secs(1);
const MEASURE: Duration = Duration::from_secs(5);
mod support;
use support::{Killed, cpu_seconds, free_port};

const TOKEN: &str = "bench-admin-token-0123456789";

fn start_redis(dir: &std::path::Path) -> (Killed, u16) {
    let port = free_port();
    let redis = Killed(
        Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", "no", "--loglevel", "warning"])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server on the PATH"),
    );
    support::wait_for_port(port, "redis-server", Duration::from_secs(4));
    (redis, port)
}

async fn start_upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service = service_fn(|_req: Request<hyper::body::Incoming>| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// Starts keygate with this config; returns the process and its data and admin addresses.
fn start_keygate(dir: &std::path::Path, yaml: &str) -> (Killed, SocketAddr, SocketAddr) {
    let config = dir.join("keygate.yaml");
    std::fs::write(&config, yaml).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_keygate"))
        .args(["serve", "-c"])
        .arg(&config)
        .current_dir(dir)
        .env("RUST_LOG", "info,keygate::access=warn")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let (mut data, mut admin) = (None, None);
    while data.is_none() || admin.is_none() {
        let line = lines.next().expect("keygate exited").unwrap();
        let addr = line
            .split("Some(")
            .nth(1)
            .and_then(|r| r.split(')').next())
            .and_then(|a| a.parse::<SocketAddr>().ok());
        if line.contains("data plane listening") {
            data = addr;
        } else if line.contains("admin API listening") {
            admin = addr;
        }
    }
    // Keep draining stderr so the process never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (Killed(child), data.unwrap(), admin.unwrap())
}

async fn create_keys(http: &reqwest::Client, admin: SocketAddr, scope: &str) -> Vec<String> {
    let mut secrets = Vec::new();
    for i in 0..KEYS {
        let body = serde_json::json!({
            "name": format!("bench-{scope}-{i}"), "owner": format!("bench-{scope}-{}", i % 10),
            "rate_limit": {"per_minute": 1_000_000, "per_second": 100_000},
        });
        let response = http
            .post(format!("http://{admin}/v1/keys"))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        let key: serde_json::Value = response.json().await.unwrap();
        secrets.push(key["secret"].as_str().unwrap().to_string());
    }
    secrets
}

struct Run {
    per_second: f64,
    /// CPU µs per request of keygate and of redis-server.
    keygate_cpu_us: f64,
    redis_cpu_us: f64,
    p50: Duration,
    p99: Duration,
    refused: usize,
}

/// `CONNECTIONS` workers, each sending one request after another with key `i % KEYS`.
async fn drive(addr: SocketAddr, secrets: Arc<Vec<String>>, length: Duration) -> Run {
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let deadline = Instant::now() + length;
    let workers: Vec<_> = (0..CONNECTIONS)
        .map(|w| {
            let (client, secrets) = (client.clone(), Arc::clone(&secrets));
            tokio::spawn(async move {
                let (mut latencies, mut refused) = (Vec::new(), 0);
                let mut i = w;
                while Instant::now() < deadline {
                    let request = Request::get(format!("http://{addr}/bench"))
                        .header("x-api-key", &secrets[i % secrets.len()])
                        .body(Empty::new())
                        .unwrap();
                    i += CONNECTIONS;
                    let started = Instant::now();
                    let response = client.request(request).await.unwrap();
                    let status = response.status();
                    response.into_body().collect().await.unwrap();
                    latencies.push(started.elapsed());
                    if status != 200 {
                        refused += 1;
                    }
                }
                (latencies, refused)
            })
        })
        .collect();
    let (mut all, mut refused) = (Vec::new(), 0);
    for w in workers {
        let (latencies, r) = w.await.unwrap();
        all.extend(latencies);
        refused += r;
    }
    all.sort();
    let at = |q: f64| all[((all.len() - 1) as f64 * q) as usize];
    Run {
        per_second: all.len() as f64 / length.as_secs_f64(),
        keygate_cpu_us: 0.0,
        redis_cpu_us: 0.0,
        p50: at(0.50),
        p99: at(0.99),
        refused,
    }
}

async fn measure(scope: &str, redis: u32, redis_port: u16, upstream: SocketAddr) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "listen: 127.0.0.1:0\nadmin:\n  listen: 127.0.0.1:0\n  token: {TOKEN}\n\
         store:\n  backend: redis\n  redis_url: redis://127.0.0.1:{redis_port}/0\n  key_prefix: \"bench-{scope}:\"\n\
         rate_limit:\n  scope: {scope}\nroutes:\n  - name: api\n    upstream: http://{upstream}\n"
    );
    let (keygate, data, admin) = start_keygate(dir.path(), &yaml);
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let secrets = Arc::new(create_keys(&http, admin, scope).await);
    drive(data, Arc::clone(&secrets), WARM_UP).await;
    let pid = keygate.0.id();
    let (keygate_before, redis_before) = (cpu_seconds(pid), cpu_seconds(redis));
    let mut run = drive(data, secrets, MEASURE).await;
    let requests = run.per_second * MEASURE.as_secs_f64();
    run.keygate_cpu_us = (cpu_seconds(pid) - keygate_before) * 1e6 / requests;
    run.redis_cpu_us = (cpu_seconds(redis) - redis_before) * 1e6 / requests;
    run
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let (redis, redis_port) = start_redis(dir.path());
    let upstream = start_upstream().await;
    println!(
        "{KEYS} keys, {CONNECTIONS} connections, {}s per scope, every request allowed",
        MEASURE.as_secs()
    );
    let local = measure("local", redis.0.id(), redis_port, upstream).await;
    let global = measure("global", redis.0.id(), redis_port, upstream).await;
    for (name, run) in [("local", &local), ("global", &global)] {
        println!(
            "scope {name:<7} {:>9.0} req/s   p50 {:>6.2} ms   p99 {:>6.2} ms   \
             CPU/request: keygate {:>5.1} µs, redis {:>5.1} µs   refused {}",
            run.per_second,
            run.p50.as_secs_f64() * 1e3,
            run.p99.as_secs_f64() * 1e3,
            run.keygate_cpu_us,
            run.redis_cpu_us,
            run.refused
        );
    }
    println!(
        "global/local: throughput {:.2}x, p50 {:.2}x, p99 {:.2}x",
        global.per_second / local.per_second,
        global.p50.as_secs_f64() / local.p50.as_secs_f64(),
        global.p99.as_secs_f64() / local.p99.as_secs_f64()
    );
}
