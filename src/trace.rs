//! Tracing (SPEC section 9.1, the `tracing` section): every request takes
//! part in a W3C trace, the client's `traceparent` continued or a new trace
//! begun, and the upstream is sent a `traceparent` whose parent is the
//! gateway's span for that attempt. A recorded request makes one server
//! span and one client span per upstream attempt or aggregate part, built
//! here as `SpanData` and handed to a bounded queue (never waited on: a
//! full queue drops the span and counts it); a task on the background
//! runtime sends them in batches over OTLP/HTTP (protobuf) with the
//! `opentelemetry-otlp` exporter. Without `tracing` none of this runs and
//! the client's `traceparent` passes untouched.
//!
//! Joins `request_filter` (begin), `upstream_peer` (an attempt starts),
//! `upstream_request_filter` (its `traceparent`), `fail_to_connect` and the
//! retry decisions (an attempt ends) and `logging` (the last attempt and
//! the server span end). Spans carry no header value, query, token or key.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use http::header::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter as _, SpanLinks};
use prometheus::IntCounter;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::transform::headers::EditHeaders;

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// Spans waiting for the exporter; past it, spans are dropped (counted).
pub const QUEUE: usize = 8192;
/// Spans per export request, at most.
const BATCH: usize = 512;
/// How long a span waits for a fuller batch.
const FLUSH_EVERY: Duration = Duration::from_millis(500);
/// One export's limit: a slow collector holds the exporter, never a request.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// A compiled `tracing` section.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceSettings {
    /// The full URL spans are posted to.
    pub otlp: String,
    /// The share of new traces recorded.
    pub sample: f64,
    pub service_name: String,
}

impl TraceSettings {
    /// Whether the URL carries what may be a credential (user info or a
    /// query), which errors naming the URL must not show.
    fn has_credentials(&self) -> bool {
        self.otlp.parse::<http::Uri>().map_or(true, |uri| {
            uri.query().is_some() || uri.authority().is_some_and(|a| a.as_str().contains('@'))
        })
    }

    /// What an error about the collector may say: all of it, unless the URL
    /// carries credentials, which the client's errors would repeat.
    fn error_text(&self, e: &dyn std::fmt::Display) -> String {
        if self.has_credentials() {
            "its error names the URL's credentials, not shown".to_string()
        } else {
            e.to_string()
        }
    }

    /// The collector as the log names it: scheme, host, port and path, never
    /// user info or a query (a hosted collector's credentials travel there).
    pub fn collector(&self) -> String {
        match self.otlp.parse::<http::Uri>() {
            Ok(uri) => format!(
                "{}://{}{}",
                uri.scheme_str().unwrap_or("http"),
                uri.authority()
                    .map_or("", |a| a.as_str().rsplit('@').next().unwrap_or("")),
                uri.path()
            ),
            Err(_) => "the configured collector".to_string(),
        }
    }
}

/// Makes each request's trace and takes the finished spans.
pub struct Tracer {
    sample: f64,
    queue: mpsc::Sender<SpanData>,
    dropped: IntCounter,
    scope: InstrumentationScope,
}

/// The trace one request takes part in.
pub struct RequestTrace {
    tracer: Arc<Tracer>,
    trace_id: TraceId,
    /// The client's span, when its `traceparent` was continued.
    parent: Option<SpanId>,
    pub sampled: bool,
    tracestate: Option<HeaderValue>,
    span_id: SpanId,
    start: SystemTime,
    /// The upstream attempt under way.
    attempt: Option<Attempt>,
    /// The trace id as the access log writes it (32 lowercase hex digits).
    hex: [u8; 32],
}

/// Lowercase hex of `bytes` into `out` (twice as long): by hand, as this
/// runs for every request of a traced gateway.
fn hex_into(bytes: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = DIGITS[usize::from(b >> 4)];
        out[2 * i + 1] = DIGITS[usize::from(b & 0xf)];
    }
}

struct Attempt {
    span_id: SpanId,
    start: SystemTime,
    server: SocketAddr,
}

/// The W3C `traceparent` of `headers`: trace id, parent span id, sampled.
/// Version `00` exactly as the recommendation writes it; a later version
/// is read by its first four fields; anything else is no trace context.
pub fn parse_traceparent(headers: &HeaderMap) -> Option<(TraceId, SpanId, bool)> {
    let mut values = headers.get_all(TRACEPARENT).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    let text = value.to_str().ok()?;
    let fields: Vec<&str> = text.splitn(5, '-').collect();
    let [version, trace, parent, flags, rest @ ..] = fields.as_slice() else {
        return None;
    };
    let lower_hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    if !lower_hex(version, 2)
        || *version == "ff"
        || !lower_hex(trace, 32)
        || !lower_hex(parent, 16)
        || !lower_hex(flags, 2)
    {
        return None;
    }
    if *version == "00" && !rest.is_empty() {
        return None;
    }
    let trace = TraceId::from_hex(trace)
        .ok()
        .filter(|t| *t != TraceId::INVALID)?;
    let parent = SpanId::from_hex(parent)
        .ok()
        .filter(|s| *s != SpanId::INVALID)?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some((trace, parent, flags & 1 == 1))
}

fn random_span_id() -> SpanId {
    SpanId::from(fastrand::u64(1..))
}

fn random_trace_id() -> TraceId {
    TraceId::from(fastrand::u128(1..))
}

/// A new trace id as the access log writes it (32 lowercase hex digits),
/// for a request refused before it took part in a trace (a head the
/// listener refused): with `tracing`, every line has a `trace_id` (SPEC
/// 9.1). Such a trace is never recorded.
pub fn unrecorded_trace_id() -> [u8; 32] {
    trace_hex(random_trace_id())
}

/// A trace id as the access log writes it: 32 lowercase hex digits.
fn trace_hex(trace_id: TraceId) -> [u8; 32] {
    let mut hex = [0u8; 32];
    hex_into(&trace_id.to_bytes(), &mut hex);
    hex
}

impl Tracer {
    /// The tracer, and the queue's far end for [`export_until`].
    pub fn new(settings: &TraceSettings, dropped: IntCounter) -> (Self, mpsc::Receiver<SpanData>) {
        let (queue, spans) = mpsc::channel(QUEUE);
        let scope = InstrumentationScope::builder("gatehouse")
            .with_version(env!("CARGO_PKG_VERSION"))
            .build();
        let tracer = Tracer {
            sample: settings.sample,
            queue,
            dropped,
            scope,
        };
        (tracer, spans)
    }

    /// The trace of a request with `headers`: the client's continued (its
    /// sampling decision kept), or a new one recorded with probability
    /// `sample`.
    pub fn begin(self: &Arc<Self>, headers: &HeaderMap) -> RequestTrace {
        let (trace_id, parent, sampled) = match parse_traceparent(headers) {
            Some((trace, parent, sampled)) => (trace, Some(parent), sampled),
            None => (
                random_trace_id(),
                None,
                self.sample > 0.0 && fastrand::f64() < self.sample,
            ),
        };
        // A tracestate belongs to the traceparent it came with; several
        // fields are one list (W3C), kept to its 512 characters.
        let tracestate = parent.and_then(|_| {
            let mut fields = headers.get_all(TRACESTATE).iter();
            let first = fields.next()?;
            let Some(second) = fields.next() else {
                return Some(first.clone());
            };
            let mut joined = first.as_bytes().to_vec();
            for value in std::iter::once(second).chain(fields) {
                joined.push(b',');
                joined.extend_from_slice(value.as_bytes());
            }
            joined.truncate(512);
            HeaderValue::from_bytes(&joined).ok()
        });
        RequestTrace {
            tracer: Arc::clone(self),
            trace_id,
            parent,
            sampled,
            tracestate,
            span_id: random_span_id(),
            // Only a recorded span needs its times.
            start: if sampled {
                SystemTime::now()
            } else {
                SystemTime::UNIX_EPOCH
            },
            attempt: None,
            hex: trace_hex(trace_id),
        }
    }

    fn record(&self, span: SpanData) {
        if self.queue.try_send(span).is_err() {
            self.dropped.inc();
        }
    }

    fn span(&self, trace: &RequestTrace, draft: Draft) -> SpanData {
        let Draft {
            span_id,
            parent,
            kind,
            name,
            start,
            attributes,
            status,
        } = draft;
        let flags = if trace.sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        SpanData {
            span_context: SpanContext::new(trace.trace_id, span_id, flags, false, TraceState::NONE),
            parent_span_id: parent.0,
            parent_span_is_remote: parent.1,
            span_kind: kind,
            name,
            start_time: start,
            end_time: SystemTime::now(),
            attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status,
            instrumentation_scope: self.scope.clone(),
        }
    }
}

/// A span's own fields; the trace's come from its `RequestTrace`.
struct Draft {
    span_id: SpanId,
    /// The parent, and whether it is remote (the client's).
    parent: (SpanId, bool),
    kind: SpanKind,
    name: Cow<'static, str>,
    start: SystemTime,
    attributes: Vec<KeyValue>,
    status: Status,
}

/// What a client span ends with.
pub struct Outcome<'a> {
    pub status: Option<u16>,
    /// The error's kind (`ConnectRefused`, `ReadTimedout`, ...), never its text.
    pub error: Option<&'a str>,
}

impl RequestTrace {
    /// The trace id, 32 hex digits, for the access log.
    pub fn trace_id(&self) -> &str {
        std::str::from_utf8(&self.hex).unwrap_or_default()
    }

    /// `traceparent` naming `span_id` as the parent.
    fn traceparent(&self, span_id: SpanId) -> HeaderValue {
        let mut text = *b"00-00000000000000000000000000000000-0000000000000000-00";
        text[3..35].copy_from_slice(&self.hex);
        hex_into(&span_id.to_bytes(), &mut text[36..52]);
        if self.sampled {
            text[54] = b'1';
        }
        HeaderValue::from_bytes(&text).unwrap_or(HeaderValue::from_static(""))
    }

    /// An upstream attempt to `server` starts (`upstream_peer`).
    pub fn attempt(&mut self, method: &str, server: SocketAddr) {
        // One still open was retried by Pingora itself (a pooled connection
        // that died under the request): it ends here.
        if self.attempt.is_some() {
            let outcome = Outcome {
                status: None,
                error: Some("retried"),
            };
            self.end_attempt(method, outcome);
        }
        let start = if self.sampled {
            SystemTime::now()
        } else {
            SystemTime::UNIX_EPOCH
        };
        self.attempt = Some(Attempt {
            span_id: random_span_id(),
            start,
            server,
        });
    }

    /// The attempt's `traceparent` (and the client's `tracestate`) on the
    /// request the upstream is sent.
    pub fn propagate(&self, upstream: &mut impl EditHeaders) {
        let span = self.attempt.as_ref().map_or(self.span_id, |a| a.span_id);
        upstream.insert(&TRACEPARENT, self.traceparent(span));
        match &self.tracestate {
            Some(state) => upstream.insert(&TRACESTATE, state.clone()),
            None if upstream.header_map().contains_key(&TRACESTATE) => {
                upstream.remove(&TRACESTATE);
            }
            None => {}
        }
    }

    /// The attempt under way ends: its client span, when recorded.
    pub fn end_attempt(&mut self, method: &str, outcome: Outcome<'_>) {
        let Some(attempt) = self.attempt.take() else {
            return;
        };
        if !self.sampled {
            return;
        }
        let span = self.client_span(attempt, method, outcome);
        self.tracer.record(span);
    }

    fn client_span(&self, attempt: Attempt, method: &str, outcome: Outcome<'_>) -> SpanData {
        let mut attributes = vec![
            KeyValue::new("http.request.method", method.to_string()),
            KeyValue::new("server.address", attempt.server.ip().to_string()),
            KeyValue::new("server.port", i64::from(attempt.server.port())),
        ];
        if let Some(status) = outcome.status {
            attributes.push(KeyValue::new(
                "http.response.status_code",
                i64::from(status),
            ));
        }
        let failed = outcome.error.is_some() || outcome.status.is_some_and(|s| s >= 500);
        if let Some(error) = outcome.error {
            attributes.push(KeyValue::new("error.type", error.to_string()));
        } else if let Some(status) = outcome.status.filter(|s| *s >= 500) {
            attributes.push(KeyValue::new("error.type", status.to_string()));
        }
        let status = if failed {
            Status::error(
                outcome
                    .error
                    .map_or_else(|| "5xx".to_string(), str::to_string),
            )
        } else {
            Status::Unset
        };
        self.tracer.span(
            self,
            Draft {
                span_id: attempt.span_id,
                parent: (self.span_id, false),
                kind: SpanKind::Client,
                name: Cow::Owned(method.to_string()),
                start: attempt.start,
                attributes,
                status,
            },
        )
    }

    /// The client's `tracestate`, passed along with the trace.
    pub fn tracestate(&self) -> Option<&HeaderValue> {
        self.tracestate.as_ref()
    }

    /// An aggregate part's span and the `traceparent` its request carries.
    pub fn part(&self, server: SocketAddr) -> (PartSpan, HeaderValue) {
        let span_id = random_span_id();
        let part = PartSpan {
            span_id,
            start: SystemTime::now(),
            server,
        };
        (part, self.traceparent(span_id))
    }

    /// A part's request ended.
    pub fn end_part(&self, part: PartSpan, outcome: Outcome<'_>) {
        if !self.sampled {
            return;
        }
        let attempt = Attempt {
            span_id: part.span_id,
            start: part.start,
            server: part.server,
        };
        self.tracer
            .record(self.client_span(attempt, "GET", outcome));
    }

    /// The request is done (`logging`): its last attempt and its server span.
    pub fn finish(&mut self, done: &Finished<'_>) {
        if self.attempt.is_some() {
            let outcome = Outcome {
                status: done.upstream_status,
                error: done.upstream_error,
            };
            self.end_attempt(done.method, outcome);
        }
        if !self.sampled {
            return;
        }
        let mut attributes = vec![
            KeyValue::new("http.request.method", done.method.to_string()),
            KeyValue::new("http.route", done.route.to_string()),
            KeyValue::new("url.path", done.path.to_string()),
            KeyValue::new("url.scheme", done.scheme),
            KeyValue::new("http.response.status_code", i64::from(done.status)),
        ];
        if let Some(ip) = done.client {
            attributes.push(KeyValue::new("client.address", ip.to_string()));
        }
        // Semantic conventions: a 5xx is its own error type; a request
        // that got no answer at all is named by its upstream's error.
        let error = match done.status {
            0 => Some(done.upstream_error.unwrap_or("_OTHER").to_string()),
            500.. => Some(done.status.to_string()),
            _ => None,
        };
        let status = match error {
            Some(error) => {
                attributes.push(KeyValue::new("error.type", error.clone()));
                Status::error(error)
            }
            None => Status::Unset,
        };
        let name = format!("{} {}", done.method, done.route);
        let parent = (
            self.parent.unwrap_or(SpanId::INVALID),
            self.parent.is_some(),
        );
        let span = self.tracer.span(
            self,
            Draft {
                span_id: self.span_id,
                parent,
                kind: SpanKind::Server,
                name: Cow::Owned(name),
                start: self.start,
                attributes,
                status,
            },
        );
        self.tracer.record(span);
    }
}

/// An aggregate part's client span, under way.
pub struct PartSpan {
    span_id: SpanId,
    start: SystemTime,
    server: SocketAddr,
}

/// What the server span records of a finished request.
pub struct Finished<'a> {
    pub method: &'a str,
    pub route: &'a str,
    /// Without the query.
    pub path: &'a str,
    pub status: u16,
    /// `http` or `https`: how the client's connection came.
    pub scheme: &'static str,
    pub client: Option<IpAddr>,
    pub upstream_status: Option<u16>,
    pub upstream_error: Option<&'a str>,
}

/// The background service that runs [`export_until`] on its runtime.
pub struct TraceExport {
    settings: TraceSettings,
    spans: Mutex<Option<mpsc::Receiver<SpanData>>>,
    dropped: IntCounter,
    stop: CancellationToken,
}

impl TraceExport {
    pub fn new(
        settings: TraceSettings,
        spans: mpsc::Receiver<SpanData>,
        dropped: IntCounter,
        stop: CancellationToken,
    ) -> Self {
        TraceExport {
            settings,
            spans: Mutex::new(Some(spans)),
            dropped,
            stop,
        }
    }
}

#[async_trait::async_trait]
impl pingora_core::services::background::BackgroundService for TraceExport {
    async fn start(&self, mut shutdown: pingora_core::server::ShutdownWatch) {
        let spans = self.spans.lock().ok().and_then(|mut s| s.take());
        let Some(spans) = spans else {
            return;
        };
        // When shutting down begins, what is queued goes at once: Pingora
        // may end this runtime before `stop` comes.
        let flush_now = CancellationToken::new();
        let on_shutdown = flush_now.clone();
        tokio::spawn(async move {
            let _ = shutdown.changed().await;
            on_shutdown.cancel();
        });
        let (settings, dropped) = (self.settings.clone(), self.dropped.clone());
        export_until(settings, spans, dropped, self.stop.clone(), flush_now).await;
    }
}

/// Sends the queued spans to `settings.otlp` in batches until `stop`, then
/// what is left. Runs on the background runtime; a failed export drops its
/// batch (counted in `dropped`).
pub async fn export_until(
    settings: TraceSettings,
    mut spans: mpsc::Receiver<SpanData>,
    dropped: IntCounter,
    stop: CancellationToken,
    flush_now: CancellationToken,
) {
    use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
    // No proxy from the environment, no redirects: spans go to the URL the
    // configuration names and nowhere else.
    let client = otlp_http::Client::builder()
        .timeout(EXPORT_TIMEOUT)
        .redirect(otlp_http::redirect::Policy::none())
        .no_proxy()
        .build();
    let client = match client {
        Ok(client) => client,
        Err(e) => {
            log::error!("tracing: the OTLP client cannot be built: {e}; spans are dropped");
            return;
        }
    };
    let built = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(client)
        .with_endpoint(settings.otlp.clone())
        .with_timeout(EXPORT_TIMEOUT)
        .build();
    let mut exporter = match built {
        Ok(e) => e,
        Err(e) => {
            log::error!(
                "tracing: the OTLP exporter cannot be built: {}; spans are dropped",
                settings.error_text(&e)
            );
            return;
        }
    };
    let resource = opentelemetry_sdk::Resource::builder_empty()
        .with_service_name(settings.service_name.clone())
        .build();
    exporter.set_resource(&resource);
    let mut failing = false;
    let mut batch: Vec<SpanData> = Vec::with_capacity(BATCH);
    loop {
        let stopping = tokio::select! {
            () = stop.cancelled() => true,
            got = spans.recv() => match got {
                Some(span) => { batch.push(span); false }
                None => true,
            },
        };
        if !stopping {
            // A little longer for a fuller batch (not once shutting down).
            let wait = if flush_now.is_cancelled() {
                Duration::ZERO
            } else {
                FLUSH_EVERY
            };
            let until = tokio::time::Instant::now() + wait;
            while batch.len() < BATCH {
                match tokio::time::timeout_at(until, spans.recv()).await {
                    Ok(Some(span)) => batch.push(span),
                    _ => break,
                }
            }
        } else {
            while let Ok(span) = spans.try_recv() {
                batch.push(span);
            }
        }
        if !batch.is_empty() {
            let sent = std::mem::take(&mut batch);
            let count = sent.len() as u64;
            match exporter.export(sent).await {
                Ok(()) => {
                    if failing {
                        log::info!(
                            "tracing: the collector at {} takes spans again",
                            settings.collector()
                        );
                    }
                    failing = false;
                }
                Err(e) => {
                    dropped.inc_by(count);
                    if !failing {
                        let (collector, why) = (settings.collector(), settings.error_text(&e));
                        log::warn!(
                            "tracing: exporting to {collector} failed ({why}); dropping spans until it works"
                        );
                    }
                    failing = true;
                }
            }
        }
        if stopping {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_logged_collector_has_no_credentials() {
        let named = |otlp: &str| {
            super::TraceSettings {
                otlp: otlp.to_string(),
                sample: 1.0,
                service_name: String::new(),
            }
            .collector()
        };
        assert_eq!(
            named("https://user:secret@otlp.example:4318/v1/traces?api_key=k"),
            "https://otlp.example:4318/v1/traces"
        );
        assert_eq!(
            named("http://127.0.0.1:4318/v1/traces"),
            "http://127.0.0.1:4318/v1/traces"
        );
        let settings = |otlp: &str| super::TraceSettings {
            otlp: otlp.to_string(),
            sample: 1.0,
            service_name: String::new(),
        };
        let shown = |otlp: &str| settings(otlp).error_text(&"refused by http://x");
        assert_eq!(shown("http://collector:4318"), "refused by http://x");
        assert_eq!(
            shown("HTTP://collector:4318/v1/traces"),
            "refused by http://x"
        );
        assert!(!shown("https://u:p@collector/v1/traces").contains("http://x"));
        assert!(!shown("https://collector/v1/traces?key=k").contains("http://x"));
    }

    use super::*;

    fn with(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, value.parse().unwrap());
        h
    }

    #[test]
    fn a_traceparent_is_written_as_it_is_read() {
        let (tracer, _spans) = Tracer::new(
            &TraceSettings {
                otlp: String::new(),
                sample: 0.0,
                service_name: "t".into(),
            },
            IntCounter::new("t", "t").unwrap(),
        );
        let tracer = Arc::new(tracer);
        for sampled in [true, false] {
            let flags = if sampled { "01" } else { "00" };
            let incoming = format!("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-{flags}");
            let trace = tracer.begin(&with(&incoming));
            assert_eq!(trace.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
            let span = SpanId::from(0x0123_4567_89ab_cdef);
            let written = trace.traceparent(span);
            assert_eq!(
                written.to_str().unwrap(),
                format!("00-4bf92f3577b34da6a3ce929d0e0e4736-0123456789abcdef-{flags}")
            );
            let mut again = HeaderMap::new();
            again.insert(TRACEPARENT, written);
            assert_eq!(parse_traceparent(&again).unwrap().2, sampled);
        }
    }

    #[test]
    fn traceparents_are_read_as_the_recommendation_writes_them() {
        let ok = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let (trace, parent, sampled) = parse_traceparent(&with(ok)).unwrap();
        assert_eq!(format!("{trace:032x}"), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(format!("{parent:016x}"), "00f067aa0ba902b7");
        assert!(sampled);
        assert!(
            !parse_traceparent(&with(&ok.replace("-01", "-00")))
                .unwrap()
                .2
        );
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "garbage",
        ] {
            assert!(parse_traceparent(&with(bad)).is_none(), "{bad}");
        }
        // A later version is read by its first fields.
        assert!(parse_traceparent(&with(&format!("01{}-more", &ok[2..]))).is_some());
        let mut two = with(ok);
        two.append(TRACEPARENT, ok.parse().unwrap());
        assert!(parse_traceparent(&two).is_none(), "two traceparents: none");
    }
}
