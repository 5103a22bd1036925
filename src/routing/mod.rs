//! Routing: path normalization, route selection in specificity order, and
//! the path rewrite sent upstream. Joins the `request_filter` phase (choose
//! the route, or answer 400/404/405) and `upstream_request_filter` (rewrite).
//! It matches and rewrites only: what a route does is `route`'s, and the
//! router holds routes of any type that has a matcher.

mod matcher;
mod normalize;

use http::{HeaderMap, Method};

pub use matcher::{
    claim_matches, header_matches, HostPattern, MethodSet, Params, PathPattern, RouteMatcher,
    Segment,
};
pub use normalize::{
    normalize_path, path_params, segment_name, without_params, Params as PathParamsFound,
    PathError, PathParams,
};

/// The percent-decoded values of a query parameter, in order.
pub fn query_values<'q: 'n, 'n>(
    query: &'q str,
    name: &'n str,
) -> impl Iterator<Item = std::borrow::Cow<'q, str>> + 'n {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .filter(move |(n, _)| *n == name)
        .map(|(_, v)| percent_encoding::percent_decode_str(v).decode_utf8_lossy())
}

/// `strip_prefix` then `add_prefix`, applied to the normalized path.
#[derive(Debug, Default)]
pub struct PathRewrite {
    pub strip_prefix: Option<String>,
    pub add_prefix: Option<String>,
}

impl PathRewrite {
    pub fn is_identity(&self) -> bool {
        self.strip_prefix.is_none() && self.add_prefix.is_none()
    }

    /// The path and query to send upstream.
    pub fn apply(&self, path: &str, query: Option<&str>) -> String {
        self.apply_kept(path, path, query)
    }

    /// As [`Self::apply`] for a path whose `;` parameters are kept: the
    /// prefix is matched on `routed` (the path without them) and stripped
    /// from `path` segment by segment.
    pub fn apply_kept(&self, path: &str, routed: &str, query: Option<&str>) -> String {
        let mut rest = path;
        if let Some(strip) = &self.strip_prefix {
            if let Some(after) = routed.strip_prefix(strip.as_str()) {
                if after.is_empty() || after.starts_with('/') {
                    rest = if routed.len() == path.len() {
                        &path[strip.len()..]
                    } else {
                        // Past as many named segments of `path` as the
                        // prefix has (segments of parameters only count
                        // for none, as in `without_params`).
                        let wanted = strip.trim_end_matches('/').matches('/').count();
                        let mut named = 0;
                        let mut cut = path.len();
                        for (at, _) in path.match_indices('/') {
                            if named == wanted {
                                cut = at;
                                break;
                            }
                            let segment = path[at + 1..].split('/').next().unwrap_or("");
                            if !segment_name(segment).is_empty() {
                                named += 1;
                            }
                        }
                        &path[cut..]
                    };
                }
            }
        }
        let mut out = String::with_capacity(path.len() + 16);
        if let Some(add) = &self.add_prefix {
            out.push_str(add.trim_end_matches('/'));
        }
        if rest.is_empty() {
            out.push('/');
        } else {
            out.push_str(rest);
        }
        if out.is_empty() {
            out.push('/');
        }
        if let Some(q) = query {
            out.push('?');
            out.push_str(q);
        }
        out
    }
}

/// What the router needs to know about a request.
pub struct RouteRequest<'a> {
    pub method: &'a Method,
    /// Normalized path, without the query.
    pub path: &'a str,
    /// Host without port.
    pub host: Option<&'a str>,
    pub headers: &'a HeaderMap,
    /// The query, without the `?`.
    pub query: Option<&'a str>,
}

/// What the router's caller knows of a route's `match.claims`.
pub enum Claimed {
    Hold,
    Fail,
    /// The route's credentials have not been verified yet.
    Unknown,
}

pub enum RouteOutcome<'r, T> {
    Matched(&'r T),
    /// Everything but `match.claims` holds for this route, and its
    /// credentials must be verified to tell (then ask again).
    NeedsIdentity(&'r T),
    /// A route matches everything but the method; `allow` lists the methods
    /// that would have matched. `near` as for `NotFound`.
    MethodNotAllowed {
        allow: String,
        near: &'r T,
    },
    /// `near`: the first route, in the order routes are tried, whose path,
    /// host, headers and query held (its method or `match.claims` did
    /// not): the route whose policies (CORS) the refusal follows.
    NotFound {
        near: Option<&'r T>,
    },
}

/// What the router needs of a route: its conditions.
pub trait Routable {
    fn matcher(&self) -> &RouteMatcher;
}

/// Routes in the order they are tried: most specific first.
#[derive(Debug)]
pub struct Router<T> {
    routes: Vec<T>,
}

impl<T> Default for Router<T> {
    fn default() -> Self {
        Router { routes: Vec::new() }
    }
}

impl<T: Routable> Router<T> {
    /// Orders `routes` (given in file order) by specificity: exact path,
    /// then regex, then prefix (longer first); then more conditions; ties
    /// keep file order.
    pub fn new(routes: Vec<T>) -> Self {
        let mut indexed: Vec<(usize, T)> = routes.into_iter().enumerate().collect();
        indexed.sort_by_key(|(index, route)| {
            let m = route.matcher();
            let (kind, within) = m.path.specificity();
            (kind, within, std::cmp::Reverse(m.condition_count()), *index)
        });
        Router {
            routes: indexed.into_iter().map(|(_, r)| r).collect(),
        }
    }

    pub fn routes(&self) -> &[T] {
        &self.routes
    }

    /// The first route whose conditions hold. A route with `match.claims`
    /// is asked of `claimed` (only once all else holds, so credentials are
    /// verified only for a route the request could take).
    pub fn find(
        &self,
        req: &RouteRequest<'_>,
        mut claimed: impl FnMut(&T) -> Claimed,
    ) -> RouteOutcome<'_, T> {
        let mut allowed: Option<Vec<&Method>> = None;
        let mut near = None;
        for route in &self.routes {
            let m = route.matcher();
            if !m.path.matches(req.path, None)
                || !m.matches_host_and_headers(req.host, req.headers)
                || !m.matches_query(req.query)
            {
                continue;
            }
            near = near.or(Some(route));
            if m.matches_method(req.method) {
                if m.claims.is_empty() {
                    return RouteOutcome::Matched(route);
                }
                match claimed(route) {
                    Claimed::Hold => return RouteOutcome::Matched(route),
                    Claimed::Fail => continue,
                    Claimed::Unknown => return RouteOutcome::NeedsIdentity(route),
                }
            }
            if let Some(methods) = &m.methods {
                let list = allowed.get_or_insert_with(Vec::new);
                for method in methods.iter() {
                    if !list.contains(&method) {
                        list.push(method);
                    }
                }
            }
        }
        match (allowed, near) {
            (Some(mut methods), Some(near)) => {
                methods.sort_by(|a, b| a.as_str().cmp(b.as_str()));
                let allow = methods
                    .iter()
                    .map(|m| m.as_str())
                    .collect::<Vec<_>>()
                    .join(", ");
                RouteOutcome::MethodNotAllowed { allow, near }
            }
            _ => RouteOutcome::NotFound { near },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrite_strips_whole_segments_and_adds() {
        let r = PathRewrite {
            strip_prefix: Some("/v1".into()),
            add_prefix: Some("/api".into()),
        };
        assert_eq!(r.apply("/v1/users/7", Some("a=1")), "/api/users/7?a=1");
        assert_eq!(r.apply("/v1", None), "/api/");
        assert_eq!(r.apply("/v1x/users", None), "/api/v1x/users");
        let strip_only = PathRewrite {
            strip_prefix: Some("/v1".into()),
            add_prefix: None,
        };
        assert_eq!(strip_only.apply("/v1", None), "/");
        assert_eq!(strip_only.apply("/v1/a", None), "/a");
        let add_slash = PathRewrite {
            strip_prefix: None,
            add_prefix: Some("/api/".into()),
        };
        assert_eq!(add_slash.apply("/x", None), "/api/x");
        // Kept path parameters: the prefix is stripped by segments.
        assert_eq!(
            strip_only.apply_kept("/v1;x=1/a;b/c", "/v1/a/c", Some("q=1")),
            "/a;b/c?q=1"
        );
        assert_eq!(strip_only.apply_kept("/v1;x", "/v1", None), "/");
        assert_eq!(
            strip_only.apply_kept("/;p/v1;x/a", "/v1/a", None),
            "/a",
            "a segment of parameters only is no segment"
        );
    }
}
