//! The per-request cost of keygate's own work on a cache hit: extract the credential, check
//! its shape and checksum, digest it, look it up, and decide both rate limits. Printed as
//! nanoseconds per request and as a ratio to a bare HashMap lookup measured in the same run.
//!
//! Run: `cargo bench --bench hot_path`

use std::collections::HashMap;
use std::hint::black_box;
use std::time::Instant;

use dashmap::DashMap;
use hyper::HeaderMap;
use keygate::credential;
use keygate::ratelimit::{KeyWindows, Limits, decide};

const ROUNDS: u64 = 2_000_000;

fn time(label: &str, mut f: impl FnMut(u64)) -> f64 {
    for i in 0..ROUNDS / 10 {
        f(i);
    }
    let start = Instant::now();
    for i in 0..ROUNDS {
        f(i);
    }
    let ns = start.elapsed().as_nanos() as f64 / ROUNDS as f64;
    println!("{label:<44} {ns:>8.1} ns");
    ns
}

fn main() {
    let secret = credential::generate("kg_");
    let mut headers = HeaderMap::new();
    headers.insert("x-api-key", secret.parse().unwrap());
    let hash = credential::digest(&secret);
    let keys: DashMap<[u8; 32], u64> = (0..1000u64)
        .map(|i| (credential::digest(&credential::generate("kg_")), i))
        .collect();
    keys.insert(hash, 7);
    let plain: HashMap<[u8; 32], u64> = keys.iter().map(|e| (*e.key(), *e.value())).collect();
    // Limits high enough that every request is allowed: the allowed path is the common one.
    let limits = Limits {
        per_minute: 1_000_000_000,
        per_second: 1_000_000_000,
    };
    let windows: DashMap<u64, KeyWindows> = DashMap::new();
    let start = Instant::now();

    let baseline = time("baseline: HashMap lookup of a digest", |_| {
        black_box(plain.get(black_box(&hash)));
    });
    time("extract credential from headers", |_| {
        black_box(credential::extract(black_box(&headers)).unwrap());
    });
    time("shape + CRC-32 checksum", |_| {
        black_box(credential::is_well_formed(black_box(&secret), "kg_"));
    });
    time("SHA-256 digest", |_| {
        black_box(credential::digest(black_box(&secret)));
    });
    time("cache lookup (DashMap)", |_| {
        black_box(keys.get(black_box(&hash)).map(|v| *v));
    });
    time("both rate-limit windows (decide)", |_| {
        let now = start.elapsed().as_micros() as u64;
        let mut w = windows.entry(7).or_default();
        black_box(decide(&mut w, limits, now));
    });
    // The metric work of one request: a pre-resolved counter and histogram child, as keygate
    // keeps them (same buckets as src/metrics.rs).
    let buckets = vec![
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0, 10.0,
    ];
    let counter = prometheus::IntCounter::new("c", "c").unwrap();
    let histogram =
        prometheus::Histogram::with_opts(prometheus::HistogramOpts::new("h", "h").buckets(buckets))
            .unwrap();
    time("metrics: counter + histogram observe", |i| {
        counter.inc();
        histogram.observe(black_box(i as f64 * 1e-7));
    });
    let total = time("all of the above (one cache-hit request)", |_| {
        let (s, _) = credential::extract(&headers).unwrap();
        assert!(credential::is_well_formed(s, "kg_"));
        let h = credential::digest(s);
        let id = *keys.get(&h).unwrap();
        let now = start.elapsed().as_micros() as u64;
        let mut w = windows.entry(id).or_default();
        black_box(decide(&mut w, limits, now));
        drop(w);
        counter.inc();
        histogram.observe(0.0003);
    });
    println!(
        "ratio of a cache-hit request to the baseline: {:.1}x",
        total / baseline
    );
}
