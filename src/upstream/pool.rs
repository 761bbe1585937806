//! A route's keep-alive connections to its upstream, for the requests the lean exchange does
//! not take (a body, a WebSocket upgrade, an `https` upstream: see [`super::lean`]).
//!
//! hyper's HTTP/1 client connections kept on a stack: a request takes the most recently used
//! one, and its response body gives it back when it has been read to the end. Compared with
//! hyper-util's pooled client this costs one uncontended lock per take and per return, and no
//! task per request to watch the connection become idle again. Measured with
//! `benches/load.rs`, the gain is within that benchmark's noise (0.78x → 0.81x nginx); what
//! remains is hyper's own per-request cost.

use std::error::Error as StdError;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper::{Request, Response, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use tower_service::Service;

/// Why a request could not be sent upstream.
pub(crate) type UpstreamError = Box<dyn StdError + Send + Sync>;

/// How long an idle connection is kept; the upstream may close it sooner, which is noticed.
pub(super) const IDLE_FOR: Duration = Duration::from_secs(90);

/// Idle connections kept per route; more are closed when they come back.
pub(super) const MAX_IDLE: usize = 1024;

#[derive(Debug)]
struct Idle<B> {
    sender: http1::SendRequest<B>,
    since: Instant,
}

/// The connections of one route's upstream.
#[derive(Debug)]
pub(crate) struct Pool<B = crate::gateway::RequestBody> {
    connector: HttpsConnector<HttpConnector>,
    /// `scheme://authority/`: what the connector dials (and names in TLS SNI).
    target: Uri,
    idle: Mutex<Vec<Idle<B>>>,
}

impl<B> Pool<B>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<UpstreamError>,
{
    pub(crate) fn new(connector: HttpsConnector<HttpConnector>, target: Uri) -> Pool<B> {
        Pool {
            connector,
            target,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// Sends one request (origin-form target, `Host` set) on an idle connection, or on a new
    /// one. A request an idle connection could not take (the upstream closed it meanwhile) is
    /// sent again on another: hyper hands back a request it has not begun to write.
    ///
    /// An `async` block using the request it captured, not an `async fn`: that one kept the
    /// request twice in its state, as the argument and as the variable, 264 bytes more in the
    /// future of every request.
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn stores its arguments twice"
    )]
    pub(crate) fn send(
        self: &Arc<Self>,
        mut req: Request<B>,
    ) -> impl Future<Output = Result<Response<PooledBody<B>>, UpstreamError>> + '_ {
        async move {
            while let Some(mut sender) = self.take() {
                // A connection comes back when its last response body ended, which may be
                // just before hyper's connection task has noticed; `ready` waits for that.
                if sender.ready().await.is_err() {
                    continue;
                }
                match sender.try_send_request(req).await {
                    Ok(response) => return Ok(self.pooled(response, sender)),
                    Err(mut e) => match e.take_message() {
                        Some(unsent) => req = unsent,
                        None => return Err(e.into_error().into()),
                    },
                }
            }
            // Boxed: connecting is rare, and its future would make every request's future
            // larger.
            let mut sender = Box::pin(self.connect()).await?;
            let response = sender.send_request(req).await?;
            Ok(self.pooled(response, sender))
        }
    }

    async fn connect(&self) -> Result<http1::SendRequest<B>, UpstreamError> {
        let io = self.connector.clone().call(self.target.clone()).await?;
        let (sender, connection) = http1::Builder::new().handshake(io).await?;
        tokio::spawn(async move {
            // With upgrades: a WebSocket handshake's connection carries the tunnel afterwards.
            if let Err(e) = connection.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }

    fn pooled(
        self: &Arc<Self>,
        response: Response<Incoming>,
        sender: http1::SendRequest<B>,
    ) -> Response<PooledBody<B>> {
        // An upgraded connection belongs to its tunnel from now on.
        let back = (response.status() != hyper::StatusCode::SWITCHING_PROTOCOLS)
            .then(|| (sender, Arc::clone(self)));
        response.map(|inner| PooledBody { inner, back })
    }
}

impl<B> Pool<B> {
    fn take(&self) -> Option<http1::SendRequest<B>> {
        let mut idle = crate::lock(&self.idle);
        while let Some(Idle { sender, since }) = idle.pop() {
            if !sender.is_closed() && since.elapsed() < IDLE_FOR {
                return Some(sender);
            }
        }
        None
    }

    fn give_back(&self, sender: http1::SendRequest<B>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = crate::lock(&self.idle);
        if idle.len() < MAX_IDLE {
            idle.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    /// Closes connections idle for too long or closed by the upstream.
    pub(crate) fn sweep(&self) {
        let mut idle = crate::lock(&self.idle);
        idle.retain(|i| !i.sender.is_closed() && i.since.elapsed() < IDLE_FOR);
    }

    #[cfg(test)]
    fn idle_count(&self) -> usize {
        self.idle.lock().unwrap().len()
    }
}

/// An upstream response body that returns its connection to the pool once read to the end.
/// Dropped before the end (the client went away), the connection is closed with it.
#[derive(Debug)]
pub(crate) struct PooledBody<B = crate::gateway::RequestBody> {
    inner: Incoming,
    back: Option<(http1::SendRequest<B>, Arc<Pool<B>>)>,
}

impl<B> PooledBody<B> {
    fn release(&mut self) {
        if let Some((sender, pool)) = self.back.take() {
            pool.give_back(sender);
        }
    }
}

impl<B> Body for PooledBody<B>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<UpstreamError>,
{
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &frame {
            None => self.release(),
            Some(Ok(_)) if self.inner.is_end_stream() => self.release(),
            Some(Ok(_)) => {}
            // A broken body leaves the connection in no state to carry another request.
            Some(Err(_)) => self.back = None,
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for PooledBody<B> {
    fn drop(&mut self) {
        // An empty body (HEAD, 204, 304, `Content-Length: 0`) is never polled.
        if self.inner.is_end_stream() {
            self.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Empty, Full};
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A real upstream answering `ok`, counting its connections; `keep_alive: false` closes
    /// each after one answer.
    async fn upstream(keep_alive: bool) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&connections);
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                counted.fetch_add(1, Ordering::SeqCst);
                let service = hyper::service::service_fn(|_req| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .keep_alive(keep_alive)
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
                );
            }
        });
        (addr, connections)
    }

    async fn get(pool: &Arc<Pool<Empty<Bytes>>>, addr: std::net::SocketAddr) -> String {
        let req = Request::builder()
            .uri("/")
            .header(hyper::header::HOST, addr.to_string())
            .body(Empty::new())
            .unwrap();
        let response = pool.send(req).await.unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    fn pool(addr: std::net::SocketAddr) -> Arc<Pool<Empty<Bytes>>> {
        let tls = crate::tls::client_config(None).unwrap();
        let target = format!("http://{addr}/").parse().unwrap();
        Arc::new(Pool::new(super::super::connector(tls), target))
    }

    #[tokio::test]
    async fn a_connection_is_reused_once_its_body_has_been_read() {
        let (addr, connections) = upstream(true).await;
        let pool = pool(addr);
        for _ in 0..5 {
            assert_eq!(get(&pool, addr).await, "ok");
        }
        assert_eq!(connections.load(Ordering::SeqCst), 1);
        assert_eq!(pool.idle_count(), 1);
    }

    #[tokio::test]
    async fn connections_the_upstream_closes_are_replaced_without_losing_a_request() {
        let (addr, connections) = upstream(false).await;
        let pool = pool(addr);
        for _ in 0..5 {
            assert_eq!(get(&pool, addr).await, "ok");
        }
        assert_eq!(connections.load(Ordering::SeqCst), 5);
    }
}
