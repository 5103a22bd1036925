//! The edge of a route: its `ip_filter`, then its `cors` (a preflight is
//! answered here, before `max_body`, rate limits and authentication, so
//! every refusal after it carries the CORS fields). Joins `request_filter`.

use std::net::IpAddr;

use pingora_http::RequestHeader;

use super::Route;
use crate::cors::Admitted;
use crate::metrics::Metrics;
use crate::respond::Phase;

/// The IP filter and CORS for `req` on `route`: the phase's verdict, and
/// the origin CORS admits on the request's responses.
pub fn edge(
    route: &Route,
    req: &RequestHeader,
    client_ip: Option<IpAddr>,
    metrics: &Metrics,
    request_id: &str,
) -> (Admitted, Phase) {
    let Some(cors) = &route.cors else {
        return (
            Admitted::Origin(None),
            ip_filter(route, client_ip, metrics, request_id),
        );
    };
    // Before the preflight: a refused address learns nothing of the policy.
    if let Phase::Respond(refusal) = ip_filter(route, client_ip, metrics, request_id) {
        return (cors.admit(&req.headers), Phase::Respond(refusal));
    }
    // A preflight's answer carries its own fields, and a refused one none.
    match cors.preflight(&req.method, &req.headers, request_id) {
        Some(Ok(answer)) => (Admitted::Preflight, Phase::Respond(answer)),
        Some(Err(refusal)) => {
            metrics.cors_refused.with_label_values(&[&route.name]).inc();
            (Admitted::Preflight, Phase::Respond(refusal))
        }
        None => (cors.admit(&req.headers), Phase::Continue),
    }
}

fn ip_filter(
    route: &Route,
    client_ip: Option<IpAddr>,
    metrics: &Metrics,
    request_id: &str,
) -> Phase {
    let Some(filter) = &route.ip_filter else {
        return Phase::Continue;
    };
    match filter.check(client_ip, request_id) {
        None => Phase::Continue,
        Some(refusal) => {
            metrics.ip_filtered.with_label_values(&[&route.name]).inc();
            Phase::Respond(refusal)
        }
    }
}
