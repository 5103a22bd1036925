//! Who may pass: a route's `rate_limit` and `auth`, in the order that keeps
//! floods cheap. A limit keyed by IP or header counts first, so a flood of
//! bad tokens is limited before it costs a signature check; one keyed by a
//! claim needs the verified token, and a request refused by authentication
//! then counts against its client IP. Joins `request_filter`.

use std::sync::Arc;

use pingora_http::RequestHeader;

use super::Route;
use crate::metrics::Metrics;
use crate::ratelimit::{Decision, RateLimit};
use crate::respond::{Phase, Response};
use crate::subject::{Claims, Subject};

/// What guarding a request found, whatever it decided.
#[derive(Default)]
pub struct Guarded {
    /// The verified token's claims.
    pub claims: Option<Arc<Claims>>,
    /// The rate limit's count, for the `RateLimit-*` headers (on a refusal
    /// too).
    pub limit: Option<Decision>,
}

/// Counts `req` against `limit`; a refusal is the 429.
fn count(
    limit: &RateLimit,
    subject: &Subject<'_>,
    route: &Route,
    metrics: &Metrics,
    request_id: &str,
    found: &mut Guarded,
) -> Phase {
    let decision = limit.admit(subject);
    found.limit = Some(decision);
    if decision.allowed {
        return Phase::Continue;
    }
    metrics.rate_limited.with_label_values(&[&route.name]).inc();
    Phase::Respond(decision.refusal(request_id))
}

/// Rate limit and authentication of `req` on `route`.
pub async fn guard(
    route: &Route,
    req: &RequestHeader,
    client_ip: Option<std::net::IpAddr>,
    metrics: &Metrics,
    request_id: &str,
) -> (Guarded, Phase) {
    let mut found = Guarded::default();
    let (early, late) = match &route.rate_limit {
        Some(l) if l.key.needs_claims() => (None, Some(l)),
        other => (other.as_ref(), None),
    };
    let subject = |claims| Subject {
        client_ip,
        headers: &req.headers,
        claims,
        consumer: None,
    };
    if let Some(limit) = early {
        if let Phase::Respond(r) = count(
            limit,
            &subject(None),
            route,
            metrics,
            request_id,
            &mut found,
        ) {
            return (found, Phase::Respond(r));
        }
    }
    if let Some(auth) = &route.auth {
        match auth.authorize(req).await {
            Ok(claims) => found.claims = Some(claims),
            Err(e) => {
                metrics
                    .auth_failures
                    .with_label_values(&[&route.name, e.reason()])
                    .inc();
                // Refused tokens still spend the client's budget (by IP),
                // so a flood of them is limited too.
                if let Some(limit) = late {
                    let phase = count(
                        limit,
                        &subject(None),
                        route,
                        metrics,
                        request_id,
                        &mut found,
                    );
                    if let Phase::Respond(r) = phase {
                        return (found, Phase::Respond(r));
                    }
                }
                let refusal: Response = e.response(request_id);
                return (found, Phase::Respond(refusal));
            }
        }
    }
    let phase = match late {
        Some(limit) => {
            let claims = found.claims.clone();
            count(
                limit,
                &subject(claims.as_deref()),
                route,
                metrics,
                request_id,
                &mut found,
            )
        }
        None => Phase::Continue,
    };
    (found, phase)
}
