//! The Pingora `ProxyHttp` implementation. It only sequences the modules:
//! each hook loads what it needs from the request context and hands over to
//! routing, forwarding, transform and upstream code.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use http::header::{HeaderValue, ALLOW};
use http::StatusCode;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::{Error, ErrorSource, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};

use crate::access_log::{self, AccessLog};
use crate::aggregate;
use crate::auth::{self, Claims};
use crate::budget::Budget;
use crate::cache::{self, Cache};
use crate::config::ServerSettings;
use crate::forwarding::REQUEST_ID;
use crate::forwarding::{self, Forwarded, RequestId};
use crate::gateway::Gateway;
use crate::metrics::{self, Metrics, UpstreamOutcome};
use crate::outbound::Client;
use crate::ratelimit::{Decision, RateLimit, Subject};
use crate::respond::{Phase, Response};
use crate::route::Route;
use crate::routing::Params;
use crate::routing::{
    normalize_path, path_params, without_params, PathParams, PathParamsFound, RouteOutcome,
    RouteRequest,
};
use crate::transform::body::{declared_length, Refusal, Rewrite};
use crate::transform::headers::{strip_hop_by_hop, strip_request_hop_by_hop};
use crate::upstream::{InFlight, Pick};
use pingora_cache::key::HashBinary;
use pingora_cache::{CacheKey, CacheMeta, NoCacheReason, RespCacheable};

const X_CACHE: http::HeaderName = http::HeaderName::from_static("x-cache");

pub struct Proxy {
    gateway: Arc<Gateway>,
    settings: Arc<ServerSettings>,
    cache: Option<Cache>,
    metrics: Arc<Metrics>,
    log: AccessLog,
    /// For aggregate parts; shared with health checks and JWK set fetches.
    parts: Client,
    /// `server.max_buffered`: bodies held whole for body rules and
    /// aggregation.
    buffered: Arc<Budget>,
}

impl Proxy {
    pub fn new(
        gateway: Arc<Gateway>,
        settings: Arc<ServerSettings>,
        cache: Option<Cache>,
        metrics: Arc<Metrics>,
        log: AccessLog,
        parts: Client,
        buffered: Arc<Budget>,
    ) -> Self {
        Proxy {
            gateway,
            settings,
            cache,
            metrics,
            log,
            parts,
            buffered,
        }
    }
}

/// Per-request state, filled as the request moves through the phases.
#[derive(Default)]
pub struct RequestCtx {
    request_id: RequestId,
    client_ip: Option<IpAddr>,
    /// The connecting peer, IPv4-mapped addresses made plain.
    peer: Option<IpAddr>,
    peer_trusted: bool,
    route: Option<Arc<Route>>,
    /// Path and query for the upstream when they differ from the client's.
    upstream_uri: Option<String>,
    /// The routed path, when normalization changed the client's.
    normalized_path: Option<String>,
    deadline: Option<Instant>,
    /// Targets whose connect failed, for retries.
    tried: Vec<usize>,
    in_flight: Option<InFlight>,
    /// Counted against the route's `max_body` when no length was declared.
    body_limit: Option<u64>,
    body_seen: u64,
    /// The verified token's claims, on a route with `auth`.
    claims: Option<Arc<Claims>>,
    /// The rate limit count, for the `RateLimit-*` headers.
    limit: Option<Decision>,
    /// Path parameters, for an aggregate route's placeholders.
    params: Params,
    /// `X-Cache` of an answer the route built itself (aggregation).
    x_cache: Option<&'static str>,
    /// The answer came from the route (aggregation): its response header
    /// rules apply.
    answered_by_route: bool,
    start: Option<Instant>,
    /// Bodies held back for a body rule.
    /// Boxed: rare, and the context travels inside every request's future.
    request_rewrite: Option<Box<Rewrite>>,
    response_rewrite: Option<Box<Rewrite>>,
    /// A body rule refused a body in a body phase: the answer to give.
    refusal: Option<Refusal>,
    /// An aggregate answer's share of `max_buffered`, until it is sent.
    answer_held: Option<crate::budget::Held>,
}

impl RequestCtx {
    fn problem(&self, status: StatusCode, detail: &str) -> Phase {
        Phase::Respond(Response::problem(status, detail, self.request_id.as_str()))
    }

    /// Headers every response of the route carries, whoever wrote it.
    fn decorate(&self, resp: &mut ResponseHeader) {
        if let Some(d) = self.route.as_ref().and_then(|r| r.deprecation.as_ref()) {
            d.apply(resp);
        }
        if let Some(route) = &self.route {
            if self.answered_by_route {
                route.response_headers.apply(resp);
            }
            // Set from the cache phase for proxied answers; the gateway's
            // own answers (errors, refusals) never come from the cache.
            if route.cache.is_some() {
                let x = self.x_cache.unwrap_or("BYPASS");
                let _ = resp.insert_header(X_CACHE, x);
            }
        }
        if let Some(limit) = &self.limit {
            limit.headers(resp);
        }
    }

    fn count(&mut self, limit: &RateLimit, headers: &http::HeaderMap, metrics: &Metrics) -> Phase {
        let decision = limit.admit(&Subject {
            client_ip: self.client_ip,
            headers,
            claims: self.claims.as_deref(),
            consumer: None,
        });
        self.limit = Some(decision);
        if !decision.allowed {
            if let Some(route) = &self.route {
                metrics.rate_limited.with_label_values(&[&route.name]).inc();
            }
        }
        if decision.allowed {
            Phase::Continue
        } else {
            Phase::Respond(decision.refusal(self.request_id.as_str()))
        }
    }

    /// The verified token's `sub`, when it is a string.
    fn subject(&self) -> Option<&str> {
        self.claims.as_ref()?.get("sub")?.as_str()
    }

    /// The path as routed (normalized once, in `admit`).
    fn routed_path<'a>(&'a self, req: &'a RequestHeader) -> &'a str {
        self.normalized_path
            .as_deref()
            .unwrap_or_else(|| req.uri.path())
    }

    /// Ends a phase with a body rule's refusal, answered by `fail_to_proxy`.
    fn refuse<T>(&mut self, refusal: Refusal) -> Result<T> {
        self.refusal = Some(refusal);
        Error::e_explain(
            ErrorType::HTTPStatus(refusal.status.as_u16()),
            "refused by a body rule",
        )
    }

    /// Whether the route's deadline has passed.
    fn past_deadline(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }
}

/// The forwarding fields for this request's upstream side.
fn forwarded<'a>(session: &'a Session, ctx: &RequestCtx) -> Forwarded<'a> {
    let client = session.req_header();
    Forwarded {
        peer: ctx.peer,
        peer_trusted: ctx.peer_trusted,
        client_ip: ctx.client_ip,
        tls: session.digest().is_some_and(|d| d.ssl_digest.is_some()),
        client: &client.headers,
        host: forwarding::raw_host_value(client),
    }
}

impl Proxy {
    /// Everything decided before going upstream; synchronous on purpose.
    fn admit(&self, session: &mut Session, ctx: &mut RequestCtx) -> Phase {
        let req = session.req_header();
        ctx.request_id = RequestId::from_headers(&req.headers);
        if let Some(peer) = session
            .client_addr()
            .and_then(|a| a.as_inet())
            // An IPv4 client on a dual-stack listener arrives as ::ffff:a.b.c.d.
            .map(|a| a.ip().to_canonical())
        {
            ctx.peer = Some(peer);
            ctx.peer_trusted = forwarding::is_trusted(peer, &self.settings.trusted_proxies);
            ctx.client_ip = Some(forwarding::client_ip(
                peer,
                &req.headers,
                &self.settings.trusted_proxies,
            ));
        }
        // HTTP/1 heads were measured as they arrived (`listener`); HTTP/2
        // heads are checked here.
        if session.is_http2() {
            if let Some(phase) = self.check_h2_head(req, ctx) {
                return phase;
            }
        }
        // The router sees the parsed path; the raw bytes must say the same.
        if !req.raw_path_is_utf8() {
            return ctx.problem(StatusCode::BAD_REQUEST, "the path is not valid UTF-8");
        }
        let path = match normalize_path(req.uri.path()) {
            Ok(p) => p,
            Err(e) => return ctx.problem(StatusCode::BAD_REQUEST, &e.to_string()),
        };
        // Routes match what a Java upstream would serve: `;` parameters are
        // refused, or (`path_params: keep`) ignored for matching.
        let routed: Option<String> = match (path_params(&path), self.settings.path_params) {
            (PathParamsFound::None, _) => None,
            (_, PathParams::Keep) => Some(without_params(&path)),
            (_, PathParams::Reject) => {
                return ctx.problem(
                    StatusCode::BAD_REQUEST,
                    "the path holds a ; parameter, which this gateway does not route",
                )
            }
        };
        let match_path = routed.as_deref().unwrap_or(&path);
        let runtime = self.gateway.load();
        let outcome = runtime.router.find(&RouteRequest {
            method: &req.method,
            path: match_path,
            host: forwarding::request_host(req),
            headers: &req.headers,
        });
        let route = match outcome {
            RouteOutcome::Matched(route) => Arc::clone(route),
            RouteOutcome::NotFound => {
                return ctx.problem(StatusCode::NOT_FOUND, "no route matches this request")
            }
            RouteOutcome::MethodNotAllowed { allow } => {
                let Phase::Respond(r) = ctx.problem(
                    StatusCode::METHOD_NOT_ALLOWED,
                    &format!("{} is not allowed here", req.method),
                ) else {
                    unreachable!()
                };
                let allow = HeaderValue::from_str(&allow).unwrap_or(HeaderValue::from_static(""));
                return Phase::Respond(r.with_header(ALLOW, allow));
            }
        };
        let max_body = route.max_body;
        // Anything but an origin-form target as the client wrote it is
        // rebuilt, so the upstream gets exactly the path that was routed.
        let rebuild = !route.rewrite.is_identity()
            || matches!(path, std::borrow::Cow::Owned(_))
            || !req.raw_path().starts_with(b"/");
        if rebuild {
            ctx.upstream_uri = Some(route.rewrite.apply_kept(&path, match_path, req.uri.query()));
        }
        ctx.deadline = route.timeout.and_then(|t| Instant::now().checked_add(t));
        if route.aggregate().is_some() {
            route
                .matcher
                .path
                .matches(match_path, Some(&mut ctx.params));
        }
        if let std::borrow::Cow::Owned(p) = path {
            ctx.normalized_path = Some(p);
        }
        ctx.route = Some(route);
        let chunked =
            !session.is_http2() && req.headers.contains_key(http::header::TRANSFER_ENCODING);
        match declared_length(&req.headers) {
            Some(len) if len > max_body => {
                return ctx.problem(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &format!("the request body is larger than {max_body} bytes"),
                );
            }
            Some(_) => {}
            None => ctx.body_limit = Some(max_body),
        }
        // Each read of a body must come within body_timeout of the last: a
        // client trickling it cannot hold an upstream connection for long.
        session.set_read_timeout(Some(self.settings.body_timeout));
        // After a chunked HTTP/1 body the connection closes (`listener`
        // cannot tell where the next request starts): the answer says so.
        if chunked {
            session.set_keepalive(None);
        }
        Phase::Continue
    }

    /// Body rules, decided before any upstream is chosen: a request body
    /// they cannot read is refused before anything is sent, and on a route
    /// whose response rules remove fields the client's `Range` is dropped
    /// (a part of the body would slip past them); the client gets the whole
    /// filtered body.
    fn prepare_bodies(&self, session: &mut Session, ctx: &mut RequestCtx) -> Phase {
        let Some(route) = ctx.route.clone() else {
            return Phase::Continue;
        };
        if route.response_body.as_ref().is_some_and(|r| r.removes()) {
            let req = session.req_header_mut();
            if req.headers.contains_key(http::header::RANGE) {
                req.remove_header(&http::header::RANGE);
            }
            if req.headers.contains_key(http::header::IF_RANGE) {
                req.remove_header(&http::header::IF_RANGE);
            }
        }
        if let Some(rules) = &route.request_body {
            let has_body = !session.is_body_empty();
            match Rewrite::for_request(
                rules,
                session.req_header(),
                has_body,
                self.settings.max_transform_size,
                &self.buffered,
            ) {
                Ok(rewrite) => ctx.request_rewrite = rewrite.map(Box::new),
                Err(refusal) => return ctx.problem(refusal.status, refusal.detail),
            }
        }
        Phase::Continue
    }

    fn check_h2_head(&self, req: &RequestHeader, ctx: &RequestCtx) -> Option<Phase> {
        let count = req.headers.len();
        let size: usize = req
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 4)
            .sum::<usize>()
            + req.uri.path().len();
        if count > self.settings.max_headers || size > self.settings.max_header_size {
            return Some(ctx.problem(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "the request head is too large",
            ));
        }
        None
    }

    /// Rate limit and authentication. An IP- or header-keyed limit counts
    /// first, so floods of bad tokens are limited before they cost a
    /// signature check; a claim-keyed one needs the verified token.
    async fn guard(&self, session: &Session, ctx: &mut RequestCtx) -> Phase {
        let Some(route) = ctx.route.clone() else {
            return Phase::Continue;
        };
        let headers = &session.req_header().headers;
        let (early, late) = match &route.rate_limit {
            Some(l) if l.key.needs_claims() => (None, Some(l)),
            other => (other.as_ref(), None),
        };
        if let Some(limit) = early {
            if let Phase::Respond(r) = ctx.count(limit, headers, &self.metrics) {
                return Phase::Respond(r);
            }
        }
        if let Some(auth) = &route.auth {
            match auth.authorize(session.req_header()).await {
                Ok(claims) => ctx.claims = Some(claims),
                Err(e) => {
                    self.metrics
                        .auth_failures
                        .with_label_values(&[&route.name, e.reason()])
                        .inc();
                    // Refused tokens still spend the client's budget (by IP),
                    // so a flood of them is limited too.
                    if let Some(limit) = late {
                        if let Phase::Respond(r) = ctx.count(limit, headers, &self.metrics) {
                            return Phase::Respond(r);
                        }
                    }
                    return Phase::Respond(e.response(ctx.request_id.as_str()));
                }
            }
        }
        match late {
            Some(limit) => ctx.count(limit, headers, &self.metrics),
            None => Phase::Continue,
        }
    }

    /// Metrics and the access log line, once the response is done.
    fn record(&self, session: &Session, e: Option<&Error>, ctx: &RequestCtx) {
        let req = session.req_header();
        let route = ctx.route.as_ref().map_or("-", |r| &*r.name);
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let elapsed = ctx.start.map_or(std::time::Duration::ZERO, |s| s.elapsed());
        // X-Cache as sent; a cached route's own answers are BYPASS.
        let cache = ctx
            .route
            .as_ref()
            .filter(|r| r.cache.is_some())
            .map(|_| ctx.x_cache.unwrap_or("BYPASS"));
        if self.settings.metrics {
            let mut buf = [0u8; 3];
            let m = &self.metrics;
            m.requests
                .with_label_values(&[
                    route,
                    metrics::method_label(&req.method),
                    metrics::status_label(status, &mut buf),
                ])
                .inc();
            let seconds = elapsed.as_secs_f64();
            match &ctx.route {
                Some(r) => r
                    .duration_series
                    .get(|| m.duration.with_label_values(&[route]))
                    .observe(seconds),
                None => m.duration.with_label_values(&[route]).observe(seconds),
            }
            if let Some(f) = &ctx.in_flight {
                let outcome = match e {
                    None => UpstreamOutcome::Success,
                    Some(e) if e.esource() != &ErrorSource::Upstream => UpstreamOutcome::Aborted,
                    Some(e) => match e.etype() {
                        ErrorType::ReadTimedout | ErrorType::WriteTimedout => {
                            UpstreamOutcome::Timeout
                        }
                        _ => UpstreamOutcome::Error,
                    },
                };
                f.count(outcome, &m.upstream_requests);
            }
            if let Some(x) = cache {
                let result = match x {
                    "HIT" => "hit",
                    "MISS" => "miss",
                    _ => "bypass",
                };
                m.cache_requests.with_label_values(&[route, result]).inc();
            }
        }
        if !self.log.enabled() {
            return;
        }
        let body_note = ctx
            .request_rewrite
            .as_ref()
            .and_then(|r| r.untouched)
            .or_else(|| ctx.response_rewrite.as_ref().and_then(|r| r.untouched));
        let error = e.map(|e| e.etype().as_str());
        self.log.write(&access_log::Entry {
            ts: std::time::SystemTime::now(),
            request_id: ctx.request_id.as_str(),
            client: ctx.client_ip,
            method: req.method.as_str(),
            path: req.uri.path(),
            route,
            upstream: ctx.in_flight.as_ref().map(|f| f.upstream()),
            target: ctx.in_flight.as_ref().map(|f| f.target()),
            status,
            duration_ms: elapsed.as_secs_f64() * 1000.0,
            bytes_sent: session.body_bytes_sent(),
            cache,
            user: ctx.subject(),
            error,
            body: body_note,
        });
    }

    /// Answers an aggregate route: from the cache when it can, else from
    /// its parts (and caches a complete answer).
    async fn aggregate(&self, session: &Session, ctx: &mut RequestCtx) -> Phase {
        let Some(route) = ctx.route.clone() else {
            return Phase::Continue;
        };
        let Some(agg) = route.aggregate() else {
            return Phase::Continue;
        };
        let req = session.req_header();
        let cache_slot = match (&self.cache, &route.cache) {
            (Some(c), Some(policy)) if cache::request_cacheable(&req.method) => {
                let path = ctx.routed_path(req);
                let origin = cache::origin(&forwarded(session, ctx));
                let primary = cache::primary_key(req, &origin, path, policy, ctx.subject());
                Some((c, policy, cache::entry_key(primary), path.to_owned()))
            }
            _ => None,
        };
        // Concurrent misses for one key wait for the first to fill it.
        let mut _filling = None;
        if let Some((c, _, key, _)) = &cache_slot {
            let mut hit = c.storage.get_fresh(key);
            if hit.is_none() {
                _filling = c.fill(*key).await;
                // Filled while we waited?
                hit = c.storage.get_fresh(key);
            }
            if let Some(body) = hit {
                ctx.x_cache = Some("HIT");
                ctx.answered_by_route = true;
                return Phase::Respond(
                    aggregate::Answer {
                        body,
                        missing: vec![],
                        cacheable_for: None,
                    }
                    .response(),
                );
            }
        }
        let mut headers = vec![(REQUEST_ID, ctx.request_id.header_value().clone())];
        if let Some(v) = req.headers.get(http::header::AUTHORIZATION) {
            headers.push((http::header::AUTHORIZATION, v.clone()));
        }
        if let (Some(auth), Some(claims)) = (&route.auth, ctx.claims.as_deref()) {
            headers.extend(
                auth.provider
                    .claim_headers(claims)
                    .map(|(name, value)| (name.clone(), value)),
            );
        }
        let forwarded = forwarded(session, ctx);
        let input = aggregate::Input {
            params: &ctx.params,
            query: req.uri.query(),
            claims: ctx.claims.as_deref(),
            headers,
            forwarded: Some(&forwarded),
        };
        let outcome = agg
            .run(&self.parts, &input, &self.buffered, &mut ctx.answer_held)
            .await;
        ctx.answered_by_route = true;
        match outcome {
            Ok(mut answer) => {
                // The answer is the route's response: its body rules apply.
                if let Some(rules) = &route.response_body {
                    match rules.json.rewrite(&answer.body) {
                        Ok(std::borrow::Cow::Owned(out)) => answer.body = Bytes::from(out),
                        Ok(std::borrow::Cow::Borrowed(_)) => {}
                        // The parts were each checked to be JSON: not seen.
                        Err(_) => {
                            return ctx.problem(
                                StatusCode::BAD_GATEWAY,
                                "the parts' answer cannot be read for this route's body rules",
                            )
                        }
                    }
                }
                if let Some((c, policy, key, path)) = cache_slot {
                    ctx.x_cache = Some("MISS");
                    // Only a complete answer the parts allow to be kept, and
                    // never a credentialed one shared across users.
                    let shared_credentials = route.auth.is_none()
                        && req.headers.contains_key(http::header::AUTHORIZATION);
                    let ttl = answer.cacheable_for.map(|t| t.min(policy.ttl));
                    if let (true, false, Some(ttl)) = (
                        answer.missing.is_empty(),
                        shared_credentials,
                        ttl.filter(|t| !t.is_zero()),
                    ) {
                        let mut head = ResponseHeader::build(200, Some(1)).ok();
                        if let Some(h) = head.as_mut() {
                            let _ = h.insert_header(http::header::CONTENT_TYPE, "application/json");
                        }
                        if let Some(h) = head {
                            let now = std::time::SystemTime::now();
                            let meta = CacheMeta::new(now + ttl, now, 0, 0, h);
                            c.storage.put(key, &meta, answer.body.clone(), &path);
                        }
                    }
                }
                Phase::Respond(answer.response())
            }
            Err(failure) => Phase::Respond(aggregate::failure(&failure, ctx.request_id.as_str())),
        }
    }

    async fn respond(&self, phase: Phase, session: &mut Session, ctx: &RequestCtx) -> Result<bool> {
        match phase {
            Phase::Continue => Ok(false),
            Phase::Respond(response) => {
                // An unread request body would be taken for the next request.
                if !session.is_body_empty() {
                    session.set_keepalive(None);
                }
                response
                    .write(session, ctx.request_id.as_str(), |h| ctx.decorate(h))
                    .await?;
                Ok(true)
            }
        }
    }
}

/// The status for an error that ended a request, and whether it is the
/// upstream's fault (a route fallback may then answer instead).
fn classify(e: &Error) -> (u16, bool) {
    match e.etype() {
        ErrorType::HTTPStatus(code) => (*code, matches!(code, 502..=504)),
        ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout
            if e.esource() == &ErrorSource::Upstream =>
        {
            (504, true)
        }
        _ => match e.esource() {
            ErrorSource::Upstream => (502, true),
            ErrorSource::Downstream => match e.etype() {
                ErrorType::ReadError | ErrorType::WriteError | ErrorType::ConnectionClosed => {
                    (0, false)
                }
                ErrorType::ReadTimedout => (408, false),
                _ => (400, false),
            },
            ErrorSource::Internal | ErrorSource::Unset => (500, false),
        },
    }
}

fn detail_for(status: u16) -> &'static str {
    match status {
        400 => "the request is malformed",
        408 => "the request was not received in time",
        413 => "the request body is too large",
        502 => "the upstream could not be reached",
        503 => "no healthy upstream target is available",
        504 => "the upstream did not answer in time",
        _ => "the request could not be processed",
    }
}

#[async_trait]
impl ProxyHttp for Proxy {
    /// Boxed: Pingora keeps the context inside its per-request future, in
    /// more than one place, and moves that future whole (about 9 KiB) once
    /// per request; a pointer there is cheaper than the context.
    type CTX = Box<RequestCtx>;

    fn new_ctx(&self) -> Box<RequestCtx> {
        Box::new(RequestCtx {
            start: Some(Instant::now()),
            ..RequestCtx::default()
        })
    }

    // No compression module: responses pass through as the upstream sent them.
    fn init_downstream_modules(&self, _modules: &mut pingora_core::modules::http::HttpModules) {}

    async fn request_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<bool> {
        let mut phase = self.admit(session, ctx);
        if let Phase::Continue = phase {
            phase = self.guard(session, ctx).await;
        }
        if let Phase::Continue = phase {
            phase = self.prepare_bodies(session, ctx);
        }
        if let Phase::Continue = phase {
            if ctx.route.as_ref().is_some_and(|r| r.aggregate().is_some()) {
                phase = self.aggregate(session, ctx).await;
            }
        }
        self.respond(phase, session, ctx).await
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut Self::CTX,
    ) -> Result<Box<HttpPeer>> {
        let Some(route) = ctx.route.clone() else {
            return Error::e_explain(ErrorType::InternalError, "no route chosen");
        };
        let Some(upstream) = route.upstream() else {
            return Error::e_explain(
                ErrorType::InternalError,
                "an aggregate route has no upstream",
            );
        };
        let left = match ctx.deadline {
            Some(deadline) => match deadline.checked_duration_since(Instant::now()) {
                Some(left) if !left.is_zero() => Some(left),
                _ => return Error::e_explain(ErrorType::HTTPStatus(504), "route timeout"),
            },
            None => None,
        };
        // Each attempt replays the body from its start.
        ctx.body_seen = 0;
        let key = upstream.key_of(&crate::subject::Subject {
            client_ip: ctx.client_ip,
            headers: &session.req_header().headers,
            claims: ctx.claims.as_deref(),
            consumer: None,
        });
        match upstream.pick(&key, &ctx.tried) {
            Pick::Target(index) => {
                ctx.in_flight = Some(upstream.begin(index));
                Ok(upstream.peer(index, left))
            }
            Pick::NoneHealthy => Error::e_explain(ErrorType::HTTPStatus(503), "no healthy target"),
            Pick::Exhausted => Error::e_explain(ErrorType::HTTPStatus(502), "every target failed"),
        }
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Self::CTX,
        mut e: Box<Error>,
    ) -> Box<Error> {
        let (Some(upstream), Some(in_flight)) = (
            ctx.route.as_ref().and_then(|r| r.upstream()),
            ctx.in_flight.take(),
        ) else {
            return e;
        };
        let failed = in_flight.index();
        drop(in_flight);
        log::warn!(
            "request {}: connect to {} (upstream {}) failed: {}",
            ctx.request_id.as_str(),
            upstream.targets[failed].label,
            upstream.name,
            e.etype().as_str()
        );
        if self.settings.metrics {
            upstream.count_request(
                failed,
                UpstreamOutcome::ConnectError,
                &self.metrics.upstream_requests,
            );
        }
        ctx.tried.push(failed);
        let another =
            (0..upstream.targets.len()).any(|i| !ctx.tried.contains(&i) && upstream.is_healthy(i));
        if ctx.tried.len() <= upstream.retries && another {
            e.set_retry(true);
        }
        e
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        strip_request_hop_by_hop(upstream_request);
        if let Some(uri) = ctx.upstream_uri.as_deref() {
            upstream_request.set_raw_path(uri.as_bytes())?;
        }
        // Pingora itself gives an HTTP/1 upstream the `Host` of an HTTP/2 client.
        forwarded(session, ctx).apply(upstream_request);
        upstream_request.insert_header(
            forwarding::sent::X_REQUEST_ID,
            ctx.request_id.header_value().clone(),
        )?;
        if let Some(route) = &ctx.route {
            let auth = route.auth.as_ref().zip(ctx.claims.as_deref());
            auth::forward_identity(
                &route.identity_headers,
                auth.map(|(a, c)| (&*a.provider, c)),
                upstream_request,
            );
            route.request_headers.apply(upstream_request);
            // Response rules read bodies: ask for them uncompressed.
            if route.response_body.is_some() {
                upstream_request.insert_header(http::header::ACCEPT_ENCODING, "identity")?;
            }
            if let Some(rewrite) = &ctx.request_rewrite {
                rewrite.prepare_request(upstream_request);
            }
        }
        Ok(())
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        if let (Some(limit), Some(chunk)) = (ctx.body_limit, body.as_ref()) {
            ctx.body_seen += chunk.len() as u64;
            if ctx.body_seen > limit {
                // The upstream never receives the end of this body: the
                // connection to it is dropped with the error.
                return Error::e_explain(ErrorType::HTTPStatus(413), "request body over max_body");
            }
        }
        if let (Some(rewrite), Some(route)) = (ctx.request_rewrite.as_mut(), ctx.route.as_ref()) {
            if let Some(rules) = &route.request_body {
                if let Err(refusal) = rewrite.on_chunk(rules, body, end_of_stream) {
                    // The upstream has the head only: dropping its connection
                    // now, it never gets a whole request.
                    return ctx.refuse(refusal);
                }
            }
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        if ctx.past_deadline() {
            return Error::e_explain(ErrorType::HTTPStatus(504), "route timeout");
        }
        strip_hop_by_hop(upstream_response);
        let rules = ctx.route.as_ref().and_then(|r| r.response_body.as_ref());
        if let Some(rules) = rules {
            match Rewrite::for_response(
                rules,
                // A cached HEAD miss is fetched upstream as a GET.
                session.req_header().method == http::Method::HEAD && !session.cache.enabled(),
                upstream_response,
                self.settings.max_transform_size,
                &self.buffered,
            ) {
                Ok(rewrite) => ctx.response_rewrite = rewrite.map(Box::new),
                Err(refusal) => return ctx.refuse(refusal),
            }
        }
        Ok(())
    }

    // A route's timeout bounds the whole exchange: an upstream trickling its
    // body past the deadline is cut off.
    fn upstream_response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Self::CTX,
    ) -> Result<Option<std::time::Duration>> {
        if !end_of_stream && ctx.past_deadline() {
            return Error::e_explain(ErrorType::HTTPStatus(504), "route timeout");
        }
        if let (Some(rewrite), Some(route)) = (ctx.response_rewrite.as_mut(), ctx.route.as_ref()) {
            if let Some(rules) = &route.response_body {
                if let Err(refusal) = rewrite.on_chunk(&rules.json, body, end_of_stream) {
                    // Answered 502 when the head is still held back with the
                    // body (most short bodies arrive with their head); else
                    // the response is cut off. The fields never pass.
                    return ctx.refuse(refusal);
                }
            }
        }
        Ok(None)
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        if let Some(route) = &ctx.route {
            route.response_headers.apply(upstream_response);
            if route.cache.is_some() {
                ctx.x_cache = Some(cache::x_cache(session.cache.phase()));
            }
        }
        ctx.decorate(upstream_response);
        upstream_response.insert_header(
            forwarding::sent::X_REQUEST_ID,
            ctx.request_id.header_value().clone(),
        )?;
        Ok(())
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut Self::CTX,
    ) -> FailToProxy {
        let (status, upstream_fault) = classify(e);
        if ctx.request_id.as_str().is_empty() {
            ctx.request_id = RequestId::from_headers(&session.req_header().headers);
        }
        if status == 0 || session.response_written().is_some() {
            return FailToProxy {
                error_code: status,
                can_reuse_downstream: false,
            };
        }
        let fallback = ctx.route.as_ref().and_then(|r| r.fallback.clone());
        let response = match (ctx.refusal.take(), fallback) {
            // A body rule's refusal is not the upstream failing: no fallback.
            (Some(refusal), _) => {
                Response::problem(refusal.status, refusal.detail, ctx.request_id.as_str())
            }
            (None, Some(fallback)) if upstream_fault => {
                log::warn!("request {}: {} ({e})", ctx.request_id.as_str(), status);
                fallback.to_response()
            }
            (None, _) => {
                if upstream_fault {
                    log::warn!("request {}: {} ({e})", ctx.request_id.as_str(), status);
                }
                let code = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
                Response::problem(code, detail_for(status), ctx.request_id.as_str())
            }
        };
        let status = response.status.as_u16();
        // What the client sent may not have been read to its end.
        session.set_keepalive(None);
        let written = response
            .write(session, ctx.request_id.as_str(), |h| ctx.decorate(h))
            .await;
        if let Err(write_error) = written {
            log::debug!(
                "request {}: could not send the error response: {write_error}",
                ctx.request_id.as_str()
            );
        }
        FailToProxy {
            error_code: status,
            can_reuse_downstream: false,
        }
    }

    fn request_cache_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<()> {
        let (Some(c), Some(route)) = (&self.cache, &ctx.route) else {
            return Ok(());
        };
        // On a route with auth, entries are per subject; no subject, no cache.
        let keyed = route.auth.is_none() || ctx.subject().is_some();
        if route.cache.is_some() && keyed && cache::request_cacheable(&session.req_header().method)
        {
            c.enable(session);
        }
        Ok(())
    }

    fn cache_key_callback(&self, session: &Session, ctx: &mut Self::CTX) -> Result<CacheKey> {
        let Some(policy) = ctx.route.as_ref().and_then(|r| r.cache.as_ref()) else {
            return Error::e_explain(ErrorType::InternalError, "cache key without a cached route");
        };
        let req = session.req_header();
        let origin = cache::origin(&forwarded(session, ctx));
        let primary = cache::primary_key(req, &origin, ctx.routed_path(req), policy, ctx.subject());
        Ok(CacheKey::new(primary, ""))
    }

    fn response_cache_filter(
        &self,
        session: &Session,
        resp: &ResponseHeader,
        ctx: &mut Self::CTX,
    ) -> Result<RespCacheable> {
        let Some(route) = &ctx.route else {
            return Ok(RespCacheable::Uncacheable(NoCacheReason::NeverEnabled));
        };
        let Some(policy) = &route.cache else {
            return Ok(RespCacheable::Uncacheable(NoCacheReason::NeverEnabled));
        };
        Ok(cache::cacheability(
            policy,
            session.req_header(),
            resp,
            route.auth.is_some(),
        ))
    }

    fn cache_vary_filter(
        &self,
        meta: &CacheMeta,
        _ctx: &mut Self::CTX,
        req: &RequestHeader,
    ) -> Option<HashBinary> {
        cache::variance(meta, req)
    }

    // Lets the head reader tell a reused keep-alive connection from a new one.
    fn persist_connection_context(
        &self,
        _session: &Session,
        _ctx: &Self::CTX,
    ) -> Option<Box<dyn std::any::Any + Send + Sync>> {
        Some(Box::new(crate::listener::Reused))
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Self::CTX) {
        self.record(session, e, ctx);
        ctx.in_flight = None;
    }
}
