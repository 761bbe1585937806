//! Per-client-IP limit on failed authentications, so a client cannot guess keys at full speed.
//! governor's GCRA fits here: an approximate rate with a burst is all this needs.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Instant;

use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use super::whole_seconds_up;

/// Counts 401s per client IP; once an IP is over its budget, everything it sends is refused
/// before the key is even looked at, so a valid guess cannot be told from an invalid one.
#[derive(Debug)]
pub(crate) struct FailedAuthLimiter {
    limiter: Option<DefaultKeyedRateLimiter<IpAddr>>,
    /// Asked on every request with a key, and nearly always empty: foldhash, not SipHash, to
    /// find that out.
    blocked: DashMap<IpAddr, Instant, foldhash::fast::RandomState>,
    clock: DefaultClock,
}

impl FailedAuthLimiter {
    /// `per_minute` failed authentications per IP per minute; 0 turns the limit off.
    pub(crate) fn new(per_minute: u32) -> FailedAuthLimiter {
        FailedAuthLimiter {
            limiter: NonZeroU32::new(per_minute)
                .map(|n| RateLimiter::keyed(Quota::per_minute(n).allow_burst(n))),
            blocked: DashMap::default(),
            clock: DefaultClock::default(),
        }
    }

    /// Whole seconds this IP must still wait, if it is blocked.
    pub(crate) fn blocked(&self, ip: IpAddr) -> Option<u64> {
        self.limiter.as_ref()?;
        let until = *self.blocked.get(&ip)?;
        let now = Instant::now();
        if until > now {
            Some(whole_seconds_up(until - now))
        } else {
            self.blocked.remove_if(&ip, |_, until| *until <= now);
            None
        }
    }

    /// Records one failed authentication; returns the wait when the IP is now over budget.
    pub(crate) fn record_failure(&self, ip: IpAddr) -> Option<u64> {
        let limiter = self.limiter.as_ref()?;
        match limiter.check_key(&ip) {
            Ok(()) => None,
            Err(not_until) => {
                let wait = not_until.wait_time_from(self.clock.now());
                self.blocked.insert(ip, Instant::now() + wait);
                Some(whole_seconds_up(wait))
            }
        }
    }

    /// Forgets IPs that have recovered.
    pub(crate) fn sweep(&self) {
        if let Some(limiter) = &self.limiter {
            limiter.retain_recent();
            let now = Instant::now();
            self.blocked.retain(|_, until| *until > now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_after_the_budget_and_only_that_ip() {
        let limiter = FailedAuthLimiter::new(3);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..3 {
            assert_eq!(limiter.record_failure(ip), None);
            assert_eq!(limiter.blocked(ip), None);
        }
        assert!(limiter.record_failure(ip).unwrap() >= 1);
        assert!(limiter.blocked(ip).is_some());
        assert_eq!(limiter.blocked("192.0.2.2".parse().unwrap()), None);
    }

    #[test]
    fn zero_turns_it_off() {
        let limiter = FailedAuthLimiter::new(0);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..1000 {
            assert_eq!(limiter.record_failure(ip), None);
        }
    }
}
