//! What the integration tests do, named for what a user does: start an upstream, start the
//! real `keygate` binary in front of it on ephemeral ports, create keys, call through them.
#![allow(dead_code, unreachable_pub)]

pub mod redis_server;

use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::net::TcpListener;

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// An upstream that answers every request with JSON describing what it received:
/// method, path, query, headers and the number of body bytes (counted as they stream).
/// `/slow?ms=N` waits N ms first; `/big?bytes=N` streams N bytes back.
pub struct Upstream {
    pub addr: SocketAddr,
    /// The path of every request that reached it, in order of arrival.
    seen: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    pub async fn start() -> Upstream {
        Upstream::start_with_tls(None).await
    }

    /// The same upstream behind TLS with this server configuration (an `https` upstream).
    pub async fn start_with_tls(tls: Option<Arc<rustls::ServerConfig>>) -> Upstream {
        let tls = tls.map(tokio_rustls::TlsAcceptor::from);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let log = Arc::clone(&log);
                let service = service_fn(move |req: Request<Incoming>| {
                    log.lock().unwrap().push(req.uri().path().to_string());
                    echo(req)
                });
                let tls = tls.clone();
                tokio::spawn(async move {
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let _ = match tls {
                        None => {
                            builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await
                        }
                        Some(tls) => match tls.accept(stream).await {
                            Ok(stream) => {
                                builder
                                    .serve_connection(TokioIo::new(stream), service)
                                    .await
                            }
                            Err(_) => return,
                        },
                    };
                });
            }
        });
        Upstream { addr, seen, task }
    }

    /// How many requests for `path` reached the upstream.
    pub fn count(&self, path: &str) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|p| *p == path)
            .count()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

type EchoBody = http_body_util::Either<Full<Bytes>, Chunks>;

async fn echo(req: Request<Incoming>) -> Result<Response<EchoBody>, Infallible> {
    let query: Vec<(String, String)> = req
        .uri()
        .query()
        .map(|q| {
            q.split('&')
                .filter_map(|p| p.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .unwrap_or_default();
    let param = |name: &str| {
        query
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.parse::<u64>().ok())
    };
    if req.uri().path().ends_with("/slow") {
        tokio::time::sleep(Duration::from_millis(param("ms").unwrap_or(1000))).await;
    }
    if req.uri().path().ends_with("/big") {
        let size = param("bytes").unwrap_or(0);
        return Ok(Response::new(EchoBody::Right(Chunks::new(size))));
    }
    let mut headers = serde_json::Map::new();
    for name in req.headers().keys() {
        let values: Vec<Value> = req
            .headers()
            .get_all(name)
            .iter()
            .map(|v| json!(String::from_utf8_lossy(v.as_bytes())))
            .collect();
        headers.insert(name.to_string(), Value::Array(values));
    }
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let raw_query = req.uri().query().map(str::to_string);
    let mut body = req.into_body();
    let mut body_bytes = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.map(|f| f.into_data()) {
            body_bytes += data.map(|d| d.len() as u64).unwrap_or(0);
        } else {
            break;
        }
    }
    let answer = json!({
        "method": method, "path": path, "query": raw_query,
        "headers": headers, "body_bytes": body_bytes,
    });
    let mut response = Response::new(EchoBody::Left(Full::new(Bytes::from(answer.to_string()))));
    let headers = response.headers_mut();
    headers.insert("content-type", "application/json".parse().unwrap());
    // Hop-by-hop, for this hop only: the gateway must not pass them on.
    headers.insert("connection", "x-upstream-private".parse().unwrap());
    headers.insert("x-upstream-private", "1".parse().unwrap());
    headers.insert("keep-alive", "timeout=60".parse().unwrap());
    Ok(response)
}

/// A body of `remaining` bytes in 64 KiB chunks, made as it is sent: never held whole.
pub struct Chunks {
    remaining: u64,
    chunk: Bytes,
}

impl Chunks {
    pub fn new(size: u64) -> Chunks {
        Chunks {
            remaining: size,
            chunk: Bytes::from(vec![b'x'; 64 * 1024]),
        }
    }
}

impl hyper::body::Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = self.remaining.min(self.chunk.len() as u64) as usize;
        self.remaining -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n)))))
    }
}

/// Config text for a gateway in front of `upstream`, with the store in `dir`.
/// `extra` is YAML appended at the top level (it may replace sections not set here).
pub fn config_yaml(upstream: &str, dir: &Path, extra: &str) -> String {
    let mut text = format!(
        "listen: 127.0.0.1:0\nadmin:\n  listen: 127.0.0.1:0\n  token: {ADMIN_TOKEN}\nstore:\n  path: {}\nusage:\n  flush_interval: 200ms\n",
        dir.join("keygate.db").display()
    );
    if !extra.contains("routes:") {
        text.push_str(&format!(
            "routes:\n  - name: api\n    upstream: {upstream}\n"
        ));
    }
    text.push_str(extra);
    text
}

/// A config edit: usage is flushed hourly, so only the shutdown flush can write it in a test.
pub fn hourly_usage_flush(yaml: String) -> String {
    yaml.replace("flush_interval: 200ms", "flush_interval: 1h")
}

/// A running `keygate serve` process.
pub struct Gateway {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub dir: PathBuf,
    _tmp: Option<Arc<TempDir>>,
    logs: Arc<Mutex<String>>,
    secrets: Mutex<Vec<String>>,
    pub http: reqwest::Client,
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_keygate")
}

impl Gateway {
    /// Starts a gateway in front of `upstream` with a fresh store.
    pub async fn start(upstream: &Upstream, extra: &str) -> Gateway {
        let tmp = Arc::new(tempfile::tempdir().unwrap());
        let dir = tmp.path().to_path_buf();
        let yaml = config_yaml(&upstream.url(), &dir, extra);
        Gateway::start_with(&dir, &yaml, Some(tmp), &[]).await
    }

    /// Starts a gateway with a fresh store, its test config changed by `edit`, and extra
    /// `serve` arguments.
    pub async fn start_edited(
        upstream: &Upstream,
        args: &[&str],
        edit: impl FnOnce(String) -> String,
    ) -> Gateway {
        let tmp = Arc::new(tempfile::tempdir().unwrap());
        let dir = tmp.path().to_path_buf();
        let yaml = edit(config_yaml(&upstream.url(), &dir, ""));
        Gateway::start_with(&dir, &yaml, Some(tmp), args).await
    }

    /// Starts a gateway on the Redis store of `redis`, `extra` YAML appended to its config.
    pub async fn start_on_redis(
        upstream: &Upstream,
        redis: &redis_server::RedisServer,
        extra: &str,
    ) -> Gateway {
        let store = format!(
            "store:\n  backend: redis\n  redis_url: {}\n  key_prefix: \"kgtest:\"\n",
            redis.url()
        );
        Gateway::start_edited(upstream, &[], |yaml| {
            yaml.replace("store:\n", &store) + extra
        })
        .await
    }

    /// Starts this (stopped) gateway again on the same config and store; the secrets it knew
    /// are still checked against the new process's logs.
    pub async fn start_again(&self) -> Gateway {
        assert!(self.child.is_none(), "stop the gateway first");
        let yaml = std::fs::read_to_string(self.dir.join("keygate.yaml")).unwrap();
        let again = Gateway::start_with(&self.dir, &yaml, self._tmp.clone(), &[]).await;
        for secret in self.secrets.lock().unwrap().iter() {
            again.remember_secret(secret);
        }
        again
    }

    /// Starts a gateway with this config text, written to `dir/keygate.yaml`.
    pub async fn start_with(
        dir: &Path,
        yaml: &str,
        tmp: Option<Arc<TempDir>>,
        args: &[&str],
    ) -> Gateway {
        let config = dir.join("keygate.yaml");
        std::fs::write(&config, yaml).unwrap();
        let mut child = Command::new(binary())
            .arg("serve")
            .arg("-c")
            .arg(&config)
            .args(args)
            .current_dir(dir)
            .env("RUST_LOG", "trace,hyper=debug,h2=debug,hyper_util=debug")
            .env_remove("KEYGATE_ADMIN_TOKEN")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let logs = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel::<String>();
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let logs = Arc::clone(&logs);
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    logs.lock().unwrap().push_str(&line);
                    logs.lock().unwrap().push('\n');
                    let _ = tx.send(line);
                }
            });
        }
        drop(tx);
        let (mut addr, mut admin) = (None, None);
        while addr.is_none() || admin.is_none() {
            let line = rx
                .recv_timeout(Duration::from_secs(20))
                .unwrap_or_else(|_| panic!("gateway did not start:\n{}", logs.lock().unwrap()));
            let found = line
                .split("Some(")
                .nth(1)
                .and_then(|rest| rest.split(')').next())
                .and_then(|a| a.parse::<SocketAddr>().ok());
            if line.contains("data plane listening") {
                addr = found;
            } else if line.contains("admin API listening") {
                admin = found;
            }
        }
        Gateway {
            child: Some(child),
            addr: addr.unwrap(),
            admin: admin.unwrap(),
            dir: dir.to_path_buf(),
            _tmp: tmp,
            logs,
            secrets: Mutex::new(Vec::new()),
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Everything the process printed so far.
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    /// Remembers a secret so the logs are checked for it when the gateway goes away.
    pub fn remember_secret(&self, secret: &str) {
        self.secrets.lock().unwrap().push(secret.to_string());
    }

    /// An admin API call: status and JSON body.
    pub async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self
            .http
            .request(method, format!("http://{}{}", self.admin, path))
            .bearer_auth(ADMIN_TOKEN);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let response = req.send().await.unwrap();
        let status = response.status().as_u16();
        let body = response.json().await.unwrap_or(Value::Null);
        if let Some(secret) = body["secret"].as_str() {
            self.remember_secret(secret);
        }
        (status, body)
    }

    /// Creates a key through the admin API; returns the key object and its secret.
    pub async fn create_key(&self, body: Value) -> (Value, String) {
        let (status, key) = self
            .admin(reqwest::Method::POST, "/v1/keys", Some(body))
            .await;
        assert_eq!(status, 201, "{key}");
        let secret = key["secret"].as_str().unwrap().to_string();
        (key, secret)
    }

    /// Creates a key named `name` for owner `team-a` with optional limits.
    pub async fn create_simple_key(&self, name: &str) -> (Value, String) {
        self.create_key(json!({"name": name, "owner": "team-a"}))
            .await
    }

    pub async fn get_key(&self, id: &str) -> Value {
        let (status, key) = self
            .admin(reqwest::Method::GET, &format!("/v1/keys/{id}"), None)
            .await;
        assert_eq!(status, 200, "{key}");
        key
    }

    /// Revokes a key through the admin API.
    pub async fn revoke(&self, id: &str) -> (u16, Value) {
        self.admin(reqwest::Method::DELETE, &format!("/v1/keys/{id}"), None)
            .await
    }

    /// The kinds of the audit events `query` selects (e.g. `?key_id=...`), newest first.
    pub async fn audit_events(&self, query: &str) -> Vec<String> {
        let (status, audit) = self
            .admin(reqwest::Method::GET, &format!("/v1/audit{query}"), None)
            .await;
        assert_eq!(status, 200, "{audit}");
        audit["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["event"].as_str().unwrap().to_string())
            .collect()
    }

    /// A GET through the gateway with the key in X-API-Key.
    pub async fn call_with_key(&self, path: &str, secret: &str) -> reqwest::Response {
        self.call_with_headers(path, &[("x-api-key", secret)]).await
    }

    /// Rotates a key through the admin API, with this grace period or the default.
    pub async fn rotate(&self, id: &str, grace_period: Option<&str>) -> (u16, Value) {
        let body = grace_period.map(|g| json!({ "grace_period": g }));
        self.admin(
            reqwest::Method::POST,
            &format!("/v1/keys/{id}/rotate"),
            body,
        )
        .await
    }

    /// A GET of `path` with these headers (a name may repeat).
    pub async fn call_with_headers(
        &self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        let mut request = self.http.get(self.url(path));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send().await.unwrap()
    }

    /// Calls `path` with `secret` and checks the answer is the problem+json refusal `code` with
    /// `status`; returns its headers and body.
    pub async fn refused(
        &self,
        path: &str,
        secret: &str,
        status: u16,
        code: &str,
    ) -> (reqwest::header::HeaderMap, Value) {
        problem(self.call_with_key(path, secret).await, status, code).await
    }

    /// A call as if through a trusted proxy for client `ip` (X-Forwarded-For).
    pub async fn call_from(&self, ip: &str, path: &str, secret: &str) -> reqwest::Response {
        let headers = [("x-api-key", secret), ("x-forwarded-for", ip)];
        self.call_with_headers(path, &headers).await
    }

    /// The status of an unauthenticated GET on the admin listener (`/healthz`, `/readyz`).
    pub async fn probe(&self, path: &str) -> u16 {
        self.http
            .get(format!("http://{}{path}", self.admin))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    /// Sends SIGTERM and waits for the process to exit.
    pub fn stop(&mut self) -> ExitStatus {
        self.terminate();
        self.wait_exit(Duration::from_secs(40))
    }

    /// Sends SIGTERM without waiting.
    pub fn terminate(&self) {
        terminate(self.pid());
    }

    /// Waits for the process to exit, then checks its logs for secrets.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let status = wait_timeout(&mut child, limit);
        self.check_no_secret_in_logs();
        status
    }

    /// The `/metrics` text of the admin listener.
    pub async fn metrics(&self) -> String {
        let response = self
            .http
            .get(format!("http://{}/metrics", self.admin))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.text().await.unwrap()
    }

    fn check_no_secret_in_logs(&self) {
        std::thread::sleep(Duration::from_millis(50));
        let logs = self.logs();
        for secret in self.secrets.lock().unwrap().iter() {
            assert!(
                !logs.contains(secret.as_str()),
                "a secret appeared in the gateway's logs"
            );
            // Nor its body without the prefix.
            assert!(
                !logs.contains(&secret[3..]),
                "a secret appeared in the gateway's logs"
            );
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            if !std::thread::panicking() {
                self.check_no_secret_in_logs();
            }
        }
    }
}

pub fn terminate(pid: u32) {
    signal(pid, "TERM");
}

/// Sends a signal (`TERM`, `KILL`, `STOP`, `CONT`) to a process.
pub fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success(), "kill -{name} {pid}");
}

pub fn wait_timeout(child: &mut Child, limit: Duration) -> ExitStatus {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "process did not exit in {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The JSON body of a response, after asserting its status and problem code when given.
pub async fn problem(
    response: reqwest::Response,
    status: u16,
    code: &str,
) -> (reqwest::header::HeaderMap, Value) {
    assert_eq!(response.status().as_u16(), status);
    let headers = response.headers().clone();
    assert_eq!(headers["content-type"], "application/problem+json");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["status"], status);
    (headers, body)
}

/// The value of the sample `name{labels}` in Prometheus text format, 0 when absent.
/// `labels` must be the sample's whole label set, in any order.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut want: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    want.sort();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (series_name, label_text) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if series_name != name {
            continue;
        }
        let mut have: Vec<String> = label_text
            .split(',')
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect();
        have.sort();
        if have == want {
            return value.parse().unwrap();
        }
    }
    0.0
}

/// The `id` of a key object.
/// Fails if more than `limit` of the allowed requests were certainly decided within one
/// `window`. Each request is bracketed by (sent, received): requests i..=j were certainly
/// decided within one window when j's answer came back less than a window after i was sent.
pub fn assert_no_window_over(allowed: &[(Duration, Duration)], window: Duration, limit: usize) {
    for (i, &(sent, _)) in allowed.iter().enumerate() {
        let within = allowed[i..]
            .iter()
            .take_while(|&&(_, received)| received < sent + window)
            .count();
        assert!(
            within <= limit,
            "{within} allowed within {window:?} from {sent:?}, limit {limit}"
        );
    }
}

pub fn key_id(key: &Value) -> &str {
    key["id"].as_str().unwrap()
}

/// The whole seconds of a `Retry-After` header.
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> u64 {
    headers["retry-after"].to_str().unwrap().parse().unwrap()
}

/// Resident memory of a process in KiB (VmRSS), and its peak (VmHWM).
pub fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// A hyper client for requests whose body must stream (reqwest would need extra crates).
pub fn streaming_client()
-> hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Chunks> {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http()
}
