//! Who may pass: a route's `rate_limit` and `auth`, in the order that keeps
//! floods cheap. A limit keyed by IP or header counts first, so a flood of
//! bad tokens is limited before it costs a signature check; one keyed by a
//! claim or the consumer needs the verified identity, and a request refused
//! by authentication then counts against its client IP. Joins
//! `request_filter`.

use pingora_http::RequestHeader;

use super::Route;
use crate::auth::{Identity, Verdict};
use crate::metrics::Metrics;
use crate::ratelimit::{Decision, RateLimit};
use crate::respond::Phase;
use crate::subject::Subject;

/// What guarding a request found, whatever it decided.
#[derive(Default)]
pub struct Guarded {
    /// What the credentials came to: who they verified as, or why not.
    pub identity: Verdict,
    /// The rate limit's count, for the `RateLimit-*` headers (on a refusal
    /// too).
    pub limit: Option<Decision>,
}

/// Rate limit and authentication of `req` on `route`; `verified` is what
/// routing found the credentials to be, if it had to verify them.
pub async fn guard(
    route: &Route,
    req: &RequestHeader,
    client_ip: Option<std::net::IpAddr>,
    client_cert_verified: bool,
    verified: Verdict,
    metrics: &Metrics,
    request_id: &str,
) -> (Guarded, Phase) {
    let mut found = Guarded::default();
    let (early, late) = match &route.rate_limit {
        Some(l) if l.key.needs_identity() => (None, Some(&**l)),
        other => (other.as_deref(), None),
    };
    let counter = Counter {
        route,
        req,
        client_ip,
        metrics,
        request_id,
    };
    if let Some(limit) = early {
        if let Some(refused) = counter.count(limit, None, &mut found).await {
            return (found, refused);
        }
    }
    if let Some(auth) = &route.auth {
        match auth.authorize(req, client_cert_verified, verified).await {
            Ok(identity) => found.identity = Verdict::of(Ok(identity)),
            Err(e) => {
                found.identity = Verdict::Refused(e);
                metrics
                    .auth_failures
                    .with_label_values(&[&route.name, e.reason()])
                    .inc();
                // Refused tokens still spend the client's budget (by IP),
                // so a flood of them is limited too.
                if let Some(limit) = late {
                    if let Some(refused) = counter.count(limit, None, &mut found).await {
                        return (found, refused);
                    }
                }
                return (found, Phase::Respond(e.response(request_id)));
            }
        }
    }
    if let Some(limit) = late {
        let identity = found.identity.identity().cloned();
        if let Some(refused) = counter.count(limit, identity.as_ref(), &mut found).await {
            return (found, refused);
        }
    }
    (found, Phase::Continue)
}

/// Counts a request against a limit; a refusal is the 429 (or the 503 of
/// a shared limit whose store fails under `on_store_error: deny`).
struct Counter<'a> {
    route: &'a Route,
    req: &'a RequestHeader,
    client_ip: Option<std::net::IpAddr>,
    metrics: &'a Metrics,
    request_id: &'a str,
}

impl Counter<'_> {
    async fn count(
        &self,
        limit: &RateLimit,
        identity: Option<&Identity>,
        found: &mut Guarded,
    ) -> Option<Phase> {
        let subject = Subject {
            client_ip: self.client_ip,
            headers: &self.req.headers,
            claims: identity.map(Identity::claims),
            consumer: identity.and_then(Identity::consumer),
        };
        let decision = match limit.admit(&subject, self.metrics).await {
            Ok(decision) => decision,
            Err(store) => {
                return Some(Phase::Respond(Decision::store_refusal(
                    store,
                    self.request_id,
                )))
            }
        };
        found.limit = Some(decision);
        if decision.allowed {
            return None;
        }
        self.metrics
            .rate_limited
            .with_label_values(&[&self.route.name])
            .inc();
        Some(Phase::Respond(decision.refusal(self.request_id)))
    }
}
