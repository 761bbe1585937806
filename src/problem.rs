//! The one table from a refusal to its HTTP status, problem `code`, metrics outcome and headers.
//! Every error body is `application/problem+json` (RFC 9457).

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER, WWW_AUTHENTICATE};
use hyper::{Response, StatusCode};

use crate::ratelimit::{RateHeaders, Window};

/// Why the data plane refused to forward a request.
#[derive(Debug, thiserror::Error)]
pub(crate) enum GatewayError {
    #[error("no credential")]
    MissingApiKey,
    #[error("malformed, unknown or conflicting credential")]
    InvalidApiKey,
    #[error("key expired")]
    ExpiredApiKey,
    #[error("key revoked")]
    RevokedApiKey,
    #[error("over the {limit:?} limit")]
    RateLimited {
        limit: Window,
        retry_after: u64,
        headers: RateHeaders,
    },
    #[error("too many failed authentications from this client")]
    TooManyFailedAttempts { retry_after: u64 },
    #[error("no route matches")]
    NoRoute,
    #[error("upstream unavailable")]
    UpstreamUnavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("store unavailable")]
    StoreUnavailable(#[source] crate::store::StoreError),
    /// `scope: global` with the store down and `on_store_error: reject`.
    #[error("rate limits unknowable: store unavailable")]
    LimitsUnavailable,
    #[error("upstream timed out")]
    UpstreamTimeout,
    #[error("header block too large")]
    HeadersTooLarge,
    #[error("bad request: {0}")]
    BadRequest(&'static str),
}

/// The label of `keygate_requests_total{outcome}` for a request. The discriminant is the
/// outcome's index in [`Outcome::ALL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Forwarded = 0,
    Unauthorized,
    RateLimited,
    NoRoute,
    BadRequest,
    UpstreamError,
    UpstreamTimeout,
    StoreUnavailable,
}

impl Outcome {
    pub(crate) const ALL: [Outcome; 8] = [
        Outcome::Forwarded,
        Outcome::Unauthorized,
        Outcome::RateLimited,
        Outcome::NoRoute,
        Outcome::BadRequest,
        Outcome::UpstreamError,
        Outcome::UpstreamTimeout,
        Outcome::StoreUnavailable,
    ];

    /// Position in [`Outcome::ALL`], for arrays of per-outcome metrics.
    pub(crate) fn index(self) -> usize {
        self as usize
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Outcome::Forwarded => "forwarded",
            Outcome::Unauthorized => "unauthorized",
            Outcome::RateLimited => "rate_limited",
            Outcome::NoRoute => "no_route",
            Outcome::BadRequest => "bad_request",
            Outcome::UpstreamError => "upstream_error",
            Outcome::UpstreamTimeout => "upstream_timeout",
            Outcome::StoreUnavailable => "store_unavailable",
        }
    }
}

/// Seconds a client should wait before retrying when the store is down.
const STORE_RETRY_AFTER: u64 = 5;

impl GatewayError {
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            GatewayError::MissingApiKey
            | GatewayError::InvalidApiKey
            | GatewayError::ExpiredApiKey
            | GatewayError::RevokedApiKey => StatusCode::UNAUTHORIZED,
            GatewayError::RateLimited { .. } | GatewayError::TooManyFailedAttempts { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            GatewayError::NoRoute => StatusCode::NOT_FOUND,
            GatewayError::UpstreamUnavailable(_) => StatusCode::BAD_GATEWAY,
            GatewayError::StoreUnavailable(_) | GatewayError::LimitsUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            GatewayError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            GatewayError::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            GatewayError::BadRequest(_) => StatusCode::BAD_REQUEST,
        }
    }

    /// The stable problem `code` clients program against.
    pub(crate) fn code(&self) -> &'static str {
        match self {
            GatewayError::MissingApiKey => "missing_api_key",
            GatewayError::InvalidApiKey => "invalid_api_key",
            GatewayError::ExpiredApiKey => "expired_api_key",
            GatewayError::RevokedApiKey => "revoked_api_key",
            GatewayError::RateLimited { .. } => "rate_limited",
            GatewayError::TooManyFailedAttempts { .. } => "too_many_failed_attempts",
            GatewayError::NoRoute => "no_route",
            GatewayError::UpstreamUnavailable(_) => "upstream_unavailable",
            GatewayError::StoreUnavailable(_) | GatewayError::LimitsUnavailable => {
                "store_unavailable"
            }
            GatewayError::UpstreamTimeout => "upstream_timeout",
            GatewayError::HeadersTooLarge => "headers_too_large",
            GatewayError::BadRequest(_) => "bad_request",
        }
    }

    pub(crate) fn outcome(&self) -> Outcome {
        match self {
            GatewayError::MissingApiKey
            | GatewayError::InvalidApiKey
            | GatewayError::ExpiredApiKey
            | GatewayError::RevokedApiKey => Outcome::Unauthorized,
            GatewayError::RateLimited { .. } | GatewayError::TooManyFailedAttempts { .. } => {
                Outcome::RateLimited
            }
            GatewayError::NoRoute => Outcome::NoRoute,
            GatewayError::UpstreamUnavailable(_) => Outcome::UpstreamError,
            GatewayError::StoreUnavailable(_) | GatewayError::LimitsUnavailable => {
                Outcome::StoreUnavailable
            }
            GatewayError::UpstreamTimeout => Outcome::UpstreamTimeout,
            GatewayError::HeadersTooLarge | GatewayError::BadRequest(_) => Outcome::BadRequest,
        }
    }

    fn title(&self) -> &'static str {
        match self {
            GatewayError::MissingApiKey => "API key required",
            GatewayError::InvalidApiKey => "Invalid API key",
            GatewayError::ExpiredApiKey => "API key expired",
            GatewayError::RevokedApiKey => "API key revoked",
            GatewayError::RateLimited { .. } => "Rate limit exceeded",
            GatewayError::TooManyFailedAttempts { .. } => "Too many failed authentication attempts",
            GatewayError::NoRoute => "No route",
            GatewayError::UpstreamUnavailable(_) => "Upstream unavailable",
            GatewayError::StoreUnavailable(_) | GatewayError::LimitsUnavailable => {
                "Key store unavailable"
            }
            GatewayError::UpstreamTimeout => "Upstream timeout",
            GatewayError::HeadersTooLarge => "Request headers too large",
            GatewayError::BadRequest(_) => "Bad request",
        }
    }

    /// What the client can do about it; never internals, never the secret.
    fn detail(&self) -> String {
        match self {
            GatewayError::MissingApiKey => {
                "Send your API key in the X-API-Key header or as Authorization: Bearer <key>.".into()
            }
            GatewayError::InvalidApiKey => {
                "The API key is malformed, unknown, or differs between the credential headers sent. Check that you copied the whole key.".into()
            }
            GatewayError::ExpiredApiKey => {
                "This API key has expired. Ask its owner for a new key.".into()
            }
            GatewayError::RevokedApiKey => {
                "This API key has been revoked. Ask its owner for a new key.".into()
            }
            GatewayError::RateLimited {
                limit, retry_after, ..
            } => format!(
                "This key is over its per-{} limit. Retry after {retry_after} s.",
                limit.as_str()
            ),
            GatewayError::TooManyFailedAttempts { retry_after } => format!(
                "Too many requests with invalid credentials came from your address. Retry after {retry_after} s."
            ),
            GatewayError::NoRoute => "No route is configured for this host and path.".into(),
            GatewayError::UpstreamUnavailable(e) => match tls_failure(e.as_ref()) {
                Some(tls) => format!(
                    "The upstream service's TLS certificate was refused ({tls}), so the request \
                     was not sent. The gateway's operator must fix the upstream's certificate or \
                     the route's ca_file."
                ),
                None => "The upstream service could not be reached. Retry later.".into(),
            },
            GatewayError::StoreUnavailable(_) => {
                "The key store is unreachable, so the key could not be verified. Retry later.".into()
            }
            GatewayError::LimitsUnavailable => {
                "The key store is unreachable, so this key's rate limits cannot be checked. Retry later.".into()
            }
            GatewayError::UpstreamTimeout => {
                "The upstream service did not answer in time.".into()
            }
            GatewayError::HeadersTooLarge => {
                "The request's header block is larger than this gateway accepts.".into()
            }
            GatewayError::BadRequest(why) => (*why).into(),
        }
    }

    /// The problem+json answer with the SPEC's extra headers.
    pub(crate) fn to_response(&self) -> Response<Full<Bytes>> {
        let mut response =
            problem_response(self.status(), self.code(), self.title(), &self.detail());
        let headers = response.headers_mut();
        match self {
            GatewayError::MissingApiKey
            | GatewayError::InvalidApiKey
            | GatewayError::ExpiredApiKey
            | GatewayError::RevokedApiKey => {
                headers.insert(
                    WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"keygate\""),
                );
            }
            GatewayError::RateLimited {
                retry_after,
                headers: rate,
                ..
            } => {
                headers.insert(RETRY_AFTER, HeaderValue::from(*retry_after));
                rate.apply(headers);
            }
            GatewayError::TooManyFailedAttempts { retry_after } => {
                headers.insert(RETRY_AFTER, HeaderValue::from(*retry_after));
            }
            GatewayError::StoreUnavailable(_) | GatewayError::LimitsUnavailable => {
                headers.insert(RETRY_AFTER, HeaderValue::from(STORE_RETRY_AFTER));
            }
            GatewayError::NoRoute
            | GatewayError::UpstreamUnavailable(_)
            | GatewayError::UpstreamTimeout
            | GatewayError::HeadersTooLarge
            | GatewayError::BadRequest(_) => {}
        }
        response
    }
}

/// An RFC 9457 problem+json response.
pub(crate) fn problem_response(
    status: StatusCode,
    code: &str,
    title: &str,
    detail: &str,
) -> Response<Full<Bytes>> {
    problem_with_field(status, code, title, detail, None)
}

/// As [`problem_response`], with a `field` extension member naming the input at fault.
pub(crate) fn problem_with_field(
    status: StatusCode,
    code: &str,
    title: &str,
    detail: &str,
    field: Option<&str>,
) -> Response<Full<Bytes>> {
    let mut body = serde_json::json!({
        "type": format!("urn:keygate:problem:{code}"),
        "title": title,
        "status": status.as_u16(),
        "detail": detail,
        "code": code,
    });
    if let Some(field) = field {
        body["field"] = serde_json::Value::String(field.to_string());
    }
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    response
}

/// The rustls error somewhere in an upstream error's causes, if TLS is why it failed.
fn tls_failure(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cause = Some(e);
    while let Some(e) = cause {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(match tls {
                rustls::Error::InvalidCertificate(reason) => {
                    format!("invalid certificate: {reason:?}")
                }
                other => other.to_string(),
            });
        }
        // An io::Error's `source()` skips the error it wraps: step into that one instead.
        cause = match e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => e.source(),
        };
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ratelimit::RateHeaders;

    fn check(err: GatewayError, status: u16, code: &str, header: Option<&str>) {
        let response: Response<Full<Bytes>> = err.to_response();
        assert_eq!(response.status().as_u16(), status, "{code}");
        assert_eq!(response.headers()[CONTENT_TYPE], "application/problem+json");
        assert_eq!(err.code(), code);
        if let Some(name) = header {
            assert!(response.headers().contains_key(name), "{code} lacks {name}");
        }
    }

    fn rate_headers() -> RateHeaders {
        RateHeaders::for_test()
    }

    #[test]
    fn missing_api_key_is_401_with_challenge() {
        check(
            GatewayError::MissingApiKey,
            401,
            "missing_api_key",
            Some("www-authenticate"),
        );
    }
    #[test]
    fn invalid_api_key_is_401_with_challenge() {
        check(
            GatewayError::InvalidApiKey,
            401,
            "invalid_api_key",
            Some("www-authenticate"),
        );
    }
    #[test]
    fn expired_api_key_is_401_with_challenge() {
        check(
            GatewayError::ExpiredApiKey,
            401,
            "expired_api_key",
            Some("www-authenticate"),
        );
    }
    #[test]
    fn revoked_api_key_is_401_with_challenge() {
        check(
            GatewayError::RevokedApiKey,
            401,
            "revoked_api_key",
            Some("www-authenticate"),
        );
    }
    #[test]
    fn rate_limited_is_429_with_retry_after_and_rate_headers() {
        let err = GatewayError::RateLimited {
            limit: Window::Minute,
            retry_after: 50,
            headers: rate_headers(),
        };
        let response: Response<Full<Bytes>> = err.to_response();
        assert_eq!(response.headers()[RETRY_AFTER], "50");
        assert!(response.headers().contains_key("ratelimit-policy"));
        assert!(response.headers().contains_key("x-ratelimit-remaining"));
        check(err, 429, "rate_limited", Some("retry-after"));
    }
    #[test]
    fn too_many_failed_attempts_is_429_with_retry_after() {
        check(
            GatewayError::TooManyFailedAttempts { retry_after: 1 },
            429,
            "too_many_failed_attempts",
            Some("retry-after"),
        );
    }
    #[test]
    fn no_route_is_404() {
        check(GatewayError::NoRoute, 404, "no_route", None);
    }
    #[test]
    fn upstream_unavailable_is_502() {
        check(
            GatewayError::UpstreamUnavailable("refused".into()),
            502,
            "upstream_unavailable",
            None,
        );
    }
    #[test]
    fn store_unavailable_is_503_with_retry_after() {
        check(
            GatewayError::StoreUnavailable(crate::store::StoreError::Unavailable("down".into())),
            503,
            "store_unavailable",
            Some("retry-after"),
        );
    }
    #[test]
    fn unknowable_limits_are_503_store_unavailable_with_retry_after() {
        check(
            GatewayError::LimitsUnavailable,
            503,
            "store_unavailable",
            Some("retry-after"),
        );
    }
    #[test]
    fn upstream_timeout_is_504() {
        check(GatewayError::UpstreamTimeout, 504, "upstream_timeout", None);
    }
    #[test]
    fn headers_too_large_is_431() {
        check(
            GatewayError::HeadersTooLarge,
            431,
            "headers_too_large",
            None,
        );
    }
    #[test]
    fn bad_request_is_400() {
        check(
            GatewayError::BadRequest("ambiguous"),
            400,
            "bad_request",
            None,
        );
    }

    #[test]
    fn outcome_index_is_its_place_in_all() {
        for (i, outcome) in Outcome::ALL.iter().enumerate() {
            assert_eq!(outcome.index(), i, "{outcome:?}");
        }
    }

    #[test]
    fn body_is_rfc9457_with_code() {
        let response: Response<Full<Bytes>> = GatewayError::NoRoute.to_response();
        let body = futures_body(response);
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["status"], 404);
        assert_eq!(json["code"], "no_route");
        assert_eq!(json["type"], "urn:keygate:problem:no_route");
        assert!(json["title"].is_string() && json["detail"].is_string());
    }

    fn futures_body(response: Response<Full<Bytes>>) -> Bytes {
        use http_body_util::BodyExt;
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(response.into_body().collect())
            .unwrap()
            .to_bytes()
    }
}
