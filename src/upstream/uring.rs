//! Sends on many sockets in one system call, through an `io_uring` of the thread's own.
//!
//! The lean pool's writer sends the heads of the requests that arrived together, each on its
//! own upstream connection. Sent one `send(2)` at a time, the first wakes an upstream that
//! shares the core, and the scheduler lets it take the core from the writer at once: it
//! answers that one request, sleeps, and the writer goes on to the next head, to be
//! interrupted again. In the load bench's layout keygate was preempted 0.40 times a request
//! that way, and the upstream woke as often. Given all the heads in one `io_uring_enter(2)`,
//! the kernel sends them all before the writer can be interrupted, and the upstream wakes
//! once for the batch: 0.035 times a request. keygate's own CPU a request fell by about a
//! tenth, the upstream's rose by less, and the shared core's busy time a request by 5%
//! (medians of 8 interleaved runs). An upstream on another machine is not woken on this
//! core, but the system calls are fewer all the same: one for a batch, not one a request.
//!
//! Each send is made with `MSG_DONTWAIT`, so the kernel completes it within the call, with
//! `EAGAIN` when the socket is full, instead of waiting for room: the call never blocks the
//! worker. Where `io_uring` is refused (a seccomp profile, `kernel.io_uring_disabled`, an old
//! kernel), [`send_each`] says so and the caller sends one by one as before.
//!
//! This is the crate's only `unsafe`: the kernel reads the bytes of a queued send through a
//! raw pointer, so they must stay put until it has. They are copied into a buffer the ring
//! owns, and every send queued is completed before [`send_each`] returns; if the ring fails
//! midway, the ring and that buffer are leaked, never freed under the kernel.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use io_uring::{IoUring, opcode, types};

/// Sends queued per system call at most; a larger batch takes more than one.
const ENTRIES: u32 = 128;

struct Ring {
    ring: IoUring,
    /// The bytes of the sends in flight, copied so that they outlive the caller's.
    bytes: Vec<u8>,
}

thread_local! {
    /// `None` where `io_uring` is unavailable, or once the thread's ring has failed.
    static RING: RefCell<Option<Ring>> = RefCell::new(
        IoUring::new(ENTRIES).ok().map(|ring| Ring { ring, bytes: Vec::new() })
    );
}

/// Whether this thread has a ring: where it has not, a batch is not worth gathering for it.
pub(super) fn available() -> bool {
    RING.with_borrow(Option::is_some)
}

/// Sends each `(socket, bytes)` without waiting for room, in as few system calls as
/// `io_uring` allows, and appends the outcome of each to `results`, in order: the count of
/// bytes sent (possibly fewer than given), or the error. `WouldBlock` means not sent: the
/// socket was full, or the ring failed before the send was made. `false`, with `results`
/// untouched, when this thread has no ring.
pub(super) fn send_each(
    sends: &[(BorrowedFd<'_>, &[u8])],
    results: &mut Vec<io::Result<usize>>,
) -> bool {
    RING.with_borrow_mut(|slot| {
        let Some(ring) = slot.as_mut() else {
            return false;
        };
        let first = results.len();
        results.resize_with(first + sends.len(), not_sent);
        let chunks = sends.chunks(ENTRIES as usize);
        for (chunk, outcomes) in chunks.zip(results[first..].chunks_mut(ENTRIES as usize)) {
            if !ring.send(chunk, outcomes) {
                // What was queued may still be read by the kernel: nothing of it is freed.
                std::mem::forget(slot.take());
                break;
            }
        }
        true
    })
}

fn not_sent() -> io::Result<usize> {
    Err(io::ErrorKind::WouldBlock.into())
}

impl Ring {
    /// Queues `chunk`, submits it, and waits for every completion into `outcomes`; `false`
    /// if the ring failed before all came. A send queued but not known to be completed is
    /// an error other than `WouldBlock`: it may have gone out, and must not be sent again.
    fn send(
        &mut self,
        chunk: &[(BorrowedFd<'_>, &[u8])],
        outcomes: &mut [io::Result<usize>],
    ) -> bool {
        self.bytes.clear();
        for (_, bytes) in chunk {
            self.bytes.extend_from_slice(bytes);
        }
        let mut start = 0;
        {
            let mut queue = self.ring.submission();
            for (i, (socket, bytes)) in chunk.iter().enumerate() {
                let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
                let entry = opcode::Send::new(
                    types::Fd(socket.as_raw_fd()),
                    self.bytes[start..].as_ptr(),
                    len,
                )
                .flags(libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
                .build()
                .user_data(i as u64);
                start += bytes.len();
                outcomes[i] = Err(io::Error::other("io_uring failed with the send queued"));
                // SAFETY: the entry points into `self.bytes`, which is not touched again
                // until every entry queued here has completed (below), or, if the ring
                // fails first, is leaked with the ring (`send_each`). The socket is open for
                // the whole call (`BorrowedFd`). The queue has room: it holds `ENTRIES`, the
                // chunk is at most that, and the previous chunk's entries were all consumed.
                #[allow(unsafe_code)]
                let pushed = unsafe { queue.push(&entry) };
                if pushed.is_err() {
                    return false;
                }
            }
        }
        let mut completed = 0;
        while completed < chunk.len() {
            match self.ring.submit_and_wait(chunk.len() - completed) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
            for done in self.ring.completion() {
                let outcome = usize::try_from(done.user_data())
                    .ok()
                    .and_then(|i| outcomes.get_mut(i));
                if let Some(outcome) = outcome {
                    let code = done.result();
                    *outcome =
                        usize::try_from(code).map_err(|_| io::Error::from_raw_os_error(-code));
                    completed += 1;
                }
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    /// Whether this kernel lets a process use `io_uring` (else the tests have nothing to test).
    fn ring_here() -> bool {
        let allowed = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
            .is_ok_and(|v| v.trim() == "0");
        let has = super::available();
        assert!(
            has || !allowed,
            "io_uring is allowed here, yet no ring could be made"
        );
        has
    }

    fn connected() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        (client, server)
    }

    #[test]
    fn each_socket_receives_its_own_bytes() {
        if !ring_here() {
            return;
        }
        let pairs: Vec<_> = (0..3).map(|_| connected()).collect();
        let bytes: Vec<Vec<u8>> = (0..3)
            .map(|i| format!("GET /{i} HTTP/1.1\r\n\r\n").into_bytes())
            .collect();
        let sends: Vec<_> = pairs
            .iter()
            .zip(&bytes)
            .map(|((client, _), b)| (std::os::fd::AsFd::as_fd(client), b.as_slice()))
            .collect();
        let mut results = Vec::new();
        assert!(send_each(&sends, &mut results));
        for (i, ((_, server), b)) in pairs.iter().zip(&bytes).enumerate() {
            assert_eq!(*results[i].as_ref().unwrap(), b.len());
            let mut got = vec![0; b.len()];
            (&*server).read_exact(&mut got).unwrap();
            assert_eq!(got, *b, "socket {i}");
        }
    }

    #[test]
    fn a_full_socket_answers_would_block_and_the_others_are_sent() {
        if !ring_here() {
            return;
        }
        let (full, _peer) = connected();
        full.set_nonblocking(true).unwrap();
        let chunk = vec![b'x'; 64 * 1024];
        while (&full).write(&chunk).is_ok() {}
        let (open, server) = connected();
        let sends = [
            (std::os::fd::AsFd::as_fd(&full), b"more".as_slice()),
            (std::os::fd::AsFd::as_fd(&open), b"sent".as_slice()),
        ];
        let mut results = Vec::new();
        // Returns at all: a full socket does not make the worker wait for room.
        assert!(send_each(&sends, &mut results));
        assert_eq!(
            results[0].as_ref().unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        assert_eq!(*results[1].as_ref().unwrap(), 4);
        let mut got = [0; 4];
        (&server).read_exact(&mut got).unwrap();
        assert_eq!(&got, b"sent");
    }

    #[test]
    fn a_batch_larger_than_the_ring_is_sent_whole() {
        if !ring_here() {
            return;
        }
        let pairs: Vec<_> = (0..ENTRIES as usize + 5).map(|_| connected()).collect();
        let sends: Vec<_> = pairs
            .iter()
            .map(|(client, _)| (std::os::fd::AsFd::as_fd(client), b"ping".as_slice()))
            .collect();
        let mut results = Vec::new();
        assert!(send_each(&sends, &mut results));
        assert_eq!(results.len(), pairs.len());
        for ((_, server), result) in pairs.iter().zip(&results) {
            assert_eq!(*result.as_ref().unwrap(), 4);
            let mut got = [0; 4];
            (&*server).read_exact(&mut got).unwrap();
            assert_eq!(&got, b"ping");
        }
    }
}
