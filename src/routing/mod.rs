//! Routing: path normalization, route selection in specificity order, and
//! the path rewrite sent upstream. Joins the `request_filter` phase (choose
//! the route, or answer 400/404/405) and `upstream_request_filter` (rewrite).

mod explain;
mod matcher;
mod normalize;

pub use explain::explain;

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, Method};
use prometheus::Histogram;

pub use matcher::{HostPattern, MethodSet, Params, PathPattern, RouteMatcher, Segment};
pub use normalize::{
    normalize_path, path_params, segment_name, without_params, Params as PathParamsFound, PathError,
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

use crate::aggregate::Aggregate;
use crate::auth::RouteAuth;
use crate::cache::CachePolicy;
use crate::metrics::Series;
use crate::ratelimit::RateLimit;
use crate::respond::StaticResponse;
use crate::transform::body::ResponseBodyRules;
use crate::transform::headers::{Deprecation, HeaderRules};
use crate::transform::json::JsonRules;
use crate::upstream::Upstream;

/// A compiled route: what it matches and how its requests are handled.
#[derive(Debug)]
pub struct Route {
    /// Unique; the label in metrics and logs.
    pub name: Arc<str>,
    pub matcher: RouteMatcher,
    pub target: Target,
    pub rewrite: PathRewrite,
    /// Deadline for the whole upstream exchange; overrides the upstream's
    /// `read_timeout`.
    pub timeout: Option<Duration>,
    pub max_body: u64,
    pub request_headers: HeaderRules,
    pub response_headers: HeaderRules,
    pub deprecation: Option<Deprecation>,
    pub fallback: Option<StaticResponse>,
    pub auth: Option<RouteAuth>,
    pub rate_limit: Option<Arc<RateLimit>>,
    /// Every header named by any provider's `forward_claims`: removed from
    /// each client request, on every route.
    pub identity_headers: Arc<[http::HeaderName]>,
    pub request_body: Option<JsonRules>,
    pub response_body: Option<ResponseBodyRules>,
    pub cache: Option<CachePolicy>,
    /// This route's `gatehouse_request_duration_seconds` series.
    pub duration_series: Series<Histogram>,
}

/// Where a route's requests go.
#[derive(Debug)]
pub enum Target {
    Upstream(Arc<Upstream>),
    Aggregate(Aggregate),
}

impl Route {
    pub fn upstream(&self) -> Option<&Arc<Upstream>> {
        match &self.target {
            Target::Upstream(u) => Some(u),
            Target::Aggregate(_) => None,
        }
    }

    pub fn aggregate(&self) -> Option<&Aggregate> {
        match &self.target {
            Target::Aggregate(a) => Some(a),
            Target::Upstream(_) => None,
        }
    }
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
}

pub enum RouteOutcome<'r> {
    Matched(&'r Arc<Route>),
    /// A route matches everything but the method; `allow` lists the methods
    /// that would have matched.
    MethodNotAllowed {
        allow: String,
    },
    NotFound,
}

/// Routes in the order they are tried: most specific first.
#[derive(Debug, Default)]
pub struct Router {
    routes: Vec<Arc<Route>>,
}

impl Router {
    /// Orders `routes` (given in file order) by specificity: exact path,
    /// then regex, then prefix (longer first); then more conditions; ties
    /// keep file order.
    pub fn new(routes: Vec<Route>) -> Self {
        let mut indexed: Vec<(usize, Route)> = routes.into_iter().enumerate().collect();
        indexed.sort_by_key(|(index, route)| {
            let (kind, within) = route.matcher.path.specificity();
            (
                kind,
                within,
                std::cmp::Reverse(route.matcher.condition_count()),
                *index,
            )
        });
        Router {
            routes: indexed.into_iter().map(|(_, r)| Arc::new(r)).collect(),
        }
    }

    pub fn routes(&self) -> &[Arc<Route>] {
        &self.routes
    }

    pub fn find(&self, req: &RouteRequest<'_>) -> RouteOutcome<'_> {
        let mut allowed: Option<Vec<&Method>> = None;
        for route in &self.routes {
            let m = &route.matcher;
            if !m.path.matches(req.path, None) || !m.matches_host_and_headers(req.host, req.headers)
            {
                continue;
            }
            if m.matches_method(req.method) {
                return RouteOutcome::Matched(route);
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
        match allowed {
            Some(mut methods) => {
                methods.sort_by(|a, b| a.as_str().cmp(b.as_str()));
                let allow = methods
                    .iter()
                    .map(|m| m.as_str())
                    .collect::<Vec<_>>()
                    .join(", ");
                RouteOutcome::MethodNotAllowed { allow }
            }
            None => RouteOutcome::NotFound,
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
