//! Coarse clocks, for times that need milliseconds rather than microseconds: the age of a
//! cached key, a key's expiry, its last use.
//!
//! On Linux they read `CLOCK_MONOTONIC_COARSE` and `CLOCK_REALTIME_COARSE`, the time of the
//! last timer tick (4 ms apart here), which the vDSO returns without reading the CPU's
//! counter. On this machine's VM a precise reading cost 40-50 ns, and a cache hit took three.
//! Rate limits and latencies keep the precise clocks, and so does a key's status near its
//! expiry (`cache::CachedKey::status`).

use jiff::Timestamp;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coarse_clocks_follow_the_precise_ones() {
        let within = jiff::SignedDuration::from_millis(50);
        let (before, coarse) = (Timestamp::now(), now());
        assert!(
            coarse.duration_since(before).abs() < within,
            "{coarse} vs {before}"
        );
        let (start, started) = (std::time::Instant::now(), monotonic_ms());
        std::thread::sleep(std::time::Duration::from_millis(100));
        let (waited, coarse_waited) =
            (start.elapsed().as_millis() as u64, monotonic_ms() - started);
        assert!(
            coarse_waited.abs_diff(waited) <= 50,
            "{coarse_waited} ms vs {waited} ms"
        );
    }
}
