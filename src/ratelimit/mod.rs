//! Rate limits: the per-key sliding windows of SPEC §3 and the per-client-IP limit on
//! failed authentications.
//!
//! The per-key rule is a pure function of (state, limits, now), [`decide`], so that every
//! backend (this process's memory now, a Redis script later) applies the same rule.
//!
//! Why not GCRA: the SPEC guarantees that a key never gets more than `per_minute` allowed
//! requests in *any* 60-second span, and expects the 101st request after 100 sent at 10/s to
//! wait about 50 s. GCRA with a burst of 100 refills one request every 600 ms, so it would
//! allow about 180 requests in the first minute. A sliding window over allowed requests, kept
//! in slots (1 s for the minute window, exact for the second window), gives the guarantee; each
//! slot's requests are counted as if they happened at the slot's end, so a refusal may last up
//! to one slot longer, never shorter.

mod failed_auth;
mod global;
mod window;

use std::sync::LazyLock;
use std::time::Duration;

use hyper::HeaderMap;
use hyper::header::{HeaderName, HeaderValue};

pub(crate) use failed_auth::FailedAuthLimiter;
pub(crate) use global::GlobalLimiter;
#[doc(hidden)]
pub use global::decide_in_redis;
pub use window::{KeyWindows, Verdict, decide};

/// The two limits that apply to a key together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Limits {
    pub per_minute: u32,
    pub per_second: u32,
}

impl Limits {
    /// The `RateLimit-Policy` header value for these limits.
    pub(crate) fn policy_header(self) -> HeaderValue {
        HeaderValue::try_from(format!(
            "\"minute\";q={};w=60, \"second\";q={};w=1",
            self.per_minute, self.per_second
        ))
        .expect("digits and ASCII punctuation")
    }

    /// The `X-RateLimit-Limit` header value for these limits.
    pub(crate) fn limit_header(self) -> HeaderValue {
        number(self.per_minute.into())
    }
}

/// Which of the two windows refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    Minute,
    Second,
}

impl Window {
    pub fn as_str(self) -> &'static str {
        match self {
            Window::Minute => "minute",
            Window::Second => "second",
        }
    }
}

/// The rate-limit headers of one answer (SPEC §3): RateLimit-Policy, RateLimit and
/// X-RateLimit-* for the per-minute window.
#[derive(Debug, Clone)]
pub(crate) struct RateHeaders {
    policy: HeaderValue,
    /// `X-RateLimit-Limit`, made once per limits (a number past the table of [`number`]
    /// would be written again for every answer).
    limit: HeaderValue,
    remaining: u32,
    reset: u64,
}

static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
static X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
static X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
static X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

impl RateHeaders {
    /// `policy` and `limit` from [`Limits::policy_header`] and [`Limits::limit_header`].
    pub(crate) fn new(policy: HeaderValue, limit: HeaderValue, verdict: &Verdict) -> RateHeaders {
        RateHeaders {
            policy,
            limit,
            remaining: verdict.remaining,
            reset: verdict.reset_secs,
        }
    }

    pub(crate) fn apply(&self, headers: &mut HeaderMap) {
        // One growth of the map for the five, not one per insert.
        headers.reserve(5);
        headers.insert(RATELIMIT_POLICY.clone(), self.policy.clone());
        let (mut remaining, mut reset) = (itoa::Buffer::new(), itoa::Buffer::new());
        let (remaining, reset) = (remaining.format(self.remaining), reset.format(self.reset));
        let mut ratelimit = String::with_capacity(14 + remaining.len() + reset.len());
        ratelimit.push_str("\"minute\";r=");
        ratelimit.push_str(remaining);
        ratelimit.push_str(";t=");
        ratelimit.push_str(reset);
        headers.insert(
            RATELIMIT.clone(),
            HeaderValue::try_from(ratelimit).expect("ASCII"),
        );
        headers.insert(X_RATELIMIT_LIMIT.clone(), self.limit.clone());
        headers.insert(X_RATELIMIT_REMAINING.clone(), number(self.remaining.into()));
        headers.insert(X_RATELIMIT_RESET.clone(), number(self.reset));
    }

    #[cfg(test)]
    pub(crate) fn for_test() -> RateHeaders {
        let limits = Limits {
            per_minute: 100,
            per_second: 10,
        };
        RateHeaders {
            policy: limits.policy_header(),
            limit: limits.limit_header(),
            remaining: 0,
            reset: 50,
        }
    }
}

/// A number as a header value. Below 1,024 (remaining counts and reset seconds nearly always
/// are) it comes from a table made once, of values over one static string, which clone
/// without allocating or counting references.
fn number(n: u64) -> HeaderValue {
    const TABLE: usize = 1024;
    static SMALL: LazyLock<Vec<HeaderValue>> = LazyLock::new(|| {
        let mut all = String::new();
        let mut ends = Vec::with_capacity(TABLE);
        for i in 0..TABLE {
            all.push_str(itoa::Buffer::new().format(i));
            ends.push(all.len());
        }
        let all: &'static str = all.leak();
        let mut start = 0;
        ends.into_iter()
            .map(|end| {
                let value = HeaderValue::from_static(&all[start..end]);
                start = end;
                value
            })
            .collect()
    });
    match usize::try_from(n).ok().and_then(|i| SMALL.get(i)) {
        Some(value) => value.clone(),
        None => HeaderValue::from(n),
    }
}

/// Whole seconds, rounded up, at least 1: what `Retry-After` carries.
pub(crate) fn whole_seconds_up(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_headers_carry_the_numbers_within_and_past_the_table() {
        for (remaining, reset) in [(87, 42), (999_999_913, 59), (3, 86_400), (1024, 1023)] {
            let headers = RateHeaders {
                remaining,
                reset,
                ..RateHeaders::for_test()
            };
            let mut map = HeaderMap::new();
            headers.apply(&mut map);
            let get = |name: &str| map.get(name).unwrap().to_str().unwrap().to_string();
            assert_eq!(
                get("ratelimit"),
                format!("\"minute\";r={remaining};t={reset}")
            );
            assert_eq!(get("x-ratelimit-remaining"), remaining.to_string());
            assert_eq!(get("x-ratelimit-reset"), reset.to_string());
            assert_eq!(get("x-ratelimit-limit"), "100");
            assert_eq!(
                get("ratelimit-policy"),
                "\"minute\";q=100;w=60, \"second\";q=10;w=1"
            );
        }
    }

    #[test]
    fn numbers_read_the_same_from_the_table_and_beyond_it() {
        for n in [
            0,
            1,
            9,
            10,
            99,
            100,
            1000,
            1023,
            1024,
            60_000,
            1_000_000_000,
            u64::MAX,
        ] {
            assert_eq!(number(n), n.to_string().as_str(), "{n}");
        }
    }
}
