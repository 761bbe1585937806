//! The exchange most requests make with a plain-HTTP upstream, done in the request's own task.
//!
//! hyper's HTTP/1 client runs each connection as a task of its own: a request goes to it
//! through a channel, the response comes back through another, and the body through a third,
//! each a wake-up and a poll of one task or the other. Under callgrind that was 14,000 of the
//! 43,000 instructions keygate's worker spends on a proxied request; hyper parsing the
//! response head was 4,600 of them, the rest was the handing back and forth.
//!
//! A request without a body to an `http://` upstream (nearly every GET, HEAD and DELETE) is
//! sent here instead: its head goes out on a kept-alive connection, the request's task reads
//! the answer's head (parsed by `httparse`, as hyper does), and the body, when it came with
//! the head, goes back as it is. Anything else (a request body, a WebSocket upgrade, `https`)
//! goes through hyper's client ([`super::Pool`]).
//!
//! The head is written after the other tasks ready at the time have run, so that the heads of
//! requests that arrived together go out together (see [`LeanPool::send`]). On a single-thread
//! runtime (`workers: 1`) the pool's writer task writes them all, in one system call where
//! the kernel allows it ([`super::uring`]), and a request's task next runs when its answer
//! arrives. Letting each task run again to write its own head cost 1,800 of 35,300
//! instructions a request (callgrind): hyper's dispatcher and every future of the request
//! polled once more.
//!
//! The response body is framed as RFC 9112 §6.3 says: none for HEAD, 1xx, 204 and 304;
//! chunked; `Content-Length`; else until the upstream closes. A connection is used again
//! only after a whole response, with neither side having said `close`. A kept connection the
//! upstream closed meanwhile is noticed when the next request finds nothing to read; an
//! idempotent request is then sent again on another connection, as nginx does.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker, ready};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use hyper::body::{Body, Frame, SizeHint};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::request::Parts;
use hyper::{Method, Response, StatusCode, Uri};
use tokio::net::TcpStream;

use super::Rewrite;
use super::pool::{IDLE_FOR, MAX_IDLE, UpstreamError};

/// How long connecting may take, as for hyper's connector.
const CONNECT_TIMEOUT: Duration = super::CONNECT_TIMEOUT;

/// A response head larger than this is refused (nginx's `proxy_buffer_size` is 4-8 KiB).
const MAX_HEAD: usize = 64 * 1024;

/// Headers a response head may have.
const MAX_HEADERS: usize = 100;

/// What a read asks for at least.
const READ_CHUNK: usize = 8 * 1024;

/// Why an upstream's answer could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LeanError {
    #[error("cannot connect to the upstream {authority}")]
    Connect {
        authority: String,
        #[source]
        source: io::Error,
    },
    #[error("connecting to the upstream {0} timed out")]
    ConnectTimeout(String),
    #[error("the upstream connection failed")]
    Io(#[from] io::Error),
    #[error("the upstream closed the connection before a complete response")]
    Closed,
    #[error("the upstream's response head is malformed: {0}")]
    Malformed(httparse::Error),
    #[error("the upstream's response head is over {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("the upstream answered 101 Switching Protocols to a request that asked for none")]
    UnaskedUpgrade,
    #[error("the upstream's Content-Length is not one number")]
    BadContentLength,
    #[error("the upstream's chunked body is malformed")]
    BadChunk,
}

/// One kept-alive connection: the socket and the request head going out on it (shared with
/// the pool's writer), what was read past the last response, and the header names of the
/// last response.
#[derive(Debug)]
struct Conn {
    io: Arc<Io>,
    read: BytesMut,
    names: Names,
}

/// A connection's socket, and its request head until written.
#[derive(Debug)]
struct Io {
    stream: TcpStream,
    out: Mutex<Outgoing>,
}

#[derive(Debug)]
struct Outgoing {
    head: Vec<u8>,
    /// How much of `head` has been written.
    written: usize,
    state: Sending,
    /// The request's task, woken when the writer hands the head back or fails, and when
    /// the socket was found readable before the head went out.
    task: Option<Waker>,
    wake_when_written: bool,
}

#[derive(Debug)]
enum Sending {
    /// With the pool's writer.
    Queued,
    /// The request's task writes it (the rest of it, after `written`).
    ByTask,
    Written,
    Failed(io::Error),
}

impl Io {
    /// Writes what is left of the head without waiting; `Ok(false)` when the socket is full.
    fn write_some(&self, out: &mut Outgoing) -> io::Result<bool> {
        while out.written < out.head.len() {
            match self.stream.try_write(&out.head[out.written..]) {
                Ok(n) => out.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Resolves once the head is written, by the pool's writer or by this task.
    fn poll_sent(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut out = crate::lock(&self.out);
        loop {
            match &mut out.state {
                Sending::Written => return Poll::Ready(Ok(())),
                Sending::Failed(e) => {
                    return Poll::Ready(Err(std::mem::replace(e, io::ErrorKind::Other.into())));
                }
                Sending::ByTask => {
                    if self.write_some(&mut out)? {
                        out.state = Sending::Written;
                        return Poll::Ready(Ok(()));
                    }
                    ready!(self.stream.poll_write_ready(cx))?;
                }
                Sending::Queued => {
                    if !out.task.as_ref().is_some_and(|t| t.will_wake(cx.waker())) {
                        out.task = Some(cx.waker().clone());
                    }
                    // The answer's arrival is the wake-up: the writer wakes this task only
                    // when it cannot write, or when the socket had something to read already.
                    if self.stream.poll_read_ready(cx).is_ready() {
                        out.wake_when_written = true;
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    /// The pool's writer's part: writes the head if it still waits, else hands it back.
    fn flush(&self) {
        let mut out = crate::lock(&self.out);
        if !matches!(out.state, Sending::Queued) {
            return;
        }
        let written = self.write_some(&mut out);
        settle(out, written);
    }
}

/// Records the writer's attempt at a queued head (`Ok(true)`: all of it written, `Ok(false)`:
/// the socket was full) and wakes the request's task when it is now its turn.
fn settle(mut out: MutexGuard<'_, Outgoing>, written: io::Result<bool>) {
    let (state, wake) = match written {
        Ok(true) => (Sending::Written, out.wake_when_written),
        Ok(false) => (Sending::ByTask, true),
        Err(e) => (Sending::Failed(e), true),
    };
    out.state = state;
    // Not kept once written: a waker holds its task, and the connection outlives it.
    let task = out.task.take();
    drop(out);
    if wake && let Some(task) = task {
        task.wake();
    }
}

/// Writes the heads of a batch: in one system call where the thread has an `io_uring`
/// (see [`super::uring`] for why), else one by one.
fn flush_all(batch: &[Arc<Io>]) {
    #[cfg(target_os = "linux")]
    if batch.len() > 1 && super::uring::available() && flush_together(batch) {
        return;
    }
    for io in batch {
        io.flush();
    }
}

#[cfg(target_os = "linux")]
fn flush_together(batch: &[Arc<Io>]) -> bool {
    use std::os::fd::AsFd;
    let queued: Vec<(&Arc<Io>, MutexGuard<'_, Outgoing>)> = batch
        .iter()
        .map(|io| (io, crate::lock(&io.out)))
        .filter(|(_, out)| matches!(out.state, Sending::Queued))
        .collect();
    let sends: Vec<_> = queued
        .iter()
        .map(|(io, out)| (io.stream.as_fd(), &out.head[out.written..]))
        .collect();
    let mut results = Vec::with_capacity(sends.len());
    if !super::uring::send_each(&sends, &mut results) {
        return false;
    }
    drop(sends);
    for ((_, mut out), result) in queued.into_iter().zip(results) {
        let written = match result {
            Ok(n) => {
                out.written += n;
                // A part sent: the task writes the rest when the socket has room.
                Ok(out.written == out.head.len())
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(e),
        };
        settle(out, written);
    }
    true
}

impl Conn {
    /// Whether an idle connection has nothing to read: neither bytes the upstream sent unasked
    /// (a 408 before closing) nor its close. Those would be taken for the next request's
    /// answer. Costs no system call unless the socket has been seen readable since its last
    /// answer was read, as nginx checks its cached upstream connections.
    fn is_quiet(&mut self) -> bool {
        let mut probe = [0u8; 1];
        matches!(self.io.stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Reads more into `read`; `Ok(0)` when the upstream has closed.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.read.reserve(READ_CHUNK);
        let stream = &self.io.stream;
        loop {
            ready!(stream.poll_read_ready(cx))?;
            // A read that drains the socket clears its readiness (one system call a
            // response less: `is_quiet`, when the connection is next taken, costs none).
            match crate::socket::try_read_draining(stream, &mut self.read) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                done => return Poll::Ready(done),
            }
        }
    }
}

#[derive(Debug)]
struct Idle {
    conn: Conn,
    since: Instant,
}

/// The kept-alive connections of one `http://` route.
#[derive(Debug)]
pub(crate) struct LeanPool {
    /// `host:port`, as connected to.
    authority: String,
    idle: Mutex<Vec<Idle>>,
    /// Request heads for the writer, when one runs (see [`LeanPool::send`]).
    outbox: Option<Mutex<Outbox>>,
}

/// Heads waiting for the pool's writer, and the writer's task while it waits for them.
#[derive(Debug, Default)]
struct Outbox {
    queued: Vec<Arc<Io>>,
    writer: Option<Waker>,
    started: bool,
}

/// Whether a request goes through [`LeanPool::send`]: it has no body and asks for no upgrade.
pub(crate) fn takes(parts: &Parts, body_is_empty: bool) -> bool {
    body_is_empty && parts.method != Method::CONNECT && !parts.headers.contains_key(header::UPGRADE)
}

impl LeanPool {
    /// The pool of an `http://` upstream; `None` for other schemes.
    pub(crate) fn new(upstream: &Uri) -> Option<LeanPool> {
        if upstream.scheme_str() != Some("http") {
            return None;
        }
        let host = upstream.host()?;
        let port = upstream.port_u16().unwrap_or(80);
        // On a single-thread runtime (`workers: 1`), the heads of the requests that arrived
        // together are written by one task after them; see `send`.
        let single_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread);
        Some(LeanPool {
            authority: format!("{host}:{port}"),
            idle: Mutex::new(Vec::new()),
            outbox: single_thread.then(Mutex::default),
        })
    }

    /// Sends a request without a body (origin-form target), its headers as `rewrite` makes
    /// them, and reads the head of its answer. See the module documentation.
    /// `now` is the clock as the caller read it just before.
    ///
    /// The answer's headers go into the request's map, emptied once the answer's head has come
    /// whole (a request is only sent again before): no map is made for the answer nor the
    /// request's freed, two allocations and two frees a request. hyper keeps the map the client
    /// is answered with to read the connection's next request head into, so one map serves
    /// request after request.
    pub(crate) async fn send(
        self: &Arc<Self>,
        parts: &mut Parts,
        rewrite: &Rewrite<'_>,
        now: Instant,
    ) -> Result<Response<LeanBody>, UpstreamError> {
        let retry = parts.method.is_idempotent();
        loop {
            let (mut conn, reused) = match self.take(now) {
                Some(conn) => (conn, true),
                None => (self.connect().await?, false),
            };
            // The head is written once the tasks already ready have run, as it was when
            // hyper's connection task wrote it: the writes of requests that arrived together
            // go out together, and an upstream on the same core wakes once for them, not once
            // for each. Writing at once woke it 0.85 times a request instead of 0.45, and the
            // switches cost more than the task handing saved (load bench layout, 5 s runs).
            // On one thread, the pool's writer task writes them; this task next runs when the
            // answer arrives. Otherwise this task lets the others run first, then writes.
            {
                let mut out = crate::lock(&conn.io.out);
                encode(&mut out.head, parts, rewrite);
                out.written = 0;
                out.wake_when_written = false;
                out.state = if self.outbox.is_some() {
                    Sending::Queued
                } else {
                    Sending::ByTask
                };
            }
            match &self.outbox {
                Some(outbox) => self.queue(outbox, &conn.io),
                None => YieldOnce(false).await,
            }
            match exchange(&mut conn, &mut parts.headers).await {
                Ok(head) => {
                    let headers = std::mem::take(&mut parts.headers);
                    return Ok(self.respond(conn, head, headers, &parts.method, now)?);
                }
                // Nothing came back on a kept connection: the upstream had closed it.
                Err(Exchange::Stale(_)) if reused && retry => continue,
                Err(Exchange::Stale(e) | Exchange::Failed(e)) => return Err(e.into()),
            }
        }
    }

    async fn connect(&self) -> Result<Conn, LeanError> {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&*self.authority))
            .await
            .map_err(|_| LeanError::ConnectTimeout(self.authority.clone()))?
            .map_err(|source| LeanError::Connect {
                authority: self.authority.clone(),
                source,
            })?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            io: Arc::new(Io {
                stream,
                out: Mutex::new(Outgoing {
                    head: Vec::with_capacity(512),
                    written: 0,
                    state: Sending::Written,
                    task: None,
                    wake_when_written: false,
                }),
            }),
            read: BytesMut::with_capacity(READ_CHUNK),
            names: Names::default(),
        })
    }

    /// Gives a head to the pool's writer, started with the first.
    fn queue(self: &Arc<Self>, outbox: &Mutex<Outbox>, io: &Arc<Io>) {
        let (writer, start) = {
            let mut outbox = crate::lock(outbox);
            outbox.queued.push(Arc::clone(io));
            (
                outbox.writer.take(),
                !std::mem::replace(&mut outbox.started, true),
            )
        };
        if let Some(writer) = writer {
            writer.wake();
        }
        if start {
            tokio::spawn(write_queued(Arc::downgrade(self)));
        }
    }

    fn take(&self, now: Instant) -> Option<Conn> {
        loop {
            let Idle { mut conn, since } = crate::lock(&self.idle).pop()?;
            if now.saturating_duration_since(since) < IDLE_FOR && conn.is_quiet() {
                return Some(conn);
            }
        }
    }

    /// Keeps a connection, idle since `since`.
    fn give_back(&self, conn: Conn, since: Instant) {
        let mut idle = crate::lock(&self.idle);
        if idle.len() < MAX_IDLE {
            idle.push(Idle { conn, since });
        }
    }

    /// Closes connections idle for too long.
    pub(crate) fn sweep(&self) {
        crate::lock(&self.idle).retain(|i| i.since.elapsed() < IDLE_FOR);
    }

    fn respond(
        self: &Arc<Self>,
        mut conn: Conn,
        head: Head,
        headers: HeaderMap,
        method: &Method,
        now: Instant,
    ) -> Result<Response<LeanBody>, LeanError> {
        let no_body = *method == Method::HEAD
            || head.status == StatusCode::NO_CONTENT
            || head.status == StatusCode::NOT_MODIFIED;
        let mut keep = head.keep_alive;
        let framing = if no_body {
            Framing::Length(0)
        } else if let Some(chunked) = head.chunked {
            // Both framings at once is how responses are smuggled: the connection goes.
            if head.length != Length::None {
                keep = false;
            }
            if chunked {
                Framing::Chunked
            } else {
                Framing::Close
            }
        } else {
            match head.length {
                Length::Is(n) => Framing::Length(n),
                Length::None => Framing::Close,
                Length::Bad => return Err(LeanError::BadContentLength),
            }
        };
        let state = match framing {
            // The whole body came with the head (most answers): the connection can go back
            // before the response is even returned.
            Framing::Length(n) if conn.read.len() as u64 >= n => {
                let body = conn.read.split_to(n as usize).freeze();
                // Bytes past the response: the upstream says more than it was asked.
                if keep && conn.read.is_empty() {
                    self.give_back(conn, now);
                }
                State::Whole(Some(body).filter(|b| !b.is_empty()))
            }
            Framing::Length(n) => State::Length {
                remaining: n,
                conn: Streaming::new(conn, keep.then(|| Arc::clone(self))),
            },
            Framing::Chunked => State::Chunked {
                chunk: Chunk::Size,
                conn: Streaming::new(conn, keep.then(|| Arc::clone(self))),
            },
            Framing::Close => State::UntilClose(Streaming::new(conn, None)),
        };
        let mut response = Response::new(LeanBody { state });
        *response.status_mut() = head.status;
        *response.headers_mut() = headers;
        Ok(response)
    }
}

enum Framing {
    Length(u64),
    Chunked,
    Close,
}

/// A response head as read: its status, and what its hop-by-hop headers and `Content-Length`
/// said (the others are in the map it was read into).
#[derive(Debug)]
struct Head {
    status: StatusCode,
    keep_alive: bool,
    chunked: Option<bool>,
    length: Length,
}

enum Exchange {
    /// Failed before any byte of an answer: on a kept connection, the upstream had closed it.
    Stale(LeanError),
    Failed(LeanError),
}

/// Lets the tasks already ready run first: wakes itself once, which puts the task at the back
/// of the run queue. (`tokio::task::yield_now` waits for the I/O driver to be polled too: one
/// more `epoll_wait` for every three requests in the load bench.)
struct YieldOnce(bool);

impl Future for YieldOnce {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            return Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// The pool's writer: writes the heads queued while the tasks ready before it ran, then waits
/// for more. Ends with its pool.
async fn write_queued(pool: std::sync::Weak<LeanPool>) {
    let mut batch = Vec::new();
    loop {
        let more = std::future::poll_fn(|cx| {
            let Some(pool) = pool.upgrade() else {
                return Poll::Ready(false);
            };
            let Some(outbox) = &pool.outbox else {
                return Poll::Ready(false);
            };
            let mut outbox = crate::lock(outbox);
            if outbox.queued.is_empty() {
                outbox.writer = Some(cx.waker().clone());
                return Poll::Pending;
            }
            std::mem::swap(&mut outbox.queued, &mut batch);
            Poll::Ready(true)
        })
        .await;
        if !more {
            return;
        }
        flush_all(&batch);
        batch.clear();
    }
}

/// Waits for the request head to be written, then reads until a final response head (1xx
/// answers skipped), its headers into `headers`.
async fn exchange(conn: &mut Conn, headers: &mut HeaderMap) -> Result<Head, Exchange> {
    conn.read.clear();
    std::future::poll_fn(|cx| conn.io.poll_sent(cx))
        .await
        .map_err(|e| Exchange::Stale(e.into()))?;
    let mut received = false;
    loop {
        if !conn.read.is_empty() {
            match parse_head(&mut conn.read, &mut conn.names, headers).map_err(Exchange::Failed)? {
                Parsed::Final(head) => return Ok(head),
                Parsed::Informational => continue,
                Parsed::Partial => {}
            }
            if conn.read.len() >= MAX_HEAD {
                return Err(Exchange::Failed(LeanError::HeadTooLarge));
            }
        }
        match std::future::poll_fn(|cx| conn.poll_fill(cx)).await {
            Ok(0) if received => return Err(Exchange::Failed(LeanError::Closed)),
            Ok(0) => return Err(Exchange::Stale(LeanError::Closed)),
            Ok(_) => received = true,
            Err(e) if received => return Err(Exchange::Failed(e.into())),
            Err(e) => return Err(Exchange::Stale(e.into())),
        }
    }
}

enum Parsed {
    Final(Head),
    /// A 1xx answer, taken off the buffer.
    Informational,
    Partial,
}

/// The header names of a connection's last response, in order, and where the headers of the
/// one being parsed lie. An upstream sends the same names answer after answer, spelled the
/// same: comparing a name's bytes with those at its place last time is cheaper than making the
/// name again, or than comparing it without regard to case.
#[derive(Debug, Default)]
struct Names {
    /// Each name, and its bytes as the upstream spelled it.
    last: Vec<(HeaderName, Box<[u8]>)>,
    /// Each header's name and the range of its value in the head.
    parsed: Vec<(HeaderName, usize, usize)>,
}

impl Names {
    fn name(&mut self, at: usize, raw: &[u8]) -> Result<HeaderName, LeanError> {
        if let Some((name, spelled)) = self.last.get(at)
            && **spelled == *raw
        {
            return Ok(name.clone());
        }
        let name = HeaderName::from_bytes(raw)
            .map_err(|_| LeanError::Malformed(httparse::Error::HeaderName))?;
        let entry = (name.clone(), Box::from(raw));
        if at < self.last.len() {
            self.last[at] = entry;
        } else if at == self.last.len() && at < MAX_HEADERS {
            self.last.push(entry);
        }
        Ok(name)
    }
}

/// Parses a response head at the start of `read`, taking it off when complete. Header
/// values are slices of the head's bytes, not copies, as hyper makes them.
///
/// One pass over the headers reads what frames the body and keeps the connection, and leaves
/// out of the map the hop-by-hop headers and those `Connection` names: the map is the one the
/// client gets, not searched, emptied of those and searched again afterwards.
///
/// A final head's headers replace what `map` held; until then it is left as it is.
fn parse_head(
    read: &mut BytesMut,
    names: &mut Names,
    map: &mut HeaderMap,
) -> Result<Parsed, LeanError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let len = match response.parse(read).map_err(LeanError::Malformed)? {
        httparse::Status::Complete(len) => len,
        httparse::Status::Partial => return Ok(Parsed::Partial),
    };
    let code = response.code.unwrap_or_default();
    if (100..200).contains(&code) {
        if code == 101 {
            return Err(LeanError::UnaskedUpgrade);
        }
        read.advance(len);
        return Ok(Parsed::Informational);
    }
    let status =
        StatusCode::from_u16(code).map_err(|_| LeanError::Malformed(httparse::Error::Status))?;
    let mut said = Said::default();
    // Where each header kept lies in the head, so that its value can be a slice of it.
    let base = read.as_ptr() as usize;
    names.parsed.clear();
    for (at, h) in response.headers.iter().enumerate() {
        let name = names.name(at, h.name.as_bytes())?;
        if super::is_hop_by_hop(&name) {
            said.hop_by_hop(&name, h.value);
            continue;
        }
        if name == header::CONTENT_LENGTH {
            said.content_length(h.value);
        }
        let start = h.value.as_ptr() as usize - base;
        names.parsed.push((name, start, start + h.value.len()));
    }
    let keep_alive = !said.close && (response.version != Some(0) || said.keep_alive);
    let head = read.split_to(len).freeze();
    map.clear();
    // Room for the rate-limit headers added to most answers, without growing the map.
    map.reserve(names.parsed.len() + 6);
    for (name, start, end) in names.parsed.drain(..) {
        if said.listed.contains(&name) {
            continue;
        }
        let value = HeaderValue::from_maybe_shared(head.slice(start..end))
            .map_err(|_| LeanError::Malformed(httparse::Error::HeaderValue))?;
        map.append(name, value);
    }
    Ok(Parsed::Final(Head {
        status,
        keep_alive,
        chunked: said.chunked,
        length: said.length,
    }))
}

/// What a response's headers say about its framing and its connection.
#[derive(Debug, Default)]
struct Said {
    /// `Connection` lists `close`.
    close: bool,
    /// `Connection` lists `keep-alive` (what an HTTP/1.0 answer needs to keep it).
    keep_alive: bool,
    /// Header names `Connection` lists besides: hop-by-hop for this answer.
    listed: Vec<HeaderName>,
    /// With `Transfer-Encoding`: whether its last coding is `chunked`.
    chunked: Option<bool>,
    length: Length,
}

impl Said {
    fn hop_by_hop(&mut self, name: &HeaderName, value: &[u8]) {
        if name == header::CONNECTION {
            for token in super::list_items(value) {
                if token.eq_ignore_ascii_case(b"keep-alive") {
                    self.keep_alive = true;
                } else if token.eq_ignore_ascii_case(b"close") {
                    self.close = true;
                } else {
                    self.listed.extend(super::listed_name(token));
                }
            }
        } else if name == header::TRANSFER_ENCODING {
            // The last header's last coding decides.
            let last = value.rsplit(|&b| b == b',').next().unwrap_or_default();
            self.chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        }
    }

    /// Every value, and every item of a list, must be the same number.
    fn content_length(&mut self, value: &[u8]) {
        for item in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
            let n = (!item.is_empty() && item.iter().all(u8::is_ascii_digit))
                .then(|| std::str::from_utf8(item).ok()?.parse::<u64>().ok())
                .flatten();
            self.length = match (self.length, n) {
                (Length::None, Some(n)) => Length::Is(n),
                (Length::Is(l), Some(n)) if l == n => Length::Is(n),
                _ => Length::Bad,
            };
        }
    }
}

/// A response's `Content-Length`.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
enum Length {
    #[default]
    None,
    Is(u64),
    /// Not a number, or several that differ.
    Bad,
}

/// Writes the head of a request without a body: request line, the client's headers the
/// upstream keeps, then those the gateway sets.
fn encode(out: &mut Vec<u8>, parts: &Parts, rewrite: &Rewrite<'_>) {
    out.clear();
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let kept = parts.headers.iter().filter(|(name, _)| rewrite.keeps(name));
    for (name, value) in kept.chain(rewrite.set()) {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    // A method that normally has a body says it has none, as hyper does.
    let expects_body = !matches!(
        parts.method,
        Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS | Method::TRACE
    );
    if expects_body && !parts.headers.contains_key(header::CONTENT_LENGTH) {
        out.extend_from_slice(b"content-length: 0\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// A connection a body is being read from, and the pool it goes back to when the body ends
/// (none when it is not to be used again).
#[derive(Debug)]
struct Streaming {
    conn: Option<Conn>,
    back: Option<Arc<LeanPool>>,
}

impl Streaming {
    fn new(conn: Conn, back: Option<Arc<LeanPool>>) -> Streaming {
        Streaming {
            conn: Some(conn),
            back,
        }
    }

    fn conn(&mut self) -> &mut Conn {
        self.conn
            .as_mut()
            .expect("a body being read has its connection")
    }

    /// The body ended where it should: the connection goes back, unless more was sent.
    fn finish(&mut self) {
        if let (Some(conn), Some(pool)) = (self.conn.take(), self.back.take())
            && conn.read.is_empty()
        {
            pool.give_back(conn, Instant::now());
        }
    }
}

/// Where a chunked body's reading stands (RFC 9112 §7.1).
#[derive(Debug, Clone, Copy)]
enum Chunk {
    /// Before a chunk-size line.
    Size,
    /// Within a chunk's data, this much left.
    Data(u64),
    /// After a chunk's data, before its CRLF.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one.
    Trailers,
}

#[derive(Debug)]
enum State {
    /// The whole body, or none; taken by the first poll.
    Whole(Option<Bytes>),
    Length {
        remaining: u64,
        conn: Streaming,
    },
    Chunked {
        chunk: Chunk,
        conn: Streaming,
    },
    UntilClose(Streaming),
    Done,
}

/// The body of an answer read by [`LeanPool::send`].
#[derive(Debug)]
pub(crate) struct LeanBody {
    state: State,
}

impl Body for LeanBody {
    type Data = Bytes;
    type Error = LeanError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, LeanError>>> {
        let state = &mut self.state;
        let frame = match state {
            State::Whole(body) => body.take().map(Frame::data).map(Ok),
            State::Done => None,
            State::Length { remaining, conn } => {
                let c = conn.conn();
                if c.read.is_empty() && ready!(c.poll_fill(cx))? == 0 {
                    Some(Err(LeanError::Closed))
                } else {
                    let take = (c.read.len() as u64).min(*remaining);
                    *remaining -= take;
                    let data = c.read.split_to(take as usize).freeze();
                    if *remaining == 0 {
                        conn.finish();
                    }
                    Some(Ok(Frame::data(data)))
                }
            }
            State::Chunked { chunk, conn } => match ready!(poll_chunk(chunk, conn.conn(), cx)) {
                Ok(Some(data)) => Some(Ok(Frame::data(data))),
                Ok(None) => {
                    conn.finish();
                    None
                }
                Err(e) => Some(Err(e)),
            },
            State::UntilClose(conn) => {
                let c = conn.conn();
                if c.read.is_empty() && ready!(c.poll_fill(cx))? == 0 {
                    None
                } else {
                    Some(Ok(Frame::data(c.read.split().freeze())))
                }
            }
        };
        match &frame {
            None | Some(Err(_)) => self.state = State::Done,
            Some(Ok(_)) if matches!(self.state, State::Length { remaining: 0, .. }) => {
                self.state = State::Done;
            }
            Some(Ok(_)) => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Whole(None) | State::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match &self.state {
            State::Whole(body) => SizeHint::with_exact(body.as_ref().map_or(0, |b| b.len() as u64)),
            State::Done => SizeHint::with_exact(0),
            State::Length { remaining, .. } => SizeHint::with_exact(*remaining),
            _ => SizeHint::default(),
        }
    }
}

/// The next data of a chunked body: `Some` data, `None` at its end (trailers read and
/// dropped, as hyper's client drops them when not asked for).
fn poll_chunk(
    chunk: &mut Chunk,
    conn: &mut Conn,
    cx: &mut Context<'_>,
) -> Poll<Result<Option<Bytes>, LeanError>> {
    loop {
        let progress = match *chunk {
            Chunk::Size => line(&mut conn.read)?.map(|line| {
                // `size[;extensions]`
                let size = line.split(|&b| b == b';').next().unwrap_or_default();
                let size = std::str::from_utf8(size)
                    .ok()
                    .map(str::trim)
                    .filter(|s| !s.is_empty() && s.len() <= 16)
                    .and_then(|s| u64::from_str_radix(s, 16).ok());
                match size {
                    Some(0) => *chunk = Chunk::Trailers,
                    Some(n) => *chunk = Chunk::Data(n),
                    None => return Err(LeanError::BadChunk),
                }
                Ok(None)
            }),
            Chunk::Data(left) if !conn.read.is_empty() => {
                let take = (conn.read.len() as u64).min(left);
                let data = conn.read.split_to(take as usize).freeze();
                *chunk = if take == left {
                    Chunk::DataEnd
                } else {
                    Chunk::Data(left - take)
                };
                return Poll::Ready(Ok(Some(data)));
            }
            Chunk::Data(_) => None,
            Chunk::DataEnd => line(&mut conn.read)?.map(|line| {
                if !line.is_empty() {
                    return Err(LeanError::BadChunk);
                }
                *chunk = Chunk::Size;
                Ok(None)
            }),
            Chunk::Trailers => line(&mut conn.read)?.map(|line| {
                if line.is_empty() {
                    return Ok(Some(()));
                }
                Ok(None)
            }),
        };
        match progress {
            Some(Ok(Some(()))) => return Poll::Ready(Ok(None)),
            Some(Ok(None)) => continue,
            Some(Err(e)) => return Poll::Ready(Err(e)),
            None => {
                if ready!(conn.poll_fill(cx))? == 0 {
                    return Poll::Ready(Err(LeanError::Closed));
                }
            }
        }
    }
}

/// Takes one CRLF-ended line off `read` (without its end); `None` until one is there.
fn line(read: &mut BytesMut) -> Result<Option<Bytes>, LeanError> {
    match read.windows(2).position(|w| w == b"\r\n") {
        Some(at) => {
            let line = read.split_to(at).freeze();
            read.advance(2);
            Ok(Some(line))
        }
        None if read.len() > 4096 => Err(LeanError::BadChunk),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;
    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use http_body_util::BodyExt;
    use tokio::net::TcpListener;

    /// One scripted answer: written in these pieces, a little apart; then the connection is
    /// closed when `close`.
    struct Answer {
        pieces: Vec<&'static [u8]>,
        close: bool,
    }

    fn answer(pieces: &[&'static [u8]]) -> Answer {
        Answer {
            pieces: pieces.to_vec(),
            close: false,
        }
    }

    fn closing(pieces: &[&'static [u8]]) -> Answer {
        Answer {
            pieces: pieces.to_vec(),
            close: true,
        }
    }

    /// A raw upstream giving the answers in order, whatever connection asks; it counts its
    /// connections and keeps the request heads it read.
    struct Upstream {
        addr: std::net::SocketAddr,
        connections: Arc<AtomicUsize>,
        heads: Arc<Mutex<Vec<String>>>,
    }

    async fn upstream(answers: Vec<Answer>) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let answers = Arc::new(Mutex::new(VecDeque::from(answers)));
        let (counted, kept) = (Arc::clone(&connections), Arc::clone(&heads));
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                counted.fetch_add(1, Ordering::SeqCst);
                let (answers, heads) = (Arc::clone(&answers), Arc::clone(&kept));
                tokio::spawn(async move {
                    let mut read = Vec::new();
                    loop {
                        // Only the bytes just read (and the three before) can end the head.
                        let mut searched = 0;
                        while !read[searched..].windows(4).any(|w| w == b"\r\n\r\n") {
                            searched = read.len().saturating_sub(3);
                            let mut buf = [0u8; 16 * 1024];
                            match stream.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => read.extend_from_slice(&buf[..n]),
                            }
                        }
                        let end = read.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                        let head: Vec<u8> = read.drain(..end).collect();
                        heads.lock().unwrap().push(String::from_utf8(head).unwrap());
                        let Some(answer) = answers.lock().unwrap().pop_front() else {
                            return;
                        };
                        for piece in answer.pieces {
                            stream.write_all(piece).await.unwrap();
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        if answer.close {
                            return;
                        }
                    }
                });
            }
        });
        Upstream {
            addr,
            connections,
            heads,
        }
    }

    /// A request as a client sent it: its own Host, the credential, a forged gateway header,
    /// a hop-by-hop one and one for the upstream.
    fn parts(method: Method) -> Parts {
        hyper::Request::builder()
            .method(method)
            .uri("/v1/x?q=1")
            .header(header::HOST, "gw.example")
            .header("x-api-key", "kg_secret")
            .header("x-keygate-key-id", "forged")
            .header(header::CONNECTION, "keep-alive")
            .header(header::USER_AGENT, "test")
            .body(())
            .unwrap()
            .into_parts()
            .0
    }

    static X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
    static X_KEYGATE_KEY_ID: HeaderName = HeaderName::from_static("x-keygate-key-id");
    static HOST: HeaderName = header::HOST;

    /// What the gateway does to such a request for an upstream at `addr`.
    fn rewrite(parts: &Parts, addr: std::net::SocketAddr) -> Rewrite<'static> {
        Rewrite {
            hop_by_hop: super::super::HopByHop::of(&parts.headers),
            dropped: [Some(&X_API_KEY), None],
            dropped_prefix: "x-keygate-",
            set: [
                Some((
                    &X_KEYGATE_KEY_ID,
                    Cow::Owned(HeaderValue::from_static("key_1")),
                )),
                Some((
                    &HOST,
                    Cow::Owned(HeaderValue::from_str(&addr.to_string()).unwrap()),
                )),
                None,
                None,
                None,
                None,
            ],
        }
    }

    fn pool(addr: std::net::SocketAddr) -> Arc<LeanPool> {
        Arc::new(LeanPool::new(&format!("http://{addr}").parse().unwrap()).unwrap())
    }

    async fn call(pool: &Arc<LeanPool>, method: Method) -> Result<(StatusCode, String), String> {
        let mut parts = parts(method);
        let rewrite = rewrite(&parts, pool_addr(pool));
        let response = pool
            .send(&mut parts, &rewrite, Instant::now())
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, String::from_utf8(body.to_vec()).unwrap()))
    }

    fn pool_addr(pool: &LeanPool) -> std::net::SocketAddr {
        pool.authority.parse().unwrap()
    }

    fn idle(pool: &LeanPool) -> usize {
        pool.idle.lock().unwrap().len()
    }

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

    #[tokio::test]
    async fn whole_answers_come_back_on_one_kept_connection() {
        let up = upstream(vec![answer(&[OK]), answer(&[OK]), answer(&[OK])]).await;
        let pool = pool(up.addr);
        for _ in 0..3 {
            assert_eq!(
                call(&pool, Method::GET).await.unwrap(),
                (StatusCode::OK, "ok".into())
            );
        }
        assert_eq!(up.connections.load(Ordering::SeqCst), 1);
        assert_eq!(idle(&pool), 1);
        let head = up.heads.lock().unwrap()[0].clone();
        // The client's headers the upstream keeps, then the gateway's, each once.
        assert_eq!(
            head,
            format!(
                "GET /v1/x?q=1 HTTP/1.1\r\nuser-agent: test\r\nx-keygate-key-id: key_1\r\n\
                 host: {}\r\n\r\n",
                up.addr
            )
        );
    }

    #[tokio::test]
    async fn bodies_arriving_in_pieces_are_read_whole_and_the_connection_kept() {
        let by_length: &[&'static [u8]] = &[
            b"HTTP/1.1 200 OK\r\ncontent-le",
            b"ngth: 10\r\n\r\n01234",
            b"56789",
        ];
        // Chunk extensions ignored, trailers read and dropped.
        let chunked: &[&'static [u8]] = &[
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhel",
            b"lo\r\n6;ext=1\r\n world\r\n0\r\n",
            b"x-trailer: 1\r\n\r\n",
        ];
        for (pieces, body) in [(by_length, "0123456789"), (chunked, "hello world")] {
            let up = upstream(vec![answer(pieces), answer(&[OK])]).await;
            let pool = pool(up.addr);
            assert_eq!(call(&pool, Method::GET).await.unwrap().1, body);
            assert_eq!(call(&pool, Method::GET).await.unwrap().1, "ok");
            assert_eq!(up.connections.load(Ordering::SeqCst), 1, "{body}");
        }
    }

    #[tokio::test]
    async fn a_body_without_length_is_read_until_close_and_the_connection_not_kept() {
        let up = upstream(vec![
            closing(&[b"HTTP/1.1 200 OK\r\n\r\nabc", b"def"]),
            answer(&[b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok"]),
            answer(&[OK]),
        ])
        .await;
        let pool = pool(up.addr);
        assert_eq!(call(&pool, Method::GET).await.unwrap().1, "abcdef");
        assert_eq!(idle(&pool), 0);
        // `Connection: close` from the upstream: not kept either.
        assert_eq!(call(&pool, Method::GET).await.unwrap().1, "ok");
        assert_eq!(idle(&pool), 0);
        assert_eq!(call(&pool, Method::GET).await.unwrap().1, "ok");
        assert_eq!(up.connections.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn informational_answers_are_skipped_and_head_204_and_304_have_no_body() {
        let up = upstream(vec![
            answer(&[
                b"HTTP/1.1 100 Continue\r\n\r\n",
                b"HTTP/1.1 204 No Content\r\n\r\n",
            ]),
            answer(&[b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"]),
            answer(&[b"HTTP/1.1 304 Not Modified\r\ncontent-length: 5\r\n\r\n"]),
            answer(&[OK]),
        ])
        .await;
        let pool = pool(up.addr);
        assert_eq!(
            call(&pool, Method::DELETE).await.unwrap(),
            (StatusCode::NO_CONTENT, String::new())
        );
        assert_eq!(
            call(&pool, Method::HEAD).await.unwrap(),
            (StatusCode::OK, String::new())
        );
        assert_eq!(
            call(&pool, Method::GET).await.unwrap(),
            (StatusCode::NOT_MODIFIED, String::new())
        );
        assert_eq!(call(&pool, Method::GET).await.unwrap().1, "ok");
        assert_eq!(up.connections.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_kept_connection_the_upstream_closed_is_replaced_for_idempotent_requests_only() {
        // Each answer closes its connection 20 ms later, without saying so and without
        // reading what came meanwhile.
        let up = upstream(vec![closing(&[OK]), closing(&[OK]), closing(&[OK])]).await;
        let pool = pool(up.addr);
        assert_eq!(call(&pool, Method::GET).await.unwrap().1, "ok");
        assert_eq!(idle(&pool), 1);
        // At once, before the close can be seen: the kept connection takes the GET and is
        // closed under it; the GET goes again on a new one.
        assert_eq!(call(&pool, Method::GET).await.unwrap().1, "ok");
        assert_eq!(up.connections.load(Ordering::SeqCst), 2);
        // Sent again whole: its headers were not yet given over to an answer.
        let heads = up.heads.lock().unwrap().clone();
        assert!(heads.len() >= 2, "{heads:?}");
        assert!(
            heads.iter().all(|h| h.contains("\r\nuser-agent: test\r\n")),
            "{heads:?}"
        );
        // A POST is not sent twice: the upstream might have acted on it.
        assert!(call(&pool, Method::POST).await.is_err());
        assert_eq!(up.connections.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn what_an_idle_connection_receives_unasked_is_not_taken_for_the_next_answer() {
        // After its answer, the upstream sends a 408 on the idle connection and closes it.
        let up = upstream(vec![
            closing(&[
                OK,
                b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\n\r\n",
            ]),
            answer(&[OK]),
        ])
        .await;
        let pool = pool(up.addr);
        assert_eq!(call(&pool, Method::GET).await.unwrap().1, "ok");
        tokio::time::sleep(Duration::from_millis(100)).await;
        // A POST is not sent again when an answer goes wrong: it must find a quiet connection.
        assert_eq!(
            call(&pool, Method::POST).await.unwrap(),
            (StatusCode::OK, "ok".into())
        );
        assert_eq!(up.connections.load(Ordering::SeqCst), 2);
    }

    /// On one thread the pool's writer writes the heads; on several each request's task does.
    /// A head too large for the socket at once (loopback took 3.8 MiB of 16 here) is handed
    /// back by the writer and finished by the task. Either way the upstream gets every head
    /// whole, and on the one connection.
    #[test]
    fn heads_go_out_whole_from_the_writer_or_the_task() {
        let big = "x".repeat(8 << 20);
        for threads in [1, 2] {
            let runtime = if threads == 1 {
                tokio::runtime::Builder::new_current_thread()
            } else {
                let mut b = tokio::runtime::Builder::new_multi_thread();
                b.worker_threads(threads);
                b
            }
            .enable_all()
            .build()
            .unwrap();
            // Bounded: a head handed back and never finished would wait for ever.
            let exchanges = async {
                let up = upstream(vec![answer(&[OK]), answer(&[OK]), answer(&[OK])]).await;
                let pool = pool(up.addr);
                assert_eq!(pool.outbox.is_some(), threads == 1);
                for value in ["small", big.as_str(), "small"] {
                    let mut parts = parts(Method::GET);
                    parts
                        .headers
                        .insert("x-data", HeaderValue::from_str(value).unwrap());
                    let rewrite = rewrite(&parts, up.addr);
                    let response = pool
                        .send(&mut parts, &rewrite, Instant::now())
                        .await
                        .unwrap();
                    assert_eq!(response.status(), StatusCode::OK);
                    drop(response);
                }
                let heads = up.heads.lock().unwrap().clone();
                assert_eq!(heads.len(), 3);
                assert!(heads[1].contains(&format!("\r\nx-data: {big}\r\n")));
                assert_eq!(
                    up.connections.load(Ordering::SeqCst),
                    1,
                    "{threads} threads"
                );
            };
            runtime.block_on(async {
                tokio::time::timeout(Duration::from_secs(30), exchanges)
                    .await
                    .unwrap_or_else(|_| panic!("{threads} threads: the heads never all went out"));
            });
        }
    }

    /// Requests that take kept connections at once queue their heads together, and the
    /// writer sends them in one batch (through `io_uring` where the kernel allows it). A head
    /// too large for its socket at once is finished by its task; every head arrives whole,
    /// each on its own connection, and each request gets its answer.
    #[test]
    fn heads_queued_together_go_out_whole() {
        let big = "x".repeat(8 << 20);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let up = upstream((0..6).map(|_| answer(&[OK])).collect()).await;
            let pool = pool(up.addr);
            let send = |value: &str| {
                let pool = Arc::clone(&pool);
                let mut parts = parts(Method::GET);
                parts
                    .headers
                    .insert("x-data", HeaderValue::from_str(value).unwrap());
                let rewrite_for = up.addr;
                async move {
                    let rewrite = rewrite(&parts, rewrite_for);
                    let response = pool.send(&mut parts, &rewrite, Instant::now()).await;
                    response.unwrap().status()
                }
            };
            // The first three open the connections; the next three find them kept, so their
            // heads are all queued before the writer runs.
            for values in [["a", "b", "c"], ["small", big.as_str(), "small"]] {
                let batch =
                    async { tokio::join!(send(values[0]), send(values[1]), send(values[2])) };
                let statuses = tokio::time::timeout(Duration::from_secs(30), batch)
                    .await
                    .expect("the heads never all went out");
                assert_eq!(statuses, (StatusCode::OK, StatusCode::OK, StatusCode::OK));
            }
            let heads = up.heads.lock().unwrap().clone();
            assert_eq!(heads.len(), 6);
            // Each head whole and once: its own value, ending where the head ends.
            for (value, times) in [("a", 1), ("b", 1), ("c", 1), ("small", 2), (&big, 1)] {
                let line = format!("\r\nx-data: {value}\r\n");
                let found = heads.iter().filter(|h| h.contains(&line)).count();
                assert_eq!(found, times, "x-data: {:.20}", value);
            }
            assert!(heads.iter().all(|h| h.ends_with("\r\n\r\n")));
            assert_eq!(up.connections.load(Ordering::SeqCst), 3);
        });
    }

    #[tokio::test]
    async fn a_post_without_body_says_content_length_zero() {
        let up = upstream(vec![answer(&[OK])]).await;
        let pool = pool(up.addr);
        call(&pool, Method::POST).await.unwrap();
        let head = up.heads.lock().unwrap()[0].clone();
        assert!(head.contains("\r\ncontent-length: 0\r\n"), "{head}");
    }

    #[tokio::test]
    async fn malformed_answers_are_errors() {
        for (bad, expected) in [
            (&b"HTTX/1.1 200 OK\r\n\r\n"[..], "malformed"),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 2, 3\r\n\r\nok",
                "Content-Length",
            ),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
                "Content-Length",
            ),
            (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "101"),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
                "chunked",
            ),
        ] {
            let up = upstream(vec![closing(&[bad])]).await;
            let error = call(&pool(up.addr), Method::GET).await.unwrap_err();
            assert!(error.contains(expected), "{error}");
        }
        let up = upstream(vec![closing(&[
            b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nshort",
        ])])
        .await;
        let error = call(&pool(up.addr), Method::GET).await.unwrap_err();
        assert!(error.contains("closed the connection"), "{error}");
    }

    #[tokio::test]
    async fn a_refused_connection_names_the_upstream() {
        let port = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let error = call(&pool(port), Method::GET).await.unwrap_err();
        assert!(error.contains(&port.to_string()), "{error}");
    }

    #[test]
    fn header_names_are_reused_from_the_last_answer_only_when_they_match() {
        let mut names = Names::default();
        let first = names.name(0, b"Content-Type").unwrap();
        assert_eq!(first, header::CONTENT_TYPE);
        assert_eq!(
            names.name(0, b"content-type").unwrap(),
            header::CONTENT_TYPE
        );
        assert_eq!(names.name(0, b"X-Other").unwrap().as_str(), "x-other");
        assert_eq!(names.name(0, b"X-Other").unwrap().as_str(), "x-other");
        assert_eq!(names.name(1, b"date").unwrap(), header::DATE);
        assert_eq!(names.last.len(), 2);
        assert_eq!(&*names.last[0].1, b"X-Other");
        assert!(names.name(0, b"bad name").is_err());
    }

    /// The head of `raw`, a whole response head.
    fn head(raw: &str) -> Head {
        head_and_headers(raw).0
    }

    /// The head of `raw` and its headers, read into a map that held a request's.
    fn head_and_headers(raw: &str) -> (Head, HeaderMap) {
        let mut read = BytesMut::from(raw);
        let mut map = request_headers();
        match parse_head(&mut read, &mut Names::default(), &mut map).unwrap() {
            Parsed::Final(head) => (head, map),
            _ => panic!("not a final head: {raw:?}"),
        }
    }

    /// A request's header map, as an answer's head is read into it.
    fn request_headers() -> HeaderMap {
        let mut map = HeaderMap::new();
        map.insert(&X_API_KEY, HeaderValue::from_static("kg_request_secret"));
        map
    }

    #[test]
    fn the_request_headers_stay_until_a_final_head_has_come_whole() {
        // A request sent again (its connection found closed) is written from them.
        let mut map = request_headers();
        let mut names = Names::default();
        for partial in [
            "HTTP/1.1 200 OK\r\nX-Kept: 1\r\n",
            "HTTP/1.1 100 Continue\r\n\r\n",
        ] {
            let mut read = BytesMut::from(partial);
            assert!(!matches!(
                parse_head(&mut read, &mut names, &mut map).unwrap(),
                Parsed::Final(_)
            ));
            assert_eq!(map.len(), 1, "{partial:?}");
            assert!(map.contains_key(&X_API_KEY));
        }
    }

    #[test]
    fn connection_header_decides_keep_alive_by_version() {
        let keeps = |version: &str, connection: &str| {
            let connection = match connection {
                "" => String::new(),
                value => format!("Connection: {value}\r\n"),
            };
            head(&format!("HTTP/{version} 200 OK\r\n{connection}\r\n")).keep_alive
        };
        assert!(keeps("1.1", ""));
        assert!(!keeps("1.0", ""));
        assert!(keeps("1.0", "Keep-Alive"));
        assert!(!keeps("1.1", "close"));
        assert!(!keeps("1.1", "x-private, Close"));
        assert!(keeps("1.0", "x-private, keep-alive"));
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_not_passed_on() {
        let (head, headers) = head_and_headers(
            "HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Private\r\nX-Private: 1\r\n\
             Keep-Alive: timeout=5\r\nTransfer-Encoding: gzip, chunked\r\n\
             Proxy-Connection: keep-alive\r\nX-Kept: 2\r\nX-Kept: 3\r\n\r\n",
        );
        // Only the answer's: none of the request's headers the map held.
        let names: Vec<&str> = headers.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["x-kept"]);
        assert_eq!(headers.get_all("x-kept").iter().count(), 2);
        assert!(head.keep_alive);
        assert_eq!(head.chunked, Some(true));
        assert_eq!(head.length, Length::None);
    }

    #[test]
    fn content_length_is_one_number_or_bad() {
        let length = |values: &[&str]| {
            let lines: String = values
                .iter()
                .map(|v| format!("Content-Length: {v}\r\n"))
                .collect();
            head(&format!("HTTP/1.1 200 OK\r\n{lines}\r\n")).length
        };
        assert_eq!(length(&[]), Length::None);
        assert_eq!(length(&["12"]), Length::Is(12));
        assert_eq!(length(&["12", "12, 12"]), Length::Is(12));
        assert_eq!(length(&["12", "13"]), Length::Bad);
        assert_eq!(length(&["-1"]), Length::Bad);
        assert_eq!(length(&["1,"]), Length::Bad);
        assert_eq!(length(&["99999999999999999999999"]), Length::Bad);
        assert_eq!(
            head("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n").chunked,
            Some(false)
        );
    }

    #[test]
    fn only_bodiless_requests_without_upgrade_are_taken() {
        assert!(takes(&parts(Method::GET), true));
        assert!(!takes(&parts(Method::GET), false));
        assert!(!takes(&parts(Method::CONNECT), true));
        let mut upgrade = parts(Method::GET);
        upgrade
            .headers
            .insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        assert!(!takes(&upgrade, true));
        assert!(LeanPool::new(&"https://example.com".parse().unwrap()).is_none());
        assert_eq!(
            LeanPool::new(&"http://example.com".parse().unwrap())
                .unwrap()
                .authority,
            "example.com:80"
        );
    }
}
