//! `limits.header_read_timeout` and the graceful stop, kept for all connections of a listener
//! by one watchdog instead of futures polled with each connection.
//!
//! hyper's own `header_read_timeout` allocates, registers and drops a timer for every request
//! head, and makes the connection try one more read after each head so the timer gets polled.
//! In the load layout (8 interleaved rounds) that cost 1.6 µs of user and 1.9 µs of system CPU
//! per request, about an eighth of all keygate spends. A timer and hyper-util's graceful
//! watcher polled beside each connection cost less, but still 1,080 instructions a request
//! (callgrind): the connection's task runs three times a request, and polled both each time.
//!
//! Here a connection's requests mark it busy or waiting with two atomic updates, and its task
//! reads one atomic flag when it runs. The watchdog looks at every connection a few times per
//! timeout: one that has waited the timeout for a request head, whether idle between requests
//! or receiving one slowly, is flagged and woken, and closes as hyper would close it. It is
//! closed after waiting at least the timeout and at most a quarter of it (a second at most)
//! longer. At the stop, the watchdog flags every connection to finish what it serves and close.

use std::error::Error;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::task::AtomicWaker;
use hyper::Version;
use hyper::body::{Body, Frame, SizeHint};
use hyper_util::server::graceful::GracefulConnection;

/// What the millisecond counts are counted from.
static BASE: LazyLock<Instant> = LazyLock::new(Instant::now);

fn millis_since_base(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(*BASE).as_millis()).unwrap_or(u64::MAX)
}

/// Set on a connection that is to finish its request in flight and close.
const STOP: u8 = 1;
/// Set on a connection that waited `header_read_timeout` for a request head.
const EXPIRED: u8 = 2;

/// The connections of one listener, as their watchdog sees them.
#[derive(Debug)]
pub(super) struct Watchdog {
    timeout: Duration,
    /// Every connection since the last sweep; those that ended are dropped at the next.
    watches: Mutex<Vec<Weak<Watch>>>,
}

/// One connection's state, as its requests, its task and the watchdog see it.
#[derive(Debug)]
pub(super) struct Watch {
    /// Requests being served: while one is, the connection waits for no head.
    in_flight: AtomicU32,
    /// When the connection last began to wait for a head (its start, or the end of its last
    /// response), in milliseconds since `BASE`.
    waiting_since: AtomicU64,
    /// HTTP/2 multiplexes streams and has its own flow control; an idle HTTP/2 connection is
    /// not a half-sent head, so the watchdog leaves it alone once one has been seen.
    http2: AtomicBool,
    /// [`STOP`] and [`EXPIRED`].
    flags: AtomicU8,
    /// The connection's task, to wake when a flag is set.
    task: AtomicWaker,
}

impl Watchdog {
    pub(super) fn new(timeout: Duration) -> Arc<Watchdog> {
        Arc::new(Watchdog {
            timeout,
            watches: Mutex::new(Vec::new()),
        })
    }

    /// A new connection, waiting for its first head from now.
    pub(super) fn watch(&self) -> Arc<Watch> {
        let watch = Arc::new(Watch {
            in_flight: AtomicU32::new(0),
            waiting_since: AtomicU64::new(millis_since_base(Instant::now())),
            http2: AtomicBool::new(false),
            flags: AtomicU8::new(0),
            task: AtomicWaker::new(),
        });
        crate::lock(&self.watches).push(Arc::downgrade(&watch));
        watch
    }

    /// Flags the connections that waited the timeout for a head, until dropped.
    pub(super) async fn run(self: Arc<Self>) {
        let every = (self.timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.sweep(Instant::now());
        }
    }

    fn sweep(&self, now: Instant) {
        let now = millis_since_base(now);
        let timeout = u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX);
        crate::lock(&self.watches).retain(|watch| {
            let Some(watch) = watch.upgrade() else {
                return false;
            };
            let waiting = watch.in_flight.load(Ordering::Acquire) == 0
                && !watch.http2.load(Ordering::Relaxed);
            let since = watch.waiting_since.load(Ordering::Acquire);
            if waiting && now.saturating_sub(since) >= timeout {
                watch.flag(EXPIRED);
            }
            true
        });
    }

    /// Asks every connection to finish the request it serves and close.
    pub(super) fn stop_all(&self) {
        for watch in crate::lock(&self.watches).iter().filter_map(Weak::upgrade) {
            watch.flag(STOP);
        }
    }
}

impl Watch {
    fn flag(&self, flag: u8) {
        self.flags.fetch_or(flag, Ordering::AcqRel);
        self.task.wake();
    }

    /// Whether the connection is to close now: it waited too long for a head, or the gateway
    /// is stopping. Registers `waker` first, so a flag set after the reading wakes it.
    pub(super) fn flagged(&self, waker: &std::task::Waker) -> bool {
        self.task.register(waker);
        self.flags.load(Ordering::Acquire) != 0
    }

    /// Whether the gateway is stopping: the answer in flight is the connection's last.
    pub(super) fn stopping(&self) -> bool {
        self.flags.load(Ordering::Acquire) & STOP != 0
    }

    /// A request's head has arrived: the connection is busy until the returned guard, which
    /// goes into the response body, is dropped with it.
    pub(super) fn serving(self: &Arc<Self>, version: Version) -> Serving {
        if version == Version::HTTP_2 {
            self.http2.store(true, Ordering::Relaxed);
        }
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        Serving(Arc::clone(self))
    }
}

pin_project_lite::pin_project! {
    /// A connection under its [`Watch`]: it closes when flagged expired, and shuts down
    /// gracefully when flagged to stop.
    pub(super) struct Watched<C> {
        #[pin]
        connection: C,
        watch: Arc<Watch>,
        stopping: bool,
    }
}

impl<C> Watched<C> {
    pub(super) fn new(connection: C, watch: Arc<Watch>) -> Watched<C> {
        Watched {
            connection,
            watch,
            stopping: false,
        }
    }
}

impl<C> Future for Watched<C>
where
    C: GracefulConnection,
    C::Error: Into<Box<dyn Error + Send + Sync>>,
{
    type Output = Result<(), Box<dyn Error + Send + Sync>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        // Registered before the flags are read: a flag set after the read wakes this task.
        this.watch.task.register(cx.waker());
        let flags = this.watch.flags.load(Ordering::Acquire);
        if flags & EXPIRED != 0 {
            return Poll::Ready(Err("no request head within header_read_timeout".into()));
        }
        if flags & STOP != 0 && !*this.stopping {
            *this.stopping = true;
            this.connection.as_mut().graceful_shutdown();
        }
        this.connection.poll(cx).map_err(Into::into)
    }
}

/// Marks one request as being served, until its response body is dropped (sent or abandoned).
#[derive(Debug)]
pub(super) struct Serving(Arc<Watch>);

impl Drop for Serving {
    fn drop(&mut self) {
        let watch = &self.0;
        watch
            .waiting_since
            .store(millis_since_base(Instant::now()), Ordering::Release);
        watch.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body carrying its request's [`Serving`] mark.
#[derive(Debug)]
pub(super) struct Tracked<B> {
    inner: B,
    _serving: Serving,
}

impl<B> Tracked<B> {
    pub(super) fn new(inner: B, serving: Serving) -> Tracked<B> {
        Tracked {
            inner,
            _serving: serving,
        }
    }
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(watch: &Watch) -> u8 {
        watch.flags.load(Ordering::Acquire)
    }

    #[test]
    fn expires_only_after_waiting_the_timeout_with_nothing_in_flight() {
        let dog = Watchdog::new(Duration::from_millis(300));
        let (idle, busy) = (dog.watch(), dog.watch());
        let started = Instant::now();
        let serving = busy.serving(Version::HTTP_11);
        dog.sweep(started + Duration::from_millis(290));
        assert_eq!((flags(&idle), flags(&busy)), (0, 0));
        // Busy for longer than the timeout: a slow upstream or a long download is not cut.
        dog.sweep(started + Duration::from_millis(800));
        assert_eq!((flags(&idle), flags(&busy)), (EXPIRED, 0));
        // Its wait starts when its answer is done.
        drop(serving);
        let finished = Instant::now();
        dog.sweep(finished + Duration::from_millis(250));
        assert_eq!(flags(&busy), 0);
        dog.sweep(finished + Duration::from_millis(350));
        assert_eq!(flags(&busy), EXPIRED);
    }

    #[test]
    fn an_http2_connection_is_left_alone() {
        let dog = Watchdog::new(Duration::from_millis(100));
        let watch = dog.watch();
        drop(watch.serving(Version::HTTP_2));
        dog.sweep(Instant::now() + Duration::from_secs(1));
        assert_eq!(flags(&watch), 0);
    }

    #[test]
    fn ended_connections_are_forgotten_and_the_rest_asked_to_stop() {
        let dog = Watchdog::new(Duration::from_secs(10));
        let (ended, open) = (dog.watch(), dog.watch());
        drop(ended);
        dog.sweep(Instant::now());
        assert_eq!(crate::lock(&dog.watches).len(), 1);
        dog.stop_all();
        assert_eq!(flags(&open), STOP);
    }
}
