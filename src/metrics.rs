//! The Prometheus metrics of one gateway instance (SPEC §5), in a registry of its own so two
//! gateways can run in one process. Label children of the request path are resolved once at
//! start-up: a request increments counters without hashing label values.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

use crate::problem::Outcome;
use crate::ratelimit::Window;

/// From 100 µs to 10 s: a proxy's own cost sits at the bottom, slow upstreams at the top.
const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// The `reason` labels of `keygate_auth_failures_total`: the 401 problem codes.
const AUTH_FAILURE_REASONS: [&str; 4] = [
    "missing_api_key",
    "invalid_api_key",
    "expired_api_key",
    "revoked_api_key",
];

/// The store operations `keygate_store_errors_total{op}` counts failures of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StoreOp {
    /// A key looked up for a request.
    KeyLookup,
    /// The periodic or shutdown write of usage and data-plane audit events.
    UsageFlush,
    /// An audit event written by the admin API.
    Audit,
    /// Any other admin API call.
    Admin,
    /// The `/readyz` probe and the background health probe.
    Ping,
    /// A `scope: global` rate-limit decision.
    RateLimit,
}

impl StoreOp {
    const ALL: [StoreOp; 6] = [
        StoreOp::KeyLookup,
        StoreOp::UsageFlush,
        StoreOp::Audit,
        StoreOp::Admin,
        StoreOp::Ping,
        StoreOp::RateLimit,
    ];

    fn as_str(self) -> &'static str {
        match self {
            StoreOp::KeyLookup => "key_lookup",
            StoreOp::UsageFlush => "usage_flush",
            StoreOp::Audit => "audit",
            StoreOp::Admin => "admin",
            StoreOp::Ping => "ping",
            StoreOp::RateLimit => "rate_limit",
        }
    }
}

/// Counters and histograms of one route (or of `none`), by outcome.
#[derive(Debug)]
pub(crate) struct RouteMetrics {
    requests: Vec<IntCounter>,
    durations: Vec<Histogram>,
    pub(crate) upstream_duration: Histogram,
}

impl RouteMetrics {
    pub(crate) fn observe(&self, outcome: Outcome, seconds: f64) {
        let i = outcome.index();
        self.requests[i].inc();
        self.durations[i].observe(seconds);
    }
}

#[derive(Debug)]
pub(crate) struct Metrics {
    registry: Registry,
    /// Indexed like the config's routes, then one more for `none`.
    pub(crate) routes: Vec<RouteMetrics>,
    /// Indexed like [`AUTH_FAILURE_REASONS`].
    auth_failures: Vec<IntCounter>,
    pub(crate) rate_limited_minute: IntCounter,
    pub(crate) rate_limited_second: IntCounter,
    pub(crate) cache_hit: IntCounter,
    pub(crate) cache_miss: IntCounter,
    pub(crate) cache_negative: IntCounter,
    /// Indexed like [`StoreOp::ALL`]; every label exists from the start, so dashboards and
    /// alerts see zeros instead of missing series.
    store_errors: Vec<IntCounter>,
    pub(crate) connections_active: IntGauge,
}

impl Metrics {
    pub(crate) fn new(route_names: &[String]) -> Metrics {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "keygate_requests_total",
                "Data-plane requests by route and outcome.",
            ),
            &["route", "outcome"],
        )
        .expect("valid metric");
        let durations = HistogramVec::new(
            HistogramOpts::new(
                "keygate_request_duration_seconds",
                "Time from request headers to response headers, by route and outcome.",
            )
            .buckets(BUCKETS.to_vec()),
            &["route", "outcome"],
        )
        .expect("valid metric");
        let upstream = HistogramVec::new(
            HistogramOpts::new(
                "keygate_upstream_duration_seconds",
                "Time the upstream took to answer with headers, by route.",
            )
            .buckets(BUCKETS.to_vec()),
            &["route"],
        )
        .expect("valid metric");
        let auth_failures = IntCounterVec::new(
            Opts::new(
                "keygate_auth_failures_total",
                "Refused credentials by reason (the problem code).",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let rate_limited = IntCounterVec::new(
            Opts::new(
                "keygate_rate_limited_total",
                "Requests refused by a key's rate limit, by the window that refused.",
            ),
            &["limit"],
        )
        .expect("valid metric");
        let cache = IntCounterVec::new(
            Opts::new(
                "keygate_key_cache_lookups_total",
                "Key cache lookups by result.",
            ),
            &["result"],
        )
        .expect("valid metric");
        let store_errors = IntCounterVec::new(
            Opts::new(
                "keygate_store_errors_total",
                "Failed store operations by operation.",
            ),
            &["op"],
        )
        .expect("valid metric");
        let connections_active = IntGauge::new(
            "keygate_connections_active",
            "Open data-plane client connections.",
        )
        .expect("valid metric");
        for collector in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(durations.clone()),
            Box::new(upstream.clone()),
            Box::new(auth_failures.clone()),
            Box::new(rate_limited.clone()),
            Box::new(cache.clone()),
            Box::new(store_errors.clone()),
            Box::new(connections_active.clone()),
        ] {
            registry.register(collector).expect("unique metric names");
        }
        let routes = route_names
            .iter()
            .map(String::as_str)
            .chain(std::iter::once("none"))
            .map(|route| RouteMetrics {
                requests: Outcome::ALL
                    .iter()
                    .map(|o| requests.with_label_values(&[route, o.as_str()]))
                    .collect(),
                durations: Outcome::ALL
                    .iter()
                    .map(|o| durations.with_label_values(&[route, o.as_str()]))
                    .collect(),
                upstream_duration: upstream.with_label_values(&[route]),
            })
            .collect();
        Metrics {
            registry,
            routes,
            auth_failures: AUTH_FAILURE_REASONS
                .iter()
                .map(|reason| auth_failures.with_label_values(&[reason]))
                .collect(),
            rate_limited_minute: rate_limited.with_label_values(&[Window::Minute.as_str()]),
            rate_limited_second: rate_limited.with_label_values(&[Window::Second.as_str()]),
            cache_hit: cache.with_label_values(&["hit"]),
            cache_miss: cache.with_label_values(&["miss"]),
            cache_negative: cache.with_label_values(&["negative"]),
            store_errors: StoreOp::ALL
                .iter()
                .map(|op| store_errors.with_label_values(&[op.as_str()]))
                .collect(),
            connections_active,
        }
    }

    /// The metrics of route `index`, or of `none` for `None`.
    pub(crate) fn route(&self, index: Option<usize>) -> &RouteMetrics {
        &self.routes[index.unwrap_or(self.routes.len() - 1)]
    }

    /// Counts a refused credential by its problem code (one of [`AUTH_FAILURE_REASONS`]).
    pub(crate) fn auth_failure(&self, code: &str) {
        if let Some(i) = AUTH_FAILURE_REASONS.iter().position(|r| *r == code) {
            self.auth_failures[i].inc();
        }
    }

    pub(crate) fn rate_limited(&self, window: Window) {
        match window {
            Window::Minute => self.rate_limited_minute.inc(),
            Window::Second => self.rate_limited_second.inc(),
        }
    }

    pub(crate) fn store_error(&self, op: StoreOp) {
        self.store_errors[op as usize].inc();
    }

    /// The Prometheus text exposition format.
    pub(crate) fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        String::from_utf8(out).expect("text format is UTF-8")
    }
}
