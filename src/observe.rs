//! Recording a finished request: its Prometheus series and its access log
//! line. Joins the `logging` phase, which Pingora runs last for every
//! request, answered or failed.

use pingora_core::{Error, ErrorSource, ErrorType};
use pingora_proxy::Session;

use crate::access_log::{self, AccessLog};
use crate::metrics::{Metrics, UpstreamOutcome};
use crate::request::RequestCtx;
use std::sync::Arc;

pub struct Observer {
    metrics: Arc<Metrics>,
    log: AccessLog,
    /// `server.metrics`: the per-request series (event counters always count).
    per_request: bool,
}

impl Observer {
    pub fn new(metrics: Arc<Metrics>, log: AccessLog, per_request: bool) -> Self {
        Observer {
            metrics,
            log,
            per_request,
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Metrics and the access log line, once the response is done.
    pub fn record(&self, session: &Session, e: Option<&Error>, ctx: &RequestCtx) {
        let req = session.req_header();
        let route = &*ctx.route.name;
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let elapsed = ctx.start.elapsed();
        // X-Cache as sent; a cached route's own answers are BYPASS.
        let cache = (ctx.route.cache.is_some()).then(|| ctx.x_cache.unwrap_or("BYPASS"));
        if self.per_request {
            let m = &self.metrics;
            let series = &ctx.route.request_series;
            series.count(&m.requests, route, &req.method, status);
            let seconds = elapsed.as_secs_f64();
            let series = &ctx.route.duration_series;
            series
                .get(|| m.duration.with_label_values(&[route]))
                .observe(seconds);
            if let Some(f) = &ctx.in_flight {
                f.count(upstream_outcome(e), &m.upstream_requests);
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
            user: ctx.user(),
            error: e.map(|e| e.etype().as_str()),
            body: body_note,
            trace_id: ctx.trace.as_ref().map(|t| t.trace_id()),
        });
    }
}

/// How the upstream exchange of a finished request went.
fn upstream_outcome(e: Option<&Error>) -> UpstreamOutcome {
    match e {
        None => UpstreamOutcome::Success,
        Some(e) if e.esource() != &ErrorSource::Upstream => UpstreamOutcome::Aborted,
        Some(e) => match e.etype() {
            ErrorType::ReadTimedout | ErrorType::WriteTimedout => UpstreamOutcome::Timeout,
            _ => UpstreamOutcome::Error,
        },
    }
}
