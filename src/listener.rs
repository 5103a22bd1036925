//! The connection before Pingora's parser sees it: the TLS handshake, and
//! the HTTP/1 request head.
//!
//! Pingora's limits are not the gateway's. Its TLS handshake may take 60 s;
//! its read timeout applies to each `read()`, so a client trickling one
//! byte at a time could hold a connection forever; its head limits (1 MiB,
//! 256 fields) and its refusals (two `Host` fields, an absolute-form target
//! naming another authority) answer a bare `400`. Here a new connection
//! must finish its TLS handshake and its first request head within
//! `server.header_timeout` of being accepted, the head must fit
//! `max_header_size` and `max_headers`, and a head Pingora would refuse is
//! refused first, with a problem document, a request id and an access log
//! line. The bytes read are handed to Pingora's parser untouched, so
//! nothing is read twice.
//!
//! Pipelined requests (RFC 9112 9.3.2) are answered in order: Pingora is
//! given one request at a time ([`Framed`]), and what the client sent
//! after it waits here for the next head. After a chunked body, whose end
//! only the body parser knows, the first request is answered and the
//! connection closed, so a second never reaches an upstream half read.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::BytesMut;
use http::StatusCode;
use pingora_core::apps::{HttpServerApp, HttpServerOptions, ReusedHttpStream, ServerApp};
use pingora_core::protocols::http::v2::server::H2Options;
use pingora_core::protocols::http::ServerSession;
use pingora_core::protocols::l4::stream::Stream as L4Stream;
use pingora_core::protocols::tls::TlsRef;
use pingora_core::protocols::Stream;
use pingora_core::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use pingora_core::server::ShutdownWatch;
use pingora_core::tls::ssl::SslAcceptor;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;

use crate::access_log::{self, AccessLog};
use crate::metrics::Metrics;
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
    log: AccessLog,
    metrics: Arc<Metrics>,
    /// With `tracing` (fixed at start), a refused head's log line has a
    /// trace id of its own.
    traced: bool,
}

impl<A> HeadGuard<A> {
    pub fn new(
        inner: A,
        limits: HeadLimits,
        log: AccessLog,
        metrics: Arc<Metrics>,
        traced: bool,
    ) -> Self {
        HeadGuard {
            inner: Arc::new(inner),
            limits,
            log,
            metrics,
            traced,
        }
    }
}

/// Marks a keep-alive connection that already served a request; the proxy
/// hands it from one request to the next.
pub struct Reused;

/// How much of what follows a head belongs to its request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// `Content-Length` bytes (none when absent).
    Length(u64),
    /// Chunked: the end is found by Pingora's body parser.
    Chunked,
    /// An upgrade without a body: after a `101`, bytes flow both ways.
    Upgrade,
}

impl Framing {
    /// Whether the connection must close after this request: where the
    /// request ends is Pingora's to find (a chunked body), or the
    /// connection may stop being HTTP (an upgrade). What the client sent
    /// after it is then never read as a request.
    fn closes(self) -> bool {
        !matches!(self, Framing::Length(_))
    }
}

/// What reading a head came to.
enum Head {
    /// A complete head, within limits, of `len` bytes at the front of the
    /// buffer.
    Complete { len: usize, framing: Framing },
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

/// When a connection was accepted, from its lowest layer's digest.
fn accepted_at(stream: &Stream) -> Instant {
    let now = Instant::now();
    stream
        .get_timing_digest()
        .first()
        .and_then(|t| t.as_ref())
        .and_then(|t| SystemTime::now().duration_since(t.established_ts).ok())
        .and_then(|ago| now.checked_sub(ago))
        .unwrap_or(now)
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
            stream,
            keepalive,
            reuses,
            user_ctx,
        } = parked;
        let reused = user_ctx.is_some();
        let started = if reused {
            Instant::now()
        } else {
            accepted_at(&stream)
        };
        let mut framed = Framed::of(stream)?;
        // The head's own deadline (from the accept) covers what the gate's
        // did; its timer serves again for the waits between requests.
        if let Some((timer, _)) = framed.deadline.take() {
            framed.idle = Some(timer);
        }
        if framed.close_after {
            // The last request's end was not ours to find: close rather
            // than read what followed it as a request.
            return None;
        }
        // Every open connection holds this while it waits for a request;
        // most heads fit in 1 KiB, and a longer one grows it. A pipelined
        // request already read starts it.
        let mut buf = framed.take_ahead();
        let (len, framing) = match self
            .read_head(&mut framed, &mut buf, reused, started, shutdown)
            .await
        {
            Head::Complete { len, framing } => (len, framing),
            Head::Gone => return None,
            Head::Refuse(status, detail) => {
                Box::pin(self.reject(framed, &buf, status, detail, started)).await;
                return None;
            }
        };
        // What belongs to this request goes to Pingora's parser; the start
        // of a pipelined next one waits in `framed`.
        match framing {
            Framing::Length(n) => {
                let in_buf = ((buf.len() - len) as u64).min(n);
                let ahead = buf.split_off(len + in_buf as usize);
                framed.begin(Some(n - in_buf), ahead, self.limits.max_header_size);
            }
            Framing::Chunked | Framing::Upgrade => {
                framed.begin(None, BytesMut::new(), self.limits.max_header_size);
            }
        }
        framed.close_after = framing.closes();
        let mut session = ServerSession::new_http1(Box::new(framed));
        // Pingora's default for a new connection is 60 s; ours is configured.
        // (Pingora re-reads the client's wish as it parses the head; the
        // proxy turns keep-alive off after a chunked body, so its answer
        // says `Connection: close`.)
        session.set_keepalive(keepalive.map(|_| self.limits.keepalive_timeout.as_secs().max(1)));
        session.set_keepalive_reuses_remaining(reuses);
        session.set_connection_user_context(user_ctx);
        // Where the request's end is Pingora's to find, bytes after it are
        // kept aside (and dropped with the connection), not taken for an
        // error that would fail the request.
        session.set_pipelining_enabled(framing.closes());
        session.set_pipelined_prefix(buf);
        self.inner.process_new_http(session, shutdown).await
    }

    /// Answers a head that was refused, then closes the connection; the
    /// refusal is counted and logged like any request.
    async fn reject(
        &self,
        mut stream: Framed,
        buf: &[u8],
        status: StatusCode,
        detail: &str,
        started: Instant,
    ) {
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
            AsyncWriteExt::shutdown(&mut stream).await
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), write).await;
        let (method, path) = request_line(buf);
        let method = method_label(&method);
        let mut digits = [0u8; 3];
        self.metrics
            .requests
            .with_label_values(&[
                "-",
                method,
                crate::metrics::status_label(status.as_u16(), &mut digits),
            ])
            .inc();
        if self.log.enabled() {
            let client = stream
                .get_socket_digest()
                .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()))
                .map(|ip| ip.to_canonical());
            // With `tracing` every line has a trace id; this request never
            // reached the proxy, so its trace is new and unrecorded.
            let trace_id = self.traced.then(crate::trace::unrecorded_trace_id);
            self.log.write(&access_log::Entry {
                ts: SystemTime::now(),
                request_id,
                client,
                method,
                path: &path,
                route: "-",
                upstream: None,
                target: None,
                status: status.as_u16(),
                duration_ms: started.elapsed().as_secs_f64() * 1000.0,
                bytes_sent: problem.body.len(),
                cache: None,
                user: None,
                error: Some(detail),
                body: None,
                trace_id: trace_id
                    .as_ref()
                    .and_then(|hex| std::str::from_utf8(hex).ok()),
            });
        }
    }
}

/// The method label of a refused head, as the metrics spell methods.
fn method_label(method: &str) -> &'static str {
    http::Method::from_bytes(method.as_bytes())
        .map_or("OTHER", |m| crate::metrics::method_label(&m))
}

/// Method and path (without the query) of a head's first line, as far as
/// they can be read; `-` for what cannot.
fn request_line(buf: &[u8]) -> (String, String) {
    let start = buf
        .iter()
        .position(|b| *b != b'\r' && *b != b'\n')
        .unwrap_or(buf.len());
    let line = &buf[start..];
    let line = &line[..memchr::memchr(b'\n', line).unwrap_or(line.len())];
    let mut parts = line.split(|b| *b == b' ');
    let text = |b: Option<&[u8]>, max: usize| {
        b.filter(|b| !b.is_empty())
            .map(|b| String::from_utf8_lossy(&b[..b.len().min(max)]).into_owned())
            .unwrap_or_else(|| "-".to_string())
    };
    let method = text(parts.next(), 16);
    let target = parts
        .next()
        .map(|t| t.split(|b| *b == b'?').next().unwrap_or(t));
    (method, text(target, 1024))
}

/// [`head_end`], searching from `from` on: bytes before it were searched
/// and held no end (but may hold the start of one), and the request line
/// starts before it.
fn head_end_from(buf: &[u8], from: usize) -> Option<usize> {
    if from == 0 {
        return head_end(buf);
    }
    // The request line has begun before `from` (leading blank lines are
    // only skipped at the start), so an end is a blank line after it.
    let body = buf.get(from..)?;
    let start = from;
    for nl in memchr::memchr_iter(b'\n', body) {
        let at = start + nl;
        match (buf.get(at + 1), buf.get(at + 2)) {
            (Some(b'\n'), _) => return Some(at + 2),
            (Some(b'\r'), Some(b'\n')) => return Some(at + 3),
            _ => {}
        }
    }
    None
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
        stream: &mut Framed,
        buf: &mut BytesMut,
        reused: bool,
        started: Instant,
        shutdown: &ShutdownWatch,
    ) -> Head {
        let limits = self.limits;
        // A new connection gets `header_timeout` from its accept for its TLS
        // handshake and everything up to the end of its head; an idle
        // keep-alive connection may wait `keepalive_timeout` for the first
        // byte of its next request.
        let mut deadline = started + limits.header_timeout;
        if buf.is_empty() {
            let idle_until = if reused {
                started + limits.keepalive_timeout
            } else {
                deadline
            };
            let mut shutdown = shutdown.clone();
            let Framed { inner, idle, .. } = stream;
            let timer = match idle {
                Some(timer) => {
                    timer.as_mut().reset(idle_until);
                    timer
                }
                None => idle.insert(Box::pin(tokio::time::sleep_until(idle_until))),
            };
            let first = tokio::select! {
                biased;
                r = inner.read_buf(buf) => r,
                _ = timer.as_mut() => return Head::Gone,
                _ = shutdown.changed() => return Head::Gone,
            };
            match first {
                Ok(n) if n > 0 => {}
                _ => return Head::Gone,
            }
            if reused {
                deadline = Instant::now() + limits.header_timeout;
            }
        }
        // Where the next search for the end starts: a head trickled in small
        // pieces is scanned once, not once per piece. Only past the start
        // of the request line: blank lines before it are no end.
        let mut scanned = 0;
        let end = loop {
            if let Some(end) = head_end_from(buf, scanned) {
                break end;
            }
            if scanned > 0 || buf.first().is_some_and(|b| *b != b'\r' && *b != b'\n') {
                scanned = buf.len().saturating_sub(3).max(1);
            }
            if buf.len() > limits.max_header_size {
                return Head::Refuse(
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    "the request head is too large",
                );
            }
            if buf.capacity() == buf.len() {
                buf.reserve(buf.len().max(1024));
            }
            match tokio::time::timeout_at(deadline, stream.inner.read_buf(buf)).await {
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
            Ok(framing) => Head::Complete { len: end, framing },
            Err((status, detail)) => Head::Refuse(status, detail),
        }
    }
}

type Refusal = (StatusCode, &'static str);

/// Parses the head as Pingora will, so that a malformed one is answered
/// with a problem document rather than Pingora's bare 400, and tells how
/// its body is framed.
fn check_head(head: &[u8], max_headers: usize) -> Result<Framing, Refusal> {
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
    check_authority(req.version, req.path.unwrap_or(""), req.headers)?;
    check_framing(req.version, req.headers)
}

fn named<'h>(
    headers: &'h [httparse::Header<'h>],
    name: &'static str,
) -> impl Iterator<Item = &'h [u8]> + 'h {
    headers
        .iter()
        .filter(move |h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value)
}

/// One unambiguous authority, as Pingora demands (which it refuses with a
/// bare 400): at most one `Host`, none with user info, and an absolute-form
/// target that names the same authority; an HTTP/1.1 request must have a
/// `Host` (RFC 9112 3.2).
fn check_authority(
    version: Option<u8>,
    target: &str,
    headers: &[httparse::Header<'_>],
) -> Result<(), Refusal> {
    let bad = |detail| Err((StatusCode::BAD_REQUEST, detail));
    let mut hosts = named(headers, "host");
    let host = hosts.next();
    if hosts.next().is_some() {
        return bad("the request has more than one Host field");
    }
    if host.is_none() && version == Some(1) {
        return bad("an HTTP/1.1 request needs a Host field");
    }
    if let Some(host) = host {
        if host.contains(&b'@') {
            return bad("the Host field holds user info");
        }
        if !is_authority(host) {
            return bad("the Host field is not a host");
        }
    }
    use pingora_http::authority::{raw_target_authority, RawTargetAuthority};
    match raw_target_authority(target.as_bytes()) {
        RawTargetAuthority::None => Ok(()),
        RawTargetAuthority::AmbiguousAuthority => bad("the request target is ambiguous"),
        RawTargetAuthority::Absolute { authority, .. } => {
            if authority.contains(&b'@') {
                return bad("the request target holds user info");
            }
            if http::uri::Authority::try_from(authority).is_err() {
                return bad("the request target's authority is not a host");
            }
            if host.is_some_and(|h| h != authority) {
                return bad("the request target names another host than the Host field");
            }
            Ok(())
        }
    }
}

/// Whether `host` is made of the characters an authority (RFC 3986
/// 3.2: reg-name or IP literal, and a port) is made of; an empty one is
/// allowed (RFC 9112 3.2). User info is refused before this.
fn is_authority(host: &[u8]) -> bool {
    host.iter().all(|b| {
        b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'%'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
                    | b':'
                    | b'['
                    | b']'
            )
    })
}

/// The body framing must be unambiguous: Pingora refuses the same heads,
/// but with a bare 400; answering here gives the client a problem document.
fn check_framing(
    version: Option<u8>,
    headers: &[httparse::Header<'_>],
) -> Result<Framing, Refusal> {
    let bad = |detail| Err((StatusCode::BAD_REQUEST, detail));
    let upgrade = named(headers, "upgrade").next().is_some();
    if let Some(last) = named(headers, "transfer-encoding").last() {
        if version == Some(0) {
            return bad("HTTP/1.0 requests cannot use Transfer-Encoding");
        }
        let final_coding = last.rsplit(|b| *b == b',').next().unwrap_or(b"");
        if !final_coding.trim_ascii().eq_ignore_ascii_case(b"chunked") {
            return bad("the final transfer coding must be chunked");
        }
        // Transfer-Encoding wins over any Content-Length.
        return Ok(Framing::Chunked);
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
    let n = length
        .and_then(|l| std::str::from_utf8(l).ok())
        .and_then(|l| l.parse().ok())
        .unwrap_or(0);
    // An upgrade with a body is framed by its body, like any request.
    if upgrade && n == 0 {
        return Ok(Framing::Upgrade);
    }
    Ok(Framing::Length(n))
}

/// The HTTP/2 head limits (for an HTTP/2 session), as HTTP/1 heads are
/// held to as they arrive:
/// more than `max_headers` fields, or more than `max_header_size` bytes of
/// names, values and path, is a `431`. (HTTP/2 heads arrive decoded, so
/// they are measured once Pingora has them.)
pub fn check_h2_head(
    session: &pingora_proxy::Session,
    (max_headers, max_header_size): (usize, usize),
) -> Result<(), (StatusCode, &'static str)> {
    if !session.is_http2() {
        return Ok(());
    }
    let req = session.req_header();
    let count = req.headers.len();
    let size: usize = req
        .headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum::<usize>()
        + req.uri.path().len();
    if count > max_headers || size > max_header_size {
        return Err((
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "the request head is too large",
        ));
    }
    Ok(())
}

/// [`check_head`] for the fuzz targets and property tests.
pub fn check_head_for_fuzzing(head: &[u8], max_headers: usize) -> Result<String, u16> {
    check_head(head, max_headers.min(MAX_FIELDS))
        .map(|f| format!("{f:?}"))
        .map_err(|(status, _)| status.as_u16())
}

/// [`head_end`] for the fuzz targets.
pub fn head_end_for_fuzzing(buf: &[u8]) -> Option<usize> {
    head_end(buf)
}

/// `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`.
const H2_PREFACE_LEN: usize = 24;

/// Upper bound of `server.max_headers`, checked when the file is compiled.
pub const MAX_FIELDS: usize = 250;

/// A client connection as Pingora's HTTP/1 parser reads it: at most the
/// current request's body past its head. What the client sends after that
/// (a pipelined request) is read into `ahead`, up to a head's size, and
/// kept for the next head; meanwhile Pingora, which would take those bytes
/// for a protocol error, sees nothing until the client closes.
pub struct Framed {
    inner: Stream,
    /// Body bytes the current request may still read; `None`: any.
    allowance: Option<u64>,
    ahead: BytesMut,
    ahead_cap: usize,
    /// The last request's end was not found here (chunked, upgrade): the
    /// connection closes after it.
    close_after: bool,
    /// Until the connection's first bytes have come (an HTTP/2 preface),
    /// reads fail at this deadline, which Pingora's HTTP/2 handshake does
    /// not otherwise have.
    deadline: Option<(Pin<Box<tokio::time::Sleep>>, usize)>,
    /// The wait for the next request's first byte. Kept from request to
    /// request: moving a registered timer's deadline later is a store, where
    /// a new timer is a trip to the runtime's timer wheel per request (the
    /// kept one goes there again only when its old deadline passes).
    idle: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl std::fmt::Debug for Framed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Framed")
            .field("inner", &self.inner)
            .field("allowance", &self.allowance)
            .field("ahead", &self.ahead.len())
            .finish()
    }
}

impl Framed {
    /// The connection as a `Framed`: the one it already is on a reused
    /// connection, or a new one around it. (`None` would mean a stream that
    /// said it was a `Framed` and was not.)
    fn of(stream: Stream) -> Option<Framed> {
        if !stream.as_any().is::<Framed>() {
            return Some(Framed::new(stream));
        }
        stream.into_any().downcast::<Framed>().ok().map(|f| *f)
    }

    fn new(inner: Stream) -> Framed {
        Framed {
            inner,
            allowance: None,
            ahead: BytesMut::new(),
            ahead_cap: 0,
            close_after: false,
            deadline: None,
            idle: None,
        }
    }

    /// A new connection whose first `bytes` must arrive by `deadline`.
    fn with_deadline(inner: Stream, deadline: Instant, bytes: usize) -> Framed {
        let mut framed = Framed::new(inner);
        framed.deadline = Some((Box::pin(tokio::time::sleep_until(deadline)), bytes));
        framed
    }

    /// What was read of the next request, to start its head; in between
    /// requests the connection reads freely.
    fn take_ahead(&mut self) -> BytesMut {
        self.allowance = None;
        let ahead = std::mem::take(&mut self.ahead);
        if ahead.is_empty() {
            BytesMut::with_capacity(1024)
        } else {
            ahead
        }
    }

    fn begin(&mut self, allowance: Option<u64>, ahead: BytesMut, ahead_cap: usize) {
        self.allowance = allowance;
        self.ahead = ahead;
        self.ahead_cap = ahead_cap + 1;
    }
}

impl AsyncRead for Framed {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if let Some((sleep, _)) = this.deadline.as_mut() {
            if sleep.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the first bytes did not come within header_timeout",
                )));
            }
        }
        match this.allowance {
            None if this.deadline.is_some() => {
                let before = buf.filled().len();
                let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
                let got = buf.filled().len() - before;
                if let Some((_, left)) = this.deadline.as_mut() {
                    *left = left.saturating_sub(got);
                    if *left == 0 {
                        this.deadline = None;
                    }
                }
                poll
            }
            None => Pin::new(&mut this.inner).poll_read(cx, buf),
            Some(0) => this.read_ahead(cx),
            Some(left) => {
                let room = buf.remaining().min(left as usize);
                let mut limited = buf.take(room);
                let poll = Pin::new(&mut this.inner).poll_read(cx, &mut limited);
                let n = limited.filled().len();
                // SAFETY: `limited` filled these bytes of `buf`'s unfilled part.
                unsafe { buf.assume_init(n) };
                buf.advance(n);
                this.allowance = Some(left - n as u64);
                poll
            }
        }
    }
}

impl Framed {
    /// The request is read whole: what arrives now is the next request's,
    /// kept in `ahead`. Pingora is told only of the client closing, and
    /// only when nothing of a next request came first (that request is
    /// then served, and the close seen after it).
    fn read_ahead(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let mut chunk = [0u8; 2048];
        loop {
            if self.ahead.len() >= self.ahead_cap {
                // Enough for a head: nothing more is read until it is served.
                return Poll::Pending;
            }
            let mut rb = ReadBuf::new(&mut chunk);
            match Pin::new(&mut self.inner).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) if rb.filled().is_empty() => {
                    return if self.ahead.is_empty() {
                        Poll::Ready(Ok(()))
                    } else {
                        Poll::Pending
                    };
                }
                Poll::Ready(Ok(())) => self.ahead.extend_from_slice(rb.filled()),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl AsyncWrite for Framed {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for Framed {
    async fn shutdown(&mut self) {
        Shutdown::shutdown(&mut *self.inner).await
    }
}

impl UniqueID for Framed {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for Framed {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<pingora_core::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for Framed {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for Framed {
    fn get_proxy_digest(&self) -> Option<Arc<pingora_core::protocols::raw_connect::ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: pingora_core::protocols::raw_connect::ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for Framed {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

// Peeking is only asked for to detect h2c, which is off.
impl Peek for Framed {}

/// A TLS listener: its address, its acceptor (fixed at start) and the
/// callbacks that pick its certificate per handshake.
pub type TlsListener = (
    SocketAddr,
    SslAcceptor,
    Arc<dyn pingora_core::listeners::TlsAccept + Send + Sync>,
);

/// The gateway's listeners as one Pingora application: TLS connections
/// are accepted here, within `header_timeout` of their TCP accept (Pingora
/// would wait 60 s), then every connection goes to the HTTP application.
pub struct Gate<A> {
    http: Arc<A>,
    /// TLS listeners: their address, acceptor and handshake callbacks.
    tls: Vec<TlsListener>,
    header_timeout: Duration,
}

impl<A> Gate<A> {
    pub fn new(http: A, tls: Vec<TlsListener>, header_timeout: Duration) -> Self {
        Gate {
            http: Arc::new(http),
            tls,
            header_timeout,
        }
    }

    /// The acceptor of the TLS listener this connection came in on, if any.
    fn acceptor(&self, stream: &Stream) -> Option<&TlsListener> {
        if self.tls.is_empty() || stream.get_ssl_digest().is_some() {
            return None;
        }
        let local = stream
            .get_socket_digest()?
            .local_addr()?
            .as_inet()
            .copied()?;
        let same_ip = |a: &SocketAddr| a.ip().to_canonical() == local.ip().to_canonical();
        self.tls
            .iter()
            .find(|(addr, ..)| addr.port() == local.port() && same_ip(addr))
            .or_else(|| {
                self.tls
                    .iter()
                    .find(|(addr, ..)| addr.port() == local.port() && addr.ip().is_unspecified())
            })
    }
}

#[async_trait]
impl<A> ServerApp for Gate<A>
where
    A: ServerApp + Send + Sync + 'static,
{
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let stream = match self.acceptor(&stream) {
            None => stream,
            Some((_, acceptor, callbacks)) => {
                let deadline = accepted_at(&stream) + self.header_timeout;
                let l4 = stream.into_any().downcast::<L4Stream>().ok()?;
                let handshake = pingora_core::protocols::tls::server::handshake_with_callback(
                    acceptor,
                    *l4,
                    callbacks.as_ref(),
                );
                match tokio::time::timeout_at(deadline, handshake).await {
                    // An HTTP/2 client must also send its preface in time;
                    // an HTTP/1 head is timed by the head guard.
                    Ok(Ok(tls)) => Box::new(Framed::with_deadline(
                        Box::new(tls),
                        deadline,
                        H2_PREFACE_LEN,
                    )) as Stream,
                    Ok(Err(e)) => {
                        log::debug!("TLS handshake failed: {e}");
                        return None;
                    }
                    Err(_) => {
                        log::debug!("TLS handshake not done within header_timeout");
                        return None;
                    }
                }
            }
        };
        self.http.process_new(stream, shutdown).await
    }

    async fn cleanup(&self) {
        self.http.cleanup().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_are_checked_like_pingora_parses_them() {
        assert_eq!(
            check_head(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 10),
            Ok(Framing::Length(0))
        );
        assert_eq!(
            check_head(b"GET / HTTP/1.1\r\nHost: a\r\nA: 1\r\nB: 2\r\n\r\n", 1)
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
        let framing = |h: &str| {
            check_head(
                format!("POST / HTTP/1.1\r\nHost: a\r\n{h}\r\n\r\n").as_bytes(),
                10,
            )
        };
        assert_eq!(framing("Content-Length: 5"), Ok(Framing::Length(5)));
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
        assert_eq!(
            framing("Transfer-Encoding: gzip, chunked"),
            Ok(Framing::Chunked)
        );
        assert_eq!(
            framing("Transfer-Encoding: chunked\r\nContent-Length: 5"),
            Ok(Framing::Chunked)
        );
        assert_eq!(
            framing("Transfer-Encoding: chunked, gzip").unwrap_err().0,
            400
        );
        assert_eq!(framing("Upgrade: websocket"), Ok(Framing::Upgrade));
        let http10 = check_head(b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 10);
        assert_eq!(http10.unwrap_err().0, 400);
        // Blank lines before the request line are not header fields.
        assert!(check_head(b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", 1).is_ok());
    }

    #[test]
    fn one_unambiguous_authority() {
        let head = |target: &str, fields: &str| {
            check_head(
                format!("GET {target} HTTP/1.1\r\n{fields}\r\n").as_bytes(),
                10,
            )
        };
        assert!(head("/", "Host: a.test\r\n").is_ok());
        assert!(head("/", "Host: a.test:8080\r\n").is_ok());
        assert!(head("http://a.test/x", "Host: a.test\r\n").is_ok());
        // RFC 9112 3.2: every HTTP/1.1 request has a Host, absolute form too.
        assert_eq!(head("http://a.test/x", "").unwrap_err().0, 400);
        for (target, fields) in [
            ("/", "Host: a\r\nHost: b\r\n"),
            ("/", "Host: a\r\nHOST: a\r\n"),
            ("/", ""),
            ("/", "Host: u@a.test\r\n"),
            ("/", "Host: a b\r\n"),
            ("http://b.test/x", "Host: a.test\r\n"),
            ("http://u@a.test/x", "Host: u@a.test\r\n"),
            ("http://a.test\\@b.test/x", "Host: a.test\r\n"),
        ] {
            assert_eq!(
                head(target, fields).unwrap_err().0,
                400,
                "{target} {fields:?}"
            );
        }
        // HTTP/1.0 may leave Host out.
        assert!(check_head(b"GET / HTTP/1.0\r\n\r\n", 10).is_ok());
    }

    #[test]
    fn request_lines_for_the_log() {
        assert_eq!(
            request_line(b"GET /a/b?token=x HTTP/1.1\r\nHost: a\r\n"),
            ("GET".to_string(), "/a/b".to_string())
        );
        assert_eq!(request_line(b""), ("-".to_string(), "-".to_string()));
        assert_eq!(method_label("BREW"), "OTHER");
    }

    #[test]
    fn a_trickled_head_is_searched_from_where_the_last_search_stopped() {
        let head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nbody";
        for from in 1..27 {
            assert_eq!(head_end_from(head, from.min(24)), Some(27), "from {from}");
        }
        assert_eq!(head_end_from(b"GET / HTTP/1.1\nHost: a\n\n", 20), Some(24));
        assert_eq!(head_end_from(b"GET / HTTP/1.1\r\nHost: a\r\n", 10), None);
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
