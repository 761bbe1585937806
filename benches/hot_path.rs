//! What keygate's own work costs per request, measured by criterion on the real code
//! (`keygate::bench::HotPath` is the gateway `serve` builds, minus the sockets):
//!
//! - each step of a cache hit alone: credential extraction, shape + checksum, digest,
//!   cache lookup, both rate-limit windows;
//! - a whole cache hit as the data plane runs it (failed-auth check, credential, checksum,
//!   digest, cache, status, usage record, both windows, metrics), with 1,000 and with
//!   1,000,000 keys cached, in a shuffled order, so that at a million each request's key is
//!   far from the last one's in memory, as in the load bench;
//! - a cache miss answered by the embedded store (SQLite on the blocking pool), 1,000 and
//!   100,000 keys in the store.
//!
//! A bare `HashMap` lookup of a digest runs in the same invocation as the baseline; criterion
//! prints each figure, and the last lines print each as a ratio to that baseline.
//!
//! Run: `cargo bench --bench hot_path`

use std::collections::HashMap;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group};
use hyper::HeaderMap;
use keygate::bench::{self, HotPath};
use keygate::config::Config;
use keygate::credential;
use keygate::ratelimit::{KeyWindows, Limits, decide};
use keygate::store::SqliteStore;

const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));

fn config(dir: &std::path::Path) -> Config {
    Config::parse(&format!(
        "listen: 127.0.0.1:0
admin: {{listen: 127.0.0.1:0, token: bench-admin-token-0123456789}}
store: {{backend: embedded, path: {}/keygate.db}}
cache: {{ttl: 1h}}
routes: [{{name: api, path_prefix: /, upstream: 'http://127.0.0.1:9'}}]
",
        dir.display()
    ))
    .expect("bench config")
}

fn headers(secret: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("x-api-key", secret.parse().unwrap());
    headers
}

/// A gateway on a fresh embedded store holding `count` keys; their request headers.
fn gateway(count: usize) -> (tempfile::TempDir, HotPath, Vec<HeaderMap>) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("keygate.db")).unwrap();
    let keys = bench::keys(count, "kg_");
    bench::import(&store, &keys);
    let hot = HotPath::new(config(dir.path()), store);
    let headers = keys.iter().map(|(secret, _)| headers(secret)).collect();
    (dir, hot, headers)
}

fn steps(c: &mut Criterion) {
    let secret = credential::generate("kg_");
    let headers = headers(&secret);
    let hash = credential::digest(&secret);
    let plain: HashMap<[u8; 32], u64> = (0..1000u64)
        .map(|i| (credential::digest(&credential::generate("kg_")), i))
        .chain([(hash, 7)])
        .collect();
    let limits = Limits {
        per_minute: 1_000_000_000,
        per_second: 1_000_000_000,
    };
    let mut windows = KeyWindows::default();
    let start = std::time::Instant::now();

    let mut group = c.benchmark_group("step");
    group.bench_function("baseline: HashMap lookup of a digest", |b| {
        b.iter(|| black_box(plain.get(black_box(&hash))))
    });
    group.bench_function("extract credential from headers", |b| {
        b.iter(|| black_box(credential::extract(black_box(&headers)).unwrap()))
    });
    group.bench_function("shape + CRC-32 checksum", |b| {
        b.iter(|| black_box(credential::is_well_formed(black_box(&secret), "kg_")))
    });
    group.bench_function("SHA-256 digest", |b| {
        b.iter(|| black_box(credential::digest(black_box(&secret))))
    });
    group.bench_function("both rate-limit windows (decide)", |b| {
        b.iter(|| {
            let now = start.elapsed().as_micros() as u64;
            black_box(decide(&mut windows, limits, now))
        })
    });
    group.finish();
}

/// A whole cache hit, among 1,000 keys and among 1,000,000: at a million, each request's key
/// is one the CPU's caches have not seen lately, as in the load bench. The keys are cached in
/// a shuffled order and asked for in order, so the bench's own reading of their headers walks
/// memory in order while the keys' entries and states are reached at random, as a server's
/// are.
fn cache_hit(c: &mut Criterion) {
    let mut group = c.benchmark_group("cache hit: verify + both limits");
    for count in [1_000, 1_000_000] {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("keygate.db")).unwrap();
        let hot = HotPath::new(config(dir.path()), store);
        let mut keys = bench::keys(count, "kg_");
        let headers: Vec<HeaderMap> = keys.iter().map(|(secret, _)| headers(secret)).collect();
        shuffle(&mut keys);
        hot.cache(keys.into_iter().map(|(_, record)| record));
        let mut i = 0;
        group.bench_with_input(BenchmarkId::from_parameter(count), &count, |b, _| {
            b.iter(|| {
                i = (i + 1) % headers.len();
                assert!(hot.admit_cached(black_box(&headers[i]), CLIENT));
            });
            hot.drop_usage();
        });
    }
    group.finish();
}

/// Fisher-Yates on a xorshift: a fixed order from run to run.
fn shuffle<T>(items: &mut [T]) {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in (1..items.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        items.swap(i, (x % (i as u64 + 1)) as usize);
    }
}

fn cache_miss(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut group = c.benchmark_group("cache miss: embedded store lookup + verify + limits");
    group.measurement_time(Duration::from_secs(5));
    for count in [1_000, 100_000] {
        let (_dir, hot, headers) = gateway(count);
        let mut i = 0;
        group.bench_with_input(BenchmarkId::from_parameter(count), &count, |b, _| {
            b.to_async(&runtime).iter(|| {
                i = (i + 1) % headers.len();
                hot.clear_cache();
                let (hot, headers) = (&hot, &headers[i]);
                async move { assert!(hot.admit(headers, CLIENT).await) }
            });
            hot.drop_usage();
        });
    }
    group.finish();
}

criterion_group!(benches, steps, cache_hit, cache_miss);

fn main() {
    let started = std::time::SystemTime::now();
    benches();
    Criterion::default().configure_from_args().final_summary();
    print_ratios(started);
}

/// Each estimate criterion just wrote, as a ratio to the baseline of this same run.
fn print_ratios(since: std::time::SystemTime) {
    let root = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("criterion");
    let mut figures: Vec<(String, f64)> = Vec::new();
    collect(&root, since, &mut figures);
    let Some(&(_, baseline)) = figures.iter().find(|(name, _)| name.contains("baseline")) else {
        return;
    };
    figures.sort_by(|a, b| a.1.total_cmp(&b.1));
    println!("\nmean time per call, and its ratio to the baseline (HashMap lookup of a digest):");
    for (name, ns) in figures {
        println!("  {name:<64} {ns:>10.1} ns {:>8.1}x", ns / baseline);
    }
}

fn collect(dir: &std::path::Path, since: std::time::SystemTime, out: &mut Vec<(String, f64)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let estimates = path.join("new/estimates.json");
        let benchmark = path.join("new/benchmark.json");
        let this_run = std::fs::metadata(&estimates)
            .and_then(|m| m.modified())
            .is_ok_and(|at| at >= since);
        if !this_run {
            if path.is_dir() {
                collect(&path, since, out);
            }
            continue;
        }
        if let (Ok(e), Ok(b)) = (
            std::fs::read_to_string(&estimates),
            std::fs::read_to_string(&benchmark),
        ) {
            let e: serde_json::Value = serde_json::from_str(&e).unwrap();
            let b: serde_json::Value = serde_json::from_str(&b).unwrap();
            if let (Some(ns), Some(name)) =
                (e["mean"]["point_estimate"].as_f64(), b["full_id"].as_str())
            {
                out.push((name.to_string(), ns));
            }
        }
    }
}
