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

use std::ops::Range;
use std::sync::LazyLock;
use std::time::Duration;

use bytes::Bytes;
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
        // `"minute";r=87;t=42`, made in place and allocated once; the two numbers, when past
        // the table of `small`, are slices of it rather than allocations of their own (two
        // each, for a `Vec` then its counter, as `HeaderValue::from(u64)` makes them).
        let mut text = Inline::new();
        text.push(b"\"minute\";r=");
        let remaining = text.push(itoa::Buffer::new().format(self.remaining).as_bytes());
        text.push(b";t=");
        let reset = text.push(itoa::Buffer::new().format(self.reset).as_bytes());
        let text = Bytes::from_owner(text);
        let part = |n: u64, range| small(n).unwrap_or_else(|| value(text.slice(range)));
        let (remaining, reset) = (
            part(self.remaining.into(), remaining),
            part(self.reset, reset),
        );
        // One growth of the map for the five, not one per insert; in the order SPEC §3 shows.
        headers.reserve(5);
        headers.insert(RATELIMIT_POLICY.clone(), self.policy.clone());
        headers.insert(RATELIMIT.clone(), value(text));
        headers.insert(X_RATELIMIT_LIMIT.clone(), self.limit.clone());
        headers.insert(X_RATELIMIT_REMAINING.clone(), remaining);
        headers.insert(X_RATELIMIT_RESET.clone(), reset);
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

/// A number as a header value: from [`small`]'s table, or made.
fn number(n: u64) -> HeaderValue {
    small(n).unwrap_or_else(|| HeaderValue::from(n))
}

/// A number below 1,024 (remaining counts and reset seconds nearly always are) as a header
/// value from a table made once, of values over one static string, which clone without
/// allocating or counting references.
fn small(n: u64) -> Option<HeaderValue> {
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
    SMALL.get(usize::try_from(n).ok()?).cloned()
}

/// Digits and ASCII punctuation as a header value.
fn value(text: Bytes) -> HeaderValue {
    HeaderValue::from_maybe_shared(text).expect("digits and ASCII punctuation")
}

/// The `RateLimit` value, written without allocating: `"minute";r=` and `;t=` (14 bytes), a
/// u32 (10 digits at most) and a u64 (20).
#[derive(Debug)]
struct Inline {
    bytes: [u8; 48],
    len: usize,
}

impl Inline {
    fn new() -> Inline {
        Inline {
            bytes: [0; 48],
            len: 0,
        }
    }

    /// Appends `part`; returns where it lies.
    fn push(&mut self, part: &[u8]) -> Range<usize> {
        let at = self.len;
        self.len += part.len();
        self.bytes[at..self.len].copy_from_slice(part);
        at..self.len
    }
}

impl AsRef<[u8]> for Inline {
    fn as_ref(&self) -> &[u8] {
        &self.bytes[..self.len]
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
