//! A compiled route: where its requests go and the policies they meet.
//! The router (`routing`) only finds it; what happens then is here, and in
//! the policy modules each field comes from.
//!
//! Policies are a fixed, ordered set of typed fields rather than a list of
//! policy objects: each is a compiled runtime type with a method per phase
//! it joins, returning that phase's verdict (`respond::Phase`), and
//! `proxy` calls them in the order below. A typed field costs a route that
//! does not use it one `None` check, and its phase methods are called
//! directly (no virtual call, no shared context to downcast); a new policy
//! is one new field, one module, and a line per phase in `proxy`.
//!
//! The order a request meets them:
//!
//! 1. routing: path normalized and matched (`routing`), the head's limits
//!    (`listener`);
//! 2. `ip_filter`, then `cors` (a preflight is answered here: it needs no
//!    token and never reaches the upstream; `route::select` gives it the
//!    route its actual request would take);
//! 3. `rate_limit` by IP or header, before authentication, so floods of bad
//!    tokens are limited too;
//! 4. `auth` (JWT), then `rate_limit` by claim;
//! 5. body rules prepared (`request_body`; `response_body` drops `Range`);
//! 6. `aggregate` answers here, from the cache or its parts; else
//! 7. `cache` (a hit answers), then the upstream (`upstream`, `timeout`);
//! 8. on the way up: forwarding fields, identity headers, `request_headers`,
//!    `request_body`, then `mirror` copies what the upstream is sent;
//! 9. on the way back: `response_body`, `response_headers`, `deprecation`,
//!    the rate-limit headers, the CORS fields (on the gateway's own answers
//!    too), then `compression` (after the cache, per response);
//! 10. `fallback` when the upstream cannot answer.

mod edge;
mod explain;
mod guard;
mod select;

pub use edge::edge;
pub use explain::explain;
pub use guard::{guard, Guarded};
pub use select::{select, Selected};

use std::sync::Arc;
use std::time::Duration;

use prometheus::Histogram;

use crate::routing::{PathPattern, PathRewrite, Routable, RouteMatcher, Router};

use crate::aggregate::Aggregate;
use crate::auth::RouteAuth;
use crate::cache::CachePolicy;
use crate::compression::Compression;
use crate::cors::Cors;
use crate::ip_filter::IpFilter;
use crate::metrics::{RouteRequests, Series};
use crate::mirror::Mirror;
use crate::ratelimit::RateLimit;
use crate::respond::StaticResponse;
use crate::split::Split;
use crate::subject::Subject;
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
    /// Its own or the top-level default.
    pub cors: Option<Arc<Cors>>,
    pub ip_filter: Option<Arc<IpFilter>>,
    pub compression: Option<Arc<Compression>>,
    pub mirror: Option<Mirror>,
    /// Every header named by any provider's `forward_claims`: removed from
    /// each client request, on every route.
    pub identity_headers: Arc<[http::HeaderName]>,
    pub request_body: Option<JsonRules>,
    pub response_body: Option<ResponseBodyRules>,
    pub cache: Option<CachePolicy>,
    /// This route's `gatehouse_request_duration_seconds` series.
    pub duration_series: Series<Histogram>,
    /// This route's `gatehouse_requests_total` series.
    pub request_series: RouteRequests,
}

/// Where a route's requests go.
#[derive(Debug)]
pub enum Target {
    Upstream(Arc<Upstream>),
    /// One of several upstreams, by weight (`split`).
    Split(Split),
    Aggregate(Aggregate),
    /// No route matched: the gateway answers itself.
    None,
}

impl Route {
    /// The route of a request no route matched (named `-` in metrics and
    /// logs), with no policy: a request's context always holds a route, so
    /// no phase asks whether it has one.
    pub fn unmatched() -> Self {
        Route {
            name: Arc::from("-"),
            matcher: RouteMatcher {
                path: PathPattern::Prefix(String::new()),
                methods: None,
                host: None,
                headers: Vec::new(),
                query: Vec::new(),
                claims: Vec::new(),
            },
            target: Target::None,
            rewrite: PathRewrite::default(),
            timeout: None,
            max_body: 0,
            request_headers: HeaderRules::default(),
            response_headers: HeaderRules::default(),
            deprecation: None,
            fallback: None,
            auth: None,
            rate_limit: None,
            cors: None,
            ip_filter: None,
            compression: None,
            mirror: None,
            identity_headers: Arc::from([]),
            request_body: None,
            response_body: None,
            cache: None,
            duration_series: Series::default(),
            request_series: RouteRequests::default(),
        }
    }

    /// The upstream a request `subject` describes goes to (for a split,
    /// the side it falls on).
    pub fn upstream_for(&self, subject: &Subject<'_>) -> Option<&Arc<Upstream>> {
        match &self.target {
            Target::Upstream(u) => Some(u),
            Target::Split(split) => Some(split.choose(subject)),
            Target::Aggregate(_) | Target::None => None,
        }
    }

    pub fn aggregate(&self) -> Option<&Aggregate> {
        match &self.target {
            Target::Aggregate(a) => Some(a),
            Target::Upstream(_) | Target::Split(_) | Target::None => None,
        }
    }
}

impl Routable for Arc<Route> {
    fn matcher(&self) -> &RouteMatcher {
        &self.matcher
    }
}

/// The live routes, most specific first.
pub type Routes = Router<Arc<Route>>;
