//! Where log lines go: standard error, with the per-request access lines batched.
//!
//! One `write` per access line cost about 2 µs of kernel time per request, as much as all of
//! keygate's own checks (`benches/load.rs`, `RUST_LOG=info` against `warn`). Access lines are
//! therefore gathered and written together once [`FLUSH_AT`] bytes have piled up or
//! [`FLUSH_EVERY`] has passed, as Envoy does for its file access logs and nginx with
//! `access_log … buffer= flush=`. Every other line (warnings, errors, start and stop) is
//! written at once, after whatever was pending, so the order of lines is kept. Lines still
//! pending at exit are written by [`LogGuard`]'s drop; a `SIGKILL` loses at most
//! [`FLUSH_EVERY`] of access lines.

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

mod format;
pub use format::{AccessLine, LogFormat};

/// The target of the one-line-per-request events (`gateway`).
pub const ACCESS_TARGET: &str = "keygate::access";

/// Pending access lines are written once they reach this size…
pub const FLUSH_AT: usize = 32 * 1024;

/// …or after this long.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);

/// A `MakeWriter` that batches INFO access lines (and nothing else) in front of `W`.
#[derive(Debug)]
pub struct BatchedLog<W> {
    shared: Arc<Shared<W>>,
}

impl<W> Clone for BatchedLog<W> {
    fn clone(&self) -> Self {
        BatchedLog {
            shared: Arc::clone(&self.shared),
        }
    }
}

#[derive(Debug)]
struct Shared<W> {
    state: Mutex<State<W>>,
    /// Signalled when lines become pending and when the log is closed.
    wake: Condvar,
}

#[derive(Debug)]
struct State<W> {
    out: W,
    pending: Vec<u8>,
    closed: bool,
}

impl<W: Write> State<W> {
    fn flush(&mut self) {
        if !self.pending.is_empty() {
            // Nowhere to report a failure to write the log; the lines are dropped as
            // `eprintln!` would drop them.
            let _ = self.out.write_all(&self.pending);
            let _ = self.out.flush();
            self.pending.clear();
        }
    }
}

impl<W: Write + Send + 'static> BatchedLog<W> {
    /// The writer, and the guard whose drop writes what is pending; a thread writes pending
    /// lines every [`FLUSH_EVERY`].
    pub fn new(out: W) -> (BatchedLog<W>, LogGuard) {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                out,
                pending: Vec::with_capacity(FLUSH_AT + 1024),
                closed: false,
            }),
            wake: Condvar::new(),
        });
        let flusher = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("keygate-log".into())
            .spawn(move || flusher.run())
            .ok();
        let closer = Arc::clone(&shared);
        let guard = LogGuard {
            close: Some(Box::new(move || closer.close())),
            thread,
        };
        (BatchedLog { shared }, guard)
    }
}

/// Where access lines go when they bypass `tracing`: see [`install_access`].
type AccessSink = Box<dyn Fn(&AccessLine<'_>) + Send + Sync>;

static ACCESS: OnceLock<AccessSink> = OnceLock::new();

/// Writes access lines straight into `log`, batched, in `format`, without going through
/// `tracing` ([`LogFormat::write_access`] makes the line the event would have made). They are
/// still filtered as the event would be (`RUST_LOG=keygate::access=off`). Until this is called,
/// as in tests serving in-process, access lines are `tracing` events like any other.
pub fn install_access<W: Write + Send + 'static>(format: LogFormat, log: BatchedLog<W>) {
    let _ = ACCESS.set(Box::new(move |line| {
        format::with_line(|w| {
            if format.write_access(w, line).is_ok() {
                let mut out = Line {
                    shared: &log.shared,
                    batched: true,
                };
                let _ = out.write_all(w.as_bytes());
            }
        });
    }));
}

/// Logs one access line: through the installed sink, else as a `tracing` event. The caller
/// checks first that `keygate::access` is enabled at INFO.
pub(crate) fn access(line: &AccessLine<'_>) {
    match ACCESS.get() {
        Some(write) => write(line),
        None => access_event(line),
    }
}

/// The access line as a `tracing` event; [`LogFormat::write_access`] writes the same line.
pub(crate) fn access_event(line: &AccessLine<'_>) {
    tracing::info!(
        target: "keygate::access",
        route = line.route, method = line.method, status = line.status,
        outcome = line.outcome, key_id = line.key_id, client_ip = line.client_ip,
        latency_us = line.latency_us,
        "request"
    );
}

impl<W: Write> Shared<W> {
    fn lock(&self) -> MutexGuard<'_, State<W>> {
        crate::lock(&self.state)
    }

    /// Waits for lines to become pending, lets them gather for [`FLUSH_EVERY`], writes them.
    fn run(&self) {
        let mut state = self.lock();
        loop {
            while state.pending.is_empty() && !state.closed {
                state = self.wake.wait(state).unwrap_or_else(|p| p.into_inner());
            }
            if state.closed {
                state.flush();
                return;
            }
            drop(state);
            std::thread::sleep(FLUSH_EVERY);
            state = self.lock();
            state.flush();
        }
    }

    fn close(&self) {
        let mut state = self.lock();
        state.flush();
        state.closed = true;
        self.wake.notify_all();
    }
}

/// Writes the pending access lines when dropped (keep it alive until exit).
pub struct LogGuard {
    close: Option<Box<dyn FnOnce() + Send>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for LogGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogGuard").finish_non_exhaustive()
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        if let Some(close) = self.close.take() {
            close();
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One event's line: appended to the pending ones, or written through with them.
#[derive(Debug)]
pub struct Line<'a, W> {
    shared: &'a Shared<W>,
    batched: bool,
}

impl<W: Write> Write for Line<'_, W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let mut state = self.shared.lock();
        let was_empty = state.pending.is_empty();
        state.pending.extend_from_slice(data);
        if !self.batched || state.closed || state.pending.len() >= FLUSH_AT {
            state.flush();
        } else if was_empty {
            self.shared.wake.notify_one();
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a, W: Write + 'a> MakeWriter<'a> for BatchedLog<W> {
    type Writer = Line<'a, W>;

    fn make_writer(&'a self) -> Self::Writer {
        Line {
            shared: &self.shared,
            batched: false,
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Self::Writer {
        Line {
            shared: &self.shared,
            batched: meta.target() == ACCESS_TARGET && *meta.level() == Level::INFO,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// A `Write` into a buffer the test can read.
    #[derive(Debug, Clone, Default)]
    pub(super) struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Sink {
        pub(super) fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    fn subscriber(log: BatchedLog<Sink>) -> impl tracing::Subscriber {
        tracing_subscriber::fmt()
            .with_writer(log)
            .with_ansi(false)
            .finish()
    }

    #[test]
    fn access_lines_wait_other_lines_flush_them_in_order() {
        let sink = Sink::default();
        let (log, _guard) = BatchedLog::new(sink.clone());
        tracing::subscriber::with_default(subscriber(log), || {
            tracing::info!(target: "keygate::access", n = 1, "request");
            tracing::info!(target: "keygate::access", n = 2, "request");
            assert_eq!(sink.text(), "", "access lines are batched");
            tracing::warn!("store down");
        });
        let text = sink.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].ends_with("request n=1"), "{text}");
        assert!(lines[1].ends_with("request n=2"), "{text}");
        assert!(lines[2].ends_with("store down"), "{text}");
    }

    #[test]
    fn pending_lines_are_written_within_the_interval_and_at_exit() {
        let sink = Sink::default();
        let (log, guard) = BatchedLog::new(sink.clone());
        tracing::subscriber::with_default(subscriber(log.clone()), || {
            tracing::info!(target: "keygate::access", n = 1, "request");
        });
        let started = Instant::now();
        while sink.text().is_empty() {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "a pending line was never written"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        tracing::subscriber::with_default(subscriber(log), || {
            tracing::info!(target: "keygate::access", n = 2, "request");
        });
        drop(guard);
        assert!(sink.text().ends_with("request n=2\n"), "{}", sink.text());
    }

    #[test]
    fn a_full_batch_is_written_at_once() {
        let sink = Sink::default();
        let (log, _guard) = BatchedLog::new(sink.clone());
        tracing::subscriber::with_default(subscriber(log), || {
            for n in 0..FLUSH_AT / 40 + 1 {
                tracing::info!(target: "keygate::access", n, "request");
            }
        });
        assert!(sink.text().len() >= FLUSH_AT, "{} bytes", sink.text().len());
    }
}
