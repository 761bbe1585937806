//! The global rate limit runs in Redis as Lua; the local one in Rust. Both must be the same
//! rule: the same request times give the same verdicts, field by field.

mod support;

use keygate::ratelimit::{KeyWindows, Limits, decide, decide_in_redis};
use support::redis_server::RedisServer;

/// A small deterministic generator, so a failure can be replayed.
struct XorShift(u64);

impl XorShift {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[tokio::test]
async fn lua_and_rust_give_the_same_verdicts() {
    let redis = RedisServer::start();
    let mut conn = redis.client().await;
    // Simulated times start at the real time, so Redis never expires state early.
    let start = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;
    let cases = [(100, 10), (5, 3), (30, 5), (1000, 50), (7, 7)];
    for (case, &(per_minute, per_second)) in cases.iter().enumerate() {
        let limits = Limits {
            per_minute,
            per_second,
        };
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15 + case as u64);
        let mut local = KeyWindows::default();
        let key = format!("twin:rl:{{case{case}}}");
        let mut now = start;
        let mut allowed = 0;
        for i in 0..1500 {
            // Phases of 100 requests: bursts, fast and slow steady traffic, sparse use;
            // now and then a pause of up to 70 s.
            let scale = [2_000, 40_000, 600_000, 10_000_000][(i / 100) % 4];
            now += if rng.below(100) == 0 {
                rng.below(70_000_000)
            } else {
                rng.below(scale)
            };
            let rust = decide(&mut local, limits, now);
            let lua = decide_in_redis(&mut conn, &key, limits, now).await.unwrap();
            assert_eq!(
                lua,
                rust,
                "limits {per_minute}/{per_second}, request {i} at +{} µs",
                now - start
            );
            allowed += usize::from(rust.allowed());
        }
        assert!(
            allowed > 0 && allowed < 1500,
            "case {case} never refused or never allowed"
        );
    }
}
