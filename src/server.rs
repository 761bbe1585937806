//! Running a gateway: opening the store, the two listeners (data plane and admin), the
//! background flush and sweep tasks, and the graceful stop.
//!
//! [`run`] takes already-bound listeners and a shutdown future, so tests can start the real
//! server on port 0 and stop it when they like.

use std::convert::Infallible;
use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Either;
use hyper::body::{Body, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use prometheus::IntGauge;
use rand::distr::{Alphanumeric, SampleString};
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;

use crate::admin::Admin;
use crate::config::{Backend, Config, Scope};
use crate::error_chain;
use crate::gateway::{Gateway, Peer, RequestBody};
use crate::metrics::StoreOp;
use crate::ratelimit::GlobalLimiter;
use crate::store::{RedisStore, SqliteStore, Store, StoreError};
use crate::tls::{Certificates, TlsError};

mod http1;
mod watchdog;

use http1::{Left, Rewind};
use watchdog::{Tracked, Watchdog, Watched};

/// How often idle limiter, cache and failed-auth state is dropped.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// How often the store is pinged in the background, and how long the answer may take: a store
/// marked down is marked up again within about this long after it answers again.
const PROBE_EVERY: Duration = Duration::from_millis(500);

/// Why the gateway could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot open the store")]
    Store(#[source] StoreError),
    #[error("{0}")]
    Unsupported(String),
    #[error("tls")]
    Tls(#[source] TlsError),
    #[error("cannot bind {what} on {addr}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("admin token file {path}")]
    Token {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The bound sockets of one gateway.
#[derive(Debug)]
pub struct Listeners {
    pub data: TcpListener,
    pub admin: TcpListener,
}

impl Listeners {
    /// Binds `listen` and `admin.listen` of the config.
    pub async fn bind(config: &Config) -> Result<Listeners, ServeError> {
        let bind = |what, addr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Bind { what, addr, source })
        };
        Ok(Listeners {
            data: bind("the data plane", config.listen).await?,
            admin: bind("the admin API", config.admin.listen).await?,
        })
    }
}

/// The admin token: from the config, else from the token file, which is generated (mode 0600)
/// when `create` is set and it does not exist yet. Returns the token and the file it came from.
pub fn admin_token(config: &Config, create: bool) -> Result<(String, Option<PathBuf>), ServeError> {
    if let Some(token) = config.admin.token.as_deref().filter(|t| !t.is_empty()) {
        return Ok((token.to_string(), None));
    }
    let path = config.store.admin_token_path();
    let failed = |source| ServeError::Token {
        path: path.clone(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(token) if !token.trim().is_empty() => return Ok((token.trim().to_string(), Some(path))),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {}
        Err(e) => return Err(failed(e)),
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(failed)?;
    }
    let token = Alphanumeric.sample_string(&mut rand::rng(), 40);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .map_err(failed)?;
    writeln!(file, "{token}").map_err(failed)?;
    Ok((token, Some(path)))
}

/// The store of the config, and the Redis store again when that is what it is (for the
/// change feed and global limits).
fn open_store(config: &Config) -> Result<(Arc<dyn Store>, Option<RedisStore>), ServeError> {
    match config.store.backend {
        Backend::Embedded => Ok((
            Arc::new(SqliteStore::open(&config.store.path).map_err(ServeError::Store)?),
            None,
        )),
        Backend::Redis => {
            let redis = RedisStore::open(&config.store.redis_url, &config.store.key_prefix)
                .map_err(ServeError::Store)?;
            Ok((Arc::new(redis.clone()), Some(redis)))
        }
    }
}

/// Runs the gateway until `shutdown` completes, then stops accepting, lets in-flight requests
/// finish for up to `shutdown_timeout`, and flushes usage.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let certificates = match &config.tls {
        Some(tls) => Some(Arc::new(Certificates::load(tls).map_err(ServeError::Tls)?)),
        None => None,
    };
    let config = Arc::new(config);
    let (store, redis) = open_store(&config)?;
    let (token, token_file) = admin_token(&config, true)?;
    if let Some(path) = token_file {
        // The path, never the token: the CLI reads the token from there.
        tracing::info!(path = %path.display(), "admin token file (generated at first start)");
    }
    // One instance on the embedded store: global and local limits are the same thing.
    let global = match (&redis, config.rate_limit.scope) {
        (Some(redis), Scope::Global) => {
            Some(GlobalLimiter::start(redis.connection(), redis.prefix()))
        }
        _ => None,
    };
    let gateway = Arc::new(
        Gateway::new(Arc::clone(&config), store, global).map_err(ServeError::Unsupported)?,
    );
    let changes = redis.map(|redis| {
        let gw = Arc::clone(&gateway);
        tokio::spawn(async move {
            redis
                .follow_changes(|hash| gw.cache.invalidate(&hash), || gw.cache.expire_all())
                .await
        })
    });
    let admin = Arc::new(Admin::new(Arc::clone(&gateway), token));
    let (stop_tx, stop_rx) = watch::channel(false);

    let data_addr = listeners.data.local_addr().ok();
    let admin_addr = listeners.admin.local_addr().ok();
    tracing::info!(addr = ?data_addr, "data plane listening");
    tracing::info!(addr = ?admin_addr, "admin API listening");

    // Above max_header_bytes, so our own check answers 431 with problem+json.
    let max_buf_size = (config.limits.max_header_bytes + 4096).max(8192);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // Kept by our watchdog (see `watchdog`), not by a timer of hyper's per request.
        .header_read_timeout(None)
        .max_buf_size(max_buf_size);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(config.limits.max_header_bytes).unwrap_or(u32::MAX));

    let reload = certificates.clone().map(|certificates| {
        tokio::spawn(async move {
            let Ok(mut hangup) = signal(SignalKind::hangup()) else {
                return;
            };
            while hangup.recv().await.is_some() {
                match certificates.reload() {
                    Ok(()) => tracing::info!("SIGHUP: TLS certificate and key reloaded"),
                    Err(e) => tracing::error!(
                        cause = %error_chain(&e),
                        "SIGHUP: TLS certificate or key unusable; keeping the ones in use"
                    ),
                }
            }
        })
    });
    let gw = Arc::clone(&gateway);
    let tls = certificates.is_some();
    // The data plane's plain HTTP/1.1 requests take the server's own path; a TLS listener's
    // all go to hyper (see `http1`).
    let own_http1 = (!tls).then_some(max_buf_size);
    let data = tokio::spawn(accept_loop(
        listeners.data,
        certificates,
        own_http1,
        builder.clone(),
        config.limits.max_connections,
        gateway.metrics.connections_active.clone(),
        stop_rx.clone(),
        config.shutdown_timeout,
        config.limits.header_read_timeout,
        move |addr| {
            // Per connection, so requests count references on a value of their connection's
            // instead of one all workers share.
            let connection = Arc::new((Arc::clone(&gw), Peer::new(addr)));
            move |req| {
                let connection = Arc::clone(&connection);
                async move {
                    let (gw, peer) = &*connection;
                    gw.handle(req, peer, tls).await
                }
            }
        },
    ));
    let admin_task = tokio::spawn(accept_loop(
        listeners.admin,
        None,
        None,
        builder,
        1024,
        IntGauge::new("admin_connections", "unregistered").expect("valid gauge"),
        stop_rx.clone(),
        config.shutdown_timeout,
        config.limits.header_read_timeout,
        move |_addr| {
            let admin = Arc::clone(&admin);
            move |req| {
                let admin = Arc::clone(&admin);
                async move { admin.handle(req).await }
            }
        },
    ));
    let background = tokio::spawn(background(Arc::clone(&gateway), stop_rx));

    shutdown.await;
    tracing::info!("shutting down: no new connections, finishing requests in flight");
    let _ = stop_tx.send(true);
    let cut = data.await.unwrap_or(0);
    if cut > 0 {
        tracing::warn!(
            connections = cut,
            "shutdown_timeout passed: cut connections still open"
        );
    }
    let _ = admin_task.await;
    let _ = background.await;
    if let Some(changes) = changes {
        changes.abort();
    }
    if let Some(reload) = reload {
        reload.abort();
    }
    match gateway.usage.flush(&*gateway.store).await {
        Ok(()) => tracing::info!("usage flushed; stopped"),
        Err(e) => {
            tracing::error!(cause = %error_chain(&e), "usage could not be flushed at shutdown")
        }
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
#[error("the store did not answer a ping within {PROBE_EVERY:?}")]
struct ProbeTimedOut;

/// Resolves once the stop signal is given (at once if it already was).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

/// Flushes usage every `usage.flush_interval` and sweeps idle state, until stopped.
async fn background(gateway: Arc<Gateway>, mut stop: watch::Receiver<bool>) {
    let mut flush = tokio::time::interval(gateway.config.usage.flush_interval);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    // After a stall (the process stopped, a long flush) one sweep catches up; tokio's default
    // would run every missed one back to back, each a pass over all keys in use.
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut probe = tokio::time::interval(PROBE_EVERY);
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            // While the store is down, usage waits in memory for its return.
            _ = flush.tick(), if gateway.health.is_up() => {
                if let Err(e) = gateway.usage.flush(&*gateway.store).await {
                    gateway.metrics.store_error(StoreOp::UsageFlush);
                    tracing::warn!(cause = %error_chain(&e), "usage flush failed; will retry");
                }
            }
            _ = probe.tick() => {
                match tokio::time::timeout(PROBE_EVERY, gateway.store.ping()).await {
                    Ok(Ok(())) => gateway.health.answered(),
                    Ok(Err(e)) => {
                        gateway.metrics.store_error(StoreOp::Ping);
                        gateway.health.failed(&e);
                    }
                    Err(_) => {
                        gateway.metrics.store_error(StoreOp::Ping);
                        gateway.health.failed(&ProbeTimedOut);
                    }
                }
            }
            _ = sweep.tick() => {
                // Off the event loop: a pass over the cache and limiter maps grows with the
                // keys in use (a million in the load bench), and requests should not wait it out.
                let gateway = Arc::clone(&gateway);
                let _ = tokio::task::spawn_blocking(move || gateway.sweep()).await;
            }
            _ = stopped(&mut stop) => break,
        }
    }
}

/// Accepts connections until stopped, at most `max_connections` at once; then waits up to
/// `drain` for open connections to finish. Returns how many were cut. `handler_for` makes a
/// connection's request handler from its peer address, once per connection. With `own_http1`
/// (hyper's `max_buf_size`), plain connections start on the server's own HTTP/1 path.
#[allow(clippy::too_many_arguments)]
async fn accept_loop<F, H, Fut, B>(
    listener: TcpListener,
    tls: Option<Arc<Certificates>>,
    own_http1: Option<usize>,
    builder: auto::Builder<TokioExecutor>,
    max_connections: usize,
    active: IntGauge,
    mut stop: watch::Receiver<bool>,
    drain: Duration,
    header_read_timeout: Duration,
    handler_for: F,
) -> usize
where
    F: Fn(SocketAddr) -> H,
    H: Fn(Request<RequestBody>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let builder = Arc::new(builder);
    let watchdog = Watchdog::new(header_read_timeout);
    let sweeping = tokio::spawn(Arc::clone(&watchdog).run());
    let slots = Arc::new(Semaphore::new(max_connections));
    loop {
        // At the connection cap, stop accepting: new clients wait in the kernel's backlog.
        let permit = tokio::select! {
            permit = Arc::clone(&slots).acquire_owned() => permit.expect("semaphore never closed"),
            _ = stopped(&mut stop) => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut stop) => break,
        };
        let _ = stream.set_nodelay(true);
        let handler = handler_for(peer);
        let own = handler.clone();
        let watch = watchdog.watch();
        let marks = Arc::clone(&watch);
        let service = service_fn(move |req: Request<Incoming>| {
            let serving = marks.serving(req.version());
            // Boxed: a request's future is a few KB, and hyper moves what it is given.
            let response = Box::pin(handler(req.map(Either::Left)));
            async move { Ok::<_, Infallible>(response.await.map(|b| Tracked::new(b, serving))) }
        });
        let (builder, active) = (Arc::clone(&builder), active.clone());
        let tls = tls.as_ref().map(|c| TlsAcceptor::from(c.current()));
        tokio::spawn(async move {
            active.inc();
            let result = match tls {
                None => {
                    // Where the listener has it, the own path serves first; hyper takes the
                    // connection from where it stopped.
                    let served = match own_http1 {
                        Some(max_head) => http1::serve(&stream, &own, &watch, max_head).await,
                        None => Ok(Left::ToHyper(Bytes::new())),
                    };
                    match served {
                        Ok(Left::Closed) => Ok(()),
                        Ok(Left::ToHyper(read)) => {
                            let io = Rewind::new(read, TokioIo::new(stream));
                            let connection = builder.serve_connection_with_upgrades(io, service);
                            Watched::new(connection.into_owned(), watch).await
                        }
                        Err(e) => Err(e.into()),
                    }
                }
                // The handshake is bounded like the header read: a client that opens a
                // connection and sends nothing does not hold it open.
                Some(acceptor) => {
                    match tokio::time::timeout(header_read_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            let connection = builder
                                .serve_connection_with_upgrades(TokioIo::new(stream), service);
                            Watched::new(connection.into_owned(), watch).await
                        }
                        Ok(Err(e)) => Err(e.into()),
                        Err(_) => Err("TLS handshake timed out".into()),
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
            active.dec();
            drop(permit);
        });
    }
    drop(listener);
    // Connections finish what they serve and close; each gives its slot back as it ends.
    watchdog.stop_all();
    let all = u32::try_from(max_connections).unwrap_or(u32::MAX);
    let cut = match tokio::time::timeout(drain, slots.acquire_many(all)).await {
        Ok(_) => 0,
        Err(_) => usize::try_from(active.get()).unwrap_or(0),
    };
    sweeping.abort();
    cut
}
