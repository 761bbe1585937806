//! The `keygate` binary: arguments, logging, exit codes. The work is in the library.

use std::process::ExitCode;

use clap::Parser;
use keygate::cli::{Cli, Command, LogFormat, run_keys};
use keygate::config::Config;
use keygate::error_chain;
use keygate::logging::{BatchedLog, LogGuard};
use keygate::server::{self, Listeners};
use tracing_subscriber::EnvFilter;

/// Threads for blocking work: the embedded store's queries and writes, the usage flush's
/// gathering and the sweep. The store has one connection for lookups and one for writes, so
/// more threads would only wait on their locks; tokio's default (512) let a burst of cache
/// misses start one thread per connection, each with its own stack and allocator heap
/// (65 threads after the load bench's warm-up).
const BLOCKING_THREADS: usize = 8;

/// Tasks the single-thread worker runs before it looks for new I/O events while tasks are
/// still ready (it always looks once none are). Under load, with tokio's default of 61, it
/// looked two or three times a turn through the ~130 tasks the load bench's 64 connections
/// make ready at a time, so a request that came in during a turn was served in that turn or
/// in the next, depending on whether a look happened to follow it: keygate's p99 was 2.0 times
/// its p50, nginx's 1.7. Looking once the ready tasks have all run serves each request that
/// came in during a turn in the next one. p99 / p50, medians of 8 interleaved 4 s runs each:
/// 2.0 with 61, 1.84 with 256, 1.79 with 1,024, 1.72 unbounded; the load bench's keygate /
/// nginx p99 went from 1.01-1.21x to 0.65-0.78x. The bound, not none, still lets timers and
/// other sockets in when tasks keep each other ready without end (hyper's HTTP/1 dispatcher
/// wakes itself after 16 rounds of its loop): 1,024 polls take milliseconds.
const EVENT_INTERVAL: u32 = 1024;

/// mimalloc (through `keygate-alloc`): a request allocates and frees many small buffers across
/// tasks; measured cheaper than glibc's malloc per request (see benches/load.rs).
#[global_allocator]
static ALLOCATOR: keygate_alloc::MiMalloc = keygate_alloc::MiMalloc;

/// Logs to standard error, access lines batched (see `keygate::logging`); what is pending is
/// written when the returned guard drops.
fn init_logging(format: LogFormat) -> LogGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = BatchedLog::new(std::io::stderr());
    keygate::logging::install_access(format, writer.clone());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .event_format(format)
        .init();
    guard
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config: path } => match Config::load(&path) {
            Ok(config) => {
                let problems = keygate::tls::check_files(&config);
                if !problems.is_empty() {
                    eprintln!("{}: {} problem(s):", path.display(), problems.len());
                    for problem in problems {
                        eprintln!("  {problem}");
                    }
                    return ExitCode::FAILURE;
                }
                println!("{}: ok", path.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::Serve { config, log_format } => {
            let _log = init_logging(log_format);
            let config = match Config::load(&config) {
                Ok(config) => config,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            let workers = config.worker_threads();
            let serve = async move {
                tracing::info!(workers, "serving with {workers} worker threads");
                let result = match Listeners::bind(&config).await {
                    Ok(listeners) => server::run(config, listeners, shutdown_signal()).await,
                    Err(e) => Err(e),
                };
                match result {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        tracing::error!("{}", error_chain(&e));
                        eprintln!("keygate: {}", error_chain(&e));
                        ExitCode::FAILURE
                    }
                }
            };
            // Workers are named apart from the blocking pool (the embedded store's thread work)
            // so an operator can count them in top or /proc.
            if workers == 1 {
                // One worker: tokio's single-thread scheduler, on a thread of its own. It does
                // the same work as a one-thread pool without the work-stealing machinery
                // (measured: see benches/load.rs).
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .event_interval(EVENT_INTERVAL)
                    .thread_name("keygate-blocking")
                    .max_blocking_threads(BLOCKING_THREADS)
                    .enable_all()
                    .build()
                    .expect("tokio runtime");
                return std::thread::Builder::new()
                    .name("keygate-worker".into())
                    .spawn(move || runtime.block_on(serve))
                    .expect("worker thread")
                    .join()
                    .unwrap_or(ExitCode::FAILURE);
            }
            // tokio starts its workers first, then blocking threads as needed.
            let named = std::sync::atomic::AtomicUsize::new(0);
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(workers)
                .max_blocking_threads(BLOCKING_THREADS)
                .thread_name_fn(move || {
                    let n = named.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if n < workers {
                        "keygate-worker"
                    } else {
                        "keygate-blocking"
                    }
                    .to_string()
                })
                .enable_all()
                .build()
                .expect("tokio runtime");
            runtime.block_on(serve)
        }
        Command::Keys(args) => match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime")
            .block_on(run_keys(args))
        {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("keygate: {e}");
                ExitCode::FAILURE
            }
        },
    }
}
