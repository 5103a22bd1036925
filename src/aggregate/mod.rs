//! Aggregation: one client request answered from several upstream calls made
//! concurrently. Joins `request_filter`, after routing, authentication and
//! rate limits: the route answers there and never proxies.
//!
//! Each part picks a healthy target of its upstream like a proxied request
//! (retrying another one after a failed connect) and reuses pooled
//! connections. The answer is a JSON object with the part keys in the order
//! written; a failed optional part is `null` and named in
//! `X-Aggregate-Missing`, a failed required part makes the answer `502`.
//!
//! A part's body is checked to be one JSON document and spliced into the
//! answer as it came, never built into a tree, so an answer costs about
//! the size of its parts. Part bodies and the answer are held within
//! `server.max_buffered` (past it: `503`).

mod answer;

pub use answer::Asked;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::StatusCode;
use pingora_http::RequestHeader;
use serde_json::Value;

use crate::auth::Claims;
use crate::budget::{Budget, Held};
use crate::forwarding::Forwarded;
use crate::outbound::{Body, Client, OutboundError};
use crate::respond::Response;
use crate::routing::Params;
use crate::upstream::Upstream;

/// Everything but the unreserved characters is encoded in a placeholder.
const UNSAFE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');
/// The largest part body read.
const MAX_PART_BODY: usize = 8 << 20;

pub const X_AGGREGATE_MISSING: HeaderName = HeaderName::from_static("x-aggregate-missing");

/// A piece of a part's path template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Text(String),
    /// `{name}`: a path parameter of the route.
    Param(String),
    /// `{query.NAME}`.
    Query(String),
    /// `{claim.NAME}`.
    Claim(String),
}

/// `/users/{id}?x={query.x}`, parsed once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathTemplate(pub Vec<Piece>);

impl PathTemplate {
    pub fn parse(template: &str) -> Result<Self, String> {
        if !template.starts_with('/') {
            return Err(format!("path \"{template}\" must start with /"));
        }
        let mut pieces = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                pieces.push(Piece::Text(rest[..open].to_string()));
            }
            let close = rest[open..]
                .find('}')
                .map(|c| open + c)
                .ok_or_else(|| format!("path \"{template}\": an unclosed {{"))?;
            let name = &rest[open + 1..close];
            let valid = |n: &str| {
                !n.is_empty()
                    && n.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            };
            let piece = if let Some(q) = name.strip_prefix("query.") {
                valid(q).then(|| Piece::Query(q.to_string()))
            } else if let Some(c) = name.strip_prefix("claim.") {
                valid(c).then(|| Piece::Claim(c.to_string()))
            } else {
                valid(name).then(|| Piece::Param(name.to_string()))
            };
            pieces.push(piece.ok_or_else(|| {
                format!("path \"{template}\": \"{{{name}}}\" is not a placeholder ({{name}}, {{query.NAME}} or {{claim.NAME}})")
            })?);
            rest = &rest[close + 1..];
        }
        if rest.contains('}') {
            return Err(format!("path \"{template}\": a stray }}"));
        }
        if !rest.is_empty() {
            pieces.push(Piece::Text(rest.to_string()));
        }
        Ok(PathTemplate(pieces))
    }

    pub fn params(&self) -> impl Iterator<Item = &str> {
        self.0.iter().filter_map(|p| match p {
            Piece::Param(n) => Some(n.as_str()),
            _ => None,
        })
    }

    pub fn needs_claims(&self) -> bool {
        self.0.iter().any(|p| matches!(p, Piece::Claim(_)))
    }

    /// The path with its placeholders filled, or why not. Every value is
    /// percent-encoded as one opaque piece (decoded first where the client
    /// encoded it), so a value can neither add path segments nor query
    /// parameters; `.` and `..` are refused.
    pub fn fill(&self, input: &Input<'_>) -> Result<String, FillError> {
        let mut out = String::new();
        for piece in &self.0 {
            let value: std::borrow::Cow<'_, str> =
                match piece {
                    Piece::Text(t) => {
                        out.push_str(t);
                        continue;
                    }
                    Piece::Param(n) => {
                        let v =
                            input.params.iter().find(|(k, _)| k == n).ok_or_else(|| {
                                FillError::Missing(format!("no value for {{{n}}}"))
                            })?;
                        percent_encoding::percent_decode_str(&v.1).decode_utf8_lossy()
                    }
                    Piece::Query(n) => input
                        .query
                        .and_then(|q| crate::routing::query_values(q, n).next())
                        .ok_or_else(|| FillError::Missing(format!("no value for {{query.{n}}}")))?,
                    Piece::Claim(n) => {
                        let v = input.claims.and_then(|c| c.get(n)).ok_or_else(|| {
                            FillError::Missing(format!("no value for {{claim.{n}}}"))
                        })?;
                        match v {
                            Value::String(s) => s.as_str().into(),
                            other => other.to_string().into(),
                        }
                    }
                };
            if value == "." || value == ".." {
                return Err(FillError::DotSegment);
            }
            out.extend(percent_encoding::utf8_percent_encode(&value, UNSAFE));
        }
        Ok(out)
    }
}
/// Why a part's path could not be filled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FillError {
    /// No value for a placeholder: the part fails.
    Missing(String),
    /// A value is `.` or `..`.
    DotSegment,
}

/// One `parts` entry.
#[derive(Debug)]
pub struct Part {
    pub key: String,
    pub upstream: Arc<Upstream>,
    pub path: PathTemplate,
    pub required: bool,
}

/// A route's `aggregate`.
#[derive(Debug)]
pub struct Aggregate {
    pub timeout: Duration,
    pub parts: Vec<Part>,
}

/// What a fan-out takes from the client's request.
pub struct Input<'a> {
    pub params: &'a Params,
    pub query: Option<&'a str>,
    pub claims: Option<&'a Claims>,
    /// `Authorization`, `X-Request-Id` and the verified claim headers, sent
    /// with every part (each part gets its own `Host`).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The `X-Forwarded-*` fields, as the proxied routes send them.
    pub forwarded: Option<&'a Forwarded<'a>>,
    /// With `tracing`: each part is a client span of this trace (without,
    /// a part gets the client's `traceparent` as it came, from `forwarded`).
    pub trace: Option<&'a crate::trace::RequestTrace>,
}

/// The merged answer: body, the keys of the failed optional parts, and how
/// long the parts allow it to be cached (`None`: not at all).
pub struct Answer {
    pub body: Bytes,
    pub missing: Vec<String>,
    pub cacheable_for: Option<Duration>,
}

/// One part's JSON text and what its `Cache-Control` allows.
struct Fetched {
    json: Bytes,
    /// The part's share of `max_buffered`.
    _held: Held,
    /// `None`: `no-store`, `private` or `no-cache`; else the `max-age`, if any.
    cache: Option<Option<Duration>>,
}

/// Why a fan-out gave no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// This required part failed (`502`).
    Required(String),
    /// A placeholder value is a dot segment: the client's error (`400`).
    BadPlaceholder,
    /// The bodies would pass `max_buffered` (`503`).
    Busy,
}

/// Why one part failed; the text stays in the logs.
#[derive(Debug)]
enum PartError {
    Failed(String),
    Busy,
}

impl From<String> for PartError {
    fn from(why: String) -> Self {
        PartError::Failed(why)
    }
}
impl Answer {
    pub fn response(&self) -> Response {
        let mut r = Response {
            status: StatusCode::OK,
            headers: vec![(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body: self.body.clone(),
        };
        if !self.missing.is_empty() {
            if let Ok(v) = HeaderValue::from_str(&self.missing.join(", ")) {
                r.headers.push((X_AGGREGATE_MISSING, v));
            }
        }
        r
    }
}

/// The answer when the fan-out failed.
pub fn failure(failure: &Failure, request_id: &str) -> Response {
    match failure {
        Failure::Required(part) => Response::problem(
            StatusCode::BAD_GATEWAY,
            &format!("the required part \"{part}\" failed"),
            request_id,
        ),
        Failure::BadPlaceholder => Response::problem(
            StatusCode::BAD_REQUEST,
            "a value for this route's parts is a dot segment",
            request_id,
        ),
        Failure::Busy => Response::problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many bodies are held in memory right now; retry later",
            request_id,
        ),
    }
}

impl Aggregate {
    /// Calls every part concurrently, all within `timeout`. A required part
    /// that fails gives the answer up at once, without waiting for the
    /// others. The answer's share of `budget` is added to `answer_held`,
    /// to be kept until it is sent.
    pub async fn run(
        &self,
        client: &Client,
        input: &Input<'_>,
        budget: &Arc<Budget>,
        answer_held: &mut Option<Held>,
    ) -> Result<Answer, Failure> {
        use futures::StreamExt;
        // Every path is filled before anything is sent: a bad value is the
        // client's error, whichever part it is for.
        let mut paths = Vec::with_capacity(self.parts.len());
        for part in &self.parts {
            match part.path.fill(input) {
                Ok(path) => paths.push(Ok(path)),
                Err(FillError::DotSegment) => return Err(Failure::BadPlaceholder),
                Err(FillError::Missing(what)) => paths.push(Err(what)),
            }
        }
        let deadline = Instant::now() + self.timeout;
        let mut pending: futures::stream::FuturesUnordered<_> = self
            .parts
            .iter()
            .zip(&paths)
            .enumerate()
            .map(|(i, (part, path))| async move {
                let call = async {
                    let path = path.as_ref().map_err(|w| PartError::Failed(w.clone()))?;
                    call(client, part, path, input, deadline, budget).await
                };
                let result = match tokio::time::timeout_at(deadline.into(), call).await {
                    Ok(r) => r,
                    Err(_) => Err(PartError::Failed("timed out".to_string())),
                };
                (i, result)
            })
            .collect();
        let mut results: Vec<Option<Fetched>> = self.parts.iter().map(|_| None).collect();
        while let Some((i, result)) = pending.next().await {
            let part = &self.parts[i];
            match result {
                Ok(fetched) => results[i] = Some(fetched),
                Err(PartError::Busy) => {
                    log::warn!("aggregate part {}: over max_buffered", part.key);
                    return Err(Failure::Busy);
                }
                Err(PartError::Failed(why)) if part.required => {
                    log::warn!("aggregate part {} failed: {why}", part.key);
                    return Err(Failure::Required(part.key.clone()));
                }
                Err(PartError::Failed(why)) => {
                    log::info!("aggregate part {} missing: {why}", part.key);
                }
            }
        }
        let size = 2 + results
            .iter()
            .zip(&self.parts)
            .map(|(r, p)| p.key.len() + 8 + r.as_ref().map_or(4, |f| f.json.len()))
            .sum::<usize>();
        *answer_held = Some(budget.reserve(size as u64).ok_or(Failure::Busy)?);
        let mut body = Vec::with_capacity(size);
        let mut missing = Vec::new();
        let mut cacheable_for = Some(Duration::MAX);
        body.push(b'{');
        for (i, (part, result)) in self.parts.iter().zip(results).enumerate() {
            if i > 0 {
                body.push(b',');
            }
            let key = serde_json::to_string(&part.key).unwrap_or_default();
            body.extend_from_slice(key.as_bytes());
            body.push(b':');
            match result {
                Some(fetched) => {
                    cacheable_for = match (cacheable_for, fetched.cache) {
                        (Some(t), Some(Some(max_age))) => Some(t.min(max_age)),
                        (Some(t), Some(None)) => Some(t),
                        _ => None,
                    };
                    body.extend_from_slice(&fetched.json);
                }
                None => {
                    body.extend_from_slice(b"null");
                    missing.push(part.key.clone());
                }
            }
        }
        body.push(b'}');
        Ok(Answer {
            body: Bytes::from(body),
            missing,
            cacheable_for,
        })
    }
}

/// The JSON text of a part's body, without the whitespace around it, if
/// the body is exactly one JSON document.
fn json_text(body: Bytes) -> Option<Bytes> {
    let raw: &serde_json::value::RawValue = serde_json::from_slice(&body).ok()?;
    let text = raw.get().as_bytes();
    Some(body.slice_ref(text))
}

/// One part: a GET to a healthy target, retried on another after a failed
/// connect (and once more when a pooled connection turns out closed).
/// Fails on a connect error, a non-2xx status, or a body that is not JSON.
/// The error text stays in the logs, never in the answer.
async fn call(
    client: &Client,
    part: &Part,
    path: &str,
    input: &Input<'_>,
    deadline: Instant,
    budget: &Arc<Budget>,
) -> Result<Fetched, PartError> {
    let upstream = &part.upstream;
    let mut tried = Vec::new();
    loop {
        let (in_flight, peer) = match upstream.choose(&[], &tried, Some(deadline)) {
            Ok(chosen) => chosen,
            Err(none) => return Err(none.why().to_string().into()),
        };
        let span = input.trace.map(|t| t.part(in_flight.addr()));
        let mut req = RequestHeader::build("GET", path.as_bytes(), Some(input.headers.len() + 5))
            .map_err(|e| e.to_string())?;
        for (name, value) in &input.headers {
            req.insert_header(name, value.clone())
                .map_err(|e| e.to_string())?;
        }
        if let Some(forwarded) = input.forwarded {
            forwarded.apply(&mut req);
        }
        // The part's own host: its TLS name, else its address.
        let host = if peer.sni.is_empty() {
            in_flight.target().to_string()
        } else {
            peer.sni.clone()
        };
        req.insert_header(http::header::HOST, host)
            .map_err(|e| e.to_string())?;
        req.insert_header(http::header::ACCEPT, "application/json")
            .map_err(|e| e.to_string())?;
        if let Some((_, traceparent)) = &span {
            req.insert_header(crate::trace::TRACEPARENT, traceparent.clone())
                .map_err(|e| e.to_string())?;
            if let Some(state) = input.trace.and_then(|t| t.tracestate()) {
                req.insert_header(crate::trace::TRACESTATE, state.clone())
                    .map_err(|e| e.to_string())?;
            }
        } else if let Some(forwarded) = input.forwarded {
            // Without `tracing`, a part is in the client's trace as a
            // proxied request is: its trace context passes as it came.
            for name in [crate::trace::TRACEPARENT, crate::trace::TRACESTATE] {
                for value in forwarded.client.get_all(&name) {
                    req.append_header(name.clone(), value.clone())
                        .map_err(|e| e.to_string())?;
                }
            }
        }
        let mut held = budget.reserve(0).ok_or(PartError::Busy)?;
        let answer = client
            .send(
                &peer,
                &req,
                Body::Keep {
                    cap: MAX_PART_BODY,
                    hold: &mut |total| held.grow_to(total as u64),
                },
            )
            .await;
        if let (Some(trace), Some((part, _))) = (input.trace, span) {
            let (status, error) = match &answer {
                Ok(a) => (Some(a.status()), None),
                Err(OutboundError::Connect(_)) => (None, Some("connect")),
                Err(OutboundError::TooLarge(_)) => (None, Some("too large")),
                Err(_) => (None, Some("exchange")),
            };
            trace.end_part(part, crate::trace::Outcome { status, error });
        }
        let answer = match answer {
            Ok(a) => a,
            Err(OutboundError::Connect(e)) => {
                tried.push(in_flight.addr());
                if tried.len() > upstream.retries {
                    return Err(format!("connect failed: {e}").into());
                }
                continue;
            }
            Err(OutboundError::OverBudget) => return Err(PartError::Busy),
            Err(e) => return Err(e.to_string().into()),
        };
        if !(200..300).contains(&answer.status()) {
            return Err(format!("status {}", answer.status()).into());
        }
        let cache = crate::cache::origin_lifetime(&answer.head);
        let json = json_text(answer.body.freeze()).ok_or_else(|| "body is not JSON".to_string())?;
        return Ok(Fetched {
            json,
            _held: held,
            cache,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates() {
        let t = PathTemplate::parse("/orders?user={id}&page={query.page}&by={claim.sub}").unwrap();
        assert_eq!(
            t.0,
            vec![
                Piece::Text("/orders?user=".into()),
                Piece::Param("id".into()),
                Piece::Text("&page=".into()),
                Piece::Query("page".into()),
                Piece::Text("&by=".into()),
                Piece::Claim("sub".into()),
            ]
        );
        assert!(PathTemplate::parse("/x/{id").is_err());
        assert!(PathTemplate::parse("/x/{}").is_err());
        assert!(PathTemplate::parse("/x/{claim.}").is_err());
        assert!(PathTemplate::parse("x/{id}").is_err());
        let mut claims = Claims::new();
        claims.insert("sub".into(), Value::from("ann/../x"));
        let params = vec![("id".to_string(), "7".to_string())];
        let input = Input {
            params: &params,
            query: Some("page=2&z=1"),
            claims: Some(&claims),
            headers: vec![],
            forwarded: None,
            trace: None,
        };
        assert_eq!(
            t.fill(&input).unwrap(),
            "/orders?user=7&page=2&by=ann%2F..%2Fx"
        );
        // Values cannot add segments or parameters, nor be dot segments.
        let sneaky = vec![("id".to_string(), "7&role=admin".to_string())];
        let q = Input {
            params: &sneaky,
            query: Some("page=..%2F..%2Fadmin"),
            claims: Some(&claims),
            headers: vec![],
            forwarded: None,
            trace: None,
        };
        assert_eq!(
            t.fill(&q).unwrap(),
            "/orders?user=7%26role%3Dadmin&page=..%2F..%2Fadmin&by=ann%2F..%2Fx"
        );
        let dots = Input {
            query: Some("page=.."),
            ..q
        };
        assert_eq!(t.fill(&dots), Err(FillError::DotSegment));
        let no_query = Input {
            query: None,
            ..dots
        };
        assert!(
            matches!(t.fill(&no_query), Err(FillError::Missing(m)) if m.contains("query.page"))
        );
    }
}
