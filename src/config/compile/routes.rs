//! `routes`: each route's matcher, target, rewrite and fallback; its
//! policies are compiled in `policies`.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::StatusCode;
use serde_json::Value;

use super::*;
use crate::config::raw::*;
use crate::config::source::{index_path, key_path};
use crate::config::ServerSettings;
use crate::metrics::{RouteRequests, Series};
use crate::respond::StaticResponse;
use crate::route::{Route, Target};
use crate::routing::{HostPattern, MethodSet, PathPattern, PathRewrite, RouteMatcher};
use crate::transform::body::ResponseBodyRules;
use crate::transform::headers::Deprecation;
use crate::upstream::Upstream;

impl Compiler<'_> {
    pub(super) fn routes(
        &mut self,
        value: Option<&Value>,
        shared: &Shared<'_>,
        declared: &[String],
        server: &ServerSettings,
    ) -> Vec<Route> {
        let mut out = Vec::new();
        let items = match value {
            None | Some(Value::Null) => return out,
            Some(Value::Array(items)) => items,
            Some(_) => {
                self.error("routes", "routes must be a list");
                return out;
            }
        };
        let mut names: HashSet<String> = HashSet::new();
        for (i, item) in items.iter().enumerate() {
            let path = index_path("routes", i);
            let Some(raw) = self.de::<RawRoute>(&path, item) else {
                continue;
            };
            let npath = key_path(&path, "name");
            if self.check_name(&npath, "route", &raw.name) && !names.insert(raw.name.clone()) {
                self.error(
                    &npath,
                    format!("route name \"{}\" is used by an earlier route", raw.name),
                );
            }
            let scope = {
                use std::hash::{BuildHasher, BuildHasherDefault};
                let hash =
                    BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
                        .hash_one(item.to_string());
                format!("{}#{hash:016x}", raw.name)
            };
            if let Some(route) = self.route(&path, raw, shared, declared, server, &scope) {
                out.push(route);
            }
        }
        out
    }

    pub(super) fn route(
        &mut self,
        path: &str,
        raw: RawRoute,
        shared: &Shared<'_>,
        declared: &[String],
        server: &ServerSettings,
        scope: &str,
    ) -> Option<Route> {
        let upstreams = shared.upstreams;
        let errors_before = self.errors.0.len();
        let matcher = self.matcher(&key_path(path, "match"), raw.matcher);
        let given = [
            raw.upstream.is_some(),
            raw.aggregate.is_some(),
            raw.split.is_some(),
        ];
        let target = match (raw.upstream.as_deref(), &raw.aggregate, &raw.split) {
            _ if given.iter().filter(|g| **g).count() > 1 => {
                self.error(
                    path,
                    "a route has one of upstream, split or aggregate, not several",
                );
                None
            }
            (None, None, None) => {
                self.error(
                    path,
                    "a route needs an upstream (or a split, or an aggregate)",
                );
                None
            }
            (Some(name), _, _) => self
                .upstream_ref(&key_path(path, "upstream"), name, upstreams, declared)
                .map(Target::Upstream),
            (_, _, Some(split)) => self
                .split(&key_path(path, "split"), split, upstreams, declared)
                .map(Target::Split),
            (_, Some(agg), _) => self
                .aggregate(
                    &key_path(path, "aggregate"),
                    agg,
                    matcher.as_ref(),
                    raw.auth.is_some(),
                    upstreams,
                    declared,
                )
                .map(Target::Aggregate),
        };
        for (key, value) in [
            ("strip_prefix", &raw.strip_prefix),
            ("add_prefix", &raw.add_prefix),
        ] {
            if let Some(v) = value {
                if !v.starts_with('/') || v.contains(['?', '#', ' ']) {
                    self.error(
                        &key_path(path, key),
                        format!("{key} \"{v}\" must be a path starting with /"),
                    );
                }
            }
        }
        let request_headers =
            self.header_rules(&key_path(path, "request_headers"), raw.request_headers);
        // Identity headers carry verified claims only: no rule may write one.
        let written = request_headers
            .rename
            .iter()
            .map(|(_, to)| to)
            .chain(request_headers.set.iter().map(|(n, _)| n))
            .chain(request_headers.add.iter().map(|(n, _)| n));
        for name in written {
            if shared.identity_headers.contains(name) {
                self.error(
                    &key_path(path, "request_headers"),
                    format!("{name} carries verified claims (forward_claims); a header rule cannot write it"),
                );
            }
        }
        let response_headers =
            self.header_rules(&key_path(path, "response_headers"), raw.response_headers);
        let deprecation = raw.deprecation.and_then(|d| {
            match Deprecation::new(d.sunset.as_deref(), d.link.as_deref()) {
                Ok(dep) => Some(dep),
                Err(e) => {
                    self.error(&key_path(path, "deprecation"), e);
                    None
                }
            }
        });
        let fallback = raw
            .fallback
            .and_then(|f| self.fallback(&key_path(path, "fallback"), f));
        let request_body = raw
            .request_body
            .as_ref()
            .and_then(|v| self.body_rules(&key_path(path, "request_body"), v, false))
            .map(|(json, _)| json);
        let response_body = raw
            .response_body
            .as_ref()
            .and_then(|v| self.body_rules(&key_path(path, "response_body"), v, true))
            .map(|(json, xml_to_json)| ResponseBodyRules { json, xml_to_json });
        let cache = raw
            .cache
            .as_ref()
            .and_then(|c| self.route_cache(&key_path(path, "cache"), c, scope));
        let auth = raw
            .auth
            .as_ref()
            .and_then(|a| self.route_auth(&key_path(path, "auth"), a, shared));
        let claims_matched = matcher.as_ref().is_some_and(|m| !m.claims.is_empty());
        let verifies = auth.as_ref().is_some_and(|a| !a.methods.is_empty());
        if claims_matched && !verifies && raw.auth.is_none() {
            self.error(
                &key_path(&key_path(path, "match"), "claims"),
                "match.claims needs auth on the route (its claims come from the verified token or key)",
            );
        } else if claims_matched && !verifies && auth.is_some() {
            self.error(
                &key_path(&key_path(path, "match"), "claims"),
                "match.claims needs a jwt or api_key provider in the route's auth, not a client certificate alone",
            );
        }
        let rate_limit = raw.rate_limit.as_ref().and_then(|r| {
            let path = key_path(path, "rate_limit");
            // A shared limit is carried only while its cluster is unchanged
            // too (it holds the cluster's connection).
            let source = match (r.get("scope").and_then(Value::as_str), shared.cluster) {
                (Some("cluster"), Some(c)) => {
                    serde_json::json!({ "rate_limit": r, "cluster": c.source })
                }
                _ => r.clone(),
            };
            self.carry(&raw.name, &source, |cx| {
                cx.rate_limit(&path, r, &raw.name, shared.cluster)
            })
        });
        let methods = matcher.as_ref().and_then(|m| m.methods.as_ref());
        let cors = self.route_cors(
            &key_path(path, "cors"),
            raw.cors.as_ref(),
            shared.edge,
            methods,
        );
        let ip_filter = self.route_ip_filter(
            &key_path(path, "ip_filter"),
            raw.ip_filter.as_ref(),
            shared.edge,
        );
        let compression = self.route_compression(
            &key_path(path, "compression"),
            raw.compression.as_ref(),
            shared.edge,
        );
        let mirror = raw
            .mirror
            .as_ref()
            .and_then(|m| self.mirror(&key_path(path, "mirror"), m, upstreams, declared));
        if raw.mirror.is_some() && raw.aggregate.is_some() {
            self.error(
                &key_path(path, "mirror"),
                "mirror copies what a route sends an upstream; an aggregate route sends its parts",
            );
        }
        if let Some(t) = raw.timeout {
            if t.0.is_zero() {
                self.error(&key_path(path, "timeout"), "timeout must be above zero");
            }
        }
        if self.errors.0.len() > errors_before {
            return None;
        }
        Some(Route {
            name: raw.name.into(),
            matcher: matcher?,
            target: target?,
            rewrite: PathRewrite {
                strip_prefix: raw
                    .strip_prefix
                    .map(|p| p.trim_end_matches('/').to_string())
                    .filter(|p| !p.is_empty()),
                add_prefix: raw.add_prefix,
            },
            timeout: raw.timeout.map(|d| d.0),
            max_body: raw.max_body.map_or(server.max_body, |s| s.0),
            request_headers,
            response_headers,
            deprecation,
            fallback,
            auth,
            rate_limit,
            cors,
            ip_filter,
            compression,
            mirror,
            identity_headers: Arc::clone(shared.identity_headers),
            request_body,
            response_body,
            cache,
            duration_series: Series::default(),
            request_series: RouteRequests::default(),
        })
    }

    /// An upstream named by a route or an aggregate part.
    pub(super) fn upstream_ref(
        &mut self,
        path: &str,
        name: &str,
        upstreams: &BTreeMap<String, Arc<Upstream>>,
        declared: &[String],
    ) -> Option<Arc<Upstream>> {
        if let Some(up) = upstreams.get(name) {
            return Some(Arc::clone(up));
        }
        // Declared but invalid: its own errors are already reported.
        if declared.iter().any(|d| d == name) {
            return None;
        }
        let known = known_names(declared, "none are defined");
        self.error(path, format!("unknown upstream \"{name}\"; {known}"));
        None
    }

    pub(super) fn matcher(&mut self, path: &str, raw: RawMatch) -> Option<RouteMatcher> {
        let given = [
            raw.path.is_some(),
            raw.path_prefix.is_some(),
            raw.path_regex.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if given != 1 {
            self.error(
                path,
                "a route matches exactly one of path, path_prefix or path_regex",
            );
            return None;
        }
        let pattern = if let Some(p) = &raw.path {
            PathPattern::exact(p).map_err(|e| (key_path(path, "path"), e))
        } else if let Some(p) = &raw.path_prefix {
            PathPattern::prefix(p).map_err(|e| (key_path(path, "path_prefix"), e))
        } else {
            let source = raw.path_regex.as_deref().unwrap_or_default();
            PathPattern::regex(source).map_err(|e| (key_path(path, "path_regex"), e))
        };
        let pattern = match pattern {
            Ok(p) => Some(p),
            Err((p, e)) => {
                self.error(&p, e);
                None
            }
        };
        let methods = match &raw.methods {
            None => None,
            Some(list) => match MethodSet::parse(list) {
                Ok(m) => Some(m),
                Err(e) => {
                    self.error(&key_path(path, "methods"), e);
                    return None;
                }
            },
        };
        let host = match &raw.host {
            None => None,
            Some(h) => match HostPattern::parse(h) {
                Ok(h) => Some(h),
                Err(e) => {
                    self.error(&key_path(path, "host"), e);
                    return None;
                }
            },
        };
        let mut headers = Vec::new();
        for (name, value) in raw.headers.unwrap_or_default() {
            let hpath = key_path(&key_path(path, "headers"), &name);
            match (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(&value),
            ) {
                (Ok(n), Ok(v)) => headers.push((n, v)),
                (Err(_), _) => self.error(&hpath, format!("\"{name}\" is not a valid header name")),
                (_, Err(_)) => self.error(&hpath, "the value is not a valid header value"),
            }
        }
        let query = self.match_query(&key_path(path, "query"), raw.query);
        let claims = self.match_claims(&key_path(path, "claims"), raw.claims);
        Some(RouteMatcher {
            path: pattern?,
            methods,
            host,
            headers,
            query,
            claims,
        })
    }

    pub(super) fn fallback(&mut self, path: &str, raw: RawFallback) -> Option<StaticResponse> {
        let status = match StatusCode::from_u16(raw.status) {
            Ok(s) if (200..=599).contains(&raw.status) && !matches!(raw.status, 204 | 304) => s,
            _ => {
                self.error(
                    &key_path(path, "status"),
                    "status must be an HTTP status between 200 and 599 that carries a body (not 204 or 304)",
                );
                return None;
            }
        };
        let content_type = raw
            .content_type
            .as_deref()
            .unwrap_or("text/plain; charset=utf-8");
        let Ok(content_type) = HeaderValue::from_str(content_type) else {
            self.error(
                &key_path(path, "content_type"),
                "content_type is not a valid header value",
            );
            return None;
        };
        Some(StaticResponse {
            status,
            content_type,
            body: Bytes::from(raw.body),
        })
    }
}
