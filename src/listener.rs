//! The HTTP/1 request head, read before Pingora parses it. Pingora's own
//! read timeout applies to each `read()`, so a client trickling one byte at a
//! time could hold a connection forever, and its head limits (1 MiB, 256
//! fields) answer `400`. Here the whole head must arrive within
//! `server.header_timeout` and fit `max_header_size` and `max_headers`, or the
//! client gets `408` or `431`. The bytes read are handed to Pingora's parser
//! untouched, so nothing is read twice; the head is checked with the same
//! parser Pingora uses (httparse), so a head it would refuse gets a problem
//! document instead of a bare `400`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::BytesMut;
use http::StatusCode;
use pingora_core::apps::{HttpServerApp, HttpServerOptions, ReusedHttpStream};
use pingora_core::protocols::http::v2::server::H2Options;
use pingora_core::protocols::http::ServerSession;
use pingora_core::protocols::Stream;
use pingora_core::server::ShutdownWatch;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use crate::respond::Response;

#[derive(Debug, Clone, Copy)]
pub struct HeadLimits {
    pub header_timeout: Duration,
    pub max_header_size: usize,
    pub max_headers: usize,
    pub keepalive_timeout: Duration,
}

/// Wraps the proxy application; see the module documentation.
pub struct HeadGuard<A> {
    inner: Arc<A>,
    limits: HeadLimits,
}

impl<A> HeadGuard<A> {
    pub fn new(inner: A, limits: HeadLimits) -> Self {
        HeadGuard {
            inner: Arc::new(inner),
            limits,
        }
    }
}

/// Marks a keep-alive connection that already served a request; the proxy
/// hands it from one request to the next.
pub struct Reused;

/// What reading a head came to.
enum Head {
    /// A complete head, within limits, ends in the buffer.
    Complete,
    /// The client closed, failed or stayed idle: nothing to answer.
    Gone,
    /// Answer this and close.
    Refuse(StatusCode, &'static str),
}

/// An HTTP/1 connection between requests: its socket and what Pingora's
/// session knew of it, without the rest of the session.
struct Parked {
    stream: Stream,
    keepalive: Option<u64>,
    reuses: Option<u32>,
    user_ctx: Option<Box<dyn std::any::Any + Send + Sync>>,
}

#[async_trait]
impl<A> HttpServerApp for HeadGuard<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    // Written out rather than `async fn`: an async fn would keep the whole
    // Pingora session it is handed (680 bytes) in its future, and that
    // future lives on every open connection. The session is taken apart
    // here, before any future exists, and an HTTP/2 session goes to the
    // proxy's own future without a second one around it.
    fn process_new_http<'life0, 'life1, 'async_trait>(
        self: &'life0 Arc<Self>,
        session: ServerSession,
        shutdown: &'life1 ShutdownWatch,
    ) -> Pin<Box<dyn Future<Output = Option<ReusedHttpStream>> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        let ServerSession::H1(mut v1) = session else {
            return self.inner.process_new_http(session, shutdown);
        };
        let parked = Parked {
            keepalive: v1.get_keepalive_timeout(),
            reuses: v1.get_keepalive_reuses_remaining(),
            user_ctx: v1.take_connection_user_context(),
            stream: v1.into_inner(),
        };
        Box::pin(self.serve_h1(parked, shutdown))
    }

    fn h2_options(&self) -> Option<H2Options> {
        self.inner.h2_options()
    }

    fn server_options(&self) -> Option<&HttpServerOptions> {
        self.inner.server_options()
    }

    async fn http_cleanup(&self) {
        self.inner.http_cleanup().await
    }
}

impl<A> HeadGuard<A>
where
    A: HttpServerApp + Send + Sync + 'static,
{
    /// Reads the next head, then hands the connection to the proxy with the
    /// head in its buffer. Kept lean, as it waits on every idle connection:
    /// the (rare) refusal is boxed, and the session is rebuilt only once the
    /// head is in.
    async fn serve_h1(
        self: &Arc<Self>,
        parked: Parked,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        let Parked {
            mut stream,
            keepalive,
            reuses,
            user_ctx,
        } = parked;
        // Every open connection holds this while it waits for a request;
        // most heads fit in 1 KiB, and a longer one grows it.
        let mut buf = BytesMut::with_capacity(1024);
        let reused = user_ctx.is_some();
        match self
            .read_head(&mut stream, &mut buf, reused, shutdown)
            .await
        {
            Head::Complete => {}
            Head::Gone => return None,
            Head::Refuse(status, detail) => {
                Box::pin(reject(stream, status, detail)).await;
                return None;
            }
        }
        let mut session = ServerSession::new_http1(stream);
        // Pingora's default for a new connection is 60 s; ours is configured.
        session.set_keepalive(keepalive.map(|_| self.limits.keepalive_timeout.as_secs().max(1)));
        session.set_keepalive_reuses_remaining(reuses);
        session.set_connection_user_context(user_ctx);
        session.set_pipelined_prefix(buf);
        self.inner.process_new_http(session, shutdown).await
    }
}

/// Where the head ends (index just past the blank line), if it has.
fn head_end(buf: &[u8]) -> Option<usize> {
    // Blank lines before the request line are allowed (RFC 9112 2.2).
    let start = buf.iter().position(|b| *b != b'\r' && *b != b'\n')?;
    let body = &buf[start..];
    for nl in memchr::memchr_iter(b'\n', body) {
        match body.get(nl + 1) {
            Some(b'\n') => return Some(start + nl + 2),
            Some(b'\r') if body.get(nl + 2) == Some(&b'\n') => return Some(start + nl + 3),
            _ => {}
        }
    }
    None
}

impl<A> HeadGuard<A> {
    async fn read_head(
        &self,
        stream: &mut Stream,
        buf: &mut BytesMut,
        reused: bool,
        shutdown: &ShutdownWatch,
    ) -> Head {
        let limits = self.limits;
        // A new connection gets `header_timeout` for everything up to the
        // end of its head; an idle keep-alive connection may wait
        // `keepalive_timeout` for the first byte of its next request.
        let start = Instant::now();
        let mut deadline = start + limits.header_timeout;
        let idle_until = if reused {
            start + limits.keepalive_timeout
        } else {
            deadline
        };
        let mut shutdown = shutdown.clone();
        let first = tokio::select! {
            biased;
            r = tokio::time::timeout_at(idle_until, stream.read_buf(buf)) => r,
            _ = shutdown.changed() => return Head::Gone,
        };
        match first {
            Ok(Ok(n)) if n > 0 => {}
            _ => return Head::Gone,
        }
        if reused {
            deadline = Instant::now() + limits.header_timeout;
        }
        let end = loop {
            if let Some(end) = head_end(buf) {
                break end;
            }
            if buf.len() > limits.max_header_size {
                return Head::Refuse(
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    "the request head is too large",
                );
            }
            match tokio::time::timeout_at(deadline, stream.read_buf(buf)).await {
                Ok(Ok(n)) if n > 0 => {}
                Ok(_) => return Head::Gone,
                Err(_) => {
                    return Head::Refuse(
                        StatusCode::REQUEST_TIMEOUT,
                        "the request head was not received in time",
                    )
                }
            }
        };
        if end > limits.max_header_size {
            return Head::Refuse(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "the request head is too large",
            );
        }
        match check_head(&buf[..end], limits.max_headers) {
            Ok(()) => Head::Complete,
            Err((status, detail)) => Head::Refuse(status, detail),
        }
    }
}

/// Parses the head as Pingora will, so that a malformed one is answered
/// with a problem document rather than Pingora's bare 400.
fn check_head(head: &[u8], max_headers: usize) -> Result<(), (StatusCode, &'static str)> {
    // Uninitialised slots: filling 250 empty headers per request costs more
    // than parsing a typical head.
    let mut headers =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_FIELDS];
    let mut req = httparse::Request::new(&mut []);
    match req.parse_with_uninit_headers(head, &mut headers) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => {
            return Err((StatusCode::BAD_REQUEST, "the request head is malformed"))
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err((
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "the request has too many header fields",
            ))
        }
        Err(_) => return Err((StatusCode::BAD_REQUEST, "the request head is malformed")),
    }
    if req.headers.len() > max_headers {
        return Err((
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "the request has too many header fields",
        ));
    }
    if req.method == Some("CONNECT") {
        return Err((StatusCode::METHOD_NOT_ALLOWED, "CONNECT is not served"));
    }
    check_framing(req.version, req.headers)
}

/// The body framing must be unambiguous: Pingora refuses the same heads,
/// but with a bare 400; answering here gives the client a problem document.
fn check_framing(
    version: Option<u8>,
    headers: &[httparse::Header<'_>],
) -> Result<(), (StatusCode, &'static str)> {
    let bad = |detail| Err((StatusCode::BAD_REQUEST, detail));
    fn named<'h>(
        headers: &'h [httparse::Header<'h>],
        name: &'static str,
    ) -> impl Iterator<Item = &'h [u8]> + 'h {
        headers
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    }
    if let Some(last) = named(headers, "transfer-encoding").last() {
        if version == Some(0) {
            return bad("HTTP/1.0 requests cannot use Transfer-Encoding");
        }
        let final_coding = last.rsplit(|b| *b == b',').next().unwrap_or(b"");
        if !final_coding.trim_ascii().eq_ignore_ascii_case(b"chunked") {
            return bad("the final transfer coding must be chunked");
        }
        // Transfer-Encoding wins over any Content-Length.
        return Ok(());
    }
    let mut length: Option<&[u8]> = None;
    for value in named(headers, "content-length") {
        for part in value.split(|b| *b == b',') {
            let part = part.trim_ascii();
            if part.is_empty() || part.len() > 18 || !part.iter().all(u8::is_ascii_digit) {
                return bad("the Content-Length is not a number");
            }
            match length {
                Some(seen) if seen != part => return bad("the Content-Length values differ"),
                _ => length = Some(part),
            }
        }
    }
    Ok(())
}

/// Upper bound of `server.max_headers`, checked when the file is compiled.
pub const MAX_FIELDS: usize = 250;

/// Answers a head that was refused, then closes the connection.
async fn reject(mut stream: Stream, status: StatusCode, detail: &str) {
    let request_id = crate::forwarding::RequestId::generate();
    let request_id = request_id.as_str();
    let problem = Response::problem(status, detail, request_id);
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: application/problem+json\r\nContent-Length: {}\r\nX-Request-Id: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        problem.body.len(),
        request_id,
    )
    .into_bytes();
    out.extend_from_slice(&problem.body);
    let write = async {
        stream.write_all(&out).await?;
        stream.flush().await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), write).await;
}

#[cfg(test)]
mod tests {
    use super::head_end;

    #[test]
    fn heads_are_checked_like_pingora_parses_them() {
        use super::check_head;
        assert!(check_head(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 10).is_ok());
        assert_eq!(
            check_head(b"GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\n\r\n", 1)
                .unwrap_err()
                .0,
            431
        );
        assert_eq!(
            check_head(b"GET /a b HTTP/1.1\r\n\r\n", 10).unwrap_err().0,
            400
        );
        assert_eq!(
            check_head(b"GET / HTTP/1.1\r\nBad Name: 1\r\n\r\n", 10)
                .unwrap_err()
                .0,
            400
        );
        assert_eq!(
            check_head(b"CONNECT a:443 HTTP/1.1\r\n\r\n", 10)
                .unwrap_err()
                .0,
            405
        );
        let framing =
            |h: &str| check_head(format!("POST / HTTP/1.1\r\n{h}\r\n\r\n").as_bytes(), 10);
        assert!(framing("Content-Length: 5").is_ok());
        assert!(framing("Content-Length: 5\r\nContent-Length: 5").is_ok());
        assert!(framing("Content-Length: 5, 5").is_ok());
        assert_eq!(
            framing("Content-Length: 5\r\nContent-Length: 6")
                .unwrap_err()
                .0,
            400
        );
        assert_eq!(framing("Content-Length: +5").unwrap_err().0, 400);
        assert_eq!(framing("Content-Length: 0x5").unwrap_err().0, 400);
        assert_eq!(framing("Content-Length: -1").unwrap_err().0, 400);
        assert!(framing("Transfer-Encoding: gzip, chunked").is_ok());
        assert!(framing("Transfer-Encoding: chunked\r\nContent-Length: 5").is_ok());
        assert_eq!(
            framing("Transfer-Encoding: chunked, gzip").unwrap_err().0,
            400
        );
        let http10 = check_head(b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 10);
        assert_eq!(http10.unwrap_err().0, 400);
        // Blank lines before the request line are not header fields.
        assert!(check_head(b"\r\n\r\nGET / HTTP/1.1\r\nA: 1\r\n\r\n", 1).is_ok());
    }

    #[test]
    fn finds_the_end_of_the_head() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nbody"), Some(27));
        assert_eq!(head_end(b"GET / HTTP/1.1\nHost: a\n\n"), Some(24));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n"), None);
        assert_eq!(head_end(b"\r\n\r\nGET / HTTP/1.1\r\n\r\n"), Some(22));
        assert_eq!(head_end(b"\r\n"), None);
    }
}
