//! The data plane: one request from arrival to answer, as a straight pipeline
//! route → credential → key (cache, then store) → status → usage → rate limit → forward.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{Either, Empty, Full};
use hyper::body::{Body as _, Incoming};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, Version};
use ipnet::IpNet;
use jiff::Timestamp;

use crate::cache::{CachedKey, KeyCache, Lookup};
use crate::config::{AuthMode, Config, OnStoreError};
use crate::credential::{self, CarriedBy, CredentialError};
use crate::error_chain;
use crate::key::{KeyRecord, Status};
use crate::key_state::KeyStates;
use crate::logging::{self, AccessLine};
use crate::metrics::{Metrics, StoreOp};
use crate::problem::{GatewayError, Outcome};
use crate::ratelimit::{FailedAuthLimiter, GlobalLimiter, Limits, RateHeaders, Verdict};
use crate::store::{Store, StoreError, StoreHealth};
use crate::upstream::{self, Deadline, HopByHop, LeanBody, PooledBody, Rewrite, Route, Router};
use crate::usage::UsageRecorder;

/// What the data plane answers with: the upstream's body (through hyper's client or the lean
/// exchange), or one of ours.
pub(crate) type Body = Either<Either<PooledBody, LeanBody>, Full<Bytes>>;

/// A request's body: hyper's, or none for a request read by the server's own HTTP/1 path
/// (`server::http1`), which takes only requests without one.
pub(crate) type RequestBody = Either<Incoming, Empty<Bytes>>;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_KEYGATE_KEY_ID: HeaderName = HeaderName::from_static("x-keygate-key-id");
static X_KEYGATE_OWNER: HeaderName = HeaderName::from_static("x-keygate-owner");
static HOST: HeaderName = header::HOST;
static AUTHORIZATION: HeaderName = header::AUTHORIZATION;
static X_API_KEY: HeaderName = credential::X_API_KEY;
static HTTP: HeaderValue = HeaderValue::from_static("http");
static HTTPS: HeaderValue = HeaderValue::from_static("https");

/// Everything one gateway instance shares across requests. Built once at start-up.
#[derive(Debug)]
pub(crate) struct Gateway {
    pub(crate) config: Arc<Config>,
    router: Router,
    pub(crate) store: Arc<dyn Store>,
    /// Whether the store answered lately; requests do not wait on a store known to be down.
    pub(crate) health: StoreHealth,
    pub(crate) cache: KeyCache,
    /// Each key's per-instance windows (`scope: local`, or the fallback of `scope: global`)
    /// and pending use, which its cache entries point to.
    pub(crate) states: KeyStates,
    /// `scope: global` on the Redis store.
    pub(crate) global: Option<GlobalLimiter>,
    pub(crate) failed_auth: FailedAuthLimiter,
    pub(crate) usage: Arc<UsageRecorder>,
    pub(crate) metrics: Metrics,
    pub(crate) defaults: Limits,
    /// When the cache and the key states may be swept again.
    key_sweep: std::sync::Mutex<Pace>,
}

/// How many times as long as a pass over the per-key maps took the next one waits.
///
/// Those passes read each key's entry and state, a random memory read per key in use, on the
/// core the event loop shares: a million keys took 90-126 ms a pass, and a pass every 10 s
/// was 1% of that core, one of the costs a request pays at a million keys and not at a
/// thousand (`benches/load.rs --big 1000000`). Waiting 500 times a pass keeps them under
/// 0.2% of a core: a million keys are swept about once a minute, a thousand at every tick.
/// Sweeping later costs nothing but memory: an expired entry is never served, it only waits
/// longer to be dropped.
const KEY_SWEEP_PACE: u32 = 500;

/// Entries that make a pass due whatever its pace: twice as many as the last pass kept, and
/// at least this many. A flood of unknown keys (each remembered as unknown for
/// `negative_ttl`) fills the cache up to its cap on unknown keys within seconds; paced alone,
/// a pass over the full cache would leave the next a minute away, and each unknown key would
/// cost a store lookup meanwhile. Once the maps have doubled, the pass comes at the next tick,
/// as before the pace: a pass goes over at most twice the entries added since the last.
const KEY_SWEEP_GROWTH_FLOOR: usize = 100_000;

/// When the next pass of a periodic job over the per-key maps is due: [`KEY_SWEEP_PACE`]
/// times its last pass after that pass ended, or once the maps have doubled, so the job takes
/// a bounded share of a core whatever it has to go over, and the maps a bounded size.
#[derive(Debug, Default)]
struct Pace {
    next: Option<Instant>,
    /// Entries the last pass left.
    kept: usize,
}

impl Pace {
    fn is_due(&self, now: Instant, entries: usize) -> bool {
        self.next.is_none_or(|next| now >= next)
            || entries >= (2 * self.kept).max(KEY_SWEEP_GROWTH_FLOOR)
    }

    /// Notes a pass that ran from `started` to `ended` and left `kept` entries.
    fn ran(&mut self, started: Instant, ended: Instant, kept: usize) -> std::time::Duration {
        let wait = ended.saturating_duration_since(started) * KEY_SWEEP_PACE;
        self.next = Some(ended + wait);
        self.kept = kept;
        wait
    }
}

/// One client connection as its requests see it: the peer's address, already written as
/// header text (once per connection, not per request, for `X-Forwarded-For` and the access
/// log), and the timer its requests reuse for their upstream deadline.
#[derive(Debug)]
pub(crate) struct Peer {
    addr: SocketAddr,
    ip_text: HeaderValue,
    deadline: Deadline,
}

impl Peer {
    pub(crate) fn new(addr: SocketAddr) -> Peer {
        Peer {
            addr,
            ip_text: HeaderValue::from_str(&addr.ip().to_string()).expect("an IP is ASCII"),
            deadline: Deadline::default(),
        }
    }

    fn ip(&self) -> IpAddr {
        self.addr.ip()
    }

    fn ip_str(&self) -> &str {
        self.ip_text.to_str().unwrap_or("-")
    }
}

/// What the access log and metrics learn about a request as it goes.
#[derive(Debug)]
struct Trace {
    route: Option<usize>,
    key_id: Option<Arc<str>>,
    client_ip: IpAddr,
}

impl Gateway {
    pub(crate) fn new(
        config: Arc<Config>,
        store: Arc<dyn Store>,
        global: Option<GlobalLimiter>,
    ) -> Result<Gateway, String> {
        let router = Router::new(&config.routes)?;
        let metrics = Metrics::new(&router.names());
        let defaults = Limits {
            per_minute: config.rate_limit.per_minute,
            per_second: config.rate_limit.per_second,
        };
        Ok(Gateway {
            router,
            store,
            health: StoreHealth::default(),
            cache: KeyCache::new(&config.cache, defaults),
            states: KeyStates::new(),
            global,
            failed_auth: FailedAuthLimiter::new(config.limits.failed_auth_per_minute_per_ip),
            usage: Arc::default(),
            metrics,
            defaults,
            key_sweep: Default::default(),
            config,
        })
    }

    /// Drops idle state: old failed-auth counts and upstream connections idle for too long at
    /// each call; expired cache entries and empty limiter windows when their pace allows
    /// ([`KEY_SWEEP_PACE`]).
    pub(crate) fn sweep(&self) {
        self.router.sweep();
        if let Some(global) = &self.global {
            global.sweep();
        }
        self.failed_auth.sweep();
        let started = Instant::now();
        let mut pace = crate::lock(&self.key_sweep);
        if pace.is_due(started, self.cache.len() + self.states.len()) {
            self.cache.sweep();
            self.states.sweep();
            let ended = Instant::now();
            let kept = self.cache.len() + self.states.len();
            let next_in = pace.ran(started, ended, kept);
            tracing::debug!(elapsed = ?ended - started, kept, ?next_in, "idle keys swept");
        }
    }

    /// Answers one request; never fails: every refusal becomes its problem+json answer.
    ///
    /// This, [`Gateway::pipeline`] and [`Gateway::forward`] return an `async` block rather
    /// than being `async fn`s: an `async fn` keeps each argument twice in its state, as the
    /// argument and as its binding, and the request is 264 bytes. A request's future went from
    /// 4,120 bytes to 2,032 (`-Zprint-type-sizes`), and it is copied whole into its box and at
    /// each level it is awaited from.
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn stores its arguments twice"
    )]
    pub(crate) fn handle(
        &self,
        req: Request<RequestBody>,
        peer: &Peer,
        tls: bool,
    ) -> impl Future<Output = Response<Body>> {
        async move {
            let start = Instant::now();
            let method = req.method().clone();
            let mut trace = Trace {
                route: None,
                key_id: None,
                client_ip: peer.ip(),
            };
            let (response, outcome, error) = match self.pipeline(req, peer, tls, &mut trace).await {
                Ok(response) => (response, Outcome::Forwarded, None),
                Err(e) => (e.to_response().map(Either::Right), e.outcome(), Some(e)),
            };
            let elapsed = start.elapsed();
            self.metrics
                .route(trace.route)
                .observe(outcome, elapsed.as_secs_f64());
            let route = trace
                .route
                .map_or("none", |i| self.config.routes[i].name.as_str());
            let key_id = trace.key_id.as_deref().unwrap_or("-");
            // Behind trusted proxies the client is another address than the peer's.
            let other_ip;
            let client_ip = if trace.client_ip == peer.ip() {
                peer.ip_str()
            } else {
                other_ip = trace.client_ip.to_string();
                &other_ip
            };
            match &error {
                Some(e) if response.status().is_server_error() => tracing::warn!(
                    target: "keygate::access",
                    route, method = method.as_str(), status = response.status().as_u16(),
                    outcome = outcome.as_str(), key_id, client_ip,
                    latency_us = elapsed.as_micros() as u64,
                    cause = %error_chain(e),
                    "request"
                ),
                _ if tracing::enabled!(target: "keygate::access", tracing::Level::INFO) => {
                    logging::access(&AccessLine {
                        route,
                        method: method.as_str(),
                        status: response.status().as_u16(),
                        outcome: outcome.as_str(),
                        key_id,
                        client_ip,
                        latency_us: elapsed.as_micros() as u64,
                    });
                }
                _ => {}
            }
            response
        }
    }

    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn stores its arguments twice"
    )]
    fn pipeline(
        &self,
        req: Request<RequestBody>,
        peer: &Peer,
        tls: bool,
        trace: &mut Trace,
    ) -> impl Future<Output = Result<Response<Body>, GatewayError>> {
        async move {
            if header_bytes(&req) > self.config.limits.max_header_bytes {
                return Err(GatewayError::HeadersTooLarge);
            }
            refuse_ambiguous(&req)?;
            // Routing comes first: a request no route takes is 404 whatever its credentials.
            let route = self
                .router
                .find(request_host(&req), req.uri().path())
                .ok_or(GatewayError::NoRoute)?;
            trace.route = Some(route.index);
            trace.client_ip = self.client_ip(req.headers(), peer.ip());

            // One reading of the wall clock for the key's status and its last use, a coarse one:
            // milliseconds are stored, and near a key's expiry `CachedKey::status` asks the
            // precise clock itself.
            let now = crate::clock::now();
            let (key, carried) = match route.auth {
                AuthMode::None => (None, None),
                AuthMode::Required => {
                    let (key, carried) = self
                        .authenticate(req.headers(), trace.client_ip, now)
                        .await?;
                    trace.key_id = Some(Arc::clone(key.id()));
                    (Some(key), Some(carried))
                }
            };

            let rate = match &key {
                Some(key) => {
                    // A rate-limited request is a use of the key too (SPEC §3 Usage).
                    self.usage.record(&key.state, trace.client_ip, now);
                    let verdict = self.rate_check(key).await?;
                    let profile = &key.profile;
                    let headers = RateHeaders::new(
                        profile.policy.clone(),
                        profile.limit_header.clone(),
                        &verdict,
                    );
                    if let Some(window) = verdict.refused_by {
                        self.metrics.rate_limited(window);
                        self.usage.note_rate_limited(key.id(), window);
                        return Err(GatewayError::RateLimited {
                            limit: window,
                            retry_after: verdict.retry_after_secs,
                            headers,
                        });
                    }
                    Some(headers)
                }
                None => None,
            };

            let mut response = self
                .forward(req, route, key.as_ref(), carried, peer, tls)
                .await?;
            if let Some(rate) = rate {
                rate.apply(response.headers_mut());
            }
            Ok(response)
        }
    }

    /// Credential → key → status, with the per-IP limit on failed attempts around it.
    pub(crate) async fn authenticate(
        &self,
        headers: &HeaderMap,
        client_ip: IpAddr,
        now: Timestamp,
    ) -> Result<(CachedKey, CarriedBy), GatewayError> {
        // Checked before the key, so a blocked client cannot tell a good guess from a bad one.
        if let Some(retry_after) = self.failed_auth.blocked(client_ip) {
            return Err(GatewayError::TooManyFailedAttempts { retry_after });
        }
        let result = self.verify(headers, now).await;
        if let Err(
            e @ (GatewayError::MissingApiKey
            | GatewayError::InvalidApiKey
            | GatewayError::ExpiredApiKey
            | GatewayError::RevokedApiKey),
        ) = &result
        {
            self.metrics.auth_failure(e.code());
            if let Some(retry_after) = self.failed_auth.record_failure(client_ip) {
                return Err(GatewayError::TooManyFailedAttempts { retry_after });
            }
        }
        result
    }

    async fn verify(
        &self,
        headers: &HeaderMap,
        now: Timestamp,
    ) -> Result<(CachedKey, CarriedBy), GatewayError> {
        let (secret, carried) = credential::extract(headers).map_err(|e| match e {
            CredentialError::Missing => GatewayError::MissingApiKey,
            CredentialError::Conflicting => GatewayError::InvalidApiKey,
        })?;
        // The shape and checksum are checked before any lookup: garbage never costs a query.
        if !credential::is_well_formed(secret, &self.config.keys.prefix) {
            return Err(GatewayError::InvalidApiKey);
        }
        let hash = credential::digest(secret);
        let key = self
            .lookup(&hash)
            .await?
            .ok_or(GatewayError::InvalidApiKey)?;
        match key.status(now) {
            Status::Revoked => Err(GatewayError::RevokedApiKey),
            Status::Expired => Err(GatewayError::ExpiredApiKey),
            Status::Active | Status::ExpiringSoon => Ok((key, carried)),
        }
    }

    /// The key of a digest: from the cache when fresh, else from the store, else (store down)
    /// from the cache while within `stale_if_error`.
    async fn lookup(&self, hash: &[u8; 32]) -> Result<Option<CachedKey>, GatewayError> {
        let stale = match self.cache.get(hash) {
            Lookup::Fresh(Some(key)) => {
                self.metrics.cache_hit.inc();
                return Ok(Some(key));
            }
            Lookup::Fresh(None) => {
                self.metrics.cache_negative.inc();
                return Ok(None);
            }
            Lookup::Stale(key) => Some(key),
            Lookup::Miss => None,
        };
        self.metrics.cache_miss.inc();
        // A store known to be down is not asked: the answer would only come after a timeout.
        let result = if self.health.is_up() {
            self.store.key_by_hash(hash).await
        } else {
            Err(StoreError::Unavailable("known to be down".into()))
        };
        match result {
            Ok(record) => Ok(self.remember(*hash, record)),
            Err(e) => {
                if self.health.is_up() {
                    self.metrics.store_error(StoreOp::KeyLookup);
                    self.health.failed(&e);
                }
                match stale {
                    Some(key) => {
                        tracing::debug!(key_id = %key.id(), "store unreachable: serving cached key");
                        Ok(Some(key))
                    }
                    None => Err(GatewayError::StoreUnavailable(e)),
                }
            }
        }
    }

    /// Caches the store's answer for a digest (a key, or none) and returns the key as cached.
    pub(crate) fn remember(&self, hash: [u8; 32], record: Option<KeyRecord>) -> Option<CachedKey> {
        let key = record.map(|r| {
            let state = self.states.of(&r.id);
            self.cache.build(r, state)
        });
        self.cache.insert(hash, key.clone());
        key
    }

    /// Decides one request of a key: globally through Redis when so configured and Redis is
    /// up, else by `on_store_error` (this instance's limits, or 503).
    pub(crate) async fn rate_check(&self, key: &CachedKey) -> Result<Verdict, GatewayError> {
        if let Some(global) = &self.global {
            if let Some(verdict) = global.remembered_refusal(key.id()) {
                return Ok(verdict);
            }
            if self.health.is_up() {
                match global.check(key.id(), key.profile.limits).await {
                    Ok(verdict) => return Ok(verdict),
                    Err(e) => {
                        self.metrics.store_error(StoreOp::RateLimit);
                        self.health.failed(&e);
                    }
                }
            }
            if self.config.rate_limit.on_store_error == OnStoreError::Reject {
                return Err(GatewayError::LimitsUnavailable);
            }
        }
        Ok(key.state.check(key.profile.limits, self.states.now_us()))
    }

    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn stores its arguments twice"
    )]
    fn forward(
        &self,
        mut req: Request<RequestBody>,
        route: &Route,
        key: Option<&CachedKey>,
        carried: Option<CarriedBy>,
        peer: &Peer,
        tls: bool,
    ) -> impl Future<Output = Result<Response<Body>, GatewayError>> {
        async move {
            // A WebSocket handshake keeps its Upgrade: the key has been checked by now, and after
            // the upstream's 101 the two connections are joined byte for byte.
            let websocket = upstream::is_websocket_upgrade(&req);
            let client_upgrade = websocket.then(|| hyper::upgrade::on(&mut req));
            let (mut parts, body) = req.into_parts();
            // The client's Host moves to X-Forwarded-Host; the upstream gets its own, as Kong does.
            let original_host = match parts.headers.get(header::HOST) {
                Some(host) => Some(host.clone()),
                None => parts
                    .uri
                    .authority()
                    .and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
            };
            parts.uri = route
                .upstream_uri(&parts.uri)
                .map_err(|_| GatewayError::BadRequest("The request target cannot be forwarded."))?;
            parts.version = Version::HTTP_11;
            let rewrite = self.rewrite(
                &parts.headers,
                route,
                key,
                carried,
                peer,
                tls,
                original_host,
            );

            let started = Instant::now();
            let lean = route
                .lean
                .as_ref()
                .filter(|_| upstream::lean::takes(&parts, body.is_end_stream()));
            let result = match lean {
                Some(lean) => {
                    let send = async {
                        Ok(lean
                            .send(&mut parts, &rewrite, started)
                            .await?
                            .map(Either::Right))
                    };
                    peer.deadline.within(started, route.timeout, send).await
                }
                None => {
                    rewrite.apply(&mut parts.headers);
                    if websocket {
                        upstream::keep_websocket_upgrade(&mut parts.headers);
                    }
                    // Boxed: hyper's client future is the larger branch (928 bytes against
                    // the lean one's 616), and inline it would size every request's future,
                    // which is copied whole at each level it is awaited from.
                    let send = Box::pin(async {
                        let request = Request::from_parts(parts, body);
                        let mut response = route.pool.send(request).await?;
                        // The lean exchange leaves these out as it reads the head.
                        upstream::remove_hop_by_hop(response.headers_mut());
                        Ok(response.map(Either::Left))
                    });
                    peer.deadline.within(started, route.timeout, send).await
                }
            };
            self.metrics
                .route(Some(route.index))
                .upstream_duration
                .observe(started.elapsed().as_secs_f64());
            match result {
                None => Err(GatewayError::UpstreamTimeout),
                Some(Err(e)) => Err(GatewayError::UpstreamUnavailable(e)),
                Some(Ok(mut response)) => {
                    let switching = response.status() == hyper::StatusCode::SWITCHING_PROTOCOLS;
                    if let (Some(client), true) = (client_upgrade, switching) {
                        let upstream = hyper::upgrade::on(&mut response);
                        tokio::spawn(upstream::tunnel(client, upstream));
                    }
                    if websocket && switching {
                        upstream::keep_websocket_upgrade(response.headers_mut());
                    }
                    Ok(response.map(Either::Left))
                }
            }
        }
    }

    /// SPEC §3 "Allowed requests": what the upstream may rely on. The hop-by-hop headers and
    /// the credential go, as do `X-Keygate-*` the client sent, so upstreams can trust the ones
    /// set here; `X-Forwarded-*`, `X-Keygate-*` and `Host` are the gateway's.
    #[expect(clippy::too_many_arguments, reason = "each is one input of the rule")]
    fn rewrite<'a>(
        &self,
        headers: &HeaderMap,
        route: &'a Route,
        key: Option<&'a CachedKey>,
        carried: Option<CarriedBy>,
        peer: &'a Peer,
        tls: bool,
        original_host: Option<HeaderValue>,
    ) -> Rewrite<'a> {
        let carried = carried.unwrap_or_default();
        let forwarded_for = if self.is_trusted(peer.ip()) {
            let mut chain: Vec<&str> = headers
                .get_all(&X_FORWARDED_FOR)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            chain.push(peer.ip_str());
            HeaderValue::from_str(&chain.join(", "))
                .ok()
                .map(Cow::Owned)
        } else {
            Some(Cow::Borrowed(&peer.ip_text))
        };
        let proto = if tls { &HTTPS } else { &HTTP };
        Rewrite {
            hop_by_hop: HopByHop::of(headers),
            dropped: [
                carried.x_api_key.then_some(&X_API_KEY),
                carried.authorization.then_some(&AUTHORIZATION),
            ],
            dropped_prefix: "x-keygate-",
            set: [
                forwarded_for.map(|v| (&X_FORWARDED_FOR, v)),
                Some((&X_FORWARDED_PROTO, Cow::Borrowed(proto))),
                original_host.map(|v| (&X_FORWARDED_HOST, Cow::Owned(v))),
                key.map(|k| (&X_KEYGATE_KEY_ID, Cow::Owned(k.id_header()))),
                key.map(|k| (&X_KEYGATE_OWNER, Cow::Borrowed(&k.profile.owner_header))),
                Some((&HOST, Cow::Borrowed(&route.host_header))),
            ],
        }
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.config
            .trusted_proxies
            .iter()
            .any(|net: &IpNet| net.contains(&ip))
    }

    /// The socket peer, or, behind trusted proxies, the right-most untrusted
    /// `X-Forwarded-For` entry.
    fn client_ip(&self, headers: &HeaderMap, peer: IpAddr) -> IpAddr {
        if !self.is_trusted(peer) {
            return peer;
        }
        let mut client = peer;
        for value in headers.get_all(&X_FORWARDED_FOR).iter().rev() {
            let Ok(value) = value.to_str() else {
                return client;
            };
            for entry in value.rsplit(',') {
                match entry.trim().parse::<IpAddr>() {
                    Ok(ip) => {
                        client = ip;
                        if !self.is_trusted(ip) {
                            return ip;
                        }
                    }
                    Err(_) => return client,
                }
            }
        }
        client
    }
}

/// The host a request is for: the URI authority (HTTP/2, absolute form) or `Host`.
/// What hyper parses but two servers could read two ways: refused rather than forwarded.
fn refuse_ambiguous<B>(req: &Request<B>) -> Result<(), GatewayError> {
    let headers = req.headers();
    if headers.contains_key(header::TRANSFER_ENCODING)
        && headers.contains_key(header::CONTENT_LENGTH)
    {
        return Err(GatewayError::BadRequest(
            "The request has both Content-Length and Transfer-Encoding; send only one.",
        ));
    }
    if let (Some(target), Some(host)) = (req.uri().authority(), headers.get(header::HOST))
        && !host
            .as_bytes()
            .eq_ignore_ascii_case(target.as_str().as_bytes())
    {
        return Err(GatewayError::BadRequest(
            "The request target's host differs from the Host header; send an origin-form target.",
        ));
    }
    Ok(())
}

fn request_host<B>(req: &Request<B>) -> Option<&str> {
    req.uri()
        .host()
        .or_else(|| req.headers().get(header::HOST)?.to_str().ok())
}

/// The size of the request head as the client sent it, near enough.
fn header_bytes<B>(req: &Request<B>) -> usize {
    let line = req.method().as_str().len()
        + req.uri().path_and_query().map_or(1, |pq| pq.as_str().len())
        + 12;
    req.headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum::<usize>()
        + line
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_pass_waits_its_pace_times_as_long_as_the_last_one_took() {
        let mut pace = Pace::default();
        let started = Instant::now();
        assert!(pace.is_due(started, 0), "the first pass runs at once");

        let ended = started + Duration::from_millis(100);
        let wait = pace.ran(started, ended, 1_000_000);
        assert_eq!(wait, Duration::from_millis(100) * KEY_SWEEP_PACE);
        assert!(!pace.is_due(ended, 1_000_000));
        assert!(!pace.is_due(ended + wait - Duration::from_millis(1), 1_000_000));
        assert!(pace.is_due(ended + wait, 1_000_000));

        // A quick pass (a few keys) lets the next run at the following tick.
        let (started, ended) = (ended + wait, ended + wait + Duration::from_micros(20));
        let wait = pace.ran(started, ended, 1_000);
        assert!(wait < Duration::from_secs(1), "{wait:?}");
        assert!(pace.is_due(ended + Duration::from_secs(10), 1_000));
    }

    /// The pace delays passes but never the first: a gateway's first sweep drops the entry of
    /// an unknown key past `negative_ttl` and keeps the key still in use, and its state.
    #[test]
    fn the_first_sweep_drops_what_expired_and_keeps_what_is_live() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::parse(&format!(
            "admin: {{token: test-admin-token-0123456789}}\n\
             store: {{backend: embedded, path: {}/keygate.db}}\n\
             cache: {{ttl: 1h, negative_ttl: 1ms}}\n\
             routes: [{{name: api, path_prefix: /, upstream: 'http://127.0.0.1:9'}}]\n",
            dir.path().display()
        ))
        .unwrap();
        let store = crate::store::SqliteStore::open(&dir.path().join("keygate.db")).unwrap();
        let gateway = Gateway::new(Arc::new(config), Arc::new(store), None).unwrap();
        let (_, live) = crate::bench::keys(1, "kg_").remove(0);
        let live_hash = live.hash;
        gateway.remember(live_hash, Some(live));
        gateway.remember([7; 32], None);
        // Past the 1 ms, on the cache's coarse clock too (a tick or more behind).
        std::thread::sleep(Duration::from_millis(100));

        gateway.sweep();
        assert_eq!(gateway.cache.len(), 1, "the unknown key's entry is dropped");
        assert!(matches!(gateway.cache.get(&[7; 32]), Lookup::Miss));
        assert!(matches!(
            gateway.cache.get(&live_hash),
            Lookup::Fresh(Some(_))
        ));
        assert_eq!(gateway.states.len(), 1, "the live key keeps its state");
    }

    #[test]
    fn maps_that_doubled_since_the_last_pass_are_swept_before_their_pace() {
        let mut pace = Pace::default();
        let started = Instant::now();
        let ended = started + Duration::from_millis(100);
        pace.ran(started, ended, 300_000);
        assert!(!pace.is_due(ended, 599_999));
        assert!(pace.is_due(ended, 600_000));
        // Small maps wait for the floor, not for twice a handful.
        pace.ran(started, ended, 10);
        assert!(!pace.is_due(ended, KEY_SWEEP_GROWTH_FLOOR - 1));
        assert!(pace.is_due(ended, KEY_SWEEP_GROWTH_FLOOR));
    }
}
