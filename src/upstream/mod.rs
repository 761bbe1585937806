//! Routing, the header rules of forwarding (SPEC §3) and the upstream connections.

mod deadline;
pub(crate) mod lean;
mod pool;
#[cfg(target_os = "linux")]
mod uring;

pub(crate) use deadline::Deadline;
pub(crate) use lean::{LeanBody, LeanPool};
pub(crate) use pool::{Pool, PooledBody};

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::Uri;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::uri::PathAndQuery;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;

use crate::config::{AuthMode, RouteConfig};

/// How long connecting to an upstream (TCP, then TLS for `https`) may take before 502.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What dials a route's upstream: plain TCP, or TLS verified against the system's roots plus
/// the route's `ca_file`.
pub(crate) fn connector(tls: rustls::ClientConfig) -> HttpsConnector<HttpConnector> {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(CONNECT_TIMEOUT));
    http.enforce_http(false);
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http)
}

/// Hop-by-hop headers (RFC 9110 §7.6.1, plus the non-standard ones proxies still meet).
/// `Upgrade` is among them; a WebSocket handshake gets its two headers back afterwards.
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    HeaderName::from_static("proxy-connection"),
];

/// Whether a name has the length of one in [`HOP_BY_HOP`]: most names have not, and a name's
/// length is known without reading it, where comparing it with the eight takes eight tests.
fn may_be_hop_by_hop(name: &HeaderName) -> bool {
    matches!(name.as_str().len(), 2 | 7 | 10 | 16 | 17 | 19)
}

/// The hop-by-hop headers of one message: which of [`HOP_BY_HOP`] it has, and the names its
/// `Connection` lists besides (nearly always none: `keep-alive` and `close` name no header).
#[derive(Debug, Default)]
pub(crate) struct HopByHop {
    /// Bit `i` set: the message has `HOP_BY_HOP[i]`.
    present: u8,
    listed: Vec<HeaderName>,
}

impl HopByHop {
    pub(crate) fn of(headers: &HeaderMap) -> HopByHop {
        // One pass over the few headers a message has: most requests carry none, most
        // responses only `Connection: keep-alive`.
        let mut present = 0u8;
        for name in headers.keys() {
            if may_be_hop_by_hop(name)
                && let Some(i) = HOP_BY_HOP.iter().position(|h| h == name)
            {
                present |= 1 << i;
            }
        }
        // `HOP_BY_HOP[0]` is `Connection`.
        let mut listed = Vec::new();
        if present & 1 != 0 {
            for value in headers
                .get_all(header::CONNECTION)
                .iter()
                .map(|v| v.as_bytes())
            {
                // `keep-alive` and `close`, nearly every value there is, name no header.
                if !value.eq_ignore_ascii_case(b"keep-alive")
                    && !value.eq_ignore_ascii_case(b"close")
                {
                    listed.extend(list_items(value).filter_map(listed_name));
                }
            }
        }
        HopByHop { present, listed }
    }

    /// Whether `name`, a header of the message this was made of, is hop-by-hop.
    pub(crate) fn contains(&self, name: &HeaderName) -> bool {
        (self.present != 0 && is_hop_by_hop(name)) || self.listed.contains(name)
    }

    fn remove_from(self, headers: &mut HeaderMap) {
        for name in self.listed {
            headers.remove(name);
        }
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            if self.present & (1 << i) != 0 {
                headers.remove(name);
            }
        }
    }
}

/// Whether `name` is one of [`HOP_BY_HOP`].
pub(crate) fn is_hop_by_hop(name: &HeaderName) -> bool {
    may_be_hop_by_hop(name) && HOP_BY_HOP.contains(name)
}

/// The items of a comma-separated header value (`Connection`, `Upgrade`), trimmed.
pub(crate) fn list_items(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// The header a `Connection` item names, unless `close` or one of [`HOP_BY_HOP`].
pub(crate) fn listed_name(token: &[u8]) -> Option<HeaderName> {
    let named = |h: &HeaderName| token.eq_ignore_ascii_case(h.as_str().as_bytes());
    if token.eq_ignore_ascii_case(b"close") || HOP_BY_HOP.iter().any(named) {
        return None;
    }
    HeaderName::from_bytes(token).ok()
}

/// Removes hop-by-hop headers, including those the `Connection` header names.
pub(crate) fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let hop_by_hop = HopByHop::of(headers);
    if hop_by_hop.present != 0 {
        hop_by_hop.remove_from(headers);
    }
}

/// How a request's headers become the upstream's: some of the client's dropped, some set by
/// the gateway in place of any the client sent under the same name (SPEC §3 "Allowed
/// requests" says which). The lean exchange writes the upstream's head by it, leaving the
/// request's map as it came: no removal and no insert, each a hash of the name. hyper's
/// client gets the map rewritten by [`Rewrite::apply`]. Both follow [`Rewrite::keeps`].
#[derive(Debug)]
pub(crate) struct Rewrite<'a> {
    pub(crate) hop_by_hop: HopByHop,
    /// Dropped besides: the headers that carried the credential.
    pub(crate) dropped: [Option<&'static HeaderName>; 2],
    /// Names with this start are dropped: only the gateway sets them.
    pub(crate) dropped_prefix: &'static str,
    /// Set, in this order, in place of any the client sent.
    pub(crate) set: [Option<(&'static HeaderName, Cow<'a, HeaderValue>)>; 6],
}

impl Rewrite<'_> {
    /// Whether the upstream gets the client's header `name`.
    pub(crate) fn keeps(&self, name: &HeaderName) -> bool {
        !self.hop_by_hop.contains(name)
            && !self.dropped.iter().flatten().any(|d| *d == name)
            && !name.as_str().starts_with(self.dropped_prefix)
            && !self.set.iter().flatten().any(|(n, _)| *n == name)
    }

    /// The headers the gateway sets.
    pub(crate) fn set(&self) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> {
        self.set.iter().flatten().map(|(n, v)| (*n, &**v))
    }

    /// Rewrites the request's own map, for hyper's client.
    pub(crate) fn apply(&self, headers: &mut HeaderMap) {
        let client = std::mem::take(headers);
        headers.reserve(client.keys_len() + self.set.len());
        let mut name = None;
        for (first, value) in client {
            // Each name comes once, with its first value; the values after follow it.
            if first.is_some() {
                name = first;
            }
            if let Some(name) = &name
                && self.keeps(name)
            {
                headers.append(name.clone(), value);
            }
        }
        for (name, value) in self.set() {
            headers.append(name.clone(), value.clone());
        }
    }
}

/// A WebSocket handshake (RFC 6455 §4.1): GET over HTTP/1.1 with `Upgrade: websocket` and
/// `Connection: upgrade`. Other upgrades (h2c, TLS) are hop-by-hop and dropped as such.
pub(crate) fn is_websocket_upgrade<B>(req: &hyper::Request<B>) -> bool {
    req.method() == hyper::Method::GET
        && req.version() == hyper::Version::HTTP_11
        && lists(req.headers(), &header::UPGRADE, "websocket")
        && lists(req.headers(), &header::CONNECTION, "upgrade")
}

/// Whether a comma-separated header (`Connection`, `Upgrade`) lists `token`, in any case.
fn lists(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    let token = token.as_bytes();
    headers
        .get_all(name)
        .iter()
        .any(|v| list_items(v.as_bytes()).any(|t| t.eq_ignore_ascii_case(token)))
}

/// Puts back the two headers of a WebSocket handshake after the hop-by-hop ones were removed.
pub(crate) fn keep_websocket_upgrade(headers: &mut HeaderMap) {
    headers.insert(
        header::CONNECTION,
        header::HeaderValue::from_static("upgrade"),
    );
    headers.insert(
        header::UPGRADE,
        header::HeaderValue::from_static("websocket"),
    );
}

/// Joins an upgraded client connection to the upgraded upstream one until either side closes.
pub(crate) async fn tunnel(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    match tokio::try_join!(client, upstream) {
        Ok((client, upstream)) => {
            let mut client = hyper_util::rt::TokioIo::new(client);
            let mut upstream = hyper_util::rt::TokioIo::new(upstream);
            if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                tracing::debug!(error = %e, "websocket tunnel ended with an error");
            }
        }
        Err(e) => tracing::debug!(error = %e, "websocket upgrade did not complete"),
    }
}

/// One configured route, ready to match, to build upstream targets, and to send.
#[derive(Debug)]
pub(crate) struct Route {
    pub(crate) index: usize,
    pub(crate) name: String,
    host: Option<String>,
    prefix: String,
    /// The upstream URL's own path, without a trailing `/`.
    base_path: String,
    /// The upstream's authority, as the `Host` of forwarded requests.
    pub(crate) host_header: HeaderValue,
    pub(crate) auth: AuthMode,
    strip_prefix: bool,
    pub(crate) timeout: Duration,
    pub(crate) pool: Arc<Pool>,
    /// For requests without a body to an `http://` upstream; see [`lean`].
    pub(crate) lean: Option<Arc<LeanPool>>,
}

impl Route {
    fn matches(&self, host: Option<&str>, path: &str) -> bool {
        if let Some(want) = &self.host {
            match host {
                Some(host) if host.eq_ignore_ascii_case(want) => {}
                _ => return false,
            }
        }
        path.starts_with(&self.prefix)
    }

    /// The origin-form target sent upstream: base path + (stripped) path + query. The
    /// client's target is passed on as it is when the route changes nothing.
    pub(crate) fn upstream_uri(&self, uri: &Uri) -> Result<Uri, hyper::http::Error> {
        if self.base_path.is_empty()
            && !self.strip_prefix
            && let Some(target) = uri.path_and_query()
            && target.as_str().starts_with('/')
        {
            return Ok(Uri::from(target.clone()));
        }
        let path = uri.path();
        let rest = if self.strip_prefix {
            path.get(self.prefix.len()..).unwrap_or("")
        } else {
            path
        };
        let query = uri.query();
        let mut target = String::with_capacity(
            self.base_path.len() + rest.len() + 2 + query.map_or(0, str::len),
        );
        target.push_str(&self.base_path);
        if !rest.starts_with('/') {
            target.push('/');
        }
        target.push_str(rest);
        if let Some(query) = query {
            target.push('?');
            target.push_str(query);
        }
        Ok(Uri::from(PathAndQuery::from_maybe_shared(Bytes::from(
            target,
        ))?))
    }
}

/// The route table; first match wins.
#[derive(Debug)]
pub(crate) struct Router {
    routes: Vec<Route>,
}

impl Router {
    /// Builds the table; fails for what this build cannot forward to.
    pub(crate) fn new(configs: &[RouteConfig]) -> Result<Router, String> {
        let mut routes = Vec::with_capacity(configs.len());
        for (index, config) in configs.iter().enumerate() {
            let upstream = config
                .upstream
                .as_ref()
                .ok_or_else(|| format!("routes[{index}].upstream: required"))?;
            let tls = crate::tls::client_config(config.ca_file.as_deref())
                .map_err(|e| format!("routes[{index}].{e}"))?;
            let authority = upstream
                .authority()
                .ok_or_else(|| format!("routes[{index}].upstream: no host"))?;
            let target = Uri::builder()
                .scheme(upstream.scheme_str().unwrap_or("http"))
                .authority(authority.clone())
                .path_and_query("/")
                .build()
                .map_err(|e| format!("routes[{index}].upstream: {e}"))?;
            routes.push(Route {
                index,
                name: config.name.clone(),
                host: config
                    .host
                    .as_ref()
                    .map(|h| strip_port(h).to_ascii_lowercase()),
                prefix: config.path_prefix.clone(),
                base_path: upstream.path().trim_end_matches('/').to_string(),
                host_header: HeaderValue::from_str(authority.as_str())
                    .map_err(|e| format!("routes[{index}].upstream: {e}"))?,
                auth: config.auth,
                strip_prefix: config.strip_prefix,
                timeout: config.timeout,
                lean: LeanPool::new(&target).map(Arc::new),
                pool: Arc::new(Pool::new(connector(tls), target)),
            });
        }
        Ok(Router { routes })
    }

    /// The first route taking this host (port ignored) and path.
    pub(crate) fn find(&self, host: Option<&str>, path: &str) -> Option<&Route> {
        let host = host.map(strip_port);
        self.routes.iter().find(|r| r.matches(host, path))
    }

    /// Closes upstream connections idle for too long.
    pub(crate) fn sweep(&self) {
        for route in &self.routes {
            route.pool.sweep();
            if let Some(lean) = &route.lean {
                lean.sweep();
            }
        }
    }

    pub(crate) fn names(&self) -> Vec<String> {
        self.routes.iter().map(|r| r.name.clone()).collect()
    }
}

/// `example.com:8080` → `example.com`; `[::1]:80` → `[::1]`.
fn strip_port(host: &str) -> &str {
    match host.rfind(':') {
        Some(at)
            if !host[at + 1..].is_empty()
                && host[at + 1..].bytes().all(|b| b.is_ascii_digit())
                && (!host.starts_with('[') || host[..at].ends_with(']')) =>
        {
            &host[..at]
        }
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(prefix: &str, upstream: &str, strip: bool, host: Option<&str>) -> RouteConfig {
        RouteConfig {
            name: "r".into(),
            path_prefix: prefix.into(),
            host: host.map(str::to_string),
            upstream: Some(upstream.parse().unwrap()),
            strip_prefix: strip,
            ..RouteConfig::default()
        }
    }

    #[test]
    fn first_match_wins_and_host_ignores_port_and_case() {
        let router = Router::new(&[
            route("/api", "http://a:1", false, Some("API.example.com")),
            route("/", "http://b:1", false, None),
        ])
        .unwrap();
        assert_eq!(
            router
                .find(Some("api.EXAMPLE.com:8080"), "/api/x")
                .unwrap()
                .index,
            0
        );
        assert_eq!(router.find(Some("other"), "/api/x").unwrap().index, 1);
        assert_eq!(router.find(None, "/api").unwrap().index, 1);
    }

    #[test]
    fn upstream_uri_keeps_query_and_strips_prefix() {
        let r = Router::new(&[route("/api", "http://u:3000/base/", true, None)]).unwrap();
        let r = r.find(None, "/api/users").unwrap();
        let uri = r
            .upstream_uri(&"/api/users?q=1&x=%20".parse().unwrap())
            .unwrap();
        assert_eq!(uri.to_string(), "/base/users?q=1&x=%20");
        let uri = r.upstream_uri(&"/api".parse().unwrap()).unwrap();
        assert_eq!(uri.to_string(), "/base/");
        let r = Router::new(&[route("/api", "http://u:3000", false, None)]).unwrap();
        let uri = r.routes[0]
            .upstream_uri(&"/api/users".parse().unwrap())
            .unwrap();
        assert_eq!(uri.to_string(), "/api/users");
        let absolute = "http://gw.example/api/users?q=1".parse().unwrap();
        let uri = r.routes[0].upstream_uri(&absolute).unwrap();
        assert_eq!(uri.to_string(), "/api/users?q=1");
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_removed() {
        let mut h = HeaderMap::new();
        h.insert("connection", "close, x-private".parse().unwrap());
        h.insert("x-private", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        h.insert("x-end-to-end", "1".parse().unwrap());
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-end-to-end"));
    }

    #[test]
    fn a_websocket_handshake_is_told_by_its_listed_tokens_in_any_case() {
        let handshake = |method: &str, connection: &str, upgrade: &str| {
            hyper::Request::builder()
                .method(method)
                .header(header::CONNECTION, connection)
                .header(header::UPGRADE, upgrade)
                .body(())
                .unwrap()
        };
        assert!(is_websocket_upgrade(&handshake(
            "GET",
            "Upgrade",
            "websocket"
        )));
        assert!(is_websocket_upgrade(&handshake(
            "GET",
            "keep-alive,  UPGRADE ",
            "WebSocket"
        )));
        assert!(!is_websocket_upgrade(&handshake(
            "GET",
            "keep-alive",
            "websocket"
        )));
        assert!(!is_websocket_upgrade(&handshake("GET", "upgrade", "h2c")));
        assert!(!is_websocket_upgrade(&handshake(
            "POST",
            "upgrade",
            "websocket"
        )));
    }

    #[test]
    fn every_hop_by_hop_name_passes_the_length_filter() {
        for name in &HOP_BY_HOP {
            assert!(may_be_hop_by_hop(name), "{name}");
        }
        assert!(!may_be_hop_by_hop(&header::HOST));
        assert!(!may_be_hop_by_hop(&header::CONTENT_LENGTH));
    }

    #[test]
    fn connection_keep_alive_or_close_removes_only_the_hop_by_hop_headers() {
        for value in ["keep-alive", "Keep-Alive", "close"] {
            let mut h = HeaderMap::new();
            h.insert("connection", value.parse().unwrap());
            h.insert("keep-alive", "timeout=5".parse().unwrap());
            h.insert("user-agent", "wrk".parse().unwrap());
            remove_hop_by_hop(&mut h);
            assert_eq!(h.len(), 1, "{value}");
            assert!(h.contains_key("user-agent"));
        }
    }

    #[test]
    fn ports_are_stripped_from_hosts() {
        assert_eq!(strip_port("a.com:80"), "a.com");
        assert_eq!(strip_port("a.com"), "a.com");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
    }
}
