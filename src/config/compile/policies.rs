//! A route's policies: `auth`, `rate_limit`, `cache`, body and header
//! rules, `aggregate`; and the `cache` section they size.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue};
use serde_json::Value;

use super::*;
use crate::aggregate::{Aggregate, Part as AggregatePart, PathTemplate};
use crate::auth::{Method, RouteAuth};
use crate::cache::CachePolicy;
use crate::config::raw::*;
use crate::config::source::{index_path, key_path};
use crate::ratelimit::{LimitKey, OnStoreError, RateLimit};
use crate::routing::{PathPattern, RouteMatcher, Segment};
use crate::transform::headers::HeaderRules;
use crate::transform::json::{FieldPath, JsonRules};
use crate::upstream::Upstream;

/// Fields that frame a message or describe one connection.
const FRAMING_HEADERS: &[&str] = &[
    "connection",
    "content-length",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

impl Compiler<'_> {
    pub(super) fn aggregate(
        &mut self,
        path: &str,
        value: &Value,
        matcher: Option<&RouteMatcher>,
        has_auth: bool,
        upstreams: &BTreeMap<String, Arc<Upstream>>,
        declared: &[String],
    ) -> Option<Aggregate> {
        let raw = self.de::<RawAggregate>(path, value)?;
        let before = self.errors.0.len();
        let timeout = raw.timeout.map_or(Duration::from_secs(10), |d| d.0);
        if timeout.is_zero() {
            self.error(&key_path(path, "timeout"), "timeout must be above zero");
        }
        if raw.parts.is_empty() {
            self.error(
                &key_path(path, "parts"),
                "an aggregate needs at least one part",
            );
        }
        // The parameters the route's path binds.
        let params: Vec<String> = match matcher.map(|m| &m.path) {
            Some(PathPattern::Exact(segments)) => segments
                .iter()
                .filter_map(|s| match s {
                    Segment::Param(n) => Some(n.clone()),
                    Segment::Literal(_) => None,
                })
                .collect(),
            Some(PathPattern::Regex(re)) => {
                re.capture_names().flatten().map(str::to_string).collect()
            }
            _ => Vec::new(),
        };
        let mut parts = Vec::new();
        let mut keys = HashSet::new();
        for (i, part) in raw.parts.into_iter().enumerate() {
            let ppath = index_path(&key_path(path, "parts"), i);
            if part.key.is_empty() || !keys.insert(part.key.clone()) {
                self.error(
                    &key_path(&ppath, "key"),
                    format!("part key \"{}\" is empty or used twice", part.key),
                );
            }
            let template = match PathTemplate::parse(&part.path) {
                Ok(t) => t,
                Err(e) => {
                    self.error(&key_path(&ppath, "path"), e);
                    continue;
                }
            };
            for p in template.params() {
                if !params.iter().any(|n| n == p) {
                    self.error(
                        &key_path(&ppath, "path"),
                        format!("{{{p}}} is not a parameter of the route's path"),
                    );
                }
            }
            if template.needs_claims() && !has_auth {
                self.error(
                    &key_path(&ppath, "path"),
                    "{claim.NAME} needs auth on the route",
                );
            }
            let Some(upstream) = self.upstream_ref(
                &key_path(&ppath, "upstream"),
                &part.upstream,
                upstreams,
                declared,
            ) else {
                continue;
            };
            parts.push(AggregatePart {
                key: part.key,
                upstream,
                path: template,
                required: part.required.unwrap_or(true),
            });
        }
        (self.errors.0.len() == before).then_some(Aggregate { timeout, parts })
    }

    pub(super) fn route_cache(
        &mut self,
        path: &str,
        value: &Value,
        scope: &str,
    ) -> Option<CachePolicy> {
        let raw = self.de::<RawRouteCache>(path, value)?;
        if raw.ttl.0.is_zero() {
            self.error(&key_path(path, "ttl"), "ttl must be above zero");
            return None;
        }
        let mut vary = Vec::new();
        for (i, name) in raw.vary.iter().enumerate() {
            match HeaderName::from_bytes(name.as_bytes()) {
                Ok(h) => vary.push(h),
                Err(_) => self.error(
                    &index_path(&key_path(path, "vary"), i),
                    format!("\"{name}\" is not a valid header name"),
                ),
            }
        }
        Some(CachePolicy {
            ttl: raw.ttl.0,
            vary,
            scope: scope.to_string(),
        })
    }

    /// `cache.max_size`, needed only when a route caches.
    pub(super) fn cache_section(&mut self, value: Option<&Value>, used: bool) -> Option<u64> {
        let raw = match value.filter(|v| !v.is_null()) {
            Some(v) => self.de::<RawCacheGlobal>("cache", v)?,
            None => RawCacheGlobal::default(),
        };
        let size = raw.max_size.map_or(256 << 20, |s| s.0);
        if size < 1 << 20 {
            self.error("cache.max_size", "max_size must be at least 1MiB");
            return None;
        }
        used.then_some(size)
    }

    /// A body rule block; `None` when it is empty or invalid.
    pub(super) fn body_rules(
        &mut self,
        path: &str,
        value: &Value,
        response: bool,
    ) -> Option<(JsonRules, bool)> {
        let raw = self.de::<RawBodyRules>(path, value)?;
        if raw.xml_to_json && !response {
            self.error(
                &key_path(path, "xml_to_json"),
                "xml_to_json applies to response_body only",
            );
            return None;
        }
        let mut remove = Vec::new();
        let mut rename = Vec::new();
        for (i, field) in raw.remove_fields.iter().enumerate() {
            match FieldPath::parse(field) {
                Ok(p) => remove.push(p),
                Err(e) => self.error(&index_path(&key_path(path, "remove_fields"), i), e),
            }
        }
        for (from, to) in &raw.rename_fields {
            let rpath = key_path(&key_path(path, "rename_fields"), from);
            if to.is_empty() || to.contains(['.', '[', ']']) {
                self.error(
                    &rpath,
                    format!("the new name \"{to}\" must be a plain field name"),
                );
                continue;
            }
            match FieldPath::parse(from) {
                Ok(p) => rename.push((p, to.clone())),
                Err(e) => self.error(&rpath, e),
            }
        }
        let rules = JsonRules::new(remove, rename);
        if rules.is_empty() && !raw.xml_to_json {
            return None;
        }
        Some((rules, raw.xml_to_json))
    }

    pub(super) fn route_auth(
        &mut self,
        path: &str,
        value: &Value,
        shared: &Shared<'_>,
    ) -> Option<RouteAuth> {
        // The short forms: one provider's name, or a list of them (any one
        // credential passes).
        let (raw, names) = match value {
            Value::String(name) => (
                RawRouteAuth::default(),
                vec![(path.to_string(), name.clone(), None)],
            ),
            Value::Array(items) => {
                let mut names = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    match item.as_str() {
                        Some(name) => names.push((index_path(path, i), name.to_string(), None)),
                        None => self.error(&index_path(path, i), "name an auth provider"),
                    }
                }
                if items.is_empty() {
                    self.error(path, "list at least one auth provider");
                }
                (RawRouteAuth::default(), names)
            }
            _ => {
                let mut raw = self.de::<RawRouteAuth>(path, value)?;
                let mut names = Vec::new();
                // The long form names each provider's kind by its key.
                if let Some(jwt) = raw.jwt.take() {
                    names.push((key_path(path, "jwt"), jwt, Some(false)));
                }
                if let Some(key) = raw.api_key.take() {
                    names.push((key_path(path, "api_key"), key, Some(true)));
                }
                if names.is_empty() && !raw.client_cert {
                    self.error(path, "give jwt, api_key or client_cert: true");
                }
                (raw, names)
            }
        };
        let auth = shared.auth;
        let mut methods = Vec::new();
        let mut unresolved = false;
        for (name_path, name, wants_api_key) in names {
            let method = match (auth.jwt.get(&name), auth.api_keys.get(&name)) {
                (Some(p), _) => Method::Jwt(Arc::clone(p)),
                (_, Some(k)) => Method::ApiKey(Arc::clone(k)),
                _ => {
                    unresolved = true;
                    // Declared but invalid: its own errors are already reported.
                    if !auth.declared.contains(&name) {
                        let known = known_names(
                            auth.declared.iter(),
                            "none are defined under auth.jwt or auth.api_keys",
                        );
                        self.error(
                            &name_path,
                            format!("unknown auth provider \"{name}\"; {known}"),
                        );
                    }
                    continue;
                }
            };
            let is_api_key = matches!(method, Method::ApiKey(_));
            if wants_api_key.is_some_and(|wanted| wanted != is_api_key) {
                let section = if is_api_key {
                    "auth.api_keys"
                } else {
                    "auth.jwt"
                };
                self.error(&name_path, format!("\"{name}\" is a provider of {section}"));
                unresolved = true;
                continue;
            }
            methods.push(method);
        }
        if unresolved {
            return None;
        }
        // A certificate alone carries no claims: a check on them would pass
        // every certificate.
        if methods.is_empty() && (!raw.require_claims.is_empty() || !raw.require_scopes.is_empty())
        {
            self.error(
                path,
                "require_claims and require_scopes need jwt or api_key: a client certificate has no claims",
            );
            return None;
        }
        // Tokens first: a token sent beside a key is tried first.
        methods.sort_by_key(|m| matches!(m, Method::ApiKey(_)));
        let mut require_claims = Vec::new();
        for (claim, accepted) in raw.require_claims {
            let cpath = key_path(&key_path(path, "require_claims"), &claim);
            let values = match accepted {
                Value::Array(items) => items,
                v => vec![v],
            };
            if values.is_empty()
                || values
                    .iter()
                    .any(|v| v.is_array() || v.is_object() || v.is_null())
            {
                self.error(
                    &cpath,
                    "list the accepted values: strings, numbers or booleans",
                );
                continue;
            }
            require_claims.push((claim, values));
        }
        if raw
            .require_scopes
            .iter()
            .any(|s| s.is_empty() || s.contains(' '))
        {
            self.error(
                &key_path(path, "require_scopes"),
                "a scope is one word without spaces",
            );
        }
        Some(RouteAuth {
            methods,
            require_claims,
            require_scopes: raw.require_scopes,
            client_cert: raw.client_cert,
        })
    }

    pub(super) fn rate_limit(
        &mut self,
        path: &str,
        value: &Value,
        route: &str,
        cluster: Option<&super::cluster::ClusterSection>,
    ) -> Option<RateLimit> {
        let raw = self.de::<RawRateLimit>(path, value)?;
        if raw.requests == 0 {
            self.error(&key_path(path, "requests"), "requests must be at least 1");
            return None;
        }
        if raw.per.0 < Duration::from_millis(100) {
            self.error(&key_path(path, "per"), "per must be at least 100ms");
            return None;
        }
        let key = match raw.key.as_deref() {
            None => LimitKey::ClientIp,
            Some(k) => match LimitKey::parse(k, true, "rate limit key") {
                Ok(k) => k,
                Err(e) => {
                    self.error(&key_path(path, "key"), e);
                    return None;
                }
            },
        };
        let limit = RateLimit::new(raw.requests, raw.per.0, key);
        let on_error = match raw.on_store_error.as_deref() {
            None | Some("allow") => OnStoreError::Allow,
            Some("deny") => OnStoreError::Deny,
            Some(other) => {
                self.error(
                    &key_path(path, "on_store_error"),
                    format!("unknown on_store_error \"{other}\"; use allow or deny"),
                );
                return None;
            }
        };
        match raw.scope.as_deref() {
            None | Some("local") => {
                if raw.on_store_error.is_some() {
                    self.error(
                        &key_path(path, "on_store_error"),
                        "on_store_error applies to scope: cluster only",
                    );
                    return None;
                }
                Some(limit)
            }
            Some("cluster") => match cluster {
                Some(c) => Some(limit.shared(Arc::clone(&c.cluster), route, on_error)),
                None => {
                    self.error(
                        &key_path(path, "scope"),
                        "scope: cluster needs a cluster section (cluster.redis) to share the count through",
                    );
                    None
                }
            },
            Some(other) => {
                self.error(
                    &key_path(path, "scope"),
                    format!("unknown scope \"{other}\"; use local or cluster"),
                );
                None
            }
        }
    }

    pub(super) fn header_rules(&mut self, path: &str, raw: Option<RawHeaderRules>) -> HeaderRules {
        let mut rules = HeaderRules::default();
        let Some(raw) = raw else {
            return rules;
        };
        let name = |cx: &mut Self, p: &str, n: &str| -> Option<HeaderName> {
            match HeaderName::from_bytes(n.as_bytes()) {
                Ok(h) => Some(h),
                Err(_) => {
                    cx.error(p, format!("\"{n}\" is not a valid header name"));
                    None
                }
            }
        };
        for (i, n) in raw.remove.iter().enumerate() {
            if let Some(h) = name(self, &index_path(&key_path(path, "remove"), i), n) {
                rules.remove.push(h);
            }
        }
        // Framing and connection fields belong to each hop and the gateway
        // writes them itself: a rule that wrote one could frame a body twice
        // (`Transfer-Encoding` next to `Content-Length`), and one that
        // renamed one would pass a hop's field on under another name.
        let framing = |cx: &mut Self, p: &str, h: &HeaderName| {
            let is_framing = FRAMING_HEADERS.contains(&h.as_str());
            if is_framing {
                cx.error(
                    p,
                    format!("{h} frames the message or the connection; the gateway sets it and a header rule cannot write or rename it"),
                );
            }
            !is_framing
        };
        for (from, to) in &raw.rename {
            let p = key_path(&key_path(path, "rename"), from);
            if let (Some(f), Some(t)) = (name(self, &p, from), name(self, &p, to)) {
                // Both checked, so both are reported.
                let (from_ok, to_ok) = (framing(self, &p, &f), framing(self, &p, &t));
                if from_ok && to_ok {
                    rules.rename.push((f, t));
                }
            }
        }
        for (key, map) in [("set", &raw.set), ("add", &raw.add)] {
            for (n, v) in map {
                let p = key_path(&key_path(path, key), n);
                let Some(h) = name(self, &p, n) else { continue };
                if !framing(self, &p, &h) {
                    continue;
                }
                match HeaderValue::from_str(v) {
                    Ok(value) if key == "set" => rules.set.push((h, value)),
                    Ok(value) => rules.add.push((h, value)),
                    Err(_) => self.error(&p, "the value is not a valid header value"),
                }
            }
        }
        rules
    }
}
