//! Reading a socket without the system call that only learns it is empty.

use std::io;

use bytes::BytesMut;
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Reads what `stream` has into the spare room of `read`, as [`TcpStream::try_read_buf`]
/// does, and when the read did not fill that room (the socket is drained) also clears the
/// readiness tokio holds for it, as tokio's own `poll_read` does. Without that, the next
/// read (the connection's next request, or the check that an idle upstream connection is
/// quiet) is a system call that fails with `WouldBlock`: one a request each way, measured
/// with `perf stat -e 'syscalls:sys_enter_recvfrom'` under the load bench.
///
/// `try_io` clears the readiness it saw before the read, not any that came during it, and
/// only when its closure returns `WouldBlock`: a short read returns that, its count set
/// aside. A closed state (the peer's FIN) is never cleared. `WouldBlock` here means nothing
/// was read; wait with `poll_read_ready`.
pub(crate) fn try_read_draining(stream: &TcpStream, read: &mut BytesMut) -> io::Result<usize> {
    let room = read.capacity() - read.len();
    let mut short = None;
    let result = stream.try_io(Interest::READABLE, || match stream.try_read_buf(read)? {
        n if n > 0 && n < room => {
            short = Some(n);
            Err(io::ErrorKind::WouldBlock.into())
        }
        n => Ok(n),
    });
    match short {
        Some(n) => Ok(n),
        None => result,
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;
    use std::task::Poll;

    use tokio::io::AsyncWriteExt as _;
    use tokio::net::TcpListener;

    use super::*;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let near = TcpStream::connect(listener.local_addr().unwrap());
        let (near, far) = tokio::join!(near, listener.accept());
        (near.unwrap(), far.unwrap().0)
    }

    /// Whether tokio still holds `stream` readable, asked without reading.
    async fn held_readable(stream: &TcpStream) -> bool {
        poll_fn(|cx| Poll::Ready(stream.poll_read_ready(cx).is_ready())).await
    }

    #[tokio::test]
    async fn a_read_that_drains_the_socket_clears_its_readiness_and_the_next_bytes_set_it_again() {
        let (near, mut far) = pair().await;
        far.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        near.readable().await.unwrap();
        let mut read = BytesMut::with_capacity(1024);
        assert_eq!(try_read_draining(&near, &mut read).unwrap(), 18);
        assert!(
            !held_readable(&near).await,
            "readiness kept after the socket was drained"
        );
        let nothing = try_read_draining(&near, &mut read).unwrap_err();
        assert_eq!(nothing.kind(), io::ErrorKind::WouldBlock);

        far.write_all(b"more").await.unwrap();
        near.readable().await.unwrap();
        assert_eq!(try_read_draining(&near, &mut read).unwrap(), 4);
        assert_eq!(&read[..], b"GET / HTTP/1.1\r\n\r\nmore");
    }

    #[tokio::test]
    async fn a_read_that_fills_the_room_keeps_the_readiness_and_the_close_is_still_read() {
        // The peer stays open until the socket is drained: a closed socket is held readable
        // whatever the helper clears, and would hide a readiness cleared too early.
        let (near, mut far) = pair().await;
        far.write_all(b"0123456789").await.unwrap();
        near.readable().await.unwrap();
        let mut read = BytesMut::with_capacity(4);
        let room = read.capacity();
        assert_eq!(try_read_draining(&near, &mut read).unwrap(), room);
        assert!(
            held_readable(&near).await,
            "more may be waiting after a full read"
        );
        read.reserve(64);
        assert_eq!(try_read_draining(&near, &mut read).unwrap(), 10 - room);
        assert!(
            !held_readable(&near).await,
            "readiness kept after the socket was drained"
        );
        drop(far);
        near.readable().await.unwrap();
        assert_eq!(try_read_draining(&near, &mut read).unwrap(), 0);
        assert_eq!(&read[..], b"0123456789");
    }

    #[tokio::test]
    async fn a_close_that_came_with_the_last_bytes_is_read_after_them() {
        let (near, mut far) = pair().await;
        far.write_all(b"last").await.unwrap();
        drop(far);
        near.readable().await.unwrap();
        let mut read = BytesMut::with_capacity(1024);
        assert_eq!(try_read_draining(&near, &mut read).unwrap(), 4);
        assert!(
            held_readable(&near).await,
            "the close must still wake the reader"
        );
        assert_eq!(try_read_draining(&near, &mut read).unwrap(), 0);
    }
}
