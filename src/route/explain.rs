//! `gatehouse route`: which route a request would take and why, without
//! serving anything.

use std::fmt::Write;

use pingora_http::RequestHeader;

use super::{Route, Routes, Target};
use crate::auth::Identity;
use crate::routing::{
    claim_matches, header_matches, normalize_path, HostPattern, PathParams, PathPattern,
    RouteRequest, Segment,
};

/// What a route's credentials verified as, for its `match.claims`: the
/// identity, or why there is none.
type Verified = Result<Identity, String>;

fn describe_path(p: &PathPattern) -> String {
    match p {
        PathPattern::Exact(segments) => {
            let mut s = String::new();
            for seg in segments {
                s.push('/');
                match seg {
                    Segment::Literal(l) => s.push_str(l),
                    Segment::Param(n) => {
                        let _ = write!(s, "{{{n}}}");
                    }
                }
            }
            if s.is_empty() {
                s.push('/');
            }
            format!("path {s}")
        }
        PathPattern::Regex(re) => format!("path_regex {}", re.as_str()),
        PathPattern::Prefix(p) => format!("path_prefix {}", if p.is_empty() { "/" } else { p }),
    }
}

/// Each condition of `route` against `req`: (description, holds).
/// `verified` is what the route's credentials verified as, by route name.
fn checks(
    route: &Route,
    req: &RouteRequest<'_>,
    verified: &[(std::sync::Arc<str>, Verified)],
) -> Vec<(String, bool)> {
    let m = &route.matcher;
    let mut out = vec![(describe_path(&m.path), m.path.matches(req.path, None))];
    if let Some(methods) = &m.methods {
        let list: Vec<&str> = methods.iter().map(|x| x.as_str()).collect();
        out.push((
            format!("methods {}", list.join(", ")),
            methods.contains(req.method),
        ));
    }
    if let Some(host) = &m.host {
        let text = match host {
            HostPattern::Exact(h) => h.clone(),
            HostPattern::Wildcard(s) => format!("*{s}"),
        };
        let ok = req.host.is_some_and(|h| host.matches(h));
        out.push((format!("host {text}"), ok));
    }
    for (name, value) in &m.headers {
        let ok = header_matches(req.headers, name, value);
        out.push((
            format!(
                "header {}: {}",
                name,
                String::from_utf8_lossy(value.as_bytes())
            ),
            ok,
        ));
    }
    for (name, value) in &m.query {
        out.push((format!("query {name}={value}"), m.matches_query(req.query)));
    }
    let found = verified.iter().find(|(n, _)| *n == route.name);
    for (name, value) in &m.claims {
        let (ok, note) = match found.map(|(_, v)| v) {
            Some(Ok(identity)) => (claim_matches(identity.claims(), name, value), String::new()),
            Some(Err(why)) => (false, format!(" (credentials: {why})")),
            None => (false, " (no credentials checked)".to_string()),
        };
        out.push((format!("claim {name} = {value}{note}"), ok));
    }
    out
}

/// The identity each route with `match.claims` verifies `head`'s
/// credentials as, as routing would find it.
async fn verify_for_claims(
    router: &Routes,
    head: &RequestHeader,
) -> Vec<(std::sync::Arc<str>, Verified)> {
    let mut out = Vec::new();
    for route in router.routes() {
        let Some(auth) = route
            .auth
            .as_ref()
            .filter(|_| !route.matcher.claims.is_empty())
        else {
            continue;
        };
        let verified = match auth.identify(head).await {
            Ok(Some(identity)) => Ok(identity),
            Ok(None) => Err("the route verifies no token or key".to_string()),
            Err(e) => Err(e.reason().to_string()),
        };
        out.push((std::sync::Arc::clone(&route.name), verified));
    }
    out
}

fn failed(checks: &[(String, bool)]) -> String {
    checks
        .iter()
        .filter(|(_, ok)| !ok)
        .map(|(what, _)| what.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The explanation of the route `head` would take, and whether one
/// matched. `host` is its host without the port. Credentials it carries
/// are verified for the routes with `match.claims` (keys must be at hand:
/// a JWKS not yet fetched verifies nothing).
pub async fn explain(
    router: &Routes,
    head: &RequestHeader,
    host: Option<&str>,
    path_params: PathParams,
) -> (String, bool) {
    use crate::routing::{path_params as params_in, without_params, PathParamsFound as Params};
    let query = head.uri.query();
    let req = RouteRequest {
        method: &head.method,
        path: head.uri.path(),
        host,
        headers: &head.headers,
        query,
    };
    let verified = verify_for_claims(router, head).await;
    let mut out = String::new();
    let sent = match normalize_path(req.path) {
        Ok(p) => p.into_owned(),
        Err(e) => {
            let _ = writeln!(out, "{} {}: refused with 400: {e}", req.method, req.path);
            return (out, false);
        }
    };
    // Routes match the path as a Java upstream reads it: see `normalize`.
    let path = match (params_in(&sent), path_params) {
        (Params::None, _) => sent.clone(),
        (_, PathParams::Keep) => {
            let routed = without_params(&sent);
            let _ = writeln!(out, "path parameters kept: routes match {routed}");
            routed
        }
        (_, PathParams::Reject) => {
            let _ = writeln!(
                out,
                "{} {}: refused with 400: the path holds a ; parameter (server.path_params: reject)",
                req.method, req.path
            );
            return (out, false);
        }
    };
    let req = RouteRequest { path: &path, ..req };
    let _ = writeln!(
        out,
        "{} {} (host {})",
        req.method,
        path,
        req.host.unwrap_or("-")
    );
    let mut before = Vec::new();
    for route in router.routes() {
        let c = checks(route, &req, &verified);
        if c.iter().all(|(_, ok)| *ok) {
            let _ = writeln!(out, "route: {}", route.name);
            for (what, _) in &c {
                let _ = writeln!(out, "  matches {what}");
            }
            if !before.is_empty() {
                let _ = writeln!(out, "more specific routes considered first:");
                for (name, why) in &before {
                    let _ = writeln!(out, "  {name}: {why} does not match");
                }
            }
            describe_route(&mut out, route, &sent, &path, query);
            return (out, true);
        }
        before.push((route.name.to_string(), failed(&c)));
    }
    let _ = writeln!(out, "no route matches");
    // Nearest: the path matched but something else did not; else the
    // routes whose path shares the most with the request's.
    let mut near: Vec<(usize, String)> = router
        .routes()
        .iter()
        .map(|r| {
            let c = checks(r, &req, &verified);
            let score = if c[0].1 {
                10_000 - c.iter().filter(|(_, ok)| !ok).count()
            } else {
                let pattern = describe_path(&r.matcher.path);
                let literal = pattern.split_once(' ').map_or("", |(_, p)| p);
                common_prefix(literal, &path)
            };
            (
                score,
                format!("  {}: {} does not match", r.name, failed(&c)),
            )
        })
        .collect();
    near.sort_by_key(|n| std::cmp::Reverse(n.0));
    if !near.is_empty() {
        let _ = writeln!(out, "nearest routes:");
        for (_, line) in near.iter().take(3) {
            let _ = writeln!(out, "{line}");
        }
    }
    (out, false)
}

fn common_prefix(a: &str, b: &str) -> usize {
    a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count()
}

fn describe_targets(up: &crate::upstream::Upstream) -> String {
    let targets: Vec<String> = up
        .pool()
        .targets
        .iter()
        .map(|t| {
            if t.weight == 1 {
                t.label.to_string()
            } else {
                format!("{} (weight {})", t.label, t.weight)
            }
        })
        .collect();
    targets.join(", ")
}

fn describe_route(out: &mut String, route: &Route, sent: &str, path: &str, query: Option<&str>) {
    let forwarded = |out: &mut String| {
        let _ = writeln!(
            out,
            "forwarded as: {}",
            route.rewrite.apply_kept(sent, path, query)
        );
    };
    match &route.target {
        Target::Upstream(up) => {
            let _ = writeln!(out, "upstream: {} -> {}", up.name, describe_targets(up));
            forwarded(out);
        }
        Target::Split(split) => {
            let by = split
                .by
                .as_ref()
                .map_or("at random".to_string(), |k| format!("by {k}"));
            let _ = writeln!(out, "split {by}:");
            for side in &split.sides {
                let _ = writeln!(
                    out,
                    "  weight {}: upstream {} -> {}",
                    side.weight,
                    side.upstream.name,
                    describe_targets(&side.upstream)
                );
            }
            forwarded(out);
        }
        Target::Aggregate(agg) => {
            let _ = writeln!(out, "aggregate (timeout {:?}):", agg.timeout);
            for part in &agg.parts {
                let _ = writeln!(
                    out,
                    "  {}: upstream {}{}",
                    part.key,
                    part.upstream.name,
                    if part.required { "" } else { " (optional)" }
                );
            }
        }
        Target::None => {
            let _ = writeln!(out, "no target: the gateway answers itself");
        }
    }
    match &route.auth {
        None => {
            let _ = writeln!(out, "auth: none");
        }
        Some(a) => {
            let methods: Vec<String> = a
                .methods
                .iter()
                .map(|m| match m {
                    crate::auth::Method::Jwt(p) => format!("jwt {}", p.name),
                    crate::auth::Method::ApiKey(k) => {
                        format!("api key {} ({} consumers)", k.name, k.consumer_count())
                    }
                })
                .collect();
            let mut line = format!("auth: {}", methods.join(" or "));
            if a.client_cert {
                line.push_str(if methods.is_empty() {
                    "client certificate"
                } else {
                    ", and a client certificate"
                });
            }
            if !a.require_claims.is_empty() {
                let claims: Vec<String> = a
                    .require_claims
                    .iter()
                    .map(|(c, v)| format!("{c} in {}", serde_json::Value::from(v.clone())))
                    .collect();
                let _ = write!(line, "; require_claims {}", claims.join(", "));
            }
            if !a.require_scopes.is_empty() {
                let _ = write!(line, "; require_scopes {}", a.require_scopes.join(" "));
            }
            let _ = writeln!(out, "{line}");
        }
    }
    match &route.rate_limit {
        None => {
            let _ = writeln!(out, "rate limit: none");
        }
        Some(l) => {
            let scope = match l.on_store_error() {
                None => String::new(),
                Some(on_error) => format!(
                    ", shared by the cluster ({} when the store fails)",
                    match on_error {
                        crate::ratelimit::OnStoreError::Allow => "counted here",
                        crate::ratelimit::OnStoreError::Deny => "refused",
                    }
                ),
            };
            let _ = writeln!(
                out,
                "rate limit: {} per {:?} by {}{scope}",
                l.requests, l.per, l.key
            );
        }
    }
    match &route.cache {
        None => {
            let _ = writeln!(out, "cache: none");
        }
        Some(c) => {
            let vary: Vec<&str> = c.vary.iter().map(|h| h.as_str()).collect();
            let _ = writeln!(
                out,
                "cache: ttl {:?}{}",
                c.ttl,
                if vary.is_empty() {
                    String::new()
                } else {
                    format!(", vary {}", vary.join(", "))
                }
            );
        }
    }
    if let Some(t) = route.timeout {
        let _ = writeln!(out, "timeout: {t:?}");
    }
}
