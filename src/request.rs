//! What the gateway knows of one request as it moves through the phases:
//! filled by the modules in the order `proxy` calls them, read by the ones
//! after (and by `observe` at the end).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use http::StatusCode;
use ipnet::IpNet;
use pingora_core::{Error, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::Session;

use crate::auth::{Identity, Verdict};
use crate::budget::Held;
use crate::cache::{self, Cache, CachePolicy, Slot};
use crate::forwarding::{self, Forwarded, RequestId};
use crate::metrics::Metrics;
use crate::ratelimit::Decision;
use crate::respond::{Phase, Response};
use crate::route::{Route, Selected};
use crate::routing::Params;
use crate::subject::{Claims, Subject};
use crate::tls::ClientCert;
use crate::transform::body::{BodyCount, Refusal, Rewrite};
use crate::upstream::{AfterFailure, Failure, InFlight, Replay, RetryHold, Upstream};

const X_CACHE: http::HeaderName = http::HeaderName::from_static("x-cache");

/// Per-request state, filled as the request moves through the phases.
pub struct RequestCtx {
    pub request_id: RequestId,
    pub client_ip: Option<IpAddr>,
    /// The connecting peer, IPv4-mapped addresses made plain.
    pub peer: Option<IpAddr>,
    pub peer_trusted: bool,
    /// The matched route; until then (and for a request none matches),
    /// [`Route::unmatched`].
    pub route: Arc<Route>,
    /// Path and query for the upstream when they differ from the client's.
    pub upstream_uri: Option<String>,
    /// The routed path, when normalization changed the client's.
    pub normalized_path: Option<String>,
    pub deadline: Option<Instant>,
    /// Targets whose connect failed, for retries.
    /// The upstream chosen for this request (a split's side), once asked.
    pub upstream: Option<Arc<Upstream>>,
    /// The targets this request's attempts went to.
    pub tried: Vec<std::net::SocketAddr>,
    /// The trace this request takes part in, with `tracing`.
    pub trace: Option<crate::trace::RequestTrace>,
    /// The copy `mirror` is taking of this request, until its body ends.
    pub mirror: crate::mirror::Pending,
    /// Retries this request holds against its upstream's budget.
    pub retry_hold: Option<RetryHold>,
    /// The status the upstream answered the last attempt with.
    pub upstream_status: Option<u16>,
    pub in_flight: Option<InFlight>,
    /// The request body against the route's `max_body`.
    pub body: BodyCount,
    /// What the credentials came to on a route with `auth`: who they
    /// verified as, or why not.
    pub identity: Verdict,
    /// The connection's verified client certificate.
    pub client_cert: Option<ClientCert>,
    /// The rate limit count, for the `RateLimit-*` headers.
    pub limit: Option<Decision>,
    /// Path parameters, for an aggregate route's placeholders.
    pub params: Params,
    /// `X-Cache` of an answer the route built itself (aggregation).
    pub x_cache: Option<&'static str>,
    /// The answer came from the route (aggregation): its response header
    /// rules apply.
    pub answered_by_route: bool,
    pub start: Instant,
    /// Bodies held back for a body rule.
    /// Boxed: rare, and the context travels inside every request's future.
    pub request_rewrite: Option<Box<Rewrite>>,
    pub response_rewrite: Option<Box<Rewrite>>,
    /// A body rule refused a body in a body phase: the answer to give.
    pub refusal: Option<Refusal>,
    /// An aggregate answer's share of `max_buffered`, until it is sent.
    pub answer_held: Option<Held>,
    /// The origin CORS allows on this request's responses.
    pub cors: crate::cors::Admitted,
}

impl RequestCtx {
    /// The context of a request that starts now; `unmatched` is
    /// [`Route::unmatched`], made once.
    pub fn begin(unmatched: &Arc<Route>) -> Box<Self> {
        Box::new(RequestCtx {
            request_id: RequestId::default(),
            client_ip: None,
            peer: None,
            peer_trusted: false,
            route: Arc::clone(unmatched),
            upstream_uri: None,
            normalized_path: None,
            deadline: None,
            upstream: None,
            tried: Vec::new(),
            mirror: Default::default(),
            trace: None,
            retry_hold: None,
            upstream_status: None,
            in_flight: None,
            body: BodyCount::default(),
            identity: Verdict::Unverified,
            client_cert: None,
            limit: None,
            params: Params::default(),
            x_cache: None,
            answered_by_route: false,
            start: Instant::now(),
            request_rewrite: None,
            response_rewrite: None,
            refusal: None,
            answer_held: None,
            cors: crate::cors::Admitted::default(),
        })
    }

    /// Whether the cache may serve `req`: a GET or HEAD on a cached route
    /// (and, on a route with auth, entries are per user: no user, no cache).
    pub fn uses_cache(&self, req: &RequestHeader) -> bool {
        let route = &self.route;
        route.cache.is_some()
            && (route.auth.is_none() || self.user().is_some())
            && cache::request_cacheable(&req.method)
    }

    /// Who sent the request: its id (the client's, when well formed), the
    /// connecting peer, and the client address that peer vouches for when
    /// it is a trusted proxy.
    pub fn identify(&mut self, session: &Session, trusted_proxies: &[IpNet]) {
        let req = session.req_header();
        self.request_id = RequestId::from_headers(&req.headers);
        // Set by `tls::Handshake` only for a certificate that verified.
        self.client_cert = session
            .digest()
            .and_then(|d| d.ssl_digest.as_ref())
            .and_then(|tls| tls.extension.get::<ClientCert>())
            .cloned();
        if let Some(peer) = session
            .client_addr()
            .and_then(|a| a.as_inet())
            // An IPv4 client on a dual-stack listener arrives as ::ffff:a.b.c.d.
            .map(|a| a.ip().to_canonical())
        {
            self.peer = Some(peer);
            self.peer_trusted = forwarding::is_trusted(peer, trusted_proxies);
            self.client_ip = Some(forwarding::client_ip(peer, &req.headers, trusted_proxies));
        }
    }

    /// Keeps what routing worked out.
    pub fn routed(&mut self, selected: Selected) {
        self.route = selected.route;
        self.upstream_uri = selected.upstream_uri;
        self.normalized_path = selected.normalized_path;
        self.params = selected.params;
        self.deadline = selected.deadline;
        // Found by routing (`match.claims`), valid or not; `guard` takes it
        // from here.
        self.identity = selected.verified;
    }

    pub fn problem(&self, status: StatusCode, detail: &str) -> Phase {
        Phase::Respond(Response::problem(status, detail, self.request_id.as_str()))
    }

    /// Headers every response of the route carries, whoever wrote it.
    pub fn decorate(&self, resp: &mut ResponseHeader) {
        let route = &self.route;
        if let Some(d) = &route.deprecation {
            d.apply(resp);
        }
        if self.answered_by_route {
            route.response_headers.apply(resp);
        }
        // Set from the cache phase for proxied answers; the gateway's own
        // answers (errors, refusals) never come from the cache.
        if route.cache.is_some() {
            let x = self.x_cache.unwrap_or("BYPASS");
            let _ = resp.insert_header(X_CACHE, x);
        }
        if let Some(limit) = &self.limit {
            limit.headers(resp);
        }
        if let Some(cors) = &route.cors {
            cors.decorate(&self.cors, resp);
        }
    }

    /// The verified token's `sub` (when a string) or the API consumer.
    pub fn user(&self) -> Option<&str> {
        self.identity.identity()?.user()
    }

    /// The verified token's claims or the consumer's fields.
    pub fn claims(&self) -> Option<&Claims> {
        self.identity.identity().map(Identity::claims)
    }

    /// What request keys (rate limits, consistent hashing) are taken from.
    pub fn subject<'a>(&'a self, headers: &'a http::HeaderMap) -> Subject<'a> {
        Subject {
            client_ip: self.client_ip,
            headers,
            claims: self.claims(),
            consumer: self.identity.identity().and_then(Identity::consumer),
        }
    }

    /// The upstream of this request: chosen at the first ask (after the
    /// identity is known, which a split's key may need), then kept, so a
    /// retry stays on the side chosen.
    pub fn upstream(&mut self, headers: &http::HeaderMap) -> Option<Arc<Upstream>> {
        if self.upstream.is_none() {
            let route = Arc::clone(&self.route);
            self.upstream = route.upstream_for(&self.subject(headers)).cloned();
        }
        self.upstream.clone()
    }

    /// After the attempt in flight reached the upstream and ended in
    /// `failure`: whether to try another target (see
    /// `Upstream::retry_after`). Given up, the attempt stays the last.
    pub fn retry_after(
        &mut self,
        failure: Failure,
        session: &mut Session,
        metrics: &Metrics,
        counted: bool,
    ) -> bool {
        let (Some(upstream), Some(failed)) = (self.upstream.clone(), self.in_flight.take()) else {
            return false;
        };
        // A body rule's rewrite is not replayed; a body must be whole and
        // within Pingora's replay buffer (64KiB).
        let body_replayable = self.request_rewrite.is_none()
            && session.is_body_done()
            && !session.retry_buffer_truncated();
        let replay = Replay {
            method: &session.req_header().method,
            body_replayable,
        };
        let id = self.request_id.as_str();
        let hold = &mut self.retry_hold;
        match upstream.retry_after(
            failed,
            failure,
            &replay,
            &mut self.tried,
            hold,
            id,
            metrics,
            counted,
        ) {
            AfterFailure::Retry => {
                if let Some(trace) = self.trace.as_mut() {
                    let (status, error) = match failure {
                        Failure::Status(s) => (Some(s), None),
                        Failure::Reset => (None, Some("connection reset")),
                        Failure::Timeout => (None, Some("timeout")),
                    };
                    let method = session.req_header().method.as_str();
                    trace.end_attempt(method, crate::trace::Outcome { status, error });
                }
                true
            }
            AfterFailure::GiveUp(failed) => {
                self.in_flight = Some(failed);
                false
            }
        }
    }

    /// The retry decision for an error in the exchange with the attempt in
    /// flight (`error_while_proxy`): a failure `retry_on` lists is retried
    /// or final by `retry_after`; any other keeps Pingora's own rule (a
    /// pooled connection that died under an idempotent request is tried
    /// again), never for a body that cannot be replayed as it was.
    pub fn after_upstream_error(
        &mut self,
        e: &mut pingora_core::Error,
        session: &mut Session,
        metrics: &Metrics,
        counted: bool,
        client_reused: bool,
    ) {
        // Nothing once the answer has begun.
        let failure = Failure::of(e).filter(|_| session.response_written().is_none());
        let upstream = self.upstream.as_ref();
        let listed = failure.filter(|f| upstream.is_some_and(|u| u.retry_on.lists(*f)));
        match listed.map(|f| self.retry_after(f, session, metrics, counted)) {
            Some(retried) => e.set_retry(retried),
            None if !session.req_header().method.is_idempotent()
                || session.retry_buffer_truncated()
                || self.request_rewrite.is_some()
                || session.response_written().is_some() =>
            {
                e.set_retry(false)
            }
            None => e.retry.decide_reuse(client_reused),
        }
    }

    /// The request is done (`logging`): with `tracing`, its last attempt's
    /// client span and its server span end.
    pub fn finish_trace(&mut self, session: &Session, e: Option<&Error>) {
        let Some(trace) = self.trace.as_mut() else {
            return;
        };
        let req = session.req_header();
        let upstream_error = e
            .filter(|e| e.esource() == &pingora_core::ErrorSource::Upstream)
            .map(|e| e.etype().as_str());
        trace.finish(&crate::trace::Finished {
            method: req.method.as_str(),
            route: &self.route.name,
            path: req.uri.path(),
            status: session.response_written().map_or(0, |r| r.status.as_u16()),
            scheme: if session.digest().is_some_and(|d| d.ssl_digest.is_some()) {
                "https"
            } else {
                "http"
            },
            client: self.client_ip,
            upstream_status: self.upstream_status,
            upstream_error,
        });
    }

    /// The path as routed (normalized once, in `request_filter`).
    pub fn routed_path<'a>(&'a self, req: &'a RequestHeader) -> &'a str {
        self.normalized_path
            .as_deref()
            .unwrap_or_else(|| req.uri.path())
    }

    /// Ends a phase with a body rule's refusal, answered by `fail_to_proxy`.
    pub fn refuse<T>(&mut self, refusal: Refusal) -> Result<T> {
        self.refusal = Some(refusal);
        Error::e_explain(
            ErrorType::HTTPStatus(refusal.status.as_u16()),
            "refused by a body rule",
        )
    }

    /// Whether the route's deadline has passed.
    pub fn past_deadline(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    /// Where the gateway's own answer to this request (aggregation) may be
    /// kept.
    pub fn cache_slot<'c>(&self, session: &Session, cache: Option<&'c Cache>) -> Option<Slot<'c>> {
        let (cache, policy) = (cache?, self.route.cache.as_ref()?);
        let req = session.req_header();
        // Before the key is built: most requests that skip the cache do so here.
        if !cache::request_cacheable(&req.method) {
            return None;
        }
        let key = self.cache_key(session, policy);
        Some(cache.slot(key, self.routed_path(req), policy))
    }

    /// The cache's primary key for this request (`cache::primary_key`).
    pub fn cache_key(&self, session: &Session, policy: &CachePolicy) -> String {
        let req = session.req_header();
        let origin = cache::origin(&self.forwarded(session));
        let subject = self.identity.identity().and_then(Identity::cache_subject);
        let mut key = cache::primary_key(
            req,
            &origin,
            self.routed_path(req),
            policy,
            subject.as_deref(),
        );
        // A split's sides answer apart: one side's answer is never served
        // to a user of the other (see `upstream`, chosen by then).
        if let (crate::route::Target::Split(_), Some(side)) = (&self.route.target, &self.upstream) {
            key.push_str("\0side:");
            key.push_str(&side.name);
        }
        key
    }

    /// The forwarding fields for this request's upstream side.
    pub fn forwarded<'a>(&self, session: &'a Session) -> Forwarded<'a> {
        let client = session.req_header();
        Forwarded {
            peer: self.peer,
            peer_trusted: self.peer_trusted,
            client_ip: self.client_ip,
            tls: session.digest().is_some_and(|d| d.ssl_digest.is_some()),
            client: &client.headers,
            host: forwarding::raw_host_value(client),
        }
    }
}
