//! Coarse clocks, for times that need milliseconds rather than microseconds: the age of a
//! cached key, a key's expiry, its last use.
//!
//! On Linux they read `CLOCK_MONOTONIC_COARSE` and `CLOCK_REALTIME_COARSE`, the time of the
//! last timer tick (4 ms apart here), which the vDSO returns without reading the CPU's
//! counter. On this machine's VM a precise reading cost 40-50 ns, and a cache hit took three.
//! Rate limits and latencies keep the precise clocks.

use jiff::{SignedDuration, Timestamp};

/// Milliseconds on a monotonic clock, a tick (1-10 ms) coarse; the origin is unspecified.
#[cfg(target_os = "linux")]
pub(crate) fn monotonic_ms() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::MonotonicCoarse);
    t.tv_sec as u64 * 1_000 + t.tv_nsec as u64 / 1_000_000
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn monotonic_ms() -> u64 {
    static ORIGIN: std::sync::LazyLock<std::time::Instant> =
        std::sync::LazyLock::new(std::time::Instant::now);
    ORIGIN.elapsed().as_millis() as u64
}

/// The wall clock, a tick (1-10 ms) coarse.
#[cfg(target_os = "linux")]
pub(crate) fn now() -> Timestamp {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::RealtimeCoarse);
    Timestamp::new(t.tv_sec, t.tv_nsec as i32).unwrap_or_else(|_| Timestamp::now())
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn now() -> Timestamp {
    Timestamp::now()
}

/// How far [`now`] may be behind the precise wall clock: two ticks (it is at most one behind;
/// the second is a margin for a tick taken late, on a busy or virtual machine).
#[cfg(target_os = "linux")]
pub(crate) fn lag() -> SignedDuration {
    static LAG: std::sync::LazyLock<SignedDuration> = std::sync::LazyLock::new(|| {
        let t = rustix::time::clock_getres(rustix::time::ClockId::RealtimeCoarse);
        SignedDuration::new(t.tv_sec, t.tv_nsec as i32) * 2
    });
    *LAG
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn lag() -> SignedDuration {
    SignedDuration::ZERO
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coarse_clocks_follow_the_precise_ones_within_a_tick() {
        let tick = SignedDuration::from_millis(20);
        let (before, coarse) = (Timestamp::now(), now());
        assert!(
            coarse.duration_since(before).abs() < tick,
            "{coarse} vs {before}"
        );
        // What `lag` promises, on which expiry relies: the coarse clock plus it is never
        // behind the precise one.
        for _ in 0..10_000 {
            let precise = Timestamp::now();
            assert!(now() + lag() >= precise, "lag {:?}", lag());
        }
        let (start, started) = (std::time::Instant::now(), monotonic_ms());
        std::thread::sleep(std::time::Duration::from_millis(100));
        let (waited, coarse_waited) =
            (start.elapsed().as_millis() as u64, monotonic_ms() - started);
        assert!(
            coarse_waited.abs_diff(waited) <= 20,
            "{coarse_waited} ms vs {waited} ms"
        );
    }
}
