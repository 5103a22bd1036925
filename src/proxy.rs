//! The chart of a request's life: Pingora's `ProxyHttp` hooks, each calling
//! the modules in the order a request meets them (`route`'s doc lists that
//! order). No policy lives here; a verdict (`respond::Phase`) becomes
//! Pingora's `Ok(true/false)` in `respond` below, and an error that ended a
//! request becomes its answer in `fail_to_proxy`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http::header::{HeaderValue, ACCEPT_ENCODING};
use http::StatusCode;
use pingora_cache::key::HashBinary;
use pingora_cache::{CacheKey, CacheMeta, NoCacheReason, RespCacheable};
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::{Error, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};

use crate::aggregate::{Asked, Input};
use crate::auth;
use crate::budget::Budget;
use crate::cache::{self, Cache};
use crate::config::ServerSettings;
use crate::forwarding;
use crate::gateway::Gateway;
use crate::listener::check_h2_head;
use crate::observe::Observer;
use crate::outbound::Client;
use crate::request::RequestCtx;
use crate::respond::{self, Phase};
use crate::route::{self, Route};
use crate::transform::body::{BodyCount, Rewrite};
use crate::transform::headers::{
    strip_hop_by_hop, strip_request_hop_by_hop, EditHeaders, OpenRequest,
};
use crate::upstream::Failure;

/// The gateway's `ProxyHttp`; `server` builds it.
pub struct Proxy {
    pub(crate) gateway: Arc<Gateway>,
    pub(crate) settings: Arc<ServerSettings>,
    pub(crate) cache: Option<Cache>,
    pub(crate) observer: Observer,
    /// For aggregate parts; shared with health checks and JWK set fetches.
    pub(crate) parts: Client,
    /// `server.max_buffered`, for bodies held whole.
    pub(crate) buffered: Arc<Budget>,
    /// The context's route until one matches (`Route::unmatched`).
    pub(crate) unmatched: Arc<Route>,
    pub(crate) mirrors: crate::mirror::Sender,
    /// With `tracing`.
    pub(crate) tracer: Option<Arc<crate::trace::Tracer>>,
}

impl Proxy {
    /// The route, and what routing worked out; the head's limits.
    async fn select(&self, session: &mut Session, ctx: &mut RequestCtx) -> Phase {
        let (req, id) = (session.req_header(), ctx.request_id.as_str());
        // HTTP/1 heads were measured as they arrived (`listener`).
        let limits = (self.settings.max_headers, self.settings.max_header_size);
        if let Err((status, detail)) = check_h2_head(session, limits) {
            return ctx.problem(status, detail);
        }
        let runtime = self.gateway.load();
        let host = forwarding::request_host(req);
        let selected =
            route::select(&runtime.router, req, host, self.settings.path_params, id).await;
        let selected = match selected {
            Ok(selected) => selected,
            Err(response) => return Phase::Respond(response),
        };
        ctx.routed(selected);
        Phase::Continue
    }

    /// The IP filter and CORS (a preflight is answered here).
    fn edge(&self, session: &Session, ctx: &mut RequestCtx) -> Phase {
        let route = Arc::clone(&ctx.route);
        let (req, id) = (session.req_header(), ctx.request_id.as_str());
        let metrics = self.observer.metrics();
        let (admitted, phase) = route::edge(&route, req, ctx.client_ip, metrics, id);
        ctx.cors = admitted;
        phase
    }

    /// The body's declared length against the route's `max_body`. After the
    /// edge: the refusal carries the CORS fields, and a refused address
    /// learns nothing of the route's limits.
    fn admit_body(&self, session: &mut Session, ctx: &mut RequestCtx) -> Phase {
        let (req, max_body) = (session.req_header(), ctx.route.max_body);
        let Some(body) = BodyCount::admit(&req.headers, max_body) else {
            let detail = format!("the request body is larger than {max_body} bytes");
            return ctx.problem(StatusCode::PAYLOAD_TOO_LARGE, &detail);
        };
        ctx.body = body;
        // After a chunked HTTP/1 body the connection closes (`listener`
        // cannot tell where the next request starts): the answer says so.
        if !session.is_http2() && req.headers.contains_key(http::header::TRANSFER_ENCODING) {
            session.set_keepalive(None);
        }
        // Each read of a body must come within body_timeout of the last: a
        // client trickling it cannot hold an upstream connection for long.
        session.set_read_timeout(Some(self.settings.body_timeout));
        Phase::Continue
    }

    /// Rate limit and authentication (`route::guard` orders them).
    async fn guard(&self, session: &Session, ctx: &mut RequestCtx) -> Phase {
        let route = Arc::clone(&ctx.route);
        let (req, id) = (session.req_header(), ctx.request_id.as_str());
        let metrics = self.observer.metrics();
        let cert = ctx.client_cert.is_some();
        let verified = std::mem::take(&mut ctx.identity);
        let (found, phase) =
            route::guard(&route, req, ctx.client_ip, cert, verified, metrics, id).await;
        ctx.identity = found.identity;
        ctx.limit = found.limit;
        phase
    }

    /// Body rules, decided before any upstream is chosen: a request body
    /// they cannot read is refused before anything is sent.
    fn prepare_bodies(&self, session: &mut Session, ctx: &mut RequestCtx) -> Phase {
        let route = Arc::clone(&ctx.route);
        if let Some(rules) = &route.response_body {
            rules.drop_ranges(session.req_header_mut());
        }
        let Some(rules) = &route.request_body else {
            return Phase::Continue;
        };
        let (has_body, max) = (!session.is_body_empty(), self.settings.max_transform_size);
        match Rewrite::for_request(rules, session.req_header(), has_body, max, &self.buffered) {
            Ok(rewrite) => ctx.request_rewrite = rewrite.map(Box::new),
            Err(refusal) => return ctx.problem(refusal.status, refusal.detail),
        }
        Phase::Continue
    }

    /// An aggregate route answers here, from the cache or its parts.
    async fn aggregate(&self, session: &Session, ctx: &mut RequestCtx) -> Phase {
        let route = Arc::clone(&ctx.route);
        let Some(agg) = route.aggregate() else {
            return Phase::Continue;
        };
        let req = session.req_header();
        let authorization = req.headers.get(http::header::AUTHORIZATION);
        let (verified, cert) = (ctx.identity.identity(), ctx.client_cert.as_ref());
        let id = ctx.request_id.header_value();
        let headers = auth::part_headers(id, authorization, verified, cert);
        let cache = ctx.cache_slot(session, self.cache.as_ref());
        let forwarded = ctx.forwarded(session);
        let asked = Asked {
            input: Input {
                params: &ctx.params,
                query: req.uri.query(),
                claims: ctx.claims(),
                headers,
                forwarded: Some(&forwarded),
                trace: ctx.trace.as_ref(),
            },
            cache,
            // Never a credentialed answer shared across users.
            shareable: !(route.auth.is_none() && authorization.is_some()),
            rules: route.response_body.as_ref().map(|r| &r.json),
            request_id: ctx.request_id.as_str(),
        };
        let answered = agg.answer(asked, &self.parts, &self.buffered).await;
        ctx.x_cache = answered.x_cache;
        ctx.answered_by_route = true;
        ctx.answer_held = answered.held;
        Phase::Respond(answered.response)
    }

    /// The one place a verdict becomes Pingora's: `true` when answered.
    async fn respond(&self, phase: Phase, session: &mut Session, ctx: &RequestCtx) -> Result<bool> {
        let Phase::Respond(response) = phase else {
            return Ok(false);
        };
        // An unread request body would be taken for the next request.
        if !session.is_body_empty() {
            session.set_keepalive(None);
        }
        let id = ctx.request_id.as_str();
        response.write(session, id, |h| ctx.decorate(h)).await?;
        Ok(true)
    }
}

/// A status as the error that ends a phase.
fn status_error<T>(status: u16, why: &'static str) -> Result<T> {
    Error::e_explain(ErrorType::HTTPStatus(status), why)
}

/// Boxed: Pingora keeps the context inside its per-request future, in more
/// than one place, and moves that future whole (about 9 KiB) once per
/// request; a pointer there is cheaper than the context.
type Ctx = Box<RequestCtx>;

#[async_trait]
impl ProxyHttp for Proxy {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        RequestCtx::begin(&self.unmatched)
    }

    // Pingora's own error lines name the request by this; its default
    // carries the query, which may hold an API key or a token.
    fn request_summary(&self, session: &Session, ctx: &Ctx) -> String {
        let req = session.req_header();
        format!(
            "{} {} (route {})",
            req.method,
            req.uri.path(),
            ctx.route.name
        )
    }

    // Pingora's response compression, switched off (level 0), and ours for
    // `br`, off: `compression` switches one on per response for the routes
    // that ask.
    fn init_downstream_modules(&self, modules: &mut pingora_core::modules::http::HttpModules) {
        use pingora_core::modules::http::compression::ResponseCompressionBuilder;
        modules.add_module(ResponseCompressionBuilder::enable(0));
        modules.add_module(Box::new(crate::compression::BrotliModuleBuilder));
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        ctx.identify(session, &self.settings.trusted_proxies);
        if let Some(tracer) = &self.tracer {
            ctx.trace = Some(tracer.begin(&session.req_header().headers));
        }
        let mut phase = self.select(session, ctx).await;
        if let Phase::Continue = phase {
            phase = self.edge(session, ctx);
        }
        if let Phase::Continue = phase {
            phase = self.admit_body(session, ctx);
        }
        if let Phase::Continue = phase {
            phase = self.guard(session, ctx).await;
        }
        if let Phase::Continue = phase {
            phase = self.prepare_bodies(session, ctx);
        }
        if let Phase::Continue = phase {
            phase = self.aggregate(session, ctx).await;
        }
        self.respond(phase, session, ctx).await
    }

    async fn upstream_peer(&self, session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let Some(upstream) = ctx.upstream(&session.req_header().headers) else {
            return Error::e_explain(ErrorType::InternalError, "no upstream for this request");
        };
        ctx.body.restart();
        ctx.upstream_status = None;
        self.mirrors.on_retry(&mut ctx.mirror);
        let key = upstream.key_of(&ctx.subject(&session.req_header().headers));
        match upstream.choose(&key, &ctx.tried, ctx.deadline) {
            Ok((in_flight, peer)) => {
                if let Some(trace) = ctx.trace.as_mut() {
                    trace.attempt(session.req_header().method.as_str(), in_flight.addr());
                }
                ctx.in_flight = Some(in_flight);
                Ok(peer)
            }
            Err(none) => status_error(none.status(), none.why()),
        }
    }

    fn fail_to_connect(
        &self,
        session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        let (Some(upstream), Some(in_flight)) = (ctx.upstream.as_ref(), ctx.in_flight.take())
        else {
            return e;
        };
        let (metrics, counted) = (self.observer.metrics(), self.settings.metrics);
        let (id, why) = (ctx.request_id.as_str(), e.etype().as_str());
        if let Some(trace) = ctx.trace.as_mut() {
            let outcome = crate::trace::Outcome {
                status: None,
                error: Some(why),
            };
            trace.end_attempt(session.req_header().method.as_str(), outcome);
        }
        if upstream.retry_after_failed_connect(in_flight, &mut ctx.tried, id, why, metrics, counted)
        {
            e.set_retry(true);
        }
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Ctx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        // Nothing in flight: `upstream_response_filter` already decided (a
        // decided retry stays decided).
        if ctx.in_flight.is_none() {
            e.retry.decide_reuse(client_reused);
            return e;
        }
        let (metrics, counted) = (self.observer.metrics(), self.settings.metrics);
        ctx.after_upstream_error(&mut e, session, metrics, counted, client_reused);
        e
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if let Some(uri) = ctx.upstream_uri.as_deref() {
            upstream_request.set_raw_path(uri.as_bytes())?;
        }
        let route = &ctx.route;
        if let Some(auth) = &route.auth {
            auth.strip_keys(upstream_request);
        }
        let mut head = OpenRequest::open(upstream_request);
        strip_request_hop_by_hop(&mut head);
        // Pingora itself gives an HTTP/1 upstream the `Host` of an HTTP/2 client.
        ctx.forwarded(session).apply(&mut head);
        if let Some(trace) = &ctx.trace {
            trace.propagate(&mut head);
        }
        head.insert(
            &forwarding::REQUEST_ID,
            ctx.request_id.header_value().clone(),
        );
        let (identity, cert) = (ctx.identity.identity(), ctx.client_cert.as_ref());
        auth::forward_identity(&route.identity_headers, identity, cert, &mut head);
        route.request_headers.apply(&mut head);
        // Response rules read bodies: ask for them uncompressed.
        if route.response_body.is_some() {
            head.insert(&ACCEPT_ENCODING, HeaderValue::from_static("identity"));
        }
        if let Some(rewrite) = &ctx.request_rewrite {
            rewrite.prepare_request(&mut head);
        }
        head.close(upstream_request)?;
        if let Some(mirror) = &route.mirror {
            let body_empty = session.is_body_empty();
            let (name, pending) = (&route.name, &mut ctx.mirror);
            self.mirrors
                .on_head(mirror, name, pending, upstream_request, body_empty);
        }
        Ok(())
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if body
            .as_ref()
            .is_some_and(|chunk| !ctx.body.on_chunk(chunk.len()))
        {
            // The upstream never receives the end of this body: the
            // connection to it is dropped with the error.
            return status_error(413, "request body over max_body");
        }
        let rules = ctx.route.request_body.as_ref();
        if let (Some(rewrite), Some(rules)) = (ctx.request_rewrite.as_mut(), rules) {
            if let Err(refusal) = rewrite.on_chunk(rules, body, end_of_stream) {
                // The upstream has the head only: dropping its connection
                // now, it never gets a whole request.
                return ctx.refuse(refusal);
            }
        }
        self.mirrors
            .on_body(&mut ctx.mirror, body.as_ref(), end_of_stream);
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if ctx.past_deadline() {
            return status_error(504, "route timeout");
        }
        let status = upstream_response.status.as_u16();
        ctx.upstream_status = Some(status);
        let (metrics, counted) = (self.observer.metrics(), self.settings.metrics);
        if status >= 500 && ctx.retry_after(Failure::Status(status), session, metrics, counted) {
            let mut retry =
                Error::explain(ErrorType::HTTPStatus(status), "tried on another target");
            retry.set_retry(true);
            return Err(retry);
        }
        strip_hop_by_hop(upstream_response);
        let Some(rules) = ctx.route.response_body.as_ref() else {
            return Ok(());
        };
        // A cached HEAD miss is fetched upstream as a GET.
        let head = session.req_header().method == http::Method::HEAD && !session.cache.enabled();
        let max = self.settings.max_transform_size;
        match Rewrite::for_response(rules, head, upstream_response, max, &self.buffered) {
            Ok(rewrite) => ctx.response_rewrite = rewrite.map(Box::new),
            Err(refusal) => return ctx.refuse(refusal),
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
        ctx: &mut Ctx,
    ) -> Result<Option<Duration>> {
        if !end_of_stream && ctx.past_deadline() {
            return status_error(504, "route timeout");
        }
        let rules = ctx.route.response_body.as_ref();
        if let (Some(rewrite), Some(rules)) = (ctx.response_rewrite.as_mut(), rules) {
            if let Err(refusal) = rewrite.on_chunk(&rules.json, body, end_of_stream) {
                // Answered 502 when the head is still held back with the
                // body (most short bodies arrive with their head); else the
                // response is cut off. The fields never pass.
                return ctx.refuse(refusal);
            }
        }
        Ok(None)
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        ctx.route.response_headers.apply(upstream_response);
        if ctx.route.cache.is_some() {
            ctx.x_cache = Some(cache::x_cache(session.cache.phase()));
        }
        ctx.decorate(upstream_response);
        let id = ctx.request_id.header_value().clone();
        upstream_response.insert_header(forwarding::sent::X_REQUEST_ID, id)?;
        if let Some(compression) = ctx.route.compression.as_ref() {
            compression.respond(session, upstream_response);
        }
        Ok(())
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let (status, upstream_fault) = respond::classify(e);
        if ctx.request_id.as_str().is_empty() {
            ctx.identify(session, &self.settings.trusted_proxies);
        }
        let verdict = |error_code| FailToProxy {
            error_code,
            can_reuse_downstream: false,
        };
        if status == 0 || session.response_written().is_some() {
            return verdict(status);
        }
        let id = ctx.request_id.as_str();
        let refusal = ctx.refusal.take().map(|r| (r.status, r.detail));
        if upstream_fault && refusal.is_none() {
            log::warn!("request {id}: {status} ({e})");
        }
        let fallback = ctx.route.fallback.as_ref();
        let response = respond::failure(status, upstream_fault, refusal, fallback, id);
        let status = response.status.as_u16();
        // What the client sent may not have been read to its end.
        session.set_keepalive(None);
        if let Err(write_error) = response.write(session, id, |h| ctx.decorate(h)).await {
            log::debug!("request {id}: could not send the error response: {write_error}");
        }
        verdict(status)
    }

    fn request_cache_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<()> {
        if let Some(c) = self
            .cache
            .as_ref()
            .filter(|_| ctx.uses_cache(session.req_header()))
        {
            c.enable(session);
        }
        Ok(())
    }

    fn cache_key_callback(&self, session: &Session, ctx: &mut Ctx) -> Result<CacheKey> {
        // A split's side is part of the key: chosen now (the identity is known).
        ctx.upstream(&session.req_header().headers);
        let Some(policy) = ctx.route.cache.as_ref() else {
            return Error::e_explain(ErrorType::InternalError, "cache key without a cached route");
        };
        Ok(CacheKey::new(ctx.cache_key(session, policy), ""))
    }

    fn response_cache_filter(
        &self,
        session: &Session,
        resp: &ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<RespCacheable> {
        let req = session.req_header();
        Ok(match &ctx.route.cache {
            Some(policy) => cache::cacheability(policy, req, resp, ctx.route.auth.is_some()),
            None => RespCacheable::Uncacheable(NoCacheReason::NeverEnabled),
        })
    }

    fn cache_vary_filter(
        &self,
        meta: &CacheMeta,
        _ctx: &mut Ctx,
        req: &RequestHeader,
    ) -> Option<HashBinary> {
        cache::variance(meta, req)
    }

    // Lets the head reader tell a reused keep-alive connection from a new one.
    fn persist_connection_context(
        &self,
        _session: &Session,
        _ctx: &Ctx,
    ) -> Option<Box<dyn std::any::Any + Send + Sync>> {
        Some(Box::new(crate::listener::Reused))
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        ctx.finish_trace(session, e);
        if let Some(attempt) = &ctx.in_flight {
            let ejections = &self.observer.metrics().upstream_ejections;
            attempt.finished(e, ctx.upstream_status, ejections);
        }
        self.observer.record(session, e, ctx);
        ctx.in_flight = None;
    }
}
