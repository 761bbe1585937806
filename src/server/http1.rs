//! The data plane's own path for the plain HTTP/1.1 requests nearly all traffic is: a `GET`
//! without a body, an upgrade or an `Expect`. Everything else goes to hyper's server.
//!
//! hyper's HTTP/1 server took 8,700 of the 31,200 instructions keygate spends on a proxied
//! request (callgrind, load bench): reading and parsing the head, then its dispatcher polling
//! the service, encoding the response head, polling the body and flushing, each a pass through
//! a general state machine. Here a connection's task reads a head, parses it with `httparse`
//! (as hyper does), awaits the gateway's answer in place and writes the answer's head and the
//! body that came with it in one `write(2)`.
//!
//! A connection starts here. The first request this path does not take (a body, another
//! method, HTTP/1.0, a head `httparse` refuses, the HTTP/2 preface, a head over the size
//! limit) hands the connection to hyper with the bytes read so far, and hyper serves it from
//! then on as it serves every connection: its answers to malformed requests (400, 431) and
//! its handling of bodies and upgrades are the ones the tests and the README describe.
//!
//! The response is framed as hyper frames it (RFC 9112 §6): no body for 1xx, 204 and 304;
//! the `Content-Length` the answer has, else the length of a body known whole, else chunked.
//! A `Date` is added when the answer has none. The connection is kept unless the client said
//! `close`, the gateway is stopping, or the body did not match its length.

use std::cell::RefCell;
use std::future::{Future, poll_fn};
use std::io::{self, Write as _};
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::SystemTime;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::FutureExt as _;
use http_body_util::{Either, Empty};
use hyper::body::Body;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri, Version};
use tokio::net::TcpStream;

use super::watchdog::Watch;
use crate::credential::X_API_KEY;
use crate::gateway::RequestBody;
use crate::upstream::list_items;

/// Headers a request head may have here; with more, hyper answers (431).
const MAX_HEADERS: usize = 100;

/// What a read asks room for at least.
const READ_CHUNK: usize = 8 * 1024;

/// Body data larger than this is written on its own rather than copied after the head.
const COPY_AT_MOST: usize = 16 * 1024;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How a connection left this path.
#[derive(Debug)]
pub(super) enum Left {
    /// It is done: closed by the client, cut by the watchdog, or closed after an answer.
    Closed,
    /// hyper is to serve it from here, starting with these bytes already read.
    ToHyper(Bytes),
}

/// Serves `stream`'s requests while this path takes them.
pub(super) async fn serve<H, Fut, B>(
    stream: &TcpStream,
    handler: &H,
    watch: &Arc<Watch>,
    max_head: usize,
) -> io::Result<Left>
where
    H: Fn(Request<RequestBody>) -> Fut,
    Fut: Future<Output = Response<B>>,
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    let mut read = BytesMut::new();
    let mut out = Vec::new();
    loop {
        let (request, close) = loop {
            if !read.is_empty() {
                match parse(&mut read) {
                    Parsed::Request(request, close) => break (request, close),
                    Parsed::Partial if read.len() < max_head => {}
                    Parsed::Partial | Parsed::NotHere => return Ok(Left::ToHyper(read.freeze())),
                }
            }
            if !fill(stream, &mut read, watch).await? {
                return Ok(Left::Closed);
            }
        };
        let serving = watch.serving(Version::HTTP_11);
        let response = handler(request).await;
        let close = close || watch.stopping();
        let kept = respond(stream, response, close, &mut out).await?;
        drop(serving);
        if !kept {
            return Ok(Left::Closed);
        }
    }
}

/// Reads more of the next head into `read`. `false` when the client closed, or when the
/// watchdog flagged the connection (waited too long for a head, or the gateway is stopping).
async fn fill(stream: &TcpStream, read: &mut BytesMut, watch: &Watch) -> io::Result<bool> {
    read.reserve(READ_CHUNK);
    poll_fn(|cx| {
        loop {
            // Registered before the flags are read: a flag set after the read wakes this task.
            if watch.flagged(cx.waker()) {
                return Poll::Ready(Ok(false));
            }
            // A read that drains the socket clears its readiness, so that waiting for the
            // next request costs no system call (see `try_read_draining`).
            match crate::socket::try_read_draining(stream, read) {
                Ok(0) => return Poll::Ready(Ok(false)),
                Ok(_) => return Poll::Ready(Ok(true)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
            if stream.poll_read_ready(cx)?.is_pending() {
                return Poll::Pending;
            }
        }
    })
    .await
}

#[expect(
    clippy::large_enum_variant,
    reason = "returned, never stored; boxed it would be an allocation a request"
)]
enum Parsed {
    /// A request this path serves, and whether the client asked to close after it.
    Request(Request<RequestBody>, bool),
    /// Not a whole head yet.
    Partial,
    /// A head for hyper (see the module's documentation).
    NotHere,
}

/// Takes a request head off the start of `read` when it is whole and one this path serves.
/// Header values are slices of the head's bytes, as hyper makes them.
fn parse(read: &mut BytesMut) -> Parsed {
    let bytes = read.split().freeze();
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut head = httparse::Request::new(&mut slots);
    let len = match head.parse(&bytes) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => {
            *read = BytesMut::from(bytes);
            return Parsed::Partial;
        }
        Err(_) => {
            *read = BytesMut::from(bytes);
            return Parsed::NotHere;
        }
    };
    match build(&head, &bytes) {
        Some((request, close)) => {
            if len < bytes.len() {
                // Pipelined: the next request's bytes, copied, as they share the head's buffer.
                read.extend_from_slice(&bytes[len..]);
            }
            Parsed::Request(request, close)
        }
        None => {
            *read = BytesMut::from(bytes);
            Parsed::NotHere
        }
    }
}

/// The request of a whole head, and whether it asks to close; `None` when hyper is to have it.
fn build(head: &httparse::Request<'_, '_>, bytes: &Bytes) -> Option<(Request<RequestBody>, bool)> {
    if head.method != Some("GET") || head.version != Some(1) {
        return None;
    }
    let target = head.path?;
    if !target.starts_with('/') {
        return None;
    }
    let uri = Uri::from_maybe_shared(bytes.slice_ref(target.as_bytes())).ok()?;
    let mut headers = HeaderMap::with_capacity(head.headers.len());
    let mut close = false;
    for h in head.headers.iter() {
        let name = if h.name.eq_ignore_ascii_case(X_API_KEY.as_str()) {
            X_API_KEY.clone()
        } else {
            HeaderName::from_bytes(h.name.as_bytes()).ok()?
        };
        // What frames a body or changes the protocol is hyper's to read.
        if name == header::CONTENT_LENGTH
            || name == header::TRANSFER_ENCODING
            || name == header::UPGRADE
            || name == header::EXPECT
        {
            return None;
        }
        if name == header::CONNECTION {
            if has_token(h.value, b"upgrade") {
                return None;
            }
            close |= has_token(h.value, b"close");
        }
        let value = HeaderValue::from_maybe_shared(bytes.slice_ref(h.value)).ok()?;
        headers.append(name, value);
    }
    let mut request = Request::new(Either::Right(Empty::new()));
    *request.uri_mut() = uri;
    *request.headers_mut() = headers;
    Some((request, close))
}

/// How a response's body is framed on the wire.
#[derive(Clone, Copy, PartialEq)]
enum Framing {
    /// 1xx, 204 and 304 have none.
    Bodiless,
    Length(u64),
    Chunked,
    /// A `Content-Length` that is not one number: the body is sent as it is, and ends with
    /// the connection.
    UntilClose,
}

/// Writes `response`: its head, then its body, in as few writes as the body allows. Whether
/// the connection can serve another request.
async fn respond<B>(
    stream: &TcpStream,
    response: Response<B>,
    close: bool,
    out: &mut Vec<u8>,
) -> io::Result<bool>
where
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    let (parts, mut body) = response.into_parts();
    out.clear();
    let (framing, close) = encode_head(&parts, body.size_hint().exact(), close, out);
    let mut sent: u64 = 0;
    let mut complete = true;
    // A body without framing (an unparsable length) goes until the close.
    if framing != Framing::Bodiless {
        loop {
            // The data already there goes out with the head; the rest as it comes.
            let frame = match next_frame(&mut body).now_or_never() {
                Some(frame) => frame,
                None => {
                    write_all(stream, out).await?;
                    out.clear();
                    next_frame(&mut body).await
                }
            };
            let mut data = match frame {
                None => break,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "response body failed; closing the connection");
                    complete = false;
                    break;
                }
                // Trailers are dropped, as hyper drops them for a client that did not ask.
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => data,
                    Err(_) => continue,
                },
            };
            let len = data.remaining();
            if len == 0 {
                continue;
            }
            sent += len as u64;
            if framing == Framing::Chunked {
                let _ = write!(out, "{len:x}\r\n");
            }
            if len > COPY_AT_MOST {
                write_all(stream, out).await?;
                out.clear();
            }
            while data.has_remaining() {
                let chunk = data.chunk();
                let n = chunk.len();
                if len > COPY_AT_MOST {
                    write_all(stream, chunk).await?;
                } else {
                    out.extend_from_slice(chunk);
                }
                data.advance(n);
            }
            if framing == Framing::Chunked {
                out.extend_from_slice(b"\r\n");
            }
        }
        if framing == Framing::Chunked && complete {
            out.extend_from_slice(b"0\r\n\r\n");
        }
    }
    write_all(stream, out).await?;
    out.clear();
    let whole = match framing {
        Framing::Length(length) => sent == length,
        Framing::Chunked | Framing::Bodiless | Framing::UntilClose => true,
    };
    Ok(complete && whole && !close)
}

/// Writes the head of an answer into `out`, given the length of its body when known whole:
/// the status line, the answer's headers, then as hyper adds them the framing header, `Date`
/// when missing and `connection: close` when closing. How the body is framed, and whether the
/// connection closes after it (`close`, or the answer says so).
fn encode_head(
    parts: &hyper::http::response::Parts,
    exact: Option<u64>,
    mut close: bool,
    out: &mut Vec<u8>,
) -> (Framing, bool) {
    let (status, headers) = (parts.status, &parts.headers);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    match parts.extensions.get::<hyper::ext::ReasonPhrase>() {
        Some(reason) => out.extend_from_slice(reason.as_bytes()),
        None => out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes()),
    }
    out.extend_from_slice(b"\r\n");

    let framing = if status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Framing::Bodiless
    } else if let Some(length) = headers.get(header::CONTENT_LENGTH) {
        match length.to_str().ok().and_then(|l| l.parse().ok()) {
            Some(length) => Framing::Length(length),
            None => Framing::UntilClose,
        }
    } else {
        exact.map_or(Framing::Chunked, Framing::Length)
    };
    close |= framing == Framing::UntilClose;
    let mut said_close = false;
    for (name, value) in headers {
        if name == header::TRANSFER_ENCODING {
            continue;
        }
        if name == header::CONNECTION && has_token(value.as_bytes(), b"close") {
            close = true;
            said_close = true;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        Framing::Length(length) if !headers.contains_key(header::CONTENT_LENGTH) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa::Buffer::new().format(length).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        _ => {}
    }
    if !headers.contains_key(header::DATE) {
        out.extend_from_slice(b"date: ");
        with_date(|date| out.extend_from_slice(date));
        out.extend_from_slice(b"\r\n");
    }
    if close && !said_close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    (framing, close)
}

/// The body's next frame, its error made one that can cross an `await` in a spawned task.
fn next_frame<B>(
    body: &mut B,
) -> impl Future<Output = Option<Result<hyper::body::Frame<B::Data>, BoxError>>> + '_
where
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    poll_fn(|cx| {
        Pin::new(&mut *body)
            .poll_frame(cx)
            .map(|frame| frame.map(|f| f.map_err(Into::into)))
    })
}

/// Whether a `Connection` value lists `token`, in any case.
fn has_token(value: &[u8], token: &[u8]) -> bool {
    list_items(value).any(|t| t.eq_ignore_ascii_case(token))
}

async fn write_all(stream: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        match stream.try_write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => stream.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Calls `f` with the current `Date` value (RFC 9110 §5.6.7), made once a second per thread.
fn with_date<R>(f: impl FnOnce(&[u8]) -> R) -> R {
    thread_local! {
        static DATE: RefCell<(i64, String)> = const { RefCell::new((i64::MIN, String::new())) };
    }
    // The coarse clock: a `Date` is to the second.
    let now = crate::clock::now();
    let second = now.as_second();
    DATE.with_borrow_mut(|(at, text)| {
        if *at != second {
            *at = second;
            *text = httpdate::fmt_http_date(SystemTime::from(now));
        }
        f(text.as_bytes())
    })
}

/// A connection handed to hyper: the bytes this path read but did not serve come first.
#[derive(Debug)]
pub(super) struct Rewind<T> {
    read: Bytes,
    inner: T,
}

impl<T> Rewind<T> {
    pub(super) fn new(read: Bytes, inner: T) -> Rewind<T> {
        Rewind { read, inner }
    }
}

impl<T: hyper::rt::Read + Unpin> hyper::rt::Read for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        mut buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        if self.read.is_empty() {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        let n = self.read.len().min(buf.remaining());
        buf.put_slice(&self.read[..n]);
        self.read.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<T: hyper::rt::Write + Unpin> hyper::rt::Write for Rewind<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(head: &str) -> Parsed {
        parse(&mut BytesMut::from(head))
    }

    #[test]
    fn only_whole_bodiless_http11_gets_are_served_here() {
        let get = "GET /v1/a?b=c HTTP/1.1\r\nHost: x\r\nX-API-Key: kg_1\r\n";
        match parsed(&format!("{get}Connection: keep-alive, Close\r\n\r\n")) {
            Parsed::Request(request, close) => {
                assert!(close);
                assert_eq!(request.uri().path_and_query().unwrap(), "/v1/a?b=c");
                assert_eq!(request.headers()[&X_API_KEY], "kg_1");
                assert_eq!(request.headers()[header::HOST], "x");
            }
            _ => panic!("a GET was not served"),
        }
        assert!(matches!(
            parsed(&format!("{get}\r\n")),
            Parsed::Request(_, false)
        ));
        assert!(matches!(parsed(get), Parsed::Partial));
        for other in [
            "POST /v1/a HTTP/1.1\r\nHost: x\r\n\r\n",
            "HEAD /v1/a HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET /v1/a HTTP/1.0\r\nHost: x\r\n\r\n",
            "GET http://x/v1/a HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET /v1/a HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
            "GET /v1/a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET /v1/a HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
            "GET /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            "GET /v1/a HTTP/1.1\r\nX-Bad: a\0b\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        ] {
            assert!(matches!(parsed(other), Parsed::NotHere), "{other:?}");
        }
    }

    fn head(response: Response<()>, exact: Option<u64>, close: bool) -> (String, bool, bool) {
        let (parts, ()) = response.into_parts();
        let mut out = Vec::new();
        let (framing, close) = encode_head(&parts, exact, close, &mut out);
        let chunked = framing == Framing::Chunked;
        (String::from_utf8(out).unwrap(), chunked, close)
    }

    #[test]
    fn answers_are_framed_as_hyper_frames_them() {
        let answer = |status: u16, headers: &[(&str, &str)]| {
            let mut response = Response::new(());
            *response.status_mut() = StatusCode::from_u16(status).unwrap();
            for (name, value) in headers {
                response.headers_mut().append(
                    HeaderName::from_bytes(name.as_bytes()).unwrap(),
                    HeaderValue::from_str(value).unwrap(),
                );
            }
            response
        };
        let date = "date: Thu, 01 Jan 2026 00:00:00 GMT";
        let dated = [("date", &date[6..])];
        // A body known whole gets its length after the answer's headers; one of unknown
        // length is chunked; neither closes.
        let (text, chunked, close) = head(answer(200, &dated), Some(2), false);
        assert_eq!(
            text,
            format!("HTTP/1.1 200 OK\r\n{date}\r\ncontent-length: 2\r\n\r\n")
        );
        assert!(!chunked && !close);
        let (text, chunked, _) = head(answer(200, &dated), None, false);
        assert!(
            text.ends_with("transfer-encoding: chunked\r\n\r\n") && chunked,
            "{text}"
        );
        // No body for 204 and 304, and the answer's own length is kept, not repeated.
        let (text, ..) = head(answer(304, &[("content-length", "9")]), Some(0), false);
        assert!(text.contains("content-length: 9\r\n") && !text.contains("content-length: 0"));
        let (text, ..) = head(answer(204, &dated), Some(0), false);
        assert!(
            !text.contains("content-length") && !text.contains("chunked"),
            "{text}"
        );
        // A Date is added when missing; closing says so once; a length that is not one
        // number is sent as it is, and the body ends with the connection.
        let (text, _, close) = head(answer(401, &[]), Some(5), true);
        assert!(text.contains("\r\ndate: ") && text.ends_with("connection: close\r\n\r\n"));
        assert!(close);
        let (text, _, close) = head(answer(200, &[("connection", "close")]), Some(1), false);
        assert_eq!(
            (text.matches("connection: close").count(), close),
            (1, true)
        );
        let (_, _, close) = head(answer(200, &[("content-length", "1, 2")]), None, false);
        assert!(close);
    }

    #[test]
    fn a_head_left_to_hyper_keeps_every_byte_read() {
        let bytes = "POST /a HTTP/1.1\r\nContent-Length: 2\r\n\r\nhiGET /b HTTP/1.1\r\n\r\n";
        let mut read = BytesMut::from(bytes);
        assert!(matches!(parse(&mut read), Parsed::NotHere));
        assert_eq!(read, bytes.as_bytes());
        // A request served here leaves the next one's bytes.
        let mut read = BytesMut::from("GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n");
        assert!(matches!(parse(&mut read), Parsed::Request(..)));
        assert_eq!(read, "GET /b HTTP/1.1\r\n".as_bytes());
    }
}
