//! keygate: a reverse-proxy gateway that enforces API keys in front of existing HTTP APIs.
//!
//! What each module owns:
//! - [`config`]: YAML → validated, typed configuration; every problem reported with its path.
//! - [`server`]: listeners, connection limits, graceful shutdown; wires everything together.
//! - `gateway`: the per-request pipeline (route → credential → key → status → usage → limit → forward).
//! - [`credential`]: extracting a secret from headers, its shape and checksum; no I/O.
//! - [`key`]: the key model, status rules, and input validation; no I/O.
//! - `cache`: the in-process cache of verified (and unknown) keys in front of the store.
//! - `key_state`: each key's per-instance rate-limit windows and pending use, one per key.
//! - [`store`]: the store trait and its backends; the only place with SQL for keys.
//! - [`ratelimit`]: the pure sliding-window decision, rate-limit headers, the Redis limiter.
//! - `upstream`: routing, header rewriting, the lean exchange of bodiless requests and the pooled
//!   hyper client for the rest.
//! - `usage`: batched last-used writes, never awaited inside a request.
//! - `problem`: the one table from refusal to status, problem `code` and headers.
//! - `admin`: the admin API, health and metrics endpoints.
//! - `metrics`: the Prometheus registry of one gateway instance.
//! - [`cli`]: the `keygate` command line.
//! - [`logging`]: log lines to standard error, access lines batched.

#[doc(hidden)]
pub mod bench;
pub mod cli;
pub mod config;
pub mod credential;
pub mod key;
pub mod logging;
pub mod ratelimit;
pub mod server;
pub mod store;
pub mod tls;

mod admin;
mod cache;
mod clock;
mod gateway;
mod key_state;
mod metrics;
mod problem;
mod socket;
mod upstream;
mod usage;

/// Shards of the maps that hold an entry per key in use (cache, key states). The sweep write-locks one shard at a time while the event loop may need it: with a
/// million keys and dashmap's default (4 × CPUs, so 8 here) each hold lasted about 10 ms.
/// 1,024 shards hold about 1,000 keys each at that scale, for 128 KB per map. Measured with
/// `benches/load.rs --big 1000000`: p99 at a million keys went from 23–74 ms to 15–43 ms;
/// what remained came from the usage log's folds, which no longer run while serving (see
/// `store::sqlite`).
pub(crate) const KEY_MAP_SHARDS: usize = 1024;

/// Locks `mutex`, going on past a thread that panicked while holding it: what the locks here
/// guard (limit windows, pending uses, timers, idle upstream connections, the log writer's
/// state, the store's connections, whose open transaction rolls back as it unwinds) stays
/// valid however a holder stopped.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// An error and its causes on one line, for logs and command-line messages.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
