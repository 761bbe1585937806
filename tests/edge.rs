//! The data plane's edge: TLS termination (HTTP/1.1 and HTTP/2 by ALPN, SIGHUP reload),
//! h2c, https upstreams with private CAs, WebSocket pass-through, slow clients, and hostile
//! requests. Certificates are made here with rcgen; every client and server is real.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use support::{Gateway, Upstream, problem, signal};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::{self, Message, client::IntoClientRequest};

/// A private CA that signs certificates for `localhost`.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let pem = params.self_signed(&key).unwrap().pem();
        Ca {
            pem,
            issuer: Issuer::new(params, key),
        }
    }

    /// (certificate PEM, key PEM) for localhost; `expired` makes one that ended in 2020.
    fn leaf(&self, expired: bool) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        if expired {
            params.not_before = rcgen::date_time_ymd(2019, 1, 1);
            params.not_after = rcgen::date_time_ymd(2020, 1, 1);
        }
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn server_config(&self, expired: bool) -> Arc<rustls::ServerConfig> {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self.leaf(expired);
        write_pair(dir.path(), &cert, &key);
        keygate::tls::server_config(&tls_config(dir.path())).unwrap()
    }

    fn client(&self, http1_only: bool) -> reqwest::Client {
        let mut builder = reqwest::Client::builder()
            .no_proxy()
            .tls_certs_only([reqwest::Certificate::from_pem(self.pem.as_bytes()).unwrap()]);
        if http1_only {
            builder = builder.http1_only();
        }
        builder.build().unwrap()
    }
}

fn write_pair(dir: &Path, cert: &str, key: &str) {
    std::fs::write(dir.join("cert.pem"), cert).unwrap();
    std::fs::write(dir.join("key.pem"), key).unwrap();
}

fn tls_config(dir: &Path) -> keygate::config::TlsConfig {
    keygate::config::Config::parse(&format!(
        "tls: {{cert: {0}/cert.pem, key: {0}/key.pem}}\nroutes: [{{name: a, upstream: 'http://127.0.0.1:1'}}]\n",
        dir.display()
    ))
    .unwrap()
    .tls
    .unwrap()
}

/// A gateway terminating TLS with a certificate of `ca`, in front of `upstream`.
async fn tls_gateway(ca: &Ca, upstream: &Upstream) -> (Gateway, tempfile::TempDir) {
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = ca.leaf(false);
    write_pair(certs.path(), &cert, &key);
    let d = certs.path().display();
    let gateway = Gateway::start(
        upstream,
        &format!("tls:\n  cert: {d}/cert.pem\n  key: {d}/key.pem\n"),
    )
    .await;
    (gateway, certs)
}

fn https(gateway: &Gateway, path: &str) -> String {
    format!("https://localhost:{}{path}", gateway.addr.port())
}

#[tokio::test]
async fn tls_clients_on_http1_and_http2_authenticate_and_get_answers() {
    let upstream = Upstream::start().await;
    let ca = Ca::new("keygate test CA");
    let (gateway, _certs) = tls_gateway(&ca, &upstream).await;
    let (_, secret) = gateway.create_simple_key("tls").await;

    for (http1_only, version) in [
        (true, reqwest::Version::HTTP_11),
        (false, reqwest::Version::HTTP_2),
    ] {
        let client = ca.client(http1_only);
        let response = client
            .get(https(&gateway, "/v1/tls"))
            .header("x-api-key", &secret)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.version(), version, "ALPN chose the protocol");
        let seen: serde_json::Value = response.json().await.unwrap();
        assert_eq!(seen["headers"]["x-forwarded-proto"][0], "https");
        assert!(seen["headers"].get("x-api-key").is_none());

        let refused = client.get(https(&gateway, "/v1/tls")).send().await.unwrap();
        assert_eq!(refused.status(), 401);
        assert_eq!(refused.version(), version);
        let body: serde_json::Value = refused.json().await.unwrap();
        assert_eq!(body["code"], "missing_api_key");
    }
    assert_eq!(upstream.count("/v1/tls"), 2);
}

#[tokio::test]
async fn plain_listener_takes_h2c_with_prior_knowledge() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream, "").await;
    let (_, secret) = gateway.create_simple_key("h2c").await;
    let client = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let response = client
        .get(gateway.url("/v1/h2c"))
        .header("x-api-key", &secret)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
}

/// Sends SIGHUP and waits (5 s at most) for the gateway to log `line`.
async fn hangup_until_logged(gateway: &Gateway, line: &str) {
    let before = gateway.logs().matches(line).count();
    signal(gateway.pid(), "HUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    while gateway.logs().matches(line).count() == before {
        assert!(
            Instant::now() < deadline,
            "`{line}` not logged:\n{}",
            gateway.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn sighup_reloads_the_certificate_and_open_connections_stay() {
    let upstream = Upstream::start().await;
    let (old_ca, new_ca) = (Ca::new("old CA"), Ca::new("new CA"));
    let (gateway, certs) = tls_gateway(&old_ca, &upstream).await;
    let (_, secret) = gateway.create_simple_key("reload").await;
    let call = |client: reqwest::Client| {
        let (url, secret) = (https(&gateway, "/v1/reload"), secret.clone());
        async move { client.get(url).header("x-api-key", secret).send().await }
    };
    // One keep-alive HTTP/2 connection, opened on the old certificate.
    let open = old_ca.client(false);
    assert_eq!(call(open.clone()).await.unwrap().status(), 200);

    let (cert, key) = new_ca.leaf(false);
    write_pair(certs.path(), &cert, &key);
    hangup_until_logged(&gateway, "TLS certificate and key reloaded").await;
    // New connections get the new certificate; the open one goes on.
    assert_eq!(call(new_ca.client(true)).await.unwrap().status(), 200);
    assert!(
        call(old_ca.client(true)).await.is_err(),
        "old certificate still served"
    );
    assert_eq!(call(open).await.unwrap().status(), 200);

    // A broken file is refused and the certificate in use stays.
    std::fs::write(certs.path().join("cert.pem"), "not a certificate").unwrap();
    hangup_until_logged(&gateway, "keeping the ones in use").await;
    assert_eq!(call(new_ca.client(true)).await.unwrap().status(), 200);
}

#[tokio::test]
async fn https_upstreams_are_verified_and_a_bad_certificate_is_a_clear_502() {
    let ca = Ca::new("private upstream CA");
    let (good, expired) = (
        Upstream::start_with_tls(Some(ca.server_config(false))).await,
        Upstream::start_with_tls(Some(ca.server_config(true))).await,
    );
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let route = |name: &str, upstream: &Upstream, ca: bool| {
        let ca = if ca {
            format!("\n    ca_file: {}", ca_file.display())
        } else {
            String::new()
        };
        format!(
            "  - name: {name}\n    path_prefix: /{name}/\n    upstream: https://localhost:{}{ca}\n",
            upstream.addr.port()
        )
    };
    let routes = format!(
        "routes:\n{}{}{}",
        route("trusted", &good, true),
        route("unknown", &good, false),
        route("expired", &expired, true)
    );
    let gateway = Gateway::start(&good, &routes).await;
    let (_, secret) = gateway.create_simple_key("https").await;

    let ok = gateway.call_with_key("/trusted/x", &secret).await;
    assert_eq!(ok.status(), 200);
    let seen: serde_json::Value = ok.json().await.unwrap();
    assert_eq!(seen["path"], "/trusted/x");

    for (path, reason) in [("/unknown/x", "UnknownIssuer"), ("/expired/x", "Expired")] {
        let response = gateway.call_with_key(path, &secret).await;
        let (_, body) = problem(response, 502, "upstream_unavailable").await;
        let detail = body["detail"].as_str().unwrap();
        assert!(
            detail.contains("TLS certificate was refused") && detail.contains(reason),
            "{path}: {detail}\n{}",
            gateway
                .logs()
                .lines()
                .filter(|l| l.contains("cause"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    assert_eq!(good.count("/unknown/x"), 0);
    assert_eq!(expired.count("/expired/x"), 0);
}

/// A WebSocket echo server: a real handshake and real frames (tungstenite).
async fn websocket_echo() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(message)) = ws.next().await {
                    if message.is_text() || message.is_binary() {
                        let _ = ws.send(message).await;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn websocket_echo_passes_with_a_key_and_is_refused_without() {
    let echo = websocket_echo().await;
    let upstream = Upstream::start().await;
    let routes = format!("routes:\n  - name: ws\n    upstream: http://{echo}\n");
    let gateway = Gateway::start(&upstream, &routes).await;
    let (_, secret) = gateway.create_simple_key("websocket").await;
    let url = format!("ws://{}/socket", gateway.addr);

    let mut request = url.as_str().into_client_request().unwrap();
    request
        .headers_mut()
        .insert("x-api-key", secret.parse().unwrap());
    let stream = TcpStream::connect(gateway.addr).await.unwrap();
    let (mut ws, response) = tokio_tungstenite::client_async(request, stream)
        .await
        .unwrap();
    assert_eq!(response.status(), 101);
    for text in ["hello", "through keygate", "third"] {
        ws.send(Message::text(text)).await.unwrap();
        let back = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(back, Message::text(text));
    }
    ws.close(None).await.unwrap();

    let stream = TcpStream::connect(gateway.addr).await.unwrap();
    match tokio_tungstenite::client_async(url.as_str(), stream).await {
        Err(tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 401);
            let body = String::from_utf8(response.body().clone().unwrap_or_default()).unwrap();
            assert!(body.contains("missing_api_key"), "{body}");
        }
        other => panic!("handshake without a key: {other:?}"),
    }
}

/// Sends raw bytes on a fresh connection; the status line's code (0 if the connection was
/// closed without an answer) and all that came back until 300 ms of silence after the head.
async fn raw(gateway: &Gateway, request: &[u8]) -> (u16, String) {
    let mut stream = TcpStream::connect(gateway.addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    answer.extend_from_slice(&buf[..n]);
                    if answer.windows(4).any(|w| w == b"\r\n\r\n") {
                        // The head is in; take what follows until the line goes quiet.
                        while let Ok(Ok(n)) =
                            tokio::time::timeout(Duration::from_millis(300), stream.read(&mut buf))
                                .await
                        {
                            if n == 0 {
                                break;
                            }
                            answer.extend_from_slice(&buf[..n]);
                        }
                        break;
                    }
                }
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

#[tokio::test]
async fn slow_header_senders_are_cut_and_others_are_served_meanwhile() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream, "limits:\n  header_read_timeout: 2s\n").await;
    let (_, secret) = gateway.create_simple_key("slowloris").await;
    // Ten connections sending their header one byte per second.
    let slow: Vec<_> = (0..10)
        .map(|_| {
            let addr = gateway.addr;
            tokio::spawn(async move {
                let mut stream = TcpStream::connect(addr).await.unwrap();
                let started = Instant::now();
                for byte in b"GET /v1/slow HTTP/1.1\r\nHost: localhost\r\nX-API-Key: kg_".iter() {
                    if stream.write_all(&[*byte]).await.is_err() {
                        return started.elapsed();
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                // If it was not cut yet, it is cut when the next read sees the close.
                let mut buf = [0u8; 64];
                let _ = stream.read(&mut buf).await;
                started.elapsed()
            })
        })
        .collect();
    // Meanwhile, normal clients are served.
    for _ in 0..20 {
        let response = gateway.call_with_key("/v1/normal", &secret).await;
        assert_eq!(response.status(), 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for task in slow {
        let lasted = task.await.unwrap();
        assert!(
            lasted < Duration::from_secs(8),
            "a slow connection lasted {lasted:?} with header_read_timeout 2s"
        );
    }
    assert_eq!(upstream.count("/v1/slow"), 0);
    assert_eq!(upstream.count("/v1/normal"), 20);
}

/// Reads one whole response (head and `Content-Length` body) from a keep-alive connection.
async fn read_response(stream: &mut TcpStream) -> String {
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(
            n > 0,
            "closed mid-response: {}",
            String::from_utf8_lossy(&answer)
        );
        answer.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&answer).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length: usize = text[..end]
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if answer.len() >= end + 4 + length {
                return text;
            }
        }
    }
}

#[tokio::test]
async fn a_slow_answer_is_not_cut_by_the_header_timeout_but_an_idle_connection_is() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream, "limits:\n  header_read_timeout: 1s\n").await;
    let (_, secret) = gateway.create_simple_key("patient").await;
    let mut stream = TcpStream::connect(gateway.addr).await.unwrap();
    // One request on the connection, its whole answer read back.
    async fn exchange(stream: &mut TcpStream, secret: &str, path: &str) -> String {
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {secret}\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        read_response(stream).await
    }
    // The upstream takes longer than the header timeout: the request is in flight, not a
    // connection waiting for a head.
    let answer = exchange(&mut stream, &secret, "/v1/slow?ms=1500").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // The same connection serves the next request sent within the timeout.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let answer = exchange(&mut stream, &secret, "/v1/next").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // Then, idle for longer than the timeout, it is closed.
    let idle = Instant::now();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "an idle connection stayed open: {read:?}"
    );
    let waited = idle.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "closed after {waited:?}"
    );
    assert_eq!(upstream.count("/v1/slow"), 1);
    assert_eq!(upstream.count("/v1/next"), 1);
}

#[tokio::test]
async fn hostile_requests_are_refused_and_never_forwarded() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream, "").await;
    let (_, secret) = gateway.create_simple_key("hostile").await;
    let other = gateway.create_simple_key("hostile-2").await.1;
    let long_key = format!("kg_{}", "a".repeat(20_000));
    let many_keys: String = (0..200)
        .map(|_| format!("X-API-Key: {secret}\r\n"))
        .collect();
    let head = |extra: &str| {
        format!("GET /v1/hostile HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {secret}\r\n{extra}\r\n")
    };
    let post = |extra: &str| {
        format!(
            "POST /v1/hostile HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {secret}\r\n{extra}\r\n"
        )
    };
    // (what, request, expected status) — the rows of the README's table.
    let rows: Vec<(&str, String, u16)> = vec![
        (
            "two different Content-Length",
            post("Content-Length: 5\r\nContent-Length: 6\r\n") + "hello!",
            400,
        ),
        ("obs-fold (header continued on the next line)", head("X-Folded: a\r\n  b\r\n"), 400),
        ("NUL in a header value", head("X-Bad: a\0b\r\n"), 400),
        ("bare CR in a header value", head("X-Bad: a\rb\r\n"), 400),
        (
            "absolute-form target naming another host",
            format!("GET http://internal.example/v1/hostile HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {secret}\r\n\r\n"),
            400,
        ),
        (
            "very long key (20,000 characters)",
            format!("GET /v1/hostile HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {long_key}\r\n\r\n"),
            431,
        ),
        (
            "non-ASCII key",
            "GET /v1/hostile HTTP/1.1\r\nHost: localhost\r\nX-API-Key: kg_\u{e9}\u{e9}\u{e9}\r\n\r\n".to_string(),
            401,
        ),
        (
            "two different X-API-Key headers",
            head(&format!("X-API-Key: {other}\r\n")),
            401,
        ),
        (
            "200 copies of the X-API-Key header",
            format!("GET /v1/hostile HTTP/1.1\r\nHost: localhost\r\n{many_keys}\r\n"),
            431,
        ),
    ];
    // Content-Length with Transfer-Encoding: chunked is read as chunked and forwarded with
    // Transfer-Encoding only (RFC 9112 §6.1), so no server behind can read it the other way:
    // the request smuggled in its body never reaches the upstream as a request.
    let smuggle = post("Content-Length: 60\r\nTransfer-Encoding: chunked\r\n")
        + "0\r\n\r\nGET /v1/smuggled HTTP/1.1\r\nHost: localhost\r\n\r\n";
    let (status, answer) = raw(&gateway, smuggle.as_bytes()).await;
    assert!(status == 200 || status == 400, "{answer}");
    assert_eq!(
        upstream.count("/v1/smuggled"),
        0,
        "smuggled request reached the upstream"
    );
    if status == 200 {
        let body = answer.split("\r\n\r\n").nth(1).unwrap_or("");
        assert!(
            body.contains("\"method\":\"POST\""),
            "no echo read: {answer}"
        );
        assert!(
            !body.contains("content-length"),
            "forwarded with both framings: {body}"
        );
    }

    for (what, request, expected) in &rows {
        let (status, answer) = raw(&gateway, request.as_bytes()).await;
        assert_eq!(status, *expected, "{what}:\n{answer}");
    }
    assert_eq!(
        upstream.count("/v1/hostile"),
        1,
        "a hostile request was forwarded (the one counted is the chunked one above)"
    );
    // The same connection-level checks leave normal requests alone.
    let (status, _) = raw(&gateway, head("").as_bytes()).await;
    assert_eq!(status, 200);
}

/// Requests sent back to back on one connection are answered in order, whichever of the
/// gateway's two HTTP/1 paths reads them (a request with a body moves the connection from its
/// own to hyper's), each with a `Date`; `Connection: close` ends the connection after its
/// answer.
#[tokio::test]
async fn pipelined_requests_are_answered_in_order_and_close_ends_the_connection() {
    let upstream = Upstream::start().await;
    let gateway = Gateway::start(&upstream, "").await;
    let (_, secret) = gateway.create_simple_key("pipeline").await;
    let get = |path: &str, extra: &str| {
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {secret}\r\n{extra}\r\n")
    };
    let requests = get("/v1/first", "")
        + &get("/v1/second", "")
        + &format!(
            "POST /v1/third HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {secret}\r\nContent-Length: 5\r\n\r\nhello"
        )
        + &get("/v1/fourth", "Connection: close\r\n");
    let mut stream = TcpStream::connect(gateway.addr).await.unwrap();
    stream.write_all(requests.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
        .await
        .expect("the connection stayed open after `Connection: close`")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    let answers: Vec<&str> = answer.split("HTTP/1.1 ").skip(1).collect();
    let paths = ["/v1/first", "/v1/second", "/v1/third", "/v1/fourth"];
    assert_eq!(answers.len(), paths.len(), "{answer}");
    for (one, path) in answers.iter().zip(paths) {
        assert!(one.starts_with("200 OK\r\n"), "{path}: {one}");
        assert!(
            one.contains(&format!("\"path\":\"{path}\"")),
            "{path} not answered in its place: {answer}"
        );
        assert!(one.contains("\r\ndate: "), "{path} has no Date: {one}");
        assert_eq!(upstream.count(path), 1, "{path}");
    }
    assert!(answers[2].contains("\"body_bytes\":5"), "{}", answers[2]);
    assert!(
        answers[3].contains("\r\nconnection: close\r\n"),
        "the last answer does not say it closes: {}",
        answers[3]
    );
}

#[test]
fn check_config_reads_the_tls_files_and_names_each_bad_one() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("key.pem"), "not a key").unwrap();
    std::fs::write(d.join("ca.pem"), "").unwrap();
    let config = d.join("keygate.yaml");
    std::fs::write(
        &config,
        format!(
            "tls: {{cert: {0}/missing.pem, key: {0}/key.pem}}\n\
             routes: [{{name: a, upstream: 'https://localhost:1', ca_file: {0}/ca.pem}}]\n",
            d.display()
        ),
    )
    .unwrap();
    let output = std::process::Command::new(support::binary())
        .args(["check-config", "-c"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(
        text.contains("tls.cert") && text.contains("missing.pem"),
        "{text}"
    );
    assert!(
        text.contains("routes[0].ca_file") && text.contains("no PEM certificate"),
        "{text}"
    );
}
