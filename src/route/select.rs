//! Choosing the route of a request: its path normalized (or refused), its
//! `;` parameters refused or set aside, the router asked, and what the
//! upstream will be sent worked out. Joins `request_filter`.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use http::header::{HeaderValue, ALLOW, ORIGIN};
use http::StatusCode;
use pingora_http::RequestHeader;

use super::{Route, Routes};
use crate::auth::{Identity, Verdict};
use crate::respond::Response;
use crate::routing::{
    normalize_path, path_params, without_params, Claimed, Params, PathParams, PathParamsFound,
    RouteOutcome, RouteRequest,
};

/// The route chosen for a request, and what routing worked out.
pub struct Selected {
    /// What the route's credentials came to, valid or not, when
    /// `match.claims` had to verify them to choose a route: `guard` does not
    /// verify them again.
    pub verified: Verdict,
    pub route: Arc<Route>,
    /// Path and query for the upstream, when they differ from the client's.
    pub upstream_uri: Option<String>,
    /// The normalized path, when it differs from the client's.
    pub normalized_path: Option<String>,
    /// Path parameters, for an aggregate route's placeholders.
    pub params: Params,
    /// When the route's `timeout` runs out.
    pub deadline: Option<Instant>,
}

/// The route of `req`, or the answer when there is none (`400` for a path
/// that is refused, `404`, `405` with `Allow`; the last two with the CORS
/// fields of the route the path led to). `host` is the request's host
/// without its port. A route with `match.claims` verifies its credentials
/// to be chosen: without valid ones, or with other claims, it does not
/// match and the next route is tried.
pub async fn select(
    routes: &Routes,
    req: &RequestHeader,
    host: Option<&str>,
    path_params_rule: PathParams,
    request_id: &str,
) -> Result<Selected, Response> {
    let problem = |status, detail: &str| Response::problem(status, detail, request_id);
    // The router sees the parsed path; the raw bytes must say the same.
    if !req.raw_path_is_utf8() {
        return Err(problem(
            StatusCode::BAD_REQUEST,
            "the path is not valid UTF-8",
        ));
    }
    let path = normalize_path(req.uri.path())
        .map_err(|e| problem(StatusCode::BAD_REQUEST, &e.to_string()))?;
    // Routes match what a Java upstream would serve: `;` parameters are
    // refused, or (`path_params: keep`) set aside for matching.
    let routed: Option<String> = match (path_params(&path), path_params_rule) {
        (PathParamsFound::None, _) => None,
        (_, PathParams::Keep) => Some(without_params(&path)),
        (_, PathParams::Reject) => {
            return Err(problem(
                StatusCode::BAD_REQUEST,
                "the path holds a ; parameter, which this gateway does not route",
            ))
        }
    };
    let match_path = routed.as_deref().unwrap_or(&path);
    let request = RouteRequest {
        method: &req.method,
        path: match_path,
        host,
        headers: &req.headers,
        query: req.uri.query(),
    };
    let preflight = crate::cors::preflight_method(&req.method, &req.headers)
        .and_then(|asked| preflight_route(routes, &request, &asked));
    // Verdicts on the credentials for `match.claims`, by the auth that
    // reached them: routes sharing providers share the one verification.
    let mut verified: Vec<(Arc<Route>, Verdict)> = Vec::new();
    let route = loop {
        let outcome = match preflight {
            Some(route) => RouteOutcome::Matched(route),
            None => routes.find(&request, |route| claimed(route, &verified)),
        };
        match outcome {
            RouteOutcome::Matched(route) => break Arc::clone(route),
            RouteOutcome::NeedsIdentity(route) => {
                let verdict = match &route.auth {
                    Some(auth) => Verdict::of(auth.identify(req).await),
                    None => Verdict::Unverified,
                };
                verified.push((Arc::clone(route), verdict));
            }
            RouteOutcome::NotFound { near } => {
                let refusal = problem(StatusCode::NOT_FOUND, "no route matches this request");
                return Err(with_cors(req, near, refusal));
            }
            RouteOutcome::MethodNotAllowed { allow, near } => {
                let allow = HeaderValue::from_str(&allow).unwrap_or(HeaderValue::from_static(""));
                let refusal = problem(
                    StatusCode::METHOD_NOT_ALLOWED,
                    &format!("{} is not allowed here", req.method),
                )
                .with_header(ALLOW, allow);
                return Err(with_cors(req, Some(near), refusal));
            }
        }
    };
    // Anything but an origin-form target as the client wrote it is rebuilt,
    // so the upstream gets exactly the path that was routed.
    let rebuild = !route.rewrite.is_identity()
        || matches!(path, Cow::Owned(_))
        || !req.raw_path().starts_with(b"/");
    let upstream_uri =
        rebuild.then(|| route.rewrite.apply_kept(&path, match_path, req.uri.query()));
    let mut params = Params::new();
    if route.aggregate().is_some() {
        route.matcher.path.matches(match_path, Some(&mut params));
    }
    // A refusal is kept too: the chosen route's own auth answers with it
    // rather than verifying the same credentials again.
    let verified = verified
        .into_iter()
        .find(|(by, _)| same_credentials(by, &route))
        .map(|(_, verdict)| verdict)
        .unwrap_or_default();
    Ok(Selected {
        verified,
        normalized_path: match path {
            Cow::Owned(p) => Some(p),
            Cow::Borrowed(_) => None,
        },
        deadline: route.timeout.and_then(|t| Instant::now().checked_add(t)),
        route,
        upstream_uri,
        params,
    })
}

/// A routing refusal with the CORS fields of `near`, the first route whose
/// conditions but the method (or `match.claims`) held: the route the page
/// meant, whose policy the refusal follows even when a later route for the
/// path has another. Only for a request with an `Origin`: without one
/// there is no field to set but `Vary`, and the gateway's own answers are
/// `no-store`, so no cache keeps one for a browser.
fn with_cors(req: &RequestHeader, near: Option<&Arc<Route>>, refusal: Response) -> Response {
    // A refused preflight carries no CORS field (SPEC 6.1).
    if !req.headers.contains_key(ORIGIN)
        || crate::cors::preflight_method(&req.method, &req.headers).is_some()
    {
        return refusal;
    }
    match near.and_then(|route| route.cors.as_ref()) {
        Some(cors) => cors.on_refusal(&req.headers, refusal),
        None => refusal,
    }
}

/// The route with `cors` a preflight asks about: the one its actual
/// request (the method it names) would take, else the first route with
/// `cors` for the path whatever its methods (its CORS policy then refuses
/// the method). `None`: routed as any `OPTIONS` request.
fn preflight_route<'r>(
    routes: &'r Routes,
    request: &RouteRequest<'_>,
    asked: &http::Method,
) -> Option<&'r Arc<Route>> {
    let actual = RouteRequest {
        method: asked,
        ..*request
    };
    // A preflight carries no credentials: no `match.claims` holds.
    if let RouteOutcome::Matched(route) = routes.find(&actual, |_| Claimed::Fail) {
        if route.cors.is_some() {
            return Some(route);
        }
    }
    routes.routes().iter().find(|route| {
        let m = &route.matcher;
        route.cors.is_some()
            && m.path.matches(request.path, None)
            && m.matches_host_and_headers(request.host, request.headers)
            && m.matches_query(request.query)
            && m.claims.is_empty()
    })
}

/// Whether `a` and `b` verify the same credentials the same way.
fn same_credentials(a: &Route, b: &Route) -> bool {
    match (&a.auth, &b.auth) {
        (Some(a), Some(b)) => a.same_credentials(b),
        _ => false,
    }
}

/// What `verified` tells of `route`'s `match.claims`.
fn claimed(route: &Route, verified: &[(Arc<Route>, Verdict)]) -> Claimed {
    match verified.iter().find(|(by, _)| same_credentials(by, route)) {
        None => Claimed::Unknown,
        Some((_, verdict)) => {
            if route
                .matcher
                .matches_claims(verdict.identity().map(Identity::claims))
            {
                Claimed::Hold
            } else {
                Claimed::Fail
            }
        }
    }
}
